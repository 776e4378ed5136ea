//! `walagent backup`: a base backup over the replication protocol, streamed into the archive.
//!
//! One replication connection does everything:
//!
//! 1. `CREATE_REPLICATION_SLOT <tmp> TEMPORARY PHYSICAL (RESERVE_WAL)` pins the WAL from the
//!    current redo point for as long as the connection lives, so the WAL the backup needs cannot
//!    be recycled while the backup runs (what `pg_basebackup -X stream` gets from its slot).
//! 2. `BASE_BACKUP (..., WAL true, ...)` makes the server append the WAL from the start to the
//!    end position to `base.tar` (under `pg_wal/`).
//! 3. Every tar archive is parsed as it passes ([`crate::datadir::tar`]): ordinary entries go on,
//!    byte for byte, to a zstd encoder (multi-threaded) and from there to a streamed archive
//!    object ([`crate::archive::Store::create_writer`]: a multipart upload on S3, a temp file on
//!    disk), never staged whole. The `pg_wal/` segment files are taken out of the tar, checked
//!    page by page and record by record, and archived as ordinary `wal/` objects, exactly as
//!    `walagent stream` would have stored them (identical bytes; an existing object is fine).
//! 4. The manifest is kept as `backup_manifest`; `backup.json` is written last. Only its presence
//!    makes the backup usable, so an interrupted backup is never taken for a complete one.
//!
//! See `proto-notes/base-backup.md`.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::archive::catalog::{self, BackupInfo, TarArchive};
use crate::archive::memory::ArchiveKind;
use crate::archive::meta::rfc3339_micros;
use crate::archive::{layout, ArchiveMeta, Compression, PutMode, Store, StoreError};
use crate::datadir::manifest::{BackupManifest, ManifestError};
use crate::datadir::progress::Progress;
use crate::datadir::tar::{EntryKind, TarError, TarEvent, TarParser};
use crate::protocol::basebackup::{BackupCopyMessage, BackupStreamDecoder, BaseBackupOptions};
use crate::protocol::conninfo::ConnInfo;
use crate::protocol::replication::BackupEvent;
use crate::protocol::ProtocolError;
use crate::wal::verify::{check_segment, SegmentChecker, VerifyParams};
use crate::wal::{
    history_file_name, parse_history_file_name, Lsn, SegmentId, SegmentSize, Timeline,
};

// Bytes handed to the compressor / uploader at a time, the queue depths between the stages and
// the zstd job size come from the memory plan (`archive::memory`, `--memory-limit`).

