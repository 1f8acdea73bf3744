//! The sync protocol's wire types (format 1), shared by the control plane (which serves
//! bundles) and the sidecar (which fetches, verifies, applies and persists them).
//!
//! A bundle is signed with HMAC-SHA256 over the canonical JSON of the bundle without its
//! `signature` field (object keys sorted, no whitespace), keyed with the SHA-256 digest of
//! the sidecar's token. The sidecar knows its token, so it can verify a bundle it fetched
//! and the copy it persisted; the control plane sees the token on every request.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The bundle format this build speaks.
pub const FORMAT: u32 = 1;
/// The long-poll endpoint of the control plane.
pub const BUNDLE_PATH: &str = "/api/sync/v1/bundle";
/// Longest long-poll a client may ask for (`?wait=`), in seconds.
pub const MAX_WAIT_SECONDS: u64 = 30;
/// Prefix of generated sidecar tokens.
pub const SIDECAR_TOKEN_PREFIX: &str = "roony_st_";
/// Where sidecars deliver their outbox (events up).
pub const EVENTS_PATH: &str = "/api/sync/v1/events";
/// Most events in one [`EventBatch`].
pub const MAX_EVENTS_PER_BATCH: usize = 500;
/// Where sidecars ask for allowances (leases) of shared budgets.
pub const LEASES_PATH: &str = "/api/sync/v1/leases";
/// Most leases in one [`LeaseRequest`].
pub const MAX_LEASES_PER_REQUEST: usize = 100;

/// Everything a sidecar needs to enforce its project's policies.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Bundle {
    /// Always [`FORMAT`] for this version.
    pub format: u32,
    /// The control plane's configuration revision the bundle was built at (monotonic).
    pub revision: i64,
    /// Hex digest of the bundle's content (see [`content_etag`]): equal content, equal ETag.
    /// Sent as the HTTP `ETag` (quoted).
    pub etag: String,
    /// Unix seconds.
    pub generated_at: i64,
    pub project_id: String,
    /// Every agent of the project, ordered by id.
    pub agents: Vec<BundleAgent>,
    /// Shared budgets that apply to every agent of the project: the project's own and its
    /// organization's, ordered by id. They are spent through leases (see [`LeaseRequest`]).
    #[serde(default)]
    pub budgets: Vec<BundleBudget>,
    /// Administrators' decisions on `pending_approval` intents of this project that the
    /// sidecar has not yet acted on (reported back through events), ordered by intent id.
    #[serde(default)]
    pub approvals: Vec<BundleApproval>,
    /// The organization's Stripe connection as the control plane's issuing relay sees it;
    /// absent when the control plane holds no Stripe credentials (older control planes too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stripe: Option<BundleStripe>,
    /// Hex HMAC-SHA256 (see the module documentation). Empty while being signed.
    #[serde(default)]
    pub signature: String,
}

/// The Stripe connection of the sidecar's organization (see docs/stripe-credentials.md).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleStripe {
    /// `connected` or `disconnected`: a sidecar issuing through the relay declines new
    /// purchases with `stripe_account_disconnected` while disconnected.
    pub status: String,
}

impl BundleStripe {
    pub fn is_disconnected(&self) -> bool {
        self.status != "connected"
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BundleAgent {
    pub id: String,
    pub name: String,
    /// `active` or `frozen`.
    pub status: String,
    /// The current policy document, or `null` when none was written (the agent cannot buy).
    pub policy: Option<Value>,
    /// Every key of the agent, ordered by key id.
    pub keys: Vec<BundleKey>,
    /// Budgets set on this agent through the admin API, ordered by id. Enforced locally by
    /// the sidecar, in addition to the budgets of the policy document.
    #[serde(default)]
    pub budgets: Vec<BundleBudget>,
}

/// A budget set through the admin API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleBudget {
    pub id: String,
    /// `org`, `project` or `agent`.
    pub scope: String,
    pub scope_id: String,
    /// `daily`, `weekly`, `monthly` or `all_time` (UTC calendar periods).
    pub period: String,
    /// ISO 4217; the budget counts purchases in this currency only.
    pub currency: String,
    /// Minor units.
    pub limit: i64,
}

/// An administrator's decision on a `pending_approval` intent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleApproval {
    pub intent_id: String,
    pub agent_id: String,
    /// `true`: approved (the sidecar issues the card); `false`: denied.
    pub approved: bool,
    pub note: Option<String>,
    /// Who decided (the admin token's or user's name).
    pub actor: String,
    /// Unix seconds.
    pub decided_at: i64,
}

