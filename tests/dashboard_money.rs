#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]
//! The dashboard's money pages (policies with dry run and diff, approvals, transactions
//! and their CSV export) over HTTP, against SQLite and — when `ROONY_TEST_DATABASE_URL` is
//! set — PostgreSQL.

mod common;

use std::future::Future;

use futures_util::FutureExt;
use roony::control::db::admin_users::Role;
use roony::control::db::{Actor, ControlDb};
use roony::control::model::{
    MerchantData, NewIntent, StripeAuthorization, StripeCard, StripeEventMeta, StripeTransaction,
};
use roony::control::{self, ControlConfig};
use roony::sync::wire;
use serde_json::json;

use common::dash::{Dash, now};
use common::db::{Kind, TestDb, on_both, serve};

struct Ctx {
    db: ControlDb,
    base: String,
    admin: Dash,
    viewer: Dash,
    project: String,
    agent: String,
}

async fn run<F, Fut>(kind: Kind, scenario: F)
where
    F: FnOnce(Ctx) -> Fut,
    Fut: Future<Output = ()>,
{
    let Some(test_db) = TestDb::new(
        kind,
        "dashboard money tests is SKIPPED (CI sets postgres://postgres@127.0.0.1:5432/test)",
    )
    .await
    else {
        return;
    };
    let mut config = ControlConfig::sqlite_in(std::path::Path::new("/nonexistent"));
    config.database_url = test_db.url.clone();
    let db = control::open(&config).await.unwrap();
    let (base, stop_tx, server) = serve(&db).await;
    let org = db.ensure_default_org(now()).await.unwrap();
    let project = db
        .create_project(&org.id, "money", &Actor::system(), now())
        .await
        .unwrap();
    let agent = db
        .create_agent(
            &project.id,
            Some("agt_buyer"),
            "Buyer Bot",
            &roony::auth::generate(),
            &Actor::system(),
            now(),
        )
        .await
        .unwrap();
    let admin = Dash::signed_in(&db, &base, "admin@example.com", Role::Admin).await;
    let viewer = Dash::signed_in(&db, &base, "viewer@example.com", Role::Viewer).await;
    let ctx = Ctx {
        db: db.clone(),
        base,
        admin,
        viewer,
        project: project.id,
        agent: agent.id,
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
    policy_editor_validates_publishes_and_diffs,
    dry_run_reports_changed_decisions,
    dry_run_includes_agent_budgets,
    viewers_and_forged_forms_are_refused,
    approvals_approve_and_deny_with_notes,
    approvals_queue_is_safe,
    transactions_filter_and_show_the_chain,
    csv_export_quotes_and_guards,
    exports_stream_every_row_and_settlements,
    overview_reserved_is_what_budgets_hold,
);

/// A policy without risk noise (thresholds off) and the given per-purchase limit.
fn policy(max: i64) -> serde_json::Value {
    json!({
        "currency": "USD",
        "max_per_transaction": max,
        "budgets": [{"period": "monthly", "limit": 1_000_000}],
        "risk": {"require_approval_above": 100, "decline_above": 100}
    })
}

async fn put_policy(ctx: &Ctx, doc: &serde_json::Value) -> i64 {
    let normalized: roony::policy::Policy = serde_json::from_value(doc.clone()).unwrap();
    let doc = serde_json::to_string(&normalized).unwrap();
    ctx.db
        .put_policy(&ctx.agent, &doc, &Actor::system(), now())
        .await
        .unwrap()
        .revision
}

fn intent(id: &str, agent: &str, status: &str, amount: i64, merchant: &str, at: i64) -> NewIntent {
    NewIntent {
        id: id.into(),
        agent_id: agent.into(),
        status: status.into(),
        amount,
        currency: "USD".into(),
        merchant_name: merchant.into(),
        merchant_domain: Some("shop.example".into()),
        merchant_country: Some("US".into()),
        description: Some("test purchase".into()),
        reasons: vec![
            match status {
                "declined" => "exceeds_transaction_limit",
                "pending_approval" => "approval_required",
                _ => "within_policy",
            }
            .into(),
        ],
        decision_outcome: Some(
            match status {
                "declined" => "declined",
                "pending_approval" => "pending_approval",
                _ => "approved",
            }
            .into(),
        ),
        created_at: at,
    }
}

fn flash_of(page: &common::dash::Page) -> String {
    page.cookies
        .iter()
        .find(|c| c.starts_with("roony_flash="))
        .map(|c| {
            c.split(';')
                .next()
                .unwrap()
                .trim_start_matches("roony_flash=")
                .to_string()
        })
        .map(|v| roony::control::dashboard::ui::url_decode(&v))
        .unwrap_or_default()
}

async fn policy_editor_validates_publishes_and_diffs(mut ctx: Ctx) {
    let a = ctx.agent.clone();
    let page = ctx.admin.get(&format!("/agents/{a}/policy")).await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.body.contains("id=\"current-revision\""));
    assert!(page.body.contains("data-revision=\"0\""), "{}", page.body);
    assert_eq!(
        ctx.admin
            .get(&format!("/agents/{a}/policy/diff"))
            .await
            .status,
        404
    );
    assert_eq!(put_policy(&ctx, &policy(10_000)).await, 1);

    let list = ctx.admin.get("/policies").await;
    assert_eq!(list.status, 200, "{}", list.body);
    assert!(list.body.contains("id=\"policies-table\""));
    assert!(list.body.contains(&format!("data-agent-id=\"{a}\"")));

    let page = ctx.admin.get(&format!("/agents/{a}/policy")).await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.body.contains("id=\"policy-json\""));
    assert!(page.body.contains("max_per_transaction"));
    assert!(page.body.contains("10000"));
    assert!(page.body.contains("data-revision=\"1\""));
    assert!(page.body.contains("id=\"publish\""));

    // An invalid policy: 422, the field path listed, the draft kept, nothing written.
    let bad = r#"{"currency": "USD", "budgets": [{"period": "daily", "limit": 0}], "max_per_transaction": 777}"#;
    let p = ctx
        .admin
        .post(&format!("/agents/{a}/policy"), &[("policy", bad)])
        .await;
    assert_eq!(p.status, 422, "{}", p.body);
    let errors = &p.body[p.body.find("id=\"policy-errors\"").expect("errors list")..];
    assert!(errors.contains("budgets[0].limit"), "{errors}");
    assert!(p.body.contains("777"), "the draft is kept");
    assert_eq!(ctx.db.get_policy(&a).await.unwrap().revision, 1);
    // Not JSON at all.
    let p = ctx
        .admin
        .post(&format!("/agents/{a}/policy"), &[("policy", "{oops")])
        .await;
    assert_eq!(p.status, 422);
    assert!(p.body.contains("(json)"));
    // Unknown field.
    let p = ctx
        .admin
        .post(
            &format!("/agents/{a}/policy"),
            &[("policy", r#"{"currency":"USD","max_per_purchase":5}"#)],
        )
        .await;
    assert_eq!(p.status, 422);
    assert!(p.body.contains("max_per_purchase"));
    assert_eq!(ctx.db.get_policy(&a).await.unwrap().revision, 1);

    // Publish: a new revision, a flash, the bundle revision bumped.
    let before = ctx.db.config_revision().await.unwrap();
    let draft = serde_json::to_string_pretty(&policy(5_000)).unwrap();
    let p = ctx
        .admin
        .post(&format!("/agents/{a}/policy"), &[("policy", &draft)])
        .await;
    assert_eq!(p.status, 303, "{}", p.body);
    assert_eq!(
        p.location.as_deref(),
        Some(format!("/agents/{a}/policy").as_str())
    );
    assert_eq!(flash_of(&p), "published revision 2");
    let rev = ctx.db.get_policy(&a).await.unwrap();
    assert_eq!(rev.revision, 2);
    assert_eq!(rev.document["max_per_transaction"], 5_000);
    assert_eq!(rev.author, "admin@example.com");
    assert!(ctx.db.config_revision().await.unwrap() > before);
    let page = ctx.admin.get(&format!("/agents/{a}/policy")).await;
    assert!(page.body.contains("published revision 2"), "flash shown");
    assert!(
        page.body
            .contains("data-test=\"revision-row\" data-revision=\"2\"")
    );

    // Diff: default previous vs current.
    let d = ctx.admin.get(&format!("/agents/{a}/policy/diff")).await;
    assert_eq!(d.status, 200, "{}", d.body);
    assert!(d.body.contains("data-from=\"1\" data-to=\"2\""));
    assert!(
        d.body.contains("data-added=\"1\" data-removed=\"1\""),
        "{}",
        d.body
    );
    let del = d.body.find("data-test=\"diff-del\"").unwrap();
    assert!(d.body[del..].contains("10000"));
    let add = d.body.find("data-test=\"diff-add\"").unwrap();
    assert!(d.body[add..add + 200].contains("5000"));
    let d = ctx
        .admin
        .get(&format!("/agents/{a}/policy/diff?from=2&to=1"))
        .await;
    assert_eq!(d.status, 200);
    assert!(d.body.contains("data-from=\"2\" data-to=\"1\""));
    assert_eq!(
        ctx.admin
            .get(&format!("/agents/{a}/policy/diff?from=abc"))
            .await
            .status,
        400
    );
    assert_eq!(
        ctx.admin
            .get(&format!("/agents/{a}/policy/diff?from=9&to=2"))
            .await
            .status,
        404
    );
    assert_eq!(ctx.admin.get("/agents/agt_nope/policy").await.status, 404);
    // Extreme revision numbers: a 404 or 400 page, never a panic.
    for (query, status) in [
        ("to=-9223372036854775808", 404),
        ("from=-9223372036854775808", 404),
        ("from=-9223372036854775808&to=-9223372036854775808", 404),
        ("to=9223372036854775807", 404),
        ("to=99999999999999999999", 400),
    ] {
        let d = ctx
            .admin
            .get(&format!("/agents/{a}/policy/diff?{query}"))
            .await;
        assert_eq!(d.status, status, "{query}: {}", d.body);
    }
    assert_eq!(
        ctx.admin
            .get(&format!("/agents/{a}/policy/diff"))
            .await
            .status,
        200
    );
}

async fn dry_run_reports_changed_decisions(mut ctx: Ctx) {
    let a = ctx.agent.clone();
    put_policy(&ctx, &policy(10_000)).await;
    let t = now();
    let h = 3600;
    for i in [
        intent("pur_dry_small", &a, "approved", 2_000, "Shop", t - 50 * h),
        intent("pur_dry_mid", &a, "approved", 6_000, "Shop", t - 40 * h),
        intent("pur_dry_big", &a, "approved", 8_000, "Shop", t - 30 * h),
        intent("pur_dry_huge", &a, "declined", 20_000, "Shop", t - 20 * h),
        intent(
            "pur_dry_old",
            &a,
            "approved",
            9_000,
            "Shop",
            t - 40 * 24 * h,
        ),
    ] {
        ctx.db.insert_intent(&i).await.unwrap();
    }
    let draft = policy(5_000).to_string();
    let p = ctx
        .admin
        .post(
            &format!("/agents/{a}/policy/dry-run"),
            &[("policy", &draft), ("days", "30")],
        )
        .await;
    assert_eq!(p.status, 200, "{}", p.body);
    assert!(
        p.body.contains("data-replayed=\"4\" data-changed=\"2\""),
        "{}",
        p.body
    );
    assert!(p.body.contains("<span id=\"current-approved\">3</span>"));
    assert!(p.body.contains("<span id=\"current-declined\">1</span>"));
    assert!(p.body.contains("<span id=\"draft-approved\">1</span>"));
    assert!(p.body.contains("<span id=\"draft-declined\">3</span>"));
    for id in ["pur_dry_mid", "pur_dry_big"] {
        let row = format!(
            "data-test=\"dry-run-change\" data-intent-id=\"{id}\" data-old=\"approved\" data-new=\"declined\""
        );
        assert!(p.body.contains(&row), "{id}");
    }
    assert!(!p.body.contains("data-intent-id=\"pur_dry_small\""));
    assert!(p.body.contains("exceeds_transaction_limit"));
    assert!(p.body.contains("id=\"dry-run-caveat\""));
    assert!(p.body.contains("id=\"draft-valid\""));
    // The draft stays in the editor; nothing was published.
    assert!(p.body.contains("5000"));
    assert_eq!(ctx.db.get_policy(&a).await.unwrap().revision, 1);

    // A longer window reaches the old intent too.
    let p = ctx
        .admin
        .post(
            &format!("/agents/{a}/policy/dry-run"),
            &[("policy", &draft), ("days", "60")],
        )
        .await;
    assert!(
        p.body.contains("data-replayed=\"5\" data-changed=\"3\""),
        "{}",
        p.body
    );

    // Bad window or invalid draft: 422 with the errors.
    let p = ctx
        .admin
        .post(
            &format!("/agents/{a}/policy/dry-run"),
            &[("policy", &draft), ("days", "366")],
        )
        .await;
    assert_eq!(p.status, 422);
    assert!(p.body.contains("data-field=\"days\""));
    let p = ctx
        .admin
        .post(
            &format!("/agents/{a}/policy/dry-run"),
            &[("policy", r#"{"currency":"USD","max_per_transaction":-1}"#)],
        )
        .await;
    assert_eq!(p.status, 422);
    assert!(p.body.contains("data-field=\"max_per_transaction\""));
}

async fn viewers_and_forged_forms_are_refused(mut ctx: Ctx) {
    let a = ctx.agent.clone();
    put_policy(&ctx, &policy(10_000)).await;
    ctx.db
        .insert_intent(&intent(
            "pur_perm",
            &a,
            "pending_approval",
            30_000,
            "Shop",
            now(),
        ))
        .await
        .unwrap();
    let draft = policy(1).to_string();

    // Viewers see the pages, without forms, and are refused on every action.
    let page = ctx.viewer.get(&format!("/agents/{a}/policy")).await;
    assert_eq!(page.status, 200);
    assert!(!page.body.contains("id=\"publish\""));
    let page = ctx.viewer.get("/approvals").await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("data-intent-id=\"pur_perm\""));
    assert!(!page.body.contains("data-test=\"approve\""));
    for (path, form) in [
        (
            format!("/agents/{a}/policy"),
            vec![("policy", draft.as_str())],
        ),
        (
            format!("/agents/{a}/policy/dry-run"),
            vec![("policy", draft.as_str())],
        ),
        (
            "/approvals/pur_perm/approve".to_string(),
            vec![("note", "x")],
        ),
        ("/approvals/pur_perm/deny".to_string(), vec![]),
    ] {
        let p = ctx.viewer.post(&path, &form).await;
        assert_eq!(p.status, 403, "{path}: {}", p.body);
    }

    // An admin's form without (or with a wrong) CSRF token.
    let p = ctx
        .admin
        .post_raw(&format!("/agents/{a}/policy"), &[("policy", &draft)])
        .await;
    assert_eq!(p.status, 403);
    assert!(p.body.contains("csrf_failed"));
    let p = ctx
        .admin
        .post_raw(
            "/approvals/pur_perm/approve",
            &[("note", "x"), ("_csrf", "0000")],
        )
        .await;
    assert_eq!(p.status, 403);
    // Signed out: redirected to sign in.
    let mut anon = Dash::new(&ctx.base);
    let p = anon.get("/transactions").await;
    assert_eq!(p.status, 303);
    assert!(p.location.unwrap().starts_with("/login"));

    assert_eq!(ctx.db.get_policy(&a).await.unwrap().revision, 1);
    assert_eq!(
        ctx.db.get_intent("pur_perm").await.unwrap().status,
        "pending_approval"
    );
}

async fn approvals_approve_and_deny_with_notes(mut ctx: Ctx) {
    let a = ctx.agent.clone();
    let t = now();
    ctx.db
        .insert_intent(&intent(
            "pur_wait1",
            &a,
            "pending_approval",
            30_000,
            "Big Server Co",
            t - 600,
        ))
        .await
        .unwrap();
    ctx.db
        .insert_intent(&intent(
            "pur_wait2",
            &a,
            "pending_approval",
            45_000,
            "Casino <b>Royale</b>",
            t - 60,
        ))
        .await
        .unwrap();
    let page = ctx.admin.get("/approvals").await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.body.contains("id=\"approval-pur_wait1\""));
    assert!(page.body.contains("id=\"approval-pur_wait2\""));
    assert!(page.body.contains("USD 300.00"));
    assert!(page.body.contains("approval_required"));
    assert!(
        page.body.contains("Casino &lt;b&gt;Royale&lt;/b&gt;"),
        "escaped"
    );
    assert!(page.body.contains("data-test=\"approval-note\""));

    let note = "ok by finance, ticket #12 <script>";
    let p = ctx
        .admin
        .post("/approvals/pur_wait1/approve", &[("note", note)])
        .await;
    assert_eq!(p.status, 303, "{}", p.body);
    assert_eq!(p.location.as_deref(), Some("/approvals"));
    assert!(flash_of(&p).starts_with("approved USD 300.00"));
    let i = ctx.db.get_intent("pur_wait1").await.unwrap();
    assert_eq!(i.status, "approved");
    assert_eq!(i.reasons, ["approved_by_admin"]);
    let decisions = ctx.db.dash_intent_decisions("pur_wait1").await.unwrap();
    let last = decisions.last().unwrap();
    assert_eq!(last.decided_by, "admin");
    assert_eq!(last.note.as_deref(), Some(note));
    assert_eq!(last.actor.as_deref(), Some("admin@example.com"));

    let p = ctx
        .admin
        .post("/approvals/pur_wait2/deny", &[("note", "")])
        .await;
    assert_eq!(p.status, 303, "{}", p.body);
    assert_eq!(
        ctx.db.get_intent("pur_wait2").await.unwrap().status,
        "declined"
    );

    // A second decision: 409; unknown: 404.
    let p = ctx
        .admin
        .post("/approvals/pur_wait1/deny", &[("note", "too late")])
        .await;
    assert_eq!(p.status, 409, "{}", p.body);
    assert!(p.body.contains("already decided"));
    assert_eq!(
        ctx.db.get_intent("pur_wait1").await.unwrap().status,
        "approved"
    );
    let p = ctx.admin.post("/approvals/pur_nope/approve", &[]).await;
    assert_eq!(p.status, 404);
    let long = "x".repeat(1001);
    ctx.db
        .insert_intent(&intent(
            "pur_wait3",
            &a,
            "pending_approval",
            30_000,
            "Shop",
            t,
        ))
        .await
        .unwrap();
    let p = ctx
        .admin
        .post("/approvals/pur_wait3/approve", &[("note", &long)])
        .await;
    assert_eq!(p.status, 422);
    assert_eq!(
        ctx.db.get_intent("pur_wait3").await.unwrap().status,
        "pending_approval"
    );

    // The queue shows what is left and the decided ones with their notes.
    let page = ctx.admin.get("/approvals").await;
    assert!(!page.body.contains("id=\"approval-pur_wait1\""));
    assert!(page.body.contains("id=\"approval-pur_wait3\""));
    assert!(
        page.body
            .contains("data-intent-id=\"pur_wait1\" data-outcome=\"approved\"")
    );
    assert!(
        page.body
            .contains("data-intent-id=\"pur_wait2\" data-outcome=\"declined\"")
    );
    assert!(
        page.body
            .contains("ok by finance, ticket #12 &lt;script&gt;")
    );

    // The detail page shows the approval with its note.
    let d = ctx.admin.get("/transactions/pur_wait1").await;
    assert_eq!(d.status, 200, "{}", d.body);
    assert!(d.body.contains("id=\"approval-note\""));
    assert!(d.body.contains("ok by finance, ticket #12 &lt;script&gt;"));
    assert!(
        d.body
            .contains("data-decided-by=\"admin\" data-outcome=\"approved\"")
    );
    let tx = ctx.admin.get("/transactions?status=approved").await;
    assert!(tx.body.contains("data-intent-id=\"pur_wait1\""));
}

async fn transactions_filter_and_show_the_chain(mut ctx: Ctx) {
    let a = ctx.agent.clone();
    let other = ctx
        .db
        .create_agent(
            &ctx.project,
            Some("agt_other"),
            "Other Bot",
            &roony::auth::generate(),
            &Actor::system(),
            now(),
        )
        .await
        .unwrap();
    // 2026-11-20 12:00 UTC, then a day later each.
    let day = 1_795_305_600 - 2 * 86_400 + 43_200;
    for i in [
        intent("pur_tx_a", &a, "approved", 1_500, "Acme Books", day),
        intent(
            "pur_tx_b",
            &a,
            "declined",
            99_000,
            "ACME Casino",
            day + 86_400,
        ),
        intent(
            "pur_tx_c",
            &other.id,
            "approved",
            700,
            "Paper Shop",
            day + 2 * 86_400,
        ),
    ] {
        ctx.db.insert_intent(&i).await.unwrap();
    }
    // An intent with a card, through the sync path.
    let key = roony::auth::generate();
    ctx.db
        .create_sidecar(&ctx.project, "sc", &key, &Actor::system(), now())
        .await
        .unwrap();
    let sidecar = ctx.db.find_sidecar(&key.key_id).await.unwrap().unwrap();
    let snap = wire::IntentSnapshot {
        id: "pur_tx_card".into(),
        agent_id: a.clone(),
        version: 2,
        status: "approved".into(),
        amount: 2_500,
        currency: "USD".into(),
        merchant_name: "Acme Cloud".into(),
        merchant_domain: Some("cloud.example".into()),
        merchant_country: Some("US".into()),
        merchant_category: Some("computer_software_stores".into()),
        description: Some("a server".into()),
        reserved: 2_525,
        expires_at: Some(day + 3 * 86_400 + 3600),
        decision: wire::DecisionSnapshot {
            id: "dec_tx_card".into(),
            outcome: "approved".into(),
            reasons: vec!["within_policy".into()],
            messages: vec![],
            decided_at: day + 3 * 86_400,
        },
        risk_score: Some(35),
        risk_signals: vec!["new_merchant".into(), "burst".into()],
        status_reason: None,
        card: Some(wire::CardSnapshot {
            stripe_card_id: "ic_tx_card".into(),
            last4: "4242".into(),
            exp_month: 12,
            exp_year: 2030,
            spending_limit: 2_525,
        }),
        created_at: day + 3 * 86_400,
        updated_at: day + 3 * 86_400 + 2,
    };
    let ack = ctx
        .db
        .apply_events(
            &sidecar,
            &[wire::SyncEvent {
                id: "pur_tx_card.2".into(),
                action: "intent.issued".into(),
                at: snap.updated_at,
                intent: snap,
            }],
            now(),
        )
        .await
        .unwrap();
    assert_eq!(ack.accepted, 1, "{ack:?}");
    let meta = |n: &str, kind: &str| StripeEventMeta {
        id: format!("evt_{n}"),
        kind: kind.into(),
        account: None,
        created: now(),
    };
    let merchant = MerchantData {
        name: "ACME CLOUD".into(),
        country: Some("US".into()),
        ..Default::default()
    };
    assert!(
        ctx.db
            .apply_authorization(
                &meta("auth", "issuing_authorization.created"),
                &StripeAuthorization {
                    id: "iauth_tx_card".into(),
                    card: StripeCard {
                        id: "ic_tx_card".into(),
                        ..Default::default()
                    },
                    amount: 2_500,
                    currency: "usd".into(),
                    approved: true,
                    status: "closed".into(),
                    merchant: merchant.clone(),
                    pending_amount: None,
                    pending_currency: None,
                    request_reasons: vec![],
                    last_request_amount: None,
                    created: now(),
                },
                now(),
            )
            .await
            .unwrap()
    );
    for (n, kind, amount) in [("ipi_cap", "capture", 2_500), ("ipi_ref", "refund", 500)] {
        assert!(
            ctx.db
                .apply_transaction(
                    &meta(n, "issuing_transaction.created"),
                    &StripeTransaction {
                        id: n.into(),
                        card_id: "ic_tx_card".into(),
                        authorization_id: (kind == "capture").then(|| "iauth_tx_card".into()),
                        kind: kind.into(),
                        amount,
                        currency: "usd".into(),
                        merchant: merchant.clone(),
                        created: now(),
                    },
                    now(),
                )
                .await
                .unwrap()
        );
    }

    let ids = |body: &str| -> Vec<String> {
        body.match_indices("data-test=\"tx-row\" data-intent-id=\"")
            .map(|(i, m)| {
                let rest = &body[i + m.len()..];
                rest[..rest.find('"').unwrap()].to_string()
            })
            .collect()
    };
    let project_query = format!("project={}", ctx.project);
    let all = ctx.admin.get("/transactions").await;
    assert_eq!(all.status, 200, "{}", all.body);
    assert_eq!(
        ids(&all.body),
        ["pur_tx_card", "pur_tx_c", "pur_tx_b", "pur_tx_a"]
    );
    assert!(all.body.contains("•••• 4242"));
    for (query, expected) in [
        ("status=declined", vec!["pur_tx_b"]),
        ("merchant=acme", vec!["pur_tx_card", "pur_tx_b", "pur_tx_a"]),
        (
            "merchant=acme&status=approved",
            vec!["pur_tx_card", "pur_tx_a"],
        ),
        ("agent=agt_other", vec!["pur_tx_c"]),
        ("from=2026-11-21&to=2026-11-21", vec!["pur_tx_b"]),
        ("from=2026-11-22", vec!["pur_tx_card", "pur_tx_c"]),
        (
            "currency=usd&min=10&max=25.00",
            vec!["pur_tx_card", "pur_tx_a"],
        ),
        ("currency=usd&min=25.01", vec!["pur_tx_b"]),
        ("currency=usd&max=7", vec!["pur_tx_c"]),
        ("merchant=%25", vec![]),
        ("intent=pur_tx_b", vec!["pur_tx_b"]),
        ("last4=4242", vec!["pur_tx_card"]),
        ("last4=1111", vec![]),
        (
            project_query.as_str(),
            vec!["pur_tx_card", "pur_tx_c", "pur_tx_b", "pur_tx_a"],
        ),
        ("project=prj_nope", vec![]),
    ] {
        let p = ctx.admin.get(&format!("/transactions?{query}")).await;
        assert_eq!(p.status, 200, "{query}: {}", p.body);
        assert_eq!(ids(&p.body), expected, "{query}");
    }
    // Bad filters: the form again with the error at its field (400), for the list and
    // the CSV alike.
    for (bad, field, code) in [
        ("from=2026-02-30", "from", "invalid_date"),
        ("currency=usd&min=abc", "min", "invalid_amount"),
        // An amount bound means minor units of one currency: it needs the currency.
        ("min=10", "currency", "currency_required"),
        ("status=bogus", "status", "invalid_status"),
        ("cursor=%%%", "cursor", "invalid_cursor"),
        ("currency=ZZZZ", "currency", "invalid_currency"),
        ("last4=42a2", "last4", "invalid_last4"),
    ] {
        for path in ["/transactions", "/transactions.csv"] {
            if field == "cursor" && path.ends_with(".csv") {
                continue; // the export has no pages
            }
            let p = ctx.admin.get(&format!("{path}?{bad}")).await;
            assert_eq!(p.status, 400, "{path}?{bad}");
            assert!(p.content_type.starts_with("text/html"), "{path}?{bad}");
            assert!(p.body.contains("id=\"tx-filters\""), "{path}?{bad}");
            assert!(
                p.body.contains(&format!(
                    "id=\"filter-error\" role=\"alert\" data-field=\"{field}\" data-code=\"{code}\""
                )),
                "{path}?{bad}: {}",
                p.body
            );
            assert!(
                p.body
                    .contains(&format!("data-field=\"{field}\" data-code=\"{code}\"")),
                "{path}?{bad}"
            );
        }
    }

    // Cursor pagination: 50 per page.
    for k in 0..50 {
        ctx.db
            .insert_intent(&intent(
                &format!("pur_pg_{k:02}"),
                &a,
                "approved",
                100,
                "Bulk",
                day - 86_400 - k,
            ))
            .await
            .unwrap();
    }
    let first = ctx.admin.get("/transactions").await;
    let first_ids = ids(&first.body);
    assert_eq!(first_ids.len(), 50);
    let start = first.body.find("id=\"next-page\"").expect("next page link");
    let href_at = first.body[start..].find("href=\"").unwrap() + start + 6;
    let href = &first.body[href_at..href_at + first.body[href_at..].find('"').unwrap()];
    let second = ctx.admin.get(&href.replace("&amp;", "&")).await;
    assert_eq!(second.status, 200);
    let second_ids = ids(&second.body);
    assert_eq!(second_ids.len(), 4);
    assert!(second_ids.iter().all(|i| !first_ids.contains(i)));
    assert!(!second.body.contains("id=\"next-page\""));
    assert!(
        !first.body.contains("id=\"newer-page\""),
        "the first page has nothing newer"
    );
    // "Newer" goes back to exactly the first page, which has nothing newer again.
    let href_of = |body: &str, id: &str| -> String {
        let start = body.find(&format!("id=\"{id}\"")).expect(id);
        let at = body[start..].find("href=\"").unwrap() + start + 6;
        body[at..at + body[at..].find('"').unwrap()].replace("&amp;", "&")
    };
    let back = ctx.admin.get(&href_of(&second.body, "newer-page")).await;
    assert_eq!(back.status, 200, "{}", back.body);
    assert_eq!(ids(&back.body), first_ids);
    assert!(!back.body.contains("id=\"newer-page\""));
    assert!(back.body.contains("id=\"next-page\""));
    // Filters survive paging both ways (53 approved: 50, then 3).
    let filtered = ctx.admin.get("/transactions?status=approved").await;
    assert_eq!(ids(&filtered.body).len(), 50);
    let older = ctx.admin.get(&href_of(&filtered.body, "next-page")).await;
    let older_ids = ids(&older.body);
    assert_eq!(older_ids, ["pur_pg_47", "pur_pg_48", "pur_pg_49"]);
    let newer = href_of(&older.body, "newer-page");
    assert!(newer.contains("status=approved"), "{newer}");
    assert_eq!(ids(&ctx.admin.get(&newer).await.body), ids(&filtered.body));

    // The chain of one purchase.
    let d = ctx.admin.get("/transactions/pur_tx_card").await;
    assert_eq!(d.status, 200, "{}", d.body);
    for part in [
        "id=\"chain-intent\"",
        "id=\"chain-decisions\"",
        "id=\"chain-approval\"",
        "id=\"chain-card\"",
        "id=\"chain-authorizations\"",
        "id=\"chain-settlements\"",
        "id=\"chain-discrepancies\"",
        "id=\"chain-budget\"",
        "data-card-id=\"ic_tx_card\"",
        "4242",
        "USD 25.00",
        "new_merchant, burst",
        "computer_software_stores",
        "data-decided-by=\"sidecar\" data-outcome=\"approved\"",
        "iauth_tx_card",
        "data-test=\"settlement\" data-kind=\"capture\"",
        "data-test=\"settlement\" data-kind=\"refund\"",
        "ipi_ref",
        "id=\"budget-captured\">USD 25.00</td>",
        "id=\"budget-refunded\">USD 5.00</td>",
        // Open: it counts its reservation (USD 25.25), more than what moved (USD 20.00).
        "Counts against budgets now",
        "id=\"budget-counted\" data-value=\"2525\"",
        "Held by the sidecar (last reported)",
        "While the purchase is open",
    ] {
        assert!(d.body.contains(part), "{part}");
    }
    assert!(!d.body.contains("Reserved now"));
    assert_eq!(ctx.admin.get("/transactions/pur_nope").await.status, 404);
    // Viewers may read.
    assert_eq!(
        ctx.viewer.get("/transactions/pur_tx_card").await.status,
        200
    );
}

async fn csv_export_quotes_and_guards(mut ctx: Ctx) {
    let a = ctx.agent.clone();
    let t = now() - 100;
    let mut jpy = intent("pur_csv_jpy", &a, "approved", 1_200, "Tokyo Shop", t + 2);
    jpy.currency = "JPY".into();
    for i in [
        intent(
            "pur_csv_quote",
            &a,
            "approved",
            1_240,
            "Acme, \"Best\" Books",
            t,
        ),
        intent(
            "pur_csv_inject",
            &a,
            "declined",
            5,
            "=HYPERLINK(\"http://evil\")",
            t + 1,
        ),
        jpy,
    ] {
        ctx.db.insert_intent(&i).await.unwrap();
    }
    let cookie = ctx
        .admin
        .jar
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("; ");
    let resp = ctx
        .admin
        .client
        .get(format!("{}/transactions.csv", ctx.base))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "text/csv; charset=utf-8"
    );
    let disposition = resp.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        disposition.starts_with("attachment; filename=\"roony-transactions-20")
            && disposition.ends_with(".csv\""),
        "{disposition}"
    );
    let body = resp.text().await.unwrap();
    let lines: Vec<&str> = body.split("\r\n").collect();
    assert_eq!(
        lines[0],
        "created_at,intent_id,project_id,agent_id,agent_name,merchant,merchant_domain,status,amount,amount_minor,currency,captured,captured_minor,refunded,refunded_minor,decided_at,admin_decision,approver,approver_note,admin_decided_at,card_last4,stripe_card_id,reasons"
    );
    assert!(
        !body.starts_with('\u{feff}'),
        "no byte order mark unless asked"
    );
    assert_eq!(lines.len(), 5, "{body}"); // header, 3 rows, trailing empty
    let rfc = roony::domain::time::rfc3339;
    let p = &ctx.project;
    assert_eq!(
        lines[1],
        format!(
            "{},pur_csv_jpy,{p},agt_buyer,Buyer Bot,Tokyo Shop,shop.example,approved,1200,1200,JPY,0,0,0,0,{},,,,,,,within_policy",
            rfc(t + 2),
            rfc(t + 2)
        )
    );
    assert_eq!(
        lines[2],
        format!(
            "{},pur_csv_inject,{p},agt_buyer,Buyer Bot,\"'=HYPERLINK(\"\"http://evil\"\")\",shop.example,declined,0.05,5,USD,0.00,0,0.00,0,{},,,,,,,exceeds_transaction_limit",
            rfc(t + 1),
            rfc(t + 1)
        )
    );
    assert_eq!(
        lines[3],
        format!(
            "{},pur_csv_quote,{p},agt_buyer,Buyer Bot,\"Acme, \"\"Best\"\" Books\",shop.example,approved,12.40,1240,USD,0.00,0,0.00,0,{},,,,,,,within_policy",
            rfc(t),
            rfc(t)
        )
    );
    // Same filters as the list.
    let p = ctx.admin.get("/transactions.csv?merchant=acme").await;
    assert_eq!(p.status, 200);
    assert_eq!(p.body.split("\r\n").filter(|l| !l.is_empty()).count(), 2);
    assert!(p.body.contains("pur_csv_quote"));
    assert_eq!(
        ctx.admin.get("/transactions.csv?from=nope").await.status,
        400
    );
    // Viewers may export.
    assert_eq!(ctx.viewer.get("/transactions.csv").await.status, 200);

    // An approved purchase with its approver, note, card and capture.
    ctx.db
        .insert_intent(&intent(
            "pur_csv_ok",
            &a,
            "pending_approval",
            6_000,
            "Hosting",
            t + 3,
        ))
        .await
        .unwrap();
    let p = ctx
        .admin
        .post("/approvals/pur_csv_ok/approve", &[("note", "renewal, ok")])
        .await;
    assert_eq!(p.status, 303, "{}", p.body);
    let decided = ctx.db.get_intent("pur_csv_ok").await.unwrap();
    let csv = ctx.admin.get("/transactions.csv?intent=pur_csv_ok").await;
    let rows: Vec<&str> = csv.body.split("\r\n").filter(|l| !l.is_empty()).collect();
    assert_eq!(rows.len(), 2, "{}", csv.body);
    assert!(
        rows[1].contains(&format!(
            ",approved,60.00,6000,USD,0.00,0,0.00,0,{},approved,admin@example.com,\"renewal, ok\",{},,,approved_by_admin",
            rfc(decided.updated_at),
            rfc(decided.updated_at)
        )),
        "{}",
        rows[1]
    );
}

