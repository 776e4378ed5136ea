//! The archive's WAL index: which segments, `.partial` segments and timeline history files
//! the archive's `wal/` listing holds, keyed by (timeline, segment number). Built from a
//! listing ([`WalIndex::from_objects`]); restore planning (`restore::plan`) and `walagent
//! backup` (checking that a backup's WAL is archived) read it.

use std::collections::{BTreeMap, BTreeSet};

use super::layout::{parse_wal_key, WalObject};
use super::ObjectInfo;
use crate::wal::{Lsn, SegmentId, SegmentSize, Timeline, TimelineHistory};

/// What the archive's `wal/` listing holds.
#[derive(Debug, Clone)]
pub struct WalIndex {
    seg_size: SegmentSize,
    /// Complete segments as (timeline, segno).
    complete: BTreeSet<(Timeline, u64)>,
    /// `.partial` segments as (timeline, segno).
    partial: BTreeSet<(Timeline, u64)>,
    /// Timelines whose history file is in the listing.
    history_files: BTreeSet<Timeline>,
    /// Parsed history files, added by the caller.
    histories: BTreeMap<Timeline, TimelineHistory>,
    /// What scanned `.partial` segments hold, added by the caller.
    partial_content: BTreeMap<(Timeline, u64), PartialContent>,
}

/// What a `.partial` segment holds, known from scanning it (`wal::xact::WalScanner::
/// scan_partial`; with the segment before it when no record completes in the partial itself).
/// A `.partial` is the end of what the archive has on its timeline: replay from the archive
/// cannot go past `end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartialContent {
    /// Start of the last complete record on the way to the partial's end (it may have begun
    /// in an earlier segment); `None` when not known. A target LSN is reached only at a record
    /// starting at or after it.
    pub last_record: Option<Lsn>,
    /// Just past that record: where the archived WAL of the timeline ends. When nothing in the
    /// partial is known to complete, its start.
    pub end: Lsn,
}

impl WalIndex {
    pub fn new(seg_size: SegmentSize) -> Self {
        WalIndex {
            seg_size,
            complete: BTreeSet::new(),
            partial: BTreeSet::new(),
            history_files: BTreeSet::new(),
            histories: BTreeMap::new(),
            partial_content: BTreeMap::new(),
        }
    }

    /// From a listing of the archive (keys under `wal/`; others are ignored, as are keys
    /// [`parse_wal_key`] does not recognise). Load the history files [`Self::histories_to_load`]
    /// names and pass them to [`Self::add_history`] before planning.
    pub fn from_objects(objects: &[ObjectInfo], seg_size: SegmentSize) -> Self {
        let mut index = WalIndex::new(seg_size);
        for o in objects {
            match parse_wal_key(&o.key, seg_size) {
                Some(WalObject::Segment { id, partial, .. }) => index.add_segment(id, partial),
                Some(WalObject::History(tli)) => {
                    index.history_files.insert(tli);
                }
                None => {}
            }
        }
        index
    }

    pub fn add_segment(&mut self, id: SegmentId, partial: bool) {
        let set = if partial {
            &mut self.partial
        } else {
            &mut self.complete
        };
        set.insert((id.timeline, id.segno));
    }

    /// Adds timeline `tli`'s parsed history file (and counts the file as present).
    pub fn add_history(&mut self, tli: Timeline, history: TimelineHistory) {
        self.history_files.insert(tli);
        self.histories.insert(tli, history);
    }

    pub fn segment_size(&self) -> SegmentSize {
        self.seg_size
    }

    pub fn has_segment(&self, id: SegmentId) -> bool {
        self.complete.contains(&(id.timeline, id.segno))
    }

    pub fn has_partial(&self, id: SegmentId) -> bool {
        self.partial.contains(&(id.timeline, id.segno))
    }

