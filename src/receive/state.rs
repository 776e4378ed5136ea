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
use crate::wal::{Lsn, SegmentId, SegmentSize, Timeline};

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
        timeline: Timeline,
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
        upto: Timeline,
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
    timeline: Timeline,
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
    pub fn new(cfg: Config, timeline: Timeline, resume_at: Lsn) -> Self {
        debug_assert_eq!(resume_at, resume_at.segment_start(cfg.seg_size));
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
                tracing::info!(start = %self.resume_at, timeline = self.timeline.get(), "streaming");
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
                        from = self.timeline.get(),
                        to = sw.next_timeline.get(),
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
                self.resume_at = sw.next_start.segment_start(self.cfg.seg_size);
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
            self.resume_at.segment_start(self.cfg.seg_size)
        );
        if let Some(p) = self.partial {
            debug_assert!(p.start <= p.synced_end && p.synced_end <= p.written_end);
            debug_assert_eq!(p.written_end, self.write_pos);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::timeline::tl;
    use std::collections::{HashMap, HashSet};

    const SEG: u64 = 1 << 20;

    fn size() -> SegmentSize {
        SegmentSize::new(SEG).unwrap()
    }

    /// The byte at `lsn` of the synthetic WAL (the same on every timeline).
    fn byte_at(lsn: u64) -> u8 {
        (lsn % 251) as u8
    }

    /// Whether `data` is the synthetic WAL at `lsn` (sampled: first, middle and last byte; the
    /// store checks offsets exactly).
    fn is_wal_at(data: &[u8], lsn: u64) -> bool {
        let n = data.len();
        [0, n / 2, n.saturating_sub(1)]
            .iter()
            .all(|&i| i >= n || data[i] == byte_at(lsn + i as u64))
    }

    /// Stands in for the verifier: checks that every chunk is the synthetic WAL at its position,
    /// so a chunk fed out of order or twice would fail here.
    struct Pattern {
        next: u64,
    }

    impl StreamCheck for Pattern {
        fn begin(_: VerifyParams, start: Lsn) -> Self {
            Pattern { next: start.0 }
        }
        fn feed(&mut self, data: &[u8]) -> Result<(), VerifyError> {
            assert!(is_wal_at(data, self.next), "chunk not in order");
            self.next += data.len() as u64;
            Ok(())
        }
    }

    fn cfg(local_ack: bool, synchronous: bool) -> Config {
        Config {
            seg_size: size(),
            system_identifier: 7,
            local_ack: local_ack || synchronous,
            synchronous,
            endpos: None,
            partial_uploads: true,
        }
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Job {
        Segment(SegmentId),
        Final(SegmentId, u64),
        Snapshot(SegmentId, Lsn),
    }

    /// An in-memory spool, archiver and archive that perform the state machine's actions the
    /// way the shell does, and check the invariants while doing so.
    struct Sim {
        pattern: Bytes,
        local_ack: bool,
        /// Everything before it was in the archive at the start.
        base: Lsn,
        // spool
        open: Option<(SegmentId, u64, u64)>, // id, written, synced (this session)
        spool_synced: HashMap<SegmentId, u64>, // bytes of a partial that are durable
        spool_complete: HashSet<SegmentId>,  // ready files fsynced before their rename
        ready: HashSet<SegmentId>,
        finished: HashMap<SegmentId, u64>,
        // archiver
        queue: std::collections::VecDeque<Job>,
        capacity: usize,
        archived_upto: Lsn,
        snapshot: Option<(SegmentId, Lsn)>,
        // archive
        archived: HashSet<SegmentId>,
        archived_partials: HashMap<SegmentId, u64>,
        // the server
        timeline: Timeline,
        /// End of each timeline that ended.
        ends: HashMap<Timeline, Lsn>,
        server_pos: Lsn,
        /// The most the server sent on the current timeline (it ends no earlier).
        sent_on_timeline: Lsn,
        streaming: bool,
        stop_sent: bool,
        // what was sent
        last_flush: Lsn,
        last_write: Lsn,
        statuses: usize,
        histories: u32,
        log: Vec<String>,
    }

    impl Sim {
        fn new(base: Lsn, local_ack: bool) -> Sim {
            thread_local! {
                static PATTERN: Bytes = (0..3 * SEG + 251).map(byte_at).collect::<Vec<u8>>().into();
            }
            Sim {
                pattern: PATTERN.with(Bytes::clone),
                local_ack,
                base,
                open: None,
                spool_synced: HashMap::new(),
                spool_complete: HashSet::new(),
                ready: HashSet::new(),
                finished: HashMap::new(),
                queue: Default::default(),
                capacity: 3,
                archived_upto: base,
                snapshot: None,
                archived: HashSet::new(),
                archived_partials: HashMap::new(),
                timeline: tl(1),
                ends: HashMap::new(),
                server_pos: base,
                sent_on_timeline: base,
                streaming: false,
                stop_sent: false,
                last_flush: Lsn(0),
                last_write: Lsn(0),
                statuses: 0,
                histories: 1,
                log: Vec::new(),
            }
        }

        fn chunk(&self, at: Lsn, n: u64) -> Bytes {
            let off = (at.0 % 251) as usize;
            self.pattern.slice(off..off + n as usize)
        }

        fn view(&self) -> ArchiveView {
            ArchiveView {
                archived_upto: self.archived_upto,
                snapshot: self.snapshot,
                idle: self.queue.is_empty(),
            }
        }

        /// The archiver finishes its oldest job (results are published in submission order).
        fn archive_one(&mut self) -> bool {
            let Some(job) = self.queue.pop_front() else {
                return false;
            };
            match job {
                Job::Segment(id) => {
                    assert!(self.ready.remove(&id), "{id:?} queued but not ready");
                    self.archived.insert(id);
                    self.archived_upto = self.archived_upto.max(id.end_lsn(size()));
                }
                Job::Final(id, len) => {
                    self.archived_partials.insert(id, len);
                }
                Job::Snapshot(id, end) => {
                    let len = end.0 - id.start_lsn(size()).0;
                    let old = self.archived_partials.insert(id, len).unwrap_or(0);
                    assert!(len >= old, "a partial upload shortened {id:?}");
                    self.snapshot = Some((id, end));
                }
            }
            true
        }

        fn room(&mut self) {
            while self.queue.len() >= self.capacity {
                self.archive_one();
            }
        }

        /// The end of the WAL prefix durable where the mode says: pieces stored in the archive
        /// (and, with a local ack, fsynced in the spool), each counting for the bytes of the
        /// history it holds (a timeline's file holds its parent's bytes before it began, its
        /// own up to where it ended).
        fn durable_end(&self, archive_only: bool) -> Lsn {
            let local = self.local_ack && !archive_only;
            let mut pos = self.base.0;
            loop {
                let segno = pos / SEG;
                let seg_start = segno * SEG;
                let mut best = pos;
                for tli in (1..=self.timeline.get()).filter_map(Timeline::new) {
                    let id = SegmentId::new(tli, segno);
                    let end_of_tli = self.ends.get(&tli).map_or(u64::MAX, |l| l.0);
                    let mut len = 0;
                    if self.archived.contains(&id) || (local && self.spool_complete.contains(&id)) {
                        len = SEG;
                    }
                    len = len.max(self.archived_partials.get(&id).copied().unwrap_or(0));
                    if local {
                        len = len.max(self.spool_synced.get(&id).copied().unwrap_or(0));
                    }
                    best = best.max((seg_start + len).min(end_of_tli));
                }
                if best == pos {
                    return Lsn(pos);
                }
                pos = best;
                if !pos.is_multiple_of(SEG) {
                    return Lsn(pos);
                }
            }
        }

        fn check_status(&mut self, write: Lsn, flush: Lsn) {
            let durable = self.durable_end(false);
            assert!(
                flush <= durable,
                "flush {flush} > durable {durable} (local ack {})\n{}",
                self.local_ack,
                self.log.join("\n")
            );
            assert!(
                flush >= self.last_flush,
                "flush went back from {} to {flush}",
                self.last_flush
            );
            assert!(
                write >= self.last_write,
                "write went back from {} to {write}",
                self.last_write
            );
            assert!(write <= self.server_pos);
            self.last_flush = flush;
            self.last_write = write;
            self.statuses += 1;
        }

        /// Hands an event, as the shell does.
        fn event(
            &mut self,
            st: &mut StreamState<Pattern>,
            ev: Event,
        ) -> Result<Option<Exit>, ReceiveError> {
            self.log.push(match &ev {
                Event::XLogData { wal_start, data } => {
                    format!(
                        "event XLogData {{ wal_start: {wal_start}, len: {} }}",
                        data.len()
                    )
                }
                other => format!("event {other:?}"),
            });
            if self.log.len() > 200 {
                self.log.drain(..100);
            }
            if matches!(ev, Event::Connected) {
                self.open = None;
                self.streaming = false;
                self.stop_sent = false;
            }
            st.observe(self.view());
            st.handle(ev)?;
            self.actions(st)
        }

        /// Performs the actions, as the shell does.
        fn actions(&mut self, st: &mut StreamState<Pattern>) -> Result<Option<Exit>, ReceiveError> {
            loop {
                st.observe(self.view());
                let Some(action) = st.next_action()? else {
                    return Ok(None);
                };
                if let Some(exit) = self.perform(st, action)? {
                    return Ok(Some(exit));
                }
            }
        }

        fn perform(
            &mut self,
            st: &mut StreamState<Pattern>,
            action: Action,
        ) -> Result<Option<Exit>, ReceiveError> {
            self.log.push(format!("  {}", short(&action)));
            match action {
                Action::StartReplication { timeline, start } => {
                    assert_eq!(start.0 % SEG, 0, "a stream starts at a segment start");
                    assert!(timeline <= self.timeline);
                    assert!(start >= self.base);
                    self.server_pos = start;
                    self.streaming = true;
                    self.last_write = Lsn(0);
                    st.observe(self.view());
                    st.handle(Event::Started)?;
                }
                Action::OpenPartial { id } => {
                    assert!(self.open.is_none());
                    assert_eq!(id.timeline, self.timeline);
                    self.open = Some((id, 0, 0));
                }
                Action::Write { id, offset, data } => {
                    let (oid, written, _) = self.open.expect("write without open");
                    assert_eq!(oid, id);
                    assert_eq!(u64::from(offset), written, "write out of order");
                    assert!(
                        written + data.len() as u64 <= SEG,
                        "write crosses the segment end"
                    );
                    let at = id.start_lsn(size()).0 + written;
                    assert!(is_wal_at(&data, at), "wrong bytes");
                    if let Some(o) = self.open.as_mut() {
                        o.1 += data.len() as u64;
                    }
                }
                Action::FsyncPartial { id } => {
                    let (oid, written, synced) = self.open.as_mut().unwrap();
                    assert_eq!(*oid, id);
                    *synced = *written;
                    let d = self.spool_synced.entry(id).or_default();
                    *d = (*d).max(*written);
                }
                Action::Complete { id, fsync } => {
                    let (oid, written, _) = self.open.take().unwrap();
                    assert_eq!((oid, written), (id, SEG), "completed before it was full");
                    assert_eq!(fsync, self.local_ack);
                    if fsync {
                        self.spool_complete.insert(id);
                    }
                    self.ready.insert(id);
                }
                Action::QueueSegment { id } => {
                    while self.queue.len() >= self.capacity {
                        self.archive_one();
                        st.observe(self.view());
                        let (w, f) = st.status_now();
                        self.check_status(w, f);
                    }
                    self.queue.push_back(Job::Segment(id));
                }
                Action::FinishShort { id } => {
                    let (oid, written, _) = self.open.take().unwrap();
                    assert_eq!(oid, id);
                    self.spool_synced.insert(id, written);
                    self.finished.insert(id, written);
                }
                Action::QueueFinalPartial { id } => {
                    self.room();
                    let len = self.finished[&id];
                    self.queue.push_back(Job::Final(id, len));
                }
                Action::UploadPartial { id, end } => {
                    let (oid, written, _) = self.open.unwrap();
                    assert_eq!(oid, id);
                    assert_eq!(end.0, id.start_lsn(size()).0 + written);
                    self.room();
                    self.queue.push_back(Job::Snapshot(id, end));
                }
                Action::DrainArchiver => while self.archive_one() {},
                Action::SendStatus { write, flush } => self.check_status(write, flush),
                Action::RequestStop => self.stop_sent = true,
                Action::ArchiveHistories { upto } => {
                    self.histories = self.histories.max(upto.get())
                }
                Action::Exit(exit) => {
                    self.streaming = false;
                    return Ok(Some(exit));
                }
            }
            Ok(None)
        }
    }

    fn short(a: &Action) -> String {
        match a {
            Action::Write { id, offset, data } => {
                format!(
                    "Write {{ id: {id:?}, offset: {offset}, len: {} }}",
                    data.len()
                )
            }
            other => format!("{other:?}"),
        }
    }

    fn connect(sim: &mut Sim, st: &mut StreamState<Pattern>) {
        assert_eq!(sim.event(st, Event::Connected).unwrap(), None);
        assert!(sim.streaming);
    }

    fn send(
        sim: &mut Sim,
        st: &mut StreamState<Pattern>,
        n: u64,
    ) -> Result<Option<Exit>, ReceiveError> {
        let at = sim.server_pos;
        sim.server_pos = Lsn(at.0 + n);
        sim.sent_on_timeline = sim.sent_on_timeline.max(sim.server_pos);
        let data = sim.chunk(at, n);
        sim.event(
            st,
            Event::XLogData {
                wal_start: at,
                data,
            },
        )
    }

    /// The actions one event yields, in the short form.
    fn actions_of(sim: &mut Sim, st: &mut StreamState<Pattern>, ev: Event) -> Vec<String> {
        let from = sim.log.len();
        sim.event(st, ev).unwrap();
        sim.log[from + 1..]
            .iter()
            .map(|s| s.trim().to_string())
            .collect()
    }

    #[test]
    fn a_chunk_across_a_segment_end_completes_and_queues_the_segment() {
        let base = Lsn(3 * SEG);
        let mut sim = Sim::new(base, false);
        let mut st = StreamState::<Pattern>::new(cfg(false, false), tl(1), base);
        connect(&mut sim, &mut st);
        send(&mut sim, &mut st, SEG - 100).unwrap();
        let at = sim.server_pos;
        sim.server_pos = Lsn(at.0 + 300);
        let data = sim.chunk(at, 300);
        let got = actions_of(
            &mut sim,
            &mut st,
            Event::XLogData {
                wal_start: at,
                data,
            },
        );
        let s3 = SegmentId::new(tl(1), 3);
        let s4 = SegmentId::new(tl(1), 4);
        assert_eq!(
            got,
            vec![
                format!("Write {{ id: {s3:?}, offset: {}, len: 100 }}", SEG - 100),
                format!(
                    "{:?}",
                    Action::Complete {
                        id: s3,
                        fsync: false
                    }
                ),
                format!("{:?}", Action::QueueSegment { id: s3 }),
                format!("{:?}", Action::OpenPartial { id: s4 }),
                format!("Write {{ id: {s4:?}, offset: 0, len: 200 }}"),
            ]
        );
        assert_eq!(
            st.position(),
            Lsn(4 * SEG),
            "a reconnect re-streams segment 4"
        );
    }

    #[test]
    fn wal_out_of_order_is_refused_before_anything_is_written() {
        let base = Lsn(SEG);
        let mut sim = Sim::new(base, false);
        let mut st = StreamState::<Pattern>::new(cfg(false, false), tl(1), base);
        connect(&mut sim, &mut st);
        send(&mut sim, &mut st, 1000).unwrap();
        let at = Lsn(base.0 + 2000);
        let err = sim
            .event(
                &mut st,
                Event::XLogData {
                    wal_start: at,
                    data: sim.chunk(at, 10),
                },
            )
            .unwrap_err();
        assert!(
            matches!(err, ReceiveError::OutOfOrder { got, expected } if got == at && expected == Lsn(base.0 + 1000))
        );
        assert_eq!(sim.open.map(|o| o.1), Some(1000));
        // The reconnect starts again at the segment start, the partial re-streamed in place.
        sim.event(&mut st, Event::Connected).unwrap();
        assert_eq!(sim.server_pos, base);
    }

    #[test]
    fn ack_archived_reports_only_what_the_archive_holds() {
        let base = Lsn(5 * SEG);
        let mut sim = Sim::new(base, false);
        let mut st = StreamState::<Pattern>::new(cfg(false, false), tl(1), base);
        connect(&mut sim, &mut st);
        send(&mut sim, &mut st, SEG + 500).unwrap();
        // Segment 5 is queued, not archived: the flush stays at the base.
        sim.event(&mut st, Event::StatusTick).unwrap();
        assert_eq!(sim.last_flush, base);
        assert!(sim.archive_one());
        let v = sim.view();
        sim.event(&mut st, Event::Archived(v)).unwrap();
        sim.event(&mut st, Event::StatusTick).unwrap();
        assert_eq!(sim.last_flush, Lsn(6 * SEG));
        // A partial upload extends it into segment 6 once stored.
        sim.event(&mut st, Event::PartialTick).unwrap();
        sim.event(&mut st, Event::StatusTick).unwrap();
        assert_eq!(sim.last_flush, Lsn(6 * SEG));
        assert!(sim.archive_one());
        let v = sim.view();
        sim.event(&mut st, Event::Archived(v)).unwrap();
        sim.event(&mut st, Event::StatusTick).unwrap();
        assert_eq!(sim.last_flush, Lsn(6 * SEG + 500));
        // Nothing new written: no second upload.
        assert!(actions_of(&mut sim, &mut st, Event::PartialTick).is_empty());
    }

    #[test]
    fn synchronous_fsyncs_and_reports_after_every_chunk() {
        let base = Lsn(2 * SEG);
        let mut sim = Sim::new(base, true);
        let mut st = StreamState::<Pattern>::new(cfg(true, true), tl(1), base);
        connect(&mut sim, &mut st);
        send(&mut sim, &mut st, 4096).unwrap();
        assert_eq!(sim.last_flush, Lsn(base.0 + 4096));
        assert_eq!(sim.spool_synced[&SegmentId::new(tl(1), 2)], 4096);
        // The same status is not sent twice unasked.
        let n = sim.statuses;
        let v = sim.view();
        sim.event(&mut st, Event::Archived(v)).unwrap();
        assert_eq!(sim.statuses, n);
    }

    #[test]
    fn a_stop_makes_everything_durable_before_the_last_status_and_exit() {
        for local in [false, true] {
            let base = Lsn(2 * SEG);
            let mut sim = Sim::new(base, local);
            let mut st = StreamState::<Pattern>::new(cfg(local, false), tl(1), base);
            connect(&mut sim, &mut st);
            send(&mut sim, &mut st, SEG + 777).unwrap();
            let got = actions_of(&mut sim, &mut st, Event::StopRequested);
            let s3 = SegmentId::new(tl(1), 3);
            assert_eq!(
                got,
                vec![
                    "DrainArchiver".to_string(),
                    format!("{:?}", Action::FsyncPartial { id: s3 }),
                    format!(
                        "{:?}",
                        Action::UploadPartial {
                            id: s3,
                            end: Lsn(3 * SEG + 777)
                        }
                    ),
                    "DrainArchiver".to_string(),
                    format!(
                        "{:?}",
                        Action::SendStatus {
                            write: Lsn(3 * SEG + 777),
                            flush: Lsn(3 * SEG + 777)
                        }
                    ),
                    "RequestStop".to_string(),
                ],
                "local ack {local}"
            );
            assert_eq!(st.phase(), Phase::Stopping);
            assert!(!st.accepts_stop() && !st.wants_partial_ticks());
            // What the server still sends is not written.
            send(&mut sim, &mut st, 100).unwrap();
            assert_eq!(sim.open.map(|o| o.1), Some(777));
            let exit = sim
                .event(&mut st, Event::ServerStopped { signalled: true })
                .unwrap();
            assert_eq!(
                exit,
                Some(Exit::Finished(Finished::Signal(Lsn(3 * SEG + 777))))
            );
            assert_eq!(sim.durable_end(true), Lsn(3 * SEG + 777));
        }
    }

    #[test]
    fn endpos_cuts_the_chunk_and_stops() {
        let base = Lsn(2 * SEG);
        let end = Lsn(2 * SEG + 1000);
        let mut sim = Sim::new(base, false);
        let mut st = StreamState::<Pattern>::new(
            Config {
                endpos: Some(end),
                ..cfg(false, false)
            },
            tl(1),
            base,
        );
        connect(&mut sim, &mut st);
        send(&mut sim, &mut st, 5000).unwrap();
        assert_eq!(sim.open.map(|o| o.1), Some(1000));
        assert!(sim.stop_sent);
        assert_eq!(sim.durable_end(true), end);
        let exit = sim
            .event(&mut st, Event::ServerStopped { signalled: false })
            .unwrap();
        assert_eq!(exit, Some(Exit::Finished(Finished::EndPos(end))));
        // A run that starts where the archive already reaches --endpos exits at once.
        let mut st = StreamState::<Pattern>::new(
            Config {
                endpos: Some(end),
                ..cfg(false, false)
            },
            tl(1),
            Lsn(3 * SEG),
        );
        let mut sim = Sim::new(Lsn(3 * SEG), false);
        let exit = sim.event(&mut st, Event::Connected).unwrap();
        assert_eq!(exit, Some(Exit::Finished(Finished::EndPos(end))));
    }

    #[test]
    fn a_timeline_end_inside_a_segment_finishes_the_partial_and_restarts_on_the_next() {
        let base = Lsn(4 * SEG);
        let mut sim = Sim::new(base, false);
        let mut st = StreamState::<Pattern>::new(cfg(false, false), tl(1), base);
        connect(&mut sim, &mut st);
        send(&mut sim, &mut st, 3000).unwrap();
        let sw = TimelineSwitch {
            next_timeline: tl(2),
            next_start: Lsn(4 * SEG + 3000),
        };
        sim.ends.insert(tl(1), sw.next_start);
        sim.timeline = tl(2);
        let got = actions_of(&mut sim, &mut st, Event::TimelineEnded(sw));
        let s4 = SegmentId::new(tl(1), 4);
        assert_eq!(
            got,
            vec![
                format!("{:?}", Action::FinishShort { id: s4 }),
                format!("{:?}", Action::QueueFinalPartial { id: s4 }),
                format!("{:?}", Action::ArchiveHistories { upto: tl(2) }),
                format!(
                    "{:?}",
                    Action::StartReplication {
                        timeline: tl(2),
                        start: Lsn(4 * SEG)
                    }
                ),
            ]
        );
        assert_eq!(st.phase(), Phase::Streaming);
        // A switch to an older timeline is refused.
        let bad = TimelineSwitch {
            next_timeline: tl(2),
            next_start: Lsn(4 * SEG),
        };
        st.handle(Event::TimelineEnded(bad)).unwrap();
        assert!(matches!(
            st.next_action(),
            Err(ReceiveError::BadSwitch { .. })
        ));
    }

    #[test]
    fn an_action_that_failed_does_not_count() {
        // The history files could not be archived (the connection broke): the switch is not
        // taken, the reconnect streams the old timeline again.
        let base = Lsn(4 * SEG);
        let mut st = StreamState::<Pattern>::new(cfg(false, false), tl(1), base);
        st.handle(Event::Connected).unwrap();
        assert!(matches!(
            st.next_action().unwrap(),
            Some(Action::StartReplication { timeline, .. }) if timeline == tl(1)
        ));
        let sw = TimelineSwitch {
            next_timeline: tl(2),
            next_start: Lsn(4 * SEG),
        };
        st.handle(Event::TimelineEnded(sw)).unwrap();
        assert!(matches!(
            st.next_action().unwrap(),
            Some(Action::ArchiveHistories { upto }) if upto == tl(2)
        ));
        st.handle(Event::Connected).unwrap();
        assert!(matches!(
            st.next_action().unwrap(),
            Some(Action::StartReplication { timeline, start }) if timeline == tl(1) && start == base
        ));
        // A status that was not sent does not count as sent either.
        st.handle(Event::Started).unwrap();
        st.handle(Event::StatusTick).unwrap();
        assert!(matches!(
            st.next_action().unwrap(),
            Some(Action::SendStatus { .. })
        ));
        st.handle(Event::Connected).unwrap();
        assert_eq!(st.last_sent, (Lsn(0), Lsn(0)));
    }

    #[test]
    fn a_reply_request_catches_up_when_the_archiver_is_idle() {
        let base = Lsn(2 * SEG);
        let mut sim = Sim::new(base, false);
        let mut st = StreamState::<Pattern>::new(cfg(false, false), tl(1), base);
        connect(&mut sim, &mut st);
        send(&mut sim, &mut st, 900).unwrap();
        let wal_end = sim.server_pos;
        let got = actions_of(
            &mut sim,
            &mut st,
            Event::Keepalive {
                wal_end,
                reply_requested: true,
            },
        );
        assert_eq!(got.first().map(String::as_str), Some("DrainArchiver"));
        assert_eq!(sim.last_flush, Lsn(2 * SEG + 900));
        // Not asked: no answer.
        let ka = Event::Keepalive {
            wal_end,
            reply_requested: false,
        };
        assert!(actions_of(&mut sim, &mut st, ka).is_empty());
    }

    fn rng(seed: &mut u64) -> u64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    }

    /// Random event sequences against the in-memory store. After every action: each flush sent
    /// is <= what is durable (archive, plus fsynced spool under a local ack), never goes back;
    /// writes are in order (checked by the store and the pattern check); a stop exits only with
    /// everything written stored in the archive (unless it was cut short).
    #[test]
    fn random_event_sequences_keep_the_invariants() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut exits = 0;
        for run in 0..1_500 {
            let local = run % 3 != 0;
            let synchronous = local && run % 5 == 1;
            let base = Lsn((1 + rng(&mut seed) % 40) * SEG);
            let endpos = (run % 7 == 3).then(|| Lsn(base.0 + rng(&mut seed) % (5 * SEG)));
            let config = Config {
                endpos,
                partial_uploads: run % 4 != 2,
                ..cfg(local, synchronous)
            };
            let mut sim = Sim::new(base, config.local_ack);
            sim.capacity = 1 + (rng(&mut seed) % 4) as usize;
            let mut st = StreamState::<Pattern>::new(config, tl(1), base);
            let mut stop_at: Option<Lsn> = None;
            let mut signalled = false;
            let mut exit = sim.event(&mut st, Event::Connected).unwrap();
            for _ in 0..400 {
                if let Some(e) = exit.take() {
                    match e {
                        Exit::ServerGone => {
                            exit = sim.event(&mut st, Event::Connected).unwrap();
                            continue;
                        }
                        Exit::Finished(f) => {
                            let durable = sim.durable_end(true);
                            match f {
                                Finished::EndPos(end) => assert!(
                                    durable >= end,
                                    "run {run}: endpos {end} but archive ends at {durable}"
                                ),
                                Finished::Signal(pos) => {
                                    if let Some(at) = stop_at {
                                        assert_eq!(pos, at);
                                        assert!(durable >= pos, "run {run}: stopped at {pos} but archive ends at {durable}");
                                    }
                                }
                                Finished::Disconnected(_) => unreachable!(),
                            }
                            exits += 1;
                            break;
                        }
                    }
                }
                let r = rng(&mut seed) % 100;
                let stopping = st.phase() == Phase::Stopping;
                let result = match r {
                    0..=39 => {
                        let n = 1 + rng(&mut seed) % (SEG / 3);
                        if rng(&mut seed).is_multiple_of(80) {
                            // Out of order: refused, then a reconnect.
                            let at = Lsn(sim.server_pos.0 + 8);
                            let data = sim.chunk(at, n);
                            match sim.event(
                                &mut st,
                                Event::XLogData {
                                    wal_start: at,
                                    data,
                                },
                            ) {
                                Err(ReceiveError::OutOfOrder { .. }) => {
                                    sim.event(&mut st, Event::Connected)
                                }
                                other => other,
                            }
                        } else {
                            send(&mut sim, &mut st, n)
                        }
                    }
                    40..=49 => {
                        let reply_requested = rng(&mut seed).is_multiple_of(2);
                        let wal_end = sim.server_pos;
                        sim.event(
                            &mut st,
                            Event::Keepalive {
                                wal_end,
                                reply_requested,
                            },
                        )
                    }
                    50..=64 => {
                        sim.archive_one();
                        let v = sim.view();
                        sim.event(&mut st, Event::Archived(v))
                    }
                    65..=72 => {
                        if st.wants_partial_ticks() && sim.queue.len() < sim.capacity {
                            sim.event(&mut st, Event::PartialTick)
                        } else {
                            Ok(None)
                        }
                    }
                    73..=84 => sim.event(&mut st, Event::StatusTick),
                    85..=86 => {
                        signalled = true;
                        Ok(None)
                    }
                    87..=89 if sim.stop_sent => {
                        sim.event(&mut st, Event::ServerStopped { signalled })
                    }
                    90..=91
                        if !stopping
                            && sim.server_pos == st.write_pos
                            && sim.server_pos >= sim.sent_on_timeline =>
                    {
                        let sw = TimelineSwitch {
                            next_timeline: sim.timeline.next().expect("test timelines stay small"),
                            next_start: sim.server_pos,
                        };
                        sim.ends.insert(sim.timeline, sw.next_start);
                        sim.timeline = sw.next_timeline;
                        sim.sent_on_timeline = Lsn(0);
                        sim.event(&mut st, Event::TimelineEnded(sw))
                    }
                    92 => sim.event(&mut st, Event::ServerShutdown),
                    93 => sim.event(&mut st, Event::Connected),
                    94 if stopping => break, // the stop is cut short (timeout, second signal)
                    _ => Ok(None),
                };
                let result = match result {
                    // The shell's stop arm fires whenever a stop is taken and a signal came.
                    Ok(None) if signalled && st.accepts_stop() => {
                        let r = sim.event(&mut st, Event::StopRequested);
                        stop_at = Some(st.write_pos);
                        r
                    }
                    other => other,
                };
                match result {
                    Ok(e) => exit = e,
                    Err(e) => panic!("run {run}: {e}\n{}", sim.log.join("\n")),
                }
            }
        }
        assert!(exits > 50, "only {exits} runs reached an exit");
    }
}
