//! `cargo bench --bench pipeline`: Ferry's backup, transform and restore on
//! real local clusters, each against the baseline that bounds it, measured
//! in the same run (see docs/benchmarks.md).
//!
//! For each size N the benchmark starts four fresh clusters (source,
//! target, target-s3, baseline) and MinIO with scripts/testenv, fills the
//! source with an estate of N objects, and measures:
//! - `ferry backup create -A` into a local repository (first, then again
//!   with nothing changed) and into an S3 repository on MinIO, against a
//!   raw paginated LIST of the same collections at the same concurrency and
//!   page size;
//! - `ferry transform` with every built-in rule set, and the transform
//!   engine in-process, against JSON parse + serialize of the same objects;
//! - `ferry restore` from the local repository into the empty target and
//!   from the S3 repository into the empty target-s3, against a raw
//!   parallel create of the same objects into the empty baseline cluster,
//!   at the same concurrency; with the GET requests each restore sent
//!   (as Ferry reports them, and as MinIO counted them) against the pack
//!   data the repository holds.
//!
//! Ferry's steps run as the release `ferry` binary and are measured with
//! wait4(2): wall time, CPU time and peak RSS. The backups start once the
//! source's controllers have made their Pods and its servers are idle; each
//! cluster is stopped as soon as the benchmark is done with it (the source
//! after the transform, each target once its restore is checked), so that
//! what its controllers still do does not run into the next step, and so
//! that at N = 100,000 no more than two full clusters are held at once.
//! The results go to `--out` as results.json, results.md and
//! time-vs-n.svg.
//!
//! Under `cargo test` (no `--bench` argument) it only checks its estate
//! generator and its report on made-up numbers, so that the test suite
//! stays free of timing.

mod baseline;
mod measure;
mod report;
mod workload;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use serde_json::Value;

use ferry::cluster::connect::ConnectOptions;
use ferry::profile::ClusterProfile;
use ferry::repo::Repository;
use ferry::repo::backend::LocalBackend;
use ferry::transform::TransformPlan;

use measure::ServerProcesses;
use report::{RepoReads, Results, SizeResult, Step};

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const SNAPSHOT: &str = "bench";

