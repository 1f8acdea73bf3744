#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]
//! Reconciliation with Stripe (`POST /api/admin/v1/reconcile`), over real HTTP: an
//! in-process Stripe emulator that sends NO webhooks (every webhook is "lost"), a served
//! control plane with the emulator as its Stripe, the ledger seeded through the sync events
//! endpoint with a sidecar token — against SQLite and, when `ROONY_TEST_DATABASE_URL` is
//! set, PostgreSQL (a fresh schema per test).

mod common;

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use reqwest::StatusCode;
use roony::control::db::ControlDb;
use roony::control::{self, ControlConfig};
use roony::domain::money::Currency;
use roony::emulator::{Emulator, EmulatorConfig};
use roony::issuer::{BillingAddress, CardSpec, Issuer, StripeConfig};
use roony::sync::wire;
use serde_json::{Value, json};

use common::db::{Kind, TestDb, on_both, serve};

const TOKEN: &str = "test-admin-token-0123456789abcdef";
const STRIPE_KEY: &str = "sk_test_reconcile";

/// How the control plane is set up.
#[derive(Clone, Copy, Debug)]
enum Setup {
    /// Stripe configured, on demand only.
    OnDemand,
    /// Stripe configured, periodic every second.
    Periodic,
    /// Stripe configured, every Stripe call 400 ms slow.
    Slow,
    /// No Stripe credentials.
    NoStripe,
}

struct Ctx {
    db: ControlDb,
    base: String,
    stripe: String,
    issuer: Issuer,
    client: reqwest::Client,
}

/// The emulator without a webhook endpoint: nothing it does reaches the control plane.
async fn emulator(latency: Duration) -> (String, tokio::sync::oneshot::Sender<()>) {
    let mut config = EmulatorConfig::default();
    config.faults.latency = latency;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(Emulator::new(config).serve(listener, async move {
        let _ = stopped.await;
    }));
    (format!("http://{addr}"), stop)
}

