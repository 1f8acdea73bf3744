//! Read-only queries of the dashboard's money pages (policies, approvals, transactions).
//! Portable SQL for SQLite and PostgreSQL; no writes here (the pages reuse `put_policy`
//! and `decide_pending`).

use sqlx::any::AnyRow;
use sqlx::{AssertSqlSafe, Row};

use super::{
    Arg, ControlDb, DECISION_COLUMNS, DbError, INTENT_COLUMNS, Where, decision_from_row,
    intent_from_row,
};
use crate::control::model::{Cursor, Decision, Intent, Page};

/// An agent with its current policy revision, if it has one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicySummary {
    pub agent_id: String,
    pub agent_name: String,
    pub project_id: String,
    pub agent_status: String,
    pub revision: Option<i64>,
    pub author: Option<String>,
    pub created_at: Option<i64>,
}

/// Filters of the transactions page (every one optional). `created_*` as in
/// [`super::LedgerFilter`]; amounts in minor units, inclusive.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TxFilter {
    pub agent_id: Option<String>,
    pub status: Option<String>,
    /// Case-insensitive substring of the merchant name.
    pub merchant: Option<String>,
    pub currency: Option<String>,
    pub created_from: Option<i64>,
    pub created_to: Option<i64>,
    pub min_amount: Option<i64>,
    pub max_amount: Option<i64>,
}

/// An intent with the last four digits of its (latest) card.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxRow {
    pub intent: Intent,
    pub card_last4: Option<String>,
}

/// A card reference of the ledger (never a card number).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CardRecord {
    pub id: String,
    pub stripe_card_id: String,
    pub last4: String,
    pub exp_month: i64,
    pub exp_year: i64,
    pub spending_limit: i64,
    pub currency: String,
    pub status: String,
    pub created_at: i64,
    pub updated_at: i64,
}

/// A capture or refund (Issuing transaction) of the ledger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SettlementRecord {
    pub id: String,
    pub stripe_transaction_id: Option<String>,
    pub authorization_id: Option<String>,
    pub kind: String,
    pub amount: i64,
    pub currency: String,
    pub merchant_name: Option<String>,
    pub created_at: i64,
}

/// An administrator's decision with the purchase it decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminDecisionRow {
    pub decision: Decision,
    pub amount: i64,
    pub currency: String,
    pub merchant_name: String,
}

/// Escapes `%`, `_` and the escape character itself for `LIKE … ESCAPE '!'`.
fn like_pattern(text: &str) -> String {
    let mut p = String::with_capacity(text.len() + 2);
    p.push('%');
    for c in text.to_lowercase().chars() {
        if matches!(c, '%' | '_' | '!') {
            p.push('!');
        }
        p.push(c);
    }
    p.push('%');
    p
}

fn tx_where(filter: &TxFilter) -> Where {
    let mut w = Where::default();
    w.eq_text("agent_id", &filter.agent_id);
    w.eq_text("status", &filter.status);
    w.eq_text("currency", &filter.currency);
    w.cmp_int("created_at", ">=", filter.created_from);
    w.cmp_int("created_at", "<", filter.created_to);
    w.cmp_int("amount", ">=", filter.min_amount);
    w.cmp_int("amount", "<=", filter.max_amount);
    if let Some(m) = &filter.merchant {
        let n = w.next();
        w.clauses
            .push(format!("LOWER(merchant_name) LIKE ${n} ESCAPE '!'"));
        w.args.push(Arg::Text(like_pattern(m)));
    }
    w
}

fn tx_row(r: &AnyRow) -> Result<TxRow, DbError> {
    Ok(TxRow {
        intent: intent_from_row(r)?,
        card_last4: r.try_get("card_last4")?,
    })
}

