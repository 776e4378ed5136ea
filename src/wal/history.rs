//! Timeline history files (`0000000N.history`).
//!
//! A history file for timeline N lists, one line per ancestor, the parent timeline and the LSN at
//! which the server switched away from it: `<parent tli> TAB <switch LSN X/X> TAB <reason> LF`.
//! Blank lines and lines whose first non-blank character is `#` are ignored. PostgreSQL ignores
//! everything after the LSN; we keep it as the free-text reason.
//!
//! Semantics follow `src/backend/access/transam/timeline.c` (readTimeLineHistory,
//! writeTimeLineHistory, tliOfPointInHistory, tliSwitchPoint). See `proto-notes/wal-format.md`.

use std::fmt::Write as _;

use super::{Lsn, Timeline};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    pub parent_timeline: Timeline,
    pub switch_lsn: Lsn,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TimelineHistory {
    pub entries: Vec<HistoryEntry>,
}

/// Why a history file could not be parsed. `line` is 1-based.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HistoryError {
    #[error("timeline history line {line}: expected a numeric parent timeline ID (1..=4294967295), found {found:?}")]
    BadTimeline { line: usize, found: String },
    #[error(
        "timeline history line {line}: expected a switch LSN like 0/4000128 after the timeline ID, found {found:?}"
    )]
    BadLsn { line: usize, found: String },
    #[error("timeline history line {line}: expected timeline IDs in increasing order, found {found} after {previous}")]
    TimelineNotIncreasing {
        line: usize,
        previous: Timeline,
        found: Timeline,
    },
    #[error(
        "timeline history line {line}: expected switch LSNs in non-decreasing order, found {found} after {previous}"
    )]
    LsnDecreasing {
        line: usize,
        previous: Lsn,
        found: Lsn,
    },
    #[error(
        "timeline history of timeline {child}: expected every parent timeline to be lower than {child}, found {found}"
    )]
    ParentNotOlder { child: Timeline, found: Timeline },
}

fn is_blank(b: u8) -> bool {
    b.is_ascii_whitespace()
}

/// Splits off the first whitespace-delimited token, returning (token, rest after the token).
fn next_token(s: &[u8]) -> (&[u8], &[u8]) {
    let start = s.iter().position(|&b| !is_blank(b)).unwrap_or(s.len());
    let s = &s[start..];
    let end = s.iter().position(|&b| is_blank(b)).unwrap_or(s.len());
    (&s[..end], &s[end..])
}

fn trim_blanks(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|&b| !is_blank(b)).unwrap_or(s.len());
    let end = s
        .iter()
        .rposition(|&b| !is_blank(b))
        .map_or(start, |p| p + 1);
    &s[start..end]
}