#[derive(Debug, Clone)]
pub struct BackupOptions {
    pub conninfo: ConnInfo,
    pub checkpoint_fast: bool,
    /// Server-side throttle in kB/s (`MAX_RATE`).
    pub max_rate_kbps: Option<u32>,
    pub compression: Compression,
    /// zstd worker threads (0 = compress on the calling thread).
    pub compress_threads: u32,
    pub label: Option<String>,
    /// Show a progress bar (bytes, rate, ETA) on stderr.
    pub progress: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Meta(#[from] crate::archive::meta::MetaError),
    #[error("the server runs PostgreSQL {0}, but walagent backup needs 15 or later")]
    ServerTooOld(String),
    /// An archive of the backup stream is not a valid tar stream.
    #[error("the base backup stream is malformed: {archive}: {source}")]
    Tar {
        archive: String,
        #[source]
        source: TarError,
    },
    #[error("the base backup stream is malformed: tar data outside an archive")]
    DataOutsideArchive,
    #[error("the base backup stream is malformed: the server's backup_manifest: {0}")]
    Manifest(#[source] ManifestError),
    #[error("WAL sent with the backup failed its checks: segment {name} (needed from the backup's start {first} to its end {last}) is not in the archive")]
    WalMissing {
        name: String,
        first: String,
        last: String,
    },
    /// A WAL segment of the backup that fails verification (the verifier's error).
    #[error("WAL sent with the backup failed its checks: {name}: {source}")]
    BadWal {
        name: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("backup cancelled; nothing was marked usable")]
    Cancelled,
    #[error("compressing {name}: {source}")]
    Compress {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("compressing {name} panicked")]
    CompressPanicked { name: String },
    #[error("the upload of {key} failed: {source}")]
    Upload {
        key: String,
        #[source]
        source: tokio::task::JoinError,
    },
    #[error("the upload of {key} stopped early")]
    UploadStopped { key: String },
    /// A blocking task (WAL check and compression) failed.
    #[error("{0}")]
    Worker(#[source] tokio::task::JoinError),
}

impl From<super::ConnectError> for BackupError {
    fn from(e: super::ConnectError) -> Self {
        match e {
            super::ConnectError::Protocol(e) => BackupError::Protocol(e),
            super::ConnectError::TooOld(v) => BackupError::ServerTooOld(v),
        }
    }
}

impl BackupError {
    pub fn hint(&self) -> Option<String> {
        match self {
            BackupError::Protocol(e) => e.hint(),
            BackupError::Store(e) => e.hint(),
            BackupError::Meta(e) => e.hint(),
            BackupError::ServerTooOld(_) => Some(
                "use pg_basebackup for older servers, or upgrade the server to PostgreSQL 15+"
                    .into(),
            ),
            BackupError::Compress { .. }
            | BackupError::CompressPanicked { .. }
            | BackupError::Upload { .. }
            | BackupError::UploadStopped { .. }
            | BackupError::Worker(_) => Some("check free space and permissions".into()),
            _ => None,
        }
    }
}

/// The temporary slot of one backup: unique per process and per backup, so two backups that
/// one process (`walagent run`, two clusters on one server) takes at once never collide.
/// At most 63 bytes (NAMEDATALEN - 1), lower-case letters, digits and `_`.
fn temporary_slot_name(pid: u32) -> String {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("walagent_backup_{pid}_{n}")
}

/// Takes a base backup into `store`; returns what `backup.json` records. `cancel` turning true
/// stops the backup and discards what was uploaded.
pub async fn take(
    opts: &BackupOptions,
    store: Arc<dyn Store>,
    mut cancel: watch::Receiver<bool>,
) -> Result<BackupInfo, BackupError> {
    let (mut conn, version) = super::connect_for_backup(&opts.conninfo).await?;
    let sys = conn.identify_system().await?;
    let seg_size = conn.wal_segment_size().await?;
    ArchiveMeta::ensure(store.as_ref(), sys.system_identifier, seg_size, version).await?;
    let slot = temporary_slot_name(std::process::id());
    conn.create_temporary_slot(&slot).await?;

    let start_time = SystemTime::now();
    let id = free_id(store.as_ref(), start_time).await?;
    let label = opts
        .label
        .clone()
        .unwrap_or_else(|| format!("walagent {id}"));
    let bb = BaseBackupOptions {
        label: label.clone(),
        checkpoint_fast: opts.checkpoint_fast,
        max_rate_kbps: opts.max_rate_kbps,
        manifest: true,
        tablespace_map: false,
        wal: true,
        wait: false,
        progress: opts.progress,
    };
    tracing::info!(%id, source = %opts.conninfo.display_safe(), archive = %store.location(), "starting base backup");
    let header = conn.start_base_backup(&bb).await?;
    tracing::info!(start = %header.start_lsn, timeline = header.timeline.get(), tablespaces = header.tablespaces.len(), "backup started");

    let progress = Progress::new(opts.progress, &header);
    let params = VerifyParams {
        system_identifier: sys.system_identifier,
        segment_size: seg_size,
        timeline: header.timeline.max(sys.timeline),
    };
    let mut run = Run {
        store: store.clone(),
        id: id.clone(),
        opts,
        current: None,
        done: Vec::new(),
        manifest: BytesMut::new(),
        wal: WalTee {
            store: store.clone(),
            params,
            compression: opts.compression,
            entry: None,
            streamed: None,
            archived: 0,
        },
    };
    let mut decoder = BackupStreamDecoder::new();
    let end = loop {
        let ev = tokio::select! {
            biased;
            _ = cancel.changed() => {
                run.abort().await;
                return Err(BackupError::Cancelled);
            }
            ev = conn.next_backup_event(&mut decoder) => ev,
        };
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                run.abort().await;
                return Err(e.into());
            }
        };
        let step = match ev {
            BackupEvent::Message(m) => run.handle(m, &progress).await,
            BackupEvent::End { end_lsn, timeline } => break (end_lsn, timeline),
        };
        if let Err(e) = step {
            run.abort().await;
            return Err(e);
        }
    };
    progress.finish();
    let (end_lsn, end_timeline) = end;
    if let Err(e) = run.finish_archive().await {
        run.abort().await;
        return Err(e);
    }
    let stop_time = SystemTime::now();
    let manifest = run.manifest.split().freeze();
    let manifest_key = if manifest.is_empty() {
        None
    } else {
        BackupManifest::parse(&manifest).map_err(BackupError::Manifest)?;
        let key = catalog::manifest_key(&id);
        store
            .put_bytes(&key, manifest.clone(), PutMode::Replace)
            .await?;
        Some(key)
    };

    // The WAL from start to end must be in the archive before the backup is usable.
    for tli in timelines_needing_history(header.timeline, end_timeline) {
        let (_, content) = conn.timeline_history(tli).await?;
        store
            .put_bytes(&layout::history_key(tli), content, PutMode::NoOverwrite)
            .await?;
    }
    let first = SegmentId::containing(header.timeline, header.start_lsn, seg_size);
    // The last byte needed is just before the end position (XLByteToPrevSeg, as the server
    // does when it picks the WAL to send): an end exactly at a segment boundary, as a standby
    // can report, needs nothing of the next segment.
    let last = SegmentId::containing(end_timeline, Lsn(end_lsn.0.saturating_sub(1)), seg_size);
    check_wal_present(store.as_ref(), seg_size, first, last).await?;
    conn.close().await; // drops the temporary slot

    let stored_manifest = manifest.len() as u64;
    let info = BackupInfo {
        format: catalog::FORMAT,
        id: id.clone(),
        label,
        system_identifier: sys.system_identifier.to_string(),
        server_version_num: version,
        timeline: header.timeline,
        start_lsn: header.start_lsn,
        end_lsn,
        end_timeline,
        start_time: rfc3339_micros(start_time),
        stop_time: rfc3339_micros(stop_time),
        wal_segment_size: u64::from(seg_size.bytes()),
        compression: opts.compression.to_string(),
        data_bytes: run.done.iter().map(|a| a.tar_bytes).sum(),
        stored_bytes: run.done.iter().map(|a| a.stored_bytes).sum::<u64>() + stored_manifest,
        archives: std::mem::take(&mut run.done),
        manifest_key,
        wal_start_segment: first.file_name(seg_size),
        wal_end_segment: last.file_name(seg_size),
        source: opts.conninfo.display_safe(),
        walagent_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    store
        .put_bytes(
            &catalog::info_key(&id),
            Bytes::from(info.to_json()),
            PutMode::NoOverwrite,
        )
        .await?;
    tracing::info!(%id, end = %end_lsn, wal_files = run.wal.archived, "backup complete");
    Ok(info)
}

/// Timelines whose history files a restore of this backup needs (none on timeline 1).
fn timelines_needing_history(start: Timeline, end: Timeline) -> Vec<Timeline> {
    let (start, end) = (start.get(), end.get());
    (start.max(2)..=end.max(start))
        .filter_map(Timeline::new)
        .collect()
}

/// An id not used yet: the start time, with `-2`, `-3`... when taken.
async fn free_id(store: &dyn Store, t: SystemTime) -> Result<String, BackupError> {
    let base = catalog::id_for(t);
    let mut id = base.clone();
    for n in 2.. {
        if store.list(&catalog::backup_prefix(&id)).await?.is_empty() {
            return Ok(id);
        }
        id = format!("{base}-{n}");
    }
    unreachable!()
}

/// Fails unless every segment from `first` to `last` is in the archive as a complete segment
/// (the last one may be a `.partial` when the source was a standby).
async fn check_wal_present(
    store: &dyn Store,
    seg_size: SegmentSize,
    first: SegmentId,
    last: SegmentId,
) -> Result<(), BackupError> {
    let objects = store.list(layout::WAL_PREFIX).await?;
    let index = crate::archive::index::WalIndex::from_objects(&objects, seg_size);
    for segno in first.segno..=last.segno {
        let ok = [first.timeline, last.timeline].iter().any(|&tli| {
            let id = SegmentId::new(tli, segno);
            index.has_segment(id) || (segno == last.segno && index.has_partial(id))
        });
        if !ok {
            let name = SegmentId::new(last.timeline, segno).file_name(seg_size);
            return Err(BackupError::WalMissing {
                name,
                first: first.file_name(seg_size),
                last: last.file_name(seg_size),
            });
        }
    }
    Ok(())
}

// ---- one run ----------------------------------------------------------------------------------

struct Run<'a> {
    store: Arc<dyn Store>,
    id: String,
    opts: &'a BackupOptions,
    current: Option<ArchiveSink>,
    done: Vec<TarArchive>,
    manifest: BytesMut,
    wal: WalTee,
}

impl Run<'_> {
    async fn handle(
        &mut self,
        m: BackupCopyMessage,
        progress: &Progress,
    ) -> Result<(), BackupError> {
        match m {
            BackupCopyMessage::NewArchive {
                name,
                tablespace_path,
            } => {
                self.finish_archive().await?;
                let oid = if tablespace_path.is_empty() {
                    None
                } else {
                    name.strip_suffix(".tar").and_then(|s| s.parse().ok())
                };
                let location = (!tablespace_path.is_empty()).then(|| tablespace_path.clone());
                let key =
                    catalog::archive_key(&self.id, &name, self.opts.compression.is_compressed());
                tracing::debug!(%name, %key, "archive starts");
                let writer = self.store.create_writer(&key).await?;
                // The budget's plan for this archive's kind (an S3 command's fixed share is
                // larger): stage queues, chunk size; the S3 writer takes its parts from it too.
                let plan =
                    crate::archive::memory::plan_for(ArchiveKind::of(&self.store.location()));
                self.current = Some(ArchiveSink::start(
                    &plan,
                    name,
                    key,
                    oid,
                    location,
                    writer,
                    self.opts.compression,
                    self.opts.compress_threads,
                )?);
            }
            BackupCopyMessage::ArchiveData(data) => {
                progress.add(data.len() as u64);
                let Some(sink) = &mut self.current else {
                    return Err(BackupError::DataOutsideArchive);
                };
                sink.feed(data, &mut self.wal).await?;
            }
            BackupCopyMessage::Progress(n) => progress.set(n),
            BackupCopyMessage::ManifestStart => self.finish_archive().await?,
            BackupCopyMessage::ManifestData(d) => self.manifest.extend_from_slice(&d),
        }
        Ok(())
    }

