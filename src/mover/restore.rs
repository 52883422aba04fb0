//! Filling restored claims with their data before anything mounts them:
//! the restore calls [`VolumeFiller`] after each wave, and a claim created
//! in that wave gets a mover Pod that restores its volume from the
//! repository. Workloads come in later waves, so they start on the data.

use std::collections::{BTreeMap, HashMap};

use futures::StreamExt;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};

use super::pods::{self, DATA, DEVICE, MoverJob};
use super::{MoverSettings, VolumeEntry, csi};
use crate::cluster::{Connection, api_message};
use crate::model::ObjectRef;
use crate::restore::{ANNOTATION_FILLING, Action, AfterWave};

pub struct VolumeFiller {
    /// The snapshot's volumes.
    pub entries: Vec<VolumeEntry>,
    /// Source namespace → target namespace.
    pub namespaces: BTreeMap<String, String>,
    pub mover: Option<MoverSettings>,
    /// Value of the mover label.
    pub label: String,
    /// Where the movers' progress goes.
    pub progress: Option<std::sync::Arc<super::MoverProgress>>,
}

impl VolumeFiller {
    /// Problems that would stop the restore at a claim's wave, found before
    /// anything is written: data kept only as another cluster's snapshot,
    /// or moved data with no mover able to reach the repository.
    pub fn preflight(&self, conn: &Connection, claims: &[(&ObjectRef, Action)]) -> Vec<String> {
        let mut problems = Vec::new();
        for (object, action) in claims {
            let Some(entry) = self.created_claim(object, *action) else {
                continue;
            };
            match (&entry.root, &entry.snapshot) {
                (None, Some(kept)) => problems.extend(kept_elsewhere(object, kept, conn)),
                (Some(_), _) => {
                    let why = match &self.mover {
                        None => Some("no mover is configured".to_string()),
                        Some(m) => m.unreachable.clone(),
                    };
                    if let Some(why) = why {
                        problems.push(format!(
                            "volume data of {object} cannot be restored: {why}; or restore with --no-volume-data"
                        ));
                    }
                }
                _ => {}
            }
        }
        problems
    }

    /// The volume of a claim the restore creates (or recreates).
    fn created_claim(&self, object: &ObjectRef, action: Action) -> Option<&VolumeEntry> {
        let is_claim = object.kind == "PersistentVolumeClaim" && object.group.is_empty();
        let created = matches!(action, Action::Create | Action::Recreate);
        (is_claim && created)
            .then(|| self.entry_for(object))
            .flatten()
    }

    fn entry_for(&self, claim: &ObjectRef) -> Option<&VolumeEntry> {
        let namespace = claim.namespace.as_deref()?;
        self.entries.iter().find(|e| {
            e.claim == claim.name
                && self.namespaces.get(&e.namespace).unwrap_or(&e.namespace) == namespace
        })
    }

