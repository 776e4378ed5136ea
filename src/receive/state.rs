//! The replication stream as a synchronous, I/O-free state machine.
//!
//! [`StreamState`] takes [`Event`]s (a chunk of WAL, a keepalive, the archiver's progress, a
//! timer tick, a stop request, the end of a timeline or of the stream) and answers with
//! [`Action`]s (open/write/fsync/complete the partial, queue a segment, upload a partial, send a
//! status update, request the stop, start replication, exit). It owns every decision of the
//! stream (order checks, `--endpos`, segment boundaries, what may be reported as flushed, when a
//! partial is uploaded, how a stop and a timeline switch proceed); the async shell in
//! `receive/mod.rs` only performs the actions (socket, spool files, archiver channel, timers,
//! signals). Tests drive it with an in-memory store (see the tests below).
//!
//! Protocol between the two, in the sans-IO style:
//! - the shell calls [`StreamState::handle`] with one event, then [`StreamState::next_action`]
//!   until it returns `None`, performing each action before asking for the next one. An action
//!   counts as done when the shell asks for the next one (or hands the next event); its effect on
//!   the state (bytes written, fsynced, status sent...) is applied only then, so an action that
//!   failed (the shell returned the error) never counts;
//! - before each event and each action the shell refreshes the archiver's progress with
//!   [`StreamState::observe`] (it only reads it);
//! - on every new connection the shell hands [`Event::Connected`], which drops what the last
//!   stream left half done (and keeps what lives across reconnects: timeline, resume point,
//!   completed segments, last status sent, last partial upload).
//!
//! Invariants (checked by `debug_assert`s, property-tested below):
//! - **reported flush <= durable**: every flush position sent is [`flush::flush_position`] over
//!   what the effects applied so far say (fsync before a local ack counts, an upload counts once
//!   the archiver published it), never more. It never goes backwards either: what was durable
//!   stays durable, so the last position sent is a floor;
//! - WAL is written in order: each write starts where the last one ended, never crosses a
//!   segment end, and a segment is renamed (completed) only when it is full;
//! - nothing is written that the verifier did not pass, and nothing after a stop was requested;
//! - `completed_upto <= resume_at <= write_pos`, and `resume_at` is always a segment start.
//!
//! Phases: `Connecting` (waiting for START_REPLICATION) → `Streaming` → `Stopping` (a stop was
//! requested or `--endpos` reached: making everything durable, then waiting for the server to
//! end the stream) → `Done`; the end of a timeline passes through `SwitchingTimeline` (finishing
//! the old timeline's partial, archiving the history files) back to `Connecting`.

use std::collections::VecDeque;

use bytes::Bytes;

use super::flush::{self, PartialView};
use super::{Finished, ReceiveError};
use crate::protocol::TimelineSwitch;
use crate::wal::verify::{VerifyError, VerifyParams, WalVerifier};
use crate::wal::{Lsn, SegmentId, SegmentSize};

/// The check every chunk passes before any of it is written: [`WalVerifier`] in walagent; tests
/// plug in a check of their own synthetic bytes.
pub trait StreamCheck {
    /// A check for a stream that starts at `start` (a segment start).
    fn begin(params: VerifyParams, start: Lsn) -> Self;
    fn feed(&mut self, data: &[u8]) -> Result<(), VerifyError>;
}

impl StreamCheck for WalVerifier {
    fn begin(params: VerifyParams, start: Lsn) -> Self {
        WalVerifier::new(params, start)
    }
    fn feed(&mut self, data: &[u8]) -> Result<(), VerifyError> {
        WalVerifier::feed(self, data)
    }
}

/// What the stream was asked to do (from `StreamOptions` and the server).
#[derive(Debug, Clone, Copy)]
pub struct Config {
    pub seg_size: SegmentSize,
    pub system_identifier: u64,
    /// Whether WAL fsynced in the spool counts as flushed (`--synchronous`, `--ack fsync`).
    pub local_ack: bool,
    /// `--synchronous`: fsync after every chunk and report at once.
    pub synchronous: bool,
    pub endpos: Option<Lsn>,
    /// Periodic `.partial` uploads (`--partial-interval`) are on.
    pub partial_uploads: bool,
}

