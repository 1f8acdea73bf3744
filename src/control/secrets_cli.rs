//! `roony secrets status` and `roony secrets reseal`: rotating the key that seals stored
//! Stripe tokens (docs/stripe-credentials.md, "Rotating the secrets key"), and the control
//! plane's start-up check for tokens sealed with a key that is not configured. Works on the
//! control plane's database directly (SQLite file or PostgreSQL), also while it runs.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::admin_cli::DbArgs;
use super::db::{Actor, ControlDb, ResealedRow, SealedRow};
use super::secrets::SecretBox;

#[derive(Subcommand, Debug)]
pub enum SecretsCommand {
    /// Which key ids are configured (current first), how many stored rows each key id
    /// sealed, and the rows sealed by a key that is not configured (exit code 2 if any).
    Status(SecretsArgs),
    /// Seals every stored token with the current key (opened with any configured key), in
    /// one transaction, audited `secrets.reseal`.
    Reseal(SecretsArgs),
}

#[derive(Args, Debug)]
pub struct SecretsArgs {
    #[command(flatten)]
    pub db: DbArgs,
    /// The secrets key(s), as the control plane takes them (`keyid:material`, comma
    /// separated, the current one first).
    #[arg(long, env = "ROONY_SECRETS_KEY", hide_env_values = true)]
    pub secrets_key: Option<String>,
    /// A file holding the secrets key(s); used when ROONY_SECRETS_KEY is not set.
    #[arg(long, env = "ROONY_SECRETS_KEY_FILE")]
    pub secrets_key_file: Option<PathBuf>,
}

impl SecretsArgs {
    fn secrets(&self) -> Result<Option<SecretBox>, String> {
        match (
            self.secrets_key.as_deref().filter(|k| !k.trim().is_empty()),
            &self.secrets_key_file,
        ) {
            (Some(spec), _) => SecretBox::parse(spec).map(Some).map_err(|e| e.to_string()),
            (None, Some(path)) => SecretBox::from_file(path)
                .map(Some)
                .map_err(|e| e.to_string()),
            (None, None) => Ok(None),
        }
    }
}

/// The key ids a stored row's values name (its sealed values, else its `key_id` column).
fn row_key_ids(row: &SealedRow) -> Vec<String> {
    let mut ids: Vec<String> = [&row.access_token, &row.refresh_token]
        .into_iter()
        .flatten()
        .map(|v| SecretBox::key_id_of(v).unwrap_or("(malformed)").to_string())
        .collect();
    if ids.is_empty()
        && let Some(k) = &row.key_id
    {
        ids.push(k.clone());
    }
    ids.sort();
    ids.dedup();
    ids
}

/// What `status` reports.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct KeyReport {
    /// Configured key ids, the current one first.
    pub configured: Vec<String>,
    /// Rows per key id that sealed at least one of their values.
    pub rows_by_key: BTreeMap<String, usize>,
    /// (organization, key id) of values sealed by a key that is not configured.
    pub unconfigured: Vec<(String, String)>,
}

pub fn report(rows: &[SealedRow], secrets: Option<&SecretBox>) -> KeyReport {
    let configured: Vec<String> = secrets
        .map(|s| s.key_ids().into_iter().map(str::to_string).collect())
        .unwrap_or_default();
    let mut out = KeyReport {
        configured,
        ..Default::default()
    };
    for row in rows {
        for id in row_key_ids(row) {
            *out.rows_by_key.entry(id.clone()).or_default() += 1;
            if !out.configured.contains(&id) {
                out.unconfigured.push((row.org_id.clone(), id));
            }
        }
    }
    out
}

/// The control plane's start-up check: an error in the log for every organization whose
/// stored tokens are sealed with a key id that is not configured (they cannot be opened,
/// so that organization cannot issue until the key is configured or it reconnects).
pub async fn check_at_startup(db: &ControlDb, secrets: Option<&SecretBox>) {
    let rows = match db.sealed_stripe_tokens().await {
        Ok(rows) => rows,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the stored stripe tokens to check their keys");
            return;
        }
    };
    for (org, key) in &report(&rows, secrets).unconfigured {
        tracing::error!(
            org = %org,
            key_id = %key,
            "the stripe tokens of organization {org} are sealed with key id {key}, which is not configured: add that key to ROONY_SECRETS_KEY (after the current one) or disconnect and reconnect the organization"
        );
    }
}

fn cli_actor() -> Actor {
    Actor {
        kind: "cli",
        id: "roony-secrets".into(),
        name: "roony secrets".into(),
        request_id: None,
    }
}

async fn open(args: &DbArgs) -> Result<ControlDb, String> {
    let mut config = super::ControlConfig::sqlite_in(&args.data_dir);
    if let Some(url) = &args.database_url {
        config.database_url = url.clone();
    }
    super::open(&config).await.map_err(|e| e.to_string())
}

