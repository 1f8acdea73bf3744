//! The issuing relay: `/api/sync/v1/stripe/v1/…`. A synced sidecar without a Stripe key of
//! its own points its async-stripe issuer at `{control plane}/api/sync/v1/stripe/` with its
//! sidecar token as the API key; the relay authenticates the token, allows only the Stripe
//! Issuing calls the issuer makes, checks card creations against what the control plane
//! knows, and forwards them to Stripe with the organization's credential (the connected
//! account's access token, or the direct mode's key), which never leaves the control plane.
//!
//! Allowed: `POST issuing/cardholders`, `POST issuing/cards`
//! (checked: Roony metadata present, the agent is in the sidecar's project and active, the
//! spending limit is at most the policy's per-transaction maximum plus its card buffer),
//! `GET issuing/cards/{id}` (incl. `expand[]=number&expand[]=cvc`; only cards of the
//! sidecar's project) and `POST issuing/cards/{id}` with `status=canceled` only (same
//! check). Everything else is `403 relay_forbidden`. Errors are Stripe-shaped, so the
//! issuer classifies them like Stripe's; a disconnected organization is
//! `403 stripe_account_disconnected` (not retried).
//!
//! Bodies are never logged; card numbers pass through in memory only.

// Helpers answer their error as the HTTP response itself.
#![allow(clippy::result_large_err)]

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value};

use super::api::AdminState;
use super::connect::{self, ConnectError};
use super::db::SidecarAuth;

/// Where the relay is mounted; the issuer's base URL is `{control plane}{BASE}/`.
pub const BASE: &str = "/api/sync/v1/stripe";
/// The route (async-stripe appends `v1/…` to its base URL).
pub const ROUTE: &str = "/api/sync/v1/stripe/v1/{*path}";
/// The Stripe error code of an organization without a usable Stripe connection.
pub const DISCONNECTED: &str = "stripe_account_disconnected";
/// Card buffer when a policy names none (basis points, as `policy::rules`).
const DEFAULT_BUFFER_BPS: i64 = 100;

/// A Stripe-shaped error answer.
pub fn stripe_error(status: StatusCode, kind: &str, code: &str, message: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::json!({"error": {"type": kind, "code": code, "message": message}}).to_string(),
    )
        .into_response()
}

fn forbidden(message: &str) -> Response {
    stripe_error(
        StatusCode::FORBIDDEN,
        "invalid_request_error",
        "relay_forbidden",
        message,
    )
}

fn invalid(message: &str) -> Response {
    stripe_error(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        "relay_check_failed",
        message,
    )
}

fn not_found() -> Response {
    stripe_error(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "resource_missing",
        "no such card",
    )
}

fn internal(message: &str) -> Response {
    stripe_error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "api_error",
        "relay_error",
        message,
    )
}

/// What a request is, once allowed.
enum Call<'a> {
    CreateCardholder,
    CreateCard,
    RetrieveCard,
    CancelCard(&'a str),
}

fn is_id(s: &str, prefix: &str) -> bool {
    s.strip_prefix(prefix).is_some_and(|rest| {
        !rest.is_empty() && rest.len() <= 128 && rest.chars().all(|c| c.is_ascii_alphanumeric())
    })
}

fn classify<'a>(method: &Method, path: &'a str) -> Option<Call<'a>> {
    let parts: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    match (method.as_str(), parts.as_slice()) {
        ("POST", ["issuing", "cardholders"]) => Some(Call::CreateCardholder),
        ("POST", ["issuing", "cards"]) => Some(Call::CreateCard),
        ("GET", ["issuing", "cards", id]) if is_id(id, "ic_") => Some(Call::RetrieveCard),
        ("POST", ["issuing", "cards", id]) if is_id(id, "ic_") => Some(Call::CancelCard(id)),
        _ => None,
    }
}

/// The query strings the relay forwards: none on a `POST`; on a card retrieval only
/// `expand[]=number` and `expand[]=cvc` (the issuer's).
fn query_allowed(call: &Call<'_>, query: Option<&str>) -> bool {
    let Some(query) = query.filter(|q| !q.is_empty()) else {
        return true;
    };
    match call {
        Call::RetrieveCard => query.split('&').all(|pair| {
            let decoded = percent_encoding::percent_decode_str(pair).decode_utf8_lossy();
            let Some((key, value)) = decoded.split_once('=') else {
                return false;
            };
            let index = key
                .strip_prefix("expand[")
                .and_then(|k| k.strip_suffix(']'));
            index.is_some_and(|i| i.bytes().all(|b| b.is_ascii_digit()))
                && matches!(value, "number" | "cvc")
        }),
        _ => false,
    }
}

