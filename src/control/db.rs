//! The control plane's database: SQLite (a file, the default) or PostgreSQL, chosen by the
//! URL, through one `sqlx::AnyPool` and one set of migrations (`migrations/`).
//!
//! Queries are plain `sqlx::query` with `$1`-style placeholders, which both sqlx drivers
//! accept. Ids are generated here (`crate::service::ids::new_id`), times are Unix seconds,
//! money is `i64` minor units plus a currency code, JSON documents are TEXT.

use std::borrow::Cow;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AnyPool, AssertSqlSafe, Row, SqlSafeStr};

use super::model::{
    AdminToken, Agent, AgentKey, AuditEvent, Budget, BudgetLease, BudgetScope, Cursor, Decision,
    Intent, NewDecision, NewIntent, Organization, Page, PolicyRevision, Project, Sidecar,
};
use crate::service::ids::new_id;
use crate::sync::wire::{
    BundleAgent, BundleApproval, BundleBudget, BundleKey, EventAck, LeaseGrant, LeaseWant,
    RejectedEvent, SyncEvent,
};

/// The embedded migrations, in order. The files live in `migrations/` at the repository root.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "control plane",
        include_str!("../../migrations/0001_control_plane.sql"),
    ),
    (2, "sync", include_str!("../../migrations/0002_sync.sql")),
    (
        3,
        "sync ledger",
        include_str!("../../migrations/0003_sync_ledger.sql"),
    ),
    (
        4,
        "admin tokens",
        include_str!("../../migrations/0004_admin_tokens.sql"),
    ),
    (
        5,
        "stripe webhooks",
        include_str!("../../migrations/0005_stripe_webhooks.sql"),
    ),
    (
        6,
        "reconciliation",
        include_str!("../../migrations/0006_reconciliation.sql"),
    ),
    (
        7,
        "audit chain",
        include_str!("../../migrations/0007_audit_chain.sql"),
    ),
    (
        8,
        "intent risk",
        include_str!("../../migrations/0008_intent_risk.sql"),
    ),
    (
        9,
        "stripe connect",
        include_str!("../../migrations/0009_stripe_connect.sql"),
    ),
    (
        10,
        "dashboard",
        include_str!("../../migrations/0010_dashboard.sql"),
    ),
    (
        11,
        "relay cards",
        include_str!("../../migrations/0011_relay_cards.sql"),
    ),
    (
        12,
        "form nonces",
        include_str!("../../migrations/0012_form_nonces.sql"),
    ),
    (
        13,
        "dashboard money",
        include_str!("../../migrations/0013_dashboard_money.sql"),
    ),
    (
        14,
        "relay expiry",
        include_str!("../../migrations/0014_relay_expiry.sql"),
    ),
];

pub mod admin_users;
mod connect;
mod dashboard_a;
mod dashboard_b;
mod reconcile;
mod relay;
mod stripe;
pub use connect::{ConnectionRow, ResealedRow, SealedRow, StoredTokens};
pub use dashboard_a::{
    AgentFacts, AgentPolicy, AuditPageFilter, COUNTED, CurrencyAmount, DailySpend, FrozenAgent,
    PeriodUsage, SpendRow, counted,
};
pub use dashboard_b::{
    AdminDecisionRow, CardRecord, PendingRow, PolicySummary, SettlementExportRow, SettlementFilter,
    SettlementRecord, TxFilter, TxRow,
};
pub use reconcile::ReconcileCardView;
pub use relay::{
    LedgerIntentFacts, RelayBound, RelayCardClaim, RelayCardRow, RelayClaim, RelayFacts,
    RelayScope, RelayVerdict,
};
pub use stripe::{AuthInputs, DiscrepancyFilter};

/// Which database a [`ControlDb`] talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Why [`ControlDb::decide_pending`] refused (nothing was written) or failed.
#[derive(Debug, thiserror::Error)]
pub enum DecideError {
    /// The intent is in another state (the state it is in).
    #[error("the intent is {0}, not pending_approval")]
    NotPending(String),
    /// The request's deadline has passed.
    #[error("the request expired at {expires_at} (unix seconds)")]
    Expired { expires_at: i64 },
    /// Approving for an agent that is frozen.
    #[error("agent {agent_id} is frozen")]
    AgentFrozen {
        agent_id: String,
        reason: Option<String>,
    },
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<sqlx::Error> for DecideError {
    fn from(e: sqlx::Error) -> Self {
        DecideError::Db(e.into())
    }
}

impl DbError {
    /// A failure that a retry of the whole transaction may not meet again: PostgreSQL's
    /// deadlock (40P01) or serialization failure (40001), SQLite's busy or locked database.
    pub fn is_transient(&self) -> bool {
        match self {
            DbError::Sql(sqlx::Error::Database(d)) => {
                matches!(
                    d.code().as_deref(),
                    Some("40P01" | "40001" | "5" | "6" | "517")
                )
            }
            _ => false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("unsupported database url: {0}")]
    InvalidUrl(String),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database error: {0}")]
    Sql(sqlx::Error),
    #[error("stored data is unreadable: {0}")]
    Corrupt(String),
    /// The database refused a value (PostgreSQL: a NUL or a character the encoding cannot
    /// hold). A client's mistake, answered with a 4xx; nothing was written.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A policy write based on revision `base` while `current` is the current one.
    #[error("the policy changed: revision {current} is current, the draft was based on {base}")]
    StalePolicy { base: i64, current: i64 },
}

impl From<sqlx::Error> for DbError {
    fn from(e: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &e
            && db.kind() == sqlx::error::ErrorKind::UniqueViolation
        {
            return DbError::Conflict(db.message().to_lowercase());
        }
        // 22021 character_not_in_repertoire (a NUL in text), 22P05 untranslatable_character.
        if let sqlx::Error::Database(db) = &e
            && matches!(db.code().as_deref(), Some("22021" | "22P05"))
        {
            return DbError::InvalidInput(db.message().to_lowercase());
        }
        DbError::Sql(e)
    }
}

/// Who did something: written into audit events (and as the author of policy revisions).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Actor {
    /// `admin_token` or `system`.
    pub kind: &'static str,
    pub id: String,
    /// Human-readable name (the admin token's name).
    pub name: String,
    pub request_id: Option<String>,
}

impl Actor {
    pub fn system() -> Actor {
        Actor {
            kind: "system",
            id: "system".into(),
            name: "system".into(),
            request_id: None,
        }
    }
}

/// A stored admin token (its hash only).
#[derive(Clone, Debug)]
pub struct AdminTokenRecord {
    pub id: String,
    pub name: String,
    pub token_hash: String,
    pub revoked: bool,
    pub last_used_at: Option<i64>,
}

/// `last_used_at` of an admin token is updated when it is older than this (seconds).
pub const ADMIN_TOKEN_USE_RESOLUTION: i64 = 60;

/// What [`ControlDb::ensure_admin_token`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootstrapToken {
    /// The token was inserted (it did not exist).
    pub created: bool,
    /// The token exists but was revoked (it stays revoked; nothing else was changed).
    pub revoked: bool,
    /// Ids of the other bootstrap tokens of the same name this revoked.
    pub replaced: Vec<String>,
}

/// The outcome of [`ControlDb::revoke_admin_token`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdminTokenRevoke {
    Revoked(AdminToken),
    AlreadyRevoked(AdminToken),
    /// Refused: it is the only active token.
    LastActive,
}

/// Filters for listing agents.
#[derive(Clone, Debug, Default)]
pub struct AgentFilter {
    pub org_id: Option<String>,
    pub project_id: Option<String>,
    pub status: Option<String>,
}

/// Filters for listing intents and decisions. `status` filters intents by status and
/// decisions by outcome; the created range is inclusive of `created_from` and exclusive of
/// `created_to` (Unix seconds).
#[derive(Clone, Debug, Default)]
pub struct LedgerFilter {
    pub org_id: Option<String>,
    pub project_id: Option<String>,
    pub agent_id: Option<String>,
    pub status: Option<String>,
    pub created_from: Option<i64>,
    pub created_to: Option<i64>,
}

/// Filters for listing audit events (`created_*` as in [`LedgerFilter`]).
#[derive(Clone, Debug, Default)]
pub struct AuditFilter {
    pub target_type: Option<String>,
    pub target_id: Option<String>,
    pub actor_type: Option<String>,
    pub actor_id: Option<String>,
    pub action: Option<String>,
    pub created_from: Option<i64>,
    pub created_to: Option<i64>,
}

#[derive(Clone, Debug)]
enum Arg {
    Text(String),
    Int(i64),
}

/// A `WHERE` clause built from optional filters with numbered placeholders.
#[derive(Default)]
struct Where {
    clauses: Vec<String>,
    args: Vec<Arg>,
}

impl Where {
    fn next(&self) -> usize {
        self.args.len() + 1
    }

    fn eq_text(&mut self, column: &str, value: &Option<String>) {
        if let Some(v) = value {
            let n = self.next();
            self.clauses.push(format!("{column} = ${n}"));
            self.args.push(Arg::Text(v.clone()));
        }
    }

    fn cmp_int(&mut self, column: &str, op: &str, value: Option<i64>) {
        if let Some(v) = value {
            let n = self.next();
            self.clauses.push(format!("{column} {op} ${n}"));
            self.args.push(Arg::Int(v));
        }
    }

    /// Rows strictly before (`op` `<`) or after (`>`) the cursor in `(created, id)` order,
    /// with the columns named (e.g. `s.created_at`, `s.id` in a join).
    fn cursor_cmp(&mut self, cursor: &Option<Cursor>, op: &str, created: &str, id: &str) {
        if let Some(c) = cursor {
            let a = self.next();
            let b = a + 1;
            let c2 = a + 2;
            self.clauses.push(format!(
                "({created} {op} ${a} OR ({created} = ${b} AND {id} {op} ${c2}))"
            ));
            self.args.push(Arg::Int(c.created_at));
            self.args.push(Arg::Int(c.created_at));
            self.args.push(Arg::Text(c.id.clone()));
        }
    }

    /// Newest first: rows strictly after the cursor in `(created_at DESC, id DESC)` order.
    fn before_cursor(&mut self, cursor: &Option<Cursor>) {
        if let Some(c) = cursor {
            let a = self.next();
            let b = a + 1;
            let c2 = a + 2;
            self.clauses.push(format!(
                "(created_at < ${a} OR (created_at = ${b} AND id < ${c2}))"
            ));
            self.args.push(Arg::Int(c.created_at));
            self.args.push(Arg::Int(c.created_at));
            self.args.push(Arg::Text(c.id.clone()));
        }
    }

    fn sql(&self) -> String {
        if self.clauses.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", self.clauses.join(" AND "))
        }
    }
}

fn bind_all<'q>(
    mut q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>,
    args: Vec<Arg>,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments> {
    for a in args {
        q = match a {
            Arg::Text(s) => q.bind(s),
            Arg::Int(i) => q.bind(i),
        };
    }
    q
}

#[derive(Clone, Debug)]
pub struct ControlDb {
    pool: AnyPool,
    backend: Backend,
    /// The last configuration revision this process committed (wakes long-polls at once;
    /// changes made by other replicas are found by polling `config_revision`).
    changes: std::sync::Arc<tokio::sync::watch::Sender<i64>>,
    /// The last seq of the updates feed this process committed (wakes feed long-polls).
    updates: std::sync::Arc<tokio::sync::watch::Sender<i64>>,
    /// Stripe webhook settings (secrets, real-time deadline) of the server using this
    /// database.
    webhooks: std::sync::Arc<super::webhooks::WebhookConfig>,
    /// Stripe access for reconciliation (`None`: reconciliation is off) and its lock.
    reconcile: std::sync::Arc<super::reconcile::ReconcileState>,
    /// Stripe credentials (Connect or direct) and the secrets key (`db/connect.rs`).
    stripe_setup: std::sync::Arc<super::connect::StripeSetup>,
    /// Proxies whose `X-Forwarded-For` the server believes (sign-in limits per address).
    trusted_proxies: std::sync::Arc<crate::ratelimit::TrustedProxies>,
}

/// A sidecar as the sync endpoints authenticate it.
#[derive(Clone, Debug)]
pub struct SidecarAuth {
    pub id: String,
    pub project_id: String,
    /// The organization of its project.
    pub org_id: String,
    pub token_hash: String,
    pub revoked: bool,
}

/// `sqlite://<dir>/control.db?mode=rwc`, the default database of a data directory.
pub fn default_sqlite_url(data_dir: &std::path::Path) -> String {
    const PATH: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
        .add(b' ')
        .add(b'?')
        .add(b'#')
        .add(b'%');
    let path = data_dir.join("control.db");
    let text = path.to_string_lossy();
    format!(
        "sqlite://{}?mode=rwc",
        percent_encoding::utf8_percent_encode(&text, PATH)
    )
}

