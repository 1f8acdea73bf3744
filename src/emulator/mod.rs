//! A stateful local emulator of the part of Stripe's API Roony uses (Issuing cards and
//! cardholders), so the real async-stripe client can run against it over HTTP with no
//! Stripe account or network.
//!
//! - Stripe endpoints live under `/v1/…` (form-encoded requests, JSON responses,
//!   Stripe's error objects, `Idempotency-Key`, `Stripe-Account` scoping).
//! - Issuing authorizations and transactions with the `/v1/test_helpers/issuing/…`
//!   endpoints, an authorization engine (card status, spending controls, a real-time
//!   webhook) and signed webhook events (`webhooks.rs`).
//! - A control API for tests lives under `/_emulator/…` (faults, stats, reset,
//!   webhooks, events).
//!
//! State is in memory only; card numbers and CVCs are never logged or written to disk.
//! See `docs/emulator.md`.

mod base64;
pub mod catalog;
mod control;
pub mod error;
pub mod faults;
pub mod form;
pub mod idempotency;
pub mod ids;
pub mod oauth;
pub mod pan;
pub mod params;
pub mod resources;
pub mod state;
pub mod webhooks;

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use serde_json::{Map, Value};

use error::{ApiError, ErrorType};
use faults::FaultState;
use idempotency::{Begin, Fingerprint, Saved};
use resources::Route;
use state::{AccountKey, Outcome};

/// Largest request body accepted.
const MAX_BODY_BYTES: usize = 1024 * 1024;

#[derive(Clone, Debug, Default)]
pub struct FaultConfig {
    /// probability in [0,1] that a /v1 request is answered 429 rate_limit (before execution; not saved under idempotency keys)
    pub rate_429: f64,
    /// probability in [0,1] that a /v1 request is answered 500 api_error (before execution; not saved)
    pub rate_500: f64,
    /// latency added to every /v1 request
    pub latency: std::time::Duration,
}

#[derive(Clone, Debug, Default)]
pub struct EmulatorConfig {
    pub faults: FaultConfig,
    /// Webhook endpoint at start-up (`None`: no events are sent and authorizations
    /// that pass the checks are approved). Replaceable at run time through
    /// `POST /_emulator/webhooks`; `POST /_emulator/reset` restores this one.
    pub webhook: Option<webhooks::WebhookConfig>,
}

/// The emulator: cheap to clone (shared state).
#[derive(Clone)]
pub struct Emulator {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Emulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emulator").finish_non_exhaustive()
    }
}

struct Inner {
    config: EmulatorConfig,
    state: Mutex<state::State>,
    /// Sends webhooks.
    http: reqwest::Client,
    /// Queue of the delivery task (started on first use).
    delivery: Mutex<Option<tokio::sync::mpsc::UnboundedSender<String>>>,
    /// Connect OAuth: codes, connections, tokens (`oauth.rs`).
    oauth: Mutex<oauth::OAuthState>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, state::State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn fresh_state(config: &EmulatorConfig) -> state::State {
        state::State::with_webhook(
            FaultState::from_config(&config.faults),
            config.webhook.clone(),
        )
    }

    fn reset(&self) {
        *self.lock() = Self::fresh_state(&self.config);
        *self.oauth() = oauth::OAuthState::default();
    }

    fn oauth(&self) -> MutexGuard<'_, oauth::OAuthState> {
        self.oauth.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Emulator {
    pub fn new(config: EmulatorConfig) -> Self {
        let state = Inner::fresh_state(&config);
        Self {
            inner: Arc::new(Inner {
                config,
                state: Mutex::new(state),
                http: reqwest::Client::builder()
                    .no_proxy()
                    .build()
                    .unwrap_or_default(),
                delivery: Mutex::new(None),
                oauth: Mutex::new(oauth::OAuthState::default()),
            }),
        }
    }

    /// Replace the webhook endpoint (`None` stops sending events).
    pub fn set_webhook(&self, webhook: Option<webhooks::WebhookConfig>) {
        self.inner.lock().webhook = webhook;
    }

    /// Every event so far, oldest first, as `GET /_emulator/events` shows them.
    pub fn events(&self) -> Vec<webhooks::EventRecord> {
        self.inner.lock().events.clone()
    }

    /// All routes (`/v1/…` and `/_emulator/…`) as one axum router.
    pub fn router(&self) -> axum::Router {
        axum::Router::new()
            .fallback(handle)
            .with_state(self.inner.clone())
    }

    /// Serve until `shutdown` resolves.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await
    }
}

async fn handle(
    axum::extract::State(inner): axum::extract::State<Arc<Inner>>,
    req: Request,
) -> Response {
    let request_id = ids::request_id();
    let path = req.uri().path();
    let mut response = if path == "/_emulator" || path.starts_with("/_emulator/") {
        control::handle(&inner, req).await
    } else if path.starts_with("/oauth/") {
        oauth::handle(&inner, req).await
    } else {
        api(&inner, req, &request_id).await
    };
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("request-id", v);
    }
    response
}

