#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]
//! Rate limiting of the agent-facing endpoints over real HTTP: a token bucket per agent key
//! (OpenAPI and MCP share it), one per source address for requests without a valid key, a
//! `429` with `Retry-After` and the stable code `rate_limited`, and traffic that succeeds
//! again once `Retry-After` has passed.
//!
//! Rates are slow (one token every 2 s) so the bursts below are exact even on a busy machine.

mod common;

use std::time::Duration;

use common::*;
use roony::ratelimit::{Limit, RateLimitConfig};
use roony::store::Store;
use serde_json::Value;

struct Server {
    url: String,
    keys: Vec<String>,
    http: reqwest::Client,
    _emu: EmulatorHandle,
    _dir: tempfile::TempDir,
}

async fn serve(limits: RateLimitConfig) -> Server {
    let emu = start_emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("sidecar.redb")).unwrap();
    let svc = service(store, &emu, TestClock::new());
    let keys = ["agt_a", "agt_b"]
        .iter()
        .map(|id| svc.create_agent(id, id, demo_policy(), None).unwrap())
        .collect();
    let app = roony::sidecar::app_with_limits(svc, Default::default(), limits).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(roony::api::serve(listener, app, std::future::pending()));
    Server {
        url,
        keys,
        http: reqwest::Client::new(),
        _emu: emu,
        _dir: dir,
    }
}

fn limits(agent_burst: u32, address_burst: u32) -> RateLimitConfig {
    RateLimitConfig {
        agent: Limit::new(0.5, agent_burst),
        unauthenticated: Limit::new(0.5, address_burst),
    }
}

struct Answer {
    status: u16,
    retry_after: Option<u64>,
    body: Value,
}

impl Server {
    async fn get(&self, path: &str, key: Option<&str>) -> Answer {
        let mut r = self.http.get(format!("{}{path}", self.url));
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        answer(r.send().await.unwrap()).await
    }

    async fn mcp(&self, key: &str) -> Answer {
        let r = self
            .http
            .post(format!("{}/mcp", self.url))
            .bearer_auth(key)
            .header("accept", "application/json, text/event-stream")
            .json(
                &serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                "protocolVersion": "2025-11-25", "capabilities": {},
                "clientInfo": {"name": "t", "version": "0"}}}),
            )
            .send()
            .await
            .unwrap();
        answer(r).await
    }
}

async fn answer(r: reqwest::Response) -> Answer {
    let status = r.status().as_u16();
    let retry_after = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().parse().unwrap());
    let text = r.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Answer {
        status,
        retry_after,
        body,
    }
}

fn assert_limited(a: &Answer, who: &str) {
    assert_eq!(a.status, 429, "{}", a.body);
    assert_eq!(a.body["error"]["code"], "rate_limited", "{}", a.body);
    let message = a.body["error"]["message"].as_str().unwrap();
    assert!(message.contains(who), "{message}");
    let seconds = a.retry_after.expect("Retry-After");
    assert!((1..=2).contains(&seconds), "Retry-After {seconds}");
    assert!(
        message.contains(&format!("retry after {seconds} s")),
        "{message}"
    );
}

#[tokio::test]
async fn a_burst_beyond_the_limit_is_refused_then_traffic_resumes() {
    let s = serve(limits(3, 10)).await;
    let key = &s.keys[0];
    // Exactly the burst succeeds, across endpoints (one bucket per key).
    assert_eq!(s.get("/api/v1/budget", Some(key)).await.status, 200);
    assert_eq!(
        s.get("/api/v1/purchase_intents", Some(key)).await.status,
        200
    );
    let created = s
        .http
        .post(format!("{}/api/v1/purchase_intent", s.url))
        .bearer_auth(key)
        .json(&purchase(1_000))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status().as_u16(), 201);
    let refused = s.get("/api/v1/budget", Some(key)).await;
    assert_limited(&refused, "this agent key");
    // Refused requests cost nothing: still refused, still within the same wait.
    for _ in 0..5 {
        assert_limited(&s.get("/api/v1/budget", Some(key)).await, "this agent key");
    }
    let purchase_refused = s
        .http
        .post(format!("{}/api/v1/purchase_intent", s.url))
        .bearer_auth(key)
        .json(&purchase(1_000))
        .send()
        .await
        .unwrap();
    assert_limited(&answer(purchase_refused).await, "this agent key");

    // After Retry-After, legitimate requests succeed again (one token per 2 s).
    tokio::time::sleep(Duration::from_secs(refused.retry_after.unwrap())).await;
    assert_eq!(s.get("/api/v1/budget", Some(key)).await.status, 200);
    assert_limited(&s.get("/api/v1/budget", Some(key)).await, "this agent key");
}

