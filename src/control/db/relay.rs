//! Cards the issuing relay created (`relay_cards`, migration 0011): one row per intent,
//! claimed before the request goes to Stripe, so that a second card for an intent and
//! concurrent creations above a budget are refused. The checks themselves are the relay's
//! (`crate::control::relay`); this module reads the facts they need and writes the row in
//! one transaction that holds the agent's row lock (and the rows of the shared budgets
//! involved), which serializes concurrent creations for an agent across replicas.

use sqlx::Row;

use super::{Actor, ControlDb, DbError};
use crate::domain::time::Period;

/// Which cards a budget bound counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelayScope {
    Agent,
    Project,
    Org,
}

impl RelayScope {
    pub fn as_str(&self) -> &'static str {
        match self {
            RelayScope::Agent => "agent",
            RelayScope::Project => "project",
            RelayScope::Org => "org",
        }
    }

    fn column(&self) -> &'static str {
        match self {
            RelayScope::Agent => "agent_id",
            RelayScope::Project => "project_id",
            RelayScope::Org => "org_id",
        }
    }
}

/// A budget the new card must fit in: the exposure of the scope's relay cards created
/// since `since` (the start of the budget's current period) plus the card's limit must
/// stay at most `max` (the budget plus the card buffer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayBound {
    pub scope: RelayScope,
    pub scope_id: String,
    /// The `budgets` row to lock (shared budgets); `None` for the agent's own budgets.
    pub budget_id: Option<String>,
    pub period: Period,
    pub since: i64,
    pub limit: i64,
    pub max: i64,
}

/// The card the relay is about to create.
#[derive(Clone, Debug)]
pub struct RelayCardClaim {
    pub intent_id: String,
    pub agent_id: String,
    pub project_id: String,
    pub org_id: String,
    pub sidecar_id: String,
    /// ISO 4217 code, upper case.
    pub currency: String,
    pub spending_limit: i64,
    /// SHA-256 hex of the request's Idempotency-Key.
    pub idempotency_key_hash: String,
    /// Unix seconds after which the card must not be used (its `roony_expires`).
    pub expires_at: i64,
    /// The agent's policy revision the card was checked against.
    pub policy_revision: i64,
    pub bounds: Vec<RelayBound>,
}

/// A stored relay card.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayCardRow {
    pub intent_id: String,
    pub card_id: Option<String>,
    pub agent_id: String,
    pub project_id: String,
    pub org_id: String,
    pub sidecar_id: String,
    pub currency: String,
    pub spending_limit: i64,
    pub idempotency_key_hash: String,
    pub created_at: i64,
    pub canceled_at: Option<i64>,
    /// Unix seconds after which the card must not be used.
    pub expires_at: i64,
}

/// What the control plane's ledger says about the intent a card is claimed for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LedgerIntentFacts {
    pub agent_id: String,
    pub status: String,
    pub amount: i64,
    pub currency: String,
    /// `approved` / `declined` when an administrator decided it.
    pub admin_decision: Option<String>,
}

/// Everything the relay's judgement of a claim reads, under the lock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayFacts {
    /// The agent's status (`active`, `frozen`, …) as the lock read it.
    pub agent_status: String,
    /// The agent's current policy revision as the lock read it (`None`: no policy).
    pub policy_revision: Option<i64>,
    /// The card already claimed for this intent, if any.
    pub existing: Option<RelayCardRow>,
    pub intent: Option<LedgerIntentFacts>,
    /// For each bound of the claim, in order: the exposure of its scope's relay cards in
    /// its period (without the new card).
    pub exposures: Vec<i64>,
}

/// The relay's judgement of a claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RelayVerdict {
    /// A new card: the row is inserted.
    Create,
    /// An idempotent retry of the card already claimed: nothing is written.
    Retry,
}

/// The outcome of [`ControlDb::claim_relay_card`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RelayClaim {
    Created,
    Retry,
    /// Refused, with the relay's (lowercase) message.
    Refused(String),
}

