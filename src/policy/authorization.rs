//! Real-time authorization decisions: is this charge on a Roony card the purchase that was
//! approved? A pure function of the intent (as approved), the card's history and the
//! authorization request — no I/O, no clock (time is an argument) — so it is fast, testable
//! and replayable. Deny by default: every failed check adds a reason; any reason declines.

use serde::{Deserialize, Serialize};

use crate::domain::merchant::{MatchBasis, match_descriptor};
use crate::domain::money::{Currency, Money};

/// Stable reason codes of authorization decisions. Never rename one.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
    schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum AuthReasonCode {
    /// Approved: the charge matches the approved purchase.
    MatchesIntent,
    /// The card is not one Roony issued, or its purchase is unknown.
    UnknownCard,
    /// The purchase is not approved (declined, canceled, failed, pending).
    IntentNotActive,
    /// The purchase's card window is over.
    IntentExpired,
    AgentFrozen,
    CurrencyMismatch,
    /// More than the approved amount (plus buffer) in total.
    ExceedsApprovedAmount,
    /// The merchant's category is not the purchase's.
    CategoryMismatch,
    /// The merchant's country is not the purchase's.
    MerchantCountryMismatch,
    /// The descriptor does not name the purchase's merchant.
    MerchantMismatch,
    /// The card is locked to another merchant (network id) by its first authorization.
    MerchantNetworkMismatch,
    /// Single-use: another authorization was already approved on this card.
    CardAlreadyUsed,
    /// The decision could not be made in time or failed: declined to be safe.
    InternalError,
}

impl AuthReasonCode {
    pub fn as_str(&self) -> &'static str {
        match self {
            AuthReasonCode::MatchesIntent => "matches_intent",
            AuthReasonCode::UnknownCard => "unknown_card",
            AuthReasonCode::IntentNotActive => "intent_not_active",
            AuthReasonCode::IntentExpired => "intent_expired",
            AuthReasonCode::AgentFrozen => "agent_frozen",
            AuthReasonCode::CurrencyMismatch => "currency_mismatch",
            AuthReasonCode::ExceedsApprovedAmount => "exceeds_approved_amount",
            AuthReasonCode::CategoryMismatch => "category_mismatch",
            AuthReasonCode::MerchantCountryMismatch => "merchant_country_mismatch",
            AuthReasonCode::MerchantMismatch => "merchant_mismatch",
            AuthReasonCode::MerchantNetworkMismatch => "merchant_network_mismatch",
            AuthReasonCode::CardAlreadyUsed => "card_already_used",
            AuthReasonCode::InternalError => "internal_error",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthReason {
    pub code: AuthReasonCode,
    pub message: String,
}

impl AuthReason {
    fn new(code: AuthReasonCode, message: impl Into<String>) -> AuthReason {
        AuthReason {
            code,
            message: message.into(),
        }
    }
}

/// The approved purchase behind a card, as the control plane knows it (from the ledger or
/// from the card's signed metadata).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthIntent {
    pub intent_id: String,
    /// `approved` or `issuing` (card usable); anything else declines.
    pub status: String,
    pub currency: Currency,
    /// The card's spending limit: the approved amount plus buffer, minor units.
    pub limit: i64,
    pub merchant_name: String,
    pub merchant_domain: Option<String>,
    pub merchant_country: Option<String>,
    /// Stripe category name, when the purchase named one.
    pub merchant_category: Option<String>,
    /// Unix seconds after which the card must not be used.
    pub expires_at: Option<i64>,
    pub agent_frozen: bool,
}

/// What already happened on the card.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuthCardHistory {
    /// Set by the first approved authorization: later ones must come from this merchant.
    pub locked_network_id: Option<String>,
    /// Approved authorizations on the card other than this one that were not reversed or
    /// expired (a single-use card allows none).
    pub other_approved: u32,
    /// Amount already approved on this authorization (an incremental authorization asks
    /// for more on the same id).
    pub approved_on_this: i64,
    /// Captured on the card, net of refunds, outside this authorization (force captures).
    pub captured_elsewhere: i64,
}

/// The authorization request (`pending_request` and `merchant_data` of the event).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthRequest {
    /// Minor units requested now (for an increment: the additional amount).
    pub amount: i64,
    /// Lower-case ISO code as Stripe sends it.
    pub currency: String,
    pub merchant_name: String,
    pub merchant_url: Option<String>,
    pub merchant_country: Option<String>,
    pub merchant_category: Option<String>,
    pub merchant_network_id: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthDecision {
    pub approved: bool,
    pub reasons: Vec<AuthReason>,
    /// For an approval of an unlocked card: lock it to this network id.
    pub lock_network_id: Option<String>,
    /// How the merchant was recognized (`domain`, `name`, `prefix`, `words`, `network_id`
    /// or `none`).
    pub merchant_basis: &'static str,
}

