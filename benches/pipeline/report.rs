//! The benchmark's results: tables of ratios against the baselines, of
//! memory and of repository reads, each with its target and whether it was
//! met; the results as JSON; and a plot of time against N.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::measure::Cost;

/// Restore ≤ this × raw create (both repositories).
pub const RESTORE_VS_CREATE: f64 = 1.15;
/// Restore from S3 ≤ this × restore from the local repository.
pub const S3_VS_LOCAL: f64 = 1.2;
/// Backup ≤ this × raw LIST.
pub const BACKUP_VS_LIST: f64 = 1.2;
/// Unchanged re-backup ≤ this × the first backup.
pub const UNCHANGED_VS_FIRST: f64 = 0.2;
/// Transform engine ≥ this many objects/s.
pub const TRANSFORM_OBJECTS_PER_S: f64 = 100_000.0;
/// GET requests per MiB of pack data a restore from S3 may send.
pub const GETS_PER_MIB: f64 = 1.0;
/// Peak RSS of every Ferry command at N ≥ [`RSS_AT_N`].
pub const PEAK_RSS_MIB: f64 = 256.0;
pub const RSS_AT_N: usize = 100_000;
/// Growth of peak RSS per object between the smallest and the largest N
/// measured that are at least [`GROWTH_FROM_N`].
pub const GROWTH_KIB_PER_OBJECT: f64 = 2.0;
pub const GROWTH_FROM_N: usize = 10_000;

const MIB: f64 = 1024.0 * 1024.0;

/// A step Ferry performed, with what it processed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Step {
    pub cost: Cost,
    pub objects: usize,
    /// Bytes the step added to the repository (backups only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo_bytes: Option<u64>,
    /// CPU the S3 store (MinIO) spent during the step (S3 steps only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_cpu_s: Option<f64>,
    /// What a restore read from its repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reads: Option<RepoReads>,
}

impl Step {
    pub fn objects_per_s(&self) -> f64 {
        self.objects as f64 / self.cost.wall_s.max(1e-9)
    }
}

/// What a restore read from its repository.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RepoReads {
    /// Pack data in the repository: the bytes of the files under `data/`.
    pub pack_bytes: u64,
    /// `.report.repository` of `ferry restore -o json` (`getRequests`,
    /// `getBytes`, …); absent when this Ferry does not report it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported: Option<Value>,
    /// S3 requests the store (MinIO) counted during the restore, by API
    /// (`getobject`, `headobject`, `listobjectsv2`, …); S3 only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_requests: Option<BTreeMap<String, u64>>,
    /// Bytes the store sent during the restore; S3 only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_sent_bytes: Option<u64>,
}

impl RepoReads {
    /// GET requests, as Ferry reports them.
    pub fn get_requests(&self) -> Option<u64> {
        self.reported.as_ref()?.get("getRequests")?.as_u64()
    }

    pub fn get_bytes(&self) -> Option<u64> {
        self.reported.as_ref()?.get("getBytes")?.as_u64()
    }

    pub fn gets_per_mib(&self) -> Option<f64> {
        Some(self.get_requests()? as f64 / (self.pack_bytes as f64 / MIB).max(1e-9))
    }

    /// GETs the store counted (`getobject`).
    pub fn store_gets(&self) -> Option<u64> {
        self.store_requests.as_ref()?.get("getobject").copied()
    }

    /// GETs the store counted per MiB of pack data: a check on Ferry's
    /// own count, and the only count while Ferry reports none.
    pub fn store_gets_per_mib(&self) -> Option<f64> {
        Some(self.store_gets()? as f64 / (self.pack_bytes as f64 / MIB).max(1e-9))
    }
}

