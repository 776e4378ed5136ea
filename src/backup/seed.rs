//! `walagent seed-standby`: a standby's data directory straight from BASE_BACKUP, like
//! `pg_basebackup -Fp -X fetch -R`.
//!
//! A temporary replication slot on the backup connection keeps the server's WAL from the
//! backup's start until the copy ends, and `WAL true` makes the server append that WAL to
//! `base.tar`, so the standby starts even when the primary has moved on meanwhile. Files are
//! written as they arrive ([`crate::datadir::extract`]) on a blocking thread; the async side only reads
//! the connection. The server sends tablespace archives first and `base.tar` last, so each
//! tablespace's directory is filled before its `pg_tblspc/<oid>` link is made.
//!
//! On failure everything written is removed again (the directory was empty or absent before),
//! so a failed seed never leaves a half data directory that might be started by mistake.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use crate::datadir::extract::{
    chown_to as chown, map_tablespace, prepare_target_dir, remove_written,
    target_owner as owner_for, write_private_file as write_private, ExtractError, ExtractOptions,
    ExtractStats, Extractor,
};
use crate::datadir::progress::Progress;
use crate::datadir::tar::{TarEvent, TarParser};
use crate::protocol::basebackup::{BackupCopyMessage, BackupStreamDecoder, BaseBackupOptions};
use crate::protocol::conninfo::ConnInfo;
use crate::protocol::replication::BackupEvent;
use crate::protocol::ProtocolError;
use crate::datadir::recovery::{append_auto_conf, write_signal, Signal};
use crate::wal::Lsn;

#[derive(Debug, Clone)]
pub struct SeedOptions {
    pub conninfo: ConnInfo,
    pub pgdata: PathBuf,
    pub slot: Option<String>,
    pub create_slot: bool,
    pub checkpoint_fast: bool,
    pub max_rate_kbps: Option<u32>,
    pub tablespace_mapping: Vec<(PathBuf, PathBuf)>,
    pub progress: bool,
}

