use super::*;
use crate::domain::intent::{MerchantInput, PurchaseRequest};
use crate::domain::money::Currency;

const NOW: i64 = 1_795_335_491; // 2026-11-22T08:18:11Z

fn demo_policy() -> Policy {
    let mut p = Policy::new(Currency::USD);
    p.max_per_transaction = Some(10_000);
    p.budgets = vec![BudgetRule {
        period: Period::Daily,
        limit: 25_000,
    }];
    p.categories.deny = vec!["betting_casino_gambling".into()];
    p.card_buffer_bps = 0;
    p
}

fn intent(amount: i64) -> PurchaseIntent {
    request(amount).validate(None).unwrap()
}

fn request(amount: i64) -> PurchaseRequest {
    PurchaseRequest {
        amount,
        currency: "usd".into(),
        merchant: MerchantInput {
            name: "Namecheap".into(),
            url: Some("https://www.namecheap.com/checkout".into()),
            country: Some("US".into()),
            category: Some("computer_software_stores".into()),
            ..Default::default()
        },
        description: "a domain".into(),
        line_items: vec![],
        idempotency_key: None,
    }
}

fn usage(daily: i64) -> Usage {
    Usage {
        committed: [daily, daily, daily, daily],
        velocity_counts: vec![],
        shared: vec![],
    }
}

fn codes(d: &Decision) -> Vec<&'static str> {
    d.reasons.iter().map(|r| r.code.as_str()).collect()
}

#[test]
fn approves_within_policy_and_reserves() {
    let p = demo_policy().compile().unwrap();
    let d = evaluate(&p, &intent(1200), &usage(0), AgentState::default(), NOW);
    assert_eq!(d.outcome, Outcome::Approved);
    assert_eq!(codes(&d), ["within_policy"]);
    assert_eq!(d.reserve, 1200);
    assert_eq!(d.budgets[0].remaining, 25_000 - 1200);
}

#[test]
fn declines_with_every_matching_reason() {
    let p = demo_policy().compile().unwrap();
    let mut r = request(12_000);
    r.merchant.category = Some("betting_casino_gambling".into());
    let d = evaluate(
        &p,
        &r.validate(None).unwrap(),
        &usage(20_000),
        AgentState::default(),
        NOW,
    );
    assert_eq!(d.outcome, Outcome::Declined);
    assert_eq!(
        codes(&d),
        [
            "exceeds_transaction_limit",
            "exceeds_budget",
            "category_not_allowed"
        ]
    );
    assert_eq!(d.reserve, 0);
    let budget_msg = &d.reasons[1].message;
    assert!(budget_msg.contains("USD 50.00 left"), "{budget_msg}");
    assert!(
        budget_msg.contains("resets at 2026-11-23T00:00:00Z"),
        "{budget_msg}"
    );
}

#[test]
fn budget_boundary_is_inclusive() {
    let p = demo_policy().compile().unwrap();
    let ok = evaluate(
        &p,
        &intent(5_000),
        &usage(20_000),
        AgentState::default(),
        NOW,
    );
    assert_eq!(ok.outcome, Outcome::Approved);
    let no = evaluate(
        &p,
        &intent(5_001),
        &usage(20_000),
        AgentState::default(),
        NOW,
    );
    assert_eq!(codes(&no), ["exceeds_budget"]);
}

#[test]
fn buffer_shrinks_to_fit_budget() {
    let mut policy = demo_policy();
    policy.card_buffer_bps = 1_000; // 10%
    let p = policy.compile().unwrap();
    let d = evaluate(&p, &intent(1_000), &usage(0), AgentState::default(), NOW);
    assert_eq!(d.reserve, 1_100);
    let d = evaluate(
        &p,
        &intent(1_000),
        &usage(23_950),
        AgentState::default(),
        NOW,
    );
    assert_eq!(d.outcome, Outcome::Approved);
    assert_eq!(d.reserve, 1_050, "buffer shrinks to the 50 left");
    let d = evaluate(
        &p,
        &intent(1_000),
        &usage(24_000),
        AgentState::default(),
        NOW,
    );
    assert_eq!(d.reserve, 1_000);
}

