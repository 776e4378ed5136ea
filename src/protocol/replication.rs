//! Replication commands as typed functions, and the CopyBoth stream of START_REPLICATION.
//!
//! Result layouts and the four ways a stream ends are in `proto-notes/replication-protocol.md`
//! (checked against walsender.c and a live 15.18 server).

use bytes::Bytes;

use super::codec::{self, quote_ident, BackendMessage, ReplicationMessage, StatusUpdate};
use super::connection::{Connection, QueryResult};
use super::error::ProtocolError;
use crate::wal::{Lsn, SegmentSize, Timeline};

/// IDENTIFY_SYSTEM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SystemInfo {
    pub system_identifier: u64,
    pub timeline: Timeline,
    /// The server's current WAL flush position.
    pub xlogpos: Lsn,
}

/// READ_REPLICATION_SLOT for an existing slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotInfo {
    pub slot_type: String,
    pub restart_lsn: Option<Lsn>,
    pub restart_timeline: Option<Timeline>,
}

/// How START_REPLICATION answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartOutcome {
    /// CopyBoth began; read [`Connection::next_event`].
    Streaming,
    /// The start point is exactly the end of a historic timeline: the server skipped COPY and
    /// named the next timeline.
    TimelineEnded(TimelineSwitch),
}

/// The timeline that follows the one just streamed, and where it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimelineSwitch {
    pub next_timeline: Timeline,
    pub next_start: Lsn,
}

/// Why a CopyBoth stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// End of a historic timeline (server sent CopyDone and the next timeline).
    Timeline(TimelineSwitch),
    /// We sent CopyDone and the server confirmed; the connection is at ReadyForQuery.
    Stopped,
    /// The server shut down (CommandComplete without CopyDone); the connection is closing.
    ServerShutdown,
}

/// One event from a CopyBoth stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    XLogData {
        wal_start: Lsn,
        wal_end: Lsn,
        data: Bytes,
    },
    Keepalive {
        wal_end: Lsn,
        reply_requested: bool,
    },
    End(StreamEnd),
}

fn parse_lsn(r: &QueryResult, row: usize, col: usize, what: &str) -> Result<Lsn, ProtocolError> {
    let t = r
        .text(row, col)
        .ok_or_else(|| ProtocolError::Unexpected(format!("{what}: missing value")))?;
    t.parse()
        .map_err(|_| ProtocolError::Unexpected(format!("{what}: bad LSN {t:?}")))
}

fn parse_num<T: std::str::FromStr>(
    r: &QueryResult,
    row: usize,
    col: usize,
    what: &str,
) -> Result<T, ProtocolError> {
    let t = r
        .text(row, col)
        .ok_or_else(|| ProtocolError::Unexpected(format!("{what}: missing value")))?;
    t.trim()
        .parse()
        .map_err(|_| ProtocolError::Unexpected(format!("{what}: bad number {t:?}")))
}

fn parse_switch(r: &QueryResult) -> Result<TimelineSwitch, ProtocolError> {
    if r.rows.len() != 1 || r.columns.len() < 2 {
        return Err(ProtocolError::Unexpected(format!(
            "end-of-timeline result with {} rows and {} columns",
            r.rows.len(),
            r.columns.len()
        )));
    }
    Ok(TimelineSwitch {
        next_timeline: parse_num(r, 0, 0, "next timeline")?,
        next_start: parse_lsn(r, 0, 1, "next timeline start")?,
    })
}

impl Connection {
    pub async fn identify_system(&mut self) -> Result<SystemInfo, ProtocolError> {
        let r = self.simple_query("IDENTIFY_SYSTEM").await?;
        if r.rows.len() != 1 || r.columns.len() < 3 {
            return Err(ProtocolError::Unexpected(
                "IDENTIFY_SYSTEM returned no row".into(),
            ));
        }
        Ok(SystemInfo {
            system_identifier: parse_num(&r, 0, 0, "IDENTIFY_SYSTEM systemid")?,
            // int4 on 15, int8 on 16+: parse the text either way.
            timeline: parse_num(&r, 0, 1, "IDENTIFY_SYSTEM timeline")?,
            xlogpos: parse_lsn(&r, 0, 2, "IDENTIFY_SYSTEM xlogpos")?,
        })
    }

