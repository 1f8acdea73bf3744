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
        card_delivery: None,
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

fn shared_budget(limit: i64) -> SharedBudget {
    SharedBudget {
        id: "bud_p".into(),
        scope: crate::policy::BudgetScope::Project,
        period: Period::Daily,
        currency: Currency::USD,
        limit,
    }
}

fn synced(store: &Store, limit: i64) {
    let a = store.agent("agt_1").unwrap().unwrap().record.clone();
    store
        .apply_bundle(
            &[SyncedAgent {
                id: a.id,
                name: a.name,
                status: AgentStatus::Active,
                policy: Some(a.policy),
                keys: vec![],
            }],
            Some(&[shared_budget(limit)]),
            None,
            T0,
        )
        .unwrap();
}

/// A shared budget is spent only within the allowance held: no lease, no approval; a lease
/// of 3000 approves 3000 and no more; releasing gives room back within the lease; lowering
/// never goes below what is reserved.
#[test]
fn shared_budget_within_the_lease() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(&dir);
    agent(&s, 1_000_000);
    synced(&s, 10_000);
    let ids = counter();
    let bucket = Period::Daily.bucket_start(T0);

    let need = s.lease_needs("agt_1", &intent(1_000, None), T0).unwrap();
    assert_eq!(need.len(), 1);
    assert_eq!((need[0].lease, need[0].used, need[0].need), (0, 0, 1_000));
    let d = new_record(
        s.decide("agt_1", intent(1_000, None), T0, &ids, Default::default())
            .unwrap(),
    );
    assert_eq!(d.status, IntentStatus::Declined);
    assert_eq!(d.decision.reasons[0].code, ReasonCode::ExceedsBudget);

    let opts = DecideOptions {
        unreachable_budgets: vec!["bud_p".into()],
        ..Default::default()
    };
    let d = new_record(
        s.decide("agt_1", intent(1_000, None), T0, &ids, opts)
            .unwrap(),
    );
    assert_eq!(
        d.decision.reasons[0].code,
        ReasonCode::ControlPlaneUnreachable
    );

    s.set_lease("bud_p", bucket, 3_000, 7).unwrap();
    assert_eq!(s.lease_seq().unwrap(), 7);
    assert_eq!(
        s.lease_needs("agt_1", &intent(1_000, None), T0).unwrap()[0].lease,
        3_000
    );
    let mut approved = vec![];
    for _ in 0..4 {
        let d = new_record(
            s.decide("agt_1", intent(1_000, None), T0, &ids, Default::default())
                .unwrap(),
        );
        approved.push(d);
    }
    let statuses: Vec<_> = approved.iter().map(|d| d.status).collect();
    assert_eq!(
        statuses,
        [
            IntentStatus::Issuing,
            IntentStatus::Issuing,
            IntentStatus::Issuing,
            IntentStatus::Declined
        ]
    );
    let l = &s.leases().unwrap()[0];
    assert_eq!((l.lease, l.used), (3_000, 3_000));
    assert_eq!(s.lower_lease("bud_p", bucket, 0).unwrap(), 3_000);

    s.fail_issuance(
        &approved[0].id,
        Reason::new(ReasonCode::CardIssuanceFailed, "x"),
        T0,
    )
    .unwrap();
    let l = &s.leases().unwrap()[0];
    assert_eq!((l.lease, l.used), (3_000, 2_000));
    assert_eq!(s.lower_lease("bud_p", bucket, 0).unwrap(), 2_000);
    let d = new_record(
        s.decide("agt_1", intent(1, None), T0, &ids, Default::default())
            .unwrap(),
    );
    assert_eq!(d.status, IntentStatus::Declined, "the lease was lowered");

    // A new day is a new bucket: the old lease is dropped.
    s.drop_old_leases(T0 + 86_400).unwrap();
    assert!(s.leases().unwrap().is_empty());
}

