//! The sidecar's state in redb: agents, key hashes, intents, budget usage and timers.
//! Agents and keys are cached in moka. The table layout is documented in docs/design.md.
//!
//! Invariants:
//! - A decision and its reservation are written in one write transaction, so two concurrent
//!   intents can never both see the same remaining budget.
//! - Commits that hold money (a reservation) are durable (`Durability::Immediate`) before the
//!   caller learns of them; pure declines are committed with `Durability::None` and become
//!   durable with the next durable commit.
//! - A reservation is released exactly once: releasing clears `IntentRecord::reservation`.
//! - Shared budgets: in every bucket, what this sidecar has reserved never exceeds the
//!   allowance (lease) it holds. The allowance is raised only after the control plane has
//!   granted it, and lowered here before the control plane is told.
//! - With the outbox on (a synced sidecar), every change of an intent writes its sync event
//!   in the same transaction as the change.

pub mod records;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use sha2::{Digest, Sha256};

use crate::domain::intent::PurchaseIntent;
use crate::domain::time::{Period, UnixSeconds};
use crate::policy::{
    self, AgentState, BudgetStatus, CompiledPolicy, Confirmation, Decision, HistoryEntry, Outcome,
    PolicyError, Reason, ReasonCode, RiskHistory, SharedUsage, Usage,
};
use crate::sync::wire;
pub use records::*;

const AGENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("agents");
const AGENT_KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("agent_keys");
const INTENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("intents");
/// (agent_id, created, intent_id) → (): listing and velocity windows.
const AGENT_INTENTS: TableDefinition<(&str, i64, &str), ()> = TableDefinition::new("agent_intents");
/// (agent_id, client idempotency key) → intent_id.
const IDEMPOTENCY: TableDefinition<(&str, &str), &str> = TableDefinition::new("idempotency");
/// (agent_id, currency, period tag, bucket start) → committed minor units.
const USAGE: TableDefinition<(&str, &str, u8, i64), i64> = TableDefinition::new("usage");
/// (due at, intent_id) → (): cards and approvals to expire.
const TIMERS: TableDefinition<(i64, &str), ()> = TableDefinition::new("timers");
/// intent_id → (): intents whose card creation has not finished (recovered at start-up).
const ISSUING: TableDefinition<&str, ()> = TableDefinition::new("issuing");
/// agent_id → Stripe cardholder id.
const CARDHOLDERS: TableDefinition<&str, &str> = TableDefinition::new("cardholders");
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
/// "current" → the last applied sync bundle, as received (signed JSON).
const BUNDLE: TableDefinition<&str, &[u8]> = TableDefinition::new("bundle");
/// seq → sync event (JSON), delivered to the control plane in seq order, then removed.
const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
/// budget_id → shared budget (JSON), as the last bundle gave them.
const SHARED_BUDGETS: TableDefinition<&str, &[u8]> = TableDefinition::new("shared_budgets");
/// (budget_id, bucket start) → minor units reserved here in that bucket.
const SHARED_USAGE: TableDefinition<(&str, i64), i64> = TableDefinition::new("shared_usage");
/// (budget_id, bucket start) → allowance granted to this sidecar by the control plane.
const LEASES: TableDefinition<(&str, i64), i64> = TableDefinition::new("leases");
/// (agent_id, seq) → (at, amount, currency, normalized merchant name, domain, category,
/// outcome tag): the agent's last `policy::risk::HISTORY_LEN` intents, for risk scores.
/// Written in the decision's transaction; the oldest rows are evicted there too.
const RISK_HISTORY: TableDefinition<(&str, u64), HistoryRow> = TableDefinition::new("risk_history");
type HistoryRow = (
    i64,
    i64,
    &'static str,
    &'static str,
    Option<&'static str>,
    Option<&'static str>,
    u8,
);

pub const SCHEMA_VERSION: &str = "1";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] redb::Error),
    #[error("corrupt record {0}: {1}")]
    Corrupt(String, String),
    #[error("intent not found")]
    NotFound,
    #[error("idempotency key was used with a different request")]
    IdempotencyMismatch,
    #[error("intent is {0}")]
    WrongState(&'static str),
    #[error("database schema version {0} is not supported (expected {SCHEMA_VERSION})")]
    Schema(String),
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self { StoreError::Db(e.into()) }
        }
    )*};
}
db_err!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

/// An agent with its policy compiled once, as cached.
#[derive(Debug)]
pub struct CachedAgent {
    pub record: AgentRecord,
    pub policy: Result<CompiledPolicy, Vec<PolicyError>>,
}

/// One agent as a sync bundle describes it.
#[derive(Clone, Debug)]
pub struct SyncedAgent {
    pub id: String,
    pub name: String,
    pub status: AgentStatus,
    /// `None` when the bundle has no usable policy: the agent is then frozen (or not
    /// created, with its keys, if it is new).
    pub policy: Option<policy::Policy>,
    pub keys: Vec<SyncedKey>,
}

#[derive(Clone, Debug)]
pub struct SyncedKey {
    pub key_id: String,
    pub key_hash: String,
    pub revoked: bool,
}

/// What [`Store::apply_sync`] changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncApplied {
    pub agents: usize,
    pub frozen_vanished: usize,
    pub revoked_vanished: usize,
}

/// Options of one decision.
#[derive(Clone, Debug, Default)]
pub struct DecideOptions {
    /// What the human said when asked to confirm (MCP elicitation).
    pub confirmation: Confirmation,
    /// Use this intent id (allocated when the human was asked). If an intent with this id
    /// exists already, the call is a replay of it: a confirmation can be used only once.
    pub intent_id: Option<String>,
    /// Shared budgets whose allowance could not be raised because the control plane is
    /// unreachable (a shortfall there declines with `control_plane_unreachable`).
    pub unreachable_budgets: Vec<String>,
    /// The sidecar has been out of touch with its control plane for too long.
    pub offline: bool,
    /// The control plane says the organization's Stripe account is disconnected.
    pub stripe_disconnected: bool,
}

/// What `decide` did.
#[derive(Debug)]
pub enum Decided {
    /// A new decision was made and recorded.
    New(IntentRecord),
    /// The idempotency key matched an earlier intent; nothing changed.
    Replay(IntentRecord),
}

#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    agents: moka::sync::Cache<String, Arc<CachedAgent>>,
    keys: moka::sync::Cache<String, Arc<AgentKeyRecord>>,
    signals: Arc<Signals>,
}

/// In-memory flags and wake-ups shared by the clones of a store.
#[derive(Default)]
struct Signals {
    /// Write sync events (a synced sidecar).
    outbox: AtomicBool,
    /// Woken when an event is written.
    outbox_written: tokio::sync::Notify,
    /// A commit without durability happened since the last durable one.
    dirty: AtomicBool,
    /// Intents an administrator approved, waiting for their card.
    approved: std::sync::Mutex<Vec<String>>,
    approved_written: tokio::sync::Notify,
}

fn to_json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    // Serializing plain data structs to a Vec cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

fn from_json<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(what.to_string(), e.to_string()))
}

