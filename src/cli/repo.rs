//! Opening the repository a command names: location from `--repo`,
//! `FERRY_REPO` or the config file; key from a password file, a key file,
//! `FERRY_PASSWORD`, or a prompt on a terminal.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use serde::Deserialize;
use zeroize::Zeroizing;

use super::args::RepoArgs;
use crate::repo::{
    Backend, Cipher, KeySource, LocalBackend, Location, Repository, S3Backend, S3Location,
    parse_location,
};

/// `~/.config/ferry/config.yaml` (or `$FERRY_CONFIG`): defaults for flags
/// a user would otherwise repeat on every command.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigFile {
    pub repository: Option<String>,
    pub password_file: Option<PathBuf>,
    pub s3_endpoint: Option<String>,
    pub s3_region: Option<String>,
}

impl ConfigFile {
    pub fn load() -> anyhow::Result<Self> {
        let path = match std::env::var_os("FERRY_CONFIG") {
            Some(p) => PathBuf::from(p),
            None => match std::env::var_os("HOME") {
                Some(home) => PathBuf::from(home).join(".config/ferry/config.yaml"),
                None => return Ok(Self::default()),
            },
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_yaml_ng::from_str(&text)
                .with_context(|| format!("config file {} is not valid", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e).with_context(|| format!("reading config file {}", path.display())),
        }
    }
}

pub async fn backend(args: &RepoArgs) -> anyhow::Result<Arc<dyn Backend>> {
    Ok(match located_backend(args).await? {
        LocatedBackend::Local(local) => Arc::new(local),
        LocatedBackend::S3(s3) => Arc::new(s3),
    })
}

/// The repository's backend as its own type, for what only one kind does.
enum LocatedBackend {
    Local(LocalBackend),
    S3(S3Backend),
}

async fn located_backend(args: &RepoArgs) -> anyhow::Result<LocatedBackend> {
    let config = ConfigFile::load()?;
    let Some(location) = args.repo.clone().or(config.repository) else {
        bail!(
            "no repository given: pass --repo DIR or --repo s3://bucket/prefix, set FERRY_REPO, or set `repository:` in ~/.config/ferry/config.yaml"
        );
    };
    let location = parse_location(&location)?;
    Ok(match location {
        Location::Local(path) => LocatedBackend::Local(LocalBackend::new(path)),
        Location::S3 { bucket, prefix } => {
            let endpoint = args.s3_endpoint.clone().or(config.s3_endpoint);
            let path_style = args.s3_path_style.unwrap_or(endpoint.is_some());
            let region = args.s3_region.clone().or(config.s3_region);
            LocatedBackend::S3(
                S3Backend::new(S3Location {
                    bucket,
                    prefix,
                    endpoint,
                    region,
                    path_style,
                    credentials: None,
                })
                .await
                .context("setting up the S3 client")?,
            )
        }
    })
}

pub fn key_source(args: &RepoArgs, confirm: bool) -> anyhow::Result<KeySource> {
    if let Some(path) = &args.key_file {
        return Ok(KeySource::KeyFile(path.clone()));
    }
    let password_file = args
        .password_file
        .clone()
        .or_else(|| ConfigFile::load().ok().and_then(|c| c.password_file));
    if let Some(path) = password_file {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading password file {}", path.display()))?;
        let password = text.trim_end_matches(['\n', '\r']).to_string();
        if password.is_empty() {
            bail!("password file {} is empty", path.display());
        }
        return Ok(KeySource::Password(Zeroizing::new(password)));
    }
    if let Ok(password) = std::env::var("FERRY_PASSWORD") {
        if password.is_empty() {
            bail!(
                "FERRY_PASSWORD is set but empty: set it to the repository password, or unset it and use --password-file, --key-file or the prompt"
            );
        }
        return Ok(KeySource::Password(Zeroizing::new(password)));
    }
    if std::io::stdin().is_terminal() {
        let password = Zeroizing::new(rpassword::prompt_password("repository password: ")?);
        if password.is_empty() {
            bail!("the password is empty; a repository needs a password (or a key file)");
        }
        if confirm {
            let again = Zeroizing::new(rpassword::prompt_password("repeat password: ")?);
            if *again != *password {
                bail!("the passwords do not match");
            }
        }
        return Ok(KeySource::Password(password));
    }
    bail!("no repository key: pass --password-file or --key-file, or set FERRY_PASSWORD")
}

pub async fn open(args: &RepoArgs) -> anyhow::Result<Repository> {
    let backend = backend(args).await?;
    let key = key_source(args, false)?;
    Ok(Repository::open(backend, &key).await?)
}

/// Creates a repository; with `create_bucket`, first its S3 bucket if
/// there is none.
pub async fn init(
    args: &RepoArgs,
    cipher: Option<Cipher>,
    create_bucket: bool,
) -> anyhow::Result<Repository> {
    let backend: Arc<dyn Backend> = match located_backend(args).await? {
        LocatedBackend::Local(_) if create_bucket => {
            bail!(
                "--create-bucket is for s3:// repositories; a local directory is created as needed"
            )
        }
        LocatedBackend::Local(local) => Arc::new(local),
        LocatedBackend::S3(s3) => {
            if create_bucket && s3.create_bucket_if_missing().await? {
                eprintln!("created bucket {}", s3.bucket());
            }
            Arc::new(s3)
        }
    };
    let key = key_source(args, true)?;
    let cipher = cipher.unwrap_or_else(Cipher::preferred);
    Ok(Repository::init_with(backend, &key, cipher).await?)
}

/// Opens the repository and returns the key it was opened with (mover Pods
/// get it too).
pub async fn open_keyed(args: &RepoArgs) -> anyhow::Result<(Repository, KeySource)> {
    let backend = backend(args).await?;
    let key = key_source(args, false)?;
    Ok((Repository::open(backend, &key).await?, key))
}

/// How mover Pods reach the repository `args` names, unlocked by `key`.
pub fn mover_settings(
    args: &RepoArgs,
    key: &KeySource,
    mover: &super::args::MoverArgs,
) -> anyhow::Result<crate::mover::MoverSettings> {
    let config = ConfigFile::load()?;
    let location = args.repo.clone().or(config.repository).unwrap_or_default();
    let mut env = std::collections::BTreeMap::new();
    let mut secret = std::collections::BTreeMap::new();
    let unreachable = match parse_location(&location)? {
        Location::Local(path) => Some(format!(
            "the repository is a local directory ({}) that Pods cannot reach; use an s3:// repository to move volume data",
            path.display()
        )),
        Location::S3 { .. } => None,
    };
    env.insert("FERRY_REPO".to_string(), location);
    if let Some(endpoint) = mover
        .mover_s3_endpoint
        .clone()
        .or(args.s3_endpoint.clone())
        .or(config.s3_endpoint)
    {
        env.insert("FERRY_S3_ENDPOINT".into(), endpoint);
    }
    if let Some(region) = args.s3_region.clone().or(config.s3_region) {
        env.insert("FERRY_S3_REGION".into(), region);
    }
    // Failure points of test builds reach the movers too.
    if let Ok(points) = std::env::var("FERRY_FAILPOINTS") {
        env.insert("FERRY_FAILPOINTS".into(), points);
    }
    match key {
        KeySource::Password(p) => {
            secret.insert("FERRY_PASSWORD".to_string(), p.as_bytes().to_vec());
        }
        KeySource::KeyFile(path) => {
            let bytes = std::fs::read(path)
                .with_context(|| format!("reading key file {}", path.display()))?;
            secret.insert("FERRY_KEY".to_string(), bytes);
        }
        KeySource::KeyBytes { bytes, .. } => {
            secret.insert("FERRY_KEY".to_string(), bytes.to_vec());
        }
    }
    for var in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
    ] {
        if let Ok(value) = std::env::var(var) {
            secret.insert(var.to_string(), value.into_bytes());
        }
    }
    Ok(crate::mover::MoverSettings {
        image: mover.mover_image.clone(),
        env,
        secret,
        unreachable,
        timeout: mover.mover_timeout,
        concurrency: mover.mover_concurrency.max(1),
        per_node: mover.mover_concurrency_per_node,
        snapshot_metadata_account: mover.snapshot_metadata_account.clone(),
        resources: crate::mover::MoverResources {
            requests: mover.mover_requests.clone(),
            limits: mover.mover_limits.clone(),
        },
    })
}
