//! [`LocalStore`]: the archive in a local directory (or a mounted filesystem).
//!
//! Durability: an object becomes visible under its key only by an atomic rename of a file whose
//! content is already fsynced, and the directory is fsynced before a put returns. A crash leaves
//! either the old state or the new one, plus possibly a temp file (`.<name>.tmp.<pid>.<n>`) that
//! [`Store::list`] never shows and [`LocalStore::open`] removes. See `proto-notes/archive-layout.md`.

use std::collections::HashSet;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use async_trait::async_trait;
use bytes::Bytes;

use super::compress::{create_private, read_full};
use super::layout::{validate_key, WAL_PREFIX};
use super::{ObjectInfo, ObjectReader, ObjectWriter, PutMode, Store, StoreError};

/// An archive rooted at a local directory. Keys map to paths below the root ('/' separated).
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

const CMP_BUF: usize = 1 << 20;

impl LocalStore {
    /// Opens the archive at `root` for writing: creates `root` and `root/wal` (mode 0700) when
    /// missing, and removes temp files left by puts of crashed processes.
    pub fn open(root: &Path) -> Result<LocalStore, StoreError> {
        let store = LocalStore {
            root: root.to_path_buf(),
        };
        let created = create_dir_0700(root).map_err(|e| {
            StoreError::io(
                format!("cannot create archive directory {}", root.display()),
                e,
            )
        })?;
        if created {
            // Make the new directory's entry durable too.
            match root.parent() {
                Some(p) if !p.as_os_str().is_empty() => fsync_dir(p)?,
                _ => fsync_dir(Path::new("."))?,
            }
        }
        let md = fs::metadata(root).map_err(|e| {
            StoreError::io(
                format!("cannot access archive directory {}", root.display()),
                e,
            )
        })?;
        if !md.is_dir() {
            return Err(StoreError::io(
                format!("archive path {} is not a directory", root.display()),
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "choose a directory for --archive",
                ),
            ));
        }
        let wal = root.join(WAL_PREFIX.trim_end_matches('/'));
        if create_dir_0700(&wal).map_err(|e| {
            StoreError::io(
                format!("cannot create archive directory {}", wal.display()),
                e,
            )
        })? {
            fsync_dir(root)?;
        }
        store.remove_stale_temps(root)?;
        Ok(store)
    }

    /// Opens an existing archive for reading (wal-fetch): creates nothing and removes nothing, so
    /// it never disturbs a writer working on the same archive.
    pub fn open_existing(root: &Path) -> Result<LocalStore, StoreError> {
        match fs::metadata(root) {
            Ok(md) if md.is_dir() => Ok(LocalStore {
                root: root.to_path_buf(),
            }),
            Ok(_) => Err(StoreError::io(
                format!("{} is not a directory", root.display()),
                io::Error::new(io::ErrorKind::InvalidInput, "check --archive"),
            )),
            Err(e) => Err(StoreError::io(
                format!("{} (check --archive)", root.display()),
                e,
            )),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file that holds `key`.
    pub fn path_of(&self, key: &str) -> Result<PathBuf, StoreError> {
        validate_key(key)?;
        Ok(self.root.join(key))
    }

    fn remove_stale_temps(&self, dir: &Path) -> Result<(), StoreError> {
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return Err(StoreError::io(
                    format!("cannot read archive directory {}", dir.display()),
                    e,
                ))
            }
        };
        let me = std::process::id();
        let mut removed = false;
        for entry in entries {
            let entry = entry.map_err(|e| {
                StoreError::io(
                    format!("cannot read archive directory {}", dir.display()),
                    e,
                )
            })?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Ok(ft) = entry.file_type() else { continue };
            let path = entry.path();
            if ft.is_dir() {
                if !name.starts_with('.') {
                    self.remove_stale_temps(&path)?;
                }
                continue;
            }
            let Some(pid) = parse_temp_name(name) else {
                continue;
            };
            let stale = if pid == me {
                !in_flight()
                    .lock()
                    .map(|s| s.contains(&path))
                    .unwrap_or(true)
            } else {
                !pid_alive(pid)
            };
            if stale {
                match fs::remove_file(&path) {
                    Ok(()) => removed = true,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(StoreError::io(
                            format!("cannot remove stale temp file {}", path.display()),
                            e,
                        ))
                    }
                }
            }
        }
        if removed {
            fsync_dir(dir)?;
        }
        Ok(())
    }

    fn put_bytes_blocking(&self, key: &str, data: &[u8], mode: PutMode) -> Result<(), StoreError> {
        let path = self.path_of(key)?;
        let dir = self.ensure_parent(&path)?;
        if mode == PutMode::NoOverwrite {
            if let Some(same) = same_as_bytes(&path, data)? {
                return if same {
                    Ok(())
                } else {
                    Err(StoreError::Conflict {
                        key: key.to_string(),
                    })
                };
            }
        }
        if mode == PutMode::Replace {
            remove_sidecar(&path)?;
        }
        let tmp = TempFile::create(&path)?;
        let res = (|| {
            let mut f = &tmp.file;
            f.write_all(data).map_err(|e| write_err(&tmp.path, e))?;
            crate::fsutil::sync_file(&tmp.file).map_err(|e| write_err(&tmp.path, e))?;
            install(&tmp.path, &path, key, mode)
        })();
        drop(tmp); // removes the temp unless it was renamed into place
        res?;
        fsync_dir(&dir)
    }

    fn put_file_blocking(&self, key: &str, src: &Path, mode: PutMode) -> Result<(), StoreError> {
        let path = self.path_of(key)?;
        let dir = self.ensure_parent(&path)?;
        let read_err = |e: io::Error| {
            StoreError::io(
                format!("cannot read {} to archive it as {key}", src.display()),
                e,
            )
        };
        if mode == PutMode::NoOverwrite && exists(&path)? {
            return match same_files(src, &path).map_err(read_err)? {
                true => Ok(()),
                false => Err(StoreError::Conflict {
                    key: key.to_string(),
                }),
            };
        }
        if mode == PutMode::Replace {
            remove_sidecar(&path)?;
        }
        // Fast path: src is on this filesystem. Make it 0600 and durable, then rename it into
        // place: no copy, and no moment where the only copy sits under a temp name.
        let f = File::open(src).map_err(read_err)?;
        let private = match f.metadata().map_err(read_err)?.permissions().mode() & 0o777 {
            0o600 => true,
            _ => f.set_permissions(fs::Permissions::from_mode(0o600)).is_ok(),
        };
        if private {
            crate::fsutil::sync_file(&f)
                .map_err(|e| StoreError::io(format!("cannot fsync {}", src.display()), e))?;
            drop(f);
            match install(src, &path, key, mode) {
                Ok(()) => return fsync_dir(&dir),
                Err(StoreError::Io { source, .. })
                    if source.raw_os_error() == Some(libc::EXDEV) => {}
                Err(e) => return Err(e),
            }
        } else {
            drop(f);
        }
        // Other filesystem (EXDEV) or a file we may not chmod: copy into a temp, then rename.
        let mut input = File::open(src).map_err(read_err)?;
        let tmp = TempFile::create(&path)?;
        let res = (|| {
            let mut out = &tmp.file;
            io::copy(&mut input, &mut out).map_err(|e| write_err(&tmp.path, e))?;
            crate::fsutil::sync_file(&tmp.file).map_err(|e| write_err(&tmp.path, e))?;
            install(&tmp.path, &path, key, mode)
        })();
        drop(tmp);
        res?;
        fsync_dir(&dir)
    }

    fn get_to_file_blocking(&self, key: &str, dest: &Path) -> Result<bool, StoreError> {
        let path = self.path_of(key)?;
        let mut input = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(read_obj_err(&path, e)),
        };
        let expected = read_sidecar(&path, key)?;
        let mut out = create_private(dest)
            .map_err(|e| StoreError::io(format!("cannot create {}", dest.display()), e))?;
        let mut hashing = CrcWriter {
            inner: &mut out,
            hasher: crc32fast::Hasher::new(),
            n: 0,
        };
        io::copy(&mut input, &mut hashing).map_err(|e| {
            StoreError::io(
                format!(
                    "cannot copy archive object {} to {}",
                    path.display(),
                    dest.display()
                ),
                e,
            )
        })?;
        if let Some(want) = expected {
            let (got, n) = (hashing.hasher.finalize(), hashing.n);
            if let Err(e) = check_crc(key, want, got, n) {
                // Never leave unverified bytes behind.
                drop(out);
                let _ = fs::remove_file(dest);
                return Err(e);
            }
        }
        Ok(true)
    }

    fn list_blocking(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        // Walk the deepest directory the prefix names, then filter by the full prefix.
        let dir_part = match prefix.rfind('/') {
            Some(i) => &prefix[..i],
            None => "",
        };
        let start = if dir_part.is_empty() {
            self.root.clone()
        } else {
            validate_key(dir_part)?;
            self.root.join(dir_part)
        };
        let mut out = Vec::new();
        let base = if dir_part.is_empty() {
            String::new()
        } else {
            format!("{dir_part}/")
        };
        walk(&start, &base, prefix, &mut out)?;
        Ok(out)
    }

    /// Puts a new object under `key` whose content `fill` writes: into a temp file beside the
    /// target (removed on failure; a crash leaves one [`LocalStore::open`] removes), fsynced,
    /// renamed into place without overwriting, the directory fsynced. An existing object with
    /// other content is [`StoreError::Conflict`] (identical content: Ok). Compaction uses it.
    pub(crate) fn put_new_with(
        &self,
        key: &str,
        fill: impl FnOnce(&mut File) -> io::Result<()>,
    ) -> Result<(), StoreError> {
        let path = self.path_of(key)?;
        let dir = self.ensure_parent(&path)?;
        let mut tmp = TempFile::create(&path)?;
        let res = (|| {
            fill(&mut tmp.file).map_err(|e| write_err(&tmp.path, e))?;
            crate::fsutil::sync_file(&tmp.file).map_err(|e| write_err(&tmp.path, e))?;
            install(&tmp.path, &path, key, PutMode::NoOverwrite)
        })();
        drop(tmp); // removes the temp unless it was renamed into place
        res?;
        fsync_dir(&dir)
    }

    pub(crate) fn delete_blocking(&self, key: &str) -> Result<(), StoreError> {
        let path = self.path_of(key)?;
        remove_sidecar(&path)?;
        match fs::remove_file(&path) {
            Ok(()) => fsync_dir(path.parent().unwrap_or(&self.root)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::io(
                format!("cannot delete archive object {}", path.display()),
                e,
            )),
        }
    }

    /// Creates the missing directories between the root and `path`'s parent (0700, each fsynced
    /// into its parent). Returns the parent.
    fn ensure_parent(&self, path: &Path) -> Result<PathBuf, StoreError> {
        let parent = path.parent().unwrap_or(&self.root).to_path_buf();
        if parent.is_dir() {
            return Ok(parent);
        }
        let rel = parent.strip_prefix(&self.root).unwrap_or(Path::new(""));
        let mut cur = self.root.clone();
        for comp in rel.components() {
            let next = cur.join(comp);
            let created = create_dir_0700(&next).map_err(|e| {
                StoreError::io(
                    format!("cannot create archive directory {}", next.display()),
                    e,
                )
            })?;
            if created {
                fsync_dir(&cur)?;
            }
            cur = next;
        }
        Ok(parent)
    }
}