/// The response's raw bytes (a BOM is kept).
async fn raw_get(ctx: &Ctx, path: &str) -> (u16, Vec<u8>) {
    let cookie = ctx
        .admin
        .jar
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("; ");
    let resp = ctx
        .admin
        .client
        .get(format!("{}{path}", ctx.base))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.bytes().await.unwrap().to_vec())
}

/// An intent with a card through a sidecar's sync event (one sidecar per test).
async fn synced(ctx: &Ctx, snap: wire::IntentSnapshot) {
    let key = roony::auth::from_plaintext(&format!(
        "{}{}0123456789abcdef",
        wire::SIDECAR_TOKEN_PREFIX,
        ctx.project
    ))
    .unwrap();
    let sidecar = match ctx.db.find_sidecar(&key.key_id).await.unwrap() {
        Some(s) => s,
        None => {
            ctx.db
                .create_sidecar(&ctx.project, "edge", &key, &Actor::system(), now())
                .await
                .unwrap();
            ctx.db.find_sidecar(&key.key_id).await.unwrap().unwrap()
        }
    };
    let ack = ctx
        .db
        .apply_events(
            &sidecar,
            &[wire::SyncEvent {
                id: format!("{}.{}", snap.id, snap.version),
                action: "intent.decided".into(),
                at: snap.updated_at,
                intent: snap,
            }],
            now(),
        )
        .await
        .unwrap();
    assert_eq!(ack.accepted, 1, "{ack:?}");
}

