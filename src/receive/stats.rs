//! Live figures of one stream, for metrics and health checks: updated by the receive shell,
//! read by anyone holding the `Arc` (the service's metrics endpoint). Plain atomics, no locks on
//! the hot path; LSNs are byte positions (`Lsn::0`), timestamps seconds since the Unix epoch
//! (0: never).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

#[derive(Debug, Default)]
pub struct StreamStats {
    /// End of the WAL received from the server.
    pub received_lsn: AtomicU64,
    /// The flush position last reported to the server.
    pub flushed_lsn: AtomicU64,
    /// End of the contiguous WAL durable in the archive.
    pub archived_lsn: AtomicU64,
    /// The server's WAL end as last seen (XLogData / keepalive `wal_end`).
    pub server_lsn: AtomicU64,
    pub segments_archived: AtomicU64,
    /// Raw WAL bytes stored (before compression).
    pub wal_bytes: AtomicU64,
    /// Bytes stored after compression.
    pub stored_bytes: AtomicU64,
    /// Bytes of WAL waiting in the spool.
    pub spool_bytes: AtomicU64,
    pub reconnects: AtomicU64,
    pub last_archived_unix: AtomicU64,
    /// True while START_REPLICATION is running.
    pub streaming: AtomicBool,
    /// False after the last store operation failed, true after one succeeded.
    pub archive_reachable: AtomicBool,
    errors: Mutex<Vec<(&'static str, u64)>>,
}

impl StreamStats {
    pub fn get(v: &AtomicU64) -> u64 {
        v.load(Ordering::Relaxed)
    }

    pub fn set(v: &AtomicU64, x: u64) {
        v.store(x, Ordering::Relaxed);
    }

    pub fn add(v: &AtomicU64, x: u64) {
        v.fetch_add(x, Ordering::Relaxed);
    }

    /// Counts one error of `kind` (a short stable label: `connection`, `archive`, `wal`, ...).
    pub fn error(&self, kind: &'static str) {
        let mut e = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        match e.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, n)) => *n += 1,
            None => e.push((kind, 1)),
        }
    }

    /// Errors counted so far, by kind.
    pub fn errors(&self) -> Vec<(&'static str, u64)> {
        self.errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
