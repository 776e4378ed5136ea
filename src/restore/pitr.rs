//! `walagent restore`: point-in-time recovery from the archive.
//!
//! Order matters, because a restore that fails halfway is worse than one that refuses:
//!
//! 1. Check everything without writing: the target parses, DIR (and every tablespace target) is
//!    absent or empty, the archive is a walagent archive, the backups belong to its system.
//! 2. Plan ([`super::plan`]): learn what a `.partial` ending the WAL chain holds (it is where
//!    the archive ends; see `proto-notes/restore.md`); for time, xid and restore-point targets,
//!    locate the record where PostgreSQL will stop by scanning archived WAL backwards from its
//!    end ([`crate::wal::xact`]), then choose the newest backup that is consistent before that
//!    point and whose WAL chain along the timeline path is unbroken. Any gap is reported by
//!    segment name, a target the archive does not reach says how far it reaches; DIR is
//!    untouched.
//! 3. Restore: prepare every target (tablespace directories first, then the main directory,
//!    whose `pg_tblspc` links point at them), then stream the tar objects out of the store,
//!    up to `--jobs` at once (default: the CPUs), each decompressed and unpacked on its own
//!    blocking thread while its next chunk downloads, checking every file's size and CRC-32C
//!    against the backup manifest as it is written. The first failure stops the others, and
//!    nothing is removed before every thread has stopped writing.
//! 4. Write `recovery.signal` and the recovery settings into `postgresql.auto.conf`, with a
//!    `restore_command` that runs `walagent wal-fetch` on the same archive. For S3 the AWS
//!    settings go into a 0600 file beside them (`--env-file`), so the server's OS user needs no
//!    exported variables. On any failure in 3-4, everything written is removed again.
//!
//! With `--standby` ([`super::standby`]) the plan is the one for the end of the archive; the
//! `--source` is checked against the archive after the directory (and again against the plan),
//! the slot created just before step 3 (and dropped again when 3-4 fail), and step 4 writes
//! `standby.signal` and the primary's connection settings instead.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use super::envfile;
use super::plan::{self, ChainCheck, PlanError, PlanOptions};
use super::standby::{self, SourceCheck, StandbyError, StandbyOptions};
use super::target::{
    describe_event, recovery_settings, RecoveryTarget, TargetAction, TargetTimeline,
};
use crate::archive::catalog::{self, BackupInfo, Listed};
use crate::archive::index::{PartialContent, WalIndex};
use crate::archive::memory::{ArchiveKind, MemoryPlan};
use crate::archive::meta::MetaError;
use crate::archive::{layout, read_wal_object, ArchiveMeta, ObjectInfo, Store, StoreError};
use crate::datadir::extract::{check_target_dir, map_tablespace, ExtractError};
use crate::datadir::manifest::{BackupManifest, ManifestError};
use crate::datadir::progress::Progress;
use crate::datadir::recovery::{append_auto_conf, write_signal, Signal};
use crate::datadir::tar::TarError;
use crate::datadir::unpack::{ArchiveUnpack, ManifestMismatch, UnpackError, Unpacker};
use crate::wal::history::HistoryError;
use crate::wal::xact::{ScanEnd, SegmentScan, WalEvent, WalScanner};
use crate::wal::{SegmentId, SegmentSize, Timeline, TimelineHistory};

#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub archive: String,
    pub pgdata: PathBuf,
    pub target: RecoveryTarget,
    pub inclusive: bool,
    pub timeline: TargetTimeline,
    pub action: TargetAction,
    pub backup: Option<String>,
    pub tablespace_mapping: Vec<(PathBuf, PathBuf)>,
    /// The walagent binary written into restore_command.
    pub walagent_path: PathBuf,
    pub dry_run: bool,
    pub progress: bool,
    /// `--jobs`: how many tar objects download and unpack at once (`None`: the number of CPUs,
    /// at most the number of objects).
    pub jobs: Option<usize>,
    /// `--standby`: seed a standby. The caller leaves `target` at the end of the archive and
    /// `timeline` at latest (the command line refuses others); the settings written ignore
    /// both.
    pub standby: Option<StandbyOptions>,
}

#[derive(Debug, Clone)]
pub struct RestorePlan {
    pub backup: BackupInfo,
    pub chain: ChainCheck,
    /// Why this backup: newer ones passed over and why.
    pub skipped: Vec<(String, String)>,
    /// Where the scan located the stop (time, xid, name targets).
    pub located: Option<WalEvent>,
    /// `--standby`: what the check of `--source` found (`None` inside: archive only).
    pub standby: Option<Option<SourceCheck>>,
}

