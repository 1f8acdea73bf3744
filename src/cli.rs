//! Command line: `roony sidecar`, `roony control-plane`, `roony stripe-emulator`, `roony dev`,
//! `roony agent create`, `roony openapi`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::emulator::{Emulator, EmulatorConfig, FaultConfig};
use crate::issuer::{BillingAddress, StripeConfig};
use crate::sidecar::{self, SidecarConfig};

#[derive(Parser, Debug)]
#[command(name = "roony", version, about = "A financial firewall for AI agents")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the sidecar next to an agent: the agent API, policy decisions and card issuing.
    Sidecar(SidecarArgs),
    /// Run the control plane: the admin API over SQLite (default) or PostgreSQL.
    ControlPlane(ControlArgs),
    /// MCP over stdio for clients that launch a command: forwards to the running sidecar.
    /// Reads ROONY_AGENT_KEY and ROONY_SIDECAR_URL (default http://127.0.0.1:8787).
    Mcp(McpArgs),
    /// Run the local Stripe Issuing emulator.
    StripeEmulator(EmulatorArgs),
    /// Run everything locally: emulator + sidecar with a demo agent.
    Dev(crate::dev::DevArgs),
    /// Play the merchant against the Stripe emulator (e.g. `roony dev`'s).
    #[command(subcommand)]
    Simulate(crate::simulate::SimulateCommand),
    /// Manage agents in a sidecar's data directory (while the sidecar is stopped).
    #[command(subcommand)]
    Agent(AgentCommand),
    /// Print the agent API's OpenAPI document.
    Openapi,
    /// The tamper-evident audit trail: `roony audit verify` checks a chain end to end.
    #[command(subcommand)]
    Audit(crate::audit::cli::AuditCommand),
    /// Dashboard users: `roony admin create --email … [--role admin|viewer]` (password on stdin).
    #[command(subcommand)]
    Admin(crate::control::admin_cli::AdminCommand),
    /// The key sealing stored Stripe tokens: `roony secrets status`, `roony secrets reseal`
    /// (rotation; docs/stripe-credentials.md).
    #[command(subcommand)]
    Secrets(crate::control::secrets_cli::SecretsCommand),
}

#[derive(Args, Debug, Clone)]
pub struct StripeArgs {
    /// Stripe secret or restricted key. Optional with --control-plane-url: without it the
    /// sidecar issues through the control plane's issuing relay (recommended: no Stripe
    /// credential on the agent's host; docs/stripe-credentials.md).
    #[arg(long, env = "ROONY_STRIPE_API_KEY", hide_env_values = true)]
    pub stripe_api_key: Option<String>,
    /// Stripe API base URL (default api.stripe.com); point it at the emulator for local runs.
    #[arg(long, env = "ROONY_STRIPE_BASE_URL")]
    pub stripe_base_url: Option<String>,
    /// Connected account to issue on (Stripe-Account header).
    #[arg(long, env = "ROONY_STRIPE_ACCOUNT")]
    pub stripe_account: Option<String>,
}

impl StripeArgs {
    /// The issuer's Stripe access: the sidecar's own key (direct), or else the control
    /// plane's issuing relay with the sidecar token as the key.
    pub fn config(
        &self,
        control_plane_url: Option<&str>,
        sidecar_token: Option<&str>,
    ) -> Result<StripeConfig, String> {
        match self
            .stripe_api_key
            .as_deref()
            .map(str::trim)
            .filter(|k| !k.is_empty())
        {
            Some(key) => {
                let mut c = StripeConfig::new(key, self.stripe_base_url.clone());
                c.account = self.stripe_account.clone();
                Ok(c)
            }
            None => match (control_plane_url, sidecar_token) {
                (Some(url), Some(token)) => Ok(StripeConfig::relay(url, token)),
                _ => Err(
                    "give --stripe-api-key, or --control-plane-url and --sidecar-token to issue through the control plane"
                        .into(),
                ),
            },
        }
    }
}