#[derive(Debug, Parser)]
#[command(
    name = "pipeline",
    about = "Benchmark backup, transform and restore on real local clusters against their baselines",
    after_help = "Run with `cargo bench --bench pipeline -- [OPTIONS]` or scripts/bench [OPTIONS]."
)]
struct Args {
    /// Estate sizes (objects), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,100000")]
    sizes: Vec<usize>,
    /// Where results.json, results.md and time-vs-n.svg are written.
    #[arg(long, default_value = "target/bench/pipeline")]
    out: PathBuf,
    /// Where the clusters and repositories live while the benchmark runs.
    #[arg(long, default_value = "/tmp/ferry-bench")]
    work_dir: PathBuf,
    /// LISTs at once for backup and its baseline.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Objects per LIST page for backup and its baseline.
    #[arg(long, default_value_t = 500)]
    page_size: u32,
    /// Writes at once for restore and its baseline.
    #[arg(long, default_value_t = 16)]
    restore_concurrency: usize,
    /// Writes at once while filling the source cluster (not measured
    /// against anything; bounded so that N = 100,000 does not overrun
    /// the API server).
    #[arg(long, default_value_t = 32)]
    populate_concurrency: usize,
    /// How busy (in cores) the source's API server and etcd may still be,
    /// once its controllers are done, when the backups start.
    #[arg(long, default_value_t = 0.3)]
    quiet_cores: f64,
    /// Measure nothing: rewrite results.md and the plot from the
    /// results.json in --out.
    #[arg(long)]
    report_only: bool,
    /// Leave the clusters of the last size running (all of them: none is
    /// stopped early, which at N = 100,000 needs several GiB more memory).
    #[arg(long)]
    keep: bool,
    /// Set by `cargo bench`; without it (as under `cargo test`) only the
    /// estate generator is checked.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !args.bench {
        return self_check();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

/// What `cargo test` runs: the estate is what the benchmark claims.
fn self_check() -> Result<()> {
    let estate = workload::estate(1000);
    ensure!(
        workload::namespaces_for(1000) == 39,
        "1000 objects fill 39 namespaces"
    );
    ensure!(
        estate.len() == 39 * workload::PER_NAMESPACE + 1,
        "whole namespaces plus the CRD"
    );
    ensure!(
        estate == workload::estate(1000),
        "the estate is deterministic"
    );
    let secret_bytes: Vec<usize> = estate
        .iter()
        .filter(|o| o["kind"] == "Secret")
        .map(|o| serde_json::to_vec(o).map_or(0, |b| b.len()))
        .collect();
    ensure!(
        secret_bytes.iter().all(|&b| (2048..6144).contains(&b)),
        "secrets are a few KB: {secret_bytes:?}"
    );
    ensure!(
        workload::namespaces_for(100_000) == 3847,
        "100,000 objects fill 3,847 namespaces"
    );
    ferry::transform::TransformPlan::load(&Path::new(ROOT).join("benches/pipeline/plan.yaml"))?;
    check_store_counters()?;
    check_report()?;
    println!(
        "pipeline benchmark: estate, plan and report check out (run it with cargo bench --bench pipeline)"
    );
    Ok(())
}

/// MinIO's metrics are read as they are served.
fn check_store_counters() -> Result<()> {
    let before = StoreCounters::parse(
        "# TYPE minio_s3_requests_total counter\n\
         minio_s3_requests_total{api=\"getobject\",server=\"127.0.0.1:9000\"} 12\n\
         minio_s3_requests_total{api=\"putobject\",server=\"127.0.0.1:9000\"} 40\n\
         minio_s3_traffic_sent_bytes{server=\"127.0.0.1:9000\"} 1000\n",
    );
    let after = StoreCounters::parse(
        "minio_s3_requests_total{api=\"getobject\",server=\"127.0.0.1:9000\"} 1.2345e+06\n\
         minio_s3_requests_total{api=\"headobject\",server=\"127.0.0.1:9000\"} 3\n\
         minio_s3_requests_total{api=\"putobject\",server=\"127.0.0.1:9000\"} 40\n\
         minio_s3_traffic_sent_bytes{server=\"127.0.0.1:9000\"} 5000\n",
    );
    let during = after.since(&before);
    ensure!(
        during.requests
            == BTreeMap::from([
                ("getobject".to_string(), 1_234_488),
                ("headobject".to_string(), 3)
            ])
            && during.sent_bytes == 4000,
        "MinIO's counters are read wrong: {during:?}"
    );
    Ok(())
}

/// The report shows every target with met or missed, tells "not reported"
/// where Ferry reports no repository reads, and computes memory growth
/// between the smallest and largest N ≥ 10,000 (made-up numbers).
fn check_report() -> Result<()> {
    let cost = |wall_s: f64, peak_rss_mib: f64| measure::Cost {
        wall_s,
        peak_rss_mib,
        ..Default::default()
    };
    let step = |wall_s: f64, rss: f64| Step {
        cost: cost(wall_s, rss),
        objects: 1000,
        ..Default::default()
    };
    let size = |n: usize, rss: f64, gets: Option<u64>| SizeResult {
        n,
        created: n,
        namespaces: n / 26,
        listed_items: n,
        populate: cost(1.0, 0.0),
        backup: step(1.1, rss),
        backup_s3: Some(step(1.3, rss)),
        backup_unchanged: step(0.1, rss),
        list_baseline: cost(1.0, 0.0),
        transform_command: step(1.0, rss),
        transform_engine: step(0.001, 0.0),
        json_baseline: cost(0.001, 0.0),
        restore: step(10.0, rss),
        restore_s3: Some(Step {
            reads: Some(RepoReads {
                pack_bytes: 8 << 20,
                reported: gets.map(|g| serde_json::json!({"getRequests": g, "getBytes": 8 << 20})),
                ..Default::default()
            }),
            ..step(13.0, rss)
        }),
        create_baseline: step(10.0, 0.0),
        servers_rss_gib: None,
    };
    let results = Results {
        machine: report::Machine {
            cpus: 2,
            cpu_model: String::new(),
            memory_gib: 0.0,
            kernel: String::new(),
            kubernetes: String::new(),
            date: String::new(),
            ferry_commit: String::new(),
        },
        command: String::new(),
        concurrency: report::Concurrency {
            backup_lists: 8,
            page_size: 500,
            restore_writes: 16,
            populate_writes: 32,
        },
        sizes: vec![
            size(1000, 40.0, None),
            size(10_000, 100.0, Some(4)),
            size(100_000, 280.0, Some(16)),
        ],
    };
    let text = report::tables(&results);
    let line = |start: &str| {
        text.lines()
            .find(|l| l.starts_with(start))
            .with_context(|| format!("no line {start:?} in\n{text}"))
    };
    // (280 - 100) MiB over 90,000 objects: 2.05 KiB per object.
    let expected = [
        ("| backup (local) ≤ 1.2 × raw LIST |", "1.10 × met"),
        (
            "| restore (S3) ≤ 1.2 × restore (local) |",
            "1.30 × **missed**",
        ),
        (
            "| restore (S3) ≤ 1 GET per MiB",
            "| – | 0.50 met | 2.00 **missed** |",
        ),
        ("| 1000 | S3 |", "not reported"),
        (
            "| peak RSS growth",
            "2.05 KiB/object from N = 10000 **missed**",
        ),
        ("| peak RSS ≤ 256 MiB", "| – | – | 280 MiB **missed** |"),
    ];
    for (start, result) in expected {
        ensure!(
            line(start)?.contains(result),
            "{start} should show {result}:\n{text}"
        );
    }
    Ok(())
}

async fn run(args: Args) -> Result<()> {
    let machine = machine()?;
    let mut results = Results {
        machine,
        command: format!(
            "scripts/bench --sizes {}",
            args.sizes
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        ),
        concurrency: report::Concurrency {
            backup_lists: args.concurrency,
            page_size: args.page_size,
            restore_writes: args.restore_concurrency,
            populate_writes: args.populate_concurrency,
        },
        sizes: Vec::new(),
    };
    let out = if args.out.is_absolute() {
        args.out.clone()
    } else {
        Path::new(ROOT).join(&args.out)
    };
    if args.report_only {
        let results = report::read(&out)?;
        report::write(&results, &out)?;
        println!("{}", report::tables(&results));
        return Ok(());
    }
    for (i, &n) in args.sizes.iter().enumerate() {
        let keep = args.keep && i + 1 == args.sizes.len();
        let result = run_size(&args, n, keep)
            .await
            .with_context(|| format!("benchmark at N = {n}"))?;
        results.sizes.push(result);
        // Write after every size, so that a later failure keeps what was measured.
        report::write(&results, &out)?;
        println!("\n{}", report::table(&results));
    }
    println!("{}", report::tables(&results));
    println!("results: {}", out.display());
    Ok(())
}

/// The clusters of one size: the source, two empty targets (one restored
/// from each repository) and the empty cluster of the raw-create baseline.
const CLUSTERS: &str = "source=new,target=new,target-s3=new,baseline=new";

/// A running test environment, stopped when dropped (unless kept).
struct Environment {
    dir: PathBuf,
    keep: bool,
    env: Value,
}

impl Environment {
    fn start(dir: &Path, keep: bool) -> Result<Self> {
        let status = Command::new(Path::new(ROOT).join("scripts/testenv"))
            .args(["up", "--clusters", CLUSTERS])
            .env("FERRY_TESTENV_DIR", dir)
            // MinIO's request counters, readable without a token: how many
            // GETs a restore from S3 sent, as the store saw them.
            .env("MINIO_PROMETHEUS_AUTH_TYPE", "public")
            .stdout(std::process::Stdio::null())
            .status()
            .context("running scripts/testenv up")?;
        ensure!(
            status.success(),
            "scripts/testenv up failed (is the test environment built? run scripts/testenv build)"
        );
        let text = std::fs::read_to_string(dir.join("env.json"))?;
        Ok(Environment {
            dir: dir.to_path_buf(),
            keep,
            env: serde_json::from_str(&text)?,
        })
    }

