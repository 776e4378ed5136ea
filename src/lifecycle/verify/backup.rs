//! One complete backup checked against its `backup_manifest`, without writing anything: each
//! tar object is streamed from the store (`Store::open_reader`, whose end-of-stream check is the
//! stored CRC-32), decompressed and parsed on a blocking thread (`datadir::tar`'s push parser),
//! and every regular file's size and checksum (the manifest's algorithm) compared as it streams
//! by. Memory stays bounded by a few chunks whatever the backup's size.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};
use std::sync::Arc;

use bytes::Bytes;
use sha2::Digest;
use tokio::sync::mpsc;

use super::Problem;
use crate::archive::catalog::{BackupInfo, TarArchive};
use crate::archive::compress::{decompress_stream, is_corrupt};
use crate::archive::{Store, StoreError};
use crate::datadir::manifest::{BackupManifest, ChecksumAlgorithm, ManifestFile};
use crate::datadir::progress::Progress;
use crate::datadir::tar::{EntryKind, TarEvent, TarParser};

/// What checking one backup found and cost.
#[derive(Debug, Default)]
pub struct BackupOutcome {
    pub problems: Vec<Problem>,
    /// Stored bytes read (tar objects and manifest).
    pub stored_bytes: u64,
    /// Tar bytes after decompression.
    pub tar_bytes: u64,
    pub objects_read: u64,
}

enum Hasher {
    None,
    Crc32c(u32),
    Sha224(sha2::Sha224),
    Sha256(sha2::Sha256),
    Sha384(sha2::Sha384),
    Sha512(sha2::Sha512),
}

impl Hasher {
    fn new(a: ChecksumAlgorithm) -> Hasher {
        match a {
            ChecksumAlgorithm::None => Hasher::None,
            ChecksumAlgorithm::Crc32c => Hasher::Crc32c(0),
            ChecksumAlgorithm::Sha224 => Hasher::Sha224(Default::default()),
            ChecksumAlgorithm::Sha256 => Hasher::Sha256(Default::default()),
            ChecksumAlgorithm::Sha384 => Hasher::Sha384(Default::default()),
            ChecksumAlgorithm::Sha512 => Hasher::Sha512(Default::default()),
        }
    }

    fn update(&mut self, d: &[u8]) {
        match self {
            Hasher::None => {}
            Hasher::Crc32c(c) => *c = crc32c::crc32c_append(*c, d),
            Hasher::Sha224(h) => h.update(d),
            Hasher::Sha256(h) => h.update(d),
            Hasher::Sha384(h) => h.update(d),
            Hasher::Sha512(h) => h.update(d),
        }
    }

