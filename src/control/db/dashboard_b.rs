//! Read-only queries of the dashboard's money pages (policies, approvals, transactions).
//! Portable SQL for SQLite and PostgreSQL; no writes here (the pages reuse `put_policy`
//! and `decide_pending`).

use sqlx::any::AnyRow;
use sqlx::{AssertSqlSafe, Row};

use super::{
    Arg, ControlDb, DECISION_COLUMNS, DbError, INTENT_COLUMNS, Where, bind_all, decision_from_row,
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
    pub project_id: Option<String>,
    /// Exact intent id.
    pub intent_id: Option<String>,
    /// Last four digits of one of the intent's cards.
    pub card_last4: Option<String>,
}

/// An intent with its (latest) card and its decision facts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxRow {
    pub intent: Intent,
    pub card_last4: Option<String>,
    /// Stripe card id of the latest card.
    pub card_stripe_id: Option<String>,
    /// When the intent's latest decision was made.
    pub decided_at: Option<i64>,
    /// `approved`/`declined` when an administrator decided it: who, their note and when.
    pub admin_decision: Option<String>,
    pub admin_actor: Option<String>,
    pub admin_note: Option<String>,
    pub admin_decided_at: Option<i64>,
}

/// A purchase waiting for an administrator, with its agent and the sidecar's reason
/// sentences.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingRow {
    pub intent: Intent,
    pub agent_name: Option<String>,
    /// `active` or `frozen` (`None`: the agent row is gone).
    pub agent_status: Option<String>,
    pub frozen_reason: Option<String>,
    /// The reasons' sentences (empty when the sidecar sent none).
    pub messages: Vec<String>,
}

/// Filters of the settlements export: settlement date in `[from, to)`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SettlementFilter {
    pub from: Option<i64>,
    pub to: Option<i64>,
    pub currency: Option<String>,
    pub agent_id: Option<String>,
    pub project_id: Option<String>,
}

/// One capture or refund with the purchase it belongs to (if any).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SettlementExportRow {
    pub id: String,
    pub created_at: i64,
    pub kind: String,
    pub amount: i64,
    pub currency: String,
    pub stripe_transaction_id: Option<String>,
    pub stripe_card_id: Option<String>,
    pub intent_id: Option<String>,
    pub agent_id: Option<String>,
    pub agent_name: Option<String>,
    pub project_id: Option<String>,
    pub merchant: Option<String>,
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
    w.eq_text("project_id", &filter.project_id);
    w.eq_text("id", &filter.intent_id);
    if let Some(l) = &filter.card_last4 {
        let n = w.next();
        w.clauses.push(format!(
            "EXISTS (SELECT 1 FROM cards c WHERE c.intent_id = intents.id AND c.last4 = ${n})"
        ));
        w.args.push(Arg::Text(l.clone()));
    }
    if let Some(m) = &filter.merchant {
        let n = w.next();
        w.clauses
            .push(format!("LOWER(merchant_name) LIKE ${n} ESCAPE '!'"));
        w.args.push(Arg::Text(like_pattern(m)));
    }
    w
}

/// The transactions select: intent columns, the latest card, the decision facts.
fn tx_select() -> String {
    format!(
        "SELECT {INTENT_COLUMNS}, \
         (SELECT c.last4 FROM cards c WHERE c.intent_id = intents.id ORDER BY c.created_at DESC, c.id DESC LIMIT 1) AS card_last4, \
         (SELECT c.stripe_card_id FROM cards c WHERE c.intent_id = intents.id ORDER BY c.created_at DESC, c.id DESC LIMIT 1) AS card_stripe_id, \
         (SELECT d.created_at FROM decisions d WHERE d.id = intents.decision_id) AS decided_at, \
         admin_decision, admin_actor, admin_note, admin_decided_at FROM intents"
    )
}

fn tx_row(r: &AnyRow) -> Result<TxRow, DbError> {
    Ok(TxRow {
        intent: intent_from_row(r)?,
        card_last4: r.try_get("card_last4")?,
        card_stripe_id: r.try_get("card_stripe_id")?,
        decided_at: r.try_get("decided_at")?,
        admin_decision: r.try_get("admin_decision")?,
        admin_actor: r.try_get("admin_actor")?,
        admin_note: r.try_get("admin_note")?,
        admin_decided_at: r.try_get("admin_decided_at")?,
    })
}

fn pending_row(r: &AnyRow) -> Result<PendingRow, DbError> {
    let messages: Option<String> = r.try_get("reason_messages")?;
    Ok(PendingRow {
        intent: intent_from_row(r)?,
        agent_name: r.try_get("agent_name")?,
        agent_status: r.try_get("agent_status")?,
        frozen_reason: r.try_get("agent_frozen_reason")?,
        // Unreadable sentences are shown as codes only.
        messages: messages
            .and_then(|m| serde_json::from_str(&m).ok())
            .unwrap_or_default(),
    })
}