/// The archiver's progress as the shell last read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ArchiveView {
    /// End of the contiguous prefix of complete segments stored in the archive.
    pub archived_upto: Lsn,
    /// The newest partial upload stored: its segment and end.
    pub snapshot: Option<(SegmentId, Lsn)>,
    /// Every job submitted is done.
    pub idle: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// No stream: the next action starts replication (or exits at `--endpos`).
    Connecting,
    Streaming,
    /// The timeline ended: finishing its partial and archiving the history files.
    SwitchingTimeline,
    /// A stop was requested or `--endpos` reached.
    Stopping,
    /// Exited.
    Done,
}

#[derive(Debug)]
pub enum Event {
    /// A new connection: forget the half-done stream, start again at the resume point.
    Connected,
    /// START_REPLICATION answered with CopyBoth.
    Started,
    /// A chunk of WAL.
    XLogData {
        wal_start: Lsn,
        data: Bytes,
    },
    Keepalive {
        wal_end: Lsn,
        reply_requested: bool,
    },
    /// The archiver stored something (complete segments or a partial upload).
    Archived(ArchiveView),
    /// `--status-interval` passed.
    StatusTick,
    /// `--partial-interval` passed and the archiver's queue has room for an upload now.
    PartialTick,
    /// SIGTERM/SIGINT.
    StopRequested,
    /// The timeline ended (in the stream, or START_REPLICATION said so at once).
    TimelineEnded(TimelineSwitch),
    /// The server ended the stream after our stop request (CopyDone). `signalled`: a stop
    /// signal has arrived in this run.
    ServerStopped {
        signalled: bool,
    },
    /// The server closed the stream (shutdown).
    ServerShutdown,
}

/// How the stream ended, for the shell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Finished(Finished),
    /// The server went away: reconnect (or with `--no-loop`, finish).
    ServerGone,
}

#[derive(Debug)]
pub enum Action {
    /// START_REPLICATION; answer with [`Event::Started`] or [`Event::TimelineEnded`].
    StartReplication {
        timeline: u32,
        start: Lsn,
    },
    /// Open (or create) the spool partial of `id` for writing in place, nothing written yet.
    OpenPartial {
        id: SegmentId,
    },
    /// Write `data` at `offset` of the open partial (the end of what was written).
    Write {
        id: SegmentId,
        offset: u32,
        data: Bytes,
    },
    /// fdatasync the open partial.
    FsyncPartial {
        id: SegmentId,
    },
    /// The partial is full: rename it to the ready name (fsync file and directory first with
    /// `fsync`).
    Complete {
        id: SegmentId,
        fsync: bool,
    },
    /// Queue the ready segment for the archiver; while the queue is full, keep sending
    /// [`StreamState::status_now`] every status interval.
    QueueSegment {
        id: SegmentId,
    },
    /// The timeline ended inside the open partial: cut it at what was written, fsync it.
    FinishShort {
        id: SegmentId,
    },
    /// Queue the finished partial for the archiver (as `<name>.partial`).
    QueueFinalPartial {
        id: SegmentId,
    },
    /// Upload a copy of the open partial (its `end - start` bytes written) as `<name>.partial`.
    UploadPartial {
        id: SegmentId,
        end: Lsn,
    },
    /// Wait until every job submitted is archived.
    DrainArchiver,
    SendStatus {
        write: Lsn,
        flush: Lsn,
    },
    /// CopyDone: ask the server to end the stream.
    RequestStop,
    /// Store the history files of timelines 2..=`upto` the archive lacks.
    ArchiveHistories {
        upto: u32,
    },
    Exit(Exit),
}

/// Work queued by an event, turned into actions one at a time (so each decision sees the
/// effects of the actions before it).
#[derive(Debug)]
enum Step {
    Do(Action),
    /// Start replication, or exit when the archive already reaches `--endpos`.
    Connect,
    /// Write the pending chunk (one segment's piece at a time).
    Chunk,
    /// fsync the partial if it holds unsynced bytes.
    Fsync,
    Status {
        force: bool,
    },
    /// Drain the archiver, fsync the partial, upload it when the mode needs it.
    MakeDurable {
        stopping: bool,
    },
    AfterDrain {
        stopping: bool,
    },
    /// `--endpos` reached inside the last chunk.
    EndposReached,
    RequestStop {
        at_endpos: bool,
    },
    Switch {
        sw: TimelineSwitch,
        stopping: bool,
    },
}

