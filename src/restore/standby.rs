//! `walagent restore --standby`: a standby seeded from the archive instead of from the primary
//! (pgBackRest's `--type=standby`). The backup is chosen, unpacked and checked exactly as for a
//! restore to the end of the archive ([`super::pitr`]); what differs is written here:
//!
//! - `standby.signal` instead of `recovery.signal`, `recovery_target_timeline = 'latest'`, no
//!   recovery target;
//! - with `--source`, `primary_conninfo` (the password only when `--source` itself holds one)
//!   and, with `--slot`, `primary_slot_name`; without `--source` both are written empty, so a
//!   `primary_conninfo` copied with the backup (a backup of a standby) cannot make the new
//!   standby connect somewhere else.
//!
//! `--source` is checked before anything is written ([`check_source`] before planning,
//! [`check_against_archive`] after it): IDENTIFY_SYSTEM must name the archive's system
//! identifier (a standby of another cluster never starts), the primary's timeline history must
//! contain the timeline the archive's WAL leads to, left no earlier than that WAL ends, the
//! primary must still have the WAL from where the archive ends (a short START_REPLICATION
//! there), and the slot must exist (or, with `--create-slot`, must not). The slot is created
//! after planning, just before unpacking ([`prepare_slot`]), and moved back to where the
//! standby will start streaming, so it keeps exactly the WAL the standby needs; a restore that
//! fails afterwards drops it again. See `proto-notes/restore.md` ("--standby").

use std::time::Duration;

use crate::protocol::codec::pg_now;
use crate::protocol::conninfo::ConnInfo;
use crate::protocol::replication::SystemInfo;
use crate::protocol::{Connection, ProtocolError, StartOutcome, StatusUpdate, StreamEvent};
use crate::wal::{Lsn, SegmentSize, Timeline, TimelineHistory};

/// What `--standby` asks for.
#[derive(Debug, Clone, Default)]
pub struct StandbyOptions {
    /// The primary to stream from once the archive is replayed; `None`: a standby that only
    /// follows the archive.
    pub source: Option<StandbySource>,
}

/// `--source` and the slot options.
#[derive(Debug, Clone)]
pub struct StandbySource {
    pub conninfo: ConnInfo,
    /// The password was written in `--source` itself (not taken from PGPASSWORD): only then
    /// does it go into `primary_conninfo`.
    pub password_in_source: bool,
    /// `primary_slot_name`.
    pub slot: Option<String>,
    /// Create the slot (physical, RESERVE_WAL) on the primary; it must not exist yet.
    pub create_slot: bool,
}

impl StandbySource {
    /// `primary_conninfo`: libpq keyword=value (values quoted as libpq reads them), without
    /// application_name (the standby then shows up under its cluster_name, else
    /// `walreceiver`, as after `pg_basebackup -R`), the password only when given in `--source`.
    pub fn primary_conninfo(&self) -> String {
        self.conninfo
            .to_conninfo_string_with(self.password_in_source, None)
    }
}

/// What the check of `--source` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceCheck {
    /// `display_safe` of the source (for output; never holds the password).
    pub source: String,
    pub system: SystemInfo,
    /// The history of the source's timeline (TIMELINE_HISTORY; `None` on timeline 1).
    pub history: Option<TimelineHistory>,
    pub slot: Option<SlotPlan>,
}

/// The slot the standby will use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotPlan {
    pub name: String,
    /// To be created by the restore (`--create-slot`); the slot did not exist when checked.
    pub create: bool,
    /// Its `restart_lsn`: for an existing slot when checked, for a created one once created.
    pub restart_lsn: Option<Lsn>,
}

