//! A small tmpfs (for filesystem-full tests; root only).

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::cmd::is_root;
use super::dirs::new_unique_dir;

/// A tmpfs mounted on a new directory under the test root, unmounted (and the directory removed)
/// on drop. Needs root and a kernel/container that allows `mount`; [`TmpfsMount::new`] says why
/// not otherwise, so a test can skip.
pub struct TmpfsMount {
    path: PathBuf,
}

impl TmpfsMount {
    /// Mounts a tmpfs of `bytes` (rounded up to pages by the kernel), mode 0755.
    pub fn new(kind: &str, bytes: u64) -> Result<TmpfsMount, String> {
        if !is_root() {
            return Err("mounting a tmpfs needs root".into());
        }
        let path = new_unique_dir(kind, 0o755, false);
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={bytes},mode=0755"))
            .arg("tmpfs")
            .arg(&path)
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(o) if o.status.success() => Ok(TmpfsMount { path }),
            Ok(o) => {
                let _ = fs::remove_dir(&path);
                Err(format!(
                    "mount -t tmpfs refused ({}): {}",
                    o.status,
                    String::from_utf8_lossy(&o.stderr).trim()
                ))
            }
            Err(e) => {
                let _ = fs::remove_dir(&path);
                Err(format!("cannot run mount: {e}"))
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `mount -o remount,size=BYTES` (fails when the files already there do not fit).
    pub fn resize(&self, bytes: u64) -> Result<(), String> {
        let o = Command::new("mount")
            .args(["-o"])
            .arg(format!("remount,size={bytes}"))
            .arg(&self.path)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if o.status.success() {
            Ok(())
        } else {
            Err(format!(
                "remount {} with size={bytes} failed: {}",
                self.path.display(),
                String::from_utf8_lossy(&o.stderr).trim()
            ))
        }
    }

    /// (bytes used, bytes available) from statvfs.
    pub fn usage(&self) -> (u64, u64) {
        let c = CString::new(self.path.as_os_str().as_bytes()).unwrap();
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
        assert_eq!(
            rc,
            0,
            "statvfs {}: {}",
            self.path.display(),
            std::io::Error::last_os_error()
        );
        #[allow(clippy::unnecessary_cast)]
        let frsize = st.f_frsize as u64;
        #[allow(clippy::unnecessary_cast)]
        let (blocks, bfree, bavail) = (st.f_blocks as u64, st.f_bfree as u64, st.f_bavail as u64);
        ((blocks - bfree) * frsize, bavail * frsize)
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            // Still busy (a process we started may not have exited yet): detach it.
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.path)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = fs::remove_dir(&self.path);
    }
}
