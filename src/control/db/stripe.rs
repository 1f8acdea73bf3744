//! The ledger side of Stripe webhooks: real-time authorization inputs and their recording,
//! authorizations and transactions (settlement), card status, discrepancies, and the updates
//! feed down to sidecars. Every event is applied in one transaction with its deduplication
//! row (`stripe_events`), its audit events and the feed rows it writes.

use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Actor, ControlDb, DbError, Where, parse_json};
use crate::control::model::{
    Authorization, Cursor, Discrepancy, Page, StripeAuthorization, StripeCard, StripeEventMeta,
    StripeTransaction,
};
use crate::domain::merchant::{MatchBasis, match_descriptor};
use crate::domain::money::Currency;
use crate::policy::authorization::{AuthCardHistory, AuthDecision, AuthIntent};
use crate::service::ids::new_id;
use crate::sync::wire::{self, AuthorizationSnapshot, IntentUpdate};

/// Intent statuses on which a capture is a discrepancy (unless an approved authorization
/// backs it).
const INACTIVE: &[&str] = &["canceled", "expired", "declined", "failed"];

/// Whose purchase a card is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CardOwner {
    pub intent_id: String,
    pub agent_id: String,
    pub project_id: String,
    pub org_id: String,
}

/// A card known only through its signed metadata: adopted into the ledger (a card row and,
/// if the sidecar's outbox has not delivered it yet, a placeholder intent at version 0,
/// which the sidecar's first event overwrites).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Adoption {
    pub owner: CardOwner,
    pub sidecar_id: String,
    pub intent_exists: bool,
    pub limit: i64,
    pub currency: String,
    pub merchant_name: String,
    pub merchant_domain: Option<String>,
    pub merchant_country: Option<String>,
    pub merchant_category: Option<String>,
    pub expires_at: Option<i64>,
    pub last4: String,
    pub exp_month: i64,
    pub exp_year: i64,
    pub card_status: String,
}

/// What a real-time decision needs, read before the decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthInputs {
    /// `None`: the card is unknown (decline `unknown_card`).
    pub intent: Option<AuthIntent>,
    pub owner: Option<CardOwner>,
    pub history: AuthCardHistory,
    /// Set when the card is known only through its signed metadata.
    pub adoption: Option<Adoption>,
}

/// Filters for listing discrepancies.
#[derive(Clone, Debug, Default)]
pub struct DiscrepancyFilter {
    pub kind: Option<String>,
    pub agent_id: Option<String>,
    pub project_id: Option<String>,
    pub intent_id: Option<String>,
    pub resolved: Option<bool>,
}

/// A discrepancy about to be recorded.
pub(super) struct NewDiscrepancy<'a> {
    pub(super) kind: &'static str,
    pub(super) owner: Option<&'a CardOwner>,
    pub(super) card_id: &'a str,
    pub(super) object_id: &'a str,
    pub(super) amount: i64,
    pub(super) currency: &'a str,
    pub(super) details: serde_json::Value,
}

/// The ledger's view of a card.
struct LedgerCard {
    owner: CardOwner,
    intent_status: String,
    card_status: String,
    spending_limit: i64,
    locked_network_id: Option<String>,
    merchant_name: String,
    merchant_domain: Option<String>,
}

/// What an applied event leaves to commit.
#[derive(Default)]
pub(super) struct Outcome {
    pub(super) updates: Vec<(String, IntentUpdate)>,
    pub(super) froze: bool,
}

fn stripe_actor(event: &StripeEventMeta) -> Actor {
    Actor {
        kind: "stripe",
        id: event.account.clone().unwrap_or_else(|| "stripe".into()),
        name: "stripe".into(),
        request_id: Some(event.id.clone()),
    }
}

fn json_text(v: &impl serde::Serialize) -> Result<String, DbError> {
    serde_json::to_string(v).map_err(|e| DbError::Corrupt(e.to_string()))
}

impl ControlDb {
    /// Notified (with the last seq) whenever this process commits updates-feed rows.
    pub fn subscribe_updates(&self) -> tokio::sync::watch::Receiver<i64> {
        self.updates.subscribe()
    }

