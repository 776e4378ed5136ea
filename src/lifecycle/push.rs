//! `walagent wal-push --archive A %p`: PostgreSQL's `archive_command`.
//!
//! PostgreSQL's archiver runs archive_command in the data directory for every file it marks
//! `.ready` in `pg_wal/archive_status` and passes its path as `%p` (`pg_wal/<name>`). Four kinds
//! of names arrive (xlog.c, xlogarchive.c `XLogArchiveNotify`):
//!
//! - complete segments `000000010000000000000003`;
//! - timeline history files `00000002.history` (written at a promotion, archived first);
//! - backup history files `000000010000000000000002.00000028.backup` (written by
//!   `pg_backup_stop`; recovery never reads them);
//! - `<segment>.partial`: after a promotion in the middle of a segment, the old timeline's last
//!   segment, renamed (a full-size file whose WAL ends where the old timeline ended).
//!
//! Each is checked before anything is stored (the segment's pages and records with the verifier
//! of `walagent stream`, its long page header against the archive's `walagent.json`) and stored
//! with the stream's rules ([`crate::archive::segment`]): never overwritten, identical WAL already
//! archived (by the stream or an earlier push, in any encoding) is success, different WAL is a
//! refusal naming the object. Exit 0 only once the object is durable (PostgreSQL then recycles
//! the file); every failure exits 1, so PostgreSQL logs the one-line error, keeps the file and
//! retries (an exit status above 125 would make its archiver process exit instead, which helps
//! nothing). Decisions and their reasons: `proto-notes/wal-push.md`.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use crate::archive::layout::{self, history_key, segment_key_by_name, META_KEY};
use crate::archive::meta::MetaError;
use crate::archive::segment::{self, compare_partial, PartialCompare};
use crate::archive::{
    self, ArchiveMeta, Compression, Detail, LocalStore, OpenError, PutMode, Store, StoreError,
};
use crate::wal::page::PageHeader;
use crate::wal::verify::{check_page_timelines, SegmentChecker, VerifyParams};
use crate::wal::xact::{scan_segment, ScanEnd};
use crate::wal::{
    history_file_name, parse_history_file_name, Lsn, SegmentId, SegmentSize, Timeline,
    TimelineHistory,
};

/// Largest history or backup history file taken (PostgreSQL's are a few hundred bytes).
const MAX_SMALL_FILE: u64 = 1 << 20;

/// One `wal-push` call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushOptions {
    /// The `--archive` value, as given.
    pub archive: String,
    /// `%p`: the file, relative to the working directory (the data directory) or absolute.
    pub path: PathBuf,
    /// How new segments are stored (as `walagent stream --compress`).
    pub compression: Compression,
}

/// What kind of file a name is (the names PostgreSQL archives, upper-case hex as it writes them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WalFileName {
    /// A complete segment; the 24 hex digits.
    Segment(String),
    /// `<segment>.partial`; the segment's 24 hex digits.
    Partial(String),
    History(Timeline),
    /// `<segment>.<offset>.backup`: the 24 hex digits of the backup's start segment (its
    /// timeline is the stop timeline) and the start's offset in that segment.
    BackupHistory {
        segment: String,
        offset: u32,
    },
}

fn is_upper_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
}

fn is_segment_name(s: &str) -> bool {
    s.len() == 24 && is_upper_hex(s) && !s.starts_with("00000000")
}

/// Parses a file name PostgreSQL hands archive_command; `None` for anything else.
pub fn parse_name(name: &str) -> Option<WalFileName> {
    if is_segment_name(name) {
        return Some(WalFileName::Segment(name.to_string()));
    }
    if let Some(base) = name.strip_suffix(".partial") {
        return is_segment_name(base).then(|| WalFileName::Partial(base.to_string()));
    }
    if let Some(tli) = parse_history_file_name(name) {
        return (history_file_name(tli) == name).then_some(WalFileName::History(tli));
    }
    let (seg, off) = name.strip_suffix(".backup")?.split_once('.')?;
    if is_segment_name(seg) && off.len() == 8 && is_upper_hex(off) {
        let offset = u32::from_str_radix(off, 16).ok()?;
        return Some(WalFileName::BackupHistory {
            segment: seg.to_string(),
            offset,
        });
    }
    None
}

/// How a push ended (all of them exit 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pushed {
    /// Stored now under `key`.
    Stored { key: String },
    /// The archive already held the same content under `key`.
    AlreadyArchived { key: String },
    /// A `.partial` whose WAL the archive's `.partial` under `key` already holds, and more.
    ArchivedHoldsMore { key: String },
    /// A `.partial` whose WAL the complete segment under `key` already holds.
    CoveredBySegment { key: String },
    /// A `.partial` that holds all of the archived one under `key` and more: it replaced it.
    Replaced { key: String },
    /// A backup history file whose name `key` already holds other content (two backups that
    /// started at the same position): the archived one is kept, see the module docs.
    KeptDifferentBackupHistory { key: String },
}

