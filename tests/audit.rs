#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]
//! The tamper-evident audit trail (issue 8): every request is an audit event of a hash
//! chain — in the control plane (SQLite, and PostgreSQL when `ROONY_TEST_DATABASE_URL` is
//! set) and in the sidecar (`audit.redb`) — and `roony audit verify` (the real binary)
//! names exactly the event that was edited.

mod common;

use std::future::Future;
use std::time::Duration;

use futures_util::FutureExt;
use roony::control::db::ControlDb;
use roony::control::{self, ControlConfig};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sqlx::Row;

use common::db::{Kind, TestDb, on_both};

const TOKEN: &str = "test-admin-token-0123456789abcdef";
const SECRET: &str = "whsec_test_secret_one_0123456789";

fn config(url: &str) -> ControlConfig {
    let mut config = ControlConfig::sqlite_in(std::path::Path::new("/nonexistent"));
    config.database_url = url.to_string();
    config.bootstrap_admin_token = Some(TOKEN.into());
    config.stripe_webhook_secrets = vec![SECRET.into()];
    config
}

async fn run<F, Fut>(kind: Kind, scenario: F)
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = ()>,
{
    let Some(test_db) = TestDb::new(kind, "audit tests is SKIPPED").await else {
        return;
    };
    let outcome = std::panic::AssertUnwindSafe(scenario(test_db.url.clone()))
        .catch_unwind()
        .await;
    test_db.drop_schema().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

on_both!(
    control_plane_requests,
    concurrent_replicas,
    verify_while_appending
);

/// `roony audit verify ARGS…`: (exit code, stdout).
fn verify_cli(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_roony"))
        .arg("audit")
        .arg("verify")
        .args(args)
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn sign(body: &str, secret: &str, t: i64) -> String {
    // HMAC-SHA256, written out (RFC 2104).
    let mut block = [0u8; 64];
    block[..secret.len()].copy_from_slice(secret.as_bytes());
    let pad = |b: u8| block.iter().map(|k| k ^ b).collect::<Vec<u8>>();
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(format!("{t}.{body}").as_bytes())
        .finalize();
    let mac = Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize();
    format!("t={t},v1={}", hex::encode(mac))
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Every audit event as one JSON object per row (all columns, text).
async fn dump(db: &ControlDb) -> Vec<Value> {
    let rows = sqlx::query(
        "SELECT id, actor_type, actor_id, action, target_type, target_id, outcome, request_id, \
         created_at, details, chain_seq, prev_hash, hash FROM audit_events ORDER BY chain_seq",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    rows.iter()
        .map(|r| {
            json!({
                "id": r.get::<String, _>("id"),
                "actor_type": r.get::<String, _>("actor_type"),
                "actor_id": r.get::<String, _>("actor_id"),
                "action": r.get::<String, _>("action"),
                "target_type": r.get::<String, _>("target_type"),
                "target_id": r.get::<String, _>("target_id"),
                "outcome": r.get::<String, _>("outcome"),
                "request_id": r.get::<Option<String>, _>("request_id"),
                "details": serde_json::from_str::<Value>(&r.get::<String, _>("details")).unwrap(),
                "chain_seq": r.get::<Option<i64>, _>("chain_seq"),
                "prev_hash": r.get::<Option<String>, _>("prev_hash"),
                "hash": r.get::<Option<String>, _>("hash"),
            })
        })
        .collect()
}

async fn control_plane_requests(url: String) {
    let db = control::open(&config(&url)).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(control::serve_db(db.clone(), listener, async move {
        let _ = stop_rx.await;
    }));
    let client = reqwest::Client::new();
    let admin = |method: reqwest::Method, path: &str| {
        client
            .request(method, format!("{base}/api/admin/v1{path}"))
            .bearer_auth(TOKEN)
    };

    // Admin requests; the first carries the client's request id.
    let r = admin(reqwest::Method::POST, "/projects")
        .header("x-request-id", "client-req-0001")
        .json(&json!({"name": "audited"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["x-request-id"], "client-req-0001");
    let project: Value = r.json().await.unwrap();
    let project = project["id"].as_str().unwrap().to_string();
    let agent: Value = admin(reqwest::Method::POST, "/agents")
        .json(&json!({"project_id": project, "name": "a", "id": "agt_audit"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let agent_key = agent["key"].as_str().unwrap().to_string();
    let sc: Value = admin(reqwest::Method::POST, "/sidecars")
        .json(&json!({"name": "edge", "project_id": project}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let sidecar_token = sc["token"].as_str().unwrap().to_string();
    // A refused admin request (wrong token) is audited as a failure.
    let r = client
        .get(format!("{base}/api/admin/v1/agents"))
        .bearer_auth("roony_at_wrong0000000000000000000000000000")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let generated = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert!(generated.starts_with("req_"));

    // A sidecar's sync request.
    let r = client
        .get(format!("{base}/api/sync/v1/bundle"))
        .bearer_auth(&sidecar_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // A signed Stripe webhook.
    let event = json!({"id": "evt_audit_1", "object": "event", "type": "charge.succeeded",
        "created": now(), "data": {"object": {"id": "ch_1"}}});
    let body = event.to_string();
    let r = client
        .post(format!("{base}/api/webhooks/stripe"))
        .header("content-type", "application/json")
        .header("stripe-signature", sign(&body, SECRET, now()))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());

    // Stopping the server writes the last request events.
    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(20), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    let db = ControlDb::open(&url).await.unwrap();
    let events = dump(&db).await;
    let requests: Vec<&Value> = events
        .iter()
        .filter(|e| e["action"] == "http.request")
        .collect();
    let find = |route: &str, method: &str| -> Vec<&Value> {
        requests
            .iter()
            .copied()
            .filter(|e| e["target_id"] == route && e["details"]["method"] == method)
            .collect()
    };
    let admin_id = roony::auth::key_id(TOKEN);
    let created = find("/api/admin/v1/projects", "POST");
    assert_eq!(created.len(), 1, "{requests:#?}");
    let created = created[0];
    assert_eq!(created["actor_type"], "admin_token");
    assert_eq!(created["actor_id"], admin_id.as_str());
    assert_eq!(created["outcome"], "success");
    assert_eq!(created["request_id"], "client-req-0001");
    assert_eq!(created["details"]["status"], 201);
    // The domain event of the same request carries the same request id.
    let domain = events
        .iter()
        .find(|e| e["action"] == "project.create" && e["target_id"] == project.as_str())
        .unwrap();
    assert_eq!(domain["request_id"], "client-req-0001");
    assert_eq!(find("/api/admin/v1/agents", "POST").len(), 1);
    let refused = find("/api/admin/v1/agents", "GET");
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0]["outcome"], "failure");
    assert_eq!(refused[0]["details"]["status"], 401);
    assert_eq!(refused[0]["request_id"], generated.as_str());
    let sync = find("/api/sync/v1/bundle", "GET");
    assert_eq!(sync.len(), 1);
    assert_eq!(sync[0]["actor_type"], "sidecar");
    assert_eq!(
        sync[0]["actor_id"],
        roony::auth::key_id(&sidecar_token).as_str()
    );
    assert_eq!(sync[0]["outcome"], "success");
    let hook = find("/api/webhooks/stripe", "POST");
    assert_eq!(hook.len(), 1);
    assert_eq!(hook[0]["actor_type"], "stripe");
    assert_eq!(hook[0]["outcome"], "success");

    // Never a token, key or secret, anywhere in the table.
    let text = serde_json::to_string(&events).unwrap();
    for secret in [TOKEN, &agent_key, &sidecar_token, SECRET, "roony_at_wrong"] {
        assert!(!text.contains(secret), "{secret} is in the audit events");
    }

    // Every event is in the chain (the database is new), and the chain verifies.
    assert!(events.iter().all(|e| e["chain_seq"].is_i64()));
    let report = db.verify_audit_chain().await.unwrap().unwrap();
    assert_eq!(report.count, events.len() as u64);
    let (code, out) = verify_cli(&["--database-url", &url]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out.trim(),
        format!("ok: {} events, head {}", report.count, report.head)
    );

    // One stored event edited in SQL: verify fails at exactly that event.
    let victim = events.iter().find(|e| e["chain_seq"] == 4).unwrap();
    sqlx::query("UPDATE audit_events SET details = $1 WHERE id = $2")
        .bind(r#"{"edited":true}"#)
        .bind(victim["id"].as_str().unwrap())
        .execute(db.pool())
        .await
        .unwrap();
    let (code, out) = verify_cli(&["--database-url", &url]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(
        out.trim(),
        format!(
            "broken at event #4 ({}): hash_mismatch",
            victim["id"].as_str().unwrap()
        )
    );
    let broken = db.verify_audit_chain().await.unwrap().unwrap_err();
    assert_eq!((broken.seq, broken.reason), (4, "hash_mismatch"));

    // An unreachable database is an error (exit 2), not a verdict.
    let (code, _) = verify_cli(&["--database-url", "mysql://nowhere"]);
    assert_eq!(code, 2);
    db.close().await;
}

/// Two replicas (two pools) appending at once keep one unbroken chain.
async fn concurrent_replicas(url: String) {
    let a = control::open(&config(&url)).await.unwrap();
    let b = ControlDb::open(&url).await.unwrap();
    let before = a.verify_audit_chain().await.unwrap().unwrap().count;
    let mut tasks = Vec::new();
    for i in 0..40u32 {
        let db = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            db.append_audit_events(vec![roony::audit::Entry {
                id: roony::service::ids::new_id("aud"),
                at: now(),
                actor_type: "system".into(),
                actor_id: "system".into(),
                action: "test.append".into(),
                target_type: "test".into(),
                target_id: i.to_string(),
                outcome: "success".into(),
                request_id: None,
                details: json!({"i": i}),
            }])
            .await
            .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let report = b.verify_audit_chain().await.unwrap().unwrap();
    assert_eq!(report.count, before + 40);
    let (code, out) = verify_cli(&["--database-url", &url]);
    assert_eq!(code, 0, "{out}");
    a.close().await;
    b.close().await;
}

/// Verifying while events are appended (the request auditor never stops): a chain that is
/// only growing verifies every time — the check covers the chain up to the head it read
/// first, and events appended meanwhile are not mistaken for a broken head.
async fn verify_while_appending(url: String) {
    let db = control::open(&config(&url)).await.unwrap();
    let writer = {
        let db = db.clone();
        tokio::spawn(async move {
            for i in 0..300u32 {
                db.append_audit_events(vec![roony::audit::Entry {
                    id: roony::service::ids::new_id("aud"),
                    at: now(),
                    actor_type: "system".into(),
                    actor_id: "system".into(),
                    action: "test.append".into(),
                    target_type: "test".into(),
                    target_id: i.to_string(),
                    outcome: "success".into(),
                    request_id: None,
                    details: json!({"i": i}),
                }])
                .await
                .unwrap();
            }
        })
    };
    let mut checks = 0;
    while !writer.is_finished() {
        let report = db.verify_audit_chain().await.unwrap();
        assert!(
            report.is_ok(),
            "a growing chain reported broken: {report:?}"
        );
        checks += 1;
    }
    writer.await.unwrap();
    assert!(checks > 1, "verified while appending ({checks} times)");
    db.verify_audit_chain().await.unwrap().unwrap();
    db.close().await;
}

// ----- the sidecar ----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_requests() {
    use common::*;
    use redb::ReadableTable;
    let emu = start_emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let store = roony::store::Store::open(&dir.path().join("sidecar.redb")).unwrap();
    let svc = service(store, &emu, TestClock::new());
    let key = svc
        .create_agent("agt_test", "t", demo_policy(), None)
        .unwrap();
    let log = roony::audit::log::AuditLog::open_in(dir.path()).unwrap();
    let app = roony::sidecar::app(svc, Default::default()).unwrap();
    let app = roony::audit::http::apply(app, log.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(roony::api::serve(listener, app, std::future::pending()));
    let client = reqwest::Client::new();

    // The agent API: a purchase (a card comes back), a read, an unauthenticated call.
    let r = client
        .post(format!("{base}/api/v1/purchase_intent"))
        .bearer_auth(&key)
        .header("x-request-id", "agent-req-1")
        .json(&purchase(1200))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["x-request-id"], "agent-req-1");
    let approved: Value = r.json().await.unwrap();
    let pan = approved["card"]["number"].as_str().unwrap().to_string();
    let cvc = approved["card"]["cvc"].as_str().unwrap().to_string();
    let intent = approved["id"].as_str().unwrap().to_string();
    let r = client
        .get(format!("{base}/api/v1/purchase_intents/{intent}"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client
        .get(format!("{base}/api/v1/budget"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // MCP: a tool call over plain HTTP JSON-RPC (stateless request).
    let call = json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {
        "name": "request_purchase",
        "arguments": {"amount": 900, "currency": "usd", "merchant": {"name": "Shop", "url": "https://shop.example"}, "description": "via mcp"},
        "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}
    }});
    let r = client
        .post(format!("{base}/mcp"))
        .bearer_auth(&key)
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", "tools/call")
        .header("mcp-name", "request_purchase")
        .json(&call)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    // The body reached the MCP server unchanged: the tool answered with a card.
    assert!(text.contains("\"number\""), "{text}");

    log.close().await.unwrap();
    let path = dir.path().join(roony::audit::log::FILE_NAME);
    let events = roony::audit::log::read_all(&path).unwrap();
    assert_eq!(events.len(), 4, "{events:#?}");
    let agent_id = roony::auth::key_id(&key);
    let buy = &events[0];
    assert_eq!(
        (buy.actor_type.as_str(), buy.actor_id.as_str()),
        ("agent", agent_id.as_str())
    );
    assert_eq!(buy.action, "http.request");
    assert_eq!(buy.target_id, "/api/v1/purchase_intent");
    assert_eq!(buy.outcome, "success");
    assert_eq!(buy.request_id.as_deref(), Some("agent-req-1"));
    assert_eq!(events[1].target_id, "/api/v1/purchase_intents/{id}");
    assert_eq!(
        events[1].details["path"],
        format!("/api/v1/purchase_intents/{intent}")
    );
    assert_eq!(events[2].actor_type, "anonymous");
    assert_eq!(events[2].outcome, "failure");
    let mcp = &events[3];
    assert_eq!(mcp.action, "mcp.tools/call");
    assert_eq!(
        (mcp.target_type.as_str(), mcp.target_id.as_str()),
        ("tool", "request_purchase")
    );
    assert_eq!(mcp.actor_id, agent_id);
    assert_eq!(mcp.outcome, "success");

    // Neither the card nor the key is in the file.
    let bytes = std::fs::read(&path).unwrap();
    let contains = |needle: &str| bytes.windows(needle.len()).any(|w| w == needle.as_bytes());
    assert!(!contains(&pan));
    assert!(!contains(&key));
    assert!(!contains(key.rsplit('_').next().unwrap()));
    assert!(!contains(&format!("\"cvc\":\"{cvc}\"")));

    let (code, out) = verify_cli(&["--data-dir", dir.path().to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.trim(), format!("ok: 4 events, head {}", events[3].hash));

    // Edit one stored record: verify fails at exactly that event.
    {
        let db = redb::Database::open(&path).unwrap();
        let wtx = db.begin_write().unwrap();
        {
            let mut table = wtx.open_table(roony::audit::log::EVENTS).unwrap();
            let mut event: Value =
                serde_json::from_slice(table.get(2u64).unwrap().unwrap().value()).unwrap();
            event["details"]["status"] = json!(404);
            let edited = serde_json::to_vec(&event).unwrap();
            table.insert(2u64, edited.as_slice()).unwrap();
        }
        wtx.commit().unwrap();
    }
    let (code, out) = verify_cli(&["--data-dir", dir.path().to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(
        out.trim(),
        format!("broken at event #2 ({}): hash_mismatch", events[1].id)
    );
    let (code, _) = verify_cli(&["--data-dir", "/nonexistent/roony"]);
    assert_eq!(code, 2);
}
