//! Storage backends: where a repository's files live. A backend stores
//! immutable named objects; everything above it (encryption, packing,
//! indexes) is the same for every backend.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;

use crate::aligned::{AlignedBuf, BLOCK, open_direct};

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{path} does not exist in {location}")]
    NotFound { location: String, path: String },
    #[error("{op} {path} in {location} failed: {message}")]
    Io {
        location: String,
        op: &'static str,
        path: String,
        message: String,
    },
    #[error(
        "the store at {location} refused access ({message}); check the credentials (AWS_* variables, profile or role) and the bucket policy"
    )]
    AccessDenied { location: String, message: String },
}

impl BackendError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, BackendError::NotFound { .. })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub path: String,
    pub size: u64,
}

/// An object store of immutable files addressed by `/`-separated paths.
#[async_trait]
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// Stores `data` at `path` atomically: readers never see a partial file.
    async fn put(&self, path: &str, data: Bytes) -> Result<(), BackendError>;
    async fn get(&self, path: &str) -> Result<Bytes, BackendError>;
    async fn get_range(&self, path: &str, offset: u64, len: u64) -> Result<Bytes, BackendError>;
    /// Every file under `prefix` (a directory such as `data/`).
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, BackendError>;
    async fn delete(&self, path: &str) -> Result<(), BackendError>;
    /// Where the repository is, for messages.
    fn location(&self) -> String;
}

/// A repository location as the user writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Local(PathBuf),
    S3 { bucket: String, prefix: String },
}

/// `s3://bucket/prefix` or a local path.
pub fn parse_location(s: &str) -> Result<Location, super::RepoError> {
    if let Some(rest) = s.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(super::RepoError::BadLocation {
                location: s.to_string(),
                message: "no bucket after s3://".into(),
            });
        }
        return Ok(Location::S3 {
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
        });
    }
    if s.contains("://") {
        return Err(super::RepoError::BadLocation {
            location: s.to_string(),
            message: "only local paths and s3:// are supported".into(),
        });
    }
    if s.is_empty() {
        return Err(super::RepoError::BadLocation {
            location: s.to_string(),
            message: "empty location".into(),
        });
    }
    Ok(Location::Local(PathBuf::from(s)))
}

// ---- local directory ----------------------------------------------------

#[derive(Debug, Clone)]
pub struct LocalBackend {
    root: PathBuf,
}

impl LocalBackend {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LocalBackend { root: root.into() }
    }

    fn full(&self, path: &str) -> PathBuf {
        self.root.join(path)
    }

    fn io(&self, op: &'static str, path: &str, e: std::io::Error) -> BackendError {
        if e.kind() == std::io::ErrorKind::NotFound {
            BackendError::NotFound {
                location: self.location(),
                path: path.to_string(),
            }
        } else {
            BackendError::Io {
                location: self.location(),
                op,
                path: path.to_string(),
                message: e.to_string(),
            }
        }
    }
}

/// Files at least this large (packs) are written past the page cache.
const DIRECT_MIN: usize = 1 << 20;
/// What one direct write carries at most.
const DIRECT_BUFFER: usize = 1 << 20;

thread_local! {
    /// A buffer reused by the thread's direct writes, where data is copied.
    static DIRECT_BOUNCE: std::cell::RefCell<Option<AlignedBuf>> = const { std::cell::RefCell::new(None) };
}