/// Hex SHA-256 of a validated request (without its idempotency key).
pub fn request_hash(intent: &PurchaseIntent) -> String {
    let mut canonical = intent.clone();
    canonical.idempotency_key = None;
    hex::encode(Sha256::digest(to_json(&canonical)))
}

impl Store {
    /// Opens (or creates) the database at `path` and checks its schema version.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = Database::create(path)?;
        let tx = db.begin_write()?;
        {
            let mut meta = tx.open_table(META)?;
            let existing = meta.get("schema_version")?.map(|v| v.value().to_string());
            match existing {
                Some(v) if v != SCHEMA_VERSION => return Err(StoreError::Schema(v)),
                Some(_) => {}
                None => {
                    meta.insert("schema_version", SCHEMA_VERSION)?;
                }
            }
            // Create every table so that read transactions never see a missing one.
            tx.open_table(AGENTS)?;
            tx.open_table(AGENT_KEYS)?;
            tx.open_table(INTENTS)?;
            tx.open_table(AGENT_INTENTS)?;
            tx.open_table(IDEMPOTENCY)?;
            tx.open_table(USAGE)?;
            tx.open_table(TIMERS)?;
            tx.open_table(ISSUING)?;
            tx.open_table(CARDHOLDERS)?;
            tx.open_table(BUNDLE)?;
            tx.open_table(OUTBOX)?;
            tx.open_table(SHARED_BUDGETS)?;
            tx.open_table(SHARED_USAGE)?;
            tx.open_table(LEASES)?;
            tx.open_table(RISK_HISTORY)?;
        }
        tx.commit()?;
        Ok(Store {
            db: Arc::new(db),
            agents: moka::sync::Cache::builder().max_capacity(10_000).build(),
            keys: moka::sync::Cache::builder().max_capacity(10_000).build(),
            signals: Arc::new(Signals::default()),
        })
    }

    // ---- agents and keys -------------------------------------------------------------

    pub fn put_agent(&self, agent: &AgentRecord) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        tx.open_table(AGENTS)?
            .insert(agent.id.as_str(), to_json(agent).as_slice())?;
        tx.commit()?;
        self.agents.invalidate(&agent.id);
        Ok(())
    }

    pub fn agent(&self, id: &str) -> Result<Option<Arc<CachedAgent>>, StoreError> {
        if let Some(a) = self.agents.get(id) {
            return Ok(Some(a));
        }
        let tx = self.db.begin_read()?;
        let table = tx.open_table(AGENTS)?;
        let Some(bytes) = table.get(id)? else {
            return Ok(None);
        };
        let record: AgentRecord = from_json("agent", bytes.value())?;
        let policy = record.policy.compile();
        let cached = Arc::new(CachedAgent { record, policy });
        self.agents.insert(id.to_string(), cached.clone());
        Ok(Some(cached))
    }

    pub fn list_agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(AGENTS)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (_, v) = row?;
            out.push(from_json("agent", v.value())?);
        }
        Ok(out)
    }

    pub fn put_agent_key(&self, key_id: &str, key: &AgentKeyRecord) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        tx.open_table(AGENT_KEYS)?
            .insert(key_id, to_json(key).as_slice())?;
        tx.commit()?;
        self.keys.invalidate(key_id);
        Ok(())
    }

    pub fn agent_key(&self, key_id: &str) -> Result<Option<Arc<AgentKeyRecord>>, StoreError> {
        if let Some(k) = self.keys.get(key_id) {
            return Ok(Some(k));
        }
        let tx = self.db.begin_read()?;
        let table = tx.open_table(AGENT_KEYS)?;
        let Some(bytes) = table.get(key_id)? else {
            return Ok(None);
        };
        let rec = Arc::new(from_json::<AgentKeyRecord>("agent key", bytes.value())?);
        self.keys.insert(key_id.to_string(), rec.clone());
        Ok(Some(rec))
    }

    /// Makes the agents and keys of the store exactly those of a sync bundle, in one durable
    /// write transaction: agents are upserted with their status and policy, keys with their
    /// hashes and revocation; an agent the bundle does not name is frozen and a key it does
    /// not name is revoked (nothing removed can buy). With `raw_bundle`, the bundle is
    /// persisted in the same transaction. Caches are invalidated afterwards.
    pub fn apply_sync(
        &self,
        agents: &[SyncedAgent],
        raw_bundle: Option<&[u8]>,
        now: UnixSeconds,
    ) -> Result<SyncApplied, StoreError> {
        self.apply_bundle(agents, None, raw_bundle, now)
    }

    /// [`Store::apply_sync`], also replacing the shared budgets when `shared` is given.
    pub fn apply_bundle(
        &self,
        agents: &[SyncedAgent],
        shared: Option<&[SharedBudget]>,
        raw_bundle: Option<&[u8]>,
        now: UnixSeconds,
    ) -> Result<SyncApplied, StoreError> {
        let mut applied = SyncApplied::default();
        let tx = self.db.begin_write()?;
        if let Some(shared) = shared {
            let mut table = tx.open_table(SHARED_BUDGETS)?;
            table.retain(|_, _| false)?;
            for b in shared {
                table.insert(b.id.as_str(), to_json(b).as_slice())?;
            }
        }
        {
            let mut table = tx.open_table(AGENTS)?;
            let mut existing = std::collections::HashMap::new();
            for row in table.iter()? {
                let (k, v) = row?;
                let rec: AgentRecord = from_json("agent", v.value())?;
                existing.insert(k.value().to_string(), rec);
            }
            let mut kept_keys = std::collections::HashMap::new();
            for a in agents {
                let old = existing.remove(&a.id);
                let (policy, status) = match (&a.policy, &old) {
                    (Some(p), _) => (p.clone(), a.status),
                    (None, Some(o)) => (o.policy.clone(), AgentStatus::Frozen),
                    (None, None) => continue,
                };
                let record = AgentRecord {
                    id: a.id.clone(),
                    name: a.name.clone(),
                    status,
                    policy,
                    created: old.as_ref().map_or(now, |o| o.created),
                };
                table.insert(a.id.as_str(), to_json(&record).as_slice())?;
                applied.agents += 1;
                for k in &a.keys {
                    kept_keys.insert(k.key_id.clone(), (a.id.clone(), k));
                }
            }
            for (id, mut rec) in existing {
                if rec.status != AgentStatus::Frozen {
                    rec.status = AgentStatus::Frozen;
                    table.insert(id.as_str(), to_json(&rec).as_slice())?;
                    applied.frozen_vanished += 1;
                }
            }
            let mut keys = tx.open_table(AGENT_KEYS)?;
            let mut old_keys = Vec::new();
            for row in keys.iter()? {
                let (k, v) = row?;
                let rec: AgentKeyRecord = from_json("agent key", v.value())?;
                old_keys.push((k.value().to_string(), rec));
            }
            let mut created = std::collections::HashMap::new();
            for (key_id, mut rec) in old_keys {
                if kept_keys.contains_key(&key_id) {
                    created.insert(key_id, rec.created);
                } else if !rec.revoked {
                    rec.revoked = true;
                    keys.insert(key_id.as_str(), to_json(&rec).as_slice())?;
                    applied.revoked_vanished += 1;
                }
            }
            for (key_id, (agent_id, k)) in &kept_keys {
                let rec = AgentKeyRecord {
                    agent_id: agent_id.clone(),
                    key_hash: k.key_hash.clone(),
                    created: created.get(key_id).copied().unwrap_or(now),
                    revoked: k.revoked,
                };
                keys.insert(key_id.as_str(), to_json(&rec).as_slice())?;
            }
            if let Some(raw) = raw_bundle {
                tx.open_table(BUNDLE)?.insert("current", raw)?;
            }
        }
        tx.commit()?;
        self.agents.invalidate_all();
        self.keys.invalidate_all();
        Ok(applied)
    }

    /// Freezes every agent (a synced sidecar whose persisted bundle cannot be trusted).
    /// Returns how many were active.
    pub fn freeze_all_agents(&self) -> Result<usize, StoreError> {
        let tx = self.db.begin_write()?;
        let mut frozen = 0;
        {
            let mut table = tx.open_table(AGENTS)?;
            let mut records = Vec::new();
            for row in table.iter()? {
                let (_, v) = row?;
                records.push(from_json::<AgentRecord>("agent", v.value())?);
            }
            for mut rec in records {
                if rec.status != AgentStatus::Frozen {
                    rec.status = AgentStatus::Frozen;
                    table.insert(rec.id.as_str(), to_json(&rec).as_slice())?;
                    frozen += 1;
                }
            }
        }
        tx.commit()?;
        self.agents.invalidate_all();
        Ok(frozen)
    }

    /// The last persisted sync bundle (as received), if any.
    pub fn sync_bundle(&self) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(BUNDLE)?;
        Ok(table.get("current")?.map(|v| v.value().to_vec()))
    }

    /// Replaces the persisted sync bundle without applying it (tooling and tests).
    pub fn put_sync_bundle(&self, raw: &[u8]) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        tx.open_table(BUNDLE)?.insert("current", raw)?;
        tx.commit()?;
        Ok(())
    }

    pub fn cardholder(&self, agent_id: &str) -> Result<Option<String>, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(CARDHOLDERS)?;
        Ok(table.get(agent_id)?.map(|v| v.value().to_string()))
    }

    pub fn put_cardholder(&self, agent_id: &str, cardholder: &str) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        tx.open_table(CARDHOLDERS)?.insert(agent_id, cardholder)?;
        tx.commit()?;
        Ok(())
    }

    // ---- decisions ---------------------------------------------------------------------

    /// Decides `intent` for `agent_id` and records the decision, its reservation and timers
    /// in one write transaction. With an idempotency key seen before, returns the earlier
    /// intent unchanged — unless its card creation failed, in which case the same intent is
    /// decided again (its Stripe idempotency key is kept, so no second card can appear).
    pub fn decide(
        &self,
        agent_id: &str,
        intent: PurchaseIntent,
        now: UnixSeconds,
        new_id: &dyn Fn() -> String,
        options: DecideOptions,
    ) -> Result<Decided, StoreError> {
        let hash = request_hash(&intent);
        let tx = self.db.begin_write()?;
        if let Some(preset) = options.intent_id.as_deref() {
            let intents = tx.open_table(INTENTS)?;
            let existing = intents.get(preset)?.map(|b| b.value().to_vec());
            drop(intents);
            if let Some(bytes) = existing {
                let rec: IntentRecord = from_json("intent", &bytes)?;
                if rec.agent_id != agent_id || rec.request_hash != hash {
                    return Err(StoreError::IdempotencyMismatch);
                }
                return Ok(Decided::Replay(rec));
            }
        }
        let mut retry_of: Option<IntentRecord> = None;
        {
            if let Some(key) = intent.idempotency_key.as_deref() {
                let idem = tx.open_table(IDEMPOTENCY)?;
                let existing = idem.get((agent_id, key))?.map(|v| v.value().to_string());
                drop(idem);
                if let Some(existing_id) = existing {
                    let intents = tx.open_table(INTENTS)?;
                    let rec: IntentRecord = match intents.get(existing_id.as_str())? {
                        Some(b) => from_json("intent", b.value())?,
                        None => return Err(StoreError::NotFound),
                    };
                    drop(intents);
                    if rec.request_hash != hash {
                        return Err(StoreError::IdempotencyMismatch);
                    }
                    if rec.status != IntentStatus::Failed {
                        return Ok(Decided::Replay(rec));
                    }
                    retry_of = Some(rec);
                }
            }
        }

        let agent = self.agent(agent_id)?;
        let (shared, shared_keys) = {
            let budgets = tx.open_table(SHARED_BUDGETS)?;
            let used = tx.open_table(SHARED_USAGE)?;
            let leases = tx.open_table(LEASES)?;
            read_shared(
                &budgets,
                &used,
                &leases,
                intent.amount.currency,
                now,
                &options.unreachable_budgets,
            )?
        };
        let (history, seqs) = read_history(&tx.open_table(RISK_HISTORY)?, agent_id)?;
        let decision = decide_with(
            &agent,
            |p| {
                let mut u = read_usage(&tx, agent_id, p, now)?;
                u.shared = shared;
                u.history = history;
                Ok(u)
            },
            &intent,
            AgentState {
                frozen: false,
                control_plane_unreachable: options.offline,
                stripe_account_disconnected: options.stripe_disconnected,
                confirmation: options.confirmation,
            },
            now,
        )?;
        let compiled = agent.as_ref().and_then(|a| a.policy.as_ref().ok());

        let (id, created, attempts, stripe_key, version) = match &retry_of {
            Some(r) => (
                r.id.clone(),
                r.created,
                r.issuance_attempts,
                r.stripe_idempotency_key.clone(),
                r.version + 1,
            ),
            None => {
                let id = options.intent_id.clone().unwrap_or_else(new_id);
                let key = format!("roony-{id}-card");
                (id, now, 0, key, 1)
            }
        };
        let status = match decision.outcome {
            Outcome::Approved => IntentStatus::Issuing,
            Outcome::PendingApproval => IntentStatus::PendingApproval,
            Outcome::Declined => IntentStatus::Declined,
        };
        let reservation: Option<Reservation> = (decision.reserve > 0).then(|| Reservation {
            amount: decision.reserve,
            currency: intent.amount.currency,
            buckets: Period::ALL
                .iter()
                .map(|p| (*p, p.bucket_start(now)))
                .collect(),
            shared: shared_keys,
        });
        let hold_buckets = reservation.as_ref().map(|r| Reservation {
            amount: 0,
            ..r.clone()
        });
        let expires_at = compiled.and_then(|p| match status {
            IntentStatus::Issuing => Some(now + i64::from(p.card_ttl_seconds)),
            IntentStatus::PendingApproval => Some(now + i64::from(p.approval_ttl_seconds)),
            _ => None,
        });
        let record = IntentRecord {
            id: id.clone(),
            agent_id: agent_id.to_string(),
            created,
            updated: now,
            request_hash: hash,
            status,
            decision: crate::store::DecisionRecord {
                id: format!("dec_{}", &id[id.find('_').map_or(0, |i| i + 1)..]),
                outcome: decision.outcome,
                reasons: decision.reasons,
                budgets: decision.budgets,
                decided_at: now,
                risk: decision.risk,
            },
            reservation,
            card: None,
            stripe_idempotency_key: stripe_key,
            expires_at,
            status_reason: None,
            issuance_attempts: attempts,
            version,
            hold_buckets,
            settlement: retry_of.as_ref().and_then(|r| r.settlement.clone()),
            request: intent,
        };

        {
            if let Some(r) = &record.reservation {
                add_usage(&tx, agent_id, r, r.amount)?;
            }
            tx.open_table(INTENTS)?
                .insert(id.as_str(), to_json(&record).as_slice())?;
            if retry_of.is_none() && agent.is_some() {
                let entry = HistoryEntry::of(&record.request, record.decision.outcome, now);
                append_history(&tx, agent_id, &seqs, &entry)?;
            }
            if retry_of.is_none() {
                tx.open_table(AGENT_INTENTS)?
                    .insert((agent_id, now, id.as_str()), ())?;
                if let Some(key) = record.request.idempotency_key.as_deref() {
                    tx.open_table(IDEMPOTENCY)?
                        .insert((agent_id, key), id.as_str())?;
                }
            }
            if let Some(at) = record.expires_at {
                tx.open_table(TIMERS)?.insert((at, id.as_str()), ())?;
            }
            if record.status == IntentStatus::Issuing {
                tx.open_table(ISSUING)?.insert(id.as_str(), ())?;
            }
            self.emit(&tx, &record, "intent.decided", now)?;
        }
        self.commit(tx, record.reservation.is_some())?;
        Ok(Decided::New(record))
    }

    /// The agent's risk history (its last `policy::risk::HISTORY_LEN` intents), oldest first.
    pub fn risk_history(&self, agent_id: &str) -> Result<RiskHistory, StoreError> {
        let tx = self.db.begin_read()?;
        Ok(read_history(&tx.open_table(RISK_HISTORY)?, agent_id)?.0)
    }

    /// The intent an agent's idempotency key already names, if any.
    pub fn intent_for_key(&self, agent_id: &str, key: &str) -> Result<Option<String>, StoreError> {
        let tx = self.db.begin_read()?;
        let idem = tx.open_table(IDEMPOTENCY)?;
        Ok(idem.get((agent_id, key))?.map(|v| v.value().to_string()))
    }

    /// Evaluates `intent` against the current state without recording anything (used to
    /// decide whether to ask the human before deciding for real).
    pub fn preview(
        &self,
        agent_id: &str,
        intent: &PurchaseIntent,
        confirmation: Confirmation,
        now: UnixSeconds,
    ) -> Result<Decision, StoreError> {
        let agent = self.agent(agent_id)?;
        let tx = self.db.begin_read()?;
        let usage = tx.open_table(USAGE)?;
        let index = tx.open_table(AGENT_INTENTS)?;
        let (shared, _) = read_shared(
            &tx.open_table(SHARED_BUDGETS)?,
            &tx.open_table(SHARED_USAGE)?,
            &tx.open_table(LEASES)?,
            intent.amount.currency,
            now,
            &[],
        )?;
        let (history, _) = read_history(&tx.open_table(RISK_HISTORY)?, agent_id)?;
        decide_with(
            &agent,
            |p| {
                let mut u = usage_from(&usage, &index, agent_id, p, now)?;
                u.shared = shared;
                u.history = history;
                Ok(u)
            },
            intent,
            AgentState {
                frozen: false,
                control_plane_unreachable: false,
                stripe_account_disconnected: false,
                confirmation,
            },
            now,
        )
    }

    pub fn intent(&self, id: &str) -> Result<Option<IntentRecord>, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(INTENTS)?;
        match table.get(id)? {
            Some(b) => Ok(Some(from_json("intent", b.value())?)),
            None => Ok(None),
        }
    }

    /// An agent's intents, newest first, `limit` at most, strictly older than `before`
    /// (an intent id) when given.
    pub fn list_intents(
        &self,
        agent_id: &str,
        limit: usize,
        before: Option<&IntentRecord>,
    ) -> Result<Vec<IntentRecord>, StoreError> {
        let tx = self.db.begin_read()?;
        let index = tx.open_table(AGENT_INTENTS)?;
        let intents = tx.open_table(INTENTS)?;
        let end = match before {
            Some(b) => (agent_id, b.created, b.id.as_str()),
            None => (agent_id, i64::MAX, ""),
        };
        let mut out = Vec::new();
        for row in index.range((agent_id, i64::MIN, "")..end)?.rev() {
            let (k, _) = row?;
            let (_, _, intent_id) = k.value();
            if let Some(b) = intents.get(intent_id)? {
                out.push(from_json("intent", b.value())?);
            }
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Records the created card: `issuing` → `approved`.
    pub fn complete_issuance(
        &self,
        id: &str,
        card: CardRef,
        now: UnixSeconds,
    ) -> Result<IntentRecord, StoreError> {
        self.update(id, "intent.issued", now, |rec, tx| {
            if rec.status != IntentStatus::Issuing {
                return Err(StoreError::WrongState(rec.status.as_str()));
            }
            rec.status = IntentStatus::Approved;
            rec.card = Some(card);
            rec.issuance_attempts += 1;
            rec.updated = now;
            tx.open_table(ISSUING)?.remove(rec.id.as_str())?;
            Ok(())
        })
    }

    /// Card creation failed: `issuing` → `failed`, reservation released.
    pub fn fail_issuance(
        &self,
        id: &str,
        reason: Reason,
        now: UnixSeconds,
    ) -> Result<IntentRecord, StoreError> {
        self.update(id, "intent.failed", now, |rec, tx| {
            if rec.status != IntentStatus::Issuing {
                return Err(StoreError::WrongState(rec.status.as_str()));
            }
            rec.status = IntentStatus::Failed;
            rec.status_reason = Some(reason);
            rec.issuance_attempts += 1;
            rec.updated = now;
            release(tx, rec)?;
            tx.open_table(ISSUING)?.remove(rec.id.as_str())?;
            Ok(())
        })
    }

    /// Ends an approved (card canceled at Stripe by the caller) or pending intent:
    /// → `canceled` or `expired`, reservation released.
    pub fn finish(
        &self,
        id: &str,
        to: IntentStatus,
        reason: Reason,
        now: UnixSeconds,
    ) -> Result<IntentRecord, StoreError> {
        let action = match to {
            IntentStatus::Expired => "intent.expired",
            _ => "intent.canceled",
        };
        self.update(id, action, now, |rec, tx| {
            if !matches!(
                rec.status,
                IntentStatus::Approved | IntentStatus::PendingApproval
            ) {
                return Err(StoreError::WrongState(rec.status.as_str()));
            }
            rec.status = to;
            rec.status_reason = Some(reason);
            rec.updated = now;
            release(tx, rec)?;
            Ok(())
        })
    }

    /// Changes one intent durably, with its sync event (`action`) in the same transaction.
    fn update(
        &self,
        id: &str,
        action: &str,
        now: UnixSeconds,
        f: impl FnOnce(&mut IntentRecord, &redb::WriteTransaction) -> Result<(), StoreError>,
    ) -> Result<IntentRecord, StoreError> {
        let tx = self.db.begin_write()?;
        let mut rec: IntentRecord = {
            let table = tx.open_table(INTENTS)?;
            match table.get(id)? {
                Some(b) => from_json("intent", b.value())?,
                None => return Err(StoreError::NotFound),
            }
        };
        f(&mut rec, &tx)?;
        rec.version += 1;
        tx.open_table(INTENTS)?
            .insert(id, to_json(&rec).as_slice())?;
        self.emit(&tx, &rec, action, now)?;
        self.commit(tx, true)?;
        Ok(rec)
    }

    /// Commits durably, or without durability (made durable by the next durable commit or
    /// [`Store::flush`]).
    fn commit(&self, mut tx: redb::WriteTransaction, durable: bool) -> Result<(), StoreError> {
        if !durable {
            tx.set_durability(Durability::None)?;
        }
        tx.commit()?;
        if durable {
            self.signals.dirty.store(false, Ordering::Release);
        } else {
            self.signals.dirty.store(true, Ordering::Release);
        }
        if self.signals.outbox.load(Ordering::Acquire) {
            self.signals.outbox_written.notify_one();
        }
        Ok(())
    }

    /// Makes every earlier commit durable, if one was not (run every few hundred
    /// milliseconds, it bounds what a crash can lose to the declines of that window).
    pub fn flush(&self) -> Result<bool, StoreError> {
        if !self.signals.dirty.swap(false, Ordering::AcqRel) {
            return Ok(false);
        }
        let tx = self.db.begin_write()?;
        tx.commit()?;
        Ok(true)
    }

    // ---- the outbox (events up) ----------------------------------------------------------

    /// Turns on the outbox: from now on every change of an intent writes a sync event.
    pub fn enable_outbox(&self) {
        self.signals.outbox.store(true, Ordering::Release);
    }

    /// Resolves when an event may have been written since the last call.
    pub async fn outbox_written(&self) {
        self.signals.outbox_written.notified().await;
    }

    fn emit(
        &self,
        tx: &redb::WriteTransaction,
        rec: &IntentRecord,
        action: &str,
        now: UnixSeconds,
    ) -> Result<(), StoreError> {
        if !self.signals.outbox.load(Ordering::Acquire) {
            return Ok(());
        }
        let event = sync_event(rec, action, now);
        let mut outbox = tx.open_table(OUTBOX)?;
        let next = outbox.last()?.map_or(1, |(k, _)| k.value() + 1);
        outbox.insert(next, to_json(&event).as_slice())?;
        Ok(())
    }

    /// The oldest `limit` events of the outbox, with their sequence numbers.
    pub fn outbox_batch(&self, limit: usize) -> Result<Vec<(u64, wire::SyncEvent)>, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(OUTBOX)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (k, v) = row?;
            out.push((k.value(), from_json("sync event", v.value())?));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Removes the events up to and including `last` (delivered).
    pub fn outbox_ack(&self, last: u64) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        tx.open_table(OUTBOX)?.retain(|k, _| k > last)?;
        self.commit(tx, true)
    }

    pub fn outbox_len(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read()?;
        use redb::ReadableTableMetadata;
        Ok(tx.open_table(OUTBOX)?.len()?)
    }

    // ---- settlement (updates from the control plane) -----------------------------------

    /// Applies what the control plane reports about intents' cards (newest state per
    /// intent; older or repeated updates change nothing), then remembers `next_after`.
    /// Money that moved on a card counts against the intent's budgets: while the card is
    /// open, at least its whole reservation; once closed, exactly what was captured net of
    /// refunds, the rest released. A charged, closed card makes its intent `settled`.
    /// Returns how many intents changed.
    pub fn apply_intent_updates(
        &self,
        updates: &[wire::IntentUpdate],
        next_after: i64,
        now: UnixSeconds,
    ) -> Result<usize, StoreError> {
        let mut changed = 0;
        for u in updates {
            let Some(rec) = self.intent(&u.intent_id)? else {
                continue;
            };
            if rec.agent_id != u.agent_id || rec.settlement.as_ref().is_some_and(|s| s.seq >= u.seq)
            {
                continue;
            }
            let settlement = SettlementRecord {
                seq: u.seq,
                card_status: u.card_status.clone(),
                authorizations: u
                    .authorizations
                    .iter()
                    .map(|a| AuthorizationRecord {
                        id: a.id.clone(),
                        amount: a.amount,
                        currency: a.currency.clone(),
                        approved: a.approved,
                        status: a.status.clone(),
                        merchant_name: a.merchant_name.clone(),
                        merchant_country: a.merchant_country.clone(),
                        merchant_category: a.merchant_category.clone(),
                        reasons: a.reasons.clone(),
                        created_at: a.created_at,
                    })
                    .collect(),
                captured: u.captured,
                refunded: u.refunded,
                pending: u.pending,
                closed: u.closed,
                discrepancies: u.discrepancies.clone(),
            };
            let action = if u.closed && rec.status == IntentStatus::Approved && u.captured > 0 {
                "intent.settled"
            } else {
                "intent.card_activity"
            };
            self.update(&u.intent_id, action, now, |rec, tx| {
                let moved = settlement.moved();
                rec.settlement = Some(settlement);
                let target = match rec.status {
                    // Still open: hold what the card may still spend. The feed can get
                    // here before the sidecar has recorded the card it is creating (the
                    // card's webhook reaches the control plane while the creation is still
                    // answering): then the reservation stands for the card.
                    IntentStatus::Approved | IntentStatus::Issuing if !u.closed => {
                        moved.max(rec.card.as_ref().map_or_else(
                            || rec.reservation.as_ref().map_or(0, |r| r.amount),
                            |c| c.spending_limit,
                        ))
                    }
                    IntentStatus::Approved if u.captured > 0 => {
                        rec.status = IntentStatus::Settled;
                        rec.updated = now;
                        if let Some(at) = rec.expires_at {
                            tx.open_table(TIMERS)?.remove((at, rec.id.as_str()))?;
                        }
                        moved
                    }
                    // Closed without a charge (canceled at Stripe): the expiry task ends it.
                    IntentStatus::Approved | IntentStatus::Issuing => {
                        rec.reservation.as_ref().map_or(0, |r| r.amount).max(moved)
                    }
                    _ => moved,
                };
                set_hold(tx, rec, target)
            })?;
            changed += 1;
        }
        let tx = self.db.begin_write()?;
        {
            let mut meta = tx.open_table(META)?;
            let after = next_after.to_string();
            meta.insert("updates_after", after.as_str())?;
        }
        self.commit(tx, true)?;
        Ok(changed)
    }

    /// Where the updates feed resumes (0: from the start).
    pub fn updates_after(&self) -> Result<i64, StoreError> {
        let tx = self.db.begin_read()?;
        let meta = tx.open_table(META)?;
        Ok(meta
            .get("updates_after")?
            .and_then(|v| v.value().parse().ok())
            .unwrap_or(0))
    }

    // ---- administrators' decisions -----------------------------------------------------

    /// Applies administrators' decisions on pending intents: approved → `issuing` (the card
    /// is then created by the service, see [`Store::take_approved`]), denied → `declined`
    /// with its reservation released. Decisions on intents that are not pending (already
    /// acted on, expired, unknown) are ignored. Returns the ids moved to `issuing`.
    pub fn apply_admin_decisions(
        &self,
        decisions: &[AdminDecision],
        now: UnixSeconds,
    ) -> Result<Vec<String>, StoreError> {
        let mut approved = Vec::new();
        for d in decisions {
            let Some(rec) = self.intent(&d.intent_id)? else {
                continue;
            };
            if rec.agent_id != d.agent_id || rec.status != IntentStatus::PendingApproval {
                continue;
            }
            let ttl = self
                .agent(&rec.agent_id)?
                .and_then(|a| a.policy.as_ref().ok().map(|p| p.card_ttl_seconds))
                .unwrap_or(3600);
            let note = d
                .note
                .as_deref()
                .map(|n| format!(" (note: {n})"))
                .unwrap_or_default();
            let result = if d.approved {
                self.update(&d.intent_id, "intent.approved", now, |rec, tx| {
                    if rec.status != IntentStatus::PendingApproval {
                        return Err(StoreError::WrongState(rec.status.as_str()));
                    }
                    let mut timers = tx.open_table(TIMERS)?;
                    if let Some(at) = rec.expires_at {
                        timers.remove((at, rec.id.as_str()))?;
                    }
                    let at = now + i64::from(ttl);
                    timers.insert((at, rec.id.as_str()), ())?;
                    rec.expires_at = Some(at);
                    rec.status = IntentStatus::Issuing;
                    rec.status_reason = Some(Reason::new(
                        ReasonCode::ApprovedByAdmin,
                        format!("approved by {}{note}; the card is being created", d.actor),
                    ));
                    rec.updated = now;
                    tx.open_table(ISSUING)?.insert(rec.id.as_str(), ())?;
                    Ok(())
                })
            } else {
                self.update(&d.intent_id, "intent.denied", now, |rec, tx| {
                    if rec.status != IntentStatus::PendingApproval {
                        return Err(StoreError::WrongState(rec.status.as_str()));
                    }
                    rec.status = IntentStatus::Declined;
                    rec.status_reason = Some(Reason::new(
                        ReasonCode::DeniedByAdmin,
                        format!("denied by {}{note}; nothing is reserved", d.actor),
                    ));
                    rec.updated = now;
                    release(tx, rec)
                })
            };
            match result {
                Ok(rec) if rec.status == IntentStatus::Issuing => approved.push(rec.id),
                Ok(_) | Err(StoreError::WrongState(_)) => {}
                Err(e) => return Err(e),
            }
        }
        if !approved.is_empty() {
            if let Ok(mut queue) = self.signals.approved.lock() {
                queue.extend(approved.iter().cloned());
            }
            self.signals.approved_written.notify_one();
        }
        Ok(approved)
    }

    /// Takes the intents approved by an administrator that wait for their card.
    pub fn take_approved(&self) -> Vec<String> {
        self.signals
            .approved
            .lock()
            .map(|mut q| std::mem::take(&mut *q))
            .unwrap_or_default()
    }

    /// Resolves when [`Store::take_approved`] may have something.
    pub async fn approved_written(&self) {
        self.signals.approved_written.notified().await;
    }

    // ---- leases of shared budgets --------------------------------------------------------

    /// What `intent` needs of each shared budget of its currency, with the allowance held and
    /// what is reserved against it now.
    pub fn lease_needs(
        &self,
        agent_id: &str,
        intent: &PurchaseIntent,
        now: UnixSeconds,
    ) -> Result<Vec<LeaseNeed>, StoreError> {
        let bps = self
            .agent(agent_id)?
            .and_then(|a| a.policy.as_ref().ok().map(|p| p.card_buffer_bps))
            .unwrap_or(0);
        let amount = intent.amount.amount;
        let need = amount.saturating_add(amount.saturating_mul(i64::from(bps)) / 10_000);
        let tx = self.db.begin_read()?;
        let budgets = tx.open_table(SHARED_BUDGETS)?;
        let used = tx.open_table(SHARED_USAGE)?;
        let leases = tx.open_table(LEASES)?;
        let mut out = Vec::new();
        for row in budgets.iter()? {
            let (_, v) = row?;
            let b: SharedBudget = from_json("shared budget", v.value())?;
            if b.currency != intent.amount.currency {
                continue;
            }
            let bucket = b.period.bucket_start(now);
            let u = used.get((b.id.as_str(), bucket))?.map_or(0, |v| v.value());
            let l = leases
                .get((b.id.as_str(), bucket))?
                .map_or(0, |v| v.value());
            out.push(LeaseNeed {
                budget_id: b.id,
                bucket_start: bucket,
                limit: b.limit,
                lease: l,
                used: u,
                need,
            });
        }
        Ok(out)
    }

    /// Every lease held, with what is reserved against it.
    pub fn leases(&self) -> Result<Vec<LeaseState>, StoreError> {
        let tx = self.db.begin_read()?;
        let used = tx.open_table(SHARED_USAGE)?;
        let leases = tx.open_table(LEASES)?;
        let mut out = Vec::new();
        for row in leases.iter()? {
            let (k, v) = row?;
            let (id, bucket) = k.value();
            out.push(LeaseState {
                budget_id: id.to_string(),
                bucket_start: bucket,
                lease: v.value(),
                used: used.get((id, bucket))?.map_or(0, |v| v.value()),
            });
        }
        Ok(out)
    }

    /// Records an allowance granted by the control plane (and the request's sequence number).
    pub fn set_lease(
        &self,
        budget_id: &str,
        bucket_start: UnixSeconds,
        granted: i64,
        seq: i64,
    ) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut leases = tx.open_table(LEASES)?;
            if granted > 0 {
                leases.insert((budget_id, bucket_start), granted)?;
            } else {
                leases.remove((budget_id, bucket_start))?;
            }
            let mut meta = tx.open_table(META)?;
            let seq = seq.to_string();
            meta.insert("lease_seq", seq.as_str())?;
        }
        self.commit(tx, true)
    }

    /// Lowers an allowance to `target`, but never below what is reserved against it; returns
    /// the allowance now held. Done before the control plane is told, so the sidecar never
    /// uses more than the control plane counts.
    pub fn lower_lease(
        &self,
        budget_id: &str,
        bucket_start: UnixSeconds,
        target: i64,
    ) -> Result<i64, StoreError> {
        let tx = self.db.begin_write()?;
        let held = {
            let used = tx
                .open_table(SHARED_USAGE)?
                .get((budget_id, bucket_start))?
                .map_or(0, |v| v.value());
            let mut leases = tx.open_table(LEASES)?;
            let current = leases
                .get((budget_id, bucket_start))?
                .map_or(0, |v| v.value());
            let next = target.max(used).min(current);
            if next != current {
                if next > 0 {
                    leases.insert((budget_id, bucket_start), next)?;
                } else {
                    leases.remove((budget_id, bucket_start))?;
                }
            }
            next
        };
        self.commit(tx, true)?;
        Ok(held)
    }

    /// Forgets leases of buckets that are over (their allowance can no longer be used).
    pub fn drop_old_leases(&self, now: UnixSeconds) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            let budgets = tx.open_table(SHARED_BUDGETS)?;
            let mut current = std::collections::HashMap::new();
            for row in budgets.iter()? {
                let (_, v) = row?;
                let b: SharedBudget = from_json("shared budget", v.value())?;
                current.insert(b.id.clone(), b.period.bucket_start(now));
            }
            tx.open_table(LEASES)?
                .retain(|(id, bucket), _| current.get(id).is_some_and(|start| *start == bucket))?;
        }
        self.commit(tx, true)
    }

    /// The sequence number of the last lease request this sidecar made.
    pub fn lease_seq(&self) -> Result<i64, StoreError> {
        let tx = self.db.begin_read()?;
        let meta = tx.open_table(META)?;
        Ok(meta
            .get("lease_seq")?
            .and_then(|v| v.value().parse().ok())
            .unwrap_or(0))
    }

    /// The shared budgets from the last bundle.
    pub fn shared_budgets(&self) -> Result<Vec<SharedBudget>, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(SHARED_BUDGETS)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            out.push(from_json("shared budget", row?.1.value())?);
        }
        Ok(out)
    }

    /// Timers due at or before `now`, oldest first.
    pub fn due_timers(
        &self,
        now: UnixSeconds,
        limit: usize,
    ) -> Result<Vec<(UnixSeconds, String)>, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(TIMERS)?;
        let mut out = Vec::new();
        for row in table.range((i64::MIN, "")..=(now, "\u{10FFFF}"))? {
            let (k, _) = row?;
            let (at, id) = k.value();
            out.push((at, id.to_string()));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    pub fn remove_timer(&self, at: UnixSeconds, id: &str) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        tx.open_table(TIMERS)?.remove((at, id))?;
        self.commit(tx, true)
    }

    /// Intents whose card creation was interrupted (by a crash or restart).
    pub fn issuing(&self) -> Result<Vec<String>, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(ISSUING)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            out.push(row?.0.value().to_string());
        }
        Ok(out)
    }

    /// The agent's budgets as of `now`.
    pub fn budgets(
        &self,
        agent_id: &str,
        policy: &CompiledPolicy,
        now: UnixSeconds,
    ) -> Result<Vec<BudgetStatus>, StoreError> {
        let tx = self.db.begin_read()?;
        let usage = tx.open_table(USAGE)?;
        let currency = policy.currency.code().to_string();
        let mut out = Vec::new();
        for rule in &policy.budgets {
            let committed = usage
                .get((
                    agent_id,
                    currency.as_str(),
                    rule.period.tag(),
                    rule.period.bucket_start(now),
                ))?
                .map_or(0, |v| v.value());
            out.push(BudgetStatus {
                scope: crate::policy::BudgetScope::Agent,
                period: rule.period,
                limit: rule.limit,
                committed,
                remaining: rule.limit - committed,
                resets_at: rule.period.resets_at(now),
            });
        }
        let (shared, _) = read_shared(
            &tx.open_table(SHARED_BUDGETS)?,
            &tx.open_table(SHARED_USAGE)?,
            &tx.open_table(LEASES)?,
            policy.currency,
            now,
            &[],
        )?;
        out.extend(shared.into_iter().map(|s| BudgetStatus {
            scope: s.scope,
            period: s.period,
            limit: s.limit,
            committed: s.limit - s.available,
            remaining: s.available,
            resets_at: s.period.resets_at(now),
        }));
        Ok(out)
    }
}

