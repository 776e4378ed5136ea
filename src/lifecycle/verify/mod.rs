//! `walagent verify`: reads the archive's objects and names every damaged or missing one.
//!
//! - WAL segments: the stored checksum (the store checks it on every read), decompression, every
//!   page header and record CRC ([`segment::check_segment`]), and continuity: each segment must
//!   continue the one before it on its timeline's path ([`segment::check_boundary`]), segments
//!   missing between a timeline's first and last are reported, and a timeline's first segment
//!   must branch where its history file says.
//! - History files: readable, and parents older than the timeline.
//! - Backups (complete ones, with a `backup.json`): every tar object against the
//!   `backup_manifest` ([`backup::check_backup`]), and the WAL from start to end segment present.
//!
//! Incremental by default: a watermark ([`watermark::WATERMARK_KEY`]) records what verified
//! clean, so a run reads only new or changed objects; `--full` reads everything. It is the only
//! object verify writes. See `proto-notes/verify.md`.

pub mod backup;
pub mod segment;
pub mod watermark;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;

use self::segment::SegSummary;
use self::watermark::{Body, Entry, WATERMARK_KEY};
use crate::archive::catalog::{self, BackupInfo, BACKUPS_PREFIX};
use crate::archive::layout::{self, parse_wal_key, WalObject};
use crate::archive::meta::MetaError;
use crate::archive::{ArchiveMeta, ObjectInfo, PutMode, Store, StoreError};
use crate::datadir::progress::Progress;
use crate::wal::{Lsn, SegmentId, SegmentSize, Timeline, TimelineHistory, VerifyParams};

/// How to run.
#[derive(Debug, Clone, Copy, Default)]
pub struct VerifyOptions {
    /// Read every object, ignoring the watermark.
    pub full: bool,
    /// Show a progress bar (on a terminal).
    pub progress: bool,
}

/// One damaged or missing object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The object's key (for a missing segment: its key without compression suffix; for a
    /// backup whose WAL is missing: its `backup.json`).
    pub object: String,
    pub problem: String,
}

/// What was looked at and what it cost.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub wal_segments: u64,
    pub partial_segments: u64,
    pub history_files: u64,
    pub backups: u64,
    /// Backups without backup.json (interrupted or running): not checked.
    pub incomplete_backups: u64,
    /// Keys under `wal/` that are not WAL objects walagent writes: ignored.
    pub foreign_objects: u64,
    /// Objects read in this run.
    pub objects_read: u64,
    /// Objects not read because the watermark says they verified unchanged.
    pub objects_skipped: u64,
    /// Stored bytes read.
    pub bytes_read: u64,
    /// WAL bytes checked (decompressed).
    pub wal_bytes_checked: u64,
    /// Tar bytes checked (decompressed).
    pub backup_bytes_checked: u64,
    pub problems: u64,
}

/// What happened to the watermark.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct WatermarkUse {
    pub key: &'static str,
    /// An earlier run's watermark was used.
    pub used: bool,
    /// Why the stored watermark was not used (absent: null and `used` false).
    pub ignored: Option<String>,
    /// A new watermark was written.
    pub written: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub archive: String,
    pub system_identifier: String,
    pub full: bool,
    pub ok: bool,
    pub problems: Vec<Problem>,
    pub counts: Counts,
    pub watermark: WatermarkUse,
}

