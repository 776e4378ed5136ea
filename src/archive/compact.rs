//! Compaction: turning complete segments stored raw (`wal/X`) in a local archive into zstd
//! (`wal/X.zst`) after the fact, when the CPU is free.
//!
//! `walagent stream` into a local archive stores each complete segment raw the moment it is
//! complete (the spool is on the archive's filesystem, so that is an fsync and a rename), so
//! compression never holds the stream back; this module compresses it later. One segment at a
//! time ([`compact_segment`]), always in this order, so a reader finds the segment under at least
//! one key at every moment and a crash at any step leaves a valid archive:
//!
//! 1. `wal/X.zst` is written into a temp file beside it, fsynced, renamed into place without
//!    overwriting, the directory fsynced (raw and `.zst` now both hold the segment);
//! 2. the new `.zst` is decompressed and compared with the raw object byte for byte;
//! 3. only then is the raw object removed (and the directory fsynced).
//!
//! A `.zst` already there with the same WAL only costs step 2; one with different WAL keeps both
//! objects and is reported (never deleted: the stream's conflict rules decide about it). Raw
//! objects that are not a full segment are left alone. See `proto-notes/durability.md`.
//!
//! [`spawn`] runs it in the background behind a [`Gate`]: it works only while the gate has been
//! quiet (no archiving job queued or running) for a while, one segment at a time on one blocking
//! thread, so it never competes with a catch-up. It is never waited for on stop: raw segments
//! left behind are found by the next start's listing.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::compress;
use super::layout::{parse_wal_key, segment_key_by_name, WalObject, WAL_PREFIX};
use super::local::LocalStore;
use super::StoreError;
use crate::wal::{SegmentId, SegmentSize};

/// How one compaction step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compacted {
    /// `wal/X.zst` written and verified, raw `wal/X` removed: sizes before and after.
    Compressed { raw: u64, zst: u64 },
    /// `wal/X.zst` was already there with the same WAL; the raw copy was removed.
    AlreadyCompressed,
    /// No raw object (compacted meanwhile, expired, never there).
    Gone,
    /// The raw object is not a full segment: left alone.
    NotASegment { len: u64 },
    /// `wal/X.zst` holds different WAL: both kept.
    Conflict,
}

/// Compresses the raw complete segment `id` of `store` to zstd `level` (see the module doc for
/// the order of steps). Blocking: call it from a blocking thread.
pub fn compact_segment(
    store: &LocalStore,
    id: SegmentId,
    seg_size: SegmentSize,
    level: i32,
) -> Result<Compacted, StoreError> {
    let name = id.file_name(seg_size);
    let raw_key = segment_key_by_name(&name, false, false);
    let zst_key = segment_key_by_name(&name, true, false);
    let raw_path = store.path_of(&raw_key)?;
    let zst_path = store.path_of(&zst_key)?;
    let read_err = |p: &std::path::Path, e: io::Error| {
        StoreError::io(format!("cannot read archive object {}", p.display()), e)
    };
    let mut raw = match File::open(&raw_path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Compacted::Gone),
        Err(e) => return Err(read_err(&raw_path, e)),
    };
    let len = raw.metadata().map_err(|e| read_err(&raw_path, e))?.len();
    if len != u64::from(seg_size.bytes()) {
        return Ok(Compacted::NotASegment { len });
    }
    let written = match store.put_new_with(&zst_key, |out| {
        compress::compress_streaming(&mut raw, len, out, level).map(|_| ())
    }) {
        Ok(()) => true,
        Err(StoreError::Conflict { .. }) => false,
        Err(e) => return Err(e),
    };
    // Step 2: whatever `.zst` is there now must decompress to exactly the raw segment.
    let same = same_decompressed(&zst_path, &raw_path).map_err(|e| read_err(&zst_path, e))?;
    if !same {
        if written {
            // Our own output does not read back (a failing disk?): the raw object stays the
            // segment's only copy.
            store.delete_blocking(&zst_key)?;
            return Err(StoreError::io(
                format!("compacting {raw_key}"),
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{zst_key} did not read back as the segment; removed it, kept {raw_key}"
                    ),
                ),
            ));
        }
        return Ok(Compacted::Conflict);
    }
    store.delete_blocking(&raw_key)?;
    if !written {
        return Ok(Compacted::AlreadyCompressed);
    }
    let zst = std::fs::metadata(&zst_path)
        .map_err(|e| read_err(&zst_path, e))?
        .len();
    Ok(Compacted::Compressed { raw: len, zst })
}

