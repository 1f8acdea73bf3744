//! Stripe credentials of the control plane: Stripe Connect (OAuth) per organization, or the
//! direct mode's restricted key from the environment. See docs/stripe-credentials.md.
//!
//! The dashboard (and tests) call this service API:
//!
//! ```text
//! pub async fn status(db: &ControlDb, org_id: &str) -> Result<ConnectionStatus, ConnectError>
//! pub async fn begin(db: &ControlDb, org_id: &str, session_binding: &str, now: i64)
//!     -> Result<String /* authorize URL */, ConnectError>
//! pub async fn complete(db: &ControlDb, org_id: &str, session_binding: &str,
//!     params: CallbackParams, actor: &Actor, now: i64) -> Result<ConnectionStatus, ConnectError>
//! pub async fn refresh(db: &ControlDb, org_id: &str, actor: &Actor, now: i64)
//!     -> Result<ConnectionStatus, ConnectError>
//! pub async fn disconnect(db: &ControlDb, org_id: &str, actor: &Actor, now: i64)
//!     -> Result<DisconnectOutcome, ConnectError>
//! pub async fn issuing_credential(db: &ControlDb, org_id: &str)
//!     -> Result<IssuingCredential, ConnectError>   // the relay's credential
//! ```
//!
//! - `begin` makes a random `state` (32 bytes, hex), stores only its SHA-256 and the SHA-256
//!   of `session_binding` (an opaque string the caller derives from the admin's session),
//!   valid [`STATE_TTL_SECONDS`], and answers Stripe's authorize URL.
//! - `complete` takes the callback's query (`code`, `state`, `error`, `error_description`):
//!   the state must exist, be unexpired, unused, for this organization and bound to this
//!   session (else `invalid_oauth_state`; it is used up by the first valid callback); then
//!   `error=access_denied` is `oauth_denied`; otherwise the code is exchanged at
//!   `POST {connect_base_url}/oauth/token` (platform key as Bearer) and the connected account
//!   id and the tokens, sealed with the secrets key (`secrets.rs`), are stored with an audit
//!   event in one transaction.
//!   `begin` and `complete` refuse (`already_connected`) while the organization is
//!   connected; a grant that is not `read_write` or not in the platform key's mode is
//!   refused (`oauth_grant_refused`) and deauthorized again.
//! - `refresh` uses the refresh token (`grant_type=refresh_token`) and stores the new tokens
//!   (same checks).
//! - `disconnect` marks the connection disconnected locally first, cancels the
//!   organization's cards that may still be active, then deauthorizes at Stripe
//!   (`POST /oauth/deauthorize`), reporting what Stripe said if it refuses.
//! - `credential_refused`: the relay got a 401 with the stored token; that connection is
//!   marked disconnected.
//!
//! Tokens never leave this module in plaintext except as the relay's forwarding credential;
//! `ConnectionStatus` carries no token, and every type holding one redacts its `Debug`.

use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::db::{Actor, ConnectionRow, ControlDb, DbError, StoredTokens};
use super::secrets::{SecretBox, SecretsError};

/// How long an OAuth `state` stays valid, seconds.
pub const STATE_TTL_SECONDS: i64 = 600;
/// Stripe's Connect host.
pub const DEFAULT_CONNECT_BASE_URL: &str = "https://connect.stripe.com";
/// Stripe's API host.
pub const DEFAULT_API_BASE_URL: &str = "https://api.stripe.com";
/// The callback path the dashboard serves.
pub const CALLBACK_PATH: &str = "/stripe/callback";

/// Stripe Connect settings of the platform.
#[derive(Clone)]
pub struct ConnectConfig {
    /// The platform's Connect client id (`ca_…`).
    pub client_id: String,
    /// The platform's secret key (authenticates `/oauth/token` and `/oauth/deauthorize`).
    pub platform_secret_key: String,
    /// `https://connect.stripe.com` (or the emulator's URL).
    pub connect_base_url: String,
    /// Where Stripe sends the admin back: `{public url}/stripe/callback`.
    pub redirect_uri: String,
    /// `read_write`.
    pub scope: String,
}

impl std::fmt::Debug for ConnectConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectConfig")
            .field("client_id", &self.client_id)
            .field("platform_secret_key", &"<redacted>")
            .field("connect_base_url", &self.connect_base_url)
            .field("redirect_uri", &self.redirect_uri)
            .field("scope", &self.scope)
            .finish()
    }
}