fn snapshot(id: &str, agent: &str, status: &str, amount: i64, at: i64) -> wire::IntentSnapshot {
    let outcome = if status == "pending_approval" {
        "pending_approval"
    } else {
        "approved"
    };
    wire::IntentSnapshot {
        id: id.into(),
        agent_id: agent.into(),
        version: 1,
        status: status.into(),
        amount,
        currency: "USD".into(),
        merchant_name: "Acme Cloud".into(),
        merchant_domain: Some("cloud.example".into()),
        merchant_country: Some("US".into()),
        merchant_category: None,
        description: Some("a server".into()),
        reserved: amount + amount / 100,
        expires_at: Some(at + 3600),
        decision: wire::DecisionSnapshot {
            id: format!("dec_{id}"),
            outcome: outcome.into(),
            reasons: vec![if outcome == "approved" {
                "within_policy".into()
            } else {
                "approval_required".into()
            }],
            messages: vec![],
            decided_at: at,
        },
        risk_score: None,
        risk_signals: vec![],
        status_reason: None,
        card: (outcome == "approved").then(|| wire::CardSnapshot {
            stripe_card_id: format!("ic_{id}"),
            last4: "4242".into(),
            exp_month: 12,
            exp_year: 2030,
            spending_limit: amount + amount / 100,
        }),
        created_at: at,
        updated_at: at,
    }
}

