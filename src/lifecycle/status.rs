//! `walagent status`: what the archive can restore. Loads the listings (read-only), builds the
//! pure [`Inventory`], learns what trailing `.partial` segments hold and the time of the newest
//! reachable commit by scanning only the last segments (`wal::xact`), and renders it for people
//! or as stable JSON (`proto-notes/status-and-expire.md`).

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::{json, Value};

use super::inventory::{pg_time, timeline_for_segment, BackupState, Inputs, Inventory, Problem};
use super::verify::backup::ChannelReader;
use crate::archive::catalog::{self, Listed};
use crate::archive::index::PartialContent;
use crate::archive::meta::MetaError;
use crate::archive::{compress, layout, ArchiveMeta, Store, StoreError};
use crate::wal::xact::{EventKind, ScanError, ScanFeed, SegmentScan, WalScanner};
use crate::wal::{history_file_name, Lsn, SegmentId, SegmentSize, Timeline, TimelineHistory};

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("{0}")]
    Meta(#[from] MetaError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{location} is not a walagent archive: it has no walagent.json but holds {object}")]
    NotAnArchive { location: String, object: String },
}

impl StatusError {
    pub fn hint(&self) -> Option<String> {
        match self {
            StatusError::Meta(e) => e.hint(),
            StatusError::Store(e) => e.hint(),
            StatusError::NotAnArchive { .. } => Some(
                "check --archive: it names the directory or s3:// prefix that `walagent stream` and `walagent backup` write to".into(),
            ),
        }
    }
}

/// What `status` found.
#[derive(Debug, Clone)]
pub struct Status {
    pub location: String,
    /// `None` for an empty archive (no walagent.json and no objects).
    pub meta: Option<ArchiveMeta>,
    pub inventory: Inventory,
    /// Where the latest reachable time came from: `commit` (a commit/abort record scanned) or
    /// `backup_stop` (no commit after the newest backup's consistency point was found).
    pub latest_time_source: Option<&'static str>,
    /// Objects read to learn the end of the WAL, each named once (for the curious, and to keep
    /// reads in check).
    pub scanned: Vec<String>,
}

impl Status {
    /// Exit code for the command: 0 when healthy, 1 when a problem limits recovery.
    pub fn exit_code(&self) -> u8 {
        if self.inventory.healthy() {
            0
        } else {
            1
        }
    }
}

/// The archive's listings, loaded once.
#[derive(Debug, Clone)]
pub struct Listings {
    pub meta: ArchiveMeta,
    pub backups: Vec<Listed>,
    pub wal_objects: Vec<crate::archive::ObjectInfo>,
    pub histories: BTreeMap<Timeline, TimelineHistory>,
}

impl Listings {
    /// The inventory, with what the scanned `.partial` segments hold.
    pub fn inventory(&self, partials: &BTreeMap<SegmentId, PartialContent>) -> Inventory {
        Inventory::build(&Inputs {
            seg_size: self.meta.wal_segment_size,
            system_identifier: self.meta.system_identifier,
            wal_objects: &self.wal_objects,
            histories: &self.histories,
            backups: &self.backups,
            partials,
        })
    }
}

/// Loads the archive's listings, history files and backup.json files (read-only): `None` for an
/// empty archive; an error for one holding objects but no walagent.json.
pub async fn load(store: &dyn Store) -> Result<Option<Listings>, StatusError> {
    let Some(meta) = ArchiveMeta::load(store).await? else {
        let any = store.list("").await?;
        // A local archive's own lock and spool (a stream that never got as far as writing
        // walagent.json) do not make it foreign.
        let foreign = any
            .iter()
            .map(|o| o.key.as_str())
            .filter(|k| *k != crate::archive::lock::LOCK_FILE && !k.starts_with("spool/"));
        return match foreign.min() {
            None => Ok(None),
            Some(k) => Err(StatusError::NotAnArchive {
                location: store.location(),
                object: k.to_string(),
            }),
        };
    };
    let backups = catalog::list(store).await?;
    let wal_objects = store.list(layout::WAL_PREFIX).await?;
    let size = meta.wal_segment_size;
    let mut histories = BTreeMap::new();
    for o in &wal_objects {
        if let Some(layout::WalObject::History(t)) = layout::parse_wal_key(&o.key, size) {
            if let Some(raw) = store.get_bytes(&o.key).await? {
                if let Ok(h) = TimelineHistory::parse(&raw) {
                    if h.check_child(t).is_ok() {
                        histories.insert(t, h);
                    }
                }
            }
        }
    }
    Ok(Some(Listings {
        meta,
        backups,
        wal_objects,
        histories,
    }))
}

