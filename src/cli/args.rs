//! Command-line arguments (clap derive). Flags follow kubectl where kubectl
//! has one: `--kubeconfig`, `--context`, `-n/--namespace`, `-A`,
//! `-l/--selector`, `-o/--output`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use super::output::OutputFormat;

/// Ferry backs up Kubernetes applications as normalized application graphs
/// into an encrypted, deduplicating repository (a local directory or S3),
/// and restores them into the same or another cluster.
#[derive(Debug, Parser)]
#[command(
    name = "ferry",
    version,
    propagate_version = true,
    max_term_width = 100
)]
#[command(after_help = "Environment:\n  \
    KUBECONFIG          kubeconfig files, as for kubectl\n  \
    FERRY_REPO          repository location (a directory, or s3://bucket/prefix)\n  \
    FERRY_PASSWORD      repository password (or FERRY_PASSWORD_FILE / FERRY_KEY_FILE)\n  \
    FERRY_S3_ENDPOINT   endpoint of an S3-compatible store (MinIO, Ceph, R2…)\n  \
    FERRY_CONFIG        config file (default ~/.config/ferry/config.yaml)\n  \
    AWS_*               the standard AWS credential chain for s3:// repositories\n\n\
Exit status: 0 success, 1 error, 2 usage error, 3 partial backup (some resources were forbidden).")]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args, Clone)]
pub struct GlobalArgs {
    /// Path to the kubeconfig file (default: $KUBECONFIG, then ~/.kube/config, then in-cluster).
    #[arg(long, global = true, env = "FERRY_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: the current context).
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// Timeout of each API request, e.g. 30s or 2m.
    #[arg(long, global = true, default_value = "60s", value_parser = humantime::parse_duration)]
    pub request_timeout: std::time::Duration,
    /// More logging on stderr (-v info, -vv debug, -vvv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

// Parsed once per run: variant sizes do not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create, inspect, verify and delete backups (snapshots of applications).
    #[command(subcommand)]
    Backup(BackupCommand),
    /// Create and maintain repositories.
    #[command(subcommand)]
    Repo(RepoCommand),
    /// Restore a snapshot into the current or another cluster.
    #[command(
        after_help = "The restore is planned first: objects are ordered into waves by their \
dependencies (CRDs and Namespaces, classes, configuration, RBAC, workloads, networking, \
autoscaling), and a preflight checks the target before anything is written: served API \
versions, referenced storage/ingress/priority/runtime classes (one the source cluster lacked \
too is only a warning), CRDs, and permissions for every write (SelfSubjectAccessReview). A failed preflight lists every problem and writes nothing. \
Objects are written with server-side apply (field manager 'ferry'): running a restore again \
converges, and a restore interrupted half-way finishes when run again.\n\n\
A subset (-n, -l, --include-kind, --object) restores the selected objects plus exactly the \
cluster-scoped objects they depend on in the snapshot's graph (their Namespaces, the \
ClusterRoles their bindings name, the CRDs of their custom resources, the classes they use), \
and no other cluster-scoped object.\n\n\
Plans: `--dry-run -o json > plan.json` writes the plan (waves, each object's action and why, \
the differences an update makes, the resourceVersion seen in the target); \
`ferry restore --plan plan.json` applies exactly that plan later, and refuses, naming the \
objects, when the target or the snapshot changed since. `--dry-run --target-profile p.json` \
plans without any cluster, against a saved profile (`ferry cluster profile > p.json`).\n\n\
Examples:\n  \
  ferry restore shop-nightly --dry-run\n  \
  ferry restore shop-nightly --dry-run -o json > plan.json && ferry restore --plan plan.json\n  \
  ferry restore shop-nightly --context staging --namespace-mapping shop=shop-staging\n  \
  ferry restore shop-nightly --object Deployment/shop/web --existing recreate"
    )]
    Restore(RestoreArgs),
    /// Back up from one cluster and restore into another, in one command.
    #[command(after_help = "Examples:\n  \
  ferry migrate --from prod-eu --to prod-us -n shop\n  \
  ferry migrate --from old --to new -A --repo s3://migrations/2026 --snapshot cutover")]
    Migrate(MigrateArgs),
    /// Rewrite a snapshot's objects for another cluster with a transform
    /// plan, offline: print the manifests, write them to a directory or a
    /// kustomization, or show every change per object.
    #[command(
        after_help = "A transform plan (apiVersion ferry.dev/v1alpha1, kind TransformPlan) lists \
rule sets in order: built-in ones (storage-class, registry, namespace, zones, api-versions, \
clone-for-test; see `ferry transform --list`), Rhai scripts by path, inline scripts and RFC 6902 \
JSON patches with selectors. Rules see the target's cluster profile: save one with \
`ferry --context TARGET cluster profile > target.json` and pass it with --target-profile, or \
give --context to read it from the live cluster. Without either, rules see an empty profile \
(api-versions then converts to the newest stable versions).\n\n\
Examples:\n  \
  ferry transform shop-nightly --plan eks-to-gke.yaml --target-profile gke.json --diff\n  \
  ferry transform shop-nightly --plan eks-to-gke.yaml --target-profile gke.json -o kustomize --output-dir gitops/shop\n  \
  ferry transform --list"
    )]
    Transform(TransformArgs),
    /// Inspect clusters.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Back up and restore directories with Ferry's data mover: what mover
    /// Pods run for PersistentVolumes, usable on any directory.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Run Ferry as an in-cluster controller (policies, schedules,
    /// self-service Backups and Restores), or print its manifests.
    Controller(super::controller::ControllerArgs),
    /// Inspect BackupPolicies: which namespaces are protected.
    #[command(subcommand)]
    Policy(super::controller::PolicyCommand),
    /// Print the normalization table: what a backup strips or skips, and why.
    Rules {
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
}