// ----- events up ------------------------------------------------------------------------

/// `POST /api/sync/v1/events`: events from a sidecar's outbox, oldest first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventBatch {
    /// Always [`FORMAT`].
    pub format: u32,
    pub events: Vec<SyncEvent>,
}

/// One change of one intent at a sidecar. Delivered at least once; the control plane
/// applies each `id` once, and applies an intent snapshot only if its `version` is newer
/// than the one it holds, so redelivery and reordering are harmless.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SyncEvent {
    /// `"{intent_id}.{version}"`: the same for every delivery of this event.
    pub id: String,
    /// What happened, also the audit action: `intent.decided`, `intent.issued`,
    /// `intent.failed`, `intent.canceled`, `intent.expired`, `intent.approved`,
    /// `intent.denied`.
    pub action: String,
    /// Unix seconds.
    pub at: i64,
    /// The intent after the change.
    pub intent: IntentSnapshot,
}

/// An intent as the sidecar holds it (never a card number or CVC).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IntentSnapshot {
    pub id: String,
    pub agent_id: String,
    /// Increases with every change of the intent at the sidecar (1 at the decision).
    pub version: i64,
    /// `issuing`, `approved`, `declined`, `pending_approval`, `failed`, `canceled`,
    /// `expired`.
    pub status: String,
    pub amount: i64,
    pub currency: String,
    pub merchant_name: String,
    pub merchant_domain: Option<String>,
    pub merchant_country: Option<String>,
    /// Stripe category name, when the purchase named one.
    #[serde(default)]
    pub merchant_category: Option<String>,
    pub description: Option<String>,
    /// Minor units held against budgets now (0 once released).
    pub reserved: i64,
    /// Unix seconds when the card (or the pending approval) expires.
    #[serde(default)]
    pub expires_at: Option<i64>,
    pub decision: DecisionSnapshot,
    /// The decision's risk score (0–100), when it was scored.
    #[serde(default)]
    pub risk_score: Option<u8>,
    /// Codes of the risk signals behind the score (e.g. `split_purchase`).
    #[serde(default)]
    pub risk_signals: Vec<String>,
    /// Reason code of the last status change (e.g. `card_issuance_failed`).
    pub status_reason: Option<String>,
    pub card: Option<CardSnapshot>,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DecisionSnapshot {
    pub id: String,
    /// `approved`, `declined` or `pending_approval`.
    pub outcome: String,
    /// Reason codes.
    pub reasons: Vec<String>,
    /// The reasons' sentences as the agent was told them, in the order of `reasons`
    /// (absent from older sidecars).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub messages: Vec<String>,
    pub decided_at: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CardSnapshot {
    pub stripe_card_id: String,
    pub last4: String,
    pub exp_month: i64,
    pub exp_year: i64,
    pub spending_limit: i64,
}

/// The answer to an [`EventBatch`]: every event of the batch is settled (the sidecar
/// deletes them all from its outbox).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventAck {
    /// Applied now.
    pub accepted: usize,
    /// Seen before (ignored).
    pub duplicates: usize,
    /// Refused for good (e.g. an agent that is not in the sidecar's project); recorded as
    /// failed audit events at the control plane.
    pub rejected: Vec<RejectedEvent>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RejectedEvent {
    pub id: String,
    pub code: String,
    pub message: String,
}

// ----- leases of shared budgets -----------------------------------------------------------

/// `POST /api/sync/v1/leases`: the allowances this sidecar wants to hold now.
///
/// Invariant kept by the control plane: for every shared budget and bucket, the sum of the
/// allowances granted to all sidecars never exceeds the budget's limit at the time of each
/// grant. A sidecar approves against a shared budget only while its reservations in that
/// bucket stay within the allowance it holds, so the total approved never exceeds the limit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LeaseRequest {
    /// Always [`FORMAT`].
    pub format: u32,
    /// Increases with every lease request of this sidecar; the control plane ignores a
    /// request older than the newest it has applied for a lease (a late retry).
    pub seq: i64,
    pub leases: Vec<LeaseWant>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LeaseWant {
    pub budget_id: String,
    /// The period bucket (Unix seconds of its start, UTC; 0 for `all_time`).
    pub bucket_start: i64,
    /// The total allowance wanted for this bucket (not an increment): more than held asks
    /// for more, less gives the difference back. Minor units, ≥ 0.
    pub want: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LeaseResponse {
    /// One grant per requested lease, in request order.
    pub leases: Vec<LeaseGrant>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LeaseGrant {
    pub budget_id: String,
    pub bucket_start: i64,
    /// The allowance this sidecar now holds: `min(want, limit − granted to others)`, never
    /// negative; the allowance already held, unchanged, when the request's `seq` is stale;
    /// 0 for a budget that no longer exists or does not apply to this sidecar (only `org`
    /// and `project` budgets of the sidecar's project are leased).
    pub granted: i64,
    /// The budget's limit (0 if it does not exist).
    pub limit: i64,
    /// Granted to all sidecars together, this one included, after this grant.
    pub leased_total: i64,
}

/// A key as the sidecar verifies it: its id and the SHA-256 hex of the key, never the key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BundleKey {
    pub key_id: String,
    pub key_hash: String,
    pub revoked: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("the bundle is not valid json: {0}")]
    Malformed(String),
    #[error("bundle format {0} is not supported (expected {FORMAT})")]
    Format(String),
    #[error("the bundle signature does not verify")]
    Signature,
}

// ----- updates down (authorizations and settlement) -------------------------------------

/// `GET /api/sync/v1/updates?after=<seq>&wait=<seconds>`: what happened to the project's
/// cards at Stripe, in order.
pub const UPDATES_PATH: &str = "/api/sync/v1/updates";
/// Most updates in one [`UpdateFeed`].
pub const MAX_UPDATES_PER_FEED: usize = 500;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UpdateFeed {
    /// Always [`FORMAT`].
    pub format: u32,
    /// Oldest first; each carries the intent's whole money state, so only the newest one
    /// per intent matters.
    pub updates: Vec<IntentUpdate>,
    /// Ask for `after=<this>` next (the last update's seq, or the `after` asked for).
    pub next_after: i64,
}

/// The money state of one intent's card at Stripe, as the control plane's ledger has it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IntentUpdate {
    /// Increasing across the control plane (per database).
    pub seq: i64,
    pub intent_id: String,
    pub agent_id: String,
    /// `active`, `inactive` or `canceled`, when known.
    pub card_status: Option<String>,
    /// Every authorization on the card, oldest first.
    pub authorizations: Vec<AuthorizationSnapshot>,
    /// Captured, minor units (positive), including force captures.
    pub captured: i64,
    /// Refunded, minor units (positive).
    pub refunded: i64,
    /// Approved authorizations not yet captured, reversed or expired.
    pub pending: i64,
    /// No more money can move on this card (it is canceled and nothing is pending): what
    /// was captured minus refunds is the purchase's final spend.
    pub closed: bool,
    /// Discrepancy codes found on this card (e.g. `over_capture`).
    pub discrepancies: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuthorizationSnapshot {
    /// Stripe id (`iauth_…`).
    pub id: String,
    /// Amount approved (or requested, if declined), minor units.
    pub amount: i64,
    pub currency: String,
    pub approved: bool,
    /// `pending`, `closed`, `reversed` or `expired`.
    pub status: String,
    pub merchant_name: String,
    pub merchant_country: Option<String>,
    pub merchant_category: Option<String>,
    /// Roony's reason codes (real-time decision), or Stripe's request reason.
    pub reasons: Vec<String>,
    /// Unix seconds.
    pub created_at: i64,
}

// ----- card metadata (the intent a card carries) ----------------------------------------

/// Metadata key of the signature over a card's Roony metadata.
pub const CARD_SIGNATURE_KEY: &str = "roony_sig";
/// Metadata key naming the sidecar (its token id) whose key signed the card.
pub const CARD_SIDECAR_KEY: &str = "roony_sidecar";

/// Signs the `roony_*` entries of a card's metadata (all but [`CARD_SIGNATURE_KEY`]) with the
/// key derived from the sidecar's token, so the control plane — which stores the token's
/// SHA-256 — can trust what a card says about its purchase before the intent is synced.
pub fn sign_card_metadata(
    metadata: &std::collections::BTreeMap<String, String>,
    token: &str,
) -> String {
    let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    hex::encode(hmac_sha256(&key, card_message(metadata).as_bytes()))
}

/// Verifies [`sign_card_metadata`] with the hex SHA-256 of the sidecar's token.
pub fn verify_card_metadata(
    metadata: &std::collections::BTreeMap<String, String>,
    token_hash_hex: &str,
) -> bool {
    let (Ok(key), Some(Ok(sig))) = (
        hex::decode(token_hash_hex),
        metadata.get(CARD_SIGNATURE_KEY).map(hex::decode),
    ) else {
        return false;
    };
    let expected = hmac_sha256(&key, card_message(metadata).as_bytes());
    bool::from(expected.as_slice().ct_eq(&sig))
}

fn card_message(metadata: &std::collections::BTreeMap<String, String>) -> String {
    let signed: serde_json::Map<String, Value> = metadata
        .iter()
        .filter(|(k, _)| k.starts_with("roony_") && k.as_str() != CARD_SIGNATURE_KEY)
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    canonical(&Value::Object(signed))
}

/// JSON with object keys sorted and no whitespace.
pub fn canonical(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(v, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(v, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// The ETag of a bundle's content: its format, project, agents, budgets and approvals (not
/// its revision, time, ETag or signature).
pub fn content_etag(bundle: &Bundle) -> String {
    let content = serde_json::json!({
        "format": bundle.format,
        "project_id": bundle.project_id,
        "agents": serde_json::to_value(&bundle.agents).unwrap_or_default(),
        "budgets": serde_json::to_value(&bundle.budgets).unwrap_or_default(),
        "approvals": serde_json::to_value(&bundle.approvals).unwrap_or_default(),
    });
    let mut content = content;
    if let (Some(stripe), Some(map)) = (&bundle.stripe, content.as_object_mut()) {
        map.insert(
            "stripe".into(),
            serde_json::to_value(stripe).unwrap_or_default(),
        );
    }
    hex::encode(&Sha256::digest(canonical(&content).as_bytes())[..16])
}

/// HMAC-SHA256 (RFC 2104) of `message` under `key`.
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(block.map(|b| b ^ 0x36));
    inner.update(message);
    let mut outer = Sha256::new();
    outer.update(block.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

fn mac(token: &str, message: &str) -> [u8; 32] {
    hmac_sha256(&Sha256::digest(token.as_bytes()), message.as_bytes())
}

fn unsigned_canonical(mut value: Value) -> String {
    if let Value::Object(map) = &mut value {
        map.remove("signature");
    }
    canonical(&value)
}

/// Sets `bundle.signature` for the sidecar holding `token`.
pub fn sign(bundle: &mut Bundle, token: &str) {
    bundle.signature.clear();
    let value = serde_json::to_value(&*bundle).unwrap_or_default();
    bundle.signature = hex::encode(mac(token, &unsigned_canonical(value)));
}

/// Checks the format and the signature of a bundle as received (or persisted) and parses it.
pub fn verify(raw: &[u8], token: &str) -> Result<Bundle, VerifyError> {
    let value: Value =
        serde_json::from_slice(raw).map_err(|e| VerifyError::Malformed(e.to_string()))?;
    let format = value.get("format").cloned().unwrap_or(Value::Null);
    if format.as_u64() != Some(u64::from(FORMAT)) {
        return Err(VerifyError::Format(format.to_string()));
    }
    let signature = value
        .get("signature")
        .and_then(Value::as_str)
        .and_then(|s| hex::decode(s).ok())
        .ok_or(VerifyError::Signature)?;
    let expected = mac(token, &unsigned_canonical(value.clone()));
    if !bool::from(expected.as_slice().ct_eq(&signature)) {
        return Err(VerifyError::Signature);
    }
    serde_json::from_value(value).map_err(|e| VerifyError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle() -> Bundle {
        let agents = vec![BundleAgent {
            id: "agt_1".into(),
            name: "a".into(),
            status: "active".into(),
            policy: Some(serde_json::json!({"currency": "USD", "max_per_transaction": 100})),
            keys: vec![BundleKey {
                key_id: "k1".into(),
                key_hash: "00".into(),
                revoked: false,
            }],
            budgets: vec![],
        }];
        let mut b = Bundle {
            format: FORMAT,
            revision: 3,
            etag: String::new(),
            generated_at: 10,
            project_id: "prj_1".into(),
            agents,
            budgets: vec![],
            approvals: vec![],
            stripe: None,
            signature: String::new(),
        };
        b.etag = content_etag(&b);
        b
    }

    #[test]
    fn sign_and_verify() {
        let mut b = bundle();
        sign(&mut b, "token-aaaaaaaaaaaaaaaaaaaa");
        let raw = serde_json::to_vec_pretty(&b).unwrap();
        assert_eq!(verify(&raw, "token-aaaaaaaaaaaaaaaaaaaa").unwrap(), b);
        assert!(matches!(
            verify(&raw, "token-bbbbbbbbbbbbbbbbbbbb"),
            Err(VerifyError::Signature)
        ));
        let tampered = String::from_utf8(raw).unwrap().replace("100", "100000");
        assert!(matches!(
            verify(tampered.as_bytes(), "token-aaaaaaaaaaaaaaaaaaaa"),
            Err(VerifyError::Signature)
        ));
        let mut v: Value = serde_json::to_value(&b).unwrap();
        v["format"] = 2.into();
        assert!(matches!(
            verify(v.to_string().as_bytes(), "token-aaaaaaaaaaaaaaaaaaaa"),
            Err(VerifyError::Format(_))
        ));
    }

    #[test]
    fn card_metadata_signature() {
        let token = "roony_st_0123456789abcdef";
        let mut m = std::collections::BTreeMap::new();
        m.insert("roony_intent_id".to_string(), "pur_1".to_string());
        m.insert("roony_limit".to_string(), "1212".to_string());
        m.insert("note".to_string(), "not signed".to_string());
        let sig = sign_card_metadata(&m, token);
        m.insert(CARD_SIGNATURE_KEY.to_string(), sig);
        let hash = hex::encode(Sha256::digest(token.as_bytes()));
        assert!(verify_card_metadata(&m, &hash));
        m.insert("note".to_string(), "changed".to_string());
        assert!(
            verify_card_metadata(&m, &hash),
            "only roony_ keys are signed"
        );
        m.insert("roony_limit".to_string(), "99999".to_string());
        assert!(!verify_card_metadata(&m, &hash));
        assert!(!verify_card_metadata(&m, "zz"));
    }

    #[test]
    fn hmac_rfc4231() {
        assert_eq!(
            hex::encode(hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(
            hex::encode(hmac_sha256(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            )),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn canonical_sorts_keys() {
        let v: Value = serde_json::from_str(r#"{"b":1,"a":{"d":[1,"x"],"c":null}}"#).unwrap();
        assert_eq!(canonical(&v), r#"{"a":{"c":null,"d":[1,"x"]},"b":1}"#);
        let mut a = bundle();
        let before = content_etag(&a);
        a.revision += 1;
        a.generated_at += 1;
        assert_eq!(
            content_etag(&a),
            before,
            "revision and time are not content"
        );
        a.approvals.push(BundleApproval {
            intent_id: "pur_1".into(),
            agent_id: "agt_1".into(),
            approved: true,
            note: None,
            actor: "admin".into(),
            decided_at: 1,
        });
        assert_ne!(content_etag(&a), before);
        let mut b = bundle();
        b.project_id = "prj_2".into();
        assert_ne!(content_etag(&b), before);
    }
}
