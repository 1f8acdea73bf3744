#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]
//! Stripe Connect and the issuing relay, on SQLite and PostgreSQL: the OAuth flow against
//! the real emulator over HTTP (state bound to the session, single-use, expiring; denied;
//! refresh; disconnect; the deauthorized webhook), tokens sealed at rest, and a synced
//! sidecar issuing through the control plane's relay until the account is disconnected.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use roony::control::connect::{
    self, CallbackParams, ConnectConfig, ConnectError, StripeCredentials,
};
use roony::control::db::{Actor, ControlDb};
use roony::control::secrets::{SecretBox, SecretKey};
use roony::emulator::{Emulator, EmulatorConfig};
use serde_json::{Value, json};
use sqlx::Row;

use common::db::{Kind, TestDb, on_both};
use common::procs::{ADMIN, Http, codes, project, sidecar_token, until};

const WHSEC: &str = "whsec_connect_test_secret";
const CLIENT_ID: &str = "ca_roonytest";
const PLATFORM_KEY: &str = "sk_test_platform";

struct Ctx {
    db: ControlDb,
    cp: String,
    emu: Emulator,
    emu_url: String,
    org: String,
    http: reqwest::Client,
    _stops: Vec<tokio::sync::oneshot::Sender<()>>,
}

async fn run<F, Fut>(kind: Kind, scenario: F)
where
    F: FnOnce(Ctx) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let Some(tdb) = TestDb::new(kind, "stripe connect tests is SKIPPED").await else {
        return;
    };
    // The emulator (Stripe's API and Connect OAuth).
    let emu = Emulator::new(EmulatorConfig::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let emu_url = format!("http://{}", listener.local_addr().unwrap());
    let (emu_stop, emu_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(emu.clone().serve(listener, async move {
        let _ = emu_rx.await;
    }));
    // The control plane, Connect configured against the emulator.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cp = format!("http://{addr}");
    let mut config = roony::control::ControlConfig::sqlite_in(std::path::Path::new("/unused"));
    config.database_url = tdb.url.clone();
    config.listen = addr;
    config.bootstrap_admin_token = Some(ADMIN.into());
    config.stripe_webhook_secrets = vec![WHSEC.into()];
    config.stripe_base_url = Some(emu_url.clone());
    config.secrets = Some(SecretBox::new(SecretKey::generate("k1").unwrap(), vec![]));
    let mut connect_config =
        ConnectConfig::new(CLIENT_ID, PLATFORM_KEY, format!("{cp}/stripe/callback"));
    connect_config.connect_base_url = emu_url.clone();
    config.stripe_credentials = StripeCredentials::Connect(connect_config);
    // Reconciliation is configured with the platform key; under Connect it must use the
    // connected account's credential.
    config.stripe = Some(roony::issuer::StripeConfig::new(
        PLATFORM_KEY,
        Some(emu_url.clone()),
    ));
    let db = roony::control::open(&config).await.unwrap();
    let (cp_stop, cp_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(roony::control::serve_db(db.clone(), listener, async move {
        let _ = cp_rx.await;
    }));
    emu.set_webhook(Some(roony::emulator::webhooks::WebhookConfig::new(
        format!("{cp}/api/webhooks/stripe"),
        vec![WHSEC.into()],
    )));
    let org = db.default_org().await.unwrap().unwrap().id;
    let ctx = Ctx {
        db: db.clone(),
        cp,
        emu,
        emu_url,
        org,
        http: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap(),
        _stops: vec![emu_stop],
    };
    scenario(ctx).await;
    let _ = cp_stop.send(());
    let _ = server.await;
    tdb.drop_schema().await;
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn admin() -> Actor {
    Actor {
        kind: "admin_user",
        id: "usr_test".into(),
        name: "tester".into(),
        request_id: None,
    }
}

fn query_of(url: &str) -> HashMap<String, String> {
    let q = url.split_once('?').map(|(_, q)| q).unwrap_or_default();
    q.split('&')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| {
            (
                k.to_string(),
                percent_encoding::percent_decode_str(v)
                    .decode_utf8()
                    .unwrap()
                    .into_owned(),
            )
        })
        .collect()
}

impl Ctx {
    /// Follows the authorize URL like a browser: the consent page, then the Approve or
    /// Deny form; returns the callback's parameters (from the redirect's Location).
    async fn authorize(&self, url: &str, decision: &str) -> CallbackParams {
        assert!(
            url.starts_with(&format!("{}/oauth/authorize?", self.emu_url)),
            "{url}"
        );
        let page = self.http.get(url).send().await.unwrap();
        assert_eq!(page.status(), 200);
        let html = page.text().await.unwrap();
        assert!(html.contains("Roony Stripe emulator: connect"), "{html}");
        assert!(html.contains("Approve") && html.contains("Deny"));
        let mut form = query_of(url);
        form.insert("decision".into(), decision.into());
        let resp = self
            .http
            .post(format!("{}/oauth/authorize", self.emu_url))
            .form(&form)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 302);
        let location = resp.headers()["location"].to_str().unwrap().to_string();
        assert!(
            location.starts_with(&format!("{}/stripe/callback?", self.cp)),
            "{location}"
        );
        let q = query_of(&location);
        CallbackParams {
            code: q.get("code").cloned(),
            state: q.get("state").cloned(),
            error: q.get("error").cloned(),
            error_description: q.get("error_description").cloned(),
        }
    }

    async fn connect(&self, session: &str) -> connect::ConnectionStatus {
        let url = connect::begin(&self.db, &self.org, session, now())
            .await
            .unwrap();
        let params = self.authorize(&url, "approve").await;
        connect::complete(&self.db, &self.org, session, params, &admin(), now())
            .await
            .unwrap()
    }

    async fn stripe_get(&self, key: &str, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}/v1/{path}", self.emu_url))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    async fn raw_tokens(&self) -> (String, String) {
        let row = sqlx::query(
            "SELECT access_token, refresh_token FROM stripe_connections WHERE org_id = $1",
        )
        .bind(self.org.clone())
        .fetch_one(self.db.pool())
        .await
        .unwrap();
        (
            row.try_get::<Option<String>, _>("access_token")
                .unwrap()
                .unwrap_or_default(),
            row.try_get::<Option<String>, _>("refresh_token")
                .unwrap()
                .unwrap_or_default(),
        )
    }

    async fn actions(&self) -> Vec<String> {
        self.db
            .list_audit_events(Some(("organization", &self.org)), 100)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.action)
            .collect()
    }

    async fn wait_status(&self, status: &str) -> connect::ConnectionStatus {
        until(
            Duration::from_secs(15),
            &format!("connection {status}"),
            || async { connect::status(&self.db, &self.org).await.unwrap().status == status },
        )
        .await;
        connect::status(&self.db, &self.org).await.unwrap()
    }
}

