//! The policy engine: a pure function from (policy, intent, usage, time) to a decision.
//!
//! Invariants: no I/O, no clock reads (time is passed in), no allocation beyond the decision
//! it returns, deny by default. Every decision carries at least one stable reason code.

pub mod authorization;
mod decision;
pub mod risk;
mod rules;

pub use decision::{BudgetScope, BudgetStatus, Decision, Outcome, Reason, ReasonCode};
pub use risk::{HistoryEntry, RiskAssessment, RiskHistory, RiskRule, RiskSignal, RiskSignalCode};
pub use rules::{
    BudgetRule, CardDeliveryRule, CompiledPolicy, ListRule, MerchantRules, Policy, PolicyError,
    VelocityRule,
};

use crate::domain::intent::PurchaseIntent;
use crate::domain::merchant::domain_matches;
use crate::domain::money::Money;
use crate::domain::time::{Period, UnixSeconds};

/// What the engine needs to know about the agent's history, read by the caller inside the
/// same transaction that will record the decision.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Amount committed (reserved or spent) in the current bucket of each period, indexed by
    /// `Period::ALL` order: daily, weekly, monthly, all-time.
    pub committed: [i64; 4],
    /// For each velocity rule of the policy, in order, how many intents the agent made in
    /// that rule's window before this one.
    pub velocity_counts: Vec<u32>,
    /// Shared (project and organization) budgets in the intent's currency, as this sidecar
    /// holds them.
    pub shared: Vec<SharedUsage>,
    /// The agent's recent intents, for the risk score.
    pub history: RiskHistory,
}

/// A shared budget as one sidecar sees it: the allowance (lease) the control plane granted
/// it for the current bucket, minus what it has reserved in that bucket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedUsage {
    pub scope: BudgetScope,
    pub period: Period,
    pub limit: i64,
    /// Allowance left to this sidecar, minor units.
    pub available: i64,
    /// The sidecar needed a larger allowance and could not reach the control plane.
    pub unreachable: bool,
}

impl Usage {
    pub fn committed_in(&self, period: Period) -> i64 {
        self.committed[period_index(period)]
    }
}

pub fn period_index(period: Period) -> usize {
    match period {
        Period::Daily => 0,
        Period::Weekly => 1,
        Period::Monthly => 2,
        Period::AllTime => 3,
    }
}

/// Facts about the agent and this request that are not part of its policy.
#[derive(Clone, Copy, Debug, Default)]
pub struct AgentState {
    pub frozen: bool,
    /// The sidecar has been out of touch with its control plane for longer than allowed.
    pub control_plane_unreachable: bool,
    /// The organization's Stripe account is disconnected (cards cannot be issued).
    pub stripe_account_disconnected: bool,
    /// What the human in front of the agent said, if they were asked.
    pub confirmation: Confirmation,
}

/// The human's confirmation of a purchase (asked through MCP elicitation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Confirmation {
    /// Not asked (or the interface cannot ask).
    #[default]
    NotAsked,
    Confirmed,
    Refused,
}

