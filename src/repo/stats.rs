//! Request counters of a repository's storage: how many requests of each
//! kind a command made and how many bytes they moved. A restore reports
//! them, so that reading a snapshot from S3 can be judged in requests per
//! MiB of packs, not only in time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use serde::Serialize;

use super::backend::{Backend, BackendError, ObjectInfo};

/// The counts so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IoStats {
    /// Whole and ranged reads.
    pub get_requests: u64,
    pub get_bytes: u64,
    pub put_requests: u64,
    pub put_bytes: u64,
    pub list_requests: u64,
    pub delete_requests: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    get_requests: AtomicU64,
    get_bytes: AtomicU64,
    put_requests: AtomicU64,
    put_bytes: AtomicU64,
    list_requests: AtomicU64,
    delete_requests: AtomicU64,
}

impl Counters {
    pub fn snapshot(&self) -> IoStats {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        IoStats {
            get_requests: load(&self.get_requests),
            get_bytes: load(&self.get_bytes),
            put_requests: load(&self.put_requests),
            put_bytes: load(&self.put_bytes),
            list_requests: load(&self.list_requests),
            delete_requests: load(&self.delete_requests),
        }
    }
}

/// A backend that counts what passes through it.
#[derive(Debug)]
pub(crate) struct Counted {
    inner: Arc<dyn Backend>,
    counters: Arc<Counters>,
}

impl Counted {
    pub fn wrap(inner: Arc<dyn Backend>) -> (Arc<dyn Backend>, Arc<Counters>) {
        let counters = Arc::new(Counters::default());
        let backend = Arc::new(Counted {
            inner,
            counters: counters.clone(),
        });
        (backend, counters)
    }

    fn got(&self, result: &Result<Bytes, BackendError>) {
        self.counters.get_requests.fetch_add(1, Ordering::Relaxed);
        if let Ok(bytes) = result {
            self.counters
                .get_bytes
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        }
    }
}

#[async_trait]
impl Backend for Counted {
    async fn put(&self, path: &str, data: Bytes) -> Result<(), BackendError> {
        self.counters.put_requests.fetch_add(1, Ordering::Relaxed);
        self.counters
            .put_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        self.inner.put(path, data).await
    }

    async fn get(&self, path: &str) -> Result<Bytes, BackendError> {
        let result = self.inner.get(path).await;
        self.got(&result);
        result
    }

    async fn get_range(&self, path: &str, offset: u64, len: u64) -> Result<Bytes, BackendError> {
        let result = self.inner.get_range(path, offset, len).await;
        self.got(&result);
        result
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, BackendError> {
        self.counters.list_requests.fetch_add(1, Ordering::Relaxed);
        self.inner.list(prefix).await
    }

    async fn delete(&self, path: &str) -> Result<(), BackendError> {
        self.counters
            .delete_requests
            .fetch_add(1, Ordering::Relaxed);
        self.inner.delete(path).await
    }

    fn location(&self) -> String {
        self.inner.location()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::LocalBackend;

    #[tokio::test]
    async fn every_request_and_byte_is_counted() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let (backend, counters) = Counted::wrap(Arc::new(LocalBackend::new(dir.path())));
        backend
            .put("data/aa/x", Bytes::from_static(b"0123456789"))
            .await
            .expect("put");
        backend.get("data/aa/x").await.expect("get");
        backend.get_range("data/aa/x", 2, 3).await.expect("range");
        backend.list("data/").await.expect("list");
        backend.delete("data/aa/x").await.expect("delete");
        assert_eq!(
            counters.snapshot(),
            IoStats {
                get_requests: 2,
                get_bytes: 13,
                put_requests: 1,
                put_bytes: 10,
                list_requests: 1,
                delete_requests: 1,
            }
        );
    }
}
