//! The tamper-evident audit trail, shared by the sidecar and the control plane.
//!
//! Every audit event is a link of a hash chain: it carries the hash of the event before it
//! (`prev_hash`; the first event's is [`GENESIS`], 64 zeros) and its own
//! `hash = hex SHA-256(prev_hash || canonical JSON of every field except hash)` (canonical
//! JSON as in `crate::sync::wire::canonical`: sorted keys, no whitespace). Editing a stored
//! event changes its hash; deleting or reordering events breaks `seq` or `prev_hash`, so
//! [`verify`] names the first broken link.
//!
//! Details are scrubbed before hashing ([`scrub`]): no card number (13–19 digits passing
//! Luhn), no CVC, key or token is ever stored.
//!
//! - the control plane chains `audit_events` in its database (`crate::control::db`);
//! - the sidecar chains its own events in `audit.redb` ([`log::AuditLog`]), written by one
//!   writer thread, with a request-auditing layer ([`http::layer`]);
//! - `roony audit verify` ([`cli`]) checks either chain end to end.

pub mod cli;
pub mod http;
pub mod log;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// `prev_hash` of the first event of a chain.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One event of a chain, as stored and verified.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Position in the chain, from 1, without gaps.
    pub seq: u64,
    pub id: String,
    /// Unix seconds.
    pub at: i64,
    /// `agent`, `admin_token`, `stripe`, `sidecar`, `system` or `anonymous`.
    pub actor_type: String,
    /// The actor's non-secret id (a key id derived from a key or token, never the secret).
    pub actor_id: String,
    pub action: String,
    pub target_type: String,
    pub target_id: String,
    /// `success` or `failure`.
    pub outcome: String,
    pub request_id: Option<String>,
    /// Scrubbed with [`scrub`] before hashing.
    pub details: Value,
    pub prev_hash: String,
    pub hash: String,
}

/// An event not yet in a chain (see [`Entry::link`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub id: String,
    pub at: i64,
    pub actor_type: String,
    pub actor_id: String,
    pub action: String,
    pub target_type: String,
    pub target_id: String,
    pub outcome: String,
    pub request_id: Option<String>,
    pub details: Value,
}

impl Entry {
    /// This entry as event `seq` after `prev_hash`: details scrubbed, hash computed.
    pub fn link(self, seq: u64, prev_hash: &str) -> AuditEvent {
        let mut event = AuditEvent {
            seq,
            id: self.id,
            at: self.at,
            actor_type: self.actor_type,
            actor_id: self.actor_id,
            action: self.action,
            target_type: self.target_type,
            target_id: self.target_id,
            outcome: self.outcome,
            request_id: self.request_id.map(|r| scrub_str(&r)),
            details: scrub(self.details),
            prev_hash: prev_hash.to_string(),
            hash: String::new(),
        };
        event.hash = event_hash(&event);
        event
    }
}

/// `hex SHA-256(prev_hash || canonical JSON of every field except hash)`.
pub fn event_hash(e: &AuditEvent) -> String {
    let body = serde_json::json!({
        "seq": e.seq,
        "id": e.id,
        "at": e.at,
        "actor_type": e.actor_type,
        "actor_id": e.actor_id,
        "action": e.action,
        "target_type": e.target_type,
        "target_id": e.target_id,
        "outcome": e.outcome,
        "request_id": e.request_id,
        "details": e.details,
        "prev_hash": e.prev_hash,
    });
    let mut h = Sha256::new();
    h.update(e.prev_hash.as_bytes());
    h.update(crate::sync::wire::canonical(&body).as_bytes());
    hex::encode(h.finalize())
}

/// A chain that verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    pub count: u64,
    /// Hash of the last event ([`GENESIS`] for an empty chain).
    pub head: String,
}

/// The first broken link of a chain.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("broken at event #{seq} ({id}): {reason}")]
pub struct BrokenLink {
    pub seq: u64,
    pub id: String,
    /// `hash_mismatch` (the event was edited), `prev_hash_mismatch` (an event before it
    /// was removed, replaced or reordered), `seq_gap` (events missing or reordered), or
    /// `head_mismatch` (the last events were removed: the recorded head is elsewhere).
    pub reason: &'static str,
}

/// Checks events one by one, in chain order.
#[derive(Clone, Debug)]
pub struct Verifier {
    count: u64,
    next_seq: u64,
    head: String,
    last_id: String,
}

impl Default for Verifier {
    fn default() -> Self {
        Verifier {
            count: 0,
            next_seq: 1,
            head: GENESIS.to_string(),
            last_id: String::new(),
        }
    }
}

impl Verifier {
    pub fn new() -> Verifier {
        Verifier::default()
    }

    /// The next event of the chain.
    pub fn check(&mut self, e: &AuditEvent) -> Result<(), BrokenLink> {
        let broken = |reason| BrokenLink {
            seq: e.seq,
            id: e.id.clone(),
            reason,
        };
        if e.seq != self.next_seq {
            return Err(broken("seq_gap"));
        }
        if event_hash(e) != e.hash {
            return Err(broken("hash_mismatch"));
        }
        if e.prev_hash != self.head {
            return Err(broken("prev_hash_mismatch"));
        }
        self.count += 1;
        self.next_seq += 1;
        self.head = e.hash.clone();
        self.last_id = e.id.clone();
        Ok(())
    }

    /// Compares the end of the chain with the head the writer recorded (`seq`, `hash`):
    /// catches events removed from the end.
    pub fn check_head(&self, seq: u64, hash: &str) -> Result<(), BrokenLink> {
        if seq == self.count && hash == self.head {
            return Ok(());
        }
        Err(BrokenLink {
            seq: self.count + 1,
            id: if seq > self.count {
                "(missing)".to_string()
            } else {
                self.last_id.clone()
            },
            reason: "head_mismatch",
        })
    }

