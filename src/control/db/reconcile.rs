//! The ledger side of reconciliation with Stripe (`crate::control::reconcile`): what the
//! ledger knows about a Stripe card, adopting a card of a known purchase, orphan cards,
//! and the stored runs. Objects the webhooks missed are applied through the webhook paths
//! (`ControlDb::apply_*_as`), so the ledger, discrepancies and the updates feed behave as
//! if the webhook had arrived.

use sqlx::Row;
use sqlx::any::AnyRow;

use super::stripe::{Adoption, CardOwner, NewDiscrepancy, Outcome};
use super::{Actor, ControlDb, DbError, Where, parse_json};
use crate::control::model::{Cursor, Page, ReconciliationRun, StripeCard};

/// What the ledger knows about a card Stripe lists.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReconcileCardView {
    /// The ledger's card row: its status.
    pub card_status: Option<String>,
    /// The purchase: the card row's, or else the one the metadata names, if the ledger has it.
    pub intent_id: Option<String>,
    pub intent_status: Option<String>,
    pub agent_id: Option<String>,
    /// Another card of that purchase the ledger has and that is not canceled.
    pub other_card: Option<String>,
}

const RUN_COLUMNS: &str =
    "id, started_at, finished_at, status, since, actor_type, actor_id, report, created_at";

fn run_from_row(r: &AnyRow) -> Result<ReconciliationRun, DbError> {
    Ok(ReconciliationRun {
        id: r.try_get("id")?,
        started_at: r.try_get("started_at")?,
        finished_at: r.try_get("finished_at")?,
        status: r.try_get("status")?,
        actor_type: r.try_get("actor_type")?,
        actor_id: r.try_get("actor_id")?,
        report: parse_json(&r.try_get::<String, _>("report")?)?,
    })
}

impl ControlDb {
    /// The ledger's view of Stripe card `card_id` whose metadata names `claimed_intent`.
    pub async fn reconcile_card_view(
        &self,
        card_id: &str,
        claimed_intent: Option<&str>,
    ) -> Result<ReconcileCardView, DbError> {
        let mut conn = self.pool.acquire().await?;
        let row = sqlx::query(
            "SELECT c.status AS card_status, c.intent_id, i.status, i.agent_id \
             FROM cards c JOIN intents i ON i.id = c.intent_id WHERE c.stripe_card_id = $1",
        )
        .bind(card_id.to_string())
        .fetch_optional(&mut *conn)
        .await?;
        if let Some(r) = row {
            return Ok(ReconcileCardView {
                card_status: r.try_get("card_status")?,
                intent_id: r.try_get("intent_id")?,
                intent_status: r.try_get("status")?,
                agent_id: r.try_get("agent_id")?,
                other_card: None,
            });
        }
        let Some(intent_id) = claimed_intent else {
            return Ok(ReconcileCardView::default());
        };
        let Some(i) = sqlx::query("SELECT status, agent_id FROM intents WHERE id = $1")
            .bind(intent_id.to_string())
            .fetch_optional(&mut *conn)
            .await?
        else {
            return Ok(ReconcileCardView::default());
        };
        let other = sqlx::query(
            "SELECT stripe_card_id FROM cards WHERE intent_id = $1 AND status <> 'canceled' \
             AND stripe_card_id <> $2 ORDER BY created_at DESC, id DESC LIMIT 1",
        )
        .bind(intent_id.to_string())
        .bind(card_id.to_string())
        .fetch_optional(&mut *conn)
        .await?
        .map(|r| r.try_get::<String, _>("stripe_card_id"))
        .transpose()?;
        Ok(ReconcileCardView {
            card_status: None,
            intent_id: Some(intent_id.to_string()),
            intent_status: i.try_get("status")?,
            agent_id: i.try_get("agent_id")?,
            other_card: other,
        })
    }

    /// `Some(roony_expires)` if the card's `roony_*` metadata verifies with its sidecar's
    /// token hash (as the webhook's adoption checks it).
    pub async fn card_metadata_verifies(
        &self,
        card: &StripeCard,
    ) -> Result<Option<Option<i64>>, DbError> {
        let mut conn = self.pool.acquire().await?;
        Ok(Self::verify_card(&mut conn, card)
            .await?
            .map(|a| a.expires_at))
    }

