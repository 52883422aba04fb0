//! `ferry volume`: the data mover on a directory.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use serde::Serialize;

use super::args::VolumeCommand;
use super::output::{emit, human_bytes, table};
use super::progress::VolumeBar;
use super::repo;
use crate::volume::{self, VolumeBackupOptions, VolumeProgress, VolumeRestoreOptions};

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct BackupOutput {
    /// The snapshot written (none with --root-only).
    #[serde(skip_serializing_if = "Option::is_none")]
    snapshot: Option<String>,
    name: String,
    /// The volume root blob: what an application snapshot references.
    root: String,
    parent: Option<String>,
    source: String,
    /// The backup of a block device or disk image (a block volume).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    block: bool,
    stats: volume::VolumeStats,
    warnings: Vec<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RestoreOutput {
    snapshot: String,
    target: PathBuf,
    /// A block volume written into a device or an image file.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    block: bool,
    stats: volume::RestoreStats,
}

/// The result as compact JSON in `path` (a mover Pod's termination message).
fn write_result<T: Serialize>(path: Option<&std::path::Path>, value: &T) -> anyhow::Result<()> {
    if let Some(path) = path {
        std::fs::write(path, serde_json::to_vec(value)?)
            .with_context(|| format!("writing the result to {}", path.display()))?;
    }
    Ok(())
}

/// Ranges from a file of `OFFSET LENGTH` lines (`-`: stdin), as `flag`
/// gave it.
fn read_changed_blocks(file: &std::path::Path, flag: &str) -> anyhow::Result<Vec<(u64, u64)>> {
    let text = if file == std::path::Path::new("-") {
        std::io::read_to_string(std::io::stdin())?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("{flag} {}", file.display()))?
    };
    parse_changed_blocks(&text).with_context(|| format!("{flag} {}", file.display()))
}

fn parse_changed_blocks(text: &str) -> anyhow::Result<Vec<(u64, u64)>> {
    let mut ranges = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let parsed = match fields[..] {
            [offset, length] => offset.parse::<u64>().ok().zip(length.parse::<u64>().ok()),
            _ => None,
        };
        let range = parsed.ok_or_else(|| {
            anyhow::anyhow!("line {}: '{line}' is not OFFSET LENGTH in bytes", n + 1)
        })?;
        ranges.push(range);
    }
    Ok(ranges)
}

/// Where a device may differ from what it is compared with.
enum Changes {
    /// Changed since the parent's snapshot.
    SinceParent(Vec<(u64, u64)>),
    /// Holding data; the rest reads as zeros (compared with an empty device).
    Allocated(Vec<(u64, u64)>),
}