    pub async fn show(&mut self, setting: &str) -> Result<String, ProtocolError> {
        let r = self.simple_query(&format!("SHOW {setting}")).await?;
        r.text(0, 0)
            .ok_or_else(|| ProtocolError::Unexpected(format!("SHOW {setting} returned nothing")))
    }

    pub async fn wal_segment_size(&mut self) -> Result<SegmentSize, ProtocolError> {
        let text = self.show("wal_segment_size").await?;
        SegmentSize::from_show(&text).map_err(|e| ProtocolError::Unexpected(e.to_string()))
    }

    /// `server_version_num` as an integer, e.g. 150018.
    pub async fn server_version_num(&mut self) -> Result<u32, ProtocolError> {
        let text = self.show("server_version_num").await?;
        text.trim()
            .parse()
            .map_err(|_| ProtocolError::Unexpected(format!("bad server_version_num {text:?}")))
    }

    /// TIMELINE_HISTORY: the file name and raw content of timeline `tli`'s history file
    /// (timeline 1 has none).
    pub async fn timeline_history(
        &mut self,
        tli: Timeline,
    ) -> Result<(String, Bytes), ProtocolError> {
        let r = self
            .simple_query(&format!("TIMELINE_HISTORY {tli}"))
            .await?;
        let name = r.text(0, 0);
        let content = r.rows.first().and_then(|row| row.get(1)).cloned().flatten();
        match (name, content) {
            (Some(n), Some(c)) => Ok((n, c)),
            _ => Err(ProtocolError::Unexpected(format!(
                "TIMELINE_HISTORY {tli} returned no file"
            ))),
        }
    }

