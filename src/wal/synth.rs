//! Synthetic WAL with valid page headers, continuation flags, prev-links and CRCs, for tests,
//! benchmarks and fuzz targets (here and in other modules). Not used on any real path: built
//! for the crate's own unit tests and, for benches, integration tests and `fuzz/`, with the
//! `synth` feature (which the crate's dev-dependency on itself turns on).

use super::page::{
    SIZE_OF_LONG_PHD, SIZE_OF_SHORT_PHD, XLP_BKP_REMOVABLE, XLP_FIRST_IS_CONTRECORD,
    XLP_FIRST_IS_OVERWRITE_CONTRECORD, XLP_LONG_HEADER,
};
use super::record::{RM_XLOG_ID, SIZE_OF_XLOG_RECORD, XLOG_SWITCH, XL_CRC_OFFSET};
use super::{Lsn, SegmentSize, WAL_PAGE_SIZE};

const PAGE: u64 = WAL_PAGE_SIZE as u64;

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
            magic: super::page::MAGICS[0].0, // PostgreSQL 15
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
        let mut info: u16 = XLP_BKP_REMOVABLE; // as an idle server writes it
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
        let tot_len = (SIZE_OF_XLOG_RECORD + payload.len()) as u32;
        let mut rec = Vec::with_capacity(tot_len as usize);
        rec.extend_from_slice(&tot_len.to_le_bytes());
        rec.extend_from_slice(&xid.to_le_bytes());
        rec.extend_from_slice(&self.prev.to_le_bytes());
        rec.push(info);
        rec.push(rmid);
        rec.extend_from_slice(&[0, 0]);
        let crc = crc32c::crc32c_append(crc32c::crc32c(payload), &rec[..XL_CRC_OFFSET]);
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
    pub fn push_aborted(&mut self, rmid: u8, info: u8, xid: u32, payload: &[u8]) -> Option<Lsn> {
        let image = self.record_image(rmid, info, xid, payload);
        let mut probe = self.pos();
        probe += (8 - probe % 8) % 8;
        if probe.is_multiple_of(PAGE) {
            probe += if probe.is_multiple_of(self.seg_size) {
                SIZE_OF_LONG_PHD as u64
            } else {
                SIZE_OF_SHORT_PHD as u64
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

    /// Pushes a commit record (RM_XACT, XLOG_XACT_COMMIT) of `xid` at `time_us` (microseconds
    /// since 2000-01-01, as PostgreSQL's TimestampTz).
    pub fn push_commit(&mut self, xid: u32, time_us: i64) -> Lsn {
        let mut p = vec![255u8, 8];
        p.extend_from_slice(&time_us.to_le_bytes());
        self.push(1, 0x00, xid, &p)
    }

    /// Pushes filler records (RM_HEAP) so that the next record starts exactly at `target`
    /// (within the current segment, at least a record header before a page end).
    pub fn fill_until(&mut self, target: u64) {
        loop {
            let mut pos = (self.position().0 + 7) & !7;
            if pos.is_multiple_of(PAGE) {
                pos += if pos.is_multiple_of(self.seg_size) {
                    40
                } else {
                    24
                };
            }
            if pos == target {
                return;
            }
            assert!(pos < target, "overshot {} > {}", Lsn(pos), Lsn(target));
            let page_end = (pos / PAGE + 1) * PAGE;
            let len = if target < page_end {
                target - pos - 24
            } else {
                (page_end - pos).saturating_sub(24)
            };
            self.push(10, 0, 1, &vec![3; len as usize]);
        }
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

/// Small deterministic PRNG (xorshift64*) for the randomized tests of the crate (WAL, tar,
/// extractor), so they need no extra crate and a failing seed reproduces.
#[derive(Debug, Clone)]
pub struct TestRng(pub u64);

impl TestRng {
    #[allow(clippy::should_implement_trait)] // not an Iterator: it never ends
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A value below `n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