/// The effect of the action in flight, applied once it is done.
#[derive(Debug, Clone, Copy)]
enum Effect {
    Opened(SegmentId),
    Wrote(u32),
    Synced,
    Completed,
    FinishedShort,
    Uploaded(Lsn),
    Sent(Lsn, Lsn),
    StopSent { at_endpos: bool },
    Switched(TimelineSwitch),
}

/// The effect an action has on the state once performed.
fn effect_of(action: &Action) -> Option<Effect> {
    Some(match action {
        Action::OpenPartial { id } => Effect::Opened(*id),
        Action::Write { data, .. } => Effect::Wrote(data.len() as u32),
        Action::FsyncPartial { .. } => Effect::Synced,
        Action::Complete { .. } => Effect::Completed,
        Action::FinishShort { .. } => Effect::FinishedShort,
        Action::UploadPartial { end, .. } => Effect::Uploaded(*end),
        Action::SendStatus { write, flush } => Effect::Sent(*write, *flush),
        Action::StartReplication { .. }
        | Action::QueueSegment { .. }
        | Action::QueueFinalPartial { .. }
        | Action::DrainArchiver
        | Action::RequestStop
        | Action::ArchiveHistories { .. }
        | Action::Exit(_) => return None,
    })
}

pub struct StreamState<C = WalVerifier> {
    cfg: Config,
    phase: Phase,
    timeline: u32,
    /// Where the next stream starts: a segment start (the open partial's, re-streamed in place).
    resume_at: Lsn,
    /// How far a stream that a stop ended got (reported in [`Finished`]).
    stopped_at: Option<Lsn>,
    /// End of the last segment completed in this process (or the resume point).
    completed_upto: Lsn,
    /// End of what the current stream wrote (next byte expected from the server).
    write_pos: Lsn,
    partial: Option<PartialView>,
    archive: ArchiveView,
    /// Last status sent (write, flush).
    last_sent: (Lsn, Lsn),
    /// End of the last partial upload queued.
    last_upload: Lsn,
    check: Option<C>,
    /// The part of the last chunk not yet written.
    pending: Bytes,
    steps: VecDeque<Step>,
    in_flight: Option<Effect>,
}