/// Runs the policy for an agent, deny by default. `state.frozen` is taken from the agent.
fn decide_with(
    agent: &Option<Arc<CachedAgent>>,
    usage: impl FnOnce(&CompiledPolicy) -> Result<Usage, StoreError>,
    intent: &PurchaseIntent,
    state: AgentState,
    now: UnixSeconds,
) -> Result<Decision, StoreError> {
    Ok(match agent {
        None => Decision::error(ReasonCode::NoPolicy, "unknown agent; declined"),
        Some(a) => match &a.policy {
            Err(_) => Decision::error(
                ReasonCode::NoPolicy,
                "this agent's policy is invalid; declined until an administrator fixes it",
            ),
            Ok(p) => {
                let usage = usage(p)?;
                policy::evaluate(
                    p,
                    intent,
                    &usage,
                    AgentState {
                        frozen: a.record.status == AgentStatus::Frozen,
                        ..state
                    },
                    now,
                )
            }
        },
    })
}

fn read_usage(
    tx: &redb::WriteTransaction,
    agent_id: &str,
    policy: &CompiledPolicy,
    now: UnixSeconds,
) -> Result<Usage, StoreError> {
    let usage = tx.open_table(USAGE)?;
    let index = tx.open_table(AGENT_INTENTS)?;
    usage_from(&usage, &index, agent_id, policy, now)
}