/// The base URL of a control plane's issuing relay for async-stripe (`…/stripe/`).
pub fn relay_base_url(control_plane_url: &str) -> String {
    StripeConfig::relay(control_plane_url, String::new())
        .base_url
        .unwrap_or_default()
}

#[derive(Args, Debug)]
pub struct SidecarArgs {
    #[arg(long, env = "ROONY_LISTEN", default_value = "127.0.0.1:8787")]
    pub listen: SocketAddr,
    #[arg(long, env = "ROONY_DATA_DIR", default_value = ".roony/sidecar")]
    pub data_dir: PathBuf,
    #[command(flatten)]
    pub stripe: StripeArgs,
    #[command(flatten)]
    pub mcp: McpHostArgs,
    #[command(flatten)]
    pub rate_limit: crate::ratelimit::RateLimitArgs,
    /// The control plane to sync policies from (long-poll). Without it (and a sidecar
    /// token) the sidecar runs standalone with the agents of `roony agent create`.
    #[arg(long, env = "ROONY_CONTROL_PLANE_URL", requires = "sidecar_token")]
    pub control_plane_url: Option<String>,
    /// This sidecar's token (`POST /api/admin/v1/sidecars`).
    #[arg(
        long,
        env = "ROONY_SIDECAR_TOKEN",
        requires = "control_plane_url",
        hide_env_values = true
    )]
    pub sidecar_token: Option<String>,
    /// With a control plane: after this many seconds without reaching it, every purchase is
    /// declined with `control_plane_unreachable` (shared budgets decline sooner, once the
    /// allowance this sidecar holds is spent).
    #[arg(long, env = "ROONY_OFFLINE_LIMIT", default_value_t = 3600)]
    pub offline_limit: u64,
    /// Where the card-vault egress proxy listens (agents send outbound requests through it;
    /// it fills in the placeholders of vault cards for their merchants only).
    #[arg(long, env = "ROONY_PROXY_LISTEN", default_value = crate::proxy::DEFAULT_LISTEN)]
    pub proxy_listen: SocketAddr,
    /// A PEM file of extra CA certificates the proxy trusts for upstream TLS (tests).
    #[arg(long, env = "ROONY_PROXY_EXTRA_CA")]
    pub proxy_extra_ca: Option<PathBuf>,
    /// Resolve a destination host to a fixed address: `host=ip:port` (repeatable; tests).
    #[arg(long = "proxy-resolve", value_parser = crate::proxy::parse_resolve)]
    pub proxy_resolve: Vec<(String, SocketAddr)>,
}