    /// CREATE_REPLICATION_SLOT ... PHYSICAL (RESERVE_WAL). Returns false when the slot already
    /// existed (SQLSTATE 42710), true when it was created.
    pub async fn create_physical_slot(&mut self, name: &str) -> Result<bool, ProtocolError> {
        let sql = format!(
            "CREATE_REPLICATION_SLOT {} PHYSICAL (RESERVE_WAL)",
            quote_ident(name)
        );
        match self.simple_query(&sql).await {
            Ok(_) => Ok(true),
            Err(e) if e.sqlstate() == Some("42710") => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// DROP_REPLICATION_SLOT name (without WAIT: an active slot is an error, SQLSTATE 55006).
    pub async fn drop_replication_slot(&mut self, name: &str) -> Result<(), ProtocolError> {
        self.simple_query(&format!("DROP_REPLICATION_SLOT {}", quote_ident(name)))
            .await
            .map(|_| ())
    }

    /// READ_REPLICATION_SLOT (PostgreSQL 15+). `None` when the slot does not exist.
    pub async fn read_replication_slot(
        &mut self,
        name: &str,
    ) -> Result<Option<SlotInfo>, ProtocolError> {
        let r = self
            .simple_query(&format!("READ_REPLICATION_SLOT {}", quote_ident(name)))
            .await?;
        let Some(slot_type) = r.text(0, 0) else {
            return Ok(None);
        };
        let restart_lsn = match r.text(0, 1) {
            Some(_) => Some(parse_lsn(&r, 0, 1, "READ_REPLICATION_SLOT restart_lsn")?),
            None => None,
        };
        let restart_timeline = match r.text(0, 2) {
            Some(_) => Some(parse_num(&r, 0, 2, "READ_REPLICATION_SLOT restart_tli")?),
            None => None,
        };
        Ok(Some(SlotInfo {
            slot_type,
            restart_lsn,
            restart_timeline,
        }))
    }

    /// START_REPLICATION [SLOT s] PHYSICAL start TIMELINE tli.
    pub async fn start_replication(
        &mut self,
        slot: Option<&str>,
        start: Lsn,
        timeline: Timeline,
    ) -> Result<StartOutcome, ProtocolError> {
        let slot = slot
            .map(|s| format!("SLOT {} ", quote_ident(s)))
            .unwrap_or_default();
        let sql = format!("START_REPLICATION {slot}PHYSICAL {start} TIMELINE {timeline}");
        tracing::debug!(%sql, "starting replication");
        postgres_protocol::message::frontend::query(&sql, self.write_buf())
            .map_err(|e| ProtocolError::Unexpected(format!("encoding START_REPLICATION: {e}")))?;
        self.flush().await?;
        match self.read_message().await? {
            BackendMessage::CopyBothResponse => Ok(StartOutcome::Streaming),
            BackendMessage::RowDescription(columns) => {
                let r = self
                    .collect_results(QueryResult {
                        columns,
                        ..Default::default()
                    })
                    .await?;
                Ok(StartOutcome::TimelineEnded(parse_switch(&r)?))
            }
            BackendMessage::Error(n) => {
                // Drain to ReadyForQuery; the server error is what matters.
                let _ = self.collect_results(QueryResult::default()).await;
                Err(ProtocolError::Server(n))
            }
            other => Err(ProtocolError::Unexpected(format!(
                "{other:?} in reply to START_REPLICATION"
            ))),
        }
    }

    /// Next event of a CopyBoth stream. After the server's CopyDone this answers with CopyDone and
    /// reads the end-of-stream results itself. Cancel-safe while waiting for a message.
    ///
    /// Cancel-safe (it runs inside the receive loop's `select!`): a partially read frame stays
    /// buffered, and once the server's CopyDone has been read the end-of-stream exchange (our
    /// CopyDone, then the result set up to ReadyForQuery) keeps its state in the connection, so a
    /// cancelled call is resumed by the next one instead of seeing a stray RowDescription.
    pub async fn next_event(&mut self) -> Result<StreamEvent, ProtocolError> {
        if self.stream_ending.is_none() {
            match self.read_message().await? {
                BackendMessage::CopyData(payload) => {
                    return Ok(match ReplicationMessage::decode(payload)? {
                        ReplicationMessage::XLogData {
                            wal_start,
                            wal_end,
                            data,
                            ..
                        } => StreamEvent::XLogData {
                            wal_start,
                            wal_end,
                            data,
                        },
                        ReplicationMessage::Keepalive {
                            wal_end,
                            reply_requested,
                            ..
                        } => StreamEvent::Keepalive {
                            wal_end,
                            reply_requested,
                        },
                    })
                }
                // Either the end of a historic timeline (server first) or the answer to our
                // CopyDone. From here on the state lives in `stream_ending`.
                BackendMessage::CopyDone => self.stream_ending = Some(Default::default()),
                // Shutdown: `COPY 0` without CopyDone, then the server closes the socket.
                BackendMessage::CommandComplete(_) => {
                    return Ok(StreamEvent::End(StreamEnd::ServerShutdown))
                }
                BackendMessage::Error(n) => return Err(ProtocolError::Server(n)),
                other => {
                    return Err(ProtocolError::Unexpected(format!(
                        "{other:?} during streaming"
                    )))
                }
            }
        }
        if !self.copy_done_sent {
            codec::encode_copy_done(self.write_buf());
            self.copy_done_sent = true;
        }
        self.flush().await?;
        loop {
            let msg = self.read_message().await?;
            let Some((current, error)) = self.stream_ending.as_mut() else {
                return Err(ProtocolError::Unexpected("end of stream state lost".into()));
            };
            match msg {
                BackendMessage::RowDescription(cols) => {
                    *current = QueryResult {
                        columns: cols,
                        ..Default::default()
                    }
                }
                BackendMessage::DataRow(row) => current.rows.push(row),
                BackendMessage::CommandComplete(tag) => current.tag = tag,
                BackendMessage::Error(n) => *error = Some(n),
                BackendMessage::ReadyForQuery(_) => {
                    let (r, error) = self.stream_ending.take().unwrap_or_default();
                    self.copy_done_sent = false;
                    if let Some(n) = error {
                        return Err(ProtocolError::Server(n));
                    }
                    return if r.rows.is_empty() {
                        Ok(StreamEvent::End(StreamEnd::Stopped))
                    } else {
                        Ok(StreamEvent::End(StreamEnd::Timeline(parse_switch(&r)?)))
                    };
                }
                other => tracing::debug!(?other, "ignoring message at the end of the stream"),
            }
        }
    }

    /// Asks the server to end the stream (CopyDone). Keep calling [`Connection::next_event`]
    /// until it returns `End`; data that still arrives should be ignored.
    pub async fn request_stop(&mut self) -> Result<(), ProtocolError> {
        if !self.copy_done_sent {
            codec::encode_copy_done(self.write_buf());
            self.flush().await?;
            self.copy_done_sent = true;
        }
        Ok(())
    }

    /// Sends a standby status update.
    pub async fn send_status(&mut self, update: StatusUpdate) -> Result<(), ProtocolError> {
        update.encode(self.write_buf());
        self.flush().await
    }
}

// ---- BASE_BACKUP --------------------------------------------------------------------------

/// One row of BASE_BACKUP's tablespace result set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TablespaceHeader {
    /// `None` for the main data directory.
    pub oid: Option<u32>,
    /// The tablespace's directory on the server; `None` for the main data directory.
    pub location: Option<String>,
    /// Estimated size in bytes (only with `PROGRESS`).
    pub size: Option<u64>,
}

/// What BASE_BACKUP says before the COPY starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupHeader {
    pub start_lsn: Lsn,
    pub timeline: Timeline,
    pub tablespaces: Vec<TablespaceHeader>,
}