    pub fn report(&self) -> VerifyReport {
        VerifyReport {
            count: self.count,
            head: self.head.clone(),
        }
    }
}

/// Verifies a whole chain, in order; names the first broken link.
pub fn verify<'a>(
    events: impl IntoIterator<Item = &'a AuditEvent>,
) -> Result<VerifyReport, BrokenLink> {
    let mut v = Verifier::new();
    for e in events {
        v.check(e)?;
    }
    Ok(v.report())
}

// ----- redaction -----------------------------------------------------------------------

/// What replaces a scrubbed value.
pub const REDACTED: &str = "[redacted]";

/// Prefixes of Roony's and Stripe's secrets (agent keys, admin tokens, sidecar tokens,
/// setup links, webhook secrets, Stripe secret and restricted keys, Connect refresh tokens
/// and authorization codes).
pub const SECRET_PREFIXES: &[&str] = &[
    "roony_ak_",
    "roony_at_",
    "roony_st_",
    "roony_setup_",
    "whsec_",
    "sk_",
    "rk_",
    "rt_",
    "ac_",
];

/// Object keys whose values are never kept (card numbers, CVCs, keys, tokens).
const SECRET_KEYS: &[&str] = &[
    "number",
    "card_number",
    "pan",
    "cvc",
    "cvv",
    "cvc2",
    "token",
    "secret",
    "api_key",
    "password",
    "plaintext",
    "agent_key",
    "admin_token",
    "sidecar_token",
    "webhook_secret",
    "client_secret",
];

/// `details` with secrets removed: values under secret-looking keys, card numbers and
/// prefixed keys/tokens inside strings. Applied before hashing, so what is hashed is what
/// is stored.
pub fn scrub(value: Value) -> Value {
    match value {
        Value::String(s) => Value::String(scrub_str(&s)),
        Value::Array(items) => Value::Array(items.into_iter().map(scrub).collect()),
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| {
                    if SECRET_KEYS.contains(&k.to_ascii_lowercase().as_str()) && !v.is_null() {
                        (k, Value::String(REDACTED.to_string()))
                    } else {
                        (k, scrub(v))
                    }
                })
                .collect(),
        ),
        other => other,
    }
}

/// `s` with card numbers and prefixed secrets replaced by [`REDACTED`].
pub fn scrub_str(s: &str) -> String {
    let s = scrub_secrets(s);
    scrub_card_numbers(&s)
}

fn is_word(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

fn scrub_secrets(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        // A prefix counts at the start of a word only (`desk_x` is not a Stripe key).
        let at_word_start = i == 0 || !s[..i].chars().next_back().is_some_and(is_word);
        let prefix = if at_word_start {
            SECRET_PREFIXES.iter().find(|p| {
                s[i..]
                    .get(..p.len())
                    .is_some_and(|head| head.eq_ignore_ascii_case(p))
            })
        } else {
            None
        };
        if let Some(p) = prefix {
            let rest = &s[i + p.len()..];
            let len = rest.find(|c: char| !is_word(c)).unwrap_or(rest.len());
            // `sk_` and `rk_` are short: only a real-looking key (`sk_live_…`) counts.
            if len >= 8 {
                out.push_str(REDACTED);
                i += p.len() + len;
                continue;
            }
        }
        let Some(c) = s[i..].chars().next() else {
            break;
        };
        out.push(c);
        i += c.len_utf8();
    }
    out
}

/// Whether `digits` (ASCII digits only) passes the Luhn check.
pub fn luhn(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, d)| {
            let d = u32::from(d - b'0');
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 { x - 9 } else { x }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// Replaces runs of 13–19 digits (single spaces or dashes allowed between digits) that pass
/// Luhn and stand alone (not inside a longer word).
fn scrub_card_numbers(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < chars.len() {
        let starts_run = chars[i].is_ascii_digit()
            && (i == 0 || !(chars[i - 1].is_ascii_alphanumeric() || chars[i - 1] == '_'));
        if starts_run {
            // Extend over digits and single separators between digits.
            let mut j = i;
            let mut digits = Vec::new();
            let mut end = i;
            while j < chars.len() {
                let c = chars[j];
                if c.is_ascii_digit() {
                    digits.push(c as u8);
                    j += 1;
                    end = j;
                } else if (c == ' ' || c == '-')
                    && j + 1 < chars.len()
                    && chars[j + 1].is_ascii_digit()
                    && j > i
                {
                    j += 1;
                } else {
                    break;
                }
            }
            let stands_alone =
                end >= chars.len() || !(chars[end].is_ascii_alphanumeric() || chars[end] == '_');
            if stands_alone && (13..=19).contains(&digits.len()) && luhn(&digits) {
                out.push_str(REDACTED);
                i = end;
                continue;
            }
            // Not a card number: copy the digit run as is.
            for c in &chars[i..end] {
                out.push(*c);
            }
            i = end.max(i + 1);
            continue;
        }
        out.push(chars[i]);
        i += 1;
    }
    out
}

/// A request id from a client (`x-request-id`), when it is safe to keep: at most 128
/// printable ASCII characters without spaces, and no secret in it.
pub fn accept_request_id(value: &str) -> Option<String> {
    let ok = !value.is_empty()
        && value.len() <= 128
        && value.bytes().all(|b| b.is_ascii_graphic())
        && scrub_str(value) == value;
    ok.then(|| value.to_string())
}

#[cfg(test)]
mod tests;
