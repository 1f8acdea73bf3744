//! The control plane's records as the admin API shows them. Times are Unix seconds; money
//! is integer minor units with an ISO 4217 currency code.

use base64::Engine;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Organization {
    pub id: String,
    pub name: String,
    /// The organization created at first start; new projects go here unless told otherwise.
    pub is_default: bool,
    pub created_at: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Project {
    pub id: String,
    pub org_id: String,
    pub name: String,
    pub created_at: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Agent {
    pub id: String,
    pub org_id: String,
    pub project_id: String,
    pub name: String,
    /// `active` or `frozen`.
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frozen_reason: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// A sidecar identity: it fetches the policy bundle of its project (sync). Its token is
/// shown once at creation; only the token's SHA-256 hex is stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Sidecar {
    pub id: String,
    pub project_id: String,
    pub name: String,
    pub created_at: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<i64>,
}

/// An admin API token as listed: its id, name and dates, never the token or its hash (the
/// token is shown once, at creation). `last_used_at` is updated on authentication at most
/// once a minute per token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AdminToken {
    /// Derived from the token (`h` + 15 hex).
    pub id: String,
    pub name: String,
    pub created_at: i64,
    /// Last successful authentication (to the minute); `null` if never used.
    pub last_used_at: Option<i64>,
    /// `null` while the token is active.
    pub revoked_at: Option<i64>,
}

/// An agent key as stored: its id and dates, never the key or its hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AgentKey {
    pub key_id: String,
    pub agent_id: String,
    pub created_at: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PolicyRevision {
    pub agent_id: String,
    pub policy_id: String,
    /// 1 for the first policy written, then one more for each change.
    pub revision: i64,
    /// The admin token (name) that wrote this revision.
    pub author: String,
    pub created_at: i64,
    #[schema(value_type = crate::policy::Policy)]
    pub document: serde_json::Value,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BudgetScope {
    Org,
    Project,
    Agent,
}

impl BudgetScope {
    pub fn as_str(&self) -> &'static str {
        match self {
            BudgetScope::Org => "org",
            BudgetScope::Project => "project",
            BudgetScope::Agent => "agent",
        }
    }

    pub fn parse(s: &str) -> Option<BudgetScope> {
        match s {
            "org" => Some(BudgetScope::Org),
            "project" => Some(BudgetScope::Project),
            "agent" => Some(BudgetScope::Agent),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Budget {
    pub id: String,
    pub scope: BudgetScope,
    /// The organization, project or agent id.
    pub scope_id: String,
    /// `daily`, `weekly`, `monthly` or `all_time` (UTC calendar periods).
    pub period: String,
    /// ISO 4217, upper case.
    pub currency: String,
    /// Minor units.
    pub limit: i64,
    pub created_at: i64,
    pub updated_at: i64,
}

/// A purchase intent in the ledger.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Intent {
    pub id: String,
    pub org_id: String,
    pub project_id: String,
    pub agent_id: String,
    /// `pending_approval`, `approved`, `declined`, `canceled`, `expired`, `failed`,
    /// `issuing` or `settled` (captured at Stripe, card canceled, nothing pending).
    pub status: String,
    /// Minor units.
    pub amount: i64,
    pub currency: String,
    pub merchant_name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub merchant_domain: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub merchant_country: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The latest decision about it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision_id: Option<String>,
    /// Reason codes of the latest decision.
    pub reasons: Vec<String>,
    pub created_at: i64,
    pub updated_at: i64,
    /// The sidecar's version of the intent last applied from its events (0 if none was).
    pub version: i64,
    /// Minor units the sidecar holds against budgets for it (0 once released).
    pub reserved: i64,
    /// The sidecar that reported it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sidecar_id: Option<String>,
    /// The status the sidecar last reported (`status` may already hold an administrator's
    /// decision the sidecar has not acted on yet).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sidecar_status: Option<String>,
    /// Reason code of the last status change at the sidecar (e.g. `card_issuance_failed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_reason: Option<String>,
    /// Stripe merchant category the purchase named.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub merchant_category: Option<String>,
    /// Unix seconds when the purchase's card (or pending approval) expires.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
    /// Captured on the purchase's card at Stripe, minor units (Stripe webhooks).
    pub captured: i64,
    /// Refunded, minor units.
    pub refunded: i64,
    /// Approved authorizations not yet captured, reversed or expired, minor units.
    pub pending: i64,
    /// The sidecar's risk score (0–100) of the intent, when it reported one.
    pub risk_score: Option<i64>,
    /// The risk signals that contributed (codes, e.g. `split_purchase`).
    pub risk_signals: Vec<String>,
}

/// An intent to record in the ledger (as a sidecar decided it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewIntent {
    pub id: String,
    pub agent_id: String,
    pub status: String,
    pub amount: i64,
    pub currency: String,
    pub merchant_name: String,
    pub merchant_domain: Option<String>,
    pub merchant_country: Option<String>,
    pub description: Option<String>,
    pub reasons: Vec<String>,
    /// When set, a decision by the sidecar with this outcome is recorded too.
    pub decision_outcome: Option<String>,
    pub created_at: i64,
}

/// A decision about an intent: by a sidecar's policy engine or by an administrator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Decision {
    pub id: String,
    pub intent_id: String,
    pub org_id: String,
    pub project_id: String,
    pub agent_id: String,
    /// `approved`, `declined` or `pending_approval`.
    pub outcome: String,
    pub reasons: Vec<String>,
    /// `sidecar` or `admin`.
    pub decided_by: String,
    /// The admin token (name) for administrators' decisions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_revision: Option<i64>,
    pub created_at: i64,
}

/// A sidecar's allowance of a shared budget for one period bucket (see
/// `crate::sync::wire::LeaseRequest`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BudgetLease {
    pub budget_id: String,
    /// Unix seconds of the bucket's start (UTC); 0 for `all_time`.
    pub bucket_start: i64,
    pub sidecar_id: String,
    /// Minor units.
    pub granted: i64,
    /// The sidecar's lease request sequence number that set it.
    pub seq: i64,
    pub updated_at: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewDecision {
    pub intent_id: String,
    pub outcome: String,
    pub reasons: Vec<String>,
    pub decided_by: String,
    pub actor_id: Option<String>,
    pub note: Option<String>,
    pub created_at: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AuditEvent {
    pub id: String,
    pub actor_type: String,
    pub actor_id: String,
    pub action: String,
    pub target_type: String,
    pub target_id: String,
    pub outcome: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    pub created_at: i64,
    pub details: serde_json::Value,
}

// ----- Stripe webhooks ----------------------------------------------------------------

/// An Issuing authorization as Roony decided it (real time) or Stripe reported it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Authorization {
    /// Stripe id (`iauth_…`).
    pub id: String,
    /// Stripe card id (`ic_…`).
    pub card_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub intent_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub project_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub org_id: Option<String>,
    /// Approved (or requested, if declined), minor units.
    pub amount: i64,
    /// ISO 4217 as Stripe sends it (lower case).
    pub currency: String,
    pub approved: bool,
    /// `pending`, `closed`, `reversed` or `expired`.
    pub status: String,
    pub merchant_name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub merchant_city: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub merchant_country: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub merchant_category: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub merchant_network_id: Option<String>,
    /// Roony's reason codes (`decided_by: roony`) or Stripe's request reasons.
    pub reasons: Vec<String>,
    /// `roony` (real-time decision) or `stripe`.
    pub decided_by: String,
    pub created_at: i64,
    pub updated_at: i64,
}

/// Money that moved differently from what was approved.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Discrepancy {
    pub id: String,
    /// `over_capture`, `force_capture`, `capture_on_inactive_intent`, `merchant_mismatch`,
    /// `unmatched_refund`, `unknown_card` or `orphan_card`.
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub intent_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub card_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub project_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub org_id: Option<String>,
    /// The Stripe object (`iauth_…`, `ipi_…`, `ic_…`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stripe_object_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amount: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
    pub details: serde_json::Value,
    pub created_at: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolved_at: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolved_by: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolution_note: Option<String>,
}

