//! Keys and encryption. A repository has one random 64-byte master key: 32
//! bytes encrypt (XChaCha20-Poly1305, random 192-bit nonces, so nonces never
//! need coordination between concurrent writers) and 32 bytes key the BLAKE3
//! hash that names blobs (so blob ids reveal nothing about contents). Key
//! files wrap the master key with a key derived from a password (argon2id)
//! or from a key file's contents.

use argon2::{Algorithm, Argon2, Params, Version};
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

pub const NONCE_LEN: usize = 24;
pub const TAG_LEN: usize = 16;

#[derive(Clone)]
pub struct MasterKey {
    encryption: Zeroizing<[u8; 32]>,
    id: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(…)")
    }
}

/// Decryption failed: wrong key, or the data was altered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tampered;

pub fn seal_with(key: &[u8; 32], plaintext: &[u8]) -> Vec<u8> {
    seal_built(key, plaintext.len(), |buffer| {
        buffer.extend_from_slice(plaintext)
    })
}

/// Seals the plaintext `fill` appends (about `length` bytes) to a buffer
/// that already holds the nonce: the plaintext is written once, and
/// encrypted where it lies (nonce, ciphertext, tag).
pub fn seal_built(key: &[u8; 32], length: usize, fill: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    use chacha20poly1305::aead::AeadInPlace;
    let cipher = XChaCha20Poly1305::new(key.into());
    let nonce: [u8; NONCE_LEN] = rand::random();
    let mut out = Vec::with_capacity(NONCE_LEN + length + TAG_LEN);
    out.extend_from_slice(&nonce);
    fill(&mut out);
    let tag = cipher
        .encrypt_in_place_detached(XNonce::from_slice(&nonce), b"", &mut out[NONCE_LEN..])
        .expect("encryption of in-memory data cannot fail");
    out.extend_from_slice(&tag);
    out
}

pub fn open_with(key: &[u8; 32], sealed: &[u8]) -> Result<Vec<u8>, Tampered> {
    if sealed.len() < NONCE_LEN + TAG_LEN {
        return Err(Tampered);
    }
    let cipher = XChaCha20Poly1305::new(key.into());
    let (nonce, body) = sealed.split_at(NONCE_LEN);
    cipher
        .decrypt(XNonce::from_slice(nonce), body)
        .map_err(|_| Tampered)
}

impl MasterKey {
    pub fn random() -> Self {
        MasterKey {
            encryption: Zeroizing::new(rand::random()),
            id: Zeroizing::new(rand::random()),
        }
    }

    pub fn seal(&self, plaintext: &[u8]) -> Vec<u8> {
        seal_with(&self.encryption, plaintext)
    }

    /// [`seal_built`] with this key.
    pub fn seal_built(&self, length: usize, fill: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        seal_built(&self.encryption, length, fill)
    }

    pub fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, Tampered> {
        open_with(&self.encryption, sealed)
    }

    /// The keyed hash naming a blob.
    pub fn blob_hash(&self, plaintext: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&self.id, plaintext).as_bytes()
    }

    fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let mut v = Zeroizing::new(Vec::with_capacity(64));
        v.extend_from_slice(&*self.encryption);
        v.extend_from_slice(&*self.id);
        v
    }

    fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != 64 {
            return None;
        }
        let mut encryption = Zeroizing::new([0u8; 32]);
        let mut id = Zeroizing::new([0u8; 32]);
        encryption.copy_from_slice(&bytes[..32]);
        id.copy_from_slice(&bytes[32..]);
        Some(MasterKey { encryption, id })
    }
}

/// A key file: the master key wrapped by one password or key file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyFile {
    /// `argon2id` (password) or `keyfile` (raw secret).
    pub kdf: String,
    #[serde(default)]
    pub memory_kib: u32,
    #[serde(default)]
    pub iterations: u32,
    #[serde(default)]
    pub parallelism: u32,
    pub salt: String,
    pub wrapped: String,
    pub created: String,
    /// BLAKE3 of the fields above (not secret): tells a damaged key file
    /// from a wrong password. Key files written before it existed lack it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<String>,
}

/// Length of a wrapped master key: nonce, 64 key bytes, tag.
const WRAPPED_LEN: usize = NONCE_LEN + 64 + TAG_LEN;

/// Argon2id parameters: 64 MiB and 3 passes make offline guessing
/// expensive (RFC 9106's second recommended option). Four lanes cost a
/// guesser the same memory and work as one, but are computed on every core:
/// on 2 cores the derivation takes 0.09 s instead of 0.15 s, which every
/// command that opens a repository pays. Key files keep their own
/// parameters, so those written with one lane still open.
const MEMORY_KIB: u32 = 64 * 1024;
const ITERATIONS: u32 = 3;
const PARALLELISM: u32 = 4;

fn derive(
    kdf: &str,
    secret: &[u8],
    salt: &[u8],
    memory_kib: u32,
    iterations: u32,
    parallelism: u32,
) -> Option<Zeroizing<[u8; 32]>> {
    let mut out = Zeroizing::new([0u8; 32]);
    match kdf {
        "argon2id" => {
            let params = Params::new(memory_kib, iterations, parallelism, Some(32)).ok()?;
            Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
                .hash_password_into(secret, salt, &mut *out)
                .ok()?;
        }
        "keyfile" => {
            let mut hasher = blake3::Hasher::new_derive_key("ferry repository key file v1");
            hasher.update(salt);
            hasher.update(secret);
            out.copy_from_slice(hasher.finalize().as_bytes());
        }
        _ => return None,
    }
    Some(out)
}