/// Writes `data` to the new file `tmp` with `O_DIRECT` and syncs it;
/// `false` (and no file) where the file system does not take direct
/// writes. A backup writes gigabytes of packs that nothing reads soon:
/// through the page cache, every byte is copied into newly allocated
/// cache pages (the largest kernel cost of a backup to a local disk) and
/// then evicts the application's own cached data.
#[cfg(target_os = "linux")]
fn write_direct(tmp: &Path, data: &[u8]) -> std::io::Result<bool> {
    use std::os::unix::fs::FileExt;
    let Some(file) = open_direct(
        std::fs::OpenOptions::new().write(true).create_new(true),
        tmp,
    )?
    else {
        return Ok(false);
    };
    // Data built in block-aligned memory (a pack) goes to the disk from
    // where it is, in whole blocks; the rest is copied to an aligned buffer.
    let in_place = if (data.as_ptr() as usize).is_multiple_of(BLOCK) {
        data.len() / BLOCK * BLOCK
    } else {
        0
    };
    let written = DIRECT_BOUNCE.with(|cell| {
        file.write_all_at(&data[..in_place], 0)?;
        let mut bounce = cell.borrow_mut();
        let buffer = bounce
            .get_or_insert_with(|| AlignedBuf::new(DIRECT_BUFFER))
            .as_mut_slice();
        let mut offset = in_place;
        while offset < data.len() {
            let piece = &data[offset..data.len().min(offset + DIRECT_BUFFER)];
            // The last piece is padded to whole blocks; the file is cut
            // back to its length below.
            let padded = piece.len().next_multiple_of(BLOCK);
            buffer[..piece.len()].copy_from_slice(piece);
            buffer[piece.len()..padded].fill(0);
            file.write_all_at(&buffer[..padded], offset as u64)?;
            offset += piece.len();
        }
        Ok::<_, std::io::Error>(())
    });
    match written {
        Ok(()) => {}
        // Refused by the file system after all (alignment it does not
        // take): written through the cache instead.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            drop(file);
            std::fs::remove_file(tmp)?;
            return Ok(false);
        }
        Err(e) => return Err(e),
    }
    file.set_len(data.len() as u64)?;
    file.sync_all()?;
    Ok(true)
}

#[cfg(not(target_os = "linux"))]
fn write_direct(_tmp: &Path, _data: &[u8]) -> std::io::Result<bool> {
    Ok(false)
}

/// Reads at least this large (of packs, by a restore or a verify) go past
/// the page cache; smaller ones (trees, headers) are left to its readahead.
const DIRECT_READ_MIN: usize = 1 << 20;

/// Reads `len` bytes at `offset` of `path` with `O_DIRECT`, the whole
/// blocks around them into an aligned buffer; `None` where the file system
/// does not take direct reads. Packs are written past the cache, so a
/// restore reads them from the disk either way: directly, they are not
/// copied once more out of newly allocated cache pages.
#[cfg(target_os = "linux")]
fn read_direct(path: &Path, offset: u64, len: u64) -> std::io::Result<Option<Bytes>> {
    use std::os::unix::fs::FileExt;
    let Some(file) = open_direct(std::fs::OpenOptions::new().read(true), path)? else {
        return Ok(None);
    };
    let block = BLOCK as u64;
    let start = offset / block * block;
    let end = (offset + len).next_multiple_of(block);
    let mut buf = AlignedBuf::new((end - start) as usize);
    let mut filled = 0;
    // Reads until the range is in or the file ends (its last block is
    // short, so a read may end before the aligned end).
    while filled < buf.len() {
        match file.read_at(&mut buf.as_mut_slice()[filled..], start + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(None),
            Err(e) => return Err(e),
        }
        // A short read that is not a multiple of blocks is the end of the
        // file; the next read would be unaligned.
        if filled % BLOCK != 0 {
            break;
        }
    }
    let from = (offset - start) as usize;
    if filled < from + len as usize {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(Some(
        Bytes::from_owner(buf).slice(from..from + len as usize),
    ))
}

#[cfg(not(target_os = "linux"))]
fn read_direct(_path: &Path, _offset: u64, _len: u64) -> std::io::Result<Option<Bytes>> {
    Ok(None)
}

fn walk(dir: &Path, root: &Path, out: &mut Vec<ObjectInfo>) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    // A file deleted while it is listed (another process releasing its
    // lock, a prune) is simply not listed: as an S3 listing would do.
    let vanished = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
    for entry in entries {
        let entry = entry?;
        let ty = match entry.file_type() {
            Ok(ty) => ty,
            Err(e) if vanished(&e) => continue,
            Err(e) => return Err(e),
        };
        let path = entry.path();
        if ty.is_dir() {
            walk(&path, root, out)?;
        } else if ty.is_file() {
            let name = entry.file_name();
            // Temporary files of writes in progress are not objects.
            if name.to_string_lossy().starts_with(".tmp-") {
                continue;
            }
            let size = match entry.metadata() {
                Ok(m) => m.len(),
                Err(e) if vanished(&e) => continue,
                Err(e) => return Err(e),
            };
            let rel = path
                .strip_prefix(root)
                .expect("under root")
                .to_string_lossy()
                .replace('\\', "/");
            out.push(ObjectInfo { path: rel, size });
        }
    }
    Ok(())
}

