//! Secrets at rest: an AES-256-GCM envelope for the control plane's stored credentials
//! (Stripe Connect tokens).
//!
//! A [`SecretBox`] holds a current key (used to encrypt) and older keys (still accepted to
//! decrypt, for rotation). Keys come from `ROONY_SECRETS_KEY` or `--secrets-key-file`, same
//! format: comma- or newline-separated entries, each `keyid:material` or just `material`
//! (the id is then the first 8 hex digits of SHA-256 of the material); material is 32 bytes
//! as base64 (standard or url-safe, padded or not) or 64 hex digits. The first entry is the
//! current key.
//!
//! A sealed value is text: `v1:<key id>:<base64 nonce>:<base64 ciphertext+tag>`, with a
//! random 96-bit nonce. The associated data binds it to where it is stored (e.g.
//! `stripe_connections/<org id>/access_token`), so a ciphertext copied to another row or
//! column does not open.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// The version prefix of sealed values.
const VERSION: &str = "v1";

/// One key: its id and 32 bytes of material (never printed).
#[derive(Clone)]
pub struct SecretKey {
    pub id: String,
    material: [u8; 32],
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl SecretKey {
    pub fn new(id: impl Into<String>, material: [u8; 32]) -> Result<SecretKey, SecretsError> {
        let id = id.into();
        if id.is_empty()
            || id.len() > 64
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
        {
            return Err(SecretsError::InvalidKey(
                "a key id is 1 to 64 characters of letters, digits, '_', '-', '.'".into(),
            ));
        }
        Ok(SecretKey { id, material })
    }

    /// A fresh random key (e.g. `roony dev`'s key file).
    pub fn generate(id: impl Into<String>) -> Result<SecretKey, SecretsError> {
        let mut material = [0u8; 32];
        rand::rng().fill_bytes(&mut material);
        SecretKey::new(id, material)
    }

    /// `id:base64` (the key file format).
    pub fn export(&self) -> String {
        format!(
            "{}:{}",
            self.id,
            base64::engine::general_purpose::STANDARD.encode(self.material)
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretsError {
    #[error("invalid secrets key: {0}")]
    InvalidKey(String),
    #[error("no secrets key is configured (ROONY_SECRETS_KEY or --secrets-key-file)")]
    Missing,
    #[error("cannot read the secrets key file: {0}")]
    File(String),
    #[error("the sealed value is malformed")]
    Malformed,
    #[error("the sealed value names key {0:?}, which is not configured")]
    UnknownKey(String),
    #[error("the sealed value does not decrypt (wrong key, wrong binding or tampered)")]
    Decrypt,
    #[error("encryption failed")]
    Encrypt,
}

impl SecretsError {
    pub fn code(&self) -> &'static str {
        match self {
            SecretsError::InvalidKey(_) => "invalid_secrets_key",
            SecretsError::Missing => "secrets_key_missing",
            SecretsError::File(_) => "secrets_key_file",
            SecretsError::Malformed => "sealed_value_malformed",
            SecretsError::UnknownKey(_) => "secrets_key_unknown",
            SecretsError::Decrypt => "sealed_value_invalid",
            SecretsError::Encrypt => "encryption_failed",
        }
    }
}

/// The current key and the older ones.
#[derive(Clone)]
pub struct SecretBox {
    current: SecretKey,
    older: Vec<SecretKey>,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretBox")
            .field("current", &self.current.id)
            .field(
                "older",
                &self.older.iter().map(|k| k.id.as_str()).collect::<Vec<_>>(),
            )
            .finish()
    }
}

fn decode_material(text: &str) -> Result<[u8; 32], SecretsError> {
    let text = text.trim();
    let bytes = if text.len() == 64 && text.chars().all(|c| c.is_ascii_hexdigit()) {
        hex::decode(text).map_err(|_| SecretsError::InvalidKey("bad hex".into()))?
    } else {
        use base64::engine::general_purpose::{
            STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD,
        };
        STANDARD
            .decode(text)
            .or_else(|_| STANDARD_NO_PAD.decode(text))
            .or_else(|_| URL_SAFE.decode(text))
            .or_else(|_| URL_SAFE_NO_PAD.decode(text))
            .map_err(|_| {
                SecretsError::InvalidKey("the material is neither 64 hex digits nor base64".into())
            })?
    };
    <[u8; 32]>::try_from(bytes.as_slice())
        .map_err(|_| SecretsError::InvalidKey("the material must be exactly 32 bytes".into()))
}

impl SecretBox {
    pub fn new(current: SecretKey, older: Vec<SecretKey>) -> SecretBox {
        SecretBox { current, older }
    }

    /// Parses the `ROONY_SECRETS_KEY` / key file format (see the module docs).
    pub fn parse(spec: &str) -> Result<SecretBox, SecretsError> {
        let mut keys = Vec::new();
        for entry in spec
            .split([',', '\n'])
            .map(str::trim)
            .filter(|e| !e.is_empty() && !e.starts_with('#'))
        {
            let key = match entry.split_once(':') {
                Some((id, material)) => SecretKey::new(id.trim(), decode_material(material)?)?,
                None => {
                    let material = decode_material(entry)?;
                    let id = hex::encode(&Sha256::digest(material)[..4]);
                    SecretKey::new(id, material)?
                }
            };
            if keys.iter().any(|k: &SecretKey| k.id == key.id) {
                return Err(SecretsError::InvalidKey(format!(
                    "key id {:?} appears twice",
                    key.id
                )));
            }
            keys.push(key);
        }
        let mut keys = keys.into_iter();
        let current = keys.next().ok_or(SecretsError::Missing)?;
        Ok(SecretBox::new(current, keys.collect()))
    }

    /// Reads a key file (same format as [`SecretBox::parse`]).
    pub fn from_file(path: &std::path::Path) -> Result<SecretBox, SecretsError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| SecretsError::File(format!("{}: {e}", path.display())))?;
        SecretBox::parse(&text)
    }