async fn run<F, Fut>(kind: Kind, setup: Setup, scenario: F)
where
    F: FnOnce(Ctx) -> Fut,
    Fut: Future<Output = ()>,
{
    let Some(test_db) = TestDb::new(kind, "reconciliation tests is SKIPPED").await else {
        return;
    };
    let latency = match setup {
        Setup::Slow => Duration::from_millis(400),
        _ => Duration::ZERO,
    };
    let (stripe, emu_stop) = emulator(latency).await;
    let mut config = ControlConfig::sqlite_in(std::path::Path::new("/nonexistent"));
    config.database_url = test_db.url.clone();
    config.bootstrap_admin_token = Some(TOKEN.into());
    config.reconcile_interval = match setup {
        Setup::Periodic => Duration::from_secs(1),
        _ => Duration::ZERO,
    };
    if !matches!(setup, Setup::NoStripe) {
        config.stripe = Some(StripeConfig::new(STRIPE_KEY, Some(stripe.clone())));
    }
    let db = control::open(&config).await.unwrap();
    let (base, stop, server) = serve(&db).await;
    let ctx = Ctx {
        db: db.clone(),
        base,
        issuer: Issuer::new(StripeConfig::new(STRIPE_KEY, Some(stripe.clone()))).unwrap(),
        stripe,
        client: reqwest::Client::new(),
    };
    let outcome = std::panic::AssertUnwindSafe(scenario(ctx))
        .catch_unwind()
        .await;
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
    let _ = emu_stop.send(());
    db.close().await;
    test_db.drop_schema().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

on_both!(
    cards: OnDemand,
    lost_settlement: OnDemand,
    not_configured: NoStripe,
    one_at_a_time: Slow,
    periodic: Periodic,
);

// ----- helpers ----------------------------------------------------------------------------

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

struct Project {
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

    async fn get(&self, path: &str) -> Value {
        let (s, b) = self.send(self.client.get(self.url(path))).await;
        assert!(s.is_success(), "GET {path}: {s} {b}");
        b
    }

    /// A project with a sidecar (its token) and agent `agent` (demo policy).
    async fn project(&self, agent: &str) -> Project {
        let id = self.post("/projects", json!({"name": "p"})).await["id"]
            .as_str()
            .unwrap()
            .to_string();
        let sc = self
            .post("/sidecars", json!({"name": "edge", "project_id": id}))
            .await;
        self.post(
            "/agents",
            json!({"project_id": id, "name": agent, "id": agent}),
        )
        .await;
        let p = serde_json::to_value(roony::dev::demo_policy()).unwrap();
        let (s, b) = self
            .send(
                self.client
                    .put(self.url(&format!("/agents/{agent}/policy")))
                    .json(&p),
            )
            .await;
        assert!(s.is_success(), "{s} {b}");
        Project {
            token: sc["token"].as_str().unwrap().to_string(),
        }
    }

    /// Seeds intent `id` of `agent` (USD, Namecheap, limit 2500) with `status` and, if
    /// given, its card, through the sync events endpoint.
    async fn intent(&self, p: &Project, agent: &str, id: &str, status: &str, card: Option<&str>) {
        // Built from JSON, so fields added to the snapshot later (with defaults) need no
        // change here.
        let i: wire::IntentSnapshot = serde_json::from_value(json!({
            "id": id, "agent_id": agent, "version": 2, "status": status,
            "amount": 2_400, "currency": "USD", "merchant_name": "Namecheap",
            "merchant_domain": "namecheap.com", "merchant_country": "US",
            "merchant_category": null, "description": null, "reserved": 2_500,
            "expires_at": now() + 3_600,
            "decision": {"id": format!("dec_{id}"), "outcome": "approved",
                "reasons": ["within_policy"], "decided_at": now()},
            "status_reason": null,
            "card": card.map(|c| json!({"stripe_card_id": c, "last4": "4242",
                "exp_month": 12, "exp_year": 2030, "spending_limit": 2_500})),
            "created_at": now(), "updated_at": now(),
        }))
        .unwrap();
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

    /// A card at the emulator for `intent` of `agent` with `metadata` (Roony's issuer adds
    /// roony_intent_id and roony_agent_id).
    async fn card(&self, agent: &str, intent: &str, metadata: BTreeMap<String, String>) -> String {
        let holder = self
            .issuer
            .create_cardholder(agent, agent, &BillingAddress::default())
            .await
            .unwrap();
        let spec = CardSpec {
            intent_id: intent.into(),
            agent_id: agent.into(),
            cardholder: holder,
            currency: Currency::parse("USD").unwrap(),
            spending_limit: 2_500,
            allowed_categories: vec![],
            blocked_categories: vec![],
            allowed_countries: vec![],
            blocked_countries: vec![],
            idempotency_key: format!("test-card-{intent}-{}", roony::service::ids::new_id("k")),
            metadata,
        };
        self.issuer.create_card(&spec).await.unwrap().id
    }

    /// Signed `roony_*` metadata, as a synced sidecar attaches it.
    fn signed(
        &self,
        p: &Project,
        intent: &str,
        agent: &str,
        expires: i64,
    ) -> BTreeMap<String, String> {
        let mut md = BTreeMap::from([
            ("roony_intent_id".to_string(), intent.to_string()),
            ("roony_agent_id".to_string(), agent.to_string()),
            ("roony_limit".to_string(), "2500".to_string()),
            ("roony_currency".to_string(), "USD".to_string()),
            ("roony_merchant".to_string(), "Namecheap".to_string()),
            ("roony_domain".to_string(), "namecheap.com".to_string()),
            ("roony_country".to_string(), "US".to_string()),
            ("roony_expires".to_string(), expires.to_string()),
            (
                wire::CARD_SIDECAR_KEY.to_string(),
                roony::auth::key_id(&p.token),
            ),
        ]);
        let sig = wire::sign_card_metadata(&md, &p.token);
        md.insert(wire::CARD_SIGNATURE_KEY.to_string(), sig);
        md
    }

    async fn stripe_active(&self, card: &str) -> bool {
        self.issuer.retrieve_card(card, false).await.unwrap().active
    }

    async fn ledger_card(&self, card: &str) -> Option<String> {
        use sqlx::Row;
        sqlx::query("SELECT status FROM cards WHERE stripe_card_id = $1")
            .bind(card.to_string())
            .fetch_optional(self.db.pool())
            .await
            .unwrap()
            .map(|r| r.try_get::<String, _>("status").unwrap())
    }

    async fn reconcile(&self) -> Value {
        let run = self.post("/reconcile", json!({})).await;
        assert_eq!(run["status"], "ok", "{run}");
        run
    }

    /// Stripe test helpers (form-encoded).
    async fn helper(&self, path: &str, form: &[(&str, String)]) -> Value {
        let r = self
            .client
            .post(format!("{}/v1/test_helpers/issuing/{path}", self.stripe))
            .bearer_auth(STRIPE_KEY)
            .form(form)
            .send()
            .await
            .unwrap();
        let status = r.status();
        let body: Value = r.json().await.unwrap();
        assert!(status.is_success(), "{path}: {status} {body}");
        body
    }

    async fn feed(&self, token: &str) -> wire::UpdateFeed {
        let r = self
            .client
            .get(format!("{}{}?after=0", self.base, wire::UPDATES_PATH))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json().await.unwrap()
    }
}

fn entries<'a>(run: &'a Value, kind: &str) -> Vec<&'a Value> {
    run["report"]["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == kind)
        .collect()
}

fn entry<'a>(run: &'a Value, kind: &str, stripe_id: &str) -> &'a Value {
    entries(run, kind)
        .into_iter()
        .find(|e| e["stripe_id"] == stripe_id)
        .unwrap_or_else(|| panic!("no {kind} entry for {stripe_id} in {run:#}"))
}

