//! What the service returns to agents, whichever interface they use (OpenAPI or MCP).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::domain::time::UnixSeconds;
use crate::issuer::BillingAddress;
use crate::policy::{BudgetStatus, Reason, RiskAssessment};
use crate::store::{IntentRecord, IntentStatus};

/// The merchant as Roony understood it (normalized).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
pub struct MerchantView {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mcc: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
}

/// A single-use virtual card. `number` and `cvc` are present only in the response that
/// created the card (or an idempotent replay of it); Roony never stores them.
#[derive(Clone, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
pub struct CardView {
    /// Stripe card id (`ic_…`).
    pub id: String,
    pub brand: String,
    pub last4: String,
    pub exp_month: i64,
    pub exp_year: i64,
    /// Full card number (PAN).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub number: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cvc: Option<String>,
    /// Billing postal code to enter at checkout.
    pub billing_zip: String,
    pub billing_address: BillingAddress,
    /// The most the card can be charged in total, minor units.
    pub spending_limit: i64,
    /// For vault delivery (`card_delivery: "vault"`): the placeholders to send instead of the
    /// card's data, through the sidecar's egress proxy, which replaces them only in requests
    /// to the merchant. `number` and `cvc` then hold the placeholders too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placeholders: Option<CardPlaceholders>,
}

/// Placeholders of a vault card, e.g. `{{roony:card:pur_…:number}}`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
pub struct CardPlaceholders {
    pub number: String,
    pub cvc: String,
    pub exp_month: String,
    pub exp_year: String,
}

impl CardPlaceholders {
    pub fn of(intent_id: &str) -> CardPlaceholders {
        use super::vault::{Field, placeholder};
        CardPlaceholders {
            number: placeholder(intent_id, Field::Number),
            cvc: placeholder(intent_id, Field::Cvc),
            exp_month: placeholder(intent_id, Field::ExpMonth),
            exp_year: placeholder(intent_id, Field::ExpYear),
        }
    }
}

impl std::fmt::Debug for CardView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CardView")
            .field("id", &self.id)
            .field("last4", &self.last4)
            .finish_non_exhaustive()
    }
}

/// Intent status as agents see it.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum StatusView {
    /// Approved; the card is being created.
    Processing,
    Approved,
    Declined,
    PendingApproval,
    /// Approved, but the card could not be created; nothing is reserved. Retry with the
    /// same idempotency key.
    Failed,
    Canceled,
    Expired,
    /// The card was charged and is closed; `settlement.spent` is final.
    Settled,
}

impl From<IntentStatus> for StatusView {
    fn from(s: IntentStatus) -> Self {
        match s {
            IntentStatus::Issuing => StatusView::Processing,
            IntentStatus::Approved => StatusView::Approved,
            IntentStatus::Declined => StatusView::Declined,
            IntentStatus::PendingApproval => StatusView::PendingApproval,
            IntentStatus::Failed => StatusView::Failed,
            IntentStatus::Canceled => StatusView::Canceled,
            IntentStatus::Expired => StatusView::Expired,
            IntentStatus::Settled => StatusView::Settled,
        }
    }
}

/// A purchase intent and its decision.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
pub struct IntentView {
    /// Intent id (`pur_…`).
    pub id: String,
    pub status: StatusView,
    /// Amount in minor units.
    pub amount: i64,
    /// ISO 4217 code, upper case.
    pub currency: String,
    pub merchant: MerchantView,
    pub description: String,
    /// Why: every matching rule, as a stable code and a message. Approvals carry
    /// `within_policy`.
    pub reasons: Vec<Reason>,
    /// Id of the decision record (for the decision log).
    pub decision_id: String,
    /// Budgets as of the decision.
    pub budgets: Vec<BudgetStatus>,
    /// The decision's risk score (0–100) and the signals behind it, each with its code,
    /// contribution and a message. A score above the policy's thresholds makes the purchase
    /// wait for review (`risk_review_required`) or declines it (`risk_too_high`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub risk: Option<RiskAssessment>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub card: Option<CardView>,
    /// Unix seconds.
    pub created: UnixSeconds,
    /// Unix seconds when the card (or the pending approval) expires.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<UnixSeconds>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// What merchants did with the card, once anything did: every authorization with
    /// Roony's decision, and the money captured and refunded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub settlement: Option<SettlementView>,
}