/// `ANY /api/sync/v1/stripe/v1/{*path}`.
pub async fn relay(
    State(state): State<AdminState>,
    method: Method,
    Path(path): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let sidecar = match super::sync::authenticate(&state, &headers).await {
        Ok((s, _)) => s,
        Err(_) => {
            return stripe_error(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "invalid_sidecar_token",
                "the sidecar token is missing or not valid",
            );
        }
    };
    let Some(call) = classify(&method, &path) else {
        tracing::warn!(sidecar = %sidecar.id, method = %method, path = %path,
            "relay refused a stripe call outside the issuer's");
        return forbidden("the relay forwards only the issuing calls of roony's issuer");
    };
    if headers.contains_key("stripe-account") {
        return forbidden("the relay chooses the stripe account");
    }
    // Stripe reads parameters from the query string of a POST too: only the body (which
    // the checks read) may carry them, and a retrieval may only expand number and cvc.
    if !query_allowed(&call, query.as_deref()) {
        return forbidden("the relay does not forward these query parameters");
    }
    let credential = match connect::issuing_credential(&state.db, &sidecar.org_id).await {
        Ok(c) => c,
        Err(ConnectError::Disconnected | ConnectError::NotConnected) => {
            return stripe_error(
                StatusCode::FORBIDDEN,
                "invalid_request_error",
                DISCONNECTED,
                "the organization's stripe account is disconnected; issuing is stopped",
            );
        }
        Err(e) => {
            tracing::error!(sidecar = %sidecar.id, code = e.code(), error = %e,
                "relay credential unavailable");
            return internal("the control plane cannot use its stripe credential");
        }
    };
    let forward = Forward {
        state: &state,
        credential: &credential,
        headers: &headers,
    };
    match call {
        Call::CreateCardholder => forward
            .send(&method, &path, query.as_deref(), body)
            .await
            .into_response_or_error(),
        Call::CreateCard => {
            if let Err(resp) = check_card(&state, &sidecar, &body).await {
                return resp;
            }
            forward
                .send(&method, &path, query.as_deref(), body)
                .await
                .into_response_or_error()
        }
        Call::RetrieveCard => {
            let answer = match forward.send(&method, &path, query.as_deref(), body).await {
                Ok(a) => a,
                Err(resp) => return resp,
            };
            if answer.status.is_success() && !owns(&state, &sidecar, &answer.body).await {
                return not_found();
            }
            answer.into_response()
        }
        Call::CancelCard(id) => {
            let form = String::from_utf8_lossy(&body).to_string();
            let allowed = crate::emulator::form::parse(&form).is_ok_and(|m| {
                m.len() == 1 && m.get("status").and_then(Value::as_str) == Some("canceled")
            });
            if !allowed {
                return forbidden("the relay only cancels cards");
            }
            let card = match forward
                .send(
                    &Method::GET,
                    &format!("issuing/cards/{id}"),
                    None,
                    Bytes::new(),
                )
                .await
            {
                Ok(a) => a,
                Err(resp) => return resp,
            };
            if !card.status.is_success() {
                return card.into_response();
            }
            if !owns(&state, &sidecar, &card.body).await {
                return not_found();
            }
            forward
                .send(&method, &path, query.as_deref(), body)
                .await
                .into_response_or_error()
        }
    }
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        let mut resp = (self.status, self.body).into_response();
        for name in [
            "content-type",
            "request-id",
            "idempotency-key",
            "idempotent-replayed",
            "original-request",
            "stripe-version",
        ] {
            if let Some(v) = self.headers.get(name) {
                resp.headers_mut().insert(name, v.clone());
            }
        }
        resp
    }
}

trait OrError {
    fn into_response_or_error(self) -> Response;
}

impl OrError for Result<Answer, Response> {
    fn into_response_or_error(self) -> Response {
        match self {
            Ok(a) => a.into_response(),
            Err(r) => r,
        }
    }
}

struct Forward<'a> {
    state: &'a AdminState,
    credential: &'a connect::IssuingCredential,
    headers: &'a HeaderMap,
}

