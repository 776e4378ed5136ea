//! Planning a restore from the archive's listing, before anything is written: which base backup
//! to start from, which timelines replay follows, and proof that every WAL segment on the way is
//! in the archive.
//!
//! A restore that finds a hole in the WAL only after copying a large base backup wastes hours
//! and, worse, may end recovery early and promote at the wrong point. So `walagent restore`
//! checks the chain up front and names the missing segment, or says that the target lies
//! outside the archive.
//!
//! The rules mirror PostgreSQL's recovery (`xlogrecovery.c`, `timeline.c`):
//!
//! - **Timeline path.** The target timeline's history file lists its ancestors and the LSN where
//!   each was left. The backup's timeline must be one of them (or the target itself), the backup
//!   must have started before its timeline was left, and it must have become consistent before
//!   then too. `latest` is resolved as `findNewestTimeLine` does: from the backup's timeline,
//!   probe `N+1.history`, `N+2.history`, ... and stop at the first one missing.
//! - **Which file holds each segment.** For each segment number recovery reads the file of the
//!   newest timeline on the path whose begin LSN lies in that segment or before it
//!   (`XLogFileReadAnyTLI`). So the segment holding a switch point is read from the new timeline,
//!   which has a copy of the old timeline's WAL up to the switch.
//! - **How far.** From the segment holding the backup's start LSN to the one holding its end LSN
//!   (consistency), then to the target: a target LSN's segment; for no target, as far as the
//!   segments run without a gap, but at least into the target timeline. Time, xid and
//!   restore-point targets are located by scanning WAL (`wal::xact`); the caller passes the found
//!   LSN in [`PlanOptions::located_stop`], otherwise they are planned like "no target".
//! - **Partial segments.** The last, incomplete segment of a timeline is stored as `.partial`;
//!   it counts only as the chain's final segment and only with `allow_partial` (wal-fetch serves
//!   it under the full name with `--allow-partial`). It holds only part of its segment: once the
//!   caller has scanned it ([`WalIndex::set_partial_content`]), the backup must be consistent and
//!   a target LSN or located stop must start a complete record within what it holds. A target
//!   past a partial that ends its timeline lies beyond the archive; a partial followed by later
//!   WAL of its timeline is a gap.
//! - **Which backup.** Newest first (by end LSN, then id), the first whose consistency point is
//!   not after the target and whose chain checks out. PostgreSQL refuses to stop before
//!   consistency, so for a time target a backup qualifies only when `stop_time <= target`: every
//!   commit up to its end LSN happened before `stop_time`.

use std::fmt;

use crate::archive::catalog::BackupInfo;
use crate::archive::index::{PartialContent, WalIndex};
use crate::wal::xact::WalEvent;
use crate::wal::{history_file_name, Lsn, SegmentId, SegmentSize, Timeline};

use super::target::{describe_event, stop_event, RecoveryTarget, TargetTime, TargetTimeline};

/// One timeline on the way from a backup to the target timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathStep {
    pub timeline: Timeline,
    /// Where replay enters this timeline: the backup's start LSN for the first step, the switch
    /// point from the parent for the others.
    pub begin: Lsn,
    /// The switch point to the next timeline; `None` for the target timeline.
    pub end: Option<Lsn>,
}

/// The timelines replay follows from a backup to the target timeline, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimelinePath {
    pub steps: Vec<PathStep>,
}

impl TimelinePath {
    /// The last step's timeline (a path from [`timeline_path`] is never empty; an empty one
    /// says timeline 1).
    pub fn target_timeline(&self) -> Timeline {
        self.steps.last().map_or(Timeline::FIRST, |s| s.timeline)
    }

    /// The timeline whose file recovery reads for segment `segno` (XLogFileReadAnyTLI): the
    /// newest step whose begin LSN lies in that segment or an earlier one.
    pub fn timeline_for_segment(&self, segno: u64, size: SegmentSize) -> Timeline {
        self.steps
            .iter()
            .rev()
            .find(|s| s.begin.segno(size) <= segno)
            .or(self.steps.first())
            .map_or(Timeline::FIRST, |s| s.timeline)
    }

    /// `1 -> 2 -> 3`
    pub fn describe(&self) -> String {
        self.steps
            .iter()
            .map(|s| s.timeline.to_string())
            .collect::<Vec<_>>()
            .join(" -> ")
    }
}

/// Why no backup can be used, or the chosen one's chain is broken, or the target is not in the
/// archive. One line each naming the cause; [`PlanError::hint`] says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("the archive has no complete base backup")]
    NoBackups,
    #[error("backup {id} is not in the archive (complete backups: {available})")]
    BackupNotFound { id: String, available: String },
    #[error("backup {id}: {detail}")]
    BadBackupInfo { id: String, detail: String },
    /// `found`: where the archive has the target, when it was seen before the consistency
    /// point (empty otherwise).
    #[error("target {target} is before the oldest backup {oldest}, which became consistent at {consistent_at}{found}; PostgreSQL cannot stop before a backup is consistent")]
    TargetBeforeBackups {
        target: String,
        oldest: String,
        consistent_at: String,
        found: String,
    },
    #[error("backup {id} became consistent at {consistent_at}, after the target {target}")]
    BackupAfterTarget {
        id: String,
        consistent_at: String,
        target: String,
    },
    #[error(
        "timeline history file {file} is not in the archive, but replay to timeline {tli} needs it"
    )]
    HistoryMissing { tli: Timeline, file: String },
    #[error("timeline history file {file} is in the archive but was not loaded before planning (WalIndex::add_history)")]
    HistoryNotLoaded { tli: Timeline, file: String },
    #[error("backup {id} is on timeline {backup_tli}, which is not an ancestor of timeline {target_tli} ({ancestry})")]
    NotAncestor {
        id: String,
        backup_tli: Timeline,
        target_tli: Timeline,
        ancestry: String,
    },
    #[error("backup {id} started at {start} on timeline {tli}, after timeline {target_tli}'s history left timeline {tli} at {switch}")]
    BackupAfterFork {
        id: String,
        tli: Timeline,
        start: Lsn,
        switch: Lsn,
        target_tli: Timeline,
    },
    #[error("backup {id} became consistent at {end} on timeline {tli}, after timeline {target_tli}'s history left timeline {tli} at {switch}")]
    BackupSpansFork {
        id: String,
        tli: Timeline,
        end: Lsn,
        switch: Lsn,
        target_tli: Timeline,
    },
    #[error(
        "segment {segment} is missing from the archive (needed to replay backup {id} {needed_for})"
    )]
    MissingSegment {
        segment: String,
        id: String,
        needed_for: String,
    },
    #[error("segment {segment} is only in the archive as {segment}.partial (the unfinished last segment of timeline {tli}), needed to replay backup {id} {needed_for}")]
    OnlyPartial {
        segment: String,
        tli: Timeline,
        id: String,
        needed_for: String,
    },
    #[error("segment {segment} is only in the archive as {segment}.partial, but backup {id} needs the WAL after it too ({needed_for}); the archive has a gap there")]
    PartialInTheMiddle {
        segment: String,
        id: String,
        needed_for: String,
    },
    /// `last`: how far the archive reaches ([`ChainCheck::describe_end`]).
    #[error("target {target} lies beyond the end of the archive: {last}")]
    TargetBeyondArchive { target: String, last: String },
    /// A time target after every commit and abort in the archive: PostgreSQL stops only at one
    /// after the target, so recovery would fail at the end of the WAL.
    #[error("no transaction in the archive committed after {target}, so recovery would never reach the target: {last_commit}, and {archive_end}")]
    NoCommitAfter {
        target: String,
        /// The archive's last commit or abort (after the backup), described.
        last_commit: String,
        archive_end: String,
    },
    #[error("transaction {xid} did not commit or abort in the archived WAL after backup {id} became consistent at {consistent_at} ({archive_end})")]
    XidNotFound {
        xid: String,
        id: String,
        consistent_at: Lsn,
        archive_end: String,
    },
    #[error("restore point {name:?} is not in the archived WAL after backup {id} became consistent at {consistent_at} ({archive_end})")]
    RestorePointNotFound {
        name: String,
        id: String,
        consistent_at: Lsn,
        archive_end: String,
    },
    #[error("backup {id} becomes consistent at {consistent_at}, but {archive_end}")]
    WalEndsBeforeConsistency {
        id: String,
        consistent_at: Lsn,
        archive_end: String,
    },
}

impl PlanError {
    /// What to do about it.
    pub fn hint(&self) -> Option<String> {
        Some(match self {
            PlanError::NoBackups => "take one with `walagent backup` first".into(),
            PlanError::BackupNotFound { .. } => {
                "choose one listed by `walagent backups`, or drop --backup".into()
            }
            PlanError::BadBackupInfo { .. } => {
                "choose another backup with --backup; this one's backup.json is not usable".into()
            }
            PlanError::TargetBeforeBackups { .. } => {
                "choose a later target (`walagent status` shows the recoverable window)".into()
            }
            PlanError::BackupAfterTarget { .. } => {
                "choose an older backup or a later target".into()
            }
            PlanError::HistoryMissing { .. } => {
                "copy it into the archive's wal/ or choose another --target-timeline".into()
            }
            PlanError::HistoryNotLoaded { .. } => "this is a bug in walagent; please report it".into(),
            PlanError::NotAncestor { backup_tli, .. } => {
                format!("choose --target-timeline {backup_tli} or a backup of that line")
            }
            PlanError::BackupAfterFork { tli, switch, .. } => {
                format!("use a backup taken before {switch}, or --target-timeline {tli}")
            }
            PlanError::BackupSpansFork { tli, .. } => {
                format!("use an older backup, or --target-timeline {tli}")
            }
            PlanError::MissingSegment { .. } => {
                "restore it into the archive's wal/ or choose a different backup or target".into()
            }
            PlanError::OnlyPartial { .. } => "pass --allow-partial to replay the part it holds".into(),
            PlanError::PartialInTheMiddle { .. } => {
                "restore the complete segment into the archive's wal/ or choose an earlier target"
                    .into()
            }
            PlanError::TargetBeyondArchive { .. } => {
                "choose an earlier target, or wait until the WAL is archived".into()
            }
            PlanError::NoCommitAfter { .. } => {
                "choose an earlier target, restore without a target to replay everything archived, or wait until later WAL is archived".into()
            }
            PlanError::XidNotFound { .. } => {
                "check the transaction id (a target xid must commit or abort after the backup), or wait until the WAL with its commit is archived".into()
            }
            PlanError::RestorePointNotFound { .. } => {
                "check the name given to pg_create_restore_point() (names are case-sensitive), or wait until the WAL holding it is archived".into()
            }
            PlanError::WalEndsBeforeConsistency { .. } => {
                "choose an older backup with --backup, or wait until `walagent stream` has archived the rest of its WAL".into()
            }
        })
    }

