//! `walagent stream`: resume point, `.partial` segments in the spool, verification, fsync and
//! feedback, reconnects and timeline switches.
//!
//! Shape: [`state::StreamState`] (synchronous, I/O-free) decides everything about the stream
//! from events and answers with actions; this module is the async shell that performs them
//! (socket, spool files, archiver channel, timers, signals) and does the startup steps around it
//! (`Receiver::first_connect`: check the server, the archive's metadata, the slot, bind the
//! spool, find and plan the resume ([`resume::plan`], pure), start the archiver, archive the
//! history files). [`run`] bounds the stop.
//!
//! Durability rule: the flush position sent to the server never exceeds the end of the WAL
//! prefix that is durable, meaning complete segments stored in the archive (or, with
//! `--synchronous` / `--ack fsync`, fsynced in the spool) followed by the newest partial upload
//! (or the fsynced part of the current partial). The rule is [`flush::flush_position`]; the
//! state machine applies it and is property-tested against an in-memory store. See
//! `proto-notes/durability.md`.

pub mod archiver;
pub mod defaults;
pub mod flush;
pub mod resume;
pub mod spool;
pub mod state;
pub mod stats;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::archive::{layout, ArchiveMeta, Compression, PutMode, Store, StoreError};
use crate::protocol::codec::{pg_now, StatusUpdate};
use crate::protocol::{ConnInfo, Connection, ProtocolError, StartOutcome, StreamEnd, StreamEvent};
use crate::wal::verify::{check_segment, VerifyError, VerifyParams, WalVerifier};
use crate::wal::{history_file_name, Lsn, SegmentId, SegmentSize, Timeline};
use archiver::{Archiver, ArchiverConfig, ArchiverError, Job};
use resume::ResumeInput;
use spool::{PartialSegment, Spool, SpoolIdentity};
use state::{Action, ArchiveView, Event, Exit, StreamState};
use stats::StreamStats;

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
    /// Never store a segment raw to compress it later (see `archiver`).
    pub compress_inline: bool,
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
    /// Live figures for metrics (`receive::stats`); a fresh one when nobody reads them.
    pub stats: Arc<stats::StreamStats>,
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
    #[error(transparent)]
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
    #[error("replication slot {slot:?} on {target} was invalidated by the server ({reason}) and the WAL from {needed} on may be gone")]
    SlotInvalidated {
        slot: String,
        target: String,
        needed: Lsn,
        /// What the server said or showed: `wal_status lost, max_slot_wal_keep_size`, or
        /// PostgreSQL 18's own detail (`... invalidated due to "idle_timeout"`).
        reason: String,
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
    #[error(
        "the archive continues timeline {archive_tli} but the server is on timeline {server_tli}"
    )]
    TimelineAhead {
        archive_tli: Timeline,
        server_tli: Timeline,
    },
    #[error("server announced timeline {next} starting at {start} after timeline {current} ended at {end}, which is not a valid switch")]
    BadSwitch {
        current: Timeline,
        end: Lsn,
        next: Timeline,
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
                 max_slot_wal_keep_size (or idle_replication_slot_timeout on PostgreSQL 18)"
            )),
            ReceiveError::SpoolBinding(e) => e.hint(),
            ReceiveError::Lock(e) => e.hint(),
            ReceiveError::StopTimedOut { .. } => Some(
                "nothing acknowledged is lost: the replication slot still holds that WAL and the next \
                 walagent stream with the same spool archives it first (raise --stop-timeout to wait longer)"
                    .into(),
            ),
            ReceiveError::SlotNotPhysical { .. } => Some(
                "name a physical slot with --slot (or a new name with --create-slot)".into(),
            ),
            ReceiveError::ServerTooOld { .. } => Some(
                "upgrade the server, or archive its WAL with the pg_receivewal of its version".into(),
            ),
            ReceiveError::TimelineAhead { .. } => Some(
                "this archive may be another server's, or a restore's that went further: point \
                 --archive at this server's own archive (or a new one)"
                    .into(),
            ),
            ReceiveError::SystemChanged { .. } => Some(
                "the server was replaced (a new initdb or a restored copy): give it a new archive \
                 and spool, and take a new base backup"
                    .into(),
            ),
            ReceiveError::OutOfOrder { .. } | ReceiveError::BadSwitch { .. } => None,
        }
    }

    /// A short stable label for the `walagent_errors_total{kind}` metric.
    pub fn kind(&self) -> &'static str {
        match self {
            ReceiveError::Protocol(_) | ReceiveError::OutOfOrder { .. } => "connection",
            ReceiveError::Verify(_) => "wal",
            ReceiveError::Archiver(ArchiverError::Compress { .. }) => "spool",
            ReceiveError::Archiver(_) | ReceiveError::Store { .. } | ReceiveError::Meta(_) => {
                "archive"
            }
            ReceiveError::Spool { .. }
            | ReceiveError::SpoolBinding(_)
            | ReceiveError::Lock(_)
            | ReceiveError::StopTimedOut { .. } => "spool",
            ReceiveError::SlotInvalidated { .. }
            | ReceiveError::SlotMissing { .. }
            | ReceiveError::SlotNotPhysical { .. } => "slot",
            ReceiveError::ServerTooOld { .. }
            | ReceiveError::TimelineAhead { .. }
            | ReceiveError::BadSwitch { .. }
            | ReceiveError::SystemChanged { .. } => "server",
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

/// State that lives across reconnects: the stream's state machine and what its actions act on.
struct Receiver {
    opts: StreamOptions,
    shutdown: watch::Receiver<u32>,
    system_id: u64,
    spool: Spool,
    archiver: Archiver,
    state: StreamState,
    /// The spool file of the segment being received (opened by [`Action::OpenPartial`]).
    partial: Option<PartialSegment>,
    /// A queue slot taken for a periodic partial upload ([`Event::PartialTick`]).
    permit: Option<tokio::sync::mpsc::OwnedPermit<Job>>,
    /// Counter for the temp names of partial uploads.
    snapshot_seq: u64,
    seg_size: SegmentSize,
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
                        StreamStats::set_flag(&opts.stats.streaming, false);
                        receiver = Some(r);
                        out
                    }
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        };
        if let Err(e) = &result {
            count_error(&opts.stats, e);
        }
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
        StreamStats::add(&opts.stats.reconnects, 1);
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
    if let Some(reason) = invalidated_slot_reason(&e) {
        // PostgreSQL 18 says so itself when the slot is acquired (slot.c, SQLSTATE 55000).
        return ReceiveError::SlotInvalidated {
            slot: opts.slot.clone(),
            target: opts.conninfo.display_safe(),
            needed: receiver.map(|r| r.state.position()).unwrap_or_default(),
            reason,
        };
    }
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
            needed: receiver.map(|r| r.state.position()).unwrap_or_default(),
            reason: "wal_status lost, max_slot_wal_keep_size".into(),
        },
        _ => e,
    }
}

