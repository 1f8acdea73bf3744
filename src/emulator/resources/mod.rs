//! Stripe resources the emulator serves, and the route table.
//!
//! Later additions (authorizations, transactions, events, test helpers) add
//! variants to [`Route`] and a module here each.

pub mod card;
pub mod cardholder;
pub mod controls;
pub mod list;

use http::Method;
use serde_json::{Map, Value};

use super::error::ApiError;
use super::state::{AccountKey, State};

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
            _ => None,
        }
    }

    /// Run the endpoint. Synchronous: called with the state lock held.
    pub fn execute(
        &self,
        state: &mut State,
        account: &AccountKey,
        params: Map<String, Value>,
        now: i64,
    ) -> Result<Value, ApiError> {
        match self {
            Route::CardholderCreate => cardholder::create(state.account(account), params, now),
            Route::CardholderList => cardholder::list(state.account(account), params),
            Route::CardholderRetrieve(id) => {
                cardholder::retrieve(state.account(account), id, params)
            }
            Route::CardholderUpdate(id) => cardholder::update(state.account(account), id, params),
            Route::CardCreate => card::create(state, account, params, now),
            Route::CardList => card::list(state.account(account), params),
            Route::CardRetrieve(id) => card::retrieve(state.account(account), id, params),
            Route::CardUpdate(id) => card::update(state.account(account), id, params),
        }
    }
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
