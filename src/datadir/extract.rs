//! Writes the entries of a base backup's tar stream into a directory.
//!
//! Used by `seed-standby`, which extracts files as they arrive from the server, and by `restore`,
//! which extracts archives read back from the store. Both feed the [`TarEvent`]s of a
//! [`TarParser`](super::tar::TarParser) to an [`Extractor`]; the code is plain synchronous
//! `std::fs`, meant to run on a blocking thread.
//!
//! Why it is strict:
//! - The result is a PostgreSQL data directory, which the server refuses unless it is mode 0700
//!   (or 0750) and owned by the server's OS user: directories are created 0700 and files 0600,
//!   whatever the archive says, and everything can be chowned to a given uid/gid when running as
//!   root.
//! - The archive comes over the network (or from a store): absolute paths, `..` components, and
//!   entries that would reach outside the target through a symbolic link created earlier are
//!   refused, and symbolic links are never followed when creating anything. Hard links may only
//!   point at files extracted before, inside the target. The target must start empty
//!   ([`prepare_target_dir`]), so an existing file at an entry's path is an error, never
//!   overwritten.
//! - A 1 GiB backup passes through here: file content is gathered in a reused 1 MiB buffer and
//!   written in large `write(2)` calls; no other system call is made per data event. Durability
//!   comes at the end from one `syncfs(2)` per filesystem rather than an `fsync` per file.
//!
//! Tablespaces. In `base.tar`, each tablespace outside the data directory is a symbolic link
//! `pg_tblspc/<oid>` to the tablespace's location; its content comes in a separate archive,
//! `<oid>.tar`, whose entries are relative to that location. [`ExtractOptions::tablespace_mapping`]
//! relocates tablespaces (like `pg_basebackup --tablespace-mapping`): the link is written
//! pointing at the new directory, which must be absent or empty. To extract `<oid>.tar`, use a
//! separate `Extractor::new(&target, opts.clone())` on that directory, where `target` is
//! [`ExtractOptions::map_tablespace`] of the location the server reported (or
//! [`Extractor::tablespace_root_for`] once `base.tar`'s link has been seen). A server sends the
//! tablespace archives *before* `base.tar`; a caller that extracts them first prepares the
//! directory itself ([`prepare_target_dir`]) and tells the main extractor with
//! [`Extractor::register_tablespace`], so that the link is accepted although the directory is
//! no longer empty. A tablespace directory is only ever written through its own extractor, never
//! through the `pg_tblspc/<oid>` link.
//!
//! Not handled: devices, FIFOs and other special files (refused), non-UTF-8 names (the parser
//! refuses them), and a concurrent process modifying the target while extraction runs.

use std::collections::{BTreeMap, HashSet};
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::tar::{EntryKind, EntryMeta, TarEvent};

/// Mode of every regular file created.
pub const FILE_MODE: u32 = 0o600;
/// Mode of every directory created (PostgreSQL accepts 0700 and 0750 for its data directory).
pub const DIR_MODE: u32 = 0o700;
/// File content is written in calls of up to this size.
const WRITE_BUFFER: usize = 1 << 20;

/// What goes wrong while extracting. Messages name the path and the cause; the fix, where one
/// is known, is [`ExtractError::hint`].
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error(
        "target directory {} is not empty (found {found})",
        path.display()
    )]
    NotEmpty { path: PathBuf, found: String },
    #[error(
        "{} exists and is not a directory",
        path.display()
    )]
    NotADirectory { path: PathBuf },
    #[error(
        "cannot create {}: its parent directory {} does not exist",
        path.display(),
        parent.display()
    )]
    ParentMissing { path: PathBuf, parent: PathBuf },
    #[error(
        "directory {} is not writable ({source})",
        path.display()
    )]
    NotWritable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "no space left on device writing {}",
        path.display()
    )]
    NoSpace { path: PathBuf },
    #[error("refusing archive entry {path:?}: {reason}; the archive is corrupt or hostile")]
    UnsafePath { path: String, reason: String },
    #[error(
        "{} already exists; the target directory must be empty (was it extracted into twice?)",
        path.display()
    )]
    Exists { path: PathBuf },
    #[error(
        "{} is not a directory, but the archive has entries under it; the archive is corrupt",
        path.display()
    )]
    Blocked { path: PathBuf },
    #[error(
        "unsupported entry type {kind:?} for {path:?} in the archive (a data directory holds only \
         files, directories and symbolic links)"
    )]
    Unsupported { path: String, kind: char },
    #[error("tablespace {oid}: {detail}")]
    Tablespace { oid: u32, detail: String },
    #[error(
        "invalid tablespace mapping {arg:?}: {reason}; the format is OLDDIR=NEWDIR with absolute \
         paths (write \\= for a '=' inside a path)"
    )]
    BadMapping { arg: String, reason: String },
    #[error("tar events out of order: {0} (a bug in the caller or the parser)")]
    Sequence(String),
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl ExtractError {
    /// The fix, where one is known. (A bad `--tablespace-mapping` says the format in its
    /// message: argument errors are shown by the parser, without a hint.)
    pub fn hint(&self) -> Option<String> {
        match self {
            ExtractError::NotEmpty { .. } | ExtractError::NotADirectory { .. } => {
                Some("choose an empty or new directory".into())
            }
            ExtractError::ParentMissing { .. } => {
                Some("create the parent first or choose another directory".into())
            }
            ExtractError::NotWritable { .. } => {
                Some("fix its ownership or permissions, or choose another directory".into())
            }
            ExtractError::NoSpace { .. } => {
                Some("free some space or extract to a larger filesystem".into())
            }
            _ => None,
        }
    }
}

/// Maps an I/O error; ENOSPC and EEXIST get their own variants.
fn io_err(op: &'static str, path: &Path, error: io::Error) -> ExtractError {
    match error.raw_os_error() {
        Some(libc::ENOSPC) => ExtractError::NoSpace {
            path: path.to_path_buf(),
        },
        Some(libc::EEXIST) => ExtractError::Exists {
            path: path.to_path_buf(),
        },
        _ => ExtractError::Io {
            op,
            path: path.to_path_buf(),
            source: error,
        },
    }
}

/// How to extract.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExtractOptions {
    /// OLD=NEW pairs (like pg_basebackup --tablespace-mapping): a symlink `pg_tblspc/<oid>`
    /// whose target equals OLD gets NEW instead. Compared component-wise (a trailing `/` does not
    /// matter); the first match wins.
    pub tablespace_mapping: Vec<(PathBuf, PathBuf)>,
    /// chown every created file/dir/symlink (lchown) to this uid/gid (used when running as root
    /// so the postgres OS user owns the result), and the root directory itself at
    /// [`Extractor::finish`]; None = leave as is.
    pub owner: Option<(u32, u32)>,
}

impl ExtractOptions {
    /// Where a tablespace whose location on the source server is `location` goes.
    pub fn map_tablespace(&self, location: &Path) -> PathBuf {
        map_tablespace(&self.tablespace_mapping, location)
    }
}

/// Where a tablespace whose location on the source server is `location` goes under `mapping`
/// (OLD=NEW pairs, the first match wins).
pub fn map_tablespace(mapping: &[(PathBuf, PathBuf)], location: &Path) -> PathBuf {
    mapping
        .iter()
        .find(|(old, _)| old.as_path() == location)
        .map_or_else(|| location.to_path_buf(), |(_, new)| new.clone())
}

