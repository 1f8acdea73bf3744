//! The control plane (`roony control-plane`): organizations, projects, agents, versioned
//! policies, budgets, approvals and the ledger, in SQLite or PostgreSQL (`db`), behind the
//! admin API (`api`). `sync` is its side of sync (wire types in `crate::sync::wire`): it
//! serves sidecars their project's signed bundle (policies, budgets, administrators'
//! approvals), applies their outboxes to the ledger and grants allowances (leases) of
//! shared budgets.

pub mod admin_cli;
pub mod api;
pub mod audit;
pub mod connect;
pub mod dashboard;
pub mod db;
pub mod guard;
pub mod model;
pub mod reconcile;
pub mod relay;
pub mod secrets;
pub mod secrets_cli;
pub mod sync;
pub mod webhooks;

use std::net::SocketAddr;
use std::path::Path;

use rand::RngCore;

pub use db::{ControlDb, DbError};

/// Default listen address of the control plane.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8788";

#[derive(Clone)]
pub struct ControlConfig {
    /// `sqlite://…` or `postgres://…`.
    pub database_url: String,
    pub listen: SocketAddr,
    /// If set, an admin token with this plaintext exists after start-up, and the other
    /// bootstrap tokens of `bootstrap_admin_name` are revoked (see [`open`]).
    pub bootstrap_admin_token: Option<String>,
    /// Name (author) recorded for the bootstrap token.
    pub bootstrap_admin_name: String,
    /// Signing secrets of the Stripe webhook endpoint (`whsec_…`); two while one is being
    /// rotated. None: `POST /api/webhooks/stripe` answers `503 webhooks_not_configured`.
    pub stripe_webhook_secrets: Vec<String>,
    /// How long a real-time authorization decision may take before it is declined
    /// (`internal_error`); Stripe waits 2 s.
    pub realtime_deadline: std::time::Duration,
    /// Stripe access for reconciliation (`None`: off; `POST /api/admin/v1/reconcile`
    /// answers `409 stripe_not_configured`).
    pub stripe: Option<crate::issuer::StripeConfig>,
    /// Period of the background reconciliation; zero: on demand only.
    pub reconcile_interval: std::time::Duration,
    /// Stripe credentials for issuing through the relay: Connect (OAuth per organization),
    /// direct (a restricted key from the environment) or none (docs/stripe-credentials.md).
    pub stripe_credentials: connect::StripeCredentials,
    /// Seals stored Stripe tokens (`ROONY_SECRETS_KEY` / `--secrets-key-file`).
    pub secrets: Option<secrets::SecretBox>,
    /// Stripe API base URL the relay forwards to (`None`: api.stripe.com).
    pub stripe_base_url: Option<String>,
    /// The control plane's public base URL (OAuth redirect); `None`: `http://<listen>`.
    pub public_url: Option<String>,
    /// Reverse proxies whose `X-Forwarded-For` names the client (sign-in limits).
    pub trusted_proxies: crate::ratelimit::TrustedProxies,
}

/// Default deadline of a real-time authorization decision.
pub const DEFAULT_REALTIME_DEADLINE_MS: u64 = 1500;

impl std::fmt::Debug for ControlConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlConfig")
            .field("database_url", &redact_url(&self.database_url))
            .field("listen", &self.listen)
            .field(
                "bootstrap_admin_token",
                &self.bootstrap_admin_token.as_ref().map(|_| "<redacted>"),
            )
            .field("bootstrap_admin_name", &self.bootstrap_admin_name)
            .field(
                "stripe_webhook_secrets",
                &format!("<{} redacted>", self.stripe_webhook_secrets.len()),
            )
            .field("realtime_deadline", &self.realtime_deadline)
            .field("stripe", &self.stripe)
            .field("reconcile_interval", &self.reconcile_interval)
            .field("stripe_credentials", &self.stripe_credentials)
            .field("secrets", &self.secrets)
            .field("stripe_base_url", &self.stripe_base_url)
            .field("public_url", &self.public_url)
            .field("trusted_proxies", &self.trusted_proxies)
            .finish()
    }
}

impl ControlConfig {
    /// The public base URL without a trailing slash (`http://<listen>` by default).
    pub fn public_base_url(&self) -> String {
        self.public_url
            .as_deref()
            .map(|u| u.trim_end_matches('/').to_string())
            .unwrap_or_else(|| format!("http://{}", self.listen))
    }

    /// SQLite under `data_dir`, default listen address, no bootstrap token.
    pub fn sqlite_in(data_dir: &Path) -> ControlConfig {
        ControlConfig {
            database_url: db::default_sqlite_url(data_dir),
            listen: SocketAddr::from(([127, 0, 0, 1], 8788)),
            bootstrap_admin_token: None,
            bootstrap_admin_name: "bootstrap".into(),
            stripe_webhook_secrets: Vec::new(),
            realtime_deadline: std::time::Duration::from_millis(DEFAULT_REALTIME_DEADLINE_MS),
            stripe: None,
            reconcile_interval: std::time::Duration::from_secs(reconcile::DEFAULT_INTERVAL_SECONDS),
            stripe_credentials: connect::StripeCredentials::None,
            secrets: None,
            stripe_base_url: None,
            public_url: None,
            trusted_proxies: Default::default(),
        }
    }
}

/// The URL without a password (for logs).
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot create {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("control plane database: {0}")]
    Db(#[from] DbError),
    #[error(
        "the admin token must be at least {} printable characters",
        crate::auth::MIN_CUSTOM_KEY_LEN
    )]
    TokenTooShort,
    #[error("server failed: {0}")]
    Server(std::io::Error),
}

