//! Keys and encryption. A repository has one random 64-byte master key: 32
//! bytes encrypt and 32 bytes key the BLAKE3 hash that names blobs (so blob
//! ids reveal nothing about contents). Key files wrap the master key with a
//! key derived from a password (argon2id) or from a key file's contents.
//!
//! Blobs are sealed with the repository's [`Cipher`], chosen when it is
//! created: XAES-256-GCM where the CPU has AES instructions, else
//! XChaCha20-Poly1305. Both take random 192-bit nonces, so concurrent
//! writers never coordinate nonces and one key seals any number of blobs.
//! A sealed blob is laid out the same either way: nonce, ciphertext, tag.

use std::sync::Arc;

use argon2::{Algorithm, Argon2, Params, Version};
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::cipher::{AES_256, EncryptingKey, UnboundCipherKey};
use chacha20poly1305::aead::{Aead, AeadInPlace, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

pub const NONCE_LEN: usize = 24;
pub const TAG_LEN: usize = 16;

/// The authenticated encryption that seals a repository's blobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Cipher {
    /// XAES-256-GCM (C2SP): AES-256-GCM under a key derived from the
    /// master key and half of a 192-bit nonce. An order of magnitude
    /// faster than ChaCha20-Poly1305 where AES and carry-less
    /// multiplication are instructions of the CPU.
    #[serde(rename = "xaes-256-gcm")]
    Xaes256Gcm,
    /// XChaCha20-Poly1305: fast everywhere in software, and constant-time
    /// without AES instructions.
    #[serde(rename = "xchacha20-poly1305")]
    XChaCha20Poly1305,
}

impl Cipher {
    pub const ALL: [Cipher; 2] = [Cipher::Xaes256Gcm, Cipher::XChaCha20Poly1305];

    /// The faster of the two on this CPU.
    pub fn preferred() -> Cipher {
        if aes_instructions() {
            Cipher::Xaes256Gcm
        } else {
            Cipher::XChaCha20Poly1305
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Cipher::Xaes256Gcm => "xaes-256-gcm",
            Cipher::XChaCha20Poly1305 => "xchacha20-poly1305",
        }
    }

    /// The byte that follows the 64 key bytes in a wrapped master key.
    /// Repositories created before the cipher was a choice wrap 64 bytes
    /// and are XChaCha20-Poly1305.
    fn tag_byte(self) -> Option<u8> {
        match self {
            Cipher::XChaCha20Poly1305 => None,
            Cipher::Xaes256Gcm => Some(1),
        }
    }
}

impl std::fmt::Display for Cipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Cipher {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Cipher::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| format!("unknown cipher {s:?}: use xaes-256-gcm or xchacha20-poly1305"))
    }
}

/// Whether AES-GCM runs on instructions of this CPU.
fn aes_instructions() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// XAES-256-GCM (<https://c2sp.org/XAES-256-GCM>): the first 12 bytes of
/// the 24-byte nonce derive a fresh AES-256-GCM key (NIST SP 800-108r1
/// counter-mode KDF with CMAC-AES-256), the last 12 are its nonce. Random
/// nonces are safe for about 2^80 messages under one key, where plain
/// AES-GCM's 96-bit nonces allow 2^32.
struct Xaes {
    /// The master key expanded for single-block AES-256.
    block: EncryptingKey,
    /// CMAC's first subkey.
    k1: [u8; 16],
}

impl Drop for Xaes {
    fn drop(&mut self) {
        self.k1.zeroize();
    }
}

impl Xaes {
    fn new(key: &[u8; 32]) -> Xaes {
        let block = EncryptingKey::ecb(
            UnboundCipherKey::new(&AES_256, key).expect("a 32-byte key fits AES-256"),
        )
        .expect("AES-256 takes ECB");
        let mut l = [0u8; 16];
        block
            .encrypt(&mut l)
            .expect("one whole block encrypts in ECB");
        // k1 = L doubled in GF(2^128).
        let carry = l[0] >> 7;
        let mut k1 = [0u8; 16];
        for i in 0..16 {
            k1[i] = (l[i] << 1) | l.get(i + 1).map_or(0, |next| next >> 7);
        }
        k1[15] ^= 0x87 * carry;
        l.zeroize();
        Xaes { block, k1 }
    }

