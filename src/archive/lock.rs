//! Exclusive directory locks: one writer per spool, and per local archive.
//!
//! A lock is `DIR/walagent.lock`, held with `flock(LOCK_EX | LOCK_NB)` (std's `File::try_lock`)
//! for the life of the process. The kernel drops it when the process ends, however it ends
//! (kill -9 included), so a stale file never blocks the next start. The file's content names the
//! holder (`pid`, `host`, `started`), only so that the error of a second agent can say who holds
//! it; the content is never trusted for the decision.
//!
//! Two agents writing one spool would rename and delete each other's files (the second one saw
//! "No such file or directory" from the first's archiver); two streams into one local archive
//! would race on the same objects. S3 has no lock: conditional writes keep complete segments from
//! being overwritten there, and the spool lock still stops two agents on one host.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The name of the lock file inside the locked directory.
pub const LOCK_FILE: &str = "walagent.lock";

/// A held lock; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct DirLock {
    _file: File,
    path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{what} {dir} is in use by another walagent ({holder})")]
    Held {
        what: &'static str,
        dir: String,
        holder: String,
    },
    #[error("cannot lock {what} {dir}: {source}")]
    Io {
        what: &'static str,
        dir: String,
        #[source]
        source: io::Error,
    },
}

impl LockError {
    pub fn hint(&self) -> Option<String> {
        match self {
            LockError::Held { what, .. } => Some(format!(
                "stop that agent first, or give each archive its own {}",
                if *what == "spool" {
                    "--spool"
                } else {
                    "--archive"
                }
            )),
            LockError::Io { .. } => {
                Some("check that the directory exists and is writable by this user".into())
            }
        }
    }
}

impl DirLock {
    /// Takes the exclusive lock of `dir` (which must exist); `what` names it in errors ("spool",
    /// "archive").
    pub fn acquire(dir: &Path, what: &'static str) -> Result<DirLock, LockError> {
        let path = dir.join(LOCK_FILE);
        let io_err = |source| LockError::Io {
            what,
            dir: dir.display().to_string(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io_err)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut content = String::new();
                let _ = file.read_to_string(&mut content);
                return Err(LockError::Held {
                    what,
                    dir: dir.display().to_string(),
                    holder: describe_holder(&content),
                });
            }
            Err(TryLockError::Error(e)) => return Err(io_err(e)),
        }
        let me = format!(
            "pid={} host={} started={}\n",
            std::process::id(),
            hostname(),
            super::meta::rfc3339_utc(std::time::SystemTime::now())
        );
        file.set_len(0)
            .and_then(|_| file.rewind())
            .and_then(|_| file.write_all(me.as_bytes()))
            .map_err(io_err)?;
        Ok(DirLock { _file: file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// "pid 123 on host db1 since ..." from the lock file's content (which may be empty or foreign).
fn describe_holder(content: &str) -> String {
    let field = |k: &str| {
        content
            .split_whitespace()
            .find_map(|w| w.strip_prefix(k)?.strip_prefix('='))
            .map(|v| v.chars().take(64).collect::<String>())
    };
    match (field("pid"), field("host")) {
        (Some(pid), Some(host)) => {
            let since = field("started")
                .map(|s| format!(" since {s}"))
                .unwrap_or_default();
            format!("pid {pid} on host {host}{since}")
        }
        _ => "holder unknown".to_string(),
    }
}

/// This machine's host name, for lock files and messages.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into the buffer we own.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused_and_names_the_holder() {
        let tmp = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(tmp.path(), "spool").unwrap();
        let err = DirLock::acquire(tmp.path(), "spool").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        assert!(msg.contains(&hostname()), "{msg}");
        assert!(err.hint().unwrap().contains("--spool"));
        drop(first);
        DirLock::acquire(tmp.path(), "spool").unwrap();
    }

    #[test]
    fn holder_description_survives_foreign_content() {
        assert_eq!(describe_holder(""), "holder unknown");
        assert_eq!(describe_holder("garbage \u{0} pid="), "holder unknown");
        assert_eq!(
            describe_holder("pid=7 host=db1 started=2026-01-01T00:00:00Z\n"),
            "pid 7 on host db1 since 2026-01-01T00:00:00Z"
        );
    }
}
