#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]
//! The admin API's spec is committed; this fails when it drifts.
//! Regenerate with `UPDATE_CONTRACTS=1 cargo test --test control_contracts`.

use std::path::Path;

const SPEC: &str = "openapi/roony-admin.json";

#[test]
fn admin_openapi_is_committed() {
    let generated = roony::control::api::openapi_json();
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(SPEC);
    if std::env::var_os("UPDATE_CONTRACTS").is_some() {
        std::fs::write(&full, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(&full).unwrap_or_else(|_| {
        panic!("{SPEC} is missing; run UPDATE_CONTRACTS=1 cargo test --test control_contracts")
    });
    assert!(
        committed == generated,
        "{SPEC} is stale; run UPDATE_CONTRACTS=1 cargo test --test control_contracts and commit it"
    );
}

#[tokio::test]
async fn served_spec_equals_committed_spec() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = roony::control::ControlConfig::sqlite_in(dir.path());
    config.listen = "127.0.0.1:0".parse().unwrap();
    let listener = tokio::net::TcpListener::bind(config.listen).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(roony::control::serve(config, listener, async move {
        let _ = stop_rx.await;
    }));
    let url = format!("http://{addr}/api/admin/v1/openapi.json");
    let mut served = None;
    for _ in 0..100 {
        if let Ok(r) = reqwest::get(&url).await {
            served = Some(r.json::<serde_json::Value>().await.unwrap());
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let served = served.expect("control plane did not answer");
    let committed: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(SPEC)).unwrap(),
    )
    .unwrap();
    assert_eq!(served, committed);
    assert_eq!(served["openapi"], "3.1.0");
    for path in [
        "/api/admin/v1/organizations",
        "/api/admin/v1/projects",
        "/api/admin/v1/agents",
        "/api/admin/v1/agents/{id}",
        "/api/admin/v1/agents/{id}/keys",
        "/api/admin/v1/agents/{id}/keys/rotate",
        "/api/admin/v1/agents/{id}/keys/{key_id}/revoke",
        "/api/admin/v1/agents/{id}/freeze",
        "/api/admin/v1/authorizations",
        "/api/admin/v1/discrepancies",
        "/api/admin/v1/discrepancies/{id}/resolve",
        "/api/admin/v1/agents/{id}/unfreeze",
        "/api/admin/v1/agents/{id}/policy",
        "/api/admin/v1/agents/{id}/policy/revisions",
        "/api/admin/v1/budgets",
        "/api/admin/v1/intents",
        "/api/admin/v1/intents/{id}",
        "/api/admin/v1/intents/{id}/approve",
        "/api/admin/v1/intents/{id}/deny",
        "/api/admin/v1/decisions",
        "/api/admin/v1/audit_events",
        "/api/admin/v1/sidecars",
        "/api/admin/v1/sidecars/{id}/revoke",
        "/api/admin/v1/budgets/{id}/leases",
        "/api/admin/v1/admin_tokens",
        "/api/admin/v1/admin_tokens/{id}/revoke",
    ] {
        assert!(
            served["paths"].get(path).is_some(),
            "{path} missing from the spec"
        );
    }
    let _ = stop_tx.send(());
    server.await.unwrap().unwrap();
}