#[async_trait]
impl Store for LocalStore {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn local_root(&self) -> Option<PathBuf> {
        Some(self.root.clone())
    }

    async fn put_file(&self, key: &str, src: &Path, mode: PutMode) -> Result<(), StoreError> {
        let (this, key, src) = (self.clone(), key.to_string(), src.to_path_buf());
        blocking(move || this.put_file_blocking(&key, &src, mode)).await
    }

    async fn put_bytes(&self, key: &str, data: Bytes, mode: PutMode) -> Result<(), StoreError> {
        let (this, key) = (self.clone(), key.to_string());
        blocking(move || this.put_bytes_blocking(&key, &data, mode)).await
    }

    async fn get_bytes(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        let path = self.path_of(key)?;
        let key = key.to_string();
        blocking(move || match fs::read(&path) {
            Ok(v) => {
                if let Some(want) = read_sidecar(&path, &key)? {
                    check_crc(&key, want, crc32fast::hash(&v), v.len() as u64)?;
                }
                Ok(Some(Bytes::from(v)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(read_obj_err(&path, e)),
        })
        .await
    }

    async fn get_to_file(&self, key: &str, dest: &Path) -> Result<bool, StoreError> {
        let (this, key, dest) = (self.clone(), key.to_string(), dest.to_path_buf());
        blocking(move || this.get_to_file_blocking(&key, &dest)).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        let (this, prefix) = (self.clone(), prefix.to_string());
        blocking(move || this.list_blocking(&prefix)).await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let (this, key) = (self.clone(), key.to_string());
        blocking(move || this.delete_blocking(&key)).await
    }

    async fn create_writer(&self, key: &str) -> Result<Box<dyn ObjectWriter>, StoreError> {
        let store = self.clone();
        let key = key.to_string();
        blocking(move || {
            let path = store.path_of(&key)?;
            let dir = store.ensure_parent(&path)?;
            let tmp = TempFile::create(&path)?;
            Ok(Box::new(LocalWriter {
                key,
                target: path,
                dir,
                tmp: Some(tmp),
                written: 0,
                crc: crc32fast::Hasher::new(),
            }) as Box<dyn ObjectWriter>)
        })
        .await
    }

    async fn open_reader(&self, key: &str) -> Result<Option<Box<dyn ObjectReader>>, StoreError> {
        let path = self.path_of(key)?;
        let file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(read_obj_err(&path, e)),
        };
        let (p, k) = (path.clone(), key.to_string());
        let expected = blocking(move || read_sidecar(&p, &k)).await?;
        Ok(Some(Box::new(LocalReader {
            key: key.to_string(),
            file,
            path,
            expected,
            hasher: crc32fast::Hasher::new(),
            got: 0,
        })))
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(StoreError::io(
            "archive I/O task failed",
            io::Error::other(e.to_string()),
        )),
    }
}

fn write_err(path: &Path, e: io::Error) -> StoreError {
    StoreError::io(format!("cannot write archive file {}", path.display()), e)
}

fn read_obj_err(path: &Path, e: io::Error) -> StoreError {
    StoreError::io(format!("cannot read archive object {}", path.display()), e)
}

/// Creates `dir` with mode 0700; Ok(false) when it already exists.
fn create_dir_0700(dir: &Path) -> io::Result<bool> {
    match DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // Missing ancestors: create them too (0700), then this one.
            DirBuilder::new().mode(0o700).recursive(true).create(dir)?;
            Ok(true)
        }
        Err(e) => Err(e),
    }
}

