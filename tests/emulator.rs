#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]
//! The Stripe emulator driven over HTTP by the real async-stripe client: every
//! response here is parsed by async-stripe's own types.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::TryStreamExt;
use roony::emulator::{Emulator, EmulatorConfig};
use serde_json::{Value, json};
use stripe::{
    AccountId, ApiErrorsCode, ApiErrorsType, Client, IdempotencyKey, RequestStrategy, StripeError,
    StripeRequest,
};
use stripe_issuing::issuing_card::{
    CreateIssuingCard, CreateIssuingCardSpendingControls,
    CreateIssuingCardSpendingControlsAllowedCategories,
    CreateIssuingCardSpendingControlsSpendingLimits,
    CreateIssuingCardSpendingControlsSpendingLimitsInterval, CreateIssuingCardStatus,
    ListIssuingCard, RetrieveIssuingCard, UpdateIssuingCard, UpdateIssuingCardCancellationReason,
    UpdateIssuingCardSpendingControls,
};
use stripe_issuing::issuing_cardholder::{
    BillingSpecs, CreateIssuingCardholder, ListIssuingCardholder, RequiredAddress,
    RetrieveIssuingCardholder, UpdateIssuingCardholder, UpdateIssuingCardholderStatus,
};
use stripe_shared::{
    IssuingCard, IssuingCardCancellationReason, IssuingCardStatus, IssuingCardType,
    IssuingCardholder, IssuingCardholderStatus,
};
use stripe_types::Currency;
use tokio::sync::oneshot;

struct Running {
    base: String,
    http: reqwest::Client,
    _stop: oneshot::Sender<()>,
}

impl Running {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let emulator = Emulator::new(EmulatorConfig::default());
        tokio::spawn(emulator.serve(listener, async {
            let _ = stopped.await;
        }));
        Self {
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
            _stop: stop,
        }
    }

    fn client(&self) -> Client {
        self.client_with("sk_test_123")
    }

    fn client_with(&self, key: &str) -> Client {
        stripe::ClientBuilder::new(key)
            .url(self.base.clone())
            .build()
            .expect("client")
    }

    async fn control(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.expect("control request");
        assert!(
            resp.status().is_success(),
            "control {path}: {}",
            resp.status()
        );
        resp.json().await.expect("control json")
    }

    async fn stats(&self) -> Value {
        self.control(reqwest::Method::GET, "/_emulator/stats", None)
            .await
    }

    async fn fail_next(&self, status: u16, method: &str, path_prefix: &str, count: u32) {
        self.control(
            reqwest::Method::POST,
            "/_emulator/faults",
            Some(json!({"fail_next": [{"status": status, "method": method, "path_prefix": path_prefix, "count": count}]})),
        )
        .await;
    }
}

fn luhn_valid(digits: &str) -> bool {
    let sum: u32 = digits
        .bytes()
        .rev()
        .enumerate()
        .map(|(i, b)| {
            let d = u32::from(b - b'0');
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 { x - 9 } else { x }
            } else {
                d
            }
        })
        .sum();
    digits.len() >= 12 && digits.bytes().all(|b| b.is_ascii_digit()) && sum.is_multiple_of(10)
}

fn stripe_error(err: StripeError) -> (stripe::ApiErrors, u16) {
    match err {
        StripeError::Stripe(e, status) => (*e, status),
        other => panic!("expected a Stripe API error, got {other:?}"),
    }
}

async fn cardholder(client: &Client) -> IssuingCardholder {
    CreateIssuingCardholder::new(
        BillingSpecs::new(RequiredAddress::new(
            "San Francisco",
            "US",
            "510 Townsend St",
            "94103",
        )),
        "Jenny Rosen",
    )
    .email("jenny@example.com")
    .phone_number("+18008675309")
    .send(client)
    .await
    .expect("create cardholder")
}

fn virtual_card(cardholder: &IssuingCardholder) -> CreateIssuingCard {
    CreateIssuingCard::new(Currency::USD, IssuingCardType::Virtual)
        .cardholder(cardholder.id.as_str())
        .status(CreateIssuingCardStatus::Active)
}

