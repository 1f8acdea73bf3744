//! The sidecar's side of sync: restore the persisted bundle at start-up, then long-poll the
//! control plane for new bundles, verify, apply and persist each one.

use std::time::Duration;

use std::sync::Arc;

use crate::domain::money::Currency;
use crate::domain::time::Period;
use crate::policy::{BudgetRule, BudgetScope, Policy};
use crate::store::{
    AdminDecision, AgentStatus, SharedBudget, Store, StoreError, SyncApplied, SyncedAgent,
    SyncedKey,
};
use crate::sync::upstream::Upstream;
use crate::sync::wire::{self, Bundle, BundleBudget, VerifyError};

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

fn period_of(b: &BundleBudget) -> Option<Period> {
    serde_json::from_value(serde_json::Value::String(b.period.clone())).ok()
}

/// What folding one admin-set agent budget into the agent's policy did with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BudgetFold {
    /// Lowered the policy's budget of its period from `policy_limit`.
    Tightened {
        policy_limit: i64,
    },
    /// The policy has no budget of its period: it was added.
    Added,
    /// The policy's budget of its period is at most this limit and still binds.
    NoEffect {
        policy_limit: i64,
    },
    /// Another currency than the policy's: the policy spends its currency only.
    OtherCurrency,
    UnknownPeriod,
}

/// The policy with the agent's admin-set budgets folded in, and what happened to each
/// budget (in the order given): a budget in the policy's currency tightens (or adds) the
/// budget of its period; one in another currency cannot apply. Pure: the sidecar applies
/// exactly this to every bundle, and the dashboard shows and dry-runs the same result.
pub fn fold_budgets(mut policy: Policy, budgets: &[BundleBudget]) -> (Policy, Vec<BudgetFold>) {
    let mut folds = Vec::with_capacity(budgets.len());
    for b in budgets {
        let Some(period) = period_of(b) else {
            folds.push(BudgetFold::UnknownPeriod);
            continue;
        };
        if Currency::parse(&b.currency).ok() != Some(policy.currency) {
            folds.push(BudgetFold::OtherCurrency);
            continue;
        }
        match policy.budgets.iter_mut().find(|r| r.period == period) {
            Some(rule) if b.limit < rule.limit => {
                folds.push(BudgetFold::Tightened {
                    policy_limit: rule.limit,
                });
                rule.limit = b.limit;
            }
            Some(rule) => folds.push(BudgetFold::NoEffect {
                policy_limit: rule.limit,
            }),
            None => {
                folds.push(BudgetFold::Added);
                policy.budgets.push(BudgetRule {
                    period,
                    limit: b.limit,
                });
            }
        }
    }
    (policy, folds)
}

/// [`fold_budgets`], logging the budgets that cannot apply.
pub fn with_budgets(policy: Policy, agent_id: &str, budgets: &[BundleBudget]) -> Policy {
    let (policy, folds) = fold_budgets(policy, budgets);
    for (b, fold) in budgets.iter().zip(folds) {
        match fold {
            BudgetFold::UnknownPeriod => {
                tracing::warn!(agent = %agent_id, budget = %b.id, period = %b.period, "unknown budget period; ignored");
            }
            BudgetFold::OtherCurrency => {
                tracing::warn!(agent = %agent_id, budget = %b.id, "budget currency differs from the policy's; ignored");
            }
            _ => {}
        }
    }
    policy
}

fn shared_budgets(bundle: &Bundle) -> Vec<SharedBudget> {
    bundle
        .budgets
        .iter()
        .filter_map(|b| {
            let scope = match b.scope.as_str() {
                "project" => BudgetScope::Project,
                "org" => BudgetScope::Org,
                _ => return None,
            };
            let (Some(period), Ok(currency)) = (period_of(b), Currency::parse(&b.currency)) else {
                tracing::warn!(budget = %b.id, "shared budget is unreadable; ignored");
                return None;
            };
            Some(SharedBudget {
                id: b.id.clone(),
                scope,
                period,
                currency,
                limit: b.limit,
            })
        })
        .collect()
}

/// Applies a verified bundle to the store (and persists `raw` with it, when given), then the
/// administrators' decisions it carries.
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
            }).map(|p| with_budgets(p, &a.id, &a.budgets));
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
    let now = unix_now();
    let shared = shared_budgets(bundle);
    let applied = store.apply_bundle(&agents, Some(&shared), raw, now)?;
    let decisions: Vec<AdminDecision> = bundle
        .approvals
        .iter()
        .map(|a| AdminDecision {
            intent_id: a.intent_id.clone(),
            agent_id: a.agent_id.clone(),
            approved: a.approved,
            note: a.note.clone(),
            actor: a.actor.clone(),
        })
        .collect();
    if !decisions.is_empty() {
        let approved = store.apply_admin_decisions(&decisions, now)?;
        if !approved.is_empty() {
            tracing::info!(intents = ?approved, "administrator approvals applied; creating cards");
        }
    }
    Ok(applied)
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
/// bundle with `etag` (the restored one, if any). Every answer is noted as contact with the
/// control plane on `upstream`, when given.
pub async fn run(
    store: Store,
    config: SyncConfig,
    mut etag: Option<String>,
    upstream: Option<Arc<Upstream>>,
) {
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
                backoff = MIN_BACKOFF;
                if let Some(u) = &upstream {
                    u.contact();
                    u.set_stripe_status(bundle.stripe.as_ref());
                }
                etag = Some(bundle.etag);
            }
            Ok(None) => {
                backoff = MIN_BACKOFF;
                if let Some(u) = &upstream {
                    u.contact();
                }
            }
            Err(e) => {
                if let Some(u) = &upstream {
                    u.lost();
                }
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
    (revision, tokio::spawn(run(store, config, etag, None)))
}