/// With the outbox on, every change writes one event in its transaction, with increasing
/// versions; acknowledged events are removed; events survive a reopen.
#[test]
fn outbox_records_every_change() {
    let dir = tempfile::tempdir().unwrap();
    let ids = counter();
    {
        let s = store(&dir);
        agent(&s, 50_000);
        s.enable_outbox();
        let d = new_record(
            s.decide("agt_1", intent(1_000, None), T0, &ids, Default::default())
                .unwrap(),
        );
        s.fail_issuance(&d.id, Reason::new(ReasonCode::CardIssuanceFailed, "x"), T0)
            .unwrap();
        new_record(
            s.decide("agt_1", intent(90_000, None), T0, &ids, Default::default())
                .unwrap(),
        );
        let batch = s.outbox_batch(10).unwrap();
        let got: Vec<(&str, &str, i64)> = batch
            .iter()
            .map(|(_, e)| {
                (
                    e.action.as_str(),
                    e.intent.status.as_str(),
                    e.intent.version,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("intent.decided", "issuing", 1),
                ("intent.failed", "failed", 2),
                ("intent.decided", "declined", 1)
            ]
        );
        assert_eq!(batch[0].1.id, format!("{}.1", d.id));
        assert_eq!(batch[0].1.intent.reserved, 1_000);
        assert_eq!(batch[1].1.intent.reserved, 0);
        assert_eq!(
            batch[1].1.intent.status_reason.as_deref(),
            Some("card_issuance_failed")
        );
        s.outbox_ack(batch[0].0).unwrap();
        assert_eq!(s.outbox_len().unwrap(), 2);
        // The ack's durable commit made the decline durable too: nothing to flush.
        assert!(!s.flush().unwrap());
        new_record(
            s.decide("agt_1", intent(90_001, None), T0, &ids, Default::default())
                .unwrap(),
        );
        // A decline is committed without durability; flush makes it durable.
        assert!(s.flush().unwrap());
        assert!(!s.flush().unwrap());
    }
    let s = store(&dir);
    assert_eq!(s.outbox_len().unwrap(), 3);
    let batch = s.outbox_batch(1).unwrap();
    assert_eq!(batch[0].1.action, "intent.failed");
}

/// Administrators' decisions: approval moves a pending intent to issuing (queued for its
/// card), denial declines it and releases the reservation; decisions on intents that are
/// not pending, or name another agent, change nothing.
#[test]
fn admin_decisions() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(&dir);
    let mut a = s.agent("agt_1").ok().flatten();
    assert!(a.is_none());
    agent(&s, 50_000);
    let mut rec = s.agent("agt_1").unwrap().unwrap().record.clone();
    rec.policy.require_approval_above = Some(500);
    s.put_agent(&rec).unwrap();
    a = s.agent("agt_1").unwrap();
    assert!(a.is_some());
    let ids = counter();
    let p1 = new_record(
        s.decide("agt_1", intent(1_000, None), T0, &ids, Default::default())
            .unwrap(),
    );
    let p2 = new_record(
        s.decide("agt_1", intent(2_000, None), T0, &ids, Default::default())
            .unwrap(),
    );
    assert_eq!(p1.status, IntentStatus::PendingApproval);
    assert_eq!(committed(&s), 3_000);
    let decision = |id: &str, agent: &str, approved: bool| AdminDecision {
        intent_id: id.into(),
        agent_id: agent.into(),
        approved,
        note: Some("ok".into()),
        actor: "alice".into(),
    };
    let moved = s
        .apply_admin_decisions(
            &[
                decision(&p1.id, "agt_other", true),
                decision(&p1.id, "agt_1", true),
                decision(&p2.id, "agt_1", false),
                decision("pur_missing", "agt_1", true),
            ],
            T0 + 5,
        )
        .unwrap();
    assert_eq!(moved, vec![p1.id.clone()]);
    assert_eq!(s.take_approved(), vec![p1.id.clone()]);
    let r1 = s.intent(&p1.id).unwrap().unwrap();
    assert_eq!(r1.status, IntentStatus::Issuing);
    assert_eq!(
        r1.status_reason.as_ref().unwrap().code,
        ReasonCode::ApprovedByAdmin
    );
    assert!(s.issuing().unwrap().contains(&p1.id));
    let r2 = s.intent(&p2.id).unwrap().unwrap();
    assert_eq!(r2.status, IntentStatus::Declined);
    assert_eq!(committed(&s), 1_000);
    // Applying the same decisions again (the bundle still carries them) changes nothing.
    let again = s
        .apply_admin_decisions(&[decision(&p1.id, "agt_1", true)], T0 + 6)
        .unwrap();
    assert!(again.is_empty());
    assert_eq!(s.intent(&p1.id).unwrap().unwrap().version, r1.version);
}