async fn settle(ctx: &Ctx, n: &str, card: &str, kind: &str, amount: i64, currency: &str, at: i64) {
    assert!(
        ctx.db
            .apply_transaction(
                &StripeEventMeta {
                    id: format!("evt_{n}"),
                    kind: "issuing_transaction.created".into(),
                    account: None,
                    created: at,
                },
                &StripeTransaction {
                    id: n.into(),
                    card_id: card.into(),
                    authorization_id: None,
                    kind: kind.into(),
                    amount,
                    currency: currency.into(),
                    merchant: MerchantData {
                        name: "ACME CLOUD".into(),
                        country: Some("US".into()),
                        ..Default::default()
                    },
                    created: at,
                },
                now(),
            )
            .await
            .unwrap()
    );
}

async fn exports_stream_every_row_and_settlements(mut ctx: Ctx) {
    let a = ctx.agent.clone();
    let t = now() - 10_000;
    // More rows than one batch of the export (1000): every one is in the CSV.
    for k in 0..1_205 {
        ctx.db
            .insert_intent(&intent(
                &format!("pur_many_{k:04}"),
                &a,
                "approved",
                100,
                "Bulk",
                t - k,
            ))
            .await
            .unwrap();
    }
    ctx.db
        .insert_intent(&intent(
            "pur_cafe",
            &a,
            "approved",
            450,
            "Café Zürich",
            t + 1,
        ))
        .await
        .unwrap();
    let (status, bytes) = raw_get(&ctx, "/transactions.csv").await;
    assert_eq!(status, 200);
    let body = String::from_utf8(bytes).unwrap();
    let rows: Vec<&str> = body.split("\r\n").filter(|l| !l.is_empty()).collect();
    assert_eq!(rows.len(), 1 + 1_206);
    let ids: std::collections::HashSet<&str> = rows[1..]
        .iter()
        .map(|r| r.split(',').nth(1).unwrap())
        .collect();
    assert_eq!(ids.len(), 1_206, "no row twice");
    assert!(ids.contains("pur_many_0000") && ids.contains("pur_many_1204"));
    assert!(!body.starts_with('\u{feff}'));
    // For Excel: a UTF-8 byte order mark first, the text unchanged.
    let (status, bytes) = raw_get(&ctx, "/transactions.csv?bom=1&merchant=caf").await;
    assert_eq!(status, 200);
    assert_eq!(&bytes[..3], b"\xEF\xBB\xBF");
    let body = String::from_utf8(bytes[3..].to_vec()).unwrap();
    assert!(body.starts_with("created_at,"));
    assert!(body.contains(",Café Zürich,"), "{body}");
    let page = ctx.admin.get("/transactions?merchant=caf").await;
    assert!(
        page.body
            .contains("href=\"/transactions.csv?merchant=caf&amp;bom=1\""),
        "{}",
        page.body
    );

    // Settlements by settlement date: one line per capture or refund.
    let oct5 = 1_791_158_400 + 3_600; // 2026-10-05 01:00 UTC
    let mut snap = snapshot("pur_set", &a, "approved", 2_500, oct5 - 600);
    snap.card.as_mut().unwrap().stripe_card_id = "ic_set".into();
    synced(&ctx, snap).await;
    settle(&ctx, "ipi_s1", "ic_set", "capture", 2_500, "usd", oct5).await;
    settle(
        &ctx,
        "ipi_s2",
        "ic_set",
        "refund",
        500,
        "usd",
        oct5 + 86_400,
    )
    .await;
    // Another currency, no purchase; and a capture in November.
    settle(
        &ctx,
        "ipi_s3",
        "ic_nobody",
        "capture",
        900,
        "eur",
        oct5 + 2 * 86_400,
    )
    .await;
    settle(
        &ctx,
        "ipi_s4",
        "ic_set",
        "capture",
        100,
        "usd",
        oct5 + 30 * 86_400,
    )
    .await;
    let (status, bytes) = raw_get(
        &ctx,
        "/settlements.csv?settled_from=2026-10-01&settled_to=2026-10-31",
    )
    .await;
    assert_eq!(status, 200);
    let body = String::from_utf8(bytes).unwrap();
    let rows: Vec<&str> = body.split("\r\n").filter(|l| !l.is_empty()).collect();
    assert_eq!(
        rows[0],
        "settled_at,settlement_date,kind,stripe_transaction_id,amount,net_amount,net_amount_minor,currency,intent_id,agent_id,agent_name,project_id,merchant,stripe_card_id"
    );
    assert_eq!(rows.len(), 4, "{body}");
    let p = &ctx.project;
    assert_eq!(
        rows[1],
        format!(
            "2026-10-05T01:00:00Z,2026-10-05,capture,ipi_s1,25.00,25.00,2500,USD,pur_set,agt_buyer,Buyer Bot,{p},ACME CLOUD,ic_set"
        )
    );
    assert_eq!(
        rows[2],
        format!(
            "2026-10-06T01:00:00Z,2026-10-06,refund,ipi_s2,5.00,-5.00,-500,USD,pur_set,agt_buyer,Buyer Bot,{p},ACME CLOUD,ic_set"
        )
    );
    assert!(rows[3].starts_with("2026-10-07T01:00:00Z,2026-10-07,capture,ipi_s3,9.00,9.00,900,EUR,,,,,ACME CLOUD,ic_nobody"), "{}", rows[3]);
    // The month's lines add up, per currency, to the overview's spend of the month.
    let october = ctx
        .db
        .dash_a_spend_by_currency(1_790_812_800, 1_793_491_200)
        .await
        .unwrap();
    for c in &october {
        let sum: i64 = rows[1..]
            .iter()
            .filter(|r| r.split(',').nth(7) == Some(c.currency.as_str()))
            .map(|r| r.split(',').nth(6).unwrap().parse::<i64>().unwrap())
            .sum();
        assert_eq!(sum, c.amount, "{}", c.currency);
    }
    assert_eq!(october.len(), 2);
    // One currency only, for Excel.
    let (_, bytes) = raw_get(
        &ctx,
        "/settlements.csv?settled_from=2026-10-01&settled_to=2026-10-31&currency=eur&bom=1",
    )
    .await;
    assert_eq!(&bytes[..3], b"\xEF\xBB\xBF");
    let body = String::from_utf8(bytes[3..].to_vec()).unwrap();
    assert_eq!(
        body.split("\r\n").filter(|l| !l.is_empty()).count(),
        2,
        "{body}"
    );
    // Bad ranges: the transactions page with the error at the settlements form.
    for (q, code) in [
        ("settled_from=2026-13-01", "invalid_date"),
        (
            "settled_from=2026-10-31&settled_to=2026-10-01",
            "invalid_date_range",
        ),
        ("currency=dollars", "invalid_currency"),
    ] {
        let p = ctx.admin.get(&format!("/settlements.csv?{q}")).await;
        assert_eq!(p.status, 400, "{q}");
        assert!(p.body.contains("id=\"settlement-export\""), "{q}");
        assert!(
            p.body
                .contains("id=\"settlement-filter-error\" role=\"alert\""),
            "{q}"
        );
        assert!(
            p.body.contains(&format!("data-code=\"{code}\"")),
            "{q}: {}",
            p.body
        );
    }
    assert_eq!(ctx.viewer.get("/settlements.csv").await.status, 200);

    // A settled purchase's chain says what it counts now: what moved, net of refunds.
    let mut done = snapshot("pur_done", &a, "settled", 3_000, oct5);
    done.card.as_mut().unwrap().stripe_card_id = "ic_done".into();
    done.reserved = 2_000;
    synced(&ctx, done).await;
    settle(
        &ctx,
        "ipi_d1",
        "ic_done",
        "capture",
        3_000,
        "usd",
        oct5 + 60,
    )
    .await;
    settle(
        &ctx,
        "ipi_d2",
        "ic_done",
        "refund",
        1_000,
        "usd",
        oct5 + 120,
    )
    .await;
    let i = ctx.db.get_intent("pur_done").await.unwrap();
    assert_eq!(i.status, "settled");
    let moved = (i.pending + i.captured - i.refunded).max(0);
    assert_eq!(moved, 2_000);
    let d = ctx.admin.get("/transactions/pur_done").await;
    assert_eq!(d.status, 200, "{}", d.body);
    assert!(
        d.body.contains("id=\"budget-counted\" data-value=\"2000\""),
        "{}",
        d.body
    );
    assert!(d.body.contains("Once the purchase has ended"));
}

