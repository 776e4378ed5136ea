//! What the archive holds and what it can restore, computed from listings only (no I/O): the
//! `wal/` listing, the parsed timeline history files, the backup catalog and, where the caller
//! scanned them, what trailing `.partial` segments hold. `walagent status` renders it and
//! `walagent expire` plans its deletions on it.
//!
//! The recovery rules are `restore::plan`'s (PostgreSQL's): replay follows the target
//! timeline's history; for each segment number it reads the file of the newest timeline on the
//! path whose begin LSN lies in that segment or before it (`XLogFileReadAnyTLI`); a `.partial`
//! ends what the archive has on its timeline. The target timeline is resolved as `latest` is
//! (`findNewestTimeLine`: from the newest complete backup's timeline, probe `N+1.history`, ...).

use std::collections::{BTreeMap, BTreeSet};

use crate::archive::catalog::{BackupInfo, Listed};
use crate::archive::index::PartialContent;
use crate::archive::layout::{self, WalObject};
use crate::archive::ObjectInfo;
use crate::wal::{history_file_name, Lsn, SegmentId, SegmentSize, Timeline, TimelineHistory};

/// One archived WAL object (segment or `.partial`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalFile {
    pub id: SegmentId,
    pub partial: bool,
    pub key: String,
    pub size: u64,
}

/// What goes into [`Inventory::build`].
#[derive(Debug, Clone)]
pub struct Inputs<'a> {
    pub seg_size: SegmentSize,
    /// `walagent.json`'s system identifier: backups of another system are not used.
    pub system_identifier: u64,
    /// The `wal/` listing (other keys and names `layout::parse_wal_key` does not know are
    /// ignored).
    pub wal_objects: &'a [ObjectInfo],
    /// Parsed history files (a listed history file missing here counts as unreadable).
    pub histories: &'a BTreeMap<Timeline, TimelineHistory>,
    /// The backup catalog (`archive::catalog::list`).
    pub backups: &'a [Listed],
    /// What scanned `.partial` segments hold.
    pub partials: &'a BTreeMap<SegmentId, PartialContent>,
}

/// A run of missing segments `from..=to` on a timeline, with archived WAL after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    pub from: u64,
    pub to: u64,
}

/// What the archive holds of one timeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimelineInfo {
    pub timeline: Timeline,
    /// Its history file is in the listing.
    pub history_file: bool,
    /// From its own history file: the parent and where this timeline branched off it.
    pub parent: Option<(Timeline, Lsn)>,
    /// From a newer timeline's history: where this timeline was left.
    pub switched_at: Option<Lsn>,
    /// Complete segments, oldest first, and the trailing `.partial` after the last of them.
    pub first_segment: Option<u64>,
    pub last_segment: Option<u64>,
    pub segments: usize,
    /// A `.partial` with a higher number than every complete segment: the timeline's end.
    pub trailing_partial: Option<u64>,
    /// What that partial holds, when it was scanned.
    pub partial_content: Option<PartialContent>,
    /// Missing complete segments between the first and the last archived one.
    pub gaps: Vec<Gap>,
    /// `.partial` objects that are not the timeline's end (an older snapshot beside its complete
    /// segment, or one inside a gap).
    pub stray_partials: Vec<u64>,
    pub bytes: u64,
}

impl TimelineInfo {
    /// Start of the first archived segment (complete or partial).
    pub fn begin_lsn(&self, size: SegmentSize) -> Option<Lsn> {
        self.first_segment
            .or(self.trailing_partial)
            .map(|s| SegmentId::new(self.timeline, s).start_lsn(size))
    }

    /// Where the archived WAL of the timeline ends: what the trailing partial holds (its
    /// segment's start when not scanned), else the end of the last complete segment.
    pub fn end_lsn(&self, size: SegmentSize) -> Option<Lsn> {
        if let Some(p) = self.trailing_partial {
            let id = SegmentId::new(self.timeline, p);
            return Some(self.partial_content.map_or(id.start_lsn(size), |c| c.end));
        }
        self.last_segment
            .map(|s| SegmentId::new(self.timeline, s).end_lsn(size))
    }

    /// The highest segment number archived (complete or partial).
    pub fn last_any(&self) -> Option<u64> {
        match (self.last_segment, self.trailing_partial) {
            (a, None) => a,
            (_, p) => p,
        }
    }
}

/// Where a backup stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackupState {
    Complete,
    /// Objects but no `backup.json`: interrupted, or still running.
    Incomplete,
    /// `backup.json` unreadable.
    Unreadable,
}

/// One timeline on a backup's way to the target timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub timeline: Timeline,
    /// Where replay enters it (the backup's start LSN for the first step).
    pub begin: Lsn,
    /// Where it is left for the next step; `None` for the target timeline.
    pub end: Option<Lsn>,
}

