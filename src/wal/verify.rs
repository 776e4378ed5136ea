//! Page-header and record checks on WAL as it arrives.
//!
//! [`WalVerifier`] is a streaming checker: the receiver hands it every chunk of WAL (arbitrary
//! boundaries: mid-page, mid-record, mid-header, across segments) before the chunk is written.
//! It checks each page header (magic, flags, address, timeline, the long header's system
//! identifier and sizes), the continuation bookkeeping between pages, and every record's length,
//! prev-link and CRC-32C. It keeps no more than one page header and one record header of state,
//! never copies record bodies, and computes CRCs over the input slices. The reading and the
//! checks are [`super::reader`]'s, in its strict setting; this module adds the stream start
//! check and the whole-segment and zero-tail handling.
//!
//! [`check_segment`] / [`verify_segment`] check a whole segment file, accepting a zero tail as
//! the end of the data (pg_receivewal-style pre-zeroed `.partial` files).
//!
//! Layouts and rules: `src/include/access/xlog_internal.h`, `xlogrecord.h`,
//! `src/backend/access/transam/xlogreader.c` and `xlog.c`; written up in
//! `proto-notes/wal-format.md`.

use super::reader::WalReader;
use super::{Lsn, Timeline, WAL_PAGE_SIZE};

/// Kept here for callers that knew it from this module; it lives in [`super::page`].
pub use super::page::page_magic_for;
/// The verifier's parameters and errors are the strict reader's ([`super::reader`]).
pub use super::reader::{VerifyError, VerifyParams};

/// Streaming WAL checker: a [`Strictness::Strict`](super::reader::Strictness::Strict)
/// [`WalReader`] that only checks; see the module documentation.
#[derive(Debug, Clone)]
pub struct WalVerifier {
    r: WalReader,
    /// Set when `new` was given a start that is not a segment boundary; reported by `feed`.
    bad_start: bool,
}

impl WalVerifier {
    /// `start` must be a segment start (streams always start at segment boundaries); a bad start
    /// is reported by the first [`feed`](Self::feed). At the start we do not know about a
    /// record continued from the previous segment: the first page's `xlp_rem_len` bytes
    /// (MAXALIGN'd) are skipped unchecked, and the first record's `xl_prev` can only be checked
    /// to point backwards.
    pub fn new(params: VerifyParams, start: Lsn) -> Self {
        let seg_size = u64::from(params.segment_size.bytes());
        WalVerifier {
            r: WalReader::strict(params, start),
            bad_start: !start.0.is_multiple_of(seg_size),
        }
    }

    /// Also record which pages carry which `xlp_tli` (see [`timeline_pages`](Self::timeline_pages)).
    /// Off by default: the stream does not need it.
    pub fn track_timelines(&mut self) {
        self.r.track_timelines();
    }

    /// With [`track_timelines`](Self::track_timelines): every `xlp_tli` seen so far on a valid page
    /// header, in stream order (so in increasing order: a timeline never goes backwards), each
    /// with the LSN of the last page that carried it. Empty when not tracking.
    pub fn timeline_pages(&self) -> &[(Timeline, Lsn)] {
        self.r.timeline_pages()
    }

    /// The position of the next byte to feed.
    pub fn position(&self) -> Lsn {
        self.r.position()
    }

    /// The server major version detected from the page magic, once a page header was seen
    /// (15, 16, 17 or 18).
    pub fn server_major(&self) -> Option<u32> {
        self.r.server_major()
    }

    /// How many records have been checked completely (CRC included).
    pub fn records_verified(&self) -> u64 {
        self.r.records()
    }

    /// Checks `data`, which begins exactly at [`position`](Self::position). On error the
    /// verifier's state is unspecified (the caller stops).
    #[inline]
    pub fn feed(&mut self, data: &[u8]) -> Result<(), VerifyError> {
        if self.bad_start {
            let pos = self.r.position().0;
            let segment_size = self.r.segment_size();
            return Err(VerifyError::StartNotSegmentAligned {
                lsn: Lsn(pos),
                segment_size,
                offset: (pos % u64::from(segment_size.bytes())) as u32,
            });
        }
        // The `()` sink never stops the reader, so it consumes all of `data`.
        self.r.feed(data, &mut ()).map(|_| ())
    }
}

/// Length of `buf` without its trailing zero bytes.
fn len_without_zero_tail(buf: &[u8]) -> usize {
    let mut end = buf.len();
    while end > 0 {
        let start = end.saturating_sub(4096);
        let chunk = &buf[start..end];
        if chunk.iter().fold(0u8, |acc, &b| acc | b) != 0 {
            return chunk
                .iter()
                .rposition(|&b| b != 0)
                .map_or(start, |p| start + p + 1);
        }
        end = start;
    }
    0
}

/// Result of [`check_segment`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentCheck {
    /// Just past the last non-zero byte; from here to the segment end the file is all zeros.
    /// Equals the segment start for an all-zero file.
    pub data_end: Lsn,
    /// The whole segment is valid WAL as a stream would carry it. False means a valid prefix
    /// (up to `data_end`) followed by zeros that cannot be WAL: a pre-zeroed `.partial` file, or
    /// a completed file whose tail was lost. A segment that ends in an XLOG_SWITCH record and its
    /// zero fill is complete.
    pub complete: bool,
    /// Records checked in full (records that continue into the next segment are not counted).
    pub records: u64,
    /// From the page magic; `None` for an all-zero file.
    pub server_major: Option<u32>,
}

/// Checks a whole segment file: `bytes` must be the full segment starting at `start` (a segment
/// boundary). Zeros at the end are taken as the end of the data (pg_receivewal pre-zeroes
/// `.partial` files): the part before them must be a valid prefix of WAL, and
/// [`SegmentCheck::complete`] says whether the file also holds the full segment. Use this where
/// a file must be complete (a finished segment) and [`verify_segment`] where a prefix is fine.
pub fn check_segment(
    params: VerifyParams,
    start: Lsn,
    bytes: &[u8],
) -> Result<SegmentCheck, VerifyError> {
    let expected = u64::from(params.segment_size.bytes());
    if bytes.len() as u64 != expected {
        return Err(VerifyError::SegmentLength {
            lsn: start,
            expected,
            found: bytes.len() as u64,
        });
    }
    let mut c = SegmentChecker::new(params, start);
    c.update(bytes)?;
    c.finish()
}

/// [`check_segment`] for a segment that arrives in pieces (a file being decompressed or read),
/// without holding it: give every byte in order to [`update`](Self::update) (and runs of zeros to
/// [`update_zeros`](Self::update_zeros)), then call [`finish`](Self::finish). The result is the
/// one `check_segment` gives for the concatenation; errors come as soon as the bytes show them.
///
/// It also records which pages carry which `xlp_tli`
/// ([`timeline_pages`](Self::timeline_pages)), for [`check_page_timelines`].
#[derive(Debug, Clone)]
pub struct SegmentChecker {
    v: WalVerifier,
    start: Lsn,
    expected: u64,
    /// Bytes given so far.
    len: u64,
    /// Zero bytes at the end of what was given, not fed to the verifier yet: the end of the data
    /// unless something non-zero follows.
    zeros: u64,
}

