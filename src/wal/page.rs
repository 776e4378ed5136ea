//! WAL page headers: the layout constants and a pure decoder (no I/O, no checks).
//!
//! Every 8 KiB WAL page starts with an `XLogPageHeaderData` (the *short* header, 20 bytes of
//! fields MAXALIGNed to 24); the first page of every segment carries an
//! `XLogLongPageHeaderData` instead (the short fields, then the system identifier, the segment
//! size and the page size: 36 bytes MAXALIGNed to 40). All integers are little-endian.
//!
//! Layouts: `src/include/access/xlog_internal.h` (REL_15_STABLE..REL_18_STABLE; the same in all
//! four). What is checked about the decoded fields, and where: [`super::verify`] (the streaming
//! verifier of `walagent stream`, `walagent backup` and `wal-fetch`). See
//! `proto-notes/wal-format.md`.

use super::Lsn;

/// XLOG_BLCKSZ: the WAL page size. Fixed at 8 KiB in every build walagent supports.
pub const WAL_PAGE_SIZE: u32 = 8192;

/// SizeOfXLogShortPHD: `MAXALIGN(sizeof(XLogPageHeaderData))`, 20 bytes of fields.
pub const SIZE_OF_SHORT_PHD: usize = 24;
/// SizeOfXLogLongPHD: `MAXALIGN(sizeof(XLogLongPageHeaderData))`, 36 bytes of fields.
pub const SIZE_OF_LONG_PHD: usize = 40;

/// The page continues a record begun on an earlier page (`xlp_rem_len` bytes of it).
pub const XLP_FIRST_IS_CONTRECORD: u16 = 0x0001;
/// The page has a long header (set exactly on a segment's first page).
pub const XLP_LONG_HEADER: u16 = 0x0002;
/// Archivers' hint that backup blocks starting on this page are optional; no effect on layout.
pub const XLP_BKP_REMOVABLE: u16 = 0x0004;
/// The record continued onto this page was lost in a crash and replaced by new WAL
/// (`CreateOverwriteContrecordRecord`).
pub const XLP_FIRST_IS_OVERWRITE_CONTRECORD: u16 = 0x0008;
/// XLP_ALL_FLAGS: every defined `xlp_info` bit in 15..=18. (The development tree after 18 drops
/// XLP_BKP_REMOVABLE and renumbers OVERWRITE; it also has a new magic, which is rejected.)
pub const XLP_ALL_FLAGS: u16 = 0x000F;

/// XLOG_PAGE_MAGIC per supported major version, as (magic, major).
pub const MAGICS: [(u16, u32); 4] = [(0xD110, 15), (0xD113, 16), (0xD116, 17), (0xD118, 18)];

/// The major version (15..=18) whose WAL carries `magic`; `None` for any other value.
pub fn major_of_magic(magic: u16) -> Option<u32> {
    MAGICS.iter().find(|(m, _)| *m == magic).map(|&(_, v)| v)
}

/// The server's `XLOG_PAGE_MAGIC` for a major version (15..=18).
pub fn page_magic_for(major: u32) -> Option<u16> {
    MAGICS.iter().find(|(_, v)| *v == major).map(|&(m, _)| m)
}

/// The bytes of a page header as they sit at the start of a page: room for a long header; a
/// short header uses the first [`SIZE_OF_SHORT_PHD`].
pub type HeaderBytes = [u8; SIZE_OF_LONG_PHD];

/// `XLogPageHeaderData`, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageHeader {
    /// `xlp_magic`: the WAL format version.
    pub magic: u16,
    /// `xlp_info`: the `XLP_*` flags.
    pub info: u16,
    /// `xlp_tli`: the timeline of the first record on the page.
    pub tli: u32,
    /// `xlp_pageaddr`: the LSN of the page itself.
    pub pageaddr: Lsn,
    /// `xlp_rem_len`: bytes of a record continued from the previous page.
    pub rem_len: u32,
}

/// The fields `XLogLongPageHeaderData` adds after the short header (offsets 24..36).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LongHeader {
    /// `xlp_sysid`: the system identifier from pg_control.
    pub sysid: u64,
    /// `xlp_seg_size`: `wal_segment_size`.
    pub seg_size: u32,
    /// `xlp_xlog_blcksz`: XLOG_BLCKSZ.
    pub blcksz: u32,
}

fn u16_at(b: &HeaderBytes, at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &HeaderBytes, at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &HeaderBytes, at: usize) -> u64 {
    (u64::from(u32_at(b, at + 4)) << 32) | u64::from(u32_at(b, at))
}

impl PageHeader {
    /// The short-header fields from the first 20 bytes of `b`.
    pub fn from_bytes(b: &HeaderBytes) -> PageHeader {
        PageHeader {
            magic: u16_at(b, 0),
            info: u16_at(b, 2),
            tli: u32_at(b, 4),
            pageaddr: Lsn(u64_at(b, 8)),
            rem_len: u32_at(b, 16),
        }
    }

    /// The header at the start of `page`: the short fields, and the long ones when `xlp_info`
    /// has [`XLP_LONG_HEADER`]. `None` when `page` is shorter than the header it announces.
    pub fn parse(page: &[u8]) -> Option<(PageHeader, Option<LongHeader>)> {
        let mut b: HeaderBytes = [0; SIZE_OF_LONG_PHD];
        let short = page.get(..SIZE_OF_SHORT_PHD)?;
        b[..SIZE_OF_SHORT_PHD].copy_from_slice(short);
        let h = PageHeader::from_bytes(&b);
        if !h.is_long() {
            return Some((h, None));
        }
        b.copy_from_slice(page.get(..SIZE_OF_LONG_PHD)?);
        Some((h, Some(LongHeader::from_bytes(&b))))
    }

