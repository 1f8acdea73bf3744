//! Policy documents (as written by people and stored) and their compiled, normalized form.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::domain::category::is_known_category;
use crate::domain::merchant::{normalize_country, normalize_domain, normalize_name};
use crate::domain::money::{Currency, MAX_AMOUNT_MINOR};
use crate::domain::time::Period;

use super::risk::RiskRule;

/// Most entries a single list may hold.
pub const MAX_LIST_LEN: usize = 1000;

/// An agent's spending policy. Amounts are minor units of `currency`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// The currency the agent spends and its budgets are kept in.
    #[schema(value_type = String, example = "USD")]
    pub currency: Currency,
    /// Largest single purchase, in minor units.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_per_transaction: Option<i64>,
    /// Budgets per calendar period (UTC).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub budgets: Vec<BudgetRule>,
    #[serde(default, skip_serializing_if = "MerchantRules::is_empty")]
    pub merchants: MerchantRules,
    /// Stripe merchant category names.
    #[serde(default, skip_serializing_if = "ListRule::is_empty")]
    pub categories: ListRule,
    /// ISO 3166-1 alpha-2 merchant countries.
    #[serde(default, skip_serializing_if = "ListRule::is_empty")]
    pub countries: ListRule,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub velocity: Vec<VelocityRule>,
    /// Purchases above this amount wait for an administrator (`pending_approval`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require_approval_above: Option<i64>,
    /// Purchases above this amount need the confirmation of the human in front of the agent
    /// (asked through MCP elicitation). Interfaces that cannot ask make them
    /// `pending_approval` instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require_confirmation_above: Option<i64>,
    /// How long an approved card stays usable before it is canceled and its reservation
    /// released. Default 3600 s.
    #[serde(default = "default_card_ttl")]
    pub card_ttl_seconds: u32,
    /// How long a pending approval waits before it expires. Default 86400 s.
    #[serde(default = "default_approval_ttl")]
    pub approval_ttl_seconds: u32,
    /// The card's spending limit may exceed the approved amount by this many basis points
    /// (100 = 1%), to absorb rounding or FX; it shrinks so that no budget can be exceeded.
    #[serde(default = "default_buffer_bps")]
    pub card_buffer_bps: u32,
    /// Freeze the agent when the control plane finds a discrepancy on one of its cards
    /// (over-capture, force capture, capture on a canceled card, merchant mismatch). Default
    /// true: a card used for something other than its purchase stops the agent until an
    /// administrator looks.
    #[serde(default = "default_true")]
    pub freeze_on_discrepancy: bool,
    /// Risk scoring: every decision carries a score (0–100) and its signals; above
    /// `require_approval_above` (default 70) the purchase waits for an administrator, above
    /// `decline_above` (default 90) it is declined. See docs/policy.md, "Risk".
    #[serde(default, skip_serializing_if = "RiskRule::is_default")]
    pub risk: RiskRule,
    /// How cards reach the agent: `raw` (default: the number and CVC once, or placeholders
    /// when the request asks for `vault`), `vault` (placeholders unless the request asks for
    /// `raw`) or `vault_only` (placeholders; a request for `raw` is refused with
    /// `card_delivery_not_allowed`). Placeholders are replaced by the sidecar's egress proxy.
    #[serde(default, skip_serializing_if = "CardDeliveryRule::is_default")]
    pub card_delivery: CardDeliveryRule,
}

/// A policy's card delivery rule (see `Policy::card_delivery`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CardDeliveryRule {
    #[default]
    Raw,
    Vault,
    VaultOnly,
}

/// The stable code of a refused raw delivery.
pub const CARD_DELIVERY_NOT_ALLOWED: &str = "card_delivery_not_allowed";

impl CardDeliveryRule {
    pub fn is_default(&self) -> bool {
        *self == CardDeliveryRule::Raw
    }

    /// The delivery a request gets under this rule; `Err` when it asks for `raw` under
    /// `vault_only`.
    pub fn resolve(
        self,
        requested: Option<crate::domain::intent::CardDelivery>,
    ) -> Result<crate::domain::intent::CardDelivery, &'static str> {
        use crate::domain::intent::CardDelivery;
        match (self, requested) {
            (CardDeliveryRule::VaultOnly, Some(CardDelivery::Raw)) => {
                Err(CARD_DELIVERY_NOT_ALLOWED)
            }
            (_, Some(d)) => Ok(d),
            (CardDeliveryRule::Raw, None) => Ok(CardDelivery::Raw),
            (_, None) => Ok(CardDelivery::Vault),
        }
    }
}

fn default_true() -> bool {
    true
}

