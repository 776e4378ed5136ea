//! Recovery targets: where `walagent restore` asks PostgreSQL to stop replaying WAL, and the
//! `recovery_target_*` settings that say so in `postgresql.auto.conf`.
//!
//! Parsing is strict where PostgreSQL would silently guess:
//!
//! - A target time must carry a zone (`Z`, `UTC`, `GMT` or a numeric offset). PostgreSQL would
//!   read a bare `2026-11-22 10:15:00` in the restored server's `TimeZone`, which is whatever the
//!   copied `postgresql.conf` says; the same command could then mean different instants on
//!   different machines. We store the instant in UTC and hand PostgreSQL an explicit `+00` form.
//! - PostgreSQL timestamps have microsecond precision. More fractional digits are accepted only
//!   when the extra ones are zeros (`date +%N` output); anything else is an error rather than a
//!   silent rounding that could move the target across a commit.
//! - Named zones (`Europe/Berlin`, `CET`) are rejected: their offsets depend on a tz database.
//!
//! The settings and their accepted values follow PostgreSQL 15-17's `check_recovery_target_*`
//! GUC hooks and `src/backend/access/transam/xlogrecovery.c`.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Datelike, NaiveDate, Timelike, Utc};

use crate::wal::xact::{EventKind, WalEvent};
use crate::wal::{Lsn, Timeline};

/// Seconds from the Unix epoch to PostgreSQL's epoch, 2000-01-01 00:00:00 UTC
/// (`POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE` days).
pub const PG_EPOCH_UNIX_SECS: i64 = 946_684_800;

/// Longest restore point name PostgreSQL accepts (`MAXFNAMELEN - 1`).
pub const MAX_RESTORE_POINT_NAME: usize = 63;

/// A `TimestampTz` as WAL stores it (microseconds since 2000-01-01 00:00:00 UTC) as a UTC time.
/// `None` outside chrono's range (PostgreSQL's ±infinity and the like).
pub fn pg_micros_to_utc(us: i64) -> Option<DateTime<Utc>> {
    us.checked_add(PG_EPOCH_UNIX_SECS.checked_mul(1_000_000)?)
        .and_then(DateTime::from_timestamp_micros)
}

/// A UTC time as a PostgreSQL `TimestampTz` (microseconds since 2000-01-01 UTC); sub-microsecond
/// parts are truncated.
pub fn utc_to_pg_micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros() - PG_EPOCH_UNIX_SECS * 1_000_000
}

/// Why a target option could not be parsed. Each message names the option's expected form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("recovery target time {input:?} has no time zone: add one, e.g. \"{input}+00\" or \"{input}Z\" for UTC, or an offset like +01 (otherwise the restored server's TimeZone setting would decide which instant is meant)")]
    TimeWithoutZone { input: String },
    #[error("invalid recovery target time {input:?}: expected {expected}; e.g. 2026-11-22 10:15:00+01 or 2026-11-22T09:15:00.5Z")]
    TimeSyntax {
        input: String,
        expected: &'static str,
    },
    #[error("invalid recovery target time {input:?}: {what} is out of range")]
    TimeOutOfRange { input: String, what: &'static str },
    #[error("recovery target time {input:?} has more than 6 fractional digits: PostgreSQL keeps microseconds, so give at most 6 (extra digits are accepted only when they are zeros)")]
    TimeTooPrecise { input: String },
    #[error("recovery target time {input:?}: time zone {zone:?} is not supported; give Z, UTC or a numeric UTC offset like +01, +0530 or -05:00")]
    NamedZone { input: String, zone: String },
    #[error("invalid recovery target xid {input:?}: expected a transaction ID of 3 or more (decimal, or 0x hex), optionally epoch-qualified as a 64-bit number")]
    Xid { input: String },
    #[error("invalid recovery target name {input:?}: expected 1 to 63 bytes (a restore point name as given to pg_create_restore_point)")]
    Name { input: String },
    #[error("invalid --target {input:?}: the only value is \"immediate\" (stop as soon as the backup is consistent)")]
    Target { input: String },
    #[error("invalid recovery target timeline {input:?}: expected latest, current, or a timeline ID (decimal or 0x hex, at least 1)")]
    Timeline { input: String },
    #[error("invalid recovery target action {input:?}: expected promote, pause or shutdown")]
    Action { input: String },
}

/// An instant given as a recovery target, microsecond precision, kept in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TargetTime(DateTime<Utc>);