async fn approvals_queue_is_safe(mut ctx: Ctx) {
    let a = ctx.agent.clone();
    let doc = json!({
        "currency": "USD",
        "max_per_transaction": 50_000,
        "budgets": [{"period": "daily", "limit": 100_000}, {"period": "monthly", "limit": 1_000_000}],
        "require_approval_above": 5_000,
        "risk": {"require_approval_above": 100, "decline_above": 100}
    });
    put_policy(&ctx, &doc).await;
    let frozen = ctx
        .db
        .create_agent(
            &ctx.project,
            Some("agt_cold"),
            "Cold Bot",
            &roony::auth::generate(),
            &Actor::system(),
            now(),
        )
        .await
        .unwrap();
    let t = now();
    // A pending purchase with the sidecar's sentences and a deadline in an hour.
    let mut msg = snapshot("pur_q_msg", &a, "pending_approval", 8_000, t - 1);
    msg.decision.messages = vec![
        "USD 80.00 is above the approval threshold of USD 50.00; an administrator must approve it"
            .into(),
    ];
    synced(&ctx, msg).await;
    // One whose deadline has passed (the sidecar has not reported it expired yet).
    let mut old = snapshot("pur_q_old", &a, "pending_approval", 1_000, t - 1);
    old.expires_at = Some(t - 60);
    synced(&ctx, old).await;
    // One of an agent frozen since.
    ctx.db
        .insert_intent(&intent(
            "pur_q_cold",
            &frozen.id,
            "pending_approval",
            7_000,
            "Shop",
            t - 30,
        ))
        .await
        .unwrap();
    ctx.db
        .set_agent_frozen(
            &frozen.id,
            Some("discrepancy over_capture: dis_9 on purchase pur_x"),
            &Actor::system(),
            now(),
        )
        .await
        .unwrap();

    let page = ctx.admin.get("/approvals").await;
    assert_eq!(page.status, 200, "{}", page.body);
    let b = &page.body;
    assert!(
        b.contains("id=\"pending-approvals\" data-count=\"3\""),
        "{b}"
    );
    assert!(b.contains("Waiting (3)"));
    let row = |id: &str| -> String {
        let start = b
            .find(&format!("id=\"approval-{id}\""))
            .unwrap_or_else(|| panic!("{id}"));
        b[start..start + b[start..].find("</tr>").unwrap()].to_string()
    };
    let m = row("pur_q_msg");
    assert!(
        m.contains("data-agent-status=\"active\" data-expired=\"false\""),
        "{m}"
    );
    assert!(
        m.contains("USD 80.00 is above the approval threshold of USD 50.00"),
        "{m}"
    );
    assert!(m.contains("data-code=\"approval_required\""));
    assert!(
        m.contains("expires in 59 min") || m.contains("expires in 58 min"),
        "{m}"
    );
    assert!(m.contains("data-test=\"approve\""));
    // What is left of each budget: both holds (USD 80.80 and USD 10.10) count today.
    assert!(
        m.contains("data-source=\"policy\" data-period=\"daily\" data-left=\"90910\""),
        "{m}"
    );
    assert!(m.contains("USD 909.10</strong> of USD 1000.00 left"), "{m}");
    let o = row("pur_q_old");
    assert!(o.contains("data-expired=\"true\""), "{o}");
    assert!(o.contains("class=\"expired\""), "{o}");
    assert!(
        !o.contains("data-test=\"approve\"") && !o.contains("data-test=\"deny\""),
        "{o}"
    );
    let c = row("pur_q_cold");
    assert!(c.contains("data-agent-status=\"frozen\""), "{c}");
    assert!(c.contains("discrepancy over_capture"), "{c}");
    assert!(!c.contains("data-test=\"approve\""), "{c}");
    assert!(c.contains("data-test=\"deny\""), "{c}");
    assert!(c.contains("no valid policy"), "{c}");

    // Approving for the frozen agent, or deciding the expired request: refused with the
    // queue again (409) saying why; nothing changes.
    let decisions = ctx.db.dash_recent_admin_decisions(50).await.unwrap().len();
    let revision = ctx.db.config_revision().await.unwrap();
    for (path, code) in [
        ("/approvals/pur_q_cold/approve", "agent_frozen"),
        ("/approvals/pur_q_old/approve", "intent_expired"),
        ("/approvals/pur_q_old/deny", "intent_expired"),
    ] {
        let p = ctx.admin.post(path, &[("note", "go")]).await;
        assert_eq!(p.status, 409, "{path}: {}", p.body);
        assert!(
            p.body.contains(&format!(
                "id=\"decision-refused\" role=\"alert\" data-code=\"{code}\""
            )),
            "{path}: {}",
            p.body
        );
        assert!(p.body.contains("nothing changed"));
        assert!(
            p.body.contains("id=\"approvals-table\""),
            "the queue is shown again"
        );
    }
    for id in ["pur_q_cold", "pur_q_old"] {
        assert_eq!(
            ctx.db.get_intent(id).await.unwrap().status,
            "pending_approval"
        );
    }
    assert_eq!(
        ctx.db.dash_recent_admin_decisions(50).await.unwrap().len(),
        decisions
    );
    assert_eq!(ctx.db.config_revision().await.unwrap(), revision);
    // Denying the frozen agent's purchase is allowed; approving an active one too.
    assert_eq!(
        ctx.admin
            .post("/approvals/pur_q_cold/deny", &[])
            .await
            .status,
        303
    );
    assert_eq!(
        ctx.admin
            .post("/approvals/pur_q_msg/approve", &[("note", "ok")])
            .await
            .status,
        303
    );
    // The chain page shows the sidecar's sentences of a decision.
    let mut shown = snapshot("pur_q_said", &a, "pending_approval", 6_000, t - 10);
    shown.decision.messages = vec!["an administrator must approve it".into()];
    synced(&ctx, shown).await;
    let d = ctx.admin.get("/transactions/pur_q_said").await;
    assert!(
        d.body.contains("id=\"intent-reason-messages\""),
        "{}",
        d.body
    );
    assert!(d.body.contains("an administrator must approve it"));

    // The heading counts every waiting purchase; the queue pages 50 at a time, oldest first.
    for k in 0..55 {
        ctx.db
            .insert_intent(&intent(
                &format!("pur_q_{k:02}"),
                &a,
                "pending_approval",
                6_000,
                "Shop",
                t - 100_000 + k,
            ))
            .await
            .unwrap();
    }
    let ids = |body: &str| -> Vec<String> {
        body.match_indices("data-test=\"approval-row\" data-intent-id=\"")
            .map(|(i, m)| {
                let rest = &body[i + m.len()..];
                rest[..rest.find('"').unwrap()].to_string()
            })
            .collect()
    };
    let first = ctx.admin.get("/approvals").await;
    assert!(first.body.contains("Waiting (57)"), "{}", first.body);
    let first_ids = ids(&first.body);
    assert_eq!(first_ids.len(), 50);
    assert_eq!(first_ids[0], "pur_q_00");
    let start = first
        .body
        .find("id=\"approvals-next\"")
        .expect("next page link");
    let at = first.body[start..].find("href=\"").unwrap() + start + 6;
    let href = first.body[at..at + first.body[at..].find('"').unwrap()].replace("&amp;", "&");
    let second = ctx.admin.get(&href).await;
    assert_eq!(second.status, 200);
    assert!(second.body.contains("Waiting (57)"));
    let second_ids = ids(&second.body);
    assert_eq!(second_ids.len(), 7);
    assert!(second_ids.iter().all(|i| !first_ids.contains(i)));
    assert!(
        second_ids.contains(&"pur_q_old".to_string())
            && second_ids.contains(&"pur_q_said".to_string())
    );
    assert!(!second.body.contains("id=\"approvals-next\""));
    assert_eq!(ctx.admin.get("/approvals?cursor=%%%").await.status, 400);
}

