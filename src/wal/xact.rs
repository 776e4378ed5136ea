//! Finding the records recovery targets are about, in WAL segment files (whole ones, and the
//! short `.partial` that ends a timeline in the archive): transaction commits and aborts (with
//! their xid and time) and named restore points.
//!
//! `walagent restore` uses this to check a target against the archive before writing anything:
//! whether a target time, xid or restore point name lies in the WAL after a backup, and where.
//! PostgreSQL itself only finds out after the base backup is restored, and (since 13) fails at
//! the end of the archive with "recovery ended before configured recovery target was reached".
//!
//! The scanner reads records the way PostgreSQL's reader does (`xlogreader.c`
//! `XLogDecodeNextRecord`, `XLogFindNextRecord`, `DecodeXLogRecord`): page headers (long on a
//! segment's first page), records split across pages and segments, the rest of a record begun
//! before the first segment skipped by `xlp_rem_len`. Valid WAL ends where a record fails to read:
//! a zero or impossible `xl_tot_len`, a bad page header, a missing continuation, a broken
//! `xl_prev` link or a CRC-32C mismatch. That is not an error here: [`SegmentScan::end`] says
//! where and why, and the events before it stand. An `XLOG_SWITCH` record ends the segment. The
//! reading is [`super::reader`]'s in its lenient setting; this module decodes the records it is
//! fed.
//!
//! A `.partial` object holds only the bytes walagent received of its segment (`walagent
//! stream` stores what it has, not a zero-padded file; `wal-fetch --allow-partial` pads it for
//! PostgreSQL). [`WalScanner::scan_partial`] reads those bytes: records that end inside them
//! count, a record cut off at their end does not (padded with zeros, it would fail its CRC or
//! its next page header in PostgreSQL too), and [`ScanEnd::PartialEnd`] says where the bytes
//! end. A partial is the end of what the archive has on its timeline, so the scanner carries
//! nothing past it. A full-size (pre-zeroed, pg_receivewal-style) partial reads the same way:
//! its zero tail ends valid WAL with [`EndReason::ZeroLength`].
//!
//! Record layouts (`xlogrecord.h`, `xact.h`, `xlog_internal.h`; PostgreSQL 15-18):
//!
//! - after the 24-byte `XLogRecord` header come block headers (id 0..=32: `fork_flags`,
//!   `data_length` u16, then an image header if `BKPBLOCK_HAS_IMAGE`, a 12-byte RelFileLocator
//!   unless `BKPBLOCK_SAME_REL`, and a u32 block number), optional origin (id 253, 2 bytes) and
//!   top-level xid (id 252, 4 bytes) headers, and finally the main data header (255 with a u8
//!   length, or 254 with a u32 length). Block images and data follow; the main data is last.
//! - `RM_XACT_ID` (1) commit/abort records: main data `xl_xact_commit`/`xl_xact_abort`
//!   (`TimestampTz xact_time`), then, when `XLOG_XACT_HAS_INFO` (0x80) is in `xl_info`, a u32
//!   `xinfo` selecting optional parts in this order: dbinfo (8 bytes), subxacts (i32 count + 4
//!   each), relfilelocators (i32 count + 12 each), dropped stats (i32 count + 12 each; 16 from
//!   PostgreSQL 18, page magic 0xD118), invalidations (commit only: i32 count + 16 each), then
//!   `xl_xact_twophase` (the prepared transaction's xid). For `COMMIT_PREPARED` and
//!   `ABORT_PREPARED` that xid is the one recovery targets compare (as xlogrecovery.c does via
//!   `ParseCommitRecord`/`ParseAbortRecord`); otherwise it is the record header's `xl_xid`.
//! - `RM_XLOG_ID` (0) `XLOG_RESTORE_POINT` (0x70): `xl_restore_point { TimestampTz rp_time;
//!   char rp_name[64]; }`.

use super::page::{LongHeader, PageHeader};
use super::reader::{Record, Sink, WalReader};
use super::record::{RecordHeaderBytes, RM_XACT_ID, RM_XLOG_ID, SIZE_OF_XLOG_RECORD};
use super::record::{XLOG_RESTORE_POINT, XLR_RMGR_INFO_MASK};
use super::{Lsn, SegmentSize};

/// Why valid WAL ends where it does: the lenient reader's reading of a failed check.
pub use super::reader::EndReason;

const REC_HDR: usize = SIZE_OF_XLOG_RECORD;

const XLOG_XACT_OPMASK: u8 = 0x70;
const XLOG_XACT_COMMIT: u8 = 0x00;
const XLOG_XACT_ABORT: u8 = 0x20;
const XLOG_XACT_COMMIT_PREPARED: u8 = 0x30;
const XLOG_XACT_ABORT_PREPARED: u8 = 0x40;
const XLOG_XACT_HAS_INFO: u8 = 0x80;

const XACT_XINFO_HAS_DBINFO: u32 = 1 << 0;
const XACT_XINFO_HAS_SUBXACTS: u32 = 1 << 1;
const XACT_XINFO_HAS_RELFILELOCATORS: u32 = 1 << 2;
const XACT_XINFO_HAS_INVALS: u32 = 1 << 3;
const XACT_XINFO_HAS_TWOPHASE: u32 = 1 << 4;
const XACT_XINFO_HAS_DROPPED_STATS: u32 = 1 << 8;

const XLR_MAX_BLOCK_ID: u8 = 32;
const XLR_BLOCK_ID_DATA_SHORT: u8 = 255;
const XLR_BLOCK_ID_DATA_LONG: u8 = 254;
const XLR_BLOCK_ID_ORIGIN: u8 = 253;
const XLR_BLOCK_ID_TOPLEVEL_XID: u8 = 252;
const BKPBLOCK_HAS_IMAGE: u8 = 0x10;
const BKPBLOCK_SAME_REL: u8 = 0x80;
const BKPIMAGE_HAS_HOLE: u8 = 0x01;
/// BKPIMAGE_COMPRESS_PGLZ | _LZ4 | _ZSTD (PostgreSQL 15+).
const BKPIMAGE_COMPRESSED: u8 = 0x04 | 0x08 | 0x10;
/// sizeof(RelFileLocator) / RelFileNode.
const REL_FILE_LOCATOR: usize = 12;
/// sizeof(SharedInvalidationMessage).
const INVAL_MSG: usize = 16;
/// sizeof(xl_restore_point): TimestampTz + char[MAXFNAMELEN].
const RESTORE_POINT_LEN: usize = 8 + 64;

/// What a record means for recovery targets. Times are PostgreSQL `TimestampTz` values:
/// microseconds since 2000-01-01 00:00:00 UTC (see `restore::target::pg_micros_to_utc`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// `XLOG_XACT_COMMIT` or, with `prepared`, `XLOG_XACT_COMMIT_PREPARED`.
    Commit {
        xid: u32,
        time_us: i64,
        prepared: bool,
    },
    /// `XLOG_XACT_ABORT` or, with `prepared`, `XLOG_XACT_ABORT_PREPARED`.
    Abort {
        xid: u32,
        time_us: i64,
        prepared: bool,
    },
    /// `XLOG_RESTORE_POINT` from `pg_create_restore_point(name)`.
    RestorePoint { name: String, time_us: i64 },
}

impl EventKind {
    pub fn time_us(&self) -> i64 {
        match self {
            EventKind::Commit { time_us, .. }
            | EventKind::Abort { time_us, .. }
            | EventKind::RestorePoint { time_us, .. } => *time_us,
        }
    }

    pub fn xid(&self) -> Option<u32> {
        match self {
            EventKind::Commit { xid, .. } | EventKind::Abort { xid, .. } => Some(*xid),
            EventKind::RestorePoint { .. } => None,
        }
    }
}

/// One record of interest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalEvent {
    /// Where the record starts (PostgreSQL's ReadRecPtr).
    pub lsn: Lsn,
    /// Just past its last byte (EndRecPtr), page headers included.
    pub end_lsn: Lsn,
    pub kind: EventKind,
}

/// How a segment scan ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanEnd {
    /// Valid WAL runs to the end of the segment. `continued` is the start of a record that
    /// begins in this segment and goes on in the next one (not reported here: a [`WalScanner`]
    /// fed the next segment finishes it).
    SegmentEnd { continued: Option<Lsn> },
    /// An `XLOG_SWITCH` record at `at` ends the WAL of this segment; the rest is its zero fill.
    Switch { at: Lsn },
    /// Valid WAL ends at `at` (a record start, or a page for page-header problems): PostgreSQL's
    /// recovery would stop reading here.
    Invalid { at: Lsn, reason: EndReason },
    /// The bytes of a `.partial` ([`WalScanner::scan_partial`]) end at `at` with the WAL in them
    /// valid so far. `cut` is the start of a record begun but not complete in those bytes (not
    /// reported; for the tail of a record begun before a fresh scan's first segment, whose
    /// start is not known here, it is the segment start).
    PartialEnd { at: Lsn, cut: Option<Lsn> },
}