#[derive(Args)]
pub struct ControlArgs {
    #[arg(
        long,
        env = "ROONY_CONTROL_PLANE_LISTEN",
        default_value = crate::control::DEFAULT_LISTEN
    )]
    pub listen: SocketAddr,
    /// Where the default SQLite database (control.db) lives.
    #[arg(long, env = "ROONY_DATA_DIR", default_value = ".roony/control-plane")]
    pub data_dir: PathBuf,
    /// `sqlite://PATH?mode=rwc` or `postgres://USER:PASSWORD@HOST/DB` (default: SQLite in
    /// --data-dir).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Make sure an admin token with this value exists (at least 20 characters).
    #[arg(long, env = "ROONY_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Signing secret of the Stripe webhook endpoint (`whsec_…`); repeat it (or separate by
    /// commas in the env var) while rotating secrets. Without one, webhooks answer 503.
    #[arg(
        long = "stripe-webhook-secret",
        env = "ROONY_STRIPE_WEBHOOK_SECRETS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub stripe_webhook_secrets: Vec<String>,
    /// Deadline of a real-time authorization decision, in milliseconds (declined with
    /// `internal_error` when it is not made in time; Stripe waits 2 s).
    #[arg(
        long,
        env = "ROONY_REALTIME_DEADLINE_MS",
        default_value_t = crate::control::DEFAULT_REALTIME_DEADLINE_MS
    )]
    pub realtime_deadline_ms: u64,
    /// Stripe secret or restricted key for reconciliation (listing cards, authorizations and
    /// transactions; canceling orphan cards). Without one, reconciliation is off.
    #[arg(long, env = "ROONY_STRIPE_API_KEY", hide_env_values = true)]
    pub stripe_api_key: Option<String>,
    /// Stripe API base URL (default api.stripe.com); the emulator's for local runs.
    #[arg(long, env = "ROONY_STRIPE_BASE_URL")]
    pub stripe_base_url: Option<String>,
    /// Connected account the cards are issued on (Stripe-Account header).
    #[arg(long, env = "ROONY_STRIPE_ACCOUNT")]
    pub stripe_account: Option<String>,
    /// Seconds between reconciliation runs with Stripe (0: only on demand, through
    /// `POST /api/admin/v1/reconcile`).
    #[arg(
        long,
        env = "ROONY_RECONCILE_INTERVAL_SECONDS",
        default_value_t = crate::control::reconcile::DEFAULT_INTERVAL_SECONDS
    )]
    pub reconcile_interval_seconds: u64,
    /// Stripe Connect: the platform's client id (`ca_…`). With it, organizations connect
    /// their Stripe accounts through OAuth and --stripe-api-key is the platform's secret
    /// key; without it, --stripe-api-key is the direct mode's (restricted) key.
    #[arg(long, env = "STRIPE_CONNECT_CLIENT_ID")]
    pub stripe_connect_client_id: Option<String>,
    /// Stripe Connect's OAuth host (default https://connect.stripe.com; the emulator's for
    /// local runs).
    #[arg(long, env = "ROONY_STRIPE_CONNECT_BASE_URL")]
    pub stripe_connect_base_url: Option<String>,
    /// The key(s) sealing stored Stripe tokens: `keyid:base64-or-hex-of-32-bytes`, comma
    /// separated, the first one current (docs/stripe-credentials.md).
    #[arg(long, env = "ROONY_SECRETS_KEY", hide_env_values = true)]
    pub secrets_key: Option<String>,
    /// A file (mode 0600) holding the secrets key(s), same format (one per line or comma
    /// separated); used when ROONY_SECRETS_KEY is not set.
    #[arg(long, env = "ROONY_SECRETS_KEY_FILE")]
    pub secrets_key_file: Option<PathBuf>,
    /// The control plane's public base URL (the Stripe OAuth redirect is
    /// `{public url}/stripe/callback`); default `http://<listen>`.
    #[arg(long, env = "ROONY_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Reverse proxies (addresses or CIDR blocks, comma separated) whose X-Forwarded-For
    /// names the client, e.g. the ingress: sign-in attempts are then limited per client,
    /// not per proxy. Default: none (the TCP peer is the client).
    #[arg(long, env = "ROONY_TRUSTED_PROXIES", value_parser = parse_trusted_proxies)]
    pub trusted_proxies: Option<crate::ratelimit::TrustedProxies>,
}

fn parse_trusted_proxies(s: &str) -> Result<crate::ratelimit::TrustedProxies, String> {
    crate::ratelimit::TrustedProxies::parse(s)
}

/// Secrets (the database URL's password, the admin token, webhook secrets) redacted.
impl std::fmt::Debug for ControlArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlArgs")
            .field("listen", &self.listen)
            .field("data_dir", &self.data_dir)
            .field(
                "database_url",
                &self.database_url.as_deref().map(crate::control::redact_url),
            )
            .field(
                "admin_token",
                &self.admin_token.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "stripe_webhook_secrets",
                &format!("<{} redacted>", self.stripe_webhook_secrets.len()),
            )
            .field("realtime_deadline_ms", &self.realtime_deadline_ms)
            .field(
                "stripe_api_key",
                &self.stripe_api_key.as_ref().map(|_| "<redacted>"),
            )
            .field("stripe_base_url", &self.stripe_base_url)
            .field("stripe_account", &self.stripe_account)
            .field(
                "reconcile_interval_seconds",
                &self.reconcile_interval_seconds,
            )
            .field("stripe_connect_client_id", &self.stripe_connect_client_id)
            .field("stripe_connect_base_url", &self.stripe_connect_base_url)
            .field(
                "secrets_key",
                &self.secrets_key.as_ref().map(|_| "<redacted>"),
            )
            .field("secrets_key_file", &self.secrets_key_file)
            .field("public_url", &self.public_url)
            .field("trusted_proxies", &self.trusted_proxies)
            .finish()
    }
}