/// Everything measured at one size.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SizeResult {
    /// Objects the estate was asked to hold.
    pub n: usize,
    /// Objects created in the source cluster (whole namespaces).
    pub created: usize,
    pub namespaces: usize,
    /// Items the source cluster's collections hold (what a backup lists:
    /// the estate plus what controllers made: ReplicaSets, Pods, claims,
    /// service accounts).
    pub listed_items: usize,
    pub populate: Cost,
    /// The first backup into the local repository.
    pub backup: Step,
    /// The first backup into the S3 repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_s3: Option<Step>,
    pub backup_unchanged: Step,
    pub list_baseline: Cost,
    pub transform_command: Step,
    pub transform_engine: Step,
    pub json_baseline: Cost,
    /// Restore from the local repository into an empty cluster.
    pub restore: Step,
    /// Restore from the S3 repository into another empty cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_s3: Option<Step>,
    pub create_baseline: Step,
    /// The most memory the test environment's servers (etcd, API servers,
    /// controller-managers, MinIO) held at once, sampled between steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub servers_rss_gib: Option<f64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub memory_gib: f64,
    pub kernel: String,
    pub kubernetes: String,
    pub date: String,
    pub ferry_commit: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Results {
    pub machine: Machine,
    pub command: String,
    pub concurrency: Concurrency,
    pub sizes: Vec<SizeResult>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Concurrency {
    pub backup_lists: usize,
    pub page_size: u32,
    pub restore_writes: usize,
    /// Writes at once while filling the source cluster.
    #[serde(default)]
    pub populate_writes: usize,
}

/// A target and how a result is checked against it.
#[derive(Debug, Clone, Copy)]
enum Target {
    /// Time ≤ this × the baseline's.
    RatioAtMost(f64),
    /// At least this many objects per second.
    RateAtLeast(f64),
    None,
}

impl Target {
    fn text(self) -> String {
        match self {
            Target::RatioAtMost(x) => format!("≤ {x}"),
            Target::RateAtLeast(x) => format!("≥ {}k obj/s", x / 1000.0),
            Target::None => String::new(),
        }
    }

    fn met(self, ratio: f64, rate: f64) -> Option<bool> {
        match self {
            Target::RatioAtMost(x) => Some(ratio <= x),
            Target::RateAtLeast(x) => Some(rate >= x),
            Target::None => None,
        }
    }
}

fn verdict(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "met",
        Some(false) => "**missed**",
        None => "–",
    }
}

struct Row {
    step: &'static str,
    ferry: Step,
    baseline_name: &'static str,
    baseline_s: f64,
    target: Target,
}

impl Row {
    fn ratio(&self) -> f64 {
        self.ferry.cost.wall_s / self.baseline_s.max(1e-9)
    }

    fn met(&self) -> Option<bool> {
        self.target.met(self.ratio(), self.ferry.objects_per_s())
    }
}

fn rows(r: &SizeResult) -> Vec<Row> {
    let mut rows = vec![Row {
        step: "backup (first, local)",
        ferry: r.backup.clone(),
        baseline_name: "raw LIST",
        baseline_s: r.list_baseline.wall_s,
        target: Target::RatioAtMost(BACKUP_VS_LIST),
    }];
    if let Some(s3) = &r.backup_s3 {
        rows.push(Row {
            step: "backup (first, S3)",
            ferry: s3.clone(),
            baseline_name: "raw LIST",
            baseline_s: r.list_baseline.wall_s,
            target: Target::RatioAtMost(BACKUP_VS_LIST),
        });
    }
    rows.extend([
        Row {
            step: "backup (unchanged)",
            ferry: r.backup_unchanged.clone(),
            baseline_name: "first backup",
            baseline_s: r.backup.cost.wall_s,
            target: Target::RatioAtMost(UNCHANGED_VS_FIRST),
        },
        Row {
            step: "transform (engine)",
            ferry: r.transform_engine.clone(),
            baseline_name: "JSON parse+serialize",
            baseline_s: r.json_baseline.wall_s,
            target: Target::RateAtLeast(TRANSFORM_OBJECTS_PER_S),
        },
        Row {
            step: "transform (command)",
            ferry: r.transform_command.clone(),
            baseline_name: "JSON parse+serialize",
            baseline_s: r.json_baseline.wall_s,
            target: Target::None,
        },
        Row {
            step: "restore (local)",
            ferry: r.restore.clone(),
            baseline_name: "raw create",
            baseline_s: r.create_baseline.cost.wall_s,
            target: Target::RatioAtMost(RESTORE_VS_CREATE),
        },
    ]);
    if let Some(s3) = &r.restore_s3 {
        rows.push(Row {
            step: "restore (S3)",
            ferry: s3.clone(),
            baseline_name: "raw create",
            baseline_s: r.create_baseline.cost.wall_s,
            target: Target::RatioAtMost(RESTORE_VS_CREATE),
        });
        rows.push(Row {
            step: "restore (S3)",
            ferry: s3.clone(),
            baseline_name: "restore (local)",
            baseline_s: r.restore.cost.wall_s,
            target: Target::RatioAtMost(S3_VS_LOCAL),
        });
    }
    rows
}