fn limits() -> CreateIssuingCardSpendingControls {
    let mut controls = CreateIssuingCardSpendingControls::new();
    controls.spending_limits = Some(vec![CreateIssuingCardSpendingControlsSpendingLimits::new(
        5000,
        CreateIssuingCardSpendingControlsSpendingLimitsInterval::AllTime,
    )]);
    controls.allowed_categories = Some(vec![
        CreateIssuingCardSpendingControlsAllowedCategories::ComputerSoftwareStores,
    ]);
    controls.blocked_merchant_countries = Some(vec!["RU".to_owned(), "KP".to_owned()]);
    controls
}

#[tokio::test]
async fn card_lifecycle_with_async_stripe() {
    let emu = Running::start().await;
    let client = emu.client();
    let holder = cardholder(&client).await;
    assert!(holder.id.as_str().starts_with("ich_"));
    assert_eq!(holder.status, IssuingCardholderStatus::Active);
    assert!(!holder.livemode);

    let metadata = HashMap::from([("intent_id".to_owned(), "pi_42".to_owned())]);
    let card: IssuingCard = virtual_card(&holder)
        .spending_controls(limits())
        .metadata(metadata)
        .expand(vec!["number".to_owned(), "cvc".to_owned()])
        .send(&client)
        .await
        .expect("create card");
    assert!(card.id.as_str().starts_with("ic_"));
    assert_eq!(card.cardholder.id, holder.id);
    assert_eq!(card.cardholder.name, "Jenny Rosen");
    assert_eq!(card.status, IssuingCardStatus::Active);
    assert_eq!(card.type_, IssuingCardType::Virtual);
    assert_eq!(card.currency, Currency::USD);
    assert_eq!(card.brand, "Visa");
    assert!(
        card.number.is_none() && card.cvc.is_none(),
        "create never reveals the number"
    );
    assert_eq!(
        card.metadata.get("intent_id").map(String::as_str),
        Some("pi_42")
    );
    let limits = card
        .spending_controls
        .spending_limits
        .clone()
        .expect("limits");
    assert_eq!(limits.len(), 1);
    assert_eq!(limits[0].amount, 5000);
    assert_eq!(limits[0].interval.as_str(), "all_time");
    let allowed = card
        .spending_controls
        .allowed_categories
        .clone()
        .expect("allowed");
    assert_eq!(allowed.len(), 1);
    assert_eq!(allowed[0].as_str(), "computer_software_stores");
    assert_eq!(
        card.spending_controls.blocked_merchant_countries.as_deref(),
        Some(&["RU".to_owned(), "KP".to_owned()][..])
    );
    assert!(card.exp_year > 2000 && (1..=12).contains(&card.exp_month));
    assert!(card.wallets.as_ref().is_some_and(|w| w.apple_pay.eligible));

    // retrieve with expand: the only way to see the number
    let full = RetrieveIssuingCard::new(card.id.clone())
        .expand(vec!["number".to_owned(), "cvc".to_owned()])
        .send(&client)
        .await
        .expect("retrieve");
    let number = full.number.clone().expect("number");
    assert_eq!(number.len(), 16);
    assert!(luhn_valid(&number), "card number passes Luhn");
    assert!(number.ends_with(&full.last4));
    assert_eq!(full.last4, card.last4);
    let cvc = full.cvc.clone().expect("cvc");
    assert!(cvc.len() == 3 && cvc.bytes().all(|b| b.is_ascii_digit()));
    let plain = RetrieveIssuingCard::new(card.id.clone())
        .send(&client)
        .await
        .expect("retrieve");
    assert!(plain.number.is_none() && plain.cvc.is_none());

    // update spending controls: switch from blocked to allowed countries
    let mut controls = UpdateIssuingCardSpendingControls::new();
    controls.blocked_merchant_countries = Some(vec![]);
    controls.allowed_merchant_countries = Some(vec!["US".to_owned()]);
    let updated = UpdateIssuingCard::new(card.id.clone())
        .spending_controls(controls)
        .send(&client)
        .await;
    // an empty list is sent as `…[blocked_merchant_countries]=`, which unsets it
    let updated = updated.expect("update controls");
    assert_eq!(updated.spending_controls.blocked_merchant_countries, None);
    assert_eq!(
        updated
            .spending_controls
            .allowed_merchant_countries
            .as_deref(),
        Some(&["US".to_owned()][..])
    );
    // setting the other list while one is set is refused, as Stripe does
    let mut controls = UpdateIssuingCardSpendingControls::new();
    controls.blocked_merchant_countries = Some(vec!["RU".to_owned()]);
    let (err, status) = stripe_error(
        UpdateIssuingCard::new(card.id.clone())
            .spending_controls(controls)
            .send(&client)
            .await
            .expect_err("both country lists"),
    );
    assert_eq!(status, 400);
    assert_eq!(err.type_, ApiErrorsType::InvalidRequestError);
    assert!(err.message.unwrap_or_default().contains("only specify one"));

    // cancel (terminal)
    let canceled = UpdateIssuingCard::new(card.id.clone())
        .status(IssuingCardStatus::Canceled)
        .cancellation_reason(UpdateIssuingCardCancellationReason::Lost)
        .send(&client)
        .await
        .expect("cancel");
    assert_eq!(canceled.status, IssuingCardStatus::Canceled);
    assert_eq!(
        canceled.cancellation_reason,
        Some(IssuingCardCancellationReason::Lost)
    );
    assert!(canceled.number.is_none());
    let (err, status) = stripe_error(
        UpdateIssuingCard::new(card.id.clone())
            .status(IssuingCardStatus::Active)
            .send(&client)
            .await
            .expect_err("canceled is terminal"),
    );
    assert_eq!(status, 400);
    assert_eq!(err.param.as_deref(), Some("status"));

    // list: newest first, never with numbers
    let second = virtual_card(&holder)
        .send(&client)
        .await
        .expect("second card");
    let listed = ListIssuingCard::new()
        .cardholder(holder.id.as_str())
        .send(&client)
        .await
        .expect("list");
    assert_eq!(listed.url, "/v1/issuing/cards");
    assert!(!listed.has_more);
    let ids: Vec<&str> = listed.data.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, vec![second.id.as_str(), card.id.as_str()]);
    assert!(
        listed
            .data
            .iter()
            .all(|c| c.number.is_none() && c.cvc.is_none())
    );
    let canceled_only = ListIssuingCard::new()
        .status(IssuingCardStatus::Canceled)
        .send(&client)
        .await
        .expect("list");
    assert_eq!(canceled_only.data.len(), 1);

    // cardholder update and list
    let inactive = UpdateIssuingCardholder::new(holder.id.clone())
        .status(UpdateIssuingCardholderStatus::Inactive)
        .send(&client)
        .await
        .expect("update cardholder");
    assert_eq!(inactive.status, IssuingCardholderStatus::Inactive);
    let holders = ListIssuingCardholder::new()
        .send(&client)
        .await
        .expect("list cardholders");
    assert_eq!(holders.data.len(), 1);
    let again = RetrieveIssuingCardholder::new(holder.id.clone())
        .send(&client)
        .await
        .expect("retrieve cardholder");
    assert_eq!(again.status, IssuingCardholderStatus::Inactive);
}

