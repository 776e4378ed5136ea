//! The one WAL page and record reader: a push reader that walks page headers, follows records
//! across pages and segments, and checks each record's length, `xl_prev` link and CRC-32C.
//!
//! [`WalReader::feed`] takes chunks with arbitrary boundaries (mid-page, mid-record, mid-header,
//! across segments). The reader keeps one page header and one record header of state and
//! computes CRCs over the input slices; it copies a record's bytes only when the [`Sink`] asks
//! for them ([`Sink::wants_image`]). Complete, checked records go to [`Sink::record`].
//!
//! Two settings ([`Strictness`]) share every rule of the format; they differ only in what they
//! insist on:
//!
//! - [`Strictness::Strict`] is the check of WAL as a server sends it ([`super::verify`]: `walagent
//!   stream`, `backup`, `wal-fetch`): it also checks that the magic never changes, the timeline
//!   (`xlp_tli` never goes backwards nor above the streamed timeline), the system identifier,
//!   that `XLP_FIRST_IS_CONTRECORD` and `XLP_FIRST_IS_OVERWRITE_CONTRECORD` are not both set and
//!   that the latter only comes where a record was in progress, and that everything after an
//!   `XLOG_SWITCH` record up to its segment end is zero. A record's `xl_prev` is checked as soon
//!   as its header is complete.
//! - [`Strictness::Lenient`] reads WAL files the way PostgreSQL's recovery reads them
//!   (`xlogreader.c`; [`super::xact`], restore planning): the first failing check is where valid
//!   WAL ends ([`WalReader::lenient_end`] says where and why), not an error of the data. It does
//!   not look at timelines, system identifiers or a switch record's zero fill (the rest of that
//!   segment is skipped unread); it checks `xlp_rem_len` on every continued page, checks
//!   `xl_prev` when the record is complete (before its CRC), and starts afresh at every segment
//!   boundary with no record in progress (the next segment's first page may skip the rest of a
//!   record begun before, as at a scan start). A record continued by an
//!   `XLP_FIRST_IS_OVERWRITE_CONTRECORD` page is dropped whatever the other flag says, but the
//!   rest of a record being skipped at a scan start must be continued normally.
//!
//! On WAL a server wrote, both settings deliver the same records. Layouts: [`super::page`],
//! [`super::record`]; rules: `src/backend/access/transam/xlogreader.c` and `xlog.c`; see
//! `proto-notes/wal-format.md`.

use std::fmt;

use super::page::{
    major_of_magic, HeaderBytes, LongHeader, PageHeader, SIZE_OF_LONG_PHD, SIZE_OF_SHORT_PHD,
    XLP_ALL_FLAGS, XLP_FIRST_IS_CONTRECORD, XLP_FIRST_IS_OVERWRITE_CONTRECORD, XLP_LONG_HEADER,
};
use super::record::{
    record_crc, RecordHeader, RecordHeaderBytes, MAX_TOT_LEN, RM_XLOG_ID, SIZE_OF_XLOG_RECORD,
    XLOG_SWITCH, XLR_RMGR_INFO_MASK,
};
use super::{Lsn, SegmentSize, Timeline, WAL_PAGE_SIZE};

const PAGE: u64 = WAL_PAGE_SIZE as u64;
const REC_HDR: usize = SIZE_OF_XLOG_RECORD;

/// What the reader insists on; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strictness {
    /// Every check; any failure is an error of the data ([`VerifyError`]).
    Strict,
    /// PostgreSQL recovery's reading: a failure is the end of valid WAL.
    Lenient,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifyParams {
    /// `IDENTIFY_SYSTEM`'s systemid; every segment's long header must carry it.
    pub system_identifier: u64,
    pub segment_size: SegmentSize,
    /// The timeline being streamed: no page may carry a higher `xlp_tli`.
    pub timeline: Timeline,
}

/// A WAL check failed. Every variant carries the LSN of the problem (a page's LSN for page-header
/// problems, a record's start LSN for record problems) and renders as one line saying what was
/// expected and what was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("WAL at {lsn}: expected the stream to start at a segment boundary ({segment_size} segments), found offset {offset:#X} into the segment")]
    StartNotSegmentAligned {
        lsn: Lsn,
        segment_size: SegmentSize,
        offset: u32,
    },
    #[error("WAL at {lsn}: expected positions below 2^64, found {len} more bytes")]
    PositionOverflow { lsn: Lsn, len: u64 },
    #[error("WAL segment at {lsn}: expected exactly {expected} bytes, found {found}")]
    SegmentLength { lsn: Lsn, expected: u64, found: u64 },
    #[error(
        "WAL page at {lsn}: expected xlp_magic 0xD110/0xD113/0xD116/0xD118 (PostgreSQL 15-18), found {found:#06X}"
    )]
    UnknownMagic { lsn: Lsn, found: u16 },
    #[error("WAL page at {lsn}: expected xlp_magic {expected:#06X} as on the earlier pages, found {found:#06X}")]
    MagicChanged { lsn: Lsn, expected: u16, found: u16 },
    #[error("WAL page at {lsn}: expected xlp_info bits within 0x000F, found {found:#06X}")]
    InfoBits { lsn: Lsn, found: u16 },
    #[error("WAL page at {lsn}: expected XLP_LONG_HEADER on the first page of a segment, found xlp_info {info:#06X}")]
    MissingLongHeader { lsn: Lsn, info: u16 },
    #[error("WAL page at {lsn}: expected a short header (not a segment's first page), found XLP_LONG_HEADER in xlp_info {info:#06X}")]
    UnexpectedLongHeader { lsn: Lsn, info: u16 },
    #[error("WAL page at {lsn}: expected xlp_pageaddr {lsn}, found {found}")]
    PageAddress { lsn: Lsn, found: Lsn },
    #[error("WAL page at {lsn}: expected xlp_tli between {min} and {max}, found {found}")]
    Timeline {
        lsn: Lsn,
        min: u32,
        max: u32,
        found: u32,
    },
    #[error("WAL segment at {lsn}: expected system identifier {expected}, found {found}")]
    SystemIdentifier { lsn: Lsn, expected: u64, found: u64 },
    #[error("WAL segment at {lsn}: expected xlp_seg_size {expected}, found {found}")]
    SegmentSize { lsn: Lsn, expected: u32, found: u32 },
    #[error("WAL segment at {lsn}: expected xlp_xlog_blcksz {expected}, found {found}")]
    BlockSize { lsn: Lsn, expected: u32, found: u32 },
    /// `record` is the record's LSN, or the stream start for a record begun before it.
    #[error("WAL page at {lsn}: expected XLP_FIRST_IS_CONTRECORD with {expected} bytes of the record at {record} still to come, found xlp_info {info:#06X}")]
    MissingContinuation {
        lsn: Lsn,
        record: Lsn,
        expected: u32,
        info: u16,
    },
    #[error("WAL page at {lsn}: expected no continued record (the previous record ended before this page), found XLP_FIRST_IS_CONTRECORD with xlp_rem_len {rem_len}")]
    UnexpectedContinuation { lsn: Lsn, rem_len: u32 },
    /// `record` is the record's LSN, or the stream start for a record begun before it.
    #[error("WAL page at {lsn}: expected xlp_rem_len {expected} (rest of the record at {record}), found {found}")]
    ContinuationLength {
        lsn: Lsn,
        record: Lsn,
        expected: u32,
        found: u32,
    },
    #[error("WAL page at {lsn}: expected xlp_rem_len between 1 and 1073741823 for the record continued from before the stream start, found {found}")]
    StartContinuationLength { lsn: Lsn, found: u32 },
    #[error(
        "WAL page at {lsn}: expected xlp_rem_len 0 without XLP_FIRST_IS_CONTRECORD, found {found}"
    )]
    StrayRemainingLength { lsn: Lsn, found: u32 },
    #[error("WAL page at {lsn}: expected XLP_FIRST_IS_OVERWRITE_CONTRECORD only on a page where a record was cut short, found it (xlp_info {info:#06X}) with no record in progress")]
    UnexpectedOverwrite { lsn: Lsn, info: u16 },
    #[error("WAL page at {lsn}: expected at most one of XLP_FIRST_IS_CONTRECORD and XLP_FIRST_IS_OVERWRITE_CONTRECORD, found xlp_info {info:#06X}")]
    ConflictingContinuationFlags { lsn: Lsn, info: u16 },
    #[error("WAL record at {lsn}: expected xl_tot_len of at least 24, found {found}")]
    RecordTooShort { lsn: Lsn, found: u32 },
    #[error("WAL record at {lsn}: expected xl_tot_len below 1 GiB, found {found}")]
    RecordTooLong { lsn: Lsn, found: u32 },
    #[error(
        "WAL record at {lsn}: expected xl_prev {expected} (the previous record), found {found}"
    )]
    PrevLink { lsn: Lsn, expected: Lsn, found: Lsn },
    #[error("WAL record at {lsn}: expected xl_prev before the record itself, found {found}")]
    PrevLinkNotBefore { lsn: Lsn, found: Lsn },
    #[error(
        "WAL record at {lsn}: expected CRC-32C {expected:#010X} (computed over the record), found xl_crc {found:#010X}"
    )]
    Crc { lsn: Lsn, expected: u32, found: u32 },
    #[error("WAL at {lsn}: expected only zero bytes from the XLOG_SWITCH record at {switch} to the segment end, found byte {found:#04X}")]
    NonZeroAfterSwitch { lsn: Lsn, switch: Lsn, found: u8 },
}

