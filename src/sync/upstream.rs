//! The sidecar's requests to the control plane besides the bundle: delivering the outbox
//! (events up) and holding allowances (leases) of shared budgets. Also tracks when the
//! control plane was last reached, for the offline limit.
//!
//! Lease invariant (see `wire::LeaseRequest`): the sidecar raises its local allowance only
//! to what the control plane granted, and lowers it locally before telling the control
//! plane; lease requests are serialized (one at a time) and numbered, so the control plane's
//! record of this sidecar's allowance is never below the allowance the sidecar uses.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use crate::store::{LeaseNeed, Store, StoreError};
use crate::sync::client::SyncConfig;
use crate::sync::wire::{self, EventAck, EventBatch, LeaseRequest, LeaseResponse, LeaseWant};

/// Default offline limit: after this long without reaching the control plane, a synced
/// sidecar declines every purchase with `control_plane_unreachable`.
pub const DEFAULT_OFFLINE_LIMIT: Duration = Duration::from_secs(3600);
/// Leases not used for this long are given back down to what is reserved.
pub const TRIM_AFTER: Duration = Duration::from_secs(2);
/// Timeout of one lease request: a purchase waits at most this long for an allowance.
pub const LEASE_TIMEOUT: Duration = Duration::from_secs(2);
const MIN_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("request failed: {0}")]
    Http(#[from] reqwest::Error),
    #[error("the control plane answered {0}: {1}")]
    Status(u16, String),
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

/// The sidecar's connection to its control plane for events and leases.
pub struct Upstream {
    config: SyncConfig,
    client: reqwest::Client,
    offline_limit_secs: i64,
    /// Unix seconds of the last answer from the control plane (any endpoint).
    last_contact: AtomicI64,
    /// The last request to the control plane (any endpoint) was answered.
    reachable: AtomicBool,
    /// The last bundle said the organization's Stripe account is disconnected.
    stripe_disconnected: AtomicBool,
    /// Unix milliseconds of the last purchase that used a shared budget.
    last_lease_use_ms: AtomicI64,
    /// One lease request at a time; holds the last sequence number used.
    lease_lock: tokio::sync::Mutex<i64>,
    /// What purchases being decided now need, per (budget, bucket).
    demand: Arc<std::sync::Mutex<HashMap<(String, i64), i64>>>,
}

/// A purchase's demand on shared budgets, counted until dropped (after its decision).
pub struct Demand {
    table: Arc<std::sync::Mutex<HashMap<(String, i64), i64>>>,
    entries: Vec<((String, i64), i64)>,
}

impl Drop for Demand {
    fn drop(&mut self) {
        if let Ok(mut t) = self.table.lock() {
            for (key, need) in self.entries.drain(..) {
                if let Some(v) = t.get_mut(&key) {
                    *v -= need;
                    if *v <= 0 {
                        t.remove(&key);
                    }
                }
            }
        }
    }
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn unix_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Upstream {
    /// `last_seq` is the store's last lease sequence number ([`Store::lease_seq`]).
    pub fn new(
        config: SyncConfig,
        offline_limit: Duration,
        last_seq: i64,
    ) -> Result<Upstream, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?;
        Ok(Upstream {
            config,
            client,
            offline_limit_secs: i64::try_from(offline_limit.as_secs()).unwrap_or(i64::MAX),
            last_contact: AtomicI64::new(0),
            reachable: AtomicBool::new(false),
            stripe_disconnected: AtomicBool::new(false),
            last_lease_use_ms: AtomicI64::new(0),
            lease_lock: tokio::sync::Mutex::new(last_seq),
            demand: Arc::default(),
        })
    }

    /// Counts a purchase's needs as demand until the returned guard is dropped.
    pub fn demand(&self, needs: &[LeaseNeed]) -> Demand {
        if !needs.is_empty() {
            self.last_lease_use_ms
                .store(unix_now_ms(), Ordering::Release);
        }
        let entries: Vec<((String, i64), i64)> = needs
            .iter()
            .map(|n| ((n.budget_id.clone(), n.bucket_start), n.need))
            .collect();
        if let Ok(mut t) = self.demand.lock() {
            for (key, need) in &entries {
                *t.entry(key.clone()).or_insert(0) += need;
            }
        }
        Demand {
            table: self.demand.clone(),
            entries,
        }
    }

    fn pending(&self, budget_id: &str, bucket_start: i64) -> i64 {
        self.demand
            .lock()
            .ok()
            .and_then(|t| t.get(&(budget_id.to_string(), bucket_start)).copied())
            .unwrap_or(0)
    }

    /// True when some budget's allowance is below what is reserved plus what purchases
    /// being decided need (this one included, see [`Upstream::demand`]). Demand is read
    /// before the store: a purchase drops its demand only after its reservation is
    /// committed, so it is counted at least once, never missed.
    pub fn short(&self, store: &Store, needs: &[LeaseNeed]) -> bool {
        if needs.is_empty() {
            // No shared budget in the purchase's currency: nothing to read.
            return false;
        }
        let pending: Vec<i64> = needs
            .iter()
            .map(|n| self.pending(&n.budget_id, n.bucket_start).max(n.need))
            .collect();
        let Ok(current) = store.leases() else {
            return true;
        };
        needs.iter().zip(pending).any(|(n, pending)| {
            let (lease, used) = current
                .iter()
                .find(|l| l.budget_id == n.budget_id && l.bucket_start == n.bucket_start)
                .map_or((0, n.used), |l| (l.lease, l.used));
            used.saturating_add(pending) > lease
        })
    }

    fn url(&self, path: &str) -> String {
        format!(
            "{}{}",
            self.config.control_plane_url.trim_end_matches('/'),
            path
        )
    }

    /// Adds this sidecar's token id and signature to a card's `roony_*` metadata (see
    /// `wire::sign_card_metadata`).
    pub fn sign_card_metadata(&self, metadata: &mut std::collections::BTreeMap<String, String>) {
        metadata.insert(
            wire::CARD_SIDECAR_KEY.to_string(),
            crate::auth::key_id(&self.config.sidecar_token),
        );
        let sig = wire::sign_card_metadata(metadata, &self.config.sidecar_token);
        metadata.insert(wire::CARD_SIGNATURE_KEY.to_string(), sig);
    }

    /// Notes an answer from the control plane now.
    pub fn contact(&self) {
        self.reachable.store(true, Ordering::Release);
        self.contact_at(unix_now_ms() / 1000);
    }

    /// Notes a request to the control plane that failed.
    pub fn lost(&self) {
        self.reachable.store(false, Ordering::Release);
    }

    /// Notes contact at `at` (Unix seconds), if later than the last one.
    pub fn contact_at(&self, at: i64) {
        self.last_contact.fetch_max(at, Ordering::AcqRel);
    }

    /// Unix seconds of the last contact (0: never).
    pub fn last_contact(&self) -> i64 {
        self.last_contact.load(Ordering::Acquire)
    }

    /// Notes the Stripe connection status of the last applied bundle.
    pub fn set_stripe_status(&self, stripe: Option<&crate::sync::wire::BundleStripe>) {
        let disconnected = stripe.is_some_and(|s| s.is_disconnected());
        self.stripe_disconnected
            .store(disconnected, std::sync::atomic::Ordering::Relaxed);
    }

    /// The last applied bundle said the organization's Stripe account is disconnected.
    pub fn stripe_disconnected(&self) -> bool {
        self.stripe_disconnected
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// True when the control plane has not been reached for longer than the offline limit
    /// (a sidecar that never reached it and has no persisted bundle counts from start-up).
    pub fn offline(&self, now: i64) -> bool {
        let last = self.last_contact();
        last > 0 && now.saturating_sub(last) > self.offline_limit_secs
    }

    // ---- leases ------------------------------------------------------------------------

    async fn request_leases(
        &self,
        seq: i64,
        leases: Vec<LeaseWant>,
    ) -> Result<LeaseResponse, UpstreamError> {
        let resp = self
            .client
            .post(self.url(wire::LEASES_PATH))
            .bearer_auth(&self.config.sidecar_token)
            .timeout(LEASE_TIMEOUT)
            .json(&LeaseRequest {
                format: wire::FORMAT,
                seq,
                leases,
            })
            .send()
            .await
            .inspect_err(|_| self.lost())?;
        let status = resp.status().as_u16();
        if status != 200 {
            let body = resp.text().await.unwrap_or_default();
            return Err(UpstreamError::Status(status, body));
        }
        let parsed = resp.json::<LeaseResponse>().await?;
        self.contact();
        Ok(parsed)
    }

    fn next_seq(last: &mut i64) -> i64 {
        // Time-based so that a sidecar whose database was restored from an old copy still
        // moves forward; strictly increasing in any case.
        *last = (*last + 1).max(unix_now_ms() * 1000);
        *last
    }

    /// Asks the control plane for the allowances `needs` lack. Returns the ids of the
    /// budgets that could not be asked (control plane unreachable); a smaller grant than
    /// needed is not an error (the decision then declines with `exceeds_budget`).
    pub async fn grow(&self, store: &Store, needs: Vec<LeaseNeed>) -> Vec<String> {
        let mut seq_guard = self.lease_lock.lock().await;
        // Another purchase may have grown these leases while this one waited. Demand first,
        // then the store (see `short`).
        let pending: Vec<i64> = needs
            .iter()
            .map(|n| self.pending(&n.budget_id, n.bucket_start).max(n.need))
            .collect();
        let current = match store.leases() {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot read leases");
                return needs.into_iter().map(|n| n.budget_id).collect();
            }
        };
        let mut wants = Vec::new();
        for (n, pending) in needs.into_iter().zip(pending) {
            let (lease, used) = current
                .iter()
                .find(|l| l.budget_id == n.budget_id && l.bucket_start == n.bucket_start)
                .map_or((0, n.used), |l| (l.lease, l.used));
            let required = used.saturating_add(pending);
            if required <= lease {
                continue;
            }
            // Ask for a tenth of the budget beyond what this purchase needs, so that the
            // next purchases do not each wait for the control plane.
            let want = required.max(required.saturating_add(n.limit / 10).min(n.limit));
            wants.push(LeaseWant {
                budget_id: n.budget_id,
                bucket_start: n.bucket_start,
                want,
            });
        }
        if wants.is_empty() {
            return Vec::new();
        }
        let seq = Self::next_seq(&mut seq_guard);
        match self.request_leases(seq, wants.clone()).await {
            Ok(resp) => {
                let mut failed = Vec::new();
                for (want, grant) in wants.iter().zip(resp.leases.iter()) {
                    if grant.budget_id != want.budget_id || grant.bucket_start != want.bucket_start
                    {
                        failed.push(want.budget_id.clone());
                        continue;
                    }
                    if let Err(e) =
                        store.set_lease(&grant.budget_id, grant.bucket_start, grant.granted, seq)
                    {
                        tracing::error!(error = %e, "cannot record a lease");
                        failed.push(want.budget_id.clone());
                    } else {
                        tracing::debug!(budget = %grant.budget_id, granted = grant.granted, leased_total = grant.leased_total, "lease granted");
                    }
                }
                failed
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot reach the control plane for a shared-budget allowance");
                wants.into_iter().map(|w| w.budget_id).collect()
            }
        }
    }

    /// Gives back allowances not used for [`TRIM_AFTER`] (down to what is reserved) and
    /// forgets those of buckets that are over. Nothing is given back while the control
    /// plane is unreachable: the sidecar keeps deciding within the allowance it holds.
    pub async fn trim(&self, store: &Store, now: i64) -> Result<(), UpstreamError> {
        store.drop_old_leases(now)?;
        if !self.reachable.load(Ordering::Acquire) {
            return Ok(());
        }
        let idle = unix_now_ms() - self.last_lease_use_ms.load(Ordering::Acquire);
        if idle < i64::try_from(TRIM_AFTER.as_millis()).unwrap_or(i64::MAX) {
            return Ok(());
        }
        let mut seq_guard = self.lease_lock.lock().await;
        let mut wants = Vec::new();
        for l in store.leases()? {
            if l.lease > l.used {
                let held = store.lower_lease(&l.budget_id, l.bucket_start, l.used)?;
                wants.push(LeaseWant {
                    budget_id: l.budget_id,
                    bucket_start: l.bucket_start,
                    want: held,
                });
            }
        }
        if wants.is_empty() {
            return Ok(());
        }
        let seq = Self::next_seq(&mut seq_guard);
        let resp = self.request_leases(seq, wants.clone()).await?;
        for (want, grant) in wants.iter().zip(resp.leases.iter()) {
            // The grant is at most what was asked (already held locally); never raise here.
            if grant.budget_id == want.budget_id && grant.granted < want.want {
                store.lower_lease(&grant.budget_id, grant.bucket_start, grant.granted)?;
            }
        }
        tracing::debug!(leases = wants.len(), "unused allowances given back");
        Ok(())
    }

    /// Runs [`Upstream::trim`] every second, forever.
    pub async fn keep_leases(self: Arc<Self>, store: Store) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            if let Err(e) = self.trim(&store, unix_now_ms() / 1000).await {
                tracing::debug!(error = %e, "giving back unused allowances failed; will retry");
            }
        }
    }

    // ---- outbox --------------------------------------------------------------------------

    /// Delivers one batch; returns how many events it carried (0: the outbox is empty).
    pub async fn deliver_once(&self, store: &Store) -> Result<usize, UpstreamError> {
        let batch = store.outbox_batch(wire::MAX_EVENTS_PER_BATCH)?;
        let Some(last) = batch.last().map(|(seq, _)| *seq) else {
            return Ok(0);
        };
        let n = batch.len();
        let resp = self
            .client
            .post(self.url(wire::EVENTS_PATH))
            .bearer_auth(&self.config.sidecar_token)
            .json(&EventBatch {
                format: wire::FORMAT,
                events: batch.into_iter().map(|(_, e)| e).collect(),
            })
            .send()
            .await
            .inspect_err(|_| self.lost())?;
        let status = resp.status().as_u16();
        if status != 200 {
            let body = resp.text().await.unwrap_or_default();
            return Err(UpstreamError::Status(status, body));
        }
        let ack = resp.json::<EventAck>().await?;
        self.contact();
        for r in &ack.rejected {
            tracing::warn!(event = %r.id, code = %r.code, message = %r.message, "the control plane rejected an event");
        }
        store.outbox_ack(last)?;
        tracing::debug!(
            events = n,
            accepted = ack.accepted,
            duplicates = ack.duplicates,
            "outbox delivered"
        );
        Ok(n)
    }

    /// Delivers the outbox forever: at once when events are written, with backoff while the
    /// control plane is unreachable. Events stay in redb until acknowledged.
    pub async fn deliver_outbox(self: Arc<Self>, store: Store) {
        let mut backoff = MIN_BACKOFF;
        loop {
            match self.deliver_once(&store).await {
                Ok(0) => {
                    backoff = MIN_BACKOFF;
                    tokio::select! {
                        _ = store.outbox_written() => {}
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
                Ok(_) => backoff = MIN_BACKOFF,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "delivering the outbox failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}
