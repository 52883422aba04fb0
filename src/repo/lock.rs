//! Repository locks: small plaintext files under `locks/`. Every command
//! that reads or writes repository data takes a shared lock first; prune and
//! repair take an exclusive one. The lock files also date sessions: a
//! deletion mark records the locks that existed when it was written, and its
//! packs are deleted only once all of them are gone (see the module docs of
//! `repo`).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::pause::PausePoints;
use super::{Backend, RepoError};

/// A lock not refreshed for this long belongs to a process that is gone.
const STALE_AFTER: Duration = Duration::from_secs(30 * 60);
const REFRESH_EVERY: Duration = Duration::from_secs(5 * 60);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct LockFile {
    exclusive: bool,
    hostname: String,
    pid: u32,
    /// Seconds since the Unix epoch of the last refresh.
    time: u64,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "unknown".into())
}

impl LockFile {
    fn is_stale(&self) -> bool {
        if now().saturating_sub(self.time) > STALE_AFTER.as_secs() {
            return true;
        }
        // On this host, a lock of a process that no longer runs is stale.
        self.hostname == hostname()
            && !std::path::Path::new(&format!("/proc/{}", self.pid)).exists()
    }

    fn describe(&self) -> String {
        format!(
            "{} lock of pid {} on {}",
            if self.exclusive {
                "an exclusive"
            } else {
                "a shared"
            },
            self.pid,
            self.hostname
        )
    }
}

/// A held lock; refreshed in the background, removed on release or drop.
#[derive(Debug)]
pub struct RepoLock {
    backend: Arc<dyn Backend>,
    path: String,
    exclusive: bool,
    refresher: Option<tokio::task::JoinHandle<()>>,
}

/// The paths of every lock file, live or stale.
pub(crate) async fn paths(backend: &Arc<dyn Backend>) -> Result<Vec<String>, RepoError> {
    Ok(backend
        .list("locks/")
        .await?
        .into_iter()
        .map(|o| o.path)
        .collect())
}

/// Who holds the lock at `path`, for messages.
pub(crate) async fn describe(backend: &Arc<dyn Backend>, path: &str) -> String {
    match backend.get(path).await {
        Ok(bytes) => match serde_json::from_slice::<LockFile>(&bytes) {
            Ok(lock) => format!("{} ({path})", lock.describe()),
            Err(_) => format!("an unreadable lock file {path}"),
        },
        Err(_) => format!("lock file {path}"),
    }
}

/// Removes stale lock files (see [`LockFile::is_stale`]) and lock files
/// that are not valid; live locks stay. Returns the paths removed.
pub(crate) async fn remove_stale(backend: &Arc<dyn Backend>) -> Result<Vec<String>, RepoError> {
    let mut removed = Vec::new();
    for info in backend.list("locks/").await? {
        let bytes = match backend.get(&info.path).await {
            Ok(bytes) => bytes,
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(e.into()),
        };
        let stale = serde_json::from_slice::<LockFile>(&bytes).map_or(true, |l| l.is_stale());
        if stale {
            backend.delete(&info.path).await?;
            removed.push(info.path);
        }
    }
    Ok(removed)
}

/// Removes the lock files of processes on this host that no longer run:
/// their sessions are over for certain. Returns the paths removed.
pub(crate) async fn remove_dead(backend: &Arc<dyn Backend>) -> Result<Vec<String>, RepoError> {
    let mut removed = Vec::new();
    let here = hostname();
    for info in backend.list("locks/").await? {
        let Ok(bytes) = backend.get(&info.path).await else {
            continue;
        };
        let Ok(lock) = serde_json::from_slice::<LockFile>(&bytes) else {
            continue;
        };
        if lock.hostname == here && !std::path::Path::new(&format!("/proc/{}", lock.pid)).exists() {
            backend.delete(&info.path).await?;
            removed.push(info.path);
        }
    }
    Ok(removed)
}