impl TargetTime {
    /// From a UTC time; anything below a microsecond is truncated (PostgreSQL's precision).
    pub fn from_utc(t: DateTime<Utc>) -> Option<TargetTime> {
        DateTime::from_timestamp_micros(t.timestamp_micros()).map(TargetTime)
    }

    /// From a WAL `TimestampTz` (microseconds since 2000-01-01 UTC).
    pub fn from_pg_micros(us: i64) -> Option<TargetTime> {
        pg_micros_to_utc(us).map(TargetTime)
    }

    pub fn utc(&self) -> DateTime<Utc> {
        self.0
    }

    /// As a WAL `TimestampTz`, to compare with commit record times.
    pub fn pg_micros(&self) -> i64 {
        utc_to_pg_micros(self.0)
    }

    /// The `recovery_target_time` value: ISO date order (independent of DateStyle), UTC, an
    /// explicit `+00`, and the fraction only when there is one, e.g.
    /// `2026-11-22 09:15:00.123456+00`.
    pub fn render(&self) -> String {
        let t = self.0;
        let us = t.timestamp_subsec_micros();
        let frac = if us == 0 {
            String::new()
        } else {
            format!(".{us:06}")
        };
        format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}{frac}+00",
            t.year(),
            t.month(),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        )
    }
}

impl fmt::Display for TargetTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render())
    }
}

impl FromStr for TargetTime {
    type Err = TargetError;

    /// Accepts RFC 3339 (`2026-11-22T10:15:00Z`, `2026-11-22T10:15:00.123456+01:00`) and
    /// PostgreSQL's text forms (`2026-11-22 10:15:00+01`, `... 10:15:00.5+05:30`,
    /// `... 10:15:00 UTC`, `... +0100`, `... GMT`): date `YYYY-MM-DD`, `T` or blanks, `HH:MM`
    /// with optional `:SS` and fraction, then a zone (blanks before it allowed).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_time(s).map(TargetTime)
    }
}

/// A tiny cursor over ASCII input for the time parser.
struct Cur<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Cur<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    /// Consumes a run of ASCII digits, returning them.
    fn digits(&mut self) -> &'a [u8] {
        let start = self.i;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.i += 1;
        }
        &self.b[start..self.i]
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.peek() == Some(c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn skip_blanks(&mut self) {
        while self.peek().is_some_and(|c| c == b' ' || c == b'\t') {
            self.i += 1;
        }
    }
}

fn num(d: &[u8]) -> u32 {
    d.iter().fold(0u32, |n, &c| n * 10 + u32::from(c - b'0'))
}

fn parse_time(input: &str) -> Result<DateTime<Utc>, TargetError> {
    let s = input.trim();
    let syntax = |expected| TargetError::TimeSyntax {
        input: input.to_string(),
        expected,
    };
    let range = |what| TargetError::TimeOutOfRange {
        input: input.to_string(),
        what,
    };
    let mut c = Cur {
        b: s.as_bytes(),
        i: 0,
    };
    let year = c.digits();
    if year.len() != 4 || !c.eat(b'-') {
        return Err(syntax("a date YYYY-MM-DD"));
    }
    let year = num(year);
    let month = c.digits();
    if !(1..=2).contains(&month.len()) || !c.eat(b'-') {
        return Err(syntax("a date YYYY-MM-DD"));
    }
    let month = num(month);
    let day = c.digits();
    if !(1..=2).contains(&day.len()) {
        return Err(syntax("a date YYYY-MM-DD"));
    }
    let day = num(day);
    if !(1..=12).contains(&month) {
        return Err(range("the month"));
    }
    let date = NaiveDate::from_ymd_opt(year as i32, month, day)
        .filter(|_| year >= 1)
        .ok_or_else(|| range("the day of the month"))?;
    // Separator: T (RFC 3339) or blanks (PostgreSQL).
    if !(c.eat(b'T') || c.eat(b't')) {
        let before = c.i;
        c.skip_blanks();
        if c.i == before {
            return Err(syntax("a time after the date (HH:MM:SS)"));
        }
    }
    let hour = c.digits();
    if !(1..=2).contains(&hour.len()) || !c.eat(b':') {
        return Err(syntax("a time HH:MM[:SS[.ffffff]]"));
    }
    let hour = num(hour);
    let minute = c.digits();
    if minute.len() != 2 {
        return Err(syntax("a time HH:MM[:SS[.ffffff]]"));
    }
    let minute = num(minute);
    let mut second = 0;
    let mut micros = 0;
    if c.eat(b':') {
        let sec = c.digits();
        if sec.len() != 2 {
            return Err(syntax("seconds as two digits"));
        }
        second = num(sec);
        if c.eat(b'.') || c.eat(b',') {
            let frac = c.digits();
            if frac.is_empty() {
                return Err(syntax("digits after the decimal point"));
            }
            if frac.len() > 6 && frac[6..].iter().any(|&d| d != b'0') {
                return Err(TargetError::TimeTooPrecise {
                    input: input.to_string(),
                });
            }
            let six = &frac[..frac.len().min(6)];
            micros = num(six) * 10u32.pow(6 - six.len() as u32);
        }
    }
    if hour > 23 {
        return Err(range("the hour"));
    }
    if minute > 59 {
        return Err(range("the minute"));
    }
    if second > 59 {
        return Err(range("the second"));
    }
    let naive = date
        .and_hms_micro_opt(hour, minute, second, micros)
        .ok_or_else(|| range("the time"))?;
    c.skip_blanks();
    let offset_secs = parse_zone(&mut c, input)?;
    c.skip_blanks();
    if c.peek().is_some() {
        return Err(syntax("nothing after the time zone"));
    }
    let utc = naive.and_utc() - chrono::Duration::seconds(i64::from(offset_secs));
    // Keep to years PostgreSQL and our renderer print as four digits.
    if !(1..=9999).contains(&utc.year()) {
        return Err(range("the year (in UTC)"));
    }
    Ok(utc)
}

