//! Decisions: an outcome, its reasons (stable snake_case codes plus messages an LLM can act
//! on), the amount to reserve, and the budget picture after the decision.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::domain::time::{Period, UnixSeconds};

use super::risk::RiskAssessment;

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Approved,
    Declined,
    PendingApproval,
}

/// Stable reason codes. Never rename one: agents and dashboards match on them.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum ReasonCode {
    /// Approved: every rule passed.
    WithinPolicy,
    /// Above the policy's approval threshold: waits for an administrator.
    ApprovalRequired,
    /// Above the confirmation threshold and the user could not be asked: waits for an
    /// administrator.
    ConfirmationRequired,
    /// The user was asked to confirm the purchase and said no.
    ConfirmationDeclined,
    ExceedsTransactionLimit,
    ExceedsBudget,
    MerchantNotAllowed,
    CategoryNotAllowed,
    CountryNotAllowed,
    VelocityExceeded,
    CurrencyNotAllowed,
    AgentFrozen,
    /// The agent has no policy: deny by default.
    NoPolicy,
    /// Something failed while deciding; failures decline.
    InternalError,
    /// Approved, but the card could not be created; the reservation was released.
    CardIssuanceFailed,
    /// The card or approval window expired unused; the reservation was released.
    IntentExpired,
    /// Canceled by the agent; the reservation was released.
    IntentCanceled,
    /// The decision needs the control plane (an allowance of a shared budget, or a policy
    /// bundle fresher than the sidecar's offline limit) and it cannot be reached.
    ControlPlaneUnreachable,
    /// A `pending_approval` intent approved by an administrator.
    ApprovedByAdmin,
    /// A `pending_approval` intent denied by an administrator.
    DeniedByAdmin,
    /// The intent's risk score is above the policy's `risk.decline_above`.
    RiskTooHigh,
    /// The intent's risk score is above the policy's `risk.require_approval_above`: waits
    /// for an administrator.
    RiskReviewRequired,
    /// The organization's Stripe account is disconnected from the control plane, which
    /// issues the cards: nothing can be issued until an administrator reconnects it.
    StripeAccountDisconnected,
}

impl ReasonCode {
    pub fn as_str(&self) -> &'static str {
        match self {
            ReasonCode::WithinPolicy => "within_policy",
            ReasonCode::ApprovalRequired => "approval_required",
            ReasonCode::ConfirmationRequired => "confirmation_required",
            ReasonCode::ConfirmationDeclined => "confirmation_declined",
            ReasonCode::ExceedsTransactionLimit => "exceeds_transaction_limit",
            ReasonCode::ExceedsBudget => "exceeds_budget",
            ReasonCode::MerchantNotAllowed => "merchant_not_allowed",
            ReasonCode::CategoryNotAllowed => "category_not_allowed",
            ReasonCode::CountryNotAllowed => "country_not_allowed",
            ReasonCode::VelocityExceeded => "velocity_exceeded",
            ReasonCode::CurrencyNotAllowed => "currency_not_allowed",
            ReasonCode::AgentFrozen => "agent_frozen",
            ReasonCode::NoPolicy => "no_policy",
            ReasonCode::InternalError => "internal_error",
            ReasonCode::CardIssuanceFailed => "card_issuance_failed",
            ReasonCode::IntentExpired => "intent_expired",
            ReasonCode::IntentCanceled => "intent_canceled",
            ReasonCode::ControlPlaneUnreachable => "control_plane_unreachable",
            ReasonCode::ApprovedByAdmin => "approved_by_admin",
            ReasonCode::DeniedByAdmin => "denied_by_admin",
            ReasonCode::RiskTooHigh => "risk_too_high",
            ReasonCode::RiskReviewRequired => "risk_review_required",
            ReasonCode::StripeAccountDisconnected => "stripe_account_disconnected",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
pub struct Reason {
    pub code: ReasonCode,
    /// A sentence an LLM can act on, e.g. "daily budget has USD 12.40 left".
    pub message: String,
}

impl Reason {
    pub fn new(code: ReasonCode, message: impl Into<String>) -> Reason {
        Reason {
            code,
            message: message.into(),
        }
    }
}

/// Whose budget it is.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    ToSchema,
    schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum BudgetScope {
    /// The agent's own budget (its policy's, or set on the agent by an administrator).
    #[default]
    Agent,
    /// Shared by every agent of the project, on every sidecar.
    Project,
    /// Shared by every project of the organization.
    Org,
}

impl BudgetScope {
    pub fn as_str(&self) -> &'static str {
        match self {
            BudgetScope::Agent => "agent",
            BudgetScope::Project => "project",
            BudgetScope::Org => "org",
        }
    }
}

/// One budget of the agent, as of a decision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
pub struct BudgetStatus {
    /// `agent`, or `project`/`org` for a shared budget. For a shared budget, `remaining` is
    /// what this sidecar may still approve now (its allowance from the control plane), and
    /// `committed` is the rest of the limit.
    #[serde(default)]
    pub scope: BudgetScope,
    #[schema(value_type = String, example = "daily")]
    pub period: Period,
    /// The limit, in minor units.
    pub limit: i64,
    /// Reserved plus spent in the current period, in minor units.
    pub committed: i64,
    /// What is left, in minor units (negative only if the limit was lowered below use).
    pub remaining: i64,
    /// Unix seconds when the period resets (absent for all-time budgets).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resets_at: Option<UnixSeconds>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub outcome: Outcome,
    pub reasons: Vec<Reason>,
    /// Minor units to reserve (the card's spending limit): 0 when declined.
    pub reserve: i64,
    /// Budgets after the decision (including the reservation when approved).
    pub budgets: Vec<BudgetStatus>,
    /// The intent's risk score and its signals (`None` when the decision failed before
    /// scoring, e.g. an unknown agent).
    pub risk: Option<RiskAssessment>,
}

impl Decision {
    /// A decline for a failure on the decision path: errors never approve.
    pub fn error(code: ReasonCode, message: impl Into<String>) -> Decision {
        Decision {
            outcome: Outcome::Declined,
            reasons: vec![Reason::new(code, message)],
            reserve: 0,
            budgets: Vec::new(),
            risk: None,
        }
    }
}
