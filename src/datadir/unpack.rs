//! Unpacking a base backup into a data directory, for `seed-standby` and `restore` alike.
//!
//! An [`Unpacker`] owns the target directories: it prepares DIR when created and each
//! tablespace target when asked ([`super::extract::prepare_target_dir`]: absent with an existing
//! parent, or empty), and unless [`Unpacker::keep`] is called it removes everything it wrote
//! when dropped (a directory it created goes whole; one that existed empty is emptied again).
//! So a failed or cancelled fill never leaves a half data directory that might be started by
//! mistake.
//!
//! Order: tablespace archives first ([`Unpacker::tablespace`]), then the main archive
//! ([`Unpacker::main_archive`]), whose `pg_tblspc/<oid>` links then point at the directories
//! already filled. The server sends them in this order; restore sorts them so.
//!
//! Each archive is fed through an [`ArchiveUnpack`] (tar parser + extractor, synchronous, for a
//! blocking thread), which also takes every regular file's size and CRC-32C as it is written.
//! The backup manifest checks every file it lists, whether it is known before the archives
//! ([`Unpacker::expect_manifest`], restore: the first mismatching file stops the restore) or
//! arrives after them ([`Unpacker::check_manifest`], BASE_BACKUP sends it last). Files the
//! manifest does not list (pg_wal contents, a few files the server makes) are not checked; a
//! listed file that never came is an error. Only CRC-32C checksums (the server's default) are
//! compared; for other algorithms the size is.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::extract::{
    chown_to, map_tablespace, prepare_target_dir, remove_written, target_owner, write_private_file,
    ExtractError, ExtractOptions, ExtractStats, Extractor,
};
use super::manifest::BackupManifest;
use super::tar::{EntryKind, TarError, TarEvent, TarParser};

/// A file that does not match the backup manifest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestMismatch {
    #[error("file {path} of the backup has {actual} bytes, the backup manifest says {expected}")]
    Size {
        path: String,
        actual: u64,
        expected: u64,
    },
    #[error("file {path} of the backup fails its manifest checksum (CRC-32C {actual:08x}, expected {expected:08x})")]
    Checksum {
        path: String,
        actual: u32,
        expected: u32,
    },
    #[error("file {path} is listed in the backup manifest but missing from the backup")]
    Missing { path: String },
}