impl ConnectConfig {
    pub fn new(
        client_id: impl Into<String>,
        platform_secret_key: impl Into<String>,
        redirect_uri: impl Into<String>,
    ) -> ConnectConfig {
        ConnectConfig {
            client_id: client_id.into(),
            platform_secret_key: platform_secret_key.into(),
            connect_base_url: DEFAULT_CONNECT_BASE_URL.into(),
            redirect_uri: redirect_uri.into(),
            scope: "read_write".into(),
        }
    }
}

/// Where the control plane's Stripe credentials come from.
#[derive(Clone, Default)]
pub enum StripeCredentials {
    /// Each organization connects its Stripe account through OAuth.
    Connect(ConnectConfig),
    /// One restricted key from the environment for every organization (self-hosting).
    Direct {
        api_key: String,
        account: Option<String>,
    },
    /// No credentials: issuing through the relay declines.
    #[default]
    None,
}

impl std::fmt::Debug for StripeCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StripeCredentials::Connect(c) => f.debug_tuple("Connect").field(c).finish(),
            StripeCredentials::Direct { account, .. } => f
                .debug_struct("Direct")
                .field("api_key", &"<redacted>")
                .field("account", account)
                .finish(),
            StripeCredentials::None => f.write_str("None"),
        }
    }
}

/// Everything the control plane needs to act with Stripe credentials (held by
/// [`ControlDb`], see [`ControlDb::with_stripe_credentials`]).
#[derive(Clone, Debug, Default)]
pub struct StripeSetup {
    pub credentials: StripeCredentials,
    /// Seals stored tokens. Required for Connect.
    pub secrets: Option<SecretBox>,
    /// Stripe's API (`https://api.stripe.com`, or the emulator) the relay forwards to;
    /// `None`: [`DEFAULT_API_BASE_URL`].
    pub api_base_url: Option<String>,
    pub(crate) http: reqwest::Client,
}

impl StripeSetup {
    pub fn new(
        credentials: StripeCredentials,
        secrets: Option<SecretBox>,
        api_base_url: Option<String>,
    ) -> StripeSetup {
        StripeSetup {
            credentials,
            secrets,
            api_base_url,
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(20))
                .build()
                .unwrap_or_default(),
        }
    }

    /// The API base URL without a trailing slash.
    pub fn api_base(&self) -> String {
        self.api_base_url
            .as_deref()
            .unwrap_or(DEFAULT_API_BASE_URL)
            .trim_end_matches('/')
            .to_string()
    }
}

impl ControlDb {
    /// This database with the Stripe credentials its server uses.
    pub fn with_stripe_credentials(self, setup: StripeSetup) -> ControlDb {
        self.set_stripe_setup(setup)
    }
}

/// The callback's query.
#[derive(Clone, Default, Deserialize)]
pub struct CallbackParams {
    pub code: Option<String>,
    pub state: Option<String>,
    pub error: Option<String>,
    pub error_description: Option<String>,
}

impl std::fmt::Debug for CallbackParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallbackParams")
            .field("code", &self.code.as_ref().map(|_| "<redacted>"))
            .field("state", &self.state.as_ref().map(|_| "<redacted>"))
            .field("error", &self.error)
            .field("error_description", &self.error_description)
            .finish()
    }
}

/// What an administrator sees of an organization's Stripe connection (never tokens).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ConnectionStatus {
    pub org_id: String,
    /// `connect`, `direct` or `none` (nothing configured).
    pub mode: String,
    /// `connected`, `disconnected` or `not_connected`.
    pub status: String,
    pub account_id: Option<String>,
    pub scope: Option<String>,
    pub livemode: bool,
    /// The secrets key the stored tokens are sealed with.
    pub key_id: Option<String>,
    pub connected_at: Option<i64>,
    pub refreshed_at: Option<i64>,
    pub disconnected_at: Option<i64>,
    pub disconnect_reason: Option<String>,
}

impl ConnectionStatus {
    pub fn is_connected(&self) -> bool {
        self.status == "connected"
    }
}

/// The credential the relay forwards a sidecar's Issuing call with.
#[derive(Clone)]
pub struct IssuingCredential {
    pub api_key: String,
    /// `Stripe-Account` to send (direct mode with an account).
    pub account: Option<String>,
    /// Connect: the stored connection the token belongs to (account id, connected at), so
    /// that a refusal by Stripe disconnects that connection and not a newer one.
    pub connection: Option<(String, i64)>,
}

