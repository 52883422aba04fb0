//! Ferry: Kubernetes-native backup, restore and migration of applications,
//! captured as normalized application graphs.
//!
//! The pipeline (see README): `cluster` discovers and captures, `model`
//! normalizes objects and builds the application graph, `repo` stores
//! snapshots (their format: `snapshot`) in an encrypted content-addressed repository, `transform`
//! adapts objects to the target with rule sets, and `backup` and
//! `restore` orchestrate the whole.

// Errors carry the Kubernetes client's error as their source so that the
// whole cause chain reaches the user; it is large, and these results are
// not on hot paths.
#![allow(clippy::result_large_err)]

pub mod aligned;
pub mod backup;
pub mod cli;
pub mod cluster;
pub mod controller;
pub mod failpoint;
pub mod incremental;
pub mod model;
pub mod mover;
pub mod profile;
pub mod repo;
pub mod restore;
pub mod snapshot;
#[cfg(test)]
mod test_data;
pub mod transform;
pub mod volume;
pub mod yaml;

/// The cores this process may use (2 where that cannot be told), found out
/// once: the standard library reads the cgroup's CPU quota from files on
/// every call, and restores ask per batch of data.
pub fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
}
