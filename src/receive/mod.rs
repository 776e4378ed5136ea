//! The streaming loop of `walagent stream`: resume point, `.partial` segments in the spool,
//! verification, fsync and feedback, reconnects and timeline switches.
//!
//! Durability rule: the flush position sent to the server never exceeds the end of the WAL
//! prefix that is durable, meaning complete segments stored in the archive (or, with
//! `--synchronous`, fsynced in the spool) followed by the fsynced part of the current partial.
//! See `proto-notes/durability.md`.

pub mod archiver;
pub mod flush;
pub mod resume;
pub mod spool;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::archive::{layout, ArchiveMeta, Compression, PutMode, Store, StoreError};
use crate::protocol::codec::{pg_now, StatusUpdate};
use crate::protocol::{
    ConnInfo, Connection, ProtocolError, StartOutcome, StreamEnd, StreamEvent, TimelineSwitch,
};
use crate::wal::verify::{check_segment, VerifyError, VerifyParams, WalVerifier};
use crate::wal::{history_file_name, Lsn, SegmentId, SegmentSize};
use archiver::{Archiver, ArchiverConfig, ArchiverError, Job};
use resume::ResumeInput;
use spool::{PartialSegment, Spool, SpoolIdentity};

/// Everything `walagent stream` was asked to do.
#[derive(Clone)]
pub struct StreamOptions {
    pub conninfo: ConnInfo,
    pub store: Arc<dyn Store>,
    pub spool_dir: PathBuf,
    pub slot: String,
    pub create_slot: bool,
    pub endpos: Option<Lsn>,
    pub no_loop: bool,
    pub synchronous: bool,
    pub compression: Compression,
    pub status_interval: Duration,
    /// What the flush position reported to the server means.
    pub ack: AckMode,
    /// Upload the segment being received as `<name>.partial` this often (None: only on stop).
    pub partial_interval: Option<Duration>,
    /// Most bytes of complete segments waiting in the spool before the receiver stops reading.
    pub spool_max_bytes: u64,
    /// Segments compressed and stored at once.
    pub archive_workers: usize,
    /// What the spool is bound to besides the cluster: `s3://bucket/prefix` or the archive
    /// directory's absolute path (see `spool::SpoolIdentity`).
    pub archive_identity: String,
    /// How long a requested stop may take (making WAL durable, final uploads) before walagent
    /// gives up and exits non-zero, leaving the rest in the spool for the next start.
    pub stop_timeout: Duration,
}

/// What "flushed" means in the status updates sent to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckMode {
    /// Durable in the archive: complete segments stored there, then the newest partial upload.
    Archived,
    /// Fsynced in the local spool (segments are fsynced when they complete).
    Fsync,
}

