#![allow(dead_code)]
//! The two databases every control-plane scenario runs on: SQLite (a temp file) and, when
//! `ROONY_TEST_DATABASE_URL` is set, PostgreSQL (a fresh schema per test, dropped
//! afterwards), plus serving the control plane on a loopback port and the `on_both!` macro
//! that makes a `sqlite` and a `postgres` test of each scenario.

use roony::control::db::ControlDb;
use roony::control::{self, ControlError};
use sqlx::Connection;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Sqlite,
    Postgres,
}

/// A served control plane's task.
pub type Server = tokio::task::JoinHandle<Result<(), ControlError>>;

/// Where a test's database lives, and how to drop it afterwards.
pub struct TestDb {
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    pg_schema: Option<(String, String)>,
}

impl TestDb {
    /// A fresh database of `kind`, or `None` (after a loud notice on stderr) for PostgreSQL
    /// when `ROONY_TEST_DATABASE_URL` is not set. `skipped` finishes the notice's sentence
    /// "the PostgreSQL leg of the …", e.g. "webhook tests is SKIPPED".
    pub async fn new(kind: Kind, skipped: &str) -> Option<TestDb> {
        match kind {
            Kind::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                Some(TestDb {
                    url: roony::control::db::default_sqlite_url(dir.path()),
                    _dir: Some(dir),
                    pg_schema: None,
                })
            }
            Kind::Postgres => {
                let Ok(base) = std::env::var("ROONY_TEST_DATABASE_URL") else {
                    // Straight to stderr, past the test harness's capture: a skip must be seen.
                    use std::io::Write;
                    let _ = writeln!(
                        std::io::stderr(),
                        "\n*** ROONY_TEST_DATABASE_URL is not set: the PostgreSQL leg of the \
                         {skipped} ***\n"
                    );
                    return None;
                };
                let schema = format!("t_{}", roony::service::ids::new_id("s").to_lowercase());
                let mut conn = sqlx::PgConnection::connect(&base).await.unwrap();
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
                    .execute(&mut conn)
                    .await
                    .unwrap();
                conn.close().await.unwrap();
                let sep = if base.contains('?') { '&' } else { '?' };
                Some(TestDb {
                    url: format!("{base}{sep}options=-c%20search_path%3D{schema}"),
                    _dir: None,
                    pg_schema: Some((base, schema)),
                })
            }
        }
    }

    /// Drops the PostgreSQL schema (the SQLite temp dir goes with `self`).
    pub async fn drop_schema(&self) {
        if let Some((base, schema)) = &self.pg_schema {
            let mut conn = sqlx::PgConnection::connect(base).await.unwrap();
            sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
                .execute(&mut conn)
                .await
                .unwrap();
            conn.close().await.unwrap();
        }
    }
}

/// Serves the control plane over `db` on 127.0.0.1:0: (base URL, stop, server task).
pub async fn serve(db: &ControlDb) -> (String, tokio::sync::oneshot::Sender<()>, Server) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(control::serve_db(db.clone(), listener, async move {
        let _ = stop_rx.await;
    }));
    (format!("http://{addr}"), stop_tx, server)
}

/// `on_both!(a, b)`: modules `a` and `b`, each with a `sqlite` and a `postgres` test
/// (multi-threaded runtime) calling `super::run(kind, super::a)` in the test file.
/// `on_both!(current_thread: a, b)`: the same on tokio's default (current-thread) runtime.
/// `on_both!(a: X, b: Y)`: calls `super::run(kind, super::Setup::X, super::a)`.
#[allow(unused_macros)]
macro_rules! on_both {
    (current_thread: $($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test]
                async fn sqlite() {
                    super::run($crate::common::db::Kind::Sqlite, super::$name).await;
                }
                #[tokio::test]
                async fn postgres() {
                    super::run($crate::common::db::Kind::Postgres, super::$name).await;
                }
            }
        )*
    };
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    super::run($crate::common::db::Kind::Sqlite, super::$name).await;
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    super::run($crate::common::db::Kind::Postgres, super::$name).await;
                }
            }
        )*
    };
    ($($name:ident: $setup:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    super::run(
                        $crate::common::db::Kind::Sqlite,
                        super::Setup::$setup,
                        super::$name,
                    )
                    .await;
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    super::run(
                        $crate::common::db::Kind::Postgres,
                        super::Setup::$setup,
                        super::$name,
                    )
                    .await;
                }
            }
        )*
    };
}
#[allow(unused_imports)]
pub(crate) use on_both;