    /// Timelines whose history file is in the archive.
    pub fn history_files(&self) -> impl Iterator<Item = Timeline> + '_ {
        self.history_files.iter().copied()
    }

    /// History files listed but not yet given to [`Self::add_history`].
    pub fn histories_to_load(&self) -> Vec<Timeline> {
        self.history_files
            .iter()
            .copied()
            .filter(|t| !self.histories.contains_key(t))
            .collect()
    }

    /// Whether timeline `tli`'s history file is in the listing.
    pub fn has_history_file(&self, tli: Timeline) -> bool {
        self.history_files.contains(&tli)
    }

    pub fn history(&self, tli: Timeline) -> Option<&TimelineHistory> {
        self.histories.get(&tli)
    }

    /// Records what the `.partial` of `id` holds. Planning then checks targets and consistency
    /// points against its real end instead of the segment's nominal end.
    pub fn set_partial_content(&mut self, id: SegmentId, content: PartialContent) {
        self.partial_content
            .insert((id.timeline, id.segno), content);
    }

    pub fn partial_content(&self, id: SegmentId) -> Option<PartialContent> {
        self.partial_content.get(&(id.timeline, id.segno)).copied()
    }

    /// Every timeline with a segment, a partial segment or a history file.
    pub fn timelines(&self) -> BTreeSet<Timeline> {
        let mut t: BTreeSet<Timeline> = self.history_files.clone();
        t.extend(self.complete.iter().map(|&(tli, _)| tli));
        t.extend(self.partial.iter().map(|&(tli, _)| tli));
        t
    }

    /// Whether any segment (complete or partial) of `tli` has a number of `segno` or more.
    pub fn any_segment_from(&self, tli: Timeline, segno: u64) -> bool {
        self.complete
            .range((tli, segno)..=(tli, u64::MAX))
            .next()
            .is_some()
            || self
                .partial
                .range((tli, segno)..=(tli, u64::MAX))
                .next()
                .is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::history_file_name;
    use crate::wal::timeline::tl;

    const S16: SegmentSize = SegmentSize::DEFAULT;

    fn obj(key: String) -> ObjectInfo {
        ObjectInfo {
            key,
            size: 1,
            etag: None,
        }
    }

    #[test]
    fn from_a_listing_with_foreign_and_temp_keys() {
        let seg = |tli, segno| SegmentId::new(tli, segno).file_name(S16);
        let objs = vec![
            obj("walagent.json".into()),
            obj("backups/X/backup.json".into()),
            obj(format!("wal/{}.zst", seg(tl(1), 2))),
            obj(format!("wal/{}", seg(tl(1), 3))),
            obj(format!("wal/{}.partial.zst", seg(tl(1), 4))),
            obj(format!("wal/.{}.zst.tmp.1.0", seg(tl(1), 5))),
            obj(format!("wal/{}", history_file_name(tl(2)))),
        ];
        let mut ix = WalIndex::from_objects(&objs, S16);
        assert!(ix.has_segment(SegmentId::new(tl(1), 2)));
        assert!(ix.has_segment(SegmentId::new(tl(1), 3)));
        assert!(!ix.has_segment(SegmentId::new(tl(1), 4)));
        assert!(ix.has_partial(SegmentId::new(tl(1), 4)));
        assert!(
            !ix.has_segment(SegmentId::new(tl(1), 5)),
            "temp files are not segments"
        );
        assert!(ix.any_segment_from(tl(1), 4));
        assert!(!ix.any_segment_from(tl(1), 5));
        assert!(ix.has_history_file(tl(2)) && !ix.has_history_file(tl(1)));
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
        assert!(ix.history(tl(2)).is_some());
        let c = PartialContent {
            last_record: Some(Lsn(0x4000100)),
            end: Lsn(0x4000180),
        };
        ix.set_partial_content(SegmentId::new(tl(1), 4), c);
        assert_eq!(ix.partial_content(SegmentId::new(tl(1), 4)), Some(c));
        assert_eq!(ix.partial_content(SegmentId::new(tl(1), 3)), None);
    }
}