impl ControlDb {
    /// Every agent (at most 1000, by name) with its current policy revision.
    pub async fn dash_policy_summaries(&self) -> Result<Vec<PolicySummary>, DbError> {
        let rows = sqlx::query(
            "SELECT a.id, a.name, a.project_id, a.status, r.revision, r.author, r.created_at \
             FROM agents a LEFT JOIN policies p ON p.agent_id = a.id \
             LEFT JOIN policy_revisions r ON r.policy_id = p.id AND r.revision = p.current_revision \
             ORDER BY a.name, a.id LIMIT 1000",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(PolicySummary {
                    agent_id: r.try_get("id")?,
                    agent_name: r.try_get("name")?,
                    project_id: r.try_get("project_id")?,
                    agent_status: r.try_get("status")?,
                    revision: r.try_get("revision")?,
                    author: r.try_get("author")?,
                    created_at: r.try_get("created_at")?,
                })
            })
            .collect()
    }

    /// `(id, name)` of every agent (at most 5000), by name.
    pub async fn dash_agent_names(&self) -> Result<Vec<(String, String)>, DbError> {
        let rows = sqlx::query("SELECT id, name FROM agents ORDER BY name, id LIMIT 5000")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("id")?, r.try_get("name")?)))
            .collect()
    }

    /// The agent's intents created in `[from, to)`, oldest first, at most `limit`.
    pub async fn dash_agent_intents_between(
        &self,
        agent_id: &str,
        from: i64,
        to: i64,
        limit: i64,
    ) -> Result<Vec<Intent>, DbError> {
        let sql = format!(
            "SELECT {INTENT_COLUMNS} FROM intents WHERE agent_id = $1 AND created_at >= $2 AND created_at < $3 \
             ORDER BY created_at, id LIMIT $4"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(agent_id.to_string())
            .bind(from)
            .bind(to)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(intent_from_row).collect()
    }

    /// Intents matching `filter`, newest first, with their card's last four digits.
    pub async fn dash_transactions(
        &self,
        filter: &TxFilter,
        limit: i64,
        cursor: Option<Cursor>,
    ) -> Result<Page<TxRow>, DbError> {
        let select = format!(
            "SELECT {INTENT_COLUMNS}, (SELECT c.last4 FROM cards c WHERE c.intent_id = intents.id \
             ORDER BY c.created_at DESC, c.id DESC LIMIT 1) AS card_last4 FROM intents"
        );
        self.fetch_page(&select, tx_where(filter), limit, cursor, tx_row, |t| {
            Cursor {
                created_at: t.intent.created_at,
                id: t.intent.id.clone(),
            }
        })
        .await
    }

    /// Every decision about an intent, oldest first.
    pub async fn dash_intent_decisions(&self, intent_id: &str) -> Result<Vec<Decision>, DbError> {
        let sql = format!(
            "SELECT {DECISION_COLUMNS} FROM decisions WHERE intent_id = $1 ORDER BY created_at, id LIMIT 1000"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(intent_id.to_string())
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(decision_from_row).collect()
    }

    /// The cards of an intent, oldest first.
    pub async fn dash_intent_cards(&self, intent_id: &str) -> Result<Vec<CardRecord>, DbError> {
        let rows = sqlx::query(
            "SELECT id, stripe_card_id, last4, exp_month, exp_year, spending_limit, currency, status, created_at, \
             updated_at FROM cards WHERE intent_id = $1 ORDER BY created_at, id LIMIT 100",
        )
        .bind(intent_id.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(CardRecord {
                    id: r.try_get("id")?,
                    stripe_card_id: r.try_get("stripe_card_id")?,
                    last4: r.try_get("last4")?,
                    exp_month: r.try_get("exp_month")?,
                    exp_year: r.try_get("exp_year")?,
                    spending_limit: r.try_get("spending_limit")?,
                    currency: r.try_get("currency")?,
                    status: r.try_get("status")?,
                    created_at: r.try_get("created_at")?,
                    updated_at: r.try_get("updated_at")?,
                })
            })
            .collect()
    }

    /// The captures and refunds of an intent, oldest first.
    pub async fn dash_intent_settlements(
        &self,
        intent_id: &str,
    ) -> Result<Vec<SettlementRecord>, DbError> {
        let rows = sqlx::query(
            "SELECT id, stripe_transaction_id, authorization_id, kind, amount, currency, merchant_name, created_at \
             FROM settlements WHERE intent_id = $1 ORDER BY created_at, id LIMIT 1000",
        )
        .bind(intent_id.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(SettlementRecord {
                    id: r.try_get("id")?,
                    stripe_transaction_id: r.try_get("stripe_transaction_id")?,
                    authorization_id: r.try_get("authorization_id")?,
                    kind: r.try_get("kind")?,
                    amount: r.try_get("amount")?,
                    currency: r.try_get("currency")?,
                    merchant_name: r.try_get("merchant_name")?,
                    created_at: r.try_get("created_at")?,
                })
            })
            .collect()
    }

    /// Intents waiting for an administrator, oldest first.
    pub async fn dash_pending_approvals(&self, limit: i64) -> Result<Vec<Intent>, DbError> {
        let sql = format!(
            "SELECT {INTENT_COLUMNS} FROM intents WHERE status = 'pending_approval' ORDER BY created_at, id LIMIT $1"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(intent_from_row).collect()
    }

    /// The latest decisions by administrators, newest first, with their purchases.
    pub async fn dash_recent_admin_decisions(
        &self,
        limit: i64,
    ) -> Result<Vec<AdminDecisionRow>, DbError> {
        let rows = sqlx::query(
            "SELECT d.id, d.intent_id, d.org_id, d.project_id, d.agent_id, d.outcome, d.reasons, d.decided_by, \
             d.actor_id, d.note, d.policy_revision, d.created_at, i.amount AS intent_amount, \
             i.currency AS intent_currency, i.merchant_name AS intent_merchant \
             FROM decisions d JOIN intents i ON i.id = d.intent_id WHERE d.decided_by = 'admin' \
             ORDER BY d.created_at DESC, d.id DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(AdminDecisionRow {
                    decision: decision_from_row(r)?,
                    amount: r.try_get("intent_amount")?,
                    currency: r.try_get("intent_currency")?,
                    merchant_name: r.try_get("intent_merchant")?,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn like_patterns_escape_wildcards() {
        assert_eq!(like_pattern("Ab%c_d!"), "%ab!%c!_d!!%");
    }
}
