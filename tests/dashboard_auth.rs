#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]
//! Dashboard sign-in: the first admin (one-time setup link of the real binary, and
//! `roony admin create` with the password on stdin), argon2id hashes at rest, cookie
//! attributes, CSRF on the sign-in form and on every change, safe `next` redirects,
//! sessions ended by sign-out and by a password change — on SQLite and PostgreSQL.

mod common;

use std::future::Future;
use std::io::Write;
use std::process::{Command, Stdio};

use futures_util::FutureExt;
use roony::control::db::ControlDb;
use roony::control::db::admin_users::Role;
use roony::control::{self, ControlConfig};
use sqlx::Row;

use common::dash::{Dash, PASSWORD};
use common::db::{Kind, TestDb, on_both, serve};

struct Ctx {
    db: ControlDb,
    base: String,
}

async fn run<F, Fut>(kind: Kind, scenario: F)
where
    F: FnOnce(Ctx) -> Fut,
    Fut: Future<Output = ()>,
{
    let Some(test_db) = TestDb::new(
        kind,
        "dashboard sign-in tests is SKIPPED (CI sets postgres://postgres@127.0.0.1:5432/test)",
    )
    .await
    else {
        return;
    };
    let mut config = ControlConfig::sqlite_in(std::path::Path::new("/nonexistent"));
    config.database_url = test_db.url.clone();
    let db = control::open(&config).await.unwrap();
    let (base, stop_tx, server) = serve(&db).await;
    let outcome = std::panic::AssertUnwindSafe(scenario(Ctx {
        db: db.clone(),
        base,
    }))
    .catch_unwind()
    .await;
    let _ = stop_tx.send(());
    let _ = server.await;
    db.close().await;
    test_db.drop_schema().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

on_both!(
    hashes_cookies_and_csrf,
    sessions_end,
    open_redirects_refused
);

async fn hashes_cookies_and_csrf(ctx: Ctx) {
    let mut d = Dash::signed_in(&ctx.db, &ctx.base, "Ops@Example.com", Role::Admin).await;
    // Stored as an argon2id PHC string, the email normalized.
    let row = sqlx::query("SELECT email, password_hash FROM admin_users")
        .fetch_one(ctx.db.pool())
        .await
        .unwrap();
    let email: String = row.try_get("email").unwrap();
    let hash: String = row.try_get("password_hash").unwrap();
    assert_eq!(email, "ops@example.com");
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    assert!(!hash.contains(PASSWORD));

    // The session cookie: HttpOnly, SameSite=Lax, and Secure unless the dashboard is
    // reached over plain HTTP on a loopback address.
    let mut fresh = Dash::new(&ctx.base);
    let page = fresh.login("ops@example.com", PASSWORD).await;
    assert_eq!(page.status, 303);
    let cookie = page
        .cookies
        .iter()
        .find(|c| c.starts_with("roony_session="))
        .unwrap();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Lax"));
    let resp = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(format!("{}/login", ctx.base))
        .header("x-forwarded-proto", "https")
        .send()
        .await
        .unwrap();
    let login_cookie = resp.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(login_cookie.contains("; Secure"), "{login_cookie}");

    // The sign-in form's double-submit token is required.
    let mut no_nonce = Dash::new(&ctx.base);
    let page = no_nonce
        .post_raw(
            "/login",
            &[("email", "ops@example.com"), ("password", PASSWORD)],
        )
        .await;
    assert_eq!(page.status, 403, "{}", page.body);
    assert!(no_nonce.jar.iter().all(|(k, _)| k != "roony_session"));

    // A change without the CSRF token, with a wrong one, or from another origin: refused,
    // nothing written.
    let before: i64 = sqlx::query("SELECT COUNT(*) AS n FROM admin_users")
        .fetch_one(ctx.db.pool())
        .await
        .unwrap()
        .try_get("n")
        .unwrap();
    let form = [
        ("email", "new@example.com"),
        ("name", "New"),
        ("role", "viewer"),
        ("password", "another long password"),
    ];
    let page = d.post_raw("/settings/users", &form).await;
    assert_eq!(page.status, 403, "{}", page.body);
    assert!(page.body.contains("csrf_failed"));
    let mut wrong = form.to_vec();
    wrong.push(("_csrf", "0000"));
    let page = d.post_raw("/settings/users", &wrong).await;
    assert_eq!(page.status, 403);
    let csrf = d.csrf();
    let mut with_csrf = form.to_vec();
    with_csrf.push(("_csrf", &csrf));
    let resp = d
        .client
        .post(format!("{}/settings/users", ctx.base))
        .header("cookie", format!("roony_session={}", session_cookie(&d)))
        .header("origin", "http://evil.example")
        .form(&with_csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403);
    let after: i64 = sqlx::query("SELECT COUNT(*) AS n FROM admin_users")
        .fetch_one(ctx.db.pool())
        .await
        .unwrap()
        .try_get("n")
        .unwrap();
    assert_eq!(before, after, "a refused form wrote nothing");
}

fn session_cookie(d: &Dash) -> String {
    d.jar
        .iter()
        .find(|(k, _)| k == "roony_session")
        .map(|(_, v)| v.clone())
        .unwrap()
}

async fn sessions_end(ctx: Ctx) {
    let mut d = Dash::signed_in(&ctx.db, &ctx.base, "a@example.com", Role::Admin).await;
    let mut other = Dash::new(&ctx.base);
    assert_eq!(other.login("a@example.com", PASSWORD).await.status, 303);
    assert_eq!(d.get("/").await.status, 200);
    assert_eq!(other.get("/").await.status, 200);

    // Sign-out ends this session only; its cookie no longer works.
    let old = session_cookie(&d);
    let page = d.post("/logout", &[]).await;
    assert_eq!(page.status, 303);
    assert_eq!(page.location.as_deref(), Some("/login"));
    let mut replay = Dash::new(&ctx.base);
    replay.jar.push(("roony_session".into(), old));
    let page = replay.get("/").await;
    assert_eq!(page.status, 303);
    assert!(page.location.unwrap().starts_with("/login"));
    assert_eq!(other.get("/").await.status, 200);

    // A password change (here from the command line's path) ends every session.
    let (user, _) = ctx
        .db
        .admin_user_for_login("a@example.com")
        .await
        .unwrap()
        .unwrap();
    let hash = roony::control::dashboard::auth::hash_password("a brand new password").unwrap();
    ctx.db
        .set_admin_password(
            &user.id,
            &hash,
            None,
            &roony::control::db::Actor::system(),
            common::dash::now(),
        )
        .await
        .unwrap();
    assert_eq!(other.get("/").await.status, 303);
    assert_eq!(other.login("a@example.com", PASSWORD).await.status, 401);
    assert_eq!(
        other
            .login("a@example.com", "a brand new password")
            .await
            .status,
        303
    );

    // A disabled user cannot sign in (and looks like a wrong password).
    let admin2 = common::dash::create_user(&ctx.db, "b@example.com", Role::Admin).await;
    ctx.db
        .update_admin_user(
            &admin2.id,
            Role::Admin,
            true,
            &roony::control::db::Actor::system(),
            common::dash::now(),
        )
        .await
        .unwrap();
    let mut b = Dash::new(&ctx.base);
    let page = b.login("b@example.com", PASSWORD).await;
    assert_eq!(page.status, 401);
    assert!(page.body.contains("the email or password is not correct"));
}

async fn open_redirects_refused(ctx: Ctx) {
    common::dash::create_user(&ctx.db, "r@example.com", Role::Viewer).await;
    for (next, expected) in [
        (
            "/transactions?status=approved",
            "/transactions?status=approved",
        ),
        ("//evil.example/x", "/"),
        ("https://evil.example/", "/"),
        ("/\\evil.example", "/"),
        // Browsers drop tabs and newlines from URLs: "/\t/evil" would be "//evil".
        ("/\t/evil.example", "/"),
        ("/\n/evil.example", "/"),
        ("/a b", "/"),
    ] {
        let mut d = Dash::new(&ctx.base);
        let form = d.get("/login").await;
        assert_eq!(form.status, 200);
        let nonce = d
            .jar
            .iter()
            .find(|(k, _)| k == "roony_login_csrf")
            .unwrap()
            .1
            .clone();
        let page = d
            .post_raw(
                "/login",
                &[
                    ("email", "r@example.com"),
                    ("password", PASSWORD),
                    ("_login_csrf", &nonce),
                    ("next", next),
                ],
            )
            .await;
        assert_eq!(page.status, 303, "{next}");
        assert_eq!(page.location.as_deref(), Some(expected), "{next}");
    }
}

/// The real binary: a one-time setup link while no admin exists, then `roony admin create`
/// reading the password from stdin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_admin_from_setup_link_and_cli() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("cp.log");
    let mut cp = common::process::Child(
        Command::new(env!("CARGO_BIN_EXE_roony"))
            .args(["control-plane", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("cp"))
            .env_remove("DATABASE_URL")
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .spawn()
            .unwrap(),
    );
    let base = common::process::url_after(&common::process::wait_for(
        &log,
        "control plane listening on",
    ));
    let line = common::process::wait_for(&log, "setup?token=");
    let link = line
        .split_whitespace()
        .find(|w| w.contains("/setup?token="))
        .unwrap()
        .to_string();
    let token = link.split("token=").nth(1).unwrap().to_string();
    let mut d = Dash::new(&base);
    // A wrong token shows nothing.
    assert_eq!(d.get("/setup?token=roony_setup_wrong").await.status, 404);
    let page = d.get(&format!("/setup?token={token}")).await;
    assert_eq!(page.status, 200, "{}", page.body);
    // Too short a password: the form again, nothing created.
    let page = d
        .post_raw(
            "/setup",
            &[
                ("token", &token),
                ("email", "first@example.com"),
                ("name", "First"),
                ("password", "short"),
            ],
        )
        .await;
    assert_eq!(page.status, 422);
    assert!(page.body.contains("at least 12 characters"));
    let page = d
        .post_raw(
            "/setup",
            &[
                ("token", &token),
                ("email", "first@example.com"),
                ("name", "First"),
                ("password", PASSWORD),
            ],
        )
        .await;
    assert_eq!(page.status, 303, "{}", page.body);
    // The link is used up.
    assert_eq!(d.get(&format!("/setup?token={token}")).await.status, 404);
    assert_eq!(d.login("first@example.com", PASSWORD).await.status, 303);
    assert_eq!(d.get("/settings").await.status, 200);

    // `roony admin create`: the password from stdin; a viewer.
    let mut child = Command::new(env!("CARGO_BIN_EXE_roony"))
        .args([
            "admin",
            "create",
            "--email",
            "viewer@example.com",
            "--role",
            "viewer",
            "--data-dir",
        ])
        .arg(dir.path().join("cp"))
        .env_remove("DATABASE_URL")
        .env_remove("ROONY_ADMIN_PASSWORD")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "viewer password 123").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("role viewer"));
    let mut v = Dash::new(&base);
    assert_eq!(
        v.login("viewer@example.com", "viewer password 123")
            .await
            .status,
        303
    );
    let page = v.get("/settings").await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("data-role=\"viewer\""));
    // A viewer changes nothing.
    let page = v
        .post(
            "/settings/users",
            &[
                ("email", "x@example.com"),
                ("name", "X"),
                ("role", "admin"),
                ("password", "another long password"),
            ],
        )
        .await;
    assert_eq!(page.status, 403);
    // … but may change its own password (and stays signed in).
    let page = v
        .post(
            "/settings/password",
            &[
                ("current", "viewer password 123"),
                ("new", "viewer password 456"),
                ("confirm", "viewer password 456"),
            ],
        )
        .await;
    assert_eq!(page.status, 303, "{}", page.body);
    assert_eq!(v.get("/settings").await.status, 200);
    let mut v2 = Dash::new(&base);
    assert_eq!(
        v2.login("viewer@example.com", "viewer password 123")
            .await
            .status,
        401
    );
    assert_eq!(
        v2.login("viewer@example.com", "viewer password 456")
            .await
            .status,
        303
    );

    // Bad input to the command: a clear message and a non-zero exit.
    let out = Command::new(env!("CARGO_BIN_EXE_roony"))
        .args(["admin", "create", "--email", "y@example.com", "--data-dir"])
        .arg(dir.path().join("cp"))
        .env_remove("DATABASE_URL")
        .env("ROONY_ADMIN_PASSWORD", "short")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 12 characters"));
    let out = Command::new(env!("CARGO_BIN_EXE_roony"))
        .args([
            "admin",
            "create",
            "--email",
            "viewer@example.com",
            "--data-dir",
        ])
        .arg(dir.path().join("cp"))
        .env_remove("DATABASE_URL")
        .env("ROONY_ADMIN_PASSWORD", "long enough password")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("exists"));
    common::process::stop(&mut cp);
}