    /// What becomes of the data of `object` when the restore has written
    /// it with `action`.
    async fn fate(
        &self,
        conn: &Connection,
        object: &ObjectRef,
        action: Action,
    ) -> Result<Fate<'_>, String> {
        if object.kind != "PersistentVolumeClaim" || !object.group.is_empty() {
            return Ok(Fate::NoVolume);
        }
        let Some(entry) = self.entry_for(object) else {
            return Ok(Fate::NoVolume);
        };
        if let Some(why) = &entry.skipped {
            return Ok(Fate::Without(format!(
                "{object}: restored without data; its volume was not backed up ({why})"
            )));
        }
        let fill = match action {
            Action::Create | Action::Recreate => true,
            // A claim an earlier run of a restore created and did not
            // finish filling.
            _ => entry.root.is_some() && self.still_filling(conn, object).await?,
        };
        Ok(if fill {
            Fate::Fill(entry)
        } else {
            Fate::Without(format!(
                "{object}: the claim exists in the target, so its data is not restored (delete it first, or restore with --existing recreate --recreate-cascading, which deletes it and the data it holds now)"
            ))
        })
    }

    /// What a dry run of `plan` says of volume data: the claims whose data
    /// the restore would not bring back, and why.
    pub async fn dry_run_warnings(
        &self,
        conn: &Connection,
        items: &[(&ObjectRef, Action)],
    ) -> Result<Vec<String>, String> {
        let mut warnings = Vec::new();
        for (object, action) in items {
            if let Fate::Without(why) = self.fate(conn, object, *action).await? {
                warnings.push(why);
            }
        }
        Ok(warnings)
    }

    /// Whether the live claim carries the mark of a fill not finished.
    async fn still_filling(&self, conn: &Connection, claim: &ObjectRef) -> Result<bool, String> {
        let namespace = claim.namespace.as_deref().unwrap_or_default();
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(conn.client.clone(), namespace);
        let live = claims
            .get_opt(&claim.name)
            .await
            .map_err(|e| format!("reading {claim}: {}", api_message(&e)))?;
        Ok(live
            .and_then(|c| c.metadata.annotations)
            .is_some_and(|a| a.contains_key(ANNOTATION_FILLING)))
    }

    /// Fills the claim and then takes its mark of a fill in progress off.
    async fn fill_and_unmark(
        &self,
        conn: &Connection,
        claim: &ObjectRef,
        entry: &VolumeEntry,
    ) -> Result<(), String> {
        self.fill(conn, claim, entry).await?;
        if entry.root.is_none() {
            return Ok(());
        }
        let namespace = claim.namespace.as_deref().unwrap_or_default();
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(conn.client.clone(), namespace);
        let unmark = Patch::Merge(json!({"metadata": {"annotations": {ANNOTATION_FILLING: null}}}));
        let params = PatchParams::default();
        crate::cluster::retry::RetryPolicy::default()
            .run(|| claims.patch(&claim.name, &params, &unmark))
            .await
            .map(|_| ())
            .map_err(|e| {
                format!(
                    "the data is in, but the mark {ANNOTATION_FILLING} stays: {}",
                    api_message(&e)
                )
            })
    }

    async fn fill(
        &self,
        conn: &Connection,
        claim: &ObjectRef,
        entry: &VolumeEntry,
    ) -> Result<(), String> {
        let namespace = claim.namespace.as_deref().unwrap_or_default();
        // A claim of a kept snapshot got it as its data source when created.
        let Some(root) = &entry.root else {
            return Ok(());
        };
        let mover = self.mover.as_ref().ok_or_else(|| {
            "no mover is configured to restore its data (the repository is not reachable from the cluster)".to_string()
        })?;
        if let Some(why) = &mover.unreachable {
            return Err(format!("its data cannot be restored: {why}"));
        }
        let args: Vec<String> = [
            "volume",
            "restore",
            "-",
            if entry.block { DEVICE } else { DATA },
            "--root",
            &root.to_string(),
            "-o",
            "json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let result = pods::run(
            &conn.client,
            mover,
            MoverJob {
                namespace,
                claim: &claim.name,
                read_only: false,
                block: entry.block,
                node: None,
                args,
                label: &self.label,
                progress: self.progress.as_ref().map(|p| p.track()),
                env: Vec::new(),
                secret: Vec::new(),
            },
        )
        .await;
        if let Some(progress) = &self.progress {
            progress
                .volumes_done
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        result.map(|_| ())
    }
}

/// What becomes of a restored object's volume data.
enum Fate<'a> {
    /// Not a claim with a volume in the snapshot.
    NoVolume,
    /// Filled from its entry before the workloads.
    Fill(&'a VolumeEntry),
    /// Left without the backed-up data, for the reason given.
    Without(String),
}