fn migrator() -> Migrator {
    Migrator::with_migrations(
        MIGRATIONS
            .iter()
            .map(|(version, description, sql)| {
                Migration::new(
                    *version,
                    Cow::Borrowed(*description),
                    MigrationType::Simple,
                    (*sql).into_sql_str(),
                    false,
                )
            })
            .collect(),
    )
}

impl ControlDb {
    /// Opens (creating if needed) the database at `url` and applies the migrations.
    pub async fn open(url: &str) -> Result<ControlDb, DbError> {
        let db = Self::connect(url).await?;
        migrator().run(&db.pool).await?;
        Ok(db)
    }

    /// Connects to the database at `url` without applying migrations (`roony audit
    /// verify` reads what is there).
    pub async fn connect(url: &str) -> Result<ControlDb, DbError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else {
            let scheme = url.split(':').next().unwrap_or_default();
            return Err(DbError::InvalidUrl(format!(
                "scheme `{scheme}` (use sqlite:// or postgres://)"
            )));
        };
        let pool = AnyPoolOptions::new()
            .max_connections(match backend {
                Backend::Sqlite => 4,
                Backend::Postgres => 10,
            })
            .acquire_timeout(std::time::Duration::from_secs(10))
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // WAL with synchronous=NORMAL: a commit is atomic and survives a
                        // crash of the process; only an OS crash or power loss can lose the
                        // last commits (never corrupt the file). PostgreSQL is the production
                        // choice where that matters; webhooks lost that way are redelivered
                        // by reconciliation.
                        sqlx::query("PRAGMA synchronous = NORMAL")
                            .execute(&mut *conn)
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect(url)
            .await?;
        if backend == Backend::Sqlite {
            // Persistent in the file: readers never block the writer.
            sqlx::query("PRAGMA journal_mode = WAL")
                .execute(&pool)
                .await?;
        }
        let (changes, _) = tokio::sync::watch::channel(0);
        let (updates, _) = tokio::sync::watch::channel(0);
        Ok(ControlDb {
            pool,
            backend,
            changes: std::sync::Arc::new(changes),
            updates: std::sync::Arc::new(updates),
            webhooks: Default::default(),
            reconcile: Default::default(),
            stripe_setup: Default::default(),
            trusted_proxies: Default::default(),
        })
    }

    /// This database with the proxies its server trusts for client addresses.
    pub fn with_trusted_proxies(mut self, proxies: crate::ratelimit::TrustedProxies) -> ControlDb {
        self.trusted_proxies = std::sync::Arc::new(proxies);
        self
    }

    /// See [`ControlDb::with_trusted_proxies`].
    pub fn trusted_proxies(&self) -> &crate::ratelimit::TrustedProxies {
        &self.trusted_proxies
    }

    /// This database with the Stripe webhook settings its server uses.
    pub fn with_webhooks(mut self, config: super::webhooks::WebhookConfig) -> ControlDb {
        self.webhooks = std::sync::Arc::new(config);
        self
    }

    /// The Stripe webhook settings (see [`ControlDb::with_webhooks`]).
    pub fn webhook_config(&self) -> &super::webhooks::WebhookConfig {
        &self.webhooks
    }

    /// This database with the Stripe access (and interval) reconciliation uses.
    pub fn with_reconciliation(mut self, config: super::reconcile::ReconcileConfig) -> ControlDb {
        self.reconcile = std::sync::Arc::new(super::reconcile::ReconcileState::new(Some(config)));
        self
    }

    /// Reconciliation settings and lock (see [`ControlDb::with_reconciliation`]).
    pub fn reconcile_state(&self) -> &super::reconcile::ReconcileState {
        &self.reconcile
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// A round trip to the database (health checks).
    pub async fn ping(&self) -> Result<(), DbError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// A write transaction. On SQLite it takes the write lock at once (`BEGIN IMMEDIATE`), so
    /// a read-then-write transaction never fails to upgrade its lock.
    async fn tx(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, DbError> {
        Ok(match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.pool.begin().await?,
        })
    }

    /// Names of the tables the migrations created (for tests and diagnostics).
    pub async fn table_names(&self) -> Result<Vec<String>, DbError> {
        let sql = match self.backend {
            Backend::Sqlite => {
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name"
            }
            Backend::Postgres => {
                "SELECT CAST(table_name AS TEXT) AS name FROM information_schema.tables WHERE table_schema = current_schema() ORDER BY name"
            }
        };
        let rows = sqlx::query(sql).fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| r.try_get::<String, _>("name").map_err(DbError::from))
            .collect()
    }

    /// Names of the indexes on the migrated tables.
    pub async fn index_names(&self) -> Result<Vec<String>, DbError> {
        let sql = match self.backend {
            Backend::Sqlite => {
                "SELECT name FROM sqlite_master WHERE type = 'index' AND name NOT LIKE 'sqlite_%' ORDER BY name"
            }
            Backend::Postgres => {
                "SELECT CAST(indexname AS TEXT) AS name FROM pg_indexes WHERE schemaname = current_schema() ORDER BY name"
            }
        };
        let rows = sqlx::query(sql).fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| r.try_get::<String, _>("name").map_err(DbError::from))
            .collect()
    }

    // ----- audit -----------------------------------------------------------------------

    async fn audit(
        conn: &mut sqlx::AnyConnection,
        actor: &Actor,
        action: &str,
        target_type: &str,
        target_id: &str,
        details: serde_json::Value,
        now: i64,
    ) -> Result<(), DbError> {
        Self::audit_outcome(
            conn,
            actor,
            action,
            (target_type, target_id),
            "success",
            details,
            now,
        )
        .await
    }

    /// An audit event with an explicit outcome (`success` or `failure`).
    async fn audit_outcome(
        conn: &mut sqlx::AnyConnection,
        actor: &Actor,
        action: &str,
        (target_type, target_id): (&str, &str),
        outcome: &str,
        details: serde_json::Value,
        now: i64,
    ) -> Result<(), DbError> {
        Self::append_audit(
            conn,
            crate::audit::Entry {
                id: new_id("aud"),
                at: now,
                actor_type: actor.kind.to_string(),
                actor_id: actor.id.clone(),
                action: action.to_string(),
                target_type: target_type.to_string(),
                target_id: target_id.to_string(),
                outcome: outcome.to_string(),
                request_id: actor.request_id.clone(),
                details,
            },
        )
        .await
    }

    /// Appends one event to the audit chain, inside the caller's transaction: takes the
    /// chain's row lock (`UPDATE audit_chain … RETURNING`, held until the transaction
    /// ends, so appends are serialized across transactions and replicas), links the event
    /// after the head (details scrubbed, hash computed here) and inserts it.
    pub(crate) async fn append_audit(
        conn: &mut sqlx::AnyConnection,
        entry: crate::audit::Entry,
    ) -> Result<(), DbError> {
        let row =
            sqlx::query("UPDATE audit_chain SET seq = seq + 1 WHERE id = 1 RETURNING seq, head")
                .fetch_one(&mut *conn)
                .await?;
        let seq: i64 = row.try_get("seq")?;
        let head: String = row.try_get("head")?;
        let seq =
            u64::try_from(seq).map_err(|_| DbError::Corrupt(format!("audit chain seq {seq}")))?;
        let event = entry.link(seq, &head);
        sqlx::query("UPDATE audit_chain SET head = $1 WHERE id = 1")
            .bind(event.hash.clone())
            .execute(&mut *conn)
            .await?;
        sqlx::query(
            "INSERT INTO audit_events (id, actor_type, actor_id, action, target_type, target_id, outcome, request_id, created_at, details, chain_seq, prev_hash, hash) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
        )
        .bind(event.id)
        .bind(event.actor_type)
        .bind(event.actor_id)
        .bind(event.action)
        .bind(event.target_type)
        .bind(event.target_id)
        .bind(event.outcome)
        .bind(event.request_id)
        .bind(event.at)
        .bind(event.details.to_string())
        .bind(i64::try_from(event.seq).unwrap_or(i64::MAX))
        .bind(event.prev_hash)
        .bind(event.hash)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    /// Appends `entries` (request events) to the audit chain in one transaction.
    pub async fn append_audit_events(
        &self,
        entries: Vec<crate::audit::Entry>,
    ) -> Result<(), DbError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut tx = self.tx().await?;
        for entry in entries {
            Self::append_audit(&mut tx, entry).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Reads the audit chain in order (pages of 1000) and verifies it end to end, then
    /// compares its end with `audit_chain`'s head. Events from before the chain existed
    /// (`chain_seq` NULL) are not part of it.
    pub async fn verify_audit_chain(
        &self,
    ) -> Result<Result<crate::audit::VerifyReport, crate::audit::BrokenLink>, DbError> {
        // The head first, then the events up to it: events appended while this runs (the
        // request auditor writes continuously) are after the head read and not checked,
        // instead of looking like a head the events do not reach. Every event up to the
        // head is committed (an append and its head move are one transaction).
        let row = sqlx::query("SELECT seq, head FROM audit_chain WHERE id = 1")
            .fetch_one(&self.pool)
            .await?;
        let head_seq: i64 = row.try_get("seq")?;
        let head: String = row.try_get("head")?;
        let mut v = crate::audit::Verifier::new();
        let mut after: i64 = 0;
        loop {
            let rows = sqlx::query(
                "SELECT id, actor_type, actor_id, action, target_type, target_id, outcome, request_id, created_at, details, chain_seq, prev_hash, hash \
                 FROM audit_events WHERE chain_seq > $1 AND chain_seq <= $2 ORDER BY chain_seq LIMIT 1000",
            )
            .bind(after)
            .bind(head_seq)
            .fetch_all(&self.pool)
            .await?;
            if rows.is_empty() {
                break;
            }
            for r in &rows {
                let seq: i64 = r.try_get("chain_seq")?;
                after = seq;
                let id: String = r.try_get("id")?;
                let details: String = r.try_get("details")?;
                let Ok(details) = serde_json::from_str(&details) else {
                    return Ok(Err(crate::audit::BrokenLink {
                        seq: u64::try_from(seq).unwrap_or(0),
                        id,
                        reason: "hash_mismatch",
                    }));
                };
                let event = crate::audit::AuditEvent {
                    seq: u64::try_from(seq).unwrap_or(0),
                    id,
                    at: r.try_get("created_at")?,
                    actor_type: r.try_get("actor_type")?,
                    actor_id: r.try_get("actor_id")?,
                    action: r.try_get("action")?,
                    target_type: r.try_get("target_type")?,
                    target_id: r.try_get("target_id")?,
                    outcome: r.try_get("outcome")?,
                    request_id: r.try_get("request_id")?,
                    details,
                    prev_hash: r
                        .try_get::<Option<String>, _>("prev_hash")?
                        .unwrap_or_default(),
                    hash: r.try_get::<Option<String>, _>("hash")?.unwrap_or_default(),
                };
                if let Err(b) = v.check(&event) {
                    return Ok(Err(b));
                }
            }
        }
        if let Err(b) = v.check_head(u64::try_from(head_seq).unwrap_or(0), &head) {
            return Ok(Err(b));
        }
        Ok(Ok(v.report()))
    }

    /// Audit events about one target (or all, newest first), at most `limit`.
    pub async fn list_audit_events(
        &self,
        target: Option<(&str, &str)>,
        limit: i64,
    ) -> Result<Vec<AuditEvent>, DbError> {
        let filter = AuditFilter {
            target_type: target.map(|(t, _)| t.to_string()),
            target_id: target.map(|(_, id)| id.to_string()),
            ..Default::default()
        };
        Ok(self.list_audit_page(&filter, limit, None).await?.items)
    }

    /// Audit events, newest first, one page.
    pub async fn list_audit_page(
        &self,
        filter: &AuditFilter,
        limit: i64,
        cursor: Option<Cursor>,
    ) -> Result<Page<AuditEvent>, DbError> {
        let mut w = Where::default();
        w.eq_text("target_type", &filter.target_type);
        w.eq_text("target_id", &filter.target_id);
        w.eq_text("actor_type", &filter.actor_type);
        w.eq_text("actor_id", &filter.actor_id);
        w.eq_text("action", &filter.action);
        w.cmp_int("created_at", ">=", filter.created_from);
        w.cmp_int("created_at", "<", filter.created_to);
        self.fetch_page(
            "SELECT id, actor_type, actor_id, action, target_type, target_id, outcome, request_id, created_at, details \
             FROM audit_events",
            w,
            limit,
            cursor,
            audit_from_row,
            |e| Cursor {
                created_at: e.created_at,
                id: e.id.clone(),
            },
        )
        .await
    }

    /// One keyset page, newest first: `select` (`SELECT … FROM table`) filtered by `w`, rows
    /// strictly older than `cursor`, at most `limit` (one more is read to know if more exist).
    async fn fetch_page<T>(
        &self,
        select: &str,
        mut w: Where,
        limit: i64,
        cursor: Option<Cursor>,
        from_row: fn(&AnyRow) -> Result<T, DbError>,
        key: impl Fn(&T) -> Cursor,
    ) -> Result<Page<T>, DbError> {
        w.before_cursor(&cursor);
        let n = w.next();
        let sql = format!(
            "{select}{} ORDER BY created_at DESC, id DESC LIMIT ${n}",
            w.sql()
        );
        let mut args = w.args;
        args.push(Arg::Int(limit + 1));
        let rows = bind_all(sqlx::query(AssertSqlSafe(sql)), args)
            .fetch_all(&self.pool)
            .await?;
        let items = rows.iter().map(from_row).collect::<Result<Vec<_>, _>>()?;
        Ok(Page::from_rows(items, limit, key))
    }

    // ----- organizations and projects ---------------------------------------------------

    /// The default organization, created at first start.
    pub async fn ensure_default_org(&self, now: i64) -> Result<Organization, DbError> {
        if let Some(org) = self.default_org().await? {
            return Ok(org);
        }
        let id = new_id("org");
        let mut tx = self.tx().await?;
        let inserted = sqlx::query(
            "INSERT INTO organizations (id, name, is_default, created_at) VALUES ($1, 'default', 1, $2) \
             ON CONFLICT DO NOTHING",
        )
        .bind(id.clone())
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 1 {
            Self::audit(
                &mut tx,
                &Actor::system(),
                "organization.create",
                "organization",
                &id,
                serde_json::json!({"name": "default", "default": true}),
                now,
            )
            .await?;
        }
        tx.commit().await?;
        self.default_org()
            .await?
            .ok_or(DbError::NotFound("default organization"))
    }

    pub async fn default_org(&self) -> Result<Option<Organization>, DbError> {
        let row = sqlx::query(
            "SELECT id, name, is_default, created_at FROM organizations WHERE is_default = 1",
        )
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(org_from_row).transpose()
    }

    pub async fn create_org(
        &self,
        name: &str,
        actor: &Actor,
        now: i64,
    ) -> Result<Organization, DbError> {
        let org = Organization {
            id: new_id("org"),
            name: name.to_string(),
            is_default: false,
            created_at: now,
        };
        let mut tx = self.tx().await?;
        sqlx::query(
            "INSERT INTO organizations (id, name, is_default, created_at) VALUES ($1, $2, 0, $3)",
        )
        .bind(org.id.clone())
        .bind(org.name.clone())
        .bind(now)
        .execute(&mut *tx)
        .await?;
        Self::audit(
            &mut tx,
            actor,
            "organization.create",
            "organization",
            &org.id,
            serde_json::json!({"name": name}),
            now,
        )
        .await?;
        tx.commit().await?;
        Ok(org)
    }

    pub async fn get_org(&self, id: &str) -> Result<Organization, DbError> {
        let row =
            sqlx::query("SELECT id, name, is_default, created_at FROM organizations WHERE id = $1")
                .bind(id.to_string())
                .fetch_optional(&self.pool)
                .await?
                .ok_or(DbError::NotFound("organization"))?;
        org_from_row(&row)
    }

    pub async fn list_orgs(&self) -> Result<Vec<Organization>, DbError> {
        let rows = sqlx::query(
            "SELECT id, name, is_default, created_at FROM organizations ORDER BY created_at, id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(org_from_row).collect()
    }

    pub async fn create_project(
        &self,
        org_id: &str,
        name: &str,
        actor: &Actor,
        now: i64,
    ) -> Result<Project, DbError> {
        let project = Project {
            id: new_id("prj"),
            org_id: org_id.to_string(),
            name: name.to_string(),
            created_at: now,
        };
        let mut tx = self.tx().await?;
        let exists = sqlx::query("SELECT id FROM organizations WHERE id = $1")
            .bind(org_id.to_string())
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_none() {
            return Err(DbError::NotFound("organization"));
        }
        sqlx::query("INSERT INTO projects (id, org_id, name, created_at) VALUES ($1, $2, $3, $4)")
            .bind(project.id.clone())
            .bind(project.org_id.clone())
            .bind(project.name.clone())
            .bind(now)
            .execute(&mut *tx)
            .await?;
        Self::audit(
            &mut tx,
            actor,
            "project.create",
            "project",
            &project.id,
            serde_json::json!({"org_id": org_id, "name": name}),
            now,
        )
        .await?;
        tx.commit().await?;
        Ok(project)
    }

    pub async fn get_project(&self, id: &str) -> Result<Project, DbError> {
        let row = sqlx::query("SELECT id, org_id, name, created_at FROM projects WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?
            .ok_or(DbError::NotFound("project"))?;
        project_from_row(&row)
    }

    pub async fn list_projects(&self, org_id: Option<&str>) -> Result<Vec<Project>, DbError> {
        let mut w = Where::default();
        w.eq_text("org_id", &org_id.map(str::to_string));
        let sql = format!(
            "SELECT id, org_id, name, created_at FROM projects{} ORDER BY created_at, id",
            w.sql()
        );
        let rows = bind_all(sqlx::query(AssertSqlSafe(sql)), w.args)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(project_from_row).collect()
    }

    // ----- agents and keys --------------------------------------------------------------

    /// Creates an agent in a project with its first key (hash only).
    pub async fn create_agent(
        &self,
        project_id: &str,
        agent_id: Option<&str>,
        name: &str,
        key: &crate::auth::NewKey,
        actor: &Actor,
        now: i64,
    ) -> Result<Agent, DbError> {
        self.create_agent_with_policy(project_id, agent_id, name, key, None, actor, now)
            .await
            .map(|(agent, _)| agent)
    }

    /// [`ControlDb::create_agent`] with its first policy revision (validated JSON) in the
    /// same transaction: either both exist afterwards or neither.
    #[allow(clippy::too_many_arguments)]
    pub async fn create_agent_with_policy(
        &self,
        project_id: &str,
        agent_id: Option<&str>,
        name: &str,
        key: &crate::auth::NewKey,
        policy: Option<&str>,
        actor: &Actor,
        now: i64,
    ) -> Result<(Agent, Option<PolicyRevision>), DbError> {
        let mut tx = self.tx().await?;
        let project =
            sqlx::query("SELECT id, org_id, name, created_at FROM projects WHERE id = $1")
                .bind(project_id.to_string())
                .fetch_optional(&mut *tx)
                .await?
                .ok_or(DbError::NotFound("project"))?;
        let project = project_from_row(&project)?;
        let agent = Agent {
            id: agent_id.map_or_else(|| new_id("agt"), str::to_string),
            org_id: project.org_id,
            project_id: project.id,
            name: name.to_string(),
            status: "active".into(),
            frozen_reason: None,
            created_at: now,
            updated_at: now,
        };
        sqlx::query(
            "INSERT INTO agents (id, org_id, project_id, name, status, frozen_reason, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, 'active', NULL, $5, $5)",
        )
        .bind(agent.id.clone())
        .bind(agent.org_id.clone())
        .bind(agent.project_id.clone())
        .bind(agent.name.clone())
        .bind(now)
        .execute(&mut *tx)
        .await?;
        Self::insert_key(&mut tx, &agent.id, key, now).await?;
        Self::audit(
            &mut tx,
            actor,
            "agent.create",
            "agent",
            &agent.id,
            serde_json::json!({"project_id": agent.project_id, "name": name, "key_id": key.key_id}),
            now,
        )
        .await?;
        let revision = match policy {
            Some(doc) => {
                Some(Self::write_policy_revision(&mut tx, &agent.id, doc, actor, now).await?)
            }
            None => None,
        };
        self.commit_config(tx).await?;
        Ok((agent, revision))
    }

    async fn insert_key(
        conn: &mut sqlx::AnyConnection,
        agent_id: &str,
        key: &crate::auth::NewKey,
        now: i64,
    ) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO agent_keys (key_id, agent_id, key_hash, created_at, revoked_at) VALUES ($1, $2, $3, $4, NULL)",
        )
        .bind(key.key_id.clone())
        .bind(agent_id.to_string())
        .bind(key.hash.clone())
        .bind(now)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    pub async fn get_agent(&self, id: &str) -> Result<Agent, DbError> {
        let row = sqlx::query(
            "SELECT id, org_id, project_id, name, status, frozen_reason, created_at, updated_at FROM agents WHERE id = $1",
        )
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?
        .ok_or(DbError::NotFound("agent"))?;
        agent_from_row(&row)
    }

    pub async fn list_agents(
        &self,
        filter: &AgentFilter,
        limit: i64,
        cursor: Option<Cursor>,
    ) -> Result<Page<Agent>, DbError> {
        let mut w = Where::default();
        w.eq_text("org_id", &filter.org_id);
        w.eq_text("project_id", &filter.project_id);
        w.eq_text("status", &filter.status);
        w.before_cursor(&cursor);
        let n = w.next();
        let sql = format!(
            "SELECT id, org_id, project_id, name, status, frozen_reason, created_at, updated_at FROM agents{} \
             ORDER BY created_at DESC, id DESC LIMIT ${n}",
            w.sql()
        );
        let mut args = w.args;
        args.push(Arg::Int(limit + 1));
        let rows = bind_all(sqlx::query(AssertSqlSafe(sql)), args)
            .fetch_all(&self.pool)
            .await?;
        let items = rows
            .iter()
            .map(agent_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Page::from_rows(items, limit, |a| Cursor {
            created_at: a.created_at,
            id: a.id.clone(),
        }))
    }

    pub async fn list_agent_keys(&self, agent_id: &str) -> Result<Vec<AgentKey>, DbError> {
        self.get_agent(agent_id).await?;
        let rows = sqlx::query(
            "SELECT key_id, agent_id, created_at, revoked_at FROM agent_keys WHERE agent_id = $1 ORDER BY created_at, key_id",
        )
        .bind(agent_id.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(key_from_row).collect()
    }

    /// The stored hash of a key (for verification by sidecars, later through sync).
    pub async fn agent_key_hash(&self, key_id: &str) -> Result<(String, String, bool), DbError> {
        let row =
            sqlx::query("SELECT agent_id, key_hash, revoked_at FROM agent_keys WHERE key_id = $1")
                .bind(key_id.to_string())
                .fetch_optional(&self.pool)
                .await?
                .ok_or(DbError::NotFound("agent key"))?;
        Ok((
            row.try_get("agent_id")?,
            row.try_get("key_hash")?,
            row.try_get::<Option<i64>, _>("revoked_at")?.is_some(),
        ))
    }

    /// Revokes every active key of the agent and adds `key`.
    pub async fn rotate_agent_key(
        &self,
        agent_id: &str,
        key: &crate::auth::NewKey,
        actor: &Actor,
        now: i64,
    ) -> Result<Vec<String>, DbError> {
        let mut tx = self.tx().await?;
        Self::lock_agent(&mut tx, agent_id, now).await?;
        let revoked = sqlx::query(
            "UPDATE agent_keys SET revoked_at = $1 WHERE agent_id = $2 AND revoked_at IS NULL RETURNING key_id",
        )
        .bind(now)
        .bind(agent_id.to_string())
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| r.try_get::<String, _>("key_id"))
        .collect::<Result<Vec<_>, _>>()?;
        Self::insert_key(&mut tx, agent_id, key, now).await?;
        Self::audit(
            &mut tx,
            actor,
            "agent.key.rotate",
            "agent",
            agent_id,
            serde_json::json!({"new_key_id": key.key_id, "revoked_key_ids": revoked}),
            now,
        )
        .await?;
        self.commit_config(tx).await?;
        Ok(revoked)
    }

    pub async fn revoke_agent_key(
        &self,
        agent_id: &str,
        key_id: &str,
        actor: &Actor,
        now: i64,
    ) -> Result<AgentKey, DbError> {
        let mut tx = self.tx().await?;
        Self::lock_agent(&mut tx, agent_id, now).await?;
        let row = sqlx::query(
            "SELECT key_id, agent_id, created_at, revoked_at FROM agent_keys WHERE key_id = $1 AND agent_id = $2",
        )
        .bind(key_id.to_string())
        .bind(agent_id.to_string())
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(DbError::NotFound("agent key"))?;
        let mut key = key_from_row(&row)?;
        if key.revoked_at.is_some() {
            return Err(DbError::Conflict("the key is already revoked".into()));
        }
        sqlx::query("UPDATE agent_keys SET revoked_at = $1 WHERE key_id = $2")
            .bind(now)
            .bind(key_id.to_string())
            .execute(&mut *tx)
            .await?;
        Self::audit(
            &mut tx,
            actor,
            "agent.key.revoke",
            "agent",
            agent_id,
            serde_json::json!({"key_id": key_id}),
            now,
        )
        .await?;
        self.commit_config(tx).await?;
        key.revoked_at = Some(now);
        Ok(key)
    }

    /// Touches the agent row (serializing concurrent changes to it) or reports it missing.
    async fn lock_agent(
        conn: &mut sqlx::AnyConnection,
        agent_id: &str,
        now: i64,
    ) -> Result<(), DbError> {
        let n = sqlx::query("UPDATE agents SET updated_at = $1 WHERE id = $2")
            .bind(now)
            .bind(agent_id.to_string())
            .execute(&mut *conn)
            .await?
            .rows_affected();
        if n == 0 {
            return Err(DbError::NotFound("agent"));
        }
        Ok(())
    }

    /// Freezes (`Some(reason)`) or unfreezes (`None`) an agent.
    pub async fn set_agent_frozen(
        &self,
        agent_id: &str,
        frozen: Option<&str>,
        actor: &Actor,
        now: i64,
    ) -> Result<Agent, DbError> {
        let mut tx = self.tx().await?;
        Self::set_frozen_in(&mut tx, agent_id, frozen, actor, now).await?;
        self.commit_config(tx).await?;
        self.get_agent(agent_id).await
    }

    /// The statements of [`ControlDb::set_agent_frozen`], inside a transaction the caller
    /// commits with a configuration-revision bump.
    async fn set_frozen_in(
        conn: &mut sqlx::AnyConnection,
        agent_id: &str,
        frozen: Option<&str>,
        actor: &Actor,
        now: i64,
    ) -> Result<(), DbError> {
        let status = if frozen.is_some() { "frozen" } else { "active" };
        let n = sqlx::query(
            "UPDATE agents SET status = $1, frozen_reason = $2, updated_at = $3 WHERE id = $4",
        )
        .bind(status)
        .bind(frozen.map(str::to_string))
        .bind(now)
        .bind(agent_id.to_string())
        .execute(&mut *conn)
        .await?
        .rows_affected();
        if n == 0 {
            return Err(DbError::NotFound("agent"));
        }
        Self::audit(
            conn,
            actor,
            if frozen.is_some() {
                "agent.freeze"
            } else {
                "agent.unfreeze"
            },
            "agent",
            agent_id,
            serde_json::json!({"reason": frozen}),
            now,
        )
        .await
    }

    // ----- policies ---------------------------------------------------------------------

    /// Stores a new revision of the agent's policy (`document` is validated JSON).
    pub async fn put_policy(
        &self,
        agent_id: &str,
        document: &str,
        actor: &Actor,
        now: i64,
    ) -> Result<PolicyRevision, DbError> {
        self.put_policy_checked(agent_id, document, None, actor, now)
            .await
    }

    /// [`ControlDb::put_policy`] only if the current revision is still `base` (0: no
    /// policy yet): an editor that loaded revision `base` does not overwrite a revision
    /// someone published meanwhile. `StalePolicy` otherwise, nothing written.
    pub async fn put_policy_based_on(
        &self,
        agent_id: &str,
        document: &str,
        base: i64,
        actor: &Actor,
        now: i64,
    ) -> Result<PolicyRevision, DbError> {
        self.put_policy_checked(agent_id, document, Some(base), actor, now)
            .await
    }

    async fn put_policy_checked(
        &self,
        agent_id: &str,
        document: &str,
        base: Option<i64>,
        actor: &Actor,
        now: i64,
    ) -> Result<PolicyRevision, DbError> {
        let mut tx = self.tx().await?;
        // The agent's row lock serializes writers of its policy (also across replicas).
        Self::lock_agent(&mut tx, agent_id, now).await?;
        if let Some(base) = base {
            let current: i64 =
                sqlx::query("SELECT current_revision FROM policies WHERE agent_id = $1")
                    .bind(agent_id.to_string())
                    .fetch_optional(&mut *tx)
                    .await?
                    .map(|r| r.try_get::<i64, _>("current_revision"))
                    .transpose()?
                    .unwrap_or(0);
            if current != base {
                return Err(DbError::StalePolicy { base, current });
            }
        }
        let revision = Self::write_policy_revision(&mut tx, agent_id, document, actor, now).await?;
        self.commit_config(tx).await?;
        Ok(revision)
    }

    /// Adds a revision of `agent_id`'s policy (and its audit event) in the caller's
    /// transaction; the caller holds the agent's row lock and commits.
    async fn write_policy_revision(
        tx: &mut sqlx::AnyConnection,
        agent_id: &str,
        document: &str,
        actor: &Actor,
        now: i64,
    ) -> Result<PolicyRevision, DbError> {
        let bumped = sqlx::query(
            "UPDATE policies SET current_revision = current_revision + 1, updated_at = $1 WHERE agent_id = $2 \
             RETURNING id, current_revision",
        )
        .bind(now)
        .bind(agent_id.to_string())
        .fetch_optional(&mut *tx)
        .await?;
        let (policy_id, revision) = match bumped {
            Some(row) => (
                row.try_get::<String, _>("id")?,
                row.try_get::<i64, _>("current_revision")?,
            ),
            None => {
                let id = new_id("pol");
                sqlx::query(
                    "INSERT INTO policies (id, agent_id, current_revision, created_at, updated_at) VALUES ($1, $2, 1, $3, $3)",
                )
                .bind(id.clone())
                .bind(agent_id.to_string())
                .bind(now)
                .execute(&mut *tx)
                .await?;
                (id, 1)
            }
        };
        sqlx::query(
            "INSERT INTO policy_revisions (policy_id, revision, document, author, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(policy_id.clone())
        .bind(revision)
        .bind(document.to_string())
        .bind(actor.name.clone())
        .bind(now)
        .execute(&mut *tx)
        .await?;
        Self::audit(
            &mut *tx,
            actor,
            "policy.write",
            "agent",
            agent_id,
            serde_json::json!({"policy_id": policy_id, "revision": revision}),
            now,
        )
        .await?;
        Ok(PolicyRevision {
            agent_id: agent_id.to_string(),
            policy_id,
            revision,
            author: actor.name.clone(),
            created_at: now,
            document: parse_json(document)?,
        })
    }

    /// The agent's current policy revision.
    pub async fn get_policy(&self, agent_id: &str) -> Result<PolicyRevision, DbError> {
        self.get_agent(agent_id).await?;
        let row = sqlx::query(
            "SELECT p.agent_id, r.policy_id, r.revision, r.author, r.created_at, r.document \
             FROM policies p JOIN policy_revisions r ON r.policy_id = p.id AND r.revision = p.current_revision \
             WHERE p.agent_id = $1",
        )
        .bind(agent_id.to_string())
        .fetch_optional(&self.pool)
        .await?
        .ok_or(DbError::NotFound("policy"))?;
        revision_from_row(&row)
    }

    /// Every revision of the agent's policy, newest first.
    pub async fn list_policy_revisions(
        &self,
        agent_id: &str,
    ) -> Result<Vec<PolicyRevision>, DbError> {
        self.get_agent(agent_id).await?;
        let rows = sqlx::query(
            "SELECT p.agent_id, r.policy_id, r.revision, r.author, r.created_at, r.document \
             FROM policies p JOIN policy_revisions r ON r.policy_id = p.id \
             WHERE p.agent_id = $1 ORDER BY r.revision DESC",
        )
        .bind(agent_id.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(revision_from_row).collect()
    }

    // ----- budgets ----------------------------------------------------------------------

    /// Sets (creates or replaces) the budget of a scope for a period and currency.
    #[allow(clippy::too_many_arguments)]
    pub async fn set_budget(
        &self,
        scope: BudgetScope,
        scope_id: &str,
        period: &str,
        currency: &str,
        limit: i64,
        actor: &Actor,
        now: i64,
    ) -> Result<Budget, DbError> {
        let mut tx = self.tx().await?;
        let (table, what) = match scope {
            BudgetScope::Org => ("organizations", "organization"),
            BudgetScope::Project => ("projects", "project"),
            BudgetScope::Agent => ("agents", "agent"),
        };
        let exists = sqlx::query(AssertSqlSafe(format!(
            "SELECT id FROM {table} WHERE id = $1"
        )))
        .bind(scope_id.to_string())
        .fetch_optional(&mut *tx)
        .await?;
        if exists.is_none() {
            return Err(DbError::NotFound(what));
        }
        let row = sqlx::query(
            "INSERT INTO budgets (id, scope, scope_id, period, currency, limit_amount, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $7) \
             ON CONFLICT (scope, scope_id, period, currency) DO UPDATE SET limit_amount = excluded.limit_amount, updated_at = excluded.updated_at \
             RETURNING id, scope, scope_id, period, currency, limit_amount, created_at, updated_at",
        )
        .bind(new_id("bud"))
        .bind(scope.as_str())
        .bind(scope_id.to_string())
        .bind(period.to_string())
        .bind(currency.to_string())
        .bind(limit)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        let budget = budget_from_row(&row)?;
        Self::audit(
            &mut tx,
            actor,
            "budget.set",
            scope.as_str(),
            scope_id,
            serde_json::json!({"budget_id": budget.id, "period": period, "currency": currency, "limit": limit}),
            now,
        )
        .await?;
        self.commit_config(tx).await?;
        Ok(budget)
    }

    /// Deletes a budget (and the allowances sidecars hold of it, for a shared one); the
    /// next bundle no longer carries it. Returns what was deleted.
    pub async fn delete_budget(
        &self,
        id: &str,
        actor: &Actor,
        now: i64,
    ) -> Result<Budget, DbError> {
        let mut tx = self.tx().await?;
        let row = sqlx::query(
            "SELECT id, scope, scope_id, period, currency, limit_amount, created_at, updated_at \
             FROM budgets WHERE id = $1",
        )
        .bind(id.to_string())
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(DbError::NotFound("budget"))?;
        let budget = budget_from_row(&row)?;
        sqlx::query("DELETE FROM budget_leases WHERE budget_id = $1")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM budgets WHERE id = $1")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        Self::audit(
            &mut tx,
            actor,
            "budget.delete",
            budget.scope.as_str(),
            &budget.scope_id,
            serde_json::json!({"budget_id": budget.id, "period": budget.period,
                "currency": budget.currency, "limit": budget.limit}),
            now,
        )
        .await?;
        self.commit_config(tx).await?;
        Ok(budget)
    }

    /// One budget.
    pub async fn get_budget(&self, id: &str) -> Result<Budget, DbError> {
        let row = sqlx::query(
            "SELECT id, scope, scope_id, period, currency, limit_amount, created_at, updated_at \
             FROM budgets WHERE id = $1",
        )
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?
        .ok_or(DbError::NotFound("budget"))?;
        budget_from_row(&row)
    }

    pub async fn list_budgets(
        &self,
        scope: Option<BudgetScope>,
        scope_id: Option<&str>,
    ) -> Result<Vec<Budget>, DbError> {
        let mut w = Where::default();
        w.eq_text("scope", &scope.map(|s| s.as_str().to_string()));
        w.eq_text("scope_id", &scope_id.map(str::to_string));
        let sql = format!(
            "SELECT id, scope, scope_id, period, currency, limit_amount, created_at, updated_at FROM budgets{} \
             ORDER BY scope, scope_id, period, currency",
            w.sql()
        );
        let rows = bind_all(sqlx::query(AssertSqlSafe(sql)), w.args)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(budget_from_row).collect()
    }

    // ----- the ledger -------------------------------------------------------------------

    /// Records an intent as a sidecar decided it (sync will call this; tests use it now).
    pub async fn insert_intent(&self, intent: &NewIntent) -> Result<Intent, DbError> {
        let agent = self.get_agent(&intent.agent_id).await?;
        let reasons =
            serde_json::to_string(&intent.reasons).map_err(|e| DbError::Corrupt(e.to_string()))?;
        let mut tx = self.tx().await?;
        sqlx::query(
            "INSERT INTO intents (id, org_id, project_id, agent_id, status, amount, currency, merchant_name, merchant_domain, \
             merchant_country, description, decision_id, reasons, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, NULL, $12, $13, $13)",
        )
        .bind(intent.id.clone())
        .bind(agent.org_id.clone())
        .bind(agent.project_id.clone())
        .bind(agent.id.clone())
        .bind(intent.status.clone())
        .bind(intent.amount)
        .bind(intent.currency.clone())
        .bind(intent.merchant_name.clone())
        .bind(intent.merchant_domain.clone())
        .bind(intent.merchant_country.clone())
        .bind(intent.description.clone())
        .bind(reasons.clone())
        .bind(intent.created_at)
        .execute(&mut *tx)
        .await?;
        if let Some(outcome) = &intent.decision_outcome {
            let decision = NewDecision {
                intent_id: intent.id.clone(),
                outcome: outcome.clone(),
                reasons: intent.reasons.clone(),
                decided_by: "sidecar".into(),
                actor_id: None,
                note: None,
                created_at: intent.created_at,
            };
            Self::insert_decision(&mut tx, &agent, &decision).await?;
        }
        tx.commit().await?;
        self.get_intent(&intent.id).await
    }

    async fn insert_decision(
        conn: &mut sqlx::AnyConnection,
        agent: &Agent,
        d: &NewDecision,
    ) -> Result<String, DbError> {
        let id = new_id("dec");
        let reasons =
            serde_json::to_string(&d.reasons).map_err(|e| DbError::Corrupt(e.to_string()))?;
        sqlx::query(
            "INSERT INTO decisions (id, intent_id, org_id, project_id, agent_id, outcome, reasons, decided_by, actor_id, note, \
             policy_revision, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, NULL, $11)",
        )
        .bind(id.clone())
        .bind(d.intent_id.clone())
        .bind(agent.org_id.clone())
        .bind(agent.project_id.clone())
        .bind(agent.id.clone())
        .bind(d.outcome.clone())
        .bind(reasons)
        .bind(d.decided_by.clone())
        .bind(d.actor_id.clone())
        .bind(d.note.clone())
        .bind(d.created_at)
        .execute(&mut *conn)
        .await?;
        sqlx::query("UPDATE intents SET decision_id = $1 WHERE id = $2")
            .bind(id.clone())
            .bind(d.intent_id.clone())
            .execute(&mut *conn)
            .await?;
        Ok(id)
    }

    pub async fn get_intent(&self, id: &str) -> Result<Intent, DbError> {
        let sql = format!("SELECT {INTENT_COLUMNS} FROM intents WHERE id = $1");
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?
            .ok_or(DbError::NotFound("intent"))?;
        intent_from_row(&row)
    }

    pub async fn list_intents(
        &self,
        filter: &LedgerFilter,
        limit: i64,
        cursor: Option<Cursor>,
    ) -> Result<Page<Intent>, DbError> {
        let w = ledger_where(filter, "status");
        self.fetch_page(
            &format!("SELECT {INTENT_COLUMNS} FROM intents"),
            w,
            limit,
            cursor,
            intent_from_row,
            |i| Cursor {
                created_at: i.created_at,
                id: i.id.clone(),
            },
        )
        .await
    }

    pub async fn list_decisions(
        &self,
        filter: &LedgerFilter,
        limit: i64,
        cursor: Option<Cursor>,
    ) -> Result<Page<Decision>, DbError> {
        let w = ledger_where(filter, "outcome");
        self.fetch_page(
            &format!("SELECT {DECISION_COLUMNS} FROM decisions"),
            w,
            limit,
            cursor,
            decision_from_row,
            |d| Cursor {
                created_at: d.created_at,
                id: d.id.clone(),
            },
        )
        .await
    }

    /// Approves or denies an intent that is `pending_approval`: the intent moves to
    /// `approved`/`declined`, a decision by the administrator is recorded, and the intent's
    /// `admin_*` columns are set, so that while its sidecar still reports it
    /// `pending_approval` the project's bundle carries the decision (`approvals`). Commits
    /// with a configuration-revision bump (waiting long-polls answer at once).
    ///
    /// Refused, with nothing written: any other state ([`DecideError::NotPending`]), a
    /// request whose `expires_at` has passed ([`DecideError::Expired`]: its sidecar
    /// expires it and would ignore the decision), and approving for an agent that is not
    /// active ([`DecideError::AgentFrozen`]; denying stays possible). The intent row is
    /// written first, then the agent row is locked and read, the order every writer that
    /// touches both follows, so a concurrent freeze either is seen or comes after.
    pub async fn decide_pending(
        &self,
        intent_id: &str,
        approve: bool,
        note: Option<&str>,
        actor: &Actor,
        now: i64,
    ) -> Result<(Intent, Decision), DecideError> {
        let mut tx = self.tx().await?;
        let status = if approve { "approved" } else { "declined" };
        let reason = if approve {
            "approved_by_admin"
        } else {
            "denied_by_admin"
        };
        let current = sqlx::query("SELECT status, expires_at FROM intents WHERE id = $1")
            .bind(intent_id.to_string())
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(DbError::NotFound("intent"))?;
        let current_status: String = current.try_get("status")?;
        if current_status != "pending_approval" {
            return Err(DecideError::NotPending(current_status));
        }
        if let Some(at) = current.try_get::<Option<i64>, _>("expires_at")?
            && at <= now
        {
            return Err(DecideError::Expired { expires_at: at });
        }
        let n = sqlx::query(
            "UPDATE intents SET status = $1, updated_at = $2, admin_decision = $1, admin_note = $4, \
             admin_actor = $5, admin_decided_at = $2, reason_messages = NULL \
             WHERE id = $3 AND status = 'pending_approval' AND (expires_at IS NULL OR expires_at > $2)",
        )
        .bind(status)
        .bind(now)
        .bind(intent_id.to_string())
        .bind(note.map(str::to_string))
        .bind(actor.name.clone())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 0 {
            // Decided concurrently, or its deadline passed since the read above.
            let current = sqlx::query("SELECT status, expires_at FROM intents WHERE id = $1")
                .bind(intent_id.to_string())
                .fetch_optional(&mut *tx)
                .await?
                .ok_or(DbError::NotFound("intent"))?;
            let status: String = current.try_get("status")?;
            return Err(match current.try_get::<Option<i64>, _>("expires_at")? {
                Some(at) if status == "pending_approval" => DecideError::Expired { expires_at: at },
                _ => DecideError::NotPending(status),
            });
        }
        let agent_id: String = sqlx::query("SELECT agent_id FROM intents WHERE id = $1")
            .bind(intent_id.to_string())
            .fetch_one(&mut *tx)
            .await?
            .try_get("agent_id")?;
        // Locks the agent row (held to commit on PostgreSQL): a freeze commits before this
        // read or waits for this decision.
        let agent_row = sqlx::query(
            "UPDATE agents SET updated_at = updated_at WHERE id = $1 \
             RETURNING id, org_id, project_id, name, status, frozen_reason, created_at, updated_at",
        )
        .bind(agent_id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(DbError::NotFound("agent"))?;
        let agent = agent_from_row(&agent_row)?;
        if approve && agent.status != "active" {
            // Dropping the transaction rolls the intent's update back.
            return Err(DecideError::AgentFrozen {
                agent_id: agent.id,
                reason: agent.frozen_reason,
            });
        }
        let decision_id = Self::insert_decision(
            &mut tx,
            &agent,
            &NewDecision {
                intent_id: intent_id.to_string(),
                outcome: status.into(),
                reasons: vec![reason.into()],
                decided_by: "admin".into(),
                actor_id: Some(actor.name.clone()),
                note: note.map(str::to_string),
                created_at: now,
            },
        )
        .await?;
        sqlx::query("UPDATE intents SET reasons = $1 WHERE id = $2")
            .bind(serde_json::json!([reason]).to_string())
            .bind(intent_id.to_string())
            .execute(&mut *tx)
            .await?;
        Self::audit(
            &mut tx,
            actor,
            if approve {
                "intent.approve"
            } else {
                "intent.deny"
            },
            "intent",
            intent_id,
            serde_json::json!({"decision_id": decision_id, "note": note}),
            now,
        )
        .await?;
        // The decision reaches the intent's sidecar through the bundle (`approvals`): bump
        // the revision so waiting long-polls answer at once.
        self.commit_config(tx).await?;
        let intent = self.get_intent(intent_id).await?;
        let sql = format!("SELECT {DECISION_COLUMNS} FROM decisions WHERE id = $1");
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(decision_id)
            .fetch_one(&self.pool)
            .await?;
        Ok((intent, decision_from_row(&row)?))
    }

    // ----- admin tokens -----------------------------------------------------------------

    /// Ensures the bootstrap admin token (`roony control-plane --admin-token`, `roony dev`)
    /// with this id and hash exists, and makes it the only active bootstrap token of its
    /// name, in one transaction:
    ///
    /// - a new token is inserted (source `bootstrap`, audit `admin_token.create`, actor
    ///   system); an existing row with the same id is left as it is — in particular a
    ///   revoked one stays revoked;
    /// - if the token is active, every *other* active bootstrap token with the same name is
    ///   revoked (audit `admin_token.revoke`, actor system, reason "replaced by a new
    ///   bootstrap token"), so that restarting with a new token (each `roony dev` run
    ///   without `--admin-token`, a rotated `ROONY_ADMIN_TOKEN`) does not leave the old ones
    ///   valid. Tokens created through the admin API are never revoked here, whatever their
    ///   name; nor is anything revoked when the given token is itself revoked.
    pub async fn ensure_admin_token(
        &self,
        id: &str,
        name: &str,
        token_hash: &str,
        now: i64,
    ) -> Result<BootstrapToken, DbError> {
        let mut tx = self.tx().await?;
        Self::lock_admin_tokens(&mut tx).await?;
        let n = sqlx::query(
            "INSERT INTO admin_tokens (id, name, token_hash, admin_user_id, created_at, last_used_at, revoked_at, source) \
             VALUES ($1, $2, $3, NULL, $4, NULL, NULL, 'bootstrap') ON CONFLICT (id) DO NOTHING",
        )
        .bind(id.to_string())
        .bind(name.to_string())
        .bind(token_hash.to_string())
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let created = n == 1;
        if created {
            Self::audit(
                &mut tx,
                &Actor::system(),
                "admin_token.create",
                "admin_token",
                id,
                serde_json::json!({"name": name, "source": "bootstrap"}),
                now,
            )
            .await?;
        }
        let revoked_at: Option<i64> =
            sqlx::query("SELECT revoked_at FROM admin_tokens WHERE id = $1")
                .bind(id.to_string())
                .fetch_one(&mut *tx)
                .await?
                .try_get("revoked_at")?;
        let mut replaced = Vec::new();
        if revoked_at.is_none() {
            let rows = sqlx::query(
                "SELECT id FROM admin_tokens \
                 WHERE name = $1 AND source = 'bootstrap' AND id <> $2 AND revoked_at IS NULL \
                 ORDER BY created_at, id",
            )
            .bind(name.to_string())
            .bind(id.to_string())
            .fetch_all(&mut *tx)
            .await?;
            for row in rows {
                let old: String = row.try_get("id")?;
                sqlx::query(
                    "UPDATE admin_tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL",
                )
                .bind(now)
                .bind(old.clone())
                .execute(&mut *tx)
                .await?;
                Self::audit(
                    &mut tx,
                    &Actor::system(),
                    "admin_token.revoke",
                    "admin_token",
                    &old,
                    serde_json::json!({
                        "name": name,
                        "reason": "replaced by a new bootstrap token",
                        "replaced_by": id,
                    }),
                    now,
                )
                .await?;
                replaced.push(old);
            }
        }
        tx.commit().await?;
        Ok(BootstrapToken {
            created,
            revoked: revoked_at.is_some(),
            replaced,
        })
    }

    /// First statement of every transaction that revokes admin tokens: locks the active
    /// ones (row locks held to commit on PostgreSQL, also across replicas; the database
    /// write lock on SQLite, `BEGIN IMMEDIATE`), so that two concurrent revocations cannot
    /// both see the other's token active and leave no active token at all.
    async fn lock_admin_tokens(conn: &mut sqlx::AnyConnection) -> Result<(), DbError> {
        sqlx::query("UPDATE admin_tokens SET revoked_at = revoked_at WHERE revoked_at IS NULL")
            .execute(&mut *conn)
            .await?;
        Ok(())
    }

    /// Stores a new admin token created through the admin API (`key`: its id and hash only).
    pub async fn create_admin_token(
        &self,
        name: &str,
        key: &crate::auth::NewKey,
        actor: &Actor,
        now: i64,
    ) -> Result<AdminToken, DbError> {
        let token = AdminToken {
            id: key.key_id.clone(),
            name: name.to_string(),
            created_at: now,
            last_used_at: None,
            revoked_at: None,
        };
        let mut tx = self.tx().await?;
        sqlx::query(
            "INSERT INTO admin_tokens (id, name, token_hash, admin_user_id, created_at, last_used_at, revoked_at, source) \
             VALUES ($1, $2, $3, NULL, $4, NULL, NULL, 'api')",
        )
        .bind(token.id.clone())
        .bind(token.name.clone())
        .bind(key.hash.clone())
        .bind(now)
        .execute(&mut *tx)
        .await?;
        Self::audit(
            &mut tx,
            actor,
            "admin_token.create",
            "admin_token",
            &token.id,
            serde_json::json!({"name": name, "source": "api"}),
            now,
        )
        .await?;
        tx.commit().await?;
        Ok(token)
    }

    /// Every admin token, newest first (never a hash).
    pub async fn list_admin_tokens(&self) -> Result<Vec<AdminToken>, DbError> {
        let rows = sqlx::query(
            "SELECT id, name, created_at, last_used_at, revoked_at FROM admin_tokens \
             ORDER BY created_at DESC, id DESC",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(admin_token_from_row).collect()
    }

    /// Revokes an admin token (audit `admin_token.revoke`), unless it is already revoked or
    /// is the only active one (nobody could use the admin API afterwards). Revoking the
    /// token that makes the request is allowed when another one is active.
    pub async fn revoke_admin_token(
        &self,
        id: &str,
        actor: &Actor,
        now: i64,
    ) -> Result<AdminTokenRevoke, DbError> {
        let mut tx = self.tx().await?;
        Self::lock_admin_tokens(&mut tx).await?;
        let row = sqlx::query(
            "SELECT id, name, created_at, last_used_at, revoked_at FROM admin_tokens WHERE id = $1",
        )
        .bind(id.to_string())
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(DbError::NotFound("admin token"))?;
        let mut token = admin_token_from_row(&row)?;
        if token.revoked_at.is_some() {
            return Ok(AdminTokenRevoke::AlreadyRevoked(token));
        }
        let others: i64 = sqlx::query(
            "SELECT COUNT(*) AS n FROM admin_tokens WHERE revoked_at IS NULL AND id <> $1",
        )
        .bind(id.to_string())
        .fetch_one(&mut *tx)
        .await?
        .try_get("n")?;
        if others == 0 {
            return Ok(AdminTokenRevoke::LastActive);
        }
        sqlx::query("UPDATE admin_tokens SET revoked_at = $1 WHERE id = $2")
            .bind(now)
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        Self::audit(
            &mut tx,
            actor,
            "admin_token.revoke",
            "admin_token",
            id,
            serde_json::json!({"name": token.name, "self": actor.id == id}),
            now,
        )
        .await?;
        tx.commit().await?;
        token.revoked_at = Some(now);
        Ok(AdminTokenRevoke::Revoked(token))
    }

    /// Records a successful authentication with an admin token: sets `last_used_at` to
    /// `now` unless it is already within [`ADMIN_TOKEN_USE_RESOLUTION`] seconds of it (the
    /// hot path writes at most once a minute per token). Not audited.
    pub async fn touch_admin_token(&self, id: &str, now: i64) -> Result<(), DbError> {
        sqlx::query(
            "UPDATE admin_tokens SET last_used_at = $1 \
             WHERE id = $2 AND revoked_at IS NULL AND (last_used_at IS NULL OR last_used_at <= $3)",
        )
        .bind(now)
        .bind(id.to_string())
        .bind(now.saturating_sub(ADMIN_TOKEN_USE_RESOLUTION))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    // ----- sync -------------------------------------------------------------------------

    /// Bumps the configuration revision inside `tx`, commits, and wakes this process's
    /// long-polls. Every write that changes what a bundle contains ends with this.
    async fn commit_config(
        &self,
        mut tx: sqlx::Transaction<'static, sqlx::Any>,
    ) -> Result<i64, DbError> {
        let revision: i64 = sqlx::query(
            "UPDATE config_revision SET revision = revision + 1 WHERE id = 1 RETURNING revision",
        )
        .fetch_one(&mut *tx)
        .await?
        .try_get("revision")?;
        tx.commit().await?;
        self.changes.send_replace(revision);
        Ok(revision)
    }

    /// Notified (with the revision) whenever this process commits a configuration change.
    pub fn subscribe_changes(&self) -> tokio::sync::watch::Receiver<i64> {
        self.changes.subscribe()
    }

    /// The current configuration revision (as committed by any replica).
    pub async fn config_revision(&self) -> Result<i64, DbError> {
        Ok(
            sqlx::query("SELECT revision FROM config_revision WHERE id = 1")
                .fetch_one(&self.pool)
                .await?
                .try_get("revision")?,
        )
    }

    /// Registers a sidecar of a project with `token` (hash only).
    pub async fn create_sidecar(
        &self,
        project_id: &str,
        name: &str,
        token: &crate::auth::NewKey,
        actor: &Actor,
        now: i64,
    ) -> Result<Sidecar, DbError> {
        let mut tx = self.tx().await?;
        sqlx::query("SELECT id FROM projects WHERE id = $1")
            .bind(project_id.to_string())
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(DbError::NotFound("project"))?;
        let sidecar = Sidecar {
            id: new_id("sc"),
            project_id: project_id.to_string(),
            name: name.to_string(),
            created_at: now,
            revoked_at: None,
        };
        sqlx::query(
            "INSERT INTO sidecars (id, project_id, name, token_id, token_hash, created_at, revoked_at) \
             VALUES ($1, $2, $3, $4, $5, $6, NULL)",
        )
        .bind(sidecar.id.clone())
        .bind(sidecar.project_id.clone())
        .bind(sidecar.name.clone())
        .bind(token.key_id.clone())
        .bind(token.hash.clone())
        .bind(now)
        .execute(&mut *tx)
        .await?;
        Self::audit(
            &mut tx,
            actor,
            "sidecar.create",
            "sidecar",
            &sidecar.id,
            serde_json::json!({"project_id": project_id, "name": name}),
            now,
        )
        .await?;
        tx.commit().await?;
        Ok(sidecar)
    }

    /// Every sidecar, newest first.
    pub async fn list_sidecars(&self) -> Result<Vec<Sidecar>, DbError> {
        let rows = sqlx::query(
            "SELECT id, project_id, name, created_at, revoked_at FROM sidecars ORDER BY created_at DESC, id DESC",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Sidecar {
                    id: r.try_get("id")?,
                    project_id: r.try_get("project_id")?,
                    name: r.try_get("name")?,
                    created_at: r.try_get("created_at")?,
                    revoked_at: r.try_get("revoked_at")?,
                })
            })
            .collect()
    }

    /// The sidecar a token id names, with its stored hash.
    pub async fn find_sidecar(&self, token_id: &str) -> Result<Option<SidecarAuth>, DbError> {
        let row = sqlx::query(
            "SELECT s.id, s.project_id, p.org_id, s.token_hash, s.revoked_at FROM sidecars s \
             JOIN projects p ON p.id = s.project_id WHERE s.token_id = $1",
        )
        .bind(token_id.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(SidecarAuth {
                id: r.try_get("id")?,
                project_id: r.try_get("project_id")?,
                org_id: r.try_get("org_id")?,
                token_hash: r.try_get("token_hash")?,
                revoked: r.try_get::<Option<i64>, _>("revoked_at")?.is_some(),
            })
        })
        .transpose()
    }

    /// Every agent of a project with its current policy and keys, ordered by id (the
    /// content of a bundle).
    pub async fn bundle_agents(&self, project_id: &str) -> Result<Vec<BundleAgent>, DbError> {
        let agents = sqlx::query(
            "SELECT a.id, a.name, a.status, r.document FROM agents a \
             LEFT JOIN policies p ON p.agent_id = a.id \
             LEFT JOIN policy_revisions r ON r.policy_id = p.id AND r.revision = p.current_revision \
             WHERE a.project_id = $1 ORDER BY a.id",
        )
        .bind(project_id.to_string())
        .fetch_all(&self.pool)
        .await?;
        let keys = sqlx::query(
            "SELECT k.key_id, k.agent_id, k.key_hash, k.revoked_at FROM agent_keys k \
             JOIN agents a ON a.id = k.agent_id WHERE a.project_id = $1 ORDER BY k.key_id",
        )
        .bind(project_id.to_string())
        .fetch_all(&self.pool)
        .await?;
        let budgets = sqlx::query(AssertSqlSafe(format!(
            "SELECT {BUDGET_COLUMNS} FROM budgets b JOIN agents a ON a.id = b.scope_id \
             WHERE b.scope = 'agent' AND a.project_id = $1 ORDER BY b.id"
        )))
        .bind(project_id.to_string())
        .fetch_all(&self.pool)
        .await?;
        let mut budgets_by_agent: std::collections::HashMap<String, Vec<BundleBudget>> =
            std::collections::HashMap::new();
        for b in &budgets {
            let b = bundle_budget_from_row(b)?;
            budgets_by_agent
                .entry(b.scope_id.clone())
                .or_default()
                .push(b);
        }
        let mut by_agent: std::collections::HashMap<String, Vec<BundleKey>> =
            std::collections::HashMap::new();
        for k in &keys {
            by_agent
                .entry(k.try_get("agent_id")?)
                .or_default()
                .push(BundleKey {
                    key_id: k.try_get("key_id")?,
                    key_hash: k.try_get("key_hash")?,
                    revoked: k.try_get::<Option<i64>, _>("revoked_at")?.is_some(),
                });
        }
        agents
            .iter()
            .map(|a| {
                let id: String = a.try_get("id")?;
                let document: Option<String> = a.try_get("document")?;
                Ok(BundleAgent {
                    name: a.try_get("name")?,
                    status: a.try_get("status")?,
                    policy: document.as_deref().map(parse_json).transpose()?,
                    keys: by_agent.remove(&id).unwrap_or_default(),
                    budgets: budgets_by_agent.remove(&id).unwrap_or_default(),
                    id,
                })
            })
            .collect()
    }

    /// The shared budgets of a project's bundle: the project's own and its organization's,
    /// ordered by id (spent through leases).
    pub async fn bundle_budgets(&self, project_id: &str) -> Result<Vec<BundleBudget>, DbError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {BUDGET_COLUMNS} FROM budgets b \
             WHERE (b.scope = 'project' AND b.scope_id = $1) \
             OR (b.scope = 'org' AND b.scope_id = (SELECT p.org_id FROM projects p WHERE p.id = $1)) \
             ORDER BY b.id"
        )))
        .bind(project_id.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(bundle_budget_from_row).collect()
    }

    /// Administrators' decisions on intents of a project that its sidecar still reports
    /// `pending_approval`, ordered by intent id (the `approvals` of its bundle).
    pub async fn bundle_approvals(&self, project_id: &str) -> Result<Vec<BundleApproval>, DbError> {
        let rows = sqlx::query(
            "SELECT id, agent_id, admin_decision, admin_note, admin_actor, admin_decided_at FROM intents \
             WHERE project_id = $1 AND sidecar_status = 'pending_approval' AND admin_decision IS NOT NULL \
             ORDER BY id",
        )
        .bind(project_id.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(BundleApproval {
                    intent_id: r.try_get("id")?,
                    agent_id: r.try_get("agent_id")?,
                    approved: r.try_get::<String, _>("admin_decision")? == "approved",
                    note: r.try_get("admin_note")?,
                    actor: r
                        .try_get::<Option<String>, _>("admin_actor")?
                        .unwrap_or_default(),
                    decided_at: r
                        .try_get::<Option<i64>, _>("admin_decided_at")?
                        .unwrap_or_default(),
                })
            })
            .collect()
    }

    /// Revokes a sidecar's token: its bundle, events and lease requests are refused (`401
    /// invalid_sidecar_token`) from now on. Bumps the configuration revision so that its
    /// waiting long-polls wake and end with 401 at once.
    ///
    /// The leases it holds stay counted against their budgets (conservative: what it
    /// approved within them stays approved); they end with their period buckets.
    pub async fn revoke_sidecar(
        &self,
        id: &str,
        actor: &Actor,
        now: i64,
    ) -> Result<Sidecar, DbError> {
        let mut tx = self.tx().await?;
        let row = sqlx::query(
            "SELECT id, project_id, name, created_at, revoked_at FROM sidecars WHERE id = $1",
        )
        .bind(id.to_string())
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(DbError::NotFound("sidecar"))?;
        let mut sidecar = Sidecar {
            id: row.try_get("id")?,
            project_id: row.try_get("project_id")?,
            name: row.try_get("name")?,
            created_at: row.try_get("created_at")?,
            revoked_at: row.try_get("revoked_at")?,
        };
        if sidecar.revoked_at.is_some() {
            return Err(DbError::Conflict("the sidecar is already revoked".into()));
        }
        sqlx::query("UPDATE sidecars SET revoked_at = $1 WHERE id = $2")
            .bind(now)
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        Self::audit(
            &mut tx,
            actor,
            "sidecar.revoke",
            "sidecar",
            id,
            serde_json::json!({"project_id": sidecar.project_id}),
            now,
        )
        .await?;
        self.commit_config(tx).await?;
        sidecar.revoked_at = Some(now);
        Ok(sidecar)
    }

    // ----- events up (the sidecars' outboxes) -------------------------------------------

    /// Applies a batch of events from a sidecar's outbox in one transaction.
    ///
    /// Each event id is applied once (`sync_event_ids`; a repeat counts as a duplicate). An
    /// event whose agent is unknown or not in the sidecar's project, whose intent belongs to
    /// another agent, or whose content is invalid is rejected for good (recorded as seen and
    /// as a failed audit event). Otherwise the intent snapshot is upserted only if its
    /// `version` is newer than the one held (reordered and late events are harmless), with
    /// the sidecar's decision and card reference, and one audit event is written.
    ///
    /// While an administrator's decision is set on the intent, a `pending_approval`
    /// snapshot does not overwrite its status (the sidecar has not acted on the decision
    /// yet), and the intent keeps pointing at the administrator's decision. The batch
    /// commits with a configuration-revision bump only if it changed an intent carrying an
    /// administrator's decision (the bundle's `approvals` may have changed); otherwise
    /// events never wake long-polls.
    pub async fn apply_events(
        &self,
        sidecar: &SidecarAuth,
        events: &[SyncEvent],
        now: i64,
    ) -> Result<EventAck, DbError> {
        let actor = Actor {
            kind: "sidecar",
            id: sidecar.id.clone(),
            name: sidecar.id.clone(),
            request_id: Some(new_id("req")),
        };
        let mut ack = EventAck {
            accepted: 0,
            duplicates: 0,
            rejected: Vec::new(),
        };
        let mut approvals_changed = false;
        let mut tx = self.tx().await?;
        for event in events {
            let fresh = sqlx::query(
                "INSERT INTO sync_event_ids (event_id, received_at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            )
            .bind(event.id.clone())
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if fresh == 0 {
                ack.duplicates += 1;
                continue;
            }
            match Self::apply_event(&mut tx, sidecar, &actor, event).await? {
                Ok(admin_decided) => {
                    ack.accepted += 1;
                    approvals_changed |= admin_decided;
                }
                Err((code, message)) => {
                    Self::audit_outcome(
                        &mut tx,
                        &actor,
                        &audit_action(&event.action),
                        ("intent", &event.intent.id),
                        "failure",
                        serde_json::json!({
                            "event_id": event.id,
                            "agent_id": event.intent.agent_id,
                            "code": code,
                            "message": message,
                        }),
                        now,
                    )
                    .await?;
                    ack.rejected.push(RejectedEvent {
                        id: event.id.clone(),
                        code: code.to_string(),
                        message,
                    });
                }
            }
        }
        if approvals_changed {
            self.commit_config(tx).await?;
        } else {
            tx.commit().await?;
        }
        Ok(ack)
    }

    /// Applies one new event. `Ok(Ok(true))` when it changed an intent that carries an
    /// administrator's decision; `Ok(Err((code, message)))` when it is rejected.
    async fn apply_event(
        conn: &mut sqlx::AnyConnection,
        sidecar: &SidecarAuth,
        actor: &Actor,
        event: &SyncEvent,
    ) -> Result<Result<bool, (&'static str, String)>, DbError> {
        let i = &event.intent;
        if let Err(message) = check_event(event) {
            return Ok(Err(("invalid_event", message)));
        }
        let agent = sqlx::query("SELECT org_id, project_id FROM agents WHERE id = $1")
            .bind(i.agent_id.clone())
            .fetch_optional(&mut *conn)
            .await?;
        let Some(agent) = agent else {
            return Ok(Err(("unknown_agent", format!("no agent {}", i.agent_id))));
        };
        let org_id: String = agent.try_get("org_id")?;
        let project_id: String = agent.try_get("project_id")?;
        if project_id != sidecar.project_id {
            return Ok(Err((
                "agent_not_in_project",
                format!("agent {} is not in the sidecar's project", i.agent_id),
            )));
        }
        let owner = sqlx::query("SELECT agent_id FROM intents WHERE id = $1")
            .bind(i.id.clone())
            .fetch_optional(&mut *conn)
            .await?;
        if let Some(owner) = owner
            && owner.try_get::<String, _>("agent_id")? != i.agent_id
        {
            return Ok(Err((
                "intent_of_another_agent",
                format!("intent {} belongs to another agent", i.id),
            )));
        }
        let reasons = serde_json::to_string(&i.decision.reasons)
            .map_err(|e| DbError::Corrupt(e.to_string()))?;
        // Applied only if newer; RETURNING yields a row only when it was.
        let applied = sqlx::query(
            "INSERT INTO intents (id, org_id, project_id, agent_id, status, amount, currency, merchant_name, \
             merchant_domain, merchant_country, description, decision_id, reasons, created_at, updated_at, \
             version, sidecar_id, sidecar_status, reserved, status_reason, merchant_category, expires_at, \
             risk_score, risk_signals, reason_messages) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $5, $18, $19, $20, $21, \
             $22, $23, $24) \
             ON CONFLICT (id) DO UPDATE SET \
             status = CASE WHEN intents.admin_decision IS NOT NULL AND excluded.status = 'pending_approval' \
                 THEN intents.status WHEN intents.status = 'settled' THEN intents.status ELSE excluded.status END, \
             amount = CASE WHEN intents.admin_decision IS NOT NULL THEN intents.amount ELSE excluded.amount END, \
             currency = CASE WHEN intents.admin_decision IS NOT NULL THEN intents.currency ELSE excluded.currency END, \
             merchant_name = excluded.merchant_name, \
             merchant_domain = excluded.merchant_domain, merchant_country = excluded.merchant_country, \
             merchant_category = excluded.merchant_category, expires_at = excluded.expires_at, \
             description = excluded.description, \
             decision_id = CASE WHEN intents.admin_decision IS NOT NULL THEN intents.decision_id \
                 ELSE excluded.decision_id END, \
             reasons = CASE WHEN intents.admin_decision IS NOT NULL THEN intents.reasons ELSE excluded.reasons END, \
             reason_messages = CASE WHEN intents.admin_decision IS NOT NULL THEN intents.reason_messages \
                 ELSE excluded.reason_messages END, \
             updated_at = excluded.updated_at, version = excluded.version, sidecar_id = excluded.sidecar_id, \
             sidecar_status = excluded.sidecar_status, reserved = excluded.reserved, \
             status_reason = excluded.status_reason, risk_score = excluded.risk_score, \
             risk_signals = excluded.risk_signals \
             WHERE intents.version < excluded.version \
             RETURNING admin_decision",
        )
        .bind(i.id.clone())
        .bind(org_id.clone())
        .bind(project_id.clone())
        .bind(i.agent_id.clone())
        .bind(i.status.clone())
        .bind(i.amount)
        .bind(i.currency.clone())
        .bind(i.merchant_name.clone())
        .bind(i.merchant_domain.clone())
        .bind(i.merchant_country.clone())
        .bind(i.description.clone())
        .bind(i.decision.id.clone())
        .bind(reasons.clone())
        .bind(i.created_at)
        .bind(i.updated_at)
        .bind(i.version)
        .bind(sidecar.id.clone())
        .bind(i.reserved)
        .bind(i.status_reason.clone())
        .bind(i.merchant_category.clone())
        .bind(i.expires_at)
        .bind(i.risk_score.map(i64::from))
        .bind(
            serde_json::to_string(&i.risk_signals).map_err(|e| DbError::Corrupt(e.to_string()))?,
        )
        .bind(if i.decision.messages.is_empty() {
            None
        } else {
            Some(
                serde_json::to_string(&i.decision.messages)
                    .map_err(|e| DbError::Corrupt(e.to_string()))?,
            )
        })
        .fetch_optional(&mut *conn)
        .await?;
        let mut admin_decided = false;
        if let Some(row) = &applied {
            admin_decided = row
                .try_get::<Option<String>, _>("admin_decision")?
                .is_some();
            // The sidecar's decision, by its own id (the intent keeps pointing at an
            // administrator's decision, if there is one).
            sqlx::query(
                "INSERT INTO decisions (id, intent_id, org_id, project_id, agent_id, outcome, reasons, decided_by, \
                 actor_id, note, policy_revision, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, 'sidecar', $8, NULL, NULL, $9) \
                 ON CONFLICT (id) DO UPDATE SET outcome = excluded.outcome, reasons = excluded.reasons \
                 WHERE decisions.intent_id = excluded.intent_id",
            )
            .bind(i.decision.id.clone())
            .bind(i.id.clone())
            .bind(org_id)
            .bind(project_id)
            .bind(i.agent_id.clone())
            .bind(i.decision.outcome.clone())
            .bind(reasons)
            .bind(sidecar.id.clone())
            .bind(i.decision.decided_at)
            .execute(&mut *conn)
            .await?;
            if let Some(card) = &i.card {
                let status = match i.status.as_str() {
                    "approved" | "issuing" | "pending_approval" => "active",
                    _ => "canceled",
                };
                sqlx::query(
                    "INSERT INTO cards (id, intent_id, agent_id, stripe_card_id, last4, exp_month, exp_year, \
                     spending_limit, currency, status, created_at, updated_at) \
                     VALUES ($1, $2, $3, $1, $4, $5, $6, $7, $8, $9, $10, $10) \
                     ON CONFLICT (stripe_card_id) DO UPDATE SET \
                     status = CASE WHEN cards.status = 'canceled' THEN cards.status ELSE excluded.status END, \
                     spending_limit = excluded.spending_limit, updated_at = excluded.updated_at \
                     WHERE cards.intent_id = excluded.intent_id",
                )
                .bind(card.stripe_card_id.clone())
                .bind(i.id.clone())
                .bind(i.agent_id.clone())
                .bind(card.last4.clone())
                .bind(card.exp_month)
                .bind(card.exp_year)
                .bind(card.spending_limit)
                .bind(i.currency.clone())
                .bind(status)
                .bind(i.updated_at)
                .execute(&mut *conn)
                .await?;
            }
        }
        Self::audit_outcome(
            &mut *conn,
            actor,
            &audit_action(&event.action),
            ("intent", &i.id),
            "success",
            serde_json::json!({
                "event_id": event.id,
                "agent_id": i.agent_id,
                "version": i.version,
                "status": i.status,
                "status_reason": i.status_reason,
                "reasons": i.decision.reasons,
                "amount": i.amount,
                "currency": i.currency,
                "applied": applied.is_some(),
            }),
            event.at,
        )
        .await?;
        Ok(Ok(admin_decided))
    }

    // ----- leases of shared budgets ------------------------------------------------------

    /// Sets a sidecar's allowance of a shared budget for one period bucket to what it wants,
    /// as far as the budget allows, in one transaction.
    ///
    /// **Invariant**: for every budget and bucket, the sum of the allowances granted to all
    /// sidecars never exceeds the budget's limit at the time of each grant. The first
    /// statement locks the budget row (`UPDATE budgets …`: a row lock held to commit on
    /// PostgreSQL, also across replicas; the database write lock on SQLite, `BEGIN
    /// IMMEDIATE`), so concurrent grants of one budget are serialized and each sees every
    /// other sidecar's committed allowance: it grants at most `limit − others`. (A limit
    /// lowered below what is already granted leaves existing allowances alone; new grants
    /// are then 0 until others give allowance back.)
    ///
    /// A request whose `seq` is not newer than the newest this sidecar has applied to the
    /// budget is stale (a late retry): the allowance held is returned unchanged. A budget
    /// that does not exist or is not the sidecar's project's or organization's grants 0 with
    /// limit 0. Granting for a bucket drops this sidecar's allowances of older buckets of
    /// the budget. Allowances of revoked sidecars stay counted until their bucket ends.
    pub async fn grant_lease(
        &self,
        sidecar: &SidecarAuth,
        seq: i64,
        want: &LeaseWant,
        now: i64,
    ) -> Result<LeaseGrant, DbError> {
        let mut grant = LeaseGrant {
            budget_id: want.budget_id.clone(),
            bucket_start: want.bucket_start,
            granted: 0,
            limit: 0,
            leased_total: 0,
        };
        let mut tx = self.tx().await?;
        // First statement: the lock that serializes grants of this budget.
        let locked = sqlx::query("UPDATE budgets SET updated_at = updated_at WHERE id = $1")
            .bind(want.budget_id.clone())
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if locked == 0 {
            tx.rollback().await?;
            return Ok(grant);
        }
        let budget = sqlx::query("SELECT scope, scope_id, limit_amount FROM budgets WHERE id = $1")
            .bind(want.budget_id.clone())
            .fetch_one(&mut *tx)
            .await?;
        let scope: String = budget.try_get("scope")?;
        let scope_id: String = budget.try_get("scope_id")?;
        let applies = match scope.as_str() {
            "project" => scope_id == sidecar.project_id,
            "org" => scope_id == sidecar.org_id,
            _ => false,
        };
        if !applies {
            tx.rollback().await?;
            return Ok(grant);
        }
        grant.limit = budget.try_get("limit_amount")?;
        let others: i64 = sqlx::query(
            "SELECT CAST(COALESCE(SUM(granted), 0) AS BIGINT) AS total FROM budget_leases \
             WHERE budget_id = $1 AND bucket_start = $2 AND sidecar_id <> $3",
        )
        .bind(want.budget_id.clone())
        .bind(want.bucket_start)
        .bind(sidecar.id.clone())
        .fetch_one(&mut *tx)
        .await?
        .try_get("total")?;
        let held: Option<i64> = sqlx::query(
            "SELECT granted FROM budget_leases WHERE budget_id = $1 AND bucket_start = $2 AND sidecar_id = $3",
        )
        .bind(want.budget_id.clone())
        .bind(want.bucket_start)
        .bind(sidecar.id.clone())
        .fetch_optional(&mut *tx)
        .await?
        .map(|r| r.try_get("granted"))
        .transpose()?;
        let newest_seq: Option<i64> = sqlx::query(
            "SELECT MAX(seq) AS seq FROM budget_leases WHERE budget_id = $1 AND sidecar_id = $2",
        )
        .bind(want.budget_id.clone())
        .bind(sidecar.id.clone())
        .fetch_one(&mut *tx)
        .await?
        .try_get("seq")?;
        if newest_seq.is_some_and(|newest| newest >= seq) {
            tx.rollback().await?;
            grant.granted = held.unwrap_or(0);
            grant.leased_total = others.saturating_add(grant.granted);
            return Ok(grant);
        }
        let room = grant.limit.saturating_sub(others).max(0);
        grant.granted = want.want.min(room).max(0);
        grant.leased_total = others.saturating_add(grant.granted);
        sqlx::query(
            "INSERT INTO budget_leases (budget_id, bucket_start, sidecar_id, granted, seq, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (budget_id, bucket_start, sidecar_id) DO UPDATE SET granted = excluded.granted, \
             seq = excluded.seq, updated_at = excluded.updated_at",
        )
        .bind(want.budget_id.clone())
        .bind(want.bucket_start)
        .bind(sidecar.id.clone())
        .bind(grant.granted)
        .bind(seq)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "DELETE FROM budget_leases WHERE budget_id = $1 AND sidecar_id = $2 AND bucket_start < $3",
        )
        .bind(want.budget_id.clone())
        .bind(sidecar.id.clone())
        .bind(want.bucket_start)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(grant)
    }

    /// The allowances held of a budget, newest bucket first, then by sidecar.
    pub async fn list_budget_leases(&self, budget_id: &str) -> Result<Vec<BudgetLease>, DbError> {
        sqlx::query("SELECT id FROM budgets WHERE id = $1")
            .bind(budget_id.to_string())
            .fetch_optional(&self.pool)
            .await?
            .ok_or(DbError::NotFound("budget"))?;
        let rows = sqlx::query(
            "SELECT budget_id, bucket_start, sidecar_id, granted, seq, updated_at FROM budget_leases \
             WHERE budget_id = $1 ORDER BY bucket_start DESC, sidecar_id",
        )
        .bind(budget_id.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(BudgetLease {
                    budget_id: r.try_get("budget_id")?,
                    bucket_start: r.try_get("bucket_start")?,
                    sidecar_id: r.try_get("sidecar_id")?,
                    granted: r.try_get("granted")?,
                    seq: r.try_get("seq")?,
                    updated_at: r.try_get("updated_at")?,
                })
            })
            .collect()
    }

    pub async fn find_admin_token(&self, id: &str) -> Result<Option<AdminTokenRecord>, DbError> {
        let row = sqlx::query(
            "SELECT id, name, token_hash, last_used_at, revoked_at FROM admin_tokens WHERE id = $1",
        )
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(AdminTokenRecord {
                id: r.try_get("id")?,
                name: r.try_get("name")?,
                token_hash: r.try_get("token_hash")?,
                revoked: r.try_get::<Option<i64>, _>("revoked_at")?.is_some(),
                last_used_at: r.try_get("last_used_at")?,
            })
        })
        .transpose()
    }
}