impl VerifyError {
    /// Where the problem is: a page's LSN for page-header problems, a record's start LSN for
    /// record problems, the offending byte for data after a switch record.
    pub fn lsn(&self) -> Lsn {
        use VerifyError::*;
        match *self {
            StartNotSegmentAligned { lsn, .. }
            | PositionOverflow { lsn, .. }
            | SegmentLength { lsn, .. }
            | UnknownMagic { lsn, .. }
            | MagicChanged { lsn, .. }
            | InfoBits { lsn, .. }
            | MissingLongHeader { lsn, .. }
            | UnexpectedLongHeader { lsn, .. }
            | PageAddress { lsn, .. }
            | Timeline { lsn, .. }
            | SystemIdentifier { lsn, .. }
            | SegmentSize { lsn, .. }
            | BlockSize { lsn, .. }
            | MissingContinuation { lsn, .. }
            | UnexpectedContinuation { lsn, .. }
            | ContinuationLength { lsn, .. }
            | StartContinuationLength { lsn, .. }
            | StrayRemainingLength { lsn, .. }
            | UnexpectedOverwrite { lsn, .. }
            | ConflictingContinuationFlags { lsn, .. }
            | RecordTooShort { lsn, .. }
            | RecordTooLong { lsn, .. }
            | PrevLink { lsn, .. }
            | PrevLinkNotBefore { lsn, .. }
            | Crc { lsn, .. }
            | NonZeroAfterSwitch { lsn, .. } => lsn,
        }
    }
}

/// Why valid WAL ends where it does (the [`Strictness::Lenient`] reading of a failed check).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndReason {
    /// `xl_tot_len` 0: nothing was written here (a pre-zeroed `.partial` tail, or a recycled
    /// file's unwritten part).
    ZeroLength,
    /// `xl_tot_len` below the header size or 1 GiB and over.
    BadLength(u32),
    /// The page header is not a valid one for this position (wrong magic or address: a zero page
    /// or an old recycled file), with a description.
    PageHeader(String),
    /// The page does not continue the record in progress as it should.
    MissingContinuation,
    /// `xl_prev` does not point at the previous record.
    PrevLink { expected: Lsn, found: Lsn },
    /// The record's CRC-32C does not match.
    Crc,
}

impl fmt::Display for EndReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndReason::ZeroLength => f.write_str("zero record length (no WAL written here)"),
            EndReason::BadLength(n) => write!(f, "invalid record length {n}"),
            EndReason::PageHeader(d) => write!(f, "invalid page header: {d}"),
            EndReason::MissingContinuation => {
                f.write_str("the next page does not continue the record")
            }
            EndReason::PrevLink { expected, found } => {
                write!(
                    f,
                    "xl_prev {found} does not link to the previous record {expected}"
                )
            }
            EndReason::Crc => f.write_str("record CRC mismatch"),
        }
    }
}

/// A complete record whose length, `xl_prev` and CRC-32C checked out.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    /// Where it starts (PostgreSQL's ReadRecPtr).
    pub lsn: Lsn,
    /// Just past its last byte (EndRecPtr), page headers included.
    pub end: Lsn,
    pub header: RecordHeader,
    /// The whole record (header included, page headers left out), when
    /// [`Sink::wants_image`] asked for it.
    pub image: Option<&'a [u8]>,
    /// `xlp_magic` of the page the record ends on.
    pub magic: u16,
}