/// What [`scan_segment`] / [`WalScanner::scan`] found in one segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentScan {
    pub start: Lsn,
    /// Commit, abort and restore point records completed in this segment, in WAL order.
    pub events: Vec<WalEvent>,
    /// Records read and checked completely in this segment (a record begun in the previous
    /// segment counts here when the scanner carried it over).
    pub records: u64,
    /// Start of the last valid record completed in this segment.
    pub last_record: Option<Lsn>,
    /// Just past that record (its EndRecPtr, page headers included): where the valid WAL read
    /// in this segment ends.
    pub last_record_end: Option<Lsn>,
    pub end: ScanEnd,
    /// Commit/abort/restore point records with a valid CRC whose contents could not be decoded
    /// (a layout this code does not know); not silently dropped.
    pub undecoded: Vec<Lsn>,
    /// `xlp_sysid` from the segment's long page header, when that header is valid.
    pub system_identifier: Option<u64>,
    /// PostgreSQL major version from the page magic (15..=18).
    pub server_major: Option<u32>,
}

impl SegmentScan {
    /// False when valid WAL ended inside the segment ([`ScanEnd::Invalid`]) or the bytes of a
    /// partial ended ([`ScanEnd::PartialEnd`]): the segment was not read to its end or to a
    /// switch record.
    pub fn fully_scanned(&self) -> bool {
        matches!(
            self.end,
            ScanEnd::SegmentEnd { .. } | ScanEnd::Switch { .. }
        )
    }
}

/// Caller mistakes (not WAL problems, which end the scan instead).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScanError {
    #[error("WAL segment at {lsn}: expected exactly {expected} bytes, found {found}")]
    SegmentLength { lsn: Lsn, expected: u64, found: u64 },
    #[error("partial WAL segment at {lsn}: {found} bytes, more than a {size} segment holds")]
    PartialTooLong {
        lsn: Lsn,
        size: SegmentSize,
        found: u64,
    },
    #[error("WAL segment at {lsn}: expected a segment start ({size} segments)")]
    NotSegmentStart { lsn: Lsn, size: SegmentSize },
}

/// Scans one whole segment file on its own: a record continued from the previous segment is
/// skipped, one continuing into the next is reported as [`ScanEnd::SegmentEnd`]'s `continued`
/// without an event. Use [`WalScanner`] to scan consecutive segments without such gaps.
pub fn scan_segment(
    bytes: &[u8],
    seg_start: Lsn,
    seg_size: SegmentSize,
) -> Result<SegmentScan, ScanError> {
    WalScanner::new(seg_size).scan(seg_start, bytes)
}

/// Scans segments in order, carrying a record that crosses a segment boundary and the
/// `xl_prev` chain from one segment to the next. A segment that does not directly follow the
/// previous one starts afresh, like [`scan_segment`]. A thin layer over a
/// [`Strictness::Lenient`](super::reader::Strictness::Lenient) [`WalReader`].
#[derive(Debug, Clone)]
pub struct WalScanner {
    seg_size: SegmentSize,
    /// Where the next contiguous segment starts, while a chain is being followed.
    next_seg: Option<u64>,
    /// The reader following the chain, at `next_seg`.
    reader: Option<WalReader>,
}

impl WalScanner {
    pub fn new(seg_size: SegmentSize) -> Self {
        WalScanner {
            seg_size,
            next_seg: None,
            reader: None,
        }
    }

    /// Scans the segment file `bytes` (exactly one segment) starting at `seg_start`.
    pub fn scan(&mut self, seg_start: Lsn, bytes: &[u8]) -> Result<SegmentScan, ScanError> {
        let size = self.check_start(seg_start)?;
        if bytes.len() != size {
            return Err(ScanError::SegmentLength {
                lsn: seg_start,
                expected: size as u64,
                found: bytes.len() as u64,
            });
        }
        Ok(self.run(seg_start, bytes, false))
    }

    /// Scans the content of a `.partial` object: the first `bytes.len()` bytes (at most one
    /// segment, possibly none) of the segment starting at `seg_start`. A record continued from
    /// the segment scanned just before is finished when the bytes hold its end. Running out of
    /// bytes ends the scan with [`ScanEnd::PartialEnd`]; nothing is carried into a later scan.
    pub fn scan_partial(&mut self, seg_start: Lsn, bytes: &[u8]) -> Result<SegmentScan, ScanError> {
        let size = self.check_start(seg_start)?;
        if bytes.len() > size {
            return Err(ScanError::PartialTooLong {
                lsn: seg_start,
                size: self.seg_size,
                found: bytes.len() as u64,
            });
        }
        let out = self.run(seg_start, bytes, true);
        self.reset();
        Ok(out)
    }

    fn check_start(&self, seg_start: Lsn) -> Result<usize, ScanError> {
        let size = self.seg_size.bytes() as usize;
        if !seg_start.0.is_multiple_of(size as u64) {
            return Err(ScanError::NotSegmentStart {
                lsn: seg_start,
                size: self.seg_size,
            });
        }
        Ok(size)
    }

    fn reset(&mut self) {
        self.reader = None;
        self.next_seg = None;
    }

    /// `partial`: `bytes` may stop anywhere (a `.partial`'s content); running out of them ends
    /// the scan with [`ScanEnd::PartialEnd`]. Otherwise `bytes` is a whole segment.
    fn run(&mut self, seg_start: Lsn, bytes: &[u8], partial: bool) -> SegmentScan {
        let mut feed = self.begin_at(seg_start);
        feed.feed(bytes);
        self.end_at(feed, partial)
    }

    /// Starts scanning the segment starting at `seg_start` from bytes given in pieces
    /// ([`ScanFeed::feed`]), so the segment is never held whole; [`WalScanner::finish_feed`]
    /// ends it with the same result [`WalScanner::scan`] (or, for a `.partial`,
    /// [`WalScanner::scan_partial`]) gives for all the bytes at once.
    pub fn begin_feed(&mut self, seg_start: Lsn) -> Result<ScanFeed, ScanError> {
        self.check_start(seg_start)?;
        Ok(self.begin_at(seg_start))
    }

    /// Ends the scan `feed` began; `partial` as for [`WalScanner::scan_partial`]. A wrong
    /// length is the same error the whole-bytes scans give (and ends the chain).
    pub fn finish_feed(&mut self, feed: ScanFeed, partial: bool) -> Result<SegmentScan, ScanError> {
        let size = u64::from(self.seg_size.bytes());
        let (lsn, found) = (feed.seg_start, feed.len);
        if partial && found > size {
            self.reset();
            return Err(ScanError::PartialTooLong {
                lsn,
                size: self.seg_size,
                found,
            });
        }
        if !partial && found != size {
            self.reset();
            return Err(ScanError::SegmentLength {
                lsn,
                expected: size,
                found,
            });
        }
        let out = self.end_at(feed, partial);
        if partial {
            self.reset();
        }
        Ok(out)
    }

    fn begin_at(&mut self, seg_start: Lsn) -> ScanFeed {
        let reader = match self.reader.take() {
            Some(r) if self.next_seg == Some(seg_start.0) => r,
            _ => WalReader::lenient(self.seg_size, seg_start),
        };
        ScanFeed {
            seg_start,
            reader,
            sink: ScanSink {
                out: SegmentScan {
                    start: seg_start,
                    events: Vec::new(),
                    records: 0,
                    last_record: None,
                    last_record_end: None,
                    end: ScanEnd::SegmentEnd { continued: None },
                    undecoded: Vec::new(),
                    system_identifier: None,
                    server_major: None,
                },
                switch: None,
            },
            fed: Ok(()),
            len: 0,
            limit: u64::from(self.seg_size.bytes()),
        }
    }