const COLUMNS: &str = "intent_id, card_id, agent_id, project_id, org_id, sidecar_id, currency, \
    spending_limit, idempotency_key_hash, created_at, canceled_at, expires_at";

fn row_of(r: &sqlx::any::AnyRow) -> Result<RelayCardRow, DbError> {
    Ok(RelayCardRow {
        intent_id: r.try_get("intent_id")?,
        card_id: r.try_get("card_id")?,
        agent_id: r.try_get("agent_id")?,
        project_id: r.try_get("project_id")?,
        org_id: r.try_get("org_id")?,
        sidecar_id: r.try_get("sidecar_id")?,
        currency: r.try_get("currency")?,
        spending_limit: r.try_get("spending_limit")?,
        idempotency_key_hash: r.try_get("idempotency_key_hash")?,
        created_at: r.try_get("created_at")?,
        canceled_at: r.try_get("canceled_at")?,
        // Never NULL: schema 14 filled older rows and every claim sets it.
        expires_at: r.try_get("expires_at")?,
    })
}

impl ControlDb {
    /// Claims the card of an intent, in one transaction: locks the agent's row (then the
    /// rows of the shared budgets bounding the card, by id), reads the facts, asks `judge`,
    /// and inserts the claim (audited `relay.card.create`) when the verdict is
    /// [`RelayVerdict::Create`]. `judge`'s `Err` is a refusal (nothing is written).
    pub async fn claim_relay_card(
        &self,
        claim: &RelayCardClaim,
        judge: impl FnOnce(&RelayFacts) -> Result<RelayVerdict, String>,
        actor: &Actor,
        now: i64,
    ) -> Result<RelayClaim, DbError> {
        let mut tx = self.tx().await?;
        // First statement: the agent's row lock (serializes creations for the agent, also
        // across replicas on PostgreSQL; SQLite's BEGIN IMMEDIATE serializes all writers).
        let locked = sqlx::query("UPDATE agents SET updated_at = updated_at WHERE id = $1")
            .bind(claim.agent_id.clone())
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if locked == 0 {
            tx.rollback().await?;
            return Ok(RelayClaim::Refused("unknown agent".into()));
        }
        // Re-read under the lock what the unlocked checks relied on: a freeze or a new
        // policy revision that landed meanwhile refuses the card.
        let agent_status: String = sqlx::query("SELECT status FROM agents WHERE id = $1")
            .bind(claim.agent_id.clone())
            .fetch_one(&mut *tx)
            .await?
            .try_get("status")?;
        let policy_revision: Option<i64> =
            sqlx::query("SELECT current_revision FROM policies WHERE agent_id = $1")
                .bind(claim.agent_id.clone())
                .fetch_optional(&mut *tx)
                .await?
                .map(|r| r.try_get("current_revision"))
                .transpose()?;
        let mut budget_ids: Vec<&str> = claim
            .bounds
            .iter()
            .filter_map(|b| b.budget_id.as_deref())
            .collect();
        budget_ids.sort_unstable();
        budget_ids.dedup();
        for id in budget_ids {
            sqlx::query("UPDATE budgets SET updated_at = updated_at WHERE id = $1")
                .bind(id.to_string())
                .execute(&mut *tx)
                .await?;
        }
        let existing = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM relay_cards WHERE intent_id = $1"
        )))
        .bind(claim.intent_id.clone())
        .fetch_optional(&mut *tx)
        .await?
        .as_ref()
        .map(row_of)
        .transpose()?;
        let intent = sqlx::query(
            "SELECT agent_id, status, amount, currency, admin_decision FROM intents WHERE id = $1",
        )
        .bind(claim.intent_id.clone())
        .fetch_optional(&mut *tx)
        .await?
        .map(|r| {
            Ok::<_, DbError>(LedgerIntentFacts {
                agent_id: r.try_get("agent_id")?,
                status: r.try_get("status")?,
                amount: r.try_get("amount")?,
                currency: r.try_get("currency")?,
                admin_decision: r.try_get("admin_decision")?,
            })
        })
        .transpose()?;
        let mut exposures = Vec::with_capacity(claim.bounds.len());
        for b in &claim.bounds {
            exposures.push(
                Self::relay_exposure(&mut tx, b.scope, &b.scope_id, &claim.currency, b.since, now)
                    .await?,
            );
        }
        let facts = RelayFacts {
            agent_status,
            policy_revision,
            existing,
            intent,
            exposures,
        };
        match judge(&facts) {
            Err(message) => {
                tx.rollback().await?;
                Ok(RelayClaim::Refused(message))
            }
            Ok(RelayVerdict::Retry) => {
                tx.commit().await?;
                Ok(RelayClaim::Retry)
            }
            Ok(RelayVerdict::Create) => {
                let inserted = sqlx::query(
                    "INSERT INTO relay_cards (intent_id, card_id, agent_id, project_id, org_id, \
                     sidecar_id, currency, spending_limit, idempotency_key_hash, created_at, canceled_at, \
                     expires_at) VALUES ($1, NULL, $2, $3, $4, $5, $6, $7, $8, $9, NULL, $10)",
                )
                .bind(claim.intent_id.clone())
                .bind(claim.agent_id.clone())
                .bind(claim.project_id.clone())
                .bind(claim.org_id.clone())
                .bind(claim.sidecar_id.clone())
                .bind(claim.currency.clone())
                .bind(claim.spending_limit)
                .bind(claim.idempotency_key_hash.clone())
                .bind(now)
                .bind(claim.expires_at)
                .execute(&mut *tx)
                .await;
                if let Err(e) = inserted {
                    // Another agent's claim of the same intent won (it held another lock).
                    if e.as_database_error()
                        .is_some_and(|d| d.is_unique_violation())
                    {
                        let _ = tx.rollback().await;
                        return Ok(RelayClaim::Refused(
                            "the intent already has a card; the relay issues one card per intent"
                                .into(),
                        ));
                    }
                    return Err(e.into());
                }
                Self::audit(
                    &mut tx,
                    actor,
                    "relay.card.create",
                    "intent",
                    &claim.intent_id,
                    serde_json::json!({"agent_id": claim.agent_id, "sidecar_id": claim.sidecar_id,
                        "currency": claim.currency, "spending_limit": claim.spending_limit,
                        "expires_at": claim.expires_at, "policy_revision": claim.policy_revision}),
                    now,
                )
                .await?;
                tx.commit().await?;
                Ok(RelayClaim::Created)
            }
        }
    }

    /// The exposure of a scope's relay cards in `currency` that bear on a budget period
    /// starting at `since`: every card created in the period, and every card still live at
    /// `now` (not canceled, not expired) whenever it was created, since it can still be
    /// spent. A live card counts at its spending limit, as does a claim Stripe never
    /// answered (in its own period); a canceled or expired card counts at what it spent:
    /// net captures (never below zero), approved authorizations still pending, and approved
    /// authorizations closed without a capture (a merchant may still capture them). The
    /// real-time authorization declines an expired relay card, so it spends no more.
    async fn relay_exposure(
        conn: &mut sqlx::AnyConnection,
        scope: RelayScope,
        scope_id: &str,
        currency: &str,
        since: i64,
        now: i64,
    ) -> Result<i64, DbError> {
        let sql = format!(
            "SELECT rc.spending_limit, rc.canceled_at, rc.card_id, rc.expires_at, \
             (SELECT CAST(COALESCE(SUM(s.amount), 0) AS BIGINT) FROM settlements s \
              WHERE s.stripe_card_id = rc.card_id AND s.kind = 'capture') AS captured, \
             (SELECT CAST(COALESCE(SUM(s.amount), 0) AS BIGINT) FROM settlements s \
              WHERE s.stripe_card_id = rc.card_id AND s.kind = 'refund') AS refunded, \
             (SELECT CAST(COALESCE(SUM(a.amount), 0) AS BIGINT) FROM authorizations a \
              WHERE a.stripe_card_id = rc.card_id AND a.approved = 1 AND a.status = 'pending') AS pending, \
             (SELECT CAST(COALESCE(SUM(a.amount), 0) AS BIGINT) FROM authorizations a \
              WHERE a.stripe_card_id = rc.card_id AND a.approved = 1 AND a.status = 'closed' \
              AND NOT EXISTS (SELECT 1 FROM settlements s WHERE s.authorization_id = a.id \
                              AND s.kind = 'capture')) AS uncaptured \
             FROM relay_cards rc WHERE rc.{} = $1 AND rc.currency = $2 AND (rc.created_at >= $3 \
             OR (rc.canceled_at IS NULL AND rc.expires_at > $4))",
            scope.column()
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(scope_id.to_string())
            .bind(currency.to_string())
            .bind(since)
            .bind(now)
            .fetch_all(&mut *conn)
            .await?;
        let mut total = 0i64;
        for r in &rows {
            let limit: i64 = r.try_get("spending_limit")?;
            let canceled: Option<i64> = r.try_get("canceled_at")?;
            let card: Option<String> = r.try_get("card_id")?;
            let expires: i64 = r.try_get("expires_at")?;
            let live = canceled.is_none() && expires > now;
            let counted = if live || card.is_none() {
                limit
            } else {
                let captured: i64 = r.try_get("captured")?;
                let refunded: i64 = r.try_get("refunded")?;
                let pending: i64 = r.try_get("pending")?;
                let uncaptured: i64 = r.try_get("uncaptured")?;
                captured
                    .saturating_sub(refunded)
                    .max(0)
                    .saturating_add(pending.max(0))
                    .saturating_add(uncaptured.max(0))
            };
            total = total.saturating_add(counted);
        }
        Ok(total)
    }

    /// Relay cards live at Stripe past their expiry (not canceled, with a card id), oldest
    /// expiry first, at most `limit`: the relay's sweep cancels them.
    pub async fn expired_relay_cards(
        &self,
        now: i64,
        limit: i64,
    ) -> Result<Vec<RelayCardRow>, DbError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM relay_cards WHERE canceled_at IS NULL AND card_id IS NOT NULL \
             AND expires_at <= $1 ORDER BY expires_at, intent_id LIMIT $2"
        )))
        .bind(now)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(row_of).collect()
    }

    /// When the relay card of an intent expires (`None`: not a relay card). A card id that
    /// is not the claim's is not that card's expiry.
    pub(super) async fn relay_expiry_in(
        conn: &mut sqlx::AnyConnection,
        intent_id: &str,
        card_id: &str,
    ) -> Result<Option<i64>, DbError> {
        let row = sqlx::query(
            "SELECT expires_at FROM relay_cards \
             WHERE intent_id = $1 AND (card_id IS NULL OR card_id = $2)",
        )
        .bind(intent_id.to_string())
        .bind(card_id.to_string())
        .fetch_optional(&mut *conn)
        .await?;
        row.map(|r| r.try_get::<i64, _>("expires_at"))
            .transpose()
            .map_err(Into::into)
    }

    /// Stripe answered the claimed creation with `card_id` (`canceled`: the card Stripe
    /// returned is already canceled, e.g. an idempotent replay).
    pub async fn relay_card_created(
        &self,
        intent_id: &str,
        card_id: &str,
        canceled: bool,
        now: i64,
    ) -> Result<(), DbError> {
        let n = sqlx::query(
            "UPDATE relay_cards SET card_id = $1, \
             canceled_at = CASE WHEN $2 = 1 THEN COALESCE(canceled_at, $3) ELSE canceled_at END \
             WHERE intent_id = $4 AND (card_id IS NULL OR card_id = $1)",
        )
        .bind(card_id.to_string())
        .bind(i64::from(canceled))
        .bind(now)
        .bind(intent_id.to_string())
        .execute(&self.pool)
        .await?
        .rows_affected();
        if n == 0 {
            return Err(DbError::Conflict(format!(
                "relay card of intent {intent_id} is another card than {card_id}"
            )));
        }
        Ok(())
    }

    /// Stripe refused the claimed creation (no card was made): the claim is dropped, if it
    /// is still without a card and was made with this idempotency key.
    pub async fn relay_card_released(
        &self,
        intent_id: &str,
        idempotency_key_hash: &str,
    ) -> Result<bool, DbError> {
        let n = sqlx::query(
            "DELETE FROM relay_cards WHERE intent_id = $1 AND card_id IS NULL \
             AND idempotency_key_hash = $2",
        )
        .bind(intent_id.to_string())
        .bind(idempotency_key_hash.to_string())
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    /// The card was canceled (by the relay or, per Stripe's events, at Stripe): from now on
    /// it counts at what it spent. `false` if it is not a relay card or was canceled before.
    pub async fn relay_card_canceled(&self, card_id: &str, now: i64) -> Result<bool, DbError> {
        let mut conn = self.pool.acquire().await?;
        Self::relay_card_canceled_in(&mut conn, card_id, now).await
    }

    pub(super) async fn relay_card_canceled_in(
        conn: &mut sqlx::AnyConnection,
        card_id: &str,
        now: i64,
    ) -> Result<bool, DbError> {
        let n = sqlx::query(
            "UPDATE relay_cards SET canceled_at = $1 WHERE card_id = $2 AND canceled_at IS NULL",
        )
        .bind(now)
        .bind(card_id.to_string())
        .execute(&mut *conn)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    /// The relay card of an intent.
    pub async fn relay_card(&self, intent_id: &str) -> Result<Option<RelayCardRow>, DbError> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM relay_cards WHERE intent_id = $1"
        )))
        .bind(intent_id.to_string())
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(row_of)
        .transpose()
    }

    /// The relay cards of an agent, oldest first.
    pub async fn relay_cards_of_agent(&self, agent_id: &str) -> Result<Vec<RelayCardRow>, DbError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM relay_cards WHERE agent_id = $1 ORDER BY created_at, intent_id"
        )))
        .bind(agent_id.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(row_of).collect()
    }

    /// Every card of the organization that may still be active: relay cards not canceled
    /// and the Stripe ledger's cards not canceled, by Stripe id (sorted, distinct).
    pub async fn active_cards_of_org(&self, org_id: &str) -> Result<Vec<String>, DbError> {
        let mut ids: Vec<String> = sqlx::query(
            "SELECT card_id FROM relay_cards WHERE org_id = $1 AND card_id IS NOT NULL \
             AND canceled_at IS NULL",
        )
        .bind(org_id.to_string())
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| r.try_get::<String, _>("card_id"))
        .collect::<Result<_, _>>()?;
        let ledger = sqlx::query(
            "SELECT c.stripe_card_id FROM cards c JOIN agents a ON a.id = c.agent_id \
             WHERE a.org_id = $1 AND c.status <> 'canceled'",
        )
        .bind(org_id.to_string())
        .fetch_all(&self.pool)
        .await?;
        for r in &ledger {
            ids.push(r.try_get("stripe_card_id")?);
        }
        ids.sort();
        ids.dedup();
        Ok(ids)
    }

    /// Records what a disconnect did to the organization's cards (`stripe.disconnect.cards`):
    /// the relay cards it canceled are marked canceled in the same transaction.
    pub async fn record_disconnect_cancels(
        &self,
        org_id: &str,
        canceled: &[String],
        failed: &[(String, String)],
        actor: &Actor,
        now: i64,
    ) -> Result<(), DbError> {
        let mut tx = self.tx().await?;
        for card in canceled {
            Self::relay_card_canceled_in(&mut tx, card, now).await?;
        }
        let failures: Vec<serde_json::Value> = failed
            .iter()
            .map(|(card, error)| serde_json::json!({"card_id": card, "error": error}))
            .collect();
        Self::audit_outcome(
            &mut tx,
            actor,
            "stripe.disconnect.cards",
            ("organization", org_id),
            if failed.is_empty() {
                "success"
            } else {
                "failure"
            },
            serde_json::json!({"canceled": canceled, "failed": failures}),
            now,
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }
}