#[derive(Debug, Args, Clone)]
pub struct RepoArgs {
    /// Repository: a local directory or s3://bucket/prefix.
    #[arg(long, env = "FERRY_REPO")]
    pub repo: Option<String>,
    /// File holding the repository password.
    #[arg(long, env = "FERRY_PASSWORD_FILE", conflicts_with = "key_file")]
    pub password_file: Option<PathBuf>,
    /// File holding a raw key (at least 32 bytes) instead of a password.
    #[arg(long, env = "FERRY_KEY_FILE")]
    pub key_file: Option<PathBuf>,
    /// Endpoint URL of an S3-compatible store (MinIO, Ceph RGW, R2…).
    #[arg(long, env = "FERRY_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// Region of the bucket (default: the AWS credential chain's region).
    #[arg(long, env = "FERRY_S3_REGION")]
    pub s3_region: Option<String>,
    /// Address buckets by path (bucket in the URL path), as S3-compatible
    /// stores need. Default: on when --s3-endpoint is set.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub s3_path_style: Option<bool>,
}

#[derive(Debug, Subcommand)]
pub enum RepoCommand {
    /// Create a new repository with a fresh random master key wrapped by the
    /// password or key file.
    #[command(
        after_help = "Blobs (manifests, volume data, trees, index files) are sealed with an \
AEAD under a random 192-bit nonce each: xaes-256-gcm where the CPU has AES instructions \
(x86-64 AES-NI with PCLMULQDQ, ARMv8 AES with PMULL), else xchacha20-poly1305. Both are \
read on any machine; the choice only sets the speed. Key files are always sealed with \
xchacha20-poly1305, and the cipher is wrapped with the master key, so it cannot be swapped \
without the password.\n\n\
Examples:\n  \
  FERRY_PASSWORD=... ferry repo init --repo /backups/ferry\n  \
  ferry repo init --repo s3://bucket/ferry --password-file pw --cipher xchacha20-poly1305"
    )]
    Init {
        #[command(flatten)]
        repo: RepoArgs,
        /// The cipher that seals blobs (default: the faster on this CPU).
        #[arg(long, value_name = "CIPHER", value_parser = parse_cipher)]
        cipher: Option<crate::repo::Cipher>,
        /// Create the S3 bucket first if it does not exist (in --s3-region);
        /// without it, a missing bucket is an error.
        #[arg(long)]
        create_bucket: bool,
    },
    /// Show how many snapshots, packs and bytes a repository holds.
    Stats {
        #[command(flatten)]
        repo: RepoArgs,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Remove stale locks: those of processes of this host that no longer
    /// run, and those not refreshed for 30 minutes.
    #[command(
        after_help = "A running command refreshes its lock every 5 minutes, so a lock \
not refreshed for 30 minutes belongs to a process that is gone or cut off from the \
repository. Stale locks block nothing, but data that prune marked for deletion while they \
existed is deleted only once they are gone: prune lists such locks. Remove them once you know \
their processes have ended (a process that resumes after its lock was removed may store a \
snapshot that needs deleted data). Live locks are never removed."
    )]
    Unlock {
        #[command(flatten)]
        repo: RepoArgs,
    },
    /// Rebuild the index from the packs and remove damaged manifests; list
    /// what cannot be recovered.
    #[command(
        after_help = "Every pack ends with an encrypted copy of its own index entries, so \
the index can be rebuilt from the packs alone. `repo repair` takes the exclusive lock, reads \
every pack header (and every readable index file, for packs whose header is damaged), writes \
one new index and removes the old index files, deletion marks that cannot be read, and \
snapshot manifests that were read but are not valid. It then lists what cannot be recovered: \
packs whose header is unreadable and that no index describes, and snapshots that need blobs \
no pack holds (restore what is left of them, or delete them with `ferry backup delete`).\n\n\
If the store fails to read a file (which may be a transient error), repair changes nothing \
and says which file; run it again later. Prune refuses to run while an index file, deletion \
mark or snapshot manifest is unreadable, and points here.\n\n\
Examples:\n  \
  ferry repo repair --dry-run\n  \
  ferry repo repair && ferry backup verify --read-data"
    )]
    Repair {
        #[command(flatten)]
        repo: RepoArgs,
        /// Report what would be rebuilt and removed; change nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Print the cluster profile (version, served APIs, storage and ingress
    /// classes, zones) that transforms and restore validation use offline.
    Profile {
        #[arg(short, long, value_enum, default_value = "json")]
        output: OutputFormat,
    },
}