fn default_card_ttl() -> u32 {
    3600
}
fn default_approval_ttl() -> u32 {
    86_400
}
fn default_buffer_bps() -> u32 {
    100
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BudgetRule {
    #[schema(value_type = String, example = "daily")]
    pub period: Period,
    /// Limit in minor units.
    pub limit: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MerchantRules {
    /// If any allow list is non-empty, the merchant must match one entry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_domains: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_domains: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_names: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_names: Vec<String>,
}

impl MerchantRules {
    pub fn is_empty(&self) -> bool {
        self.allow_domains.is_empty()
            && self.deny_domains.is_empty()
            && self.allow_names.is_empty()
            && self.deny_names.is_empty()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ListRule {
    /// If non-empty, only these are allowed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
}

impl ListRule {
    pub fn is_empty(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VelocityRule {
    /// At most this many purchase requests (approved or not) ...
    pub max_intents: u32,
    /// ... in any rolling window of this many seconds.
    pub window_seconds: u32,
}

/// A policy that failed validation: the exact field and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct PolicyError {
    pub field: String,
    pub reason: String,
}

/// A validated policy with every list normalized for fast, allocation-free matching.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompiledPolicy {
    pub currency: Currency,
    pub max_per_transaction: Option<i64>,
    pub budgets: Vec<BudgetRule>,
    pub merchants: MerchantRules,
    pub categories: ListRule,
    pub countries: ListRule,
    pub velocity: Vec<VelocityRule>,
    pub require_approval_above: Option<i64>,
    pub require_confirmation_above: Option<i64>,
    pub card_ttl_seconds: u32,
    pub approval_ttl_seconds: u32,
    pub card_buffer_bps: u32,
    pub risk: RiskRule,
}

impl Policy {
    /// A policy with only a currency: it approves nothing that is not in that currency and has
    /// no limits. Meant as a base for builders and tests.
    pub fn new(currency: Currency) -> Policy {
        Policy {
            currency,
            max_per_transaction: None,
            budgets: Vec::new(),
            merchants: MerchantRules::default(),
            categories: ListRule::default(),
            countries: ListRule::default(),
            velocity: Vec::new(),
            require_approval_above: None,
            require_confirmation_above: None,
            card_ttl_seconds: default_card_ttl(),
            freeze_on_discrepancy: true,
            approval_ttl_seconds: default_approval_ttl(),
            card_buffer_bps: default_buffer_bps(),
            risk: RiskRule::default(),
            card_delivery: CardDeliveryRule::Raw,
        }
    }

    /// Validates and normalizes. Reports every problem, each with its exact field path.
    pub fn compile(&self) -> Result<CompiledPolicy, Vec<PolicyError>> {
        let mut errors = Vec::new();
        let mut err = |field: String, reason: &str| {
            errors.push(PolicyError {
                field,
                reason: reason.to_string(),
            })
        };
        let amount_ok = |v: i64| (1..=MAX_AMOUNT_MINOR * 1000).contains(&v);
        if let Some(v) = self.max_per_transaction
            && !amount_ok(v)
        {
            err(
                "max_per_transaction".into(),
                "must be a positive amount in minor units",
            );
        }
        if let Some(v) = self.require_approval_above
            && !(0..=MAX_AMOUNT_MINOR * 1000).contains(&v)
        {
            err(
                "require_approval_above".into(),
                "must be zero or a positive amount in minor units",
            );
        }
        if let Some(v) = self.require_confirmation_above
            && !(0..=MAX_AMOUNT_MINOR * 1000).contains(&v)
        {
            err(
                "require_confirmation_above".into(),
                "must be zero or a positive amount in minor units",
            );
        }
        let mut seen_periods = Vec::new();
        for (i, b) in self.budgets.iter().enumerate() {
            if !amount_ok(b.limit) {
                err(
                    format!("budgets[{i}].limit"),
                    "must be a positive amount in minor units",
                );
            }
            if seen_periods.contains(&b.period) {
                err(format!("budgets[{i}].period"), "only one budget per period");
            }
            seen_periods.push(b.period);
        }
        for (i, v) in self.velocity.iter().enumerate() {
            if v.max_intents == 0 {
                err(format!("velocity[{i}].max_intents"), "must be at least 1");
            }
            if v.window_seconds == 0 || v.window_seconds > 31 * 86_400 {
                err(
                    format!("velocity[{i}].window_seconds"),
                    "must be between 1 and 2678400 (31 days)",
                );
            }
        }
        if !(60..=7 * 86_400).contains(&self.card_ttl_seconds) {
            err(
                "card_ttl_seconds".into(),
                "must be between 60 and 604800 (7 days)",
            );
        }
        if !(60..=30 * 86_400).contains(&self.approval_ttl_seconds) {
            err(
                "approval_ttl_seconds".into(),
                "must be between 60 and 2592000 (30 days)",
            );
        }
        if self.card_buffer_bps > 2_000 {
            err("card_buffer_bps".into(), "must be at most 2000 (20%)");
        }
        let mut risk_errors = Vec::new();
        self.risk.check(&mut risk_errors);
        for (field, reason) in risk_errors {
            err(field, reason);
        }

        let mut list =
            |field: &str, items: &[String], norm: &dyn Fn(&str) -> Option<String>, what: &str| {
                if items.len() > MAX_LIST_LEN {
                    err(field.to_string(), "too many entries (at most 1000)");
                }
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    match norm(item) {
                        Some(n) if !out.contains(&n) => out.push(n),
                        Some(_) => {}
                        None => err(format!("{field}[{i}]"), what),
                    }
                }
                out
            };
        let domain = |s: &str| normalize_domain(s);
        let name = |s: &str| Some(normalize_name(s)).filter(|n| !n.is_empty());
        let category = |s: &str| {
            let c = s.trim().to_ascii_lowercase();
            is_known_category(&c).then_some(c)
        };
        let country = |s: &str| normalize_country(s);
        let merchants = MerchantRules {
            allow_domains: list(
                "merchants.allow_domains",
                &self.merchants.allow_domains,
                &domain,
                "not a valid domain",
            ),
            deny_domains: list(
                "merchants.deny_domains",
                &self.merchants.deny_domains,
                &domain,
                "not a valid domain",
            ),
            allow_names: list(
                "merchants.allow_names",
                &self.merchants.allow_names,
                &name,
                "merchant name must contain letters or digits",
            ),
            deny_names: list(
                "merchants.deny_names",
                &self.merchants.deny_names,
                &name,
                "merchant name must contain letters or digits",
            ),
        };
        let categories = ListRule {
            allow: list(
                "categories.allow",
                &self.categories.allow,
                &category,
                "not a Stripe merchant category",
            ),
            deny: list(
                "categories.deny",
                &self.categories.deny,
                &category,
                "not a Stripe merchant category",
            ),
        };
        let countries = ListRule {
            allow: list(
                "countries.allow",
                &self.countries.allow,
                &country,
                "not an ISO 3166-1 alpha-2 country code",
            ),
            deny: list(
                "countries.deny",
                &self.countries.deny,
                &country,
                "not an ISO 3166-1 alpha-2 country code",
            ),
        };
        if !categories.allow.is_empty() && !categories.deny.is_empty() {
            err(
                "categories".into(),
                "use either allow or deny, not both (Stripe's card controls are exclusive)",
            );
        }
        if !countries.allow.is_empty() && !countries.deny.is_empty() {
            err(
                "countries".into(),
                "use either allow or deny, not both (Stripe's card controls are exclusive)",
            );
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(CompiledPolicy {
            currency: self.currency,
            max_per_transaction: self.max_per_transaction,
            budgets: self.budgets.clone(),
            merchants,
            categories,
            countries,
            velocity: self.velocity.clone(),
            require_approval_above: self.require_approval_above,
            require_confirmation_above: self.require_confirmation_above,
            card_ttl_seconds: self.card_ttl_seconds,
            approval_ttl_seconds: self.approval_ttl_seconds,
            card_buffer_bps: self.card_buffer_bps,
            risk: self.risk.clone(),
        })
    }
}

#[cfg(test)]
mod card_delivery_tests {
    use super::CardDeliveryRule;
    use crate::domain::intent::CardDelivery;

    #[test]
    fn resolves_requests_against_the_rule() {
        assert_eq!(CardDeliveryRule::Raw.resolve(None), Ok(CardDelivery::Raw));
        assert_eq!(
            CardDeliveryRule::Raw.resolve(Some(CardDelivery::Vault)),
            Ok(CardDelivery::Vault)
        );
        assert_eq!(
            CardDeliveryRule::Vault.resolve(None),
            Ok(CardDelivery::Vault)
        );
        assert_eq!(
            CardDeliveryRule::Vault.resolve(Some(CardDelivery::Raw)),
            Ok(CardDelivery::Raw)
        );
        assert_eq!(
            CardDeliveryRule::VaultOnly.resolve(Some(CardDelivery::Raw)),
            Err("card_delivery_not_allowed")
        );
        assert_eq!(
            CardDeliveryRule::VaultOnly.resolve(None),
            Ok(CardDelivery::Vault)
        );
        let p: super::Policy =
            serde_json::from_str(r#"{"currency":"USD","card_delivery":"vault_only"}"#)
                .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.card_delivery, CardDeliveryRule::VaultOnly);
    }
}
