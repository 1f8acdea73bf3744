//! In-memory emulator state: objects per account, idempotency records, faults and
//! request statistics. Nothing here is ever written to disk.
//!
//! Authorizations and transactions live per account next to cards; events (with their
//! delivery log) and the webhook endpoint are global, in [`State`].

use std::collections::{BTreeMap, HashMap};

use serde_json::{Value, json};

use super::faults::FaultState;
use super::idempotency::IdempotencyStore;
use super::ids;
use super::resources::authorization::Authorization;
use super::resources::card::Card;
use super::resources::cardholder::Cardholder;
use super::resources::transaction::Transaction;
use super::webhooks::{self, Delivery, EventRecord, WebhookConfig};

/// Which Stripe account a request acts on: the platform (no `Stripe-Account`
/// header) or a connected account.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AccountKey {
    Platform,
    Connected(String),
}

impl AccountKey {
    pub fn label(&self) -> &str {
        match self {
            AccountKey::Platform => "platform",
            AccountKey::Connected(id) => id,
        }
    }
}

/// An object kept in an [`ObjectStore`].
pub trait StoredObject {
    fn id(&self) -> &str;
    fn created(&self) -> i64;
}

/// Objects of one type, kept in creation order, addressable by id.
#[derive(Debug)]
pub struct ObjectStore<T> {
    items: Vec<T>,
    index: HashMap<String, usize>,
}

impl<T> Default for ObjectStore<T> {
    fn default() -> Self {
        Self {
            items: Vec::new(),
            index: HashMap::new(),
        }
    }
}

impl<T: StoredObject> ObjectStore<T> {
    pub fn insert(&mut self, item: T) {
        let id = item.id().to_owned();
        match self.index.get(&id) {
            Some(&i) => self.items[i] = item,
            None => {
                self.index.insert(id, self.items.len());
                self.items.push(item);
            }
        }
    }

    pub fn get(&self, id: &str) -> Option<&T> {
        self.index.get(id).map(|&i| &self.items[i])
    }

    pub fn get_mut(&mut self, id: &str) -> Option<&mut T> {
        self.index.get(id).map(|&i| &mut self.items[i])
    }

    pub fn contains(&self, id: &str) -> bool {
        self.index.contains_key(id)
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Newest first (reverse creation order), as Stripe lists objects.
    pub fn newest_first(&self) -> impl Iterator<Item = &T> {
        self.items.iter().rev()
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.items.iter()
    }
}

/// Everything one account owns.
#[derive(Debug, Default)]
pub struct AccountState {
    pub cardholders: ObjectStore<Cardholder>,
    pub cards: ObjectStore<Card>,
    pub authorizations: ObjectStore<Authorization>,
    pub transactions: ObjectStore<Transaction>,
}

impl AccountState {
    fn counts(&self) -> Value {
        json!({
            "issuing.authorization": self.authorizations.len(),
            "issuing.card": self.cards.len(),
            "issuing.cardholder": self.cardholders.len(),
            "issuing.transaction": self.transactions.len(),
        })
    }
}

/// The API request an event comes from (`event.request`).
#[derive(Debug, Default, Clone)]
pub struct RequestInfo {
    pub id: Option<String>,
    pub idempotency_key: Option<String>,
}

/// Per-route request counters.
#[derive(Debug, Default, Clone, Copy)]
pub struct RouteStats {
    /// Requests that reached the route (all outcomes).
    pub received: u64,
    /// Executed and succeeded: the only outcome that changes state.
    pub executed: u64,
    /// Executed but answered with an error (validation, missing object); nothing changed.
    pub failed: u64,
    /// Answered from the idempotency store.
    pub replayed: u64,
    /// Answered by an injected fault.
    pub faulted: u64,
    /// Refused before execution: authentication, account header, form encoding,
    /// idempotency conflicts.
    pub rejected: u64,
}

/// How one request ended, for [`Stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Executed,
    Failed,
    Replayed,
    Faulted,
    Rejected,
}

#[derive(Debug, Default)]
pub struct Stats {
    /// Keyed by `"METHOD /v1/template"`.
    pub routes: BTreeMap<String, RouteStats>,
    pub unmatched: u64,
    pub stripe_versions: BTreeMap<String, u64>,
}

impl Stats {
    pub fn record(&mut self, route: Option<(&str, &str)>, outcome: Outcome) {
        let Some((method, template)) = route else {
            self.unmatched += 1;
            return;
        };
        let entry = self
            .routes
            .entry(format!("{method} {template}"))
            .or_default();
        entry.received += 1;
        match outcome {
            Outcome::Executed => entry.executed += 1,
            Outcome::Failed => entry.failed += 1,
            Outcome::Replayed => entry.replayed += 1,
            Outcome::Faulted => entry.faulted += 1,
            Outcome::Rejected => entry.rejected += 1,
        }
    }

    pub fn record_version(&mut self, version: &str) {
        let mut v = version.to_owned();
        v.truncate(64);
        *self.stripe_versions.entry(v).or_default() += 1;
    }
}