/// PostgreSQL 18 refuses to acquire an invalidated slot with SQLSTATE 55000 and "can no longer
/// access replication slot" (detail: `This replication slot has been invalidated due to
/// "idle_timeout".`, or another cause). Returns the server's detail, or a generic reason.
fn invalidated_slot_reason(e: &ReceiveError) -> Option<String> {
    let ReceiveError::Protocol(ProtocolError::Server(n)) = e else {
        return None;
    };
    if n.code != "55000"
        || !n
            .message
            .starts_with("can no longer access replication slot")
    {
        return None;
    }
    Some(
        n.detail
            .as_deref()
            .map(|d| d.trim_end_matches('.').to_string())
            .unwrap_or_else(|| "the server can no longer use it".into()),
    )
}

/// Lets the archiver store what is queued, then reports how the run ended.
async fn finish(
    receiver: Option<Receiver>,
    how: impl FnOnce(Lsn) -> Finished,
) -> Result<Finished, ReceiveError> {
    let pos = receiver
        .as_ref()
        .map(|r| r.state.position())
        .unwrap_or_default();
    if let Some(r) = receiver {
        let stats = r.opts.stats.clone();
        let p = r.archiver.finish().await?;
        // What the last uploads added (no event reaches the state machine after them).
        stats
            .archived_lsn
            .fetch_max(p.archived_upto.0, std::sync::atomic::Ordering::Relaxed);
    }
    Ok(how(pos))
}