impl Forward<'_> {
    async fn send(
        &self,
        method: &Method,
        path: &str,
        query: Option<&str>,
        body: Bytes,
    ) -> Result<Answer, Response> {
        let setup = self.state.db.stripe_setup();
        let mut url = format!("{}/v1/{path}", setup.api_base());
        if let Some(q) = query.filter(|q| !q.is_empty()) {
            url.push('?');
            url.push_str(q);
        }
        let reqwest_method = reqwest::Method::from_bytes(method.as_str().as_bytes())
            .map_err(|_| forbidden("unsupported method"))?;
        let mut req = setup
            .http
            .request(reqwest_method, url)
            .bearer_auth(&self.credential.api_key);
        if let Some(account) = &self.credential.account {
            req = req.header("stripe-account", account);
        }
        if *method == Method::POST {
            for name in ["idempotency-key", "stripe-version", "content-type"] {
                if let Some(v) = self.headers.get(name).and_then(|v| v.to_str().ok()) {
                    req = req.header(name, v);
                }
            }
            req = req.body(body);
        } else if let Some(v) = self
            .headers
            .get("stripe-version")
            .and_then(|v| v.to_str().ok())
        {
            req = req.header("stripe-version", v);
        }
        let resp = req.send().await.map_err(|e| {
            tracing::warn!(error = %e.without_url(), "relay could not reach stripe");
            stripe_error(
                StatusCode::BAD_GATEWAY,
                "api_error",
                "stripe_unreachable",
                "stripe could not be reached",
            )
        })?;
        let status = StatusCode::from_u16(resp.status().as_u16())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut headers = HeaderMap::new();
        for (name, value) in resp.headers() {
            if let (Ok(n), Ok(v)) = (
                axum::http::HeaderName::from_bytes(name.as_str().as_bytes()),
                HeaderValue::from_bytes(value.as_bytes()),
            ) {
                headers.insert(n, v);
            }
        }
        let body = resp.bytes().await.map_err(|_| {
            stripe_error(
                StatusCode::BAD_GATEWAY,
                "api_error",
                "stripe_unreachable",
                "stripe's answer could not be read",
            )
        })?;
        if status == StatusCode::UNAUTHORIZED {
            // The stored credential no longer works (e.g. revoked at Stripe): issuing stops.
            tracing::warn!("stripe refused the relay's credential");
            return Err(stripe_error(
                StatusCode::FORBIDDEN,
                "invalid_request_error",
                DISCONNECTED,
                "stripe refused the organization's credential; reconnect the stripe account",
            ));
        }
        Ok(Answer {
            status,
            headers,
            body,
        })
    }
}

/// The items of a form list (`a[0]=…` parsed as an index map or an array).
fn items(v: Option<&Value>) -> Vec<&Value> {
    match v {
        Some(Value::Array(a)) => a.iter().collect(),
        Some(Value::Object(o)) => o.values().collect(),
        _ => Vec::new(),
    }
}

fn metadata_of(v: &Map<String, Value>) -> Option<(&str, &str)> {
    let m = v.get("metadata")?.as_object()?;
    Some((
        m.get("roony_agent_id")?.as_str()?,
        m.get("roony_intent_id")?.as_str()?,
    ))
}

/// A card creation's checks: Roony metadata, the agent in this project and active, the
/// spending limit within the policy's per-transaction maximum plus its buffer.
async fn check_card(
    state: &AdminState,
    sidecar: &SidecarAuth,
    body: &Bytes,
) -> Result<(), Response> {
    let form = std::str::from_utf8(body).map_err(|_| invalid("the body is not a form"))?;
    let params =
        crate::emulator::form::parse(form).map_err(|_| invalid("the body is not a form"))?;
    let Some((agent_id, intent_id)) = metadata_of(&params) else {
        return Err(invalid(
            "a card needs roony_agent_id and roony_intent_id metadata",
        ));
    };
    if intent_id.is_empty() {
        return Err(invalid("roony_intent_id is empty"));
    }
    let agent = match state.db.get_agent(agent_id).await {
        Ok(a) => a,
        Err(super::db::DbError::NotFound(_)) => return Err(forbidden("unknown agent")),
        Err(e) => {
            tracing::error!(error = %e, "relay: agent lookup failed");
            return Err(internal("the agent could not be checked"));
        }
    };
    if agent.project_id != sidecar.project_id {
        return Err(forbidden("the agent is not in this sidecar's project"));
    }
    if agent.status != "active" {
        return Err(forbidden("the agent is frozen"));
    }
    let policy = match state.db.get_policy(agent_id).await {
        Ok(p) => Some(p.document),
        Err(super::db::DbError::NotFound(_)) => None,
        Err(e) => {
            tracing::error!(error = %e, "relay: policy lookup failed");
            return Err(internal("the policy could not be checked"));
        }
    };
    let Some(policy) = policy else {
        return Err(forbidden("the agent has no policy"));
    };
    // The card's currency is the policy's.
    let card_currency = params
        .get("currency")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let policy_currency = policy
        .get("currency")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if card_currency.is_empty() || !card_currency.eq_ignore_ascii_case(policy_currency) {
        return Err(forbidden(
            "the card's currency is not the agent's policy currency",
        ));
    }
    let allowed = ceiling(&policy).ok_or_else(|| {
        forbidden("the agent's policy sets no per-transaction maximum or budget to check the card against")
    })?;
    // Every limit counts (Stripe applies each one): each must parse, apply to all
    // categories, and stay within the ceiling.
    let limits = params
        .get("spending_controls")
        .and_then(Value::as_object)
        .map(|c| items(c.get("spending_limits")))
        .unwrap_or_default();
    if limits.is_empty() {
        return Err(invalid("a card needs a spending limit"));
    }
    for l in limits {
        let amount = l.get("amount").and_then(|a| {
            a.as_i64()
                .or_else(|| a.as_str().and_then(|s| s.parse::<i64>().ok()))
        });
        let Some(amount) = amount.filter(|a| *a >= 0) else {
            return Err(invalid(
                "a spending limit's amount is not a whole number of minor units",
            ));
        };
        if l.get("categories").is_some() {
            return Err(forbidden(
                "the relay does not forward per-category spending limits",
            ));
        }
        if amount > allowed {
            tracing::warn!(sidecar = %sidecar.id, agent = %agent_id, amount, allowed,
                "relay refused a card above the agent's policy");
            return Err(forbidden(
                "the spending limit is above the agent's per-transaction maximum",
            ));
        }
    }
    Ok(())
}