    /// Errors about WAL missing from the archive (as opposed to backups that simply cannot reach
    /// the target): these are the ones worth reporting when every backup fails.
    fn is_archive_gap(&self) -> bool {
        matches!(
            self,
            PlanError::MissingSegment { .. }
                | PlanError::OnlyPartial { .. }
                | PlanError::PartialInTheMiddle { .. }
                | PlanError::TargetBeyondArchive { .. }
                | PlanError::HistoryMissing { .. }
                | PlanError::WalEndsBeforeConsistency { .. }
        )
    }
}

/// Options for [`choose_backup`].
#[derive(Debug, Clone, Copy, Default)]
pub struct PlanOptions<'a> {
    /// `--backup ID`: consider only this backup.
    pub backup: Option<&'a str>,
    /// Let the chain end in a `.partial` segment (served with `wal-fetch --allow-partial`).
    pub allow_partial: bool,
    /// For time, xid and restore-point targets: the LSN of the record recovery will stop at,
    /// when the caller has located it by scanning WAL. Backups must be consistent by then, and
    /// the chain must reach it. Without it those targets are planned like [`RecoveryTarget::End`].
    pub located_stop: Option<Lsn>,
}

/// The WAL a backup needs to reach the target, all present in the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainCheck {
    pub backup_id: String,
    pub segment_size: SegmentSize,
    /// The resolved target timeline (what `latest`/`current` mean for this backup).
    pub target_timeline: Timeline,
    pub path: TimelinePath,
    /// Every segment replay reads, in order, with the timeline of the file it reads.
    pub segments: Vec<SegmentId>,
    pub first_segment_name: String,
    pub end_segment_name: String,
    /// The last segment is a `.partial` (only with `allow_partial`).
    pub ends_with_partial: bool,
    /// The backup's consistency point (its end LSN).
    pub consistent_at: Lsn,
    /// Where replay must get to: the target LSN (or located stop), or the consistency point for
    /// `immediate`; `None` when replay runs to the end of the chain.
    pub stop_lsn: Option<Lsn>,
    /// Where the chain's WAL ends: just past the last byte of its last segment file, or, for
    /// a `.partial`, the end of what it holds when that is known
    /// ([`WalIndex::set_partial_content`]; otherwise its nominal end).
    pub wal_end: Lsn,
    /// What the final `.partial` holds, when known.
    pub partial_content: Option<PartialContent>,
    /// Things worth telling the operator that do not stop the restore (WAL the chain cannot
    /// reach, a newer timeline that `latest` will not pick, a target not located in the WAL).
    pub warnings: Vec<String>,
}

impl ChainCheck {
    /// The segments from the one holding the consistency point on: where records that can stop
    /// recovery live. Scan them (`wal::xact::WalScanner`), keep events at or after
    /// [`Self::consistent_at`], and look for the target with `target::stop_event`.
    pub fn segments_after_consistency(&self) -> &[SegmentId] {
        let seg = self.consistent_at.segno(self.segment_size);
        let from = self.segments.partition_point(|s| s.segno < seg);
        &self.segments[from..]
    }

    /// How far the archive reaches on this chain, for messages: `the archived WAL of timeline 1
    /// ends at 0/B06A80 in 00000001000000000000000B.partial`.
    pub fn describe_end(&self) -> String {
        let last = self.segments.last().copied();
        describe_archive_end(
            last,
            self.ends_with_partial,
            self.partial_content,
            self.segment_size,
        )
    }

    /// The timeline the chain's last segment is read from.
    pub fn end_timeline(&self) -> Timeline {
        self.segments
            .last()
            .map_or(self.target_timeline, |s| s.timeline)
    }

    /// One line, e.g. `backup 20261122T101500Z: 37 segments
    /// 000000010000000000000003..000000020000000000000027, timelines 1 -> 2`.
    pub fn summary(&self) -> String {
        let n = self.segments.len();
        format!(
            "backup {}: {n} segment{} {}..{}, timeline{} {}{}",
            self.backup_id,
            if n == 1 { "" } else { "s" },
            self.first_segment_name,
            self.end_segment_name,
            if self.path.steps.len() == 1 { "" } else { "s" },
            self.path.describe(),
            match (self.ends_with_partial, self.partial_content) {
                (true, Some(c)) => format!(" (last one .partial, holding WAL to {})", c.end),
                (true, None) => " (last one .partial)".to_string(),
                (false, _) => String::new(),
            }
        )
    }
}

/// `the archived WAL of timeline T ends ...` for the last segment `last` of a chain.
fn describe_archive_end(
    last: Option<SegmentId>,
    partial: bool,
    content: Option<PartialContent>,
    size: SegmentSize,
) -> String {
    let Some(id) = last else {
        return "the archive has no WAL after the backup".into();
    };
    let name = id.file_name(size);
    let tli = id.timeline;
    match (partial, content) {
        (true, Some(c)) => {
            format!(
                "the archived WAL of timeline {tli} ends at {} in {name}.partial",
                c.end
            )
        }
        (true, None) => format!("the archived WAL of timeline {tli} ends in {name}.partial"),
        (false, _) => format!(
            "the archived WAL of timeline {tli} ends with segment {name} (at most {})",
            id.end_lsn(size)
        ),
    }
}

/// The backup to restore and the proof that its WAL reaches the target.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice<'a> {
    pub backup: &'a BackupInfo,
    pub chain: ChainCheck,
    /// Newer backups that were passed over, and why (for a verbose report).
    pub skipped: Vec<(&'a BackupInfo, PlanError)>,
}

/// The target timeline a backup would recover to: `latest` as PostgreSQL's
/// `findNewestTimeLine` (from the backup's timeline, probe history files upwards until one is
/// missing), `current` as the backup's timeline. The second value is a warning when the archive
/// holds a newer timeline that `latest` will not reach because a history file is missing.
pub fn resolve_timeline(
    index: &WalIndex,
    backup: &BackupInfo,
    tl: TargetTimeline,
) -> (Timeline, Option<String>) {
    match tl {
        TargetTimeline::Current => (backup.timeline, None),
        TargetTimeline::Id(n) => (n, None),
        TargetTimeline::Latest => {
            let mut newest = backup.timeline;
            while let Some(next) = newest.next() {
                if !index.has_history_file(next) {
                    break;
                }
                newest = next;
            }
            let highest = index.timelines().last().copied().unwrap_or(newest);
            let warning = (highest > newest).then(|| {
                format!(
                    "the archive has WAL or history for timeline {highest}, but no {}, so recovery_target_timeline 'latest' stops at timeline {newest}",
                    newest.next().map_or_else(String::new, history_file_name)
                )
            });
            (newest, warning)
        }
    }
}

/// The timelines from `backup` to `target_tli`, checked against the target's history.
pub fn timeline_path(
    index: &WalIndex,
    backup: &BackupInfo,
    target_tli: Timeline,
) -> Result<TimelinePath, PlanError> {
    let id = &backup.id;
    // (timeline, begin, end) for every timeline in the target's history, oldest first.
    let mut line: Vec<(Timeline, Lsn, Option<Lsn>)> = Vec::new();
    let simple = target_tli == backup.timeline && backup.end_timeline == backup.timeline;
    if target_tli > Timeline::FIRST && !simple {
        let file = history_file_name(target_tli);
        let h = match index.history(target_tli) {
            Some(h) => h,
            None if index.has_history_file(target_tli) => {
                return Err(PlanError::HistoryNotLoaded {
                    tli: target_tli,
                    file,
                })
            }
            None => {
                return Err(PlanError::HistoryMissing {
                    tli: target_tli,
                    file,
                })
            }
        };
        let mut begin = Lsn(0);
        for e in &h.entries {
            line.push((e.parent_timeline, begin, Some(e.switch_lsn)));
            begin = e.switch_lsn;
        }
        line.push((target_tli, begin, None));
    } else {
        line.push((target_tli, Lsn(0), None));
    }
    let ancestry = || {
        let parents: Vec<String> = line[..line.len() - 1]
            .iter()
            .map(|(t, _, _)| t.to_string())
            .collect();
        if parents.is_empty() {
            format!("timeline {target_tli} has no parent timelines")
        } else {
            format!(
                "timeline {target_tli} descends from timeline{} {}",
                if parents.len() == 1 { "" } else { "s" },
                parents.join(", ")
            )
        }
    };
    let not_ancestor = |tli: Timeline| PlanError::NotAncestor {
        id: id.clone(),
        backup_tli: tli,
        target_tli,
        ancestry: ancestry(),
    };
    let k = line
        .iter()
        .position(|(t, _, _)| *t == backup.timeline)
        .ok_or_else(|| not_ancestor(backup.timeline))?;
    let (_, begin_k, end_k) = line[k];
    if backup.start_lsn < begin_k {
        // The backup started before its timeline began in this history: another line.
        return Err(not_ancestor(backup.timeline));
    }
    if let Some(switch) = end_k {
        if backup.start_lsn >= switch {
            return Err(PlanError::BackupAfterFork {
                id: id.clone(),
                tli: backup.timeline,
                start: backup.start_lsn,
                switch,
                target_tli,
            });
        }
    }
    // The consistency point must lie on the path too, on the backup's end timeline.
    let j = line[k..]
        .iter()
        .position(|(t, _, _)| *t == backup.end_timeline)
        .map(|p| p + k)
        .ok_or_else(|| not_ancestor(backup.end_timeline))?;
    if let Some(switch) = line[j].2 {
        if backup.end_lsn > switch {
            return Err(PlanError::BackupSpansFork {
                id: id.clone(),
                tli: backup.end_timeline,
                end: backup.end_lsn,
                switch,
                target_tli,
            });
        }
    }
    let mut steps: Vec<PathStep> = line[k..]
        .iter()
        .map(|&(timeline, begin, end)| PathStep {
            timeline,
            begin,
            end,
        })
        .collect();
    steps[0].begin = backup.start_lsn;
    Ok(TimelinePath { steps })
}

