//! Webhook delivery: Stripe events signed with `Stripe-Signature` to one configured
//! endpoint, delivered asynchronously in creation order with retries, and the
//! synchronous real-time authorization request (`issuing_authorization.request`).
//!
//! Nothing here logs bodies: events embed `issuing.card` objects, which never carry
//! `number`/`cvc`, but they are still payment data.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::Inner;
use super::ids;
use super::state::AccountKey;

/// How long Stripe waits for a real-time authorization response.
pub const DEFAULT_REALTIME_TIMEOUT: Duration = Duration::from_secs(2);
/// `api_version` written into events.
pub const EVENT_API_VERSION: &str = "2023-08-16";
/// Delivery attempts per event (regular events).
pub const MAX_ATTEMPTS: u32 = 5;
/// Wait before the second attempt; doubles after each failure.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// Per-attempt timeout for regular events.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
const USER_AGENT: &str = "Stripe/1.0 (+https://stripe.com/docs/webhooks)";

/// The webhook endpoint: where events (and, with `realtime`, authorization requests)
/// go, and the secrets that sign them.
#[derive(Clone, PartialEq)]
pub struct WebhookConfig {
    /// Receives every event; also the real-time authorization endpoint when `realtime`.
    pub url: String,
    /// `whsec_…` signing secrets: one `v1=` signature each (secret rotation).
    pub secrets: Vec<String>,
    /// Send `issuing_authorization.request` synchronously and use the answer.
    pub realtime: bool,
    /// How long to wait for the real-time answer.
    pub realtime_timeout: Duration,
    /// What a timeout (or an invalid answer) decides: approve (`true`) or decline.
    pub timeout_approves: bool,
}

impl WebhookConfig {
    /// `url` for events and real-time requests; 2 s timeout that declines.
    pub fn new(url: impl Into<String>, secrets: Vec<String>) -> Self {
        Self {
            url: url.into(),
            secrets,
            realtime: true,
            realtime_timeout: DEFAULT_REALTIME_TIMEOUT,
            timeout_approves: false,
        }
    }

    /// The control API's view (secrets shortened).
    pub fn to_json(&self) -> Value {
        json!({
            "url": self.url,
            "secrets": self.secrets.iter().map(|s| redact(s)).collect::<Vec<_>>(),
            "realtime": self.realtime,
            "timeout_ms": u64::try_from(self.realtime_timeout.as_millis()).unwrap_or(u64::MAX),
            "timeout_approves": self.timeout_approves,
        })
    }
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("url", &self.url)
            .field("secrets", &self.secrets.len())
            .field("realtime", &self.realtime)
            .field("realtime_timeout", &self.realtime_timeout)
            .field("timeout_approves", &self.timeout_approves)
            .finish()
    }
}

fn redact(secret: &str) -> String {
    let tail: String = secret
        .chars()
        .rev()
        .take(4)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let head: String = secret.chars().take(6).collect();
    format!("{head}…{tail}")
}

/// `roony stripe-emulator` webhook flags.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct WebhookArgs {
    /// Deliver events (and real-time authorization requests) to this URL.
    #[arg(long, env = "ROONY_EMULATOR_WEBHOOK_URL")]
    pub webhook_url: Option<String>,
    /// Signing secret (`whsec_…`); repeat for several `v1=` signatures (rotation).
    #[arg(long = "webhook-secret", hide_env_values = true)]
    pub webhook_secret: Vec<String>,
    /// How long to wait for the real-time authorization answer, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub realtime_timeout_ms: u64,
    /// Approve when the real-time answer times out or is invalid (default: decline).
    #[arg(long)]
    pub realtime_timeout_approves: bool,
    /// Send only regular events: no real-time requests, authorizations that pass the
    /// checks are approved.
    #[arg(long)]
    pub no_realtime: bool,
}

impl WebhookArgs {
    pub fn config(&self) -> Option<WebhookConfig> {
        self.webhook_url.as_ref().map(|url| WebhookConfig {
            url: url.clone(),
            secrets: self.webhook_secret.clone(),
            realtime: !self.no_realtime,
            realtime_timeout: Duration::from_millis(self.realtime_timeout_ms),
            timeout_approves: self.realtime_timeout_approves,
        })
    }
}

/// `POST /_emulator/webhooks` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookDoc {
    pub url: String,
    #[serde(default)]
    pub secrets: Vec<String>,
    #[serde(default = "yes")]
    pub realtime: bool,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    #[serde(default)]
    pub timeout_approves: bool,
}

