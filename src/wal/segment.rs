//! WAL segment sizes and file names (`xlog_internal.h`: XLogFileName, TLHistoryFileName).

use std::fmt;

use super::{Lsn, Timeline};

/// A validated `wal_segment_size`: a power of two from 1 MiB to 1 GiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SegmentSize(u32);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid wal_segment_size {0:?}: expected a power of two between 1MB and 1GB")]
pub struct SegmentSizeError(pub String);

impl SegmentSize {
    pub const DEFAULT: SegmentSize = SegmentSize(16 * 1024 * 1024);

    pub fn new(bytes: u64) -> Result<Self, SegmentSizeError> {
        if bytes.is_power_of_two() && (1 << 20..=1 << 30).contains(&bytes) {
            Ok(SegmentSize(bytes as u32))
        } else {
            Err(SegmentSizeError(bytes.to_string()))
        }
    }

    /// Parses the text of `SHOW wal_segment_size`, e.g. `16MB` or `1GB` (streamutil.c RetrieveWalSegSize).
    pub fn from_show(text: &str) -> Result<Self, SegmentSizeError> {
        let t = text.trim();
        let err = || SegmentSizeError(t.to_string());
        let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let n: u64 = t[..digits_end].parse().map_err(|_| err())?;
        let mult: u64 = match t[digits_end..].trim() {
            "" | "B" => 1,
            "kB" => 1 << 10,
            "MB" => 1 << 20,
            "GB" => 1 << 30,
            _ => return Err(err()),
        };
        Self::new(n.checked_mul(mult).ok_or_else(err)?).map_err(|_| err())
    }

    pub fn bytes(self) -> u32 {
        self.0
    }

    /// Segments per 4 GiB "xlogid" (the middle part of a segment file name).
    pub fn segments_per_xlogid(self) -> u64 {
        0x1_0000_0000 / u64::from(self.0)
    }
}

impl fmt::Display for SegmentSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 >= 1 << 30 {
            write!(f, "{}GB", self.0 >> 30)
        } else {
            write!(f, "{}MB", self.0 >> 20)
        }
    }
}

/// One WAL segment: a timeline and a segment number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentId {
    pub timeline: Timeline,
    pub segno: u64,
}

/// Segment 0 of timeline 1: a placeholder for structs filled in later (timeline 0, the old
/// default, is no timeline).
impl Default for SegmentId {
    fn default() -> Self {
        SegmentId::new(Timeline::FIRST, 0)
    }
}

impl SegmentId {
    pub fn new(timeline: Timeline, segno: u64) -> Self {
        SegmentId { timeline, segno }
    }

    /// The segment holding `lsn` on `timeline`.
    pub fn containing(timeline: Timeline, lsn: Lsn, size: SegmentSize) -> Self {
        SegmentId {
            timeline,
            segno: lsn.segno(size),
        }
    }

    pub fn start_lsn(self, size: SegmentSize) -> Lsn {
        Lsn(self.segno * u64::from(size.bytes()))
    }

    pub fn end_lsn(self, size: SegmentSize) -> Lsn {
        Lsn((self.segno + 1) * u64::from(size.bytes()))
    }

    pub fn next(self) -> Self {
        SegmentId {
            timeline: self.timeline,
            segno: self.segno + 1,
        }
    }

    /// The 24-hex-digit file name, e.g. `000000010000000000000003`.
    pub fn file_name(self, size: SegmentSize) -> String {
        let per = size.segments_per_xlogid();
        format!(
            "{:08X}{:08X}{:08X}",
            self.timeline,
            self.segno / per,
            self.segno % per
        )
    }

    /// Parses a 24-hex-digit segment file name (no suffix).
    pub fn parse_file_name(name: &str, size: SegmentSize) -> Option<Self> {
        if name.len() != 24 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let tli = Timeline::parse_file_name_part(&name[0..8])?;
        let log = u64::from_str_radix(&name[8..16], 16).ok()?;
        let seg = u64::from_str_radix(&name[16..24], 16).ok()?;
        let per = size.segments_per_xlogid();
        if seg >= per {
            return None;
        }
        Some(SegmentId {
            timeline: tli,
            segno: log * per + seg,
        })
    }
}

/// `0000000N.history`
pub fn history_file_name(timeline: Timeline) -> String {
    format!("{timeline:08X}.history")
}

/// Parses `0000000N.history` into N.
pub fn parse_history_file_name(name: &str) -> Option<Timeline> {
    Timeline::parse_file_name_part(name.strip_suffix(".history")?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::timeline::tl;

    #[test]
    fn show_values() {
        assert_eq!(SegmentSize::from_show("16MB").unwrap().bytes(), 16 << 20);
        assert_eq!(SegmentSize::from_show("1GB").unwrap().bytes(), 1 << 30);
        assert_eq!(SegmentSize::from_show("1MB").unwrap().bytes(), 1 << 20);
        assert!(SegmentSize::from_show("3MB").is_err());
        assert!(SegmentSize::from_show("2GB").is_err());
        assert!(SegmentSize::from_show("512kB").is_err());
        assert!(SegmentSize::from_show("MB").is_err());
        assert_eq!(SegmentSize::from_show("64MB").unwrap().to_string(), "64MB");
    }

    #[test]
    fn names_match_postgres() {
        let s16 = SegmentSize::DEFAULT;
        // pg_walfile_name('0/4000128') on TL 1 with 16 MB segments
        let id = SegmentId::containing(tl(1), Lsn(0x400_0128), s16);
        assert_eq!(id.file_name(s16), "000000010000000000000004");
        let id = SegmentId::containing(tl(2), Lsn(0x1_FF00_0000), s16);
        assert_eq!(id.file_name(s16), "0000000200000001000000FF");
        assert_eq!(
            SegmentId::parse_file_name("0000000200000001000000FF", s16),
            Some(id)
        );
        // 1 GB segments: 4 per xlogid
        let g = SegmentSize::new(1 << 30).unwrap();
        let id = SegmentId::containing(tl(1), Lsn(0x2_C000_0000), g);
        assert_eq!(id.file_name(g), "000000010000000200000003");
        assert_eq!(
            SegmentId::parse_file_name("000000010000000200000004", g),
            None
        );
        assert_eq!(
            SegmentId::parse_file_name("00000001000000000000000", s16),
            None
        );
        assert_eq!(
            SegmentId::parse_file_name("00000000000000000000000A", s16),
            None
        );
    }

    #[test]
    fn history_names() {
        assert_eq!(history_file_name(tl(2)), "00000002.history");
        assert_eq!(history_file_name(tl(0x1A)), "0000001A.history");
        assert_eq!(parse_history_file_name("0000001A.history"), Some(tl(0x1A)));
        assert_eq!(parse_history_file_name("00000000.history"), None);
        assert_eq!(parse_history_file_name("0000001.history"), None);
    }
}
