//! `POST /api/webhooks/stripe`: Stripe's events, verified like Stripe's SDKs verify them
//! (`Stripe-Signature: t=…,v1=…`, HMAC-SHA256 of `"{t}.{raw body}"` keyed with the endpoint
//! secret, any `v1` against any configured secret, 300 s tolerance), deduplicated by event
//! id, and applied to the ledger (`ControlDb::apply_*`).
//!
//! `issuing_authorization.request` is the real-time decision: answered in the response body
//! (`{"approved": …, "metadata": {…}}`, header `Stripe-Version`) within the configured
//! deadline. Whatever fails or runs late on that path declines (`internal_error`); it never
//! answers 5xx or times out (Stripe would fall back to its own timeout setting).

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use subtle::ConstantTimeEq;

use super::api::{AdminError, AdminState};
use super::model::{
    MerchantData, StripeAuthorization, StripeCard, StripeEventMeta, StripeTransaction,
};
use crate::policy::authorization::{
    AuthDecision, AuthReasonCode, AuthRequest, decide_authorization,
};

/// Where Stripe delivers events.
pub const PATH: &str = "/api/webhooks/stripe";
/// Largest event body accepted.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Signatures older (or newer) than this are refused, seconds (Stripe's SDK default).
pub const TOLERANCE_SECONDS: i64 = 300;
/// `Stripe-Version` of a real-time answer when the event names none.
pub const DEFAULT_STRIPE_VERSION: &str = "2026-09-30.endive";

/// Stripe webhook settings of a control plane.
#[derive(Clone)]
pub struct WebhookConfig {
    /// Endpoint signing secrets (`whsec_…`); two while one is being rotated.
    pub secrets: Vec<String>,
    /// Deadline of a real-time authorization decision.
    pub realtime_deadline: Duration,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            secrets: Vec::new(),
            realtime_deadline: Duration::from_millis(super::DEFAULT_REALTIME_DEADLINE_MS),
        }
    }
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("secrets", &format!("<{} redacted>", self.secrets.len()))
            .field("realtime_deadline", &self.realtime_deadline)
            .finish()
    }
}

fn bad_request(code: &str, message: impl Into<String>) -> AdminError {
    AdminError::new(StatusCode::BAD_REQUEST, code, message)
}

/// Verifies a `Stripe-Signature` header over the raw body, as Stripe's SDKs do: at least
/// one `v1` must equal the HMAC of `"{t}.{body}"` under one of `secrets` (compared in
/// constant time), then `t` must be within [`TOLERANCE_SECONDS`] of `now`.
pub fn verify_signature(
    header: Option<&str>,
    body: &[u8],
    secrets: &[String],
    now: i64,
) -> Result<(), AdminError> {
    let Some(header) = header.map(str::trim).filter(|h| !h.is_empty()) else {
        return Err(bad_request(
            "missing_signature",
            "the stripe-signature header is missing",
        ));
    };
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for item in header.split(',') {
        let Some((k, v)) = item.split_once('=') else {
            continue;
        };
        match k.trim() {
            "t" => timestamp = v.trim().parse::<i64>().ok(),
            "v1" => signatures.push(v.trim()),
            _ => {}
        }
    }
    let (Some(t), false) = (timestamp, signatures.is_empty()) else {
        return Err(bad_request(
            "invalid_signature_header",
            "the stripe-signature header has no timestamp or no v1 signature",
        ));
    };
    let mut message = Vec::with_capacity(body.len() + 24);
    message.extend_from_slice(t.to_string().as_bytes());
    message.push(b'.');
    message.extend_from_slice(body);
    let mut matched = false;
    for secret in secrets {
        let expected = hex::encode(crate::sync::wire::hmac_sha256(secret.as_bytes(), &message));
        for sig in &signatures {
            // Every comparison runs, whatever matched before.
            let eq = sig.len() == expected.len()
                && bool::from(expected.as_bytes().ct_eq(sig.as_bytes()));
            matched |= eq;
        }
    }
    if !matched {
        return Err(bad_request(
            "invalid_signature",
            "no signature matches the payload with the configured secrets",
        ));
    }
    if (now - t).abs() > TOLERANCE_SECONDS {
        return Err(bad_request(
            "stale_signature",
            format!("the signature's timestamp is more than {TOLERANCE_SECONDS} seconds from now"),
        ));
    }
    Ok(())
}

// ----- parsing --------------------------------------------------------------------------

fn text(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_string)
}

fn int(v: &Value, key: &str) -> Option<i64> {
    v.get(key).and_then(Value::as_i64)
}

