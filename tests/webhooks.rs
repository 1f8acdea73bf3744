#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]
//! Stripe webhooks at the control plane, over real HTTP against a served control plane:
//! signatures, real-time authorization decisions, settlement, discrepancies and the updates
//! feed — against SQLite (a temp file) and, when `ROONY_TEST_DATABASE_URL` is set,
//! PostgreSQL (a fresh schema per test). Intents and cards are seeded through the sync
//! events endpoint with a sidecar token, so the ledger path is the real one; events are JSON
//! shaped like Stripe's fixtures, signed here with this file's own HMAC code.

mod common;

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use reqwest::StatusCode;
use roony::control::db::ControlDb;
use roony::control::{self, ControlConfig};
use roony::sync::wire;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use common::db::{Kind, TestDb, on_both, serve};

const TOKEN: &str = "test-admin-token-0123456789abcdef";
const SECRET_A: &str = "whsec_test_secret_one_0123456789";
const SECRET_B: &str = "whsec_test_secret_two_abcdefghij";

struct Ctx {
    db: ControlDb,
    db_url: String,
    base: String,
    client: reqwest::Client,
}

fn config(url: &str) -> ControlConfig {
    let mut config = ControlConfig::sqlite_in(std::path::Path::new("/nonexistent"));
    config.database_url = url.to_string();
    config.bootstrap_admin_token = Some(TOKEN.into());
    config.stripe_webhook_secrets = vec![SECRET_A.into(), SECRET_B.into()];
    config
}

