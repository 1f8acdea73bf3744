//! The card vault: the numbers and CVCs of vault-delivery cards, in memory only, for the
//! card's lifetime; and the pure matching used by the egress proxy (placeholders, hosts, raw
//! card numbers). Never serialized; `Debug` is redacted.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::domain::time::UnixSeconds;

/// Opening of a placeholder: `{{roony:card:<intent>:<field>}}`.
pub const PLACEHOLDER_PREFIX: &str = "{{roony:card:";

/// The card of one vault intent.
pub struct VaultCard {
    pub intent_id: String,
    pub agent_id: String,
    pub number: String,
    pub cvc: String,
    pub exp_month: i64,
    pub exp_year: i64,
    /// Hosts (domains; subdomains match) the card may be sent to.
    pub hosts: Vec<String>,
    pub expires_at: Option<UnixSeconds>,
}

impl std::fmt::Debug for VaultCard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultCard")
            .field("intent_id", &self.intent_id)
            .field("agent_id", &self.agent_id)
            .field("hosts", &self.hosts)
            .finish_non_exhaustive()
    }
}

impl VaultCard {
    /// The value a placeholder field stands for.
    pub fn value(&self, field: Field) -> String {
        match field {
            Field::Number => self.number.clone(),
            Field::Cvc => self.cvc.clone(),
            Field::ExpMonth => format!("{:02}", self.exp_month),
            Field::ExpYear => self.exp_year.to_string(),
        }
    }

    pub fn allows(&self, host: &str) -> bool {
        host_allowed(host, &self.hosts)
    }

    pub fn live(&self, now: UnixSeconds) -> bool {
        self.expires_at.is_none_or(|at| now < at)
    }
}

/// Vault cards by intent id.
#[derive(Default)]
pub struct Vault {
    cards: RwLock<HashMap<String, Arc<VaultCard>>>,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Vault { .. }")
    }
}

impl Vault {
    pub fn insert(&self, card: VaultCard) -> Arc<VaultCard> {
        let card = Arc::new(card);
        if let Ok(mut m) = self.cards.write() {
            m.insert(card.intent_id.clone(), card.clone());
        }
        card
    }

    pub fn get(&self, intent_id: &str) -> Option<Arc<VaultCard>> {
        self.cards.read().ok()?.get(intent_id).cloned()
    }

    pub fn remove(&self, intent_id: &str) {
        if let Ok(mut m) = self.cards.write() {
            m.remove(intent_id);
        }
    }

    pub fn len(&self) -> usize {
        self.cards.read().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn intent_ids(&self) -> Vec<String> {
        self.cards
            .read()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Whether `number` is the number of any card in the vault.
    pub fn holds_number(&self, number: &str) -> bool {
        self.cards
            .read()
            .map(|m| m.values().any(|c| c.number == number))
            .unwrap_or(false)
    }

    /// Whether one of `agent_id`'s live cards may be sent to `host`.
    pub fn agent_may_reach(&self, agent_id: &str, host: &str, now: UnixSeconds) -> bool {
        self.cards
            .read()
            .map(|m| {
                m.values()
                    .any(|c| c.agent_id == agent_id && c.live(now) && c.allows(host))
            })
            .unwrap_or(false)
    }
}

/// A placeholder's field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    Number,
    Cvc,
    ExpMonth,
    ExpYear,
}

impl Field {
    pub fn as_str(&self) -> &'static str {
        match self {
            Field::Number => "number",
            Field::Cvc => "cvc",
            Field::ExpMonth => "exp_month",
            Field::ExpYear => "exp_year",
        }
    }

    fn parse(s: &str) -> Option<Field> {
        Some(match s {
            "number" => Field::Number,
            "cvc" => Field::Cvc,
            "exp_month" => Field::ExpMonth,
            "exp_year" => Field::ExpYear,
            _ => return None,
        })
    }
}

/// The placeholder text for an intent's field.
pub fn placeholder(intent_id: &str, field: Field) -> String {
    format!("{PLACEHOLDER_PREFIX}{intent_id}:{}}}}}", field.as_str())
}