/// Opens a value with any configured key and seals it with the current one.
fn reseal_value(
    secrets: &SecretBox,
    org_id: &str,
    field: &str,
    sealed: Option<&String>,
) -> Result<Option<String>, String> {
    let Some(sealed) = sealed else {
        return Ok(None);
    };
    let aad = super::connect::aad(org_id, field);
    let plain = secrets
        .open(sealed, &aad)
        .map_err(|e| format!("the {field} of organization {org_id} cannot be opened: {e}"))?;
    secrets
        .seal(&plain, &aad)
        .map(Some)
        .map_err(|e| e.to_string())
}

/// Runs a `secrets` command: `Ok(exit code)`, or the message of an error (printed by the
/// caller).
pub async fn run(command: &SecretsCommand) -> Result<u8, String> {
    match command {
        SecretsCommand::Status(args) => {
            let secrets = args.secrets()?;
            let db = open(&args.db).await?;
            let rows = db.sealed_stripe_tokens().await.map_err(|e| e.to_string());
            db.close().await;
            let r = report(&rows?, secrets.as_ref());
            if r.configured.is_empty() {
                println!("configured keys: none (ROONY_SECRETS_KEY or --secrets-key-file)");
            } else {
                let list: Vec<String> = r
                    .configured
                    .iter()
                    .enumerate()
                    .map(|(i, k)| {
                        if i == 0 {
                            format!("{k} (current)")
                        } else {
                            k.clone()
                        }
                    })
                    .collect();
                println!("configured keys: {}", list.join(", "));
            }
            for k in &r.configured {
                println!(
                    "key {k}: {} row(s)",
                    r.rows_by_key.get(k).copied().unwrap_or(0)
                );
            }
            for (k, n) in &r.rows_by_key {
                if !r.configured.contains(k) {
                    println!("key {k} (not configured): {n} row(s)");
                }
            }
            for (org, k) in &r.unconfigured {
                println!("not configured: organization {org} is sealed with key {k}");
            }
            Ok(if r.unconfigured.is_empty() { 0 } else { 2 })
        }
        SecretsCommand::Reseal(args) => {
            let secrets = args
                .secrets()?
                .ok_or("no secrets key is configured (ROONY_SECRETS_KEY or --secrets-key-file)")?;
            let current = secrets.current_key_id().to_string();
            let db = open(&args.db).await?;
            let result = async {
                let rows = db.sealed_stripe_tokens().await.map_err(|e| e.to_string())?;
                let mut resealed = Vec::new();
                for row in rows {
                    if row_key_ids(&row) == [current.clone()] {
                        continue;
                    }
                    resealed.push(ResealedRow {
                        access_token: reseal_value(
                            &secrets,
                            &row.org_id,
                            "access_token",
                            row.access_token.as_ref(),
                        )?,
                        refresh_token: reseal_value(
                            &secrets,
                            &row.org_id,
                            "refresh_token",
                            row.refresh_token.as_ref(),
                        )?,
                        key_id: current.clone(),
                        old: row,
                    });
                }
                if resealed.is_empty() {
                    println!("nothing to reseal: every stored token is sealed with {current}");
                    return Ok(());
                }
                db.reseal_stripe_tokens(&resealed, &cli_actor(), super::unix_now())
                    .await
                    .map_err(|e| e.to_string())?;
                println!("resealed {} row(s) with key {current}", resealed.len());
                Ok::<(), String>(())
            }
            .await;
            db.close().await;
            result.map(|()| 0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::secrets::SecretKey;

    fn row(org: &str, access: Option<&str>, refresh: Option<&str>) -> SealedRow {
        SealedRow {
            org_id: org.into(),
            key_id: None,
            access_token: access.map(str::to_string),
            refresh_token: refresh.map(str::to_string),
        }
    }

    #[test]
    fn reports_rows_per_key_and_unconfigured_ones() {
        let secrets = SecretBox::new(
            SecretKey::new("k2", [2; 32]).unwrap(),
            vec![SecretKey::new("k1", [1; 32]).unwrap()],
        );
        let rows = vec![
            row("org_a", Some("v1:k1:n:c"), Some("v1:k1:n:c")),
            row("org_b", Some("v1:k2:n:c"), Some("v1:k1:n:c")),
            row("org_c", Some("v1:k0:n:c"), None),
        ];
        let r = report(&rows, Some(&secrets));
        assert_eq!(r.configured, ["k2", "k1"]);
        assert_eq!(r.rows_by_key.get("k1"), Some(&2));
        assert_eq!(r.rows_by_key.get("k2"), Some(&1));
        assert_eq!(r.rows_by_key.get("k0"), Some(&1));
        assert_eq!(r.unconfigured, [("org_c".to_string(), "k0".to_string())]);
        // Without any key, everything is unconfigured.
        assert_eq!(report(&rows, None).unconfigured.len(), 4);
    }
}
