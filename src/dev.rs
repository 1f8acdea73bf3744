//! `roony dev`: the Stripe emulator, a sidecar and the control plane in one process, with a
//! demo agent.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;

use crate::domain::money::Currency;
use crate::domain::time::Period;
use crate::emulator::{Emulator, EmulatorConfig};
use crate::issuer::{BillingAddress, Issuer, StripeConfig};
use crate::policy::{BudgetRule, Policy};
use crate::service::{Service, ServiceConfig, SystemClock};
use crate::sidecar::{self, SidecarConfig};
use crate::store::Store;

mod history;

pub const DEMO_AGENT_ID: &str = "agt_demo";
/// The emulator accepts any test-mode key; this one is only meaningful locally.
pub const DEV_STRIPE_KEY: &str = "sk_test_roony_dev";
/// The Connect client id `roony dev --stripe-connect` uses with the emulator.
pub const DEV_CONNECT_CLIENT_ID: &str = "ca_roony_dev";

#[derive(Args, Debug)]
pub struct DevArgs {
    #[arg(
        long,
        env = "ROONY_DEV_SIDECAR_LISTEN",
        default_value = "127.0.0.1:8787"
    )]
    pub sidecar_listen: SocketAddr,
    #[arg(
        long,
        env = "ROONY_DEV_EMULATOR_LISTEN",
        default_value = "127.0.0.1:12111"
    )]
    pub emulator_listen: SocketAddr,
    /// Control plane address (default 127.0.0.1:8788). When not given and the default is
    /// taken, `roony dev` runs without the control plane and says so.
    #[arg(long, env = "ROONY_DEV_CONTROL_PLANE_LISTEN")]
    pub control_plane_listen: Option<SocketAddr>,
    /// Admin API token for the control plane (at least 20 characters); generated and
    /// printed when absent.
    #[arg(long, env = "ROONY_DEV_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Where state lives.
    #[arg(long, env = "ROONY_DEV_DATA_DIR", default_value = ".roony/dev")]
    pub data_dir: PathBuf,
    /// Use this demo agent key instead of generating one (at least 20 characters).
    #[arg(long, env = "ROONY_DEV_AGENT_KEY", hide_env_values = true)]
    pub agent_key: Option<String>,
    /// Use Stripe Connect (OAuth against the emulator) instead of the direct mode's key:
    /// purchases decline with `stripe_account_disconnected` until an administrator connects
    /// the emulator's account in the dashboard (Settings → Connect Stripe). The tokens are
    /// sealed with a key kept in `<data dir>/control-plane/secrets.key` (0600); cards then
    /// live on the connected account (`roony simulate` needs `--stripe-account`).
    #[arg(long, env = "ROONY_DEV_STRIPE_CONNECT")]
    pub stripe_connect: bool,
    /// Do not create the demo history (a second agent, `agt_research`, whose purchases,
    /// charges, decline and pending approval fill the dashboard on a new data directory).
    #[arg(long, env = "ROONY_DEV_NO_HISTORY")]
    pub no_history: bool,
    #[command(flatten)]
    pub mcp: crate::cli::McpHostArgs,
    #[command(flatten)]
    pub rate_limit: crate::ratelimit::RateLimitArgs,
}

/// The demo agent's policy: USD 100.00 per purchase, USD 250.00 a day, no gambling, and
/// purchases above USD 50.00 need the user's confirmation (or an administrator's approval).
pub fn demo_policy() -> Policy {
    let mut p = Policy::new(Currency::USD);
    p.max_per_transaction = Some(10_000);
    p.require_confirmation_above = Some(5_000);
    p.budgets = vec![BudgetRule {
        period: Period::Daily,
        limit: 25_000,
    }];
    p.categories.deny = vec!["betting_casino_gambling".into()];
    p
}

/// A service for offline administration (no Stripe calls are made through it).
pub fn admin_service(store: Store) -> Result<Service, String> {
    let issuer = Issuer::new(StripeConfig::new(
        "sk_test_offline",
        Some("http://127.0.0.1:9".into()),
    ))
    .map_err(|e| e.to_string())?;
    Ok(Service::new(
        store,
        issuer,
        ServiceConfig::default(),
        Arc::new(SystemClock),
    ))
}

