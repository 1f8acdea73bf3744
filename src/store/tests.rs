//! Store tests against a reference model, and durability across reopen.

use super::*;
use crate::domain::intent::{MerchantInput, PurchaseRequest};
use crate::domain::money::Currency;
use crate::policy::{BudgetRule, Policy};

const T0: i64 = 1_795_335_491;

fn store(dir: &tempfile::TempDir) -> Store {
    Store::open(&dir.path().join("s.redb")).unwrap()
}

fn agent(store: &Store, daily: i64) {
    let mut policy = Policy::new(Currency::USD);
    policy.budgets = vec![BudgetRule {
        period: Period::Daily,
        limit: daily,
    }];
    policy.card_buffer_bps = 0;
    store
        .put_agent(&AgentRecord {
            id: "agt_1".into(),
            name: "a".into(),
            status: AgentStatus::Active,
            policy,
            created: T0,
        })
        .unwrap();
}

fn intent(amount: i64, key: Option<&str>) -> PurchaseIntent {
    PurchaseRequest {
        amount,
        currency: "usd".into(),
        merchant: MerchantInput {
            name: "Shop".into(),
            ..Default::default()
        },
        description: "thing".into(),
        line_items: vec![],
        idempotency_key: key.map(str::to_string),
    }
    .validate(None)
    .unwrap()
}

fn new_record(d: Decided) -> IntentRecord {
    match d {
        Decided::New(r) => r,
        Decided::Replay(r) => panic!("unexpected replay of {}", r.id),
    }
}

fn counter() -> impl Fn() -> String {
    let n = std::sync::atomic::AtomicU64::new(0);
    move || {
        format!(
            "pur_{:026}",
            n.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        )
    }
}

fn committed(store: &Store) -> i64 {
    let a = store.agent("agt_1").unwrap().unwrap();
    let p = a.policy.as_ref().unwrap();
    store.budgets("agt_1", p, T0).unwrap()[0].committed
}

/// Random operations against a reference model of the daily budget: committed must always
/// equal the sum of live reservations, and approvals must never exceed the limit.
#[test]
fn reference_model() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(&dir);
    let limit = 50_000;
    agent(&s, limit);
    let ids = counter();
    let mut live: std::collections::HashMap<String, (IntentStatus, i64)> = Default::default();
    let mut seed: u64 = 0x9e3779b97f4a7c15;
    let mut rnd = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    for _ in 0..400 {
        match rnd(4) {
            0 | 1 => {
                let amount = 1 + rnd(9_000) as i64;
                let model_committed: i64 = live
                    .values()
                    .filter(|(st, _)| *st == IntentStatus::Issuing || *st == IntentStatus::Approved)
                    .map(|(_, a)| a)
                    .sum();
                let rec = new_record(
                    s.decide(
                        "agt_1",
                        intent(amount, None),
                        T0,
                        &ids,
                        DecideOptions::default(),
                    )
                    .unwrap(),
                );
                let fits = model_committed + amount <= limit;
                assert_eq!(rec.status == IntentStatus::Issuing, fits, "amount {amount}");
                live.insert(rec.id.clone(), (rec.status, amount));
            }
            2 => {
                let issuing: Vec<String> = live
                    .iter()
                    .filter(|(_, (st, _))| *st == IntentStatus::Issuing)
                    .map(|(k, _)| k.clone())
                    .collect();
                if let Some(id) = issuing.first() {
                    if rnd(2) == 0 {
                        s.fail_issuance(id, Reason::new(ReasonCode::CardIssuanceFailed, "x"), T0)
                            .unwrap();
                        live.insert(id.clone(), (IntentStatus::Failed, 0));
                    } else {
                        let card = CardRef {
                            id: format!("ic_{id}"),
                            brand: "Visa".into(),
                            last4: "4242".into(),
                            exp_month: 1,
                            exp_year: 2030,
                            spending_limit: live[id].1,
                            cardholder: "ich_1".into(),
                            billing: Default::default(),
                        };
                        s.complete_issuance(id, card, T0).unwrap();
                        live.get_mut(id).unwrap().0 = IntentStatus::Approved;
                    }
                }
            }
            _ => {
                let approved: Vec<String> = live
                    .iter()
                    .filter(|(_, (st, _))| *st == IntentStatus::Approved)
                    .map(|(k, _)| k.clone())
                    .collect();
                if let Some(id) = approved.first() {
                    s.finish(
                        id,
                        IntentStatus::Canceled,
                        Reason::new(ReasonCode::IntentCanceled, "x"),
                        T0,
                    )
                    .unwrap();
                    // A second release is refused and changes nothing.
                    assert!(
                        s.finish(
                            id,
                            IntentStatus::Canceled,
                            Reason::new(ReasonCode::IntentCanceled, "x"),
                            T0
                        )
                        .is_err()
                    );
                    live.insert(id.clone(), (IntentStatus::Canceled, 0));
                }
            }
        }
        let model: i64 = live
            .values()
            .filter(|(st, _)| *st == IntentStatus::Issuing || *st == IntentStatus::Approved)
            .map(|(_, a)| a)
            .sum();
        assert_eq!(committed(&s), model);
        assert!(model <= limit);
    }
}