/// How many segments status reads back from the end of the WAL to find the newest commit (an
/// idle server with `archive_timeout` fills many segments without one).
pub const MAX_TIME_SCAN_SEGMENTS: u64 = 64;

/// Reads and scans archived WAL objects for status.
struct Scanner<'a> {
    store: &'a dyn Store,
    size: SegmentSize,
    keys: BTreeMap<(SegmentId, bool), String>,
    system_identifier: u64,
    scanned: Vec<String>,
    foreign: Vec<Problem>,
    /// The stored bytes of the last objects read, when small (a partial is read for its end,
    /// then again for the time); larger ones are streamed from the store again.
    cache: Vec<(String, Arc<Vec<Bytes>>)>,
}

/// Stored objects up to this size are kept for a second scan ([`Scanner::cache`]).
const CACHE_MAX: usize = 1 << 20;
/// Stored chunks queued for the scanning thread at most.
const SCAN_QUEUE: usize = 1;

/// The decompressed bytes of a segment, into its scan.
struct FeedSink<'a>(&'a mut ScanFeed);

impl std::io::Write for FeedSink<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.feed(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Scanner<'_> {
    /// Streams the object `key` through zstd (`.zst` keys) into `sc`'s scan of the segment at
    /// `start`, a few chunks at a time: `None` when the object is absent; an unreadable object
    /// (stored checksum, zstd) is [`StoreError::Corrupt`].
    async fn read_scan(
        &mut self,
        sc: &mut WalScanner,
        key: &str,
        start: Lsn,
        partial: bool,
    ) -> Result<Option<Result<SegmentScan, ScanError>>, StoreError> {
        let cached = self
            .cache
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, c)| c.clone());
        let mut reader = match cached {
            Some(_) => None,
            None => match self.store.open_reader(key).await? {
                Some(r) => Some(r),
                None => return Ok(None),
            },
        };
        if !self.scanned.iter().any(|k| k == key) {
            self.scanned.push(key.to_string());
        }
        let mut feed = match sc.begin_feed(start) {
            Ok(f) => f,
            Err(e) => return Ok(Some(Err(e))),
        };
        let compressed = key.ends_with(layout::ZSTD_SUFFIX);
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(SCAN_QUEUE);
        let worker = tokio::task::spawn_blocking(move || {
            let input = ChannelReader {
                rx,
                cur: Bytes::new(),
            };
            let r = compress::decompress_stream(input, FeedSink(&mut feed), compressed);
            (feed, r)
        });
        let mut kept: Option<Vec<Bytes>> = Some(Vec::new());
        let mut kept_len = 0usize;
        let mut stored_error = None;
        // A send fails once the scan stopped (the receiver is gone); a stored object is still
        // read to its end for its stored checksum.
        match (&mut reader, &cached) {
            (_, Some(chunks)) => {
                for c in chunks.iter() {
                    if tx.send(c.clone()).await.is_err() {
                        break;
                    }
                }
                kept = None;
            }
            (Some(r), None) => loop {
                match r.next_chunk().await {
                    Ok(Some(c)) => {
                        kept_len += c.len();
                        if kept_len > CACHE_MAX {
                            kept = None;
                        }
                        if let Some(k) = &mut kept {
                            k.push(c.clone());
                        }
                        let _ = tx.send(c).await;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        stored_error = Some(e);
                        break;
                    }
                }
            },
            (None, None) => {}
        }
        drop(tx);
        let (feed, r) = worker
            .await
            .map_err(|e| StoreError::io(format!("reading {key}"), std::io::Error::other(e)))?;
        if let Some(e) = stored_error {
            return Err(e);
        }
        if let Err(e) = r {
            return Err(StoreError::Corrupt {
                key: key.to_string(),
                detail: e.to_string(),
            });
        }
        if let Some(k) = kept {
            if self.cache.len() >= 2 {
                self.cache.remove(0);
            }
            self.cache.push((key.to_string(), Arc::new(k)));
        }
        Ok(Some(sc.finish_feed(feed, partial)))
    }

    /// Scans `id` with `sc`; `None` when the object is gone or unreadable (then nothing is
    /// learned from it).
    async fn scan(
        &mut self,
        sc: &mut WalScanner,
        id: SegmentId,
        partial: bool,
    ) -> Result<Option<SegmentScan>, StatusError> {
        let Some(key) = self.keys.get(&(id, partial)).cloned() else {
            return Ok(None);
        };
        let start = id.start_lsn(self.size);
        let r = match self.read_scan(sc, &key, start, partial).await {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(None),
            Err(StoreError::Corrupt { key, detail }) => {
                self.foreign.push(Problem {
                    object: key,
                    problem: format!("unreadable: {detail}"),
                    limits_recovery: true,
                });
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        match r {
            Ok(s) => {
                if let Some(sys) = s.system_identifier {
                    if sys != self.system_identifier {
                        self.foreign.push(Problem {
                            object: key,
                            problem: format!(
                                "holds WAL of system {sys}, but the archive is system {}",
                                self.system_identifier
                            ),
                            limits_recovery: true,
                        });
                        return Ok(None);
                    }
                }
                Ok(Some(s))
            }
            Err(e) => {
                self.foreign.push(Problem {
                    object: key,
                    problem: format!("not a WAL segment: {e}"),
                    limits_recovery: true,
                });
                Ok(None)
            }
        }
    }

    /// What the `.partial` of `id` holds (with its predecessor when nothing completes in it).
    async fn partial_content(
        &mut self,
        id: SegmentId,
        has_prev: bool,
    ) -> Result<Option<PartialContent>, StatusError> {
        let Some(alone) = self.scan(&mut WalScanner::new(self.size), id, true).await? else {
            return Ok(None);
        };
        if let (Some(r), Some(e)) = (alone.last_record, alone.last_record_end) {
            return Ok(Some(PartialContent {
                last_record: Some(r),
                end: e,
            }));
        }
        let start = id.start_lsn(self.size);
        let prev = SegmentId::new(id.timeline, id.segno.wrapping_sub(1));
        if !has_prev || id.segno == 0 {
            return Ok(Some(PartialContent {
                last_record: None,
                end: start,
            }));
        }
        let mut sc = WalScanner::new(self.size);
        let p0 = self.scan(&mut sc, prev, false).await?;
        let p1 = self.scan(&mut sc, id, true).await?;
        let last = p1
            .as_ref()
            .and_then(|p| p.last_record)
            .or(p0.as_ref().and_then(|p| p.last_record));
        let end = p1
            .as_ref()
            .and_then(|p| p.last_record_end)
            .or(p0.as_ref().and_then(|p| p.last_record_end))
            .unwrap_or(start);
        Ok(Some(PartialContent {
            last_record: last,
            end: end.max(start),
        }))
    }
}

/// Loads the archive and works out what it can restore. Reads only listings, history files,
/// backup.json files, each timeline's trailing `.partial` (and the segment before it when no
/// record completes in it) and, from the end of the newest backup's WAL backwards, the
/// segments up to the first one holding a commit or abort.
pub async fn status(store: &dyn Store) -> Result<Status, StatusError> {
    let location = store.location();
    let Some(listings) = load(store).await? else {
        return Ok(Status {
            location,
            meta: None,
            inventory: Inventory::build(&Inputs {
                seg_size: SegmentSize::DEFAULT,
                system_identifier: 0,
                wal_objects: &[],
                histories: &BTreeMap::new(),
                backups: &[],
                partials: &BTreeMap::new(),
            }),
            latest_time_source: None,
            scanned: Vec::new(),
        });
    };
    let inv = listings.inventory(&BTreeMap::new());
    let meta = listings.meta.clone();
    let size = meta.wal_segment_size;
    let mut sc = Scanner {
        store,
        size,
        keys: inv
            .wal_files
            .iter()
            .map(|f| ((f.id, f.partial), f.key.clone()))
            .collect(),
        system_identifier: meta.system_identifier,
        scanned: Vec::new(),
        foreign: Vec::new(),
        cache: Vec::new(),
    };
    let mut partials = BTreeMap::new();
    for id in inv.trailing_partials() {
        let has_prev = id.segno > 0
            && sc
                .keys
                .contains_key(&(SegmentId::new(id.timeline, id.segno - 1), false));
        if let Some(c) = sc.partial_content(id, has_prev).await? {
            partials.insert(id, c);
        }
    }
    let mut inv = if partials.is_empty() {
        inv
    } else {
        listings.inventory(&partials)
    };
    // The time of the latest point: the newest commit or abort on the newest usable backup's
    // way, read backwards from its end.
    let mut source = None;
    if let Some(w) = inv.window.clone() {
        let reach = inv
            .backups
            .iter()
            .find(|b| b.id == w.latest.backup)
            .and_then(|b| match (&b.reach, &b.info) {
                (Some(Ok(r)), Some(i)) => Some((r.clone(), i.clone())),
                _ => None,
            });
        if let Some((r, info)) = reach {
            let first = r.start_segment.segno;
            let last = w.latest.segment.segno;
            let id_at = |s: u64| SegmentId::new(timeline_for_segment(&r.path, s, size), s);
            let mut hi = last;
            let mut found: Option<(Lsn, i64)>;
            let mut gave_up = false;
            let mut end_lsn: Option<Lsn> = None;
            loop {
                let mut scanner = WalScanner::new(size);
                let mut events = Vec::new();
                if hi > first {
                    if let Some(s) = sc.scan(&mut scanner, id_at(hi - 1), false).await? {
                        events.extend(s.events);
                    }
                }
                let partial = hi == last && w.latest.partial;
                if let Some(s) = sc.scan(&mut scanner, id_at(hi), partial).await? {
                    if hi == last {
                        end_lsn = s.last_record_end;
                    }
                    events.extend(s.events);
                }
                found = events
                    .iter()
                    .filter(|e| {
                        matches!(e.kind, EventKind::Commit { .. } | EventKind::Abort { .. })
                    })
                    .filter(|e| e.lsn >= info.end_lsn)
                    .max_by_key(|e| e.lsn)
                    .map(|e| (e.lsn, e.kind.time_us()));
                if found.is_some() || hi < first + 2 {
                    break;
                }
                if last - hi + 2 >= MAX_TIME_SCAN_SEGMENTS {
                    gave_up = true;
                    break;
                }
                hi -= 2;
            }
            let latest = inv.window.as_mut().map(|w| &mut w.latest);
            if let Some(l) = latest {
                if let Some(e) = end_lsn {
                    if !l.partial {
                        l.lsn = e;
                    }
                }
                match found.and_then(|(_, us)| pg_time(us)) {
                    Some(t) => {
                        l.time = Some(t);
                        source = Some("commit");
                    }
                    // No commit in the last MAX_TIME_SCAN_SEGMENTS segments: unknown.
                    None if gave_up => {
                        l.time = None;
                        source = Some("unknown");
                    }
                    None => {
                        l.time = Some(info.stop_time.clone());
                        source = Some("backup_stop");
                    }
                }
            }
        }
    }
    inv.problems.append(&mut sc.foreign);
    Ok(Status {
        location,
        meta: Some(meta),
        inventory: inv,
        latest_time_source: source,
        scanned: sc.scanned,
    })
}

fn seg_name(t: Timeline, s: u64, size: SegmentSize) -> String {
    SegmentId::new(t, s).file_name(size)
}

/// The stable JSON (`proto-notes/status-and-expire.md`).
pub fn to_json(st: &Status) -> Value {
    let inv = &st.inventory;
    let size = inv.seg_size;
    let timelines: Vec<Value> = inv
        .timelines
        .iter()
        .map(|t| {
            let tl = t.timeline;
            json!({
                "timeline": tl,
                "parent": t.parent.map(|p| p.0),
                "begins_at": t.parent.map(|p| p.1),
                "switched_at": t.switched_at,
                "history_file": t.history_file.then(|| layout::history_key(tl)),
                "first_segment": t.first_segment.or(t.trailing_partial).map(|s| seg_name(tl, s, size)),
                "last_segment": t.last_any().map(|s| seg_name(tl, s, size)),
                "begin_lsn": t.begin_lsn(size),
                "end_lsn": t.end_lsn(size),
                "segments": t.segments,
                "bytes": t.bytes,
                "gaps": t.gaps.iter().map(|g| json!({
                    "from": seg_name(tl, g.from, size),
                    "to": seg_name(tl, g.to, size),
                    "segments": g.to - g.from + 1,
                })).collect::<Vec<_>>(),
                "partial": t.trailing_partial.map(|p| json!({
                    "segment": seg_name(tl, p, size),
                    "end_lsn": t.partial_content.map(|c| c.end),
                })),
                "stray_partials": t.stray_partials.iter().map(|s| seg_name(tl, *s, size)).collect::<Vec<_>>(),
            })
        })
        .collect();
    let history: Vec<Value> = inv
        .histories
        .iter()
        .map(|(t, h)| {
            json!({
                "timeline": t,
                "file": history_file_name(*t),
                "entries": h.entries.iter().map(|e| json!({
                    "parent": e.parent_timeline,
                    "switch_lsn": e.switch_lsn,
                    "reason": e.reason,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let backups: Vec<Value> = inv
        .backups
        .iter()
        .map(|b| {
            let state = match b.state {
                BackupState::Complete => "complete",
                BackupState::Incomplete => "incomplete",
                BackupState::Unreadable => "unreadable",
            };
            let mut v = json!({
                "id": b.id,
                "state": state,
                "timeline": Value::Null,
                "start_lsn": Value::Null,
                "stop_lsn": Value::Null,
                "start_time": Value::Null,
                "stop_time": Value::Null,
                "size_bytes": b.bytes,
                "data_bytes": Value::Null,
                "objects": b.objects,
                "recovery": Value::Null,
            });
            if let Some(i) = &b.info {
                v["timeline"] = json!(i.timeline);
                v["end_timeline"] = json!(i.end_timeline);
                v["start_lsn"] = json!(i.start_lsn);
                v["stop_lsn"] = json!(i.end_lsn);
                v["start_time"] = json!(i.start_time);
                v["stop_time"] = json!(i.stop_time);
                v["data_bytes"] = json!(i.data_bytes);
                v["wal_start_segment"] = json!(i.wal_start_segment);
                v["wal_end_segment"] = json!(i.wal_end_segment);
            }
            v["recovery"] = match &b.reach {
                None => Value::Null,
                Some(Err(why)) => json!({"usable": false, "reason": why}),
                Some(Ok(r)) => json!({
                    "usable": r.consistent,
                    "timelines": r.path.iter().map(|s| s.timeline).collect::<Vec<_>>(),
                    "needs_from": r.start_segment.file_name(size),
                    "reaches_segment": r.end_segment.map(|s| s.file_name(size)),
                    "reaches_partial": r.ends_in_partial,
                    "reaches_lsn": r.end_lsn,
                    "cut_at": r.cut_at.map(|s| s.file_name(size)),
                    "reaches_newest": r.reaches_newest,
                }),
            };
            v
        })
        .collect();
    let point = |p: &super::inventory::Point, source: Option<&str>| {
        let mut v = json!({
            "lsn": p.lsn,
            "time": p.time,
            "backup": p.backup,
            "segment": p.segment.file_name(size),
            "partial": p.partial,
        });
        if let Some(s) = source {
            v["time_source"] = json!(s);
        }
        v
    };
    let recoverable = inv.window.as_ref().map(|w| {
        json!({
            "timeline": w.timeline,
            "earliest": point(&w.earliest, Some("backup_stop")),
            "latest": point(&w.latest, st.latest_time_source),
        })
    });
    let problems: Vec<Value> = inv
        .problems
        .iter()
        .map(|p| {
            json!({
                "object": p.object,
                "problem": p.problem,
                "limits_recovery": p.limits_recovery,
            })
        })
        .collect();
    json!({
        "archive": st.location,
        "system_identifier": st.meta.as_ref().map(|m| m.system_identifier.to_string()),
        "wal_segment_size": st.meta.as_ref().map(|m| m.wal_segment_size.bytes()),
        "target_timeline": inv.target_timeline,
        "newest_wal": inv.newest.map(|(s, p)| json!({
            "segment": s.file_name(size),
            "partial": p,
        })),
        "timelines": timelines,
        "history": history,
        "backups": backups,
        "recoverable": recoverable,
        "problems": problems,
        "healthy": inv.healthy(),
    })
}

/// `1.5 GiB`-style sizes.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS.get(u).unwrap_or(&"TiB"))
    }
}

/// Rows as left-aligned columns, two spaces apart, each line indented by two.
pub fn columns(rows: &[Vec<String>]) -> String {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..n)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::from("  ");
        for (c, cell) in r.iter().enumerate() {
            line.push_str(cell);
            if c + 1 < r.len() {
                let w = widths.get(c).copied().unwrap_or(0);
                line.push_str(&" ".repeat(w.saturating_sub(cell.chars().count()) + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Short, aligned text for people.
pub fn render(st: &Status) -> String {
    let inv = &st.inventory;
    let size = inv.seg_size;
    let mut out = String::new();
    match &st.meta {
        Some(m) => out.push_str(&format!(
            "archive {}: system {}, {} segments\n",
            st.location, m.system_identifier, m.wal_segment_size
        )),
        None => out.push_str(&format!("archive {}: empty\n", st.location)),
    }
    if !inv.timelines.is_empty() {
        out.push_str("\ntimelines\n");
        let mut rows = vec![vec![
            "TLI".to_string(),
            "FIRST SEGMENT".into(),
            "LAST SEGMENT".into(),
            "BEGIN".into(),
            "END".into(),
            "SEGMENTS".into(),
            "SIZE".into(),
            "NOTES".into(),
        ]];
        for t in &inv.timelines {
            let tl = t.timeline;
            let mut notes = Vec::new();
            if let Some((p, at)) = t.parent {
                notes.push(format!("from {p} at {at}"));
            }
            if let Some(at) = t.switched_at {
                notes.push(format!("left at {at}"));
            }
            if t.trailing_partial.is_some() {
                notes.push("ends in .partial".into());
            }
            for g in &t.gaps {
                notes.push(if g.from == g.to {
                    format!("gap {}", seg_name(tl, g.from, size))
                } else {
                    format!(
                        "gap {}..{}",
                        seg_name(tl, g.from, size),
                        seg_name(tl, g.to, size)
                    )
                });
            }
            let dash = || "-".to_string();
            rows.push(vec![
                tl.to_string(),
                t.first_segment
                    .or(t.trailing_partial)
                    .map_or_else(dash, |s| seg_name(tl, s, size)),
                t.last_any().map_or_else(dash, |s| {
                    let n = seg_name(tl, s, size);
                    if Some(s) == t.trailing_partial {
                        format!("{n}.partial")
                    } else {
                        n
                    }
                }),
                t.begin_lsn(size).map_or_else(dash, |l| l.to_string()),
                t.end_lsn(size).map_or_else(dash, |l| l.to_string()),
                t.segments.to_string(),
                human_bytes(t.bytes),
                notes.join(", "),
            ]);
        }
        out.push_str(&columns(&rows));
    }
    out.push_str("\nbackups\n");
    if inv.backups.is_empty() {
        out.push_str("  none\n");
    } else {
        let mut rows = vec![vec![
            "ID".to_string(),
            "STATE".into(),
            "TLI".into(),
            "START LSN".into(),
            "STOP LSN".into(),
            "STOP TIME (UTC)".into(),
            "SIZE".into(),
            "RECOVERY".into(),
        ]];
        for b in &inv.backups {
            let state = match b.state {
                BackupState::Complete => "complete",
                BackupState::Incomplete => "incomplete",
                BackupState::Unreadable => "unreadable",
            };
            let recovery = match &b.reach {
                None => "never used".to_string(),
                Some(Err(_)) => "not on the latest timeline".to_string(),
                Some(Ok(r)) if !r.consistent => "WAL missing before consistency".into(),
                Some(Ok(r)) if r.reaches_newest => "reaches the newest WAL".into(),
                Some(Ok(r)) => format!("up to {}", r.end_lsn),
            };
            let (tli, start, stop, time) = match &b.info {
                Some(i) => (
                    i.timeline.to_string(),
                    i.start_lsn.to_string(),
                    i.end_lsn.to_string(),
                    i.stop_time
                        .get(..19)
                        .unwrap_or(&i.stop_time)
                        .replace('T', " "),
                ),
                None => ("-".into(), "-".into(), "-".into(), "-".into()),
            };
            rows.push(vec![
                b.id.clone(),
                state.into(),
                tli,
                start,
                stop,
                time,
                human_bytes(b.bytes),
                recovery,
            ]);
        }
        out.push_str(&columns(&rows));
    }
    out.push('\n');
    match &inv.window {
        Some(w) => {
            let t = |p: &super::inventory::Point| {
                p.time
                    .as_deref()
                    .map_or_else(String::new, |s| format!(" ({})", s.replace('T', " ")))
            };
            out.push_str(&format!(
                "recoverable on timeline {}: {}{} .. {}{}\n",
                w.timeline,
                w.earliest.lsn,
                t(&w.earliest),
                w.latest.lsn,
                t(&w.latest)
            ));
        }
        None => out.push_str("recoverable: nothing\n"),
    }
    if !inv.problems.is_empty() {
        out.push_str("\nproblems\n");
        let rows: Vec<Vec<String>> = inv
            .problems
            .iter()
            .map(|p| {
                vec![
                    p.object.clone(),
                    if p.limits_recovery {
                        "error".into()
                    } else {
                        "warning".into()
                    },
                    p.problem.clone(),
                ]
            })
            .collect();
        out.push_str(&columns(&rows));
    }
    out.push_str(if inv.healthy() {
        "\nOK: the newest backup reaches the newest archived WAL\n"
    } else {
        "\nPROBLEM: recovery is limited (see above)\n"
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::catalog::{info_key, Listed};
    use crate::archive::{LocalStore, PutMode};
    use crate::lifecycle::inventory::tests::backup;
    use crate::wal::synth::WalBuilder;
    use bytes::Bytes;

    const MB: u64 = 1 << 20;
    const SYSID: u64 = 0x0123_4567_89AB_CDEF;
    const T0: i64 = 848_646_900_000_000;

    fn seg1m() -> SegmentSize {
        SegmentSize::new(MB).unwrap()
    }

    /// Segment 3 complete, segment 4 a `.partial` of `partial_len` bytes; a backup consistent
    /// at 0/300100; commits at T0 (before consistency), T0+1s (crossing into the partial) and
    /// T0+2s (in the partial). Returns the end of the last commit.
    async fn archive(partial_len: usize, meta_sys: u64) -> (tempfile::TempDir, LocalStore, Lsn) {
        let start = Lsn(3 * MB);
        let mut b = WalBuilder::new(SYSID, seg1m(), 1, start);
        b.push_commit(10, T0);
        b.fill_until(start.0 + MB - 16);
        b.push_commit(11, T0 + 1_000_000);
        b.push_commit(12, T0 + 2_000_000);
        let end = b.position();
        let bytes = b.into_bytes();
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        ArchiveMeta::new(meta_sys, seg1m(), 150000)
            .save(&store)
            .await
            .unwrap();
        let (s3, s4) = bytes.split_at(MB as usize);
        for (k, d) in [
            ("wal/000000010000000000000003", s3),
            (
                "wal/000000010000000000000004.partial",
                &s4[..partial_len.min(s4.len())],
            ),
        ] {
            store
                .put_bytes(k, Bytes::copy_from_slice(d), PutMode::Replace)
                .await
                .unwrap();
        }
        let mut info = backup(
            "20261122T101500Z",
            1,
            Lsn(3 * MB + 0x28),
            Lsn(3 * MB + 0x100),
            "2026-11-22T10:15:03Z",
        );
        info.wal_segment_size = MB;
        info.system_identifier = meta_sys.to_string();
        store
            .put_bytes(
                &info_key(&info.id),
                Bytes::from(info.to_json()),
                PutMode::Replace,
            )
            .await
            .unwrap();
        (dir, store, end)
    }

    #[tokio::test]
    async fn the_latest_point_comes_from_the_partial_and_its_last_commit() {
        let (_d, store, end) = archive(usize::MAX, SYSID).await;
        let st = status(&store).await.unwrap();
        assert_eq!(st.exit_code(), 0, "{:?}", st.inventory.problems);
        let w = st.inventory.window.clone().unwrap();
        assert!(w.latest.partial);
        assert_eq!(w.latest.lsn, end);
        assert_eq!(w.latest.time, pg_time(T0 + 2_000_000));
        assert_eq!(st.latest_time_source, Some("commit"));
        assert_eq!(w.earliest.time.as_deref(), Some("2026-11-22T10:15:03Z"));
        let t = &st.inventory.timelines[0];
        assert_eq!(t.end_lsn(seg1m()), Some(end));
        // Only the partial and the segment before it were read, each once.
        assert_eq!(
            st.scanned,
            vec![
                "wal/000000010000000000000004.partial",
                "wal/000000010000000000000003"
            ]
        );
        let j = to_json(&st);
        assert_eq!(j["recoverable"]["latest"]["lsn"], end.to_string());
        assert_eq!(j["timelines"][0]["partial"]["end_lsn"], end.to_string());
        assert_eq!(j["system_identifier"], SYSID.to_string());
        assert!(render(&st).contains("OK:"));
    }

    #[tokio::test]
    async fn a_partial_cut_before_the_last_commit() {
        // The partial holds only 80 bytes of segment 4: commit 11 ends there, 12 does not.
        let (_d, store, _) = archive(80, SYSID).await;
        let st = status(&store).await.unwrap();
        let w = st.inventory.window.clone().unwrap();
        assert_eq!(w.latest.time, pg_time(T0 + 1_000_000));
        assert!(w.latest.lsn.0 > 4 * MB && w.latest.lsn.0 <= 4 * MB + 80);
    }

    #[tokio::test]
    async fn wal_of_another_system_is_a_problem() {
        let (_d, store, _) = archive(usize::MAX, 42).await;
        let st = status(&store).await.unwrap();
        assert_eq!(st.exit_code(), 1);
        assert!(
            st.inventory
                .problems
                .iter()
                .any(|p| p.object.ends_with(".partial") && p.problem.contains("system")),
            "{:?}",
            st.inventory.problems
        );
    }

    #[tokio::test]
    async fn expire_on_it_keeps_the_only_backup() {
        let (_d, store, _) = archive(usize::MAX, SYSID).await;
        let r = crate::lifecycle::expire::expire(
            &store,
            crate::lifecycle::expire::RetentionPolicy::Full(1),
            false,
        )
        .await
        .unwrap();
        assert!(r.backups.is_empty() && r.wal_objects.is_empty(), "{r:?}");
        assert!(matches!(
            crate::archive::catalog::list(&store).await.unwrap()[..],
            [Listed::Complete(_)]
        ));
    }

    #[test]
    fn columns_align() {
        let t = columns(&[
            vec!["A".into(), "BB".into(), "C".into()],
            vec!["AAA".into(), "B".into(), "".into()],
        ]);
        assert_eq!(t, "  A    BB  C\n  AAA  B\n");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(10), "10 B");
    }
}
