#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]
//! The dashboard under hostile or unlucky input, on SQLite and PostgreSQL: control
//! characters (NUL) in paths, queries and forms answer 4xx and write nothing; security
//! headers; HTML 404s; two admins publishing the same policy (the later draft is refused,
//! not silently overwriting); one-use forms (a refresh does not create a second agent or
//! rotate a key again); sign-in limits per client behind a trusted proxy, counted on
//! failures only, and audited; password-change limits; viewers verify the audit chain;
//! audit filters by date and actor; an admin resets another user's password.

mod common;

use std::future::Future;

use futures_util::FutureExt;
use sqlx::Row;

use roony::control::db::admin_users::Role;
use roony::control::db::{Actor, ControlDb};
use roony::control::{self, ControlConfig};

use common::dash::{Dash, PASSWORD, now};
use common::db::{Kind, TestDb, on_both, serve};

const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef";

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
        "dashboard hardening tests is SKIPPED (CI sets postgres://postgres@127.0.0.1:5432/test)",
    )
    .await
    else {
        return;
    };
    let mut config = ControlConfig::sqlite_in(std::path::Path::new("/nonexistent"));
    config.database_url = test_db.url.clone();
    config.bootstrap_admin_token = Some(ADMIN_TOKEN.into());
    config.bootstrap_admin_name = "test-admin".into();
    // The test client connects from 127.0.0.1: as a trusted proxy, its X-Forwarded-For
    // names the client.
    config.trusted_proxies = roony::ratelimit::TrustedProxies::parse("127.0.0.1").unwrap();
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
    control_characters_refused,
    headers_and_not_found,
    concurrent_policy_edits,
    one_use_forms,
    sign_in_limits_behind_a_proxy,
    password_change_limited,
    audit_for_viewers_and_filters,
    admin_resets_a_password,
);

async fn project(db: &ControlDb, name: &str) -> String {
    let org = db.ensure_default_org(now()).await.unwrap();
    db.create_project(&org.id, name, &Actor::system(), now())
        .await
        .unwrap()
        .id
}

async fn count(db: &ControlDb, sql: &'static str) -> i64 {
    sqlx::query(sql)
        .fetch_one(db.pool())
        .await
        .unwrap()
        .try_get::<i64, _>(0)
        .unwrap()
}

async fn control_characters_refused(ctx: Ctx) {
    let mut d = Dash::signed_in(&ctx.db, &ctx.base, "ops@example.com", Role::Admin).await;
    let project = project(&ctx.db, "p").await;
    // Paths and queries of the dashboard: 400 invalid_characters, never a 5xx.
    for path in [
        "/agents/%00",
        "/transactions/%00",
        "/transactions?agent=%00",
        "/transactions?merchant=a%00b",
        "/audit?target_id=%00",
        "/audit?actor_id=x%0Ay",
        "/agents/agt%00x/policy",
        "/discrepancies?agent=%00",
    ] {
        let p = d.get(path).await;
        assert_eq!(p.status, 400, "{path}: {}", p.body);
        assert!(p.body.contains("invalid_characters"), "{path}: {}", p.body);
        assert!(p.content_type.starts_with("text/html"), "{path}");
    }
    // The admin API: the same code in its JSON error shape.
    let http = reqwest::Client::new();
    for path in [
        "/api/admin/v1/agents/%00",
        "/api/admin/v1/intents?agent_id=%00",
    ] {
        let r = http
            .get(format!("{}{path}", ctx.base))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{path}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_characters", "{path}");
    }
    // A form field with a NUL: refused, nothing written.
    let agents_before = count(&ctx.db, "SELECT COUNT(*) FROM agents").await;
    let p = d
        .post(
            "/agents",
            &[("name", "evil\0agent"), ("project_id", &project)],
        )
        .await;
    assert_eq!(p.status, 400, "{}", p.body);
    assert!(p.body.contains("invalid_characters"));
    assert_eq!(
        count(&ctx.db, "SELECT COUNT(*) FROM agents").await,
        agents_before
    );
    // Line breaks in a text field are fine (a policy document spans lines).
    let p = d
        .post(
            "/agents",
            &[
                ("name", "multi line"),
                ("project_id", &project),
                ("policy", "{\r\n  \"currency\": \"USD\"\r\n}"),
            ],
        )
        .await;
    assert_eq!(p.status, 200, "{}", p.body);
    // A sign-in with a NUL in the e-mail is a plain refusal, not an outage.
    let mut anon = Dash::new(&ctx.base);
    let p = anon.login("ops\0@example.com", PASSWORD).await;
    assert_eq!(p.status, 401, "{}", p.body);
}

