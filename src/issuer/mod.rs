//! Card issuing through Stripe Issuing with the async-stripe client. The only module that
//! knows async-stripe. The base URL is configurable, so the same code talks to Stripe or to
//! the local emulator.
//!
//! Every mutating call carries an idempotency key derived from what it is for (the intent,
//! the agent), and failures that may be transient (429, 409, 5xx, network) are retried with
//! exponential backoff and full jitter.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use rand::Rng;
use stripe::StripeError;
use stripe_client_core::{IdempotencyKey, RequestStrategy, StripeRequest};
use stripe_issuing::issuing_card::{
    CreateIssuingCard, CreateIssuingCardLifecycleControls,
    CreateIssuingCardLifecycleControlsCancelAfter, CreateIssuingCardSpendingControls,
    CreateIssuingCardSpendingControlsAllowedCategories,
    CreateIssuingCardSpendingControlsBlockedCategories,
    CreateIssuingCardSpendingControlsSpendingLimits,
    CreateIssuingCardSpendingControlsSpendingLimitsInterval, CreateIssuingCardStatus,
    RetrieveIssuingCard, UpdateIssuingCard,
};
use stripe_issuing::issuing_cardholder::{
    BillingSpecs, CreateIssuingCardholder, IndividualParam, RequiredAddress,
};
use stripe_shared::{IssuingCard, IssuingCardStatus, IssuingCardType, IssuingCardholderType};

use crate::domain::money::Currency;

/// The Stripe API version this build's async-stripe sends (`Stripe-Version`). The
/// control plane's relay pins it: a sidecar cannot ask Stripe for another version.
pub fn stripe_api_version() -> &'static str {
    static VERSION: stripe_shared::ApiVersion = stripe_shared::version::VERSION;
    VERSION.as_str()
}

/// How to reach Stripe.
#[derive(Clone)]
pub struct StripeConfig {
    /// Secret or restricted key (`sk_…`/`rk_…`).
    pub api_key: String,
    /// `None` for api.stripe.com; e.g. `http://127.0.0.1:12111` for the emulator.
    pub base_url: Option<String>,
    /// Connected account to act on (`Stripe-Account` header).
    pub account: Option<String>,
    /// Attempts per call, including the first.
    pub max_attempts: u32,
    pub base_backoff: Duration,
    pub max_backoff: Duration,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Calls go through a control plane's issuing relay (`crate::control::relay`) with a
    /// sidecar token, not to Stripe with a Stripe key (see [`StripeConfig::relay`]).
    pub via_relay: bool,
}

impl std::fmt::Debug for StripeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StripeConfig")
            .field("base_url", &self.base_url)
            .field("account", &self.account)
            .field("max_attempts", &self.max_attempts)
            .field("via_relay", &self.via_relay)
            .finish_non_exhaustive()
    }
}

impl StripeConfig {
    pub fn new(api_key: impl Into<String>, base_url: Option<String>) -> StripeConfig {
        StripeConfig {
            api_key: api_key.into(),
            base_url,
            account: None,
            max_attempts: 4,
            base_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(4),
            timeout: Duration::from_secs(10),
            via_relay: false,
        }
    }

    /// Issuing through the control plane at `control_plane_url`: its relay's base URL
    /// (`{url}/api/sync/v1/stripe/`) with the sidecar token as the API key.
    pub fn relay(control_plane_url: &str, sidecar_token: impl Into<String>) -> StripeConfig {
        let base = format!(
            "{}{}/",
            control_plane_url.trim_end_matches('/'),
            crate::control::relay::BASE
        );
        StripeConfig {
            via_relay: true,
            ..StripeConfig::new(sidecar_token, Some(base))
        }
    }
}

/// The billing address cards are issued with (the cardholder's).
#[derive(
    Clone,
    Debug,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    utoipa::ToSchema,
    schemars::JsonSchema,
)]
pub struct BillingAddress {
    pub line1: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line2: Option<String>,
    pub city: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    pub postal_code: String,
    pub country: String,
}

impl Default for BillingAddress {
    fn default() -> Self {
        BillingAddress {
            line1: "510 Townsend St".into(),
            line2: None,
            city: "San Francisco".into(),
            state: Some("CA".into()),
            postal_code: "94103".into(),
            country: "US".into(),
        }
    }
}