impl Pushed {
    /// One line for the log.
    pub fn describe(&self, path: &Path) -> String {
        let p = path.display();
        match self {
            Pushed::Stored { key } => format!("archived {p} as {key}"),
            Pushed::AlreadyArchived { key } => {
                format!("{p} is already archived as {key} with the same content; nothing to do")
            }
            Pushed::ArchivedHoldsMore { key } => format!(
                "{p} is already archived: {key} holds the same WAL and more; kept it"
            ),
            Pushed::CoveredBySegment { key } => format!(
                "{p} is already archived: the complete segment {key} holds its WAL"
            ),
            Pushed::Replaced { key } => {
                format!("archived {p} as {key}, replacing a shorter partial segment with the same WAL")
            }
            Pushed::KeptDifferentBackupHistory { key } => format!(
                "{key} already holds another backup history file of the same start position; kept it and did not store {p} (recovery never reads backup history files)"
            ),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("{path}: not a file name PostgreSQL archives (expected a WAL segment like 000000010000000000000003, a timeline history file like 00000002.history, a <segment>.partial or a backup history file <segment>.<offset>.backup)")]
    BadName { path: String },
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: io::Error,
    },
    /// The file is not the WAL its name says, or damaged.
    #[error("{path} is not a valid {what}, nothing archived: {detail}")]
    BadFile {
        path: String,
        what: &'static str,
        #[source]
        detail: Detail,
    },
    /// The file belongs to another cluster than the archive's, or the archive's metadata is
    /// unusable.
    #[error("{path}: {source}")]
    Meta {
        path: String,
        #[source]
        source: MetaError,
    },
    #[error("refusing to archive {path}: archive object {key} in {archive} already holds different content under this name; nothing was overwritten")]
    Conflict {
        path: String,
        key: String,
        archive: String,
    },
    #[error("archive {archive} has no {META_KEY} yet, and no WAL segment in {dir} says which cluster {path} belongs to")]
    NoIdentity {
        archive: String,
        dir: String,
        path: String,
    },
    #[error("archiving {path} into {archive}: {source}")]
    Store {
        path: String,
        archive: String,
        #[source]
        source: StoreError,
    },
    #[error("{0}")]
    Open(#[from] OpenError),
}

impl PushError {
    /// The fix, for the `hint:` part of the error line.
    pub fn hint(&self) -> Option<String> {
        match self {
            PushError::BadName { .. } => Some(
                "archive_command must pass %p, the path of the file: archive_command = 'walagent wal-push --archive ARCHIVE %p'"
                    .into(),
            ),
            PushError::Read { source, .. } if source.kind() == io::ErrorKind::NotFound => Some(
                "archive_command must pass %p (the path relative to the data directory, where PostgreSQL runs it), not %f; run it by hand from the data directory to check"
                    .into(),
            ),
            PushError::Read { .. } => Some(
                "the file must be readable by the user PostgreSQL runs archive_command as".into(),
            ),
            PushError::BadFile { .. } => Some(
                "the file in pg_wal is damaged or not what its name says; PostgreSQL keeps it and retries, so check the server's storage (and its log) before anything else"
                    .into(),
            ),
            PushError::Meta { source, .. } => match source {
                MetaError::SystemMismatch { .. } | MetaError::SegmentSizeMismatch { .. } => Some(
                    "point --archive at this cluster's own archive; an archive holds the WAL of one cluster only"
                        .into(),
                ),
                e => e.hint(),
            },
            PushError::Conflict { .. } => Some(
                "the archive holds other WAL (or another file) under this name: another cluster's, or a timeline that diverged; compare the two (walagent wal-fetch) and move the wrong one out of the archive, PostgreSQL keeps the file and retries until then"
                    .into(),
            ),
            PushError::NoIdentity { .. } => Some(
                "push a WAL segment of this cluster first (or start walagent stream on the archive), so that walagent.json names the cluster"
                    .into(),
            ),
            PushError::Store { source, .. } => source.hint(),
            PushError::Open(e) => e.hint(),
        }
    }

    /// The process exit status: 1 for every failure (PostgreSQL keeps the file and retries).
    pub fn exit_code(&self) -> u8 {
        1
    }
}

/// Opens the archive without the listings and checks a long-running command affords: a local
/// directory that exists is opened as is (no sweep for stale temp files), a missing one is
/// created; an S3 archive is not probed (the first request names a missing bucket).
async fn open_store(spec: &str) -> Result<Arc<dyn Store>, PushError> {
    if archive::is_remote(spec) {
        let location: archive::s3::S3Location = spec.parse().map_err(OpenError::Location)?;
        let store = archive::s3::S3Store::open(location, archive::s3::S3Options::default())
            .await
            .map_err(OpenError::S3)?;
        return Ok(Arc::new(store));
    }
    let path = Path::new(spec);
    let store = if path.is_dir() {
        LocalStore::open_existing(path)
    } else {
        LocalStore::open(path)
    };
    store
        .map(|s| Arc::new(s) as Arc<dyn Store>)
        .map_err(|source| {
            PushError::Open(OpenError::Local {
                spec: spec.to_string(),
                source,
            })
        })
}

/// Runs one `wal-push`.
pub async fn run(opts: &PushOptions) -> Result<Pushed, PushError> {
    let path_s = opts.path.display().to_string();
    let name = opts
        .path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| PushError::BadName {
            path: path_s.clone(),
        })?;
    let kind = parse_name(name).ok_or_else(|| PushError::BadName {
        path: path_s.clone(),
    })?;
    // Before the archive is opened (a local one is created when missing): a missing %p must
    // not leave an empty archive behind.
    if let Err(source) = tokio::fs::metadata(&opts.path).await {
        return Err(PushError::Read {
            path: path_s,
            source,
        });
    }
    let store = open_store(&opts.archive).await?;
    push(store.as_ref(), &opts.path, &kind, opts.compression).await
}

/// Pushes the file at `path` (named `kind`) into `store`.
pub async fn push(
    store: &dyn Store,
    path: &Path,
    kind: &WalFileName,
    compression: Compression,
) -> Result<Pushed, PushError> {
    let ctx = Ctx {
        store,
        path,
        path_s: path.display().to_string(),
    };
    match kind {
        WalFileName::Segment(name) => ctx.segment(name, compression).await,
        WalFileName::Partial(name) => ctx.partial(name, compression).await,
        WalFileName::History(tli) => ctx.history(*tli).await,
        WalFileName::BackupHistory { segment, offset } => {
            ctx.backup_history(segment, *offset).await
        }
    }
}

/// What a segment file's first page and size say.
struct SegmentFile {
    size: SegmentSize,
    id: SegmentId,
    system_identifier: u64,
    server_major: Option<u32>,
}

struct Ctx<'a> {
    store: &'a dyn Store,
    path: &'a Path,
    path_s: String,
}

