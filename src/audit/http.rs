//! Request auditing for the sidecar's HTTP app: one audit event per request (agent API,
//! `/openapi.json`, `/healthz`, MCP), written by [`AuditLog`]'s writer after the response
//! head is ready — never a body, never a key (the actor is the key id derived from the
//! bearer key, `crate::auth::key_id`).
//!
//! For `POST /mcp` the JSON-RPC request is peeked (at most [`MCP_PEEK_BYTES`], passed on
//! unchanged): the action is `mcp.<method>` (e.g. `mcp.tools/call`) and, for `tools/call`,
//! the target is the tool (`tool`, its name). Other requests are `http.request` with the
//! matched route as target. Also [`RequestId`] and the `x-request-id` helpers the control
//! plane shares.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{Value, json};

use super::Entry;
use super::log::AuditLog;

/// The request id of a request (from `x-request-id` when acceptable, else generated), put
/// in the request's extensions by the auditing middleware and returned as `x-request-id`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestId(pub String);

pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// Largest `/mcp` body peeked for the JSON-RPC method and tool.
pub const MCP_PEEK_BYTES: usize = 1024 * 1024;
/// JSON-RPC requests of one batch recorded at most.
const MAX_BATCH_METHODS: usize = 16;

/// The client's acceptable `x-request-id`, or a fresh `req_…` id.
pub fn request_id(headers: &HeaderMap) -> String {
    headers
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(super::accept_request_id)
        .unwrap_or_else(|| crate::service::ids::new_id("req"))
}

/// Sets `x-request-id` on a response.
pub fn set_request_id(resp: &mut Response, id: &str) {
    if let Ok(v) = HeaderValue::from_str(id) {
        resp.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
}

/// The key id of the bearer credential of a request (never the credential).
pub fn bearer_key_id(headers: &HeaderMap) -> Option<String> {
    crate::api::bearer(headers)
        .filter(|t| !t.is_empty())
        .map(crate::auth::key_id)
}

/// The path without its query string, scrubbed.
pub fn clean_path(req: &Request) -> String {
    super::scrub_str(req.uri().path())
}

/// `success` for 1xx–3xx, `failure` otherwise.
pub fn outcome(status: u16) -> &'static str {
    if status < 400 { "success" } else { "failure" }
}

/// Unix seconds now.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The JSON-RPC methods (and tool names) of an MCP request body.
fn rpc_calls(body: &[u8]) -> Vec<(String, Option<String>)> {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return Vec::new();
    };
    let one = |m: &Value| -> Option<(String, Option<String>)> {
        let method = m.get("method")?.as_str()?.to_string();
        let tool = (method == "tools/call")
            .then(|| m.pointer("/params/name").and_then(Value::as_str))
            .flatten()
            .map(|s| s.chars().take(128).collect());
        Some((method.chars().take(128).collect(), tool))
    };
    match &v {
        Value::Array(items) => items
            .iter()
            .filter_map(one)
            .take(MAX_BATCH_METHODS)
            .collect(),
        other => one(other).into_iter().collect(),
    }
}

/// Reads at most `limit` bytes of `body`: `(prefix, complete, body to pass on)`, the body
/// passed on being exactly the original bytes.
async fn peek(body: Body, limit: usize) -> (Bytes, bool, Body) {
    let mut stream = body.into_data_stream();
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut total = 0usize;
    loop {
        match stream.next().await {
            None => {
                let whole: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
                let whole = Bytes::from(whole);
                return (whole.clone(), true, Body::from(whole));
            }
            Some(Ok(chunk)) => {
                total += chunk.len();
                chunks.push(chunk);
                if total > limit {
                    let prefix = Bytes::new();
                    let head = futures_util::stream::iter(
                        chunks.into_iter().map(Ok::<Bytes, axum::Error>),
                    );
                    return (prefix, false, Body::from_stream(head.chain(stream)));
                }
            }
            Some(Err(e)) => {
                // Pass what was read, then the error, on to the handler.
                let head =
                    futures_util::stream::iter(chunks.into_iter().map(Ok::<Bytes, axum::Error>));
                let rest = futures_util::stream::once(async move { Err(e) });
                return (Bytes::new(), false, Body::from_stream(head.chain(rest)));
            }
        }
    }
}

/// What the sidecar's auditing middleware knows of a request.
struct Seen {
    actor: Option<String>,
    method: Method,
    route: String,
    path: String,
    rpc: Vec<(String, Option<String>)>,
    request_id: String,
}

impl Seen {
    fn entry(self, status: u16) -> Entry {
        let (actor_type, actor_id) = match self.actor {
            Some(id) => ("agent", id),
            None => ("anonymous", "anonymous".to_string()),
        };
        let mut details = json!({
            "method": self.method.as_str(),
            "route": self.route,
            "path": self.path,
            "status": status,
        });
        let (action, target_type, target_id) = match self.rpc.first() {
            Some((method, tool)) => {
                details["rpc"] = Value::Array(
                    self.rpc
                        .iter()
                        .map(|(m, t)| json!({"method": m, "tool": t}))
                        .collect(),
                );
                match tool {
                    Some(tool) => (format!("mcp.{method}"), "tool", tool.clone()),
                    None => (format!("mcp.{method}"), "route", self.route.clone()),
                }
            }
            None => ("http.request".to_string(), "route", self.route.clone()),
        };
        Entry {
            id: crate::service::ids::new_id("aud"),
            at: unix_now(),
            actor_type: actor_type.into(),
            actor_id,
            action,
            target_type: target_type.into(),
            target_id,
            outcome: outcome(status).into(),
            request_id: Some(self.request_id),
            details,
        }
    }
}

