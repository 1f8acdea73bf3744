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

/// Why a card descriptor was (or was not) taken to be the intent's merchant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatchBasis {
    /// The authorization's merchant URL is the intent's domain (or a subdomain of it).
    Domain,
    /// The descriptor contains the merchant's name (or its domain's name), spaces ignored.
    Name,
    /// The descriptor is a truncation of the merchant's name (at least 6 characters).
    Prefix,
    /// Most of the merchant's name words appear in the descriptor.
    Words,
    /// Nothing matched.
    None,
}

impl MatchBasis {
    pub fn as_str(&self) -> &'static str {
        match self {
            MatchBasis::Domain => "domain",
            MatchBasis::Name => "name",
            MatchBasis::Prefix => "prefix",
            MatchBasis::Words => "words",
            MatchBasis::None => "none",
        }
    }
}

/// The result of matching a card descriptor against an intent's merchant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MerchantMatch {
    pub matched: bool,
    pub basis: MatchBasis,
    /// 0–100: how much of the merchant's name the descriptor carries.
    pub score: u8,
    /// The descriptor as compared (normalized, facilitator prefix removed).
    pub descriptor: String,
}

/// Payment-facilitator prefixes that precede the merchant in card descriptors
/// ("SQ *BLUE BOTTLE", "PAYPAL *NAMECHEAP").
const FACILITATOR_PREFIXES: &[&str] = &[
    "sq", "tst", "sp", "paypal", "pp", "pypl", "gglpay", "wpy", "ppl", "fs", "py",
];

fn alnum_lower(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_lowercase)
        .collect()
}

/// Normalizes a card descriptor: drops a facilitator prefix before `*`, then like
/// [`normalize_name`] (also dropping a trailing top-level domain, ".com").
pub fn normalize_descriptor(descriptor: &str) -> String {
    let mut d = descriptor.trim();
    if let Some((head, tail)) = d.split_once('*') {
        let head_norm = alnum_lower(head);
        if head_norm.is_empty() || FACILITATOR_PREFIXES.contains(&head_norm.as_str()) {
            d = tail;
        } else {
            // "NAMECHEAP*ORDER 123": the merchant is before the star.
            d = head;
        }
    }
    let mut name = normalize_name(d);
    for tld in [" com", " net", " org", " io", " co"] {
        if let Some(stripped) = name.strip_suffix(tld) {
            name = stripped.to_string();
            break;
        }
    }
    name
}

/// The name part of a registrable domain: "shop.namecheap.com" → "namecheap".
fn domain_label(domain: &str) -> Option<&str> {
    let labels: Vec<&str> = domain.split('.').collect();
    if labels.len() < 2 {
        return None;
    }
    // "example.co.uk": skip a short second-level label before a country code.
    let n = labels.len();
    let label = if n >= 3 && labels[n - 1].len() == 2 && labels[n - 2].len() <= 3 {
        labels[n - 3]
    } else {
        labels[n - 2]
    };
    Some(label)
}

/// Matches an authorization's merchant (descriptor `name`, optional `url`) against an
/// intent's merchant (`intent_name` as given, optional normalized `intent_domain`).
/// Deterministic and explainable: the basis says which rule matched.
pub fn match_descriptor(
    name: &str,
    url: Option<&str>,
    intent_name: &str,
    intent_domain: Option<&str>,
) -> MerchantMatch {
    let descriptor = normalize_descriptor(name);
    let found = |basis, score| MerchantMatch {
        matched: basis != MatchBasis::None,
        basis,
        score,
        descriptor: descriptor.clone(),
    };
    if let (Some(host), Some(domain)) = (url.and_then(normalize_domain), intent_domain)
        && domain_matches(&host, domain)
    {
        return found(MatchBasis::Domain, 100);
    }
    let d = alnum_lower(&descriptor);
    let intent = normalize_name(intent_name);
    let mut keys: Vec<String> = vec![alnum_lower(&intent)];
    if let Some(label) = intent_domain.and_then(domain_label) {
        keys.push(alnum_lower(label));
    }
    keys.retain(|k| k.chars().count() >= 3);
    if d.is_empty() {
        return found(MatchBasis::None, 0);
    }
    for key in &keys {
        if d.contains(key.as_str()) {
            return found(MatchBasis::Name, 100);
        }
    }
    // Descriptors are cut to a few characters: "NAMECHEA" for "Namecheap".
    for key in &keys {
        if d.chars().count() >= 6 && key.starts_with(d.as_str()) {
            let score = (d.chars().count() * 100 / key.chars().count().max(1)).min(99);
            return found(MatchBasis::Prefix, u8::try_from(score).unwrap_or(99));
        }
    }
    let words: Vec<&str> = intent.split_whitespace().filter(|w| w.len() >= 3).collect();
    let dwords: Vec<&str> = descriptor.split_whitespace().collect();
    if !words.is_empty() {
        let hits = words.iter().filter(|w| dwords.contains(w)).count();
        let score = u8::try_from(hits * 100 / words.len()).unwrap_or(0);
        if hits * 2 >= words.len() && hits > 0 {
            return found(MatchBasis::Words, score);
        }
        return found(MatchBasis::None, score);
    }
    found(MatchBasis::None, 0)
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

    #[test]
    fn descriptors_match_their_merchant() {
        let m = |name: &str, url: Option<&str>, intent: &str, domain: Option<&str>| {
            let r = match_descriptor(name, url, intent, domain);
            (r.matched, r.basis.as_str())
        };
        let nc = Some("namecheap.com");
        assert_eq!(m("NAMECHEAP.COM", None, "Namecheap", nc), (true, "name"));
        assert_eq!(
            m("PAYPAL *NAMECHEAP", None, "Namecheap", nc),
            (true, "name")
        );
        assert_eq!(
            m("NAMECHEAP*ORDER 8812", None, "Namecheap", nc),
            (true, "name")
        );
        assert_eq!(m("NAMECHE", None, "Namecheap Inc.", None), (true, "prefix"));
        assert_eq!(
            m(
                "Checkout",
                Some("https://pay.namecheap.com/x"),
                "Namecheap",
                nc
            ),
            (true, "domain")
        );
        assert_eq!(
            m("SQ *BLUE BOTTLE COFFEE", None, "Blue Bottle", None),
            (true, "name")
        );
        assert_eq!(
            m("ROCKET RIDES SF", None, "Rocket Rides", None),
            (true, "name")
        );
        assert_eq!(
            m("BOTTLE SHOP", None, "Blue Bottle Coffee", None),
            (false, "none")
        );
        assert_eq!(m("AMZN MKTP US", None, "Namecheap", nc), (false, "none"));
        assert_eq!(m("GIFTCARDS4U", None, "Namecheap", nc), (false, "none"));
        assert_eq!(
            m(
                "Checkout",
                Some("https://namecheap.com.evil.io"),
                "Namecheap",
                nc
            ),
            (false, "none")
        );
        assert_eq!(m("", None, "Namecheap", nc), (false, "none"));
        assert_eq!(
            m(
                "GOOGLE *CLOUD",
                None,
                "Google Cloud Platform",
                Some("cloud.google.com")
            ),
            (true, "name")
        );
        assert_eq!(
            m(
                "CLOUD PLATFORM SERVICES",
                None,
                "Google Cloud Platform",
                None
            ),
            (true, "words")
        );
        assert_eq!(normalize_descriptor("SQ *Blue Bottle, Inc."), "blue bottle");
        assert_eq!(normalize_descriptor("NAMECHEAP.COM"), "namecheap");
    }
}