async fn dry_run_includes_agent_budgets(mut ctx: Ctx) {
    let a = ctx.agent.clone();
    put_policy(&ctx, &policy(10_000)).await;
    // USD 30.00 a day for this agent, set outside the policy (as its sidecar enforces).
    ctx.db
        .set_budget(
            roony::control::model::BudgetScope::Agent,
            &a,
            "daily",
            "USD",
            3_000,
            &Actor::system(),
            now(),
        )
        .await
        .unwrap();
    let day = (now() / 86_400 - 5) * 86_400;
    for i in [
        intent("pur_bud_a", &a, "approved", 2_000, "Shop", day + 36_000),
        intent("pur_bud_b", &a, "approved", 2_000, "Shop", day + 39_600),
    ] {
        ctx.db.insert_intent(&i).await.unwrap();
    }
    // The same policy as the draft: the agent budget declines the second purchase on both
    // sides (without it both would be approved).
    let same = policy(10_000).to_string();
    let p = ctx
        .admin
        .post(&format!("/agents/{a}/policy/dry-run"), &[("policy", &same)])
        .await;
    assert_eq!(p.status, 200, "{}", p.body);
    assert!(
        p.body.contains("data-replayed=\"2\" data-changed=\"0\""),
        "{}",
        p.body
    );
    assert!(p.body.contains("<span id=\"current-approved\">1</span>"));
    assert!(p.body.contains("<span id=\"current-declined\">1</span>"));
    assert!(p.body.contains("<span id=\"draft-declined\">1</span>"));
    assert!(
        p.body
            .contains("id=\"dry-run-agent-budgets\" data-count=\"1\""),
        "{}",
        p.body
    );
    // A tighter draft changes the first one only (the second was declined already).
    let tight = policy(1_500).to_string();
    let p = ctx
        .admin
        .post(
            &format!("/agents/{a}/policy/dry-run"),
            &[("policy", &tight)],
        )
        .await;
    assert!(
        p.body.contains("data-replayed=\"2\" data-changed=\"1\""),
        "{}",
        p.body
    );
    assert!(
        p.body
            .contains("data-intent-id=\"pur_bud_a\" data-old=\"approved\" data-new=\"declined\"")
    );

    // Tightening the agent budget itself, dry-run on the agent's page: nothing is saved.
    let path = format!("/agents/{a}/budgets/dry-run");
    let p = ctx
        .admin
        .post(
            &path,
            &[("period", "daily"), ("currency", "USD"), ("amount", "15")],
        )
        .await;
    assert_eq!(p.status, 200, "{}", p.body);
    assert!(
        p.body.contains("data-replayed=\"2\" data-changed=\"1\""),
        "{}",
        p.body
    );
    assert!(
        p.body
            .contains("data-intent-id=\"pur_bud_a\" data-old=\"approved\" data-new=\"declined\"")
    );
    assert!(p.body.contains("exceeds_budget"));
    assert!(p.body.contains("value=\"15\""), "the form keeps the amount");
    let budgets = ctx
        .db
        .list_budgets(Some(roony::control::model::BudgetScope::Agent), Some(&a))
        .await
        .unwrap();
    assert_eq!((budgets.len(), budgets[0].limit), (1, 3_000));
    // Loosening it: no change. Looser than the policy's monthly budget: refused.
    let p = ctx
        .admin
        .post(
            &path,
            &[("period", "daily"), ("currency", "USD"), ("amount", "100")],
        )
        .await;
    assert!(
        p.body.contains("data-changed=\"1\""),
        "pur_bud_b would pass: {}",
        p.body
    );
    assert!(
        p.body
            .contains("data-intent-id=\"pur_bud_b\" data-old=\"declined\" data-new=\"approved\"")
    );
    // Looser than the policy's USD 10,000.00, or equal to it: no effect, refused.
    for amount in ["20000", "10000"] {
        let p = ctx
            .admin
            .post(
                &path,
                &[
                    ("period", "monthly"),
                    ("currency", "USD"),
                    ("amount", amount),
                ],
            )
            .await;
        assert_eq!(p.status, 422, "{amount}");
        assert!(p.body.contains("data-code=\"budget_looser_than_policy\""));
    }
    let p = ctx
        .admin
        .post(
            &path,
            &[("period", "daily"), ("currency", "EUR"), ("amount", "1")],
        )
        .await;
    assert_eq!(p.status, 422);
    assert!(p.body.contains("data-code=\"budget_currency_mismatch\""));
    assert_eq!(
        ctx.viewer
            .post(
                &path,
                &[("period", "daily"), ("currency", "USD"), ("amount", "1")]
            )
            .await
            .status,
        403
    );
}