/// Parses one `OLDDIR=NEWDIR` mapping as `pg_basebackup --tablespace-mapping` does: `\=` stands
/// for a `=` inside a path, and both paths must be absolute.
pub fn parse_tablespace_mapping(arg: &str) -> Result<(PathBuf, PathBuf), ExtractError> {
    let bad = |reason: &str| ExtractError::BadMapping {
        arg: arg.to_string(),
        reason: reason.to_string(),
    };
    let (mut old, mut new) = (String::new(), String::new());
    let mut seen_eq = false;
    let mut chars = arg.chars().peekable();
    while let Some(c) = chars.next() {
        let c = match c {
            '\\' if chars.peek() == Some(&'=') => chars.next().unwrap_or('='),
            '=' if seen_eq => return Err(bad("more than one '='")),
            '=' => {
                seen_eq = true;
                continue;
            }
            c => c,
        };
        if seen_eq { &mut new } else { &mut old }.push(c);
    }
    if !seen_eq || old.is_empty() || new.is_empty() {
        return Err(bad("expected OLDDIR=NEWDIR"));
    }
    let (old, new) = (PathBuf::from(old), PathBuf::from(new));
    if !old.is_absolute() {
        return Err(bad("the old directory is not an absolute path"));
    }
    if !new.is_absolute() {
        return Err(bad("the new directory is not an absolute path"));
    }
    Ok((old, new))
}

/// Prepares a target directory: creates it (mode 0700) when missing if its parent exists; Ok if
/// it exists and is empty. Errors: parent missing, not a directory, not empty (naming one entry
/// found), not writable. Returns whether it was created. An existing directory's mode and owner
/// are left alone.
pub fn prepare_target_dir(path: &Path) -> Result<bool, ExtractError> {
    if check_target_dir(path)? {
        return Ok(false);
    }
    let parent = match path.parent() {
        Some(p) if p.as_os_str().is_empty() => Path::new("."),
        Some(p) => p,
        None => path,
    };
    fs::DirBuilder::new()
        .mode(DIR_MODE)
        .create(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EACCES | libc::EPERM | libc::EROFS) => ExtractError::NotWritable {
                path: parent.to_path_buf(),
                source: e,
            },
            _ => io_err("create directory", path, e),
        })?;
    // The umask may have taken bits away.
    fs::set_permissions(path, fs::Permissions::from_mode(DIR_MODE))
        .map_err(|e| io_err("set permissions of", path, e))?;
    Ok(true)
}

/// The checks of [`prepare_target_dir`] without creating anything (restore runs them before it
/// writes): Ok(true) when `path` is an empty, writable directory, Ok(false) when it is absent
/// and its parent directory exists.
pub fn check_target_dir(path: &Path) -> Result<bool, ExtractError> {
    match fs::metadata(path) {
        Ok(m) if !m.is_dir() => Err(ExtractError::NotADirectory {
            path: path.to_path_buf(),
        }),
        Ok(_) => {
            let mut entries = fs::read_dir(path).map_err(|e| io_err("read", path, e))?;
            if let Some(entry) = entries.next() {
                let entry = entry.map_err(|e| io_err("read", path, e))?;
                return Err(ExtractError::NotEmpty {
                    path: path.to_path_buf(),
                    found: entry.file_name().to_string_lossy().into_owned(),
                });
            }
            check_writable(path)?;
            Ok(true)
        }
        Err(e) if is_missing(&e) => {
            let parent = match path.parent() {
                Some(p) if p.as_os_str().is_empty() => Path::new("."),
                Some(p) => p,
                None => return Err(io_err("create directory", path, e)),
            };
            match fs::metadata(parent) {
                Ok(m) if m.is_dir() => Ok(false),
                Ok(_) => Err(ExtractError::NotADirectory {
                    path: parent.to_path_buf(),
                }),
                Err(e) if is_missing(&e) => Err(ExtractError::ParentMissing {
                    path: path.to_path_buf(),
                    parent: parent.to_path_buf(),
                }),
                Err(e) => Err(io_err("inspect", parent, e)),
            }
        }
        Err(e) => Err(io_err("inspect", path, e)),
    }
}

/// ENOENT, or ENOTDIR (a file where a directory of the path should be).
fn is_missing(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR)
}

/// Whether this process may create entries in `path` (effective ids; root passes unless the
/// filesystem is read-only).
fn check_writable(path: &Path) -> Result<(), ExtractError> {
    let c = cstring(path)?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let r = unsafe {
        libc::faccessat(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::W_OK | libc::X_OK,
            libc::AT_EACCESS,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(ExtractError::NotWritable {
            path: path.to_path_buf(),
            source: io::Error::last_os_error(),
        })
    }
}

fn cstring(path: &Path) -> Result<CString, ExtractError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| ExtractError::UnsafePath {
        path: path.to_string_lossy().into_owned(),
        reason: "contains a NUL byte".into(),
    })
}

/// Counts of what an [`Extractor`] created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExtractStats {
    /// Regular files, hard links included.
    pub files: u64,
    /// Directories, including parents the archive did not list.
    pub dirs: u64,
    pub symlinks: u64,
    /// File content bytes written.
    pub bytes: u64,
}

/// The file being written.
struct OpenFile {
    file: File,
    path: PathBuf,
    size: u64,
    written: u64,
    mtime: u64,
}

enum Current {
    /// Between entries.
    Idle,
    /// A regular file: content goes into it.
    File(OpenFile),
    /// An entry without content to write (directory, link, root); any content is ignored.
    Skip,
}

/// A tablespace target known to the extractor.
#[derive(Debug)]
struct Tablespace {
    target: PathBuf,
    /// `pg_tblspc/<oid>` has been created.
    linked: bool,
}

/// Writes tar entries under a root directory; see the module documentation.
pub struct Extractor {
    root: PathBuf,
    opts: ExtractOptions,
    current: Current,
    /// Pending file content, written in large calls.
    buf: Vec<u8>,
    /// Relative paths known to be real directories (not symlinks) inside root.
    known_dirs: HashSet<PathBuf>,
    /// Directories whose mtime is set at the end (creating entries in them changes it).
    dir_mtimes: Vec<(PathBuf, u64)>,
    tablespaces: BTreeMap<u32, Tablespace>,
    stats: ExtractStats,
}

