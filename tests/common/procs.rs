#![allow(dead_code)]
//! Real processes for multi-process tests: `roony control-plane`, `roony sidecar`,
//! `roony stripe-emulator`, and an HTTP client for their APIs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::Connection;

use super::process::{Child, url_after, wait_for};

pub const ADMIN: &str = "cluster-admin-token-0123456789abcdef";

pub struct Proc {
    pub child: Child,
    pub url: String,
    pub log: PathBuf,
}

pub fn control_plane(dir: &Path, name: &str, database_url: &str, listen: &str) -> Proc {
    control_plane_with(dir, name, database_url, listen, &[])
}

pub fn control_plane_with(
    dir: &Path,
    name: &str,
    database_url: &str,
    listen: &str,
    args: &[&str],
) -> Proc {
    let log = dir.join(format!("{name}-{}.log", super::unique()));
    let child = Child(
        Command::new(env!("CARGO_BIN_EXE_roony"))
            .args(["control-plane", "--listen", listen, "--data-dir"])
            .arg(dir.join(name))
            .args(args)
            .env("DATABASE_URL", database_url)
            .env("ROONY_ADMIN_TOKEN", ADMIN)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .spawn()
            .unwrap(),
    );
    let url = url_after(&wait_for(&log, "control plane listening on"));
    Proc { child, url, log }
}

pub fn sidecar(dir: &Path, name: &str, emulator: &str, control: &str, token: &str) -> Proc {
    sidecar_with(dir, name, emulator, control, token, &[])
}

