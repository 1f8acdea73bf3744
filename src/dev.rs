//! `roony dev`: the Stripe emulator and a sidecar in one process, with a demo agent.

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

pub const DEMO_AGENT_ID: &str = "agt_demo";
/// The emulator accepts any test-mode key; this one is only meaningful locally.
pub const DEV_STRIPE_KEY: &str = "sk_test_roony_dev";

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
    /// Where state lives.
    #[arg(long, env = "ROONY_DEV_DATA_DIR", default_value = ".roony/dev")]
    pub data_dir: PathBuf,
    /// Use this demo agent key instead of generating one (at least 20 characters).
    #[arg(long, env = "ROONY_DEV_AGENT_KEY", hide_env_values = true)]
    pub agent_key: Option<String>,
    #[command(flatten)]
    pub mcp: crate::cli::McpHostArgs,
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
    let emulator = tokio::spawn(
        Emulator::new(EmulatorConfig::default()).serve(emulator_listener, stopped(stop_rx.clone())),
    );

    let config = SidecarConfig {
        listen: args.sidecar_listen,
        data_dir: args.data_dir.join("sidecar"),
        stripe: StripeConfig::new(DEV_STRIPE_KEY, Some(format!("http://{emulator_addr}"))),
        billing: BillingAddress::default(),
        mcp: args.mcp.config(),
    };
    let store = sidecar::open_store(&config.data_dir).map_err(|e| e.to_string())?;
    let service = sidecar::build_service(store, &config).map_err(|e| e.to_string())?;
    let key = service
        .create_agent(
            DEMO_AGENT_ID,
            "demo agent",
            demo_policy(),
            args.agent_key.as_deref(),
        )
        .map_err(|e| format!("cannot create the demo agent: {e}"))?;
    let running = sidecar::start(
        service,
        config.listen,
        config.mcp.clone(),
        stopped(stop_rx.clone()),
    )
    .await
    .map_err(|e| e.to_string())?;

    let base = format!("http://{}", running.addr);
    eprintln!("roony: stripe emulator listening on http://{emulator_addr}");
    eprintln!("roony: sidecar listening on {base}");
    println!(
        "\nRoony is running (data in {}).\n\n\
         Demo agent: {DEMO_AGENT_ID} — USD 100.00 per purchase, USD 250.00 a day, no gambling,\n\
         purchases above USD 50.00 need the user's confirmation.\n\
         Agent key (shown once): {key}\n\n\
         Buy something:\n  curl -s {base}/api/v1/purchase_intent -H 'Authorization: Bearer {key}' \\\n    \
         -H 'Content-Type: application/json' \\\n    \
         -d '{{\"amount\":1200,\"currency\":\"usd\",\"merchant\":{{\"name\":\"Namecheap\",\"url\":\"https://www.namecheap.com\",\"country\":\"US\"}},\"description\":\"one domain for a year\"}}'\n\n\
         See the budget:  curl -s {base}/api/v1/budget -H 'Authorization: Bearer {key}'\n\
         API spec:        {base}/openapi.json\n\
         MCP:             {base}/mcp (streamable HTTP, same key), or `roony mcp` over stdio\n\
         Stop with Ctrl-C.\n",
        args.data_dir.display()
    );

    shutdown_on_signal(stop_tx).await;
    crate::cli::wait_server(running.server).await?;
    running.background.abort();
    match emulator.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("emulator failed: {e}")),
        Err(e) => Err(format!("emulator task failed: {e}")),
    }
}

async fn shutdown_on_signal(stop: tokio::sync::watch::Sender<bool>) {
    crate::cli::shutdown_signal().await;
    let _ = stop.send(true);
}