impl ControlArgs {
    pub fn config(&self) -> crate::control::ControlConfig {
        let mut c = crate::control::ControlConfig::sqlite_in(&self.data_dir);
        if let Some(url) = &self.database_url {
            c.database_url = url.clone();
        }
        c.listen = self.listen;
        c.bootstrap_admin_token = self.admin_token.clone();
        c.stripe_webhook_secrets = self
            .stripe_webhook_secrets
            .iter()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        c.realtime_deadline = std::time::Duration::from_millis(self.realtime_deadline_ms);
        c.stripe = self
            .stripe_api_key
            .as_deref()
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(|key| {
                let mut s = StripeConfig::new(key, self.stripe_base_url.clone());
                s.account = self.stripe_account.clone();
                s
            });
        c.reconcile_interval = std::time::Duration::from_secs(self.reconcile_interval_seconds);
        c.stripe_base_url = self.stripe_base_url.clone();
        c.public_url = self.public_url.clone();
        c.trusted_proxies = self.trusted_proxies.clone().unwrap_or_default();
        c
    }

    /// [`ControlArgs::config`] plus the Stripe credentials (Connect or direct) and the
    /// secrets key, which can fail (an unreadable key file, Connect without a platform key
    /// or a secrets key).
    pub fn full_config(&self) -> Result<crate::control::ControlConfig, String> {
        use crate::control::connect::{ConnectConfig, StripeCredentials};
        use crate::control::secrets::SecretBox;
        let mut c = self.config();
        c.secrets = match (
            self.secrets_key.as_deref().filter(|k| !k.trim().is_empty()),
            &self.secrets_key_file,
        ) {
            (Some(spec), _) => Some(SecretBox::parse(spec).map_err(|e| e.to_string())?),
            (None, Some(path)) => Some(SecretBox::from_file(path).map_err(|e| e.to_string())?),
            (None, None) => None,
        };
        let key = self
            .stripe_api_key
            .as_deref()
            .map(str::trim)
            .filter(|k| !k.is_empty());
        c.stripe_credentials = match (
            self.stripe_connect_client_id
                .as_deref()
                .map(str::trim)
                .filter(|k| !k.is_empty()),
            key,
        ) {
            (Some(client_id), Some(platform_key)) => {
                if c.secrets.is_none() {
                    return Err("stripe connect needs a secrets key to store tokens (ROONY_SECRETS_KEY or --secrets-key-file)".into());
                }
                let mut connect = ConnectConfig::new(
                    client_id,
                    platform_key,
                    format!(
                        "{}{}",
                        c.public_base_url(),
                        crate::control::connect::CALLBACK_PATH
                    ),
                );
                if let Some(url) = &self.stripe_connect_base_url {
                    connect.connect_base_url = url.trim_end_matches('/').to_string();
                }
                StripeCredentials::Connect(connect)
            }
            (Some(_), None) => {
                return Err(
                    "stripe connect needs the platform's secret key (--stripe-api-key)".into(),
                );
            }
            (None, Some(key)) => StripeCredentials::Direct {
                api_key: key.to_string(),
                account: self.stripe_account.clone(),
            },
            (None, None) => StripeCredentials::None,
        };
        Ok(c)
    }
}

#[derive(Args, Debug)]
pub struct McpArgs {
    #[arg(
        long,
        env = "ROONY_SIDECAR_URL",
        default_value = "http://127.0.0.1:8787"
    )]
    pub sidecar_url: String,
}