/// The whole mutable state, behind one mutex. Handlers run synchronously under the
/// lock; the only await points are outside it.
#[derive(Debug)]
pub struct State {
    pub accounts: BTreeMap<AccountKey, AccountState>,
    pub idempotency: IdempotencyStore,
    pub faults: FaultState,
    pub stats: Stats,
    /// The webhook endpoint, if any.
    pub webhook: Option<WebhookConfig>,
    /// Every event, in creation order, with its delivery log.
    pub events: Vec<EventRecord>,
    event_index: HashMap<String, usize>,
    /// Regular events created by the running request, handed to delivery afterwards.
    pub outbox: Vec<String>,
    /// The request being executed (for `event.request`).
    pub request: RequestInfo,
}

impl State {
    pub fn new(faults: FaultState) -> Self {
        Self::with_webhook(faults, None)
    }

    pub fn with_webhook(faults: FaultState, webhook: Option<WebhookConfig>) -> Self {
        Self {
            accounts: BTreeMap::new(),
            idempotency: IdempotencyStore::default(),
            faults,
            stats: Stats::default(),
            webhook,
            events: Vec::new(),
            event_index: HashMap::new(),
            outbox: Vec::new(),
            request: RequestInfo::default(),
        }
    }

    pub fn event(&self, id: &str) -> Option<&EventRecord> {
        self.event_index.get(id).map(|&i| &self.events[i])
    }

    pub fn update_event(&mut self, id: &str, f: impl FnOnce(&mut EventRecord)) {
        if let Some(&i) = self.event_index.get(id) {
            f(&mut self.events[i]);
        }
    }

    fn record_event(
        &mut self,
        account: &AccountKey,
        kind: &str,
        object: Value,
        previous: Option<Value>,
        realtime: bool,
    ) -> String {
        let id = ids::object_id("evt_");
        let created = ids::now_unix();
        let configured = self
            .webhook
            .as_ref()
            .is_some_and(|w| !realtime || w.realtime);
        let body = webhooks::envelope(
            &id,
            kind,
            account,
            created,
            object,
            previous,
            u32::from(configured),
            self.request.id.as_deref(),
            self.request.idempotency_key.as_deref(),
        );
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        self.event_index.insert(id.clone(), self.events.len());
        self.events.push(EventRecord {
            id: id.clone(),
            kind: kind.to_owned(),
            account: account.clone(),
            created,
            body: bytes.into(),
            realtime,
            delivery: if configured {
                Delivery::Pending
            } else {
                Delivery::NotSent
            },
            attempts: 0,
            last_response: None,
        });
        id
    }

    /// Create a regular event; it is delivered after the request completes.
    pub fn emit(
        &mut self,
        account: &AccountKey,
        kind: &str,
        object: Value,
        previous: Option<Value>,
    ) -> String {
        let id = self.record_event(account, kind, object, previous, false);
        if self.webhook.is_some() {
            self.outbox.push(id.clone());
        }
        id
    }

    /// Create an `issuing_authorization.request` event (sent synchronously by the caller).
    pub fn emit_realtime(&mut self, account: &AccountKey, object: Value) -> String {
        self.record_event(account, "issuing_authorization.request", object, None, true)
    }

    pub fn account(&mut self, key: &AccountKey) -> &mut AccountState {
        self.accounts.entry(key.clone()).or_default()
    }

    /// Whether any account holds a card with this number (numbers are unique).
    pub fn pan_in_use(&self, pan: &str) -> bool {
        self.accounts
            .values()
            .any(|a| a.cards.iter().any(|c| c.pan.expose() == pan))
    }

    /// `GET /_emulator/stats`.
    pub fn stats_json(&self) -> Value {
        let cards: usize = self.accounts.values().map(|a| a.cards.len()).sum();
        let cardholders: usize = self.accounts.values().map(|a| a.cardholders.len()).sum();
        let authorizations: usize = self.accounts.values().map(|a| a.authorizations.len()).sum();
        let transactions: usize = self.accounts.values().map(|a| a.transactions.len()).sum();
        let accounts: serde_json::Map<String, Value> = self
            .accounts
            .iter()
            .map(|(k, a)| (k.label().to_owned(), a.counts()))
            .collect();
        let routes: serde_json::Map<String, Value> = self
            .stats
            .routes
            .iter()
            .map(|(k, s)| {
                (
                    k.clone(),
                    json!({
                        "received": s.received,
                        "executed": s.executed,
                        "failed": s.failed,
                        "replayed": s.replayed,
                        "faulted": s.faulted,
                        "rejected": s.rejected,
                    }),
                )
            })
            .collect();
        json!({
            "objects": {
                "issuing.authorization": authorizations,
                "issuing.card": cards,
                "issuing.cardholder": cardholders,
                "issuing.transaction": transactions,
            },
            "events": self.events.len(),
            "accounts": accounts,
            "requests": routes,
            "unmatched_requests": self.stats.unmatched,
            "stripe_versions": self.stats.stripe_versions,
            "idempotency_keys": self.idempotency.len(),
        })
    }
}