async fn run<F, Fut>(kind: Kind, scenario: F)
where
    F: FnOnce(Ctx) -> Fut,
    Fut: Future<Output = ()>,
{
    let Some(test_db) = TestDb::new(kind, "webhook tests is SKIPPED").await else {
        return;
    };
    let db = control::open(&config(&test_db.url)).await.unwrap();
    let (base, stop, server) = serve(&db).await;
    let ctx = Ctx {
        db: db.clone(),
        db_url: test_db.url.clone(),
        base,
        client: reqwest::Client::new(),
    };
    let outcome = std::panic::AssertUnwindSafe(scenario(ctx))
        .catch_unwind()
        .await;
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
    db.close().await;
    test_db.drop_schema().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

on_both!(
    signatures,
    realtime_decisions,
    realtime_deadline,
    settlement,
    discrepancies,
    updates_feed,
);

// ----- helpers ----------------------------------------------------------------------------

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// `Stripe-Signature` for `body` at `t` with `secret`, computed independently of the
/// server's code.
fn sign(body: &str, secret: &str, t: i64) -> String {
    format!(
        "t={t},v1={}",
        hex::encode(hmac(secret.as_bytes(), format!("{t}.{body}").as_bytes()))
    )
}

/// HMAC-SHA256 (RFC 2104), written out here rather than borrowed from the server.
fn hmac(key: &[u8], message: &[u8]) -> Vec<u8> {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |b: u8| block.iter().map(|k| k ^ b).collect::<Vec<u8>>();
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .to_vec()
}

struct Project {
    id: String,
    token: String,
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

    async fn get(&self, path: &str) -> Value {
        let (s, b) = self.send(self.client.get(self.url(path))).await;
        assert!(s.is_success(), "GET {path}: {s} {b}");
        b
    }

    /// A project with a sidecar (token) and agents `agents` (with the demo policy, or
    /// `freeze_on_discrepancy: false` for names ending in `_nf`).
    async fn project(&self, name: &str, agents: &[&str]) -> Project {
        let id = self.post("/projects", json!({"name": name})).await["id"]
            .as_str()
            .unwrap()
            .to_string();
        let sc = self
            .post("/sidecars", json!({"name": "edge", "project_id": id}))
            .await;
        for agent in agents {
            self.post(
                "/agents",
                json!({"project_id": id, "name": agent, "id": agent}),
            )
            .await;
            let mut p = serde_json::to_value(roony::dev::demo_policy()).unwrap();
            if agent.ends_with("_nf") {
                p["freeze_on_discrepancy"] = json!(false);
            } else if let Some(o) = p.as_object_mut() {
                // Absent means true.
                o.remove("freeze_on_discrepancy");
            }
            self.put(&format!("/agents/{agent}/policy"), p).await;
        }
        Project {
            id,
            token: sc["token"].as_str().unwrap().to_string(),
        }
    }

    /// Seeds an approved intent `pur_<n>` of `agent` with card `ic_<n>` (limit 2500 USD,
    /// Namecheap, US) through the sync events endpoint.
    async fn intent(
        &self,
        p: &Project,
        agent: &str,
        n: &str,
        edit: impl Fn(&mut wire::IntentSnapshot),
    ) {
        let mut i = wire::IntentSnapshot {
            id: format!("pur_{n}"),
            agent_id: agent.into(),
            version: 2,
            status: "approved".into(),
            amount: 2_400,
            currency: "USD".into(),
            merchant_name: "Namecheap".into(),
            merchant_domain: Some("namecheap.com".into()),
            merchant_country: Some("US".into()),
            merchant_category: None,
            description: None,
            reserved: 2_500,
            expires_at: Some(now() + 3_600),
            decision: wire::DecisionSnapshot {
                id: format!("dec_{n}"),
                outcome: "approved".into(),
                reasons: vec!["within_policy".into()],
                messages: vec![],
                decided_at: now(),
            },
            risk_score: None,
            risk_signals: vec![],
            status_reason: None,
            card: Some(wire::CardSnapshot {
                stripe_card_id: format!("ic_{n}"),
                last4: "4242".into(),
                exp_month: 12,
                exp_year: 2030,
                spending_limit: 2_500,
            }),
            created_at: now(),
            updated_at: now(),
        };
        edit(&mut i);
        let batch = wire::EventBatch {
            format: wire::FORMAT,
            events: vec![wire::SyncEvent {
                id: format!("{}.{}", i.id, i.version),
                action: "intent.issued".into(),
                at: now(),
                intent: i,
            }],
        };
        let r = self
            .client
            .post(format!("{}{}", self.base, wire::EVENTS_PATH))
            .bearer_auth(&p.token)
            .json(&batch)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let ack: wire::EventAck = r.json().await.unwrap();
        assert_eq!(ack.accepted, 1, "{ack:?}");
    }

    /// Posts a signed event; (status, Stripe-Version header, body).
    async fn event(&self, event: &Value) -> (StatusCode, Option<String>, Value) {
        let body = event.to_string();
        self.raw(&body, Some(&sign(&body, SECRET_A, now()))).await
    }

    async fn raw(&self, body: &str, sig: Option<&str>) -> (StatusCode, Option<String>, Value) {
        let mut req = self
            .client
            .post(format!("{}/api/webhooks/stripe", self.base))
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(s) = sig {
            req = req.header("stripe-signature", s);
        }
        let r = req.send().await.unwrap();
        let status = r.status();
        let version = r
            .headers()
            .get("stripe-version")
            .map(|v| v.to_str().unwrap().to_string());
        let text = r.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        assert!(!status.is_server_error(), "5xx {status}: {body}");
        (status, version, body)
    }

    /// A real-time request; the answer body.
    async fn request(&self, auth: Value) -> Value {
        let (s, v, b) = self
            .event(&envelope("issuing_authorization.request", auth))
            .await;
        assert_eq!(s, 200, "{b}");
        assert_eq!(v.as_deref(), Some("2026-09-30.endive"));
        b
    }

    async fn intent_row(&self, id: &str) -> Value {
        self.get(&format!("/intents/{id}")).await
    }

    async fn discrepancies(&self, query: &str) -> Vec<Value> {
        self.get(&format!("/discrepancies?{query}")).await["items"]
            .as_array()
            .unwrap()
            .clone()
    }

    async fn agent_status(&self, agent: &str) -> String {
        self.get(&format!("/agents/{agent}")).await["status"]
            .as_str()
            .unwrap()
            .to_string()
    }

    async fn feed(&self, token: &str, query: &str) -> wire::UpdateFeed {
        let r = self
            .client
            .get(format!("{}{}?{query}", self.base, wire::UPDATES_PATH))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json().await.unwrap()
    }

    /// The newest update of an intent in the project's feed.
    async fn last_update(&self, p: &Project, intent: &str) -> wire::IntentUpdate {
        let feed = self.feed(&p.token, "after=0").await;
        feed.updates
            .into_iter()
            .rev()
            .find(|u| u.intent_id == intent)
            .unwrap_or_else(|| panic!("no update for {intent}"))
    }

    async fn stripe_event_count(&self) -> i64 {
        use sqlx::Row;
        sqlx::query("SELECT COUNT(*) AS n FROM stripe_events")
            .fetch_one(self.db.pool())
            .await
            .unwrap()
            .try_get::<i64, _>("n")
            .unwrap()
    }
}

static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn evt_id() -> String {
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("evt_{}_{n}", roony::service::ids::new_id("t"))
}

fn envelope(kind: &str, object: Value) -> Value {
    json!({
        "id": evt_id(),
        "object": "event",
        "api_version": null,
        "created": now(),
        "data": {"object": object},
        "livemode": false,
        "pending_webhooks": 1,
        "request": {"id": null, "idempotency_key": null},
        "type": kind,
    })
}

/// A full `issuing.card` object (shape of Stripe's fixture).
fn card(id: &str, metadata: Value) -> Value {
    json!({
        "id": id, "object": "issuing.card", "brand": "Visa", "cancellation_reason": null,
        "cardholder": {"id": "ich_1", "object": "issuing.cardholder", "name": "Agent"},
        "created": now(), "currency": "usd", "exp_month": 12, "exp_year": 2030, "last4": "4242",
        "livemode": false, "metadata": metadata, "status": "active", "type": "virtual",
        "spending_controls": {"allowed_categories": null, "blocked_categories": null,
            "spending_limits": [{"amount": 2500, "categories": [], "interval": "all_time"}]},
        "wallets": null
    })
}

struct Auth<'a> {
    id: &'a str,
    card: Value,
    amount: i64,
    merchant: &'a str,
    country: &'a str,
    network: &'a str,
}