impl std::fmt::Debug for IssuingCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuingCredential")
            .field("account", &self.account)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("stripe connect is not configured (--stripe-connect-client-id and a platform key)")]
    NotConfigured,
    #[error("no secrets key is configured (ROONY_SECRETS_KEY or --secrets-key-file)")]
    SecretsKeyMissing,
    #[error("the oauth state is invalid, expired, used or belongs to another session")]
    InvalidState,
    #[error("the stripe account owner denied access{}", .0.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    Denied(Option<String>),
    #[error("stripe refused the oauth request ({error}): {description}")]
    Exchange { error: String, description: String },
    #[error("stripe could not be reached: {0}")]
    Unavailable(String),
    #[error("the organization has no connected stripe account")]
    NotConnected,
    #[error("the organization's stripe account is disconnected")]
    Disconnected,
    #[error("a stripe account is already connected; disconnect it first to connect another")]
    AlreadyConnected,
    #[error("stripe's grant cannot be used: {0}")]
    GrantRefused(String),
    #[error("stored credentials cannot be opened: {0}")]
    Secrets(#[from] SecretsError),
    #[error("storage: {0}")]
    Storage(#[from] DbError),
}

impl ConnectError {
    /// Stable snake_case code.
    pub fn code(&self) -> &'static str {
        match self {
            ConnectError::NotConfigured => "connect_not_configured",
            ConnectError::SecretsKeyMissing => "secrets_key_missing",
            ConnectError::InvalidState => "invalid_oauth_state",
            ConnectError::Denied(_) => "oauth_denied",
            ConnectError::Exchange { .. } => "oauth_exchange_failed",
            ConnectError::Unavailable(_) => "stripe_unavailable",
            ConnectError::NotConnected => "not_connected",
            ConnectError::Disconnected => "stripe_account_disconnected",
            ConnectError::AlreadyConnected => "already_connected",
            ConnectError::GrantRefused(_) => "oauth_grant_refused",
            ConnectError::Secrets(_) => "secrets_unreadable",
            ConnectError::Storage(_) => "storage",
        }
    }

    /// The HTTP status a handler should answer.
    pub fn http_status(&self) -> u16 {
        match self {
            ConnectError::NotConfigured | ConnectError::SecretsKeyMissing => 409,
            ConnectError::InvalidState | ConnectError::Denied(_) => 400,
            ConnectError::Exchange { .. } | ConnectError::Unavailable(_) => 502,
            ConnectError::NotConnected
            | ConnectError::Disconnected
            | ConnectError::AlreadyConnected => 409,
            ConnectError::GrantRefused(_) => 400,
            ConnectError::Secrets(_) | ConnectError::Storage(_) => 500,
        }
    }
}

fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// The associated data a stored token is sealed with.
pub(crate) fn aad(org_id: &str, field: &str) -> String {
    format!("stripe_connections/{org_id}/{field}")
}

fn connect_config(db: &ControlDb) -> Result<&ConnectConfig, ConnectError> {
    match &db.stripe_setup().credentials {
        StripeCredentials::Connect(c) => Ok(c),
        _ => Err(ConnectError::NotConfigured),
    }
}

fn secrets(db: &ControlDb) -> Result<&SecretBox, ConnectError> {
    db.stripe_setup()
        .secrets
        .as_ref()
        .ok_or(ConnectError::SecretsKeyMissing)
}

fn status_of(org_id: &str, mode: &str, row: Option<ConnectionRow>) -> ConnectionStatus {
    match row {
        Some(r) => ConnectionStatus {
            org_id: r.org_id,
            mode: r.mode,
            status: r.status,
            account_id: r.account_id,
            scope: r.scope,
            livemode: r.livemode,
            key_id: r.key_id,
            connected_at: r.connected_at,
            refreshed_at: r.refreshed_at,
            disconnected_at: r.disconnected_at,
            disconnect_reason: r.disconnect_reason,
        },
        None => ConnectionStatus {
            org_id: org_id.to_string(),
            mode: mode.to_string(),
            status: "not_connected".into(),
            account_id: None,
            scope: None,
            livemode: false,
            key_id: None,
            connected_at: None,
            refreshed_at: None,
            disconnected_at: None,
            disconnect_reason: None,
        },
    }
}