/// The risk history: one entry per new decision, written in its transaction, bounded at
/// `HISTORY_LEN` (oldest evicted), durable across reopen; the score is recorded with the
/// decision and in its sync event.
#[test]
fn risk_history_is_bounded_and_recorded_with_the_decision() {
    use crate::policy::risk::HISTORY_LEN;
    let dir = tempfile::tempdir().unwrap();
    let ids = counter();
    {
        let s = store(&dir);
        s.enable_outbox();
        agent(&s, 1_000_000);
        // 300 intents an hour apart; every 10th over the daily budget (declined).
        for i in 0..300i64 {
            let amount = if i % 10 == 9 { 2_000_000 } else { 100 + i };
            let rec = new_record(
                s.decide(
                    "agt_1",
                    intent(amount, Some(&format!("k{i}"))),
                    T0 + i * 3_600,
                    &ids,
                    DecideOptions::default(),
                )
                .unwrap(),
            );
            assert!(rec.decision.risk.is_some());
        }
        // A replay adds nothing.
        let replay = s
            .decide(
                "agt_1",
                intent(100, Some("k0")),
                T0 + 300 * 3_600,
                &ids,
                DecideOptions::default(),
            )
            .unwrap();
        assert!(matches!(replay, Decided::Replay(_)));
        let h = s.risk_history("agt_1").unwrap();
        assert_eq!(h.entries.len(), HISTORY_LEN);
        assert_eq!(
            h.entries[0].at,
            T0 + 44 * 3_600,
            "the 44 oldest were evicted"
        );
        assert_eq!(h.entries[HISTORY_LEN - 1].at, T0 + 299 * 3_600);
        assert_eq!(h.entries[0].amount, 144);
        assert_eq!(h.entries[5].outcome, Outcome::Declined); // i = 49
        assert_eq!(h.entries[6].outcome, Outcome::Approved);
        assert_eq!(h.entries[0].merchant, "shop");
        assert!(s.risk_history("agt_2").unwrap().entries.is_empty());
    }
    // Survives reopen, and keeps its bound when more come.
    let s = store(&dir);
    s.enable_outbox();
    let h = s.risk_history("agt_1").unwrap();
    assert_eq!(h.entries.len(), HISTORY_LEN);
    // Split purchases: 4 parts above an approval threshold of USD 100.00 within 10 minutes.
    let mut a = s.agent("agt_1").unwrap().unwrap().record.clone();
    a.policy.require_approval_above = Some(10_000);
    a.policy.risk.require_approval_above = 50;
    s.put_agent(&a).unwrap();
    let at = T0 + 400 * 3_600;
    let mut last = None;
    for i in 0..3 {
        last = Some(new_record(
            s.decide(
                "agt_1",
                intent(9_000, None),
                at + i,
                &ids,
                DecideOptions::default(),
            )
            .unwrap(),
        ));
    }
    let rec = last.unwrap();
    let risk = rec.decision.risk.clone().unwrap();
    // 90.00 is far above this agent's usual ~2.73 (amount_unusual +30), and the three parts
    // add up to more than twice the threshold (split_purchase +55).
    assert_eq!(risk.score, 85, "{risk:?}");
    assert_eq!(rec.status, IntentStatus::PendingApproval);
    assert_eq!(rec.decision.reasons[0].code, ReasonCode::RiskReviewRequired);
    // The stored record and the outbox event carry the score.
    let stored = s.intent(&rec.id).unwrap().unwrap();
    assert_eq!(stored.decision.risk, Some(risk));
    let events = s.outbox_batch(1_000).unwrap();
    let (_, last_event) = events.last().unwrap();
    assert_eq!(last_event.intent.risk_score, Some(85));
    assert_eq!(
        last_event.intent.risk_signals,
        ["amount_unusual", "split_purchase"]
    );
    let h = s.risk_history("agt_1").unwrap();
    assert_eq!(h.entries.len(), HISTORY_LEN);
    assert_eq!(h.entries[HISTORY_LEN - 1].outcome, Outcome::PendingApproval);
    // Old records without a risk field still load.
    let mut json: serde_json::Value = serde_json::to_value(&stored).unwrap();
    json["decision"].as_object_mut().unwrap().remove("risk");
    let old: IntentRecord = serde_json::from_value(json).unwrap();
    assert_eq!(old.decision.risk, None);
}

/// The card's activity can arrive from the control plane before the sidecar has recorded
/// the card it is still creating (the webhook of the creation outruns the answer through
/// the relay): the intent's reservation must stand, not drop to what has moved (nothing).
#[test]
fn card_activity_before_the_card_keeps_the_reservation() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(&dir);
    agent(&s, 10_000);
    let ids = counter();
    let rec = new_record(
        s.decide(
            "agt_1",
            intent(4_000, None),
            T0,
            &ids,
            DecideOptions::default(),
        )
        .unwrap(),
    );
    assert_eq!(rec.status, IntentStatus::Issuing);
    assert!(rec.card.is_none());
    assert_eq!(committed(&s), 4_000);
    let update = wire::IntentUpdate {
        seq: 1,
        intent_id: rec.id.clone(),
        agent_id: "agt_1".into(),
        card_status: Some("active".into()),
        authorizations: vec![],
        captured: 0,
        refunded: 0,
        pending: 0,
        closed: false,
        discrepancies: vec![],
    };
    assert_eq!(s.apply_intent_updates(&[update], 1, T0 + 1).unwrap(), 1);
    assert_eq!(
        committed(&s),
        4_000,
        "the reservation stands for the card being created"
    );
    let after = s.intent(&rec.id).unwrap().unwrap();
    assert_eq!(after.reservation.map(|r| r.amount), Some(4_000));
}