impl Ctx<'_> {
    fn bad(&self, what: &'static str, detail: impl Into<Detail>) -> PushError {
        PushError::BadFile {
            path: self.path_s.clone(),
            what,
            detail: detail.into(),
        }
    }

    fn store_err(&self, source: StoreError) -> PushError {
        match source {
            StoreError::Conflict { key } => self.conflict(key),
            source => PushError::Store {
                path: self.path_s.clone(),
                archive: self.store.location(),
                source,
            },
        }
    }

    fn conflict(&self, key: String) -> PushError {
        PushError::Conflict {
            path: self.path_s.clone(),
            key,
            archive: self.store.location(),
        }
    }

    fn meta_err(&self, source: MetaError) -> PushError {
        PushError::Meta {
            path: self.path_s.clone(),
            source,
        }
    }

    async fn read(&self, limit: u64, what: &'static str) -> Result<Vec<u8>, PushError> {
        self.file_len(limit, what).await?;
        tokio::fs::read(self.path)
            .await
            .map_err(|e| self.read_err(e))
    }

    /// The file's length, once it is known to be a regular file of at most `limit` bytes.
    async fn file_len(&self, limit: u64, what: &'static str) -> Result<u64, PushError> {
        let md = tokio::fs::metadata(self.path)
            .await
            .map_err(|e| self.read_err(e))?;
        if !md.is_file() {
            return Err(self.bad(what, "it is not a regular file"));
        }
        if md.len() > limit {
            return Err(self.bad(
                what,
                format!("{} bytes is more than such a file holds", md.len()),
            ));
        }
        Ok(md.len())
    }

    /// Size, name and long page header of a segment file (complete or `.partial`).
    fn segment_file(&self, bytes: &[u8], len: u64, name: &str) -> Result<SegmentFile, PushError> {
        let what = "WAL segment";
        let size = SegmentSize::new(len).map_err(|_| {
            self.bad(
                what,
                format!(
                    "{len} bytes is not a WAL segment size (a power of two from 1 MiB to 1 GiB)"
                ),
            )
        })?;
        let id = SegmentId::parse_file_name(name, size).ok_or_else(|| {
            self.bad(
                what,
                format!("the segment number of {name} does not exist with {size} segments"),
            )
        })?;
        let long = match PageHeader::parse(bytes) {
            Some((_, Some(long))) => long,
            _ => {
                return Err(self.bad(
                    what,
                    "its first page has no long page header (xlp_info lacks XLP_LONG_HEADER)",
                ))
            }
        };
        if u64::from(long.seg_size) != len {
            return Err(self.bad(
                what,
                format!(
                    "its long page header says {} byte segments but the file has {len} bytes",
                    long.seg_size,
                ),
            ));
        }
        let server_major = PageHeader::parse(bytes).and_then(|(h, _)| h.server_major());
        Ok(SegmentFile {
            size,
            id,
            system_identifier: long.sysid,
            server_major,
        })
    }

    /// The archive's metadata, checked against the segment's system identifier and size;
    /// created from them for an archive without `walagent.json`.
    async fn meta_for(&self, f: &SegmentFile) -> Result<ArchiveMeta, PushError> {
        match ArchiveMeta::load(self.store)
            .await
            .map_err(|e| self.meta_err(e))?
        {
            Some(m) => {
                m.check_matches(f.system_identifier, f.size)
                    .map_err(|e| self.meta_err(e))?;
                Ok(m)
            }
            None => ArchiveMeta::ensure(
                self.store,
                f.system_identifier,
                f.size,
                f.server_major.unwrap_or(0) * 10000,
            )
            .await
            .map_err(|e| self.meta_err(e)),
        }
    }

    /// Checks the segment's bytes with the stream's verifier: `valid` bytes of WAL, the rest
    /// (zeros for a `.partial` cut short) taken as its end. Returns whether the WAL fills the
    /// segment, and the page timelines.
    fn verify(
        &self,
        f: &SegmentFile,
        bytes: &[u8],
        valid: usize,
    ) -> Result<(bool, Vec<(Timeline, Lsn)>), PushError> {
        let params = VerifyParams {
            system_identifier: f.system_identifier,
            segment_size: f.size,
            timeline: f.id.timeline,
        };
        let mut c = SegmentChecker::new(params, f.id.start_lsn(f.size));
        let what = "WAL segment";
        let (head, _) = bytes.split_at(valid.min(bytes.len()));
        c.update(head)
            .map_err(|e| self.bad(what, Detail::error(e)))?;
        c.update_zeros((bytes.len() - head.len()) as u64)
            .map_err(|e| self.bad(what, Detail::error(e)))?;
        let pages = c.timeline_pages().to_vec();
        let check = c.finish().map_err(|e| self.bad(what, Detail::error(e)))?;
        Ok((check.complete, pages))
    }

    /// Pages of an older timeline must lie before its switch point in the history of the
    /// segment's timeline (from the archive, else from beside the file).
    async fn check_timelines(
        &self,
        f: &SegmentFile,
        pages: &[(Timeline, Lsn)],
    ) -> Result<(), PushError> {
        if pages.iter().all(|&(t, _)| t == f.id.timeline) {
            return Ok(());
        }
        let key = history_key(f.id.timeline);
        let content = match self
            .store
            .get_bytes(&key)
            .await
            .map_err(|e| self.store_err(e))?
        {
            Some(b) => Some(b.to_vec()),
            None => {
                let local = self.path.with_file_name(history_file_name(f.id.timeline));
                tokio::fs::read(local).await.ok()
            }
        };
        let history = content.and_then(|c| TimelineHistory::parse(&c).ok());
        check_page_timelines(f.id.timeline, pages, history.as_ref())
            .map_err(|e| self.bad("WAL segment", Detail::error(e)))
    }

    /// A complete segment. The archive is looked at first: when it already holds exactly these
    /// bytes (the common case beside a running stream), they were checked when they were stored
    /// and nothing is written, so the WAL check is skipped. Otherwise the file is checked before
    /// anything else happens: a damaged file is reported as damaged (not as a conflict), and it
    /// never creates `walagent.json`.
    async fn segment(&self, name: &str, compression: Compression) -> Result<Pushed, PushError> {
        // Never the whole segment in memory: its first page and length, then the file in
        // pieces (compared with what is archived, then checked and compressed into a 0600 temp
        // file in one pass, which the store takes with put_file). See benches/README.md 14.4.
        let what = "WAL segment";
        let (head, len) = self.head(1 << 30, what).await?;
        let f = self.segment_file(&head, len, name)?;
        drop(head);
        let meta = ArchiveMeta::load(self.store)
            .await
            .map_err(|e| self.meta_err(e))?;
        if let Some(m) = &meta {
            m.check_matches(f.system_identifier, f.size)
                .map_err(|e| self.meta_err(e))?;
        }
        // Streamed: neither the archived object nor the file is held whole.
        let archived = segment::compare_archived_file(self.store, name, false, self.path)
            .await
            .map_err(|e| self.store_err(e))?;
        let archived_key = match archived {
            Some((key, true)) => return Ok(Pushed::AlreadyArchived { key }),
            Some((key, false)) => Some(key),
            None => None,
        };
        let tmp = PushTemp::new(name);
        // Encoded only when it may be stored.
        let out = archived_key.is_none().then_some(tmp.path.as_path());
        let (complete, pages) = self.check_and_encode(&f, len, out, compression).await?;
        if !complete {
            return Err(self.bad(
                what,
                "its WAL stops before the segment's end and zeros follow: not a complete segment (a file cut short?)",
            ));
        }
        self.check_timelines(&f, &pages).await?;
        if let Some(key) = archived_key {
            return Err(self.conflict(key));
        }
        if meta.is_none() {
            self.meta_for(&f).await?;
        }
        let key = segment_key_by_name(name, compression.is_compressed(), false);
        match segment::put_complete(
            self.store,
            &key,
            segment::Body::File(&tmp.path),
            segment::Raw::File(self.path),
        )
        .await
        .map_err(|e| self.store_err(e))?
        {
            segment::Stored::Put => Ok(Pushed::Stored { key }),
            segment::Stored::SameWal => Ok(Pushed::AlreadyArchived { key }),
        }
    }

    /// The file's first page (or all of it when shorter) and its length, after the checks of
    /// [`read`](Self::read).
    async fn head(&self, limit: u64, what: &'static str) -> Result<(Vec<u8>, u64), PushError> {
        let len = self.file_len(limit, what).await?;
        let path = self.path.to_path_buf();
        let head = tokio::task::spawn_blocking(move || -> io::Result<Vec<u8>> {
            use std::io::Read;
            let mut head = Vec::with_capacity(HEAD_BYTES);
            std::fs::File::open(&path)?
                .take(HEAD_BYTES as u64)
                .read_to_end(&mut head)?;
            Ok(head)
        })
        .await
        .map_err(|e| self.read_err(io::Error::other(e)))?
        .map_err(|e| self.read_err(e))?;
        Ok((head, len))
    }

    fn read_err(&self, source: io::Error) -> PushError {
        PushError::Read {
            path: self.path_s.clone(),
            source,
        }
    }

    /// One pass over the complete segment file of `len` bytes: checked with the stream's
    /// verifier piece by piece, and (when `out` is given) encoded into `out` (a new 0600 file)
    /// at the same time. Returns what [`verify`](Self::verify) returns.
    async fn check_and_encode(
        &self,
        f: &SegmentFile,
        len: u64,
        out: Option<&Path>,
        compression: Compression,
    ) -> Result<(bool, Vec<(Timeline, Lsn)>), PushError> {
        let params = VerifyParams {
            system_identifier: f.system_identifier,
            segment_size: f.size,
            timeline: f.id.timeline,
        };
        let checker = SegmentChecker::new(params, f.id.start_lsn(f.size));
        let (src, dst) = (self.path.to_path_buf(), out.map(Path::to_path_buf));
        let what = "WAL segment";
        let (pass, checker) = tokio::task::spawn_blocking(move || {
            let mut reader = CheckingReader {
                file: None,
                checker,
                wal_error: None,
                read: 0,
            };
            let pass = encode_pass(&src, len, &mut reader, dst.as_deref(), compression);
            (pass.map(|()| reader.read), reader)
        })
        .await
        .map_err(|e| self.read_err(io::Error::other(e)))?;
        if let Some(e) = checker.wal_error {
            return Err(self.bad(what, Detail::error(e)));
        }
        match pass {
            Ok(read) if read == len => {}
            Ok(read) => {
                return Err(self.bad(
                    what,
                    format!("the file changed while it was read ({read} bytes, {len} before)"),
                ))
            }
            Err(PassError::Read(e)) => return Err(self.read_err(e)),
            Err(PassError::Write(e)) => {
                return Err(self.store_err(StoreError::io("compressing WAL", e)))
            }
        }
        let c = checker.checker;
        let pages = c.timeline_pages().to_vec();
        let check = c.finish().map_err(|e| self.bad(what, Detail::error(e)))?;
        Ok((check.complete, pages))
    }

    /// A `.partial` from PostgreSQL is the whole segment file: valid WAL of the old timeline up
    /// to where it ended, then whatever the file held (zeros, or a recycled segment's old
    /// pages). The WAL part is what recovery would read (the lenient reading stops at the
    /// first invalid record or page); it is checked strictly, as the stream checks what it
    /// receives, and stored as the stream stores a `.partial`: only those bytes.
    async fn partial(&self, name: &str, compression: Compression) -> Result<Pushed, PushError> {
        let what = "partial WAL segment";
        let bytes = self.read(1 << 30, what).await?;
        let f = self.segment_file(&bytes, bytes.len() as u64, name)?;
        let start = f.id.start_lsn(f.size);
        let scan =
            scan_segment(&bytes, start, f.size).map_err(|e| self.bad(what, Detail::error(e)))?;
        let end = match scan.end {
            ScanEnd::Invalid { at, .. } => at.0.saturating_sub(start.0) as usize,
            _ => bytes.len(),
        };
        let valid = end.min(bytes.len());
        if valid <= crate::wal::page::SIZE_OF_LONG_PHD {
            return Err(self.bad(what, "it holds no valid WAL"));
        }
        let (_, pages) = self.verify(&f, &bytes, valid)?;
        self.check_timelines(&f, &pages).await?;
        self.meta_for(&f).await?;
        let wal = bytes.get(..valid).unwrap_or(&bytes);

        if let Some(seg) = segment::find_archived(self.store, name, false)
            .await
            .map_err(|e| self.store_err(e))?
        {
            return if seg.content.starts_with(wal) {
                Ok(Pushed::CoveredBySegment { key: seg.key })
            } else {
                Err(self.conflict(seg.key))
            };
        }
        // Twice at most: a writer that stores the partial between our look and our put.
        for _ in 0..2 {
            match segment::find_archived(self.store, name, true)
                .await
                .map_err(|e| self.store_err(e))?
            {
                Some(old) => {
                    return match compare_partial(&old.content, wal) {
                        PartialCompare::Identical => Ok(Pushed::AlreadyArchived { key: old.key }),
                        PartialCompare::ArchivedHoldsMore => {
                            Ok(Pushed::ArchivedHoldsMore { key: old.key })
                        }
                        PartialCompare::Different => Err(self.conflict(old.key)),
                        PartialCompare::NewHoldsMore => {
                            // Keep the encoding of the object being replaced.
                            let enc = if old.key.ends_with(layout::ZSTD_SUFFIX) {
                                match compression {
                                    Compression::None => Compression::DEFAULT,
                                    c => c,
                                }
                            } else {
                                Compression::None
                            };
                            let body = segment::encode(Bytes::copy_from_slice(wal), enc)
                                .await
                                .map_err(|e| self.store_err(e))?;
                            self.store
                                .put_bytes(&old.key, body, PutMode::Replace)
                                .await
                                .map_err(|e| self.store_err(e))?;
                            Ok(Pushed::Replaced { key: old.key })
                        }
                    };
                }
                None => {
                    let key = segment_key_by_name(name, compression.is_compressed(), true);
                    let body = segment::encode(Bytes::copy_from_slice(wal), compression)
                        .await
                        .map_err(|e| self.store_err(e))?;
                    match self.store.put_bytes(&key, body, PutMode::NoOverwrite).await {
                        Ok(()) => return Ok(Pushed::Stored { key }),
                        Err(StoreError::Conflict { .. }) => continue,
                        Err(e) => return Err(self.store_err(e)),
                    }
                }
            }
        }
        Err(self.conflict(segment_key_by_name(name, compression.is_compressed(), true)))
    }

    /// Puts a small raw file without overwriting. `Ok(None)`: stored; `Ok(Some(same))`: the key
    /// already held content, the same or not.
    async fn put_small(&self, key: &str, content: &[u8]) -> Result<Option<bool>, PushError> {
        for _ in 0..2 {
            if let Some(old) = self
                .store
                .get_bytes(key)
                .await
                .map_err(|e| self.store_err(e))?
            {
                return Ok(Some(old[..] == content[..]));
            }
            match self
                .store
                .put_bytes(key, Bytes::copy_from_slice(content), PutMode::NoOverwrite)
                .await
            {
                Ok(()) => return Ok(None),
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(self.store_err(e)),
            }
        }
        Ok(Some(false))
    }

    /// The archive's metadata for a file that does not name its cluster (history and backup
    /// history files): `walagent.json`, or for an archive without one, from a WAL segment beside
    /// the file in `pg_wal` (all of them are the cluster's).
    async fn meta_from_dir(&self) -> Result<ArchiveMeta, PushError> {
        if let Some(m) = ArchiveMeta::load(self.store)
            .await
            .map_err(|e| self.meta_err(e))?
        {
            return Ok(m);
        }
        let dir = match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let no_identity = || PushError::NoIdentity {
            archive: self.store.location(),
            dir: dir.display().to_string(),
            path: self.path_s.clone(),
        };
        let f = newest_local_segment(&dir).ok_or_else(no_identity)?;
        self.meta_for(&f).await
    }

    async fn history(&self, tli: Timeline) -> Result<Pushed, PushError> {
        let what = "timeline history file";
        let content = self.read(MAX_SMALL_FILE, what).await?;
        let h = TimelineHistory::parse(&content).map_err(|e| self.bad(what, Detail::error(e)))?;
        if h.entries.is_empty() {
            return Err(self.bad(what, "it lists no parent timeline"));
        }
        h.check_child(tli)
            .map_err(|e| self.bad(what, Detail::error(e)))?;
        self.meta_from_dir().await?;
        let key = history_key(tli);
        match self.put_small(&key, &content).await? {
            None => Ok(Pushed::Stored { key }),
            Some(true) => Ok(Pushed::AlreadyArchived { key }),
            Some(false) => Err(self.conflict(key)),
        }
    }

    async fn backup_history(&self, seg: &str, offset: u32) -> Result<Pushed, PushError> {
        let what = "backup history file";
        let content = self.read(MAX_SMALL_FILE, what).await?;
        let meta = self.meta_from_dir().await?;
        let size = meta.wal_segment_size;
        let id = SegmentId::parse_file_name(seg, size).ok_or_else(|| {
            self.bad(
                what,
                format!("the segment number of {seg} does not exist with {size} segments"),
            )
        })?;
        let start = backup_start_lsn(&content).map_err(|d| self.bad(what, d))?;
        let expect = id.start_lsn(size).0 + u64::from(offset);
        if start.0 != expect {
            return Err(self.bad(
                what,
                format!(
                    "its START WAL LOCATION {start} is not the position its name gives, {}",
                    Lsn(expect)
                ),
            ));
        }
        let name = self
            .path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let key = layout::backup_history_key(name);
        match self.put_small(&key, &content).await? {
            None => Ok(Pushed::Stored { key }),
            Some(true) => Ok(Pushed::AlreadyArchived { key }),
            Some(false) => Ok(Pushed::KeptDifferentBackupHistory { key }),
        }
    }
}