impl<C: StreamCheck> StreamState<C> {
    /// A stream that resumes at `resume_at` (a segment start) on `timeline`, everything before it
    /// being in the archive (or queued for it).
    pub fn new(cfg: Config, timeline: u32, resume_at: Lsn) -> Self {
        debug_assert_eq!(resume_at, resume_at.segment_start(cfg.seg_size.bytes()));
        StreamState {
            cfg,
            phase: Phase::Connecting,
            timeline,
            resume_at,
            stopped_at: None,
            completed_upto: resume_at,
            write_pos: resume_at,
            partial: None,
            archive: ArchiveView::default(),
            last_sent: (Lsn(0), Lsn(0)),
            last_upload: Lsn(0),
            check: None,
            pending: Bytes::new(),
            steps: VecDeque::with_capacity(8),
            in_flight: None,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The position a run that ends now reports: where the stop ended the stream, else the
    /// resume point.
    pub fn position(&self) -> Lsn {
        self.stopped_at.unwrap_or(self.resume_at)
    }

    /// A stop request is taken now (streaming, not yet stopping).
    pub fn accepts_stop(&self) -> bool {
        self.phase == Phase::Streaming
    }

    /// Periodic partial uploads are due now.
    pub fn wants_partial_ticks(&self) -> bool {
        self.cfg.partial_uploads && self.phase == Phase::Streaming
    }

    /// Refreshes the archiver's progress (no action follows).
    pub fn observe(&mut self, view: ArchiveView) {
        self.archive = view;
    }

    /// The status to send now, while an action waits (a full archiver queue): what was written
    /// and what is durable so far. Counts as sent.
    pub fn status_now(&mut self) -> (Lsn, Lsn) {
        let status = (self.write_pos, self.flush());
        self.last_sent = status;
        status
    }

    /// Takes one event. Call only when [`StreamState::next_action`] has no more actions (except
    /// for [`Event::Connected`], which drops them).
    pub fn handle(&mut self, event: Event) -> Result<(), ReceiveError> {
        if let Event::Connected = event {
            // What failed or was cut off does not count.
            self.in_flight = None;
            self.steps.clear();
            self.pending = Bytes::new();
            self.partial = None;
            self.check = None;
            self.write_pos = self.resume_at;
            if self.phase != Phase::Done {
                self.phase = Phase::Connecting;
                self.steps.push_back(Step::Connect);
            }
            return Ok(());
        }
        self.commit();
        debug_assert!(
            self.steps.is_empty() && self.pending.is_empty(),
            "event {event:?} before the last one's actions were done"
        );
        match event {
            Event::Connected => {}
            Event::Started => {
                debug_assert_eq!(self.phase, Phase::Connecting);
                self.phase = Phase::Streaming;
                self.check = Some(C::begin(self.params(), self.resume_at));
                self.write_pos = self.resume_at;
                self.partial = None;
                tracing::info!(start = %self.resume_at, timeline = self.timeline, "streaming");
            }
            Event::XLogData { wal_start, data } => self.xlogdata(wal_start, data)?,
            Event::Keepalive {
                wal_end,
                reply_requested,
            } => {
                if reply_requested {
                    // The server waits for our flush to reach what it sent (e.g. at shutdown).
                    // Catch up when that is quick; with uploads still pending (say, the archive
                    // is away) answer with what is durable now: the server asks again.
                    if wal_end <= self.write_pos && self.archive.idle {
                        self.steps.push_back(Step::MakeDurable { stopping: false });
                    }
                    self.steps.push_back(Step::Status { force: true });
                }
            }
            Event::Archived(view) => {
                self.archive = view;
                if self.cfg.synchronous && self.streaming_or_stopping() {
                    self.steps.push_back(Step::Status { force: false });
                }
            }
            Event::StatusTick => {
                if self.streaming_or_stopping() {
                    self.steps.push_back(Step::Status { force: true });
                }
            }
            Event::PartialTick => {
                // Only when the queue has room (the shell checked): a periodic upload never
                // holds up the stream.
                if let (true, Some(p)) = (self.wants_partial_ticks(), self.partial) {
                    if p.written_end > self.last_upload.max(p.start) {
                        self.steps.push_back(Step::Do(Action::UploadPartial {
                            id: p.id,
                            end: p.written_end,
                        }));
                    }
                }
            }
            Event::StopRequested => {
                if self.accepts_stop() {
                    tracing::info!("stop requested; finishing");
                    self.phase = Phase::Stopping;
                    self.steps.extend([
                        Step::MakeDurable { stopping: true },
                        Step::Status { force: true },
                        Step::RequestStop { at_endpos: false },
                    ]);
                }
            }
            Event::TimelineEnded(sw) => {
                let stopping = self.phase == Phase::Stopping;
                match self.phase {
                    Phase::Connecting => {}
                    Phase::Streaming | Phase::Stopping => {
                        if sw.next_start > self.write_pos {
                            return Err(ReceiveError::BadSwitch {
                                current: self.timeline,
                                end: self.write_pos,
                                next: sw.next_timeline,
                                start: sw.next_start,
                            });
                        }
                        // The rest of this segment belongs to the new timeline: keep the old
                        // timeline's piece as a finished partial.
                        if let Some(p) = self.partial {
                            self.steps.extend([
                                Step::Do(Action::FinishShort { id: p.id }),
                                Step::Do(Action::QueueFinalPartial { id: p.id }),
                            ]);
                        }
                    }
                    Phase::SwitchingTimeline | Phase::Done => {
                        debug_assert!(false, "timeline end in phase {:?}", self.phase);
                        return Ok(());
                    }
                }
                self.phase = Phase::SwitchingTimeline;
                self.steps.push_back(Step::Switch { sw, stopping });
            }
            Event::ServerStopped { signalled } => {
                self.end_stream();
                let pos = self.position();
                let finished = match self.cfg.endpos {
                    Some(end) if !signalled && pos >= end => Finished::EndPos(end),
                    _ => Finished::Signal(pos),
                };
                self.phase = Phase::Done;
                self.steps
                    .push_back(Step::Do(Action::Exit(Exit::Finished(finished))));
            }
            Event::ServerShutdown => {
                tracing::info!("server shut down the stream");
                self.end_stream();
                self.phase = Phase::Connecting;
                self.steps
                    .push_back(Step::Do(Action::Exit(Exit::ServerGone)));
            }
        }
        Ok(())
    }

    /// The next action to perform, `None` when the event is dealt with. Marks the previous
    /// action as done.
    pub fn next_action(&mut self) -> Result<Option<Action>, ReceiveError> {
        self.commit();
        while let Some(step) = self.steps.pop_front() {
            let mut special = None;
            let action = match step {
                Step::Do(a) => a,
                Step::Connect => {
                    if let Some(end) = self.cfg.endpos {
                        if self.position() >= end && self.archive.idle {
                            tracing::info!(endpos = %end, "the archive already reaches --endpos");
                            self.phase = Phase::Done;
                            return Ok(Some(Action::Exit(Exit::Finished(Finished::EndPos(end)))));
                        }
                    }
                    Action::StartReplication {
                        timeline: self.timeline,
                        start: self.resume_at,
                    }
                }
                Step::Chunk => match self.next_write() {
                    Some(a) => a,
                    None => continue,
                },
                Step::Fsync => match self.partial {
                    Some(p) if p.synced_end < p.written_end => Action::FsyncPartial { id: p.id },
                    _ => continue,
                },
                Step::Status { force } => {
                    let status = (self.write_pos, self.flush());
                    if !force && status == self.last_sent {
                        continue;
                    }
                    Action::SendStatus {
                        write: status.0,
                        flush: status.1,
                    }
                }
                Step::MakeDurable { stopping } => {
                    self.steps.push_front(Step::AfterDrain { stopping });
                    Action::DrainArchiver
                }
                Step::AfterDrain { stopping } => {
                    // On a stop the partial is uploaded in every mode: with a local ack its
                    // fsynced bytes were already reported as flushed, and wal-fetch and restore
                    // read only the archive.
                    if let Some(p) = self.partial {
                        let upload = if self.cfg.local_ack {
                            stopping && p.written_end > p.start.max(self.last_upload)
                        } else {
                            self.flush_rule() < p.written_end
                        };
                        if upload {
                            self.steps.push_front(Step::Do(Action::DrainArchiver));
                            self.steps.push_front(Step::Do(Action::UploadPartial {
                                id: p.id,
                                end: p.written_end,
                            }));
                        }
                        self.steps.push_front(Step::Fsync);
                    }
                    continue;
                }
                Step::EndposReached => {
                    tracing::info!(endpos = %self.write_pos, "reached --endpos");
                    self.phase = Phase::Stopping;
                    for s in [
                        Step::RequestStop { at_endpos: true },
                        Step::Status { force: true },
                        Step::MakeDurable { stopping: true },
                    ] {
                        self.steps.push_front(s);
                    }
                    continue;
                }
                Step::RequestStop { at_endpos } => {
                    special = Some(Effect::StopSent { at_endpos });
                    Action::RequestStop
                }
                Step::Switch { sw, stopping } => {
                    if stopping {
                        self.stopped_at = Some(self.write_pos);
                    }
                    if sw.next_timeline <= self.timeline {
                        return Err(ReceiveError::BadSwitch {
                            current: self.timeline,
                            end: self.position(),
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
                    special = Some(Effect::Switched(sw));
                    Action::ArchiveHistories {
                        upto: sw.next_timeline,
                    }
                }
            };
            self.in_flight = special.or_else(|| effect_of(&action));
            return Ok(Some(action));
        }
        Ok(None)
    }

    fn streaming_or_stopping(&self) -> bool {
        matches!(self.phase, Phase::Streaming | Phase::Stopping)
    }

    fn params(&self) -> VerifyParams {
        VerifyParams {
            system_identifier: self.cfg.system_identifier,
            segment_size: self.cfg.seg_size,
            timeline: self.timeline,
        }
    }

    fn xlogdata(&mut self, wal_start: Lsn, mut data: Bytes) -> Result<(), ReceiveError> {
        if self.phase != Phase::Streaming {
            // After a stop request the rest is not wanted (the next start streams it again).
            debug_assert_eq!(self.phase, Phase::Stopping);
            return Ok(());
        }
        if wal_start != self.write_pos {
            return Err(ReceiveError::OutOfOrder {
                got: wal_start,
                expected: self.write_pos,
            });
        }
        let mut reached_end = false;
        if let Some(end) = self.cfg.endpos {
            let room = end.0.saturating_sub(self.write_pos.0);
            if data.len() as u64 >= room {
                data.truncate(room as usize);
                reached_end = true;
            }
        }
        if let Some(check) = self.check.as_mut() {
            check.feed(&data)?;
        }
        self.pending = data;
        self.steps.push_back(Step::Chunk);
        if self.cfg.synchronous {
            self.steps
                .extend([Step::Fsync, Step::Status { force: false }]);
        }
        if reached_end {
            self.steps.push_back(Step::EndposReached);
        }
        Ok(())
    }

    /// The next piece of the pending chunk: open the segment, write up to its end, and when it
    /// is full complete and queue it.
    fn next_write(&mut self) -> Option<Action> {
        if self.pending.is_empty() {
            return None;
        }
        let Some(p) = self.partial else {
            let id = SegmentId::containing(self.timeline, self.write_pos, self.cfg.seg_size);
            self.steps.push_front(Step::Chunk);
            return Some(Action::OpenPartial { id });
        };
        let seg_end = p.start.0 + u64::from(self.cfg.seg_size.bytes());
        debug_assert!(self.write_pos >= p.start && self.write_pos.0 < seg_end);
        let n = (self.pending.len() as u64).min(seg_end - self.write_pos.0);
        let data = self.pending.split_to(n as usize);
        if !self.pending.is_empty() {
            self.steps.push_front(Step::Chunk);
        }
        if self.write_pos.0 + n == seg_end {
            self.steps
                .push_front(Step::Do(Action::QueueSegment { id: p.id }));
            self.steps.push_front(Step::Do(Action::Complete {
                id: p.id,
                fsync: self.cfg.local_ack,
            }));
        }
        Some(Action::Write {
            id: p.id,
            offset: (self.write_pos.0 - p.start.0) as u32,
            data,
        })
    }

    /// The stream ends here; after a stop, how far it got is what the run reports.
    fn end_stream(&mut self) {
        if self.phase == Phase::Stopping {
            self.stopped_at = Some(self.write_pos);
        }
    }

    /// [`flush::flush_position`] over what is known now.
    fn flush_rule(&self) -> Lsn {
        flush::flush_position(
            self.cfg.local_ack,
            self.completed_upto,
            self.archive.archived_upto,
            self.archive.snapshot,
            self.partial,
        )
    }

    /// The flush position to report: the rule, never below what was reported before (that was
    /// durable then and stays durable: nothing durable is ever shortened).
    fn flush(&self) -> Lsn {
        self.flush_rule().max(self.last_sent.1)
    }

    /// Applies the effect of the action in flight: the shell performed it.
    fn commit(&mut self) {
        let Some(effect) = self.in_flight.take() else {
            return;
        };
        match effect {
            Effect::Opened(id) => {
                let start = id.start_lsn(self.cfg.seg_size);
                debug_assert_eq!(start, self.write_pos);
                self.partial = Some(PartialView {
                    id,
                    start,
                    written_end: start,
                    synced_end: start,
                });
            }
            Effect::Wrote(n) => {
                self.write_pos = Lsn(self.write_pos.0 + u64::from(n));
                if let Some(p) = self.partial.as_mut() {
                    p.written_end = self.write_pos;
                }
            }
            Effect::Synced => {
                if let Some(p) = self.partial.as_mut() {
                    p.synced_end = p.written_end;
                }
            }
            Effect::Completed => {
                self.partial = None;
                self.completed_upto = self.write_pos;
                self.resume_at = self.write_pos;
                self.stopped_at = None;
            }
            Effect::FinishedShort => self.partial = None,
            Effect::Uploaded(end) => self.last_upload = end,
            Effect::Sent(write, flush) => {
                debug_assert!(flush >= self.last_sent.1, "flush went backwards");
                self.last_sent = (write, flush);
            }
            Effect::StopSent { at_endpos } => {
                if at_endpos {
                    self.stopped_at = Some(self.write_pos);
                }
            }
            Effect::Switched(sw) => {
                self.timeline = sw.next_timeline;
                self.resume_at = sw.next_start.segment_start(self.cfg.seg_size.bytes());
                self.stopped_at = None;
                self.completed_upto = self.completed_upto.min(self.resume_at);
                self.write_pos = self.resume_at;
                self.partial = None;
                self.check = None;
                self.phase = Phase::Connecting;
                self.steps.push_front(Step::Connect);
            }
        }
        self.check_invariants();
    }

    fn check_invariants(&self) {
        debug_assert!(self.completed_upto <= self.resume_at);
        debug_assert!(self.resume_at <= self.write_pos || self.phase == Phase::Connecting);
        debug_assert_eq!(
            self.resume_at,
            self.resume_at.segment_start(self.cfg.seg_size.bytes())
        );
        if let Some(p) = self.partial {
            debug_assert!(p.start <= p.synced_end && p.synced_end <= p.written_end);
            debug_assert_eq!(p.written_end, self.write_pos);
        }
    }
}