/// One placeholder found in a text: byte range, intent and field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    pub start: usize,
    pub end: usize,
    pub intent_id: String,
    pub field: Field,
}

/// Matches `token` at `at` (ASCII case-insensitive); returns its length.
fn eat(s: &[u8], at: usize, tokens: &[&str]) -> Option<usize> {
    tokens.iter().find_map(|t| {
        let t = t.as_bytes();
        (s.len() >= at + t.len() && s[at..at + t.len()].eq_ignore_ascii_case(t)).then_some(t.len())
    })
}

const OPEN: &[&str] = &["{{", "%7B%7B"];
const CLOSE: &[&str] = &["}}", "%7D%7D"];
const COLON: &[&str] = &[":", "%3A"];

/// Every placeholder in `s`, literal (`{{roony:card:pur_1:number}}`, in JSON strings,
/// headers, URLs) or percent-encoded (as form bodies carry them).
pub fn find_placeholders(s: &[u8]) -> Vec<Found> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < s.len() {
        if let Some(f) = parse_at(s, i) {
            i = f.end;
            out.push(f);
        } else {
            i += 1;
        }
    }
    out
}

fn parse_at(s: &[u8], start: usize) -> Option<Found> {
    let mut i = start + eat(s, start, OPEN)?;
    i += eat(s, i, &["roony"])?;
    i += eat(s, i, COLON)?;
    i += eat(s, i, &["card"])?;
    i += eat(s, i, COLON)?;
    let id_start = i;
    while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == b'_') && i - id_start < 64 {
        i += 1;
    }
    let intent_id = std::str::from_utf8(&s[id_start..i]).ok()?.to_string();
    if intent_id.is_empty() {
        return None;
    }
    i += eat(s, i, COLON)?;
    let f_start = i;
    while i < s.len() && (s[i].is_ascii_lowercase() || s[i] == b'_') && i - f_start < 16 {
        i += 1;
    }
    let field = Field::parse(std::str::from_utf8(&s[f_start..i]).ok()?)?;
    i += eat(s, i, CLOSE)?;
    Some(Found {
        start,
        end: i,
        intent_id,
        field,
    })
}

/// `s` with every placeholder replaced by `value(intent, field)` (placeholders for which it
/// returns `None` are left as they are).
pub fn substitute(s: &[u8], mut value: impl FnMut(&Found) -> Option<String>) -> Vec<u8> {
    let found = find_placeholders(s);
    let mut out = Vec::with_capacity(s.len());
    let mut at = 0;
    for f in &found {
        out.extend_from_slice(&s[at..f.start]);
        match value(f) {
            Some(v) => out.extend_from_slice(v.as_bytes()),
            None => out.extend_from_slice(&s[f.start..f.end]),
        }
        at = f.end;
    }
    out.extend_from_slice(&s[at..]);
    out
}

/// Whether `host` is one of `allowed` or a subdomain of one (case-insensitive; a trailing
/// dot and a port are ignored).
pub fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let host = normalize_host(host);
    if host.is_empty() {
        return false;
    }
    allowed.iter().any(|d| {
        let d = d.trim_end_matches('.').to_ascii_lowercase();
        !d.is_empty()
            && (host == d
                || (host.len() > d.len()
                    && host.ends_with(&d)
                    && host.as_bytes()[host.len() - d.len() - 1] == b'.'))
    })
}

/// A host without port or trailing dot, lower case (`[v6]` brackets kept).
pub fn normalize_host(host: &str) -> String {
    let h = host.trim();
    let h = if h.starts_with('[') {
        h.split_inclusive(']').next().unwrap_or(h)
    } else {
        h.rsplit_once(':')
            .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
            .map_or(h, |(h, _)| h)
    };
    h.trim_end_matches('.').to_ascii_lowercase()
}

/// The Luhn check of a string of ASCII digits.
pub fn luhn(digits: &[u8]) -> bool {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return false;
    }
    let mut sum = 0u32;
    for (i, d) in digits.iter().rev().enumerate() {
        let mut v = u32::from(d - b'0');
        if i % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    sum.is_multiple_of(10)
}