impl Extractor {
    /// Extracts under `root`, which must already exist (see [`prepare_target_dir`]).
    pub fn new(root: &Path, opts: ExtractOptions) -> Self {
        Extractor {
            root: root.to_path_buf(),
            opts,
            current: Current::Idle,
            buf: Vec::with_capacity(WRITE_BUFFER),
            known_dirs: HashSet::new(),
            dir_mtimes: Vec::new(),
            tablespaces: BTreeMap::new(),
            stats: ExtractStats::default(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Counts so far (for progress reports).
    pub fn stats(&self) -> ExtractStats {
        self.stats
    }

    /// Declares that tablespace `oid` goes to `target`, already prepared (and possibly already
    /// extracted into) by the caller. When `pg_tblspc/<oid>` arrives, its mapped target must be
    /// `target`; it is then linked without the emptiness check.
    pub fn register_tablespace(&mut self, oid: u32, target: PathBuf) {
        self.tablespaces.insert(
            oid,
            Tablespace {
                target,
                linked: false,
            },
        );
    }

    /// The directory tablespace `oid` is extracted to: registered, or from the (mapped) link
    /// seen in the archive.
    pub fn tablespace_root_for(&self, oid: u32) -> Option<PathBuf> {
        self.tablespaces.get(&oid).map(|t| t.target.clone())
    }

    /// Handles the parser's next event.
    pub fn handle(&mut self, ev: TarEvent) -> Result<(), ExtractError> {
        match ev {
            TarEvent::Entry { meta, .. } => self.start_entry(meta),
            TarEvent::Data(data) => self.data(&data),
            TarEvent::EntryEnd { .. } => self.end_entry(),
            TarEvent::Trailer(_) => match self.current {
                Current::Idle => Ok(()),
                _ => Err(ExtractError::Sequence(
                    "end of archive inside an entry".into(),
                )),
            },
        }
    }

    /// Sets the directories' modification times, gives the root to the owner, and flushes
    /// everything to disk with `syncfs(2)` on the root's filesystem and on each distinct
    /// tablespace target's.
    pub fn finish(self) -> Result<ExtractStats, ExtractError> {
        if !matches!(self.current, Current::Idle) {
            return Err(ExtractError::Sequence(
                "archive ended inside an entry".into(),
            ));
        }
        for (path, mtime) in self.dir_mtimes.iter().rev() {
            set_mtime_nofollow(path, *mtime)?;
        }
        if let Some((uid, gid)) = self.opts.owner {
            std::os::unix::fs::lchown(&self.root, Some(uid), Some(gid))
                .map_err(|e| io_err("change owner of", &self.root, e))?;
        }
        let mut synced = HashSet::new();
        let targets = self.tablespaces.values().map(|t| t.target.as_path());
        for dir in std::iter::once(self.root.as_path()).chain(targets) {
            let m = fs::metadata(dir).map_err(|e| io_err("inspect", dir, e))?;
            if synced.insert(m.dev()) {
                syncfs(dir)?;
            }
        }
        Ok(self.stats)
    }

    fn start_entry(&mut self, meta: EntryMeta) -> Result<(), ExtractError> {
        if !matches!(self.current, Current::Idle) {
            return Err(ExtractError::Sequence(format!(
                "entry {:?} starts before the previous one ended",
                meta.path
            )));
        }
        let rel = safe_relative(&meta.path)?;
        let is_root = rel.as_os_str().is_empty();
        if is_root && meta.kind != EntryKind::Directory {
            return Err(unsafe_path(
                &meta.path,
                "a non-directory entry for the root",
            ));
        }
        if let EntryKind::Other(t) = meta.kind {
            return Err(ExtractError::Unsupported {
                path: meta.path,
                kind: char::from(t),
            });
        }
        let abs = self.root.join(&rel);
        if let Some(parent) = rel.parent() {
            self.ensure_dir(parent, &meta.path, true)?;
        }
        self.current = Current::Skip;
        match meta.kind {
            EntryKind::Directory if is_root => {}
            EntryKind::Directory => {
                self.ensure_dir(&rel, &meta.path, true)?;
                self.dir_mtimes.push((abs, meta.mtime));
            }
            EntryKind::File => {
                let file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(FILE_MODE)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&abs)
                    .map_err(|e| io_err("create file", &abs, e))?;
                file.set_permissions(fs::Permissions::from_mode(FILE_MODE))
                    .map_err(|e| io_err("set permissions of", &abs, e))?;
                if let Some((uid, gid)) = self.opts.owner {
                    std::os::unix::fs::fchown(&file, Some(uid), Some(gid))
                        .map_err(|e| io_err("change owner of", &abs, e))?;
                }
                self.current = Current::File(OpenFile {
                    file,
                    path: abs,
                    size: meta.size,
                    written: 0,
                    mtime: meta.mtime,
                });
            }
            EntryKind::Symlink { target } => {
                let target = match tablespace_oid(&rel) {
                    Some(oid) => self.tablespace_link(oid, &target)?,
                    None => PathBuf::from(target),
                };
                std::os::unix::fs::symlink(&target, &abs)
                    .map_err(|e| io_err("create symbolic link", &abs, e))?;
                if let Some((uid, gid)) = self.opts.owner {
                    std::os::unix::fs::lchown(&abs, Some(uid), Some(gid))
                        .map_err(|e| io_err("change owner of", &abs, e))?;
                }
                set_mtime_nofollow(&abs, meta.mtime)?;
                self.stats.symlinks += 1;
            }
            EntryKind::Hardlink { target } => {
                let target_rel = safe_relative(&target)?;
                if target_rel.as_os_str().is_empty() {
                    return Err(unsafe_path(&meta.path, "a hard link to the root"));
                }
                if let Some(parent) = target_rel.parent() {
                    self.ensure_dir(parent, &target, false)?;
                }
                let target_abs = self.root.join(&target_rel);
                match fs::symlink_metadata(&target_abs) {
                    Ok(m) if m.file_type().is_file() => {}
                    Ok(_) => {
                        return Err(unsafe_path(
                            &meta.path,
                            &format!("a hard link to {target:?}, which is not a regular file"),
                        ))
                    }
                    Err(e) => return Err(io_err("find hard link target", &target_abs, e)),
                }
                fs::hard_link(&target_abs, &abs)
                    .map_err(|e| io_err("create hard link", &abs, e))?;
                self.stats.files += 1;
            }
            EntryKind::Other(_) => unreachable!("refused above"),
        }
        Ok(())
    }

    fn data(&mut self, data: &[u8]) -> Result<(), ExtractError> {
        match &mut self.current {
            Current::File(f) => {
                f.written += data.len() as u64;
                if f.written > f.size {
                    return Err(ExtractError::Sequence(format!(
                        "more content than the header's {} bytes for {}",
                        f.size,
                        f.path.display()
                    )));
                }
                if self.buf.len() + data.len() > WRITE_BUFFER {
                    flush(&mut self.buf, f)?;
                }
                if data.len() >= WRITE_BUFFER {
                    f.file
                        .write_all(data)
                        .map_err(|e| io_err("write", &f.path, e))?;
                } else {
                    self.buf.extend_from_slice(data);
                }
                self.stats.bytes += data.len() as u64;
                Ok(())
            }
            Current::Skip => Ok(()),
            Current::Idle => Err(ExtractError::Sequence("content outside an entry".into())),
        }
    }

    fn end_entry(&mut self) -> Result<(), ExtractError> {
        match std::mem::replace(&mut self.current, Current::Idle) {
            Current::File(mut f) => {
                flush(&mut self.buf, &mut f)?;
                if f.written != f.size {
                    return Err(ExtractError::Sequence(format!(
                        "{} got {} bytes, the header said {}",
                        f.path.display(),
                        f.written,
                        f.size
                    )));
                }
                if let Some(t) = mtime_of(f.mtime) {
                    f.file
                        .set_modified(t)
                        .map_err(|e| io_err("set modification time of", &f.path, e))?;
                }
                self.stats.files += 1;
                Ok(())
            }
            Current::Skip => Ok(()),
            Current::Idle => Err(ExtractError::Sequence("entry end outside an entry".into())),
        }
    }

    /// Makes sure `rel` (relative to root) is a real directory, checking each component: a
    /// symlink anywhere on the way is refused (it could lead outside root), missing components
    /// are created when `create`. `entry` is the archive path, for messages.
    fn ensure_dir(&mut self, rel: &Path, entry: &str, create: bool) -> Result<(), ExtractError> {
        if rel.as_os_str().is_empty() || self.known_dirs.contains(rel) {
            return Ok(());
        }
        let mut cur = PathBuf::new();
        for comp in rel.components() {
            cur.push(comp);
            if self.known_dirs.contains(&cur) {
                continue;
            }
            let abs = self.root.join(&cur);
            match fs::symlink_metadata(&abs) {
                Ok(m) if m.file_type().is_dir() => {}
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(unsafe_path(
                        entry,
                        &format!("it goes through the symbolic link {}", cur.display()),
                    ))
                }
                Ok(_) => return Err(ExtractError::Blocked { path: abs }),
                Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                    fs::DirBuilder::new()
                        .mode(DIR_MODE)
                        .create(&abs)
                        .map_err(|e| io_err("create directory", &abs, e))?;
                    fs::set_permissions(&abs, fs::Permissions::from_mode(DIR_MODE))
                        .map_err(|e| io_err("set permissions of", &abs, e))?;
                    if let Some((uid, gid)) = self.opts.owner {
                        std::os::unix::fs::lchown(&abs, Some(uid), Some(gid))
                            .map_err(|e| io_err("change owner of", &abs, e))?;
                    }
                    self.stats.dirs += 1;
                }
                Err(e) => return Err(io_err("inspect", &abs, e)),
            }
            self.known_dirs.insert(cur.clone());
        }
        Ok(())
    }

