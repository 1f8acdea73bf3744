//! The one service layer. The OpenAPI handlers (`api`), the MCP tools (`mcp`) and background
//! tasks call these functions; none of them touch the store or Stripe directly.

pub mod ids;
pub mod vault;
pub mod views;

use std::sync::Arc;
use std::time::Duration;

use crate::auth;
use crate::domain::intent::{CardDelivery, PurchaseRequest};
use crate::domain::money::Money;
use crate::domain::time::UnixSeconds;
use crate::issuer::{BillingAddress, CardSpec, IssuedCard, Issuer, IssuerError};
pub use crate::policy::Confirmation;
use crate::policy::Decision;
use crate::policy::{Outcome, PolicyError, Reason, ReasonCode};
pub use crate::store::DecideOptions as PurchaseOptions;
use crate::store::{
    AgentKeyRecord, AgentRecord, AgentStatus, CardRef, Decided, IntentRecord, IntentStatus, Store,
    StoreError,
};
pub use views::{BudgetView, CardPlaceholders, CardView, IntentPage, IntentView, StatusView};

/// A source of the current time, so tests can move it.
pub trait Clock: Send + Sync {
    fn now(&self) -> UnixSeconds;
}

#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> UnixSeconds {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)
    }
}

#[derive(Clone, Debug)]
pub struct ServiceConfig {
    /// Billing address of the cardholders Roony creates.
    pub billing: BillingAddress,
    /// How often the expiry task looks for due cards.
    pub expiry_interval: Duration,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            billing: BillingAddress::default(),
            expiry_interval: Duration::from_secs(5),
        }
    }
}

/// An authenticated agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentIdentity {
    pub agent_id: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing agent key: send Authorization: Bearer <agent key>")]
    Missing,
    #[error("invalid agent key")]
    Invalid,
}

/// Errors of the purchase operations. Decisions (declines, pending approvals) are not
/// errors: they are results.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{0}")]
    Invalid(#[from] crate::domain::intent::ValidationError),
    #[error("purchase intent not found")]
    NotFound,
    #[error("this idempotency key was already used with a different request")]
    IdempotencyMismatch,
    #[error("the purchase intent is {0} and cannot be canceled")]
    NotCancelable(&'static str),
    #[error("the purchase intent is still being processed; retry shortly")]
    InProgress,
    #[error("stripe is unavailable: {0}")]
    Stripe(IssuerError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<StoreError> for ServiceError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => ServiceError::NotFound,
            StoreError::IdempotencyMismatch => ServiceError::IdempotencyMismatch,
            StoreError::WrongState("issuing") => ServiceError::InProgress,
            StoreError::WrongState(s) => ServiceError::NotCancelable(s),
            other => ServiceError::Internal(other.to_string()),
        }
    }
}

/// The outcome of `request_purchase`.
#[derive(Debug)]
pub struct PurchaseOutcome {
    pub intent: IntentView,
    /// True when an idempotency key matched an earlier request.
    pub replayed: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentAdminError {
    #[error("invalid policy")]
    Policy(Vec<PolicyError>),
    #[error("{0}")]
    Key(#[from] auth::KeyError),
    #[error("{0}")]
    Store(#[from] StoreError),
}

#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    issuer: Issuer,
    config: ServiceConfig,
    clock: Arc<dyn Clock>,
    /// The control plane, for a synced sidecar (shared budgets, offline limit).
    upstream: std::sync::OnceLock<Arc<crate::sync::upstream::Upstream>>,
    /// Numbers and CVCs of vault-delivery cards (memory only; see `vault`).
    vault: vault::Vault,
}

/// Why the egress proxy refuses to put a card into a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EgressRefusal {
    /// The placeholder names another agent's intent.
    NotYours,
    /// Unknown intent, not a vault card, or no longer approved and unexpired.
    NotActive,
    /// The destination is not the intent's merchant.
    DestinationNotAllowed,
    /// The request carries the raw number of an issued card.
    RawCardNumber,
}

impl EgressRefusal {
    pub fn code(&self) -> &'static str {
        match self {
            EgressRefusal::NotYours => "placeholder_not_yours",
            EgressRefusal::NotActive => "intent_not_active",
            EgressRefusal::DestinationNotAllowed => "destination_not_allowed",
            EgressRefusal::RawCardNumber => "raw_card_number_blocked",
        }
    }