/// 100000 as "100,000".
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / MIB)
}

fn or_dash<T>(value: Option<T>, show: impl Fn(T) -> String) -> String {
    value.map_or("–".to_string(), show)
}

/// Every table: steps against their baselines, memory, repository reads,
/// the targets at a glance, and the baselines (also what the benchmark
/// prints).
pub fn tables(results: &Results) -> String {
    format!(
        "{}\nMemory (peak RSS of each `ferry` command):\n\n{}\n{}\nRepository reads of the restores:\n\n{}\nTargets:\n\n{}\nBaselines:\n\n{}",
        table(results),
        memory_table(results),
        growth_table(results),
        reads_table(results),
        targets_table(results),
        baseline_table(results)
    )
}

/// Each step against its baseline.
pub fn table(results: &Results) -> String {
    let mut out = String::new();
    out.push_str("| N | step | wall s | baseline | baseline s | ratio | target | | objects/s | CPU s | peak RSS MiB | server CPU s | S3 store CPU s | repo MiB |\n");
    out.push_str("|---:|---|---:|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|\n");
    for r in &results.sizes {
        for row in rows(r) {
            let c = row.ferry.cost;
            let _ = writeln!(
                out,
                "| {} | {} | {:.2} | {} | {:.2} | {:.2} | {} | {} | {:.0} | {:.2} | {} | {:.2} | {} | {} |",
                r.created,
                row.step,
                c.wall_s,
                row.baseline_name,
                row.baseline_s,
                row.ratio(),
                row.target.text(),
                verdict(row.met()),
                row.ferry.objects_per_s(),
                c.cpu_s,
                if c.peak_rss_mib > 0.0 {
                    format!("{:.0}", c.peak_rss_mib)
                } else {
                    "–".to_string()
                },
                c.server_cpu_s,
                or_dash(row.ferry.store_cpu_s, |s| format!("{s:.2}")),
                or_dash(row.ferry.repo_bytes, mib),
            );
        }
    }
    out
}

/// The Ferry commands whose peak RSS is measured.
fn memory_steps(r: &SizeResult) -> Vec<(&'static str, Option<f64>)> {
    let rss = |s: &Step| Some(s.cost.peak_rss_mib);
    vec![
        ("backup (local)", rss(&r.backup)),
        ("backup (S3)", r.backup_s3.as_ref().and_then(rss)),
        ("transform (command)", rss(&r.transform_command)),
        ("restore (local)", rss(&r.restore)),
        ("restore (S3)", r.restore_s3.as_ref().and_then(rss)),
    ]
}

