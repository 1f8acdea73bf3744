#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]
//! The dashboard's admin pages (overview, agents, discrepancies, audit log, settings),
//! driven like a browser without JavaScript: real sign-in, forms with CSRF tokens,
//! redirects looked at, not followed. Each scenario runs on SQLite and on PostgreSQL.

mod common;

use std::future::Future;

use futures_util::FutureExt;

use roony::control::db::admin_users::Role;
use roony::control::db::{Actor, ControlDb, DiscrepancyFilter};
use roony::control::model::{
    BudgetScope, MerchantData, NewIntent, StripeEventMeta, StripeTransaction,
};
use roony::control::{self, ControlConfig};
use roony::sync::wire;

use common::dash::{Dash, PASSWORD, now};
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
        "dashboard admin tests is SKIPPED (CI sets postgres://postgres@127.0.0.1:5432/test)",
    )
    .await
    else {
        return;
    };
    let mut config = ControlConfig::sqlite_in(std::path::Path::new("/nonexistent"));
    config.database_url = test_db.url.clone();
    config.bootstrap_admin_token = Some("test-admin-token-0123456789abcdef".into());
    config.bootstrap_admin_name = "test-admin".into();
    let db = control::open(&config).await.unwrap();
    let (base, stop_tx, server) = serve(&db).await;
    let ctx = Ctx {
        db: db.clone(),
        base,
    };
    let outcome = std::panic::AssertUnwindSafe(scenario(ctx))
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
    sign_in_and_out,
    login_rate_limit,
    overview_shows_spend,
    budgets_as_sidecars_enforce_them,
    agents_keys_freeze_budgets,
    viewers_and_csrf,
    settings_accounts_and_tokens,
    discrepancies_and_audit,
);

/// A project in the default organization.
async fn project(db: &ControlDb, name: &str) -> String {
    let org = db.ensure_default_org(now()).await.unwrap();
    db.create_project(&org.id, name, &Actor::system(), now())
        .await
        .unwrap()
        .id
}

/// An agent created directly in the database.
async fn agent(db: &ControlDb, project_id: &str, id: &str, name: &str) {
    let key = roony::auth::generate();
    db.create_agent(project_id, Some(id), name, &key, &Actor::system(), now())
        .await
        .unwrap();
}

/// The text of the element carrying `marker` (an attribute), up to its closing tag.
fn element_text(body: &str, marker: &str) -> String {
    let at = body
        .find(marker)
        .unwrap_or_else(|| panic!("{marker} not in page:\n{body}"));
    let rest = &body[at..];
    let start = rest.find('>').unwrap() + 1;
    let end = rest[start..].find('<').unwrap();
    rest[start..start + end].trim().to_string()
}

fn attr(body: &str, marker: &str, name: &str) -> String {
    let at = body.find(marker).unwrap();
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

/// Seeds an approved purchase `pur_<n>` of `agent` with card `ic_<n>` through a sidecar's
/// sync events, then a capture of `captured` USD minor units on it.
async fn purchase_with_capture(
    db: &ControlDb,
    project_id: &str,
    agent: &str,
    n: &str,
    captured: i64,
) {
    let token = format!("{}{n}0123456789abcdef", wire::SIDECAR_TOKEN_PREFIX);
    let key = roony::auth::from_plaintext(&token).unwrap();
    db.create_sidecar(
        project_id,
        &format!("edge-{n}"),
        &key,
        &Actor::system(),
        now(),
    )
    .await
    .unwrap();
    let sc = db.find_sidecar(&key.key_id).await.unwrap().unwrap();
    let intent = wire::IntentSnapshot {
        id: format!("pur_{n}"),
        agent_id: agent.into(),
        version: 2,
        status: "approved".into(),
        amount: 2_400,
        currency: "USD".into(),
        merchant_name: "Namecheap".into(),
        merchant_domain: Some("namecheap.com".into()),
        merchant_country: Some("US".into()),
        merchant_category: None,
        description: None,
        reserved: 2_500,
        expires_at: Some(now() + 3_600),
        decision: wire::DecisionSnapshot {
            id: format!("dec_{n}"),
            outcome: "approved".into(),
            reasons: vec!["within_policy".into()],
            messages: vec![],
            decided_at: now(),
        },
        risk_score: None,
        risk_signals: vec![],
        status_reason: None,
        card: Some(wire::CardSnapshot {
            stripe_card_id: format!("ic_{n}"),
            last4: "4242".into(),
            exp_month: 12,
            exp_year: 2030,
            spending_limit: 2_500,
        }),
        created_at: now(),
        updated_at: now(),
    };
    let ack = db
        .apply_events(
            &sc,
            &[wire::SyncEvent {
                id: format!("pur_{n}.2"),
                action: "intent.issued".into(),
                at: now(),
                intent,
            }],
            now(),
        )
        .await
        .unwrap();
    assert_eq!(ack.accepted, 1, "{ack:?}");
    let applied = db
        .apply_transaction(
            &StripeEventMeta {
                id: format!("evt_{n}"),
                kind: "issuing_transaction.created".into(),
                account: None,
                created: now(),
            },
            &StripeTransaction {
                id: format!("ipi_{n}"),
                card_id: format!("ic_{n}"),
                authorization_id: None,
                kind: "capture".into(),
                amount: captured,
                currency: "usd".into(),
                merchant: MerchantData {
                    name: "NAMECHEAP.COM".into(),
                    ..Default::default()
                },
                created: now(),
            },
            now(),
        )
        .await
        .unwrap();
    assert!(applied);
}

fn declined(id: &str, agent: &str) -> NewIntent {
    NewIntent {
        id: id.into(),
        agent_id: agent.into(),
        status: "declined".into(),
        amount: 99_000,
        currency: "USD".into(),
        merchant_name: "Casino".into(),
        merchant_domain: None,
        merchant_country: None,
        description: None,
        reasons: vec!["exceeds_max_per_transaction".into()],
        decision_outcome: Some("declined".into()),
        created_at: now(),
    }
}

/// The `<form method="post" …>` elements of a page other than sign-out.
fn post_forms(body: &str) -> Vec<String> {
    body.match_indices("<form")
        .map(|(i, _)| body[i..i + body[i..].find('>').unwrap()].to_string())
        // A viewer may sign out, change their own password and verify the audit chain
        // (it reads only), nothing else.
        .filter(|f| {
            f.contains("method=\"post\"")
                && !f.contains("action=\"/logout\"")
                && !f.contains("action=\"/settings/password\"")
                && !f.contains("action=\"/audit/verify\"")
        })
        .collect()
}

// ----- scenarios --------------------------------------------------------------------------

async fn sign_in_and_out(ctx: Ctx) {
    let mut anon = Dash::new(&ctx.base);
    let p = anon.get("/agents?x=1").await;
    assert_eq!(p.status, 303);
    assert_eq!(p.location.as_deref(), Some("/login?next=%2Fagents%3Fx%3D1"));
    let p = anon.get("/").await;
    assert_eq!(p.status, 303);
    assert!(p.location.unwrap().starts_with("/login?next="));

    let mut d = Dash::signed_in(&ctx.db, &ctx.base, "admin@example.com", Role::Admin).await;
    let p = d.get("/").await;
    assert_eq!(p.status, 200, "{}", p.body);
    assert!(p.content_type.starts_with("text/html"));
    // Nothing spent yet: no currency is claimed.
    assert!(!p.body.contains("USD 0.00"), "{}", p.body);
    assert!(p.body.contains("data-empty=\"true\""));
    assert!(p.body.contains("id=\"no-budgets\""));
    assert!(!p.body.contains("id=\"frozen-agents-panel\""));

    let mut wrong = Dash::new(&ctx.base);
    let p = wrong
        .login("admin@example.com", "not the password at all")
        .await;
    assert_eq!(p.status, 401);
    assert!(p.body.contains("not correct"));

    let old_jar = d.jar.clone();
    let p = d.post("/logout", &[]).await;
    assert_eq!(p.status, 303);
    let mut stale = Dash::new(&ctx.base);
    stale.jar = old_jar;
    let p = stale.get("/agents").await;
    assert_eq!(p.status, 303, "{}", p.body);
    assert!(p.location.unwrap().starts_with("/login"));
}

async fn login_rate_limit(ctx: Ctx) {
    common::dash::create_user(&ctx.db, "limited@example.com", Role::Admin).await;
    let mut d = Dash::new(&ctx.base);
    let mut statuses = Vec::new();
    for _ in 0..12 {
        statuses.push(
            d.login("limited@example.com", "wrong password!!")
                .await
                .status,
        );
    }
    assert!(statuses[..10].iter().all(|s| *s == 401), "{statuses:?}");
    assert_eq!(statuses[11], 429, "{statuses:?}");
    // Limited even with the right password.
    assert_eq!(d.login("limited@example.com", PASSWORD).await.status, 429);
}

/// The `<tr …>` of the row carrying all of `markers`.
fn row_with<'a>(body: &'a str, markers: &[&str]) -> &'a str {
    body.match_indices("<tr ")
        .map(|(i, _)| &body[i..i + body[i..].find("</tr>").unwrap_or(body.len() - i)])
        .find(|row| markers.iter().all(|m| row.contains(m)))
        .unwrap_or_else(|| panic!("no row with {markers:?} in:\n{body}"))
}