    pub fn message(&self) -> &'static str {
        match self {
            EgressRefusal::NotYours => {
                "the request carries a card placeholder of a purchase intent that is not yours"
            }
            EgressRefusal::NotActive => {
                "the card placeholder names a purchase intent that is unknown, not a vault card, or no longer approved (canceled, expired, settled or failed)"
            }
            EgressRefusal::DestinationNotAllowed => {
                "the destination host is not the merchant of any of your active purchase intents"
            }
            EgressRefusal::RawCardNumber => {
                "the request carries the number of an issued card; send its placeholder instead"
            }
        }
    }
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service").finish_non_exhaustive()
    }
}

/// Runs a store write (which may wait for the write lock and an fsync) on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ServiceError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ServiceError::Internal(format!("task failed: {e}")))?
        .map_err(ServiceError::from)
}

impl Service {
    pub fn new(
        store: Store,
        issuer: Issuer,
        config: ServiceConfig,
        clock: Arc<dyn Clock>,
    ) -> Service {
        Service {
            inner: Arc::new(Inner {
                store,
                issuer,
                config,
                clock,
                upstream: std::sync::OnceLock::new(),
                vault: vault::Vault::default(),
            }),
        }
    }

    /// Connects the service to its control plane: shared budgets are then spent through
    /// leases, and the offline limit applies. Set once, before serving.
    pub fn attach_upstream(&self, upstream: Arc<crate::sync::upstream::Upstream>) {
        if self.inner.upstream.set(upstream).is_err() {
            tracing::warn!("the service is already attached to a control plane");
        }
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The in-memory card vault (for the egress proxy).
    pub fn vault(&self) -> &vault::Vault {
        &self.inner.vault
    }

    /// The current time of the service's clock.
    pub fn clock_now(&self) -> UnixSeconds {
        self.now()
    }

    fn now(&self) -> UnixSeconds {
        self.inner.clock.now()
    }

    // ---- agents ------------------------------------------------------------------------

    /// Creates (or replaces) an agent with a policy and a key, returning the key's plaintext
    /// once. With `key`, that operator-chosen key is used instead of a generated one.
    pub fn create_agent(
        &self,
        id: &str,
        name: &str,
        policy: crate::policy::Policy,
        key: Option<&str>,
    ) -> Result<String, AgentAdminError> {
        policy.compile().map_err(AgentAdminError::Policy)?;
        let new_key = match key {
            Some(k) => auth::from_plaintext(k)?,
            None => auth::generate(),
        };
        let now = self.now();
        self.inner.store.put_agent(&AgentRecord {
            id: id.to_string(),
            name: name.to_string(),
            status: AgentStatus::Active,
            policy,
            created: now,
        })?;
        self.inner.store.put_agent_key(
            &new_key.key_id,
            &AgentKeyRecord {
                agent_id: id.to_string(),
                key_hash: new_key.hash.clone(),
                created: now,
                revoked: false,
            },
        )?;
        Ok(new_key.plaintext)
    }

    /// Revokes an agent key by its key id (a key that does not exist is left alone).
    pub fn revoke_agent_key(&self, key_id: &str) -> Result<(), StoreError> {
        if let Some(existing) = self.inner.store.agent_key(key_id)? {
            let mut record = (*existing).clone();
            record.revoked = true;
            self.inner.store.put_agent_key(key_id, &record)?;
        }
        Ok(())
    }

    /// Resolves a presented bearer key to its agent.
    pub fn authenticate(&self, presented: Option<&str>) -> Result<AgentIdentity, AuthError> {
        let key = presented
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or(AuthError::Missing)?;
        let record = self
            .inner
            .store
            .agent_key(&auth::key_id(key))
            .map_err(|e| {
                tracing::error!(error = %e, "agent key lookup failed");
                AuthError::Invalid
            })?
            .ok_or(AuthError::Invalid)?;
        if record.revoked || !auth::verify(key, &record.key_hash) {
            return Err(AuthError::Invalid);
        }
        Ok(AgentIdentity {
            agent_id: record.agent_id.clone(),
        })
    }

    // ---- purchases ---------------------------------------------------------------------

    /// Decides a purchase and, when approved, issues its card. Any failure after approval
    /// releases the reservation; nothing approves on error.
    pub async fn request_purchase(
        &self,
        agent: &AgentIdentity,
        request: PurchaseRequest,
        header_key: Option<&str>,
    ) -> Result<PurchaseOutcome, ServiceError> {
        self.request_purchase_with(agent, request, header_key, PurchaseOptions::default())
            .await
    }

    /// What deciding `request` now would give, without recording anything (`None` when its
    /// idempotency key names a recorded intent, which will be replayed). Interfaces use it
    /// to ask the human before a purchase that needs their confirmation.
    pub fn preview_purchase(
        &self,
        agent: &AgentIdentity,
        request: &PurchaseRequest,
    ) -> Result<Option<Decision>, ServiceError> {
        let intent = request.validate(None)?;
        if let Some(key) = intent.idempotency_key.as_deref()
            && self
                .inner
                .store
                .intent_for_key(&agent.agent_id, key)?
                .is_some()
        {
            // A retry of a recorded request: it will be replayed, not decided again.
            return Ok(None);
        }
        Ok(Some(self.inner.store.preview(
            &agent.agent_id,
            &intent,
            Confirmation::NotAsked,
            self.now(),
        )?))
    }

    /// `request_purchase` with the human's confirmation and, for a confirmed request, the
    /// intent id allocated when they were asked (which makes the confirmation single-use).
    pub async fn request_purchase_with(
        &self,
        agent: &AgentIdentity,
        request: PurchaseRequest,
        header_key: Option<&str>,
        options: PurchaseOptions,
    ) -> Result<PurchaseOutcome, ServiceError> {
        let mut intent = request.validate(header_key)?;
        intent.card_delivery = self.resolve_delivery(&agent.agent_id, intent.card_delivery)?;
        let now = self.now();
        let mut options = options;
        let mut demand = None;
        if let Some(upstream) = self.inner.upstream.get() {
            // Cards come through the control plane's relay: decline up front, reserving
            // nothing, while the bundle says the Stripe account is disconnected.
            if upstream.stripe_disconnected() && self.inner.issuer.uses_relay() {
                options.stripe_disconnected = true;
            }
            if upstream.offline(now) {
                options.offline = true;
            } else {
                let needs = self
                    .inner
                    .store
                    .lease_needs(&agent.agent_id, &intent, now)?;
                // Counted as demand until decided, so that concurrent purchases grow the
                // allowance for all of them at once.
                demand = Some(upstream.demand(&needs));
                if upstream.short(&self.inner.store, &needs) {
                    options.unreachable_budgets = upstream.grow(&self.inner.store, needs).await;
                }
            }
        }
        let store = self.inner.store.clone();
        let agent_id = agent.agent_id.clone();
        let decided =
            blocking(move || store.decide(&agent_id, intent, now, &ids::intent_id, options))
                .await?;
        drop(demand);
        match decided {
            Decided::Replay(rec) => {
                let mut view = IntentView::from_record(&rec);
                if rec.status == IntentStatus::Issuing {
                    return Err(ServiceError::InProgress);
                }
                if rec.status == IntentStatus::Approved && is_vault(&rec) {
                    // Placeholders only; make sure the vault holds the card.
                    self.vault_card(&rec).await.map_err(ServiceError::Stripe)?;
                } else if rec.status == IntentStatus::Approved
                    && let (Some(card_ref), Some(card)) = (&rec.card, view.card.as_mut())
                {
                    // The agent retried the request that created the card: give it the card
                    // again (fetched from Stripe; Roony never stores card numbers).
                    let issued = self
                        .inner
                        .issuer
                        .retrieve_card(&card_ref.id, true)
                        .await
                        .map_err(ServiceError::Stripe)?;
                    if let Some(s) = issued.secrets {
                        card.number = Some(s.number);
                        card.cvc = Some(s.cvc);
                    }
                }
                Ok(PurchaseOutcome {
                    intent: view,
                    replayed: true,
                })
            }
            Decided::New(rec) => {
                log_decision(&rec);
                if rec.status != IntentStatus::Issuing {
                    return Ok(PurchaseOutcome {
                        intent: IntentView::from_record(&rec),
                        replayed: false,
                    });
                }
                let (rec, card) = self.issue(rec).await?;
                let mut view = IntentView::from_record(&rec);
                if let (Some(card), Some(v)) = (card, view.card.as_mut())
                    && !is_vault(&rec)
                    && let Some(s) = card.secrets
                {
                    v.number = Some(s.number);
                    v.cvc = Some(s.cvc);
                }
                Ok(PurchaseOutcome {
                    intent: view,
                    replayed: false,
                })
            }
        }
    }

    /// Creates the card of an `issuing` intent and records the result.
    async fn issue(
        &self,
        rec: IntentRecord,
    ) -> Result<(IntentRecord, Option<IssuedCard>), ServiceError> {
        let result = self.create_card_for(&rec).await;
        let now = self.now();
        let store = self.inner.store.clone();
        let id = rec.id.clone();
        match result {
            Ok(card) => {
                let card_ref = CardRef {
                    id: card.id.clone(),
                    brand: card.brand.clone(),
                    last4: card.last4.clone(),
                    exp_month: card.exp_month,
                    exp_year: card.exp_year,
                    spending_limit: rec.reservation.as_ref().map_or(0, |r| r.amount),
                    cardholder: card.cardholder.clone(),
                    billing: card.billing.clone(),
                };
                match blocking(move || store.complete_issuance(&id, card_ref, now)).await {
                    Ok(rec) => {
                        tracing::info!(intent = %rec.id, card = %card.id, last4 = %card.last4, "card issued");
                        // Every card's number stays in memory for the card's life: a vault
                        // card's for its placeholders, a raw card's so that the egress proxy
                        // blocks it if the agent sends it anywhere (placeholders of a raw
                        // card are refused: `egress_card` checks the delivery).
                        if let Some(s) = &card.secrets {
                            self.inner.vault.insert(self.vault_entry(&rec, s));
                        }
                        Ok((rec, Some(card)))
                    }
                    Err(e) => {
                        // The card exists but could not be recorded: cancel it so it cannot be
                        // used; the intent stays `issuing` and start-up recovery settles it.
                        tracing::error!(intent = %rec.id, error = %e, "recording the card failed; canceling it");
                        if let Err(c) = self.inner.issuer.cancel_card(&card.id).await {
                            tracing::error!(card = %card.id, error = %c, "cancel failed");
                        }
                        Err(e)
                    }
                }
            }
            Err(e) => {
                tracing::warn!(intent = %rec.id, error = %e, "card issuance failed; releasing the reservation");
                let reason = if e.code() == Some(crate::control::relay::DISCONNECTED) {
                    // The relay refused: the organization's Stripe account is disconnected
                    // (not retried; the next bundle declines up front).
                    Reason::new(
                        ReasonCode::StripeAccountDisconnected,
                        "the organization's stripe account is disconnected, so the card could not be created; nothing is reserved — retry after an administrator reconnects it",
                    )
                } else {
                    Reason::new(
                        ReasonCode::CardIssuanceFailed,
                        format!(
                            "the purchase was approved but the card could not be created ({e}); nothing is reserved — retry with the same idempotency key"
                        ),
                    )
                };
                let rec = blocking(move || store.fail_issuance(&id, reason, now)).await?;
                Ok((rec, None))
            }
        }
    }

    async fn create_card_for(&self, rec: &IntentRecord) -> Result<IssuedCard, IssuerError> {
        let agent = self
            .inner
            .store
            .agent(&rec.agent_id)
            .ok()
            .flatten()
            .ok_or_else(|| IssuerError::Config("agent vanished".into()))?;
        let cardholder = match self.inner.store.cardholder(&rec.agent_id) {
            Ok(Some(c)) => c,
            _ => {
                let c = self
                    .inner
                    .issuer
                    .create_cardholder(
                        &rec.agent_id,
                        &agent.record.name,
                        &self.inner.config.billing,
                    )
                    .await?;
                if let Err(e) = self.inner.store.put_cardholder(&rec.agent_id, &c) {
                    tracing::warn!(error = %e, "could not remember the cardholder");
                }
                c
            }
        };
        let policy = agent
            .policy
            .as_ref()
            .map_err(|_| IssuerError::Config("invalid policy".into()))?;
        let m = &rec.request.merchant;
        let (allowed_categories, blocked_categories) = match &m.category {
            Some(c) => (vec![c.clone()], vec![]),
            None => (
                policy.categories.allow.clone(),
                policy.categories.deny.clone(),
            ),
        };
        let (allowed_countries, blocked_countries) = match &m.country {
            Some(c) => (vec![c.clone()], vec![]),
            None => (
                policy.countries.allow.clone(),
                policy.countries.deny.clone(),
            ),
        };
        let spec = CardSpec {
            intent_id: rec.id.clone(),
            agent_id: rec.agent_id.clone(),
            cardholder,
            currency: rec.request.amount.currency,
            spending_limit: rec.reservation.as_ref().map_or(0, |r| r.amount),
            allowed_categories,
            blocked_categories,
            allowed_countries,
            blocked_countries,
            idempotency_key: rec.stripe_idempotency_key.clone(),
            metadata: self.card_metadata(rec),
        };
        if spec.spending_limit <= 0 {
            return Err(IssuerError::Config("nothing reserved".into()));
        }
        self.inner.issuer.create_card(&spec).await
    }

    /// What a synced sidecar's card says about its purchase, signed with the sidecar's key,
    /// so the control plane can decide the card's authorizations even before the intent
    /// reaches it through the outbox. A standalone sidecar's card says only when it expires
    /// (`roony_expires`, which the control plane's issuing relay requires).
    fn card_metadata(&self, rec: &IntentRecord) -> std::collections::BTreeMap<String, String> {
        let Some(upstream) = self.inner.upstream.get() else {
            return rec
                .expires_at
                .map(|at| ("roony_expires".to_string(), at.to_string()))
                .into_iter()
                .collect();
        };
        let m = &rec.request.merchant;
        let clip = |s: &str| s.chars().take(200).collect::<String>();
        let mut md = std::collections::BTreeMap::from([
            ("roony_intent_id".to_string(), rec.id.clone()),
            ("roony_agent_id".to_string(), rec.agent_id.clone()),
            (
                "roony_limit".to_string(),
                rec.reservation.as_ref().map_or(0, |r| r.amount).to_string(),
            ),
            (
                "roony_currency".to_string(),
                rec.request.amount.currency.code().to_string(),
            ),
            ("roony_merchant".to_string(), clip(&m.name)),
        ]);
        if let Some(d) = &m.domain {
            md.insert("roony_domain".to_string(), clip(d));
        }
        if let Some(c) = &m.country {
            md.insert("roony_country".to_string(), c.clone());
        }
        if let Some(c) = &m.category {
            md.insert("roony_category".to_string(), c.clone());
        }
        if let Some(at) = rec.expires_at {
            md.insert("roony_expires".to_string(), at.to_string());
        }
        upstream.sign_card_metadata(&mut md);
        md
    }

    fn owned_intent(&self, agent: &AgentIdentity, id: &str) -> Result<IntentRecord, ServiceError> {
        match self.inner.store.intent(id)? {
            // Another agent's intent is reported as missing, not forbidden.
            Some(rec) if rec.agent_id == agent.agent_id => Ok(rec),
            _ => Err(ServiceError::NotFound),
        }
    }

    /// The agent's intent. The card of a purchase an administrator approved is created after
    /// the agent's request returned, so for such an intent that is approved and unused the
    /// card's number and CVC are included (fetched from Stripe; never stored).
    pub async fn get_purchase(
        &self,
        agent: &AgentIdentity,
        id: &str,
    ) -> Result<IntentView, ServiceError> {
        let rec = self.owned_intent(agent, id)?;
        let mut view = IntentView::from_record(&rec);
        let approved_later = rec
            .status_reason
            .as_ref()
            .is_some_and(|r| r.code == ReasonCode::ApprovedByAdmin);
        if rec.status == IntentStatus::Approved && approved_later && is_vault(&rec) {
            self.vault_card(&rec).await.map_err(ServiceError::Stripe)?;
        } else if rec.status == IntentStatus::Approved
            && approved_later
            && let (Some(card_ref), Some(card)) = (&rec.card, view.card.as_mut())
        {
            let issued = self
                .inner
                .issuer
                .retrieve_card(&card_ref.id, true)
                .await
                .map_err(ServiceError::Stripe)?;
            if let Some(s) = issued.secrets {
                card.number = Some(s.number);
                card.cvc = Some(s.cvc);
            }
        }
        Ok(view)
    }

    pub fn list_purchases(
        &self,
        agent: &AgentIdentity,
        limit: usize,
        starting_after: Option<&str>,
    ) -> Result<IntentPage, ServiceError> {
        let limit = limit.clamp(1, 100);
        let cursor = match starting_after {
            Some(id) => Some(self.owned_intent(agent, id)?),
            None => None,
        };
        let mut rows =
            self.inner
                .store
                .list_intents(&agent.agent_id, limit + 1, cursor.as_ref())?;
        let has_more = rows.len() > limit;
        rows.truncate(limit);
        let data: Vec<IntentView> = rows.iter().map(IntentView::from_record).collect();
        Ok(IntentPage {
            next_cursor: if has_more {
                data.last().map(|v| v.id.clone())
            } else {
                None
            },
            has_more,
            data,
        })
    }

    /// Cancels an approved or pending intent: the card is canceled at Stripe first, then the
    /// reservation is released. Canceling a canceled intent returns it unchanged.
    pub async fn cancel_purchase(
        &self,
        agent: &AgentIdentity,
        id: &str,
    ) -> Result<IntentView, ServiceError> {
        let rec = self.owned_intent(agent, id)?;
        match rec.status {
            IntentStatus::Canceled => return Ok(IntentView::from_record(&rec)),
            IntentStatus::Issuing => return Err(ServiceError::InProgress),
            IntentStatus::Approved | IntentStatus::PendingApproval => {}
            other => return Err(ServiceError::NotCancelable(other.as_str())),
        }
        self.end(rec, IntentStatus::Canceled)
            .await
            .map(|r| IntentView::from_record(&r))
    }

    /// Cancels the card (if any) and moves the intent to `to`, releasing its reservation.
    async fn end(&self, rec: IntentRecord, to: IntentStatus) -> Result<IntentRecord, ServiceError> {
        self.inner.vault.remove(&rec.id);
        if let Some(card) = &rec.card {
            match self.inner.issuer.cancel_card(&card.id).await {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {
                    tracing::warn!(card = %card.id, "card unknown to stripe; treating as canceled");
                }
                Err(e) => return Err(ServiceError::Stripe(e)),
            }
        }
        let reason = match to {
            IntentStatus::Expired => Reason::new(
                ReasonCode::IntentExpired,
                "the card expired unused and was canceled; its reservation was released",
            ),
            _ => Reason::new(
                ReasonCode::IntentCanceled,
                "canceled by the agent; the card was canceled and its reservation released",
            ),
        };
        let now = self.now();
        let store = self.inner.store.clone();
        let id = rec.id.clone();
        let rec = blocking(move || store.finish(&id, to, reason, now)).await?;
        tracing::info!(intent = %rec.id, status = rec.status.as_str(), "intent ended; reservation released");
        Ok(rec)
    }

    pub fn budget(&self, agent: &AgentIdentity) -> Result<BudgetView, ServiceError> {
        let a = self
            .inner
            .store
            .agent(&agent.agent_id)?
            .ok_or(ServiceError::NotFound)?;
        let policy = a
            .policy
            .as_ref()
            .map_err(|_| ServiceError::Internal("agent policy is invalid".into()))?;
        let budgets = self
            .inner
            .store
            .budgets(&agent.agent_id, policy, self.now())?;
        let summary = if budgets.is_empty() {
            "no period budgets are set".to_string()
        } else {
            budgets
                .iter()
                .map(|b| {
                    format!(
                        "{} budget: {} left of {}",
                        b.period.as_str().replace('_', "-"),
                        Money::new(b.remaining.max(0), policy.currency),
                        Money::new(b.limit, policy.currency)
                    )
                })
                .collect::<Vec<_>>()
                .join("; ")
        };
        Ok(BudgetView {
            agent_id: agent.agent_id.clone(),
            currency: policy.currency.code().to_string(),
            max_per_transaction: policy.max_per_transaction,
            require_approval_above: policy.require_approval_above,
            budgets,
            summary,
        })
    }

    // ---- background work ---------------------------------------------------------------

    /// Expires due cards and approvals once. Returns how many intents were ended.
    pub async fn expire_due(&self) -> Result<usize, ServiceError> {
        let now = self.now();
        self.prune_vault(now);
        let due = self.inner.store.due_timers(now, 100)?;
        let mut ended = 0;
        for (at, id) in due {
            let Some(rec) = self.inner.store.intent(&id)? else {
                self.inner.store.remove_timer(at, &id)?;
                continue;
            };
            match rec.status {
                IntentStatus::Approved | IntentStatus::PendingApproval => {
                    match self.end(rec, IntentStatus::Expired).await {
                        Ok(_) => ended += 1,
                        Err(e) => {
                            tracing::warn!(intent = %id, error = %e, "expiry failed; will retry")
                        }
                    }
                }
                // Card creation still running or being recovered: try again next round.
                IntentStatus::Issuing => {}
                _ => self.inner.store.remove_timer(at, &id)?,
            }
        }
        Ok(ended)
    }

    /// Finishes card creations interrupted by a crash: the same Stripe idempotency key is
    /// used, so a card Stripe already made is found rather than made twice.
    pub async fn recover(&self) -> Result<usize, ServiceError> {
        let ids = self.inner.store.issuing()?;
        let mut n = 0;
        for id in ids {
            if let Some(rec) = self.inner.store.intent(&id)?
                && rec.status == IntentStatus::Issuing
            {
                tracing::info!(intent = %id, "recovering interrupted card issuance");
                self.issue(rec).await?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Creates the cards of intents an administrator approved (see
    /// `Store::apply_admin_decisions`). Returns how many were attempted.
    pub async fn issue_approved(&self) -> usize {
        let mut n = 0;
        for id in self.inner.store.take_approved() {
            match self.inner.store.intent(&id) {
                Ok(Some(rec)) if rec.status == IntentStatus::Issuing => {
                    n += 1;
                    match self.issue(rec).await {
                        Ok((rec, _)) => {
                            tracing::info!(intent = %id, status = rec.status.as_str(), "approved intent issued")
                        }
                        Err(e) => {
                            tracing::error!(intent = %id, error = %e, "issuing an approved intent failed")
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(intent = %id, error = %e, "cannot read an approved intent")
                }
            }
        }
        n
    }

    /// Runs recovery, then the expiry loop, until the process ends; alongside, creates the
    /// cards of approved intents and makes non-durable commits durable every 200 ms.
    pub fn spawn_background(&self) -> tokio::task::JoinHandle<()> {
        let approvals = self.clone();
        tokio::spawn(async move {
            loop {
                approvals.inner.store.approved_written().await;
                approvals.issue_approved().await;
            }
        });
        let store = self.inner.store.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tick.tick().await;
                let s = store.clone();
                match tokio::task::spawn_blocking(move || s.flush()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::error!(error = %e, "flush failed"),
                    Err(e) => tracing::error!(error = %e, "flush task failed"),
                }
            }
        });
        let svc = self.clone();
        tokio::spawn(async move {
            if let Err(e) = svc.recover().await {
                tracing::error!(error = %e, "recovery failed");
            }
            let mut tick = tokio::time::interval(svc.inner.config.expiry_interval);
            loop {
                tick.tick().await;
                if let Err(e) = svc.expire_due().await {
                    tracing::error!(error = %e, "expiry pass failed");
                }
            }
        })
    }
}

fn is_vault(rec: &IntentRecord) -> bool {
    rec.request.card_delivery == Some(CardDelivery::Vault)
}

// ---- card vault and egress ------------------------------------------------------------
impl Service {
    /// The effective card delivery of a request under the agent's policy: `None` for raw
    /// (as recorded before vault delivery existed), `Some(Vault)` for vault.
    fn resolve_delivery(
        &self,
        agent_id: &str,
        requested: Option<CardDelivery>,
    ) -> Result<Option<CardDelivery>, ServiceError> {
        let rule = match self.inner.store.agent(agent_id)? {
            Some(a) => a.record.policy.card_delivery,
            // A missing agent is declined by the decision itself.
            None => return Ok(requested.filter(|d| *d == CardDelivery::Vault)),
        };
        match rule.resolve(requested) {
            Ok(CardDelivery::Vault) => Ok(Some(CardDelivery::Vault)),
            Ok(CardDelivery::Raw) => Ok(None),
            Err(code) => Err(ServiceError::Invalid(
                crate::domain::intent::ValidationError {
                    code,
                    field: "card_delivery",
                    message: "this agent's policy allows only vault card delivery (`card_delivery: \"vault\"`): the card number is filled in by the sidecar's egress proxy".into(),
                },
            )),
        }
    }

    /// Hosts a vault card of `rec` may be sent to: the merchant's domain and the policy's
    /// `merchants.allow_domains`.
    fn allowed_hosts(&self, rec: &IntentRecord) -> Vec<String> {
        let mut hosts: Vec<String> = rec.request.merchant.domain.iter().cloned().collect();
        if let Ok(Some(agent)) = self.inner.store.agent(&rec.agent_id)
            && let Ok(policy) = &agent.policy
        {
            hosts.extend(policy.merchants.allow_domains.iter().cloned());
        }
        hosts
    }

    fn vault_entry(&self, rec: &IntentRecord, s: &crate::issuer::CardSecrets) -> vault::VaultCard {
        vault::VaultCard {
            intent_id: rec.id.clone(),
            agent_id: rec.agent_id.clone(),
            number: s.number.clone(),
            cvc: s.cvc.clone(),
            exp_month: rec.card.as_ref().map_or(0, |c| c.exp_month),
            exp_year: rec.card.as_ref().map_or(0, |c| c.exp_year),
            hosts: self.allowed_hosts(rec),
            expires_at: rec.expires_at,
        }
    }

    /// The vault card of an approved vault intent, fetched from Stripe (number and CVC
    /// expanded) when the vault does not hold it, e.g. after a restart.
    async fn vault_card(&self, rec: &IntentRecord) -> Result<Arc<vault::VaultCard>, IssuerError> {
        if let Some(c) = self.inner.vault.get(&rec.id) {
            return Ok(c);
        }
        let card_ref = rec
            .card
            .as_ref()
            .ok_or_else(|| IssuerError::Config("the intent has no card".into()))?;
        let issued = self.inner.issuer.retrieve_card(&card_ref.id, true).await?;
        let secrets = issued
            .secrets
            .ok_or_else(|| IssuerError::Config("stripe returned no card number".into()))?;
        Ok(self.inner.vault.insert(self.vault_entry(rec, &secrets)))
    }

    /// The card behind a placeholder, for a request of `agent` to `host`; refused unless the
    /// intent is the agent's, a vault card, approved, unexpired, and `host` is its merchant.
    pub async fn egress_card(
        &self,
        agent: &AgentIdentity,
        intent_id: &str,
        host: &str,
    ) -> Result<Arc<vault::VaultCard>, EgressRefusal> {
        let rec = match self.inner.store.intent(intent_id) {
            Ok(Some(rec)) => rec,
            Ok(None) => return Err(EgressRefusal::NotActive),
            Err(e) => {
                tracing::error!(error = %e, "intent lookup failed");
                return Err(EgressRefusal::NotActive);
            }
        };
        if rec.agent_id != agent.agent_id {
            return Err(EgressRefusal::NotYours);
        }
        let now = self.now();
        if !is_vault(&rec)
            || rec.status != IntentStatus::Approved
            || rec.expires_at.is_some_and(|at| now >= at)
        {
            self.inner.vault.remove(intent_id);
            return Err(EgressRefusal::NotActive);
        }
        let card = self.vault_card(&rec).await.map_err(|e| {
            tracing::warn!(intent = %intent_id, error = %e, "vault card unavailable");
            EgressRefusal::NotActive
        })?;
        if !card.allows(host) {
            return Err(EgressRefusal::DestinationNotAllowed);
        }
        Ok(card)
    }

    /// Drops vault cards whose intent is no longer approved and unexpired.
    fn prune_vault(&self, now: UnixSeconds) {
        for id in self.inner.vault.intent_ids() {
            let keep = matches!(
                self.inner.store.intent(&id),
                Ok(Some(rec)) if rec.status == IntentStatus::Approved
                    && rec.expires_at.is_none_or(|at| now < at)
            );
            if !keep {
                self.inner.vault.remove(&id);
            }
        }
    }
}

fn log_decision(rec: &IntentRecord) {
    let codes: Vec<&str> = rec
        .decision
        .reasons
        .iter()
        .map(|r| r.code.as_str())
        .collect();
    tracing::info!(
        intent = %rec.id,
        decision = %rec.decision.id,
        agent = %rec.agent_id,
        outcome = ?rec.decision.outcome,
        amount = %rec.request.amount,
        merchant = %rec.request.merchant.name,
        reasons = ?codes,
        "decision"
    );
    debug_assert!(rec.decision.outcome != Outcome::Approved || rec.reservation.is_some());
}