#[tokio::test]
async fn pagination_with_async_stripe_stream() {
    let emu = Running::start().await;
    let client = emu.client();
    let holder = cardholder(&client).await;
    let mut created = Vec::new();
    for _ in 0..7 {
        created.push(virtual_card(&holder).send(&client).await.expect("card").id);
    }
    let page = ListIssuingCard::new()
        .limit(3)
        .send(&client)
        .await
        .expect("page");
    assert_eq!(page.data.len(), 3);
    assert!(page.has_more);
    let all: Vec<IssuingCard> = ListIssuingCard::new()
        .limit(3)
        .paginate()
        .stream(&client)
        .try_collect()
        .await
        .expect("stream");
    let streamed: Vec<&str> = all.iter().map(|c| c.id.as_str()).collect();
    let expected: Vec<&str> = created.iter().rev().map(|id| id.as_str()).collect();
    assert_eq!(streamed, expected);
    let back = ListIssuingCard::new()
        .ending_before(created[3].as_str())
        .limit(2)
        .send(&client)
        .await
        .expect("ending_before");
    let ids: Vec<&str> = back.data.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, vec![created[5].as_str(), created[4].as_str()]);
    assert!(back.has_more);
}

#[tokio::test]
async fn stripe_account_scopes_objects() {
    let emu = Running::start().await;
    let platform = emu.client();
    let connected = stripe::ClientBuilder::new("sk_test_123")
        .url(emu.base.clone())
        .account_id(AccountId::from("acct_1Connected"))
        .build()
        .expect("client");
    let holder = cardholder(&connected).await;
    let card = virtual_card(&holder).send(&connected).await.expect("card");

    let (err, status) = stripe_error(
        RetrieveIssuingCard::new(card.id.clone())
            .send(&platform)
            .await
            .expect_err("platform cannot see it"),
    );
    assert_eq!(status, 404);
    assert_eq!(err.code, Some(ApiErrorsCode::ResourceMissing));
    // the platform cannot use the connected account's cardholder either
    let (err, status) = stripe_error(
        virtual_card(&holder)
            .send(&platform)
            .await
            .expect_err("foreign cardholder"),
    );
    assert_eq!(status, 400);
    assert_eq!(err.param.as_deref(), Some("cardholder"));

    // per-request override reaches the same account
    let seen = RetrieveIssuingCard::new(card.id.clone())
        .customize()
        .account_id(AccountId::from("acct_1Connected"))
        .send(&platform)
        .await
        .expect("same account");
    assert_eq!(seen.id, card.id);
    let other = ListIssuingCard::new()
        .customize()
        .account_id(AccountId::from("acct_2Other"))
        .send(&platform)
        .await
        .expect("other account");
    assert!(other.data.is_empty());

    let stats = emu.stats().await;
    assert_eq!(stats["accounts"]["acct_1Connected"]["issuing.card"], 1);
    assert_eq!(stats["objects"]["issuing.card"], 1);
}