async fn headers_and_not_found(ctx: Ctx) {
    let mut d = Dash::signed_in(&ctx.db, &ctx.base, "ops@example.com", Role::Admin).await;
    let r = d
        .client
        .get(format!("{}/", ctx.base))
        .header(
            "cookie",
            format!(
                "roony_session={}",
                d.jar.iter().find(|(k, _)| k == "roony_session").unwrap().1
            ),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let h = r.headers();
    let csp = h["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert_eq!(h["x-frame-options"], "DENY");
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["referrer-policy"], "same-origin");
    assert_eq!(h["cache-control"], "no-store");
    // The session cookie is Lax: Stripe's OAuth redirect back is a cross-site navigation.
    let mut fresh = Dash::new(&ctx.base);
    let p = fresh.login("ops@example.com", PASSWORD).await;
    let cookie = p
        .cookies
        .iter()
        .find(|c| c.starts_with("roony_session="))
        .unwrap();
    assert!(cookie.contains("SameSite=Lax"), "{cookie}");
    // Assets keep their own caching.
    let p = d.get("/assets/app.css").await;
    assert_eq!(p.status, 200);
    // Unknown pages: an HTML page; unknown API paths: JSON.
    let p = d.get("/no/such/page").await;
    assert_eq!(p.status, 404);
    assert!(
        p.content_type.starts_with("text/html"),
        "{}",
        p.content_type
    );
    assert!(p.body.contains("there is no such page"));
    let p = d.get("/api/admin/v1/nothing-here").await;
    assert_eq!(p.status, 404);
    assert!(p.content_type.starts_with("application/json"));
    // The sign-in page warns when the browser is on plain HTTP at a remote address (its
    // Secure cookies would be dropped), not on loopback nor behind TLS.
    let get_login = |host: &'static str, proto: Option<&'static str>| {
        let mut req = reqwest::Client::new()
            .get(format!("{}/login", ctx.base))
            .header("host", host);
        if let Some(p) = proto {
            req = req.header("x-forwarded-proto", p);
        }
        async move { req.send().await.unwrap().text().await.unwrap() }
    };
    assert!(
        get_login("roony.example.com", None)
            .await
            .contains("plain-http-warning")
    );
    assert!(
        !get_login("roony.example.com", Some("https"))
            .await
            .contains("plain-http-warning")
    );
    assert!(
        !get_login("127.0.0.1:8788", None)
            .await
            .contains("plain-http-warning")
    );
}

fn attr_of(body: &str, marker: &str, name: &str) -> String {
    let at = body
        .find(marker)
        .unwrap_or_else(|| panic!("{marker} not in:\n{body}"));
    let tag_end = at + body[at..].find('>').unwrap();
    let tag_start = body[..at].rfind('<').unwrap();
    let tag = &body[tag_start..tag_end];
    let key = format!("{name}=\"");
    let v = tag
        .find(&key)
        .unwrap_or_else(|| panic!("{name} not in {tag}"))
        + key.len();
    tag[v..v + tag[v..].find('"').unwrap()].to_string()
}

/// The value of the hidden input `name` in `body`.
fn hidden(body: &str, name: &str) -> String {
    attr_of(body, &format!("name=\"{name}\""), "value")
}

async fn concurrent_policy_edits(ctx: Ctx) {
    let project = project(&ctx.db, "p").await;
    let key = roony::auth::generate();
    ctx.db
        .create_agent(&project, Some("agt_x"), "x", &key, &Actor::system(), now())
        .await
        .unwrap();
    ctx.db
        .put_policy(
            "agt_x",
            r#"{"currency":"USD","max_per_transaction":1000}"#,
            &Actor::system(),
            now(),
        )
        .await
        .unwrap();
    let mut alice = Dash::signed_in(&ctx.db, &ctx.base, "alice@example.com", Role::Admin).await;
    let mut bob = Dash::signed_in(&ctx.db, &ctx.base, "bob@example.com", Role::Admin).await;
    // Both open the editor at revision 1.
    let a_page = alice.get("/agents/agt_x/policy").await;
    let b_page = bob.get("/agents/agt_x/policy").await;
    assert_eq!(hidden(&a_page.body, "base_revision"), "1");
    assert_eq!(hidden(&b_page.body, "base_revision"), "1");
    // Alice publishes first.
    let p = alice
        .post(
            "/agents/agt_x/policy",
            &[
                ("policy", r#"{"currency":"USD","max_per_transaction":2000}"#),
                ("base_revision", "1"),
            ],
        )
        .await;
    assert_eq!(p.status, 303, "{}", p.body);
    // Bob's draft was based on revision 1: refused with the draft kept, nothing written.
    let bob_draft = r#"{"currency":"USD","max_per_transaction":5000}"#;
    let p = bob
        .post(
            "/agents/agt_x/policy",
            &[("policy", bob_draft), ("base_revision", "1")],
        )
        .await;
    assert_eq!(p.status, 409, "{}", p.body);
    assert_eq!(
        attr_of(&p.body, "id=\"policy-conflict\"", "data-current"),
        "2"
    );
    assert!(p.body.contains("5000"), "the draft is kept");
    // The page offers the diff of what changed, and the form is now based on revision 2.
    assert!(p.body.contains("/agents/agt_x/policy/diff?from=1&amp;to=2"));
    assert_eq!(hidden(&p.body, "base_revision"), "2");
    let current = ctx.db.get_policy("agt_x").await.unwrap();
    assert_eq!(current.revision, 2);
    assert_eq!(current.document["max_per_transaction"], 2000);
    // Publishing again (knowingly) replaces Alice's revision.
    let p = bob
        .post(
            "/agents/agt_x/policy",
            &[("policy", bob_draft), ("base_revision", "2")],
        )
        .await;
    assert_eq!(p.status, 303, "{}", p.body);
    let current = ctx.db.get_policy("agt_x").await.unwrap();
    assert_eq!(current.revision, 3);
    assert_eq!(current.document["max_per_transaction"], 5000);
    // The admin API maps the same refusal to 409 policy_changed (db-level check).
    let err = ctx
        .db
        .put_policy_based_on("agt_x", r#"{"currency":"USD"}"#, 1, &Actor::system(), now())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            roony::control::DbError::StalePolicy {
                base: 1,
                current: 3
            }
        ),
        "{err:?}"
    );
    // "Load into editor": an older revision as the draft, nothing published.
    let p = alice.get("/agents/agt_x/policy?revision=1").await;
    assert_eq!(p.status, 200);
    assert_eq!(attr_of(&p.body, "id=\"loaded-from\"", "data-revision"), "1");
    assert!(p.body.contains("1000"));
    assert_eq!(hidden(&p.body, "base_revision"), "3");
    assert_eq!(ctx.db.get_policy("agt_x").await.unwrap().revision, 3);
    assert_eq!(
        alice.get("/agents/agt_x/policy?revision=99").await.status,
        404
    );
    assert_eq!(
        alice.get("/agents/agt_x/policy?revision=x").await.status,
        400
    );
    // A dry run previews the document's changes (current → draft).
    let p = alice
        .post(
            "/agents/agt_x/policy/dry-run",
            &[
                ("policy", r#"{"currency":"USD","max_per_transaction":700}"#),
                ("base_revision", "3"),
            ],
        )
        .await;
    assert_eq!(p.status, 200, "{}", p.body);
    assert_eq!(attr_of(&p.body, "id=\"draft-diff\"", "data-added"), "1");
    assert_eq!(attr_of(&p.body, "id=\"draft-diff\"", "data-removed"), "1");
    // A diff link with an extreme revision number is a 404, never a panic.
    let p = alice
        .get("/agents/agt_x/policy/diff?to=-9223372036854775808")
        .await;
    assert_eq!(p.status, 404, "{}", p.body);
}

async fn one_use_forms(ctx: Ctx) {
    let project = project(&ctx.db, "p").await;
    let mut d = Dash::signed_in(&ctx.db, &ctx.base, "ops@example.com", Role::Admin).await;
    let page = d.get("/agents").await;
    let once = hidden(&page.body, "_once");
    let form = [
        ("name", "refreshed"),
        ("project_id", project.as_str()),
        ("policy", r#"{"currency":"USD","max_per_transaction":100}"#),
        ("_once", once.as_str()),
    ];
    let first = d.post("/agents", &form).await;
    assert_eq!(first.status, 200, "{}", first.body);
    assert!(first.body.contains("new-agent-key"));
    // The browser resubmits the same form (refresh): nothing is created twice.
    let again = d.post("/agents", &form).await;
    assert_eq!(again.status, 409, "{}", again.body);
    assert!(again.body.contains("form_already_submitted"));
    assert!(!again.body.contains("new-agent-key"));
    let n = count(
        &ctx.db,
        "SELECT COUNT(*) FROM agents WHERE name = 'refreshed'",
    )
    .await;
    assert_eq!(n, 1);
    // The agent and its first policy revision were written together.
    let id: String = sqlx::query("SELECT id FROM agents WHERE name = 'refreshed'")
        .fetch_one(ctx.db.pool())
        .await
        .unwrap()
        .try_get("id")
        .unwrap();
    assert_eq!(ctx.db.get_policy(&id).await.unwrap().revision, 1);

    // Rotating a key twice with the same form: the second is refused, the first key stays.
    let page = d.get(&format!("/agents/{id}")).await;
    let once = hidden(&page.body, "_once");
    let first = d
        .post(&format!("/agents/{id}/rotate-key"), &[("_once", &once)])
        .await;
    assert_eq!(first.status, 200, "{}", first.body);
    let key_id = attr_of(&first.body, "id=\"new-agent-key\"", "data-key-id");
    let again = d
        .post(&format!("/agents/{id}/rotate-key"), &[("_once", &once)])
        .await;
    assert_eq!(again.status, 409, "{}", again.body);
    let active: Vec<String> =
        sqlx::query("SELECT key_id FROM agent_keys WHERE agent_id = $1 AND revoked_at IS NULL")
            .bind(id.clone())
            .fetch_all(ctx.db.pool())
            .await
            .unwrap()
            .iter()
            .map(|r| r.try_get("key_id").unwrap())
            .collect();
    assert_eq!(active, vec![key_id]);
    // A fresh page has a fresh nonce: rotating again works.
    let page = d.get(&format!("/agents/{id}")).await;
    let once = hidden(&page.body, "_once");
    let p = d
        .post(&format!("/agents/{id}/rotate-key"), &[("_once", &once)])
        .await;
    assert_eq!(p.status, 200, "{}", p.body);
}

/// Signs in from `client` (the X-Forwarded-For a trusted proxy sends).
async fn login_from(base: &str, client: &str, email: &str, password: &str) -> u16 {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let form = http
        .get(format!("{base}/login"))
        .header("x-forwarded-for", client)
        .send()
        .await
        .unwrap();
    let nonce = form
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|c| c.strip_prefix("roony_login_csrf="))
        .map(|c| c.split(';').next().unwrap().to_string())
        .unwrap();
    http.post(format!("{base}/login"))
        .header("x-forwarded-for", client)
        .header("cookie", format!("roony_login_csrf={nonce}"))
        .form(&[
            ("email", email),
            ("password", password),
            ("_login_csrf", &nonce),
        ])
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn sign_in_limits_behind_a_proxy(ctx: Ctx) {
    common::dash::create_user(&ctx.db, "busy@example.com", Role::Admin).await;
    common::dash::create_user(&ctx.db, "target@example.com", Role::Admin).await;
    // Twelve users behind the same proxy sign in: each client has its own budget (the
    // proxy's address would have allowed only ten), and successes cost the e-mail nothing.
    for i in 0..12 {
        let status = login_from(
            &ctx.base,
            &format!("203.0.113.{i}"),
            "busy@example.com",
            PASSWORD,
        )
        .await;
        assert_eq!(status, 303, "sign-in {i}");
    }
    // Guessing one account's password from many addresses: after ten failures the e-mail
    // is limited, even from a fresh address and with the right password.
    for i in 0..10 {
        let status = login_from(
            &ctx.base,
            &format!("198.51.100.{i}"),
            "target@example.com",
            "wrong password!!",
        )
        .await;
        assert_eq!(status, 401, "guess {i}");
    }
    let status = login_from(&ctx.base, "198.51.100.200", "target@example.com", PASSWORD).await;
    assert_eq!(status, 429);
    // Other accounts are not affected.
    assert_eq!(
        login_from(&ctx.base, "198.51.100.201", "busy@example.com", PASSWORD).await,
        303
    );
    // The failures are in the audit trail with the client's address, never the password.
    let rows = sqlx::query(
        "SELECT actor_id, outcome, details FROM audit_events WHERE action = 'admin_session.sign_in_failed' ORDER BY created_at, id",
    )
    .fetch_all(ctx.db.pool())
    .await
    .unwrap();
    assert_eq!(
        rows.len(),
        11,
        "ten wrong passwords and one limited attempt"
    );
    for r in &rows {
        let details: String = r.try_get("details").unwrap();
        assert!(!details.contains("wrong password"), "{details}");
        assert!(!details.contains(PASSWORD), "{details}");
        assert!(details.contains("target@example.com"), "{details}");
        assert_eq!(r.try_get::<String, _>("outcome").unwrap(), "failure");
        assert!(
            r.try_get::<String, _>("actor_id")
                .unwrap()
                .starts_with("198.51.100.")
        );
    }
    let last: String = rows.last().unwrap().try_get("details").unwrap();
    assert!(last.contains("rate_limited"), "{last}");
    // The audit page finds them by action.
    let mut admin = Dash::new(&ctx.base);
    assert_eq!(admin.login("busy@example.com", PASSWORD).await.status, 303);
    let p = admin.get("/audit?action=admin_session.sign_in").await;
    assert_eq!(p.status, 200);
    assert!(p.body.contains("admin_session.sign_in_failed"));
}

async fn password_change_limited(ctx: Ctx) {
    let mut d = Dash::signed_in(&ctx.db, &ctx.base, "viewer@example.com", Role::Viewer).await;
    for i in 0..10 {
        let p = d
            .post(
                "/settings/password",
                &[
                    ("current", "not my password"),
                    ("new", "a brand new password"),
                    ("confirm", "a brand new password"),
                ],
            )
            .await;
        assert_eq!(p.status, 422, "attempt {i}: {}", p.body);
    }
    let p = d
        .post(
            "/settings/password",
            &[
                ("current", PASSWORD),
                ("new", "a brand new password"),
                ("confirm", "a brand new password"),
            ],
        )
        .await;
    assert_eq!(p.status, 429, "{}", p.body);
    assert!(p.body.contains("too many wrong passwords"));
    // Wrong current passwords and wrong sign-in passwords share the e-mail's budget:
    // guessing through the settings form is no faster than through the sign-in form.
    let mut again = Dash::new(&ctx.base);
    assert_eq!(
        again.login("viewer@example.com", PASSWORD).await.status,
        429
    );
    // Nothing changed: the password in the database is still the old one.
    let (_, hash) = ctx
        .db
        .admin_user_for_login("viewer@example.com")
        .await
        .unwrap()
        .unwrap();
    assert!(roony::control::dashboard::auth::verify_password(
        PASSWORD,
        &hash.unwrap()
    ));
}

async fn audit_for_viewers_and_filters(ctx: Ctx) {
    // Only a viewer exists: the setup link must stay available (no admin yet).
    common::dash::create_user(&ctx.db, "first-viewer@example.com", Role::Viewer).await;
    assert_eq!(ctx.db.count_admin_users().await.unwrap(), 0);
    let mut viewer = Dash::new(&ctx.base);
    assert_eq!(
        viewer
            .login("first-viewer@example.com", PASSWORD)
            .await
            .status,
        303
    );
    // Verifying the chain reads only: viewers may.
    let page = viewer.get("/audit").await;
    assert!(page.body.contains("id=\"verify-chain\""));
    let p = viewer.post("/audit/verify", &[]).await;
    assert_eq!(p.status, 200, "{}", p.body);
    assert_eq!(
        attr_of(&p.body, "id=\"verify-result\"", "data-result"),
        "ok"
    );
    // Filters: a day long ago has nothing; today has the sign-in; bad dates are 400.
    let p = viewer.get("/audit?from=2001-01-01&to=2001-01-02").await;
    assert_eq!(p.status, 200);
    assert!(p.body.contains("no-audit-events"));
    let today = {
        let days = now() / 86_400;
        let (y, m, d) = roony::domain::time::civil_from_days(days);
        format!("{y:04}-{m:02}-{d:02}")
    };
    let p = viewer
        .get(&format!(
            "/audit?from={today}&to={today}&action=admin_session.create"
        ))
        .await;
    assert_eq!(p.status, 200);
    assert!(p.body.contains("data-action=\"admin_session.create\""));
    let user_id = viewer_id(&ctx.db, "first-viewer@example.com").await;
    let p = viewer.get(&format!("/audit?actor_id={user_id}")).await;
    assert!(p.body.contains("data-action=\"admin_session.create\""));
    let p = viewer.get("/audit?actor_id=nobody").await;
    assert!(p.body.contains("no-audit-events"));
    let p = viewer.get("/audit?from=2026-02-30").await;
    assert_eq!(p.status, 400);
    assert!(p.body.contains("from must be a date"));
}

async fn viewer_id(db: &ControlDb, email: &str) -> String {
    db.list_admin_users()
        .await
        .unwrap()
        .into_iter()
        .find(|u| u.email == email)
        .unwrap()
        .id
}

async fn admin_resets_a_password(ctx: Ctx) {
    let mut admin = Dash::signed_in(&ctx.db, &ctx.base, "admin@example.com", Role::Admin).await;
    let mut forgetful =
        Dash::signed_in(&ctx.db, &ctx.base, "forgetful@example.com", Role::Viewer).await;
    let id = viewer_id(&ctx.db, "forgetful@example.com").await;
    // Too short: refused, nothing changed.
    let p = admin
        .post(
            &format!("/settings/users/{id}/password"),
            &[("password", "short")],
        )
        .await;
    assert_eq!(p.status, 422, "{}", p.body);
    assert_eq!(forgetful.get("/settings").await.status, 200);
    // Viewers cannot reset anyone's password.
    let admin_id = viewer_id(&ctx.db, "admin@example.com").await;
    let p = forgetful
        .post(
            &format!("/settings/users/{admin_id}/password"),
            &[("password", "a takeover password")],
        )
        .await;
    assert_eq!(p.status, 403);
    // Set: the user's sessions end; the new password works, the old one does not.
    let p = admin
        .post(
            &format!("/settings/users/{id}/password"),
            &[("password", "a temporary password")],
        )
        .await;
    assert_eq!(p.status, 303, "{}", p.body);
    let p = forgetful.get("/settings").await;
    assert_eq!(p.status, 303);
    assert!(p.location.unwrap().starts_with("/login"));
    let mut again = Dash::new(&ctx.base);
    assert_eq!(
        again.login("forgetful@example.com", PASSWORD).await.status,
        401
    );
    assert_eq!(
        again
            .login("forgetful@example.com", "a temporary password")
            .await
            .status,
        303
    );
    // One's own password goes through the current-password form instead.
    let p = admin
        .post(
            &format!("/settings/users/{admin_id}/password"),
            &[("password", "another long password")],
        )
        .await;
    assert_eq!(p.status, 422);
}