/// How far a complete backup's recovery gets along the target timeline with the archived WAL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reach {
    pub path: Vec<Step>,
    /// The segment holding the backup's start LSN (the oldest WAL it needs).
    pub start_segment: SegmentId,
    /// The last segment replay can read without a gap, and whether it is a `.partial`.
    pub end_segment: Option<SegmentId>,
    pub ends_in_partial: bool,
    /// Where that WAL ends (see [`TimelineInfo::end_lsn`]).
    pub end_lsn: Lsn,
    /// The WAL reaches the backup's consistency point.
    pub consistent: bool,
    /// Replay stops at this missing segment although later WAL is archived.
    pub cut_at: Option<SegmentId>,
    /// It reaches the newest WAL archived along the target timeline.
    pub reaches_newest: bool,
}

/// A backup as status shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct BackupEntry {
    pub id: String,
    pub state: BackupState,
    pub info: Option<BackupInfo>,
    /// Incomplete backups: objects and bytes under `backups/<id>/`.
    pub objects: usize,
    pub bytes: u64,
    /// Complete backups on the target timeline's line; `Err` says why it is not.
    pub reach: Option<Result<Reach, String>>,
}

impl BackupEntry {
    pub fn usable(&self) -> bool {
        matches!(&self.reach, Some(Ok(r)) if r.consistent)
    }
}

/// One finding: `object` names the segment, history file or backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub object: String,
    pub problem: String,
    /// Whether it limits what a restore can reach (status exits 1).
    pub limits_recovery: bool,
}

/// A point a restore can reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Point {
    pub lsn: Lsn,
    pub segment: SegmentId,
    pub partial: bool,
    /// Backup whose consistency point it is (earliest) or from which the WAL runs (latest).
    pub backup: String,
    /// RFC 3339 (earliest: the backup's stop_time; latest: filled in by the caller from a scan).
    pub time: Option<String>,
}

/// The recoverable window along the target timeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub timeline: Timeline,
    pub earliest: Point,
    pub latest: Point,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Inventory {
    pub seg_size: SegmentSize,
    pub timelines: Vec<TimelineInfo>,
    pub histories: BTreeMap<Timeline, TimelineHistory>,
    /// Oldest first (by id).
    pub backups: Vec<BackupEntry>,
    /// What `latest` resolves to; `None` for an archive without WAL or history.
    pub target_timeline: Option<Timeline>,
    /// The newest WAL archived along the target timeline.
    pub newest: Option<(SegmentId, bool)>,
    pub window: Option<Window>,
    pub problems: Vec<Problem>,
    pub wal_files: Vec<WalFile>,
}

/// `(tli, segno) -> complete?` presence sets.
struct Present {
    complete: BTreeSet<(Timeline, u64)>,
    partial: BTreeSet<(Timeline, u64)>,
}

impl Present {
    fn last_on(&self, tli: Timeline, lo: u64, hi: u64) -> Option<(u64, bool)> {
        let c = self
            .complete
            .range((tli, lo)..=(tli, hi))
            .next_back()
            .map(|x| x.1);
        let p = self
            .partial
            .range((tli, lo)..=(tli, hi))
            .next_back()
            .map(|x| x.1);
        match (c, p) {
            (Some(c), Some(p)) if p > c => Some((p, true)),
            (Some(c), _) => Some((c, false)),
            (None, Some(p)) => Some((p, true)),
            (None, None) => None,
        }
    }
}

/// The timelines replay follows to `target` (ancestors first), each with where it begins and
/// ends; `None` when the target's history is needed but not loaded.
pub fn timeline_line(
    histories: &BTreeMap<Timeline, TimelineHistory>,
    target: Timeline,
) -> Option<Vec<Step>> {
    if target == Timeline::FIRST {
        return Some(vec![Step {
            timeline: target,
            begin: Lsn(0),
            end: None,
        }]);
    }
    let h = histories.get(&target)?;
    let mut out = Vec::new();
    let mut begin = Lsn(0);
    for e in &h.entries {
        out.push(Step {
            timeline: e.parent_timeline,
            begin,
            end: Some(e.switch_lsn),
        });
        begin = e.switch_lsn;
    }
    out.push(Step {
        timeline: target,
        begin,
        end: None,
    });
    Some(out)
}

/// A backup's steps on `line`, or why it is not on it.
pub fn backup_path(line: &[Step], b: &BackupInfo) -> Result<Vec<Step>, String> {
    let target = line.last().map_or(Timeline::FIRST, |s| s.timeline);
    let k = line
        .iter()
        .position(|s| s.timeline == b.timeline)
        .ok_or_else(|| {
            format!(
                "it is on timeline {}, which is not an ancestor of timeline {target}",
                b.timeline
            )
        })?;
    if b.start_lsn < line[k].begin {
        return Err(format!(
            "it started at {} on timeline {}, before that timeline began at {}",
            b.start_lsn, b.timeline, line[k].begin
        ));
    }
    if let Some(end) = line[k].end {
        if b.start_lsn >= end {
            return Err(format!(
                "it started at {} on timeline {}, after timeline {target} left it at {end}",
                b.start_lsn, b.timeline
            ));
        }
    }
    let j = line[k..]
        .iter()
        .position(|s| s.timeline == b.end_timeline)
        .map(|p| p + k)
        .ok_or_else(|| {
            format!(
                "it ended on timeline {}, which is not on timeline {target}'s line",
                b.end_timeline
            )
        })?;
    if let Some(end) = line[j].end {
        if b.end_lsn > end {
            return Err(format!(
                "it became consistent at {} on timeline {}, after timeline {target} left it at {end}",
                b.end_lsn, b.end_timeline
            ));
        }
    }
    let mut steps = line[k..].to_vec();
    steps[0].begin = b.start_lsn;
    Ok(steps)
}