/// [`crate::fsutil::sync_dir`] with the archive's error context.
fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    crate::fsutil::sync_dir(dir).map_err(|e| {
        StoreError::io(
            format!("cannot fsync archive directory {}", dir.display()),
            e,
        )
    })
}

fn exists(path: &Path) -> Result<bool, StoreError> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(read_obj_err(path, e)),
    }
}

/// Moves `from` to `to`. `NoOverwrite` uses an atomic no-replace rename where the kernel and
/// filesystem offer one; when `to` exists it compares contents instead (identical: Ok, leaving
/// `from` in place; different: Conflict).
fn install(from: &Path, to: &Path, key: &str, mode: PutMode) -> Result<(), StoreError> {
    let rename_err = |e: io::Error| {
        StoreError::io(
            format!("cannot rename {} to {}", from.display(), to.display()),
            e,
        )
    };
    if mode == PutMode::Replace {
        return fs::rename(from, to).map_err(rename_err);
    }
    match rename_noreplace(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            match same_files(from, to).map_err(|e| read_obj_err(to, e))? {
                true => Ok(()),
                false => Err(StoreError::Conflict {
                    key: key.to_string(),
                }),
            }
        }
        Err(e) if is_unsupported(&e) => {
            // Filesystem without RENAME_NOREPLACE: check, then rename (the caller checked just
            // before; only a concurrent writer of the same key can slip in between).
            if exists(to)? {
                return match same_files(from, to).map_err(|e| read_obj_err(to, e))? {
                    true => Ok(()),
                    false => Err(StoreError::Conflict {
                        key: key.to_string(),
                    }),
                };
            }
            fs::rename(from, to).map_err(rename_err)
        }
        Err(e) => Err(rename_err(e)),
    }
}

fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP)
    ) || e.kind() == io::ErrorKind::Unsupported
}

#[cfg(target_os = "linux")]
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let cstr = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
    };
    let (a, b) = (cstr(from)?, cstr(to)?);
    // SAFETY: both pointers are valid NUL-terminated strings for the duration of the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn rename_noreplace(_from: &Path, _to: &Path) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "no atomic no-replace rename on this platform",
    ))
}

/// Streams both files and compares them chunk by chunk.
fn same_files(a: &Path, b: &Path) -> io::Result<bool> {
    let mut fa = File::open(a)?;
    let mut fb = File::open(b)?;
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let mut ba = vec![0u8; CMP_BUF];
    let mut bb = vec![0u8; CMP_BUF];
    loop {
        let na = read_full(&mut fa, &mut ba)?;
        let nb = read_full(&mut fb, &mut bb)?;
        if na != nb || ba[..na] != bb[..nb] {
            return Ok(false);
        }
        if na == 0 {
            return Ok(true);
        }
    }
}

/// `None` when `path` is absent, else whether it holds exactly `data`.
fn same_as_bytes(path: &Path, data: &[u8]) -> Result<Option<bool>, StoreError> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(read_obj_err(path, e)),
    };
    let len = f.metadata().map_err(|e| read_obj_err(path, e))?.len();
    if len != data.len() as u64 {
        return Ok(Some(false));
    }
    let mut buf = vec![0u8; CMP_BUF.min(data.len().max(1))];
    let mut off = 0;
    loop {
        let n = read_full(&mut f, &mut buf).map_err(|e| read_obj_err(path, e))?;
        if n == 0 {
            return Ok(Some(off == data.len()));
        }
        if off + n > data.len() || buf[..n] != data[off..off + n] {
            return Ok(Some(false));
        }
        off += n;
    }
}