    fn end_at(&mut self, feed: ScanFeed, partial: bool) -> SegmentScan {
        let ScanFeed {
            seg_start,
            reader,
            sink,
            fed,
            ..
        } = feed;
        let end = match (fed, sink.switch) {
            // The rest of the switch's segment was skipped unread.
            (_, Some(at)) => ScanEnd::Switch { at },
            (Err(e), None) => {
                let (at, reason) = reader.lenient_end(&e);
                ScanEnd::Invalid { at, reason }
            }
            (Ok(()), None) if partial => ScanEnd::PartialEnd {
                at: reader.position(),
                // The tail of a record begun before a fresh scan's first segment has no known
                // start: the segment start stands for it.
                cut: reader.record_in_progress().or_else(|| {
                    (reader.skipping() && reader.position() > seg_start).then_some(seg_start)
                }),
            },
            (Ok(()), None) => ScanEnd::SegmentEnd {
                continued: reader.record_in_progress(),
            },
        };
        match end {
            ScanEnd::Invalid { .. } => self.reset(),
            _ => {
                self.next_seg = seg_start.0.checked_add(u64::from(self.seg_size.bytes()));
                self.reader = Some(reader);
            }
        }
        let mut out = sink.out;
        out.end = end;
        out
    }
}

/// One segment being scanned from pieces of its bytes; see [`WalScanner::begin_feed`].
pub struct ScanFeed {
    seg_start: Lsn,
    reader: WalReader,
    sink: ScanSink,
    /// The first failure; nothing is fed after it.
    fed: Result<(), super::VerifyError>,
    /// Bytes given so far.
    len: u64,
    /// A segment's size: bytes past it are counted, not fed.
    limit: u64,
}

impl ScanFeed {
    /// The next piece of the segment's bytes.
    pub fn feed(&mut self, data: &[u8]) {
        self.len += data.len() as u64;
        if self.fed.is_ok() && self.len <= self.limit {
            self.fed = self.reader.feed(data, &mut self.sink);
        }
    }
}

/// Collects a segment's scan from the reader.
struct ScanSink {
    out: SegmentScan,
    /// The first `XLOG_SWITCH` record; the reader skips the rest of its segment.
    switch: Option<Lsn>,
}

impl Sink for ScanSink {
    fn page(&mut self, _lsn: Lsn, header: &PageHeader) {
        if self.out.server_major.is_none() {
            self.out.server_major = header.server_major();
        }
    }

    fn long_header(&mut self, _lsn: Lsn, header: &LongHeader) {
        self.out.system_identifier = Some(header.sysid);
    }

    /// Only commit/abort and XLOG records can be events ([`decode_event`]).
    fn wants_image(&mut self, header: &RecordHeaderBytes) -> bool {
        matches!(header[17], RM_XACT_ID | RM_XLOG_ID)
    }

    fn record(&mut self, r: &Record<'_>) {
        let out = &mut self.out;
        out.records += 1;
        out.last_record = Some(r.lsn);
        out.last_record_end = Some(r.end);
        if let Some(image) = r.image {
            match decode_event(image, r.magic) {
                Decoded::None => {}
                Decoded::Event(kind) => out.events.push(WalEvent {
                    lsn: r.lsn,
                    end_lsn: r.end,
                    kind,
                }),
                Decoded::Undecodable => out.undecoded.push(r.lsn),
            }
        }
        if r.header.is_switch() && self.switch.is_none() {
            self.switch = Some(r.lsn);
        }
    }
}

enum Decoded {
    None,
    Event(EventKind),
    Undecodable,
}

/// The event of a complete, CRC-checked record, if it is one we report.
fn decode_event(rec: &[u8], magic: u16) -> Decoded {
    let (info, rmid) = (rec[16], rec[17]);
    let xl_xid = u32::from_le_bytes(rec[4..8].try_into().expect("4 bytes"));
    let wanted = match rmid {
        RM_XACT_ID => matches!(
            info & XLOG_XACT_OPMASK,
            XLOG_XACT_COMMIT
                | XLOG_XACT_ABORT
                | XLOG_XACT_COMMIT_PREPARED
                | XLOG_XACT_ABORT_PREPARED
        ),
        RM_XLOG_ID => info & XLR_RMGR_INFO_MASK == XLOG_RESTORE_POINT,
        _ => false,
    };
    if !wanted {
        return Decoded::None;
    }
    let parsed = main_data(rec).and_then(|data| {
        if rmid == RM_XLOG_ID {
            restore_point(data)
        } else {
            xact_event(info, xl_xid, data, magic)
        }
    });
    parsed.map_or(Decoded::Undecodable, Decoded::Event)
}

/// Little-endian reader over a byte slice; every read is bounds-checked.
struct Rd<'a> {
    b: &'a [u8],
    i: usize,
}

impl Rd<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let end = self.i.checked_add(n)?;
        let s = self.b.get(self.i..end)?;
        self.i = end;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|s| s[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|s| u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn i64(&mut self) -> Option<i64> {
        self.take(8)
            .map(|s| i64::from_le_bytes(s.try_into().expect("8 bytes")))
    }
    /// Skips an `int count` followed by `count` items of `item` bytes.
    fn skip_array(&mut self, item: usize) -> Option<()> {
        let n = usize::try_from(self.u32()? as i32).ok()?;
        self.take(n.checked_mul(item)?).map(|_| ())
    }
}

/// The main data of a complete record (DecodeXLogRecord's header walk): `None` when the headers
/// do not add up to `xl_tot_len` or there is no main data.
fn main_data(rec: &[u8]) -> Option<&[u8]> {
    let mut r = Rd { b: rec, i: REC_HDR };
    let remaining = rec.len() - REC_HDR;
    let mut datatotal: usize = 0;
    let mut main_len: usize = 0;
    let mut last_block: Option<u8> = None;
    while remaining - (r.i - REC_HDR) > datatotal {
        let id = r.u8()?;
        match id {
            XLR_BLOCK_ID_DATA_SHORT => {
                main_len = usize::from(r.u8()?);
                datatotal += main_len;
                break;
            }
            XLR_BLOCK_ID_DATA_LONG => {
                main_len = r.u32()? as usize;
                datatotal = datatotal.checked_add(main_len)?;
                break;
            }
            XLR_BLOCK_ID_ORIGIN => {
                r.take(2)?;
            }
            XLR_BLOCK_ID_TOPLEVEL_XID => {
                r.take(4)?;
            }
            id if id <= XLR_MAX_BLOCK_ID => {
                if last_block.is_some_and(|b| id <= b) {
                    return None;
                }
                last_block = Some(id);
                let fork_flags = r.u8()?;
                datatotal += usize::from(r.u16()?);
                if fork_flags & BKPBLOCK_HAS_IMAGE != 0 {
                    let bimg_len = r.u16()?;
                    let _hole_offset = r.u16()?;
                    let bimg_info = r.u8()?;
                    datatotal += usize::from(bimg_len);
                    if bimg_info & BKPIMAGE_HAS_HOLE != 0 && bimg_info & BKPIMAGE_COMPRESSED != 0 {
                        r.take(2)?; // hole_length
                    }
                }
                if fork_flags & BKPBLOCK_SAME_REL == 0 {
                    r.take(REL_FILE_LOCATOR)?;
                }
                r.take(4)?; // BlockNumber
            }
            _ => return None,
        }
    }
    if main_len == 0 || remaining - (r.i - REC_HDR) != datatotal {
        return None;
    }
    rec.get(rec.len() - main_len..)
}

fn restore_point(data: &[u8]) -> Option<EventKind> {
    if data.len() < RESTORE_POINT_LEN {
        return None;
    }
    let time_us = i64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
    let raw = &data[8..RESTORE_POINT_LEN];
    let name = raw.split(|&b| b == 0).next().unwrap_or(raw);
    Some(EventKind::RestorePoint {
        name: String::from_utf8_lossy(name).into_owned(),
        time_us,
    })
}

