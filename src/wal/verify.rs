//! Page-header and record checks on WAL as it arrives.
//!
//! [`WalVerifier`] is a streaming checker: the receiver hands it every chunk of WAL (arbitrary
//! boundaries: mid-page, mid-record, mid-header, across segments) before the chunk is written.
//! It checks each page header (magic, flags, address, timeline, the long header's system
//! identifier and sizes), the continuation bookkeeping between pages, and every record's length,
//! prev-link and CRC-32C. It keeps no more than one page header and one record header of state,
//! never copies record bodies, and computes CRCs over the input slices.
//!
//! [`check_segment`] / [`verify_segment`] check a whole segment file, accepting a zero tail as
//! the end of the data (pg_receivewal-style pre-zeroed `.partial` files).
//!
//! Layouts and rules: `src/include/access/xlog_internal.h`, `xlogrecord.h`,
//! `src/backend/access/transam/xlogreader.c` and `xlog.c`; written up in
//! `proto-notes/wal-format.md`.

use super::page::{
    major_of_magic, HeaderBytes, LongHeader, PageHeader, SIZE_OF_LONG_PHD, SIZE_OF_SHORT_PHD,
    XLP_ALL_FLAGS, XLP_FIRST_IS_CONTRECORD, XLP_FIRST_IS_OVERWRITE_CONTRECORD, XLP_LONG_HEADER,
};
use super::{Lsn, SegmentSize, WAL_PAGE_SIZE};

/// Kept here for callers that knew it from this module; it lives in [`super::page`].
pub use super::page::page_magic_for;

const PAGE: u64 = WAL_PAGE_SIZE as u64;
const SHORT_PHD: usize = SIZE_OF_SHORT_PHD;
const LONG_PHD: usize = SIZE_OF_LONG_PHD;
/// SizeOfXLogRecord.
const REC_HDR: usize = 24;
/// Offset of xl_crc in the record header; the CRC covers the header bytes before it.
const REC_CRC_OFF: usize = 20;
/// Records at or above this size are rejected (PostgreSQL caps records below 1 GiB).
const MAX_TOT_LEN: u32 = 1 << 30;

const RM_XLOG_ID: u8 = 0;
const XLOG_SWITCH: u8 = 0x40;
const XLR_RMGR_INFO_MASK: u8 = 0xF0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifyParams {
    /// `IDENTIFY_SYSTEM`'s systemid; every segment's long header must carry it.
    pub system_identifier: u64,
    pub segment_size: SegmentSize,
    /// The timeline being streamed: no page may carry a higher `xlp_tli`.
    pub timeline: u32,
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

/// What the bytes after the current page header (if any) are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    /// Before the stream's first page header: whether a record continues from the previous
    /// segment is unknown until that header is read.
    Start,
    /// Between records: the next record starts at the next MAXALIGN boundary.
    Idle,
    /// Skipping the rest of a record whose beginning was before the stream start (`since`);
    /// `remaining` bytes of it are still to come.
    Skip { remaining: u32, since: u64 },
    /// Inside the record described by the `rec_*` fields.
    Record,
    /// After an XLOG_SWITCH record (starting at `switch`): zero bytes, page headers included,
    /// up to `until` (the end of the segment the record ends in).
    SwitchTail { switch: u64, until: u64 },
}