#[test]
fn approval_threshold_gives_pending_and_reserves() {
    let mut policy = demo_policy();
    policy.require_approval_above = Some(5_000);
    let p = policy.compile().unwrap();
    let d = evaluate(&p, &intent(8_000), &usage(0), AgentState::default(), NOW);
    assert_eq!(d.outcome, Outcome::PendingApproval);
    assert_eq!(codes(&d), ["approval_required"]);
    assert_eq!(d.reserve, 8_000);
    // A decline beats the threshold.
    let d = evaluate(
        &p,
        &intent(8_000),
        &usage(20_000),
        AgentState::default(),
        NOW,
    );
    assert_eq!(d.outcome, Outcome::Declined);
}

#[test]
fn merchant_rules_by_domain_and_name() {
    let mut policy = demo_policy();
    policy.merchants.allow_domains = vec!["namecheap.com".into()];
    let p = policy.compile().unwrap();
    assert_eq!(
        evaluate(&p, &intent(100), &usage(0), AgentState::default(), NOW).outcome,
        Outcome::Approved
    );
    let mut r = request(100);
    r.merchant.url = Some("https://namecheap.com.evil.io/pay".into());
    let d = evaluate(
        &p,
        &r.validate(None).unwrap(),
        &usage(0),
        AgentState::default(),
        NOW,
    );
    assert_eq!(codes(&d), ["merchant_not_allowed"]);

    let mut policy = demo_policy();
    policy.merchants.deny_names = vec!["NameCheap, Inc.".into()];
    let p = policy.compile().unwrap();
    let d = evaluate(&p, &intent(100), &usage(0), AgentState::default(), NOW);
    assert_eq!(codes(&d), ["merchant_not_allowed"]);
}

#[test]
fn category_and_country_allow_lists_deny_unknowns() {
    let mut policy = demo_policy();
    policy.categories = ListRule {
        allow: vec!["computer_software_stores".into()],
        deny: vec![],
    };
    policy.countries = ListRule {
        allow: vec!["us".into()],
        deny: vec![],
    };
    let p = policy.compile().unwrap();
    assert_eq!(
        evaluate(&p, &intent(100), &usage(0), AgentState::default(), NOW).outcome,
        Outcome::Approved
    );
    let mut r = request(100);
    r.merchant.category = None;
    r.merchant.country = Some("FR".into());
    let d = evaluate(
        &p,
        &r.validate(None).unwrap(),
        &usage(0),
        AgentState::default(),
        NOW,
    );
    assert_eq!(codes(&d), ["category_not_allowed", "country_not_allowed"]);
}

#[test]
fn velocity_frozen_and_currency() {
    let mut policy = demo_policy();
    policy.velocity = vec![VelocityRule {
        max_intents: 3,
        window_seconds: 60,
    }];
    let p = policy.compile().unwrap();
    let mut u = usage(0);
    u.velocity_counts = vec![2];
    assert_eq!(
        evaluate(&p, &intent(100), &u, AgentState::default(), NOW).outcome,
        Outcome::Approved
    );
    u.velocity_counts = vec![3];
    assert_eq!(
        codes(&evaluate(&p, &intent(100), &u, AgentState::default(), NOW)),
        ["velocity_exceeded"]
    );
    // Missing history declines rather than approving.
    assert_eq!(
        codes(&evaluate(
            &p,
            &intent(100),
            &usage(0),
            AgentState::default(),
            NOW
        )),
        ["internal_error"]
    );
    let d = evaluate(
        &p,
        &intent(100),
        &u,
        AgentState {
            frozen: true,
            ..Default::default()
        },
        NOW,
    );
    assert_eq!(codes(&d)[0], "agent_frozen");

    let mut r = request(100);
    r.currency = "eur".into();
    let d = evaluate(
        &p,
        &r.validate(None).unwrap(),
        &usage(0),
        AgentState::default(),
        NOW,
    );
    assert!(codes(&d).contains(&"currency_not_allowed"));
}

