//! The issuing relay: `/api/sync/v1/stripe/v1/…`. A synced sidecar without a Stripe key of
//! its own points its async-stripe issuer at `{control plane}/api/sync/v1/stripe/` with its
//! sidecar token as the API key; the relay authenticates the token, allows only the Stripe
//! Issuing calls the issuer makes, checks them against what the control plane knows, and
//! forwards them to Stripe with the organization's credential (the connected account's
//! access token, or the direct mode's key), which never leaves the control plane.
//!
//! Allowed, each with exactly the parameters Roony's issuer sends (anything else is
//! `403 relay_forbidden`):
//!
//! - `POST issuing/cardholders`: `name`, `type=individual`, `individual[first_name|last_name]`,
//!   `billing[address][…]`, `metadata[roony_agent_id]` naming an active agent of the
//!   sidecar's project.
//! - `POST issuing/cards`: a `virtual`, `active` card with one `all_time` spending limit,
//!   `lifecycle_controls[cancel_after][payment_count]=1`, category and country controls at
//!   least as strict as the agent's policy, Roony's metadata (consistent with the limit and
//!   currency; a `roony_sig` must verify with the sidecar's token; a `roony_expires` within
//!   the policy's card lifetime, after which the card's authorizations are declined and
//!   [`sweep_expired`] cancels it). The limit is at most the
//!   policy's per-transaction maximum (or smallest budget) plus its card buffer; above the
//!   approval threshold the intent must be one an administrator approved; one card per
//!   intent (an idempotent retry with the same `Idempotency-Key` passes); and every budget of
//!   the agent (policy, agent budgets, the project's and organization's shared budgets) bounds
//!   the agent's relay cards of the current period (see [`judge`]).
//! - `GET issuing/cards/{id}` (`expand[]=number|cvc` only) and `POST issuing/cards/{id}`
//!   with `status=canceled` only, for cards of the sidecar's project.
//!
//! Checked parameters are re-encoded into a fresh form body; `Content-Type` is forced and
//! `Stripe-Version` is pinned to this build's. Errors are Stripe-shaped, so the issuer
//! classifies them like Stripe's; a disconnected organization is
//! `403 stripe_account_disconnected` (not retried).
//!
//! Bodies are never logged; card numbers pass through in memory only.

// Helpers answer their error as the HTTP response itself.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::api::AdminState;
use super::connect::{self, ConnectError};
use super::db::{
    Actor, ControlDb, RelayBound, RelayCardClaim, RelayClaim, RelayFacts, RelayScope, RelayVerdict,
    SidecarAuth,
};
use crate::domain::money::Currency;
use crate::domain::time::Period;
use crate::policy::{CompiledPolicy, ListRule, Policy};

/// Where the relay is mounted; the issuer's base URL is `{control plane}{BASE}/`.
pub const BASE: &str = "/api/sync/v1/stripe";
/// The route (async-stripe appends `v1/…` to its base URL).
pub const ROUTE: &str = "/api/sync/v1/stripe/v1/{*path}";
/// The Stripe error code of an organization without a usable Stripe connection.
pub const DISCONNECTED: &str = "stripe_account_disconnected";
/// Longest `Idempotency-Key` (Stripe's limit).
const MAX_IDEMPOTENCY_KEY: usize = 255;
/// Most entries of a card's category or country list.
const MAX_LIST: usize = 1_000;
/// How far the sidecar's clock may run ahead of the control plane's, for `roony_expires`.
const CLOCK_SKEW_SECONDS: i64 = 300;
/// How long after its claim a card creation may be retried with its idempotency key
/// (Stripe forgets keys after 24 hours; a later replay would make a second card).
const RETRY_WINDOW_SECONDS: i64 = 23 * 3_600;
/// Longest metadata value (Stripe's limit).
const MAX_METADATA_VALUE: usize = 500;
/// The metadata keys Roony's issuer sets on a card.
const CARD_METADATA: &[&str] = &[
    "roony_intent_id",
    "roony_agent_id",
    "roony_limit",
    "roony_currency",
    "roony_merchant",
    "roony_domain",
    "roony_country",
    "roony_category",
    "roony_expires",
    crate::sync::wire::CARD_SIDECAR_KEY,
    crate::sync::wire::CARD_SIGNATURE_KEY,
];

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

fn disconnected(message: &str) -> Response {
    stripe_error(
        StatusCode::FORBIDDEN,
        "invalid_request_error",
        DISCONNECTED,
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

/// The request's `Idempotency-Key`: `Ok(None)` when absent, refused when unusable.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, Response> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    match v.to_str() {
        Ok(k)
            if !k.is_empty()
                && k.len() <= MAX_IDEMPOTENCY_KEY
                && k.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            Ok(Some(k.to_string()))
        }
        _ => Err(forbidden(
            "the idempotency-key must be 1 to 255 visible ascii characters",
        )),
    }
}

fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
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
    let (sidecar, token) = match super::sync::authenticate(&state, &headers).await {
        Ok(s) => s,
        Err(_) => {
            return stripe_error(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "invalid_sidecar_token",
                "the sidecar token is missing or not valid",
            );
        }
    };
    let token_id = crate::auth::key_id(token);
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
    let version = crate::issuer::stripe_api_version();
    if let Some(v) = headers.get("stripe-version")
        && v.to_str().ok() != Some(version)
    {
        return forbidden(&format!(
            "the relay speaks stripe api version {version} only"
        ));
    }
    let key = match idempotency_key(&headers) {
        Ok(k) => k,
        Err(resp) => return resp,
    };
    let credential = match connect::issuing_credential(&state.db, &sidecar.org_id).await {
        Ok(c) => c,
        Err(ConnectError::Disconnected | ConnectError::NotConnected) => {
            return disconnected(
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
        db: &state.db,
        credential: &credential,
        org_id: &sidecar.org_id,
        idempotency_key: key.as_deref(),
    };
    match call {
        Call::CreateCardholder => {
            let form = match check_cardholder(&state, &sidecar, &body).await {
                Ok(f) => f,
                Err(resp) => return resp,
            };
            if key.is_none() {
                return forbidden("a cardholder creation needs an idempotency-key");
            }
            forward
                .send(&Method::POST, &path, None, Some(form))
                .await
                .map_or_else(|f| f.response, IntoResponse::into_response)
        }
        Call::CreateCard => {
            // Claim, Stripe and record run to their end even if the sidecar hangs up
            // meanwhile: a dropped request would leave a claim without its card.
            let job = tokio::spawn(create_card(CardJob {
                state: state.clone(),
                sidecar,
                token_id,
                credential,
                idempotency_key: key,
                path,
                body,
            }));
            job.await.unwrap_or_else(|e| {
                tracing::error!(error = %e, "relay: the card creation task failed");
                internal("the card could not be created")
            })
        }
        Call::RetrieveCard => {
            let answer = match forward.send(&method, &path, query.as_deref(), None).await {
                Ok(a) => a,
                Err(f) => return f.response,
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
                .send(&Method::GET, &format!("issuing/cards/{id}"), None, None)
                .await
            {
                Ok(a) => a,
                Err(f) => return f.response,
            };
            if !card.status.is_success() {
                return card.into_response();
            }
            if !owns(&state, &sidecar, &card.body).await {
                return not_found();
            }
            let answer = match forward
                .send(&method, &path, None, Some("status=canceled".into()))
                .await
            {
                Ok(a) => a,
                Err(f) => return f.response,
            };
            if answer.status.is_success()
                && let Err(e) = state.db.relay_card_canceled(id, super::unix_now()).await
            {
                tracing::error!(card = %id, error = %e, "relay: could not mark the card canceled");
            }
            answer.into_response()
        }
    }
}

/// What a card creation owns (it runs in its own task).
struct CardJob {
    state: AdminState,
    sidecar: SidecarAuth,
    token_id: String,
    credential: connect::IssuingCredential,
    idempotency_key: Option<String>,
    path: String,
    body: Bytes,
}

/// A card creation: checked, claimed (one card per intent, budgets), forwarded, recorded.
async fn create_card(job: CardJob) -> Response {
    let CardJob {
        state,
        sidecar,
        token_id,
        credential,
        idempotency_key,
        path,
        body,
    } = job;
    let (state, sidecar, path) = (&state, &sidecar, path.as_str());
    let forward = &Forward {
        db: &state.db,
        credential: &credential,
        org_id: &sidecar.org_id,
        idempotency_key: idempotency_key.as_deref(),
    };
    let checked = match check_card(state, sidecar, &token_id, &body).await {
        Ok(c) => c,
        Err(resp) => return resp,
    };
    // The issuer always sends one; a retry is recognized by it.
    let Some(key) = forward.idempotency_key else {
        return forbidden("a card creation needs an idempotency-key");
    };
    let now = super::unix_now();
    let claim = RelayCardClaim {
        intent_id: checked.intent_id.clone(),
        agent_id: checked.agent_id.clone(),
        project_id: sidecar.project_id.clone(),
        org_id: sidecar.org_id.clone(),
        sidecar_id: sidecar.id.clone(),
        currency: checked.currency.code().to_string(),
        spending_limit: checked.limit,
        idempotency_key_hash: sha256_hex(key),
        expires_at: checked.expires_at,
        policy_revision: checked.policy_revision,
        bounds: checked.bounds.clone(),
    };
    let actor = Actor {
        kind: "sidecar",
        id: sidecar.id.clone(),
        name: "sidecar".into(),
        request_id: None,
    };
    let claimed = state
        .db
        .claim_relay_card(
            &claim,
            |facts| judge(&checked, &claim, facts, now),
            &actor,
            now,
        )
        .await;
    let created = match claimed {
        Ok(RelayClaim::Created) => true,
        Ok(RelayClaim::Retry) => false,
        Ok(RelayClaim::Refused(message)) => {
            tracing::warn!(sidecar = %sidecar.id, agent = %checked.agent_id,
                intent = %checked.intent_id, limit = checked.limit, reason = %message,
                "relay refused a card");
            return forbidden(&message);
        }
        Err(e) => {
            tracing::error!(error = %e, "relay: the card could not be claimed");
            return internal("the card could not be checked");
        }
    };
    let answer = match forward
        .send(&Method::POST, path, None, Some(checked.form.clone()))
        .await
    {
        Ok(a) => a,
        Err(f) => {
            // Only the claim this request made is released: a retry's failure leaves the
            // first request's claim alone.
            if created && !f.card_may_exist {
                release(state, &claim).await;
            }
            return f.response;
        }
    };
    if !answer.status.is_success() {
        // A refusal Stripe decided (a 4xx but a conflict, which may be another request
        // with the key in flight; a rate limit is decided before anything is made) made
        // no card.
        let status = answer.status.as_u16();
        if created && (400..500).contains(&status) && status != 409 {
            release(state, &claim).await;
        }
        return answer.into_response();
    }
    let card: Value = serde_json::from_slice(&answer.body).unwrap_or_default();
    let Some(card_id) = card
        .get("id")
        .and_then(Value::as_str)
        .filter(|id| is_id(id, "ic_"))
    else {
        tracing::error!("relay: stripe's card answer has no card id");
        return internal("stripe's answer could not be read");
    };
    let canceled = card.get("status").and_then(Value::as_str) == Some("canceled");
    if let Err(e) = state
        .db
        .relay_card_created(&claim.intent_id, card_id, canceled, now)
        .await
    {
        // Untracked cards are not handed out: cancel it (a retry replays it canceled).
        tracing::error!(card = %card_id, error = %e, "relay: could not record the card; canceling it");
        let _ = forward.cancel(card_id).await;
        return internal("the card could not be recorded");
    }
    if created
        && !matches!(
            connect::still_connected(&state.db, &sidecar.org_id, forward.credential).await,
            Ok(true)
        )
    {
        // Disconnected (or reconnected: another connection) while the card was being made:
        // it must not outlive the connection it was made with.
        tracing::warn!(card = %card_id, "relay: the account was disconnected meanwhile; canceling the card");
        if forward.cancel(card_id).await
            && let Err(e) = state.db.relay_card_canceled(card_id, now).await
        {
            tracing::error!(card = %card_id, error = %e, "relay: could not mark the card canceled");
        }
        return disconnected(
            "the organization's stripe account was disconnected; issuing is stopped",
        );
    }
    answer.into_response()
}

async fn release(state: &AdminState, claim: &RelayCardClaim) {
    if let Err(e) = state
        .db
        .relay_card_released(&claim.intent_id, &claim.idempotency_key_hash)
        .await
    {
        tracing::error!(intent = %claim.intent_id, error = %e, "relay: could not release a card claim");
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

/// A forwarded request that got no usable answer.
struct Failure {
    response: Response,
    /// Stripe may have executed it (no answer came), so a card may exist.
    card_may_exist: bool,
}

struct Forward<'a> {
    db: &'a ControlDb,
    credential: &'a connect::IssuingCredential,
    org_id: &'a str,
    idempotency_key: Option<&'a str>,
}

impl Forward<'_> {
    /// Sends a request to Stripe: `form` is the (re-encoded) body of a `POST`.
    async fn send(
        &self,
        method: &Method,
        path: &str,
        query: Option<&str>,
        form: Option<String>,
    ) -> Result<Answer, Failure> {
        let setup = self.db.stripe_setup();
        let mut url = format!("{}/v1/{path}", setup.api_base());
        if let Some(q) = query.filter(|q| !q.is_empty()) {
            url.push('?');
            url.push_str(q);
        }
        let reqwest_method =
            reqwest::Method::from_bytes(method.as_str().as_bytes()).map_err(|_| Failure {
                response: forbidden("unsupported method"),
                card_may_exist: false,
            })?;
        let mut req = setup
            .http
            .request(reqwest_method, url)
            .bearer_auth(&self.credential.api_key)
            .header("stripe-version", crate::issuer::stripe_api_version());
        if let Some(account) = &self.credential.account {
            req = req.header("stripe-account", account);
        }
        if *method == Method::POST {
            if let Some(k) = self.idempotency_key {
                req = req.header("idempotency-key", k);
            }
            req = req
                .header("content-type", "application/x-www-form-urlencoded")
                .body(form.unwrap_or_default());
        }
        let resp = req.send().await.map_err(|e| {
            tracing::warn!(error = %e.without_url(), "relay could not reach stripe");
            Failure {
                response: stripe_error(
                    StatusCode::BAD_GATEWAY,
                    "api_error",
                    "stripe_unreachable",
                    "stripe could not be reached",
                ),
                card_may_exist: true,
            }
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
        let body = resp.bytes().await.map_err(|_| Failure {
            response: stripe_error(
                StatusCode::BAD_GATEWAY,
                "api_error",
                "stripe_unreachable",
                "stripe's answer could not be read",
            ),
            card_may_exist: true,
        })?;
        if status == StatusCode::UNAUTHORIZED {
            // The stored credential no longer works (e.g. revoked at Stripe): issuing stops
            // for the organization, and its connection says so.
            tracing::warn!(org = %self.org_id, "stripe refused the relay's credential");
            connect::credential_refused(self.db, self.org_id, self.credential, super::unix_now())
                .await;
            return Err(Failure {
                response: disconnected(
                    "stripe refused the organization's credential; reconnect the stripe account",
                ),
                card_may_exist: false,
            });
        }
        Ok(Answer {
            status,
            headers,
            body,
        })
    }

    /// Whether Stripe says the card is canceled (e.g. canceled there meanwhile).
    async fn is_canceled(&self, card_id: &str) -> bool {
        match self
            .send(
                &Method::GET,
                &format!("issuing/cards/{card_id}"),
                None,
                None,
            )
            .await
        {
            Ok(a) if a.status.is_success() => serde_json::from_slice::<Value>(&a.body)
                .is_ok_and(|c| c.get("status").and_then(Value::as_str) == Some("canceled")),
            _ => false,
        }
    }

    /// Cancels a card the relay just made; `true` if Stripe says it is canceled.
    async fn cancel(&self, card_id: &str) -> bool {
        let key = format!("roony-relay-cancel-{card_id}");
        let forward = Forward {
            idempotency_key: Some(&key),
            ..*self
        };
        match forward
            .send(
                &Method::POST,
                &format!("issuing/cards/{card_id}"),
                None,
                Some("status=canceled".into()),
            )
            .await
        {
            Ok(a) if a.status.is_success() => true,
            Ok(a) => {
                tracing::error!(card = %card_id, status = a.status.as_u16(), "relay: stripe refused to cancel the card");
                false
            }
            Err(_) => {
                tracing::error!(card = %card_id, "relay: the card could not be canceled");
                false
            }
        }
    }
}

// ----- expired cards -------------------------------------------------------------------

/// Most expired cards one sweep cancels.
const SWEEP_BATCH: i64 = 100;
/// How often the control plane sweeps.
pub const SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// Cancels relay cards past their expiry that are still live at Stripe (at most
/// [`SWEEP_BATCH`]), each marked canceled once Stripe says so. Their real-time
/// authorizations are declined already; canceling makes Stripe agree, and from then on the
/// card counts at what it spent. Returns how many were canceled; a card Stripe would not
/// cancel (or an organization without a usable credential) is left for the next sweep.
pub async fn sweep_expired(db: &ControlDb, now: i64) -> Result<usize, super::db::DbError> {
    let rows = db.expired_relay_cards(now, SWEEP_BATCH).await?;
    let mut canceled = 0;
    let mut credentials: BTreeMap<String, Option<connect::IssuingCredential>> = BTreeMap::new();
    for row in rows {
        let Some(card_id) = row.card_id.as_deref() else {
            continue;
        };
        if !credentials.contains_key(&row.org_id) {
            let credential = match connect::issuing_credential(db, &row.org_id).await {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!(org = %row.org_id, code = e.code(), "relay sweep: no stripe credential; expired cards stay live at stripe");
                    None
                }
            };
            credentials.insert(row.org_id.clone(), credential);
        }
        let Some(Some(credential)) = credentials.get(&row.org_id) else {
            continue;
        };
        let forward = Forward {
            db,
            credential,
            org_id: &row.org_id,
            idempotency_key: None,
        };
        if forward.cancel(card_id).await || forward.is_canceled(card_id).await {
            // Stripe's `issuing_card.updated` may have marked it already.
            db.relay_card_canceled(card_id, now).await?;
            tracing::info!(card = %card_id, intent = %row.intent_id, "relay: canceled an expired card");
            canceled += 1;
        }
    }
    Ok(canceled)
}

/// Sweeps expired relay cards every [`SWEEP_INTERVAL`], until aborted.
pub async fn periodic_sweep(db: ControlDb) {
    loop {
        tokio::time::sleep(SWEEP_INTERVAL).await;
        if let Err(e) = sweep_expired(&db, super::unix_now()).await {
            tracing::warn!(error = %e, "relay sweep of expired cards failed");
        }
    }
}

// ----- parameters -----------------------------------------------------------------------

/// A form list (`a[0]=…`, `a[]=…`): its string items, or `None` if it is not a list of
/// strings (a plain value, a nested object, non-numeric indexes).
fn string_list(v: &Value) -> Option<Vec<String>> {
    let items: Vec<&Value> = match v {
        Value::Array(a) => a.iter().collect(),
        Value::Object(o) => {
            if !o
                .keys()
                .all(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()))
            {
                return None;
            }
            o.values().collect()
        }
        _ => return None,
    };
    if items.len() > MAX_LIST {
        return None;
    }
    items
        .into_iter()
        .map(|i| i.as_str().map(str::to_string))
        .collect()
}

/// The one object of a form list (`a[0][k]=…`).
fn single_object(v: &Value) -> Option<&Map<String, Value>> {
    let item = match v {
        Value::Array(a) if a.len() == 1 => a.first(),
        Value::Object(o) if o.len() == 1 && o.contains_key("0") => o.get("0"),
        _ => None,
    }?;
    item.as_object()
}

/// A form value of ASCII digits only (no sign, no spaces, no decimals) as a number.
fn digits(v: &str) -> Option<i64> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok()
}

fn text<'a>(m: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    m.get(key).and_then(Value::as_str)
}