    /// The AES-256-GCM key of `nonce`.
    fn key(&self, nonce: &[u8]) -> LessSafeKey {
        let mut blocks = Zeroizing::new([0u8; 32]);
        for (i, block) in blocks.chunks_exact_mut(16).enumerate() {
            block[1] = i as u8 + 1;
            block[2] = b'X';
            block[4..].copy_from_slice(&nonce[..12]);
            for (b, k) in block.iter_mut().zip(&self.k1) {
                *b ^= k;
            }
        }
        self.block
            .encrypt(&mut blocks[..])
            .expect("whole blocks encrypt in ECB");
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &blocks[..]).expect("a 32-byte key"))
    }

    fn gcm_nonce(nonce: &[u8]) -> Nonce {
        Nonce::try_assume_unique_for_key(&nonce[12..NONCE_LEN]).expect("12 bytes")
    }

    fn seal_in_place(&self, nonce: &[u8; NONCE_LEN], in_out: &mut [u8]) -> [u8; TAG_LEN] {
        let tag = self
            .key(nonce)
            .seal_in_place_separate_tag(Self::gcm_nonce(nonce), Aad::empty(), in_out)
            .expect("encryption of in-memory data cannot fail");
        tag.as_ref().try_into().expect("16-byte tag")
    }

    fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, Tampered> {
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let mut buffer = body.to_vec();
        let plain = self
            .key(nonce)
            .open_in_place(Self::gcm_nonce(nonce), Aad::empty(), &mut buffer)
            .map_err(|_| Tampered)?
            .len();
        buffer.truncate(plain);
        Ok(buffer)
    }
}

#[derive(Clone)]
pub struct MasterKey {
    encryption: Zeroizing<[u8; 32]>,
    id: Zeroizing<[u8; 32]>,
    cipher: Cipher,
    /// The XAES key schedule, built once per key (None for XChaCha).
    xaes: Option<Arc<Xaes>>,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MasterKey({}, …)", self.cipher)
    }
}

/// Decryption failed: wrong key, or the data was altered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tampered;

/// Seals with XChaCha20-Poly1305, as key files are, whatever the
/// repository's cipher: they are small, and read by every version.
pub fn seal_with(key: &[u8; 32], plaintext: &[u8]) -> Vec<u8> {
    sealed_buffer(
        plaintext.len(),
        |out| out.extend_from_slice(plaintext),
        |nonce, body| xchacha_seal(key, nonce, body),
    )
}

/// A random nonce, the plaintext `fill` appends (about `length` bytes),
/// encrypted where it lies by `seal`, and the tag `seal` returns.
fn sealed_buffer(
    length: usize,
    fill: impl FnOnce(&mut Vec<u8>),
    seal: impl FnOnce(&[u8; NONCE_LEN], &mut [u8]) -> [u8; TAG_LEN],
) -> Vec<u8> {
    let nonce: [u8; NONCE_LEN] = rand::random();
    let mut out = Vec::with_capacity(NONCE_LEN + length + TAG_LEN);
    out.extend_from_slice(&nonce);
    fill(&mut out);
    let tag = seal(&nonce, &mut out[NONCE_LEN..]);
    out.extend_from_slice(&tag);
    out
}

fn xchacha_seal(key: &[u8; 32], nonce: &[u8; NONCE_LEN], body: &mut [u8]) -> [u8; TAG_LEN] {
    XChaCha20Poly1305::new(key.into())
        .encrypt_in_place_detached(XNonce::from_slice(nonce), b"", body)
        .expect("encryption of in-memory data cannot fail")
        .into()
}

