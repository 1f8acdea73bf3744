//! `Idempotency-Key` records, scoped per account (docs.stripe.com/idempotency).
//!
//! A key is reserved when execution begins and completed with the response. Only
//! executed successes are saved; validation errors and injected faults release the
//! key so a retry runs again. Records expire after 24 hours.

use std::collections::HashMap;

use bytes::Bytes;
use http::StatusCode;
use serde_json::Value;

use super::error::{ApiError, ErrorType};
use super::state::AccountKey;

/// How long a completed key is remembered.
pub const TTL_SECS: i64 = 24 * 60 * 60;
/// Longest accepted key.
pub const MAX_KEY_LEN: usize = 255;

/// What identifies "the same request" for a key.
#[derive(Debug, Clone, PartialEq)]
pub struct Fingerprint {
    pub method: String,
    pub path: String,
    /// Parameters in [`super::form::canonical`] form.
    pub params: Value,
}

/// A saved answer.
#[derive(Clone)]
pub struct Saved {
    pub status: StatusCode,
    pub body: Bytes,
    pub request_id: String,
}

impl std::fmt::Debug for Saved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Saved")
            .field("status", &self.status)
            .field("body_len", &self.body.len())
            .field("request_id", &self.request_id)
            .finish()
    }
}

#[derive(Debug)]
enum Entry {
    InFlight {
        request: Fingerprint,
        since: i64,
        token: u64,
    },
    Done {
        request: Fingerprint,
        saved: Saved,
        at: i64,
    },
}

/// Result of presenting a key.
#[derive(Debug)]
pub enum Begin {
    /// First use (or expired): the key is now reserved under this token.
    Reserved(u64),
    /// Same request seen before: answer with the saved response.
    Replay(Saved),
    /// Mismatch or concurrent use.
    Refused(ApiError),
}

#[derive(Debug, Default)]
pub struct IdempotencyStore {
    entries: HashMap<(AccountKey, String), Entry>,
    next_token: u64,
}

impl IdempotencyStore {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Present `key` for `request` at time `now`.
    pub fn begin(
        &mut self,
        account: &AccountKey,
        key: &str,
        request: Fingerprint,
        now: i64,
    ) -> Begin {
        self.prune(now);
        let slot = (account.clone(), key.to_owned());
        match self.entries.get(&slot) {
            Some(Entry::InFlight { .. }) => Begin::Refused(in_use(key)),
            Some(Entry::Done {
                request: first,
                saved,
                ..
            }) => {
                if first.method != request.method || first.path != request.path {
                    Begin::Refused(endpoint_mismatch(key, first, &request))
                } else if first.params != request.params {
                    Begin::Refused(params_mismatch(key))
                } else {
                    Begin::Replay(saved.clone())
                }
            }
            None => {
                self.next_token += 1;
                let token = self.next_token;
                self.entries.insert(
                    slot,
                    Entry::InFlight {
                        request,
                        since: now,
                        token,
                    },
                );
                Begin::Reserved(token)
            }
        }
    }

    /// Save the response of a reserved key.
    pub fn complete(
        &mut self,
        account: &AccountKey,
        key: &str,
        token: u64,
        saved: Saved,
        now: i64,
    ) {
        let slot = (account.clone(), key.to_owned());
        if let Some(Entry::InFlight {
            token: t, request, ..
        }) = self.entries.get(&slot)
            && *t == token
        {
            let request = request.clone();
            self.entries.insert(
                slot,
                Entry::Done {
                    request,
                    saved,
                    at: now,
                },
            );
        }
    }

    /// Drop a reservation without saving (validation failure, client went away).
    pub fn release(&mut self, account: &AccountKey, key: &str, token: u64) {
        let slot = (account.clone(), key.to_owned());
        if matches!(self.entries.get(&slot), Some(Entry::InFlight { token: t, .. }) if *t == token)
        {
            self.entries.remove(&slot);
        }
    }

    /// Forget records older than [`TTL_SECS`].
    pub fn prune(&mut self, now: i64) {
        self.entries.retain(|_, e| match e {
            Entry::InFlight { since, .. } => now - *since < TTL_SECS,
            Entry::Done { at, .. } => now - *at < TTL_SECS,
        });
    }

    pub fn clear(&mut self) {
        self.entries.clear();
    }
}