#[derive(Debug, thiserror::Error)]
pub enum StandbyError {
    #[error("--source {server}: {error}")]
    Connect {
        server: String,
        #[source]
        error: Box<ProtocolError>,
    },
    #[error("--source {server} is system {primary}, but the archive holds system {archive}: a standby of another cluster cannot start")]
    ForeignPrimary {
        server: String,
        primary: u64,
        archive: u64,
    },
    #[error("the archive's WAL leads to timeline {archive}, but --source {server} is on timeline {primary}: the standby would follow timeline {archive} and could never stream from it")]
    TimelineAhead {
        server: String,
        archive: Timeline,
        primary: Timeline,
    },
    #[error("the archive's WAL follows timeline {archive}, which is not in the history of timeline {primary} that --source {server} is on; the standby could never stream from it")]
    TimelineNotInHistory {
        server: String,
        archive: Timeline,
        primary: Timeline,
    },
    #[error("the archive's WAL of timeline {archive} goes on to {archive_end}, past {switch} where --source {server} left that timeline for timeline {primary}: the standby would replay WAL the primary does not have")]
    Diverged {
        server: String,
        archive: Timeline,
        archive_end: Lsn,
        switch: Lsn,
        primary: Timeline,
    },
    #[error("--source {server}: its timeline history file: {error}")]
    BadHistory {
        server: String,
        #[source]
        error: crate::wal::history::HistoryError,
    },
    /// START_REPLICATION where the standby will have to start streaming was refused (58P01:
    /// the WAL is gone from the primary).
    #[error("--source {server} cannot send WAL from {from} on timeline {timeline}, where the archive ends and the standby would start streaming: {error}")]
    PrimaryLacksWal {
        server: String,
        from: Lsn,
        timeline: Timeline,
        #[source]
        error: Box<ProtocolError>,
    },
    #[error("replication slot {slot:?} already exists on {server}")]
    SlotExists { slot: String, server: String },
    #[error("replication slot {slot:?} does not exist on {server}")]
    SlotMissing { slot: String, server: String },
    #[error(
        "replication slot {slot:?} on {server} is a {kind} slot, a standby needs a physical one"
    )]
    SlotNotPhysical {
        slot: String,
        server: String,
        kind: String,
    },
}

impl StandbyError {
    pub fn hint(&self) -> Option<String> {
        match self {
            StandbyError::Connect { error, .. } => error.hint(),
            StandbyError::ForeignPrimary { .. } => Some(
                "give the primary whose WAL this archive holds as --source, or restore from that primary's archive"
                    .into(),
            ),
            StandbyError::TimelineNotInHistory { .. } | StandbyError::Diverged { .. } => Some(
                "the archive and --source went separate ways after a failover: give the server the archive follows as --source, or start a new archive from the current primary".into(),
            ),
            StandbyError::BadHistory { .. } => None,
            StandbyError::PrimaryLacksWal { .. } => Some(
                "the archive does not reach far enough: take a new backup (walagent backup) or archive the missing WAL (walagent stream with its slot), then restore again".into(),
            ),
            StandbyError::TimelineAhead { .. } => Some(
                "the archive holds a newer timeline than the primary (a promoted standby?): use that server as --source"
                    .into(),
            ),
            StandbyError::SlotExists { slot, .. } => Some(format!(
                "use it without --create-slot if it belongs to no other client, or drop it first (SELECT pg_drop_replication_slot('{slot}')), or pick another --slot"
            )),
            StandbyError::SlotMissing { .. } => Some(
                "add --create-slot, or create it with pg_create_physical_replication_slot()".into(),
            ),
            StandbyError::SlotNotPhysical { .. } => Some("pick another --slot".into()),
        }
    }
}

async fn connect(src: &StandbySource) -> Result<Connection, StandbyError> {
    Connection::connect(&src.conninfo)
        .await
        .map_err(|error| StandbyError::Connect {
            server: describe_source(&src.conninfo),
            error: Box::new(error),
        })
}

/// `display_safe` (never the password) without the application_name, which names only
/// walagent's own connection, not the standby's.
fn describe_source(c: &ConnInfo) -> String {
    let mut s = c.display_safe();
    if let Some(i) = s.find(" application_name=") {
        s.truncate(i);
    }
    s
}

/// Checks `--source` against the archive (system `archive_system`) and the slot options;
/// writes nothing on the server.
pub async fn check_source(
    src: &StandbySource,
    archive_system: u64,
) -> Result<SourceCheck, StandbyError> {
    let source = describe_source(&src.conninfo);
    let mut conn = connect(src).await?;
    let res = check_on(&mut conn, src, &source, archive_system).await;
    conn.close().await;
    res
}