    async fn finish_archive(&mut self) -> Result<(), BackupError> {
        if let Some(sink) = self.current.take() {
            let done = sink.finish(&mut self.wal).await?;
            tracing::info!(archive = %done.name, tar_bytes = done.tar_bytes, stored_bytes = done.stored_bytes, "archive stored");
            self.done.push(done);
        }
        Ok(())
    }

    async fn abort(&mut self) {
        if let Some(sink) = self.current.take() {
            sink.abort().await;
        }
        // Finished archives of an unfinished backup: remove them, so only complete backups
        // occupy space (a crash leaves them; `backups` lists such ids as incomplete).
        for a in self.done.drain(..) {
            let _ = self.store.delete(&a.key).await;
        }
    }
}

// ---- one tar archive ------------------------------------------------------------------------

/// One tar archive on its way into the store: tar parser -> (zstd thread) -> uploader task.
struct ArchiveSink {
    name: String,
    key: String,
    oid: Option<u32>,
    location: Option<String>,
    parser: TarParser,
    events: Vec<TarEvent>,
    /// Inside an entry that is not forwarded (a WAL file).
    skipping: bool,
    pending: BytesMut,
    /// Bytes forwarded at a time.
    chunk: usize,
    tar_bytes: u64,
    tx: Option<mpsc::Sender<Bytes>>,
    compressor: Option<std::thread::JoinHandle<io::Result<()>>>,
    /// Taken when awaited (a JoinHandle must not be polled after it completed).
    uploader: Option<JoinHandle<Result<u64, StoreError>>>,
    commit: Arc<AtomicBool>,
}

