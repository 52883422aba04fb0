//! The snapshot format: what a snapshot stores and how it is read.
//!
//! A snapshot's root blob ([`StoredContent`]) names its parts by blob id:
//! the cluster profile, the object catalog and the application graph, each
//! a blob of its own so that an unchanged application deduplicates them.
//! Parts added by later versions (volume data is next) are new optional
//! fields: a reader ignores sections it does not know. `format` says which
//! version wrote the snapshot, `readableBy` the oldest reader that can use
//! it; a reader refuses only snapshots whose `readableBy` is newer than
//! itself, which a writer sets when a new section must not be skipped.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::backup::BackupReport;
use crate::model::ObjectRef;
use crate::profile::ClusterProfile;
use crate::repo::{BlobId, RepoError, Repository, Snapshot, SnapshotId};

/// The version of the snapshot format this Ferry writes and reads.
/// Format 2 added volume data (`report.volumes`); a snapshot without it
/// stays readable by format 1.
pub const SNAPSHOT_FORMAT: u32 = 2;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotContent {
    pub format: u32,
    pub name: String,
    pub source: SourceInfo,
    pub profile: ClusterProfile,
    /// The selection as the user expressed it (for `describe`).
    pub selection: Value,
    pub objects: Vec<CatalogEntry>,
    /// The application graph in its compact serialized form.
    pub graph: Value,
    pub report: BackupReport,
    /// The transform plan for restores at the disaster-recovery site
    /// (`ferry restore --recorded-transform`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_transform: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceInfo {
    pub server: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    pub namespaces: Vec<String>,
}

/// One stored object.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CatalogEntry {
    #[serde(flatten)]
    pub object: ObjectRef,
    pub blob: BlobId,
    pub size: u64,
}

/// The root blob of a snapshot as stored: the parts are blob ids.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct StoredContent {
    /// The version that wrote the snapshot.
    pub format: u32,
    /// The oldest reader version that can use the snapshot; snapshots
    /// written before the field existed are readable by their own format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readable_by: Option<u32>,
    pub name: String,
    pub source: SourceInfo,
    pub selection: Value,
    pub profile: BlobId,
    pub objects: BlobId,
    pub graph: BlobId,
    pub report: BackupReport,
    /// The transform plan for restores at the disaster-recovery site, as
    /// the BackupPolicy that made the snapshot gave it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_transform: Option<String>,
}

impl StoredContent {
    /// Refuses a snapshot that needs a newer reader than this one.
    pub fn check_readable(&self) -> Result<(), RepoError> {
        let needed = self.readable_by.unwrap_or(self.format);
        if needed > SNAPSHOT_FORMAT {
            return Err(RepoError::Corrupt {
                what: format!("snapshot {}", self.name),
                message: format!(
                    "it was written in format {} and needs a reader of format {needed}; this version of ferry reads format {SNAPSHOT_FORMAT}: upgrade ferry",
                    self.format
                ),
            });
        }
        Ok(())
    }
}

pub(crate) async fn read_json<T: serde::de::DeserializeOwned>(
    repo: &Repository,
    blob: &BlobId,
    what: impl FnOnce() -> String,
) -> Result<T, RepoError> {
    let bytes = repo.read_blob(blob).await?;
    serde_json::from_slice(&bytes).map_err(|e| RepoError::Corrupt {
        what: what(),
        message: e.to_string(),
    })
}

/// Finds a snapshot and loads its content under a shared lock (prune waits
/// meanwhile): what `describe` and `graph` show.
pub async fn open_snapshot(
    repo: &Repository,
    name_or_id: &str,
) -> Result<(SnapshotId, Snapshot, SnapshotContent), RepoError> {
    let lock = repo.lock_shared().await?;
    let result = async {
        let (id, snapshot) = repo.find_snapshot(name_or_id).await?;
        let content = load_content(repo, &snapshot).await?;
        Ok((id, snapshot, content))
    }
    .await;
    lock.release().await?;
    result
}

/// A snapshot's report alone (counts, warnings, volumes): its root blob.
pub async fn load_report(
    repo: &Repository,
    snapshot: &Snapshot,
) -> Result<BackupReport, RepoError> {
    Ok(load_root(repo, snapshot).await?.report)
}

/// A snapshot's root blob, refused when it needs a newer reader.
async fn load_root(repo: &Repository, snapshot: &Snapshot) -> Result<StoredContent, RepoError> {
    let name = &snapshot.name;
    let root: StoredContent = read_json(repo, &snapshot.content, || {
        format!("content of snapshot {name}")
    })
    .await?;
    root.check_readable()?;
    Ok(root)
}