    fn kubeconfig(&self, cluster: &str) -> PathBuf {
        PathBuf::from(
            self.env["clusters"][cluster]["kubeconfig"]
                .as_str()
                .unwrap_or_default(),
        )
    }

    fn servers(&self, cluster: &str) -> Result<ServerProcesses> {
        ServerProcesses::of_cluster(&self.dir.join("clusters").join(cluster))
    }

    /// The environment's MinIO and a bucket it made.
    fn s3(&self) -> Result<S3Store> {
        let s3 = &self.env["s3"];
        let text = |key: &str| {
            s3[key]
                .as_str()
                .map(str::to_string)
                .with_context(|| format!("env.json has no s3.{key}"))
        };
        Ok(S3Store {
            endpoint: text("endpoint")?,
            access_key: text("access_key")?,
            secret_key: text("secret_key")?,
            region: text("region")?,
            bucket: text("bucket")?,
            process: ServerProcesses::of_pid_files(&[&self.dir.join("minio/minio.pid")])?,
        })
    }

    /// Stops one cluster that the rest of this size no longer needs (its
    /// controller-manager, API server and etcd, by the pids scripts/testenv
    /// wrote) and deletes its data: at N = 100,000 a cluster holds a few
    /// GiB of memory, and four of them at once do not fit beside the
    /// benchmark. `scripts/testenv down` skips what is stopped already.
    fn stop_cluster(&self, cluster: &str) {
        if self.keep {
            return;
        }
        let dir = self.dir.join("clusters").join(cluster);
        for file in ["kcm.pid", "apiserver.pid", "etcd.pid"] {
            let path = dir.join(file);
            let Some(pid) = std::fs::read_to_string(&path)
                .ok()
                .and_then(|t| t.trim().parse::<libc::pid_t>().ok())
            else {
                continue;
            };
            // Each runs in a process group of its own (setsid): signal the
            // group, as scripts/testenv does.
            // SAFETY: kill has no memory preconditions.
            unsafe { libc::kill(-pid, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            // SAFETY: signal 0 only checks that the process exists.
            while unsafe { libc::kill(pid, 0) } == 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            // SAFETY: as above.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            let _ = std::fs::remove_file(&path);
        }
        let _ = std::fs::remove_dir_all(dir.join("etcd"));
    }

    /// Resident memory of the environment's servers (every cluster's
    /// etcd, API server and controller-manager, and MinIO), in GiB.
    fn servers_rss_gib(&self) -> f64 {
        let mut pid_files = vec![self.dir.join("minio/minio.pid")];
        for entry in std::fs::read_dir(self.dir.join("clusters"))
            .into_iter()
            .flatten()
            .flatten()
        {
            for file in ["kcm.pid", "apiserver.pid", "etcd.pid"] {
                pid_files.push(entry.path().join(file));
            }
        }
        let kib: u64 = pid_files
            .iter()
            .filter_map(|f| std::fs::read_to_string(f).ok())
            .filter_map(|pid| std::fs::read_to_string(format!("/proc/{}/status", pid.trim())).ok())
            .filter_map(|status| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            })
            .sum();
        kib as f64 / 1024.0 / 1024.0
    }

    async fn client(&self, cluster: &str) -> Result<kube::Client> {
        let options = ConnectOptions {
            kubeconfig: Some(self.kubeconfig(cluster)),
            ..Default::default()
        };
        Ok(options.connect().await?.client)
    }
}

impl Drop for Environment {
    fn drop(&mut self) {
        if self.keep {
            eprintln!(
                "clusters kept running: FERRY_TESTENV_DIR={} scripts/testenv down stops them",
                self.dir.display()
            );
            return;
        }
        testenv_down(&self.dir);
    }
}

/// Stops the test environment in `dir`, if one runs there.
fn testenv_down(dir: &Path) {
    let _ = Command::new(Path::new(ROOT).join("scripts/testenv"))
        .arg("down")
        .env("FERRY_TESTENV_DIR", dir)
        .output();
}

fn say(n: usize, what: &str) {
    eprintln!("[bench N={n}] {what}");
}

/// The S3 store of the test environment (MinIO).
struct S3Store {
    endpoint: String,
    access_key: String,
    secret_key: String,
    region: String,
    bucket: String,
    /// MinIO's process, whose CPU the S3 steps report.
    process: ServerProcesses,
}

impl S3Store {
    /// A client with the store's own credentials: nothing is looked up
    /// elsewhere (no profile, no instance metadata).
    fn client(&self) -> aws_sdk_s3::Client {
        ferry::cluster::connect::install_crypto_provider();
        let credentials = aws_sdk_s3::config::Credentials::new(
            &self.access_key,
            &self.secret_key,
            None,
            None,
            "ferry-bench",
        );
        let config = aws_sdk_s3::Config::builder()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .region(aws_sdk_s3::config::Region::new(self.region.clone()))
            .endpoint_url(&self.endpoint)
            .force_path_style(true)
            .credentials_provider(credentials)
            .build();
        aws_sdk_s3::Client::from_conf(config)
    }

