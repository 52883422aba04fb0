//! Discovery of every resource the API server serves: built-in groups,
//! CRDs and aggregated APIs, each at its preferred version, with scope and
//! verbs. A group whose discovery fails (an aggregated API whose backend is
//! down is the usual case) is reported, not fatal.

use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use super::ClusterError;

/// One resource type the API server serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServedResource {
    pub group: String,
    pub version: String,
    pub kind: String,
    /// The plural resource name used in URLs, e.g. `deployments`.
    pub plural: String,
    pub namespaced: bool,
    pub verbs: Vec<String>,
}

impl ServedResource {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `deployments.apps`, `configmaps`: the name kubectl users know.
    pub fn qualified_plural(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    pub fn can(&self, verb: &str) -> bool {
        self.verbs.iter().any(|v| v == verb)
    }

    /// The collection URL, in a namespace or across all of them.
    pub fn url_path(&self, namespace: Option<&str>) -> String {
        let base = if self.group.is_empty() {
            format!("/api/{}", self.version)
        } else {
            format!("/apis/{}/{}", self.group, self.version)
        };
        match namespace {
            Some(ns) if self.namespaced => format!("{base}/namespaces/{ns}/{}", self.plural),
            _ => format!("{base}/{}", self.plural),
        }
    }
}

/// What the API server serves.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Discovery {
    /// One entry per kind: at its group's preferred version, or (for kinds
    /// the preferred version does not serve, such as PodSecurityPolicy in
    /// policy/v1beta1) at the first version that serves it. Sorted by group
    /// and plural.
    pub resources: Vec<ServedResource>,
    /// Every served `groupVersion/Kind`, all versions included.
    pub served_kinds: std::collections::BTreeSet<String>,
    /// Every served groupVersion (not just the preferred ones), sorted.
    pub group_versions: Vec<String>,
    /// Groups whose discovery failed, with the reason.
    pub failures: Vec<(String, String)>,
}

impl Discovery {
    /// Finds the served resource for a group and kind (any version).
    pub fn by_group_kind(&self, group: &str, kind: &str) -> Option<&ServedResource> {
        self.resources
            .iter()
            .find(|r| r.group == group && r.kind == kind)
    }

    /// Whether `api_version` serves `kind`.
    pub fn serves(&self, api_version: &str, kind: &str) -> bool {
        self.served_kinds.contains(&format!("{api_version}/{kind}"))
    }
}

type ListResult =
    Result<k8s_openapi::apimachinery::pkg::apis::meta::v1::APIResourceList, kube::Error>;

/// Bounded: discovery is many small requests and the API server has
/// priority-and-fairness limits for them too.
const DISCOVERY_CONCURRENCY: usize = 8;

pub async fn discover(client: &kube::Client) -> Result<Discovery, ClusterError> {
    let core_versions =
        client
            .list_core_api_versions()
            .await
            .map_err(|source| ClusterError::Discovery {
                group_version: "v1".into(),
                source,
            })?;
    let groups = client
        .list_api_groups()
        .await
        .map_err(|source| ClusterError::Discovery {
            group_version: "apis".into(),
            source,
        })?;

    let mut group_versions: Vec<String> = core_versions.versions.clone();
    // (groupVersion to read, group name, rank): every version of every
    // group, rank 0 for the preferred one, then in the server's order.
    let mut to_read: Vec<(String, String, usize)> = Vec::new();
    for (rank, v) in core_versions.versions.iter().enumerate() {
        to_read.push((v.clone(), String::new(), rank));
    }
    for group in &groups.groups {
        let preferred = group
            .preferred_version
            .as_ref()
            .or(group.versions.first())
            .map(|p| p.group_version.clone());
        let mut rank = 1;
        for v in &group.versions {
            group_versions.push(v.group_version.clone());
            let r = if Some(&v.group_version) == preferred.as_ref() {
                0
            } else {
                rank += 1;
                rank
            };
            to_read.push((v.group_version.clone(), group.name.clone(), r));
        }
    }
    group_versions.sort();
    group_versions.dedup();

    let mut results: Vec<(String, String, usize, ListResult)> = futures::stream::iter(to_read)
        .map(|(gv, group, rank)| async move {
            let list = if group.is_empty() {
                client.list_core_api_resources(&gv).await
            } else {
                client.list_api_group_resources(&gv).await
            };
            Ok::<_, ClusterError>((gv, group, rank, list))
        })
        .buffer_unordered(DISCOVERY_CONCURRENCY)
        .try_collect()
        .await?;
    // Preferred versions first, so each kind is taken at the best version.
    results.sort_by(|a, b| (&a.1, a.2).cmp(&(&b.1, b.2)));

    let mut discovery = Discovery {
        group_versions,
        ..Default::default()
    };
    let mut seen: std::collections::BTreeSet<(String, String)> = std::collections::BTreeSet::new();
    for (gv, group, _, list) in results {
        match list {
            Ok(list) => {
                let version = gv.rsplit('/').next().unwrap_or(&gv).to_string();
                for r in list.resources {
                    // Subresources (deployments/scale, pods/log) are not objects.
                    if r.name.contains('/') {
                        continue;
                    }
                    discovery.served_kinds.insert(format!("{gv}/{}", r.kind));
                    if !seen.insert((group.clone(), r.kind.clone())) {
                        continue;
                    }
                    discovery.resources.push(ServedResource {
                        group: r
                            .group
                            .clone()
                            .filter(|g| !g.is_empty())
                            .unwrap_or_else(|| group.clone()),
                        version: r
                            .version
                            .clone()
                            .filter(|v| !v.is_empty())
                            .unwrap_or_else(|| version.clone()),
                        kind: r.kind,
                        plural: r.name,
                        namespaced: r.namespaced,
                        verbs: r.verbs,
                    });
                }
            }
            Err(e) => discovery
                .failures
                .push((gv, super::connect::error_chain(&e))),
        }
    }
    discovery
        .resources
        .sort_by(|a, b| (&a.group, &a.plural).cmp(&(&b.group, &b.plural)));
    discovery.failures.sort();
    Ok(discovery)
}
