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

    pub fn flag(v: &AtomicBool) -> bool {
        v.load(Ordering::Relaxed)
    }

    pub fn set_flag(v: &AtomicBool, x: bool) {
        v.store(x, Ordering::Relaxed);
    }

    /// Seconds since the Unix epoch, for the `*_unix` fields.
    pub fn now_unix() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }

    /// One WAL object stored in the archive: `raw` bytes of WAL as `stored` bytes (after
    /// compression); `segment` for a complete segment (not a `.partial`).
    pub fn stored(&self, raw: u64, stored: u64, segment: bool) {
        if segment {
            Self::add(&self.segments_archived, 1);
        }
        Self::add(&self.wal_bytes, raw);
        Self::add(&self.stored_bytes, stored);
        Self::set(&self.last_archived_unix, Self::now_unix());
        Self::set_flag(&self.archive_reachable, true);
    }

    /// Counts one error of `kind` (a short stable label: `connection`, `archive`, `wal`, ...).
    pub fn error(&self, kind: &'static str) {
        let mut e = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        match e.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, n)) => *n += 1,
            None => e.push((kind, 1)),
        }
    }

    /// Errors counted so far, by kind (in the order first seen).
    pub fn errors(&self) -> Vec<(&'static str, u64)> {
        self.errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_counted_by_kind() {
        let s = StreamStats::default();
        assert!(s.errors().is_empty());
        s.error("archive");
        s.error("connection");
        s.error("archive");
        assert_eq!(s.errors(), vec![("archive", 2), ("connection", 1)]);
    }

    #[test]
    fn a_stored_object_counts_and_marks_the_archive_reachable() {
        let s = StreamStats::default();
        s.stored(16 << 20, 1000, true);
        s.stored(8192, 100, false);
        assert_eq!(StreamStats::get(&s.segments_archived), 1);
        assert_eq!(StreamStats::get(&s.wal_bytes), (16 << 20) + 8192);
        assert_eq!(StreamStats::get(&s.stored_bytes), 1100);
        assert!(StreamStats::flag(&s.archive_reachable));
        assert!(StreamStats::get(&s.last_archived_unix) > 1_600_000_000);
    }
}
