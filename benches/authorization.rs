#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]
//! Load script for real-time authorization decisions (goal: p99 ≤ 5 ms at 500
//! authorizations/s, on SQLite and on PostgreSQL).
//!
//! Starts the real `roony control-plane` binary, seeds `CARDS` approved purchases with their
//! cards through the sync events endpoint (the path a sidecar's outbox takes), then POSTs
//! signed `issuing_authorization.request` events — each for a different card, matching its
//! purchase — at a constant rate, open loop: latency is measured from each request's
//! scheduled send time, so a stall is not hidden. Every answer must be `approved: true`.
//!
//! Run: `cargo bench --bench authorization` (env `RATE` default 500, `SECONDS` default 10,
//! `CONNECTIONS` default 8, `DATABASE_URL` for PostgreSQL — default a SQLite file).
//! Results: docs/benchmarks.md.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod common;
use common::{Child, Conn, env_or};

const ADMIN: &str = "bench-admin-token-0123456789abcdef";
const SECRET: &str = "whsec_bench_0123456789abcdef";

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn intent_event(i: usize, agent: &str, now: i64) -> Value {
    let id = format!("pur_bench{i:08}");
    json!({
        "id": format!("{id}.2"),
        "action": "intent.issued",
        "at": now,
        "intent": {
            "id": id, "agent_id": agent, "version": 2, "status": "approved",
            "amount": 1_200, "currency": "USD",
            "merchant_name": "Namecheap", "merchant_domain": "namecheap.com",
            "merchant_country": "US", "merchant_category": null,
            "description": "a domain", "reserved": 1_212, "expires_at": now + 3_600,
            "decision": {"id": format!("dec_bench{i:08}"), "outcome": "approved",
                         "reasons": ["within_policy"], "decided_at": now},
            "status_reason": null,
            "card": {"stripe_card_id": format!("ic_bench{i:08}"), "last4": "4242",
                     "exp_month": 12, "exp_year": 2030, "spending_limit": 1_212},
            "created_at": now, "updated_at": now
        }
    })
}

/// An `issuing_authorization.request` event as Stripe sends it (stripe.md §2.3/§4.3).
fn authorization_request(i: usize, now: i64) -> String {
    json!({
        "id": format!("evt_bench{i:08}"),
        "object": "event",
        "api_version": "2026-09-30.endive",
        "created": now,
        "livemode": false,
        "pending_webhooks": 1,
        "request": {"id": null, "idempotency_key": null},
        "type": "issuing_authorization.request",
        "data": {"object": {
            "id": format!("iauth_bench{i:08}"),
            "object": "issuing.authorization",
            "amount": 0,
            "amount_details": {"atm_fee": null, "cashback_amount": null},
            "approved": false,
            "authorization_method": "online",
            "balance_transactions": [],
            "card": {
                "id": format!("ic_bench{i:08}"), "object": "issuing.card", "brand": "Visa",
                "cancellation_reason": null, "created": now, "currency": "usd",
                "exp_month": 12, "exp_year": 2030, "last4": "4242", "livemode": false,
                "metadata": {"roony_intent_id": format!("pur_bench{i:08}")},
                "status": "active", "type": "virtual"
            },
            "cardholder": "ich_bench",
            "created": now,
            "currency": "usd",
            "livemode": false,
            "merchant_amount": 0,
            "merchant_currency": "usd",
            "merchant_data": {
                "category": "computer_network_services", "category_code": "4816",
                "city": "Phoenix", "country": "US", "name": "NAMECHEAP.COM",
                "network_id": "net_namecheap", "postal_code": "85034", "state": "AZ",
                "terminal_id": null, "url": null, "tax_id": null
            },
            "metadata": {},
            "network_data": null,
            "pending_request": {
                "amount": 1_200, "amount_details": {"atm_fee": null, "cashback_amount": null},
                "currency": "usd", "is_amount_controllable": false,
                "merchant_amount": 1_200, "merchant_currency": "usd", "network_risk_score": null
            },
            "request_history": [],
            "status": "pending",
            "transactions": [],
            "verification_data": {
                "address_line1_check": "not_provided", "address_postal_code_check": "match",
                "cvc_check": "match", "expiry_check": "match"
            },
            "wallet": null
        }}
    })
    .to_string()
}

fn signature(body: &str, t: i64) -> String {
    let mac = roony::sync::wire::hmac_sha256(SECRET.as_bytes(), format!("{t}.{body}").as_bytes());
    format!("t={t},v1={}", hex::encode(mac))
}

