//! Reconciliation: compares what Stripe has (Issuing cards, and the authorizations and
//! transactions created since a point in time) with the ledger, fixes what can be fixed and
//! reports every difference.
//!
//! - Cards: a ledger card whose status differs is updated as an `issuing_card.updated`
//!   webhook would; a card Stripe still shows active whose purchase ended is canceled at
//!   Stripe. A card with `roony_*` metadata the ledger lacks is adopted when its purchase
//!   is in the ledger and alive, or when its signed metadata verifies and has not expired;
//!   otherwise it is canceled at Stripe (an unaccounted card of an unknown purchase is also
//!   an `orphan_card` discrepancy). Cards without Roony metadata are counted, not touched.
//! - Authorizations and transactions the ledger lacks (or whose authorization differs) are
//!   applied through the webhook paths (`ControlDb::apply_*_as`): settlement, discrepancy
//!   checks and the sidecars' updates feed behave as if the webhook had arrived.
//!
//! One run at a time per process; a periodic task runs it every interval.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use serde_json::Value;

use super::db::{Actor, ControlDb, DbError};
use super::model::{
    ReconcileEntry, ReconcileReport, ReconciliationRun, StripeCard, StripeEventMeta,
};
use crate::issuer::{Issuer, IssuerError, StripeConfig};
use crate::service::ids::new_id;

/// Default interval of the periodic run, seconds.
pub const DEFAULT_INTERVAL_SECONDS: u64 = 3600;
/// Without an explicit `since` and without an earlier successful run: this far back.
pub const FIRST_RUN_LOOKBACK_SECONDS: i64 = 30 * 86_400;
/// Without an explicit `since`: the last successful run's start minus this.
pub const OVERLAP_SECONDS: i64 = 86_400;

/// Intent statuses after which a card must not stay usable.
const ENDED: &[&str] = &["declined", "canceled", "expired", "failed", "settled"];

/// How a control plane reaches Stripe for reconciliation.
#[derive(Clone, Debug)]
pub struct ReconcileConfig {
    pub stripe: StripeConfig,
    /// Period of the background run; zero: on demand only.
    pub interval: Duration,
}

/// Reconciliation settings of a control plane and the lock that keeps runs one at a time.
#[derive(Debug, Default)]
pub struct ReconcileState {
    config: Option<ReconcileConfig>,
    running: tokio::sync::Mutex<()>,
}

impl ReconcileState {
    pub fn new(config: Option<ReconcileConfig>) -> ReconcileState {
        ReconcileState {
            config,
            running: tokio::sync::Mutex::new(()),
        }
    }

