//! The `ferry` command line: argument parsing, output formats, progress
//! bars, and the glue from commands to the library.

pub mod args;
pub mod controller;
pub mod output;
pub mod progress;
pub mod repo;
mod transform;
mod volume;

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;

use crate::backup::{self, BackupOptions, Progress};
use crate::cluster::ConnectOptions;
use crate::model::select::Selection;
use args::{
    BackupCommand, Cli, ClusterCommand, Command, GlobalArgs, GraphFormat, MigrateArgs, RepoCommand,
    RestoreArgs, RestoreOptionsArgs, RestoreWriteArgs, SelectionArgs,
};
use output::{OutputFormat, emit, human_bytes, table};

/// Exit status of a backup that stored what it could but was refused some resources.
pub const EXIT_PARTIAL: u8 = 3;

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Backup(cmd) => backup_command(&cli.global, cmd).await,
        Command::Repo(cmd) => repo_command(cmd).await,
        Command::Restore(args) => restore_command(&cli.global, args).await,
        Command::Migrate(args) => migrate_command(&cli.global, args).await,
        Command::Transform(args) => transform::run(&cli.global, args).await,
        Command::Volume(cmd) => volume::run(cmd).await,
        Command::Controller(args) => controller::run(&cli.global, args).await,
        Command::Policy(cmd) => controller::policy(&cli.global, cmd).await,
        Command::Cluster(ClusterCommand::Profile { output }) => {
            let conn = connect(&cli.global).await?;
            let discovery = crate::cluster::discovery::discover(&conn.client).await?;
            let profile = crate::cluster::profile::read_profile(&conn, &discovery).await?;
            emit(
                if output == OutputFormat::Text {
                    OutputFormat::Yaml
                } else {
                    output
                },
                &profile,
                |_| Ok(()),
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Rules { output } => {
            let rules: Vec<_> = crate::model::normalize::RULES
                .iter()
                .map(|r| serde_json::json!({"name": r.name, "matches": r.matches, "action": r.description}))
                .collect();
            emit(output, &rules, |out| {
                let rows: Vec<Vec<String>> = crate::model::normalize::RULES
                    .iter()
                    .map(|r| {
                        vec![
                            r.name.to_string(),
                            r.matches.to_string(),
                            r.description.to_string(),
                        ]
                    })
                    .collect();
                table(out, &["RULE", "MATCHES", "ACTION"], &rows)
            })?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub async fn connect(global: &GlobalArgs) -> anyhow::Result<crate::cluster::Connection> {
    let options = ConnectOptions {
        kubeconfig: global.kubeconfig.clone(),
        context: global.context.clone(),
        timeout: Some(global.request_timeout),
        impersonate: None,
    };
    Ok(options.connect().await?)
}

fn selection(args: &SelectionArgs) -> anyhow::Result<Selection> {
    if args.namespaces.is_empty() && !args.all_namespaces {
        anyhow::bail!(
            "say what to back up: -n NAMESPACE (repeatable, globs allowed) or -A/--all-namespaces"
        );
    }
    let selector = match &args.selector {
        Some(s) => Some(
            crate::model::select::LabelSelector::parse(s)
                .with_context(|| format!("label selector '{s}'"))?,
        ),
        None => None,
    };
    Ok(Selection {
        namespaces: args.namespaces.clone(),
        exclude_namespaces: args.exclude_namespaces.clone(),
        all_namespaces: args.all_namespaces,
        selector,
        include_kinds: args.include_kinds.clone(),
        exclude_kinds: args.exclude_kinds.clone(),
        application: args.app.clone(),
        include_deps: !args.no_deps,
    })
}

async fn repo_command(cmd: RepoCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        RepoCommand::Init {
            repo,
            cipher,
            create_bucket,
        } => {
            let repository = repo::init(&repo, cipher, create_bucket).await?;
            eprintln!(
                "created repository {} (format {}, blobs sealed with {})",
                repository.id(),
                repository.format_version(),
                repository.cipher()
            );
            eprintln!("keep the password safe: without it the backups cannot be read");
        }
        RepoCommand::Unlock { repo } => {
            let repository = repo::open(&repo).await?;
            let removed = repository.remove_stale_locks().await?;
            for path in &removed {
                eprintln!("removed stale lock {path}");
            }
            eprintln!("{} stale lock(s) removed", removed.len());
        }
        RepoCommand::Repair {
            repo,
            dry_run,
            output,
        } => {
            let repository = repo::open(&repo).await?;
            let report = repository
                .repair(dry_run)
                .await
                .with_context(|| format!("repairing {}", repository.location()))?;
            emit(output, &report, |out| {
                let would = if dry_run { "would be " } else { "" };
                writeln!(
                    out,
                    "index rebuilt from {} pack(s), {} blob(s); {} index file(s) {would}replaced",
                    report.packs_indexed, report.blobs_indexed, report.index_files_replaced
                )?;
                for file in &report.damaged_index_files {
                    writeln!(out, "damaged index file {would}replaced: {file}")?;
                }
                for mark in &report.damaged_marks_removed {
                    writeln!(out, "unreadable deletion mark {would}removed: {mark}")?;
                }
                for snapshot in &report.damaged_snapshots_removed {
                    writeln!(out, "damaged snapshot manifest {would}removed: {snapshot}")?;
                }
                for item in &report.unrecoverable {
                    writeln!(out, "NOT RECOVERABLE  {item}")?;
                }
                if report.unrecoverable.is_empty() {
                    writeln!(
                        out,
                        "everything the snapshots reference is in the repository"
                    )?;
                }
                Ok(())
            })?;
            if !report.unrecoverable.is_empty() {
                anyhow::bail!(
                    "{} item(s) cannot be recovered, listed above; the rest of the repository is usable",
                    report.unrecoverable.len()
                );
            }
        }
        RepoCommand::Stats { repo, output } => {
            let repository = repo::open(&repo).await?;
            let stats = repository.stats().await?;
            let snapshots = repository.list_snapshots().await?.len();
            let value = serde_json::json!({
                "snapshots": snapshots,
                "format": repository.format_version(),
                "cipher": repository.cipher(),
                "stats": stats,
            });
            emit(output, &value, |out| {
                writeln!(
                    out,
                    "repository {} (format {})",
                    repository.id(),
                    repository.format_version()
                )?;
                writeln!(out, "cipher: {}", repository.cipher())?;
                writeln!(out, "snapshots: {snapshots}")?;
                writeln!(
                    out,
                    "packs: {}  blobs: {}  stored: {}",
                    stats.packs,
                    stats.blobs,
                    human_bytes(stats.bytes)
                )
            })?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn backup_command(global: &GlobalArgs, cmd: BackupCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        BackupCommand::Create {
            name,
            selection: selection_args,
            repo,
            ttl,
            keep_last,
            labels,
            concurrency,
            page_size,
            keep_last_applied,
            allow_empty,
            volumes,
            output,
        } => {
            let selection = selection(&selection_args)?;
            let (repository, key) = repo::open_keyed(&repo).await?;
            let conn = connect(global).await?;
            let mut options = BackupOptions::new(&name, selection);
            options.label_selector = selection_args.selector.clone();
            options.normalize.keep_last_applied = keep_last_applied;
            options.concurrency = concurrency.max(1);
            options.page_size = page_size.max(1);
            options.ttl = ttl;
            options.labels = labels.into_iter().collect::<BTreeMap<_, _>>();
            options.allow_empty = allow_empty;
            options.volumes = Some(volume_settings(&repo, &key, &volumes)?);
            let progress = Arc::new(Progress::default());
            let bar = progress::BackupBar::start(progress.clone());
            let result = backup::run(&conn, &repository, &options, progress).await;
            bar.finish();
            let outcome =
                result.with_context(|| format!("backup {name} failed; no snapshot was written"))?;
            let report = &outcome.content.report;
            emit(
                output,
                &serde_json::json!({"snapshot": outcome.snapshot.to_string(), "name": name, "report": report}),
                |out| print_report(out, &name, &outcome.content),
            )?;
            if let Some(n) = keep_last {
                let pruned = backup::apply_retention(&repository, Some(n), false).await?;
                if !pruned.deleted.is_empty() {
                    eprintln!(
                        "retention: deleted {} snapshot(s), freed {}",
                        pruned.deleted.len(),
                        human_bytes(pruned.bytes_freed)
                    );
                }
            }
            if report.is_partial() {
                eprintln!(
                    "warning: the backup is partial: {} resource(s) could not be read (see 'forbidden' above)",
                    report.forbidden.len()
                );
                return Ok(ExitCode::from(EXIT_PARTIAL));
            }
        }
        BackupCommand::List { repo, output } => {
            let repository = repo::open(&repo).await?;
            let listing = repository.snapshot_listing().await?;
            for damaged in &listing.damaged {
                eprintln!(
                    "DAMAGED  snapshots/{}: {}; remove it with `ferry backup delete {}` or `ferry repo repair`",
                    damaged.id, damaged.message, damaged.id
                );
            }
            // Volume snapshots of `ferry volume backup` are listed by `ferry volume list`.
            let mut snapshots: Vec<_> = listing
                .snapshots
                .into_iter()
                .filter(|(_, s)| !crate::volume::is_volume_snapshot(s))
                .collect();
            snapshots.sort_by(|a, b| a.1.created.cmp(&b.1.created));
            let value: Vec<_> = snapshots
                .iter()
                .map(|(id, s)| serde_json::json!({"id": id.to_string(), "name": s.name, "created": s.created, "expires": s.expires, "labels": s.labels, "summary": s.summary}))
                .collect();
            emit(output, &value, |out| {
                let rows: Vec<Vec<String>> = snapshots
                    .iter()
                    .map(|(id, s)| {
                        let get = |k: &str| {
                            s.summary
                                .get(k)
                                .map(|v| v.to_string().trim_matches('"').to_string())
                                .unwrap_or_default()
                        };
                        // Snapshots written before volumes were summarized
                        // say nothing: an empty cell, not "none".
                        let volumes = match (
                            s.summary.get("volumes").and_then(|v| v.as_u64()),
                            s.summary.get("volumeBytes").and_then(|v| v.as_u64()),
                        ) {
                            (None, _) => String::new(),
                            (Some(0), _) => "-".into(),
                            (Some(n), Some(bytes)) if bytes > 0 => {
                                format!("{n} ({})", human_bytes(bytes))
                            }
                            (Some(n), _) => n.to_string(),
                        };
                        vec![
                            s.name.clone(),
                            id.to_string().chars().take(12).collect(),
                            s.created.clone(),
                            get("objects"),
                            volumes,
                            get("cluster"),
                            if get("partial") == "true" {
                                "partial".into()
                            } else {
                                "complete".into()
                            },
                            s.expires.clone().unwrap_or_else(|| "-".into()),
                        ]
                    })
                    .collect();
                table(
                    out,
                    &[
                        "NAME", "ID", "CREATED", "OBJECTS", "VOLUMES", "CLUSTER", "STATUS",
                        "EXPIRES",
                    ],
                    &rows,
                )
            })?;
        }
        BackupCommand::Describe {
            name,
            repo,
            objects,
            output,
        } => {
            let repository = repo::open(&repo).await?;
            let (id, snapshot, mut content) = backup::open_snapshot(&repository, &name).await?;
            if !objects && output == OutputFormat::Text {
                content.objects.clear();
            }
            let value =
                serde_json::json!({"id": id.to_string(), "snapshot": snapshot, "content": content});
            emit(output, &value, |out| {
                writeln!(out, "Snapshot:   {} ({})", snapshot.name, id)?;
                writeln!(out, "Created:    {}", snapshot.created)?;
                if let Some(expires) = &snapshot.expires {
                    writeln!(out, "Expires:    {expires}")?;
                }
                writeln!(
                    out,
                    "Cluster:    {} {} ({})",
                    content.source.server, content.profile.version, content.profile.distribution
                )?;
                writeln!(out, "Namespaces: {}", content.source.namespaces.join(", "))?;
                print_report(out, &snapshot.name, &content)?;
                if objects {
                    writeln!(out, "\nObjects:")?;
                    for entry in &content.objects {
                        writeln!(out, "  {}", entry.object)?;
                    }
                }
                Ok(())
            })?;
        }
        BackupCommand::Graph { name, repo, format } => {
            let repository = repo::open(&repo).await?;
            let (_, _, content) = backup::open_snapshot(&repository, &name).await?;
            let graph = crate::model::graph::AppGraph::from_json(&content.graph)
                .with_context(|| format!("the graph of snapshot {name} is unreadable"))?;
            match format {
                GraphFormat::Dot => print!("{}", graph.to_dot()),
                GraphFormat::Json => println!("{}", serde_json::to_string_pretty(&content.graph)?),
            }
        }
        BackupCommand::Verify {
            name,
            repo,
            read_data,
            output,
        } => {
            let repository = repo::open(&repo).await?;
            let report = backup::verify(&repository, name.as_deref(), read_data).await?;
            emit(output, &report, |out| {
                for problem in &report.problems {
                    writeln!(out, "DAMAGED  {problem}")?;
                }
                let data = report
                    .data_read
                    .as_ref()
                    .map(|d| {
                        format!(
                            " and every pack of the repository ({} packs, {} blobs, volume data included)",
                            d.packs, d.blobs
                        )
                    })
                    .unwrap_or_default();
                writeln!(
                    out,
                    "checked {} snapshot(s), {} object(s){data}: {}",
                    report.snapshots,
                    report.objects,
                    if report.problems.is_empty() {
                        "all intact".to_string()
                    } else {
                        format!("{} problem(s)", report.problems.len())
                    }
                )
            })?;
            if !report.problems.is_empty() {
                anyhow::bail!(
                    "verification failed: {} damaged or missing item(s), listed above",
                    report.problems.len()
                );
            }
        }
        BackupCommand::Delete {
            name,
            repo,
            prune,
            keep_volume_snapshots,
        } => {
            let repository = repo::open(&repo).await?;
            let (id, snapshot) = repository.resolve_snapshot(&name).await?;
            // Read before the delete: afterwards the report may be pruned.
            let mut unreadable = Vec::new();
            let kept = match &snapshot {
                Some(s) => crate::snapshot::kept_volume_snapshots(&repository, s)
                    .await
                    .unwrap_or_else(|e| {
                        unreadable.push(format!("{}: {e}", s.name));
                        Vec::new()
                    }),
                None => Vec::new(),
            };
            repository.delete_snapshot(&id).await?;
            match snapshot {
                Some(snapshot) => eprintln!("deleted snapshot {} ({id})", snapshot.name),
                None => eprintln!("deleted damaged snapshot manifest {id}"),
            }
            crate::failpoint::stop_here("delete-before-release").await;
            let released =
                release_kept_snapshots(global, &kept, &unreadable, keep_volume_snapshots).await;
            if prune {
                let report = repository.prune(false).await?;
                print_prune(&mut std::io::stderr(), &report, false)?;
            }
            released?;
        }
        BackupCommand::Prune {
            repo,
            keep_last,
            dry_run,
            keep_volume_snapshots,
            output,
        } => {
            let repository = repo::open(&repo).await?;
            let mut outcome = backup::apply_retention(&repository, keep_last, dry_run).await?;
            let released = release_kept_snapshots(
                global,
                &outcome.kept_volume_snapshots,
                &outcome.unreadable_reports,
                keep_volume_snapshots,
            )
            .await;
            let swept = if keep_volume_snapshots {
                Ok(())
            } else {
                sweep_kept_snapshots(global, &repository, dry_run, &mut outcome).await
            };
            emit(output, &outcome, |out| {
                for name in &outcome.deleted {
                    writeln!(
                        out,
                        "{} {name}",
                        if dry_run { "would delete" } else { "deleted" }
                    )?;
                }
                if let Some(swept) = &outcome.swept_volume_snapshots {
                    for what in &swept.released {
                        writeln!(
                            out,
                            "{} leaked kept CSI {what}",
                            if dry_run { "would release" } else { "released" }
                        )?;
                    }
                }
                print_prune(out, &outcome.prune, dry_run)
            })?;
            released?;
            swept?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Releases the kept CSI snapshots of the current cluster that are labelled
/// for `repository` and named by none of its snapshots. Without a reachable
/// cluster there is nothing to look at: a note says so. Fails when a leaked
/// snapshot could not be released.
async fn sweep_kept_snapshots(
    global: &GlobalArgs,
    repository: &crate::repo::Repository,
    dry_run: bool,
    outcome: &mut backup::RetentionOutcome,
) -> anyhow::Result<()> {
    let conn = match connect(global).await {
        Ok(conn) => conn,
        Err(e) => {
            eprintln!("note: leaked kept CSI snapshots were not looked for: {e:#}");
            return Ok(());
        }
    };
    // Looking is housekeeping: a repository in use, or a user who may not
    // list snapshot contents, gets a note; the prune itself is done.
    let swept = match backup::sweep_kept_snapshots(repository, &conn, dry_run).await {
        Ok(swept) => swept,
        Err(e) => {
            eprintln!("note: leaked kept CSI snapshots were not looked for: {e}");
            return Ok(());
        }
    };
    for line in &swept.failed {
        eprintln!("warning: leaked kept CSI {line}");
    }
    let failed = swept.failed.len();
    outcome.swept_volume_snapshots = Some(swept);
    if failed > 0 {
        anyhow::bail!("{failed} leaked kept CSI snapshot(s) were not released (listed above)");
    }
    Ok(())
}

/// Deletes from the cluster the CSI snapshots that deleted backups kept
/// (unless `keep`), and says on stderr what was left and why. Fails, after
/// doing all it can, when a kept snapshot could not be deleted.
async fn release_kept_snapshots(
    global: &GlobalArgs,
    kept: &[crate::mover::VolumeEntry],
    unreadable: &[String],
    keep: bool,
) -> anyhow::Result<()> {
    for line in unreadable {
        eprintln!(
            "warning: the report of deleted snapshot {line}: CSI snapshots it kept, if any, are still in the cluster"
        );
    }
    if kept.is_empty() {
        return Ok(());
    }
    if keep {
        // Left to the user: a later prune must not take them for leaks.
        match connect(global).await {
            Ok(conn) => {
                for line in crate::mover::disown_kept_snapshots(&conn, kept).await {
                    eprintln!("warning: {line}; a later prune may release it");
                }
            }
            Err(e) => eprintln!(
                "warning: the kept CSI snapshots still name this repository ({e:#}); a later prune from their cluster may release them"
            ),
        }
        eprintln!(
            "left {} kept CSI snapshot(s) in the cluster (--keep-volume-snapshots)",
            kept.len()
        );
        return Ok(());
    }
    let left = match connect(global).await {
        Ok(conn) => crate::mover::release_kept_snapshots(&conn, kept).await,
        Err(e) => kept
            .iter()
            .filter_map(|v| v.snapshot.as_ref().map(|k| (v, k)))
            .map(|(v, k)| {
                format!(
                    "kept snapshot of {}/{} (VolumeSnapshotContent {}) was not deleted: {e:#}",
                    v.namespace, v.claim, k.content
                )
            })
            .collect(),
    };
    eprintln!(
        "deleted {} kept CSI snapshot(s) from the cluster",
        kept.len().saturating_sub(left.len())
    );
    for line in &left {
        eprintln!("warning: {line}");
    }
    if !left.is_empty() {
        anyhow::bail!(
            "{} kept CSI snapshot(s) were not deleted (listed above); the backups themselves are deleted",
            left.len()
        );
    }
    Ok(())
}

fn print_prune(
    out: &mut dyn Write,
    report: &crate::repo::PruneReport,
    dry_run: bool,
) -> std::io::Result<()> {
    let (free, mark) = if dry_run {
        ("would free", "would mark")
    } else {
        ("freed", "marked")
    };
    writeln!(
        out,
        "{free} {} ({} pack(s) marked by an earlier prune)",
        human_bytes(report.bytes_removed),
        report.packs_removed
    )?;
    if report.packs_marked > 0 {
        writeln!(
            out,
            "{mark} {} in {} pack(s) for deletion: the next prune deletes them once every command running now has finished",
            human_bytes(report.bytes_marked),
            report.packs_marked
        )?;
    }
    if report.packs_kept > 0 {
        writeln!(
            out,
            "kept {} marked pack(s) that a snapshot needs again",
            report.packs_kept
        )?;
    }
    if report.packs_waiting > 0 {
        writeln!(
            out,
            "{} marked pack(s) wait for: {}",
            report.packs_waiting,
            report.waiting_for.join(", ")
        )?;
    }
    Ok(())
}

/// ", group NS/NAME" for a volume snapshotted with its volume group.
fn in_group(volume: &crate::mover::VolumeEntry) -> String {
    volume
        .group
        .as_ref()
        .map(|g| format!(", group {g}"))
        .unwrap_or_default()
}

fn print_report(
    out: &mut dyn Write,
    name: &str,
    content: &backup::SnapshotContent,
) -> std::io::Result<()> {
    let report = &content.report;
    let stats = &report.stats;
    // Volume data is stored by the movers: counted apart from the objects'.
    let moved: Vec<&crate::volume::VolumeStats> = report
        .volumes
        .iter()
        .filter_map(|v| v.stats.as_ref())
        .collect();
    let volumes = if moved.is_empty() {
        String::new()
    } else {
        format!(
            "; volume data: {} volume(s), {}, {} new",
            moved.len(),
            human_bytes(moved.iter().map(|s| s.bytes).sum()),
            human_bytes(moved.iter().map(|s| s.bytes_stored).sum())
        )
    };
    writeln!(
        out,
        "Backup {name}: {} objects, {} captured, {} new in the repository ({} packs){volumes}, {:.1}s",
        stats.objects,
        human_bytes(stats.bytes_plaintext),
        human_bytes(stats.bytes_stored),
        stats.packs_written,
        stats.duration_ms as f64 / 1000.0
    )?;
    let rows: Vec<Vec<String>> = report
        .counts
        .iter()
        .map(|(k, n)| vec![k.clone(), n.to_string()])
        .collect();
    writeln!(out)?;
    table(out, &["KIND", "OBJECTS"], &rows)?;
    if !report.volumes.is_empty() {
        let rows: Vec<Vec<String>> = report
            .volumes
            .iter()
            .map(|v| {
                let (files, size, read, detail) = match (&v.stats, &v.skipped, &v.snapshot) {
                    (_, Some(why), _) => (String::new(), String::new(), String::new(), why.clone()),
                    (Some(s), _, _) => (
                        if v.block {
                            "device".to_string()
                        } else {
                            s.files.to_string()
                        },
                        human_bytes(s.bytes),
                        match s.bytes_changed {
                            // Changed-block tracking: what changed, what was read.
                            Some(changed) => format!(
                                "{} changed, {}",
                                human_bytes(changed),
                                human_bytes(s.bytes_read)
                            ),
                            None => {
                                format!("{} files, {}", s.files_read, human_bytes(s.bytes_read))
                            }
                        },
                        format!(
                            "{} new chunks, {} stored, {:.1}s{}",
                            s.chunks_new,
                            human_bytes(s.bytes_stored),
                            s.duration_ms as f64 / 1000.0,
                            in_group(v)
                        ),
                    ),
                    (None, None, Some(kept)) => (
                        String::new(),
                        kept.restore_size.clone().unwrap_or_default(),
                        String::new(),
                        format!("kept as {}{}", kept.volume_snapshot, in_group(v)),
                    ),
                    _ => Default::default(),
                };
                vec![
                    format!("{}/{}", v.namespace, v.claim),
                    v.method.to_string(),
                    files,
                    size,
                    read,
                    detail,
                ]
            })
            .collect();
        writeln!(out)?;
        table(
            out,
            &["VOLUME", "METHOD", "FILES", "SIZE", "READ", "DETAIL"],
            &rows,
        )?;
    }
    if !report.skipped.is_empty() {
        writeln!(out, "\nSkipped ({}):", report.skipped.len())?;
        for s in &report.skipped {
            writeln!(out, "  {}: {} [{}]", s.object, s.reason, s.rule)?;
        }
    }
    if !report.provided_by_cluster.is_empty() {
        writeln!(
            out,
            "\nProvided by the cluster, not stored ({}):",
            report.provided_by_cluster.len()
        )?;
        for p in &report.provided_by_cluster {
            writeln!(out, "  {p}")?;
        }
    }
    if !report.dependencies.is_empty() {
        writeln!(
            out,
            "\nDependencies outside the selection ({}):",
            report.dependencies.len()
        )?;
        for (object, reasons) in &report.dependencies {
            writeln!(out, "  {object}")?;
            for reason in reasons {
                writeln!(out, "    because {reason}")?;
            }
        }
    }
    if !report.forbidden.is_empty() {
        writeln!(
            out,
            "\nForbidden, not backed up ({}):",
            report.forbidden.len()
        )?;
        for f in &report.forbidden {
            writeln!(out, "  {f}")?;
        }
    }
    if !report.warnings.is_empty() {
        writeln!(out, "\nWarnings ({}):", report.warnings.len())?;
        for w in &report.warnings {
            writeln!(out, "  {w}")?;
        }
    }
    Ok(())
}

fn restore_options(
    subset: Option<&RestoreOptionsArgs>,
    write: &RestoreWriteArgs,
) -> anyhow::Result<crate::restore::RestoreOptions> {
    let mut selection = Selection {
        all_namespaces: true,
        include_deps: true,
        ..Default::default()
    };
    let mut objects = Vec::new();
    if let Some(subset) = subset {
        if !subset.namespaces.is_empty() {
            selection.all_namespaces = false;
            selection.namespaces = subset.namespaces.clone();
        }
        selection.exclude_namespaces = subset.exclude_namespaces.clone();
        selection.include_kinds = subset.include_kinds.clone();
        selection.exclude_kinds = subset.exclude_kinds.clone();
        if let Some(s) = &subset.selector {
            selection.selector = Some(
                crate::model::select::LabelSelector::parse(s)
                    .with_context(|| format!("label selector '{s}'"))?,
            );
        }
        objects = subset.objects.clone();
    }
    // Restoring "everything" includes what --all-namespaces leaves out of
    // backups: the snapshot only holds what was chosen at backup time.
    selection.namespaces.extend(
        crate::model::select::SYSTEM_NAMESPACES
            .iter()
            .map(|s| s.to_string())
            .filter(|_| subset.is_none_or(|s| s.namespaces.is_empty())),
    );
    selection.validate()?;
    if write.recreate_cascading && write.existing != crate::restore::ExistingPolicy::Recreate {
        anyhow::bail!("--recreate-cascading only applies with --existing recreate");
    }
    Ok(crate::restore::RestoreOptions {
        subset: crate::restore::Subset {
            selection,
            objects,
            ..Default::default()
        },
        namespace_mapping: crate::restore::mapping::NamespaceMapping::parse(
            &write.namespace_mapping,
        )?,
        existing: write.existing,
        recreate_cascading: write.recreate_cascading,
        concurrency: write.restore_concurrency.max(1),
        dry_run: write.dry_run,
        transform: match &write.transform {
            Some(path) => Some(transform_source(path)?),
            None => None,
        },
        mover: None,
        skip_volume_data: write.no_volume_data,
        target_profile: None,
    })
}

/// The volume policy and movers of `ferry backup create`.
fn volume_settings(
    repo: &args::RepoArgs,
    key: &crate::repo::KeySource,
    volumes: &args::VolumeArgs,
) -> anyhow::Result<crate::backup::VolumeSettings> {
    let mut per_class = BTreeMap::new();
    for (class, method) in &volumes.volume_method_for_class {
        per_class.insert(
            class.clone(),
            method
                .parse()
                .map_err(|e: String| anyhow::anyhow!("--volume-method-for-class {class}: {e}"))?,
        );
    }
    Ok(crate::backup::VolumeSettings {
        policy: crate::mover::VolumePolicy {
            default: volumes.volume_method,
            per_class,
            hooks: !volumes.no_hooks,
            extra_hooks: Vec::new(),
            auto_groups: !volumes.no_auto_volume_groups,
        },
        mover: Some(repo::mover_settings(repo, key, &volumes.mover)?),
    })
}

/// Prints a restore's plan and report in the chosen format.
fn emit_restore(
    output: OutputFormat,
    plan: &crate::restore::RestorePlan,
    report: &crate::restore::RestoreReport,
    options: &crate::restore::RestoreOptions,
) -> anyhow::Result<()> {
    emit(output, &RestoreOutput { plan, report }, |out| {
        print_restore(out, plan, report, options)
    })
}

/// What `ferry restore -o json|yaml` prints, without a copy of the plan
/// (a plan of 100,000 objects is large).
#[derive(serde::Serialize)]
struct RestoreOutput<'a> {
    plan: &'a crate::restore::RestorePlan,
    report: &'a crate::restore::RestoreReport,
}

/// A transform plan file as a restore keeps it: its text, checked now.
fn transform_source(path: &std::path::Path) -> anyhow::Result<crate::restore::TransformSource> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read transform plan {}", path.display()))?;
    let source = crate::restore::TransformSource {
        text,
        name: path.display().to_string(),
        base_dir: path
            .parent()
            .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())),
    };
    crate::transform::TransformPlan::from_yaml(
        &source.text,
        &source.name,
        source.base_dir.as_deref(),
    )
    .with_context(|| format!("transform plan {}", path.display()))?;
    Ok(source)
}

async fn restore_command(global: &GlobalArgs, args: RestoreArgs) -> anyhow::Result<ExitCode> {
    if let Some(path) = &args.plan {
        return restore_saved_plan(global, &args, path).await;
    }
    let snapshot = args
        .snapshot
        .as_deref()
        .context("give a SNAPSHOT or --plan")?;
    let mut options = restore_options(Some(&args.options), &args.write)?;
    let (repository, key) = repo::open_keyed(&args.repo).await?;
    options.mover = Some(repo::mover_settings(&args.repo, &key, &args.write.mover)?);
    if args.recorded_transform {
        let (_, found) = repository.find_snapshot(snapshot).await?;
        let text = crate::snapshot::load_restore_transform(&repository, &found)
            .await?
            .with_context(|| {
                format!(
                    "snapshot {} recorded no transform plan (a BackupPolicy's spec.transform is recorded in each snapshot it makes)",
                    found.name
                )
            })?;
        options.transform = Some(crate::restore::TransformSource {
            text,
            name: format!("the transform plan recorded in snapshot {}", found.name),
            base_dir: None,
        });
    }
    if let Some(path) = &args.target_profile {
        let profile: crate::profile::ClusterProfile = serde_json::from_slice(
            &std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?,
        )
        .with_context(|| format!("{} is not a cluster profile", path.display()))?;
        let plan = crate::restore::plan_offline(&repository, snapshot, &options, profile)
            .await
            .with_context(|| format!("planning the restore of {snapshot} offline"))?;
        let report = crate::restore::RestoreReport {
            warnings: plan.warnings.clone(),
            repository: repository.io_stats(),
            ..Default::default()
        };
        emit_restore(args.output, &plan, &report, &options)?;
        return Ok(ExitCode::SUCCESS);
    }
    let conn = connect(global).await?;
    run_restore(&conn, &repository, snapshot, &options, args.output).await
}

/// `ferry restore --plan FILE`: the plan as `--dry-run -o json` wrote it
/// (alone or with its report).
async fn restore_saved_plan(
    global: &GlobalArgs,
    args: &RestoreArgs,
    path: &std::path::Path,
) -> anyhow::Result<ExitCode> {
    let text =
        std::fs::read(path).with_context(|| format!("cannot read plan {}", path.display()))?;
    let mut value: serde_json::Value = serde_json::from_slice(&text)
        .with_context(|| format!("plan {} is not JSON", path.display()))?;
    if value.get("waves").is_none()
        && let Some(plan) = value.get_mut("plan")
    {
        value = plan.take();
    }
    let plan: crate::restore::RestorePlan = serde_json::from_value(value)
        .with_context(|| format!("{} is not a restore plan", path.display()))?;
    let (repository, key) = repo::open_keyed(&args.repo).await?;
    let mover = (!args.write.no_volume_data)
        .then(|| repo::mover_settings(&args.repo, &key, &args.write.mover))
        .transpose()?;
    let conn = connect(global).await?;
    let progress = Arc::new(crate::restore::Progress::default());
    let bar = progress::RestoreBar::start(progress.clone());
    let result = crate::restore::run_saved(
        &conn,
        &repository,
        &plan,
        args.write.restore_concurrency.max(1),
        progress.as_ref(),
        mover.as_ref(),
    )
    .await;
    bar.finish();
    let report = result.with_context(|| {
        format!(
            "restore of plan {} (snapshot {}) into {}",
            path.display(),
            plan.header.snapshot,
            conn.server
        )
    })?;
    let options = crate::restore::RestoreOptions::default();
    emit_restore(args.output, &plan, &report, &options)?;
    restore_outcome(&report, &options)
}

async fn run_restore(
    conn: &crate::cluster::Connection,
    repository: &crate::repo::Repository,
    snapshot: &str,
    options: &crate::restore::RestoreOptions,
    output: OutputFormat,
) -> anyhow::Result<ExitCode> {
    let (plan, report) = restore_with_progress(conn, repository, snapshot, options).await?;
    emit_restore(output, &plan, &report, options)?;
    restore_outcome(&report, options)
}

async fn restore_with_progress(
    conn: &crate::cluster::Connection,
    repository: &crate::repo::Repository,
    snapshot: &str,
    options: &crate::restore::RestoreOptions,
) -> anyhow::Result<(crate::restore::RestorePlan, crate::restore::RestoreReport)> {
    let progress = Arc::new(crate::restore::Progress::default());
    let bar = progress::RestoreBar::start(progress.clone());
    let result = crate::restore::run(conn, repository, snapshot, options, progress.as_ref()).await;
    bar.finish();
    result.with_context(|| format!("restore of {snapshot} into {}", conn.server))
}

fn print_restore(
    out: &mut dyn Write,
    plan: &crate::restore::RestorePlan,
    report: &crate::restore::RestoreReport,
    options: &crate::restore::RestoreOptions,
) -> std::io::Result<()> {
    print_plan(out, plan, options.dry_run)?;
    if !options.dry_run && !plan.transforms.is_empty() {
        writeln!(out, "Transformed ({} changes):", plan.transforms.len())?;
        for change in &plan.transforms {
            writeln!(out, "  {change}")?;
        }
    }
    print_restore_report(out, report, options.dry_run)
}

/// Failed objects make the command fail, naming how to continue.
fn restore_outcome(
    report: &crate::restore::RestoreReport,
    options: &crate::restore::RestoreOptions,
) -> anyhow::Result<ExitCode> {
    if !report.failed.is_empty() {
        anyhow::bail!(
            "{} object(s) failed{}; the rest was {}. Fix the cause and run the same command again: it continues where this one stopped",
            report.failed.len(),
            if options.dry_run {
                " the server-side dry run"
            } else {
                ""
            },
            if options.dry_run {
                "validated"
            } else {
                "restored"
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn print_plan(
    out: &mut dyn Write,
    plan: &crate::restore::RestorePlan,
    dry_run: bool,
) -> std::io::Result<()> {
    if !dry_run {
        return Ok(());
    }
    writeln!(
        out,
        "Restore plan: snapshot {} into {}",
        plan.header.snapshot, plan.header.target
    )?;
    for wave in &plan.waves {
        writeln!(
            out,
            "\nWave {} ({} objects):",
            wave.index + 1,
            wave.items.len()
        )?;
        for item in &wave.items {
            let action = format!("{:?}", item.action).to_ascii_lowercase();
            writeln!(out, "  {action:<10} {}  ({})", item.object, item.reason)?;
            for change in &item.changes {
                writeln!(out, "               ~ {change}")?;
            }
        }
    }
    if !plan.transforms.is_empty() {
        writeln!(out, "\nTransforms ({} changes):", plan.transforms.len())?;
        for change in &plan.transforms {
            writeln!(out, "  {change}")?;
        }
    }
    for warning in &plan.warnings {
        writeln!(out, "warning: {warning}")?;
    }
    Ok(())
}

fn print_restore_report(
    out: &mut dyn Write,
    report: &crate::restore::RestoreReport,
    dry_run: bool,
) -> std::io::Result<()> {
    if dry_run {
        writeln!(out, "\nDry run: nothing was written.")?;
    } else {
        writeln!(
            out,
            "Restore: {} created, {} updated, {} unchanged, {} skipped, {} failed",
            report.created.len(),
            report.updated.len(),
            report.unchanged.len(),
            report.skipped.len(),
            report.failed.len()
        )?;
    }
    for failure in &report.failed {
        writeln!(out, "FAILED {}: {}", failure.object, failure.message)?;
    }
    for warning in &report.warnings {
        writeln!(out, "warning: {warning}")?;
    }
    Ok(())
}

async fn migrate_command(global: &GlobalArgs, args: MigrateArgs) -> anyhow::Result<ExitCode> {
    let selection = selection(&args.selection)?;
    let mut restore = restore_options(None, &args.write)?;
    let source = ConnectOptions {
        kubeconfig: global.kubeconfig.clone(),
        context: Some(args.from.clone()),
        timeout: Some(global.request_timeout),
        impersonate: None,
    }
    .connect()
    .await
    .with_context(|| format!("source context {}", args.from))?;
    let target = ConnectOptions {
        kubeconfig: args
            .to_kubeconfig
            .clone()
            .or_else(|| global.kubeconfig.clone()),
        context: Some(args.to.clone()),
        timeout: Some(global.request_timeout),
        impersonate: None,
    }
    .connect()
    .await
    .with_context(|| format!("target context {}", args.to))?;

    // Without --repo the snapshot lives in a temporary repository for the
    // duration of the migration.
    let temporary = tempfile::tempdir().context("creating a temporary repository")?;
    let repository = match &args.repo.repo {
        Some(_) => {
            let (repository, key) = repo::open_keyed(&args.repo).await?;
            let mover = repo::mover_settings(&args.repo, &key, &args.write.mover)?;
            restore.mover = Some(mover);
            repository
        }
        None => {
            if args.snapshot.is_some() {
                anyhow::bail!("--snapshot keeps the snapshot, so it needs a --repo to keep it in");
            }
            let backend: Arc<dyn crate::repo::Backend> = Arc::new(crate::repo::LocalBackend::new(
                temporary.path().join("repo"),
            ));
            let key = crate::repo::KeySource::Password(zeroize::Zeroizing::new(hex::encode(
                rand::random::<[u8; 32]>(),
            )));
            crate::repo::Repository::init(backend, &key).await?
        }
    };
    let name = args.snapshot.clone().unwrap_or_else(|| {
        format!(
            "migrate-{}",
            humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        )
    });
    let mut options = BackupOptions::new(&name, selection);
    options.volumes = Some(crate::backup::VolumeSettings {
        policy: crate::mover::VolumePolicy {
            hooks: true,
            auto_groups: true,
            ..Default::default()
        },
        mover: restore.mover.clone(),
    });
    options.label_selector = args.selection.selector.clone();
    options.labels.insert(
        "ferry.dev/migration".into(),
        format!("{} -> {}", args.from, args.to),
    );
    let progress = Arc::new(Progress::default());
    let bar = progress::BackupBar::start(progress.clone());
    let result = backup::run(&source, &repository, &options, progress).await;
    bar.finish();
    let outcome = result.with_context(|| {
        format!(
            "backup of the source ({}) failed; nothing was restored",
            args.from
        )
    })?;
    // The backup's report is shown as `backup create` shows it: dangling
    // references, skipped and forbidden objects and warnings.
    let backup_value = serde_json::json!({
        "snapshot": outcome.snapshot.to_string(),
        "name": name,
        "report": outcome.content.report,
    });
    if args.output == OutputFormat::Text {
        print_report(&mut std::io::stdout().lock(), &name, &outcome.content)?;
        println!();
    }
    if outcome.content.report.is_partial() {
        eprintln!(
            "warning: the source backup is partial; not restored: {}",
            outcome.content.report.forbidden.join(", ")
        );
    }
    let restored = restore_with_progress(&target, &repository, &name, &restore).await;
    let (plan, report) = match restored {
        Ok(r) => r,
        Err(e) => {
            if args.output != OutputFormat::Text {
                emit(
                    args.output,
                    &serde_json::json!({"backup": backup_value}),
                    |_| Ok(()),
                )?;
            }
            return Err(e);
        }
    };
    emit(
        args.output,
        &serde_json::json!({"backup": backup_value, "plan": plan, "report": report}),
        |out| print_restore(out, &plan, &report, &restore),
    )?;
    let code = restore_outcome(&report, &restore)?;
    if outcome.content.report.is_partial() {
        return Ok(ExitCode::from(EXIT_PARTIAL));
    }
    Ok(code)
}
