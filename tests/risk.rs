#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]
//! Risk scores end to end: a real sidecar (HTTP API, redb history) deciding purchases whose
//! score and signals the agent sees in every response.

mod common;

use common::*;
use roony::domain::time::Period;
use roony::policy::{BudgetRule, Policy};
use serde_json::{Value, json};

fn policy() -> Policy {
    let mut p = demo_policy(); // max_per_transaction USD 100.00
    p.budgets = vec![BudgetRule {
        period: Period::Daily,
        limit: 1_000_000,
    }];
    p
}

fn signals(body: &Value) -> Vec<String> {
    body["risk"]["signals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["code"].as_str().unwrap().to_string())
        .collect()
}

fn score(body: &Value) -> u64 {
    body["risk"]["score"].as_u64().unwrap()
}

#[tokio::test]
async fn split_purchase_attack_is_flagged_then_declined() {
    let emu = start_emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new();
    let mut p = policy();
    p.risk.require_approval_above = 50;
    p.risk.decline_above = 70;
    let sc = start_sidecar(dir.path(), &emu, clock.clone(), p).await;

    // Just under the USD 100.00 per-purchase limit, at one merchant, a minute apart.
    let (status, first) = sc.buy(9_500, json!({})).await;
    assert_eq!(status, 201, "{first}");
    assert_eq!(score(&first), 0);
    assert_eq!(first["risk"]["signals"], json!([]));

    clock.advance(60);
    let (status, second) = sc.buy(9_500, json!({})).await;
    assert_eq!(status, 201, "{second}");
    assert_eq!(second["status"], "approved");
    assert_eq!(signals(&second), ["split_purchase"]);
    assert_eq!(score(&second), 35);
    let message = second["risk"]["signals"][0]["message"].as_str().unwrap();
    assert!(
        message.contains("2 purchases at \"Namecheap\" within 600 seconds add up to USD 190.00"),
        "{message}"
    );
    assert_eq!(second["risk"]["signals"][0]["contribution"], 35);

    clock.advance(60);
    let (status, third) = sc.buy(9_500, json!({})).await;
    assert_eq!(status, 202, "{third}");
    assert_eq!(third["status"], "pending_approval");
    assert_eq!(third["reasons"][0]["code"], "risk_review_required");
    assert_eq!(score(&third), 55);

    clock.advance(60);
    let (status, fourth) = sc.buy(9_500, json!({})).await;
    assert_eq!(status, 402, "{fourth}");
    assert_eq!(fourth["status"], "declined");
    assert_eq!(fourth["reasons"][0]["code"], "risk_too_high");
    let why = fourth["reasons"][0]["message"].as_str().unwrap();
    assert!(
        why.contains("risk score 75 is above this agent's limit of 70: split_purchase (+75)"),
        "{why}"
    );
    assert!(fourth.get("card").is_none());

    // Past the window, the same merchant is fine again.
    clock.advance(3_600);
    let (status, later) = sc.buy(9_500, json!({})).await;
    assert_eq!(status, 201, "{later}");
    assert!(!signals(&later).contains(&"split_purchase".to_string()));

    // The ledger keeps the score: GET and the list show it.
    let id = fourth["id"].as_str().unwrap();
    let (_, got) = sc.get(&format!("/api/v1/purchase_intents/{id}")).await;
    assert_eq!(got["risk"], fourth["risk"]);
    let (_, list) = sc.get("/api/v1/purchase_intents").await;
    let listed = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == id)
        .unwrap();
    assert_eq!(listed["risk"]["score"], 75);
}

#[tokio::test]
async fn a_decline_streak_raises_the_score() {
    let emu = start_emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new();
    let sc = start_sidecar(dir.path(), &emu, clock.clone(), policy()).await;

    let mut scores = Vec::new();
    for round in 0..3 {
        // Three probes over the per-purchase limit, two minutes apart ...
        for _ in 0..3 {
            clock.advance(120);
            let (_, d) = sc.buy(20_000, json!({})).await;
            assert_eq!(d["status"], "declined", "{d}");
            assert_eq!(d["reasons"][0]["code"], "exceeds_transaction_limit");
        }
        // ... then a look at the score of what comes next (declined too, in another
        // currency, so the streak goes on).
        clock.advance(120);
        let (_, probe) = sc.buy(1_000, json!({"currency": "eur"})).await;
        assert_eq!(probe["status"], "declined", "{probe}");
        assert!(
            signals(&probe).contains(&"decline_streak".to_string()),
            "{round}: {probe}"
        );
        scores.push(score(&probe));
    }
    // 3, 7 and 11 declines in a row: +15, +25, +35.
    assert_eq!(scores, [15, 25, 35]);

    // An ordinary purchase after the streak is still approved (35 is below 70) and says why
    // the score is what it is.
    clock.advance(120);
    let (status, ok) = sc.buy(1_000, json!({})).await;
    assert_eq!(status, 201, "{ok}");
    assert_eq!(score(&ok), 35);
    let message = ok["risk"]["signals"][0]["message"].as_str().unwrap();
    assert!(
        message.contains("the last 12 purchase requests were declined"),
        "{message}"
    );
    // The approval ends the streak.
    clock.advance(120);
    let (_, next) = sc.buy(1_000, json!({})).await;
    assert_eq!(score(&next), 0, "{next}");
}

#[tokio::test]
async fn gift_cards_at_a_software_merchant_are_flagged() {
    let emu = start_emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let sc = start_sidecar(dir.path(), &emu, TestClock::new(), policy()).await;
    let (status, body) = sc
        .buy(
            5_000,
            json!({
                "merchant": {
                    "name": "JetBrains",
                    "url": "https://www.jetbrains.com/shop",
                    "country": "US",
                    "category": "computer_software_stores"
                },
                "description": "5 Amazon gift cards for the team"
            }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(signals(&body), ["category_mismatch"]);
    assert_eq!(score(&body), 30);
    let message = body["risk"]["signals"][0]["message"].as_str().unwrap();
    assert!(
        message.contains("\"gift card\"") && message.contains("computer_software_stores"),
        "{message}"
    );

    // The same at a gift card shop is consistent.
    let (_, body) = sc
        .buy(
            5_000,
            json!({
                "merchant": {"name": "Gift Card Mall", "category": "gift_card_novelty_and_souvenir_shops"},
                "description": "5 Amazon gift cards for the team"
            }),
        )
        .await;
    assert!(
        !signals(&body).contains(&"category_mismatch".to_string()),
        "{body}"
    );
}

#[tokio::test]
async fn normal_repeat_purchases_stay_low() {
    let emu = start_emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new();
    let sc = start_sidecar(dir.path(), &emu, clock.clone(), policy()).await;
    for i in 0..12 {
        let (status, body) = sc.buy(1_200 + i * 10, json!({})).await;
        assert_eq!(status, 201, "{body}");
        assert_eq!(body["status"], "approved");
        assert_eq!(score(&body), 0, "{body}");
        assert_eq!(body["risk"]["signals"], json!([]));
        clock.advance(3 * 3_600);
    }
}
