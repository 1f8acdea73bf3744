//! `roony mcp`: MCP over stdio for clients that launch a command (Claude Desktop, Claude
//! Code). It forwards every JSON-RPC message to the running sidecar's `/mcp` endpoint with
//! the agent's key, and writes what comes back (JSON or server-sent events) to stdout, so
//! one process — the sidecar — owns the budgets and the confirmation state. Both protocol
//! eras pass through: 2025-11-25 sessions (`Mcp-Session-Id`, elicitation requests on the
//! response stream) and 2026-07-28 stateless requests (per-request `MCP-Protocol-Version`,
//! `Mcp-Method`, `Mcp-Name`).

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use futures_util::StreamExt;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::sync::{Mutex, mpsc};

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error(
        "ROONY_AGENT_KEY is not set: give the agent key the sidecar issued (roony dev prints one)"
    )]
    MissingKey,
    #[error(
        "cannot reach the Roony sidecar at {url} ({reason}); start it with `roony sidecar` or `roony dev`, or set ROONY_SIDECAR_URL"
    )]
    Unreachable { url: String, reason: String },
    #[error("the sidecar at {0} rejected the agent key in ROONY_AGENT_KEY")]
    KeyRejected(String),
    #[error("stdio: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Default)]
struct Session {
    id: Option<String>,
    protocol_version: Option<String>,
}

struct Bridge {
    client: reqwest::Client,
    endpoint: String,
    key: String,
    session: Mutex<Session>,
    out: mpsc::UnboundedSender<String>,
}

/// Checks the key and the sidecar, then bridges stdin/stdout until stdin closes.
pub async fn run(sidecar_url: &str, key: Option<String>) -> Result<(), BridgeError> {
    let key = key
        .filter(|k| !k.trim().is_empty())
        .ok_or(BridgeError::MissingKey)?;
    let base = sidecar_url.trim_end_matches('/').to_string();
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| BridgeError::Unreachable {
            url: base.clone(),
            reason: e.to_string(),
        })?;
    preflight(&client, &base, &key).await?;

    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let writer = tokio::spawn(async move {
        let mut stdout = tokio::io::stdout();
        while let Some(line) = rx.recv().await {
            if stdout.write_all(line.as_bytes()).await.is_err()
                || stdout.write_all(b"\n").await.is_err()
                || stdout.flush().await.is_err()
            {
                break;
            }
        }
    });
    let bridge = Arc::new(Bridge {
        client,
        endpoint: format!("{base}/mcp"),
        key,
        session: Mutex::new(Session::default()),
        out: tx,
    });

    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut in_flight = tokio::task::JoinSet::new();
    while let Some(line) = lines.next_line().await? {
        if line.trim().is_empty() {
            continue;
        }
        let message: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => {
                bridge.reply_error(&Value::Null, -32700, &format!("parse error: {e}"));
                continue;
            }
        };
        let is_request = message.get("method").is_some() && message.get("id").is_some();
        if is_request {
            // Requests run concurrently: a tool call may wait for the user while the client
            // sends the answer to an elicitation as another message.
            let b = bridge.clone();
            in_flight.spawn(async move { b.forward(message).await });
        } else {
            // Notifications and responses are quick (202) and keep their order.
            bridge.forward(message).await;
        }
        while in_flight.try_join_next().is_some() {}
    }
    // stdin closed: let requests in flight finish, then end the session.
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        while in_flight.join_next().await.is_some() {}
    })
    .await;
    bridge.close().await;
    drop(bridge);
    let _ = writer.await;
    Ok(())
}