fn usage_from(
    usage: &impl ReadableTable<(&'static str, &'static str, u8, i64), i64>,
    index: &impl ReadableTable<(&'static str, i64, &'static str), ()>,
    agent_id: &str,
    policy: &CompiledPolicy,
    now: UnixSeconds,
) -> Result<Usage, StoreError> {
    let currency = policy.currency.code();
    let mut committed = [0i64; 4];
    for (i, p) in Period::ALL.iter().enumerate() {
        committed[i] = usage
            .get((agent_id, currency, p.tag(), p.bucket_start(now)))?
            .map_or(0, |v| v.value());
    }
    let mut velocity_counts = Vec::with_capacity(policy.velocity.len());
    for rule in &policy.velocity {
        let from = now - i64::from(rule.window_seconds) + 1;
        let mut n: u32 = 0;
        for row in index.range((agent_id, from, "")..(agent_id, i64::MAX, ""))? {
            row?;
            n += 1;
            if n >= rule.max_intents {
                break;
            }
        }
        velocity_counts.push(n);
    }
    Ok(Usage {
        committed,
        velocity_counts,
        shared: Vec::new(),
        history: RiskHistory::default(),
    })
}

fn outcome_tag(o: Outcome) -> u8 {
    match o {
        Outcome::Approved => 0,
        Outcome::Declined => 1,
        Outcome::PendingApproval => 2,
    }
}

