//! `/_emulator/…`: the control API for tests and people (not part of Stripe).
//!
//! - `GET /_emulator/faults`, `POST /_emulator/faults` (replace the fault settings)
//! - `GET /_emulator/stats`
//! - `POST /_emulator/reset`

use std::sync::Arc;

use axum::extract::Request;
use axum::response::Response;
use http::{HeaderValue, Method, StatusCode};
use serde_json::{Value, json};

use super::faults::{FaultState, FaultsDoc};
use super::{Inner, json_response, to_body};

const MAX_BODY_BYTES: usize = 64 * 1024;

const ENDPOINTS: &[(&str, &str)] = &[
    ("/_emulator/faults", "GET, POST"),
    ("/_emulator/stats", "GET"),
    ("/_emulator/reset", "POST"),
];

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
    match (&parts.method, path) {
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
                    "unknown control endpoint {path}; available: /_emulator/faults, /_emulator/stats, /_emulator/reset"
                ),
            ),
        },
    }
}