/// How much of a segment file [`Ctx::head`] reads: one WAL page (the long page header).
const HEAD_BYTES: usize = 8192;

/// A temp file beside nothing PostgreSQL or walagent reads (the system temp directory), 0600,
/// removed when dropped (the local store may have moved it into the archive already).
struct PushTemp {
    path: PathBuf,
}

impl PushTemp {
    fn new(name: &str) -> PushTemp {
        let seq = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        PushTemp {
            path: std::env::temp_dir().join(format!(
                "walagent-push-{name}.{}.{seq}.tmp",
                std::process::id()
            )),
        }
    }
}

impl Drop for PushTemp {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

enum PassError {
    Read(io::Error),
    Write(io::Error),
}

/// Reads the segment file and gives every piece to the checker on its way; a WAL error stops
/// the reading (kept in `wal_error`).
struct CheckingReader {
    file: Option<std::fs::File>,
    checker: SegmentChecker,
    wal_error: Option<crate::wal::verify::VerifyError>,
    read: u64,
}

impl io::Read for CheckingReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(file) = self.file.as_mut() else {
            return Ok(0);
        };
        let n = file.read(buf)?;
        let piece = buf.get(..n).unwrap_or_default();
        if let Err(e) = self.checker.update(piece) {
            self.wal_error = Some(e);
            return Err(io::Error::other("the WAL check failed"));
        }
        self.read += n as u64;
        Ok(n)
    }
}