/// Card-number candidates in `s`: runs of 13–19 digits (spaces and dashes between digits are
/// ignored) that pass the Luhn check.
pub fn card_numbers(s: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut run = Vec::new();
    let flush = |run: &mut Vec<u8>, out: &mut Vec<String>| {
        if (13..=19).contains(&run.len()) && luhn(run) {
            out.push(String::from_utf8_lossy(run).into_owned());
        }
        run.clear();
    };
    for (i, &b) in s.iter().enumerate() {
        if b.is_ascii_digit() {
            run.push(b);
        } else if (b == b' ' || b == b'-')
            && !run.is_empty()
            && s.get(i + 1).is_some_and(u8::is_ascii_digit)
        {
            continue;
        } else {
            flush(&mut run, &mut out);
        }
    }
    flush(&mut run, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn card() -> VaultCard {
        VaultCard {
            intent_id: "pur_1".into(),
            agent_id: "a".into(),
            number: "4242424242424242".into(),
            cvc: "123".into(),
            exp_month: 3,
            exp_year: 2030,
            hosts: vec!["shop.test".into()],
            expires_at: Some(100),
        }
    }

    #[test]
    fn finds_literal_and_encoded_placeholders() {
        let body = br#"{"n":"{{roony:card:pur_1:number}}","c":"{{roony:card:pur_1:cvc}}"}"#;
        let f = find_placeholders(body);
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].intent_id, "pur_1");
        assert_eq!(f[1].field, Field::Cvc);
        let form = b"n=%7B%7Broony%3Acard%3Apur_2%3Aexp_month%7D%7D&x=1";
        let f = find_placeholders(form);
        assert_eq!(
            (f[0].intent_id.as_str(), f[0].field),
            ("pur_2", Field::ExpMonth)
        );
        assert!(find_placeholders(b"{{roony:card:pur_1:pin}} {{roony:card::cvc}}").is_empty());
        assert_eq!(
            placeholder("pur_1", Field::ExpYear),
            "{{roony:card:pur_1:exp_year}}"
        );
    }

    #[test]
    fn substitutes_values() {
        let c = card();
        let out = substitute(
            b"n={{roony:card:pur_1:number}}&m=%7B%7Broony:card:pur_1:exp_month%7D%7D&o={{roony:card:pur_9:cvc}}",
            |f| (f.intent_id == "pur_1").then(|| c.value(f.field)),
        );
        assert_eq!(
            String::from_utf8_lossy(&out),
            "n=4242424242424242&m=03&o={{roony:card:pur_9:cvc}}"
        );
    }

    #[test]
    fn matches_hosts() {
        let allowed = vec!["shop.test".to_string()];
        assert!(host_allowed("shop.test", &allowed));
        assert!(host_allowed("Pay.Shop.Test:443", &allowed));
        assert!(host_allowed("shop.test.", &allowed));
        assert!(!host_allowed("evilshop.test", &allowed));
        assert!(!host_allowed("shop.test.evil.com", &allowed));
        assert!(!host_allowed("", &allowed));
        assert_eq!(normalize_host("[::1]:8080"), "[::1]");
    }

    #[test]
    fn finds_card_numbers_by_luhn() {
        assert!(luhn(b"4242424242424242"));
        assert!(!luhn(b"4242424242424241"));
        assert_eq!(
            card_numbers(b"pan=4242 4242 4242 4242&x=4242-4242-4242-4242;n=12345"),
            vec![
                "4242424242424242".to_string(),
                "4242424242424242".to_string()
            ]
        );
        assert!(card_numbers(b"4242424242424241").is_empty());
    }

    #[test]
    fn vault_is_redacted_and_scoped() {
        let v = Vault::default();
        v.insert(card());
        assert!(!format!("{:?}", v.get("pur_1")).contains("4242"));
        assert!(v.holds_number("4242424242424242"));
        assert!(v.agent_may_reach("a", "shop.test", 50));
        assert!(!v.agent_may_reach("a", "shop.test", 100));
        assert!(!v.agent_may_reach("b", "shop.test", 50));
        v.remove("pur_1");
        assert!(v.is_empty());
    }
}
