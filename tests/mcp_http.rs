#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]
//! The MCP endpoint's HTTP guard: bearer key required, Host values configurable for
//! container deployments (DNS-rebinding protection stays on).

mod common;

use common::*;
use roony::mcp::http::McpHttpConfig;
use roony::store::Store;

async fn serve(config: McpHttpConfig) -> (String, String, EmulatorHandle, tempfile::TempDir) {
    let emu = start_emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("sidecar.redb")).unwrap();
    let svc = service(store, &emu, TestClock::new());
    let key = svc
        .create_agent("agt_test", "t", demo_policy(), None)
        .unwrap();
    let app = roony::sidecar::app(svc, config).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(roony::api::serve(listener, app, std::future::pending()));
    (url, key, emu, dir)
}

fn list_tools() -> serde_json::Value {
    serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": {"name": "t", "version": "0"}}})
}

async fn post(url: &str, key: Option<&str>, host: Option<&str>) -> u16 {
    let mut r = reqwest::Client::new()
        .post(format!("{url}/mcp"))
        .header("accept", "application/json, text/event-stream")
        .json(&list_tools());
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    if let Some(h) = host {
        r = r.header("host", h);
    }
    r.send().await.unwrap().status().as_u16()
}

#[tokio::test]
async fn default_hosts_are_loopback_only() {
    let (url, key, _emu, _dir) = serve(McpHttpConfig::default()).await;
    assert_eq!(post(&url, None, None).await, 401);
    assert_eq!(
        post(&url, Some("wrong-key-0123456789abcdef"), None).await,
        401
    );
    assert_eq!(post(&url, Some(&key), None).await, 200);
    assert_eq!(
        post(&url, Some(&key), Some("roony-sidecar:8787")).await,
        403
    );
}

#[tokio::test]
async fn allowed_hosts_are_configurable() {
    let config = McpHttpConfig {
        allowed_hosts: vec!["roony-sidecar".into()],
    };
    let (url, key, _emu, _dir) = serve(config).await;
    assert_eq!(
        post(&url, Some(&key), Some("roony-sidecar:8787")).await,
        200
    );
    assert_eq!(post(&url, Some(&key), Some("evil.example")).await, 403);
    // The key is checked before anything else, whatever the host.
    assert_eq!(post(&url, None, Some("roony-sidecar:8787")).await, 401);
}