async fn audit_request(State(log): State<Arc<AuditLog>>, req: Request, next: Next) -> Response {
    let request_id = request_id(req.headers());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "(unmatched)".into());
    let path = clean_path(&req);
    let mut seen = Seen {
        actor: bearer_key_id(req.headers()),
        method: req.method().clone(),
        route,
        path,
        rpc: Vec::new(),
        request_id: request_id.clone(),
    };
    let (mut parts, body) = req.into_parts();
    let is_mcp = parts.method == Method::POST && parts.uri.path().starts_with("/mcp");
    let body = if is_mcp {
        let (prefix, complete, body) = peek(body, MCP_PEEK_BYTES).await;
        if complete {
            seen.rpc = rpc_calls(&prefix);
        }
        body
    } else {
        body
    };
    parts.extensions.insert(RequestId(request_id.clone()));
    let mut resp = next.run(Request::from_parts(parts, body)).await;
    set_request_id(&mut resp, &request_id);
    let entry = seen.entry(resp.status().as_u16());
    if let Err(e) = log.append(entry).await {
        tracing::error!(error = %e, "cannot audit a request");
    }
    resp
}

/// The auditing middleware's function.
pub type AuditFn = fn(State<Arc<AuditLog>>, Request, Next) -> AuditFuture;
/// The auditing layer ([`layer`]).
pub type AuditLayer =
    axum::middleware::FromFnLayer<AuditFn, Arc<AuditLog>, (State<Arc<AuditLog>>, Request)>;

/// The auditing middleware as a layer for an axum `Router` (apply it last, so that it sees
/// every response, rate-limited ones included).
pub fn layer(log: AuditLog) -> AuditLayer {
    axum::middleware::from_fn_with_state(Arc::new(log), audit_boxed as AuditFn)
}

/// The boxed future of the auditing middleware.
pub type AuditFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Response> + Send>>;

fn audit_boxed(state: State<Arc<AuditLog>>, req: Request, next: Next) -> AuditFuture {
    Box::pin(audit_request(state, req, next))
}

/// `app` with every request audited into `log`.
pub fn apply(app: axum::Router, log: AuditLog) -> axum::Router {
    app.layer(layer(log))
}

// ----- the sidecar process's log -------------------------------------------------------

static DATA_DIR: std::sync::Mutex<Option<std::path::PathBuf>> = std::sync::Mutex::new(None);
static LOGS: std::sync::Mutex<Vec<AuditLog>> = std::sync::Mutex::new(Vec::new());

/// Records the data directory of the sidecar this process runs (`sidecar::open_store`);
/// [`apply_process_log`] opens `audit.redb` there.
pub fn register_data_dir(data_dir: &std::path::Path) {
    if let Ok(mut d) = DATA_DIR.lock() {
        *d = Some(data_dir.to_path_buf());
    }
}

/// The audit log of the registered data directory (opened on first use), if any: for
/// components that are not axum apps (the egress proxy).
pub fn process_log() -> Option<AuditLog> {
    let dir = DATA_DIR.lock().ok().and_then(|d| d.clone())?;
    open_process_log(&dir).ok()
}

fn open_process_log(dir: &std::path::Path) -> Result<AuditLog, super::log::AuditLogError> {
    let path = dir.join(super::log::FILE_NAME);
    let mut logs = match LOGS.lock() {
        Ok(l) => l,
        Err(p) => p.into_inner(),
    };
    match logs.iter().find(|l| l.path() == path) {
        Some(l) => Ok(l.clone()),
        None => {
            let l = AuditLog::open(&path)?;
            logs.push(l.clone());
            Ok(l)
        }
    }
}

/// `app` audited into `audit.redb` of the registered data directory (the same log for
/// every app of that directory); unchanged when none was registered.
pub fn apply_process_log(app: axum::Router) -> Result<axum::Router, super::log::AuditLogError> {
    let dir = DATA_DIR.lock().ok().and_then(|d| d.clone());
    let Some(dir) = dir else {
        return Ok(app);
    };
    let path = dir.join(super::log::FILE_NAME);
    let mut logs = match LOGS.lock() {
        Ok(l) => l,
        Err(p) => p.into_inner(),
    };
    let log = match logs.iter().find(|l| l.path() == path) {
        Some(l) => l.clone(),
        None => {
            let l = AuditLog::open(&path)?;
            logs.push(l.clone());
            l
        }
    };
    Ok(apply(app, log))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpc_methods_and_tools() {
        let one = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"request_purchase","arguments":{}}}"#;
        assert_eq!(
            rpc_calls(one),
            vec![("tools/call".into(), Some("request_purchase".into()))]
        );
        let batch = br#"[{"jsonrpc":"2.0","id":1,"method":"initialize"},{"jsonrpc":"2.0","method":"notifications/initialized"}]"#;
        assert_eq!(rpc_calls(batch).len(), 2);
        assert!(rpc_calls(b"not json").is_empty());
    }

    #[tokio::test]
    async fn peek_passes_the_body_on_unchanged() {
        let big = vec![b'x'; 3000];
        let (prefix, complete, body) = peek(Body::from(big.clone()), 1000).await;
        assert!(!complete);
        assert!(prefix.is_empty());
        let back = axum::body::to_bytes(body, usize::MAX).await.unwrap();
        assert_eq!(back.as_ref(), big.as_slice());
        let (prefix, complete, body) = peek(Body::from("small"), 1000).await;
        assert!(complete);
        assert_eq!(prefix.as_ref(), b"small");
        let back = axum::body::to_bytes(body, usize::MAX).await.unwrap();
        assert_eq!(back.as_ref(), b"small");
    }
}