/// Streaming WAL checker; see the module documentation.
#[derive(Debug, Clone)]
pub struct WalVerifier {
    params: VerifyParams,
    seg_size: u64,
    /// Position of the next byte `feed` expects.
    pos: u64,
    /// Set when `new` was given a start that is not a segment boundary; reported by `feed`.
    bad_start: bool,
    magic: Option<u16>,
    /// xlp_tli of the last page header seen (0 before the first).
    last_tli: u32,
    /// Page header being assembled (it may be split across chunks).
    phdr: HeaderBytes,
    body: Body,
    /// Start of the last record that verified completely.
    prev: Option<u64>,
    rec_start: u64,
    rec_hdr: [u8; REC_HDR],
    rec_hdr_len: usize,
    /// xl_tot_len, or 0 while fewer than 4 header bytes have arrived.
    rec_tot_len: u32,
    /// Bytes of the record (header included) not yet seen; valid once rec_tot_len is known.
    rec_remaining: u32,
    rec_crc: u32,
    records: u64,
    /// With [`track_timelines`](Self::track_timelines): each `xlp_tli` seen, in order, with the
    /// LSN of the last page header that carried it.
    timelines: Option<Vec<(u32, Lsn)>>,
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
            params,
            seg_size,
            pos: start.0,
            bad_start: !start.0.is_multiple_of(seg_size),
            magic: None,
            last_tli: 0,
            phdr: [0; LONG_PHD],
            body: Body::Start,
            prev: None,
            rec_start: 0,
            rec_hdr: [0; REC_HDR],
            rec_hdr_len: 0,
            rec_tot_len: 0,
            rec_remaining: 0,
            rec_crc: 0,
            records: 0,
            timelines: None,
        }
    }

    /// Also record which pages carry which `xlp_tli` (see [`timeline_pages`](Self::timeline_pages)).
    /// Off by default: the stream does not need it.
    pub fn track_timelines(&mut self) {
        self.timelines.get_or_insert_with(Vec::new);
    }

    /// With [`track_timelines`](Self::track_timelines): every `xlp_tli` seen so far on a valid page
    /// header, in stream order (so in increasing order: a timeline never goes backwards), each
    /// with the LSN of the last page that carried it. Empty when not tracking.
    pub fn timeline_pages(&self) -> &[(u32, Lsn)] {
        self.timelines.as_deref().unwrap_or(&[])
    }

    /// The position of the next byte to feed.
    pub fn position(&self) -> Lsn {
        Lsn(self.pos)
    }

    /// The server major version detected from the page magic, once a page header was seen
    /// (15, 16, 17 or 18).
    pub fn server_major(&self) -> Option<u32> {
        self.magic.and_then(major_of_magic)
    }

    /// How many records have been checked completely (CRC included).
    pub fn records_verified(&self) -> u64 {
        self.records
    }

    /// Checks `data`, which begins exactly at [`position`](Self::position). On error the
    /// verifier's state is unspecified (the caller stops).
    pub fn feed(&mut self, data: &[u8]) -> Result<(), VerifyError> {
        if self.bad_start {
            return Err(VerifyError::StartNotSegmentAligned {
                lsn: Lsn(self.pos),
                segment_size: self.params.segment_size,
                offset: (self.pos % self.seg_size) as u32,
            });
        }
        if self.pos.checked_add(data.len() as u64).is_none() {
            return Err(VerifyError::PositionOverflow {
                lsn: Lsn(self.pos),
                len: data.len() as u64,
            });
        }
        let mut data = data;
        while !data.is_empty() {
            let n = self.step(data)?;
            data = &data[n..];
            self.pos += n as u64;
        }
        Ok(())
    }

    /// Consumes a prefix of `data` (at least one byte) and returns its length. Never crosses a
    /// page boundary, so `self.pos` tells where each consumed byte sits.
    #[inline]
    fn step(&mut self, data: &[u8]) -> Result<usize, VerifyError> {
        if let Body::SwitchTail { switch, until } = self.body {
            return self.step_switch_tail(data, switch, until);
        }
        let page_off = (self.pos % PAGE) as usize;
        let hdr_size = if (self.pos - page_off as u64).is_multiple_of(self.seg_size) {
            LONG_PHD
        } else {
            SHORT_PHD
        };
        if page_off < hdr_size {
            let n = (hdr_size - page_off).min(data.len());
            self.phdr[page_off..page_off + n].copy_from_slice(&data[..n]);
            if page_off + n == hdr_size {
                self.check_page_header(self.pos - page_off as u64, hdr_size)?;
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
                self.body = Body::Record;
                self.step_record(data, page_left)
            }
            Body::Record => self.step_record(data, page_left),
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
    fn step_record(&mut self, data: &[u8], page_left: usize) -> Result<usize, VerifyError> {
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
                self.check_record_header()?;
                if self.rec_remaining == 0 {
                    self.finish_record(self.pos + n as u64)?;
                }
            }
            return Ok(n);
        }
        let n = (self.rec_remaining as usize).min(page_left).min(data.len());
        self.rec_crc = crc32c::crc32c_append(self.rec_crc, &data[..n]);
        self.rec_remaining -= n as u32;
        if self.rec_remaining == 0 {
            self.finish_record(self.pos + n as u64)?;
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
        if let Some(off) = first_nonzero(&data[..n]) {
            return Err(VerifyError::NonZeroAfterSwitch {
                lsn: Lsn(self.pos + off as u64),
                switch: Lsn(switch),
                found: data[off],
            });
        }
        if n as u64 == to_end {
            self.body = Body::Idle;
        }
        Ok(n)
    }

    fn check_record_header(&mut self) -> Result<(), VerifyError> {
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
    fn finish_record(&mut self, end: u64) -> Result<(), VerifyError> {
        let h = self.rec_hdr;
        let computed = crc32c::crc32c_append(self.rec_crc, &h[..REC_CRC_OFF]);
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
        Ok(())
    }

    fn check_page_header(&mut self, page: u64, hdr_size: usize) -> Result<(), VerifyError> {
        let lsn = Lsn(page);
        let PageHeader {
            magic,
            info,
            tli,
            pageaddr,
            rem_len,
        } = PageHeader::from_bytes(&self.phdr);
        let pageaddr = pageaddr.0;

        match self.magic {
            Some(m) if m != magic => {
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
            Some(_) => {}
            None => {
                if major_of_magic(magic).is_none() {
                    return Err(VerifyError::UnknownMagic { lsn, found: magic });
                }
                self.magic = Some(magic);
            }
        }
        if info & !XLP_ALL_FLAGS != 0 {
            return Err(VerifyError::InfoBits { lsn, found: info });
        }
        let first_of_segment = hdr_size == LONG_PHD;
        if first_of_segment && info & XLP_LONG_HEADER == 0 {
            return Err(VerifyError::MissingLongHeader { lsn, info });
        }
        if !first_of_segment && info & XLP_LONG_HEADER != 0 {
            return Err(VerifyError::UnexpectedLongHeader { lsn, info });
        }
        if pageaddr != page {
            return Err(VerifyError::PageAddress {
                lsn,
                found: Lsn(pageaddr),
            });
        }
        let min_tli = self.last_tli.max(1);
        if tli < min_tli || tli > self.params.timeline {
            return Err(VerifyError::Timeline {
                lsn,
                min: min_tli,
                max: self.params.timeline,
                found: tli,
            });
        }
        self.last_tli = tli;
        if let Some(t) = &mut self.timelines {
            match t.last_mut() {
                Some((last, at)) if *last == tli => *at = lsn,
                _ => t.push((tli, lsn)),
            }
        }
        if first_of_segment {
            let LongHeader {
                sysid,
                seg_size,
                blcksz,
            } = LongHeader::from_bytes(&self.phdr);
            if sysid != self.params.system_identifier {
                return Err(VerifyError::SystemIdentifier {
                    lsn,
                    expected: self.params.system_identifier,
                    found: sysid,
                });
            }
            if u64::from(seg_size) != self.seg_size {
                return Err(VerifyError::SegmentSize {
                    lsn,
                    expected: self.seg_size as u32,
                    found: seg_size,
                });
            }
            if blcksz != WAL_PAGE_SIZE {
                return Err(VerifyError::BlockSize {
                    lsn,
                    expected: WAL_PAGE_SIZE,
                    found: blcksz,
                });
            }
        }

        let cont = info & XLP_FIRST_IS_CONTRECORD != 0;
        let overwrite = info & XLP_FIRST_IS_OVERWRITE_CONTRECORD != 0;
        if cont && overwrite {
            return Err(VerifyError::ConflictingContinuationFlags { lsn, info });
        }
        if !cont && rem_len != 0 {
            return Err(VerifyError::StrayRemainingLength {
                lsn,
                found: rem_len,
            });
        }
        // What is in progress at this page boundary, as (record start if known, bytes to come).
        let in_progress = match self.body {
            Body::Start => {
                // Nothing known about the previous segment: follow the header.
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
            Body::Skip { remaining, since } => Some((since, remaining)),
            Body::Record => Some((self.rec_start, self.rec_remaining)),
            Body::SwitchTail { .. } => None, // zero headers are handled by step_switch_tail
        };
        match in_progress {
            None => {
                if cont {
                    return Err(VerifyError::UnexpectedContinuation { lsn, rem_len });
                }
                if overwrite {
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
}

/// Offset of the first non-zero byte.
fn first_nonzero(buf: &[u8]) -> Option<usize> {
    let mut base = 0;
    for chunk in buf.chunks(4096) {
        if chunk.iter().fold(0u8, |acc, &b| acc | b) != 0 {
            return chunk.iter().position(|&b| b != 0).map(|p| base + p);
        }
        base += chunk.len();
    }
    None
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
    pub fn timeline_pages(&self) -> &[(u32, Lsn)] {
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
    NoHistory { lsn: Lsn, timeline: u32, found: u32 },
    #[error("WAL page at {lsn}: expected xlp_tli {timeline} or a timeline that {timeline} descends from, found {found}, which is not in the history of timeline {timeline}")]
    NotAncestor { lsn: Lsn, timeline: u32, found: u32 },
    #[error("WAL page at {lsn}: expected xlp_tli {timeline} from {switch} on (timeline {found} ends there in the history of timeline {timeline}), found {found}")]
    AfterSwitch {
        lsn: Lsn,
        timeline: u32,
        found: u32,
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
    timeline: u32,
    pages: &[(u32, Lsn)],
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

/// Builds synthetic WAL with valid page headers, continuation flags, prev-links and CRCs, for
/// tests and benchmarks (here and in other modules). Not used on the receive path.
pub mod synth {
    use super::*;

    /// Lays records out the way PostgreSQL's CopyXLogRecordToWAL does.
    #[derive(Debug, Clone)]
    pub struct WalBuilder {
        sysid: u64,
        seg_size: u64,
        magic: u16,
        tli: u32,
        start: u64,
        buf: Vec<u8>,
        prev: u64,
        overwrite_next_page: bool,
    }

    impl WalBuilder {
        /// WAL starting at `start` (rounded down to its segment start), PostgreSQL 15 magic.
        /// The first record's xl_prev is 0 unless [`set_prev`](Self::set_prev) says otherwise.
        pub fn new(
            system_identifier: u64,
            segment_size: SegmentSize,
            timeline: u32,
            start: Lsn,
        ) -> Self {
            let seg = u64::from(segment_size.bytes());
            WalBuilder {
                sysid: system_identifier,
                seg_size: seg,
                magic: 0xD110,
                tli: timeline,
                start: start.0 - start.0 % seg,
                buf: Vec::new(),
                prev: 0,
                overwrite_next_page: false,
            }
        }

        /// Use this `xlp_magic` on pages started from now on.
        pub fn set_magic(&mut self, magic: u16) {
            self.magic = magic;
        }

        /// Use this `xlp_tli` on pages started from now on.
        pub fn set_timeline(&mut self, tli: u32) {
            self.tli = tli;
        }

        /// xl_prev for the next record.
        pub fn set_prev(&mut self, prev: Lsn) {
            self.prev = prev.0;
        }

        pub fn start(&self) -> Lsn {
            Lsn(self.start)
        }

        /// Where the next byte goes.
        pub fn position(&self) -> Lsn {
            Lsn(self.start + self.buf.len() as u64)
        }

        pub fn bytes(&self) -> &[u8] {
            &self.buf
        }

        pub fn into_bytes(self) -> Vec<u8> {
            self.buf
        }

        fn pos(&self) -> u64 {
            self.start + self.buf.len() as u64
        }

        /// Writes the page header if the position is at a page start; `rem` is what is left of
        /// a record in progress (0 when none).
        fn page_header_if_needed(&mut self, rem: u32) {
            let pos = self.pos();
            if !pos.is_multiple_of(PAGE) {
                return;
            }
            let long = pos.is_multiple_of(self.seg_size);
            let mut info: u16 = 0x0004; // XLP_BKP_REMOVABLE, as an idle server writes it
            if rem > 0 {
                info |= XLP_FIRST_IS_CONTRECORD;
            }
            if self.overwrite_next_page {
                info |= XLP_FIRST_IS_OVERWRITE_CONTRECORD;
                self.overwrite_next_page = false;
            }
            if long {
                info |= XLP_LONG_HEADER;
            }
            self.buf.extend_from_slice(&self.magic.to_le_bytes());
            self.buf.extend_from_slice(&info.to_le_bytes());
            self.buf.extend_from_slice(&self.tli.to_le_bytes());
            self.buf.extend_from_slice(&pos.to_le_bytes());
            self.buf.extend_from_slice(&rem.to_le_bytes());
            self.buf.extend_from_slice(&[0; 4]);
            if long {
                self.buf.extend_from_slice(&self.sysid.to_le_bytes());
                self.buf
                    .extend_from_slice(&(self.seg_size as u32).to_le_bytes());
                self.buf.extend_from_slice(&WAL_PAGE_SIZE.to_le_bytes());
            }
        }

        fn align(&mut self) {
            let pad = (8 - (self.pos() % 8) as usize) % 8;
            self.buf.resize(self.buf.len() + pad, 0);
        }

        /// A complete record image (header + payload) with a correct CRC and the current prev.
        pub fn record_image(&self, rmid: u8, info: u8, xid: u32, payload: &[u8]) -> Vec<u8> {
            let tot_len = (REC_HDR + payload.len()) as u32;
            let mut rec = Vec::with_capacity(tot_len as usize);
            rec.extend_from_slice(&tot_len.to_le_bytes());
            rec.extend_from_slice(&xid.to_le_bytes());
            rec.extend_from_slice(&self.prev.to_le_bytes());
            rec.push(info);
            rec.push(rmid);
            rec.extend_from_slice(&[0, 0]);
            let crc = crc32c::crc32c_append(crc32c::crc32c(payload), &rec[..REC_CRC_OFF]);
            rec.extend_from_slice(&crc.to_le_bytes());
            rec.extend_from_slice(payload);
            rec
        }

        /// Appends `image` (a whole record) starting at the next aligned position, splitting it
        /// across pages. Writes at most `limit` record bytes. Returns the record's LSN.
        fn lay_out(&mut self, image: &[u8], limit: usize) -> Lsn {
            self.align();
            self.page_header_if_needed(0);
            let start = self.pos();
            let mut done = 0;
            while done < image.len().min(limit) {
                self.page_header_if_needed((image.len() - done) as u32);
                let page_left = (PAGE - self.pos() % PAGE) as usize;
                let n = page_left.min(image.len() - done).min(limit - done);
                self.buf.extend_from_slice(&image[done..done + n]);
                done += n;
            }
            Lsn(start)
        }

        /// Appends a record with the given resource manager, info byte, xid and payload (the
        /// bytes after the 24-byte header). Returns its LSN.
        pub fn push(&mut self, rmid: u8, info: u8, xid: u32, payload: &[u8]) -> Lsn {
            let image = self.record_image(rmid, info, xid, payload);
            self.push_image(&image)
        }

        /// Appends a ready record image as is (its xl_prev and CRC are not touched).
        pub fn push_image(&mut self, image: &[u8]) -> Lsn {
            let at = self.lay_out(image, usize::MAX);
            self.prev = at.0;
            at
        }

        /// Appends an XLOG_SWITCH record and the zero fill (page headers included) up to the
        /// segment end, as xlog.c does. Returns the switch record's LSN.
        pub fn push_switch(&mut self) -> Lsn {
            let at = self.push(RM_XLOG_ID, XLOG_SWITCH, 0, &[]);
            let pos = self.pos();
            let fill = (self.seg_size - pos % self.seg_size) % self.seg_size;
            self.buf.resize(self.buf.len() + fill as usize, 0);
            at
        }

        /// Writes the start of a record up to the end of the current page and abandons it, as if
        /// the server crashed before the rest reached disk; the next page gets
        /// XLP_FIRST_IS_OVERWRITE_CONTRECORD and the next record links back to the record
        /// before this one. Returns the aborted record's LSN, or `None` (writing nothing) when
        /// the record would fit on the current page.
        pub fn push_aborted(
            &mut self,
            rmid: u8,
            info: u8,
            xid: u32,
            payload: &[u8],
        ) -> Option<Lsn> {
            let image = self.record_image(rmid, info, xid, payload);
            let mut probe = self.pos();
            probe += (8 - probe % 8) % 8;
            if probe.is_multiple_of(PAGE) {
                probe += if probe.is_multiple_of(self.seg_size) {
                    LONG_PHD as u64
                } else {
                    SHORT_PHD as u64
                };
            }
            let room = (PAGE - probe % PAGE) as usize;
            if image.len() <= room {
                return None;
            }
            let at = self.lay_out(&image, room);
            self.overwrite_next_page = true;
            Some(at)
        }

        /// Pads with zero bytes (no page headers) up to `end`, like the unwritten tail of a
        /// pre-zeroed file.
        pub fn zero_fill_to(&mut self, end: Lsn) {
            let want = end.0.saturating_sub(self.start) as usize;
            if want > self.buf.len() {
                self.buf.resize(want, 0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::synth::WalBuilder;
    use super::*;
    use crate::wal::page::MAGICS;

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
            timeline: tli,
        }
    }

    fn lsn(s: &str) -> Lsn {
        s.parse().unwrap()
    }

    /// Small deterministic PRNG (xorshift64*), so tests need no extra crates.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

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
                timeline: 1,
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
                    timeline: 1,
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
            timeline: 1,
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
            timeline: 1,
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
                timeline: 7,
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
            timeline: 1,
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
            timeline: 3,
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
            timeline: 1,
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
        assert_eq!(pages, vec![(1, lsn("0/B00000")), (2, lsn("0/B80000"))]);
        check_page_timelines(2, &pages, Some(&h2)).unwrap();
        check_page_timelines(3, &pages, Some(&h3)).unwrap();
        assert_eq!(
            check_page_timelines(2, &pages, None),
            Err(TimelineError::NoHistory {
                lsn: lsn("0/B00000"),
                timeline: 2,
                found: 1
            })
        );
        // Timeline 1 ending at the page start: the page cannot be timeline 1's.
        let early = TimelineHistory::parse(b"1\t0/B00000\tx\n").unwrap();
        assert_eq!(
            check_page_timelines(2, &pages, Some(&early)),
            Err(TimelineError::AfterSwitch {
                lsn: lsn("0/B00000"),
                timeline: 2,
                found: 1,
                switch: lsn("0/B00000")
            })
        );
        // Timeline 3 forked off timeline 1 directly: timeline 2 is not in its history.
        let other = TimelineHistory::parse(b"1\t0/C00000\tx\n").unwrap();
        assert_eq!(
            check_page_timelines(3, &pages, Some(&other)),
            Err(TimelineError::NotAncestor {
                lsn: lsn("0/B80000"),
                timeline: 3,
                found: 2
            })
        );
        assert!(check_page_timelines(1, &[(1, lsn("0/900000"))], None).is_ok());
        // Timeline 1's WAL past the fork point, served as timeline 2's: refused.
        let mut b = WalBuilder::new(FIXTURE_SYSID, seg1m(), 1, lsn("0/500000"));
        b.push(1, 0, 1, &[5; 30_000]);
        let mut c = SegmentChecker::new(params(2), lsn("0/500000"));
        c.update(b.bytes()).unwrap();
        c.update_zeros(MB - b.bytes().len() as u64).unwrap();
        let h = TimelineHistory::parse(b"1\t0/500100\tx\n").unwrap();
        assert_eq!(
            check_page_timelines(2, c.timeline_pages(), Some(&h)),
            Err(TimelineError::AfterSwitch {
                lsn: lsn("0/506000"),
                timeline: 2,
                found: 1,
                switch: lsn("0/500100")
            })
        );
        for e in [
            TimelineError::NoHistory {
                lsn: lsn("0/B00000"),
                timeline: 2,
                found: 1,
            },
            TimelineError::NotAncestor {
                lsn: lsn("0/B00000"),
                timeline: 2,
                found: 1,
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