    /// The target to write for the link `pg_tblspc/<oid>` -> `location`, after mapping; the
    /// directory is prepared unless the caller registered it.
    fn tablespace_link(&mut self, oid: u32, location: &str) -> Result<PathBuf, ExtractError> {
        let target = self.opts.map_tablespace(Path::new(location));
        let err = |detail: String| ExtractError::Tablespace { oid, detail };
        if let Some(t) = self.tablespaces.get_mut(&oid) {
            if t.linked {
                return Err(err("pg_tblspc entry appears twice in the archive".into()));
            }
            if t.target != target {
                return Err(err(format!(
                    "the archive links it to {} (mapped from {location}), but it was registered \
                     at {}; fix the tablespace mapping",
                    target.display(),
                    t.target.display()
                )));
            }
            t.linked = true;
            return Ok(target);
        }
        if !target.is_absolute() {
            return Err(err(format!(
                "location {} is not an absolute path; map it to one with a tablespace mapping \
                 (OLDDIR=NEWDIR)",
                target.display()
            )));
        }
        if let Some((other, _)) = self.tablespaces.iter().find(|(_, t)| t.target == target) {
            return Err(err(format!(
                "tablespace {other} already goes to {}; map one of them elsewhere",
                target.display()
            )));
        }
        let created = prepare_target_dir(&target).map_err(|e| {
            err(format!(
                "{e}; or relocate it with a tablespace mapping ({location}=NEWDIR)"
            ))
        })?;
        if let Some((uid, gid)) = self.opts.owner {
            std::os::unix::fs::lchown(&target, Some(uid), Some(gid))
                .map_err(|e| io_err("change owner of", &target, e))?;
        }
        if created {
            self.stats.dirs += 1;
        }
        self.tablespaces.insert(
            oid,
            Tablespace {
                target: target.clone(),
                linked: true,
            },
        );
        Ok(target)
    }
}

/// Writes out the buffered content.
fn flush(buf: &mut Vec<u8>, f: &mut OpenFile) -> Result<(), ExtractError> {
    if !buf.is_empty() {
        f.file
            .write_all(buf)
            .map_err(|e| io_err("write", &f.path, e))?;
        buf.clear();
    }
    Ok(())
}

fn unsafe_path(path: &str, reason: &str) -> ExtractError {
    ExtractError::UnsafePath {
        path: path.to_string(),
        reason: reason.to_string(),
    }
}

/// `path` as a relative path of plain components; absolute paths and `..` are refused. Empty for
/// the root (`""`, `.`).
fn safe_relative(path: &str) -> Result<PathBuf, ExtractError> {
    if path.contains('\0') {
        return Err(unsafe_path(path, "contains a NUL byte"));
    }
    let mut out = PathBuf::new();
    for comp in Path::new(path).components() {
        match comp {
            Component::Normal(c) => out.push(c),
            Component::CurDir => {}
            Component::ParentDir => return Err(unsafe_path(path, "contains a `..` component")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(unsafe_path(path, "is an absolute path"))
            }
        }
    }
    Ok(out)
}

/// `Some(oid)` for `pg_tblspc/<digits>`.
fn tablespace_oid(rel: &Path) -> Option<u32> {
    let mut comps = rel.components();
    let (Some(Component::Normal(first)), Some(Component::Normal(oid)), None) =
        (comps.next(), comps.next(), comps.next())
    else {
        return None;
    };
    let oid = oid.to_str()?;
    if first != "pg_tblspc" || !oid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    oid.parse().ok()
}

/// The header's mtime as a `SystemTime`, if representable.
fn mtime_of(mtime: u64) -> Option<SystemTime> {
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(mtime))
}

/// Sets the modification time of `path` itself (not what a symlink points to); the access time
/// is left alone. Out-of-range times are skipped.
fn set_mtime_nofollow(path: &Path, mtime: u64) -> Result<(), ExtractError> {
    let Ok(secs) = libc::time_t::try_from(mtime) else {
        return Ok(());
    };
    let c = cstring(path)?;
    let times = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: secs,
            tv_nsec: 0,
        },
    ];
    // SAFETY: `c` is NUL-terminated and `times` holds two timespecs, both valid for the call.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io_err(
            "set modification time of",
            path,
            io::Error::last_os_error(),
        ))
    }
}

/// Flushes the filesystem holding `dir` to disk and reports write-back errors (Linux 5.8+).
#[cfg(target_os = "linux")]
fn syncfs(dir: &Path) -> Result<(), ExtractError> {
    use std::os::fd::AsRawFd;
    let f = File::open(dir).map_err(|e| io_err("open", dir, e))?;
    // SAFETY: the descriptor is open for the duration of the call.
    if unsafe { libc::syncfs(f.as_raw_fd()) } == 0 {
        Ok(())
    } else {
        Err(io_err(
            "sync the filesystem of",
            dir,
            io::Error::last_os_error(),
        ))
    }
}

/// Without syncfs(2): flush everything (no error reporting from sync(2)).
#[cfg(not(target_os = "linux"))]
fn syncfs(_dir: &Path) -> Result<(), ExtractError> {
    // SAFETY: sync() takes no arguments and cannot fail.
    unsafe { libc::sync() };
    Ok(())
}

// ---- helpers for the commands that fill a data directory (seed-standby, restore) ----------

/// Who should own what walagent writes into `dir`: running as root, the owner of `dir` (or of its
/// parent when walagent created `dir`), so that the postgres OS user can start the server;
/// otherwise nobody in particular (`None`: files belong to the caller).
pub fn target_owner(dir: &Path, created: bool) -> Option<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let from = if created {
        dir.parent().filter(|p| !p.as_os_str().is_empty())?
    } else {
        dir
    };
    fs::metadata(from).ok().map(|m| (m.uid(), m.gid()))
}

