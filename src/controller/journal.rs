//! The watch journal: between scheduled runs, a mirror of every protected
//! collection, kept current by a WATCH from the resourceVersion of a LIST.
//! A scheduled backup reads its collections from here instead of LISTing
//! them; with the capture cache it redoes only the objects that changed.
//!
//! The mirror holds, per object, its uid, resourceVersion and a stub for
//! selections; the whole object only until a backup has captured that
//! version. A watch that expires (410 Gone) or fails is followed by a new
//! LIST that replaces the collection's mirror, so an object deleted while
//! no watch ran is gone from it too; until that LIST is done, the
//! collection is not synced and backups LIST it themselves.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::StreamExt;
use kube::api::WatchParams;
use kube::core::WatchEvent;
use serde_json::Value;

use crate::cluster::capture::{Pager, set_type_meta};
use crate::cluster::discovery::ServedResource;
use crate::incremental::{CaptureCache, ObjectSource, SourceObject, Version, stub_of, version_of};

#[derive(Debug)]
struct Entry {
    namespace: Option<String>,
    resource_version: String,
    stub: Arc<Value>,
    /// The object itself, until a backup has captured this version.
    raw: Option<Arc<Value>>,
}

#[derive(Debug, Default)]
struct Mirror {
    synced: bool,
    /// By uid.
    objects: HashMap<String, Entry>,
}

