//! Stripe credentials of organizations (`stripe_connections`) and the single-use OAuth
//! states of connections being made (`oauth_states`). Tokens arrive here already sealed
//! (`crate::control::secrets`); this module never sees plaintext credentials. Every change
//! and its audit event are one transaction, and bumps the configuration revision (the
//! connection's status travels in the sync bundle).

use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Actor, ControlDb, DbError};
use crate::control::model::StripeEventMeta;

/// A stored connection (tokens sealed).
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectionRow {
    pub org_id: String,
    /// `connect` or `direct`.
    pub mode: String,
    pub account_id: Option<String>,
    /// Sealed access token.
    pub access_token: Option<String>,
    /// Sealed refresh token.
    pub refresh_token: Option<String>,
    pub key_id: Option<String>,
    pub scope: Option<String>,
    pub livemode: bool,
    /// `connected` or `disconnected`.
    pub status: String,
    pub connected_at: Option<i64>,
    pub refreshed_at: Option<i64>,
    pub disconnected_at: Option<i64>,
    pub disconnect_reason: Option<String>,
}

impl std::fmt::Debug for ConnectionRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionRow")
            .field("org_id", &self.org_id)
            .field("mode", &self.mode)
            .field("account_id", &self.account_id)
            .field("key_id", &self.key_id)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

/// Sealed tokens to store after an exchange or a refresh.
#[derive(Clone)]
pub struct StoredTokens {
    pub account_id: String,
    pub access_token: String,
    pub refresh_token: Option<String>,
    pub key_id: String,
    pub scope: Option<String>,
    pub livemode: bool,
}

impl std::fmt::Debug for StoredTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredTokens")
            .field("account_id", &self.account_id)
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

fn connection(r: &AnyRow) -> Result<ConnectionRow, DbError> {
    Ok(ConnectionRow {
        org_id: r.try_get("org_id")?,
        mode: r.try_get("mode")?,
        account_id: r.try_get("account_id")?,
        access_token: r.try_get("access_token")?,
        refresh_token: r.try_get("refresh_token")?,
        key_id: r.try_get("key_id")?,
        scope: r.try_get("scope")?,
        livemode: r.try_get::<i64, _>("livemode")? != 0,
        status: r.try_get("status")?,
        connected_at: r.try_get("connected_at")?,
        refreshed_at: r.try_get("refreshed_at")?,
        disconnected_at: r.try_get("disconnected_at")?,
        disconnect_reason: r.try_get("disconnect_reason")?,
    })
}

const COLUMNS: &str = "org_id, mode, account_id, access_token, refresh_token, key_id, scope, \
    livemode, status, connected_at, refreshed_at, disconnected_at, disconnect_reason";

/// The sealed values of one stored connection (rotation reports and resealing).
#[derive(Clone, PartialEq, Eq)]
pub struct SealedRow {
    pub org_id: String,
    /// The key id the row says sealed it.
    pub key_id: Option<String>,
    pub access_token: Option<String>,
    pub refresh_token: Option<String>,
}

impl std::fmt::Debug for SealedRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedRow")
            .field("org_id", &self.org_id)
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// A row's values sealed again with the current key; `old` is what was read (the update
/// applies only if the row still holds it).
#[derive(Clone)]
pub struct ResealedRow {
    pub old: SealedRow,
    pub access_token: Option<String>,
    pub refresh_token: Option<String>,
    pub key_id: String,
}