/// The timeline whose file replay reads for `segno` on `path`.
pub fn timeline_for_segment(path: &[Step], segno: u64, size: SegmentSize) -> Timeline {
    path.iter()
        .rev()
        .find(|s| s.begin.segno(size) <= segno)
        .or(path.first())
        .map_or(Timeline::FIRST, |s| s.timeline)
}

/// The newest WAL archived along `path` (from its first step's begin on).
fn path_newest(path: &[Step], present: &Present, size: SegmentSize) -> Option<(SegmentId, bool)> {
    for (i, s) in path.iter().enumerate().rev() {
        let lo = s.begin.segno(size);
        let Some(hi) = step_last_segment(path, i, size) else {
            continue;
        };
        if lo > hi {
            continue;
        }
        if let Some((segno, partial)) = present.last_on(s.timeline, lo, hi) {
            return Some((SegmentId::new(s.timeline, segno), partial));
        }
    }
    None
}

impl Inventory {
    pub fn build(inp: &Inputs<'_>) -> Inventory {
        let size = inp.seg_size;
        let mut present = Present {
            complete: BTreeSet::new(),
            partial: BTreeSet::new(),
        };
        let mut wal_files = Vec::new();
        let mut history_files = BTreeSet::new();
        let mut bytes: BTreeMap<Timeline, u64> = BTreeMap::new();
        for o in inp.wal_objects {
            match layout::parse_wal_key(&o.key, size) {
                Some(WalObject::Segment { id, partial, .. }) => {
                    if partial {
                        present.partial.insert((id.timeline, id.segno));
                    } else {
                        present.complete.insert((id.timeline, id.segno));
                    }
                    *bytes.entry(id.timeline).or_default() += o.size;
                    wal_files.push(WalFile {
                        id,
                        partial,
                        key: o.key.clone(),
                        size: o.size,
                    });
                }
                Some(WalObject::History(t)) => {
                    history_files.insert(t);
                    *bytes.entry(t).or_default() += o.size;
                }
                None => {}
            }
        }
        wal_files.sort_by(|a, b| {
            (a.id.segno, a.id.timeline, a.partial, &a.key).cmp(&(
                b.id.segno,
                b.id.timeline,
                b.partial,
                &b.key,
            ))
        });
        let mut problems: BTreeMap<String, Problem> = BTreeMap::new();
        let mut add = |object: String, problem: String, limits: bool| {
            problems
                .entry(object.clone())
                .and_modify(|p| p.limits_recovery |= limits)
                .or_insert(Problem {
                    object,
                    problem,
                    limits_recovery: limits,
                });
        };

        // Timelines.
        let mut all_tl: BTreeSet<Timeline> = history_files.clone();
        all_tl.extend(present.complete.iter().map(|x| x.0));
        all_tl.extend(present.partial.iter().map(|x| x.0));
        let mut switched: BTreeMap<Timeline, Lsn> = BTreeMap::new();
        for h in inp.histories.values() {
            for e in &h.entries {
                switched.entry(e.parent_timeline).or_insert(e.switch_lsn);
            }
        }
        for t in &history_files {
            if !inp.histories.contains_key(t) {
                add(
                    layout::history_key(*t),
                    "history file is not readable; restores to this timeline fail".into(),
                    true,
                );
            }
        }
        let mut timelines = Vec::new();
        for &t in &all_tl {
            let segs: Vec<u64> = present
                .complete
                .range((t, 0)..=(t, u64::MAX))
                .map(|x| x.1)
                .collect();
            let parts: Vec<u64> = present
                .partial
                .range((t, 0)..=(t, u64::MAX))
                .map(|x| x.1)
                .collect();
            let last = segs.last().copied();
            let trailing = parts
                .last()
                .copied()
                .filter(|p| last.is_none_or(|l| *p > l));
            let first = segs.first().copied().or(parts.first().copied());
            let mut gaps = Vec::new();
            if let Some(f) = first {
                let mut prev: Option<u64> = None;
                let mut check = |s: u64, prev: &mut Option<u64>| {
                    let from = prev.map_or(f, |p| p + 1);
                    if s > from {
                        gaps.push(Gap { from, to: s - 1 });
                    }
                    *prev = Some(s);
                };
                for &s in &segs {
                    check(s, &mut prev);
                }
                if let Some(p) = trailing {
                    check(p, &mut prev);
                }
            }
            let stray: Vec<u64> = parts
                .iter()
                .copied()
                .filter(|p| Some(*p) != trailing)
                .collect();
            let parent = inp
                .histories
                .get(&t)
                .and_then(|h| h.entries.last())
                .map(|e| (e.parent_timeline, e.switch_lsn));
            timelines.push(TimelineInfo {
                timeline: t,
                history_file: history_files.contains(&t),
                parent,
                switched_at: switched.get(&t).copied(),
                first_segment: first,
                last_segment: last,
                segments: segs.len(),
                trailing_partial: trailing,
                partial_content: trailing
                    .and_then(|p| inp.partials.get(&SegmentId::new(t, p)).copied()),
                gaps,
                stray_partials: stray,
                bytes: bytes.get(&t).copied().unwrap_or(0),
            });
        }

        // Backups.
        let mut entries: Vec<BackupEntry> = inp
            .backups
            .iter()
            .map(|l| match l {
                Listed::Complete(i) => BackupEntry {
                    id: i.id.clone(),
                    state: BackupState::Complete,
                    info: Some((**i).clone()),
                    objects: i.archives.len() + 1,
                    bytes: i.stored_bytes,
                    reach: None,
                },
                Listed::Incomplete { id, objects, bytes } => BackupEntry {
                    id: id.clone(),
                    state: BackupState::Incomplete,
                    info: None,
                    objects: *objects,
                    bytes: *bytes,
                    reach: None,
                },
                Listed::Unreadable { id, .. } => BackupEntry {
                    id: id.clone(),
                    state: BackupState::Unreadable,
                    info: None,
                    objects: 0,
                    bytes: 0,
                    reach: None,
                },
            })
            .collect();
        entries.sort_by(|a, b| a.id.cmp(&b.id));
        let foreign = |i: &BackupInfo| -> Option<String> {
            if i.system_identifier_u64() != Some(inp.system_identifier) {
                return Some(format!(
                    "it is a backup of system {}, but the archive holds system {}",
                    i.system_identifier, inp.system_identifier
                ));
            }
            if i.wal_segment_size != u64::from(size.bytes()) {
                return Some(format!(
                    "its wal_segment_size is {} bytes, the archive's is {size}",
                    i.wal_segment_size
                ));
            }
            None
        };
        // The newest complete backup (as restore orders them: end LSN, then id).
        let newest_complete = entries
            .iter()
            .filter_map(|e| e.info.as_ref())
            .max_by(|a, b| (a.end_lsn, &a.id).cmp(&(b.end_lsn, &b.id)))
            .map(|i| (i.id.clone(), i.timeline));

        // The target timeline: `latest` from the newest complete backup's timeline.
        let start_tl = newest_complete.as_ref().map_or(Timeline::FIRST, |x| x.1);
        let mut target = start_tl;
        while let Some(n) = target.next() {
            if !history_files.contains(&n) {
                break;
            }
            target = n;
        }
        let target_timeline = (!all_tl.is_empty() || newest_complete.is_some()).then_some(target);
        if let Some(&highest) = all_tl.last() {
            if highest > target {
                let missing = target.next().unwrap_or(target);
                add(
                    layout::history_key(missing),
                    format!(
                        "missing, though the archive has WAL or history of timeline {highest}: recovery_target_timeline 'latest' stops at timeline {target}"
                    ),
                    true,
                );
            }
        }
        let line = timeline_line(inp.histories, target);
        let newest = line.as_ref().and_then(|l| path_newest(l, &present, size));

        for e in entries.iter_mut() {
            let Some(info) = &e.info else { continue };
            if let Some(why) = foreign(info) {
                e.reach = Some(Err(why));
                continue;
            }
            let Some(line) = &line else {
                e.reach = Some(Err(format!(
                    "{} is needed to follow timeline {target} and is not readable",
                    history_file_name(target)
                )));
                continue;
            };
            e.reach = Some(
                backup_path(line, info).map(|path| walk(&path, info, &present, inp, size, newest)),
            );
        }

        // Problems. Timelines whose end is missing first (a backup whose recovery runs into one
        // marks it as limiting recovery below).
        for t in &timelines {
            let (Some(sw), Some(first)) = (t.switched_at, t.first_segment.or(t.trailing_partial))
            else {
                continue;
            };
            // Replay reads this timeline up to the segment before the one holding the switch
            // point (which it reads from the child timeline).
            let Some(needed) = sw.segno(size).checked_sub(1) else {
                continue;
            };
            if first > needed || t.last_segment.is_some_and(|l| l >= needed) {
                continue;
            }
            let from = t.last_segment.map_or(first, |l| l + 1);
            let end = t
                .last_segment
                .map_or(SegmentId::new(t.timeline, first).start_lsn(size), |l| {
                    SegmentId::new(t.timeline, l).end_lsn(size)
                });
            add(
                SegmentId::new(t.timeline, from).file_name(size),
                format!(
                    "missing: timeline {} was left at {sw} ({}), but its archived WAL stops at {end}",
                    t.timeline,
                    inp.histories
                        .iter()
                        .find(|(_, h)| h.switch_point(t.timeline).is_some())
                        .map_or_else(String::new, |(c, _)| history_file_name(*c))
                ),
                false,
            );
        }
        let mut cuts: BTreeMap<SegmentId, Vec<(String, Lsn)>> = BTreeMap::new();
        for e in &entries {
            let newest_one = newest_complete.as_ref().is_some_and(|n| n.0 == e.id);
            let obj = format!("backups/{}/", e.id);
            match (&e.state, &e.reach) {
                (BackupState::Incomplete, _) => add(
                    obj,
                    format!(
                        "incomplete backup ({} objects, no backup.json): interrupted, or still running; never used by restore",
                        e.objects
                    ),
                    false,
                ),
                (BackupState::Unreadable, _) => add(
                    format!("backups/{}/backup.json", e.id),
                    "unreadable backup.json: the backup is never used by restore".into(),
                    false,
                ),
                (BackupState::Complete, Some(Err(why))) => add(
                    obj,
                    format!("not usable for recovery along timeline {target}: {why}"),
                    newest_one,
                ),
                (BackupState::Complete, Some(Ok(r))) => {
                    if let Some(cut) = r.cut_at {
                        cuts.entry(cut).or_default().push((e.id.clone(), r.end_lsn));
                    } else if !r.consistent {
                        add(
                            obj,
                            format!(
                                "its WAL is not all archived: it becomes consistent at {}, but the archived WAL ends at {}",
                                info_end(e),
                                r.end_lsn
                            ),
                            true,
                        );
                    } else if !r.reaches_newest && newest_one {
                        add(
                            obj,
                            "the newest backup does not reach the newest archived WAL".into(),
                            true,
                        );
                    }
                }
                (BackupState::Complete, None) => {}
            }
        }
        for (cut, who) in &cuts {
            let ids: Vec<&str> = who.iter().map(|w| w.0.as_str()).collect();
            let stop = who.first().map_or(Lsn(0), |w| w.1);
            add(
                cut.file_name(size),
                format!(
                    "missing: a gap that cuts backup{} {} off from the later WAL (recovery stops at {stop})",
                    if ids.len() == 1 { "" } else { "s" },
                    ids.join(", ")
                ),
                true,
            );
        }
        if newest_complete.is_none() {
            add(
                "backups/".into(),
                "no complete base backup: nothing can be restored".into(),
                true,
            );
        }
        // The window: oldest usable backup's consistency to the newest usable one's reach.
        let usable: Vec<(&BackupInfo, &Reach)> = entries
            .iter()
            .filter_map(|e| match (&e.info, &e.reach) {
                (Some(i), Some(Ok(r))) if r.consistent => Some((i, r)),
                _ => None,
            })
            .collect();
        let window = {
            let oldest = usable
                .iter()
                .min_by(|a, b| (a.0.end_lsn, &a.0.id).cmp(&(b.0.end_lsn, &b.0.id)));
            let newest_u = usable
                .iter()
                .max_by(|a, b| (a.0.end_lsn, &a.0.id).cmp(&(b.0.end_lsn, &b.0.id)));
            match (oldest, newest_u) {
                (Some((o, _)), Some((n, nr))) => nr.end_segment.map(|end| Window {
                    timeline: target,
                    earliest: Point {
                        lsn: o.end_lsn,
                        segment: SegmentId::containing(
                            o.end_timeline,
                            Lsn(o.end_lsn.0.saturating_sub(1)),
                            size,
                        ),
                        partial: false,
                        backup: o.id.clone(),
                        time: Some(o.stop_time.clone()),
                    },
                    latest: Point {
                        lsn: nr.end_lsn,
                        segment: end,
                        partial: nr.ends_in_partial,
                        backup: n.id.clone(),
                        time: None,
                    },
                }),
                _ => None,
            }
        };
        Inventory {
            seg_size: size,
            timelines,
            histories: inp.histories.clone(),
            backups: entries,
            target_timeline,
            newest,
            window,
            problems: problems.into_values().collect(),
            wal_files,
        }
    }