/// Opens what [`seal_with`] sealed.
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
    /// A fresh key sealing with this CPU's preferred cipher.
    pub fn random() -> Self {
        Self::random_with(Cipher::preferred())
    }

    pub fn random_with(cipher: Cipher) -> Self {
        Self::new(
            Zeroizing::new(rand::random()),
            Zeroizing::new(rand::random()),
            cipher,
        )
    }

    fn new(encryption: Zeroizing<[u8; 32]>, id: Zeroizing<[u8; 32]>, cipher: Cipher) -> Self {
        let xaes = (cipher == Cipher::Xaes256Gcm).then(|| Arc::new(Xaes::new(&encryption)));
        MasterKey {
            encryption,
            id,
            cipher,
            xaes,
        }
    }

    pub fn cipher(&self) -> Cipher {
        self.cipher
    }

    pub fn seal(&self, plaintext: &[u8]) -> Vec<u8> {
        self.seal_built(plaintext.len(), |buffer| {
            buffer.extend_from_slice(plaintext)
        })
    }

    /// Seals the plaintext `fill` appends (about `length` bytes) to a
    /// buffer that already holds the nonce: the plaintext is written once,
    /// and encrypted where it lies (nonce, ciphertext, tag).
    pub fn seal_built(&self, length: usize, fill: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        sealed_buffer(length, fill, |nonce, body| match &self.xaes {
            Some(xaes) => xaes.seal_in_place(nonce, body),
            None => xchacha_seal(&self.encryption, nonce, body),
        })
    }

    pub fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, Tampered> {
        match &self.xaes {
            _ if sealed.len() < NONCE_LEN + TAG_LEN => Err(Tampered),
            Some(xaes) => xaes.open(sealed),
            None => open_with(&self.encryption, sealed),
        }
    }

    /// The keyed hash naming a blob.
    pub fn blob_hash(&self, plaintext: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&self.id, plaintext).as_bytes()
    }

    /// The 64 key bytes, then the cipher's byte where it has one.
    fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let mut v = Zeroizing::new(Vec::with_capacity(65));
        v.extend_from_slice(&*self.encryption);
        v.extend_from_slice(&*self.id);
        v.extend(self.cipher.tag_byte());
        v
    }

    fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let cipher = match bytes.get(64..) {
            Some([]) => Cipher::XChaCha20Poly1305,
            Some([byte]) => Cipher::ALL
                .into_iter()
                .find(|c| c.tag_byte() == Some(*byte))?,
            _ => return None,
        };
        let mut encryption = Zeroizing::new([0u8; 32]);
        let mut id = Zeroizing::new([0u8; 32]);
        encryption.copy_from_slice(&bytes[..32]);
        id.copy_from_slice(&bytes[32..64]);
        Some(MasterKey::new(encryption, id, cipher))
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

/// Lengths of a wrapped master key: nonce, 64 key bytes, the cipher's
/// byte (for all but XChaCha20-Poly1305), tag.
const WRAPPED_LEN: [usize; 2] = [NONCE_LEN + 64 + TAG_LEN, NONCE_LEN + 65 + TAG_LEN];

/// Argon2id parameters: 64 MiB and 3 passes make offline guessing
/// expensive (RFC 9106's second recommended option). Four lanes cost a
/// guesser the same memory and work as one, but are computed on every core:
/// on 2 cores the derivation takes 0.09 s instead of 0.15 s, which every
/// command that opens a repository pays. Key files keep their own
/// parameters, so those written with one lane still open.
const MEMORY_KIB: u32 = 64 * 1024;
const ITERATIONS: u32 = 3;
const PARALLELISM: u32 = 4;

/// Argon2's working memory (64 MiB), mapped straight from the kernel. The
/// crate's own allocation is over-aligned, so the allocator clears all of
/// it on one thread before the first pass; mapped pages arrive zeroed and
/// are faulted in by the lanes that fill them, on every core, as huge pages
/// where the kernel has them. That is a third of the derivation's time,
/// which every command that opens a repository pays.
struct KdfMemory {
    start: std::ptr::NonNull<argon2::Block>,
    blocks: usize,
}

