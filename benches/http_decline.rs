#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]
//! Load script for the HTTP decline path (goal: p99 ≤ 1 ms at 1,000 req/s on loopback).
//!
//! Starts the real `roony dev` binary (emulator + sidecar) as a separate process, then sends
//! purchase requests that the demo policy declines (a blocked category) at a constant rate,
//! open loop: latency is measured from each request's scheduled send time, so a stall is
//! not hidden (no coordinated omission).
//!
//! Run: `cargo bench --bench http_decline` (env `RATE`, `SECONDS`, `CONNECTIONS`,
//! `SERVER_CPU`).
//! Results: docs/benchmarks.md.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;
use common::{Child, Conn, env_or};

/// A tiny MPMC queue of scheduled send times (tokio's mpsc is single-consumer).
fn async_channel(cap: usize) -> (Sender, Receiver) {
    let inner = Arc::new((
        tokio::sync::Mutex::new(std::collections::VecDeque::with_capacity(cap)),
        tokio::sync::Notify::new(),
        std::sync::atomic::AtomicBool::new(false),
    ));
    (Sender(inner.clone()), Receiver(inner))
}
type Queue = Arc<(
    tokio::sync::Mutex<std::collections::VecDeque<tokio::time::Instant>>,
    tokio::sync::Notify,
    std::sync::atomic::AtomicBool,
)>;
struct Sender(Queue);
#[derive(Clone)]
struct Receiver(Queue);
impl Sender {
    async fn send(&self, v: tokio::time::Instant) -> Result<(), ()> {
        self.0.0.lock().await.push_back(v);
        self.0.1.notify_one();
        Ok(())
    }
    fn close(&self) {
        self.0.2.store(true, std::sync::atomic::Ordering::SeqCst);
        self.0.1.notify_waiters();
    }
}
impl Receiver {
    async fn recv(&self) -> Result<tokio::time::Instant, ()> {
        loop {
            let notified = self.0.1.notified();
            if let Some(v) = self.0.0.lock().await.pop_front() {
                return Ok(v);
            }
            if self.0.2.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(());
            }
            let _ = tokio::time::timeout(Duration::from_millis(5), notified).await;
        }
    }
}

/// `roony`, or `taskset -c N roony` when `SERVER_CPU=N` pins the sidecar to one core (run
/// the generator itself under `taskset -c M` so the two do not compete for a core).
fn server_command() -> Command {
    match std::env::var("SERVER_CPU") {
        Ok(cpu) if !cpu.is_empty() => {
            let mut c = Command::new("taskset");
            c.args(["-c", &cpu, env!("CARGO_BIN_EXE_roony")]);
            c
        }
        _ => Command::new(env!("CARGO_BIN_EXE_roony")),
    }
}

fn main() {
    // `cargo bench` passes `--bench`; ignore arguments.
    let rate = env_or("RATE", 1_000);
    let seconds = env_or("SECONDS", 10);
    let connections = env_or("CONNECTIONS", 16) as usize;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("stderr.log");
    let key = "roony-bench-key-0123456789abcdef";
    let _child = Child(
        server_command()
            .args([
                "dev",
                "--sidecar-listen",
                "127.0.0.1:0",
                "--emulator-listen",
                "127.0.0.1:0",
                "--control-plane-listen",
                "127.0.0.1:0",
            ])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .env("ROONY_DEV_AGENT_KEY", key)
            // The load comes from one key on purpose: measure the decision, not the limiter.
            .env("ROONY_RATE_LIMIT_PER_SECOND", "0")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log).expect("log")))
            .spawn()
            .expect("start roony dev"),
    );
    let start = Instant::now();
    let base = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(l) = text.lines().find(|l| l.contains("sidecar listening on")) {
            break l
                .split("listening on ")
                .nth(1)
                .unwrap_or_default()
                .trim()
                .to_string();
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "roony dev did not start:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let addr = base.trim_start_matches("http://").to_string();
        let body = serde_json::json!({
            "amount": 2500, "currency": "usd",
            "merchant": {"name": "Lucky Casino", "url": "https://luckycasino.example", "category": "betting_casino_gambling"},
            "description": "chips"
        })
        .to_string();
        // A minimal HTTP/1.1 keep-alive client on raw sockets: the generator shares the two
        // cores with the sidecar, so it must cost as little CPU as possible.
        let request = format!(
            "POST /api/v1/purchase_intent HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes();
        let request = Arc::new(request);
        let total = (rate * seconds) as usize;
        let interval = Duration::from_nanos(1_000_000_000 / rate);
        let (tx, rx) = async_channel(total);
        let results = Arc::new(std::sync::Mutex::new(Vec::with_capacity(total)));
        let errors = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut workers = Vec::new();
        for _ in 0..connections {
            let (rx, request, results, errors, addr) = (rx.clone(), request.clone(), results.clone(), errors.clone(), addr.clone());
            workers.push(tokio::spawn(async move {
                let mut conn = Conn::connect(&addr).await;
                while let Ok(scheduled) = rx.recv().await {
                    let sent = tokio::time::Instant::now();
                    match conn.roundtrip(&request).await {
                        Some((402, _)) => {
                            let done = tokio::time::Instant::now();
                            if let Ok(mut r) = results.lock() {
                                r.push((done - sent, done - scheduled));
                            }
                        }
                        _ => {
                            errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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
            let _ = tx.send(scheduled).await;
        }
        tx.close();
        for w in workers {
            let _ = w.await;
        }
        let wall = tokio::time::Instant::now() - t0;
        let pairs = results.lock().map(|r| r.clone()).unwrap_or_default();
        println!("http_decline: rate={rate}/s seconds={seconds} connections={connections}");
        println!(
            "  sent={total} declined(402)={} errors={} achieved={:.0}/s",
            pairs.len(),
            errors.load(std::sync::atomic::Ordering::Relaxed),
            pairs.len() as f64 / wall.as_secs_f64()
        );
        common::report(&pairs);
    });
}