/// Peak RSS per size, against the target at N ≥ 100,000.
pub fn memory_table(results: &Results) -> String {
    let mut out = String::new();
    let names: Vec<&str> = results
        .sizes
        .first()
        .map(|r| memory_steps(r).into_iter().map(|(n, _)| n).collect())
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "| N | {} | largest | target | |",
        names
            .iter()
            .map(|n| format!("{n} MiB"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let _ = writeln!(out, "|---:|{}---:|---|---|", "---:|".repeat(names.len()));
    for r in &results.sizes {
        let values = memory_steps(r);
        let largest = values.iter().filter_map(|(_, v)| *v).fold(0.0f64, f64::max);
        let applies = r.n >= RSS_AT_N;
        let _ = writeln!(
            out,
            "| {} | {} | {largest:.0} | {} | {} |",
            r.created,
            values
                .iter()
                .map(|(_, v)| or_dash(*v, |m| format!("{m:.0}")))
                .collect::<Vec<_>>()
                .join(" | "),
            if applies {
                format!("≤ {PEAK_RSS_MIB:.0} MiB")
            } else {
                format!("(≤ {PEAK_RSS_MIB:.0} MiB at N ≥ {})", thousands(RSS_AT_N))
            },
            verdict(applies.then_some(largest <= PEAK_RSS_MIB)),
        );
    }
    out
}

/// Growth of peak RSS per object between two sizes.
struct Growth<'a> {
    small: &'a SizeResult,
    big: &'a SizeResult,
    /// KiB per object of each command (None where a size lacks the step).
    per_object: Vec<(&'static str, Option<f64>)>,
}

/// Growth of peak RSS per object of each command between the smallest and
/// the largest N ≥ 10,000 measured, if two such sizes were.
fn growth(results: &Results) -> Option<Growth<'_>> {
    let large: Vec<&SizeResult> = results
        .sizes
        .iter()
        .filter(|r| r.n >= GROWTH_FROM_N)
        .collect();
    let small = *large.iter().min_by_key(|r| r.created)?;
    let big = *large.iter().max_by_key(|r| r.created)?;
    if big.created <= small.created {
        return None;
    }
    let objects = (big.created - small.created) as f64;
    let per_object = memory_steps(small)
        .into_iter()
        .zip(memory_steps(big))
        .map(|((name, a), (_, b))| (name, a.zip(b).map(|(a, b)| (b - a) * 1024.0 / objects)))
        .collect();
    Some(Growth {
        small,
        big,
        per_object,
    })
}

/// Peak RSS growth per object between sizes, against its target.
pub fn growth_table(results: &Results) -> String {
    let Some(Growth {
        small,
        big,
        per_object,
    }) = growth(results)
    else {
        return format!(
            "Peak RSS growth per object: not measured (needs two sizes N ≥ {}).\n",
            thousands(GROWTH_FROM_N)
        );
    };
    let mut out = format!(
        "| step | growth KiB/object (N = {} → {}) | target | |\n|---|---:|---|---|\n",
        small.created, big.created
    );
    for (name, g) in per_object {
        let _ = writeln!(
            out,
            "| {name} | {} | ≤ {GROWTH_KIB_PER_OBJECT} KiB/object | {} |",
            or_dash(g, |g| format!("{g:.2}")),
            verdict(g.map(|g| g <= GROWTH_KIB_PER_OBJECT)),
        );
    }
    out
}

/// What each restore read: GETs against the pack data the repository holds.
pub fn reads_table(results: &Results) -> String {
    let mut out = String::new();
    out.push_str("| N | restore from | pack data MiB | GETs (Ferry) | GET MiB (Ferry) | GETs per MiB (Ferry) | target | | GETs (MinIO) | GETs per MiB (MinIO) | S3 requests (MinIO) | MiB sent (MinIO) |\n");
    out.push_str("|---:|---|---:|---:|---:|---:|---|---|---:|---:|---:|---:|\n");
    for r in &results.sizes {
        let restores = [
            ("local", r.restore.reads.as_ref(), false),
            (
                "S3",
                r.restore_s3.as_ref().and_then(|s| s.reads.as_ref()),
                true,
            ),
        ];
        for (from, reads, s3) in restores {
            let Some(reads) = reads else { continue };
            let per_mib = reads.gets_per_mib();
            let _ = writeln!(
                out,
                "| {} | {from} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.created,
                mib(reads.pack_bytes),
                or_dash(reads.get_requests(), |g| g.to_string()),
                or_dash(reads.get_bytes(), mib),
                match per_mib {
                    Some(p) => format!("{p:.2}"),
                    None => "not reported".to_string(),
                },
                if s3 {
                    format!("≤ {GETS_PER_MIB}")
                } else {
                    String::new()
                },
                if s3 {
                    verdict(per_mib.map(|p| p <= GETS_PER_MIB))
                } else {
                    "–"
                },
                or_dash(reads.store_gets(), |g| g.to_string()),
                or_dash(reads.store_gets_per_mib(), |p| format!("{p:.2}")),
                or_dash(reads.store_requests.as_ref(), |m| m
                    .values()
                    .sum::<u64>()
                    .to_string()),
                or_dash(reads.store_sent_bytes, mib),
            );
        }
    }
    out
}

/// Every target per size: the result and whether it was met.
pub fn targets_table(results: &Results) -> String {
    let mut out = String::from("| target |");
    for r in &results.sizes {
        let _ = write!(out, " N = {} |", r.created);
    }
    out.push_str("\n|---|");
    out.push_str(&"---|".repeat(results.sizes.len()));
    out.push('\n');
    type Cell = Box<dyn Fn(&SizeResult) -> Option<(String, bool)>>;
    let ratio = |step: &'static str, baseline: &'static str| -> Cell {
        Box::new(move |r: &SizeResult| {
            rows(r)
                .into_iter()
                .find(|row| row.step == step && row.baseline_name == baseline)
                .and_then(|row| Some((format!("{:.2} ×", row.ratio()), row.met()?)))
        })
    };
    let lines: Vec<(String, Cell)> = vec![
        (
            format!("backup (local) ≤ {BACKUP_VS_LIST} × raw LIST"),
            ratio("backup (first, local)", "raw LIST"),
        ),
        (
            format!("backup (S3) ≤ {BACKUP_VS_LIST} × raw LIST"),
            ratio("backup (first, S3)", "raw LIST"),
        ),
        (
            format!("unchanged re-backup ≤ {UNCHANGED_VS_FIRST} × first backup"),
            ratio("backup (unchanged)", "first backup"),
        ),
        (
            format!(
                "transform engine ≥ {} objects/s",
                thousands(TRANSFORM_OBJECTS_PER_S as usize)
            ),
            Box::new(|r: &SizeResult| {
                let rate = r.transform_engine.objects_per_s();
                Some((format!("{rate:.0}/s"), rate >= TRANSFORM_OBJECTS_PER_S))
            }),
        ),
        (
            format!("restore (local) ≤ {RESTORE_VS_CREATE} × raw create"),
            ratio("restore (local)", "raw create"),
        ),
        (
            format!("restore (S3) ≤ {RESTORE_VS_CREATE} × raw create"),
            ratio("restore (S3)", "raw create"),
        ),
        (
            format!("restore (S3) ≤ {S3_VS_LOCAL} × restore (local)"),
            ratio("restore (S3)", "restore (local)"),
        ),
        (
            format!("restore (S3) ≤ {GETS_PER_MIB} GET per MiB of pack data"),
            Box::new(|r: &SizeResult| {
                let p = r.restore_s3.as_ref()?.reads.as_ref()?.gets_per_mib()?;
                Some((format!("{p:.2}"), p <= GETS_PER_MIB))
            }),
        ),
        (
            format!(
                "peak RSS ≤ {PEAK_RSS_MIB:.0} MiB at N ≥ {} (largest command)",
                thousands(RSS_AT_N)
            ),
            Box::new(|r: &SizeResult| {
                if r.n < RSS_AT_N {
                    return None;
                }
                let largest = memory_steps(r)
                    .iter()
                    .filter_map(|(_, v)| *v)
                    .fold(0.0f64, f64::max);
                Some((format!("{largest:.0} MiB"), largest <= PEAK_RSS_MIB))
            }),
        ),
    ];
    for (name, cell) in lines {
        let _ = write!(out, "| {name} |");
        for r in &results.sizes {
            let _ = match cell(r) {
                Some((value, met)) => write!(out, " {value} {} |", verdict(Some(met))),
                None => write!(out, " – |"),
            };
        }
        out.push('\n');
    }
    // Growth is measured across sizes: shown under the largest.
    let growth = growth(results);
    let _ = write!(
        out,
        "| peak RSS growth ≤ {GROWTH_KIB_PER_OBJECT} KiB/object (largest command, N ≥ {}) |",
        thousands(GROWTH_FROM_N)
    );
    for r in &results.sizes {
        let cell = growth.as_ref().and_then(
            |Growth {
                 small,
                 big,
                 per_object,
             }| {
                if r.created != big.created {
                    return None;
                }
                let worst = per_object
                    .iter()
                    .filter_map(|(_, g)| *g)
                    .fold(f64::MIN, f64::max);
                (worst > f64::MIN).then(|| {
                    format!(
                        " {worst:.2} KiB/object from N = {} {} |",
                        small.created,
                        verdict(Some(worst <= GROWTH_KIB_PER_OBJECT))
                    )
                })
            },
        );
        out.push_str(cell.as_deref().unwrap_or(" – |"));
    }
    out.push('\n');
    out
}

/// Baseline costs in the same layout, for the record.
pub fn baseline_table(results: &Results) -> String {
    let mut out = String::new();
    out.push_str("| N | baseline | wall s | CPU s | server CPU s | items |\n|---:|---|---:|---:|---:|---:|\n");
    let populate = format!(
        "populate the source (raw create, {} at once)",
        match results.concurrency.populate_writes {
            0 => 32,
            n => n,
        }
    );
    for r in &results.sizes {
        let lines = [
            ("raw LIST (median of 3)", r.list_baseline, r.listed_items),
            (
                "raw create",
                r.create_baseline.cost,
                r.create_baseline.objects,
            ),
            (
                "JSON parse+serialize (median of 3)",
                r.json_baseline,
                r.transform_engine.objects,
            ),
            (populate.as_str(), r.populate, r.created),
        ];
        for (name, c, items) in lines {
            let _ = writeln!(
                out,
                "| {} | {name} | {:.2} | {:.2} | {:.2} | {items} |",
                r.created, c.wall_s, c.cpu_s, c.server_cpu_s
            );
        }
    }
    out
}

/// Reads the results a run wrote to `dir`.
pub fn read(dir: &Path) -> Result<Results> {
    let path = dir.join("results.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not a benchmark result", path.display()))
}

