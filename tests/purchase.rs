#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]
//! The agent API end to end: a real sidecar (axum, redb, moka) issuing cards through the
//! real async-stripe client against the Stripe emulator.

mod common;

use common::*;
use serde_json::json;

#[tokio::test]
async fn approved_purchase_returns_a_card_once() {
    let emu = start_emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let sc = start_sidecar(dir.path(), &emu, TestClock::new(), demo_policy()).await;

    let (status, body) = sc.buy(1200, json!({})).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["status"], "approved");
    assert_eq!(body["reasons"][0]["code"], "within_policy");
    let card = &body["card"];
    let number = card["number"].as_str().unwrap();
    assert!(luhn(number), "card number passes Luhn");
    assert_eq!(&number[number.len() - 4..], card["last4"].as_str().unwrap());
    assert_eq!(card["cvc"].as_str().unwrap().len(), 3);
    assert!(card["exp_month"].as_i64().unwrap() >= 1);
    assert!(card["exp_year"].as_i64().unwrap() >= 2026);
    assert_eq!(card["billing_zip"], "94103");
    // 1% buffer on top of the amount.
    assert_eq!(card["spending_limit"], 1212);

    // The card at Stripe: active, virtual, limited to the approved amount, linked to the
    // intent, gambling blocked (the policy's deny list), merchant country pinned.
    let at_stripe = emu.card(card["id"].as_str().unwrap()).await;
    assert_eq!(at_stripe["status"], "active");
    assert_eq!(at_stripe["type"], "virtual");
    assert_eq!(at_stripe["metadata"]["roony_intent_id"], body["id"]);
    assert_eq!(
        at_stripe["spending_controls"]["spending_limits"][0]["amount"],
        1212
    );
    assert_eq!(
        at_stripe["spending_controls"]["spending_limits"][0]["interval"],
        "all_time"
    );
    assert_eq!(
        at_stripe["spending_controls"]["blocked_categories"],
        json!(["betting_casino_gambling"])
    );
    assert_eq!(
        at_stripe["spending_controls"]["allowed_merchant_countries"],
        json!(["US"])
    );
    assert!(at_stripe.get("number").is_none_or(|n| n.is_null()));

    // GET never shows the number again.
    let id = body["id"].as_str().unwrap();
    let (status, got) = sc.get(&format!("/api/v1/purchase_intents/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(got["status"], "approved");
    assert_eq!(got["card"]["last4"], card["last4"]);
    assert!(got["card"].get("number").is_none());
    assert!(got["card"].get("cvc").is_none());

    // The budget shows the reservation.
    let (_, budget) = sc.get("/api/v1/budget").await;
    assert_eq!(budget["budgets"][0]["committed"], 1212);
    assert_eq!(budget["budgets"][0]["remaining"], 25_000 - 1212);
    assert!(
        budget["summary"]
            .as_str()
            .unwrap()
            .contains("USD 237.88 left")
    );
}

#[tokio::test]
async fn category_with_intent_is_pinned_on_the_card() {
    let emu = start_emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let sc = start_sidecar(dir.path(), &emu, TestClock::new(), demo_policy()).await;
    let mut body = purchase(500);
    body["merchant"]["mcc"] = json!("5734");
    let (status, resp) = sc.post("/api/v1/purchase_intent", body).await;
    assert_eq!(status, 201, "{resp}");
    assert_eq!(resp["merchant"]["category"], "computer_software_stores");
    let at_stripe = emu.card(resp["card"]["id"].as_str().unwrap()).await;
    assert_eq!(
        at_stripe["spending_controls"]["allowed_categories"],
        json!(["computer_software_stores"])
    );
}

#[tokio::test]
async fn declines_are_402_with_every_reason() {
    let emu = start_emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let sc = start_sidecar(dir.path(), &emu, TestClock::new(), demo_policy()).await;

    let mut body = purchase(15_000);
    body["merchant"]["category"] = json!("betting_casino_gambling");
    let (status, resp) = sc.post("/api/v1/purchase_intent", body).await;
    assert_eq!(status, 402, "{resp}");
    assert_eq!(resp["status"], "declined");
    assert_eq!(resp["error"]["code"], "purchase_declined");
    let codes: Vec<&str> = resp["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["code"].as_str().unwrap())
        .collect();
    assert_eq!(codes, ["exceeds_transaction_limit", "category_not_allowed"]);
    assert!(
        resp["reasons"][0]["message"]
            .as_str()
            .unwrap()
            .contains("USD 100.00")
    );
    assert!(resp.get("card").is_none());
    assert!(emu.cards().await.is_empty(), "no card for a decline");

    // Budget: two approvals of 100.00 leave 48.00 (1% buffers), so 60.00 is declined with
    // the remaining amount in the message.
    assert_eq!(sc.buy(10_000, json!({})).await.0, 201);
    assert_eq!(sc.buy(10_000, json!({})).await.0, 201);
    let (status, resp) = sc.buy(6_000, json!({})).await;
    assert_eq!(status, 402);
    assert_eq!(resp["reasons"][0]["code"], "exceeds_budget");
    let msg = resp["reasons"][0]["message"].as_str().unwrap();
    assert!(msg.contains("daily budget has USD 48.00 left"), "{msg}");
    // The declined intent is recorded and readable.
    let id = resp["id"].as_str().unwrap();
    let (status, got) = sc.get(&format!("/api/v1/purchase_intents/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(got["status"], "declined");
}

#[tokio::test]
async fn pending_approval_reserves_without_a_card() {
    let emu = start_emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let mut policy = demo_policy();
    policy.require_approval_above = Some(5_000);
    let sc = start_sidecar(dir.path(), &emu, TestClock::new(), policy).await;
    let (status, resp) = sc.buy(8_000, json!({})).await;
    assert_eq!(status, 202, "{resp}");
    assert_eq!(resp["status"], "pending_approval");
    assert_eq!(resp["reasons"][0]["code"], "approval_required");
    assert!(resp.get("card").is_none());
    let (_, budget) = sc.get("/api/v1/budget").await;
    assert_eq!(budget["budgets"][0]["committed"], 8_080);
    // Canceling a pending intent releases it.
    let id = resp["id"].as_str().unwrap();
    let (status, c) = sc
        .post(&format!("/api/v1/purchase_intents/{id}/cancel"), json!({}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(c["status"], "canceled");
    let (_, budget) = sc.get("/api/v1/budget").await;
    assert_eq!(budget["budgets"][0]["committed"], 0);
}

#[tokio::test]
async fn cancel_cancels_the_card_and_releases_the_budget() {
    let emu = start_emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let sc = start_sidecar(dir.path(), &emu, TestClock::new(), demo_policy()).await;
    let (_, resp) = sc.buy(2_000, json!({})).await;
    let id = resp["id"].as_str().unwrap();
    let card_id = resp["card"]["id"].as_str().unwrap();
    let (status, c) = sc
        .post(&format!("/api/v1/purchase_intents/{id}/cancel"), json!({}))
        .await;
    assert_eq!(status, 200, "{c}");
    assert_eq!(c["status"], "canceled");
    assert!(
        c["reasons"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["code"] == "intent_canceled")
    );
    assert_eq!(emu.card(card_id).await["status"], "canceled");
    let (_, budget) = sc.get("/api/v1/budget").await;
    assert_eq!(budget["budgets"][0]["committed"], 0);
    // Canceling again is idempotent; a declined intent cannot be canceled.
    let (status, _) = sc
        .post(&format!("/api/v1/purchase_intents/{id}/cancel"), json!({}))
        .await;
    assert_eq!(status, 200);
    let (_, declined) = sc.buy(50_000, json!({})).await;
    let did = declined["id"].as_str().unwrap();
    let (status, e) = sc
        .post(&format!("/api/v1/purchase_intents/{did}/cancel"), json!({}))
        .await;
    assert_eq!(status, 409);
    assert_eq!(e["error"]["code"], "intent_not_cancelable");
}

#[tokio::test]
async fn idempotent_retries_never_make_two_cards() {
    let emu = start_emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let sc = start_sidecar(dir.path(), &emu, TestClock::new(), demo_policy()).await;
    let (s1, a) = sc.buy(3_000, json!({"idempotency_key": "order-42"})).await;
    assert_eq!(s1, 201);
    let (s2, b) = sc.buy(3_000, json!({"idempotency_key": "order-42"})).await;
    assert_eq!(s2, 200, "replay");
    assert_eq!(a["id"], b["id"]);
    assert_eq!(a["card"]["id"], b["card"]["id"]);
    assert_eq!(
        a["card"]["number"], b["card"]["number"],
        "the replay returns the same card"
    );
    assert_eq!(emu.cards().await.len(), 1);
    let (_, budget) = sc.get("/api/v1/budget").await;
    assert_eq!(budget["budgets"][0]["committed"], 3_030, "reserved once");

    // The header form is the same key.
    let r = sc
        .client
        .post(format!("{}/api/v1/purchase_intent", sc.url))
        .bearer_auth(&sc.key)
        .header("Idempotency-Key", "order-42")
        .json(&purchase(3_000))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["idempotent-replayed"], "true");

    // Same key, different body: refused, nothing changes.
    let (s3, e) = sc.buy(3_001, json!({"idempotency_key": "order-42"})).await;
    assert_eq!(s3, 422);
    assert_eq!(e["error"]["code"], "idempotency_key_reused");
    assert_eq!(emu.cards().await.len(), 1);
}

#[tokio::test]
async fn transient_stripe_errors_are_retried_with_backoff() {
    let emu = start_emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let sc = start_sidecar(dir.path(), &emu, TestClock::new(), demo_policy()).await;
    emu.faults(json!({"fail_next": [
        {"status": 429, "method": "POST", "path_prefix": "/v1/issuing/cards", "count": 2}
    ]}))
    .await;
    let (status, body) = sc.buy(1_000, json!({})).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(emu.cards().await.len(), 1);
}

#[tokio::test]
async fn failed_card_creation_fails_the_intent_and_a_retry_is_safe() {
    let emu = start_emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let sc = start_sidecar(dir.path(), &emu, TestClock::new(), demo_policy()).await;
    emu.faults(json!({"fail_next": [
        {"status": 500, "method": "POST", "path_prefix": "/v1/issuing/cards", "count": 50}
    ]}))
    .await;
    let (status, body) = sc.buy(4_000, json!({"idempotency_key": "k-fail"})).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["status"], "failed");
    assert_eq!(body["error"]["code"], "card_issuance_failed");
    assert!(
        body["reasons"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["code"] == "card_issuance_failed")
    );
    let (_, budget) = sc.get("/api/v1/budget").await;
    assert_eq!(budget["budgets"][0]["committed"], 0, "reservation released");
    assert!(emu.cards().await.is_empty());

    // Stripe recovers; the same key retries the same intent and gets one card.
    emu.faults(json!({})).await;
    let (status, again) = sc.buy(4_000, json!({"idempotency_key": "k-fail"})).await;
    assert_eq!(status, 201, "{again}");
    assert_eq!(again["id"], body["id"]);
    assert!(luhn(again["card"]["number"].as_str().unwrap()));
    let (_, budget) = sc.get("/api/v1/budget").await;
    assert_eq!(budget["budgets"][0]["committed"], 4_040);
    let (status, third) = sc.buy(4_000, json!({"idempotency_key": "k-fail"})).await;
    assert_eq!(status, 200);
    assert_eq!(third["card"]["id"], again["card"]["id"]);
    assert_eq!(emu.cards().await.len(), 1);
}

#[tokio::test]
async fn listing_is_paginated_newest_first() {
    let emu = start_emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let sc = start_sidecar(dir.path(), &emu, TestClock::new(), demo_policy()).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let (_, b) = sc.buy(100 + i, json!({})).await;
        ids.push(b["id"].as_str().unwrap().to_string());
    }
    let (status, page) = sc.get("/api/v1/purchase_intents?limit=2").await;
    assert_eq!(status, 200);
    let got: Vec<&str> = page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, [ids[4].as_str(), ids[3].as_str()]);
    assert_eq!(page["has_more"], true);
    let cursor = page["next_cursor"].as_str().unwrap();
    let (_, page2) = sc
        .get(&format!(
            "/api/v1/purchase_intents?limit=10&starting_after={cursor}"
        ))
        .await;
    let got: Vec<&str> = page2["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, [ids[2].as_str(), ids[1].as_str(), ids[0].as_str()]);
    assert_eq!(page2["has_more"], false);
    let (status, e) = sc.get("/api/v1/purchase_intents?limit=0").await;
    assert_eq!(status, 400);
    assert_eq!(e["error"]["code"], "invalid_query");
}

#[tokio::test]
async fn authentication_is_required_and_scoped() {
    let emu = start_emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let sc = start_sidecar(dir.path(), &emu, TestClock::new(), demo_policy()).await;
    let url = format!("{}/api/v1/purchase_intent", sc.url);
    let r = sc
        .client
        .post(&url)
        .json(&purchase(100))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().contains_key("www-authenticate"));
    let e: serde_json::Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "missing_agent_key");
    for bad in [
        "roony_ak_0000000000000000_0000",
        "nope",
        &format!("{}x", sc.key),
    ] {
        let r = sc
            .client
            .post(&url)
            .bearer_auth(bad)
            .json(&purchase(100))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        let e: serde_json::Value = r.json().await.unwrap();
        assert_eq!(e["error"]["code"], "invalid_agent_key");
    }
    let r = sc
        .client
        .get(format!("{}/api/v1/budget", sc.url))
        .header("Authorization", "Basic abc")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // Another agent cannot see this agent's intents.
    let (_, mine) = sc.buy(100, json!({})).await;
    let other = sc
        .service
        .create_agent("agt_other", "other", demo_policy(), None)
        .unwrap();
    let r = sc
        .client
        .get(format!(
            "{}/api/v1/purchase_intents/{}",
            sc.url,
            mine["id"].as_str().unwrap()
        ))
        .bearer_auth(other)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn bad_input_gets_a_clear_4xx_and_writes_nothing() {
    let emu = start_emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let sc = start_sidecar(dir.path(), &emu, TestClock::new(), demo_policy()).await;
    let url = format!("{}/api/v1/purchase_intent", sc.url);
    let long = "x".repeat(1001);
    let cases: Vec<(serde_json::Value, u16, &str)> = vec![
        (
            json!({"amount": 0, "currency": "usd", "merchant": {"name": "a"}, "description": "d"}),
            422,
            "invalid_amount",
        ),
        (
            json!({"amount": -5, "currency": "usd", "merchant": {"name": "a"}, "description": "d"}),
            422,
            "invalid_amount",
        ),
        (
            json!({"amount": 100_000_000_000i64, "currency": "usd", "merchant": {"name": "a"}, "description": "d"}),
            422,
            "amount_too_large",
        ),
        (
            json!({"amount": 12.5, "currency": "usd", "merchant": {"name": "a"}, "description": "d"}),
            422,
            "invalid_body",
        ),
        (
            json!({"amount": "12", "currency": "usd", "merchant": {"name": "a"}, "description": "d"}),
            422,
            "invalid_body",
        ),
        (
            json!({"amount": 100, "currency": "xyz", "merchant": {"name": "a"}, "description": "d"}),
            422,
            "unknown_currency",
        ),
        (
            json!({"amount": 100, "currency": "dollars", "merchant": {"name": "a"}, "description": "d"}),
            422,
            "invalid_currency",
        ),
        (
            json!({"amount": 100, "currency": "usd", "merchant": {"name": "a"}, "description": long}),
            422,
            "field_too_long",
        ),
        (
            json!({"amount": 100, "currency": "usd", "merchant": {"name": ""}, "description": "d"}),
            422,
            "missing_field",
        ),
        (
            json!({"amount": 100, "currency": "usd", "merchant": {"name": "a", "url": "not a url"}, "description": "d"}),
            422,
            "invalid_merchant_domain",
        ),
        (
            json!({"amount": 100, "currency": "usd", "merchant": {"name": "a", "country": "XX"}, "description": "d"}),
            422,
            "invalid_country",
        ),
        (
            json!({"amount": 100, "currency": "usd", "merchant": {"name": "a", "category": "casinos"}, "description": "d"}),
            422,
            "unknown_category",
        ),
        (
            json!({"amount": 100, "currency": "usd", "merchant": {"name": "a", "mcc": "12"}, "description": "d"}),
            422,
            "invalid_mcc",
        ),
        (
            json!({"amount": 100, "currency": "usd", "merchant": {"name": "a"}, "description": "d", "line_items": [{"description": "x", "quantity": 1, "unit_amount": 99}]}),
            422,
            "line_items_mismatch",
        ),
        (
            json!({"amount": 100, "currency": "usd", "merchant": {"name": "a"}, "description": "d", "surprise": 1}),
            422,
            "invalid_body",
        ),
        (
            json!({"amount": 100, "currency": "usd", "description": "d"}),
            422,
            "invalid_body",
        ),
        (json!([1, 2]), 422, "invalid_body"),
    ];
    for (body, status, code) in cases {
        let r = sc
            .client
            .post(&url)
            .bearer_auth(&sc.key)
            .json(&body)
            .send()
            .await
            .unwrap();
        let got = r.status().as_u16();
        let e: serde_json::Value = r.json().await.unwrap();
        assert_eq!(
            (got, e["error"]["code"].as_str().unwrap()),
            (status, code),
            "{body} → {e}"
        );
        assert!(!e["error"]["message"].as_str().unwrap().is_empty());
    }
    let raw = |body: &'static str, ct: &'static str| {
        sc.client
            .post(&url)
            .bearer_auth(&sc.key)
            .header("content-type", ct)
            .body(body)
            .send()
    };
    let r = raw("{not json", "application/json").await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["error"]["code"],
        "invalid_json"
    );
    let r = raw("amount=1", "application/x-www-form-urlencoded")
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    let huge = format!("{{\"description\": \"{}\"}}", "y".repeat(100_000));
    let r = sc
        .client
        .post(&url)
        .bearer_auth(&sc.key)
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["error"]["code"],
        "body_too_large"
    );
    let r = sc
        .client
        .get(format!("{}/api/v1/nope", sc.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // Nothing was written: no intents, no reservations, no cards.
    let (_, page) = sc.get("/api/v1/purchase_intents").await;
    assert_eq!(page["data"].as_array().unwrap().len(), 0);
    assert!(emu.cards().await.is_empty());
}