/// The section of `body` from `start` to `end` (markers).
fn between<'a>(body: &'a str, start: &str, end: &str) -> &'a str {
    let a = body
        .find(start)
        .unwrap_or_else(|| panic!("{start} not in:\n{body}"));
    let b = a + body[a..].find(end).unwrap_or(body.len() - a);
    &body[a..b]
}

/// A capture Stripe reports on a card the ledger does not know (no purchase explains it).
async fn unattributed_capture(db: &ControlDb, n: &str, amount: i64, currency: &str, at: i64) {
    let applied = db
        .apply_transaction(
            &StripeEventMeta {
                id: format!("evt_{n}"),
                kind: "issuing_transaction.created".into(),
                account: None,
                created: at,
            },
            &StripeTransaction {
                id: format!("ipi_{n}"),
                card_id: format!("ic_unknown_{n}"),
                authorization_id: None,
                kind: "capture".into(),
                amount,
                currency: currency.into(),
                merchant: MerchantData {
                    name: "MYSTERY SHOP".into(),
                    ..Default::default()
                },
                created: at,
            },
            now(),
        )
        .await
        .unwrap();
    assert!(applied);
}

async fn demo_policy(db: &ControlDb, agent: &str) {
    let doc = serde_json::to_string(&roony::dev::demo_policy()).unwrap();
    db.put_policy(agent, &doc, &Actor::system(), now())
        .await
        .unwrap();
}