/// Which objects a backup protects.
#[derive(Debug, Args, Clone, Default)]
pub struct SelectionArgs {
    /// Namespace to back up; repeatable; globs allowed (`team-*`).
    #[arg(short, long = "namespace", value_name = "NAMESPACE")]
    pub namespaces: Vec<String>,
    /// Back up every namespace except kube-system, kube-public and kube-node-lease.
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
    /// Namespace to leave out; repeatable; globs allowed.
    #[arg(long = "exclude-namespace", value_name = "NAMESPACE")]
    pub exclude_namespaces: Vec<String>,
    /// Label selector, kubectl syntax: `app=web,tier!=cache,env in (prod,stage)`.
    #[arg(short = 'l', long)]
    pub selector: Option<String>,
    /// Only these kinds (Kind, plural or plural.group); repeatable or comma-separated.
    #[arg(long = "include-kind", value_delimiter = ',')]
    pub include_kinds: Vec<String>,
    /// Leave out these kinds; repeatable or comma-separated.
    #[arg(long = "exclude-kind", value_delimiter = ',')]
    pub exclude_kinds: Vec<String>,
    /// An application: objects labelled app.kubernetes.io/instance or
    /// app.kubernetes.io/part-of with this value, or the Helm release of this name.
    #[arg(long)]
    pub app: Option<String>,
    /// Do not pull in dependencies outside the selection (ClusterRoles,
    /// StorageClasses, CRDs, PriorityClasses, unlabelled ConfigMaps…).
    #[arg(long)]
    pub no_deps: bool,
}