/// The organization's connection.
pub async fn status(db: &ControlDb, org_id: &str) -> Result<ConnectionStatus, ConnectError> {
    match &db.stripe_setup().credentials {
        StripeCredentials::Direct { api_key, account } => Ok(ConnectionStatus {
            org_id: org_id.to_string(),
            mode: "direct".into(),
            status: "connected".into(),
            account_id: account.clone(),
            scope: None,
            livemode: api_key.starts_with("sk_live_") || api_key.starts_with("rk_live_"),
            key_id: None,
            connected_at: None,
            refreshed_at: None,
            disconnected_at: None,
            disconnect_reason: None,
        }),
        StripeCredentials::Connect(_) => {
            let row = db.stripe_connection(org_id).await?;
            Ok(status_of(org_id, "connect", row))
        }
        StripeCredentials::None => {
            // A connection stored while Connect was configured is still shown.
            let row = db.stripe_connection(org_id).await?;
            Ok(status_of(org_id, "none", row))
        }
    }
}

fn percent(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// Starts the OAuth flow: the authorize URL to send the administrator to.
pub async fn begin(
    db: &ControlDb,
    org_id: &str,
    session_binding: &str,
    now: i64,
) -> Result<String, ConnectError> {
    let config = connect_config(db)?;
    secrets(db)?;
    if session_binding.is_empty() {
        return Err(ConnectError::InvalidState);
    }
    db.get_org(org_id).await?;
    if is_connected(db, org_id).await? {
        return Err(ConnectError::AlreadyConnected);
    }
    let mut raw = [0u8; 32];
    rand::rng().fill_bytes(&mut raw);
    let state = hex::encode(raw);
    db.insert_oauth_state(
        &sha256_hex(&state),
        org_id,
        &sha256_hex(session_binding),
        now,
        now + STATE_TTL_SECONDS,
    )
    .await?;
    Ok(format!(
        "{}/oauth/authorize?response_type=code&client_id={}&scope={}&redirect_uri={}&state={}",
        config.connect_base_url.trim_end_matches('/'),
        percent(&config.client_id),
        percent(&config.scope),
        percent(&config.redirect_uri),
        state
    ))
}

/// Stripe's `/oauth/token` answer.
#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    refresh_token: Option<String>,
    stripe_user_id: String,
    scope: Option<String>,
    #[serde(default)]
    livemode: bool,
}

#[derive(Deserialize)]
struct OAuthErrorBody {
    error: serde_json::Value,
    error_description: Option<String>,
}

/// POSTs a form to `{connect_base}{path}` with the platform key; the JSON answer, or the
/// OAuth error.
async fn oauth_post(
    db: &ControlDb,
    config: &ConnectConfig,
    path: &str,
    form: &[(&str, &str)],
) -> Result<serde_json::Value, ConnectError> {
    let url = format!("{}{path}", config.connect_base_url.trim_end_matches('/'));
    let body = form
        .iter()
        .map(|(k, v)| format!("{}={}", percent(k), percent(v)))
        .collect::<Vec<_>>()
        .join("&");
    let resp = db
        .stripe_setup()
        .http
        .post(url)
        .bearer_auth(&config.platform_secret_key)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .map_err(|e| ConnectError::Unavailable(e.without_url().to_string()))?;
    let status = resp.status();
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| ConnectError::Unavailable(e.without_url().to_string()))?;
    if status.is_success() {
        return serde_json::from_slice(&bytes).map_err(|_| ConnectError::Exchange {
            error: "invalid_response".into(),
            description: "stripe's answer is not json".into(),
        });
    }
    if status.is_server_error() {
        return Err(ConnectError::Unavailable(format!(
            "http {}",
            status.as_u16()
        )));
    }
    let (error, description) = match serde_json::from_slice::<OAuthErrorBody>(&bytes) {
        // OAuth errors carry a string; API errors (e.g. a bad platform key) an object.
        Ok(OAuthErrorBody {
            error: serde_json::Value::String(e),
            error_description,
        }) => (e, scrub(&error_description.unwrap_or_default())),
        Ok(OAuthErrorBody { error, .. }) => (
            error
                .get("code")
                .or_else(|| error.get("type"))
                .and_then(|v| v.as_str())
                .unwrap_or("invalid_request")
                .to_string(),
            scrub(
                error
                    .get("message")
                    .and_then(|v| v.as_str())
                    .unwrap_or_default(),
            ),
        ),
        Err(_) => (format!("http_{}", status.as_u16()), String::new()),
    };
    Err(ConnectError::Exchange {
        error: scrub(&error),
        description,
    })
}

