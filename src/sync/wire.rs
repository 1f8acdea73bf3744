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

/// Everything a sidecar needs to enforce its project's policies.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Bundle {
    /// Always [`FORMAT`] for this version.
    pub format: u32,
    /// The control plane's configuration revision the bundle was built at (monotonic).
    pub revision: i64,
    /// Hex digest of the bundle's content (`project_id` and `agents`): equal content, equal
    /// ETag. Sent as the HTTP `ETag` (quoted).
    pub etag: String,
    /// Unix seconds.
    pub generated_at: i64,
    pub project_id: String,
    /// Every agent of the project, ordered by id.
    pub agents: Vec<BundleAgent>,
    /// Hex HMAC-SHA256 (see the module documentation). Empty while being signed.
    #[serde(default)]
    pub signature: String,
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

/// The ETag of a project's content.
pub fn content_etag(project_id: &str, agents: &[BundleAgent]) -> String {
    let content = serde_json::json!({
        "format": FORMAT,
        "project_id": project_id,
        "agents": serde_json::to_value(agents).unwrap_or_default(),
    });
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
        }];
        Bundle {
            format: FORMAT,
            revision: 3,
            etag: content_etag("prj_1", &agents),
            generated_at: 10,
            project_id: "prj_1".into(),
            agents,
            signature: String::new(),
        }
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
        assert_ne!(content_etag("p", &[]), content_etag("q", &[]));
    }
}
