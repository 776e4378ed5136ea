//! Log sequence numbers: a byte position in the WAL stream, printed `X/X`.

use std::fmt;
use std::str::FromStr;

use super::SegmentSize;

/// A WAL position. `Lsn(0)` is PostgreSQL's `InvalidXLogRecPtr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    pub const INVALID: Lsn = Lsn(0);

    pub fn is_valid(self) -> bool {
        self.0 != 0
    }

    /// Segment number holding this position (`XLByteToSeg`).
    pub fn segno(self, seg_size: SegmentSize) -> u64 {
        self.0 / u64::from(seg_size.bytes())
    }

    /// Offset of this position inside its segment (`XLogSegmentOffset`).
    pub fn segment_offset(self, seg_size: SegmentSize) -> u32 {
        // The remainder is below the segment size, a u32.
        (self.0 % u64::from(seg_size.bytes())) as u32
    }

    /// Start of the segment holding this position.
    pub fn segment_start(self, seg_size: SegmentSize) -> Lsn {
        Lsn(self.0 - u64::from(self.segment_offset(seg_size)))
    }

    /// Offset inside the 8 KiB WAL page.
    pub fn page_offset(self) -> u32 {
        (self.0 % crate::wal::WAL_PAGE_SIZE as u64) as u32
    }

    pub fn checked_add(self, n: u64) -> Option<Lsn> {
        self.0.checked_add(n).map(Lsn)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid LSN {0:?}: expected two hexadecimal numbers separated by a slash, like 0/16B3748")]
pub struct ParseLsnError(pub String);

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseLsnError(s.to_string());
        let (hi, lo) = s.trim().split_once('/').ok_or_else(err)?;
        if hi.is_empty() || lo.is_empty() || hi.len() > 8 || lo.len() > 8 {
            return Err(err());
        }
        let hi = u32::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

/// Serialized as the `X/X` text, the form PostgreSQL and every tool print.
impl serde::Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Lsn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_print_round_trip() {
        for s in ["0/0", "0/16B3748", "1/0", "FFFFFFFF/FFFFFFFF", "A/4000128"] {
            assert_eq!(s.parse::<Lsn>().unwrap().to_string(), s);
        }
        assert_eq!("0/4000128".parse::<Lsn>().unwrap(), Lsn(0x400_0128));
        assert_eq!("1/2".parse::<Lsn>().unwrap(), Lsn((1 << 32) | 2));
    }

    #[test]
    fn parse_rejects_garbage() {
        for s in ["", "/", "0/", "/1", "x/1", "0/1/2", "123456789/0", "0 /1"] {
            assert!(s.parse::<Lsn>().is_err(), "{s}");
        }
    }

    #[test]
    fn segment_math() {
        let seg = SegmentSize::DEFAULT;
        let l = Lsn(0x0000_0001_0400_0128);
        assert_eq!(l.segno(seg), 0x104);
        assert_eq!(l.segment_offset(seg), 0x128);
        assert_eq!(l.segment_start(seg), Lsn(0x0000_0001_0400_0000));
        assert_eq!(l.page_offset(), 0x128);
    }
}