#[async_trait]
impl Backend for LocalBackend {
    async fn put(&self, path: &str, data: Bytes) -> Result<(), BackendError> {
        let full = self.full(path);
        let this = self.clone();
        let p = path.to_string();
        tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let dir = full.parent().expect("paths have a directory");
            std::fs::create_dir_all(dir)?;
            let tmp = dir.join(format!(".tmp-{}", hex::encode(rand::random::<[u8; 8]>())));
            let direct = data.len() >= DIRECT_MIN && write_direct(&tmp, &data)?;
            if !direct {
                let mut file = std::fs::File::create(&tmp)?;
                file.write_all(&data)?;
                file.sync_all()?;
            }
            std::fs::rename(&tmp, &full)?;
            // Make the rename durable too.
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
            Ok::<_, std::io::Error>(())
        })
        .await
        .expect("blocking write task")
        .map_err(|e| this.io("write", &p, e))
    }

    async fn get(&self, path: &str) -> Result<Bytes, BackendError> {
        tokio::fs::read(self.full(path))
            .await
            .map(Bytes::from)
            .map_err(|e| self.io("read", path, e))
    }

    async fn get_range(&self, path: &str, offset: u64, len: u64) -> Result<Bytes, BackendError> {
        // One positional read on a blocking thread, straight into the
        // buffer: tokio's file reads go through a bounce buffer of their
        // own, a copy of every byte a restore reads.
        let full = self.full(path);
        let read = tokio::task::spawn_blocking(move || {
            if len >= DIRECT_READ_MIN as u64
                && let Some(bytes) = read_direct(&full, offset, len)?
            {
                return Ok(bytes);
            }
            use std::os::unix::fs::FileExt;
            let file = std::fs::File::open(&full)?;
            let mut buf = vec![0u8; len as usize];
            file.read_exact_at(&mut buf, offset)?;
            Ok::<_, std::io::Error>(Bytes::from(buf))
        })
        .await
        .expect("blocking read task");
        read.map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                BackendError::Io {
                    location: self.location(),
                    op: "read",
                    path: path.to_string(),
                    message: format!(
                        "file is truncated: {len} bytes at offset {offset} are not there"
                    ),
                }
            } else {
                self.io("read", path, e)
            }
        })
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, BackendError> {
        let root = self.root.clone();
        let dir = self.full(prefix);
        let mut out = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            walk(&dir, &root, &mut out).map(|_| out)
        })
        .await
        .expect("blocking list task")
        .map_err(|e| self.io("list", prefix, e))?;
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    async fn delete(&self, path: &str) -> Result<(), BackendError> {
        match tokio::fs::remove_file(self.full(path)).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.io("delete", path, e)),
        }
    }

    fn location(&self) -> String {
        self.root.display().to_string()
    }
}

// ---- S3 ----------------------------------------------------------------------

/// An S3 bucket and prefix, with what S3-compatible stores need.
#[derive(Debug, Clone, Default)]
pub struct S3Location {
    pub bucket: String,
    pub prefix: String,
    /// Endpoint URL of an S3-compatible store (MinIO, Ceph, R2…).
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// Bucket in the URL path rather than the host name.
    pub path_style: bool,
    /// Static credentials; the standard AWS chain when unset.
    pub credentials: Option<S3Credentials>,
}

/// An access key, as a Secret holds it.
#[derive(Clone)]
pub struct S3Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl std::fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Credentials")
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

#[derive(Clone)]
pub struct S3Backend {
    client: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
}