/// What the reader tells as it goes. Every method has a default that does nothing, so `()`
/// is the sink that only checks.
pub trait Sink {
    /// A page header at `lsn` passed the checks of its own fields (before the continuation
    /// checks against the record in progress).
    #[inline]
    fn page(&mut self, _lsn: Lsn, _header: &PageHeader) {}
    /// A segment's long header at `lsn` passed the checks of its fields.
    #[inline]
    fn long_header(&mut self, _lsn: Lsn, _header: &LongHeader) {}
    /// A record's header is complete (not yet checked): should its bytes be gathered for
    /// [`Record::image`]?
    #[inline]
    fn wants_image(&mut self, _header: &RecordHeaderBytes) -> bool {
        false
    }
    /// A complete, checked record.
    #[inline]
    fn record(&mut self, _record: &Record<'_>) {}
}

impl Sink for () {}

/// What the bytes after the current page header (if any) are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    /// Before the first page header of a stream (or, lenient, of a segment begun with no record
    /// in progress): whether a record continues from before is unknown until that header is read.
    Start,
    /// Between records: the next record starts at the next MAXALIGN boundary.
    Idle,
    /// Skipping the rest of a record whose beginning was before the stream start (`since`);
    /// `remaining` bytes of it are still to come.
    Skip { remaining: u32, since: u64 },
    /// Inside the record described by the `rec_*` fields.
    Record,
    /// After an XLOG_SWITCH record (starting at `switch`) up to `until` (the end of the segment
    /// the record ends in): zero bytes, page headers included (strict), or bytes not read
    /// (lenient).
    SwitchTail { switch: u64, until: u64 },
}

/// The push reader; see the module documentation.
#[derive(Debug, Clone)]
pub struct WalReader {
    strict: bool,
    /// Strict only: the long headers' system identifier and the highest `xlp_tli`.
    system_identifier: u64,
    timeline: Timeline,
    segment_size: SegmentSize,
    seg_size: u64,
    /// Position of the next byte `feed` expects.
    pos: u64,
    /// Strict: the stream's magic. Lenient: the magic of the last valid page header.
    magic: Option<u16>,
    /// xlp_tli of the last page header seen (0 before the first).
    last_tli: u32,
    /// Page header being assembled (it may be split across chunks).
    phdr: HeaderBytes,
    body: Body,
    /// Start of the last record that verified completely.
    prev: Option<u64>,
    rec_start: u64,
    rec_hdr: RecordHeaderBytes,
    rec_hdr_len: usize,
    /// xl_tot_len, or 0 while fewer than 4 header bytes have arrived.
    rec_tot_len: u32,
    /// Bytes of the record (header included) not yet seen; valid once rec_tot_len is known.
    rec_remaining: u32,
    rec_crc: u32,
    /// The current record's bytes are gathered into `image`.
    collect: bool,
    image: Vec<u8>,
    records: u64,
    /// With [`track_timelines`](Self::track_timelines): each `xlp_tli` seen, in order, with the
    /// LSN of the last page header that carried it.
    timelines: Option<Vec<(Timeline, Lsn)>>,
}

impl WalReader {
    /// A [`Strictness::Strict`] reader of the stream of `params` from `start`, which must be a
    /// segment start (the caller checks; [`super::verify::WalVerifier`] reports a bad one). At the
    /// start nothing is known about a record continued from the previous segment: the first
    /// page's `xlp_rem_len` bytes (MAXALIGN'd) are skipped unchecked, and the first record's
    /// `xl_prev` can only be checked to point backwards.
    pub fn strict(params: VerifyParams, start: Lsn) -> Self {
        Self::new(Strictness::Strict, params, start)
    }

    /// A [`Strictness::Lenient`] reader of WAL of `segment_size` segments from the segment start
    /// `start`.
    pub fn lenient(segment_size: SegmentSize, start: Lsn) -> Self {
        let params = VerifyParams {
            system_identifier: 0,
            segment_size,
            timeline: Timeline::MAX,
        };
        Self::new(Strictness::Lenient, params, start)
    }

    pub fn new(strictness: Strictness, params: VerifyParams, start: Lsn) -> Self {
        WalReader {
            strict: strictness == Strictness::Strict,
            system_identifier: params.system_identifier,
            timeline: params.timeline,
            segment_size: params.segment_size,
            seg_size: u64::from(params.segment_size.bytes()),
            pos: start.0,
            magic: None,
            last_tli: 0,
            phdr: [0; SIZE_OF_LONG_PHD],
            body: Body::Start,
            prev: None,
            rec_start: 0,
            rec_hdr: [0; REC_HDR],
            rec_hdr_len: 0,
            rec_tot_len: 0,
            rec_remaining: 0,
            rec_crc: 0,
            collect: false,
            image: Vec::new(),
            records: 0,
            timelines: None,
        }
    }

    pub fn strictness(&self) -> Strictness {
        if self.strict {
            Strictness::Strict
        } else {
            Strictness::Lenient
        }
    }

    pub fn segment_size(&self) -> SegmentSize {
        self.segment_size
    }

    /// Also record which pages carry which `xlp_tli` (strict; see
    /// [`timeline_pages`](Self::timeline_pages)). Off by default: the stream does not need it.
    pub fn track_timelines(&mut self) {
        self.timelines.get_or_insert_with(Vec::new);
    }

    /// With [`track_timelines`](Self::track_timelines): every `xlp_tli` seen so far on a valid page
    /// header, in stream order, each with the LSN of the last page that carried it. Empty when
    /// not tracking.
    pub fn timeline_pages(&self) -> &[(Timeline, Lsn)] {
        self.timelines.as_deref().unwrap_or(&[])
    }

    /// The position of the next byte to feed.
    pub fn position(&self) -> Lsn {
        Lsn(self.pos)
    }

    /// The server major version from the page magic (15, 16, 17 or 18), once a page header was
    /// seen.
    pub fn server_major(&self) -> Option<u32> {
        self.magic.and_then(major_of_magic)
    }

    /// How many records have been checked completely (CRC included).
    pub fn records(&self) -> u64 {
        self.records
    }

    /// The start of the record in progress (begun, not complete), if any.
    pub fn record_in_progress(&self) -> Option<Lsn> {
        (self.body == Body::Record).then_some(Lsn(self.rec_start))
    }

    /// Skipping the rest of a record begun before the stream (or, lenient, segment) start.
    pub fn skipping(&self) -> bool {
        matches!(self.body, Body::Skip { .. })
    }

    /// Reads `data`, which begins exactly at [`position`](Self::position). On error the
    /// reader's state is unspecified (the caller stops), except that
    /// [`lenient_end`](Self::lenient_end) reads the error.
    #[inline]
    pub fn feed<S: Sink>(&mut self, data: &[u8], sink: &mut S) -> Result<(), VerifyError> {
        if self.pos.checked_add(data.len() as u64).is_none() {
            return Err(VerifyError::PositionOverflow {
                lsn: Lsn(self.pos),
                len: data.len() as u64,
            });
        }
        let mut data = data;
        while !data.is_empty() {
            let n = self.step(data, sink)?;
            data = &data[n..];
            self.pos += n as u64;
        }
        Ok(())
    }