/// A Stripe event's envelope (what deduplication and the audit trail need).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StripeEventMeta {
    pub id: String,
    pub kind: String,
    pub account: Option<String>,
    pub created: i64,
}

/// `merchant_data` of an authorization or transaction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MerchantData {
    pub name: String,
    pub url: Option<String>,
    pub city: Option<String>,
    pub country: Option<String>,
    pub category: Option<String>,
    pub network_id: Option<String>,
}

/// An Issuing card as an event carries it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StripeCard {
    pub id: String,
    /// `active`, `inactive` or `canceled`.
    pub status: Option<String>,
    pub metadata: std::collections::BTreeMap<String, String>,
    pub last4: Option<String>,
    pub exp_month: Option<i64>,
    pub exp_year: Option<i64>,
}

/// An Issuing authorization as an event carries it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StripeAuthorization {
    pub id: String,
    pub card: StripeCard,
    /// `amount` of the object (held, minor units).
    pub amount: i64,
    pub currency: String,
    pub approved: bool,
    pub status: String,
    pub merchant: MerchantData,
    /// `pending_request.amount` / `.currency` (real-time requests only).
    pub pending_amount: Option<i64>,
    pub pending_currency: Option<String>,
    /// `request_history[].reason`, in order, without repeats.
    pub request_reasons: Vec<String>,
    /// The last `request_history[].amount`.
    pub last_request_amount: Option<i64>,
    pub created: i64,
}