impl std::fmt::Debug for S3Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Backend")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl S3Backend {
    /// Credentials come from the standard AWS chain: environment, shared
    /// profiles, web identity (IRSA), container and instance metadata.
    pub async fn new(location: S3Location) -> Result<Self, BackendError> {
        crate::cluster::connect::install_crypto_provider();
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(region) = &location.region {
            loader = loader.region(aws_sdk_s3::config::Region::new(region.clone()));
        }
        let shared = loader.load().await;
        let mut config =
            aws_sdk_s3::config::Builder::from(&shared).force_path_style(location.path_style);
        if let Some(endpoint) = &location.endpoint {
            config = config.endpoint_url(endpoint);
        }
        if let Some(c) = &location.credentials {
            config = config.credentials_provider(aws_sdk_s3::config::Credentials::new(
                c.access_key_id.clone(),
                c.secret_access_key.clone(),
                c.session_token.clone(),
                None,
                "ferry-repository-secret",
            ));
        }
        if shared.region().is_none() {
            // S3-compatible stores ignore the region but the signer needs one.
            config = config.region(aws_sdk_s3::config::Region::new("us-east-1"));
        }
        Ok(S3Backend {
            client: aws_sdk_s3::Client::from_conf(config.build()),
            bucket: location.bucket,
            prefix: location.prefix,
        })
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Creates the bucket unless it exists (in the client's region): what
    /// `ferry repo init --create-bucket` does. Returns whether it was made.
    pub async fn create_bucket_if_missing(&self) -> Result<bool, BackendError> {
        use aws_sdk_s3::types::{BucketLocationConstraint, CreateBucketConfiguration};
        match self.client.head_bucket().bucket(&self.bucket).send().await {
            Ok(_) => return Ok(false),
            Err(e) if e.raw_response().map(|r| r.status().as_u16()) == Some(404) => {}
            Err(e) => return Err(self.error("look up the bucket", "", e)),
        }
        let mut create = self.client.create_bucket().bucket(&self.bucket);
        // us-east-1 is the one region that takes no location constraint.
        if let Some(region) = self
            .client
            .config()
            .region()
            .map(|r| r.as_ref().to_string())
            .filter(|r| r != "us-east-1")
        {
            create = create.create_bucket_configuration(
                CreateBucketConfiguration::builder()
                    .location_constraint(BucketLocationConstraint::from(region.as_str()))
                    .build(),
            );
        }
        match create.send().await {
            Ok(_) => Ok(true),
            // Made meanwhile by another `repo init`, or by this account.
            Err(e)
                if matches!(
                    aws_sdk_s3::error::ProvideErrorMetadata::code(&e),
                    Some("BucketAlreadyOwnedByYou")
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(self.error("create the bucket", "", e)),
        }
    }

    fn key(&self, path: &str) -> String {
        if self.prefix.is_empty() {
            path.to_string()
        } else {
            format!("{}/{path}", self.prefix)
        }
    }

    fn error<E>(
        &self,
        op: &'static str,
        path: &str,
        e: aws_sdk_s3::error::SdkError<E>,
    ) -> BackendError
    where
        E: aws_sdk_s3::error::ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        use aws_sdk_s3::error::ProvideErrorMetadata;
        let code = e.code().map(String::from);
        let status = e.raw_response().map(|r| r.status().as_u16());
        // A service error's code and message say what happened; the full
        // context (with the raw response) only when there is neither.
        let message = match (e.code(), e.message()) {
            (Some("NoSuchBucket"), _) => format!(
                "bucket {} does not exist (NoSuchBucket); create it first (e.g. `aws s3 mb s3://{}`), or pass --create-bucket to `ferry repo init`",
                self.bucket, self.bucket
            ),
            (Some(code), Some(text)) => format!("{code}: {text}"),
            (Some(code), None) => code.to_string(),
            _ => aws_sdk_s3::error::DisplayErrorContext(&e).to_string(),
        };
        match (code.as_deref(), status) {
            (Some("NoSuchKey" | "NotFound"), _) | (_, Some(404))
                if code.as_deref() != Some("NoSuchBucket") =>
            {
                BackendError::NotFound {
                    location: self.location(),
                    path: path.to_string(),
                }
            }
            (
                Some(
                    "AccessDenied"
                    | "InvalidAccessKeyId"
                    | "SignatureDoesNotMatch"
                    | "ExpiredToken",
                ),
                _,
            )
            | (_, Some(401 | 403)) => BackendError::AccessDenied {
                location: self.location(),
                message: code.unwrap_or(message),
            },
            _ => BackendError::Io {
                location: self.location(),
                op,
                path: path.to_string(),
                message,
            },
        }
    }
}

#[async_trait]
impl Backend for S3Backend {
    async fn put(&self, path: &str, data: Bytes) -> Result<(), BackendError> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(self.key(path))
            .body(data.into())
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.error("write", path, e))
    }

    async fn get(&self, path: &str) -> Result<Bytes, BackendError> {
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.key(path))
            .send()
            .await
            .map_err(|e| self.error("read", path, e))?;
        out.body
            .collect()
            .await
            .map(|b| b.into_bytes())
            .map_err(|e| BackendError::Io {
                location: self.location(),
                op: "read",
                path: path.to_string(),
                message: e.to_string(),
            })
    }

    async fn get_range(&self, path: &str, offset: u64, len: u64) -> Result<Bytes, BackendError> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        let range = format!("bytes={}-{}", offset, offset + len - 1);
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.key(path))
            .range(range)
            .send()
            .await
            .map_err(|e| self.error("read", path, e))?;
        let bytes = out
            .body
            .collect()
            .await
            .map(|b| b.into_bytes())
            .map_err(|e| BackendError::Io {
                location: self.location(),
                op: "read",
                path: path.to_string(),
                message: e.to_string(),
            })?;
        if bytes.len() as u64 != len {
            return Err(BackendError::Io {
                location: self.location(),
                op: "read",
                path: path.to_string(),
                message: format!(
                    "object is truncated: asked for {len} bytes at offset {offset}, got {}",
                    bytes.len()
                ),
            });
        }
        Ok(bytes)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, BackendError> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        let strip = if self.prefix.is_empty() {
            0
        } else {
            self.prefix.len() + 1
        };
        loop {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(self.key(prefix))
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| self.error("list", prefix, e))?;
            for object in page.contents() {
                if let Some(key) = object.key() {
                    out.push(ObjectInfo {
                        path: key[strip.min(key.len())..].to_string(),
                        size: object.size().unwrap_or(0) as u64,
                    });
                }
            }
            match page.next_continuation_token() {
                Some(t) if page.is_truncated().unwrap_or(false) => token = Some(t.to_string()),
                _ => break,
            }
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    async fn delete(&self, path: &str) -> Result<(), BackendError> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(self.key(path))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.error("delete", path, e))
    }

    fn location(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse() {
        assert_eq!(
            parse_location("s3://b/team/prod/").unwrap(),
            Location::S3 {
                bucket: "b".into(),
                prefix: "team/prod".into()
            }
        );
        assert_eq!(
            parse_location("s3://b").unwrap(),
            Location::S3 {
                bucket: "b".into(),
                prefix: "".into()
            }
        );
        assert_eq!(
            parse_location("/var/backups").unwrap(),
            Location::Local("/var/backups".into())
        );
        assert!(parse_location("s3://").is_err());
        assert!(parse_location("gs://bucket").is_err());
    }

    #[tokio::test]
    async fn local_backend_stores_lists_ranges_and_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path());
        b.put("data/ab/abcd", Bytes::from_static(b"hello world"))
            .await
            .unwrap();
        b.put("index/1", Bytes::from_static(b"x")).await.unwrap();
        assert_eq!(
            b.get("data/ab/abcd").await.unwrap(),
            Bytes::from_static(b"hello world")
        );
        assert_eq!(
            b.get_range("data/ab/abcd", 6, 5).await.unwrap(),
            Bytes::from_static(b"world")
        );
        assert!(b.get_range("data/ab/abcd", 6, 50).await.is_err());
        assert_eq!(
            b.list("data/").await.unwrap(),
            vec![ObjectInfo {
                path: "data/ab/abcd".into(),
                size: 11
            }]
        );
        assert!(b.list("snapshots/").await.unwrap().is_empty());
        assert!(b.get("nope").await.unwrap_err().is_not_found());
        b.delete("data/ab/abcd").await.unwrap();
        b.delete("data/ab/abcd").await.unwrap();
        assert!(b.list("data/").await.unwrap().is_empty());
    }

    /// Bytes that differ at every offset, so a piece written at the wrong
    /// place or a lost tail shows.
    fn numbered(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i % 251) as u8 ^ (i >> 12) as u8)
            .collect()
    }

    #[test]
    fn direct_writes_keep_every_byte_and_the_exact_length() {
        let dir = tempfile::tempdir().unwrap();
        for len in [
            DIRECT_MIN,
            DIRECT_MIN + 1,
            DIRECT_BUFFER - 1,
            3 * DIRECT_BUFFER + 777,
            2 * DIRECT_BUFFER + BLOCK,
        ] {
            let data = numbered(len);
            // From wherever the allocator put it, and from aligned memory
            // (written in place), which the data must not depend on.
            let mut aligned = crate::aligned::AlignedVec::with_capacity(len);
            aligned.extend_from_slice(&data);
            assert_eq!(aligned.as_slice().as_ptr() as usize % BLOCK, 0);
            for (source, from) in [(&data[..], "vec"), (aligned.as_slice(), "aligned")] {
                let path = dir.path().join(format!("f{len}-{from}"));
                if write_direct(&path, source).unwrap() {
                    assert_eq!(std::fs::read(&path).unwrap(), data, "length {len}, {from}");
                } else {
                    // A file system without direct writes: nothing is left.
                    assert!(!path.exists());
                }
            }
        }
    }

    #[tokio::test]
    async fn large_objects_round_trip_and_leave_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path());
        let data = numbered(5 * DIRECT_BUFFER / 2 + 13);
        b.put("data/cd/cdef", Bytes::from(data.clone()))
            .await
            .unwrap();
        assert_eq!(b.get("data/cd/cdef").await.unwrap(), data);
        assert_eq!(
            b.get_range("data/cd/cdef", DIRECT_BUFFER as u64 - 3, 7)
                .await
                .unwrap(),
            data[DIRECT_BUFFER - 3..DIRECT_BUFFER + 4]
        );
        let names: Vec<_> = std::fs::read_dir(dir.path().join("data/cd"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["cdef"]);
    }

    #[tokio::test]
    async fn large_ranges_read_directly_hold_exactly_the_bytes_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path());
        let len = 3 * DIRECT_READ_MIN + 1234;
        let data = numbered(len);
        std::fs::create_dir_all(dir.path().join("data/ef")).unwrap();
        std::fs::write(dir.path().join("data/ef/efab"), &data).unwrap();
        let ranges = [
            (0, DIRECT_READ_MIN),
            (1, DIRECT_READ_MIN),
            (BLOCK - 1, 2 * DIRECT_READ_MIN + 3),
            // Up to the unaligned end of the file, from aligned and
            // unaligned starts.
            (len - DIRECT_READ_MIN, DIRECT_READ_MIN),
            (BLOCK, len - BLOCK),
            (0, len),
        ];
        for (offset, n) in ranges {
            let got = b
                .get_range("data/ef/efab", offset as u64, n as u64)
                .await
                .unwrap();
            assert!(got == data[offset..offset + n], "{n} bytes at {offset}");
        }
        // Past the end: an error that says the file is truncated.
        for (offset, n) in [(len - DIRECT_READ_MIN + 1, DIRECT_READ_MIN), (0, len + 1)] {
            let error = b
                .get_range("data/ef/efab", offset as u64, n as u64)
                .await
                .unwrap_err();
            assert!(error.to_string().contains("truncated"), "{error}");
        }
    }
}
