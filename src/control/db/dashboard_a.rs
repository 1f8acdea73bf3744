//! Read-only queries of the dashboard's overview, agents and audit pages. Portable SQL
//! (SQLite and PostgreSQL): sums are cast to BIGINT, time ranges are unix-second binds
//! computed by the caller.

use std::collections::HashMap;

use sqlx::{AssertSqlSafe, Row};

use super::{Arg, ControlDb, DbError, Where, audit_from_row, bind_all};
use crate::control::model::{AuditEvent, Budget, BudgetScope, Cursor, Page};

/// Money per currency (ISO code, minor units).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CurrencyAmount {
    pub currency: String,
    pub amount: i64,
}

/// Net captured spend (captures minus refunds) of a key (agent or merchant) in a currency.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpendRow {
    /// Agent id or merchant name.
    pub key: String,
    /// Agent name (agents only; the key otherwise).
    pub label: String,
    pub currency: String,
    pub amount: i64,
}

/// Key and policy facts of an agent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentFacts {
    pub active_keys: i64,
    pub policy_revision: Option<i64>,
}

/// Filters of the audit page: `action_prefix` matches actions that start with it.
#[derive(Clone, Debug, Default)]
pub struct AuditPageFilter {
    pub actor_type: Option<String>,
    pub action_prefix: Option<String>,
    pub target_id: Option<String>,
    pub actor_id: Option<String>,
    /// Events at or after this time (unix seconds).
    pub from: Option<i64>,
    /// Events before this time (unix seconds).
    pub to: Option<i64>,
}

const NET_AMOUNT: &str = "CASE WHEN s.kind = 'refund' THEN -s.amount ELSE s.amount END";

