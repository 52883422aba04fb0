//! Capture: paginated LISTs (`limit`/`continue`) of one collection, retried
//! on transient errors, restarted when the continue token expires (410
//! Gone), one page in memory at a time.

use std::collections::HashSet;

use serde::Deserialize;
use serde_json::Value;

use super::ClusterError;
use super::discovery::ServedResource;
use super::retry::RetryPolicy;

/// Default page size: large enough to keep request overhead low, small
/// enough that a page of big objects stays a few MiB.
pub const DEFAULT_PAGE_SIZE: u32 = 500;

#[derive(Debug, Deserialize)]
struct RawList {
    #[serde(default)]
    metadata: RawListMeta,
    #[serde(default)]
    items: Vec<Value>,
}

#[derive(Debug, Default, Deserialize)]
struct RawListMeta {
    #[serde(default, rename = "continue")]
    continue_token: Option<String>,
    #[serde(default, rename = "resourceVersion")]
    resource_version: Option<String>,
}

/// Walks one collection page by page.
pub struct Pager<'a> {
    client: &'a kube::Client,
    resource: &'a ServedResource,
    namespace: Option<&'a str>,
    label_selector: Option<&'a str>,
    limit: u32,
    retry: RetryPolicy,
    continue_token: Option<String>,
    done: bool,
    /// Names already returned; only kept after a 410 restart forces a relist
    /// from the beginning, so that nothing is returned twice.
    seen: Option<HashSet<String>>,
    returned: Vec<String>,
    pub restarts: u32,
    /// The resourceVersion of the first page listed: a WATCH from it misses
    /// nothing the listing did not see (after a restart the later pages
    /// are newer, and their changes are replayed harmlessly).
    pub list_resource_version: Option<String>,
    /// Whether the API server's items carried apiVersion and kind (custom
    /// resources do; built-in kinds' list items do not).
    pub items_had_type_meta: bool,
}

impl<'a> Pager<'a> {
    pub fn new(
        client: &'a kube::Client,
        resource: &'a ServedResource,
        namespace: Option<&'a str>,
        label_selector: Option<&'a str>,
        limit: u32,
    ) -> Self {
        Pager {
            client,
            resource,
            namespace,
            label_selector,
            limit,
            retry: RetryPolicy::default(),
            continue_token: None,
            done: false,
            seen: None,
            returned: Vec::new(),
            restarts: 0,
            list_resource_version: None,
            items_had_type_meta: false,
        }
    }

    fn url(&self) -> String {
        let mut url = format!(
            "{}?limit={}",
            self.resource.url_path(self.namespace),
            self.limit
        );
        if let Some(selector) = self.label_selector {
            url.push_str("&labelSelector=");
            url.push_str(&encode(selector));
        }
        if let Some(token) = &self.continue_token {
            url.push_str("&continue=");
            url.push_str(&encode(token));
        }
        url
    }

    /// The next page of objects, each with `apiVersion` and `kind` set (list
    /// items of built-in kinds come without them), or `None` at the end.
    pub async fn next_page(&mut self) -> Result<Option<Vec<Value>>, ClusterError> {
        loop {
            if self.done {
                return Ok(None);
            }
            let url = self.url();
            let client = self.client;
            let result = self
                .retry
                .run(|| async {
                    let request = http::Request::get(&url)
                        .body(Vec::new())
                        .map_err(kube::Error::HttpError)?;
                    client.request::<RawList>(request).await
                })
                .await;
            let list = match result {
                Ok(list) => list,
                Err(kube::Error::Api(status))
                    if status.code == 410 && self.continue_token.is_some() =>
                {
                    // The continue token expired (the API server compacted
                    // the revision it pointed at). Relist from the start and
                    // skip what was already returned.
                    self.restarts += 1;
                    tracing::info!(resource = %self.resource.qualified_plural(), "continue token expired, relisting");
                    let seen = self.seen.get_or_insert_with(HashSet::new);
                    seen.extend(self.returned.drain(..));
                    self.continue_token = None;
                    continue;
                }
                Err(source) => {
                    return Err(ClusterError::List {
                        resource: self.resource.qualified_plural(),
                        namespace: self.namespace.map(String::from),
                        source,
                    });
                }
            };
            if self.list_resource_version.is_none() {
                self.list_resource_version = list.metadata.resource_version.clone();
            }
            self.continue_token = list.metadata.continue_token.filter(|t| !t.is_empty());
            self.done = self.continue_token.is_none();
            let api_version = self.resource.api_version();
            let mut items = Vec::with_capacity(list.items.len());
            for mut item in list.items {
                let key = item_key(&item);
                if self.seen.as_ref().is_some_and(|seen| seen.contains(&key)) {
                    continue;
                }
                if item.get("apiVersion").is_some() && item.get("kind").is_some() {
                    self.items_had_type_meta = true;
                }
                set_type_meta(&mut item, &api_version, &self.resource.kind);
                if self.seen.is_some() || !self.done {
                    self.returned.push(key);
                }
                items.push(item);
            }
            return Ok(Some(items));
        }
    }
}

