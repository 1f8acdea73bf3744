//! The dry run of a draft policy: a pure replay (no I/O, no clock) of an agent's ledger
//! intents, in time order, through the policy engine (`crate::policy::evaluate`), once
//! with the current policy and once with the draft, and the list of intents whose outcome
//! would change.
//!
//! Usage is rebuilt as the replay goes: every replayed approval (or pending approval)
//! adds its reservation (`Decision::reserve`) to the budget buckets of its time, every
//! intent counts for velocity windows, and every replayed outcome joins the risk history.
//! What the ledger cannot tell is left out: intents before the replay window (risk
//! history, earlier budget use), reservations released later (canceled or expired cards),
//! budgets set outside the policy (agent, project and organization budgets), the agent's
//! frozen state and MCP confirmations.

use crate::control::model::Intent;
use crate::domain::intent::{Merchant, PurchaseIntent};
use crate::domain::merchant::{normalize_country, normalize_domain, normalize_name};
use crate::domain::money::{Currency, Money};
use crate::domain::time::{Period, UnixSeconds};
use crate::policy::risk::HISTORY_LEN;
use crate::policy::{
    AgentState, CompiledPolicy, HistoryEntry, Outcome, RiskHistory, Usage, evaluate, period_index,
};

/// Most intents one dry run replays.
pub const MAX_REPLAY: usize = 10_000;

/// One ledger intent, as the engine sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplayItem {
    pub id: String,
    pub at: UnixSeconds,
    pub intent: PurchaseIntent,
    /// The ledger's status (what really happened).
    pub recorded_status: String,
}

/// What the engine decided for one item.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replayed {
    pub outcome: Outcome,
    pub reasons: Vec<&'static str>,
    pub risk_score: Option<u8>,
}

/// Counts of outcomes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub approved: usize,
    pub pending: usize,
    pub declined: usize,
}

impl Counts {
    fn add(&mut self, o: Outcome) {
        match o {
            Outcome::Approved => self.approved += 1,
            Outcome::PendingApproval => self.pending += 1,
            Outcome::Declined => self.declined += 1,
        }
    }
}

/// An intent whose outcome differs between the current policy and the draft.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub id: String,
    pub at: UnixSeconds,
    pub amount: Money,
    pub merchant: String,
    pub recorded_status: String,
    pub old: Outcome,
    pub new: Outcome,
    /// The draft's reason codes.
    pub new_reasons: Vec<&'static str>,
}

/// The result of a dry run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DryRunSummary {
    pub replayed: usize,
    pub current: Counts,
    pub draft: Counts,
    pub changes: Vec<Change>,
}

/// The engine's input rebuilt from a ledger intent (`None` if its currency is unknown).
pub fn item_of(i: &Intent) -> Option<ReplayItem> {
    let currency = Currency::parse(&i.currency).ok()?;
    let intent = PurchaseIntent {
        amount: Money::new(i.amount, currency),
        merchant: Merchant {
            name: i.merchant_name.clone(),
            normalized_name: normalize_name(&i.merchant_name),
            domain: i.merchant_domain.as_deref().and_then(normalize_domain),
            country: i.merchant_country.as_deref().and_then(normalize_country),
            mcc: None,
            category: i.merchant_category.clone(),
        },
        description: i.description.clone().unwrap_or_default(),
        line_items: Vec::new(),
        idempotency_key: None,
        card_delivery: None,
    };
    Some(ReplayItem {
        id: i.id.clone(),
        at: i.created_at,
        intent,
        recorded_status: i.status.clone(),
    })
}

pub fn outcome_str(o: Outcome) -> &'static str {
    match o {
        Outcome::Approved => "approved",
        Outcome::Declined => "declined",
        Outcome::PendingApproval => "pending_approval",
    }
}

