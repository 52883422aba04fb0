//! `cargo bench --bench journal`: what a scheduled backup costs when it reads
//! the controller's watch journal instead of LISTing, against a full backup
//! of the same objects in the same run (`scripts/bench --journal` starts the
//! cluster). The controller's path, in process: per namespace
//! `backup::run`, as a BackupPolicy does it.
//!
//! Steps, each repeated and reported as a median:
//! - **full**: every collection LISTed, normalized, encoded (a policy's
//!   full run; the capture cache is not used, so nothing is skipped);
//! - **journaled, unchanged**: nothing changed since the last run;
//! - **journaled, 1 % changed**: 1 % of the objects modified since.
//!
//! Targets: unchanged ≤ 0.2 × full, 1 % changed ≤ 0.3 × full. Results go
//! to `--out` (results.json, results.md). Under `cargo test` it only
//! checks its report on made-up numbers.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ferry::backup::{BackupOptions, Progress, collections_to_capture};
use ferry::cluster::discovery::discover;
use ferry::controller::journal::Journal;
use ferry::incremental::CaptureCache;
use ferry::model::select::Selection;
use ferry::repo::{KeySource, LocalBackend, Repository};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

struct Args {
    objects: usize,
    namespaces: usize,
    rounds: usize,
    out: PathBuf,
}