/// The volumes of a snapshot whose data is a CSI snapshot kept in a
/// cluster: what deleting the snapshot must release there. Takes a shared
/// lock of its own.
pub async fn kept_volume_snapshots(
    repo: &Repository,
    snapshot: &Snapshot,
) -> Result<Vec<crate::mover::VolumeEntry>, RepoError> {
    // A `ferry volume backup` snapshot holds a directory's data, never an
    // application report: it keeps no CSI snapshot.
    if crate::volume::is_volume_snapshot(snapshot) {
        return Ok(Vec::new());
    }
    let report = load_root_locked(repo, snapshot).await?.report;
    Ok(report
        .volumes
        .into_iter()
        .filter(|v| v.kept().next().is_some())
        .collect())
}

/// The VolumeSnapshotContents and VolumeGroupSnapshotContents that the
/// repository's application snapshots name as kept. The caller holds a
/// lock; an unreadable report is an error (what it names is not known).
pub async fn kept_contents_locked(
    repo: &Repository,
) -> Result<std::collections::BTreeSet<String>, RepoError> {
    let mut contents = std::collections::BTreeSet::new();
    for (_, snapshot) in repo.list_snapshots().await? {
        if crate::volume::is_volume_snapshot(&snapshot) {
            continue;
        }
        for volume in load_root(repo, &snapshot).await?.report.volumes {
            for kept in volume.kept() {
                contents.insert(kept.content.clone());
                if let Some(group) = &kept.group {
                    contents.insert(group.content.clone());
                }
            }
        }
    }
    Ok(contents)
}

/// Loads a snapshot's content, refusing formats this version cannot read.
/// The caller holds a lock.
pub async fn load_content(
    repo: &Repository,
    snapshot: &Snapshot,
) -> Result<SnapshotContent, RepoError> {
    load_parts(repo, snapshot, true).await
}

/// A snapshot's content without its graph (`graph` is null), for readers
/// that do not need it: the graph of a large snapshot is its largest part.
pub async fn load_catalog(
    repo: &Repository,
    snapshot: &Snapshot,
) -> Result<SnapshotContent, RepoError> {
    load_parts(repo, snapshot, false).await
}

async fn load_parts(
    repo: &Repository,
    snapshot: &Snapshot,
    with_graph: bool,
) -> Result<SnapshotContent, RepoError> {
    let name = &snapshot.name;
    let root = load_root(repo, snapshot).await?;
    Ok(SnapshotContent {
        format: root.format,
        name: root.name,
        source: root.source,
        profile: read_json(repo, &root.profile, || {
            format!("cluster profile of snapshot {name}")
        })
        .await?,
        selection: root.selection,
        objects: read_json(repo, &root.objects, || {
            format!("object catalog of snapshot {name}")
        })
        .await?,
        graph: if with_graph {
            read_json(repo, &root.graph, || format!("graph of snapshot {name}")).await?
        } else {
            Value::Null
        },
        report: root.report,
        restore_transform: root.restore_transform,
    })
}

/// The transform plan recorded in a snapshot for restores at the
/// disaster-recovery site, if its BackupPolicy gave one. Takes a shared
/// lock of its own.
pub async fn load_restore_transform(
    repo: &Repository,
    snapshot: &Snapshot,
) -> Result<Option<String>, RepoError> {
    Ok(load_root_locked(repo, snapshot).await?.restore_transform)
}

/// [`load_root`] for callers that hold no lock.
async fn load_root_locked(
    repo: &Repository,
    snapshot: &Snapshot,
) -> Result<StoredContent, RepoError> {
    let lock = repo.lock_shared().await?;
    let result = load_root(repo, snapshot).await;
    lock.release().await?;
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn root(extra: Value) -> StoredContent {
        let zero = BlobId([0; 32]).to_string();
        let mut value = json!({
            "format": 1, "name": "nightly",
            "source": {"server": "https://k8s", "namespaces": ["shop"]},
            "selection": {}, "profile": zero, "objects": zero, "graph": zero,
            "report": serde_json::to_value(BackupReport::default()).unwrap(),
        });
        for (k, v) in extra.as_object().unwrap() {
            value[k] = v.clone();
        }
        serde_json::from_value(value).expect("a stored content")
    }

    #[test]
    fn a_newer_snapshot_with_an_unknown_section_is_read_without_it() {
        let newer = root(json!({"format": 3, "readableBy": 2, "media": {"blob": "x"}}));
        assert!(newer.check_readable().is_ok());
        assert!(root(json!({})).check_readable().is_ok());
    }

    #[test]
    fn a_snapshot_that_needs_a_newer_reader_is_refused_by_name() {
        let message = root(json!({"format": 3}))
            .check_readable()
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("nightly") && message.contains("upgrade ferry"),
            "{message}"
        );
        assert!(
            root(json!({"format": 4, "readableBy": 3}))
                .check_readable()
                .is_err()
        );
    }
}