impl ArchiveSink {
    // The plan is its own argument: the sink's sizes, decided by the caller per store kind.
    #[allow(clippy::too_many_arguments)]
    fn start(
        plan: &crate::archive::memory::MemoryPlan,
        name: String,
        key: String,
        oid: Option<u32>,
        location: Option<String>,
        mut writer: Box<dyn crate::archive::ObjectWriter>,
        compression: Compression,
        threads: u32,
    ) -> Result<ArchiveSink, BackupError> {
        let depth = plan.backup_queue.max(1);
        let (up_tx, mut up_rx) = mpsc::channel::<Bytes>(depth);
        let (input_tx, compressor) = match compression {
            Compression::None => (up_tx, None),
            Compression::Zstd { level } => {
                let (in_tx, in_rx) = mpsc::channel::<Bytes>(depth);
                let h = spawn_compressor(level, threads, plan, in_rx, up_tx).map_err(|source| {
                    BackupError::Compress {
                        name: name.clone(),
                        source,
                    }
                })?;
                (in_tx, Some(h))
            }
        };
        let commit = Arc::new(AtomicBool::new(false));
        let commit2 = commit.clone();
        let uploader = tokio::spawn(async move {
            while let Some(chunk) = up_rx.recv().await {
                if let Err(e) = writer.write(chunk).await {
                    writer.abort().await;
                    return Err(e);
                }
            }
            if commit2.load(Ordering::Acquire) {
                writer.finish().await
            } else {
                writer.abort().await;
                Ok(0)
            }
        });
        Ok(ArchiveSink {
            name,
            key,
            oid,
            location,
            parser: TarParser::new(),
            events: Vec::new(),
            skipping: false,
            pending: BytesMut::new(),
            chunk: plan.backup_chunk.max(1),
            tar_bytes: 0,
            tx: Some(input_tx),
            compressor,
            uploader: Some(uploader),
            commit,
        })
    }

    async fn feed(&mut self, data: Bytes, wal: &mut WalTee) -> Result<(), BackupError> {
        self.parser
            .feed(data, &mut self.events)
            .map_err(|source| BackupError::Tar {
                archive: self.name.clone(),
                source,
            })?;
        self.route(wal).await
    }

    async fn route(&mut self, wal: &mut WalTee) -> Result<(), BackupError> {
        let events = std::mem::take(&mut self.events);
        for ev in events {
            match ev {
                TarEvent::Entry { raw, meta } => {
                    if self.oid.is_none() && matches!(meta.kind, EntryKind::File) {
                        if let Some(name) = meta.path.strip_prefix("pg_wal/") {
                            if wal.wants(name) {
                                wal.begin(name, meta.size);
                                self.skipping = true;
                                continue;
                            }
                        }
                    }
                    self.forward(raw).await?;
                }
                TarEvent::Data(d) => {
                    if self.skipping {
                        wal.data(&d);
                    } else {
                        self.forward(d).await?;
                    }
                }
                TarEvent::EntryEnd { padding } => {
                    if self.skipping {
                        self.skipping = false;
                        wal.end().await?;
                    } else {
                        self.forward(padding).await?;
                    }
                }
                TarEvent::Trailer(t) => self.forward(t).await?,
            }
        }
        Ok(())
    }

    async fn forward(&mut self, b: Bytes) -> Result<(), BackupError> {
        if b.is_empty() {
            return Ok(());
        }
        self.tar_bytes += b.len() as u64;
        self.pending.extend_from_slice(&b);
        if self.pending.len() >= self.chunk {
            self.send_pending().await?;
        }
        Ok(())
    }