/// Refuses any key of `m` outside `allowed`.
fn only(m: &Map<String, Value>, allowed: &[&str], what: &str) -> Result<(), Response> {
    match m.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(forbidden(&format!(
            "the relay does not forward {what}{}",
            if what.is_empty() {
                format!("parameter {k}")
            } else {
                format!("[{k}]")
            }
        ))),
        None => Ok(()),
    }
}

fn parse_form(body: &Bytes) -> Result<Map<String, Value>, Response> {
    let form = std::str::from_utf8(body).map_err(|_| invalid("the body is not a form"))?;
    crate::emulator::form::parse(form).map_err(|_| invalid("the body is not a form"))
}

/// Everything but RFC 3986's unreserved characters is percent-encoded.
const FORM_ENCODE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

fn percent(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, FORM_ENCODE).to_string()
}

/// A form body from `(key, value)` pairs; brackets in keys stay readable, like
/// async-stripe sends them.
fn encode(pairs: &[(String, String)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| {
            let key: String = k
                .split_inclusive(['[', ']'])
                .map(|part| {
                    let (name, bracket) = match part.strip_suffix(['[', ']']) {
                        Some(n) => (n, &part[n.len()..]),
                        None => (part, ""),
                    };
                    format!("{}{bracket}", percent(name))
                })
                .collect();
            format!("{key}={}", percent(v))
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// The agent a card or cardholder is for: it must exist, be in the sidecar's project and
/// be active.
async fn active_agent(
    state: &AdminState,
    sidecar: &SidecarAuth,
    agent_id: &str,
) -> Result<super::model::Agent, Response> {
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
    Ok(agent)
}

/// A cardholder creation: only the issuer's parameters, for an active agent of the
/// sidecar's project; the re-encoded body.
async fn check_cardholder(
    state: &AdminState,
    sidecar: &SidecarAuth,
    body: &Bytes,
) -> Result<String, Response> {
    let params = parse_form(body)?;
    only(
        &params,
        &["name", "type", "individual", "billing", "metadata"],
        "",
    )?;
    let mut pairs: Vec<(String, String)> = Vec::new();
    let name = text(&params, "name").ok_or_else(|| invalid("a cardholder needs a name"))?;
    pairs.push(("name".into(), name.to_string()));
    match text(&params, "type") {
        Some("individual") => pairs.push(("type".into(), "individual".into())),
        None => {}
        Some(_) => return Err(forbidden("the relay creates individual cardholders only")),
    }
    if let Some(individual) = params.get("individual") {
        let individual = individual
            .as_object()
            .ok_or_else(|| forbidden("individual must be a hash"))?;
        only(individual, &["first_name", "last_name"], "individual")?;
        for k in ["first_name", "last_name"] {
            if let Some(v) = individual.get(k) {
                let v = v
                    .as_str()
                    .ok_or_else(|| forbidden("a name must be a string"))?;
                pairs.push((format!("individual[{k}]"), v.to_string()));
            }
        }
    }
    let billing = params
        .get("billing")
        .and_then(Value::as_object)
        .ok_or_else(|| invalid("a cardholder needs a billing address"))?;
    only(billing, &["address"], "billing")?;
    let address = billing
        .get("address")
        .and_then(Value::as_object)
        .ok_or_else(|| invalid("a cardholder needs a billing address"))?;
    const ADDRESS: &[&str] = &["line1", "line2", "city", "state", "postal_code", "country"];
    only(address, ADDRESS, "billing[address]")?;
    for k in ADDRESS {
        if let Some(v) = address.get(*k) {
            let v = v
                .as_str()
                .ok_or_else(|| forbidden("an address field must be a string"))?;
            pairs.push((format!("billing[address][{k}]"), v.to_string()));
        }
    }
    let metadata = params
        .get("metadata")
        .and_then(Value::as_object)
        .ok_or_else(|| invalid("a cardholder needs roony_agent_id metadata"))?;
    only(metadata, &["roony_agent_id"], "metadata")?;
    let agent_id = text(metadata, "roony_agent_id")
        .filter(|a| !a.is_empty())
        .ok_or_else(|| invalid("a cardholder needs roony_agent_id metadata"))?;
    active_agent(state, sidecar, agent_id).await?;
    pairs.push(("metadata[roony_agent_id]".into(), agent_id.to_string()));
    Ok(encode(&pairs))
}

/// A card creation that passed the checks that need no lock.
#[derive(Clone, Debug)]
struct CheckedCard {
    agent_id: String,
    intent_id: String,
    currency: Currency,
    limit: i64,
    /// The policy's card buffer, basis points.
    buffer_bps: i64,
    /// Above this limit the intent must be approved by an administrator (the policy's
    /// `require_approval_above` plus the buffer).
    approval_above: Option<i64>,
    /// The card's `roony_expires`.
    expires_at: i64,
    /// The policy revision the card was checked against.
    policy_revision: i64,
    bounds: Vec<RelayBound>,
    /// The re-encoded body.
    form: String,
}

fn with_buffer(amount: i64, bps: i64) -> i64 {
    amount.saturating_add(amount.saturating_mul(bps) / 10_000)
}

/// Checks a card's category (or country) controls against the policy's list rule: the card
/// must allow a subset of an allow list, and either allow nothing the policy denies or
/// block everything it denies.
fn controls_within(
    rule: &ListRule,
    allowed: &[String],
    blocked: &[String],
    what: &str,
) -> Result<(), Response> {
    if !allowed.is_empty() && !blocked.is_empty() {
        return Err(forbidden(&format!(
            "a card allows or blocks {what}, not both"
        )));
    }
    if !rule.allow.is_empty() {
        if allowed.is_empty() {
            return Err(forbidden(&format!(
                "the agent's policy allows only some {what}; the card must allow only those"
            )));
        }
        if let Some(x) = allowed.iter().find(|c| !rule.allow.contains(c)) {
            return Err(forbidden(&format!(
                "the card allows {x}, which the agent's policy does not allow"
            )));
        }
    }
    if !rule.deny.is_empty() {
        if allowed.is_empty() {
            if let Some(x) = rule.deny.iter().find(|d| !blocked.contains(d)) {
                return Err(forbidden(&format!(
                    "the card must block {x}, which the agent's policy denies"
                )));
            }
        } else if let Some(x) = allowed.iter().find(|c| rule.deny.contains(c)) {
            return Err(forbidden(&format!(
                "the card allows {x}, which the agent's policy denies"
            )));
        }
    }
    Ok(())
}

/// The agent's compiled policy with its admin-set budgets folded in (as its sidecar
/// applies them).
async fn agent_policy(
    state: &AdminState,
    agent_id: &str,
) -> Result<(CompiledPolicy, i64), Response> {
    let (document, revision) = match state.db.get_policy(agent_id).await {
        Ok(p) => (p.document, p.revision),
        Err(super::db::DbError::NotFound(_)) => {
            return Err(forbidden("the agent has no policy"));
        }
        Err(e) => {
            tracing::error!(error = %e, "relay: policy lookup failed");
            return Err(internal("the policy could not be checked"));
        }
    };
    let policy: Policy = serde_json::from_value(document)
        .map_err(|_| forbidden("the agent's policy is not valid"))?;
    let budgets = state
        .db
        .list_budgets(Some(super::model::BudgetScope::Agent), Some(agent_id))
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "relay: budget lookup failed");
            internal("the budgets could not be checked")
        })?;
    let budgets: Vec<crate::sync::wire::BundleBudget> = budgets
        .into_iter()
        .map(|b| crate::sync::wire::BundleBudget {
            id: b.id,
            scope: b.scope.as_str().to_string(),
            scope_id: b.scope_id,
            period: b.period,
            currency: b.currency,
            limit: b.limit,
        })
        .collect();
    crate::sync::client::with_budgets(policy, agent_id, &budgets)
        .compile()
        .map(|p| (p, revision))
        .map_err(|_| forbidden("the agent's policy is not valid"))
}