/// Everything a synced sidecar runs: [`start`]'s bundle sync, plus the outbox delivery and
/// the lease upkeep of `upstream` (which the service consults for shared budgets and the
/// offline limit). Turns the store's outbox on first.
pub fn start_with_upstream(
    store: Store,
    config: SyncConfig,
    upstream: Arc<Upstream>,
) -> (
    Result<Option<i64>, RestoreError>,
    Vec<tokio::task::JoinHandle<()>>,
) {
    store.enable_outbox();
    let config_for_updates = config.clone();
    let restored = restore(&store, &config);
    let etag = match &restored {
        Ok(Some(b)) => {
            upstream.contact_at(b.generated_at);
            upstream.set_stripe_status(b.stripe.as_ref());
            Some(b.etag.clone())
        }
        Ok(None) => None,
        Err(e) => {
            tracing::error!(error = %e, "persisted policy bundle not applied");
            None
        }
    };
    let revision = restored.map(|b| b.map(|b| b.revision));
    let tasks = vec![
        tokio::spawn(run(store.clone(), config, etag, Some(upstream.clone()))),
        tokio::spawn(upstream.clone().deliver_outbox(store.clone())),
        tokio::spawn(upstream.clone().keep_leases(store.clone())),
        tokio::spawn(follow_updates(store, config_for_updates, upstream)),
    ];
    (revision, tasks)
}

/// Follows the control plane's updates feed (authorizations, captures, refunds of the
/// project's cards) forever: long-polls from the persisted position, applies each batch to
/// the store (budgets move from reserved to spent) and persists the new position.
pub async fn follow_updates(store: Store, config: SyncConfig, upstream: Arc<Upstream>) {
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(WAIT_SECONDS + 15))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "sync: cannot build the http client; updates are off");
            return;
        }
    };
    let base = format!(
        "{}{}",
        config.control_plane_url.trim_end_matches('/'),
        wire::UPDATES_PATH
    );
    let mut backoff = MIN_BACKOFF;
    loop {
        let after = match store.updates_after() {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the updates position");
                tokio::time::sleep(MAX_BACKOFF).await;
                continue;
            }
        };
        let result = async {
            let resp = client
                .get(format!("{base}?after={after}&wait={WAIT_SECONDS}"))
                .bearer_auth(&config.sidecar_token)
                .send()
                .await?;
            if resp.status().as_u16() != 200 {
                return Err(FetchError::Status(resp.status().as_u16()));
            }
            Ok(resp.json::<wire::UpdateFeed>().await?)
        }
        .await;
        match result {
            Ok(feed) => {
                upstream.contact();
                backoff = MIN_BACKOFF;
                if feed.updates.is_empty() && feed.next_after == after {
                    continue;
                }
                let s = store.clone();
                let now = unix_now();
                let applied = tokio::task::spawn_blocking(move || {
                    s.apply_intent_updates(&feed.updates, feed.next_after, now)
                })
                .await;
                match applied {
                    Ok(Ok(n)) if n > 0 => tracing::info!(intents = n, "card activity applied"),
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "cannot apply card activity");
                        tokio::time::sleep(backoff).await;
                    }
                    Err(e) => tracing::error!(error = %e, "card activity task failed"),
                }
            }
            Err(e) => {
                upstream.lost();
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "fetching card activity failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(period: &str, currency: &str, limit: i64) -> BundleBudget {
        BundleBudget {
            id: format!("bud_{period}_{currency}"),
            scope: "agent".into(),
            scope_id: "agt".into(),
            period: period.into(),
            currency: currency.into(),
            limit,
        }
    }

    #[test]
    fn agent_budgets_only_tighten_in_the_policy_currency() {
        let mut p = Policy::new(Currency::USD);
        p.budgets = vec![BudgetRule {
            period: Period::Daily,
            limit: 25_000,
        }];
        let (folded, folds) = fold_budgets(
            p,
            &[
                budget("daily", "USD", 50_000),
                budget("weekly", "EUR", 10),
                budget("monthly", "usd", 90_000),
                budget("hourly", "USD", 1),
                budget("daily", "USD", 10_000),
            ],
        );
        assert_eq!(
            folds,
            [
                BudgetFold::NoEffect {
                    policy_limit: 25_000
                },
                BudgetFold::OtherCurrency,
                BudgetFold::Added,
                BudgetFold::UnknownPeriod,
                BudgetFold::Tightened {
                    policy_limit: 25_000
                },
            ]
        );
        let rules: Vec<(Period, i64)> =
            folded.budgets.iter().map(|r| (r.period, r.limit)).collect();
        assert_eq!(rules, [(Period::Daily, 10_000), (Period::Monthly, 90_000)]);
    }
}