/// Counts an error for the metrics; an archive error also marks the archive unreachable.
fn count_error(stats: &StreamStats, e: &ReceiveError) {
    let kind = e.kind();
    stats.error(kind);
    if kind == "archive" {
        StreamStats::set_flag(&stats.archive_reachable, false);
    }
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

/// What the server said about itself on the first connection.
struct ServerInfo {
    version: u32,
    system_identifier: u64,
    timeline: Timeline,
    xlogpos: Lsn,
    seg_size: SegmentSize,
}

/// What startup found in the spool and the archive, for [`resume::plan`].
struct Findings {
    input: ResumeInput,
    /// Bytes of each spool partial that verified.
    partial_lens: std::collections::HashMap<SegmentId, u64>,
}

impl Receiver {
    /// The first connection of a run: checks the server, the archive's metadata, the slot and
    /// the spool, plans the resume, starts the archiver with what the spool still holds, and
    /// archives the history files. Each step is one function below, in this order.
    async fn first_connect(
        opts: &StreamOptions,
        conn: &mut Connection,
        shutdown: watch::Receiver<u32>,
    ) -> Result<Receiver, ReceiveError> {
        let server = check_server(conn).await?;
        ArchiveMeta::ensure(
            opts.store.as_ref(),
            server.system_identifier,
            server.seg_size,
            server.version,
        )
        .await?;
        StreamStats::set_flag(&opts.stats.archive_reachable, true);
        let slot_created = Self::ensure_slot(opts, conn).await?;
        let spool = bind_spool(opts, &server)?;
        let findings = find_resume_input(opts, conn, &server, &spool).await?;
        let plan = plan_resume(&server, &findings.input)?;
        apply_plan_to_spool(&spool, &plan)?;
        let resume_at = plan.start.start_lsn(server.seg_size);
        if slot_created && plan.from_archive {
            tracing::warn!(
                slot = %opts.slot,
                archive_end = %resume_at,
                "the replication slot did not exist and was created now; the WAL since the archive's end was not held for it: \
                 if the server has already removed it, streaming fails with \"WAL already removed\" and the archive has a gap \
                 (take a new base backup); otherwise nothing is lost"
            );
        }
        let archiver = start_archiver(opts, &server, &spool, &plan);
        let state = StreamState::new(
            state::Config {
                seg_size: server.seg_size,
                system_identifier: server.system_identifier,
                local_ack: local_ack(opts),
                synchronous: opts.synchronous,
                endpos: opts.endpos,
                partial_uploads: opts.partial_interval.is_some(),
            },
            plan.start.timeline,
            resume_at,
        );
        let mut receiver = Receiver {
            opts: opts.clone(),
            shutdown,
            system_id: server.system_identifier,
            spool,
            archiver,
            state,
            partial: None,
            permit: None,
            snapshot_seq: 0,
            seg_size: server.seg_size,
        };
        receiver
            .queue_leftovers(&plan, &findings.partial_lens, server.seg_size)
            .await?;
        receiver.archive_histories(conn, server.timeline).await?;
        Ok(receiver)
    }

    /// Queues what the spool still holds from the last run: ready segments, finished partials of
    /// older timelines, and (with a local ack) the verified bytes of the partial resumed.
    async fn queue_leftovers(
        &mut self,
        plan: &resume::ResumePlan,
        partial_lens: &std::collections::HashMap<SegmentId, u64>,
        seg_size: SegmentSize,
    ) -> Result<(), ReceiveError> {
        for &id in &plan.requeue {
            let path = self.spool.ready_path(id);
            self.archiver.submit(Job::Segment { id, path }).await?;
        }
        for &id in &plan.finished_partials {
            let path = self.spool.partial_path(id);
            self.archiver.submit(Job::FinalPartial { id, path }).await?;
        }
        // With a local ack (--synchronous, --ack fsync) the partial's fsynced bytes may have been
        // reported as flushed before a crash: archive them first, so that wal-fetch and restore
        // see what the server was told is safe.
        if let (true, Some(id)) = (local_ack(&self.opts), plan.resume_partial) {
            let len = partial_lens.get(&id).copied().unwrap_or(0);
            if len > 0 {
                self.snapshot_seq += 1;
                let path = self
                    .spool
                    .snapshot_prefix(id, len, self.snapshot_seq)
                    .map_err(|e| spool_err(&self.spool, e))?;
                let end = Lsn(id.start_lsn(seg_size).0 + len);
                tracing::info!(segment = %id.file_name(seg_size), %end, "archiving the partial segment left by the last run");
                self.archiver
                    .submit(Job::Snapshot { id, path, end })
                    .await?;
            }
        }
        Ok(())
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

    /// A later connection: the same cluster, the slot still there, the history files stored.
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
        upto: Timeline,
    ) -> Result<(), ReceiveError> {
        let store = &self.opts.store;
        let store_err = |source| ReceiveError::Store {
            location: store.location(),
            source,
        };
        for tli in (2..=upto.get()).filter_map(Timeline::new) {
            let key = layout::history_key(tli);
            if store.get_bytes(&key).await.map_err(store_err)?.is_some() {
                continue;
            }
            match conn.timeline_history(tli).await {
                Ok((_, content)) => {
                    store
                        .put_bytes(&key, content, PutMode::NoOverwrite)
                        .await
                        .map_err(store_err)?;
                    tracing::info!(file = %history_file_name(tli), "archived timeline history");
                }
                // A timeline the server never had (e.g. skipped numbers) has no file.
                Err(ProtocolError::Server(n)) if n.code == "58P01" => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// The archiver's progress for the state machine.
    fn observe(&mut self) {
        let p = self.archiver.progress();
        self.state.observe(ArchiveView {
            archived_upto: p.archived_upto,
            snapshot: p.snapshot,
            idle: self.archiver.is_idle(),
        });
    }

    /// The state machine's next action, with the archiver's progress refreshed first.
    fn next_action(&mut self) -> Result<Option<Action>, ReceiveError> {
        self.observe();
        self.state.next_action()
    }

    /// Hands one event to the state machine (with the archiver's progress refreshed first).
    fn handle(&mut self, event: Event) -> Result<(), ReceiveError> {
        self.observe();
        self.publish_stats();
        self.state.handle(event)
    }

    /// The archived position and what the spool holds, for metrics (once per event).
    fn publish_stats(&self) {
        let p = self.archiver.progress();
        let archived = match p.snapshot {
            // The newest `.partial` continues the complete segments: the archive reaches its end.
            Some((id, end)) if id.start_lsn(self.seg_size) == p.archived_upto => {
                end.max(p.archived_upto)
            }
            _ => p.archived_upto,
        };
        let stats = &self.opts.stats;
        StreamStats::set(&stats.archived_lsn, archived.0);
        let received = StreamStats::get(&stats.received_lsn);
        StreamStats::set(
            &stats.spool_bytes,
            received.saturating_sub(p.archived_upto.0),
        );
    }

    /// Streams on this connection until the run is finished (`Some`), the server goes away
    /// (`None`) or an error. Follows timeline switches on the same connection. The state machine
    /// decides; this loop performs its actions and waits for the next event.
    async fn stream_loop(
        &mut self,
        conn: &mut Connection,
        backoff: &mut Backoff,
    ) -> Result<Option<Finished>, ReceiveError> {
        self.partial = None;
        self.permit = None;
        self.handle(Event::Connected)?;
        let mut timers: Option<Timers> = None;
        loop {
            while let Some(action) = self.next_action()? {
                match action {
                    Action::StartReplication { timeline, start } => {
                        match conn
                            .start_replication(Some(&self.opts.slot), start, timeline)
                            .await?
                        {
                            StartOutcome::TimelineEnded(sw) => {
                                self.handle(Event::TimelineEnded(sw))?
                            }
                            StartOutcome::Streaming => {
                                StreamStats::set_flag(&self.opts.stats.streaming, true);
                                self.partial = None;
                                timers = Some(Timers::new(&self.opts).await);
                                self.handle(Event::Started)?;
                            }
                        }
                    }
                    Action::Exit(Exit::Finished(done)) => return Ok(Some(done)),
                    Action::Exit(Exit::ServerGone) => return Ok(None),
                    other => self.perform(conn, other).await?,
                }
            }
            self.permit = None;
            let Some(timers) = timers.as_mut() else {
                // Only a started stream waits for events; the state always has an action before.
                return Err(ReceiveError::Protocol(ProtocolError::Unexpected(
                    "no replication stream to read".into(),
                )));
            };
            let Some(event) = self.next_event(conn, timers).await? else {
                continue;
            };
            let is_wal = matches!(event, Event::XLogData { .. })
                && self.state.phase() == state::Phase::Streaming;
            self.handle(event)?;
            if is_wal {
                backoff.reset();
            }
        }
    }

    /// Waits for the next thing that happens to the stream: a message from the server, a timer,
    /// a stop signal, the archiver's progress. `None`: nothing for the state machine.
    async fn next_event(
        &mut self,
        conn: &mut Connection,
        timers: &mut Timers,
    ) -> Result<Option<Event>, ReceiveError> {
        let wants_partial = self.state.wants_partial_ticks();
        let accepts_stop = self.state.accepts_stop();
        Ok(Some(tokio::select! {
            ev = conn.next_event() => match ev? {
                StreamEvent::XLogData { wal_start, wal_end, data } => {
                    let stats = &self.opts.stats;
                    StreamStats::set(&stats.received_lsn, wal_start.0 + data.len() as u64);
                    StreamStats::set(&stats.server_lsn, wal_end.0);
                    Event::XLogData { wal_start, data }
                }
                StreamEvent::Keepalive { wal_end, reply_requested } => {
                    // A keepalive's wal_end is what was sent, which lags the flush position
                    // an XLogData reported while catching up: never lower the gauge with it.
                    self.opts.stats.server_lsn.fetch_max(wal_end.0, std::sync::atomic::Ordering::Relaxed);
                    Event::Keepalive { wal_end, reply_requested }
                }
                StreamEvent::End(StreamEnd::Timeline(sw)) => Event::TimelineEnded(sw),
                StreamEvent::End(StreamEnd::Stopped) => Event::ServerStopped {
                    signalled: *self.shutdown.borrow() > 0,
                },
                StreamEvent::End(StreamEnd::ServerShutdown) => Event::ServerShutdown,
            },
            _ = timers.status.tick() => Event::StatusTick,
            _ = timers.partial.tick(), if wants_partial => {
                // Only when the queue has room: a periodic upload never holds up the stream.
                match self.archiver.try_reserve() {
                    Some(permit) => {
                        self.permit = Some(permit);
                        Event::PartialTick
                    }
                    None => return Ok(None),
                }
            }
            _ = wait_true(&mut self.shutdown), if accepts_stop => Event::StopRequested,
            p = self.archiver.changed() => {
                let p = p?;
                Event::Archived(ArchiveView {
                    archived_upto: p.archived_upto,
                    snapshot: p.snapshot,
                    idle: self.archiver.is_idle(),
                })
            }
        }))
    }

    /// Performs one action of the state machine (all but starting replication and exiting).
    async fn perform(&mut self, conn: &mut Connection, action: Action) -> Result<(), ReceiveError> {
        match action {
            Action::OpenPartial { id } => {
                let p = self
                    .spool
                    .open_partial(id)
                    .map_err(|e| spool_err(&self.spool, e))?;
                self.partial = Some(p);
            }
            Action::Write { id, offset, data } => {
                let p = the_partial(&mut self.partial, id);
                debug_assert_eq!(p.end_lsn().0 - p.start_lsn().0, u64::from(offset));
                p.append(&data).map_err(|e| spool_err(&self.spool, e))?;
            }
            Action::FsyncPartial { id } => {
                let p = the_partial(&mut self.partial, id);
                p.sync().map_err(|e| spool_err(&self.spool, e))?;
            }
            Action::Complete { id, fsync } => {
                the_partial(&mut self.partial, id);
                if let Some(done) = self.partial.take() {
                    done.complete(&self.spool, fsync)
                        .map_err(|e| spool_err(&self.spool, e))?;
                }
            }
            Action::QueueSegment { id } => {
                let path = self.spool.ready_path(id);
                self.submit_streaming(conn, Job::Segment { id, path })
                    .await?;
            }
            Action::FinishShort { id } => {
                the_partial(&mut self.partial, id);
                if let Some(p) = self.partial.take() {
                    p.finish_short(&self.spool)
                        .map_err(|e| spool_err(&self.spool, e))?;
                }
            }
            Action::QueueFinalPartial { id } => {
                let path = self.spool.partial_path(id);
                self.archiver.submit(Job::FinalPartial { id, path }).await?;
            }
            Action::UploadPartial { id, end } => {
                self.snapshot_seq += 1;
                let seq = self.snapshot_seq;
                let p = the_partial(&mut self.partial, id);
                debug_assert_eq!(p.end_lsn(), end);
                let path = p
                    .snapshot(&self.spool, seq)
                    .map_err(|e| spool_err(&self.spool, e))?;
                let job = Job::Snapshot { id, path, end };
                match self.permit.take() {
                    Some(permit) => self.archiver.send(permit, job),
                    None => self.archiver.submit(job).await?,
                }
            }
            Action::DrainArchiver => {
                self.archiver.drain().await?;
            }
            Action::SendStatus { write, flush } => {
                send_status(conn, &self.opts.stats, write, flush).await?
            }
            Action::RequestStop => conn.request_stop().await?,
            Action::ArchiveHistories { upto } => self.archive_histories(conn, upto).await?,
            Action::StartReplication { .. } | Action::Exit(_) => {
                debug_assert!(false, "performed by stream_loop");
            }
        }
        Ok(())
    }

    /// Queues a complete segment for the archiver. While the queue is full (the archive is slow
    /// or away), the receiver stops reading but keeps sending status updates, so the server keeps
    /// the connection and the slot keeps the WAL.
    async fn submit_streaming(
        &mut self,
        conn: &mut Connection,
        job: Job,
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
                    self.observe();
                    let (write, flush) = self.state.status_now();
                    send_status(conn, &self.opts.stats, write, flush).await?;
                }
            }
        };
        self.archiver.send(permit, job);
        if waited {
            tracing::info!("the archive caught up: streaming again");
        }
        Ok(())
    }
}

/// The open partial, which the state machine names in its actions.
fn the_partial(partial: &mut Option<PartialSegment>, id: SegmentId) -> &mut PartialSegment {
    let p = partial
        .as_mut()
        .expect("the state machine opens a partial before acting on it");
    debug_assert_eq!(p.id, id);
    p
}

/// The timers of one stream.
struct Timers {
    status: tokio::time::Interval,
    partial: tokio::time::Interval,
}

impl Timers {
    async fn new(opts: &StreamOptions) -> Timers {
        let mut status = tokio::time::interval(opts.status_interval);
        status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut partial =
            tokio::time::interval(opts.partial_interval.unwrap_or(Duration::from_secs(3600)));
        partial.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        partial.tick().await;
        Timers { status, partial }
    }
}

async fn send_status(
    conn: &mut Connection,
    stats: &StreamStats,
    write: Lsn,
    flush: Lsn,
) -> Result<(), ReceiveError> {
    conn.send_status(StatusUpdate {
        write,
        flush,
        apply: Lsn(0),
        send_time: pg_now(),
        reply_requested: false,
    })
    .await?;
    StreamStats::set(&stats.flushed_lsn, flush.0);
    tracing::trace!(%write, %flush, "status sent");
    Ok(())
}

/// Whether WAL fsynced in the spool counts as flushed.
fn local_ack(opts: &StreamOptions) -> bool {
    opts.synchronous || opts.ack == AckMode::Fsync
}

/// Startup step 1: the server is new enough; who it is, where it is, its segment size.
async fn check_server(conn: &mut Connection) -> Result<ServerInfo, ReceiveError> {
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
        timeline = sys.timeline.get(),
        position = %sys.xlogpos,
        segment_size = %seg_size,
        "server identified"
    );
    Ok(ServerInfo {
        version,
        system_identifier: sys.system_identifier,
        timeline: sys.timeline,
        xlogpos: sys.xlogpos,
        seg_size,
    })
}

