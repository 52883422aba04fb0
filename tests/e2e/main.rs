//! End-to-end tests against the real clusters and MinIO started by
//! `scripts/testenv up` (see README). Each test works in its own namespace(s)
//! and bucket, so the whole binary runs in parallel.

mod backup;
mod controller;
mod fidelity;
mod in_cluster;
mod journal;
mod node;
mod plan;
mod restore;
mod support;
mod testenv;
mod transform;
mod volumes;