/// ParseCommitRecord / ParseAbortRecord, as far as the two-phase xid.
fn xact_event(info: u8, xl_xid: u32, data: &[u8], magic: u16) -> Option<EventKind> {
    let op = info & XLOG_XACT_OPMASK;
    let commit = matches!(op, XLOG_XACT_COMMIT | XLOG_XACT_COMMIT_PREPARED);
    let prepared = matches!(op, XLOG_XACT_COMMIT_PREPARED | XLOG_XACT_ABORT_PREPARED);
    let mut r = Rd { b: data, i: 0 };
    let time_us = r.i64()?;
    let mut xid = xl_xid;
    if prepared {
        let xinfo = if info & XLOG_XACT_HAS_INFO != 0 {
            r.u32()?
        } else {
            0
        };
        if xinfo & XACT_XINFO_HAS_DBINFO != 0 {
            r.take(8)?;
        }
        if xinfo & XACT_XINFO_HAS_SUBXACTS != 0 {
            r.skip_array(4)?;
        }
        if xinfo & XACT_XINFO_HAS_RELFILELOCATORS != 0 {
            r.skip_array(REL_FILE_LOCATOR)?;
        }
        if xinfo & XACT_XINFO_HAS_DROPPED_STATS != 0 {
            // From PostgreSQL 18 on xl_xact_stats_item is 16 bytes (64-bit objid).
            let pg18 = super::page::major_of_magic(magic).is_some_and(|v| v >= 18);
            r.skip_array(if pg18 { 16 } else { 12 })?;
        }
        if commit && xinfo & XACT_XINFO_HAS_INVALS != 0 {
            r.skip_array(INVAL_MSG)?;
        }
        if xinfo & XACT_XINFO_HAS_TWOPHASE == 0 {
            // A prepared-transaction record always carries its xid; anything else is a layout
            // we do not understand.
            return None;
        }
        xid = r.u32()?;
    }
    Some(if commit {
        EventKind::Commit {
            xid,
            time_us,
            prepared,
        }
    } else {
        EventKind::Abort {
            xid,
            time_us,
            prepared,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::synth::WalBuilder;
    use crate::wal::timeline::tl;

    const PAGE: usize = crate::wal::WAL_PAGE_SIZE as usize;

    const MB: u64 = 1 << 20;
    const SYSID: u64 = 0x0123_4567_89AB_CDEF;
    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/wal");
    /// 2026-11-22 09:15:00 UTC as a TimestampTz.
    const T0: i64 = (1_795_338_900 - 946_684_800) * 1_000_000;

    fn seg1m() -> SegmentSize {
        SegmentSize::new(MB).unwrap()
    }

    fn lsn(s: &str) -> Lsn {
        s.parse().unwrap()
    }

    /// Main data behind a short or long data header, as XLogRecordAssemble lays it out.
    fn with_main(blocks: &[u8], main: &[u8]) -> Vec<u8> {
        let mut p = blocks.to_vec();
        if main.len() < 256 {
            p.push(XLR_BLOCK_ID_DATA_SHORT);
            p.push(main.len() as u8);
        } else {
            p.push(XLR_BLOCK_ID_DATA_LONG);
            p.extend_from_slice(&(main.len() as u32).to_le_bytes());
        }
        p
    }

    fn commit_payload(time_us: i64, xinfo: Option<u32>, parts: &[u8]) -> Vec<u8> {
        let mut main = time_us.to_le_bytes().to_vec();
        if let Some(x) = xinfo {
            main.extend_from_slice(&x.to_le_bytes());
        }
        main.extend_from_slice(parts);
        let mut p = with_main(&[], &main);
        p.extend_from_slice(&main);
        p
    }

    fn restore_point_payload(time_us: i64, name: &str) -> Vec<u8> {
        let mut main = time_us.to_le_bytes().to_vec();
        let mut n = [0u8; 64];
        n[..name.len()].copy_from_slice(name.as_bytes());
        main.extend_from_slice(&n);
        let mut p = with_main(&[], &main);
        p.extend_from_slice(&main);
        p
    }

    fn push_commit(b: &mut WalBuilder, xid: u32, time_us: i64) -> Lsn {
        b.push(
            RM_XACT_ID,
            XLOG_XACT_COMMIT,
            xid,
            &commit_payload(time_us, None, &[]),
        )
    }

    /// A record with two block references (the first with a compressed full-page image with a
    /// hole, the second data-only on the same relation), origin and top-level xid headers, then
    /// `main` as main data: the layout of a heap record. Real commit and restore point records
    /// have no blocks; this checks the header walk that finds the main data.
    fn blocks_then_main(main: &[u8]) -> Vec<u8> {
        let mut hdr = vec![0u8, BKPBLOCK_HAS_IMAGE | 0x20];
        hdr.extend_from_slice(&5u16.to_le_bytes()); // data_length
        hdr.extend_from_slice(&100u16.to_le_bytes()); // bimg_len
        hdr.extend_from_slice(&40u16.to_le_bytes()); // hole_offset
        hdr.push(BKPIMAGE_HAS_HOLE | 0x02 | 0x04); // hole, apply, pglz
        hdr.extend_from_slice(&8000u16.to_le_bytes()); // hole_length
        hdr.extend_from_slice(&[7; REL_FILE_LOCATOR]);
        hdr.extend_from_slice(&3u32.to_le_bytes());
        hdr.extend_from_slice(&[1, 0x20 | BKPBLOCK_SAME_REL]);
        hdr.extend_from_slice(&2u16.to_le_bytes());
        hdr.extend_from_slice(&4u32.to_le_bytes());
        hdr.extend_from_slice(&[XLR_BLOCK_ID_ORIGIN, 1, 0]);
        hdr.extend_from_slice(&[XLR_BLOCK_ID_TOPLEVEL_XID, 9, 0, 0, 0]);
        let mut p = with_main(&hdr, main);
        p.extend_from_slice(&[0x11; 100]);
        p.extend_from_slice(&[0x22; 5]);
        p.extend_from_slice(&[0x33; 2]);
        p.extend_from_slice(main);
        p
    }

    #[test]
    fn synthetic_events_and_layouts() {
        let mut b = WalBuilder::new(SYSID, seg1m(), 1, lsn("0/300000"));
        b.push(10, 0, 5, &[1; 100]);
        let c1 = push_commit(&mut b, 700, T0);
        let rp_main = &restore_point_payload(T0 - 1, "with-blocks")[2..];
        let blk = b.push(
            RM_XLOG_ID,
            XLOG_RESTORE_POINT,
            0,
            &blocks_then_main(rp_main),
        );
        b.push(10, 0x00, 701, &blocks_then_main(&[0xAB; 3]));
        let rp = b.push(
            RM_XLOG_ID,
            XLOG_RESTORE_POINT,
            0,
            &restore_point_payload(T0 + 1, "before-upgrade"),
        );
        // An abort with xinfo (subxacts, relfilelocators): the header xid counts.
        let mut parts = Vec::new();
        parts.extend_from_slice(&2i32.to_le_bytes());
        parts.extend_from_slice(&[0; 8]);
        parts.extend_from_slice(&1i32.to_le_bytes());
        parts.extend_from_slice(&[0; 12]);
        let ab = b.push(
            RM_XACT_ID,
            XLOG_XACT_ABORT | XLOG_XACT_HAS_INFO,
            702,
            &commit_payload(
                T0 + 2,
                Some(XACT_XINFO_HAS_SUBXACTS | XACT_XINFO_HAS_RELFILELOCATORS),
                &parts,
            ),
        );
        // COMMIT PREPARED: dbinfo, subxacts, relfilelocators, dropped stats, invals, two-phase
        // xid, gid, origin; the record's xl_xid is 0 (committed by another backend).
        let mut parts = Vec::new();
        parts.extend_from_slice(&[1; 8]);
        parts.extend_from_slice(&3i32.to_le_bytes());
        parts.extend_from_slice(&[2; 12]);
        parts.extend_from_slice(&1i32.to_le_bytes());
        parts.extend_from_slice(&[3; 12]);
        parts.extend_from_slice(&2i32.to_le_bytes());
        parts.extend_from_slice(&[4; 24]);
        parts.extend_from_slice(&4i32.to_le_bytes());
        parts.extend_from_slice(&[5; 64]);
        parts.extend_from_slice(&555u32.to_le_bytes());
        parts.extend_from_slice(b"gid-1\0");
        parts.extend_from_slice(&[6; 16]);
        let xinfo = XACT_XINFO_HAS_DBINFO
            | XACT_XINFO_HAS_SUBXACTS
            | XACT_XINFO_HAS_RELFILELOCATORS
            | XACT_XINFO_HAS_DROPPED_STATS
            | XACT_XINFO_HAS_INVALS
            | XACT_XINFO_HAS_TWOPHASE
            | 128 // HAS_GID
            | 32; // HAS_ORIGIN
        let cp = b.push(
            RM_XACT_ID,
            XLOG_XACT_COMMIT_PREPARED | XLOG_XACT_HAS_INFO,
            0,
            &commit_payload(T0 + 3, Some(xinfo), &parts),
        );
        // ABORT PREPARED: no invals part in abort records.
        let mut parts = Vec::new();
        parts.extend_from_slice(&1i32.to_le_bytes());
        parts.extend_from_slice(&[2; 4]);
        parts.extend_from_slice(&556u32.to_le_bytes());
        let ap = b.push(
            RM_XACT_ID,
            XLOG_XACT_ABORT_PREPARED | XLOG_XACT_HAS_INFO,
            0,
            &commit_payload(
                T0 + 4,
                Some(XACT_XINFO_HAS_SUBXACTS | XACT_XINFO_HAS_TWOPHASE),
                &parts,
            ),
        );
        // A commit with a long main data header (many subtransactions).
        let mut parts = 100i32.to_le_bytes().to_vec();
        parts.extend_from_slice(&[9; 400]);
        let big = b.push(
            RM_XACT_ID,
            XLOG_XACT_COMMIT | XLOG_XACT_HAS_INFO,
            703,
            &commit_payload(T0 + 5, Some(XACT_XINFO_HAS_SUBXACTS), &parts),
        );
        // PREPARE and ASSIGNMENT records are not events.
        b.push(
            RM_XACT_ID,
            0x10,
            704,
            &commit_payload(T0 + 6, None, &[0; 40]),
        );
        b.push(RM_XACT_ID, 0x50, 704, &commit_payload(T0 + 6, None, &[]));
        let data_end = b.position();
        b.zero_fill_to(lsn("0/400000"));
        let s = scan_segment(b.bytes(), lsn("0/300000"), seg1m()).unwrap();
        assert!(s.undecoded.is_empty(), "{:?}", s.undecoded);
        assert_eq!(s.records, 11);
        assert_eq!(s.system_identifier, Some(SYSID));
        assert_eq!(s.server_major, Some(15));
        let kinds: Vec<(Lsn, EventKind)> =
            s.events.iter().map(|e| (e.lsn, e.kind.clone())).collect();
        assert_eq!(
            kinds,
            vec![
                (
                    c1,
                    EventKind::Commit {
                        xid: 700,
                        time_us: T0,
                        prepared: false
                    }
                ),
                (
                    blk,
                    EventKind::RestorePoint {
                        name: "with-blocks".into(),
                        time_us: T0 - 1
                    }
                ),
                (
                    rp,
                    EventKind::RestorePoint {
                        name: "before-upgrade".into(),
                        time_us: T0 + 1
                    }
                ),
                (
                    ab,
                    EventKind::Abort {
                        xid: 702,
                        time_us: T0 + 2,
                        prepared: false
                    }
                ),
                (
                    cp,
                    EventKind::Commit {
                        xid: 555,
                        time_us: T0 + 3,
                        prepared: true
                    }
                ),
                (
                    ap,
                    EventKind::Abort {
                        xid: 556,
                        time_us: T0 + 4,
                        prepared: true
                    }
                ),
                (
                    big,
                    EventKind::Commit {
                        xid: 703,
                        time_us: T0 + 5,
                        prepared: false
                    }
                ),
            ]
        );
        // end_lsn: a commit with 8 bytes of main data is 24 + 2 + 8 = 34 bytes.
        assert_eq!(s.events[0].end_lsn, Lsn(c1.0 + 34));
        // The zero tail ends valid WAL right after the last record.
        let ScanEnd::Invalid { at, reason } = &s.end else {
            panic!("{:?}", s.end)
        };
        assert_eq!(*reason, EndReason::ZeroLength);
        assert_eq!(*at, Lsn((data_end.0 + 7) & !7));
        assert!(!s.fully_scanned());
    }

    #[test]
    fn scanner_and_verifier_read_the_same_records() {
        // Random record sizes (some spanning pages and segments) with commits among them, over
        // whole segments: the lenient scanner and the strict verifier count the same records,
        // and the scanner finds every commit that ends inside them.
        use crate::wal::verify::{VerifyParams, WalVerifier};
        for seed in 1..=4u64 {
            let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let start = lsn("1/0");
            let mut b = WalBuilder::new(SYSID, seg1m(), 1, start);
            let mut commits = Vec::new();
            let mut xid = 0;
            while b.position().0 < start.0 + 3 * MB + 100 {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                xid += 1;
                match rng % 8 {
                    0 => {
                        push_commit(&mut b, xid, T0 + i64::from(xid));
                        commits.push((xid, b.position()));
                    }
                    1 => {
                        b.push(10, 0, xid, &vec![xid as u8; (rng >> 8) as usize % 40_000]);
                    }
                    _ => {
                        b.push(10, 0, xid, &vec![1; (rng >> 8) as usize % 300]);
                    }
                }
            }
            let whole = &b.bytes()[..(3 * MB) as usize];
            let mut scanner = WalScanner::new(seg1m());
            let (mut records, mut found) = (0, Vec::new());
            for (i, seg) in whole.chunks(MB as usize).enumerate() {
                let s = scanner.scan(Lsn(start.0 + i as u64 * MB), seg).unwrap();
                assert!(s.fully_scanned(), "seed {seed}: {:?}", s.end);
                records += s.records;
                found.extend(s.events.iter().map(|e| (e.kind.xid().unwrap(), e.end_lsn)));
            }
            let mut v = WalVerifier::new(
                VerifyParams {
                    system_identifier: SYSID,
                    segment_size: seg1m(),
                    timeline: tl(1),
                },
                start,
            );
            v.feed(whole).unwrap();
            assert_eq!(records, v.records_verified(), "seed {seed}");
            commits.retain(|&(_, end)| end.0 <= start.0 + 3 * MB);
            // A commit ending exactly at the segment end is still read in it.
            assert_eq!(found, commits, "seed {seed}");
        }
    }

    #[test]
    fn main_data_walk_rejects_inconsistent_headers() {
        let mut b = WalBuilder::new(SYSID, seg1m(), 1, lsn("0/300000"));
        // Main data length claims more than the record holds: undecodable, not an event.
        let mut p = commit_payload(T0, None, &[]);
        p[1] = 20;
        p.extend_from_slice(&[0; 4]);
        let bad = b.push(RM_XACT_ID, XLOG_XACT_COMMIT, 9, &p);
        // A restore point too short for xl_restore_point.
        let mut p = with_main(&[], &[0; 10]);
        p.extend_from_slice(&[0; 10]);
        let short = b.push(RM_XLOG_ID, XLOG_RESTORE_POINT, 0, &p);
        // COMMIT PREPARED without the two-phase part.
        let bad2 = b.push(
            RM_XACT_ID,
            XLOG_XACT_COMMIT_PREPARED,
            0,
            &commit_payload(T0, None, &[]),
        );
        b.push_switch();
        let s = scan_segment(b.bytes(), lsn("0/300000"), seg1m()).unwrap();
        assert_eq!(s.undecoded, vec![bad, short, bad2]);
        assert!(s.events.is_empty());
        assert!(s.fully_scanned());
    }

    #[test]
    fn records_split_across_pages_and_segments() {
        // A commit whose header is split across a page boundary (starts at 8184), and one that
        // starts 8 bytes before the segment end and finishes in the next segment.
        let start = lsn("0/300000");
        let mut b = WalBuilder::new(SYSID, seg1m(), 1, start);
        b.push(10, 0, 1, &[0; 10]);
        b.fill_until(start.0 + 3 * PAGE as u64 + 8184);
        let split = push_commit(&mut b, 800, T0);
        assert_eq!(split.0 % PAGE as u64, 8184);
        b.fill_until(start.0 + MB - 16);
        let cross = push_commit(&mut b, 801, T0 + 7);
        assert!(
            cross.0 < start.0 + MB && b.position().0 > start.0 + MB,
            "{cross}"
        );
        let after = push_commit(&mut b, 802, T0 + 8);
        b.push_switch();
        let bytes = b.bytes();
        let (s1, s2) = bytes.split_at(MB as usize);

        // Alone: the first segment reports the crossing record as continued, the second skips
        // its tail.
        let a = scan_segment(s1, start, seg1m()).unwrap();
        assert_eq!(
            a.end,
            ScanEnd::SegmentEnd {
                continued: Some(cross)
            }
        );
        assert_eq!(
            a.events.iter().map(|e| e.kind.xid()).collect::<Vec<_>>(),
            vec![Some(800)]
        );
        let c = scan_segment(s2, Lsn(start.0 + MB), seg1m()).unwrap();
        assert_eq!(
            c.events
                .iter()
                .map(|e| (e.lsn, e.kind.xid()))
                .collect::<Vec<_>>(),
            vec![(after, Some(802))]
        );
        assert!(matches!(c.end, ScanEnd::Switch { .. }));

        // In sequence: the crossing commit is reported with the second segment.
        let mut sc = WalScanner::new(seg1m());
        let a2 = sc.scan(start, s1).unwrap();
        assert_eq!(a2, a);
        let c2 = sc.scan(Lsn(start.0 + MB), s2).unwrap();
        let ev: Vec<_> = c2.events.iter().map(|e| (e.lsn, e.kind.xid())).collect();
        assert_eq!(ev, vec![(cross, Some(801)), (after, Some(802))]);
        assert!(c2.events[0].end_lsn.0 > start.0 + MB + 40);
        assert_eq!(c2.records, c.records + 1);
        // A gap resets the chain: scanning segment 2 again starts afresh.
        let again = sc.scan(Lsn(start.0 + MB), s2).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn fed_in_pieces_a_scan_finds_what_it_finds_whole() {
        let start = lsn("0/300000");
        let mut b = WalBuilder::new(SYSID, seg1m(), 1, start);
        b.push(10, 0, 1, &[0; 10]);
        b.fill_until(start.0 + 3 * PAGE as u64 + 8184);
        push_commit(&mut b, 800, T0);
        b.fill_until(start.0 + MB - 16);
        push_commit(&mut b, 801, T0 + 7);
        push_commit(&mut b, 802, T0 + 8);
        b.push_switch();
        let bytes = b.bytes();
        let (s1, s2) = bytes.split_at(MB as usize);
        let s2 = &s2[..s2.len().min(MB as usize)];
        let next = Lsn(start.0 + MB);
        for piece in [1usize, 1000, 8192, 1 << 20] {
            let (mut whole, mut fed) = (WalScanner::new(seg1m()), WalScanner::new(seg1m()));
            let run = |sc: &mut WalScanner, at: Lsn, data: &[u8], partial: bool| {
                let mut f = sc.begin_feed(at).unwrap();
                for p in data.chunks(piece) {
                    f.feed(p);
                }
                sc.finish_feed(f, partial)
            };
            assert_eq!(run(&mut fed, start, s1, false), whole.scan(start, s1));
            assert_eq!(
                run(&mut fed, next, &s2[..5000], true),
                whole.scan_partial(next, &s2[..5000])
            );
            assert_eq!(run(&mut fed, start, s1, false), whole.scan(start, s1));
            let mut full = s2.to_vec();
            full.resize(MB as usize, 0);
            assert_eq!(run(&mut fed, next, &full, false), whole.scan(next, &full));
            // Wrong lengths are the same errors.
            assert_eq!(
                run(&mut fed, start, &s1[..100], false),
                whole.scan(start, &s1[..100])
            );
            let long = [s1, &[0u8; 3]].concat();
            assert_eq!(
                run(&mut fed, start, &long, true),
                whole.scan_partial(start, &long)
            );
        }
    }

    #[test]
    fn crc_and_prev_link_end_the_wal() {
        let start = lsn("0/300000");
        let mut b = WalBuilder::new(SYSID, seg1m(), 1, start);
        let c1 = push_commit(&mut b, 900, T0);
        let c2 = push_commit(&mut b, 901, T0 + 1);
        push_commit(&mut b, 902, T0 + 2);
        b.push_switch();
        let good = scan_segment(b.bytes(), start, seg1m()).unwrap();
        assert_eq!(good.events.len(), 3);
        assert!(matches!(good.end, ScanEnd::Switch { .. }));
        // Flip a byte of the second commit's timestamp.
        let mut bad = b.bytes().to_vec();
        bad[(c2.0 - start.0) as usize + 26] ^= 1;
        let s = scan_segment(&bad, start, seg1m()).unwrap();
        assert_eq!(s.events.len(), 1);
        assert_eq!(
            s.end,
            ScanEnd::Invalid {
                at: c2,
                reason: EndReason::Crc
            }
        );
        assert_eq!(s.last_record, Some(c1));
        // A wrong xl_prev.
        let mut bad = b.bytes().to_vec();
        bad[(c2.0 - start.0) as usize + 8] ^= 0x10;
        let s = scan_segment(&bad, start, seg1m()).unwrap();
        assert!(
            matches!(s.end, ScanEnd::Invalid { at, reason: EndReason::PrevLink { .. } } if at == c2)
        );
        // An all-zero file: no valid page header.
        let zero = vec![0u8; MB as usize];
        let s = scan_segment(&zero, start, seg1m()).unwrap();
        assert!(
            matches!(s.end, ScanEnd::Invalid { at, reason: EndReason::PageHeader(_) } if at == start)
        );
        // Caller mistakes.
        assert!(matches!(
            scan_segment(&zero[..100], start, seg1m()),
            Err(ScanError::SegmentLength { .. })
        ));
        assert!(matches!(
            scan_segment(&zero, Lsn(start.0 + 8192), seg1m()),
            Err(ScanError::NotSegmentStart { .. })
        ));
    }

    fn unhex(parts: &[&str]) -> Vec<u8> {
        let h: String = parts.concat();
        (0..h.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
            .collect()
    }

    /// Bodies (everything after the 24-byte header) of two records a PostgreSQL 15.18 server
    /// wrote for `COMMIT PREPARED` of a transaction that dropped a table in a subtransaction
    /// (xinfo: dbinfo, subxacts, relfilelocators, dropped stats, invals, two-phase) and for
    /// `ROLLBACK PREPARED` (dbinfo, subxacts, relfilelocators, dropped stats, two-phase).
    /// pg_waldump: `COMMIT_PREPARED 733: 2026-11-22 07:11:48.702509 UTC; rels: base/5/16387;
    /// subxacts: 734; dropped stats: 2/5/16387; inval msgs: ...` and `ABORT_PREPARED 735:
    /// 2026-11-22 07:11:48.729272 UTC; ...`; both records have xl_xid 0.
    const PG15_COMMIT_PREPARED: &[&str] = &[
        "fec40100002dad9cf5d60303005f010000050000007f06000001000000de020000010000007f0600",
        "0005000000034000000100000002000000050000000340000018000000500000000500000031c7ce",
        "e8000000004f0000000500000009d8dff80000000050000000050000008a17089c000000004f0000",
        "000500000053274a0e000000000700000005000000c8183b830000000006000000050000004ed6da",
        "b4000000000700000005000000999eeebc0000000006000000050000001fac71df00000000070000",
        "0005000000406feb63000000000600000005000000bd700078000000000700000005000000a03c0e",
        "f5000000000600000005000000c827b9a000000000070000000500000073d46c5600000000060000",
        "00050000005f97792c0000000007000000050000008be9c032000000000600000005000000bf4839",
        "1c0000000007000000050000005b67878d0000000006000000050000004a59f7d100000000370000",
        "00050000000ad0afc300000000360000000500000053274a0e00000000fb930c7105000000300a00",
        "0000000000fb930c7105000000300a000000000000fe000000050000000340000000000000fb930c",
        "7105000000300a000000000000dd020000",
    ];
    const PG15_ABORT_PREPARED: &[&str] = &[
        "ff38b8159df5d60303005601000001000000e0020000010000007f06000005000000064000000100",
        "0000020000000500000006400000df020000",
    ];

    #[test]
    fn real_two_phase_layouts() {
        let mut b = WalBuilder::new(SYSID, seg1m(), 1, lsn("0/700000"));
        let cp = b.push(RM_XACT_ID, 0xB1, 0, &unhex(PG15_COMMIT_PREPARED));
        let ap = b.push(RM_XACT_ID, 0xC1, 0, &unhex(PG15_ABORT_PREPARED));
        b.push_switch();
        let s = scan_segment(b.bytes(), lsn("0/700000"), seg1m()).unwrap();
        assert!(s.undecoded.is_empty());
        let got: Vec<_> = s.events.iter().map(|e| (e.lsn, e.kind.clone())).collect();
        assert_eq!(
            got,
            vec![
                (
                    cp,
                    EventKind::Commit {
                        xid: 733,
                        time_us: 848_646_708_702_509,
                        prepared: true
                    }
                ),
                (
                    ap,
                    EventKind::Abort {
                        xid: 735,
                        time_us: 848_646_708_729_272,
                        prepared: true
                    }
                ),
            ]
        );
    }

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!("{FIXTURES}/{name}.zst");
        let compressed = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        zstd::stream::decode_all(&compressed[..]).expect("fixture decompresses")
    }

    /// Real PostgreSQL 15.18 segments (tests/fixtures/wal/README.md), record counts from
    /// pg_waldump.
    #[test]
    fn real_segments() {
        let s9 = fixture("000000010000000000000009");
        let sa = fixture("00000001000000000000000A");
        let nine = scan_segment(&s9, lsn("0/900000"), seg1m()).unwrap();
        assert_eq!(nine.records, 2326);
        assert_eq!(
            nine.end,
            ScanEnd::SegmentEnd {
                continued: Some(lsn("0/9EDE28"))
            }
        );
        assert_eq!(nine.system_identifier, Some(7710843067740758272));
        assert!(nine.undecoded.is_empty());
        // pg_waldump: COMMIT at 0/9EDE00, 34 bytes.
        let last = nine.events.last().unwrap();
        assert_eq!(last.lsn, lsn("0/9EDE00"));
        assert_eq!(last.end_lsn, lsn("0/9EDE22"));
        assert!(matches!(
            last.kind,
            EventKind::Commit {
                prepared: false,
                ..
            }
        ));
        let commits: Vec<_> = nine
            .events
            .iter()
            .filter(|e| matches!(e.kind, EventKind::Commit { .. }))
            .collect();
        // pg_waldump -r Transaction lists 19 commits, xids 749..=767, the first at 0/909590 at
        // 2026-11-22 04:10:06.709411 UTC.
        assert_eq!(commits.len(), 19);
        assert_eq!(nine.events.len(), 19);
        assert_eq!(
            (commits[0].lsn, &commits[0].kind),
            (
                lsn("0/909590"),
                &EventKind::Commit {
                    xid: 749,
                    time_us: (1_795_320_606 - 946_684_800) * 1_000_000 + 709_411,
                    prepared: false
                }
            )
        );
        assert_eq!(commits[18].kind.xid(), Some(767));
        assert_eq!(
            commits[18].kind.time_us(),
            (1_795_320_608 - 946_684_800) * 1_000_000 + 628_340
        );
        let y2026 = (1_767_225_600 - 946_684_800) * 1_000_000i64; // 2026-01-01
        let y2027 = (1_798_761_600 - 946_684_800) * 1_000_000i64;
        for w in commits.windows(2) {
            assert!(w[0].kind.time_us() <= w[1].kind.time_us());
            assert!(w[0].kind.xid() < w[1].kind.xid());
        }
        for c in &commits {
            assert!((y2026..y2027).contains(&c.kind.time_us()), "{c:?}");
        }

        let a = scan_segment(&sa, lsn("0/A00000"), seg1m()).unwrap();
        assert_eq!(a.records, 202);
        assert_eq!(
            a.end,
            ScanEnd::Switch {
                at: lsn("0/AABC90")
            }
        );
        assert!(a.fully_scanned());
        let mut sc = WalScanner::new(seg1m());
        sc.scan(lsn("0/900000"), &s9).unwrap();
        let a2 = sc.scan(lsn("0/A00000"), &sa).unwrap();
        assert_eq!(a2.records, 203); // the logical message begun in segment 9 too
        assert_eq!(a2.events, a.events);

        // Timeline 2's first segment: page 1 from timeline 1, then timeline 2 pages.
        let b = scan_segment(
            &fixture("00000002000000000000000B"),
            lsn("0/B00000"),
            seg1m(),
        )
        .unwrap();
        assert_eq!(b.records, 207);
        assert_eq!(
            b.end,
            ScanEnd::Switch {
                at: lsn("0/B81C88")
            }
        );
        // pg_waldump: one COMMIT, xid 770 at 0/B81C60, 2026-11-22 04:10:30.909956 UTC.
        assert_eq!(
            b.events,
            vec![WalEvent {
                lsn: lsn("0/B81C60"),
                end_lsn: lsn("0/B81C82"),
                kind: EventKind::Commit {
                    xid: 770,
                    time_us: (1_795_320_630 - 946_684_800) * 1_000_000 + 909_956,
                    prepared: false
                }
            }]
        );

        // E ends in a record cut short by a crash; F starts with
        // XLP_FIRST_IS_OVERWRITE_CONTRECORD, which drops it.
        let e = fixture("00000003000000000000000E");
        let f = fixture("00000003000000000000000F");
        let mut sc = WalScanner::new(seg1m());
        let se = sc.scan(lsn("0/E00000"), &e).unwrap();
        assert_eq!(
            se.end,
            ScanEnd::SegmentEnd {
                continued: Some(lsn("0/EFC688"))
            }
        );
        let sf = sc.scan(lsn("0/F00000"), &f).unwrap();
        assert_eq!(sf.records, 3);
        assert_eq!(
            sf.end,
            ScanEnd::Switch {
                at: lsn("0/F000D0")
            }
        );
        let sf_alone = scan_segment(&f, lsn("0/F00000"), seg1m()).unwrap();
        assert_eq!(sf_alone.records, 3);
    }

    /// The events of `scan`, as (lsn, xid).
    fn xids(scan: &SegmentScan) -> Vec<(Lsn, Option<u32>)> {
        scan.events.iter().map(|e| (e.lsn, e.kind.xid())).collect()
    }

    fn partial_of(bytes: &[u8], start: Lsn, len: usize) -> SegmentScan {
        WalScanner::new(seg1m())
            .scan_partial(start, &bytes[..len])
            .unwrap()
    }

    #[test]
    fn partial_with_a_record_cut_at_its_end() {
        let start = lsn("0/300000");
        let mut b = WalBuilder::new(SYSID, seg1m(), 1, start);
        let c1 = push_commit(&mut b, 10, T0);
        let c2 = push_commit(&mut b, 11, T0 + 1);
        // A big record that crosses into the second page, then a commit.
        let big = b.push(10, 0, 12, &[5; 9000]);
        let c3 = push_commit(&mut b, 13, T0 + 2);
        let end = b.position();
        let bytes = b.bytes();
        let off = |l: Lsn| (l.0 - start.0) as usize;

        // Everything held: every record counts, the bytes end after the last one.
        let all = partial_of(bytes, start, bytes.len());
        assert_eq!(
            xids(&all),
            vec![(c1, Some(10)), (c2, Some(11)), (c3, Some(13))]
        );
        assert_eq!(all.end, ScanEnd::PartialEnd { at: end, cut: None });
        assert_eq!(all.last_record, Some(c3));
        assert_eq!(all.last_record_end, Some(end));
        assert_eq!(all.system_identifier, Some(SYSID));
        assert!(!all.fully_scanned());

        // Cut inside the last commit: it does not count, the one before does.
        let s = partial_of(bytes, start, off(c3) + 20);
        assert_eq!(xids(&s), vec![(c1, Some(10)), (c2, Some(11))]);
        assert_eq!(
            s.end,
            ScanEnd::PartialEnd {
                at: Lsn(c3.0 + 20),
                cut: Some(c3)
            }
        );
        assert_eq!(s.last_record, Some(big));
        // Cut inside xl_tot_len itself (two bytes of the record), and right at its start.
        let s = partial_of(bytes, start, off(c3) + 2);
        assert_eq!(
            s.end,
            ScanEnd::PartialEnd {
                at: Lsn(c3.0 + 2),
                cut: Some(c3)
            }
        );
        let s = partial_of(bytes, start, off(c3));
        assert_eq!(s.end, ScanEnd::PartialEnd { at: c3, cut: None });
        assert_eq!(s.last_record, Some(big));
        // Cut in the big record, on its first page and on its second.
        for cut in [off(big) + 100, PAGE + 30, PAGE + 10] {
            let s = partial_of(bytes, start, cut);
            assert_eq!(xids(&s), vec![(c1, Some(10)), (c2, Some(11))], "{cut}");
            assert_eq!(
                s.end,
                ScanEnd::PartialEnd {
                    at: Lsn(start.0 + cut as u64),
                    cut: Some(big)
                },
                "{cut}"
            );
            assert_eq!(s.last_record, Some(c2));
        }
        // A partial longer than a segment is the caller's mistake.
        let long = vec![0u8; MB as usize + 1];
        assert!(matches!(
            WalScanner::new(seg1m()).scan_partial(start, &long),
            Err(ScanError::PartialTooLong { .. })
        ));
    }

    #[test]
    fn partial_ending_at_a_page_boundary() {
        let start = lsn("0/300000");
        // A record ending exactly at the end of the first page.
        let mut b = WalBuilder::new(SYSID, seg1m(), 1, start);
        let c1 = push_commit(&mut b, 20, T0);
        let first_page_end = start.0 + PAGE as u64;
        let pos = (b.position().0 + 7) & !7;
        let filler = b.push(
            10,
            0,
            1,
            &vec![7; (first_page_end - pos) as usize - REC_HDR],
        );
        assert_eq!(b.position().0, first_page_end);
        let c2 = push_commit(&mut b, 21, T0 + 1);
        let bytes = b.bytes().to_vec();
        let s = partial_of(&bytes, start, PAGE);
        assert_eq!(xids(&s), vec![(c1, Some(20))]);
        assert_eq!(
            s.end,
            ScanEnd::PartialEnd {
                at: Lsn(first_page_end),
                cut: None
            }
        );
        assert_eq!(s.last_record, Some(filler));
        assert_eq!(s.last_record_end, Some(Lsn(first_page_end)));
        // The bytes end inside the next page header: nothing more, no record cut.
        let s = partial_of(&bytes, start, PAGE + 10);
        assert_eq!(
            s.end,
            ScanEnd::PartialEnd {
                at: Lsn(first_page_end + 10),
                cut: None
            }
        );
        let s = partial_of(&bytes, start, bytes.len());
        assert_eq!(xids(&s), vec![(c1, Some(20)), (c2, Some(21))]);

        // A record going on past the page boundary where the bytes end: cut there.
        let mut b = WalBuilder::new(SYSID, seg1m(), 1, start);
        push_commit(&mut b, 30, T0);
        b.fill_until(start.0 + PAGE as u64 - 16);
        let cross = push_commit(&mut b, 31, T0 + 1);
        assert!(b.position().0 > first_page_end);
        let s = partial_of(b.bytes(), start, PAGE);
        assert_eq!(
            s.end,
            ScanEnd::PartialEnd {
                at: Lsn(first_page_end),
                cut: Some(cross)
            }
        );
        assert_eq!(xids(&s), vec![(lsn("0/300028"), Some(30))]);
        // ... and inside the next page's header.
        let s = partial_of(b.bytes(), start, PAGE + 12);
        assert_eq!(
            s.end,
            ScanEnd::PartialEnd {
                at: Lsn(first_page_end + 12),
                cut: Some(cross)
            }
        );
        // Inside the first page's long header.
        let s = partial_of(b.bytes(), start, 30);
        assert_eq!(
            s.end,
            ScanEnd::PartialEnd {
                at: Lsn(start.0 + 30),
                cut: None
            }
        );
        assert_eq!(s.system_identifier, None);
    }

    #[test]
    fn empty_partial() {
        let start = lsn("0/300000");
        let s = WalScanner::new(seg1m()).scan_partial(start, &[]).unwrap();
        assert_eq!(
            s.end,
            ScanEnd::PartialEnd {
                at: start,
                cut: None
            }
        );
        assert!(s.events.is_empty() && s.last_record.is_none() && s.records == 0);
        assert_eq!(s.system_identifier, None);

        // After a segment whose last record goes on into the (empty) partial: that record is
        // cut off, and the scanner carries nothing further.
        let mut b = WalBuilder::new(SYSID, seg1m(), 1, start);
        b.fill_until(start.0 + MB - 16);
        let cross = push_commit(&mut b, 40, T0);
        let bytes = b.bytes().to_vec();
        let next = Lsn(start.0 + MB);
        let mut sc = WalScanner::new(seg1m());
        let first = sc.scan(start, &bytes[..MB as usize]).unwrap();
        assert_eq!(
            first.end,
            ScanEnd::SegmentEnd {
                continued: Some(cross)
            }
        );
        let p = sc.scan_partial(next, &[]).unwrap();
        assert_eq!(
            p.end,
            ScanEnd::PartialEnd {
                at: next,
                cut: Some(cross)
            }
        );
        // With its bytes, the partial finishes the record begun before it.
        let mut sc = WalScanner::new(seg1m());
        sc.scan(start, &bytes[..MB as usize]).unwrap();
        let p = sc.scan_partial(next, &bytes[MB as usize..]).unwrap();
        assert_eq!(xids(&p), vec![(cross, Some(40))]);
        assert_eq!(p.last_record, Some(cross));
        assert_eq!(p.last_record_end, Some(b.position()));
        assert_eq!(
            p.end,
            ScanEnd::PartialEnd {
                at: b.position(),
                cut: None
            }
        );
        // Alone, its first bytes are the tail of a record begun before it.
        let alone = partial_of(&bytes[MB as usize..], next, bytes.len() - MB as usize);
        assert!(alone.events.is_empty() && alone.last_record.is_none());
        let alone = partial_of(&bytes[MB as usize..], next, 45);
        assert_eq!(
            alone.end,
            ScanEnd::PartialEnd {
                at: Lsn(next.0 + 45),
                cut: Some(next)
            }
        );
        // A partial ends the chain: the next scan starts afresh.
        let again = sc.scan(next, &vec![0u8; MB as usize]).unwrap();
        assert!(matches!(again.end, ScanEnd::Invalid { .. }));
    }

    #[test]
    fn partial_of_an_older_timeline_before_a_switch() {
        // Timeline 1 ends at a switch point inside segment 0/400000: its partial holds the WAL
        // up to there. Timeline 2's file of that segment has the same WAL up to the switch,
        // then its own.
        let start = lsn("0/400000");
        let mut b = WalBuilder::new(SYSID, seg1m(), 1, start);
        let c1 = push_commit(&mut b, 50, T0);
        let rp = b.push(
            RM_XLOG_ID,
            XLOG_RESTORE_POINT,
            0,
            &restore_point_payload(T0 + 1, "before-switch"),
        );
        let c2 = push_commit(&mut b, 51, T0 + 2);
        let switch_point = b.position();
        let tl1 = b.bytes().to_vec();
        b.set_timeline(2);
        b.fill_until(start.0 + 2 * PAGE as u64 + 64);
        let c3 = push_commit(&mut b, 52, T0 + 3);
        b.push_switch();
        let tl2 = b.bytes().to_vec();
        assert_eq!(&tl2[..tl1.len()], &tl1[..]);

        let p = partial_of(&tl1, start, tl1.len());
        assert_eq!(xids(&p), vec![(c1, Some(50)), (rp, None), (c2, Some(51))]);
        assert_eq!(
            p.end,
            ScanEnd::PartialEnd {
                at: switch_point,
                cut: None
            }
        );
        assert_eq!(p.last_record_end, Some(switch_point));
        let full = scan_segment(&tl2, start, seg1m()).unwrap();
        assert_eq!(
            xids(&full),
            vec![(c1, Some(50)), (rp, None), (c2, Some(51)), (c3, Some(52))]
        );
        // A pg_receivewal-style partial (pre-zeroed to the full size) reads the same way, its
        // zero tail ending valid WAL.
        let mut zeroed = tl1.clone();
        zeroed.resize(MB as usize, 0);
        let z = WalScanner::new(seg1m())
            .scan_partial(start, &zeroed)
            .unwrap();
        assert_eq!(z.events, p.events);
        assert_eq!(
            z.end,
            ScanEnd::Invalid {
                at: Lsn((switch_point.0 + 7) & !7),
                reason: EndReason::ZeroLength
            }
        );
    }

    /// Any length of a partial: no panic, the events are a prefix of the whole WAL's, each
    /// ends within the bytes held, and a reported cut starts at or after the last record end.
    #[test]
    fn partial_of_any_length() {
        let start = lsn("0/500000");
        let mut b = WalBuilder::new(SYSID, seg1m(), 1, start);
        for i in 0..40u32 {
            push_commit(&mut b, 100 + i, T0 + i64::from(i));
            b.push(10, 0, 1, &vec![1; (i as usize * 397) % 3000]);
        }
        let bytes = b.bytes().to_vec();
        let whole = partial_of(&bytes, start, bytes.len());
        assert_eq!(whole.events.len(), 40);
        let near_pages = (1..=bytes.len() / PAGE).flat_map(|p| (p * PAGE - 48)..(p * PAGE + 48));
        for len in (0..bytes.len()).step_by(13).chain(near_pages) {
            let s = partial_of(&bytes, start, len);
            let at = Lsn(start.0 + len as u64);
            let ScanEnd::PartialEnd { at: got, cut } = s.end else {
                panic!("{len}: {:?}", s.end)
            };
            assert_eq!(got, at);
            assert_eq!(s.events[..], whole.events[..s.events.len()], "{len}");
            assert!(s.events.iter().all(|e| e.end_lsn <= at), "{len}");
            if let (Some(c), Some(e)) = (cut, s.last_record_end) {
                assert!(c >= e, "{len}: cut {c} before the last record's end {e}");
            }
        }
    }

    /// A real PostgreSQL segment cut short, as a `.partial` of it would be.
    #[test]
    fn real_segment_as_a_partial() {
        let s9 = fixture("000000010000000000000009");
        let at = |l: &str| (lsn(l).0 - lsn("0/900000").0) as usize;
        // Up to just past the last commit (pg_waldump: 0/9EDE00, 34 bytes), then the start of
        // the next record, then 8 bytes into it.
        let s = partial_of(&s9, lsn("0/900000"), at("0/9EDE22"));
        assert_eq!(s.events.len(), 19);
        assert_eq!(s.last_record_end, Some(lsn("0/9EDE22")));
        assert_eq!(
            s.end,
            ScanEnd::PartialEnd {
                at: lsn("0/9EDE22"),
                cut: None
            }
        );
        let s = partial_of(&s9, lsn("0/900000"), at("0/9EDE30"));
        assert_eq!(
            s.end,
            ScanEnd::PartialEnd {
                at: lsn("0/9EDE30"),
                cut: Some(lsn("0/9EDE28"))
            }
        );
        // Cut inside the last commit: 18 commits.
        let s = partial_of(&s9, lsn("0/900000"), at("0/9EDE10"));
        assert_eq!(s.events.len(), 18);
        assert_eq!(s.records, 2325);
    }
}
