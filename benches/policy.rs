#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]
//! Policy evaluation on a 50-rule policy (goal: median ≤ 2 µs).
//! Run: `cargo bench --bench policy`. Results: docs/benchmarks.md.

use criterion::{Criterion, criterion_group, criterion_main};
use roony::domain::intent::{MerchantInput, PurchaseRequest};
use roony::domain::money::Currency;
use roony::domain::time::Period;
use roony::policy::{AgentState, BudgetRule, ListRule, Policy, Usage, VelocityRule, evaluate};

/// 50 rules: a per-transaction cap, 4 budgets, 20 merchant domain and name rules, 15
/// category rules, 8 country rules, 2 velocity rules.
fn fifty_rule_policy() -> Policy {
    let mut p = Policy::new(Currency::USD);
    p.max_per_transaction = Some(50_000);
    p.budgets = Period::ALL
        .iter()
        .enumerate()
        .map(|(i, period)| BudgetRule {
            period: *period,
            limit: 100_000 * (i as i64 + 1),
        })
        .collect();
    p.merchants.allow_domains = (0..10).map(|i| format!("shop{i}.example.com")).collect();
    p.merchants.allow_domains.push("namecheap.com".into());
    p.merchants.deny_names = (0..9).map(|i| format!("Bad Merchant {i}")).collect();
    p.categories = ListRule {
        allow: vec![],
        deny: [
            "betting_casino_gambling",
            "dating_escort_services",
            "massage_parlors",
            "wires_money_orders",
            "pawn_shops",
            "cigar_stores_and_stands",
            "package_stores_beer_wine_and_liquor",
            "automated_cash_disburse",
            "manual_cash_disburse",
            "security_brokers_dealers",
            "timeshares",
            "bail_and_bond_payments",
            "fines_government_administrative_entities",
            "government_licensed_online_casions_online_gambling_us_region_only",
            "non_fi_stored_value_card_purchase_load",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
    };
    p.countries = ListRule {
        allow: vec![],
        deny: ["RU", "KP", "IR", "SY", "CU", "BY", "VE", "MM"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
    };
    p.velocity = vec![
        VelocityRule {
            max_intents: 10,
            window_seconds: 60,
        },
        VelocityRule {
            max_intents: 100,
            window_seconds: 3_600,
        },
    ];
    p.require_approval_above = Some(20_000);
    p
}

fn bench(c: &mut Criterion) {
    let policy = fifty_rule_policy().compile().expect("valid policy");
    let rules = 1
        + policy.budgets.len()
        + policy.merchants.allow_domains.len()
        + policy.merchants.deny_names.len()
        + policy.categories.deny.len()
        + policy.countries.deny.len()
        + policy.velocity.len()
        + 1;
    assert!(rules >= 50, "{rules} rules");
    let intent = PurchaseRequest {
        amount: 1_200,
        currency: "usd".into(),
        merchant: MerchantInput {
            name: "Namecheap".into(),
            url: Some("https://www.namecheap.com/checkout".into()),
            country: Some("US".into()),
            mcc: Some("5734".into()),
            ..Default::default()
        },
        description: "a domain".into(),
        line_items: vec![],
        idempotency_key: None,
        card_delivery: None,
    }
    .validate(None)
    .expect("valid intent");
    let usage = Usage {
        committed: [10_000, 30_000, 90_000, 200_000],
        velocity_counts: vec![3, 20],
        shared: vec![],
        history: Default::default(),
    };
    let now = 1_795_335_491;
    c.bench_function("policy_evaluate_50_rules_approve", |b| {
        b.iter(|| {
            evaluate(
                &policy,
                std::hint::black_box(&intent),
                &usage,
                AgentState::default(),
                now,
            )
        })
    });
    let mut declined = intent.clone();
    declined.merchant.category = Some("betting_casino_gambling".into());
    declined.merchant.domain = Some("casino.example".into());
    c.bench_function("policy_evaluate_50_rules_decline", |b| {
        b.iter(|| {
            evaluate(
                &policy,
                std::hint::black_box(&declined),
                &usage,
                AgentState::default(),
                now,
            )
        })
    });
}

/// The pure part of a real-time authorization decision (the control plane adds its ledger
/// reads and one write around it).
fn bench_authorization(c: &mut Criterion) {
    use roony::domain::money::Currency;
    use roony::policy::authorization::{
        AuthCardHistory, AuthIntent, AuthRequest, decide_authorization,
    };
    let intent = AuthIntent {
        intent_id: "pur_1".into(),
        status: "approved".into(),
        currency: Currency::USD,
        limit: 1_212,
        merchant_name: "Namecheap".into(),
        merchant_domain: Some("namecheap.com".into()),
        merchant_country: Some("US".into()),
        merchant_category: None,
        expires_at: Some(2_000_000_000),
        agent_frozen: false,
    };
    let request = AuthRequest {
        amount: 1_200,
        currency: "usd".into(),
        merchant_name: "PAYPAL *NAMECHEAP.COM".into(),
        merchant_url: None,
        merchant_country: Some("US".into()),
        merchant_category: Some("computer_network_services".into()),
        merchant_network_id: Some("net_1".into()),
    };
    let card = AuthCardHistory::default();
    c.bench_function("authorization_decide_approve", |b| {
        b.iter(|| {
            decide_authorization(
                &intent,
                &card,
                std::hint::black_box(&request),
                1_795_335_491,
            )
        })
    });
    let mut wrong = request.clone();
    wrong.merchant_name = "GIFTCARDS4U LTD".into();
    c.bench_function("authorization_decide_wrong_merchant", |b| {
        b.iter(|| decide_authorization(&intent, &card, std::hint::black_box(&wrong), 1_795_335_491))
    });
}

/// A full risk history: 256 earlier intents over 30 days at 8 merchants, some declined.
fn full_history(now: i64) -> roony::policy::RiskHistory {
    use roony::policy::{HistoryEntry, Outcome, RiskHistory, risk::HISTORY_LEN};
    let entries = (0..HISTORY_LEN as i64)
        .map(|i| HistoryEntry {
            at: now - 30 * 86_400 + i * 10_000,
            amount: 500 + (i * 37) % 2_000,
            currency: Currency::USD,
            merchant: format!("merchant {}", i % 8),
            domain: Some(format!("shop{}.example.com", i % 8)),
            category: Some("computer_software_stores".into()),
            outcome: if i % 11 == 0 {
                Outcome::Declined
            } else {
                Outcome::Approved
            },
        })
        .collect();
    RiskHistory { entries }
}

/// The risk score alone, and a whole decision, with a full 256-entry history; then the
/// store's read path (history scan + usage + evaluate, in a read transaction).
fn bench_risk(c: &mut Criterion) {
    let policy = fifty_rule_policy().compile().expect("valid policy");
    let now = 1_795_335_491;
    let intent = PurchaseRequest {
        amount: 1_200,
        currency: "usd".into(),
        merchant: MerchantInput {
            name: "Namecheap".into(),
            url: Some("https://www.namecheap.com/checkout".into()),
            country: Some("US".into()),
            mcc: Some("5734".into()),
            ..Default::default()
        },
        description: "a domain".into(),
        line_items: vec![],
        idempotency_key: None,
        card_delivery: None,
    }
    .validate(None)
    .expect("valid intent");
    let history = full_history(now);
    c.bench_function("risk_score_full_history", |b| {
        b.iter(|| roony::policy::risk::score(&policy, std::hint::black_box(&intent), &history, now))
    });
    let usage = Usage {
        committed: [10_000, 30_000, 90_000, 200_000],
        velocity_counts: vec![3, 20],
        shared: vec![],
        history,
    };
    c.bench_function("policy_evaluate_50_rules_full_risk_history", |b| {
        b.iter(|| {
            evaluate(
                &policy,
                std::hint::black_box(&intent),
                &usage,
                AgentState::default(),
                now,
            )
        })
    });

    // The store: an agent with 256 recorded intents; `preview` reads the usage buckets, the
    // velocity index and the risk history, then evaluates (no write, no fsync).
    use roony::store::{AgentRecord, AgentStatus, DecideOptions, Store};
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("bench.redb")).expect("store");
    let mut p = fifty_rule_policy();
    p.merchants.allow_domains.clear();
    p.budgets.clear();
    p.velocity.clear();
    p.require_approval_above = None;
    p.risk.require_approval_above = 100;
    p.risk.decline_above = 100;
    store
        .put_agent(&AgentRecord {
            id: "agt_bench".into(),
            name: "bench".into(),
            status: AgentStatus::Active,
            policy: p,
            created: now,
        })
        .expect("agent");
    let n = std::sync::atomic::AtomicU64::new(0);
    let ids = || {
        format!(
            "pur_{:026}",
            n.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        )
    };
    for i in 0..300i64 {
        let mut it = intent.clone();
        it.amount.amount = 500 + (i * 37) % 2_000;
        it.merchant.normalized_name = format!("merchant {}", i % 8);
        store
            .decide(
                "agt_bench",
                it,
                now - 30 * 86_400 + i * 8_000,
                &ids,
                DecideOptions::default(),
            )
            .expect("decide");
    }
    assert_eq!(
        store
            .risk_history("agt_bench")
            .expect("history")
            .entries
            .len(),
        256
    );
    c.bench_function("store_preview_full_risk_history", |b| {
        b.iter(|| {
            store
                .preview(
                    "agt_bench",
                    std::hint::black_box(&intent),
                    Default::default(),
                    now,
                )
                .expect("preview")
        })
    });
}

criterion_group!(benches, bench, bench_authorization, bench_risk);
criterion_main!(benches);
