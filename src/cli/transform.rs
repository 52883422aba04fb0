//! `ferry transform`: a snapshot's objects through a transform plan,
//! offline, as manifests (stdout, a directory, a kustomization) or as the
//! list of changes.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use serde_json::Value;

use super::args::{GlobalArgs, ManifestFormat, TransformArgs};
use super::{connect, repo, restore_options};
use crate::profile::ClusterProfile;
use crate::transform::{TransformOutput, TransformPlan, builtin_rule_sets};

pub async fn run(global: &GlobalArgs, args: TransformArgs) -> anyhow::Result<ExitCode> {
    if args.list {
        list_rule_sets(&mut std::io::stdout().lock())?;
        return Ok(ExitCode::SUCCESS);
    }
    let (Some(snapshot), Some(plan_path)) = (&args.snapshot, &args.plan) else {
        anyhow::bail!("give a SNAPSHOT and --plan PLAN (or --list)");
    };
    let plan = TransformPlan::load(plan_path)
        .with_context(|| format!("transform plan {}", plan_path.display()))?;
    // A namespace mapping is a first step with the namespace rule set.
    let mapping = crate::restore::mapping::NamespaceMapping::parse(&args.namespace_mapping)?;
    let plan = match crate::restore::effective_transform(&mapping, None)? {
        Some(mapped) => mapped.then(plan),
        None => plan,
    };
    let profile = target_profile(global, args.target_profile.as_deref()).await?;
    let write = super::args::RestoreWriteArgs {
        namespace_mapping: Vec::new(),
        existing: Default::default(),
        recreate_cascading: false,
        dry_run: true,
        restore_concurrency: 1,
        transform: None,
        no_volume_data: true,
        mover: super::args::MoverArgs {
            mover_image: String::new(),
            mover_s3_endpoint: None,
            mover_timeout: std::time::Duration::from_secs(60),
            mover_concurrency: 1,
            mover_concurrency_per_node: 2,
            snapshot_metadata_account: None,
            mover_requests: Default::default(),
            mover_limits: Default::default(),
        },
    };
    let options = restore_options(Some(&args.options), &write)?;
    let repository = repo::open(&args.repo).await?;
    let objects = crate::restore::load_selected(&repository, snapshot, &options.subset)
        .await
        .with_context(|| format!("reading snapshot {snapshot}"))?;
    let output =
        tokio::task::spawn_blocking(move || crate::transform::run(&plan, objects, &profile))
            .await
            .context("the transform stopped unexpectedly")?
            .context("transform failed; nothing was written")?;
    for warning in &output.warnings {
        eprintln!("warning: {warning}");
    }
    for skipped in &output.skipped {
        eprintln!("skipped: {skipped}");
    }
    if args.diff {
        print_changes(&mut std::io::stdout().lock(), &output)?;
        return Ok(ExitCode::SUCCESS);
    }
    // Standard output flushes at every line; manifests are written in
    // large blocks instead.
    let mut out = std::io::BufWriter::with_capacity(1 << 20, std::io::stdout().lock());
    match args.output {
        ManifestFormat::Yaml => {
            for object in &output.objects {
                writeln!(out, "---")?;
                crate::yaml::to_writer(&mut out, object)?;
            }
            out.flush()?;
        }
        ManifestFormat::Json => {
            /// A `v1` List that borrows its items: no copy of the objects.
            #[derive(serde::Serialize)]
            #[serde(rename_all = "camelCase")]
            struct List<'a> {
                api_version: &'static str,
                kind: &'static str,
                items: &'a [Value],
            }
            let list = List {
                api_version: "v1",
                kind: "List",
                items: &output.objects,
            };
            serde_json::to_writer_pretty(&mut out, &list)?;
            writeln!(out)?;
            out.flush()?;
        }
        ManifestFormat::Dir | ManifestFormat::Kustomize => {
            let dir = args
                .output_dir
                .as_deref()
                .context("--output-dir is required with -o dir and -o kustomize")?;
            let files = write_dir(
                dir,
                &output.objects,
                args.output == ManifestFormat::Kustomize,
            )?;
            eprintln!("wrote {files} files to {}", dir.display());
        }
    }
    eprintln!(
        "{} objects, {} changes, {} warnings, {} skipped",
        output.objects.len(),
        output.trace.len(),
        output.warnings.len(),
        output.skipped.len()
    );
    Ok(ExitCode::SUCCESS)
}

/// The profile rules see: a saved one, the live cluster's when a context or
/// kubeconfig is given, or an empty one.
async fn target_profile(
    global: &GlobalArgs,
    saved: Option<&Path>,
) -> anyhow::Result<ClusterProfile> {
    if let Some(path) = saved {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the target profile {}", path.display()))?;
        return serde_yaml_ng::from_str(&text).with_context(|| {
            format!(
                "{} is not a cluster profile (save one with `ferry cluster profile -o json`)",
                path.display()
            )
        });
    }
    if global.context.is_some() || global.kubeconfig.is_some() {
        let conn = connect(global).await?;
        let discovery = crate::cluster::discovery::discover(&conn.client).await?;
        return Ok(crate::cluster::profile::read_profile(&conn, &discovery).await?);
    }
    eprintln!("note: no --target-profile or --context: rules see an empty target profile");
    Ok(ClusterProfile::default())
}

