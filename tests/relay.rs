#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]
//! The issuing relay as a leaked sidecar token would meet it, on SQLite and PostgreSQL: the
//! real emulator, the control plane served over HTTP (direct mode) and real sidecars issuing
//! through it with the real async-stripe client. Exactly the issuer's card shape passes;
//! every other shape is refused; one card per intent (an idempotent retry passes); budgets
//! and administrators' approvals bound the cards the token can get, also under 30
//! concurrent creations through two control-plane replicas; crash recovery still works.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use roony::control::db::ControlDb;
use roony::emulator::{Emulator, EmulatorConfig};
use roony::issuer::StripeConfig;
use serde_json::{Value, json};

use common::db::{Kind, TestDb, on_both};
use common::procs::{ADMIN, Http, codes, project, sidecar_token, until};

const WHSEC: &str = "whsec_relay_test_secret";
const DIRECT_KEY: &str = "sk_test_relay_direct";

struct Ctx {
    db: ControlDb,
    config: roony::control::ControlConfig,
    cp: String,
    emu_url: String,
    http: Http,
    _emu: Emulator,
    _stops: Vec<tokio::sync::oneshot::Sender<()>>,
}

async fn run<F, Fut>(kind: Kind, scenario: F)
where
    F: FnOnce(Ctx) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let Some(tdb) = TestDb::new(kind, "relay tests is SKIPPED").await else {
        return;
    };
    let emu = Emulator::new(EmulatorConfig::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let emu_url = format!("http://{}", listener.local_addr().unwrap());
    let (emu_stop, emu_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(emu.clone().serve(listener, async move {
        let _ = emu_rx.await;
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cp = format!("http://{addr}");
    let mut config = roony::control::ControlConfig::sqlite_in(std::path::Path::new("/unused"));
    config.database_url = tdb.url.clone();
    config.listen = addr;
    config.bootstrap_admin_token = Some(ADMIN.into());
    config.stripe_webhook_secrets = vec![WHSEC.into()];
    config.stripe_base_url = Some(emu_url.clone());
    config.stripe_credentials = roony::control::connect::StripeCredentials::Direct {
        api_key: DIRECT_KEY.into(),
        account: None,
    };
    let db = roony::control::open(&config).await.unwrap();
    let (cp_stop, cp_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(roony::control::serve_db(db.clone(), listener, async move {
        let _ = cp_rx.await;
    }));
    emu.set_webhook(Some(roony::emulator::webhooks::WebhookConfig::new(
        format!("{cp}/api/webhooks/stripe"),
        vec![WHSEC.into()],
    )));
    let ctx = Ctx {
        db,
        config,
        cp,
        emu_url,
        http: Http(reqwest::Client::new()),
        _emu: emu,
        _stops: vec![emu_stop],
    };
    scenario(ctx).await;
    let _ = cp_stop.send(());
    let _ = server.await;
    tdb.drop_schema().await;
}

/// An agent (with `policy`) in a fresh project, its key and a sidecar token of the project.
struct Agent {
    id: String,
    key: String,
    token: String,
    project: String,
}

fn policy(extra: Value) -> Value {
    let mut p = json!({
        "currency": "USD",
        "max_per_transaction": 5_000,
        "budgets": [{"period": "daily", "limit": 100_000}],
        "card_buffer_bps": 0,
        "risk": {"require_approval_above": 100, "decline_above": 100}
    });
    for (k, v) in extra.as_object().unwrap() {
        p[k] = v.clone();
    }
    p
}

fn form(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn set(form: &mut Vec<(String, String)>, key: &str, value: &str) {
    form.retain(|(k, _)| k != key);
    form.push((key.to_string(), value.to_string()));
}

fn unset(form: &mut Vec<(String, String)>, prefix: &str) {
    form.retain(|(k, _)| !k.starts_with(prefix));
}

fn new_key() -> String {
    format!("test-{}", common::unique())
}

impl Ctx {
    async fn agent(&self, policy: Value) -> Agent {
        let id = format!("agt_rl{}", common::unique().to_lowercase());
        let p = project(&self.http, &self.cp, &[id.as_str()], 100_000_000).await;
        self.http
            .admin(
                &self.cp,
                reqwest::Method::PUT,
                &format!("/agents/{id}/policy"),
                policy,
            )
            .await;
        let token = sidecar_token(&self.http, &self.cp, &p.id, "relay-sidecar").await;
        Agent {
            id,
            key: p.keys[0].clone(),
            token,
            project: p.id,
        }
    }

    fn relay(&self, path: &str) -> String {
        format!("{}/api/sync/v1/stripe/v1/{path}", self.cp)
    }

    async fn post(
        &self,
        token: &str,
        path: &str,
        form: &[(String, String)],
        key: Option<&str>,
    ) -> (u16, Value, reqwest::header::HeaderMap) {
        let mut req = self
            .http
            .0
            .post(self.relay(path))
            .bearer_auth(token)
            .form(form);
        if let Some(k) = key {
            req = req.header("idempotency-key", k);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        (status, r.json().await.unwrap_or(Value::Null), headers)
    }

    /// A cardholder of the agent, made through the relay as the issuer makes it.
    async fn cardholder(&self, a: &Agent) -> String {
        let (status, v, _) = self
            .post(
                &a.token,
                "issuing/cardholders",
                &cardholder_form(&a.id),
                Some(&new_key()),
            )
            .await;
        assert_eq!(status, 200, "{v}");
        v["id"].as_str().unwrap().to_string()
    }

    /// A card through the relay for a made-up intent (what a leaked token can try).
    async fn forged(&self, a: &Agent, holder: &str, amount: i64) -> (u16, Value) {
        let intent = roony::service::ids::intent_id();
        let (status, v, _) = self
            .post(
                &a.token,
                "issuing/cards",
                &card_form(&a.id, &intent, holder, amount),
                Some(&new_key()),
            )
            .await;
        (status, v)
    }

    /// A card as a synced sidecar makes it: metadata signed with its token (the control
    /// plane adopts such a card rather than canceling it as an orphan).
    async fn signed(&self, a: &Agent, holder: &str, amount: i64) -> (u16, Value) {
        let intent = roony::service::ids::intent_id();
        let mut f = card_form(&a.id, &intent, holder, amount);
        sign_metadata(&mut f, a, &intent, amount);
        let (status, v, _) = self
            .post(&a.token, "issuing/cards", &f, Some(&new_key()))
            .await;
        (status, v)
    }

    async fn emulator_card(&self, id: &str) -> Value {
        self.http
            .0
            .get(format!("{}/v1/issuing/cards/{id}", self.emu_url))
            .bearer_auth(DIRECT_KEY)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// The agent's cards at Stripe (the emulator).
    async fn cards_of(&self, agent: &str) -> Vec<Value> {
        let v: Value = self
            .http
            .0
            .get(format!("{}/v1/issuing/cards?limit=100", self.emu_url))
            .bearer_auth(DIRECT_KEY)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["metadata"]["roony_agent_id"] == agent)
            .cloned()
            .collect()
    }

    async fn sidecar(&self, a: &Agent) -> SidecarRun {
        let dir = tempfile::tempdir().unwrap();
        let config = roony::sidecar::SidecarConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.path().join("sidecar"),
            stripe: StripeConfig::relay(&self.cp, a.token.clone()),
            billing: Default::default(),
            mcp: roony::mcp::http::McpHttpConfig::default(),
            rate_limits: roony::ratelimit::RateLimitConfig::disabled(),
        };
        let store = roony::sidecar::open_store(&config.data_dir).unwrap();
        let service = roony::sidecar::build_service(store, &config).unwrap();
        let sync = roony::sidecar::start_sync(
            &service,
            roony::sync::client::SyncConfig {
                control_plane_url: self.cp.clone(),
                sidecar_token: a.token.clone(),
            },
            Duration::from_secs(3600),
        )
        .unwrap();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let running = roony::sidecar::start(
            service,
            config.listen,
            config.mcp.clone(),
            config.rate_limits,
            async move {
                let _ = stop_rx.await;
            },
        )
        .await
        .unwrap();
        let url = format!("http://{}", running.addr);
        // Synced once the agent's key works at the sidecar.
        until(Duration::from_secs(20), "sidecar synced", || async {
            let (status, _) = self.http.agent_get(&url, &a.key, "/api/v1/budget").await;
            status == 200
        })
        .await;
        SidecarRun {
            url,
            _dir: dir,
            _stop: stop,
            sync,
            running,
        }
    }

    /// A merchant's authorization request on `card` at the emulator (Stripe asks the
    /// control plane in real time).
    async fn authorize(&self, card: &str, amount: i64) -> Value {
        self.http
            .0
            .post(format!(
                "{}/v1/test_helpers/issuing/authorizations",
                self.emu_url
            ))
            .bearer_auth(DIRECT_KEY)
            .form(&[
                ("card", card),
                ("amount", &amount.to_string()),
                ("currency", "usd"),
                ("merchant_data[name]", "NAMECHEAP.COM"),
                ("merchant_data[country]", "US"),
                ("merchant_data[network_id]", "net_namecheap"),
            ])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// The merchant's side: an authorization at the emulator, then its capture.
    async fn charge(&self, card: &str, amount: i64) -> Value {
        let auth = self.authorize(card, amount).await;
        assert_eq!(auth["approved"], true, "{auth}");
        let id = auth["id"].as_str().unwrap();
        let captured: Value = self
            .http
            .0
            .post(format!(
                "{}/v1/test_helpers/issuing/authorizations/{id}/capture",
                self.emu_url
            ))
            .bearer_auth(DIRECT_KEY)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(captured["status"], "closed", "{captured}");
        captured
    }
}

struct SidecarRun {
    url: String,
    running: roony::sidecar::Running,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
    sync: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for SidecarRun {
    fn drop(&mut self) {
        self.running.background.abort();
        self.running.server.abort();
        for t in &self.sync {
            t.abort();
        }
    }
}

fn encode_form(pairs: &[(String, String)]) -> String {
    let enc = |s: &str| {
        percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
    };
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn cardholder_form(agent: &str) -> Vec<(String, String)> {
    form(&[
        ("name", "relay agent"),
        ("type", "individual"),
        ("individual[first_name]", "Roony"),
        ("individual[last_name]", "relay agent"),
        ("billing[address][line1]", "510 Townsend St"),
        ("billing[address][city]", "San Francisco"),
        ("billing[address][state]", "CA"),
        ("billing[address][postal_code]", "94103"),
        ("billing[address][country]", "US"),
        ("metadata[roony_agent_id]", agent),
    ])
}

/// Sets the metadata a synced sidecar puts on a card (expiring in 10 minutes), signed
/// with its token.
fn sign_metadata(form: &mut Vec<(String, String)>, a: &Agent, intent: &str, amount: i64) {
    let mut md = BTreeMap::from([
        ("roony_intent_id".to_string(), intent.to_string()),
        ("roony_agent_id".to_string(), a.id.clone()),
        ("roony_limit".to_string(), amount.to_string()),
        ("roony_currency".to_string(), "USD".to_string()),
        ("roony_merchant".to_string(), "Namecheap".to_string()),
        ("roony_sidecar".to_string(), roony::auth::key_id(&a.token)),
        (
            "roony_expires".to_string(),
            (common::dash::now() + 600).to_string(),
        ),
    ]);
    let sig = roony::sync::wire::sign_card_metadata(&md, &a.token);
    md.insert("roony_sig".to_string(), sig);
    for (k, v) in &md {
        set(form, &format!("metadata[{k}]"), v);
    }
}

/// A card creation exactly as Roony's issuer sends it (expiring in 10 minutes).
fn card_form(agent: &str, intent: &str, holder: &str, amount: i64) -> Vec<(String, String)> {
    let expires = (common::dash::now() + 600).to_string();
    form(&[
        ("metadata[roony_expires]", &expires),
        ("cardholder", holder),
        ("currency", "usd"),
        ("lifecycle_controls[cancel_after][payment_count]", "1"),
        ("metadata[roony_agent_id]", agent),
        ("metadata[roony_intent_id]", intent),
        (
            "spending_controls[spending_limits][0][amount]",
            &amount.to_string(),
        ),
        (
            "spending_controls[spending_limits][0][interval]",
            "all_time",
        ),
        ("status", "active"),
        ("type", "virtual"),
    ])
}

on_both!(
    only_the_issuers_shape_passes,
    one_card_per_intent,
    budgets_bound_relay_cards,
    approvals_and_the_ledger,
    concurrent_creations_never_exceed_the_budget,
    crash_recovery_through_the_relay,
    relay_cards_expire,
);

async fn only_the_issuers_shape_passes(ctx: Ctx) {
    let a = ctx
        .agent(policy(json!({
            "categories": {"deny": ["betting_casino_gambling"]},
            "countries": {"allow": ["US", "CA"]}
        })))
        .await;
    let holder = ctx.cardholder(&a).await;
    let strict = |intent: &str, amount: i64| {
        let mut f = card_form(&a.id, intent, &holder, amount);
        f.push((
            "spending_controls[blocked_categories][0]".into(),
            "betting_casino_gambling".into(),
        ));
        f.push((
            "spending_controls[allowed_merchant_countries][0]".into(),
            "US".into(),
        ));
        f
    };

    // The issuer's shape (controls as strict as the policy) passes; the card Stripe made
    // is exactly the checked one, whatever content type the sidecar claimed.
    let intent = roony::service::ids::intent_id();
    let r = ctx
        .http
        .0
        .post(ctx.relay("issuing/cards"))
        .bearer_auth(&a.token)
        .header("idempotency-key", new_key())
        .header("content-type", "text/plain")
        .body(encode_form(&strict(&intent, 1_500)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let card: Value = r.json().await.unwrap();
    let card = ctx.emulator_card(card["id"].as_str().unwrap()).await;
    assert_eq!(card["type"], "virtual");
    assert_eq!(card["status"], "active");
    let controls = &card["spending_controls"];
    assert_eq!(
        controls["spending_limits"],
        json!([{"amount": 1_500, "interval": "all_time", "categories": null}]),
        "{card}"
    );
    assert_eq!(
        controls["blocked_categories"],
        json!(["betting_casino_gambling"])
    );
    assert_eq!(controls["allowed_merchant_countries"], json!(["US"]));
    assert_eq!(
        card["lifecycle_controls"]["cancel_after"]["payment_count"],
        1
    );
    let row = ctx.db.relay_card(&intent).await.unwrap().unwrap();
    assert_eq!(row.card_id.as_deref(), card["id"].as_str());
    assert_eq!((row.spending_limit, row.currency.as_str()), (1_500, "USD"));

    // Metadata signed with the sidecar's token (as a synced sidecar signs it) passes.
    let intent = roony::service::ids::intent_id();
    let mut signed = strict(&intent, 1_200);
    sign_metadata(&mut signed, &a, &intent, 1_200);
    let (status, v, _) = ctx
        .post(&a.token, "issuing/cards", &signed, Some(&new_key()))
        .await;
    assert_eq!(status, 200, "{v}");

    // Every other shape is refused, before Stripe sees it.
    let before = ctx.cards_of(&a.id).await.len();
    let base = || strict(&roony::service::ids::intent_id(), 1_000);
    let mut cases: Vec<(&str, Vec<(String, String)>)> = Vec::new();
    let mut f = base();
    set(&mut f, "type", "physical");
    cases.push(("physical", f));
    let mut f = base();
    set(&mut f, "shipping[name]", "Mallory");
    cases.push(("shipping", f));
    let mut f = base();
    unset(&mut f, "lifecycle_controls");
    cases.push(("no lifecycle controls", f));
    let mut f = base();
    set(
        &mut f,
        "lifecycle_controls[cancel_after][payment_count]",
        "2",
    );
    cases.push(("two payments", f));
    for interval in ["per_authorization", "daily", "weekly", "monthly", "yearly"] {
        let mut f = base();
        set(
            &mut f,
            "spending_controls[spending_limits][0][interval]",
            interval,
        );
        cases.push(("a reusable interval", f));
    }
    let mut f = base();
    set(
        &mut f,
        "spending_controls[spending_limits][1][amount]",
        "100",
    );
    set(
        &mut f,
        "spending_controls[spending_limits][1][interval]",
        "all_time",
    );
    cases.push(("two limits", f));
    let mut f = base();
    set(
        &mut f,
        "spending_controls[spending_limits][0][categories][0]",
        "ambulance_services",
    );
    cases.push(("per-category limit", f));
    let mut f = base();
    unset(&mut f, "spending_controls[spending_limits]");
    cases.push(("no limit", f));
    for (param, value) in [
        ("replacement_for", "ic_1234"),
        ("replacement_reason", "lost"),
        ("financial_account", "fa_1234"),
        ("expand[0]", "number"),
        ("exp_month", "12"),
        ("personalization_design", "pd_1"),
        ("second_line", "x"),
        ("pin[encrypted_number]", "x"),
        ("spending_controls[allowed_card_presences][0]", "present"),
    ] {
        let mut f = base();
        set(&mut f, param, value);
        cases.push((param, f));
    }
    let mut f = base();
    set(&mut f, "status", "inactive");
    cases.push(("inactive", f));
    let mut f = base();
    set(&mut f, "currency", "eur");
    cases.push(("another currency", f));
    let mut f = base();
    set(
        &mut f,
        "spending_controls[spending_limits][0][amount]",
        "5001",
    );
    cases.push(("above the per-transaction maximum", f));
    let mut f = base();
    unset(&mut f, "spending_controls[blocked_categories]");
    cases.push(("the denied category not blocked", f));
    let mut f = base();
    unset(&mut f, "spending_controls[blocked_categories]");
    set(
        &mut f,
        "spending_controls[allowed_categories][0]",
        "betting_casino_gambling",
    );
    cases.push(("a denied category allowed", f));
    let mut f = base();
    set(
        &mut f,
        "spending_controls[allowed_categories][0]",
        "computer_software_stores",
    );
    cases.push(("categories allowed and blocked", f));
    let mut f = base();
    unset(&mut f, "spending_controls[blocked_categories]");
    set(&mut f, "spending_controls[blocked_categories]", "x");
    cases.push(("a list as a plain value", f));
    let mut f = base();
    unset(&mut f, "spending_controls[allowed_merchant_countries]");
    cases.push(("no country control", f));
    let mut f = base();
    set(
        &mut f,
        "spending_controls[allowed_merchant_countries][1]",
        "RU",
    );
    cases.push(("a country the policy does not allow", f));
    let mut f = base();
    unset(&mut f, "spending_controls[allowed_merchant_countries]");
    set(
        &mut f,
        "spending_controls[blocked_merchant_countries][0]",
        "RU",
    );
    cases.push(("blocking instead of allowing countries", f));
    let mut f = base();
    set(&mut f, "metadata[note]", "x");
    cases.push(("other metadata", f));
    let mut f = base();
    set(&mut f, "metadata[roony_limit]", "99999");
    cases.push(("roony_limit disagrees", f));
    let mut f = base();
    set(&mut f, "metadata[roony_currency]", "EUR");
    cases.push(("roony_currency disagrees", f));
    let mut f = base();
    set(&mut f, "metadata[roony_sig]", &"00".repeat(32));
    cases.push(("a signature that does not verify", f));
    let mut f = base();
    set(&mut f, "metadata[roony_sidecar]", "st_another");
    cases.push(("another sidecar", f));
    let mut f = base();
    set(&mut f, "metadata[roony_intent_id]", "made-up");
    cases.push(("not an intent id", f));
    let mut f = base();
    set(&mut f, "cardholder", "acct_123");
    cases.push(("not a cardholder", f));
    for (what, f) in &cases {
        let (status, v, _) = ctx
            .post(&a.token, "issuing/cards", f, Some(&new_key()))
            .await;
        assert_eq!(status, 403, "{what}: {v}");
        assert_eq!(v["error"]["code"], "relay_forbidden", "{what}: {v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{what}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.starts_with(char::is_lowercase), "{what}: {message}");
    }
    // Bad input that is not a policy question is a 400.
    let mut f = base();
    set(
        &mut f,
        "spending_controls[spending_limits][0][amount]",
        "12.5",
    );
    let (status, v, _) = ctx
        .post(&a.token, "issuing/cards", &f, Some(&new_key()))
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("relay_check_failed"))
    );
    let mut f = base();
    unset(&mut f, "metadata");
    let (status, _, _) = ctx
        .post(&a.token, "issuing/cards", &f, Some(&new_key()))
        .await;
    assert_eq!(status, 400);

    // Headers: an idempotency key is required, the Stripe-Version is the build's, the
    // account is the relay's.
    let (status, v, _) = ctx.post(&a.token, "issuing/cards", &base(), None).await;
    assert_eq!(status, 403, "{v}");
    for (name, value) in [
        ("stripe-version", "2020-08-27"),
        ("stripe-account", "acct_other"),
    ] {
        let r = ctx
            .http
            .0
            .post(ctx.relay("issuing/cards"))
            .bearer_auth(&a.token)
            .header("idempotency-key", new_key())
            .header(name, value)
            .form(&base())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{name}");
    }
    let r = ctx
        .http
        .0
        .post(ctx.relay("issuing/cards"))
        .bearer_auth(&a.token)
        .header("idempotency-key", new_key())
        .header("stripe-version", roony::issuer::stripe_api_version())
        .form(&base())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the build's own version passes");
    assert_eq!(
        r.headers()["stripe-version"],
        roony::issuer::stripe_api_version()
    );

    // Another project's agent, a frozen agent.
    let other = ctx.agent(policy(json!({}))).await;
    let mut f = card_form(&other.id, &roony::service::ids::intent_id(), &holder, 100);
    let (status, v, _) = ctx
        .post(&a.token, "issuing/cards", &f, Some(&new_key()))
        .await;
    assert_eq!(status, 403, "{v}");
    ctx.http
        .admin(
            &ctx.cp,
            reqwest::Method::POST,
            &format!("/agents/{}/freeze", a.id),
            Value::Null,
        )
        .await;
    let (status, v, _) = ctx
        .post(&a.token, "issuing/cards", &base(), Some(&new_key()))
        .await;
    assert_eq!(status, 403, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("frozen"));
    ctx.http
        .admin(
            &ctx.cp,
            reqwest::Method::POST,
            &format!("/agents/{}/unfreeze", a.id),
            Value::Null,
        )
        .await;
    set(&mut f, "metadata[roony_agent_id]", "agt_does_not_exist");
    let (status, _, _) = ctx
        .post(&a.token, "issuing/cards", &f, Some(&new_key()))
        .await;
    assert_eq!(status, 403);
    assert_eq!(
        ctx.cards_of(&a.id).await.len(),
        before + 1,
        "only the build-version card was made"
    );

    // Cardholders: the issuer's parameters, for an active agent of the project.
    let (status, v, _) = ctx
        .post(
            &a.token,
            "issuing/cardholders",
            &cardholder_form(&other.id),
            Some(&new_key()),
        )
        .await;
    assert_eq!(status, 403, "another project's agent: {v}");
    for (param, value) in [
        ("phone_number", "+15555550100"),
        ("spending_controls[spending_limits][0][amount]", "100"),
        ("status", "inactive"),
        ("type", "company"),
        ("metadata[note]", "x"),
        ("individual[dob][day]", "1"),
    ] {
        let mut f = cardholder_form(&a.id);
        set(&mut f, param, value);
        let (status, v, _) = ctx
            .post(&a.token, "issuing/cardholders", &f, Some(&new_key()))
            .await;
        assert_eq!(status, 403, "{param}: {v}");
    }
    let mut f = cardholder_form(&a.id);
    unset(&mut f, "metadata");
    let (status, _, _) = ctx
        .post(&a.token, "issuing/cardholders", &f, Some(&new_key()))
        .await;
    assert_eq!(status, 400);
    let (status, _, _) = ctx
        .post(
            &a.token,
            "issuing/cardholders",
            &cardholder_form(&a.id),
            None,
        )
        .await;
    assert_eq!(status, 403, "no idempotency key");
}

async fn one_card_per_intent(ctx: Ctx) {
    let a = ctx.agent(policy(json!({}))).await;
    let holder = ctx.cardholder(&a).await;
    let intent = roony::service::ids::intent_id();
    let key = new_key();
    let f = card_form(&a.id, &intent, &holder, 2_000);
    let (status, first, _) = ctx.post(&a.token, "issuing/cards", &f, Some(&key)).await;
    assert_eq!(status, 200, "{first}");
    // The issuer's retry (same request, same key): Stripe replays the same card.
    let (status, again, headers) = ctx.post(&a.token, "issuing/cards", &f, Some(&key)).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["id"], first["id"]);
    assert_eq!(headers["idempotent-replayed"], "true");
    // A second card for the intent: refused, with another key or a larger limit.
    let (status, v, _) = ctx
        .post(&a.token, "issuing/cards", &f, Some(&new_key()))
        .await;
    assert_eq!(status, 403, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("one card per intent"),
        "{v}"
    );
    let bigger = card_form(&a.id, &intent, &holder, 2_001);
    let (status, _, _) = ctx
        .post(&a.token, "issuing/cards", &bigger, Some(&key))
        .await;
    assert_eq!(status, 403);
    assert_eq!(ctx.cards_of(&a.id).await.len(), 1);

    // Stripe refuses a creation (an unknown cardholder): no card, so the claim is
    // released and the intent can still get its card.
    let intent = roony::service::ids::intent_id();
    let (status, v, _) = ctx
        .post(
            &a.token,
            "issuing/cards",
            &card_form(&a.id, &intent, "ich_doesnotexist", 1_000),
            Some(&new_key()),
        )
        .await;
    assert!((400..500).contains(&status), "{status} {v}");
    assert!(ctx.db.relay_card(&intent).await.unwrap().is_none());
    let (status, v, _) = ctx
        .post(
            &a.token,
            "issuing/cards",
            &card_form(&a.id, &intent, &holder, 1_000),
            Some(&new_key()),
        )
        .await;
    assert_eq!(status, 200, "{v}");

    // Canceling through the relay marks the card canceled; canceling again is Stripe's
    // answer about a canceled card.
    let card = first["id"].as_str().unwrap();
    let (status, v, _) = ctx
        .post(
            &a.token,
            &format!("issuing/cards/{card}"),
            &form(&[("status", "canceled")]),
            Some(&format!("roony-cancel-{card}")),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let rows = ctx.db.relay_cards_of_agent(&a.id).await.unwrap();
    let row = rows
        .iter()
        .find(|r| r.card_id.as_deref() == Some(card))
        .unwrap();
    assert!(row.canceled_at.is_some());
    let (status, _, _) = ctx
        .post(
            &a.token,
            &format!("issuing/cards/{card}"),
            &form(&[("status", "active")]),
            Some(&new_key()),
        )
        .await;
    assert_eq!(status, 403, "only cancels");
}

async fn budgets_bound_relay_cards(ctx: Ctx) {
    let a = ctx
        .agent(policy(json!({
            "max_per_transaction": 5_000,
            "budgets": [{"period": "daily", "limit": 10_000}]
        })))
        .await;
    let sc = ctx.sidecar(&a).await;
    // The sidecar's own purchases work through the relay.
    let (status, first) = ctx.http.buy(&sc.url, &a.key, 3_000).await;
    assert_eq!(status, 201, "{first}");
    let (status, second) = ctx.http.buy(&sc.url, &a.key, 4_000).await;
    assert_eq!(status, 201, "{second}");
    let first_intent = first["id"].as_str().unwrap();
    let row = ctx.db.relay_card(first_intent).await.unwrap().unwrap();
    assert_eq!(row.card_id.as_deref(), first["card"]["id"].as_str());
    assert_eq!(row.spending_limit, 3_000);

    // A leaked token gets what is left of the day's budget, and no more.
    let holder = ctx.db.relay_cards_of_agent(&a.id).await.unwrap();
    assert_eq!(holder.len(), 2);
    let holder = ctx
        .emulator_card(first["card"]["id"].as_str().unwrap())
        .await["cardholder"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, forged) = ctx.forged(&a, &holder, 3_000).await;
    assert_eq!(status, 200, "{forged}");
    let (status, v) = ctx.forged(&a, &holder, 1).await;
    assert_eq!(status, 403, "{v}");
    assert_eq!(v["error"]["code"], "relay_forbidden");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("agent daily budget"),
        "{v}"
    );
    // An agent budget set by an administrator tightens the policy's: 10_000 → 9_000.
    ctx.http
        .admin(
            &ctx.cp,
            reqwest::Method::PUT,
            "/budgets",
            json!({"scope": "agent", "scope_id": a.id, "period": "daily", "currency": "USD", "limit": 9_000}),
        )
        .await;
    // Canceling the forged card (through the relay) frees its limit: it spent nothing.
    let forged_id = forged["id"].as_str().unwrap();
    let (status, v, _) = ctx
        .post(
            &a.token,
            &format!("issuing/cards/{forged_id}"),
            &form(&[("status", "canceled")]),
            Some(&new_key()),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let (status, v) = ctx.forged(&a, &holder, 2_001).await;
    assert_eq!(status, 403, "9_000 - 7_000 left: {v}");
    let (status, v) = ctx.forged(&a, &holder, 2_000).await;
    assert_eq!(status, 200, "{v}");
    let last_forged = v["id"].as_str().unwrap().to_string();
    let (status, v, _) = ctx
        .post(
            &a.token,
            &format!("issuing/cards/{last_forged}"),
            &form(&[("status", "canceled")]),
            Some(&new_key()),
        )
        .await;
    assert_eq!(status, 200, "{v}");

    // A used single-use card counts at what it spent: the merchant captures 2_500 of the
    // 4_000 card, Stripe cancels it (one payment) and says so in its events.
    let card = second["card"]["id"].as_str().unwrap().to_string();
    ctx.charge(&card, 2_500).await;
    until(
        Duration::from_secs(15),
        "the used card marked canceled",
        || {
            let db = ctx.db.clone();
            let intent = second["id"].as_str().unwrap().to_string();
            async move {
                db.relay_card(&intent)
                    .await
                    .unwrap()
                    .is_some_and(|r| r.canceled_at.is_some())
            }
        },
    )
    .await;
    // Exposure now: 3_000 (live) + 2_500 (spent) = 5_500 of 9_000.
    let (status, v) = ctx.forged(&a, &holder, 3_501).await;
    assert_eq!(status, 403, "{v}");
    let (status, v) = ctx.forged(&a, &holder, 3_500).await;
    assert_eq!(status, 200, "{v}");
    // The sidecar's next purchase (it knows of 5_500 only) is refused at the relay: the
    // budget is spent, whoever spent it. The agent sees a failed issuance, nothing reserved.
    let (status, v) = ctx.http.buy(&sc.url, &a.key, 100).await;
    assert_eq!(status, 502, "{v}");
    assert_eq!(v["status"], "failed", "{v}");
    assert!(
        codes(&v).contains(&"card_issuance_failed".to_string()),
        "{v}"
    );
}

async fn approvals_and_the_ledger(ctx: Ctx) {
    let a = ctx
        .agent(policy(json!({
            "max_per_transaction": 10_000,
            "require_approval_above": 5_000,
            "budgets": [{"period": "daily", "limit": 100_000}]
        })))
        .await;
    let sc = ctx.sidecar(&a).await;
    let holder = ctx.cardholder(&a).await;
    let (status, v) = ctx.forged(&a, &holder, 5_001).await;
    assert_eq!(status, 403, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("approv"),
        "{v}"
    );
    let (status, v) = ctx.forged(&a, &holder, 5_000).await;
    assert_eq!(status, 200, "at the threshold: {v}");

    // A purchase above the threshold waits; the administrator approves it; the sidecar
    // then gets its card through the relay.
    let (status, pending) = ctx.http.buy(&sc.url, &a.key, 6_000).await;
    assert_eq!(status, 202, "{pending}");
    let id = pending["id"].as_str().unwrap().to_string();
    // Before the approval, a card for it is refused (the ledger shows no approval).
    let (status, v, _) = ctx
        .post(
            &a.token,
            "issuing/cards",
            &card_form(&a.id, &id, &holder, 6_000),
            Some(&new_key()),
        )
        .await;
    assert_eq!(status, 403, "{v}");
    until(
        Duration::from_secs(15),
        "the pending intent in the ledger",
        || async { ctx.http.ledger(&ctx.cp, &a.project).await.contains_key(&id) },
    )
    .await;
    ctx.http
        .admin(
            &ctx.cp,
            reqwest::Method::POST,
            &format!("/intents/{id}/approve"),
            Value::Null,
        )
        .await;
    until(Duration::from_secs(20), "the approved card", || async {
        let (_, v) = ctx
            .http
            .agent_get(&sc.url, &a.key, &format!("/api/v1/purchase_intents/{id}"))
            .await;
        v["status"] == "approved" && v["card"]["id"].is_string()
    })
    .await;
    let row = ctx.db.relay_card(&id).await.unwrap().unwrap();
    assert_eq!(row.spending_limit, 6_000);

    // A declined intent (above the maximum) gets no card from the relay.
    let (status, declined) = ctx.http.buy(&sc.url, &a.key, 20_000).await;
    assert_eq!(status, 402, "{declined}");
    let declined = declined["id"].as_str().unwrap().to_string();
    until(
        Duration::from_secs(15),
        "the declined intent in the ledger",
        || async {
            ctx.http
                .ledger(&ctx.cp, &a.project)
                .await
                .get(&declined)
                .is_some_and(|i| i["status"] == "declined")
        },
    )
    .await;
    let (status, v, _) = ctx
        .post(
            &a.token,
            "issuing/cards",
            &card_form(&a.id, &declined, &holder, 1_000),
            Some(&new_key()),
        )
        .await;
    assert_eq!(status, 403, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("declined"),
        "{v}"
    );
}

async fn concurrent_creations_never_exceed_the_budget(ctx: Ctx) {
    let a = ctx
        .agent(policy(json!({
            "max_per_transaction": 1_000,
            "budgets": [{"period": "daily", "limit": 10_000}]
        })))
        .await;
    let holder = ctx.cardholder(&a).await;
    // A second control-plane replica on the same database.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cp2 = format!("http://{}", listener.local_addr().unwrap());
    let db2 = roony::control::open(&ctx.config).await.unwrap();
    let (stop2, rx2) = tokio::sync::oneshot::channel::<()>();
    let server2 = tokio::spawn(roony::control::serve_db(db2, listener, async move {
        let _ = rx2.await;
    }));
    let mut tasks = Vec::new();
    for i in 0..30 {
        let base = if i % 2 == 0 {
            ctx.cp.clone()
        } else {
            cp2.clone()
        };
        let client = ctx.http.0.clone();
        let f = card_form(&a.id, &roony::service::ids::intent_id(), &holder, 1_000);
        let token = a.token.clone();
        tasks.push(tokio::spawn(async move {
            let r = client
                .post(format!("{base}/api/sync/v1/stripe/v1/issuing/cards"))
                .bearer_auth(token)
                .header("idempotency-key", new_key())
                .form(&f)
                .timeout(Duration::from_secs(60))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap())
        }));
    }
    let mut made = 0;
    for t in tasks {
        let (status, v) = t.await.unwrap();
        match status {
            200 => made += 1,
            403 => assert!(
                v["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("daily budget"),
                "{v}"
            ),
            other => panic!("{other}: {v}"),
        }
    }
    assert_eq!(made, 10);
    assert_eq!(ctx.cards_of(&a.id).await.len(), 10);
    let rows = ctx.db.relay_cards_of_agent(&a.id).await.unwrap();
    assert_eq!(rows.len(), 10);
    assert!(rows.iter().all(|r| r.card_id.is_some()));
    let _ = stop2.send(());
    let _ = server2.await;
}

/// A crash after the reservation, before the card was recorded (tests/lifecycle.rs, through
/// the relay): recovery retries with the same idempotency key and gets the card Stripe
/// already made; the relay lets that retry through and records one card per intent.
async fn crash_recovery_through_the_relay(ctx: Ctx) {
    let a = ctx
        .agent(policy(json!({
            "max_per_transaction": null,
            "budgets": [{"period": "daily", "limit": 10_000}],
            "categories": {"deny": ["betting_casino_gambling"]},
            "countries": {"allow": ["US"]}
        })))
        .await;
    let local_policy: roony::policy::Policy = serde_json::from_value(policy(json!({
        "max_per_transaction": null,
        "budgets": [{"period": "daily", "limit": 10_000}],
        "categories": {"deny": ["betting_casino_gambling"]},
        "countries": {"allow": ["US"]}
    })))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sidecar.redb");
    let mut stripe = StripeConfig::relay(&ctx.cp, a.token.clone());
    stripe.base_backoff = Duration::from_millis(10);
    stripe.max_backoff = Duration::from_millis(50);
    let clock = common::TestClock::new();
    let service = |store: roony::store::Store| {
        roony::service::Service::new(
            store,
            roony::issuer::Issuer::new(stripe.clone()).unwrap(),
            roony::service::ServiceConfig::default(),
            clock.clone(),
        )
    };
    let (first, second) = {
        let store = roony::store::Store::open(&path).unwrap();
        let svc = service(store.clone());
        svc.create_agent(&a.id, "relay agent", local_policy, None)
            .unwrap();
        let decide = |amount: i64| {
            let intent = serde_json::from_value::<roony::domain::intent::PurchaseRequest>(
                common::purchase(amount),
            )
            .unwrap()
            .validate(None)
            .unwrap();
            match store
                .decide(
                    &a.id,
                    intent,
                    clock.0.load(std::sync::atomic::Ordering::SeqCst),
                    &roony::service::ids::intent_id,
                    Default::default(),
                )
                .unwrap()
            {
                roony::store::Decided::New(r) => r,
                roony::store::Decided::Replay(_) => unreachable!(),
            }
        };
        // (first) crashed before calling Stripe; (second) after Stripe made the card.
        let first = decide(1_000);
        let second = decide(2_000);
        let issuer = roony::issuer::Issuer::new(stripe.clone()).unwrap();
        let holder = issuer
            .create_cardholder(&a.id, "relay agent", &Default::default())
            .await
            .unwrap();
        // As the sidecar issues it: expiring with its intent.
        let expires = second.expires_at.unwrap().to_string();
        let spec = roony::issuer::CardSpec {
            metadata: BTreeMap::from([("roony_expires".to_string(), expires)]),
            intent_id: second.id.clone(),
            agent_id: a.id.clone(),
            cardholder: holder,
            currency: roony::domain::money::Currency::USD,
            spending_limit: 2_000,
            allowed_categories: vec![],
            blocked_categories: vec!["betting_casino_gambling".into()],
            allowed_countries: vec!["US".into()],
            blocked_countries: vec![],
            idempotency_key: second.stripe_idempotency_key.clone(),
        };
        let made = issuer.create_card(&spec).await.unwrap();
        assert_eq!(ctx.cards_of(&a.id).await.len(), 1);
        (first.id, (second.id, made.id))
    };
    let store = roony::store::Store::open(&path).unwrap();
    let svc = service(store.clone());
    assert_eq!(svc.recover().await.unwrap(), 2);
    let ra = store.intent(&first).unwrap().unwrap();
    let rb = store.intent(&second.0).unwrap().unwrap();
    assert_eq!(ra.status, roony::store::IntentStatus::Approved);
    assert_eq!(rb.status, roony::store::IntentStatus::Approved);
    assert_eq!(
        rb.card.unwrap().id,
        second.1,
        "the card Stripe already made"
    );
    assert_eq!(ctx.cards_of(&a.id).await.len(), 2, "one card per intent");
    let rows = ctx.db.relay_cards_of_agent(&a.id).await.unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(svc.recover().await.unwrap(), 0);
}

/// Relay cards expire: the relay takes only a `roony_expires` within the policy's card
/// lifetime; a live card counts against every budget period (it can still be spent), an
/// expired one at what it spent; the sweep cancels it at Stripe; a sidecar's card expires
/// with its intent, and past the relay's expiry its real-time authorizations are declined
/// whatever its sidecar says about the intent.
async fn relay_cards_expire(ctx: Ctx) {
    let a = ctx
        .agent(policy(json!({
            "max_per_transaction": 5_000,
            "budgets": [{"period": "daily", "limit": 10_000}],
            "card_ttl_seconds": 600
        })))
        .await;
    let holder = ctx.cardholder(&a).await;
    let now = common::dash::now();

    // Only an expiry within the policy's card lifetime (plus clock skew) passes.
    for (expires, why) in [
        (None, "roony_expires"),
        (Some("soon".to_string()), "roony_expires"),
        (Some((now - 1).to_string()), "has passed"),
        (Some((now + 600 + 301 + 5).to_string()), "card_ttl_seconds"),
    ] {
        let intent = roony::service::ids::intent_id();
        let mut f = card_form(&a.id, &intent, &holder, 1_000);
        unset(&mut f, "metadata[roony_expires]");
        if let Some(e) = &expires {
            set(&mut f, "metadata[roony_expires]", e);
        }
        let (status, v, _) = ctx
            .post(&a.token, "issuing/cards", &f, Some(&new_key()))
            .await;
        assert_eq!(status, 403, "{expires:?}: {v}");
        assert_eq!(v["error"]["code"], "relay_forbidden");
        assert!(v["error"]["message"].as_str().unwrap().contains(why), "{v}");
    }
    let (status, v) = ctx.signed(&a, &holder, 3_000).await;
    assert_eq!(status, 200, "{v}");
    let row = ctx
        .db
        .relay_card(v["metadata"]["roony_intent_id"].as_str().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert!(
        row.expires_at > now && row.expires_at <= common::dash::now() + 600,
        "{row:?}"
    );

    // A card of 4_000, then made to look created two days ago: still live, it counts
    // against today's budget (3_000 + 4_000 + 3_001 > 10_000).
    let (status, old) = ctx.signed(&a, &holder, 4_000).await;
    assert_eq!(status, 200, "{old}");
    let old_id = old["id"].as_str().unwrap().to_string();
    let old_intent = old["metadata"]["roony_intent_id"]
        .as_str()
        .unwrap()
        .to_string();
    let exec = |sql: String| {
        let pool = ctx.db.pool().clone();
        async move {
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(&pool)
                .await
                .unwrap();
        }
    };
    exec(format!(
        "UPDATE relay_cards SET created_at = {} WHERE intent_id = '{old_intent}'",
        now - 2 * 86_400
    ))
    .await;
    let (status, v) = ctx.signed(&a, &holder, 3_001).await;
    assert_eq!(status, 403, "a live card of another day still counts: {v}");
    // Expired, it counts at what it spent (nothing) and only in its own day.
    exec(format!(
        "UPDATE relay_cards SET expires_at = {} WHERE intent_id = '{old_intent}'",
        now - 1
    ))
    .await;
    let (status, v) = ctx.signed(&a, &holder, 5_000).await;
    assert_eq!(status, 200, "3_000 + 5_000 of 10_000: {v}");
    let last = v["id"].as_str().unwrap().to_string();
    let last_intent = v["metadata"]["roony_intent_id"]
        .as_str()
        .unwrap()
        .to_string();

    // The sweep cancels the expired card at Stripe (and only it), once.
    let swept = roony::control::relay::sweep_expired(&ctx.db, common::dash::now())
        .await
        .unwrap();
    assert_eq!(swept, 1);
    assert_eq!(ctx.emulator_card(&old_id).await["status"], "canceled");
    assert_eq!(ctx.emulator_card(&last).await["status"], "active");
    let row = ctx.db.relay_card(&old_intent).await.unwrap().unwrap();
    assert!(row.canceled_at.is_some(), "{row:?}");
    assert_eq!(
        roony::control::relay::sweep_expired(&ctx.db, common::dash::now())
            .await
            .unwrap(),
        0
    );
    // A card canceled at Stripe behind the relay's back is marked canceled by the sweep too.
    ctx.http
        .0
        .post(format!("{}/v1/issuing/cards/{last}", ctx.emu_url))
        .bearer_auth(DIRECT_KEY)
        .form(&[("status", "canceled")])
        .send()
        .await
        .unwrap();
    exec(format!(
        "UPDATE relay_cards SET expires_at = {} WHERE intent_id = '{last_intent}'",
        now - 1
    ))
    .await;
    until(Duration::from_secs(15), "the canceled card swept", || {
        let db = ctx.db.clone();
        let intent = last_intent.clone();
        async move {
            let _ = roony::control::relay::sweep_expired(&db, common::dash::now()).await;
            db.relay_card(&intent)
                .await
                .unwrap()
                .is_some_and(|r| r.canceled_at.is_some())
        }
    })
    .await;

    // A sidecar's card expires with its intent (the policy's card lifetime).
    let sc = ctx.sidecar(&a).await;
    let (status, bought) = ctx.http.buy(&sc.url, &a.key, 1_000).await;
    assert_eq!(status, 201, "{bought}");
    let bought_intent = bought["id"].as_str().unwrap().to_string();
    let bought_card = bought["card"]["id"].as_str().unwrap().to_string();
    let row = ctx.db.relay_card(&bought_intent).await.unwrap().unwrap();
    assert!(
        row.expires_at > now && row.expires_at <= common::dash::now() + 600,
        "{row:?}"
    );
    // The relay's expiry bounds the card's authorizations, whatever the sidecar said about
    // the intent: past it, the real-time authorization declines.
    exec(format!(
        "UPDATE relay_cards SET expires_at = {} WHERE intent_id = '{bought_intent}'",
        now - 1
    ))
    .await;
    let auth = ctx.authorize(&bought_card, 1_000).await;
    assert_eq!(auth["approved"], false, "{auth}");
    let auth_id = auth["id"].as_str().unwrap().to_string();
    let mut reasons = None;
    for _ in 0..500 {
        use sqlx::Row;
        // Roony's decision (the ledger's row later holds Stripe's words for it).
        reasons = sqlx::query(
            "SELECT details FROM audit_events WHERE action = 'authorization.decide' AND target_id = $1",
        )
        .bind(auth_id.clone())
        .fetch_optional(ctx.db.pool())
        .await
        .unwrap()
        .map(|r| r.get::<String, _>("details"));
        if reasons.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        reasons
            .as_deref()
            .is_some_and(|r| r.contains("intent_expired")),
        "{reasons:?} {auth}"
    );
}