/// The budgets bounding the agent's relay cards now: the policy's (with agent budgets) and
/// the project's and organization's shared budgets in the card's currency.
async fn bounds_for(
    state: &AdminState,
    sidecar: &SidecarAuth,
    agent_id: &str,
    policy: &CompiledPolicy,
    now: i64,
) -> Result<Vec<RelayBound>, Response> {
    let bps = i64::from(policy.card_buffer_bps);
    let mut bounds: Vec<RelayBound> = policy
        .budgets
        .iter()
        .map(|b| RelayBound {
            scope: RelayScope::Agent,
            scope_id: agent_id.to_string(),
            budget_id: None,
            period: b.period,
            since: b.period.bucket_start(now),
            limit: b.limit,
            max: with_buffer(b.limit, bps),
        })
        .collect();
    let shared = state
        .db
        .bundle_budgets(&sidecar.project_id)
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "relay: shared budget lookup failed");
            internal("the budgets could not be checked")
        })?;
    for b in shared {
        let (scope, scope_id) = match b.scope.as_str() {
            "project" => (RelayScope::Project, sidecar.project_id.clone()),
            "org" => (RelayScope::Org, sidecar.org_id.clone()),
            _ => continue,
        };
        if Currency::parse(&b.currency).ok() != Some(policy.currency) {
            continue;
        }
        let Ok(period) = serde_json::from_value::<Period>(Value::String(b.period.clone())) else {
            // Deny by default: a budget the relay cannot read bounds nothing it can check.
            return Err(internal("a shared budget is unreadable"));
        };
        bounds.push(RelayBound {
            scope,
            scope_id,
            budget_id: Some(b.id),
            period,
            since: period.bucket_start(now),
            limit: b.limit,
            max: with_buffer(b.limit, bps),
        });
    }
    Ok(bounds)
}