impl TimelineHistory {
    /// Parses the content of a history file (as returned by `TIMELINE_HISTORY` or read from
    /// disk). Each data line is `<parent tli> <switch LSN> [reason]`, separated by tabs in files
    /// PostgreSQL writes (any blanks are accepted, as PostgreSQL's sscanf does). Parent timelines
    /// must be strictly increasing and switch points must not go backwards.
    ///
    /// The reason is decoded as UTF-8 with invalid sequences replaced, so a file whose reason is
    /// not UTF-8 does not round-trip through [`TimelineHistory::to_bytes`]; keep the raw bytes when
    /// byte-exact copies matter.
    pub fn parse(content: &[u8]) -> Result<TimelineHistory, HistoryError> {
        let mut entries: Vec<HistoryEntry> = Vec::new();
        for (idx, raw_line) in content.split(|&b| b == b'\n').enumerate() {
            let line_no = idx + 1;
            let line = trim_blanks(raw_line);
            if line.is_empty() || line[0] == b'#' {
                continue;
            }
            let (tli_tok, rest) = next_token(line);
            let tli = std::str::from_utf8(tli_tok)
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u32>().ok())
                .and_then(Timeline::new)
                .ok_or_else(|| HistoryError::BadTimeline {
                    line: line_no,
                    found: String::from_utf8_lossy(tli_tok).into_owned(),
                })?;
            let (lsn_tok, rest) = next_token(rest);
            let lsn = std::str::from_utf8(lsn_tok)
                .ok()
                .and_then(|s| s.parse::<Lsn>().ok())
                .ok_or_else(|| HistoryError::BadLsn {
                    line: line_no,
                    found: String::from_utf8_lossy(lsn_tok).into_owned(),
                })?;
            if let Some(prev) = entries.last() {
                if tli <= prev.parent_timeline {
                    return Err(HistoryError::TimelineNotIncreasing {
                        line: line_no,
                        previous: prev.parent_timeline,
                        found: tli,
                    });
                }
                if lsn < prev.switch_lsn {
                    return Err(HistoryError::LsnDecreasing {
                        line: line_no,
                        previous: prev.switch_lsn,
                        found: lsn,
                    });
                }
            }
            let reason = String::from_utf8_lossy(trim_blanks(rest)).into_owned();
            entries.push(HistoryEntry {
                parent_timeline: tli,
                switch_lsn: lsn,
                reason,
            });
        }
        Ok(TimelineHistory { entries })
    }

    /// Checks that this history can belong to timeline `child`: every parent must be older
    /// (PostgreSQL: "Timeline IDs must be less than child timeline's ID").
    pub fn check_child(&self, child: Timeline) -> Result<(), HistoryError> {
        match self.entries.last() {
            Some(e) if e.parent_timeline >= child => Err(HistoryError::ParentNotOlder {
                child,
                found: e.parent_timeline,
            }),
            _ => Ok(()),
        }
    }

    /// Renders the history the way PostgreSQL's writeTimeLineHistory builds it: one
    /// `<tli>\t<X/X>\t<reason>\n` line per entry. PostgreSQL writes a child's file by copying the
    /// parent's file and appending `"\n" + line`, so entries after the first are preceded by a
    /// blank line; we reproduce that so a parsed server file renders back to the same bytes.
    /// (PostgreSQL 15-17 print the low LSN half unpadded, as [`Lsn`]'s `Display` does.)
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = String::new();
        for (i, e) in self.entries.iter().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            // Writing to a String cannot fail.
            let _ = writeln!(out, "{}\t{}\t{}", e.parent_timeline, e.switch_lsn, e.reason);
        }
        out.into_bytes()
    }

    /// The timeline that WAL position `lsn` belongs to, given that this is the history of
    /// `current_timeline` (PostgreSQL's tliOfPointInHistory). Entry i covers
    /// `[switch_lsn of entry i-1, switch_lsn of entry i)`; a switch point itself already belongs
    /// to the next timeline; everything at or after the last switch point is `current_timeline`.
    pub fn timeline_of(&self, lsn: Lsn, current_timeline: Timeline) -> Timeline {
        self.entries
            .iter()
            .find(|e| lsn < e.switch_lsn)
            .map_or(current_timeline, |e| e.parent_timeline)
    }

    /// The LSN at which timeline `tli` ended (PostgreSQL's tliSwitchPoint). `None` when `tli` is
    /// not a parent in this history, which includes the current timeline.
    pub fn switch_point(&self, tli: Timeline) -> Option<Lsn> {
        self.entries
            .iter()
            .find(|e| e.parent_timeline == tli)
            .map(|e| e.switch_lsn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::timeline::tl;

    const FIXTURE_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/wal");

    fn lsn(s: &str) -> Lsn {
        s.parse().expect("test LSN")
    }

    #[test]
    fn parses_single_entry() {
        let h = TimelineHistory::parse(b"1\t0/4000128\tno recovery target specified\n").unwrap();
        assert_eq!(
            h.entries,
            vec![HistoryEntry {
                parent_timeline: tl(1),
                switch_lsn: lsn("0/4000128"),
                reason: "no recovery target specified".into()
            }]
        );
        assert_eq!(
            h.to_bytes(),
            b"1\t0/4000128\tno recovery target specified\n"
        );
        assert_eq!(h.timeline_of(lsn("0/4000127"), tl(2)), tl(1));
        assert_eq!(h.timeline_of(lsn("0/4000128"), tl(2)), tl(2));
        assert_eq!(h.timeline_of(Lsn(0), tl(2)), tl(1));
        assert_eq!(h.switch_point(tl(1)), Some(lsn("0/4000128")));
        assert_eq!(h.switch_point(tl(2)), None);
        assert!(h.check_child(tl(2)).is_ok());
        assert_eq!(
            h.check_child(tl(1)),
            Err(HistoryError::ParentNotOlder {
                child: tl(1),
                found: tl(1)
            })
        );
    }

    #[test]
    fn three_timelines_with_comments_blanks_and_missing_reason() {
        let text = b"# written by hand\n\n1\t0/4000128\tno recovery target specified\n\n   \n\
                     3 \t 1/A0000000  before 2024-01-01 00:00:00+00\r\n\
                     4\t1/B0000010\n# trailing comment";
        let h = TimelineHistory::parse(text).unwrap();
        assert_eq!(h.entries.len(), 3);
        assert_eq!(h.entries[1].parent_timeline, tl(3));
        assert_eq!(h.entries[1].switch_lsn, lsn("1/A0000000"));
        assert_eq!(h.entries[1].reason, "before 2024-01-01 00:00:00+00");
        assert_eq!(h.entries[2].reason, "");
        // History of timeline 5: TL1 until 0/4000128, TL3 until 1/A0000000, TL4 until 1/B0000010.
        assert_eq!(h.timeline_of(lsn("0/1000000"), tl(5)), tl(1));
        assert_eq!(h.timeline_of(lsn("0/4000128"), tl(5)), tl(3));
        assert_eq!(h.timeline_of(lsn("1/9FFFFFFF"), tl(5)), tl(3));
        assert_eq!(h.timeline_of(lsn("1/A0000000"), tl(5)), tl(4));
        assert_eq!(h.timeline_of(lsn("1/B000000F"), tl(5)), tl(4));
        assert_eq!(h.timeline_of(lsn("1/B0000010"), tl(5)), tl(5));
        assert_eq!(h.timeline_of(Lsn(u64::MAX), tl(5)), tl(5));
        assert_eq!(h.switch_point(tl(1)), Some(lsn("0/4000128")));
        assert_eq!(h.switch_point(tl(2)), None);
        assert_eq!(h.switch_point(tl(3)), Some(lsn("1/A0000000")));
        assert_eq!(h.switch_point(tl(4)), Some(lsn("1/B0000010")));
        assert_eq!(h.switch_point(tl(5)), None);
        // Round trip through PostgreSQL's layout.
        let again = TimelineHistory::parse(&h.to_bytes()).unwrap();
        assert_eq!(again, h);
        assert_eq!(
            h.to_bytes(),
            b"1\t0/4000128\tno recovery target specified\n\n\
              3\t1/A0000000\tbefore 2024-01-01 00:00:00+00\n\n4\t1/B0000010\t\n"
        );
    }

    #[test]
    fn real_server_files_round_trip() {
        // Written by PostgreSQL 15.18 on two promotions (see tests/fixtures/wal/README.md).
        let two = std::fs::read(format!("{FIXTURE_DIR}/00000002.history")).unwrap();
        let three = std::fs::read(format!("{FIXTURE_DIR}/00000003.history")).unwrap();
        let h2 = TimelineHistory::parse(&two).unwrap();
        let h3 = TimelineHistory::parse(&three).unwrap();
        assert_eq!(h2.entries.len(), 1);
        assert_eq!(h3.entries.len(), 2);
        assert_eq!(h3.entries[0], h2.entries[0]);
        assert_eq!(h3.switch_point(tl(1)), Some(lsn("0/B000D8")));
        assert_eq!(h3.switch_point(tl(2)), Some(lsn("0/C000A0")));
        assert_eq!(h3.timeline_of(lsn("0/B000D7"), tl(3)), tl(1));
        assert_eq!(h3.timeline_of(lsn("0/B000D8"), tl(3)), tl(2));
        assert_eq!(h3.timeline_of(lsn("0/C000A0"), tl(3)), tl(3));
        assert!(h3.check_child(tl(3)).is_ok());
        assert_eq!(h2.to_bytes(), two);
        assert_eq!(h3.to_bytes(), three);
    }

    #[test]
    fn empty_history() {
        let h = TimelineHistory::parse(b"").unwrap();
        assert!(h.entries.is_empty());
        assert_eq!(h.timeline_of(lsn("5/0"), tl(1)), tl(1));
        assert_eq!(h.switch_point(tl(1)), None);
        assert_eq!(h.to_bytes(), b"");
        assert_eq!(TimelineHistory::parse(b"\n# nothing\n  \n").unwrap(), h);
    }

    #[test]
    fn rejects_garbage_with_line_numbers() {
        let cases: &[(&[u8], HistoryError)] = &[
            (
                b"x\t0/1\tr\n",
                HistoryError::BadTimeline {
                    line: 1,
                    found: "x".into(),
                },
            ),
            (
                b"\n\n0\t0/1\n",
                HistoryError::BadTimeline {
                    line: 3,
                    found: "0".into(),
                },
            ),
            (
                b"-1\t0/1\n",
                HistoryError::BadTimeline {
                    line: 1,
                    found: "-1".into(),
                },
            ),
            (
                b"4294967296\t0/1\n",
                HistoryError::BadTimeline {
                    line: 1,
                    found: "4294967296".into(),
                },
            ),
            (
                b"1\n",
                HistoryError::BadLsn {
                    line: 1,
                    found: "".into(),
                },
            ),
            (
                b"1\t0-1\treason\n",
                HistoryError::BadLsn {
                    line: 1,
                    found: "0-1".into(),
                },
            ),
            (
                b"1\t123456789/0\n",
                HistoryError::BadLsn {
                    line: 1,
                    found: "123456789/0".into(),
                },
            ),
            (
                b"2\t0/10\n# c\n2\t0/20\n",
                HistoryError::TimelineNotIncreasing {
                    line: 3,
                    previous: tl(2),
                    found: tl(2),
                },
            ),
            (
                b"2\t0/10\n1\t0/20\n",
                HistoryError::TimelineNotIncreasing {
                    line: 2,
                    previous: tl(2),
                    found: tl(1),
                },
            ),
            (
                b"1\t0/20\n2\t0/10\n",
                HistoryError::LsnDecreasing {
                    line: 2,
                    previous: Lsn(0x20),
                    found: Lsn(0x10),
                },
            ),
        ];
        for (input, want) in cases {
            let got = TimelineHistory::parse(input).unwrap_err();
            assert_eq!(&got, want, "{:?}", String::from_utf8_lossy(input));
            assert!(got.to_string().contains("line"), "{got}");
        }
        // Non-UTF-8 in the numeric fields is a typed error, not a panic.
        assert!(matches!(
            TimelineHistory::parse(b"\xff\t0/1\n"),
            Err(HistoryError::BadTimeline { line: 1, .. })
        ));
        // Non-UTF-8 in the reason is accepted (lossy).
        let h = TimelineHistory::parse(b"1\t0/1\tr\xffx\n").unwrap();
        assert_eq!(h.entries[0].reason, "r\u{fffd}x");
    }
}