/// An Issuing transaction as an event carries it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StripeTransaction {
    pub id: String,
    pub card_id: String,
    pub authorization_id: Option<String>,
    /// `capture` or `refund`.
    pub kind: String,
    /// Positive minor units: spent (capture) or credited (refund).
    pub amount: i64,
    pub currency: String,
    pub merchant: MerchantData,
    pub created: i64,
}

/// Position in a newest-first listing: the last row returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cursor {
    pub created_at: i64,
    pub id: String,
}

impl Cursor {
    /// Opaque text form (URL-safe base64 of `created_at:id`).
    pub fn encode(&self) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(format!("{}:{}", self.created_at, self.id))
    }

    pub fn decode(text: &str) -> Option<Cursor> {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text)
            .ok()?;
        let text = String::from_utf8(bytes).ok()?;
        let (created, id) = text.split_once(':')?;
        if id.is_empty() || id.len() > 128 {
            return None;
        }
        Some(Cursor {
            created_at: created.parse().ok()?,
            id: id.to_string(),
        })
    }
}

/// One page of a newest-first listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

impl<T> Page<T> {
    /// `rows` were fetched with `LIMIT limit + 1`: one more than `limit` means more follow.
    pub fn from_rows(mut rows: Vec<T>, limit: i64, cursor: impl Fn(&T) -> Cursor) -> Page<T> {
        let limit = usize::try_from(limit).unwrap_or(0);
        let more = rows.len() > limit;
        rows.truncate(limit);
        let next_cursor = if more {
            rows.last().map(|r| cursor(r).encode())
        } else {
            None
        };
        Page {
            items: rows,
            next_cursor,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let c = Cursor {
            created_at: 1_795_000_000,
            id: "pur_01abc".into(),
        };
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
        for bad in ["", "%%", "bm9jb2xvbg", "MTIzOg", "eDpwdXI"] {
            assert_eq!(Cursor::decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn pages_know_when_more_follow() {
        let cursor = |v: &i64| Cursor {
            created_at: *v,
            id: v.to_string(),
        };
        let p = Page::from_rows(vec![5, 4, 3], 2, cursor);
        assert_eq!(p.items, vec![5, 4]);
        assert_eq!(
            p.next_cursor.as_deref().and_then(Cursor::decode),
            Some(cursor(&4))
        );
        let p = Page::from_rows(vec![5, 4], 2, cursor);
        assert_eq!(p.items, vec![5, 4]);
        assert_eq!(p.next_cursor, None);
        assert_eq!(BudgetScope::parse("project"), Some(BudgetScope::Project));
        assert_eq!(
            BudgetScope::parse(BudgetScope::Org.as_str()),
            Some(BudgetScope::Org)
        );
        assert_eq!(BudgetScope::parse("team"), None);
    }
}

// ----- reconciliation --------------------------------------------------------------------

/// One difference between Stripe and the ledger that a reconciliation found, and what it
/// did about it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ReconcileEntry {
    /// `card_status_differs`, `card_adopted`, `orphan_card_canceled`,
    /// `card_should_be_canceled`, `card_missing_at_stripe`, `authorization_missing`,
    /// `authorization_differs`, `transaction_missing` or `transaction_differs`.
    pub kind: String,
    /// The Stripe object (`ic_…`, `iauth_…`, `ipi_…`).
    pub stripe_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intent_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    /// What differed, in words.
    pub detail: String,
    /// `adopted` (card row inserted), `canceled` (card canceled at Stripe), `recorded`
    /// (applied to the ledger as its webhook would have been), `failed` (the action was
    /// tried and failed; see `detail`) or `none` (reported only).
    pub action: String,
}

/// Counts of a reconciliation run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ReconcileTotals {
    /// Stripe cards looked at (Roony's and others).
    pub cards_checked: i64,
    /// Stripe cards that are not Roony's (no `roony_*` metadata, unknown to the ledger):
    /// counted, never touched.
    pub foreign_cards: i64,
    pub authorizations_checked: i64,
    pub transactions_checked: i64,
    /// Cards inserted into the ledger.
    pub adopted: i64,
    /// Cards canceled at Stripe.
    pub canceled: i64,
    /// Objects applied to the ledger (card status, authorizations, transactions).
    pub recorded: i64,
    /// Entries in the report.
    pub differences: i64,
}

/// What a reconciliation run compared and found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ReconcileReport {
    /// Authorizations and transactions created at or after this (Unix seconds) were
    /// compared; every card is.
    pub since: i64,
    pub totals: ReconcileTotals,
    pub entries: Vec<ReconcileEntry>,
    /// Why the run failed (`status: failed`); the entries found before stay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A reconciliation run with its report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ReconciliationRun {
    /// `rcn_…`
    pub id: String,
    pub started_at: i64,
    pub finished_at: i64,
    /// `ok` or `failed`.
    pub status: String,
    /// `system` (the periodic task) or `admin_token`.
    pub actor_type: String,
    pub actor_id: String,
    pub report: ReconcileReport,
}