impl VerifyReport {
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).unwrap_or_default();
        s.push('\n');
        s
    }

    /// Human-readable summary.
    pub fn render_text(&self) -> String {
        let c = &self.counts;
        let mut s = format!(
            "verified {}: {} WAL segments ({} partial), {} history files, {} backups; read {} objects ({} bytes), {} unchanged since the last verify\n",
            self.archive,
            c.wal_segments,
            c.partial_segments,
            c.history_files,
            c.backups,
            c.objects_read,
            c.bytes_read,
            c.objects_skipped
        );
        if self.problems.is_empty() {
            s.push_str("no problems found\n");
        } else {
            s.push_str(&format!("{} problem(s):\n", self.problems.len()));
            for p in &self.problems {
                s.push_str(&format!("  {}: {}\n", p.object, p.problem));
            }
        }
        s
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{0}")]
    Meta(#[from] MetaError),
    #[error("cannot read the archive: {0}")]
    Store(#[from] StoreError),
    #[error("{archive} is not a walagent archive (it has no {})", layout::META_KEY)]
    NotAnArchive { archive: String },
}

impl VerifyError {
    pub fn hint(&self) -> Option<String> {
        match self {
            VerifyError::Meta(e) => e.hint(),
            VerifyError::Store(StoreError::Io { .. }) => {
                Some("check that the archive is reachable and readable".into())
            }
            VerifyError::Store(e) => e.hint().or_else(|| {
                Some("check that the archive is reachable, then run verify again".into())
            }),
            VerifyError::NotAnArchive { .. } => {
                Some("point --archive at the directory or s3:// URL that walagent stream or backup writes".into())
            }
        }
    }
}

/// The first segment of each timeline on a timeline's path, and which timeline's file holds a
/// segment along it.
struct Path<'a> {
    tli: Timeline,
    history: Option<&'a TimelineHistory>,
    seg: SegmentSize,
}

impl Path<'_> {
    /// The timeline whose file holds segment `segno` on this timeline's path: the parent up to
    /// the segment before the one holding the switch point (that one is copied into the child's
    /// first segment).
    fn owner(&self, segno: u64) -> Timeline {
        self.history
            .and_then(|h| {
                h.entries
                    .iter()
                    .find(|e| segno < e.switch_lsn.segno(self.seg))
                    .map(|e| e.parent_timeline)
            })
            .unwrap_or(self.tli)
    }

    /// The timeline's own first segment, and the parent and switch point (from the last entry).
    fn begin(&self) -> (u64, Option<(Timeline, Lsn)>) {
        match self.history.and_then(|h| h.entries.last()) {
            Some(e) => (
                e.switch_lsn.segno(self.seg),
                Some((e.parent_timeline, e.switch_lsn)),
            ),
            None => (0, None),
        }
    }
}

/// A WAL segment's state in this run.
#[derive(Debug, Clone)]
enum SegState {
    Ok(SegSummary),
    Damaged,
}

#[derive(Debug, Default)]
struct WalSet {
    /// (timeline, segno) -> (key, state) of complete segments.
    complete: BTreeMap<(Timeline, u64), (String, SegState)>,
    partial: BTreeMap<(Timeline, u64), (String, SegState)>,
}

fn missing_key(id: SegmentId, seg: SegmentSize) -> String {
    format!("{}{}", layout::WAL_PREFIX, id.file_name(seg))
}

/// Continuity, gaps and timeline-begin checks over the segment states (no I/O).
fn check_chains(
    wal: &WalSet,
    histories: &BTreeMap<Timeline, TimelineHistory>,
    seg: SegmentSize,
    problems: &mut Vec<Problem>,
) {
    let timelines: BTreeSet<Timeline> = wal
        .complete
        .keys()
        .chain(wal.partial.keys())
        .map(|(t, _)| *t)
        .collect();
    let mut checked: HashSet<((Timeline, u64), (Timeline, u64))> = HashSet::new();
    let mut gaps: HashSet<(Timeline, u64)> = HashSet::new();
    for &tli in &timelines {
        let path = Path {
            tli,
            history: histories.get(&tli),
            seg,
        };
        let (begin, _) = path.begin();
        let own = |m: &BTreeMap<(Timeline, u64), (String, SegState)>| -> Vec<u64> {
            m.range((tli, 0)..=(tli, u64::MAX))
                .map(|(k, _)| k.1)
                .collect()
        };
        let mut own_segs = own(&wal.complete);
        own_segs.extend(own(&wal.partial));
        for &s in own_segs.iter().filter(|s| **s < begin) {
            let key = wal
                .complete
                .get(&(tli, s))
                .or_else(|| wal.partial.get(&(tli, s)))
                .map(|(k, _)| k.clone())
                .unwrap_or_default();
            problems.push(Problem {
                object: key,
                problem: format!(
                    "is a segment of timeline {tli} from before the timeline began (its history file says it branched at segment {})",
                    SegmentId::new(tli, begin).file_name(seg)
                ),
            });
        }
        let Some(&hi) = own_segs.iter().filter(|s| **s >= begin).max() else {
            continue;
        };
        // The earliest segment on the path present in the archive.
        let mut lo = hi;
        for (&(t, s), _) in wal.complete.range(..) {
            if s < lo && path.owner(s) == t && (t != tli || s >= begin) {
                lo = s;
            }
        }
        let mut prev: Option<((Timeline, u64), String, SegState)> = None;
        let mut carried: Option<Lsn> = None;
        let mut gap_start: Option<u64> = None;
        for k in lo..=hi {
            let owner = path.owner(k);
            let id = (owner, k);
            let found = wal.complete.get(&id).or_else(|| {
                (k == hi && owner == tli)
                    .then(|| wal.partial.get(&id))
                    .flatten()
            });
            let Some((key, state)) = found else {
                gap_start.get_or_insert(k);
                prev = None;
                carried = None;
                continue;
            };
            if let Some(g) = gap_start.take() {
                let first = SegmentId::new(path.owner(g), g);
                if gaps.insert((first.timeline, g)) {
                    let n = k - g;
                    let last = SegmentId::new(path.owner(k - 1), k - 1);
                    let partial_only = wal.partial.contains_key(&(first.timeline, g));
                    problems.push(Problem {
                        object: missing_key(first, seg),
                        problem: if n == 1 {
                            format!(
                                "missing{}: the archive has WAL of timeline {} before and after it",
                                if partial_only { " (only a .partial of it is archived)" } else { "" },
                                tli
                            )
                        } else {
                            format!(
                                "missing, with the {} segments after it up to {}: the archive has WAL of timeline {} before and after them",
                                n - 1,
                                last.file_name(seg),
                                tli
                            )
                        },
                    });
                }
            }
            if let (Some((pid, pkey, SegState::Ok(p))), SegState::Ok(s)) = (&prev, state) {
                carried = p.last_start.or(carried);
                if checked.insert((*pid, id)) {
                    let pname = pkey.strip_prefix(layout::WAL_PREFIX).unwrap_or(pkey);
                    if let Err(e) = segment::check_boundary(p, carried, s, pname) {
                        problems.push(Problem {
                            object: key.clone(),
                            problem: e,
                        });
                    }
                }
            } else {
                carried = None;
            }
            prev = Some((id, key.clone(), state.clone()));
        }
    }
}