/// Replays `items` (sorted here by time, then id) through `policy` (`None`: no valid
/// policy, so everything declines with `no_policy`). Items after `now` are not replayed.
/// The result is in the sorted order, one entry per replayed item.
pub fn replay(
    policy: Option<&CompiledPolicy>,
    items: &[ReplayItem],
    now: UnixSeconds,
) -> Vec<(usize, Replayed)> {
    let mut order: Vec<usize> = (0..items.len()).filter(|&i| items[i].at <= now).collect();
    order.sort_by(|&a, &b| (items[a].at, &items[a].id).cmp(&(items[b].at, &items[b].id)));
    let Some(policy) = policy else {
        return order
            .into_iter()
            .map(|i| {
                (
                    i,
                    Replayed {
                        outcome: Outcome::Declined,
                        reasons: vec!["no_policy"],
                        risk_score: None,
                    },
                )
            })
            .collect();
    };
    // Current bucket start and committed amount per period (daily, weekly, monthly, all).
    let mut buckets: [(i64, i64); 4] = [(i64::MIN, 0); 4];
    let mut times: Vec<UnixSeconds> = Vec::with_capacity(order.len());
    let mut history = RiskHistory::default();
    let mut out = Vec::with_capacity(order.len());
    for i in order {
        let item = &items[i];
        let at = item.at;
        let mut committed = [0i64; 4];
        for p in Period::ALL {
            let k = period_index(p);
            let start = p.bucket_start(at);
            if buckets[k].0 != start {
                buckets[k] = (start, 0);
            }
            committed[k] = buckets[k].1;
        }
        let velocity_counts = policy
            .velocity
            .iter()
            .map(|rule| {
                let from = at - i64::from(rule.window_seconds) + 1;
                let n = times.len() - times.partition_point(|t| *t < from);
                u32::try_from(n).unwrap_or(u32::MAX).min(rule.max_intents)
            })
            .collect();
        let usage = Usage {
            committed,
            velocity_counts,
            shared: Vec::new(),
            history: history.clone(),
        };
        let decision = evaluate(policy, &item.intent, &usage, AgentState::default(), at);
        if decision.outcome != Outcome::Declined && item.intent.amount.currency == policy.currency {
            for b in &mut buckets {
                b.1 = b.1.saturating_add(decision.reserve);
            }
        }
        times.push(at);
        history
            .entries
            .push(HistoryEntry::of(&item.intent, decision.outcome, at));
        if history.entries.len() > HISTORY_LEN {
            history.entries.remove(0);
        }
        out.push((
            i,
            Replayed {
                outcome: decision.outcome,
                reasons: decision.reasons.iter().map(|r| r.code.as_str()).collect(),
                risk_score: decision.risk.map(|r| r.score),
            },
        ));
    }
    out
}

/// Replays `items` with the current policy and with the draft and compares.
pub fn compare(
    current: Option<&CompiledPolicy>,
    draft: &CompiledPolicy,
    items: &[ReplayItem],
    now: UnixSeconds,
) -> DryRunSummary {
    let old = replay(current, items, now);
    let new = replay(Some(draft), items, now);
    let mut summary = DryRunSummary {
        replayed: new.len(),
        ..DryRunSummary::default()
    };
    for ((i, o), (j, n)) in old.iter().zip(new.iter()) {
        debug_assert_eq!(i, j);
        summary.current.add(o.outcome);
        summary.draft.add(n.outcome);
        if o.outcome != n.outcome {
            let item = &items[*j];
            summary.changes.push(Change {
                id: item.id.clone(),
                at: item.at,
                amount: item.intent.amount,
                merchant: item.intent.merchant.name.clone(),
                recorded_status: item.recorded_status.clone(),
                old: o.outcome,
                new: n.outcome,
                new_reasons: n.reasons.clone(),
            });
        }
    }
    summary
}

/// The labels of one dry-run comparison (the policy editor's or a budget's).
pub struct Labels<'a> {
    /// "Current policy (revision 3)", "As enforced now".
    pub current: maud::Markup,
    /// "Draft", "With this budget".
    pub draft: &'a str,
    /// The column of changed outcomes: "Current → draft".
    pub change: &'a str,
    /// The column of the new decision's reasons.
    pub reasons: &'a str,
    /// Shown under the number of replayed intents (skipped ones, say).
    pub replayed_note: Option<String>,
}

