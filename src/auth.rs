//! Agent keys: generated with 256 bits of entropy, shown once, stored only as SHA-256
//! hashes, compared in constant time.
//!
//! Format: `roony_ak_<key id: 16 hex>_<secret: 64 hex>`. The key id locates the stored hash;
//! the whole key is hashed and compared. A key given by an operator in another format (e.g.
//! `roony dev --agent-key`) gets a key id derived from its hash.

use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub const KEY_PREFIX: &str = "roony_ak_";
/// Shortest operator-chosen key accepted.
pub const MIN_CUSTOM_KEY_LEN: usize = 20;

/// A freshly generated key: the plaintext (to show once) and what is stored.
pub struct NewKey {
    pub plaintext: String,
    pub key_id: String,
    pub hash: String,
}

impl std::fmt::Debug for NewKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewKey")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("agent key must be at least {MIN_CUSTOM_KEY_LEN} printable characters")]
    TooShort,
}

pub fn generate() -> NewKey {
    let mut id = [0u8; 8];
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut id);
    rand::rng().fill_bytes(&mut secret);
    let plaintext = format!("{KEY_PREFIX}{}_{}", hex::encode(id), hex::encode(secret));
    NewKey {
        key_id: hex::encode(id),
        hash: hash(&plaintext),
        plaintext,
    }
}

/// Accepts an operator-chosen key (for `roony dev --agent-key`).
pub fn from_plaintext(plaintext: &str) -> Result<NewKey, KeyError> {
    if plaintext.len() < MIN_CUSTOM_KEY_LEN || !plaintext.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(KeyError::TooShort);
    }
    Ok(NewKey {
        key_id: key_id(plaintext),
        hash: hash(plaintext),
        plaintext: plaintext.to_string(),
    })
}

/// Hex SHA-256 of the whole key.
pub fn hash(plaintext: &str) -> String {
    hex::encode(Sha256::digest(plaintext.as_bytes()))
}

/// The key id a presented key is looked up by.
pub fn key_id(plaintext: &str) -> String {
    if let Some(rest) = plaintext.strip_prefix(KEY_PREFIX)
        && let Some((id, secret)) = rest.split_once('_')
        && id.len() == 16
        && secret.len() == 64
        && id.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return id.to_string();
    }
    let digest = Sha256::digest([b"roony-key-id:".as_slice(), plaintext.as_bytes()].concat());
    format!("h{}", &hex::encode(digest)[..15])
}

/// Constant-time comparison of a presented key with a stored hash.
pub fn verify(plaintext: &str, stored_hash: &str) -> bool {
    let presented = hash(plaintext);
    presented.as_bytes().ct_eq(stored_hash.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_verify_and_differ() {
        let a = generate();
        let b = generate();
        assert_ne!(a.plaintext, b.plaintext);
        assert!(a.plaintext.starts_with(KEY_PREFIX));
        assert_eq!(a.plaintext.len(), KEY_PREFIX.len() + 16 + 1 + 64);
        assert_eq!(key_id(&a.plaintext), a.key_id);
        assert!(verify(&a.plaintext, &a.hash));
        assert!(!verify(&b.plaintext, &a.hash));
        assert!(!format!("{a:?}").contains(&a.plaintext));
    }

    #[test]
    fn custom_keys() {
        assert_eq!(from_plaintext("short").unwrap_err(), KeyError::TooShort);
        let k = from_plaintext("dev-agent-key-0123456789").unwrap();
        assert_eq!(key_id("dev-agent-key-0123456789"), k.key_id);
        assert!(k.key_id.starts_with('h'));
        assert!(verify("dev-agent-key-0123456789", &k.hash));
        // A look-alike of the generated format with a wrong length is hashed, not parsed.
        assert!(key_id("roony_ak_abc_def").starts_with('h'));
    }
}
