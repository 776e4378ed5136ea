//! WAL record headers: the layout constants and a pure decoder (no I/O, no checks).
//!
//! Every record starts with an `XLogRecord` (24 bytes: `xl_tot_len` u32, `xl_xid` u32,
//! `xl_prev` u64, `xl_info` u8, `xl_rmid` u8, 2 bytes padding, `xl_crc` u32), MAXALIGNed in the
//! stream; the record's blocks and data follow. `xl_crc` is CRC-32C over the bytes after the
//! header, then over the header bytes before `xl_crc`. All integers are little-endian.
//!
//! Layout: `src/include/access/xlogrecord.h` and `rmgrlist.h` (REL_15_STABLE..REL_18_STABLE).
//! How records are followed across pages and checked: [`super::reader`].

use super::Lsn;

/// SizeOfXLogRecord.
pub const SIZE_OF_XLOG_RECORD: usize = 24;
/// Offset of `xl_crc` in the record header; the CRC covers the header bytes before it.
pub const XL_CRC_OFFSET: usize = 20;
/// Records at or above this size are invalid (PostgreSQL's `XLogRecordMaxSize` is below 1 GiB;
/// xlogreader.c rejects lengths it cannot allocate).
pub const MAX_TOT_LEN: u32 = 1 << 30;

/// `RM_XLOG_ID`: the XLOG resource manager (switch, restore points, checkpoints).
pub const RM_XLOG_ID: u8 = 0;
/// `RM_XACT_ID`: the transaction resource manager (commits, aborts).
pub const RM_XACT_ID: u8 = 1;
/// `XLR_RMGR_INFO_MASK`: the `xl_info` bits a resource manager may use.
pub const XLR_RMGR_INFO_MASK: u8 = 0xF0;
/// `XLOG_SWITCH` (`RM_XLOG_ID`): the rest of the segment is unused.
pub const XLOG_SWITCH: u8 = 0x40;
/// `XLOG_RESTORE_POINT` (`RM_XLOG_ID`): `pg_create_restore_point`.
pub const XLOG_RESTORE_POINT: u8 = 0x70;

/// The bytes of a record header.
pub type RecordHeaderBytes = [u8; SIZE_OF_XLOG_RECORD];

/// `XLogRecord`, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// `xl_tot_len`: the whole record, header included.
    pub tot_len: u32,
    /// `xl_xid`.
    pub xid: u32,
    /// `xl_prev`: the start of the previous record.
    pub prev: Lsn,
    /// `xl_info`.
    pub info: u8,
    /// `xl_rmid`.
    pub rmid: u8,
    /// `xl_crc`.
    pub crc: u32,
}

/// `xl_tot_len` from the first 4 bytes of a record.
#[inline]
pub fn tot_len_of(b: &[u8; 4]) -> u32 {
    u32::from_le_bytes(*b)
}

impl RecordHeader {
    pub fn from_bytes(h: &RecordHeaderBytes) -> RecordHeader {
        RecordHeader {
            tot_len: u32::from_le_bytes([h[0], h[1], h[2], h[3]]),
            xid: u32::from_le_bytes([h[4], h[5], h[6], h[7]]),
            prev: Lsn(u64::from_le_bytes([
                h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15],
            ])),
            info: h[16],
            rmid: h[17],
            crc: u32::from_le_bytes([h[20], h[21], h[22], h[23]]),
        }
    }

    /// An `XLOG_SWITCH` record.
    pub fn is_switch(&self) -> bool {
        self.rmid == RM_XLOG_ID && self.info & XLR_RMGR_INFO_MASK == XLOG_SWITCH
    }
}

/// The CRC-32C a record with header `h` must carry, given the CRC-32C of the bytes after its
/// header (`body_crc`, 0 for none).
#[inline]
pub fn record_crc(body_crc: u32, h: &RecordHeaderBytes) -> u32 {
    crc32c::crc32c_append(body_crc, &h[..XL_CRC_OFFSET])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_a_header_and_its_crc() {
        let body = [7u8; 10];
        let mut h: RecordHeaderBytes = [0; SIZE_OF_XLOG_RECORD];
        h[..4].copy_from_slice(&34u32.to_le_bytes());
        h[4..8].copy_from_slice(&700u32.to_le_bytes());
        h[8..16].copy_from_slice(&0x1_0000_0028u64.to_le_bytes());
        h[16] = XLOG_SWITCH;
        h[17] = RM_XLOG_ID;
        let crc = record_crc(crc32c::crc32c(&body), &h);
        h[20..].copy_from_slice(&crc.to_le_bytes());
        let r = RecordHeader::from_bytes(&h);
        assert_eq!(
            r,
            RecordHeader {
                tot_len: 34,
                xid: 700,
                prev: Lsn(0x1_0000_0028),
                info: XLOG_SWITCH,
                rmid: RM_XLOG_ID,
                crc
            }
        );
        assert!(r.is_switch());
        assert_eq!(tot_len_of(&[34, 0, 0, 0]), 34);
        // The CRC covers the body first, then the header up to xl_crc.
        let mut image = body.to_vec();
        image.extend_from_slice(&h[..XL_CRC_OFFSET]);
        assert_eq!(crc, crc32c::crc32c(&image));
        h[16] = 0x70;
        assert!(!RecordHeader::from_bytes(&h).is_switch());
    }
}