    async fn send_pending(&mut self) -> Result<(), BackupError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let chunk = self.pending.split().freeze();
        let Some(tx) = &self.tx else {
            return Ok(());
        };
        if tx.send(chunk).await.is_err() {
            // The compressor or the uploader stopped: its error says why.
            return Err(self.failure().await);
        }
        Ok(())
    }

    /// The error of whichever stage stopped.
    async fn failure(&mut self) -> BackupError {
        self.tx = None;
        if let Some(h) = self.compressor.take() {
            if let Ok(Err(e)) = tokio::task::spawn_blocking(move || h.join())
                .await
                .unwrap_or(Ok(Ok(())))
            {
                return BackupError::Compress {
                    name: self.name.clone(),
                    source: e,
                };
            }
        }
        match self.join_uploader().await {
            Some(Ok(Err(e))) => BackupError::Store(e),
            Some(Err(source)) => BackupError::Upload {
                key: self.key.clone(),
                source,
            },
            _ => BackupError::UploadStopped {
                key: self.key.clone(),
            },
        }
    }

    async fn finish(mut self, wal: &mut WalTee) -> Result<TarArchive, BackupError> {
        self.parser
            .finish(&mut self.events)
            .map_err(|source| BackupError::Tar {
                archive: self.name.clone(),
                source,
            })?;
        self.route(wal).await?;
        self.send_pending().await?;
        self.commit.store(true, Ordering::Release);
        self.tx = None; // end of input: the compressor finishes its frame, the uploader its object
        if let Some(h) = self.compressor.take() {
            let joined = tokio::task::spawn_blocking(move || h.join())
                .await
                .map_err(BackupError::Worker)?;
            match joined {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    self.commit.store(false, Ordering::Release);
                    return Err(BackupError::Compress {
                        name: self.name.clone(),
                        source: e,
                    });
                }
                Err(_) => {
                    return Err(BackupError::CompressPanicked {
                        name: self.name.clone(),
                    })
                }
            }
        }
        let stored = match self.join_uploader().await {
            Some(r) => r.map_err(|source| BackupError::Upload {
                key: self.key.clone(),
                source,
            })??,
            None => {
                return Err(BackupError::UploadStopped {
                    key: self.key.clone(),
                })
            }
        };
        Ok(TarArchive {
            name: self.name,
            key: self.key,
            tablespace_oid: self.oid,
            tablespace_location: self.location,
            tar_bytes: self.tar_bytes,
            stored_bytes: stored,
        })
    }

    async fn abort(mut self) {
        self.commit.store(false, Ordering::Release);
        self.tx = None;
        if let Some(h) = self.compressor.take() {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
        let _ = self.join_uploader().await;
    }

    async fn join_uploader(
        &mut self,
    ) -> Option<Result<Result<u64, StoreError>, tokio::task::JoinError>> {
        match self.uploader.take() {
            Some(h) => Some(h.await),
            None => None,
        }
    }
}

/// A zstd encoder on its own thread (with `threads` zstd workers): Bytes in, compressed chunks
/// of about the plan's chunk size out.
fn spawn_compressor(
    level: i32,
    threads: u32,
    plan: &crate::archive::memory::MemoryPlan,
    mut input: mpsc::Receiver<Bytes>,
    output: mpsc::Sender<Bytes>,
) -> io::Result<std::thread::JoinHandle<io::Result<()>>> {
    let chunk = plan.backup_chunk.max(1);
    let job = plan.backup_zstd_job;
    std::thread::Builder::new()
        .name("walagent-zstd".into())
        .spawn(move || {
            let sink = ChunkSender {
                buf: Vec::with_capacity(chunk),
                chunk,
                tx: output,
            };
            let mut enc = zstd::stream::write::Encoder::new(sink, level)?;
            enc.include_checksum(true)?;
            if threads > 1 {
                enc.multithread(threads)?;
                // Smaller jobs than zstd's default (4 x window) keep the workers' buffers small.
                enc.set_parameter(zstd::stream::raw::CParameter::JobSize(job))?;
            }
            while let Some(b) = input.blocking_recv() {
                enc.write_all(&b)?;
            }
            let mut sink = enc.finish()?;
            sink.send()?;
            Ok(())
        })
}

struct ChunkSender {
    buf: Vec<u8>,
    chunk: usize,
    tx: mpsc::Sender<Bytes>,
}

impl ChunkSender {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(self.chunk));
        self.tx
            .blocking_send(Bytes::from(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the upload stopped"))
    }
}