    /// Whether a restore of the newest complete backup reaches the newest archived WAL and no
    /// problem limits recovery (status exit 0).
    pub fn healthy(&self) -> bool {
        !self.problems.iter().any(|p| p.limits_recovery)
            && self.window.is_some()
            && self.newest_complete().is_some_and(
                |e| matches!(&e.reach, Some(Ok(r)) if r.consistent && r.reaches_newest),
            )
    }

    /// The newest complete backup, as restore orders them (end LSN, then id).
    pub fn newest_complete(&self) -> Option<&BackupEntry> {
        self.backups
            .iter()
            .filter(|e| e.info.is_some())
            .max_by(|a, b| {
                let k = |e: &&BackupEntry| e.info.as_ref().map(|i| (i.end_lsn, i.id.clone()));
                k(a).cmp(&k(b))
            })
    }

    /// The trailing `.partial` segments worth scanning (one per timeline at most).
    pub fn trailing_partials(&self) -> Vec<SegmentId> {
        self.timelines
            .iter()
            .filter_map(|t| t.trailing_partial.map(|p| SegmentId::new(t.timeline, p)))
            .collect()
    }

    pub fn timeline(&self, t: Timeline) -> Option<&TimelineInfo> {
        self.timelines.iter().find(|i| i.timeline == t)
    }
}