    /// Consumes a prefix of `data` (at least one byte) and returns its length. Never crosses a
    /// page boundary, so `self.pos` tells where each consumed byte sits.
    #[inline]
    fn step<S: Sink>(&mut self, data: &[u8], sink: &mut S) -> Result<usize, VerifyError> {
        if let Body::SwitchTail { switch, until } = self.body {
            return self.step_switch_tail(data, switch, until);
        }
        let page_off = (self.pos % PAGE) as usize;
        let hdr_size = if (self.pos - page_off as u64).is_multiple_of(self.seg_size) {
            SIZE_OF_LONG_PHD
        } else {
            SIZE_OF_SHORT_PHD
        };
        if page_off < hdr_size {
            if page_off == 0
                && !self.strict
                && hdr_size == SIZE_OF_LONG_PHD
                && matches!(self.body, Body::Idle | Body::Skip { .. })
            {
                // Lenient: a segment with no record in progress from the one before starts
                // afresh, as a scan starts (what the skipped record's rest is, is not checked).
                self.body = Body::Start;
            }
            let n = (hdr_size - page_off).min(data.len());
            self.phdr[page_off..page_off + n].copy_from_slice(&data[..n]);
            if page_off + n == hdr_size {
                self.check_page_header(self.pos - page_off as u64, hdr_size, sink)?;
            }
            return Ok(n);
        }
        let page_left = WAL_PAGE_SIZE as usize - page_off;
        match self.body {
            Body::Idle | Body::Start => {
                let pad = (8 - (self.pos % 8) as usize) % 8;
                if pad > 0 {
                    // MAXALIGN padding after the previous record; never crosses a page.
                    return Ok(pad.min(data.len()));
                }
                self.rec_start = self.pos;
                self.rec_hdr_len = 0;
                self.rec_tot_len = 0;
                self.rec_remaining = 0;
                self.rec_crc = 0;
                self.collect = false;
                self.body = Body::Record;
                self.step_record(data, page_left, sink)
            }
            Body::Record => self.step_record(data, page_left, sink),
            Body::Skip { remaining, since } => {
                let n = (remaining as usize).min(page_left).min(data.len());
                let remaining = remaining - n as u32;
                self.body = if remaining == 0 {
                    Body::Idle
                } else {
                    Body::Skip { remaining, since }
                };
                Ok(n)
            }
            Body::SwitchTail { .. } => Ok(0), // handled above
        }
    }

    #[inline]
    fn step_record<S: Sink>(
        &mut self,
        data: &[u8],
        page_left: usize,
        sink: &mut S,
    ) -> Result<usize, VerifyError> {
        if self.rec_hdr_len < REC_HDR {
            let have = self.rec_hdr_len;
            let n = (REC_HDR - have).min(page_left).min(data.len());
            self.rec_hdr[have..have + n].copy_from_slice(&data[..n]);
            self.rec_hdr_len = have + n;
            if self.rec_tot_len == 0 && self.rec_hdr_len >= 4 {
                let tot = u32::from_le_bytes([
                    self.rec_hdr[0],
                    self.rec_hdr[1],
                    self.rec_hdr[2],
                    self.rec_hdr[3],
                ]);
                if (tot as usize) < REC_HDR {
                    return Err(VerifyError::RecordTooShort {
                        lsn: Lsn(self.rec_start),
                        found: tot,
                    });
                }
                if tot >= MAX_TOT_LEN {
                    return Err(VerifyError::RecordTooLong {
                        lsn: Lsn(self.rec_start),
                        found: tot,
                    });
                }
                self.rec_tot_len = tot;
                self.rec_remaining = tot - self.rec_hdr_len as u32;
            } else if self.rec_tot_len != 0 {
                self.rec_remaining -= n as u32;
            }
            if self.rec_hdr_len == REC_HDR {
                if self.strict {
                    self.check_prev()?;
                }
                if sink.wants_image(&self.rec_hdr) {
                    self.collect = true;
                    self.image.clear();
                    self.image.extend_from_slice(&self.rec_hdr);
                }
                if self.rec_remaining == 0 {
                    self.finish_record(self.pos + n as u64, sink)?;
                }
            }
            return Ok(n);
        }
        let n = (self.rec_remaining as usize).min(page_left).min(data.len());
        let body = &data[..n];
        self.rec_crc = crc32c::crc32c_append(self.rec_crc, body);
        if self.collect {
            self.image.extend_from_slice(body);
        }
        self.rec_remaining -= n as u32;
        if self.rec_remaining == 0 {
            self.finish_record(self.pos + n as u64, sink)?;
        }
        Ok(n)
    }

    fn step_switch_tail(
        &mut self,
        data: &[u8],
        switch: u64,
        until: u64,
    ) -> Result<usize, VerifyError> {
        let to_end = until - self.pos;
        let n = (to_end.min(data.len() as u64)) as usize;
        if self.strict {
            if let Some(off) = first_nonzero(&data[..n]) {
                return Err(VerifyError::NonZeroAfterSwitch {
                    lsn: Lsn(self.pos + off as u64),
                    switch: Lsn(switch),
                    found: data[off],
                });
            }
        }
        if n as u64 == to_end {
            self.body = Body::Idle;
        }
        Ok(n)
    }

    fn check_prev(&self) -> Result<(), VerifyError> {
        let h = &self.rec_hdr;
        let xl_prev = u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
        match self.prev {
            Some(prev) if xl_prev != prev => Err(VerifyError::PrevLink {
                lsn: Lsn(self.rec_start),
                expected: Lsn(prev),
                found: Lsn(xl_prev),
            }),
            None if xl_prev >= self.rec_start => Err(VerifyError::PrevLinkNotBefore {
                lsn: Lsn(self.rec_start),
                found: Lsn(xl_prev),
            }),
            _ => Ok(()),
        }
    }

    /// `end` is the stream position just past the record's last byte.
    fn finish_record<S: Sink>(&mut self, end: u64, sink: &mut S) -> Result<(), VerifyError> {
        if !self.strict {
            self.check_prev()?;
        }
        let h = self.rec_hdr;
        let computed = record_crc(self.rec_crc, &h);
        let stored = u32::from_le_bytes([h[20], h[21], h[22], h[23]]);
        if computed != stored {
            return Err(VerifyError::Crc {
                lsn: Lsn(self.rec_start),
                expected: computed,
                found: stored,
            });
        }
        self.records += 1;
        self.prev = Some(self.rec_start);
        let (info, rmid) = (h[16], h[17]);
        let is_switch = rmid == RM_XLOG_ID && info & XLR_RMGR_INFO_MASK == XLOG_SWITCH;
        self.body = if is_switch && !end.is_multiple_of(self.seg_size) {
            // Everything after the switch record up to the end of its segment is zero (xlog.c
            // zeroes even the page headers there). A switch ending exactly at a segment end has
            // no tail.
            Body::SwitchTail {
                switch: self.rec_start,
                until: (end - end % self.seg_size).saturating_add(self.seg_size),
            }
        } else {
            Body::Idle
        };
        let record = Record {
            lsn: Lsn(self.rec_start),
            end: Lsn(end),
            header: RecordHeader::from_bytes(&h),
            image: self.collect.then_some(&self.image[..]),
            magic: self.magic.unwrap_or(0),
        };
        sink.record(&record);
        Ok(())
    }

