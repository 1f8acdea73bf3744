#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]
//! The whole loop with real processes (issue 5): `roony stripe-emulator` sends signed events
//! and real-time authorization requests to `roony control-plane`, which decides them from
//! the ledger its `roony sidecar` keeps up to date, and sends the card activity back down.
//!
//! An agent buys → the merchant's authorization is approved in real time → captured → the
//! intent is settled and its budgets count what was captured, not what was reserved. A
//! wrong merchant, too much, a second use of a single-use card and a charge after the agent
//! canceled are declined, each with its reason, and visible to the agent.

mod common;

use std::process::Command;
use std::time::Duration;

use common::procs::*;
use serde_json::{Value, json};

const SECRET: &str = "whsec_settlement_test_0123456789";

struct Loop {
    _dir: tempfile::TempDir,
    http: Http,
    emulator: Proc,
    _cp: Proc,
    sidecar: Proc,
    key: String,
    cp_url: String,
    project: String,
}

async fn start(policy_doc: Value) -> Loop {
    let dir = tempfile::tempdir().unwrap();
    let http = Http(reqwest::Client::new());
    let db = roony::control::db::default_sqlite_url(&dir.path().join("cp-db"));
    std::fs::create_dir_all(dir.path().join("cp-db")).unwrap();
    let cp = control_plane_with(
        dir.path(),
        "cp",
        &db,
        "127.0.0.1:0",
        &["--stripe-webhook-secret", SECRET],
    );
    let emulator = emulator(
        dir.path(),
        &format!("{}/api/webhooks/stripe", cp.url),
        SECRET,
    );
    let p = project(&http, &cp.url, &["agt_loop"], 1_000_000).await;
    http.admin(
        &cp.url,
        reqwest::Method::PUT,
        "/agents/agt_loop/policy",
        policy_doc,
    )
    .await;
    let token = sidecar_token(&http, &cp.url, &p.id, "edge").await;
    let sidecar = sidecar(dir.path(), "sc", &emulator.url, &cp.url, &token);
    let key = p.keys[0].clone();
    wait_synced(&http, &sidecar.url, &key).await;
    Loop {
        _dir: dir,
        http,
        cp_url: cp.url.clone(),
        _cp: cp,
        emulator,
        sidecar,
        key,
        project: p.id,
    }
}

fn policy_doc() -> Value {
    json!({
        "currency": "USD",
        "max_per_transaction": 10_000,
        "budgets": [{"period": "daily", "limit": 50_000}],
        "card_buffer_bps": 100
    })
}

impl Loop {
    async fn buy(&self, amount: i64) -> Value {
        let (status, body) = self.http.buy(&self.sidecar.url, &self.key, amount).await;
        assert_eq!(status, 201, "{body}");
        body
    }