const INTENT_COLUMNS: &str = "id, org_id, project_id, agent_id, status, amount, currency, merchant_name, merchant_domain, \
     merchant_country, description, decision_id, reasons, created_at, updated_at, version, reserved, sidecar_id, \
     sidecar_status, status_reason, merchant_category, expires_at, captured, refunded, pending, risk_score, \
     risk_signals";
const BUDGET_COLUMNS: &str =
    "b.id, b.scope, b.scope_id, b.period, b.currency, b.limit_amount, b.created_at, b.updated_at";
const DECISION_COLUMNS: &str = "id, intent_id, org_id, project_id, agent_id, outcome, reasons, decided_by, actor_id, note, \
     policy_revision, created_at";

fn ledger_where(filter: &LedgerFilter, status_column: &str) -> Where {
    let mut w = Where::default();
    w.eq_text("org_id", &filter.org_id);
    w.eq_text("project_id", &filter.project_id);
    w.eq_text("agent_id", &filter.agent_id);
    w.eq_text(status_column, &filter.status);
    w.cmp_int("created_at", ">=", filter.created_from);
    w.cmp_int("created_at", "<", filter.created_to);
    w
}

/// Intent statuses a sidecar may report.
const SIDECAR_STATUSES: &[&str] = &[
    "issuing",
    "approved",
    "declined",
    "pending_approval",
    "failed",
    "canceled",
    "expired",
    "settled",
];