fn yes() -> bool {
    true
}

impl WebhookDoc {
    pub fn into_config(self) -> Result<WebhookConfig, String> {
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err("url must start with http:// or https://".into());
        }
        if self.secrets.iter().any(String::is_empty) {
            return Err("secrets must not be empty strings".into());
        }
        Ok(WebhookConfig {
            url: self.url,
            secrets: self.secrets,
            realtime: self.realtime,
            realtime_timeout: self
                .timeout_ms
                .map(Duration::from_millis)
                .unwrap_or(DEFAULT_REALTIME_TIMEOUT),
            timeout_approves: self.timeout_approves,
        })
    }
}

/// `Stripe-Signature: t=<t>,v1=<hex>[,v1=<hex>…]`: HMAC-SHA256 of `"{t}.{body}"` keyed
/// by each secret's UTF-8 bytes.
pub fn signature_header(secrets: &[String], t: i64, body: &[u8]) -> String {
    let mut payload = format!("{t}.").into_bytes();
    payload.extend_from_slice(body);
    let mut header = format!("t={t}");
    for secret in secrets {
        let mac = crate::sync::wire::hmac_sha256(secret.as_bytes(), &payload);
        header.push_str(",v1=");
        header.push_str(&hex::encode(mac));
    }
    header
}

/// Where an event's delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Queued or being retried.
    Pending,
    Delivered,
    /// Every attempt failed (or the real-time answer was unusable).
    Failed,
    /// No endpoint was configured when it was created.
    NotSent,
}

impl Delivery {
    pub fn as_str(self) -> &'static str {
        match self {
            Delivery::Pending => "pending",
            Delivery::Delivered => "delivered",
            Delivery::Failed => "failed",
            Delivery::NotSent => "not_sent",
        }
    }
}

/// One event and its delivery log.
#[derive(Debug, Clone)]
pub struct EventRecord {
    pub id: String,
    pub kind: String,
    pub account: AccountKey,
    pub created: i64,
    /// The exact bytes sent (and signed).
    pub body: Bytes,
    /// `issuing_authorization.request`, sent synchronously.
    pub realtime: bool,
    pub delivery: Delivery,
    pub attempts: u32,
    /// Last HTTP status or transport error.
    pub last_response: Option<String>,
}

impl EventRecord {
    pub fn to_json(&self, with_body: bool) -> Value {
        let mut v = json!({
            "id": self.id,
            "type": self.kind,
            "account": match &self.account {
                AccountKey::Platform => Value::Null,
                AccountKey::Connected(a) => json!(a),
            },
            "created": self.created,
            "realtime": self.realtime,
            "status": self.delivery.as_str(),
            "delivered": self.delivery == Delivery::Delivered,
            "attempts": self.attempts,
            "last_response": self.last_response,
        });
        if with_body && let Value::Object(map) = &mut v {
            map.insert(
                "event".into(),
                serde_json::from_slice(&self.body).unwrap_or(Value::Null),
            );
        }
        v
    }
}

/// The event envelope (stripe.md §4.3).
#[allow(clippy::too_many_arguments)]
pub fn envelope(
    id: &str,
    kind: &str,
    account: &AccountKey,
    created: i64,
    object: Value,
    previous_attributes: Option<Value>,
    pending_webhooks: u32,
    request_id: Option<&str>,
    idempotency_key: Option<&str>,
) -> Value {
    let mut data = Map::new();
    data.insert("object".into(), object);
    if let Some(prev) = previous_attributes {
        data.insert("previous_attributes".into(), prev);
    }
    let mut event = json!({
        "id": id,
        "object": "event",
        "api_version": EVENT_API_VERSION,
        "created": created,
        "data": data,
        "livemode": false,
        "pending_webhooks": pending_webhooks,
        "request": {"id": request_id, "idempotency_key": idempotency_key},
        "type": kind,
    });
    if let (AccountKey::Connected(acct), Value::Object(map)) = (account, &mut event) {
        map.insert("account".into(), json!(acct));
    }
    event
}

