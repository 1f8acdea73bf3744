//! Stripe resources the emulator serves, and the route table.
//!
//! Each resource is a module; test helpers live with the object they act on.

pub mod authorization;
pub mod card;
pub mod cardholder;
pub mod controls;
pub mod list;
pub mod transaction;

use http::Method;
use serde_json::{Map, Value};

use super::error::ApiError;
use super::state::{AccountKey, State};
use super::webhooks::previous_attributes;

/// What executing a route produced.
#[derive(Debug)]
pub enum Exec {
    Done(Value),
    /// An authorization request that waits for the real-time webhook (the caller
    /// releases the state lock, asks, then calls [`authorization::finish`]).
    Realtime(Box<authorization::Pending>),
}

/// A recognised Stripe endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    CardholderCreate,
    CardholderList,
    CardholderRetrieve(String),
    CardholderUpdate(String),
    CardCreate,
    CardList,
    CardRetrieve(String),
    CardUpdate(String),
    AuthorizationList,
    AuthorizationRetrieve(String),
    AuthorizationUpdate(String),
    TransactionList,
    TransactionRetrieve(String),
    TransactionUpdate(String),
    TestAuthorizationCreate,
    TestAuthorizationCapture(String),
    TestAuthorizationExpire(String),
    TestAuthorizationIncrement(String),
    TestAuthorizationReverse(String),
    TestForceCapture,
    TestUnlinkedRefund,
    TestTransactionRefund(String),
}

impl Route {
    /// Match a request; returns the route and its path template (for statistics).
    pub fn recognize(method: &Method, path: &str) -> Option<(Route, &'static str)> {
        let rest = path.strip_prefix("/v1/")?;
        let segments: Vec<&str> = rest.split('/').collect();
        let id = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        let post = *method == Method::POST;
        let get = *method == Method::GET;
        match segments.as_slice() {
            ["issuing", "cardholders"] if post => {
                Some((Route::CardholderCreate, "/v1/issuing/cardholders"))
            }
            ["issuing", "cardholders"] if get => {
                Some((Route::CardholderList, "/v1/issuing/cardholders"))
            }
            ["issuing", "cardholders", raw] if get => id(raw).map(|i| {
                (
                    Route::CardholderRetrieve(i),
                    "/v1/issuing/cardholders/:cardholder",
                )
            }),
            ["issuing", "cardholders", raw] if post => id(raw).map(|i| {
                (
                    Route::CardholderUpdate(i),
                    "/v1/issuing/cardholders/:cardholder",
                )
            }),
            ["issuing", "cards"] if post => Some((Route::CardCreate, "/v1/issuing/cards")),
            ["issuing", "cards"] if get => Some((Route::CardList, "/v1/issuing/cards")),
            ["issuing", "cards", raw] if get => {
                id(raw).map(|i| (Route::CardRetrieve(i), "/v1/issuing/cards/:card"))
            }
            ["issuing", "cards", raw] if post => {
                id(raw).map(|i| (Route::CardUpdate(i), "/v1/issuing/cards/:card"))
            }
            ["issuing", "authorizations"] if get => {
                Some((Route::AuthorizationList, "/v1/issuing/authorizations"))
            }
            ["issuing", "authorizations", raw] if get => id(raw).map(|i| {
                (
                    Route::AuthorizationRetrieve(i),
                    "/v1/issuing/authorizations/:authorization",
                )
            }),
            ["issuing", "authorizations", raw] if post => id(raw).map(|i| {
                (
                    Route::AuthorizationUpdate(i),
                    "/v1/issuing/authorizations/:authorization",
                )
            }),
            ["issuing", "transactions"] if get => {
                Some((Route::TransactionList, "/v1/issuing/transactions"))
            }
            ["issuing", "transactions", raw] if get => id(raw).map(|i| {
                (
                    Route::TransactionRetrieve(i),
                    "/v1/issuing/transactions/:transaction",
                )
            }),
            ["issuing", "transactions", raw] if post => id(raw).map(|i| {
                (
                    Route::TransactionUpdate(i),
                    "/v1/issuing/transactions/:transaction",
                )
            }),
            ["test_helpers", "issuing", "authorizations"] if post => Some((
                Route::TestAuthorizationCreate,
                "/v1/test_helpers/issuing/authorizations",
            )),
            ["test_helpers", "issuing", "authorizations", raw, action] if post => {
                let i = id(raw)?;
                match *action {
                    "capture" => Some((
                        Route::TestAuthorizationCapture(i),
                        "/v1/test_helpers/issuing/authorizations/:authorization/capture",
                    )),
                    "expire" => Some((
                        Route::TestAuthorizationExpire(i),
                        "/v1/test_helpers/issuing/authorizations/:authorization/expire",
                    )),
                    "increment" => Some((
                        Route::TestAuthorizationIncrement(i),
                        "/v1/test_helpers/issuing/authorizations/:authorization/increment",
                    )),
                    "reverse" => Some((
                        Route::TestAuthorizationReverse(i),
                        "/v1/test_helpers/issuing/authorizations/:authorization/reverse",
                    )),
                    _ => None,
                }
            }
            [
                "test_helpers",
                "issuing",
                "transactions",
                "create_force_capture",
            ] if post => Some((
                Route::TestForceCapture,
                "/v1/test_helpers/issuing/transactions/create_force_capture",
            )),
            [
                "test_helpers",
                "issuing",
                "transactions",
                "create_unlinked_refund",
            ] if post => Some((
                Route::TestUnlinkedRefund,
                "/v1/test_helpers/issuing/transactions/create_unlinked_refund",
            )),
            ["test_helpers", "issuing", "transactions", raw, "refund"] if post => {
                id(raw).map(|i| {
                    (
                        Route::TestTransactionRefund(i),
                        "/v1/test_helpers/issuing/transactions/:transaction/refund",
                    )
                })
            }
            _ => None,
        }
    }