#[tokio::test]
async fn idempotent_create_executes_once() {
    let emu = Running::start().await;
    let client = emu.client();
    let holder = cardholder(&client).await;
    let key = IdempotencyKey::new("intent-7f3a-attempt").expect("key");
    let request = virtual_card(&holder).spending_controls(limits());
    let first = request
        .customize()
        .request_strategy(RequestStrategy::Idempotent(key.clone()))
        .send(&client)
        .await
        .expect("first");
    let second = request
        .customize()
        .request_strategy(RequestStrategy::Idempotent(key.clone()))
        .send(&client)
        .await
        .expect("replay");
    assert_eq!(first.id, second.id);
    let stats = emu.stats().await;
    let cards = &stats["requests"]["POST /v1/issuing/cards"];
    assert_eq!(cards["executed"], 1, "{stats}");
    assert_eq!(cards["replayed"], 1, "{stats}");
    assert_eq!(stats["objects"]["issuing.card"], 1);

    // same key, different parameters
    let (err, status) = stripe_error(
        CreateIssuingCard::new(Currency::EUR, IssuingCardType::Virtual)
            .cardholder(holder.id.as_str())
            .customize()
            .request_strategy(RequestStrategy::Idempotent(key.clone()))
            .send(&client)
            .await
            .expect_err("mismatch"),
    );
    assert_eq!(status, 400);
    assert_eq!(err.type_, ApiErrorsType::IdempotencyError);
    assert!(err.message.unwrap_or_default().contains("same parameters"));

    // the replay is marked, with the original body and request id
    let body = format!(
        "cardholder={}&currency=usd&status=active&type=virtual",
        holder.id.as_str()
    );
    let post = |body: String| {
        emu.http
            .post(format!("{}/v1/issuing/cards", emu.base))
            .bearer_auth("sk_test_123")
            .header("Idempotency-Key", "raw-key")
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
    };
    let a = post(body.clone()).await.expect("a");
    assert!(a.headers().get("idempotent-replayed").is_none());
    let a_request_id = a.headers().get("request-id").cloned().expect("request id");
    let a_body: Value = a.json().await.expect("json");
    let b = post(body).await.expect("b");
    assert_eq!(
        b.headers().get("idempotent-replayed").map(|v| v.as_bytes()),
        Some(&b"true"[..])
    );
    assert_eq!(b.headers().get("original-request"), Some(&a_request_id));
    assert_eq!(
        b.headers().get("idempotency-key").map(|v| v.as_bytes()),
        Some(&b"raw-key"[..])
    );
    let b_body: Value = b.json().await.expect("json");
    assert_eq!(a_body, b_body);
}