/// Stripe's (or a callback's) text without anything that looks like a secret (`sk_…`,
/// `rk_…`, `rt_…`, `ac_…`, …): it is shown in the dashboard and written to logs.
fn scrub(text: &str) -> String {
    crate::audit::scrub_str(text).chars().take(500).collect()
}

async fn is_connected(db: &ControlDb, org_id: &str) -> Result<bool, ConnectError> {
    Ok(db
        .stripe_connection(org_id)
        .await?
        .is_some_and(|r| r.status == "connected"))
}

/// Whether the platform's key is a live-mode key (`sk_live_…`, `rk_live_…`).
fn platform_livemode(config: &ConnectConfig) -> bool {
    let key = config.platform_secret_key.as_str();
    key.starts_with("sk_live_") || key.starts_with("rk_live_")
}

/// A grant Roony can use: `read_write` scope, in the platform key's mode.
fn check_grant(config: &ConnectConfig, tokens: &TokenResponse) -> Result<(), ConnectError> {
    if tokens.scope.as_deref() != Some("read_write") {
        return Err(ConnectError::GrantRefused(format!(
            "stripe granted scope {}, roony needs read_write",
            tokens
                .scope
                .as_deref()
                .map_or_else(|| "(none)".into(), scrub)
        )));
    }
    let live = platform_livemode(config);
    if tokens.livemode != live {
        return Err(ConnectError::GrantRefused(format!(
            "the grant is for {} mode but the platform key is a {} key",
            if tokens.livemode { "live" } else { "test" },
            if live { "live" } else { "test" }
        )));
    }
    Ok(())
}

/// Best effort: deauthorizes a connection Stripe just made that Roony will not use.
async fn drop_grant(db: &ControlDb, config: &ConnectConfig, account: &str) {
    if let Err(e) = oauth_post(
        db,
        config,
        "/oauth/deauthorize",
        &[
            ("client_id", &config.client_id),
            ("stripe_user_id", account),
        ],
    )
    .await
    {
        tracing::warn!(account = %account, code = e.code(), error = %e,
            "could not deauthorize a grant roony refused");
    }
}

fn parse_tokens(value: serde_json::Value) -> Result<TokenResponse, ConnectError> {
    serde_json::from_value(value).map_err(|_| ConnectError::Exchange {
        error: "invalid_response".into(),
        description: "stripe's token answer lacks fields".into(),
    })
}

fn seal(
    secrets: &SecretBox,
    org_id: &str,
    tokens: &TokenResponse,
) -> Result<StoredTokens, ConnectError> {
    Ok(StoredTokens {
        account_id: tokens.stripe_user_id.clone(),
        access_token: secrets.seal(tokens.access_token.as_bytes(), &aad(org_id, "access_token"))?,
        refresh_token: tokens
            .refresh_token
            .as_deref()
            .map(|t| secrets.seal(t.as_bytes(), &aad(org_id, "refresh_token")))
            .transpose()?,
        key_id: secrets.current_key_id().to_string(),
        scope: tokens.scope.clone(),
        livemode: tokens.livemode,
    })
}

/// Finishes the OAuth flow with the callback's parameters.
pub async fn complete(
    db: &ControlDb,
    org_id: &str,
    session_binding: &str,
    params: CallbackParams,
    actor: &Actor,
    now: i64,
) -> Result<ConnectionStatus, ConnectError> {
    let config = connect_config(db)?;
    let secrets = secrets(db)?;
    let Some(state) = params.state.as_deref().filter(|s| !s.is_empty()) else {
        return Err(ConnectError::InvalidState);
    };
    if session_binding.is_empty()
        || !db
            .consume_oauth_state(
                &sha256_hex(state),
                org_id,
                &sha256_hex(session_binding),
                now,
            )
            .await?
    {
        return Err(ConnectError::InvalidState);
    }
    if let Some(error) = params.error.as_deref() {
        if error == "access_denied" {
            return Err(ConnectError::Denied(
                params.error_description.as_deref().map(scrub),
            ));
        }
        return Err(ConnectError::Exchange {
            error: scrub(error),
            description: scrub(&params.error_description.unwrap_or_default()),
        });
    }
    // Connecting another account would silently replace the one in use (and leave its
    // cards behind): disconnect first.
    if is_connected(db, org_id).await? {
        return Err(ConnectError::AlreadyConnected);
    }
    let Some(code) = params.code.as_deref().filter(|c| !c.is_empty()) else {
        return Err(ConnectError::Exchange {
            error: "invalid_request".into(),
            description: "the callback has no code".into(),
        });
    };
    let answer = oauth_post(
        db,
        config,
        "/oauth/token",
        &[("grant_type", "authorization_code"), ("code", code)],
    )
    .await?;
    let tokens = parse_tokens(answer)?;
    if let Err(e) = check_grant(config, &tokens) {
        drop_grant(db, config, &tokens.stripe_user_id).await;
        return Err(e);
    }
    let stored = seal(secrets, org_id, &tokens)?;
    let row = match db
        .store_stripe_tokens(org_id, &stored, false, actor, now)
        .await
    {
        Ok(row) => row,
        Err(DbError::Conflict(_)) => {
            // Another flow connected meanwhile: this grant is not used.
            drop_grant(db, config, &tokens.stripe_user_id).await;
            return Err(ConnectError::AlreadyConnected);
        }
        Err(e) => return Err(e.into()),
    };
    tracing::info!(org = %org_id, account = %tokens.stripe_user_id, "stripe account connected");
    Ok(status_of(org_id, "connect", Some(row)))
}