    pub fn config(&self) -> Option<&ReconcileConfig> {
        self.config.as_ref()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("no stripe api key is configured (--stripe-api-key)")]
    NotConfigured,
    #[error("a reconciliation is already running")]
    Running,
    #[error(transparent)]
    Db(#[from] DbError),
}

/// Runs one reconciliation now (if none is running) and stores it. `since`: compare the
/// authorizations and transactions created from then (default: the last successful run's
/// start minus a day, or 30 days back).
pub async fn run_now(
    db: &ControlDb,
    since: Option<i64>,
    actor: &Actor,
) -> Result<ReconciliationRun, ReconcileError> {
    let state = db.reconcile_state();
    let Some(config) = state.config() else {
        return Err(ReconcileError::NotConfigured);
    };
    let Ok(_guard) = state.running.try_lock() else {
        return Err(ReconcileError::Running);
    };
    let started_at = super::unix_now();
    let since = match since {
        Some(s) => s,
        None => match db.last_ok_reconciliation().await? {
            Some(t) => t - OVERLAP_SECONDS,
            None => started_at - FIRST_RUN_LOOKBACK_SECONDS,
        },
    };
    let id = new_id("rcn");
    let run_actor = Actor {
        request_id: Some(id.clone()),
        ..actor.clone()
    };
    let mut r = Run {
        db,
        actor: &run_actor,
        run_id: &id,
        seq: 0,
        report: ReconcileReport {
            since,
            ..Default::default()
        },
    };
    let outcome = match stripe_for_run(db, &config.stripe).await {
        Ok(stripe) => match Issuer::new(stripe) {
            Ok(issuer) => r.run(&issuer).await,
            Err(e) => Err(RunError::Stripe(e)),
        },
        Err(e) => Err(e),
    };
    let mut report = r.report;
    let status = match outcome {
        Ok(()) => "ok",
        Err(e) => {
            tracing::warn!(run = %id, error = %e, "reconciliation failed");
            report.error = Some(e.to_string());
            "failed"
        }
    };
    report.totals.differences = i64::try_from(report.entries.len()).unwrap_or(i64::MAX);
    let run = ReconciliationRun {
        id,
        started_at,
        finished_at: super::unix_now().max(started_at),
        status: status.into(),
        actor_type: actor.kind.to_string(),
        actor_id: actor.id.clone(),
        report,
    };
    db.insert_reconciliation_run(&run, &run_actor).await?;
    tracing::info!(run = %run.id, status, since, differences = run.report.totals.differences,
        adopted = run.report.totals.adopted, canceled = run.report.totals.canceled,
        recorded = run.report.totals.recorded, "reconciliation");
    Ok(run)
}

/// Runs reconciliation every `interval` (the first run one interval after start) until the
/// task is dropped or aborted. Nothing if reconciliation is off or the interval is zero.
pub async fn periodic(db: ControlDb) {
    let Some(interval) = db
        .reconcile_state()
        .config()
        .map(|c| c.interval)
        .filter(|i| !i.is_zero())
    else {
        return;
    };
    let actor = Actor::system();
    loop {
        tokio::time::sleep(interval).await;
        match run_now(&db, None, &actor).await {
            Ok(_) | Err(ReconcileError::Running) => {}
            Err(e) => tracing::warn!(error = %e, "periodic reconciliation failed"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum RunError {
    #[error("stripe: {0}")]
    Stripe(#[from] IssuerError),
    #[error("ledger: {0}")]
    Db(#[from] DbError),
    #[error("stripe credentials: {0}")]
    Credential(String),
}

/// The Stripe access of a run: under Stripe Connect, the organization's connected account
/// (its access token; the platform key would list the platform's own cards), otherwise the
/// configured key.
async fn stripe_for_run(db: &ControlDb, base: &StripeConfig) -> Result<StripeConfig, RunError> {
    if !matches!(
        db.stripe_setup().credentials,
        super::connect::StripeCredentials::Connect(_)
    ) {
        return Ok(base.clone());
    }
    let org = db
        .default_org()
        .await?
        .ok_or_else(|| RunError::Credential("no organization".into()))?;
    let credential = super::connect::issuing_credential(db, &org.id)
        .await
        .map_err(|e| RunError::Credential(format!("{} ({})", e, e.code())))?;
    let mut stripe = base.clone();
    stripe.api_key = credential.api_key;
    stripe.account = credential.account;
    Ok(stripe)
}

struct Run<'a> {
    db: &'a ControlDb,
    actor: &'a Actor,
    run_id: &'a str,
    seq: u64,
    report: ReconcileReport,
}

struct Entry<'a> {
    kind: &'a str,
    stripe_id: &'a str,
    intent_id: Option<&'a str>,
    agent_id: Option<&'a str>,
    detail: String,
    action: &'a str,
}

fn now() -> i64 {
    super::unix_now()
}

/// The card's all-time (or first) spending limit at Stripe.
fn spending_limit(card: &Value) -> i64 {
    let limits = card
        .get("spending_controls")
        .and_then(|s| s.get("spending_limits"))
        .and_then(Value::as_array);
    limits
        .and_then(|l| {
            l.iter()
                .find(|x| x.get("interval").and_then(Value::as_str) == Some("all_time"))
                .or_else(|| l.first())
        })
        .and_then(|x| x.get("amount"))
        .and_then(Value::as_i64)
        .unwrap_or(0)
}

impl Run<'_> {
    fn push(&mut self, e: Entry<'_>) {
        let t = &mut self.report.totals;
        match e.action {
            "adopted" => t.adopted += 1,
            "canceled" => t.canceled += 1,
            "recorded" => t.recorded += 1,
            _ => {}
        }
        self.report.entries.push(ReconcileEntry {
            kind: e.kind.into(),
            stripe_id: e.stripe_id.into(),
            intent_id: e.intent_id.map(str::to_string),
            agent_id: e.agent_id.map(str::to_string),
            detail: e.detail,
            action: e.action.into(),
        });
    }

    /// A synthetic event envelope: unique per run and object, so the webhook path applies
    /// it (and records it in `stripe_events` under this id).
    fn event(&mut self, kind: &str, object_id: &str) -> StripeEventMeta {
        self.seq += 1;
        StripeEventMeta {
            id: format!("reconcile_{}_{}_{object_id}", self.run_id, self.seq),
            kind: kind.into(),
            account: None,
            created: now(),
        }
    }

    async fn run(&mut self, issuer: &Issuer) -> Result<(), RunError> {
        let cards = issuer.list_cards_json().await?;
        let mut at_stripe = HashSet::new();
        let mut foreign = HashSet::new();
        for v in &cards {
            let Some(card) = super::webhooks::parse_card(Some(v)) else {
                continue;
            };
            self.report.totals.cards_checked += 1;
            at_stripe.insert(card.id.clone());
            if !self.card(issuer, v, &card).await? {
                self.report.totals.foreign_cards += 1;
                foreign.insert(card.id.clone());
            }
        }
        for (card_id, intent_id, agent_id) in self.db.open_ledger_cards().await? {
            if !at_stripe.contains(&card_id) {
                self.push(Entry {
                    kind: "card_missing_at_stripe",
                    stripe_id: &card_id,
                    intent_id: Some(&intent_id),
                    agent_id: Some(&agent_id),
                    detail: "the ledger has this card (not canceled) but stripe does not list it"
                        .into(),
                    action: "none",
                });
            }
        }
        let since = self.report.since;
        // Oldest first, so the ledger sees them in the order Stripe made them.
        let mut auths = issuer.list_authorizations_json(since).await?;
        auths.reverse();
        for v in &auths {
            self.report.totals.authorizations_checked += 1;
            self.authorization(v, &foreign).await?;
        }
        let mut txns = issuer.list_transactions_json(since).await?;
        txns.reverse();
        for v in &txns {
            self.report.totals.transactions_checked += 1;
            self.transaction(v, &foreign).await?;
        }
        Ok(())
    }

    /// Cancels a card at Stripe; the ledger's card (if any) follows as the webhook would.
    async fn cancel(&mut self, issuer: &Issuer, card: &StripeCard) -> Result<(), RunError> {
        issuer.cancel_card(&card.id).await?;
        let canceled = StripeCard {
            status: Some("canceled".into()),
            ..card.clone()
        };
        if self
            .db
            .reconcile_card_view(&card.id, None)
            .await?
            .card_status
            .is_some_and(|s| s != "canceled")
        {
            let event = self.event("issuing_card.updated", &card.id);
            self.db
                .apply_card_as(&event, &canceled, now(), self.actor)
                .await?;
        }
        Ok(())
    }

    /// One Stripe card. `false` if it is not Roony's.
    async fn card(
        &mut self,
        issuer: &Issuer,
        raw: &Value,
        card: &StripeCard,
    ) -> Result<bool, RunError> {
        let claimed = card.metadata.get("roony_intent_id").cloned();
        let view = self
            .db
            .reconcile_card_view(&card.id, claimed.as_deref())
            .await?;
        let stripe_status = card.status.clone().unwrap_or_else(|| "active".into());
        let active = stripe_status == "active";
        let intent = view.intent_id.clone();
        let agent = view.agent_id.clone();
        let ended = view
            .intent_status
            .as_deref()
            .is_some_and(|s| ENDED.contains(&s));
        if let Some(ledger_status) = &view.card_status {
            if active && (ended || ledger_status == "canceled") {
                // The ledger says the card must not be usable: Stripe follows.
                self.cancel(issuer, card).await?;
                self.push(Entry {
                    kind: "card_should_be_canceled",
                    stripe_id: &card.id,
                    intent_id: intent.as_deref(),
                    agent_id: agent.as_deref(),
                    detail: format!(
                        "the purchase is {} and the ledger's card {ledger_status}, but the card is active at stripe",
                        view.intent_status.as_deref().unwrap_or_default()
                    ),
                    action: "canceled",
                });
            } else if *ledger_status != stripe_status {
                let event = self.event("issuing_card.updated", &card.id);
                self.db
                    .apply_card_as(&event, card, now(), self.actor)
                    .await?;
                self.push(Entry {
                    kind: "card_status_differs",
                    stripe_id: &card.id,
                    intent_id: intent.as_deref(),
                    agent_id: agent.as_deref(),
                    detail: format!("stripe: {stripe_status}, ledger: {ledger_status}"),
                    action: "recorded",
                });
            }
            return Ok(true);
        }
        let Some(claimed) = claimed else {
            return Ok(false);
        };
        if intent.is_some() {
            // The purchase is in the ledger, its card is not.
            let refuse = if ended {
                Some(format!(
                    "the purchase is {}",
                    view.intent_status.as_deref().unwrap_or_default()
                ))
            } else if let Some(other) = &view.other_card {
                Some(format!("the purchase already has card {other}"))
            } else if card
                .metadata
                .get("roony_agent_id")
                .is_some_and(|a| Some(a) != agent.as_ref())
            {
                Some("the card names another agent than the purchase".into())
            } else {
                None
            };
            match refuse {
                Some(why) => {
                    if active {
                        self.cancel(issuer, card).await?;
                        self.push(Entry {
                            kind: "orphan_card_canceled",
                            stripe_id: &card.id,
                            intent_id: intent.as_deref(),
                            agent_id: agent.as_deref(),
                            detail: format!("a card the ledger does not have: {why}"),
                            action: "canceled",
                        });
                    }
                }
                None => {
                    let adopted = self
                        .db
                        .adopt_card_for_intent(card, spending_limit(raw), self.actor, now())
                        .await?;
                    if adopted {
                        self.push(Entry {
                            kind: "card_adopted",
                            stripe_id: &card.id,
                            intent_id: intent.as_deref(),
                            agent_id: agent.as_deref(),
                            detail: format!(
                                "the ledger had the purchase but not its card ({stripe_status})"
                            ),
                            action: "adopted",
                        });
                    }
                }
            }
            return Ok(true);
        }
        // The purchase is unknown: only signed, unexpired metadata accounts for the card.
        let verified = self.db.card_metadata_verifies(card).await?;
        let fresh = matches!(verified, Some(exp) if exp.is_none_or(|t| t > now()));
        let claimed_agent = card.metadata.get("roony_agent_id").cloned();
        if fresh {
            let event = self.event("issuing_card.updated", &card.id);
            self.db
                .apply_card_as(&event, card, now(), self.actor)
                .await?;
            self.push(Entry {
                kind: "card_adopted",
                stripe_id: &card.id,
                intent_id: Some(&claimed),
                agent_id: claimed_agent.as_deref(),
                detail: "a card of a purchase the ledger does not have yet; its signed metadata verifies"
                    .into(),
                action: "adopted",
            });
        } else if active {
            self.cancel(issuer, card).await?;
            let why = if verified.is_some() {
                "its signed metadata has expired"
            } else {
                "its metadata does not verify"
            };
            let message = format!("a card of an unknown purchase: {why}");
            self.db
                .record_orphan_card(card, &message, self.actor, now())
                .await?;
            self.push(Entry {
                kind: "orphan_card_canceled",
                stripe_id: &card.id,
                intent_id: Some(&claimed),
                agent_id: claimed_agent.as_deref(),
                detail: message,
                action: "canceled",
            });
        }
        Ok(true)
    }

    async fn authorization(
        &mut self,
        raw: &Value,
        foreign: &HashSet<String>,
    ) -> Result<(), RunError> {
        let Ok(auth) = super::webhooks::parse_authorization(raw) else {
            return Ok(());
        };
        if foreign.contains(&auth.card.id) {
            return Ok(());
        }
        let stored = self.db.authorization_state(&auth.id).await?;
        // The amount as the webhook path would store it.
        let amount = if auth.amount > 0 {
            auth.amount
        } else {
            auth.last_request_amount
                .or(auth.pending_amount)
                .or(stored.as_ref().map(|s| s.0))
                .unwrap_or(0)
        };
        let (kind, detail) = match &stored {
            None => (
                "authorization_missing",
                format!(
                    "stripe: {} {amount} {}, the ledger does not have it",
                    if auth.approved {
                        "approved"
                    } else {
                        "declined"
                    },
                    auth.currency
                ),
            ),
            Some((a, approved, status))
                if *a != amount || *approved != auth.approved || *status != auth.status =>
            {
                (
                    "authorization_differs",
                    format!(
                        "stripe: {} approved={} amount={amount}; ledger: {status} approved={approved} amount={a}",
                        auth.status, auth.approved
                    ),
                )
            }
            Some(_) => return Ok(()),
        };
        let event = self.event(
            if stored.is_none() {
                "issuing_authorization.created"
            } else {
                "issuing_authorization.updated"
            },
            &auth.id,
        );
        self.db
            .apply_authorization_as(&event, &auth, now(), self.actor)
            .await?;
        let owner = self.db.reconcile_card_view(&auth.card.id, None).await?;
        self.push(Entry {
            kind,
            stripe_id: &auth.id,
            intent_id: owner.intent_id.as_deref(),
            agent_id: owner.agent_id.as_deref(),
            detail,
            action: "recorded",
        });
        Ok(())
    }

    async fn transaction(
        &mut self,
        raw: &Value,
        foreign: &HashSet<String>,
    ) -> Result<(), RunError> {
        let Ok(Some(t)) = super::webhooks::parse_transaction(raw) else {
            return Ok(());
        };
        if foreign.contains(&t.card_id) {
            return Ok(());
        }
        let owner = self.db.reconcile_card_view(&t.card_id, None).await?;
        match self.db.settlement_amount(&t.id).await? {
            Some(a) if a == t.amount => {}
            Some(a) => self.push(Entry {
                kind: "transaction_differs",
                stripe_id: &t.id,
                intent_id: owner.intent_id.as_deref(),
                agent_id: owner.agent_id.as_deref(),
                detail: format!("{}: stripe {} {}, ledger {a}", t.kind, t.amount, t.currency),
                action: "none",
            }),
            None => {
                let event = self.event("issuing_transaction.created", &t.id);
                self.db
                    .apply_transaction_as(&event, &t, now(), self.actor)
                    .await?;
                self.push(Entry {
                    kind: "transaction_missing",
                    stripe_id: &t.id,
                    intent_id: owner.intent_id.as_deref(),
                    agent_id: owner.agent_id.as_deref(),
                    detail: format!(
                        "{} of {} {} the ledger did not have",
                        t.kind, t.amount, t.currency
                    ),
                    action: "recorded",
                });
            }
        }
        Ok(())
    }
}

/// Report entries by kind (tests and logs).
pub fn kinds(report: &ReconcileReport) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for e in &report.entries {
        *out.entry(e.kind.clone()).or_insert(0) += 1;
    }
    out
}
