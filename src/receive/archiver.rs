//! The archiver: takes complete segments, timeline-final partials and snapshots of the segment
//! being received from the spool, compresses them on blocking threads and puts them into the
//! [`Store`]. It runs beside the receive loop, so compression and uploads overlap with receiving.
//!
//! Up to `workers` jobs run at once; results are taken in submission order, so `archived_upto`
//! (published on a watch channel) is always the end of a contiguous prefix of complete segments
//! durable in the archive. That bounds the flush position the receiver may report.
//!
//! Deferred compression (local archives, `zstd:N`): a complete segment that finds other jobs
//! queued or running (the archiver is behind: a catch-up) is stored raw (`wal/X`: an fsync and a
//! rename, the spool being on the archive's filesystem) and counts as archived at once; a
//! segment that finds the archiver idle is compressed as before. The background compactor ([`crate::archive::compact`]) turns
//! it into `wal/X.zst` while no archiving job is queued or running, so compression never holds
//! back a catch-up. Partial snapshots and timeline-final partials are compressed as before.
//! See `proto-notes/durability.md`.
//!
//! A store that is unavailable (network down, HTTP 5xx) is retried with backoff for as long as
//! it takes; meanwhile the queue fills, the receiver stops reading, and the replication slot holds
//! the WAL on the server. Any other store error stops the archiver.