pub async fn run(args: DevArgs) -> Result<(), String> {
    let emulator_listener = tokio::net::TcpListener::bind(args.emulator_listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.emulator_listen))?;
    let emulator_addr = emulator_listener.local_addr().map_err(|e| e.to_string())?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let emulator_handle = Emulator::new(EmulatorConfig::default());
    let emulator = tokio::spawn(
        emulator_handle
            .clone()
            .serve(emulator_listener, stopped(stop_rx.clone())),
    );
    // The emulator sends its events (and real-time authorization requests) to the control
    // plane, signed with a secret made for this run.
    let webhook_secret = format!("whsec_dev_{}", hex::encode(rand::random::<[u8; 16]>()));

    let control_config = {
        let mut c = crate::control::ControlConfig::sqlite_in(&args.data_dir.join("control-plane"));
        if let Some(listen) = args.control_plane_listen {
            c.listen = listen;
        }
        c.bootstrap_admin_token = Some(
            args.admin_token
                .clone()
                .unwrap_or_else(crate::control::generate_admin_token),
        );
        c.bootstrap_admin_name = "dev".into();
        c.stripe_webhook_secrets = vec![webhook_secret.clone()];
        // Stripe credentials live at the control plane only: the sidecar issues through its
        // relay (docs/stripe-credentials.md). Direct mode with the emulator's key by default;
        // `--stripe-connect` uses Connect OAuth against the emulator instead.
        c.stripe_base_url = Some(format!("http://{emulator_addr}"));
        c.stripe_credentials = if args.stripe_connect {
            let key_path = args.data_dir.join("control-plane").join("secrets.key");
            c.secrets = Some(
                crate::control::secrets::SecretBox::load_or_create(&key_path)
                    .map_err(|e| e.to_string())?,
            );
            let mut connect = crate::control::connect::ConnectConfig::new(
                DEV_CONNECT_CLIENT_ID,
                DEV_STRIPE_KEY,
                format!(
                    "{}{}",
                    c.public_base_url(),
                    crate::control::connect::CALLBACK_PATH
                ),
            );
            // Stripe's OAuth pages are on another site than the dashboard; so are the
            // emulator's here when it listens on a loopback address (`localhost` and
            // `127.0.0.1` are different sites), which makes the redirect back to the
            // callback cross-site, as with Stripe (the session cookie must survive it).
            connect.connect_base_url = if emulator_addr.ip().is_loopback() {
                format!("http://localhost:{}", emulator_addr.port())
            } else {
                format!("http://{emulator_addr}")
            };
            crate::control::connect::StripeCredentials::Connect(connect)
        } else {
            crate::control::connect::StripeCredentials::Direct {
                api_key: DEV_STRIPE_KEY.into(),
                account: None,
            }
        };
        c
    };
    let control_db = crate::control::open(&control_config)
        .await
        .map_err(|e| e.to_string())?;
    // Before the control plane serves, so it has an admin and prints no setup link.
    let (dashboard_email, dashboard_password) =
        seed_dashboard_admin(&control_db, crate::control::unix_now()).await?;
    let control = match tokio::net::TcpListener::bind(control_config.listen).await {
        Ok(listener) => {
            let addr = listener.local_addr().map_err(|e| e.to_string())?;
            emulator_handle.set_webhook(Some(crate::emulator::webhooks::WebhookConfig::new(
                format!("http://{addr}/api/webhooks/stripe"),
                vec![webhook_secret.clone()],
            )));
            let task = tokio::spawn(crate::control::serve_db(
                control_db.clone(),
                listener,
                stopped(stop_rx.clone()),
            ));
            Some((addr, task))
        }
        Err(e) if args.control_plane_listen.is_none() => {
            eprintln!(
                "roony: control plane not started: cannot listen on {}: {e} (choose another \
                 address with --control-plane-listen)",
                control_config.listen
            );
            control_db.close().await;
            None
        }
        Err(e) => return Err(format!("cannot listen on {}: {e}", control_config.listen)),
    };

    let seeded = match &control {
        Some(_) => Some(
            seed_control_plane(
                &control_db,
                args.agent_key.as_deref(),
                // Connect mode has no account connected at start: nothing could be issued.
                !args.no_history && !args.stripe_connect,
            )
            .await?,
        ),
        None => None,
    };
    let stripe = match (&control, &seeded) {
        // Synced: cards come through the control plane's issuing relay with the sidecar
        // token; no Stripe key on the sidecar.
        (Some((addr, _)), Some(seeded)) => {
            StripeConfig::relay(&format!("http://{addr}"), seeded.sidecar_token.clone())
        }
        _ => StripeConfig::new(DEV_STRIPE_KEY, Some(format!("http://{emulator_addr}"))),
    };
    let config = SidecarConfig {
        listen: args.sidecar_listen,
        data_dir: args.data_dir.join("sidecar"),
        stripe,
        billing: BillingAddress::default(),
        mcp: args.mcp.config(),
        rate_limits: args.rate_limit.config(),
    };
    let store = sidecar::open_store(&config.data_dir).map_err(|e| e.to_string())?;
    let service = sidecar::build_service(store.clone(), &config).map_err(|e| e.to_string())?;
    let mut history_key = None;
    let (key, synced) = match (&control, seeded) {
        // The control plane is the source of truth: the demo agent and its policy live there
        // and reach the sidecar as a signed bundle, like any production sidecar.
        (Some((addr, _)), Some(seeded)) => {
            let _sync = sidecar::start_sync(
                &service,
                crate::sync::client::SyncConfig {
                    control_plane_url: format!("http://{addr}"),
                    sidecar_token: seeded.sidecar_token,
                },
                crate::sync::upstream::DEFAULT_OFFLINE_LIMIT,
            )
            .map_err(|e| e.to_string())?;
            wait_for_agent(&service, &seeded.agent_key).await?;
            if let Some(k) = seeded.history_key {
                wait_for_agent(&service, &k).await?;
                history_key = Some(k);
            }
            (seeded.agent_key, true)
        }
        _ => {
            let key = service
                .create_agent(
                    DEMO_AGENT_ID,
                    "demo agent",
                    demo_policy(),
                    args.agent_key.as_deref(),
                )
                .map_err(|e| format!("cannot create the demo agent: {e}"))?;
            retire_previous_key(&service, &config.data_dir, &crate::auth::key_id(&key))?;
            (key, false)
        }
    };
    let running = sidecar::start(
        service,
        config.listen,
        config.mcp.clone(),
        config.rate_limits,
        stopped(stop_rx.clone()),
    )
    .await
    .map_err(|e| e.to_string())?;

    let base = format!("http://{}", running.addr);
    if let Some(k) = history_key {
        // In the background: the sidecar serves meanwhile; a failure is reported, not fatal.
        let (sidecar, emulator) = (base.clone(), format!("http://{emulator_addr}"));
        tokio::spawn(async move {
            match history::seed(&sidecar, &k, &emulator).await {
                Ok(s) => eprintln!(
                    "roony: demo history: {} purchases approved ({} charged by their merchants), {} declined, {} waiting for approval in the dashboard",
                    s.approved, s.charges, s.declined, s.pending
                ),
                Err(e) => eprintln!("roony: demo history incomplete: {e}"),
            }
        });
    }
    eprintln!("roony: stripe emulator listening on http://{emulator_addr}");
    eprintln!("roony: sidecar listening on {base}");
    let admin_token = control_config
        .bootstrap_admin_token
        .as_deref()
        .unwrap_or_default();
    let control_text = match &control {
        Some((addr, _)) => {
            eprintln!("roony: control plane listening on http://{addr}");
            format!(
                "Dashboard:       http://{addr}/ (sign in as {dashboard_email}, password {dashboard_password})\n\
                 Control plane:   http://{addr}/api/admin/v1 (spec at /api/admin/v1/openapi.json){}\n\
                 Admin token:     {admin_token}\n\
                 List projects:   curl -s http://{addr}/api/admin/v1/projects -H 'Authorization: Bearer {admin_token}'\n",
                if synced {
                    "; the sidecar syncs the demo agent's policy from it"
                } else {
                    ""
                }
            )
        }
        None => "Control plane:   not running (its address was taken)\n".to_string(),
    };
    println!(
        "\nRoony is running (data in {}).\n\n\
         Demo agent: {DEMO_AGENT_ID} — USD 100.00 per purchase, USD 250.00 a day, no gambling,\n\
         purchases above USD 50.00 need the user's confirmation.\n\
         Agent key (shown once): {key}\n\n\
         Buy something:\n  curl -s {base}/api/v1/purchase_intent -H 'Authorization: Bearer {key}' \\\n    \
         -H 'Content-Type: application/json' \\\n    \
         -d '{{\"amount\":1200,\"currency\":\"usd\",\"merchant\":{{\"name\":\"Namecheap\",\"url\":\"https://www.namecheap.com\",\"country\":\"US\"}},\"description\":\"one domain for a year\"}}'\n\n\
         Play the merchant (card id from the purchase): roony simulate charge --card ic_... --amount 1200 \\\n    \
         --merchant NAMECHEAP.COM --merchant-country US --capture --stripe-base-url http://{emulator_addr}\n\
         See the budget:  curl -s {base}/api/v1/budget -H 'Authorization: Bearer {key}'\n\
         API spec:        {base}/openapi.json\n\
         MCP:             {base}/mcp (streamable HTTP, same key), or `roony mcp` over stdio\n\n\
         {control_text}\n\
         Stop with Ctrl-C.\n",
        args.data_dir.display()
    );

    shutdown_on_signal(stop_tx).await;
    crate::cli::wait_server(running.server).await?;
    running.background.abort();
    if let Some((_, task)) = control {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("control plane failed: {e}")),
            Err(e) => return Err(format!("control plane task failed: {e}")),
        }
    }
    match emulator.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("emulator failed: {e}")),
        Err(e) => Err(format!("emulator task failed: {e}")),
    }
}

