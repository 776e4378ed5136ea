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
//! 3. Restore: stream each tar object out of the store, decompress and unpack it on a blocking
//!    thread while the next chunk downloads, checking every file's size and CRC-32C against the
//!    backup manifest as it is written. Tablespaces first, then the main directory (whose
//!    `pg_tblspc` links point at them).
//! 4. Write `recovery.signal` and the recovery settings into `postgresql.auto.conf`, with a
//!    `restore_command` that runs `walagent wal-fetch` on the same archive. For S3 the AWS
//!    settings go into a 0600 file beside them (`--env-file`), so the server's OS user needs no
//!    exported variables. On any failure in 3-4, everything written is removed again.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use super::envfile;
use super::plan::{self, ChainCheck, PartialContent, PlanError, PlanOptions, WalIndex};
use super::recovery_conf::{append_auto_conf, write_signal, Signal};
use super::target::{
    describe_event, recovery_settings, RecoveryTarget, TargetAction, TargetTimeline,
};
use crate::archive::{layout, read_wal_object, ArchiveMeta, ObjectInfo, Store, StoreError};
use crate::backup::catalog::{self, BackupInfo, Listed};
use crate::backup::extract::{
    check_target_dir, chown_to as chown, map_tablespace, prepare_target_dir, remove_written,
    target_owner as owner_for, write_private_file, ExtractError, ExtractOptions, Extractor,
};
use crate::backup::manifest::BackupManifest;
use crate::backup::progress::Progress;
use crate::backup::tarstream::{EntryKind, TarEvent, TarParser};
use crate::wal::xact::{ScanEnd, SegmentScan, WalEvent, WalScanner};
use crate::wal::{SegmentId, SegmentSize, TimelineHistory};

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
}

#[derive(Debug, Clone)]
pub struct RestorePlan {
    pub backup: BackupInfo,
    pub chain: ChainCheck,
    /// Why this backup: newer ones passed over and why.
    pub skipped: Vec<(String, String)>,
    /// Where the scan located the stop (time, xid, name targets).
    pub located: Option<WalEvent>,
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
    #[error("{0}")]
    Dir(String),
    #[error("{0}")]
    Plan(#[from] PlanError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Archive(String),
    #[error("{0}")]
    Extract(#[from] ExtractError),
    #[error("{0}")]
    Corrupt(String),
    #[error("{0}")]
    Io(String),
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
            RestoreError::Vanished { .. } => Some("run the restore again".into()),
            RestoreError::Store(e) => e.hint(),
            RestoreError::Corrupt(_) => Some(
                "restore from another backup (--backup ID) or repair the object from a copy".into(),
            ),
            _ => None,
        }
    }
}

// ---- checks before writing --------------------------------------------------------------------

/// DIR (or a tablespace target) must be absent with an existing parent, or an empty writable
/// directory ([`check_target_dir`]); nothing is created yet.
fn check_dir(path: &Path, what: &str) -> Result<(), RestoreError> {
    check_target_dir(path)
        .map(|_| ())
        .map_err(|e| RestoreError::Dir(format!("{what}: {e}")))
}

// ---- planning ---------------------------------------------------------------------------------