fn connected_row(row: Option<ConnectionRow>) -> Result<ConnectionRow, ConnectError> {
    match row {
        Some(r) if r.status == "connected" => Ok(r),
        Some(_) => Err(ConnectError::Disconnected),
        None => Err(ConnectError::NotConnected),
    }
}

/// Exchanges the refresh token for new tokens and stores them.
pub async fn refresh(
    db: &ControlDb,
    org_id: &str,
    actor: &Actor,
    now: i64,
) -> Result<ConnectionStatus, ConnectError> {
    let config = connect_config(db)?;
    let secrets = secrets(db)?;
    let row = connected_row(db.stripe_connection(org_id).await?)?;
    let Some(sealed) = row.refresh_token.as_deref() else {
        return Err(ConnectError::Exchange {
            error: "invalid_grant".into(),
            description: "no refresh token is stored".into(),
        });
    };
    let refresh_token = secrets.open_string(sealed, &aad(org_id, "refresh_token"))?;
    let answer = oauth_post(
        db,
        config,
        "/oauth/token",
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &refresh_token),
        ],
    )
    .await?;
    let mut tokens = parse_tokens(answer)?;
    check_grant(config, &tokens)?;
    // Stripe may keep the refresh token: store it again, sealed under the current key, so
    // the row's key id is true of both tokens (an operator retires old keys by it).
    if tokens.refresh_token.is_none() {
        tokens.refresh_token = Some(refresh_token);
    }
    if Some(&tokens.stripe_user_id) != row.account_id.as_ref() {
        return Err(ConnectError::Exchange {
            error: "account_mismatch".into(),
            description: "the refreshed token is for another account".into(),
        });
    }
    let stored = seal(secrets, org_id, &tokens)?;
    let row = db
        .store_stripe_tokens(org_id, &stored, true, actor, now)
        .await?;
    Ok(status_of(org_id, "connect", Some(row)))
}

/// What [`disconnect`] did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DisconnectOutcome {
    pub status: ConnectionStatus,
    /// Cards canceled at Stripe before deauthorizing.
    pub canceled_cards: Vec<String>,
    /// Cards that could not be canceled, with why.
    pub cancel_failures: Vec<(String, String)>,
    /// What Stripe answered to the deauthorization when it did not succeed (secrets
    /// removed). The connection is disconnected locally all the same.
    pub stripe_error: Option<String>,
}

