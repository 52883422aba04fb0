//! Failure points: tests stop a process at an exact step to kill it there
//! (`FERRY_FAILPOINTS=name,name`), so crash interleavings are forced, never
//! timed. Unarmed, a point costs one environment lookup.

/// Whether the failure point `name` is armed.
pub fn armed(name: &str) -> bool {
    std::env::var("FERRY_FAILPOINTS").is_ok_and(|v| v.split(',').any(|p| p.trim() == name))
}

/// If `name` is armed: says so on standard error and never returns (the
/// test kills the process here).
pub async fn stop_here(name: &str) {
    if armed(name) {
        eprintln!("failpoint {name} reached");
        std::future::pending::<()>().await;
    }
}
