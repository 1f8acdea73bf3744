//! `/_emulator/…`: the control API for tests and people (not part of Stripe).
//!
//! - `GET /_emulator/faults`, `POST /_emulator/faults` (replace the fault settings)
//! - `GET /_emulator/stats`
//! - `POST /_emulator/reset`
//! - `GET|POST|DELETE /_emulator/webhooks` (the webhook endpoint)
//! - `GET /_emulator/events`, `GET /_emulator/events/:id`,
//!   `POST /_emulator/events/:id/resend`

use std::sync::Arc;

use axum::extract::Request;
use axum::response::Response;
use http::{HeaderValue, Method, StatusCode};
use serde_json::{Value, json};

use super::faults::{FaultState, FaultsDoc};
use super::webhooks::{self, Delivery, WebhookDoc};
use super::{Inner, json_response, to_body};

const MAX_BODY_BYTES: usize = 64 * 1024;

const ENDPOINTS: &[(&str, &str)] = &[
    ("/_emulator/faults", "GET, POST"),
    ("/_emulator/stats", "GET"),
    ("/_emulator/reset", "POST"),
    ("/_emulator/webhooks", "GET, POST, DELETE"),
    ("/_emulator/events", "GET"),
];

fn webhook_json(inner: &Inner) -> Value {
    match &inner.lock().webhook {
        Some(w) => {
            let mut v = w.to_json();
            if let Value::Object(m) = &mut v {
                m.insert("configured".into(), json!(true));
            }
            v
        }
        None => json!({"configured": false}),
    }
}

async fn read_json(body: axum::body::Body) -> Result<bytes::Bytes, Response> {
    let Ok(bytes) = axum::body::to_bytes(body, MAX_BODY_BYTES).await else {
        return Err(error(StatusCode::BAD_REQUEST, "request body too large"));
    };
    Ok(if bytes.iter().all(u8::is_ascii_whitespace) {
        bytes::Bytes::from_static(b"{}")
    } else {
        bytes
    })
}

async fn events(inner: &Arc<Inner>, method: &Method, path: &str, query: &str) -> Option<Response> {
    let rest = path.strip_prefix("/_emulator/events")?;
    let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    match (method, segments.as_slice()) {
        (&Method::GET, []) => {
            let wanted: Vec<String> = query
                .split('&')
                .filter_map(|kv| kv.strip_prefix("type="))
                .map(|t| t.replace("%2E", ".").replace("%2e", "."))
                .collect();
            let st = inner.lock();
            let data: Vec<Value> = st
                .events
                .iter()
                .filter(|e| wanted.is_empty() || wanted.contains(&e.kind))
                .map(|e| e.to_json(true))
                .collect();
            Some(ok(&json!({"data": data})))
        }
        (&Method::GET, [id]) => Some(match inner.lock().event(id) {
            Some(e) => ok(&e.to_json(true)),
            None => error(StatusCode::NOT_FOUND, format!("no event {id}")),
        }),
        (&Method::POST, [id, "resend"]) => {
            let known = {
                let mut st = inner.lock();
                let configured = st.webhook.is_some();
                let known = st.event(id).is_some_and(|e| !e.realtime);
                if known && configured {
                    st.update_event(id, |e| e.delivery = Delivery::Pending);
                }
                known.then_some(configured)
            };
            Some(match known {
                None => error(
                    StatusCode::NOT_FOUND,
                    format!("no regular event {id} (real-time requests cannot be resent)"),
                ),
                Some(false) => error(StatusCode::CONFLICT, "no webhook endpoint is configured"),
                Some(true) => {
                    webhooks::dispatch(inner, vec![(*id).to_owned()]);
                    ok(&json!({"resent": id}))
                }
            })
        }
        _ => None,
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let body = json!({"error": {"type": "invalid_request_error", "message": message.into()}});
    json_response(status, to_body(&body))
}

fn ok(value: &Value) -> Response {
    json_response(StatusCode::OK, to_body(value))
}

fn faults_json(doc: &FaultsDoc) -> Value {
    serde_json::to_value(doc).unwrap_or_else(|_| json!({}))
}

pub(super) async fn handle(inner: &Arc<Inner>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path();
    if let Some(r) = events(inner, &parts.method, path, parts.uri.query().unwrap_or("")).await {
        return r;
    }
    match (&parts.method, path) {
        (&Method::GET, "/_emulator/webhooks") => ok(&webhook_json(inner)),
        (&Method::DELETE, "/_emulator/webhooks") => {
            inner.lock().webhook = None;
            ok(&webhook_json(inner))
        }
        (&Method::POST, "/_emulator/webhooks") => {
            let bytes = match read_json(body).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            let doc: WebhookDoc = match serde_json::from_slice(&bytes) {
                Ok(doc) => doc,
                Err(e) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!("invalid webhook document: {e}"),
                    );
                }
            };
            match doc.into_config() {
                Ok(config) => {
                    tracing::info!(
                        realtime = config.realtime,
                        "stripe emulator webhook endpoint set"
                    );
                    inner.lock().webhook = Some(config);
                    ok(&webhook_json(inner))
                }
                Err(e) => error(StatusCode::BAD_REQUEST, e),
            }
        }
        (&Method::GET, "/_emulator/faults") => ok(&faults_json(&inner.lock().faults.to_doc())),
        (&Method::POST, "/_emulator/faults") => {
            let Ok(bytes) = axum::body::to_bytes(body, MAX_BODY_BYTES).await else {
                return error(StatusCode::BAD_REQUEST, "request body too large");
            };
            let bytes = if bytes.iter().all(u8::is_ascii_whitespace) {
                bytes::Bytes::from_static(b"{}")
            } else {
                bytes
            };
            let doc: FaultsDoc = match serde_json::from_slice(&bytes) {
                Ok(doc) => doc,
                Err(e) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!("invalid fault document: {e}"),
                    );
                }
            };
            match FaultState::from_doc(doc) {
                Ok(faults) => {
                    let doc = faults.to_doc();
                    inner.lock().faults = faults;
                    tracing::info!(
                        rate_429 = doc.rate_429,
                        rate_500 = doc.rate_500,
                        latency_ms = doc.latency_ms,
                        fail_next = doc.fail_next.len(),
                        "stripe emulator faults replaced"
                    );
                    ok(&faults_json(&doc))
                }
                Err(e) => error(StatusCode::BAD_REQUEST, e.to_string()),
            }
        }
        (&Method::GET, "/_emulator/stats") => ok(&inner.lock().stats_json()),
        (&Method::POST, "/_emulator/reset") => {
            inner.reset();
            tracing::info!("stripe emulator reset");
            ok(&json!({"reset": true}))
        }
        _ => match ENDPOINTS.iter().find(|(p, _)| *p == path) {
            Some((_, allow)) => {
                let mut r = error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    format!(
                        "method {} not allowed on {path}; allowed: {allow}",
                        parts.method
                    ),
                );
                r.headers_mut()
                    .insert(http::header::ALLOW, HeaderValue::from_static(allow));
                r
            }
            None => error(
                StatusCode::NOT_FOUND,
                format!(
                    "unknown control endpoint {path}; available: /_emulator/faults, /_emulator/stats, /_emulator/reset, /_emulator/webhooks, /_emulator/events"
                ),
            ),
        },
    }
}
