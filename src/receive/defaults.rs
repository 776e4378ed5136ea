//! The stream's defaults that depend on the machine or the archive kind: one copy for
//! `walagent stream` (`cli::resolve`) and `walagent run` (`service::run`).

use std::time::Duration;

use crate::archive::Store;

/// CPUs this process may use; None when unknown.
pub fn cpus() -> Option<usize> {
    std::thread::available_parallelism().ok().map(|n| n.get())
}

/// `--archive-workers` default: one per CPU, 1 to 4 (2 when the count is unknown).
pub fn archive_workers(cpus: Option<usize>) -> usize {
    cpus.map_or(2, |n| n.clamp(1, 4))
}

/// `--partial-interval`: 10 s for an object store (what a lost host may lose), only when stopping
/// for a local archive (whose spool is beside it); zero means only when stopping.
pub fn partial_interval(given: Option<Duration>, remote: bool) -> Option<Duration> {
    match given.unwrap_or(if remote {
        Duration::from_secs(10)
    } else {
        Duration::ZERO
    }) {
        d if d.is_zero() => None,
        d => Some(d),
    }
}

/// What a spool is bound to besides the cluster: a local archive's absolute path (canonical
/// when it can be resolved), else the store's location (`s3://bucket/prefix`).
pub fn archive_identity(store: &dyn Store) -> String {
    match store.local_root() {
        Some(root) => std::fs::canonicalize(&root)
            .unwrap_or(root)
            .display()
            .to_string(),
        None => store.location(),
    }
}