impl Write for ChunkSender {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(b);
        if self.buf.len() >= self.chunk {
            self.send()?;
        }
        Ok(b.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

// ---- WAL taken out of the tar ----------------------------------------------------------------

/// Archives the `pg_wal/` files of `base.tar` as `wal/` objects.
struct WalTee {
    store: Arc<dyn Store>,
    params: VerifyParams,
    compression: Compression,
    entry: Option<(String, BytesMut)>,
    /// A segment checked and compressed as its bytes go by (zstd), never held whole.
    streamed: Option<StreamedSegment>,
    /// WAL files archived from the tar.
    archived: usize,
}

/// One WAL segment of the tar on its way: checked and compressed piece by piece, so only its
/// compressed form is kept (the raw segment is recovered by decompressing it in the rare case
/// of a conflicting object). For an object store the compressed form goes to a temp file and is
/// sent from there (`Store::put_file`, streamed): held in memory it would be up to half a
/// segment beside the S3 part being filled, more than the 32MB plan has room for on S3.
struct StreamedSegment {
    name: String,
    id: SegmentId,
    checker: SegmentChecker,
    bad: Option<crate::wal::verify::VerifyError>,
    enc: Option<zstd::stream::write::Encoder<'static, SegmentSink>>,
    enc_err: Option<io::Error>,
}

/// Where a streamed segment's compressed bytes go.
enum SegmentSink {
    Memory(Vec<u8>),
    File(std::fs::File, SpooledBody),
}

impl Write for SegmentSink {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            SegmentSink::Memory(v) => v.write(b),
            SegmentSink::File(f, _) => f.write(b),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            SegmentSink::Memory(_) => Ok(()),
            SegmentSink::File(f, _) => f.flush(),
        }
    }
}

impl SegmentSink {
    /// A 0600 temp file in the system's temp directory (`TMPDIR`), removed when the
    /// [`SpooledBody`] is dropped.
    fn temp_file() -> io::Result<SegmentSink> {
        use std::os::unix::fs::OpenOptionsExt;
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            ".walagent-backup-wal-{}-{n}.zst.tmp",
            std::process::id()
        ));
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        Ok(SegmentSink::File(f, SpooledBody(path)))
    }
}

/// A compressed segment in a temp file; the file is removed on drop.
struct SpooledBody(std::path::PathBuf);

impl Drop for SpooledBody {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A compressed segment ready to be stored.
enum SegmentBody {
    Memory(Bytes),
    File(SpooledBody),
}

impl StreamedSegment {
    fn start(
        name: &str,
        id: SegmentId,
        params: VerifyParams,
        seg_size: SegmentSize,
        size: u64,
        level: i32,
        spool: bool,
    ) -> io::Result<StreamedSegment> {
        let params = VerifyParams {
            timeline: id.timeline,
            ..params
        };
        let sink = if spool {
            SegmentSink::temp_file().unwrap_or_else(|e| {
                tracing::debug!(name, "no temp file for the segment ({e}); kept in memory");
                SegmentSink::Memory(Vec::new())
            })
        } else {
            SegmentSink::Memory(Vec::new())
        };
        let mut enc = zstd::stream::write::Encoder::new(sink, level)?;
        enc.include_checksum(true)?;
        enc.include_contentsize(true)?;
        enc.set_pledged_src_size(Some(size))?;
        Ok(StreamedSegment {
            name: name.to_string(),
            id,
            checker: SegmentChecker::new(params, id.start_lsn(seg_size)),
            bad: None,
            enc: Some(enc),
            enc_err: None,
        })
    }

    fn data(&mut self, d: &[u8]) {
        if self.bad.is_none() {
            if let Err(e) = self.checker.update(d) {
                self.bad = Some(e);
            }
        }
        if self.bad.is_some() || self.enc_err.is_some() {
            return;
        }
        if let Some(enc) = &mut self.enc {
            if let Err(e) = enc.write_all(d) {
                self.enc_err = Some(e);
            }
        }
    }

    /// The check's verdict and the compressed segment.
    fn finish(self) -> Result<(crate::wal::verify::SegmentCheck, SegmentBody), BackupError> {
        let name = self.name;
        let check = match self.bad {
            Some(e) => Err(e),
            None => self.checker.finish(),
        }
        .map_err(|e| BackupError::BadWal {
            name: name.clone(),
            source: Box::new(e),
        })?;
        let body = match (self.enc_err, self.enc) {
            (Some(e), _) => Err(e),
            (None, Some(enc)) => enc.finish().and_then(|sink| match sink {
                SegmentSink::Memory(v) => Ok(SegmentBody::Memory(Bytes::from(v))),
                SegmentSink::File(mut f, body) => {
                    f.flush()?;
                    Ok(SegmentBody::File(body))
                }
            }),
            (None, None) => Err(io::Error::other("no encoder")),
        }
        .map_err(|source| BackupError::Compress {
            name: name.clone(),
            source,
        })?;
        Ok((check, body))
    }
}

impl WalTee {
    fn wants(&self, name: &str) -> bool {
        SegmentId::parse_file_name(name, self.params.segment_size).is_some()
            || parse_history_file_name(name).is_some_and(|t| history_file_name(t) == name)
    }