impl ControlDb {
    /// Net captured spend per currency of settlements created in `[from, to)`.
    pub async fn dash_a_spend_by_currency(
        &self,
        from: i64,
        to: i64,
    ) -> Result<Vec<CurrencyAmount>, DbError> {
        let sql = format!(
            "SELECT s.currency AS currency, CAST(COALESCE(SUM({NET_AMOUNT}), 0) AS BIGINT) AS total \
             FROM settlements s WHERE s.created_at >= $1 AND s.created_at < $2 \
             GROUP BY s.currency ORDER BY s.currency"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(from)
            .bind(to)
            .fetch_all(self.pool())
            .await?;
        rows.iter()
            .map(|r| {
                Ok(CurrencyAmount {
                    currency: r.try_get("currency")?,
                    amount: r.try_get("total")?,
                })
            })
            .collect()
    }

    /// Net captured spend per agent and currency in `[from, to)`, largest first (settlements
    /// of purchases Roony knows).
    pub async fn dash_a_spend_by_agent(
        &self,
        from: i64,
        to: i64,
    ) -> Result<Vec<SpendRow>, DbError> {
        let sql = format!(
            "SELECT i.agent_id AS agent_id, a.name AS name, s.currency AS currency, \
             CAST(COALESCE(SUM({NET_AMOUNT}), 0) AS BIGINT) AS total \
             FROM settlements s JOIN intents i ON i.id = s.intent_id LEFT JOIN agents a ON a.id = i.agent_id \
             WHERE s.created_at >= $1 AND s.created_at < $2 \
             GROUP BY i.agent_id, a.name, s.currency ORDER BY total DESC, agent_id"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(from)
            .bind(to)
            .fetch_all(self.pool())
            .await?;
        rows.iter()
            .map(|r| {
                let key: String = r.try_get("agent_id")?;
                let name: Option<String> = r.try_get("name")?;
                Ok(SpendRow {
                    label: name.unwrap_or_else(|| key.clone()),
                    key,
                    currency: r.try_get("currency")?,
                    amount: r.try_get("total")?,
                })
            })
            .collect()
    }

    /// Net captured spend per merchant (as Stripe named it, else the purchase's merchant)
    /// and currency in `[from, to)`, largest first.
    pub async fn dash_a_spend_by_merchant(
        &self,
        from: i64,
        to: i64,
    ) -> Result<Vec<SpendRow>, DbError> {
        let sql = format!(
            "SELECT COALESCE(s.merchant_name, i.merchant_name, 'unknown') AS merchant, s.currency AS currency, \
             CAST(COALESCE(SUM({NET_AMOUNT}), 0) AS BIGINT) AS total \
             FROM settlements s LEFT JOIN intents i ON i.id = s.intent_id \
             WHERE s.created_at >= $1 AND s.created_at < $2 \
             GROUP BY COALESCE(s.merchant_name, i.merchant_name, 'unknown'), s.currency \
             ORDER BY total DESC, merchant"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(from)
            .bind(to)
            .fetch_all(self.pool())
            .await?;
        rows.iter()
            .map(|r| {
                let key: String = r.try_get("merchant")?;
                Ok(SpendRow {
                    label: key.clone(),
                    key,
                    currency: r.try_get("currency")?,
                    amount: r.try_get("total")?,
                })
            })
            .collect()
    }

    /// Held for approved purchases not captured yet, per currency: the reservation of each
    /// `approved`/`issuing` intent less what was captured on it.
    pub async fn dash_a_reserved_by_currency(&self) -> Result<Vec<CurrencyAmount>, DbError> {
        let rows = sqlx::query(
            "SELECT currency, CAST(COALESCE(SUM(CASE WHEN reserved > captured THEN reserved - captured ELSE 0 END), 0) AS BIGINT) AS total \
             FROM intents WHERE status IN ('approved', 'issuing') GROUP BY currency ORDER BY currency",
        )
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(CurrencyAmount {
                    currency: r.try_get("currency")?,
                    amount: r.try_get("total")?,
                })
            })
            .collect()
    }

    /// What counts against `budget` in the period bucket starting at `bucket_start`: per
    /// purchase of its scope and currency created since then and approved, issuing or
    /// settled, the larger of its reservation and its net capture.
    pub async fn dash_a_budget_used(
        &self,
        budget: &Budget,
        bucket_start: i64,
    ) -> Result<i64, DbError> {
        let column = match budget.scope {
            BudgetScope::Org => "org_id",
            BudgetScope::Project => "project_id",
            BudgetScope::Agent => "agent_id",
        };
        let sql = format!(
            "SELECT CAST(COALESCE(SUM(CASE WHEN captured - refunded > reserved THEN captured - refunded ELSE reserved END), 0) AS BIGINT) AS total \
             FROM intents WHERE {column} = $1 AND UPPER(currency) = $2 AND created_at >= $3 \
             AND status IN ('approved', 'issuing', 'settled')"
        );
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(budget.scope_id.clone())
            .bind(budget.currency.to_ascii_uppercase())
            .bind(bucket_start)
            .fetch_one(self.pool())
            .await?;
        Ok(row.try_get("total")?)
    }

    /// Active key counts and current policy revisions of every agent.
    pub async fn dash_a_agent_facts(&self) -> Result<HashMap<String, AgentFacts>, DbError> {
        let mut out: HashMap<String, AgentFacts> = HashMap::new();
        let keys = sqlx::query(
            "SELECT agent_id, CAST(COUNT(*) AS BIGINT) AS n FROM agent_keys WHERE revoked_at IS NULL GROUP BY agent_id",
        )
        .fetch_all(self.pool())
        .await?;
        for r in &keys {
            let id: String = r.try_get("agent_id")?;
            out.entry(id).or_default().active_keys = r.try_get("n")?;
        }
        let policies = sqlx::query("SELECT agent_id, current_revision FROM policies")
            .fetch_all(self.pool())
            .await?;
        for r in &policies {
            let id: String = r.try_get("agent_id")?;
            out.entry(id).or_default().policy_revision = Some(r.try_get("current_revision")?);
        }
        Ok(out)
    }

    /// Number of purchases waiting for an administrator's decision.
    pub async fn dash_a_pending_count(&self) -> Result<i64, DbError> {
        let row = sqlx::query(
            "SELECT CAST(COUNT(*) AS BIGINT) AS n FROM intents WHERE status = 'pending_approval'",
        )
        .fetch_one(self.pool())
        .await?;
        Ok(row.try_get("n")?)
    }

    /// Audit events, newest first, one page, with an action prefix filter.
    pub async fn dash_a_audit_page(
        &self,
        filter: &AuditPageFilter,
        limit: i64,
        cursor: Option<Cursor>,
    ) -> Result<Page<AuditEvent>, DbError> {
        let mut w = Where::default();
        w.eq_text("actor_type", &filter.actor_type);
        w.eq_text("target_id", &filter.target_id);
        w.eq_text("actor_id", &filter.actor_id);
        w.cmp_int("created_at", ">=", filter.from);
        w.cmp_int("created_at", "<", filter.to);
        if let Some(prefix) = filter.action_prefix.as_ref().filter(|p| !p.is_empty()) {
            let n = w.next();
            // The length is a number computed here, not input text.
            let len = prefix.chars().count();
            w.clauses.push(format!("SUBSTR(action, 1, {len}) = ${n}"));
            w.args.push(Arg::Text(prefix.clone()));
        }
        w.before_cursor(&cursor);
        let n = w.next();
        let sql = format!(
            "SELECT id, actor_type, actor_id, action, target_type, target_id, outcome, request_id, created_at, details \
             FROM audit_events{} ORDER BY created_at DESC, id DESC LIMIT ${n}",
            w.sql()
        );
        let mut args = w.args;
        args.push(Arg::Int(limit + 1));
        let rows = bind_all(sqlx::query(AssertSqlSafe(sql)), args)
            .fetch_all(self.pool())
            .await?;
        let items = rows
            .iter()
            .map(audit_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Page::from_rows(items, limit, |e| Cursor {
            created_at: e.created_at,
            id: e.id.clone(),
        }))
    }
}
