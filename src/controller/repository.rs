//! Repository resources: opening the repository they describe with the
//! Secrets they name, and reporting whether it is reachable.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use zeroize::Zeroizing;

use super::crd::{Repository as RepositoryResource, RepositoryStatus, SecretRef};
use super::{Context, ControllerError, now_rfc3339, patch_status};
use crate::repo::{
    Backend, KeySource, LocalBackend, Location, Repository, S3Backend, S3Credentials, S3Location,
    parse_location,
};

/// A repository opened for the controller, with what mover Pods need to
/// reach it too.
#[derive(Clone)]
pub struct Opened {
    pub repo: Repository,
    pub mover: crate::mover::MoverSettings,
}

/// Opened repositories, by what they were opened from (the Repository's
/// generation and its Secrets' resourceVersions): opening derives the key from the
/// password, which is slow on purpose, and a handle remembers snapshot
/// manifests it has read.
pub type OpenedCache = tokio::sync::Mutex<std::collections::HashMap<String, Opened>>;

async fn secret_data(
    ctx: &Context,
    reference: &SecretRef,
) -> Result<BTreeMap<String, Vec<u8>>, ControllerError> {
    Ok(secret(ctx, reference).await?.1)
}

/// A Secret's data and resourceVersion.
async fn secret(
    ctx: &Context,
    reference: &SecretRef,
) -> Result<(String, BTreeMap<String, Vec<u8>>), ControllerError> {
    let namespace = reference
        .namespace
        .clone()
        .unwrap_or_else(|| ctx.options.namespace.clone());
    let api: Api<Secret> = Api::namespaced(ctx.conn.client.clone(), &namespace);
    let secret = api.get(&reference.name).await.map_err(|e| {
        ControllerError::Other(format!(
            "reading Secret {namespace}/{}: {e}",
            reference.name
        ))
    })?;
    Ok((
        secret.metadata.resource_version.clone().unwrap_or_default(),
        secret
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect(),
    ))
}

/// Opens the Repository named `name` (creating it when it says so).
pub async fn open(ctx: &Context, name: &str) -> Result<Opened, ControllerError> {
    let api: Api<RepositoryResource> = Api::all(ctx.conn.client.clone());
    let resource = api.get_opt(name).await?.ok_or_else(|| {
        ControllerError::Other(format!(
            "Repository {name} does not exist (`kubectl get repositories.ferry.dev`)"
        ))
    })?;
    open_resource(ctx, &resource).await
}

pub async fn open_resource(
    ctx: &Context,
    resource: &RepositoryResource,
) -> Result<Opened, ControllerError> {
    let mut versions = vec![
        resource.name_any(),
        // The spec's generation: status updates do not change it.
        resource.metadata.generation.unwrap_or_default().to_string(),
        secret(ctx, &resource.spec.key_secret).await?.0,
    ];
    if let Some(credentials) = &resource.spec.credentials_secret {
        versions.push(secret(ctx, credentials).await?.0);
    }
    let key = versions.join("/");
    let mut opened = ctx.repositories.lock().await;
    if let Some(found) = opened.get(&key) {
        return Ok(found.clone());
    }
    let fresh = open_uncached(ctx, resource).await?;
    fresh.repo.remember_written_files();
    // One handle per Repository: older versions of it are dropped.
    let prefix = format!("{}/", resource.name_any());
    opened.retain(|k, _| !k.starts_with(&prefix));
    opened.insert(key, fresh.clone());
    Ok(fresh)
}