#[tokio::test]
async fn concurrent_same_key_gets_409() {
    let emu = Running::start().await;
    let client = emu.client();
    let holder = cardholder(&client).await;
    emu.control(
        reqwest::Method::POST,
        "/_emulator/faults",
        Some(json!({"latency_ms": 300})),
    )
    .await;
    let body = format!(
        "cardholder={}&currency=usd&type=virtual",
        holder.id.as_str()
    );
    let post = || {
        emu.http
            .post(format!("{}/v1/issuing/cards", emu.base))
            .bearer_auth("sk_test_123")
            .header("Idempotency-Key", "same-key")
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(body.clone())
            .send()
    };
    let (a, b) = tokio::join!(post(), async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        post().await
    });
    let (a, b) = (a.expect("a"), b.expect("b"));
    assert_eq!(a.status(), 200);
    assert_eq!(b.status(), 409);
    let err: Value = b.json().await.expect("json");
    assert_eq!(err["error"]["code"], "idempotency_key_in_use");
    let c = post().await.expect("c");
    assert_eq!(c.status(), 200);
    assert!(c.headers().get("idempotent-replayed").is_some());
    assert_eq!(emu.stats().await["objects"]["issuing.card"], 1);
}

#[tokio::test]
async fn injected_faults_then_success() {
    let emu = Running::start().await;
    let client = emu.client();
    let holder = cardholder(&client).await;

    emu.fail_next(429, "POST", "/v1/issuing/cards", 1).await;
    let (err, status) = stripe_error(
        virtual_card(&holder)
            .send(&client)
            .await
            .expect_err("rate limited"),
    );
    assert_eq!(status, 429);
    assert_eq!(err.code, Some(ApiErrorsCode::RateLimit));
    assert_eq!(err.type_, ApiErrorsType::InvalidRequestError);
    virtual_card(&holder)
        .send(&client)
        .await
        .expect("then success");

    // async-stripe's own retry (same idempotency key) gets through two 500s
    emu.fail_next(500, "POST", "/v1/issuing/cards", 2).await;
    let card = virtual_card(&holder)
        .customize()
        .request_strategy(RequestStrategy::Retry(3))
        .send(&client)
        .await
        .expect("retried");
    assert!(card.id.as_str().starts_with("ic_"));

    let stats = emu.stats().await;
    let cards = &stats["requests"]["POST /v1/issuing/cards"];
    assert_eq!(cards["faulted"], 3, "{stats}");
    assert_eq!(cards["executed"], 2, "{stats}");
    assert_eq!(stats["objects"]["issuing.card"], 2);
    let faults = emu
        .control(reqwest::Method::GET, "/_emulator/faults", None)
        .await;
    assert_eq!(faults["fail_next"], json!([]));
}