#[derive(Debug, Clone)]
pub struct RestoreReport {
    pub plan: RestorePlan,
    pub files: u64,
    pub bytes: u64,
    pub settings: Vec<(&'static str, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// DIR or a tablespace target cannot be filled (checked before anything is written).
    #[error("{what}: {source}")]
    Dir {
        what: &'static str,
        #[source]
        source: ExtractError,
    },
    #[error("{0}")]
    Plan(#[from] PlanError),
    #[error("{0}")]
    Standby(#[from] StandbyError),
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The archive's `walagent.json` cannot be read.
    #[error("{0}")]
    Meta(#[source] MetaError),
    #[error("{location} is not a walagent archive (no {})", layout::META_KEY)]
    NotAnArchive { location: String },
    #[error("backup {id} is incomplete (interrupted or still running) and cannot be restored")]
    BackupIncomplete { id: String },
    #[error("backup {id} belongs to system {system}, but archive {location} holds WAL of system {archive_system}")]
    ForeignBackup {
        id: String,
        system: String,
        location: String,
        archive_system: u64,
    },
    #[error("backup {id} has {backup}-byte WAL segments, the archive {archive}")]
    SegmentSize {
        id: String,
        backup: u64,
        archive: u32,
    },
    #[error("archived WAL {name} is of system {system}, but the archive and its backups belong to system {archive_system}; the archive mixes clusters")]
    ForeignWal {
        name: String,
        system: u64,
        archive_system: u64,
    },
    #[error("segment {name} is not in the archive listing; this is a bug in walagent")]
    NotListed { name: String },
    /// Archived WAL that does not decode (the scanner's error).
    #[error("archived WAL {name}: {source}")]
    BadWal {
        name: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("archive object {key} is not a valid history file: {source}")]
    BadHistory {
        key: String,
        #[source]
        source: HistoryError,
    },
    #[error("backup {id}: its manifest {key} is missing")]
    ManifestMissing { id: String, key: String },
    #[error("backup {id}: manifest {key}: {source}")]
    BadManifest {
        id: String,
        key: String,
        #[source]
        source: Box<ManifestError>,
    },
    #[error("archive object {key} is missing")]
    ObjectMissing { key: String },
    /// A stored backup archive that does not decompress or read.
    #[error("archive object {key} is corrupt or unreadable: {source}")]
    Unreadable {
        key: String,
        #[source]
        source: io::Error,
    },
    /// A stored backup archive that is not a valid tar stream.
    #[error("archive object {key}: {source}")]
    BadTar {
        key: String,
        #[source]
        source: TarError,
    },
    /// A restored file does not match the backup manifest.
    #[error("{0}; the stored backup is damaged")]
    Mismatch(#[source] ManifestMismatch),
    #[error("{0}")]
    Extract(#[from] ExtractError),
    #[error("cannot write {what}: {source}")]
    Write {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("the extraction thread failed: {0}")]
    Worker(#[source] tokio::task::JoinError),
    #[error("restore cancelled; the files written so far were removed")]
    Cancelled,
    /// A listed object was gone when read (the archive changed while planning; retried).
    #[error("archive object {key} disappeared while planning (something is changing the archive)")]
    Vanished { key: String },
}

impl RestoreError {
    pub fn hint(&self) -> Option<String> {
        match self {
            RestoreError::Plan(e) => e.hint(),
            RestoreError::Standby(e) => e.hint(),
            RestoreError::Vanished { .. } => Some("run the restore again".into()),
            RestoreError::Store(e) => e.hint(),
            RestoreError::Meta(e) => e.hint(),
            RestoreError::Dir { source, .. } => source.hint(),
            RestoreError::Extract(e) => e.hint(),
            RestoreError::NotAnArchive { .. } => Some("check --archive".into()),
            RestoreError::BackupIncomplete { .. } => {
                Some("choose another with --backup or drop --backup".into())
            }
            RestoreError::ForeignBackup { .. } => {
                Some("an archive must hold one cluster (copy the backup to its own archive)".into())
            }
            RestoreError::BadWal { .. }
            | RestoreError::BadHistory { .. }
            | RestoreError::ManifestMissing { .. }
            | RestoreError::BadManifest { .. }
            | RestoreError::ObjectMissing { .. }
            | RestoreError::Unreadable { .. }
            | RestoreError::BadTar { .. }
            | RestoreError::Mismatch(_) => Some(
                "restore from another backup (--backup ID) or repair the object from a copy".into(),
            ),
            RestoreError::Write { .. } => {
                Some("check free space and permissions of the data directory".into())
            }
            _ => None,
        }
    }

    fn from_unpack(key: &str, e: UnpackError) -> RestoreError {
        match e {
            UnpackError::Tar(source) => RestoreError::BadTar {
                key: key.to_string(),
                source,
            },
            UnpackError::Extract(e) => RestoreError::Extract(e),
            UnpackError::Manifest(m) => RestoreError::Mismatch(m),
        }
    }
}

// ---- checks before writing --------------------------------------------------------------------

/// DIR (or a tablespace target) must be absent with an existing parent, or an empty writable
/// directory ([`check_target_dir`]); nothing is created yet.
fn check_dir(path: &Path, what: &'static str) -> Result<(), RestoreError> {
    check_target_dir(path)
        .map(|_| ())
        .map_err(|source| RestoreError::Dir { what, source })
}

// ---- planning ---------------------------------------------------------------------------------

/// Archived WAL segment objects: (timeline, segno, partial) -> key.
struct WalKeys {
    keys: HashMap<(Timeline, u64, bool), String>,
}

impl WalKeys {
    fn new(objects: &[ObjectInfo], size: SegmentSize) -> WalKeys {
        let mut keys = HashMap::new();
        for o in objects {
            if let Some(layout::WalObject::Segment { id, partial, .. }) =
                layout::parse_wal_key(&o.key, size)
            {
                keys.insert((id.timeline, id.segno, partial), o.key.clone());
            }
        }
        WalKeys { keys }
    }

    fn get(&self, id: SegmentId, partial: bool) -> Option<&String> {
        self.keys.get(&(id.timeline, id.segno, partial))
    }
}

/// Reads archived segments for planning and scans them ([`crate::wal::xact`]), keeping the last
/// two read (a backward scan reads each segment's successor again to finish a record that
/// crosses into it).
struct WalReader<'a> {
    store: &'a dyn Store,
    keys: WalKeys,
    size: SegmentSize,
    system_identifier: u64,
    cache: Vec<(CacheKey, Arc<Vec<u8>>)>,
}

/// A segment and whether its `.partial` was read.
type CacheKey = (SegmentId, bool);

impl WalReader<'_> {
    async fn read(&mut self, id: SegmentId, partial: bool) -> Result<Arc<Vec<u8>>, RestoreError> {
        if let Some((_, b)) = self.cache.iter().find(|(k, _)| *k == (id, partial)) {
            return Ok(b.clone());
        }
        let key = self
            .keys
            .get(id, partial)
            .cloned()
            .ok_or_else(|| RestoreError::NotListed {
                name: format!(
                    "{}{}",
                    id.file_name(self.size),
                    if partial { ".partial" } else { "" }
                ),
            })?;
        let bytes = Arc::new(
            read_wal_object(self.store, &key)
                .await?
                .ok_or(RestoreError::Vanished { key })?,
        );
        if self.cache.len() >= 2 {
            self.cache.remove(0);
        }
        self.cache.push(((id, partial), bytes.clone()));
        Ok(bytes)
    }

    /// Scans `id` with `scanner` (continuing its chain when `id` follows the segment it scanned
    /// last), as a `.partial`'s content when `partial`.
    async fn scan(
        &mut self,
        scanner: &mut WalScanner,
        id: SegmentId,
        partial: bool,
    ) -> Result<SegmentScan, RestoreError> {
        let bytes = self.read(id, partial).await?;
        let start = id.start_lsn(self.size);
        let name = || {
            format!(
                "{}{}",
                id.file_name(self.size),
                if partial { ".partial" } else { "" }
            )
        };
        let scan = if partial {
            scanner.scan_partial(start, &bytes)
        } else {
            scanner.scan(start, &bytes)
        }
        .map_err(|e| RestoreError::BadWal {
            name: name(),
            source: Box::new(e),
        })?;
        if let Some(sys) = scan.system_identifier {
            if sys != self.system_identifier {
                return Err(RestoreError::ForeignWal {
                    name: name(),
                    system: sys,
                    archive_system: self.system_identifier,
                });
            }
        }
        Ok(scan)
    }

    /// What the `.partial` that ends `chain` holds: its last complete record (taken from the
    /// segment before it when none completes in the partial itself) and where that ends.
    async fn partial_content(
        &mut self,
        chain: &ChainCheck,
    ) -> Result<PartialContent, RestoreError> {
        let n = chain.segments.len();
        let last = chain.segments[n - 1];
        let alone = self
            .scan(&mut WalScanner::new(self.size), last, true)
            .await?;
        if let (Some(r), Some(e)) = (alone.last_record, alone.last_record_end) {
            return Ok(PartialContent {
                last_record: Some(r),
                end: e,
            });
        }
        let start = last.start_lsn(self.size);
        if n < 2 {
            return Ok(PartialContent {
                last_record: None,
                end: start,
            });
        }
        // Nothing completes in the partial alone: read it after its predecessor, which may
        // carry a record into it, and otherwise holds the last complete record.
        let mut sc = WalScanner::new(self.size);
        let prev = self.scan(&mut sc, chain.segments[n - 2], false).await?;
        let p = self.scan(&mut sc, last, true).await?;
        Ok(PartialContent {
            last_record: p.last_record.or(prev.last_record),
            end: p.last_record_end.or(prev.last_record_end).unwrap_or(start),
        })
    }

    /// The events of `chain`'s segments, in WAL order, read backwards from its end until
    /// [`plan::scanned_enough`] says the stop for `target` is among them (or the chain's start
    /// is reached). A record crossing from one segment into the next is read whole.
    async fn scan_backwards(
        &mut self,
        chain: &ChainCheck,
        target: &RecoveryTarget,
        inclusive: bool,
    ) -> Result<Vec<WalEvent>, RestoreError> {
        let segs = &chain.segments;
        let is_partial = |i: usize| chain.ends_with_partial && i + 1 == segs.len();
        let mut scanned: Vec<Vec<WalEvent>> = Vec::new(); // newest segment first
        for i in (0..segs.len()).rev() {
            let mut sc = WalScanner::new(self.size);
            let scan = self.scan(&mut sc, segs[i], is_partial(i)).await?;
            let mut events = scan.events;
            if let (ScanEnd::SegmentEnd { continued: Some(_) }, Some(&next)) =
                (&scan.end, segs.get(i + 1))
            {
                let next_start = next.start_lsn(self.size);
                let more = self.scan(&mut sc, next, is_partial(i + 1)).await?;
                events.extend(more.events.into_iter().filter(|e| e.lsn < next_start));
            }
            let enough = plan::scanned_enough(target, inclusive, chain.consistent_at, &events);
            scanned.push(events);
            if enough {
                break;
            }
        }
        Ok(scanned.into_iter().rev().flatten().collect())
    }
}

/// [`plan::choose_backup`], first learning what the `.partial` ending the chosen chain holds
/// (then choosing again with it: the backup must be consistent, and the stop reached, within
/// what the archive really has).
async fn choose_learning<'b>(
    reader: &mut WalReader<'_>,
    index: &mut WalIndex,
    backups: &'b [BackupInfo],
    opts: &RestoreOptions,
    popts: &PlanOptions<'_>,
) -> Result<plan::Choice<'b>, RestoreError> {
    // Each round learns another partial; there are few (one per timeline end).
    for _ in 0..16 {
        let c = plan::choose_backup(backups, &opts.target, opts.timeline, index, popts)?;
        match c.chain.segments.last() {
            Some(&last) if c.chain.ends_with_partial && c.chain.partial_content.is_none() => {
                let content = reader.partial_content(&c.chain).await?;
                index.set_partial_content(last, content);
            }
            _ => return Ok(c),
        }
    }
    Ok(plan::choose_backup(
        backups,
        &opts.target,
        opts.timeline,
        index,
        popts,
    )?)
}

/// Loads the archive's listing and chooses the backup (see the module docs). Writes nothing.
/// The archive may change meanwhile (a running `walagent stream` replaces its `.partial` and
/// removes it once the segment is complete): when an object listed is gone, planning starts
/// again from a new listing.
pub async fn plan(opts: &RestoreOptions, store: &dyn Store) -> Result<RestorePlan, RestoreError> {
    let mut attempt = 1;
    loop {
        match plan_once(opts, store).await {
            Err(RestoreError::Vanished { key }) if attempt < 3 => {
                tracing::debug!("archive object {key} disappeared while planning; listing again");
                attempt += 1;
            }
            r => return r,
        }
    }
}

/// The archive's `walagent.json`; an archive without one is not a walagent archive.
async fn load_meta(store: &dyn Store) -> Result<ArchiveMeta, RestoreError> {
    ArchiveMeta::load(store)
        .await
        .map_err(RestoreError::Meta)?
        .ok_or_else(|| RestoreError::NotAnArchive {
            location: store.location(),
        })
}

async fn plan_once(opts: &RestoreOptions, store: &dyn Store) -> Result<RestorePlan, RestoreError> {
    let meta = load_meta(store).await?;
    let size = meta.wal_segment_size;
    let mut backups = Vec::new();
    for l in catalog::list(store).await? {
        match l {
            Listed::Complete(b) => backups.push(*b),
            Listed::Incomplete { id, .. } | Listed::Unreadable { id, .. } => {
                if opts.backup.as_deref() == Some(id.as_str()) {
                    return Err(RestoreError::BackupIncomplete { id });
                }
            }
        }
    }
    for b in &backups {
        let considered = opts.backup.is_none() || opts.backup.as_deref() == Some(b.id.as_str());
        if considered && b.system_identifier_u64() != Some(meta.system_identifier) {
            return Err(RestoreError::ForeignBackup {
                id: b.id.clone(),
                system: b.system_identifier.clone(),
                location: store.location(),
                archive_system: meta.system_identifier,
            });
        }
        if b.wal_segment_size != u64::from(size.bytes()) {
            return Err(RestoreError::SegmentSize {
                id: b.id.clone(),
                backup: b.wal_segment_size,
                archive: size.bytes(),
            });
        }
    }
    let objects = store.list(layout::WAL_PREFIX).await?;
    let mut index = WalIndex::from_objects(&objects, size);
    for tli in index.histories_to_load() {
        let key = layout::history_key(tli);
        if let Some(raw) = store.get_bytes(&key).await? {
            let h = TimelineHistory::parse(&raw).map_err(|source| RestoreError::BadHistory {
                key: key.clone(),
                source,
            })?;
            index.add_history(tli, h);
        }
    }
    let mut reader = WalReader {
        store,
        keys: WalKeys::new(&objects, size),
        size,
        system_identifier: meta.system_identifier,
        cache: Vec::new(),
    };
    let mut popts = PlanOptions {
        backup: opts.backup.as_deref(),
        allow_partial: true,
        located_stop: None,
    };
    let mut located = None;
    if matches!(
        opts.target,
        RecoveryTarget::Time(_) | RecoveryTarget::Xid(_) | RecoveryTarget::Name(_)
    ) {
        // A time before every backup became consistent needs no WAL read to refuse.
        if let RecoveryTarget::Time(_) = opts.target {
            if let Err(
                e @ (PlanError::TargetBeforeBackups { .. }
                | PlanError::BackupAfterTarget { .. }
                | PlanError::BackupNotFound { .. }
                | PlanError::NoBackups),
            ) = plan::choose_backup(&backups, &opts.target, opts.timeline, &index, &popts)
            {
                return Err(e.into());
            }
        }
        // The chain of the oldest usable backup covers the most WAL: scan it from its end.
        let oldest_chain = |index: &WalIndex| {
            plan::assess(&backups, &RecoveryTarget::End, opts.timeline, index, &popts)
                .into_iter()
                .rev()
                .filter(|(b, _)| popts.backup.is_none_or(|id| b.id == id))
                .find_map(|(_, r)| r.ok())
        };
        let mut chain = oldest_chain(&index);
        if let Some(c) = &chain {
            if let (true, None, Some(&last)) =
                (c.ends_with_partial, c.partial_content, c.segments.last())
            {
                let content = reader.partial_content(c).await?;
                index.set_partial_content(last, content);
                chain = oldest_chain(&index);
            }
        }
        let Some(chain) = chain else {
            // No backup has a usable chain: let the planner explain why.
            let c = choose_learning(&mut reader, &mut index, &backups, opts, &popts).await?;
            return Ok(RestorePlan {
                backup: c.backup.clone(),
                chain: c.chain,
                skipped: Vec::new(),
                located: None,
                standby: None,
            });
        };
        let events = reader
            .scan_backwards(&chain, &opts.target, opts.inclusive)
            .await?;
        let found = plan::locate_stop(&opts.target, opts.inclusive, &chain, &events)?;
        popts.located_stop = Some(found.lsn);
        located = Some(found);
    }
    let c = choose_learning(&mut reader, &mut index, &backups, opts, &popts).await?;
    Ok(RestorePlan {
        backup: c.backup.clone(),
        skipped: c
            .skipped
            .iter()
            .map(|(b, e)| (b.id.clone(), e.to_string()))
            .collect(),
        chain: c.chain,
        located,
        standby: None,
    })
}

/// One paragraph for the operator: what was chosen and why.
pub fn describe_plan(p: &RestorePlan, opts: &RestoreOptions) -> String {
    let mut s = format!(
        "backup {} (taken {} .. {}, consistent at {} on timeline {})",
        p.backup.id, p.backup.start_time, p.backup.stop_time, p.backup.end_lsn, p.backup.timeline
    );
    if p.skipped.is_empty() {
        s.push_str(if opts.backup.is_some() {
            ", as requested"
        } else if p.standby.is_some() {
            ", the newest complete backup"
        } else {
            ", the newest that can reach the target"
        });
    } else {
        s.push_str(", the newest that can reach the target; passed over:");
        for (id, why) in &p.skipped {
            s.push_str(&format!("\n  {id}: {why}"));
        }
    }
    s.push_str(&format!("\nWAL: {}", p.chain.summary()));
    if let Some(check) = &p.standby {
        s.push_str(&describe_standby(check.as_ref(), opts.dry_run));
        for w in &p.chain.warnings {
            s.push_str(&format!("\nnote: {w}"));
        }
        return s;
    }
    s.push_str(&format!(
        "\ntarget: {}{}",
        opts.target,
        if opts.target.takes_inclusive() {
            if opts.inclusive {
                " (inclusive)"
            } else {
                " (exclusive)"
            }
        } else {
            ""
        }
    ));
    if let Some(e) = &p.located {
        s.push_str(&format!("; recovery stops at the {}", describe_event(e)));
    }
    for w in &p.chain.warnings {
        s.push_str(&format!("\nnote: {w}"));
    }
    s
}

/// The standby lines of [`describe_plan`]; the source only as `display_safe` shows it.
fn describe_standby(check: Option<&SourceCheck>, dry_run: bool) -> String {
    let Some(c) = check else {
        return "\nstandby: replays the archive and keeps following it (standby.signal, no primary_conninfo)"
            .into();
    };
    let mut s = format!(
        "\nstandby: replays the archive, then streams from {} (system {}, timeline {}, at {})",
        c.source, c.system.system_identifier, c.system.timeline, c.system.xlogpos
    );
    if let Some(slot) = &c.slot {
        let state = match (slot.create, dry_run) {
            (true, true) => "would be created".to_string(),
            (true, false) => "created".to_string(),
            (false, _) => "existing".to_string(),
        };
        s.push_str(&format!("; slot {:?} ({state}", slot.name));
        if let Some(l) = slot.restart_lsn {
            s.push_str(&format!(", keeping WAL from {l}"));
        }
        s.push(')');
    }
    s
}

// ---- restoring --------------------------------------------------------------------------------

pub async fn restore(
    opts: &RestoreOptions,
    store: Arc<dyn Store>,
    cancel: watch::Receiver<bool>,
) -> Result<RestoreReport, RestoreError> {
    check_dir(&opts.pgdata, "data directory")?;
    // --source before planning: a foreign primary or a wrong slot is refused first.
    let source = opts.standby.as_ref().and_then(|s| s.source.as_ref());
    let mut check = match source {
        Some(src) => {
            let meta = load_meta(store.as_ref()).await?;
            Some(standby::check_source(src, meta.system_identifier).await?)
        }
        None => None,
    };
    let mut plan = plan(opts, store.as_ref()).await?;
    let end = standby::ArchiveEnd {
        wal_end: plan.chain.wal_end,
        segment_size: plan.chain.segment_size,
        target_timeline: plan.chain.target_timeline,
        last_timeline: plan
            .chain
            .segments
            .last()
            .map_or(plan.chain.target_timeline, |s| s.timeline),
    };
    if let (Some(src), Some(c)) = (source, &check) {
        standby::check_against_archive(src, c, &end).await?;
    }
    let manifest = prepare(opts, store.as_ref(), &plan).await?;
    if opts.dry_run {
        plan.standby = opts.standby.as_ref().map(|_| check);
        return Ok(RestoreReport {
            plan,
            files: 0,
            bytes: 0,
            settings: Vec::new(),
        });
    }
    // The slot keeps the primary's WAL from now on, while the backup is unpacked.
    let mut created = None;
    if let (Some(src), Some(c)) = (source, check.as_mut()) {
        let (slot, notes) = standby::prepare_slot(src, c, &end).await?;
        created = slot;
        for n in notes {
            tracing::warn!("{n}");
            plan.chain.warnings.push(n);
        }
    }
    plan.standby = opts.standby.as_ref().map(|_| check);
    let res = restore_planned(opts, store, plan, manifest, cancel).await;
    if let (Err(_), Some(src), Some(name)) = (&res, source, &created) {
        standby::drop_created_slot(src, name).await;
    }
    res
}

/// Checks that need the plan (tablespace targets) and the backup's manifest; writes nothing.
async fn prepare(
    opts: &RestoreOptions,
    store: &dyn Store,
    plan: &RestorePlan,
) -> Result<Option<(Bytes, BackupManifest)>, RestoreError> {
    for a in &plan.backup.archives {
        if let Some(loc) = &a.tablespace_location {
            check_dir(
                &map_tablespace(&opts.tablespace_mapping, Path::new(loc)),
                "tablespace directory",
            )?;
        }
    }
    Ok(match &plan.backup.manifest_key {
        Some(k) => {
            let raw = store
                .get_bytes(k)
                .await?
                .ok_or_else(|| RestoreError::ManifestMissing {
                    id: plan.backup.id.clone(),
                    key: k.clone(),
                })?;
            let m = BackupManifest::parse(&raw).map_err(|e| RestoreError::BadManifest {
                id: plan.backup.id.clone(),
                key: k.clone(),
                source: Box::new(e),
            })?;
            Some((raw, m))
        }
        None => None,
    })
}

async fn restore_planned(
    opts: &RestoreOptions,
    store: Arc<dyn Store>,
    plan: RestorePlan,
    manifest: Option<(Bytes, BackupManifest)>,
    mut cancel: watch::Receiver<bool>,
) -> Result<RestoreReport, RestoreError> {
    // Removes everything written again unless kept.
    let mut unpacker = Unpacker::create(&opts.pgdata, opts.tablespace_mapping.clone())?;
    let (files, bytes, settings) =
        restore_into(opts, &store, &plan, manifest, &mut unpacker, &mut cancel).await?;
    unpacker.keep();
    Ok(RestoreReport {
        plan,
        files,
        bytes,
        settings,
    })
}

/// `'...'` for /bin/sh.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

async fn restore_into(
    opts: &RestoreOptions,
    store: &Arc<dyn Store>,
    plan: &RestorePlan,
    manifest: Option<(Bytes, BackupManifest)>,
    unpacker: &mut Unpacker,
    cancel: &mut watch::Receiver<bool>,
) -> Result<(u64, u64, Vec<(&'static str, String)>), RestoreError> {
    if let Some((_, m)) = &manifest {
        unpacker.expect_manifest(m);
    }
    let progress = Arc::new(Progress::with_total(opts.progress, plan.backup.data_bytes));
    // Every target is prepared before anything is written: the tablespace directories first,
    // then the main archive's extractor, which registers them, so that its `pg_tblspc/<oid>`
    // links are accepted and it never writes through them (see datadir::unpack). Once all are
    // prepared, the objects can be filled in any order, several at once: each extractor writes
    // only under its own root, and the manifest checks are shared.
    let mut archives: Vec<&catalog::TarArchive> = plan.backup.archives.iter().collect();
    archives.sort_by_key(|a| a.tablespace_oid.is_none());
    let mut work = Vec::with_capacity(archives.len());
    for a in &archives {
        let feeder = match (a.tablespace_oid, &a.tablespace_location) {
            (Some(oid), Some(loc)) => unpacker.tablespace(oid, Path::new(loc))?,
            _ => unpacker.main_archive(),
        };
        work.push((a.key.clone(), a.stored_bytes, feeder));
    }
    // The largest first: the restore ends when the last object does.
    work.sort_by_key(|(_, stored, _)| std::cmp::Reverse(*stored));
    // The budget (`--memory-limit`) for this archive's kind: each job's queues, and how many
    // jobs fit unless `--jobs` says.
    let mem = crate::archive::memory::plan_for(ArchiveKind::of(&opts.archive));
    let jobs = restore_jobs(opts.jobs, work.len(), &mem);
    tracing::debug!(
        objects = work.len(),
        jobs,
        "restoring the backup's tar objects"
    );
    let sizes = JobSizes::of(&mem);
    let (files, bytes) = extract_all(store, work, jobs, sizes, &progress, cancel).await?;
    progress.finish();
    unpacker.finish_checks().map_err(RestoreError::Mismatch)?;

    let pgdata = unpacker.pgdata().to_path_buf();
    let write = |what: String| move |source| RestoreError::Write { what, source };
    if let Some((raw, _)) = &manifest {
        let p = pgdata.join("backup_manifest");
        unpacker
            .write_file("backup_manifest", raw)
            .map_err(write(p.display().to_string()))?;
    }
    // restore_command: wal-fetch on the same archive, working for the server's OS user.
    let mut cmd = format!(
        "{} wal-fetch --archive {}",
        sh_quote(&opts.walagent_path.to_string_lossy()),
        sh_quote(&opts.archive)
    );
    if crate::archive::is_remote(&opts.archive) {
        let env_path = unpacker
            .write_file(
                "walagent-restore.env",
                envfile::render(std::env::vars()).as_bytes(),
            )
            .map_err(write(
                pgdata.join("walagent-restore.env").display().to_string(),
            ))?;
        cmd.push_str(&format!(
            " --env-file {}",
            sh_quote(&env_path.to_string_lossy())
        ));
    }
    if plan.chain.ends_with_partial {
        cmd.push_str(" --allow-partial");
    }
    cmd.push_str(" %f %p");
    let (settings, header, signal, other) = match &opts.standby {
        None => (
            recovery_settings(
                &opts.target,
                opts.inclusive,
                opts.timeline,
                opts.action,
                &cmd,
            ),
            format!(
                "Written by walagent restore: backup {}, target {}",
                plan.backup.id, opts.target
            ),
            // A backup of a standby carries standby.signal; this is a targeted recovery.
            Signal::Recovery,
            Signal::Standby,
        ),
        Some(s) => {
            // No target: replay everything, follow the newest timeline, then stream.
            let mut settings = recovery_settings(
                &RecoveryTarget::End,
                true,
                TargetTimeline::Latest,
                TargetAction::Promote,
                &cmd,
            );
            settings.extend(standby::connection_settings(s.source.as_ref()));
            (
                settings,
                format!(
                    "Written by walagent restore --standby: backup {}",
                    plan.backup.id
                ),
                Signal::Standby,
                Signal::Recovery,
            )
        }
    };
    append_auto_conf(&pgdata, &settings, &header).map_err(write("postgresql.auto.conf".into()))?;
    unpacker.chown(&pgdata.join("postgresql.auto.conf"));
    let _ = fs::remove_file(pgdata.join(other.file_name()));
    let path = write_signal(&pgdata, signal).map_err(write(signal.file_name().into()))?;
    unpacker.chown(&path);
    Ok((files, bytes, settings))
}

/// How many objects to fill at once: `--jobs`, or the number of CPUs capped by the memory
/// plan (an explicit `--jobs` wins, as `--compress-threads` does for a backup); never more
/// than the objects, at least one.
fn restore_jobs(requested: Option<usize>, objects: usize, mem: &MemoryPlan) -> usize {
    let n = requested.unwrap_or_else(|| {
        mem.cap_restore_jobs(
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
        )
    });
    n.min(objects).max(1)
}

/// A restore job's queue sizes, from the memory plan (`MemoryPlan::restore_job_bytes`).
#[derive(Debug, Clone, Copy)]
struct JobSizes {
    /// Downloaded pieces queued before the decoder.
    queue: usize,
    /// Decompressed piece size.
    piece: usize,
    /// Decompressed pieces queued before the unpacker.
    pieces_in_flight: usize,
}

impl JobSizes {
    fn of(mem: &MemoryPlan) -> JobSizes {
        JobSizes {
            queue: mem.restore_queue.max(1),
            piece: mem.restore_piece.max(4096),
            pieces_in_flight: mem.restore_pieces_in_flight.max(1),
        }
    }
}

/// Small download pieces (an S3 body arrives in frames of a few KiB) are joined up to this
/// size before they go to the decoder thread: one wakeup per piece, and the queue's bound in
/// pieces is a bound in bytes (a local archive's reads are 1 MiB already).
const DOWNLOAD_PIECE: usize = 256 << 10;

/// Fills the objects, at most `jobs` at once (each streams its object through a bounded
/// channel, so memory grows with `jobs`, not with the objects' sizes). The first failure (or a
/// cancel) stops the others, and this returns only once every extraction thread has ended, so
/// that the caller's [`Unpacker`] removes a directory nothing writes into any more.
async fn extract_all(
    store: &Arc<dyn Store>,
    work: Vec<(String, u64, ArchiveUnpack)>,
    jobs: usize,
    sizes: JobSizes,
    progress: &Arc<Progress>,
    cancel: &mut watch::Receiver<bool>,
) -> Result<(u64, u64), RestoreError> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut pending = work.into_iter();
    let mut running = tokio::task::JoinSet::new();
    let mut failed: Option<RestoreError> = None;
    let mut cancel_seen = false;
    let (mut files, mut bytes) = (0u64, 0u64);
    loop {
        while failed.is_none() && running.len() < jobs {
            let Some((key, _, feeder)) = pending.next() else {
                break;
            };
            let compressed = key.ends_with(".zst");
            running.spawn(extract_object(
                store.clone(),
                key,
                compressed,
                feeder,
                sizes,
                progress.clone(),
                stop_rx.clone(),
            ));
        }
        let done = tokio::select! {
            biased;
            _ = cancel.changed(), if !cancel_seen => {
                cancel_seen = true;
                failed.get_or_insert(RestoreError::Cancelled);
                let _ = stop_tx.send(true);
                continue;
            }
            d = running.join_next() => d,
        };
        let res = match done {
            None => break,
            Some(Ok(r)) => r,
            Some(Err(e)) => Err(RestoreError::Worker(e)),
        };
        match res {
            Ok((f, b)) => {
                files += f;
                bytes += b;
            }
            Err(e) => {
                // The first failure is the one reported; the others stop (as cancelled).
                if failed.is_none() {
                    failed = Some(e);
                    let _ = stop_tx.send(true);
                }
            }
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok((files, bytes)),
    }
}

/// Chunks of one stored object; `Err` when the download failed (the caller returns that
/// error itself, the reader only stops).
type Chunk = Result<Bytes, DownloadFailed>;

/// Sent to the extraction thread when the download failed.
#[derive(Debug)]
struct DownloadFailed;

/// Reads a channel of chunks as a byte stream (on the extraction thread).
struct ChannelReader {
    rx: mpsc::Receiver<Chunk>,
    cur: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.cur = b,
                Some(Err(DownloadFailed)) => return Err(io::Error::other("the download failed")),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        bytes::Buf::advance(&mut self.cur, n);
        Ok(n)
    }
}

/// Downloads `key` and unpacks it with `feeder` on a blocking thread; returns (files, bytes).
/// `cancel` is set when the restore is cancelled or another object failed.
async fn extract_object(
    store: Arc<dyn Store>,
    key: String,
    compressed: bool,
    feeder: ArchiveUnpack,
    sizes: JobSizes,
    progress: Arc<Progress>,
    mut cancel: watch::Receiver<bool>,
) -> Result<(u64, u64), RestoreError> {
    let opened = tokio::select! {
        biased;
        _ = cancel.changed() => return Err(RestoreError::Cancelled),
        r = store.open_reader(&key) => r,
    };
    let mut reader = opened?.ok_or_else(|| RestoreError::ObjectMissing { key: key.clone() })?;
    let (tx, rx) = mpsc::channel::<Chunk>(sizes.queue);
    let key_owned = key.clone();
    let worker = tokio::task::spawn_blocking(move || {
        unpack(
            ChannelReader {
                rx,
                cur: Bytes::new(),
            },
            compressed,
            feeder,
            sizes,
            &key_owned,
            &progress,
        )
    });
    let mut download_err = None;
    let mut joined = bytes::BytesMut::new();
    loop {
        let next = tokio::select! {
            biased;
            _ = cancel.changed() => {
                drop(tx);
                let _ = worker.await;
                return Err(RestoreError::Cancelled);
            }
            n = reader.next_chunk() => n,
        };
        match next {
            Ok(Some(c)) => {
                let piece = if joined.is_empty() && c.len() >= DOWNLOAD_PIECE {
                    c
                } else {
                    if joined.is_empty() {
                        joined.reserve(DOWNLOAD_PIECE);
                    }
                    joined.extend_from_slice(&c);
                    if joined.len() < DOWNLOAD_PIECE {
                        continue;
                    }
                    joined.split().freeze()
                };
                if tx.send(Ok(piece)).await.is_err() {
                    break; // the worker stopped; its error says why
                }
            }
            Ok(None) => {
                if !joined.is_empty() {
                    let _ = tx.send(Ok(joined.split().freeze())).await;
                }
                break;
            }
            Err(e) => {
                // Stops the worker; the download error itself is what is returned.
                let _ = tx.send(Err(DownloadFailed)).await;
                download_err = Some(e);
                break;
            }
        }
    }
    drop(tx);
    let res = worker.await.map_err(RestoreError::Worker)?;
    if let Some(e) = download_err {
        return Err(e.into());
    }
    res
}

/// Decompresses (when `compressed`) and unpacks one object. A compressed object is decompressed
/// on a second thread, so that zstd and the file writes overlap as `zstd -dc | tar -x` does;
/// that thread is scoped, it has ended when this returns.
fn unpack(
    mut input: ChannelReader,
    compressed: bool,
    mut feeder: ArchiveUnpack,
    sizes: JobSizes,
    key: &str,
    progress: &Progress,
) -> Result<(u64, u64), RestoreError> {
    let unreadable = |source: io::Error| RestoreError::Unreadable {
        key: key.to_string(),
        source,
    };
    let mut feed = |data: Bytes| -> Result<(), RestoreError> {
        let content = feeder
            .feed(data)
            .map_err(|e| RestoreError::from_unpack(key, e))?;
        progress.add(content);
        Ok(())
    };
    if compressed {
        let (tx, rx) = std::sync::mpsc::sync_channel::<io::Result<Bytes>>(sizes.pieces_in_flight);
        std::thread::scope(|s| {
            s.spawn(move || decode(input, sizes.piece, &tx));
            // Returning early drops `rx`: the decoder's next send fails and it stops.
            for piece in rx {
                feed(piece.map_err(unreadable)?)?;
            }
            Ok::<(), RestoreError>(())
        })?;
    } else {
        // The downloaded chunks are the tar stream: fed as they are, without a copy.
        loop {
            if input.cur.is_empty() {
                match input.rx.blocking_recv() {
                    Some(Ok(b)) => input.cur = b,
                    Some(Err(DownloadFailed)) => {
                        return Err(unreadable(io::Error::other("the download failed")))
                    }
                    None => break,
                }
            }
            feed(std::mem::take(&mut input.cur))?;
        }
    }
    let stats = feeder
        .finish()
        .map_err(|e| RestoreError::from_unpack(key, e))?;
    Ok((stats.files, stats.bytes))
}

/// The decompressing thread: zstd pieces of `piece` bytes into `tx`, then its end (by dropping
/// `tx`), or the error that stopped it. Stops when the receiver is gone.
fn decode(input: ChannelReader, piece: usize, tx: &std::sync::mpsc::SyncSender<io::Result<Bytes>>) {
    let mut dec = match zstd::stream::read::Decoder::new(input) {
        Ok(d) => d,
        Err(e) => {
            let _ = tx.send(Err(e));
            return;
        }
    };
    // Reused once the unpacker has dropped the pieces it was given (BytesMut::reserve).
    let mut buf = bytes::BytesMut::with_capacity(piece * 2);
    loop {
        buf.resize(piece, 0);
        let n = match dec.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        buf.truncate(n);
        if tx.send(Ok(buf.split().freeze())).is_err() {
            return;
        }
        buf.reserve(piece);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quoting() {
        assert_eq!(sh_quote("/usr/bin/walagent"), "'/usr/bin/walagent'");
        assert_eq!(sh_quote("it's"), "'it'\\''s'");
    }

    #[test]
    fn target_dir_checks_write_nothing() {
        let t = tempfile::tempdir().unwrap();
        assert!(check_dir(&t.path().join("new"), "data directory").is_ok());
        assert!(!t.path().join("new").exists());
        let e = check_dir(&t.path().join("a/b"), "data directory").unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        fs::write(t.path().join("f"), "x").unwrap();
        let e = check_dir(t.path(), "data directory").unwrap_err();
        assert!(e.to_string().contains("not empty (found f)"), "{e}");
        let e = check_dir(&t.path().join("f"), "data directory").unwrap_err();
        assert!(e.to_string().contains("not a directory"), "{e}");
    }

    mod wal_reading {
        use super::super::*;
        use crate::archive::local::LocalStore;
        use crate::archive::PutMode;
        use crate::restore::plan::{PathStep, TimelinePath};
        use crate::wal::synth::WalBuilder;
        use crate::wal::timeline::tl;
        use crate::wal::Lsn;

        const MB: u64 = 1 << 20;
        const SYSID: u64 = 0x0123_4567_89AB_CDEF;
        const T0: i64 = 848_646_900_000_000;

        fn seg1m() -> SegmentSize {
            SegmentSize::new(MB).unwrap()
        }

        /// Segment 3 complete, segment 4 only as a raw `.partial` of `partial_len` bytes; a
        /// commit (xid 11) starts 16 bytes before segment 3 ends and finishes in the partial.
        async fn archive(partial_len: usize) -> (tempfile::TempDir, LocalStore, Lsn, Lsn) {
            let start = Lsn(3 * MB);
            let mut b = WalBuilder::new(SYSID, seg1m(), 1, start);
            b.push_commit(10, T0);
            b.fill_until(start.0 + MB - 16);
            let cross = b.push_commit(11, T0 + 1_000_000);
            let after = b.push_commit(12, T0 + 2_000_000);
            let bytes = b.into_bytes();
            let dir = tempfile::tempdir().unwrap();
            let store = LocalStore::open(dir.path()).unwrap();
            let (s3, s4) = bytes.split_at(MB as usize);
            for (k, d) in [
                ("wal/000000010000000000000003", s3),
                (
                    "wal/000000010000000000000004.partial",
                    &s4[..partial_len.min(s4.len())],
                ),
            ] {
                store
                    .put_bytes(k, Bytes::copy_from_slice(d), PutMode::Replace)
                    .await
                    .unwrap();
            }
            (dir, store, cross, after)
        }

        fn chain() -> ChainCheck {
            let segments = vec![SegmentId::new(tl(1), 3), SegmentId::new(tl(1), 4)];
            ChainCheck {
                backup_id: "b".into(),
                segment_size: seg1m(),
                target_timeline: tl(1),
                path: TimelinePath {
                    steps: vec![PathStep {
                        timeline: tl(1),
                        begin: Lsn(3 * MB),
                        end: None,
                    }],
                },
                first_segment_name: segments[0].file_name(seg1m()),
                end_segment_name: segments[1].file_name(seg1m()),
                segments,
                ends_with_partial: true,
                consistent_at: Lsn(3 * MB + 0x100),
                stop_lsn: None,
                wal_end: Lsn(5 * MB),
                partial_content: None,
                warnings: Vec::new(),
            }
        }

        async fn reader(store: &LocalStore) -> WalReader<'_> {
            let objects = store.list("wal/").await.unwrap();
            WalReader {
                store,
                keys: WalKeys::new(&objects, seg1m()),
                size: seg1m(),
                system_identifier: SYSID,
                cache: Vec::new(),
            }
        }

        #[tokio::test]
        async fn a_commit_crossing_into_the_partial_is_found() {
            let (_d, store, cross, after) = archive(usize::MAX).await;
            let mut r = reader(&store).await;
            let ch = chain();
            let events = r
                .scan_backwards(&ch, &RecoveryTarget::Xid(11), true)
                .await
                .unwrap();
            assert_eq!(
                events
                    .iter()
                    .map(|e| (e.lsn, e.kind.xid()))
                    .collect::<Vec<_>>(),
                // Segment 3's own commit, the one crossing into the partial, the partial's.
                vec![
                    (Lsn(3 * MB + 40), Some(10)),
                    (cross, Some(11)),
                    (after, Some(12))
                ]
            );
            let stop = plan::locate_stop(&RecoveryTarget::Xid(11), true, &ch, &events).unwrap();
            assert_eq!(stop.lsn, cross);
            // The partial's own last record.
            let c = r.partial_content(&ch).await.unwrap();
            assert_eq!(c.last_record, Some(after));
            assert_eq!(c.end, Lsn(after.0 + 34));
        }

        #[tokio::test]
        async fn a_partial_holding_only_a_records_tail() {
            // 40 (long header) + the rest of the crossing commit (34 - 16 = 18) bytes.
            let (_d, store, cross, _) = archive(58).await;
            let mut r = reader(&store).await;
            let c = r.partial_content(&chain()).await.unwrap();
            assert_eq!(c.last_record, Some(cross));
            assert_eq!(c.end, Lsn(4 * MB + 58));
            // Empty: the last complete record is in segment 3, before the crossing one.
            let (_d, store, cross, _) = archive(0).await;
            let mut r = reader(&store).await;
            let c = r.partial_content(&chain()).await.unwrap();
            assert!(c.last_record.unwrap() < cross);
            assert!(c.end <= cross);
            // A time target after the last commit found: refused, not a size error.
            let ch = chain();
            let t = RecoveryTarget::Time("2030-01-01 00:00:00Z".parse().unwrap());
            let events = r.scan_backwards(&ch, &t, true).await.unwrap();
            let e = plan::locate_stop(&t, true, &ch, &events).unwrap_err();
            assert!(matches!(e, PlanError::NoCommitAfter { .. }), "{e}");
        }
    }
}
