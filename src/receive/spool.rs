//! The spool: a local directory where the receiver writes WAL before it is archived.
//!
//! Files in the spool:
//! - `<segment>.partial`: the segment being received. Written in place at its segment offset
//!   (re-streaming a segment after a restart overwrites it with the same bytes).
//! - `<segment>`: a complete segment waiting for the archiver ("ready").
//! - `*.tmp`: compression output in flight; removed on startup.
//! - `walagent-spool.json`: whose WAL this spool holds (system identifier, segment size, archive
//!   location). Written when a spool is first used; a spool of another cluster or archive is
//!   refused, so WAL of two clusters never mixes and a leftover file never steers a resume.
//! - `walagent.lock`: held (flock) by the one agent using the spool (`archive::lock`).
//! - `set-aside/`: files found on startup that did not verify or did not continue the archive;
//!   kept for inspection, never used.
//!
//! Durability: a `.partial` is fsynced when the receiver needs to report it as flushed
//! (`--synchronous`, a reply request, a clean stop). A ready segment is fsynced before its
//! rename only in synchronous mode; otherwise the archive copy is what makes it durable, and the
//! flush position reported to the server waits for the archiver.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::wal::{Lsn, SegmentId, SegmentSize};

pub const PARTIAL_SUFFIX: &str = ".partial";
pub const IDENTITY_FILE: &str = "walagent-spool.json";
pub const SET_ASIDE_DIR: &str = "set-aside";

/// Whose WAL a spool holds. Bound on first use; see [`Spool::bind`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SpoolIdentity {
    /// The cluster's system identifier, as a string (beyond JSON's safe integers).
    pub system_identifier: String,
    pub wal_segment_size: u32,
    /// The archive the spool feeds: `s3://bucket/prefix`, or the archive directory's absolute path.
    pub archive: String,
}

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("spool {dir} holds WAL of system {found_system} for archive {found_archive}, not of system {system} for archive {archive}")]
    Foreign {
        dir: String,
        found_system: String,
        found_archive: String,
        system: String,
        archive: String,
    },
    #[error("spool {dir} has an unreadable {IDENTITY_FILE} ({source})")]
    Unreadable {
        dir: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("spool {dir}: {source}")]
    Io {
        dir: String,
        #[source]
        source: io::Error,
    },
}

impl BindError {
    pub fn hint(&self) -> Option<String> {
        Some(match self {
            BindError::Foreign { found_archive, .. } => format!(
                "give each archive its own --spool; if archive {found_archive} is gone for good, \
                 move this spool directory away (its files may be the only copy of that WAL)"
            ),
            BindError::Unreadable { .. } => format!(
                "move the spool directory away (keep its files until you know they are archived) or restore {IDENTITY_FILE}"
            ),
            BindError::Io { .. } => "check the spool directory's permissions and free space".into(),
        })
    }
}

/// Before per-archive default spools, S3 streams spooled straight into `./walagent-spool`. WAL
/// left there is not used by the new default: say so, once, so nothing acknowledged under
/// `--ack fsync` is forgotten (pass `--spool ./walagent-spool` once to archive it).
pub fn warn_legacy_default(dir: &Path) {
    let n = wal_file_names(dir).len();
    if n > 0 {
        tracing::warn!(
            dir = %dir.display(),
            files = n,
            "WAL files from an older walagent sit directly in the old default spool and are not used now; \
             run once with --spool {} to archive them (walagent checks that they belong to this archive)",
            dir.display()
        );
    }
}