/// Zeros to feed from.
static ZEROS: [u8; WAL_PAGE_SIZE as usize] = [0; WAL_PAGE_SIZE as usize];

impl SegmentChecker {
    /// The segment starting at `start` (a segment boundary) of `params.segment_size` bytes.
    pub fn new(params: VerifyParams, start: Lsn) -> Self {
        let mut v = WalVerifier::new(params, start);
        v.track_timelines();
        SegmentChecker {
            v,
            start,
            expected: u64::from(params.segment_size.bytes()),
            len: 0,
            zeros: 0,
        }
    }

    fn grow(&mut self, n: u64) -> Result<(), VerifyError> {
        let len = self.len.saturating_add(n);
        if len > self.expected {
            return Err(VerifyError::SegmentLength {
                lsn: self.start,
                expected: self.expected,
                found: len,
            });
        }
        self.len = len;
        Ok(())
    }

    fn feed_pending_zeros(v: &mut WalVerifier, mut n: u64) -> Result<(), VerifyError> {
        while n > 0 {
            let k = n.min(ZEROS.len() as u64) as usize;
            v.feed(&ZEROS[..k])?;
            n -= k as u64;
        }
        Ok(())
    }

    /// The next bytes of the segment. More bytes than the segment size is an error.
    pub fn update(&mut self, data: &[u8]) -> Result<(), VerifyError> {
        self.grow(data.len() as u64)?;
        let data_len = len_without_zero_tail(data);
        if data_len == 0 {
            self.zeros += data.len() as u64;
            return Ok(());
        }
        // Zeros followed by data are data.
        Self::feed_pending_zeros(&mut self.v, self.zeros)?;
        self.v.feed(&data[..data_len])?;
        self.zeros = (data.len() - data_len) as u64;
        Ok(())
    }

    /// `n` zero bytes (the padding of a `.partial` object), as [`update`](Self::update) would
    /// take them, without scanning them.
    pub fn update_zeros(&mut self, n: u64) -> Result<(), VerifyError> {
        self.grow(n)?;
        self.zeros += n;
        Ok(())
    }

    /// Bytes given so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Nothing given yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// See [`WalVerifier::timeline_pages`]: the timelines of the page headers checked so far.
    pub fn timeline_pages(&self) -> &[(Timeline, Lsn)] {
        self.v.timeline_pages()
    }

    /// The verdict once the whole segment was given; fewer bytes than the segment size is an
    /// error.
    pub fn finish(mut self) -> Result<SegmentCheck, VerifyError> {
        if self.len != self.expected {
            return Err(VerifyError::SegmentLength {
                lsn: self.start,
                expected: self.expected,
                found: self.len,
            });
        }
        let records = self.v.records_verified();
        let server_major = self.v.server_major();
        let data_end = Lsn(self.start.0 + (self.len - self.zeros));
        // The zeros complete the segment only if a stream could carry them: record padding, the
        // end of a record body, or the fill after an XLOG_SWITCH record.
        let complete = Self::feed_pending_zeros(&mut self.v, self.zeros).is_ok();
        Ok(SegmentCheck {
            data_end,
            complete,
            records,
            server_major,
        })
    }
}

/// Why the page timelines of a segment do not fit its timeline's history
/// ([`check_page_timelines`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimelineError {
    #[error("WAL page at {lsn}: expected xlp_tli {timeline} or, before the switch point, a timeline that {timeline} descends from, found xlp_tli {found} and no history file of timeline {timeline} that lists it")]
    NoHistory {
        lsn: Lsn,
        timeline: Timeline,
        found: Timeline,
    },
    #[error("WAL page at {lsn}: expected xlp_tli {timeline} or a timeline that {timeline} descends from, found {found}, which is not in the history of timeline {timeline}")]
    NotAncestor {
        lsn: Lsn,
        timeline: Timeline,
        found: Timeline,
    },
    #[error("WAL page at {lsn}: expected xlp_tli {timeline} from {switch} on (timeline {found} ends there in the history of timeline {timeline}), found {found}")]
    AfterSwitch {
        lsn: Lsn,
        timeline: Timeline,
        found: Timeline,
        switch: Lsn,
    },
}