/// An id field that may be expanded into an object.
fn id_of(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("id").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

fn invalid(message: &str) -> AdminError {
    bad_request("invalid_event", message.to_string())
}

fn parse_meta(event: &Value) -> Result<StripeEventMeta, AdminError> {
    let id = text(event, "id").filter(|s| !s.is_empty() && s.len() <= 255);
    let kind = text(event, "type").filter(|s| !s.is_empty() && s.len() <= 255);
    let (Some(id), Some(kind), Some(created), Some(_)) = (
        id,
        kind,
        int(event, "created"),
        event.get("data").and_then(|d| d.get("object")),
    ) else {
        return Err(invalid("the event needs id, type, created and data.object"));
    };
    Ok(StripeEventMeta {
        id,
        kind,
        account: text(event, "account"),
        created,
    })
}

fn parse_merchant(v: Option<&Value>) -> MerchantData {
    let Some(m) = v else {
        return MerchantData::default();
    };
    MerchantData {
        name: text(m, "name").unwrap_or_default(),
        url: text(m, "url"),
        city: text(m, "city"),
        country: text(m, "country"),
        category: text(m, "category"),
        network_id: text(m, "network_id"),
    }
}

pub(crate) fn parse_card(v: Option<&Value>) -> Option<StripeCard> {
    match v? {
        Value::String(id) => Some(StripeCard {
            id: id.clone(),
            ..Default::default()
        }),
        card @ Value::Object(_) => {
            let metadata: BTreeMap<String, String> = card
                .get("metadata")
                .and_then(Value::as_object)
                .map(|m| {
                    m.iter()
                        .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
                        .collect()
                })
                .unwrap_or_default();
            Some(StripeCard {
                id: text(card, "id")?,
                status: text(card, "status"),
                metadata,
                last4: text(card, "last4"),
                exp_month: int(card, "exp_month"),
                exp_year: int(card, "exp_year"),
            })
        }
        _ => None,
    }
}

pub(crate) fn parse_authorization(o: &Value) -> Result<StripeAuthorization, AdminError> {
    let (Some(id), Some(card)) = (text(o, "id"), parse_card(o.get("card"))) else {
        return Err(invalid("the authorization needs id and card"));
    };
    let pending = o.get("pending_request").filter(|p| p.is_object());
    let history = o
        .get("request_history")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut reasons: Vec<String> = Vec::new();
    for h in &history {
        if let Some(r) = text(h, "reason")
            && !reasons.contains(&r)
        {
            reasons.push(r);
        }
    }
    Ok(StripeAuthorization {
        id,
        card,
        amount: int(o, "amount").unwrap_or(0),
        currency: text(o, "currency").unwrap_or_default(),
        approved: o.get("approved").and_then(Value::as_bool).unwrap_or(false),
        status: text(o, "status").unwrap_or_else(|| "pending".into()),
        merchant: parse_merchant(o.get("merchant_data")),
        pending_amount: pending.and_then(|p| int(p, "amount")),
        pending_currency: pending.and_then(|p| text(p, "currency")),
        request_reasons: reasons,
        last_request_amount: history.last().and_then(|h| int(h, "amount")),
        created: int(o, "created").unwrap_or(0),
    })
}

pub(crate) fn parse_transaction(o: &Value) -> Result<Option<StripeTransaction>, AdminError> {
    let (Some(id), Some(card_id), Some(amount)) =
        (text(o, "id"), id_of(o.get("card")), int(o, "amount"))
    else {
        return Err(invalid("the transaction needs id, card and amount"));
    };
    let kind = text(o, "type").unwrap_or_default();
    if kind != "capture" && kind != "refund" {
        return Ok(None);
    }
    Ok(Some(StripeTransaction {
        id,
        card_id,
        authorization_id: id_of(o.get("authorization")),
        kind,
        amount: amount.saturating_abs(),
        currency: text(o, "currency").unwrap_or_default(),
        merchant: parse_merchant(o.get("merchant_data")),
        created: int(o, "created").unwrap_or(0),
    }))
}

// ----- the endpoint ---------------------------------------------------------------------

/// `POST /api/webhooks/stripe`.
pub async fn stripe(
    State(state): State<AdminState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, AdminError> {
    let config = state.db.webhook_config().clone();
    if config.secrets.is_empty() {
        return Err(AdminError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "webhooks_not_configured",
            "no stripe webhook secret is configured (--stripe-webhook-secret)",
        ));
    }
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            AdminError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("the body is larger than {MAX_BODY_BYTES} bytes"),
            )
        } else {
            bad_request("invalid_body", "the body could not be read")
        }
    })?;
    let now = super::unix_now();
    let signature = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok());
    verify_signature(signature, &body, &config.secrets, now)?;
    let event: Value = serde_json::from_slice(&body)
        .map_err(|e| invalid(&format!("the body is not valid json: {e}")))?;
    let meta = parse_meta(&event)?;
    let object = event
        .get("data")
        .and_then(|d| d.get("object"))
        .cloned()
        .unwrap_or_default();
    let db = &state.db;
    let fresh = match meta.kind.as_str() {
        "issuing_authorization.request" => {
            let auth = parse_authorization(&object)?;
            let version = text(&event, "api_version")
                .filter(|v| HeaderValue::from_str(v).is_ok())
                .unwrap_or_else(|| DEFAULT_STRIPE_VERSION.to_string());
            let started = std::time::Instant::now();
            let answer = match tokio::time::timeout(
                config.realtime_deadline,
                realtime(&state, &meta, &auth, now),
            )
            .await
            {
                Ok(Ok(answer)) => answer,
                Ok(Err(e)) => {
                    tracing::error!(event = %meta.id, authorization = %auth.id, error = %e,
                        "real-time authorization failed; declined");
                    error_answer("the decision failed")
                }
                Err(_) => {
                    tracing::error!(event = %meta.id, authorization = %auth.id,
                        deadline_ms = config.realtime_deadline.as_millis() as u64,
                        "real-time authorization missed its deadline; declined");
                    error_answer("the decision was not made in time")
                }
            };
            tracing::debug!(event = %meta.id, authorization = %auth.id,
                elapsed_us = started.elapsed().as_micros() as u64, "real-time authorization");
            let mut resp = (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                answer,
            )
                .into_response();
            if let Ok(v) = HeaderValue::from_str(&version) {
                resp.headers_mut().insert("stripe-version", v);
            }
            return Ok(resp);
        }
        "issuing_authorization.created" | "issuing_authorization.updated" => {
            let auth = parse_authorization(&object)?;
            db.apply_authorization(&meta, &auth, now).await?
        }
        "issuing_transaction.created" | "issuing_transaction.updated" => {
            match parse_transaction(&object)? {
                Some(t) => db.apply_transaction(&meta, &t, now).await?,
                None => db.record_ignored_event(&meta, now).await?,
            }
        }
        "issuing_card.created" | "issuing_card.updated" => {
            let Some(card) = parse_card(Some(&object)) else {
                return Err(invalid("the card needs an id"));
            };
            db.apply_card(&meta, &card, now).await?
        }
        "account.application.deauthorized" => {
            // The connected account that revoked the platform's access.
            let Some(account) = meta.account.clone() else {
                return Err(invalid("the event needs the connected account (account)"));
            };
            // The application deauthorized must be this platform's (when it is known).
            let client_id = match &db.stripe_setup().credentials {
                super::connect::StripeCredentials::Connect(c) => Some(c.client_id.as_str()),
                _ => None,
            };
            let is_application =
                object.get("object").and_then(Value::as_str) == Some("application");
            let ours =
                client_id.is_none_or(|id| object.get("id").and_then(Value::as_str) == Some(id));
            if is_application && ours {
                db.apply_deauthorized(&meta, &account, now).await?
            } else {
                tracing::warn!(event = %meta.id, account = %account,
                    "account.application.deauthorized about another application; ignored");
                db.record_ignored_event(&meta, now).await?
            }
        }
        _ => db.record_ignored_event(&meta, now).await?,
    };
    tracing::debug!(event = %meta.id, kind = %meta.kind, duplicate = !fresh, "stripe event");
    Ok(Json(serde_json::json!({"received": true, "duplicate": !fresh})).into_response())
}