/// Evaluates `intent` against `policy`. Collects every matching reason; the outcome is a
/// decline if any rule declines, `pending_approval` if only the approval threshold matched,
/// and an approval otherwise.
pub fn evaluate(
    policy: &CompiledPolicy,
    intent: &PurchaseIntent,
    usage: &Usage,
    agent: AgentState,
    now: UnixSeconds,
) -> Decision {
    let mut reasons: Vec<Reason> = Vec::new();
    let amount = intent.amount;
    let currency = policy.currency;
    let risk_assessment = risk::score(policy, intent, &usage.history, now);

    if agent.frozen {
        reasons.push(Reason::new(
            ReasonCode::AgentFrozen,
            "this agent is frozen by an administrator; no purchases are possible until it is unfrozen",
        ));
    }

    if agent.control_plane_unreachable {
        reasons.push(Reason::new(
            ReasonCode::ControlPlaneUnreachable,
            "this sidecar has been out of touch with the control plane for longer than its offline limit; purchases are declined until it reconnects — retry later",
        ));
    }

    if agent.stripe_account_disconnected {
        reasons.push(Reason::new(
            ReasonCode::StripeAccountDisconnected,
            "the organization's stripe account is disconnected, so no card can be issued; an administrator must reconnect it — retry later",
        ));
    }

    if amount.currency != currency {
        reasons.push(Reason::new(
            ReasonCode::CurrencyNotAllowed,
            format!(
                "this agent's policy spends {currency} only; the purchase is in {}",
                amount.currency
            ),
        ));
    }

    if let Some(max) = policy.max_per_transaction
        && amount.amount > max
    {
        reasons.push(Reason::new(
            ReasonCode::ExceedsTransactionLimit,
            format!(
                "{} is above the per-purchase limit of {}; ask for at most {}",
                amount,
                Money::new(max, currency),
                Money::new(max, currency)
            ),
        ));
    }

    let budgets = budget_statuses(policy, usage, now);
    for (i, b) in budgets.iter().enumerate() {
        let unreachable = i
            .checked_sub(policy.budgets.len())
            .and_then(|j| usage.shared.get(j))
            .is_some_and(|s| s.unreachable);
        let shared = i >= policy.budgets.len();
        if shared && agent.control_plane_unreachable {
            // Already declined as offline; the allowance could not be asked for.
            continue;
        }
        if amount.amount > b.remaining && unreachable {
            reasons.push(Reason::new(
                ReasonCode::ControlPlaneUnreachable,
                format!(
                    "the {} {} budget is shared with other sidecars; this sidecar has {} of it left and cannot reach the control plane for more — retry later",
                    b.scope.as_str(),
                    b.period.as_str().replace('_', "-"),
                    Money::new(b.remaining.max(0), currency),
                ),
            ));
        } else if amount.amount > b.remaining {
            reasons.push(Reason::new(
                ReasonCode::ExceedsBudget,
                format!(
                    "{}{} budget has {} left of {}; this purchase needs {}{}",
                    match b.scope {
                        BudgetScope::Agent => "",
                        BudgetScope::Project => "shared project ",
                        BudgetScope::Org => "shared organization ",
                    },
                    b.period.as_str().replace('_', "-"),
                    Money::new(b.remaining.max(0), currency),
                    Money::new(b.limit, currency),
                    amount,
                    match b.resets_at {
                        Some(t) => format!("; it resets at {}", crate::domain::time::rfc3339(t)),
                        None => String::new(),
                    }
                ),
            ));
        }
    }

    merchant_reasons(policy, intent, &mut reasons);
    category_reasons(policy, intent, &mut reasons);
    country_reasons(policy, intent, &mut reasons);

    for (rule, count) in policy.velocity.iter().zip(usage.velocity_counts.iter()) {
        if *count >= rule.max_intents {
            reasons.push(Reason::new(
                ReasonCode::VelocityExceeded,
                format!(
                    "at most {} purchase requests per {} seconds; {} were made in the current window — wait before retrying",
                    rule.max_intents, rule.window_seconds, count
                ),
            ));
        }
    }
    if usage.velocity_counts.len() < policy.velocity.len() {
        // The caller did not supply every count: deny by default.
        reasons.push(Reason::new(
            ReasonCode::InternalError,
            "velocity history unavailable; declined to be safe",
        ));
    }

    if agent.confirmation == Confirmation::Refused {
        reasons.push(Reason::new(
            ReasonCode::ConfirmationDeclined,
            "the user declined this purchase when asked to confirm it; do not retry it without asking them",
        ));
    }

    if risk_assessment.score > policy.risk.decline_above {
        reasons.push(Reason::new(
            ReasonCode::RiskTooHigh,
            format!(
                "risk score {} is above this agent's limit of {}: {}. {}",
                risk_assessment.score,
                policy.risk.decline_above,
                risk_assessment.summary(),
                risk_assessment.top_message().unwrap_or_default()
            ),
        ));
    }

    if !reasons.is_empty() {
        return Decision {
            outcome: Outcome::Declined,
            reasons,
            reserve: 0,
            budgets,
            risk: Some(risk_assessment),
        };
    }

    let reserve = amount.amount + buffer(policy, amount.amount, &budgets);
    let mut pending = Vec::new();
    if let Some(threshold) = policy.require_approval_above
        && amount.amount > threshold
    {
        pending.push(Reason::new(
            ReasonCode::ApprovalRequired,
            format!(
                "purchases above {} need an administrator's approval; the amount is reserved while it waits",
                Money::new(threshold, currency)
            ),
        ));
    }
    if risk_assessment.score > policy.risk.require_approval_above {
        pending.push(Reason::new(
            ReasonCode::RiskReviewRequired,
            format!(
                "risk score {} is above {}, so an administrator must review this purchase (the amount is reserved while it waits): {}. {}",
                risk_assessment.score,
                policy.risk.require_approval_above,
                risk_assessment.summary(),
                risk_assessment.top_message().unwrap_or_default()
            ),
        ));
    }
    if !pending.is_empty() {
        return Decision {
            outcome: Outcome::PendingApproval,
            reasons: pending,
            reserve,
            budgets: apply(budgets, reserve),
            risk: Some(risk_assessment),
        };
    }
    if let Some(threshold) = policy.require_confirmation_above
        && amount.amount > threshold
        && agent.confirmation != Confirmation::Confirmed
    {
        return Decision {
            outcome: Outcome::PendingApproval,
            reasons: vec![Reason::new(
                ReasonCode::ConfirmationRequired,
                format!(
                    "purchases above {} need the user's confirmation, and it could not be asked here; an administrator must approve it (the amount is reserved while it waits)",
                    Money::new(threshold, currency)
                ),
            )],
            reserve,
            budgets: apply(budgets, reserve),
            risk: Some(risk_assessment),
        };
    }
    Decision {
        outcome: Outcome::Approved,
        reasons: vec![Reason::new(ReasonCode::WithinPolicy, "within policy")],
        reserve,
        budgets: apply(budgets, reserve),
        risk: Some(risk_assessment),
    }
}

