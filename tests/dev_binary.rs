#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]
//! `roony dev` as a person runs it: the real binary, the README's requests, and a scan of
//! everything it wrote (data directory, stdout, stderr at trace level) for the card number.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

mod common;

use common::process::{Child, stop, wait_for};
use serde_json::{Value, json};

const ADMIN_TOKEN: &str = "roony-dev-admin-token-0123456789";

fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            walk(&p, out);
        } else {
            out.push(p);
        }
    }
}

#[tokio::test]
async fn dev_buys_declines_and_never_writes_a_card_number() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let stdout_path = tmp.path().join("stdout.log");
    let stderr_path = tmp.path().join("stderr.log");
    let key = "roony-dev-test-key-0123456789";
    let child = Child(
        Command::new(env!("CARGO_BIN_EXE_roony"))
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
            .arg(&data)
            .env("ROONY_DEV_AGENT_KEY", key)
            .env("ROONY_DEV_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("RUST_LOG", "trace")
            .stdout(Stdio::from(std::fs::File::create(&stdout_path).unwrap()))
            .stderr(Stdio::from(std::fs::File::create(&stderr_path).unwrap()))
            .spawn()
            .unwrap(),
    );
    let line = wait_for(&stderr_path, "sidecar listening on");
    let base = line
        .split("listening on ")
        .nth(1)
        .unwrap()
        .trim()
        .to_string();
    let line = wait_for(&stderr_path, "control plane listening on");
    let control = line
        .split("listening on ")
        .nth(1)
        .unwrap()
        .trim()
        .to_string();
    wait_for(&stdout_path, "Agent key");
    let stdout = std::fs::read_to_string(&stdout_path).unwrap();
    assert!(stdout.contains(key), "dev prints the demo agent's key");

    let client = reqwest::Client::new();
    let buy = |body: Value| {
        client
            .post(format!("{base}/api/v1/purchase_intent"))
            .bearer_auth(key)
            .json(&body)
            .send()
    };
    // The README's two requests.
    let r = buy(json!({"amount":1200,"currency":"usd","merchant":{"name":"Namecheap","url":"https://www.namecheap.com","country":"US"},"description":"one domain for a year"})).await.unwrap();
    assert_eq!(r.status(), 201);
    let approved: Value = r.json().await.unwrap();
    let pan = approved["card"]["number"].as_str().unwrap().to_string();
    let cvc = approved["card"]["cvc"].as_str().unwrap().to_string();
    assert_eq!(pan.len(), 16);
    let r = buy(json!({"amount":5000,"currency":"usd","merchant":{"name":"Lucky Casino","url":"https://luckycasino.example","category":"betting_casino_gambling"},"description":"chips"})).await.unwrap();
    assert_eq!(r.status(), 402);
    let declined: Value = r.json().await.unwrap();
    assert_eq!(declined["reasons"][0]["code"], "category_not_allowed");
    // An idempotent replay fetches the card again; it must not be logged either.
    let r = buy(json!({"amount":700,"currency":"usd","merchant":{"name":"Shop","url":"https://shop.example"},"description":"x","idempotency_key":"k1"})).await.unwrap();
    let first: Value = r.json().await.unwrap();
    let r = buy(json!({"amount":700,"currency":"usd","merchant":{"name":"Shop","url":"https://shop.example"},"description":"x","idempotency_key":"k1"})).await.unwrap();
    assert_eq!(r.status(), 200);
    let pan2 = first["card"]["number"].as_str().unwrap().to_string();

    // And once through MCP (streamable HTTP, 2026-07-28 stateless request): rmcp logs whole
    // responses at debug level, which would include the card.
    let call = json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {
        "name": "request_purchase",
        "arguments": {"amount": 900, "currency": "usd", "merchant": {"name": "Shop", "url": "https://shop.example"}, "description": "via mcp"},
        "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}
    }});
    let r = client
        .post(format!("{base}/mcp"))
        .bearer_auth(key)
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", "tools/call")
        .header("mcp-name", "request_purchase")
        .json(&call)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let event = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(str::trim)
        .find(|d| d.contains("\"result\""))
        .map(str::to_string)
        .unwrap_or(text.clone());
    let mcp: Value = serde_json::from_str(&event).unwrap_or_else(|e| panic!("{e}: {text}"));
    let pan3 = mcp["result"]["structuredContent"]["card"]["number"]
        .as_str()
        .unwrap_or_else(|| panic!("no card in {mcp}"))
        .to_string();

    // The merchant charges the first card and captures (`roony simulate charge`, as the
    // README says): the emulator asks the control plane in real time, the capture settles
    // the intent at the sidecar. With trace logging on, so the scan below also covers the
    // webhook traffic.
    let emulator = wait_for(&stderr_path, "stripe emulator listening on")
        .split("listening on ")
        .nth(1)
        .unwrap()
        .trim()
        .to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_roony"))
        .args(["simulate", "charge", "--card"])
        .arg(approved["card"]["id"].as_str().unwrap())
        .args(["--amount", "1200", "--merchant", "NAMECHEAP.COM"])
        .args(["--merchant-country", "US", "--capture", "--stripe-base-url"])
        .arg(&emulator)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let intent_url = format!(
        "{base}/api/v1/purchase_intents/{}",
        approved["id"].as_str().unwrap()
    );
    let charged = std::time::Instant::now();
    loop {
        let v: Value = client
            .get(&intent_url)
            .bearer_auth(key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if v["status"] == "settled" {
            assert_eq!(v["settlement"]["spent"], 1200, "{v}");
            break;
        }
        assert!(
            charged.elapsed() < Duration::from_secs(10),
            "the capture did not settle the intent: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The control plane is the source of truth: an admin's policy edit reaches the sidecar
    // within a second.
    let mut policy = roony::dev::demo_policy();
    policy.max_per_transaction = Some(500);
    let r = client
        .put(format!("{control}/api/admin/v1/agents/agt_demo/policy"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&policy)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let edited = std::time::Instant::now();
    loop {
        let r = buy(json!({"amount":1000,"currency":"usd","merchant":{"name":"Shop","url":"https://shop.example"},"description":"after the edit"})).await.unwrap();
        if r.status() == 402 {
            let body: Value = r.json().await.unwrap();
            assert_eq!(body["reasons"][0]["code"], "exceeds_transaction_limit");
            break;
        }
        assert!(
            edited.elapsed() < Duration::from_secs(1),
            "the policy edit did not reach the sidecar within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The demo history (a new data directory): the research agent's purchases went through
    // the sidecar, the relay and the emulator's merchants, and the control plane's ledger
    // holds each outcome.
    wait_for(&stderr_path, "roony: demo history:");
    let statuses = research_statuses(&client, &control).await;
    assert_eq!(statuses.len(), 7, "{statuses:?}");
    for (status, n) in [
        ("settled", 2),
        ("declined", 1),
        ("pending_approval", 1),
        ("approved", 3),
    ] {
        assert_eq!(
            statuses.iter().filter(|s| s.as_str() == status).count(),
            n,
            "{status}: {statuses:?}"
        );
    }

    // Stop gracefully so everything is flushed, then scan.
    let mut child = child;
    stop(&mut child);
    let mut files = vec![stdout_path, stderr_path.clone()];
    walk(&data, &mut files);
    assert!(files.len() >= 3, "the data dir holds the database");
    let stderr_len = std::fs::metadata(&stderr_path).unwrap().len();
    assert!(stderr_len > 1000, "trace logging was captured");
    for f in files {
        let mut bytes = Vec::new();
        std::fs::File::open(&f)
            .unwrap()
            .read_to_end(&mut bytes)
            .unwrap();
        let text = String::from_utf8_lossy(&bytes);
        for secret in [&pan, &pan2, &pan3] {
            assert!(
                !text.contains(secret.as_str()),
                "card number found in {}",
                f.display()
            );
        }
        assert!(
            !text.contains(&format!("\"cvc\":\"{cvc}\"")),
            "cvc found in {}",
            f.display()
        );
        assert!(
            !text.contains(key) || f.ends_with("stdout.log"),
            "agent key found in {}",
            f.display()
        );
    }
}

/// The statuses of the history agent's intents in the control plane's ledger (eventually:
/// the sidecar's outbox and the settlement webhooks arrive asynchronously).
async fn research_statuses(client: &reqwest::Client, control: &str) -> Vec<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let page: Value = client
            .get(format!(
                "{control}/api/admin/v1/intents?agent_id=agt_research&limit=100"
            ))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let statuses: Vec<String> = page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["status"].as_str().unwrap().to_string())
            .collect();
        let settled = statuses.iter().filter(|s| *s == "settled").count();
        if (statuses.len() == 7 && settled == 2) || std::time::Instant::now() > deadline {
            return statuses;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Restarting `roony dev` on the same data directory retires the previous run's demo key,
/// keeps an administrator's policy edit and does not add the demo history again.
#[tokio::test]
async fn a_restart_retires_the_previous_demo_key() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let run = |n: usize| {
        let out = tmp.path().join(format!("stdout{n}.log"));
        let err = tmp.path().join(format!("stderr{n}.log"));
        let child = Child(
            Command::new(env!("CARGO_BIN_EXE_roony"))
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
                .arg(&data)
                .env_remove("ROONY_DEV_AGENT_KEY")
                .env("ROONY_DEV_ADMIN_TOKEN", ADMIN_TOKEN)
                .stdout(Stdio::from(std::fs::File::create(&out).unwrap()))
                .stderr(Stdio::from(std::fs::File::create(&err).unwrap()))
                .spawn()
                .unwrap(),
        );
        let line = wait_for(&err, "sidecar listening on");
        let base = line
            .split("listening on ")
            .nth(1)
            .unwrap()
            .trim()
            .to_string();
        let line = wait_for(&err, "control plane listening on");
        let control = line
            .split("listening on ")
            .nth(1)
            .unwrap()
            .trim()
            .to_string();
        let key_line = wait_for(&out, "Agent key");
        let key = key_line.split(": ").nth(1).unwrap().trim().to_string();
        (child, base, key, control, err)
    };
    let budget = |base: String, key: String| async move {
        reqwest::Client::new()
            .get(format!("{base}/api/v1/budget"))
            .bearer_auth(key)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    let client = reqwest::Client::new();
    let (first, base1, key1, control1, err1) = run(1);
    assert_eq!(budget(base1, key1.clone()).await, 200);
    wait_for(&err1, "roony: demo history:");
    assert_eq!(research_statuses(&client, &control1).await.len(), 7);
    // An administrator edits the demo agent's policy.
    let mut policy = roony::dev::demo_policy();
    policy.max_per_transaction = Some(4_200);
    let r = client
        .put(format!("{control1}/api/admin/v1/agents/agt_demo/policy"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&policy)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let edited: Value = r.json().await.unwrap();
    let mut first = first;
    stop(&mut first);
    drop(first);
    let (_second, base2, key2, control2, err2) = run(2);
    assert_ne!(key1, key2);
    // The edit survives the restart; the history is not added twice.
    let current: Value = client
        .get(format!("{control2}/api/admin/v1/agents/agt_demo/policy"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(current["revision"], edited["revision"]);
    assert_eq!(current["document"]["max_per_transaction"], 4_200);
    assert_eq!(research_statuses(&client, &control2).await.len(), 7);
    assert!(
        !std::fs::read_to_string(&err2)
            .unwrap()
            .contains("demo history"),
        "no second history"
    );
    assert_eq!(budget(base2.clone(), key2).await, 200);
    assert_eq!(
        budget(base2, key1).await,
        401,
        "the previous run's key is revoked"
    );
}