/// Disconnects the organization's account: marks the connection disconnected first (tokens
/// erased, so issuing stops even if Stripe cannot be reached), cancels every card of the
/// organization that may still be active (the relay's and the Stripe ledger's) with the
/// connection's token, then deauthorizes the platform at Stripe. Each step is audited
/// (`stripe.disconnect`, `stripe.disconnect.cards`, `stripe.deauthorize`); a refusal by
/// Stripe is reported as Stripe said it, never taken for "already disconnected".
pub async fn disconnect(
    db: &ControlDb,
    org_id: &str,
    actor: &Actor,
    now: i64,
) -> Result<DisconnectOutcome, ConnectError> {
    let config = connect_config(db)?;
    let row = connected_row(db.stripe_connection(org_id).await?)?;
    let account = row.account_id.clone().unwrap_or_default();
    // Opened before the local disconnect erases it: the cards are canceled with it.
    let credential = issuing_credential(db, org_id).await;
    db.disconnect_stripe(org_id, "disconnected", actor, now)
        .await?;
    let cards = db.active_cards_of_org(org_id).await?;
    let (canceled, failed) = match &credential {
        Ok(c) => cancel_cards(db, c, &cards).await,
        Err(e) => (
            Vec::new(),
            cards
                .iter()
                .map(|c| (c.clone(), format!("no usable credential ({})", e.code())))
                .collect(),
        ),
    };
    if !cards.is_empty() {
        db.record_disconnect_cancels(org_id, &canceled, &failed, actor, now)
            .await?;
    }
    if !failed.is_empty() {
        tracing::error!(org = %org_id, failed = failed.len(),
            "disconnect: some cards could not be canceled at stripe; cancel them in stripe's dashboard");
    }
    let stripe_error = match oauth_post(
        db,
        config,
        "/oauth/deauthorize",
        &[
            ("client_id", &config.client_id),
            ("stripe_user_id", &account),
        ],
    )
    .await
    {
        Ok(_) => None,
        Err(ConnectError::Exchange { error, description }) => {
            Some(format!("{error}: {description}"))
        }
        Err(e) => Some(scrub(&e.to_string())),
    };
    match &stripe_error {
        None => {
            db.record_stripe_note(
                org_id,
                "stripe.deauthorize",
                true,
                serde_json::json!({"account_id": account}),
                actor,
                now,
            )
            .await?
        }
        Some(said) => {
            tracing::warn!(org = %org_id, account = %account, stripe = %said,
                "stripe did not confirm the deauthorization; the connection is disconnected locally");
            db.record_stripe_note(
                org_id,
                "stripe.deauthorize",
                false,
                serde_json::json!({"account_id": account, "stripe_said": said}),
                actor,
                now,
            )
            .await?
        }
    }
    Ok(DisconnectOutcome {
        status: status(db, org_id).await?,
        canceled_cards: canceled,
        cancel_failures: failed,
        stripe_error,
    })
}

/// Cancels `cards` at Stripe with `credential` (async-stripe, retried; a card already
/// canceled counts as canceled): (canceled, failed with why).
async fn cancel_cards(
    db: &ControlDb,
    credential: &IssuingCredential,
    cards: &[String],
) -> (Vec<String>, Vec<(String, String)>) {
    let mut canceled = Vec::new();
    let mut failed = Vec::new();
    if cards.is_empty() {
        return (canceled, failed);
    }
    let mut config = crate::issuer::StripeConfig::new(
        credential.api_key.clone(),
        Some(db.stripe_setup().api_base()),
    );
    config.account = credential.account.clone();
    let issuer = match crate::issuer::Issuer::new(config) {
        Ok(i) => i,
        Err(e) => {
            let why = scrub(&e.to_string());
            return (
                canceled,
                cards.iter().map(|c| (c.clone(), why.clone())).collect(),
            );
        }
    };
    for card in cards {
        match issuer.cancel_card(card).await {
            Ok(()) => canceled.push(card.clone()),
            // A card Stripe does not know cannot be used either.
            Err(e) if e.is_not_found() => canceled.push(card.clone()),
            Err(e) => failed.push((card.clone(), scrub(&e.to_string()))),
        }
    }
    (canceled, failed)
}

/// Stripe refused the relay's credential (401): the connection it belongs to is marked
/// disconnected (`credential_refused`, audited), so the bundle and the dashboard say so.
/// A newer connection (reconnected meanwhile) is left alone.
pub async fn credential_refused(
    db: &ControlDb,
    org_id: &str,
    credential: &IssuingCredential,
    now: i64,
) {
    let Some((account, connected_at)) = &credential.connection else {
        return;
    };
    let actor = Actor {
        kind: "system",
        id: "relay".into(),
        name: "issuing relay".into(),
        request_id: None,
    };
    match db
        .disconnect_stripe_connection(
            org_id,
            account,
            *connected_at,
            "credential_refused",
            &actor,
            now,
        )
        .await
    {
        Ok(true) => {
            tracing::warn!(org = %org_id, account = %account,
                "stripe refused the connection's token; marked disconnected")
        }
        Ok(false) => {}
        Err(e) => tracing::error!(org = %org_id, error = %e,
            "could not mark the refused connection disconnected"),
    }
}