async fn others(backend: &Arc<dyn Backend>, own: &str) -> Result<Vec<LockFile>, RepoError> {
    let mut out = Vec::new();
    for info in backend.list("locks/").await? {
        if info.path == own {
            continue;
        }
        match backend.get(&info.path).await {
            Ok(bytes) => {
                if let Ok(lock) = serde_json::from_slice::<LockFile>(&bytes)
                    && !lock.is_stale()
                {
                    out.push(lock);
                }
            }
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(out)
}

pub(crate) async fn acquire(
    backend: Arc<dyn Backend>,
    exclusive: bool,
    pauses: &PausePoints,
) -> Result<RepoLock, RepoError> {
    let path = format!("locks/{}", hex::encode(rand::random::<[u8; 16]>()));
    let conflicting = |locks: &[LockFile]| locks.iter().find(|l| exclusive || l.exclusive).cloned();
    if let Some(holder) = conflicting(&others(&backend, &path).await?) {
        return Err(RepoError::Locked {
            holder: holder.describe(),
            hint: hint(exclusive),
        });
    }
    pauses.at("lock:checked").await;
    let file = LockFile {
        exclusive,
        hostname: hostname(),
        pid: std::process::id(),
        time: now(),
    };
    backend
        .put(
            &path,
            Bytes::from(serde_json::to_vec(&file).expect("lock serializes")),
        )
        .await?;
    // Re-check after writing: two processes that checked at the same time
    // both see each other now, and both back off.
    if let Some(holder) = conflicting(&others(&backend, &path).await?) {
        let _ = backend.delete(&path).await;
        return Err(RepoError::Locked {
            holder: holder.describe(),
            hint: hint(exclusive),
        });
    }
    let refresh_backend = backend.clone();
    let refresh_path = path.clone();
    let refresher = tokio::spawn(async move {
        loop {
            tokio::time::sleep(REFRESH_EVERY).await;
            let file = LockFile {
                time: now(),
                ..file.clone()
            };
            let _ = refresh_backend
                .put(
                    &refresh_path,
                    Bytes::from(serde_json::to_vec(&file).expect("lock serializes")),
                )
                .await;
        }
    });
    Ok(RepoLock {
        backend,
        path,
        exclusive,
        refresher: Some(refresher),
    })
}

fn hint(exclusive: bool) -> String {
    if exclusive {
        "prune and repair need the repository to themselves: wait for running backups, restores, transforms and verifications to finish (the lock of a process that is gone stops counting 30 minutes after its last refresh)".into()
    } else {
        "a prune or repair is running: wait for it to finish".into()
    }
}

impl RepoLock {
    /// The lock file, `locks/<id>`.
    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn is_exclusive(&self) -> bool {
        self.exclusive
    }

    /// Makes the lock look abandoned, as the lock of a process that stopped
    /// refreshing it for hours does: others then ignore it.
    #[cfg(test)]
    pub(crate) async fn make_stale(&mut self) {
        if let Some(r) = self.refresher.take() {
            r.abort();
        }
        let file = LockFile {
            exclusive: self.exclusive,
            hostname: hostname(),
            pid: std::process::id(),
            time: 0,
        };
        self.backend
            .put(
                &self.path,
                Bytes::from(serde_json::to_vec(&file).expect("lock serializes")),
            )
            .await
            .expect("rewriting the lock");
        // Released explicitly by the test, not on drop.
        self.refresher = Some(tokio::spawn(async {}));
    }

    pub async fn release(mut self) -> Result<(), RepoError> {
        if let Some(r) = self.refresher.take() {
            r.abort();
        }
        self.backend.delete(&self.path).await?;
        Ok(())
    }
}

impl Drop for RepoLock {
    fn drop(&mut self) {
        if let Some(r) = self.refresher.take() {
            r.abort();
            let backend = self.backend.clone();
            let path = self.path.clone();
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move {
                    let _ = backend.delete(&path).await;
                });
            }
        }
    }
}