/// Recursively lists regular files under `dir` whose key (`base` + relative path) starts with
/// `prefix`. Dot-names (temp files) are skipped; a missing `dir` lists nothing.
fn walk(dir: &Path, base: &str, prefix: &str, out: &mut Vec<ObjectInfo>) -> Result<(), StoreError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            ) =>
        {
            return Ok(())
        }
        Err(e) => {
            return Err(StoreError::io(
                format!("cannot list archive directory {}", dir.display()),
                e,
            ))
        }
    };
    for entry in entries {
        let entry = entry.map_err(|e| {
            StoreError::io(
                format!("cannot list archive directory {}", dir.display()),
                e,
            )
        })?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') {
            continue;
        }
        let key = format!("{base}{name}");
        let ft = match entry.file_type() {
            Ok(ft) => ft,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(read_obj_err(&entry.path(), e)),
        };
        if ft.is_dir() {
            // Descend only where keys below can still match the prefix.
            let sub = format!("{key}/");
            if sub.starts_with(prefix) || prefix.starts_with(&sub) {
                walk(&entry.path(), &sub, prefix, out)?;
            }
            continue;
        }
        if !key.starts_with(prefix) {
            continue;
        }
        // Follow symlinks to files; skip anything that is not a regular file.
        match fs::metadata(entry.path()) {
            Ok(md) if md.is_file() => out.push(ObjectInfo {
                key,
                size: md.len(),
                etag: Some(local_marker(&md)),
            }),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(read_obj_err(&entry.path(), e)),
        }
    }
    Ok(())
}

/// The local store's change marker: modification time in nanoseconds and inode. Every put
/// renames a new file into place, so a replaced object gets a new inode.
fn local_marker(md: &fs::Metadata) -> String {
    use std::os::unix::fs::MetadataExt;
    format!("{}.{:09}-{}", md.mtime(), md.mtime_nsec(), md.ino())
}

// ---- streaming objects ------------------------------------------------------------------------

/// Writes into a temp file next to the target; `finish` fsyncs it, renames it into place and
/// fsyncs the directory, so the object appears whole or not at all.
struct LocalWriter {
    key: String,
    target: PathBuf,
    dir: PathBuf,
    /// Taken while a blocking write runs.
    tmp: Option<TempFile>,
    written: u64,
    /// CRC-32 of what was written, for the sidecar.
    crc: crc32fast::Hasher,
}

#[async_trait]
impl ObjectWriter for LocalWriter {
    async fn write(&mut self, data: Bytes) -> Result<(), StoreError> {
        let Some(tmp) = self.tmp.take() else {
            return Err(StoreError::io(
                format!("cannot write archive object {}", self.key),
                io::Error::other("an earlier write failed"),
            ));
        };
        let n = data.len() as u64;
        self.crc.update(&data);
        let tmp = blocking(move || {
            (&tmp.file)
                .write_all(&data)
                .map_err(|e| write_err(&tmp.path, e))?;
            Ok(tmp)
        })
        .await?;
        self.tmp = Some(tmp);
        self.written += n;
        Ok(())
    }

    async fn finish(mut self: Box<Self>) -> Result<u64, StoreError> {
        let Some(tmp) = self.tmp.take() else {
            return Err(StoreError::io(
                format!("cannot write archive object {}", self.key),
                io::Error::other("an earlier write failed"),
            ));
        };
        let (target, dir, key, written) = (
            self.target.clone(),
            self.dir.clone(),
            self.key.clone(),
            self.written,
        );
        let crc = self.crc.clone().finalize();
        blocking(move || {
            crate::fsutil::sync_file(&tmp.file).map_err(|e| write_err(&tmp.path, e))?;
            // An old sidecar must never vouch for the new content.
            remove_sidecar(&target)?;
            let res = install(&tmp.path, &target, &key, PutMode::Replace);
            drop(tmp);
            res?;
            write_sidecar(&target, crc)?;
            fsync_dir(&dir)?;
            Ok(written)
        })
        .await
    }

    async fn abort(mut self: Box<Self>) {
        // Dropping the temp file removes it.
        if let Some(tmp) = self.tmp.take() {
            let _ = tokio::task::spawn_blocking(move || drop(tmp)).await;
        }
    }
}

struct LocalReader {
    key: String,
    file: tokio::fs::File,
    path: PathBuf,
    /// From the sidecar, when the object has one.
    expected: Option<u32>,
    hasher: crc32fast::Hasher,
    got: u64,
}

#[async_trait]
impl ObjectReader for LocalReader {
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, StoreError> {
        use tokio::io::AsyncReadExt;
        let mut buf = bytes::BytesMut::with_capacity(1 << 20);
        while buf.len() < buf.capacity() {
            match self.file.read_buf(&mut buf).await {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => return Err(read_obj_err(&self.path, e)),
            }
        }
        if buf.is_empty() {
            if let Some(want) = self.expected.take() {
                check_crc(&self.key, want, self.hasher.clone().finalize(), self.got)?;
            }
            return Ok(None);
        }
        self.hasher.update(&buf);
        self.got += buf.len() as u64;
        Ok(Some(buf.freeze()))
    }
}

// ---- CRC-32 sidecars ----------------------------------------------------------------------------

/// Streamed objects (base backups) get a sidecar `.<name>.sfv` beside them: the object's CRC-32
/// (IEEE, as on S3) in SFV format, one line `<name> <CRC as 8 hex digits>`, which `cksfv -f` and
/// `rhash -c` check. Like temp files it starts with '.', so listings never show it.
pub(crate) fn sidecar_path(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    target.with_file_name(format!(".{name}.sfv"))
}