impl AuthDecision {
    /// A decline for a failure on the decision path.
    pub fn error(code: AuthReasonCode, message: impl Into<String>) -> AuthDecision {
        AuthDecision {
            approved: false,
            reasons: vec![AuthReason::new(code, message)],
            lock_network_id: None,
            merchant_basis: "none",
        }
    }

    /// Reason codes, comma-separated (for Stripe metadata).
    pub fn codes(&self) -> String {
        self.reasons
            .iter()
            .map(|r| r.code.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Decides an authorization. Checks everything and reports every failing check.
pub fn decide_authorization(
    intent: &AuthIntent,
    card: &AuthCardHistory,
    req: &AuthRequest,
    now: i64,
) -> AuthDecision {
    let mut reasons = Vec::new();
    // `issuing`: approved, the card exists at Stripe and the sidecar is recording it — a
    // merchant may well charge it before the sidecar's next event arrives.
    if intent.status != "approved" && intent.status != "issuing" {
        reasons.push(AuthReason::new(
            AuthReasonCode::IntentNotActive,
            format!(
                "purchase {} is {}, not approved",
                intent.intent_id, intent.status
            ),
        ));
    }
    if let Some(at) = intent.expires_at
        && now > at
    {
        reasons.push(AuthReason::new(
            AuthReasonCode::IntentExpired,
            format!(
                "the card of purchase {} expired at {}",
                intent.intent_id,
                crate::domain::time::rfc3339(at)
            ),
        ));
    }
    if intent.agent_frozen {
        reasons.push(AuthReason::new(
            AuthReasonCode::AgentFrozen,
            "the agent is frozen",
        ));
    }
    let currency_ok = Currency::parse(&req.currency).ok() == Some(intent.currency);
    if !currency_ok {
        reasons.push(AuthReason::new(
            AuthReasonCode::CurrencyMismatch,
            format!(
                "charged in {}, approved in {}",
                req.currency.to_ascii_uppercase(),
                intent.currency
            ),
        ));
    }
    if card.other_approved > 0 {
        reasons.push(AuthReason::new(
            AuthReasonCode::CardAlreadyUsed,
            "this single-use card already has an approved authorization",
        ));
    }
    let total = card
        .approved_on_this
        .saturating_add(card.captured_elsewhere)
        .saturating_add(req.amount);
    if currency_ok && total > intent.limit {
        reasons.push(AuthReason::new(
            AuthReasonCode::ExceedsApprovedAmount,
            format!(
                "{} in total is more than the approved {}",
                Money::new(total, intent.currency),
                Money::new(intent.limit, intent.currency)
            ),
        ));
    }
    if let (Some(want), Some(got)) = (&intent.merchant_category, &req.merchant_category)
        && want != got
    {
        reasons.push(AuthReason::new(
            AuthReasonCode::CategoryMismatch,
            format!("merchant category {got}, purchase approved for {want}"),
        ));
    }
    if let Some(want) = &intent.merchant_country {
        let got = req.merchant_country.as_deref().unwrap_or("");
        if !got.eq_ignore_ascii_case(want) {
            reasons.push(AuthReason::new(
                AuthReasonCode::MerchantCountryMismatch,
                format!(
                    "merchant in {}, purchase approved for a merchant in {want}",
                    if got.is_empty() {
                        "an unknown country"
                    } else {
                        got
                    }
                ),
            ));
        }
    }
    let mut basis = "none";
    match (&card.locked_network_id, &req.merchant_network_id) {
        (Some(locked), Some(got)) if locked == got => basis = "network_id",
        (Some(locked), got) => reasons.push(AuthReason::new(
            AuthReasonCode::MerchantNetworkMismatch,
            format!(
                "the card is locked to merchant {locked}; this charge is from {}",
                got.as_deref().unwrap_or("an unidentified merchant")
            ),
        )),
        (None, _) => {}
    }
    if basis != "network_id" {
        let m = match_descriptor(
            &req.merchant_name,
            req.merchant_url.as_deref(),
            &intent.merchant_name,
            intent.merchant_domain.as_deref(),
        );
        basis = m.basis.as_str();
        if m.basis == MatchBasis::None {
            reasons.push(AuthReason::new(
                AuthReasonCode::MerchantMismatch,
                format!(
                    "descriptor {:?} does not match the purchase's merchant {:?}{} (match {}%)",
                    req.merchant_name,
                    intent.merchant_name,
                    intent
                        .merchant_domain
                        .as_deref()
                        .map(|d| format!(" ({d})"))
                        .unwrap_or_default(),
                    m.score
                ),
            ));
        }
    }
    if reasons.is_empty() {
        return AuthDecision {
            approved: true,
            reasons: vec![AuthReason::new(
                AuthReasonCode::MatchesIntent,
                format!(
                    "matches purchase {} (merchant by {basis})",
                    intent.intent_id
                ),
            )],
            lock_network_id: if card.locked_network_id.is_none() {
                req.merchant_network_id.clone()
            } else {
                None
            },
            merchant_basis: basis,
        };
    }
    AuthDecision {
        approved: false,
        reasons,
        lock_network_id: None,
        merchant_basis: basis,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn intent() -> AuthIntent {
        AuthIntent {
            intent_id: "pur_1".into(),
            status: "approved".into(),
            currency: Currency::USD,
            limit: 1_212,
            merchant_name: "Namecheap".into(),
            merchant_domain: Some("namecheap.com".into()),
            merchant_country: Some("US".into()),
            merchant_category: None,
            expires_at: Some(2_000),
            agent_frozen: false,
        }
    }

    fn req(amount: i64) -> AuthRequest {
        AuthRequest {
            amount,
            currency: "usd".into(),
            merchant_name: "NAMECHEAP.COM".into(),
            merchant_url: None,
            merchant_country: Some("US".into()),
            merchant_category: Some("computer_network_services".into()),
            merchant_network_id: Some("net_1".into()),
        }
    }

    fn codes(d: &AuthDecision) -> Vec<&'static str> {
        d.reasons.iter().map(|r| r.code.as_str()).collect()
    }

    #[test]
    fn approves_the_purchase_and_locks_the_merchant() {
        let d = decide_authorization(&intent(), &AuthCardHistory::default(), &req(1_200), 1_000);
        assert!(d.approved, "{:?}", d.reasons);
        assert_eq!(codes(&d), ["matches_intent"]);
        assert_eq!(d.lock_network_id.as_deref(), Some("net_1"));
        assert_eq!(d.merchant_basis, "name");
        // The buffer allows a little more than the amount, not more than the limit.
        assert!(decide_authorization(&intent(), &Default::default(), &req(1_212), 1_000).approved);
        let d = decide_authorization(&intent(), &Default::default(), &req(1_213), 1_000);
        assert_eq!(codes(&d), ["exceeds_approved_amount"]);
    }

    #[test]
    fn declines_with_every_reason() {
        let mut i = intent();
        i.status = "canceled".into();
        i.agent_frozen = true;
        i.merchant_category = Some("dating_escort_services".into());
        let mut r = req(5_000);
        r.currency = "eur".into();
        r.merchant_name = "GIFTCARDS4U".into();
        r.merchant_country = Some("NG".into());
        let card = AuthCardHistory {
            other_approved: 1,
            ..Default::default()
        };
        let d = decide_authorization(&i, &card, &r, 3_000);
        assert!(!d.approved);
        assert_eq!(
            codes(&d),
            [
                "intent_not_active",
                "intent_expired",
                "agent_frozen",
                "currency_mismatch",
                "card_already_used",
                "category_mismatch",
                "merchant_country_mismatch",
                "merchant_mismatch"
            ]
        );
        assert!(d.reasons.last().unwrap().message.contains("GIFTCARDS4U"));
    }

    #[test]
    fn increments_and_network_lock() {
        let card = AuthCardHistory {
            locked_network_id: Some("net_1".into()),
            approved_on_this: 1_000,
            ..Default::default()
        };
        // An increment of the same authorization within the limit, from the locked merchant,
        // even if the descriptor changed.
        let mut r = req(200);
        r.merchant_name = "NC ORDER 77".into();
        let d = decide_authorization(&intent(), &card, &r, 1_000);
        assert!(d.approved, "{:?}", d.reasons);
        assert_eq!(d.merchant_basis, "network_id");
        assert_eq!(d.lock_network_id, None);
        let d = decide_authorization(&intent(), &card, &req(213), 1_000);
        assert_eq!(codes(&d), ["exceeds_approved_amount"]);
        let mut r = req(10);
        r.merchant_network_id = Some("net_2".into());
        let d = decide_authorization(&intent(), &card, &r, 1_000);
        assert_eq!(codes(&d), ["merchant_network_mismatch"]);
    }
}