impl KeyFile {
    pub fn wrap(master: &MasterKey, kdf: &str, secret: &[u8]) -> Self {
        let salt: [u8; 16] = rand::random();
        let (m, t, p) = if kdf == "argon2id" {
            (MEMORY_KIB, ITERATIONS, PARALLELISM)
        } else {
            (0, 0, 0)
        };
        let kek = derive(kdf, secret, &salt, m, t, p).expect("built-in parameters are valid");
        let wrapped = seal_with(&kek, &master.to_bytes());
        let mut file = KeyFile {
            kdf: kdf.to_string(),
            memory_kib: m,
            iterations: t,
            parallelism: p,
            salt: hex::encode(salt),
            wrapped: hex::encode(wrapped),
            created: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            check: None,
        };
        file.check = Some(file.checksum());
        file
    }

    fn checksum(&self) -> String {
        let text = format!(
            "ferry key file v1\n{}\n{}\n{}\n{}\n{}\n{}\n{}",
            self.kdf,
            self.memory_kib,
            self.iterations,
            self.parallelism,
            self.salt,
            self.wrapped,
            self.created
        );
        blake3::hash(text.as_bytes()).to_hex().to_string()
    }

    /// Why the file cannot be a key file as written, if it cannot: checked
    /// before any password is tried, so damage is not taken for a wrong
    /// password.
    pub fn damage(&self) -> Option<String> {
        if let Some(check) = &self.check
            && *check != self.checksum()
        {
            return Some("its checksum does not match its contents".into());
        }
        match hex::decode(&self.wrapped) {
            Ok(w) if w.len() == WRAPPED_LEN => {}
            Ok(w) => {
                return Some(format!(
                    "its wrapped key is {} bytes instead of {WRAPPED_LEN}",
                    w.len()
                ));
            }
            Err(e) => return Some(format!("its wrapped key is not hex: {e}")),
        }
        if hex::decode(&self.salt).is_err() {
            return Some("its salt is not hex".into());
        }
        None
    }

    /// The master key, if `secret` is the right one for this file.
    pub fn unwrap(&self, secret: &[u8]) -> Option<MasterKey> {
        let salt = hex::decode(&self.salt).ok()?;
        let wrapped = hex::decode(&self.wrapped).ok()?;
        let kek = derive(
            &self.kdf,
            secret,
            &salt,
            self.memory_kib,
            self.iterations,
            self.parallelism,
        )?;
        let mut bytes = open_with(&kek, &wrapped).ok()?;
        let key = MasterKey::from_bytes(&bytes);
        bytes.zeroize();
        key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_data_opens_only_unaltered_and_with_the_right_key() {
        let key = MasterKey::random();
        let sealed = key.seal(b"secret manifest");
        assert_eq!(key.open(&sealed).unwrap(), b"secret manifest");
        let mut flipped = sealed.clone();
        flipped[30] ^= 1;
        assert_eq!(key.open(&flipped), Err(Tampered));
        assert_eq!(MasterKey::random().open(&sealed), Err(Tampered));
        assert_eq!(key.open(&sealed[..10]), Err(Tampered));
        assert_ne!(key.seal(b"x"), key.seal(b"x"), "random nonces");
    }

    #[test]
    fn blob_hashes_are_keyed() {
        let a = MasterKey::random();
        let b = MasterKey::random();
        assert_eq!(a.blob_hash(b"x"), a.blob_hash(b"x"));
        assert_ne!(a.blob_hash(b"x"), b.blob_hash(b"x"));
    }

    #[test]
    fn key_files_unwrap_with_the_right_secret_only() {
        let master = MasterKey::random();
        for kdf in ["argon2id", "keyfile"] {
            let file = KeyFile::wrap(&master, kdf, b"correct horse");
            let unwrapped = file.unwrap(b"correct horse").expect("right secret");
            assert_eq!(unwrapped.blob_hash(b"x"), master.blob_hash(b"x"));
            assert!(file.unwrap(b"wrong").is_none());
            assert_eq!(file.damage(), None);
        }
    }

    #[test]
    fn key_files_open_with_the_lanes_they_were_written_with() {
        let master = MasterKey::random();
        let current = KeyFile::wrap(&master, "argon2id", b"pw");
        assert_eq!(current.parallelism, PARALLELISM);
        // A file written when one lane was the default.
        let salt = [7u8; 16];
        let kek = derive("argon2id", b"pw", &salt, MEMORY_KIB, ITERATIONS, 1).unwrap();
        let mut one_lane = KeyFile {
            parallelism: 1,
            salt: hex::encode(salt),
            wrapped: hex::encode(seal_with(&kek, &master.to_bytes())),
            check: None,
            ..current.clone()
        };
        one_lane.check = Some(one_lane.checksum());
        let unwrapped = one_lane.unwrap(b"pw").expect("one-lane file opens");
        assert_eq!(unwrapped.blob_hash(b"x"), master.blob_hash(b"x"));
        // The lanes are part of the derivation, not decoration.
        let mut relabelled = one_lane.clone();
        relabelled.parallelism = PARALLELISM;
        assert!(relabelled.unwrap(b"pw").is_none());
    }

    #[test]
    fn damaged_key_files_are_told_apart_from_wrong_secrets() {
        let file = KeyFile::wrap(&MasterKey::random(), "keyfile", b"secret");
        let mut flipped = file.clone();
        flipped.salt.replace_range(
            0..1,
            if flipped.salt.starts_with('0') {
                "1"
            } else {
                "0"
            },
        );
        assert!(flipped.damage().unwrap().contains("checksum"));
        let mut truncated = file.clone();
        truncated.wrapped.truncate(20);
        truncated.check = None;
        assert!(truncated.damage().unwrap().contains("bytes instead of"));
        let mut legacy = file.clone();
        legacy.check = None;
        assert_eq!(legacy.damage(), None, "files without a checksum still open");
        assert!(legacy.unwrap(b"secret").is_some());
    }
}