/// Startup step 4: the spool must be this cluster's and this archive's before anything in it
/// counts.
fn bind_spool(opts: &StreamOptions, server: &ServerInfo) -> Result<Spool, ReceiveError> {
    let spool =
        Spool::open(&opts.spool_dir, server.seg_size).map_err(|source| ReceiveError::Spool {
            path: opts.spool_dir.display().to_string(),
            source,
        })?;
    let inside_archive = opts.store.local_root().is_some_and(|root| {
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
            system_identifier: server.system_identifier.to_string(),
            wal_segment_size: server.seg_size.bytes(),
            archive: opts.archive_identity.clone(),
        },
        inside_archive,
    )?;
    Ok(spool)
}

/// Startup step 5: what the archive lists and what the spool holds that verifies, and where to
/// start if the archive is empty (the slot's restart point, else the server's position).
///
/// Every spool file is checked against this cluster (long page header: system id and segment
/// size; page addresses and timelines; record CRCs) before it counts. A ready file must be whole:
/// a zeroed tail (lost before it reached the disk) is incomplete even though every byte before
/// it verifies. A partial counts when its first page verifies (its tail is re-streamed anyway).
/// Files that fail are set aside, never trusted.
async fn find_resume_input(
    opts: &StreamOptions,
    conn: &mut Connection,
    server: &ServerInfo,
    spool: &Spool,
) -> Result<Findings, ReceiveError> {
    let seg_size = server.seg_size;
    let contents = spool.scan().map_err(|e| spool_err(spool, e))?;
    let objects = opts
        .store
        .list(layout::WAL_PREFIX)
        .await
        .map_err(|source| ReceiveError::Store {
            location: opts.store.location(),
            source,
        })?;
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
    let params = |tli| VerifyParams {
        system_identifier: server.system_identifier,
        segment_size: seg_size,
        timeline: tli,
    };
    let mut partial_lens = std::collections::HashMap::new();
    for &id in &contents.ready {
        if input.archived.contains(&id) {
            input.ready.push(id); // removed by the plan
            continue;
        }
        let path = spool.ready_path(id);
        let bytes = std::fs::read(&path).map_err(|e| spool_err(spool, e))?;
        match check_segment(params(id.timeline), id.start_lsn(seg_size), &bytes) {
            Ok(c) if c.complete => input.ready.push(id),
            Ok(c) => set_aside(
                spool,
                &path,
                &format!("incomplete: WAL ends at {}", c.data_end),
            )?,
            Err(e) => set_aside(spool, &path, &e.to_string())?,
        }
    }
    for &id in &contents.partials {
        let path = spool.partial_path(id);
        let bytes = std::fs::read(&path).map_err(|e| spool_err(spool, e))?;
        let start = id.start_lsn(seg_size);
        let mut v = WalVerifier::new(params(id.timeline), start);
        let verified = match v.feed(&bytes) {
            Ok(()) => bytes.len() as u64,
            Err(e) if e.lsn() > start => e.lsn().0 - start.0,
            Err(e) => {
                set_aside(spool, &path, &e.to_string())?;
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
                None => SegmentId::containing(server.timeline, server.xlogpos, seg_size),
            }
        }
    };
    Ok(Findings {
        input,
        partial_lens,
    })
}