/// Archived WAL segment objects: (timeline, segno, partial) -> key.
struct WalKeys {
    keys: HashMap<(u32, u64, bool), String>,
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
        let key = self.keys.get(id, partial).cloned().ok_or_else(|| {
            RestoreError::Archive(format!(
                "segment {}{} is not in the archive listing; this is a bug in walagent",
                id.file_name(self.size),
                if partial { ".partial" } else { "" }
            ))
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
        .map_err(|e| RestoreError::Corrupt(format!("archived WAL {}: {e}", name())))?;
        if let Some(sys) = scan.system_identifier {
            if sys != self.system_identifier {
                return Err(RestoreError::Archive(format!(
                    "archived WAL {} is of system {sys}, but the archive and its backups belong to system {}; the archive mixes clusters",
                    name(),
                    self.system_identifier
                )));
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

async fn plan_once(opts: &RestoreOptions, store: &dyn Store) -> Result<RestorePlan, RestoreError> {
    let meta = ArchiveMeta::load(store)
        .await
        .map_err(|e| RestoreError::Archive(e.to_string()))?
        .ok_or_else(|| {
            RestoreError::Archive(format!(
                "{} is not a walagent archive (no {}); check --archive",
                store.location(),
                layout::META_KEY
            ))
        })?;
    let size = meta.wal_segment_size;
    let mut backups = Vec::new();
    for l in catalog::list(store).await? {
        match l {
            Listed::Complete(b) => backups.push(*b),
            Listed::Incomplete { id, .. } | Listed::Unreadable { id, .. } => {
                if opts.backup.as_deref() == Some(id.as_str()) {
                    return Err(RestoreError::Archive(format!(
                        "backup {id} is incomplete (interrupted or still running) and cannot be restored; choose another with --backup or drop --backup"
                    )));
                }
            }
        }
    }
    for b in &backups {
        let considered = opts.backup.is_none() || opts.backup.as_deref() == Some(b.id.as_str());
        if considered && b.system_identifier_u64() != Some(meta.system_identifier) {
            return Err(RestoreError::Archive(format!(
                    "backup {} belongs to system {}, but archive {} holds WAL of system {}; an archive must hold one cluster (copy the backup to its own archive)",
                    b.id,
                    b.system_identifier,
                    store.location(),
                    meta.system_identifier
                )));
        }
        if b.wal_segment_size != u64::from(size.bytes()) {
            return Err(RestoreError::Archive(format!(
                "backup {} has {}-byte WAL segments, the archive {}",
                b.id,
                b.wal_segment_size,
                size.bytes()
            )));
        }
    }
    let objects = store.list(layout::WAL_PREFIX).await?;
    let mut index = WalIndex::from_objects(&objects, size);
    for tli in index.histories_to_load() {
        let key = layout::history_key(tli);
        if let Some(raw) = store.get_bytes(&key).await? {
            let h = TimelineHistory::parse(&raw).map_err(|e| {
                RestoreError::Corrupt(format!(
                    "archive object {key} is not a valid history file: {e}"
                ))
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

// ---- restoring --------------------------------------------------------------------------------

pub async fn restore(
    opts: &RestoreOptions,
    store: Arc<dyn Store>,
    mut cancel: watch::Receiver<bool>,
) -> Result<RestoreReport, RestoreError> {
    check_dir(&opts.pgdata, "data directory")?;
    let plan = plan(opts, store.as_ref()).await?;
    for a in &plan.backup.archives {
        if let Some(loc) = &a.tablespace_location {
            check_dir(
                &map_tablespace(&opts.tablespace_mapping, Path::new(loc)),
                "tablespace directory",
            )?;
        }
    }
    let manifest = match &plan.backup.manifest_key {
        Some(k) => {
            let raw = store.get_bytes(k).await?.ok_or_else(|| {
                RestoreError::Corrupt(format!(
                    "backup {}: its manifest {k} is missing",
                    plan.backup.id
                ))
            })?;
            let m = BackupManifest::parse(&raw).map_err(|e| {
                RestoreError::Corrupt(format!("backup {}: manifest {k}: {e}", plan.backup.id))
            })?;
            Some((raw, m))
        }
        None => None,
    };
    if opts.dry_run {
        return Ok(RestoreReport {
            plan,
            files: 0,
            bytes: 0,
            settings: Vec::new(),
        });
    }

    let created = prepare_target_dir(&opts.pgdata)?;
    let pgdata = fs::canonicalize(&opts.pgdata)
        .map_err(|e| RestoreError::Io(format!("cannot resolve {}: {e}", opts.pgdata.display())))?;
    let owner = owner_for(&pgdata, created);
    let mut written: Vec<(PathBuf, bool)> = vec![(pgdata.clone(), created)];
    let res = restore_into(
        opts,
        &store,
        &plan,
        manifest,
        &pgdata,
        owner,
        &mut written,
        &mut cancel,
    )
    .await;
    match res {
        Ok((files, bytes, settings)) => Ok(RestoreReport {
            plan,
            files,
            bytes,
            settings,
        }),
        Err(e) => {
            for (dir, created) in written.iter().rev() {
                remove_written(dir, *created);
            }
            Err(e)
        }
    }
}

/// `'...'` for /bin/sh.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

#[allow(clippy::too_many_arguments)]
async fn restore_into(
    opts: &RestoreOptions,
    store: &Arc<dyn Store>,
    plan: &RestorePlan,
    manifest: Option<(Bytes, BackupManifest)>,
    pgdata: &Path,
    owner: Option<(u32, u32)>,
    written: &mut Vec<(PathBuf, bool)>,
    cancel: &mut watch::Receiver<bool>,
) -> Result<(u64, u64, Vec<(&'static str, String)>), RestoreError> {
    let checks = Arc::new(ManifestChecks::new(manifest.as_ref().map(|(_, m)| m)));
    let progress = Arc::new(Progress::with_total(opts.progress, plan.backup.data_bytes));
    let ex_opts = ExtractOptions {
        tablespace_mapping: opts.tablespace_mapping.clone(),
        owner,
    };
    // Tablespaces first, then the main directory, whose links point at them.
    let mut archives: Vec<&catalog::TarArchive> = plan.backup.archives.iter().collect();
    archives.sort_by_key(|a| a.tablespace_oid.is_none());
    let mut tablespaces: Vec<(u32, PathBuf)> = Vec::new();
    let (mut files, mut bytes) = (0u64, 0u64);
    for a in archives {
        let (root, prefix) = match (a.tablespace_oid, &a.tablespace_location) {
            (Some(oid), Some(loc)) => {
                let target = map_tablespace(&opts.tablespace_mapping, Path::new(loc));
                let created = prepare_target_dir(&target)?;
                written.push((target.clone(), created));
                tablespaces.push((oid, target.clone()));
                (target, format!("pg_tblspc/{oid}/"))
            }
            _ => (pgdata.to_path_buf(), String::new()),
        };
        let mut ex = Extractor::new(&root, ex_opts.clone());
        if a.tablespace_oid.is_none() {
            for (oid, t) in &tablespaces {
                ex.register_tablespace(*oid, t.clone());
            }
        }
        let (f, b) = extract_object(
            store.clone(),
            &a.key,
            a.key.ends_with(".zst"),
            ex,
            prefix,
            checks.clone(),
            progress.clone(),
            cancel,
        )
        .await?;
        files += f;
        bytes += b;
    }
    progress.finish();
    checks.all_seen()?;

    let io = |what: String, e: io::Error| RestoreError::Io(format!("{what}: {e}"));
    if let Some((raw, _)) = &manifest {
        let p = pgdata.join("backup_manifest");
        write_private_file(&p, raw).map_err(|e| io(format!("cannot write {}", p.display()), e))?;
        chown(&p, owner);
    }
    // restore_command: wal-fetch on the same archive, working for the server's OS user.
    let mut cmd = format!(
        "{} wal-fetch --archive {}",
        sh_quote(&opts.walagent_path.to_string_lossy()),
        sh_quote(&opts.archive)
    );
    if crate::archive::is_remote(&opts.archive) {
        let env_path = pgdata.join("walagent-restore.env");
        write_private_file(&env_path, envfile::render(std::env::vars()).as_bytes())
            .map_err(|e| io(format!("cannot write {}", env_path.display()), e))?;
        chown(&env_path, owner);
        cmd.push_str(&format!(
            " --env-file {}",
            sh_quote(&env_path.to_string_lossy())
        ));
    }
    if plan.chain.ends_with_partial {
        cmd.push_str(" --allow-partial");
    }
    cmd.push_str(" %f %p");
    let settings = recovery_settings(
        &opts.target,
        opts.inclusive,
        opts.timeline,
        opts.action,
        &cmd,
    );
    append_auto_conf(
        pgdata,
        &settings,
        &format!(
            "Written by walagent restore: backup {}, target {}",
            plan.backup.id, opts.target
        ),
    )
    .map_err(|e| io("cannot write postgresql.auto.conf".into(), e))?;
    chown(&pgdata.join("postgresql.auto.conf"), owner);
    // A backup of a standby carries standby.signal; this is a targeted recovery.
    let _ = fs::remove_file(pgdata.join("standby.signal"));
    let signal = write_signal(pgdata, Signal::Recovery)
        .map_err(|e| io("cannot write recovery.signal".into(), e))?;
    chown(&signal, owner);
    Ok((files, bytes, settings))
}

/// Chunks of one stored object, or the error that stopped the download.
type Chunk = Result<Bytes, String>;

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
                Some(Err(e)) => return Err(io::Error::other(e)),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        bytes::Buf::advance(&mut self.cur, n);
        Ok(n)
    }
}

/// Downloads `key` and unpacks it with `ex` on a blocking thread; returns (files, bytes).
#[allow(clippy::too_many_arguments)]
async fn extract_object(
    store: Arc<dyn Store>,
    key: &str,
    compressed: bool,
    ex: Extractor,
    manifest_prefix: String,
    checks: Arc<ManifestChecks>,
    progress: Arc<Progress>,
    cancel: &mut watch::Receiver<bool>,
) -> Result<(u64, u64), RestoreError> {
    let mut reader = store
        .open_reader(key)
        .await?
        .ok_or_else(|| RestoreError::Corrupt(format!("archive object {key} is missing")))?;
    let (tx, rx) = mpsc::channel::<Chunk>(8);
    let key_owned = key.to_string();
    let worker = tokio::task::spawn_blocking(move || {
        unpack(
            ChannelReader {
                rx,
                cur: Bytes::new(),
            },
            compressed,
            ex,
            &key_owned,
            &manifest_prefix,
            &checks,
            &progress,
        )
    });
    let mut download_err = None;
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
                if tx.send(Ok(c)).await.is_err() {
                    break; // the worker stopped; its error says why
                }
            }
            Ok(None) => break,
            Err(e) => {
                let _ = tx.send(Err(e.to_string())).await;
                download_err = Some(e);
                break;
            }
        }
    }
    drop(tx);
    let res = worker
        .await
        .map_err(|e| RestoreError::Io(format!("the extraction thread failed: {e}")))?;
    if let Some(e) = download_err {
        return Err(e.into());
    }
    res
}

fn unpack(
    input: ChannelReader,
    compressed: bool,
    mut ex: Extractor,
    key: &str,
    prefix: &str,
    checks: &ManifestChecks,
    progress: &Progress,
) -> Result<(u64, u64), RestoreError> {
    let corrupt = |e: io::Error| {
        RestoreError::Corrupt(format!(
            "archive object {key} is corrupt or unreadable: {e}"
        ))
    };
    let mut src: Box<dyn Read> = if compressed {
        Box::new(zstd::stream::read::Decoder::new(input).map_err(corrupt)?)
    } else {
        Box::new(input)
    };
    let mut parser = TarParser::new();
    let mut events = Vec::new();
    let mut cur: Option<(String, bool, u32, u64)> = None; // path, checked file, crc, size
    let mut buf = vec![0u8; 1 << 20];
    let handle = |events: &mut Vec<TarEvent>,
                  ex: &mut Extractor,
                  cur: &mut Option<(String, bool, u32, u64)>|
     -> Result<(), RestoreError> {
        for ev in events.drain(..) {
            match &ev {
                TarEvent::Entry { meta, .. } => {
                    let file = matches!(meta.kind, EntryKind::File);
                    *cur = Some((format!("{prefix}{}", meta.path), file, 0, 0));
                }
                TarEvent::Data(d) => {
                    if let Some((_, true, crc, size)) = cur {
                        *crc = crc32c::crc32c_append(*crc, d);
                        *size += d.len() as u64;
                    }
                    progress.add(d.len() as u64);
                }
                TarEvent::EntryEnd { .. } => {
                    if let Some((path, true, crc, size)) = cur.take() {
                        checks.check(&path, size, crc)?;
                    }
                }
                TarEvent::Trailer(_) => {}
            }
            ex.handle(ev)?;
        }
        Ok(())
    };
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(corrupt(e)),
        };
        parser
            .feed(Bytes::copy_from_slice(&buf[..n]), &mut events)
            .map_err(|e| RestoreError::Corrupt(format!("archive object {key}: {e}")))?;
        handle(&mut events, &mut ex, &mut cur)?;
    }
    parser
        .finish(&mut events)
        .map_err(|e| RestoreError::Corrupt(format!("archive object {key}: {e}")))?;
    handle(&mut events, &mut ex, &mut cur)?;
    let stats = ex.finish()?;
    Ok((stats.files, stats.bytes))
}

/// Per-file size and CRC-32C from the backup manifest, checked as files are written.
struct ManifestChecks {
    /// path -> (size, expected CRC-32C when the manifest has one)
    files: BTreeMap<String, (u64, Option<u32>)>,
    seen: std::sync::Mutex<std::collections::HashSet<String>>,
    enabled: bool,
}

impl ManifestChecks {
    fn new(m: Option<&BackupManifest>) -> ManifestChecks {
        let mut files = BTreeMap::new();
        if let Some(m) = m {
            for f in &m.files {
                files.insert(f.path_lossy(), (f.size, f.crc32c()));
            }
        }
        ManifestChecks {
            files,
            seen: Default::default(),
            enabled: m.is_some(),
        }
    }

    fn check(&self, path: &str, size: u64, crc: u32) -> Result<(), RestoreError> {
        if !self.enabled {
            return Ok(());
        }
        let Some((want_size, want_crc)) = self.files.get(path) else {
            // pg_wal contents and a few server-made files are not in the manifest.
            return Ok(());
        };
        if *want_size != size {
            return Err(RestoreError::Corrupt(format!(
                "file {path} of the backup has {size} bytes, the backup manifest says {want_size}; the stored backup is damaged"
            )));
        }
        if let Some(w) = want_crc {
            if *w != crc {
                return Err(RestoreError::Corrupt(format!(
                    "file {path} of the backup fails its manifest checksum (CRC-32C {crc:08x}, expected {w:08x}); the stored backup is damaged"
                )));
            }
        }
        if let Ok(mut s) = self.seen.lock() {
            s.insert(path.to_string());
        }
        Ok(())
    }

    fn all_seen(&self) -> Result<(), RestoreError> {
        if !self.enabled {
            return Ok(());
        }
        let seen = self.seen.lock().map(|s| s.clone()).unwrap_or_default();
        if let Some(missing) = self.files.keys().find(|p| !seen.contains(*p)) {
            return Err(RestoreError::Corrupt(format!(
                "file {missing} is listed in the backup manifest but missing from the stored backup"
            )));
        }
        Ok(())
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
        use crate::wal::Lsn;

        const MB: u64 = 1 << 20;
        const SYSID: u64 = 0x0123_4567_89AB_CDEF;
        const T0: i64 = 848_646_900_000_000;

        fn seg1m() -> SegmentSize {
            SegmentSize::new(MB).unwrap()
        }

        fn commit(b: &mut WalBuilder, xid: u32, time_us: i64) -> Lsn {
            let mut p = vec![255u8, 8];
            p.extend_from_slice(&time_us.to_le_bytes());
            b.push(1, 0x00, xid, &p)
        }

        /// Filler records up to `target` (within the segment, more than a header before a
        /// page end).
        fn fill_until(b: &mut WalBuilder, target: u64) {
            loop {
                let mut pos = (b.position().0 + 7) & !7;
                if pos.is_multiple_of(8192) {
                    pos += if pos.is_multiple_of(MB) { 40 } else { 24 };
                }
                if pos == target {
                    return;
                }
                let page_end = (pos / 8192 + 1) * 8192;
                let len = if target < page_end {
                    target - pos - 24
                } else {
                    (page_end - pos).saturating_sub(24)
                };
                b.push(10, 0, 1, &vec![3; len as usize]);
            }
        }

        /// Segment 3 complete, segment 4 only as a raw `.partial` of `partial_len` bytes; a
        /// commit (xid 11) starts 16 bytes before segment 3 ends and finishes in the partial.
        async fn archive(partial_len: usize) -> (tempfile::TempDir, LocalStore, Lsn, Lsn) {
            let start = Lsn(3 * MB);
            let mut b = WalBuilder::new(SYSID, seg1m(), 1, start);
            commit(&mut b, 10, T0);
            fill_until(&mut b, start.0 + MB - 16);
            let cross = commit(&mut b, 11, T0 + 1_000_000);
            let after = commit(&mut b, 12, T0 + 2_000_000);
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
            let segments = vec![SegmentId::new(1, 3), SegmentId::new(1, 4)];
            ChainCheck {
                backup_id: "b".into(),
                segment_size: seg1m(),
                target_timeline: 1,
                path: TimelinePath {
                    steps: vec![PathStep {
                        timeline: 1,
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