async fn check_on(
    conn: &mut Connection,
    src: &StandbySource,
    source: &str,
    archive_system: u64,
) -> Result<SourceCheck, StandbyError> {
    let err = |error| StandbyError::Connect {
        server: source.to_string(),
        error: Box::new(error),
    };
    let system = conn.identify_system().await.map_err(err)?;
    if system.system_identifier != archive_system {
        return Err(StandbyError::ForeignPrimary {
            server: source.to_string(),
            primary: system.system_identifier,
            archive: archive_system,
        });
    }
    let history = if system.timeline > Timeline::new(1).unwrap_or(system.timeline) {
        let (_, raw) = conn.timeline_history(system.timeline).await.map_err(err)?;
        Some(
            TimelineHistory::parse(&raw).map_err(|error| StandbyError::BadHistory {
                server: source.to_string(),
                error,
            })?,
        )
    } else {
        None
    };
    let slot = match &src.slot {
        None => None,
        Some(name) => {
            let found = conn.read_replication_slot(name).await.map_err(err)?;
            match (found, src.create_slot) {
                (Some(_), true) => {
                    return Err(StandbyError::SlotExists {
                        slot: name.clone(),
                        server: source.to_string(),
                    })
                }
                (None, false) => {
                    return Err(StandbyError::SlotMissing {
                        slot: name.clone(),
                        server: source.to_string(),
                    })
                }
                (Some(info), false) if info.slot_type != "physical" => {
                    return Err(StandbyError::SlotNotPhysical {
                        slot: name.clone(),
                        server: source.to_string(),
                        kind: info.slot_type,
                    })
                }
                (Some(info), false) => Some(SlotPlan {
                    name: name.clone(),
                    create: false,
                    restart_lsn: info.restart_lsn,
                }),
                (None, true) => Some(SlotPlan {
                    name: name.clone(),
                    create: true,
                    restart_lsn: None,
                }),
            }
        }
    };
    Ok(SourceCheck {
        source: source.to_string(),
        system,
        history,
        slot,
    })
}

/// The standby follows `latest` from the backup: timeline `archive`, whose archived WAL ends
/// at `archive_end`. The primary must be on that timeline, or on a later one whose history
/// left `archive` at or after `archive_end`; otherwise the standby replays WAL the primary
/// never had (or follows a timeline the primary never had) and can never stream from it.
pub fn check_timeline(
    check: &SourceCheck,
    archive: Timeline,
    archive_end: Lsn,
) -> Result<(), StandbyError> {
    let primary = check.system.timeline;
    if archive == primary {
        return Ok(());
    }
    let server = || check.source.clone();
    if archive > primary {
        return Err(StandbyError::TimelineAhead {
            server: server(),
            archive,
            primary,
        });
    }
    let Some(switch) = check.history.as_ref().and_then(|h| h.switch_point(archive)) else {
        return Err(StandbyError::TimelineNotInHistory {
            server: server(),
            archive,
            primary,
        });
    };
    if archive_end > switch {
        return Err(StandbyError::Diverged {
            server: server(),
            archive,
            archive_end,
            switch,
            primary,
        });
    }
    Ok(())
}

/// Creates the physical slot (RESERVE_WAL) and returns its `restart_lsn`. A slot that appeared
/// since the check is [`StandbyError::SlotExists`] (and left alone).
pub async fn create_slot(src: &StandbySource, name: &str) -> Result<Option<Lsn>, StandbyError> {
    let source = describe_source(&src.conninfo);
    let err = |error| StandbyError::Connect {
        server: source.clone(),
        error: Box::new(error),
    };
    let mut conn = connect(src).await?;
    let created = conn.create_physical_slot(name).await.map_err(err);
    let res = match created {
        Ok(true) => conn
            .read_replication_slot(name)
            .await
            .map(|s| s.and_then(|s| s.restart_lsn))
            .map_err(err),
        Ok(false) => Err(StandbyError::SlotExists {
            slot: name.to_string(),
            server: source.clone(),
        }),
        Err(e) => Err(e),
    };
    conn.close().await;
    res
}

/// Where the standby will ask the primary for WAL: the start of the segment holding the
/// archive's end `archive_end` (walreceiver always starts at a segment boundary).
pub fn stream_start(archive_end: Lsn, size: SegmentSize) -> Lsn {
    Lsn(archive_end.segno(size) * u64::from(size.bytes()))
}