/// The pages of a segment of timeline `timeline` that carry an older `xlp_tli` must hold WAL
/// that is part of `timeline`'s history: the first segment of a new timeline begins with a copy
/// of its parent's segment up to the switch point (xlog.c `XLogInitNewTimeline`), and the page
/// that holds the switch point keeps its parent's header. So a page with `xlp_tli` T < `timeline`
/// is valid only when T is an ancestor in `history` (the history file of `timeline`) and the page
/// starts before T's switch point. `pages` comes from [`SegmentChecker::timeline_pages`] (each
/// timeline with its last page); pages of `timeline` itself always pass. `history` is needed
/// only when an older timeline shows up (`None`: there is no history file).
///
/// PostgreSQL itself checks less: xlogreader.c only refuses a timeline going backwards between
/// pages, and xlogrecovery.c that the page's timeline is in the recovery target's history, at
/// any position.
pub fn check_page_timelines(
    timeline: Timeline,
    pages: &[(Timeline, Lsn)],
    history: Option<&super::TimelineHistory>,
) -> Result<(), TimelineError> {
    for &(found, lsn) in pages {
        if found == timeline {
            continue;
        }
        let Some(h) = history else {
            return Err(TimelineError::NoHistory {
                lsn,
                timeline,
                found,
            });
        };
        match h.switch_point(found) {
            None => {
                return Err(TimelineError::NotAncestor {
                    lsn,
                    timeline,
                    found,
                })
            }
            Some(switch) if lsn >= switch => {
                return Err(TimelineError::AfterSwitch {
                    lsn,
                    timeline,
                    found,
                    switch,
                })
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Checks a whole segment file's content (used on startup for spooled files); `bytes.len()`
/// must equal the segment size. A zero tail is accepted as the end of the data (see
/// [`check_segment`], which also tells whether the segment is complete).
pub fn verify_segment(params: VerifyParams, start: Lsn, bytes: &[u8]) -> Result<(), VerifyError> {
    check_segment(params, start, bytes).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::page::{MAGICS, XLP_FIRST_IS_CONTRECORD};
    use crate::wal::reader::first_nonzero;
    use crate::wal::synth::WalBuilder;
    use crate::wal::timeline::tl;
    use crate::wal::SegmentSize;

    const PAGE: u64 = WAL_PAGE_SIZE as u64;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/wal");
    /// `pg_controldata` of the cluster the fixtures come from (tests/fixtures/wal/README.md).
    const FIXTURE_SYSID: u64 = 7710843067740758272;
    const MB: u64 = 1 << 20;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!("{FIXTURES}/{name}.zst");
        let compressed = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        zstd::stream::decode_all(&compressed[..]).expect("fixture decompresses")
    }

    fn seg1m() -> SegmentSize {
        SegmentSize::new(MB).unwrap()
    }

    fn params(tli: u32) -> VerifyParams {
        VerifyParams {
            system_identifier: FIXTURE_SYSID,
            segment_size: seg1m(),
            timeline: tl(tli),
        }
    }

    fn lsn(s: &str) -> Lsn {
        s.parse().unwrap()
    }

    use crate::wal::synth::TestRng as Rng;

    /// Feeds `data` in chunks of `size` bytes; returns the verifier.
    fn feed_chunked(
        p: VerifyParams,
        start: Lsn,
        data: &[u8],
        size: usize,
    ) -> Result<WalVerifier, VerifyError> {
        let mut v = WalVerifier::new(p, start);
        for chunk in data.chunks(size) {
            v.feed(chunk)?;
        }
        assert_eq!(v.position().0, start.0 + data.len() as u64);
        Ok(v)
    }

    fn feed_random(
        p: VerifyParams,
        start: Lsn,
        data: &[u8],
        seed: u64,
        max: u64,
    ) -> Result<WalVerifier, VerifyError> {
        let mut rng = Rng(seed);
        let mut v = WalVerifier::new(p, start);
        let mut rest = data;
        while !rest.is_empty() {
            // Mix tiny chunks (header splits) with large ones.
            let n = if rng.below(4) == 0 {
                1 + rng.below(40)
            } else {
                1 + rng.below(max)
            };
            let n = (n as usize).min(rest.len());
            v.feed(&rest[..n])?;
            rest = &rest[n..];
        }
        Ok(v)
    }

    const CHUNK_SIZES: [usize; 7] = [1, 7, 24, 8191, 8192, 65536 + 13, 131072];

    struct RealCase {
        name: &'static str,
        files: &'static [&'static str],
        start: &'static str,
        tli: u32,
        /// Records pg_waldump lists as starting in (and verifiable from) these files.
        records: u64,
    }

    const REAL: &[RealCase] = &[
        // Segment 9 starts right after a switch; its last record continues into A.
        RealCase {
            name: "seg 9",
            files: &["000000010000000000000009"],
            start: "0/900000",
            tli: 1,
            records: 2326,
        },
        // A opens with 12278 bytes of that record (skipped), ends with XLOG_SWITCH + zeros.
        RealCase {
            name: "seg A",
            files: &["00000001000000000000000A"],
            start: "0/A00000",
            tli: 1,
            records: 202,
        },
        RealCase {
            name: "seg 9+A",
            files: &["000000010000000000000009", "00000001000000000000000A"],
            start: "0/900000",
            tli: 1,
            records: 2529,
        },
        // TL2 segment: first page from TL1 (xlp_tli 1), then TL2 pages, switch, zeros.
        RealCase {
            name: "TL2 seg B",
            files: &["00000002000000000000000B"],
            start: "0/B00000",
            tli: 2,
            records: 207,
        },
        // TL3 segment: first page xlp_tli 2, then 3, switch, zeros.
        RealCase {
            name: "TL3 seg C",
            files: &["00000003000000000000000C"],
            start: "0/C00000",
            tli: 3,
            records: 106,
        },
        // E ends with a record cut short by a crash; F starts with XLP_FIRST_IS_OVERWRITE_CONTRECORD.
        RealCase {
            name: "TL3 seg E",
            files: &["00000003000000000000000E"],
            start: "0/E00000",
            tli: 3,
            records: 0,
        },
        RealCase {
            name: "TL3 seg F",
            files: &["00000003000000000000000F"],
            start: "0/F00000",
            tli: 3,
            records: 3,
        },
        RealCase {
            name: "TL3 seg E+F",
            files: &["00000003000000000000000E", "00000003000000000000000F"],
            start: "0/E00000",
            tli: 3,
            records: 0,
        },
    ];

    fn load(case: &RealCase) -> Vec<u8> {
        case.files.iter().flat_map(|f| fixture(f)).collect()
    }

    #[test]
    fn real_segments_verify_whole_and_in_chunks() {
        for case in REAL {
            let data = load(case);
            let start = lsn(case.start);
            let v = feed_chunked(params(case.tli), start, &data, data.len())
                .unwrap_or_else(|e| panic!("{}: {e}", case.name));
            assert_eq!(v.server_major(), Some(15), "{}", case.name);
            if case.records > 0 {
                assert_eq!(v.records_verified(), case.records, "{}", case.name);
            }
            let whole_records = v.records_verified();
            for size in CHUNK_SIZES {
                let v = feed_chunked(params(case.tli), start, &data, size)
                    .unwrap_or_else(|e| panic!("{} in {size}-byte chunks: {e}", case.name));
                assert_eq!(
                    v.records_verified(),
                    whole_records,
                    "{} chunk {size}",
                    case.name
                );
            }
            for seed in 1..=4 {
                let v = feed_random(params(case.tli), start, &data, seed, 140_000)
                    .unwrap_or_else(|e| panic!("{} random seed {seed}: {e}", case.name));
                assert_eq!(
                    v.records_verified(),
                    whole_records,
                    "{} seed {seed}",
                    case.name
                );
            }
        }
    }

    #[test]
    fn real_segment_files_check_complete() {
        for case in REAL.iter().filter(|c| c.files.len() == 1) {
            let data = load(case);
            let c = check_segment(params(case.tli), lsn(case.start), &data)
                .unwrap_or_else(|e| panic!("{}: {e}", case.name));
            assert!(c.complete, "{}: {c:?}", case.name);
            assert_eq!(c.server_major, Some(15));
            verify_segment(params(case.tli), lsn(case.start), &data).unwrap();
        }
        // Segment A ends at its switch record; the zero fill belongs to it.
        let a = fixture("00000001000000000000000A");
        let c = check_segment(params(1), lsn("0/A00000"), &a).unwrap();
        assert_eq!(c.data_end, lsn("0/AABCA8"));
        assert!(c.complete);
        assert_eq!(c.records, 202);
    }

    #[test]
    fn crossing_record_crc_error_reported_at_its_start() {
        // The logical message at 0/9EDE28 starts in segment 9 and ends in A.
        let mut data = load(&REAL[2]);
        let in_a = (lsn("0/A00000").0 + 40 + 1000 - lsn("0/900000").0) as usize;
        data[in_a] ^= 0x01;
        for size in [1, 8192, 131072] {
            let err = feed_chunked(params(1), lsn("0/900000"), &data, size).unwrap_err();
            assert!(
                matches!(err, VerifyError::Crc { lsn: l, .. } if l == lsn("0/9EDE28")),
                "{err}"
            );
        }
    }

    #[test]
    fn flipped_body_byte_is_a_crc_error_at_the_record() {
        let seg = fixture("000000010000000000000009");
        // pg_waldump: COMMIT at 0/9EDE00 (34 bytes); flip its timestamp.
        let mut bad = seg.clone();
        bad[0xEDE00 + 30] ^= 0x80;
        for size in [1, 8192, seg.len()] {
            let err = feed_chunked(params(1), lsn("0/900000"), &bad, size).unwrap_err();
            assert!(
                matches!(err, VerifyError::Crc { lsn: l, .. } if l == lsn("0/9EDE00")),
                "{err}"
            );
        }
        let err = verify_segment(params(1), lsn("0/900000"), &bad).unwrap_err();
        assert_eq!(err.lsn(), lsn("0/9EDE00"));
        // A flipped xl_crc byte too.
        let mut bad = seg.clone();
        bad[0xEDE00 + 20] ^= 0x01;
        let err = verify_segment(params(1), lsn("0/900000"), &bad).unwrap_err();
        assert!(
            matches!(err, VerifyError::Crc { lsn: l, .. } if l == lsn("0/9EDE00")),
            "{err}"
        );
        // A flipped xl_prev is caught before the CRC.
        let mut bad = seg;
        bad[0xEDE00 + 8] ^= 0x08;
        let err = verify_segment(params(1), lsn("0/900000"), &bad).unwrap_err();
        assert_eq!(
            err,
            VerifyError::PrevLink {
                lsn: lsn("0/9EDE00"),
                expected: lsn("0/9EDC68"),
                found: lsn("0/9EDC60")
            }
        );
    }

    #[test]
    fn flipped_page_header_bytes_are_header_errors() {
        let seg = fixture("000000010000000000000009");
        let page = 5 * 8192usize; // 0/90A000
        let at = lsn("0/90A000");
        let check = |mutate: &dyn Fn(&mut Vec<u8>)| {
            let mut bad = seg.clone();
            mutate(&mut bad);
            let e1 = feed_chunked(params(1), lsn("0/900000"), &bad, 3).unwrap_err();
            let e2 = verify_segment(params(1), lsn("0/900000"), &bad).unwrap_err();
            assert_eq!(e1, e2);
            e1
        };
        assert_eq!(
            check(&|b| b[page] = 0x11),
            VerifyError::UnknownMagic {
                lsn: at,
                found: 0xD111
            }
        );
        assert_eq!(
            check(&|b| b[page] = 0x16),
            VerifyError::MagicChanged {
                lsn: at,
                expected: 0xD110,
                found: 0xD116
            }
        );
        let info = u16::from_le_bytes([seg[page + 2], seg[page + 3]]);
        assert_eq!(
            check(&|b| b[page + 2] |= 0x10),
            VerifyError::InfoBits {
                lsn: at,
                found: info | 0x10
            }
        );
        assert_eq!(
            check(&|b| b[page + 2] |= 0x02),
            VerifyError::UnexpectedLongHeader {
                lsn: at,
                info: info | 0x02
            }
        );
        assert_eq!(
            check(&|b| b[page + 9] ^= 0x40),
            VerifyError::PageAddress {
                lsn: at,
                found: lsn("0/90E000")
            }
        );
        assert_eq!(
            check(&|b| b[page + 4] = 0),
            VerifyError::Timeline {
                lsn: at,
                min: 1,
                max: 1,
                found: 0
            }
        );
        // This page continues a record: drop the flag, or change the remaining length.
        assert_eq!(
            info & XLP_FIRST_IS_CONTRECORD,
            XLP_FIRST_IS_CONTRECORD,
            "fixture layout changed"
        );
        let rem = u32::from_le_bytes([
            seg[page + 16],
            seg[page + 17],
            seg[page + 18],
            seg[page + 19],
        ]);
        let e = check(&|b| b[page + 2] &= !0x01);
        assert!(
            matches!(e, VerifyError::StrayRemainingLength { lsn: l, found } if l == at && found == rem),
            "{e}"
        );
        let e = check(&|b| {
            b[page + 2] &= !0x01;
            b[page + 16..page + 20].copy_from_slice(&[0; 4]);
        });
        assert!(
            matches!(e, VerifyError::MissingContinuation { lsn: l, expected, .. } if l == at && expected == rem),
            "{e}"
        );
        let e = check(&|b| b[page + 16] ^= 0x04);
        assert!(
            matches!(e, VerifyError::ContinuationLength { lsn: l, expected, found, .. }
            if l == at && expected == rem && found == rem ^ 0x04),
            "{e}"
        );
        let e = check(&|b| b[page + 2] |= 0x08);
        assert_eq!(
            e,
            VerifyError::ConflictingContinuationFlags {
                lsn: at,
                info: info | 0x08
            }
        );
        // First page: long header fields.
        let e = check(&|b| b[2] &= !0x02);
        assert_eq!(
            e,
            VerifyError::MissingLongHeader {
                lsn: lsn("0/900000"),
                info: 0x0004
            }
        );
        let e = check(&|b| b[36] = 0x10);
        assert_eq!(
            e,
            VerifyError::BlockSize {
                lsn: lsn("0/900000"),
                expected: 8192,
                found: 0x2010
            }
        );
    }

    #[test]
    fn wrong_system_identifier_timeline_and_segment_size() {
        let seg = fixture("000000010000000000000009");
        let mut p = params(1);
        p.system_identifier += 1;
        assert_eq!(
            verify_segment(p, lsn("0/900000"), &seg).unwrap_err(),
            VerifyError::SystemIdentifier {
                lsn: lsn("0/900000"),
                expected: FIXTURE_SYSID + 1,
                found: FIXTURE_SYSID
            }
        );
        // Timeline 3's segment streamed as timeline 2: the first TL3 page is too new.
        let c = fixture("00000003000000000000000C");
        assert_eq!(
            feed_chunked(params(2), lsn("0/C00000"), &c, 1000).unwrap_err(),
            VerifyError::Timeline {
                lsn: lsn("0/C02000"),
                min: 2,
                max: 2,
                found: 3
            }
        );
        // A 2 MiB-segment stream at 0/A00000 (a 2 MiB boundary) given 1 MiB segments.
        let a = fixture("00000001000000000000000A");
        let p2 = VerifyParams {
            segment_size: SegmentSize::new(2 * MB).unwrap(),
            ..params(1)
        };
        assert_eq!(
            feed_chunked(p2, lsn("0/A00000"), &a, 8192).unwrap_err(),
            VerifyError::SegmentSize {
                lsn: lsn("0/A00000"),
                expected: 2 << 20,
                found: 1 << 20
            }
        );
        assert_eq!(
            verify_segment(p2, lsn("0/A00000"), &a).unwrap_err(),
            VerifyError::SegmentLength {
                lsn: lsn("0/A00000"),
                expected: 2 << 20,
                found: 1 << 20
            }
        );
        // Not a segment start.
        let mut v = WalVerifier::new(params(1), lsn("0/902000"));
        assert_eq!(
            v.feed(&seg[0x2000..0x3000]).unwrap_err(),
            VerifyError::StartNotSegmentAligned {
                lsn: lsn("0/902000"),
                segment_size: seg1m(),
                offset: 0x2000
            }
        );
    }

    #[test]
    fn zeros_after_switch_only() {
        let a = fixture("00000001000000000000000A");
        // 0/AABC90 is the switch record; everything after it is zero, page headers included.
        for at in ["0/AABCA8", "0/AAC000", "0/AAC010", "0/AFFFFF"] {
            let mut bad = a.clone();
            let off = (lsn(at).0 - 0xA00000) as usize;
            bad[off] = 0x5A;
            let err = feed_chunked(params(1), lsn("0/A00000"), &bad, 4096).unwrap_err();
            assert_eq!(
                err,
                VerifyError::NonZeroAfterSwitch {
                    lsn: lsn(at),
                    switch: lsn("0/AABC90"),
                    found: 0x5A
                }
            );
            // As a file, the non-zero byte makes the tail not WAL: a prefix followed by garbage.
            let err = verify_segment(params(1), lsn("0/A00000"), &bad).unwrap_err();
            assert_eq!(err.lsn(), lsn(at));
        }
    }

    #[test]
    fn pre_zeroed_partial_files() {
        let seg = fixture("000000010000000000000009");
        // Data received up to some point (mid-record, at a page start, right after a page
        // header, ...), the rest still zero as pg_receivewal pre-allocates it.
        for cut in [0x50123usize, 0x52000, 0x52018, 0x40, 0] {
            let mut partial = seg.clone();
            partial[cut..].fill(0);
            let c = check_segment(params(1), lsn("0/900000"), &partial).unwrap();
            assert!(!c.complete, "cut {cut:#x}: {c:?}");
            assert!(c.data_end.0 <= 0x900000 + cut as u64, "cut {cut:#x}: {c:?}");
            verify_segment(params(1), lsn("0/900000"), &partial).unwrap();
            // A live stream never carries zeros at a record start (outside a switch).
            let v = feed_chunked(params(1), lsn("0/900000"), &partial, 8192);
            assert!(v.is_err(), "cut {cut:#x}");
        }
        let c = check_segment(params(1), lsn("0/900000"), &seg).unwrap();
        assert!(c.complete);
        assert_eq!(c.data_end, lsn("0/A00000"));
        assert_eq!(c.records, 2326);
        // All zeros: an empty partial.
        let zero = vec![0; MB as usize];
        let c = check_segment(params(1), lsn("0/900000"), &zero).unwrap();
        assert_eq!(
            c,
            SegmentCheck {
                data_end: lsn("0/900000"),
                complete: false,
                records: 0,
                server_major: None
            }
        );
        // A zero tot_len at a record start in a stream.
        let mut partial = seg.clone();
        partial[0xEDE00..].fill(0);
        let err = feed_chunked(params(1), lsn("0/900000"), &partial, 8192).unwrap_err();
        assert_eq!(
            err,
            VerifyError::RecordTooShort {
                lsn: lsn("0/9EDE00"),
                found: 0
            }
        );
    }

    #[test]
    fn continuation_skipped_at_stream_start_is_still_checked() {
        // Segment A starts with the last 12278 bytes of a record begun in segment 9.
        let a = fixture("00000001000000000000000A");
        let mut bad = a.clone();
        bad[16..20].copy_from_slice(&[0; 4]);
        assert_eq!(
            feed_chunked(params(1), lsn("0/A00000"), &bad, 100).unwrap_err(),
            VerifyError::StartContinuationLength {
                lsn: lsn("0/A00000"),
                found: 0
            }
        );
        // Its second page must carry the remaining 12278 - (8192 - 40) bytes.
        assert_eq!(
            u32::from_le_bytes([a[8192 + 16], a[8192 + 17], a[8192 + 18], a[8192 + 19]]),
            4126
        );
        let mut bad = a.clone();
        bad[8192 + 16] ^= 0x10;
        assert_eq!(
            feed_chunked(params(1), lsn("0/A00000"), &bad, 100).unwrap_err(),
            VerifyError::ContinuationLength {
                lsn: lsn("0/A02000"),
                record: lsn("0/A00000"),
                expected: 4126,
                found: 4126 ^ 0x10
            }
        );
        // Records after the skipped part are checked: the first one is at 0/A03038.
        let mut bad = a;
        bad[0x3038 + 24] ^= 0x01;
        let err = feed_chunked(params(1), lsn("0/A00000"), &bad, 100).unwrap_err();
        assert!(
            matches!(err, VerifyError::Crc { lsn: l, .. } if l == lsn("0/A03038")),
            "{err}"
        );
    }

    #[test]
    fn overwrite_contrecord_from_a_crash() {
        // E ends inside the record at 0/EFC688, cut short by an immediate shutdown; F's first
        // page has XLP_FIRST_IS_OVERWRITE_CONTRECORD and its first record links to 0/EFC660.
        let ef = load(&REAL[7]);
        let v = feed_chunked(params(3), lsn("0/E00000"), &ef, 8192).unwrap();
        let e_alone = feed_chunked(params(3), lsn("0/E00000"), &ef[..MB as usize], 8192).unwrap();
        // F: OVERWRITE_CONTRECORD, CHECKPOINT_SHUTDOWN, SWITCH.
        assert_eq!(v.records_verified(), e_alone.records_verified() + 3);
        // Removing the overwrite flag makes the cut record a continuation error.
        let mut bad = ef.clone();
        bad[MB as usize + 2] &= !0x08;
        let err = feed_chunked(params(3), lsn("0/E00000"), &bad, 8192).unwrap_err();
        assert!(
            matches!(err, VerifyError::MissingContinuation { lsn: l, record, .. }
            if l == lsn("0/F00000") && record == lsn("0/EFC688")),
            "{err}"
        );
    }

    // ---- synthetic WAL ----

    const SYSID: u64 = 0x0123_4567_89AB_CDEF;

    fn payload(rng: &mut Rng, len: usize) -> Vec<u8> {
        (0..len).map(|_| rng.next() as u8).collect()
    }

    /// Interesting record sizes: tiny, around page remainders, multi-page, exact page multiples.
    /// Returns the builder, the record count and the LSNs of MAXALIGN padding bytes.
    fn build_mixed(seed: u64, segments: u64) -> (WalBuilder, u64, std::collections::HashSet<u64>) {
        let mut rng = Rng(seed);
        let mut b = WalBuilder::new(SYSID, seg1m(), 1, lsn("1/0"));
        let end = lsn("1/0").0 + segments * MB;
        let mut n = 0;
        let mut padding = std::collections::HashSet::new();
        while b.position().0 + 40_000 < end {
            let len = match rng.below(10) {
                0 => rng.below(8) as usize,
                1 => 8192 - 24 - rng.below(64) as usize,
                2 => 8192 * (1 + rng.below(3) as usize) - rng.below(48) as usize,
                3 => 20_000 + rng.below(20_000) as usize,
                _ => 10 + rng.below(400) as usize,
            };
            b.push(
                rng.below(22) as u8,
                ((rng.below(4) as u8) << 4) & 0x30,
                n as u32,
                &payload(&mut rng, len),
            );
            let end = b.position().0;
            padding.extend(end..(end + 7) & !7);
            n += 1;
        }
        (b, n, padding)
    }

    #[test]
    fn synthetic_stream_in_random_chunks() {
        for seed in 1..=6 {
            let (b, n, padding) = build_mixed(seed, 3);
            let p = VerifyParams {
                system_identifier: SYSID,
                segment_size: seg1m(),
                timeline: tl(1),
            };
            let v = feed_chunked(p, b.start(), b.bytes(), b.bytes().len()).unwrap();
            assert_eq!(v.records_verified(), n);
            for size in CHUNK_SIZES {
                feed_chunked(p, b.start(), b.bytes(), size).unwrap();
            }
            let v = feed_random(p, b.start(), b.bytes(), seed * 31, 20_000).unwrap();
            assert_eq!(v.records_verified(), n);
            // Single-bit corruption anywhere is caught, except where nothing can see it: MAXALIGN
            // padding between records, page-header padding, and the XLP_BKP_REMOVABLE hint bit
            // (PostgreSQL checks none of these either).
            let mut rng = Rng(seed + 100);
            let mut tried = 0;
            while tried < 60 {
                let off = rng.below(b.bytes().len() as u64) as usize;
                let bit = rng.below(8) as u8;
                let at = b.start().0 + off as u64;
                let page_off = at % PAGE;
                if padding.contains(&at)
                    || (20..24).contains(&page_off)
                    || (page_off == 2 && bit == 2)
                {
                    continue;
                }
                tried += 1;
                let mut bad = b.bytes().to_vec();
                bad[off] ^= 1 << bit;
                assert!(
                    feed_chunked(p, b.start(), &bad, 4096).is_err(),
                    "bit {bit} of byte {} went unnoticed",
                    Lsn(at)
                );
            }
        }
    }

    #[test]
    fn record_headers_split_at_every_page_offset() {
        // Put a record start at each 8-byte slot near the end of a page, including the two
        // where the 24-byte header is split across the page boundary (8176, 8184).
        for slot_from_end in [8u64, 16, 24, 32] {
            for tail_len in [0usize, 1, 100, 8200] {
                let mut b = WalBuilder::new(SYSID, seg1m(), 1, lsn("0/100000"));
                b.push(1, 0, 1, &[7; 50]);
                let target = 8192 - slot_from_end;
                fill_until(&mut b, 0x100000 + target);
                let rec = b.push(3, 0, 3, &vec![1; tail_len]);
                assert_eq!(rec.0 % 8192, target, "layout");
                b.push(4, 0, 4, &[2; 30]);
                let p = VerifyParams {
                    system_identifier: SYSID,
                    segment_size: seg1m(),
                    timeline: tl(1),
                };
                for size in [1, 5, 8, 8192, 100_000] {
                    let v = feed_chunked(p, b.start(), b.bytes(), size).unwrap();
                    assert_eq!(v.records_verified(), 4);
                }
                // Corrupting the second half of the split header is a CRC/prev error at `rec`.
                let mut bad = b.bytes().to_vec();
                let idx = (rec.0 - b.start().0) as usize;
                let hdr_byte_on_next_page = if slot_from_end < 24 {
                    idx + slot_from_end as usize + 24
                } else {
                    idx + 17
                };
                bad[hdr_byte_on_next_page] ^= 0x20;
                let err = feed_chunked(p, b.start(), &bad, 7).unwrap_err();
                assert_eq!(err.lsn(), rec, "{err}");
            }
        }
    }

    /// Pushes filler records until the next record would start exactly at `target` (which must
    /// be at least 24 bytes past a page header).
    fn fill_until(b: &mut WalBuilder, target: u64) {
        loop {
            let mut pos = (b.position().0 + 7) & !7;
            if pos.is_multiple_of(PAGE) {
                pos += if pos.is_multiple_of(MB) { 40 } else { 24 };
            }
            if pos == target {
                return;
            }
            assert!(pos < target, "overshot {} > {}", Lsn(pos), Lsn(target));
            let page_end = (pos / PAGE + 1) * PAGE;
            if target < page_end {
                assert!(target - pos >= 24, "cannot reach {}", Lsn(target));
                b.push(5, 0, 1, &vec![3; (target - pos - 24) as usize]);
                return;
            }
            let room = page_end - pos;
            b.push(5, 0, 1, &vec![3; room.saturating_sub(24) as usize]);
        }
    }

    #[test]
    fn switch_records_anywhere() {
        let p = VerifyParams {
            system_identifier: SYSID,
            segment_size: seg1m(),
            timeline: tl(1),
        };
        let seg = lsn("0/300000").0;
        // Switch right after the long header, first on a page, mid-page, with its header split
        // across a page boundary (8176, 8184), ending exactly at the segment end, and split
        // across the segment boundary (its zero fill is then the whole next segment).
        for off in [
            40,
            3 * PAGE + 24,
            5000,
            5 * PAGE + 8176,
            6 * PAGE + 8184,
            MB - 24,
            MB - 8,
        ] {
            let mut b = WalBuilder::new(SYSID, seg1m(), 1, Lsn(seg));
            if off != 40 {
                b.push(5, 0, 1, &[1; 3]);
                fill_until(&mut b, seg + off);
            }
            let sw = b.push_switch();
            assert_eq!(sw.0, seg + off);
            let fill_end = if off == MB - 8 {
                seg + 2 * MB
            } else {
                seg + MB
            };
            assert_eq!(b.position().0, fill_end);
            b.push(1, 0, 9, &[1; 10]);
            b.push(1, 0, 9, &[1; 9000]);
            for size in [1, 24, 8192, 131072] {
                let v = feed_chunked(p, b.start(), b.bytes(), size)
                    .unwrap_or_else(|e| panic!("switch at {sw}: {e}"));
                assert!(v.records_verified() >= 3);
            }
            // A stray byte in the zero fill.
            if off != MB - 24 {
                let mut bad = b.bytes().to_vec();
                let last = (fill_end - 1 - seg) as usize;
                bad[last] = 1;
                let err = feed_chunked(p, b.start(), &bad, 8192).unwrap_err();
                assert_eq!(
                    err,
                    VerifyError::NonZeroAfterSwitch {
                        lsn: Lsn(fill_end - 1),
                        switch: sw,
                        found: 1
                    }
                );
            }
            // The whole-segment check of the switched segment.
            let first = &b.bytes()[..MB as usize];
            let c = check_segment(p, Lsn(seg), first).unwrap();
            assert!(c.complete, "switch at {sw}: {c:?}");
        }
    }

    #[test]
    fn synthetic_overwrite_contrecord() {
        let p = VerifyParams {
            system_identifier: SYSID,
            segment_size: seg1m(),
            timeline: tl(1),
        };
        let mut b = WalBuilder::new(SYSID, seg1m(), 1, lsn("0/100000"));
        let last_good = b.push(1, 0, 1, &[1; 3000]);
        let aborted = b.push_aborted(1, 0, 2, &[2; 30_000]).unwrap();
        assert_eq!(b.position(), lsn("0/102000"));
        // The record that replaces the lost continuation links to the last complete record.
        let mut linked_to_aborted = b.clone();
        let next = b.push(0, 0xD0, 0, &[3; 16]);
        assert_eq!(next, lsn("0/102018"));
        b.push(1, 0, 3, &[4; 100]);
        let v = feed_chunked(p, b.start(), b.bytes(), 1).unwrap();
        assert_eq!(v.records_verified(), 3);
        linked_to_aborted.set_prev(aborted);
        linked_to_aborted.push(0, 0xD0, 0, &[3; 16]);
        assert_eq!(
            feed_chunked(p, b.start(), linked_to_aborted.bytes(), 100).unwrap_err(),
            VerifyError::PrevLink {
                lsn: next,
                expected: last_good,
                found: aborted
            }
        );
        // The overwrite flag where no record is in progress: the first record fills page 1
        // exactly, so page 2 starts clean.
        let mut b = WalBuilder::new(SYSID, seg1m(), 1, lsn("0/100000"));
        b.push(1, 0, 1, &[1; 8192 - 40 - 24]);
        b.push(1, 0, 1, &[1; 10]);
        let mut bytes = b.into_bytes();
        assert_eq!(bytes[8192 + 2], 0x04, "layout");
        bytes[8192 + 2] |= 0x08;
        assert_eq!(
            feed_chunked(p, lsn("0/100000"), &bytes, 8192).unwrap_err(),
            VerifyError::UnexpectedOverwrite {
                lsn: lsn("0/102000"),
                info: 0x000C
            }
        );
    }

    #[test]
    fn magic_versions_and_timelines() {
        for (magic, major) in MAGICS {
            let mut b = WalBuilder::new(SYSID, seg1m(), 7, lsn("0/100000"));
            b.set_magic(magic);
            b.push(1, 0, 1, &[0; 20_000]);
            let p = VerifyParams {
                system_identifier: SYSID,
                segment_size: seg1m(),
                timeline: tl(7),
            };
            let v = feed_chunked(p, b.start(), b.bytes(), 999).unwrap();
            assert_eq!(v.server_major(), Some(major));
            assert_eq!(page_magic_for(major), Some(magic));
        }
        let mut b = WalBuilder::new(SYSID, seg1m(), 1, lsn("0/100000"));
        b.set_magic(0xD10D); // PostgreSQL 14
        b.push(1, 0, 1, &[0; 10]);
        let p = VerifyParams {
            system_identifier: SYSID,
            segment_size: seg1m(),
            timeline: tl(1),
        };
        assert_eq!(
            feed_chunked(p, b.start(), b.bytes(), 99).unwrap_err(),
            VerifyError::UnknownMagic {
                lsn: lsn("0/100000"),
                found: 0xD10D
            }
        );
        // Timeline going backwards between pages.
        let mut b = WalBuilder::new(SYSID, seg1m(), 3, lsn("0/100000"));
        b.push(1, 0, 1, &[0; 100]);
        b.set_timeline(2);
        b.push(1, 0, 1, &[0; 10_000]);
        let p = VerifyParams {
            system_identifier: SYSID,
            segment_size: seg1m(),
            timeline: tl(3),
        };
        assert_eq!(
            feed_chunked(p, b.start(), b.bytes(), 99).unwrap_err(),
            VerifyError::Timeline {
                lsn: lsn("0/102000"),
                min: 3,
                max: 3,
                found: 2
            }
        );
    }

    #[test]
    fn prev_links_and_lengths() {
        let p = VerifyParams {
            system_identifier: SYSID,
            segment_size: seg1m(),
            timeline: tl(1),
        };
        let mut b = WalBuilder::new(SYSID, seg1m(), 1, lsn("0/100000"));
        let first = b.push(1, 0, 1, &[0; 100]);
        b.set_prev(lsn("0/100010"));
        let second = b.push(1, 0, 1, &[0; 100]);
        assert_eq!(
            feed_chunked(p, b.start(), b.bytes(), 10).unwrap_err(),
            VerifyError::PrevLink {
                lsn: second,
                expected: first,
                found: lsn("0/100010")
            }
        );
        // The first record of a stream must point backwards.
        let mut b = WalBuilder::new(SYSID, seg1m(), 1, lsn("0/100000"));
        b.set_prev(lsn("0/100028"));
        b.push(1, 0, 1, &[0; 100]);
        assert_eq!(
            feed_chunked(p, b.start(), b.bytes(), 10).unwrap_err(),
            VerifyError::PrevLinkNotBefore {
                lsn: lsn("0/100028"),
                found: lsn("0/100028")
            }
        );
        // Lengths.
        let mut b = WalBuilder::new(SYSID, seg1m(), 1, lsn("0/100000"));
        b.push(1, 0, 1, &[0; 100]);
        let mut bytes = b.bytes().to_vec();
        bytes[0x28..0x2C].copy_from_slice(&23u32.to_le_bytes());
        assert_eq!(
            feed_chunked(p, b.start(), &bytes, 1).unwrap_err(),
            VerifyError::RecordTooShort {
                lsn: lsn("0/100028"),
                found: 23
            }
        );
        bytes[0x28..0x2C].copy_from_slice(&(1u32 << 30).to_le_bytes());
        assert_eq!(
            feed_chunked(p, b.start(), &bytes, 3).unwrap_err(),
            VerifyError::RecordTooLong {
                lsn: lsn("0/100028"),
                found: 1 << 30
            }
        );
    }

    #[test]
    fn errors_render_on_one_line_with_the_lsn() {
        let errs = [
            VerifyError::Crc {
                lsn: lsn("0/9EDE00"),
                expected: 1,
                found: 2,
            },
            VerifyError::Timeline {
                lsn: lsn("0/C02000"),
                min: 2,
                max: 2,
                found: 3,
            },
            VerifyError::MissingContinuation {
                lsn: lsn("0/F00000"),
                record: lsn("0/EFC688"),
                expected: 5,
                info: 6,
            },
            VerifyError::NonZeroAfterSwitch {
                lsn: lsn("0/AFFFFF"),
                switch: lsn("0/AABC90"),
                found: 1,
            },
        ];
        for e in errs {
            let s = e.to_string();
            assert!(!s.contains('\n'), "{s}");
            assert!(s.contains(&e.lsn().to_string()), "{s}");
            assert!(s.contains("expected") && s.contains("found"), "{s}");
        }
    }

    #[test]
    fn nonzero_scans() {
        let mut v = vec![0u8; 10_000];
        assert_eq!(first_nonzero(&v), None);
        assert_eq!(len_without_zero_tail(&v), 0);
        v[4097] = 1;
        assert_eq!(first_nonzero(&v), Some(4097));
        assert_eq!(len_without_zero_tail(&v), 4098);
        v[9999] = 1;
        assert_eq!(len_without_zero_tail(&v), 10_000);
        assert_eq!(len_without_zero_tail(&[]), 0);
    }

    #[test]
    fn segment_checker_in_pieces_equals_check_segment() {
        for (name, tli, start) in [
            ("000000010000000000000009", 1, "0/900000"),
            ("00000001000000000000000A", 1, "0/A00000"),
            ("00000002000000000000000B", 2, "0/B00000"),
            ("00000003000000000000000F", 3, "0/F00000"),
        ] {
            let data = fixture(name);
            let whole = check_segment(params(tli), lsn(start), &data).unwrap();
            for piece in [1usize, 7, 4096, 8192, 100_000, MB as usize] {
                let mut c = SegmentChecker::new(params(tli), lsn(start));
                for p in data.chunks(piece) {
                    c.update(p).unwrap();
                }
                assert_eq!(c.len(), MB);
                assert_eq!(c.finish().unwrap(), whole, "{name} in {piece}-byte pieces");
            }
        }
        // A zero tail given as update_zeros: the same as the zeros themselves.
        let data = fixture("00000001000000000000000A");
        let whole = check_segment(params(1), lsn("0/A00000"), &data).unwrap();
        let end = (whole.data_end.0 - 0xA00000) as usize;
        let mut c = SegmentChecker::new(params(1), lsn("0/A00000"));
        c.update(&data[..end]).unwrap();
        c.update_zeros(MB - end as u64).unwrap();
        assert_eq!(c.finish().unwrap(), whole);
        // Too many or too few bytes.
        let mut c = SegmentChecker::new(params(1), lsn("0/A00000"));
        c.update(&data).unwrap();
        assert!(matches!(
            c.update(&[0]),
            Err(VerifyError::SegmentLength { found, .. }) if found == MB + 1
        ));
        let mut c = SegmentChecker::new(params(1), lsn("0/A00000"));
        c.update(&data[..5000]).unwrap();
        assert!(matches!(
            c.finish(),
            Err(VerifyError::SegmentLength { found: 5000, .. })
        ));
        // A non-zero byte after zeros: the zeros were data, and are checked as such.
        let mut bad = data.clone();
        bad[MB as usize - 1] = 1;
        let mut c = SegmentChecker::new(params(1), lsn("0/A00000"));
        let err = bad.chunks(65536).try_for_each(|p| c.update(p)).unwrap_err();
        assert_eq!(
            err,
            check_segment(params(1), lsn("0/A00000"), &bad).unwrap_err()
        );
    }

    #[test]
    fn page_timelines_follow_the_history() {
        use crate::wal::TimelineHistory;
        let read = |n: &str| std::fs::read(format!("{FIXTURES}/{n}")).unwrap();
        let h2 = TimelineHistory::parse(&read("00000002.history")).unwrap();
        let h3 = TimelineHistory::parse(&read("00000003.history")).unwrap();
        // The first segment of timeline 2 starts with timeline 1's page up to 0/B000D8.
        let mut c = SegmentChecker::new(params(2), lsn("0/B00000"));
        c.update(&fixture("00000002000000000000000B")).unwrap();
        let pages = c.timeline_pages().to_vec();
        // Timeline 2 up to the page of its XLOG_SWITCH at 0/B81C88 (zeros after it).
        assert_eq!(
            pages,
            vec![(tl(1), lsn("0/B00000")), (tl(2), lsn("0/B80000"))]
        );
        check_page_timelines(tl(2), &pages, Some(&h2)).unwrap();
        check_page_timelines(tl(3), &pages, Some(&h3)).unwrap();
        assert_eq!(
            check_page_timelines(tl(2), &pages, None),
            Err(TimelineError::NoHistory {
                lsn: lsn("0/B00000"),
                timeline: tl(2),
                found: tl(1)
            })
        );
        // Timeline 1 ending at the page start: the page cannot be timeline 1's.
        let early = TimelineHistory::parse(b"1\t0/B00000\tx\n").unwrap();
        assert_eq!(
            check_page_timelines(tl(2), &pages, Some(&early)),
            Err(TimelineError::AfterSwitch {
                lsn: lsn("0/B00000"),
                timeline: tl(2),
                found: tl(1),
                switch: lsn("0/B00000")
            })
        );
        // Timeline 3 forked off timeline 1 directly: timeline 2 is not in its history.
        let other = TimelineHistory::parse(b"1\t0/C00000\tx\n").unwrap();
        assert_eq!(
            check_page_timelines(tl(3), &pages, Some(&other)),
            Err(TimelineError::NotAncestor {
                lsn: lsn("0/B80000"),
                timeline: tl(3),
                found: tl(2)
            })
        );
        assert!(check_page_timelines(tl(1), &[(tl(1), lsn("0/900000"))], None).is_ok());
        // Timeline 1's WAL past the fork point, served as timeline 2's: refused.
        let mut b = WalBuilder::new(FIXTURE_SYSID, seg1m(), 1, lsn("0/500000"));
        b.push(1, 0, 1, &[5; 30_000]);
        let mut c = SegmentChecker::new(params(2), lsn("0/500000"));
        c.update(b.bytes()).unwrap();
        c.update_zeros(MB - b.bytes().len() as u64).unwrap();
        let h = TimelineHistory::parse(b"1\t0/500100\tx\n").unwrap();
        assert_eq!(
            check_page_timelines(tl(2), c.timeline_pages(), Some(&h)),
            Err(TimelineError::AfterSwitch {
                lsn: lsn("0/506000"),
                timeline: tl(2),
                found: tl(1),
                switch: lsn("0/500100")
            })
        );
        for e in [
            TimelineError::NoHistory {
                lsn: lsn("0/B00000"),
                timeline: tl(2),
                found: tl(1),
            },
            TimelineError::NotAncestor {
                lsn: lsn("0/B00000"),
                timeline: tl(2),
                found: tl(1),
            },
        ] {
            let s = e.to_string();
            assert!(
                !s.contains('\n') && s.contains("expected") && s.contains("found"),
                "{s}"
            );
        }
    }
}