/// What a segment is needed for, for messages.
fn needed_for(
    segno: u64,
    consistency_seg: u64,
    path: &TimelinePath,
    size: SegmentSize,
    target: &RecoveryTarget,
    backup: &BackupInfo,
) -> String {
    if segno <= consistency_seg {
        return format!("to its consistency point {}", backup.end_lsn);
    }
    if let Some(step) = path
        .steps
        .iter()
        .skip(1)
        .find(|s| s.begin.segno(size) >= segno)
    {
        return format!(
            "to timeline {}, which begins at {}",
            step.timeline, step.begin
        );
    }
    match target {
        RecoveryTarget::End => "to the end of the archive".into(),
        t => format!("to the target {t}"),
    }
}

/// Checks the WAL chain of one backup for `target` (rule (b) and (c) of the module docs; the
/// caller checks the consistency rule (a)).
pub fn check_chain(
    index: &WalIndex,
    backup: &BackupInfo,
    target: &RecoveryTarget,
    tl: TargetTimeline,
    opts: &PlanOptions<'_>,
) -> Result<ChainCheck, PlanError> {
    let size = index.segment_size();
    if u64::from(size.bytes()) != backup.wal_segment_size {
        return Err(PlanError::BadBackupInfo {
            id: backup.id.clone(),
            detail: format!(
                "its wal_segment_size is {} bytes but the archive's segments are {size}; it belongs to another cluster",
                backup.wal_segment_size
            ),
        });
    }
    let (target_tli, warning) = resolve_timeline(index, backup, tl);
    let path = timeline_path(index, backup, target_tli)?;
    let mut warnings: Vec<String> = warning.into_iter().collect();
    let first = backup.start_lsn.segno(size);
    let consistency_seg = Lsn(backup.end_lsn.0.saturating_sub(1))
        .segno(size)
        .max(first);
    let last_step_seg = path
        .steps
        .last()
        .map_or(first, |s| s.begin.segno(size))
        .max(first);
    // The stop LSN, if replay must reach a known position.
    let stop_lsn = match target {
        RecoveryTarget::Immediate => Some(backup.end_lsn),
        RecoveryTarget::Lsn(l) => Some(*l),
        RecoveryTarget::Time(_) | RecoveryTarget::Xid(_) | RecoveryTarget::Name(_) => {
            opts.located_stop
        }
        RecoveryTarget::End => None,
    };
    let (required_last, open_ended) = match stop_lsn {
        Some(l) => (l.segno(size).max(consistency_seg), false),
        None => (consistency_seg.max(last_step_seg), true),
    };
    if stop_lsn.is_none() && target.is_set() {
        warnings.push(format!(
            "the target {target} was not located in the WAL; if it lies beyond the end of this chain, recovery will fail at the end of the archive"
        ));
    }

    let mut segments = Vec::new();
    let mut ends_with_partial = false;
    let id_at = |segno: u64| SegmentId::new(path.timeline_for_segment(segno, size), segno);
    for segno in first..=required_last {
        let id = id_at(segno);
        if index.has_segment(id) {
            segments.push(id);
            continue;
        }
        let need = needed_for(segno, consistency_seg, &path, size, target, backup);
        if index.has_partial(id) {
            if segno == required_last && opts.allow_partial {
                segments.push(id);
                ends_with_partial = true;
                break;
            }
            if segno == required_last {
                return Err(PlanError::OnlyPartial {
                    segment: id.file_name(size),
                    tli: id.timeline,
                    id: backup.id.clone(),
                    needed_for: need,
                });
            }
            // Replay needs WAL after this partial. With no later WAL of its timeline archived,
            // the partial is where the archive ends, not a gap.
            if !index.any_segment_from(id.timeline, segno + 1) {
                let archive_end =
                    describe_archive_end(Some(id), true, index.partial_content(id), size);
                if segno < consistency_seg {
                    return Err(PlanError::WalEndsBeforeConsistency {
                        id: backup.id.clone(),
                        consistent_at: backup.end_lsn,
                        archive_end,
                    });
                }
                if segno >= last_step_seg {
                    return Err(PlanError::TargetBeyondArchive {
                        target: target.to_string(),
                        last: archive_end,
                    });
                }
            }
            return Err(PlanError::PartialInTheMiddle {
                segment: id.file_name(size),
                id: backup.id.clone(),
                needed_for: need,
            });
        }
        // Beyond the archive's end: a target past the last segment of its timeline.
        let beyond = segno > consistency_seg
            && segno > last_step_seg
            && !index.any_segment_from(id.timeline, segno);
        if beyond && !open_ended {
            return Err(PlanError::TargetBeyondArchive {
                target: target.to_string(),
                last: describe_archive_end(segments.last().copied(), false, None, size),
            });
        }
        return Err(PlanError::MissingSegment {
            segment: id.file_name(size),
            id: backup.id.clone(),
            needed_for: need,
        });
    }
    if open_ended && !ends_with_partial {
        // Run on while the segments last.
        let mut segno = required_last + 1;
        loop {
            let id = id_at(segno);
            if index.has_segment(id) {
                segments.push(id);
                segno += 1;
                continue;
            }
            if opts.allow_partial && index.has_partial(id) {
                segments.push(id);
                ends_with_partial = true;
            } else if index.any_segment_from(id.timeline, segno + 1) {
                // Replaying "to the end" would stop silently at the hole and promote there.
                return Err(PlanError::MissingSegment {
                    segment: id.file_name(size),
                    id: backup.id.clone(),
                    needed_for: format!(
                        "to the end of the archive: later WAL of timeline {} is archived",
                        id.timeline
                    ),
                });
            } else if index.has_partial(id) {
                warnings.push(format!(
                    "{}.partial (the unfinished last segment of timeline {}) is not replayed; pass --allow-partial to include it",
                    id.file_name(size),
                    id.timeline
                ));
            }
            break;
        }
    }
    let first_id = *segments.first().expect("at least the backup's own segment");
    let last_id = *segments.last().expect("at least the backup's own segment");
    // A final partial holds less than its segment: the backup must become consistent, and a
    // stop record must start, within what it holds.
    let partial_content = ends_with_partial
        .then(|| index.partial_content(last_id))
        .flatten();
    if let Some(c) = partial_content {
        let archive_end = || describe_archive_end(Some(last_id), true, Some(c), size);
        if backup.end_lsn > c.end {
            return Err(PlanError::WalEndsBeforeConsistency {
                id: backup.id.clone(),
                consistent_at: backup.end_lsn,
                archive_end: archive_end(),
            });
        }
        let stop_record = match target {
            RecoveryTarget::Immediate | RecoveryTarget::End => None,
            _ => stop_lsn,
        };
        if let Some(stop) = stop_record {
            let reached = match c.last_record {
                Some(r) => stop <= r,
                None => stop < last_id.start_lsn(size),
            };
            if !reached {
                let last = match c.last_record {
                    Some(r) => format!("{}, its last record starting at {r}", archive_end()),
                    None => archive_end(),
                };
                return Err(PlanError::TargetBeyondArchive {
                    target: target.to_string(),
                    last,
                });
            }
        }
    }
    Ok(ChainCheck {
        backup_id: backup.id.clone(),
        segment_size: size,
        target_timeline: target_tli,
        first_segment_name: first_id.file_name(size),
        end_segment_name: last_id.file_name(size),
        wal_end: partial_content.map_or(last_id.end_lsn(size), |c| c.end),
        partial_content,
        path,
        segments,
        ends_with_partial,
        consistent_at: backup.end_lsn,
        stop_lsn,
        warnings,
    })
}

fn backup_stop_time(b: &BackupInfo) -> Result<TargetTime, PlanError> {
    b.stop_time
        .parse::<TargetTime>()
        .map_err(|e| PlanError::BadBackupInfo {
            id: b.id.clone(),
            detail: format!("unreadable stop_time: {e}"),
        })
}

/// Rule (a): is the backup consistent no later than the target? `Ok(Err(consistent_at))` when it
/// is not, with its consistency point as text for the message.
fn consistent_by_target(
    b: &BackupInfo,
    target: &RecoveryTarget,
    located: Option<Lsn>,
) -> Result<Result<(), String>, PlanError> {
    if let Some(l) = located {
        if matches!(
            target,
            RecoveryTarget::Time(_) | RecoveryTarget::Xid(_) | RecoveryTarget::Name(_)
        ) && b.end_lsn > l
        {
            return Ok(Err(b.end_lsn.to_string()));
        }
    }
    Ok(match target {
        RecoveryTarget::Time(t) => {
            let stop = backup_stop_time(b)?;
            if stop <= *t {
                Ok(())
            } else {
                Err(stop.render())
            }
        }
        RecoveryTarget::Lsn(l) if b.end_lsn > *l => Err(b.end_lsn.to_string()),
        _ => Ok(()),
    })
}