#[test]
fn compile_reports_exact_fields() {
    let mut policy = demo_policy();
    policy.budgets.push(BudgetRule {
        period: Period::Daily,
        limit: 0,
    });
    policy.categories.allow = vec!["not_a_category".into()];
    policy.countries.deny = vec!["ZZ".into()];
    policy.merchants.allow_domains = vec!["ok.com".into(), "bad domain".into()];
    let errors = policy.compile().unwrap_err();
    let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "budgets[1].limit",
            "budgets[1].period",
            "merchants.allow_domains[1]",
            "categories.allow[0]",
            "countries.deny[0]",
        ]
    );
}

/// A reference model: the outcome must equal a straightforward re-statement of the rules,
/// over a grid of amounts and usages.
#[test]
fn matches_reference_model_on_a_grid() {
    let p = demo_policy().compile().unwrap();
    for amount in [1, 99, 5_000, 9_999, 10_000, 10_001, 25_000, 25_001] {
        for used in [0, 1, 15_000, 24_999, 25_000, 30_000] {
            let d = evaluate(
                &p,
                &intent(amount),
                &usage(used),
                AgentState::default(),
                NOW,
            );
            let expect_ok = amount <= 10_000 && amount <= 25_000 - used;
            assert_eq!(
                d.outcome == Outcome::Approved,
                expect_ok,
                "amount {amount} used {used}: {:?}",
                d.reasons
            );
            assert_eq!(d.reserve, if expect_ok { amount } else { 0 });
        }
    }
}

fn shared(scope: crate::policy::BudgetScope, available: i64, unreachable: bool) -> SharedUsage {
    SharedUsage {
        scope,
        period: crate::domain::time::Period::Daily,
        limit: 50_000,
        available,
        unreachable,
    }
}

/// Shared budgets decline like the agent's own, with the scope in the message; when the
/// allowance is short because the control plane is unreachable, the code says so.
#[test]
fn shared_budgets_and_partitions() {
    use crate::policy::BudgetScope;
    let p = demo_policy().compile().unwrap();
    let mut u = usage(0);
    u.shared = vec![shared(BudgetScope::Project, 5_000, false)];
    let ok = evaluate(&p, &intent(5_000), &u, AgentState::default(), NOW);
    assert_eq!(ok.outcome, Outcome::Approved);
    let project = ok
        .budgets
        .iter()
        .find(|b| b.scope == BudgetScope::Project)
        .unwrap();
    assert_eq!((project.remaining, project.limit), (0, 50_000));
    // The buffer shrinks to fit the shared allowance too.
    assert_eq!(ok.reserve, 5_000);

    let d = evaluate(&p, &intent(5_001), &u, AgentState::default(), NOW);
    assert_eq!(codes(&d), ["exceeds_budget"]);
    assert!(d.reasons[0].message.contains("shared project daily budget"));

    u.shared = vec![
        shared(BudgetScope::Project, 9_000, false),
        shared(BudgetScope::Org, 100, true),
    ];
    let d = evaluate(&p, &intent(5_000), &u, AgentState::default(), NOW);
    assert_eq!(codes(&d), ["control_plane_unreachable"]);
    // Within the allowance it holds, an unreachable control plane does not matter.
    let d = evaluate(&p, &intent(100), &u, AgentState::default(), NOW);
    assert_eq!(d.outcome, Outcome::Approved);

    let d = evaluate(
        &p,
        &intent(100),
        &usage(0),
        AgentState {
            control_plane_unreachable: true,
            ..Default::default()
        },
        NOW,
    );
    assert_eq!(codes(&d), ["control_plane_unreachable"]);
}
