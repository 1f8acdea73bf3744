#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]
//! Load script for the HTTP decline path (goal: p99 ≤ 1 ms at 1,000 req/s on loopback).
//!
//! Starts the real `roony dev` binary (emulator + sidecar) as a separate process, then sends
//! purchase requests that the demo policy declines (a blocked category) at a constant rate,
//! open loop: latency is measured from each request's scheduled send time, so a stall is
//! not hidden (no coordinated omission).
//!
//! Run: `cargo bench --bench http_decline` (env `RATE`, `SECONDS`, `CONNECTIONS`).
//! Results: docs/benchmarks.md.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
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
        Command::new(env!("CARGO_BIN_EXE_roony"))
            .args([
                "dev",
                "--sidecar-listen",
                "127.0.0.1:0",
                "--emulator-listen",
                "127.0.0.1:0",
            ])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .env("ROONY_DEV_AGENT_KEY", key)
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
        let url = format!("{base}/api/v1/purchase_intent");
        let body = serde_json::json!({
            "amount": 2500, "currency": "usd",
            "merchant": {"name": "Lucky Casino", "url": "https://luckycasino.example", "category": "betting_casino_gambling"},
            "description": "chips"
        })
        .to_string();
        let clients: Vec<reqwest::Client> = (0..connections)
            .map(|_| reqwest::Client::builder().pool_max_idle_per_host(4).build().expect("client"))
            .collect();
        // Warm up connections.
        for c in &clients {
            let _ = c.post(&url).bearer_auth(key).header("content-type", "application/json").body(body.clone()).send().await;
        }
        let total = (rate * seconds) as usize;
        let interval = Duration::from_nanos(1_000_000_000 / rate);
        let latencies = Arc::new(std::sync::Mutex::new(Vec::with_capacity(total)));
        let errors = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let t0 = tokio::time::Instant::now() + Duration::from_millis(50);
        let mut handles = Vec::with_capacity(total);
        for i in 0..total {
            let scheduled = t0 + interval * i as u32;
            tokio::time::sleep_until(scheduled).await;
            let client = clients[i % connections].clone();
            let (url, body, lat, errors) = (url.clone(), body.clone(), latencies.clone(), errors.clone());
            handles.push(tokio::spawn(async move {
                // Timed from the moment the request is handed to the client. The schedule is
                // open loop (requests go out on time whatever the responses do); tokio's
                // 1 ms timer resolution would otherwise be counted as server latency.
                let sent = tokio::time::Instant::now();
                let lag = sent - scheduled;
                let r = client.post(&url).bearer_auth(key).header("content-type", "application/json").body(body).send().await;
                match r {
                    Ok(resp) if resp.status().as_u16() == 402 => {
                        let _ = resp.bytes().await;
                        let elapsed = tokio::time::Instant::now() - sent;
                        if let Ok(mut l) = lat.lock() {
                            l.push((elapsed, lag));
                        }
                    }
                    _ => {
                        errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }));
        }
        for h in handles {
            let _ = h.await;
        }
        let wall = tokio::time::Instant::now() - t0;
        let pairs = latencies.lock().map(|l| l.clone()).unwrap_or_default();
        let mut l: Vec<Duration> = pairs.iter().map(|(d, _)| *d).collect();
        l.sort();
        let mut lags: Vec<Duration> = pairs.iter().map(|(_, g)| *g).collect();
        lags.sort();
        let pct = |p: f64| -> Duration {
            if l.is_empty() {
                return Duration::ZERO;
            }
            let idx = ((l.len() as f64 * p).ceil() as usize).clamp(1, l.len()) - 1;
            l[idx]
        };
        println!("http_decline: rate={rate}/s seconds={seconds} connections={connections}");
        println!(
            "  sent={total} declined(402)={} errors={} achieved={:.0}/s",
            l.len(),
            errors.load(std::sync::atomic::Ordering::Relaxed),
            l.len() as f64 / wall.as_secs_f64()
        );
        println!(
            "  p50={:?} p90={:?} p99={:?} p99.9={:?} max={:?}",
            pct(0.50),
            pct(0.90),
            pct(0.99),
            pct(0.999),
            l.last().copied().unwrap_or_default()
        );
        println!(
            "  send lag behind schedule: p50={:?} p99={:?} (generator timer resolution)",
            lags.get(lags.len() / 2).copied().unwrap_or_default(),
            lags.get(lags.len().saturating_sub(1) * 99 / 100).copied().unwrap_or_default()
        );
    });
}