impl Auth<'_> {
    fn on(id: &str, card_id: &str, amount: i64) -> Auth<'static> {
        Auth {
            id: Box::leak(id.to_string().into_boxed_str()),
            card: card(card_id, json!({})),
            amount,
            merchant: "NAMECHEAP.COM",
            country: "US",
            network: "net_namecheap",
        }
    }

    /// As `issuing_authorization.request` carries it.
    fn request(&self) -> Value {
        let mut v = self.object(false, "pending");
        v["amount"] = json!(0);
        v["pending_request"] = json!({"amount": self.amount, "amount_details": null, "currency": "usd",
            "is_amount_controllable": false, "merchant_amount": self.amount, "merchant_currency": "usd",
            "network_risk_score": null});
        v
    }

    fn object(&self, approved: bool, status: &str) -> Value {
        json!({
            "id": self.id, "object": "issuing.authorization", "amount": self.amount,
            "amount_details": {"atm_fee": null, "cashback_amount": null}, "approved": approved,
            "authorization_method": "online", "balance_transactions": [], "card": self.card,
            "cardholder": "ich_1", "created": now(), "currency": "usd", "livemode": false,
            "merchant_amount": self.amount, "merchant_currency": "usd",
            "merchant_data": {"category": "computer_network_services", "category_code": "4816",
                "city": "Phoenix", "country": self.country, "name": self.merchant,
                "network_id": self.network, "postal_code": "85001", "state": "AZ",
                "terminal_id": null, "url": null, "tax_id": null},
            "metadata": {}, "pending_request": null,
            "request_history": [{"amount": self.amount, "approved": approved, "currency": "usd",
                "reason": if approved { "webhook_approved" } else { "webhook_declined" },
                "created": now(), "merchant_amount": self.amount, "merchant_currency": "usd"}],
            "status": status, "transactions": [], "wallet": null
        })
    }
}

/// An `issuing.transaction` (capture: amount negative at Stripe; refund: positive).
fn transaction(
    id: &str,
    card: &str,
    auth: Option<&str>,
    kind: &str,
    amount: i64,
    merchant: &str,
    network: &str,
) -> Value {
    json!({
        "id": id, "object": "issuing.transaction",
        "amount": if kind == "capture" { -amount } else { amount },
        "amount_details": {"atm_fee": null, "cashback_amount": null}, "authorization": auth,
        "balance_transaction": null, "card": card, "cardholder": "ich_1", "created": now(),
        "currency": "usd", "dispute": null, "livemode": false,
        "merchant_amount": if kind == "capture" { -amount } else { amount }, "merchant_currency": "usd",
        "merchant_data": {"category": "computer_network_services", "category_code": "4816",
            "city": "Phoenix", "country": "US", "name": merchant, "network_id": network,
            "postal_code": null, "state": null, "terminal_id": null, "url": null, "tax_id": null},
        "metadata": {}, "type": kind, "wallet": null
    })
}

fn reasons(answer: &Value) -> Vec<String> {
    answer["metadata"]["roony_reasons"]
        .as_str()
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

// ----- scenarios ----------------------------------------------------------------------------

async fn signatures(ctx: Ctx) {
    let p = ctx.project("sig", &["agt_sig"]).await;
    ctx.intent(&p, "agt_sig", "sig1", |_| {}).await;
    let event = envelope(
        "issuing_authorization.request",
        Auth::on("iauth_sig1", "ic_sig1", 1_000).request(),
    );
    let body = event.to_string();
    let t = now();
    let code = |b: &Value| b["error"]["code"].as_str().unwrap_or_default().to_string();
    let (s, _, b) = ctx.raw(&body, None).await;
    assert_eq!(
        (s, code(&b).as_str()),
        (StatusCode::BAD_REQUEST, "missing_signature")
    );
    for garbled in ["nonsense", "t=abc,v1=00", "v1=abcdef", &format!("t={t}")] {
        let (s, _, b) = ctx.raw(&body, Some(garbled)).await;
        assert_eq!(
            (s, code(&b).as_str()),
            (StatusCode::BAD_REQUEST, "invalid_signature_header"),
            "{garbled}"
        );
    }
    let (s, _, b) = ctx.raw(&body, Some(&sign(&body, "whsec_forged", t))).await;
    assert_eq!(
        (s, code(&b).as_str()),
        (StatusCode::BAD_REQUEST, "invalid_signature")
    );
    // Signed, then the body changed.
    let tampered = body.replace("1000", "9000");
    let (s, _, b) = ctx.raw(&tampered, Some(&sign(&body, SECRET_A, t))).await;
    assert_eq!(
        (s, code(&b).as_str()),
        (StatusCode::BAD_REQUEST, "invalid_signature")
    );
    let (s, _, b) = ctx.raw(&body, Some(&sign(&body, SECRET_A, t - 301))).await;
    assert_eq!(
        (s, code(&b).as_str()),
        (StatusCode::BAD_REQUEST, "stale_signature")
    );
    let (s, _, b) = ctx.raw(&body, Some(&sign(&body, SECRET_A, t + 400))).await;
    assert_eq!(
        (s, code(&b).as_str()),
        (StatusCode::BAD_REQUEST, "stale_signature")
    );
    // Nothing was recorded.
    assert_eq!(ctx.stripe_event_count().await, 0);
    let auths = ctx.get("/authorizations").await;
    assert_eq!(auths["items"].as_array().unwrap().len(), 0);
    assert!(ctx.feed(&p.token, "after=0").await.updates.is_empty());

    // Signed with the second secret, with a v0 and a wrong v1 next to the right one.
    let good = sign(&body, SECRET_B, t);
    let header = format!(
        "t={t},v0=abc,v1={},{}",
        "0".repeat(64),
        &good[good.find("v1=").unwrap()..]
    );
    let (s, _, b) = ctx.raw(&body, Some(&header)).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["approved"], true, "{b}");
    // A duplicate gets the same answer and changes nothing.
    let (s, _, again) = ctx.raw(&body, Some(&sign(&body, SECRET_A, now()))).await;
    assert_eq!(s, 200);
    assert_eq!(again, b);
    assert_eq!(ctx.stripe_event_count().await, 1);
    assert_eq!(ctx.feed(&p.token, "after=0").await.updates.len(), 1);

    // Other events: duplicates are reported and ignored; unknown types are recorded.
    let other = envelope("issuing_cardholder.updated", json!({"id": "ich_1"}));
    let (s, _, b) = ctx.event(&other).await;
    assert_eq!((s, b["duplicate"].clone()), (StatusCode::OK, json!(false)));
    let (s, _, b) = ctx.event(&other).await;
    assert_eq!((s, b["duplicate"].clone()), (StatusCode::OK, json!(true)));
    assert_eq!(ctx.stripe_event_count().await, 2);
    // Not an event.
    let junk = r#"{"hello": "world"}"#;
    let (s, _, b) = ctx.raw(junk, Some(&sign(junk, SECRET_A, now()))).await;
    assert_eq!(
        (s, code(&b).as_str()),
        (StatusCode::BAD_REQUEST, "invalid_event")
    );

    // A control plane without secrets refuses webhooks.
    let db = ControlDb::open(&ctx.db_url).await.unwrap();
    let (base, stop, server) = serve(&db).await;
    let r = ctx
        .client
        .post(format!("{base}/api/webhooks/stripe"))
        .header("stripe-signature", sign(&body, SECRET_A, now()))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["error"]["code"], "webhooks_not_configured");
    let _ = stop.send(());
    let _ = server.await;
    db.close().await;
}