/// What a mover Pod asks the CSI snapshot metadata service about the
/// VolumeSnapshot `target` (NAMESPACE/NAME): the ranges changed since the
/// snapshot `base_handle`, or, without one or when that fails (the base is
/// gone), the ranges that hold data. Token and CA come from the
/// environment. A failure on the way is told in `warnings`.
async fn ask_snapshot_metadata(
    address: &str,
    base_handle: Option<&str>,
    target: &str,
    warnings: &mut Vec<String>,
) -> anyhow::Result<Changes> {
    use crate::mover::metadata;
    let (namespace, name) = target
        .split_once('/')
        .ok_or_else(|| anyhow::anyhow!("--target-snapshot {target} is not NAMESPACE/NAME"))?;
    let token = std::env::var(metadata::TOKEN_ENV)
        .map_err(|_| anyhow::anyhow!("{} is not set", metadata::TOKEN_ENV))?;
    let ca = std::env::var(metadata::CA_ENV)
        .map_err(|_| anyhow::anyhow!("{} is not set", metadata::CA_ENV))?;
    let service = metadata::MetadataService {
        address: address.to_string(),
        ca_cert: ca.into_bytes(),
        audience: String::new(),
    };
    if let Some(base) = base_handle {
        match metadata::changed_blocks(&service, &token, namespace, base, name).await {
            Ok(changed) => return Ok(Changes::SinceParent(changed.ranges)),
            Err(e) => warnings.push(format!(
                "the changes since the base snapshot are unavailable, the blocks in use are read instead: {e}"
            )),
        }
    }
    let allocated = metadata::allocated_blocks(&service, &token, namespace, name)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    Ok(Changes::Allocated(allocated.ranges))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

pub async fn run(cmd: VolumeCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        VolumeCommand::Backup {
            dir,
            repo: repo_args,
            name,
            source,
            parent,
            no_parent,
            ignore_inode,
            changed_blocks,
            allocated_blocks,
            snapshot_metadata,
            base_snapshot_handle,
            target_snapshot,
            labels,
            root_only,
            parent_root,
            result_file,
            output,
        } => {
            let dir = std::fs::canonicalize(&dir)
                .with_context(|| format!("volume backup of {}", dir.display()))?;
            let source = source.unwrap_or_else(|| format!("{}:{}", hostname(), dir.display()));
            let name = name.unwrap_or_else(|| {
                dir.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "root".into())
            });
            // The directory is scanned while the repository opens.
            let mut scan = dir.is_dir().then(|| volume::DirScan::start(&dir));
            let repository = repo::open(&repo_args).await?;
            tracing::debug!("volume backup: repository opened");
            let lock = repository.lock_shared().await?;
            tracing::debug!("volume backup: repository locked, index loaded");
            let result = async {
                let parent = match (&parent, no_parent) {
                    (_, true) => None,
                    _ if parent_root.is_some() => {
                        let blob = parent_root
                            .as_deref()
                            .unwrap_or_default()
                            .parse()
                            .map_err(|e: String| anyhow::anyhow!("--parent-root: {e}"))?;
                        let root = volume::read_root(&repository, &blob).await?;
                        Some((crate::repo::SnapshotId(blob.to_string()), root))
                    }
                    (Some(p), _) => {
                        let (id, _, root) = volume::open_snapshot(&repository, p).await?;
                        Some((id, root))
                    }
                    (None, _) => match volume::latest_of(&repository, &source).await? {
                        Some((id, _)) => {
                            let (id, _, root) = volume::open_snapshot(&repository, &id.0).await?;
                            Some((id, root))
                        }
                        None => None,
                    },
                };
                let parent_id = parent.as_ref().map(|(id, _)| id.0.clone());
                tracing::debug!(parent = ?parent_id, "volume backup: parent chosen");
                let ranges_given = changed_blocks.is_some()
                    || allocated_blocks.is_some()
                    || snapshot_metadata.is_some();
                if dir.is_dir() && ranges_given {
                    anyhow::bail!(
                        "changed blocks are for a block device or disk image file; a directory's unchanged files are found by comparing with the parent"
                    );
                }
                let mut early_warnings = Vec::new();
                let mut parent = parent.map(|(_, root)| root);
                let changed_blocks = match (&changed_blocks, &snapshot_metadata) {
                    _ if allocated_blocks.is_some() => {
                        // Compared with an empty device: no parent.
                        parent = None;
                        let file = allocated_blocks.as_deref().expect("checked");
                        Some(read_changed_blocks(file, "--allocated-blocks")?)
                    }
                    (Some(_), _) if parent.is_none() => {
                        early_warnings.push(
                            "the changed blocks were not used (no parent backup to take the rest from): the whole device was read".into(),
                        );
                        None
                    }
                    (Some(file), _) => Some(read_changed_blocks(file, "--changed-blocks")?),
                    (None, Some(address)) => {
                        let base = base_snapshot_handle.as_deref().filter(|_| parent.is_some());
                        let target = target_snapshot.as_deref().unwrap_or_default();
                        match ask_snapshot_metadata(address, base, target, &mut early_warnings)
                            .await
                        {
                            Ok(Changes::SinceParent(ranges)) => Some(ranges),
                            Ok(Changes::Allocated(ranges)) => {
                                parent = None;
                                Some(ranges)
                            }
                            Err(e) => {
                                early_warnings.push(format!(
                                    "changed-block tracking is unavailable, the whole device is read: {e:#}"
                                ));
                                None
                            }
                        }
                    }
                    (None, None) => None,
                };
                // A device compared with an empty one has no parent.
                let parent_id = parent_id.filter(|_| parent.is_some());
                let progress = Arc::new(VolumeProgress::default());
                let bar = VolumeBar::start(progress.clone());
                let options = VolumeBackupOptions {
                    source: source.clone(),
                    parent,
                    ignore_inode,
                    workers: None,
                    progress: Some(progress),
                    changed_blocks,
                };
                let backup = if let Some(scan) = scan.take() {
                    volume::backup_scanned(&repository, &lock, scan, options).await
                } else {
                    volume::backup_device(&repository, &lock, &dir, options).await
                };
                bar.finish();
                let mut backup = backup?;
                tracing::debug!("volume backup: data, trees and index stored");
                early_warnings.append(&mut backup.warnings);
                backup.warnings = early_warnings;
                let snapshot = if root_only {
                    None
                } else {
                    Some(
                        volume::save_snapshot(
                            &repository,
                            &name,
                            &backup,
                            labels.into_iter().collect(),
                        )
                        .await?
                        .0,
                    )
                };
                tracing::debug!("volume backup: snapshot saved");
                Ok::<_, anyhow::Error>(BackupOutput {
                    snapshot,
                    name: name.clone(),
                    root: backup.root_blob.to_string(),
                    parent: parent_id,
                    source: source.clone(),
                    block: backup.root.block,
                    stats: backup.root.stats.clone(),
                    warnings: backup.warnings,
                })
            }
            .await;
            lock.release().await?;
            let out = result.with_context(|| format!("volume backup of {}", dir.display()))?;
            for warning in &out.warnings {
                eprintln!("warning: {warning}");
            }
            write_result(result_file.as_deref(), &out)?;
            emit(output, &out, |w| {
                let s = &out.stats;
                let seconds = s.duration_ms as f64 / 1000.0;
                let what = if out.snapshot.is_some() {
                    "snapshot"
                } else {
                    "volume root"
                };
                let id = out.snapshot.as_deref().unwrap_or(&out.root);
                if out.block {
                    let changed = match s.bytes_changed {
                        Some(changed) => format!(
                            "{} changed, {} read; ",
                            human_bytes(changed),
                            human_bytes(s.bytes_read)
                        ),
                        None => String::new(),
                    };
                    return writeln!(
                        w,
                        "{what} {id}: block device of {} in {seconds:.1}s ({changed}{} new chunks, {} stored)",
                        human_bytes(s.bytes),
                        s.chunks_new,
                        human_bytes(s.bytes_stored)
                    );
                }
                // Links, devices, FIFOs and sockets, when there are any.
                let others = match s.others {
                    0 => String::new(),
                    n => format!(", {n} other entries"),
                };
                writeln!(
                    w,
                    "{what} {id}: {} files, {} dirs{others}, {} in {:.1}s ({} files read, {} unchanged; {} new chunks, {} stored)",
                    s.files,
                    s.dirs,
                    human_bytes(s.bytes),
                    seconds,
                    s.files_read,
                    s.files_unchanged,
                    s.chunks_new,
                    human_bytes(s.bytes_stored)
                )
            })?;
            Ok(ExitCode::SUCCESS)
        }
        VolumeCommand::Restore {
            snapshot,
            dir,
            claim,
            repo: repo_args,
            root,
            result_file,
            output,
        } => {
            let (name, subpath) = match snapshot.split_once(':') {
                Some((name, path)) => (name.to_string(), Some(PathBuf::from(path))),
                None => (snapshot.clone(), None),
            };
            let repository = repo::open(&repo_args).await?;
            let lock = repository.lock_shared().await?;
            let result = async {
                let volume_root = match &root {
                    Some(blob) => {
                        let id = blob
                            .parse()
                            .map_err(|e: String| anyhow::anyhow!("--root: {e}"))?;
                        volume::read_root(&repository, &id).await?
                    }
                    None => match volume::open_snapshot(&repository, &name).await {
                        Ok(_) if claim.is_some() => anyhow::bail!(
                            "--claim picks a volume of an application snapshot; {name} is a volume snapshot"
                        ),
                        Ok((_, _, root)) => root,
                        Err(volume::VolumeError::NotAVolume(_)) => {
                            claim_root(&repository, &name, claim.as_deref()).await?
                        }
                        Err(e) => return Err(e.into()),
                    },
                };
                let progress = Arc::new(VolumeProgress::default());
                let bar = VolumeBar::start(progress.clone());
                // SAFETY: geteuid has no preconditions.
                let root_user = unsafe { libc::geteuid() } == 0;
                let options = VolumeRestoreOptions {
                    subpath,
                    owners: root_user,
                    progress: Some(progress),
                };
                let into_device = std::fs::metadata(&dir)
                    .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()));
                let image = volume_root.block && options.subpath.is_none() && !dir.is_dir();
                let stats = if image {
                    volume::restore_image(&repository, &volume_root, &dir, options).await
                } else if into_device {
                    bar.finish();
                    anyhow::bail!(
                        "{} is a block device and the volume holds files: restore it into a directory",
                        dir.display()
                    );
                } else {
                    volume::restore_dir(&repository, &volume_root, &dir, options).await
                };
                bar.finish();
                Ok::<_, anyhow::Error>((stats?, image))
            }
            .await;
            lock.release().await?;
            let (stats, block) = result
                .with_context(|| format!("restoring volume {snapshot} into {}", dir.display()))?;
            for warning in &stats.warnings {
                eprintln!("warning: {warning}");
            }
            let out = RestoreOutput {
                snapshot,
                target: dir,
                block,
                stats,
            };
            write_result(result_file.as_deref(), &out)?;
            emit(output, &out, |w| {
                let s = &out.stats;
                if out.block {
                    return writeln!(
                        w,
                        "restored a block volume of {} into {} in {:.1}s",
                        human_bytes(s.bytes),
                        out.target.display(),
                        s.duration_ms as f64 / 1000.0
                    );
                }
                writeln!(
                    w,
                    "restored {} files ({}), {} dirs, {} other entries into {} in {:.1}s",
                    s.files,
                    human_bytes(s.bytes),
                    s.dirs,
                    s.others,
                    out.target.display(),
                    s.duration_ms as f64 / 1000.0
                )?;
                if s.sockets_skipped > 0 {
                    writeln!(
                        w,
                        "{} socket file(s) not made again: the application makes its own when it listens",
                        s.sockets_skipped
                    )?;
                }
                Ok(())
            })?;
            Ok(ExitCode::SUCCESS)
        }
        VolumeCommand::Limit {
            dir,
            repo: repo_args,
            max_mib,
            threads,
            output,
        } => {
            let repository = repo::open(&repo_args).await?;
            let threads = threads.unwrap_or_else(crate::cores);
            let limit = tokio::task::spawn_blocking(move || {
                volume::limit::measure(&repository, &dir, max_mib << 20, threads)
            })
            .await??;
            emit(output, &limit, |w| {
                writeln!(
                    w,
                    "{:.0} MiB/s: chunk + hash + compress + seal of {} on {} threads in {:.2}s",
                    limit.mib_per_second,
                    human_bytes(limit.bytes),
                    limit.threads,
                    limit.seconds
                )
            })?;
            Ok(ExitCode::SUCCESS)
        }
        VolumeCommand::List {
            repo: repo_args,
            output,
        } => {
            let repository = repo::open(&repo_args).await?;
            let snapshots = volume::list(&repository).await?;
            #[derive(Serialize)]
            struct Row {
                id: String,
                name: String,
                created: String,
                source: String,
                summary: serde_json::Value,
            }
            let rows: Vec<Row> = snapshots
                .into_iter()
                .map(|(id, s)| Row {
                    id: id.0,
                    name: s.name.clone(),
                    created: s.created.clone(),
                    source: s
                        .labels
                        .get(volume::LABEL_SOURCE)
                        .cloned()
                        .unwrap_or_default(),
                    summary: s.summary,
                })
                .collect();
            emit(output, &rows, |w| {
                let cells: Vec<Vec<String>> = rows
                    .iter()
                    .map(|r| {
                        vec![
                            r.id[..12.min(r.id.len())].to_string(),
                            r.name.clone(),
                            r.created.clone(),
                            r.summary["files"].to_string(),
                            human_bytes(r.summary["bytes"].as_u64().unwrap_or(0)),
                            r.source.clone(),
                        ]
                    })
                    .collect();
                table(
                    w,
                    &["ID", "NAME", "CREATED", "FILES", "SIZE", "SOURCE"],
                    &cells,
                )
            })?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The data of the volume `claim` (NAMESPACE/NAME) of the application
/// snapshot `name`: its only volume when `claim` is not given.
async fn claim_root(
    repo: &crate::repo::Repository,
    name: &str,
    claim: Option<&str>,
) -> anyhow::Result<volume::VolumeRoot> {
    let (_, snapshot) = repo.find_snapshot(name).await?;
    let report = crate::snapshot::load_report(repo, &snapshot).await?;
    let names: Vec<String> = report
        .volumes
        .iter()
        .map(|v| format!("{}/{}", v.namespace, v.claim))
        .collect();
    let wanted = match (claim, names.as_slice()) {
        (Some(claim), _) => claim.to_string(),
        (None, [only]) => only.clone(),
        (None, []) => anyhow::bail!(
            "snapshot {name} is an application snapshot without volumes: restore it with `ferry restore {name}`"
        ),
        (None, _) => anyhow::bail!(
            "snapshot {name} holds {} volumes: pick one with --claim NAMESPACE/NAME ({})",
            names.len(),
            names.join(", ")
        ),
    };
    let Some(entry) = names
        .iter()
        .position(|n| *n == wanted)
        .map(|i| &report.volumes[i])
    else {
        anyhow::bail!(
            "snapshot {name} has no volume {wanted} (its volumes: {})",
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        );
    };
    match (entry.root, &entry.snapshot, &entry.skipped) {
        (Some(root), _, _) => Ok(volume::read_root(repo, &root).await?),
        (None, Some(kept), _) => anyhow::bail!(
            "volume {wanted} of snapshot {name} was kept as the CSI snapshot {} in its cluster, not moved into the repository: `ferry restore {name}` restores it there",
            kept.volume_snapshot
        ),
        (None, None, Some(why)) => {
            anyhow::bail!("volume {wanted} of snapshot {name} was not backed up: {why}")
        }
        (None, None, None) => {
            anyhow::bail!("volume {wanted} of snapshot {name} has no data in the repository")
        }
    }
}
