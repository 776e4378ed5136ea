//! Durability helpers: the one place walagent calls fsync(2). Bottom layer; knows nothing of
//! WAL, archives or commands.
//!
//! POSIX makes two things durable separately, and a crash can lose either:
//!
//! - a file's **content** (and size, mode): made durable by fsync of the file ([`sync_file`]);
//! - a file's **name** (its creation, a rename onto it, a removal): made durable by fsync of the
//!   directory that holds the entry ([`sync_dir`]).
//!
//! So a new file survives a crash only after both, content first. A file that must appear whole
//! or not at all is written under a temporary name, fsynced, renamed over the target and the
//! directory fsynced ([`write_atomic`]): after a crash the target holds either its old content
//! or the new content, never a mix, and once the call returns the new content is durable.
//!
//! Errors from fsync are returned, never ignored: after a failed fsync the kernel may have
//! dropped the dirty pages, so a retry that succeeds proves nothing (PostgreSQL's "fsyncgate").
//! Callers treat such an error as "not durable" and must not report the data as flushed.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Makes the content and metadata of the open file `f` durable (fsync(2)). Does not make its
/// name durable: [`sync_dir`] of its directory does that for a new or renamed file.
pub fn sync_file(f: &File) -> io::Result<()> {
    f.sync_all()
}

/// Makes the content of the open file `f` durable (fdatasync(2)), and its size when that
/// changed, but not other metadata such as times. Cheaper than [`sync_file`] for a file
/// written in place again and again (the spool's `.partial` segment, fsynced once per status
/// interval). Does not make its name durable.
pub fn sync_file_data(f: &File) -> io::Result<()> {
    f.sync_data()
}

/// Makes the entries of directory `dir` durable (fsync(2) of the directory): files created,
/// renamed into or removed from it before the call survive a crash after it. Says nothing
/// about the content of those files ([`sync_file`] first).
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// [`sync_dir`] of the directory holding `path` (`.` for a bare file name).
pub fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => sync_dir(p),
        _ => sync_dir(Path::new(".")),
    }
}

static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Replaces `path` with `data` atomically and durably: writes a temporary file beside it (mode
/// `mode`, created exclusively), fsyncs it, renames it over `path` and fsyncs the directory.
/// When this returns Ok the new content is durable under `path`; after a crash at any point
/// `path` holds its old content (or is absent if it was) or the new one, never part of it. On
/// error the temporary file is removed (best effort) and `path` is untouched.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let n = TEMP_SEQ.fetch_add(1, Ordering::Relaxed);
    let tmp: PathBuf = path.with_file_name(format!(".{name}.tmp.{}.{n}", std::process::id()));
    let res = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(data)?;
        sync_file(&f)?;
        drop(f);
        fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_parent(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn write_atomic_replaces_and_leaves_no_temp() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("f.json");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let names: Vec<_> = fs::read_dir(t.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("f.json")]);
    }

    #[test]
    fn write_atomic_failure_keeps_the_old_content() {
        let t = tempfile::tempdir().unwrap();
        // The target is a non-empty directory: the rename fails.
        let p = t.path().join("d");
        fs::create_dir(&p).unwrap();
        fs::write(p.join("x"), "keep").unwrap();
        assert!(write_atomic(&p, b"new", 0o600).is_err());
        assert_eq!(fs::read_to_string(p.join("x")).unwrap(), "keep");
        assert_eq!(fs::read_dir(t.path()).unwrap().count(), 1, "no temp left");
    }

    #[test]
    fn sync_dir_and_parent() {
        let t = tempfile::tempdir().unwrap();
        sync_dir(t.path()).unwrap();
        sync_parent(&t.path().join("absent")).unwrap();
        assert!(sync_dir(&t.path().join("absent")).is_err());
        let f = File::create(t.path().join("f")).unwrap();
        sync_file(&f).unwrap();
    }
}