    fn check_page_header<S: Sink>(
        &mut self,
        page: u64,
        hdr_size: usize,
        sink: &mut S,
    ) -> Result<(), VerifyError> {
        let lsn = Lsn(page);
        let header = PageHeader::from_bytes(&self.phdr);
        let PageHeader {
            magic,
            info,
            tli,
            pageaddr,
            rem_len,
        } = header;
        let pageaddr = pageaddr.0;

        match self.magic {
            Some(m) if m == magic => {}
            Some(m) if self.strict => {
                return Err(if major_of_magic(magic).is_some() {
                    VerifyError::MagicChanged {
                        lsn,
                        expected: m,
                        found: magic,
                    }
                } else {
                    VerifyError::UnknownMagic { lsn, found: magic }
                })
            }
            _ => {
                if major_of_magic(magic).is_none() {
                    return Err(VerifyError::UnknownMagic { lsn, found: magic });
                }
                if self.strict {
                    self.magic = Some(magic);
                }
            }
        }
        if info & !XLP_ALL_FLAGS != 0 {
            return Err(VerifyError::InfoBits { lsn, found: info });
        }
        let first_of_segment = hdr_size == SIZE_OF_LONG_PHD;
        let long_header = || {
            if first_of_segment && info & XLP_LONG_HEADER == 0 {
                return Err(VerifyError::MissingLongHeader { lsn, info });
            }
            if !first_of_segment && info & XLP_LONG_HEADER != 0 {
                return Err(VerifyError::UnexpectedLongHeader { lsn, info });
            }
            Ok(())
        };
        let address = || {
            if pageaddr != page {
                return Err(VerifyError::PageAddress {
                    lsn,
                    found: Lsn(pageaddr),
                });
            }
            Ok(())
        };
        if self.strict {
            long_header()?;
            address()?;
            // xlp_tli is the raw page field: it becomes a Timeline here, once it is known to be
            // at least 1.
            let min_tli = self.last_tli.max(1);
            let found = Timeline::new(tli).filter(|t| tli >= min_tli && *t <= self.timeline);
            let Some(found) = found else {
                return Err(VerifyError::Timeline {
                    lsn,
                    min: min_tli,
                    max: self.timeline.get(),
                    found: tli,
                });
            };
            self.last_tli = tli;
            if let Some(t) = &mut self.timelines {
                match t.last_mut() {
                    Some((last, at)) if *last == found => *at = lsn,
                    _ => t.push((found, lsn)),
                }
            }
        } else {
            // The order of XLogReaderValidatePageHeader's checks.
            address()?;
            long_header()?;
        }
        if first_of_segment {
            let long = LongHeader::from_bytes(&self.phdr);
            if self.strict && long.sysid != self.system_identifier {
                return Err(VerifyError::SystemIdentifier {
                    lsn,
                    expected: self.system_identifier,
                    found: long.sysid,
                });
            }
            if u64::from(long.seg_size) != self.seg_size {
                return Err(VerifyError::SegmentSize {
                    lsn,
                    expected: self.seg_size as u32,
                    found: long.seg_size,
                });
            }
            if long.blcksz != WAL_PAGE_SIZE {
                return Err(VerifyError::BlockSize {
                    lsn,
                    expected: WAL_PAGE_SIZE,
                    found: long.blcksz,
                });
            }
            sink.long_header(lsn, &long);
        }

        let cont = info & XLP_FIRST_IS_CONTRECORD != 0;
        let overwrite = info & XLP_FIRST_IS_OVERWRITE_CONTRECORD != 0;
        if self.strict && cont && overwrite {
            return Err(VerifyError::ConflictingContinuationFlags { lsn, info });
        }
        if !cont && rem_len != 0 {
            return Err(VerifyError::StrayRemainingLength {
                lsn,
                found: rem_len,
            });
        }
        if !self.strict {
            if cont && (rem_len == 0 || rem_len >= MAX_TOT_LEN) {
                return Err(VerifyError::StartContinuationLength {
                    lsn,
                    found: rem_len,
                });
            }
            self.magic = Some(magic);
        }
        sink.page(lsn, &header);
        // What is in progress at this page boundary, as (record start if known, bytes to come).
        let in_progress = match self.body {
            Body::Start => {
                // Nothing known about what came before: follow the header.
                if cont {
                    if rem_len == 0 || rem_len >= MAX_TOT_LEN {
                        return Err(VerifyError::StartContinuationLength {
                            lsn,
                            found: rem_len,
                        });
                    }
                    self.body = Body::Skip {
                        remaining: rem_len,
                        since: page,
                    };
                } else {
                    self.body = Body::Idle;
                }
                return Ok(());
            }
            Body::Idle => None,
            // Lenient: the rest of a skipped record is not dropped by an overwrite flag.
            Body::Skip { remaining, since } if self.strict || !overwrite => {
                Some((since, remaining))
            }
            Body::Skip { remaining, since } => {
                if cont && rem_len == remaining {
                    return Ok(());
                }
                return Err(VerifyError::MissingContinuation {
                    lsn,
                    record: Lsn(since),
                    expected: remaining,
                    info,
                });
            }
            Body::Record => Some((self.rec_start, self.rec_remaining)),
            Body::SwitchTail { .. } => None, // zero headers are handled by step_switch_tail
        };
        match in_progress {
            None => {
                if cont {
                    return Err(VerifyError::UnexpectedContinuation { lsn, rem_len });
                }
                if overwrite && self.strict {
                    return Err(VerifyError::UnexpectedOverwrite { lsn, info });
                }
            }
            Some(_) if overwrite => {
                // The record in progress was cut short by a crash and the server wrote new WAL
                // from this page on (xlog.c CreateOverwriteContrecordRecord). Drop it: the next
                // record (an XLOG_OVERWRITE_CONTRECORD) links back to the last complete record.
                self.body = Body::Idle;
            }
            Some((record, expected)) => {
                let record = Lsn(record);
                if !cont {
                    return Err(VerifyError::MissingContinuation {
                        lsn,
                        record,
                        expected,
                        info,
                    });
                }
                if rem_len != expected {
                    return Err(VerifyError::ContinuationLength {
                        lsn,
                        record,
                        expected,
                        found: rem_len,
                    });
                }
            }
        }
        Ok(())
    }

