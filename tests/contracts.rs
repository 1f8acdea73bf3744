#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]
//! Generated contracts are committed; these tests fail when they drift.
//! Regenerate with `UPDATE_CONTRACTS=1 cargo test --test contracts`.

mod common;

use std::path::Path;

fn check(path: &str, generated: &str) {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    if std::env::var_os("UPDATE_CONTRACTS").is_some() {
        std::fs::create_dir_all(full.parent().unwrap()).unwrap();
        std::fs::write(&full, generated).unwrap();
    }
    let committed = std::fs::read_to_string(&full).unwrap_or_else(|_| {
        panic!("{path} is missing; run UPDATE_CONTRACTS=1 cargo test --test contracts")
    });
    assert!(
        committed == generated,
        "{path} is stale; run UPDATE_CONTRACTS=1 cargo test --test contracts and commit it"
    );
}

#[test]
fn agent_openapi_is_committed() {
    check("openapi/roony-agent.json", &roony::api::openapi_json());
}

#[test]
fn mcp_tools_are_committed() {
    check("mcp/tools.json", &roony::mcp::tools_json());
}

#[tokio::test]
async fn served_spec_equals_committed_spec() {
    let emu = common::start_emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let sc = common::start_sidecar(
        dir.path(),
        &emu,
        common::TestClock::new(),
        common::demo_policy(),
    )
    .await;
    let served: serde_json::Value = reqwest::get(format!("{}/openapi.json", sc.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let committed: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi/roony-agent.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(served, committed);
    assert_eq!(served["openapi"], "3.1.0");
    for path in [
        "/api/v1/purchase_intent",
        "/api/v1/purchase_intents",
        "/api/v1/purchase_intents/{id}",
        "/api/v1/purchase_intents/{id}/cancel",
        "/api/v1/budget",
    ] {
        assert!(
            served["paths"].get(path).is_some(),
            "{path} missing from the spec"
        );
    }
}