impl ControlDb {
    /// Every stored connection holding a sealed value, by organization.
    pub async fn sealed_stripe_tokens(&self) -> Result<Vec<SealedRow>, DbError> {
        let rows = sqlx::query(
            "SELECT org_id, key_id, access_token, refresh_token FROM stripe_connections \
             WHERE access_token IS NOT NULL OR refresh_token IS NOT NULL ORDER BY org_id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(SealedRow {
                    org_id: r.try_get("org_id")?,
                    key_id: r.try_get("key_id")?,
                    access_token: r.try_get("access_token")?,
                    refresh_token: r.try_get("refresh_token")?,
                })
            })
            .collect()
    }

    /// Stores resealed values, all rows in one transaction with one audit event
    /// (`secrets.reseal`). A row that changed since it was read (a connect, refresh or
    /// disconnect meanwhile) aborts everything: `Conflict`.
    pub async fn reseal_stripe_tokens(
        &self,
        rows: &[ResealedRow],
        actor: &Actor,
        now: i64,
    ) -> Result<(), DbError> {
        let mut tx = self.tx().await?;
        let mut from: std::collections::BTreeMap<String, u64> = Default::default();
        for r in rows {
            let n = sqlx::query(
                "UPDATE stripe_connections SET access_token = $1, refresh_token = $2, key_id = $3, \
                 updated_at = $4 WHERE org_id = $5 AND COALESCE(access_token, '') = $6 \
                 AND COALESCE(refresh_token, '') = $7",
            )
            .bind(r.access_token.clone())
            .bind(r.refresh_token.clone())
            .bind(r.key_id.clone())
            .bind(now)
            .bind(r.old.org_id.clone())
            .bind(r.old.access_token.clone().unwrap_or_default())
            .bind(r.old.refresh_token.clone().unwrap_or_default())
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if n != 1 {
                tx.rollback().await?;
                return Err(DbError::Conflict(format!(
                    "the stripe connection of {} changed meanwhile; run it again",
                    r.old.org_id
                )));
            }
            *from
                .entry(r.old.key_id.clone().unwrap_or_else(|| "(none)".into()))
                .or_default() += 1;
        }
        let key_id = rows.first().map(|r| r.key_id.clone()).unwrap_or_default();
        Self::audit(
            &mut tx,
            actor,
            "secrets.reseal",
            "secrets_key",
            &key_id,
            serde_json::json!({"rows": rows.len(), "key_id": key_id, "from": from,
                "organizations": rows.iter().map(|r| r.old.org_id.clone()).collect::<Vec<_>>()}),
            now,
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Replaces the Stripe credentials (see `connect::ControlDb::with_stripe_credentials`).
    pub(crate) fn set_stripe_setup(mut self, setup: crate::control::connect::StripeSetup) -> Self {
        self.stripe_setup = std::sync::Arc::new(setup);
        self
    }

    /// The Stripe credentials and secrets key of this control plane.
    pub fn stripe_setup(&self) -> &crate::control::connect::StripeSetup {
        &self.stripe_setup
    }

    /// Records a new OAuth state (hashes only) and drops expired ones.
    pub async fn insert_oauth_state(
        &self,
        state_hash: &str,
        org_id: &str,
        session_hash: &str,
        now: i64,
        expires_at: i64,
    ) -> Result<(), DbError> {
        let mut tx = self.tx().await?;
        sqlx::query("DELETE FROM oauth_states WHERE expires_at < $1")
            .bind(now - 86_400)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO oauth_states (state_hash, org_id, session_hash, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(state_hash.to_string())
        .bind(org_id.to_string())
        .bind(session_hash.to_string())
        .bind(now)
        .bind(expires_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Uses the state: `true` only if it exists, belongs to `org_id` and `session_hash`, is
    /// unexpired and unused — and then it is used, atomically (a second call is `false`).
    pub async fn consume_oauth_state(
        &self,
        state_hash: &str,
        org_id: &str,
        session_hash: &str,
        now: i64,
    ) -> Result<bool, DbError> {
        let n = sqlx::query(
            "UPDATE oauth_states SET used_at = $1 WHERE state_hash = $2 AND org_id = $3 \
             AND session_hash = $4 AND used_at IS NULL AND expires_at > $1",
        )
        .bind(now)
        .bind(state_hash.to_string())
        .bind(org_id.to_string())
        .bind(session_hash.to_string())
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    /// The organization's stored connection, if any.
    pub async fn stripe_connection(&self, org_id: &str) -> Result<Option<ConnectionRow>, DbError> {
        let sql = format!("SELECT {COLUMNS} FROM stripe_connections WHERE org_id = $1");
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(org_id.to_string())
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(connection)
            .transpose()
    }

    /// Stores the tokens of a completed OAuth flow (`stripe.connect`) or a refresh
    /// (`stripe.refresh`), audited in the same transaction.
    pub async fn store_stripe_tokens(
        &self,
        org_id: &str,
        tokens: &StoredTokens,
        refreshed: bool,
        actor: &Actor,
        now: i64,
    ) -> Result<ConnectionRow, DbError> {
        let mut tx = self.tx().await?;
        if refreshed {
            let n = sqlx::query(
                "UPDATE stripe_connections SET access_token = $1, \
                 refresh_token = COALESCE($2, refresh_token), key_id = $3, \
                 scope = COALESCE($4, scope), livemode = $5, refreshed_at = $6, updated_at = $6 \
                 WHERE org_id = $7 AND status = 'connected' AND account_id = $8",
            )
            .bind(tokens.access_token.clone())
            .bind(tokens.refresh_token.clone())
            .bind(tokens.key_id.clone())
            .bind(tokens.scope.clone())
            .bind(i64::from(tokens.livemode))
            .bind(now)
            .bind(org_id.to_string())
            .bind(tokens.account_id.clone())
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if n == 0 {
                return Err(DbError::NotFound("stripe connection"));
            }
        } else {
            // A connected organization is never replaced: it must be disconnected first.
            let n = sqlx::query(
                "INSERT INTO stripe_connections (org_id, mode, account_id, access_token, \
                 refresh_token, key_id, scope, livemode, status, connected_at, refreshed_at, \
                 disconnected_at, disconnect_reason, updated_at) \
                 VALUES ($1, 'connect', $2, $3, $4, $5, $6, $7, 'connected', $8, NULL, NULL, NULL, $8) \
                 ON CONFLICT (org_id) DO UPDATE SET mode = 'connect', account_id = $2, \
                 access_token = $3, refresh_token = $4, key_id = $5, scope = $6, livemode = $7, \
                 status = 'connected', connected_at = $8, refreshed_at = NULL, \
                 disconnected_at = NULL, disconnect_reason = NULL, updated_at = $8 \
                 WHERE stripe_connections.status <> 'connected'",
            )
            .bind(org_id.to_string())
            .bind(tokens.account_id.clone())
            .bind(tokens.access_token.clone())
            .bind(tokens.refresh_token.clone())
            .bind(tokens.key_id.clone())
            .bind(tokens.scope.clone())
            .bind(i64::from(tokens.livemode))
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if n == 0 {
                return Err(DbError::Conflict(
                    "the organization already has a connected stripe account".into(),
                ));
            }
        }
        Self::audit(
            &mut tx,
            actor,
            if refreshed {
                "stripe.refresh"
            } else {
                "stripe.connect"
            },
            "organization",
            org_id,
            serde_json::json!({"account_id": tokens.account_id, "key_id": tokens.key_id,
                "scope": tokens.scope, "livemode": tokens.livemode}),
            now,
        )
        .await?;
        self.commit_config(tx).await?;
        self.stripe_connection(org_id)
            .await?
            .ok_or(DbError::NotFound("stripe connection"))
    }

    /// Marks the organization's connection disconnected (tokens erased), audited;
    /// `false` if it was not connected (nothing changes).
    pub async fn disconnect_stripe(
        &self,
        org_id: &str,
        reason: &str,
        actor: &Actor,
        now: i64,
    ) -> Result<bool, DbError> {
        let mut tx = self.tx().await?;
        let changed = Self::disconnect_in(
            &mut tx,
            org_id,
            None,
            reason,
            actor,
            now,
            serde_json::json!({}),
        )
        .await?;
        if changed {
            self.commit_config(tx).await?;
        } else {
            tx.commit().await?;
        }
        Ok(changed)
    }

    /// [`ControlDb::disconnect_stripe`] of one connection only: the one to `account_id`
    /// made at `connected_at` (a newer connection is left alone).
    pub async fn disconnect_stripe_connection(
        &self,
        org_id: &str,
        account_id: &str,
        connected_at: i64,
        reason: &str,
        actor: &Actor,
        now: i64,
    ) -> Result<bool, DbError> {
        let mut tx = self.tx().await?;
        let changed = Self::disconnect_in(
            &mut tx,
            org_id,
            Some((account_id, Some(connected_at))),
            reason,
            actor,
            now,
            serde_json::json!({"account_id": account_id}),
        )
        .await?;
        if changed {
            self.commit_config(tx).await?;
        } else {
            tx.commit().await?;
        }
        Ok(changed)
    }

    /// An audited note about the organization's Stripe connection (e.g. what Stripe answered
    /// to a deauthorization).
    pub async fn record_stripe_note(
        &self,
        org_id: &str,
        action: &str,
        success: bool,
        details: serde_json::Value,
        actor: &Actor,
        now: i64,
    ) -> Result<(), DbError> {
        let mut tx = self.tx().await?;
        Self::audit_outcome(
            &mut tx,
            actor,
            action,
            ("organization", org_id),
            if success { "success" } else { "failure" },
            details,
            now,
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Disconnects the organization's connection — only the one to an account (and, if
    /// given, connected at or before a time) when `connection` says so.
    #[allow(clippy::too_many_arguments)]
    async fn disconnect_in(
        conn: &mut sqlx::AnyConnection,
        org_id: &str,
        connection: Option<(&str, Option<i64>)>,
        reason: &str,
        actor: &Actor,
        now: i64,
        details: serde_json::Value,
    ) -> Result<bool, DbError> {
        const SET: &str = "UPDATE stripe_connections SET status = 'disconnected', \
             access_token = NULL, refresh_token = NULL, disconnected_at = $1, \
             disconnect_reason = $2, updated_at = $1 WHERE org_id = $3 AND status = 'connected'";
        let n = match connection {
            Some((account, Some(connected_by))) => {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "{SET} AND account_id = $4 AND connected_at <= $5"
                )))
                .bind(now)
                .bind(reason.to_string())
                .bind(org_id.to_string())
                .bind(account.to_string())
                .bind(connected_by)
                .execute(&mut *conn)
                .await?
            }
            Some((account, None)) => {
                sqlx::query(sqlx::AssertSqlSafe(format!("{SET} AND account_id = $4")))
                    .bind(now)
                    .bind(reason.to_string())
                    .bind(org_id.to_string())
                    .bind(account.to_string())
                    .execute(&mut *conn)
                    .await?
            }
            None => {
                sqlx::query(SET)
                    .bind(now)
                    .bind(reason.to_string())
                    .bind(org_id.to_string())
                    .execute(&mut *conn)
                    .await?
            }
        }
        .rows_affected();
        if n == 0 {
            return Ok(false);
        }
        let mut details = details;
        if let Some(map) = details.as_object_mut() {
            map.insert("reason".into(), serde_json::json!(reason));
        }
        Self::audit(
            conn,
            actor,
            "stripe.disconnect",
            "organization",
            org_id,
            details,
            now,
        )
        .await?;
        Ok(true)
    }

    /// `account.application.deauthorized`: every connection to `account_id` made at or
    /// before the event's `created` becomes disconnected (`deauthorized`), once per event
    /// id; a connection made after the event (a late event about an earlier connection) is
    /// left alone. `false` for a duplicate event.
    pub async fn apply_deauthorized(
        &self,
        event: &StripeEventMeta,
        account_id: &str,
        now: i64,
    ) -> Result<bool, DbError> {
        let mut tx = self.tx().await?;
        let fresh = sqlx::query(
            "INSERT INTO stripe_events (id, type, account, created, received_at, response) \
             VALUES ($1, $2, $3, $4, $5, NULL) ON CONFLICT (id) DO NOTHING",
        )
        .bind(event.id.clone())
        .bind(event.kind.clone())
        .bind(event.account.clone())
        .bind(event.created)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !fresh {
            tx.commit().await?;
            return Ok(false);
        }
        let orgs: Vec<String> = sqlx::query(
            "SELECT org_id FROM stripe_connections WHERE account_id = $1 AND status = 'connected' \
             AND connected_at <= $2 ORDER BY org_id",
        )
        .bind(account_id.to_string())
        .bind(event.created)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| r.try_get::<String, _>("org_id"))
        .collect::<Result<_, _>>()?;
        let actor = Actor {
            kind: "stripe",
            id: account_id.to_string(),
            name: "stripe".into(),
            request_id: Some(event.id.clone()),
        };
        let mut changed = false;
        for org in &orgs {
            changed |= Self::disconnect_in(
                &mut tx,
                org,
                Some((account_id, Some(event.created))),
                "deauthorized",
                &actor,
                now,
                serde_json::json!({"event_id": event.id, "account_id": account_id}),
            )
            .await?;
        }
        if changed {
            self.commit_config(tx).await?;
        } else {
            tx.commit().await?;
        }
        Ok(true)
    }
}