/// Every backup, newest first, with its chain check or the reason it cannot be used.
pub fn assess<'a>(
    backups: &'a [BackupInfo],
    target: &RecoveryTarget,
    tl: TargetTimeline,
    index: &WalIndex,
    opts: &PlanOptions<'_>,
) -> Vec<(&'a BackupInfo, Result<ChainCheck, PlanError>)> {
    let mut sorted: Vec<&BackupInfo> = backups.iter().collect();
    sorted.sort_by(|a, b| (b.end_lsn, &b.id).cmp(&(a.end_lsn, &a.id)));
    sorted
        .into_iter()
        .map(|b| {
            let r = match consistent_by_target(b, target, opts.located_stop) {
                Err(e) => Err(e),
                Ok(Err(consistent_at)) => Err(PlanError::BackupAfterTarget {
                    id: b.id.clone(),
                    consistent_at,
                    target: target.to_string(),
                }),
                Ok(Ok(())) => check_chain(index, b, target, tl, opts),
            };
            (b, r)
        })
        .collect()
}

/// Chooses the newest backup that can reach `target` on timeline `tl` with the WAL in `index`
/// (see the module docs), or explains why none can. With [`PlanOptions::backup`] only that
/// backup is considered.
pub fn choose_backup<'a>(
    backups: &'a [BackupInfo],
    target: &RecoveryTarget,
    tl: TargetTimeline,
    index: &WalIndex,
    opts: &PlanOptions<'_>,
) -> Result<Choice<'a>, PlanError> {
    if let Some(want) = opts.backup {
        let Some(b) = backups.iter().find(|b| b.id == want) else {
            let mut ids: Vec<&str> = backups.iter().map(|b| b.id.as_str()).collect();
            ids.sort_unstable();
            return Err(PlanError::BackupNotFound {
                id: want.to_string(),
                available: if ids.is_empty() {
                    "none".into()
                } else {
                    ids.join(", ")
                },
            });
        };
        let mut r = assess(std::slice::from_ref(b), target, tl, index, opts);
        let (b, res) = r.pop().expect("one backup assessed");
        return res.map(|chain| Choice {
            backup: b,
            chain,
            skipped: Vec::new(),
        });
    }
    if backups.is_empty() {
        return Err(PlanError::NoBackups);
    }
    let mut skipped = Vec::new();
    for (b, r) in assess(backups, target, tl, index, opts) {
        match r {
            Ok(chain) => {
                return Ok(Choice {
                    backup: b,
                    chain,
                    skipped,
                })
            }
            Err(e) => skipped.push((b, e)),
        }
    }
    Err(best_error(skipped, target))
}

/// The most useful reason when every backup fails: if none is consistent by the target, say
/// the target is too early; otherwise prefer a gap in the archive (what the operator can fix),
/// reported for the newest backup that hit one; otherwise the newest backup's reason.
fn best_error(failures: Vec<(&BackupInfo, PlanError)>, target: &RecoveryTarget) -> PlanError {
    let all_too_new = failures
        .iter()
        .all(|(_, e)| matches!(e, PlanError::BackupAfterTarget { .. }));
    if all_too_new {
        // Failures are newest first; the oldest is last.
        if let Some((b, PlanError::BackupAfterTarget { consistent_at, .. })) = failures.last() {
            return PlanError::TargetBeforeBackups {
                target: target.to_string(),
                oldest: b.id.clone(),
                consistent_at: consistent_at.clone(),
                found: String::new(),
            };
        }
    }
    let mut usable = failures
        .into_iter()
        .filter(|(_, e)| !matches!(e, PlanError::BackupAfterTarget { .. }))
        .map(|(_, e)| e)
        .collect::<Vec<_>>();
    match usable.iter().position(PlanError::is_archive_gap) {
        Some(i) => usable.swap_remove(i),
        None => usable.swap_remove(0),
    }
}

/// Whether a backward scan of a chain (`events`: those of the segment just scanned) has seen
/// enough to locate a time, xid or restore-point `target`: for a time, a commit or abort at or
/// before it after the consistency point (the first one after the target is then among the
/// segments scanned); otherwise the stop record itself.
pub fn scanned_enough(
    target: &RecoveryTarget,
    inclusive: bool,
    consistent_at: Lsn,
    events: &[WalEvent],
) -> bool {
    let after: Vec<WalEvent> = events
        .iter()
        .filter(|e| e.lsn >= consistent_at)
        .cloned()
        .collect();
    match target {
        RecoveryTarget::Time(t) => after
            .iter()
            .any(|e| e.kind.xid().is_some() && e.kind.time_us() <= t.pg_micros()),
        _ => stop_event(target, inclusive, &after).is_some(),
    }
}

/// The record where recovery stops for a time, xid or restore-point target, among the `events`
/// (in WAL order) that a scan of `chain`'s WAL found, or why recovery would never stop: a time
/// after the archive's last commit, an xid or a restore point the archive does not have after
/// the backup, or one it has only before the backup was consistent. `chain` is the one whose
/// WAL was scanned (the oldest usable backup's, to the end of the archive).
pub fn locate_stop(
    target: &RecoveryTarget,
    inclusive: bool,
    chain: &ChainCheck,
    events: &[WalEvent],
) -> Result<WalEvent, PlanError> {
    let (before, after): (Vec<WalEvent>, Vec<WalEvent>) = events
        .iter()
        .cloned()
        .partition(|e| e.lsn < chain.consistent_at);
    if let Some(s) = stop_event(target, inclusive, &after) {
        return Ok(s.event.clone());
    }
    if let Some(s) = stop_event(target, inclusive, &before) {
        return Err(PlanError::TargetBeforeBackups {
            target: target.to_string(),
            oldest: chain.backup_id.clone(),
            consistent_at: chain.consistent_at.to_string(),
            found: format!(" (recovery would stop at the {})", describe_event(s.event)),
        });
    }
    let archive_end = chain.describe_end();
    Err(match target {
        RecoveryTarget::Time(_) => PlanError::NoCommitAfter {
            target: target.to_string(),
            last_commit: match after.iter().rev().find(|e| e.kind.xid().is_some()) {
                Some(e) => format!("the last one is the {}", describe_event(e)),
                None => format!(
                    "none committed after backup {} became consistent at {}",
                    chain.backup_id, chain.consistent_at
                ),
            },
            archive_end,
        },
        RecoveryTarget::Xid(x) => PlanError::XidNotFound {
            xid: x.to_string(),
            id: chain.backup_id.clone(),
            consistent_at: chain.consistent_at,
            archive_end,
        },
        RecoveryTarget::Name(n) => PlanError::RestorePointNotFound {
            name: n.clone(),
            id: chain.backup_id.clone(),
            consistent_at: chain.consistent_at,
            archive_end,
        },
        _ => PlanError::TargetBeyondArchive {
            target: target.to_string(),
            last: archive_end,
        },
    })
}

impl fmt::Display for PathStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.end {
            Some(end) => write!(
                f,
                "timeline {} from {} to {}",
                self.timeline, self.begin, end
            ),
            None => write!(f, "timeline {} from {}", self.timeline, self.begin),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::catalog::{archive_key, manifest_key, TarArchive, FORMAT};
    use crate::archive::ObjectInfo;
    use crate::wal::timeline::tl;
    use crate::wal::TimelineHistory;

    const S16: SegmentSize = SegmentSize::DEFAULT;

    fn lsn(s: &str) -> Lsn {
        s.parse().unwrap()
    }

    /// Mirrors `catalog::tests::sample()` with the fields planning looks at.
    fn backup(id: &str, tli: Timeline, start: &str, end: &str, stop_time: &str) -> BackupInfo {
        let seg = |l: &str| SegmentId::containing(tli, lsn(l), S16).file_name(S16);
        BackupInfo {
            format: FORMAT,
            id: id.into(),
            label: "walagent base backup".into(),
            system_identifier: "7311234567890123456".into(),
            server_version_num: 150018,
            timeline: tli,
            start_lsn: lsn(start),
            end_lsn: lsn(end),
            end_timeline: tli,
            start_time: stop_time.into(),
            stop_time: stop_time.into(),
            wal_segment_size: 16 << 20,
            compression: "zstd:1".into(),
            data_bytes: 30 << 20,
            stored_bytes: 4 << 20,
            archives: vec![TarArchive {
                name: "base.tar".into(),
                key: archive_key(id, "base.tar", true),
                tablespace_oid: None,
                tablespace_location: None,
                tar_bytes: 30 << 20,
                stored_bytes: 4 << 20,
            }],
            manifest_key: Some(manifest_key(id)),
            wal_start_segment: seg(start),
            wal_end_segment: seg(end),
            source: "host=127.0.0.1 port=5432 user=replicator".into(),
            walagent_version: "0.1.0".into(),
        }
    }

    fn obj(key: String) -> ObjectInfo {
        ObjectInfo {
            key,
            size: 1,
            etag: None,
        }
    }

    /// `wal/` keys for segments `segs` of timeline `tli` (compressed), plus partials.
    fn listing(
        parts: &[(Timeline, std::ops::RangeInclusive<u64>)],
        partials: &[(Timeline, u64)],
        histories: &[Timeline],
    ) -> Vec<ObjectInfo> {
        let mut out = vec![
            obj("walagent.json".into()),
            obj("backups/X/backup.json".into()),
        ];
        for (tli, r) in parts {
            for segno in r.clone() {
                out.push(obj(format!(
                    "wal/{}.zst",
                    SegmentId::new(*tli, segno).file_name(S16)
                )));
            }
        }
        for &(tli, segno) in partials {
            out.push(obj(format!(
                "wal/{}.partial.zst",
                SegmentId::new(tli, segno).file_name(S16)
            )));
        }
        for &t in histories {
            out.push(obj(format!("wal/{}", history_file_name(t))));
        }
        out
    }