/// Startup step 6: the resume decision ([`resume::plan`], pure), which must not be ahead of the
/// server's timeline.
fn plan_resume(
    server: &ServerInfo,
    input: &ResumeInput,
) -> Result<resume::ResumePlan, ReceiveError> {
    let plan = resume::plan(input);
    let first = plan.start;
    let seg_size = server.seg_size;
    if plan.from_archive || !plan.requeue.is_empty() || plan.resume_partial.is_some() {
        tracing::info!(segment = %first.file_name(seg_size), "resuming from the archive and spool");
    } else {
        tracing::info!(segment = %first.file_name(seg_size), "empty archive: starting at the slot's restart_lsn (or the server's position)");
    }
    if first.timeline > server.timeline {
        return Err(ReceiveError::TimelineAhead {
            archive_tli: first.timeline,
            server_tli: server.timeline,
        });
    }
    Ok(plan)
}

/// Startup step 7: sets aside and removes the spool files the plan names.
fn apply_plan_to_spool(spool: &Spool, plan: &resume::ResumePlan) -> Result<(), ReceiveError> {
    for &(id, why) in &plan.set_aside_ready {
        set_aside(spool, &spool.ready_path(id), why.describe())?;
    }
    for &(id, why) in &plan.set_aside_partial {
        set_aside(spool, &spool.partial_path(id), why.describe())?;
    }
    for id in &plan.remove_ready {
        let _ = std::fs::remove_file(spool.ready_path(*id));
    }
    for id in &plan.remove_partial {
        let _ = std::fs::remove_file(spool.partial_path(*id));
    }
    Ok(())
}

