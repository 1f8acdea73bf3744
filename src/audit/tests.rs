use serde_json::json;

use super::*;

fn entry(n: u64) -> Entry {
    Entry {
        id: format!("aud_{n}"),
        at: 1_700_000_000 + n as i64,
        actor_type: "admin_token".into(),
        actor_id: "abcd".into(),
        action: "agent.create".into(),
        target_type: "agent".into(),
        target_id: format!("agt_{n}"),
        outcome: "success".into(),
        request_id: Some(format!("req_{n}")),
        details: json!({"name": "a", "n": n}),
    }
}

fn chain(n: u64) -> Vec<AuditEvent> {
    let mut out: Vec<AuditEvent> = Vec::new();
    for i in 1..=n {
        let prev = out.last().map(|e| e.hash.clone()).unwrap_or(GENESIS.into());
        out.push(entry(i).link(i, &prev));
    }
    out
}

#[test]
fn a_chain_verifies() {
    let c = chain(5);
    assert_eq!(c[0].prev_hash, GENESIS);
    assert_eq!(c[1].prev_hash, c[0].hash);
    assert_eq!(c[0].hash.len(), 64);
    let report = verify(&c).unwrap();
    assert_eq!(report.count, 5);
    assert_eq!(report.head, c[4].hash);
    let empty = verify(&[]).unwrap();
    assert_eq!((empty.count, empty.head.as_str()), (0, GENESIS));
}

#[test]
fn the_hash_covers_prev_hash_and_every_field() {
    let e = entry(1).link(1, GENESIS);
    // Deterministic: the same event hashes the same (key order does not matter).
    assert_eq!(event_hash(&e), e.hash);
    let mut other = e.clone();
    other.details = json!({"n": 1, "name": "a"});
    assert_eq!(event_hash(&other), e.hash);
    for edit in [
        |e: &mut AuditEvent| e.id.push('x'),
        |e: &mut AuditEvent| e.at += 1,
        |e: &mut AuditEvent| e.actor_id.push('x'),
        |e: &mut AuditEvent| e.action.push('x'),
        |e: &mut AuditEvent| e.target_id.push('x'),
        |e: &mut AuditEvent| e.outcome = "failure".into(),
        |e: &mut AuditEvent| e.request_id = None,
        |e: &mut AuditEvent| e.details["name"] = json!("b"),
        |e: &mut AuditEvent| e.prev_hash = "1".repeat(64),
    ] {
        let mut changed = e.clone();
        edit(&mut changed);
        assert_ne!(event_hash(&changed), e.hash);
    }
}

#[test]
fn verify_names_the_first_broken_link() {
    // An edited event.
    let mut c = chain(5);
    c[2].details = json!({"name": "tampered"});
    let b = verify(&c).unwrap_err();
    assert_eq!(
        (b.seq, b.id.as_str(), b.reason),
        (3, "aud_3", "hash_mismatch")
    );
    assert_eq!(b.to_string(), "broken at event #3 (aud_3): hash_mismatch");

    // An edited event whose hash was recomputed: the next link breaks.
    let mut c = chain(5);
    c[2].details = json!({"name": "tampered"});
    c[2].hash = event_hash(&c[2]);
    let b = verify(&c).unwrap_err();
    assert_eq!((b.seq, b.reason), (4, "prev_hash_mismatch"));

    // A removed event.
    let mut c = chain(5);
    c.remove(1);
    let b = verify(&c).unwrap_err();
    assert_eq!((b.seq, b.reason), (3, "seq_gap"));

    // Removed and renumbered: prev_hash no longer matches.
    let mut c = chain(5);
    c.remove(1);
    for (i, e) in c.iter_mut().enumerate() {
        e.seq = i as u64 + 1;
        e.hash = event_hash(e);
    }
    let b = verify(&c).unwrap_err();
    assert_eq!((b.seq, b.reason), (2, "prev_hash_mismatch"));

    // The tail removed: only the recorded head tells.
    let c = chain(5);
    let mut v = Verifier::new();
    for e in &c[..3] {
        v.check(e).unwrap();
    }
    let b = v.check_head(5, &c[4].hash).unwrap_err();
    assert_eq!((b.seq, b.reason), (4, "head_mismatch"));
    let mut v = Verifier::new();
    for e in &c {
        v.check(e).unwrap();
    }
    v.check_head(5, &c[4].hash).unwrap();
}

#[test]
fn details_are_scrubbed_before_hashing() {
    let pan = "4242424242424242";
    let mut e = entry(1);
    e.details = json!({
        "note": format!("card {pan} and 4242 4242 4242 4242 and 4000-0566-5566-5556"),
        "nested": [{"cvc": "123", "number": pan, "exp_month": 12}],
        "key": "roony_ak_0123456789abcdef_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "secrets": "roony_at_abcdef0123456789 roony_st_ffff0000ffff0000 whsec_abcdefgh1234 sk_test_51abcdefgh rk_live_abcdefghij",
        "token_id": "abcd",
        "ids": "ic_1234567890123456 req_4242424242424242x 1700000000 12345",
        "desk_manager": "ask_me",
    });
    let ev = e.link(1, GENESIS);
    let mut kept = ev.details.clone();
    kept["ids"] = json!(null);
    let text = kept.to_string();
    assert!(!text.contains(pan), "{text}");
    assert!(!text.contains("4242 4242"), "{text}");
    assert!(!text.contains("4000-0566"), "{text}");
    assert!(!text.contains("123\""), "{text}");
    for secret in [
        "roony_ak_",
        "roony_at_",
        "roony_st_",
        "whsec_",
        "sk_test",
        "rk_live",
    ] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
    assert_eq!(ev.details["nested"][0]["exp_month"], 12);
    assert_eq!(ev.details["token_id"], "abcd");
    // Not card numbers: inside ids, short numbers, timestamps.
    assert_eq!(
        ev.details["ids"],
        "ic_1234567890123456 req_4242424242424242x 1700000000 12345"
    );
    assert_eq!(ev.details["desk_manager"], "ask_me");
    assert_eq!(event_hash(&ev), ev.hash);
    verify([&ev]).unwrap();
}

#[test]
fn luhn_and_request_ids() {
    assert!(luhn(b"4242424242424242"));
    assert!(!luhn(b"4242424242424241"));
    assert_eq!(accept_request_id("req_abc").as_deref(), Some("req_abc"));
    assert!(accept_request_id("has space").is_none());
    assert!(accept_request_id(&"x".repeat(200)).is_none());
    assert!(accept_request_id("roony_at_0123456789abcdef").is_none());
}