/// A card creation's checks that need no lock, and its re-encoded body.
async fn check_card(
    state: &AdminState,
    sidecar: &SidecarAuth,
    token_id: &str,
    body: &Bytes,
) -> Result<CheckedCard, Response> {
    let params = parse_form(body)?;
    only(
        &params,
        &[
            "currency",
            "type",
            "cardholder",
            "status",
            "spending_controls",
            "lifecycle_controls",
            "metadata",
        ],
        "",
    )?;
    // Metadata first: it names the agent whose policy the rest is checked against.
    let metadata = params
        .get("metadata")
        .and_then(Value::as_object)
        .ok_or_else(|| invalid("a card needs roony_agent_id and roony_intent_id metadata"))?;
    only(metadata, CARD_METADATA, "metadata")?;
    let mut md: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in metadata {
        let v = v
            .as_str()
            .filter(|v| v.chars().count() <= MAX_METADATA_VALUE)
            .ok_or_else(|| {
                forbidden("a metadata value must be a string of at most 500 characters")
            })?;
        md.insert(k.clone(), v.to_string());
    }
    let (Some(agent_id), Some(intent_id)) = (
        md.get("roony_agent_id").cloned(),
        md.get("roony_intent_id").cloned(),
    ) else {
        return Err(invalid(
            "a card needs roony_agent_id and roony_intent_id metadata",
        ));
    };
    if intent_id.is_empty() {
        return Err(invalid("roony_intent_id is empty"));
    }
    if !is_id(&intent_id, "pur_") {
        return Err(forbidden("roony_intent_id is not an intent id"));
    }
    let agent = active_agent(state, sidecar, &agent_id).await?;
    let (policy, policy_revision) = agent_policy(state, &agent.id).await?;
    // The card expires: within the policy's card lifetime from now (allowing for the
    // sidecar's clock). After it, its real-time authorizations are declined.
    let now = super::unix_now();
    let expires_at = md
        .get("roony_expires")
        .and_then(|v| digits(v))
        .ok_or_else(|| forbidden("a card needs roony_expires (unix seconds)"))?;
    if expires_at <= now {
        return Err(forbidden("roony_expires has passed"));
    }
    if expires_at > now + i64::from(policy.card_ttl_seconds) + CLOCK_SKEW_SECONDS {
        return Err(forbidden(
            "roony_expires is later than the agent's policy lets a card live (card_ttl_seconds)",
        ));
    }

    match text(&params, "type") {
        Some("virtual") => {}
        _ => return Err(forbidden("the relay creates virtual cards only")),
    }
    if text(&params, "status") != Some("active") {
        return Err(forbidden("the relay creates active cards only"));
    }
    let cardholder = text(&params, "cardholder")
        .filter(|c| is_id(c, "ich_"))
        .ok_or_else(|| forbidden("a card needs its cardholder (ich_…)"))?;
    let currency = text(&params, "currency")
        .and_then(|c| Currency::parse(&c.to_ascii_uppercase()).ok())
        .ok_or_else(|| forbidden("the card's currency is not the agent's policy currency"))?;
    if currency != policy.currency {
        return Err(forbidden(
            "the card's currency is not the agent's policy currency",
        ));
    }
    // Single use: Stripe cancels the card after its first payment.
    let lifecycle = params
        .get("lifecycle_controls")
        .and_then(Value::as_object)
        .ok_or_else(|| {
            forbidden("a card needs lifecycle_controls[cancel_after][payment_count]=1")
        })?;
    only(lifecycle, &["cancel_after"], "lifecycle_controls")?;
    let cancel_after = lifecycle
        .get("cancel_after")
        .and_then(Value::as_object)
        .ok_or_else(|| {
            forbidden("a card needs lifecycle_controls[cancel_after][payment_count]=1")
        })?;
    only(
        cancel_after,
        &["payment_count"],
        "lifecycle_controls[cancel_after]",
    )?;
    if text(cancel_after, "payment_count") != Some("1") {
        return Err(forbidden(
            "a card needs lifecycle_controls[cancel_after][payment_count]=1",
        ));
    }

    let controls = params
        .get("spending_controls")
        .and_then(Value::as_object)
        .ok_or_else(|| invalid("a card needs a spending limit"))?;
    only(
        controls,
        &[
            "spending_limits",
            "allowed_categories",
            "blocked_categories",
            "allowed_merchant_countries",
            "blocked_merchant_countries",
        ],
        "spending_controls",
    )?;
    let limit = controls
        .get("spending_limits")
        .and_then(single_object)
        .ok_or_else(|| forbidden("a card needs exactly one spending limit"))?;
    only(
        limit,
        &["amount", "interval"],
        "spending_controls[spending_limits][0]",
    )?;
    if text(limit, "interval") != Some("all_time") {
        return Err(forbidden(
            "a card's spending limit must have interval all_time",
        ));
    }
    let amount = text(limit, "amount")
        .and_then(digits)
        .filter(|a| *a > 0)
        .ok_or_else(|| {
            invalid("a spending limit's amount is not a whole positive number of minor units")
        })?;
    let list = |key: &str| -> Result<Vec<String>, Response> {
        match controls.get(key) {
            None => Ok(Vec::new()),
            Some(v) => string_list(v)
                .ok_or_else(|| forbidden(&format!("spending_controls[{key}] must be a list"))),
        }
    };
    let allowed_categories = list("allowed_categories")?;
    let blocked_categories = list("blocked_categories")?;
    let allowed_countries = list("allowed_merchant_countries")?;
    let blocked_countries = list("blocked_merchant_countries")?;
    if let Some(c) = allowed_categories
        .iter()
        .chain(&blocked_categories)
        .find(|c| !crate::domain::category::is_known_category(c))
    {
        return Err(forbidden(&format!("{c} is not a merchant category")));
    }
    if allowed_countries
        .iter()
        .chain(&blocked_countries)
        .any(|c| c.len() != 2 || !c.bytes().all(|b| b.is_ascii_uppercase()))
    {
        return Err(forbidden(
            "merchant countries are two-letter upper-case codes",
        ));
    }
    controls_within(
        &policy.categories,
        &allowed_categories,
        &blocked_categories,
        "merchant categories",
    )?;
    controls_within(
        &policy.countries,
        &allowed_countries,
        &blocked_countries,
        "merchant countries",
    )?;

    // The metadata agrees with the card, and its signature (if any) is the sidecar's.
    if md
        .get("roony_limit")
        .is_some_and(|l| *l != amount.to_string())
    {
        return Err(forbidden("roony_limit is not the card's spending limit"));
    }
    if md
        .get("roony_currency")
        .is_some_and(|c| !c.eq_ignore_ascii_case(currency.code()))
    {
        return Err(forbidden("roony_currency is not the card's currency"));
    }
    if md
        .get(crate::sync::wire::CARD_SIDECAR_KEY)
        .is_some_and(|s| s != token_id)
    {
        return Err(forbidden("roony_sidecar names another sidecar"));
    }
    if md.contains_key(crate::sync::wire::CARD_SIGNATURE_KEY)
        && !crate::sync::wire::verify_card_metadata(&md, &sidecar.token_hash)
    {
        return Err(forbidden(
            "roony_sig does not verify with this sidecar's token",
        ));
    }

    let bps = i64::from(policy.card_buffer_bps);
    let ceiling = policy
        .max_per_transaction
        .or_else(|| policy.budgets.iter().map(|b| b.limit).min())
        .map(|base| with_buffer(base, bps))
        .ok_or_else(|| {
            forbidden("the agent's policy sets no per-transaction maximum or budget to check the card against")
        })?;
    if amount > ceiling {
        return Err(forbidden(
            "the spending limit is above the agent's per-transaction maximum",
        ));
    }
    let bounds = bounds_for(state, sidecar, &agent.id, &policy, now).await?;

    let mut pairs: Vec<(String, String)> = vec![
        ("cardholder".into(), cardholder.to_string()),
        ("currency".into(), currency.code().to_ascii_lowercase()),
        (
            "lifecycle_controls[cancel_after][payment_count]".into(),
            "1".into(),
        ),
    ];
    for (k, v) in &md {
        pairs.push((format!("metadata[{k}]"), v.clone()));
    }
    let mut push_list = |key: &str, items: &[String]| {
        for (i, item) in items.iter().enumerate() {
            pairs.push((format!("spending_controls[{key}][{i}]"), item.clone()));
        }
    };
    push_list("allowed_categories", &allowed_categories);
    push_list("blocked_categories", &blocked_categories);
    push_list("allowed_merchant_countries", &allowed_countries);
    push_list("blocked_merchant_countries", &blocked_countries);
    pairs.push((
        "spending_controls[spending_limits][0][amount]".into(),
        amount.to_string(),
    ));
    pairs.push((
        "spending_controls[spending_limits][0][interval]".into(),
        "all_time".into(),
    ));
    pairs.push(("status".into(), "active".into()));
    pairs.push(("type".into(), "virtual".into()));
    Ok(CheckedCard {
        agent_id: agent.id,
        intent_id,
        currency,
        limit: amount,
        buffer_bps: bps,
        approval_above: policy.require_approval_above.map(|t| with_buffer(t, bps)),
        expires_at,
        policy_revision,
        bounds,
        form: encode(&pairs),
    })
}