/// One step of the BASE_BACKUP COPY stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupEvent {
    Message(super::basebackup::BackupCopyMessage),
    /// CopyDone, the end-position result and ReadyForQuery were read: the backup is complete.
    End {
        end_lsn: Lsn,
        timeline: Timeline,
    },
}

fn parse_tablespaces(r: &QueryResult) -> Result<Vec<TablespaceHeader>, ProtocolError> {
    let mut out = Vec::with_capacity(r.rows.len());
    for row in 0..r.rows.len() {
        let oid = match r.text(row, 0) {
            Some(t) => Some(t.trim().parse::<u32>().map_err(|_| {
                ProtocolError::Unexpected(format!("BASE_BACKUP tablespace oid {t:?}"))
            })?),
            None => None,
        };
        let size = match r.text(row, 2) {
            Some(t) => Some(
                t.trim()
                    .parse::<u64>()
                    .map_err(|_| {
                        ProtocolError::Unexpected(format!("BASE_BACKUP tablespace size {t:?}"))
                    })?
                    .saturating_mul(1024),
            ),
            None => None,
        };
        out.push(TablespaceHeader {
            oid,
            location: r.text(row, 1).filter(|s| !s.is_empty()),
            size,
        });
    }
    Ok(out)
}

impl Connection {
    /// CREATE_REPLICATION_SLOT name TEMPORARY PHYSICAL (RESERVE_WAL): keeps the WAL from the
    /// current redo point on the server for as long as this connection lives.
    pub async fn create_temporary_slot(&mut self, name: &str) -> Result<(), ProtocolError> {
        let sql = format!(
            "CREATE_REPLICATION_SLOT {} TEMPORARY PHYSICAL (RESERVE_WAL)",
            quote_ident(name)
        );
        self.simple_query(&sql).await.map(|_| ())
    }

