//! Read-only queries of the dashboard's overview, agents and audit pages. Portable SQL
//! (SQLite and PostgreSQL): sums are cast to BIGINT, time ranges are unix-second binds
//! computed by the caller.

use std::collections::HashMap;

use sqlx::{AssertSqlSafe, Row};

use super::{Arg, ControlDb, DbError, Where, agent_from_row, audit_from_row, bind_all};
use crate::control::model::{Agent, AuditEvent, BudgetScope, Cursor, Page};

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

/// What one intent counts against its budgets, as its sidecar counts it (docs/design.md,
/// "Budgets, reservations" and "Settlement"): while it is open (`pending_approval`,
/// `approved`, `issuing`) the larger of its hold (the reservation the sidecar reported,
/// else the amount) and what moved on its card; once it ended (settled, canceled, expired,
/// declined, failed) exactly what moved on the card — pending authorizations plus captures
/// less refunds, never below zero. [`counted`] is the same in Rust.
pub const COUNTED: &str = "CASE \
     WHEN status IN ('pending_approval', 'approved', 'issuing') THEN \
       CASE WHEN pending + captured - refunded > (CASE WHEN reserved > 0 THEN reserved ELSE amount END) \
         THEN pending + captured - refunded ELSE (CASE WHEN reserved > 0 THEN reserved ELSE amount END) END \
     WHEN pending + captured - refunded > 0 THEN pending + captured - refunded \
     ELSE 0 END";

/// [`COUNTED`] for one intent.
pub fn counted(i: &crate::control::model::Intent) -> i64 {
    let moved = i
        .pending
        .saturating_add(i.captured)
        .saturating_sub(i.refunded)
        .max(0);
    match i.status.as_str() {
        "pending_approval" | "approved" | "issuing" => {
            let hold = if i.reserved > 0 { i.reserved } else { i.amount };
            hold.max(moved)
        }
        _ => moved,
    }
}

/// Used amounts of one scope and currency in the current bucket of each period, indexed
/// like `crate::policy::period_index` (daily, weekly, monthly, all-time).
pub type PeriodUsage = [i64; 4];

/// An agent with its current policy document (`None`: no policy was ever written).
#[derive(Clone, Debug, PartialEq)]
pub struct AgentPolicy {
    pub agent: Agent,
    pub policy: Option<serde_json::Value>,
    pub revision: Option<i64>,
}

/// A frozen agent with when and by whom it was last frozen (from the audit trail).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrozenAgent {
    pub agent: Agent,
    pub since: Option<i64>,
    pub by: Option<String>,
}

