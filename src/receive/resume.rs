//! Where to resume streaming, from what the archive and the spool hold. Pure logic: a function
//! of (archive listing, verified spool scan, slot / server position), unit- and property-tested.
//!
//! Like pg_receivewal (FindStreamingStart), the archive gives a start: after its newest complete
//! segment, or at its newest `.partial` (re-streamed whole). Unlike pg_receivewal, the spool is
//! considered too, but only what *continues* that start:
//!
//! - ready (complete) spool segments form a chain from the base (the archive's start, or with an
//!   empty archive the slot's restart segment, else the server's position): N, N+1, ... with
//!   non-decreasing timelines. The chain is queued for the archiver and the stream starts after it.
//! - a spool partial at the chain's end is where streaming resumes (re-streamed in place).
//! - ready segments before the base that the archive lacks fill holes (queued again).
//! - a partial of an older timeline at or before the start (a crash during a switch) is archived
//!   as that timeline's finished `.partial`.
//! - everything else (a stray, foreign or damaged file, a segment beyond a gap) is set aside:
//!   **a spool file that does not continue the archive is never a resume point**. Jumping ahead
//!   to it would leave a hole in the archive that nothing reports.
//!
//! The caller has already checked every spool file against this cluster (system identifier,
//! page addresses, record CRCs); files that failed are passed as `rejected` and set aside too.

use crate::wal::SegmentId;

/// What the archive, spool and server say, as found on startup.
#[derive(Debug, Clone, Default)]
pub struct ResumeInput {
    /// Complete segments in the archive.
    pub archived: Vec<SegmentId>,
    /// `.partial` objects in the archive (pieces of a timeline's end, or snapshots).
    pub archived_partials: Vec<SegmentId>,
    /// Ready spool segments that verified whole.
    pub ready: Vec<SegmentId>,
    /// Spool partials whose bytes verified (possibly a torn tail).
    pub partials: Vec<SegmentId>,
    /// Where to start when the archive is empty: the slot's restart segment, else the server's
    /// current segment.
    pub fallback: SegmentId,
}

/// Why a spool file is set aside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetAside {
    /// Beyond a gap, or on a timeline that does not follow the chain.
    DoesNotContinue,
}

impl SetAside {
    pub fn describe(self) -> &'static str {
        match self {
            SetAside::DoesNotContinue => {
                "it does not continue the archive (a gap before it, or another timeline)"
            }
        }
    }
}

/// The decision.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ResumePlan {
    /// The first segment to stream (a segment start on its timeline).
    pub start: SegmentId,
    /// Where the start came from: the archive (true) or the slot/server (false).
    pub from_archive: bool,
    /// Ready segments to archive again, in order.
    pub requeue: Vec<SegmentId>,
    /// The spool partial re-streamed in place (== start), if any.
    pub resume_partial: Option<SegmentId>,
    /// Partials of an older timeline, finished before a switch: archive as `.partial`.
    pub finished_partials: Vec<SegmentId>,
    /// Files to delete: already archived, or superseded by a complete segment.
    pub remove_ready: Vec<SegmentId>,
    pub remove_partial: Vec<SegmentId>,
    /// Files to move out of the way (never trusted, never deleted).
    pub set_aside_ready: Vec<(SegmentId, SetAside)>,
    pub set_aside_partial: Vec<(SegmentId, SetAside)>,
}

/// The start the archive alone gives: after the newest complete segment, or at the newest
/// partial; the highest segment number wins, ties go to the higher timeline.
pub fn archive_start(archived: &[SegmentId], partials: &[SegmentId]) -> Option<SegmentId> {
    archived
        .iter()
        .map(|id| id.next())
        .chain(partials.iter().copied())
        .max_by_key(|s| (s.segno, s.timeline))
}

/// How far below the archive's end a missing segment counts as a hole to fill: the archiver
/// stores up to 4 segments at once, so a crash can leave the newest present while an older one's
/// upload never finished (and a power loss can take the spool copy of it). Further down, a
/// missing segment is history (expired, or a gap the operator knows of), not something this
/// server can still send.
pub const HOLE_WINDOW: u64 = 8;

