#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]
//! The control plane and sidecars as real processes (`roony control-plane`, `roony
//! sidecar`), issue 4 items 5 and 6:
//!
//! - three sidecars and two control-plane replicas on one PostgreSQL database: concurrent
//!   purchases against a shared project budget never approve more than it; a policy edit
//!   reaches all three sidecars within 1 s; a sidecar killed with SIGKILL under load loses no
//!   approved intent (after restart, every purchase an agent saw approved is in the sidecar
//!   and in the control plane's ledger);
//! - a partition: the control plane is stopped under load; the sidecar keeps approving
//!   within the allowance it holds, then declines with `control_plane_unreachable`; when
//!   the control plane is back, the outbox drains and both ledgers agree.

mod common;

use std::time::{Duration, Instant};

use common::process::stop;
use common::procs::*;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_sidecars_two_replicas_one_postgres() {
    let Some(pg) = PgSchema::new().await else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let emulator = common::start_emulator().await;
    let http = Http(reqwest::Client::new());
    let a = control_plane(tmp.path(), "cp-a", &pg.url(), "127.0.0.1:0");
    let b = control_plane(tmp.path(), "cp-b", &pg.url(), "127.0.0.1:0");

    const LIMIT: i64 = 30_000;
    let names = ["agt_c1", "agt_c2", "agt_c3"];
    let p = project(&http, &a.url, &names, LIMIT).await;
    let mut sidecars = Vec::new();
    for (i, cp) in [&a.url, &b.url, &a.url].into_iter().enumerate() {
        let token = sidecar_token(&http, cp, &p.id, &format!("edge-{i}")).await;
        let s = sidecar(tmp.path(), &format!("sc{i}"), &emulator.url, cp, &token);
        wait_synced(&http, &s.url, &p.keys[i]).await;
        sidecars.push((s, token));
    }

    // 1. 120 concurrent purchases of USD 10.00 (40 per sidecar, each its own agent) against
    //    a shared project budget of USD 300.00.
    let mut tasks = Vec::new();
    for (i, (s, _)) in sidecars.iter().enumerate() {
        for _ in 0..40 {
            let (http, url, key) = (http.clone(), s.url.clone(), p.keys[i].clone());
            tasks.push(tokio::spawn(
                async move { http.buy(&url, &key, 1_000).await },
            ));
        }
    }
    let mut approved = Vec::new();
    let mut declined = 0;
    for t in tasks {
        let (status, body) = t.await.unwrap();
        match status {
            201 => {
                assert_eq!(body["status"], "approved", "{body}");
                approved.push(body["id"].as_str().unwrap().to_string());
            }
            402 => {
                assert_eq!(codes(&body), ["exceeds_budget"], "{body}");
                declined += 1;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    let approved_total = approved.len() as i64 * 1_000;
    assert!(
        approved_total <= LIMIT,
        "approved {approved_total} over the shared budget of {LIMIT}"
    );
    // The budget is really spent, not declined wholesale: allowances still held idle by
    // other sidecars are the only gap.
    assert!(
        approved_total >= LIMIT / 2,
        "only {approved_total} of {LIMIT} approved ({declined} declined)"
    );
    let leases = http
        .admin(
            &a.url,
            reqwest::Method::GET,
            &format!("/budgets/{}/leases", p.budget_id),
            Value::Null,
        )
        .await;
    eprintln!(
        "cluster: {} approved ({approved_total} of {LIMIT}), {declined} declined",
        approved.len()
    );
    let leased: i64 = leases["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["granted"].as_i64().unwrap())
        .sum();
    assert!(leased <= LIMIT, "leases {leased} over {LIMIT}: {leases}");
    assert!(leased >= approved_total, "{leased} < {approved_total}");

    // Every approval reaches the control plane's ledger (through either replica).
    until(
        Duration::from_secs(20),
        "ledger has every approval",
        || async {
            let ledger = http.ledger(&b.url, &p.id).await;
            approved
                .iter()
                .all(|id| ledger.get(id).is_some_and(|i| i["status"] == "approved"))
                && ledger.len() == 120
        },
    )
    .await;

    // 2. A policy edit through replica B reaches all three sidecars within 1 s.
    http.admin(
        &b.url,
        reqwest::Method::PUT,
        "/agents/agt_c1/policy",
        policy(500),
    )
    .await;
    let edited = Instant::now();
    for (s, _) in &sidecars {
        let key = p.keys[0].clone();
        until(
            Duration::from_secs(5),
            "policy edit reached a sidecar",
            || {
                let (http, url, key) = (http.clone(), s.url.clone(), key.clone());
                async move {
                    let (status, body) = http.agent_get(&url, &key, "/api/v1/budget").await;
                    status == 200 && body["max_per_transaction"] == 500
                }
            },
        )
        .await;
    }
    let took = edited.elapsed();
    assert!(took < Duration::from_secs(1), "policy edit took {took:?}");

    // 3. SIGKILL a sidecar under load: nothing it approved is lost.
    http.admin(
        &a.url,
        reqwest::Method::PUT,
        "/budgets",
        json!({"scope": "project", "scope_id": p.id, "period": "daily", "currency": "USD", "limit": 10_000_000}),
    )
    .await;
    let (mut victim, token) = sidecars.pop().unwrap();
    let key = p.keys[2].clone();
    until(
        Duration::from_secs(5),
        "raised budget reached the sidecar",
        || {
            let (http, url, key) = (http.clone(), victim.url.clone(), key.clone());
            async move {
                let (_, body) = http.agent_get(&url, &key, "/api/v1/budget").await;
                body["budgets"]
                    .as_array()
                    .is_some_and(|b| b.iter().any(|x| x["limit"] == 10_000_000))
            }
        },
    )
    .await;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut load = Vec::new();
    for _ in 0..6 {
        let (http, url, key, seen) = (http.clone(), victim.url.clone(), key.clone(), seen.clone());
        load.push(tokio::spawn(async move {
            loop {
                let r = http
                    .0
                    .post(format!("{url}/api/v1/purchase_intent"))
                    .bearer_auth(&key)
                    .json(&common::purchase(100))
                    .send()
                    .await;
                let Ok(r) = r else { return };
                if r.status().as_u16() == 201
                    && let Ok(body) = r.json::<Value>().await
                {
                    seen.lock()
                        .unwrap()
                        .push(body["id"].as_str().unwrap().to_string());
                }
            }
        }));
    }
    until(Duration::from_secs(20), "load under way", || async {
        seen.lock().unwrap().len() >= 30
    })
    .await;
    kill9(&mut victim);
    for t in load {
        let _ = t.await;
    }
    let seen = seen.lock().unwrap().clone();
    let restarted = sidecar(tmp.path(), "sc2", &emulator.url, &a.url, &token);
    let sidecar_view = http.sidecar_intents(&restarted.url, &key).await;
    for id in &seen {
        let v = sidecar_view
            .get(id)
            .unwrap_or_else(|| panic!("approved {id} lost by the sidecar"));
        assert_eq!(v["status"], "approved", "{v}");
    }
    until(
        Duration::from_secs(20),
        "killed sidecar's outbox drained",
        || async {
            let ledger = http.ledger(&a.url, &p.id).await;
            seen.iter()
                .all(|id| ledger.get(id).is_some_and(|i| i["status"] == "approved"))
        },
    )
    .await;

    drop(restarted);
    drop(sidecars);
    drop((a, b));
    pg.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partition_stop_and_restart_the_control_plane() {
    let tmp = tempfile::tempdir().unwrap();
    let emulator = common::start_emulator().await;
    let http = Http(reqwest::Client::new());
    let db = roony::control::db::default_sqlite_url(&tmp.path().join("cp-db"));
    std::fs::create_dir_all(tmp.path().join("cp-db")).unwrap();
    let mut cp = control_plane(tmp.path(), "cp", &db, "127.0.0.1:0");
    // A tenth of the budget (80 purchases) is asked for at a time.
    const LIMIT: i64 = 400_000;
    let p = project(&http, &cp.url, &["agt_part"], LIMIT).await;
    let key = p.keys[0].clone();
    let token = sidecar_token(&http, &cp.url, &p.id, "edge").await;
    let sc = sidecar(tmp.path(), "sc", &emulator.url, &cp.url, &token);
    wait_synced(&http, &sc.url, &key).await;

    // Load: sequential purchases of USD 5.00 from two workers, recording every answer.
    let answers = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(u16, Value)>::new()));
    let running = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let mut load = Vec::new();
    for _ in 0..2 {
        let (http, url, key, answers, running) = (
            http.clone(),
            sc.url.clone(),
            key.clone(),
            answers.clone(),
            running.clone(),
        );
        load.push(tokio::spawn(async move {
            while running.load(std::sync::atomic::Ordering::SeqCst) {
                let answer = http.buy(&url, &key, 500).await;
                answers.lock().unwrap().push(answer);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }
    until(Duration::from_secs(20), "load under way", || async {
        answers.lock().unwrap().len() >= 20
    })
    .await;

    // The control plane goes away under load.
    let cp_addr = cp.url.trim_start_matches("http://").to_string();
    stop(&mut cp.child);
    let stopped_at = answers.lock().unwrap().len();
    until(
        Duration::from_secs(30),
        "declines with control_plane_unreachable",
        || async {
            answers.lock().unwrap()[stopped_at..]
                .iter()
                .any(|(s, b)| *s == 402 && codes(b) == ["control_plane_unreachable"])
        },
    )
    .await;
    let during: Vec<(u16, Value)> = answers.lock().unwrap()[stopped_at..].to_vec();
    for (status, body) in &during {
        assert!(
            *status == 201 || (*status == 402 && codes(body) == ["control_plane_unreachable"]),
            "unexpected while partitioned: {status} {body}\nsidecar log:\n{}",
            std::fs::read_to_string(&sc.log).unwrap_or_default()
        );
    }
    // Without the control plane, approvals stay within the allowance the sidecar held.
    let approved_during = during.iter().filter(|(s, _)| *s == 201).count() as i64 * 500;
    assert!(approved_during <= LIMIT / 10 + 1_000, "{approved_during}");
    assert!(
        approved_during > 0,
        "the allowance held when the control plane went away was not used"
    );

    // It comes back on the same address: purchases are approved again.
    let cp = control_plane(tmp.path(), "cp", &db, &cp_addr);
    let back_at = answers.lock().unwrap().len();
    until(
        Duration::from_secs(30),
        "approvals after reconnect",
        || async {
            answers.lock().unwrap()[back_at..]
                .iter()
                .any(|(s, _)| *s == 201)
        },
    )
    .await;
    running.store(false, std::sync::atomic::Ordering::SeqCst);
    for t in load {
        t.await.unwrap();
    }
    let all = answers.lock().unwrap().clone();
    let approved_total = all.iter().filter(|(s, _)| *s == 201).count() as i64 * 500;
    assert!(approved_total <= LIMIT);
    eprintln!(
        "partition: {} purchases, {} during the partition ({} approved within the allowance), {} approved in all",
        all.len(),
        during.len(),
        approved_during / 500,
        approved_total / 500
    );

    // The outbox drains and the ledgers agree: every intent the sidecar holds is in the
    // control plane with the same status and amount.
    let sidecar_view = http.sidecar_intents(&sc.url, &key).await;
    assert_eq!(sidecar_view.len(), all.len());
    until(Duration::from_secs(20), "ledgers agree", || async {
        let ledger = http.ledger(&cp.url, &p.id).await;
        ledger.len() == sidecar_view.len()
            && sidecar_view.iter().all(|(id, v)| {
                ledger
                    .get(id)
                    .is_some_and(|l| l["status"] == v["status"] && l["amount"] == v["amount"])
            })
    })
    .await;
    let log = std::fs::read_to_string(&cp.log).unwrap_or_default();
    assert!(!log.contains("panicked"), "{log}");
}

/// An administrator's approval reaches the agent: a purchase above the approval threshold
/// waits (`pending_approval`, amount reserved); approved in the control plane, the sidecar
/// creates the card and the agent gets it from `GET /api/v1/purchase_intents/{id}`; a
/// denied one is declined with `denied_by_admin` and its reservation released.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_approval_reaches_the_agent() {
    let tmp = tempfile::tempdir().unwrap();
    let emulator = common::start_emulator().await;
    let http = Http(reqwest::Client::new());
    let db = roony::control::db::default_sqlite_url(&tmp.path().join("cp-db"));
    std::fs::create_dir_all(tmp.path().join("cp-db")).unwrap();
    let cp = control_plane(tmp.path(), "cp", &db, "127.0.0.1:0");
    let p = project(&http, &cp.url, &["agt_appr"], 100_000).await;
    let key = p.keys[0].clone();
    let mut pol = policy(10_000);
    pol["require_approval_above"] = json!(1_000);
    pol["budgets"] = json!([{"period": "daily", "limit": 20_000}]);
    http.admin(
        &cp.url,
        reqwest::Method::PUT,
        "/agents/agt_appr/policy",
        pol,
    )
    .await;
    let token = sidecar_token(&http, &cp.url, &p.id, "edge").await;
    let sc = sidecar(tmp.path(), "sc", &emulator.url, &cp.url, &token);
    wait_synced(&http, &sc.url, &key).await;

    let budget_left = || async {
        let (_, b) = http.agent_get(&sc.url, &key, "/api/v1/budget").await;
        b["budgets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["scope"] == "agent")
            .unwrap()["remaining"]
            .as_i64()
            .unwrap()
    };
    let (status, first) = http.buy(&sc.url, &key, 4_000).await;
    assert_eq!(status, 202, "{first}");
    assert_eq!(first["status"], "pending_approval");
    let (status, second) = http.buy(&sc.url, &key, 3_000).await;
    assert_eq!(status, 202, "{second}");
    assert_eq!(
        budget_left().await,
        13_000,
        "both are reserved while they wait"
    );
    let first_id = first["id"].as_str().unwrap().to_string();
    let second_id = second["id"].as_str().unwrap().to_string();
    until(
        Duration::from_secs(10),
        "pending intents in the ledger",
        || async {
            let ledger = http.ledger(&cp.url, &p.id).await;
            ledger
                .get(&first_id)
                .is_some_and(|i| i["status"] == "pending_approval")
                && ledger.contains_key(&second_id)
        },
    )
    .await;

    http.admin(
        &cp.url,
        reqwest::Method::POST,
        &format!("/intents/{first_id}/approve"),
        json!({"note": "looks right"}),
    )
    .await;
    http.admin(
        &cp.url,
        reqwest::Method::POST,
        &format!("/intents/{second_id}/deny"),
        json!({"note": "not this one"}),
    )
    .await;
    let path = format!("/api/v1/purchase_intents/{first_id}");
    let took = until(
        Duration::from_secs(5),
        "approval reached the agent",
        || async {
            let (_, v) = http.agent_get(&sc.url, &key, &path).await;
            v["status"] == "approved"
        },
    )
    .await;
    let (_, approved) = http.agent_get(&sc.url, &key, &path).await;
    let card = &approved["card"];
    assert!(common::luhn(card["number"].as_str().unwrap()), "{approved}");
    assert_eq!(card["cvc"].as_str().unwrap().len(), 3);
    assert_eq!(card["spending_limit"], 4_000);
    assert!(codes(&approved).contains(&"approved_by_admin".to_string()));
    eprintln!("approval reached the agent {took:?} after the admin decided");

    let path = format!("/api/v1/purchase_intents/{second_id}");
    until(
        Duration::from_secs(5),
        "denial reached the agent",
        || async {
            let (_, v) = http.agent_get(&sc.url, &key, &path).await;
            v["status"] == "declined" && codes(&v).contains(&"denied_by_admin".to_string())
        },
    )
    .await;
    assert_eq!(
        budget_left().await,
        16_000,
        "the denied reservation is released"
    );

    // The ledger follows: the approved intent is approved with its card, the approval is
    // no longer pending in the bundle, and the card is active at the issuer.
    until(
        Duration::from_secs(10),
        "ledger has the outcome",
        || async {
            let ledger = http.ledger(&cp.url, &p.id).await;
            ledger
                .get(&first_id)
                .is_some_and(|i| i["status"] == "approved")
                && ledger
                    .get(&second_id)
                    .is_some_and(|i| i["status"] == "declined")
        },
    )
    .await;
    let cards = emulator.cards().await;
    assert_eq!(cards.len(), 1);
    assert_eq!(cards[0]["status"], "active");
    assert_eq!(cards[0]["metadata"]["roony_intent_id"], json!(first_id));
}

/// The offline limit: a sidecar that has not reached its control plane for longer than
/// `--offline-limit` declines everything with `control_plane_unreachable`, even within the
/// allowance it holds, and recovers when the control plane is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn offline_limit_declines_until_the_control_plane_returns() {
    let tmp = tempfile::tempdir().unwrap();
    let emulator = common::start_emulator().await;
    let http = Http(reqwest::Client::new());
    let db = roony::control::db::default_sqlite_url(&tmp.path().join("cp-db"));
    std::fs::create_dir_all(tmp.path().join("cp-db")).unwrap();
    let mut cp = control_plane(tmp.path(), "cp", &db, "127.0.0.1:0");
    let p = project(&http, &cp.url, &["agt_off"], 1_000_000).await;
    let key = p.keys[0].clone();
    let token = sidecar_token(&http, &cp.url, &p.id, "edge").await;
    let sc = sidecar_with(
        tmp.path(),
        "sc",
        &emulator.url,
        &cp.url,
        &token,
        &[("ROONY_OFFLINE_LIMIT", "2")],
    );
    wait_synced(&http, &sc.url, &key).await;
    let (status, body) = http.buy(&sc.url, &key, 500).await;
    assert_eq!(status, 201, "{body}");

    let cp_addr = cp.url.trim_start_matches("http://").to_string();
    stop(&mut cp.child);
    let stopped = Instant::now();
    let (status, body) = http.buy(&sc.url, &key, 500).await;
    assert_eq!(
        status, 201,
        "within the allowance and the offline limit: {body}"
    );
    tokio::time::sleep(Duration::from_millis(3_200).saturating_sub(stopped.elapsed())).await;
    let (status, body) = http.buy(&sc.url, &key, 500).await;
    assert_eq!(status, 402, "{body}");
    assert_eq!(codes(&body), ["control_plane_unreachable"], "{body}");
    assert!(
        body["reasons"][0]["message"]
            .as_str()
            .unwrap()
            .contains("offline limit"),
        "{body}"
    );

    let _cp = control_plane(tmp.path(), "cp", &db, &cp_addr);
    until(Duration::from_secs(20), "approved again", || async {
        http.buy(&sc.url, &key, 500).await.0 == 201
    })
    .await;
}