/// The largest card the policy allows: its per-transaction maximum, else its smallest
/// budget, plus the card buffer. `None` when the policy bounds neither (the relay then
/// refuses: deny by default).
fn ceiling(policy: &Value) -> Option<i64> {
    let base = policy
        .get("max_per_transaction")
        .and_then(Value::as_i64)
        .or_else(|| {
            policy
                .get("budgets")
                .and_then(Value::as_array)?
                .iter()
                .filter_map(|b| b.get("limit").and_then(Value::as_i64))
                .min()
        })?;
    let bps = policy
        .get("card_buffer_bps")
        .and_then(Value::as_i64)
        .unwrap_or(DEFAULT_BUFFER_BPS);
    Some(base.saturating_add(base.saturating_mul(bps) / 10_000))
}

/// Whether a card (Stripe's JSON) was issued for an agent of the sidecar's project.
async fn owns(state: &AdminState, sidecar: &SidecarAuth, body: &Bytes) -> bool {
    let Ok(card) = serde_json::from_slice::<Value>(body) else {
        return false;
    };
    let Some(agent_id) = card
        .get("metadata")
        .and_then(|m| m.get("roony_agent_id"))
        .and_then(Value::as_str)
    else {
        return false;
    };
    matches!(state.db.get_agent(agent_id).await, Ok(a) if a.project_id == sidecar.project_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_calls() {
        assert!(matches!(
            classify(&Method::POST, "issuing/cards"),
            Some(Call::CreateCard)
        ));
        assert!(matches!(
            classify(&Method::GET, "issuing/cards/ic_123"),
            Some(Call::RetrieveCard)
        ));
        assert!(matches!(
            classify(&Method::POST, "issuing/cards/ic_123"),
            Some(Call::CancelCard("ic_123"))
        ));
        assert!(classify(&Method::GET, "issuing/cards").is_none());
        assert!(classify(&Method::DELETE, "issuing/cards/ic_1").is_none());
        assert!(classify(&Method::POST, "accounts").is_none());
        assert!(classify(&Method::GET, "issuing/cards/../accounts").is_none());
        assert!(classify(&Method::POST, "test_helpers/issuing/authorizations").is_none());
    }

    #[test]
    fn query_strings() {
        let create = Call::CreateCard;
        let cancel = Call::CancelCard("ic_1");
        let get = Call::RetrieveCard;
        assert!(query_allowed(&create, None));
        assert!(query_allowed(&create, Some("")));
        // A POST's query would bypass the body checks (Stripe merges it in).
        assert!(!query_allowed(
            &create,
            Some("spending_controls[spending_limits][0][amount]=1")
        ));
        assert!(!query_allowed(&cancel, Some("status=active")));
        assert!(query_allowed(
            &get,
            Some("expand%5B0%5D=number&expand%5B1%5D=cvc")
        ));
        assert!(query_allowed(&get, Some("expand[]=number&expand[]=cvc")));
        assert!(!query_allowed(&get, Some("expand[0]=cardholder")));
        assert!(!query_allowed(&get, Some("expand[0]=number&status=active")));
    }

    #[test]
    fn ceilings() {
        let p = serde_json::json!({"currency": "USD", "max_per_transaction": 10_000});
        assert_eq!(ceiling(&p), Some(10_100));
        let p = serde_json::json!({"currency": "USD", "card_buffer_bps": 0,
            "budgets": [{"period": "daily", "limit": 25_000}, {"period": "monthly", "limit": 90_000}]});
        assert_eq!(ceiling(&p), Some(25_000));
        // Nothing bounds the card: refused (deny by default).
        assert_eq!(ceiling(&serde_json::json!({"currency": "USD"})), None);
    }
}