impl std::str::FromStr for AckMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "archived" => Ok(AckMode::Archived),
            "fsync" => Ok(AckMode::Fsync),
            _ => Err(format!("unknown ack mode {s:?}: use archived or fsync")),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
    #[error("WAL verification failed, refusing to archive it: {0}")]
    Verify(#[from] VerifyError),
    #[error(transparent)]
    Archiver(#[from] ArchiverError),
    #[error("archive {location}: {source}")]
    Store {
        location: String,
        #[source]
        source: StoreError,
    },
    #[error(transparent)]
    Meta(#[from] crate::archive::meta::MetaError),
    #[error(transparent)]
    SpoolBinding(#[from] spool::BindError),
    #[error(transparent)]
    Lock(#[from] crate::archive::lock::LockError),
    #[error("stop took longer than {secs} s ({why}); not yet archived, kept in the spool {spool}: {pending}")]
    StopTimedOut {
        secs: u64,
        why: &'static str,
        spool: String,
        pending: String,
    },
    #[error("replication slot {slot:?} on {target} was invalidated by the server (wal_status lost, max_slot_wal_keep_size) and the WAL from {needed} on is gone")]
    SlotInvalidated {
        slot: String,
        target: String,
        needed: Lsn,
    },
    #[error("spool {path}: {source}")]
    Spool {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("replication slot {slot:?} does not exist on {target}")]
    SlotMissing { slot: String, target: String },
    #[error(
        "replication slot {slot:?} on {target} is a {kind} slot; walagent needs a physical slot"
    )]
    SlotNotPhysical {
        slot: String,
        target: String,
        kind: String,
    },
    #[error("server {target} runs PostgreSQL {version}; walagent needs PostgreSQL 15 or newer")]
    ServerTooOld { target: String, version: u32 },
    #[error("server sent WAL starting at {got}, expected {expected}")]
    OutOfOrder { got: Lsn, expected: Lsn },
    #[error("the archive continues timeline {archive_tli} but the server is on timeline {server_tli}; is this archive from another server?")]
    TimelineAhead { archive_tli: u32, server_tli: u32 },
    #[error("server announced timeline {next} starting at {start} after timeline {current} ended at {end}, which is not a valid switch")]
    BadSwitch {
        current: u32,
        end: Lsn,
        next: u32,
        start: Lsn,
    },
    #[error("the server at {target} is now system {now}, not {before}; refusing to mix WAL from two clusters")]
    SystemChanged {
        target: String,
        before: u64,
        now: u64,
    },
}

impl ReceiveError {
    /// The fix, where one is known.
    pub fn hint(&self) -> Option<String> {
        match self {
            ReceiveError::Protocol(p) => p.hint(),
            ReceiveError::SlotMissing { slot, .. } => Some(format!(
                "create it with --create-slot, or run SELECT pg_create_physical_replication_slot('{slot}', true) on the server"
            )),
            ReceiveError::Archiver(a) => a.hint(),
            ReceiveError::Verify(_) => Some(
                "the WAL received does not match its checksums or page headers; check the server and network, \
                 the archive was left as it was"
                    .into(),
            ),
            ReceiveError::Store { source, .. } => source.hint(),
            ReceiveError::Spool { source, .. } => Some(
                if source.raw_os_error() == Some(libc::ENOSPC) {
                    "the spool's filesystem is full: free space or point --spool at a larger one; \
                     nothing acknowledged is lost (the slot holds the WAL), the next start resumes"
                } else {
                    "check the spool directory's permissions and free space"
                }
                .into(),
            ),
            ReceiveError::Meta(e) => e.hint(),
            ReceiveError::SlotInvalidated { slot, .. } => Some(format!(
                "the archive now has a gap: drop and recreate the slot (SELECT pg_drop_replication_slot('{slot}'); then \
                 walagent stream --create-slot), take a new base backup with walagent backup, and consider raising \
                 max_slot_wal_keep_size"
            )),
            ReceiveError::SpoolBinding(e) => e.hint(),
            ReceiveError::Lock(e) => e.hint(),
            ReceiveError::StopTimedOut { .. } => Some(
                "nothing acknowledged is lost: the replication slot still holds that WAL and the next \
                 walagent stream with the same spool archives it first (raise --stop-timeout to wait longer)"
                    .into(),
            ),
            _ => None,
        }
    }

    /// Errors a reconnect may cure.
    fn is_transient(&self) -> bool {
        match self {
            ReceiveError::Protocol(p) => p.is_transient() || p.sqlstate() == Some("55006"),
            ReceiveError::OutOfOrder { .. } => true,
            _ => false,
        }
    }
}

/// How `run` ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finished {
    /// Reached `--endpos`.
    EndPos(Lsn),
    /// Stopped by SIGTERM/SIGINT.
    Signal(Lsn),
    /// The server went away and `--no-loop` was given.
    Disconnected(Lsn),
}

/// Why one replication stream ended.
enum StreamOutcome {
    Switch(TimelineSwitch),
    Stopped,
    ServerGone,
}

/// State that lives across reconnects.
struct Receiver {
    opts: StreamOptions,
    shutdown: watch::Receiver<u32>,
    seg_size: SegmentSize,
    system_id: u64,
    spool: Spool,
    archiver: Archiver,
    /// Next stream start: a segment start on a timeline.
    timeline: u32,
    start: Lsn,
    /// End of the last segment completed in this process (or the resume point).
    completed_upto: Lsn,
    /// Last status sent, to avoid repeating identical updates.
    last_sent: (Lsn, Lsn),
    /// End of the last partial snapshot queued, and a counter for their temp names.
    last_snapshot: Lsn,
    snapshot_seq: u64,
}

/// Runs `walagent stream` until endpos, a signal, or (with `--no-loop`) a disconnect.
/// `shutdown` counts the stop requests (SIGTERM/SIGINT) received so far.
///
/// Holds the spool's lock (and a local archive's) for the whole run. A stop is bounded: after
/// the first request the run gets `stop_timeout` to make everything durable and exit cleanly; a
/// second request, or the timeout, ends it at once with [`ReceiveError::StopTimedOut`], which
/// names what stays in the spool. Either way nothing acknowledged is at risk: the flush position
/// sent to the server never covered WAL that is only in memory.
pub async fn run(
    opts: StreamOptions,
    shutdown: watch::Receiver<u32>,
) -> Result<Finished, ReceiveError> {
    std::fs::create_dir_all(&opts.spool_dir).map_err(|source| ReceiveError::Spool {
        path: opts.spool_dir.display().to_string(),
        source,
    })?;
    let _spool_lock = crate::archive::lock::DirLock::acquire(&opts.spool_dir, "spool")?;
    let _archive_lock = match opts.store.local_root() {
        Some(root) => Some(crate::archive::lock::DirLock::acquire(&root, "archive")?),
        None => None,
    };
    let mut signals = shutdown.clone();
    let work = run_until_stopped(opts.clone(), shutdown);
    tokio::pin!(work);
    tokio::select! {
        r = &mut work => return r,
        _ = wait_count(&mut signals, 1) => {}
    }
    tokio::select! {
        r = &mut work => r,
        _ = tokio::time::sleep(opts.stop_timeout) => Err(stop_cut_short(&opts, "the stop timeout ran out")),
        _ = wait_count(&mut signals, 2) => Err(stop_cut_short(&opts, "a second stop signal arrived")),
    }
}

/// The error for a stop that could not finish: names the spool files left for the next start.
fn stop_cut_short(opts: &StreamOptions, why: &'static str) -> ReceiveError {
    let names = spool::wal_file_names(&opts.spool_dir);
    let pending = match names.len() {
        0 => "nothing".to_string(),
        1..=4 => names.join(", "),
        n => format!("{n} files, {} .. {}", names[0], names[n - 1]),
    };
    ReceiveError::StopTimedOut {
        secs: opts.stop_timeout.as_secs(),
        why,
        spool: opts.spool_dir.display().to_string(),
        pending,
    }
}

async fn wait_count(rx: &mut watch::Receiver<u32>, n: u32) {
    while *rx.borrow_and_update() < n {
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

async fn run_until_stopped(
    opts: StreamOptions,
    mut shutdown: watch::Receiver<u32>,
) -> Result<Finished, ReceiveError> {
    let mut backoff = Backoff::new();
    let mut receiver: Option<Receiver> = None;
    loop {
        let attempt = async {
            let conn = Connection::connect(&opts.conninfo).await?;
            tracing::info!(server = conn.target(), tls = conn.is_tls(), "connected");
            Ok::<_, ReceiveError>(conn)
        };
        let conn = tokio::select! {
            c = attempt => c,
            _ = wait_true(&mut shutdown) => return finish(receiver, Finished::Signal).await,
        };
        let result = match conn {
            Ok(mut conn) => {
                let r = match receiver.take() {
                    Some(r) => r.reconnected(&mut conn).await.map(|_| r),
                    None => Receiver::first_connect(&opts, &mut conn, shutdown.clone()).await,
                };
                match r {
                    Ok(mut r) => {
                        let out = r.stream_loop(&mut conn, &mut backoff).await;
                        receiver = Some(r);
                        out
                    }
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(Some(done)) => return finish(receiver, |_| done).await,
            Ok(None) if opts.no_loop => return finish(receiver, Finished::Disconnected).await,
            Ok(None) => tracing::warn!("server closed the stream; reconnecting"),
            Err(e) if e.is_transient() && !opts.no_loop => {
                let hint = e
                    .hint()
                    .map(|h| format!(" (hint: {h})"))
                    .unwrap_or_default();
                tracing::warn!("{e}{hint}; retrying in {:?}", backoff.peek());
            }
            Err(e) => {
                let e = explain_removed_wal(&opts, e, receiver.as_ref()).await;
                if let Some(r) = receiver.take() {
                    // Keep what was received safe before reporting the error (unless the error
                    // is the archiver's own: then there is nothing left to wait for).
                    if !r.archiver.has_failed() {
                        if let Err(ae) = r.archiver.finish().await {
                            tracing::error!("{ae}");
                        }
                    }
                }
                return Err(e);
            }
        }
        let delay = backoff.next_delay();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = wait_true(&mut shutdown) => return finish(receiver, Finished::Signal).await,
        }
    }
}

/// "Requested WAL segment has already been removed" (58P01, sent by the walsender once it
/// cannot read the WAL asked for) although walagent streams from a slot: ask the server about the
/// slot on a new connection (the old one is gone with the error). An invalidated slot
/// (max_slot_wal_keep_size; READ_REPLICATION_SLOT shows no restart_lsn) gets its own error and fix.
async fn explain_removed_wal(
    opts: &StreamOptions,
    e: ReceiveError,
    receiver: Option<&Receiver>,
) -> ReceiveError {
    if !matches!(&e, ReceiveError::Protocol(p) if p.sqlstate() == Some("58P01")) {
        return e;
    }
    let Ok(mut conn) = Connection::connect(&opts.conninfo).await else {
        return e;
    };
    match conn.read_replication_slot(&opts.slot).await {
        Ok(Some(s)) if s.restart_lsn.is_none() => ReceiveError::SlotInvalidated {
            slot: opts.slot.clone(),
            target: conn.target().to_string(),
            needed: receiver.map(|r| r.start).unwrap_or_default(),
        },
        _ => e,
    }
}

/// Lets the archiver store what is queued, then reports how the run ended.
async fn finish(
    receiver: Option<Receiver>,
    how: impl FnOnce(Lsn) -> Finished,
) -> Result<Finished, ReceiveError> {
    let pos = receiver.as_ref().map(|r| r.start).unwrap_or_default();
    if let Some(r) = receiver {
        r.archiver.finish().await?;
    }
    Ok(how(pos))
}

async fn wait_true(rx: &mut watch::Receiver<u32>) {
    wait_count(rx, 1).await
}

struct Backoff {
    next: Duration,
}

impl Backoff {
    const MIN: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(30);

    fn new() -> Self {
        Backoff { next: Self::MIN }
    }
    fn peek(&self) -> Duration {
        self.next
    }
    fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        d
    }
    fn reset(&mut self) {
        self.next = Self::MIN;
    }
}

/// Moves a spool file that must not be used out of the way, with a warning naming it.
fn set_aside(spool: &Spool, path: &std::path::Path, why: &str) -> Result<(), ReceiveError> {
    let to = spool.set_aside(path).map_err(|e| spool_err(spool, e))?;
    tracing::warn!(file = %path.display(), moved_to = %to.display(), "spool file set aside, not used: {why}");
    Ok(())
}

fn spool_err(spool: &Spool, source: std::io::Error) -> ReceiveError {
    ReceiveError::Spool {
        path: spool.dir().display().to_string(),
        source,
    }
}

impl Receiver {
    async fn first_connect(
        opts: &StreamOptions,
        conn: &mut Connection,
        shutdown: watch::Receiver<u32>,
    ) -> Result<Receiver, ReceiveError> {
        let store = opts.store.clone();
        let store_err = |source| ReceiveError::Store {
            location: store.location(),
            source,
        };
        let version = conn.server_version_num().await?;
        if version < 150000 {
            return Err(ReceiveError::ServerTooOld {
                target: conn.target().to_string(),
                version,
            });
        }
        let sys = conn.identify_system().await?;
        let seg_size = conn.wal_segment_size().await?;
        tracing::info!(
            system = sys.system_identifier,
            timeline = sys.timeline,
            position = %sys.xlogpos,
            segment_size = %seg_size,
            "server identified"
        );

        ArchiveMeta::ensure(store.as_ref(), sys.system_identifier, seg_size, version).await?;
        let slot_created = Self::ensure_slot(opts, conn).await?;

        // The spool must be this cluster's and this archive's before anything in it counts.
        let spool =
            Spool::open(&opts.spool_dir, seg_size).map_err(|source| ReceiveError::Spool {
                path: opts.spool_dir.display().to_string(),
                source,
            })?;
        let inside_archive = store.local_root().is_some_and(|root| {
            match (
                std::fs::canonicalize(root),
                std::fs::canonicalize(spool.dir()),
            ) {
                (Ok(r), Ok(s)) => s.starts_with(r),
                _ => false,
            }
        });
        spool.bind(
            &SpoolIdentity {
                system_identifier: sys.system_identifier.to_string(),
                wal_segment_size: seg_size.bytes(),
                archive: opts.archive_identity.clone(),
            },
            inside_archive,
        )?;
        let contents = spool.scan().map_err(|e| spool_err(&spool, e))?;
        let objects = store.list(layout::WAL_PREFIX).await.map_err(store_err)?;
        let mut input = ResumeInput::default();
        for o in &objects {
            if let Some(layout::WalObject::Segment { id, partial, .. }) =
                layout::parse_wal_key(&o.key, seg_size)
            {
                if partial {
                    input.archived_partials.push(id);
                } else {
                    input.archived.push(id);
                }
            }
        }

        // Every spool file is checked against this cluster (long page header: system id and
        // segment size; page addresses and timelines; record CRCs) before it counts. A ready file
        // must be whole: a zeroed tail (lost before it reached the disk) is incomplete even
        // though every byte before it verifies. A partial counts when its first page verifies
        // (its tail is re-streamed anyway). Files that fail are set aside, never trusted.
        let params = |tli| VerifyParams {
            system_identifier: sys.system_identifier,
            segment_size: seg_size,
            timeline: tli,
        };
        let mut partial_lens = std::collections::HashMap::new();
        for &id in &contents.ready {
            if input.archived.contains(&id) {
                input.ready.push(id); // removed below
                continue;
            }
            let path = spool.ready_path(id);
            let bytes = std::fs::read(&path).map_err(|e| spool_err(&spool, e))?;
            match check_segment(params(id.timeline), id.start_lsn(seg_size), &bytes) {
                Ok(c) if c.complete => input.ready.push(id),
                Ok(c) => set_aside(
                    &spool,
                    &path,
                    &format!("incomplete: WAL ends at {}", c.data_end),
                )?,
                Err(e) => set_aside(&spool, &path, &e.to_string())?,
            }
        }
        for &id in &contents.partials {
            let path = spool.partial_path(id);
            let bytes = std::fs::read(&path).map_err(|e| spool_err(&spool, e))?;
            let start = id.start_lsn(seg_size);
            let mut v = WalVerifier::new(params(id.timeline), start);
            let verified = match v.feed(&bytes) {
                Ok(()) => bytes.len() as u64,
                Err(e) if e.lsn() > start => e.lsn().0 - start.0,
                Err(e) => {
                    set_aside(&spool, &path, &e.to_string())?;
                    continue;
                }
            };
            partial_lens.insert(id, verified);
            input.partials.push(id);
        }

        input.fallback = match resume::archive_start(&input.archived, &input.archived_partials) {
            Some(s) => s,
            None => {
                let slot = conn.read_replication_slot(&opts.slot).await?;
                match slot.and_then(|s| Some((s.restart_timeline?, s.restart_lsn?))) {
                    Some((tli, lsn)) => SegmentId::containing(tli, lsn, seg_size),
                    None => SegmentId::containing(sys.timeline, sys.xlogpos, seg_size),
                }
            }
        };
        let plan = resume::plan(&input);
        let start = plan.start;
        if plan.from_archive || !plan.requeue.is_empty() || plan.resume_partial.is_some() {
            tracing::info!(segment = %start.file_name(seg_size), "resuming from the archive and spool");
        } else {
            tracing::info!(segment = %start.file_name(seg_size), "empty archive: starting at the slot's restart_lsn (or the server's position)");
        }
        if start.timeline > sys.timeline {
            return Err(ReceiveError::TimelineAhead {
                archive_tli: start.timeline,
                server_tli: sys.timeline,
            });
        }
        for &(id, why) in &plan.set_aside_ready {
            set_aside(&spool, &spool.ready_path(id), why.describe())?;
        }
        for &(id, why) in &plan.set_aside_partial {
            set_aside(&spool, &spool.partial_path(id), why.describe())?;
        }
        for id in &plan.remove_ready {
            let _ = std::fs::remove_file(spool.ready_path(*id));
        }
        for id in &plan.remove_partial {
            let _ = std::fs::remove_file(spool.partial_path(*id));
        }
        let start_lsn = start.start_lsn(seg_size);
        if slot_created && plan.from_archive {
            tracing::warn!(
                slot = %opts.slot,
                archive_end = %start_lsn,
                "the replication slot did not exist and was created now; the WAL since the archive's end was not held for it: \
                 if the server has already removed it, streaming fails with \"WAL already removed\" and the archive has a gap \
                 (take a new base backup); otherwise nothing is lost"
            );
        }
        let initial = plan
            .requeue
            .first()
            .map(|id| id.start_lsn(seg_size))
            .unwrap_or(start_lsn);
        let queue = (opts.spool_max_bytes / u64::from(seg_size.bytes())).max(1) as usize;
        let archiver = Archiver::start(
            ArchiverConfig {
                store: store.clone(),
                seg_size,
                compression: opts.compression,
                spool_dir: spool.dir().to_path_buf(),
                queue,
                workers: opts.archive_workers,
            },
            initial,
        );
        let mut receiver = Receiver {
            opts: opts.clone(),
            shutdown,
            seg_size,
            system_id: sys.system_identifier,
            spool,
            archiver,
            timeline: start.timeline,
            start: start_lsn,
            completed_upto: start_lsn,
            last_sent: (Lsn(0), Lsn(0)),
            last_snapshot: Lsn(0),
            snapshot_seq: 0,
        };
        for id in plan.requeue {
            let path = receiver.spool.ready_path(id);
            receiver.archiver.submit(Job::Segment { id, path }).await?;
        }
        for id in plan.finished_partials {
            let path = receiver.spool.partial_path(id);
            receiver
                .archiver
                .submit(Job::FinalPartial { id, path })
                .await?;
        }
        // With a local ack (--synchronous, --ack fsync) the partial's fsynced bytes may have been
        // reported as flushed before a crash: archive them first, so that wal-fetch and restore
        // see what the server was told is safe.
        if let (true, Some(id)) = (receiver.local_ack(), plan.resume_partial) {
            let len = partial_lens.get(&id).copied().unwrap_or(0);
            if len > 0 {
                receiver.snapshot_seq += 1;
                let path = receiver
                    .spool
                    .snapshot_prefix(id, len, receiver.snapshot_seq)
                    .map_err(|e| spool_err(&receiver.spool, e))?;
                let end = Lsn(id.start_lsn(seg_size).0 + len);
                tracing::info!(segment = %id.file_name(seg_size), %end, "archiving the partial segment left by the last run");
                receiver
                    .archiver
                    .submit(Job::Snapshot { id, path, end })
                    .await?;
            }
        }
        receiver.archive_histories(conn, sys.timeline).await?;
        Ok(receiver)
    }

    /// Checks the slot; creates it with `--create-slot`. Returns whether it was created now.
    async fn ensure_slot(
        opts: &StreamOptions,
        conn: &mut Connection,
    ) -> Result<bool, ReceiveError> {
        match conn.read_replication_slot(&opts.slot).await? {
            Some(s) if s.slot_type != "physical" => Err(ReceiveError::SlotNotPhysical {
                slot: opts.slot.clone(),
                target: conn.target().to_string(),
                kind: s.slot_type,
            }),
            Some(_) => Ok(false),
            None if opts.create_slot => {
                let created = conn.create_physical_slot(&opts.slot).await?;
                if created {
                    tracing::info!(slot = %opts.slot, "created replication slot");
                }
                Ok(created)
            }
            None => Err(ReceiveError::SlotMissing {
                slot: opts.slot.clone(),
                target: conn.target().to_string(),
            }),
        }
    }

    async fn reconnected(&self, conn: &mut Connection) -> Result<(), ReceiveError> {
        let sys = conn.identify_system().await?;
        if sys.system_identifier != self.system_id {
            return Err(ReceiveError::SystemChanged {
                target: conn.target().to_string(),
                before: self.system_id,
                now: sys.system_identifier,
            });
        }
        if Self::ensure_slot(&self.opts, conn).await? {
            tracing::warn!(
                slot = %self.opts.slot,
                "the replication slot was dropped while walagent was streaming and was created again; \
                 WAL not yet archived may have been removed on the server (if streaming now fails with \
                 \"WAL already removed\", the archive has a gap: take a new base backup)"
            );
        }
        self.archive_histories(conn, sys.timeline).await
    }

    /// Stores the history files of timelines 2..=`upto` that the archive lacks.
    async fn archive_histories(
        &self,
        conn: &mut Connection,
        upto: u32,
    ) -> Result<(), ReceiveError> {
        let store = &self.opts.store;
        for tli in 2..=upto {
            let key = layout::history_key(tli);
            let exists = store
                .get_bytes(&key)
                .await
                .map_err(|source| ReceiveError::Store {
                    location: store.location(),
                    source,
                })?
                .is_some();
            if exists {
                continue;
            }
            match conn.timeline_history(tli).await {
                Ok((_, content)) => {
                    store
                        .put_bytes(&key, content, PutMode::NoOverwrite)
                        .await
                        .map_err(|source| ReceiveError::Store {
                            location: store.location(),
                            source,
                        })?;
                    tracing::info!(file = %history_file_name(tli), "archived timeline history");
                }
                // A timeline the server never had (e.g. skipped numbers) has no file.
                Err(ProtocolError::Server(n)) if n.code == "58P01" => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Streams until a stop (returns the reason) or an error. Follows timeline switches on the
    /// same connection.
    async fn stream_loop(
        &mut self,
        conn: &mut Connection,
        backoff: &mut Backoff,
    ) -> Result<Option<Finished>, ReceiveError> {
        loop {
            if let Some(end) = self.opts.endpos {
                if self.start >= end && self.archiver.is_idle() {
                    tracing::info!(endpos = %end, "the archive already reaches --endpos");
                    return Ok(Some(Finished::EndPos(end)));
                }
            }
            match self.stream_once(conn, backoff).await? {
                StreamOutcome::Switch(sw) => {
                    if sw.next_timeline <= self.timeline {
                        return Err(ReceiveError::BadSwitch {
                            current: self.timeline,
                            end: self.start,
                            next: sw.next_timeline,
                            start: sw.next_start,
                        });
                    }
                    tracing::info!(
                        from = self.timeline,
                        to = sw.next_timeline,
                        at = %sw.next_start,
                        "timeline switch"
                    );
                    self.archive_histories(conn, sw.next_timeline).await?;
                    self.timeline = sw.next_timeline;
                    self.start = sw.next_start.segment_start(self.seg_size.bytes());
                    self.completed_upto = self.completed_upto.min(self.start);
                }
                StreamOutcome::Stopped => {
                    let pos = self.start;
                    let stopped_by_signal = *self.shutdown.borrow() > 0;
                    return Ok(Some(match self.opts.endpos {
                        Some(end) if !stopped_by_signal && pos >= end => Finished::EndPos(end),
                        _ => Finished::Signal(pos),
                    }));
                }
                StreamOutcome::ServerGone => return Ok(None),
            }
        }
    }

    /// Whether WAL fsynced in the spool counts as flushed.
    fn local_ack(&self) -> bool {
        self.opts.synchronous || self.opts.ack == AckMode::Fsync
    }

    /// The flush position that is honest to report: [`flush::flush_position`] (the invariant
    /// "reported flush <= durable end" is stated and property-tested there).
    fn flush_lsn(&self, partial: Option<&PartialSegment>) -> Lsn {
        let progress = self.archiver.progress();
        flush::flush_position(
            self.local_ack(),
            self.completed_upto,
            progress.archived_upto,
            progress.snapshot,
            partial.map(|p| flush::PartialView {
                id: p.id,
                start: p.start_lsn(),
                written_end: p.end_lsn(),
                synced_end: p.synced_lsn(),
            }),
        )
    }

    async fn send_status(
        &mut self,
        conn: &mut Connection,
        partial: Option<&PartialSegment>,
        write: Lsn,
        force: bool,
    ) -> Result<(), ReceiveError> {
        let flush = self.flush_lsn(partial);
        if !force && (write, flush) == self.last_sent {
            return Ok(());
        }
        conn.send_status(StatusUpdate {
            write,
            flush,
            apply: Lsn(0),
            send_time: pg_now(),
            reply_requested: false,
        })
        .await?;
        tracing::trace!(%write, %flush, "status sent");
        self.last_sent = (write, flush);
        Ok(())
    }

    /// Makes everything received durable: waits for the archiver, fsyncs the partial and, unless
    /// the spool is what counts, stores a copy of it in the archive. On a stop (`stopping`) the
    /// partial is stored in the archive in every mode: with `--synchronous` / `--ack fsync` its
    /// fsynced bytes were already reported as flushed, and wal-fetch and restore read only the
    /// archive.
    async fn make_durable(
        &mut self,
        partial: Option<&mut PartialSegment>,
        stopping: bool,
    ) -> Result<(), ReceiveError> {
        self.archiver.drain().await?;
        if let Some(p) = partial {
            p.sync().map_err(|e| spool_err(&self.spool, e))?;
            let upload = if self.local_ack() {
                stopping && p.end_lsn() > p.start_lsn().max(self.last_snapshot)
            } else {
                self.flush_lsn(Some(p)) < p.end_lsn()
            };
            if upload {
                self.snapshot(p).await?;
                self.archiver.drain().await?;
            }
        }
        Ok(())
    }

    /// Copies what the partial holds so far into an upload job.
    fn snapshot_job(&mut self, p: &PartialSegment) -> Result<Job, ReceiveError> {
        self.snapshot_seq += 1;
        let path = p
            .snapshot(&self.spool, self.snapshot_seq)
            .map_err(|e| spool_err(&self.spool, e))?;
        self.last_snapshot = p.end_lsn();
        Ok(Job::Snapshot {
            id: p.id,
            path,
            end: p.end_lsn(),
        })
    }

    /// Queues an upload of what the partial holds so far; waits for room in the queue.
    async fn snapshot(&mut self, p: &PartialSegment) -> Result<(), ReceiveError> {
        let job = self.snapshot_job(p)?;
        self.archiver.submit(job).await?;
        Ok(())
    }

    /// Queues a job for the archiver. While the queue is full (the archive is slow or away), the
    /// receiver stops reading but keeps sending status updates, so the server keeps the
    /// connection and the slot keeps the WAL.
    async fn submit(
        &mut self,
        conn: &mut Connection,
        job: Job,
        partial: Option<&PartialSegment>,
        write: Lsn,
    ) -> Result<(), ReceiveError> {
        let mut waited = false;
        let permit = loop {
            tokio::select! {
                p = self.archiver.reserve() => break p?,
                _ = tokio::time::sleep(self.opts.status_interval) => {
                    if !waited {
                        tracing::warn!("the archive is behind and the spool is full: pausing the stream until it catches up");
                        waited = true;
                    }
                    self.send_status(conn, partial, write, true).await?;
                }
            }
        };
        self.archiver.send(permit, job);
        if waited {
            tracing::info!("the archive caught up: streaming again");
        }
        Ok(())
    }

    async fn stream_once(
        &mut self,
        conn: &mut Connection,
        backoff: &mut Backoff,
    ) -> Result<StreamOutcome, ReceiveError> {
        let tli = self.timeline;
        match conn
            .start_replication(Some(&self.opts.slot), self.start, tli)
            .await?
        {
            StartOutcome::TimelineEnded(sw) => return Ok(StreamOutcome::Switch(sw)),
            StartOutcome::Streaming => {}
        }
        tracing::info!(start = %self.start, timeline = tli, "streaming");
        let params = VerifyParams {
            system_identifier: self.system_id,
            segment_size: self.seg_size,
            timeline: tli,
        };
        let mut verifier = WalVerifier::new(params, self.start);
        let mut write_pos = self.start;
        let mut partial: Option<PartialSegment> = None;
        let mut stopping = false;
        let mut ticker = tokio::time::interval(self.opts.status_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut snapshot_ticker = tokio::time::interval(
            self.opts
                .partial_interval
                .unwrap_or(Duration::from_secs(3600)),
        );
        snapshot_ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        snapshot_ticker.tick().await;
        let seg_bytes = u64::from(self.seg_size.bytes());

        let outcome = loop {
            let event = tokio::select! {
                ev = conn.next_event() => ev?,
                _ = ticker.tick() => {
                    self.send_status(conn, partial.as_ref(), write_pos, true).await?;
                    continue;
                }
                _ = snapshot_ticker.tick(), if self.opts.partial_interval.is_some() && !stopping => {
                    // Only when the queue has room: a periodic upload never holds up the stream.
                    if let Some(p) = partial.as_ref() {
                        if p.end_lsn() > self.last_snapshot.max(p.start_lsn()) {
                            if let Some(permit) = self.archiver.try_reserve() {
                                let job = self.snapshot_job(p)?;
                                self.archiver.send(permit, job);
                            }
                        }
                    }
                    continue;
                }
                _ = wait_true(&mut self.shutdown), if !stopping => {
                    tracing::info!("stop requested; finishing");
                    self.make_durable(partial.as_mut(), true).await?;
                    self.send_status(conn, partial.as_ref(), write_pos, true).await?;
                    conn.request_stop().await?;
                    stopping = true;
                    continue;
                }
                p = self.archiver.changed() => {
                    p?;
                    if self.opts.synchronous {
                        self.send_status(conn, partial.as_ref(), write_pos, false).await?;
                    }
                    continue;
                }
            };
            match event {
                StreamEvent::XLogData {
                    wal_start, data, ..
                } => {
                    if stopping {
                        continue;
                    }
                    if wal_start != write_pos {
                        return Err(ReceiveError::OutOfOrder {
                            got: wal_start,
                            expected: write_pos,
                        });
                    }
                    let mut data = data;
                    let mut reached_end = false;
                    if let Some(end) = self.opts.endpos {
                        let room = end.0.saturating_sub(write_pos.0);
                        if data.len() as u64 >= room {
                            data.truncate(room as usize);
                            reached_end = true;
                        }
                    }
                    verifier.feed(&data)?;
                    backoff.reset();
                    let mut rest = &data[..];
                    while !rest.is_empty() {
                        let p = match partial.as_mut() {
                            Some(p) => p,
                            None => {
                                let id = SegmentId::containing(tli, write_pos, self.seg_size);
                                let p = self
                                    .spool
                                    .open_partial(id)
                                    .map_err(|e| spool_err(&self.spool, e))?;
                                partial.insert(p)
                            }
                        };
                        let seg_end = (write_pos.0 / seg_bytes + 1) * seg_bytes;
                        let n = rest.len().min((seg_end - write_pos.0) as usize);
                        p.append(&rest[..n])
                            .map_err(|e| spool_err(&self.spool, e))?;
                        rest = &rest[n..];
                        write_pos = Lsn(write_pos.0 + n as u64);
                        if write_pos.0 == seg_end {
                            let done = partial.take().expect("partial exists");
                            let id = done.id;
                            let ready = done
                                .complete(&self.spool, self.local_ack())
                                .map_err(|e| spool_err(&self.spool, e))?;
                            self.completed_upto = write_pos;
                            self.start = write_pos;
                            self.submit(conn, Job::Segment { id, path: ready }, None, write_pos)
                                .await?;
                        }
                    }
                    if self.opts.synchronous {
                        if let Some(p) = partial.as_mut() {
                            p.sync().map_err(|e| spool_err(&self.spool, e))?;
                        }
                        self.send_status(conn, partial.as_ref(), write_pos, false)
                            .await?;
                    }
                    if reached_end {
                        tracing::info!(endpos = %write_pos, "reached --endpos");
                        self.make_durable(partial.as_mut(), true).await?;
                        self.send_status(conn, partial.as_ref(), write_pos, true)
                            .await?;
                        conn.request_stop().await?;
                        stopping = true;
                        self.start = write_pos;
                    }
                }
                StreamEvent::Keepalive {
                    wal_end,
                    reply_requested,
                } => {
                    if reply_requested {
                        // The server waits for our flush to reach what it sent (e.g. at
                        // shutdown). Catch up when that is quick; with uploads still pending
                        // (say, the archive is away) answer with what is durable now: the
                        // server asks again.
                        if wal_end <= write_pos && self.archiver.is_idle() {
                            self.make_durable(partial.as_mut(), false).await?;
                        }
                        self.send_status(conn, partial.as_ref(), write_pos, true)
                            .await?;
                    }
                }
                StreamEvent::End(StreamEnd::Timeline(sw)) => {
                    if sw.next_start > write_pos {
                        return Err(ReceiveError::BadSwitch {
                            current: tli,
                            end: write_pos,
                            next: sw.next_timeline,
                            start: sw.next_start,
                        });
                    }
                    // The rest of this segment belongs to the new timeline: keep the old
                    // timeline's piece as a finished partial.
                    if let Some(p) = partial.take() {
                        let id = p.id;
                        let path = p
                            .finish_short(&self.spool)
                            .map_err(|e| spool_err(&self.spool, e))?;
                        self.archiver.submit(Job::FinalPartial { id, path }).await?;
                    }
                    break StreamOutcome::Switch(sw);
                }
                StreamEvent::End(StreamEnd::Stopped) => break StreamOutcome::Stopped,
                StreamEvent::End(StreamEnd::ServerShutdown) => {
                    tracing::info!("server shut down the stream");
                    break StreamOutcome::ServerGone;
                }
            }
        };
        // self.start already holds the current partial's segment start (set when the previous
        // segment completed): a reconnect re-streams that segment. After a requested stop it
        // reports how far the stream got.
        if stopping {
            self.start = write_pos;
        }
        Ok(outcome)
    }
}