#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Back up the selected applications into a new snapshot.
    #[command(after_help = "Examples:\n  \
        ferry backup create shop-nightly -n shop\n  \
        ferry backup create teams -n 'team-*' --exclude-kind secrets --ttl 720h\n  \
        ferry backup create web --app web -A --repo s3://backups/prod")]
    Create {
        /// Name of the snapshot (unique in the repository).
        name: String,
        #[command(flatten)]
        selection: SelectionArgs,
        #[command(flatten)]
        repo: RepoArgs,
        /// Delete the snapshot automatically after this long (e.g. 720h, 30days).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<std::time::Duration>,
        /// After the backup, keep only the newest N snapshots (expired ones
        /// go first) and free the space of the others.
        #[arg(long)]
        keep_last: Option<usize>,
        /// Label the snapshot, KEY=VALUE; repeatable.
        #[arg(long = "label", value_parser = parse_key_value)]
        labels: Vec<(String, String)>,
        /// LISTs running at once against the API server.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Objects per LIST page.
        #[arg(long, default_value_t = 500)]
        page_size: u32,
        /// Keep kubectl.kubernetes.io/last-applied-configuration annotations.
        #[arg(long)]
        keep_last_applied: bool,
        /// Store a snapshot even if the selection matches no object. Without
        /// it, a selection that matches nothing (e.g. a misspelt namespace)
        /// is an error and nothing is written.
        #[arg(long)]
        allow_empty: bool,
        #[command(flatten)]
        volumes: VolumeArgs,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// List the snapshots in a repository.
    #[command(visible_alias = "ls")]
    List {
        #[command(flatten)]
        repo: RepoArgs,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Show a snapshot: source, selection, objects per kind, skipped objects and warnings.
    ///
    /// SNAPSHOT is a name, a full id, or at least 8 characters of an id.
    Describe {
        name: String,
        #[command(flatten)]
        repo: RepoArgs,
        /// Also list every object.
        #[arg(long)]
        objects: bool,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Print a snapshot's application graph.
    Graph {
        name: String,
        #[command(flatten)]
        repo: RepoArgs,
        #[arg(long, value_enum, default_value_t = GraphFormat::Dot)]
        format: GraphFormat,
    },
    /// Check snapshots (all, or NAME) for missing or damaged data; names every damaged object.
    Verify {
        name: Option<String>,
        #[command(flatten)]
        repo: RepoArgs,
        /// Also read and check every pack of the repository, not only the snapshot's objects.
        #[arg(long)]
        read_data: bool,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Delete a snapshot (its data is freed by `ferry backup prune`).
    ///
    /// NAME is a snapshot name, its full id, or an unambiguous prefix of at
    /// least 8 characters of its id. A damaged manifest (listed as DAMAGED)
    /// is deleted by its id.
    ///
    /// Volumes the snapshot kept as CSI snapshots (method `snapshot`) are
    /// deleted from the cluster too, through the current kubeconfig context,
    /// when that is the cluster that holds them; otherwise they are named so
    /// that they can be deleted there.
    Delete {
        name: String,
        #[command(flatten)]
        repo: RepoArgs,
        /// Free the data no snapshot references right away.
        #[arg(long)]
        prune: bool,
        /// Leave the CSI snapshots the backup kept in the cluster.
        #[arg(long)]
        keep_volume_snapshots: bool,
    },
    /// Apply retention: delete expired snapshots (and beyond --keep-last),
    /// then free the data no remaining snapshot references.
    #[command(
        after_help = "Data is freed in two phases, so that a backup or restore running \
at the same time never loses data: a prune marks the packs no snapshot needs, and a later \
prune deletes them once every command that was running when they were marked has finished \
(its lock is gone), unless a snapshot needs them again. Running prune twice in a row with \
nothing else running therefore frees everything unreferenced, including the data of \
snapshots removed with `ferry backup delete`. Prune deletes nothing while an index file or \
snapshot manifest cannot be read; `ferry repo repair` fixes that.

CSI snapshots kept in the cluster of the current context are labelled \
ferry.dev/kept-by=REPOSITORY-ID. Prune also releases those of this repository that no \
snapshot names: left by a backup killed before its snapshot was written, or by a delete \
killed before it released them. It holds the repository's exclusive lock meanwhile, so a \
running backup's snapshots are never taken for leaks."
    )]
    Prune {
        #[command(flatten)]
        repo: RepoArgs,
        #[arg(long)]
        keep_last: Option<usize>,
        /// Show what would be deleted without deleting.
        #[arg(long)]
        dry_run: bool,
        /// Leave the CSI snapshots that deleted backups kept in the cluster
        /// (by default they are deleted with their backup), and leaked ones
        /// too.
        #[arg(long)]
        keep_volume_snapshots: bool,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum GraphFormat {
    Dot,
    Json,
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("'{s}' is not KEY=VALUE"))
}

/// Which part of a snapshot to restore, and how.
#[derive(Debug, Args, Clone)]
pub struct RestoreOptionsArgs {
    /// Restore only these source namespaces; repeatable; globs allowed.
    #[arg(short, long = "namespace", value_name = "NAMESPACE")]
    pub namespaces: Vec<String>,
    /// Leave out these source namespaces; repeatable; globs allowed.
    #[arg(long = "exclude-namespace", value_name = "NAMESPACE")]
    pub exclude_namespaces: Vec<String>,
    /// Only objects whose labels match (kubectl syntax).
    #[arg(short = 'l', long)]
    pub selector: Option<String>,
    /// Only these kinds (Kind, plural or plural.group); repeatable or comma-separated.
    #[arg(long = "include-kind", value_delimiter = ',')]
    pub include_kinds: Vec<String>,
    /// Leave out these kinds; repeatable or comma-separated.
    #[arg(long = "exclude-kind", value_delimiter = ',')]
    pub exclude_kinds: Vec<String>,
    /// Only this object, as Kind/namespace/name or Kind/name; repeatable.
    #[arg(long = "object", value_name = "KIND/NS/NAME")]
    pub objects: Vec<String>,
}

/// How a restore writes into the target.
#[derive(Debug, Args, Clone)]
pub struct RestoreWriteArgs {
    /// Restore namespace OLD as NEW, with every reference following; repeatable.
    #[arg(long = "namespace-mapping", value_name = "OLD=NEW")]
    pub namespace_mapping: Vec<String>,
    /// What to do with objects that already exist in the target: skip,
    /// update (server-side apply), fail (in preflight), or recreate (delete
    /// and create the snapshot's objects; objects they own are kept).
    #[arg(long, value_enum, default_value_t = crate::restore::ExistingPolicy::Update)]
    pub existing: crate::restore::ExistingPolicy,
    /// With --existing recreate, also delete and recreate existing
    /// Namespaces, CustomResourceDefinitions, PersistentVolumeClaims and
    /// PersistentVolumes. Deleting one deletes everything in it (every
    /// object of the namespace, every custom resource of the CRD, the
    /// volume's data), including what is not in the snapshot; the plan
    /// lists each. Without it, they are updated instead. Objects that come
    /// only because selected objects need them (the Namespace of
    /// `--include-kind ConfigMap`) are never deleted, and a claim a Pod
    /// mounts is refused in preflight.
    #[arg(long)]
    pub recreate_cascading: bool,
    /// Print the restore plan and a diff against the target; write nothing
    /// (writes are validated with a server-side dry run).
    #[arg(long)]
    pub dry_run: bool,
    /// Writes running at once within a wave.
    #[arg(long, default_value_t = 16)]
    pub restore_concurrency: usize,
    /// Rewrite the objects with this transform plan on the way in (see
    /// `ferry transform --help`); the rules see the target's live profile.
    #[arg(long, value_name = "PLAN")]
    pub transform: Option<PathBuf>,
    /// Restore PersistentVolumeClaims without their volume data.
    #[arg(long)]
    pub no_volume_data: bool,
    #[command(flatten)]
    pub mover: MoverArgs,
}

/// How a backup protects the data of PersistentVolumeClaims.
#[derive(Debug, Args, Clone)]
#[command(next_help_heading = "Volume data")]
pub struct VolumeArgs {
    /// How volume data is protected: auto (snapshot-move where the CSI
    /// driver has a VolumeSnapshotClass, else copy; with a local repository,
    /// snapshot or skip), snapshot (a CSI snapshot kept in the cluster),
    /// snapshot-move (a CSI snapshot copied into the repository by a mover
    /// Pod, then deleted), copy (the live volume copied between the hooks),
    /// skip. A claim's or StorageClass's backup.ferry.dev/volume-method
    /// annotation overrides it.
    #[arg(long, value_enum, default_value_t = crate::mover::VolumeMethod::Auto)]
    pub volume_method: crate::mover::VolumeMethod,
    /// The method for claims of one StorageClass, CLASS=METHOD; repeatable.
    #[arg(long = "volume-method-for-class", value_name = "CLASS=METHOD", value_parser = parse_key_value)]
    pub volume_method_for_class: Vec<(String, String)>,
    /// Do not run the pre- and post-backup hooks declared on Pods
    /// (pre.hook.backup.ferry.dev/command and Velero's pre.hook.backup.velero.io/command).
    #[arg(long)]
    pub no_hooks: bool,
    /// Snapshot each StatefulSet's claims one by one. By default the
    /// snapshotted claims of a StatefulSet (two or more, one CSI driver
    /// with a VolumeGroupSnapshotClass) are taken by one VolumeGroupSnapshot,
    /// at one instant, when the StatefulSet's selector selects exactly them.
    #[arg(long)]
    pub no_auto_volume_groups: bool,
    #[command(flatten)]
    pub mover: MoverArgs,
}

/// Mover Pods: the Ferry image copying volume data in the cluster.
#[derive(Debug, Args, Clone)]
#[command(next_help_heading = "Volume data")]
pub struct MoverArgs {
    /// Image of the mover Pods (this version of Ferry).
    #[arg(long, env = "FERRY_MOVER_IMAGE", default_value = concat!("ghcr.io/ferry-dev/ferry:", env!("CARGO_PKG_VERSION")))]
    pub mover_image: String,
    /// The S3 endpoint as mover Pods reach it, when it differs from --s3-endpoint.
    #[arg(long, env = "FERRY_MOVER_S3_ENDPOINT")]
    pub mover_s3_endpoint: Option<String>,
    /// Longest wait for one snapshot or mover Pod.
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    pub mover_timeout: std::time::Duration,
    /// Mover Pods running at once.
    #[arg(long, default_value_t = 4)]
    pub mover_concurrency: usize,
    /// Mover Pods running at once on one node, counting those of every
    /// backup and restore (0: no bound). The scheduler holds the others
    /// Pending until a slot of the node is free.
    #[arg(long, default_value_t = 2)]
    pub mover_concurrency_per_node: usize,
    /// Compute resources each mover Pod requests, RESOURCE=QUANTITY,...
    /// (cpu, memory, ephemeral-storage; "none" for none).
    #[arg(long, value_name = "LIST", default_value = crate::mover::DEFAULT_MOVER_REQUESTS, value_parser = crate::mover::parse_resource_list)]
    pub mover_requests: std::collections::BTreeMap<String, String>,
    /// The most each mover Pod may use, RESOURCE=QUANTITY,... ("none" for
    /// none: a namespace's LimitRange then sets its defaults). A mover
    /// killed for memory (OOMKilled) needs more here.
    #[arg(long, value_name = "LIST", default_value = crate::mover::DEFAULT_MOVER_LIMITS, value_parser = crate::mover::parse_resource_list)]
    pub mover_limits: std::collections::BTreeMap<String, String>,
    /// NAMESPACE/NAME of a ServiceAccount that may get VolumeSnapshots:
    /// Ferry mints its tokens (TokenRequest) for a CSI driver's snapshot
    /// metadata service, and movers then read only the changed blocks of
    /// block-mode volumes. Without it, block volumes are read whole.
    #[arg(
        long,
        env = "FERRY_SNAPSHOT_METADATA_ACCOUNT",
        value_name = "NAMESPACE/NAME"
    )]
    pub snapshot_metadata_account: Option<crate::mover::metadata::ServiceAccountRef>,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Snapshot name (the newest of that name), full id, or at least 8
    /// characters of its id. Not with --plan, which names its snapshot.
    #[arg(required_unless_present = "plan")]
    pub snapshot: Option<String>,
    /// Apply exactly this saved plan (`ferry restore SNAPSHOT --dry-run -o
    /// json > plan.json`); refused when the target changed since it was made.
    #[arg(long, value_name = "PLAN.json", conflicts_with_all = ["snapshot", "dry_run", "target_profile", "transform", "namespace_mapping", "existing", "recreate_cascading"])]
    pub plan: Option<PathBuf>,
    /// With --dry-run: plan against this saved cluster profile instead of a
    /// live cluster (`ferry cluster profile -o json > p.json`); no cluster is contacted.
    #[arg(long, value_name = "PROFILE.json", requires = "dry_run")]
    pub target_profile: Option<PathBuf>,
    /// Rewrite the objects with the transform plan recorded in the snapshot
    /// for restores at the disaster-recovery site (a BackupPolicy's
    /// `spec.transform`); see `ferry backup describe`.
    #[arg(long, conflicts_with_all = ["plan", "transform"])]
    pub recorded_transform: bool,
    #[command(flatten)]
    pub repo: RepoArgs,
    #[command(flatten)]
    pub options: RestoreOptionsArgs,
    #[command(flatten)]
    pub write: RestoreWriteArgs,
    #[arg(short, long, value_enum, default_value_t)]
    pub output: OutputFormat,
}

