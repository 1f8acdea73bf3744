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
use sqlx::Connection;

use common::{EmulatorHandle, purchase, start_emulator};

const TOKEN: &str = "test-admin-token-0123456789abcdef";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Sqlite,
    Postgres,
}

type Server = tokio::task::JoinHandle<Result<(), control::ControlError>>;

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
            token,
            key,
        }
    }

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

async fn start_sidecar(ctx: &Ctx, config: SyncConfig) -> TestSidecar {
    let path = ctx.dir.path().join("sidecar.redb");
    // A stopped sidecar's database may take a moment to be released.
    let mut tries = 0;
    let store = loop {
        match Store::open(&path) {
            Ok(s) => break s,
            Err(e) if tries < 50 => {
                tries += 1;
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("cannot reopen the sidecar store: {e}"),
        }
    };
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

/// Where a test's database lives, and how to drop it afterwards.
struct TestDb {
    url: String,
    _dir: Option<tempfile::TempDir>,
    pg_schema: Option<(String, String)>,
}

impl TestDb {
    async fn new(kind: Kind) -> Option<TestDb> {
        match kind {
            Kind::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                Some(TestDb {
                    url: roony::control::db::default_sqlite_url(dir.path()),
                    _dir: Some(dir),
                    pg_schema: None,
                })
            }
            Kind::Postgres => {
                let Ok(base) = std::env::var("ROONY_TEST_DATABASE_URL") else {
                    use std::io::Write;
                    let _ = writeln!(
                        std::io::stderr(),
                        "\n*** ROONY_TEST_DATABASE_URL is not set: the PostgreSQL leg of the sync \
                         tests is SKIPPED (CI sets postgres://postgres@127.0.0.1:5432/test) ***\n"
                    );
                    return None;
                };
                let schema = format!("t_{}", roony::service::ids::new_id("s").to_lowercase());
                let mut conn = sqlx::PgConnection::connect(&base).await.unwrap();
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
                    .execute(&mut conn)
                    .await
                    .unwrap();
                conn.close().await.unwrap();
                let sep = if base.contains('?') { '&' } else { '?' };
                Some(TestDb {
                    url: format!("{base}{sep}options=-c%20search_path%3D{schema}"),
                    _dir: None,
                    pg_schema: Some((base, schema)),
                })
            }
        }
    }

    async fn drop_schema(&self) {
        if let Some((base, schema)) = &self.pg_schema {
            let mut conn = sqlx::PgConnection::connect(base).await.unwrap();
            sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
                .execute(&mut conn)
                .await
                .unwrap();
            conn.close().await.unwrap();
        }
    }
}

async fn serve(db: &ControlDb) -> (String, tokio::sync::oneshot::Sender<()>, Server) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(control::serve_db(db.clone(), listener, async move {
        let _ = stop_rx.await;
    }));
    (format!("http://{addr}"), stop_tx, server)
}

async fn run<F, Fut>(kind: Kind, scenario: F)
where
    F: FnOnce(Arc<Ctx>) -> Fut,
    Fut: Future<Output = ()>,
{
    let Some(test_db) = TestDb::new(kind).await else {
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

macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    super::run(super::Kind::Sqlite, super::$name).await;
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    super::run(super::Kind::Postgres, super::$name).await;
                }
            }
        )*
    };
}

on_both!(
    sidecar_enforces_admin_changes,
    long_poll,
    restart_without_control_plane,
    replicas_see_each_others_writes,
    concurrent_writes_bump_the_revision_once_each,
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
        let store = Store::open(&ctx.dir.path().join("sidecar.redb")).unwrap();
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