/// The audit action of an event: its own when well-formed, else `intent.event`.
fn audit_action(action: &str) -> String {
    let ok = action.starts_with("intent.")
        && action.len() <= 64
        && action
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b == b'.' || b == b'_');
    if ok {
        action.to_string()
    } else {
        "intent.event".to_string()
    }
}

/// Checks what the ledger needs of an event (the sidecar is trusted with the rest).
fn check_event(e: &SyncEvent) -> Result<(), String> {
    let i = &e.intent;
    let text_ok =
        |s: &str, max: usize| !s.is_empty() && s.len() <= max && !s.contains(char::is_control);
    if !text_ok(&e.id, 200) {
        return Err("the event id must be 1 to 200 printable characters".into());
    }
    if !text_ok(&i.id, 128) || !text_ok(&i.agent_id, 128) || !text_ok(&i.decision.id, 128) {
        return Err("intent, agent and decision ids must be 1 to 128 printable characters".into());
    }
    if audit_action(&e.action) != e.action {
        return Err(format!("unknown action {:?}", e.action));
    }
    if !SIDECAR_STATUSES.contains(&i.status.as_str()) {
        return Err(format!("unknown intent status {:?}", i.status));
    }
    if !["approved", "declined", "pending_approval"].contains(&i.decision.outcome.as_str()) {
        return Err(format!("unknown decision outcome {:?}", i.decision.outcome));
    }
    if i.version < 1 {
        return Err("the intent version must be at least 1".into());
    }
    if i.amount < 0 || i.reserved < 0 {
        return Err("amounts must not be negative".into());
    }
    if i.currency.len() != 3 || !i.currency.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err("the currency must be an upper-case ISO 4217 code".into());
    }
    if i.decision.messages.len() > 64 || i.decision.messages.iter().any(|m| m.len() > 4000) {
        return Err("at most 64 reason messages of at most 4000 bytes each".into());
    }
    if let Some(card) = &i.card
        && !text_ok(&card.stripe_card_id, 128)
    {
        return Err("the card id must be 1 to 128 printable characters".into());
    }
    // PostgreSQL TEXT cannot hold NUL: refuse it here rather than fail the whole batch.
    if serde_json::to_string(e).is_ok_and(|json| json.contains("\\u0000")) {
        return Err("text fields must not contain NUL characters".into());
    }
    Ok(())
}

