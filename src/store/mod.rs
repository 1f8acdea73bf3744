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

pub mod records;

use std::path::Path;
use std::sync::Arc;

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use sha2::{Digest, Sha256};

use crate::domain::intent::PurchaseIntent;
use crate::domain::time::{Period, UnixSeconds};
use crate::policy::{
    self, AgentState, BudgetStatus, CompiledPolicy, Confirmation, Decision, Outcome, PolicyError,
    Reason, ReasonCode, Usage,
};
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
        }
        tx.commit()?;
        Ok(Store {
            db: Arc::new(db),
            agents: moka::sync::Cache::builder().max_capacity(10_000).build(),
            keys: moka::sync::Cache::builder().max_capacity(10_000).build(),
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
        let mut applied = SyncApplied::default();
        let tx = self.db.begin_write()?;
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
        let mut tx = self.db.begin_write()?;
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
        let decision = decide_with(
            &agent,
            |p| read_usage(&tx, agent_id, p, now),
            &intent,
            options.confirmation,
            now,
        )?;
        let compiled = agent.as_ref().and_then(|a| a.policy.as_ref().ok());

        let (id, created, attempts, stripe_key) = match &retry_of {
            Some(r) => (
                r.id.clone(),
                r.created,
                r.issuance_attempts,
                r.stripe_idempotency_key.clone(),
            ),
            None => {
                let id = options.intent_id.clone().unwrap_or_else(new_id);
                let key = format!("roony-{id}-card");
                (id, now, 0, key)
            }
        };
        let status = match decision.outcome {
            Outcome::Approved => IntentStatus::Issuing,
            Outcome::PendingApproval => IntentStatus::PendingApproval,
            Outcome::Declined => IntentStatus::Declined,
        };
        let reservation = (decision.reserve > 0).then(|| Reservation {
            amount: decision.reserve,
            currency: intent.amount.currency,
            buckets: Period::ALL
                .iter()
                .map(|p| (*p, p.bucket_start(now)))
                .collect(),
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
            },
            reservation,
            card: None,
            stripe_idempotency_key: stripe_key,
            expires_at,
            status_reason: None,
            issuance_attempts: attempts,
            request: intent,
        };

        {
            if let Some(r) = &record.reservation {
                add_usage(&tx, agent_id, r, r.amount)?;
            }
            tx.open_table(INTENTS)?
                .insert(id.as_str(), to_json(&record).as_slice())?;
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
        }
        if record.reservation.is_none() {
            tx.set_durability(Durability::None)?;
        }
        tx.commit()?;
        Ok(Decided::New(record))
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
        decide_with(
            &agent,
            |p| usage_from(&usage, &index, agent_id, p, now),
            intent,
            confirmation,
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
        self.update(id, Durability::Immediate, |rec, tx| {
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
        self.update(id, Durability::Immediate, |rec, tx| {
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
        self.update(id, Durability::Immediate, |rec, tx| {
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

    fn update(
        &self,
        id: &str,
        durability: Durability,
        f: impl FnOnce(&mut IntentRecord, &redb::WriteTransaction) -> Result<(), StoreError>,
    ) -> Result<IntentRecord, StoreError> {
        let mut tx = self.db.begin_write()?;
        let mut rec: IntentRecord = {
            let table = tx.open_table(INTENTS)?;
            match table.get(id)? {
                Some(b) => from_json("intent", b.value())?,
                None => return Err(StoreError::NotFound),
            }
        };
        f(&mut rec, &tx)?;
        tx.open_table(INTENTS)?
            .insert(id, to_json(&rec).as_slice())?;
        tx.set_durability(durability)?;
        tx.commit()?;
        Ok(rec)
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
        let mut tx = self.db.begin_write()?;
        tx.open_table(TIMERS)?.remove((at, id))?;
        tx.set_durability(Durability::Immediate)?;
        tx.commit()?;
        Ok(())
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
                period: rule.period,
                limit: rule.limit,
                committed,
                remaining: rule.limit - committed,
                resets_at: rule.period.resets_at(now),
            });
        }
        Ok(out)
    }
}

/// Runs the policy for an agent, deny by default.
fn decide_with(
    agent: &Option<Arc<CachedAgent>>,
    usage: impl FnOnce(&CompiledPolicy) -> Result<Usage, StoreError>,
    intent: &PurchaseIntent,
    confirmation: Confirmation,
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
                        confirmation,
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
    })
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
    Ok(())
}

fn release(tx: &redb::WriteTransaction, rec: &mut IntentRecord) -> Result<(), StoreError> {
    if let Some(r) = rec.reservation.take() {
        add_usage(tx, &rec.agent_id, &r, -r.amount)?;
    }
    if let Some(at) = rec.expires_at {
        tx.open_table(TIMERS)?.remove((at, rec.id.as_str()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