/// The listing of one backup.
#[derive(Default)]
struct Listed {
    objects: BTreeMap<String, ObjectInfo>,
}

fn marker_of(o: &ObjectInfo) -> Option<(String, u64, String)> {
    o.etag.clone().map(|e| (o.key.clone(), o.size, e))
}

fn rfc3339_now() -> String {
    crate::archive::meta::rfc3339_utc(std::time::SystemTime::now())
}

/// Verifies the archive; see the module documentation.
pub async fn verify(
    store: Arc<dyn Store>,
    opts: VerifyOptions,
) -> Result<VerifyReport, VerifyError> {
    let location = store.location();
    let meta =
        ArchiveMeta::load(store.as_ref())
            .await?
            .ok_or_else(|| VerifyError::NotAnArchive {
                archive: location.clone(),
            })?;
    let seg = meta.wal_segment_size;
    let sysid = meta.system_identifier;
    let mut wm = WatermarkUse {
        key: WATERMARK_KEY,
        ..Default::default()
    };
    let old: Body = if opts.full {
        Body::default()
    } else {
        match store.get_bytes(WATERMARK_KEY).await {
            Ok(None) => Body::default(),
            Ok(Some(b)) => match Body::parse(&b, sysid, u64::from(seg.bytes())) {
                Ok(body) => {
                    wm.used = true;
                    body
                }
                Err(why) => {
                    tracing::warn!(
                        watermark = WATERMARK_KEY,
                        "ignoring the verify watermark ({why}); checking everything"
                    );
                    wm.ignored = Some(why);
                    Body::default()
                }
            },
            Err(StoreError::Corrupt { detail, .. }) => {
                tracing::warn!(
                    watermark = WATERMARK_KEY,
                    "ignoring the verify watermark ({detail}); checking everything"
                );
                wm.ignored = Some(detail);
                Body::default()
            }
            Err(e) => return Err(e.into()),
        }
    };
    let known =
        |o: &ObjectInfo| -> Option<&Entry> { old.objects.get(&o.key).filter(|e| e.matches(o)) };
    let mut new = Body {
        system_identifier: sysid.to_string(),
        wal_segment_size: u64::from(seg.bytes()),
        walagent_version: env!("CARGO_PKG_VERSION").to_string(),
        ..Default::default()
    };
    let mut problems = Vec::new();
    let mut counts = Counts::default();

    let wal_objects = store.list(layout::WAL_PREFIX).await?;
    let backup_objects = store.list(BACKUPS_PREFIX).await?;

    // History files: small; read unless the watermark holds their verified text.
    let mut histories: BTreeMap<Timeline, TimelineHistory> = BTreeMap::new();
    let mut history_sums: BTreeMap<Timeline, String> = BTreeMap::new();
    let mut segments: Vec<(ObjectInfo, SegmentId, bool, bool)> = Vec::new();
    for o in &wal_objects {
        match parse_wal_key(&o.key, seg) {
            Some(WalObject::History(tli)) => {
                counts.history_files += 1;
                let text = match known(o).and_then(|e| e.text.clone()) {
                    Some(t) => {
                        counts.objects_skipped += 1;
                        t.into_bytes()
                    }
                    None => match store.get_bytes(&o.key).await {
                        Ok(Some(b)) => {
                            counts.objects_read += 1;
                            counts.bytes_read += b.len() as u64;
                            b.to_vec()
                        }
                        Ok(None) => continue, // deleted meanwhile
                        Err(StoreError::Corrupt { detail, .. }) => {
                            problems.push(Problem {
                                object: o.key.clone(),
                                problem: format!("damaged: {detail}"),
                            });
                            continue;
                        }
                        Err(e) => return Err(e.into()),
                    },
                };
                let parsed = TimelineHistory::parse(&text)
                    .map_err(|e| e.to_string())
                    .and_then(|h| h.check_child(tli).map(|_| h).map_err(|e| e.to_string()));
                match parsed {
                    Ok(h) => {
                        if let (Some(etag), Ok(t)) = (&o.etag, String::from_utf8(text)) {
                            new.objects.insert(
                                o.key.clone(),
                                Entry {
                                    size: o.size,
                                    etag: etag.clone(),
                                    wal: None,
                                    text: Some(t),
                                    history: None,
                                },
                            );
                        }
                        history_sums.insert(tli, watermark::sha256_hex(&h.to_bytes()));
                        histories.insert(tli, h);
                    }
                    Err(e) => problems.push(Problem {
                        object: o.key.clone(),
                        problem: format!("damaged: {e}"),
                    }),
                }
            }
            Some(WalObject::Segment {
                id,
                partial,
                compressed,
            }) => segments.push((o.clone(), id, partial, compressed)),
            None => counts.foreign_objects += 1,
        }
    }
    segments.sort_by_key(|a| (a.1.timeline, a.1.segno, a.2));

    // Timelines with segments but no history file.
    let seg_timelines: BTreeSet<Timeline> = segments.iter().map(|s| s.1.timeline).collect();
    for &t in &seg_timelines {
        if u32::from(t) > 1 && !histories.contains_key(&t) {
            let key = layout::history_key(t);
            if !problems.iter().any(|p| p.object == key) {
                problems.push(Problem {
                    object: key,
                    problem: format!(
                        "missing: the archive has WAL segments of timeline {t} but not its history file"
                    ),
                });
            }
        }
    }

    // Backups: grouped by id.
    let mut backups: BTreeMap<String, Listed> = BTreeMap::new();
    for o in &backup_objects {
        let Some(rest) = o.key.strip_prefix(BACKUPS_PREFIX) else {
            continue;
        };
        let Some((id, name)) = rest.split_once('/') else {
            continue;
        };
        if id.is_empty() || name.is_empty() || name.contains('/') {
            continue;
        }
        backups
            .entry(id.to_string())
            .or_default()
            .objects
            .insert(o.key.clone(), o.clone());
    }

    // A segment verified earlier, with the same history file of its timeline.
    let known_seg = |o: &ObjectInfo, tli: Timeline| -> Option<&Entry> {
        known(o).filter(|e| e.wal.is_some() && e.history.as_ref() == history_sums.get(&tli))
    };
    // What to read, for the progress bar's total.
    let mut to_read_bytes: u64 = segments
        .iter()
        .filter(|s| opts.full || known_seg(&s.0, s.1.timeline).is_none())
        .map(|s| s.0.size)
        .sum();
    let mut infos: Vec<(BackupInfo, bool)> = Vec::new();
    for (id, l) in &backups {
        let ikey = catalog::info_key(id);
        let Some(io) = l.objects.get(&ikey) else {
            counts.incomplete_backups += 1;
            continue;
        };
        let text = match known(io).and_then(|e| e.text.clone()) {
            Some(t) => {
                counts.objects_skipped += 1;
                t.into_bytes()
            }
            None => match store.get_bytes(&ikey).await {
                Ok(Some(b)) => {
                    counts.objects_read += 1;
                    counts.bytes_read += b.len() as u64;
                    b.to_vec()
                }
                Ok(None) => continue,
                Err(StoreError::Corrupt { detail, .. }) => {
                    problems.push(Problem {
                        object: ikey,
                        problem: format!("damaged: {detail}"),
                    });
                    continue;
                }
                Err(e) => return Err(e.into()),
            },
        };
        let info = match BackupInfo::parse(&text) {
            Ok(i) if i.id == *id => i,
            Ok(i) => {
                problems.push(Problem {
                    object: ikey,
                    problem: format!("damaged: it names backup id {}", i.id),
                });
                continue;
            }
            Err(e) => {
                problems.push(Problem {
                    object: ikey,
                    problem: format!("damaged: not a readable backup.json ({e})"),
                });
                continue;
            }
        };
        if info.system_identifier_u64() != Some(sysid) {
            problems.push(Problem {
                object: ikey,
                problem: format!(
                    "is a backup of system {}, the archive holds system {sysid}",
                    info.system_identifier
                ),
            });
            continue;
        }
        counts.backups += 1;
        if let (Some(etag), Ok(t)) = (&io.etag, String::from_utf8(text)) {
            new.objects.insert(
                ikey.clone(),
                Entry {
                    size: io.size,
                    etag: etag.clone(),
                    wal: None,
                    text: Some(t),
                    history: None,
                },
            );
        }
        let markers = backup_markers(&info, l);
        let unchanged = !opts.full
            && markers.is_some()
            && old
                .backups
                .get(id)
                .is_some_and(|m| Some(m) == markers.as_ref());
        if !unchanged {
            to_read_bytes += info
                .archives
                .iter()
                .filter_map(|a| l.objects.get(&a.key))
                .map(|o| o.size)
                .sum::<u64>();
        }
        infos.push((info, unchanged));
    }

    let progress = Progress::with_total(opts.progress, to_read_bytes);

    // WAL segments: known ones from the watermark, the rest read and checked concurrently.
    let mut wal = WalSet::default();
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(2, 8)
        + 1;
    let mut tasks = tokio::task::JoinSet::new();
    let mut pending = segments.iter();
    let insert = |wal: &mut WalSet, id: SegmentId, partial: bool, key: String, st: SegState| {
        let m = if partial {
            &mut wal.partial
        } else {
            &mut wal.complete
        };
        m.insert((id.timeline, id.segno), (key, st));
    };
    loop {
        while tasks.len() < workers {
            let Some((o, id, partial, compressed)) = pending.next() else {
                break;
            };
            if *partial {
                counts.partial_segments += 1;
            } else {
                counts.wal_segments += 1;
            }
            if !opts.full {
                if let Some(e) = known_seg(o, id.timeline) {
                    if let Some(sum) = e.wal {
                        counts.objects_skipped += 1;
                        new.objects.insert(o.key.clone(), e.clone());
                        insert(&mut wal, *id, *partial, o.key.clone(), SegState::Ok(sum));
                        continue;
                    }
                }
            }
            let path = Path {
                tli: id.timeline,
                history: histories.get(&id.timeline),
                seg,
            };
            let (begin, parent) = path.begin();
            let start = id.start_lsn(seg);
            let branch = parent.filter(|(_, sw)| id.segno == begin && *sw > start);
            let history = histories.get(&id.timeline).cloned();
            let params = VerifyParams {
                system_identifier: sysid,
                segment_size: seg,
                timeline: id.timeline,
            };
            let store = store.clone();
            let (o, id, partial, compressed) = (o.clone(), *id, *partial, *compressed);
            tasks.spawn(async move {
                let res = read_and_check(
                    store.as_ref(),
                    &o.key,
                    compressed,
                    partial,
                    params,
                    start,
                    history,
                    branch,
                )
                .await;
                (o, id, partial, res)
            });
        }
        let Some(done) = tasks.join_next().await else {
            break;
        };
        let (o, id, partial, res) =
            done.map_err(|e| StoreError::io("checking WAL segments", std::io::Error::other(e)))?;
        progress.add(o.size);
        match res? {
            Checked::Gone => {}
            Checked::Bad(p) => {
                counts.objects_read += 1;
                counts.bytes_read += o.size;
                problems.push(Problem {
                    object: o.key.clone(),
                    problem: p,
                });
                insert(&mut wal, id, partial, o.key.clone(), SegState::Damaged);
            }
            Checked::Good(sum, raw) => {
                counts.objects_read += 1;
                counts.bytes_read += o.size;
                counts.wal_bytes_checked += raw;
                if let Some(etag) = &o.etag {
                    new.objects.insert(
                        o.key.clone(),
                        Entry {
                            size: o.size,
                            etag: etag.clone(),
                            wal: Some(sum),
                            text: None,
                            history: history_sums.get(&id.timeline).cloned(),
                        },
                    );
                }
                insert(&mut wal, id, partial, o.key.clone(), SegState::Ok(sum));
            }
        }
    }
    check_chains(&wal, &histories, seg, &mut problems);

    // Backups.
    for (info, unchanged) in &infos {
        let Some(l) = backups.get(&info.id) else {
            continue;
        };
        check_backup_wal(info, &wal, &histories, seg, &mut problems);
        if *unchanged {
            counts.objects_skipped +=
                (info.archives.len() + usize::from(info.manifest_key.is_some())) as u64;
            if let Some(m) = old.backups.get(&info.id) {
                new.backups.insert(info.id.clone(), m.clone());
            }
            continue;
        }
        let out = backup::check_backup(store.as_ref(), info, &progress).await?;
        counts.objects_read += out.objects_read;
        counts.bytes_read += out.stored_bytes;
        counts.backup_bytes_checked += out.tar_bytes;
        if out.problems.is_empty() {
            if let Some(m) = backup_markers(info, l) {
                new.backups.insert(info.id.clone(), m);
            }
        }
        problems.extend(out.problems);
    }
    progress.finish();

    // The watermark: written when it would say something new.
    if new.objects != old.objects || new.backups != old.backups || opts.full || !wm.used {
        new.verified_at = rfc3339_now();
        match store
            .put_bytes(WATERMARK_KEY, Bytes::from(new.to_json()), PutMode::Replace)
            .await
        {
            Ok(()) => wm.written = true,
            Err(e) => {
                tracing::warn!(error = %e, "cannot store the verify watermark {WATERMARK_KEY}; the next run checks everything again")
            }
        }
    }

    problems.sort_by(|a, b| a.object.cmp(&b.object).then(a.problem.cmp(&b.problem)));
    problems.dedup();
    counts.problems = problems.len() as u64;
    Ok(VerifyReport {
        archive: location,
        system_identifier: sysid.to_string(),
        full: opts.full,
        ok: problems.is_empty(),
        problems,
        counts,
        watermark: wm,
    })
}

