//! Where to resume streaming, from what the archive and the spool hold. Pure logic.
//!
//! Like pg_receivewal (FindStreamingStart), each candidate file gives a start: a complete
//! segment N starts the stream at N+1, a partial segment N at N itself (re-streamed whole,
//! overwriting the partial in place). The highest start wins, ties broken by the higher
//! timeline. Unlike pg_receivewal, the spool is considered too: ready segments not yet archived
//! are queued again rather than streamed again. When nothing is found the caller falls back to
//! the slot's restart_lsn, then to the server's current position.

use crate::wal::SegmentId;

/// Where a candidate came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    ArchivedComplete,
    ArchivedPartial,
    SpoolReady,
    SpoolPartial,
}

/// The first segment to stream, on its timeline.
pub fn start_after(id: SegmentId, found: Found) -> SegmentId {
    match found {
        Found::ArchivedComplete | Found::SpoolReady => id.next(),
        Found::ArchivedPartial | Found::SpoolPartial => id,
    }
}

/// Picks the resume segment among candidates: highest segment number, then highest timeline.
pub fn choose_start(candidates: &[(SegmentId, Found)]) -> Option<SegmentId> {
    candidates
        .iter()
        .map(|&(id, found)| start_after(id, found))
        .max_by_key(|s| (s.segno, s.timeline))
}

/// What to do with the spool's files once the start is known.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SpoolPlan {
    /// Ready segments to archive again, in order.
    pub requeue: Vec<SegmentId>,
    /// Partials of an older timeline, finished before a switch: archive as `.partial`.
    pub finished_partials: Vec<SegmentId>,
    /// Files to delete: already archived, or superseded.
    pub remove_ready: Vec<SegmentId>,
    pub remove_partial: Vec<SegmentId>,
}

/// Sorts spool files against the chosen `start` and what is already archived.
pub fn plan_spool(
    start: SegmentId,
    ready: &[SegmentId],
    partials: &[SegmentId],
    archived: &dyn Fn(SegmentId) -> bool,
) -> SpoolPlan {
    let mut plan = SpoolPlan::default();
    for &id in ready {
        if archived(id) || id.segno >= start.segno {
            plan.remove_ready.push(id);
        } else {
            plan.requeue.push(id);
        }
    }
    for &id in partials {
        if id == start {
            continue; // re-streamed in place
        }
        let superseded = archived(id) || ready.contains(&id);
        if !superseded && id.timeline < start.timeline && id.segno <= start.segno {
            plan.finished_partials.push(id);
        } else {
            plan.remove_partial.push(id);
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(tli: u32, segno: u64) -> SegmentId {
        SegmentId::new(tli, segno)
    }

    #[test]
    fn complete_beats_partial_of_same_segment() {
        let c = [
            (s(1, 5), Found::SpoolPartial),
            (s(1, 5), Found::ArchivedComplete),
        ];
        assert_eq!(choose_start(&c), Some(s(1, 6)));
    }

    #[test]
    fn partial_restreams_its_segment() {
        let c = [
            (s(1, 4), Found::ArchivedComplete),
            (s(1, 5), Found::SpoolPartial),
        ];
        assert_eq!(choose_start(&c), Some(s(1, 5)));
    }

    #[test]
    fn higher_timeline_wins_at_same_start() {
        // TL1 partial at 6 (left before a switch) vs TL2 complete 5: resume TL2 at 6.
        let c = [
            (s(1, 6), Found::SpoolPartial),
            (s(2, 5), Found::ArchivedComplete),
        ];
        assert_eq!(choose_start(&c), Some(s(2, 6)));
        assert_eq!(choose_start(&[]), None);
    }

    #[test]
    fn spool_plan_requeues_and_cleans() {
        let archived = |id: SegmentId| id == s(1, 2);
        let plan = plan_spool(
            s(1, 5),
            &[s(1, 2), s(1, 3), s(1, 4)],
            &[s(1, 5), s(1, 3)],
            &archived,
        );
        assert_eq!(plan.requeue, vec![s(1, 3), s(1, 4)]);
        assert_eq!(plan.remove_ready, vec![s(1, 2)]);
        assert_eq!(plan.remove_partial, vec![s(1, 3)]);
        assert!(plan.finished_partials.is_empty());
    }

    #[test]
    fn older_timeline_partial_is_archived_as_finished() {
        let plan = plan_spool(s(2, 7), &[], &[s(1, 7), s(2, 7)], &|_| false);
        assert_eq!(plan.finished_partials, vec![s(1, 7)]);
        assert!(plan.remove_partial.is_empty());
    }
}