/// Opens `src` into `reader` and streams it through it: into `dst` (zstd or as is) or, without
/// `dst`, nowhere (only checked).
fn encode_pass(
    src: &Path,
    len: u64,
    reader: &mut CheckingReader,
    dst: Option<&Path>,
    compression: Compression,
) -> Result<(), PassError> {
    reader.file = Some(std::fs::File::open(src).map_err(PassError::Read)?);
    // Read errors (and the WAL check's stop) come out of the reader; tell them from the
    // output's by whether the reader recorded them.
    let mut read_error = None;
    let result = {
        let mut r = ErrKeeper {
            inner: reader,
            err: &mut read_error,
        };
        match dst {
            None => io::copy(&mut r, &mut io::sink()).map(|_| ()),
            Some(dst) => {
                let mut out = archive::compress::create_private(dst).map_err(PassError::Write)?;
                match compression {
                    Compression::None => io::copy(&mut r, &mut out).map(|_| ()),
                    Compression::Zstd { level } => {
                        archive::compress::compress_streaming(&mut r, len, &mut out, level)
                            .map(|_| ())
                    }
                }
            }
        }
    };
    match (result, read_error) {
        (Ok(()), _) => Ok(()),
        (Err(_), Some(e)) => Err(PassError::Read(e)),
        // The reader stopped for the WAL check: reported from `wal_error`.
        (Err(_), None) if reader.wal_error.is_some() => Ok(()),
        // zstd's "source size differs from the pledged" is the file changing under us.
        (Err(e), None) if reader.read != len => Err(PassError::Read(e)),
        (Err(e), None) => Err(PassError::Write(e)),
    }
}