async fn overview_shows_spend(ctx: Ctx) {
    let db = &ctx.db;
    let prj = project(db, "shop").await;
    agent(db, &prj, "agt_buyer", "Buyer Bot").await;
    // USD 250.00 a day in its policy.
    demo_policy(db, "agt_buyer").await;
    purchase_with_capture(db, &prj, "agt_buyer", "ov1", 1_234).await;
    db.insert_intent(&declined("pur_declined1", "agt_buyer"))
        .await
        .unwrap();
    db.set_budget(
        BudgetScope::Agent,
        "agt_buyer",
        "monthly",
        "USD",
        10_000,
        &Actor::system(),
        now(),
    )
    .await
    .unwrap();
    // Money in another currency that no purchase explains.
    unattributed_capture(db, "eur1", 700, "eur", now()).await;
    let mut d = Dash::signed_in(db, &ctx.base, "admin@example.com", Role::Admin).await;
    let p = d.get("/").await;
    assert_eq!(p.status, 200, "{}", p.body);
    let b = &p.body;
    assert!(b.contains("<svg"), "{b}");
    let today = between(b, "id=\"spend-today\"", "id=\"spend-month\"");
    assert!(today.contains("USD 12.34"), "{today}");
    assert!(today.contains("EUR 7.00"), "{today}");
    let month = between(b, "id=\"spend-month\"", "id=\"reserved\"");
    assert!(
        month.contains("USD 12.34") && month.contains("EUR 7.00"),
        "{month}"
    );
    // Reserved: 25.00 held less 12.34 captured.
    let reserved = between(b, "id=\"reserved\"", "id=\"pending-approvals\"");
    assert!(reserved.contains("USD 12.66"), "{reserved}");

    // Charts per currency: each scaled on its own, never mixing currencies.
    let usd_agents = between(
        b,
        "data-test=\"chart-agents\" data-currency=\"USD\"",
        "</figure>",
    );
    assert!(
        usd_agents.contains("Buyer Bot") && usd_agents.contains("USD 12.34"),
        "{usd_agents}"
    );
    assert!(!usd_agents.contains("EUR"), "{usd_agents}");
    assert!(!usd_agents.contains("unattributed"), "{usd_agents}");
    let eur_agents = between(
        b,
        "data-test=\"chart-agents\" data-currency=\"EUR\"",
        "</figure>",
    );
    assert!(
        eur_agents.contains("unattributed") && eur_agents.contains("EUR 7.00"),
        "{eur_agents}"
    );
    assert!(!eur_agents.contains("USD"), "{eur_agents}");
    let usd_merchants = between(
        b,
        "data-test=\"chart-merchants\" data-currency=\"USD\"",
        "</figure>",
    );
    assert!(usd_merchants.contains("NAMECHEAP.COM"), "{usd_merchants}");
    // Daily spend over the last 30 days, per currency: today's column holds the capture.
    let daily = between(
        b,
        "data-test=\"chart-daily\" data-currency=\"USD\"",
        "</figure>",
    );
    assert!(daily.contains("Daily spend, last 30 days, USD"), "{daily}");
    assert_eq!(daily.matches("class=\"chart-bar\"").count(), 1, "{daily}");
    assert!(daily.contains("data-value=\"1234\""), "{daily}");
    assert!(daily.contains(&format!(
        "{}: USD 12.34",
        roony::control::dashboard::ui::date(now())
    )));
    assert!(b.contains("data-test=\"chart-daily\" data-currency=\"EUR\""));

    // Budgets as the sidecar enforces them: the policy's daily USD 250.00 and the agent's
    // monthly USD 100.00, each with what it counts now (the open card's USD 25.00 hold).
    let usage = between(b, "id=\"budget-usage\"", "</table>");
    let daily_row = row_with(usage, &["data-source=\"policy\"", "data-period=\"daily\""]);
    assert!(
        daily_row.contains("data-limit=\"25000\" data-used=\"2500\""),
        "{daily_row}"
    );
    assert!(daily_row.contains("USD 225.00"), "left: {daily_row}");
    let monthly_row = row_with(usage, &["data-source=\"agent\"", "data-period=\"monthly\""]);
    assert!(
        monthly_row.contains("data-limit=\"10000\" data-used=\"2500\""),
        "{monthly_row}"
    );
    assert!(monthly_row.contains("Buyer Bot"));
    assert!(!b.contains("id=\"no-budgets\""));

    assert!(b.contains("exceeds_max_per_transaction"));
    assert!(b.contains("href=\"/transactions/pur_declined1\""));
    // The capture without an authorization is a discrepancy, and it froze the agent.
    assert!(b.contains("id=\"open-discrepancies\""), "{b}");
    assert!(b.contains("href=\"/approvals\""));
    let panel = between(b, "id=\"frozen-agents-panel\"", "</section>");
    let frozen = row_with(panel, &["data-agent=\"agt_buyer\""]);
    assert!(frozen.contains("discrepancy force_capture"), "{frozen}");
    assert!(
        frozen.contains("href=\"/transactions/pur_ov1\""),
        "{frozen}"
    );
    assert!(frozen.contains(" UTC"), "since when: {frozen}");
    assert!(
        frozen.contains("action=\"/agents/agt_buyer/unfreeze\""),
        "{frozen}"
    );
    assert!(b.contains("data-test=\"frozen-count\""));

    // A viewer sees the panel but no form; an admin unfreezes from it.
    let mut v = Dash::signed_in(db, &ctx.base, "viewer@example.com", Role::Viewer).await;
    let vp = v.get("/").await;
    assert!(vp.body.contains("id=\"frozen-agents-panel\""));
    assert_eq!(post_forms(&vp.body), Vec::<String>::new());
    let r = d.post("/agents/agt_buyer/unfreeze", &[]).await;
    assert_eq!(r.status, 303);
    assert_eq!(db.get_agent("agt_buyer").await.unwrap().status, "active");
    let p = d.get("/").await;
    assert!(!p.body.contains("id=\"frozen-agents-panel\""));
}