/// Names of the WAL files (segments, `.partial`s; not temp files) directly in `dir`, sorted;
/// empty when it cannot be read.
pub fn wal_file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.len() >= 24 && n.as_bytes()[..24].iter().all(u8::is_ascii_hexdigit))
                .filter(|n| !n.ends_with(".tmp"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The default spool directory: `ARCHIVE/spool` for a local archive; for S3 one directory per
/// archive under `./walagent-spool/`, named after the bucket and prefix plus a short hash of
/// the location, so two archives never share a spool by default.
pub fn default_dir(archive_spec: &str, remote: bool) -> PathBuf {
    if !remote {
        return Path::new(archive_spec).join("spool");
    }
    use sha2::Digest;
    let rest = archive_spec.get(5..).unwrap_or("");
    let mut name: String = rest
        .trim_end_matches('/')
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .take(80)
        .collect();
    if name.is_empty() {
        name.push('_');
    }
    let digest = sha2::Sha256::digest(archive_spec.trim_end_matches('/').as_bytes());
    let short: String = digest.iter().take(4).map(|b| format!("{b:02x}")).collect();
    Path::new("walagent-spool").join(format!("{name}-{short}"))
}

/// A spool directory.
#[derive(Debug, Clone)]
pub struct Spool {
    dir: PathBuf,
    seg_size: SegmentSize,
}

/// What a spool directory holds, as found on startup.
#[derive(Debug, Default)]
pub struct SpoolContents {
    pub partials: Vec<SegmentId>,
    pub ready: Vec<SegmentId>,
}

impl Spool {
    pub fn open(dir: &Path, seg_size: SegmentSize) -> io::Result<Spool> {
        fs::create_dir_all(dir)?;
        set_mode(dir, 0o700)?;
        Ok(Spool {
            dir: dir.to_path_buf(),
            seg_size,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn partial_path(&self, id: SegmentId) -> PathBuf {
        self.dir
            .join(format!("{}{PARTIAL_SUFFIX}", id.file_name(self.seg_size)))
    }

    pub fn ready_path(&self, id: SegmentId) -> PathBuf {
        self.dir.join(id.file_name(self.seg_size))
    }

    /// Binds the spool to `identity`: writes the identity file into a spool that has none, checks
    /// it otherwise. A spool that belongs to another cluster or archive is refused (nothing in it
    /// is touched).
    ///
    /// `inside_archive`: the spool lives inside the (local) archive it feeds, as the default
    /// `ARCHIVE/spool` does; then a different recorded archive path means the archive directory
    /// was moved or mounted elsewhere, not another archive, and the record is updated.
    pub fn bind(&self, identity: &SpoolIdentity, inside_archive: bool) -> Result<(), BindError> {
        let dir = self.dir.display().to_string();
        let path = self.dir.join(IDENTITY_FILE);
        let io_err = |source| BindError::Io {
            dir: dir.clone(),
            source,
        };
        match fs::read(&path) {
            Ok(bytes) => {
                let found: SpoolIdentity =
                    serde_json::from_slice(&bytes).map_err(|source| BindError::Unreadable {
                        dir: dir.clone(),
                        source,
                    })?;
                if &found == identity {
                    return Ok(());
                }
                let moved = inside_archive
                    && found.system_identifier == identity.system_identifier
                    && found.wal_segment_size == identity.wal_segment_size;
                if moved {
                    tracing::info!(spool = %dir, was = %found.archive, now = %identity.archive, "the archive holding this spool has moved");
                    let _ = fs::remove_file(&path);
                    return self.bind(identity, false);
                }
                Err(BindError::Foreign {
                    dir,
                    found_system: found.system_identifier,
                    found_archive: found.archive,
                    system: identity.system_identifier.clone(),
                    archive: identity.archive.clone(),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let tmp = self.dir.join(format!("{IDENTITY_FILE}.tmp"));
                let mut json = serde_json::to_vec_pretty(identity).unwrap_or_default();
                json.push(b'\n');
                let mut f = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&tmp)
                    .map_err(io_err)?;
                std::io::Write::write_all(&mut f, &json).map_err(io_err)?;
                crate::fsutil::sync_file(&f).map_err(io_err)?;
                fs::rename(&tmp, &path).map_err(io_err)?;
                self.sync_dir().map_err(io_err)
            }
            Err(e) => Err(io_err(e)),
        }
    }

    /// Moves a spool file that must not be used into `set-aside/` (never deletes it) and returns
    /// where it went.
    pub fn set_aside(&self, path: &Path) -> io::Result<PathBuf> {
        let dir = self.dir.join(SET_ASIDE_DIR);
        fs::create_dir_all(&dir)?;
        set_mode(&dir, 0o700)?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "file".into());
        let mut dst = dir.join(&name);
        let mut n = 1;
        while dst.exists() {
            dst = dir.join(format!("{name}.{n}"));
            n += 1;
        }
        fs::rename(path, &dst)?;
        self.sync_dir()?;
        Ok(dst)
    }

    /// Lists partial and ready segments (sorted) and removes leftover temp files.
    pub fn scan(&self) -> io::Result<SpoolContents> {
        let mut out = SpoolContents::default();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.ends_with(".tmp") {
                let _ = fs::remove_file(entry.path());
            } else if let Some(base) = name.strip_suffix(PARTIAL_SUFFIX) {
                if let Some(id) = SegmentId::parse_file_name(base, self.seg_size) {
                    out.partials.push(id);
                }
            } else if let Some(id) = SegmentId::parse_file_name(name, self.seg_size) {
                out.ready.push(id);
            }
        }
        out.partials.sort();
        out.ready.sort_by_key(|id| (id.segno, id.timeline));
        Ok(out)
    }

    /// Opens (or creates) the partial file of `id` for writing in place.
    pub fn open_partial(&self, id: SegmentId) -> io::Result<PartialSegment> {
        let path = self.partial_path(id);
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)?;
        Ok(PartialSegment {
            id,
            path,
            file,
            start: id.start_lsn(self.seg_size),
            written: 0,
            synced: 0,
        })
    }

    /// Copies the first `len` bytes of `id`'s partial file to a new temp file in the spool (the
    /// source of a `.partial` upload).
    pub fn snapshot_prefix(&self, id: SegmentId, len: u64, seq: u64) -> io::Result<PathBuf> {
        use std::io::Read;
        let dst = self
            .dir
            .join(format!("{}.snap{seq}.tmp", id.file_name(self.seg_size)));
        let mut src = File::open(self.partial_path(id))?.take(len);
        let mut out = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&dst)?;
        io::copy(&mut src, &mut out)?;
        Ok(dst)
    }

    /// fsync of the spool directory, making renames and creations durable.
    pub fn sync_dir(&self) -> io::Result<()> {
        crate::fsutil::sync_dir(&self.dir)
    }
}

/// The segment currently being received.
#[derive(Debug)]
pub struct PartialSegment {
    pub id: SegmentId,
    path: PathBuf,
    file: File,
    start: Lsn,
    /// Bytes written from the segment start in this session.
    written: u32,
    /// Bytes known durable (fsynced) from the segment start.
    synced: u32,
}

impl PartialSegment {
    /// Writes `data` at the current end. The caller never crosses the segment end.
    pub fn append(&mut self, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, u64::from(self.written))?;
        self.written += data.len() as u32;
        Ok(())
    }

    pub fn end_lsn(&self) -> Lsn {
        Lsn(self.start.0 + u64::from(self.written))
    }

    pub fn synced_lsn(&self) -> Lsn {
        Lsn(self.start.0 + u64::from(self.synced))
    }

    pub fn start_lsn(&self) -> Lsn {
        self.start
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Copies what was written so far to a new temp file in the spool (for a partial upload).
    pub fn snapshot(&self, spool: &Spool, seq: u64) -> io::Result<PathBuf> {
        spool.snapshot_prefix(self.id, u64::from(self.written), seq)
    }

    /// fdatasync when there is anything new to make durable.
    pub fn sync(&mut self) -> io::Result<()> {
        if self.synced < self.written {
            crate::fsutil::sync_file_data(&self.file)?;
            self.synced = self.written;
        }
        Ok(())
    }

    /// Completes a full segment: renames `<name>.partial` to `<name>` (the ready state). With
    /// `durable`, the data is fsynced first and the directory after.
    pub fn complete(mut self, spool: &Spool, durable: bool) -> io::Result<PathBuf> {
        if durable {
            self.sync()?;
        }
        let ready = spool.ready_path(self.id);
        fs::rename(&self.path, &ready)?;
        if durable {
            spool.sync_dir()?;
        }
        Ok(ready)
    }

    /// Ends the segment at what was written in this session (dropping any longer tail an
    /// earlier session left) and makes it durable; used when a timeline ends inside it.
    pub fn finish_short(self, spool: &Spool) -> io::Result<PathBuf> {
        self.file.set_len(u64::from(self.written))?;
        crate::fsutil::sync_file(&self.file)?;
        spool.sync_dir()?;
        Ok(self.path)
    }
}

pub fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::timeline::tl;

    #[test]
    fn partial_to_ready_and_scan() {
        let tmp = tempfile::tempdir().unwrap();
        let size = SegmentSize::new(1 << 20).unwrap();
        let spool = Spool::open(tmp.path(), size).unwrap();
        let id = SegmentId::new(tl(1), 3);
        let mut p = spool.open_partial(id).unwrap();
        p.append(&[1u8; 4096]).unwrap();
        assert_eq!(p.end_lsn(), Lsn(3 << 20).checked_add(4096).unwrap());
        assert_eq!(p.synced_lsn(), Lsn(3 << 20));
        p.sync().unwrap();
        assert_eq!(p.synced_lsn(), p.end_lsn());
        fs::write(tmp.path().join("junk.tmp"), b"x").unwrap();
        let c = spool.scan().unwrap();
        assert_eq!(c.partials, vec![id]);
        assert!(c.ready.is_empty());
        assert!(!tmp.path().join("junk.tmp").exists());
        p.append(&vec![2u8; (1 << 20) - 4096]).unwrap();
        let ready = p.complete(&spool, true).unwrap();
        assert_eq!(fs::read(&ready).unwrap().len(), 1 << 20);
        let c = spool.scan().unwrap();
        assert_eq!(c.ready, vec![id]);
        assert!(c.partials.is_empty());
    }

    #[test]
    fn bind_refuses_another_cluster_or_archive_and_rebinds_a_moved_archive() {
        let tmp = tempfile::tempdir().unwrap();
        let size = SegmentSize::new(1 << 20).unwrap();
        let spool = Spool::open(tmp.path(), size).unwrap();
        let me = SpoolIdentity {
            system_identifier: "7".into(),
            wal_segment_size: 1 << 20,
            archive: "s3://b/x".into(),
        };
        spool.bind(&me, false).unwrap();
        spool.bind(&me, false).unwrap();
        let other_archive = SpoolIdentity {
            archive: "s3://b/y".into(),
            ..me.clone()
        };
        let e = spool.bind(&other_archive, false).unwrap_err();
        assert!(matches!(e, BindError::Foreign { .. }), "{e}");
        assert!(e.hint().unwrap().contains("--spool"));
        let other_cluster = SpoolIdentity {
            system_identifier: "8".into(),
            ..me.clone()
        };
        assert!(
            spool.bind(&other_cluster, true).is_err(),
            "another cluster, even inside"
        );
        // inside the archive: the same cluster under a new path is the archive moved
        spool.bind(&other_archive, true).unwrap();
        spool.bind(&other_archive, false).unwrap();
        fs::write(tmp.path().join(IDENTITY_FILE), b"{not json").unwrap();
        assert!(matches!(
            spool.bind(&me, false).unwrap_err(),
            BindError::Unreadable { .. }
        ));
    }

    #[test]
    fn default_spools_differ_per_archive() {
        let a = default_dir("s3://b/x", true);
        let b = default_dir("s3://b/x/", true);
        let c = default_dir("s3://b/x_", true);
        let d = default_dir("s3://b_x", true);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
        assert!(a.starts_with("walagent-spool"));
        assert_eq!(default_dir("/srv/a", false), Path::new("/srv/a/spool"));
    }

    #[test]
    fn rewriting_a_partial_keeps_it_in_place_and_finish_short_truncates() {
        let tmp = tempfile::tempdir().unwrap();
        let size = SegmentSize::new(1 << 20).unwrap();
        let spool = Spool::open(tmp.path(), size).unwrap();
        let id = SegmentId::new(tl(2), 7);
        let mut p = spool.open_partial(id).unwrap();
        p.append(&[7u8; 10000]).unwrap();
        drop(p);
        let mut p = spool.open_partial(id).unwrap();
        p.append(&[7u8; 100]).unwrap();
        assert_eq!(
            fs::metadata(p.path()).unwrap().len(),
            10000,
            "reopen must not truncate"
        );
        let path = p.finish_short(&spool).unwrap();
        assert_eq!(fs::read(path).unwrap(), vec![7u8; 100]);
    }
}
