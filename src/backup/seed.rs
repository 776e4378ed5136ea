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

use std::io;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use crate::datadir::extract::{ExtractError, ExtractStats};
use crate::datadir::manifest::{BackupManifest, ManifestError};
use crate::datadir::progress::Progress;
use crate::datadir::recovery::{append_auto_conf, write_signal, Signal};
use crate::datadir::tar::TarError;
use crate::datadir::unpack::{ArchiveUnpack, ManifestMismatch, UnpackError, Unpacker};
use crate::protocol::basebackup::{BackupCopyMessage, BackupStreamDecoder, BaseBackupOptions};
use crate::protocol::conninfo::ConnInfo;
use crate::protocol::replication::BackupEvent;
use crate::protocol::ProtocolError;
use crate::wal::{Lsn, Timeline};

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
    /// `application_name` in the standby's primary_conninfo; None leaves it out, so the
    /// standby shows up under its `cluster_name` (else `walreceiver`) in pg_stat_replication,
    /// as after `pg_basebackup -R`, and never as the archiver's `walagent`.
    pub application_name: Option<String>,
}

#[derive(Debug, Clone)]
pub struct SeedReport {
    pub start_lsn: Lsn,
    pub end_lsn: Lsn,
    pub timeline: Timeline,
    pub stats: ExtractStats,
    pub slot_created: bool,
    /// Files the server's backup manifest lists, each checked (size and CRC-32C) against what
    /// was written.
    pub manifest_files: u64,
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
    Tar(#[source] TarError),
    #[error("the base backup stream is malformed: {detail}")]
    Stream { detail: String },
    #[error("the server's backup_manifest: {0}")]
    Manifest(#[source] ManifestError),
    /// A file written does not match the server's manifest (a fault on the way or on the
    /// primary's storage).
    #[error("{0}; the files received do not match the server's backup manifest")]
    Mismatch(#[source] ManifestMismatch),
    #[error("cannot write {what}: {source}")]
    Write {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the extraction thread failed: {0}")]
    Worker(#[source] tokio::task::JoinError),
    #[error("the extraction stopped early")]
    StoppedEarly,
    #[error("seeding cancelled; the files written so far were removed")]
    Cancelled,
}

impl From<UnpackError> for SeedError {
    fn from(e: UnpackError) -> Self {
        match e {
            UnpackError::Tar(e) => SeedError::Tar(e),
            UnpackError::Extract(e) => SeedError::Extract(e),
            UnpackError::Manifest(e) => SeedError::Mismatch(e),
        }
    }
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
            SeedError::Extract(e) => e.hint(),
            SeedError::ServerTooOld(_) => {
                Some("use pg_basebackup -R for servers older than PostgreSQL 15".into())
            }
            SeedError::SlotMissing(_) => Some(
                "add --create-slot, or create it with pg_create_physical_replication_slot()".into(),
            ),
            SeedError::Mismatch(_) => Some(
                "run seed-standby again; if it fails the same way, check the primary's storage (pg_verifybackup of a fresh backup)".into(),
            ),
            SeedError::Write { .. } => {
                Some("check free space and permissions of the data directory".into())
            }
            _ => None,
        }
    }
}

/// Messages to the extraction thread.
enum ToExtractor {
    /// The next archive; finishes the one before.
    Archive(Box<ArchiveUnpack>),
    Data(Bytes),
    Finish,
}

pub async fn seed(
    opts: &SeedOptions,
    mut cancel: watch::Receiver<bool>,
) -> Result<SeedReport, SeedError> {
    // Removes everything written again unless kept.
    let mut unpacker = Unpacker::create(&opts.pgdata, opts.tablespace_mapping.clone())?;
    let report = seed_into(opts, &mut unpacker, &mut cancel).await?;
    unpacker.keep();
    Ok(report)
}

async fn seed_into(
    opts: &SeedOptions,
    unpacker: &mut Unpacker,
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
    tracing::info!(start = %header.start_lsn, timeline = header.timeline.get(), "copy started");
    let progress = Progress::new(opts.progress, &header);

    let (tx, rx) = mpsc::channel::<ToExtractor>(8);
    let worker = tokio::task::spawn_blocking(move || extract_worker(rx));

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
            BackupEvent::End { end_lsn, .. } => break end_lsn,
            BackupEvent::Message(BackupCopyMessage::NewArchive {
                name,
                tablespace_path,
            }) => match next_archive(unpacker, &name, &tablespace_path) {
                Ok(a) => ToExtractor::Archive(Box::new(a)),
                Err(e) => {
                    // The worker stops before the unpacker removes what it wrote.
                    drop(tx);
                    let _ = worker.await;
                    return Err(e);
                }
            },
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
            break Lsn::INVALID;
        }
    };
    progress.finish();
    let finish_sent = !send_failed && tx.send(ToExtractor::Finish).await.is_ok();
    drop(tx);
    let stats = worker.await.map_err(SeedError::Worker)??;
    if !finish_sent {
        return Err(SeedError::StoppedEarly);
    }
    let end_lsn = end;
    conn.close().await;

    // Every file written against the server's manifest (sent after the archives).
    let mut manifest_files = 0;
    if manifest.is_empty() {
        tracing::warn!("the server sent no backup manifest; the files were not checked");
    } else {
        let parsed = BackupManifest::parse(&manifest).map_err(SeedError::Manifest)?;
        manifest_files = unpacker
            .check_manifest(&parsed)
            .map_err(SeedError::Mismatch)?;
        tracing::info!("checked {manifest_files} files against the backup manifest");
    }

    // What pg_basebackup -R leaves: the manifest, standby.signal, and the connection settings.
    let write = |what: &'static str| move |source| SeedError::Write { what, source };
    if !manifest.is_empty() {
        unpacker
            .write_file("backup_manifest", &manifest)
            .map_err(write("backup_manifest"))?;
    }
    let mut settings = vec![(
        "primary_conninfo",
        opts.conninfo
            .to_conninfo_string_with(true, opts.application_name.as_deref()),
    )];
    if let Some(slot) = &opts.slot {
        settings.push(("primary_slot_name", slot.clone()));
    }
    let pgdata = unpacker.pgdata();
    append_auto_conf(pgdata, &settings, "Written by walagent seed-standby")
        .map_err(write("postgresql.auto.conf"))?;
    unpacker.chown(&pgdata.join("postgresql.auto.conf"));
    let signal = write_signal(pgdata, Signal::Standby).map_err(write("standby.signal"))?;
    unpacker.chown(&signal);
    Ok(SeedReport {
        start_lsn: header.start_lsn,
        end_lsn,
        timeline: header.timeline,
        stats,
        slot_created,
        manifest_files,
    })
}

/// The feeder for the archive the server starts next: a tablespace's (named `<oid>.tar`, with
/// its location) or, with an empty location, `base.tar`.
fn next_archive(
    unpacker: &mut Unpacker,
    name: &str,
    tablespace_path: &str,
) -> Result<ArchiveUnpack, SeedError> {
    if tablespace_path.is_empty() {
        return Ok(unpacker.main_archive());
    }
    let oid = name
        .strip_suffix(".tar")
        .and_then(|s| s.parse::<u32>().ok())
        .ok_or_else(|| SeedError::Stream {
            detail: format!("tablespace archive named {name:?}"),
        })?;
    Ok(unpacker.tablespace(oid, Path::new(tablespace_path))?)
}

/// The extraction thread: feeds each archive's data to its [`ArchiveUnpack`] (the unpacker
/// prepared its directory and, for `base.tar`, registered the tablespaces sent before it).
fn extract_worker(mut rx: mpsc::Receiver<ToExtractor>) -> Result<ExtractStats, SeedError> {
    let mut current: Option<Box<ArchiveUnpack>> = None;
    let mut total = ExtractStats::default();
    let finish_one = |cur: Option<Box<ArchiveUnpack>>, total: &mut ExtractStats| {
        if let Some(a) = cur {
            let s = a.finish()?;
            total.files += s.files;
            total.dirs += s.dirs;
            total.symlinks += s.symlinks;
            total.bytes += s.bytes;
        }
        Ok::<(), SeedError>(())
    };
    while let Some(msg) = rx.blocking_recv() {
        match msg {
            ToExtractor::Archive(a) => {
                finish_one(current.take(), &mut total)?;
                current = Some(a);
            }
            ToExtractor::Data(d) => {
                let Some(a) = &mut current else {
                    return Err(SeedError::Stream {
                        detail: "tar data outside an archive".into(),
                    });
                };
                a.feed(d)?;
            }
            ToExtractor::Finish => {
                finish_one(current.take(), &mut total)?;
                return Ok(total);
            }
        }
    }
    // The sender went away without Finish: cancelled or failed; the caller cleans up.
    Ok(total)
}