    /// Inserts the card row of a card whose purchase the ledger has (as the sidecar's
    /// outbox would have): with its signed metadata if that verifies, else with the
    /// purchase's own facts and `limit` (the card's spending limit at Stripe). Publishes
    /// the purchase's update. `false` if the ledger has the card already, or the purchase
    /// is unknown or belongs to another agent than the metadata names.
    pub async fn adopt_card_for_intent(
        &self,
        card: &StripeCard,
        limit: i64,
        actor: &Actor,
        now: i64,
    ) -> Result<bool, DbError> {
        let mut tx = self.tx().await?;
        if sqlx::query("SELECT id FROM cards WHERE stripe_card_id = $1")
            .bind(card.id.clone())
            .fetch_optional(&mut *tx)
            .await?
            .is_some()
        {
            return Ok(false);
        }
        let adoption = match Self::verify_card(&mut tx, card).await? {
            Some(a) => a,
            None => {
                let Some(intent_id) = card.metadata.get("roony_intent_id") else {
                    return Ok(false);
                };
                let Some(i) = sqlx::query(
                    "SELECT agent_id, project_id, org_id, currency, reserved, amount, merchant_name, \
                     merchant_domain, merchant_country, merchant_category, expires_at, sidecar_id \
                     FROM intents WHERE id = $1",
                )
                .bind(intent_id.clone())
                .fetch_optional(&mut *tx)
                .await?
                else {
                    return Ok(false);
                };
                let agent_id: String = i.try_get("agent_id")?;
                if card
                    .metadata
                    .get("roony_agent_id")
                    .is_some_and(|a| *a != agent_id)
                {
                    return Ok(false);
                }
                let reserved: i64 = i.try_get("reserved")?;
                let amount: i64 = i.try_get("amount")?;
                let limit = if limit > 0 {
                    limit
                } else if reserved > 0 {
                    reserved
                } else {
                    amount
                };
                Adoption {
                    owner: CardOwner {
                        intent_id: intent_id.clone(),
                        agent_id,
                        project_id: i.try_get("project_id")?,
                        org_id: i.try_get("org_id")?,
                    },
                    sidecar_id: i
                        .try_get::<Option<String>, _>("sidecar_id")?
                        .unwrap_or_default(),
                    intent_exists: true,
                    limit,
                    currency: i.try_get("currency")?,
                    merchant_name: i.try_get("merchant_name")?,
                    merchant_domain: i.try_get("merchant_domain")?,
                    merchant_country: i.try_get("merchant_country")?,
                    merchant_category: i.try_get("merchant_category")?,
                    expires_at: i.try_get("expires_at")?,
                    last4: card.last4.clone().unwrap_or_default(),
                    exp_month: card.exp_month.unwrap_or(0),
                    exp_year: card.exp_year.unwrap_or(0),
                    card_status: card.status.clone().unwrap_or_else(|| "active".into()),
                }
            }
        };
        Self::adopt(&mut tx, &card.id, &adoption, actor, now).await?;
        let mut out = Outcome::default();
        if let Some(u) = Self::refresh_intent(&mut tx, &adoption.owner.intent_id, now).await? {
            out.updates.push(u);
        }
        self.finish(tx, out).await?;
        Ok(true)
    }

    /// Records an `orphan_card` discrepancy: a card with Roony metadata that no purchase in
    /// the ledger accounts for (canceled at Stripe by the caller).
    pub async fn record_orphan_card(
        &self,
        card: &StripeCard,
        message: &str,
        actor: &Actor,
        now: i64,
    ) -> Result<(), DbError> {
        let mut tx = self.tx().await?;
        let mut out = Outcome::default();
        out.froze |= Self::discrepancy(
            &mut tx,
            actor,
            NewDiscrepancy {
                kind: "orphan_card",
                owner: None,
                card_id: &card.id,
                object_id: &card.id,
                amount: 0,
                currency: "",
                details: serde_json::json!({"source": "reconciliation",
                    "claimed_intent_id": card.metadata.get("roony_intent_id"),
                    "claimed_agent_id": card.metadata.get("roony_agent_id"),
                    "message": message}),
            },
            now,
        )
        .await?;
        self.finish(tx, out).await
    }