/// The agent's budgets (policy order), then the shared budgets (usage order).
fn budget_statuses(policy: &CompiledPolicy, usage: &Usage, now: UnixSeconds) -> Vec<BudgetStatus> {
    let own = policy.budgets.iter().map(|rule| {
        let committed = usage.committed_in(rule.period);
        BudgetStatus {
            scope: BudgetScope::Agent,
            period: rule.period,
            limit: rule.limit,
            committed,
            remaining: rule.limit - committed,
            resets_at: rule.period.resets_at(now),
        }
    });
    let shared = usage.shared.iter().map(|s| BudgetStatus {
        scope: s.scope,
        period: s.period,
        limit: s.limit,
        committed: s.limit - s.available,
        remaining: s.available,
        resets_at: s.period.resets_at(now),
    });
    own.chain(shared).collect()
}

/// The card's spending limit may exceed the amount by the policy's buffer, but the buffer
/// shrinks so that no budget's reservation ever exceeds its limit.
fn buffer(policy: &CompiledPolicy, amount: i64, budgets: &[BudgetStatus]) -> i64 {
    let wanted = amount.saturating_mul(i64::from(policy.card_buffer_bps)) / 10_000;
    let headroom = budgets
        .iter()
        .map(|b| b.remaining - amount)
        .min()
        .unwrap_or(i64::MAX);
    wanted.min(headroom).max(0)
}

