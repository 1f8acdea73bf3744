#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]
//! `roony sidecar --control-plane-url … --sidecar-token …` as the real binary, syncing from
//! `roony control-plane` (SQLite): the sidecar enforces what the admin API says, survives
//! the control plane being down, and refuses a persisted bundle edited on disk.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::process::{Child, stop, url_after, wait_for};
use serde_json::{Value, json};

const ADMIN: &str = "sync-cli-admin-token-0123456789";

fn sidecar(data: &Path, stderr: &Path, emulator: &str, control: &str, token: &str) -> Child {
    Child(
        Command::new(env!("CARGO_BIN_EXE_roony"))
            .args(["sidecar", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data)
            .args([
                "--stripe-api-key",
                "sk_test_sync_cli",
                "--stripe-base-url",
                emulator,
            ])
            .args(["--control-plane-url", control])
            .env("ROONY_SIDECAR_TOKEN", token)
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(stderr).unwrap()))
            .spawn()
            .unwrap(),
    )
}

async fn buy(client: &reqwest::Client, base: &str, key: &str, amount: i64) -> (u16, Value) {
    let r = client
        .post(format!("{base}/api/v1/purchase_intent"))
        .bearer_auth(key)
        .json(&common::purchase(amount))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_binary_syncs_from_the_control_plane() {
    let tmp = tempfile::tempdir().unwrap();
    let emulator = common::start_emulator().await;
    let cp_log = tmp.path().join("cp.log");
    let mut cp = Child(
        Command::new(env!("CARGO_BIN_EXE_roony"))
            .args(["control-plane", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(tmp.path().join("cp"))
            .env("ROONY_ADMIN_TOKEN", ADMIN)
            .env_remove("DATABASE_URL")
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&cp_log).unwrap()))
            .spawn()
            .unwrap(),
    );
    let control = url_after(&wait_for(&cp_log, "control plane listening on"));
    let client = reqwest::Client::new();
    let admin = |method: reqwest::Method, path: &str, body: Value| {
        client
            .request(method, format!("{control}/api/admin/v1{path}"))
            .bearer_auth(ADMIN)
            .json(&body)
            .send()
    };
    let project: Value = admin(reqwest::Method::POST, "/projects", json!({"name": "p"}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let project = project["id"].as_str().unwrap().to_string();
    let sc: Value = admin(
        reqwest::Method::POST,
        "/sidecars",
        json!({"name": "edge", "project_id": project}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let token = sc["token"].as_str().unwrap().to_string();
    let agent: Value = admin(
        reqwest::Method::POST,
        "/agents",
        json!({"project_id": project, "name": "a", "id": "agt_cli"}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let key = agent["key"].as_str().unwrap().to_string();
    let mut policy = serde_json::to_value(common::demo_policy()).unwrap();
    policy["max_per_transaction"] = json!(1_000);
    let r = admin(reqwest::Method::PUT, "/agents/agt_cli/policy", policy)
        .await
        .unwrap();
    assert!(r.status().is_success());

    let data = tmp.path().join("sidecar");
    let log1 = tmp.path().join("sidecar1.log");
    let mut sc1 = sidecar(&data, &log1, &emulator.url, &control, &token);
    let base = url_after(&wait_for(&log1, "sidecar listening on"));
    wait_for(&log1, "syncing with the control plane at");
    let start = Instant::now();
    loop {
        let (status, body) = buy(&client, &base, &key, 500).await;
        if status == 201 {
            break;
        }
        assert_eq!(status, 401, "{body}");
        assert!(start.elapsed() < Duration::from_secs(10), "never synced");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, body) = buy(&client, &base, &key, 2_000).await;
    assert_eq!(status, 402, "{body}");
    stop(&mut sc1);
    stop(&mut cp);

    // The control plane is down: the persisted bundle is enforced.
    let log2 = tmp.path().join("sidecar2.log");
    let mut sc2 = sidecar(&data, &log2, &emulator.url, &control, &token);
    let base = url_after(&wait_for(&log2, "sidecar listening on"));
    wait_for(&log2, "applied the persisted policy bundle");
    let (status, body) = buy(&client, &base, &key, 500).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = buy(&client, &base, &key, 2_000).await;
    assert_eq!(status, 402, "{body}");
    stop(&mut sc2);

    // Edited on disk: rejected, and the sidecar says so; nobody buys.
    {
        let store = roony::store::Store::open(&data.join("sidecar.redb")).unwrap();
        let raw = String::from_utf8(store.sync_bundle().unwrap().unwrap()).unwrap();
        let tampered = raw.replace(
            "\"max_per_transaction\":1000",
            "\"max_per_transaction\":9000",
        );
        assert_ne!(raw, tampered);
        store.put_sync_bundle(tampered.as_bytes()).unwrap();
    }
    let log3 = tmp.path().join("sidecar3.log");
    let mut sc3 = sidecar(&data, &log3, &emulator.url, &control, &token);
    let base = url_after(&wait_for(&log3, "sidecar listening on"));
    let line = wait_for(&log3, "persisted policy bundle was rejected");
    assert!(line.contains("signature"), "{line}");
    let (status, body) = buy(&client, &base, &key, 500).await;
    assert_eq!(status, 402, "{body}");
    assert_eq!(body["reasons"][0]["code"], "agent_frozen", "{body}");
    stop(&mut sc3);

    // Neither the sidecar token nor the agent key is ever logged.
    for log in [&cp_log, &log1, &log2, &log3] {
        let text = std::fs::read_to_string(log).unwrap();
        assert!(!text.contains(&token), "token in {}", log.display());
        assert!(!text.contains(&key), "key in {}", log.display());
    }
}