async fn open_uncached(
    ctx: &Context,
    resource: &RepositoryResource,
) -> Result<Opened, ControllerError> {
    let name = resource.name_any();
    let spec = &resource.spec;
    let fail = |what: String| ControllerError::Other(format!("Repository {name}: {what}"));
    let key_data = secret_data(ctx, &spec.key_secret).await?;
    let key_origin = format!("Secret {}", spec.key_secret.name);
    let key = if let Some(password) = key_data.get("password") {
        let text = String::from_utf8(password.clone())
            .map_err(|_| fail(format!("{key_origin}: key `password` is not UTF-8")))?;
        KeySource::Password(Zeroizing::new(
            text.trim_end_matches(['\n', '\r']).to_string(),
        ))
    } else if let Some(bytes) = key_data.get("key") {
        KeySource::KeyBytes {
            bytes: Zeroizing::new(bytes.clone()),
            origin: key_origin.clone(),
        }
    } else {
        return Err(fail(format!(
            "{key_origin} has neither a `password` nor a `key` entry"
        )));
    };
    let mut credentials = None;
    let mut secret_env: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    if let Some(reference) = &spec.credentials_secret {
        let data = secret_data(ctx, reference).await?;
        let text = |k: &str| {
            data.get(k)
                .map(|v| String::from_utf8_lossy(v).trim().to_string())
        };
        match (text("AWS_ACCESS_KEY_ID"), text("AWS_SECRET_ACCESS_KEY")) {
            (Some(id), Some(secret)) => {
                credentials = Some(S3Credentials {
                    access_key_id: id,
                    secret_access_key: secret,
                    session_token: text("AWS_SESSION_TOKEN"),
                });
            }
            _ => {
                return Err(fail(format!(
                    "Secret {} needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
                    reference.name
                )));
            }
        }
        for k in [
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
        ] {
            if let Some(v) = data.get(k) {
                secret_env.insert(k.to_string(), v.clone());
            }
        }
    }
    let location = parse_location(&spec.location).map_err(|e| fail(e.to_string()))?;
    let mut env = BTreeMap::new();
    env.insert("FERRY_REPO".to_string(), spec.location.clone());
    let (backend, unreachable): (Arc<dyn Backend>, Option<String>) = match location {
        Location::Local(path) => (
            Arc::new(LocalBackend::new(path.clone())),
            Some(format!(
                "Repository {name} is a directory of the controller's Pod ({}) that mover Pods cannot reach; use an s3:// location to move volume data",
                path.display()
            )),
        ),
        Location::S3 { bucket, prefix } => {
            let backend = S3Backend::new(S3Location {
                bucket,
                prefix,
                endpoint: spec.s3_endpoint.clone(),
                region: spec.s3_region.clone(),
                path_style: spec.s3_endpoint.is_some(),
                credentials,
            })
            .await
            .map_err(|e| fail(e.to_string()))?;
            (Arc::new(backend), None)
        }
    };
    if let Some(endpoint) = spec.mover_s3_endpoint.clone().or(spec.s3_endpoint.clone()) {
        env.insert("FERRY_S3_ENDPOINT".into(), endpoint);
    }
    if let Some(region) = &spec.s3_region {
        env.insert("FERRY_S3_REGION".into(), region.clone());
    }
    match &key {
        KeySource::Password(p) => {
            secret_env.insert("FERRY_PASSWORD".into(), p.as_bytes().to_vec());
        }
        KeySource::KeyBytes { bytes, .. } => {
            secret_env.insert("FERRY_KEY".into(), bytes.to_vec());
        }
        KeySource::KeyFile(_) => {}
    }
    let repo = match Repository::open(backend.clone(), &key).await {
        Ok(repo) => repo,
        Err(crate::repo::RepoError::NotInitialized { .. }) if spec.initialize => {
            Repository::init(backend, &key)
                .await
                .map_err(|e| fail(e.to_string()))?
        }
        Err(e) => return Err(fail(e.to_string())),
    };
    Ok(Opened {
        repo,
        mover: crate::mover::MoverSettings {
            image: ctx.options.mover_image.clone(),
            env,
            secret: secret_env,
            unreachable,
            timeout: Duration::from_secs(600),
            concurrency: spec.mover_concurrency.map_or(2, |n| n.max(1) as usize),
            per_node: spec.mover_concurrency_per_node.map_or(2, |n| n as usize),
            resources: spec.mover_resources.clone().unwrap_or_default(),
            // The controller shows its own tokens: it may read every
            // VolumeSnapshot, which the snapshot metadata service checks.
            snapshot_metadata_account: Some(crate::mover::metadata::ServiceAccountRef {
                namespace: ctx.options.namespace.clone(),
                name: super::CONTROLLER_NAME.to_string(),
            }),
        },
    })
}

pub async fn reconcile(
    resource: Arc<RepositoryResource>,
    ctx: Arc<Context>,
) -> Result<Action, ControllerError> {
    let api: Api<RepositoryResource> = Api::all(ctx.conn.client.clone());
    let name = resource.name_any();
    let mut status = RepositoryStatus {
        last_check_time: Some(now_rfc3339()),
        ..Default::default()
    };
    let checked = async {
        let opened = open_resource(&ctx, &resource).await?;
        let snapshots = opened
            .repo
            .list_snapshots()
            .await
            .map_err(|e| ControllerError::Other(e.to_string()))?;
        let stats = opened
            .repo
            .stats()
            .await
            .map_err(|e| ControllerError::Other(e.to_string()))?;
        Ok::<_, ControllerError>((snapshots.len() as i64, stats.bytes as i64))
    }
    .await;
    match checked {
        Ok((snapshots, bytes)) => {
            status.reachable = Some(true);
            status.snapshots = Some(snapshots);
            status.size_bytes = Some(bytes);
            status.message = Some(format!("{snapshots} snapshot(s), {bytes} bytes of packs"));
        }
        Err(e) => {
            let was = resource.status.as_ref().and_then(|s| s.reachable);
            if was != Some(false) {
                ctx.event(&*resource, true, "Unreachable", e.to_string())
                    .await;
            }
            status.reachable = Some(false);
            status.message = Some(e.to_string());
        }
    }
    patch_status(&api, &name, &status).await?;
    Ok(Action::requeue(ctx.options.check_interval))
}