    /// The raw checksum in the manifest's byte order.
    fn finish(self) -> Vec<u8> {
        match self {
            Hasher::None => Vec::new(),
            Hasher::Crc32c(c) => c.to_le_bytes().to_vec(),
            Hasher::Sha224(h) => h.finalize().to_vec(),
            Hasher::Sha256(h) => h.finalize().to_vec(),
            Hasher::Sha384(h) => h.finalize().to_vec(),
            Hasher::Sha512(h) => h.finalize().to_vec(),
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Reads the chunks the async side sends (also the WAL segment check's input).
pub(crate) struct ChannelReader {
    pub(crate) rx: mpsc::Receiver<Bytes>,
    pub(crate) cur: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(b) => self.cur = b,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        let _ = self.cur.split_to(n);
        Ok(n)
    }
}

/// The tar stream's consumer: parses it and checks files against the manifest.
struct TarCheck {
    parser: TarParser,
    events: Vec<TarEvent>,
    /// Manifest path prefix of this archive's entries (`pg_tblspc/<oid>/` for a tablespace).
    prefix: String,
    manifest: Arc<HashMap<String, ManifestFile>>,
    /// The regular file being read: its manifest path, hasher and size.
    cur: Option<(String, Option<Hasher>, u64)>,
    seen: Vec<String>,
    /// File mismatches, one line each.
    mismatches: Vec<String>,
    /// A tar error: the stream cannot be read further.
    failed: Option<String>,
    tar_bytes: u64,
}

impl TarCheck {
    fn handle(&mut self) {
        for ev in self.events.drain(..) {
            match ev {
                TarEvent::Entry { meta, .. } => {
                    self.cur = matches!(meta.kind, EntryKind::File).then(|| {
                        let path = format!("{}{}", self.prefix, meta.path);
                        let h = self.manifest.get(&path).map(|f| Hasher::new(f.algorithm));
                        (path, h, 0)
                    });
                }
                TarEvent::Data(d) => {
                    if let Some((_, h, size)) = &mut self.cur {
                        if let Some(h) = h {
                            h.update(&d);
                        }
                        *size += d.len() as u64;
                    }
                }
                TarEvent::EntryEnd { .. } => {
                    if let Some((path, h, size)) = self.cur.take() {
                        if let (Some(h), Some(want)) = (h, self.manifest.get(&path)) {
                            if size != want.size {
                                self.mismatches.push(format!(
                                    "file {path} has {size} bytes, the backup manifest says {}",
                                    want.size
                                ));
                            } else {
                                let got = h.finish();
                                if got != want.checksum {
                                    self.mismatches.push(format!(
                                        "file {path} fails its manifest checksum ({} {}, expected {})",
                                        want.algorithm,
                                        hex(&got),
                                        hex(&want.checksum)
                                    ));
                                }
                            }
                        }
                        self.seen.push(path);
                    }
                }
                TarEvent::Trailer(_) => {}
            }
        }
    }
}

impl Write for TarCheck {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(f) = &self.failed {
            return Err(io::Error::other(f.clone()));
        }
        self.tar_bytes += buf.len() as u64;
        let mut events = std::mem::take(&mut self.events);
        let r = self.parser.feed(Bytes::copy_from_slice(buf), &mut events);
        self.events = events;
        self.handle();
        match r {
            Ok(()) => Ok(buf.len()),
            Err(e) => {
                self.failed = Some(format!("is not a valid tar archive: {e}"));
                Err(io::Error::other(e))
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The verdict on one tar object's content.
struct TarResult {
    /// None: the content checked out (file mismatches are in `mismatches`).
    broken: Option<String>,
    mismatches: Vec<String>,
    seen: Vec<String>,
    tar_bytes: u64,
}

fn check_tar_blocking(
    rx: mpsc::Receiver<Bytes>,
    compressed: bool,
    prefix: String,
    manifest: Arc<HashMap<String, ManifestFile>>,
) -> TarResult {
    let mut w = TarCheck {
        parser: TarParser::new(),
        events: Vec::new(),
        prefix,
        manifest,
        cur: None,
        seen: Vec::new(),
        mismatches: Vec::new(),
        failed: None,
        tar_bytes: 0,
    };
    let reader = ChannelReader {
        rx,
        cur: Bytes::new(),
    };
    let r = decompress_stream(reader, &mut w, compressed);
    let broken = match r {
        _ if w.failed.is_some() => w.failed.take(),
        Err(e) if is_corrupt(&e) => Some(format!("does not decompress: {e}")),
        Err(e) => Some(format!("cannot be read: {e}")),
        Ok(_) => {
            let mut ev = Vec::new();
            w.parser
                .finish(&mut ev)
                .err()
                .map(|e| format!("is not a complete tar archive: {e}"))
        }
    };
    TarResult {
        broken,
        mismatches: w.mismatches,
        seen: w.seen,
        tar_bytes: w.tar_bytes,
    }
}

/// Sends every piece of `reader` to a checker on a blocking thread through `tx` (`seen` counts
/// each piece's bytes). When the checker stops early (bad content) the object is still read to
/// its end, so that the stored checksum there says whether the object itself is damaged.
/// `Some(detail)` when it is (the store's `Corrupt`); `tx` is dropped before returning, so the
/// checker sees the end of its input.
pub(crate) async fn pump(
    reader: &mut dyn crate::archive::ObjectReader,
    tx: mpsc::Sender<Bytes>,
    mut seen: impl FnMut(u64),
) -> Result<Option<String>, StoreError> {
    let mut tx = Some(tx);
    loop {
        match reader.next_chunk().await {
            Ok(Some(chunk)) => {
                seen(chunk.len() as u64);
                if let Some(t) = &tx {
                    if t.send(chunk).await.is_err() {
                        tx = None;
                    }
                }
            }
            Ok(None) => return Ok(None),
            Err(StoreError::Corrupt { detail, .. }) => return Ok(Some(detail)),
            Err(e) => return Err(e),
        }
    }
}

/// Streams one tar object through [`check_tar_blocking`]. `Ok(Err(problem))` when the object is
/// missing or its stored checksum fails; `Err` when the store cannot be read.
async fn check_tar(
    store: &dyn Store,
    a: &TarArchive,
    manifest: Arc<HashMap<String, ManifestFile>>,
    progress: &Progress,
    out: &mut BackupOutcome,
) -> Result<Result<TarResult, String>, StoreError> {
    let mut reader = match store.open_reader(&a.key).await {
        Ok(Some(r)) => r,
        Ok(None) => return Ok(Err("missing: backup.json lists it".into())),
        Err(StoreError::Corrupt { detail, .. }) => return Ok(Err(detail)),
        Err(e) => return Err(e),
    };
    out.objects_read += 1;
    let prefix = a
        .tablespace_oid
        .map_or(String::new(), |oid| format!("pg_tblspc/{oid}/"));
    let compressed = a.key.ends_with(".zst");
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let worker =
        tokio::task::spawn_blocking(move || check_tar_blocking(rx, compressed, prefix, manifest));
    let stored_error = pump(reader.as_mut(), tx, |n| {
        out.stored_bytes += n;
        progress.add(n);
    })
    .await?;
    let res = worker
        .await
        .map_err(|e| StoreError::io(format!("checking {}", a.key), io::Error::other(e)))?;
    if let Some(d) = stored_error {
        return Ok(Err(format!("damaged: {d}")));
    }
    Ok(Ok(res))
}

/// Checks backup `info`'s manifest and tar objects.
pub async fn check_backup(
    store: &dyn Store,
    info: &BackupInfo,
    progress: &Progress,
) -> Result<BackupOutcome, StoreError> {
    let mut out = BackupOutcome::default();
    let problem = |object: &str, p: String| Problem {
        object: object.to_string(),
        problem: p,
    };
    let mut manifest_ok = false;
    let mut files: HashMap<String, ManifestFile> = HashMap::new();
    if let Some(mkey) = &info.manifest_key {
        match store.get_bytes(mkey).await {
            Ok(Some(raw)) => {
                out.objects_read += 1;
                out.stored_bytes += raw.len() as u64;
                progress.add(raw.len() as u64);
                match BackupManifest::parse(&raw) {
                    Ok(m) => {
                        match m.system_identifier {
                            Some(s) if Some(s) != info.system_identifier_u64() => {
                                out.problems.push(problem(
                                    mkey,
                                    format!(
                                        "names system {s}, backup.json system {}",
                                        info.system_identifier
                                    ),
                                ));
                            }
                            _ => manifest_ok = true,
                        }
                        files = m.files.into_iter().map(|f| (f.path_lossy(), f)).collect();
                    }
                    Err(e) => out.problems.push(problem(mkey, format!("damaged: {e}"))),
                }
            }
            Ok(None) => out
                .problems
                .push(problem(mkey, "missing: backup.json lists it".into())),
            Err(StoreError::Corrupt { detail, .. }) => out
                .problems
                .push(problem(mkey, format!("damaged: {detail}"))),
            Err(e) => return Err(e),
        }
    }
    let files = Arc::new(files);
    let mut seen: HashSet<String> = HashSet::new();
    let mut all_read = true;
    for a in &info.archives {
        match check_tar(store, a, files.clone(), progress, &mut out).await? {
            Err(p) => {
                all_read = false;
                out.problems.push(problem(&a.key, p));
            }
            Ok(r) => {
                out.tar_bytes += r.tar_bytes;
                if let Some(b) = r.broken {
                    all_read = false;
                    out.problems.push(problem(&a.key, b));
                    continue;
                }
                for m in r.mismatches {
                    out.problems.push(problem(&a.key, m));
                }
                if r.tar_bytes != a.tar_bytes {
                    out.problems.push(problem(
                        &a.key,
                        format!(
                            "holds {} tar bytes, backup.json says {}",
                            r.tar_bytes, a.tar_bytes
                        ),
                    ));
                }
                seen.extend(r.seen);
            }
        }
    }
    // Files the manifest lists that no archive held (only when every archive could be read:
    // a damaged one is reported once, not with each of its files).
    if manifest_ok && all_read {
        let mut missing: Vec<&String> = files.keys().filter(|p| !seen.contains(*p)).collect();
        missing.sort();
        if let (Some(first), Some(mkey)) = (missing.first(), &info.manifest_key) {
            out.problems.push(problem(
                mkey,
                format!(
                    "lists {} file(s) that none of the backup's archives holds, first {first}",
                    missing.len()
                ),
            ));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::catalog::{archive_key, manifest_key};
    use crate::archive::{LocalStore, PutMode};
    use crate::datadir::unpack::tests::tar_of;

    /// A version-1 manifest listing `files` with CRC-32C (or SHA-256) checksums.
    fn manifest_of(files: &[(&str, &[u8])], sha: bool) -> Vec<u8> {
        let entries: Vec<String> = files
            .iter()
            .map(|(p, d)| {
                let (alg, sum) = if sha {
                    ("SHA256", hex(&sha2::Sha256::digest(d)))
                } else {
                    ("CRC32C", hex(&crc32c::crc32c(d).to_le_bytes()))
                };
                format!(
                    "{{ \"Path\": \"{p}\", \"Size\": {}, \"Last-Modified\": \"2026-11-22 06:06:05 GMT\", \"Checksum-Algorithm\": \"{alg}\", \"Checksum\": \"{sum}\" }}",
                    d.len()
                )
            })
            .collect();
        let body = format!(
            "{{ \"PostgreSQL-Backup-Manifest-Version\": 1,\n\"Files\": [\n{}\n],\n\"WAL-Ranges\": [\n{{ \"Timeline\": 1, \"Start-LSN\": \"0/2000028\", \"End-LSN\": \"0/2000100\" }}\n],\n",
            entries.join(",\n")
        );
        let sum = crate::datadir::manifest::manifest_checksum_of(
            format!("{body}\"Manifest-Checksum\": \"x\"}}\n").as_bytes(),
        )
        .unwrap();
        format!("{body}\"Manifest-Checksum\": \"{sum}\"}}\n").into_bytes()
    }

    async fn backup_with(
        store: &LocalStore,
        tar_files: &[(&str, &[u8])],
        manifest_files: &[(&str, &[u8])],
        sha: bool,
    ) -> BackupInfo {
        let mut info = sample();
        let tar = tar_of(tar_files);
        let compressed = crate::archive::compress::compress_bulk(&tar, 1).unwrap();
        let key = archive_key(&info.id, "base.tar", true);
        let mut w = store.create_writer(&key).await.unwrap();
        // In pieces, as a backup writes it.
        for c in compressed.chunks(777) {
            w.write(Bytes::copy_from_slice(c)).await.unwrap();
        }
        w.finish().await.unwrap();
        store
            .put_bytes(
                &manifest_key(&info.id),
                Bytes::from(manifest_of(manifest_files, sha)),
                PutMode::Replace,
            )
            .await
            .unwrap();
        info.archives[0].key = key;
        info.archives[0].tar_bytes = tar.len() as u64;
        info
    }

    fn sample() -> BackupInfo {
        let id = "20261122T101500Z";
        BackupInfo {
            format: crate::archive::catalog::FORMAT,
            id: id.into(),
            label: "walagent base backup".into(),
            system_identifier: "7311234567890123456".into(),
            server_version_num: 150018,
            timeline: crate::wal::timeline::tl(1),
            start_lsn: crate::wal::Lsn(0x0300_0028),
            end_lsn: crate::wal::Lsn(0x0300_0100),
            end_timeline: crate::wal::timeline::tl(1),
            start_time: "2026-11-22T10:15:00.123456Z".into(),
            stop_time: "2026-11-22T10:15:03.000001Z".into(),
            wal_segment_size: 16 << 20,
            compression: "zstd:1".into(),
            data_bytes: 0,
            stored_bytes: 0,
            archives: vec![TarArchive {
                name: "base.tar".into(),
                key: String::new(),
                tablespace_oid: None,
                tablespace_location: None,
                tar_bytes: 0,
                stored_bytes: 0,
            }],
            manifest_key: Some(manifest_key(id)),
            wal_start_segment: "000000010000000000000003".into(),
            wal_end_segment: "000000010000000000000003".into(),
            source: "host=127.0.0.1".into(),
            walagent_version: "0.1.0".into(),
        }
    }

    const FILES: &[(&str, &[u8])] = &[("PG_VERSION", b"15\n"), ("global/pg_control", &[7u8; 9000])];

    #[tokio::test]
    async fn files_are_checked_against_the_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        let off = Progress::with_total(false, 0);
        for sha in [false, true] {
            let info = backup_with(&store, FILES, FILES, sha).await;
            let out = check_backup(&store, &info, &off).await.unwrap();
            assert!(out.problems.is_empty(), "{:?}", out.problems);
            assert_eq!(out.objects_read, 2);
            assert_eq!(out.tar_bytes, info.archives[0].tar_bytes);
        }

        // A file whose content differs from what the manifest says (stored checksum intact).
        let mut changed = FILES.to_vec();
        changed[1] = ("global/pg_control", &[8u8; 9000]);
        let info = backup_with(&store, &changed, FILES, false).await;
        let out = check_backup(&store, &info, &off).await.unwrap();
        assert_eq!(out.problems.len(), 1, "{:?}", out.problems);
        assert_eq!(out.problems[0].object, info.archives[0].key);
        assert!(
            out.problems[0]
                .problem
                .contains("global/pg_control fails its manifest checksum"),
            "{:?}",
            out.problems
        );

        // A file the manifest lists that no archive holds; a short file.
        let info = backup_with(&store, &FILES[..1], FILES, true).await;
        let out = check_backup(&store, &info, &off).await.unwrap();
        assert_eq!(out.problems.len(), 1, "{:?}", out.problems);
        assert!(
            out.problems[0].problem.contains("global/pg_control"),
            "{:?}",
            out.problems
        );
        let mut short = FILES.to_vec();
        short[1] = ("global/pg_control", &[7u8; 8999]);
        let info = backup_with(&store, &short, FILES, false).await;
        let out = check_backup(&store, &info, &off).await.unwrap();
        assert!(
            out.problems[0].problem.contains("8999 bytes"),
            "{:?}",
            out.problems
        );

        // A missing tar object and a missing manifest.
        let info = backup_with(&store, FILES, FILES, false).await;
        store.delete(&info.archives[0].key).await.unwrap();
        store.delete(&manifest_key(&info.id)).await.unwrap();
        let out = check_backup(&store, &info, &off).await.unwrap();
        let objs: Vec<&str> = out.problems.iter().map(|p| p.object.as_str()).collect();
        assert_eq!(objs.len(), 2, "{:?}", out.problems);
        assert!(out
            .problems
            .iter()
            .all(|p| p.problem.starts_with("missing")));
    }
}
