#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]
//! The control plane's admin API and repository, against SQLite (a temp file) and — when
//! `ROONY_TEST_DATABASE_URL` is set — PostgreSQL, each test in a fresh schema.

mod common;

use std::future::Future;

use futures_util::FutureExt;

use reqwest::StatusCode;
use roony::control::db::{ControlDb, LedgerFilter};
use roony::control::model::NewIntent;
use roony::control::{self, ControlConfig};
use serde_json::{Value, json};
use sqlx::Row;

use common::db::{Kind, TestDb, on_both, serve};

const TOKEN: &str = "test-admin-token-0123456789abcdef";
const TOKEN_NAME: &str = "test-admin";

struct Ctx {
    db: ControlDb,
    db_url: String,
    base: String,
    client: reqwest::Client,
    kind: Kind,
}

impl Ctx {
    fn url(&self, path: &str) -> String {
        format!("{}/api/admin/v1{path}", self.base)
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> (StatusCode, Value) {
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        assert!(
            !status.is_server_error(),
            "{:?}: 5xx {status}: {body}",
            self.kind
        );
        (status, body)
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.send(self.client.get(self.url(path)).bearer_auth(TOKEN))
            .await
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.send(
            self.client
                .post(self.url(path))
                .bearer_auth(TOKEN)
                .json(&body),
        )
        .await
    }

    async fn post_empty(&self, path: &str) -> (StatusCode, Value) {
        self.send(self.client.post(self.url(path)).bearer_auth(TOKEN))
            .await
    }

    async fn put(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.send(
            self.client
                .put(self.url(path))
                .bearer_auth(TOKEN)
                .json(&body),
        )
        .await
    }

    async fn project(&self, name: &str) -> String {
        let (s, b) = self.post("/projects", json!({"name": name})).await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
        b["id"].as_str().unwrap().to_string()
    }

    async fn agent(&self, project_id: &str, id: &str) -> String {
        let (s, b) = self
            .post(
                "/agents",
                json!({"project_id": project_id, "name": id, "id": id}),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
        b["key"].as_str().unwrap().to_string()
    }
}

async fn run<F, Fut>(kind: Kind, scenario: F)
where
    F: FnOnce(Ctx) -> Fut,
    Fut: Future<Output = ()>,
{
    let Some(test_db) = TestDb::new(
        kind,
        "control plane tests is SKIPPED (CI sets postgres://postgres@127.0.0.1:5432/test)",
    )
    .await
    else {
        return;
    };
    let mut config = ControlConfig::sqlite_in(std::path::Path::new("/nonexistent"));
    config.database_url = test_db.url.clone();
    config.bootstrap_admin_token = Some(TOKEN.into());
    config.bootstrap_admin_name = TOKEN_NAME.into();
    let db = control::open(&config).await.unwrap();
    let (base, stop_tx, server) = serve(&db).await;
    let ctx = Ctx {
        db: db.clone(),
        db_url: test_db.url.clone(),
        base,
        client: reqwest::Client::new(),
        kind,
    };
    // Drop the schema even when the scenario fails, then report the failure.
    let outcome = std::panic::AssertUnwindSafe(scenario(ctx))
        .catch_unwind()
        .await;
    let _ = stop_tx.send(());
    let _ = server.await;
    db.close().await;
    test_db.drop_schema().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

on_both!(
    current_thread:
    migrations_apply,
    admin_auth,
    agents_and_keys,
    freeze_and_unfreeze,
    policies_are_versioned,
    invalid_policies_name_every_field,
    concurrent_policy_writes_get_distinct_revisions,
    budgets,
    intents_filters_and_pagination,
    decisions_filters,
    approvals,
    approvals_refused_when_frozen_or_expired,
    budgets_are_deleted,
    audit_trail,
    bad_input_is_4xx,
    admin_tokens,
    admin_token_last_used,
    bootstrap_tokens_replace_each_other,
    concurrent_revocations_keep_one_token,
);

async fn migrations_apply(ctx: Ctx) {
    let tables = ctx.db.table_names().await.unwrap();
    for t in [
        "organizations",
        "projects",
        "agents",
        "agent_keys",
        "admin_users",
        "admin_tokens",
        "policies",
        "policy_revisions",
        "budgets",
        "intents",
        "decisions",
        "cards",
        "settlements",
        "audit_events",
        "sync_event_ids",
        "sidecars",
        "config_revision",
        "budget_leases",
        "stripe_events",
        "authorizations",
        "discrepancies",
        "intent_updates",
        "intent_update_seq",
        "audit_chain",
    ] {
        assert!(tables.iter().any(|x| x == t), "{t} missing: {tables:?}");
    }
    let indexes = ctx.db.index_names().await.unwrap();
    for i in [
        "intents_agent_created",
        "intents_status_created",
        "intents_project_created",
        "intents_org_created",
        "intents_created",
        "decisions_agent_created",
        "decisions_outcome_created",
        "decisions_project_created",
        "decisions_org_created",
        "agents_project_created",
        "agents_org_created",
        "projects_org_created",
        "audit_events_action",
        "audit_events_actor",
        "agents_status_created",
        "audit_events_target",
        "intents_project_sidecar_status",
        "budget_leases_sidecar",
        "admin_tokens_created",
        "authorizations_intent",
        "authorizations_card",
        "settlements_intent",
        "settlements_card",
        "discrepancies_kind_created",
        "discrepancies_agent_created",
        "intent_updates_project_seq",
        "audit_events_chain",
    ] {
        assert!(indexes.iter().any(|x| x == i), "{i} missing: {indexes:?}");
    }
    // Opening again applies nothing new and keeps one default organization.
    let again = ControlDb::open(&ctx.db_url).await.unwrap();
    let default = again.ensure_default_org(1).await.unwrap();
    let orgs = again.list_orgs().await.unwrap();
    assert_eq!(orgs.iter().filter(|o| o.is_default).count(), 1);
    assert_eq!(orgs[0].id, default.id);
    again.close().await;
    let (s, b) = ctx.get("/organizations").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["items"][0]["is_default"], true);
}

async fn admin_auth(ctx: Ctx) {
    let url = ctx.url("/agents");
    let r = ctx.client.get(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.headers().contains_key("www-authenticate"));
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["error"]["code"], "missing_admin_token");

    let r = ctx
        .client
        .get(&url)
        .header("authorization", "Basic dXNlcjpwYXNz")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["error"]["code"], "missing_admin_token");

