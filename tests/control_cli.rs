#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]
//! `roony control-plane` and the control plane inside `roony dev`, as the real binary.

use std::process::{Command, Stdio};

mod common;

use common::process::{Child, stop, url_after, wait_for};
use serde_json::{Value, json};

#[tokio::test]
async fn control_plane_command_serves_the_admin_api() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("cp");
    let stderr_path = tmp.path().join("stderr.log");
    let token = "cli-admin-token-0123456789";
    let mut child = Child(
        Command::new(env!("CARGO_BIN_EXE_roony"))
            .args(["control-plane", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data)
            .env("ROONY_ADMIN_TOKEN", token)
            .env_remove("DATABASE_URL")
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&stderr_path).unwrap()))
            .spawn()
            .unwrap(),
    );
    let base = url_after(&wait_for(&stderr_path, "control plane listening on"));
    assert!(base.starts_with("http://127.0.0.1:"));
    let client = reqwest::Client::new();
    let r = client
        .get(format!("{base}/api/admin/v1/projects"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = client
        .post(format!("{base}/api/admin/v1/projects"))
        .bearer_auth(token)
        .json(&json!({"name": "cli"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert!(stop(&mut child).success());
    assert!(
        data.join("control.db").exists(),
        "SQLite file in --data-dir"
    );
    let stderr = std::fs::read_to_string(&stderr_path).unwrap();
    assert!(!stderr.contains(token), "admin token logged");

    // Restarted on the same file: the project is still there, the token still works.
    let stderr_path = tmp.path().join("stderr2.log");
    let mut child = Child(
        Command::new(env!("CARGO_BIN_EXE_roony"))
            .args(["control-plane", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data)
            .env("ROONY_ADMIN_TOKEN", token)
            .env_remove("DATABASE_URL")
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&stderr_path).unwrap()))
            .spawn()
            .unwrap(),
    );
    let base = url_after(&wait_for(&stderr_path, "control plane listening on"));
    let projects: Value = client
        .get(format!("{base}/api/admin/v1/projects"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(projects["items"][0]["name"], "cli");
    assert!(stop(&mut child).success());
}

#[test]
fn control_plane_refuses_an_unknown_database_url() {
    let out = Command::new(env!("CARGO_BIN_EXE_roony"))
        .args(["control-plane", "--listen", "127.0.0.1:0"])
        .env("DATABASE_URL", "mysql://localhost/db")
        .env_remove("ROONY_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unsupported database url"), "{stderr}");
}

#[test]
fn control_plane_refuses_a_short_admin_token() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_roony"))
        .args(["control-plane", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(tmp.path())
        .env("ROONY_ADMIN_TOKEN", "short")
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("admin token must be at least 20"),
        "{stderr}"
    );
}

#[tokio::test]
async fn dev_starts_the_control_plane() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let stdout_path = tmp.path().join("stdout.log");
    let stderr_path = tmp.path().join("stderr.log");
    let token = "dev-admin-token-0123456789";
    let mut child = Child(
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
            .env("ROONY_DEV_ADMIN_TOKEN", token)
            .stdout(Stdio::from(std::fs::File::create(&stdout_path).unwrap()))
            .stderr(Stdio::from(std::fs::File::create(&stderr_path).unwrap()))
            .spawn()
            .unwrap(),
    );
    wait_for(&stderr_path, "sidecar listening on");
    let base = url_after(&wait_for(&stderr_path, "control plane listening on"));
    wait_for(&stdout_path, "Admin token");
    let stdout = std::fs::read_to_string(&stdout_path).unwrap();
    assert!(stdout.contains(token), "dev prints the admin token");
    let r = reqwest::Client::new()
        .get(format!("{base}/api/admin/v1/agents"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(stop(&mut child).success());
    assert!(data.join("control-plane").join("control.db").exists());
}

/// With request tracing on, the control plane's log names paths, never queries: the OAuth
/// callback's `code` and `state` stay out of it.
#[tokio::test]
async fn request_spans_log_paths_not_queries() {
    let tmp = tempfile::tempdir().unwrap();
    let stderr_path = tmp.path().join("stderr.log");
    let mut child = Child(
        Command::new(env!("CARGO_BIN_EXE_roony"))
            .args(["control-plane", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(tmp.path().join("cp"))
            .env_remove("DATABASE_URL")
            .env("RUST_LOG", "trace")
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&stderr_path).unwrap()))
            .spawn()
            .unwrap(),
    );
    let base = url_after(&wait_for(&stderr_path, "control plane listening on"));
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = client
        .get(format!(
            "{base}/stripe/callback?code=ac_LEAKCHECKcode0123456789&state=statesecret0123456789abcdef"
        ))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_redirection() || r.status().is_client_error());
    let _ = client
        .get(format!("{base}/healthz?probe=querymarker0123456789"))
        .send()
        .await
        .unwrap();
    // The span of the request is in the log, with its path.
    wait_for(&stderr_path, "/healthz");
    assert!(stop(&mut child).success());
    let log = strip_ansi(&std::fs::read_to_string(&stderr_path).unwrap());
    assert!(log.contains("path=/stripe/callback"), "{log}");
    assert!(log.contains("path=/healthz"), "{log}");
    for secret in [
        "LEAKCHECKcode0123456789",
        "statesecret0123456789abcdef",
        "querymarker0123456789",
    ] {
        assert!(!log.contains(secret), "{secret} in the log:\n{log}");
    }
}

/// The text without terminal colour sequences (`ESC [ … m`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