/// Top-level keys whose values differ, with their old values (`previous_attributes`).
pub fn previous_attributes(before: &Value, after: &Value) -> Value {
    let (Value::Object(b), Value::Object(a)) = (before, after) else {
        return json!({});
    };
    let changed: Map<String, Value> = b
        .iter()
        .filter(|(k, v)| a.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Value::Object(changed)
}

/// Hand queued event ids to the delivery task (started on first use).
pub(super) fn dispatch(inner: &Arc<Inner>, ids: Vec<String>) {
    if ids.is_empty() {
        return;
    }
    let mut slot = inner
        .delivery
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for id in ids {
        let pending = match slot.as_ref() {
            Some(tx) => tx.send(id).err().map(|e| e.0),
            None => Some(id),
        };
        if let Some(id) = pending {
            // No task yet (or it ended with its runtime): start one.
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(worker(Arc::downgrade(inner), rx));
            let _ = tx.send(id);
            *slot = Some(tx);
        }
    }
}

async fn worker(inner: Weak<Inner>, mut rx: tokio::sync::mpsc::UnboundedReceiver<String>) {
    while let Some(id) = rx.recv().await {
        let Some(inner) = inner.upgrade() else {
            return;
        };
        deliver(&inner, &id).await;
    }
}

/// Deliver one regular event, retrying with backoff.
async fn deliver(inner: &Arc<Inner>, id: &str) {
    let mut backoff = FIRST_BACKOFF;
    for attempt in 1..=MAX_ATTEMPTS {
        let (config, body) = {
            let st = inner.lock();
            let Some(record) = st.event(id) else {
                return; // reset since
            };
            (st.webhook.clone(), record.body.clone())
        };
        let Some(config) = config else {
            inner
                .lock()
                .update_event(id, |r| r.delivery = Delivery::NotSent);
            return;
        };
        let header = signature_header(&config.secrets, ids::now_unix(), &body);
        let sent = inner
            .http
            .post(&config.url)
            .header(
                http::header::CONTENT_TYPE,
                "application/json; charset=utf-8",
            )
            .header(http::header::USER_AGENT, USER_AGENT)
            .header("stripe-signature", header)
            .timeout(ATTEMPT_TIMEOUT)
            .body(body)
            .send()
            .await;
        let (ok, response) = match sent {
            Ok(resp) => (
                resp.status().is_success(),
                resp.status().as_u16().to_string(),
            ),
            Err(e) => (false, transport_error(&e)),
        };
        tracing::debug!(event = id, attempt, ok, "stripe emulator webhook delivery");
        inner.lock().update_event(id, |r| {
            r.attempts += 1;
            r.last_response = Some(response.clone());
            r.delivery = if ok {
                Delivery::Delivered
            } else if attempt == MAX_ATTEMPTS {
                Delivery::Failed
            } else {
                Delivery::Pending
            };
        });
        if ok {
            return;
        }
        if attempt < MAX_ATTEMPTS {
            tokio::time::sleep(backoff).await;
            backoff *= 2;
        }
    }
}

fn transport_error(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timeout".into()
    } else if e.is_connect() {
        "connection failed".into()
    } else {
        "request failed".into()
    }
}

/// What the real-time endpoint decided.
#[derive(Debug, Clone, PartialEq)]
pub struct RealtimeDecision {
    pub approved: bool,
    /// `request_history[].reason`.
    pub reason: &'static str,
    pub reason_message: Option<String>,
    /// Approved amount when the request was amount-controllable.
    pub amount: Option<i64>,
    pub metadata: Option<BTreeMap<String, String>>,
}

impl RealtimeDecision {
    fn fallback(config: &WebhookConfig, reason: &'static str, message: Option<String>) -> Self {
        Self {
            approved: config.timeout_approves,
            reason,
            reason_message: message,
            amount: None,
            metadata: None,
        }
    }
}