    fn begin(&mut self, name: &str, size: u64) {
        let seg_size = self.params.segment_size;
        if let (Compression::Zstd { level }, Some(id)) =
            (self.compression, SegmentId::parse_file_name(name, seg_size))
        {
            // An object store gets the compressed segment from a temp file (see
            // StreamedSegment); a local archive's put is a file write of the bytes in memory.
            let spool = self.store.local_root().is_none();
            match StreamedSegment::start(name, id, self.params, seg_size, size, level, spool) {
                Ok(s) => {
                    self.streamed = Some(s);
                    return;
                }
                Err(e) => tracing::debug!(
                    name,
                    "zstd encoder not available ({e}); buffering the segment"
                ),
            }
        }
        let cap = size.min(u64::from(seg_size.bytes())) as usize;
        self.entry = Some((name.to_string(), BytesMut::with_capacity(cap)));
    }

    fn data(&mut self, d: &[u8]) {
        if let Some(s) = &mut self.streamed {
            s.data(d);
        } else if let Some((_, buf)) = &mut self.entry {
            buf.extend_from_slice(d);
        }
    }

    async fn end(&mut self) -> Result<(), BackupError> {
        if let Some(s) = self.streamed.take() {
            let id = s.id;
            let (check, body) = s.finish()?;
            let key = layout::segment_key(
                id,
                self.params.segment_size,
                self.compression,
                !check.complete,
            );
            return match body {
                SegmentBody::Memory(body) => {
                    self.store_segment(key, body, None, check.complete).await
                }
                SegmentBody::File(file) => self.store_spooled(key, file, check.complete).await,
            };
        }
        let Some((name, buf)) = self.entry.take() else {
            return Ok(());
        };
        let buf = buf.freeze();
        if let Some(tli) = parse_history_file_name(&name) {
            self.store
                .put_bytes(&layout::history_key(tli), buf, PutMode::NoOverwrite)
                .await?;
            self.archived += 1;
            return Ok(());
        }
        let seg_size = self.params.segment_size;
        let Some(id) = SegmentId::parse_file_name(&name, seg_size) else {
            return Ok(());
        };
        let params = VerifyParams {
            timeline: id.timeline,
            ..self.params
        };
        let start = id.start_lsn(seg_size);
        let level = match self.compression {
            Compression::None => None,
            Compression::Zstd { level } => Some(level),
        };
        let check_buf = buf.clone();
        let (check, body) = tokio::task::spawn_blocking(move || {
            let check = check_segment(params, start, &check_buf);
            let body = match (&check, level) {
                (Ok(_), Some(level)) => {
                    crate::archive::compress::compress_bulk(&check_buf, level).map(Bytes::from)
                }
                _ => Ok(check_buf),
            };
            (check, body)
        })
        .await
        .map_err(BackupError::Worker)?;
        let check = check.map_err(|e| BackupError::BadWal {
            name: name.clone(),
            source: Box::new(e),
        })?;
        let body = body.map_err(|source| BackupError::Compress {
            name: name.clone(),
            source,
        })?;
        let key = layout::segment_key(id, seg_size, self.compression, !check.complete);
        self.store_segment(key, body, Some(buf), check.complete)
            .await
    }