#[tokio::test]
async fn errors_parse_as_stripe_errors() {
    let emu = Running::start().await;
    let client = emu.client();
    let holder = cardholder(&client).await;

    let (err, status) = stripe_error(
        CreateIssuingCard::new(Currency::USD, IssuingCardType::Virtual)
            .send(&client)
            .await
            .expect_err("no cardholder"),
    );
    assert_eq!(status, 400);
    assert_eq!(err.code, Some(ApiErrorsCode::ParameterMissing));
    assert_eq!(err.param.as_deref(), Some("cardholder"));

    let (err, status) = stripe_error(
        CreateIssuingCard::new(Currency::USD, IssuingCardType::Virtual)
            .cardholder("ich_doesnotexist")
            .send(&client)
            .await
            .expect_err("unknown cardholder"),
    );
    assert_eq!(status, 400);
    assert_eq!(err.code, Some(ApiErrorsCode::ResourceMissing));

    let (err, status) = stripe_error(
        RetrieveIssuingCard::new("ic_missing")
            .send(&client)
            .await
            .expect_err("unknown card"),
    );
    assert_eq!(status, 404);
    assert_eq!(err.code, Some(ApiErrorsCode::ResourceMissing));
    assert_eq!(
        err.message.as_deref(),
        Some("No such issuing card: 'ic_missing'")
    );

    let mut both = CreateIssuingCardSpendingControls::new();
    both.allowed_categories = Some(vec![
        CreateIssuingCardSpendingControlsAllowedCategories::Bakeries,
    ]);
    both.blocked_categories = Some(vec![
        stripe_issuing::issuing_card::CreateIssuingCardSpendingControlsBlockedCategories::Florists,
    ]);
    let (_, status) = stripe_error(
        virtual_card(&holder)
            .spending_controls(both)
            .send(&client)
            .await
            .expect_err("exclusive"),
    );
    assert_eq!(status, 400);

    let too_many: HashMap<String, String> =
        (0..51).map(|i| (format!("k{i}"), "v".to_owned())).collect();
    let (err, _) = stripe_error(
        virtual_card(&holder)
            .metadata(too_many)
            .send(&client)
            .await
            .expect_err("metadata"),
    );
    assert_eq!(err.param.as_deref(), Some("metadata"));

    for key in ["sk_live_123", "pk_test_123"] {
        let (err, status) = stripe_error(
            RetrieveIssuingCard::new("ic_x")
                .send(&emu.client_with(key))
                .await
                .expect_err("bad key"),
        );
        assert_eq!(status, 401);
        assert_eq!(err.type_, ApiErrorsType::InvalidRequestError);
    }

    let resp = emu
        .http
        .get(format!("{}/v1/foo", emu.base))
        .bearer_auth("sk_test_123")
        .send()
        .await
        .expect("unknown url");
    assert_eq!(resp.status(), 404);
    assert!(resp.headers().get("request-id").is_some());
    let body: Value = resp.json().await.expect("json");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("Unrecognized request URL (GET: /v1/foo)"))
    );
    // nothing failed created anything
    assert_eq!(emu.stats().await["objects"]["issuing.card"], 0);
}

#[tokio::test]
async fn raw_form_encodings_and_basic_auth() {
    let emu = Running::start().await;
    let client = emu.client();
    let holder = cardholder(&client).await;
    let form = |body: &str| {
        emu.http
            .post(format!("{}/v1/issuing/cards", emu.base))
            .basic_auth("sk_test_123", Option::<&str>::None)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(body.to_owned())
            .send()
    };
    let body = format!(
        "cardholder={}&currency=usd&type=virtual&spending_controls%5Bspending_limits%5D%5B%5D%5Bamount%5D=100&spending_controls%5Bspending_limits%5D%5B%5D%5Binterval%5D=per_authorization&spending_controls[blocked_merchant_countries][]=RU&metadata[note]=a+b%26c",
        holder.id.as_str()
    );
    let resp = form(&body).await.expect("create");
    assert_eq!(resp.status(), 200);
    let card: Value = resp.json().await.expect("json");
    assert_eq!(
        card["spending_controls"]["spending_limits"][0]["amount"],
        100
    );
    assert_eq!(
        card["spending_controls"]["blocked_merchant_countries"],
        json!(["RU"])
    );
    assert_eq!(card["metadata"]["note"], "a b&c");
    assert!(card.get("number").is_none());
    let id = card["id"].as_str().expect("id");

    let get = |query: &str| {
        emu.http
            .get(format!("{}/v1/issuing/cards/{id}?{query}", emu.base))
            .bearer_auth("sk_test_123")
            .send()
    };
    for query in [
        "expand[]=number&expand[]=cvc",
        "expand%5B%5D=number&expand%5B%5D=cvc",
        "expand[0]=number&expand[1]=cvc",
    ] {
        let full: Value = get(query).await.expect("get").json().await.expect("json");
        let number = full["number"].as_str().expect("number");
        assert!(luhn_valid(number), "{query}");
        assert!(full["cvc"].is_string(), "{query}");
    }
    let list: Value = emu
        .http
        .get(format!(
            "{}/v1/issuing/cards?expand[]=data.cardholder",
            emu.base
        ))
        .bearer_auth("sk_test_123")
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert_eq!(list["object"], "list");
    assert!(list["data"][0].get("number").is_none());

    let resp = form("currency=usd&type=virtual&bogus=1")
        .await
        .expect("unknown param");
    assert_eq!(resp.status(), 400);
    let err: Value = resp.json().await.expect("json");
    assert_eq!(err["error"]["code"], "parameter_unknown");
}