/// What to create a card for.
#[derive(Clone, Debug)]
pub struct CardSpec {
    pub intent_id: String,
    pub agent_id: String,
    pub cardholder: String,
    pub currency: Currency,
    /// All-time spending limit, minor units.
    pub spending_limit: i64,
    pub allowed_categories: Vec<String>,
    pub blocked_categories: Vec<String>,
    pub allowed_countries: Vec<String>,
    pub blocked_countries: Vec<String>,
    pub idempotency_key: String,
    /// More metadata for the card (the signed intent a synced sidecar attaches); Roony's own
    /// `roony_intent_id` and `roony_agent_id` are always set.
    pub metadata: std::collections::BTreeMap<String, String>,
}

/// A card number and CVC. Lives in memory only; never logged (its `Debug` is redacted) and
/// never stored.
#[derive(Clone)]
pub struct CardSecrets {
    pub number: String,
    pub cvc: String,
}

impl std::fmt::Debug for CardSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CardSecrets { .. }")
    }
}

/// A created card: public facts plus its secrets.
#[derive(Clone, Debug)]
pub struct IssuedCard {
    pub id: String,
    pub last4: String,
    pub brand: String,
    pub exp_month: i64,
    pub exp_year: i64,
    pub cardholder: String,
    pub billing: BillingAddress,
    pub secrets: Option<CardSecrets>,
    /// Whether Stripe reports the card `active`.
    pub active: bool,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum IssuerError {
    /// Stripe refused the request; retrying the same request will not help.
    #[error("stripe rejected the request ({status}{}): {message}", code.as_deref().map(|c| format!(", {c}")).unwrap_or_default())]
    Rejected {
        status: u16,
        code: Option<String>,
        message: String,
    },
    /// Stripe could not be reached or kept failing after every retry.
    #[error("stripe unavailable after {attempts} attempts: {last}")]
    Unavailable { attempts: u32, last: String },
    #[error("stripe client configuration: {0}")]
    Config(String),
}

impl IssuerError {
    /// Stripe's error code, if Stripe rejected the request with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            IssuerError::Rejected { code, .. } => code.as_deref(),
            _ => None,
        }
    }

    /// Stripe answered 404 (e.g. a card it no longer knows).
    pub fn is_not_found(&self) -> bool {
        matches!(self, IssuerError::Rejected { status: 404, .. })
    }
}

enum Attempt {
    Retry(String),
    Fail(IssuerError),
}

fn classify(e: StripeError) -> Attempt {
    match e {
        StripeError::Stripe(err, status) => {
            let code = err.code.as_ref().map(|c| c.as_str().to_string());
            let message = err.message.clone().unwrap_or_default();
            if status == 429 || status == 409 || status >= 500 {
                Attempt::Retry(format!("http {status}: {message}"))
            } else {
                Attempt::Fail(IssuerError::Rejected {
                    status,
                    code,
                    message,
                })
            }
        }
        StripeError::ClientError(m) => Attempt::Retry(format!("network: {m}")),
        StripeError::Timeout => Attempt::Retry("timeout".into()),
        StripeError::JSONDeserialize(m) => Attempt::Fail(IssuerError::Rejected {
            status: 200,
            code: Some("unparseable_response".into()),
            message: m,
        }),
        StripeError::ConfigError(m) => Attempt::Fail(IssuerError::Config(m)),
    }
}

#[derive(Clone)]
pub struct Issuer {
    client: stripe::Client,
    config: StripeConfig,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("config", &self.config)
            .finish()
    }
}

impl Issuer {
    pub fn new(config: StripeConfig) -> Result<Issuer, IssuerError> {
        let mut builder = stripe::ClientBuilder::new(config.api_key.clone())
            .request_strategy(RequestStrategy::Once)
            .timeout(config.timeout)
            .app_info("roony", Some(env!("CARGO_PKG_VERSION").to_string()), None);
        if let Some(url) = &config.base_url {
            builder = builder.url(url.clone());
        }
        if let Some(account) = &config.account {
            let id = stripe_shared::AccountId::from_str(account)
                .map_err(|_| IssuerError::Config(format!("invalid account id {account:?}")))?;
            builder = builder.account_id(id);
        }
        let client = builder
            .build()
            .map_err(|e| IssuerError::Config(e.to_string()))?;
        Ok(Issuer { client, config })
    }

