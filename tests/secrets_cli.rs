#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]
//! Rotating the secrets key with the real binary, on SQLite and PostgreSQL: `roony secrets
//! status` (configured keys, rows per key, rows sealed by a key that is not configured),
//! `roony secrets reseal` (one transaction, audited, nothing changed when a value cannot be
//! opened) and the control plane's start-up error naming rows sealed by a missing key.

mod common;

use std::process::{Command, Stdio};

use roony::control::db::{Actor, ControlDb, StoredTokens};
use roony::control::secrets::{SecretBox, SecretKey};

use common::db::{Kind, TestDb, on_both};
use common::process::{Child, wait_for};

const PLAIN_ACCESS: &str = "sk_test_oauth_plaintext_access_token";
const PLAIN_REFRESH: &str = "rt_plaintext_refresh_token_0123456789";

fn key(id: &str, byte: u8) -> SecretKey {
    SecretKey::new(id, [byte; 32]).unwrap()
}

fn spec(keys: &[(&str, u8)]) -> String {
    keys.iter()
        .map(|(id, b)| format!("{id}:{}", format!("{b:02x}").repeat(32)))
        .collect::<Vec<_>>()
        .join(",")
}

fn actor() -> Actor {
    Actor {
        kind: "system",
        id: "test".into(),
        name: "test".into(),
        request_id: None,
    }
}

fn aad(org: &str, field: &str) -> String {
    format!("stripe_connections/{org}/{field}")
}

async fn store(db: &ControlDb, org: &str, with: &SecretBox, account: &str) {
    let tokens = StoredTokens {
        account_id: account.into(),
        access_token: with
            .seal(PLAIN_ACCESS.as_bytes(), &aad(org, "access_token"))
            .unwrap(),
        refresh_token: Some(
            with.seal(PLAIN_REFRESH.as_bytes(), &aad(org, "refresh_token"))
                .unwrap(),
        ),
        key_id: with.current_key_id().into(),
        scope: Some("read_write".into()),
        livemode: false,
    };
    db.store_stripe_tokens(org, &tokens, false, &actor(), 1_800_000_000)
        .await
        .unwrap();
}

/// `roony secrets <command>` against the database: (exit code, stdout, stderr).
fn secrets(url: &str, command: &str, keys: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_roony"))
        .args(["secrets", command, "--data-dir"])
        .arg(dir.path())
        .env("DATABASE_URL", url)
        .env("ROONY_SECRETS_KEY", keys)
        .env_remove("ROONY_SECRETS_KEY_FILE")
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn run<F, Fut>(kind: Kind, scenario: F)
where
    F: FnOnce(ControlDb, String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let Some(tdb) = TestDb::new(kind, "secrets CLI tests is SKIPPED").await else {
        return;
    };
    let db = ControlDb::open(&tdb.url).await.unwrap();
    scenario(db.clone(), tdb.url.clone()).await;
    db.close().await;
    tdb.drop_schema().await;
}

on_both!(rotation);

async fn rotation(db: ControlDb, url: String) {
    let a = db
        .ensure_default_org(1_800_000_000)
        .await
        .unwrap()
        .id
        .clone();
    let b = db
        .create_org("other", &actor(), 1_800_000_000)
        .await
        .unwrap()
        .id;
    let k1 = SecretBox::new(key("k1", 1), vec![]);
    let k0 = SecretBox::new(key("k0", 9), vec![]);
    store(&db, &a, &k1, "acct_a").await;
    store(&db, &b, &k0, "acct_b").await;

    // k2 is the new current key, k1 kept; k0 is not configured.
    let rotating = spec(&[("k2", 2), ("k1", 1)]);
    let (code, out, err) = secrets(&url, "status", &rotating);
    assert_eq!(code, 2, "{out}{err}");
    assert!(out.contains("configured keys: k2 (current), k1"), "{out}");
    assert!(out.contains("key k2: 0 row(s)"), "{out}");
    assert!(out.contains("key k1: 1 row(s)"), "{out}");
    assert!(out.contains("key k0 (not configured): 1 row(s)"), "{out}");
    assert!(
        out.contains(&format!(
            "not configured: organization {b} is sealed with key k0"
        )),
        "{out}"
    );
    assert!(!out.contains(PLAIN_ACCESS) && !err.contains(PLAIN_ACCESS));

    // Reseal refuses while a row cannot be opened, and changes nothing.
    let (code, out, err) = secrets(&url, "reseal", &rotating);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains(&b) && err.contains("cannot be opened"),
        "{err}"
    );
    let row = db.stripe_connection(&a).await.unwrap().unwrap();
    assert!(row.access_token.unwrap().starts_with("v1:k1:"));

    // The control plane says at start-up which rows are sealed by a missing key.
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("cp.log");
    let child = Child(
        Command::new(env!("CARGO_BIN_EXE_roony"))
            .args(["control-plane", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("cp"))
            .args(["--stripe-connect-client-id", "ca_test"])
            .args(["--stripe-api-key", "sk_test_platform"])
            .env("DATABASE_URL", &url)
            .env("ROONY_SECRETS_KEY", &rotating)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .spawn()
            .unwrap(),
    );
    let line = wait_for(&log, "which is not configured");
    assert!(
        line.contains(&b) && line.contains("k0") && line.contains("ERROR"),
        "{line}"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains(&format!("organization {a} are sealed")),
        "{text}"
    );
    drop(child);

    // The organization sealed by the lost key disconnects (its tokens are erased); then
    // reseal moves everything to k2 in one go, audited.
    db.disconnect_stripe(&b, "disconnected", &actor(), 1_800_000_001)
        .await
        .unwrap();
    let (code, out, err) = secrets(&url, "reseal", &rotating);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("resealed 1 row(s) with key k2"), "{out}");
    let row = db.stripe_connection(&a).await.unwrap().unwrap();
    assert_eq!(row.key_id.as_deref(), Some("k2"));
    let only_k2 = SecretBox::new(key("k2", 2), vec![]);
    assert_eq!(
        only_k2
            .open_string(&row.access_token.unwrap(), &aad(&a, "access_token"))
            .unwrap(),
        PLAIN_ACCESS
    );
    assert_eq!(
        only_k2
            .open_string(&row.refresh_token.unwrap(), &aad(&a, "refresh_token"))
            .unwrap(),
        PLAIN_REFRESH
    );
    let audited = db
        .list_audit_events(Some(("secrets_key", "k2")), 10)
        .await
        .unwrap();
    assert_eq!(audited.len(), 1);
    assert_eq!(audited[0].action, "secrets.reseal");
    assert_eq!(audited[0].details["rows"], 1);
    assert_eq!(audited[0].details["from"]["k1"], 1);

    // Nothing left under k1: it can be removed from the configuration.
    let (code, out, _) = secrets(&url, "status", &spec(&[("k2", 2)]));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("key k2: 1 row(s)"), "{out}");
    assert!(!out.contains("not configured"), "{out}");
    let (code, out, _) = secrets(&url, "reseal", &spec(&[("k2", 2)]));
    assert_eq!(code, 0);
    assert!(out.contains("nothing to reseal"), "{out}");
    // Reseal without any key is an error, not a silent no-op.
    let (code, _, err) = secrets(&url, "reseal", "");
    assert_eq!(code, 1);
    assert!(err.contains("no secrets key"), "{err}");
}