    /// Sends BASE_BACKUP and reads the start position and the tablespace list, up to the start of
    /// the COPY. Then call [`Connection::next_backup_event`] until `End`.
    pub async fn start_base_backup(
        &mut self,
        opts: &super::basebackup::BaseBackupOptions,
    ) -> Result<BackupHeader, ProtocolError> {
        let sql = opts.command();
        tracing::debug!(%sql, "starting base backup");
        postgres_protocol::message::frontend::query(&sql, self.write_buf())
            .map_err(|e| ProtocolError::Unexpected(format!("encoding BASE_BACKUP: {e}")))?;
        self.flush().await?;
        let mut results: Vec<QueryResult> = Vec::new();
        let mut current: Option<QueryResult> = None;
        loop {
            match self.read_message().await? {
                BackendMessage::RowDescription(columns) => {
                    current = Some(QueryResult {
                        columns,
                        ..Default::default()
                    })
                }
                BackendMessage::DataRow(row) => match &mut current {
                    Some(r) => r.rows.push(row),
                    None => {
                        return Err(ProtocolError::Unexpected(
                            "BASE_BACKUP sent a row before its description".into(),
                        ))
                    }
                },
                BackendMessage::CommandComplete(_) => {
                    if let Some(r) = current.take() {
                        results.push(r);
                    }
                }
                BackendMessage::CopyOutResponse => break,
                BackendMessage::Error(n) => {
                    let _ = self.collect_results(QueryResult::default()).await;
                    return Err(ProtocolError::Server(n));
                }
                BackendMessage::ReadyForQuery(_) => {
                    return Err(ProtocolError::Unexpected(
                        "BASE_BACKUP ended before sending any data".into(),
                    ))
                }
                other => tracing::debug!(?other, "ignoring message before the backup COPY"),
            }
        }
        let [start, tablespaces] = results.as_slice() else {
            return Err(ProtocolError::Unexpected(format!(
                "BASE_BACKUP sent {} result sets before the COPY, expected 2 (start position, tablespaces)",
                results.len()
            )));
        };
        Ok(BackupHeader {
            start_lsn: parse_lsn(start, 0, 0, "BASE_BACKUP start position")?,
            timeline: parse_num(start, 0, 1, "BASE_BACKUP start timeline")?,
            tablespaces: parse_tablespaces(tablespaces)?,
        })
    }

    /// The next message of the BASE_BACKUP COPY, decoded; after CopyDone, reads the end position
    /// and the final ReadyForQuery and returns `End`.
    pub async fn next_backup_event(
        &mut self,
        decoder: &mut super::basebackup::BackupStreamDecoder,
    ) -> Result<BackupEvent, ProtocolError> {
        match self.read_message().await? {
            BackendMessage::CopyData(payload) => decoder
                .decode(payload)
                .map(BackupEvent::Message)
                .map_err(|e| ProtocolError::Unexpected(e.to_string())),
            BackendMessage::CopyDone => {
                let r = self.collect_results(QueryResult::default()).await?;
                // collect_results keeps the last result set; the end position is the only one
                // with rows (the final CommandComplete has none and does not replace it).
                Ok(BackupEvent::End {
                    end_lsn: parse_lsn(&r, 0, 0, "BASE_BACKUP end position")?,
                    timeline: parse_num(&r, 0, 1, "BASE_BACKUP end timeline")?,
                })
            }
            BackendMessage::Error(n) => {
                let _ = self.collect_results(QueryResult::default()).await;
                Err(ProtocolError::Server(n))
            }
            other => Err(ProtocolError::Unexpected(format!(
                "{other:?} during the base backup COPY"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(cells: &[&str]) -> QueryResult {
        QueryResult {
            columns: (0..cells.len()).map(|i| format!("c{i}")).collect(),
            rows: vec![cells
                .iter()
                .map(|c| Some(Bytes::copy_from_slice(c.as_bytes())))
                .collect()],
            tag: String::new(),
        }
    }

    #[test]
    fn end_of_timeline_result_timelines() {
        let sw = parse_switch(&row(&["3", "0/5000000"])).unwrap();
        assert_eq!(sw.next_timeline, Timeline::new(3).unwrap());
        assert_eq!(sw.next_start, Lsn(0x500_0000));
        let max = parse_switch(&row(&["4294967295", "0/5000000"])).unwrap();
        assert_eq!(max.next_timeline, Timeline::MAX);
        // 0 is no timeline; beyond u32 and non-numbers are refused too, none of them panic.
        for bad in ["0", "4294967296", "-1", "0x3", ""] {
            assert!(
                matches!(
                    parse_switch(&row(&[bad, "0/5000000"])),
                    Err(ProtocolError::Unexpected(_))
                ),
                "{bad}"
            );
        }
    }
}