/// A fresh admin token: `roony_at_<64 hex>`.
pub fn generate_admin_token() -> String {
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    format!("{}{}", api::ADMIN_TOKEN_PREFIX, hex::encode(secret))
}

/// Opens the database (creating the SQLite file's directory), applies migrations, makes
/// sure the default organization and the bootstrap admin token exist.
///
/// The bootstrap token replaces the earlier ones of its name: every other active admin
/// token with the same `bootstrap_admin_name` that was itself a bootstrap token is revoked
/// in the same transaction (see [`ControlDb::ensure_admin_token`]), so each `roony dev` run
/// or `ROONY_ADMIN_TOKEN` rotation leaves exactly one valid bootstrap token. Tokens created
/// through the admin API are untouched. A bootstrap token that was revoked stays revoked.
pub async fn open(config: &ControlConfig) -> Result<ControlDb, ControlError> {
    let bootstrap = config
        .bootstrap_admin_token
        .as_deref()
        .map(crate::auth::from_plaintext)
        .transpose()
        .map_err(|_| ControlError::TokenTooShort)?;
    if let Some(path) = sqlite_file(&config.database_url)
        && let Some(dir) = Path::new(&path).parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(|source| ControlError::DataDir {
            path: dir.display().to_string(),
            source,
        })?;
    }
    let mut db =
        ControlDb::open(&config.database_url)
            .await?
            .with_webhooks(webhooks::WebhookConfig {
                secrets: config.stripe_webhook_secrets.clone(),
                realtime_deadline: config.realtime_deadline,
            });
    if let Some(stripe) = &config.stripe {
        db = db.with_reconciliation(reconcile::ReconcileConfig {
            stripe: stripe.clone(),
            interval: config.reconcile_interval,
        });
    }
    db = db.with_stripe_credentials(connect::StripeSetup::new(
        config.stripe_credentials.clone(),
        config.secrets.clone(),
        config.stripe_base_url.clone(),
    ));
    db = db.with_trusted_proxies(config.trusted_proxies.clone());
    let now = unix_now();
    db.ensure_default_org(now).await?;
    if let Some(key) = bootstrap {
        let name = &config.bootstrap_admin_name;
        let outcome = db
            .ensure_admin_token(&key.key_id, name, &key.hash, now)
            .await?;
        if outcome.revoked {
            tracing::warn!(
                token_id = %key.key_id,
                name = %name,
                "the bootstrap admin token was revoked; it stays revoked (choose a new one)"
            );
        }
        if !outcome.replaced.is_empty() {
            tracing::info!(
                name = %name,
                revoked = ?outcome.replaced,
                "revoked the bootstrap admin tokens this one replaces"
            );
        }
    }
    Ok(db)
}

fn sqlite_file(url: &str) -> Option<String> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or_default();
    if path.is_empty() || path == ":memory:" {
        return None;
    }
    percent_encoding::percent_decode_str(path)
        .decode_utf8()
        .ok()
        .map(|p| p.into_owned())
}

pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Serves the admin API of `db` on `listener` until `shutdown` resolves.
pub async fn serve_db(
    db: ControlDb,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ControlError> {
    // Long-polls of the sync endpoint end (304) as soon as shutdown begins.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    };
    // Stored tokens sealed with a key that is not configured cannot be used: say so.
    secrets_cli::check_at_startup(&db, db.stripe_setup().secrets.as_ref()).await;
    let audit = audit::RequestAudit::new(db.clone());
    let dashboard = dashboard::DashState::new(db.clone());
    arm_setup_token(&db, &dashboard, listener.local_addr().ok()).await;
    let app = api::router_with_dashboard(db.clone(), stop_rx, audit.clone(), dashboard);
    // Periodic reconciliation (nothing when it is off), ended with the server.
    let periodic = tokio::spawn(reconcile::periodic(db.clone()));
    // Relay cards past their expiry are canceled at Stripe.
    let sweep = tokio::spawn(relay::periodic_sweep(db.clone()));
    let result = crate::api::serve(listener, app, shutdown).await;
    periodic.abort();
    sweep.abort();
    let _ = periodic.await;
    let _ = sweep.await;
    // The request events of the last requests, before the pool closes.
    audit.flush().await;
    db.close().await;
    result.map_err(ControlError::Server)
}

/// While no admin user exists, a one-time setup link for the first admin is printed
/// (valid until an admin exists or the process ends; `roony admin create` is the other way).
async fn arm_setup_token(
    db: &ControlDb,
    dashboard: &dashboard::DashState,
    addr: Option<SocketAddr>,
) {
    match db.count_admin_users().await {
        Ok(0) => {
            let token = generate_admin_token().replace(api::ADMIN_TOKEN_PREFIX, "roony_setup_");
            dashboard.arm_setup_token(&token);
            let base = addr.map_or_else(
                || "http://127.0.0.1:8788".to_string(),
                |a| format!("http://{a}"),
            );
            eprintln!(
                "roony: no dashboard admin yet; create the first one at {base}/setup?token={token} \
                 (one-time link) or with `roony admin create`"
            );
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not count dashboard admins"),
    }
}

/// Opens the database per `config` and serves the admin API on `listener` until
/// `shutdown` resolves.
pub async fn serve(
    config: ControlConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ControlError> {
    let db = open(&config).await?;
    serve_db(db, listener, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            sqlite_file("sqlite:///tmp/a%20b/control.db?mode=rwc").as_deref(),
            Some("/tmp/a b/control.db")
        );
        let url = db::default_sqlite_url(Path::new("/tmp/a b#c"));
        assert_eq!(url, "sqlite:///tmp/a%20b%23c/control.db?mode=rwc");
        assert!(generate_admin_token().starts_with("roony_at_"));
    }
}