/// Checks that the primary can still send WAL from `from` on `timeline` (START_REPLICATION
/// there, stopped at once). With `slot` (one this restore created), the slot is used for it and
/// confirmed at `from`, which moves its `restart_lsn` back to `from` (a physical slot takes
/// the flush position a client reports), so it keeps exactly the WAL the standby will
/// stream. Returns the slot's `restart_lsn` afterwards (None without a slot).
pub async fn check_primary_wal(
    src: &StandbySource,
    from: Lsn,
    timeline: Timeline,
    slot: Option<&str>,
) -> Result<Option<Lsn>, StandbyError> {
    let server = describe_source(&src.conninfo);
    let err = |error| StandbyError::Connect {
        server: server.clone(),
        error: Box::new(error),
    };
    let mut conn = connect(src).await?;
    // At or past the server's flush position nothing can be missing (and nothing would be
    // sent to show it): no stream needed.
    match conn.identify_system().await {
        Ok(sys) if from >= sys.xlogpos => {
            conn.close().await;
            return Ok(None);
        }
        Ok(_) => {}
        Err(e) => {
            conn.close().await;
            return Err(err(e));
        }
    }
    // The server reads the WAL only once streaming runs (a missing segment is an error in the
    // stream, not in reply to START_REPLICATION): wait for the first data before stopping.
    let started = match conn.start_replication(slot, from, timeline).await {
        Ok(StartOutcome::Streaming) => first_wal(&mut conn, from).await.map(|()| true),
        // `from` is exactly where `timeline` ended: nothing to send on it, the next one follows.
        Ok(StartOutcome::TimelineEnded(_)) => Ok(false),
        Err(e) => Err(e),
    };
    match started {
        Ok(true) => {
            if let Err(e) = stop_at(&mut conn, from, slot.is_some()).await {
                tracing::debug!("ending the WAL check stream: {e}");
            }
        }
        Ok(false) => {}
        Err(error) if error.sqlstate() == Some("58P01") => {
            conn.close().await;
            return Err(StandbyError::PrimaryLacksWal {
                server,
                from,
                timeline,
                error: Box::new(error),
            });
        }
        Err(e) => {
            conn.close().await;
            return Err(err(e));
        }
    }
    let res = match slot {
        None => Ok(None),
        Some(name) => match connect(src).await {
            Ok(mut c) => {
                let r = c
                    .read_replication_slot(name)
                    .await
                    .map(|s| s.and_then(|s| s.restart_lsn))
                    .map_err(err);
                c.close().await;
                r
            }
            Err(e) => Err(e),
        },
    };
    conn.close().await;
    res
}

/// Waits (at most 30 s) until the stream started at `from` shows the server has that WAL: the
/// first XLogData, or a keepalive saying it has nothing beyond `from` yet.
async fn first_wal(conn: &mut Connection, from: Lsn) -> Result<(), ProtocolError> {
    let work = async {
        loop {
            match conn.next_event().await? {
                StreamEvent::XLogData { .. } | StreamEvent::End(_) => return Ok(()),
                StreamEvent::Keepalive { wal_end, .. } if wal_end <= from => return Ok(()),
                StreamEvent::Keepalive { .. } => {}
            }
        }
    };
    match tokio::time::timeout(Duration::from_secs(30), work).await {
        Ok(r) => r,
        Err(_) => {
            tracing::debug!("no WAL from {from} within 30 s; assuming the server has it");
            Ok(())
        }
    }
}

/// Confirms `from` (when `confirm`), then ends the stream (data still arriving is ignored);
/// at most 30 s.
async fn stop_at(conn: &mut Connection, from: Lsn, confirm: bool) -> Result<(), ProtocolError> {
    let work = async {
        if confirm {
            conn.send_status(StatusUpdate {
                write: from,
                flush: from,
                apply: from,
                send_time: pg_now(),
                reply_requested: false,
            })
            .await?;
        }
        conn.request_stop().await?;
        loop {
            if let StreamEvent::End(_) = conn.next_event().await? {
                return Ok(());
            }
        }
    };
    match tokio::time::timeout(Duration::from_secs(30), work).await {
        Ok(r) => r,
        Err(_) => Ok(()),
    }
}

/// Where the archive's WAL along the restore's timeline path ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArchiveEnd {
    /// The end of the last complete record (of a final `.partial`) or of the last segment.
    pub wal_end: Lsn,
    pub segment_size: SegmentSize,
    /// The timeline the standby follows (`latest` resolved).
    pub target_timeline: Timeline,
    /// The timeline of the last segment file.
    pub last_timeline: Timeline,
}