async fn preflight(client: &reqwest::Client, base: &str, key: &str) -> Result<(), BridgeError> {
    let unreachable = |reason: String| BridgeError::Unreachable {
        url: base.to_string(),
        reason,
    };
    let health = client
        .get(format!("{base}/healthz"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    if !health.status().is_success() {
        return Err(unreachable(format!(
            "health check answered {}",
            health.status()
        )));
    }
    let check = client
        .get(format!("{base}/api/v1/budget"))
        .bearer_auth(key)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    if check.status() == reqwest::StatusCode::UNAUTHORIZED {
        return Err(BridgeError::KeyRejected(base.to_string()));
    }
    Ok(())
}

/// Header-safe form of a value (SEP-2243 encoding): plain when it is visible ASCII,
/// otherwise `=?base64?…?=`.
fn header_value(value: &str) -> String {
    let plain = !value.is_empty()
        && value.bytes().all(|b| (0x21..0x7f).contains(&b))
        && !value.starts_with("=?base64?");
    if plain {
        value.to_string()
    } else {
        format!(
            "=?base64?{}?=",
            base64::engine::general_purpose::STANDARD.encode(value.as_bytes())
        )
    }
}

impl Bridge {
    fn reply_error(&self, id: &Value, code: i64, message: &str) {
        if id.is_null() && code != -32700 {
            return;
        }
        let err = serde_json::json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}});
        let _ = self.out.send(err.to_string());
    }

    async fn forward(&self, message: Value) {
        let id = message.get("id").cloned().unwrap_or(Value::Null);
        let method = message
            .get("method")
            .and_then(Value::as_str)
            .map(str::to_string);
        let is_request = method.is_some() && !id.is_null();
        let meta_version = message
            .pointer("/params/_meta/io.modelcontextprotocol~1protocolVersion")
            .and_then(Value::as_str)
            .map(str::to_string);

        let mut req = self
            .client
            .post(&self.endpoint)
            .bearer_auth(&self.key)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .body(message.to_string());
        {
            let session = self.session.lock().await;
            if let Some(sid) = &session.id {
                req = req.header("mcp-session-id", sid);
            }
            let version = meta_version.or_else(|| session.protocol_version.clone());
            if method.as_deref() != Some("initialize")
                && let Some(v) = version
            {
                req = req.header("mcp-protocol-version", v);
            }
        }
        if let Some(m) = &method {
            req = req.header("mcp-method", m.as_str());
            let name = match m.as_str() {
                "tools/call" | "prompts/get" => message.pointer("/params/name"),
                "resources/read" | "resources/subscribe" | "resources/unsubscribe" => {
                    message.pointer("/params/uri")
                }
                _ => None,
            };
            if let Some(n) = name.and_then(Value::as_str) {
                req = req.header("mcp-name", header_value(n));
            }
        }

        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                if is_request {
                    self.reply_error(&id, -32603, &format!("cannot reach the Roony sidecar: {e}"));
                }
                return;
            }
        };
        if let Some(sid) = resp
            .headers()
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
        {
            self.session.lock().await.id = Some(sid.to_string());
        }
        let status = resp.status();
        if status == reqwest::StatusCode::ACCEPTED {
            return;
        }
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        if content_type.starts_with("text/event-stream") {
            self.relay_sse(resp, method.as_deref() == Some("initialize"))
                .await;
        } else {
            let body = resp.text().await.unwrap_or_default();
            match serde_json::from_str::<Value>(&body) {
                Ok(v) if v.get("jsonrpc").is_some() => {
                    self.emit(v, method.as_deref() == Some("initialize")).await
                }
                _ if is_request => self.reply_error(
                    &id,
                    -32603,
                    &format!(
                        "the Roony sidecar answered HTTP {status}: {}",
                        body.chars().take(300).collect::<String>()
                    ),
                ),
                _ => {}
            }
        }
    }

    async fn emit(&self, message: Value, initialize: bool) {
        if initialize
            && let Some(v) = message
                .pointer("/result/protocolVersion")
                .and_then(Value::as_str)
        {
            self.session.lock().await.protocol_version = Some(v.to_string());
        }
        let _ = self.out.send(message.to_string());
    }

    async fn relay_sse(&self, resp: reqwest::Response, initialize: bool) {
        let mut stream = resp.bytes_stream();
        let mut buffer = String::new();
        let mut data = String::new();
        while let Some(chunk) = stream.next().await {
            let Ok(chunk) = chunk else { break };
            buffer.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(pos) = buffer.find('\n') {
                let line: String = buffer.drain(..=pos).collect();
                let line = line.trim_end_matches(['\n', '\r']);
                if line.is_empty() {
                    if !data.is_empty() {
                        if let Ok(v) = serde_json::from_str::<Value>(&data) {
                            self.emit(v, initialize).await;
                        }
                        data.clear();
                    }
                } else if let Some(rest) = line.strip_prefix("data:") {
                    if !data.is_empty() {
                        data.push('\n');
                    }
                    data.push_str(rest.strip_prefix(' ').unwrap_or(rest));
                }
            }
        }
        if !data.is_empty()
            && let Ok(v) = serde_json::from_str::<Value>(&data)
        {
            self.emit(v, initialize).await;
        }
    }

    async fn close(&self) {
        let sid = self.session.lock().await.id.clone();
        if let Some(sid) = sid {
            let _ = self
                .client
                .delete(&self.endpoint)
                .bearer_auth(&self.key)
                .header("mcp-session-id", sid)
                .timeout(Duration::from_secs(5))
                .send()
                .await;
        }
    }
}