async fn realtime_decisions(ctx: Ctx) {
    let p = ctx.project("rt", &["agt_rt"]).await;
    // Approve: the charge matches the purchase.
    ctx.intent(&p, "agt_rt", "rt1", |_| {}).await;
    let a = ctx
        .request(Auth::on("iauth_rt1", "ic_rt1", 2_000).request())
        .await;
    assert_eq!(a["approved"], true, "{a}");
    assert_eq!(a["metadata"]["roony_decision"], "approved");
    assert_eq!(a["metadata"]["roony_reasons"], "matches_intent");
    assert_eq!(a["metadata"]["roony_intent_id"], "pur_rt1");
    let auths = ctx.get("/authorizations?intent_id=pur_rt1").await;
    let row = &auths["items"][0];
    assert_eq!(
        (
            row["id"].as_str(),
            row["approved"].as_bool(),
            row["decided_by"].as_str()
        ),
        (Some("iauth_rt1"), Some(true), Some("roony")),
        "{row}"
    );
    assert_eq!(row["amount"], 2_000);
    assert_eq!(row["status"], "pending");
    // An increment on the same authorization within the limit is approved; beyond, not.
    let a = ctx
        .request(Auth::on("iauth_rt1", "ic_rt1", 500).request())
        .await;
    assert_eq!(a["approved"], true, "{a}");
    let a = ctx
        .request(Auth::on("iauth_rt1", "ic_rt1", 1).request())
        .await;
    assert_eq!(reasons(&a), ["exceeds_approved_amount"]);
    let u = ctx.last_update(&p, "pur_rt1").await;
    assert_eq!((u.pending, u.authorizations.len()), (2_500, 1), "{u:?}");
    // An increment from another merchant (network id) than the card is locked to.
    let mut inc = Auth::on("iauth_rt1", "ic_rt1", 1);
    inc.network = "net_other";
    let a = ctx.request(inc.request()).await;
    assert!(
        reasons(&a).contains(&"merchant_network_mismatch".to_string()),
        "{a}"
    );
    // A second authorization on the used single-use card.
    let a = ctx
        .request(Auth::on("iauth_rt1b", "ic_rt1", 100).request())
        .await;
    assert_eq!(a["approved"], false);
    assert_eq!(reasons(&a), ["card_already_used"]);

    // Declines, one reason each.
    ctx.intent(&p, "agt_rt", "rt2", |_| {}).await;
    let a = ctx
        .request(Auth::on("iauth_rt2", "ic_rt2", 2_501).request())
        .await;
    assert_eq!(
        (a["approved"].as_bool(), reasons(&a)),
        (Some(false), vec!["exceeds_approved_amount".to_string()])
    );
    let mut wrong = Auth::on("iauth_rt2b", "ic_rt2", 100);
    wrong.merchant = "GIFTCARDS4U";
    let a = ctx.request(wrong.request()).await;
    assert_eq!(reasons(&a), ["merchant_mismatch"]);
    let mut abroad = Auth::on("iauth_rt2c", "ic_rt2", 100);
    abroad.country = "NG";
    let a = ctx.request(abroad.request()).await;
    assert_eq!(reasons(&a), ["merchant_country_mismatch"]);
    ctx.intent(&p, "agt_rt", "rt3", |i| i.expires_at = Some(now() - 10))
        .await;
    let a = ctx
        .request(Auth::on("iauth_rt3", "ic_rt3", 100).request())
        .await;
    assert_eq!(reasons(&a), ["intent_expired"]);
    let a = ctx
        .request(Auth::on("iauth_rt4", "ic_nobody", 100).request())
        .await;
    assert_eq!(
        (a["approved"].as_bool(), reasons(&a)),
        (Some(false), vec!["unknown_card".to_string()])
    );
    assert!(a["metadata"].get("roony_intent_id").is_none());
    let auths = ctx.get("/authorizations?card_id=ic_nobody").await;
    assert_eq!(auths["items"][0]["reasons"], json!(["unknown_card"]));

    // A card known only through its signed metadata (the outbox has not delivered it yet).
    let key_id = roony::auth::key_id(&p.token);
    let mut md: BTreeMap<String, String> = [
        ("roony_intent_id", "pur_meta1"),
        ("roony_agent_id", "agt_rt"),
        ("roony_limit", "1500"),
        ("roony_currency", "USD"),
        ("roony_merchant", "Namecheap"),
        ("roony_domain", "namecheap.com"),
        ("roony_country", "US"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    md.insert("roony_expires".into(), (now() + 600).to_string());
    md.insert(wire::CARD_SIDECAR_KEY.into(), key_id);
    let sig = wire::sign_card_metadata(&md, &p.token);
    md.insert(wire::CARD_SIGNATURE_KEY.into(), sig);
    let mut meta = Auth::on("iauth_meta1", "ic_meta1", 1_200);
    meta.card = card("ic_meta1", serde_json::to_value(&md).unwrap());
    let a = ctx.request(meta.request()).await;
    assert_eq!(a["approved"], true, "{a}");
    assert_eq!(a["metadata"]["roony_intent_id"], "pur_meta1");
    let adopted = ctx.intent_row("pur_meta1").await;
    assert_eq!(
        (adopted["status"].as_str(), adopted["pending"].as_i64()),
        (Some("approved"), Some(1_200)),
        "{adopted}"
    );
    // Above the signed limit: declined.
    let mut over = Auth::on("iauth_meta1b", "ic_meta2", 1_600);
    let mut md2 = md.clone();
    md2.insert("roony_intent_id".into(), "pur_meta2".into());
    md2.remove(wire::CARD_SIGNATURE_KEY);
    let sig = wire::sign_card_metadata(&md2, &p.token);
    md2.insert(wire::CARD_SIGNATURE_KEY.into(), sig);
    over.card = card("ic_meta2", serde_json::to_value(&md2).unwrap());
    let a = ctx.request(over.request()).await;
    assert_eq!(reasons(&a), ["exceeds_approved_amount"]);
    // Tampered metadata (a higher limit than signed): an unknown card.
    let mut md3 = md.clone();
    md3.insert("roony_intent_id".into(), "pur_meta3".into());
    md3.insert("roony_limit".into(), "999999".into());
    let mut tampered = Auth::on("iauth_meta3", "ic_meta3", 1_000);
    tampered.card = card("ic_meta3", serde_json::to_value(&md3).unwrap());
    let a = ctx.request(tampered.request()).await;
    assert_eq!(reasons(&a), ["unknown_card"]);

    // A frozen agent.
    ctx.intent(&p, "agt_rt", "rt5", |_| {}).await;
    ctx.post("/agents/agt_rt/freeze", json!({"reason": "test"}))
        .await;
    let a = ctx
        .request(Auth::on("iauth_rt5", "ic_rt5", 100).request())
        .await;
    assert_eq!(reasons(&a), ["agent_frozen"]);
    // The audit trail names stripe.
    let audit = ctx
        .get("/audit_events?target_type=authorization&target_id=iauth_rt5")
        .await;
    assert_eq!(audit["items"][0]["actor_type"], "stripe", "{audit}");
    assert_eq!(audit["items"][0]["action"], "authorization.decide");
}

async fn realtime_deadline(ctx: Ctx) {
    let p = ctx.project("slow", &["agt_slow"]).await;
    ctx.intent(&p, "agt_slow", "slow1", |_| {}).await;
    // The same database served with a deadline of zero: every decision is late.
    let mut cfg = config(&ctx.db_url);
    cfg.realtime_deadline = Duration::ZERO;
    let db = control::open(&cfg).await.unwrap();
    let (base, stop, server) = serve(&db).await;
    let event = envelope(
        "issuing_authorization.request",
        Auth::on("iauth_slow", "ic_slow1", 100).request(),
    );
    let body = event.to_string();
    let start = Instant::now();
    let r = ctx
        .client
        .post(format!("{base}/api/webhooks/stripe"))
        .header("stripe-signature", sign(&body, SECRET_B, now()))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    let elapsed = start.elapsed();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    assert!(r.headers().contains_key("stripe-version"));
    let a: Value = r.json().await.unwrap();
    assert_eq!(a["approved"], false, "{a}");
    assert_eq!(reasons(&a), ["internal_error"]);
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
    let _ = stop.send(());
    let _ = server.await;
    db.close().await;
    // The normal server decides the same event (nothing was recorded by the late one).
    let (s, _, a) = ctx.raw(&body, Some(&sign(&body, SECRET_A, now()))).await;
    assert_eq!(s, 200);
    assert_eq!(a["approved"], true, "{a}");
}

async fn settlement(ctx: Ctx) {
    let p = ctx.project("settle", &["agt_st"]).await;
    ctx.intent(&p, "agt_st", "st1", |_| {}).await;
    let auth = Auth::on("iauth_st1", "ic_st1", 2_000);
    assert_eq!(ctx.request(auth.request()).await["approved"], true);
    let (s, _, _) = ctx
        .event(&envelope(
            "issuing_authorization.created",
            auth.object(true, "pending"),
        ))
        .await;
    assert_eq!(s, 200);
    let i = ctx.intent_row("pur_st1").await;
    assert_eq!(
        (i["pending"].as_i64(), i["captured"].as_i64()),
        (Some(2_000), Some(0)),
        "{i}"
    );
    // Capture (the authorization closes): pending → captured.
    let (s, _, _) = ctx
        .event(&envelope(
            "issuing_transaction.created",
            transaction(
                "ipi_st1",
                "ic_st1",
                Some("iauth_st1"),
                "capture",
                2_000,
                "NAMECHEAP.COM",
                "net_namecheap",
            ),
        ))
        .await;
    assert_eq!(s, 200);
    ctx.event(&envelope(
        "issuing_authorization.updated",
        auth.object(true, "closed"),
    ))
    .await;
    let i = ctx.intent_row("pur_st1").await;
    assert_eq!(
        (
            i["pending"].as_i64(),
            i["captured"].as_i64(),
            i["status"].as_str()
        ),
        (Some(0), Some(2_000), Some("approved")),
        "{i}"
    );
    let u = ctx.last_update(&p, "pur_st1").await;
    assert!(!u.closed);
    assert_eq!(u.card_status.as_deref(), Some("active"));
    // The card is canceled: closed, and the intent is settled.
    let mut c = card("ic_st1", json!({}));
    c["status"] = json!("canceled");
    ctx.event(&envelope("issuing_card.updated", c)).await;
    let u = ctx.last_update(&p, "pur_st1").await;
    assert!(u.closed, "{u:?}");
    assert_eq!(
        (u.captured, u.pending, u.card_status.as_deref()),
        (2_000, 0, Some("canceled"))
    );
    assert_eq!(ctx.intent_row("pur_st1").await["status"], "settled");
    // The sidecar's later report does not regress it.
    ctx.intent(&p, "agt_st", "st1", |i| {
        i.version = 3;
        i.status = "canceled".into();
    })
    .await;
    assert_eq!(ctx.intent_row("pur_st1").await["status"], "settled");
    // A refund credits.
    ctx.event(&envelope(
        "issuing_transaction.created",
        transaction(
            "ipi_st1r",
            "ic_st1",
            Some("iauth_st1"),
            "refund",
            500,
            "NAMECHEAP.COM",
            "net_namecheap",
        ),
    ))
    .await;
    let u = ctx.last_update(&p, "pur_st1").await;
    assert_eq!((u.captured, u.refunded), (2_000, 500));
    assert!(u.discrepancies.is_empty(), "{u:?}");
    assert_eq!(ctx.intent_row("pur_st1").await["refunded"], 500);
    // A transaction.updated for the same transaction is an upsert, not a second capture.
    ctx.event(&envelope(
        "issuing_transaction.updated",
        transaction(
            "ipi_st1",
            "ic_st1",
            Some("iauth_st1"),
            "capture",
            2_000,
            "NAMECHEAP.COM",
            "net_namecheap",
        ),
    ))
    .await;
    assert_eq!(ctx.last_update(&p, "pur_st1").await.captured, 2_000);

    // Out of order: the capture before the authorization's events.
    ctx.intent(&p, "agt_st", "st2", |_| {}).await;
    let (s, _, _) = ctx
        .event(&envelope(
            "issuing_transaction.created",
            transaction(
                "ipi_st2",
                "ic_st2",
                Some("iauth_st2"),
                "capture",
                1_000,
                "NAMECHEAP.COM",
                "net_namecheap",
            ),
        ))
        .await;
    assert_eq!(s, 200);
    let a2 = Auth::on("iauth_st2", "ic_st2", 1_000);
    ctx.event(&envelope(
        "issuing_authorization.updated",
        a2.object(true, "closed"),
    ))
    .await;
    ctx.event(&envelope(
        "issuing_authorization.created",
        a2.object(true, "pending"),
    ))
    .await;
    let u = ctx.last_update(&p, "pur_st2").await;
    assert_eq!((u.captured, u.authorizations.len()), (1_000, 1), "{u:?}");
    assert_eq!(u.authorizations[0].reasons, ["webhook_approved"]);
    assert!(ctx.discrepancies("intent_id=pur_st2").await.is_empty());
    assert_eq!(ctx.agent_status("agt_st").await, "active");
}

async fn discrepancies(ctx: Ctx) {
    let p = ctx.project("disc", &["agt_d", "agt_d_nf"]).await;
    let frozen_in_bundle = |ctx: &Ctx, token: String| {
        let client = ctx.client.clone();
        let url = format!("{}{}", ctx.base, wire::BUNDLE_PATH);
        async move {
            let raw = client
                .get(url)
                .bearer_auth(&token)
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            let bundle = wire::verify(&raw, &token).unwrap();
            bundle
                .agents
                .iter()
                .find(|a| a.id == "agt_d")
                .unwrap()
                .status
                .clone()
        }
    };
    let capture = |id: &str, card: &str, auth: Option<&str>, amount: i64, merchant: &str| {
        envelope(
            "issuing_transaction.created",
            transaction(id, card, auth, "capture", amount, merchant, "net_namecheap"),
        )
    };
    // over_capture: more captured than the authorization approved.
    ctx.intent(&p, "agt_d", "d1", |_| {}).await;
    assert_eq!(
        ctx.request(Auth::on("iauth_d1", "ic_d1", 1_000).request())
            .await["approved"],
        true
    );
    ctx.event(&capture(
        "ipi_d1",
        "ic_d1",
        Some("iauth_d1"),
        1_500,
        "NAMECHEAP.COM",
    ))
    .await;
    let d = ctx.discrepancies("intent_id=pur_d1").await;
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(d[0]["kind"], "over_capture");
    assert_eq!(d[0]["agent_id"], "agt_d");
    // The agent is frozen, and sidecars learn it through the bundle.
    assert_eq!(ctx.agent_status("agt_d").await, "frozen");
    assert_eq!(frozen_in_bundle(&ctx, p.token.clone()).await, "frozen");
    assert!(
        ctx.last_update(&p, "pur_d1")
            .await
            .discrepancies
            .contains(&"over_capture".to_string())
    );
    ctx.post("/agents/agt_d/unfreeze", json!({})).await;

    // force_capture: a capture without an authorization.
    ctx.intent(&p, "agt_d", "d2", |_| {}).await;
    ctx.event(&capture("ipi_d2", "ic_d2", None, 100, "NAMECHEAP.COM"))
        .await;
    let kinds = |d: Vec<Value>| {
        d.iter()
            .map(|x| x["kind"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        kinds(ctx.discrepancies("intent_id=pur_d2").await),
        ["force_capture"]
    );
    assert_eq!(ctx.agent_status("agt_d").await, "frozen");
    ctx.post("/agents/agt_d/unfreeze", json!({})).await;

    // capture_on_inactive_intent: the purchase was canceled.
    ctx.intent(&p, "agt_d", "d3", |i| {
        i.status = "canceled".into();
        i.status_reason = Some("canceled_by_agent".into());
    })
    .await;
    ctx.event(&capture(
        "ipi_d3",
        "ic_d3",
        Some("iauth_unseen"),
        100,
        "NAMECHEAP.COM",
    ))
    .await;
    assert_eq!(
        kinds(ctx.discrepancies("intent_id=pur_d3").await),
        ["capture_on_inactive_intent"]
    );
    ctx.post("/agents/agt_d/unfreeze", json!({})).await;

    // merchant_mismatch: captured by someone else.
    ctx.intent(&p, "agt_d", "d4", |_| {}).await;
    ctx.event(&capture(
        "ipi_d4",
        "ic_d4",
        Some("iauth_unseen4"),
        100,
        "GIFTCARDS4U",
    ))
    .await;
    assert_eq!(
        kinds(ctx.discrepancies("intent_id=pur_d4").await),
        ["merchant_mismatch"]
    );
    ctx.post("/agents/agt_d/unfreeze", json!({})).await;

    // unmatched_refund: a refund on a card without captures.
    ctx.intent(&p, "agt_d", "d5", |_| {}).await;
    ctx.event(&envelope(
        "issuing_transaction.created",
        transaction(
            "ipi_d5",
            "ic_d5",
            None,
            "refund",
            300,
            "NAMECHEAP.COM",
            "net_namecheap",
        ),
    ))
    .await;
    assert_eq!(
        kinds(ctx.discrepancies("intent_id=pur_d5").await),
        ["unmatched_refund"]
    );
    ctx.post("/agents/agt_d/unfreeze", json!({})).await;

    // unknown_card and orphan_card: no agent to freeze.
    ctx.event(&capture("ipi_d6", "ic_stranger", None, 700, "ANYWHERE"))
        .await;
    let d = ctx.discrepancies("kind=unknown_card").await;
    assert_eq!(d.len(), 1);
    assert_eq!(d[0]["card_id"], "ic_stranger");
    let refund = envelope(
        "issuing_transaction.created",
        transaction(
            "ipi_d7",
            "ic_stranger2",
            None,
            "refund",
            50,
            "ANYWHERE",
            "x",
        ),
    );
    ctx.event(&refund).await;
    assert_eq!(ctx.discrepancies("kind=unmatched_refund").await.len(), 2);
    let orphan = card(
        "ic_orphan",
        json!({"roony_intent_id": "pur_fake", "roony_agent_id": "agt_d",
        "roony_sidecar": "nope", "roony_sig": "00"}),
    );
    ctx.event(&envelope("issuing_card.created", orphan)).await;
    let d = ctx.discrepancies("kind=orphan_card").await;
    assert_eq!(d.len(), 1);
    assert_eq!(d[0]["card_id"], "ic_orphan");
    assert!(d[0].get("agent_id").is_none());
    assert_eq!(ctx.agent_status("agt_d").await, "active");

    // freeze_on_discrepancy: false records without freezing.
    ctx.intent(&p, "agt_d_nf", "d8", |_| {}).await;
    ctx.event(&capture("ipi_d8", "ic_d8", None, 100, "NAMECHEAP.COM"))
        .await;
    assert_eq!(
        kinds(ctx.discrepancies("agent_id=agt_d_nf").await),
        ["force_capture"]
    );
    assert_eq!(ctx.agent_status("agt_d_nf").await, "active");

    // Listing and resolving.
    let all = ctx
        .get(&format!("/discrepancies?project_id={}&limit=2", p.id))
        .await;
    assert_eq!(all["items"].as_array().unwrap().len(), 2);
    let next = all["next_cursor"].as_str().unwrap().to_string();
    let more = ctx
        .get(&format!(
            "/discrepancies?project_id={}&limit=100&cursor={next}",
            p.id
        ))
        .await;
    assert_eq!(more["items"].as_array().unwrap().len(), 4);
    let id = ctx.discrepancies("intent_id=pur_d1").await[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = ctx
        .post(
            &format!("/discrepancies/{id}/resolve"),
            json!({"note": "refunded by merchant"}),
        )
        .await;
    assert_eq!(r["resolution_note"], "refunded by merchant");
    assert!(r["resolved_at"].as_i64().is_some());
    let (s, b) = ctx
        .send(
            ctx.client
                .post(ctx.url(&format!("/discrepancies/{id}/resolve"))),
        )
        .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("discrepancy_already_resolved"))
    );
    let (s, _) = ctx
        .send(ctx.client.post(ctx.url("/discrepancies/dsc_nope/resolve")))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(ctx.discrepancies("resolved=true").await.len(), 1);
    assert_eq!(ctx.discrepancies("resolved=false").await.len(), 8);
    let (s, _) = ctx
        .send(ctx.client.get(ctx.url("/discrepancies?kind=bogus")))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

async fn updates_feed(ctx: Ctx) {
    let p = ctx.project("feed", &["agt_f"]).await;
    let other = ctx.project("feed-other", &["agt_o"]).await;
    let empty = ctx.feed(&p.token, "after=0").await;
    assert!(empty.updates.is_empty());
    assert_eq!(empty.next_after, 0);
    let r = ctx
        .client
        .get(format!("{}{}", ctx.base, wire::UPDATES_PATH))
        .bearer_auth("roony_st_nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    ctx.intent(&p, "agt_f", "f1", |_| {}).await;

    // A long-poll wakes within 1 s of a webhook.
    let client = ctx.client.clone();
    let url = format!("{}{}?after=0&wait=10", ctx.base, wire::UPDATES_PATH);
    let token = p.token.clone();
    let poll = tokio::spawn(async move {
        let r = client.get(url).bearer_auth(token).send().await.unwrap();
        (Instant::now(), r.json::<wire::UpdateFeed>().await.unwrap())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent = Instant::now();
    assert_eq!(
        ctx.request(Auth::on("iauth_f1", "ic_f1", 700).request())
            .await["approved"],
        true
    );
    let (woke, feed) = poll.await.unwrap();
    assert!(
        woke.duration_since(sent) < Duration::from_secs(1),
        "{:?}",
        woke.duration_since(sent)
    );
    assert_eq!(feed.updates.len(), 1);
    let first = &feed.updates[0];
    assert_eq!(
        (
            first.intent_id.as_str(),
            first.agent_id.as_str(),
            first.pending
        ),
        ("pur_f1", "agt_f", 700)
    );
    assert_eq!(first.authorizations[0].reasons, ["matches_intent"]);
    assert_eq!(feed.next_after, first.seq);

    // Paging with after and limit.
    ctx.event(&envelope(
        "issuing_transaction.created",
        transaction(
            "ipi_f1",
            "ic_f1",
            Some("iauth_f1"),
            "capture",
            700,
            "NAMECHEAP.COM",
            "net_namecheap",
        ),
    ))
    .await;
    ctx.event(&envelope(
        "issuing_authorization.updated",
        Auth::on("iauth_f1", "ic_f1", 700).object(true, "closed"),
    ))
    .await;
    let page = ctx
        .feed(&p.token, &format!("after={}&limit=1", first.seq))
        .await;
    assert_eq!(page.updates.len(), 1);
    assert_eq!(page.updates[0].captured, 700);
    let rest = ctx
        .feed(&p.token, &format!("after={}", page.next_after))
        .await;
    assert_eq!(rest.updates.len(), 1);
    assert_eq!(
        (rest.updates[0].pending, rest.updates[0].captured),
        (0, 700)
    );
    assert!(rest.updates[0].seq > page.next_after);
    let none = ctx
        .feed(&p.token, &format!("after={}&wait=1", rest.next_after))
        .await;
    assert!(none.updates.is_empty());
    assert_eq!(none.next_after, rest.next_after);
    // Another project's sidecar sees none of it.
    assert!(ctx.feed(&other.token, "after=0").await.updates.is_empty());
}