/// Each `roony dev` run prints a demo key; the previous run's key stops working, so keys do
/// not pile up in a data directory that is reused. Only the key id is remembered.
fn retire_previous_key(
    service: &Service,
    data_dir: &std::path::Path,
    current: &str,
) -> Result<(), String> {
    let path = data_dir.join("dev-agent-key-id");
    if let Ok(previous) = std::fs::read_to_string(&path) {
        let previous = previous.trim();
        if !previous.is_empty() && previous != current {
            service
                .revoke_agent_key(previous)
                .map_err(|e| format!("cannot retire the previous demo key: {e}"))?;
        }
    }
    std::fs::write(&path, current).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

struct Seeded {
    agent_key: String,
    sidecar_token: String,
    /// The history agent's key, when it was created by this run (a new data directory).
    history_key: Option<String>,
}

/// The dashboard admin `roony dev` creates.
pub const DEV_ADMIN_EMAIL: &str = "admin@roony.dev";

/// Makes sure the dev dashboard admin exists with this run's password
/// (`ROONY_DEV_ADMIN_PASSWORD`, or a fresh random one printed at start-up).
async fn seed_dashboard_admin(
    db: &crate::control::db::ControlDb,
    now: i64,
) -> Result<(String, String), String> {
    use crate::control::dashboard::auth;
    use crate::control::db::Actor;
    use crate::control::db::admin_users::Role;
    let password = match std::env::var("ROONY_DEV_ADMIN_PASSWORD") {
        Ok(p) => {
            auth::check_new_password(&p).map_err(|e| format!("ROONY_DEV_ADMIN_PASSWORD: {e}"))?;
            p
        }
        Err(_) => {
            let mut bytes = [0u8; 12];
            rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
            hex::encode(bytes)
        }
    };
    let hash = auth::hash_password(&password).map_err(|e| e.to_string())?;
    let actor = Actor::system();
    let existing = db
        .admin_user_for_login(DEV_ADMIN_EMAIL)
        .await
        .map_err(|e| format!("cannot seed the dashboard admin: {e}"))?;
    match existing {
        Some((user, _)) => db
            .set_admin_password(&user.id, &hash, None, &actor, now)
            .await
            .map_err(|e| format!("cannot seed the dashboard admin: {e}"))?,
        None => {
            db.create_admin_user(
                DEV_ADMIN_EMAIL,
                "Dev Admin",
                Role::Admin,
                &hash,
                &actor,
                now,
            )
            .await
            .map_err(|e| format!("cannot seed the dashboard admin: {e}"))?;
        }
    }
    Ok((DEV_ADMIN_EMAIL.to_string(), password))
}

/// Puts the demo project, agent (with its policy and key) and a sidecar token into the
/// control plane. On a reused data directory the agent is kept and its key rotated (the
/// previous run's key stops working) unless the fixed `--agent-key` is already its key.
async fn seed_control_plane(
    db: &crate::control::db::ControlDb,
    fixed_key: Option<&str>,
    with_history: bool,
) -> Result<Seeded, String> {
    use crate::control::db::{Actor, DbError};
    let err = |what: &str, e: DbError| format!("cannot seed the control plane ({what}): {e}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let actor = Actor::system();
    let org = db
        .ensure_default_org(now)
        .await
        .map_err(|e| err("organization", e))?;
    let projects = db
        .list_projects(Some(&org.id))
        .await
        .map_err(|e| err("projects", e))?;
    let project = match projects.into_iter().find(|p| p.name == "demo") {
        Some(p) => p,
        None => db
            .create_project(&org.id, "demo", &actor, now)
            .await
            .map_err(|e| err("project", e))?,
    };
    let key = match fixed_key {
        Some(k) => crate::auth::from_plaintext(k).map_err(|e| e.to_string())?,
        None => crate::auth::generate(),
    };
    match db.get_agent(DEMO_AGENT_ID).await {
        Ok(_) => {
            let keys = db
                .list_agent_keys(DEMO_AGENT_ID)
                .await
                .map_err(|e| err("agent keys", e))?;
            let current = keys
                .iter()
                .any(|k| k.key_id == key.key_id && k.revoked_at.is_none());
            if !current {
                db.rotate_agent_key(DEMO_AGENT_ID, &key, &actor, now)
                    .await
                    .map_err(|e| err("agent key", e))?;
            }
        }
        Err(DbError::NotFound(_)) => {
            db.create_agent(
                &project.id,
                Some(DEMO_AGENT_ID),
                "demo agent",
                &key,
                &actor,
                now,
            )
            .await
            .map_err(|e| err("agent", e))?;
        }
        Err(e) => return Err(err("agent", e)),
    }
    // The demo policy only where there is none: an administrator's edits survive restarts.
    match db.get_policy(DEMO_AGENT_ID).await {
        Ok(_) => {}
        Err(DbError::NotFound(_)) => {
            let policy = serde_json::to_string(&demo_policy()).map_err(|e| e.to_string())?;
            db.put_policy(DEMO_AGENT_ID, &policy, &actor, now)
                .await
                .map_err(|e| err("policy", e))?;
        }
        Err(e) => return Err(err("policy", e)),
    }
    // The history agent, on a new data directory only (its key lives in this run's memory).
    let history_key = match db.get_agent(history::RESEARCH_AGENT_ID).await {
        Ok(_) => None,
        Err(DbError::NotFound(_)) if with_history => {
            let key = crate::auth::generate();
            let policy =
                serde_json::to_string(&history::research_policy()).map_err(|e| e.to_string())?;
            db.create_agent_with_policy(
                &project.id,
                Some(history::RESEARCH_AGENT_ID),
                "research agent",
                &key,
                Some(&policy),
                &actor,
                now,
            )
            .await
            .map_err(|e| err("history agent", e))?;
            Some(key.plaintext.clone())
        }
        Err(DbError::NotFound(_)) => None,
        Err(e) => return Err(err("history agent", e)),
    };
    let token = crate::auth::generate();
    db.create_sidecar(&project.id, "roony dev sidecar", &token, &actor, now)
        .await
        .map_err(|e| err("sidecar", e))?;
    Ok(Seeded {
        agent_key: key.plaintext.clone(),
        sidecar_token: token.plaintext.clone(),
        history_key,
    })
}

/// Waits (up to 10 s) until the first bundle has put the demo agent's key in the sidecar.
async fn wait_for_agent(service: &Service, key: &str) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while service.authenticate(Some(key)).is_err() {
        if tokio::time::Instant::now() > deadline {
            return Err("the sidecar did not receive the demo agent from the control plane".into());
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    Ok(())
}

async fn shutdown_on_signal(stop: tokio::sync::watch::Sender<bool>) {
    crate::cli::shutdown_signal().await;
    let _ = stop.send(true);
}