fn in_use(key: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        ErrorType::IdempotencyError,
        format!(
            "There is currently another in-progress request using this Idempotent Key (that probably means you submitted twice, and the other request is still going through): {key}. Please try again later."
        ),
    )
    .with_code("idempotency_key_in_use")
}

fn params_mismatch(key: &str) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        ErrorType::IdempotencyError,
        format!(
            "Keys for idempotent requests can only be used with the same parameters they were first used with. Try using a key other than '{key}' if you meant to execute a different request."
        ),
    )
}

fn endpoint_mismatch(key: &str, first: &Fingerprint, now: &Fingerprint) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        ErrorType::IdempotencyError,
        format!(
            "Keys for idempotent requests can only be used for the same endpoint they were first used for ('{} {}' vs '{} {}'). Try using a key other than '{key}' if you meant to execute a different request.",
            first.method, first.path, now.method, now.path
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fp(path: &str, params: Value) -> Fingerprint {
        Fingerprint {
            method: "POST".into(),
            path: path.into(),
            params,
        }
    }

    fn saved(body: &str) -> Saved {
        Saved {
            status: StatusCode::OK,
            body: Bytes::from(body.to_owned()),
            request_id: "req_1".into(),
        }
    }

    const P: AccountKey = AccountKey::Platform;

    #[test]
    fn replay_mismatch_and_conflict() {
        let mut store = IdempotencyStore::default();
        let a = fp("/v1/issuing/cards", json!({"currency": "usd"}));
        let Begin::Reserved(token) = store.begin(&P, "k1", a.clone(), 100) else {
            panic!("first use reserves");
        };
        // concurrent use while in flight
        match store.begin(&P, "k1", a.clone(), 100) {
            Begin::Refused(e) => {
                assert_eq!(e.status, StatusCode::CONFLICT);
                assert_eq!(e.code, Some("idempotency_key_in_use"));
            }
            other => panic!("expected conflict, got {other:?}"),
        }
        store.complete(&P, "k1", token, saved("{\"id\":\"ic_1\"}"), 101);
        match store.begin(&P, "k1", a.clone(), 102) {
            Begin::Replay(s) => assert_eq!(&s.body[..], b"{\"id\":\"ic_1\"}"),
            other => panic!("expected replay, got {other:?}"),
        }
        // different parameters
        match store.begin(
            &P,
            "k1",
            fp("/v1/issuing/cards", json!({"currency": "eur"})),
            103,
        ) {
            Begin::Refused(e) => {
                assert_eq!(e.status, StatusCode::BAD_REQUEST);
                assert_eq!(e.kind, ErrorType::IdempotencyError);
                assert!(e.message.contains("same parameters"));
                assert!(e.message.contains("'k1'"));
            }
            other => panic!("expected mismatch, got {other:?}"),
        }
        // different endpoint
        match store.begin(
            &P,
            "k1",
            fp("/v1/issuing/cardholders", json!({"currency": "usd"})),
            103,
        ) {
            Begin::Refused(e) => assert!(e.message.contains("same endpoint")),
            other => panic!("expected endpoint mismatch, got {other:?}"),
        }
        // keys are per account
        let acct = AccountKey::Connected("acct_1".into());
        assert!(matches!(
            store.begin(&acct, "k1", a.clone(), 104),
            Begin::Reserved(_)
        ));
    }

    #[test]
    fn release_and_expiry() {
        let mut store = IdempotencyStore::default();
        let a = fp("/v1/issuing/cards", json!({}));
        let Begin::Reserved(t1) = store.begin(&P, "k", a.clone(), 0) else {
            panic!("reserve");
        };
        store.release(&P, "k", t1);
        assert!(store.is_empty());
        let Begin::Reserved(t2) = store.begin(&P, "k", a.clone(), 0) else {
            panic!("reserve again");
        };
        // a stale token cannot touch the new reservation
        store.release(&P, "k", t1);
        assert_eq!(store.len(), 1);
        store.complete(&P, "k", t2, saved("{}"), 10);
        assert!(matches!(
            store.begin(&P, "k", a.clone(), 10 + TTL_SECS - 1),
            Begin::Replay(_)
        ));
        assert!(matches!(
            store.begin(&P, "k", a, 10 + TTL_SECS),
            Begin::Reserved(_)
        ));
    }
}