pub fn sidecar_with(
    dir: &Path,
    name: &str,
    emulator: &str,
    control: &str,
    token: &str,
    env: &[(&str, &str)],
) -> Proc {
    let log = dir.join(format!("{name}-{}.log", super::unique()));
    let child = Child(
        Command::new(env!("CARGO_BIN_EXE_roony"))
            .args(["sidecar", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.join(name))
            .args(["--stripe-api-key", "sk_test_cluster", "--stripe-base-url"])
            .arg(emulator)
            .args(["--control-plane-url", control])
            .env("ROONY_SIDECAR_TOKEN", token)
            .env("RUST_LOG", "info,roony=debug")
            // These tests load the sidecar on purpose; rate limits have their own tests.
            .env("ROONY_RATE_LIMIT_PER_SECOND", "0")
            .env("ROONY_UNAUTHENTICATED_RATE_LIMIT_PER_SECOND", "0")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .spawn()
            .unwrap(),
    );
    let url = url_after(&wait_for(&log, "sidecar listening on"));
    Proc { child, url, log }
}

pub fn kill9(p: &mut Proc) {
    let status = Command::new("kill")
        .args(["-KILL", &p.child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    p.child.0.wait().unwrap();
}

#[derive(Clone)]
pub struct Http(pub reqwest::Client);

impl Http {
    pub async fn send(&self, req: reqwest::RequestBuilder) -> (u16, Value) {
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn admin(&self, cp: &str, method: reqwest::Method, path: &str, body: Value) -> Value {
        let mut req = self
            .0
            .request(method, format!("{cp}/api/admin/v1{path}"))
            .bearer_auth(ADMIN);
        if !body.is_null() {
            req = req.json(&body);
        }
        let (status, v) = self.send(req).await;
        assert!((200..300).contains(&status), "{path}: {status} {v}");
        v
    }

    pub async fn buy(&self, sidecar: &str, key: &str, amount: i64) -> (u16, Value) {
        self.send(
            self.0
                .post(format!("{sidecar}/api/v1/purchase_intent"))
                .bearer_auth(key)
                .timeout(Duration::from_secs(30))
                .json(&super::purchase(amount)),
        )
        .await
    }

    pub async fn agent_get(&self, sidecar: &str, key: &str, path: &str) -> (u16, Value) {
        self.send(self.0.get(format!("{sidecar}{path}")).bearer_auth(key))
            .await
    }

    /// Every intent of a project in the control plane's ledger, by id.
    pub async fn ledger(&self, cp: &str, project: &str) -> HashMap<String, Value> {
        let mut out = HashMap::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut path = format!("/intents?project_id={project}&limit=100");
            if let Some(c) = &cursor {
                path.push_str(&format!("&cursor={c}"));
            }
            let page = self
                .admin(cp, reqwest::Method::GET, &path, Value::Null)
                .await;
            for i in page["items"].as_array().unwrap() {
                out.insert(i["id"].as_str().unwrap().to_string(), i.clone());
            }
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => return out,
            }
        }
    }

    /// Every intent of an agent as its sidecar holds it, by id.
    pub async fn sidecar_intents(&self, sidecar: &str, key: &str) -> HashMap<String, Value> {
        let mut out = HashMap::new();
        let mut after: Option<String> = None;
        loop {
            let mut path = "/api/v1/purchase_intents?limit=100".to_string();
            if let Some(a) = &after {
                path.push_str(&format!("&starting_after={a}"));
            }
            let (status, page) = self.agent_get(sidecar, key, &path).await;
            assert_eq!(status, 200, "{page}");
            for i in page["data"].as_array().unwrap() {
                out.insert(i["id"].as_str().unwrap().to_string(), i.clone());
            }
            match page["next_cursor"].as_str() {
                Some(c) => after = Some(c.to_string()),
                None => return out,
            }
        }
    }
}

/// These tests fire many purchases at one merchant on purpose (load, budgets, partitions):
/// risk thresholds are off so that only what a test is about can decline (risk scoring has
/// its own tests, tests/risk.rs).
pub fn policy(max_per_transaction: i64) -> Value {
    json!({
        "currency": "USD",
        "max_per_transaction": max_per_transaction,
        "card_buffer_bps": 0,
        "risk": {"require_approval_above": 100, "decline_above": 100}
    })
}

pub fn codes(body: &Value) -> Vec<String> {
    body["reasons"]
        .as_array()
        .map(|r| {
            r.iter()
                .map(|x| x["code"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until `f` is true, up to `limit`; returns how long it took.
pub async fn until<F, Fut>(limit: Duration, what: &str, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if f().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A project with one agent per name, a policy each, and a shared daily budget.
pub struct Project {
    pub id: String,
    pub budget_id: String,
    pub keys: Vec<String>,
}

pub async fn project(http: &Http, cp: &str, agents: &[&str], budget: i64) -> Project {
    let p = http
        .admin(
            cp,
            reqwest::Method::POST,
            "/projects",
            json!({"name": format!("p-{}", super::unique())}),
        )
        .await;
    let id = p["id"].as_str().unwrap().to_string();
    let mut keys = Vec::new();
    for a in agents {
        let created = http
            .admin(
                cp,
                reqwest::Method::POST,
                "/agents",
                json!({"project_id": id, "name": a, "id": a}),
            )
            .await;
        keys.push(created["key"].as_str().unwrap().to_string());
        http.admin(
            cp,
            reqwest::Method::PUT,
            &format!("/agents/{a}/policy"),
            policy(10_000),
        )
        .await;
    }
    let b = http
        .admin(
            cp,
            reqwest::Method::PUT,
            "/budgets",
            json!({"scope": "project", "scope_id": id, "period": "daily", "currency": "USD", "limit": budget}),
        )
        .await;
    Project {
        id,
        budget_id: b["id"].as_str().unwrap().to_string(),
        keys,
    }
}

pub async fn sidecar_token(http: &Http, cp: &str, project: &str, name: &str) -> String {
    let sc = http
        .admin(
            cp,
            reqwest::Method::POST,
            "/sidecars",
            json!({"name": name, "project_id": project}),
        )
        .await;
    sc["token"].as_str().unwrap().to_string()
}

/// Waits until the sidecar enforces the project's shared budget for this agent.
pub async fn wait_synced(http: &Http, sidecar: &str, key: &str) {
    until(Duration::from_secs(20), "sidecar synced", || async {
        let (status, body) = http.agent_get(sidecar, key, "/api/v1/budget").await;
        status == 200
            && body["budgets"]
                .as_array()
                .is_some_and(|b| b.iter().any(|x| x["scope"] == "project"))
    })
    .await;
}

pub struct PgSchema {
    base: String,
    schema: String,
}

impl PgSchema {
    pub async fn new() -> Option<PgSchema> {
        let Ok(base) = std::env::var("ROONY_TEST_DATABASE_URL") else {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "\n*** ROONY_TEST_DATABASE_URL is not set: the multi-replica cluster test is \
                 SKIPPED (CI sets postgres://postgres@127.0.0.1:5432/test) ***\n"
            );
            return None;
        };
        let schema = format!("c_{}", super::unique().to_lowercase());
        let mut conn = sqlx::PgConnection::connect(&base).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
        Some(PgSchema { base, schema })
    }

    pub fn url(&self) -> String {
        let sep = if self.base.contains('?') { '&' } else { '?' };
        format!(
            "{}{sep}options=-c%20search_path%3D{}",
            self.base, self.schema
        )
    }

    pub async fn drop(self) {
        let mut conn = sqlx::PgConnection::connect(&self.base).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA {} CASCADE",
            self.schema
        )))
        .execute(&mut conn)
        .await
        .unwrap();
        conn.close().await.unwrap();
    }
}

/// `roony stripe-emulator` sending its events (and real-time requests) to `webhook_url`.
pub fn emulator(dir: &Path, webhook_url: &str, secret: &str) -> Proc {
    let log = dir.join(format!("emulator-{}.log", super::unique()));
    let child = Child(
        Command::new(env!("CARGO_BIN_EXE_roony"))
            .args(["stripe-emulator", "--listen", "127.0.0.1:0"])
            .args(["--webhook-url", webhook_url, "--webhook-secret", secret])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .spawn()
            .unwrap(),
    );
    let url = url_after(&wait_for(&log, "stripe emulator listening on"));
    Proc { child, url, log }
}
