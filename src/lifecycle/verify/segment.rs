//! One WAL segment checked on its own, and what its ends must agree on with its neighbours.
//!
//! [`check_segment`] runs the strict reader (`wal::reader`, page headers, record lengths,
//! `xl_prev` links and CRC-32Cs) over one decompressed segment and returns a [`SegSummary`]: the
//! few facts about its two ends that continuity across the segment boundary depends on. Two
//! consecutive segments continue each other when [`check_boundary`] finds that the second
//! begins with exactly the rest of the record the first left unfinished (its first page's
//! `XLP_FIRST_IS_CONTRECORD` / `xlp_rem_len`), and that the first record beginning in the second
//! links back (`xl_prev`) to the last record that began in the first, as one strict reader fed
//! both segments would require. Because the summaries are small, they are kept in the verify
//! watermark, so a segment archived later can be checked against one verified in an earlier run
//! without reading it again.

use serde::{Deserialize, Serialize};

use crate::wal::page::{PageHeader, SIZE_OF_LONG_PHD, SIZE_OF_SHORT_PHD, XLP_FIRST_IS_CONTRECORD};
use crate::wal::reader::{Record, Sink, WalReader};
use crate::wal::record::{RecordHeader, RecordHeaderBytes};
use crate::wal::verify::{check_page_timelines, VerifyParams};
use crate::wal::{Lsn, Timeline, TimelineHistory, WAL_PAGE_SIZE};

const PAGE: u64 = WAL_PAGE_SIZE as u64;
const XLP_FIRST_IS_OVERWRITE_CONTRECORD: u16 = 0x0008;

/// The ends of a verified segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegSummary {
    /// `xlp_magic` of the first page (the WAL format, so the server major version).
    pub magic: u16,
    /// The first page continues a record from the previous segment: its `xlp_rem_len`.
    pub head_rem: Option<u32>,
    /// The first page has `XLP_FIRST_IS_OVERWRITE_CONTRECORD` (a record cut short by a crash
    /// was abandoned there); the continuation check does not apply.
    #[serde(default)]
    pub head_overwrite: bool,
    /// `xl_prev` of the first record that begins in the segment; `None` when none begins in it.
    pub first_prev: Option<Lsn>,
    /// Start of the last record that begins in the segment; `None` when none begins in it.
    pub last_start: Option<Lsn>,
    /// Bytes of the last record (or of the record continued through the whole segment) still
    /// to come after the segment's end: 0 when it ends inside. `None` when not known (its header
    /// is split across the segment end).
    pub tail_rem: Option<u32>,
    /// A record is unfinished at the segment end.
    pub tail_open: bool,
    /// Just past the last non-zero byte (a `.partial` segment's end of data).
    pub data_end: Lsn,
}

/// Facts gathered while the reader walks the segment.
#[derive(Default)]
struct Observe {
    seg_start: u64,
    head: Option<PageHeader>,
    first_prev: Option<Lsn>,
    headers: u64,
    records: u64,
    last_tot_len: u32,
    last_complete: Option<Lsn>,
}

impl Sink for Observe {
    fn page(&mut self, lsn: Lsn, header: &PageHeader) {
        if lsn.0 == self.seg_start && self.head.is_none() {
            self.head = Some(*header);
        }
    }

    fn wants_image(&mut self, header: &RecordHeaderBytes) -> bool {
        let h = RecordHeader::from_bytes(header);
        if self.headers == 0 {
            self.first_prev = Some(h.prev);
        }
        self.headers += 1;
        self.last_tot_len = h.tot_len;
        false
    }

    fn record(&mut self, record: &Record<'_>) {
        self.records += 1;
        self.last_complete = Some(record.lsn);
    }
}

/// Record bytes (page headers left out) from `from` (inside a page, after its header) to the
/// page-aligned `end`.
fn payload_between(from: u64, end: u64) -> u64 {
    if from >= end {
        return 0;
    }
    let page_start = from - from % PAGE;
    let later_pages = (end - page_start) / PAGE - 1;
    (end - from).saturating_sub(later_pages * SIZE_OF_SHORT_PHD as u64)
}