fn info_end(e: &BackupEntry) -> Lsn {
    e.info.as_ref().map_or(Lsn(0), |i| i.end_lsn)
}

/// Follows one backup's path through the archived segments.
fn walk(
    path: &[Step],
    b: &BackupInfo,
    present: &Present,
    inp: &Inputs<'_>,
    size: SegmentSize,
    newest: Option<(SegmentId, bool)>,
) -> Reach {
    let first = b.start_lsn.segno(size);
    let consistency_seg = Lsn(b.end_lsn.0.saturating_sub(1)).segno(size).max(first);
    let start_segment = SegmentId::new(timeline_for_segment(path, first, size), first);
    let mut end: Option<(SegmentId, bool)> = None;
    let mut cut = None;
    let mut segno = first;
    loop {
        let id = SegmentId::new(timeline_for_segment(path, segno, size), segno);
        let key = (id.timeline, segno);
        if present.complete.contains(&key) {
            end = Some((id, false));
        } else if present.partial.contains(&key) {
            if later_wal(path, present, size, segno + 1) {
                cut = Some(id);
            } else {
                end = Some((id, true));
            }
            break;
        } else {
            if later_wal(path, present, size, segno + 1) {
                cut = Some(id);
            }
            break;
        }
        match segno.checked_add(1) {
            Some(n) => segno = n,
            None => break,
        }
    }
    let end_lsn = match end {
        Some((id, true)) => inp.partials.get(&id).map_or(id.start_lsn(size), |c| c.end),
        Some((id, false)) => id.end_lsn(size),
        None => start_segment.start_lsn(size),
    };
    let consistent = match end {
        Some((id, _)) => {
            id.segno > consistency_seg || (id.segno == consistency_seg && end_lsn >= b.end_lsn)
        }
        None => false,
    };
    // A cut before consistency is reported as the WAL not reaching consistency only when
    // there is nothing after it.
    let reaches_newest = cut.is_none() && end.is_some() && end == newest;
    Reach {
        path: path.to_vec(),
        start_segment,
        end_segment: end.map(|e| e.0),
        ends_in_partial: end.is_some_and(|e| e.1),
        end_lsn,
        consistent,
        cut_at: cut,
        reaches_newest,
    }
}