fn write_sidecar(target: &Path, crc: u32) -> Result<(), StoreError> {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let path = sidecar_path(target);
    let tmp = TempFile::create(&path)?;
    let res = (|| {
        let mut f = &tmp.file;
        f.write_all(
            format!(
                "; CRC-32 written by walagent; check with: cksfv -f {}\n{name} {crc:08X}\n",
                path.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            )
            .as_bytes(),
        )
        .map_err(|e| write_err(&tmp.path, e))?;
        crate::fsutil::sync_file(&tmp.file).map_err(|e| write_err(&tmp.path, e))?;
        install(&tmp.path, &path, &name, PutMode::Replace)
    })();
    drop(tmp);
    res
}

fn remove_sidecar(target: &Path) -> Result<(), StoreError> {
    let path = sidecar_path(target);
    match fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StoreError::io(
            format!("cannot remove {}", path.display()),
            e,
        )),
    }
}

/// The CRC-32 the sidecar of `target` records; None without a sidecar. A sidecar that does not
/// parse, or names another file, is Corrupt: the object cannot be verified.
fn read_sidecar(target: &Path, key: &str) -> Result<Option<u32>, StoreError> {
    let path = sidecar_path(target);
    let text = match fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(read_obj_err(&path, e)),
    };
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    parse_sidecar(&text, &name)
        .map(Some)
        .ok_or_else(|| StoreError::Corrupt {
            key: key.to_string(),
            detail: format!(
                "its checksum file {} is not a CRC-32 line for {name}",
                path.display()
            ),
        })
}

fn parse_sidecar(text: &[u8], name: &str) -> Option<u32> {
    let text = std::str::from_utf8(text).ok()?;
    let mut found = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with(';') {
            continue;
        }
        let (file, crc) = line.rsplit_once(' ')?;
        if file.trim_end() != name || crc.len() != 8 || found.is_some() {
            return None;
        }
        found = Some(u32::from_str_radix(crc, 16).ok()?);
    }
    found
}

fn check_crc(key: &str, want: u32, got: u32, n: u64) -> Result<(), StoreError> {
    if want == got {
        return Ok(());
    }
    Err(StoreError::Corrupt {
        key: key.to_string(),
        detail: format!(
            "CRC-32 mismatch: expected {want:08x} (checksum file), got {got:08x} over {n} bytes"
        ),
    })
}

/// Passes writes through and hashes them.
struct CrcWriter<'a, W: Write> {
    inner: &'a mut W,
    hasher: crc32fast::Hasher,
    n: u64,
}

impl<W: Write> Write for CrcWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        if let Some(done) = buf.get(..n) {
            self.hasher.update(done);
        }
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

// ---- temp files -------------------------------------------------------------------------------

static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Temp files this process is writing right now; `open` never removes these.
fn in_flight() -> &'static Mutex<HashSet<PathBuf>> {
    static SET: OnceLock<Mutex<HashSet<PathBuf>>> = OnceLock::new();
    SET.get_or_init(|| Mutex::new(HashSet::new()))
}

/// `.<name>.tmp.<pid>.<n>` next to the target.
fn temp_path_for(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let n = TEMP_SEQ.fetch_add(1, Ordering::Relaxed);
    target.with_file_name(format!(".{name}.tmp.{}.{n}", std::process::id()))
}

/// The pid in a temp file name made by [`temp_path_for`].
fn parse_temp_name(name: &str) -> Option<u32> {
    let rest = name.strip_prefix('.')?;
    let mut it = rest.rsplitn(3, '.');
    let seq = it.next()?;
    let pid = it.next()?;
    let stem = it.next()?;
    if seq.is_empty()
        || !seq.bytes().all(|b| b.is_ascii_digit())
        || !stem.ends_with(".tmp")
        || stem.len() <= 4
    {
        return None;
    }
    pid.parse().ok()
}