fn print_changes(out: &mut dyn Write, output: &TransformOutput) -> std::io::Result<()> {
    let mut by_object: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for change in &output.trace {
        by_object
            .entry(change.object.as_str())
            .or_default()
            .push(change.to_string());
    }
    if by_object.is_empty() {
        writeln!(out, "No changes.")?;
    }
    for (object, changes) in by_object {
        writeln!(out, "{object}")?;
        for change in changes {
            writeln!(out, "  {change}")?;
        }
    }
    Ok(())
}

fn list_rule_sets(out: &mut dyn Write) -> std::io::Result<()> {
    for (name, source) in builtin_rule_sets() {
        writeln!(out, "{name}")?;
        for line in source.lines().take_while(|l| l.starts_with("//")) {
            let text = line.trim_start_matches("//!").trim_start_matches("//");
            writeln!(out, "   {}", text.strip_prefix(' ').unwrap_or(text))?;
        }
        writeln!(out)?;
    }
    Ok(())
}

/// File name of an object in a manifest directory; an error for names that
/// would leave the directory.
fn file_name(object: &Value) -> Result<String, String> {
    use crate::model::names::file_component;
    let kind = object["kind"]
        .as_str()
        .unwrap_or("Object")
        .to_ascii_lowercase();
    let name = object["metadata"]["name"].as_str().unwrap_or("unnamed");
    let namespace = object["metadata"]["namespace"]
        .as_str()
        .unwrap_or("_cluster");
    Ok(format!(
        "{}/{}-{}.yaml",
        file_component(namespace)?,
        file_component(&kind)?,
        file_component(name)?
    ))
}

fn write_dir(dir: &Path, objects: &[Value], kustomize: bool) -> anyhow::Result<usize> {
    // Every name is checked before the first file is written.
    let mut problems: Vec<String> = Vec::new();
    let mut names = Vec::with_capacity(objects.len());
    for object in objects {
        problems.extend(crate::model::names::problems(object));
        match file_name(object) {
            Ok(name) => names.push(name),
            Err(why) => problems.push(why),
        }
    }
    if !problems.is_empty() {
        problems.sort();
        problems.dedup();
        anyhow::bail!(
            "{} object name(s) are not valid; nothing was written to {}:\n  - {}",
            problems.len(),
            dir.display(),
            problems.join("\n  - ")
        );
    }
    let mut files = Vec::new();
    for (object, relative) in objects.iter().zip(names) {
        let path = dir.join(&relative);
        std::fs::create_dir_all(path.parent().expect("a file under dir"))
            .with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(&path, crate::yaml::to_string(object))
            .with_context(|| format!("writing {}", path.display()))?;
        files.push(relative);
    }
    if kustomize {
        let kustomization = serde_json::json!({
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": files,
        });
        let path = dir.join("kustomization.yaml");
        std::fs::write(&path, crate::yaml::to_string(&kustomization))
            .with_context(|| format!("writing {}", path.display()))?;
        return Ok(files.len() + 1);
    }
    Ok(files.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_files_are_grouped_by_namespace() {
        let cm = serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a", "namespace": "shop"}});
        let sc = serde_json::json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": "fast"}});
        assert_eq!(file_name(&cm).unwrap(), "shop/configmap-a.yaml");
        assert_eq!(file_name(&sc).unwrap(), "_cluster/storageclass-fast.yaml");
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(write_dir(dir.path(), &[cm, sc], true).unwrap(), 3);
        let k = std::fs::read_to_string(dir.path().join("kustomization.yaml")).unwrap();
        assert!(
            k.contains("shop/configmap-a.yaml") && k.contains("_cluster/storageclass-fast.yaml")
        );
    }

    #[test]
    fn names_that_would_leave_the_output_directory_write_nothing() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("out");
        let good = serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a", "namespace": "shop"}});
        let escapes = [
            serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "namespace": "../../escaped"}}),
            serde_json::json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": ".."}}),
            serde_json::json!({"apiVersion": "v1", "kind": "../ConfigMap", "metadata": {"name": "y", "namespace": "shop"}}),
        ];
        for bad in escapes {
            let err = write_dir(&dir, &[good.clone(), bad.clone()], true).unwrap_err();
            assert!(err.to_string().contains("nothing was written"), "{err}");
            assert!(!dir.exists(), "{bad}: nothing written");
            assert_eq!(
                std::fs::read_dir(root.path()).unwrap().count(),
                0,
                "nothing outside the output directory either"
            );
        }
    }
}