    /// Total size of the objects under `prefix` in the bucket.
    async fn bytes_under(&self, prefix: &str) -> Result<u64> {
        let mut pages = self
            .client()
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .into_paginator()
            .send();
        let mut total = 0u64;
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| {
                anyhow::anyhow!(
                    "listing s3://{}/{prefix}: {}",
                    self.bucket,
                    aws_sdk_s3::error::DisplayErrorContext(e)
                )
            })?;
            total += page
                .contents()
                .iter()
                .filter_map(|o| o.size())
                .map(|s| s.max(0) as u64)
                .sum::<u64>();
        }
        Ok(total)
    }

    /// MinIO's counters so far: S3 requests by API and bytes sent. MinIO
    /// refreshes them every 10 s, so they are read only once the store has
    /// been idle for longer than that since `idle_since`.
    async fn counters(&self, idle_since: Instant) -> Result<StoreCounters> {
        let settled = idle_since + Duration::from_secs(12);
        tokio::time::sleep_until(settled.into()).await;
        let output = Command::new("curl")
            .args(["-sSf", "--max-time", "30"])
            .arg(format!("{}/minio/v2/metrics/node", self.endpoint))
            .output()
            .context("running curl for MinIO's metrics")?;
        ensure!(
            output.status.success(),
            "reading MinIO's metrics: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(StoreCounters::parse(&String::from_utf8_lossy(
            &output.stdout,
        )))
    }
}

/// S3 requests by API (`getobject`, `headobject`, …) and bytes sent, as
/// MinIO counts them.
#[derive(Debug, Default, Clone, PartialEq)]
struct StoreCounters {
    requests: BTreeMap<String, u64>,
    sent_bytes: u64,
}

impl StoreCounters {
    /// Reads the Prometheus text MinIO serves.
    fn parse(text: &str) -> Self {
        let mut counters = StoreCounters::default();
        for line in text.lines() {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            // Large counters come in exponent notation (1.2e+06).
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let value = value.round() as u64;
            if let Some(labels) = series.strip_prefix("minio_s3_requests_total{") {
                let api = labels
                    .split(',')
                    .find_map(|l| l.strip_prefix("api=\""))
                    .map(|a| a.trim_end_matches(['"', '}']));
                if let Some(api) = api {
                    *counters.requests.entry(api.to_string()).or_default() += value;
                }
            } else if series.starts_with("minio_s3_traffic_sent_bytes") {
                counters.sent_bytes += value;
            }
        }
        counters
    }