fn pid_alive(pid: u32) -> bool {
    let Ok(p) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if p <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks whether the process exists.
    let r = unsafe { libc::kill(p, 0) };
    r == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// A temp file being written; removed on drop unless it was renamed away.
struct TempFile {
    path: PathBuf,
    file: File,
}

impl TempFile {
    fn create(target: &Path) -> Result<TempFile, StoreError> {
        let path = temp_path_for(target);
        if let Ok(mut set) = in_flight().lock() {
            set.insert(path.clone());
        }
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(file) => Ok(TempFile { path, file }),
            Err(e) => {
                if let Ok(mut set) = in_flight().lock() {
                    set.remove(&path);
                }
                Err(StoreError::io(
                    format!("cannot create temp file {}", path.display()),
                    e,
                ))
            }
        }
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        // Gone already when the rename succeeded; otherwise clean up.
        let _ = fs::remove_file(&self.path);
        if let Ok(mut set) = in_flight().lock() {
            set.remove(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().mode() & 0o777
    }

    fn keys(mut v: Vec<ObjectInfo>) -> Vec<String> {
        v.sort_by(|a, b| a.key.cmp(&b.key));
        v.into_iter().map(|o| o.key).collect()
    }

    fn visible_files(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    const DEAD_PID: u32 = 2_147_483_000;

    #[tokio::test]
    async fn open_creates_private_dirs() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("a/b/archive");
        let s = LocalStore::open(&root).unwrap();
        assert_eq!(mode(&root), 0o700);
        assert_eq!(mode(&root.join("wal")), 0o700);
        assert_eq!(s.location(), root.display().to_string());
        // Reopen is fine.
        LocalStore::open(&root).unwrap();
        // A file where the archive should be is a clear error.
        let f = t.path().join("file");
        fs::write(&f, b"x").unwrap();
        let e = LocalStore::open(&f).unwrap_err().to_string();
        assert!(
            e.contains("not a directory") || e.contains("cannot create"),
            "{e}"
        );
        assert!(LocalStore::open_existing(&t.path().join("missing"))
            .unwrap_err()
            .to_string()
            .contains("check --archive"));
    }

    #[tokio::test]
    async fn bytes_round_trip_and_modes() {
        let t = tempfile::tempdir().unwrap();
        let s = LocalStore::open(t.path()).unwrap();
        assert_eq!(s.get_bytes("walagent.json").await.unwrap(), None);
        s.put_bytes(
            "walagent.json",
            Bytes::from_static(b"{\"format\":1}"),
            PutMode::Replace,
        )
        .await
        .unwrap();
        assert_eq!(
            s.get_bytes("walagent.json").await.unwrap().unwrap(),
            &b"{\"format\":1}"[..]
        );
        assert_eq!(mode(&t.path().join("walagent.json")), 0o600);
        s.put_bytes("walagent.json", Bytes::from_static(b"v2"), PutMode::Replace)
            .await
            .unwrap();
        assert_eq!(
            s.get_bytes("walagent.json").await.unwrap().unwrap(),
            &b"v2"[..]
        );
        // New subdirectories are created 0700.
        s.put_bytes("base/x/obj", Bytes::from_static(b"o"), PutMode::NoOverwrite)
            .await
            .unwrap();
        assert_eq!(mode(&t.path().join("base")), 0o700);
        assert_eq!(mode(&t.path().join("base/x")), 0o700);
        assert_eq!(mode(&t.path().join("base/x/obj")), 0o600);
        // No temp files left behind.
        assert_eq!(
            visible_files(t.path()),
            vec!["base", "wal", "walagent.json"]
        );
    }

    #[tokio::test]
    async fn put_file_round_trip_moves_src() {
        let t = tempfile::tempdir().unwrap();
        let s = LocalStore::open(&t.path().join("arch")).unwrap();
        let spool = t.path().join("spool");
        fs::create_dir(&spool).unwrap();
        let src = spool.join("000000010000000000000003.zst");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        fs::write(&src, &data).unwrap();
        fs::set_permissions(&src, fs::Permissions::from_mode(0o644)).unwrap();
        let key = "wal/000000010000000000000003.zst";
        s.put_file(key, &src, PutMode::NoOverwrite).await.unwrap();
        let p = s.path_of(key).unwrap();
        assert_eq!(mode(&p), 0o600);
        assert!(!src.exists(), "same filesystem: src is renamed into place");
        let dest = t.path().join("restored");
        assert!(s.get_to_file(key, &dest).await.unwrap());
        assert!(fs::read(&dest).unwrap() == data);
        assert_eq!(mode(&dest), 0o600);
        assert!(!s
            .get_to_file(
                "wal/000000010000000000000004.zst",
                &dest.with_extension("x")
            )
            .await
            .unwrap());
        assert!(!dest.with_extension("x").exists());
        assert_eq!(
            visible_files(&t.path().join("arch/wal")),
            vec!["000000010000000000000003.zst"]
        );
    }

    #[tokio::test]
    async fn no_overwrite_identical_and_conflict() {
        let t = tempfile::tempdir().unwrap();
        let s = LocalStore::open(&t.path().join("arch")).unwrap();
        let key = "wal/000000010000000000000003";
        let src = t.path().join("seg");
        fs::write(&src, vec![7u8; 100_000]).unwrap();
        s.put_file(key, &src, PutMode::NoOverwrite).await.unwrap();

        // Identical re-put: Ok, and src is left for the caller to delete.
        fs::write(&src, vec![7u8; 100_000]).unwrap();
        s.put_file(key, &src, PutMode::NoOverwrite).await.unwrap();
        assert!(src.exists());

        // Different content (same size, and different size): Conflict, object untouched.
        let mut other = vec![7u8; 100_000];
        other[99_999] = 8;
        fs::write(&src, &other).unwrap();
        let e = s
            .put_file(key, &src, PutMode::NoOverwrite)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, StoreError::Conflict { key: k } if k == key),
            "{e}"
        );
        assert!(e
            .to_string()
            .contains("already exists with different content"));
        assert!(src.exists());
        fs::write(&src, b"short").unwrap();
        assert!(matches!(
            s.put_file(key, &src, PutMode::NoOverwrite).await,
            Err(StoreError::Conflict { .. })
        ));
        assert!(fs::read(s.path_of(key).unwrap()).unwrap() == vec![7u8; 100_000]);

        // Same rules for put_bytes.
        s.put_bytes(
            "wal/00000002.history",
            Bytes::from_static(b"1\t0/3000000\tno recovery target\n"),
            PutMode::NoOverwrite,
        )
        .await
        .unwrap();
        s.put_bytes(
            "wal/00000002.history",
            Bytes::from_static(b"1\t0/3000000\tno recovery target\n"),
            PutMode::NoOverwrite,
        )
        .await
        .unwrap();
        assert!(matches!(
            s.put_bytes(
                "wal/00000002.history",
                Bytes::from_static(b"1\t0/4000000\tx\n"),
                PutMode::NoOverwrite
            )
            .await,
            Err(StoreError::Conflict { .. })
        ));

        // Replace overwrites.
        fs::write(&src, b"partial v2").unwrap();
        s.put_file(key, &src, PutMode::Replace).await.unwrap();
        assert_eq!(fs::read(s.path_of(key).unwrap()).unwrap(), b"partial v2");
        assert_eq!(
            visible_files(&t.path().join("arch/wal")),
            vec!["000000010000000000000003", "00000002.history"]
        );
    }

    #[tokio::test]
    async fn install_race_detects_conflict() {
        // The no-replace rename itself refuses to clobber an object that appeared after the check.
        let t = tempfile::tempdir().unwrap();
        let a = t.path().join("a");
        let b = t.path().join("b");
        fs::write(&a, b"new").unwrap();
        fs::write(&b, b"old").unwrap();
        assert!(matches!(
            install(&a, &b, "k", PutMode::NoOverwrite),
            Err(StoreError::Conflict { .. })
        ));
        assert_eq!(fs::read(&b).unwrap(), b"old");
        fs::write(&a, b"old").unwrap();
        install(&a, &b, "k", PutMode::NoOverwrite).unwrap();
        assert!(a.exists(), "identical: nothing moved");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn racing_no_overwrite_puts_never_clobber() {
        let t = tempfile::tempdir().unwrap();
        let s = LocalStore::open(t.path()).unwrap();
        for i in 0..30 {
            let key = format!("wal/0000000100000000000000{i:02X}");
            let (a, b) = (
                Bytes::from(vec![1u8; 200_000]),
                Bytes::from(vec![2u8; 200_000]),
            );
            let (ra, rb) = tokio::join!(
                s.put_bytes(&key, a.clone(), PutMode::NoOverwrite),
                s.put_bytes(&key, b.clone(), PutMode::NoOverwrite)
            );
            let stored = s.get_bytes(&key).await.unwrap().unwrap();
            match (ra, rb) {
                (Ok(()), Err(StoreError::Conflict { .. })) => assert!(stored == a),
                (Err(StoreError::Conflict { .. }), Ok(())) => assert!(stored == b),
                other => panic!("{key}: expected one winner and one conflict, got {other:?}"),
            }
        }
        assert!(visible_files(&t.path().join("wal"))
            .iter()
            .all(|n| !n.starts_with('.')));
    }

    #[tokio::test]
    async fn put_file_across_filesystems_copies() {
        // /dev/shm is tmpfs on Linux: renaming from there into the temp dir is EXDEV.
        let shm = Path::new("/dev/shm");
        let t = tempfile::tempdir().unwrap();
        if !shm.is_dir()
            || fs::metadata(shm).unwrap().dev() == fs::metadata(t.path()).unwrap().dev()
        {
            eprintln!("skipped: no second filesystem");
            return;
        }
        let src_dir = tempfile::tempdir_in(shm).unwrap();
        let src = src_dir.path().join("seg");
        fs::write(&src, b"across").unwrap();
        let s = LocalStore::open(t.path()).unwrap();
        s.put_file("wal/000000010000000000000009", &src, PutMode::NoOverwrite)
            .await
            .unwrap();
        assert!(src.exists(), "copied, not moved");
        assert_eq!(
            fs::read(t.path().join("wal/000000010000000000000009")).unwrap(),
            b"across"
        );
        assert_eq!(mode(&t.path().join("wal/000000010000000000000009")), 0o600);
        assert_eq!(
            visible_files(&t.path().join("wal")),
            vec!["000000010000000000000009"]
        );
    }

    #[tokio::test]
    async fn list_and_delete() {
        let t = tempfile::tempdir().unwrap();
        let s = LocalStore::open(t.path()).unwrap();
        for k in [
            "wal/000000010000000000000001.zst",
            "wal/000000010000000000000002.zst",
            "wal/00000002.history",
            "walagent.json",
            "base/b1/data",
        ] {
            s.put_bytes(k, Bytes::from(k.as_bytes().to_vec()), PutMode::NoOverwrite)
                .await
                .unwrap();
        }
        let wal = s.list("wal/").await.unwrap();
        assert_eq!(
            keys(wal.clone()),
            vec![
                "wal/000000010000000000000001.zst",
                "wal/000000010000000000000002.zst",
                "wal/00000002.history"
            ]
        );
        assert!(wal.iter().all(|o| o.size == o.key.len() as u64));
        assert_eq!(
            keys(s.list("wal/000000010000000000000002").await.unwrap()),
            vec!["wal/000000010000000000000002.zst"]
        );
        assert_eq!(keys(s.list("base/").await.unwrap()), vec!["base/b1/data"]);
        assert_eq!(
            keys(s.list("walagent").await.unwrap()),
            vec!["walagent.json"]
        );
        assert_eq!(s.list("").await.unwrap().len(), 5);
        assert!(s.list("nothing/here/").await.unwrap().is_empty());

        s.delete("wal/00000002.history").await.unwrap();
        s.delete("wal/00000002.history").await.unwrap(); // absent is fine
        assert_eq!(s.list("wal/").await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn bad_keys_are_errors() {
        let t = tempfile::tempdir().unwrap();
        let s = LocalStore::open(t.path()).unwrap();
        for k in [
            "",
            "/etc/passwd",
            "../x",
            "wal/../../x",
            "wal//x",
            "wal/.hidden",
            "wal/",
            "a\\b",
        ] {
            let e = s
                .put_bytes(k, Bytes::new(), PutMode::Replace)
                .await
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("invalid archive key"), "{k}: {e}");
            assert!(s.get_bytes(k).await.is_err(), "{k}");
        }
    }

    #[tokio::test]
    async fn crash_before_rename_leaves_no_object() {
        let t = tempfile::tempdir().unwrap();
        let s = LocalStore::open(t.path()).unwrap();
        // What a crash between writing the temp and renaming it leaves behind (a dead pid's temp,
        // and one of an earlier process that had our pid).
        let dead = t.path().join(format!(
            "wal/.000000010000000000000003.zst.tmp.{DEAD_PID}.0"
        ));
        let mine = t
            .path()
            .join(format!(".walagent.json.tmp.{}.77", std::process::id()));
        fs::write(&dead, b"half a segment").unwrap();
        fs::write(&mine, b"{").unwrap();
        // A live process's temp (pid 1 always exists) must survive: it may be mid-put.
        let live = t.path().join("wal/.000000010000000000000004.zst.tmp.1.0");
        fs::write(&live, b"in progress").unwrap();
        let unrelated = t.path().join("wal/.keepme");
        fs::write(&unrelated, b"x").unwrap();

        assert!(s.list("").await.unwrap().is_empty());
        assert_eq!(s.get_bytes("walagent.json").await.unwrap(), None);
        assert!(!s
            .get_to_file("wal/000000010000000000000003.zst", &t.path().join("d"))
            .await
            .unwrap());

        LocalStore::open(t.path()).unwrap();
        assert!(!dead.exists() && !mine.exists());
        assert!(live.exists() && unrelated.exists());
        // A reader never cleans.
        fs::write(&dead, b"x").unwrap();
        LocalStore::open_existing(t.path()).unwrap();
        assert!(dead.exists());
    }

    #[test]
    fn temp_names() {
        let p = temp_path_for(Path::new("/a/wal/000000010000000000000003.zst"));
        let name = p.file_name().unwrap().to_str().unwrap();
        assert!(
            name.starts_with(".000000010000000000000003.zst.tmp."),
            "{name}"
        );
        assert_eq!(parse_temp_name(name), Some(std::process::id()));
        assert_eq!(p.parent().unwrap(), Path::new("/a/wal"));
        for bad in [
            ".x.tmp.12",
            "x.tmp.1.2",
            ".tmp.1.2",
            ".x.tmp.a.2",
            ".x.tmpx.1.2",
            ".x.tmp.1.",
            ".keepme",
        ] {
            assert_eq!(parse_temp_name(bad), None, "{bad}");
        }
        assert!(!pid_alive(DEAD_PID));
        assert!(pid_alive(std::process::id()));
    }

    #[tokio::test]
    async fn streamed_write_appears_whole_and_abort_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        let mut w = store.create_writer("backups/x/base.tar.zst").await.unwrap();
        w.write(Bytes::from_static(b"hello ")).await.unwrap();
        w.write(Bytes::from_static(b"world")).await.unwrap();
        assert!(store
            .get_bytes("backups/x/base.tar.zst")
            .await
            .unwrap()
            .is_none());
        assert_eq!(w.finish().await.unwrap(), 11);
        let p = dir.path().join("backups/x/base.tar.zst");
        assert_eq!(fs::read(&p).unwrap(), b"hello world");
        assert_eq!(mode(&p), 0o600);
        let mut r = store
            .open_reader("backups/x/base.tar.zst")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&r.next_chunk().await.unwrap().unwrap()[..], b"hello world");
        assert!(r.next_chunk().await.unwrap().is_none());
        assert!(store.open_reader("backups/x/nope").await.unwrap().is_none());

        let mut w = store.create_writer("backups/y/base.tar.zst").await.unwrap();
        w.write(Bytes::from_static(b"partial")).await.unwrap();
        w.abort().await;
        assert_eq!(
            visible_files(&dir.path().join("backups/y")),
            Vec::<String>::new()
        );
        assert!(fs::read_dir(dir.path().join("backups/y"))
            .unwrap()
            .next()
            .is_none());
    }

    async fn read_all(store: &LocalStore, key: &str) -> Result<Vec<u8>, StoreError> {
        let mut r = store.open_reader(key).await?.unwrap();
        let mut out = Vec::new();
        while let Some(c) = r.next_chunk().await? {
            out.extend_from_slice(&c);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn streamed_object_has_a_crc_sidecar_checked_on_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        let key = "backups/x/base.tar.zst";
        let mut w = store.create_writer(key).await.unwrap();
        w.write(Bytes::from_static(b"hello ")).await.unwrap();
        w.write(Bytes::from_static(b"world")).await.unwrap();
        w.finish().await.unwrap();
        let obj = dir.path().join(key);
        let side = dir.path().join("backups/x/.base.tar.zst.sfv");
        let text = fs::read_to_string(&side).unwrap();
        let crc = crc32fast::hash(b"hello world");
        assert!(
            text.ends_with(&format!("\nbase.tar.zst {crc:08X}\n")),
            "{text}"
        );
        assert_eq!(mode(&side), 0o600);
        // Listings show only the object.
        let listed = store.list("backups/").await.unwrap();
        assert_eq!(
            listed
                .iter()
                .map(|o| (o.key.as_str(), o.size))
                .collect::<Vec<_>>(),
            vec![(key, 11)]
        );
        assert!(listed[0].etag.is_some());
        assert_eq!(read_all(&store, key).await.unwrap(), b"hello world");
        assert_eq!(
            &store.get_bytes(key).await.unwrap().unwrap()[..],
            b"hello world"
        );

        // Bit rot: every read path says Corrupt, naming the key; nothing unverified is left.
        fs::write(&obj, b"hello World").unwrap();
        let e = read_all(&store, key).await.unwrap_err();
        assert!(
            matches!(&e, StoreError::Corrupt { key: k, .. } if k == key),
            "{e}"
        );
        assert!(e.to_string().contains("CRC-32 mismatch"), "{e}");
        let e = store.get_bytes(key).await.unwrap_err();
        assert!(matches!(&e, StoreError::Corrupt { .. }), "{e}");
        let dest = dir.path().join("dest");
        let e = store.get_to_file(key, &dest).await.unwrap_err();
        assert!(matches!(&e, StoreError::Corrupt { .. }), "{e}");
        assert!(!dest.exists());

        // A truncated object, and a sidecar that does not parse.
        fs::write(&obj, b"hello").unwrap();
        assert!(matches!(
            read_all(&store, key).await,
            Err(StoreError::Corrupt { .. })
        ));
        fs::write(&obj, b"hello world").unwrap();
        assert_eq!(read_all(&store, key).await.unwrap(), b"hello world");
        fs::write(&side, b"base.tar.zst nothex!!\n").unwrap();
        let e = read_all(&store, key).await.unwrap_err();
        assert!(e.to_string().contains(".base.tar.zst.sfv"), "{e}");

        // A replacing put drops the old sidecar; delete removes both.
        store
            .put_bytes(key, Bytes::from_static(b"other"), PutMode::Replace)
            .await
            .unwrap();
        assert!(!side.exists());
        assert_eq!(read_all(&store, key).await.unwrap(), b"other");
        let mut w = store.create_writer(key).await.unwrap();
        w.write(Bytes::from_static(b"again")).await.unwrap();
        w.finish().await.unwrap();
        assert!(side.exists());
        store.delete(key).await.unwrap();
        assert!(!side.exists() && !obj.exists());
    }

    #[test]
    fn sidecar_parsing() {
        assert_eq!(
            parse_sidecar(b"; c\nb.tar 0000ABCD\n", "b.tar"),
            Some(0xabcd)
        );
        assert_eq!(parse_sidecar(b"b.tar 0000abcd", "b.tar"), Some(0xabcd));
        assert_eq!(parse_sidecar(b"a.tar 0000ABCD\n", "b.tar"), None);
        assert_eq!(parse_sidecar(b"b.tar ABCD\n", "b.tar"), None);
        assert_eq!(
            parse_sidecar(b"b.tar 0000ABCD\nb.tar 0000ABCD\n", "b.tar"),
            None
        );
        assert_eq!(parse_sidecar(b"", "b.tar"), None);
        assert_eq!(parse_sidecar(b"\xff", "b.tar"), None);
        assert_eq!(parse_sidecar(b"b.tar", "b.tar"), None);
    }
}