    /// Whether calls go through a control plane's issuing relay (see
    /// `crate::control::relay`) rather than to Stripe directly: configured, never guessed
    /// from the URL ([`StripeConfig::relay`]).
    pub fn uses_relay(&self) -> bool {
        self.config.via_relay
    }

    /// Runs `call` with retries. `key` is the idempotency key for mutating calls; it is the
    /// same on every attempt so Stripe executes the request at most once.
    async fn with_retries<T, F, Fut>(
        &self,
        what: &str,
        key: Option<&str>,
        call: F,
    ) -> Result<T, IssuerError>
    where
        F: Fn(RequestStrategy) -> Fut,
        Fut: std::future::Future<Output = Result<T, StripeError>>,
    {
        let mut last = String::new();
        for attempt in 0..self.config.max_attempts.max(1) {
            if attempt > 0 {
                let exp = self
                    .config
                    .base_backoff
                    .saturating_mul(1u32 << attempt.min(16))
                    .min(self.config.max_backoff);
                let jitter = rand::rng().random_range(0..=exp.as_millis() as u64);
                tokio::time::sleep(Duration::from_millis(jitter)).await;
            }
            let strategy = match key {
                Some(k) => RequestStrategy::Idempotent(
                    IdempotencyKey::new(k).map_err(|e| IssuerError::Config(e.to_string()))?,
                ),
                None => RequestStrategy::Once,
            };
            match call(strategy).await {
                Ok(v) => return Ok(v),
                Err(e) => match classify(e) {
                    Attempt::Fail(e) => return Err(e),
                    Attempt::Retry(m) => {
                        tracing::warn!(what, attempt, error = %m, "stripe call failed; will retry");
                        last = m;
                    }
                },
            }
        }
        Err(IssuerError::Unavailable {
            attempts: self.config.max_attempts.max(1),
            last,
        })
    }

    /// Creates the cardholder an agent's cards are issued to. Idempotent per agent.
    pub async fn create_cardholder(
        &self,
        agent_id: &str,
        agent_name: &str,
        billing: &BillingAddress,
    ) -> Result<String, IssuerError> {
        let mut address = RequiredAddress::new(
            billing.city.clone(),
            billing.country.clone(),
            billing.line1.clone(),
            billing.postal_code.clone(),
        );
        address.line2 = billing.line2.clone();
        address.state = billing.state.clone();
        let name = cardholder_name(agent_name);
        let mut individual = IndividualParam::new();
        individual.first_name = Some("Roony".into());
        individual.last_name = Some(name.clone());
        let metadata = HashMap::from([("roony_agent_id".to_string(), agent_id.to_string())]);
        let key = format!("roony-cardholder-{agent_id}");
        let holder = self
            .with_retries("create_cardholder", Some(&key), |strategy| {
                CreateIssuingCardholder::new(BillingSpecs::new(address.clone()), name.clone())
                    .type_(IssuingCardholderType::Individual)
                    .individual(individual.clone())
                    .metadata(metadata.clone())
                    .customize()
                    .request_strategy(strategy)
                    .send(&self.client)
            })
            .await?;
        Ok(holder.id.to_string())
    }

