//! Leader election with a `coordination.k8s.io` Lease, so that two
//! replicas never run the same backup: only the holder works. A Lease is
//! taken over when its record has not changed for its duration, measured
//! on this replica's clock (clocks of replicas need not agree), and every
//! write is conditional on the resourceVersion read.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease as LeaseObject, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::sync::watch;

pub const LEASE_DURATION: Duration = Duration::from_secs(15);
const RENEW_EVERY: Duration = Duration::from_secs(5);
const RETRY_EVERY: Duration = Duration::from_secs(2);

pub struct Lease {
    api: Api<LeaseObject>,
    name: String,
    identity: String,
}

impl Lease {
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str) -> Self {
        Lease {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            identity: identity.to_string(),
        }
    }

    fn now() -> MicroTime {
        MicroTime(k8s_openapi::jiff::Timestamp::now())
    }

    /// Waits until this replica holds the Lease.
    pub async fn acquire(&self) -> Result<(), kube::Error> {
        // The record last seen and when it was first seen unchanged.
        let mut observed: Option<(String, Instant)> = None;
        loop {
            match self.api.get_opt(&self.name).await? {
                None => {
                    let lease = LeaseObject {
                        metadata: ObjectMeta {
                            name: Some(self.name.clone()),
                            ..Default::default()
                        },
                        spec: Some(self.held_spec(0, None)),
                    };
                    match self.api.create(&PostParams::default(), &lease).await {
                        Ok(_) => return Ok(()),
                        Err(kube::Error::Api(s)) if s.code == 409 => {}
                        Err(e) => return Err(e),
                    }
                }
                Some(lease) => {
                    let spec = lease.spec.clone().unwrap_or_default();
                    let version = lease.metadata.resource_version.clone().unwrap_or_default();
                    let holder = spec.holder_identity.clone().unwrap_or_default();
                    let duration = spec
                        .lease_duration_seconds
                        .map_or(LEASE_DURATION, |s| Duration::from_secs(s.max(1) as u64));
                    let unchanged_since = match &observed {
                        Some((seen, since)) if *seen == version => *since,
                        _ => {
                            observed = Some((version.clone(), Instant::now()));
                            Instant::now()
                        }
                    };
                    let free = holder.is_empty()
                        || holder == self.identity
                        || unchanged_since.elapsed() >= duration;
                    if free {
                        let transitions = spec.lease_transitions.unwrap_or(0)
                            + i32::from(holder != self.identity);
                        let mut taken = lease.clone();
                        taken.spec = Some(self.held_spec(transitions, None));
                        match self
                            .api
                            .replace(&self.name, &PostParams::default(), &taken)
                            .await
                        {
                            Ok(_) => return Ok(()),
                            // Another replica was faster.
                            Err(kube::Error::Api(s)) if s.code == 409 => {}
                            Err(e) => return Err(e),
                        }
                    }
                }
            }
            tokio::time::sleep(RETRY_EVERY).await;
        }
    }

    fn held_spec(&self, transitions: i32, acquired: Option<MicroTime>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(LEASE_DURATION.as_secs() as i32),
            acquire_time: Some(acquired.unwrap_or_else(Self::now)),
            renew_time: Some(Self::now()),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// Renews the Lease until `done`; then hands it back. If it cannot be
    /// renewed within its duration (or another replica took it), tells the
    /// work to stop through `lost`.
    pub async fn keep(
        self,
        mut done: watch::Receiver<bool>,
        lost: watch::Sender<bool>,
    ) -> Result<(), kube::Error> {
        let mut last_renewed = Instant::now();
        loop {
            tokio::select! {
                _ = done.wait_for(|d| *d) => break,
                _ = tokio::time::sleep(RENEW_EVERY) => {}
            }
            match self.renew().await {
                Ok(true) => last_renewed = Instant::now(),
                Ok(false) => {
                    tracing::error!("another replica holds the Lease; stopping work");
                    let _ = lost.send(true);
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "renewing the Lease failed");
                    if last_renewed.elapsed() >= LEASE_DURATION - RENEW_EVERY {
                        let _ = lost.send(true);
                        return Ok(());
                    }
                }
            }
        }
        self.release().await
    }

    /// Whether this replica still held the Lease and renewed it.
    async fn renew(&self) -> Result<bool, kube::Error> {
        let mut lease = self.api.get(&self.name).await?;
        let mut spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(false);
        }
        spec.renew_time = Some(Self::now());
        lease.spec = Some(spec);
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => {
                // Changed under us: held by someone else now?
                let current = self.api.get(&self.name).await?;
                Ok(current.spec.and_then(|s| s.holder_identity).as_deref()
                    == Some(self.identity.as_str()))
            }
            Err(e) => Err(e),
        }
    }

    async fn release(&self) -> Result<(), kube::Error> {
        let mut lease = self.api.get(&self.name).await?;
        let mut spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = Some(Self::now());
        lease.spec = Some(spec);
        self.api
            .replace(&self.name, &PostParams::default(), &lease)
            .await?;
        Ok(())
    }
}