/// Undoes a failed fill: removes `dir` when walagent created it, else everything in it (it was
/// empty before).
pub fn remove_written(dir: &Path, created: bool) {
    if created {
        let _ = fs::remove_dir_all(dir);
        return;
    }
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                let _ = fs::remove_dir_all(&p);
            } else {
                let _ = fs::remove_file(&p);
            }
        }
    }
}

/// lchown to `owner` when set (best effort: the caller already wrote the file).
pub fn chown_to(path: &Path, owner: Option<(u32, u32)>) {
    if let Some((uid, gid)) = owner {
        let _ = std::os::unix::fs::lchown(path, Some(uid), Some(gid));
    }
}

/// Writes `data` to `path` (created or truncated, mode 0600) and fsyncs it (its content; the
/// caller makes the name durable, e.g. with the signal file's directory fsync).
pub fn write_private_file(path: &Path, data: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let mut f = crate::archive::compress::create_private(path)?;
    f.write_all(data)?;
    crate::fsutil::sync_file(&f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datadir::tar::{TarError, TarParser};
    use bytes::Bytes;
    use std::os::unix::fs::MetadataExt;

    use crate::wal::synth::TestRng as Rng;

    fn content(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(17).wrapping_add(seed))
            .collect()
    }

    fn header(kind: tar::EntryType, size: u64, mode: u32, mtime: u64) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h.set_mtime(mtime);
        h
    }

    struct Tb(tar::Builder<Vec<u8>>);
    impl Tb {
        fn new() -> Self {
            Tb(tar::Builder::new(Vec::new()))
        }
        fn dir(mut self, path: &str, mtime: u64) -> Self {
            let mut h = header(tar::EntryType::Directory, 0, 0o755, mtime);
            self.0.append_data(&mut h, path, std::io::empty()).unwrap();
            self
        }
        fn file(mut self, path: &str, data: &[u8], mtime: u64) -> Self {
            let mut h = header(tar::EntryType::Regular, data.len() as u64, 0o644, mtime);
            self.0.append_data(&mut h, path, data).unwrap();
            self
        }
        fn link(mut self, kind: tar::EntryType, path: &str, target: &str) -> Self {
            let mut h = header(kind, 0, 0o777, 1_600_000_000);
            self.0.append_link(&mut h, path, target).unwrap();
            self
        }
        fn symlink(self, path: &str, target: &str) -> Self {
            self.link(tar::EntryType::Symlink, path, target)
        }
        fn raw(mut self, name: &[u8], typeflag: u8, data: &[u8], link: &[u8]) -> Self {
            // The tar crate refuses `..` and absolute names; write the fields by hand.
            let mut h = header(tar::EntryType::Regular, data.len() as u64, 0o644, 1);
            h.as_old_mut().name[..name.len()].copy_from_slice(name);
            h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
            h.as_old_mut().linkflag = [typeflag];
            h.set_cksum();
            self.0.append(&h, data).unwrap();
            self
        }
        fn done(self) -> Vec<u8> {
            self.0.into_inner().unwrap()
        }
    }

    #[derive(Debug)]
    enum Failure {
        Tar(TarError),
        Extract(ExtractError),
    }

    /// Parses `data` in random chunks and extracts it under `root`.
    fn extract(
        data: &[u8],
        root: &Path,
        opts: ExtractOptions,
        seed: u64,
    ) -> Result<ExtractStats, Failure> {
        let mut rng = Rng(seed | 1);
        let all = Bytes::copy_from_slice(data);
        let mut p = TarParser::new();
        let mut x = Extractor::new(root, opts);
        let mut events = Vec::new();
        let mut at = 0;
        while at < all.len() {
            let n = (1 + (rng.next() % 70_000) as usize).min(all.len() - at);
            p.feed(all.slice(at..at + n), &mut events)
                .map_err(Failure::Tar)?;
            for ev in events.drain(..) {
                x.handle(ev).map_err(Failure::Extract)?;
            }
            at += n;
        }
        p.finish(&mut events).map_err(Failure::Tar)?;
        x.finish().map_err(Failure::Extract)
    }

    fn tempdir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    fn mtime(p: &Path) -> i64 {
        fs::symlink_metadata(p).unwrap().mtime()
    }

    fn walk(root: &Path) -> Vec<String> {
        fn rec(root: &Path, dir: &Path, out: &mut Vec<String>) {
            for e in fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                out.push(p.strip_prefix(root).unwrap().display().to_string());
                if fs::symlink_metadata(&p).unwrap().is_dir() {
                    rec(root, &p, out);
                }
            }
        }
        let mut out = Vec::new();
        rec(root, root, &mut out);
        out.sort();
        out
    }

    fn sample() -> Vec<u8> {
        Tb::new()
            .dir("./", 1_600_000_000)
            .dir("base", 1_600_000_001)
            .dir("base/1", 1_600_000_002)
            .file("PG_VERSION", b"15\n", 1_600_000_003)
            .file("base/1/1234", &content(3 << 20, 1), 1_600_000_004)
            .file("base/1/empty", b"", 1_600_000_005)
            .file("global/pg_control", &content(8192, 2), 1_600_000_006)
            .file("a/b/c/deep", &content(513, 3), 1_600_000_007)
            .symlink("base/1/link", "../../PG_VERSION")
            .link(tar::EntryType::Link, "base/1/hard", "base/1/1234")
            .dir("pg_wal", 1_600_000_008)
            .done()
    }

    #[test]
    fn extracts_files_dirs_and_links() {
        for seed in 1..4 {
            let tmp = tempdir();
            let root = tmp.path().join("data");
            assert!(prepare_target_dir(&root).unwrap());
            let stats = extract(&sample(), &root, ExtractOptions::default(), seed).unwrap();
            assert_eq!(
                stats,
                ExtractStats {
                    files: 6,
                    // base, base/1, global, a, a/b, a/b/c, pg_wal
                    dirs: 7,
                    symlinks: 1,
                    bytes: 3 + (3 << 20) + 8192 + 513,
                }
            );
            assert_eq!(
                walk(&root),
                [
                    "PG_VERSION",
                    "a",
                    "a/b",
                    "a/b/c",
                    "a/b/c/deep",
                    "base",
                    "base/1",
                    "base/1/1234",
                    "base/1/empty",
                    "base/1/hard",
                    "base/1/link",
                    "global",
                    "global/pg_control",
                    "pg_wal"
                ]
            );
            assert_eq!(fs::read(root.join("PG_VERSION")).unwrap(), b"15\n");
            assert_eq!(
                fs::read(root.join("base/1/1234")).unwrap(),
                content(3 << 20, 1)
            );
            assert_eq!(fs::read(root.join("a/b/c/deep")).unwrap(), content(513, 3));
            assert_eq!(fs::read(root.join("base/1/empty")).unwrap(), b"");
            assert_eq!(
                fs::read_link(root.join("base/1/link")).unwrap(),
                Path::new("../../PG_VERSION")
            );
            assert_eq!(fs::read(root.join("base/1/link")).unwrap(), b"15\n");
            let ino = |p: &str| fs::metadata(root.join(p)).unwrap().ino();
            assert_eq!(ino("base/1/hard"), ino("base/1/1234"));
            for f in ["PG_VERSION", "base/1/1234", "base/1/empty", "a/b/c/deep"] {
                assert_eq!(mode(&root.join(f)), 0o600, "{f}");
            }
            for d in ["", "base", "base/1", "global", "a/b/c", "pg_wal"] {
                assert_eq!(mode(&root.join(d)), 0o700, "{d}");
            }
            assert_eq!(mtime(&root.join("PG_VERSION")), 1_600_000_003);
            assert_eq!(mtime(&root.join("base/1/1234")), 1_600_000_004);
            assert_eq!(mtime(&root.join("base/1/link")), 1_600_000_000);
            // Set after their files were created.
            assert_eq!(mtime(&root.join("base")), 1_600_000_001);
            assert_eq!(mtime(&root.join("base/1")), 1_600_000_002);
        }
    }

    #[test]
    fn owner_is_applied() {
        // As root, give everything away; otherwise chown to ourselves, which works without
        // privileges and still exercises every chown call.
        let (uid, gid) = match unsafe { libc::geteuid() } {
            0 => (12_345, 23_456),
            _ => unsafe { (libc::geteuid(), libc::getegid()) },
        };
        let tmp = tempdir();
        let root = tmp.path().join("data");
        prepare_target_dir(&root).unwrap();
        let opts = ExtractOptions {
            owner: Some((uid, gid)),
            ..Default::default()
        };
        extract(&sample(), &root, opts, 5).unwrap();
        for p in [
            "",
            "base/1/1234",
            "base/1/hard",
            "base/1/link",
            "a/b",
            "pg_wal",
        ] {
            let m = fs::symlink_metadata(root.join(p)).unwrap();
            assert_eq!((m.uid(), m.gid()), (uid, gid), "{p}");
        }
    }

    #[test]
    fn existing_files_are_not_overwritten() {
        let tmp = tempdir();
        let root = tmp.path().join("data");
        prepare_target_dir(&root).unwrap();
        let data = Tb::new().file("f", b"new", 1).done();
        fs::write(root.join("f"), b"old").unwrap();
        let e = extract(&data, &root, ExtractOptions::default(), 1).unwrap_err();
        assert!(
            matches!(&e, Failure::Extract(ExtractError::Exists { path }) if path == &root.join("f")),
            "{e:?}"
        );
        assert_eq!(fs::read(root.join("f")).unwrap(), b"old");
        // A file where a directory is needed.
        let data = Tb::new().file("f/g", b"x", 1).done();
        let e = extract(&data, &root, ExtractOptions::default(), 1).unwrap_err();
        assert!(
            matches!(e, Failure::Extract(ExtractError::Blocked { .. })),
            "{e:?}"
        );
    }

    /// Asserts that extracting `data` fails without creating anything in `outside`.
    fn assert_refused(data: &[u8], root: &Path, outside: &Path) {
        let r = extract(data, root, ExtractOptions::default(), 3);
        match r {
            Err(Failure::Extract(ExtractError::UnsafePath { .. }))
            | Err(Failure::Tar(TarError::AbsolutePath { .. })) => {}
            other => panic!("expected refusal, got {other:?}"),
        }
        assert_eq!(walk(outside), Vec::<String>::new());
    }

    #[test]
    fn path_traversal_is_refused() {
        let tmp = tempdir();
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        // `root` sits next to `outside`, so `../outside/x` is the escape.
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "dotdot",
                Tb::new().raw(b"../outside/x", b'0', b"x", b"").done(),
            ),
            (
                "nested dotdot",
                Tb::new().raw(b"a/../../outside/x", b'0', b"x", b"").done(),
            ),
            (
                "dotdot dir",
                Tb::new().raw(b"../outside/d", b'5', b"", b"").done(),
            ),
            ("absolute", Tb::new().raw(b"/etc/x", b'0', b"x", b"").done()),
            (
                "through symlink",
                Tb::new()
                    .symlink("evil", outside.to_str().unwrap())
                    .file("evil/file", b"x", 1)
                    .done(),
            ),
            (
                "through relative symlink",
                Tb::new()
                    .symlink("evil", "../outside")
                    .dir("evil/sub", 1)
                    .done(),
            ),
            (
                "symlink deeper",
                Tb::new()
                    .dir("d", 1)
                    .symlink("d/evil", "../../outside")
                    .file("d/evil/a/b", b"x", 1)
                    .done(),
            ),
            (
                "hard link out",
                Tb::new().raw(b"h", b'1', b"", b"../outside/x").done(),
            ),
            (
                "hard link through symlink",
                Tb::new()
                    .symlink("evil", "../outside")
                    .raw(b"h", b'1', b"", b"evil/x")
                    .done(),
            ),
        ];
        fs::write(tmp.path().join("victim"), b"v").unwrap();
        for (name, data) in cases {
            let root = tmp.path().join(format!("root-{}", name.replace(' ', "-")));
            prepare_target_dir(&root).unwrap();
            eprintln!("case {name}");
            assert_refused(&data, &root, &outside);
        }
        // A hard link to a file outside root, reached through a symlink, with the file present.
        fs::write(outside.join("secret"), b"s").unwrap();
        let root = tmp.path().join("root-hl");
        prepare_target_dir(&root).unwrap();
        let data = Tb::new()
            .symlink("evil", "../outside")
            .raw(b"h", b'1', b"", b"evil/secret")
            .done();
        assert!(extract(&data, &root, ExtractOptions::default(), 1).is_err());
        assert!(!root.join("h").exists());
        // A file entry named like an earlier symlink is not written through it.
        let root = tmp.path().join("root-over");
        prepare_target_dir(&root).unwrap();
        let data = Tb::new()
            .symlink("evil", "../outside/over")
            .file("evil", b"x", 1)
            .done();
        let e = extract(&data, &root, ExtractOptions::default(), 1).unwrap_err();
        assert!(
            matches!(e, Failure::Extract(ExtractError::Exists { .. })),
            "{e:?}"
        );
        assert!(!outside.join("over").exists());
    }

    #[test]
    fn unsafe_entries_fed_directly_are_refused() {
        // EntryMeta has public fields: the extractor checks for itself.
        let tmp = tempdir();
        let mut x = Extractor::new(tmp.path(), ExtractOptions::default());
        for (path, kind) in [
            ("/etc/x", EntryKind::File),
            ("a/../../x", EntryKind::File),
            ("..", EntryKind::Directory),
            ("", EntryKind::File),
            ("a\0b", EntryKind::File),
        ] {
            let meta = EntryMeta {
                path: path.into(),
                kind,
                size: 0,
                mode: 0o644,
                mtime: 0,
            };
            let e = x
                .handle(TarEvent::Entry {
                    raw: Bytes::new(),
                    meta,
                })
                .unwrap_err();
            assert!(
                matches!(e, ExtractError::UnsafePath { .. }),
                "{path:?}: {e}"
            );
            assert!(e.to_string().contains("refusing archive entry"), "{e}");
        }
        let fifo = EntryMeta {
            path: "fifo".into(),
            kind: EntryKind::Other(b'6'),
            size: 0,
            mode: 0o644,
            mtime: 0,
        };
        let e = x
            .handle(TarEvent::Entry {
                raw: Bytes::new(),
                meta: fifo,
            })
            .unwrap_err();
        assert!(
            matches!(e, ExtractError::Unsupported { kind: '6', .. }),
            "{e}"
        );
        assert_eq!(walk(tmp.path()), Vec::<String>::new());
    }

    #[test]
    fn event_order_is_checked() {
        let tmp = tempdir();
        let mut x = Extractor::new(tmp.path(), ExtractOptions::default());
        let e = x
            .handle(TarEvent::Data(Bytes::from_static(b"x")))
            .unwrap_err();
        assert!(matches!(e, ExtractError::Sequence(_)), "{e}");
        let meta = EntryMeta {
            path: "f".into(),
            kind: EntryKind::File,
            size: 2,
            mode: 0o644,
            mtime: 0,
        };
        x.handle(TarEvent::Entry {
            raw: Bytes::new(),
            meta,
        })
        .unwrap();
        x.handle(TarEvent::Data(Bytes::from_static(b"x"))).unwrap();
        let e = x
            .handle(TarEvent::EntryEnd {
                padding: Bytes::new(),
            })
            .unwrap_err();
        assert!(e.to_string().contains("got 1 bytes"), "{e}");

        let mut x = Extractor::new(tmp.path(), ExtractOptions::default());
        let meta = EntryMeta {
            path: "g".into(),
            kind: EntryKind::File,
            size: 1,
            mode: 0o644,
            mtime: 0,
        };
        x.handle(TarEvent::Entry {
            raw: Bytes::new(),
            meta,
        })
        .unwrap();
        let e = x
            .handle(TarEvent::Data(Bytes::from_static(b"xy")))
            .unwrap_err();
        assert!(matches!(e, ExtractError::Sequence(_)), "{e}");
        assert!(matches!(x.finish(), Err(ExtractError::Sequence(_))));
    }

    #[test]
    fn tablespace_mapping() {
        let tmp = tempdir();
        let root = tmp.path().join("data");
        prepare_target_dir(&root).unwrap();
        let new_ts = tmp.path().join("ts-new");
        let opts = ExtractOptions {
            tablespace_mapping: vec![
                (PathBuf::from("/nonexistent/other"), tmp.path().join("x")),
                (PathBuf::from("/nonexistent/ts/"), new_ts.clone()),
            ],
            owner: None,
        };
        let base = Tb::new()
            .dir("pg_tblspc", 1)
            .symlink("pg_tblspc/16384", "/nonexistent/ts")
            .file("PG_VERSION", b"15\n", 1)
            .done();
        let stats = extract(&base, &root, opts.clone(), 1).unwrap();
        assert_eq!(stats.symlinks, 1);
        assert_eq!(fs::read_link(root.join("pg_tblspc/16384")).unwrap(), new_ts);
        assert!(new_ts.is_dir());
        assert_eq!(mode(&new_ts), 0o700);

        // The tablespace's own archive goes through a separate extractor rooted at the target.
        let mut x = Extractor::new(&root, opts.clone());
        x.register_tablespace(1, PathBuf::from("/r"));
        assert_eq!(x.tablespace_root_for(1), Some(PathBuf::from("/r")));
        assert_eq!(x.tablespace_root_for(16384), None);
        assert_eq!(
            opts.map_tablespace(Path::new("/nonexistent/ts")),
            new_ts.as_path()
        );
        assert_eq!(
            opts.map_tablespace(Path::new("/elsewhere")),
            Path::new("/elsewhere")
        );
        let ts = Tb::new()
            .dir("PG_15_202209061", 1)
            .file("PG_15_202209061/5/16385", &content(20_000, 7), 1)
            .done();
        extract(&ts, &new_ts, opts.clone(), 2).unwrap();
        assert_eq!(
            fs::read(root.join("pg_tblspc/16384/PG_15_202209061/5/16385")).unwrap(),
            content(20_000, 7)
        );

        // Entries under the link in base.tar are refused: a tablespace is written only through
        // its own extractor.
        let root2 = tmp.path().join("data2");
        prepare_target_dir(&root2).unwrap();
        let new_ts2 = tmp.path().join("ts2");
        let opts2 = ExtractOptions {
            tablespace_mapping: vec![(PathBuf::from("/nonexistent/ts"), new_ts2.clone())],
            owner: None,
        };
        let sneaky = Tb::new()
            .symlink("pg_tblspc/16384", "/nonexistent/ts")
            .file("pg_tblspc/16384/x", b"x", 1)
            .done();
        let e = extract(&sneaky, &root2, opts2, 1).unwrap_err();
        assert!(
            matches!(e, Failure::Extract(ExtractError::UnsafePath { .. })),
            "{e:?}"
        );
        assert_eq!(walk(&new_ts2), Vec::<String>::new());
    }

    #[test]
    fn tablespace_target_must_be_empty() {
        let tmp = tempdir();
        let root = tmp.path().join("data");
        prepare_target_dir(&root).unwrap();
        let busy = tmp.path().join("busy");
        fs::create_dir(&busy).unwrap();
        fs::write(busy.join("PG_15_202209061"), b"").unwrap();
        // Unmapped: the location itself is used.
        let base = Tb::new()
            .symlink("pg_tblspc/16385", busy.to_str().unwrap())
            .done();
        let e = extract(&base, &root, ExtractOptions::default(), 1).unwrap_err();
        let Failure::Extract(e @ ExtractError::Tablespace { oid: 16385, .. }) = e else {
            panic!("{e:?}")
        };
        let msg = e.to_string();
        assert!(
            msg.contains("is not empty (found PG_15_202209061)"),
            "{msg}"
        );
        assert!(msg.contains("tablespace mapping"), "{msg}");
        assert!(!root.join("pg_tblspc/16385").exists());

        // An empty existing location is fine; a relative one is not.
        let empty = tmp.path().join("empty-ts");
        fs::create_dir(&empty).unwrap();
        let root = tmp.path().join("data-ok");
        prepare_target_dir(&root).unwrap();
        let base = Tb::new()
            .symlink("pg_tblspc/7", empty.to_str().unwrap())
            .done();
        extract(&base, &root, ExtractOptions::default(), 1).unwrap();
        let root = tmp.path().join("data-rel");
        prepare_target_dir(&root).unwrap();
        let base = Tb::new().symlink("pg_tblspc/8", "relative/ts").done();
        let e = extract(&base, &root, ExtractOptions::default(), 1).unwrap_err();
        assert!(
            matches!(e, Failure::Extract(ExtractError::Tablespace { oid: 8, .. })),
            "{e:?}"
        );
        // Two tablespaces mapped to one directory.
        let root = tmp.path().join("data-dup");
        prepare_target_dir(&root).unwrap();
        let same = tmp.path().join("same");
        let opts = ExtractOptions {
            tablespace_mapping: vec![
                (PathBuf::from("/a"), same.clone()),
                (PathBuf::from("/b"), same.clone()),
            ],
            owner: None,
        };
        let base = Tb::new()
            .symlink("pg_tblspc/1", "/a")
            .symlink("pg_tblspc/2", "/b")
            .done();
        let e = extract(&base, &root, opts, 1).unwrap_err();
        assert!(
            matches!(e, Failure::Extract(ExtractError::Tablespace { oid: 2, .. })),
            "{e:?}"
        );
    }

    #[test]
    fn registered_tablespace_extracted_first() {
        // The server sends <oid>.tar before base.tar.
        let tmp = tempdir();
        let location = "/nonexistent/ts";
        let target = tmp.path().join("ts");
        let opts = ExtractOptions {
            tablespace_mapping: vec![(PathBuf::from(location), target.clone())],
            owner: None,
        };
        let t = opts.map_tablespace(Path::new(location));
        assert!(prepare_target_dir(&t).unwrap());
        let ts = Tb::new().file("PG_15_1/1/2", b"rel", 1).done();
        extract(&ts, &t, opts.clone(), 1).unwrap();

        let root = tmp.path().join("data");
        prepare_target_dir(&root).unwrap();
        let base = Tb::new().symlink("pg_tblspc/99", location).done();
        let mut p = TarParser::new();
        let mut events = Vec::new();
        p.feed(Bytes::from(base.clone()), &mut events).unwrap();
        p.finish(&mut events).unwrap();
        let mut x = Extractor::new(&root, opts.clone());
        x.register_tablespace(99, t.clone());
        for ev in events.clone() {
            x.handle(ev).unwrap();
        }
        assert_eq!(x.tablespace_root_for(99), Some(target.clone()));
        x.finish().unwrap();
        assert_eq!(
            fs::read(root.join("pg_tblspc/99/PG_15_1/1/2")).unwrap(),
            b"rel"
        );
        // Registered elsewhere than the archive's (mapped) link: refused.
        let root = tmp.path().join("data2");
        prepare_target_dir(&root).unwrap();
        let mut x = Extractor::new(&root, opts);
        x.register_tablespace(99, tmp.path().join("other"));
        let e = events
            .into_iter()
            .try_for_each(|ev| x.handle(ev))
            .unwrap_err();
        assert!(matches!(e, ExtractError::Tablespace { oid: 99, .. }), "{e}");
    }

    #[test]
    fn prepare_target_dir_cases() {
        let tmp = tempdir();
        // Missing with its parent present: created, 0700.
        let new = tmp.path().join("new");
        assert!(prepare_target_dir(&new).unwrap());
        assert_eq!(mode(&new), 0o700);
        // Existing and empty.
        assert!(!prepare_target_dir(&new).unwrap());
        // Not empty.
        fs::write(new.join("PG_VERSION"), b"15\n").unwrap();
        let e = prepare_target_dir(&new).unwrap_err();
        assert!(matches!(e, ExtractError::NotEmpty { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            format!(
                "target directory {} is not empty (found PG_VERSION)",
                new.display()
            )
        );
        assert_eq!(e.hint().unwrap(), "choose an empty or new directory");
        // Parent missing.
        let orphan = tmp.path().join("no/such/dir");
        let e = prepare_target_dir(&orphan).unwrap_err();
        assert!(
            matches!(&e, ExtractError::ParentMissing { parent, .. } if parent == &tmp.path().join("no/such")),
            "{e}"
        );
        assert!(e.to_string().contains("does not exist"), "{e}");
        assert!(e.hint().unwrap().contains("create the parent first"), "{e}");
        // Not a directory, itself or its parent.
        let file = tmp.path().join("file");
        fs::write(&file, b"").unwrap();
        let e = prepare_target_dir(&file).unwrap_err();
        assert!(matches!(e, ExtractError::NotADirectory { .. }), "{e}");
        let e = prepare_target_dir(&file.join("sub")).unwrap_err();
        assert!(matches!(e, ExtractError::NotADirectory { .. }), "{e}");
        let e = prepare_target_dir(&file.join("sub/sub")).unwrap_err();
        assert!(matches!(e, ExtractError::ParentMissing { .. }), "{e}");
        // A symlink to an empty directory is accepted (like /var/lib/postgresql -> /data).
        let link = tmp.path().join("link");
        let empty = tmp.path().join("empty");
        fs::create_dir(&empty).unwrap();
        std::os::unix::fs::symlink(&empty, &link).unwrap();
        assert!(!prepare_target_dir(&link).unwrap());
        // Not writable (root can write anywhere: checked only for other users).
        if unsafe { libc::geteuid() } != 0 {
            let ro = tmp.path().join("ro");
            fs::create_dir(&ro).unwrap();
            fs::set_permissions(&ro, fs::Permissions::from_mode(0o500)).unwrap();
            let e = prepare_target_dir(&ro).unwrap_err();
            assert!(matches!(e, ExtractError::NotWritable { .. }), "{e}");
            let e = prepare_target_dir(&ro.join("sub")).unwrap_err();
            assert!(matches!(e, ExtractError::NotWritable { .. }), "{e}");
            assert!(e.to_string().contains("is not writable"), "{e}");
            assert!(
                e.hint()
                    .unwrap()
                    .contains("fix its ownership or permissions"),
                "{e}"
            );
            fs::set_permissions(&ro, fs::Permissions::from_mode(0o700)).unwrap();
        }
    }

    #[test]
    fn mapping_arguments() {
        assert_eq!(
            parse_tablespace_mapping("/old/ts=/new/ts").unwrap(),
            (PathBuf::from("/old/ts"), PathBuf::from("/new/ts"))
        );
        assert_eq!(
            parse_tablespace_mapping(r"/a\=b=/c").unwrap(),
            (PathBuf::from("/a=b"), PathBuf::from("/c"))
        );
        for bad in ["/a", "/a=", "=/b", "/a=/b=/c", "a=/b", "/a=b"] {
            let e = parse_tablespace_mapping(bad).unwrap_err();
            assert!(matches!(e, ExtractError::BadMapping { .. }), "{bad}: {e}");
            assert!(e.to_string().contains("OLDDIR=NEWDIR"), "{e}");
        }
    }

    #[test]
    fn enospc_and_eexist_get_their_own_errors() {
        let p = Path::new("/data/base/1/1234");
        let e = io_err("write", p, io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(
            e.to_string(),
            "no space left on device writing /data/base/1/1234"
        );
        assert_eq!(
            e.hint().unwrap(),
            "free some space or extract to a larger filesystem"
        );
        let e = io_err("create file", p, io::Error::from_raw_os_error(libc::EEXIST));
        assert!(matches!(e, ExtractError::Exists { .. }));
        let e = io_err("write", p, io::Error::from_raw_os_error(libc::EIO));
        assert!(
            e.to_string()
                .starts_with("cannot write /data/base/1/1234: "),
            "{e}"
        );
    }

    #[test]
    fn large_data_events_are_written_directly() {
        // Events bigger than the buffer, and a mix around its size.
        let tmp = tempdir();
        let mut x = Extractor::new(tmp.path(), ExtractOptions::default());
        let sizes = [
            10,
            WRITE_BUFFER - 5,
            7,
            WRITE_BUFFER + 3,
            1,
            2 * WRITE_BUFFER,
        ];
        let total: usize = sizes.iter().sum();
        let data = content(total, 9);
        x.handle(TarEvent::Entry {
            raw: Bytes::new(),
            meta: EntryMeta {
                path: "big".into(),
                kind: EntryKind::File,
                size: total as u64,
                mode: 0,
                mtime: 1,
            },
        })
        .unwrap();
        let mut at = 0;
        for s in sizes {
            x.handle(TarEvent::Data(Bytes::copy_from_slice(&data[at..at + s])))
                .unwrap();
            at += s;
        }
        x.handle(TarEvent::EntryEnd {
            padding: Bytes::new(),
        })
        .unwrap();
        let stats = x.finish().unwrap();
        assert_eq!(stats.bytes, total as u64);
        assert!(fs::read(tmp.path().join("big")).unwrap() == data);
    }
}