    /// `Some(stored response)` if the event was received before (the response is set for
    /// `issuing_authorization.request` events only).
    pub async fn stripe_event_seen(&self, id: &str) -> Result<Option<Option<String>>, DbError> {
        let row = sqlx::query("SELECT response FROM stripe_events WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            r.try_get::<Option<String>, _>("response")
                .map_err(DbError::from)
        })
        .transpose()
    }

    /// Inserts the dedup row; `false` if the event was received before.
    async fn record_event(
        conn: &mut sqlx::AnyConnection,
        event: &StripeEventMeta,
        response: Option<&str>,
        now: i64,
    ) -> Result<bool, DbError> {
        let n = sqlx::query(
            "INSERT INTO stripe_events (id, type, account, created, received_at, response) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING",
        )
        .bind(event.id.clone())
        .bind(event.kind.clone())
        .bind(event.account.clone())
        .bind(event.created)
        .bind(now)
        .bind(response.map(str::to_string))
        .execute(&mut *conn)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    /// Records an event Roony does not act on; `false` if it is a duplicate.
    pub async fn record_ignored_event(
        &self,
        event: &StripeEventMeta,
        now: i64,
    ) -> Result<bool, DbError> {
        let mut tx = self.tx().await?;
        let fresh = Self::record_event(&mut tx, event, None, now).await?;
        tx.commit().await?;
        Ok(fresh)
    }

    // ----- real-time decisions -----------------------------------------------------------

    /// Loads what [`crate::policy::authorization::decide_authorization`] needs about the
    /// card: a few indexed reads, no transaction.
    pub async fn auth_inputs(
        &self,
        card: &StripeCard,
        authorization_id: &str,
    ) -> Result<AuthInputs, DbError> {
        let mut conn = self.pool.acquire().await?;
        let ledger = Self::ledger_card(&mut conn, &card.id).await?;
        let mut history = Self::card_history(&mut conn, &card.id, authorization_id).await?;
        if let Some(l) = ledger {
            // One read: the intent, its agent's status and (a relay card) the relay's expiry.
            let row = sqlx::query(
                "SELECT i.currency, i.merchant_country, i.merchant_category, i.expires_at, a.status AS agent_status, \
                 rc.expires_at AS relay_expires_at \
                 FROM intents i LEFT JOIN agents a ON a.id = i.agent_id \
                 LEFT JOIN relay_cards rc ON rc.intent_id = i.id AND (rc.card_id IS NULL OR rc.card_id = $2) \
                 WHERE i.id = $1",
            )
            .bind(l.owner.intent_id.clone())
            .bind(card.id.clone())
            .fetch_one(&mut *conn)
            .await?;
            let currency: String = row.try_get("currency")?;
            let agent_status: Option<String> = row.try_get("agent_status")?;
            let relay_expiry: Option<i64> = row.try_get("relay_expires_at")?;
            history.locked_network_id = l.locked_network_id.clone();
            let intent = AuthIntent {
                intent_id: l.owner.intent_id.clone(),
                status: l.intent_status.clone(),
                currency: Currency::parse(&currency)
                    .map_err(|_| DbError::Corrupt(format!("unknown currency {currency}")))?,
                limit: l.spending_limit,
                merchant_name: l.merchant_name.clone(),
                merchant_domain: l.merchant_domain.clone(),
                merchant_country: row.try_get("merchant_country")?,
                merchant_category: row.try_get("merchant_category")?,
                expires_at: earliest(row.try_get("expires_at")?, relay_expiry),
                agent_frozen: agent_status.as_deref() != Some("active"),
            };
            return Ok(AuthInputs {
                intent: Some(intent),
                owner: Some(l.owner),
                history,
                adoption: None,
            });
        }
        let Some(adoption) = Self::verify_card(&mut conn, card).await? else {
            return Ok(AuthInputs {
                intent: None,
                owner: None,
                history,
                adoption: None,
            });
        };
        let agent_status: Option<String> = sqlx::query("SELECT status FROM agents WHERE id = $1")
            .bind(adoption.owner.agent_id.clone())
            .fetch_optional(&mut *conn)
            .await?
            .map(|r| r.try_get("status"))
            .transpose()?;
        let status: Option<String> = sqlx::query("SELECT status FROM intents WHERE id = $1")
            .bind(adoption.owner.intent_id.clone())
            .fetch_optional(&mut *conn)
            .await?
            .map(|r| r.try_get("status"))
            .transpose()?;
        let relay_expiry =
            Self::relay_expiry_in(&mut conn, &adoption.owner.intent_id, &card.id).await?;
        let intent = AuthIntent {
            intent_id: adoption.owner.intent_id.clone(),
            status: status.unwrap_or_else(|| "approved".into()),
            currency: Currency::parse(&adoption.currency)
                .map_err(|_| DbError::Corrupt("unknown currency".into()))?,
            limit: adoption.limit,
            merchant_name: adoption.merchant_name.clone(),
            merchant_domain: adoption.merchant_domain.clone(),
            merchant_country: adoption.merchant_country.clone(),
            merchant_category: adoption.merchant_category.clone(),
            expires_at: earliest(adoption.expires_at, relay_expiry),
            agent_frozen: agent_status.as_deref() != Some("active"),
        };
        Ok(AuthInputs {
            intent: Some(intent),
            owner: Some(adoption.owner.clone()),
            history,
            adoption: Some(adoption),
        })
    }

    async fn ledger_card(
        conn: &mut sqlx::AnyConnection,
        card_id: &str,
    ) -> Result<Option<LedgerCard>, DbError> {
        let row = sqlx::query(
            "SELECT c.intent_id, c.spending_limit, c.locked_network_id, c.status AS card_status, \
             i.agent_id, i.project_id, i.org_id, i.status, i.merchant_name, i.merchant_domain \
             FROM cards c JOIN intents i ON i.id = c.intent_id WHERE c.stripe_card_id = $1",
        )
        .bind(card_id.to_string())
        .fetch_optional(&mut *conn)
        .await?;
        row.map(|r| {
            Ok(LedgerCard {
                owner: CardOwner {
                    intent_id: r.try_get("intent_id")?,
                    agent_id: r.try_get("agent_id")?,
                    project_id: r.try_get("project_id")?,
                    org_id: r.try_get("org_id")?,
                },
                intent_status: r.try_get("status")?,
                card_status: r.try_get("card_status")?,
                spending_limit: r.try_get("spending_limit")?,
                locked_network_id: r.try_get("locked_network_id")?,
                merchant_name: r.try_get("merchant_name")?,
                merchant_domain: r.try_get("merchant_domain")?,
            })
        })
        .transpose()
    }

    /// Authorizations already on the card and force captures (the lock is the caller's).
    async fn card_history(
        conn: &mut sqlx::AnyConnection,
        card_id: &str,
        authorization_id: &str,
    ) -> Result<AuthCardHistory, DbError> {
        let rows = sqlx::query(
            "SELECT id, amount, approved, status FROM authorizations WHERE stripe_card_id = $1",
        )
        .bind(card_id.to_string())
        .fetch_all(&mut *conn)
        .await?;
        let mut h = AuthCardHistory::default();
        for r in &rows {
            let id: String = r.try_get("id")?;
            let approved = r.try_get::<i64, _>("approved")? == 1;
            let status: String = r.try_get("status")?;
            let amount: i64 = r.try_get("amount")?;
            if !approved {
                continue;
            }
            if id == authorization_id {
                h.approved_on_this = amount;
            } else if status != "reversed" && status != "expired" {
                h.other_approved += 1;
            }
        }
        let sums = sqlx::query(
            "SELECT kind, CAST(SUM(amount) AS BIGINT) AS total FROM settlements \
             WHERE stripe_card_id = $1 AND authorization_id IS NULL GROUP BY kind",
        )
        .bind(card_id.to_string())
        .fetch_all(&mut *conn)
        .await?;
        let mut net = 0i64;
        for r in &sums {
            let kind: String = r.try_get("kind")?;
            let total: i64 = r.try_get("total")?;
            net = if kind == "capture" {
                net.saturating_add(total)
            } else {
                net.saturating_sub(total)
            };
        }
        h.captured_elsewhere = net.max(0);
        Ok(h)
    }

    /// The card's `roony_*` metadata, if its signature verifies with the token hash of the
    /// (unrevoked) sidecar it names and its agent is in that sidecar's project.
    pub(super) async fn verify_card(
        conn: &mut sqlx::AnyConnection,
        card: &StripeCard,
    ) -> Result<Option<Adoption>, DbError> {
        let md = &card.metadata;
        let (Some(token_id), Some(intent_id), Some(agent_id)) = (
            md.get(wire::CARD_SIDECAR_KEY),
            md.get("roony_intent_id"),
            md.get("roony_agent_id"),
        ) else {
            return Ok(None);
        };
        let Some(sidecar) = sqlx::query(
            "SELECT id, project_id, token_hash, revoked_at FROM sidecars WHERE token_id = $1",
        )
        .bind(token_id.clone())
        .fetch_optional(&mut *conn)
        .await?
        else {
            return Ok(None);
        };
        let token_hash: String = sidecar.try_get("token_hash")?;
        if sidecar.try_get::<Option<i64>, _>("revoked_at")?.is_some()
            || !wire::verify_card_metadata(md, &token_hash)
        {
            return Ok(None);
        }
        let project_id: String = sidecar.try_get("project_id")?;
        let Some(agent) = sqlx::query("SELECT org_id, project_id FROM agents WHERE id = $1")
            .bind(agent_id.clone())
            .fetch_optional(&mut *conn)
            .await?
        else {
            return Ok(None);
        };
        if agent.try_get::<String, _>("project_id")? != project_id {
            return Ok(None);
        }
        let existing = sqlx::query("SELECT agent_id FROM intents WHERE id = $1")
            .bind(intent_id.clone())
            .fetch_optional(&mut *conn)
            .await?;
        if let Some(row) = &existing
            && row.try_get::<String, _>("agent_id")? != *agent_id
        {
            return Ok(None);
        }
        let (Some(limit), Some(currency)) = (
            md.get("roony_limit").and_then(|v| v.parse::<i64>().ok()),
            md.get("roony_currency")
                .and_then(|c| Currency::parse(c).ok()),
        ) else {
            return Ok(None);
        };
        let expires_at = match md.get("roony_expires") {
            Some(v) => match v.parse::<i64>() {
                Ok(t) => Some(t),
                Err(_) => return Ok(None),
            },
            None => None,
        };
        Ok(Some(Adoption {
            owner: CardOwner {
                intent_id: intent_id.clone(),
                agent_id: agent_id.clone(),
                project_id,
                org_id: agent.try_get("org_id")?,
            },
            sidecar_id: sidecar.try_get("id")?,
            intent_exists: existing.is_some(),
            limit: limit.max(0),
            currency: currency.code().to_string(),
            merchant_name: md.get("roony_merchant").cloned().unwrap_or_default(),
            merchant_domain: md.get("roony_domain").cloned(),
            merchant_country: md.get("roony_country").cloned(),
            merchant_category: md.get("roony_category").cloned(),
            expires_at,
            last4: card.last4.clone().unwrap_or_default(),
            exp_month: card.exp_month.unwrap_or(0),
            exp_year: card.exp_year.unwrap_or(0),
            card_status: card.status.clone().unwrap_or_else(|| "active".into()),
        }))
    }

    /// Inserts the card row (and a placeholder intent, if none exists) of an adopted card.
    pub(super) async fn adopt(
        conn: &mut sqlx::AnyConnection,
        card_id: &str,
        a: &Adoption,
        actor: &Actor,
        now: i64,
    ) -> Result<(), DbError> {
        if !a.intent_exists {
            sqlx::query(
                "INSERT INTO intents (id, org_id, project_id, agent_id, status, amount, currency, merchant_name, \
                 merchant_domain, merchant_country, description, decision_id, reasons, created_at, updated_at, \
                 version, sidecar_id, sidecar_status, reserved, status_reason, merchant_category, expires_at) \
                 VALUES ($1, $2, $3, $4, 'approved', $5, $6, $7, $8, $9, NULL, NULL, '[]', $10, $10, 0, $11, NULL, 0, \
                 'card_metadata', $12, $13) ON CONFLICT (id) DO NOTHING",
            )
            .bind(a.owner.intent_id.clone())
            .bind(a.owner.org_id.clone())
            .bind(a.owner.project_id.clone())
            .bind(a.owner.agent_id.clone())
            .bind(a.limit)
            .bind(a.currency.clone())
            .bind(a.merchant_name.clone())
            .bind(a.merchant_domain.clone())
            .bind(a.merchant_country.clone())
            .bind(now)
            .bind(a.sidecar_id.clone())
            .bind(a.merchant_category.clone())
            .bind(a.expires_at)
            .execute(&mut *conn)
            .await?;
        }
        sqlx::query(
            "INSERT INTO cards (id, intent_id, agent_id, stripe_card_id, last4, exp_month, exp_year, spending_limit, \
             currency, status, created_at, updated_at) VALUES ($1, $2, $3, $1, $4, $5, $6, $7, $8, $9, $10, $10) \
             ON CONFLICT (stripe_card_id) DO NOTHING",
        )
        .bind(card_id.to_string())
        .bind(a.owner.intent_id.clone())
        .bind(a.owner.agent_id.clone())
        .bind(a.last4.clone())
        .bind(a.exp_month)
        .bind(a.exp_year)
        .bind(a.limit)
        .bind(a.currency.clone())
        .bind(a.card_status.clone())
        .bind(now)
        .execute(&mut *conn)
        .await?;
        Self::audit(
            conn,
            actor,
            "card.adopt",
            "card",
            card_id,
            serde_json::json!({"intent_id": a.owner.intent_id, "agent_id": a.owner.agent_id,
                "sidecar_id": a.sidecar_id, "limit": a.limit, "currency": a.currency}),
            now,
        )
        .await
    }

    /// Records a real-time decision (one transaction): the event (with `response`), the
    /// authorization, the card's merchant lock, an adopted card, the intent's update and
    /// an audit event. `Ok(Some(stored))` when the event was received before: answer that.
    #[allow(clippy::too_many_arguments)]
    pub async fn record_realtime_decision(
        &self,
        event: &StripeEventMeta,
        auth: &StripeAuthorization,
        inputs: &AuthInputs,
        decision: &AuthDecision,
        requested: i64,
        response: &str,
        now: i64,
    ) -> Result<Option<String>, DbError> {
        let actor = stripe_actor(event);
        let mut tx = self.tx().await?;
        if !Self::record_event(&mut tx, event, Some(response), now).await? {
            drop(tx);
            return Ok(Some(
                self.stripe_event_seen(&event.id)
                    .await?
                    .flatten()
                    .unwrap_or_else(|| response.to_string()),
            ));
        }
        if let Some(a) = &inputs.adoption {
            Self::adopt(&mut tx, &auth.card.id, a, &actor, now).await?;
        }
        let prior = inputs.history.approved_on_this;
        let (approved, amount, status) = if decision.approved {
            (true, prior.saturating_add(requested), "pending")
        } else if prior > 0 {
            // A declined increment leaves what was approved before.
            (true, prior, "pending")
        } else {
            (false, requested, "closed")
        };
        let codes: Vec<&str> = decision.reasons.iter().map(|r| r.code.as_str()).collect();
        Self::upsert_authorization(
            &mut tx,
            auth,
            inputs.owner.as_ref(),
            (approved, amount, status),
            &json_text(&codes)?,
            "roony",
            now,
        )
        .await?;
        if let Some(net) = &decision.lock_network_id {
            sqlx::query(
                "UPDATE cards SET locked_network_id = $1, updated_at = $2 \
                 WHERE stripe_card_id = $3 AND locked_network_id IS NULL",
            )
            .bind(net.clone())
            .bind(now)
            .bind(auth.card.id.clone())
            .execute(&mut *tx)
            .await?;
        }
        Self::audit(
            &mut tx,
            &actor,
            "authorization.decide",
            "authorization",
            &auth.id,
            serde_json::json!({
                "event_id": event.id,
                "card_id": auth.card.id,
                "intent_id": inputs.owner.as_ref().map(|o| &o.intent_id),
                "approved": decision.approved,
                "reasons": codes,
                "messages": decision.reasons.iter().map(|r| &r.message).collect::<Vec<_>>(),
                "amount": requested,
                "currency": auth.pending_currency.as_deref().unwrap_or(&auth.currency),
                "merchant": auth.merchant.name,
                "merchant_basis": decision.merchant_basis,
            }),
            now,
        )
        .await?;
        let mut out = Outcome::default();
        if let Some(owner) = &inputs.owner
            && let Some(update) = Self::refresh_intent(&mut tx, &owner.intent_id, now).await?
        {
            out.updates.push(update);
        }
        self.finish(tx, out).await?;
        Ok(None)
    }

    async fn upsert_authorization(
        conn: &mut sqlx::AnyConnection,
        auth: &StripeAuthorization,
        owner: Option<&CardOwner>,
        (approved, amount, status): (bool, i64, &str),
        reasons: &str,
        decided_by: &str,
        now: i64,
    ) -> Result<(), DbError> {
        let m = &auth.merchant;
        sqlx::query(
            "INSERT INTO authorizations (id, stripe_card_id, intent_id, agent_id, project_id, org_id, amount, currency, \
             approved, status, merchant_name, merchant_city, merchant_country, merchant_category, merchant_network_id, \
             reasons, decided_by, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19) \
             ON CONFLICT (id) DO UPDATE SET amount = excluded.amount, approved = excluded.approved, \
             status = excluded.status, reasons = excluded.reasons, decided_by = excluded.decided_by, \
             intent_id = COALESCE(authorizations.intent_id, excluded.intent_id), \
             agent_id = COALESCE(authorizations.agent_id, excluded.agent_id), \
             project_id = COALESCE(authorizations.project_id, excluded.project_id), \
             org_id = COALESCE(authorizations.org_id, excluded.org_id), \
             updated_at = excluded.updated_at",
        )
        .bind(auth.id.clone())
        .bind(auth.card.id.clone())
        .bind(owner.map(|o| o.intent_id.clone()))
        .bind(owner.map(|o| o.agent_id.clone()))
        .bind(owner.map(|o| o.project_id.clone()))
        .bind(owner.map(|o| o.org_id.clone()))
        .bind(amount)
        .bind(
            auth.pending_currency
                .clone()
                .unwrap_or_else(|| auth.currency.clone()),
        )
        .bind(i64::from(approved))
        .bind(status.to_string())
        .bind(m.name.clone())
        .bind(m.city.clone())
        .bind(m.country.clone())
        .bind(m.category.clone())
        .bind(m.network_id.clone())
        .bind(reasons.to_string())
        .bind(decided_by.to_string())
        .bind(if auth.created > 0 { auth.created } else { now })
        .bind(now)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    // ----- events after the fact ---------------------------------------------------------

    /// The ledger card, or an adopted one (signed metadata), inside the transaction.
    async fn resolve_card(
        conn: &mut sqlx::AnyConnection,
        card: &StripeCard,
        actor: &Actor,
        now: i64,
    ) -> Result<Option<LedgerCard>, DbError> {
        if let Some(l) = Self::ledger_card(conn, &card.id).await? {
            return Ok(Some(l));
        }
        let Some(a) = Self::verify_card(conn, card).await? else {
            return Ok(None);
        };
        Self::adopt(conn, &card.id, &a, actor, now).await?;
        Self::ledger_card(conn, &card.id).await
    }

    /// `issuing_authorization.created` / `.updated`: upserts the authorization as Stripe
    /// reports it. `false` for a duplicate event.
    pub async fn apply_authorization(
        &self,
        event: &StripeEventMeta,
        auth: &StripeAuthorization,
        now: i64,
    ) -> Result<bool, DbError> {
        self.apply_authorization_as(event, auth, now, &stripe_actor(event))
            .await
    }

    /// [`ControlDb::apply_authorization`] with another actor in the audit trail (reconciliation).
    pub async fn apply_authorization_as(
        &self,
        event: &StripeEventMeta,
        auth: &StripeAuthorization,
        now: i64,
        actor: &Actor,
    ) -> Result<bool, DbError> {
        let actor = actor.clone();
        let mut tx = self.tx().await?;
        if !Self::record_event(&mut tx, event, None, now).await? {
            return Ok(false);
        }
        let card = Self::resolve_card(&mut tx, &auth.card, &actor, now).await?;
        let existing =
            sqlx::query("SELECT amount, reasons, decided_by FROM authorizations WHERE id = $1")
                .bind(auth.id.clone())
                .fetch_optional(&mut *tx)
                .await?;
        let mut amount = if auth.amount > 0 {
            auth.amount
        } else {
            auth.last_request_amount
                .or(auth.pending_amount)
                .unwrap_or(0)
        };
        let (reasons, decided_by) = match &existing {
            Some(r) => {
                let stored: i64 = r.try_get("amount")?;
                if amount == 0 {
                    amount = stored;
                }
                let by: String = r.try_get("decided_by")?;
                if by == "roony" {
                    (r.try_get::<String, _>("reasons")?, by)
                } else {
                    (json_text(&auth.request_reasons)?, by)
                }
            }
            None => (json_text(&auth.request_reasons)?, "stripe".to_string()),
        };
        let owner = card.as_ref().map(|c| c.owner.clone());
        Self::upsert_authorization(
            &mut tx,
            auth,
            owner.as_ref(),
            (auth.approved, amount, &auth.status),
            &reasons,
            &decided_by,
            now,
        )
        .await?;
        let mut out = Outcome::default();
        if auth.approved
            && let (Some(_), Some(net)) = (&card, &auth.merchant.network_id)
        {
            sqlx::query(
                "UPDATE cards SET locked_network_id = $1 WHERE stripe_card_id = $2 AND locked_network_id IS NULL",
            )
            .bind(net.clone())
            .bind(auth.card.id.clone())
            .execute(&mut *tx)
            .await?;
        }
        if card.is_none() && auth.approved {
            out.froze |= Self::discrepancy(
                &mut tx,
                &actor,
                NewDiscrepancy {
                    kind: "unknown_card",
                    owner: None,
                    card_id: &auth.card.id,
                    object_id: &auth.id,
                    amount,
                    currency: &auth.currency,
                    details: serde_json::json!({"event_id": event.id, "merchant": auth.merchant.name,
                        "message": "an authorization was approved on a card roony does not know"}),
                },
                now,
            )
            .await?;
        }
        Self::audit(
            &mut tx,
            &actor,
            if event.kind.ends_with(".created") {
                "authorization.created"
            } else {
                "authorization.updated"
            },
            "authorization",
            &auth.id,
            serde_json::json!({"event_id": event.id, "card_id": auth.card.id,
                "intent_id": owner.as_ref().map(|o| &o.intent_id), "approved": auth.approved,
                "status": auth.status, "amount": amount, "currency": auth.currency}),
            now,
        )
        .await?;
        if let Some(o) = &owner
            && let Some(u) = Self::refresh_intent(&mut tx, &o.intent_id, now).await?
        {
            out.updates.push(u);
        }
        self.finish(tx, out).await?;
        Ok(true)
    }

    /// `issuing_transaction.created` / `.updated`: upserts the settlement by its Stripe id;
    /// a new one is checked for discrepancies. `false` for a duplicate event.
    pub async fn apply_transaction(
        &self,
        event: &StripeEventMeta,
        t: &StripeTransaction,
        now: i64,
    ) -> Result<bool, DbError> {
        self.apply_transaction_as(event, t, now, &stripe_actor(event))
            .await
    }

    /// [`ControlDb::apply_transaction`] with another actor in the audit trail (reconciliation).
    pub async fn apply_transaction_as(
        &self,
        event: &StripeEventMeta,
        t: &StripeTransaction,
        now: i64,
        actor: &Actor,
    ) -> Result<bool, DbError> {
        let actor = actor.clone();
        let mut tx = self.tx().await?;
        if !Self::record_event(&mut tx, event, None, now).await? {
            return Ok(false);
        }
        let card = Self::ledger_card(&mut tx, &t.card_id).await?;
        let owner = card.as_ref().map(|c| c.owner.clone());
        let m = &t.merchant;
        let existing = sqlx::query("SELECT id FROM settlements WHERE stripe_transaction_id = $1")
            .bind(t.id.clone())
            .fetch_optional(&mut *tx)
            .await?;
        let fresh = existing.is_none();
        if fresh {
            sqlx::query(
                "INSERT INTO settlements (id, intent_id, card_id, stripe_card_id, stripe_transaction_id, authorization_id, \
                 kind, amount, currency, merchant_name, merchant_city, merchant_country, merchant_category, \
                 merchant_network_id, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
            )
            .bind(new_id("stl"))
            .bind(owner.as_ref().map(|o| o.intent_id.clone()))
            .bind(card.as_ref().map(|_| t.card_id.clone()))
            .bind(t.card_id.clone())
            .bind(t.id.clone())
            .bind(t.authorization_id.clone())
            .bind(t.kind.clone())
            .bind(t.amount)
            .bind(t.currency.to_ascii_uppercase())
            .bind(m.name.clone())
            .bind(m.city.clone())
            .bind(m.country.clone())
            .bind(m.category.clone())
            .bind(m.network_id.clone())
            .bind(if t.created > 0 { t.created } else { now })
            .execute(&mut *tx)
            .await?;
        } else {
            sqlx::query(
                "UPDATE settlements SET amount = $1, authorization_id = COALESCE(authorization_id, $2) \
                 WHERE stripe_transaction_id = $3",
            )
            .bind(t.amount)
            .bind(t.authorization_id.clone())
            .bind(t.id.clone())
            .execute(&mut *tx)
            .await?;
        }
        let mut out = Outcome::default();
        if fresh {
            let kinds = Self::transaction_discrepancies(&mut tx, card.as_ref(), t).await?;
            for (kind, message) in kinds {
                out.froze |= Self::discrepancy(
                    &mut tx,
                    &actor,
                    NewDiscrepancy {
                        kind,
                        owner: owner.as_ref(),
                        card_id: &t.card_id,
                        object_id: &t.id,
                        amount: t.amount,
                        currency: &t.currency,
                        details: serde_json::json!({"event_id": event.id, "transaction_type": t.kind,
                            "authorization_id": t.authorization_id, "merchant": m.name,
                            "merchant_network_id": m.network_id, "message": message}),
                    },
                    now,
                )
                .await?;
            }
        }
        Self::audit(
            &mut tx,
            &actor,
            if t.kind == "refund" {
                "transaction.refund"
            } else {
                "transaction.capture"
            },
            "transaction",
            &t.id,
            serde_json::json!({"event_id": event.id, "card_id": t.card_id,
                "intent_id": owner.as_ref().map(|o| &o.intent_id), "authorization_id": t.authorization_id,
                "amount": t.amount, "currency": t.currency, "new": fresh}),
            now,
        )
        .await?;
        if let Some(o) = &owner
            && let Some(u) = Self::refresh_intent(&mut tx, &o.intent_id, now).await?
        {
            out.updates.push(u);
        }
        self.finish(tx, out).await?;
        Ok(true)
    }

    async fn sum_settlements(
        conn: &mut sqlx::AnyConnection,
        column: &str,
        value: &str,
        kind: &str,
    ) -> Result<i64, DbError> {
        let sql = format!(
            "SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) AS total FROM settlements WHERE {column} = $1 AND kind = $2"
        );
        Ok(sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(value.to_string())
            .bind(kind.to_string())
            .fetch_one(&mut *conn)
            .await?
            .try_get("total")?)
    }

    /// The discrepancies a new transaction (already inserted) shows.
    async fn transaction_discrepancies(
        conn: &mut sqlx::AnyConnection,
        card: Option<&LedgerCard>,
        t: &StripeTransaction,
    ) -> Result<Vec<(&'static str, String)>, DbError> {
        let mut found = Vec::new();
        let captured = Self::sum_settlements(conn, "stripe_card_id", &t.card_id, "capture").await?;
        if t.kind == "refund" {
            let refunded =
                Self::sum_settlements(conn, "stripe_card_id", &t.card_id, "refund").await?;
            if card.is_none() {
                found.push((
                    "unmatched_refund",
                    "a refund on a card roony does not know".into(),
                ));
            } else if captured == 0 {
                found.push((
                    "unmatched_refund",
                    "a refund on a card with no captures".into(),
                ));
            } else if refunded > captured {
                found.push((
                    "unmatched_refund",
                    format!("{refunded} refunded is more than the {captured} captured"),
                ));
            }
            return Ok(found);
        }
        let Some(card) = card else {
            found.push((
                "unknown_card",
                "a capture on a card roony does not know".into(),
            ));
            return Ok(found);
        };
        let mut backed = false;
        match &t.authorization_id {
            None => found.push(("force_capture", "a capture without an authorization".into())),
            Some(auth_id) => {
                let row = sqlx::query("SELECT amount, approved FROM authorizations WHERE id = $1")
                    .bind(auth_id.clone())
                    .fetch_optional(&mut *conn)
                    .await?;
                if let Some(r) = row
                    && r.try_get::<i64, _>("approved")? == 1
                {
                    backed = true;
                    let approved: i64 = r.try_get("amount")?;
                    let on_auth =
                        Self::sum_settlements(conn, "authorization_id", auth_id, "capture").await?;
                    if on_auth > approved {
                        found.push((
                            "over_capture",
                            format!("{on_auth} captured on an authorization of {approved}"),
                        ));
                    }
                }
            }
        }
        if captured > card.spending_limit && !found.iter().any(|(k, _)| *k == "over_capture") {
            found.push((
                "over_capture",
                format!(
                    "{captured} captured on a card limited to {}",
                    card.spending_limit
                ),
            ));
        }
        let inactive =
            INACTIVE.contains(&card.intent_status.as_str()) || card.card_status == "canceled";
        if inactive && !backed {
            found.push((
                "capture_on_inactive_intent",
                format!(
                    "a capture on a card whose purchase is {} (card {})",
                    card.intent_status, card.card_status
                ),
            ));
        }
        let net = &t.merchant.network_id;
        let mismatch = match (&card.locked_network_id, net) {
            (Some(locked), Some(got)) if locked == got => false,
            (Some(_), _) => true,
            (None, _) => {
                match_descriptor(
                    &t.merchant.name,
                    t.merchant.url.as_deref(),
                    &card.merchant_name,
                    card.merchant_domain.as_deref(),
                )
                .basis
                    == MatchBasis::None
            }
        };
        if mismatch {
            found.push((
                "merchant_mismatch",
                format!(
                    "captured by {:?} ({}), purchase approved for {:?}",
                    t.merchant.name,
                    net.as_deref().unwrap_or("no network id"),
                    card.merchant_name
                ),
            ));
        }
        Ok(found)
    }

    /// `issuing_card.created` / `.updated`: the card's status; a card with Roony metadata
    /// the ledger does not know is adopted if its metadata verifies, else it is an
    /// `orphan_card`. `false` for a duplicate event.
    pub async fn apply_card(
        &self,
        event: &StripeEventMeta,
        card: &StripeCard,
        now: i64,
    ) -> Result<bool, DbError> {
        self.apply_card_as(event, card, now, &stripe_actor(event))
            .await
    }

    /// [`ControlDb::apply_card`] with another actor in the audit trail (reconciliation).
    pub async fn apply_card_as(
        &self,
        event: &StripeEventMeta,
        card: &StripeCard,
        now: i64,
        actor: &Actor,
    ) -> Result<bool, DbError> {
        let actor = actor.clone();
        let mut tx = self.tx().await?;
        if !Self::record_event(&mut tx, event, None, now).await? {
            return Ok(false);
        }
        let mut out = Outcome::default();
        if card.status.as_deref() == Some("canceled") {
            // A relay card counts at what it spent from now on (budget bounds at the relay).
            Self::relay_card_canceled_in(&mut tx, &card.id, now).await?;
        }
        let known = Self::ledger_card(&mut tx, &card.id).await?;
        let mut changed_intent = None;
        match known {
            Some(l) => {
                if let Some(status) = &card.status
                    && *status != l.card_status
                {
                    sqlx::query(
                        "UPDATE cards SET status = $1, updated_at = $2 WHERE stripe_card_id = $3",
                    )
                    .bind(status.clone())
                    .bind(now)
                    .bind(card.id.clone())
                    .execute(&mut *tx)
                    .await?;
                    Self::audit(
                        &mut tx,
                        &actor,
                        "card.status",
                        "card",
                        &card.id,
                        serde_json::json!({"event_id": event.id, "intent_id": l.owner.intent_id,
                            "from": l.card_status, "to": status}),
                        now,
                    )
                    .await?;
                    changed_intent = Some(l.owner.intent_id.clone());
                }
            }
            None if card.metadata.keys().any(|k| k.starts_with("roony_")) => {
                match Self::verify_card(&mut tx, card).await? {
                    Some(a) => {
                        Self::adopt(&mut tx, &card.id, &a, &actor, now).await?;
                        changed_intent = Some(a.owner.intent_id.clone());
                    }
                    None => {
                        out.froze |= Self::discrepancy(
                            &mut tx,
                            &actor,
                            NewDiscrepancy {
                                kind: "orphan_card",
                                owner: None,
                                card_id: &card.id,
                                object_id: &card.id,
                                amount: 0,
                                currency: "",
                                details: serde_json::json!({"event_id": event.id,
                                    "claimed_intent_id": card.metadata.get("roony_intent_id"),
                                    "claimed_agent_id": card.metadata.get("roony_agent_id"),
                                    "message": "a card carries roony metadata that does not verify"}),
                            },
                            now,
                        )
                        .await?;
                    }
                }
            }
            None => {}
        }
        if let Some(intent) = changed_intent
            && let Some(u) = Self::refresh_intent(&mut tx, &intent, now).await?
        {
            out.updates.push(u);
        }
        self.finish(tx, out).await?;
        Ok(true)
    }

    // ----- discrepancies -------------------------------------------------------------------

    /// Records a discrepancy (and its audit event); freezes the agent when its policy says
    /// so (`freeze_on_discrepancy`, default true). `true` if it froze the agent.
    pub(super) async fn discrepancy(
        conn: &mut sqlx::AnyConnection,
        actor: &Actor,
        d: NewDiscrepancy<'_>,
        now: i64,
    ) -> Result<bool, DbError> {
        let id = new_id("dsc");
        sqlx::query(
            "INSERT INTO discrepancies (id, kind, intent_id, stripe_card_id, agent_id, project_id, org_id, \
             stripe_object_id, amount, currency, details, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        )
        .bind(id.clone())
        .bind(d.kind)
        .bind(d.owner.map(|o| o.intent_id.clone()))
        .bind(d.card_id.to_string())
        .bind(d.owner.map(|o| o.agent_id.clone()))
        .bind(d.owner.map(|o| o.project_id.clone()))
        .bind(d.owner.map(|o| o.org_id.clone()))
        .bind(d.object_id.to_string())
        .bind(d.amount)
        .bind(Some(d.currency.to_ascii_uppercase()).filter(|c| !c.is_empty()))
        .bind(d.details.to_string())
        .bind(now)
        .execute(&mut *conn)
        .await?;
        Self::audit(
            conn,
            actor,
            "discrepancy.create",
            "discrepancy",
            &id,
            serde_json::json!({"kind": d.kind, "intent_id": d.owner.map(|o| &o.intent_id),
                "agent_id": d.owner.map(|o| &o.agent_id), "card_id": d.card_id,
                "stripe_object_id": d.object_id, "details": d.details}),
            now,
        )
        .await?;
        let Some(owner) = d.owner else {
            return Ok(false);
        };
        let row = sqlx::query(
            "SELECT a.status, r.document FROM agents a \
             LEFT JOIN policies p ON p.agent_id = a.id \
             LEFT JOIN policy_revisions r ON r.policy_id = p.id AND r.revision = p.current_revision \
             WHERE a.id = $1",
        )
        .bind(owner.agent_id.clone())
        .fetch_optional(&mut *conn)
        .await?;
        let Some(row) = row else {
            return Ok(false);
        };
        let status: String = row.try_get("status")?;
        let document: Option<String> = row.try_get("document")?;
        let freeze = document
            .and_then(|d| serde_json::from_str::<serde_json::Value>(&d).ok())
            .and_then(|v| v.get("freeze_on_discrepancy").and_then(|f| f.as_bool()))
            .unwrap_or(true);
        if !freeze || status != "active" {
            return Ok(false);
        }
        let reason = format!(
            "discrepancy {}: {} on purchase {}",
            d.kind, id, owner.intent_id
        );
        Self::set_frozen_in(conn, &owner.agent_id, Some(&reason), actor, now).await?;
        Ok(true)
    }

    pub async fn list_discrepancies(
        &self,
        filter: &DiscrepancyFilter,
        limit: i64,
        cursor: Option<Cursor>,
    ) -> Result<Page<Discrepancy>, DbError> {
        let mut w = Where::default();
        w.eq_text("kind", &filter.kind);
        w.eq_text("agent_id", &filter.agent_id);
        w.eq_text("project_id", &filter.project_id);
        w.eq_text("intent_id", &filter.intent_id);
        match filter.resolved {
            Some(true) => w.clauses.push("resolved_at IS NOT NULL".into()),
            Some(false) => w.clauses.push("resolved_at IS NULL".into()),
            None => {}
        }
        self.fetch_page(
            &format!("SELECT {DISCREPANCY_COLUMNS} FROM discrepancies"),
            w,
            limit,
            cursor,
            discrepancy_from_row,
            |d| Cursor {
                created_at: d.created_at,
                id: d.id.clone(),
            },
        )
        .await
    }

    /// Marks a discrepancy resolved. `Conflict` if it already is.
    pub async fn resolve_discrepancy(
        &self,
        id: &str,
        note: Option<&str>,
        actor: &Actor,
        now: i64,
    ) -> Result<Discrepancy, DbError> {
        let mut tx = self.tx().await?;
        let n = sqlx::query(
            "UPDATE discrepancies SET resolved_at = $1, resolved_by = $2, resolution_note = $3 \
             WHERE id = $4 AND resolved_at IS NULL",
        )
        .bind(now)
        .bind(actor.name.clone())
        .bind(note.map(str::to_string))
        .bind(id.to_string())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 0 {
            let exists = sqlx::query("SELECT id FROM discrepancies WHERE id = $1")
                .bind(id.to_string())
                .fetch_optional(&mut *tx)
                .await?;
            return Err(match exists {
                Some(_) => DbError::Conflict("the discrepancy is already resolved".into()),
                None => DbError::NotFound("discrepancy"),
            });
        }
        Self::audit(
            &mut tx,
            actor,
            "discrepancy.resolve",
            "discrepancy",
            id,
            serde_json::json!({"note": note}),
            now,
        )
        .await?;
        tx.commit().await?;
        let sql = format!("SELECT {DISCREPANCY_COLUMNS} FROM discrepancies WHERE id = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id.to_string())
            .fetch_one(&self.pool)
            .await?;
        discrepancy_from_row(&row)
    }

    pub async fn list_authorizations(
        &self,
        intent_id: Option<String>,
        card_id: Option<String>,
        limit: i64,
        cursor: Option<Cursor>,
    ) -> Result<Page<Authorization>, DbError> {
        let mut w = Where::default();
        w.eq_text("intent_id", &intent_id);
        w.eq_text("stripe_card_id", &card_id);
        self.fetch_page(
            &format!("SELECT {AUTHORIZATION_COLUMNS} FROM authorizations"),
            w,
            limit,
            cursor,
            authorization_from_row,
            |a| Cursor {
                created_at: a.created_at,
                id: a.id.clone(),
            },
        )
        .await
    }

    // ----- the updates feed ----------------------------------------------------------------

    /// Recomputes an intent's money state from its authorizations and settlements, stores
    /// it (and `settled` when the card is closed after a capture), and returns the update
    /// to publish (seq filled in by [`ControlDb::finish`]).
    pub(super) async fn refresh_intent(
        conn: &mut sqlx::AnyConnection,
        intent_id: &str,
        now: i64,
    ) -> Result<Option<(String, IntentUpdate)>, DbError> {
        let Some(intent) =
            sqlx::query("SELECT agent_id, project_id, status FROM intents WHERE id = $1")
                .bind(intent_id.to_string())
                .fetch_optional(&mut *conn)
                .await?
        else {
            return Ok(None);
        };
        let agent_id: String = intent.try_get("agent_id")?;
        let project_id: String = intent.try_get("project_id")?;
        let status: String = intent.try_get("status")?;
        let card_status: Option<String> = sqlx::query(
            "SELECT status FROM cards WHERE intent_id = $1 ORDER BY created_at DESC, id DESC LIMIT 1",
        )
        .bind(intent_id.to_string())
        .fetch_optional(&mut *conn)
        .await?
        .map(|r| r.try_get("status"))
        .transpose()?;
        let sql = format!(
            "SELECT {AUTHORIZATION_COLUMNS} FROM authorizations WHERE intent_id = $1 ORDER BY created_at, id"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(intent_id.to_string())
            .fetch_all(&mut *conn)
            .await?;
        let mut authorizations = Vec::with_capacity(rows.len());
        let mut pending = 0i64;
        for r in &rows {
            let a = authorization_from_row(r)?;
            if a.approved && a.status == "pending" {
                pending = pending.saturating_add(a.amount);
            }
            authorizations.push(AuthorizationSnapshot {
                id: a.id,
                amount: a.amount,
                currency: a.currency,
                approved: a.approved,
                status: a.status,
                merchant_name: a.merchant_name,
                merchant_country: a.merchant_country,
                merchant_category: a.merchant_category,
                reasons: a.reasons,
                created_at: a.created_at,
            });
        }
        let sums = sqlx::query(
            "SELECT kind, CAST(SUM(amount) AS BIGINT) AS total FROM settlements WHERE intent_id = $1 GROUP BY kind",
        )
        .bind(intent_id.to_string())
        .fetch_all(&mut *conn)
        .await?;
        let (mut captured, mut refunded) = (0i64, 0i64);
        for r in &sums {
            let kind: String = r.try_get("kind")?;
            let total: i64 = r.try_get("total")?;
            if kind == "capture" {
                captured = total;
            } else {
                refunded = total;
            }
        }
        let kinds = sqlx::query(
            "SELECT DISTINCT kind FROM discrepancies WHERE intent_id = $1 ORDER BY kind",
        )
        .bind(intent_id.to_string())
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|r| r.try_get::<String, _>("kind"))
        .collect::<Result<Vec<_>, _>>()?;
        let closed = card_status.as_deref() == Some("canceled") && pending == 0;
        let settle = closed
            && captured > 0
            && ["approved", "issuing", "canceled", "expired"].contains(&status.as_str());
        sqlx::query(
            "UPDATE intents SET captured = $1, refunded = $2, pending = $3, \
             status = CASE WHEN $4 = 1 THEN 'settled' ELSE status END, updated_at = $5 WHERE id = $6",
        )
        .bind(captured)
        .bind(refunded)
        .bind(pending)
        .bind(i64::from(settle))
        .bind(now)
        .bind(intent_id.to_string())
        .execute(&mut *conn)
        .await?;
        Ok(Some((
            project_id,
            IntentUpdate {
                seq: 0,
                intent_id: intent_id.to_string(),
                agent_id,
                card_status,
                authorizations,
                captured,
                refunded,
                pending,
                closed,
                discrepancies: kinds,
            },
        )))
    }

    /// Numbers and stores the updates, bumps the configuration revision if an agent was
    /// frozen, commits, and wakes waiting requests.
    pub(super) async fn finish(
        &self,
        mut tx: sqlx::Transaction<'static, sqlx::Any>,
        out: Outcome,
    ) -> Result<(), DbError> {
        let mut last = None;
        if !out.updates.is_empty() {
            let n = i64::try_from(out.updates.len()).unwrap_or(i64::MAX);
            let top: i64 = sqlx::query(
                "UPDATE intent_update_seq SET seq = seq + $1 WHERE id = 1 RETURNING seq",
            )
            .bind(n)
            .fetch_one(&mut *tx)
            .await?
            .try_get("seq")?;
            let mut seq = top - n;
            for (project_id, mut update) in out.updates {
                seq += 1;
                update.seq = seq;
                sqlx::query(
                    "INSERT INTO intent_updates (seq, project_id, intent_id, payload, created_at) VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(seq)
                .bind(project_id)
                .bind(update.intent_id.clone())
                .bind(json_text(&update)?)
                .bind(super::super::unix_now())
                .execute(&mut *tx)
                .await?;
            }
            last = Some(top);
        }
        if out.froze {
            self.commit_config(tx).await?;
        } else {
            tx.commit().await?;
        }
        if let Some(top) = last {
            self.updates.send_replace(top);
        }
        Ok(())
    }

    /// The project's updates after `after`, oldest first, at most `limit`.
    pub async fn list_intent_updates(
        &self,
        project_id: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<IntentUpdate>, DbError> {
        let rows = sqlx::query(
            "SELECT payload FROM intent_updates WHERE project_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        )
        .bind(project_id.to_string())
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| parse_json(&r.try_get::<String, _>("payload")?))
            .collect()
    }
}

const AUTHORIZATION_COLUMNS: &str = "id, stripe_card_id, intent_id, agent_id, project_id, org_id, amount, currency, approved, \
     status, merchant_name, merchant_city, merchant_country, merchant_category, merchant_network_id, reasons, decided_by, \
     created_at, updated_at";
const DISCREPANCY_COLUMNS: &str = "id, kind, intent_id, stripe_card_id, agent_id, project_id, org_id, stripe_object_id, \
     amount, currency, details, created_at, resolved_at, resolved_by, resolution_note";

fn authorization_from_row(r: &AnyRow) -> Result<Authorization, DbError> {
    Ok(Authorization {
        id: r.try_get("id")?,
        card_id: r.try_get("stripe_card_id")?,
        intent_id: r.try_get("intent_id")?,
        agent_id: r.try_get("agent_id")?,
        project_id: r.try_get("project_id")?,
        org_id: r.try_get("org_id")?,
        amount: r.try_get("amount")?,
        currency: r.try_get("currency")?,
        approved: r.try_get::<i64, _>("approved")? == 1,
        status: r.try_get("status")?,
        merchant_name: r.try_get("merchant_name")?,
        merchant_city: r.try_get("merchant_city")?,
        merchant_country: r.try_get("merchant_country")?,
        merchant_category: r.try_get("merchant_category")?,
        merchant_network_id: r.try_get("merchant_network_id")?,
        reasons: parse_json(&r.try_get::<String, _>("reasons")?)?,
        decided_by: r.try_get("decided_by")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

fn discrepancy_from_row(r: &AnyRow) -> Result<Discrepancy, DbError> {
    Ok(Discrepancy {
        id: r.try_get("id")?,
        kind: r.try_get("kind")?,
        intent_id: r.try_get("intent_id")?,
        card_id: r.try_get("stripe_card_id")?,
        agent_id: r.try_get("agent_id")?,
        project_id: r.try_get("project_id")?,
        org_id: r.try_get("org_id")?,
        stripe_object_id: r.try_get("stripe_object_id")?,
        amount: r.try_get("amount")?,
        currency: r.try_get("currency")?,
        details: parse_json(&r.try_get::<String, _>("details")?)?,
        created_at: r.try_get("created_at")?,
        resolved_at: r.try_get("resolved_at")?,
        resolved_by: r.try_get("resolved_by")?,
        resolution_note: r.try_get("resolution_note")?,
    })
}

/// The earlier of two optional expiries (a card issued through the relay expires when the
/// relay said, whatever its sidecar reported about the intent).
fn earliest(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    a.into_iter().chain(b).min()
}