/// Checks one whole, decompressed segment of timeline `params.timeline` starting at `start`
/// ([`SegmentCheck`] fed all of `bytes` at once).
pub fn check_segment(
    params: VerifyParams,
    start: Lsn,
    bytes: &[u8],
    partial: bool,
    history: Option<&TimelineHistory>,
    branch: Option<(Timeline, Lsn)>,
) -> Result<SegSummary, String> {
    let mut c = SegmentCheck::new(params, start, partial);
    c.update(bytes);
    c.finish(history, branch)
}

/// The check of one segment as its decompressed bytes stream by, in pieces of any size: only
/// the reader's state and a count of held-back zero bytes are kept, never the segment.
/// `partial`: a `.partial` object, which may be shorter than a segment and whose zero tail is
/// the end of its data; a complete segment must hold valid WAL to its end. The first failure is
/// kept and the bytes after it are still counted, so a wrong length is reported as such.
pub struct SegmentCheck {
    params: VerifyParams,
    start: Lsn,
    partial: bool,
    reader: WalReader,
    obs: Observe,
    /// Bytes seen so far.
    len: u64,
    /// Zero bytes at the end of what was seen, not yet fed (they may be the zero tail).
    zeros: u64,
    failed: Option<String>,
}

impl SegmentCheck {
    pub fn new(params: VerifyParams, start: Lsn, partial: bool) -> Self {
        let mut reader = WalReader::strict(params, start);
        reader.track_timelines();
        SegmentCheck {
            params,
            start,
            partial,
            reader,
            obs: Observe {
                seg_start: start.0,
                ..Default::default()
            },
            len: 0,
            zeros: 0,
            failed: None,
        }
    }

    fn seg(&self) -> u64 {
        u64::from(self.params.segment_size.bytes())
    }

    /// Feeds `n` zero bytes, a page at a time.
    fn feed_zeros(&mut self, mut n: u64) -> Result<(), String> {
        let zero_page = [0u8; WAL_PAGE_SIZE as usize];
        while n > 0 {
            let k = n.min(PAGE) as usize;
            self.reader
                .feed(&zero_page[..k], &mut self.obs)
                .map_err(|e| e.to_string())?;
            n -= k as u64;
        }
        Ok(())
    }

    /// The next piece of the decompressed segment.
    pub fn update(&mut self, data: &[u8]) {
        self.len += data.len() as u64;
        if self.failed.is_some() || self.len > self.seg() {
            return;
        }
        let Some(last) = data.iter().rposition(|&b| b != 0) else {
            self.zeros += data.len() as u64;
            return;
        };
        let held = std::mem::take(&mut self.zeros);
        let r = self.feed_zeros(held).and_then(|()| {
            self.reader
                .feed(&data[..=last], &mut self.obs)
                .map_err(|e| e.to_string())
        });
        if let Err(e) = r {
            self.failed = Some(e);
        }
        self.zeros = (data.len() - last - 1) as u64;
    }