    /// The lenient reading of `e`, which [`feed`](Self::feed) just returned: where valid WAL
    /// ends (the start of the record in progress, else the problem's LSN: a record's start or a
    /// page) and why.
    pub fn lenient_end(&self, e: &VerifyError) -> (Lsn, EndReason) {
        use VerifyError as V;
        let at = self.record_in_progress().unwrap_or(e.lsn());
        let header = EndReason::PageHeader;
        let reason = match *e {
            V::RecordTooShort { found: 0, .. } => EndReason::ZeroLength,
            V::RecordTooShort { found, .. } | V::RecordTooLong { found, .. } => {
                EndReason::BadLength(found)
            }
            V::PrevLink {
                expected, found, ..
            } => EndReason::PrevLink { expected, found },
            V::PrevLinkNotBefore { lsn, found } => EndReason::PrevLink {
                expected: lsn,
                found,
            },
            V::Crc { .. } => EndReason::Crc,
            V::MissingContinuation { .. } | V::ContinuationLength { .. } => {
                EndReason::MissingContinuation
            }
            V::UnknownMagic { lsn, found } => header(format!(
                "page {lsn}: xlp_magic {found:#06X} is not PostgreSQL 15-18's"
            )),
            V::InfoBits { lsn, found } => header(format!(
                "page {lsn}: xlp_info {found:#06X} has unknown bits"
            )),
            V::PageAddress { lsn, found } => header(format!(
                "page {lsn}: xlp_pageaddr is {found} (a recycled segment's old content?)"
            )),
            V::MissingLongHeader { lsn, .. } => header(format!(
                "page {lsn}: XLP_LONG_HEADER missing on a segment's first page"
            )),
            V::UnexpectedLongHeader { lsn, .. } => {
                header(format!("page {lsn}: XLP_LONG_HEADER set on a later page"))
            }
            V::SegmentSize { lsn, .. } | V::BlockSize { lsn, .. } => {
                let long = LongHeader::from_bytes(&self.phdr);
                header(format!(
                    "segment {lsn}: xlp_seg_size {} / xlp_xlog_blcksz {}, expected {} / {WAL_PAGE_SIZE}",
                    long.seg_size, long.blcksz, self.seg_size
                ))
            }
            V::StrayRemainingLength { lsn, found } => header(format!(
                "page {lsn}: xlp_rem_len {found} without XLP_FIRST_IS_CONTRECORD"
            )),
            V::StartContinuationLength { lsn, found } => {
                header(format!("page {lsn}: invalid xlp_rem_len {found}"))
            }
            V::UnexpectedContinuation { lsn, rem_len } => header(format!(
                "page {lsn} continues a record (xlp_rem_len {rem_len}) but none is in progress"
            )),
            // Positions past 2^64, and checks of the strict setting only (or of the layers over
            // it), which a lenient reader never makes.
            V::PositionOverflow { .. }
            | V::StartNotSegmentAligned { .. }
            | V::SegmentLength { .. }
            | V::MagicChanged { .. }
            | V::Timeline { .. }
            | V::SystemIdentifier { .. }
            | V::UnexpectedOverwrite { .. }
            | V::ConflictingContinuationFlags { .. }
            | V::NonZeroAfterSwitch { .. } => header(e.to_string()),
        };
        (at, reason)
    }
}