impl KdfMemory {
    fn bytes(blocks: usize) -> usize {
        blocks * argon2::Block::SIZE
    }

    /// `None` where the kernel refuses the mapping: the caller falls back
    /// to the crate's allocation.
    fn map(blocks: usize) -> Option<KdfMemory> {
        let bytes = Self::bytes(blocks);
        if bytes == 0 {
            return None;
        }
        // SAFETY: a fresh private anonymous mapping; nothing else refers to
        // the range it returns.
        let start = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if start == libc::MAP_FAILED {
            return None;
        }
        // Advice only: without huge pages the mapping works the same.
        // SAFETY: the range is the mapping just made.
        unsafe { libc::madvise(start, bytes, libc::MADV_HUGEPAGE) };
        Some(KdfMemory {
            start: std::ptr::NonNull::new(start.cast())?,
            blocks,
        })
    }

    fn blocks(&mut self) -> &mut [argon2::Block] {
        // SAFETY: the mapping is page-aligned (more than a block's 64-byte
        // alignment), `blocks` blocks long, zero-filled by the kernel (all
        // zeros is a valid block: it is plain u64s) and borrowed mutably
        // from its only owner.
        unsafe { std::slice::from_raw_parts_mut(self.start.as_ptr(), self.blocks) }
    }
}