    /// Ledger cards that are not canceled: (Stripe card id, intent id, agent id).
    pub async fn open_ledger_cards(&self) -> Result<Vec<(String, String, String)>, DbError> {
        let rows = sqlx::query(
            "SELECT stripe_card_id, intent_id, agent_id FROM cards WHERE status <> 'canceled' \
             ORDER BY created_at, id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("stripe_card_id")?,
                    r.try_get("intent_id")?,
                    r.try_get("agent_id")?,
                ))
            })
            .collect()
    }

    /// The ledger's (amount, approved, status) of an authorization.
    pub async fn authorization_state(
        &self,
        id: &str,
    ) -> Result<Option<(i64, bool, String)>, DbError> {
        let row = sqlx::query("SELECT amount, approved, status FROM authorizations WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            Ok((
                r.try_get("amount")?,
                r.try_get::<i64, _>("approved")? == 1,
                r.try_get("status")?,
            ))
        })
        .transpose()
    }

    /// The ledger's amount of a settlement, by its Stripe transaction id.
    pub async fn settlement_amount(&self, transaction_id: &str) -> Result<Option<i64>, DbError> {
        let row = sqlx::query("SELECT amount FROM settlements WHERE stripe_transaction_id = $1")
            .bind(transaction_id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| r.try_get::<i64, _>("amount").map_err(DbError::from))
            .transpose()
    }

    /// Stores a finished run and its audit event (`reconciliation.run`).
    pub async fn insert_reconciliation_run(
        &self,
        run: &ReconciliationRun,
        actor: &Actor,
    ) -> Result<(), DbError> {
        let report =
            serde_json::to_string(&run.report).map_err(|e| DbError::Corrupt(e.to_string()))?;
        let mut tx = self.tx().await?;
        sqlx::query(
            "INSERT INTO reconciliation_runs (id, started_at, finished_at, status, since, actor_type, \
             actor_id, report, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $2)",
        )
        .bind(run.id.clone())
        .bind(run.started_at)
        .bind(run.finished_at)
        .bind(run.status.clone())
        .bind(run.report.since)
        .bind(run.actor_type.clone())
        .bind(run.actor_id.clone())
        .bind(report)
        .execute(&mut *tx)
        .await?;
        Self::audit_outcome(
            &mut tx,
            actor,
            "reconciliation.run",
            ("reconciliation", &run.id),
            if run.status == "ok" {
                "success"
            } else {
                "failure"
            },
            serde_json::json!({"since": run.report.since, "totals": run.report.totals,
                "error": run.report.error}),
            run.finished_at,
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Runs, newest first.
    pub async fn list_reconciliation_runs(
        &self,
        limit: i64,
        cursor: Option<Cursor>,
    ) -> Result<Page<ReconciliationRun>, DbError> {
        self.fetch_page(
            &format!("SELECT {RUN_COLUMNS} FROM reconciliation_runs"),
            Where::default(),
            limit,
            cursor,
            run_from_row,
            |r| Cursor {
                created_at: r.started_at,
                id: r.id.clone(),
            },
        )
        .await
    }

    pub async fn get_reconciliation_run(&self, id: &str) -> Result<ReconciliationRun, DbError> {
        let sql = format!("SELECT {RUN_COLUMNS} FROM reconciliation_runs WHERE id = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?
            .ok_or(DbError::NotFound("reconciliation"))?;
        run_from_row(&row)
    }

    /// When the last successful run started.
    pub async fn last_ok_reconciliation(&self) -> Result<Option<i64>, DbError> {
        let row = sqlx::query(
            "SELECT started_at FROM reconciliation_runs WHERE status = 'ok' \
             ORDER BY started_at DESC, id DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| r.try_get::<i64, _>("started_at").map_err(DbError::from))
            .transpose()
    }
}