    /// What happened between `before` and `self`.
    fn since(&self, before: &StoreCounters) -> StoreCounters {
        StoreCounters {
            requests: self
                .requests
                .iter()
                .map(|(api, n)| {
                    (
                        api.clone(),
                        n.saturating_sub(before.requests.get(api).copied().unwrap_or(0)),
                    )
                })
                .filter(|(_, n)| *n > 0)
                .collect(),
            sent_bytes: self.sent_bytes.saturating_sub(before.sent_bytes),
        }
    }
}

/// A repository as `ferry --repo` takes it: a directory, or s3://bucket/prefix
/// with the store it is on.
struct Repo<'a> {
    location: String,
    s3: Option<&'a S3Store>,
}

/// `ferry` with a cluster and one of the benchmark's repositories. Only the
/// S3 repository gets the store's endpoint and credentials.
fn ferry(kubeconfig: &Path, args: &[&str], repo: &Repo, key: &Path) -> Command {
    let mut c = Command::new(FERRY);
    c.arg("--kubeconfig").arg(kubeconfig).args(args);
    c.arg("--repo")
        .arg(&repo.location)
        .arg("--key-file")
        .arg(key);
    for variable in [
        "FERRY_REPO",
        "FERRY_PASSWORD_FILE",
        "FERRY_KEY_FILE",
        "FERRY_S3_ENDPOINT",
        "FERRY_S3_REGION",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
    ] {
        c.env_remove(variable);
    }
    // Never ask instance metadata for credentials or a region.
    c.env("AWS_EC2_METADATA_DISABLED", "true")
        .env("NO_COLOR", "1");
    if let Some(s3) = repo.s3 {
        c.env("FERRY_S3_ENDPOINT", &s3.endpoint)
            .env("AWS_ACCESS_KEY_ID", &s3.access_key)
            .env("AWS_SECRET_ACCESS_KEY", &s3.secret_key)
            .env("AWS_REGION", &s3.region);
    }
    c
}

fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match entry.metadata() {
                Ok(m) if m.is_dir() => stack.push(entry.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

async fn run_size(args: &Args, n: usize, keep: bool) -> Result<SizeResult> {
    let work = args.work_dir.join(format!("n{n}"));
    if work.exists() {
        // Whatever an interrupted run left there goes first.
        testenv_down(&work.join("env"));
        std::fs::remove_dir_all(&work).with_context(|| format!("clearing {}", work.display()))?;
    }
    std::fs::create_dir_all(&work)?;
    say(
        n,
        "starting clusters source, target, target-s3 and baseline, and MinIO",
    );
    let env = Environment::start(&work.join("env"), keep)?;
    let source = env.client("source").await?;
    let source_servers = env.servers("source")?;
    let store = env.s3()?;
    for cluster in ["source", "target", "target-s3", "baseline"] {
        baseline::create_all(&env.client(cluster).await?, &workload::platform(), 2).await?;
    }

    // The estate, then what its controllers make of it.
    let (created, namespaces, populate) = {
        let estate = workload::estate(n);
        let namespaces = workload::namespaces_for(n);
        say(
            n,
            &format!(
                "creating {} objects in {namespaces} namespaces, {} at once",
                estate.len(),
                args.populate_concurrency
            ),
        );
        let (done, populate) = measure::in_process(
            &source_servers,
            baseline::create_all(&source, &estate, args.populate_concurrency),
        )
        .await?;
        ensure!(
            done.created >= estate.len(),
            "created {} of {} objects",
            done.created,
            estate.len()
        );
        if done.retries > 0 {
            say(n, &format!("{} writes were retried", done.retries));
        }
        (estate.len(), namespaces, populate)
    };
    say(
        n,
        &format!(
            "created in {:.1}s; waiting for the controllers",
            populate.wall_s
        ),
    );
    settle(args, n, &env, "source", namespaces).await?;

    // Repositories with a key file: key derivation from a password is
    // deliberately slow and is not what this measures. Both use the same
    // key; each is a repository of its own.
    let key = work.join("key");
    std::fs::write(&key, rand_key())?;
    let local = Repo {
        location: work.join("repo").display().to_string(),
        s3: None,
    };
    let s3_prefix = format!("bench-n{n}");
    let s3 = Repo {
        location: format!("s3://{}/{s3_prefix}", store.bucket),
        s3: Some(&store),
    };
    for repo in [&local, &s3] {
        let init = ferry(&env.kubeconfig("source"), &["repo", "init"], repo, &key);
        measure::command(init, &ServerProcesses::none())
            .with_context(|| format!("creating the repository {}", repo.location))?;
    }

    let discovery = ferry::cluster::discovery::discover(&source).await?;
    let selection = ferry::model::select::Selection {
        all_namespaces: true,
        ..Default::default()
    };
    let collections: Vec<_> = ferry::backup::collections_to_capture(&discovery, &selection)
        .into_iter()
        .cloned()
        .collect();

    // Each backup follows a raw LIST of its own: the baseline is the
    // median of three, measured amid the backups.
    let list = || baseline::list_all(&source, &collections, args.page_size, args.concurrency);
    let mut list_costs = Vec::new();
    say(n, "raw LIST baseline");
    let (listed_items, cost) = measure::in_process(&source_servers, list()).await?;
    list_costs.push(cost);

    let concurrency = args.concurrency.to_string();
    let page_size = args.page_size.to_string();
    let backup = |name: &str, repo: &Repo| {
        ferry(
            &env.kubeconfig("source"),
            &[
                "backup",
                "create",
                name,
                "-A",
                "--concurrency",
                &concurrency,
                "--page-size",
                &page_size,
                "-o",
                "json",
            ],
            repo,
            &key,
        )
    };
    let local_dir = PathBuf::from(&local.location);
    let none = ServerProcesses::none();
    say(n, "ferry backup into the local repository (first)");
    let before = dir_bytes(&local_dir);
    let mut first = measured_backup(backup(SNAPSHOT, &local), &source_servers, &none)?;
    first.repo_bytes = Some(dir_bytes(&local_dir).saturating_sub(before));
    list_costs.push(measure::in_process(&source_servers, list()).await?.1);

    say(n, "ferry backup into the S3 repository");
    let s3_root = format!("{s3_prefix}/");
    let before = store.bytes_under(&s3_root).await?;
    let mut first_s3 = measured_backup(backup(SNAPSHOT, &s3), &source_servers, &store.process)?;
    first_s3.repo_bytes = Some(store.bytes_under(&s3_root).await?.saturating_sub(before));
    list_costs.push(measure::in_process(&source_servers, list()).await?.1);

    say(n, "ferry backup into the local repository (unchanged)");
    let before = dir_bytes(&local_dir);
    let mut unchanged = measured_backup(backup("bench-again", &local), &source_servers, &none)?;
    unchanged.repo_bytes = Some(dir_bytes(&local_dir).saturating_sub(before));

    // The pack data each restore will read from.
    let local_pack_bytes = dir_bytes(&local_dir.join("data"));
    let s3_pack_bytes = store.bytes_under(&format!("{s3_prefix}/data/")).await?;
    let mut store_idle_since = Instant::now();

    // Transform: the command end to end, and the engine on objects in memory.
    let profile_path = work.join("target-profile.json");
    let profile_run = measure::command(
        {
            let mut c = Command::new(FERRY);
            c.arg("--kubeconfig")
                .arg(env.kubeconfig("target"))
                .args(["cluster", "profile", "-o", "json"]);
            c
        },
        &none,
    )?;
    std::fs::write(&profile_path, &profile_run.stdout)?;
    let plan_path = Path::new(ROOT).join("benches/pipeline/plan.yaml");
    say(n, "ferry transform (all built-in rule sets)");
    let transform_run = measure::command(
        ferry(
            &env.kubeconfig("source"),
            &[
                "transform",
                SNAPSHOT,
                "--plan",
                plan_path.to_str().unwrap_or_default(),
                "--target-profile",
                profile_path.to_str().unwrap_or_default(),
                "-o",
                "json",
            ],
            &local,
            &key,
        ),
        &none,
    )?;
    let transformed = count_output_objects(&transform_run.stdout)?;

    let objects = load_objects(&local_dir, &key).await?;
    let mut json_costs = Vec::new();
    {
        let documents: Vec<Vec<u8>> = objects
            .iter()
            .map(serde_json::to_vec)
            .collect::<Result<_, _>>()?;
        for _ in 0..3 {
            json_costs.push(
                measure::in_process(&none, async { Ok(baseline::json_round_trip(&documents)) })
                    .await?
                    .1,
            );
        }
    }
    let plan = TransformPlan::load(&plan_path)?;
    let profile: ClusterProfile =
        serde_json::from_slice(&profile_run.stdout).context("reading the target's profile")?;
    let input = objects.clone();
    let (engine_out, engine_cost) = measure::in_process(&none, async {
        Ok(ferry::transform::run(&plan, input, &profile)?)
    })
    .await?;
    say(
        n,
        &format!(
            "transform engine: {} objects in {:.2}s, {} changes",
            objects.len(),
            engine_cost.wall_s,
            engine_out.trace.len()
        ),
    );
    drop(engine_out);

    // Restore from each repository into its own empty cluster, and the
    // same objects raw into the empty baseline cluster: local, raw, S3.
    // Each cluster is checked and stopped once written, so that what its
    // controllers still do (ReplicaSets, Pods) does not run into the next
    // step, and the environment's memory stays at about two full clusters.
    let mut servers_rss_gib = env.servers_rss_gib();
    env.stop_cluster("source");
    let restore_concurrency = args.restore_concurrency.to_string();
    let restore = |cluster: &str, repo: &Repo| {
        ferry(
            &env.kubeconfig(cluster),
            &[
                "restore",
                SNAPSHOT,
                "--restore-concurrency",
                &restore_concurrency,
                "-o",
                "json",
            ],
            repo,
            &key,
        )
    };
    let done_with = |cluster: &str, rss: &mut f64| {
        *rss = rss.max(env.servers_rss_gib());
        env.stop_cluster(cluster);
    };
    say(n, "ferry restore from the local repository into target");
    let mut restore_local = measured_restore(
        restore("target", &local),
        &env.servers("target")?,
        &none,
        objects.len(),
    )?;
    restore_local.reads = Some(RepoReads {
        pack_bytes: local_pack_bytes,
        reported: restore_local.reads.and_then(|r| r.reported),
        ..Default::default()
    });
    verify_restored(&env.client("target").await?, &objects)
        .await
        .context("checking the restore into target")?;
    done_with("target", &mut servers_rss_gib);

    say(n, "raw create baseline into the empty baseline cluster");
    let baseline_client = env.client("baseline").await?;
    let (raw, create_cost) = measure::in_process(
        &env.servers("baseline")?,
        baseline::create_all(&baseline_client, &objects, args.restore_concurrency),
    )
    .await?;
    if raw.retries > 0 {
        say(
            n,
            &format!("raw create: {} writes were retried", raw.retries),
        );
    }
    done_with("baseline", &mut servers_rss_gib);

    say(n, "ferry restore from the S3 repository into target-s3");
    let before = store.counters(store_idle_since).await?;
    let mut restore_s3 = measured_restore(
        restore("target-s3", &s3),
        &env.servers("target-s3")?,
        &store.process,
        objects.len(),
    )?;
    store_idle_since = Instant::now();
    verify_restored(&env.client("target-s3").await?, &objects)
        .await
        .context("checking the restore into target-s3")?;
    servers_rss_gib = servers_rss_gib.max(env.servers_rss_gib());
    let during = store.counters(store_idle_since).await?.since(&before);
    restore_s3.reads = Some(RepoReads {
        pack_bytes: s3_pack_bytes,
        reported: restore_s3.reads.and_then(|r| r.reported),
        store_requests: Some(during.requests),
        store_sent_bytes: Some(during.sent_bytes),
    });
    say(
        n,
        &format!("the clusters and MinIO held up to {servers_rss_gib:.1} GiB"),
    );

    Ok(SizeResult {
        n,
        created,
        namespaces,
        listed_items,
        populate,
        backup: first,
        backup_s3: Some(first_s3),
        backup_unchanged: unchanged,
        list_baseline: measure::median(list_costs),
        transform_command: Step {
            cost: transform_run.cost,
            objects: transformed,
            ..Default::default()
        },
        transform_engine: Step {
            cost: engine_cost,
            objects: objects.len(),
            ..Default::default()
        },
        json_baseline: measure::median(json_costs),
        restore: restore_local,
        restore_s3: Some(restore_s3),
        create_baseline: Step {
            cost: create_cost,
            objects: raw.created + raw.existing,
            ..Default::default()
        },
        servers_rss_gib: Some(servers_rss_gib),
    })
}

/// Waits until `cluster`'s controllers have made the Pods and claims of
/// its workloads and its API server and etcd are idle again.
async fn settle(
    args: &Args,
    n: usize,
    env: &Environment,
    cluster: &str,
    namespaces: usize,
) -> Result<()> {
    let started = Instant::now();
    wait_for_controllers(&env.client(cluster).await?, namespaces, n)
        .await
        .with_context(|| format!("waiting for the controllers of {cluster}"))?;
    let quiet = measure::wait_quiet(
        &env.servers(cluster)?,
        args.quiet_cores,
        Duration::from_secs(600),
    )
    .await?;
    say(
        n,
        &format!(
            "{cluster} settled in {:.0}s{}",
            started.elapsed().as_secs_f64(),
            if quiet {
                ""
            } else {
                " (its servers were still busy after 10 minutes)"
            }
        ),
    );
    Ok(())
}

fn rand_key() -> Vec<u8> {
    use rand::RngCore;
    let mut key = vec![0u8; 64];
    rand::rng().fill_bytes(&mut key);
    key
}

/// Runs a backup; the caller adds what it wrote to the repository.
fn measured_backup(
    command: Command,
    servers: &ServerProcesses,
    store: &ServerProcesses,
) -> Result<Step> {
    let store_before = store.cpu_seconds();
    let run = measure::command(command, servers)?;
    let report: Value =
        serde_json::from_slice(&run.stdout).context("reading the backup's JSON report")?;
    let objects = report["report"]["stats"]["objects"]
        .as_u64()
        .context("the backup report has no object count")? as usize;
    ensure!(
        report["report"]["forbidden"]
            .as_array()
            .is_none_or(Vec::is_empty),
        "the backup was partial: {}",
        report["report"]["forbidden"]
    );
    Ok(Step {
        cost: run.cost,
        objects,
        store_cpu_s: (!store.is_empty()).then(|| store.cpu_seconds() - store_before),
        ..Default::default()
    })
}

/// Runs a restore of `objects` objects. What it read from the repository
/// is what Ferry reports under `.report.repository` (`getRequests`,
/// `getBytes`); a Ferry that does not report it yet leaves it out.
fn measured_restore(
    command: Command,
    servers: &ServerProcesses,
    store: &ServerProcesses,
    objects: usize,
) -> Result<Step> {
    let store_before = store.cpu_seconds();
    let run = measure::command(command, servers)?;
    let store_cpu_s = (!store.is_empty()).then(|| store.cpu_seconds() - store_before);
    let reported = match serde_json::from_slice::<Value>(&run.stdout) {
        Ok(output) => output
            .pointer("/report/repository")
            .filter(|r| r.is_object())
            .cloned(),
        Err(e) => {
            eprintln!("the restore's JSON output is unreadable ({e}): no repository reads");
            None
        }
    };
    Ok(Step {
        cost: run.cost,
        objects,
        store_cpu_s,
        reads: Some(RepoReads {
            reported,
            ..Default::default()
        }),
        ..Default::default()
    })
}

fn count_output_objects(stdout: &[u8]) -> Result<usize> {
    let value: Value =
        serde_json::from_slice(stdout).context("reading ferry transform's JSON output")?;
    match &value {
        Value::Array(items) => Ok(items.len()),
        Value::Object(map) if map.contains_key("items") => {
            Ok(map["items"].as_array().map_or(0, Vec::len))
        }
        _ => bail!("ferry transform -o json printed neither a list nor an array"),
    }
}

async fn load_objects(repo: &Path, key: &Path) -> Result<Vec<Value>> {
    let backend = Arc::new(LocalBackend::new(repo));
    let repository =
        Repository::open(backend, &ferry::repo::KeySource::KeyFile(key.to_path_buf())).await?;
    let subset = ferry::restore::Subset {
        selection: ferry::model::select::Selection {
            all_namespaces: true,
            ..Default::default()
        },
        ..Default::default()
    };
    Ok(ferry::restore::load_selected(&repository, SNAPSHOT, &subset).await?)
}

/// Deployments and StatefulSets have made their ReplicaSets, Pods and
/// claims: the source holds what a real cluster would before the backup.
async fn wait_for_controllers(client: &kube::Client, namespaces: usize, n: usize) -> Result<()> {
    // 20 minutes, and more for large estates: the controller-manager
    // writes at 100 requests/s.
    let budget = Duration::from_secs(1200 + n as u64 / 50);
    let started = Instant::now();
    loop {
        let pods = count_items(client, "/api/v1/pods").await?;
        let claims = count_items(client, "/api/v1/persistentvolumeclaims").await?;
        // Each namespace: two Deployments and a StatefulSet (one pod each)
        // and the StatefulSet's claim beside the two the estate has.
        if pods >= 3 * namespaces && claims >= 3 * namespaces {
            return Ok(());
        }
        if started.elapsed() > budget {
            bail!(
                "the controllers made {pods} of {} pods and {claims} of {} claims in {} s",
                3 * namespaces,
                3 * namespaces,
                budget.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// How many items a collection holds, from a one-item page.
async fn count_items(client: &kube::Client, path: &str) -> Result<usize> {
    let request = http::Request::get(format!("{path}?limit=1")).body(Vec::new())?;
    let list: Value = serde_json::from_str(&client.request_text(request).await?)?;
    let rest = list["metadata"]["remainingItemCount"].as_u64().unwrap_or(0) as usize;
    Ok(list["items"].as_array().map_or(0, Vec::len) + rest)
}

/// The restore did restore: every object is in the target.
async fn verify_restored(client: &kube::Client, objects: &[Value]) -> Result<()> {
    let expected = |kind: &str| objects.iter().filter(|o| o["kind"] == kind).count();
    for (kind, path) in [
        ("Secret", "/api/v1/secrets"),
        ("ConfigMap", "/api/v1/configmaps"),
        ("Deployment", "/apis/apps/v1/deployments"),
        ("Widget", "/apis/bench.ferry.dev/v1/widgets"),
    ] {
        let have = count_items(client, path).await?;
        ensure!(
            have >= expected(kind),
            "the target holds {have} {kind}s after the restore; the snapshot has {}",
            expected(kind)
        );
    }
    Ok(())
}

fn machine() -> Result<report::Machine> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|r| r.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_kib: f64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let output = |cmd: &str, args: &[&str]| {
        Command::new(cmd)
            .args(args)
            .current_dir(ROOT)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let versions = std::fs::read_to_string(Path::new(ROOT).join("scripts/testenv-versions.env"))
        .unwrap_or_default();
    let kubernetes = versions
        .lines()
        .find_map(|l| l.strip_prefix("K8S_NEW_VERSION="))
        .unwrap_or_default()
        .trim_matches('"')
        .to_string();
    let dirty = !output("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty();
    Ok(report::Machine {
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu_model,
        memory_gib: memory_kib / 1024.0 / 1024.0,
        kernel: output("uname", &["-r"]),
        kubernetes,
        date: output("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        ferry_commit: format!(
            "{}{}",
            output("git", &["rev-parse", "--short", "HEAD"]),
            if dirty { "+changes" } else { "" }
        ),
    })
}