#[derive(Debug, Clone)]
pub struct SeedReport {
    pub start_lsn: Lsn,
    pub end_lsn: Lsn,
    pub timeline: u32,
    pub stats: ExtractStats,
    pub slot_created: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
    #[error("{0}")]
    Extract(#[from] ExtractError),
    #[error("the server runs PostgreSQL {0}, but walagent seed-standby needs 15 or later")]
    ServerTooOld(String),
    #[error("replication slot {0:?} does not exist on the server")]
    SlotMissing(String),
    #[error("the base backup stream is malformed: {0}")]
    Stream(String),
    #[error("{0}")]
    Io(String),
    #[error("seeding cancelled; the files written so far were removed")]
    Cancelled,
}

impl From<super::ConnectError> for SeedError {
    fn from(e: super::ConnectError) -> Self {
        match e {
            super::ConnectError::Protocol(e) => SeedError::Protocol(e),
            super::ConnectError::TooOld(v) => SeedError::ServerTooOld(v),
        }
    }
}

impl SeedError {
    pub fn hint(&self) -> Option<String> {
        match self {
            SeedError::Protocol(e) => e.hint(),
            SeedError::ServerTooOld(_) => {
                Some("use pg_basebackup -R for servers older than PostgreSQL 15".into())
            }
            SeedError::SlotMissing(_) => Some(
                "add --create-slot, or create it with pg_create_physical_replication_slot()".into(),
            ),
            _ => None,
        }
    }
}

/// Messages to the extraction thread.
enum ToExtractor {
    Archive { tablespace: Option<(u32, PathBuf)> },
    Data(Bytes),
    Finish,
}

pub async fn seed(
    opts: &SeedOptions,
    mut cancel: watch::Receiver<bool>,
) -> Result<SeedReport, SeedError> {
    let created = prepare_target_dir(&opts.pgdata)?;
    let owner = owner_for(&opts.pgdata, created);
    let mut prepared: Vec<(PathBuf, bool)> = vec![(opts.pgdata.clone(), created)];
    let res = seed_into(opts, owner, &mut prepared, &mut cancel).await;
    if res.is_err() {
        for (dir, created) in prepared.iter().rev() {
            remove_written(dir, *created);
        }
    }
    res
}

async fn seed_into(
    opts: &SeedOptions,
    owner: Option<(u32, u32)>,
    prepared: &mut Vec<(PathBuf, bool)>,
    cancel: &mut watch::Receiver<bool>,
) -> Result<SeedReport, SeedError> {
    let (mut conn, _version) = super::connect_for_backup(&opts.conninfo).await?;
    let _sys = conn.identify_system().await?;
    let mut slot_created = false;
    if let Some(slot) = &opts.slot {
        if opts.create_slot {
            slot_created = conn.create_physical_slot(slot).await?;
            if !slot_created {
                tracing::info!(%slot, "the slot exists already; using it");
            }
        } else if conn.read_replication_slot(slot).await?.is_none() {
            return Err(SeedError::SlotMissing(slot.clone()));
        }
    }
    conn.create_temporary_slot(&format!("walagent_seed_{}", std::process::id()))
        .await?;
    let bb = BaseBackupOptions {
        label: "walagent seed-standby".into(),
        checkpoint_fast: opts.checkpoint_fast,
        max_rate_kbps: opts.max_rate_kbps,
        manifest: true,
        tablespace_map: false,
        wal: true,
        wait: false,
        progress: opts.progress,
    };
    let header = conn.start_base_backup(&bb).await?;
    tracing::info!(start = %header.start_lsn, timeline = header.timeline, "copy started");
    let progress = Progress::new(opts.progress, &header);

    let ex_opts = ExtractOptions {
        tablespace_mapping: opts.tablespace_mapping.clone(),
        owner,
    };
    let (tx, rx) = mpsc::channel::<ToExtractor>(8);
    let pgdata = opts.pgdata.clone();
    let worker = tokio::task::spawn_blocking(move || extract_worker(&pgdata, ex_opts, rx));

    let mut decoder = BackupStreamDecoder::new();
    let mut manifest = Vec::new();
    let mut send_failed = false;
    let end = loop {
        let ev = tokio::select! {
            biased;
            _ = cancel.changed() => {
                drop(tx);
                let _ = worker.await;
                return Err(SeedError::Cancelled);
            }
            ev = conn.next_backup_event(&mut decoder) => ev,
        };
        let ev = match ev {
            Ok(e) => e,
            Err(e) => {
                drop(tx);
                let _ = worker.await;
                return Err(e.into());
            }
        };
        let msg = match ev {
            BackupEvent::End { end_lsn, timeline } => break (end_lsn, timeline),
            BackupEvent::Message(BackupCopyMessage::NewArchive {
                name,
                tablespace_path,
            }) => {
                let tablespace = if tablespace_path.is_empty() {
                    None
                } else {
                    let oid = name
                        .strip_suffix(".tar")
                        .and_then(|s| s.parse::<u32>().ok())
                        .ok_or_else(|| {
                            SeedError::Stream(format!("tablespace archive named {name:?}"))
                        })?;
                    let target =
                        map_tablespace(&opts.tablespace_mapping, Path::new(&tablespace_path));
                    let created = prepare_target_dir(&target)?;
                    prepared.push((target.clone(), created));
                    Some((oid, target))
                };
                ToExtractor::Archive { tablespace }
            }
            BackupEvent::Message(BackupCopyMessage::ArchiveData(d)) => {
                progress.add(d.len() as u64);
                ToExtractor::Data(d)
            }
            BackupEvent::Message(BackupCopyMessage::Progress(n)) => {
                progress.set(n);
                continue;
            }
            BackupEvent::Message(BackupCopyMessage::ManifestStart) => continue,
            BackupEvent::Message(BackupCopyMessage::ManifestData(d)) => {
                manifest.extend_from_slice(&d);
                continue;
            }
        };
        if tx.send(msg).await.is_err() {
            send_failed = true;
            break (Lsn::INVALID, 0);
        }
    };
    progress.finish();
    let finish_sent = !send_failed && tx.send(ToExtractor::Finish).await.is_ok();
    drop(tx);
    let stats = worker
        .await
        .map_err(|e| SeedError::Io(format!("the extraction thread failed: {e}")))??;
    if !finish_sent {
        return Err(SeedError::Io("the extraction stopped early".into()));
    }
    let (end_lsn, _end_tli) = end;
    conn.close().await;

    // What pg_basebackup -R leaves: the manifest, standby.signal, and the connection settings.
    let io = |what: &str, e: std::io::Error| SeedError::Io(format!("{what}: {e}"));
    if !manifest.is_empty() {
        let path = opts.pgdata.join("backup_manifest");
        write_private(&path, &manifest).map_err(|e| io("cannot write backup_manifest", e))?;
        chown(&path, owner);
    }
    let mut settings = vec![("primary_conninfo", opts.conninfo.to_conninfo_string(true))];
    if let Some(slot) = &opts.slot {
        settings.push(("primary_slot_name", slot.clone()));
    }
    append_auto_conf(&opts.pgdata, &settings, "Written by walagent seed-standby")
        .map_err(|e| io("cannot write postgresql.auto.conf", e))?;
    chown(&opts.pgdata.join("postgresql.auto.conf"), owner);
    let signal = write_signal(&opts.pgdata, Signal::Standby)
        .map_err(|e| io("cannot write standby.signal", e))?;
    chown(&signal, owner);
    Ok(SeedReport {
        start_lsn: header.start_lsn,
        end_lsn,
        timeline: header.timeline,
        stats,
        slot_created,
    })
}

/// The extraction thread: one tar parser and extractor per archive; tablespaces are registered
/// with the main directory's extractor so their links point at the extracted directories.
fn extract_worker(
    pgdata: &Path,
    opts: ExtractOptions,
    mut rx: mpsc::Receiver<ToExtractor>,
) -> Result<ExtractStats, SeedError> {
    let mut tablespaces: Vec<(u32, PathBuf)> = Vec::new();
    let mut current: Option<(TarParser, Extractor)> = None;
    let mut total = ExtractStats::default();
    let mut events: Vec<TarEvent> = Vec::new();
    let finish_one = |cur: Option<(TarParser, Extractor)>,
                      total: &mut ExtractStats,
                      events: &mut Vec<TarEvent>|
     -> Result<(), SeedError> {
        if let Some((mut parser, mut ex)) = cur {
            parser
                .finish(events)
                .map_err(|e| SeedError::Stream(e.to_string()))?;
            for ev in events.drain(..) {
                ex.handle(ev)?;
            }
            let s = ex.finish()?;
            total.files += s.files;
            total.dirs += s.dirs;
            total.symlinks += s.symlinks;
            total.bytes += s.bytes;
        }
        Ok(())
    };
    while let Some(msg) = rx.blocking_recv() {
        match msg {
            ToExtractor::Archive { tablespace } => {
                finish_one(current.take(), &mut total, &mut events)?;
                let ex = match &tablespace {
                    Some((oid, target)) => {
                        tablespaces.push((*oid, target.clone()));
                        Extractor::new(target, opts.clone())
                    }
                    None => {
                        let mut ex = Extractor::new(pgdata, opts.clone());
                        for (oid, target) in &tablespaces {
                            ex.register_tablespace(*oid, target.clone());
                        }
                        ex
                    }
                };
                current = Some((TarParser::new(), ex));
            }
            ToExtractor::Data(d) => {
                let Some((parser, ex)) = &mut current else {
                    return Err(SeedError::Stream("tar data outside an archive".into()));
                };
                parser
                    .feed(d, &mut events)
                    .map_err(|e| SeedError::Stream(e.to_string()))?;
                for ev in events.drain(..) {
                    ex.handle(ev)?;
                }
            }
            ToExtractor::Finish => {
                finish_one(current.take(), &mut total, &mut events)?;
                return Ok(total);
            }
        }
    }
    // The sender went away without Finish: cancelled or failed; the caller cleans up.
    Ok(total)
}
