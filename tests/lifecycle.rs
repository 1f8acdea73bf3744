#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]
//! Concurrency, expiry and crash recovery with real redb files and the emulator.

mod common;

use std::sync::Arc;

use common::*;
use roony::domain::time::Period;
use roony::policy::{BudgetRule, Policy};
use roony::service::{AgentIdentity, StatusView};
use roony::store::{Decided, IntentStatus, Store};
use serde_json::json;

fn tight_policy(daily: i64) -> Policy {
    let mut p = demo_policy();
    p.max_per_transaction = None;
    p.budgets = vec![BudgetRule {
        period: Period::Daily,
        limit: daily,
    }];
    p.card_buffer_bps = 0;
    p
}

/// 240 concurrent intents of USD 2.50 against a USD 100.00 budget: exactly 40 approved.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_overspend_under_concurrency() {
    let emu = start_emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let sc =
        Arc::new(start_sidecar(dir.path(), &emu, TestClock::new(), tight_policy(10_000)).await);
    let mut tasks = Vec::new();
    for i in 0..240 {
        let sc = sc.clone();
        tasks.push(tokio::spawn(async move {
            let mut body = purchase(250);
            body["description"] = json!(format!("item {i}"));
            sc.post("/api/v1/purchase_intent", body).await
        }));
    }
    let mut approved = 0;
    let mut declined = 0;
    for t in tasks {
        let (status, body) = t.await.unwrap();
        match status {
            201 => approved += 1,
            402 => {
                assert_eq!(body["reasons"][0]["code"], "exceeds_budget", "{body}");
                declined += 1
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(approved, 40);
    assert_eq!(declined, 200);
    let (_, budget) = sc.get("/api/v1/budget").await;
    assert_eq!(budget["budgets"][0]["committed"], 10_000);
    assert_eq!(budget["budgets"][0]["remaining"], 0);
    assert_eq!(emu.cards().await.len(), 40);
}

#[tokio::test]
async fn unused_cards_expire_and_release_even_across_a_restart() {
    let emu = start_emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new();
    let agent = AgentIdentity {
        agent_id: "agt_test".into(),
    };
    let (intent_id, card_id) = {
        let store = Store::open(&dir.path().join("sidecar.redb")).unwrap();
        let svc = service(store, &emu, clock.clone());
        svc.create_agent("agt_test", "t", tight_policy(10_000), None)
            .unwrap();
        let req = serde_json::from_value(purchase(3_000)).unwrap();
        let out = svc.request_purchase(&agent, req, None).await.unwrap();
        assert_eq!(out.intent.status, StatusView::Approved);
        // Not yet due.
        clock.advance(3_599);
        assert_eq!(svc.expire_due().await.unwrap(), 0);
        (out.intent.id, out.intent.card.unwrap().id)
        // The service and its store are dropped here: a restart.
    };
    clock.advance(2);
    let store = Store::open(&dir.path().join("sidecar.redb")).unwrap();
    let svc = service(store, &emu, clock.clone());
    assert_eq!(
        svc.budget(&agent).unwrap().budgets[0].committed,
        3_000,
        "reservation survived"
    );
    assert_eq!(svc.expire_due().await.unwrap(), 1);
    let got = svc.get_purchase(&agent, &intent_id).await.unwrap();
    assert_eq!(got.status, StatusView::Expired);
    assert!(
        got.reasons
            .iter()
            .any(|r| r.code.as_str() == "intent_expired")
    );
    assert_eq!(emu.card(&card_id).await["status"], "canceled");
    assert_eq!(svc.budget(&agent).unwrap().budgets[0].committed, 0);
    assert_eq!(svc.expire_due().await.unwrap(), 0, "expires once");
}

#[tokio::test]
async fn expiry_retries_while_stripe_is_down() {
    let emu = start_emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new();
    let agent = AgentIdentity {
        agent_id: "agt_test".into(),
    };
    let store = Store::open(&dir.path().join("sidecar.redb")).unwrap();
    let svc = service(store, &emu, clock.clone());
    svc.create_agent("agt_test", "t", tight_policy(10_000), None)
        .unwrap();
    let out = svc
        .request_purchase(
            &agent,
            serde_json::from_value(purchase(1_000)).unwrap(),
            None,
        )
        .await
        .unwrap();
    clock.advance(3_601);
    emu.faults(json!({"rate_500": 1.0})).await;
    assert_eq!(svc.expire_due().await.unwrap(), 0);
    // The card may still be used while it is not canceled, so the money stays reserved.
    assert_eq!(svc.budget(&agent).unwrap().budgets[0].committed, 1_000);
    emu.faults(json!({})).await;
    assert_eq!(svc.expire_due().await.unwrap(), 1);
    assert_eq!(
        svc.get_purchase(&agent, &out.intent.id)
            .await
            .unwrap()
            .status,
        StatusView::Expired
    );
}

/// A crash after the reservation was written but before the card was recorded: start-up
/// recovery finishes the issuance with the same Stripe idempotency key, so the card Stripe
/// may already have made is found, never made twice.
#[tokio::test]
async fn interrupted_issuance_is_recovered_without_a_second_card() {
    let emu = start_emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new();
    let path = dir.path().join("sidecar.redb");
    let (a, b) = {
        let store = Store::open(&path).unwrap();
        let svc = service(store.clone(), &emu, clock.clone());
        svc.create_agent("agt_test", "t", tight_policy(10_000), None)
            .unwrap();
        let decide = |amount: i64| {
            let intent =
                serde_json::from_value::<roony::domain::intent::PurchaseRequest>(purchase(amount))
                    .unwrap()
                    .validate(None)
                    .unwrap();
            match store
                .decide(
                    "agt_test",
                    intent,
                    clock.0.load(std::sync::atomic::Ordering::SeqCst),
                    &roony::service::ids::intent_id,
                    Default::default(),
                )
                .unwrap()
            {
                Decided::New(r) => r,
                Decided::Replay(_) => unreachable!(),
            }
        };
        // (a) crashed before calling Stripe; (b) crashed after Stripe made the card.
        let a = decide(1_000);
        let b = decide(2_000);
        let issuer = roony::issuer::Issuer::new(stripe_config(&emu)).unwrap();
        let holder = issuer
            .create_cardholder("agt_test", "t", &Default::default())
            .await
            .unwrap();
        // Exactly what the sidecar sends (a standalone sidecar's card says when it expires).
        let spec = roony::issuer::CardSpec {
            metadata: std::collections::BTreeMap::from([(
                "roony_expires".to_string(),
                b.expires_at.unwrap().to_string(),
            )]),
            intent_id: b.id.clone(),
            agent_id: "agt_test".into(),
            cardholder: holder,
            currency: roony::domain::money::Currency::USD,
            spending_limit: 2_000,
            allowed_categories: vec![],
            blocked_categories: vec!["betting_casino_gambling".into()],
            allowed_countries: vec!["US".into()],
            blocked_countries: vec![],
            idempotency_key: b.stripe_idempotency_key.clone(),
        };
        let made = issuer.create_card(&spec).await.unwrap();
        assert_eq!(emu.cards().await.len(), 1);
        (a.id, (b.id, made.id))
    };
    let store = Store::open(&path).unwrap();
    let svc = service(store.clone(), &emu, clock.clone());
    assert_eq!(svc.recover().await.unwrap(), 2);
    let ra = store.intent(&a).unwrap().unwrap();
    let rb = store.intent(&b.0).unwrap().unwrap();
    assert_eq!(ra.status, IntentStatus::Approved);
    assert_eq!(rb.status, IntentStatus::Approved);
    assert_eq!(
        rb.card.unwrap().id,
        b.1,
        "the card Stripe already made was adopted"
    );
    assert_eq!(emu.cards().await.len(), 2, "one card per intent");
    assert!(store.issuing().unwrap().is_empty());
    assert_eq!(svc.recover().await.unwrap(), 0);
}