on_both!(
    full_flow,
    state_is_bound_single_use_and_expiring,
    denied,
    deauthorized_webhook,
    relay_end_to_end,
    late_or_foreign_deauthorizations,
    disconnect_when_stripe_refuses,
    grants_must_be_read_write,
    refused_credential_disconnects,
);

impl Ctx {
    /// Delivers a signed event straight to the control plane (as Stripe would).
    async fn deliver(&self, event: &Value) -> (u16, Value) {
        let body = event.to_string();
        let t = now();
        let sig = hex_lower(&roony::sync::wire::hmac_sha256(
            WHSEC.as_bytes(),
            format!("{t}.{body}").as_bytes(),
        ));
        let r = self
            .http
            .post(format!("{}/api/webhooks/stripe", self.cp))
            .header("stripe-signature", format!("t={t},v1={sig}"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// The owner revokes the platform's access at Stripe, with no event delivered.
    async fn revoke_quietly(&self, account: &str) {
        self.emu.set_webhook(None);
        let r = self
            .http
            .post(format!("{}/oauth/deauthorize", self.emu_url))
            .bearer_auth(PLATFORM_KEY)
            .form(&[("client_id", CLIENT_ID), ("stripe_user_id", account)])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }

    async fn audit(&self, action: &str) -> Vec<roony::control::model::AuditEvent> {
        self.db
            .list_audit_events(Some(("organization", &self.org)), 200)
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.action == action)
            .collect()
    }
}

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn deauthorized(account: &str, created: i64, object: Value) -> Value {
    json!({
        "id": format!("evt_{}", common::unique()),
        "object": "event",
        "type": "account.application.deauthorized",
        "account": account,
        "created": created,
        "livemode": false,
        "data": {"object": object}
    })
}

/// A late `account.application.deauthorized` (about a connection older than the current
/// one) and events about another application leave the connection alone.
async fn late_or_foreign_deauthorizations(ctx: Ctx) {
    let status = ctx.connect("session-a").await;
    let account = status.account_id.clone().unwrap();
    let connected_at = status.connected_at.unwrap();
    let app = json!({"id": CLIENT_ID, "object": "application", "name": "Roony"});
    for (what, event) in [
        (
            "an event from before the connection",
            deauthorized(&account, connected_at - 60, app.clone()),
        ),
        (
            "another application",
            deauthorized(
                &account,
                connected_at + 1,
                json!({"id": "ca_someoneelse", "object": "application"}),
            ),
        ),
        (
            "not an application",
            deauthorized(
                &account,
                connected_at + 1,
                json!({"id": CLIENT_ID, "object": "account"}),
            ),
        ),
    ] {
        let (code, body) = ctx.deliver(&event).await;
        assert_eq!(code, 200, "{what}: {body}");
        assert_eq!(
            connect::status(&ctx.db, &ctx.org).await.unwrap().status,
            "connected",
            "{what}"
        );
    }
    // The real one applies.
    let (code, body) = ctx
        .deliver(&deauthorized(&account, connected_at + 1, app))
        .await;
    assert_eq!(code, 200, "{body}");
    let gone = connect::status(&ctx.db, &ctx.org).await.unwrap();
    assert_eq!(
        (gone.status.as_str(), gone.disconnect_reason.as_deref()),
        ("disconnected", Some("deauthorized"))
    );
}

/// Stripe says the platform is not connected (the owner revoked access and the event was
/// lost): the disconnect happens locally all the same, and says what Stripe said.
async fn disconnect_when_stripe_refuses(ctx: Ctx) {
    let status = ctx.connect("session-a").await;
    let account = status.account_id.clone().unwrap();
    ctx.revoke_quietly(&account).await;
    assert!(
        connect::status(&ctx.db, &ctx.org)
            .await
            .unwrap()
            .is_connected()
    );
    let out = connect::disconnect(&ctx.db, &ctx.org, &admin(), now())
        .await
        .unwrap();
    assert_eq!(out.status.status, "disconnected");
    let said = out.stripe_error.clone().unwrap();
    assert!(said.starts_with("invalid_client"), "{said}");
    let notes = ctx.audit("stripe.deauthorize").await;
    assert_eq!(notes.len(), 1);
    assert_eq!(notes[0].outcome, "failure");
    assert!(
        notes[0].details["stripe_said"]
            .as_str()
            .unwrap()
            .contains("invalid_client"),
        "{:?}",
        notes[0].details
    );
    // Stripe cannot be reached at all: still disconnected locally (issuing stops).
    ctx.connect("session-a").await;
    let mut broken = ctx.db.stripe_setup().clone();
    if let StripeCredentials::Connect(c) = &mut broken.credentials {
        c.connect_base_url = "http://127.0.0.1:9".into();
    }
    let db = ctx.db.clone().with_stripe_credentials(broken);
    let out = connect::disconnect(&db, &ctx.org, &admin(), now())
        .await
        .unwrap();
    assert_eq!(out.status.status, "disconnected");
    assert!(out.stripe_error.is_some());
    assert!(matches!(
        connect::issuing_credential(&ctx.db, &ctx.org).await,
        Err(ConnectError::Disconnected)
    ));
}

/// A grant Roony cannot use (read-only) is refused and given back to Stripe.
async fn grants_must_be_read_write(ctx: Ctx) {
    let url = connect::begin(&ctx.db, &ctx.org, "session-a", now())
        .await
        .unwrap();
    assert!(url.contains("scope=read%5Fwrite"), "{url}");
    let url = url.replace("scope=read%5Fwrite", "scope=read_only");
    let params = ctx.authorize(&url, "approve").await;
    let e = connect::complete(&ctx.db, &ctx.org, "session-a", params, &admin(), now())
        .await
        .unwrap_err();
    assert_eq!((e.code(), e.http_status()), ("oauth_grant_refused", 400));
    assert!(e.to_string().contains("read_write"), "{e}");
    assert_eq!(
        connect::status(&ctx.db, &ctx.org).await.unwrap().status,
        "not_connected"
    );
    // The refused grant was deauthorized at Stripe (its event is about an account this
    // control plane never stored).
    until(
        Duration::from_secs(10),
        "the refused grant deauthorized",
        || async {
            ctx.emu
                .events()
                .iter()
                .any(|e| e.kind == "account.application.deauthorized")
        },
    )
    .await;
}

/// Stripe refuses the relay's credential (401): the connection is marked disconnected,
/// audited, so the bundle and the dashboard say so.
async fn refused_credential_disconnects(ctx: Ctx) {
    let http = Http(reqwest::Client::new());
    let agent = format!("agt_rf{}", common::unique().to_lowercase());
    let p = project(&http, &ctx.cp, &[agent.as_str()], 1_000_000).await;
    let token = sidecar_token(&http, &ctx.cp, &p.id, "relay-sidecar").await;
    let status = ctx.connect("session-a").await;
    ctx.revoke_quietly(status.account_id.as_deref().unwrap())
        .await;
    let r = ctx
        .http
        .post(format!(
            "{}/api/sync/v1/stripe/v1/issuing/cardholders",
            ctx.cp
        ))
        .bearer_auth(&token)
        .header("idempotency-key", "k-1")
        .form(&[
            ("name", "agent"),
            ("billing[address][line1]", "1 Main St"),
            ("billing[address][city]", "Springfield"),
            ("billing[address][postal_code]", "12345"),
            ("billing[address][country]", "US"),
            ("metadata[roony_agent_id]", agent.as_str()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "stripe_account_disconnected", "{v}");
    let gone = connect::status(&ctx.db, &ctx.org).await.unwrap();
    assert_eq!(
        (gone.status.as_str(), gone.disconnect_reason.as_deref()),
        ("disconnected", Some("credential_refused"))
    );
    let audited = ctx.audit("stripe.disconnect").await;
    assert_eq!(audited.len(), 1);
    assert_eq!(audited[0].details["reason"], "credential_refused");
    assert_eq!(
        roony::control::connect::bundle_status(&ctx.db, &ctx.org)
            .await
            .unwrap()
            .as_deref(),
        Some("disconnected")
    );
}

async fn full_flow(ctx: Ctx) {
    let before = connect::status(&ctx.db, &ctx.org).await.unwrap();
    assert_eq!(before.status, "not_connected");
    assert_eq!(before.mode, "connect");

    let status = ctx.connect("session-a").await;
    assert_eq!(status.status, "connected");
    assert!(status.account_id.as_deref().unwrap().starts_with("acct_"));
    assert_eq!(status.scope.as_deref(), Some("read_write"));
    assert_eq!(status.key_id.as_deref(), Some("k1"));
    assert!(status.connected_at.is_some());
    assert!(!status.livemode);

    // Sealed at rest: the raw columns hold no token.
    let credential = connect::issuing_credential(&ctx.db, &ctx.org)
        .await
        .unwrap();
    assert!(credential.api_key.starts_with("sk_test_"));
    assert!(!format!("{credential:?}").contains(&credential.api_key));
    let (access, refresh) = ctx.raw_tokens().await;
    assert!(access.starts_with("v1:k1:"), "{access}");
    assert!(refresh.starts_with("v1:k1:"), "{refresh}");
    assert!(!access.contains(&credential.api_key));
    assert!(!access.contains("sk_test_") && !refresh.contains("rt_"));

    // The access token acts on the connected account.
    let (code, _) = ctx
        .stripe_get(&credential.api_key, "issuing/cards?limit=1")
        .await;
    assert_eq!(code, 200);

    // Refresh: new access token, stored sealed.
    let refreshed = connect::refresh(&ctx.db, &ctx.org, &admin(), now())
        .await
        .unwrap();
    assert!(refreshed.refreshed_at.is_some());
    assert_eq!(refreshed.account_id, status.account_id);
    let after = connect::issuing_credential(&ctx.db, &ctx.org)
        .await
        .unwrap();
    assert_ne!(after.api_key, credential.api_key);
    assert_ne!(ctx.raw_tokens().await.0, access);

    // Disconnect: deauthorized at the emulator, which then sends the event (a no-op now).
    let gone = connect::disconnect(&ctx.db, &ctx.org, &admin(), now())
        .await
        .unwrap()
        .status;
    assert_eq!(gone.status, "disconnected");
    // The emulator's event may overtake the admin's write (then it is `deauthorized`).
    let reason = gone.disconnect_reason.clone().unwrap();
    assert!(
        reason == "disconnected" || reason == "deauthorized",
        "{reason}"
    );
    assert_eq!(ctx.raw_tokens().await, (String::new(), String::new()));
    let (code, body) = ctx
        .stripe_get(&after.api_key, "issuing/cards?limit=1")
        .await;
    assert_eq!(code, 401, "{body}");
    until(
        Duration::from_secs(10),
        "deauthorized event delivered",
        || async {
            ctx.emu
                .events()
                .iter()
                .any(|e| e.kind == "account.application.deauthorized" && e.last_response.is_some())
        },
    )
    .await;
    let event = ctx
        .emu
        .events()
        .into_iter()
        .find(|e| e.kind == "account.application.deauthorized")
        .unwrap();
    let body: Value = serde_json::from_slice(&event.body).unwrap();
    assert_eq!(body["account"], json!(status.account_id));
    assert_eq!(body["data"]["object"]["object"], "application");
    assert_eq!(body["data"]["object"]["id"], CLIENT_ID);
    // Disconnected once (whichever came first), and it stays so.
    assert_eq!(
        connect::status(&ctx.db, &ctx.org)
            .await
            .unwrap()
            .disconnect_reason,
        Some(reason)
    );
    assert!(matches!(
        connect::refresh(&ctx.db, &ctx.org, &admin(), now()).await,
        Err(ConnectError::Disconnected)
    ));
    let actions = ctx.actions().await;
    for a in ["stripe.connect", "stripe.refresh", "stripe.disconnect"] {
        assert!(actions.iter().any(|x| x == a), "{a} in {actions:?}");
    }
    // Reconnecting works again.
    assert_eq!(ctx.connect("session-a").await.status, "connected");
}

async fn state_is_bound_single_use_and_expiring(ctx: Ctx) {
    // Another session's callback is refused (and does not use the state up).
    let url = connect::begin(&ctx.db, &ctx.org, "session-a", now())
        .await
        .unwrap();
    let params = ctx.authorize(&url, "approve").await;
    let e = connect::complete(
        &ctx.db,
        &ctx.org,
        "session-b",
        params.clone(),
        &admin(),
        now(),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), "invalid_oauth_state");
    // A made-up state is refused.
    let mut forged = params.clone();
    forged.state = Some("00".repeat(32));
    let e = connect::complete(&ctx.db, &ctx.org, "session-a", forged, &admin(), now())
        .await
        .unwrap_err();
    assert_eq!(e.code(), "invalid_oauth_state");
    // The right session completes once.
    connect::complete(
        &ctx.db,
        &ctx.org,
        "session-a",
        params.clone(),
        &admin(),
        now(),
    )
    .await
    .unwrap();
    // Reuse is refused.
    let e = connect::complete(&ctx.db, &ctx.org, "session-a", params, &admin(), now())
        .await
        .unwrap_err();
    assert_eq!(e.code(), "invalid_oauth_state");
    // While connected, no other connection can be started or completed.
    let e = connect::begin(&ctx.db, &ctx.org, "session-a", now())
        .await
        .unwrap_err();
    assert_eq!((e.code(), e.http_status()), ("already_connected", 409));
    connect::disconnect(&ctx.db, &ctx.org, &admin(), now())
        .await
        .unwrap();
    // An expired state is refused.
    let t0 = now();
    let url = connect::begin(&ctx.db, &ctx.org, "session-a", t0)
        .await
        .unwrap();
    let params = ctx.authorize(&url, "approve").await;
    let e = connect::complete(
        &ctx.db,
        &ctx.org,
        "session-a",
        params,
        &admin(),
        t0 + connect::STATE_TTL_SECONDS + 1,
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), "invalid_oauth_state");
    // A code cannot be exchanged twice (the emulator says invalid_grant).
    let url = connect::begin(&ctx.db, &ctx.org, "s", now()).await.unwrap();
    let params = ctx.authorize(&url, "approve").await;
    connect::complete(&ctx.db, &ctx.org, "s", params.clone(), &admin(), now())
        .await
        .unwrap();
    // A flow begun before the organization got connected cannot complete now.
    let url = connect::begin(&ctx.db, &ctx.org, "s", now()).await;
    assert_eq!(url.unwrap_err().code(), "already_connected");
    connect::disconnect(&ctx.db, &ctx.org, &admin(), now())
        .await
        .unwrap();
    let url = connect::begin(&ctx.db, &ctx.org, "s", now()).await.unwrap();
    let late = ctx.authorize(&url, "approve").await;
    let url = connect::begin(&ctx.db, &ctx.org, "s", now()).await.unwrap();
    let mut replay = ctx.authorize(&url, "approve").await;
    replay.code = params.code;
    match connect::complete(&ctx.db, &ctx.org, "s", replay, &admin(), now()).await {
        Err(ConnectError::Exchange { error, .. }) => assert_eq!(error, "invalid_grant"),
        other => panic!("expected invalid_grant, got {other:?}"),
    }
    connect::complete(&ctx.db, &ctx.org, "s", late.clone(), &admin(), now())
        .await
        .unwrap();
    let url = connect::begin(&ctx.db, &ctx.org, "s", now()).await;
    assert!(url.is_err());
    // No state, no session.
    let e = connect::complete(
        &ctx.db,
        &ctx.org,
        "",
        CallbackParams::default(),
        &admin(),
        now(),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), "invalid_oauth_state");
}

async fn denied(ctx: Ctx) {
    let url = connect::begin(&ctx.db, &ctx.org, "session-a", now())
        .await
        .unwrap();
    let params = ctx.authorize(&url, "deny").await;
    assert_eq!(params.error.as_deref(), Some("access_denied"));
    assert!(params.code.is_none());
    let e = connect::complete(&ctx.db, &ctx.org, "session-a", params, &admin(), now())
        .await
        .unwrap_err();
    assert_eq!(e.code(), "oauth_denied");
    assert_eq!(
        connect::status(&ctx.db, &ctx.org).await.unwrap().status,
        "not_connected"
    );
    assert!(matches!(
        connect::disconnect(&ctx.db, &ctx.org, &admin(), now()).await,
        Err(ConnectError::NotConnected)
    ));
    // The emulator's shortcut for tests: `auto=deny|approve` skips the page.
    let url = connect::begin(&ctx.db, &ctx.org, "session-a", now())
        .await
        .unwrap();
    let r = ctx
        .http
        .get(format!("{url}&auto=approve"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302);
    let q = query_of(r.headers()["location"].to_str().unwrap());
    assert!(q["code"].starts_with("ac_"));
    // Bad authorize parameters are OAuth errors.
    let r = ctx
        .http
        .get(format!(
            "{}/oauth/authorize?response_type=token&client_id={CLIENT_ID}",
            ctx.emu_url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"],
        "unsupported_response_type"
    );
}

/// Connect mode refuses to start without a secrets key (tokens would be unsealed).
#[test]
fn connect_needs_a_secrets_key() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_roony"))
        .args(["control-plane", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .args(["--stripe-connect-client-id", CLIENT_ID])
        .args(["--stripe-api-key", PLATFORM_KEY])
        .env_remove("ROONY_SECRETS_KEY")
        .env_remove("ROONY_SECRETS_KEY_FILE")
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("secrets key"), "{stderr}");
    // A sidecar with neither a key nor a control plane cannot issue.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_roony"))
        .args(["sidecar", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("sidecar"))
        .env_remove("ROONY_STRIPE_API_KEY")
        .env_remove("ROONY_CONTROL_PLANE_URL")
        .env_remove("ROONY_SIDECAR_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--stripe-api-key"), "{stderr}");
}

async fn deauthorized_webhook(ctx: Ctx) {
    let status = ctx.connect("session-a").await;
    let account = status.account_id.clone().unwrap();
    // The account owner revokes access at Stripe: only the event tells the control plane.
    let r = ctx
        .http
        .post(format!("{}/oauth/deauthorize", ctx.emu_url))
        .bearer_auth(PLATFORM_KEY)
        .form(&[("client_id", CLIENT_ID), ("stripe_user_id", &account)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap()["stripe_user_id"],
        json!(account)
    );
    let gone = ctx.wait_status("disconnected").await;
    assert_eq!(gone.disconnect_reason.as_deref(), Some("deauthorized"));
    assert!(ctx.actions().await.iter().any(|a| a == "stripe.disconnect"));
    // Redelivery of the same event changes nothing (deduplicated by event id).
    let event = ctx
        .emu
        .events()
        .into_iter()
        .find(|e| e.kind == "account.application.deauthorized")
        .unwrap();
    let r = ctx
        .http
        .post(format!(
            "{}/_emulator/events/{}/resend",
            ctx.emu_url, event.id
        ))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    // Deauthorizing again: Stripe says invalid_client; disconnect is then not possible.
    let r = ctx
        .http
        .post(format!("{}/oauth/deauthorize", ctx.emu_url))
        .bearer_auth(PLATFORM_KEY)
        .form(&[("client_id", CLIENT_ID), ("stripe_user_id", &account)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "invalid_client");
    assert!(matches!(
        connect::issuing_credential(&ctx.db, &ctx.org).await,
        Err(ConnectError::Disconnected)
    ));
}

async fn relay_end_to_end(ctx: Ctx) {
    let http = Http(reqwest::Client::new());
    let agent = format!("agt_rel{}", common::unique().to_lowercase());
    let p = project(&http, &ctx.cp, &[agent.as_str()], 1_000_000).await;
    let token = sidecar_token(&http, &ctx.cp, &p.id, "relay-sidecar").await;
    ctx.connect("session-a").await;

    // A sidecar with no Stripe key: it issues through the relay with its token.
    let dir = tempfile::tempdir().unwrap();
    let config = roony::sidecar::SidecarConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().join("sidecar"),
        stripe: roony::issuer::StripeConfig::relay(&ctx.cp, token.clone()),
        billing: Default::default(),
        mcp: roony::mcp::http::McpHttpConfig::default(),
        rate_limits: roony::ratelimit::RateLimitConfig::disabled(),
    };
    let store = roony::sidecar::open_store(&config.data_dir).unwrap();
    let service = roony::sidecar::build_service(store, &config).unwrap();
    let _sync = roony::sidecar::start_sync(
        &service,
        roony::sync::client::SyncConfig {
            control_plane_url: ctx.cp.clone(),
            sidecar_token: token.clone(),
        },
        Duration::from_secs(3600),
    )
    .unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
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
    let sidecar = format!("http://{}", running.addr);
    let key = &p.keys[0];
    common::procs::wait_synced(&http, &sidecar, key).await;

    // Connected: a card, made on the connected account.
    let (status, body) = http.buy(&sidecar, key, 1_200).await;
    assert_eq!(status, 201, "{body}");
    assert!(
        body["card"]["number"]
            .as_str()
            .is_some_and(|n| n.len() >= 15),
        "{body}"
    );
    let account = connect::status(&ctx.db, &ctx.org)
        .await
        .unwrap()
        .account_id
        .unwrap();
    let stats: Value = reqwest::get(format!("{}/_emulator/stats", ctx.emu_url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["accounts"][&account]["issuing.card"], 1, "{stats}");

    // Reconciliation looks at the connected account: the card is found there (once the
    // sidecar's outbox has put it in the ledger).
    let card_id = body["card"]["id"].as_str().unwrap();
    let db = ctx.db.clone();
    common::procs::until(Duration::from_secs(10), "the card in the ledger", || {
        let db = db.clone();
        let card_id = card_id.to_string();
        async move {
            db.reconcile_card_view(&card_id, None)
                .await
                .unwrap()
                .card_status
                .is_some()
        }
    })
    .await;
    let run = roony::control::reconcile::run_now(&ctx.db, None, &admin())
        .await
        .unwrap();
    assert_eq!(run.status, "ok", "{:?}", run.report.error);
    let card_entries: Vec<_> = run
        .report
        .entries
        .iter()
        .filter(|e| serde_json::to_string(e).unwrap().contains(card_id))
        .collect();
    assert!(card_entries.is_empty(), "{card_entries:?}");

    // The relay checks card creations and refuses anything else.
    let relay = |path: &str| format!("{}/api/sync/v1/stripe/v1/{path}", ctx.cp);
    let expires = common::dash::now() + 600;
    let card_form = |amount: i64| {
        vec![
            ("currency".to_string(), "usd".to_string()),
            ("type".into(), "virtual".into()),
            ("cardholder".into(), "ich_x".into()),
            ("status".into(), "active".into()),
            (
                "lifecycle_controls[cancel_after][payment_count]".into(),
                "1".into(),
            ),
            ("metadata[roony_agent_id]".into(), agent.clone()),
            ("metadata[roony_intent_id]".into(), "pur_forged".into()),
            ("metadata[roony_expires]".into(), expires.to_string()),
            (
                "spending_controls[spending_limits][0][amount]".into(),
                amount.to_string(),
            ),
            (
                "spending_controls[spending_limits][0][interval]".into(),
                "all_time".into(),
            ),
        ]
    };
    let r = ctx
        .http
        .post(relay("issuing/cards"))
        .bearer_auth(&token)
        .form(&card_form(10_001))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "relay_forbidden", "{v}");
    let r = ctx
        .http
        .post(relay("issuing/cards"))
        .form(&card_form(100))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = ctx
        .http
        .post(relay("issuing/cards"))
        .bearer_auth("roony_st_not_a_real_token_0123456789")
        .form(&card_form(100))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = ctx
        .http
        .get(relay("issuing/cards?limit=100"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = ctx
        .http
        .post(relay("accounts"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // Every limit counts: a tiny limit on one category next to a huge one is refused, as
    // are per-category limits, another currency, unparsable amounts and query strings
    // (Stripe would merge them into the checked body).
    let mut two_limits = card_form(100);
    two_limits.push((
        "spending_controls[spending_limits][1][amount]".into(),
        "100000000".into(),
    ));
    two_limits.push((
        "spending_controls[spending_limits][1][interval]".into(),
        "per_authorization".into(),
    ));
    let mut per_category = card_form(100);
    per_category.push((
        "spending_controls[spending_limits][0][categories][0]".into(),
        "ambulance_services".into(),
    ));
    let mut other_currency = card_form(100);
    other_currency.retain(|(k, _)| k != "currency");
    other_currency.push(("currency".into(), "eur".into()));
    let mut unparsable = card_form(100);
    unparsable.retain(|(k, _)| !k.ends_with("[0][amount]"));
    unparsable.push((
        "spending_controls[spending_limits][0][amount]".into(),
        "12.5".into(),
    ));
    for (what, form, status) in [
        ("two limits", &two_limits, 403),
        ("per-category limit", &per_category, 403),
        ("other currency", &other_currency, 403),
        ("unparsable amount", &unparsable, 400),
    ] {
        let r = ctx
            .http
            .post(relay("issuing/cards"))
            .bearer_auth(&token)
            .form(form)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "{what}");
    }
    let r = ctx
        .http
        .post(relay(
            "issuing/cards?spending_controls[spending_limits][0][amount]=99999999",
        ))
        .bearer_auth(&token)
        .form(&card_form(100))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "a query string on a POST");
    let r = ctx
        .http
        .post(relay(&format!("issuing/cards/{card_id}?status=active")))
        .bearer_auth(&token)
        .form(&[("status", "canceled")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "a query string on a cancel");

    let mut no_meta = card_form(100);
    no_meta.retain(|(k, _)| !k.starts_with("metadata"));
    let r = ctx
        .http
        .post(relay("issuing/cards"))
        .bearer_auth(&token)
        .form(&no_meta)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // Disconnected: first the organization's live cards are canceled (audited), then the
    // relay answers stripe_account_disconnected, and once the bundle says so the sidecar
    // declines up front.
    let credential = connect::issuing_credential(&ctx.db, &ctx.org)
        .await
        .unwrap();
    let out = connect::disconnect(&ctx.db, &ctx.org, &admin(), now())
        .await
        .unwrap();
    assert_eq!(out.canceled_cards, vec![card_id.to_string()], "{out:?}");
    assert!(
        out.cancel_failures.is_empty() && out.stripe_error.is_none(),
        "{out:?}"
    );
    // The token is revoked now: the platform reads the connected account's card.
    let (code, _) = ctx
        .stripe_get(&credential.api_key, &format!("issuing/cards/{card_id}"))
        .await;
    assert_eq!(code, 401);
    let card: Value = ctx
        .http
        .get(format!("{}/v1/issuing/cards/{card_id}", ctx.emu_url))
        .bearer_auth(PLATFORM_KEY)
        .header("stripe-account", &account)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(card["status"], "canceled", "{card}");
    let cards_audit = ctx.audit("stripe.disconnect.cards").await;
    assert_eq!(cards_audit.len(), 1);
    assert_eq!(cards_audit[0].details["canceled"], json!([card_id]));
    let intent_id = body["id"].as_str().unwrap();
    assert!(
        ctx.db
            .relay_card(intent_id)
            .await
            .unwrap()
            .unwrap()
            .canceled_at
            .is_some()
    );
    let r = ctx
        .http
        .post(relay("issuing/cards"))
        .bearer_auth(&token)
        .form(&card_form(100))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "stripe_account_disconnected", "{v}");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    until(Duration::from_secs(20), "declined as disconnected", || {
        let http = http.clone();
        let sidecar = sidecar.clone();
        let key = key.clone();
        async move {
            let (status, body) = http.buy(&sidecar, &key, 1_300).await;
            // Before the bundle arrives, the relay's refusal fails the card creation
            // (reason stripe_account_disconnected, nothing reserved, not retried).
            assert!(
                codes(&body)
                    .iter()
                    .any(|c| c == "stripe_account_disconnected"),
                "{body}"
            );
            status == 402
        }
    })
    .await;
    // Declined up front: 402, nothing reserved.
    let (status, body) = http.buy(&sidecar, key, 1_400).await;
    assert_eq!(status, 402, "{body}");
    assert_eq!(codes(&body), ["stripe_account_disconnected"], "{body}");

    let _ = stop_tx.send(());
    running.background.abort();
}