#[derive(Debug)]
struct Collection {
    resource: ServedResource,
    mirror: RwLock<Mirror>,
    /// Whether LIST items of this resource carry apiVersion and kind; if
    /// not, watch events' are moved to where a LIST's would be put, so
    /// that both give the same bytes.
    typed_items: AtomicBool,
    /// Events since the first LIST.
    changes: AtomicU64,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Counters of a journal, for metrics and tests.
#[derive(Debug, Default)]
pub struct JournalCounters {
    pub events: AtomicU64,
    pub lists: AtomicU64,
    /// WATCHes that ended with 410 Gone (expired) and forced a new LIST.
    pub expired: AtomicU64,
    /// Collections a backup read from the journal instead of LISTing.
    pub served: AtomicU64,
    /// Collections whose watch is held by [`Journal::disconnect`].
    pub held: AtomicU64,
}

/// Mirrors of the collections one policy protects.
pub struct Journal {
    client: kube::Client,
    cache: Arc<CaptureCache>,
    collections: Mutex<BTreeMap<(String, String, String), Arc<Collection>>>,
    pub counters: Arc<JournalCounters>,
    hold: tokio::sync::watch::Sender<bool>,
    /// Namespaces whose objects the journal keeps whole until captured;
    /// of others it keeps stubs only. `None`: every namespace.
    interest: Arc<RwLock<Option<std::collections::BTreeSet<String>>>>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("collections", &self.collections)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl Journal {
    pub fn new(client: kube::Client, cache: Arc<CaptureCache>) -> Arc<Self> {
        Arc::new(Journal {
            client,
            cache,
            collections: Mutex::new(BTreeMap::new()),
            counters: Arc::default(),
            hold: tokio::sync::watch::channel(false).0,
            interest: Arc::default(),
        })
    }

    /// Keeps whole objects only of these namespaces (and cluster-scoped
    /// ones): the others' versions are never captured, so their bodies
    /// would stay in memory for nothing.
    pub fn keep_namespaces(&self, namespaces: Option<std::collections::BTreeSet<String>>) {
        *self.interest.write().unwrap_or_else(|e| e.into_inner()) = namespaces;
    }

    pub fn cache(&self) -> &Arc<CaptureCache> {
        &self.cache
    }

    /// Follows `resources` from now on (those followed already continue).
    pub fn follow(&self, resources: &[&ServedResource]) {
        let mut collections = self.collections.lock().unwrap_or_else(|e| e.into_inner());
        for resource in resources {
            let key = (
                resource.group.clone(),
                resource.version.clone(),
                resource.plural.clone(),
            );
            if collections.contains_key(&key) {
                continue;
            }
            let collection = Arc::new(Collection {
                resource: (*resource).clone(),
                mirror: RwLock::new(Mirror::default()),
                typed_items: AtomicBool::new(false),
                changes: AtomicU64::new(0),
                task: Mutex::new(None),
            });
            let task = tokio::spawn(follow(
                self.client.clone(),
                collection.clone(),
                self.cache.clone(),
                self.counters.clone(),
                self.hold.subscribe(),
                self.interest.clone(),
            ));
            *collection.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
            collections.insert(key, collection);
        }
    }

    /// Changes seen in a collection since it was first listed (`None`: not
    /// followed).
    pub fn changes_in(&self, group: &str, plural: &str) -> Option<u64> {
        let collections = self.collections.lock().unwrap_or_else(|e| e.into_inner());
        collections
            .iter()
            .find(|((g, _, p), _)| g == group && p == plural)
            .map(|(_, c)| c.changes.load(Ordering::Relaxed))
    }

    /// Whether every followed collection is mirrored.
    pub fn synced(&self) -> bool {
        let collections = self.collections.lock().unwrap_or_else(|e| e.into_inner());
        collections
            .values()
            .all(|c| c.mirror.read().unwrap_or_else(|e| e.into_inner()).synced)
    }

    /// Waits until every followed collection is mirrored.
    pub async fn wait_synced(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.synced() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }

    /// Objects whose current version no backup has captured yet.
    pub fn pending(&self) -> usize {
        let collections = self.collections.lock().unwrap_or_else(|e| e.into_inner());
        collections
            .values()
            .map(|c| {
                let mirror = c.mirror.read().unwrap_or_else(|e| e.into_inner());
                mirror.objects.values().filter(|e| e.raw.is_some()).count()
            })
            .sum()
    }

    /// After a backup: drops the bodies of versions the cache now has, and
    /// of namespaces no longer of interest.
    pub fn compact(&self) {
        let interest = self
            .interest
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let collections = self.collections.lock().unwrap_or_else(|e| e.into_inner());
        for collection in collections.values() {
            let mut mirror = collection.mirror.write().unwrap_or_else(|e| e.into_inner());
            for (uid, entry) in mirror.objects.iter_mut() {
                if entry.raw.is_some()
                    && (!interesting(&interest, entry.namespace.as_deref())
                        || self
                            .cache
                            .contains(&(uid.clone(), entry.resource_version.clone())))
                {
                    entry.raw = None;
                }
            }
        }
    }

    /// Drops every WATCH now and holds them until [`Journal::reconnect`],
    /// as a disconnection would. On reconnection each WATCH resumes from
    /// the last resourceVersion it saw; if the server no longer has it
    /// (etcd compacted meanwhile), it answers 410 Gone and the journal
    /// LISTs again. Tests force this interleaving; `counters.held` says
    /// when every collection has let go of its watch.
    pub fn disconnect(&self) {
        self.hold.send_replace(true);
    }

    pub fn reconnect(&self) {
        self.hold.send_replace(false);
    }

    /// Collections followed.
    pub fn len(&self) -> usize {
        self.collections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stops every watch.
    pub fn stop(&self) {
        let collections = self.collections.lock().unwrap_or_else(|e| e.into_inner());
        for collection in collections.values() {
            if let Some(task) = collection
                .task
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
            {
                task.abort();
            }
        }
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.stop();
    }
}

impl ObjectSource for Journal {
    fn objects(
        &self,
        resource: &ServedResource,
        namespace: Option<&str>,
    ) -> Option<Vec<SourceObject>> {
        let collection = {
            let collections = self.collections.lock().unwrap_or_else(|e| e.into_inner());
            collections
                .get(&(
                    resource.group.clone(),
                    resource.version.clone(),
                    resource.plural.clone(),
                ))
                .cloned()?
        };
        let mirror = collection.mirror.read().unwrap_or_else(|e| e.into_inner());
        if !mirror.synced {
            return None;
        }
        self.counters.served.fetch_add(1, Ordering::Relaxed);
        Some(
            mirror
                .objects
                .iter()
                .filter(|(_, e)| namespace.is_none() || e.namespace.as_deref() == namespace)
                .map(|(uid, e)| match &e.raw {
                    Some(raw) => SourceObject::Raw(raw.clone()),
                    None => SourceObject::Known {
                        version: (uid.clone(), e.resource_version.clone()),
                        stub: e.stub.clone(),
                    },
                })
                .collect(),
        )
    }
}

/// A whole collection and the resourceVersion to WATCH it from.
async fn list(
    client: &kube::Client,
    collection: &Collection,
) -> Result<(Vec<Value>, String), crate::cluster::ClusterError> {
    let mut pager = Pager::new(client, &collection.resource, None, None, 500);
    let mut items = Vec::new();
    while let Some(page) = pager.next_page().await? {
        items.extend(page);
    }
    if pager.items_had_type_meta {
        collection.typed_items.store(true, Ordering::Relaxed);
    }
    Ok((items, pager.list_resource_version.unwrap_or_default()))
}

type Interest = Arc<RwLock<Option<std::collections::BTreeSet<String>>>>;

fn interesting(
    interest: &Option<std::collections::BTreeSet<String>>,
    namespace: Option<&str>,
) -> bool {
    match (interest, namespace) {
        (None, _) | (_, None) => true,
        (Some(set), Some(ns)) => set.contains(ns),
    }
}

fn entry_of(value: Value, cache: &CaptureCache, interest: &Interest) -> Option<(String, Entry)> {
    let (uid, resource_version): Version = version_of(&value)?;
    let namespace = value
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .map(String::from);
    let wanted = interesting(
        &interest.read().unwrap_or_else(|e| e.into_inner()),
        namespace.as_deref(),
    );
    let cached = !wanted || cache.contains(&(uid.clone(), resource_version.clone()));
    Some((
        uid,
        Entry {
            namespace,
            resource_version,
            stub: Arc::new(stub_of(&value)),
            raw: (!cached).then(|| Arc::new(value)),
        },
    ))
}

/// The object of a watch event in the form a LIST gives it.
fn as_listed(collection: &Collection, mut value: Value) -> Value {
    if !collection.typed_items.load(Ordering::Relaxed)
        && let Some(map) = value.as_object_mut()
    {
        // shift_remove keeps the other keys in place: the bytes must be
        // those of the LIST's item.
        map.shift_remove("apiVersion");
        map.shift_remove("kind");
    }
    let resource = &collection.resource;
    set_type_meta(&mut value, &resource.api_version(), &resource.kind);
    value
}

/// LIST, then WATCH from the LIST's resourceVersion for as long as the
/// server keeps it; LIST again when it does not.
async fn follow(
    client: kube::Client,
    collection: Arc<Collection>,
    cache: Arc<CaptureCache>,
    counters: Arc<JournalCounters>,
    mut hold: tokio::sync::watch::Receiver<bool>,
    interest: Interest,
) {
    let resource = collection.resource.qualified_plural();
    let mut backoff = Duration::from_millis(200);
    loop {
        let (items, mut version) = match list(&client, &collection).await {
            Ok(listed) => listed,
            Err(e) => {
                tracing::warn!(%resource, error = %e, "journal: LIST failed; retrying");
                collection
                    .mirror
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .synced = false;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        counters.lists.fetch_add(1, Ordering::Relaxed);
        {
            let objects: HashMap<String, Entry> = items
                .into_iter()
                .filter_map(|v| entry_of(v, &cache, &interest))
                .collect();
            let mut mirror = collection.mirror.write().unwrap_or_else(|e| e.into_inner());
            mirror.objects = objects;
            mirror.synced = true;
        }
        backoff = Duration::from_millis(200);
        // WATCH until it expires or fails.
        loop {
            if *hold.borrow() {
                counters.held.fetch_add(1, Ordering::SeqCst);
                let _ = hold.wait_for(|h| !*h).await;
                counters.held.fetch_sub(1, Ordering::SeqCst);
            }
            let request = match kube::core::Request::new(collection.resource.url_path(None))
                .watch(&WatchParams::default().timeout(290), &version)
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(%resource, error = %e, "journal: cannot build a WATCH");
                    return;
                }
            };
            let stream = match client.request_events::<Value>(request).await {
                Ok(s) => s,
                Err(kube::Error::Api(status)) if status.code == 410 => {
                    counters.expired.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Err(e) => {
                    tracing::warn!(%resource, error = %e, "journal: WATCH failed; listing again");
                    break;
                }
            };
            let mut stream = std::pin::pin!(stream);
            let mut relist = false;
            loop {
                let event = tokio::select! {
                    event = stream.next() => event,
                    _ = hold.wait_for(|h| *h) => break,
                };
                let Some(event) = event else { break };
                let event = match event {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::debug!(%resource, error = %e, "journal: WATCH stream ended");
                        break;
                    }
                };
                counters.events.fetch_add(1, Ordering::Relaxed);
                if !matches!(event, WatchEvent::Bookmark(_)) {
                    collection.changes.fetch_add(1, Ordering::Relaxed);
                }
                match event {
                    WatchEvent::Added(value) | WatchEvent::Modified(value) => {
                        let value = as_listed(&collection, value);
                        if let Some(v) = value
                            .pointer("/metadata/resourceVersion")
                            .and_then(Value::as_str)
                        {
                            version = v.to_string();
                        }
                        if let Some((uid, entry)) = entry_of(value, &cache, &interest) {
                            collection
                                .mirror
                                .write()
                                .unwrap_or_else(|e| e.into_inner())
                                .objects
                                .insert(uid, entry);
                        }
                    }
                    WatchEvent::Deleted(value) => {
                        if let Some((uid, v)) = version_of(&value) {
                            version = v;
                            collection
                                .mirror
                                .write()
                                .unwrap_or_else(|e| e.into_inner())
                                .objects
                                .remove(&uid);
                        }
                    }
                    WatchEvent::Bookmark(bookmark) => {
                        version = bookmark.metadata.resource_version;
                    }
                    WatchEvent::Error(status) => {
                        if status.code == 410 {
                            counters.expired.fetch_add(1, Ordering::Relaxed);
                        } else {
                            tracing::warn!(%resource, error = %status.message, "journal: WATCH error; listing again");
                        }
                        relist = true;
                        break;
                    }
                }
            }
            if relist {
                break;
            }
        }
        // Until the LIST is done, backups LIST this collection themselves.
        collection
            .mirror
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .synced = false;
    }
}