fn item_key(item: &Value) -> String {
    let ns = item
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let name = item
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    format!("{ns}/{name}")
}

/// Percent-encodes a query value.
fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Lists a whole collection into memory: for small collections only.
pub async fn list_collection(
    client: &kube::Client,
    resource: &ServedResource,
    namespace: Option<&str>,
    label_selector: Option<&str>,
    limit: u32,
) -> Result<Vec<Value>, ClusterError> {
    let mut pager = Pager::new(client, resource, namespace, label_selector, limit);
    let mut all = Vec::new();
    while let Some(page) = pager.next_page().await? {
        all.extend(page);
    }
    Ok(all)
}

/// Reads one object, `None` when it does not exist.
pub async fn get_object(
    client: &kube::Client,
    resource: &ServedResource,
    namespace: Option<&str>,
    name: &str,
) -> Result<Option<Value>, ClusterError> {
    let url = format!("{}/{}", resource.url_path(namespace), encode(name));
    let result = RetryPolicy::default()
        .run(|| async {
            let request = http::Request::get(&url)
                .body(Vec::new())
                .map_err(kube::Error::HttpError)?;
            client.request::<Value>(request).await
        })
        .await;
    match result {
        Ok(mut obj) => {
            set_type_meta(&mut obj, &resource.api_version(), &resource.kind);
            Ok(Some(obj))
        }
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(None),
        Err(source) => Err(ClusterError::Get {
            object: match namespace {
                Some(ns) => format!("{}/{ns}/{name}", resource.kind),
                None => format!("{}/{name}", resource.kind),
            },
            source,
        }),
    }
}

/// Gives an object its `apiVersion` and `kind` (items of a LIST come
/// without them), first in the map so stored and printed objects read like
/// manifests.
/// An object a GET returned, in the byte form an item of a LIST of its
/// collection has (type meta first, apiVersion before kind), so that both
/// ways of reading it store the same blob.
pub(crate) fn as_list_item(obj: &mut Value, api_version: &str, kind: &str) {
    if let Some(map) = obj.as_object_mut() {
        map.shift_remove("apiVersion");
        map.shift_remove("kind");
    }
    set_type_meta(obj, api_version, kind);
}

pub(crate) fn set_type_meta(obj: &mut Value, api_version: &str, kind: &str) {
    let Some(map) = obj.as_object_mut() else {
        return;
    };
    if map.contains_key("apiVersion") && map.contains_key("kind") {
        return;
    }
    let mut ordered = serde_json::Map::with_capacity(map.len() + 2);
    ordered.insert(
        "apiVersion".into(),
        map.remove("apiVersion")
            .unwrap_or_else(|| Value::String(api_version.to_string())),
    );
    ordered.insert(
        "kind".into(),
        map.remove("kind")
            .unwrap_or_else(|| Value::String(kind.to_string())),
    );
    ordered.append(map);
    *map = ordered;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(encode("app in (a,b)"), "app%20in%20%28a%2Cb%29");
        assert_eq!(encode("eyJ2Ijoi=="), "eyJ2Ijoi%3D%3D");
    }

    #[test]
    fn collection_urls_follow_group_and_scope() {
        let deployments = ServedResource {
            group: "apps".into(),
            version: "v1".into(),
            kind: "Deployment".into(),
            plural: "deployments".into(),
            namespaced: true,
            verbs: vec!["list".into()],
        };
        assert_eq!(
            deployments.url_path(Some("prod")),
            "/apis/apps/v1/namespaces/prod/deployments"
        );
        assert_eq!(deployments.url_path(None), "/apis/apps/v1/deployments");
        let nodes = ServedResource {
            group: "".into(),
            kind: "Node".into(),
            plural: "nodes".into(),
            namespaced: false,
            ..deployments
        };
        assert_eq!(nodes.url_path(Some("ignored")), "/api/v1/nodes");
    }

    #[test]
    fn list_items_get_type_meta_first() {
        let mut item = serde_json::json!({"metadata": {"name": "a"}, "data": {"k": "v"}});
        set_type_meta(&mut item, "v1", "ConfigMap");
        let keys: Vec<&str> = item
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys, ["apiVersion", "kind", "metadata", "data"]);
        let mut full = serde_json::json!({"kind": "Secret", "apiVersion": "v1", "metadata": {}});
        set_type_meta(&mut full, "v1", "ConfigMap");
        assert_eq!(full["kind"], "Secret", "what the server said is kept");
    }
}