    /// Run the endpoint. Synchronous: called with the state lock held. Events the
    /// request causes are recorded in `state` (and queued in `state.outbox`).
    pub fn execute(
        &self,
        state: &mut State,
        account: &AccountKey,
        params: Map<String, Value>,
        now: i64,
    ) -> Result<Exec, ApiError> {
        let done = |r: Result<Value, ApiError>| r.map(Exec::Done);
        match self {
            Route::CardholderCreate => {
                let body = cardholder::create(state.account(account), params, now)?;
                let object = rendered_cardholder(state, account, &body);
                state.emit(account, "issuing_cardholder.created", object, None);
                Ok(Exec::Done(body))
            }
            Route::CardholderList => done(cardholder::list(state.account(account), params)),
            Route::CardholderRetrieve(id) => {
                done(cardholder::retrieve(state.account(account), id, params))
            }
            Route::CardholderUpdate(id) => {
                let before = rendered_cardholder(state, account, &serde_json::json!({"id": id}));
                let body = cardholder::update(state.account(account), id, params)?;
                let after = rendered_cardholder(state, account, &body);
                let prev = previous_attributes(&before, &after);
                if prev.as_object().is_some_and(|m| !m.is_empty()) {
                    state.emit(account, "issuing_cardholder.updated", after, Some(prev));
                }
                Ok(Exec::Done(body))
            }
            Route::CardCreate => {
                let body = card::create(state, account, params, now)?;
                let object = rendered_card(state, account, &body);
                state.emit(account, "issuing_card.created", object, None);
                Ok(Exec::Done(body))
            }
            Route::CardList => done(card::list(state.account(account), params)),
            Route::CardRetrieve(id) => done(card::retrieve(state.account(account), id, params)),
            Route::CardUpdate(id) => {
                let before = rendered_card(state, account, &serde_json::json!({"id": id}));
                let body = card::update(state.account(account), id, params)?;
                let after = rendered_card(state, account, &body);
                let prev = previous_attributes(&before, &after);
                if prev.as_object().is_some_and(|m| !m.is_empty()) {
                    state.emit(account, "issuing_card.updated", after, Some(prev));
                }
                Ok(Exec::Done(body))
            }
            Route::AuthorizationList => done(authorization::list(state.account(account), params)),
            Route::AuthorizationRetrieve(id) => {
                done(authorization::retrieve(state.account(account), id, params))
            }
            Route::AuthorizationUpdate(id) => {
                done(authorization::update(state, account, id, params))
            }
            Route::TransactionList => done(transaction::list(state.account(account), params)),
            Route::TransactionRetrieve(id) => {
                done(transaction::retrieve(state.account(account), id, params))
            }
            Route::TransactionUpdate(id) => done(transaction::update(state, account, id, params)),
            Route::TestAuthorizationCreate => authorization::create(state, account, params, now),
            Route::TestAuthorizationCapture(id) => {
                done(authorization::capture(state, account, id, params, now))
            }
            Route::TestAuthorizationExpire(id) => {
                done(authorization::expire(state, account, id, params))
            }
            Route::TestAuthorizationIncrement(id) => {
                authorization::increment(state, account, id, params, now)
            }
            Route::TestAuthorizationReverse(id) => {
                done(authorization::reverse(state, account, id, params))
            }
            Route::TestForceCapture => {
                done(transaction::force_capture(state, account, params, now))
            }
            Route::TestUnlinkedRefund => {
                done(transaction::unlinked_refund(state, account, params, now))
            }
            Route::TestTransactionRefund(id) => {
                done(transaction::refund(state, account, id, params, now))
            }
        }
    }
}

/// The card named by `body["id"]` as events show it (no number/cvc, no expansions).
fn rendered_card(state: &mut State, account: &AccountKey, body: &Value) -> Value {
    let a = state.account(account);
    body["id"]
        .as_str()
        .and_then(|id| a.cards.get(id))
        .map(|c| c.render(a, card::Reveal::default(), &[]))
        .unwrap_or(Value::Null)
}

fn rendered_cardholder(state: &mut State, account: &AccountKey, body: &Value) -> Value {
    let a = state.account(account);
    body["id"]
        .as_str()
        .and_then(|id| a.cardholders.get(id))
        .map(cardholder::Cardholder::render)
        .unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let r = |m: Method, p: &str| Route::recognize(&m, p).map(|(r, _)| r);
        assert_eq!(
            r(Method::POST, "/v1/issuing/cards"),
            Some(Route::CardCreate)
        );
        assert_eq!(
            r(Method::GET, "/v1/issuing/cards/ic_1"),
            Some(Route::CardRetrieve("ic_1".into()))
        );
        assert_eq!(
            r(Method::POST, "/v1/issuing/cardholders/ich_1"),
            Some(Route::CardholderUpdate("ich_1".into()))
        );
        assert_eq!(r(Method::DELETE, "/v1/issuing/cards/ic_1"), None);
        assert_eq!(r(Method::GET, "/v1/issuing/cards/"), None);
        assert_eq!(r(Method::GET, "/v1/issuing/cards/ic_1/x"), None);
        assert_eq!(r(Method::GET, "/v1/charges"), None);
        assert_eq!(r(Method::GET, "/v2/issuing/cards"), None);
    }
}