pub fn write(results: &Results, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = dir.join("results.json");
    std::fs::write(&json, serde_json::to_string_pretty(results)? + "\n")
        .with_context(|| format!("writing {}", json.display()))?;
    let table_path = dir.join("results.md");
    std::fs::write(&table_path, tables(results))
        .with_context(|| format!("writing {}", table_path.display()))?;
    plot(results, &dir.join("time-vs-n.svg"))
}

/// Labels of a log axis at 1, 2 and 5 times a power of ten only, so that
/// they do not run into each other.
fn log_label(v: f64) -> String {
    let decade = 10f64.powf(v.log10().floor());
    let lead = (v / decade).round();
    if ![1.0, 2.0, 5.0].contains(&lead) || (v / decade - lead).abs() > 1e-6 {
        return String::new();
    }
    match v {
        v if v >= 1000.0 => format!("{}k", v / 1000.0),
        v if v >= 1.0 => format!("{v:.0}"),
        v => format!("{v}"),
    }
}

type Series = (&'static str, RGBColor, Vec<(f64, f64)>);

/// Four panels (backup, transform, restore, peak RSS), each with Ferry's
/// steps (local and S3 repository where measured) and their baseline
/// against N, on log-log axes.
fn plot(results: &Results, path: &Path) -> Result<()> {
    let xs = |f: &dyn Fn(&SizeResult) -> f64| -> Vec<(f64, f64)> {
        results
            .sizes
            .iter()
            .map(|r| (r.created as f64, f(r)))
            .collect()
    };
    // The sizes that have a step (runs before S3 was measured have none).
    let some = |f: &dyn Fn(&SizeResult) -> Option<f64>| -> Vec<(f64, f64)> {
        results
            .sizes
            .iter()
            .filter_map(|r| Some((r.created as f64, f(r)?)))
            .collect()
    };
    let ferry = RGBColor(0x1f, 0x77, 0xb4);
    let second = RGBColor(0x2c, 0xa0, 0x2c);
    let third = RGBColor(0xff, 0x7f, 0x0e);
    let fourth = RGBColor(0x94, 0x67, 0xbd);
    let baseline = RGBColor(0xd6, 0x27, 0x28);
    let panels: Vec<(&str, Vec<Series>)> = vec![
        (
            "backup",
            vec![
                (
                    "ferry backup (first, local)",
                    ferry,
                    xs(&|r| r.backup.cost.wall_s),
                ),
                (
                    "ferry backup (first, S3)",
                    third,
                    some(&|r| Some(r.backup_s3.as_ref()?.cost.wall_s)),
                ),
                (
                    "ferry backup (unchanged)",
                    second,
                    xs(&|r| r.backup_unchanged.cost.wall_s),
                ),
                (
                    "raw paginated LIST",
                    baseline,
                    xs(&|r| r.list_baseline.wall_s),
                ),
            ],
        ),
        (
            "transform (all built-in rule sets)",
            vec![
                (
                    "ferry transform (command)",
                    ferry,
                    xs(&|r| r.transform_command.cost.wall_s),
                ),
                (
                    "transform engine",
                    second,
                    xs(&|r| r.transform_engine.cost.wall_s),
                ),
                (
                    "JSON parse + serialize",
                    baseline,
                    xs(&|r| r.json_baseline.wall_s),
                ),
            ],
        ),
        (
            "restore into an empty cluster",
            vec![
                (
                    "ferry restore (local)",
                    ferry,
                    xs(&|r| r.restore.cost.wall_s),
                ),
                (
                    "ferry restore (S3)",
                    third,
                    some(&|r| Some(r.restore_s3.as_ref()?.cost.wall_s)),
                ),
                (
                    "raw parallel create",
                    baseline,
                    xs(&|r| r.create_baseline.cost.wall_s),
                ),
            ],
        ),
        (
            "peak RSS (MiB)",
            vec![
                ("backup (local)", ferry, xs(&|r| r.backup.cost.peak_rss_mib)),
                (
                    "backup (S3)",
                    fourth,
                    some(&|r| Some(r.backup_s3.as_ref()?.cost.peak_rss_mib)),
                ),
                (
                    "transform (command)",
                    second,
                    xs(&|r| r.transform_command.cost.peak_rss_mib),
                ),
                (
                    "restore (local)",
                    baseline,
                    xs(&|r| r.restore.cost.peak_rss_mib),
                ),
                (
                    "restore (S3)",
                    third,
                    some(&|r| Some(r.restore_s3.as_ref()?.cost.peak_rss_mib)),
                ),
                (
                    "target at 100,000: 256 MiB",
                    RGBColor(0x88, 0x88, 0x88),
                    xs(&|_| PEAK_RSS_MIB),
                ),
            ],
        ),
    ];
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        let root = SVGBackend::new(path, (1200, 860)).into_drawing_area();
        root.fill(&WHITE)?;
        let (title, body) = root.split_vertically(40);
        title.titled(
            "Ferry: time against N (objects), log-log; same machine, same run",
            ("sans-serif", 22),
        )?;
        for (area, (name, series)) in body.split_evenly((2, 2)).iter().zip(panels) {
            let points = series.iter().flat_map(|s| s.2.iter());
            let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
            for &(x, y) in points {
                x0 = x0.min(x);
                x1 = x1.max(x);
                y0 = y0.min(y.max(1e-3));
                y1 = y1.max(y);
            }
            // At least a decade on each axis, so that log axes get labels.
            let widen = |lo: f64, hi: f64| {
                let middle = (lo * hi).sqrt();
                let half = (hi / lo).sqrt().max(10f64.sqrt()) * 1.3;
                (middle / half, middle * half)
            };
            let (x0, x1) = widen(x0, x1);
            let (y0, y1) = widen(y0, y1);
            let y_desc = if name.starts_with("peak") {
                "MiB"
            } else {
                "seconds"
            };
            let mut chart = ChartBuilder::on(area)
                .caption(name, ("sans-serif", 18))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(60)
                .build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale())?;
            chart
                .configure_mesh()
                .x_desc("objects (N)")
                .y_desc(y_desc)
                .light_line_style(WHITE)
                .x_label_formatter(&|x| log_label(*x))
                .y_label_formatter(&|y| log_label(*y))
                .draw()?;
            for (label, color, data) in series {
                if data.is_empty() {
                    continue;
                }
                chart
                    .draw_series(LineSeries::new(data.clone(), color.stroke_width(2)))?
                    .label(label)
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                    });
                chart.draw_series(data.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()?;
        }
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow::anyhow!("drawing {}: {e}", path.display()))
}