    /// Creates an active virtual card for one intent and retrieves its number and CVC.
    pub async fn create_card(&self, spec: &CardSpec) -> Result<IssuedCard, IssuerError> {
        let mut controls = CreateIssuingCardSpendingControls::new();
        controls.spending_limits =
            Some(vec![CreateIssuingCardSpendingControlsSpendingLimits::new(
                spec.spending_limit,
                CreateIssuingCardSpendingControlsSpendingLimitsInterval::AllTime,
            )]);
        if !spec.allowed_categories.is_empty() {
            controls.allowed_categories = Some(
                spec.allowed_categories
                    .iter()
                    .map(|c| {
                        CreateIssuingCardSpendingControlsAllowedCategories::from_str(c)
                            .unwrap_or_else(|never| match never {})
                    })
                    .collect(),
            );
        } else if !spec.blocked_categories.is_empty() {
            controls.blocked_categories = Some(
                spec.blocked_categories
                    .iter()
                    .map(|c| {
                        CreateIssuingCardSpendingControlsBlockedCategories::from_str(c)
                            .unwrap_or_else(|never| match never {})
                    })
                    .collect(),
            );
        }
        if !spec.allowed_countries.is_empty() {
            controls.allowed_merchant_countries = Some(spec.allowed_countries.clone());
        } else if !spec.blocked_countries.is_empty() {
            controls.blocked_merchant_countries = Some(spec.blocked_countries.clone());
        }
        let mut metadata: HashMap<String, String> = spec
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        metadata.insert("roony_intent_id".to_string(), spec.intent_id.clone());
        metadata.insert("roony_agent_id".to_string(), spec.agent_id.clone());
        let currency = stripe_types::Currency::from_str(&spec.currency.stripe_code())
            .unwrap_or_else(|never| match never {});
        let card: IssuingCard = self
            .with_retries("create_card", Some(&spec.idempotency_key), |strategy| {
                CreateIssuingCard::new(currency.clone(), IssuingCardType::Virtual)
                    .cardholder(spec.cardholder.clone())
                    .status(CreateIssuingCardStatus::Active)
                    .spending_controls(controls.clone())
                    .lifecycle_controls(CreateIssuingCardLifecycleControls::new(
                        CreateIssuingCardLifecycleControlsCancelAfter::new(1u64),
                    ))
                    .metadata(metadata.clone())
                    .customize()
                    .request_strategy(strategy)
                    .send(&self.client)
            })
            .await?;
        let issued = self.retrieve_card(card.id.as_str(), true).await?;
        if !issued.active {
            // An idempotent replay can return a card that was since canceled (e.g. after a
            // failed recording): never hand out a dead card as an approval.
            return Err(IssuerError::Rejected {
                status: 200,
                code: Some("card_not_active".into()),
                message: format!("card {} is not active", issued.id),
            });
        }
        Ok(issued)
    }

    /// Retrieves a card; with `secrets`, expands its number and CVC.
    pub async fn retrieve_card(
        &self,
        card_id: &str,
        secrets: bool,
    ) -> Result<IssuedCard, IssuerError> {
        let expand: Vec<String> = if secrets {
            vec!["number".into(), "cvc".into()]
        } else {
            Vec::new()
        };
        let card: IssuingCard = self
            .with_retries("retrieve_card", None, |strategy| {
                RetrieveIssuingCard::new(card_id)
                    .expand(expand.clone())
                    .customize()
                    .request_strategy(strategy)
                    .send(&self.client)
            })
            .await?;
        Ok(issued(card))
    }

    /// Every page of a Stripe list, as Stripe's JSON: `page(after, strategy)` sends one list
    /// request starting after `after` (retried like any read); `id` names an item for the
    /// next page's cursor.
    async fn list_json<T, F, Fut>(
        &self,
        what: &str,
        id: fn(&T) -> String,
        page: F,
    ) -> Result<Vec<serde_json::Value>, IssuerError>
    where
        T: serde::Serialize,
        F: Fn(Option<String>, RequestStrategy) -> Fut,
        Fut: std::future::Future<Output = Result<stripe_types::List<T>, StripeError>>,
    {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let list = self
                .with_retries(what, None, |strategy| page(after.clone(), strategy))
                .await?;
            after = list.data.last().map(id);
            for item in &list.data {
                out.push(to_json(item)?);
            }
            if !list.has_more || after.is_none() {
                return Ok(out);
            }
        }
    }

    /// Every Issuing card of the account, as Stripe's JSON (without number or CVC), newest
    /// first. For reconciliation.
    pub async fn list_cards_json(&self) -> Result<Vec<serde_json::Value>, IssuerError> {
        self.list_json(
            "list_cards",
            |c: &IssuingCard| c.id.as_str().to_string(),
            |after, strategy| {
                let mut req = stripe_issuing::issuing_card::ListIssuingCard::new().limit(100);
                if let Some(a) = after {
                    req = req.starting_after(a);
                }
                req.customize()
                    .request_strategy(strategy)
                    .send(&self.client)
            },
        )
        .await
    }

    /// Every Issuing authorization created at or after `since` (Unix seconds), as Stripe's
    /// JSON.
    pub async fn list_authorizations_json(
        &self,
        since: i64,
    ) -> Result<Vec<serde_json::Value>, IssuerError> {
        self.list_json(
            "list_authorizations",
            |a: &stripe_shared::IssuingAuthorization| a.id.as_str().to_string(),
            |after, strategy| {
                let mut req =
                    stripe_issuing::issuing_authorization::ListIssuingAuthorization::new()
                        .limit(100)
                        .created(stripe_types::RangeQueryTs::gte(since));
                if let Some(a) = after {
                    req = req.starting_after(a);
                }
                req.customize()
                    .request_strategy(strategy)
                    .send(&self.client)
            },
        )
        .await
    }

    /// Every Issuing transaction created at or after `since` (Unix seconds), as Stripe's
    /// JSON.
    pub async fn list_transactions_json(
        &self,
        since: i64,
    ) -> Result<Vec<serde_json::Value>, IssuerError> {
        self.list_json(
            "list_transactions",
            |t: &stripe_shared::IssuingTransaction| t.id.as_str().to_string(),
            |after, strategy| {
                let mut req = stripe_issuing::issuing_transaction::ListIssuingTransaction::new()
                    .limit(100)
                    .created(stripe_types::RangeQueryTs::gte(since));
                if let Some(a) = after {
                    req = req.starting_after(a);
                }
                req.customize()
                    .request_strategy(strategy)
                    .send(&self.client)
            },
        )
        .await
    }

    /// Cancels a card. A card that is already canceled counts as success.
    pub async fn cancel_card(&self, card_id: &str) -> Result<(), IssuerError> {
        let key = format!("roony-cancel-{card_id}");
        let result = self
            .with_retries("cancel_card", Some(&key), |strategy| {
                UpdateIssuingCard::new(card_id)
                    .status(IssuingCardStatus::Canceled)
                    .customize()
                    .request_strategy(strategy)
                    .send(&self.client)
            })
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(IssuerError::Rejected { status: 400, .. }) => {
                // Stripe refuses to update a canceled card; check that this is the case.
                let card: IssuingCard = self
                    .with_retries("retrieve_card", None, |strategy| {
                        RetrieveIssuingCard::new(card_id)
                            .customize()
                            .request_strategy(strategy)
                            .send(&self.client)
                    })
                    .await?;
                if card.status == IssuingCardStatus::Canceled {
                    Ok(())
                } else {
                    Err(IssuerError::Rejected {
                        status: 400,
                        code: None,
                        message: format!("card {card_id} could not be canceled"),
                    })
                }
            }
            Err(e) => Err(e),
        }
    }
}