/// How `ferry transform` writes its result.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum ManifestFormat {
    /// Multi-document YAML on stdout.
    #[default]
    Yaml,
    /// A JSON List on stdout.
    Json,
    /// One YAML file per object under --output-dir (NAMESPACE/KIND-NAME.yaml).
    Dir,
    /// Like dir, plus a kustomization.yaml listing every file.
    Kustomize,
}

#[derive(Debug, Args)]
pub struct TransformArgs {
    /// Snapshot name (the newest of that name), full id, or at least 8 characters of its id.
    #[arg(required_unless_present = "list")]
    pub snapshot: Option<String>,
    /// The transform plan (YAML).
    #[arg(short, long, value_name = "PLAN", required_unless_present = "list")]
    pub plan: Option<PathBuf>,
    /// The target's cluster profile, saved with `ferry cluster profile`.
    #[arg(long, value_name = "FILE", conflicts_with = "context")]
    pub target_profile: Option<PathBuf>,
    /// Print every change (rule set, object, path, old -> new) instead of manifests.
    #[arg(long)]
    pub diff: bool,
    /// List the built-in rule sets and their documentation.
    #[arg(long)]
    pub list: bool,
    /// Output: yaml, json, dir or kustomize.
    #[arg(short, long, value_enum, default_value_t)]
    pub output: ManifestFormat,
    /// Directory for -o dir and -o kustomize.
    #[arg(long, value_name = "DIR", required_if_eq_any([("output", "dir"), ("output", "kustomize")]))]
    pub output_dir: Option<PathBuf>,
    /// Move namespace OLD to NEW before the plan runs; repeatable.
    #[arg(long = "namespace-mapping", value_name = "OLD=NEW")]
    pub namespace_mapping: Vec<String>,
    #[command(flatten)]
    pub options: RestoreOptionsArgs,
    #[command(flatten)]
    pub repo: RepoArgs,
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Source kubeconfig context.
    #[arg(long)]
    pub from: String,
    /// Target kubeconfig context.
    #[arg(long)]
    pub to: String,
    /// Kubeconfig of the target, when it is not in the source's kubeconfig.
    #[arg(long)]
    pub to_kubeconfig: Option<PathBuf>,
    #[command(flatten)]
    pub selection: SelectionArgs,
    /// Name of the snapshot to keep (default: a temporary one in a
    /// temporary repository, deleted afterwards).
    #[arg(long)]
    pub snapshot: Option<String>,
    #[command(flatten)]
    pub repo: RepoArgs,
    #[command(flatten)]
    pub write: RestoreWriteArgs,
    /// Output: the backup's report then the restore's (text), or one
    /// document with `backup`, `plan` and `report` (yaml, json).
    #[arg(short, long, value_enum, default_value_t)]
    pub output: OutputFormat,
}

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Back up a directory, a block device or a disk image file: data is
    /// cut into content-defined chunks, deduplicated against everything in
    /// the repository, compressed and encrypted; metadata (mode, owner,
    /// times, links, xattrs, holes) is kept.
    #[command(
        after_help = "The newest volume snapshot of the same source (HOST:DIR unless \
--source says otherwise) is the parent: a file whose size, modification time, change time and \
inode are unchanged since it is taken over without being read. --ignore-inode compares size \
and modification time only, for directories that are fresh copies each time (a volume made \
from a snapshot).\n\n\
A block device or a disk image file is backed up whole, as a block volume: every byte is read \
(chunks already in the repository are not stored again) and zeroed regions store nothing. \
`ferry volume restore` writes it back into a block device of at least its size, or into an \
image file.\n\n\
--changed-blocks FILE names the byte ranges of the device that changed since the snapshot the \
parent read (from the storage system's changed-block tracking: an LVM thin or qemu dirty \
bitmap, a cloud's snapshot diff): only they, and the chunks around them, are read; the rest is \
taken over from the parent unread, and the result is the same as a full read. The ranges must \
cover every change; a parent that does not fit the device (another size, chunks pruned) is \
reported and the device is read whole. --allocated-blocks FILE names the ranges that hold data \
(a thin volume's allocated extents): only they are read, the rest is stored as holes.\n\n\
Examples:\n  \
  ferry volume backup /var/lib/postgresql --repo /backups\n  \
  ferry volume backup /data --repo s3://bucket/ferry --name data-nightly -o json\n  \
  ferry volume backup /dev/vdb --repo /backups --name vm-disk\n  \
  ferry volume backup /dev/vdb --repo /backups --name vm-disk --changed-blocks ranges.txt"
    )]
    Backup {
        /// The directory, block device or disk image file to back up.
        #[arg(value_name = "DIR|DEVICE")]
        dir: std::path::PathBuf,
        #[command(flatten)]
        repo: RepoArgs,
        /// Name of the snapshot (default: the directory's name).
        #[arg(long)]
        name: Option<String>,
        /// What the backup is of, for finding its parent next time (default: HOST:DIR).
        #[arg(long)]
        source: Option<String>,
        /// Parent snapshot (name or id) instead of the newest of the same source.
        #[arg(long, conflicts_with = "no_parent")]
        parent: Option<String>,
        /// Read every file, even unchanged ones.
        #[arg(long)]
        no_parent: bool,
        /// Compare files with the parent by size and modification time only.
        #[arg(long)]
        ignore_inode: bool,
        /// For a device: the ranges that changed since the parent's
        /// snapshot, one `OFFSET LENGTH` (bytes) per line; `-` reads
        /// standard input. Only they are read.
        #[arg(long, value_name = "FILE", conflicts_with = "no_parent")]
        changed_blocks: Option<std::path::PathBuf>,
        /// For a device: the ranges that hold data, one `OFFSET LENGTH`
        /// (bytes) per line (`-`: standard input); the rest reads as zeros
        /// and is not read. No parent is used.
        #[arg(long, value_name = "FILE", conflicts_with_all = ["changed_blocks", "parent"])]
        allocated_blocks: Option<std::path::PathBuf>,
        /// For a device in a mover Pod: ask the CSI snapshot metadata
        /// service at ADDRESS (token and CA in the environment) which
        /// blocks of --target-snapshot changed since --base-snapshot-handle
        /// (with a parent), else which hold data.
        #[arg(
            long,
            hide = true,
            value_name = "ADDRESS",
            conflicts_with_all = ["changed_blocks", "allocated_blocks"],
            requires = "target_snapshot"
        )]
        snapshot_metadata: Option<String>,
        #[arg(long, hide = true)]
        base_snapshot_handle: Option<String>,
        /// NAMESPACE/NAME of the VolumeSnapshot the device was made from.
        #[arg(long, hide = true)]
        target_snapshot: Option<String>,
        /// Label for the snapshot, KEY=VALUE; repeatable.
        #[arg(long = "label", value_parser = parse_key_value)]
        labels: Vec<(String, String)>,
        /// Store the data but write no snapshot; print the volume root's blob
        /// id (what mover Pods do: the application backup references it).
        #[arg(long, hide = true)]
        root_only: bool,
        /// The parent as a volume root blob (of an application snapshot's volume).
        #[arg(long, hide = true, conflicts_with_all = ["parent", "no_parent"])]
        parent_root: Option<String>,
        /// Also write the result (JSON) to this file: a mover Pod's termination message.
        #[arg(long, hide = true)]
        result_file: Option<std::path::PathBuf>,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Restore a volume snapshot (or one path of it) into a directory; a
    /// block volume into a block device or an image file.
    #[command(
        after_help = "SNAPSHOT:PATH restores one directory or file of the snapshot. \
Existing files of the same names in DIR are replaced; other files are left alone. Owners are \
restored when running as root.\n\n\
SNAPSHOT may also be an application snapshot: the data of one of its volumes (moved into the \
repository by a mover) is restored here, on this machine, with no cluster: --claim names the \
volume when the snapshot has several.\n\n\
A block volume (the backup of a device) is written into TARGET when it is a block device at \
least as large as the volume: every byte up to the volume's size is written or zeroed. Any \
other TARGET that is not a directory becomes an image file of the volume (holes where it was \
zero); into a directory it is restored as the file `device`.\n\n\
Examples:\n  \
  ferry volume restore data-nightly /restore/data\n  \
  ferry volume restore latest /restore/newest\n  \
  ferry volume restore data-nightly:/etc/app/config.yaml /tmp/config\n  \
  ferry volume restore vm-disk /dev/vdc\n  \
  ferry volume restore vm-disk /tmp/vm-disk.img\n  \
  ferry volume restore orders-1:/base --claim orders/data-db-0 /tmp/pg-base"
    )]
    Restore {
        /// Snapshot name or id (a name means its newest snapshot; `latest`
        /// the newest volume snapshot), optionally followed by :PATH.
        snapshot: String,
        /// Where to restore: a directory (created if missing); for a block
        /// volume, a block device or an image file.
        #[arg(value_name = "TARGET")]
        dir: std::path::PathBuf,
        /// The volume of an application snapshot (`ferry backup create`) to
        /// restore, as NAMESPACE/CLAIM; not needed when it has only one.
        #[arg(long, value_name = "NAMESPACE/CLAIM")]
        claim: Option<String>,
        #[command(flatten)]
        repo: RepoArgs,
        /// Restore from this volume root blob (of an application snapshot's
        /// volume) instead of a volume snapshot.
        #[arg(long, hide = true)]
        root: Option<String>,
        /// Also write the result (JSON) to this file.
        #[arg(long, hide = true)]
        result_file: Option<std::path::PathBuf>,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Measure what this machine's CPUs allow the data mover: chunk, hash,
    /// compress and seal the files under DIR (read into memory first) on
    /// every core, with no disk and no repository writes.
    Limit {
        dir: std::path::PathBuf,
        #[command(flatten)]
        repo: RepoArgs,
        /// Read at most this many MiB of the files.
        #[arg(long, default_value_t = 1024)]
        max_mib: u64,
        /// Threads (default: one per core).
        #[arg(long)]
        threads: Option<usize>,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// List the volume snapshots of a repository.
    List {
        #[command(flatten)]
        repo: RepoArgs,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
}

fn parse_cipher(value: &str) -> Result<crate::repo::Cipher, String> {
    value.parse()
}