/// Whether the zstd file `zst` decompresses to exactly the bytes of `raw`. A corrupt zstd stream
/// is `false`; read errors pass through.
pub fn same_decompressed(zst: &std::path::Path, raw: &std::path::Path) -> io::Result<bool> {
    same_content(File::open(zst)?, true, raw)
}

/// Whether `src` (zstd when `compressed`, else raw bytes) holds exactly the bytes of the file
/// `raw`, read in pieces (nothing is held whole). A corrupt zstd stream is `false`; read errors
/// pass through.
pub fn same_content(src: impl Read, compressed: bool, raw: &std::path::Path) -> io::Result<bool> {
    let other = File::open(raw)?;
    Ok(matches!(
        compare_content(src, compressed, other, false)?,
        Compared::Same
    ))
}

/// How content decompressed from a stream compared with other bytes ([`compare_content`]).
#[derive(Debug)]
pub enum Compared {
    /// Exactly the same bytes, and the same length.
    Same,
    /// Different bytes, or one is longer.
    Different,
    /// The zstd stream does not decode (bad data, checksum, truncated or empty): the error of
    /// [`compress::decompress_stream`], for which [`compress::is_corrupt`] is true.
    Corrupt(io::Error),
}

/// Compares what `src` holds (zstd when `compressed`, else raw bytes) with the bytes `other`
/// reads, both in pieces (nothing is held whole). At the first difference it stops, unless
/// `to_end`: then the rest of `src` is decoded and dropped, so a corrupt stream is told as
/// [`Compared::Corrupt`] wherever the damage is (as reading it whole would). Read errors of
/// either side pass through.
pub fn compare_content(
    src: impl Read,
    compressed: bool,
    other: impl Read,
    to_end: bool,
) -> io::Result<Compared> {
    let mut cmp = CompareWriter {
        other,
        buf: Vec::new(),
        same: true,
        to_end,
    };
    match compress::decompress_stream(src, &mut cmp, compressed) {
        Ok(_) => {}
        Err(e) if compress::is_corrupt(&e) => return Ok(Compared::Corrupt(e)),
        Err(e) if e.get_ref().is_some_and(|i| i.is::<Differs>()) => return Ok(Compared::Different),
        Err(e) => return Err(e),
    }
    if !cmp.same {
        return Ok(Compared::Different);
    }
    // The other side must end where the decompressed stream ended.
    let mut one = [0u8; 1];
    loop {
        match cmp.other.read(&mut one) {
            Ok(0) => return Ok(Compared::Same),
            Ok(_) => return Ok(Compared::Different),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Most bytes [`CompareWriter`] compares at once (its buffer for the other side's bytes).
const COMPARE_STEP: usize = 256 * 1024;

/// [`CompareWriter`]'s "stop here" error.
#[derive(Debug, thiserror::Error)]
#[error("content differs")]
struct Differs;

/// A writer that compares what it is given with the next bytes of `other`; at the first
/// difference it fails the write (so the decompression stops early), or, `to_end`, takes the
/// rest without looking.
struct CompareWriter<R> {
    other: R,
    buf: Vec<u8>,
    same: bool,
    to_end: bool,
}

impl<R: Read> Write for CompareWriter<R> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if !self.same {
            return if self.to_end {
                Ok(data.len())
            } else {
                Err(io::Error::other(Differs))
            };
        }
        // In steps of at most COMPARE_STEP (a partial write: the caller writes the rest).
        let data = &data[..data.len().min(COMPARE_STEP)];
        self.buf.resize(data.len(), 0);
        let mut got = 0;
        while got < data.len() {
            match self.other.read(&mut self.buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if got != data.len() || self.buf[..] != *data {
            self.same = false;
            // Nothing more is read from `other`: the buffer is not needed any more.
            self.buf = Vec::new();
            return self.write(data);
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The raw complete segments in the archive's listing, oldest first.
pub fn raw_segments(
    store: &LocalStore,
    seg_size: SegmentSize,
) -> Result<Vec<SegmentId>, StoreError> {
    let dir = store.path_of(WAL_PREFIX.trim_end_matches('/'))?;
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(StoreError::io(
                format!("cannot read archive directory {}", dir.display()),
                e,
            ))
        }
    };
    let mut out = BTreeSet::new();
    for entry in entries.flatten() {
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if !entry.file_type().map(|t| t.is_file()).unwrap_or(false) {
            continue;
        }
        if let Some(WalObject::Segment {
            id,
            partial: false,
            compressed: false,
        }) = parse_wal_key(&format!("{WAL_PREFIX}{name}"), seg_size)
        {
            out.insert(id);
        }
    }
    Ok(out.into_iter().collect())
}

/// Tells the compactor when archiving is busy: [`Gate::begin`] when a job is queued,
/// [`Gate::end`] when it is done. The compactor works only after `quiet` with no job.
#[derive(Debug)]
pub struct Gate {
    busy: AtomicUsize,
    /// Milliseconds since `epoch` of the last begin or end.
    last: AtomicU64,
    epoch: Instant,
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            busy: AtomicUsize::new(0),
            last: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
}

impl Gate {
    fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last.store(ms, Ordering::Relaxed);
    }

    pub fn begin(&self) {
        self.busy.fetch_add(1, Ordering::AcqRel);
        self.touch();
    }

    pub fn end(&self) {
        // Never below zero, whatever the caller does.
        let _ = self
            .busy
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| b.checked_sub(1));
        self.touch();
    }

    /// Jobs queued or running now.
    pub fn busy(&self) -> usize {
        self.busy.load(Ordering::Acquire)
    }

    /// No job for at least `quiet`.
    pub fn is_quiet(&self, quiet: Duration) -> bool {
        let now = self.epoch.elapsed().as_millis() as u64;
        self.busy.load(Ordering::Acquire) == 0
            && now.saturating_sub(self.last.load(Ordering::Relaxed)) >= quiet.as_millis() as u64
    }
}

/// Background compaction settings.
#[derive(Debug, Clone)]
pub struct CompactorConfig {
    pub store: LocalStore,
    pub seg_size: SegmentSize,
    /// The zstd level the archive ends up with.
    pub level: i32,
    /// How long archiving must have been idle before a segment is compacted.
    pub quiet: Duration,
}

/// Hands segments stored raw to the background compactor.
#[derive(Debug, Clone)]
pub struct Compactor {
    tx: mpsc::UnboundedSender<SegmentId>,
}

impl Compactor {
    /// The segment `id` was stored raw: compact it when the CPU is free.
    pub fn stored_raw(&self, id: SegmentId) {
        let _ = self.tx.send(id);
    }
}

/// Starts the background compactor: it first lists the raw segments already in the archive (left
/// by an earlier run), then takes those given to [`Compactor::stored_raw`]. Abort the handle to
/// stop it; nothing needs waiting for (a step under way finishes on its blocking thread, and an
/// interrupted one leaves a valid archive).
pub fn spawn(config: CompactorConfig, gate: Arc<Gate>) -> (Compactor, JoinHandle<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(run(config, gate, rx));
    (Compactor { tx }, task)
}

async fn run(config: CompactorConfig, gate: Arc<Gate>, mut rx: mpsc::UnboundedReceiver<SegmentId>) {
    let poll = Duration::from_millis(100).min(config.quiet.max(Duration::from_millis(1)));
    let mut pending: BTreeSet<SegmentId> = BTreeSet::new();
    {
        let (store, size) = (config.store.clone(), config.seg_size);
        match tokio::task::spawn_blocking(move || raw_segments(&store, size)).await {
            Ok(Ok(ids)) => pending.extend(ids),
            Ok(Err(e)) => tracing::warn!("compaction: cannot list raw segments: {e}"),
            Err(e) => tracing::warn!("compaction: listing failed: {e}"),
        }
    }
    let mut failures = 0u32;
    loop {
        while let Ok(id) = rx.try_recv() {
            pending.insert(id);
        }
        let Some(id) = pending.pop_first() else {
            match rx.recv().await {
                Some(id) => {
                    pending.insert(id);
                    continue;
                }
                None => return,
            }
        };
        while !gate.is_quiet(config.quiet) {
            tokio::time::sleep(poll).await;
        }
        let (store, size, level) = (config.store.clone(), config.seg_size, config.level);
        let started = Instant::now();
        let r = tokio::task::spawn_blocking(move || compact_segment(&store, id, size, level)).await;
        let name = id.file_name(config.seg_size);
        match r {
            Ok(Ok(Compacted::Compressed { raw, zst })) => {
                failures = 0;
                tracing::debug!(segment = %name, raw, zst, ms = started.elapsed().as_millis() as u64, "compacted");
            }
            Ok(Ok(Compacted::Conflict)) => tracing::warn!(
                segment = %name,
                "compaction: the archive holds different WAL under {name} and {name}.zst; kept both"
            ),
            Ok(Ok(Compacted::NotASegment { len })) => tracing::warn!(
                segment = %name,
                len,
                "compaction: raw object is not a full segment; left alone"
            ),
            Ok(Ok(Compacted::AlreadyCompressed | Compacted::Gone)) => {}
            Ok(Err(e)) => {
                // Left raw (a valid archive); the next start tries again.
                failures += 1;
                tracing::warn!(segment = %name, "compaction failed, segment left uncompressed: {e}");
                tokio::time::sleep(Duration::from_secs(1u64 << failures.min(5))).await;
            }
            Err(e) => tracing::warn!(segment = %name, "compaction task failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::{read_wal_object, PutMode, Store};
    use bytes::Bytes;

    const SIZE: u32 = 1 << 20;

    fn seg_size() -> SegmentSize {
        SegmentSize::new(u64::from(SIZE)).unwrap()
    }

    fn id(n: u64) -> SegmentId {
        SegmentId::new(crate::wal::timeline::tl(1), n)
    }

    fn wal(n: u8) -> Vec<u8> {
        (0..SIZE as usize)
            .map(|i| ((i / 100) as u8).wrapping_mul(31) ^ n)
            .collect()
    }

    fn files(dir: &std::path::Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir.join("wal"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[tokio::test]
    async fn raw_becomes_zst_with_the_same_wal() {
        let t = tempfile::tempdir().unwrap();
        let store = LocalStore::open(t.path()).unwrap();
        let name = id(3).file_name(seg_size());
        let w = wal(1);
        store
            .put_bytes(
                &format!("wal/{name}"),
                Bytes::from(w.clone()),
                PutMode::NoOverwrite,
            )
            .await
            .unwrap();
        assert_eq!(raw_segments(&store, seg_size()).unwrap(), vec![id(3)]);
        let r = compact_segment(&store, id(3), seg_size(), 1).unwrap();
        assert!(
            matches!(r, Compacted::Compressed { raw, zst } if raw == SIZE as u64 && zst < raw),
            "{r:?}"
        );
        assert_eq!(files(t.path()), vec![format!("{name}.zst")]);
        let got = read_wal_object(&store, &format!("wal/{name}.zst"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, w);
        // Again: nothing left to do.
        assert_eq!(
            compact_segment(&store, id(3), seg_size(), 1).unwrap(),
            Compacted::Gone
        );
        assert!(raw_segments(&store, seg_size()).unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_pair_left_by_a_crash_is_finished() {
        // A crash between steps 1 and 3: both objects hold the segment.
        let t = tempfile::tempdir().unwrap();
        let store = LocalStore::open(t.path()).unwrap();
        let name = id(4).file_name(seg_size());
        let w = wal(2);
        store
            .put_bytes(
                &format!("wal/{name}"),
                Bytes::from(w.clone()),
                PutMode::NoOverwrite,
            )
            .await
            .unwrap();
        // Another level than the compactor's: the same WAL all the same.
        let z = compress::compress_bulk(&w, 5).unwrap();
        store
            .put_bytes(
                &format!("wal/{name}.zst"),
                Bytes::from(z),
                PutMode::NoOverwrite,
            )
            .await
            .unwrap();
        // Readers see one segment while the pair is there.
        let objs = store.list("wal/").await.unwrap();
        let index = crate::archive::index::WalIndex::from_objects(&objs, seg_size());
        assert!(index.has_segment(id(4)));
        let found = crate::archive::segment::find_archived(&store, &name, false)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(found.content, w);
        assert_eq!(
            compact_segment(&store, id(4), seg_size(), 1).unwrap(),
            Compacted::AlreadyCompressed
        );
        assert_eq!(files(t.path()), vec![format!("{name}.zst")]);
    }

    #[tokio::test]
    async fn different_wal_under_the_zst_key_keeps_both() {
        let t = tempfile::tempdir().unwrap();
        let store = LocalStore::open(t.path()).unwrap();
        let name = id(5).file_name(seg_size());
        store
            .put_bytes(
                &format!("wal/{name}"),
                Bytes::from(wal(3)),
                PutMode::NoOverwrite,
            )
            .await
            .unwrap();
        let z = compress::compress_bulk(&wal(4), 1).unwrap();
        store
            .put_bytes(
                &format!("wal/{name}.zst"),
                Bytes::from(z.clone()),
                PutMode::NoOverwrite,
            )
            .await
            .unwrap();
        assert_eq!(
            compact_segment(&store, id(5), seg_size(), 1).unwrap(),
            Compacted::Conflict
        );
        assert_eq!(files(t.path()), vec![name.clone(), format!("{name}.zst")]);
        assert_eq!(
            std::fs::read(t.path().join(format!("wal/{name}.zst"))).unwrap(),
            z
        );
        // A corrupt .zst too (truncated): never a reason to delete the raw segment.
        std::fs::remove_file(t.path().join(format!("wal/{name}.zst"))).unwrap();
        std::fs::write(t.path().join(format!("wal/{name}.zst")), &z[..z.len() / 2]).unwrap();
        assert_eq!(
            compact_segment(&store, id(5), seg_size(), 1).unwrap(),
            Compacted::Conflict
        );
        assert_eq!(
            std::fs::read(t.path().join(format!("wal/{name}"))).unwrap(),
            wal(3)
        );
    }

    #[tokio::test]
    async fn stray_and_short_objects_are_left_alone() {
        let t = tempfile::tempdir().unwrap();
        let store = LocalStore::open(t.path()).unwrap();
        let name = id(6).file_name(seg_size());
        std::fs::write(t.path().join(format!("wal/{name}")), b"short").unwrap();
        for stray in [
            "README",
            "00000002.history",
            "000000010000000000000007.partial",
            "0000000100000000000000zz",
        ] {
            std::fs::write(t.path().join("wal").join(stray), b"x").unwrap();
        }
        std::fs::create_dir(t.path().join("wal/000000010000000000000008")).unwrap();
        assert_eq!(raw_segments(&store, seg_size()).unwrap(), vec![id(6)]);
        assert_eq!(
            compact_segment(&store, id(6), seg_size(), 1).unwrap(),
            Compacted::NotASegment { len: 5 }
        );
        assert!(t.path().join(format!("wal/{name}")).exists());
        assert!(!t.path().join(format!("wal/{name}.zst")).exists());
    }

    #[tokio::test]
    async fn background_compactor_waits_for_a_quiet_gate() {
        let t = tempfile::tempdir().unwrap();
        let store = LocalStore::open(t.path()).unwrap();
        // One left by an earlier run, one handed over.
        for n in [1u64, 2] {
            let name = id(n).file_name(seg_size());
            store
                .put_bytes(
                    &format!("wal/{name}"),
                    Bytes::from(wal(n as u8)),
                    PutMode::NoOverwrite,
                )
                .await
                .unwrap();
        }
        let gate = Arc::new(Gate::default());
        gate.begin();
        let (c, task) = spawn(
            CompactorConfig {
                store: store.clone(),
                seg_size: seg_size(),
                level: 1,
                quiet: Duration::from_millis(50),
            },
            gate.clone(),
        );
        let name3 = id(3).file_name(seg_size());
        store
            .put_bytes(
                &format!("wal/{name3}"),
                Bytes::from(wal(3)),
                PutMode::NoOverwrite,
            )
            .await
            .unwrap();
        c.stored_raw(id(3));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            raw_segments(&store, seg_size()).unwrap().len(),
            3,
            "busy: nothing compacted"
        );
        gate.end();
        for _ in 0..100 {
            if raw_segments(&store, seg_size()).unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(raw_segments(&store, seg_size()).unwrap().is_empty());
        for n in [1u64, 2, 3] {
            let name = id(n).file_name(seg_size());
            let got = read_wal_object(&store, &format!("wal/{name}.zst"))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(got, wal(n as u8));
        }
        task.abort();
    }
}
