//! Admin users of the dashboard (argon2id PHC strings, roles) and their sessions (SHA-256
//! of the cookie secret only). Hashing and verification happen in
//! `control::dashboard::auth`; this module stores what it is given.

use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Actor, ControlDb, DbError};

/// What the dashboard may do for a user.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything.
    Admin,
    /// Reads everything, changes nothing.
    Viewer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Viewer => "viewer",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "viewer" => Some(Role::Viewer),
            _ => None,
        }
    }
}

/// An admin user (never the password hash).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct AdminUser {
    pub id: String,
    pub email: String,
    pub name: String,
    pub role: Role,
    pub created_at: i64,
    pub disabled_at: Option<i64>,
}

/// A live session with its user.
#[derive(Clone, Debug)]
pub struct SessionRecord {
    pub id: String,
    pub token_hash: String,
    pub user: AdminUser,
    pub created_at: i64,
    pub last_seen_at: i64,
    pub expires_at: i64,
}

const USER_COLUMNS: &str = "id, email, name, role, created_at, disabled_at";

fn user_from_row(r: &AnyRow) -> Result<AdminUser, DbError> {
    let role: String = r.try_get("role")?;
    Ok(AdminUser {
        id: r.try_get("id")?,
        email: r.try_get("email")?,
        name: r.try_get("name")?,
        role: Role::parse(&role).ok_or_else(|| DbError::Corrupt(format!("admin role {role}")))?,
        created_at: r.try_get("created_at")?,
        disabled_at: r.try_get("disabled_at")?,
    })
}

/// Normalized form of an email address (the unique key of a user).
pub fn normalize_email(email: &str) -> String {
    email.trim().to_lowercase()
}

impl ControlDb {
    /// Records the first use of a one-use form's nonce (only its SHA-256 is stored):
    /// `true` the first time, `false` when it was submitted before.
    pub async fn use_form_nonce(
        &self,
        nonce: &str,
        user_id: &str,
        now: i64,
    ) -> Result<bool, DbError> {
        sqlx::query("DELETE FROM form_nonces WHERE created_at < $1")
            .bind(now.saturating_sub(86_400))
            .execute(&self.pool)
            .await?;
        let hash = crate::auth::hash(nonce);
        match sqlx::query(
            "INSERT INTO form_nonces (nonce_hash, user_id, created_at) VALUES ($1, $2, $3)",
        )
        .bind(hash)
        .bind(user_id.to_string())
        .bind(now)
        .execute(&self.pool)
        .await
        {
            Ok(_) => Ok(true),
            Err(e) => match DbError::from(e) {
                DbError::Conflict(_) => Ok(false),
                other => Err(other),
            },
        }
    }

    /// Number of enabled admin users with a password.
    pub async fn count_admin_users(&self) -> Result<i64, DbError> {
        let n: i64 = sqlx::query(
            "SELECT COUNT(*) AS n FROM admin_users WHERE disabled_at IS NULL AND password_hash IS NOT NULL AND role = 'admin'",
        )
        .fetch_one(&self.pool)
        .await?
        .try_get("n")?;
        Ok(n)
    }

    /// Creates an admin user of the default organization (audit `admin_user.create`).
    /// `Conflict` when the email is taken.
    pub async fn create_admin_user(
        &self,
        email: &str,
        name: &str,
        role: Role,
        password_hash: &str,
        actor: &Actor,
        now: i64,
    ) -> Result<AdminUser, DbError> {
        let user = AdminUser {
            id: crate::service::ids::new_id("usr"),
            email: normalize_email(email),
            name: name.trim().to_string(),
            role,
            created_at: now,
            disabled_at: None,
        };
        let org = self.default_org().await?.map(|o| o.id);
        let mut tx = self.tx().await?;
        let taken = sqlx::query("SELECT id FROM admin_users WHERE email = $1")
            .bind(user.email.clone())
            .fetch_optional(&mut *tx)
            .await?;
        if taken.is_some() {
            return Err(DbError::Conflict(format!(
                "an admin user with email {} exists",
                user.email
            )));
        }
        sqlx::query(
            "INSERT INTO admin_users (id, org_id, email, name, password_hash, created_at, disabled_at, role, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, NULL, $7, $6)",
        )
        .bind(user.id.clone())
        .bind(org)
        .bind(user.email.clone())
        .bind(user.name.clone())
        .bind(password_hash.to_string())
        .bind(now)
        .bind(role.as_str())
        .execute(&mut *tx)
        .await?;
        Self::audit(
            &mut tx,
            actor,
            "admin_user.create",
            "admin_user",
            &user.id,
            serde_json::json!({"email": user.email, "role": role.as_str()}),
            now,
        )
        .await?;
        tx.commit().await?;
        Ok(user)
    }