/// The (key, size, change marker) of every object of a backup that verify checks; `None` when
/// one is missing from the listing or has no marker (then it is always checked).
fn backup_markers(info: &BackupInfo, l: &Listed) -> Option<Vec<(String, u64, String)>> {
    let mut keys = vec![catalog::info_key(&info.id)];
    keys.extend(info.manifest_key.clone());
    keys.extend(info.archives.iter().map(|a| a.key.clone()));
    keys.iter()
        .map(|k| l.objects.get(k).and_then(marker_of))
        .collect()
}

/// The segments from the backup's start to its end segment must be in the archive (complete,
/// or the end one as `.partial`) and intact.
fn check_backup_wal(
    info: &BackupInfo,
    wal: &WalSet,
    histories: &BTreeMap<Timeline, TimelineHistory>,
    seg: SegmentSize,
    problems: &mut Vec<Problem>,
) {
    let object = catalog::info_key(&info.id);
    let (Some(first), Some(last)) = (
        SegmentId::parse_file_name(&info.wal_start_segment, seg),
        SegmentId::parse_file_name(&info.wal_end_segment, seg),
    ) else {
        problems.push(Problem {
            object,
            problem: format!(
                "damaged: WAL segment names {:?}..{:?} do not parse",
                info.wal_start_segment, info.wal_end_segment
            ),
        });
        return;
    };
    let path = Path {
        tli: last.timeline,
        history: histories.get(&last.timeline),
        seg,
    };
    let mut missing = Vec::new();
    let mut damaged = Vec::new();
    for k in first.segno..=last.segno {
        let id = SegmentId::new(path.owner(k), k);
        let at = (id.timeline, k);
        match wal.complete.get(&at).or_else(|| wal.partial.get(&at)) {
            None => missing.push(id),
            Some((_, SegState::Damaged)) => damaged.push(id),
            Some(_) => {}
        }
    }
    let name = |v: &[SegmentId]| v.first().map(|i| i.file_name(seg)).unwrap_or_default();
    if !missing.is_empty() {
        problems.push(Problem {
            object: object.clone(),
            problem: format!(
                "cannot be restored: it needs WAL segment {}{}, which is missing",
                name(&missing),
                if missing.len() > 1 {
                    format!(" (and {} more)", missing.len() - 1)
                } else {
                    String::new()
                }
            ),
        });
    }
    if !damaged.is_empty() {
        problems.push(Problem {
            object,
            problem: format!(
                "cannot be restored: it needs WAL segment {}{}, which is damaged",
                name(&damaged),
                if damaged.len() > 1 {
                    format!(" (and {} more)", damaged.len() - 1)
                } else {
                    String::new()
                }
            ),
        });
    }
}