/// The counts and the table of changed outcomes of a dry run.
pub fn results_markup(s: &DryRunSummary, labels: &Labels<'_>) -> maud::Markup {
    use super::ui;
    use maud::html;
    html! {
        div.cards {
            div.card { div.label { "Intents replayed" } div.big #dry-run-replayed { (s.replayed) } @if let Some(n) = &labels.replayed_note { div.small.muted { (n) } } }
            div.card data-test="dry-run-current" {
                div.label { (labels.current) }
                div { span #current-approved { (s.current.approved) } " approved · " span #current-pending { (s.current.pending) } " pending · " span #current-declined { (s.current.declined) } " declined" }
            }
            div.card data-test="dry-run-draft" {
                div.label { (labels.draft) }
                div { span #draft-approved { (s.draft.approved) } " approved · " span #draft-pending { (s.draft.pending) } " pending · " span #draft-declined { (s.draft.declined) } " declined" }
            }
            div.card { div.label { "Outcomes that change" } div.big #dry-run-changed { (s.changes.len()) } }
        }
        @if s.changes.is_empty() {
            p.muted #dry-run-no-changes { "No outcome would change." }
        } @else {
            table #dry-run-changes {
                thead { tr { th { "Time" } th { "Intent" } th { "Merchant" } th.num { "Amount" } th { "Recorded" } th { (labels.change) } th { (labels.reasons) } } }
                tbody {
                    @for c in &s.changes {
                        tr data-test="dry-run-change" data-intent-id=(c.id) data-old=(outcome_str(c.old)) data-new=(outcome_str(c.new)) {
                            td.small { (ui::time(c.at)) }
                            td.small { a href={"/transactions/" (super::policies::seg(&c.id))} { (c.id) } }
                            td { (c.merchant) }
                            td.num { (c.amount.to_string()) }
                            td { (ui::badge(&c.recorded_status)) }
                            td { (ui::badge(outcome_str(c.old))) " → " (ui::badge(outcome_str(c.new))) }
                            td.small { (c.new_reasons.join(", ")) }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{BudgetRule, Policy, VelocityRule};

    const DAY0: i64 = 1_795_305_600; // 2026-11-22T00:00:00Z

    fn item(id: &str, at: i64, amount: i64, merchant: &str) -> ReplayItem {
        let ledger = Intent {
            id: id.into(),
            org_id: "org".into(),
            project_id: "prj".into(),
            agent_id: "agt".into(),
            status: "approved".into(),
            amount,
            currency: "USD".into(),
            merchant_name: merchant.into(),
            merchant_domain: Some("example.com".into()),
            merchant_country: Some("US".into()),
            description: None,
            decision_id: None,
            reasons: vec![],
            created_at: at,
            updated_at: at,
            version: 1,
            reserved: 0,
            sidecar_id: None,
            sidecar_status: None,
            status_reason: None,
            merchant_category: None,
            expires_at: None,
            captured: 0,
            refunded: 0,
            pending: 0,
            risk_score: None,
            risk_signals: vec![],
        };
        item_of(&ledger).unwrap()
    }

    fn base() -> Policy {
        let mut p = Policy::new(Currency::USD);
        p.card_buffer_bps = 0;
        // Keep the risk score out of these tests.
        p.risk.decline_above = 100;
        p.risk.require_approval_above = 100;
        p
    }

    #[test]
    fn budgets_fill_up_as_the_replay_goes_and_reset_per_day() {
        let mut p = base();
        p.budgets = vec![BudgetRule {
            period: Period::Daily,
            limit: 5_000,
        }];
        let p = p.compile().unwrap();
        let items = vec![
            item("c", DAY0 + 300, 2_000, "Shop"),
            item("a", DAY0 + 100, 2_000, "Shop"),
            item("b", DAY0 + 200, 2_000, "Shop"), // 4000 used: 6000 > 5000
            item("d", DAY0 + 86_400 + 5, 2_000, "Shop"), // next day
            item("z", DAY0 + 10 * 86_400, 1, "Shop"), // after now: skipped
        ];
        let out = replay(Some(&p), &items, DAY0 + 2 * 86_400);
        let ids: Vec<(&str, Outcome)> = out
            .iter()
            .map(|(i, r)| (items[*i].id.as_str(), r.outcome))
            .collect();
        assert_eq!(
            ids,
            [
                ("a", Outcome::Approved),
                ("b", Outcome::Approved),
                ("c", Outcome::Declined),
                ("d", Outcome::Approved),
            ]
        );
        assert_eq!(out[2].1.reasons, ["exceeds_budget"]);
    }

    #[test]
    fn velocity_counts_every_intent_in_the_window() {
        let mut p = base();
        p.velocity = vec![VelocityRule {
            max_intents: 2,
            window_seconds: 60,
        }];
        let p = p.compile().unwrap();
        let items: Vec<ReplayItem> = (0..4)
            .map(|k| item(&format!("i{k}"), DAY0 + k * 10, 100, "Shop"))
            .chain([item("late", DAY0 + 200, 100, "Shop")])
            .collect();
        let out = replay(Some(&p), &items, DAY0 + 1000);
        let outcomes: Vec<Outcome> = out.iter().map(|(_, r)| r.outcome).collect();
        assert_eq!(
            outcomes,
            [
                Outcome::Approved,
                Outcome::Approved,
                Outcome::Declined,
                Outcome::Declined,
                Outcome::Approved
            ]
        );
        assert_eq!(out[2].1.reasons, ["velocity_exceeded"]);
    }

    #[test]
    fn compare_lists_changed_outcomes() {
        let current = base().compile().unwrap();
        let mut draft = base();
        draft.max_per_transaction = Some(1_000);
        draft.require_approval_above = Some(500);
        let draft = draft.compile().unwrap();
        let items = vec![
            item("small", DAY0 + 1, 400, "Shop"),
            item("mid", DAY0 + 2, 800, "Shop"),
            item("big", DAY0 + 3, 1_500, "Big, \"Shop\""),
        ];
        let s = compare(Some(&current), &draft, &items, DAY0 + 100);
        assert_eq!(s.replayed, 3);
        assert_eq!(
            s.current,
            Counts {
                approved: 3,
                pending: 0,
                declined: 0
            }
        );
        assert_eq!(
            s.draft,
            Counts {
                approved: 1,
                pending: 1,
                declined: 1
            }
        );
        let changed: Vec<(&str, Outcome, Outcome)> = s
            .changes
            .iter()
            .map(|c| (c.id.as_str(), c.old, c.new))
            .collect();
        assert_eq!(
            changed,
            [
                ("mid", Outcome::Approved, Outcome::PendingApproval),
                ("big", Outcome::Approved, Outcome::Declined)
            ]
        );
        assert_eq!(s.changes[1].new_reasons, ["exceeds_transaction_limit"]);
        // No current policy: everything declined before.
        let s = compare(None, &draft, &items, DAY0 + 100);
        assert_eq!(s.current.declined, 3);
        assert_eq!(s.changes.len(), 2);
    }

    #[test]
    fn unknown_currencies_are_not_replayable() {
        let bad = Intent {
            currency: "??".into(),
            ..item_ledger_stub()
        };
        assert!(item_of(&bad).is_none());
        assert!(item_of(&item_ledger_stub()).is_some());
    }

    fn item_ledger_stub() -> Intent {
        Intent {
            id: "s".into(),
            org_id: String::new(),
            project_id: String::new(),
            agent_id: String::new(),
            status: "declined".into(),
            amount: 0,
            currency: "USD".into(),
            merchant_name: "m".into(),
            merchant_domain: None,
            merchant_country: None,
            description: None,
            decision_id: None,
            reasons: vec![],
            created_at: 0,
            updated_at: 0,
            version: 0,
            reserved: 0,
            sidecar_id: None,
            sidecar_status: None,
            status_reason: None,
            merchant_category: None,
            expires_at: None,
            captured: 0,
            refunded: 0,
            pending: 0,
            risk_score: None,
            risk_signals: vec![],
        }
    }
}