async fn budgets_as_sidecars_enforce_them(ctx: Ctx) {
    let db = &ctx.db;
    let org = db.ensure_default_org(now()).await.unwrap();
    let prj = project(db, "finance").await;
    agent(db, &prj, "agt_fin", "Fin Bot").await;
    demo_policy(db, "agt_fin").await;
    // What counts today: a pending approval's hold (USD 30.00, the amount: no reservation
    // reported) and an open card's reservation (USD 25.00, more than its USD 10.00
    // capture); a decline counts nothing.
    let mut pending = declined("pur_fin_wait", "agt_fin");
    pending.status = "pending_approval".into();
    pending.amount = 3_000;
    pending.reasons = vec!["approval_required".into()];
    pending.decision_outcome = Some("pending_approval".into());
    db.insert_intent(&pending).await.unwrap();
    db.insert_intent(&declined("pur_fin_no", "agt_fin"))
        .await
        .unwrap();
    purchase_with_capture(db, &prj, "agt_fin", "bf1", 1_000).await;
    db.set_agent_frozen("agt_fin", None, &Actor::system(), now())
        .await
        .unwrap();
    let mut d = Dash::signed_in(db, &ctx.base, "admin@example.com", Role::Admin).await;
    let page = d.get("/agents/agt_fin").await;
    assert_eq!(page.status, 200, "{}", page.body);
    let table = between(&page.body, "id=\"agent-budgets\"", "</table>");
    let daily = row_with(table, &["data-source=\"policy\"", "data-period=\"daily\""]);
    assert!(
        daily.contains("data-limit=\"25000\" data-used=\"5500\""),
        "{daily}"
    );
    assert!(daily.contains("USD 195.00"), "left: {daily}");
    // The form's currency is the policy's.
    let form = between(&page.body, "id=\"budget-form\"", "</form>");
    assert!(form.contains("name=\"currency\" value=\"USD\""), "{form}");
    // The overview shows the policy's budget (it used to say "no budgets yet").
    let o = d.get("/").await;
    let usage = between(&o.body, "id=\"budget-usage\"", "</table>");
    row_with(
        usage,
        &[
            "data-scope-id=\"agt_fin\"",
            "data-source=\"policy\"",
            "data-used=\"5500\"",
        ],
    );

    // Another currency than the policy's: refused with the form again, nothing written.
    let path = "/agents/agt_fin/budgets";
    let p = d
        .post(
            path,
            &[("period", "daily"), ("currency", "EUR"), ("amount", "10")],
        )
        .await;
    assert_eq!(p.status, 422, "{}", p.body);
    assert!(
        p.body
            .contains("data-field=\"currency\" data-code=\"budget_currency_mismatch\""),
        "{}",
        p.body
    );
    assert!(p.body.contains("spends USD only"));
    // Looser than the policy's budget of the period: refused, the policy's limit named.
    let p = d
        .post(
            path,
            &[("period", "daily"), ("currency", "USD"), ("amount", "500")],
        )
        .await;
    assert_eq!(p.status, 422, "{}", p.body);
    assert!(
        p.body
            .contains("data-field=\"amount\" data-code=\"budget_looser_than_policy\""),
        "{}",
        p.body
    );
    assert!(p.body.contains("USD 250.00") && p.body.contains("USD 500.00"));
    assert!(
        p.body.contains("value=\"500\""),
        "the form keeps what was typed"
    );
    assert!(db.list_budgets(None, None).await.unwrap().is_empty());
    // Tighter: accepted, and shown as the agent budget that tightens the policy's.
    let p = d
        .post(
            path,
            &[("period", "daily"), ("currency", "usd"), ("amount", "100")],
        )
        .await;
    assert_eq!(p.status, 303, "{}", p.body);
    // A period the policy has no budget for: added.
    let p = d
        .post(
            path,
            &[
                ("period", "weekly"),
                ("currency", "USD"),
                ("amount", "5000"),
            ],
        )
        .await;
    assert_eq!(p.status, 303, "{}", p.body);
    let page = d.get("/agents/agt_fin").await;
    let table = between(&page.body, "id=\"agent-budgets\"", "</table>");
    let daily = row_with(table, &["data-source=\"agent\"", "data-period=\"daily\""]);
    assert!(
        daily.contains("data-limit=\"10000\" data-used=\"5500\""),
        "{daily}"
    );
    assert!(
        daily.contains("tightens the policy") && daily.contains("USD 250.00"),
        "{daily}"
    );
    let weekly = row_with(table, &["data-source=\"agent\"", "data-period=\"weekly\""]);
    assert!(weekly.contains("data-limit=\"500000\""), "{weekly}");
    // An all-time budget counts purchases of any age (here one of 40 days ago, which no
    // other period counts).
    let mut old = declined("pur_fin_old", "agt_fin");
    old.status = "approved".into();
    old.amount = 1_000;
    old.decision_outcome = Some("approved".into());
    old.created_at = now() - 40 * 86_400;
    db.insert_intent(&old).await.unwrap();
    let p = d
        .post(
            path,
            &[
                ("period", "all_time"),
                ("currency", "USD"),
                ("amount", "100"),
            ],
        )
        .await;
    assert_eq!(p.status, 303, "{}", p.body);
    let page = d.get("/agents/agt_fin").await;
    let table = between(&page.body, "id=\"agent-budgets\"", "</table>");
    let all = row_with(
        table,
        &["data-source=\"agent\"", "data-period=\"all_time\""],
    );
    assert!(
        all.contains("data-limit=\"10000\" data-used=\"6500\""),
        "{all}"
    );
    let weekly = row_with(table, &["data-period=\"weekly\""]);
    assert!(weekly.contains("data-used=\"5500\""), "{weekly}");
    let all_time_budget = db
        .list_budgets(Some(BudgetScope::Agent), Some("agt_fin"))
        .await
        .unwrap()
        .into_iter()
        .find(|b| b.period == "all_time")
        .unwrap();
    db.delete_budget(&all_time_budget.id, &Actor::system(), now())
        .await
        .unwrap();
    assert!(!table.contains("data-source=\"policy\""), "{table}");
    assert!(!page.body.contains("id=\"inactive-budgets\""));

    // Project and organization budgets from the budgets page.
    let b = d.get("/budgets").await;
    assert_eq!(b.status, 200, "{}", b.body);
    assert!(b.body.contains("id=\"shared-budget-form\""));
    let p = d
        .post(
            "/budgets",
            &[
                ("target", &format!("project:{prj}")),
                ("period", "monthly"),
                ("currency", "USD"),
                ("amount", "1000"),
            ],
        )
        .await;
    assert_eq!(p.status, 303, "{}", p.body);
    assert_eq!(p.location.as_deref(), Some("/budgets"));
    let p = d
        .post(
            "/budgets",
            &[
                ("target", &format!("org:{}", org.id)),
                ("period", "daily"),
                ("currency", "EUR"),
                ("amount", "50"),
            ],
        )
        .await;
    assert_eq!(p.status, 303, "{}", p.body);
    for (target, field) in [("project:prj_nope", "target"), ("galaxy", "target")] {
        let p = d
            .post(
                "/budgets",
                &[
                    ("target", target),
                    ("period", "daily"),
                    ("currency", "USD"),
                    ("amount", "1"),
                ],
            )
            .await;
        assert_eq!(p.status, 422, "{target}");
        assert!(
            p.body.contains(&format!("data-field=\"{field}\"")),
            "{target}"
        );
    }
    let p = d
        .post(
            "/budgets",
            &[
                ("target", &format!("project:{prj}")),
                ("period", "daily"),
                ("currency", "USD"),
                ("amount", "1.234"),
            ],
        )
        .await;
    assert_eq!(p.status, 422);
    assert!(p.body.contains("data-field=\"amount\""));
    assert_eq!(db.list_budgets(None, None).await.unwrap().len(), 4);
    let b = d.get("/budgets").await;
    let shared = between(&b.body, "id=\"shared-limits\"", "</table>");
    let project_row = row_with(
        shared,
        &["data-source=\"project\"", "data-period=\"monthly\""],
    );
    assert!(
        project_row.contains("data-limit=\"100000\" data-used=\"5500\""),
        "{project_row}"
    );
    let org_row = row_with(shared, &["data-source=\"org\"", "data-currency=\"EUR\""]);
    assert!(org_row.contains("data-used=\"0\""), "{org_row}");
    // The agent is bound by its project's USD budget, not by the EUR organization budget.
    let page = d.get("/agents/agt_fin").await;
    let table = between(&page.body, "id=\"agent-budgets\"", "</table>");
    row_with(table, &["data-source=\"project\"", "data-limit=\"100000\""]);
    assert!(!table.contains("data-source=\"org\""), "{table}");

    // A budget the admin API accepted in another currency is shown as having no effect.
    let eur = db
        .set_budget(
            BudgetScope::Agent,
            "agt_fin",
            "monthly",
            "EUR",
            9_000,
            &Actor::system(),
            now(),
        )
        .await
        .unwrap();
    let page = d.get("/agents/agt_fin").await;
    let inactive = between(&page.body, "id=\"inactive-budgets\"", "</ul>");
    assert!(
        inactive.contains(&format!("data-budget=\"{}\"", eur.id)),
        "{inactive}"
    );
    assert!(inactive.contains("spends USD only"), "{inactive}");
    let o = d.get("/").await;
    assert!(o.body.contains("id=\"inactive-budgets-note\""));

    // Deleting: an agent budget goes back to the agent's page, a shared one to /budgets.
    let p = d.post(&format!("/budgets/{}/delete", eur.id), &[]).await;
    assert_eq!(p.status, 303, "{}", p.body);
    assert_eq!(p.location.as_deref(), Some("/agents/agt_fin"));
    let project_budget = db
        .list_budgets(Some(BudgetScope::Project), Some(&prj))
        .await
        .unwrap()
        .remove(0);
    let p = d
        .post(&format!("/budgets/{}/delete", project_budget.id), &[])
        .await;
    assert_eq!(p.status, 303);
    assert_eq!(p.location.as_deref(), Some("/budgets"));
    assert_eq!(db.list_budgets(None, None).await.unwrap().len(), 3);
    assert_eq!(d.post("/budgets/bud_nope/delete", &[]).await.status, 404);
    // Deleting the tightening daily budget: the policy's limit binds again.
    let daily_budget = db
        .list_budgets(Some(BudgetScope::Agent), Some("agt_fin"))
        .await
        .unwrap()
        .into_iter()
        .find(|b| b.period == "daily")
        .unwrap();
    assert_eq!(
        d.post(&format!("/budgets/{}/delete", daily_budget.id), &[])
            .await
            .status,
        303
    );
    let page = d.get("/agents/agt_fin").await;
    let table = between(&page.body, "id=\"agent-budgets\"", "</table>");
    row_with(
        table,
        &[
            "data-source=\"policy\"",
            "data-period=\"daily\"",
            "data-limit=\"25000\"",
        ],
    );
}