/// A request that passed every check before execution.
struct Ready {
    route: Route,
    account: AccountKey,
    params: Map<String, Value>,
    reservation: Option<Reservation>,
}

/// A request answered before execution.
enum Early {
    Error(ApiError, Outcome),
    Replay(Saved),
}

/// An idempotency key reserved for an executing request. Released on drop unless
/// completed, so a client that goes away mid-request does not block the key.
struct Reservation {
    inner: Arc<Inner>,
    account: AccountKey,
    key: String,
    token: u64,
    settled: bool,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.settled {
            self.inner
                .lock()
                .idempotency
                .release(&self.account, &self.key, self.token);
        }
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

async fn api(inner: &Arc<Inner>, req: Request, request_id: &str) -> Response {
    let (parts, body) = req.into_parts();
    let method = parts.method;
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().unwrap_or("").to_owned();
    let headers = parts.headers;
    let recognized = Route::recognize(&method, &path);
    let template = recognized.as_ref().map(|(_, t)| *t);
    let stat_key = template.map(|t| (method.as_str(), t));
    let idempotency_key = if method == Method::POST {
        header(&headers, "idempotency-key").map(str::to_owned)
    } else {
        None
    };

    let latency = {
        let mut st = inner.lock();
        if let Some(v) = header(&headers, "stripe-version") {
            st.stats.record_version(v);
        }
        st.faults.latency
    };

    let prepared = prepare(
        inner,
        &headers,
        &method,
        &path,
        &query,
        body,
        recognized.map(|(r, _)| r),
        idempotency_key.as_deref(),
    )
    .await;

    // Latency applies to every /v1 request; for executing requests it falls inside
    // the idempotency reservation, so a concurrent same-key request sees a 409.
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }

    let (status, body, outcome, replay_of) = match prepared {
        Err(Early::Error(e, outcome)) => (e.status, to_body(&e.body()), outcome, None),
        Err(Early::Replay(saved)) => (
            saved.status,
            saved.body,
            Outcome::Replayed,
            Some(saved.request_id),
        ),
        Ok(ready) => execute(inner, ready, request_id, idempotency_key.as_deref()).await,
    };

    inner.lock().stats.record(stat_key, outcome);
    tracing::debug!(
        request_id,
        method = %method,
        route = template.unwrap_or("unrecognized"),
        status = status.as_u16(),
        replayed = replay_of.is_some(),
        "stripe emulator request"
    );

    let mut response = json_response(status, body);
    let h = response.headers_mut();
    if let Some(key) = idempotency_key
        .as_deref()
        .and_then(|k| HeaderValue::from_str(k).ok())
    {
        h.insert("idempotency-key", key);
    }
    if let Some(v) = header(&headers, "stripe-version").and_then(|v| HeaderValue::from_str(v).ok())
    {
        h.insert("stripe-version", v);
    }
    if let Some(original) = replay_of.and_then(|r| HeaderValue::from_str(&r).ok()) {
        h.insert("idempotent-replayed", HeaderValue::from_static("true"));
        h.insert("original-request", original);
    }
    response
}

