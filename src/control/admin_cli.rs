//! `roony admin …`: dashboard users from the command line (the way to create the first
//! admin besides the one-time setup link). Works on the control plane's database directly
//! (SQLite file or PostgreSQL), also while the control plane runs.

use std::io::BufRead;
use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::dashboard::auth;
use super::db::admin_users::Role;
use super::db::{Actor, ControlDb};

#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// Create a dashboard user. The password is read from the first line of standard input
    /// (or ROONY_ADMIN_PASSWORD); it is never a command-line argument.
    Create(CreateArgs),
    /// Set a dashboard user's password (from standard input or ROONY_ADMIN_PASSWORD); ends
    /// the user's sessions.
    SetPassword(SetPasswordArgs),
    /// List dashboard users.
    List(DbArgs),
}

#[derive(Args, Debug)]
pub struct DbArgs {
    /// The control plane's data directory (its default SQLite database).
    #[arg(long, env = "ROONY_DATA_DIR", default_value = ".roony/control-plane")]
    pub data_dir: PathBuf,
    /// `sqlite://…` or `postgres://…` (default: SQLite in --data-dir).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    #[command(flatten)]
    pub db: DbArgs,
    #[arg(long)]
    pub email: String,
    #[arg(long)]
    pub name: Option<String>,
    /// `admin` (everything) or `viewer` (reads only).
    #[arg(long, default_value = "admin")]
    pub role: String,
}

#[derive(Args, Debug)]
pub struct SetPasswordArgs {
    #[command(flatten)]
    pub db: DbArgs,
    #[arg(long)]
    pub email: String,
}

fn read_password() -> Result<String, String> {
    if let Ok(p) = std::env::var("ROONY_ADMIN_PASSWORD") {
        return Ok(p);
    }
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| format!("cannot read the password from standard input: {e}"))?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

async fn open(args: &DbArgs) -> Result<ControlDb, String> {
    let mut config = super::ControlConfig::sqlite_in(&args.data_dir);
    if let Some(url) = &args.database_url {
        config.database_url = url.clone();
    }
    super::open(&config).await.map_err(|e| e.to_string())
}

fn cli_actor() -> Actor {
    Actor {
        kind: "cli",
        id: "roony-admin".into(),
        name: "roony admin".into(),
        request_id: None,
    }
}

/// Runs an `admin` command; the message of an error is printed by the caller.
pub async fn run(command: &AdminCommand) -> Result<(), String> {
    match command {
        AdminCommand::Create(args) => {
            let role = Role::parse(&args.role)
                .ok_or_else(|| format!("unknown role {:?}: use admin or viewer", args.role))?;
            if !args.email.contains('@') {
                return Err(format!("{:?} is not an email address", args.email));
            }
            let password = read_password()?;
            auth::check_new_password(&password).map_err(|e| e.to_string())?;
            let hash = auth::hash_password(&password).map_err(|e| e.to_string())?;
            let db = open(&args.db).await?;
            let name = args
                .name
                .clone()
                .unwrap_or_else(|| args.email.split('@').next().unwrap_or("admin").to_string());
            let user = db
                .create_admin_user(
                    &args.email,
                    &name,
                    role,
                    &hash,
                    &cli_actor(),
                    super::unix_now(),
                )
                .await
                .map_err(|e| e.to_string())?;
            db.close().await;
            println!(
                "created {} ({}) with role {}",
                user.email,
                user.id,
                role.as_str()
            );
            Ok(())
        }
        AdminCommand::SetPassword(args) => {
            let password = read_password()?;
            auth::check_new_password(&password).map_err(|e| e.to_string())?;
            let hash = auth::hash_password(&password).map_err(|e| e.to_string())?;
            let db = open(&args.db).await?;
            let (user, _) = db
                .admin_user_for_login(&args.email)
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("no dashboard user with email {}", args.email))?;
            db.set_admin_password(&user.id, &hash, None, &cli_actor(), super::unix_now())
                .await
                .map_err(|e| e.to_string())?;
            db.close().await;
            println!("password of {} changed; its sessions ended", user.email);
            Ok(())
        }
        AdminCommand::List(args) => {
            let db = open(args).await?;
            let users = db.list_admin_users().await.map_err(|e| e.to_string())?;
            db.close().await;
            for u in users {
                let state = if u.disabled_at.is_some() {
                    "disabled"
                } else {
                    "enabled"
                };
                println!(
                    "{}\t{}\t{}\t{}\t{}",
                    u.id,
                    u.email,
                    u.name,
                    u.role.as_str(),
                    state
                );
            }
            Ok(())
        }
    }
}