impl ArchiveEnd {
    /// Where the standby will start streaming.
    pub fn stream_from(&self) -> Lsn {
        stream_start(self.wal_end, self.segment_size)
    }
}

/// After planning, before anything is written: the primary's timeline history fits the
/// archive's ([`check_timeline`]) and it still has the WAL where the archive ends.
pub async fn check_against_archive(
    src: &StandbySource,
    check: &SourceCheck,
    end: &ArchiveEnd,
) -> Result<(), StandbyError> {
    check_timeline(check, end.target_timeline, end.wal_end)?;
    check_primary_wal(src, end.stream_from(), end.last_timeline, None)
        .await
        .map(|_| ())
}

/// Just before unpacking: creates the slot (`--create-slot`) and moves it back to where the
/// standby will start streaming when it reserved WAL only from later. Returns the name of the
/// slot created (the caller drops it when the restore fails) and notes for the operator (WAL
/// the standby will need that nothing keeps on the primary).
pub async fn prepare_slot(
    src: &StandbySource,
    check: &mut SourceCheck,
    end: &ArchiveEnd,
) -> Result<(Option<String>, Vec<String>), StandbyError> {
    let from = end.stream_from();
    let Some(slot) = check.slot.as_mut() else {
        return Ok((None, vec![no_slot_note(from, None)]));
    };
    let mut created = None;
    if slot.create {
        slot.restart_lsn = create_slot(src, &slot.name).await?;
        created = Some(slot.name.clone());
        if slot.restart_lsn.is_some_and(|r| r > from) {
            // Reserved from the primary's last checkpoint, after where the standby starts:
            // move it back to there (the WAL was there a moment ago).
            match check_primary_wal(src, from, end.last_timeline, Some(&slot.name)).await {
                Ok(r) => slot.restart_lsn = r.or(slot.restart_lsn),
                Err(e) => {
                    drop_created_slot(src, &slot.name).await;
                    return Err(e);
                }
            }
        }
    }
    let note = match slot.restart_lsn {
        Some(r) => slot_gap(end.wal_end, r, end.segment_size),
        None => Some(no_slot_note(from, Some(&slot.name))),
    };
    Ok((created, note.into_iter().collect()))
}

/// Drops the slot this restore created, after a failure; a failure to drop is logged with
/// what to do (the slot would keep WAL on the primary for ever).
pub async fn drop_created_slot(src: &StandbySource, name: &str) {
    let res = match connect(src).await {
        Ok(mut conn) => {
            let r = conn.drop_replication_slot(name).await;
            conn.close().await;
            r.map_err(|e| e.to_string())
        }
        Err(e) => Err(e.to_string()),
    };
    match res {
        Ok(()) => tracing::info!(slot = %name, "dropped the replication slot this restore created"),
        Err(e) => tracing::warn!(
            slot = %name,
            "could not drop the replication slot this restore created ({e}); drop it on the primary with SELECT pg_drop_replication_slot('{name}'), it keeps WAL there"
        ),
    }
}

/// When the standby must stream WAL the slot does not keep: the archive's WAL ends at
/// `archive_end`, the standby then asks the primary from the start of that segment on, and
/// the slot keeps the primary's WAL only from `restart_lsn` on. `None` when the slot covers it.
pub fn slot_gap(archive_end: Lsn, restart_lsn: Lsn, size: SegmentSize) -> Option<String> {
    let stream_from = stream_start(archive_end, size);
    (restart_lsn > stream_from).then(|| {
        format!(
            "the archive's WAL ends at {archive_end} and the standby will stream from {stream_from} on, but the slot keeps the primary's WAL only from {restart_lsn}: WAL {stream_from}..{restart_lsn} must reach the archive (keep `walagent stream` running) or still be in the primary's pg_wal, else the standby waits at {archive_end}"
        )
    })
}

/// Without a slot (or with one that reserves no WAL yet) nothing keeps the primary's WAL from
/// `from` until the standby connects.
pub fn no_slot_note(from: Lsn, slot: Option<&str>) -> String {
    let what = match slot {
        Some(s) => format!("slot {s:?} reserves no WAL yet"),
        None => "no --slot".to_string(),
    };
    format!(
        "{what}: nothing keeps the primary's WAL from {from} on until the standby connects (only another slot, such as that of walagent stream, or wal_keep_size); start it soon, or use --slot NAME --create-slot"
    )
}

