//! `cargo bench --bench pipeline`: Ferry's backup, transform and restore on
//! real local clusters, each against the baseline that bounds it, measured
//! in the same run (see docs/benchmarks.md).
//!
//! For each size N the benchmark starts three fresh clusters (source,
//! target, baseline) with scripts/testenv, fills the source with an estate
//! of N objects, and measures:
//! - `ferry backup create -A` (first, then again with nothing changed)
//!   against a raw paginated LIST of the same collections at the same
//!   concurrency and page size;
//! - `ferry transform` with every built-in rule set, and the transform
//!   engine in-process, against JSON parse + serialize of the same objects;
//! - `ferry restore` into the empty target against a raw parallel create of
//!   the same objects into the empty baseline cluster, at the same
//!   concurrency.
//!
//! Ferry's steps run as the release `ferry` binary and are measured with
//! wait4(2): wall time, CPU time and peak RSS. The results go to
//! `--out` as results.json, results.md and time-vs-n.svg.
//!
//! Under `cargo test` (no `--bench` argument) it only checks its estate
//! generator, so that the test suite stays free of timing.

mod baseline;
mod measure;
mod report;
mod workload;

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
use report::{Results, SizeResult, Step};

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
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,50000")]
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
    /// Measure nothing: rewrite results.md and the plot from the
    /// results.json in --out.
    #[arg(long)]
    report_only: bool,
    /// Leave the clusters of the last size running.
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
    ferry::transform::TransformPlan::load(&Path::new(ROOT).join("benches/pipeline/plan.yaml"))?;
    println!(
        "pipeline benchmark: estate and plan check out (run it with cargo bench --bench pipeline)"
    );
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
        println!(
            "{}\n{}",
            report::table(&results),
            report::baseline_table(&results)
        );
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
    println!("{}", report::baseline_table(&results));
    println!("results: {}", out.display());
    Ok(())
}

/// A running test environment, stopped when dropped (unless kept).
struct Environment {
    dir: PathBuf,
    keep: bool,
    env: Value,
}

