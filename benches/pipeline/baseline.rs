//! The baselines that bound each step, measured on the same objects with
//! the same concurrency as Ferry:
//! - raw paginated LIST of the collections a backup reads (bytes over
//!   HTTP, items counted but not decoded): what no backup can beat;
//! - raw parallel create (POST) of the objects a restore writes: what no
//!   restore can beat;
//! - JSON parse + serialize of the objects on every core: what no
//!   transform that reads and writes the objects can beat.

use anyhow::{Context, Result, anyhow, bail};
use futures::{StreamExt, TryStreamExt};
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::Value;

use ferry::cluster::discovery::{Discovery, ServedResource, discover};

#[derive(Deserialize)]
struct ListPage {
    metadata: ListMeta,
    items: Vec<IgnoredAny>,
}

#[derive(Deserialize)]
struct ListMeta {
    #[serde(rename = "continue", default)]
    continue_token: Option<String>,
}

/// Lists every collection across all namespaces, `page_size` items per
/// page, `concurrency` collections at once; returns the items seen.
pub async fn list_all(
    client: &kube::Client,
    collections: &[ServedResource],
    page_size: u32,
    concurrency: usize,
) -> Result<usize> {
    let counts: Vec<usize> = futures::stream::iter(collections)
        .map(|resource| async move {
            let mut items = 0;
            let mut token: Option<String> = None;
            loop {
                let mut url = format!("{}?limit={page_size}", resource.url_path(None));
                if let Some(t) = &token {
                    url.push_str("&continue=");
                    url.push_str(&percent(t));
                }
                let request = http::Request::get(&url).body(Vec::new())?;
                let text = client
                    .request_text(request)
                    .await
                    .with_context(|| format!("listing {}", resource.qualified_plural()))?;
                let page: ListPage = serde_json::from_str(&text).with_context(|| {
                    format!("reading a page of {}", resource.qualified_plural())
                })?;
                items += page.items.len();
                match page.metadata.continue_token.filter(|t| !t.is_empty()) {
                    Some(t) => token = Some(t),
                    None => break,
                }
            }
            Ok::<_, anyhow::Error>(items)
        })
        .buffer_unordered(concurrency.max(1))
        .try_collect()
        .await?;
    Ok(counts.iter().sum())
}

fn percent(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// What a raw create did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Created {
    pub created: usize,
    /// Objects the target already had (the test environment's own
    /// namespace, say); they count as done, as an `update` restore skips them.
    pub existing: usize,
    /// Writes sent again after a transient failure (throttled, timed out,
    /// connection lost); 0 in a healthy run.
    pub retries: usize,
}

/// Creates `objects` with POST, `concurrency` at once: Namespaces, then
/// CRDs (waiting until they are served), then everything else. Owner
/// references are dropped, since the owners' UIDs differ in the target.
pub async fn create_all(
    client: &kube::Client,
    objects: &[Value],
    concurrency: usize,
) -> Result<Created> {
    let tier = |o: &Value| match o["kind"].as_str() {
        Some("Namespace") => 0,
        Some("CustomResourceDefinition") => 1,
        _ => 2,
    };
    let mut total = Created::default();
    let mut discovery = discover(client).await?;
    for t in 0..3 {
        let batch: Vec<&Value> = objects.iter().filter(|o| tier(o) == t).collect();
        if t == 2 {
            // The CRDs just created must be in discovery.
            discovery = discover(client).await?;
        }
        // At most `concurrency` requests in flight, whatever N is.
        let results: Vec<(bool, usize)> = futures::stream::iter(batch.iter().copied())
            .map(|o| create_one(client, &discovery, o))
            .buffer_unordered(concurrency.max(1))
            .try_collect()
            .await?;
        for (created, retries) in results {
            if created {
                total.created += 1;
            } else {
                total.existing += 1;
            }
            total.retries += retries;
        }
        if t == 1 {
            for crd in &batch {
                wait_established(client, crd["metadata"]["name"].as_str().unwrap_or_default())
                    .await?;
            }
        }
    }
    Ok(total)
}

/// Attempts of one write before a transient failure counts as a failure.
const ATTEMPTS: usize = 6;

/// POSTs one object; `Ok(false)` when it already exists. Throttling (429),
/// server-side timeouts (500, 503, 504) and lost connections are retried
/// with backoff, up to [`ATTEMPTS`] times: a 100,000-object create on a
/// 2-core machine must not fail on one slow etcd write. A retried write
/// that had gone through before its answer was lost comes back 409 and
/// counts as existing. Returns whether it created, and the retries.
async fn create_one(
    client: &kube::Client,
    discovery: &Discovery,
    object: &Value,
) -> Result<(bool, usize)> {
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    let kind = object["kind"].as_str().unwrap_or_default();
    let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    let namespace = object["metadata"]["namespace"].as_str();
    let resource = discovery
        .by_group_kind(group, kind)
        .ok_or_else(|| anyhow!("the target does not serve {kind} ({api_version}) for {name}"))?;
    let mut body = object.clone();
    if let Some(meta) = body["metadata"].as_object_mut() {
        meta.remove("ownerReferences");
    }
    let body = serde_json::to_vec(&body)?;
    let mut attempt = 0;
    loop {
        let request = http::Request::post(resource.url_path(namespace))
            .header("content-type", "application/json")
            .body(body.clone())?;
        let error = match client.request_text(request).await {
            Ok(_) => return Ok((true, attempt)),
            Err(kube::Error::Api(status)) if status.code == 409 => return Ok((false, attempt)),
            Err(e) => e,
        };
        let transient = match &error {
            kube::Error::Api(status) => matches!(status.code, 429 | 500 | 503 | 504),
            kube::Error::HyperError(_) | kube::Error::Service(_) => true,
            _ => false,
        };
        attempt += 1;
        if !transient || attempt >= ATTEMPTS {
            bail!(
                "creating {kind} {}/{name} ({attempt} attempts): {error}",
                namespace.unwrap_or("")
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(250 << attempt.min(5))).await;
    }
}

async fn wait_established(client: &kube::Client, name: &str) -> Result<()> {
    let url = format!("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}");
    for _ in 0..300 {
        let text = client
            .request_text(http::Request::get(&url).body(Vec::new())?)
            .await?;
        let crd: Value = serde_json::from_str(&text)?;
        let established = crd["status"]["conditions"].as_array().is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "Established" && c["status"] == "True")
        });
        if established {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    bail!("CRD {name} was not established within 15 s")
}

/// Parses and re-serializes every document on all cores; returns the bytes written.
pub fn json_round_trip(documents: &[Vec<u8>]) -> usize {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = documents.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let workers: Vec<_> = documents
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || {
                    part.iter()
                        .map(|d| {
                            let value: Value =
                                serde_json::from_slice(d).expect("the documents are JSON");
                            serde_json::to_vec(&value)
                                .expect("a JSON value serializes")
                                .len()
                        })
                        .sum::<usize>()
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("a JSON worker panicked"))
            .sum()
    })
}
