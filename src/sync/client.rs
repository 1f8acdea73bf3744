//! The sidecar's side of sync: restore the persisted bundle at start-up, then long-poll the
//! control plane for new bundles, verify, apply and persist each one.

use std::time::Duration;

use crate::policy::Policy;
use crate::store::{AgentStatus, Store, StoreError, SyncApplied, SyncedAgent, SyncedKey};
use crate::sync::wire::{self, Bundle, VerifyError};

/// How long the sidecar asks the control plane to hold a request open.
pub const WAIT_SECONDS: u64 = 25;
/// Longest pause between reconnection attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);
const MIN_BACKOFF: Duration = Duration::from_millis(250);

/// Where the control plane is and how this sidecar authenticates to it.
#[derive(Clone)]
pub struct SyncConfig {
    /// Base URL, e.g. `http://127.0.0.1:8788`.
    pub control_plane_url: String,
    /// The sidecar token (`POST /api/admin/v1/sidecars`). Never logged.
    pub sidecar_token: String,
}

impl std::fmt::Debug for SyncConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncConfig")
            .field("control_plane_url", &self.control_plane_url)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("cannot use the sidecar database: {0}")]
    Store(#[from] StoreError),
    #[error(
        "the persisted policy bundle was rejected ({0}); every agent is frozen until the control plane sends a valid bundle"
    )]
    Rejected(VerifyError),
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("request failed: {0}")]
    Http(#[from] reqwest::Error),
    #[error("the control plane answered {0}")]
    Status(u16),
    #[error("the bundle was rejected: {0}")]
    Rejected(#[from] VerifyError),
    #[error("cannot apply the bundle: {0}")]
    Store(#[from] StoreError),
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Applies a verified bundle to the store (and persists `raw` with it, when given).
pub fn apply(
    store: &Store,
    bundle: &Bundle,
    raw: Option<&[u8]>,
) -> Result<SyncApplied, StoreError> {
    let agents: Vec<SyncedAgent> = bundle
        .agents
        .iter()
        .map(|a| {
            let policy = a.policy.clone().and_then(|v| {
                serde_json::from_value::<Policy>(v)
                    .map_err(|e| {
                        tracing::warn!(agent = %a.id, error = %e, "policy in bundle is unreadable; the agent is frozen");
                    })
                    .ok()
            });
            SyncedAgent {
                id: a.id.clone(),
                name: a.name.clone(),
                status: if a.status == "active" {
                    AgentStatus::Active
                } else {
                    AgentStatus::Frozen
                },
                policy,
                keys: a
                    .keys
                    .iter()
                    .map(|k| SyncedKey {
                        key_id: k.key_id.clone(),
                        key_hash: k.key_hash.clone(),
                        revoked: k.revoked,
                    })
                    .collect(),
            }
        })
        .collect();
    store.apply_sync(&agents, raw, unix_now())
}

/// At start-up, before serving: applies the persisted bundle if there is one and it
/// verifies with this sidecar's token. Returns the bundle's ETag. A bundle that does not
/// verify is not applied: every agent is frozen instead, until a valid bundle arrives.
pub fn restore(store: &Store, config: &SyncConfig) -> Result<Option<Bundle>, RestoreError> {
    let Some(raw) = store.sync_bundle()? else {
        return Ok(None);
    };
    match wire::verify(&raw, &config.sidecar_token) {
        Ok(bundle) => {
            let applied = apply(store, &bundle, None)?;
            tracing::info!(
                revision = bundle.revision,
                agents = applied.agents,
                "applied the persisted policy bundle"
            );
            Ok(Some(bundle))
        }
        Err(e) => {
            store.freeze_all_agents()?;
            Err(RestoreError::Rejected(e))
        }
    }
}

enum Fetched {
    NotModified,
    Bundle(Vec<u8>),
}

async fn fetch(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    etag: Option<&str>,
) -> Result<Fetched, FetchError> {
    let mut req = client.get(url).bearer_auth(token);
    if let Some(etag) = etag {
        req = req.header(reqwest::header::IF_NONE_MATCH, format!("\"{etag}\""));
    }
    let resp = req.send().await?;
    match resp.status().as_u16() {
        200 => Ok(Fetched::Bundle(resp.bytes().await?.to_vec())),
        304 => Ok(Fetched::NotModified),
        other => Err(FetchError::Status(other)),
    }
}

/// One round: fetch (long-poll), verify, apply, persist. Returns the new ETag, if any.
async fn round(
    client: &reqwest::Client,
    store: &Store,
    url: &str,
    config: &SyncConfig,
    etag: Option<&str>,
) -> Result<Option<Bundle>, FetchError> {
    match fetch(client, url, &config.sidecar_token, etag).await? {
        Fetched::NotModified => Ok(None),
        Fetched::Bundle(raw) => {
            let bundle = wire::verify(&raw, &config.sidecar_token)?;
            let applied = apply(store, &bundle, Some(&raw))?;
            tracing::info!(
                revision = bundle.revision,
                agents = applied.agents,
                frozen = applied.frozen_vanished,
                revoked_keys = applied.revoked_vanished,
                "applied policy bundle"
            );
            Ok(Some(bundle))
        }
    }
}

/// Long-polls the control plane forever (reconnecting with backoff), starting from the
/// bundle with `etag` (the restored one, if any).
pub async fn run(store: Store, config: SyncConfig, mut etag: Option<String>) {
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(WAIT_SECONDS + 15))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "sync: cannot build the http client; sync is off");
            return;
        }
    };
    let url = format!(
        "{}{}?wait={WAIT_SECONDS}",
        config.control_plane_url.trim_end_matches('/'),
        wire::BUNDLE_PATH
    );
    let mut backoff = MIN_BACKOFF;
    loop {
        match round(&client, &store, &url, &config, etag.as_deref()).await {
            Ok(Some(bundle)) => {
                etag = Some(bundle.etag);
                backoff = MIN_BACKOFF;
            }
            Ok(None) => backoff = MIN_BACKOFF,
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "sync with the control plane failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Restores the persisted bundle (see [`restore`]) and spawns [`run`]. A rejected
/// persisted bundle is logged and reported; sync starts anyway.
pub fn start(
    store: Store,
    config: SyncConfig,
) -> (
    Result<Option<i64>, RestoreError>,
    tokio::task::JoinHandle<()>,
) {
    let restored = restore(&store, &config);
    let etag = match &restored {
        Ok(Some(b)) => Some(b.etag.clone()),
        Ok(None) => None,
        Err(e) => {
            tracing::error!(error = %e, "persisted policy bundle not applied");
            None
        }
    };
    let revision = restored.map(|b| b.map(|b| b.revision));
    (revision, tokio::spawn(run(store, config, etag)))
}