/// Parses the zone at the cursor into an offset east of UTC, in seconds.
fn parse_zone(c: &mut Cur<'_>, input: &str) -> Result<i32, TargetError> {
    let syntax = |expected| TargetError::TimeSyntax {
        input: input.to_string(),
        expected,
    };
    match c.peek() {
        None => Err(TargetError::TimeWithoutZone {
            input: input.trim().to_string(),
        }),
        Some(b'+') | Some(b'-') => {
            let sign = if c.eat(b'-') { -1 } else { 1 };
            c.eat(b'+');
            let d = c.digits();
            let (h, m) = match d.len() {
                1 | 2 => {
                    let h = num(d);
                    let m = if c.eat(b':') {
                        let m = c.digits();
                        if m.len() != 2 {
                            return Err(syntax("a UTC offset like +01, +0130 or +01:30"));
                        }
                        num(m)
                    } else {
                        0
                    };
                    (h, m)
                }
                4 => (num(&d[..2]), num(&d[2..])),
                _ => return Err(syntax("a UTC offset like +01, +0130 or +01:30")),
            };
            // PostgreSQL accepts offsets up to 15:59:59.
            if h > 15 || m > 59 {
                return Err(TargetError::TimeOutOfRange {
                    input: input.to_string(),
                    what: "the UTC offset",
                });
            }
            Ok(sign * (h as i32 * 3600 + m as i32 * 60))
        }
        Some(ch) if ch.is_ascii_alphabetic() => {
            let start = c.i;
            while c
                .peek()
                .is_some_and(|ch| ch.is_ascii_alphanumeric() || b"/_+-".contains(&ch))
            {
                c.i += 1;
            }
            let zone = std::str::from_utf8(&c.b[start..c.i]).unwrap_or("");
            if zone.eq_ignore_ascii_case("z")
                || zone.eq_ignore_ascii_case("utc")
                || zone.eq_ignore_ascii_case("gmt")
            {
                Ok(0)
            } else {
                Err(TargetError::NamedZone {
                    input: input.to_string(),
                    zone: zone.to_string(),
                })
            }
        }
        Some(_) => Err(syntax("a time zone (Z, UTC or +HH[:MM]) after the time")),
    }
}

/// Where recovery stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecoveryTarget {
    /// No target: replay everything the archive holds on the target timeline.
    End,
    /// `recovery_target = 'immediate'`: stop as soon as the backup is consistent.
    Immediate,
    /// `recovery_target_time`: commit/abort records are compared with it.
    Time(TargetTime),
    /// `recovery_target_lsn`.
    Lsn(Lsn),
    /// `recovery_target_xid`. PostgreSQL accepts a 32-bit xid or an epoch-qualified 64-bit one
    /// (and compares only the low 32 bits); stored as given, rendered in decimal.
    Xid(u64),
    /// `recovery_target_name`: a restore point made by `pg_create_restore_point`.
    Name(String),
}

