//! Merchants: normalized domains and names, and ISO 3166-1 alpha-2 countries.
//!
//! Normalization is what lets a policy say `allow_domains: ["namecheap.com"]` and match
//! `https://www.Namecheap.com/checkout`, or `deny_names: ["Acme Casino"]` and match
//! "ACME CASINO, INC.".

/// ISO 3166-1 alpha-2 codes (officially assigned), sorted.
#[rustfmt::skip]
const COUNTRIES: &[&str] = &[
    "AD","AE","AF","AG","AI","AL","AM","AO","AQ","AR","AS","AT","AU","AW","AX","AZ",
    "BA","BB","BD","BE","BF","BG","BH","BI","BJ","BL","BM","BN","BO","BQ","BR","BS","BT","BV","BW","BY","BZ",
    "CA","CC","CD","CF","CG","CH","CI","CK","CL","CM","CN","CO","CR","CU","CV","CW","CX","CY","CZ",
    "DE","DJ","DK","DM","DO","DZ","EC","EE","EG","EH","ER","ES","ET","FI","FJ","FK","FM","FO","FR",
    "GA","GB","GD","GE","GF","GG","GH","GI","GL","GM","GN","GP","GQ","GR","GS","GT","GU","GW","GY",
    "HK","HM","HN","HR","HT","HU","ID","IE","IL","IM","IN","IO","IQ","IR","IS","IT","JE","JM","JO","JP",
    "KE","KG","KH","KI","KM","KN","KP","KR","KW","KY","KZ","LA","LB","LC","LI","LK","LR","LS","LT","LU","LV","LY",
    "MA","MC","MD","ME","MF","MG","MH","MK","ML","MM","MN","MO","MP","MQ","MR","MS","MT","MU","MV","MW","MX","MY","MZ",
    "NA","NC","NE","NF","NG","NI","NL","NO","NP","NR","NU","NZ","OM",
    "PA","PE","PF","PG","PH","PK","PL","PM","PN","PR","PS","PT","PW","PY","QA","RE","RO","RS","RU","RW",
    "SA","SB","SC","SD","SE","SG","SH","SI","SJ","SK","SL","SM","SN","SO","SR","SS","ST","SV","SX","SY","SZ",
    "TC","TD","TF","TG","TH","TJ","TK","TL","TM","TN","TO","TR","TT","TV","TW","TZ",
    "UA","UG","UM","US","UY","UZ","VA","VC","VE","VG","VI","VN","VU","WF","WS","YE","YT","ZA","ZM","ZW",
];

/// Returns the upper-case alpha-2 code if `code` is an assigned ISO 3166-1 country.
pub fn normalize_country(code: &str) -> Option<String> {
    let upper = code.trim().to_ascii_uppercase();
    COUNTRIES.binary_search(&upper.as_str()).ok().map(|_| upper)
}

/// Extracts and normalizes the host of a URL or bare domain: lower case, no scheme, port,
/// path, credentials, trailing dot or leading `www.`. Returns `None` unless the result is a
/// plausible DNS name (labels of letters, digits and hyphens, at least one dot).
pub fn normalize_domain(input: &str) -> Option<String> {
    let mut s = input.trim();
    if let Some(idx) = s.find("://") {
        s = &s[idx + 3..];
    }
    let end = s.find(['/', '?', '#']).unwrap_or(s.len());
    s = &s[..end];
    if let Some(at) = s.rfind('@') {
        s = &s[at + 1..];
    }
    if let Some(colon) = s.find(':') {
        s = &s[..colon];
    }
    let mut host = s.trim_end_matches('.').to_ascii_lowercase();
    if let Some(rest) = host.strip_prefix("www.") {
        host = rest.to_string();
    }
    let valid = host.len() <= 253
        && host.contains('.')
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    valid.then_some(host)
}

/// True if `host` equals `rule` or is a subdomain of it (`shop.example.com` matches
/// `example.com`; `badexample.com` does not).
pub fn domain_matches(host: &str, rule: &str) -> bool {
    host == rule
        || (host.len() > rule.len()
            && host.ends_with(rule)
            && host.as_bytes()[host.len() - rule.len() - 1] == b'.')
}

/// Legal-form suffixes dropped from merchant names before comparison.
const NAME_SUFFIXES: &[&str] = &[
    "inc",
    "llc",
    "ltd",
    "limited",
    "corp",
    "corporation",
    "co",
    "gmbh",
    "sa",
    "sas",
    "bv",
    "plc",
    "pty",
    "ag",
    "srl",
];

/// Normalizes a merchant name for comparison: lower case, punctuation to spaces, runs of
/// spaces collapsed, legal-form suffixes ("Inc.", "LLC") dropped. "ACME Casino, Inc." and
/// "acme casino" both become "acme casino".
pub fn normalize_name(name: &str) -> String {
    let lowered: String = name
        .chars()
        .map(|c| {
            if c.is_alphanumeric() {
                c.to_lowercase().next().unwrap_or(c)
            } else {
                ' '
            }
        })
        .collect();
    let mut words: Vec<&str> = lowered.split_whitespace().collect();
    while words.len() > 1 && words.last().is_some_and(|w| NAME_SUFFIXES.contains(w)) {
        words.pop();
    }
    words.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn countries_sorted_and_validated() {
        for w in COUNTRIES.windows(2) {
            assert!(w[0] < w[1]);
        }
        assert_eq!(normalize_country("us").as_deref(), Some("US"));
        assert_eq!(normalize_country("XX"), None);
        assert_eq!(normalize_country("USA"), None);
    }

    #[test]
    fn domains_normalize() {
        assert_eq!(
            normalize_domain("https://www.Namecheap.com:443/checkout?x=1").as_deref(),
            Some("namecheap.com")
        );
        assert_eq!(
            normalize_domain("shop.example.com.").as_deref(),
            Some("shop.example.com")
        );
        assert_eq!(
            normalize_domain("http://user:pw@evil.com/").as_deref(),
            Some("evil.com")
        );
        assert_eq!(normalize_domain("localhost"), None);
        assert_eq!(normalize_domain("exa mple.com"), None);
        assert_eq!(normalize_domain(""), None);
    }

    #[test]
    fn subdomain_matching_is_label_aligned() {
        assert!(domain_matches("example.com", "example.com"));
        assert!(domain_matches("shop.example.com", "example.com"));
        assert!(!domain_matches("badexample.com", "example.com"));
        assert!(!domain_matches("example.com", "shop.example.com"));
    }

    #[test]
    fn names_normalize() {
        assert_eq!(normalize_name("ACME Casino, Inc."), "acme casino");
        assert_eq!(normalize_name("  acme   casino "), "acme casino");
        assert_eq!(normalize_name("Co"), "co");
        assert_eq!(normalize_name("Müller GmbH"), "müller");
    }
}