/// Why a snapshot kept in another cluster cannot fill `object` here.
fn kept_elsewhere(
    object: &ObjectRef,
    kept: &super::KeptSnapshot,
    conn: &Connection,
) -> Option<String> {
    (kept.server != conn.server).then(|| format!(
        "volume data of {object}: it was backed up only as CSI snapshot {} kept in cluster {}, which is not the target {}; back it up with --volume-method snapshot-move to restore it elsewhere, or restore with --no-volume-data",
        kept.volume_snapshot, kept.server, conn.server
    ))
}

#[async_trait::async_trait]
impl AfterWave for VolumeFiller {
    /// Claims whose data the backup holds lose the data source they were
    /// first made from (a VolumeSnapshot, another claim, a populator): the
    /// backup is their data now, and that source is usually not in the
    /// target, where the claim would stay Pending and hold up the restore.
    /// Claims whose data is a snapshot kept in this cluster are created
    /// from it: a VolumeSnapshot bound to the kept snapshot becomes their
    /// data source.
    async fn before_wave(
        &self,
        conn: &Connection,
        items: &[(ObjectRef, Action)],
    ) -> Result<HashMap<ObjectRef, Value>, String> {
        let mut patches = HashMap::new();
        for (object, action) in items {
            let Some(entry) = self.created_claim(object, *action) else {
                continue;
            };
            if entry.skipped.is_some() {
                continue;
            }
            let kept = match (&entry.root, &entry.snapshot) {
                (Some(_), _) => {
                    patches.insert(
                        object.clone(),
                        json!({
                            "metadata": {"annotations": {ANNOTATION_FILLING: "pending"}},
                            "spec": {"dataSource": null, "dataSourceRef": null},
                        }),
                    );
                    continue;
                }
                (None, Some(kept)) => kept,
                (None, None) => continue,
            };
            if let Some(problem) = kept_elsewhere(object, kept, conn) {
                return Err(problem);
            }
            let namespace = object.namespace.as_deref().unwrap_or_default();
            let name = format!(
                "ferry-{}",
                super::suffix(&[&self.label, namespace, &object.name])
            );
            let timeout = self
                .mover
                .as_ref()
                .map_or(std::time::Duration::from_secs(600), |m| m.timeout);
            csi::bind_kept(&conn.client, kept, namespace, &name, &self.label, timeout)
                .await
                .map_err(|e| format!("volume data of {object}: {e}"))?;
            patches.insert(
                object.clone(),
                json!({"spec": {"dataSourceRef": null, "dataSource": {
                    "apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": name
                }}}),
            );
        }
        Ok(patches)
    }

    async fn after_wave(
        &self,
        conn: &Connection,
        written: &[(ObjectRef, Action)],
    ) -> Result<Vec<String>, String> {
        let mut warnings = Vec::new();
        let mut to_fill: Vec<(ObjectRef, VolumeEntry)> = Vec::new();
        for (object, action) in written {
            match self.fate(conn, object, *action).await? {
                Fate::Fill(entry) => to_fill.push((object.clone(), entry.clone())),
                Fate::Without(why) => warnings.push(why),
                Fate::NoVolume => {}
            }
        }
        if let Some(progress) = &self.progress {
            progress.volumes_total.fetch_add(
                to_fill.iter().filter(|(_, e)| e.root.is_some()).count(),
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        if !to_fill.is_empty() {
            // Tests kill the process here: claims made and marked, not filled.
            crate::failpoint::stop_here("restore-before-fill").await;
        }
        let concurrency = self.mover.as_ref().map_or(1, |m| m.concurrency.max(1));
        let results: Vec<Result<(), String>> = futures::stream::iter(to_fill)
            .map(|(object, entry)| async move {
                self.fill_and_unmark(conn, &object, &entry)
                    .await
                    .map_err(|e| format!("volume data of {object}: {e}"))
            })
            .buffer_unordered(concurrency)
            .collect()
            .await;
        let failures: Vec<String> = results.into_iter().filter_map(Result::err).collect();
        if !failures.is_empty() {
            return Err(failures.join("; "));
        }
        Ok(warnings)
    }
}