fn parse_args() -> Result<Option<Args>> {
    let mut args = Args {
        objects: 10_000,
        namespaces: 20,
        rounds: 3,
        out: PathBuf::from("target/bench/journal"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--objects" => args.objects = it.next().context("--objects N")?.parse()?,
            "--namespaces" => args.namespaces = it.next().context("--namespaces N")?.parse()?,
            "--rounds" => args.rounds = it.next().context("--rounds N")?.parse()?,
            "--out" => args.out = it.next().context("--out DIR")?.into(),
            // `cargo test` runs benches with --test: check the report only.
            "--test" => return Ok(None),
            "--bench" => {}
            "--help" | "-h" => {
                println!(
                    "cargo bench --bench journal -- [--objects N] [--namespaces N] [--rounds N] [--out DIR]\n\
                     Needs FERRY_TESTENV (scripts/bench --journal starts the cluster)."
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(Some(args))
}

#[derive(Debug, Clone, serde::Serialize)]
struct Results {
    objects: usize,
    namespaces: usize,
    rounds: usize,
    full_s: Vec<f64>,
    unchanged_s: Vec<f64>,
    changed_s: Vec<f64>,
    changed_objects: usize,
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn report(r: &Results) -> String {
    let full = median(&r.full_s);
    let unchanged = median(&r.unchanged_s);
    let changed = median(&r.changed_s);
    let verdict = |ratio: f64, target: f64| if ratio <= target { "met" } else { "**missed**" };
    let mut out = String::new();
    out.push_str(&format!(
        "{} objects in {} namespaces, median of {} rounds; {} objects ({:.1} %) changed before each 1 % run.\n\n",
        r.objects,
        r.namespaces,
        r.rounds,
        r.changed_objects,
        100.0 * r.changed_objects as f64 / r.objects.max(1) as f64
    ));
    out.push_str("| step | wall s | ratio to full | target | |\n|---|---:|---:|---|---|\n");
    out.push_str(&format!(
        "| full (LIST everything) | {full:.3} | 1.00 | | |\n"
    ));
    let u = unchanged / full;
    out.push_str(&format!(
        "| journaled, unchanged | {unchanged:.3} | {u:.3} | ≤ 0.2 | {} |\n",
        verdict(u, 0.2)
    ));
    let c = changed / full;
    out.push_str(&format!(
        "| journaled, 1 % changed | {changed:.3} | {c:.3} | ≤ 0.3 | {} |\n",
        verdict(c, 0.3)
    ));
    out
}

#[derive(serde::Deserialize)]
struct Env {
    clusters: BTreeMap<String, ClusterInfo>,
}

#[derive(serde::Deserialize)]
struct ClusterInfo {
    kubeconfig: PathBuf,
}

#[tokio::main]
async fn main() -> Result<()> {
    let Some(args) = parse_args()? else {
        let text = report(&Results {
            objects: 1000,
            namespaces: 2,
            rounds: 3,
            full_s: vec![1.0, 1.2, 0.9],
            unchanged_s: vec![0.1, 0.2, 0.1],
            changed_s: vec![0.3, 0.2, 0.25],
            changed_objects: 10,
        });
        assert!(
            text.contains("| journaled, unchanged | 0.100 | 0.100 | ≤ 0.2 | met |"),
            "{text}"
        );
        assert!(
            text.contains("| journaled, 1 % changed | 0.250 | 0.250 | ≤ 0.3 | met |"),
            "{text}"
        );
        return Ok(());
    };
    let env_path = std::env::var("FERRY_TESTENV")
        .context("FERRY_TESTENV: run through scripts/bench --journal, or start scripts/testenv")?;
    let env: Env = serde_json::from_str(&std::fs::read_to_string(&env_path)?)?;
    let cluster = env.clusters.values().next().context("no cluster")?;
    let conn = ferry::cluster::ConnectOptions {
        kubeconfig: Some(cluster.kubeconfig.clone()),
        ..Default::default()
    }
    .connect()
    .await?;
    let client = conn.client.clone();

    // The estate: ConfigMaps, Secrets and Services, spread over namespaces.
    let prefix = format!("jbench-{:06x}", rand::random::<u32>() & 0xffffff);
    let namespaces: Vec<String> = (0..args.namespaces)
        .map(|i| format!("{prefix}-{i}"))
        .collect();
    eprintln!(
        "creating {} objects in {} namespaces",
        args.objects,
        namespaces.len()
    );
    for ns in &namespaces {
        let object: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}}))?;
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &object)
            .await?;
    }
    let per_namespace = args.objects / namespaces.len();
    let jobs: Vec<(String, usize)> = namespaces
        .iter()
        .flat_map(|ns| (0..per_namespace).map(move |i| (ns.clone(), i)))
        .collect();
    let created: Vec<Result<()>> = futures::stream::iter(jobs)
        .map(|(ns, i)| {
            let client = client.clone();
            async move {
                let name = format!("o-{i:05}");
                let labels = json!({"app.kubernetes.io/name": format!("app-{}", i % 10)});
                match i % 3 {
                    0 => {
                        let o: ConfigMap = serde_json::from_value(json!({
                            "metadata": {"name": name, "labels": labels},
                            "data": {"config.yaml": "x".repeat(400), "n": i.to_string()}}))?;
                        Api::<ConfigMap>::namespaced(client, &ns)
                            .create(&PostParams::default(), &o)
                            .await?;
                    }
                    1 => {
                        let o: Secret = serde_json::from_value(json!({
                            "metadata": {"name": name, "labels": labels},
                            "stringData": {"password": format!("secret-{i}")}}))?;
                        Api::<Secret>::namespaced(client, &ns)
                            .create(&PostParams::default(), &o)
                            .await?;
                    }
                    _ => {
                        let o: Service = serde_json::from_value(json!({
                            "metadata": {"name": name, "labels": labels},
                            "spec": {"selector": labels, "ports": [{"port": 80}]}}))?;
                        Api::<Service>::namespaced(client, &ns)
                            .create(&PostParams::default(), &o)
                            .await?;
                    }
                }
                Ok(())
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    for r in created {
        r?;
    }

    let dir = tempfile::tempdir()?;
    let key = KeySource::Password(zeroize::Zeroizing::new("journal bench".to_string()));
    let repo = Repository::init(Arc::new(LocalBackend::new(dir.path().join("repo"))), &key).await?;
    // As the controller's handle does.
    repo.remember_written_files();
    let discovery = discover(&client).await?;
    let profile = ferry::cluster::profile::read_profile(&conn, &discovery).await?;
    let discovered = Arc::new((discovery, profile));
    let everything = Selection {
        all_namespaces: true,
        include_deps: true,
        ..Default::default()
    };
    let cache = Arc::new(CaptureCache::new());
    let journal = Journal::new(client.clone(), cache.clone());
    journal.keep_namespaces(Some(namespaces.iter().cloned().collect()));
    // What the controller follows (see controller::policy).
    let mut followed = collections_to_capture(&discovered.0, &everything);
    followed.extend(ferry::backup::cluster_collections_read(&discovered.0));
    journal.follow(&followed);
    if !journal.wait_synced(Duration::from_secs(120)).await {
        bail!("the journal did not sync");
    }

    let mut run_number = 0usize;
    // One policy run: every namespace backed up, as the controller does.
    let mut policy_run = |journaled: bool, with_cache: bool| {
        run_number += 1;
        let run = run_number;
        let conn = conn.clone();
        let repo = repo.clone();
        let namespaces = namespaces.clone();
        let cache = cache.clone();
        let journal = journal.clone();
        let discovered = discovered.clone();
        async move {
            if with_cache {
                cache.begin_run();
            }
            let started = Instant::now();
            for ns in &namespaces {
                let selection = Selection {
                    namespaces: vec![ns.clone()],
                    include_deps: true,
                    ..Default::default()
                };
                let mut options = BackupOptions::new(format!("{ns}-{run}"), selection);
                if with_cache {
                    options.cache = Some(cache.clone());
                }
                if journaled {
                    options.source = Some(journal.clone());
                    options.discovered = Some(discovered.clone());
                }
                ferry::backup::run(&conn, &repo, &options, Arc::new(Progress::default())).await?;
            }
            let elapsed = started.elapsed().as_secs_f64();
            if with_cache {
                cache.finish_run();
                journal.compact();
            }
            Ok::<f64, anyhow::Error>(elapsed)
        }
    };
    // Fill the cache once (a policy's first, full run).
    policy_run(false, true).await?;
    let changed_objects = (args.objects / 100).max(1);
    let mut results = Results {
        objects: per_namespace * namespaces.len(),
        namespaces: namespaces.len(),
        rounds: args.rounds,
        full_s: Vec::new(),
        unchanged_s: Vec::new(),
        changed_s: Vec::new(),
        changed_objects,
    };
    for round in 0..args.rounds {
        let full = policy_run(false, false).await?;
        let unchanged = policy_run(true, true).await?;
        // 1 %: ConfigMaps across the namespaces.
        for k in 0..changed_objects {
            let ns = &namespaces[k % namespaces.len()];
            let i = (k / namespaces.len()) * 3 % per_namespace.max(1);
            let name = format!("o-{:05}", i - i % 3);
            Api::<ConfigMap>::namespaced(client.clone(), ns)
                .patch(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(
                        json!({"data": {"round": round.to_string(), "k": k.to_string()}}),
                    ),
                )
                .await?;
        }
        // Until the journal has seen every change.
        let deadline = Instant::now() + Duration::from_secs(120);
        while journal.pending() < changed_objects {
            if Instant::now() > deadline {
                bail!(
                    "the journal saw {} of {changed_objects} changes",
                    journal.pending()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let changed = policy_run(true, true).await?;
        eprintln!(
            "round {round}: full {full:.3}s, unchanged {unchanged:.3}s, 1% changed {changed:.3}s"
        );
        results.full_s.push(full);
        results.unchanged_s.push(unchanged);
        results.changed_s.push(changed);
    }
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(
        args.out.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    let text = report(&results);
    std::fs::write(args.out.join("results.md"), &text)?;
    println!("{text}");
    for ns in &namespaces {
        let _ = Api::<Namespace>::all(client.clone())
            .delete(ns, &Default::default())
            .await;
    }
    Ok(())
}