    /// The merchant's side: a test-helper authorization at the emulator (form-encoded, as
    /// Stripe's SDKs send it).
    async fn authorize(&self, card: &str, amount: i64, merchant: &str, network_id: &str) -> Value {
        let r = self
            .http
            .0
            .post(format!(
                "{}/v1/test_helpers/issuing/authorizations",
                self.emulator.url
            ))
            .bearer_auth("sk_test_settlement")
            .form(&[
                ("card", card),
                ("amount", &amount.to_string()),
                ("currency", "usd"),
                ("merchant_data[name]", merchant),
                ("merchant_data[country]", "US"),
                ("merchant_data[network_id]", network_id),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        r.json().await.unwrap()
    }

    async fn intent(&self, id: &str) -> Value {
        let (status, v) = self
            .http
            .agent_get(
                &self.sidecar.url,
                &self.key,
                &format!("/api/v1/purchase_intents/{id}"),
            )
            .await;
        assert_eq!(status, 200, "{v}");
        v
    }

    async fn daily(&self) -> Value {
        let (_, b) = self
            .http
            .agent_get(&self.sidecar.url, &self.key, "/api/v1/budget")
            .await;
        b["budgets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["scope"] == "agent" && x["period"] == "daily")
            .unwrap()
            .clone()
    }
}

fn reasons(auth: &Value) -> String {
    auth["metadata"]["roony_reasons"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn buy_charge_capture_settle() {
    let l = start(policy_doc()).await;
    let bought = l.buy(1_200).await;
    let id = bought["id"].as_str().unwrap().to_string();
    let card = bought["card"]["id"].as_str().unwrap().to_string();
    assert_eq!(bought["card"]["spending_limit"], 1_212);
    assert_eq!(
        l.daily().await["committed"],
        1_212,
        "reserved with the buffer"
    );

    // The merchant charges USD 12.00 and captures, through `roony simulate charge`.
    let out = Command::new(env!("CARGO_BIN_EXE_roony"))
        .args(["simulate", "charge", "--card", &card, "--amount", "1200"])
        .args(["--merchant", "NAMECHEAP.COM", "--merchant-country", "US"])
        .args(["--network-id", "net_namecheap", "--capture"])
        .args(["--stripe-base-url", &l.emulator.url])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "simulate charge: {stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("matches_intent") || stderr.contains("matches_intent"),
        "the summary shows the real-time decision's reasons: {stdout}{stderr}"
    );

    // The capture reaches the sidecar: settled, spent 1200, the buffer released.
    let took = until(
        Duration::from_secs(15),
        "settled at the sidecar",
        || async { l.intent(&id).await["status"] == "settled" },
    )
    .await;
    eprintln!("capture → settled at the sidecar in {took:?}");
    let v = l.intent(&id).await;
    let s = &v["settlement"];
    assert_eq!(
        (s["captured"].as_i64(), s["spent"].as_i64()),
        (Some(1_200), Some(1_200))
    );
    assert_eq!(s["closed"], true);
    let auths = s["authorizations"].as_array().unwrap();
    assert_eq!(auths.len(), 1, "{v}");
    assert_eq!(auths[0]["approved"], true);
    assert!(
        auths[0]["reasons"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r == "matches_intent"),
        "{v}"
    );
    let daily = l.daily().await;
    assert_eq!(daily["committed"], 1_200, "spent, not reserved: {daily}");

    // The control plane's ledger agrees.
    until(Duration::from_secs(10), "ledger settled", || async {
        let ledger = l.http.ledger(&l.cp_url, &l.project).await;
        ledger
            .get(&id)
            .is_some_and(|i| i["status"] == "settled" && i["captured"] == 1_200)
    })
    .await;

    // The single-use card is closed: a second charge is declined by the card itself.
    let again = l
        .authorize(&card, 100, "NAMECHEAP.COM", "net_namecheap")
        .await;
    assert_eq!(again["approved"], false, "{again}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wrong_merchant_too_much_second_use_and_canceled_are_declined() {
    let l = start(policy_doc()).await;
    let bought = l.buy(2_000).await;
    let id = bought["id"].as_str().unwrap().to_string();
    let card = bought["card"]["id"].as_str().unwrap().to_string();

    // A prompt-injected checkout at another merchant.
    let wrong = l.authorize(&card, 2_000, "GIFTCARDS4U", "net_gift").await;
    assert_eq!(wrong["approved"], false, "{wrong}");
    assert!(reasons(&wrong).contains("merchant_mismatch"), "{wrong}");

    // More than the card allows: Stripe's own spending controls stop it first.
    let much = l.authorize(&card, 9_000, "NAMECHEAP.COM", "net_nc").await;
    assert_eq!(much["approved"], false, "{much}");

    // The right merchant is approved and the card is locked to it.
    let ok = l.authorize(&card, 2_000, "NAMECHEAP.COM", "net_nc").await;
    assert_eq!(ok["approved"], true, "{ok}");
    assert!(reasons(&ok).contains("matches_intent"), "{ok}");
    // A second authorization on the single-use card is declined.
    let second = l.authorize(&card, 10, "NAMECHEAP.COM", "net_nc").await;
    assert_eq!(second["approved"], false, "{second}");
    assert!(reasons(&second).contains("card_already_used"), "{second}");

    // The agent sees every decision on its intent.
    until(
        Duration::from_secs(15),
        "authorizations at the sidecar",
        || async {
            l.intent(&id).await["settlement"]["authorizations"]
                .as_array()
                .is_some_and(|a| a.len() >= 3)
        },
    )
    .await;
    let v = l.intent(&id).await;
    let all: Vec<String> = v["settlement"]["authorizations"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|a| a["reasons"].as_array().unwrap().clone())
        .map(|r| r.as_str().unwrap().to_string())
        .collect();
    assert!(all.contains(&"merchant_mismatch".to_string()), "{v}");
    assert!(all.contains(&"matches_intent".to_string()), "{v}");
    assert_eq!(v["settlement"]["pending"], 2_000, "{v}");

    // A purchase the agent canceled: its card is canceled, a charge is declined.
    let other = l.buy(500).await;
    let other_card = other["card"]["id"].as_str().unwrap().to_string();
    let (status, canceled) = l
        .http
        .send(
            l.http
                .0
                .post(format!(
                    "{}/api/v1/purchase_intents/{}/cancel",
                    l.sidecar.url,
                    other["id"].as_str().unwrap()
                ))
                .bearer_auth(&l.key),
        )
        .await;
    assert_eq!(status, 200, "{canceled}");
    let late = l
        .authorize(&other_card, 500, "NAMECHEAP.COM", "net_nc")
        .await;
    assert_eq!(late["approved"], false, "{late}");
}