/// The card's activity at Stripe.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
pub struct SettlementView {
    pub authorizations: Vec<AuthorizationView>,
    /// Captured, minor units.
    pub captured: i64,
    /// Refunded, minor units.
    pub refunded: i64,
    /// Approved but not yet captured, minor units.
    pub pending: i64,
    /// Captured net of refunds, minor units: what the purchase cost.
    pub spent: i64,
    /// The card is closed: `spent` is final and the rest of the reservation was released.
    pub closed: bool,
    /// Problems found (e.g. `over_capture`), if any.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub discrepancies: Vec<String>,
}

/// One authorization (a merchant's charge attempt) on the card.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
pub struct AuthorizationView {
    /// Stripe authorization id (`iauth_…`).
    pub id: String,
    pub amount: i64,
    pub currency: String,
    pub approved: bool,
    /// `pending`, `closed`, `reversed` or `expired`.
    pub status: String,
    pub merchant_name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub merchant_country: Option<String>,
    /// Why it was approved or declined (e.g. `matches_intent`, `merchant_mismatch`).
    pub reasons: Vec<String>,
    pub created: UnixSeconds,
}

impl IntentView {
    pub fn from_record(rec: &IntentRecord) -> IntentView {
        let m = &rec.request.merchant;
        let mut reasons = rec.decision.reasons.clone();
        if let Some(r) = &rec.status_reason {
            reasons.push(r.clone());
        }
        IntentView {
            id: rec.id.clone(),
            status: rec.status.into(),
            amount: rec.request.amount.amount,
            currency: rec.request.amount.currency.code().to_string(),
            merchant: MerchantView {
                name: m.name.clone(),
                domain: m.domain.clone(),
                country: m.country.clone(),
                mcc: m.mcc.map(|c| format!("{c:04}")),
                category: m.category.clone(),
            },
            description: rec.request.description.clone(),
            reasons,
            decision_id: rec.decision.id.clone(),
            budgets: rec.decision.budgets.clone(),
            risk: rec.decision.risk.clone(),
            card: rec.card.as_ref().map(|c| {
                let placeholders = (rec.request.card_delivery
                    == Some(crate::domain::intent::CardDelivery::Vault)
                    && rec.status == IntentStatus::Approved)
                    .then(|| CardPlaceholders::of(&rec.id));
                CardView {
                    id: c.id.clone(),
                    brand: c.brand.clone(),
                    last4: c.last4.clone(),
                    exp_month: c.exp_month,
                    exp_year: c.exp_year,
                    number: placeholders.as_ref().map(|p| p.number.clone()),
                    cvc: placeholders.as_ref().map(|p| p.cvc.clone()),
                    billing_zip: c.billing.postal_code.clone(),
                    billing_address: c.billing.clone(),
                    spending_limit: c.spending_limit,
                    placeholders,
                }
            }),
            created: rec.created,
            expires_at: rec.expires_at,
            idempotency_key: rec.request.idempotency_key.clone(),
            settlement: rec.settlement.as_ref().map(|s| SettlementView {
                authorizations: s
                    .authorizations
                    .iter()
                    .map(|a| AuthorizationView {
                        id: a.id.clone(),
                        amount: a.amount,
                        currency: a.currency.clone(),
                        approved: a.approved,
                        status: a.status.clone(),
                        merchant_name: a.merchant_name.clone(),
                        merchant_country: a.merchant_country.clone(),
                        reasons: a.reasons.clone(),
                        created: a.created_at,
                    })
                    .collect(),
                captured: s.captured,
                refunded: s.refunded,
                pending: s.pending,
                spent: s.captured.saturating_sub(s.refunded).max(0),
                closed: s.closed,
                discrepancies: s.discrepancies.clone(),
            }),
        }
    }
}

/// A page of intents, newest first.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
pub struct IntentPage {
    pub data: Vec<IntentView>,
    pub has_more: bool,
    /// Pass as `starting_after` to get the next page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// The agent's budgets right now.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
pub struct BudgetView {
    pub agent_id: String,
    pub currency: String,
    /// Largest single purchase, minor units.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_per_transaction: Option<i64>,
    /// Purchases above this need an administrator's approval, minor units.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub require_approval_above: Option<i64>,
    pub budgets: Vec<BudgetStatus>,
    /// A sentence summarizing what is left, for an LLM.
    pub summary: String,
}
