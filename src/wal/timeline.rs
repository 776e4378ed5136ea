//! Timeline IDs (`TimeLineID` in PostgreSQL's `xlogdefs.h`).
//!
//! PostgreSQL numbers timelines from 1 (`BootstrapTimeLineID`); 0 is never a valid timeline
//! (the walreceiver and `readTimeLineHistory` treat it as "none"). [`Timeline`] holds that
//! invariant: it cannot be 0, so every value came through [`Timeline::new`], a file name parse,
//! [`FromStr`] or a JSON load that checked it.
//!
//! Printed in decimal, as PostgreSQL prints it (`IDENTIFY_SYSTEM`, history files,
//! `recovery_target_timeline`, `backup_manifest`); file names use the 8-hex-digit form, written
//! with `{:08X}` ([`fmt::UpperHex`]) or [`Timeline::file_name_part`].

use std::fmt;
use std::num::NonZeroU32;
use std::str::FromStr;

/// A timeline ID, never 0. Stored in JSON as the bare number (`"timeline": 1`); `Debug` prints
/// the bare number too, so logs and `{:?}` of structs holding one read as before.
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "u32", into = "u32")]
pub struct Timeline(NonZeroU32);

impl Timeline {
    /// Timeline 1, the one `initdb` creates.
    pub const FIRST: Timeline = Timeline(NonZeroU32::MIN);
    /// The largest timeline ID.
    pub const MAX: Timeline = Timeline(NonZeroU32::MAX);

    /// `None` for 0, which PostgreSQL never uses as a timeline.
    pub const fn new(id: u32) -> Option<Timeline> {
        match NonZeroU32::new(id) {
            Some(n) => Some(Timeline(n)),
            None => None,
        }
    }

    pub const fn get(self) -> u32 {
        self.0.get()
    }

    /// The timeline after this one (a promotion's new timeline); `None` after [`Timeline::MAX`].
    pub fn next(self) -> Option<Timeline> {
        self.0.checked_add(1).map(Timeline)
    }

    /// The 8 upper-case hex digits that start segment and history file names, e.g. `0000001A`.
    pub fn file_name_part(self) -> String {
        format!("{self:08X}")
    }

    /// Parses the 8-hex-digit file name part; `None` unless exactly 8 hex digits, not all zero.
    pub fn parse_file_name_part(hex: &str) -> Option<Timeline> {
        if hex.len() != 8 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        Timeline::new(u32::from_str_radix(hex, 16).ok()?)
    }
}

impl fmt::Debug for Timeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.get(), f)
    }
}

impl fmt::Display for Timeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// `{:08X}` gives the file name form.
impl fmt::UpperHex for Timeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::UpperHex::fmt(&self.0, f)
    }
}

impl From<Timeline> for u32 {
    fn from(t: Timeline) -> u32 {
        t.get()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid timeline ID {0}: expected 1 to 4294967295")]
pub struct ParseTimelineError(pub String);

impl TryFrom<u32> for Timeline {
    type Error = ParseTimelineError;

    fn try_from(id: u32) -> Result<Self, Self::Error> {
        Timeline::new(id).ok_or_else(|| ParseTimelineError(id.to_string()))
    }
}

/// Decimal, at least 1 (surrounding blanks allowed).
impl FromStr for Timeline {
    type Err = ParseTimelineError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let err = || ParseTimelineError(format!("{s:?}"));
        if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err());
        }
        t.parse::<u32>()
            .ok()
            .and_then(Timeline::new)
            .ok_or_else(err)
    }
}

/// A timeline for tests: panics on 0.
#[cfg(test)]
pub(crate) fn tl(id: u32) -> Timeline {
    Timeline::new(id).expect("test timeline is not 0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_is_not_a_timeline() {
        assert_eq!(Timeline::new(0), None);
        assert_eq!(Timeline::try_from(0u32).ok(), None);
        assert!("0".parse::<Timeline>().is_err());
        assert_eq!(Timeline::new(1), Some(Timeline::FIRST));
        assert_eq!(Timeline::new(u32::MAX), Some(Timeline::MAX));
        assert_eq!(std::mem::size_of::<Option<Timeline>>(), 4);
    }

    #[test]
    fn next_stops_at_max() {
        assert_eq!(Timeline::FIRST.next(), Some(tl(2)));
        assert_eq!(Timeline::MAX.next(), None);
    }

    #[test]
    fn decimal_and_hex_forms() {
        assert_eq!(tl(26).to_string(), "26");
        assert_eq!(format!("{:?}", tl(26)), "26");
        assert_eq!(
            format!("{:?}", crate::wal::SegmentId::new(tl(2), 5)),
            "SegmentId { timeline: 2, segno: 5 }"
        );
        assert_eq!(format!("{:08X}", tl(26)), "0000001A");
        assert_eq!(tl(26).file_name_part(), "0000001A");
        assert_eq!(Timeline::MAX.file_name_part(), "FFFFFFFF");
        assert_eq!(Timeline::MAX.to_string(), "4294967295");
        assert_eq!(Timeline::parse_file_name_part("0000001A"), Some(tl(26)));
        assert_eq!(Timeline::parse_file_name_part("0000001a"), Some(tl(26)));
        for bad in [
            "00000000",
            "0000001",
            "000000001",
            "0000001G",
            "+000001A",
            "",
        ] {
            assert_eq!(Timeline::parse_file_name_part(bad), None, "{bad}");
        }
    }

    #[test]
    fn parse_decimal() {
        assert_eq!("2".parse::<Timeline>(), Ok(tl(2)));
        assert_eq!(" 4294967295 ".parse::<Timeline>(), Ok(Timeline::MAX));
        for bad in ["", "0", "-1", "+1", "4294967296", "0x1A", "1.0", "one"] {
            assert!(bad.parse::<Timeline>().is_err(), "{bad}");
        }
    }

    #[test]
    fn json_is_a_bare_number() {
        // The form backup.json has always had.
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct Old {
            timeline: Timeline,
            end_timeline: Timeline,
        }
        let old = r#"{"timeline":1,"end_timeline":4294967295}"#;
        let v: Old = serde_json::from_str(old).unwrap();
        assert_eq!(
            v,
            Old {
                timeline: Timeline::FIRST,
                end_timeline: Timeline::MAX
            }
        );
        assert_eq!(serde_json::to_string(&v).unwrap(), old);
        assert!(serde_json::from_str::<Old>(r#"{"timeline":0,"end_timeline":1}"#).is_err());
        assert!(serde_json::from_str::<Old>(r#"{"timeline":"1","end_timeline":1}"#).is_err());
    }
}