    /// Every admin user, oldest first.
    pub async fn list_admin_users(&self) -> Result<Vec<AdminUser>, DbError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {USER_COLUMNS} FROM admin_users ORDER BY created_at, id"
        )))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(user_from_row).collect()
    }

    pub async fn get_admin_user(&self, id: &str) -> Result<AdminUser, DbError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {USER_COLUMNS} FROM admin_users WHERE id = $1"
        )))
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?
        .ok_or(DbError::NotFound("admin user"))?;
        user_from_row(&row)
    }

    /// The user with this email and its password hash (for sign-in), if it exists.
    pub async fn admin_user_for_login(
        &self,
        email: &str,
    ) -> Result<Option<(AdminUser, Option<String>)>, DbError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {USER_COLUMNS}, password_hash FROM admin_users WHERE email = $1"
        )))
        .bind(normalize_email(email))
        .fetch_optional(&self.pool)
        .await?;
        match row {
            None => Ok(None),
            Some(r) => Ok(Some((user_from_row(&r)?, r.try_get("password_hash")?))),
        }
    }

    /// Replaces a user's password hash and ends its other sessions (audit
    /// `admin_user.password`).
    pub async fn set_admin_password(
        &self,
        user_id: &str,
        password_hash: &str,
        keep_session: Option<&str>,
        actor: &Actor,
        now: i64,
    ) -> Result<(), DbError> {
        let mut tx = self.tx().await?;
        let n =
            sqlx::query("UPDATE admin_users SET password_hash = $1, updated_at = $2 WHERE id = $3")
                .bind(password_hash.to_string())
                .bind(now)
                .bind(user_id.to_string())
                .execute(&mut *tx)
                .await?
                .rows_affected();
        if n == 0 {
            return Err(DbError::NotFound("admin user"));
        }
        sqlx::query(
            "UPDATE admin_sessions SET revoked_at = $1 WHERE user_id = $2 AND revoked_at IS NULL AND id <> $3",
        )
        .bind(now)
        .bind(user_id.to_string())
        .bind(keep_session.unwrap_or("").to_string())
        .execute(&mut *tx)
        .await?;
        Self::audit(
            &mut tx,
            actor,
            "admin_user.password",
            "admin_user",
            user_id,
            serde_json::json!({}),
            now,
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Changes a user's role, or disables/enables it (disabling ends its sessions). Refuses
    /// to leave no enabled `admin` (`Conflict`). Audit `admin_user.update`.
    pub async fn update_admin_user(
        &self,
        user_id: &str,
        role: Role,
        disabled: bool,
        actor: &Actor,
        now: i64,
    ) -> Result<AdminUser, DbError> {
        let mut tx = self.tx().await?;
        // Serialize with other role changes (a no-op update locks the enabled admins on
        // PostgreSQL; SQLite's write transactions are serial anyway), so two admins
        // demoting each other at once cannot leave none.
        sqlx::query(
            "UPDATE admin_users SET role = role WHERE role = 'admin' AND disabled_at IS NULL",
        )
        .execute(&mut *tx)
        .await?;
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {USER_COLUMNS} FROM admin_users WHERE id = $1"
        )))
        .bind(user_id.to_string())
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(DbError::NotFound("admin user"))?;
        let mut user = user_from_row(&row)?;
        if role != Role::Admin || disabled {
            let others: i64 = sqlx::query(
                "SELECT COUNT(*) AS n FROM admin_users WHERE role = 'admin' AND disabled_at IS NULL \
                 AND password_hash IS NOT NULL AND id <> $1",
            )
            .bind(user_id.to_string())
            .fetch_one(&mut *tx)
            .await?
            .try_get("n")?;
            if others == 0 {
                return Err(DbError::Conflict(
                    "this is the last enabled admin; make another user admin first".into(),
                ));
            }
        }
        let disabled_at = if disabled {
            Some(user.disabled_at.unwrap_or(now))
        } else {
            None
        };
        sqlx::query(
            "UPDATE admin_users SET role = $1, disabled_at = $2, updated_at = $3 WHERE id = $4",
        )
        .bind(role.as_str())
        .bind(disabled_at)
        .bind(now)
        .bind(user_id.to_string())
        .execute(&mut *tx)
        .await?;
        if disabled {
            sqlx::query(
                "UPDATE admin_sessions SET revoked_at = $1 WHERE user_id = $2 AND revoked_at IS NULL",
            )
            .bind(now)
            .bind(user_id.to_string())
            .execute(&mut *tx)
            .await?;
        }
        Self::audit(
            &mut tx,
            actor,
            "admin_user.update",
            "admin_user",
            user_id,
            serde_json::json!({"role": role.as_str(), "disabled": disabled}),
            now,
        )
        .await?;
        tx.commit().await?;
        user.role = role;
        user.disabled_at = disabled_at;
        Ok(user)
    }

    /// Records a sign-in: a new session (audit `admin_session.create`).
    #[allow(clippy::too_many_arguments)]
    pub async fn create_admin_session(
        &self,
        id: &str,
        token_hash: &str,
        user: &AdminUser,
        expires_at: i64,
        user_agent: Option<&str>,
        address: Option<&str>,
        now: i64,
    ) -> Result<(), DbError> {
        let mut tx = self.tx().await?;
        sqlx::query(
            "INSERT INTO admin_sessions (id, user_id, token_hash, created_at, last_seen_at, expires_at, revoked_at, user_agent, address) \
             VALUES ($1, $2, $3, $4, $4, $5, NULL, $6, $7)",
        )
        .bind(id.to_string())
        .bind(user.id.clone())
        .bind(token_hash.to_string())
        .bind(now)
        .bind(expires_at)
        .bind(user_agent.map(|s| s.chars().take(200).collect::<String>()))
        .bind(address.map(str::to_string))
        .execute(&mut *tx)
        .await?;
        let actor = user_actor(user, None);
        Self::audit(
            &mut tx,
            &actor,
            "admin_session.create",
            "admin_session",
            id,
            serde_json::json!({"address": address}),
            now,
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records a refused sign-in (audit `admin_session.sign_in_failed`, outcome `failure`):
    /// the e-mail as typed (normalized, at most 320 characters; never the password), the
    /// client's address and why (`invalid_credentials` or `rate_limited`).
    pub async fn audit_failed_sign_in(
        &self,
        email: &str,
        address: Option<&str>,
        reason: &str,
        now: i64,
    ) -> Result<(), DbError> {
        let email: String = normalize_email(email).chars().take(320).collect();
        let mut tx = self.tx().await?;
        let actor = Actor {
            kind: "anonymous",
            id: address.unwrap_or("unknown").to_string(),
            name: "anonymous".into(),
            request_id: None,
        };
        Self::audit_outcome(
            &mut tx,
            &actor,
            "admin_session.sign_in_failed",
            ("admin_user", &email),
            "failure",
            serde_json::json!({"email": email, "address": address, "reason": reason}),
            now,
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// A session that is not revoked, not expired and whose user is enabled.
    pub async fn find_admin_session(
        &self,
        id: &str,
        now: i64,
    ) -> Result<Option<SessionRecord>, DbError> {
        let row = sqlx::query(
            "SELECT s.id AS sid, s.token_hash, s.created_at AS s_created, s.last_seen_at, s.expires_at, \
             u.id, u.email, u.name, u.role, u.created_at, u.disabled_at \
             FROM admin_sessions s JOIN admin_users u ON u.id = s.user_id \
             WHERE s.id = $1 AND s.revoked_at IS NULL AND s.expires_at > $2 AND u.disabled_at IS NULL",
        )
        .bind(id.to_string())
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        let Some(r) = row else { return Ok(None) };
        Ok(Some(SessionRecord {
            id: r.try_get("sid")?,
            token_hash: r.try_get("token_hash")?,
            user: user_from_row(&r)?,
            created_at: r.try_get("s_created")?,
            last_seen_at: r.try_get("last_seen_at")?,
            expires_at: r.try_get("expires_at")?,
        }))
    }

    /// Slides a session's idle expiry (not audited; at most once a minute per session).
    pub async fn touch_admin_session(
        &self,
        id: &str,
        expires_at: i64,
        now: i64,
    ) -> Result<(), DbError> {
        sqlx::query(
            "UPDATE admin_sessions SET last_seen_at = $1, expires_at = $2 \
             WHERE id = $3 AND revoked_at IS NULL AND last_seen_at <= $4",
        )
        .bind(now)
        .bind(expires_at)
        .bind(id.to_string())
        .bind(now.saturating_sub(60))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Ends a session (sign-out; audit `admin_session.revoke`).
    pub async fn revoke_admin_session(
        &self,
        id: &str,
        actor: &Actor,
        now: i64,
    ) -> Result<(), DbError> {
        let mut tx = self.tx().await?;
        sqlx::query(
            "UPDATE admin_sessions SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL",
        )
        .bind(now)
        .bind(id.to_string())
        .execute(&mut *tx)
        .await?;
        Self::audit(
            &mut tx,
            actor,
            "admin_session.revoke",
            "admin_session",
            id,
            serde_json::json!({}),
            now,
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }
}

/// The audit actor of a signed-in user.
pub fn user_actor(user: &AdminUser, request_id: Option<String>) -> Actor {
    Actor {
        kind: "admin_user",
        id: user.id.clone(),
        name: user.email.clone(),
        request_id,
    }
}