    /// `xlp_info` has [`XLP_LONG_HEADER`].
    pub fn is_long(&self) -> bool {
        self.info & XLP_LONG_HEADER != 0
    }

    /// `XLogPageHeaderSize`: the header's size as its flags say.
    pub fn size(&self) -> usize {
        if self.is_long() {
            SIZE_OF_LONG_PHD
        } else {
            SIZE_OF_SHORT_PHD
        }
    }

    /// `xlp_info` has [`XLP_FIRST_IS_CONTRECORD`].
    pub fn is_contrecord(&self) -> bool {
        self.info & XLP_FIRST_IS_CONTRECORD != 0
    }

    /// `xlp_info` has [`XLP_FIRST_IS_OVERWRITE_CONTRECORD`].
    pub fn is_overwrite_contrecord(&self) -> bool {
        self.info & XLP_FIRST_IS_OVERWRITE_CONTRECORD != 0
    }

    /// The major version the magic belongs to (15..=18), if known.
    pub fn server_major(&self) -> Option<u32> {
        major_of_magic(self.magic)
    }
}

impl LongHeader {
    /// The long-header fields at offsets 24..36 of `b`.
    pub fn from_bytes(b: &HeaderBytes) -> LongHeader {
        LongHeader {
            sysid: u64_at(b, 24),
            seg_size: u32_at(b, 32),
            blcksz: u32_at(b, 36),
        }
    }
}

/// The header size a page at `page` has in a stream of `seg_size` segments: long on a
/// segment's first page, short elsewhere (as `AdvanceXLInsertBuffer` writes them).
pub fn header_size_at(page: Lsn, seg_size: u32) -> usize {
    if page.0.is_multiple_of(u64::from(seg_size)) {
        SIZE_OF_LONG_PHD
    } else {
        SIZE_OF_SHORT_PHD
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first page header of `tests/fixtures/wal/000000010000000000000009` (PostgreSQL 15.18,
    /// 1 MB segments), byte for byte.
    const LONG: [u8; 40] = [
        0x10, 0xD1, 0x06, 0x00, 0x01, 0x00, 0x00, 0x00, // magic D110, info 0x0006, tli 1
        0x00, 0x00, 0x90, 0x00, 0x00, 0x00, 0x00, 0x00, // pageaddr 0/900000
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // rem_len 0, padding
        0x00, 0xA1, 0x78, 0x93, 0xEA, 0x6A, 0x02, 0x6B, // sysid 7710843067740758272
        0x00, 0x00, 0x10, 0x00, 0x00, 0x20, 0x00, 0x00, // seg_size 1 MiB, blcksz 8192
    ];

    #[test]
    fn decodes_a_long_header() {
        let (h, long) = PageHeader::parse(&LONG).unwrap();
        assert_eq!(
            h,
            PageHeader {
                magic: 0xD110,
                info: XLP_LONG_HEADER | XLP_BKP_REMOVABLE,
                tli: 1,
                pageaddr: Lsn(0x900000),
                rem_len: 0
            }
        );
        assert_eq!(h.size(), SIZE_OF_LONG_PHD);
        assert_eq!(h.server_major(), Some(15));
        assert!(!h.is_contrecord() && !h.is_overwrite_contrecord());
        assert_eq!(
            long,
            Some(LongHeader {
                sysid: 7710843067740758272,
                seg_size: 1 << 20,
                blcksz: 8192
            })
        );
        // A long header announced but cut short.
        assert_eq!(PageHeader::parse(&LONG[..39]), None);
        assert_eq!(PageHeader::parse(&LONG[..10]), None);
    }

    #[test]
    fn decodes_a_short_header() {
        let mut b = [0u8; 24];
        b[..2].copy_from_slice(&0xD116u16.to_le_bytes());
        b[2..4].copy_from_slice(&(XLP_FIRST_IS_CONTRECORD | XLP_BKP_REMOVABLE).to_le_bytes());
        b[4..8].copy_from_slice(&3u32.to_le_bytes());
        b[8..16].copy_from_slice(&0x1_2345_6000u64.to_le_bytes());
        b[16..20].copy_from_slice(&777u32.to_le_bytes());
        let (h, long) = PageHeader::parse(&b).unwrap();
        assert_eq!(long, None);
        assert_eq!(
            (h.magic, h.tli, h.pageaddr, h.rem_len),
            (0xD116, 3, Lsn(0x1_2345_6000), 777)
        );
        assert!(h.is_contrecord());
        assert_eq!(h.size(), SIZE_OF_SHORT_PHD);
        assert_eq!(h.server_major(), Some(17));
        assert_eq!(PageHeader::parse(&b[..23]), None);
    }

    #[test]
    fn magics_and_sizes() {
        for (magic, major) in MAGICS {
            assert_eq!(page_magic_for(major), Some(magic));
            assert_eq!(major_of_magic(magic), Some(major));
        }
        assert_eq!(major_of_magic(0xD10D), None); // 14
        assert_eq!(major_of_magic(0xD120), None); // development tree after 18
        assert_eq!(page_magic_for(14), None);
        assert_eq!(header_size_at(Lsn(0x100_0000), 1 << 24), SIZE_OF_LONG_PHD);
        assert_eq!(header_size_at(Lsn(0x100_2000), 1 << 24), SIZE_OF_SHORT_PHD);
    }
}
