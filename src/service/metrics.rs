//! Prometheus metrics (`/metrics`) and health endpoints (`/healthz`, `/readyz`) for `walagent run`
//! and `walagent stream --metrics-addr`.
//!
//! Interface (stable between the service and metrics work): the runner registers each cluster
//! with [`Registry::add_cluster`], hands `ClusterStats::stream` to the cluster's
//! `StreamOptions::stats`, records backups in the other fields, and calls [`serve`] once.
//! (Placeholder bodies until the metrics work lands.)

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::receive::stats::StreamStats;

/// One cluster's figures: the stream's, plus the scheduler's (backups, retention).
#[derive(Debug, Default)]
pub struct ClusterStats {
    pub name: String,
    pub stream: Arc<StreamStats>,
    /// End of the last successful backup, seconds since the epoch (0: none yet).
    pub last_backup_unix: AtomicU64,
    pub last_backup_duration_ms: AtomicU64,
    /// Earliest point a restore can reach, seconds since the epoch (0: unknown).
    pub window_start_unix: AtomicU64,
}

/// Every cluster of the process, by name.
#[derive(Debug, Default)]
pub struct Registry {
    clusters: Mutex<BTreeMap<String, Arc<ClusterStats>>>,
}

impl Registry {
    /// Registers `name` (or returns the one already registered).
    pub fn add_cluster(&self, name: &str) -> Arc<ClusterStats> {
        let mut c = self.clusters.lock().unwrap_or_else(|p| p.into_inner());
        c.entry(name.to_string())
            .or_insert_with(|| {
                Arc::new(ClusterStats {
                    name: name.to_string(),
                    ..Default::default()
                })
            })
            .clone()
    }

    pub fn remove_cluster(&self, name: &str) {
        let mut c = self.clusters.lock().unwrap_or_else(|p| p.into_inner());
        c.remove(name);
    }

    pub fn clusters(&self) -> Vec<Arc<ClusterStats>> {
        let c = self.clusters.lock().unwrap_or_else(|p| p.into_inner());
        c.values().cloned().collect()
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr` until `shutdown` turns true.
pub async fn serve(
    addr: SocketAddr,
    registry: Arc<Registry>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let _ = (addr, registry);
    while !*shutdown.borrow() {
        if shutdown.changed().await.is_err() {
            break;
        }
    }
    Ok(())
}