    /// The verdict once every byte was fed. `history` is the timeline's history file (needed
    /// when pages of an older timeline show up); `branch` the parent timeline and switch point
    /// when the switch point lies inside this segment (after its first byte). Errors are one
    /// line for the report.
    pub fn finish(
        mut self,
        history: Option<&TimelineHistory>,
        branch: Option<(Timeline, Lsn)>,
    ) -> Result<SegSummary, String> {
        let seg = self.seg();
        let (len, partial, start) = (self.len, self.partial, self.start);
        if len > seg || (!partial && len != seg) {
            return Err(format!(
                "holds {len} bytes once decompressed, a segment has {seg}"
            ));
        }
        let data_len = len - self.zeros;
        let data_end = Lsn(start.0 + data_len);
        if data_len == 0 {
            return Err("holds only zero bytes".into());
        }
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        // The zeros after the data complete the segment only where a stream could carry them
        // (record padding, the fill after an XLOG_SWITCH record).
        let zeros_ok = match self.feed_zeros(seg - data_len) {
            Ok(()) => true,
            Err(e) if !partial => {
                return Err(format!(
                    "valid WAL ends at {data_end}, the rest of the segment is zero bytes ({e})"
                ))
            }
            Err(_) => false,
        };
        let (r, obs) = (&self.reader, &self.obs);
        check_page_timelines(self.params.timeline, r.timeline_pages(), history)
            .map_err(|e| e.to_string())?;
        if let Some((parent, switch)) = branch {
            check_switch_segment(r.timeline_pages(), parent, switch)?;
        }
        let head = obs
            .head
            .ok_or_else(|| "has no page header at its start".to_string())?;
        let contrecord = head.info & XLP_FIRST_IS_CONTRECORD != 0;
        let head_rem = contrecord.then_some(head.rem_len);
        let in_progress = if zeros_ok {
            r.record_in_progress()
        } else {
            None
        };
        let seg_end = start.0 + seg;
        let (last_start, tail_rem, tail_open) = if let Some(rec) = in_progress {
            // Its header was complete when one more header than records was seen.
            let tot = (obs.headers == obs.records + 1).then_some(obs.last_tot_len);
            let rem = tot.and_then(|t| u64::from(t).checked_sub(payload_between(rec.0, seg_end)));
            (Some(rec), rem.and_then(|r| u32::try_from(r).ok()), true)
        } else if zeros_ok && r.skipping() {
            // No record begins here: the one continued from before goes on past the end.
            let payload = payload_between(start.0 + SIZE_OF_LONG_PHD as u64, seg_end);
            let rem = head_rem.and_then(|h| u64::from(h).checked_sub(payload));
            (None, rem.and_then(|r| u32::try_from(r).ok()), true)
        } else {
            (obs.last_complete, Some(0), false)
        };
        Ok(SegSummary {
            magic: head.magic,
            head_rem,
            head_overwrite: head.info & XLP_FIRST_IS_OVERWRITE_CONTRECORD != 0,
            first_prev: obs.first_prev,
            last_start: if obs.headers == 0 { None } else { last_start },
            tail_rem,
            tail_open,
            data_end,
        })
    }
}

/// Does `next` continue `prev` (the segment before it on the timeline's path)? `carried` is the
/// start of the last record that began in `prev` or, when none began there, before it. The
/// error says how `next` fails to continue.
pub fn check_boundary(
    prev: &SegSummary,
    carried: Option<Lsn>,
    next: &SegSummary,
    prev_name: &str,
) -> Result<(), String> {
    if prev.magic != next.magic {
        return Err(format!(
            "page magic {:#06X} differs from {:#06X} of the segment before it, {prev_name} (WAL of another server version)",
            next.magic, prev.magic
        ));
    }
    if !next.head_overwrite {
        match (prev.tail_open, next.head_rem) {
            (false, Some(r)) => {
                return Err(format!(
                    "begins with {r} bytes of a record continued from before, but the segment before it, {prev_name}, ends with a complete record (this segment does not continue it)"
                ))
            }
            (true, None) => {
                return Err(format!(
                    "does not continue the record left unfinished at the end of {prev_name} (no XLP_FIRST_IS_CONTRECORD on its first page)"
                ))
            }
            (true, Some(r)) => {
                if let Some(t) = prev.tail_rem {
                    if t != r {
                        return Err(format!(
                            "continues a record with xlp_rem_len {r}, but {t} bytes of the record left unfinished in {prev_name} are still to come"
                        ));
                    }
                }
            }
            (false, None) => {}
        }
    }
    if let (Some(found), Some(expected)) = (next.first_prev, carried) {
        if found != expected && !next.head_overwrite {
            return Err(format!(
                "first record links back (xl_prev) to {found}, but the last record before it, in {prev_name}, starts at {expected}: the segment does not continue {prev_name} (WAL of another server or timeline?)"
            ));
        }
    }
    Ok(())
}