/// POST the signed `issuing_authorization.request` and wait for the answer.
pub(super) async fn realtime_request(
    inner: &Arc<Inner>,
    config: &WebhookConfig,
    event_id: &str,
    body: Bytes,
    amount_controllable: bool,
) -> RealtimeDecision {
    let header = signature_header(&config.secrets, ids::now_unix(), &body);
    let call = async {
        let resp = inner
            .http
            .post(&config.url)
            .header(
                http::header::CONTENT_TYPE,
                "application/json; charset=utf-8",
            )
            .header(http::header::USER_AGENT, USER_AGENT)
            .header("stripe-signature", header)
            .body(body)
            .send()
            .await?;
        let status = resp.status();
        let version = resp.headers().contains_key("stripe-version");
        let bytes = resp.bytes().await?;
        Ok::<_, reqwest::Error>((status, version, bytes))
    };
    let outcome = tokio::time::timeout(config.realtime_timeout, call).await;
    let (decision, response) = match outcome {
        Err(_) => (
            RealtimeDecision::fallback(config, "webhook_timeout", None),
            "timeout".to_owned(),
        ),
        Ok(Err(e)) => (
            RealtimeDecision::fallback(
                config,
                "webhook_error",
                Some(format!(
                    "The webhook endpoint could not be reached ({}).",
                    transport_error(&e)
                )),
            ),
            transport_error(&e),
        ),
        Ok(Ok((status, has_version, bytes))) => (
            parse_answer(config, status, has_version, &bytes, amount_controllable),
            status.as_u16().to_string(),
        ),
    };
    let delivered = decision.reason == "webhook_approved" || decision.reason == "webhook_declined";
    inner.lock().update_event(event_id, |r| {
        r.attempts += 1;
        r.last_response = Some(response.clone());
        r.delivery = if delivered {
            Delivery::Delivered
        } else {
            Delivery::Failed
        };
    });
    decision
}

fn parse_answer(
    config: &WebhookConfig,
    status: http::StatusCode,
    has_version: bool,
    bytes: &[u8],
    amount_controllable: bool,
) -> RealtimeDecision {
    let error = |m: String| RealtimeDecision::fallback(config, "webhook_error", Some(m));
    if status != http::StatusCode::OK {
        return error(format!(
            "The webhook responded with HTTP status {}; a direct response must be 200.",
            status.as_u16()
        ));
    }
    if !has_version {
        return error(
            "The webhook response is missing the Stripe-Version header, which is required for a direct response."
                .into(),
        );
    }
    let Ok(Value::Object(answer)) = serde_json::from_slice::<Value>(bytes) else {
        return error("The webhook response body is not a JSON object.".into());
    };
    let Some(approved) = answer.get("approved").and_then(Value::as_bool) else {
        return error("The webhook response is missing the required boolean `approved`.".into());
    };
    let amount = match answer.get("amount") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_i64() {
            Some(n) if n > 0 && amount_controllable => Some(n),
            Some(n) if n > 0 => {
                return error(
                    "`amount` may only be set when pending_request.is_amount_controllable is true."
                        .into(),
                );
            }
            _ => return error("`amount` must be a positive integer.".into()),
        },
    };
    let metadata = match answer.get("metadata") {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => {
            let mut out = BTreeMap::new();
            for (k, v) in m {
                let Some(s) = v.as_str() else {
                    return error(format!("metadata[{k}] must be a string."));
                };
                out.insert(k.clone(), s.to_owned());
            }
            Some(out)
        }
        Some(_) => return error("`metadata` must be an object of strings.".into()),
    };
    RealtimeDecision {
        approved,
        reason: if approved {
            "webhook_approved"
        } else {
            "webhook_declined"
        },
        reason_message: None,
        amount,
        metadata,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_reference_hmac() {
        let h = signature_header(&["whsec_a".into(), "whsec_b".into()], 1_700_000_000, b"{}");
        let parts: Vec<&str> = h.split(',').collect();
        assert_eq!(parts[0], "t=1700000000");
        assert_eq!(parts.len(), 3);
        let expect = hex::encode(crate::sync::wire::hmac_sha256(b"whsec_b", b"1700000000.{}"));
        assert_eq!(parts[2], format!("v1={expect}"));
    }

    #[test]
    fn diff_keeps_old_values() {
        let prev = previous_attributes(
            &json!({"a": 1, "b": 2, "c": [1]}),
            &json!({"a": 1, "b": 3, "c": []}),
        );
        assert_eq!(prev, json!({"b": 2, "c": [1]}));
    }

    #[test]
    fn answers() {
        let cfg = WebhookConfig::new("http://x", vec![]);
        let ok = http::StatusCode::OK;
        let d = parse_answer(
            &cfg,
            ok,
            true,
            br#"{"approved":true,"metadata":{"r":"x"}}"#,
            false,
        );
        assert!(d.approved);
        assert_eq!(d.reason, "webhook_approved");
        let d = parse_answer(&cfg, ok, false, br#"{"approved":true}"#, false);
        assert_eq!((d.approved, d.reason), (false, "webhook_error"));
        let d = parse_answer(&cfg, ok, true, b"nope", false);
        assert_eq!(d.reason, "webhook_error");
        let d = parse_answer(&cfg, ok, true, br#"{"approved":true,"amount":5}"#, true);
        assert_eq!(d.amount, Some(5));
    }
}
