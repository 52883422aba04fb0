//! The benchmark's results: a table of ratios against the baselines, the
//! results as JSON, and a plot of time against N.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::measure::Cost;

/// A step Ferry performed, with what it processed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Step {
    pub cost: Cost,
    pub objects: usize,
    /// Bytes the step added to the repository (backups only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repo_bytes: Option<u64>,
}

impl Step {
    pub fn objects_per_s(&self) -> f64 {
        self.objects as f64 / self.cost.wall_s.max(1e-9)
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
    pub backup: Step,
    pub backup_unchanged: Step,
    pub list_baseline: Cost,
    pub transform_command: Step,
    pub transform_engine: Step,
    pub json_baseline: Cost,
    pub restore: Step,
    pub create_baseline: Step,
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
}

struct Row {
    step: &'static str,
    ferry: Step,
    baseline_name: &'static str,
    baseline_s: f64,
    target: &'static str,
}

fn rows(r: &SizeResult) -> Vec<Row> {
    vec![
        Row {
            step: "backup (first)",
            ferry: r.backup.clone(),
            baseline_name: "raw LIST",
            baseline_s: r.list_baseline.wall_s,
            target: "≤ 1.2",
        },
        Row {
            step: "backup (unchanged)",
            ferry: r.backup_unchanged.clone(),
            baseline_name: "first backup",
            baseline_s: r.backup.cost.wall_s,
            target: "≤ 0.2",
        },
        Row {
            step: "transform (engine)",
            ferry: r.transform_engine.clone(),
            baseline_name: "JSON parse+serialize",
            baseline_s: r.json_baseline.wall_s,
            target: "≥ 100k obj/s",
        },
        Row {
            step: "transform (command)",
            ferry: r.transform_command.clone(),
            baseline_name: "JSON parse+serialize",
            baseline_s: r.json_baseline.wall_s,
            target: "",
        },
        Row {
            step: "restore",
            ferry: r.restore.clone(),
            baseline_name: "raw create",
            baseline_s: r.create_baseline.cost.wall_s,
            target: "≤ 1.3",
        },
    ]
}

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1024.0 * 1024.0))
}

/// The results as a Markdown table (also what the benchmark prints).
pub fn table(results: &Results) -> String {
    let mut out = String::new();
    out.push_str("| N | step | wall s | baseline | baseline s | ratio | target | objects/s | CPU s | peak RSS MiB | server CPU s | repo MiB |\n");
    out.push_str("|---:|---|---:|---|---:|---:|---|---:|---:|---:|---:|---:|\n");
    for r in &results.sizes {
        for row in rows(r) {
            let c = row.ferry.cost;
            let _ = writeln!(
                out,
                "| {} | {} | {:.2} | {} | {:.2} | {:.2} | {} | {:.0} | {:.2} | {} | {:.2} | {} |",
                r.created,
                row.step,
                c.wall_s,
                row.baseline_name,
                row.baseline_s,
                c.wall_s / row.baseline_s.max(1e-9),
                row.target,
                row.ferry.objects_per_s(),
                c.cpu_s,
                if c.peak_rss_mib > 0.0 {
                    format!("{:.0}", c.peak_rss_mib)
                } else {
                    "–".to_string()
                },
                c.server_cpu_s,
                row.ferry.repo_bytes.map_or("–".to_string(), mib),
            );
        }
    }
    out
}

/// Baseline costs in the same layout, for the record.
pub fn baseline_table(results: &Results) -> String {
    let mut out = String::new();
    out.push_str("| N | baseline | wall s | CPU s | server CPU s | items |\n|---:|---|---:|---:|---:|---:|\n");
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
            (
                "populate the source (raw create, 32 at once)",
                r.populate,
                r.created,
            ),
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
    std::fs::write(
        &table_path,
        format!("{}\n{}", table(results), baseline_table(results)),
    )
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

/// Four panels (backup, unchanged backup, transform, restore), each with
/// Ferry's time and its baseline's against N, on log-log axes.
fn plot(results: &Results, path: &Path) -> Result<()> {
    let xs = |f: &dyn Fn(&SizeResult) -> f64| -> Vec<(f64, f64)> {
        results
            .sizes
            .iter()
            .map(|r| (r.created as f64, f(r)))
            .collect()
    };
    let ferry = RGBColor(0x1f, 0x77, 0xb4);
    let second = RGBColor(0x2c, 0xa0, 0x2c);
    let baseline = RGBColor(0xd6, 0x27, 0x28);
    let panels: Vec<(&str, Vec<Series>)> = vec![
        (
            "backup",
            vec![
                ("ferry backup (first)", ferry, xs(&|r| r.backup.cost.wall_s)),
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
                ("ferry restore", ferry, xs(&|r| r.restore.cost.wall_s)),
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
                ("backup", ferry, xs(&|r| r.backup.cost.peak_rss_mib)),
                (
                    "transform",
                    second,
                    xs(&|r| r.transform_command.cost.peak_rss_mib),
                ),
                ("restore", baseline, xs(&|r| r.restore.cost.peak_rss_mib)),
                (
                    "target at 50,000: 512 MiB",
                    RGBColor(0x88, 0x88, 0x88),
                    xs(&|_| 512.0),
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