#[allow(clippy::too_many_arguments)]
async fn prepare(
    inner: &Arc<Inner>,
    headers: &HeaderMap,
    method: &Method,
    path: &str,
    query: &str,
    body: Body,
    route: Option<Route>,
    idempotency_key: Option<&str>,
) -> Result<Ready, Early> {
    let reject = |e: ApiError| Early::Error(e, Outcome::Rejected);
    authenticate(headers).map_err(reject)?;
    // A Connect OAuth access token (Bearer or Basic user) acts on its connected account
    // (refused once revoked).
    let token_account = api_key(headers).and_then(|key| inner.oauth().account_of_token(&key));
    let account = match token_account {
        Some(Ok(acct)) => {
            let named = account_of(headers).map_err(reject)?;
            if named != AccountKey::Platform && named != AccountKey::Connected(acct.clone()) {
                return Err(reject(
                    ApiError::new(
                        StatusCode::FORBIDDEN,
                        ErrorType::InvalidRequestError,
                        "The provided key does not have access to the account in Stripe-Account.",
                    )
                    .with_code("account_invalid"),
                ));
            }
            AccountKey::Connected(acct)
        }
        Some(Err(e)) => return Err(reject(e)),
        None => account_of(headers).map_err(reject)?,
    };

    let fault = inner.lock().faults.draw(method.as_str(), path);
    if let Some(status) = fault {
        return Err(Early::Error(faults::fault_error(status), Outcome::Faulted));
    }

    let Some(route) = route else {
        return Err(reject(ApiError::unrecognized_url(method.as_str(), path)));
    };

    let bytes = axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|_| {
            reject(ApiError::invalid(format!(
                "The request body could not be read or is larger than {MAX_BODY_BYTES} bytes."
            )))
        })?;
    let parse = |raw: &str| {
        form::parse(raw).map_err(|e| {
            let err = ApiError::invalid(format!("Invalid request: {e}."));
            reject(match e.param() {
                Some(p) => err.with_param(p),
                None => err,
            })
        })
    };
    // Query parameters count on every method; for POST the body's top-level keys
    // win over the query's (Rack merges them the same way).
    let mut params = parse(query)?;
    if *method != Method::GET {
        let text = std::str::from_utf8(&bytes).map_err(|_| {
            reject(ApiError::invalid(
                "Invalid request body: expected application/x-www-form-urlencoded UTF-8 text.",
            ))
        })?;
        params.extend(parse(text)?);
    }

    let reservation = match idempotency_key {
        None => None,
        Some(key) if key.chars().count() > idempotency::MAX_KEY_LEN => {
            return Err(reject(
                ApiError::invalid(format!(
                    "Idempotency-Key must be at most {} characters long.",
                    idempotency::MAX_KEY_LEN
                ))
                .with_param("Idempotency-Key"),
            ));
        }
        Some(key) => {
            let fingerprint = Fingerprint {
                method: method.as_str().to_owned(),
                path: path.to_owned(),
                params: form::canonical(&Value::Object(params.clone())),
            };
            let begun = inner
                .lock()
                .idempotency
                .begin(&account, key, fingerprint, ids::now_unix());
            match begun {
                Begin::Reserved(token) => Some(Reservation {
                    inner: inner.clone(),
                    account: account.clone(),
                    key: key.to_owned(),
                    token,
                    settled: false,
                }),
                Begin::Replay(saved) => return Err(Early::Replay(saved)),
                Begin::Refused(e) => return Err(reject(e)),
            }
        }
    };

    Ok(Ready {
        route,
        account,
        params,
        reservation,
    })
}

async fn execute(
    inner: &Arc<Inner>,
    ready: Ready,
    request_id: &str,
    idempotency_key: Option<&str>,
) -> (StatusCode, Bytes, Outcome, Option<String>) {
    let Ready {
        route,
        account,
        params,
        mut reservation,
    } = ready;
    let now = ids::now_unix();
    let request = state::RequestInfo {
        id: Some(request_id.to_owned()),
        idempotency_key: idempotency_key.map(str::to_owned),
    };
    let first = {
        let mut st = inner.lock();
        st.request = request.clone();
        let r = route.execute(&mut st, &account, params, now);
        let queued = std::mem::take(&mut st.outbox);
        drop(st);
        webhooks::dispatch(inner, queued);
        r
    };
    let result = match first {
        Ok(resources::Exec::Done(v)) => Ok(v),
        Err(e) => Err(e),
        Ok(resources::Exec::Realtime(pending)) => {
            // The real-time webhook is asked without holding the state lock.
            let decision = webhooks::realtime_request(
                inner,
                &pending.webhook,
                &pending.event_id,
                pending.body.clone(),
                pending.amount_controllable,
            )
            .await;
            let mut st = inner.lock();
            st.request = request;
            let r = resources::authorization::finish(&mut st, *pending, decision, ids::now_unix());
            let queued = std::mem::take(&mut st.outbox);
            drop(st);
            webhooks::dispatch(inner, queued);
            r
        }
    };
    let mut st = inner.lock();
    let (status, body, outcome) = match result {
        Ok(value) => (StatusCode::OK, to_body(&value), Outcome::Executed),
        Err(e) => (e.status, to_body(&e.body()), Outcome::Failed),
    };
    if let Some(r) = reservation.as_mut() {
        if outcome == Outcome::Executed {
            let saved = Saved {
                status,
                body: body.clone(),
                request_id: request_id.to_owned(),
            };
            st.idempotency
                .complete(&account, &r.key, r.token, saved, now);
        } else {
            // Validation failures are not saved: the key stays usable.
            st.idempotency.release(&account, &r.key, r.token);
        }
        r.settled = true;
    }
    drop(st);
    (status, body, outcome, None)
}

fn to_body(value: &Value) -> Bytes {
    // Serialising a `Value` cannot fail; fall back to an empty object regardless.
    serde_json::to_vec_pretty(value)
        .map(Bytes::from)
        .unwrap_or_else(|_| Bytes::from_static(b"{}"))
}

