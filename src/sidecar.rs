//! Wiring of the sidecar process: store, issuer, service, background tasks, HTTP server.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::issuer::{BillingAddress, Issuer, IssuerError, StripeConfig};
use crate::service::{Service, ServiceConfig, SystemClock};
use crate::store::{Store, StoreError};

#[derive(Clone, Debug)]
pub struct SidecarConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub stripe: StripeConfig,
    pub billing: BillingAddress,
    pub mcp: crate::mcp::http::McpHttpConfig,
    /// Limits per agent key and per source address (see `crate::ratelimit`).
    pub rate_limits: crate::ratelimit::RateLimitConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot create data directory {0}: {1}")]
    DataDir(PathBuf, std::io::Error),
    #[error("cannot open the database: {0}")]
    Store(#[from] StoreError),
    #[error("cannot set up the stripe client: {0}")]
    Issuer(#[from] IssuerError),
    #[error("cannot listen on {0}: {1}")]
    Listen(SocketAddr, std::io::Error),
    #[error("cannot set up MCP: {0}")]
    Mcp(String),
    #[error("cannot set up sync: {0}")]
    Sync(String),
}

/// Opens the sidecar database in `data_dir` (created if needed).
pub fn open_store(data_dir: &Path) -> Result<Store, StartError> {
    std::fs::create_dir_all(data_dir)
        .map_err(|e| StartError::DataDir(data_dir.to_path_buf(), e))?;
    // `start` audits every request into `audit.redb` here (`crate::audit`).
    crate::audit::http::register_data_dir(data_dir);
    Ok(Store::open(&data_dir.join("sidecar.redb"))?)
}

/// Builds the service from a store and configuration.
pub fn build_service(store: Store, config: &SidecarConfig) -> Result<Service, StartError> {
    let issuer = Issuer::new(config.stripe.clone())?;
    Ok(Service::new(
        store,
        issuer,
        ServiceConfig {
            billing: config.billing.clone(),
            ..ServiceConfig::default()
        },
        Arc::new(SystemClock),
    ))
}

/// Starts sync with the control plane (see `crate::sync`): applies the persisted bundle
/// first — so a sidecar whose control plane is down enforces the last good policy — then
/// long-polls for new bundles, delivers the outbox and keeps shared-budget leases in the
/// background, and attaches the control plane to the service (leases, offline limit). Call
/// before serving.
pub fn start_sync(
    service: &Service,
    config: crate::sync::client::SyncConfig,
    offline_limit: std::time::Duration,
) -> Result<Vec<tokio::task::JoinHandle<()>>, StartError> {
    eprintln!(
        "roony: syncing with the control plane at {}",
        crate::control::redact_url(config.control_plane_url.trim_end_matches('/'))
    );
    let store = service.store().clone();
    let upstream = Arc::new(
        crate::sync::upstream::Upstream::new(config.clone(), offline_limit, store.lease_seq()?)
            .map_err(|e| StartError::Sync(e.to_string()))?,
    );
    service.attach_upstream(upstream.clone());
    let (restored, tasks) = crate::sync::client::start_with_upstream(store, config, upstream);
    match restored {
        Ok(Some(revision)) => {
            eprintln!("roony: applied the persisted policy bundle (revision {revision})")
        }
        Ok(None) => {}
        Err(e) => eprintln!("roony: {e}"),
    }
    Ok(tasks)
}

/// Starts the card-vault egress proxy (`crate::proxy`) next to the HTTP server; returns
/// the address it listens on and its handle.
pub async fn start_proxy(
    service: Service,
    config: crate::proxy::ProxyConfig,
) -> Result<crate::proxy::RunningProxy, StartError> {
    let listen = config.listen;
    crate::proxy::start(service, config)
        .await
        .map_err(|e| StartError::Listen(listen, std::io::Error::other(e)))
}

/// A running sidecar.
pub struct Running {
    pub addr: SocketAddr,
    pub server: tokio::task::JoinHandle<std::io::Result<()>>,
    pub background: tokio::task::JoinHandle<()>,
}

/// The sidecar's HTTP app: the agent OpenAPI and MCP at `/mcp`, **without rate limits**
/// (tests, or behind a limiter of your own); [`app_with_limits`] is what `roony sidecar`
/// serves.
pub fn app(
    service: Service,
    mcp: crate::mcp::http::McpHttpConfig,
) -> Result<axum::Router, StartError> {
    app_with_limits(service, mcp, crate::ratelimit::RateLimitConfig::disabled())
}

/// The sidecar's HTTP app with every agent-facing route (the OpenAPI, `/openapi.json` and
/// `/mcp`; not `/healthz`) behind one rate limiter: per agent key for requests whose key
/// authenticates, per source address for the rest. Serve it with `crate::api::serve` (which
/// provides the peer address).
pub fn app_with_limits(
    service: Service,
    mcp: crate::mcp::http::McpHttpConfig,
    limits: crate::ratelimit::RateLimitConfig,
) -> Result<axum::Router, StartError> {
    let mcp = crate::mcp::http::router(service.clone(), mcp).map_err(StartError::Mcp)?;
    let app = mcp.merge(crate::api::router(service.clone()));
    Ok(crate::ratelimit::HttpLimiter::new(service, limits).apply(app))
}

/// Binds, starts background tasks and serves the agent API and MCP until `shutdown`
/// resolves.
pub async fn start(
    service: Service,
    listen: SocketAddr,
    mcp: crate::mcp::http::McpHttpConfig,
    limits: crate::ratelimit::RateLimitConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<Running, StartError> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| StartError::Listen(listen, e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| StartError::Listen(listen, e))?;
    let app = app_with_limits(service.clone(), mcp, limits)?;
    // Every request audited (outermost: rate-limited ones too), see `crate::audit`.
    let app = crate::audit::http::apply_process_log(app)
        .map_err(|e| StartError::DataDir(PathBuf::from("audit.redb"), std::io::Error::other(e)))?;
    let background = service.spawn_background();
    let server = tokio::spawn(crate::api::serve(listener, app, shutdown));
    Ok(Running {
        addr,
        server,
        background,
    })
}