    for wrong in [
        "test-admin-token-0123456789abcdeX",
        "roony_at_0000000000000000000000000000000000000000000000000000000000000000",
        "x",
    ] {
        let r = ctx
            .client
            .get(&url)
            .bearer_auth(wrong)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        let b: Value = r.json().await.unwrap();
        assert_eq!(b["error"]["code"], "invalid_admin_token", "{wrong}");
    }
    // State-changing calls are refused too, and nothing is written.
    let r = ctx
        .client
        .post(ctx.url("/projects"))
        .bearer_auth("nope-nope-nope-nope-nope")
        .json(&json!({"name": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(ctx.db.list_projects(None).await.unwrap().is_empty());

    let (s, _) = ctx.get("/agents").await;
    assert_eq!(s, StatusCode::OK);
    // The token is stored hashed only.
    let rows = sqlx::query("SELECT id, name, token_hash FROM admin_tokens")
        .fetch_all(ctx.db.pool())
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    let hash: String = rows[0].try_get("token_hash").unwrap();
    assert_eq!(hash, roony::auth::hash(TOKEN));
    let name: String = rows[0].try_get("name").unwrap();
    assert_eq!(name, TOKEN_NAME);
    // Health needs no token.
    let r = ctx
        .client
        .get(format!("{}/healthz", ctx.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

/// Every text column of every row of `table`, joined.
async fn dump(ctx: &Ctx, table: &str, columns: &[&str]) -> String {
    let sql = format!("SELECT {} FROM {table}", columns.join(", "));
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .fetch_all(ctx.db.pool())
        .await
        .unwrap();
    let mut out = String::new();
    for r in rows {
        for c in columns {
            if let Ok(Some(v)) = r.try_get::<Option<String>, _>(*c) {
                out.push_str(&v);
                out.push('\n');
            }
        }
    }
    out
}

async fn agents_and_keys(ctx: Ctx) {
    let project = ctx.project("shop").await;
    let (s, created) = ctx
        .post(
            "/agents",
            json!({"project_id": project, "name": "buyer", "id": "agt_buyer"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{created}");
    let key = created["key"].as_str().unwrap().to_string();
    let key_id = created["key_id"].as_str().unwrap().to_string();
    assert!(key.starts_with("roony_ak_"));
    assert_eq!(created["agent"]["status"], "active");
    assert_eq!(created["agent"]["project_id"], project.as_str());

    // Shown once: neither GET nor the key list returns it; only its hash is stored.
    let (s, got) = ctx.get("/agents/agt_buyer").await;
    assert_eq!(s, StatusCode::OK);
    assert!(!got.to_string().contains(&key));
    let (_, keys) = ctx.get("/agents/agt_buyer/keys").await;
    assert_eq!(keys["items"].as_array().unwrap().len(), 1);
    assert!(!keys.to_string().contains(&key));
    let stored = dump(&ctx, "agent_keys", &["key_id", "agent_id", "key_hash"]).await;
    assert!(!stored.contains(&key), "plaintext key stored");
    assert!(stored.contains(&roony::auth::hash(&key)));
    let audit = dump(
        &ctx,
        "audit_events",
        &["action", "target_id", "details", "actor_id"],
    )
    .await;
    assert!(!audit.contains(&key), "plaintext key in the audit trail");
    let (agent_id, hash, revoked) = ctx.db.agent_key_hash(&key_id).await.unwrap();
    assert_eq!(agent_id, "agt_buyer");
    assert!(roony::auth::verify(&key, &hash));
    assert!(!revoked);

    // Generated ids; duplicates; unknown project.
    let (s, b) = ctx
        .post("/agents", json!({"project_id": project, "name": "second"}))
        .await;
    assert_eq!(s, StatusCode::CREATED);
    assert!(b["agent"]["id"].as_str().unwrap().starts_with("agt_"));
    let (s, b) = ctx
        .post(
            "/agents",
            json!({"project_id": project, "name": "dup", "id": "agt_buyer"}),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(b["error"]["code"], "agent_exists");
    let (s, b) = ctx
        .post("/agents", json!({"project_id": "prj_nope", "name": "x"}))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(b["error"]["code"], "project_not_found");
    let (s, b) = ctx.get("/agents/agt_nope").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(b["error"]["code"], "agent_not_found");

    // Rotate: a new key, the old one revoked.
    let (s, rotated) = ctx.post_empty("/agents/agt_buyer/keys/rotate").await;
    assert_eq!(s, StatusCode::OK, "{rotated}");
    let new_key = rotated["key"].as_str().unwrap().to_string();
    let new_id = rotated["key_id"].as_str().unwrap().to_string();
    assert_ne!(new_key, key);
    assert_eq!(rotated["revoked_key_ids"], json!([key_id]));
    assert!(ctx.db.agent_key_hash(&key_id).await.unwrap().2);
    assert!(!ctx.db.agent_key_hash(&new_id).await.unwrap().2);
    let stored = dump(&ctx, "agent_keys", &["key_id", "agent_id", "key_hash"]).await;
    assert!(!stored.contains(&new_key));

    // Revoke; twice is a conflict; unknown key or agent is 404.
    let (s, b) = ctx
        .post_empty(&format!("/agents/agt_buyer/keys/{new_id}/revoke"))
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert!(b["revoked_at"].is_i64());
    let (s, b) = ctx
        .post_empty(&format!("/agents/agt_buyer/keys/{new_id}/revoke"))
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(b["error"]["code"], "key_already_revoked");
    let (s, b) = ctx.post_empty("/agents/agt_buyer/keys/nokey/revoke").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(b["error"]["code"], "agent_key_not_found");
    let (s, _) = ctx.post_empty("/agents/agt_nope/keys/rotate").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = ctx
        .post_empty(&format!("/agents/agt_nope/keys/{key_id}/revoke"))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // Every change is audited, by the admin token.
    let events = ctx
        .db
        .list_audit_events(Some(("agent", "agt_buyer")), 100)
        .await
        .unwrap();
    let actions: Vec<&str> = events.iter().map(|e| e.action.as_str()).collect();
    for a in ["agent.create", "agent.key.rotate", "agent.key.revoke"] {
        assert!(actions.contains(&a), "{a} not audited: {actions:?}");
    }
    assert!(events.iter().all(|e| e.actor_type == "admin_token"));
    assert!(events.iter().all(|e| e.request_id.is_some()));
}

async fn freeze_and_unfreeze(ctx: Ctx) {
    let project = ctx.project("p").await;
    ctx.agent(&project, "agt_a").await;
    ctx.agent(&project, "agt_b").await;
    let (s, b) = ctx
        .post(
            "/agents/agt_a/freeze",
            json!({"reason": "prompt injection suspected"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["status"], "frozen");
    assert_eq!(b["frozen_reason"], "prompt injection suspected");
    let (s, b) = ctx.post_empty("/agents/agt_b/freeze").await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["status"], "frozen");
    let (_, page) = ctx.get("/agents?status=frozen").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 2);
    let (s, b) = ctx.post_empty("/agents/agt_b/unfreeze").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["status"], "active");
    assert!(b.get("frozen_reason").is_none());
    let (_, page) = ctx.get("/agents?status=frozen").await;
    assert_eq!(page["items"][0]["id"], "agt_a");
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    let (_, page) = ctx
        .get(&format!("/agents?status=active&project_id={project}"))
        .await;
    assert_eq!(page["items"][0]["id"], "agt_b");
    let (s, _) = ctx.post_empty("/agents/agt_nope/freeze").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // A `null` body is the same as none.
    let (s, b) = ctx.post("/agents/agt_b/freeze", Value::Null).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["status"], "frozen");
    let (s, _) = ctx.post_empty("/agents/agt_b/unfreeze").await;
    assert_eq!(s, StatusCode::OK);
    let (s, b) = ctx.post("/agents/agt_a/freeze", json!({"why": "x"})).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(b["error"]["code"], "invalid_body");
    let events = ctx
        .db
        .list_audit_events(Some(("agent", "agt_b")), 100)
        .await
        .unwrap();
    let actions: Vec<&str> = events.iter().map(|e| e.action.as_str()).collect();
    assert!(actions.contains(&"agent.freeze") && actions.contains(&"agent.unfreeze"));
}

async fn policies_are_versioned(ctx: Ctx) {
    let project = ctx.project("p").await;
    ctx.agent(&project, "agt_p").await;
    let (s, b) = ctx.get("/agents/agt_p/policy").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(b["error"]["code"], "policy_not_found");

    let v1 = json!({"currency": "usd", "max_per_transaction": 10000,
        "budgets": [{"period": "daily", "limit": 25000}]});
    let (s, r1) = ctx.put("/agents/agt_p/policy", v1).await;
    assert_eq!(s, StatusCode::OK, "{r1}");
    assert_eq!(r1["revision"], 1);
    assert_eq!(r1["author"], TOKEN_NAME);
    assert_eq!(r1["document"]["currency"], "USD");
    assert!(r1["created_at"].is_i64());

    let v2 = json!({"currency": "USD", "max_per_transaction": 5000});
    let (s, r2) = ctx.put("/agents/agt_p/policy", v2).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(r2["revision"], 2);
    assert_eq!(r2["policy_id"], r1["policy_id"]);

    let (s, current) = ctx.get("/agents/agt_p/policy").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(current["revision"], 2);
    assert_eq!(current["document"]["max_per_transaction"], 5000);
    let (_, revs) = ctx.get("/agents/agt_p/policy/revisions").await;
    let revs = revs["items"].as_array().unwrap().clone();
    assert_eq!(revs.len(), 2);
    assert_eq!(revs[0]["revision"], 2);
    assert_eq!(revs[1]["revision"], 1);
    assert_eq!(revs[1]["document"]["budgets"][0]["limit"], 25000);
    assert!(revs.iter().all(|r| r["author"] == TOKEN_NAME));

    // The stored document is a valid policy.
    let p: roony::policy::Policy = serde_json::from_value(revs[0]["document"].clone()).unwrap();
    assert!(p.compile().is_ok());

    let (s, _) = ctx
        .put("/agents/agt_nope/policy", json!({"currency": "USD"}))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = ctx.get("/agents/agt_nope/policy/revisions").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let events = ctx
        .db
        .list_audit_events(Some(("agent", "agt_p")), 100)
        .await
        .unwrap();
    assert_eq!(
        events.iter().filter(|e| e.action == "policy.write").count(),
        2
    );
}

async fn invalid_policies_name_every_field(ctx: Ctx) {
    let project = ctx.project("p").await;
    ctx.agent(&project, "agt_bad").await;
    let (s, b) = ctx
        .put(
            "/agents/agt_bad/policy",
            json!({
                "currency": "USD",
                "max_per_transaction": 0,
                "budgets": [{"period": "daily", "limit": 100}, {"period": "monthly", "limit": -5}],
                "countries": {"allow": ["US", "ZZ"]},
                "velocity": [{"max_intents": 0, "window_seconds": 60}],
            }),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    assert_eq!(b["error"]["code"], "invalid_policy");
    let fields: Vec<&str> = b["error"]["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    for f in [
        "max_per_transaction",
        "budgets[1].limit",
        "countries.allow[1]",
        "velocity[0].max_intents",
    ] {
        assert!(fields.contains(&f), "{f} not reported: {fields:?}");
    }
    assert!(
        b["error"]["errors"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| !e["reason"].as_str().unwrap().is_empty())
    );
    assert_eq!(b["error"]["field"], fields[0]);
    // Nothing was stored.
    let (s, _) = ctx.get("/agents/agt_bad/policy").await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // Schema-level problems are invalid_policy too.
    for bad in [
        json!({"currency": "USD", "surprise": 1}),
        json!({"currency": "XXXX"}),
        json!({"max_per_transaction": 5}),
        json!([1, 2]),
    ] {
        let (s, b) = ctx.put("/agents/agt_bad/policy", bad.clone()).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {b}");
        assert_eq!(b["error"]["code"], "invalid_policy", "{bad}");
    }
    let (s, _) = ctx.get("/agents/agt_bad/policy").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

async fn concurrent_policy_writes_get_distinct_revisions(ctx: Ctx) {
    let project = ctx.project("p").await;
    ctx.agent(&project, "agt_c").await;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let client = ctx.client.clone();
        let url = ctx.url("/agents/agt_c/policy");
        tasks.push(tokio::spawn(async move {
            let r = client
                .put(url)
                .bearer_auth(TOKEN)
                .json(&json!({"currency": "USD", "max_per_transaction": 1000 + i}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            let b: Value = r.json().await.unwrap();
            b["revision"].as_i64().unwrap()
        }));
    }
    let mut revisions = Vec::new();
    for t in tasks {
        revisions.push(t.await.unwrap());
    }
    revisions.sort();
    assert_eq!(revisions, (1..=8).collect::<Vec<_>>());
    let (_, current) = ctx.get("/agents/agt_c/policy").await;
    assert_eq!(current["revision"], 8);
}

async fn budgets(ctx: Ctx) {
    let (_, orgs) = ctx.get("/organizations").await;
    let org = orgs["items"][0]["id"].as_str().unwrap().to_string();
    let project = ctx.project("p").await;
    ctx.agent(&project, "agt_b").await;

    let (s, b) = ctx
        .put(
            "/budgets",
            json!({"scope": "org", "scope_id": org, "period": "monthly", "currency": "usd", "limit": 1_000_000}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["currency"], "USD");
    assert_eq!(b["limit"], 1_000_000);
    let org_budget_id = b["id"].clone();
    let (s, _) = ctx
        .put(
            "/budgets",
            json!({"scope": "project", "scope_id": project, "period": "daily", "currency": "USD", "limit": 50_000}),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = ctx
        .put(
            "/budgets",
            json!({"scope": "agent", "scope_id": "agt_b", "period": "all_time", "currency": "EUR", "limit": 999}),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    // Setting again replaces the limit of the same budget.
    let (s, b) = ctx
        .put(
            "/budgets",
            json!({"scope": "org", "scope_id": org, "period": "monthly", "currency": "USD", "limit": 2_000_000}),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["id"], org_budget_id);
    assert_eq!(b["limit"], 2_000_000);

    let (_, all) = ctx.get("/budgets").await;
    assert_eq!(all["items"].as_array().unwrap().len(), 3);
    let (_, p) = ctx
        .get(&format!("/budgets?scope=project&scope_id={project}"))
        .await;
    assert_eq!(p["items"].as_array().unwrap().len(), 1);
    assert_eq!(p["items"][0]["period"], "daily");
    let (s, b) = ctx.get("/budgets?scope=galaxy").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(b["error"]["field"], "scope");

    let cases = [
        (
            json!({"scope": "project", "scope_id": "prj_nope", "period": "daily", "currency": "USD", "limit": 1}),
            StatusCode::NOT_FOUND,
            "project_not_found",
        ),
        (
            json!({"scope": "agent", "scope_id": "agt_nope", "period": "daily", "currency": "USD", "limit": 1}),
            StatusCode::NOT_FOUND,
            "agent_not_found",
        ),
        (
            json!({"scope": "project", "scope_id": project, "period": "daily", "currency": "ABC", "limit": 1}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_currency",
        ),
        (
            json!({"scope": "project", "scope_id": project, "period": "daily", "currency": "USD", "limit": 0}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_amount",
        ),
        (
            json!({"scope": "project", "scope_id": project, "period": "hourly", "currency": "USD", "limit": 1}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
        (
            json!({"scope": "team", "scope_id": project, "period": "daily", "currency": "USD", "limit": 1}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
    ];
    for (body, status, code) in cases {
        let (s, b) = ctx.put("/budgets", body.clone()).await;
        assert_eq!(s, status, "{body}: {b}");
        assert_eq!(b["error"]["code"], code, "{body}");
    }
    let events = ctx.db.list_audit_events(None, 100).await.unwrap();
    assert_eq!(
        events.iter().filter(|e| e.action == "budget.set").count(),
        4
    );
}

fn intent(id: &str, agent: &str, status: &str, created_at: i64) -> NewIntent {
    NewIntent {
        id: id.into(),
        agent_id: agent.into(),
        status: status.into(),
        amount: 1200,
        currency: "USD".into(),
        merchant_name: "Namecheap".into(),
        merchant_domain: Some("namecheap.com".into()),
        merchant_country: Some("US".into()),
        description: Some("a domain".into()),
        reasons: vec![match status {
            "approved" => "within_policy".into(),
            "pending_approval" => "approval_required".into(),
            _ => "exceeds_budget".into(),
        }],
        decision_outcome: Some(status.into()),
        created_at,
    }
}

/// 30 intents: agents a (project 1) and b (project 2), statuses cycling, one a second apart,
/// two per second for the last ten (same `created_at`, ordered by id).
async fn seed_ledger(ctx: &Ctx) -> (String, String) {
    let p1 = ctx.project("one").await;
    let p2 = ctx.project("two").await;
    ctx.agent(&p1, "agt_a").await;
    ctx.agent(&p2, "agt_b").await;
    let statuses = ["approved", "declined", "pending_approval"];
    for i in 0..30i64 {
        let agent = if i % 2 == 0 { "agt_a" } else { "agt_b" };
        let created = if i < 20 {
            1_000 + i
        } else {
            1_020 + (i - 20) / 2
        };
        ctx.db
            .insert_intent(&intent(
                &format!("pur_{i:04}"),
                agent,
                statuses[(i % 3) as usize],
                created,
            ))
            .await
            .unwrap();
    }
    (p1, p2)
}

async fn collect_pages(ctx: &Ctx, path: &str, limit: u32) -> (Vec<Value>, usize) {
    let mut items = Vec::new();
    let mut pages = 0;
    let mut cursor: Option<String> = None;
    loop {
        let sep = if path.contains('?') { '&' } else { '?' };
        let mut url = format!("{path}{sep}limit={limit}");
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let (s, b) = ctx.get(&url).await;
        assert_eq!(s, StatusCode::OK, "{url}: {b}");
        pages += 1;
        let page = b["items"].as_array().unwrap();
        assert!(page.len() <= limit as usize);
        items.extend(page.iter().cloned());
        match b.get("next_cursor").and_then(Value::as_str) {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
        assert!(pages < 100);
    }
    (items, pages)
}

fn ids(items: &[Value]) -> Vec<String> {
    items
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect()
}

async fn intents_filters_and_pagination(ctx: Ctx) {
    let (p1, _p2) = seed_ledger(&ctx).await;

    // All, newest first, in pages of 7: no gaps, no repeats, across equal created_at.
    let (all, pages) = collect_pages(&ctx, "/intents", 7).await;
    assert_eq!(all.len(), 30);
    assert_eq!(pages, 5);
    let got = ids(&all);
    let mut expected: Vec<String> = (0..30).map(|i| format!("pur_{i:04}")).collect();
    expected.reverse();
    assert_eq!(got, expected);
    let created: Vec<i64> = all
        .iter()
        .map(|i| i["created_at"].as_i64().unwrap())
        .collect();
    assert!(created.windows(2).all(|w| w[0] >= w[1]));

    // Exactly one page: no cursor.
    let (s, b) = ctx.get("/intents?limit=30").await;
    assert_eq!(s, StatusCode::OK);
    assert!(b.get("next_cursor").is_none());
    assert_eq!(b["items"].as_array().unwrap().len(), 30);
    let (_, b) = ctx.get("/intents").await;
    assert_eq!(
        b["items"].as_array().unwrap().len(),
        20,
        "default page size"
    );

    // Filters, alone and combined, with pagination.
    let (a, _) = collect_pages(&ctx, "/intents?agent_id=agt_a", 4).await;
    assert_eq!(a.len(), 15);
    assert!(a.iter().all(|i| i["agent_id"] == "agt_a"));
    let (p, _) = collect_pages(&ctx, &format!("/intents?project_id={p1}"), 4).await;
    assert_eq!(ids(&p), ids(&a));
    let (pending, _) = collect_pages(&ctx, "/intents?status=pending_approval", 3).await;
    assert_eq!(pending.len(), 10);
    assert!(pending.iter().all(|i| i["status"] == "pending_approval"));
    let (range, _) = collect_pages(&ctx, "/intents?created_from=1005&created_to=1010", 2).await;
    assert_eq!(
        ids(&range),
        vec!["pur_0009", "pur_0008", "pur_0007", "pur_0006", "pur_0005"]
    );
    let (combo, _) = collect_pages(
        &ctx,
        "/intents?agent_id=agt_b&status=declined&created_from=1000&created_to=1020",
        2,
    )
    .await;
    // Odd i (agent b) with i % 3 == 1, i < 20: 1, 7, 13, 19.
    assert_eq!(
        ids(&combo),
        vec!["pur_0019", "pur_0013", "pur_0007", "pur_0001"]
    );
    let (s, b) = ctx.get("/intents?agent_id=agt_nobody").await;
    assert_eq!(s, StatusCode::OK);
    assert!(b["items"].as_array().unwrap().is_empty());

    // One intent.
    let (s, b) = ctx.get("/intents/pur_0002").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["amount"], 1200);
    assert_eq!(b["currency"], "USD");
    assert_eq!(b["reasons"], json!(["approval_required"]));
    assert!(b["decision_id"].as_str().unwrap().starts_with("dec_"));
    let (s, b) = ctx.get("/intents/pur_nope").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(b["error"]["code"], "intent_not_found");

    // Bad paging input.
    for (q, field) in [
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("cursor=%%%", "cursor"),
        ("cursor=bm90LWEtY3Vyc29y", "cursor"),
        ("status=lost", "status"),
    ] {
        let (s, b) = ctx.get(&format!("/intents?{q}")).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{q}: {b}");
        assert_eq!(b["error"]["code"], "invalid_query", "{q}");
        assert_eq!(b["error"]["field"], field, "{q}");
    }
    let (s, b) = ctx.get("/intents?created_from=yesterday").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(b["error"]["code"], "invalid_query");

    // The repository agrees with the API.
    let page = ctx
        .db
        .list_intents(
            &LedgerFilter {
                agent_id: Some("agt_a".into()),
                ..Default::default()
            },
            100,
            None,
        )
        .await
        .unwrap();
    assert_eq!(page.items.len(), 15);
    assert!(page.next_cursor.is_none());
}

async fn decisions_filters(ctx: Ctx) {
    seed_ledger(&ctx).await;
    let (all, _) = collect_pages(&ctx, "/decisions", 8).await;
    assert_eq!(all.len(), 30);
    assert!(all.iter().all(|d| d["decided_by"] == "sidecar"));
    let (declined, _) = collect_pages(&ctx, "/decisions?outcome=declined&agent_id=agt_a", 2).await;
    // Even i with i % 3 == 1: 4, 10, 16, 22, 28.
    assert_eq!(declined.len(), 5);
    assert!(
        declined
            .iter()
            .all(|d| d["outcome"] == "declined" && d["agent_id"] == "agt_a")
    );
    let (s, b) = ctx.get("/decisions?outcome=maybe").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(b["error"]["field"], "outcome");
}

async fn approvals(ctx: Ctx) {
    seed_ledger(&ctx).await;
    // pur_0002 is pending (i % 3 == 2), pur_0000 approved, pur_0001 declined.
    let (s, b) = ctx
        .post("/intents/pur_0002/approve", json!({"note": "looks fine"}))
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["intent"]["status"], "approved");
    assert_eq!(b["intent"]["reasons"], json!(["approved_by_admin"]));
    assert_eq!(b["decision"]["outcome"], "approved");
    assert_eq!(b["decision"]["decided_by"], "admin");
    assert_eq!(b["decision"]["actor"], TOKEN_NAME);
    assert_eq!(b["decision"]["note"], "looks fine");
    assert_eq!(b["intent"]["decision_id"], b["decision"]["id"]);

    // Approving or denying again, or a non-pending intent, is a conflict; nothing changes.
    for path in [
        "/intents/pur_0002/approve",
        "/intents/pur_0002/deny",
        "/intents/pur_0000/approve",
        "/intents/pur_0001/deny",
    ] {
        let (s, b) = ctx.post_empty(path).await;
        assert_eq!(s, StatusCode::CONFLICT, "{path}: {b}");
        assert_eq!(b["error"]["code"], "intent_not_pending");
    }
    let (_, i) = ctx.get("/intents/pur_0001").await;
    assert_eq!(i["status"], "declined");

    let (s, b) = ctx.post_empty("/intents/pur_0005/deny").await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["intent"]["status"], "declined");
    assert_eq!(b["decision"]["reasons"], json!(["denied_by_admin"]));
    assert!(b["decision"].get("note").is_none());

    let (s, b) = ctx.post_empty("/intents/pur_nope/approve").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(b["error"]["code"], "intent_not_found");
    let (s, b) = ctx
        .post("/intents/pur_0008/approve", json!({"note": 5}))
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(b["error"]["code"], "invalid_body");
    let (_, i) = ctx.get("/intents/pur_0008").await;
    assert_eq!(i["status"], "pending_approval");

    // Both admin decisions are listed, and audited.
    let (_, d) = ctx.get("/decisions?agent_id=agt_b&outcome=declined").await;
    assert!(
        d["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["intent_id"] == "pur_0005" && d["decided_by"] == "admin")
    );
    let (pending, _) = collect_pages(&ctx, "/intents?status=pending_approval", 50).await;
    assert_eq!(pending.len(), 8);
    for (id, action) in [("pur_0002", "intent.approve"), ("pur_0005", "intent.deny")] {
        let events = ctx
            .db
            .list_audit_events(Some(("intent", id)), 10)
            .await
            .unwrap();
        assert_eq!(events.len(), 1, "{id}");
        assert_eq!(events[0].action, action);
        assert_eq!(events[0].outcome, "success");
    }

    // Concurrent approve and deny of one pending intent: exactly one wins.
    let mut tasks = Vec::new();
    for action in ["approve", "deny", "approve", "deny"] {
        let client = ctx.client.clone();
        let url = ctx.url(&format!("/intents/pur_0011/{action}"));
        tasks.push(tokio::spawn(async move {
            client
                .post(url)
                .bearer_auth(TOKEN)
                .send()
                .await
                .unwrap()
                .status()
        }));
    }
    let mut ok = 0;
    for t in tasks {
        let s = t.await.unwrap();
        assert!(s == StatusCode::OK || s == StatusCode::CONFLICT, "{s}");
        if s == StatusCode::OK {
            ok += 1;
        }
    }
    assert_eq!(ok, 1);
}

/// Sets an intent's deadline (what a sidecar reports as `expires_at`).
async fn set_expires_at(ctx: &Ctx, id: &str, at: i64) {
    sqlx::query("UPDATE intents SET expires_at = $1 WHERE id = $2")
        .bind(at)
        .bind(id.to_string())
        .execute(ctx.db.pool())
        .await
        .unwrap();
}

async fn approvals_refused_when_frozen_or_expired(ctx: Ctx) {
    seed_ledger(&ctx).await;
    let now = common::dash::now();
    // pur_0002 (agt_a) and pur_0005 (agt_b) are pending.
    let (s, _) = ctx
        .post(
            "/agents/agt_a/freeze",
            json!({"reason": "discrepancy over_capture"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let decisions_before = ctx
        .db
        .list_decisions(&LedgerFilter::default(), 100, None)
        .await
        .unwrap()
        .items
        .len();
    let revision_before = ctx.db.config_revision().await.unwrap();

    // Approving for a frozen agent: 409 agent_frozen, nothing written.
    let (s, b) = ctx
        .post("/intents/pur_0002/approve", json!({"note": "please"}))
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{b}");
    assert_eq!(b["error"]["code"], "agent_frozen");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("discrepancy over_capture"),
        "{b}"
    );
    let (_, i) = ctx.get("/intents/pur_0002").await;
    assert_eq!(i["status"], "pending_approval");
    assert_eq!(i["reasons"], json!(["approval_required"]));
    let row = sqlx::query("SELECT admin_decision FROM intents WHERE id = 'pur_0002'")
        .fetch_one(ctx.db.pool())
        .await
        .unwrap();
    assert_eq!(row.get::<Option<String>, _>("admin_decision"), None);
    assert_eq!(
        ctx.db
            .list_decisions(&LedgerFilter::default(), 100, None)
            .await
            .unwrap()
            .items
            .len(),
        decisions_before
    );
    assert_eq!(ctx.db.config_revision().await.unwrap(), revision_before);
    assert!(
        ctx.db
            .list_audit_events(Some(("intent", "pur_0002")), 10)
            .await
            .unwrap()
            .is_empty()
    );
    // Denying stays possible.
    let (s, b) = ctx.post_empty("/intents/pur_0002/deny").await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["intent"]["status"], "declined");
    // Unfrozen, its next pending purchase can be approved again.
    let (s, _) = ctx.post_empty("/agents/agt_a/unfreeze").await;
    assert_eq!(s, StatusCode::OK);
    let (s, b) = ctx.post_empty("/intents/pur_0008/approve").await;
    assert_eq!(s, StatusCode::OK, "{b}");

    // A request past its deadline: neither approved nor denied.
    set_expires_at(&ctx, "pur_0005", now - 5).await;
    for action in ["approve", "deny"] {
        let (s, b) = ctx.post_empty(&format!("/intents/pur_0005/{action}")).await;
        assert_eq!(s, StatusCode::CONFLICT, "{action}: {b}");
        assert_eq!(b["error"]["code"], "intent_expired", "{action}");
    }
    let (_, i) = ctx.get("/intents/pur_0005").await;
    assert_eq!(i["status"], "pending_approval");
    // Before its deadline it can be decided.
    set_expires_at(&ctx, "pur_0011", now + 600).await;
    let (s, b) = ctx.post_empty("/intents/pur_0011/deny").await;
    assert_eq!(s, StatusCode::OK, "{b}");
}

async fn budgets_are_deleted(ctx: Ctx) {
    let project = ctx.project("p").await;
    ctx.agent(&project, "agt_d").await;
    let (s, b) = ctx
        .put(
            "/budgets",
            json!({"scope": "project", "scope_id": project, "period": "daily", "currency": "USD", "limit": 50_000}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let id = b["id"].as_str().unwrap().to_string();
    let (s, _) = ctx
        .put(
            "/budgets",
            json!({"scope": "agent", "scope_id": "agt_d", "period": "daily", "currency": "USD", "limit": 1_000}),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let revision = ctx.db.config_revision().await.unwrap();

    // Unauthenticated: refused, nothing deleted.
    let r = ctx
        .client
        .delete(ctx.url(&format!("/budgets/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let (s, b) = ctx
        .send(
            ctx.client
                .delete(ctx.url(&format!("/budgets/{id}")))
                .bearer_auth(TOKEN),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["id"], id.as_str());
    assert_eq!(b["scope"], "project");
    assert_eq!(b["limit"], 50_000);
    assert!(ctx.db.config_revision().await.unwrap() > revision);
    let (_, all) = ctx.get("/budgets").await;
    let items = all["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{all}");
    assert_eq!(items[0]["scope"], "agent");
    let events = ctx
        .db
        .list_audit_events(Some(("project", &project)), 10)
        .await
        .unwrap();
    assert_eq!(events[0].action, "budget.delete");
    assert_eq!(events[0].details["budget_id"], id.as_str());
    // Gone: 404, and its leases endpoint too.
    let (s, b) = ctx
        .send(
            ctx.client
                .delete(ctx.url(&format!("/budgets/{id}")))
                .bearer_auth(TOKEN),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(b["error"]["code"], "budget_not_found");
    let (s, _) = ctx.get(&format!("/budgets/{id}/leases")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

async fn audit_trail(ctx: Ctx) {
    let project = ctx.project("audited").await;
    ctx.agent(&project, "agt_au").await;
    ctx.post_empty("/agents/agt_au/freeze").await;
    ctx.post_empty("/agents/agt_au/unfreeze").await;
    ctx.put("/agents/agt_au/policy", json!({"currency": "USD"}))
        .await;
    ctx.post_empty("/agents/agt_au/keys/rotate").await;
    // Refused calls write nothing.
    ctx.put(
        "/agents/agt_au/policy",
        json!({"currency": "USD", "max_per_transaction": 0}),
    )
    .await;

    let (all, _) = collect_pages(&ctx, "/audit_events", 2).await;
    // Every request is audited too (`http.request`); the domain events are the rest.
    let all: Vec<_> = all
        .into_iter()
        .filter(|e| e["action"] != "http.request")
        .collect();
    let actions: Vec<&str> = all.iter().map(|e| e["action"].as_str().unwrap()).collect();
    // Newest first; the system created the default organization and the bootstrap token.
    assert_eq!(
        &actions[..6],
        &[
            "agent.key.rotate",
            "policy.write",
            "agent.unfreeze",
            "agent.freeze",
            "agent.create",
            "project.create"
        ]
    );
    assert!(actions.contains(&"organization.create"));
    assert!(actions.contains(&"admin_token.create"));
    assert_eq!(actions.len(), 8);
    for e in &all[..6] {
        assert_eq!(e["actor_type"], "admin_token");
        assert_eq!(e["outcome"], "success");
        assert!(e["request_id"].as_str().unwrap().starts_with("req_"));
    }
    let (agent_events, _) =
        collect_pages(&ctx, "/audit_events?target_type=agent&target_id=agt_au", 3).await;
    assert_eq!(agent_events.len(), 5);
    let (s, b) = ctx.get("/audit_events?action=agent.freeze").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["items"].as_array().unwrap().len(), 1);
    assert_eq!(
        b["items"][0]["details"]["reason"],
        "frozen by an administrator"
    );
    let (s, b) = ctx.get("/audit_events?actor_type=system").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["items"].as_array().unwrap().len(), 2);
    let (s, b) = ctx.get("/audit_events?cursor=zzz").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(b["error"]["field"], "cursor");
}

async fn bad_input_is_4xx(ctx: Ctx) {
    let project = ctx.project("p").await;
    ctx.agent(&project, "agt_x").await;
    let c = &ctx.client;
    let u = |p: &str| ctx.url(p);
    let requests = vec![
        c.post(u("/projects")).bearer_auth(TOKEN).body("{not json").header("content-type", "application/json"),
        c.post(u("/projects")).bearer_auth(TOKEN).body("{\"name\":\"x\"}"),
        c.post(u("/projects")).bearer_auth(TOKEN).json(&json!({"name": ""})),
        c.post(u("/projects")).bearer_auth(TOKEN).json(&json!({"name": "a\u{0}b"})),
        c.post(u("/projects")).bearer_auth(TOKEN).json(&json!({"name": "x".repeat(201)})),
        c.post(u("/projects")).bearer_auth(TOKEN).json(&json!({"name": "p"})),
        c.post(u("/projects")).bearer_auth(TOKEN).json(&json!({"name": "q", "org_id": "org_nope"})),
        c.post(u("/projects")).bearer_auth(TOKEN).json(&json!({"name": 7})),
        c.post(u("/projects")).bearer_auth(TOKEN).body(vec![b'a'; 70 * 1024]).header("content-type", "application/json"),
        c.post(u("/agents")).bearer_auth(TOKEN).json(&json!({"project_id": project, "name": "n", "id": "bad id!"})),
        c.post(u("/agents")).bearer_auth(TOKEN).json(&json!({"project_id": project, "name": "n", "id": "x".repeat(65)})),
        c.post(u("/agents")).bearer_auth(TOKEN).json(&json!({})),
        c.post(u("/organizations")).bearer_auth(TOKEN).json(&json!({"name": "  "})),
        c.get(u("/agents?limit=-1")).bearer_auth(TOKEN),
        c.get(u("/agents?status=sleeping")).bearer_auth(TOKEN),
        c.get(u("/agents?cursor=abc")).bearer_auth(TOKEN),
        c.get(u("/agents/%FF")).bearer_auth(TOKEN),
        c.get(u("/intents/%FF")).bearer_auth(TOKEN),
        c.get(u("/intents?created_to=99999999999999999999999")).bearer_auth(TOKEN),
        c.post(u("/intents/%FF/approve")).bearer_auth(TOKEN),
        c.put(u("/agents/agt_x/policy")).bearer_auth(TOKEN).body("[").header("content-type", "application/json"),
        c.put(u("/agents/agt_x/policy")).bearer_auth(TOKEN).body("{}"),
        c.put(u("/agents/agt_x/policy")).bearer_auth(TOKEN).json(&json!(null)),
        c.put(u("/agents/agt_x/policy")).bearer_auth(TOKEN).json(&json!({"currency": "USD", "max_per_transaction": i64::MAX})),
        c.put(u("/budgets")).bearer_auth(TOKEN).json(&json!({"scope": "agent", "scope_id": "agt_x", "period": "daily", "currency": "USD", "limit": i64::MAX})),
        c.put(u("/budgets")).bearer_auth(TOKEN).json(&json!({"scope": "agent", "scope_id": "agt_x", "period": "daily", "currency": "USD", "limit": 1.5})),
        c.post(u("/agents/agt_x/freeze")).bearer_auth(TOKEN).json(&json!({"reason": "x".repeat(1001)})),
        c.post(u("/agents/agt_x/freeze")).bearer_auth(TOKEN).body("{}"),
        c.delete(u("/agents/agt_x")).bearer_auth(TOKEN),
        c.get(u("/nothing-here")).bearer_auth(TOKEN),
        c.get(format!("{}/api/admin/v2/agents", ctx.base)).bearer_auth(TOKEN),
    ];
    for req in requests {
        let req = req.build().unwrap();
        let desc = format!("{} {}", req.method(), req.url());
        let resp = c.execute(req).await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        assert!(status.is_client_error(), "{desc}: {status} {text}");
        let body: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{desc}: {text}"));
        assert!(body["error"]["code"].is_string(), "{desc}: {text}");
    }
    // Nothing above changed the agent.
    let (_, a) = ctx.get("/agents/agt_x").await;
    assert_eq!(a["status"], "active");
    let (s, _) = ctx.get("/agents/agt_x/policy").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

/// GET /projects with `token`: the status.
async fn status_with(ctx: &Ctx, token: &str) -> StatusCode {
    ctx.client
        .get(ctx.url("/projects"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
}

async fn create_token(ctx: &Ctx, name: &str) -> (String, String) {
    let (s, b) = ctx.post("/admin_tokens", json!({"name": name})).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    (
        b["id"].as_str().unwrap().to_string(),
        b["token"].as_str().unwrap().to_string(),
    )
}

async fn admin_tokens(ctx: Ctx) {
    // Create: the token is shown once, in the generated format, stored as a hash only.
    let r = ctx
        .client
        .post(ctx.url("/admin_tokens"))
        .bearer_auth(TOKEN)
        .json(&json!({"name": "  ci deploys  "}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["name"], "ci deploys");
    let token = b["token"].as_str().unwrap().to_string();
    let id = b["id"].as_str().unwrap().to_string();
    assert!(
        token.starts_with("roony_at_") && token.len() == 9 + 64,
        "{token}"
    );
    assert_eq!(id, roony::auth::key_id(&token));
    assert!(b["created_at"].as_i64().unwrap() > 0);
    assert_eq!(status_with(&ctx, &token).await, StatusCode::OK);
    let hash: String = sqlx::query("SELECT token_hash FROM admin_tokens WHERE id = $1")
        .bind(id.clone())
        .fetch_one(ctx.db.pool())
        .await
        .unwrap()
        .try_get("token_hash")
        .unwrap();
    assert_eq!(hash, roony::auth::hash(&token));

    // List: newest first, never a token or hash.
    let (s, list) = ctx.get("/admin_tokens").await;
    assert_eq!(s, StatusCode::OK);
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    // Newest first by (created_at, id); ids derive from the tokens, so within one second
    // the order is by id.
    let key = |i: &Value| {
        (
            i["created_at"].as_i64().unwrap(),
            i["id"].as_str().unwrap().to_string(),
        )
    };
    assert!(key(&items[0]) > key(&items[1]));
    let mine = items.iter().find(|i| i["id"] == id.as_str()).unwrap();
    assert_eq!(mine["name"], "ci deploys");
    assert!(items.iter().any(|i| i["name"] == TOKEN_NAME));
    for item in items {
        let keys: Vec<&String> = item.as_object().unwrap().keys().collect();
        assert_eq!(
            keys.len(),
            5,
            "{item}: only id, name, created_at, last_used_at, revoked_at"
        );
        assert!(item["revoked_at"].is_null());
    }
    let text = list.to_string();
    assert!(!text.contains(&token) && !text.contains(&hash) && !text.contains(TOKEN));
    assert!(!text.contains(&roony::auth::hash(TOKEN)));

    // Bad names: 422 invalid_name naming the field; nothing stored.
    for bad in [
        json!({"name": ""}),
        json!({"name": "   "}),
        json!({"name": "a\u{7}b"}),
        json!({"name": "x".repeat(101)}),
    ] {
        let (s, b) = ctx.post("/admin_tokens", bad.clone()).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {b}");
        assert_eq!(b["error"]["code"], "invalid_name", "{bad}");
        assert_eq!(b["error"]["field"], "name");
    }
    let (s, _) = ctx
        .post("/admin_tokens", json!({"name": "x".repeat(100)}))
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, b) = ctx.post("/admin_tokens", json!({"nom": "x"})).await;
    assert!(s.is_client_error(), "{b}");
    let (s, b) = ctx.post("/admin_tokens", json!({"name": 5})).await;
    assert!(s.is_client_error(), "{b}");
    // Without a valid token nothing is created.
    let r = ctx
        .client
        .post(ctx.url("/admin_tokens"))
        .bearer_auth("not-a-real-admin-token-000")
        .json(&json!({"name": "sneaky"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let (_, list) = ctx.get("/admin_tokens").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 3);

    // Revoke: 200 with the view, then 401 with it, 409 the second time, 404 unknown.
    let (s, b) = ctx.post_empty(&format!("/admin_tokens/{id}/revoke")).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["id"], id.as_str());
    assert!(b["revoked_at"].as_i64().unwrap() > 0);
    assert!(b.get("token").is_none() && b.get("token_hash").is_none());
    let r = ctx
        .client
        .get(ctx.url("/projects"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "invalid_admin_token");
    let (s, b) = ctx.post_empty(&format!("/admin_tokens/{id}/revoke")).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(b["error"]["code"], "admin_token_already_revoked");
    for unknown in ["h000000000000000", "nope", "%FF"] {
        let (s, b) = ctx
            .post_empty(&format!("/admin_tokens/{unknown}/revoke"))
            .await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{unknown}: {b}");
        assert_eq!(b["error"]["code"], "admin_token_not_found");
    }

    // A token may revoke itself while another is active; the last active one cannot go.
    let (id2, token2) = create_token(&ctx, "second").await;
    let bootstrap_id = roony::auth::key_id(TOKEN);
    let (_, list) = ctx.get("/admin_tokens").await;
    for item in list["items"].as_array().unwrap() {
        let item_id = item["id"].as_str().unwrap();
        if item["revoked_at"].is_null() && item_id != id2 && item_id != bootstrap_id {
            let (s, _) = ctx
                .post_empty(&format!("/admin_tokens/{item_id}/revoke"))
                .await;
            assert_eq!(s, StatusCode::OK);
        }
    }
    let (s, b) = ctx
        .post_empty(&format!("/admin_tokens/{bootstrap_id}/revoke"))
        .await;
    assert_eq!(s, StatusCode::OK, "{b}: revoking the requesting token");
    assert_eq!(status_with(&ctx, TOKEN).await, StatusCode::UNAUTHORIZED);
    assert_eq!(status_with(&ctx, &token2).await, StatusCode::OK);
    let r = ctx
        .client
        .post(ctx.url(&format!("/admin_tokens/{id2}/revoke")))
        .bearer_auth(&token2)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["error"]["code"], "last_admin_token");
    assert_eq!(status_with(&ctx, &token2).await, StatusCode::OK);
    let active: i64 =
        sqlx::query("SELECT COUNT(*) AS n FROM admin_tokens WHERE revoked_at IS NULL")
            .fetch_one(ctx.db.pool())
            .await
            .unwrap()
            .try_get("n")
            .unwrap();
    assert_eq!(active, 1);

    // Audit: creations and revocations by the acting token; never a token in the details.
    let events = ctx.db.list_audit_events(None, 100).await.unwrap();
    let creates: Vec<_> = events
        .iter()
        .filter(|e| e.action == "admin_token.create" && e.actor_type == "admin_token")
        .collect();
    assert_eq!(creates.len(), 3);
    let revokes: Vec<_> = events
        .iter()
        .filter(|e| e.action == "admin_token.revoke")
        .collect();
    assert_eq!(revokes.len(), 3);
    let own = revokes.iter().find(|e| e.target_id == id).unwrap();
    assert_eq!(own.actor_type, "admin_token");
    assert_eq!(own.actor_id, bootstrap_id);
    assert_eq!(own.details["name"], "ci deploys");
    assert!(own.request_id.as_deref().unwrap().starts_with("req_"));
    let all = serde_json::to_string(&events).unwrap();
    assert!(!all.contains(&token) && !all.contains(&token2) && !all.contains(TOKEN));
    assert!(!all.contains(&hash));
    // Refusals wrote nothing.
    assert_eq!(
        events
            .iter()
            .filter(|e| e.action.starts_with("admin_token."))
            .count(),
        7
    );
}

async fn admin_token_last_used(ctx: Ctx) {
    let (id, token) = create_token(&ctx, "usage").await;
    let last_used = |ctx: &Ctx, id: String| {
        let pool = ctx.db.pool().clone();
        async move {
            sqlx::query("SELECT last_used_at FROM admin_tokens WHERE id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap()
                .try_get::<Option<i64>, _>("last_used_at")
                .unwrap()
        }
    };
    // Never used yet; the creating token was.
    let (_, list) = ctx.get("/admin_tokens").await;
    let find = |list: &Value, id: &str| {
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["id"] == id)
            .unwrap()
            .clone()
    };
    assert!(find(&list, &id)["last_used_at"].is_null());
    assert!(
        find(&list, &roony::auth::key_id(TOKEN))["last_used_at"]
            .as_i64()
            .is_some()
    );
    // Used: set.
    let before = control_now();
    assert_eq!(status_with(&ctx, &token).await, StatusCode::OK);
    let t = last_used(&ctx, id.clone()).await.unwrap();
    assert!(t >= before && t <= control_now(), "{t}");
    let (_, list) = ctx.get("/admin_tokens").await;
    assert_eq!(find(&list, &id)["last_used_at"], t);
    // Within the minute: not written again.
    let recent = control_now() - 30;
    sqlx::query("UPDATE admin_tokens SET last_used_at = $1 WHERE id = $2")
        .bind(recent)
        .bind(id.clone())
        .execute(ctx.db.pool())
        .await
        .unwrap();
    assert_eq!(status_with(&ctx, &token).await, StatusCode::OK);
    assert_eq!(last_used(&ctx, id.clone()).await, Some(recent));
    // Older than a minute: updated.
    let old = control_now() - 120;
    sqlx::query("UPDATE admin_tokens SET last_used_at = $1 WHERE id = $2")
        .bind(old)
        .bind(id.clone())
        .execute(ctx.db.pool())
        .await
        .unwrap();
    assert_eq!(status_with(&ctx, &token).await, StatusCode::OK);
    assert!(last_used(&ctx, id.clone()).await.unwrap() >= before);
    // A wrong token records nothing.
    sqlx::query("UPDATE admin_tokens SET last_used_at = $1 WHERE id = $2")
        .bind(old)
        .bind(id.clone())
        .execute(ctx.db.pool())
        .await
        .unwrap();
    let wrong = format!("{}0", &token[..token.len() - 1]);
    let wrong = if wrong == token {
        format!("{}1", &token[..token.len() - 1])
    } else {
        wrong
    };
    assert_eq!(status_with(&ctx, &wrong).await, StatusCode::UNAUTHORIZED);
    assert_eq!(last_used(&ctx, id.clone()).await, Some(old));
}

fn control_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

async fn bootstrap_tokens_replace_each_other(ctx: Ctx) {
    const FIRST: &str = "dev-bootstrap-token-one-0123456789";
    const SECOND: &str = "dev-bootstrap-token-two-0123456789";
    // An API token that happens to share the bootstrap name is not a bootstrap token.
    let (api_id, api_token) = create_token(&ctx, "dev").await;
    let open = |token: &'static str| {
        let mut config = ControlConfig::sqlite_in(std::path::Path::new("/nonexistent"));
        config.database_url = ctx.db_url.clone();
        config.bootstrap_admin_token = Some(token.into());
        config.bootstrap_admin_name = "dev".into();
        async move {
            let db = control::open(&config).await.unwrap();
            db.close().await;
        }
    };
    open(FIRST).await;
    assert_eq!(status_with(&ctx, FIRST).await, StatusCode::OK);
    // Opening again with the same token changes nothing.
    open(FIRST).await;
    assert_eq!(status_with(&ctx, FIRST).await, StatusCode::OK);
    open(SECOND).await;
    assert_eq!(status_with(&ctx, FIRST).await, StatusCode::UNAUTHORIZED);
    assert_eq!(status_with(&ctx, SECOND).await, StatusCode::OK);
    assert_eq!(status_with(&ctx, &api_token).await, StatusCode::OK);
    // Another bootstrap name is untouched.
    assert_eq!(status_with(&ctx, TOKEN).await, StatusCode::OK);

    let first_id = roony::auth::key_id(FIRST);
    let second_id = roony::auth::key_id(SECOND);
    let (s, b) = ctx
        .get(&format!(
            "/audit_events?action=admin_token.revoke&target_id={first_id}"
        ))
        .await;
    assert_eq!(s, StatusCode::OK);
    let items = b["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{b}");
    assert_eq!(items[0]["actor_type"], "system");
    assert_eq!(
        items[0]["details"]["reason"],
        "replaced by a new bootstrap token"
    );
    assert_eq!(items[0]["details"]["replaced_by"], second_id.as_str());
    let (_, b) = ctx.get("/audit_events?action=admin_token.revoke").await;
    assert_eq!(b["items"].as_array().unwrap().len(), 1);

    // A revoked bootstrap token stays revoked and replaces nothing.
    open(FIRST).await;
    assert_eq!(status_with(&ctx, FIRST).await, StatusCode::UNAUTHORIZED);
    assert_eq!(status_with(&ctx, SECOND).await, StatusCode::OK);
    let (_, list) = ctx.get("/admin_tokens").await;
    let active: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["revoked_at"].is_null())
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    let bootstrap_id = roony::auth::key_id(TOKEN);
    let mut want = vec![second_id.as_str(), api_id.as_str(), bootstrap_id.as_str()];
    let mut got = active.clone();
    want.sort();
    got.sort();
    assert_eq!(got, want);
    // Rotating back and forth only ever leaves one bootstrap token of the name.
    const THIRD: &str = "dev-bootstrap-token-three-0123456789";
    open(THIRD).await;
    assert_eq!(status_with(&ctx, SECOND).await, StatusCode::UNAUTHORIZED);
    assert_eq!(status_with(&ctx, THIRD).await, StatusCode::OK);
    assert_eq!(status_with(&ctx, &api_token).await, StatusCode::OK);
}

async fn concurrent_revocations_keep_one_token(ctx: Ctx) {
    use roony::control::db::{Actor, AdminTokenRevoke};
    for round in 0..10 {
        for n in 0..3 {
            let key = roony::auth::from_plaintext(&control::generate_admin_token()).unwrap();
            ctx.db
                .create_admin_token(&format!("race {round} {n}"), &key, &Actor::system(), 1)
                .await
                .unwrap();
        }
        // Revoke every active token at once: exactly one stays active.
        let active: Vec<String> = ctx
            .db
            .list_admin_tokens()
            .await
            .unwrap()
            .into_iter()
            .filter(|t| t.revoked_at.is_none())
            .map(|t| t.id)
            .collect();
        assert!(active.len() >= 3);
        let results = futures_util::future::join_all(active.iter().map(|id| {
            let db = ctx.db.clone();
            let id = id.clone();
            async move {
                db.revoke_admin_token(&id, &Actor::system(), 1)
                    .await
                    .unwrap()
            }
        }))
        .await;
        let refused = results
            .iter()
            .filter(|r| matches!(r, AdminTokenRevoke::LastActive))
            .count();
        assert_eq!(refused, 1, "{results:?}");
        let left = ctx.db.list_admin_tokens().await.unwrap();
        assert_eq!(left.iter().filter(|t| t.revoked_at.is_none()).count(), 1);
    }
}