impl RecoveryTarget {
    /// Parses `--target-xid`: decimal or `0x` hex, up to 64 bits; the 32-bit xid part must be a
    /// normal transaction ID (3 or more: 0-2 are PostgreSQL's invalid/bootstrap/frozen xids).
    pub fn parse_xid(s: &str) -> Result<RecoveryTarget, TargetError> {
        let t = s.trim();
        let v = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
            Some(hex) if !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
                u64::from_str_radix(hex, 16).ok()
            }
            Some(_) => None,
            None if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) => t.parse().ok(),
            None => None,
        };
        match v {
            Some(x) if (x & 0xFFFF_FFFF) >= 3 => Ok(RecoveryTarget::Xid(x)),
            _ => Err(TargetError::Xid {
                input: s.to_string(),
            }),
        }
    }

    /// Parses `--target-name`: 1 to 63 bytes, as PostgreSQL's check_recovery_target_name.
    pub fn parse_name(s: &str) -> Result<RecoveryTarget, TargetError> {
        if s.is_empty() || s.len() > MAX_RESTORE_POINT_NAME || s.contains('\0') {
            return Err(TargetError::Name {
                input: s.to_string(),
            });
        }
        Ok(RecoveryTarget::Name(s.to_string()))
    }

    /// Parses `--target`: only `immediate` exists (as in PostgreSQL's `recovery_target`).
    pub fn parse_target(s: &str) -> Result<RecoveryTarget, TargetError> {
        if s.trim().eq_ignore_ascii_case("immediate") {
            Ok(RecoveryTarget::Immediate)
        } else {
            Err(TargetError::Target {
                input: s.to_string(),
            })
        }
    }

    /// A target is set (PostgreSQL then applies `recovery_target_action`).
    pub fn is_set(&self) -> bool {
        !matches!(self, RecoveryTarget::End)
    }

    /// Whether `recovery_target_inclusive` changes anything for this target (time, LSN, xid).
    pub fn takes_inclusive(&self) -> bool {
        matches!(
            self,
            RecoveryTarget::Time(_) | RecoveryTarget::Lsn(_) | RecoveryTarget::Xid(_)
        )
    }

    /// The 32-bit xid PostgreSQL compares records with (`recovery_target_xid` is truncated).
    pub fn xid32(&self) -> Option<u32> {
        match self {
            RecoveryTarget::Xid(x) => Some(*x as u32),
            _ => None,
        }
    }
}

impl fmt::Display for RecoveryTarget {
    /// For messages: `time 2026-11-22 09:15:00+00`, `LSN 0/9000000`, `xid 1234`,
    /// `restore point "before-upgrade"`, `immediate (consistency)`, `end of the archive`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecoveryTarget::End => f.write_str("end of the archive"),
            RecoveryTarget::Immediate => f.write_str("immediate (consistency)"),
            RecoveryTarget::Time(t) => write!(f, "time {t}"),
            RecoveryTarget::Lsn(l) => write!(f, "LSN {l}"),
            RecoveryTarget::Xid(x) => write!(f, "xid {x}"),
            RecoveryTarget::Name(n) => write!(f, "restore point {n:?}"),
        }
    }
}

/// `recovery_target_timeline`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TargetTimeline {
    /// The newest timeline: PostgreSQL probes `N+1.history`, `N+2.history`, ... from the backup's
    /// timeline and stops at the first one missing (`findNewestTimeLine`). The default since
    /// PostgreSQL 12.
    #[default]
    Latest,
    /// The backup's own timeline.
    Current,
    Id(Timeline),
}

impl FromStr for TargetTimeline {
    type Err = TargetError;

    /// `latest`, `current` (any case), or a timeline ID in decimal or `0x` hex (PostgreSQL reads
    /// it with `strtoul(.., 0)`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let err = || TargetError::Timeline {
            input: s.to_string(),
        };
        if t.eq_ignore_ascii_case("latest") {
            return Ok(TargetTimeline::Latest);
        }
        if t.eq_ignore_ascii_case("current") {
            return Ok(TargetTimeline::Current);
        }
        let v = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
            Some(hex) if !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
                u32::from_str_radix(hex, 16).ok()
            }
            Some(_) => None,
            None if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) => t.parse().ok(),
            None => None,
        };
        v.and_then(Timeline::new)
            .map(TargetTimeline::Id)
            .ok_or_else(err)
    }
}

impl fmt::Display for TargetTimeline {
    /// As PostgreSQL spells the setting: `latest`, `current`, or the decimal ID.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetTimeline::Latest => f.write_str("latest"),
            TargetTimeline::Current => f.write_str("current"),
            TargetTimeline::Id(n) => write!(f, "{n}"),
        }
    }
}