/// The agent's risk history, oldest first, and the sequence numbers of its rows. A row that
/// cannot be read fails the decision (which then declines): no score from partial history.
fn read_history(
    table: &impl ReadableTable<(&'static str, u64), HistoryRow>,
    agent_id: &str,
) -> Result<(RiskHistory, Vec<u64>), StoreError> {
    let mut entries = Vec::with_capacity(policy::risk::HISTORY_LEN);
    let mut seqs = Vec::with_capacity(policy::risk::HISTORY_LEN);
    for row in table.range((agent_id, 0u64)..=(agent_id, u64::MAX))? {
        let (k, v) = row?;
        let (at, amount, currency, merchant, domain, category, outcome) = v.value();
        let corrupt = |what: &str| StoreError::Corrupt("risk history".into(), what.into());
        entries.push(HistoryEntry {
            at,
            amount,
            currency: crate::domain::money::Currency::parse(currency)
                .map_err(|_| corrupt("currency"))?,
            merchant: merchant.to_string(),
            domain: domain.map(str::to_string),
            category: category.map(str::to_string),
            outcome: match outcome {
                0 => Outcome::Approved,
                1 => Outcome::Declined,
                2 => Outcome::PendingApproval,
                _ => return Err(corrupt("outcome")),
            },
        });
        seqs.push(k.value().1);
    }
    Ok((RiskHistory { entries }, seqs))
}

/// Appends an entry to the agent's risk history and evicts the oldest beyond
/// `HISTORY_LEN`. `seqs` are the rows read in the same transaction, oldest first.
fn append_history(
    tx: &redb::WriteTransaction,
    agent_id: &str,
    seqs: &[u64],
    e: &HistoryEntry,
) -> Result<(), StoreError> {
    let mut table = tx.open_table(RISK_HISTORY)?;
    let next = seqs.last().map_or(0, |s| s + 1);
    table.insert(
        (agent_id, next),
        (
            e.at,
            e.amount,
            e.currency.code(),
            e.merchant.as_str(),
            e.domain.as_deref(),
            e.category.as_deref(),
            outcome_tag(e.outcome),
        ),
    )?;
    let excess = (seqs.len() + 1).saturating_sub(policy::risk::HISTORY_LEN);
    for seq in seqs.iter().take(excess) {
        table.remove((agent_id, *seq))?;
    }
    Ok(())
}

type SharedKeys = Vec<(String, UnixSeconds)>;

/// The shared budgets of `currency` as this sidecar holds them now, and their buckets.
fn read_shared(
    budgets: &impl ReadableTable<&'static str, &'static [u8]>,
    used: &impl ReadableTable<(&'static str, i64), i64>,
    leases: &impl ReadableTable<(&'static str, i64), i64>,
    currency: crate::domain::money::Currency,
    now: UnixSeconds,
    unreachable: &[String],
) -> Result<(Vec<SharedUsage>, SharedKeys), StoreError> {
    let mut shared = Vec::new();
    let mut keys = Vec::new();
    for row in budgets.iter()? {
        let (_, v) = row?;
        let b: SharedBudget = from_json("shared budget", v.value())?;
        if b.currency != currency {
            continue;
        }
        let bucket = b.period.bucket_start(now);
        let u = used.get((b.id.as_str(), bucket))?.map_or(0, |v| v.value());
        let l = leases
            .get((b.id.as_str(), bucket))?
            .map_or(0, |v| v.value());
        shared.push(SharedUsage {
            scope: b.scope,
            period: b.period,
            limit: b.limit,
            available: l - u,
            unreachable: unreachable.contains(&b.id),
        });
        keys.push((b.id, bucket));
    }
    Ok((shared, keys))
}

/// The sync event of an intent's current state.
fn sync_event(rec: &IntentRecord, action: &str, now: UnixSeconds) -> wire::SyncEvent {
    let m = &rec.request.merchant;
    wire::SyncEvent {
        id: format!("{}.{}", rec.id, rec.version),
        action: action.to_string(),
        at: now,
        intent: wire::IntentSnapshot {
            id: rec.id.clone(),
            agent_id: rec.agent_id.clone(),
            version: i64::from(rec.version),
            status: rec.status.as_str().to_string(),
            amount: rec.request.amount.amount,
            currency: rec.request.amount.currency.code().to_string(),
            merchant_name: m.name.clone(),
            merchant_domain: m.domain.clone(),
            merchant_country: m.country.clone(),
            merchant_category: m.category.clone(),
            expires_at: rec.expires_at,
            description: Some(rec.request.description.clone()).filter(|d| !d.is_empty()),
            reserved: rec.reservation.as_ref().map_or(0, |r| r.amount),
            decision: wire::DecisionSnapshot {
                id: rec.decision.id.clone(),
                outcome: match rec.decision.outcome {
                    Outcome::Approved => "approved",
                    Outcome::Declined => "declined",
                    Outcome::PendingApproval => "pending_approval",
                }
                .to_string(),
                reasons: rec
                    .decision
                    .reasons
                    .iter()
                    .map(|r| r.code.as_str().to_string())
                    .collect(),
                messages: rec
                    .decision
                    .reasons
                    .iter()
                    .map(|r| r.message.clone())
                    .collect(),
                decided_at: rec.decision.decided_at,
            },
            risk_score: rec.decision.risk.as_ref().map(|r| r.score),
            risk_signals: rec
                .decision
                .risk
                .as_ref()
                .map(|r| {
                    r.signals
                        .iter()
                        .map(|s| s.code.as_str().to_string())
                        .collect()
                })
                .unwrap_or_default(),
            status_reason: rec
                .status_reason
                .as_ref()
                .map(|r| r.code.as_str().to_string()),
            card: rec.card.as_ref().map(|c| wire::CardSnapshot {
                stripe_card_id: c.id.clone(),
                last4: c.last4.clone(),
                exp_month: c.exp_month,
                exp_year: c.exp_year,
                spending_limit: c.spending_limit,
            }),
            created_at: rec.created,
            updated_at: rec.updated,
        },
    }
}

fn add_usage(
    tx: &redb::WriteTransaction,
    agent_id: &str,
    r: &Reservation,
    delta: i64,
) -> Result<(), StoreError> {
    let mut usage = tx.open_table(USAGE)?;
    for (period, start) in &r.buckets {
        let key = (agent_id, r.currency.code(), period.tag(), *start);
        let current = usage.get(key)?.map_or(0, |v| v.value());
        let next = current + delta;
        if next == 0 {
            usage.remove(key)?;
        } else {
            usage.insert(key, next)?;
        }
    }
    let mut shared = tx.open_table(SHARED_USAGE)?;
    for (id, start) in &r.shared {
        let key = (id.as_str(), *start);
        let current = shared.get(key)?.map_or(0, |v| v.value());
        let next = current + delta;
        if next == 0 {
            shared.remove(key)?;
        } else {
            shared.insert(key, next)?;
        }
    }
    Ok(())
}

/// Ends an intent's hold: what it still counts against budgets becomes the money that moved
/// on its card (0 when nothing did), and its expiry timer goes.
fn release(tx: &redb::WriteTransaction, rec: &mut IntentRecord) -> Result<(), StoreError> {
    let target = rec.settlement.as_ref().map_or(0, SettlementRecord::moved);
    set_hold(tx, rec, target)?;
    if let Some(at) = rec.expires_at {
        tx.open_table(TIMERS)?.remove((at, rec.id.as_str()))?;
    }
    Ok(())
}

/// Moves what an intent counts against its budgets (agent and shared buckets of its
/// decision) to `target` minor units.
fn set_hold(
    tx: &redb::WriteTransaction,
    rec: &mut IntentRecord,
    target: i64,
) -> Result<(), StoreError> {
    let current = rec.reservation.as_ref().map_or(0, |r| r.amount);
    if target == current {
        return Ok(());
    }
    let Some(template) = rec.reservation.clone().or_else(|| rec.hold_buckets.clone()) else {
        return Ok(());
    };
    add_usage(tx, &rec.agent_id, &template, target - current)?;
    if rec.hold_buckets.is_none() {
        rec.hold_buckets = Some(Reservation {
            amount: 0,
            ..template.clone()
        });
    }
    rec.reservation = (target > 0).then_some(Reservation {
        amount: target,
        ..template
    });
    Ok(())
}

#[cfg(test)]
mod tests;
