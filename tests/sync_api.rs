#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]
//! Control plane → sidecar sync (policy distribution): sidecar tokens, the signed bundle,
//! the long-poll, and a real sidecar (in-process, on loopback ports, with a real redb store
//! and the Stripe emulator) enforcing what the admin API changes — against SQLite (a temp
//! file) and, when `ROONY_TEST_DATABASE_URL` is set, PostgreSQL (a fresh schema per test).

mod common;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use reqwest::StatusCode;
use roony::control::db::ControlDb;
use roony::control::{self, ControlConfig};
use roony::service::{Service, SystemClock};
use roony::store::Store;
use roony::sync::client::{RestoreError, SyncConfig};
use roony::sync::wire;
use serde_json::{Value, json};

use common::db::{Kind, Server, TestDb, on_both, serve};
use common::{EmulatorHandle, purchase, start_emulator};

const TOKEN: &str = "test-admin-token-0123456789abcdef";

struct Ctx {
    db: ControlDb,
    db_url: String,
    base: String,
    client: reqwest::Client,
    emulator: EmulatorHandle,
    dir: tempfile::TempDir,
    control: Mutex<Option<(tokio::sync::oneshot::Sender<()>, Server)>>,
}

impl Ctx {
    fn url(&self, path: &str) -> String {
        format!("{}/api/admin/v1{path}", self.base)
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> (StatusCode, Value) {
        let resp = req.bearer_auth(TOKEN).send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        assert!(!status.is_server_error(), "5xx {status}: {body}");
        (status, body)
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        let (s, b) = self
            .send(self.client.post(self.url(path)).json(&body))
            .await;
        assert!(s.is_success(), "POST {path}: {s} {b}");
        b
    }

    async fn put(&self, path: &str, body: Value) -> Value {
        let (s, b) = self.send(self.client.put(self.url(path)).json(&body)).await;
        assert!(s.is_success(), "PUT {path}: {s} {b}");
        b
    }

    /// A project with a sidecar token and agent `agt_sync` with the test policy.
    async fn setup(&self, max_per_transaction: i64) -> Setup {
        let project = self.post("/projects", json!({"name": "sync"})).await["id"]
            .as_str()
            .unwrap()
            .to_string();
        let sc = self
            .post(
                "/sidecars",
                json!({"name": "edge-1", "project_id": project}),
            )
            .await;
        assert!(sc["id"].as_str().unwrap().starts_with("sc_"), "{sc}");
        let token = sc["token"].as_str().unwrap().to_string();
        let key = self
            .post(
                "/agents",
                json!({"project_id": project, "name": "sync agent", "id": "agt_sync"}),
            )
            .await["key"]
            .as_str()
            .unwrap()
            .to_string();
        self.put("/agents/agt_sync/policy", policy(max_per_transaction))
            .await;
        Setup {
            project,
            sidecar: sc["id"].as_str().unwrap().to_string(),
            token,
            key,
        }
    }

    async fn get(&self, path: &str) -> Value {
        let (s, b) = self.send(self.client.get(self.url(path))).await;
        assert!(s.is_success(), "GET {path}: {s} {b}");
        b
    }

    /// A POST to a sync endpoint (`path` under the base URL) with a sidecar token.
    async fn sync_post(&self, path: &str, token: Option<&str>, body: Value) -> (StatusCode, Value) {
        sync_post(&self.client, &self.base, path, token, body).await
    }

    /// A sidecar's events, which must all be accepted or duplicates.
    async fn send_events(&self, token: &str, events: &[wire::SyncEvent]) -> wire::EventAck {
        let batch = wire::EventBatch {
            format: wire::FORMAT,
            events: events.to_vec(),
        };
        let (s, b) = self
            .sync_post(
                wire::EVENTS_PATH,
                Some(token),
                serde_json::to_value(&batch).unwrap(),
            )
            .await;
        assert_eq!(s, 200, "{b}");
        serde_json::from_value(b).unwrap()
    }

    /// The current bundle of the sidecar holding `token`, and its ETag header.
    async fn bundle(&self, token: &str) -> (wire::Bundle, String) {
        let r = self
            .client
            .get(format!("{}{}", self.base, wire::BUNDLE_PATH))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let etag = r.headers()["etag"].to_str().unwrap().to_string();
        let raw = r.bytes().await.unwrap();
        (wire::verify(&raw, token).unwrap(), etag)
    }

    /// Registers one more sidecar of `project`; returns (id, token).
    async fn new_sidecar(&self, project: &str, name: &str) -> (String, String) {
        let sc = self
            .post("/sidecars", json!({"name": name, "project_id": project}))
            .await;
        (
            sc["id"].as_str().unwrap().to_string(),
            sc["token"].as_str().unwrap().to_string(),
        )
    }
}

async fn sync_post(
    client: &reqwest::Client,
    base: &str,
    path: &str,
    token: Option<&str>,
    body: Value,
) -> (StatusCode, Value) {
    let mut req = client.post(format!("{base}{path}")).json(&body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    assert!(!status.is_server_error(), "5xx {status}: {body}");
    (status, body)
}

/// A sidecar's view of intent `id` of `agent` at `version`.
fn snapshot(id: &str, agent: &str, version: i64, status: &str) -> wire::IntentSnapshot {
    let live = matches!(status, "approved" | "issuing" | "pending_approval");
    wire::IntentSnapshot {
        id: id.into(),
        agent_id: agent.into(),
        version,
        status: status.into(),
        amount: 2_500,
        currency: "USD".into(),
        merchant_name: "Acme Books".into(),
        merchant_domain: Some("acme.test".into()),
        merchant_country: Some("US".into()),
        merchant_category: None,
        description: Some("a book".into()),
        reserved: if live { 2_500 } else { 0 },
        expires_at: None,
        decision: wire::DecisionSnapshot {
            id: format!("dec_{id}"),
            outcome: match status {
                "declined" => "declined",
                "pending_approval" => "pending_approval",
                _ => "approved",
            }
            .into(),
            reasons: vec![if status == "pending_approval" {
                "requires_approval".into()
            } else {
                "within_policy".into()
            }],
            messages: vec![],
            decided_at: 1_000,
        },
        risk_score: Some(35),
        risk_signals: vec!["new_merchant".into(), "burst".into()],
        status_reason: (status == "canceled").then(|| "canceled_by_agent".into()),
        card: (version > 1 && status != "pending_approval").then(|| wire::CardSnapshot {
            stripe_card_id: format!("ic_{id}"),
            last4: "4242".into(),
            exp_month: 12,
            exp_year: 2030,
            spending_limit: 2_500,
        }),
        created_at: 1_000,
        updated_at: 1_000 + version,
    }
}

fn event(action: &str, intent: wire::IntentSnapshot) -> wire::SyncEvent {
    wire::SyncEvent {
        id: format!("{}.{}", intent.id, intent.version),
        action: action.into(),
        at: intent.updated_at,
        intent,
    }
}

impl Ctx {
    fn sync_config(&self, token: &str) -> SyncConfig {
        SyncConfig {
            control_plane_url: self.base.clone(),
            sidecar_token: token.to_string(),
        }
    }

    /// Stops the control plane (its long-polls end at once).
    async fn stop_control_plane(&self) {
        let taken = self.control.lock().unwrap().take();
        if let Some((stop, server)) = taken {
            let _ = stop.send(());
            let _ = tokio::time::timeout(Duration::from_secs(10), server)
                .await
                .expect("control plane stops promptly");
        }
    }
}

struct Setup {
    project: String,
    sidecar: String,
    token: String,
    key: String,
}

fn policy(max_per_transaction: i64) -> Value {
    let mut p = serde_json::to_value(common::demo_policy()).unwrap();
    p["max_per_transaction"] = json!(max_per_transaction);
    p
}

/// A sidecar in this process, syncing from the control plane.
struct TestSidecar {
    url: String,
    store: Store,
    service: Service,
    client: reqwest::Client,
    sync: tokio::task::JoinHandle<()>,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    restored: Result<Option<i64>, RestoreError>,
}

/// Opens the sidecar store, waiting for a stopped sidecar's tasks to release it.
async fn open_store(path: &std::path::Path) -> Store {
    let mut tries = 0;
    loop {
        match Store::open(path) {
            Ok(s) => break s,
            Err(e) if tries < 50 => {
                tries += 1;
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("cannot reopen the sidecar store: {e}"),
        }
    }
}

async fn start_sidecar(ctx: &Ctx, config: SyncConfig) -> TestSidecar {
    let store = open_store(&ctx.dir.path().join("sidecar.redb")).await;
    let (restored, sync) = roony::sync::client::start(store.clone(), config);
    let service = common::service(store.clone(), &ctx.emulator, Arc::new(SystemClock));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let app = roony::sidecar::app(service.clone(), Default::default()).unwrap();
    let server = tokio::spawn(roony::api::serve(listener, app, async move {
        let _ = rx.await;
    }));
    TestSidecar {
        url: format!("http://{addr}"),
        store,
        service,
        client: reqwest::Client::new(),
        sync,
        stop,
        server,
        restored,
    }
}

impl TestSidecar {
    async fn buy(&self, key: &str, amount: i64) -> (u16, Value) {
        let r = self
            .client
            .post(format!("{}/api/v1/purchase_intent", self.url))
            .bearer_auth(key)
            .json(&purchase(amount))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Waits (up to `limit`) until the agent's synced record satisfies `pred`; returns how
    /// long that took.
    async fn until(
        &self,
        limit: Duration,
        what: &str,
        pred: impl Fn(Option<&roony::store::AgentRecord>) -> bool,
    ) -> Duration {
        let start = Instant::now();
        loop {
            let agent = self.store.agent("agt_sync").unwrap();
            if pred(agent.as_ref().map(|a| &a.record)) {
                return start.elapsed();
            }
            assert!(start.elapsed() < limit, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn stop(self) {
        self.sync.abort();
        let _ = self.sync.await;
        let _ = self.stop.send(());
        let _ = self.server.await;
        drop(self.service);
        drop(self.store);
    }
}

fn codes(body: &Value) -> Vec<String> {
    body["reasons"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|r| r["code"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

async fn run<F, Fut>(kind: Kind, scenario: F)
where
    F: FnOnce(Arc<Ctx>) -> Fut,
    Fut: Future<Output = ()>,
{
    let Some(test_db) = TestDb::new(
        kind,
        "sync tests is SKIPPED (CI sets postgres://postgres@127.0.0.1:5432/test)",
    )
    .await
    else {
        return;
    };
    let mut config = ControlConfig::sqlite_in(std::path::Path::new("/nonexistent"));
    config.database_url = test_db.url.clone();
    config.bootstrap_admin_token = Some(TOKEN.into());
    let db = control::open(&config).await.unwrap();
    let (base, stop, server) = serve(&db).await;
    let ctx = Arc::new(Ctx {
        db: db.clone(),
        db_url: test_db.url.clone(),
        base,
        client: reqwest::Client::new(),
        emulator: start_emulator().await,
        dir: tempfile::tempdir().unwrap(),
        control: Mutex::new(Some((stop, server))),
    });
    let outcome = std::panic::AssertUnwindSafe(scenario(ctx.clone()))
        .catch_unwind()
        .await;
    ctx.stop_control_plane().await;
    db.close().await;
    test_db.drop_schema().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

on_both!(
    sidecar_enforces_admin_changes,
    long_poll,
    restart_without_control_plane,
    replicas_see_each_others_writes,
    concurrent_writes_bump_the_revision_once_each,
    events_fill_the_ledger,
    leases_never_oversubscribe,
    lease_rules,
    bundle_carries_budgets_and_approvals,
    sidecar_revocation,
);

const SECOND: Duration = Duration::from_secs(1);

async fn sidecar_enforces_admin_changes(ctx: Arc<Ctx>) {
    let s = ctx.setup(10_000).await;
    let sc = start_sidecar(&ctx, ctx.sync_config(&s.token)).await;
    assert!(matches!(sc.restored, Ok(None)));
    sc.until(Duration::from_secs(10), "first bundle", |a| a.is_some())
        .await;
    let (status, body) = sc.buy(&s.key, 2_000).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["status"], "approved", "{body}");

    // A policy edit is enforced within 1 s.
    let start = Instant::now();
    ctx.put("/agents/agt_sync/policy", policy(1_000)).await;
    sc.until(SECOND, "the policy edit", |a| {
        a.is_some_and(|a| a.policy.max_per_transaction == Some(1_000))
    })
    .await;
    let (status, body) = sc.buy(&s.key, 2_000).await;
    let elapsed = start.elapsed();
    assert_eq!(status, 402, "{body}");
    assert_eq!(body["status"], "declined", "{body}");
    assert!(elapsed < SECOND, "policy edit took {elapsed:?}");
    eprintln!("policy edit enforced after {elapsed:?}");

    // Freeze → agent_frozen, within 1 s; unfreeze → buys again.
    let start = Instant::now();
    ctx.post("/agents/agt_sync/freeze", json!({"reason": "test"}))
        .await;
    sc.until(SECOND, "the freeze", |a| {
        a.is_some_and(|a| a.status == roony::store::AgentStatus::Frozen)
    })
    .await;
    let (status, body) = sc.buy(&s.key, 500).await;
    assert!(start.elapsed() < SECOND);
    assert_eq!(status, 402, "{body}");
    assert!(codes(&body).contains(&"agent_frozen".to_string()), "{body}");
    let (s2, b2) = ctx
        .send(ctx.client.post(ctx.url("/agents/agt_sync/unfreeze")))
        .await;
    assert!(s2.is_success(), "{b2}");
    sc.until(SECOND, "the unfreeze", |a| {
        a.is_some_and(|a| a.status == roony::store::AgentStatus::Active)
    })
    .await;
    let (status, body) = sc.buy(&s.key, 500).await;
    assert_eq!(status, 201, "{body}");

    // Rotate → the old key is refused (401) within 1 s, the new key works.
    let start = Instant::now();
    let rotated = ctx.post("/agents/agt_sync/keys/rotate", json!({})).await;
    let new_key = rotated["key"].as_str().unwrap().to_string();
    loop {
        let (status, _) = sc.buy(&s.key, 100).await;
        if status == 401 {
            break;
        }
        assert!(start.elapsed() < SECOND, "old key still accepted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, body) = sc.buy(&new_key, 100).await;
    assert_eq!(status, 201, "{body}");
    let _ = s.project;
    sc.stop().await;
}

async fn long_poll(ctx: Arc<Ctx>) {
    let s = ctx.setup(10_000).await;
    let url = format!("{}{}", ctx.base, wire::BUNDLE_PATH);
    // No token, a bad token: 401.
    let r = ctx.client.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = ctx
        .client
        .get(&url)
        .bearer_auth("roony_st_not-a-real-token-000000000000")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_sidecar_token");
    // An admin token is not a sidecar token.
    let r = ctx
        .client
        .get(&url)
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // The bundle: signed, with the ETag in the header.
    let r = ctx
        .client
        .get(&url)
        .bearer_auth(&s.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let etag = r.headers()["etag"].to_str().unwrap().to_string();
    let raw = r.bytes().await.unwrap();
    let bundle = wire::verify(&raw, &s.token).unwrap();
    assert_eq!(etag, format!("\"{}\"", bundle.etag));
    assert_eq!(bundle.format, 1);
    assert_eq!(bundle.project_id, s.project);
    assert_eq!(bundle.agents.len(), 1);
    assert_eq!(bundle.agents[0].id, "agt_sync");
    assert_eq!(bundle.agents[0].keys.len(), 1);
    assert_eq!(bundle.agents[0].keys[0].key_hash, roony::auth::hash(&s.key));
    assert_eq!(
        bundle.agents[0].policy.as_ref().unwrap()["max_per_transaction"],
        10_000
    );
    assert!(!String::from_utf8_lossy(&raw).contains(&s.key));
    assert!(wire::verify(&raw, "some-other-token-0000000000").is_err());

    // Same ETag: 304 after the wait.
    let start = Instant::now();
    let r = ctx
        .client
        .get(format!("{url}?wait=1"))
        .bearer_auth(&s.token)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    let waited = start.elapsed();
    assert!(waited >= Duration::from_millis(900), "{waited:?}");
    assert!(waited < Duration::from_secs(3), "{waited:?}");

    // A change during the wait: 200 promptly.
    let poll = {
        let client = ctx.client.clone();
        let (url, token, etag) = (url.clone(), s.token.clone(), etag.clone());
        tokio::spawn(async move {
            let r = client
                .get(format!("{url}?wait=20"))
                .bearer_auth(&token)
                .header("if-none-match", &etag)
                .send()
                .await
                .unwrap();
            let status = r.status();
            (status, Instant::now(), r.bytes().await.unwrap())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let changed_at = Instant::now();
    ctx.put("/agents/agt_sync/policy", policy(700)).await;
    let (status, answered_at, raw) = poll.await.unwrap();
    assert_eq!(status, 200);
    let latency = answered_at - changed_at;
    assert!(latency < SECOND, "long-poll answered after {latency:?}");
    let newer = wire::verify(&raw, &s.token).unwrap();
    assert!(newer.revision > bundle.revision);
    assert_ne!(newer.etag, bundle.etag);
    assert_eq!(
        newer.agents[0].policy.as_ref().unwrap()["max_per_transaction"],
        700
    );

    // A change elsewhere (another project) does not change this sidecar's bundle.
    let other = ctx.post("/projects", json!({"name": "other"})).await;
    ctx.post(
        "/agents",
        json!({"project_id": other["id"], "name": "x", "id": "agt_other"}),
    )
    .await;
    let r = ctx
        .client
        .get(&url)
        .bearer_auth(&s.token)
        .header("if-none-match", format!("\"{}\"", newer.etag))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);

    // Listed, without the token.
    let (st, list) = ctx.send(ctx.client.get(ctx.url("/sidecars"))).await;
    assert_eq!(st, 200);
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    assert!(!list.to_string().contains(&s.token));
}

async fn restart_without_control_plane(ctx: Arc<Ctx>) {
    let s = ctx.setup(1_000).await;
    let sc = start_sidecar(&ctx, ctx.sync_config(&s.token)).await;
    sc.until(Duration::from_secs(10), "first bundle", |a| a.is_some())
        .await;
    sc.stop().await;
    ctx.stop_control_plane().await;

    // Restarted while the control plane is down: the persisted bundle is enforced.
    let sc = start_sidecar(&ctx, ctx.sync_config(&s.token)).await;
    assert!(
        matches!(sc.restored, Ok(Some(r)) if r > 0),
        "{:?}",
        sc.restored
    );
    let (status, body) = sc.buy(&s.key, 500).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = sc.buy(&s.key, 2_000).await;
    assert_eq!(status, 402, "{body}");
    let store = sc.store.clone();
    let raw = store.sync_bundle().unwrap().unwrap();
    drop(store);
    sc.stop().await;

    // A tampered persisted bundle (a raised limit) is rejected, not applied: nobody buys.
    {
        let store = open_store(&ctx.dir.path().join("sidecar.redb")).await;
        let text = String::from_utf8(raw).unwrap();
        assert!(text.contains("\"max_per_transaction\":1000"), "{text}");
        let tampered = text.replace(
            "\"max_per_transaction\":1000",
            "\"max_per_transaction\":100000",
        );
        store.put_sync_bundle(tampered.as_bytes()).unwrap();
    }
    let sc = start_sidecar(&ctx, ctx.sync_config(&s.token)).await;
    let err = sc.restored.as_ref().unwrap_err();
    assert!(matches!(err, RestoreError::Rejected(_)), "{err}");
    assert!(err.to_string().contains("signature"), "{err}");
    let (status, body) = sc.buy(&s.key, 2_000).await;
    assert_eq!(status, 402, "{body}");
    assert!(codes(&body).contains(&"agent_frozen".to_string()), "{body}");
    sc.stop().await;

    // With the wrong token, even the genuine bundle is rejected.
    let other = start_sidecar(&ctx, ctx.sync_config("roony_st_wrong-token-000000000000")).await;
    assert!(other.restored.is_err());
    other.stop().await;
}

async fn replicas_see_each_others_writes(ctx: Arc<Ctx>) {
    let s = ctx.setup(10_000).await;
    // Replica B: another pool on the same database, its own server.
    let db_b = ControlDb::open(&ctx.db_url).await.unwrap();
    let (base_b, stop_b, server_b) = serve(&db_b).await;
    let url_b = format!("{base_b}{}", wire::BUNDLE_PATH);
    let r = ctx
        .client
        .get(&url_b)
        .bearer_auth(&s.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let etag = r.headers()["etag"].to_str().unwrap().to_string();
    let poll = {
        let client = ctx.client.clone();
        let token = s.token.clone();
        tokio::spawn(async move {
            let r = client
                .get(format!("{url_b}?wait=20"))
                .bearer_auth(&token)
                .header("if-none-match", &etag)
                .send()
                .await
                .unwrap();
            (r.status(), Instant::now())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let written_at = Instant::now();
    // The write goes through replica A.
    ctx.post("/agents/agt_sync/freeze", json!({})).await;
    let (status, answered_at) = poll.await.unwrap();
    assert_eq!(status, 200);
    let latency = answered_at - written_at;
    assert!(latency < SECOND, "replica B answered after {latency:?}");
    eprintln!("replica B saw replica A's write after {latency:?}");
    let _ = stop_b.send(());
    let _ = server_b.await;
}

async fn concurrent_writes_bump_the_revision_once_each(ctx: Arc<Ctx>) {
    ctx.setup(10_000).await;
    let before = ctx.db.config_revision().await.unwrap();
    let db_b = ControlDb::open(&ctx.db_url).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let c = ctx.clone();
        let b = db_b.clone();
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                c.put("/agents/agt_sync/policy", policy(100 + i)).await;
            } else {
                let actor = roony::control::db::Actor::system();
                let doc = policy(100 + i).to_string();
                b.put_policy("agt_sync", &doc, &actor, 1).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let after = ctx.db.config_revision().await.unwrap();
    assert_eq!(after - before, 8);
    db_b.close().await;
}

/// `Store::apply_sync` makes the store's agents and keys exactly the bundle's: what the
/// bundle no longer names is frozen or revoked, an agent without a usable policy is frozen.
#[test]
fn apply_sync_freezes_and_revokes_what_vanished() {
    use roony::store::{AgentStatus, SyncedAgent, SyncedKey};
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("sidecar.redb")).unwrap();
    let key = |id: &str, revoked| SyncedKey {
        key_id: id.into(),
        key_hash: format!("hash-{id}"),
        revoked,
    };
    let agent = |id: &str, policy: bool, keys| SyncedAgent {
        id: id.into(),
        name: id.into(),
        status: AgentStatus::Active,
        policy: policy.then(common::demo_policy),
        keys,
    };
    let applied = store
        .apply_sync(
            &[
                agent("agt_a", true, vec![key("ka1", false), key("ka2", true)]),
                agent("agt_b", true, vec![key("kb", false)]),
                agent("agt_new_without_policy", false, vec![key("kn", false)]),
            ],
            Some(b"{}"),
            100,
        )
        .unwrap();
    assert_eq!(applied.agents, 2);
    assert!(store.agent("agt_new_without_policy").unwrap().is_none());
    assert!(store.agent_key("kn").unwrap().is_none());
    assert!(store.agent_key("ka2").unwrap().unwrap().revoked);
    assert!(!store.agent_key("kb").unwrap().unwrap().revoked);
    assert_eq!(store.sync_bundle().unwrap().unwrap(), b"{}");
    // Warm the caches: the next apply must invalidate them.
    assert_eq!(
        store.agent("agt_b").unwrap().unwrap().record.status,
        AgentStatus::Active
    );

    // agt_b vanished; agt_a lost its policy and key ka1.
    let applied = store
        .apply_sync(&[agent("agt_a", false, vec![key("ka2", true)])], None, 200)
        .unwrap();
    assert_eq!(applied.frozen_vanished, 1);
    assert_eq!(applied.revoked_vanished, 2);
    let a = store.agent("agt_a").unwrap().unwrap();
    assert_eq!(a.record.status, AgentStatus::Frozen);
    assert_eq!(a.record.created, 100);
    assert_eq!(
        store.agent("agt_b").unwrap().unwrap().record.status,
        AgentStatus::Frozen
    );
    assert!(store.agent_key("ka1").unwrap().unwrap().revoked);
    assert!(store.agent_key("kb").unwrap().unwrap().revoked);
    // Without a new raw bundle the persisted one is kept.
    assert_eq!(store.sync_bundle().unwrap().unwrap(), b"{}");
    assert_eq!(store.freeze_all_agents().unwrap(), 0);
}

// ----- events up --------------------------------------------------------------------------

async fn audit_of(ctx: &Ctx, intent: &str) -> Vec<Value> {
    ctx.get(&format!(
        "/audit_events?target_type=intent&target_id={intent}&limit=100"
    ))
    .await["items"]
        .as_array()
        .unwrap()
        .clone()
}

async fn card_of(ctx: &Ctx, intent: &str) -> Option<(String, String)> {
    use sqlx::Row;
    sqlx::query("SELECT status, last4 FROM cards WHERE intent_id = $1")
        .bind(intent.to_string())
        .fetch_optional(ctx.db.pool())
        .await
        .unwrap()
        .map(|r| (r.get("status"), r.get("last4")))
}

async fn events_fill_the_ledger(ctx: Arc<Ctx>) {
    let s = ctx.setup(10_000).await;
    let revision = ctx.db.config_revision().await.unwrap();

    // Decided, then issued: the ledger holds the newer snapshot.
    let batch = vec![
        event(
            "intent.decided",
            snapshot("pur_e1", "agt_sync", 1, "issuing"),
        ),
        event(
            "intent.issued",
            snapshot("pur_e1", "agt_sync", 2, "approved"),
        ),
    ];
    let ack = ctx.send_events(&s.token, &batch).await;
    assert_eq!((ack.accepted, ack.duplicates), (2, 0), "{ack:?}");
    assert!(ack.rejected.is_empty(), "{ack:?}");
    let intent = ctx.get("/intents/pur_e1").await;
    assert_eq!(intent["status"], "approved", "{intent}");
    assert_eq!(intent["sidecar_status"], "approved", "{intent}");
    assert_eq!(intent["version"], 2);
    assert_eq!(intent["reserved"], 2_500);
    assert_eq!(intent["sidecar_id"], s.sidecar.as_str());
    assert_eq!(intent["project_id"], s.project.as_str());
    assert_eq!(intent["amount"], 2_500);
    assert_eq!(intent["merchant_domain"], "acme.test");
    assert_eq!(intent["reasons"], json!(["within_policy"]));
    // The sidecar's risk score reaches the ledger.
    assert_eq!(intent["risk_score"], 35);
    assert_eq!(intent["risk_signals"], json!(["new_merchant", "burst"]));
    assert_eq!(intent["decision_id"], "dec_pur_e1");
    assert_eq!(intent["created_at"], 1_000);
    assert_eq!(intent["updated_at"], 1_002);
    let decisions = ctx.get("/decisions?agent_id=agt_sync").await;
    let items = decisions["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{decisions}");
    assert_eq!(items[0]["id"], "dec_pur_e1");
    assert_eq!(items[0]["intent_id"], "pur_e1");
    assert_eq!(items[0]["decided_by"], "sidecar");
    assert_eq!(items[0]["actor"], s.sidecar.as_str());
    assert_eq!(items[0]["outcome"], "approved");
    assert_eq!(
        card_of(&ctx, "pur_e1").await,
        Some(("active".into(), "4242".into()))
    );
    let audit = audit_of(&ctx, "pur_e1").await;
    let mut actions: Vec<&str> = audit
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    actions.sort_unstable();
    assert_eq!(actions, ["intent.decided", "intent.issued"], "{audit:?}");
    for e in &audit {
        assert_eq!(e["actor_type"], "sidecar");
        assert_eq!(e["actor_id"], s.sidecar.as_str());
        assert_eq!(e["outcome"], "success");
        assert_eq!(e["details"]["amount"], 2_500);
        assert_eq!(e["details"]["currency"], "USD");
        assert!(
            e["details"]["event_id"]
                .as_str()
                .unwrap()
                .starts_with("pur_e1.")
        );
    }
    // Events do not change bundles: no revision bump.
    assert_eq!(ctx.db.config_revision().await.unwrap(), revision);

    // Redelivered: all duplicates, nothing changes.
    let ack = ctx.send_events(&s.token, &batch).await;
    assert_eq!((ack.accepted, ack.duplicates), (0, 2), "{ack:?}");
    assert_eq!(ctx.get("/intents/pur_e1").await, intent);
    assert_eq!(audit_of(&ctx, "pur_e1").await.len(), 2);

    // Canceled: the card reference follows, the reservation is released.
    let ack = ctx
        .send_events(
            &s.token,
            &[event(
                "intent.canceled",
                snapshot("pur_e1", "agt_sync", 3, "canceled"),
            )],
        )
        .await;
    assert_eq!(ack.accepted, 1);
    let intent = ctx.get("/intents/pur_e1").await;
    assert_eq!(intent["status"], "canceled");
    assert_eq!(intent["reserved"], 0);
    assert_eq!(intent["status_reason"], "canceled_by_agent");
    assert_eq!(
        card_of(&ctx, "pur_e1").await,
        Some(("canceled".into(), "4242".into()))
    );

    // Out of order: the newest version arrives first; the older ones never overwrite it.
    let ack = ctx
        .send_events(
            &s.token,
            &[event(
                "intent.expired",
                snapshot("pur_e2", "agt_sync", 3, "expired"),
            )],
        )
        .await;
    assert_eq!(ack.accepted, 1);
    let ack = ctx
        .send_events(
            &s.token,
            &[
                event(
                    "intent.decided",
                    snapshot("pur_e2", "agt_sync", 1, "issuing"),
                ),
                event(
                    "intent.issued",
                    snapshot("pur_e2", "agt_sync", 2, "approved"),
                ),
            ],
        )
        .await;
    assert_eq!((ack.accepted, ack.duplicates), (2, 0));
    let intent = ctx.get("/intents/pur_e2").await;
    assert_eq!(intent["status"], "expired", "{intent}");
    assert_eq!(intent["version"], 3);
    assert_eq!(intent["reserved"], 0);
    assert_eq!(
        card_of(&ctx, "pur_e2").await,
        Some(("canceled".into(), "4242".into())),
        "an older snapshot does not reactivate the card"
    );
    // Every accepted event is in the audit trail, applied or not.
    let audit = audit_of(&ctx, "pur_e2").await;
    assert_eq!(audit.len(), 3);
    let applied: Vec<bool> = audit
        .iter()
        .map(|e| e["details"]["applied"].as_bool().unwrap())
        .collect();
    assert_eq!(applied.iter().filter(|a| **a).count(), 1, "{audit:?}");

    // Agents of another project, unknown agents, another agent's intent: rejected for good,
    // recorded as failed audit events, not redelivered.
    let other = ctx.post("/projects", json!({"name": "elsewhere"})).await;
    ctx.post(
        "/agents",
        json!({"project_id": other["id"], "name": "x", "id": "agt_elsewhere"}),
    )
    .await;
    ctx.post(
        "/agents",
        json!({"project_id": s.project, "name": "two", "id": "agt_two"}),
    )
    .await;
    let revision = ctx.db.config_revision().await.unwrap();
    let bad = vec![
        event(
            "intent.decided",
            snapshot("pur_x1", "agt_elsewhere", 1, "issuing"),
        ),
        event(
            "intent.decided",
            snapshot("pur_x2", "agt_ghost", 1, "issuing"),
        ),
        event(
            "intent.issued",
            snapshot("pur_e1", "agt_two", 4, "approved"),
        ),
        event(
            "intent.decided",
            snapshot("pur_ok", "agt_two", 1, "declined"),
        ),
    ];
    let ack = ctx.send_events(&s.token, &bad).await;
    assert_eq!((ack.accepted, ack.duplicates), (1, 0), "{ack:?}");
    let rejected: Vec<(&str, &str)> = ack
        .rejected
        .iter()
        .map(|r| (r.id.as_str(), r.code.as_str()))
        .collect();
    assert_eq!(
        rejected,
        [
            ("pur_x1.1", "agent_not_in_project"),
            ("pur_x2.1", "unknown_agent"),
            ("pur_e1.4", "intent_of_another_agent"),
        ]
    );
    let (st, _) = ctx.send(ctx.client.get(ctx.url("/intents/pur_x1"))).await;
    assert_eq!(st, 404);
    assert_eq!(ctx.get("/intents/pur_e1").await["status"], "canceled");
    assert_eq!(ctx.get("/intents/pur_ok").await["status"], "declined");
    let failed = audit_of(&ctx, "pur_x1").await;
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["outcome"], "failure");
    assert_eq!(failed[0]["actor_id"], s.sidecar.as_str());
    assert_eq!(failed[0]["details"]["code"], "agent_not_in_project");
    let ack = ctx.send_events(&s.token, &bad).await;
    assert_eq!((ack.accepted, ack.duplicates), (0, 4), "{ack:?}");
    assert!(ack.rejected.is_empty());
    assert_eq!(audit_of(&ctx, "pur_x1").await.len(), 1);

    // Authentication and validation.
    let empty = json!({"format": 1, "events": []});
    let (st, b) = ctx.sync_post(wire::EVENTS_PATH, None, empty.clone()).await;
    assert_eq!(
        (st.as_u16(), b["error"]["code"].as_str()),
        (401, Some("missing_sidecar_token"))
    );
    let (st, b) = ctx
        .sync_post(
            wire::EVENTS_PATH,
            Some("roony_st_0000000000000000000000"),
            empty.clone(),
        )
        .await;
    assert_eq!(
        (st.as_u16(), b["error"]["code"].as_str()),
        (401, Some("invalid_sidecar_token"))
    );
    let (st, _) = ctx
        .sync_post(wire::EVENTS_PATH, Some(TOKEN), empty.clone())
        .await;
    assert_eq!(st, 401, "an admin token is not a sidecar token");
    let (st, b) = ctx
        .sync_post(wire::EVENTS_PATH, Some(&s.token), empty)
        .await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(b, json!({"accepted": 0, "duplicates": 0, "rejected": []}));
    let r = ctx
        .client
        .post(format!("{}{}", ctx.base, wire::EVENTS_PATH))
        .bearer_auth(&s.token)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["error"]["code"], "invalid_json");
    let (st, b) = ctx
        .sync_post(
            wire::EVENTS_PATH,
            Some(&s.token),
            json!({"format": 2, "events": []}),
        )
        .await;
    assert_eq!(
        (st.as_u16(), b["error"]["code"].as_str()),
        (400, Some("unsupported_format"))
    );
    let (st, b) = ctx
        .sync_post(wire::EVENTS_PATH, Some(&s.token), json!({"format": 1}))
        .await;
    assert_eq!(
        (st.as_u16(), b["error"]["code"].as_str()),
        (422, Some("invalid_body"))
    );
    let many: Vec<wire::SyncEvent> = (0..=wire::MAX_EVENTS_PER_BATCH)
        .map(|n| {
            event(
                "intent.decided",
                snapshot(&format!("pur_m{n}"), "agt_sync", 1, "issuing"),
            )
        })
        .collect();
    let batch = wire::EventBatch {
        format: wire::FORMAT,
        events: many,
    };
    let (st, b) = ctx
        .sync_post(
            wire::EVENTS_PATH,
            Some(&s.token),
            serde_json::to_value(&batch).unwrap(),
        )
        .await;
    assert_eq!(
        (st.as_u16(), b["error"]["code"].as_str()),
        (413, Some("batch_too_large"))
    );
    let (st, _) = ctx.send(ctx.client.get(ctx.url("/intents/pur_m0"))).await;
    assert_eq!(st, 404, "nothing of a refused batch is applied");
    // A body over the size limit.
    let huge = "x".repeat(control::sync::MAX_SYNC_BODY_BYTES + 1);
    let (st, b) = ctx
        .sync_post(
            wire::EVENTS_PATH,
            Some(&s.token),
            json!({"format": 1, "events": [], "pad": huge}),
        )
        .await;
    assert_eq!(
        (st.as_u16(), b["error"]["code"].as_str()),
        (413, Some("body_too_large"))
    );
    // An invalid event is rejected (and settled), not applied.
    let mut weird = event(
        "intent.decided",
        snapshot("pur_w", "agt_sync", 1, "issuing"),
    );
    weird.intent.status = "teleported".into();
    let mut nul = event(
        "intent.decided",
        snapshot("pur_nul", "agt_sync", 1, "issuing"),
    );
    nul.intent.merchant_name = "Acme\u{0}Books".into();
    let ack = ctx.send_events(&s.token, &[weird, nul]).await;
    assert_eq!((ack.accepted, ack.rejected.len()), (0, 2), "{ack:?}");
    assert!(
        ack.rejected.iter().all(|r| r.code == "invalid_event"),
        "{ack:?}"
    );
    let (st, _) = ctx.send(ctx.client.get(ctx.url("/intents/pur_nul"))).await;
    assert_eq!(st, 404);
    assert_eq!(ctx.db.config_revision().await.unwrap(), revision);
}

// ----- leases -----------------------------------------------------------------------------

async fn lease(
    ctx: &Ctx,
    token: &str,
    seq: i64,
    wants: &[(&str, i64, i64)],
) -> Vec<wire::LeaseGrant> {
    lease_at(&ctx.client, &ctx.base, token, seq, wants).await
}

async fn lease_at(
    client: &reqwest::Client,
    base: &str,
    token: &str,
    seq: i64,
    wants: &[(&str, i64, i64)],
) -> Vec<wire::LeaseGrant> {
    let req = wire::LeaseRequest {
        format: wire::FORMAT,
        seq,
        leases: wants
            .iter()
            .map(|(budget, bucket, want)| wire::LeaseWant {
                budget_id: budget.to_string(),
                bucket_start: *bucket,
                want: *want,
            })
            .collect(),
    };
    let (st, b) = sync_post(
        client,
        base,
        wire::LEASES_PATH,
        Some(token),
        serde_json::to_value(&req).unwrap(),
    )
    .await;
    assert_eq!(st, 200, "{b}");
    let resp: wire::LeaseResponse = serde_json::from_value(b).unwrap();
    assert_eq!(resp.leases.len(), wants.len());
    resp.leases
}

/// (sidecar id, bucket, granted) of a budget's lease rows, and their sum per bucket.
async fn lease_rows(ctx: &Ctx, budget: &str) -> (Vec<(String, i64, i64)>, i64) {
    let list = ctx.get(&format!("/budgets/{budget}/leases")).await;
    let rows: Vec<(String, i64, i64)> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["sidecar_id"].as_str().unwrap().to_string(),
                r["bucket_start"].as_i64().unwrap(),
                r["granted"].as_i64().unwrap(),
            )
        })
        .collect();
    let sum = rows.iter().map(|r| r.2).sum();
    (rows, sum)
}

async fn leases_never_oversubscribe(ctx: Arc<Ctx>) {
    const LIMIT: i64 = 10_000;
    let s = ctx.setup(10_000).await;
    let budget = ctx
        .put(
            "/budgets",
            json!({"scope": "project", "scope_id": s.project, "period": "daily", "currency": "USD", "limit": LIMIT}),
        )
        .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut tokens = vec![s.token.clone()];
    for n in 2..=3 {
        tokens.push(ctx.new_sidecar(&s.project, &format!("edge-{n}")).await.1);
    }
    // Replica B: another pool on the same database, its own server.
    let db_b = ControlDb::open(&ctx.db_url).await.unwrap();
    let (base_b, stop_b, server_b) = serve(&db_b).await;
    let bases = [ctx.base.clone(), base_b];
    let bucket = 1_767_225_600;
    let seqs: Arc<Vec<std::sync::atomic::AtomicI64>> = Arc::new(
        (0..3)
            .map(|_| std::sync::atomic::AtomicI64::new(0))
            .collect(),
    );
    let mut tasks = Vec::new();
    for round in 0..20 {
        for (i, token) in tokens.iter().enumerate() {
            let client = ctx.client.clone();
            let base = bases[(round + i) % 2].clone();
            let token = token.clone();
            let budget = budget.clone();
            let seqs = seqs.clone();
            tasks.push(tokio::spawn(async move {
                let want = rand::random_range(0..=6_000);
                let seq = seqs[i].fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                let g = lease_at(&client, &base, &token, seq, &[(&budget, bucket, want)]).await;
                (want, g.into_iter().next().unwrap())
            }));
        }
    }
    let mut granted_any = false;
    for t in tasks {
        let (want, g) = t.await.unwrap();
        assert_eq!(g.limit, LIMIT);
        assert!(g.granted >= 0 && g.granted <= LIMIT, "{g:?}");
        assert!(g.leased_total <= LIMIT, "oversubscribed: {g:?}");
        assert!(g.leased_total >= g.granted, "{g:?}");
        // A fresh grant never exceeds the want; a stale one returns what is held.
        granted_any |= g.granted > 0;
        let _ = want;
    }
    assert!(granted_any);
    let (rows, sum) = lease_rows(&ctx, &budget).await;
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert!(sum <= LIMIT, "Σ granted = {sum} > {LIMIT}: {rows:?}");
    eprintln!("after 60 concurrent lease requests: {rows:?} (Σ {sum})");

    // Everyone asks for everything at once, through both replicas: never more than the
    // limit is handed out.
    let mut tasks = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        for base in &bases {
            let client = ctx.client.clone();
            let (base, token, budget, seqs) =
                (base.clone(), token.clone(), budget.clone(), seqs.clone());
            tasks.push(tokio::spawn(async move {
                let seq = seqs[i].fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                lease_at(&client, &base, &token, seq, &[(&budget, bucket, LIMIT)]).await
            }));
        }
    }
    for t in tasks {
        let g = t.await.unwrap();
        assert!(g[0].leased_total <= LIMIT, "{g:?}");
    }
    // The last fresh grant took all the room left: exactly the limit is out.
    let (rows, sum) = lease_rows(&ctx, &budget).await;
    assert_eq!(sum, LIMIT, "{rows:?}");
    let _ = stop_b.send(());
    let _ = server_b.await;
    db_b.close().await;
}

async fn lease_rules(ctx: Arc<Ctx>) {
    let s = ctx.setup(10_000).await;
    let set = |scope: &str, scope_id: &str, period: &str, limit: i64| {
        let ctx = ctx.clone();
        let body = json!({"scope": scope, "scope_id": scope_id, "period": period, "currency": "USD", "limit": limit});
        async move {
            ctx.put("/budgets", body).await["id"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    let budget = set("project", &s.project, "daily", 10_000).await;
    let (b_id, b_token) = ctx.new_sidecar(&s.project, "edge-b").await;
    let a = &s.token;
    let day = 1_767_225_600;

    // A takes everything; B gets nothing until A gives some back.
    let g = lease(&ctx, a, 1, &[(&budget, day, 10_000)]).await;
    assert_eq!(
        (g[0].granted, g[0].limit, g[0].leased_total),
        (10_000, 10_000, 10_000)
    );
    let g = lease(&ctx, &b_token, 1, &[(&budget, day, 3_000)]).await;
    assert_eq!((g[0].granted, g[0].leased_total), (0, 10_000));
    let g = lease(&ctx, a, 2, &[(&budget, day, 4_000)]).await;
    assert_eq!((g[0].granted, g[0].leased_total), (4_000, 4_000));
    let g = lease(&ctx, &b_token, 2, &[(&budget, day, 3_000)]).await;
    assert_eq!((g[0].granted, g[0].leased_total), (3_000, 7_000));
    // More than is left: what is left.
    let g = lease(&ctx, a, 3, &[(&budget, day, 9_000)]).await;
    assert_eq!((g[0].granted, g[0].leased_total), (7_000, 10_000));

    // A late retry (an older seq) changes nothing and returns what is held.
    let g = lease(&ctx, &b_token, 1, &[(&budget, day, 0)]).await;
    assert_eq!((g[0].granted, g[0].leased_total), (3_000, 10_000));
    let g = lease(&ctx, &b_token, 2, &[(&budget, day, 0)]).await;
    assert_eq!(g[0].granted, 3_000, "an equal seq is stale too");
    let (rows, sum) = lease_rows(&ctx, &budget).await;
    assert_eq!(sum, 10_000);
    assert!(rows.contains(&(b_id.clone(), day, 3_000)), "{rows:?}");
    assert!(rows.contains(&(s.sidecar.clone(), day, 7_000)), "{rows:?}");

    // A lowered limit leaves allowances alone; new grants wait until it is respected again.
    set("project", &s.project, "daily", 8_000).await;
    let g = lease(&ctx, a, 4, &[(&budget, day, 7_000)]).await;
    assert_eq!(
        (g[0].granted, g[0].limit, g[0].leased_total),
        (5_000, 8_000, 8_000)
    );

    // The next day's bucket replaces this sidecar's older ones.
    let g = lease(&ctx, a, 5, &[(&budget, day + 86_400, 1_000)]).await;
    assert_eq!((g[0].granted, g[0].leased_total), (1_000, 1_000));
    let (rows, _) = lease_rows(&ctx, &budget).await;
    assert_eq!(
        rows,
        vec![
            (s.sidecar.clone(), day + 86_400, 1_000),
            (b_id.clone(), day, 3_000)
        ]
    );

    // The org's budget applies too; another project's, an agent's or an unknown one grant 0.
    let org = ctx.get("/projects").await;
    let org_id = org["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == s.project.as_str())
        .unwrap()["org_id"]
        .as_str()
        .unwrap()
        .to_string();
    let org_budget = set("org", &org_id, "monthly", 50_000).await;
    let other = ctx.post("/projects", json!({"name": "elsewhere"})).await;
    let foreign = set("project", other["id"].as_str().unwrap(), "daily", 9_999).await;
    let agent_budget = set("agent", "agt_sync", "daily", 5_000).await;
    let g = lease(
        &ctx,
        a,
        6,
        &[
            (&org_budget, 0, 20_000),
            (&foreign, day, 1_000),
            (&agent_budget, day, 1_000),
            ("bud_nope", day, 1_000),
        ],
    )
    .await;
    assert_eq!((g[0].granted, g[0].limit), (20_000, 50_000), "{g:?}");
    for other in &g[1..] {
        assert_eq!(
            (other.granted, other.limit, other.leased_total),
            (0, 0, 0),
            "{other:?}"
        );
    }
    assert_eq!(g[3].budget_id, "bud_nope");
    assert!(lease_rows(&ctx, &foreign).await.0.is_empty());

    // Validation and authentication.
    let ok = json!({"format": 1, "seq": 9, "leases": []});
    let (st, b) = ctx.sync_post(wire::LEASES_PATH, Some(a), ok.clone()).await;
    assert_eq!((st.as_u16(), b), (200, json!({"leases": []})));
    let (st, b) = ctx.sync_post(wire::LEASES_PATH, None, ok).await;
    assert_eq!(
        (st.as_u16(), b["error"]["code"].as_str()),
        (401, Some("missing_sidecar_token"))
    );
    let cases = [
        (
            json!({"format": 2, "seq": 9, "leases": []}),
            "unsupported_format",
        ),
        (
            json!({"format": 1, "seq": 9, "leases": [{"budget_id": budget, "bucket_start": day, "want": -1}]}),
            "invalid_want",
        ),
        (
            json!({"format": 1, "seq": 9, "leases": vec![json!({"budget_id": budget, "bucket_start": day, "want": 1}); wire::MAX_LEASES_PER_REQUEST + 1]}),
            "too_many_leases",
        ),
    ];
    for (body, code) in cases {
        let (st, b) = ctx.sync_post(wire::LEASES_PATH, Some(a), body).await;
        assert_eq!(
            (st.as_u16(), b["error"]["code"].as_str()),
            (400, Some(code)),
            "{b}"
        );
    }
    let (rows, _) = lease_rows(&ctx, &budget).await;
    assert!(
        rows.contains(&(s.sidecar.clone(), day + 86_400, 1_000)),
        "refused requests change nothing: {rows:?}"
    );
    let (st, b) = ctx
        .send(ctx.client.get(ctx.url("/budgets/bud_nope/leases")))
        .await;
    assert_eq!(
        (st.as_u16(), b["error"]["code"].as_str()),
        (404, Some("budget_not_found"))
    );
}

// ----- bundle: budgets and approvals ------------------------------------------------------

/// Waits (long-poll) for the bundle after `etag`; returns it and how long it took after
/// `trigger` ran.
async fn poll_after<F, Fut>(
    ctx: &Ctx,
    token: &str,
    etag: &str,
    trigger: F,
) -> (wire::Bundle, Duration)
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = ()>,
{
    let poll = {
        let client = ctx.client.clone();
        let url = format!("{}{}?wait=20", ctx.base, wire::BUNDLE_PATH);
        let (token, etag) = (token.to_string(), etag.to_string());
        tokio::spawn(async move {
            let r = client
                .get(url)
                .bearer_auth(&token)
                .header("if-none-match", &etag)
                .send()
                .await
                .unwrap();
            let status = r.status();
            (status, Instant::now(), r.bytes().await.unwrap())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let start = Instant::now();
    trigger().await;
    let (status, answered, raw) = poll.await.unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&raw));
    (wire::verify(&raw, token).unwrap(), answered - start)
}

async fn bundle_carries_budgets_and_approvals(ctx: Arc<Ctx>) {
    let s = ctx.setup(10_000).await;
    let project = ctx.get("/projects").await["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == s.project.as_str())
        .unwrap()
        .clone();
    let (bundle, _) = ctx.bundle(&s.token).await;
    assert!(bundle.budgets.is_empty() && bundle.approvals.is_empty());
    assert!(bundle.agents[0].budgets.is_empty());

    let set = |body: Value| {
        let ctx = ctx.clone();
        async move { ctx.put("/budgets", body).await }
    };
    let p = set(json!({"scope": "project", "scope_id": s.project, "period": "daily", "currency": "USD", "limit": 50_000})).await;
    let o = set(json!({"scope": "org", "scope_id": project["org_id"], "period": "monthly", "currency": "EUR", "limit": 90_000})).await;
    let a = set(json!({"scope": "agent", "scope_id": "agt_sync", "period": "weekly", "currency": "USD", "limit": 20_000})).await;
    let other = ctx.post("/projects", json!({"name": "elsewhere"})).await;
    set(json!({"scope": "project", "scope_id": other["id"], "period": "daily", "currency": "USD", "limit": 1})).await;
    let (bundle, etag) = ctx.bundle(&s.token).await;
    let mut expected = vec![
        wire::BundleBudget {
            id: p["id"].as_str().unwrap().into(),
            scope: "project".into(),
            scope_id: s.project.clone(),
            period: "daily".into(),
            currency: "USD".into(),
            limit: 50_000,
        },
        wire::BundleBudget {
            id: o["id"].as_str().unwrap().into(),
            scope: "org".into(),
            scope_id: project["org_id"].as_str().unwrap().into(),
            period: "monthly".into(),
            currency: "EUR".into(),
            limit: 90_000,
        },
    ];
    expected.sort_by(|x, y| x.id.cmp(&y.id));
    assert_eq!(bundle.budgets, expected);
    assert_eq!(
        bundle.agents[0].budgets,
        vec![wire::BundleBudget {
            id: a["id"].as_str().unwrap().into(),
            scope: "agent".into(),
            scope_id: "agt_sync".into(),
            period: "weekly".into(),
            currency: "USD".into(),
            limit: 20_000,
        }]
    );
    assert_eq!(bundle.etag, wire::content_etag(&bundle));

    // A pending intent reported by the sidecar, approved by an administrator: a waiting
    // long-poll answers within 1 s with the approval.
    let ack = ctx
        .send_events(
            &s.token,
            &[event(
                "intent.decided",
                snapshot("pur_ap", "agt_sync", 1, "pending_approval"),
            )],
        )
        .await;
    assert_eq!(ack.accepted, 1);
    let (same, etag2) = ctx.bundle(&s.token).await;
    assert_eq!(etag2, etag, "a pending intent alone is not an approval");
    assert!(same.approvals.is_empty());
    let (bundle, latency) = poll_after(&ctx, &s.token, &etag, || async {
        ctx.post("/intents/pur_ap/approve", json!({"note": "ok by me"}))
            .await;
    })
    .await;
    assert!(
        latency < SECOND,
        "the approval reached the long-poll after {latency:?}"
    );
    eprintln!("approval reached the long-poll after {latency:?}");
    assert_eq!(bundle.approvals.len(), 1, "{:?}", bundle.approvals);
    let ap = &bundle.approvals[0];
    assert_eq!(
        (ap.intent_id.as_str(), ap.agent_id.as_str()),
        ("pur_ap", "agt_sync")
    );
    assert!(ap.approved);
    assert_eq!(ap.note.as_deref(), Some("ok by me"));
    assert_eq!(ap.actor, "bootstrap");
    assert!(ap.decided_at > 1_700_000_000);
    let intent = ctx.get("/intents/pur_ap").await;
    assert_eq!(intent["status"], "approved");
    assert_eq!(intent["sidecar_status"], "pending_approval");
    let admin_decision = intent["decision_id"].clone();
    assert_ne!(admin_decision, "dec_pur_ap");

    // The sidecar reporting the intent still pending keeps the administrator's decision.
    ctx.send_events(
        &s.token,
        &[event(
            "intent.decided",
            snapshot("pur_ap", "agt_sync", 2, "pending_approval"),
        )],
    )
    .await;
    let intent = ctx.get("/intents/pur_ap").await;
    assert_eq!(
        (intent["status"].as_str(), intent["version"].as_i64()),
        (Some("approved"), Some(2))
    );
    assert_eq!(intent["decision_id"], admin_decision);
    assert_eq!(intent["reasons"], json!(["approved_by_admin"]));
    let (still, etag) = ctx.bundle(&s.token).await;
    assert_eq!(still.approvals.len(), 1);

    // Once the sidecar acts on it, the approval leaves the bundle promptly.
    let (bundle, latency) = poll_after(&ctx, &s.token, &etag, || async {
        ctx.send_events(
            &s.token,
            &[event(
                "intent.approved",
                snapshot("pur_ap", "agt_sync", 3, "issuing"),
            )],
        )
        .await;
    })
    .await;
    assert!(latency < SECOND, "{latency:?}");
    assert!(bundle.approvals.is_empty(), "{:?}", bundle.approvals);
    ctx.send_events(
        &s.token,
        &[event(
            "intent.issued",
            snapshot("pur_ap", "agt_sync", 4, "approved"),
        )],
    )
    .await;
    let intent = ctx.get("/intents/pur_ap").await;
    assert_eq!(intent["status"], "approved");
    assert_eq!(intent["sidecar_status"], "approved");
    assert_eq!(intent["decision_id"], admin_decision);
    // What the administrator approved stays what was approved: a later report cannot
    // raise the amount or change the currency (the relay checks cards against it).
    let mut raised = snapshot("pur_ap", "agt_sync", 5, "approved");
    raised.amount = 99_000;
    raised.currency = "EUR".into();
    ctx.send_events(&s.token, &[event("intent.issued", raised)])
        .await;
    let intent = ctx.get("/intents/pur_ap").await;
    assert_eq!(
        (
            intent["amount"].as_i64(),
            intent["currency"].as_str(),
            intent["version"].as_i64()
        ),
        (Some(2_500), Some("USD"), Some(5))
    );
    assert_eq!(
        card_of(&ctx, "pur_ap").await,
        Some(("active".into(), "4242".into()))
    );

    // A denial travels the same way.
    ctx.send_events(
        &s.token,
        &[event(
            "intent.decided",
            snapshot("pur_dn", "agt_sync", 1, "pending_approval"),
        )],
    )
    .await;
    let (_, etag) = ctx.bundle(&s.token).await;
    let (bundle, _) = poll_after(&ctx, &s.token, &etag, || async {
        ctx.post("/intents/pur_dn/deny", json!({})).await;
    })
    .await;
    assert_eq!(bundle.approvals.len(), 1);
    assert!(!bundle.approvals[0].approved);
    assert_eq!(bundle.approvals[0].note, None);
    ctx.send_events(
        &s.token,
        &[event(
            "intent.denied",
            snapshot("pur_dn", "agt_sync", 2, "declined"),
        )],
    )
    .await;
    let (bundle, _) = ctx.bundle(&s.token).await;
    assert!(bundle.approvals.is_empty());
    assert_eq!(ctx.get("/intents/pur_dn").await["status"], "declined");
}

// ----- revocation -------------------------------------------------------------------------

async fn sidecar_revocation(ctx: Arc<Ctx>) {
    let s = ctx.setup(10_000).await;
    let budget = ctx
        .put(
            "/budgets",
            json!({"scope": "project", "scope_id": s.project, "period": "daily", "currency": "USD", "limit": 10_000}),
        )
        .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let g = lease(&ctx, &s.token, 1, &[(&budget, 0, 4_000)]).await;
    assert_eq!(g[0].granted, 4_000);
    let (_, etag) = ctx.bundle(&s.token).await;

    // Revoked while a long-poll waits: it ends with 401 promptly.
    let poll = {
        let client = ctx.client.clone();
        let url = format!("{}{}?wait=20", ctx.base, wire::BUNDLE_PATH);
        let (token, etag) = (s.token.clone(), etag.clone());
        tokio::spawn(async move {
            let r = client
                .get(url)
                .bearer_auth(&token)
                .header("if-none-match", &etag)
                .send()
                .await
                .unwrap();
            (r.status(), Instant::now())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let start = Instant::now();
    let revoked = ctx
        .post(&format!("/sidecars/{}/revoke", s.sidecar), json!({}))
        .await;
    assert_eq!(revoked["id"], s.sidecar.as_str());
    assert!(revoked["revoked_at"].as_i64().unwrap() > 0);
    let (status, answered) = poll.await.unwrap();
    assert_eq!(status, 401);
    assert!(answered - start < SECOND, "{:?}", answered - start);

    let r = ctx
        .client
        .get(format!("{}{}", ctx.base, wire::BUNDLE_PATH))
        .bearer_auth(&s.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["error"]["code"], "invalid_sidecar_token");
    let (st, b) = ctx
        .sync_post(
            wire::EVENTS_PATH,
            Some(&s.token),
            json!({"format": 1, "events": []}),
        )
        .await;
    assert_eq!(
        (st.as_u16(), b["error"]["code"].as_str()),
        (401, Some("invalid_sidecar_token"))
    );
    let (st, b) = ctx
        .sync_post(
            wire::LEASES_PATH,
            Some(&s.token),
            json!({"format": 1, "seq": 2, "leases": []}),
        )
        .await;
    assert_eq!(
        (st.as_u16(), b["error"]["code"].as_str()),
        (401, Some("invalid_sidecar_token"))
    );

    // Its allowance stays counted.
    let (_, other) = ctx.new_sidecar(&s.project, "edge-2").await;
    let g = lease(&ctx, &other, 1, &[(&budget, 0, 10_000)]).await;
    assert_eq!((g[0].granted, g[0].leased_total), (6_000, 10_000));

    // Again: 409; unknown: 404; audited; listed as revoked.
    let (st, b) = ctx
        .send(
            ctx.client
                .post(ctx.url(&format!("/sidecars/{}/revoke", s.sidecar))),
        )
        .await;
    assert_eq!(
        (st.as_u16(), b["error"]["code"].as_str()),
        (409, Some("sidecar_already_revoked"))
    );
    let (st, b) = ctx
        .send(ctx.client.post(ctx.url("/sidecars/sc_nope/revoke")))
        .await;
    assert_eq!(
        (st.as_u16(), b["error"]["code"].as_str()),
        (404, Some("sidecar_not_found"))
    );
    let audit = ctx
        .get(&format!(
            "/audit_events?target_type=sidecar&target_id={}",
            s.sidecar
        ))
        .await;
    let actions: Vec<&str> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["sidecar.revoke", "sidecar.create"]);
    let list = ctx.get("/sidecars").await;
    let me = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["id"] == s.sidecar.as_str())
        .unwrap()
        .clone();
    assert_eq!(me["revoked_at"], revoked["revoked_at"]);
}