/// No entry of the run did anything.
fn no_actions(run: &Value) {
    let acting: Vec<_> = run["report"]["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] != "none")
        .collect();
    assert!(acting.is_empty(), "second run acted: {acting:#?}");
    let t = &run["report"]["totals"];
    assert_eq!(
        (
            t["adopted"].as_i64(),
            t["canceled"].as_i64(),
            t["recorded"].as_i64()
        ),
        (Some(0), Some(0), Some(0)),
        "{t}"
    );
}

// ----- scenarios --------------------------------------------------------------------------

/// Orphan, missing, stale and foreign cards; idempotence; the runs' listing.
async fn cards(ctx: Ctx) {
    let p = ctx.project("ag1").await;
    // (a) unsigned card of an unknown purchase.
    let orphan = ctx.card("ag1", "pur_ghost", BTreeMap::new()).await;
    // (b) a card of a purchase the ledger has, without its card.
    ctx.intent(&p, "ag1", "pur_b", "approved", None).await;
    let missing = ctx.card("ag1", "pur_b", BTreeMap::new()).await;
    // (c) the card of a canceled purchase, still active at Stripe.
    let stale = ctx.card("ag1", "pur_c", BTreeMap::new()).await;
    ctx.intent(&p, "ag1", "pur_c", "canceled", Some(&stale))
        .await;
    // (e) signed metadata of a purchase the ledger does not have yet.
    let signed_md = ctx.signed(&p, "pur_e", "ag1", now() + 3_600);
    let signed = ctx.card("ag1", "pur_e", signed_md).await;
    // Signed, but expired: canceled like an unsigned orphan.
    let expired_md = ctx.signed(&p, "pur_x", "ag1", now() - 60);
    let expired = ctx.card("ag1", "pur_x", expired_md).await;
    // A card that is not Roony's (no metadata): counted, untouched.
    let holder = ctx
        .issuer
        .create_cardholder("other", "Other", &BillingAddress::default())
        .await
        .unwrap();
    let r = ctx
        .client
        .post(format!("{}/v1/issuing/cards", ctx.stripe))
        .bearer_auth(STRIPE_KEY)
        .form(&[
            ("cardholder", holder.as_str()),
            ("currency", "usd"),
            ("type", "virtual"),
            ("status", "active"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let foreign = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    // A ledger card Stripe does not know.
    ctx.intent(&p, "ag1", "pur_m", "approved", Some("ic_nowhere"))
        .await;

    let run = ctx.reconcile().await;
    let t = &run["report"]["totals"];
    assert_eq!(t["cards_checked"], 6, "{run:#}");
    assert_eq!(t["foreign_cards"], 1, "{run:#}");
    assert_eq!(t["adopted"], 2, "{run:#}");
    assert_eq!(t["canceled"], 3, "{run:#}");

    // (a)
    let e = entry(&run, "orphan_card_canceled", &orphan);
    assert_eq!(e["action"], "canceled");
    assert_eq!(e["intent_id"], "pur_ghost");
    assert!(!ctx.stripe_active(&orphan).await);
    assert_eq!(ctx.ledger_card(&orphan).await, None);
    let d = ctx.get("/discrepancies?kind=orphan_card").await;
    let ids: Vec<&str> = d["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["card_id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&orphan.as_str()) && ids.contains(&expired.as_str()),
        "{d}"
    );
    assert_eq!(ids.len(), 2, "{d}");
    // (b)
    let e = entry(&run, "card_adopted", &missing);
    assert_eq!(
        (e["intent_id"].as_str(), e["action"].as_str()),
        (Some("pur_b"), Some("adopted"))
    );
    assert_eq!(ctx.ledger_card(&missing).await.as_deref(), Some("active"));
    assert!(ctx.stripe_active(&missing).await);
    let feed = ctx.feed(&p.token).await;
    assert!(
        feed.updates
            .iter()
            .any(|u| u.intent_id == "pur_b" && u.card_status.as_deref() == Some("active")),
        "{feed:?}"
    );
    // (c)
    let e = entry(&run, "card_should_be_canceled", &stale);
    assert_eq!(e["action"], "canceled");
    assert!(!ctx.stripe_active(&stale).await);
    assert_eq!(ctx.ledger_card(&stale).await.as_deref(), Some("canceled"));
    // (e)
    let e = entry(&run, "card_adopted", &signed);
    assert_eq!(e["intent_id"], "pur_e");
    assert!(ctx.stripe_active(&signed).await);
    assert_eq!(ctx.ledger_card(&signed).await.as_deref(), Some("active"));
    assert_eq!(ctx.get("/intents/pur_e").await["agent_id"], "ag1");
    // Expired signed metadata.
    assert_eq!(
        entry(&run, "orphan_card_canceled", &expired)["action"],
        "canceled"
    );
    assert!(!ctx.stripe_active(&expired).await);
    // Foreign: untouched, not reported.
    assert!(ctx.stripe_active(&foreign).await);
    assert!(!run["report"]["entries"].to_string().contains(&foreign));
    // Report only.
    assert_eq!(
        entry(&run, "card_missing_at_stripe", "ic_nowhere")["action"],
        "none"
    );

    // (f) a second run has nothing to do.
    let second = ctx.reconcile().await;
    no_actions(&second);
    assert_eq!(
        ctx.get("/discrepancies?kind=orphan_card").await["items"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // (h) the runs, newest first, paginated; one by id; audit events.
    let list = ctx.get("/reconciliations").await;
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["id"], second["id"]);
    assert_eq!(items[1]["id"], run["id"]);
    assert_eq!(items[0]["actor_type"], "admin_token");
    let page = ctx.get("/reconciliations?limit=1").await;
    assert_eq!(page["items"][0]["id"], second["id"]);
    let cursor = page["next_cursor"].as_str().unwrap();
    let page2 = ctx
        .get(&format!("/reconciliations?limit=1&cursor={cursor}"))
        .await;
    assert_eq!(page2["items"][0]["id"], run["id"]);
    assert!(page2.get("next_cursor").is_none(), "{page2}");
    let one = ctx
        .get(&format!("/reconciliations/{}", run["id"].as_str().unwrap()))
        .await;
    assert_eq!(one, run);
    let (s, b) = ctx
        .send(ctx.client.get(ctx.url("/reconciliations/rcn_nope")))
        .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("reconciliation_not_found"))
    );
    let audit = ctx.get("/audit_events?action=reconciliation.run").await;
    assert_eq!(audit["items"].as_array().unwrap().len(), 2, "{audit}");
    // The default `since` of the second run: the first's start minus a day.
    assert_eq!(
        second["report"]["since"].as_i64().unwrap(),
        run["started_at"].as_i64().unwrap() - 86_400
    );
    // Invalid since.
    let (s, b) = ctx
        .send(
            ctx.client
                .post(ctx.url("/reconcile"))
                .json(&json!({"since": -5})),
        )
        .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_field"))
    );
}

/// (d) An authorization and its capture made while webhooks were lost.
async fn lost_settlement(ctx: Ctx) {
    let p = ctx.project("ag1").await;
    let card = ctx.card("ag1", "pur_d", BTreeMap::new()).await;
    ctx.intent(&p, "ag1", "pur_d", "approved", Some(&card))
        .await;
    let auth = ctx
        .helper(
            "authorizations",
            &[
                ("card", card.clone()),
                ("amount", "2000".into()),
                ("merchant_data[name]", "NAMECHEAP.COM".into()),
                ("merchant_data[network_id]", "net_namecheap".into()),
                ("merchant_data[country]", "US".into()),
            ],
        )
        .await;
    assert_eq!(auth["approved"], true, "{auth}");
    let auth_id = auth["id"].as_str().unwrap().to_string();
    let captured = ctx
        .helper(&format!("authorizations/{auth_id}/capture"), &[])
        .await;
    assert_eq!(captured["status"], "closed", "{captured}");
    // Nothing reached the ledger.
    assert_eq!(ctx.get("/intents/pur_d").await["captured"], 0);

    let run = ctx.reconcile().await;
    let e = entry(&run, "authorization_missing", &auth_id);
    assert_eq!(
        (e["intent_id"].as_str(), e["action"].as_str()),
        (Some("pur_d"), Some("recorded"))
    );
    let t = entries(&run, "transaction_missing");
    assert_eq!(t.len(), 1, "{run:#}");
    assert_eq!(t[0]["intent_id"], "pur_d");
    assert_eq!(run["report"]["totals"]["authorizations_checked"], 1);
    assert_eq!(run["report"]["totals"]["transactions_checked"], 1);

    let intent = ctx.get("/intents/pur_d").await;
    assert_eq!(intent["captured"], 2000, "{intent}");
    let auths = ctx.get("/authorizations?intent_id=pur_d").await;
    assert_eq!(auths["items"][0]["id"], auth_id.as_str());
    assert_eq!(auths["items"][0]["status"], "closed");
    // As webhooks would: the card closed after its one payment settles the purchase.
    if !ctx.stripe_active(&card).await {
        assert_eq!(intent["status"], "settled", "{intent}");
    }
    let d = ctx.get("/discrepancies?intent_id=pur_d").await;
    assert_eq!(d["items"].as_array().unwrap().len(), 0, "{d}");
    // The sidecar's feed has it.
    let feed = ctx.feed(&p.token).await;
    let u = feed
        .updates
        .iter()
        .rev()
        .find(|u| u.intent_id == "pur_d")
        .unwrap();
    assert_eq!(u.captured, 2000);
    assert_eq!(u.authorizations.len(), 1);
    assert_eq!(u.authorizations[0].id, auth_id);

    // (f)
    let second = ctx.reconcile().await;
    no_actions(&second);
    assert_eq!(ctx.get("/intents/pur_d").await["captured"], 2000);
}

/// (g) Without Stripe credentials.
async fn not_configured(ctx: Ctx) {
    let (s, b) = ctx.send(ctx.client.post(ctx.url("/reconcile"))).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(b["error"]["code"], "stripe_not_configured");
    assert_eq!(ctx.get("/reconciliations").await["items"], json!([]));
    let (s, _) = ctx
        .client
        .post(ctx.url("/reconcile"))
        .send()
        .await
        .map(|r| (r.status(), ()))
        .unwrap();
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}

/// One run at a time: a second request while one runs is refused.
async fn one_at_a_time(ctx: Ctx) {
    let first = ctx.send(ctx.client.post(ctx.url("/reconcile")));
    let second = async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        ctx.send(ctx.client.post(ctx.url("/reconcile"))).await
    };
    let ((s1, b1), (s2, b2)) = tokio::join!(first, second);
    assert_eq!(s1, StatusCode::OK, "{b1}");
    assert_eq!(s2, StatusCode::CONFLICT, "{b2}");
    assert_eq!(b2["error"]["code"], "reconciliation_running");
}

/// The periodic task runs by itself (interval 1 s), as the system.
async fn periodic(ctx: Ctx) {
    let started = Instant::now();
    loop {
        let list = ctx.get("/reconciliations").await;
        if let Some(run) = list["items"].as_array().unwrap().first() {
            assert_eq!(run["actor_type"], "system");
            assert_eq!(run["status"], "ok", "{run}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no periodic run"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
