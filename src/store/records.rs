//! Records kept in the sidecar's redb database. Values are JSON so that a schema change can
//! add fields with serde defaults; keys are typed tuples (see docs/design.md).

use serde::{Deserialize, Serialize};

use crate::domain::intent::PurchaseIntent;
use crate::domain::money::Currency;
use crate::domain::time::{Period, UnixSeconds};
use crate::policy::{BudgetScope, BudgetStatus, Outcome, Policy, Reason, RiskAssessment};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentStatus {
    Active,
    Frozen,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub id: String,
    pub name: String,
    pub status: AgentStatus,
    pub policy: Policy,
    pub created: UnixSeconds,
}

/// An agent key: only its SHA-256 hash is stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentKeyRecord {
    pub agent_id: String,
    /// Hex SHA-256 of the whole key.
    pub key_hash: String,
    pub created: UnixSeconds,
    pub revoked: bool,
}

/// Where an intent is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IntentStatus {
    /// Approved and reserved; the card is being created at Stripe.
    Issuing,
    /// Approved; the card is active and unused.
    Approved,
    Declined,
    PendingApproval,
    /// Approved, but the card could not be created; the reservation was released.
    Failed,
    Canceled,
    Expired,
    /// The card was charged and is closed: the captured amount (net of refunds) is spent.
    Settled,
}

impl IntentStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            IntentStatus::Issuing => "issuing",
            IntentStatus::Approved => "approved",
            IntentStatus::Declined => "declined",
            IntentStatus::PendingApproval => "pending_approval",
            IntentStatus::Failed => "failed",
            IntentStatus::Canceled => "canceled",
            IntentStatus::Expired => "expired",
            IntentStatus::Settled => "settled",
        }
    }
}

/// Money held against the agent's budgets for one intent, and the buckets it was counted in,
/// so that a release subtracts from exactly those buckets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    pub amount: i64,
    pub currency: Currency,
    /// (period, bucket start) for every period kind.
    pub buckets: Vec<(Period, UnixSeconds)>,
    /// (shared budget id, bucket start) of every shared budget the reservation counts in.
    #[serde(default)]
    pub shared: Vec<(String, UnixSeconds)>,
}

/// A shared (project or organization) budget from the sync bundle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedBudget {
    pub id: String,
    pub scope: BudgetScope,
    pub period: Period,
    pub currency: Currency,
    pub limit: i64,
}

/// An administrator's decision on a pending intent (from the sync bundle).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminDecision {
    pub intent_id: String,
    pub agent_id: String,
    pub approved: bool,
    pub note: Option<String>,
    pub actor: String,
}

/// A shared budget's bucket that needs a larger allowance for a purchase.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseNeed {
    pub budget_id: String,
    pub bucket_start: UnixSeconds,
    pub limit: i64,
    /// The allowance held now.
    pub lease: i64,
    /// Reserved in the bucket now.
    pub used: i64,
    /// What the purchase may reserve (amount plus the policy's buffer).
    pub need: i64,
}

/// A lease as the sidecar holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseState {
    pub budget_id: String,
    pub bucket_start: UnixSeconds,
    pub lease: i64,
    pub used: i64,
}

/// A reference to a card at Stripe. Never a card number or CVC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CardRef {
    pub id: String,
    pub brand: String,
    pub last4: String,
    pub exp_month: i64,
    pub exp_year: i64,
    /// The card's all-time spending limit, minor units.
    pub spending_limit: i64,
    pub cardholder: String,
    pub billing: crate::issuer::BillingAddress,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionRecord {
    pub id: String,
    pub outcome: Outcome,
    pub reasons: Vec<Reason>,
    pub budgets: Vec<BudgetStatus>,
    pub decided_at: UnixSeconds,
    /// The risk score and its signals (absent in decisions made before risk scoring, and
    /// when the decision failed before scoring).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub risk: Option<RiskAssessment>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntentRecord {
    pub id: String,
    pub agent_id: String,
    pub created: UnixSeconds,
    pub updated: UnixSeconds,
    pub request: PurchaseIntent,
    /// Hex SHA-256 of the validated request, to detect an idempotency key reused with a
    /// different body.
    pub request_hash: String,
    pub status: IntentStatus,
    pub decision: DecisionRecord,
    /// Present while money is held; `None` once released or never reserved.
    pub reservation: Option<Reservation>,
    pub card: Option<CardRef>,
    /// Sent to Stripe on card creation; persisted before the call so a retry never makes a
    /// second card.
    pub stripe_idempotency_key: String,
    /// When the card (or the pending approval) expires.
    pub expires_at: Option<UnixSeconds>,
    /// The last status change's reason, e.g. `card_issuance_failed` with Stripe's message.
    pub status_reason: Option<Reason>,
    /// How many times card issuance was attempted for this intent.
    pub issuance_attempts: u32,
    /// Increases with every change (1 at the decision); orders the sync events.
    #[serde(default)]
    pub version: u32,
    /// The buckets the decision's reservation was counted in (kept after a release, so that
    /// money moving later on the card is counted in the same buckets).
    #[serde(default)]
    pub hold_buckets: Option<Reservation>,
    /// What happened on the card at Stripe, as the control plane reported it.
    #[serde(default)]
    pub settlement: Option<SettlementRecord>,
}

/// The money state of an intent's card at Stripe (from the control plane's updates feed).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettlementRecord {
    /// The feed sequence number this state came with (older updates are ignored).
    pub seq: i64,
    pub card_status: Option<String>,
    pub authorizations: Vec<AuthorizationRecord>,
    pub captured: i64,
    pub refunded: i64,
    pub pending: i64,
    pub closed: bool,
    pub discrepancies: Vec<String>,
}

impl SettlementRecord {
    /// Money that moved on the card and still counts: pending authorizations plus captures,
    /// net of refunds.
    pub fn moved(&self) -> i64 {
        self.pending
            .saturating_add(self.captured)
            .saturating_sub(self.refunded)
            .max(0)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthorizationRecord {
    pub id: String,
    pub amount: i64,
    pub currency: String,
    pub approved: bool,
    pub status: String,
    pub merchant_name: String,
    pub merchant_country: Option<String>,
    pub merchant_category: Option<String>,
    pub reasons: Vec<String>,
    pub created_at: i64,
}