/// The credential the relay forwards an organization's Issuing calls with: the connected
/// account's access token (Connect) or the environment's key (direct).
pub async fn issuing_credential(
    db: &ControlDb,
    org_id: &str,
) -> Result<IssuingCredential, ConnectError> {
    match &db.stripe_setup().credentials {
        StripeCredentials::Direct { api_key, account } => Ok(IssuingCredential {
            api_key: api_key.clone(),
            account: account.clone(),
            connection: None,
        }),
        StripeCredentials::Connect(_) => {
            let secrets = secrets(db)?;
            let row = match db.stripe_connection(org_id).await? {
                Some(r) if r.status == "connected" => r,
                _ => return Err(ConnectError::Disconnected),
            };
            let Some(sealed) = row.access_token.as_deref() else {
                return Err(ConnectError::Disconnected);
            };
            Ok(IssuingCredential {
                api_key: secrets.open_string(sealed, &aad(org_id, "access_token"))?,
                account: None,
                connection: row.account_id.clone().zip(row.connected_at),
            })
        }
        StripeCredentials::None => Err(ConnectError::Disconnected),
    }
}

/// `connected` / `disconnected` for the sync bundle: `None` when the control plane holds
/// no Stripe credentials at all (the sidecar then issues with its own key, if any).
pub async fn bundle_status(db: &ControlDb, org_id: &str) -> Result<Option<String>, DbError> {
    Ok(match &db.stripe_setup().credentials {
        StripeCredentials::Direct { .. } => Some("connected".into()),
        StripeCredentials::Connect(_) => Some(
            match db.stripe_connection(org_id).await? {
                Some(r) if r.status == "connected" => "connected",
                _ => "disconnected",
            }
            .into(),
        ),
        StripeCredentials::None => None,
    })
}

/// Whether the connection `credential` was taken from is still the organization's live one:
/// connected, and the same account connected at the same time (a disconnect followed by a
/// reconnect meanwhile is another connection). Direct mode is always live.
pub async fn still_connected(
    db: &ControlDb,
    org_id: &str,
    credential: &IssuingCredential,
) -> Result<bool, DbError> {
    Ok(match &db.stripe_setup().credentials {
        StripeCredentials::Direct { .. } => true,
        StripeCredentials::Connect(_) => match db.stripe_connection(org_id).await? {
            Some(r) if r.status == "connected" => {
                credential.connection.is_some()
                    && r.account_id.zip(r.connected_at) == credential.connection
            }
            _ => false,
        },
        StripeCredentials::None => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(scope: Option<&str>, livemode: bool) -> TokenResponse {
        TokenResponse {
            access_token: "sk_test_x".into(),
            refresh_token: None,
            stripe_user_id: "acct_1".into(),
            scope: scope.map(str::to_string),
            livemode,
        }
    }

    #[test]
    fn grants_need_read_write_in_the_platform_keys_mode() {
        let test = ConnectConfig::new("ca_1", "sk_test_platform", "http://x/cb");
        let live = ConnectConfig::new("ca_1", "sk_live_platform", "https://x/cb");
        let restricted_live = ConnectConfig::new("ca_1", "rk_live_platform", "https://x/cb");
        assert!(check_grant(&test, &tokens(Some("read_write"), false)).is_ok());
        assert!(check_grant(&live, &tokens(Some("read_write"), true)).is_ok());
        assert!(check_grant(&restricted_live, &tokens(Some("read_write"), true)).is_ok());
        for (config, grant) in [
            (&test, tokens(Some("read_only"), false)),
            (&test, tokens(None, false)),
            (&test, tokens(Some("read_write"), true)),
            (&live, tokens(Some("read_write"), false)),
        ] {
            let e = check_grant(config, &grant).unwrap_err();
            assert_eq!(e.code(), "oauth_grant_refused");
            let text = e.to_string();
            assert_eq!(text, text.to_lowercase(), "{text}");
        }
    }

    #[test]
    fn stripe_messages_lose_their_secrets() {
        let said = "No such code: ac_abcdefghijklmnop; refresh rt_abcdefghijklmnop, key sk_live_abcdefgh12345678";
        let clean = scrub(said);
        for secret in [
            "ac_abcdefghijklmnop",
            "rt_abcdefghijklmnop",
            "sk_live_abcdefgh12345678",
        ] {
            assert!(!clean.contains(secret), "{clean}");
        }
        assert!(clean.starts_with("No such code: [redacted]"), "{clean}");
    }
}