    /// The key file at `path`, created (mode 0600) with a fresh key if it does not exist.
    pub fn load_or_create(path: &std::path::Path) -> Result<SecretBox, SecretsError> {
        if path.exists() {
            return SecretBox::from_file(path);
        }
        let key = SecretKey::generate(format!("k{}", crate::control::unix_now()))?;
        let text = format!("{}\n", key.export());
        write_private(path, text.as_bytes())
            .map_err(|e| SecretsError::File(format!("{}: {e}", path.display())))?;
        Ok(SecretBox::new(key, Vec::new()))
    }

    /// The id of the key new values are sealed with.
    pub fn current_key_id(&self) -> &str {
        &self.current.id
    }

    /// Every configured key id, the current one first.
    pub fn key_ids(&self) -> Vec<&str> {
        std::iter::once(&self.current)
            .chain(self.older.iter())
            .map(|k| k.id.as_str())
            .collect()
    }

    fn key(&self, id: &str) -> Option<&SecretKey> {
        std::iter::once(&self.current)
            .chain(self.older.iter())
            .find(|k| k.id == id)
    }

    /// Encrypts `plaintext` under the current key, bound to `aad`.
    pub fn seal(&self, plaintext: &[u8], aad: &str) -> Result<String, SecretsError> {
        let cipher =
            Aes256Gcm::new_from_slice(&self.current.material).map_err(|_| SecretsError::Encrypt)?;
        let mut nonce = [0u8; 12];
        rand::rng().fill_bytes(&mut nonce);
        let ct = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| SecretsError::Encrypt)?;
        let b64 = base64::engine::general_purpose::STANDARD;
        Ok(format!(
            "{VERSION}:{}:{}:{}",
            self.current.id,
            b64.encode(nonce),
            b64.encode(ct)
        ))
    }

    /// Decrypts a value [`SecretBox::seal`] made with any configured key, bound to `aad`.
    pub fn open(&self, sealed: &str, aad: &str) -> Result<Vec<u8>, SecretsError> {
        let mut parts = sealed.split(':');
        let (Some(VERSION), Some(id), Some(nonce), Some(ct), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(SecretsError::Malformed);
        };
        let key = self
            .key(id)
            .ok_or_else(|| SecretsError::UnknownKey(id.to_string()))?;
        let b64 = base64::engine::general_purpose::STANDARD;
        let nonce = b64.decode(nonce).map_err(|_| SecretsError::Malformed)?;
        let ct = b64.decode(ct).map_err(|_| SecretsError::Malformed)?;
        if nonce.len() != 12 {
            return Err(SecretsError::Malformed);
        }
        let cipher = Aes256Gcm::new_from_slice(&key.material).map_err(|_| SecretsError::Decrypt)?;
        cipher
            .decrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: &ct,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| SecretsError::Decrypt)
    }

    /// [`SecretBox::open`] as UTF-8 text.
    pub fn open_string(&self, sealed: &str, aad: &str) -> Result<String, SecretsError> {
        String::from_utf8(self.open(sealed, aad)?).map_err(|_| SecretsError::Decrypt)
    }

    /// The key id a sealed value names (for rotation reports), if well formed.
    pub fn key_id_of(sealed: &str) -> Option<&str> {
        let mut parts = sealed.split(':');
        match (parts.next(), parts.next()) {
            (Some(VERSION), Some(id)) => Some(id),
            _ => None,
        }
    }
}