/// The overview's "reserved" is what open purchases count against budgets beyond what was
/// captured: the hold (or the amount when no reservation was reported), refunds included.
async fn overview_reserved_is_what_budgets_hold(mut ctx: Ctx) {
    let a = ctx.agent.clone();
    let t = now() - 600;
    // Held 10_100; 3_000 captured and refunded again: all 10_100 still held.
    synced(&ctx, snapshot("pur_res_a", &a, "approved", 10_000, t)).await;
    settle(
        &ctx,
        "ipi_res_1",
        "ic_pur_res_a",
        "capture",
        3_000,
        "usd",
        t + 1,
    )
    .await;
    settle(
        &ctx,
        "ipi_res_2",
        "ic_pur_res_a",
        "refund",
        3_000,
        "usd",
        t + 2,
    )
    .await;
    // No reservation reported: its amount is held.
    let mut b = snapshot("pur_res_b", &a, "issuing", 4_000, t);
    b.reserved = 0;
    b.card = None;
    synced(&ctx, b).await;
    // Captured beyond its hold: nothing is left reserved.
    synced(&ctx, snapshot("pur_res_c", &a, "approved", 1_000, t)).await;
    settle(
        &ctx,
        "ipi_res_3",
        "ic_pur_res_c",
        "capture",
        1_500,
        "usd",
        t + 3,
    )
    .await;
    // Settled: not open, nothing reserved.
    synced(&ctx, snapshot("pur_res_d", &a, "settled", 7_000, t)).await;

    let reserved = ctx.db.dash_a_reserved_by_currency().await.unwrap();
    assert_eq!(reserved.len(), 1, "{reserved:?}");
    assert_eq!(
        (reserved[0].currency.as_str(), reserved[0].amount),
        ("USD", 14_100)
    );
    let page = ctx.admin.get("/").await;
    assert_eq!(page.status, 200);
    let at = page.body.find("data-test=\"reserved\"").unwrap();
    let card: String = page.body[at..].chars().take(300).collect();
    assert!(card.contains("141.00"), "{card}");
}