fn settlement_export_row(r: &AnyRow) -> Result<SettlementExportRow, DbError> {
    Ok(SettlementExportRow {
        id: r.try_get("id")?,
        created_at: r.try_get("created_at")?,
        kind: r.try_get("kind")?,
        amount: r.try_get("amount")?,
        currency: r.try_get("currency")?,
        stripe_transaction_id: r.try_get("stripe_transaction_id")?,
        stripe_card_id: r.try_get("stripe_card_id")?,
        intent_id: r.try_get("intent_id")?,
        agent_id: r.try_get("agent_id")?,
        agent_name: r.try_get("agent_name")?,
        project_id: r.try_get("project_id")?,
        merchant: r.try_get("merchant")?,
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

    /// Intents matching `filter`, newest first, older than `cursor`, with their latest
    /// card and decision facts.
    pub async fn dash_transactions(
        &self,
        filter: &TxFilter,
        limit: i64,
        cursor: Option<Cursor>,
    ) -> Result<Page<TxRow>, DbError> {
        self.fetch_page(&tx_select(), tx_where(filter), limit, cursor, tx_row, |t| {
            Cursor {
                created_at: t.intent.created_at,
                id: t.intent.id.clone(),
            }
        })
        .await
    }

    /// The page of at most `limit` intents matching `filter` just newer than `cursor`,
    /// newest first, and whether still newer ones exist.
    pub async fn dash_transactions_newer(
        &self,
        filter: &TxFilter,
        limit: i64,
        cursor: &Cursor,
    ) -> Result<(Vec<TxRow>, bool), DbError> {
        let mut w = tx_where(filter);
        w.cursor_cmp(&Some(cursor.clone()), ">", "created_at", "id");
        let n = w.next();
        let sql = format!(
            "{}{} ORDER BY created_at, id LIMIT ${n}",
            tx_select(),
            w.sql()
        );
        let mut args = w.args;
        args.push(Arg::Int(limit + 1));
        let rows = bind_all(sqlx::query(AssertSqlSafe(sql)), args)
            .fetch_all(&self.pool)
            .await?;
        let mut items = rows.iter().map(tx_row).collect::<Result<Vec<_>, _>>()?;
        let more = items.len() > usize::try_from(limit).unwrap_or(0);
        items.truncate(usize::try_from(limit).unwrap_or(0));
        items.reverse();
        Ok((items, more))
    }

    /// Captures and refunds with a settlement date in the filter's range, oldest first,
    /// after `cursor` (`(created_at, id)` of the last row of the previous batch).
    pub async fn dash_settlements(
        &self,
        filter: &SettlementFilter,
        limit: i64,
        cursor: Option<Cursor>,
    ) -> Result<Page<SettlementExportRow>, DbError> {
        let mut w = Where::default();
        w.cmp_int("s.created_at", ">=", filter.from);
        w.cmp_int("s.created_at", "<", filter.to);
        w.eq_text("s.currency", &filter.currency);
        w.eq_text("i.agent_id", &filter.agent_id);
        w.eq_text("i.project_id", &filter.project_id);
        w.cursor_cmp(&cursor, ">", "s.created_at", "s.id");
        let n = w.next();
        let sql = format!(
            "SELECT s.id, s.created_at, s.kind, s.amount, s.currency, s.stripe_transaction_id, s.stripe_card_id, \
             s.intent_id, i.agent_id AS agent_id, a.name AS agent_name, i.project_id AS project_id, \
             COALESCE(s.merchant_name, i.merchant_name) AS merchant \
             FROM settlements s LEFT JOIN intents i ON i.id = s.intent_id LEFT JOIN agents a ON a.id = i.agent_id\
             {} ORDER BY s.created_at, s.id LIMIT ${n}",
            w.sql()
        );
        let mut args = w.args;
        args.push(Arg::Int(limit + 1));
        let rows = bind_all(sqlx::query(AssertSqlSafe(sql)), args)
            .fetch_all(&self.pool)
            .await?;
        let items = rows
            .iter()
            .map(settlement_export_row)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Page::from_rows(items, limit, |r| Cursor {
            created_at: r.created_at,
            id: r.id.clone(),
        }))
    }

    /// The reasons' sentences of an intent's latest sidecar decision (empty if none).
    pub async fn dash_reason_messages(&self, intent_id: &str) -> Result<Vec<String>, DbError> {
        let row = sqlx::query("SELECT reason_messages FROM intents WHERE id = $1")
            .bind(intent_id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        let text: Option<String> = match row {
            Some(r) => r.try_get("reason_messages")?,
            None => None,
        };
        Ok(text
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default())
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

    /// Intents waiting for an administrator, oldest first, after `cursor`, with their
    /// agent's name and status and the sidecar's reason sentences.
    pub async fn dash_pending_page(
        &self,
        limit: i64,
        cursor: Option<Cursor>,
    ) -> Result<Page<PendingRow>, DbError> {
        let mut w = Where::default();
        w.clauses.push("status = 'pending_approval'".into());
        w.cursor_cmp(&cursor, ">", "created_at", "id");
        let n = w.next();
        let sql = format!(
            "SELECT {INTENT_COLUMNS}, reason_messages, \
             (SELECT a.name FROM agents a WHERE a.id = intents.agent_id) AS agent_name, \
             (SELECT a.status FROM agents a WHERE a.id = intents.agent_id) AS agent_status, \
             (SELECT a.frozen_reason FROM agents a WHERE a.id = intents.agent_id) AS agent_frozen_reason \
             FROM intents{} ORDER BY created_at, id LIMIT ${n}",
            w.sql()
        );
        let mut args = w.args;
        args.push(Arg::Int(limit + 1));
        let rows = bind_all(sqlx::query(AssertSqlSafe(sql)), args)
            .fetch_all(&self.pool)
            .await?;
        let items = rows
            .iter()
            .map(pending_row)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Page::from_rows(items, limit, |p| Cursor {
            created_at: p.intent.created_at,
            id: p.intent.id.clone(),
        }))
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