/// Startup step 8: the archiver, its archived prefix starting where the plan's queued segments
/// (or the stream) start.
fn start_archiver(
    opts: &StreamOptions,
    server: &ServerInfo,
    spool: &Spool,
    plan: &resume::ResumePlan,
) -> Archiver {
    let seg_size = server.seg_size;
    let initial = plan
        .requeue
        .first()
        .map(|id| id.start_lsn(seg_size))
        .unwrap_or(plan.start.start_lsn(seg_size));
    let queue = (opts.spool_max_bytes / u64::from(seg_size.bytes())).max(1) as usize;
    Archiver::spawn(
        ArchiverConfig {
            store: opts.store.clone(),
            seg_size,
            compression: opts.compression,
            spool_dir: spool.dir().to_path_buf(),
            queue,
            workers: opts.archive_workers,
            stats: opts.stats.clone(),
            defer_compression: !opts.compress_inline,
        },
        initial,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::timeline::tl;
    use std::error::Error;

    #[test]
    fn errors_keep_their_cause_and_name_the_fix() {
        let e = ReceiveError::Spool {
            path: "/spool".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOSPC),
        };
        assert!(e.source().is_some());
        assert!(e.hint().unwrap().contains("full"), "{:?}", e.hint());

        let json = serde_json::from_slice::<SpoolIdentity>(b"{").unwrap_err();
        let e = ReceiveError::from(spool::BindError::Unreadable {
            dir: "/spool".into(),
            source: json,
        });
        assert!(e.source().is_some(), "the JSON error is kept");
        assert!(e.hint().is_some());

        let e = ReceiveError::from(ArchiverError::Compress {
            path: "/spool/x".into(),
            source: std::io::Error::from_raw_os_error(libc::EACCES),
        });
        assert!(e.source().is_some());
        assert!(e.hint().unwrap().contains("permissions"));

        for e in [
            ReceiveError::TimelineAhead {
                archive_tli: tl(3),
                server_tli: tl(2),
            },
            ReceiveError::SystemChanged {
                target: "db".into(),
                before: 1,
                now: 2,
            },
            ReceiveError::ServerTooOld {
                target: "db".into(),
                version: 140000,
            },
        ] {
            assert!(e.hint().is_some(), "{e}");
            assert!(!e.to_string().contains('?'), "a question in the cause: {e}");
        }
    }
}