/// `Host` values the MCP endpoint accepts (DNS-rebinding protection).
#[derive(Args, Debug, Clone)]
pub struct McpHostArgs {
    /// Comma-separated `Host` values accepted at /mcp (add the name the sidecar is reached by
    /// in a container deployment).
    #[arg(long, env = "ROONY_MCP_ALLOWED_HOSTS", value_delimiter = ',', default_values_t = crate::mcp::http::DEFAULT_ALLOWED_HOSTS.iter().map(|s| s.to_string()).collect::<Vec<_>>())]
    pub mcp_allowed_hosts: Vec<String>,
}

impl McpHostArgs {
    pub fn config(&self) -> crate::mcp::http::McpHttpConfig {
        crate::mcp::http::McpHttpConfig {
            allowed_hosts: self.mcp_allowed_hosts.clone(),
        }
    }
}

#[derive(Args, Debug)]
pub struct EmulatorArgs {
    #[arg(long, env = "ROONY_EMULATOR_LISTEN", default_value = "127.0.0.1:12111")]
    pub listen: SocketAddr,
    /// Probability (0 to 1) of answering a request 429.
    #[arg(long, default_value_t = 0.0)]
    pub fault_rate_429: f64,
    /// Probability (0 to 1) of answering a request 500.
    #[arg(long, default_value_t = 0.0)]
    pub fault_rate_500: f64,
    /// Latency added to every request, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    #[command(flatten)]
    pub webhooks: crate::emulator::webhooks::WebhookArgs,
}