/// Why feeding an archive failed.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The tar stream is malformed.
    #[error("{0}")]
    Tar(#[from] TarError),
    /// Writing the data directory failed (or the archive asked for something unsafe).
    #[error("{0}")]
    Extract(#[from] ExtractError),
    /// A file does not match the backup manifest.
    #[error("{0}")]
    Manifest(#[from] ManifestMismatch),
}

/// Sizes and CRC-32Cs of the files written, checked against the manifest.
#[derive(Default)]
struct Checks {
    /// path -> (size, CRC-32C when the manifest has one), once the manifest is known.
    expected: Option<BTreeMap<String, (u64, Option<u32>)>>,
    /// path -> (size, CRC-32C) of every regular file written.
    seen: HashMap<String, (u64, u32)>,
}

fn expected_of(m: &BackupManifest) -> BTreeMap<String, (u64, Option<u32>)> {
    m.files
        .iter()
        .map(|f| (f.path_lossy(), (f.size, f.crc32c())))
        .collect()
}

fn compare(
    path: &str,
    (size, crc): (u64, u32),
    (want_size, want_crc): (u64, Option<u32>),
) -> Result<(), ManifestMismatch> {
    if want_size != size {
        return Err(ManifestMismatch::Size {
            path: path.to_string(),
            actual: size,
            expected: want_size,
        });
    }
    match want_crc {
        Some(w) if w != crc => Err(ManifestMismatch::Checksum {
            path: path.to_string(),
            actual: crc,
            expected: w,
        }),
        _ => Ok(()),
    }
}

impl Checks {
    fn record(&mut self, path: String, got: (u64, u32)) -> Result<(), ManifestMismatch> {
        if let Some(want) = self.expected.as_ref().and_then(|e| e.get(&path)) {
            compare(&path, got, *want)?;
        }
        self.seen.insert(path, got);
        Ok(())
    }

    /// Every listed file was written and matches; returns how many the manifest lists.
    fn verify_all(&self) -> Result<u64, ManifestMismatch> {
        let Some(expected) = &self.expected else {
            return Ok(0);
        };
        for (path, want) in expected {
            match self.seen.get(path) {
                Some(got) => compare(path, *got, *want)?,
                None => return Err(ManifestMismatch::Missing { path: path.clone() }),
            }
        }
        Ok(expected.len() as u64)
    }
}

type SharedChecks = Arc<Mutex<Checks>>;

fn lock(c: &SharedChecks) -> std::sync::MutexGuard<'_, Checks> {
    // A panic elsewhere cannot leave the maps half-updated in a way that matters here.
    c.lock().unwrap_or_else(|e| e.into_inner())
}

/// The target directories of one fill; see the module documentation.
pub struct Unpacker {
    pgdata: PathBuf,
    opts: ExtractOptions,
    /// What to undo on failure, in creation order: (directory, created by us).
    written: Vec<(PathBuf, bool)>,
    /// Tablespace targets prepared so far, registered with the main archive's extractor.
    tablespaces: Vec<(u32, PathBuf)>,
    main_started: bool,
    checks: SharedChecks,
    keep: bool,
}

impl Unpacker {
    /// Prepares `pgdata` (absent with an existing parent, or an empty directory) and resolves
    /// it to an absolute path. Running as root, everything written is given to the owner of
    /// `pgdata` (or of its parent when it is created here).
    pub fn create(
        pgdata: &Path,
        tablespace_mapping: Vec<(PathBuf, PathBuf)>,
    ) -> Result<Unpacker, ExtractError> {
        let created = prepare_target_dir(pgdata)?;
        let mut u = Unpacker {
            pgdata: pgdata.to_path_buf(),
            opts: ExtractOptions {
                tablespace_mapping,
                owner: None,
            },
            written: vec![(pgdata.to_path_buf(), created)],
            tablespaces: Vec::new(),
            main_started: false,
            checks: Arc::default(),
            keep: false,
        };
        let canonical = fs::canonicalize(pgdata).map_err(|source| ExtractError::Io {
            op: "resolve",
            path: pgdata.to_path_buf(),
            source,
        })?;
        u.opts.owner = target_owner(&canonical, created);
        u.written[0].0 = canonical.clone();
        u.pgdata = canonical;
        Ok(u)
    }

    /// The data directory (absolute).
    pub fn pgdata(&self) -> &Path {
        &self.pgdata
    }

    /// Who gets what is written (running as root), see [`target_owner`].
    pub fn owner(&self) -> Option<(u32, u32)> {
        self.opts.owner
    }

    /// The manifest is known before the archives: each listed file is checked as it is
    /// written, so a mismatch stops the fill at that file.
    pub fn expect_manifest(&mut self, manifest: &BackupManifest) {
        lock(&self.checks).expected = Some(expected_of(manifest));
    }

    /// Prepares the target of tablespace `oid`, whose location on the source server was
    /// `location` (relocated by the tablespace mapping), and returns the feeder for its archive.
    /// Tablespaces come before the main archive.
    pub fn tablespace(&mut self, oid: u32, location: &Path) -> Result<ArchiveUnpack, ExtractError> {
        if self.main_started {
            return Err(ExtractError::Sequence(format!(
                "tablespace {oid} after the main archive"
            )));
        }
        let target = map_tablespace(&self.opts.tablespace_mapping, location);
        let created = prepare_target_dir(&target)?;
        self.written.push((target.clone(), created));
        self.tablespaces.push((oid, target.clone()));
        Ok(ArchiveUnpack::new(
            Extractor::new(&target, self.opts.clone()),
            format!("pg_tblspc/{oid}/"),
            self.checks.clone(),
        ))
    }

    /// The feeder for the main archive (`base.tar`), which links the tablespaces prepared
    /// before.
    pub fn main_archive(&mut self) -> ArchiveUnpack {
        self.main_started = true;
        let mut ex = Extractor::new(&self.pgdata, self.opts.clone());
        for (oid, target) in &self.tablespaces {
            ex.register_tablespace(*oid, target.clone());
        }
        ArchiveUnpack::new(ex, String::new(), self.checks.clone())
    }

    /// After every archive, with the manifest given to [`Self::expect_manifest`] (if any):
    /// every listed file was written. Returns how many files the manifest lists (0 without one).
    pub fn finish_checks(&self) -> Result<u64, ManifestMismatch> {
        lock(&self.checks).verify_all()
    }

    /// After every archive, with a manifest that came after them (BASE_BACKUP): every file it
    /// lists was written with its size and CRC-32C. Returns how many files it lists.
    pub fn check_manifest(&self, manifest: &BackupManifest) -> Result<u64, ManifestMismatch> {
        let mut c = lock(&self.checks);
        c.expected = Some(expected_of(manifest));
        c.verify_all()
    }

    /// Writes `name` in the data directory (mode 0600, content fsynced) and gives it to the
    /// owner. Returns its path.
    pub fn write_file(&self, name: &str, data: &[u8]) -> io::Result<PathBuf> {
        let path = self.pgdata.join(name);
        write_private_file(&path, data)?;
        self.chown(&path);
        Ok(path)
    }

    /// Gives `path` (written by the caller) to the owner (best effort; see [`chown_to`]).
    pub fn chown(&self, path: &Path) {
        chown_to(path, self.opts.owner);
    }

    /// The fill succeeded: keep what was written.
    pub fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for Unpacker {
    fn drop(&mut self) {
        if !self.keep {
            for (dir, created) in self.written.iter().rev() {
                remove_written(dir, *created);
            }
        }
    }
}

/// One archive on its way into its directory: feed it the raw tar bytes (synchronous; meant for
/// a blocking thread). Regular files are checked against the manifest when it is known, and
/// their sizes and CRC-32Cs kept for a manifest that comes later.
pub struct ArchiveUnpack {
    parser: TarParser,
    ex: Extractor,
    /// Prefix of the manifest paths of this archive's entries (`pg_tblspc/<oid>/`).
    prefix: String,
    checks: SharedChecks,
    events: Vec<TarEvent>,
    /// The regular file being written: manifest path, CRC-32C, size.
    cur: Option<(String, u32, u64)>,
}

impl ArchiveUnpack {
    fn new(ex: Extractor, prefix: String, checks: SharedChecks) -> ArchiveUnpack {
        ArchiveUnpack {
            parser: TarParser::new(),
            ex,
            prefix,
            checks,
            events: Vec::new(),
            cur: None,
        }
    }

    /// Feeds the next piece of the tar stream; returns the file content bytes it carried.
    pub fn feed(&mut self, data: Bytes) -> Result<u64, UnpackError> {
        let mut events = std::mem::take(&mut self.events);
        let res = self
            .parser
            .feed(data, &mut events)
            .map_err(UnpackError::from)
            .and_then(|_| self.handle(&mut events));
        events.clear();
        self.events = events;
        res
    }

    /// The end of the tar stream: checks it ended properly and flushes the files to disk.
    pub fn finish(mut self) -> Result<ExtractStats, UnpackError> {
        let mut events = std::mem::take(&mut self.events);
        self.parser.finish(&mut events)?;
        self.handle(&mut events)?;
        Ok(self.ex.finish()?)
    }

    fn handle(&mut self, events: &mut Vec<TarEvent>) -> Result<u64, UnpackError> {
        let mut bytes = 0u64;
        for ev in events.drain(..) {
            match &ev {
                TarEvent::Entry { meta, .. } => {
                    self.cur = matches!(meta.kind, EntryKind::File)
                        .then(|| (format!("{}{}", self.prefix, meta.path), 0, 0));
                }
                TarEvent::Data(d) => {
                    if let Some((_, crc, size)) = &mut self.cur {
                        *crc = crc32c::crc32c_append(*crc, d);
                        *size += d.len() as u64;
                    }
                    bytes += d.len() as u64;
                }
                TarEvent::EntryEnd { .. } => {
                    if let Some((path, crc, size)) = self.cur.take() {
                        lock(&self.checks).record(path, (size, crc))?;
                    }
                }
                TarEvent::Trailer(_) => {}
            }
            self.ex.handle(ev)?;
        }
        Ok(bytes)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A tar with the given regular files (path, content).
    pub(crate) fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in files {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o600);
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mtime(1_700_000_000);
            b.append_data(&mut h, path, &data[..]).unwrap();
        }
        b.into_inner().unwrap()
    }

    /// A version-2 manifest listing `files` with CRC-32C checksums (the manifest checksum is
    /// computed as the server does).
    fn manifest_of(files: &[(&str, &[u8])]) -> BackupManifest {
        let entries: Vec<String> = files
            .iter()
            .map(|(p, d)| {
                format!(
                    "{{ \"Path\": \"{p}\", \"Size\": {}, \"Last-Modified\": \"2026-11-22 06:06:05 GMT\", \"Checksum-Algorithm\": \"CRC32C\", \"Checksum\": \"{}\" }}",
                    d.len(),
                    hex(&crc32c::crc32c(d).to_le_bytes())
                )
            })
            .collect();
        let body = format!(
            "{{ \"PostgreSQL-Backup-Manifest-Version\": 2,\n\"System-Identifier\": 7,\n\"Files\": [\n{}\n],\n\"WAL-Ranges\": [\n{{ \"Timeline\": 1, \"Start-LSN\": \"0/2000028\", \"End-LSN\": \"0/2000100\" }}\n],\n",
            entries.join(",\n")
        );
        let sum = super::super::manifest::manifest_checksum_of(
            format!("{body}\"Manifest-Checksum\": \"x\"}}\n").as_bytes(),
        )
        .unwrap();
        let raw = format!("{body}\"Manifest-Checksum\": \"{sum}\"}}\n");
        BackupManifest::parse(raw.as_bytes()).unwrap()
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    fn fill(u: &mut Unpacker, tar: &[u8]) -> Result<ExtractStats, UnpackError> {
        let mut a = u.main_archive();
        // In two pieces, split inside a file's content.
        let (x, y) = tar.split_at(700.min(tar.len()));
        a.feed(Bytes::copy_from_slice(x))?;
        a.feed(Bytes::copy_from_slice(y))?;
        a.finish()
    }

    const GOOD: &[(&str, &[u8])] = &[("PG_VERSION", b"15\n"), ("global/pg_control", &[7u8; 1000])];

    #[test]
    fn a_late_manifest_checks_every_file_written() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("data");
        let mut u = Unpacker::create(&dir, vec![]).unwrap();
        // pg_wal content is not in the manifest and not checked.
        let mut files = GOOD.to_vec();
        files.push(("pg_wal/000000010000000000000002", b"wal"));
        let stats = fill(&mut u, &tar_of(&files)).unwrap();
        assert_eq!(stats.files, 3);
        assert_eq!(u.check_manifest(&manifest_of(GOOD)).unwrap(), 2);
        u.keep();
        assert_eq!(fs::read(dir.join("PG_VERSION")).unwrap(), b"15\n");
    }

    #[test]
    fn a_late_manifest_finds_a_changed_file_and_the_fill_is_undone() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("data");
        let mut u = Unpacker::create(&dir, vec![]).unwrap();
        let mut changed = GOOD.to_vec();
        changed[1] = ("global/pg_control", &[8u8; 1000]);
        fill(&mut u, &tar_of(&changed)).unwrap();
        let e = u.check_manifest(&manifest_of(GOOD)).unwrap_err();
        assert!(
            matches!(&e, ManifestMismatch::Checksum { path, .. } if path == "global/pg_control"),
            "{e}"
        );
        assert!(e.to_string().contains("fails its manifest checksum"), "{e}");
        drop(u);
        assert!(
            !dir.exists(),
            "a failed fill removes the directory it created"
        );
    }

    #[test]
    fn a_late_manifest_finds_a_missing_and_a_short_file() {
        let t = tempfile::tempdir().unwrap();
        let mut u = Unpacker::create(&t.path().join("a"), vec![]).unwrap();
        fill(&mut u, &tar_of(&GOOD[..1])).unwrap();
        let e = u.check_manifest(&manifest_of(GOOD)).unwrap_err();
        assert_eq!(
            e,
            ManifestMismatch::Missing {
                path: "global/pg_control".into()
            }
        );

        let mut u = Unpacker::create(&t.path().join("b"), vec![]).unwrap();
        let mut short = GOOD.to_vec();
        short[1] = ("global/pg_control", &[7u8; 999]);
        fill(&mut u, &tar_of(&short)).unwrap();
        let e = u.check_manifest(&manifest_of(GOOD)).unwrap_err();
        assert!(e.to_string().contains("has 999 bytes"), "{e}");
    }

    #[test]
    fn a_manifest_known_first_stops_at_the_bad_file() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("data");
        fs::create_dir(&dir).unwrap();
        let mut u = Unpacker::create(&dir, vec![]).unwrap();
        u.expect_manifest(&manifest_of(GOOD));
        let mut changed = GOOD.to_vec();
        changed[0] = ("PG_VERSION", b"16\n");
        let e = fill(&mut u, &tar_of(&changed)).unwrap_err();
        assert!(
            matches!(&e, UnpackError::Manifest(ManifestMismatch::Checksum { path, .. }) if path == "PG_VERSION"),
            "{e}"
        );
        drop(u);
        assert!(dir.exists(), "a directory that existed stays");
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0, "and is emptied");
    }

    #[test]
    fn tablespaces_come_first_and_are_checked_under_pg_tblspc() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("data");
        let old = t.path().join("old_loc");
        let new = t.path().join("new_loc");
        let mut u = Unpacker::create(&dir, vec![(old.clone(), new.clone())]).unwrap();
        let mut ts = u.tablespace(16384, &old).unwrap();
        ts.feed(Bytes::from(tar_of(&[("PG_15_1/5/1", b"x")])))
            .unwrap();
        ts.finish().unwrap();
        fill(&mut u, &tar_of(GOOD)).unwrap();
        assert!(matches!(
            u.tablespace(16385, &old),
            Err(ExtractError::Sequence(_))
        ));
        let mut all = GOOD.to_vec();
        all.push(("pg_tblspc/16384/PG_15_1/5/1", b"x"));
        assert_eq!(u.check_manifest(&manifest_of(&all)).unwrap(), 3);
        u.keep();
        assert_eq!(fs::read(new.join("PG_15_1/5/1")).unwrap(), b"x");
    }

    #[test]
    fn without_a_manifest_nothing_is_checked() {
        let t = tempfile::tempdir().unwrap();
        let mut u = Unpacker::create(&t.path().join("d"), vec![]).unwrap();
        fill(&mut u, &tar_of(GOOD)).unwrap();
        assert_eq!(u.finish_checks().unwrap(), 0);
        let p = u.write_file("backup_manifest", b"{}").unwrap();
        assert_eq!(fs::read(p).unwrap(), b"{}");
        u.keep();
    }
}
