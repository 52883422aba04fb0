//! Applying plain manifests (multi-document YAML) with server-side apply:
//! CRDs first, waiting until they are established so that the custom
//! resources after them apply. Used by the examples and tests to deploy
//! applications; restores go through [`crate::restore`], which plans.

use std::time::Duration;

use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::{Scope, pinned_kind};
use serde::Deserialize;
use serde_json::Value;

use super::ClusterError;
use crate::model::ObjectRef;

/// How long a kind a CRD just defined may take to be served.
const SERVED_WITHIN: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("document {index} of the manifest is not valid YAML: {message}")]
    Yaml { index: usize, message: String },
    #[error("document {index} of the manifest is not a Kubernetes object: {message}")]
    NotAnObject { index: usize, message: String },
    #[error("{object}: the cluster does not serve {api_version} {kind}: {message}")]
    NotServed {
        object: String,
        api_version: String,
        kind: String,
        message: String,
    },
    #[error("applying {object} failed: {source}")]
    Apply {
        object: String,
        #[source]
        source: kube::Error,
    },
    #[error("{0} was not established within 30s")]
    NotEstablished(String),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

/// Parses a multi-document YAML manifest into objects.
pub fn parse_manifests(yaml: &str) -> Result<Vec<Value>, ApplyError> {
    let mut docs = Vec::new();
    for (index, doc) in serde_yaml_ng::Deserializer::from_str(yaml).enumerate() {
        let value = Value::deserialize(doc).map_err(|e| ApplyError::Yaml {
            index: index + 1,
            message: e.to_string(),
        })?;
        if value.is_null() {
            continue;
        }
        ObjectRef::from_object(&value).map_err(|e| ApplyError::NotAnObject {
            index: index + 1,
            message: e.to_string(),
        })?;
        docs.push(value);
    }
    Ok(docs)
}

/// Applies every object of `yaml` with field manager `manager`.
pub async fn apply_manifests(
    client: &kube::Client,
    yaml: &str,
    manager: &str,
) -> Result<Vec<ObjectRef>, ApplyError> {
    let mut docs = parse_manifests(yaml)?;
    let is_crd = |v: &Value| v["kind"] == "CustomResourceDefinition";
    docs.sort_by_key(|v| !is_crd(v));
    let params = PatchParams::apply(manager).force();
    let mut applied = Vec::new();
    for doc in docs {
        let object = ObjectRef::from_object(&doc).expect("checked while parsing");
        let gvk = GroupVersionKind::gvk(&object.group, &object.version, &object.kind);
        let deadline = tokio::time::Instant::now() + SERVED_WITHIN;
        let (resource, caps) = loop {
            match pinned_kind(client, &gvk).await {
                Ok(found) => break found,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(ApplyError::NotServed {
                        object: object.to_string(),
                        api_version: object.api_version(),
                        kind: object.kind.clone(),
                        message: e.to_string(),
                    });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        };
        let api: Api<DynamicObject> = match &object.namespace {
            Some(ns) if caps.scope == Scope::Namespaced => {
                Api::namespaced_with(client.clone(), ns, &resource)
            }
            _ => Api::all_with(client.clone(), &resource),
        };
        api.patch(&object.name, &params, &Patch::Apply(&doc))
            .await
            .map_err(|source| ApplyError::Apply {
                object: object.to_string(),
                source,
            })?;
        if is_crd(&doc) {
            let deadline = tokio::time::Instant::now() + SERVED_WITHIN;
            loop {
                let established = api.get(&object.name).await.ok().is_some_and(|crd| {
                    crd.data["status"]["conditions"]
                        .as_array()
                        .is_some_and(|cs| {
                            cs.iter()
                                .any(|c| c["type"] == "Established" && c["status"] == "True")
                        })
                });
                if established {
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(ApplyError::NotEstablished(object.to_string()));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        applied.push(object);
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_parse_and_bad_documents_are_named() {
        let docs = parse_manifests("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n---\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: b}\n").unwrap();
        assert_eq!(docs.len(), 2);
        let err = parse_manifests("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n---\nkind: Secret\nmetadata: {name: b}\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "document 2 of the manifest is not a Kubernetes object: object has no apiVersion (metadata.name b)"
        );
        assert!(matches!(
            parse_manifests("a: [").unwrap_err(),
            ApplyError::Yaml { index: 1, .. }
        ));
    }
}