/// `recovery_target_action`: what the server does once the target is reached. PostgreSQL's
/// default is `pause`; note that `pause` acts like `shutdown` when `hot_standby` is off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetAction {
    Promote,
    Pause,
    Shutdown,
}

impl FromStr for TargetAction {
    type Err = TargetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "promote" => Ok(TargetAction::Promote),
            "pause" => Ok(TargetAction::Pause),
            "shutdown" => Ok(TargetAction::Shutdown),
            _ => Err(TargetError::Action {
                input: s.to_string(),
            }),
        }
    }
}

impl fmt::Display for TargetAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TargetAction::Promote => "promote",
            TargetAction::Pause => "pause",
            TargetAction::Shutdown => "shutdown",
        })
    }
}

/// The recovery settings for `postgresql.auto.conf`, unquoted (see
/// [`render_auto_conf_lines`](crate::datadir::recovery::render_auto_conf_lines)), in this order:
///
/// - `restore_command`;
/// - at most one `recovery_target*` setting (PostgreSQL refuses more than one);
/// - `recovery_target_inclusive` (`on`/`off`) **always** for time, LSN and xid targets, even when
///   it is PostgreSQL's default `on`, so the file states the intent; never for the others, where
///   PostgreSQL ignores it;
/// - `recovery_target_action` only when a target is set (PostgreSQL ignores it otherwise);
/// - `recovery_target_timeline` always, so the file does not depend on the server's default.
pub fn recovery_settings(
    target: &RecoveryTarget,
    inclusive: bool,
    tl: TargetTimeline,
    action: TargetAction,
    restore_command: &str,
) -> Vec<(&'static str, String)> {
    let mut out = vec![("restore_command", restore_command.to_string())];
    match target {
        RecoveryTarget::End => {}
        RecoveryTarget::Immediate => out.push(("recovery_target", "immediate".into())),
        RecoveryTarget::Time(t) => out.push(("recovery_target_time", t.render())),
        RecoveryTarget::Lsn(l) => out.push(("recovery_target_lsn", l.to_string())),
        RecoveryTarget::Xid(x) => out.push(("recovery_target_xid", x.to_string())),
        RecoveryTarget::Name(n) => out.push(("recovery_target_name", n.clone())),
    }
    if target.takes_inclusive() {
        out.push((
            "recovery_target_inclusive",
            if inclusive { "on" } else { "off" }.into(),
        ));
    }
    if target.is_set() {
        out.push(("recovery_target_action", action.to_string()));
    }
    out.push(("recovery_target_timeline", tl.to_string()));
    out
}

/// Where PostgreSQL's recovery would stop among `events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopAt<'e> {
    pub event: &'e WalEvent,
    /// True when the record itself is replayed (recoveryStopsAfter), false when recovery stops
    /// just before it (recoveryStopsBefore).
    pub applied: bool,
}

/// The first of `events` (in WAL order) at which recovery stops for `target`, mirroring
/// xlogrecovery.c `recoveryStopsBefore` / `recoveryStopsAfter`:
///
/// - time: the first commit or abort (prepared ones included) whose time is after the target
///   (`inclusive`) or at/after it (not inclusive); recovery stops before that record;
/// - xid: the commit or abort of that xid (low 32 bits compared); applied when `inclusive`;
/// - name: the first restore point with exactly that name; applied;
/// - LSN: the first listed record starting at or after the target (the scanner lists only xact
///   and restore point records, so this is an approximation: use the LSN itself for planning);
/// - immediate and end: `None` (they do not depend on record contents).
///
/// Only records after the backup's consistency point matter: PostgreSQL refuses to stop before
/// it, so pass events from there on.
pub fn stop_event<'e>(
    target: &RecoveryTarget,
    inclusive: bool,
    events: &'e [WalEvent],
) -> Option<StopAt<'e>> {
    events.iter().find_map(|e| {
        let stop = match (target, &e.kind) {
            (
                RecoveryTarget::Time(t),
                EventKind::Commit { time_us, .. } | EventKind::Abort { time_us, .. },
            ) => {
                let tt = t.pg_micros();
                let hit = if inclusive {
                    *time_us > tt
                } else {
                    *time_us >= tt
                };
                hit.then_some(false)
            }
            (
                RecoveryTarget::Xid(_),
                EventKind::Commit { xid, .. } | EventKind::Abort { xid, .. },
            ) => (Some(*xid) == target.xid32()).then_some(inclusive),
            (RecoveryTarget::Name(n), EventKind::RestorePoint { name, .. }) => {
                (name == n).then_some(true)
            }
            (RecoveryTarget::Lsn(l), _) => (e.lsn >= *l).then_some(inclusive),
            _ => None,
        };
        stop.map(|applied| StopAt { event: e, applied })
    })
}