fn parse_json<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, DbError> {
    serde_json::from_str(text).map_err(|e| DbError::Corrupt(e.to_string()))
}

fn org_from_row(r: &AnyRow) -> Result<Organization, DbError> {
    Ok(Organization {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        is_default: r.try_get::<i64, _>("is_default")? == 1,
        created_at: r.try_get("created_at")?,
    })
}

fn project_from_row(r: &AnyRow) -> Result<Project, DbError> {
    Ok(Project {
        id: r.try_get("id")?,
        org_id: r.try_get("org_id")?,
        name: r.try_get("name")?,
        created_at: r.try_get("created_at")?,
    })
}

fn agent_from_row(r: &AnyRow) -> Result<Agent, DbError> {
    Ok(Agent {
        id: r.try_get("id")?,
        org_id: r.try_get("org_id")?,
        project_id: r.try_get("project_id")?,
        name: r.try_get("name")?,
        status: r.try_get("status")?,
        frozen_reason: r.try_get("frozen_reason")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

fn admin_token_from_row(r: &AnyRow) -> Result<AdminToken, DbError> {
    Ok(AdminToken {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        created_at: r.try_get("created_at")?,
        last_used_at: r.try_get("last_used_at")?,
        revoked_at: r.try_get("revoked_at")?,
    })
}

fn key_from_row(r: &AnyRow) -> Result<AgentKey, DbError> {
    Ok(AgentKey {
        key_id: r.try_get("key_id")?,
        agent_id: r.try_get("agent_id")?,
        created_at: r.try_get("created_at")?,
        revoked_at: r.try_get("revoked_at")?,
    })
}

fn revision_from_row(r: &AnyRow) -> Result<PolicyRevision, DbError> {
    Ok(PolicyRevision {
        agent_id: r.try_get("agent_id")?,
        policy_id: r.try_get("policy_id")?,
        revision: r.try_get("revision")?,
        author: r.try_get("author")?,
        created_at: r.try_get("created_at")?,
        document: parse_json(&r.try_get::<String, _>("document")?)?,
    })
}

fn budget_from_row(r: &AnyRow) -> Result<Budget, DbError> {
    let scope: String = r.try_get("scope")?;
    Ok(Budget {
        id: r.try_get("id")?,
        scope: BudgetScope::parse(&scope)
            .ok_or_else(|| DbError::Corrupt(format!("unknown budget scope {scope}")))?,
        scope_id: r.try_get("scope_id")?,
        period: r.try_get("period")?,
        currency: r.try_get("currency")?,
        limit: r.try_get("limit_amount")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

fn bundle_budget_from_row(r: &AnyRow) -> Result<BundleBudget, DbError> {
    Ok(BundleBudget {
        id: r.try_get("id")?,
        scope: r.try_get("scope")?,
        scope_id: r.try_get("scope_id")?,
        period: r.try_get("period")?,
        currency: r.try_get("currency")?,
        limit: r.try_get("limit_amount")?,
    })
}

fn intent_from_row(r: &AnyRow) -> Result<Intent, DbError> {
    Ok(Intent {
        id: r.try_get("id")?,
        org_id: r.try_get("org_id")?,
        project_id: r.try_get("project_id")?,
        agent_id: r.try_get("agent_id")?,
        status: r.try_get("status")?,
        amount: r.try_get("amount")?,
        currency: r.try_get("currency")?,
        merchant_name: r.try_get("merchant_name")?,
        merchant_domain: r.try_get("merchant_domain")?,
        merchant_country: r.try_get("merchant_country")?,
        description: r.try_get("description")?,
        decision_id: r.try_get("decision_id")?,
        reasons: parse_json(&r.try_get::<String, _>("reasons")?)?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
        version: r.try_get("version")?,
        reserved: r.try_get("reserved")?,
        sidecar_id: r.try_get("sidecar_id")?,
        sidecar_status: r.try_get("sidecar_status")?,
        status_reason: r.try_get("status_reason")?,
        merchant_category: r.try_get("merchant_category")?,
        expires_at: r.try_get("expires_at")?,
        captured: r.try_get("captured")?,
        refunded: r.try_get("refunded")?,
        pending: r.try_get("pending")?,
        risk_score: r.try_get("risk_score")?,
        risk_signals: parse_json(&r.try_get::<String, _>("risk_signals")?)?,
    })
}

fn decision_from_row(r: &AnyRow) -> Result<Decision, DbError> {
    Ok(Decision {
        id: r.try_get("id")?,
        intent_id: r.try_get("intent_id")?,
        org_id: r.try_get("org_id")?,
        project_id: r.try_get("project_id")?,
        agent_id: r.try_get("agent_id")?,
        outcome: r.try_get("outcome")?,
        reasons: parse_json(&r.try_get::<String, _>("reasons")?)?,
        decided_by: r.try_get("decided_by")?,
        actor: r.try_get("actor_id")?,
        note: r.try_get("note")?,
        policy_revision: r.try_get("policy_revision")?,
        created_at: r.try_get("created_at")?,
    })
}

fn audit_from_row(r: &AnyRow) -> Result<AuditEvent, DbError> {
    Ok(AuditEvent {
        id: r.try_get("id")?,
        actor_type: r.try_get("actor_type")?,
        actor_id: r.try_get("actor_id")?,
        action: r.try_get("action")?,
        target_type: r.try_get("target_type")?,
        target_id: r.try_get("target_id")?,
        outcome: r.try_get("outcome")?,
        request_id: r.try_get("request_id")?,
        created_at: r.try_get("created_at")?,
        details: parse_json(&r.try_get::<String, _>("details")?)?,
    })
}
