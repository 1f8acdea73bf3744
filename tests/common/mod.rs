#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]
//! Shared harness: a real emulator and a real sidecar on loopback ports, with a real redb
//! store in a temporary directory, driven over HTTP.
#![allow(dead_code)]

pub mod dash;
pub mod db;
pub mod process;
pub mod procs;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use roony::emulator::{Emulator, EmulatorConfig};
use roony::issuer::{Issuer, StripeConfig};
use roony::policy::Policy;
use roony::service::{Clock, Service, ServiceConfig};
use roony::store::Store;
use serde_json::{Value, json};

/// A clock tests can move.
#[derive(Debug)]
pub struct TestClock(pub AtomicI64);

impl TestClock {
    pub fn new() -> Arc<TestClock> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        Arc::new(TestClock(AtomicI64::new(now)))
    }
    pub fn advance(&self, secs: i64) {
        self.0.fetch_add(secs, Ordering::SeqCst);
    }
}

impl Clock for TestClock {
    fn now(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

pub struct EmulatorHandle {
    pub addr: SocketAddr,
    pub url: String,
    _stop: tokio::sync::oneshot::Sender<()>,
}

pub async fn start_emulator() -> EmulatorHandle {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(
        Emulator::new(EmulatorConfig::default()).serve(listener, async move {
            let _ = rx.await;
        }),
    );
    EmulatorHandle {
        addr,
        url: format!("http://{addr}"),
        _stop: tx,
    }
}

impl EmulatorHandle {
    /// Replaces the emulator's fault configuration.
    pub async fn faults(&self, body: Value) {
        let r = reqwest::Client::new()
            .post(format!("{}/_emulator/faults", self.url))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "setting faults: {}", r.status());
    }

    pub async fn stats(&self) -> Value {
        reqwest::get(format!("{}/_emulator/stats", self.url))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Retrieves a card as Stripe would show it (no number).
    pub async fn card(&self, id: &str) -> Value {
        reqwest::Client::new()
            .get(format!("{}/v1/issuing/cards/{id}", self.url))
            .bearer_auth("sk_test_harness")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Every card at the emulator (first page of 100).
    pub async fn cards(&self) -> Vec<Value> {
        let v: Value = reqwest::Client::new()
            .get(format!("{}/v1/issuing/cards?limit=100", self.url))
            .bearer_auth("sk_test_harness")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["data"].as_array().cloned().unwrap_or_default()
    }
}

pub fn stripe_config(emulator: &EmulatorHandle) -> StripeConfig {
    let mut c = StripeConfig::new("sk_test_harness", Some(emulator.url.clone()));
    c.base_backoff = std::time::Duration::from_millis(10);
    c.max_backoff = std::time::Duration::from_millis(50);
    c
}

pub fn service(store: Store, emulator: &EmulatorHandle, clock: Arc<dyn Clock>) -> Service {
    Service::new(
        store,
        Issuer::new(stripe_config(emulator)).unwrap(),
        ServiceConfig::default(),
        clock,
    )
}

pub struct Sidecar {
    pub url: String,
    pub service: Service,
    pub key: String,
    pub client: reqwest::Client,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// Starts a sidecar over `data_dir` with one agent `agt_test` holding `policy`.
pub async fn start_sidecar(
    data_dir: &Path,
    emulator: &EmulatorHandle,
    clock: Arc<dyn Clock>,
    policy: Policy,
) -> Sidecar {
    let store = Store::open(&data_dir.join("sidecar.redb")).unwrap();
    let svc = service(store, emulator, clock);
    let key = svc
        .create_agent("agt_test", "test agent", policy, None)
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let app = roony::sidecar::app(svc.clone(), Default::default()).unwrap();
    tokio::spawn(roony::api::serve(listener, app, async move {
        let _ = rx.await;
    }));
    Sidecar {
        url: format!("http://{addr}"),
        service: svc,
        key,
        client: reqwest::Client::new(),
        _stop: tx,
    }
}

impl Sidecar {
    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .client
            .post(format!("{}{path}", self.url))
            .bearer_auth(&self.key)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .client
            .get(format!("{}{path}", self.url))
            .bearer_auth(&self.key)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn buy(&self, amount: i64, extra: Value) -> (u16, Value) {
        let mut body = purchase(amount);
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        self.post("/api/v1/purchase_intent", body).await
    }
}

pub fn purchase(amount: i64) -> Value {
    json!({
        "amount": amount,
        "currency": "usd",
        "merchant": {"name": "Namecheap", "url": "https://www.namecheap.com/checkout", "country": "US"},
        "description": "register a domain for one year"
    })
}

/// The Luhn check every real card number passes.
pub fn luhn(number: &str) -> bool {
    let digits: Vec<u32> = number.chars().filter_map(|c| c.to_digit(10)).collect();
    if digits.len() != number.len() || digits.len() < 12 {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, d)| {
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 { x - 9 } else { x }
            } else {
                *d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// The demo policy without the confirmation threshold (tested on its own).
pub fn demo_policy() -> Policy {
    let mut p = roony::dev::demo_policy();
    p.require_confirmation_above = None;
    p
}

/// A short unique suffix for names in tests.
#[allow(dead_code)]
pub fn unique() -> String {
    roony::service::ids::new_id("u")
        .trim_start_matches("u_")
        .to_string()
}