/// The answer to a real-time request.
fn answer(decision: &AuthDecision, intent_id: Option<&str>) -> String {
    let mut metadata = serde_json::Map::new();
    metadata.insert(
        "roony_decision".into(),
        Value::from(if decision.approved {
            "approved"
        } else {
            "declined"
        }),
    );
    metadata.insert("roony_reasons".into(), Value::from(decision.codes()));
    if let Some(id) = intent_id {
        metadata.insert("roony_intent_id".into(), Value::from(id));
    }
    serde_json::json!({"approved": decision.approved, "metadata": metadata}).to_string()
}

fn error_answer(message: &str) -> String {
    answer(
        &AuthDecision::error(AuthReasonCode::InternalError, message),
        None,
    )
}

/// The real-time decision: a stored answer for a duplicate, else the ledger's inputs, the
/// pure decision, and one write transaction recording it.
async fn realtime(
    state: &AdminState,
    meta: &StripeEventMeta,
    auth: &StripeAuthorization,
    now: i64,
) -> Result<String, super::DbError> {
    // Always yields once, so a deadline of zero declines deterministically.
    tokio::task::yield_now().await;
    // A deadlock with a concurrent write (e.g. the sidecar's sync of the same intent) rolls
    // the decision back whole: decide again from fresh reads, within the deadline.
    let mut attempt = 1;
    loop {
        match realtime_once(state, meta, auth, now).await {
            Err(e) if e.is_transient() && attempt < REALTIME_ATTEMPTS => {
                tracing::warn!(event = %meta.id, authorization = %auth.id, attempt, error = %e,
                    "real-time authorization met a transient database error; deciding again");
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// How often a real-time decision is tried when the database reports a transient failure.
const REALTIME_ATTEMPTS: u32 = 3;

async fn realtime_once(
    state: &AdminState,
    meta: &StripeEventMeta,
    auth: &StripeAuthorization,
    now: i64,
) -> Result<String, super::DbError> {
    let db = &state.db;
    if let Some(stored) = db.stripe_event_seen(&meta.id).await? {
        return Ok(stored.unwrap_or_else(|| error_answer("the event was seen before")));
    }
    let inputs = db.auth_inputs(&auth.card, &auth.id).await?;
    let requested = auth.pending_amount.unwrap_or(auth.amount);
    let request = AuthRequest {
        amount: requested,
        currency: auth
            .pending_currency
            .clone()
            .unwrap_or_else(|| auth.currency.clone()),
        merchant_name: auth.merchant.name.clone(),
        merchant_url: auth.merchant.url.clone(),
        merchant_country: auth.merchant.country.clone(),
        merchant_category: auth.merchant.category.clone(),
        merchant_network_id: auth.merchant.network_id.clone(),
    };
    let decision = match &inputs.intent {
        Some(intent) => decide_authorization(intent, &inputs.history, &request, now),
        None => AuthDecision::error(
            AuthReasonCode::UnknownCard,
            "the card is not one roony issued, or its purchase is unknown",
        ),
    };
    let body = answer(
        &decision,
        inputs.owner.as_ref().map(|o| o.intent_id.as_str()),
    );
    match db
        .record_realtime_decision(meta, auth, &inputs, &decision, requested, &body, now)
        .await?
    {
        Some(stored) => Ok(stored),
        None => Ok(body),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(t: i64, body: &str, secret: &str) -> String {
        let sig =
            crate::sync::wire::hmac_sha256(secret.as_bytes(), format!("{t}.{body}").as_bytes());
        format!("t={t},v1={}", hex::encode(sig))
    }

    #[test]
    fn signatures() {
        let secrets = vec!["whsec_a".to_string(), "whsec_b".to_string()];
        let body = r#"{"id":"evt_1"}"#;
        let now = 1_800_000_000;
        assert!(
            verify_signature(
                Some(&header(now, body, "whsec_a")),
                body.as_bytes(),
                &secrets,
                now
            )
            .is_ok()
        );
        assert!(
            verify_signature(
                Some(&header(now - 300, body, "whsec_b")),
                body.as_bytes(),
                &secrets,
                now
            )
            .is_ok()
        );
        // Several v1 entries: any one may match; v0 is ignored.
        let h = format!(
            "t={now},v0=00,v1=deadbeef,{}",
            &header(now, body, "whsec_b")[13..]
        );
        assert!(
            verify_signature(Some(&h), body.as_bytes(), &secrets, now).is_ok(),
            "{h}"
        );
        let code = |h: Option<&str>, b: &str| {
            verify_signature(h, b.as_bytes(), &secrets, now)
                .err()
                .map(|e| e.detail.code)
        };
        assert_eq!(code(None, body).as_deref(), Some("missing_signature"));
        assert_eq!(
            code(Some("garbage"), body).as_deref(),
            Some("invalid_signature_header")
        );
        assert_eq!(
            code(Some("t=x,v1=ab"), body).as_deref(),
            Some("invalid_signature_header")
        );
        assert_eq!(
            code(Some(&format!("t={now}")), body).as_deref(),
            Some("invalid_signature_header")
        );
        assert_eq!(
            code(Some(&header(now, body, "whsec_c")), body).as_deref(),
            Some("invalid_signature")
        );
        assert_eq!(
            code(Some(&header(now, body, "whsec_a")), "{}").as_deref(),
            Some("invalid_signature")
        );
        assert_eq!(
            code(Some(&header(now - 301, body, "whsec_a")), body).as_deref(),
            Some("stale_signature")
        );
        assert_eq!(
            code(Some(&header(now + 301, body, "whsec_a")), body).as_deref(),
            Some("stale_signature")
        );
    }
}