/// The settings a standby gets besides restore_command and recovery_target_timeline: the
/// connection and slot, or both empty (overriding any copied with the backup).
pub fn connection_settings(src: Option<&StandbySource>) -> Vec<(&'static str, String)> {
    vec![
        (
            "primary_conninfo",
            src.map(StandbySource::primary_conninfo).unwrap_or_default(),
        ),
        (
            "primary_slot_name",
            src.and_then(|s| s.slot.clone()).unwrap_or_default(),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(s: &str, password_in_source: bool, slot: Option<&str>) -> StandbySource {
        StandbySource {
            conninfo: ConnInfo::parse_with_env(s, &|_| None).unwrap(),
            password_in_source,
            slot: slot.map(str::to_string),
            create_slot: false,
        }
    }

    #[test]
    fn primary_conninfo_has_the_password_only_when_given() {
        let s = source(
            r"host=db1 port=5433 user=rep password='s3cr\'t x' sslmode=require",
            true,
            Some("s1"),
        );
        let c = s.primary_conninfo();
        assert!(c.contains(r"password='s3cr\'t x'"), "{c}");
        assert!(c.contains("host=db1") && c.contains("port=5433") && c.contains("user=rep"));
        assert!(c.contains("sslmode=require"), "{c}");
        assert!(!c.contains("application_name"), "{c}");
        let no = StandbySource {
            password_in_source: false,
            ..s.clone()
        };
        assert!(
            !no.primary_conninfo().contains("password"),
            "{}",
            no.primary_conninfo()
        );
        assert_eq!(
            connection_settings(Some(&s)),
            vec![("primary_conninfo", c), ("primary_slot_name", "s1".into())]
        );
    }

    #[test]
    fn archive_only_standby_clears_copied_connection_settings() {
        assert_eq!(
            connection_settings(None),
            vec![
                ("primary_conninfo", String::new()),
                ("primary_slot_name", String::new())
            ]
        );
    }

    #[test]
    fn slot_gap_from_the_segment_start() {
        let size = SegmentSize::new(1 << 20).unwrap();
        // Archive ends inside segment 5; streaming starts at 0/500000.
        let end = Lsn(0x50_0120);
        assert_eq!(slot_gap(end, Lsn(0x50_0000), size), None);
        assert_eq!(slot_gap(end, Lsn(0x40_0028), size), None);
        let g = slot_gap(end, Lsn(0x60_0028), size).unwrap();
        assert!(g.contains("0/500000..0/600028"), "{g}");
    }

    #[test]
    fn timeline_check() {
        let tl = |n| Timeline::new(n).unwrap();
        // The primary is on timeline 3: 1 ended at 0/3000000, 2 at 0/5000000.
        let check = SourceCheck {
            source: "host=x".into(),
            system: SystemInfo {
                system_identifier: 1,
                timeline: tl(3),
                xlogpos: Lsn(0x600_0000),
            },
            history: Some(
                TimelineHistory::parse(
                    b"1\t0/3000000\tno recovery target specified\n2\t0/5000000\tx\n",
                )
                .unwrap(),
            ),
            slot: None,
        };
        // Same timeline, or an ancestor the archive does not follow past its switch point.
        assert!(check_timeline(&check, tl(3), Lsn(0x700_0000)).is_ok());
        assert!(check_timeline(&check, tl(2), Lsn(0x500_0000)).is_ok());
        assert!(check_timeline(&check, tl(1), Lsn(0x280_0000)).is_ok());
        // The archive's timeline 2 runs past where the primary left it.
        let e = check_timeline(&check, tl(2), Lsn(0x500_0100)).unwrap_err();
        assert!(matches!(e, StandbyError::Diverged { .. }), "{e}");
        assert!(e.to_string().contains("past 0/5000000"), "{e}");
        // A timeline the primary never had, and one ahead of it.
        let e = check_timeline(&check, tl(4), Lsn(0)).unwrap_err();
        assert!(matches!(e, StandbyError::TimelineAhead { .. }), "{e}");
        let no_history = SourceCheck {
            history: None,
            ..check.clone()
        };
        let e = check_timeline(&no_history, tl(2), Lsn(0)).unwrap_err();
        assert!(
            matches!(e, StandbyError::TimelineNotInHistory { .. }),
            "{e}"
        );
        assert!(e.hint().is_some());
    }
}