/// For the first segment of `timeline` when its switch point (from the history file) lies
/// inside it: the copy of the parent's WAL at its start must reach the page holding the switch
/// point, and no page of the parent may come after it (that part is
/// [`check_page_timelines`]'s).
pub fn check_switch_segment(
    pages: &[(Timeline, Lsn)],
    parent: Timeline,
    switch: Lsn,
) -> Result<(), String> {
    let last_parent_page = pages.iter().find(|(t, _)| *t == parent).map(|(_, l)| *l);
    match last_parent_page {
        None => Err(format!(
            "is the first segment of its timeline, whose history file says it branched from timeline {parent} at {switch}, but holds no WAL of timeline {parent} before that point"
        )),
        Some(l) if l.0 + PAGE < switch.0 => Err(format!(
            "is the first segment of its timeline, whose history file says it branched from timeline {parent} at {switch}, but its pages of timeline {parent} end at {}",
            Lsn(l.0 + PAGE)
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::synth::WalBuilder;
    use crate::wal::timeline::tl;
    use crate::wal::SegmentSize;

    const SYS: u64 = 7_000_000_000_000_000_001;

    fn seg() -> SegmentSize {
        SegmentSize::new(1 << 20).unwrap()
    }

    fn params(t: u32) -> VerifyParams {
        VerifyParams {
            system_identifier: SYS,
            segment_size: seg(),
            timeline: tl(t),
        }
    }

    /// `n` segments of WAL from segment 1, records of varied sizes (some span pages and
    /// segment boundaries).
    fn wal(n: u64, sys: u64, salt: u8) -> Vec<u8> {
        let s = u64::from(seg().bytes());
        let mut b = WalBuilder::new(sys, seg(), 1, Lsn(s));
        let mut i = 0u32;
        while (b.bytes().len() as u64) < n * s + 100 {
            let len = [50usize, 3000, 9000, 200, 40_000][i as usize % 5];
            b.push(10, 0, i, &vec![salt.wrapping_add(i as u8); len]);
            i += 1;
        }
        let mut v = b.into_bytes();
        v.truncate((n * s) as usize);
        v
    }

    fn summaries(w: &[u8]) -> Vec<SegSummary> {
        let s = u64::from(seg().bytes());
        w.chunks(s as usize)
            .enumerate()
            .map(|(i, c)| {
                check_segment(params(1), Lsn(s * (i as u64 + 1)), c, false, None, None).unwrap()
            })
            .collect()
    }

    #[test]
    fn consecutive_segments_continue_each_other() {
        let w = wal(4, SYS, 0);
        let sums = summaries(&w);
        let mut carried = None;
        for pair in sums.windows(2) {
            carried = pair[0].last_start.or(carried);
            check_boundary(&pair[0], carried, &pair[1], "prev").unwrap();
        }
        // Records cross the boundaries and their remaining length is known.
        assert!(sums.iter().any(|s| s.tail_open && s.tail_rem.is_some()));
    }

    #[test]
    fn a_segment_of_another_server_is_caught() {
        let a = summaries(&wal(3, SYS, 0));
        // Another layout: other record boundaries, so other xl_prev links.
        let s = u64::from(seg().bytes());
        let mut other = WalBuilder::new(SYS, seg(), 1, Lsn(s));
        let mut i = 0u32;
        while (other.bytes().len() as u64) < 3 * s {
            other.push(10, 0, i, &vec![1u8; 777 + (i as usize % 3) * 100]);
            i += 1;
        }
        let mut ow = other.into_bytes();
        ow.truncate((3 * s) as usize);
        let o = summaries(&ow);
        let e = check_boundary(&a[1], a[1].last_start, &o[2], "A").unwrap_err();
        assert!(e.contains("continue"), "{e}");
    }

    #[test]
    fn a_damaged_segment_is_an_error() {
        let mut w = wal(2, SYS, 0);
        w[5000] ^= 0x40;
        let s = seg().bytes() as usize;
        let e = check_segment(params(1), Lsn(s as u64), &w[..s], false, None, None).unwrap_err();
        assert!(e.contains("CRC") || e.contains("WAL"), "{e}");
        // Another system identifier.
        let w = wal(1, SYS + 1, 0);
        let e = check_segment(params(1), Lsn(s as u64), &w, false, None, None).unwrap_err();
        assert!(e.contains("system identifier"), "{e}");
    }

    #[test]
    fn a_partial_may_end_in_zeros_a_complete_segment_may_not() {
        let s = u64::from(seg().bytes());
        let mut b = WalBuilder::new(SYS, seg(), 1, Lsn(s));
        for i in 0..50 {
            b.push(10, 0, i, &[3u8; 100]);
        }
        let mut v = b.into_bytes();
        v.resize(s as usize, 0);
        let p = check_segment(params(1), Lsn(s), &v, true, None, None).unwrap();
        assert!(p.data_end.0 > s);
        let e = check_segment(params(1), Lsn(s), &v, false, None, None).unwrap_err();
        assert!(e.contains("zero bytes"), "{e}");
        let short = check_segment(params(1), Lsn(s), &v[..20_000], true, None, None).unwrap();
        assert_eq!(short.data_end, p.data_end);
    }

    #[test]
    fn a_switch_ends_a_segment_cleanly() {
        let s = u64::from(seg().bytes());
        let mut b = WalBuilder::new(SYS, seg(), 1, Lsn(s));
        b.push(10, 0, 1, &[3u8; 100]);
        let sw = b.push_switch();
        b.push(10, 0, 2, &[3u8; 100]);
        let v = b.into_bytes();
        let first = check_segment(params(1), Lsn(s), &v[..s as usize], false, None, None).unwrap();
        assert!(!first.tail_open);
        assert_eq!(first.last_start, Some(sw));
    }

    #[test]
    fn fed_in_pieces_it_finds_what_it_finds_whole() {
        let s = u64::from(seg().bytes());
        let w = wal(3, SYS, 0);
        let mut b = WalBuilder::new(SYS, seg(), 1, Lsn(s));
        for i in 0..50 {
            b.push(10, 0, i, &[0u8; 3000]);
        }
        let mut zero_rich = b.into_bytes();
        zero_rich.resize(s as usize, 0);
        let mut damaged = w[..s as usize].to_vec();
        damaged[70_000] ^= 1;
        let cases: Vec<(Vec<u8>, bool)> = vec![
            (w[s as usize..2 * s as usize].to_vec(), false),
            (zero_rich.clone(), true),
            (zero_rich.clone(), false),
            (zero_rich[..10_000].to_vec(), true),
            (damaged, false),
            (vec![0u8; 5000], true),
            ([w[..s as usize].to_vec(), vec![1u8; 9]].concat(), false),
        ];
        for (i, (bytes, partial)) in cases.iter().enumerate() {
            let start = Lsn(s * (1 + u64::from(i == 0)));
            let whole = check_segment(params(1), start, bytes, *partial, None, None);
            for piece in [1usize, 777, 8192, 1 << 16] {
                let mut c = SegmentCheck::new(params(1), start, *partial);
                for p in bytes.chunks(piece) {
                    c.update(p);
                }
                assert_eq!(c.finish(None, None), whole, "case {i}, pieces of {piece}");
            }
        }
    }

    #[test]
    fn payload_counts_page_headers() {
        let p = PAGE;
        assert_eq!(payload_between(p + 24, 2 * p), p - 24);
        assert_eq!(payload_between(p + 100, 3 * p), 2 * p - 100 - 24);
    }
}