impl EmulatorArgs {
    pub fn config(&self) -> EmulatorConfig {
        EmulatorConfig {
            faults: FaultConfig {
                rate_429: self.fault_rate_429.clamp(0.0, 1.0),
                rate_500: self.fault_rate_500.clamp(0.0, 1.0),
                latency: std::time::Duration::from_millis(self.latency_ms),
            },
            webhook: self.webhooks.config(),
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum AgentCommand {
    /// Create (or replace) an agent with a policy; prints its key once.
    Create {
        #[arg(long, env = "ROONY_DATA_DIR", default_value = ".roony/sidecar")]
        data_dir: PathBuf,
        #[arg(long)]
        id: String,
        #[arg(long)]
        name: String,
        /// Policy JSON file (see docs/policy.md).
        #[arg(long)]
        policy: PathBuf,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    crate::telemetry::init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("roony: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Command::Simulate(command) = &cli.command {
        return runtime.block_on(crate::simulate::run_cli(command));
    }
    if let Command::Audit(command) = &cli.command {
        return runtime.block_on(crate::audit::cli::run(command));
    }
    if let Command::Admin(command) = &cli.command {
        return match runtime.block_on(crate::control::admin_cli::run(command)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(message) => {
                eprintln!("roony: {message}");
                ExitCode::FAILURE
            }
        };
    }
    if let Command::Secrets(command) = &cli.command {
        return match runtime.block_on(crate::control::secrets_cli::run(command)) {
            Ok(code) => ExitCode::from(code),
            Err(message) => {
                eprintln!("roony: {message}");
                ExitCode::FAILURE
            }
        };
    }
    let result = runtime.block_on(run(cli));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("roony: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}

async fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Sidecar(args) => {
            let config = SidecarConfig {
                listen: args.listen,
                data_dir: args.data_dir.clone(),
                stripe: args.stripe.config(
                    args.control_plane_url.as_deref(),
                    args.sidecar_token.as_deref(),
                )?,
                billing: BillingAddress::default(),
                mcp: args.mcp.config(),
                rate_limits: args.rate_limit.config(),
            };
            let store = sidecar::open_store(&config.data_dir).map_err(|e| e.to_string())?;
            let service = sidecar::build_service(store, &config).map_err(|e| e.to_string())?;
            let _sync = match (args.control_plane_url, args.sidecar_token) {
                (Some(control_plane_url), Some(sidecar_token)) => Some(
                    sidecar::start_sync(
                        &service,
                        crate::sync::client::SyncConfig {
                            control_plane_url,
                            sidecar_token,
                        },
                        std::time::Duration::from_secs(args.offline_limit),
                    )
                    .map_err(|e| e.to_string())?,
                ),
                _ => None,
            };
            let mut proxy_config = crate::proxy::ProxyConfig::new(args.proxy_listen);
            proxy_config.extra_ca = args.proxy_extra_ca.clone();
            proxy_config.resolve = args.proxy_resolve.iter().cloned().collect();
            proxy_config.rate_limits = config.rate_limits;
            // Without its proxy the sidecar still serves; vault placeholders then go nowhere.
            let _proxy = match sidecar::start_proxy(service.clone(), proxy_config).await {
                Ok(proxy) => {
                    eprintln!("roony: vault proxy listening on http://{}", proxy.addr);
                    Some(proxy)
                }
                Err(e) => {
                    eprintln!("roony: vault proxy disabled: {e}");
                    None
                }
            };
            let running = sidecar::start(
                service,
                config.listen,
                config.mcp.clone(),
                config.rate_limits,
                shutdown_signal(),
            )
            .await
            .map_err(|e| e.to_string())?;
            eprintln!("roony: sidecar listening on http://{}", running.addr);
            wait_server(running.server).await
        }
        Command::ControlPlane(args) => {
            let config = args.full_config()?;
            let db = crate::control::open(&config)
                .await
                .map_err(|e| e.to_string())?;
            let listener = tokio::net::TcpListener::bind(config.listen)
                .await
                .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
            let addr = listener.local_addr().map_err(|e| e.to_string())?;
            eprintln!(
                "roony: control plane database {}",
                crate::control::redact_url(&config.database_url)
            );
            eprintln!("roony: control plane listening on http://{addr}");
            crate::control::serve_db(db, listener, shutdown_signal())
                .await
                .map_err(|e| e.to_string())
        }
        Command::StripeEmulator(args) => {
            let listener = tokio::net::TcpListener::bind(args.listen)
                .await
                .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
            let addr = listener.local_addr().map_err(|e| e.to_string())?;
            eprintln!("roony: stripe emulator listening on http://{addr}");
            Emulator::new(args.config())
                .serve(listener, shutdown_signal())
                .await
                .map_err(|e| e.to_string())
        }
        Command::Dev(args) => crate::dev::run(args).await,
        Command::Simulate(_) => Err("`roony simulate` runs from main".into()),
        Command::Audit(_) => Err("`roony audit` runs from main".into()),
        Command::Admin(_) => Err("`roony admin` runs from main".into()),
        Command::Secrets(_) => Err("`roony secrets` runs from main".into()),
        Command::Mcp(args) => {
            crate::mcp::bridge::run(&args.sidecar_url, std::env::var("ROONY_AGENT_KEY").ok())
                .await
                .map_err(|e| e.to_string())
        }
        Command::Agent(AgentCommand::Create {
            data_dir,
            id,
            name,
            policy,
        }) => {
            let text = std::fs::read_to_string(&policy)
                .map_err(|e| format!("cannot read {}: {e}", policy.display()))?;
            let policy: crate::policy::Policy =
                serde_json::from_str(&text).map_err(|e| format!("{}: {e}", policy.display()))?;
            let store = sidecar::open_store(&data_dir).map_err(|e| e.to_string())?;
            let key = crate::dev::admin_service(store)?
                .create_agent(&id, &name, policy, None)
                .map_err(|e| match e {
                    crate::service::AgentAdminError::Policy(errors) => errors
                        .iter()
                        .map(|e| e.to_string())
                        .collect::<Vec<_>>()
                        .join("; "),
                    other => other.to_string(),
                })?;
            println!("{key}");
            eprintln!("roony: agent {id} created; the key above is shown once");
            Ok(())
        }
        Command::Openapi => {
            print!("{}", crate::api::openapi_json());
            Ok(())
        }
    }
}

pub async fn wait_server(
    server: tokio::task::JoinHandle<std::io::Result<()>>,
) -> Result<(), String> {
    match server.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("server failed: {e}")),
        Err(e) => Err(format!("server task failed: {e}")),
    }
}