#[test]
fn reservations_and_timers_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let ids = counter();
    let id = {
        let s = store(&dir);
        agent(&s, 10_000);
        let rec = new_record(
            s.decide(
                "agt_1",
                intent(4_000, Some("k1")),
                T0,
                &ids,
                DecideOptions::default(),
            )
            .unwrap(),
        );
        assert_eq!(rec.status, IntentStatus::Issuing);
        rec.id
    };
    let s = store(&dir);
    assert_eq!(committed(&s), 4_000);
    assert_eq!(s.issuing().unwrap(), vec![id.clone()]);
    let due = s.due_timers(T0 + 3_600, 10).unwrap();
    assert_eq!(due, vec![(T0 + 3_600, id.clone())]);
    assert!(s.due_timers(T0 + 3_599, 10).unwrap().is_empty());
}

#[test]
fn idempotency_replays_and_detects_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(&dir);
    agent(&s, 10_000);
    let ids = counter();
    let first = new_record(
        s.decide(
            "agt_1",
            intent(1_000, Some("k")),
            T0,
            &ids,
            DecideOptions::default(),
        )
        .unwrap(),
    );
    match s
        .decide(
            "agt_1",
            intent(1_000, Some("k")),
            T0,
            &ids,
            DecideOptions::default(),
        )
        .unwrap()
    {
        Decided::Replay(r) => assert_eq!(r.id, first.id),
        Decided::New(_) => panic!("expected a replay"),
    }
    assert!(matches!(
        s.decide(
            "agt_1",
            intent(1_001, Some("k")),
            T0,
            &ids,
            DecideOptions::default()
        ),
        Err(StoreError::IdempotencyMismatch)
    ));
    assert_eq!(committed(&s), 1_000, "a replay reserves nothing more");
    // After a failed issuance the same key decides again, on the same intent and Stripe key.
    s.fail_issuance(
        &first.id,
        Reason::new(ReasonCode::CardIssuanceFailed, "x"),
        T0,
    )
    .unwrap();
    assert_eq!(committed(&s), 0);
    let again = new_record(
        s.decide(
            "agt_1",
            intent(1_000, Some("k")),
            T0,
            &ids,
            DecideOptions::default(),
        )
        .unwrap(),
    );
    assert_eq!(again.id, first.id);
    assert_eq!(again.stripe_idempotency_key, first.stripe_idempotency_key);
    assert_eq!(again.issuance_attempts, 1);
    assert_eq!(committed(&s), 1_000);
}

#[test]
fn unknown_agent_is_declined_not_approved() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(&dir);
    let rec = new_record(
        s.decide(
            "agt_nobody",
            intent(100, None),
            T0,
            &counter(),
            DecideOptions::default(),
        )
        .unwrap(),
    );
    assert_eq!(rec.status, IntentStatus::Declined);
    assert_eq!(rec.decision.reasons[0].code, ReasonCode::NoPolicy);
}
