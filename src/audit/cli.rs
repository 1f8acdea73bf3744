//! `roony audit verify`: checks a sidecar's or the control plane's audit chain end to end.
//!
//! Prints `ok: N events, head <hash>` (exit 0), or `broken at event #seq (id): reason`
//! (exit 1); errors (unreadable file, unreachable database) exit 2.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use super::{BrokenLink, VerifyReport};

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Verify an audit chain (a sidecar's `audit.redb`, or the control plane's database).
    /// The sidecar must be stopped (its file is locked while it runs).
    Verify(VerifyArgs),
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["data_dir", "database_url"])))]
pub struct VerifyArgs {
    /// A sidecar's data directory (verifies its `audit.redb`).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// The control plane's database (`sqlite://…` or `postgres://…`).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
}

/// What a verification found, or why it could not run.
pub type Outcome = Result<Result<VerifyReport, BrokenLink>, String>;

/// Verifies the chain `args` names.
pub async fn verify(args: &VerifyArgs) -> Outcome {
    if let Some(dir) = &args.data_dir {
        let path = dir.join(super::log::FILE_NAME);
        if !path.exists() {
            return Err(format!("no audit log at {}", path.display()));
        }
        return tokio::task::spawn_blocking(move || super::log::verify_file(&path))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string());
    }
    let Some(url) = &args.database_url else {
        return Err("give --data-dir or --database-url".into());
    };
    let db = crate::control::ControlDb::connect(url)
        .await
        .map_err(|e| e.to_string())?;
    let result = db.verify_audit_chain().await.map_err(|e| e.to_string());
    db.close().await;
    result
}

/// Runs `roony audit …`; the exit code says what was found.
pub async fn run(command: &AuditCommand) -> ExitCode {
    match command {
        AuditCommand::Verify(args) => match verify(args).await {
            Ok(Ok(report)) => {
                println!("ok: {} events, head {}", report.count, report.head);
                ExitCode::SUCCESS
            }
            Ok(Err(broken)) => {
                println!("{broken}");
                ExitCode::from(1)
            }
            Err(e) => {
                eprintln!("roony: audit verify: {e}");
                ExitCode::from(2)
            }
        },
    }
}