/// The lowest segment missing just below the archive's end (within [`HOLE_WINDOW`]) that no
/// ready spool file fills: streaming must restart there, or the flush position would pass WAL
/// that exists nowhere but on the server. Its timeline is that of the next archived segment.
fn first_hole(input: &ResumeInput, ready: &[SegmentId], end: SegmentId) -> Option<SegmentId> {
    let first = input.archived.iter().map(|id| id.segno).min()?;
    let lo = first.max(end.segno.saturating_sub(HOLE_WINDOW));
    (lo..end.segno).find_map(|segno| {
        // A ready file fills it if plan() will queue it (the same rule as there).
        let filled = ready
            .iter()
            .any(|id| id.segno == segno && id.timeline <= end.timeline);
        if input.archived.iter().any(|id| id.segno == segno) || filled {
            return None;
        }
        let tli = input
            .archived
            .iter()
            .filter(|id| id.segno > segno)
            .min_by_key(|id| (id.segno, id.timeline))
            .map_or(end.timeline, |id| id.timeline);
        Some(SegmentId::new(tli, segno))
    })
}

/// Plans the resume (see the module docs).
pub fn plan(input: &ResumeInput) -> ResumePlan {
    let archived = |id: SegmentId| input.archived.contains(&id);
    let from_archive = archive_start(&input.archived, &input.archived_partials);
    let mut ready = input.ready.clone();
    ready.sort_by_key(|id| (id.segno, id.timeline));
    ready.dedup();
    let base = match from_archive {
        Some(end) => first_hole(input, &ready, end).unwrap_or(end),
        None => input.fallback,
    };

    let mut plan = ResumePlan {
        from_archive: from_archive.is_some(),
        ..Default::default()
    };

    // The chain of ready segments that continues the base.
    let mut next = base;
    let mut in_chain = Vec::new();
    for &id in &ready {
        if id.segno == next.segno && id.timeline >= next.timeline && !archived(id) {
            in_chain.push(id);
            next = id.next();
        }
    }
    let start = next;
    // Holes before the base are filled by ready files up to the archive's newest timeline.
    let newest_tli = from_archive.map_or(base.timeline, |e| e.timeline.max(base.timeline));
    for &id in &ready {
        if in_chain.contains(&id) {
            plan.requeue.push(id);
        } else if archived(id) {
            plan.remove_ready.push(id);
        } else if id.segno < base.segno && id.timeline <= newest_tli {
            // A hole before the archive's end (say, a parallel upload that never finished).
            plan.requeue.push(id);
        } else {
            plan.set_aside_ready.push((id, SetAside::DoesNotContinue));
        }
    }
    plan.requeue.sort_by_key(|id| (id.segno, id.timeline));

    let mut partials = input.partials.clone();
    partials.sort();
    partials.dedup();
    for &id in &partials {
        let superseded = archived(id) || ready.contains(&id);
        if id == start && !superseded {
            plan.resume_partial = Some(id);
        } else if superseded {
            plan.remove_partial.push(id);
        } else if id.timeline < start.timeline && id.segno <= start.segno {
            plan.finished_partials.push(id);
        } else if id.segno < start.segno && id.timeline <= start.timeline {
            // An older piece of this timeline that the archive and chain already passed.
            plan.remove_partial.push(id);
        } else {
            plan.set_aside_partial.push((id, SetAside::DoesNotContinue));
        }
    }
    plan.start = start;
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::timeline::tl;

    fn s(tli: u32, segno: u64) -> SegmentId {
        let tli = tl(tli);
        SegmentId::new(tli, segno)
    }

    fn input() -> ResumeInput {
        ResumeInput {
            fallback: s(1, 1),
            ..Default::default()
        }
    }

    #[test]
    fn complete_beats_partial_of_same_segment() {
        let p = plan(&ResumeInput {
            archived: vec![s(1, 5)],
            partials: vec![s(1, 5)],
            ..input()
        });
        assert_eq!(p.start, s(1, 6));
        assert_eq!(p.remove_partial, vec![s(1, 5)]);
    }

    #[test]
    fn partial_restreams_its_segment() {
        let p = plan(&ResumeInput {
            archived: vec![s(1, 4)],
            partials: vec![s(1, 5)],
            ..input()
        });
        assert_eq!(p.start, s(1, 5));
        assert_eq!(p.resume_partial, Some(s(1, 5)));
    }

    #[test]
    fn higher_timeline_wins_at_same_start() {
        // TL1 partial at 6 in the archive (end of TL1) vs TL2 complete 5: resume TL2 at 6.
        let p = plan(&ResumeInput {
            archived: vec![s(2, 5)],
            archived_partials: vec![s(1, 6)],
            ..input()
        });
        assert_eq!(p.start, s(2, 6));
        assert!(p.from_archive);
        let p = plan(&input());
        assert_eq!(p.start, s(1, 1));
        assert!(!p.from_archive);
    }

    #[test]
    fn spool_chain_requeues_and_cleans() {
        let p = plan(&ResumeInput {
            archived: vec![s(1, 2)],
            ready: vec![s(1, 2), s(1, 3), s(1, 4)],
            partials: vec![s(1, 5), s(1, 3)],
            ..input()
        });
        assert_eq!(p.start, s(1, 5));
        assert_eq!(p.requeue, vec![s(1, 3), s(1, 4)]);
        assert_eq!(p.remove_ready, vec![s(1, 2)]);
        assert_eq!(p.remove_partial, vec![s(1, 3)]);
        assert_eq!(p.resume_partial, Some(s(1, 5)));
        assert!(p.finished_partials.is_empty());
    }

    #[test]
    fn older_timeline_partial_is_archived_as_finished() {
        let p = plan(&ResumeInput {
            archived: vec![s(2, 6)],
            partials: vec![s(1, 7), s(2, 7)],
            ..input()
        });
        assert_eq!(p.start, s(2, 7));
        assert_eq!(p.finished_partials, vec![s(1, 7)]);
        assert_eq!(p.resume_partial, Some(s(2, 7)));
    }

    #[test]
    fn a_stray_partial_beyond_the_archive_is_never_a_resume_point() {
        // The defect: another cluster's (or a garbage) `…08.partial` in a shared spool made an
        // empty archive "resume" at 8 and skip 1-7.
        let p = plan(&ResumeInput {
            partials: vec![s(1, 8)],
            fallback: s(1, 1),
            ..Default::default()
        });
        assert_eq!(p.start, s(1, 1));
        assert_eq!(
            p.set_aside_partial,
            vec![(s(1, 8), SetAside::DoesNotContinue)]
        );
        let p = plan(&ResumeInput {
            archived: vec![s(1, 3)],
            ready: vec![s(1, 9)],
            partials: vec![s(1, 10)],
            ..input()
        });
        assert_eq!(p.start, s(1, 4));
        assert_eq!(
            p.set_aside_ready,
            vec![(s(1, 9), SetAside::DoesNotContinue)]
        );
        assert_eq!(
            p.set_aside_partial,
            vec![(s(1, 10), SetAside::DoesNotContinue)]
        );
    }

    #[test]
    fn a_hole_before_the_archive_end_is_filled() {
        let p = plan(&ResumeInput {
            archived: vec![s(1, 2), s(1, 4)],
            ready: vec![s(1, 3)],
            ..input()
        });
        assert_eq!(p.start, s(1, 5));
        assert_eq!(p.requeue, vec![s(1, 3)]);
    }

    #[test]
    fn an_unfilled_hole_below_the_end_is_streamed_again() {
        // 4 stored, 3's upload never finished and its spool copy was lost: start at 3.
        let p = plan(&ResumeInput {
            archived: vec![s(1, 1), s(1, 2), s(1, 4)],
            ready: vec![s(1, 6)],
            ..input()
        });
        assert_eq!(p.start, s(1, 3));
        assert_eq!(
            p.set_aside_ready,
            vec![(s(1, 6), SetAside::DoesNotContinue)]
        );
        // Far below the end, a missing segment is history.
        let mut archived: Vec<_> = (20..40).map(|n| s(1, n)).collect();
        archived.push(s(1, 1));
        let p = plan(&ResumeInput {
            archived,
            ..input()
        });
        assert_eq!(p.start, s(1, 40));
    }

    #[test]
    fn empty_archive_continues_from_the_slot() {
        let p = plan(&ResumeInput {
            ready: vec![s(1, 5), s(1, 6)],
            partials: vec![s(1, 7)],
            fallback: s(1, 5),
            ..Default::default()
        });
        assert_eq!(p.start, s(1, 7));
        assert_eq!(p.requeue, vec![s(1, 5), s(1, 6)]);
        assert_eq!(p.resume_partial, Some(s(1, 7)));
    }

    /// A tiny deterministic PRNG (xorshift) for the property tests.
    fn rng(seed: &mut u64) -> u64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    }

    #[test]
    fn random_states_never_jump_over_a_gap() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            let mut pick = |n: u64| rng(&mut seed) % n;
            let mut inp = ResumeInput {
                fallback: s(1 + pick(2) as u32, pick(12)),
                ..Default::default()
            };
            for _ in 0..pick(6) {
                inp.archived.push(s(1 + pick(2) as u32, pick(12)));
            }
            for _ in 0..pick(3) {
                inp.archived_partials.push(s(1 + pick(2) as u32, pick(12)));
            }
            for _ in 0..pick(6) {
                inp.ready.push(s(1 + pick(3) as u32, pick(14)));
            }
            for _ in 0..pick(4) {
                inp.partials.push(s(1 + pick(3) as u32, pick(14)));
            }
            let p = plan(&inp);
            // Never past a segment that is neither archived nor queued: from the archive's
            // first segment within the hole window (or the fallback) up to the start.
            let end = archive_start(&inp.archived, &inp.archived_partials);
            let lo = match (end, inp.archived.iter().map(|id| id.segno).min()) {
                (Some(e), Some(first)) => first.max(e.segno.saturating_sub(HOLE_WINDOW)),
                (Some(e), None) => e.segno,
                (None, _) => inp.fallback.segno,
            };
            for segno in lo..p.start.segno {
                let held = inp.archived.iter().any(|id| id.segno == segno)
                    || p.requeue.iter().any(|id| id.segno == segno);
                let before_partial_end = end.is_some_and(|e| segno < e.segno)
                    && inp.archived_partials.iter().any(|id| id.segno >= segno)
                    && !inp.archived.iter().any(|id| id.segno < segno);
                assert!(
                    held || before_partial_end,
                    "start {:?} passes segment {segno}, neither archived nor queued: {inp:?} -> {p:?}",
                    p.start
                );
            }
            // Every spool file is accounted for exactly once.
            let n_ready = {
                let mut r = inp.ready.clone();
                r.sort();
                r.dedup();
                r.len()
            };
            assert_eq!(
                p.requeue.len() + p.remove_ready.len() + p.set_aside_ready.len(),
                n_ready,
                "{inp:?} -> {p:?}"
            );
            let n_partial = {
                let mut r = inp.partials.clone();
                r.sort();
                r.dedup();
                r.len()
            };
            assert_eq!(
                usize::from(p.resume_partial.is_some())
                    + p.finished_partials.len()
                    + p.remove_partial.len()
                    + p.set_aside_partial.len(),
                n_partial,
                "{inp:?} -> {p:?}"
            );
            // The resume partial is the start itself.
            if let Some(rp) = p.resume_partial {
                assert_eq!(rp, p.start);
            }
            // Nothing archived is queued again.
            assert!(p.requeue.iter().all(|id| !inp.archived.contains(id)));
        }
    }
}
