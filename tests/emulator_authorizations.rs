#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]
//! Authorizations, transactions, test helpers and webhooks of the Stripe emulator,
//! driven by the real async-stripe client; a local axum server plays the webhook
//! endpoint and checks every `Stripe-Signature`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use roony::emulator::webhooks::WebhookConfig;
use roony::emulator::{Emulator, EmulatorConfig};
use roony::simulate::{self, ChargeArgs};
use serde_json::{Value, json};
use stripe::Client;
use stripe_issuing::issuing_authorization::{
    CaptureIssuingAuthorization, CreateIssuingAuthorization,
    CreateIssuingAuthorizationMerchantData, CreateIssuingAuthorizationMerchantDataCategory,
    ExpireIssuingAuthorization, IncrementIssuingAuthorization, ListIssuingAuthorization,
    RetrieveIssuingAuthorization, ReverseIssuingAuthorization,
};
use stripe_issuing::issuing_card::{
    CreateIssuingCard, CreateIssuingCardSpendingControls, CreateIssuingCardStatus,
    UpdateIssuingCard,
};
use stripe_issuing::issuing_cardholder::{BillingSpecs, CreateIssuingCardholder, RequiredAddress};
use stripe_issuing::issuing_transaction::{
    CreateForceCaptureIssuingTransaction, CreateUnlinkedRefundIssuingTransaction,
    ListIssuingTransaction, RefundIssuingTransaction, RetrieveIssuingTransaction,
};
use stripe_shared::{
    IssuingAuthorization, IssuingAuthorizationRequestReason, IssuingAuthorizationStatus,
    IssuingCardStatus, IssuingCardType, IssuingTransactionType,
};
use stripe_types::Currency;
use tokio::sync::oneshot;

const SECRET_OLD: &str = "whsec_old_secret_1";
const SECRET_NEW: &str = "whsec_new_secret_2";

/// How the test endpoint answers real-time requests.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Approve,
    Decline,
    Slow,
    BadJson,
    NoVersion,
    PartialAmount(i64),
}

#[derive(Default)]
struct Hook {
    events: Vec<Value>,
    bad_signatures: usize,
    mode: Option<Mode>,
    fail_next: usize,
}

type Shared = Arc<Mutex<Hook>>;

fn verify(headers: &HeaderMap, body: &[u8], secret: &str) -> bool {
    let Some(sig) = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let mut t = None;
    let mut v1 = Vec::new();
    for part in sig.split(',') {
        match part.split_once('=') {
            Some(("t", x)) => t = Some(x.to_owned()),
            Some(("v1", x)) => v1.push(x.to_owned()),
            _ => {}
        }
    }
    let Some(t) = t else { return false };
    let ts: i64 = t.parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    if (now - ts).abs() > 300 {
        return false;
    }
    let mut payload = format!("{t}.").into_bytes();
    payload.extend_from_slice(body);
    let expect = hex_hmac(secret.as_bytes(), &payload);
    v1.contains(&expect)
}

fn hex_hmac(key: &[u8], msg: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let ipad: Vec<u8> = k.iter().map(|b| b ^ 0x36).collect();
    let opad: Vec<u8> = k.iter().map(|b| b ^ 0x5c).collect();
    let inner = Sha256::new()
        .chain_update(&ipad)
        .chain_update(msg)
        .finalize();
    let outer = Sha256::new()
        .chain_update(&opad)
        .chain_update(inner)
        .finalize();
    outer.iter().map(|b| format!("{b:02x}")).collect()
}