#[tokio::test]
async fn reset_clears_everything() {
    let emu = Running::start().await;
    let client = emu.client();
    let holder = cardholder(&client).await;
    virtual_card(&holder).send(&client).await.expect("card");
    emu.fail_next(500, "GET", "/v1/", 5).await;
    emu.control(reqwest::Method::POST, "/_emulator/reset", None)
        .await;
    let stats = emu.stats().await;
    assert_eq!(stats["objects"]["issuing.card"], 0);
    assert_eq!(stats["requests"], json!({}));
    let faults = emu
        .control(reqwest::Method::GET, "/_emulator/faults", None)
        .await;
    assert_eq!(faults["fail_next"], json!([]));
    let listed = ListIssuingCard::new().send(&client).await.expect("list");
    assert!(listed.data.is_empty());
}

/// Connect OAuth tokens like Stripe's: a random publishable key, Bearer or Basic auth,
/// revocation for good (also when the same account connects again), Stripe's 401 shapes,
/// and error descriptions that never repeat codes or tokens.
#[tokio::test]
async fn oauth_tokens_are_revoked_for_good() {
    let emu = Running::start().await;
    let platform = "sk_test_platform";
    let authorize = |account: Option<&str>| {
        let mut url = format!(
            "{}/oauth/authorize?response_type=code&client_id=ca_test&scope=read_write&redirect_uri=http://127.0.0.1:1/cb&state=s&auto=approve",
            emu.base
        );
        if let Some(a) = account {
            url.push_str(&format!("&stripe_user_id={a}"));
        }
        url
    };
    let no_redirect = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let code_of = |location: &str| {
        location
            .split(['?', '&'])
            .find_map(|p| p.strip_prefix("code="))
            .unwrap()
            .to_string()
    };
    let token = |form: Vec<(&'static str, String)>| {
        let http = emu.http.clone();
        let base = emu.base.clone();
        async move {
            let r = http
                .post(format!("{base}/oauth/token"))
                .bearer_auth(platform)
                .form(&form)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let connect = |account: Option<&'static str>| {
        let no_redirect = no_redirect.clone();
        let url = authorize(account);
        let token = &token;
        async move {
            let r = no_redirect.get(url).send().await.unwrap();
            let code = code_of(r.headers()["location"].to_str().unwrap());
            let (status, v) = token(vec![
                ("grant_type", "authorization_code".into()),
                ("code", code.clone()),
            ])
            .await;
            assert_eq!(status, 200, "{v}");
            (code, v)
        }
    };
    let get = |auth: reqwest::RequestBuilder| async move {
        let r = auth.send().await.unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    let cards = format!("{}/v1/issuing/cards?limit=1", emu.base);

    let (code, first) = connect(None).await;
    let access = first["access_token"].as_str().unwrap().to_string();
    let refresh = first["refresh_token"].as_str().unwrap().to_string();
    let account = first["stripe_user_id"].as_str().unwrap().to_string();
    let pk = first["stripe_publishable_key"].as_str().unwrap();
    assert!(pk.starts_with("pk_test_"));
    assert!(
        !access.ends_with(&pk["pk_test_".len()..]),
        "not derived from the token"
    );
    // Bearer and Basic (the key as user name) both act on the connected account.
    let (status, _) = get(emu.http.get(&cards).bearer_auth(&access)).await;
    assert_eq!(status, 200);
    let (status, _) = get(emu.http.get(&cards).basic_auth(&access, None::<&str>)).await;
    assert_eq!(status, 200);
    // A code is single-use, and the error does not repeat it.
    let (status, v) = token(vec![
        ("grant_type", "authorization_code".into()),
        ("code", code.clone()),
    ])
    .await;
    assert_eq!((status, v["error"].as_str()), (400, Some("invalid_grant")));
    assert!(!v.to_string().contains(&code), "{v}");
    // Refresh: a new access token; the old one stays valid (not rotation).
    let (status, refreshed) = token(vec![
        ("grant_type", "refresh_token".into()),
        ("refresh_token", refresh.clone()),
    ])
    .await;
    assert_eq!(status, 200, "{refreshed}");
    let access2 = refreshed["access_token"].as_str().unwrap().to_string();
    assert_ne!(access2, access);
    assert_eq!(
        refreshed["stripe_publishable_key"],
        first["stripe_publishable_key"]
    );
    let (status, _) = get(emu.http.get(&cards).bearer_auth(&access)).await;
    assert_eq!(status, 200);

    // Deauthorized: every token of the connection is refused, Stripe's way.
    let r = emu
        .http
        .post(format!("{}/oauth/deauthorize", emu.base))
        .bearer_auth(platform)
        .form(&[
            ("client_id", "ca_test"),
            ("stripe_user_id", account.as_str()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for t in [&access, &access2] {
        let (status, v) = get(emu.http.get(&cards).bearer_auth(t)).await;
        assert_eq!(status, 401, "{v}");
        assert_eq!(v["error"]["code"], "api_key_expired", "{v}");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(!v.to_string().contains(t.as_str()), "{v}");
    }
    let (status, v) = token(vec![
        ("grant_type", "refresh_token".into()),
        ("refresh_token", refresh.clone()),
    ])
    .await;
    assert_eq!((status, v["error"].as_str()), (400, Some("invalid_grant")));
    assert!(!v.to_string().contains(&refresh), "{v}");
    // Deauthorizing again: invalid_client, without echoing the account.
    let r = emu
        .http
        .post(format!("{}/oauth/deauthorize", emu.base))
        .bearer_auth(platform)
        .form(&[
            ("client_id", "ca_test"),
            ("stripe_user_id", account.as_str()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "invalid_client");

    // The same account connects again: new tokens; the old ones stay revoked.
    let account_static: &'static str = Box::leak(account.clone().into_boxed_str());
    let (_, again) = connect(Some(account_static)).await;
    assert_eq!(again["stripe_user_id"], account.as_str());
    let access3 = again["access_token"].as_str().unwrap();
    assert!(![&access, &access2].contains(&&access3.to_string()));
    assert_ne!(
        again["stripe_publishable_key"],
        first["stripe_publishable_key"]
    );
    let (status, _) = get(emu.http.get(&cards).bearer_auth(access3)).await;
    assert_eq!(status, 200);
    let (status, v) = get(emu.http.get(&cards).bearer_auth(&access)).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (401, Some("api_key_expired"))
    );
    // An OAuth token the emulator never issued is not a platform key.
    let (status, v) = get(emu
        .http
        .get(&cards)
        .bearer_auth("sk_test_oauthNEVERISSUEDxxxxxxxxxxxxxxxxxxxxx"))
    .await;
    assert_eq!(status, 401, "{v}");
    // Nor can a revoked token authenticate the OAuth endpoints as a platform.
    let r = emu
        .http
        .post(format!("{}/oauth/token", emu.base))
        .bearer_auth(&access)
        .form(&[("grant_type", "refresh_token"), ("refresh_token", "rt_x")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}
