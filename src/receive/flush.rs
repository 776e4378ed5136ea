//! The one rule for the flush position reported to the server. Pure, so it can be tested over
//! random histories.
//!
//! **Invariant: reported flush <= durable end**, where the durable end is the end of the WAL
//! prefix that is durable where the user asked:
//! - `--ack archived` (default): complete segments stored in the archive (a contiguous prefix,
//!   `archived_upto`, published by the archiver in submission order), then the newest `.partial`
//!   upload of the segment right after that prefix;
//! - `--ack fsync` / `--synchronous`: complete segments (fsynced before their rename), then the
//!   fsynced part of the current partial.
//!
//! The flush position gates what the server may recycle (PhysicalConfirmReceivedLocation), so any
//! over-report can lose WAL for good.

use crate::wal::{Lsn, SegmentId};

/// What the receiver knows about the segment being written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartialView {
    pub id: SegmentId,
    pub start: Lsn,
    /// End of the bytes written (not necessarily durable).
    pub written_end: Lsn,
    /// End of the bytes fsynced.
    pub synced_end: Lsn,
}

/// The flush position that is honest to report.
///
/// `completed_upto`: end of the last segment completed in this process (or the resume point).
/// `archived_upto`: the archiver's contiguous archived prefix. `snapshot`: the newest `.partial`
/// stored, its segment and end.
pub fn flush_position(
    local_ack: bool,
    completed_upto: Lsn,
    archived_upto: Lsn,
    snapshot: Option<(SegmentId, Lsn)>,
    partial: Option<PartialView>,
) -> Lsn {
    let prefix = if local_ack {
        completed_upto
    } else {
        archived_upto.min(completed_upto)
    };
    match partial {
        Some(p) if prefix >= p.start => {
            let tail = if local_ack {
                p.synced_end
            } else {
                match snapshot {
                    Some((id, end)) if id == p.id => end.min(p.written_end),
                    _ => prefix,
                }
            };
            tail.max(prefix)
        }
        _ => prefix,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::timeline::tl;
    use crate::wal::SegmentSize;

    fn rng(seed: &mut u64) -> u64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    }

    /// A model of one stream: segments complete in order, the archiver stores them in order
    /// (with lag), partial uploads and fsyncs happen at random. After every event the reported
    /// flush must not pass what the model says is durable.
    #[test]
    fn reported_flush_never_passes_the_durable_end() {
        let size = SegmentSize::new(1 << 20).unwrap();
        let seg = u64::from(size.bytes());
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for run in 0..2_000 {
            let local_ack = run % 2 == 1;
            let start_seg = rng(&mut seed) % 50;
            let start = Lsn(start_seg * seg);
            let mut written = start; // stream position
            let mut completed_upto = start;
            let mut archived_segments = 0u64; // complete segments stored, from start_seg
            let mut snapshot: Option<(SegmentId, Lsn)> = None;
            let mut synced = start;
            let mut max_reported = Lsn(0);
            for _ in 0..300 {
                match rng(&mut seed) % 6 {
                    // XLogData: some bytes, never crossing the segment end in one append
                    0 | 1 => {
                        let seg_end = (written.0 / seg + 1) * seg;
                        let n = (rng(&mut seed) % (seg / 3)).min(seg_end - written.0).max(1);
                        written = Lsn(written.0 + n);
                        if written.0 == seg_end {
                            completed_upto = written;
                            if local_ack {
                                synced = written; // fsynced before the rename
                            }
                        }
                    }
                    // the archiver stores the next completed segment
                    2 => {
                        let done = (completed_upto.0 - start.0) / seg;
                        if archived_segments < done {
                            archived_segments += 1;
                        }
                    }
                    // a partial upload of what is written now
                    3 => {
                        let id = SegmentId::containing(tl(1), written, size);
                        if !written.0.is_multiple_of(seg) {
                            snapshot = Some((id, written));
                        }
                    }
                    // fsync of the partial
                    4 => synced = written,
                    // a status update: check
                    _ => {}
                }
                let archived_upto = Lsn(start.0 + archived_segments * seg);
                let partial = (!written.0.is_multiple_of(seg)).then(|| {
                    let s = Lsn(written.0 / seg * seg);
                    PartialView {
                        id: SegmentId::containing(tl(1), written, size),
                        start: s,
                        written_end: written,
                        synced_end: synced.max(s),
                    }
                });
                let flush =
                    flush_position(local_ack, completed_upto, archived_upto, snapshot, partial);
                // The model's durable end.
                let durable = if local_ack {
                    let p = Lsn(written.0 / seg * seg).min(completed_upto);
                    match partial {
                        Some(pv) if completed_upto >= pv.start => synced.max(p),
                        _ => completed_upto,
                    }
                } else {
                    let p = archived_upto.min(completed_upto);
                    match (partial, snapshot) {
                        (Some(pv), Some((id, end))) if id == pv.id && p >= pv.start => end.max(p),
                        _ => p,
                    }
                };
                assert!(
                    flush <= durable,
                    "run {run} (local_ack {local_ack}): flush {flush} > durable {durable}"
                );
                assert!(flush <= written, "flush {flush} beyond written {written}");
                max_reported = max_reported.max(flush);
            }
            let _ = max_reported;
        }
    }

    #[test]
    fn a_snapshot_of_another_segment_does_not_count() {
        let size = SegmentSize::new(1 << 20).unwrap();
        let p = PartialView {
            id: SegmentId::new(tl(1), 3),
            start: Lsn(3 << 20),
            written_end: Lsn((3 << 20) + 500),
            synced_end: Lsn(3 << 20),
        };
        let old = Some((SegmentId::new(tl(1), 2), Lsn((2 << 20) + 900)));
        assert_eq!(
            flush_position(false, Lsn(3 << 20), Lsn(3 << 20), old, Some(p)),
            Lsn(3 << 20)
        );
        let cur = Some((
            SegmentId::containing(tl(1), Lsn((3 << 20) + 100), size),
            Lsn((3 << 20) + 100),
        ));
        assert_eq!(
            flush_position(false, Lsn(3 << 20), Lsn(3 << 20), cur, Some(p)),
            Lsn((3 << 20) + 100)
        );
        // the archive behind: nothing of the partial counts
        assert_eq!(
            flush_position(false, Lsn(3 << 20), Lsn(2 << 20), cur, Some(p)),
            Lsn(2 << 20)
        );
    }
}