async fn hook(
    axum::extract::State(shared): axum::extract::State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let signed = verify(&headers, &body, SECRET_OLD) && verify(&headers, &body, SECRET_NEW);
    let event: Value = serde_json::from_slice(&body).unwrap();
    let mode = {
        let mut h = shared.lock().unwrap();
        if !signed {
            h.bad_signatures += 1;
            return StatusCode::BAD_REQUEST.into_response();
        }
        if event["type"] != "issuing_authorization.request" && h.fail_next > 0 {
            h.fail_next -= 1;
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
        h.events.push(event.clone());
        h.mode.unwrap_or(Mode::Approve)
    };
    if event["type"] != "issuing_authorization.request" {
        return StatusCode::OK.into_response();
    }
    assert_eq!(event["data"]["object"]["status"], "pending");
    assert!(event["data"]["object"]["pending_request"].is_object());
    assert!(event["data"]["object"]["card"].get("number").is_none());
    let versioned = |v: Value| {
        (
            [
                ("stripe-version", "2023-08-16"),
                ("content-type", "application/json"),
            ],
            v.to_string(),
        )
            .into_response()
    };
    match mode {
        Mode::Approve => versioned(json!({"approved": true, "metadata": {"roony": "ok"}})),
        Mode::Decline => {
            versioned(json!({"approved": false, "metadata": {"declined_reason": "over_budget"}}))
        }
        Mode::PartialAmount(n) => versioned(json!({"approved": true, "amount": n})),
        Mode::Slow => {
            tokio::time::sleep(Duration::from_millis(800)).await;
            versioned(json!({"approved": true}))
        }
        Mode::BadJson => ([("stripe-version", "2023-08-16")], "{not json").into_response(),
        Mode::NoVersion => json!({"approved": true}).to_string().into_response(),
    }
}

struct Env {
    base: String,
    client: Client,
    hook: Shared,
    hook_url: String,
    http: reqwest::Client,
    _stops: Vec<oneshot::Sender<()>>,
}

async fn serve(router: axum::Router) -> (String, oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    (format!("http://{addr}"), stop)
}

impl Env {
    async fn start(with_webhook: bool) -> Self {
        let shared: Shared = Arc::default();
        let (hook_url, hook_stop) = serve(
            axum::Router::new()
                .route("/hook", axum::routing::post(hook))
                .with_state(shared.clone()),
        )
        .await;
        let hook_url = format!("{hook_url}/hook");
        let mut config = EmulatorConfig::default();
        if with_webhook {
            let mut w =
                WebhookConfig::new(hook_url.clone(), vec![SECRET_OLD.into(), SECRET_NEW.into()]);
            w.realtime_timeout = Duration::from_millis(300);
            config.webhook = Some(w);
        }
        let (base, emu_stop) = serve(Emulator::new(config).router()).await;
        let client = stripe::ClientBuilder::new("sk_test_123")
            .url(base.clone())
            .build()
            .unwrap();
        Self {
            base,
            client,
            hook: shared,
            hook_url,
            http: reqwest::Client::new(),
            _stops: vec![hook_stop, emu_stop],
        }
    }

    fn mode(&self, mode: Mode) {
        self.hook.lock().unwrap().mode = Some(mode);
    }

    async fn card(&self, controls: Option<CreateIssuingCardSpendingControls>) -> String {
        let holder = CreateIssuingCardholder::new(
            BillingSpecs::new(RequiredAddress::new(
                "San Francisco",
                "US",
                "1 Main St",
                "94103",
            )),
            "Agent Smith",
        )
        .send(&self.client)
        .await
        .unwrap();
        let mut req = CreateIssuingCard::new(Currency::USD, IssuingCardType::Virtual)
            .cardholder(holder.id.to_string())
            .status(CreateIssuingCardStatus::Active);
        if let Some(c) = controls {
            req = req.spending_controls(c);
        }
        req.send(&self.client).await.unwrap().id.to_string()
    }

    async fn authorize(&self, card: &str, amount: i64) -> IssuingAuthorization {
        self.authorize_at(card, amount, None, None).await
    }

    async fn authorize_at(
        &self,
        card: &str,
        amount: i64,
        category: Option<CreateIssuingAuthorizationMerchantDataCategory>,
        country: Option<&str>,
    ) -> IssuingAuthorization {
        let mut m = CreateIssuingAuthorizationMerchantData::new();
        m.name = Some("Namecheap".into());
        m.network_id = Some("net_123".into());
        m.category = category;
        m.country = country.map(str::to_owned);
        CreateIssuingAuthorization::new(card)
            .amount(amount)
            .merchant_data(m)
            .send(&self.client)
            .await
            .unwrap()
    }

    async fn control(&self, method: reqwest::Method, path: &str) -> Value {
        self.http
            .request(method, format!("{}{path}", self.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Wait until every regular event in the emulator's log is delivered.
    async fn delivered(&self) -> Vec<Value> {
        for _ in 0..100 {
            let log = self
                .control(reqwest::Method::GET, "/_emulator/events")
                .await;
            let regular: Vec<Value> = log["data"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["realtime"] == false)
                .cloned()
                .collect();
            if regular.iter().all(|e| e["delivered"] == true) {
                return regular;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("events not delivered");
    }

    fn received_types(&self) -> Vec<String> {
        self.hook
            .lock()
            .unwrap()
            .events
            .iter()
            .map(|e| e["type"].as_str().unwrap().to_owned())
            .collect()
    }
}

fn message(e: stripe::StripeError) -> String {
    match e {
        stripe::StripeError::Stripe(e, _) => e.message.unwrap_or_default(),
        other => panic!("expected a Stripe API error, got {other:?}"),
    }
}

fn reason(a: &IssuingAuthorization) -> IssuingAuthorizationRequestReason {
    a.request_history.last().unwrap().reason.clone()
}

#[tokio::test]
async fn helpers_round_trip_through_async_stripe() {
    let env = Env::start(false).await;
    let c = &env.client;
    let card = env.card(None).await;

    let auth = env.authorize(&card, 1240).await;
    assert!(auth.approved);
    assert_eq!(auth.status, IssuingAuthorizationStatus::Pending);
    assert_eq!(auth.amount, 1240);
    assert_eq!(reason(&auth), IssuingAuthorizationRequestReason::CardActive);
    assert_eq!(auth.card.id.as_str(), card);
    assert!(auth.pending_request.is_none());
    assert_eq!(auth.merchant_data.name.as_deref(), Some("Namecheap"));
    assert_eq!(auth.merchant_data.network_id, "net_123");

    let inc = IncrementIssuingAuthorization::new(auth.id.to_string(), 260)
        .send(c)
        .await
        .unwrap();
    assert_eq!(inc.id, auth.id);
    assert_eq!(inc.amount, 1500);
    assert_eq!(inc.request_history.len(), 2);

    let partial = CaptureIssuingAuthorization::new(auth.id.to_string())
        .capture_amount(1000)
        .close_authorization(false)
        .send(c)
        .await
        .unwrap();
    assert_eq!(partial.status, IssuingAuthorizationStatus::Pending);
    assert_eq!(partial.transactions.len(), 1);
    assert_eq!(partial.transactions[0].amount, -1000);
    assert_eq!(
        partial.transactions[0].type_,
        IssuingTransactionType::Capture
    );

    let reversed = ReverseIssuingAuthorization::new(auth.id.to_string())
        .send(c)
        .await
        .unwrap();
    assert_eq!(reversed.status, IssuingAuthorizationStatus::Reversed);

    let other = env.authorize(&card, 300).await;
    let expired = ExpireIssuingAuthorization::new(other.id.to_string())
        .send(c)
        .await
        .unwrap();
    assert_eq!(expired.status, IssuingAuthorizationStatus::Expired);
    let err = CaptureIssuingAuthorization::new(other.id.to_string())
        .send(c)
        .await
        .unwrap_err();
    let err = message(err);
    assert!(err.contains("cannot be captured"), "{err}");

    let got = RetrieveIssuingAuthorization::new(auth.id.clone())
        .send(c)
        .await
        .unwrap();
    assert_eq!(got.transactions.len(), 1);
    let listed = ListIssuingAuthorization::new()
        .card(card.clone())
        .send(c)
        .await
        .unwrap();
    assert_eq!(listed.data.len(), 2);
    assert_eq!(listed.data[0].id, other.id, "newest first");
    let expired_only = ListIssuingAuthorization::new()
        .status(IssuingAuthorizationStatus::Expired)
        .send(c)
        .await
        .unwrap();
    assert_eq!(expired_only.data.len(), 1);
    let page = ListIssuingAuthorization::new()
        .limit(1)
        .send(c)
        .await
        .unwrap();
    assert!(page.has_more);

    let forced = CreateForceCaptureIssuingTransaction::new(700, card.clone())
        .send(c)
        .await
        .unwrap();
    assert_eq!(forced.amount, -700);
    assert!(forced.authorization.is_none());
    let unlinked = CreateUnlinkedRefundIssuingTransaction::new(50, card.clone())
        .send(c)
        .await
        .unwrap();
    assert_eq!(unlinked.amount, 50);
    assert_eq!(unlinked.type_, IssuingTransactionType::Refund);
    let refund = RefundIssuingTransaction::new(partial.transactions[0].id.to_string())
        .refund_amount(400)
        .send(c)
        .await
        .unwrap();
    assert_eq!(refund.amount, 400);
    assert_eq!(refund.type_, IssuingTransactionType::Refund);
    assert_eq!(
        refund.authorization.as_ref().map(|a| a.id().to_string()),
        Some(auth.id.to_string())
    );
    let got = RetrieveIssuingTransaction::new(refund.id.clone())
        .send(c)
        .await
        .unwrap();
    assert_eq!(got.id, refund.id);
    let refunds = ListIssuingTransaction::new()
        .card(card.clone())
        .type_(IssuingTransactionType::Refund)
        .send(c)
        .await
        .unwrap();
    assert_eq!(refunds.data.len(), 2);
    let all = ListIssuingTransaction::new().send(c).await.unwrap();
    assert_eq!(all.data.len(), 4);

    // Errors are Stripe-shaped.
    let err = message(
        RetrieveIssuingAuthorization::new("iauth_nope")
            .send(c)
            .await
            .unwrap_err(),
    );
    assert!(err.contains("No such issuing authorization"), "{err}");
    let err = message(
        CreateIssuingAuthorization::new("ic_nope")
            .amount(5)
            .send(c)
            .await
            .unwrap_err(),
    );
    assert!(err.contains("No such issuing card"), "{err}");
}

#[tokio::test]
async fn stripe_checks_decline_before_any_webhook() {
    let env = Env::start(true).await;
    let c = &env.client;
    use stripe_issuing::issuing_card::{
        CreateIssuingCardSpendingControlsBlockedCategories as Blocked,
        CreateIssuingCardSpendingControlsSpendingLimits as Limit,
        CreateIssuingCardSpendingControlsSpendingLimitsInterval as Interval,
    };
    let mut controls = CreateIssuingCardSpendingControls::new();
    controls.blocked_categories = Some(vec![Blocked::BettingCasinoGambling]);
    controls.allowed_merchant_countries = Some(vec!["US".into(), "CA".into()]);
    controls.spending_limits = Some(vec![Limit::new(2000, Interval::AllTime)]);
    let card = env.card(Some(controls)).await;

    let gambling = env
        .authorize_at(
            &card,
            100,
            Some(CreateIssuingAuthorizationMerchantDataCategory::BettingCasinoGambling),
            None,
        )
        .await;
    assert!(!gambling.approved);
    assert_eq!(gambling.status, IssuingAuthorizationStatus::Closed);
    assert_eq!(
        reason(&gambling),
        IssuingAuthorizationRequestReason::SpendingControls
    );
    let abroad = env.authorize_at(&card, 100, None, Some("RU")).await;
    assert_eq!(
        reason(&abroad),
        IssuingAuthorizationRequestReason::SpendingControls
    );

    let first = env.authorize(&card, 1500).await;
    assert!(first.approved, "{:?}", reason(&first));
    assert_eq!(
        reason(&first),
        IssuingAuthorizationRequestReason::WebhookApproved
    );
    assert_eq!(first.metadata.get("roony").map(String::as_str), Some("ok"));
    // 1500 held + 600 > 2000 all-time
    let over = env.authorize(&card, 600).await;
    assert_eq!(
        reason(&over),
        IssuingAuthorizationRequestReason::SpendingControls
    );
    // capture 1000 of it and close: 1000 spent, 900 fits
    CaptureIssuingAuthorization::new(first.id.to_string())
        .capture_amount(1000)
        .send(c)
        .await
        .unwrap();
    assert!(env.authorize(&card, 900).await.approved);
    // refunds give room back
    assert!(!env.authorize(&card, 200).await.approved);
    CreateUnlinkedRefundIssuingTransaction::new(500, card.clone())
        .send(c)
        .await
        .unwrap();
    assert!(env.authorize(&card, 200).await.approved);

    // Only the requests that passed Stripe's checks reached the webhook.
    let requests = env
        .received_types()
        .iter()
        .filter(|t| *t == "issuing_authorization.request")
        .count();
    let _ = env.delivered().await;
    assert_eq!(requests, 3);

    UpdateIssuingCard::new(card.clone())
        .status(IssuingCardStatus::Inactive)
        .send(c)
        .await
        .unwrap();
    assert_eq!(
        reason(&env.authorize(&card, 1).await),
        IssuingAuthorizationRequestReason::CardInactive
    );
    UpdateIssuingCard::new(card.clone())
        .status(IssuingCardStatus::Canceled)
        .send(c)
        .await
        .unwrap();
    assert_eq!(
        reason(&env.authorize(&card, 1).await),
        IssuingAuthorizationRequestReason::CardCanceled
    );
    assert_eq!(env.hook.lock().unwrap().bad_signatures, 0);
}

#[tokio::test]
async fn realtime_answers_decide() {
    let env = Env::start(true).await;
    let card = env.card(None).await;
    let cases = [
        (
            Mode::Approve,
            true,
            IssuingAuthorizationRequestReason::WebhookApproved,
        ),
        (
            Mode::Decline,
            false,
            IssuingAuthorizationRequestReason::WebhookDeclined,
        ),
        (
            Mode::Slow,
            false,
            IssuingAuthorizationRequestReason::WebhookTimeout,
        ),
        (
            Mode::BadJson,
            false,
            IssuingAuthorizationRequestReason::WebhookError,
        ),
        (
            Mode::NoVersion,
            false,
            IssuingAuthorizationRequestReason::WebhookError,
        ),
    ];
    for (mode, approved, why) in cases {
        env.mode(mode);
        let a = env.authorize(&card, 500).await;
        assert_eq!(a.approved, approved, "{mode:?}");
        assert_eq!(reason(&a), why, "{mode:?}");
        let expected_status = if approved {
            IssuingAuthorizationStatus::Pending
        } else {
            IssuingAuthorizationStatus::Closed
        };
        assert_eq!(a.status, expected_status);
        if matches!(mode, Mode::BadJson | Mode::NoVersion) {
            assert!(a.request_history[0].reason_message.is_some());
        }
        if mode == Mode::Decline {
            assert_eq!(
                a.metadata.get("declined_reason").map(String::as_str),
                Some("over_budget")
            );
        }
    }
    // Timeouts approve when configured so.
    let resp = env
        .http
        .post(format!("{}/_emulator/webhooks", env.base))
        .json(&json!({"url": env.hook_url, "secrets": [SECRET_OLD, SECRET_NEW], "timeout_ms": 200, "timeout_approves": true}))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());
    env.mode(Mode::Slow);
    let a = env.authorize(&card, 500).await;
    assert!(a.approved);
    assert_eq!(
        reason(&a),
        IssuingAuthorizationRequestReason::WebhookTimeout
    );

    // Amount-controllable requests can be partially approved.
    env.mode(Mode::PartialAmount(300));
    let a = CreateIssuingAuthorization::new(card.clone())
        .amount(500)
        .is_amount_controllable(true)
        .send(&env.client)
        .await
        .unwrap();
    assert!(a.approved);
    assert_eq!(a.amount, 300);

    // An increment asks again, on the same authorization.
    env.mode(Mode::Decline);
    let inc = IncrementIssuingAuthorization::new(a.id.to_string(), 100)
        .send(&env.client)
        .await
        .unwrap();
    assert_eq!(inc.amount, 300);
    assert_eq!(inc.request_history.len(), 2);
    assert!(!inc.request_history[1].approved);
    let requests: Vec<Value> = env
        .hook
        .lock()
        .unwrap()
        .events
        .iter()
        .filter(|e| e["type"] == "issuing_authorization.request")
        .cloned()
        .collect();
    let last = requests.last().unwrap();
    assert_eq!(last["data"]["object"]["id"], a.id.as_str());
    assert_eq!(last["data"]["object"]["pending_request"]["amount"], 100);
    // The first request shows amount 0 with the requested amount pending.
    assert_eq!(requests[0]["data"]["object"]["amount"], 0);
    assert_eq!(
        requests[0]["data"]["object"]["pending_request"]["amount"],
        500
    );

    // No endpoint at all: approve.
    env.http
        .delete(format!("{}/_emulator/webhooks", env.base))
        .send()
        .await
        .unwrap();
    let a = env.authorize(&card, 500).await;
    assert!(a.approved);
    assert_eq!(reason(&a), IssuingAuthorizationRequestReason::CardActive);
}

#[tokio::test]
async fn events_in_order_signed_and_single_use_cancel() {
    let env = Env::start(true).await;
    let c = &env.client;
    let holder = CreateIssuingCardholder::new(
        BillingSpecs::new(RequiredAddress::new(
            "San Francisco",
            "US",
            "1 Main St",
            "94103",
        )),
        "Agent Smith",
    )
    .send(c)
    .await
    .unwrap();
    // Single-use: cancel after one payment (form-encoded by hand: async-stripe rc.10
    // has no builder for lifecycle_controls).
    let card: Value = env
        .http
        .post(format!("{}/v1/issuing/cards", env.base))
        .bearer_auth("sk_test_123")
        .form(&[
            ("currency", "usd"),
            ("type", "virtual"),
            ("status", "active"),
            ("cardholder", holder.id.as_str()),
            ("lifecycle_controls[cancel_after][payment_count]", "1"),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let card = card["id"].as_str().unwrap().to_owned();
    env.hook.lock().unwrap().fail_next = 2; // the first deliveries fail and are retried
    let auth = env.authorize(&card, 1240).await;
    assert!(auth.approved);
    let captured = CaptureIssuingAuthorization::new(auth.id.to_string())
        .send(c)
        .await
        .unwrap();
    assert_eq!(captured.status, IssuingAuthorizationStatus::Closed);
    assert_eq!(
        captured.card.status,
        IssuingCardStatus::Active,
        "rendered before cancel"
    );
    let after = stripe_issuing::issuing_card::RetrieveIssuingCard::new(card.clone())
        .send(c)
        .await
        .unwrap();
    assert_eq!(after.status, IssuingCardStatus::Canceled);
    // Capturing on a canceled card is still allowed (force capture).
    CreateForceCaptureIssuingTransaction::new(100, card.clone())
        .send(c)
        .await
        .unwrap();

    let log = env.delivered().await;
    assert!(
        log.iter().any(|e| e["attempts"].as_u64().unwrap() > 1),
        "retried"
    );
    let types = env.received_types();
    assert_eq!(
        types,
        vec![
            "issuing_cardholder.created",
            "issuing_card.created",
            "issuing_authorization.request",
            "issuing_authorization.created",
            "issuing_transaction.created",
            "issuing_authorization.updated",
            "issuing_card.updated",
            "issuing_transaction.created",
        ]
    );
    let events = env.hook.lock().unwrap().events.clone();
    let updated = &events[5];
    assert_eq!(updated["data"]["object"]["status"], "closed");
    assert_eq!(updated["data"]["previous_attributes"]["status"], "pending");
    assert_eq!(events[4]["data"]["object"]["amount"], -1240);
    assert_eq!(events[6]["data"]["previous_attributes"]["status"], "active");
    for e in &events {
        assert_eq!(e["object"], "event");
        assert_eq!(e["livemode"], false);
        assert!(e["id"].as_str().unwrap().starts_with("evt_"));
        assert!(e["request"]["id"].as_str().unwrap().starts_with("req_"));
        assert!(
            !e.to_string().contains("\"number\""),
            "no card numbers in events"
        );
        assert!(!e.to_string().contains("\"cvc\""));
    }
    assert_eq!(env.hook.lock().unwrap().bad_signatures, 0);

    // Resend one event.
    let id = events[4]["id"].as_str().unwrap();
    let r = env
        .control(
            reqwest::Method::POST,
            &format!("/_emulator/events/{id}/resend"),
        )
        .await;
    assert_eq!(r["resent"], id);
    for _ in 0..100 {
        if env.received_types().len() == 9 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let again = env.hook.lock().unwrap().events.last().cloned().unwrap();
    assert_eq!(again["id"], id);
}

#[tokio::test]
async fn simulate_charge_in_process_and_binary() {
    let env = Env::start(true).await;
    let card = env.card(None).await;
    let mut args = ChargeArgs::new(card.clone(), 1240, env.base.clone());
    args.merchant = Some("Namecheap".into());
    args.category = Some("computer_network_services".into());
    args.capture = true;
    let out = simulate::charge(&args).await.unwrap();
    assert!(out.approved());
    assert_eq!(out.reason().as_deref(), Some("webhook_approved"));
    let tx = out.transaction.as_ref().unwrap();
    assert_eq!(tx.amount, -1240);
    let summary = out.summary();
    assert!(
        summary.contains("APPROVED 12.40 USD at Namecheap"),
        "{summary}"
    );
    assert!(summary.contains("roony: ok"), "{summary}");
    assert!(summary.contains("captured: ipi_"), "{summary}");

    env.mode(Mode::Decline);
    let out = simulate::charge(&ChargeArgs::new(card.clone(), 500, env.base.clone()))
        .await
        .unwrap();
    assert!(!out.approved());
    assert!(out.summary().contains("declined_reason: over_budget"));

    let err = simulate::charge(&ChargeArgs::new("ic_missing", 5, env.base.clone()))
        .await
        .unwrap_err();
    assert!(err.contains("No such issuing card"), "{err}");

    let bin = env!("CARGO_BIN_EXE_roony");
    let run = |amount: &str, card: &str| {
        let base = env.base.clone();
        let (amount, card) = (amount.to_owned(), card.to_owned());
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(bin)
                .args(["simulate", "charge", "--card", &card, "--amount", &amount])
                .args(["--stripe-base-url", &base, "--merchant", "Namecheap"])
                .env_remove("ROONY_STRIPE_API_KEY")
                .output()
                .unwrap()
        })
    };
    let declined = run("500", &card).await.unwrap();
    assert_eq!(declined.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&declined.stdout).contains("DECLINED"));
    env.mode(Mode::Approve);
    let approved = run("500", &card).await.unwrap();
    assert_eq!(
        approved.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&approved.stderr)
    );
    let error = run("500", "ic_missing").await.unwrap();
    assert_eq!(error.status.code(), Some(2));
}