/// Net spend of one UTC day in one currency.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DailySpend {
    /// Unix seconds of the day's start.
    pub day: i64,
    pub currency: String,
    pub amount: i64,
}

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

    /// Held for approved purchases not captured yet, per currency: of what each
    /// `approved`/`issuing` intent counts against its budgets ([`COUNTED`]), the part not
    /// captured (net of refunds) — so that spend plus reserved is what budgets count.
    pub async fn dash_a_reserved_by_currency(&self) -> Result<Vec<CurrencyAmount>, DbError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT currency, CAST(COALESCE(SUM(({COUNTED}) - \
             (CASE WHEN captured - refunded > 0 THEN captured - refunded ELSE 0 END)), 0) AS BIGINT) AS total \
             FROM intents WHERE status IN ('approved', 'issuing') GROUP BY currency ORDER BY currency",
        )))
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

    /// What counts against budgets of `scope` in the current bucket of each period, per
    /// scope id and currency (upper case): the sum of [`COUNTED`] over the intents of the
    /// scope created (decided) since each bucket's start — a reservation counts in the
    /// periods of the moment it was made. `starts` are the buckets' starts (daily, weekly,
    /// monthly; all-time has none). `only`: one scope id, else every one. Without
    /// `all_time` only intents since the earliest of `starts` are read (the all-time column
    /// then holds just those): the common case reads about a month of the ledger.
    pub async fn dash_budget_usage(
        &self,
        scope: BudgetScope,
        starts: [i64; 3],
        only: Option<&str>,
        all_time: bool,
    ) -> Result<HashMap<(String, String), PeriodUsage>, DbError> {
        let column = match scope {
            BudgetScope::Org => "org_id",
            BudgetScope::Project => "project_id",
            BudgetScope::Agent => "agent_id",
        };
        let mut clauses = Vec::new();
        if only.is_some() {
            clauses.push(format!("{column} = $4"));
        }
        if !all_time {
            let n = if only.is_some() { 5 } else { 4 };
            clauses.push(format!("created_at >= ${n}"));
        }
        let filter = if clauses.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", clauses.join(" AND "))
        };
        let sql = format!(
            "SELECT {column} AS scope_id, UPPER(currency) AS cur, \
             CAST(COALESCE(SUM(CASE WHEN created_at >= $1 THEN {COUNTED} ELSE 0 END), 0) AS BIGINT) AS d, \
             CAST(COALESCE(SUM(CASE WHEN created_at >= $2 THEN {COUNTED} ELSE 0 END), 0) AS BIGINT) AS w, \
             CAST(COALESCE(SUM(CASE WHEN created_at >= $3 THEN {COUNTED} ELSE 0 END), 0) AS BIGINT) AS m, \
             CAST(COALESCE(SUM({COUNTED}), 0) AS BIGINT) AS a \
             FROM intents{filter} GROUP BY {column}, UPPER(currency)"
        );
        let mut q = sqlx::query(AssertSqlSafe(sql))
            .bind(starts[0])
            .bind(starts[1])
            .bind(starts[2]);
        if let Some(id) = only {
            q = q.bind(id.to_string());
        }
        if !all_time {
            q = q.bind(starts.iter().copied().min().unwrap_or(0));
        }
        let rows = q.fetch_all(self.pool()).await?;
        let mut out = HashMap::with_capacity(rows.len());
        for r in &rows {
            out.insert(
                (r.try_get("scope_id")?, r.try_get("cur")?),
                [
                    r.try_get("d")?,
                    r.try_get("w")?,
                    r.try_get("m")?,
                    r.try_get("a")?,
                ],
            );
        }
        Ok(out)
    }

    /// Every agent (at most 2000, by name) with its current policy document.
    pub async fn dash_agent_policies(&self) -> Result<Vec<AgentPolicy>, DbError> {
        let rows = sqlx::query(
            "SELECT a.id, a.org_id, a.project_id, a.name, a.status, a.frozen_reason, a.created_at, a.updated_at, \
             r.document AS document, r.revision AS revision \
             FROM agents a LEFT JOIN policies p ON p.agent_id = a.id \
             LEFT JOIN policy_revisions r ON r.policy_id = p.id AND r.revision = p.current_revision \
             ORDER BY a.name, a.id LIMIT 2000",
        )
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                let document: Option<String> = r.try_get("document")?;
                Ok(AgentPolicy {
                    agent: agent_from_row(r)?,
                    // An unreadable document counts as no policy, as at the sidecar.
                    policy: document.and_then(|d| serde_json::from_str(&d).ok()),
                    revision: r.try_get("revision")?,
                })
            })
            .collect()
    }

    /// Frozen agents (at most 200, most recently changed first) with when and by whom each
    /// was last frozen.
    pub async fn dash_frozen_agents(&self) -> Result<Vec<FrozenAgent>, DbError> {
        let rows = sqlx::query(
            "SELECT a.id, a.org_id, a.project_id, a.name, a.status, a.frozen_reason, a.created_at, a.updated_at, \
             (SELECT e.created_at FROM audit_events e WHERE e.target_type = 'agent' AND e.target_id = a.id \
              AND e.action = 'agent.freeze' ORDER BY e.created_at DESC, e.id DESC LIMIT 1) AS since, \
             (SELECT e.actor_id FROM audit_events e WHERE e.target_type = 'agent' AND e.target_id = a.id \
              AND e.action = 'agent.freeze' ORDER BY e.created_at DESC, e.id DESC LIMIT 1) AS frozen_by \
             FROM agents a WHERE a.status = 'frozen' ORDER BY a.updated_at DESC, a.id LIMIT 200",
        )
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(FrozenAgent {
                    agent: agent_from_row(r)?,
                    since: r.try_get("since")?,
                    by: r.try_get("frozen_by")?,
                })
            })
            .collect()
    }

    /// Net spend per currency of settlements in `[from, to)` that belong to no purchase of
    /// the ledger (force captures, unknown cards).
    pub async fn dash_unattributed_spend(
        &self,
        from: i64,
        to: i64,
    ) -> Result<Vec<CurrencyAmount>, DbError> {
        let sql = format!(
            "SELECT s.currency AS currency, CAST(COALESCE(SUM({NET_AMOUNT}), 0) AS BIGINT) AS total \
             FROM settlements s LEFT JOIN intents i ON i.id = s.intent_id \
             WHERE s.created_at >= $1 AND s.created_at < $2 AND i.id IS NULL \
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

    /// Net spend per UTC day and currency of settlements in `[from, to)` (days with no
    /// settlement are absent).
    pub async fn dash_daily_spend(&self, from: i64, to: i64) -> Result<Vec<DailySpend>, DbError> {
        let sql = format!(
            "SELECT CAST(s.created_at / 86400 AS BIGINT) AS day, s.currency AS currency, \
             CAST(COALESCE(SUM({NET_AMOUNT}), 0) AS BIGINT) AS total \
             FROM settlements s WHERE s.created_at >= $1 AND s.created_at < $2 \
             GROUP BY CAST(s.created_at / 86400 AS BIGINT), s.currency ORDER BY day, currency"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(from)
            .bind(to)
            .fetch_all(self.pool())
            .await?;
        rows.iter()
            .map(|r| {
                let day: i64 = r.try_get("day")?;
                Ok(DailySpend {
                    day: day.saturating_mul(86_400),
                    currency: r.try_get("currency")?,
                    amount: r.try_get("total")?,
                })
            })
            .collect()
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