impl Drop for KdfMemory {
    fn drop(&mut self) {
        // The kernel zeroes the pages before anyone else gets them.
        // SAFETY: unmaps exactly the mapping made in `map`, once.
        unsafe { libc::munmap(self.start.as_ptr().cast(), Self::bytes(self.blocks)) };
    }
}

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
            let blocks = params.block_count();
            let argon2 = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
            match KdfMemory::map(blocks) {
                Some(mut memory) => {
                    argon2.hash_password_into_with_memory(secret, salt, &mut *out, memory.blocks())
                }
                None => argon2.hash_password_into(secret, salt, &mut *out),
            }
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
            Ok(w) if WRAPPED_LEN.contains(&w.len()) => {}
            Ok(w) => {
                return Some(format!(
                    "its wrapped key is {} bytes instead of {} or {}",
                    w.len(),
                    WRAPPED_LEN[0],
                    WRAPPED_LEN[1]
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
        for cipher in Cipher::ALL {
            let key = MasterKey::random_with(cipher);
            for len in [0, 1, 15, 16, 17, 1000, 70_000] {
                let plain = crate::test_data::pseudo_random(len, len as u64);
                let sealed = key.seal(&plain);
                assert_eq!(sealed.len(), NONCE_LEN + len + TAG_LEN);
                assert_eq!(key.open(&sealed).unwrap(), plain, "{cipher} {len}");
                // Nonce, ciphertext and tag are all authenticated.
                for at in [0, 11, 12, 23, NONCE_LEN + len / 2, sealed.len() - 1] {
                    let mut flipped = sealed.clone();
                    flipped[at] ^= 1;
                    assert_eq!(key.open(&flipped), Err(Tampered), "{cipher} byte {at}");
                }
                assert_eq!(key.open(&sealed[..sealed.len() - 1]), Err(Tampered));
            }
            let sealed = key.seal(b"secret manifest");
            for other in Cipher::ALL {
                assert_eq!(MasterKey::random_with(other).open(&sealed), Err(Tampered));
            }
            assert_eq!(key.open(&sealed[..10]), Err(Tampered));
            assert_ne!(key.seal(b"x"), key.seal(b"x"), "random nonces");
        }
    }

    #[test]
    fn the_same_key_bytes_under_the_other_cipher_open_nothing() {
        let xaes = MasterKey::random_with(Cipher::Xaes256Gcm);
        let mut bytes = xaes.to_bytes();
        bytes.truncate(64);
        let chacha = MasterKey::from_bytes(&bytes).unwrap();
        assert_eq!(chacha.cipher(), Cipher::XChaCha20Poly1305);
        assert_eq!(chacha.open(&xaes.seal(b"data")), Err(Tampered));
        assert_eq!(xaes.open(&chacha.seal(b"data")), Err(Tampered));
    }

    /// The vectors of <https://c2sp.org/XAES-256-GCM>.
    #[test]
    fn xaes_matches_its_specification() {
        let nonce = *b"ABCDEFGHIJKLMNOPQRSTUVWX";
        let vectors: [(u8, &[u8], &str); 2] = [
            (
                1,
                b"",
                "ce546ef63c9cc60765923609b33a9a1974e96e52daf2fcf7075e2271",
            ),
            (
                3,
                b"c2sp.org/XAES-256-GCM",
                "986ec1832593df5443a179437fd083bf3fdb41abd740a21f71eb769d",
            ),
        ];
        for (key_byte, aad, expected) in vectors {
            let xaes = Xaes::new(&[key_byte; 32]);
            let mut data = b"XAES-256-GCM".to_vec();
            let tag = xaes
                .key(&nonce)
                .seal_in_place_separate_tag(Xaes::gcm_nonce(&nonce), Aad::from(aad), &mut data)
                .unwrap();
            data.extend_from_slice(tag.as_ref());
            assert_eq!(hex::encode(&data), expected, "key {key_byte:02x}");
        }
        // Without associated data, as blobs are sealed.
        let key = MasterKey::new(
            Zeroizing::new([1; 32]),
            Zeroizing::new([0; 32]),
            Cipher::Xaes256Gcm,
        );
        let mut sealed = nonce.to_vec();
        sealed.extend(hex::decode(vectors[0].2).unwrap());
        assert_eq!(key.open(&sealed).unwrap(), b"XAES-256-GCM");
    }

    #[test]
    fn the_cipher_is_part_of_the_wrapped_master_key() {
        for cipher in Cipher::ALL {
            let master = MasterKey::random_with(cipher);
            let sealed = master.seal(b"blob");
            let file = KeyFile::wrap(&master, "keyfile", b"secret");
            assert_eq!(file.damage(), None);
            let unwrapped = file.unwrap(b"secret").unwrap();
            assert_eq!(unwrapped.cipher(), cipher);
            assert_eq!(unwrapped.open(&sealed).unwrap(), b"blob");
        }
        // Repositories from before the choice wrap 64 bytes: XChaCha20.
        let bytes = MasterKey::random_with(Cipher::XChaCha20Poly1305).to_bytes();
        assert_eq!(bytes.len(), 64);
        let mut unknown = MasterKey::random_with(Cipher::Xaes256Gcm).to_bytes();
        assert_eq!(unknown.len(), 65);
        unknown[64] = 9;
        assert!(MasterKey::from_bytes(&unknown).is_none());
        assert!(MasterKey::from_bytes(&unknown[..63]).is_none());
        for cipher in Cipher::ALL {
            assert_eq!(cipher.name().parse::<Cipher>(), Ok(cipher));
        }
        assert!(
            "aes"
                .parse::<Cipher>()
                .unwrap_err()
                .contains("xaes-256-gcm")
        );
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
    fn the_mapped_kdf_memory_derives_what_the_crates_allocation_derives() {
        for (memory_kib, iterations, lanes) in [(8, 1, 1), (256, 2, 2), (2048, 3, 4)] {
            let salt = [9u8; 16];
            let mapped = derive("argon2id", b"pw", &salt, memory_kib, iterations, lanes).unwrap();
            let params = Params::new(memory_kib, iterations, lanes, Some(32)).unwrap();
            let mut allocated = [0u8; 32];
            Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
                .hash_password_into(b"pw", &salt, &mut allocated)
                .unwrap();
            assert_eq!(
                *mapped, allocated,
                "m={memory_kib} t={iterations} p={lanes}"
            );
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