fn main() {
    let rate = env_or("RATE", 500);
    let seconds = env_or("SECONDS", 10);
    let connections = env_or("CONNECTIONS", 8) as usize;
    let total = (rate * seconds) as usize;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("cp.log");
    let database = std::env::var("DATABASE_URL").ok();
    let backend = if database.is_some() {
        "postgresql"
    } else {
        "sqlite"
    };
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_roony"));
    cmd.args(["control-plane", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("cp"))
        .args(["--stripe-webhook-secret", SECRET])
        .env("ROONY_ADMIN_TOKEN", ADMIN)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(&log).expect("log")));
    match &database {
        Some(url) => cmd.env("DATABASE_URL", url),
        None => cmd.env_remove("DATABASE_URL"),
    };
    let _child = Child(cmd.spawn().expect("start roony control-plane"));
    let start = Instant::now();
    let base = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(l) = text
            .lines()
            .find(|l| l.contains("control plane listening on"))
        {
            break l
                .split("listening on ")
                .nth(1)
                .unwrap_or_default()
                .trim()
                .to_string();
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "control plane did not start:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let http = reqwest::Client::new();
        let admin = |method: reqwest::Method, path: &str, body: Value| {
            http.request(method, format!("{base}/api/admin/v1{path}"))
                .bearer_auth(ADMIN)
                .json(&body)
                .send()
        };
        let suffix = roony::service::ids::new_id("b").to_lowercase();
        let project: Value = admin(reqwest::Method::POST, "/projects", json!({"name": format!("bench-{suffix}")}))
            .await.unwrap().json().await.unwrap();
        let project = project["id"].as_str().unwrap().to_string();
        let agent = format!("agt_bench_{suffix}");
        let r = admin(reqwest::Method::POST, "/agents", json!({"project_id": project, "name": "bench", "id": agent}))
            .await.unwrap();
        assert!(r.status().is_success(), "{}", r.text().await.unwrap_or_default());
        let sc: Value = admin(reqwest::Method::POST, "/sidecars", json!({"name": "bench", "project_id": project}))
            .await.unwrap().json().await.unwrap();
        let token = sc["token"].as_str().unwrap().to_string();

        // Seed the ledger: approved purchases with their cards, as a sidecar reports them.
        let now = unix_now();
        let seeded = Instant::now();
        for chunk in (0..total).collect::<Vec<_>>().chunks(500) {
            let events: Vec<Value> = chunk.iter().map(|i| intent_event(*i, &agent, now)).collect();
            let r = http
                .post(format!("{base}/api/sync/v1/events"))
                .bearer_auth(&token)
                .json(&json!({"format": 1, "events": events}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 200, "{}", r.text().await.unwrap_or_default());
        }
        eprintln!("seeded {total} purchases in {:?}", seeded.elapsed());

        let addr = base.trim_start_matches("http://").to_string();
        let requests: Vec<Vec<u8>> = (0..total)
            .map(|i| {
                let body = authorization_request(i, now);
                format!(
                    "POST /api/webhooks/stripe HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nStripe-Signature: {}\r\nContent-Length: {}\r\n\r\n{body}",
                    signature(&body, unix_now()),
                    body.len()
                )
                .into_bytes()
            })
            .collect();
        let requests = Arc::new(requests);
        let interval = Duration::from_nanos(1_000_000_000 / rate);
        let queue = Arc::new(tokio::sync::Mutex::new(std::collections::VecDeque::<(usize, tokio::time::Instant)>::new()));
        let notify = Arc::new(tokio::sync::Notify::new());
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let results = Arc::new(std::sync::Mutex::new(Vec::with_capacity(total)));
        let errors = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let declined = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut workers = Vec::new();
        for _ in 0..connections {
            let (queue, notify, done, requests, results, errors, declined, addr) = (
                queue.clone(), notify.clone(), done.clone(), requests.clone(),
                results.clone(), errors.clone(), declined.clone(), addr.clone(),
            );
            workers.push(tokio::spawn(async move {
                let mut conn = Conn::connect(&addr).await;
                loop {
                    let next = queue.lock().await.pop_front();
                    let Some((i, scheduled)) = next else {
                        if done.load(std::sync::atomic::Ordering::SeqCst) {
                            return;
                        }
                        let _ = tokio::time::timeout(Duration::from_millis(5), notify.notified()).await;
                        continue;
                    };
                    let sent = tokio::time::Instant::now();
                    match conn.roundtrip(&requests[i]).await {
                        Some((200, body)) => {
                            let finished = tokio::time::Instant::now();
                            if !body.contains("\"approved\":true") {
                                declined.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                if declined.load(std::sync::atomic::Ordering::Relaxed) < 3 {
                                    eprintln!("declined: {body}");
                                }
                            }
                            if let Ok(mut r) = results.lock() {
                                r.push((finished - sent, finished - scheduled));
                            }
                        }
                        other => {
                            if errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < 3 {
                                eprintln!("error: {other:?}");
                            }
                            conn = Conn::connect(&addr).await;
                        }
                    }
                }
            }));
        }
        let t0 = tokio::time::Instant::now() + Duration::from_millis(50);
        for i in 0..total {
            let scheduled = t0 + interval * i as u32;
            tokio::time::sleep_until(scheduled).await;
            queue.lock().await.push_back((i, scheduled));
            notify.notify_one();
        }
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        notify.notify_waiters();
        for w in workers {
            let _ = w.await;
        }
        let wall = tokio::time::Instant::now() - t0;
        let pairs = results.lock().map(|r| r.clone()).unwrap_or_default();
        println!("authorization ({backend}): rate={rate}/s seconds={seconds} connections={connections}");
        println!(
            "  sent={total} answered={} declined={} errors={} achieved={:.0}/s",
            pairs.len(),
            declined.load(std::sync::atomic::Ordering::Relaxed),
            errors.load(std::sync::atomic::Ordering::Relaxed),
            pairs.len() as f64 / wall.as_secs_f64()
        );
        common::report(&pairs);
    });
}