    fn index(objs: &[ObjectInfo]) -> WalIndex {
        WalIndex::from_objects(objs, S16)
    }

    fn time(s: &str) -> RecoveryTarget {
        RecoveryTarget::Time(s.parse().unwrap())
    }

    fn names(c: &ChainCheck) -> Vec<String> {
        c.segments.iter().map(|s| s.file_name(S16)).collect()
    }

    fn opts() -> PlanOptions<'static> {
        PlanOptions::default()
    }

    /// `choose_backup` for the latest timeline with the default options.
    fn choose<'a>(
        backups: &'a [BackupInfo],
        target: &RecoveryTarget,
        ix: &WalIndex,
    ) -> Result<Choice<'a>, PlanError> {
        choose_backup(backups, target, TargetTimeline::Latest, ix, &opts())
    }

    #[test]
    fn index_from_listing() {
        let mut objs = listing(&[(tl(1), 1..=3)], &[(tl(1), 4)], &[tl(2)]);
        objs.push(obj("wal/000000010000000000000002".into())); // raw copy too
        objs.push(obj("wal/.000000010000000000000005.zst.tmp.1.0".into()));
        let mut ix = index(&objs);
        assert!(ix.has_segment(SegmentId::new(tl(1), 2)));
        assert!(!ix.has_segment(SegmentId::new(tl(1), 4)));
        assert!(ix.has_partial(SegmentId::new(tl(1), 4)));
        assert!(!ix.has_segment(SegmentId::new(tl(1), 5)));
        assert_eq!(ix.histories_to_load(), vec![tl(2)]);
        assert_eq!(
            ix.timelines().into_iter().collect::<Vec<_>>(),
            vec![tl(1), tl(2)]
        );
        ix.add_history(
            tl(2),
            TimelineHistory::parse(b"1\t0/50000A0\treason\n").unwrap(),
        );
        assert!(ix.histories_to_load().is_empty());
        assert_eq!(ix.history_files().collect::<Vec<_>>(), vec![tl(2)]);
    }

    #[test]
    fn linear_chain_to_the_end() {
        let b = backup(
            "20261122T101500Z",
            tl(1),
            "0/3000028",
            "0/3000100",
            "2026-11-22T10:15:03.000001Z",
        );
        let ix = index(&listing(&[(tl(1), 1..=9)], &[], &[]));
        let c = choose(std::slice::from_ref(&b), &RecoveryTarget::End, &ix).unwrap();
        assert_eq!(c.backup.id, b.id);
        let ch = &c.chain;
        assert_eq!(ch.segments.len(), 7);
        assert_eq!(ch.first_segment_name, "000000010000000000000003");
        assert_eq!(ch.end_segment_name, "000000010000000000000009");
        assert_eq!(ch.target_timeline, tl(1));
        assert_eq!(ch.wal_end, lsn("0/A000000"));
        assert_eq!(ch.stop_lsn, None);
        assert_eq!(ch.segments_after_consistency(), &ch.segments[..]);
        // A backup whose WAL spans two segments: scanning for targets starts at the second.
        let long = backup(
            "20261122T110000Z",
            tl(1),
            "0/2FFF000",
            "0/3000100",
            "2026-11-22T11:00:03Z",
        );
        let c = check_chain(
            &ix,
            &long,
            &RecoveryTarget::End,
            TargetTimeline::Latest,
            &opts(),
        )
        .unwrap();
        assert_eq!(c.first_segment_name, "000000010000000000000002");
        assert_eq!(c.segments_after_consistency()[0], SegmentId::new(tl(1), 3));
        assert_eq!(c.segments_after_consistency().len(), 7);
        assert!(ch.warnings.is_empty(), "{:?}", ch.warnings);
        assert_eq!(
            ch.summary(),
            "backup 20261122T101500Z: 7 segments 000000010000000000000003..000000010000000000000009, timeline 1"
        );
        // Immediate needs only the backup's own segment.
        let c = choose(std::slice::from_ref(&b), &RecoveryTarget::Immediate, &ix).unwrap();
        assert_eq!(names(&c.chain), vec!["000000010000000000000003"]);
        assert_eq!(c.chain.stop_lsn, Some(lsn("0/3000100")));
        // An LSN target.
        let c = choose(
            std::slice::from_ref(&b),
            &RecoveryTarget::Lsn(lsn("0/5123456")),
            &ix,
        )
        .unwrap();
        assert_eq!(c.chain.end_segment_name, "000000010000000000000005");
        assert_eq!(c.chain.segments.len(), 3);
    }

    #[test]
    fn missing_segment_is_named() {
        let b = backup(
            "20261122T101500Z",
            tl(1),
            "0/3000028",
            "0/3000100",
            "2026-11-22T10:15:03.000001Z",
        );
        let ix = index(&listing(&[(tl(1), 1..=5), (tl(1), 7..=9)], &[], &[]));
        let e = choose(
            std::slice::from_ref(&b),
            &RecoveryTarget::Lsn(lsn("0/8000000")),
            &ix,
        )
        .unwrap_err();
        assert_eq!(
            e,
            PlanError::MissingSegment {
                segment: "000000010000000000000006".into(),
                id: b.id.clone(),
                needed_for: "to the target LSN 0/8000000".into()
            }
        );
        let msg = e.to_string();
        assert!(
            msg.contains("000000010000000000000006") && msg.contains("20261122T101500Z"),
            "{msg}"
        );
        // No target: a hole before later WAL is an error too (replay would stop there silently).
        let e = choose(std::slice::from_ref(&b), &RecoveryTarget::End, &ix).unwrap_err();
        assert!(
            matches!(&e, PlanError::MissingSegment { segment, .. } if segment == "000000010000000000000006"),
            "{e}"
        );
        // The backup's own WAL missing.
        let ix = index(&listing(&[(tl(1), 4..=9)], &[], &[]));
        let e = choose(std::slice::from_ref(&b), &RecoveryTarget::End, &ix).unwrap_err();
        assert_eq!(
            e,
            PlanError::MissingSegment {
                segment: "000000010000000000000003".into(),
                id: b.id.clone(),
                needed_for: "to its consistency point 0/3000100".into()
            }
        );
    }

    /// A promoted standby: TL2 begins at 0/50000A0, inside segment 5.
    fn promoted() -> (Vec<ObjectInfo>, TimelineHistory) {
        // The history file is added with add_history where a test needs it.
        let objs = listing(&[(tl(1), 1..=4), (tl(2), 5..=9)], &[(tl(1), 5)], &[]);
        (
            objs,
            TimelineHistory::parse(b"1\t0/50000A0\tno recovery target specified\n").unwrap(),
        )
    }

    #[test]
    fn timeline_switch_reads_the_switch_segment_from_the_new_timeline() {
        let (objs, h2) = promoted();
        let mut ix = index(&objs);
        ix.add_history(tl(2), h2);
        let b = backup(
            "20261122T101500Z",
            tl(1),
            "0/1000028",
            "0/1000100",
            "2026-11-22T10:15:03Z",
        );
        let c = choose(std::slice::from_ref(&b), &RecoveryTarget::End, &ix).unwrap();
        let ch = c.chain;
        assert_eq!(ch.target_timeline, tl(2));
        assert_eq!(
            names(&ch),
            vec![
                "000000010000000000000001",
                "000000010000000000000002",
                "000000010000000000000003",
                "000000010000000000000004",
                "000000020000000000000005",
                "000000020000000000000006",
                "000000020000000000000007",
                "000000020000000000000008",
                "000000020000000000000009",
            ]
        );
        assert_eq!(
            ch.path.steps,
            vec![
                PathStep {
                    timeline: tl(1),
                    begin: lsn("0/1000028"),
                    end: Some(lsn("0/50000A0"))
                },
                PathStep {
                    timeline: tl(2),
                    begin: lsn("0/50000A0"),
                    end: None
                },
            ]
        );
        assert!(
            ch.summary().ends_with("timelines 1 -> 2"),
            "{}",
            ch.summary()
        );
        assert!(ch.warnings.is_empty(), "{:?}", ch.warnings);
        // --target-timeline current stays on TL1: segment 5 exists only as TL1's .partial.
        let e = choose_backup(
            std::slice::from_ref(&b),
            &RecoveryTarget::End,
            TargetTimeline::Current,
            &ix,
            &opts(),
        )
        .unwrap();
        assert_eq!(e.chain.end_segment_name, "000000010000000000000004");
        assert!(
            e.chain.warnings[0].contains("--allow-partial"),
            "{:?}",
            e.chain.warnings
        );
        let p = PlanOptions {
            allow_partial: true,
            ..opts()
        };
        let e = choose_backup(
            std::slice::from_ref(&b),
            &RecoveryTarget::End,
            TargetTimeline::Current,
            &ix,
            &p,
        )
        .unwrap();
        assert_eq!(e.chain.end_segment_name, "000000010000000000000005");
        assert!(e.chain.ends_with_partial);
        // An LSN before the switch, with TL2 as target: segments 1..4 only.
        let c = choose_backup(
            std::slice::from_ref(&b),
            &RecoveryTarget::Lsn(lsn("0/4800000")),
            TargetTimeline::Id(tl(2)),
            &ix,
            &opts(),
        )
        .unwrap();
        assert_eq!(c.chain.end_segment_name, "000000010000000000000004");
        // TL2's missing history file.
        let ix2 = index(&objs);
        let e = choose_backup(
            std::slice::from_ref(&b),
            &RecoveryTarget::End,
            TargetTimeline::Id(tl(2)),
            &ix2,
            &opts(),
        )
        .unwrap_err();
        assert_eq!(
            e,
            PlanError::HistoryMissing {
                tli: tl(2),
                file: "00000002.history".into()
            }
        );
        assert!(e.to_string().contains("00000002.history"), "{e}");
        // Listed but not given to add_history: the caller's bug, said so.
        let mut objs_h = objs.clone();
        objs_h.extend(listing(&[], &[], &[tl(2)]));
        let e = choose_backup(
            std::slice::from_ref(&b),
            &RecoveryTarget::End,
            TargetTimeline::Latest,
            &index(&objs_h),
            &opts(),
        )
        .unwrap_err();
        assert!(
            matches!(e, PlanError::HistoryNotLoaded { tli, .. } if tli == tl(2)),
            "{e}"
        );
        // Missing TL2 segment 5: the switch segment is not replaced by TL1's partial.
        let (mut objs3, h2) = promoted();
        objs3.retain(|o| !o.key.contains("000000020000000000000005"));
        let mut ix3 = index(&objs3);
        ix3.add_history(tl(2), h2);
        let e = choose_backup(
            std::slice::from_ref(&b),
            &RecoveryTarget::End,
            TargetTimeline::Latest,
            &ix3,
            &p,
        )
        .unwrap_err();
        assert_eq!(
            e,
            PlanError::MissingSegment {
                segment: "000000020000000000000005".into(),
                id: b.id.clone(),
                needed_for: "to timeline 2, which begins at 0/50000A0".into()
            }
        );
    }

    #[test]
    fn backup_after_the_switch_point_cannot_reach_the_new_timeline() {
        let (objs, h2) = promoted();
        let mut objs = objs;
        objs.extend(listing(&[(tl(1), 5..=7)], &[], &[]));
        let mut ix = index(&objs);
        ix.add_history(tl(2), h2);
        // The old primary carried on on TL1 and was backed up at 0/6000028.
        let late = backup(
            "20261123T000000Z",
            tl(1),
            "0/6000028",
            "0/6000100",
            "2026-11-23T00:00:03Z",
        );
        let e = choose(std::slice::from_ref(&late), &RecoveryTarget::End, &ix).unwrap_err();
        assert_eq!(
            e,
            PlanError::BackupAfterFork {
                id: late.id.clone(),
                tli: tl(1),
                start: lsn("0/6000028"),
                switch: lsn("0/50000A0"),
                target_tli: tl(2)
            }
        );
        // Its own timeline works.
        let c = choose_backup(
            std::slice::from_ref(&late),
            &RecoveryTarget::End,
            TargetTimeline::Current,
            &ix,
            &opts(),
        )
        .unwrap();
        assert_eq!(c.chain.end_segment_name, "000000010000000000000007");
        // With an older backup around, that one is chosen for TL2 and the late one is skipped.
        let early = backup(
            "20261122T000000Z",
            tl(1),
            "0/2000028",
            "0/2000100",
            "2026-11-22T00:00:03Z",
        );
        let all = vec![early.clone(), late.clone()];
        let c = choose(&all, &RecoveryTarget::End, &ix).unwrap();
        assert_eq!(c.backup.id, early.id);
        assert_eq!(c.skipped.len(), 1);
        assert_eq!(c.skipped[0].0.id, late.id);
        // A backup that became consistent after the fork.
        let spans = backup(
            "20261122T120000Z",
            tl(1),
            "0/4FFF000",
            "0/5000200",
            "2026-11-22T12:00:03Z",
        );
        let e = choose(std::slice::from_ref(&spans), &RecoveryTarget::End, &ix).unwrap_err();
        assert!(
            matches!(e, PlanError::BackupSpansFork { switch, .. } if switch == lsn("0/50000A0")),
            "{e}"
        );
        // A backup on a timeline that is not an ancestor of the target.
        let tl3 = backup(
            "20261124T000000Z",
            tl(3),
            "0/8000028",
            "0/8000100",
            "2026-11-24T00:00:03Z",
        );
        let e = choose_backup(
            std::slice::from_ref(&tl3),
            &RecoveryTarget::End,
            TargetTimeline::Id(tl(2)),
            &ix,
            &opts(),
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                PlanError::NotAncestor {
                    backup_tli,
                    target_tli,
                    ..
                } if backup_tli == tl(3) && target_tli == tl(2)
            ),
            "{e}"
        );
        assert!(e.to_string().contains("descends from timeline 1"), "{e}");
    }

    #[test]
    fn target_before_every_backup() {
        let b1 = backup(
            "20261122T101500Z",
            tl(1),
            "0/3000028",
            "0/3000100",
            "2026-11-22T10:15:03.000001Z",
        );
        let b2 = backup(
            "20261123T101500Z",
            tl(1),
            "0/6000028",
            "0/6000100",
            "2026-11-23T10:15:03Z",
        );
        let ix = index(&listing(&[(tl(1), 1..=9)], &[], &[]));
        let all = vec![b2.clone(), b1.clone()];
        let e = choose(&all, &time("2026-11-22 10:15:00Z"), &ix).unwrap_err();
        assert_eq!(
            e,
            PlanError::TargetBeforeBackups {
                target: "time 2026-11-22 10:15:00+00".into(),
                oldest: b1.id.clone(),
                consistent_at: "2026-11-22 10:15:03.000001+00".into(),
                found: String::new(),
            }
        );
        // Between the two: the older one.
        let c = choose(&all, &time("2026-11-22 12:00:00+01"), &ix).unwrap();
        assert_eq!(c.backup.id, b1.id);
        assert!(
            c.chain.warnings.iter().any(|w| w.contains("not located")),
            "{:?}",
            c.chain.warnings
        );
        // Exactly at the stop time qualifies.
        let c = choose(&all, &time("2026-11-23T10:15:03Z"), &ix).unwrap();
        assert_eq!(c.backup.id, b2.id);
        // LSN before the oldest consistency point.
        let e = choose(&all, &RecoveryTarget::Lsn(lsn("0/3000000")), &ix).unwrap_err();
        assert!(
            matches!(e, PlanError::TargetBeforeBackups { ref consistent_at, .. } if consistent_at == "0/3000100"),
            "{e}"
        );
        // A located xid: backups consistent after it are passed over.
        let p = PlanOptions {
            located_stop: Some(lsn("0/5000100")),
            ..opts()
        };
        let c = choose_backup(
            &all,
            &RecoveryTarget::Xid(1234),
            TargetTimeline::Latest,
            &ix,
            &p,
        )
        .unwrap();
        assert_eq!(c.backup.id, b1.id);
        assert_eq!(c.chain.end_segment_name, "000000010000000000000005");
        assert!(c.chain.warnings.is_empty());
        // No backups at all.
        assert_eq!(
            choose(&[], &RecoveryTarget::End, &ix).unwrap_err(),
            PlanError::NoBackups
        );
    }

    #[test]
    fn lsn_target_beyond_the_archive() {
        let (objs, h2) = promoted();
        let mut ix = index(&objs);
        ix.add_history(tl(2), h2);
        let b = backup(
            "20261122T101500Z",
            tl(1),
            "0/1000028",
            "0/1000100",
            "2026-11-22T10:15:03Z",
        );
        let e = choose(
            std::slice::from_ref(&b),
            &RecoveryTarget::Lsn(lsn("0/B000000")),
            &ix,
        )
        .unwrap_err();
        assert_eq!(
            e,
            PlanError::TargetBeyondArchive {
                target: "LSN 0/B000000".into(),
                last: "the archived WAL of timeline 2 ends with segment 000000020000000000000009 (at most 0/A000000)".into()
            }
        );
        assert!(
            e.to_string().contains("beyond the end of the archive"),
            "{e}"
        );
        // Just inside works.
        let c = choose(
            std::slice::from_ref(&b),
            &RecoveryTarget::Lsn(lsn("0/9FFFFF0")),
            &ix,
        )
        .unwrap();
        assert_eq!(c.chain.end_segment_name, "000000020000000000000009");
    }

    #[test]
    fn explicit_backup() {
        let b1 = backup(
            "20261122T101500Z",
            tl(1),
            "0/3000028",
            "0/3000100",
            "2026-11-22T10:15:03Z",
        );
        let b2 = backup(
            "20261123T101500Z",
            tl(1),
            "0/6000028",
            "0/6000100",
            "2026-11-23T10:15:03Z",
        );
        let ix = index(&listing(&[(tl(1), 1..=9)], &[], &[]));
        let all = vec![b1.clone(), b2.clone()];
        let p = PlanOptions {
            backup: Some("20261122T101500Z"),
            ..opts()
        };
        let c = choose_backup(&all, &RecoveryTarget::End, TargetTimeline::Latest, &ix, &p).unwrap();
        assert_eq!(c.backup.id, b1.id);
        assert_eq!(c.chain.segments.len(), 7);
        let p = PlanOptions {
            backup: Some("20991231T000000Z"),
            ..opts()
        };
        let e =
            choose_backup(&all, &RecoveryTarget::End, TargetTimeline::Latest, &ix, &p).unwrap_err();
        assert_eq!(
            e,
            PlanError::BackupNotFound {
                id: "20991231T000000Z".into(),
                available: "20261122T101500Z, 20261123T101500Z".into()
            }
        );
        // The newer backup asked for explicitly but consistent after the target.
        let p = PlanOptions {
            backup: Some("20261123T101500Z"),
            ..opts()
        };
        let e = choose_backup(
            &all,
            &RecoveryTarget::Lsn(lsn("0/5000000")),
            TargetTimeline::Latest,
            &ix,
            &p,
        )
        .unwrap_err();
        assert_eq!(
            e,
            PlanError::BackupAfterTarget {
                id: b2.id.clone(),
                consistent_at: "0/6000100".into(),
                target: "LSN 0/5000000".into()
            }
        );
    }

    #[test]
    fn partial_last_segment() {
        let b = backup(
            "20261122T101500Z",
            tl(1),
            "0/3000028",
            "0/3000100",
            "2026-11-22T10:15:03Z",
        );
        let ix = index(&listing(&[(tl(1), 3..=5)], &[(tl(1), 6)], &[]));
        let target = RecoveryTarget::Lsn(lsn("0/6000100"));
        let e = choose(std::slice::from_ref(&b), &target, &ix).unwrap_err();
        assert!(
            matches!(&e, PlanError::OnlyPartial { segment, tli, .. } if *tli == tl(1) && segment == "000000010000000000000006"),
            "{e}"
        );
        assert!(e.hint().unwrap().contains("--allow-partial"), "{e}");
        let p = PlanOptions {
            allow_partial: true,
            ..opts()
        };
        let c = choose_backup(
            std::slice::from_ref(&b),
            &target,
            TargetTimeline::Latest,
            &ix,
            &p,
        )
        .unwrap();
        assert!(c.chain.ends_with_partial);
        assert_eq!(c.chain.end_segment_name, "000000010000000000000006");
        assert!(c.chain.summary().ends_with("(last one .partial)"));
        // A partial is never accepted in the middle of the chain.
        let ix = index(&listing(
            &[(tl(1), 3..=5), (tl(1), 7..=8)],
            &[(tl(1), 6)],
            &[],
        ));
        let e = choose_backup(
            std::slice::from_ref(&b),
            &RecoveryTarget::Lsn(lsn("0/8000000")),
            TargetTimeline::Latest,
            &ix,
            &p,
        )
        .unwrap_err();
        assert!(matches!(e, PlanError::PartialInTheMiddle { .. }), "{e}");
    }

    #[test]
    fn latest_follows_history_files_like_postgres() {
        // History files for 2 and 4 but not 3: 'latest' from TL1 stops at 2.
        let mut ix = index(&listing(
            &[(tl(1), 1..=4), (tl(2), 5..=6), (tl(4), 9..=9)],
            &[],
            &[tl(4)],
        ));
        ix.add_history(tl(2), TimelineHistory::parse(b"1\t0/50000A0\tr\n").unwrap());
        ix.add_history(
            tl(4),
            TimelineHistory::parse(b"1\t0/50000A0\tr\n\n2\t0/7000000\tr\n\n3\t0/9000000\tr\n")
                .unwrap(),
        );
        let b = backup(
            "20261122T101500Z",
            tl(1),
            "0/1000028",
            "0/1000100",
            "2026-11-22T10:15:03Z",
        );
        let (tli, warn) = resolve_timeline(&ix, &b, TargetTimeline::Latest);
        assert_eq!(tli, tl(2));
        assert!(warn.unwrap().contains("00000003.history"));
        let c = choose(std::slice::from_ref(&b), &RecoveryTarget::End, &ix).unwrap();
        assert_eq!(c.chain.target_timeline, tl(2));
        assert_eq!(c.chain.end_segment_name, "000000020000000000000006");
        assert_eq!(c.chain.warnings.len(), 1);
        // Asking for 4 explicitly: TL3's segments 7 and 8 are missing.
        let e = choose_backup(
            std::slice::from_ref(&b),
            &RecoveryTarget::End,
            TargetTimeline::Id(tl(4)),
            &ix,
            &opts(),
        )
        .unwrap_err();
        assert!(
            matches!(&e, PlanError::MissingSegment { segment, .. } if segment == "000000030000000000000007"),
            "{e}"
        );
    }

    #[test]
    fn newest_usable_backup_and_error_choice() {
        let b1 = backup(
            "20261122T101500Z",
            tl(1),
            "0/3000028",
            "0/3000100",
            "2026-11-22T10:15:03Z",
        );
        let b2 = backup(
            "20261123T101500Z",
            tl(1),
            "0/6000028",
            "0/6000100",
            "2026-11-23T10:15:03Z",
        );
        let all = vec![b1.clone(), b2.clone()];
        let ix = index(&listing(&[(tl(1), 1..=9)], &[], &[]));
        let c = choose(&all, &RecoveryTarget::End, &ix).unwrap();
        assert_eq!(c.backup.id, b2.id);
        assert!(c.skipped.is_empty());
        // Segment 6 is gone: the newer backup cannot become consistent, and the older one
        // cannot replay to the end of the archive (WAL after the hole is archived).
        let ix = index(&listing(&[(tl(1), 1..=5), (tl(1), 7..=9)], &[], &[]));
        let e = choose(&all, &RecoveryTarget::End, &ix).unwrap_err();
        assert!(
            matches!(&e, PlanError::MissingSegment { segment, .. } if segment == "000000010000000000000006"),
            "{e}"
        );
        let e = choose(&all, &RecoveryTarget::Lsn(lsn("0/8000000")), &ix).unwrap_err();
        assert!(
            matches!(&e, PlanError::MissingSegment { id, segment, .. } if id == &b2.id && segment == "000000010000000000000006"),
            "{e}"
        );
    }

    fn allow_partial() -> PlanOptions<'static> {
        PlanOptions {
            allow_partial: true,
            ..opts()
        }
    }

    fn content(last_record: Option<&str>, end: &str) -> PartialContent {
        PartialContent {
            last_record: last_record.map(lsn),
            end: lsn(end),
        }
    }

    /// Segments 3..=5 complete, 6 a `.partial` holding WAL up to 0/60000A0 (its last complete
    /// record at 0/6000080; the bytes may go on with a record cut off at their end).
    fn partial_archive(c: Option<PartialContent>) -> WalIndex {
        let mut ix = index(&listing(&[(tl(1), 3..=5)], &[(tl(1), 6)], &[]));
        if let Some(c) = c {
            ix.set_partial_content(SegmentId::new(tl(1), 6), c);
        }
        ix
    }

    fn b3() -> BackupInfo {
        backup(
            "20261122T101500Z",
            tl(1),
            "0/3000028",
            "0/3000100",
            "2026-11-22T10:15:03Z",
        )
    }

    #[test]
    fn what_a_trailing_partial_holds_bounds_the_targets() {
        let b = b3();
        let bs = std::slice::from_ref(&b);
        let chain = |ix: &WalIndex, t: RecoveryTarget| {
            choose_backup(bs, &t, TargetTimeline::Latest, ix, &allow_partial())
        };
        // Unknown content: the nominal end, as before.
        let ix = partial_archive(None);
        let c = chain(&ix, RecoveryTarget::Lsn(lsn("0/6000800"))).unwrap();
        assert_eq!(c.chain.wal_end, lsn("0/7000000"));
        assert_eq!(
            c.chain.describe_end(),
            "the archived WAL of timeline 1 ends in 000000010000000000000006.partial"
        );
        // Known content: a stop must start at or before its last complete record.
        let ix = partial_archive(Some(content(Some("0/6000080"), "0/60000A0")));
        for ok in ["0/6000028", "0/6000080", "0/5FFFFF0"] {
            let c = chain(&ix, RecoveryTarget::Lsn(lsn(ok))).unwrap();
            assert_eq!(c.chain.stop_lsn, Some(lsn(ok)));
        }
        let c = chain(&ix, RecoveryTarget::Lsn(lsn("0/6000080"))).unwrap();
        assert!(c.chain.ends_with_partial);
        assert_eq!(c.chain.wal_end, lsn("0/60000A0"));
        assert_eq!(
            c.chain.partial_content,
            Some(content(Some("0/6000080"), "0/60000A0"))
        );
        assert!(
            c.chain
                .summary()
                .ends_with("(last one .partial, holding WAL to 0/60000A0)"),
            "{}",
            c.chain.summary()
        );
        // The record cut off at the partial's end starts at 0/60000A0: not reachable, nor is
        // anything inside the last complete record.
        for beyond in ["0/60000A0", "0/6000088", "0/6800000"] {
            let e = chain(&ix, RecoveryTarget::Lsn(lsn(beyond))).unwrap_err();
            assert_eq!(
                e,
                PlanError::TargetBeyondArchive {
                    target: format!("LSN {beyond}"),
                    last: "the archived WAL of timeline 1 ends at 0/60000A0 in 000000010000000000000006.partial, its last record starting at 0/6000080".into()
                },
                "{beyond}"
            );
            assert!(e.hint().unwrap().contains("earlier target"));
        }
        // A located stop (time, xid, name) is checked the same way.
        let p = PlanOptions {
            located_stop: Some(lsn("0/6000080")),
            ..allow_partial()
        };
        let t = RecoveryTarget::Name("rp".into());
        assert!(choose_backup(bs, &t, TargetTimeline::Latest, &ix, &p).is_ok());
        // Beyond the partial's segment, with no later WAL on the timeline: the end of the
        // archive, not a gap.
        let e = chain(&ix, RecoveryTarget::Lsn(lsn("0/8000000"))).unwrap_err();
        assert!(
            matches!(&e, PlanError::TargetBeyondArchive { last, .. } if last.contains("ends at 0/60000A0 in 000000010000000000000006.partial")),
            "{e}"
        );
        // Replay to the end and to consistency are not bounded by a stop record.
        let c = chain(&ix, RecoveryTarget::End).unwrap();
        assert_eq!(c.chain.wal_end, lsn("0/60000A0"));
        assert!(chain(&ix, RecoveryTarget::Immediate).is_ok());
    }

    #[test]
    fn empty_partial_ends_the_archive_at_its_start() {
        let b = b3();
        let bs = std::slice::from_ref(&b);
        let ix = partial_archive(Some(PartialContent {
            last_record: Some(lsn("0/5FFFF80")),
            end: lsn("0/6000000"),
        }));
        let choose_p = |t: RecoveryTarget| {
            choose_backup(bs, &t, TargetTimeline::Latest, &ix, &allow_partial())
        };
        let c = choose_p(RecoveryTarget::End).unwrap();
        assert!(c.chain.ends_with_partial);
        assert_eq!(c.chain.wal_end, lsn("0/6000000"));
        assert!(matches!(
            choose_p(RecoveryTarget::Lsn(lsn("0/6000028"))),
            Err(PlanError::TargetBeyondArchive { .. })
        ));
        // Nothing known to complete anywhere near it: only stops before the partial count.
        let mut ix = partial_archive(None);
        ix.set_partial_content(
            SegmentId::new(tl(1), 6),
            PartialContent {
                last_record: None,
                end: lsn("0/6000000"),
            },
        );
        let e = choose_backup(
            bs,
            &RecoveryTarget::Lsn(lsn("0/6000028")),
            TargetTimeline::Latest,
            &ix,
            &allow_partial(),
        )
        .unwrap_err();
        assert_eq!(
            e,
            PlanError::TargetBeyondArchive {
                target: "LSN 0/6000028".into(),
                last: "the archived WAL of timeline 1 ends at 0/6000000 in 000000010000000000000006.partial".into()
            }
        );
    }

    #[test]
    fn consistency_must_lie_within_the_partial() {
        // The newer backup ends in the partial's segment, after what the partial holds (taken
        // while the stream runs, its last WAL not uploaded yet): the older one is chosen.
        let old = b3();
        let new = backup(
            "20261122T120000Z",
            tl(1),
            "0/6000028",
            "0/6000400",
            "2026-11-22T12:00:03Z",
        );
        let all = vec![old.clone(), new.clone()];
        let ix = partial_archive(Some(content(Some("0/6000080"), "0/60000A0")));
        let c = choose_backup(
            &all,
            &RecoveryTarget::End,
            TargetTimeline::Latest,
            &ix,
            &allow_partial(),
        )
        .unwrap();
        assert_eq!(c.backup.id, old.id);
        let (skipped, why) = &c.skipped[0];
        assert_eq!(skipped.id, new.id);
        assert_eq!(
            *why,
            PlanError::WalEndsBeforeConsistency {
                id: new.id.clone(),
                consistent_at: lsn("0/6000400"),
                archive_end: "the archived WAL of timeline 1 ends at 0/60000A0 in 000000010000000000000006.partial".into()
            }
        );
        assert!(why.hint().unwrap().contains("older backup"));
        // Asked for by name, it is refused with that reason.
        let p = PlanOptions {
            backup: Some("20261122T120000Z"),
            ..allow_partial()
        };
        let e = choose_backup(
            &all,
            &RecoveryTarget::Immediate,
            TargetTimeline::Latest,
            &ix,
            &p,
        )
        .unwrap_err();
        assert!(
            matches!(e, PlanError::WalEndsBeforeConsistency { .. }),
            "{e}"
        );
        // A backup whose consistency point is in a segment after the partial.
        let later = backup(
            "20261122T130000Z",
            tl(1),
            "0/5000028",
            "0/7000100",
            "2026-11-22T13:00:03Z",
        );
        let e = choose_backup(
            std::slice::from_ref(&later),
            &RecoveryTarget::End,
            TargetTimeline::Latest,
            &ix,
            &allow_partial(),
        )
        .unwrap_err();
        assert!(
            matches!(e, PlanError::WalEndsBeforeConsistency { .. }),
            "{e}"
        );
    }

    #[test]
    fn partial_of_an_older_timeline_before_a_switch() {
        // TL1 ends at 0/50000A0 in its partial of segment 5; TL2 goes on from there.
        let (objs, h2) = promoted();
        let mut ix = index(&objs);
        ix.add_history(tl(2), h2);
        ix.set_partial_content(
            SegmentId::new(tl(1), 5),
            content(Some("0/5000078"), "0/50000A0"),
        );
        let b = backup(
            "20261122T101500Z",
            tl(1),
            "0/1000028",
            "0/1000100",
            "2026-11-22T10:15:03Z",
        );
        let bs = std::slice::from_ref(&b);
        // The latest timeline reads segment 5 from TL2: TL1's partial plays no part.
        let c = choose_backup(
            bs,
            &RecoveryTarget::Lsn(lsn("0/5800000")),
            TargetTimeline::Latest,
            &ix,
            &allow_partial(),
        )
        .unwrap();
        assert!(!c.chain.ends_with_partial);
        assert_eq!(c.chain.end_segment_name, "000000020000000000000005");
        // Staying on TL1: its WAL ends at the switch point.
        let tl1 = |t: RecoveryTarget| {
            choose_backup(bs, &t, TargetTimeline::Current, &ix, &allow_partial())
        };
        let c = tl1(RecoveryTarget::End).unwrap();
        assert!(c.chain.ends_with_partial);
        assert_eq!(c.chain.wal_end, lsn("0/50000A0"));
        assert!(tl1(RecoveryTarget::Lsn(lsn("0/5000078"))).is_ok());
        let e = tl1(RecoveryTarget::Lsn(lsn("0/5800000"))).unwrap_err();
        assert!(
            matches!(&e, PlanError::TargetBeyondArchive { last, .. } if last.contains("timeline 1 ends at 0/50000A0 in 000000010000000000000005.partial")),
            "{e}"
        );
        let e = tl1(RecoveryTarget::Lsn(lsn("0/7000000"))).unwrap_err();
        assert!(matches!(e, PlanError::TargetBeyondArchive { .. }), "{e}");
    }

    fn commit(at: &str, xid: u32, time: &str) -> WalEvent {
        WalEvent {
            lsn: lsn(at),
            end_lsn: Lsn(lsn(at).0 + 34),
            kind: crate::wal::xact::EventKind::Commit {
                xid,
                time_us: time.parse::<TargetTime>().unwrap().pg_micros(),
                prepared: false,
            },
        }
    }

    #[test]
    fn locating_time_xid_and_name_stops() {
        let b = b3();
        let ix = partial_archive(Some(content(Some("0/6000080"), "0/60000A0")));
        let chain = choose_backup(
            std::slice::from_ref(&b),
            &RecoveryTarget::End,
            TargetTimeline::Latest,
            &ix,
            &allow_partial(),
        )
        .unwrap()
        .chain;
        let rp = WalEvent {
            lsn: lsn("0/5000100"),
            end_lsn: lsn("0/5000160"),
            kind: crate::wal::xact::EventKind::RestorePoint {
                name: "rp".into(),
                time_us: 0,
            },
        };
        let events = vec![
            // During the backup, before it is consistent at 0/3000100.
            commit("0/3000050", 700, "2026-11-22 10:15:01Z"),
            commit("0/4000000", 701, "2026-11-22 10:20:00Z"),
            rp,
            commit("0/6000080", 702, "2026-11-22 10:30:00Z"),
        ];
        let loc = |t: RecoveryTarget, incl: bool| locate_stop(&t, incl, &chain, &events);
        // Time: the first commit after it (inclusive), or at it (exclusive).
        let e = loc(time("2026-11-22 10:20:00Z"), true).unwrap();
        assert_eq!(e.lsn, lsn("0/6000080"));
        let e = loc(time("2026-11-22 10:20:00Z"), false).unwrap();
        assert_eq!(e.lsn, lsn("0/4000000"));
        assert_eq!(
            loc(time("2026-11-22 10:30:00Z"), false).unwrap().lsn,
            lsn("0/6000080")
        );
        // After the last commit: refused, saying how far the archive reaches.
        let e = loc(time("2026-11-22 10:30:00Z"), true).unwrap_err();
        assert_eq!(
            e.to_string(),
            "no transaction in the archive committed after time 2026-11-22 10:30:00+00, so recovery would never reach the target: the last one is the commit of xid 702 at 2026-11-22 10:30:00.000000+00 (LSN 0/6000080), and the archived WAL of timeline 1 ends at 0/60000A0 in 000000010000000000000006.partial"
        );
        assert!(e.hint().is_some());
        // Xid and name.
        assert_eq!(
            loc(RecoveryTarget::Xid(701), true).unwrap().lsn,
            lsn("0/4000000")
        );
        assert_eq!(
            loc(RecoveryTarget::Name("rp".into()), true).unwrap().lsn,
            lsn("0/5000100")
        );
        let e = loc(RecoveryTarget::Name("RP".into()), true).unwrap_err();
        assert!(matches!(e, PlanError::RestorePointNotFound { .. }), "{e}");
        assert!(
            e.to_string()
                .contains("ends at 0/60000A0 in 000000010000000000000006.partial"),
            "{e}"
        );
        let e = loc(RecoveryTarget::Xid(999), true).unwrap_err();
        assert!(matches!(e, PlanError::XidNotFound { .. }), "{e}");
        // Committed before the backup was consistent: too early, not missing.
        let e = loc(RecoveryTarget::Xid(700), true).unwrap_err();
        assert!(
            matches!(&e, PlanError::TargetBeforeBackups { found, .. } if found.contains("commit of xid 700")),
            "{e}"
        );
        // No commit after consistency at all.
        let e = locate_stop(&time("2026-11-22 10:16:00Z"), true, &chain, &events[..1]).unwrap_err();
        assert!(e.to_string().contains("none committed after backup"), "{e}");
    }

    #[test]
    fn backward_scan_stops_when_the_stop_is_seen() {
        let c = lsn("0/3000100");
        let seg = vec![commit("0/5000000", 701, "2026-11-22 10:20:00Z")];
        assert!(scanned_enough(&time("2026-11-22 10:20:00Z"), true, c, &seg));
        assert!(scanned_enough(&time("2026-11-22 10:25:00Z"), true, c, &seg));
        // Only later commits here: the first one after the target may be further back.
        assert!(!scanned_enough(
            &time("2026-11-22 10:19:59Z"),
            true,
            c,
            &seg
        ));
        assert!(scanned_enough(&RecoveryTarget::Xid(701), false, c, &seg));
        assert!(!scanned_enough(&RecoveryTarget::Xid(702), false, c, &seg));
        // Events before consistency do not count.
        assert!(!scanned_enough(
            &RecoveryTarget::Xid(701),
            true,
            lsn("0/6000000"),
            &seg
        ));
    }
}