fn apply(mut budgets: Vec<BudgetStatus>, reserve: i64) -> Vec<BudgetStatus> {
    for b in &mut budgets {
        b.committed += reserve;
        b.remaining -= reserve;
    }
    budgets
}

fn merchant_reasons(policy: &CompiledPolicy, intent: &PurchaseIntent, reasons: &mut Vec<Reason>) {
    let m = &intent.merchant;
    let rules = &policy.merchants;
    let domain = m.domain.as_deref();
    let denied_domain =
        domain.and_then(|d| rules.deny_domains.iter().find(|r| domain_matches(d, r)));
    let denied_name = rules.deny_names.iter().find(|n| **n == m.normalized_name);
    if let Some(rule) = denied_domain {
        reasons.push(Reason::new(
            ReasonCode::MerchantNotAllowed,
            format!("merchant domain {rule} is blocked by policy"),
        ));
    } else if denied_name.is_some() {
        reasons.push(Reason::new(
            ReasonCode::MerchantNotAllowed,
            format!("merchant {:?} is blocked by policy", m.name),
        ));
    }
    let has_allow = !rules.allow_domains.is_empty() || !rules.allow_names.is_empty();
    if has_allow {
        let allowed_by_domain =
            domain.is_some_and(|d| rules.allow_domains.iter().any(|r| domain_matches(d, r)));
        let allowed_by_name = rules.allow_names.contains(&m.normalized_name);
        if !allowed_by_domain && !allowed_by_name {
            let mut list: Vec<&str> = rules.allow_domains.iter().map(String::as_str).collect();
            list.extend(rules.allow_names.iter().map(String::as_str));
            reasons.push(Reason::new(
                ReasonCode::MerchantNotAllowed,
                format!(
                    "this agent may only buy from: {}{}",
                    list.join(", "),
                    if domain.is_none() && !rules.allow_domains.is_empty() {
                        " (give merchant.url so the domain can be checked)"
                    } else {
                        ""
                    }
                ),
            ));
        }
    }
}

fn category_reasons(policy: &CompiledPolicy, intent: &PurchaseIntent, reasons: &mut Vec<Reason>) {
    let rules = &policy.categories;
    let category = intent.merchant.category.as_deref();
    if let Some(c) = category
        && rules.deny.iter().any(|d| d == c)
    {
        reasons.push(Reason::new(
            ReasonCode::CategoryNotAllowed,
            format!("merchant category {c} is blocked by policy"),
        ));
    }
    if !rules.allow.is_empty() && !category.is_some_and(|c| rules.allow.iter().any(|a| a == c)) {
        reasons.push(Reason::new(
            ReasonCode::CategoryNotAllowed,
            match category {
                Some(c) => format!(
                    "merchant category {c} is not allowed; allowed: {}",
                    rules.allow.join(", ")
                ),
                None => format!(
                    "this policy only allows categories {}; give merchant.category or merchant.mcc",
                    rules.allow.join(", ")
                ),
            },
        ));
    }
}

fn country_reasons(policy: &CompiledPolicy, intent: &PurchaseIntent, reasons: &mut Vec<Reason>) {
    let rules = &policy.countries;
    let country = intent.merchant.country.as_deref();
    if let Some(c) = country
        && rules.deny.iter().any(|d| d == c)
    {
        reasons.push(Reason::new(
            ReasonCode::CountryNotAllowed,
            format!("merchants in {c} are blocked by policy"),
        ));
    }
    if !rules.allow.is_empty() && !country.is_some_and(|c| rules.allow.iter().any(|a| a == c)) {
        reasons.push(Reason::new(
            ReasonCode::CountryNotAllowed,
            match country {
                Some(c) => format!(
                    "merchants in {c} are not allowed; allowed countries: {}",
                    rules.allow.join(", ")
                ),
                None => format!(
                    "this policy only allows merchants in {}; give merchant.country",
                    rules.allow.join(", ")
                ),
            },
        ));
    }
}

#[cfg(test)]
mod tests;