/// Whether WAL at segment `from` or later is archived on the path (on the timeline replay
/// would read it from, or on a later step).
fn later_wal(path: &[Step], present: &Present, size: SegmentSize, from: u64) -> bool {
    path.iter().enumerate().any(|(i, s)| {
        let lo = s.begin.segno(size).max(from);
        step_last_segment(path, i, size)
            .is_some_and(|hi| lo <= hi && present.last_on(s.timeline, lo, hi).is_some())
    })
}

/// The last segment number replay reads from step `i`'s timeline: the one before the segment
/// holding the switch point (that one is read from the next timeline); `None` when it reads
/// none.
fn step_last_segment(path: &[Step], i: usize, size: SegmentSize) -> Option<u64> {
    match path.get(i + 1) {
        Some(next) => next.begin.segno(size).checked_sub(1),
        None => Some(u64::MAX),
    }
}

/// RFC 3339 UTC with microseconds for a WAL `TimestampTz` (microseconds since 2000-01-01 UTC).
pub fn pg_time(us: i64) -> Option<String> {
    const PG_EPOCH_UNIX_SECS: i64 = 946_684_800;
    let unix = us.checked_add(PG_EPOCH_UNIX_SECS.checked_mul(1_000_000)?)?;
    let t = chrono::DateTime::from_timestamp_micros(unix)?;
    Some(t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::archive::catalog::{archive_key, TarArchive, FORMAT};
    use crate::wal::timeline::tl;

    pub const S16: SegmentSize = SegmentSize::DEFAULT;
    pub const SYS: u64 = 7_311_234_567_890_123_456;

    pub fn seg(t: u32, s: u64) -> String {
        SegmentId::new(tl(t), s).file_name(S16)
    }

    pub fn lsn(s: &str) -> Lsn {
        s.parse().unwrap()
    }

    /// Complete segments `(tl, from..=to)`, partials `(tl, segno)`, history files.
    pub fn listing(
        complete: &[(u32, std::ops::RangeInclusive<u64>)],
        partial: &[(u32, u64)],
        hist: &[u32],
    ) -> Vec<ObjectInfo> {
        let mut v = Vec::new();
        for (t, r) in complete {
            for s in r.clone() {
                v.push(ObjectInfo {
                    key: format!("wal/{}.zst", seg(*t, s)),
                    size: 100,
                    etag: None,
                });
            }
        }
        for (t, s) in partial {
            v.push(ObjectInfo {
                key: format!("wal/{}.partial.zst", seg(*t, *s)),
                size: 10,
                etag: None,
            });
        }
        for t in hist {
            v.push(ObjectInfo {
                key: format!("wal/{}", history_file_name(tl(*t))),
                size: 40,
                etag: None,
            });
        }
        v.push(ObjectInfo {
            key: "wal/stray.txt".into(),
            size: 1,
            etag: None,
        });
        v
    }

    pub fn backup(id: &str, t: u32, start: Lsn, end: Lsn, stop: &str) -> BackupInfo {
        BackupInfo {
            format: FORMAT,
            id: id.into(),
            label: "l".into(),
            system_identifier: SYS.to_string(),
            server_version_num: 150000,
            timeline: tl(t),
            start_lsn: start,
            end_lsn: end,
            end_timeline: tl(t),
            start_time: stop.into(),
            stop_time: stop.into(),
            wal_segment_size: 16 << 20,
            compression: "zstd:1".into(),
            data_bytes: 1000,
            stored_bytes: 500,
            archives: vec![TarArchive {
                name: "base.tar".into(),
                key: archive_key(id, "base.tar", true),
                tablespace_oid: None,
                tablespace_location: None,
                tar_bytes: 1000,
                stored_bytes: 400,
            }],
            manifest_key: None,
            wal_start_segment: String::new(),
            wal_end_segment: String::new(),
            source: String::new(),
            walagent_version: "t".into(),
        }
    }

    /// A backup starting in segment `s` and consistent in it.
    pub fn b_at(id: &str, t: u32, s: u64) -> Listed {
        let base = s * (16 << 20);
        Listed::Complete(Box::new(backup(
            id,
            t,
            Lsn(base + 0x28),
            Lsn(base + 0x100),
            &format!("2026-11-2{}T10:00:00Z", s % 10),
        )))
    }

    pub fn build(
        objs: &[ObjectInfo],
        hist: &BTreeMap<Timeline, TimelineHistory>,
        backups: &[Listed],
    ) -> Inventory {
        Inventory::build(&Inputs {
            seg_size: S16,
            system_identifier: SYS,
            wal_objects: objs,
            histories: hist,
            backups,
            partials: &BTreeMap::new(),
        })
    }

    fn objects(inv: &Inventory) -> Vec<&str> {
        inv.problems.iter().map(|p| p.object.as_str()).collect()
    }

    #[test]
    fn a_healthy_archive() {
        let objs = listing(&[(1, 3..=8)], &[(1, 9)], &[]);
        let bs = vec![b_at("A", 1, 3), b_at("B", 1, 6)];
        let inv = build(&objs, &BTreeMap::new(), &bs);
        assert!(inv.problems.is_empty(), "{:?}", inv.problems);
        assert!(inv.healthy());
        let t = &inv.timelines[0];
        assert_eq!((t.first_segment, t.last_segment), (Some(3), Some(8)));
        assert_eq!(t.trailing_partial, Some(9));
        assert!(t.gaps.is_empty());
        assert_eq!(t.begin_lsn(S16), Some(lsn("0/3000000")));
        assert_eq!(t.end_lsn(S16), Some(lsn("0/9000000")));
        let w = inv.window.unwrap();
        assert_eq!(w.earliest.lsn, lsn("0/3000100"));
        assert_eq!(w.earliest.backup, "A");
        assert_eq!(w.latest.segment, SegmentId::new(tl(1), 9));
        assert!(w.latest.partial);
        assert_eq!(w.latest.backup, "B");
        assert_eq!(inv.newest, Some((SegmentId::new(tl(1), 9), true)));
    }

    #[test]
    fn a_gap_cuts_the_older_backup_off() {
        let objs = listing(&[(1, 3..=4), (1, 6..=8)], &[], &[]);
        let bs = vec![b_at("A", 1, 3), b_at("B", 1, 6)];
        let inv = build(&objs, &BTreeMap::new(), &bs);
        assert_eq!(inv.timelines[0].gaps, vec![Gap { from: 5, to: 5 }]);
        assert_eq!(objects(&inv), vec![seg(1, 5)]);
        assert!(inv.problems[0].problem.contains("cuts backup A off"));
        assert!(!inv.healthy());
        // The window still runs from A (usable up to the gap) to B's end.
        let w = inv.window.unwrap();
        assert_eq!(w.earliest.backup, "A");
        assert_eq!(w.latest.segment, SegmentId::new(tl(1), 8));
        // A gap below every backup is harmless: listed, not a problem.
        let objs = listing(&[(1, 1..=1), (1, 3..=8)], &[], &[]);
        let inv = build(&objs, &BTreeMap::new(), &bs);
        assert_eq!(inv.timelines[0].gaps, vec![Gap { from: 2, to: 2 }]);
        assert!(inv.healthy(), "{:?}", inv.problems);
    }

    #[test]
    fn incomplete_and_unreadable_backups_and_none_complete() {
        let objs = listing(&[(1, 3..=8)], &[], &[]);
        let bs = vec![
            b_at("A", 1, 3),
            Listed::Incomplete {
                id: "B".into(),
                objects: 2,
                bytes: 10,
            },
            Listed::Unreadable {
                id: "C".into(),
                detail: "x".into(),
            },
        ];
        let inv = build(&objs, &BTreeMap::new(), &bs);
        assert_eq!(objects(&inv), vec!["backups/B/", "backups/C/backup.json"]);
        assert!(inv.problems.iter().all(|p| !p.limits_recovery));
        assert!(inv.healthy());
        let inv = build(&objs, &BTreeMap::new(), &bs[1..]);
        assert!(objects(&inv).contains(&"backups/"));
        assert!(!inv.healthy() && inv.window.is_none());
        // An empty archive.
        let inv = build(&[], &BTreeMap::new(), &[]);
        assert!(inv.timelines.is_empty() && inv.target_timeline.is_none());
        assert_eq!(objects(&inv), vec!["backups/"]);
    }

    fn hist2(sw: &str) -> BTreeMap<Timeline, TimelineHistory> {
        let mut h = BTreeMap::new();
        h.insert(
            tl(2),
            TimelineHistory::parse(format!("1\t{sw}\tno recovery target specified\n").as_bytes())
                .unwrap(),
        );
        h
    }

    #[test]
    fn timelines_are_followed_and_a_missing_end_is_found() {
        // TL1 3..=5 and its partial 6 (switch at 0/6000100); TL2 6..=8.
        let objs = listing(&[(1, 3..=5), (2, 6..=8)], &[(1, 6)], &[2]);
        let bs = vec![b_at("A", 1, 3), b_at("B", 2, 7)];
        let h = hist2("0/6000100");
        let inv = build(&objs, &h, &bs);
        assert!(inv.problems.is_empty(), "{:?}", inv.problems);
        assert_eq!(inv.target_timeline, Some(tl(2)));
        let a = &inv.backups[0];
        let r = a.reach.as_ref().unwrap().as_ref().unwrap();
        assert_eq!(r.end_segment, Some(SegmentId::new(tl(2), 8)));
        assert!(r.reaches_newest && r.consistent);
        assert_eq!(
            inv.timeline(tl(1)).unwrap().switched_at,
            Some(lsn("0/6000100"))
        );
        assert_eq!(
            inv.timeline(tl(2)).unwrap().parent,
            Some((tl(1), lsn("0/6000100")))
        );
        // TL1's WAL stops at segment 4: its end is missing and it cuts A off.
        let objs = listing(&[(1, 3..=4), (2, 6..=8)], &[], &[2]);
        let inv = build(&objs, &h, &bs);
        assert_eq!(objects(&inv), vec![seg(1, 5)]);
        assert!(inv.problems[0]
            .problem
            .contains("timeline 1 was left at 0/6000100"));
        assert!(inv.problems[0].limits_recovery);
        // Without a backup on TL1: still reported, not limiting.
        let inv = build(&objs, &h, &bs[1..]);
        assert_eq!(objects(&inv), vec![seg(1, 5)]);
        assert!(!inv.problems[0].limits_recovery);
        assert!(inv.healthy());
        // A history file missing for a timeline with WAL.
        let objs = listing(&[(1, 3..=5), (2, 6..=8)], &[(1, 6)], &[]);
        let inv = build(&objs, &BTreeMap::new(), &bs[..1]);
        assert_eq!(objects(&inv), vec!["wal/00000002.history"]);
        assert!(!inv.healthy());
    }

    #[test]
    fn a_backup_after_the_fork_is_not_usable_along_the_latest_timeline() {
        let objs = listing(&[(1, 3..=9), (2, 6..=8)], &[], &[2]);
        let bs = vec![b_at("A", 1, 3), b_at("B", 1, 8)];
        let inv = build(&objs, &hist2("0/6000100"), &bs);
        // The newest (by end LSN) is B on TL1, whose latest timeline is 1 (no 00000002 probe
        // from... it is probed: 2.history exists), after the fork.
        let b = &inv.backups[1];
        assert!(matches!(&b.reach, Some(Err(why)) if why.contains("after timeline 2 left it")));
        assert!(!inv.healthy());
    }

    #[test]
    fn partial_content_bounds_consistency() {
        let objs = listing(&[(1, 3..=5)], &[(1, 6)], &[]);
        let bs = vec![b_at("A", 1, 3), b_at("B", 1, 6)];
        let mut p = BTreeMap::new();
        p.insert(
            SegmentId::new(tl(1), 6),
            PartialContent {
                last_record: Some(lsn("0/6000050")),
                end: lsn("0/6000080"),
            },
        );
        let inv = Inventory::build(&Inputs {
            seg_size: S16,
            system_identifier: SYS,
            wal_objects: &objs,
            histories: &BTreeMap::new(),
            backups: &bs,
            partials: &p,
        });
        // B becomes consistent at 0/6000100, past what the partial holds.
        assert_eq!(objects(&inv), vec!["backups/B/"]);
        assert!(!inv.backups[1].usable() && inv.backups[0].usable());
        assert_eq!(inv.timelines[0].end_lsn(S16), Some(lsn("0/6000080")));
        let w = inv.window.unwrap();
        assert_eq!(
            (w.earliest.backup.as_str(), w.latest.backup.as_str()),
            ("A", "A")
        );
        assert_eq!(w.latest.lsn, lsn("0/6000080"));
    }

    #[test]
    fn foreign_backups_are_not_used() {
        let objs = listing(&[(1, 3..=5)], &[], &[]);
        let mut b = backup(
            "A",
            1,
            lsn("0/3000028"),
            lsn("0/3000100"),
            "2026-11-22T10:00:00Z",
        );
        b.system_identifier = "1".into();
        let bs = vec![Listed::Complete(Box::new(b))];
        let inv = build(&objs, &BTreeMap::new(), &bs);
        assert!(matches!(&inv.backups[0].reach, Some(Err(w)) if w.contains("system 1")));
        assert!(!inv.healthy());
    }

    #[test]
    fn pg_times() {
        assert_eq!(pg_time(0).unwrap(), "2000-01-01T00:00:00.000000Z");
        assert_eq!(pg_time(1_500_000).unwrap(), "2000-01-01T00:00:01.500000Z");
        assert_eq!(pg_time(i64::MAX), None);
    }
}