/// Offset of the first non-zero byte.
pub(crate) fn first_nonzero(buf: &[u8]) -> Option<usize> {
    let mut base = 0;
    for chunk in buf.chunks(4096) {
        if chunk.iter().fold(0u8, |acc, &b| acc | b) != 0 {
            return chunk.iter().position(|&b| b != 0).map(|p| base + p);
        }
        base += chunk.len();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::synth::WalBuilder;
    use crate::wal::timeline::tl;

    const MB: u64 = 1 << 20;
    const SYSID: u64 = 0x0123_4567_89AB_CDEF;

    fn seg1m() -> SegmentSize {
        SegmentSize::new(MB).unwrap()
    }

    fn params(tli: u32) -> VerifyParams {
        VerifyParams {
            system_identifier: SYSID,
            segment_size: seg1m(),
            timeline: tl(tli),
        }
    }

    use crate::wal::synth::TestRng as Rng;

    /// A record as a sink saw it: (lsn, end, header, image).
    type Seen = (Lsn, Lsn, RecordHeader, Option<Vec<u8>>);

    #[derive(Default)]
    struct Collect {
        images: bool,
        records: Vec<Seen>,
        pages: Vec<Lsn>,
        sysids: Vec<u64>,
        magics: Vec<u16>,
    }

    impl Sink for Collect {
        fn page(&mut self, lsn: Lsn, _header: &PageHeader) {
            self.pages.push(lsn);
        }
        fn long_header(&mut self, _lsn: Lsn, header: &LongHeader) {
            self.sysids.push(header.sysid);
        }
        fn wants_image(&mut self, _header: &RecordHeaderBytes) -> bool {
            self.images
        }
        fn record(&mut self, r: &Record<'_>) {
            self.records
                .push((r.lsn, r.end, r.header, r.image.map(<[u8]>::to_vec)));
            self.magics.push(r.magic);
        }
    }

    struct Read {
        sink: Collect,
        result: Result<(), VerifyError>,
        reader: WalReader,
    }

    /// Reads `data` from `start` in chunks of random sizes (tiny ones mixed in, to split
    /// headers), stopping at the first error.
    fn read(mode: Strictness, tli: u32, start: Lsn, data: &[u8], seed: u64, images: bool) -> Read {
        let mut reader = WalReader::new(mode, params(tli), start);
        let mut sink = Collect {
            images,
            ..Collect::default()
        };
        let mut rng = Rng(seed | 1);
        let mut rest = data;
        let mut result = Ok(());
        while !rest.is_empty() {
            let n = if rng.below(4) == 0 {
                1 + rng.below(40)
            } else {
                1 + rng.below(70_000)
            };
            let n = (n as usize).min(rest.len());
            result = reader.feed(&rest[..n], &mut sink);
            if result.is_err() {
                break;
            }
            rest = &rest[n..];
        }
        Read {
            sink,
            result,
            reader,
        }
    }

    fn both(tli: u32, start: Lsn, data: &[u8], seed: u64) -> (Read, Read) {
        (
            read(Strictness::Strict, tli, start, data, seed, true),
            read(Strictness::Lenient, tli, start, data, seed ^ 0x5555, true),
        )
    }

    fn payload(rng: &mut Rng, len: usize) -> Vec<u8> {
        (0..len).map(|_| rng.next() as u8).collect()
    }

    /// Random valid WAL from 1/0 over about `segments` 1 MB segments: records from empty to
    /// 1.3 MB (longer than a segment), records that end at or near page ends, switches, and
    /// records cut short by a crash (overwrite contrecords).
    fn random_wal(seed: u64, segments: u64) -> WalBuilder {
        let mut rng = Rng(seed | 1);
        let mut b = WalBuilder::new(SYSID, seg1m(), 1, Lsn(0x1_0000_0000));
        let end = 0x1_0000_0000 + segments * MB;
        let mut xid = 0;
        while b.position().0 + 40_000 < end {
            xid += 1;
            let len = match rng.below(40) {
                0 => {
                    b.push_switch();
                    continue;
                }
                1 => {
                    let len = 9000 + rng.below(20_000) as usize;
                    let p = payload(&mut rng, len);
                    b.push_aborted(1, 0, xid, &p);
                    continue;
                }
                2 => 1_000_000 + rng.below(300_000) as usize,
                3..=6 => rng.below(8) as usize,
                7..=10 => 8192 - 24 - rng.below(64) as usize,
                11..=14 => 8192 * (1 + rng.below(3) as usize) - rng.below(48) as usize,
                15..=18 => 20_000 + rng.below(20_000) as usize,
                _ => 10 + rng.below(400) as usize,
            };
            let p = payload(&mut rng, len);
            b.push(rng.below(22) as u8, (rng.below(4) as u8) << 4, xid, &p);
        }
        b
    }

    fn lsns(r: &Read) -> Vec<(Lsn, Lsn)> {
        r.sink.records.iter().map(|s| (s.0, s.1)).collect()
    }

    #[test]
    fn strict_and_lenient_agree_on_valid_wal() {
        for seed in 1..=12 {
            let b = random_wal(seed, 4);
            let (strict, lenient) = both(1, b.start(), b.bytes(), seed);
            if let Err(e) = &strict.result {
                panic!("seed {seed}: strict: {e}");
            }
            if let Err(e) = &lenient.result {
                panic!("seed {seed}: lenient: {e}");
            }
            assert_eq!(strict.sink.records, lenient.sink.records, "seed {seed}");
            // Neither reads page headers in a switch's zero fill as headers.
            assert_eq!(strict.sink.pages, lenient.sink.pages, "seed {seed}");
            assert!(strict.sink.records.len() > 10, "seed {seed}");
            assert_eq!(strict.reader.records(), strict.sink.records.len() as u64);
            // Every image is the whole record and carries its CRC.
            for (lsn, _, h, image) in &strict.sink.records {
                let image = image.as_deref().unwrap();
                assert_eq!(image.len(), h.tot_len as usize, "{lsn}");
                let body_crc = crc32c::crc32c(&image[REC_HDR..]);
                let hdr: &RecordHeaderBytes = image[..REC_HDR].try_into().unwrap();
                assert_eq!(record_crc(body_crc, hdr), h.crc, "{lsn}");
            }
            // Without images the same records come (nothing gathered).
            let plain = read(Strictness::Strict, 1, b.start(), b.bytes(), seed, false);
            assert!(plain.sink.records.iter().all(|s| s.3.is_none()));
            assert_eq!(lsns(&plain), lsns(&strict));
            assert_eq!(strict.sink.sysids, lenient.sink.sysids);
        }
    }

    #[test]
    fn agree_from_a_segment_that_starts_with_a_continuation() {
        // Start reading at each segment boundary of random WAL: the rest of a record continued
        // from before is skipped by both, and both read the same records after it.
        for seed in 20..=25 {
            let b = random_wal(seed, 5);
            for k in 1..4u64 {
                let from = b.start().0 + k * MB;
                let data = &b.bytes()[(k * MB) as usize..];
                let (strict, lenient) = both(1, Lsn(from), data, seed + k);
                strict.result.unwrap();
                lenient.result.unwrap();
                assert_eq!(
                    strict.sink.records, lenient.sink.records,
                    "seed {seed} k {k}"
                );
                assert!(strict.sink.records.iter().all(|r| r.0 .0 >= from));
            }
        }
    }

    #[test]
    fn on_damaged_wal_one_modes_records_are_a_prefix_of_the_others() {
        let b = random_wal(77, 3);
        let mut rng = Rng(99);
        let mut differed = 0;
        for round in 0..300 {
            let mut bytes = b.bytes().to_vec();
            // Flip bits in one to three bytes, often in page headers and record headers.
            for _ in 0..1 + rng.below(3) {
                let at = match rng.below(3) {
                    0 => (rng.below(bytes.len() as u64 / 8192) * 8192 + rng.below(40)) as usize,
                    _ => rng.below(bytes.len() as u64) as usize,
                };
                bytes[at] ^= 1 << rng.below(8);
            }
            let (strict, lenient) = both(1, b.start(), &bytes, round);
            let (s, l) = (lsns(&strict), lsns(&lenient));
            let n = s.len().min(l.len());
            assert_eq!(s[..n], l[..n], "round {round}");
            assert_eq!(strict.sink.records[..n], lenient.sink.records[..n]);
            if let Err(e) = &lenient.result {
                // The lenient end is where the records stop.
                let (at, _) = lenient.reader.lenient_end(e);
                assert!(l.last().is_none_or(|r| r.1 <= at), "round {round}: {at}");
            }
            if s != l {
                differed += 1;
            }
            if strict.result.is_ok() {
                // Whatever strict accepts, lenient reads the same way (or stops at a rule only
                // lenient has; not on this WAL, which has no skipped record to start with).
                assert_eq!(s, l, "round {round}");
            }
        }
        // Some flips hit checks only strict has (timeline, system identifier, switch fill).
        assert!(differed < 300);
    }

    #[test]
    fn a_zero_tail_is_an_error_when_strict_and_the_end_when_lenient() {
        let mut b = WalBuilder::new(SYSID, seg1m(), 1, Lsn(0x100000));
        for i in 0..50 {
            b.push(10, 0, i, &[i as u8; 333]);
        }
        let end = b.position();
        let zero_at = Lsn((end.0 + 7) & !7);
        b.zero_fill_to(Lsn(0x200000));
        let (strict, lenient) = both(1, b.start(), b.bytes(), 3);
        assert_eq!(strict.sink.records, lenient.sink.records);
        assert_eq!(strict.sink.records.len(), 50);
        assert_eq!(
            strict.result,
            Err(VerifyError::RecordTooShort {
                lsn: zero_at,
                found: 0
            })
        );
        let e = lenient.result.unwrap_err();
        assert_eq!(
            lenient.reader.lenient_end(&e),
            (zero_at, EndReason::ZeroLength)
        );
    }

    /// Byte offset of the page header of the page at `page` in WAL built from `start`.
    fn at(start: Lsn, page: u64) -> usize {
        (page - start.0) as usize
    }

    #[test]
    fn checks_only_strict_makes() {
        let start = Lsn(0x100000);
        // A timeline above the streamed one, another system identifier, another magic.
        let mut b = WalBuilder::new(SYSID + 1, seg1m(), 1, start);
        b.push(10, 0, 1, &[1; 9000]);
        b.set_timeline(2);
        b.set_magic(0xD116);
        b.push(10, 0, 2, &[2; 9000]);
        b.push(10, 0, 3, &[3; 100]);
        let (strict, lenient) = both(1, start, b.bytes(), 1);
        assert_eq!(
            strict.result,
            Err(VerifyError::SystemIdentifier {
                lsn: start,
                expected: SYSID,
                found: SYSID + 1
            })
        );
        lenient.result.unwrap();
        assert_eq!(lenient.sink.records.len(), 3);
        assert_eq!(lenient.sink.sysids, [SYSID + 1]);
        // The magic of the page each record ends on.
        assert_eq!(lenient.sink.magics, [0xD110, 0xD116, 0xD116]);
        let mut strict = WalReader::strict(
            VerifyParams {
                system_identifier: SYSID + 1,
                ..params(1)
            },
            start,
        );
        assert!(matches!(
            strict.feed(b.bytes(), &mut ()),
            Err(VerifyError::MagicChanged { .. })
        ));

        // Non-zero bytes after a switch: strict rejects them, lenient does not read them.
        let mut b = WalBuilder::new(SYSID, seg1m(), 1, start);
        b.push(10, 0, 1, &[1; 100]);
        b.push_switch();
        b.push(10, 0, 2, &[2; 100]);
        let mut bytes = b.into_bytes();
        bytes[0x1000] = 0x55;
        let (strict, lenient) = both(1, start, &bytes, 2);
        assert!(matches!(
            strict.result,
            Err(VerifyError::NonZeroAfterSwitch { found: 0x55, .. })
        ));
        lenient.result.unwrap();
        assert_eq!(lenient.sink.records.len(), 3);

        // The overwrite flag where no record is in progress (the first record fills page 1).
        let mut b = WalBuilder::new(SYSID, seg1m(), 1, start);
        b.push(1, 0, 1, &[1; 8192 - 40 - 24]);
        b.push(1, 0, 2, &[2; 10]);
        let mut bytes = b.into_bytes();
        bytes[8192 + 2] |= XLP_FIRST_IS_OVERWRITE_CONTRECORD as u8;
        let (strict, lenient) = both(1, start, &bytes, 3);
        assert!(matches!(
            strict.result,
            Err(VerifyError::UnexpectedOverwrite { .. })
        ));
        lenient.result.unwrap();
        assert_eq!(lenient.sink.records.len(), 2);
    }

    #[test]
    fn continuation_rules_that_differ() {
        let start = Lsn(0x100000);
        // A record cut short by a crash, with both continuation flags on the next page:
        // strict refuses the pair, lenient drops the record as for the overwrite flag alone.
        let mut b = WalBuilder::new(SYSID, seg1m(), 1, start);
        b.push(1, 0, 1, &[1; 3000]);
        b.push_aborted(1, 0, 2, &[2; 30_000]).unwrap();
        b.push(0, 0xD0, 0, &[3; 16]);
        b.push(1, 0, 3, &[4; 100]);
        let clean = both(1, start, b.bytes(), 4);
        clean.0.result.unwrap();
        clean.1.result.unwrap();
        assert_eq!(clean.0.sink.records.len(), 3);
        let mut bytes = b.bytes().to_vec();
        let page = at(start, 0x102000);
        bytes[page + 2] |= XLP_FIRST_IS_CONTRECORD as u8;
        bytes[page + 16] = 1;
        let (strict, lenient) = both(1, start, &bytes, 5);
        assert!(matches!(
            strict.result,
            Err(VerifyError::ConflictingContinuationFlags { .. })
        ));
        lenient.result.unwrap();
        assert_eq!(lenient.sink.records, clean.1.sink.records);

        // A segment that begins with a continuation although no record is in progress (the
        // previous segment ended with a switch): strict refuses it, lenient starts afresh and
        // skips it, then finds the next record linked to the skipped one, not the switch.
        let mut b = WalBuilder::new(SYSID, seg1m(), 1, start);
        b.push(10, 0, 1, &[1; 100]);
        let switch = b.push_switch();
        let r = b.push(10, 0, 2, &[2; 100]);
        let r2 = b.push(10, 0, 3, &[3; 100]);
        let mut bytes = b.into_bytes();
        let seg2 = at(start, 0x200000);
        bytes[seg2 + 2] |= XLP_FIRST_IS_CONTRECORD as u8;
        bytes[seg2 + 16..seg2 + 20].copy_from_slice(&124u32.to_le_bytes());
        let (strict, lenient) = both(1, start, &bytes, 6);
        assert_eq!(
            strict.result,
            Err(VerifyError::UnexpectedContinuation {
                lsn: Lsn(0x200000),
                rem_len: 124
            })
        );
        let e = lenient.result.unwrap_err();
        assert_eq!(
            lenient.reader.lenient_end(&e),
            (
                r2,
                EndReason::PrevLink {
                    expected: switch,
                    found: r
                }
            )
        );

        // A record with a broken xl_prev whose next page is broken too: strict reports the link
        // (checked with the header), lenient the page (the link is checked at the record's end).
        let mut b = WalBuilder::new(SYSID, seg1m(), 1, start);
        b.push(10, 0, 1, &[1; 100]);
        b.set_prev(Lsn(0x100000 + 8));
        let bad = b.push(10, 0, 2, &[2; 20_000]);
        let mut bytes = b.into_bytes();
        bytes[at(start, 0x102000) + 16] ^= 1;
        let (strict, lenient) = both(1, start, &bytes, 7);
        assert!(matches!(strict.result, Err(VerifyError::PrevLink { lsn, .. }) if lsn == bad));
        let e = lenient.result.unwrap_err();
        assert_eq!(
            lenient.reader.lenient_end(&e),
            (bad, EndReason::MissingContinuation)
        );
    }

    #[test]
    fn record_headers_split_at_every_offset_read_the_same() {
        // A record whose header straddles a page boundary at each possible 8-byte offset,
        // fed one byte at a time and whole, in both modes.
        for k in 1..=3usize {
            let start = Lsn(0x100000);
            let mut b = WalBuilder::new(SYSID, seg1m(), 1, start);
            b.push(10, 0, 1, &vec![1; 8192 - 40 - 24 - 8 * k]);
            let split = b.push(10, 0, 2, &[2; 50]);
            assert_eq!(split.0 % 8192, 8192 - 8 * k as u64);
            b.push(10, 0, 3, &[3; 10]);
            for mode in [Strictness::Strict, Strictness::Lenient] {
                let mut one = WalReader::new(mode, params(1), start);
                let mut sink = Collect::default();
                for byte in b.bytes().chunks(1) {
                    one.feed(byte, &mut sink).unwrap();
                }
                let whole = read(mode, 1, start, b.bytes(), k as u64, false);
                whole.result.unwrap();
                assert_eq!(sink.records, whole.sink.records);
                assert_eq!(sink.records.len(), 3);
                assert_eq!(sink.records[1].0, split);
            }
        }
    }
}