/// Keeps the reader's own I/O error aside.
struct ErrKeeper<'a> {
    inner: &'a mut CheckingReader,
    err: &'a mut Option<io::Error>,
}

impl io::Read for ErrKeeper<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.inner.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if self.inner.wal_error.is_none() => {
                    let kind = e.kind();
                    *self.err = Some(e);
                    return Err(io::Error::new(kind, "reading the segment failed"));
                }
                other => return other,
            }
        }
    }
}

/// `START WAL LOCATION: X/Y (file NAME)` of a backup history file.
fn backup_start_lsn(content: &[u8]) -> Result<Lsn, Detail> {
    let text = std::str::from_utf8(content).map_err(|_| Detail::from("it is not text"))?;
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("START WAL LOCATION: "))
        .ok_or_else(|| Detail::from("it has no START WAL LOCATION line"))?;
    let lsn = line.split_whitespace().next().unwrap_or_default();
    lsn.parse::<Lsn>()
        .map_err(|_| Detail::from(format!("START WAL LOCATION {lsn:?} is not an LSN")))
}

/// The newest segment file in `dir` (a `pg_wal`) whose first page is a valid long header.
fn newest_local_segment(dir: &Path) -> Option<SegmentFile> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| is_segment_name(n))
        .collect();
    names.sort_unstable_by(|a, b| b.cmp(a));
    names.into_iter().take(8).find_map(|n| {
        use std::io::Read as _;
        let path = dir.join(&n);
        let len = std::fs::metadata(&path).ok()?.len();
        let size = SegmentSize::new(len).ok()?;
        let mut first = vec![0u8; crate::wal::WAL_PAGE_SIZE as usize];
        std::fs::File::open(&path)
            .ok()?
            .read_exact(&mut first)
            .ok()?;
        let (h, long) = PageHeader::parse(&first)?;
        let long = long?;
        let id = SegmentId::parse_file_name(&n, size)?;
        (u64::from(long.seg_size) == len && h.pageaddr == id.start_lsn(size)).then_some(
            SegmentFile {
                size,
                id,
                system_identifier: long.sysid,
                server_major: h.server_major(),
            },
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::timeline::tl;

    #[test]
    fn names_postgres_archives() {
        let seg = "000000010000000000000003";
        assert_eq!(parse_name(seg), Some(WalFileName::Segment(seg.into())));
        assert_eq!(
            parse_name("0000000200000001000000FF.partial"),
            Some(WalFileName::Partial("0000000200000001000000FF".into()))
        );
        assert_eq!(
            parse_name("0000000A.history"),
            Some(WalFileName::History(tl(10)))
        );
        assert_eq!(
            parse_name("000000010000000000000002.00000028.backup"),
            Some(WalFileName::BackupHistory {
                segment: "000000010000000000000002".into(),
                offset: 0x28
            })
        );
        for bad in [
            "",
            "00000001000000000000000",
            "0000000100000000000000033",
            "00000001000000000000000a",
            "000000000000000000000003",
            "000000010000000000000003.zst",
            "000000010000000000000003.partial.zst",
            "000000010000000000000003.gz.partial",
            "0000000a.history",
            "00000000.history",
            "00000002.history.partial",
            "000000010000000000000002.0000028.backup",
            "000000010000000000000002.backup",
            "000000010000000000000002.0000002g.backup",
            "00000002.00000028.backup",
            "archive_status",
            "000000010000000000000003.ready",
            ".000000010000000000000003",
        ] {
            assert_eq!(parse_name(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn backup_history_start() {
        let content = b"START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n\
STOP WAL LOCATION: 0/2000100 (file 000000010000000000000002)\n\
CHECKPOINT LOCATION: 0/2000060\nBACKUP METHOD: streamed\nBACKUP FROM: primary\n\
START TIME: 2026-12-01 17:00:00 UTC\nLABEL: x\nSTART TIMELINE: 1\n";
        assert_eq!(backup_start_lsn(content).unwrap(), Lsn(0x200_0028));
        assert!(backup_start_lsn(b"LABEL: x\n").is_err());
        assert!(backup_start_lsn(b"START WAL LOCATION: zz (file x)\n").is_err());
        assert!(backup_start_lsn(&[0xff, 0xfe]).is_err());
    }

    use crate::wal::synth::WalBuilder;

    const SYSID: u64 = 7_300_000_000_000_000_001;
    const MB: u64 = 1 << 20;

    fn seg1m() -> SegmentSize {
        SegmentSize::new(MB).unwrap()
    }

    /// WAL of segment `segno` (1 MiB segments, timeline 1) with records up to about `upto`
    /// bytes, zero-filled to the end of the page the last record ends on. Also returns where
    /// the last record ends.
    fn wal(sysid: u64, segno: u64, upto: usize) -> (Vec<u8>, u64) {
        let mut b = WalBuilder::new(sysid, seg1m(), 1, Lsn(segno * MB));
        let payload = vec![0x5Au8; 300];
        let mut xid = 1000;
        while b.bytes().len() < upto {
            b.push(10, 0, xid, &payload);
            xid += 1;
        }
        let end = b.position().0 - segno * MB;
        let page_end = b.position().0.div_ceil(8192) * 8192;
        b.zero_fill_to(Lsn(page_end));
        (b.into_bytes(), end)
    }

    struct Scratch {
        dir: PathBuf,
        store: LocalStore,
    }

    impl Scratch {
        fn new(tag: &str) -> Scratch {
            let dir = std::env::temp_dir().join(format!(
                "walagent-push-{tag}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(dir.join("pg_wal")).unwrap();
            let store = LocalStore::open(&dir.join("archive")).unwrap();
            Scratch { dir, store }
        }

        async fn push(&self, name: &str, bytes: &[u8]) -> Result<Pushed, PushError> {
            let path = self.dir.join("pg_wal").join(name);
            std::fs::write(&path, bytes).unwrap();
            let kind = parse_name(name).unwrap();
            push(&self.store, &path, &kind, Compression::DEFAULT).await
        }

        fn object(&self, key: &str) -> Option<Vec<u8>> {
            let b = std::fs::read(self.dir.join("archive").join(key)).ok()?;
            Some(if key.ends_with(".zst") {
                zstd::stream::decode_all(&b[..]).unwrap()
            } else {
                b
            })
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// A `.partial` in a recycled file: the old segment's pages after the last page written.
    fn recycled_partial(upto: usize) -> (Vec<u8>, u64) {
        let (new, end) = wal(SYSID, 5, upto);
        let (mut file, _) = wal(SYSID, 2, MB as usize);
        file.resize(MB as usize, 0);
        file[..new.len()].copy_from_slice(&new);
        (file, end)
    }

    #[tokio::test]
    async fn a_partial_keeps_only_its_wal_and_never_shrinks() {
        let s = Scratch::new("partial");
        let name = "000000010000000000000005.partial";
        let key = "wal/000000010000000000000005.partial.zst";
        // A complete segment first: the archive's walagent.json comes from it.
        let (mut seg4, _) = wal(SYSID, 4, 4000);
        seg4.resize(MB as usize, 0);
        let e = s.push("000000010000000000000004", &seg4).await.unwrap_err();
        assert!(e.to_string().contains("not a complete segment"), "{e}");
        assert!(s.object("walagent.json").is_none());

        let (file, end) = recycled_partial(300_000);
        let p = s.push(name, &file).await.unwrap();
        assert_eq!(p, Pushed::Stored { key: key.into() });
        let stored = s.object(key).unwrap();
        assert!(stored.len() as u64 >= end && stored.len() < 300_000 + 8192 * 2);
        assert!(file.starts_with(&stored));
        assert!(stored[end as usize..].iter().all(|&b| b == 0));
        assert!(s.object("walagent.json").is_some());

        // Again: the same.
        let p = s.push(name, &file).await.unwrap();
        assert_eq!(p, Pushed::AlreadyArchived { key: key.into() });
        // Less of the same WAL: the archived one is kept.
        let (short, _) = recycled_partial(100_000);
        let p = s.push(name, &short).await.unwrap();
        assert_eq!(p, Pushed::ArchivedHoldsMore { key: key.into() });
        assert_eq!(s.object(key).unwrap(), stored);
        // More of it: replaces.
        let (long, long_end) = recycled_partial(600_000);
        let p = s.push(name, &long).await.unwrap();
        assert_eq!(p, Pushed::Replaced { key: key.into() });
        assert!(s.object(key).unwrap().len() as u64 >= long_end);
        // A record whose CRC fails ends the WAL there, as in PostgreSQL's reading: only what
        // comes before it counts, which the archive already holds.
        let (mut other, _) = wal(SYSID, 5, 700_000);
        other.resize(MB as usize, 0);
        other[9000] ^= 1;
        let before = s.object(key).unwrap();
        let p = s.push(name, &other).await.unwrap();
        assert_eq!(p, Pushed::ArchivedHoldsMore { key: key.into() });
        assert_eq!(s.object(key).unwrap(), before);
        // Other WAL under the name: refused, untouched.
        let mut b = WalBuilder::new(SYSID, seg1m(), 1, Lsn(5 * MB));
        while b.bytes().len() < 700_000 {
            b.push(11, 0, 1, &[0x33u8; 280]);
        }
        let mut diff = b.into_bytes();
        diff.resize(MB as usize, 0);
        let e = s.push(name, &diff).await.unwrap_err();
        assert!(
            matches!(&e, PushError::Conflict { key: k, .. } if k == key),
            "{e:?}"
        );
        assert_eq!(s.object(key).unwrap(), before);
        // A complete segment of the name, then a partial that it holds: covered.
        let mut b = WalBuilder::new(SYSID, seg1m(), 1, Lsn(6 * MB));
        while b.position().0 < 7 * MB - 400 {
            b.push(10, 0, 7, &[1u8; 100]);
        }
        b.push_switch();
        let seg6 = b.into_bytes();
        assert_eq!(seg6.len() as u64, MB);
        let p = s.push("000000010000000000000006", &seg6).await.unwrap();
        assert!(matches!(p, Pushed::Stored { .. }), "{p:?}");
        let mut part6 = seg6[..200_000].to_vec();
        part6.resize(MB as usize, 0);
        let p = s
            .push("000000010000000000000006.partial", &part6)
            .await
            .unwrap();
        assert_eq!(
            p,
            Pushed::CoveredBySegment {
                key: "wal/000000010000000000000006.zst".into()
            }
        );
        // A segment of another cluster: refused by walagent.json.
        let mut b = WalBuilder::new(SYSID + 1, seg1m(), 1, Lsn(7 * MB));
        while b.position().0 < 8 * MB - 400 {
            b.push(10, 0, 7, &[1u8; 100]);
        }
        b.push_switch();
        let e = s
            .push("000000010000000000000007", &b.into_bytes())
            .await
            .unwrap_err();
        assert!(
            matches!(
                &e,
                PushError::Meta {
                    source: MetaError::SystemMismatch { .. },
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(s.object("wal/000000010000000000000007.zst").is_none());
    }

    #[tokio::test]
    async fn history_and_backup_history_files() {
        let s = Scratch::new("history");
        // No walagent.json and no segment beside the file: nothing says whose it is.
        let hist = b"1\t0/5000100\tno recovery target specified\n";
        let e = s.push("00000002.history", hist).await.unwrap_err();
        assert!(matches!(e, PushError::NoIdentity { .. }), "{e:?}");
        // With a segment of the cluster in pg_wal, the archive takes the cluster's identity.
        let mut b = WalBuilder::new(SYSID, seg1m(), 1, Lsn(5 * MB));
        b.push(10, 0, 7, &[1u8; 100]);
        let mut seg = b.into_bytes();
        seg.resize(MB as usize, 0);
        std::fs::write(s.dir.join("pg_wal/000000010000000000000005"), &seg).unwrap();
        let p = s.push("00000002.history", hist).await.unwrap();
        assert_eq!(
            p,
            Pushed::Stored {
                key: "wal/00000002.history".into()
            }
        );
        let meta = String::from_utf8(s.object("walagent.json").unwrap()).unwrap();
        assert!(meta.contains(&SYSID.to_string()), "{meta}");
        let p = s.push("00000002.history", hist).await.unwrap();
        assert!(matches!(p, Pushed::AlreadyArchived { .. }), "{p:?}");
        let e = s
            .push("00000002.history", b"1\t0/6000000\tother\n")
            .await
            .unwrap_err();
        assert!(matches!(e, PushError::Conflict { .. }), "{e:?}");
        // Not a history file, or one whose parent is not older.
        for bad in [&b"garbage"[..], b"", b"2\t0/5000000\tx\n"] {
            let e = s.push("00000002.history", bad).await.unwrap_err();
            assert!(matches!(e, PushError::BadFile { .. }), "{bad:?}: {e:?}");
        }
        assert_eq!(s.object("wal/00000002.history").unwrap(), hist);

        let name = "000000010000000000000005.00000028.backup";
        let content = b"START WAL LOCATION: 0/500028 (file 000000010000000000000005)\nLABEL: a\n";
        let p = s.push(name, content).await.unwrap();
        assert_eq!(
            p,
            Pushed::Stored {
                key: format!("wal/{name}")
            }
        );
        let p = s.push(name, content).await.unwrap();
        assert!(matches!(p, Pushed::AlreadyArchived { .. }), "{p:?}");
        let other = b"START WAL LOCATION: 0/500028 (file 000000010000000000000005)\nLABEL: b\n";
        let p = s.push(name, other).await.unwrap();
        assert!(
            matches!(p, Pushed::KeptDifferentBackupHistory { .. }),
            "{p:?}"
        );
        assert_eq!(s.object(&format!("wal/{name}")).unwrap(), content);
        // The name and the content disagree.
        let e = s
            .push("000000010000000000000005.00000030.backup", content)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("START WAL LOCATION"), "{e}");
        // It is not WAL to the index.
        assert_eq!(layout::parse_wal_key(&format!("wal/{name}"), seg1m()), None);
    }

    #[test]
    fn every_failure_exits_1() {
        let e = PushError::BadName { path: "x".into() };
        assert_eq!(e.exit_code(), 1);
        assert!(e.hint().unwrap().contains("%p"));
        let e = PushError::Read {
            path: "pg_wal/x".into(),
            source: io::Error::from(io::ErrorKind::NotFound),
        };
        assert!(e.hint().unwrap().contains("%p"), "{:?}", e.hint());
    }
}