impl Environment {
    fn start(dir: &Path, keep: bool) -> Result<Self> {
        let status = Command::new(Path::new(ROOT).join("scripts/testenv"))
            .args(["up", "--clusters", "source=new,target=new,baseline=new"])
            .env("FERRY_TESTENV_DIR", dir)
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

/// `ferry` with a cluster and the benchmark's repository.
fn ferry(kubeconfig: &Path, args: &[&str], repo: &Path, key: &Path) -> Command {
    let mut c = Command::new(FERRY);
    c.arg("--kubeconfig").arg(kubeconfig).args(args);
    c.arg("--repo").arg(repo).arg("--key-file").arg(key);
    c.env_remove("FERRY_REPO")
        .env_remove("FERRY_PASSWORD_FILE")
        .env("NO_COLOR", "1");
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
    say(n, "starting clusters source, target and baseline");
    let env = Environment::start(&work.join("env"), keep)?;
    let source = env.client("source").await?;
    let source_servers = env.servers("source")?;
    for cluster in ["source", "target", "baseline"] {
        baseline::create_all(&env.client(cluster).await?, &workload::platform(), 2).await?;
    }

    // The estate, then what its controllers make of it.
    let estate = workload::estate(n);
    let namespaces = workload::namespaces_for(n);
    say(
        n,
        &format!(
            "creating {} objects in {namespaces} namespaces",
            estate.len()
        ),
    );
    let (created, populate) =
        measure::in_process(&source_servers, baseline::create_all(&source, &estate, 32)).await?;
    ensure!(
        created.created >= estate.len(),
        "created {} of {} objects",
        created.created,
        estate.len()
    );
    say(
        n,
        &format!(
            "created in {:.1}s; waiting for the controllers",
            populate.wall_s
        ),
    );
    wait_for_controllers(&source, namespaces).await?;

    // Repository with a key file: key derivation from a password is
    // deliberately slow and is not what this measures.
    let repo = work.join("repo");
    let key = work.join("key");
    std::fs::write(&key, rand_key())?;
    let init = ferry(&env.kubeconfig("source"), &["repo", "init"], &repo, &key);
    measure::command(init, &ServerProcesses::none())?;

    let discovery = ferry::cluster::discovery::discover(&source).await?;
    let selection = ferry::model::select::Selection {
        all_namespaces: true,
        ..Default::default()
    };
    let collections: Vec<_> = ferry::backup::collections_to_capture(&discovery, &selection)
        .into_iter()
        .cloned()
        .collect();

    let list = || baseline::list_all(&source, &collections, args.page_size, args.concurrency);
    let mut list_costs = Vec::new();
    say(n, "raw LIST baseline");
    let (listed_items, cost) = measure::in_process(&source_servers, list()).await?;
    list_costs.push(cost);

    let concurrency = args.concurrency.to_string();
    let page_size = args.page_size.to_string();
    let backup = |name: &str| {
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
            &repo,
            &key,
        )
    };
    say(n, "ferry backup (first)");
    let first = measured_backup(backup(SNAPSHOT), &repo, &source_servers)?;
    list_costs.push(measure::in_process(&source_servers, list()).await?.1);
    say(n, "ferry backup (unchanged)");
    let unchanged = measured_backup(backup("bench-again"), &repo, &source_servers)?;
    list_costs.push(measure::in_process(&source_servers, list()).await?.1);

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
        &ServerProcesses::none(),
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
            &repo,
            &key,
        ),
        &ServerProcesses::none(),
    )?;
    let transformed = count_output_objects(&transform_run.stdout)?;

    let objects = load_objects(&repo, &key).await?;
    let documents: Vec<Vec<u8>> = objects
        .iter()
        .map(serde_json::to_vec)
        .collect::<Result<_, _>>()?;
    let mut json_costs = Vec::new();
    for _ in 0..3 {
        json_costs.push(
            measure::in_process(&ServerProcesses::none(), async {
                Ok(baseline::json_round_trip(&documents))
            })
            .await?
            .1,
        );
    }
    let plan = TransformPlan::load(&plan_path)?;
    let profile: ClusterProfile =
        serde_json::from_slice(&profile_run.stdout).context("reading the target's profile")?;
    let input = objects.clone();
    let (engine_out, engine_cost) = measure::in_process(&ServerProcesses::none(), async {
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

    // Restore into the empty target; the same objects raw into the empty baseline cluster.
    let restore_concurrency = args.restore_concurrency.to_string();
    say(n, "ferry restore into the empty target");
    let restore_run = measure::command(
        ferry(
            &env.kubeconfig("target"),
            &[
                "restore",
                SNAPSHOT,
                "--restore-concurrency",
                &restore_concurrency,
                "-o",
                "json",
            ],
            &repo,
            &key,
        ),
        &env.servers("target")?,
    )?;
    say(n, "raw create baseline into the empty baseline cluster");
    let baseline_client = env.client("baseline").await?;
    let (raw, create_cost) = measure::in_process(
        &env.servers("baseline")?,
        baseline::create_all(&baseline_client, &objects, args.restore_concurrency),
    )
    .await?;
    let restored = env.client("target").await?;
    verify_restored(&restored, &objects).await?;

    Ok(SizeResult {
        n,
        created: estate.len(),
        namespaces,
        listed_items,
        populate,
        backup: first,
        backup_unchanged: unchanged,
        list_baseline: measure::median(list_costs),
        transform_command: Step {
            cost: transform_run.cost,
            objects: transformed,
            repo_bytes: None,
        },
        transform_engine: Step {
            cost: engine_cost,
            objects: objects.len(),
            repo_bytes: None,
        },
        json_baseline: measure::median(json_costs),
        restore: Step {
            cost: restore_run.cost,
            objects: objects.len(),
            repo_bytes: None,
        },
        create_baseline: Step {
            cost: create_cost,
            objects: raw.created + raw.existing,
            repo_bytes: None,
        },
    })
}

fn rand_key() -> Vec<u8> {
    use rand::RngCore;
    let mut key = vec![0u8; 64];
    rand::rng().fill_bytes(&mut key);
    key
}

fn measured_backup(command: Command, repo: &Path, servers: &ServerProcesses) -> Result<Step> {
    let before = dir_bytes(repo);
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
        repo_bytes: Some(dir_bytes(repo) - before),
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
        objects: Vec::new(),
    };
    Ok(ferry::restore::load_selected(&repository, SNAPSHOT, &subset).await?)
}

/// Deployments and StatefulSets have made their ReplicaSets, Pods and
/// claims: the source holds what a real cluster would before the backup.
async fn wait_for_controllers(client: &kube::Client, namespaces: usize) -> Result<()> {
    let started = Instant::now();
    loop {
        let pods = count_items(client, "/api/v1/pods").await?;
        let claims = count_items(client, "/api/v1/persistentvolumeclaims").await?;
        // Each namespace: two Deployments and a StatefulSet (one pod each)
        // and the StatefulSet's claim beside the two the estate has.
        if pods >= 3 * namespaces && claims >= 3 * namespaces {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(1200) {
            bail!(
                "the controllers made {pods} of {} pods and {claims} of {} claims in 20 minutes",
                3 * namespaces,
                3 * namespaces
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