/// The checks that need the ledger, read under the agent's lock (pure):
///
/// - the agent is still active and its policy still the revision the card was checked
///   against (a freeze or a publish that landed meanwhile refuses the card);
/// - one card per intent: an intent with a card gets no other, but a retry with the same
///   idempotency key (and no larger limit, within [`RETRY_WINDOW_SECONDS`]) is forwarded —
///   Stripe replays its answer (and refuses a retry whose parameters differ);
/// - an intent the ledger knows must be this agent's, in the card's currency, and `issuing`,
///   `approved` or `failed` (a failed issuance is retried with the same intent);
/// - above the approval threshold, the ledger must show the intent approved by an
///   administrator, for an amount the limit fits (with the buffer);
/// - for every budget, the exposure of the scope's relay cards this period plus the card's
///   limit stays within the budget plus the card buffer.
fn judge(
    card: &CheckedCard,
    claim: &RelayCardClaim,
    facts: &RelayFacts,
    now: i64,
) -> Result<RelayVerdict, String> {
    if facts.agent_status != "active" {
        return Err(format!("the agent is {}", facts.agent_status));
    }
    if facts.policy_revision != Some(card.policy_revision) {
        return Err("the agent's policy changed while the card was checked; retry".into());
    }
    if let Some(e) = &facts.existing {
        if e.idempotency_key_hash == claim.idempotency_key_hash
            && e.agent_id == claim.agent_id
            && e.currency == claim.currency
            && claim.spending_limit <= e.spending_limit
            && now.saturating_sub(e.created_at) < RETRY_WINDOW_SECONDS
        {
            return Ok(RelayVerdict::Retry);
        }
        return Err("the intent already has a card; the relay issues one card per intent".into());
    }
    if let Some(i) = &facts.intent {
        if i.agent_id != claim.agent_id {
            return Err("the intent belongs to another agent".into());
        }
        if !i.currency.eq_ignore_ascii_case(&claim.currency) {
            return Err("the intent is in another currency".into());
        }
        if !matches!(i.status.as_str(), "issuing" | "approved" | "failed") {
            return Err(format!("the intent is {}; it gets no card", i.status));
        }
    }
    if let Some(threshold) = card.approval_above
        && claim.spending_limit > threshold
    {
        let approved = facts.intent.as_ref().is_some_and(|i| {
            i.admin_decision.as_deref() == Some("approved")
                && claim.spending_limit <= with_buffer(i.amount, card.buffer_bps)
        });
        if !approved {
            return Err(
                "cards above the policy's approval threshold need an intent an administrator approved"
                    .into(),
            );
        }
    }
    for (b, exposure) in claim.bounds.iter().zip(&facts.exposures) {
        if exposure.saturating_add(claim.spending_limit) > b.max {
            return Err(format!(
                "the {} {} budget of {} has {} left for cards issued through the relay; this card needs {}",
                b.scope.as_str(),
                b.period.as_str().replace('_', "-"),
                b.limit,
                b.max.saturating_sub(*exposure).max(0),
                claim.spending_limit
            ));
        }
    }
    if facts.exposures.len() != claim.bounds.len() {
        // Deny by default: every bound must have been measured.
        return Err("the budgets could not be checked".into());
    }
    Ok(RelayVerdict::Create)
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
    use crate::control::db::{LedgerIntentFacts, RelayCardRow};

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
    fn encoding_round_trips() {
        let pairs = vec![
            (
                "metadata[roony_merchant]".to_string(),
                "A & B=c [x]".to_string(),
            ),
            (
                "spending_controls[allowed_categories][0]".to_string(),
                "computer_software_stores".to_string(),
            ),
        ];
        let body = encode(&pairs);
        assert!(
            body.starts_with("metadata[roony_merchant]=A%20%26%20B%3Dc%20%5Bx%5D&"),
            "{body}"
        );
        let parsed = crate::emulator::form::parse(&body).unwrap();
        assert_eq!(parsed["metadata"]["roony_merchant"], "A & B=c [x]");
        assert_eq!(
            parsed["spending_controls"]["allowed_categories"]["0"],
            "computer_software_stores"
        );
    }

    #[test]
    fn lists() {
        assert_eq!(
            string_list(&serde_json::json!({"0": "a", "1": "b"})),
            Some(vec!["a".to_string(), "b".to_string()])
        );
        assert_eq!(
            string_list(&serde_json::json!(["a"])),
            Some(vec!["a".into()])
        );
        assert_eq!(string_list(&serde_json::json!("a")), None);
        assert_eq!(string_list(&serde_json::json!({"x": "a"})), None);
        assert_eq!(string_list(&serde_json::json!({"0": {"k": "a"}})), None);
    }

    #[test]
    fn category_controls() {
        let rule = |allow: &[&str], deny: &[&str]| ListRule {
            allow: allow.iter().map(|s| s.to_string()).collect(),
            deny: deny.iter().map(|s| s.to_string()).collect(),
        };
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let ok =
            |r: &ListRule, a: &[&str], b: &[&str]| controls_within(r, &v(a), &v(b), "x").is_ok();
        // No rule: anything.
        assert!(ok(&rule(&[], &[]), &[], &[]));
        assert!(ok(&rule(&[], &[]), &["a"], &[]));
        // Allow list: a non-empty subset.
        assert!(ok(&rule(&["a", "b"], &[]), &["a"], &[]));
        assert!(!ok(&rule(&["a", "b"], &[]), &[], &[]));
        assert!(!ok(&rule(&["a", "b"], &[]), &["c"], &[]));
        assert!(!ok(&rule(&["a"], &[]), &[], &["c"]));
        // Deny list: block all of it, or allow none of it.
        assert!(ok(&rule(&[], &["d"]), &[], &["d", "e"]));
        assert!(!ok(&rule(&[], &["d", "e"]), &[], &["d"]));
        assert!(ok(&rule(&[], &["d"]), &["a"], &[]));
        assert!(!ok(&rule(&[], &["d"]), &["d"], &[]));
        // Never both.
        assert!(!ok(&rule(&[], &[]), &["a"], &["b"]));
    }

    fn card(limit: i64) -> (CheckedCard, RelayCardClaim) {
        let bounds = vec![RelayBound {
            scope: RelayScope::Agent,
            scope_id: "agt_1".into(),
            budget_id: None,
            period: Period::Daily,
            since: 0,
            limit: 10_000,
            max: 10_000,
        }];
        (
            CheckedCard {
                agent_id: "agt_1".into(),
                intent_id: "pur_1".into(),
                currency: Currency::USD,
                limit,
                buffer_bps: 0,
                approval_above: Some(5_000),
                expires_at: 3_600,
                policy_revision: 2,
                bounds: bounds.clone(),
                form: String::new(),
            },
            RelayCardClaim {
                intent_id: "pur_1".into(),
                agent_id: "agt_1".into(),
                project_id: "prj_1".into(),
                org_id: "org_1".into(),
                sidecar_id: "sc_1".into(),
                currency: "USD".into(),
                spending_limit: limit,
                idempotency_key_hash: "k".into(),
                expires_at: 3_600,
                policy_revision: 2,
                bounds,
            },
        )
    }

    fn facts(exposure: i64) -> RelayFacts {
        RelayFacts {
            agent_status: "active".into(),
            policy_revision: Some(2),
            existing: None,
            intent: None,
            exposures: vec![exposure],
        }
    }

    const NOW: i64 = 1_000;

    #[test]
    fn judgements() {
        let (c, claim) = card(3_000);
        assert_eq!(judge(&c, &claim, &facts(0), NOW), Ok(RelayVerdict::Create));
        assert_eq!(
            judge(&c, &claim, &facts(7_000), NOW),
            Ok(RelayVerdict::Create)
        );
        let refused = judge(&c, &claim, &facts(7_001), NOW).unwrap_err();
        assert!(refused.contains("agent daily budget"), "{refused}");
        // Unmeasured bounds deny.
        let mut f = facts(0);
        f.exposures.clear();
        assert!(judge(&c, &claim, &f, NOW).is_err());
        // One card per intent; the same key is a retry (not a larger card).
        let row = row_at(0);
        let mut f = facts(10_000);
        f.existing = Some(row.clone());
        assert_eq!(judge(&c, &claim, &f, NOW), Ok(RelayVerdict::Retry));
        let (c2, claim2) = card(3_001);
        assert!(judge(&c2, &claim2, &f, NOW).is_err());
        f.existing = Some(RelayCardRow {
            idempotency_key_hash: "other".into(),
            ..row
        });
        assert!(judge(&c, &claim, &f, NOW).is_err());
        // The ledger's intent: this agent's, still to be issued.
        let intent = |agent: &str, status: &str, decision: Option<&str>| LedgerIntentFacts {
            agent_id: agent.into(),
            status: status.into(),
            amount: 6_000,
            currency: "USD".into(),
            admin_decision: decision.map(str::to_string),
        };
        let mut f = facts(0);
        f.intent = Some(intent("agt_2", "approved", None));
        assert!(judge(&c, &claim, &f, NOW).is_err());
        for status in ["declined", "canceled", "expired", "pending_approval"] {
            f.intent = Some(intent("agt_1", status, None));
            assert!(judge(&c, &claim, &f, NOW).is_err(), "{status}");
        }
        for status in ["issuing", "approved", "failed"] {
            f.intent = Some(intent("agt_1", status, None));
            assert!(judge(&c, &claim, &f, NOW).is_ok(), "{status}");
        }
        // Above the approval threshold: an administrator's approval of enough.
        let (big, big_claim) = card(6_000);
        f.intent = Some(intent("agt_1", "approved", None));
        assert!(judge(&big, &big_claim, &f, NOW).is_err());
        f.intent = None;
        assert!(judge(&big, &big_claim, &f, NOW).is_err());
        f.intent = Some(intent("agt_1", "approved", Some("approved")));
        assert_eq!(judge(&big, &big_claim, &f, NOW), Ok(RelayVerdict::Create));
        let (bigger, bigger_claim) = card(6_001);
        assert!(judge(&bigger, &bigger_claim, &f, NOW).is_err());

        // Under the lock: a frozen agent or a policy published meanwhile refuses.
        let mut f = facts(0);
        f.agent_status = "frozen".into();
        assert_eq!(
            judge(&c, &claim, &f, NOW),
            Err("the agent is frozen".into())
        );
        let mut f = facts(0);
        f.policy_revision = Some(3);
        assert!(
            judge(&c, &claim, &f, NOW)
                .unwrap_err()
                .contains("policy changed")
        );
        f.policy_revision = None;
        assert!(judge(&c, &claim, &f, NOW).is_err());
        // A retry is a retry only while Stripe still knows the key.
        let mut f = facts(0);
        f.existing = Some(row_at(0));
        assert_eq!(judge(&c, &claim, &f, NOW), Ok(RelayVerdict::Retry));
        assert!(judge(&c, &claim, &f, RETRY_WINDOW_SECONDS).is_err());
    }

    fn row_at(created_at: i64) -> RelayCardRow {
        RelayCardRow {
            intent_id: "pur_1".into(),
            card_id: Some("ic_1".into()),
            agent_id: "agt_1".into(),
            project_id: "prj_1".into(),
            org_id: "org_1".into(),
            sidecar_id: "sc_1".into(),
            currency: "USD".into(),
            spending_limit: 3_000,
            idempotency_key_hash: "k".into(),
            created_at,
            canceled_at: None,
            expires_at: created_at + 3_600,
        }
    }
}