/// `commit of xid 745 at 2026-11-22 09:15:00.000000+00 (LSN 0/B06A48)`, for messages.
pub fn describe_event(e: &WalEvent) -> String {
    let when = pg_micros_to_utc(e.kind.time_us())
        .map(|t| t.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string())
        .unwrap_or_else(|| format!("TimestampTz {}", e.kind.time_us()));
    match &e.kind {
        EventKind::Commit { xid, .. } => format!("commit of xid {xid} at {when} (LSN {})", e.lsn),
        EventKind::Abort { xid, .. } => format!("abort of xid {xid} at {when} (LSN {})", e.lsn),
        EventKind::RestorePoint { name, .. } => {
            format!("restore point {name:?} at {when} (LSN {})", e.lsn)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::timeline::tl;

    fn t(s: &str) -> TargetTime {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn time_forms_people_type() {
        let want = "2026-11-22 09:15:00+00";
        for s in [
            "2026-11-22T09:15:00Z",
            "2026-11-22t09:15:00z",
            "2026-11-22T10:15:00+01:00",
            "2026-11-22 10:15:00+01",
            "2026-11-22 10:15:00 +01",
            "2026-11-22 10:15:00+0100",
            "2026-11-22 09:15:00 UTC",
            "2026-11-22 09:15:00 utc",
            "2026-11-22 09:15:00 GMT",
            "2026-11-22 09:15:00Z",
            "2026-11-22 09:15:00 Z",
            "  2026-11-22   09:15:00+00  ",
            "2026-11-22 09:15+00",
            "2026-11-22 04:15:00-05",
            "2026-11-22 14:45:00+05:30",
            "2026-11-22 14:45:00+0530",
            "2026-11-22 09:15:00.000000000Z",
        ] {
            assert_eq!(t(s).render(), want, "{s}");
        }
        assert_eq!(
            t("2026-11-22T10:15:00.123456+01:00").render(),
            "2026-11-22 09:15:00.123456+00"
        );
        assert_eq!(
            t("2026-11-22 10:15:00.5+05:30").render(),
            "2026-11-22 04:45:00.500000+00"
        );
        assert_eq!(
            t("2026-11-22 10:15:00.123456000000Z").render(),
            "2026-11-22 10:15:00.123456+00"
        );
        // Crossing midnight and a year boundary through the offset.
        assert_eq!(
            t("2027-01-01 00:30:00+01").render(),
            "2026-12-31 23:30:00+00"
        );
        assert_eq!(t("2026-11-22 09:15:00+00").to_string(), want);
    }

    #[test]
    fn time_errors_explain() {
        let e = "2026-11-22 10:15:00".parse::<TargetTime>().unwrap_err();
        assert!(matches!(e, TargetError::TimeWithoutZone { .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains("+00") && msg.contains("Z"), "{msg}");
        assert!(!msg.contains('\n'));
        assert!(matches!(
            "2026-11-22T10:15:00.1234567Z".parse::<TargetTime>(),
            Err(TargetError::TimeTooPrecise { .. })
        ));
        assert!(matches!(
            "2026-11-22 10:15:00 Europe/Berlin".parse::<TargetTime>(),
            Err(TargetError::NamedZone { zone, .. }) if zone == "Europe/Berlin"
        ));
        assert!(matches!(
            "2026-11-22 10:15:00 CET".parse::<TargetTime>(),
            Err(TargetError::NamedZone { .. })
        ));
        for bad in [
            "",
            "yesterday",
            "2026-11-22",
            "2026-11-22Z",
            "26-11-22 10:15:00Z",
            "2026/11/22 10:15:00Z",
            "2026-11-22 10:15:0Z",
            "2026-11-22 10:15:00.Z",
            "2026-11-22 10:15:00+1:0",
            "2026-11-22 10:15:00+123",
            "2026-11-22 10:15:00+01 extra",
            "2026-11-22 10:15:00+01:00Z",
        ] {
            assert!(bad.parse::<TargetTime>().is_err(), "{bad}");
        }
        for bad in [
            "2026-13-01 00:00:00Z",
            "2026-02-30 00:00:00Z",
            "2026-11-22 24:00:00Z",
            "2026-11-22 10:60:00Z",
            "2026-11-22 10:15:60Z",
            "2026-11-22 10:15:00+16",
            "0000-01-01 00:00:00Z",
        ] {
            assert!(
                matches!(
                    bad.parse::<TargetTime>(),
                    Err(TargetError::TimeOutOfRange { .. })
                ),
                "{bad}: {:?}",
                bad.parse::<TargetTime>()
            );
        }
    }

    #[test]
    fn pg_epoch_round_trip() {
        let epoch = t("2000-01-01 00:00:00Z");
        assert_eq!(epoch.pg_micros(), 0);
        assert_eq!(TargetTime::from_pg_micros(0), Some(epoch));
        let x = t("2026-11-22 09:15:00.123456+00");
        assert_eq!(TargetTime::from_pg_micros(x.pg_micros()), Some(x));
        assert_eq!(
            utc_to_pg_micros(t("1999-12-31 23:59:59Z").utc()),
            -1_000_000
        );
        // 2026-11-22 09:15:00 UTC = Unix 1795338900.
        assert_eq!(
            t("2026-11-22 09:15:00Z").pg_micros(),
            (1_795_338_900 - PG_EPOCH_UNIX_SECS) * 1_000_000
        );
        assert_eq!(pg_micros_to_utc(i64::MAX), None);
        let nanos = DateTime::from_timestamp(1_795_338_900, 123_456_789).unwrap();
        assert_eq!(
            TargetTime::from_utc(nanos).unwrap().render(),
            "2026-11-22 09:15:00.123456+00"
        );
    }

    #[test]
    fn xid_name_target_timeline_action() {
        assert_eq!(
            RecoveryTarget::parse_xid("1234"),
            Ok(RecoveryTarget::Xid(1234))
        );
        assert_eq!(
            RecoveryTarget::parse_xid("0x10"),
            Ok(RecoveryTarget::Xid(16))
        );
        // Epoch-qualified: epoch 2, xid 1000.
        let x = RecoveryTarget::parse_xid("8589935592").unwrap();
        assert_eq!(x, RecoveryTarget::Xid(8_589_935_592));
        assert_eq!(x.xid32(), Some(1000));
        for bad in [
            "",
            "0",
            "2",
            "-5",
            "12a",
            "0x",
            "4294967296",
            "99999999999999999999",
        ] {
            assert!(RecoveryTarget::parse_xid(bad).is_err(), "{bad}");
        }
        assert_eq!(
            RecoveryTarget::parse_name("before upgrade"),
            Ok(RecoveryTarget::Name("before upgrade".into()))
        );
        assert!(RecoveryTarget::parse_name("").is_err());
        assert!(RecoveryTarget::parse_name(&"x".repeat(64)).is_err());
        assert!(RecoveryTarget::parse_name(&"x".repeat(63)).is_ok());
        assert_eq!(
            RecoveryTarget::parse_target("immediate"),
            Ok(RecoveryTarget::Immediate)
        );
        assert!(RecoveryTarget::parse_target("latest").is_err());

        for (s, want) in [
            ("latest", TargetTimeline::Latest),
            ("LATEST", TargetTimeline::Latest),
            ("current", TargetTimeline::Current),
            ("2", TargetTimeline::Id(tl(2))),
            ("0x1A", TargetTimeline::Id(tl(26))),
        ] {
            assert_eq!(s.parse::<TargetTimeline>(), Ok(want), "{s}");
        }
        for bad in ["0", "", "-1", "x", "4294967296", "0xZ"] {
            assert!(bad.parse::<TargetTimeline>().is_err(), "{bad}");
        }
        assert_eq!(TargetTimeline::Id(tl(26)).to_string(), "26");
        assert_eq!(TargetTimeline::default().to_string(), "latest");
        for a in [
            TargetAction::Promote,
            TargetAction::Pause,
            TargetAction::Shutdown,
        ] {
            assert_eq!(a.to_string().parse::<TargetAction>(), Ok(a));
        }
        assert!("resume".parse::<TargetAction>().is_err());
    }

    #[test]
    fn settings_per_target() {
        let rc = "walagent wal-fetch --archive /a %f %p";
        let s = recovery_settings(
            &RecoveryTarget::End,
            true,
            TargetTimeline::Latest,
            TargetAction::Promote,
            rc,
        );
        assert_eq!(
            s,
            vec![
                ("restore_command", rc.to_string()),
                ("recovery_target_timeline", "latest".into())
            ]
        );
        let s = recovery_settings(
            &RecoveryTarget::Time(t("2026-11-22 10:15:00+01")),
            false,
            TargetTimeline::Id(tl(2)),
            TargetAction::Pause,
            rc,
        );
        assert_eq!(
            s,
            vec![
                ("restore_command", rc.to_string()),
                ("recovery_target_time", "2026-11-22 09:15:00+00".into()),
                ("recovery_target_inclusive", "off".into()),
                ("recovery_target_action", "pause".into()),
                ("recovery_target_timeline", "2".into()),
            ]
        );
        let s = recovery_settings(
            &RecoveryTarget::Immediate,
            true,
            TargetTimeline::Current,
            TargetAction::Shutdown,
            rc,
        );
        assert_eq!(s[1], ("recovery_target", "immediate".to_string()));
        assert_eq!(s[2], ("recovery_target_action", "shutdown".to_string()));
        assert_eq!(s[3], ("recovery_target_timeline", "current".to_string()));
        assert_eq!(s.len(), 4);
        let s = recovery_settings(
            &RecoveryTarget::Lsn(Lsn(0x900_0000)),
            true,
            TargetTimeline::Latest,
            TargetAction::Promote,
            rc,
        );
        assert_eq!(s[1], ("recovery_target_lsn", "0/9000000".to_string()));
        assert_eq!(s[2], ("recovery_target_inclusive", "on".to_string()));
        let s = recovery_settings(
            &RecoveryTarget::Xid(8_589_935_592),
            true,
            TargetTimeline::Latest,
            TargetAction::Promote,
            rc,
        );
        assert_eq!(s[1], ("recovery_target_xid", "8589935592".to_string()));
        let s = recovery_settings(
            &RecoveryTarget::Name("rp".into()),
            false,
            TargetTimeline::Latest,
            TargetAction::Promote,
            rc,
        );
        assert_eq!(s[1], ("recovery_target_name", "rp".to_string()));
        assert_eq!(s[2].0, "recovery_target_action");
        assert_eq!(s.len(), 4);
    }

    fn ev(lsn: u64, kind: EventKind) -> WalEvent {
        WalEvent {
            lsn: Lsn(lsn),
            end_lsn: Lsn(lsn + 40),
            kind,
        }
    }

    #[test]
    fn stop_events_follow_postgres() {
        let base = t("2026-11-22 09:00:00Z").pg_micros();
        let commit = |lsn, xid, dt| {
            ev(
                lsn,
                EventKind::Commit {
                    xid,
                    time_us: base + dt,
                    prepared: false,
                },
            )
        };
        let events = vec![
            commit(0x100, 10, 0),
            ev(
                0x200,
                EventKind::RestorePoint {
                    name: "rp".into(),
                    time_us: base + 5,
                },
            ),
            commit(0x300, 11, 10),
            ev(
                0x400,
                EventKind::Abort {
                    xid: 12,
                    time_us: base + 10,
                    prepared: false,
                },
            ),
            commit(0x500, 13, 20),
        ];
        let at = |s: &str| RecoveryTarget::Time(t(s));
        // Target exactly at the time of 0x300 and 0x400: inclusive passes both.
        let target = at("2026-11-22 09:00:00.000010Z");
        let s = stop_event(&target, true, &events).unwrap();
        assert_eq!((s.event.lsn, s.applied), (Lsn(0x500), false));
        let s = stop_event(&target, false, &events).unwrap();
        assert_eq!((s.event.lsn, s.applied), (Lsn(0x300), false));
        // Past everything: no stop in these events.
        assert!(stop_event(&at("2026-11-22 10:00:00Z"), true, &events).is_none());
        let s = stop_event(&RecoveryTarget::Xid(12), true, &events).unwrap();
        assert_eq!((s.event.lsn, s.applied), (Lsn(0x400), true));
        let s = stop_event(&RecoveryTarget::Xid((1 << 32) | 11), false, &events).unwrap();
        assert_eq!((s.event.lsn, s.applied), (Lsn(0x300), false));
        let s = stop_event(&RecoveryTarget::Name("rp".into()), false, &events).unwrap();
        assert_eq!((s.event.lsn, s.applied), (Lsn(0x200), true));
        assert!(stop_event(&RecoveryTarget::Name("RP".into()), true, &events).is_none());
        let s = stop_event(&RecoveryTarget::Lsn(Lsn(0x250)), true, &events).unwrap();
        assert_eq!(s.event.lsn, Lsn(0x300));
        assert!(stop_event(&RecoveryTarget::End, true, &events).is_none());
        assert!(stop_event(&RecoveryTarget::Immediate, true, &events).is_none());
    }
}