    /// [`WalTee::store_segment`] for a compressed segment in a temp file: sent from the file;
    /// only on a conflict is it read back (to compare its WAL with the stored object's).
    async fn store_spooled(
        &mut self,
        key: String,
        file: SpooledBody,
        complete: bool,
    ) -> Result<(), BackupError> {
        match self
            .store
            .put_file(&key, &file.0, PutMode::NoOverwrite)
            .await
        {
            Ok(()) => {
                tracing::debug!(%key, complete, "WAL from the backup archived");
                self.archived += 1;
                Ok(())
            }
            Err(StoreError::Conflict { .. }) => {
                let path = file.0.clone();
                let body =
                    tokio::fs::read(&path)
                        .await
                        .map_err(|source| BackupError::Compress {
                            name: key.rsplit('/').next().unwrap_or(&key).to_string(),
                            source,
                        })?;
                drop(file);
                // The same comparison as for a body in memory (its put conflicts again).
                self.store_segment(key, Bytes::from(body), None, complete)
                    .await
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Stores a checked segment `body` (no overwrite); `raw` is its WAL when at hand, else the
    /// body is decompressed to compare it with a conflicting object.
    async fn store_segment(
        &mut self,
        key: String,
        body: Bytes,
        raw: Option<Bytes>,
        complete: bool,
    ) -> Result<(), BackupError> {
        match self
            .store
            .put_bytes(&key, body.clone(), PutMode::NoOverwrite)
            .await
        {
            Ok(()) => {}
            Err(StoreError::Conflict { .. })
                if {
                    // The body is decompressed as it is compared, never whole.
                    let raw = match raw {
                        Some(r) => crate::archive::segment::Raw::Bytes(r),
                        None => crate::archive::segment::Raw::Zstd(body),
                    };
                    // `walagent stream` got there first, maybe with another encoding of the
                    // same WAL.
                    crate::archive::same_wal_content(self.store.as_ref(), &key, raw).await?
                } => {}
            // A partial that a running `walagent stream` stored with a different tail is fine:
            // the complete segment will follow from the stream.
            Err(StoreError::Conflict { .. }) if !complete => {
                tracing::warn!(%key, "a different partial segment is already archived; kept it");
            }
            Err(e) => return Err(e.into()),
        }
        tracing::debug!(%key, complete, "WAL from the backup archived");
        self.archived += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::temporary_slot_name;

    #[test]
    fn temporary_slot_names_differ_within_a_process() {
        let a = temporary_slot_name(u32::MAX);
        let b = temporary_slot_name(u32::MAX);
        assert_ne!(a, b);
        for name in [a, b] {
            assert!(name.len() <= 63, "{name}");
            assert!(name
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_'));
        }
    }

    use super::*;

    const FIXTURE_SYSID: u64 = 7710843067740758272;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!(
            "{}/tests/fixtures/wal/{name}.zst",
            env!("CARGO_MANIFEST_DIR")
        );
        zstd::stream::decode_all(&std::fs::read(path).unwrap()[..]).unwrap()
    }

    fn tee(store: Arc<dyn Store>) -> WalTee {
        WalTee {
            store,
            params: VerifyParams {
                system_identifier: FIXTURE_SYSID,
                segment_size: SegmentSize::new(1 << 20).unwrap(),
                timeline: tl(1),
            },
            compression: Compression::Zstd { level: 1 },
            entry: None,
            streamed: None,
            archived: 0,
        }
    }

    async fn pass(t: &mut WalTee, name: &str, wal: &[u8]) -> Result<(), BackupError> {
        t.begin(name, wal.len() as u64);
        assert!(
            t.streamed.is_some() && t.entry.is_none(),
            "zstd segments stream"
        );
        for piece in wal.chunks(77_777) {
            t.data(piece);
        }
        t.end().await
    }

    /// A segment of the tar is checked and compressed piece by piece; what is stored holds the
    /// same WAL; the same WAL already stored with another encoding is no conflict (the body is
    /// decompressed to compare), other bytes under its name are; bad WAL is refused.
    #[tokio::test]
    async fn tar_wal_streams_through_check_and_zstd() {
        let dir = std::env::temp_dir().join(format!("walagent-take-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store: Arc<dyn Store> = Arc::new(crate::archive::LocalStore::open(&dir).unwrap());
        let name = "000000010000000000000009";
        let wal = fixture(name);
        let mut t = tee(store.clone());
        pass(&mut t, name, &wal).await.unwrap();
        assert_eq!(t.archived, 1);
        let keys: Vec<String> = store
            .list("wal/")
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        assert_eq!(keys.len(), 1, "{keys:?}");
        let stored = crate::archive::read_wal_object(store.as_ref(), &keys[0])
            .await
            .unwrap();
        assert_eq!(stored.as_deref(), Some(&wal[..]));
        // The same WAL at another level under that name: fine.
        store.delete(&keys[0]).await.unwrap();
        let other = crate::archive::compress::compress_bulk(&wal, 9).unwrap();
        store
            .put_bytes(&keys[0], Bytes::from(other), PutMode::NoOverwrite)
            .await
            .unwrap();
        pass(&mut t, name, &wal).await.unwrap();
        assert_eq!(t.archived, 2);
        // Other WAL under that name: a conflict.
        store.delete(&keys[0]).await.unwrap();
        let foreign =
            crate::archive::compress::compress_bulk(&fixture("00000001000000000000000A"), 1)
                .unwrap();
        store
            .put_bytes(&keys[0], Bytes::from(foreign), PutMode::NoOverwrite)
            .await
            .unwrap();
        let err = pass(&mut t, name, &wal).await.unwrap_err();
        assert!(
            matches!(err, BackupError::Store(StoreError::Conflict { .. })),
            "{err:?}"
        );
        // A flipped byte in a record: refused before anything is stored.
        let mut bad = wal.clone();
        bad[30_000] ^= 0x40;
        let err = pass(&mut tee(store.clone()), "00000001000000000000000A", &bad)
            .await
            .unwrap_err();
        assert!(matches!(err, BackupError::BadWal { .. }), "{err:?}");
        // A short segment too.
        let err = pass(
            &mut tee(store.clone()),
            "00000001000000000000000B",
            &wal[..1 << 19],
        )
        .await
        .unwrap_err();
        assert!(matches!(err, BackupError::BadWal { .. }), "{err:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
    use crate::wal::timeline::tl;

    #[test]
    fn history_timelines() {
        assert!(timelines_needing_history(tl(1), tl(1)).is_empty());
        assert_eq!(timelines_needing_history(tl(2), tl(2)), vec![tl(2)]);
        assert_eq!(timelines_needing_history(tl(2), tl(3)), vec![tl(2), tl(3)]);
        assert_eq!(timelines_needing_history(tl(1), tl(2)), vec![tl(2)]);
    }

    #[test]
    fn micros() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_micros(1_700_000_000_123_456);
        assert_eq!(rfc3339_micros(t), "2023-11-14T22:13:20.123456Z");
    }
}