fn issued(card: IssuingCard) -> IssuedCard {
    let addr = &card.cardholder.billing.address;
    let billing = BillingAddress {
        line1: addr.line1.clone().unwrap_or_default(),
        line2: addr.line2.clone(),
        city: addr.city.clone().unwrap_or_default(),
        state: addr.state.clone(),
        postal_code: addr.postal_code.clone().unwrap_or_default(),
        country: addr.country.clone().unwrap_or_default(),
    };
    let secrets = match (card.number, card.cvc) {
        (Some(number), Some(cvc)) => Some(CardSecrets { number, cvc }),
        _ => None,
    };
    IssuedCard {
        active: card.status == IssuingCardStatus::Active,
        id: card.id.to_string(),
        last4: card.last4,
        brand: card.brand,
        exp_month: card.exp_month,
        exp_year: card.exp_year,
        cardholder: card.cardholder.id.to_string(),
        billing,
        secrets,
    }
}

/// Stripe: "at most 24 characters … cannot contain any special characters or numbers".
pub fn cardholder_name(agent_name: &str) -> String {
    let letters: String = agent_name
        .chars()
        .map(|c| if c.is_ascii_alphabetic() { c } else { ' ' })
        .collect();
    let mut name = letters.split_whitespace().collect::<Vec<_>>().join(" ");
    name.truncate(24);
    let name = name.trim().to_string();
    if name.is_empty() {
        "Agent".to_string()
    } else {
        name
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<serde_json::Value, IssuerError> {
    serde_json::to_value(v).map_err(|e| IssuerError::Rejected {
        status: 200,
        code: Some("unserializable_object".into()),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cardholder_names_follow_stripe_rules() {
        assert_eq!(cardholder_name("demo-agent 2"), "demo agent");
        assert_eq!(cardholder_name("123"), "Agent");
        assert_eq!(
            cardholder_name("A very long agent name that goes on"),
            "A very long agent name t"
        );
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let s = CardSecrets {
            number: "4000001234567899".into(),
            cvc: "123".into(),
        };
        assert!(!format!("{s:?}").contains("4000"));
        let cfg = StripeConfig::new("sk_test_secret", None);
        assert!(!format!("{cfg:?}").contains("sk_test_secret"));
    }
}