enum Checked {
    Good(SegSummary, u64),
    Bad(String),
    /// Deleted between the listing and the read.
    Gone,
}

/// Streams one segment object from the store through zstd into a [`segment::SegmentCheck`] on a
/// blocking thread: a few chunks in flight, never the whole segment. When the check stopped
/// early the rest is still read, so the stored checksum at the end can name a damaged object.
#[allow(clippy::too_many_arguments)]
async fn read_and_check(
    store: &dyn Store,
    key: &str,
    compressed: bool,
    partial: bool,
    params: VerifyParams,
    start: Lsn,
    history: Option<TimelineHistory>,
    branch: Option<(Timeline, Lsn)>,
) -> Result<Checked, StoreError> {
    let mut reader = match store.open_reader(key).await {
        Ok(Some(r)) => r,
        Ok(None) => return Ok(Checked::Gone),
        Err(StoreError::Corrupt { detail, .. }) => {
            return Ok(Checked::Bad(format!("damaged: {detail}")))
        }
        Err(e) => return Err(e),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(SEGMENT_QUEUE);
    let worker = tokio::task::spawn_blocking(move || {
        let input = backup::ChannelReader {
            rx,
            cur: Bytes::new(),
        };
        let mut sink = CheckSink {
            check: segment::SegmentCheck::new(params, start, partial),
            raw: 0,
        };
        if let Err(e) = crate::archive::compress::decompress_stream(input, &mut sink, compressed) {
            return Checked::Bad(format!("damaged: does not decompress: {e}"));
        }
        let raw = sink.raw;
        match sink.check.finish(history.as_ref(), branch) {
            Ok(s) => Checked::Good(s, raw),
            Err(e) => Checked::Bad(format!("damaged: {e}")),
        }
    });
    let stored_error = backup::pump(reader.as_mut(), tx, |_| {}).await?;
    let res = worker
        .await
        .map_err(|e| StoreError::io(format!("checking {key}"), std::io::Error::other(e)))?;
    if let Some(d) = stored_error {
        return Ok(Checked::Bad(format!("damaged: {d}")));
    }
    Ok(res)
}

/// Stored chunks queued for one segment's checker at most.
const SEGMENT_QUEUE: usize = 1;

/// The decompressed bytes of a segment, into its check.
struct CheckSink {
    check: segment::SegmentCheck,
    raw: u64,
}

impl std::io::Write for CheckSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.raw += buf.len() as u64;
        self.check.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::timeline::tl;

    #[test]
    fn path_owner_follows_the_history() {
        let seg = SegmentSize::new(1 << 24).unwrap();
        let h = TimelineHistory::parse(b"1\t0/5000100\tno recovery target specified\n").unwrap();
        let p = Path {
            tli: tl(2),
            history: Some(&h),
            seg,
        };
        assert_eq!(p.owner(4), tl(1));
        assert_eq!(p.owner(5), tl(2));
        assert_eq!(p.begin(), (5, Some((tl(1), Lsn(0x5000100)))));
        // A switch at a segment boundary: the child's first segment starts there.
        let h = TimelineHistory::parse(b"1\t0/6000000\tx\n").unwrap();
        let p = Path {
            tli: tl(2),
            history: Some(&h),
            seg,
        };
        assert_eq!(p.owner(5), tl(1));
        assert_eq!(p.owner(6), tl(2));
    }
}