async fn agents_keys_freeze_budgets(ctx: Ctx) {
    let db = &ctx.db;
    let prj = project(db, "fleet").await;
    let mut d = Dash::signed_in(db, &ctx.base, "admin@example.com", Role::Admin).await;
    let p = d.get("/agents").await;
    assert_eq!(p.status, 200);
    assert!(p.body.contains("id=\"create-agent-form\""));

    // Invalid input: 422 with the form again, nothing created.
    let p = d
        .post(
            "/agents",
            &[("name", " "), ("project_id", &prj), ("policy", "")],
        )
        .await;
    assert_eq!(p.status, 422, "{}", p.body);
    assert!(p.body.contains("data-field=\"name\""));
    let p = d
        .post(
            "/agents",
            &[
                ("name", "Bot"),
                ("project_id", &prj),
                ("policy", "{\"nope\": 1}"),
            ],
        )
        .await;
    assert_eq!(p.status, 422, "{}", p.body);
    assert!(p.body.contains("data-field=\"policy\""));
    let p = d
        .post(
            "/agents",
            &[("name", "Bot"), ("project_id", "prj_nope"), ("policy", "")],
        )
        .await;
    assert_eq!(p.status, 422);
    let all = db
        .list_agents(&Default::default(), 100, None)
        .await
        .unwrap();
    assert!(all.items.is_empty());

    // Created: the key is on the page once and authenticates.
    let policy = serde_json::to_string(&roony::dev::demo_policy()).unwrap();
    let p = d
        .post(
            "/agents",
            &[
                ("name", "Research <Bot>"),
                ("project_id", &prj),
                ("policy", &policy),
            ],
        )
        .await;
    assert_eq!(p.status, 200, "{}", p.body);
    assert!(p.body.contains("Research &lt;Bot&gt;"));
    let key = element_text(&p.body, "id=\"new-agent-key\"");
    let key_id = attr(&p.body, "id=\"new-agent-key\"", "data-key-id");
    let agent_id = attr(&p.body, "id=\"agent-created\"", "data-agent");
    let (owner, hash, revoked) = db.agent_key_hash(&key_id).await.unwrap();
    assert_eq!(owner, agent_id);
    assert!(!revoked);
    assert!(roony::auth::verify(&key, &hash));
    assert_eq!(db.get_policy(&agent_id).await.unwrap().revision, 1);
    let page = d.get(&format!("/agents/{agent_id}")).await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(!page.body.contains(&key));
    assert!(page.body.contains(&key_id));
    let list = d.get("/agents").await;
    assert!(!list.body.contains(&key));
    assert!(list.body.contains(&format!("data-agent=\"{agent_id}\"")));
    assert!(list.body.contains("revision 1"));

    // Rotate: a new key, the old one revoked.
    let p = d.post(&format!("/agents/{agent_id}/rotate-key"), &[]).await;
    assert_eq!(p.status, 200, "{}", p.body);
    let new_key = element_text(&p.body, "id=\"new-agent-key\"");
    let new_id = attr(&p.body, "id=\"new-agent-key\"", "data-key-id");
    assert_ne!(new_key, key);
    assert!(db.agent_key_hash(&key_id).await.unwrap().2);
    let (_, hash, revoked) = db.agent_key_hash(&new_id).await.unwrap();
    assert!(!revoked && roony::auth::verify(&new_key, &hash));
    // The key page is not cached.
    let cookie: Vec<String> = d.jar.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let raw = d
        .client
        .post(format!("{}/agents/{agent_id}/rotate-key", ctx.base))
        .header("cookie", cookie.join("; "))
        .form(&[("_csrf", d.csrf())])
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), 200);
    assert_eq!(raw.headers()["cache-control"], "no-store");
    let third = attr(
        &raw.text().await.unwrap(),
        "id=\"new-agent-key\"",
        "data-key-id",
    );
    // Revoke the last key.
    let p = d
        .post(&format!("/agents/{agent_id}/keys/{third}/revoke"), &[])
        .await;
    assert_eq!(p.status, 303);
    assert!(db.agent_key_hash(&third).await.unwrap().2);
    let p = d
        .post(&format!("/agents/{agent_id}/keys/{third}/revoke"), &[])
        .await;
    assert_eq!(p.status, 409);

    // Freeze and unfreeze.
    let p = d
        .post(
            &format!("/agents/{agent_id}/freeze"),
            &[("reason", "card misuse")],
        )
        .await;
    assert_eq!(p.status, 303);
    assert_eq!(
        p.location.as_deref(),
        Some(format!("/agents/{agent_id}").as_str())
    );
    let a = db.get_agent(&agent_id).await.unwrap();
    assert_eq!(
        (a.status.as_str(), a.frozen_reason.as_deref()),
        ("frozen", Some("card misuse"))
    );
    let page = d.get(&format!("/agents/{agent_id}")).await;
    assert!(
        page.body.contains("agent frozen"),
        "flash shown: {}",
        page.body
    );
    assert!(page.body.contains("id=\"unfreeze-form\""));
    let p = d.post(&format!("/agents/{agent_id}/unfreeze"), &[]).await;
    assert_eq!(p.status, 303);
    assert_eq!(db.get_agent(&agent_id).await.unwrap().status, "active");

    // Budgets: decimal text to minor units; invalid amounts are 422 with the form again.
    let path = format!("/agents/{agent_id}/budgets");
    let p = d
        .post(
            &path,
            &[
                ("period", "monthly"),
                ("currency", "usd"),
                ("amount", "12.50"),
            ],
        )
        .await;
    assert_eq!(p.status, 303, "{}", p.body);
    let budgets = db
        .list_budgets(Some(BudgetScope::Agent), Some(&agent_id))
        .await
        .unwrap();
    assert_eq!(budgets.len(), 1);
    assert_eq!(
        (
            budgets[0].limit,
            budgets[0].currency.as_str(),
            budgets[0].period.as_str()
        ),
        (1250, "USD", "monthly")
    );
    for bad in ["12.505", "abc", "-3", "0", ""] {
        let p = d
            .post(
                &path,
                &[("period", "daily"), ("currency", "USD"), ("amount", bad)],
            )
            .await;
        assert_eq!(p.status, 422, "{bad}: {}", p.body);
        assert!(p.body.contains("data-field=\"amount\""), "{bad}");
    }
    let p = d
        .post(
            &path,
            &[("period", "hourly"), ("currency", "USD"), ("amount", "1")],
        )
        .await;
    assert_eq!(p.status, 422);
    let p = d
        .post(
            &path,
            &[("period", "daily"), ("currency", "XYZ"), ("amount", "1")],
        )
        .await;
    assert_eq!(p.status, 422);
    assert_eq!(
        db.list_budgets(Some(BudgetScope::Agent), Some(&agent_id))
            .await
            .unwrap()
            .len(),
        1
    );
    let page = d.get(&format!("/agents/{agent_id}")).await;
    assert!(page.body.contains("USD 12.50"));
    assert_eq!(d.get("/agents/agt_missing").await.status, 404);
}