#[tokio::test]
async fn agents_have_independent_buckets() {
    let s = serve(limits(2, 10)).await;
    let (a, b) = (&s.keys[0], &s.keys[1]);
    for _ in 0..2 {
        assert_eq!(s.get("/api/v1/budget", Some(a)).await.status, 200);
    }
    assert_limited(&s.get("/api/v1/budget", Some(a)).await, "this agent key");
    for _ in 0..2 {
        assert_eq!(s.get("/api/v1/budget", Some(b)).await.status, 200);
    }
    assert_limited(&s.get("/api/v1/budget", Some(b)).await, "this agent key");
}

#[tokio::test]
async fn invalid_keys_are_limited_per_address_and_spare_real_agents() {
    let s = serve(limits(3, 4)).await;
    // Missing, wrong and random keys all draw on the address's bucket: exactly 4 get their 401.
    let wrong = [
        None,
        Some("wrong-key-0123456789abcdef".to_string()),
        Some(roony::auth::generate().plaintext),
        Some(roony::auth::generate().plaintext),
    ];
    for key in &wrong {
        let a = s.get("/api/v1/budget", key.as_deref()).await;
        assert_eq!(a.status, 401, "{}", a.body);
    }
    for key in [
        None,
        Some(roony::auth::generate().plaintext),
        Some(s.keys[0].to_uppercase()),
    ] {
        assert_limited(
            &s.get("/api/v1/budget", key.as_deref()).await,
            "unauthenticated requests from this address",
        );
    }
    // The spec is not an agent endpoint but is limited the same way without a key.
    assert_limited(
        &s.get("/openapi.json", None).await,
        "unauthenticated requests from this address",
    );
    // A real agent from the same address keeps its whole burst.
    for _ in 0..3 {
        assert_eq!(s.get("/api/v1/budget", Some(&s.keys[0])).await.status, 200);
    }
    assert_limited(
        &s.get("/api/v1/budget", Some(&s.keys[0])).await,
        "this agent key",
    );
    // Liveness is never limited.
    for _ in 0..20 {
        assert_eq!(s.get("/healthz", None).await.status, 200);
    }
}

#[tokio::test]
async fn mcp_shares_the_agent_bucket() {
    let s = serve(limits(3, 2)).await;
    let key = &s.keys[0];
    assert_eq!(s.mcp(key).await.status, 200);
    assert_eq!(s.mcp(key).await.status, 200);
    assert_eq!(s.get("/api/v1/budget", Some(key)).await.status, 200);
    let refused = s.mcp(key).await;
    assert_limited(&refused, "this agent key");
    // Unauthenticated MCP requests draw on the address's bucket.
    let bad = "wrong-key-0123456789abcdef";
    assert_eq!(s.mcp(bad).await.status, 401);
    assert_eq!(s.mcp(bad).await.status, 401);
    assert_limited(
        &s.mcp(bad).await,
        "unauthenticated requests from this address",
    );
    tokio::time::sleep(Duration::from_secs(refused.retry_after.unwrap())).await;
    assert_eq!(s.mcp(key).await.status, 200);
}

#[tokio::test]
async fn disabled_limits_and_the_plain_app_do_not_limit() {
    let s = serve(RateLimitConfig::disabled()).await;
    for _ in 0..60 {
        assert_eq!(s.get("/api/v1/budget", Some(&s.keys[0])).await.status, 200);
        assert_eq!(s.get("/api/v1/budget", None).await.status, 401);
    }
}