/// Writes `bytes` to a new file readable by its owner only (0600 on Unix).
fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str, byte: u8) -> SecretKey {
        SecretKey::new(id, [byte; 32]).unwrap()
    }

    #[test]
    fn round_trip() {
        let b = SecretBox::new(key("k1", 7), vec![]);
        let sealed = b.seal(b"sk_test_secret", "org_1/access_token").unwrap();
        assert!(sealed.starts_with("v1:k1:"));
        assert!(!sealed.contains("sk_test_secret"));
        assert_eq!(
            b.open_string(&sealed, "org_1/access_token").unwrap(),
            "sk_test_secret"
        );
        // Fresh nonce each time.
        assert_ne!(
            sealed,
            b.seal(b"sk_test_secret", "org_1/access_token").unwrap()
        );
    }

    #[test]
    fn wrong_associated_data_fails() {
        let b = SecretBox::new(key("k1", 7), vec![]);
        let sealed = b.seal(b"x", "org_1/access_token").unwrap();
        assert_eq!(
            b.open(&sealed, "org_1/refresh_token"),
            Err(SecretsError::Decrypt)
        );
        assert_eq!(
            b.open(&sealed, "org_2/access_token"),
            Err(SecretsError::Decrypt)
        );
    }

    #[test]
    fn rotation() {
        let old = SecretBox::new(key("k1", 1), vec![]);
        let sealed = old.seal(b"token", "ad").unwrap();
        let new = SecretBox::new(key("k2", 2), vec![key("k1", 1)]);
        assert_eq!(new.open(&sealed, "ad").unwrap(), b"token");
        let resealed = new.seal(b"token", "ad").unwrap();
        assert_eq!(SecretBox::key_id_of(&resealed), Some("k2"));
        // The old box does not know k2.
        assert_eq!(
            old.open(&resealed, "ad"),
            Err(SecretsError::UnknownKey("k2".into()))
        );
        // A key with the same id but other material fails.
        let imposter = SecretBox::new(key("k1", 9), vec![]);
        assert_eq!(imposter.open(&sealed, "ad"), Err(SecretsError::Decrypt));
    }

    #[test]
    fn tamper_fails() {
        let b = SecretBox::new(key("k1", 7), vec![]);
        let sealed = b.seal(b"secret value", "ad").unwrap();
        let parts: Vec<&str> = sealed.split(':').collect();
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut ct = b64.decode(parts[3]).unwrap();
        ct[0] ^= 1;
        let tampered = format!("v1:k1:{}:{}", parts[2], b64.encode(ct));
        assert_eq!(b.open(&tampered, "ad"), Err(SecretsError::Decrypt));
        assert_eq!(b.open("v1:k1:abc", "ad"), Err(SecretsError::Malformed));
        assert_eq!(b.open("v2:k1:a:b", "ad"), Err(SecretsError::Malformed));
    }

    #[test]
    fn parse_formats() {
        let hex_key = "11".repeat(32);
        let b64_key = base64::engine::general_purpose::STANDARD.encode([2u8; 32]);
        let b = SecretBox::parse(&format!("new:{b64_key}, old:{hex_key}")).unwrap();
        assert_eq!(b.current_key_id(), "new");
        assert!(b.key("old").is_some());
        let anon = SecretBox::parse(&hex_key).unwrap();
        assert_eq!(anon.current_key_id().len(), 8);
        assert_eq!(SecretBox::parse("").unwrap_err(), SecretsError::Missing);
        assert!(matches!(
            SecretBox::parse("k:abcd"),
            Err(SecretsError::InvalidKey(_))
        ));
        assert!(SecretBox::parse(&format!("a:{hex_key},a:{hex_key}")).is_err());
        // Debug never shows material.
        assert!(!format!("{b:?}").contains(&b64_key));
    }

    #[test]
    fn key_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.key");
        let a = SecretBox::load_or_create(&path).unwrap();
        let b = SecretBox::load_or_create(&path).unwrap();
        let sealed = a.seal(b"x", "ad").unwrap();
        assert_eq!(b.open(&sealed, "ad").unwrap(), b"x");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