async fn viewers_and_csrf(ctx: Ctx) {
    let db = &ctx.db;
    let prj = project(db, "ro").await;
    agent(db, &prj, "agt_ro", "Read Only").await;
    purchase_with_capture(db, &prj, "agt_ro", "vw1", 500).await;
    db.set_agent_frozen("agt_ro", None, &Actor::system(), now())
        .await
        .unwrap();
    let disc = db
        .list_discrepancies(&DiscrepancyFilter::default(), 10, None)
        .await
        .unwrap()
        .items;
    assert!(!disc.is_empty());
    let disc_id = disc[0].id.clone();
    let admin_user = common::dash::create_user(db, "boss@example.com", Role::Admin).await;
    let mut v = Dash::signed_in(db, &ctx.base, "viewer@example.com", Role::Viewer).await;
    for path in [
        "/",
        "/agents",
        "/budgets",
        "/agents/agt_ro",
        "/discrepancies",
        "/audit",
        "/settings",
    ] {
        let p = v.get(path).await;
        assert_eq!(p.status, 200, "{path}: {}", p.body);
        assert_eq!(post_forms(&p.body), Vec::<String>::new(), "{path}");
    }
    let key_id = db.list_agent_keys("agt_ro").await.unwrap()[0]
        .key_id
        .clone();
    let posts: Vec<(String, Vec<(&str, &str)>)> = vec![
        ("/agents".into(), vec![("name", "x"), ("project_id", &prj)]),
        ("/agents/agt_ro/rotate-key".into(), vec![]),
        (format!("/agents/agt_ro/keys/{key_id}/revoke"), vec![]),
        ("/agents/agt_ro/freeze".into(), vec![("reason", "r")]),
        ("/agents/agt_ro/unfreeze".into(), vec![]),
        (
            "/agents/agt_ro/budgets".into(),
            vec![("period", "daily"), ("currency", "USD"), ("amount", "1")],
        ),
        (
            "/budgets".into(),
            vec![
                ("target", "project:x"),
                ("period", "daily"),
                ("currency", "USD"),
                ("amount", "1"),
            ],
        ),
        ("/budgets/bud_x/delete".into(), vec![]),
        (
            "/agents/agt_ro/budgets/dry-run".into(),
            vec![("period", "daily"), ("currency", "USD"), ("amount", "1")],
        ),
        (
            format!("/discrepancies/{disc_id}/resolve"),
            vec![("note", "n")],
        ),
        ("/audit/verify".into(), vec![]),
        (
            "/settings/password".into(),
            vec![
                ("current", PASSWORD),
                ("new", "another long password"),
                ("confirm", "another long password"),
            ],
        ),
        (
            "/settings/users".into(),
            vec![
                ("email", "x@example.com"),
                ("name", "x"),
                ("role", "admin"),
                ("password", "a long enough password"),
            ],
        ),
        (
            format!("/settings/users/{}", admin_user.id),
            vec![("role", "viewer")],
        ),
        ("/settings/tokens".into(), vec![("name", "ci")]),
        ("/settings/tokens/hdeadbeef/revoke".into(), vec![]),
        (
            "/settings/sidecars".into(),
            vec![("name", "edge"), ("project_id", &prj)],
        ),
        ("/settings/sidecars/sc_nope/revoke".into(), vec![]),
    ];
    for (path, form) in &posts {
        if path == "/settings/password" || path == "/audit/verify" {
            // Their own account (tests/dashboard_auth.rs) and reading the audit chain
            // (tests/dashboard_hardening.rs): allowed.
            continue;
        }
        let p = v.post(path, form).await;
        assert_eq!(p.status, 403, "viewer {path}: {}", p.body);
    }
    // Admins without or with a wrong CSRF token: 403, nothing changed.
    let mut a = Dash::new(&ctx.base);
    assert_eq!(a.login("boss@example.com", PASSWORD).await.status, 303);
    for (path, form) in &posts {
        let p = a.post_raw(path, form).await;
        assert_eq!(p.status, 403, "no csrf {path}: {}", p.body);
        let mut with_wrong = form.clone();
        with_wrong.push(("_csrf", "0000"));
        let p = a.post_raw(path, &with_wrong).await;
        assert_eq!(p.status, 403, "wrong csrf {path}: {}", p.body);
    }
    assert_eq!(db.get_agent("agt_ro").await.unwrap().status, "active");
    assert!(!db.agent_key_hash(&key_id).await.unwrap().2);
    assert!(db.list_budgets(None, None).await.unwrap().is_empty());
    assert_eq!(db.list_admin_users().await.unwrap().len(), 2);
    let d = db
        .list_discrepancies(&DiscrepancyFilter::default(), 10, None)
        .await
        .unwrap()
        .items;
    assert!(d.iter().all(|d| d.resolved_at.is_none()));
    // A foreign Origin is refused too.
    let cookie: Vec<String> = a.jar.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let r = a
        .client
        .post(format!("{}/agents/agt_ro/freeze", ctx.base))
        .header("cookie", cookie.join("; "))
        .header("origin", "http://evil.example")
        .form(&[("_csrf", a.csrf())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(db.get_agent("agt_ro").await.unwrap().status, "active");
    // The admin sees the forms.
    let p = a.get("/agents/agt_ro").await;
    assert!(!post_forms(&p.body).is_empty());
}

async fn settings_accounts_and_tokens(ctx: Ctx) {
    let db = &ctx.db;
    let prj = project(db, "edge").await;
    let mut d = Dash::signed_in(db, &ctx.base, "admin@example.com", Role::Admin).await;
    let me = d.user.clone().unwrap();
    let mut other = Dash::new(&ctx.base);
    assert_eq!(other.login("admin@example.com", PASSWORD).await.status, 303);
    let p = d.get("/settings").await;
    assert_eq!(p.status, 200);
    for id in [
        "password-form",
        "users-table",
        "create-user-form",
        "tokens-table",
        "create-token-form",
        "create-sidecar-form",
        "db-backend",
    ] {
        assert!(p.body.contains(&format!("id=\"{id}\"")), "{id}");
    }
    let backend = attr(&p.body, "id=\"db-backend\"", "data-backend");
    assert!(backend == "sqlite" || backend == "postgres");

    // Password: wrong current, mismatch, too short → 422; then changed.
    let new_pw = "a brand new password 42";
    for (cur, new, confirm) in [
        ("wrong password here", new_pw, new_pw),
        (PASSWORD, new_pw, "something else entirely"),
        (PASSWORD, "short", "short"),
    ] {
        let p = d
            .post(
                "/settings/password",
                &[("current", cur), ("new", new), ("confirm", confirm)],
            )
            .await;
        assert_eq!(p.status, 422, "{}", p.body);
        assert!(p.body.contains("field-error"));
    }
    let p = d
        .post(
            "/settings/password",
            &[("current", PASSWORD), ("new", new_pw), ("confirm", new_pw)],
        )
        .await;
    assert_eq!(p.status, 303, "{}", p.body);
    assert_eq!(d.get("/settings").await.status, 200, "this session stays");
    assert_eq!(
        other.get("/settings").await.status,
        303,
        "other sessions end"
    );
    let mut fresh = Dash::new(&ctx.base);
    assert_eq!(fresh.login("admin@example.com", PASSWORD).await.status, 401);
    assert_eq!(fresh.login("admin@example.com", new_pw).await.status, 303);

    // A viewer user.
    let p = d
        .post(
            "/settings/users",
            &[
                ("email", "watcher@example.com"),
                ("name", "Watcher"),
                ("role", "viewer"),
                ("password", "viewer password 123"),
            ],
        )
        .await;
    assert_eq!(p.status, 303, "{}", p.body);
    let users = db.list_admin_users().await.unwrap();
    let watcher = users
        .iter()
        .find(|u| u.email == "watcher@example.com")
        .unwrap();
    assert_eq!(watcher.role, Role::Viewer);
    let p = d
        .post(
            "/settings/users",
            &[
                ("email", "watcher@example.com"),
                ("name", "Again"),
                ("role", "viewer"),
                ("password", "viewer password 123"),
            ],
        )
        .await;
    assert_eq!(p.status, 409);
    let p = d
        .post(
            "/settings/users",
            &[
                ("email", "x@example.com"),
                ("name", "X"),
                ("role", "viewer"),
                ("password", "short"),
            ],
        )
        .await;
    assert_eq!(p.status, 422);
    let mut w = Dash::new(&ctx.base);
    assert_eq!(
        w.login("watcher@example.com", "viewer password 123")
            .await
            .status,
        303
    );
    let p = w.get("/settings").await;
    assert_eq!(p.status, 200);
    assert!(!p.body.contains("id=\"users-table\""));

    // The last admin cannot be demoted or disabled.
    let p = d
        .post(&format!("/settings/users/{}", me.id), &[("role", "viewer")])
        .await;
    assert_eq!(p.status, 409, "{}", p.body);
    assert!(p.body.contains("last enabled admin"), "{}", p.body);
    let p = d
        .post(
            &format!("/settings/users/{}", me.id),
            &[("role", "admin"), ("disabled", "true")],
        )
        .await;
    assert_eq!(p.status, 409);
    assert_eq!(db.get_admin_user(&me.id).await.unwrap().role, Role::Admin);
    // Disabling the viewer ends its session.
    let p = d
        .post(
            &format!("/settings/users/{}", watcher.id),
            &[("role", "viewer"), ("disabled", "true")],
        )
        .await;
    assert_eq!(p.status, 303);
    assert_eq!(w.get("/").await.status, 303);

    // Admin API tokens: shown once, work, revocable.
    let p = d.post("/settings/tokens", &[("name", "ci")]).await;
    assert_eq!(p.status, 200, "{}", p.body);
    let token = element_text(&p.body, "id=\"new-admin-token\"");
    let r = reqwest::Client::new()
        .get(format!("{}/api/admin/v1/agents", ctx.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(!d.get("/settings").await.body.contains(&token));
    let id = db
        .list_admin_tokens()
        .await
        .unwrap()
        .into_iter()
        .find(|t| t.name == "ci")
        .unwrap()
        .id;
    let p = d.post(&format!("/settings/tokens/{id}/revoke"), &[]).await;
    assert_eq!(p.status, 303);
    let r = reqwest::Client::new()
        .get(format!("{}/api/admin/v1/agents", ctx.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        d.post("/settings/tokens", &[("name", "")]).await.status,
        422
    );

    // Sidecars: token shown once; revocable.
    let p = d
        .post(
            "/settings/sidecars",
            &[("name", "edge-1"), ("project_id", &prj)],
        )
        .await;
    assert_eq!(p.status, 200, "{}", p.body);
    let token = element_text(&p.body, "id=\"new-sidecar-token\"");
    assert!(token.starts_with(wire::SIDECAR_TOKEN_PREFIX));
    let key = roony::auth::from_plaintext(&token).unwrap();
    let sc = db.find_sidecar(&key.key_id).await.unwrap().unwrap();
    let p = d
        .post(&format!("/settings/sidecars/{}/revoke", sc.id), &[])
        .await;
    assert_eq!(p.status, 303);
    assert!(db.list_sidecars().await.unwrap()[0].revoked_at.is_some());
    assert_eq!(
        d.post(
            "/settings/sidecars",
            &[("name", "edge-2"), ("project_id", "prj_nope")]
        )
        .await
        .status,
        422
    );
}

async fn discrepancies_and_audit(ctx: Ctx) {
    let db = &ctx.db;
    let prj = project(db, "audit").await;
    agent(db, &prj, "agt_au", "Auditor").await;
    purchase_with_capture(db, &prj, "agt_au", "au1", 700).await;
    let mut d = Dash::signed_in(db, &ctx.base, "admin@example.com", Role::Admin).await;
    let me = d.user.clone().unwrap();

    let p = d.get("/discrepancies").await;
    assert_eq!(p.status, 200, "{}", p.body);
    let disc = db
        .list_discrepancies(&DiscrepancyFilter::default(), 10, None)
        .await
        .unwrap()
        .items;
    let id = disc[0].id.clone();
    assert!(p.body.contains(&format!("data-discrepancy=\"{id}\"")));
    assert!(p.body.contains("href=\"/transactions/pur_au1\""));
    assert_eq!(d.get("/discrepancies?status=bogus").await.status, 400);
    assert_eq!(d.get("/discrepancies?kind=bogus").await.status, 400);
    let p = d
        .post(
            &format!("/discrepancies/{id}/resolve"),
            &[("note", "refund agreed")],
        )
        .await;
    assert_eq!(p.status, 303);
    let p = d
        .post(
            &format!("/discrepancies/{id}/resolve"),
            &[("note", "again")],
        )
        .await;
    assert_eq!(p.status, 409);
    let p = d.get("/discrepancies?status=open").await;
    assert!(!p.body.contains(&format!("data-discrepancy=\"{id}\"")));
    let p = d.get("/discrepancies?status=resolved").await;
    assert!(p.body.contains(&format!("data-discrepancy=\"{id}\"")));
    assert!(p.body.contains("refund agreed"));

    // Dashboard actions are in the audit log under the user.
    assert_eq!(d.post("/agents/agt_au/unfreeze", &[]).await.status, 303);
    assert_eq!(
        d.post("/agents/agt_au/freeze", &[("reason", "audit test")])
            .await
            .status,
        303
    );
    let p = d.get("/audit?actor_type=admin_user&action=agent.").await;
    assert_eq!(p.status, 200, "{}", p.body);
    assert!(
        p.body.contains("data-action=\"agent.freeze\""),
        "{}",
        p.body
    );
    assert!(p.body.contains("data-action=\"agent.unfreeze\""));
    assert!(p.body.contains(&me.id));
    assert!(!p.body.contains("data-action=\"discrepancy.resolve\""));
    let p = d.get("/audit?action=discrepancy.&target_id=").await;
    assert!(p.body.contains("data-action=\"discrepancy.resolve\""));
    assert_eq!(d.get("/audit?actor_type=Bad%20Type").await.status, 400);
    assert_eq!(d.get("/audit?cursor=%25%25").await.status, 400);
    // Paging: more than one page of events exists.
    for _ in 0..30 {
        d.post("/agents/agt_au/unfreeze", &[]).await;
    }
    let p = d.get("/audit").await;
    let next = attr(&p.body, "id=\"audit-next\"", "href").replace("&amp;", "&");
    let p2 = d.get(&next).await;
    assert_eq!(p2.status, 200);
    assert!(p2.body.contains("data-event="));

    let p = d.post("/audit/verify", &[]).await;
    assert_eq!(p.status, 200, "{}", p.body);
    assert_eq!(
        attr(&p.body, "id=\"verify-result\"", "data-result"),
        "ok",
        "{}",
        p.body
    );
}