fn json_response(status: StatusCode, body: Bytes) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// The API key of a request: `Authorization: Bearer <key>`, or Basic auth with the key as
/// the user name (Stripe's documented form).
fn api_key(headers: &HeaderMap) -> Option<String> {
    let raw = headers.get(AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, credentials) = raw.split_once(' ').unwrap_or((raw, ""));
    let credentials = credentials.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        Some(credentials.to_owned())
    } else if scheme.eq_ignore_ascii_case("basic") {
        base64::decode(credentials)
            .and_then(|b| String::from_utf8(b).ok())
            .map(|s| {
                s.split_once(':')
                    .map(|(user, _)| user.to_owned())
                    .unwrap_or(s)
            })
    } else {
        None
    }
}

/// Redact an API key for messages: `sk_test_****1234`.
fn redact_key(key: &str) -> String {
    let prefix: String = key.chars().take(8).collect();
    let tail: String = key
        .chars()
        .rev()
        .take(4)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    format!("{prefix}****{tail}")
}

/// Accept `Bearer sk_test_…`/`rk_test_…` or Basic auth with the key as user name.
fn authenticate(headers: &HeaderMap) -> Result<(), ApiError> {
    let unauthorized = |msg: String| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorType::InvalidRequestError,
            msg,
        )
    };
    if !headers.contains_key(AUTHORIZATION) {
        return Err(unauthorized(
            "Please authenticate by specifying an `Authorization` header with any valid looking testmode secret API key. For example, `Authorization: Bearer sk_test_123`.".into(),
        ));
    }
    let key = api_key(headers).unwrap_or_default();
    let valid = |prefix: &str| {
        key.strip_prefix(prefix).is_some_and(|rest| {
            !rest.is_empty() && rest.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
    };
    if valid("sk_test_") || valid("rk_test_") {
        return Ok(());
    }
    if key.starts_with("sk_live_") || key.starts_with("rk_live_") {
        return Err(unauthorized(format!(
            "Invalid API Key provided: {}. The Stripe emulator only accepts test mode keys (sk_test_… or rk_test_…).",
            redact_key(&key)
        )));
    }
    if key.is_empty() {
        return Err(unauthorized(
            "You did not provide an API key. You need to provide your API key in the Authorization header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY'). See https://stripe.com/docs/api#authentication for details, or we can help at https://support.stripe.com/.".into(),
        ));
    }
    Err(unauthorized(format!(
        "Invalid API Key provided: {}",
        redact_key(&key)
    )))
}

/// `Stripe-Account: acct_…` selects a connected account; absent means the platform.
fn account_of(headers: &HeaderMap) -> Result<AccountKey, ApiError> {
    let Some(value) = headers.get("stripe-account") else {
        return Ok(AccountKey::Platform);
    };
    let value = value.to_str().unwrap_or("").trim();
    if value.is_empty() {
        return Ok(AccountKey::Platform);
    }
    let well_formed = value.strip_prefix("acct_").is_some_and(|rest| {
        !rest.is_empty() && rest.len() <= 64 && rest.chars().all(|c| c.is_ascii_alphanumeric())
    });
    if well_formed {
        Ok(AccountKey::Connected(value.to_owned()))
    } else {
        let shown: String = value.chars().take(64).collect();
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorType::InvalidRequestError,
            format!(
                "The provided key does not have access to account '{shown}' (or that account does not exist). Application access may have been revoked."
            ),
        )
        .with_code("account_invalid"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).expect("header"));
        }
        h
    }

    #[test]
    fn auth_variants() {
        assert!(authenticate(&headers(&[("authorization", "Bearer sk_test_123")])).is_ok());
        assert!(authenticate(&headers(&[("authorization", "bearer rk_test_abc")])).is_ok());
        // Basic base64("sk_test_123:")
        assert!(authenticate(&headers(&[("authorization", "Basic c2tfdGVzdF8xMjM6")])).is_ok());
        let e = authenticate(&HeaderMap::new()).expect_err("missing");
        assert_eq!(e.status, StatusCode::UNAUTHORIZED);
        assert!(e.message.contains("sk_test_123"));
        let e = authenticate(&headers(&[("authorization", "Bearer sk_live_123456")]))
            .expect_err("live");
        assert_eq!(e.status, StatusCode::UNAUTHORIZED);
        assert!(!e.message.contains("sk_live_123456"));
        assert!(authenticate(&headers(&[("authorization", "Bearer pk_test_1")])).is_err());
        assert!(authenticate(&headers(&[("authorization", "Bearer sk_test_")])).is_err());
        assert!(authenticate(&headers(&[("authorization", "Bearer")])).is_err());
    }

    #[test]
    fn account_header() {
        assert_eq!(
            account_of(&HeaderMap::new()).ok(),
            Some(AccountKey::Platform)
        );
        assert_eq!(
            account_of(&headers(&[("stripe-account", "acct_123")])).ok(),
            Some(AccountKey::Connected("acct_123".into()))
        );
        let e = account_of(&headers(&[("stripe-account", "bogus")])).expect_err("bad");
        assert_eq!(e.status, StatusCode::FORBIDDEN);
    }
}