use std::collections::{HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::archive::compact::{self, Compactor, CompactorConfig, Gate};
use crate::archive::local::LocalStore;
use crate::archive::{compress, layout, segment, Compression, PutMode, Store, StoreError};
use crate::wal::{Lsn, SegmentId, SegmentSize};

/// One unit of work for the archiver.
#[derive(Debug)]
pub enum Job {
    /// A complete segment at `path` (the spool's ready file).
    Segment { id: SegmentId, path: PathBuf },
    /// The last, incomplete segment of a timeline that ended; archived as `<name>.partial`.
    FinalPartial { id: SegmentId, path: PathBuf },
    /// A copy of the segment being received, taken at `end`; archived as `<name>.partial`
    /// (replacing an older snapshot) so that losing the host loses little WAL.
    Snapshot {
        id: SegmentId,
        path: PathBuf,
        end: Lsn,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    /// End of the last complete segment archived (a contiguous prefix).
    pub archived_upto: Lsn,
    /// The newest partial snapshot stored: its segment and how far it reaches.
    pub snapshot: Option<(SegmentId, Lsn)>,
    /// Jobs finished so far (compare with the number submitted to know when it is idle).
    pub done: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ArchiverError {
    #[error("archiving {name}: {source}")]
    Store {
        name: String,
        #[source]
        source: StoreError,
    },
    #[error("compressing {path}: {source}")]
    Compress {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the archiver stopped unexpectedly: {source}")]
    Crashed {
        #[source]
        source: tokio::task::JoinError,
    },
    #[error("the archiver stopped unexpectedly: its queue closed")]
    QueueClosed,
    /// Asked again after its failure was already returned (the first error carries the cause).
    #[error("the archiver had already stopped after an error")]
    Stopped,
}

impl ArchiverError {
    pub fn hint(&self) -> Option<String> {
        match self {
            ArchiverError::Store { source, .. } => source.hint(),
            ArchiverError::Compress { source, .. } => Some(
                if source.raw_os_error() == Some(libc::ENOSPC) {
                    "the spool's filesystem is full: free space or point --spool at a larger one; \
                     nothing acknowledged is lost, the next start archives what the spool holds"
                } else {
                    "check the spool directory's permissions and free space"
                }
                .into(),
            ),
            ArchiverError::Crashed { .. } | ArchiverError::QueueClosed => Some(
                "this is a bug in walagent (please report it); nothing acknowledged is lost, \
                 the next start archives what the spool holds"
                    .into(),
            ),
            ArchiverError::Stopped => None,
        }
    }
}

pub struct Archiver {
    tx: mpsc::Sender<Job>,
    progress: watch::Receiver<Progress>,
    submitted: u64,
    /// The archiver task; taken (None) once its result has been collected, so a failure is
    /// returned once and later calls get [`ArchiverError::Stopped`] instead of polling the
    /// finished handle again.
    task: Option<JoinHandle<Result<(), ArchiverError>>>,
    /// Tells the compactor when archiving is busy (None without deferred compression).
    gate: Option<Arc<Gate>>,
    /// The background compactor, aborted when the archiver goes (never waited for).
    _compactor: Option<AbortOnDrop>,
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How long archiving must have been idle before the compactor compresses a segment.
const COMPACT_QUIET: Duration = Duration::from_secs(1);

/// Where the archiver does its work.
pub struct ArchiverConfig {
    pub store: Arc<dyn Store>,
    pub seg_size: SegmentSize,
    pub compression: Compression,
    pub spool_dir: PathBuf,
    /// Jobs waiting before [`Archiver::reserve`] waits (bounds the spool).
    pub queue: usize,
    /// Jobs compressed and stored at once.
    pub workers: usize,
    /// Counts what is stored (segments, bytes, the archive's reachability) for metrics.
    pub stats: Arc<super::stats::StreamStats>,
    /// Store complete segments raw and compress them later in the background (only used with
    /// zstd and a local store).
    pub defer_compression: bool,
}

impl Archiver {
    /// Starts the archiver. `initial` is the position already covered by the archive.
    pub fn spawn(config: ArchiverConfig, initial: Lsn) -> Archiver {
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        let (ptx, progress) = watch::channel(Progress {
            archived_upto: initial,
            snapshot: None,
            done: 0,
        });
        let deferred = match (config.compression, config.store.local_root()) {
            (Compression::Zstd { level }, Some(root)) if config.defer_compression => {
                match LocalStore::open_existing(&root) {
                    Ok(store) => {
                        let gate = Arc::new(Gate::default());
                        let (c, handle) = compact::spawn(
                            CompactorConfig {
                                store,
                                seg_size: config.seg_size,
                                level,
                                quiet: COMPACT_QUIET,
                            },
                            gate.clone(),
                        );
                        Some((gate, c, AbortOnDrop(handle)))
                    }
                    Err(e) => {
                        tracing::warn!("compressing segments as they come: {e}");
                        None
                    }
                }
            }
            _ => None,
        };
        let (gate, compactor, handle) = match deferred {
            Some((g, c, h)) => (Some(g), Some(c), Some(h)),
            None => (None, None, None),
        };
        let defer = gate.clone().zip(compactor);
        let task = tokio::spawn(tracing::Instrument::in_current_span(run(
            config,
            rx,
            ptx,
            gate.clone(),
            defer,
        )));
        Archiver {
            tx,
            progress,
            submitted: 0,
            task: Some(task),
            gate,
            _compactor: handle,
        }
    }

    /// Queues a job; waits while the queue is full (back-pressure on the receiver).
    pub async fn submit(&mut self, job: Job) -> Result<(), ArchiverError> {
        let permit = self.reserve().await?;
        self.send(permit, job);
        Ok(())
    }

    /// Waits for room in the queue. Cancel-safe, so the receiver can keep sending status updates
    /// to the server while it waits.
    pub async fn reserve(&mut self) -> Result<mpsc::OwnedPermit<Job>, ArchiverError> {
        match self.tx.clone().reserve_owned().await {
            Ok(p) => Ok(p),
            Err(_) => Err(self.failure().await),
        }
    }

    /// A slot in the queue if one is free right now.
    pub fn try_reserve(&self) -> Option<mpsc::OwnedPermit<Job>> {
        self.tx.clone().try_reserve_owned().ok()
    }

    /// Queues a job in a slot obtained from [`Archiver::reserve`].
    pub fn send(&mut self, permit: mpsc::OwnedPermit<Job>, job: Job) {
        self.submitted += 1;
        if let Some(g) = &self.gate {
            g.begin();
        }
        permit.send(job);
    }

    pub fn progress(&self) -> Progress {
        *self.progress.borrow()
    }

    pub fn is_idle(&self) -> bool {
        self.progress.borrow().done == self.submitted
    }

    /// Waits for the next progress change; returns the archiver's error if it stopped.
    pub async fn changed(&mut self) -> Result<Progress, ArchiverError> {
        if self.progress.changed().await.is_err() {
            return Err(self.failure().await);
        }
        Ok(*self.progress.borrow_and_update())
    }

    /// Waits until every submitted job is archived.
    pub async fn drain(&mut self) -> Result<Progress, ArchiverError> {
        while !self.is_idle() {
            self.changed().await?;
        }
        Ok(self.progress())
    }

    /// Whether the archiver's failure was already collected (it stopped with an error).
    pub fn has_failed(&self) -> bool {
        self.task.is_none()
    }

    async fn failure(&mut self) -> ArchiverError {
        let Some(task) = self.task.take() else {
            return ArchiverError::Stopped;
        };
        match task.await {
            Ok(Err(e)) => e,
            Ok(Ok(())) => ArchiverError::QueueClosed,
            Err(source) => ArchiverError::Crashed { source },
        }
    }

    /// Stops after the queued jobs are done.
    pub async fn finish(mut self) -> Result<Progress, ArchiverError> {
        let p = self.drain().await?;
        drop(self.tx);
        let Some(task) = self.task.take() else {
            return Err(ArchiverError::Stopped);
        };
        match task.await {
            Ok(r) => r.map(|_| p),
            Err(source) => Err(ArchiverError::Crashed { source }),
        }
    }
}

/// What a finished job reports back, in submission order.
enum Done {
    Segment(SegmentId),
    FinalPartial,
    Snapshot(SegmentId, Lsn),
}

async fn run(
    config: ArchiverConfig,
    mut rx: mpsc::Receiver<Job>,
    progress: watch::Sender<Progress>,
    gate: Option<Arc<Gate>>,
    defer: Option<(Arc<Gate>, Compactor)>,
) -> Result<(), ArchiverError> {
    let config = Arc::new(config);
    let mut inflight: VecDeque<JoinHandle<Result<Done, ArchiverError>>> = VecDeque::new();
    // Segments with a partial snapshot in the archive, to delete once the complete one is there.
    let mut snapshotted: HashSet<SegmentId> = HashSet::new();
    let mut closed = false;
    let mut seq = 0u64;
    while !(closed && inflight.is_empty()) {
        tokio::select! {
            biased;
            r = async { inflight.front_mut().expect("guarded by the precondition").await }, if !inflight.is_empty() => {
                inflight.pop_front();
                if let Some(g) = &gate {
                    g.end();
                }
                match r.map_err(|source| ArchiverError::Crashed { source })?? {
                    Done::Segment(id) => {
                        if snapshotted.remove(&id) {
                            let key = layout::segment_key(id, config.seg_size, config.compression, true);
                            if let Err(e) = config.store.delete(&key).await {
                                tracing::warn!(object = %key, "could not remove the superseded partial: {e}");
                            }
                        }
                        progress.send_modify(|p| {
                            p.archived_upto = p.archived_upto.max(id.end_lsn(config.seg_size));
                            p.done += 1;
                        });
                    }
                    Done::FinalPartial => progress.send_modify(|p| p.done += 1),
                    Done::Snapshot(id, end) => {
                        snapshotted.insert(id);
                        progress.send_modify(|p| {
                            p.snapshot = Some((id, end));
                            p.done += 1;
                        });
                    }
                }
            }
            job = rx.recv(), if !closed && inflight.len() < config.workers.max(1) => match job {
                Some(job) => {
                    seq += 1;
                    inflight.push_back(tokio::spawn(tracing::Instrument::in_current_span(
                        archive_one(config.clone(), defer.clone(), job, seq),
                    )));
                }
                None => closed = true,
            },
        }
    }
    Ok(())
}

fn file_len(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Compresses one spooled file (streaming, on a blocking thread), stores it durably (retrying
/// while the store is unavailable), and removes the spool copies.
async fn archive_one(
    config: Arc<ArchiverConfig>,
    defer: Option<(Arc<Gate>, Compactor)>,
    job: Job,
    seq: u64,
) -> Result<Done, ArchiverError> {
    if let (Some((gate, c)), Job::Segment { id, path }) = (&defer, &job) {
        // Behind (this job is not alone): store it raw, compress it later.
        if gate.busy() > 1 {
            if let Some(done) = store_raw(&config, c, *id, path).await? {
                return Ok(done);
            }
        }
    }
    let (id, path, partial, done) = match job {
        Job::Segment { id, path } => (id, path, false, Done::Segment(id)),
        Job::FinalPartial { id, path } => (id, path, true, Done::FinalPartial),
        Job::Snapshot { id, path, end } => (id, path, true, Done::Snapshot(id, end)),
    };
    let key = layout::segment_key(id, config.seg_size, config.compression, partial);
    let name = key.rsplit('/').next().unwrap_or(&key).to_string();
    let started = std::time::Instant::now();
    let upload_src = match config.compression {
        Compression::None => path.clone(),
        Compression::Zstd { level } => {
            let tmp = config.spool_dir.join(format!("{name}.{seq}.tmp"));
            let (src, dst) = (path.clone(), tmp.clone());
            tokio::task::spawn_blocking(move || {
                compress::compress_file(&src, &dst, Compression::Zstd { level })
            })
            .await
            .map_err(|source| ArchiverError::Crashed { source })?
            .map_err(|source| ArchiverError::Compress {
                path: path.display().to_string(),
                source,
            })?;
            tmp
        }
    };
    // A partial may be stored again with more bytes: replace it. Complete segments never change.
    let mode = if partial {
        PutMode::Replace
    } else {
        PutMode::NoOverwrite
    };
    let sizes = (file_len(&path), file_len(&upload_src));
    let mut delay = Duration::from_secs(1);
    loop {
        let put = match mode {
            PutMode::Replace => config.store.put_file(&key, &upload_src, mode).await,
            PutMode::NoOverwrite => segment::put_complete(
                config.store.as_ref(),
                &key,
                segment::Body::File(&upload_src),
                segment::Raw::File(&path),
            )
            .await
            .map(|s| {
                if s == segment::Stored::SameWal {
                    tracing::debug!(object = %key, "already archived with the same WAL (encoded differently)");
                }
            }),
        };
        match put {
            Ok(()) => break,
            Err(e) if e.is_transient() => {
                config.stats.error("archive");
                super::stats::StreamStats::set_flag(&config.stats.archive_reachable, false);
                tracing::warn!(object = %key, "archive unavailable, retrying in {delay:?}: {e}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
            Err(source) => return Err(ArchiverError::Store { name, source }),
        }
    }
    config.stats.stored(sizes.0, sizes.1, !partial);
    for p in [&upload_src, &path] {
        match std::fs::remove_file(p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %p.display(), error = %e, "could not remove spooled file")
            }
        }
    }
    tracing::debug!(object = %key, ms = started.elapsed().as_millis() as u64, "archived");
    Ok(done)
}

/// Deferred compression: stores the complete segment raw (`wal/X`) and hands it to the
/// compactor. `None` when `wal/X.zst` is already there (a re-stream after a restart): then the
/// segment goes the usual way, compressed and compared with what is archived, so there is never
/// a second, different copy under the other key.
async fn store_raw(
    config: &ArchiverConfig,
    compactor: &Compactor,
    id: SegmentId,
    path: &std::path::Path,
) -> Result<Option<Done>, ArchiverError> {
    let zst_key = layout::segment_key(id, config.seg_size, config.compression, false);
    let raw_key = layout::segment_key(id, config.seg_size, Compression::None, false);
    let name = raw_key.rsplit('/').next().unwrap_or(&raw_key).to_string();
    if let Some(root) = config.store.local_root() {
        if std::fs::symlink_metadata(root.join(&zst_key)).is_ok() {
            return Ok(None);
        }
    }
    let started = std::time::Instant::now();
    let len = file_len(path);
    let mut delay = Duration::from_secs(1);
    loop {
        let put = segment::put_complete(
            config.store.as_ref(),
            &raw_key,
            segment::Body::File(path),
            segment::Raw::File(path),
        )
        .await;
        match put {
            Ok(_) => break,
            Err(e) if e.is_transient() => {
                // Counted and flagged like any archiving error (metrics, /readyz).
                config.stats.error("archive");
                super::stats::StreamStats::set_flag(&config.stats.archive_reachable, false);
                tracing::warn!(object = %raw_key, "archive unavailable, retrying in {delay:?}: {e}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
            Err(source) => return Err(ArchiverError::Store { name, source }),
        }
    }
    // A segment stored raw is archived like any other (walagent_segments_archived_total, the
    // byte counters, the last-archived time); its bytes are stored uncompressed for now.
    config.stats.stored(len, len, true);
    // The local store moved the file into place; a copy (other filesystem) leaves it here.
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "could not remove spooled file")
        }
    }
    compactor.stored_raw(id);
    tracing::debug!(object = %raw_key, ms = started.elapsed().as_millis() as u64, "archived raw");
    Ok(Some(Done::Segment(id)))
}
