//! `walagent wal-fetch --archive PATH %f %p`: PostgreSQL's `restore_command`.
//!
//! PostgreSQL asks restore_command for WAL segments (`000000010000000000000003`) and timeline
//! history files (`00000002.history`); it never asks for `.partial` files, and no longer for
//! `.backup` files (backup history files, which walagent never archives). A `.partial` name is
//! served too, for people fetching one by hand.
//!
//! The file appears at DEST atomically (temp file in DEST's directory, then rename); on any error
//! neither DEST nor a temp file is left. A segment must decompress to exactly the segment size.
//! Exit codes: not found → 1 (PostgreSQL: "not in the archive"), anything else → 126, which
//! makes PostgreSQL stop recovery rather than end it early (see [`EXIT_FATAL`]).

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::archive::compress::{create_private, decompress_stream, is_corrupt};
use crate::archive::layout::{history_key, segment_key_by_name, META_KEY};
use crate::archive::meta::MetaError;
use crate::archive::{ArchiveMeta, Store, StoreError};
use crate::wal::{parse_history_file_name, SegmentId, SegmentSize};

/// Exit status for a corrupt object, an unreachable archive or any other failure. PostgreSQL
/// reads 1..=125 from restore_command as "file not available", which would let a recovery end
/// early at a damaged or unreachable segment and promote there; an exit status above 125 makes it
/// stop recovery with an error instead (xlogarchive.c RestoreArchivedFile,
/// `wait_result_is_any_signal`), so the operator can fix the archive and start again.
pub const EXIT_FATAL: i32 = 126;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{name} not found in archive {archive}")]
    NotFound { name: String, archive: String },
    #[error("invalid WAL file name {0:?}: expected a segment name like 000000010000000000000003, a timeline history file like 00000002.history, or a segment name with .partial; restore_command must pass %f")]
    BadName(String),
    #[error("archive {archive} has no {META_KEY}, so it holds no WAL segments yet (or --archive points at the wrong directory)")]
    NoMeta { archive: String },
    #[error("{0}")]
    Meta(#[from] MetaError),
    #[error("archive object {key} in {archive} is corrupt ({detail}); restore it from another copy of the archive or remove it")]
    Corrupt {
        key: String,
        archive: String,
        detail: String,
    },
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

impl FetchError {
    /// Process exit status for `wal-fetch`: 1 when the file is not in the archive (routine for
    /// restore_command: PostgreSQL then tries streaming or ends recovery), [`EXIT_FATAL`] for
    /// everything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            FetchError::NotFound { .. } => 1,
            _ => EXIT_FATAL,
        }
    }

    fn io(context: impl Into<String>, source: io::Error) -> Self {
        FetchError::Io {
            context: context.into(),
            source,
        }
    }
}

/// What [`fetch`] delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchOutcome {
    /// The archive object read.
    pub key: String,
    /// Bytes written to DEST (after decompression and padding).
    pub bytes: u64,
    /// The bytes came from a `.partial` object (padded with zeros to the segment size).
    pub from_partial: bool,
}

/// What a restore_command file name asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Request {
    /// 24 hex digits (not yet checked against the segment size); `partial` for `<name>.partial`.
    Segment {
        name: String,
        partial: bool,
    },
    History(u32),
    /// `<segment>.<offset>.backup`: a valid PostgreSQL name that walagent never archives.
    BackupHistory,
}

fn is_hex(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn parse_request(name: &str) -> Result<Request, FetchError> {
    let bad = || FetchError::BadName(name.to_string());
    if let Some(tli) = parse_history_file_name(name) {
        return Ok(Request::History(tli));
    }
    let (base, partial) = match name.strip_suffix(".partial") {
        Some(b) => (b, true),
        None => (name, false),
    };
    if base.len() == 24 && is_hex(base) {
        if base[..8].bytes().all(|b| b == b'0') {
            return Err(bad()); // timeline 0 does not exist
        }
        return Ok(Request::Segment {
            name: base.to_ascii_uppercase(),
            partial,
        });
    }
    if let Some(stem) = name.strip_suffix(".backup") {
        if let Some((seg, off)) = stem.split_once('.') {
            if seg.len() == 24 && is_hex(seg) && off.len() == 8 && is_hex(off) {
                return Ok(Request::BackupHistory);
            }
        }
    }
    Err(bad())
}

/// One archive object that may serve the request.
struct Candidate {
    key: String,
    compressed: bool,
    partial: bool,
}

/// Fetches the WAL file `name` (restore_command's `%f`) from `store` into `dest` (`%p`).
/// With `allow_partial`, a segment missing from the archive is served from its `.partial` object
/// (padded with zeros to the segment size) when there is one.
pub async fn fetch(
    store: &dyn Store,
    name: &str,
    dest: &Path,
    allow_partial: bool,
) -> Result<FetchOutcome, FetchError> {
    let archive = store.location();
    let not_found = || FetchError::NotFound {
        name: name.to_string(),
        archive: archive.clone(),
    };
    let (candidates, seg_size) = match parse_request(name)? {
        Request::BackupHistory => return Err(not_found()),
        Request::History(tli) => (
            vec![Candidate {
                key: history_key(tli),
                compressed: false,
                partial: false,
            }],
            None,
        ),
        Request::Segment {
            name: seg_name,
            partial,
        } => {
            let meta = ArchiveMeta::load(store)
                .await?
                .ok_or_else(|| FetchError::NoMeta {
                    archive: archive.clone(),
                })?;
            let size = meta.wal_segment_size;
            if SegmentId::parse_file_name(&seg_name, size).is_none() {
                return Err(FetchError::BadName(name.to_string()));
            }
            let mut c = Vec::new();
            if !partial {
                for compressed in [true, false] {
                    c.push(Candidate {
                        key: segment_key_by_name(&seg_name, compressed, false),
                        compressed,
                        partial: false,
                    });
                }
            }
            if partial || allow_partial {
                for compressed in [true, false] {
                    c.push(Candidate {
                        key: segment_key_by_name(&seg_name, compressed, true),
                        compressed,
                        partial: true,
                    });
                }
            }
            (c, Some(size))
        }
    };

    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let pid = std::process::id();
    let out = TempGuard::new(dir.join(format!(".walagent-fetch.{name}.{pid}.tmp")));
    let download = TempGuard::new(dir.join(format!(".walagent-fetch.{name}.{pid}.zst.tmp")));

    for cand in candidates {
        let target = if cand.compressed { &download.0 } else { &out.0 };
        let found = store.get_to_file(&cand.key, target).await?;
        if !found {
            // A backend may have created the file anyway.
            let _ = fs::remove_file(target);
            continue;
        }
        let (src, dst) = (download.0.clone(), out.0.clone());
        let (key, archive2) = (cand.key.clone(), archive.clone());
        let compressed = cand.compressed;
        let partial = cand.partial;
        let bytes = tokio::task::spawn_blocking(move || {
            finish_file(&src, &dst, compressed, partial, seg_size, &key, &archive2)
        })
        .await
        .map_err(|e| {
            FetchError::io("wal-fetch I/O task failed", io::Error::other(e.to_string()))
        })??;
        download.remove();
        fs::rename(&out.0, dest).map_err(|e| {
            FetchError::io(
                format!("cannot rename {} to {}", out.0.display(), dest.display()),
                e,
            )
        })?;
        out.disarm();
        return Ok(FetchOutcome {
            key: cand.key,
            bytes,
            from_partial: cand.partial,
        });
    }
    Err(not_found())
}

/// Turns what was downloaded into the final content of `dst`: decompresses `src` into `dst` when
/// `compressed` (otherwise `dst` already holds the bytes), checks the size of segments, and pads
/// partial segments with zeros. Returns the final size of `dst`.
fn finish_file(
    src: &Path,
    dst: &Path,
    compressed: bool,
    partial: bool,
    seg_size: Option<SegmentSize>,
    key: &str,
    archive: &str,
) -> Result<u64, FetchError> {
    let corrupt = |detail: String| FetchError::Corrupt {
        key: key.to_string(),
        archive: archive.to_string(),
        detail,
    };
    let mut len = if compressed {
        let input = File::open(src)
            .map_err(|e| FetchError::io(format!("cannot open downloaded {}", src.display()), e))?;
        let output = create_private(dst)
            .map_err(|e| FetchError::io(format!("cannot create {}", dst.display()), e))?;
        let mut w = io::BufWriter::with_capacity(1 << 20, output);
        let n = match decompress_stream(BufReader::with_capacity(1 << 20, input), &mut w, true) {
            Ok(n) => n,
            Err(e) if is_corrupt(&e) => return Err(corrupt(e.to_string())),
            Err(e) => {
                return Err(FetchError::io(
                    format!("cannot decompress {key} into {}", dst.display()),
                    e,
                ))
            }
        };
        w.flush()
            .map_err(|e| FetchError::io(format!("cannot write {}", dst.display()), e))?;
        n
    } else {
        fs::metadata(dst)
            .map_err(|e| FetchError::io(format!("cannot stat {}", dst.display()), e))?
            .len()
    };
    let Some(size) = seg_size else { return Ok(len) };
    let want = u64::from(size.bytes());
    if partial {
        if len > want {
            return Err(corrupt(format!(
                "partial segment holds {len} bytes, more than the segment size {want}"
            )));
        }
        if len < want {
            let mut f = OpenOptions::new()
                .append(true)
                .open(dst)
                .map_err(|e| FetchError::io(format!("cannot open {}", dst.display()), e))?;
            let zeros = vec![0u8; 1 << 20];
            while len < want {
                let n = (want - len).min(zeros.len() as u64) as usize;
                f.write_all(&zeros[..n])
                    .map_err(|e| FetchError::io(format!("cannot write {}", dst.display()), e))?;
                len += n as u64;
            }
        }
    } else if len != want {
        return Err(corrupt(format!(
            "segment holds {len} bytes, expected {want}"
        )));
    }
    Ok(len)
}

/// A temp file removed on drop unless disarmed.
struct TempGuard(PathBuf, AtomicBool);

impl TempGuard {
    fn new(p: PathBuf) -> Self {
        TempGuard(p, AtomicBool::new(true))
    }
    fn remove(&self) {
        let _ = fs::remove_file(&self.0);
    }
    fn disarm(&self) {
        self.1.store(false, Ordering::Relaxed);
    }
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if self.1.load(Ordering::Relaxed) {
            self.remove();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::compress::compress_bulk;
    use crate::archive::{LocalStore, PutMode};
    use bytes::Bytes;

    const SEG: &str = "000000010000000000000003";

    fn seg_size() -> SegmentSize {
        SegmentSize::new(1 << 20).unwrap()
    }

    fn segment_bytes(seed: u8) -> Vec<u8> {
        (0..(1u32 << 20))
            .map(|i| {
                if i % 512 < 256 {
                    (i as u8).wrapping_mul(31) ^ seed
                } else {
                    0
                }
            })
            .collect()
    }

    struct Fixture {
        _t: tempfile::TempDir,
        store: LocalStore,
        pg_wal: PathBuf,
    }

    async fn fixture(with_meta: bool) -> Fixture {
        let t = tempfile::tempdir().unwrap();
        let store = LocalStore::open(&t.path().join("archive")).unwrap();
        if with_meta {
            ArchiveMeta::new(7311, seg_size(), 150018)
                .save(&store)
                .await
                .unwrap();
        }
        let pg_wal = t.path().join("pg_wal");
        fs::create_dir(&pg_wal).unwrap();
        Fixture {
            _t: t,
            store,
            pg_wal,
        }
    }

    impl Fixture {
        async fn put(&self, key: &str, data: Vec<u8>) {
            self.store
                .put_bytes(key, Bytes::from(data), PutMode::Replace)
                .await
                .unwrap();
        }
        fn dest(&self) -> PathBuf {
            self.pg_wal.join("RECOVERYXLOG")
        }
        /// Files in pg_wal: after any fetch, only DEST (on success) may be there.
        fn leftovers(&self) -> Vec<String> {
            let mut v: Vec<String> = fs::read_dir(&self.pg_wal)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        }
    }

    #[tokio::test]
    async fn compressed_segment_byte_identical() {
        let f = fixture(true).await;
        let data = segment_bytes(1);
        f.put(&format!("wal/{SEG}.zst"), compress_bulk(&data, 1).unwrap())
            .await;
        let o = fetch(&f.store, SEG, &f.dest(), false).await.unwrap();
        assert_eq!(
            o,
            FetchOutcome {
                key: format!("wal/{SEG}.zst"),
                bytes: 1 << 20,
                from_partial: false
            }
        );
        assert!(fs::read(f.dest()).unwrap() == data);
        assert_eq!(f.leftovers(), vec!["RECOVERYXLOG"]);
    }

    #[tokio::test]
    async fn raw_segment_and_zst_preferred() {
        let f = fixture(true).await;
        let raw = segment_bytes(2);
        f.put(&format!("wal/{SEG}"), raw.clone()).await;
        let o = fetch(&f.store, SEG, &f.dest(), false).await.unwrap();
        assert_eq!(o.key, format!("wal/{SEG}"));
        assert!(fs::read(f.dest()).unwrap() == raw);

        // With both forms present the .zst one is used; DEST is replaced.
        let z = segment_bytes(3);
        f.put(&format!("wal/{SEG}.zst"), compress_bulk(&z, 1).unwrap())
            .await;
        let o = fetch(&f.store, SEG, &f.dest(), false).await.unwrap();
        assert_eq!(o.key, format!("wal/{SEG}.zst"));
        assert!(fs::read(f.dest()).unwrap() == z);
        assert_eq!(f.leftovers(), vec!["RECOVERYXLOG"]);
    }

    #[tokio::test]
    async fn history_file() {
        // History files need no walagent.json.
        let f = fixture(false).await;
        let h = b"1\t0/3000158\tno recovery target specified\n".to_vec();
        f.put("wal/00000002.history", h.clone()).await;
        let dest = f.pg_wal.join("RECOVERYHISTORY");
        let o = fetch(&f.store, "00000002.history", &dest, false)
            .await
            .unwrap();
        assert_eq!(
            (o.key.as_str(), o.bytes),
            ("wal/00000002.history", h.len() as u64)
        );
        assert_eq!(fs::read(&dest).unwrap(), h);
        let e = fetch(&f.store, "00000003.history", &dest, false)
            .await
            .unwrap_err();
        assert!(matches!(e, FetchError::NotFound { .. }), "{e}");
        assert_eq!(f.leftovers(), vec!["RECOVERYHISTORY"]);
    }

    #[tokio::test]
    async fn missing_is_not_found() {
        let f = fixture(true).await;
        let e = fetch(&f.store, SEG, &f.dest(), false).await.unwrap_err();
        assert!(matches!(e, FetchError::NotFound { .. }));
        assert_eq!(e.exit_code(), 1);
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!("{SEG} not found in archive ")) && !msg.contains('\n'),
            "{msg}"
        );
        assert!(f.leftovers().is_empty());
        // Backup history files are valid names that walagent never archives.
        let e = fetch(
            &f.store,
            "000000010000000000000002.00000028.backup",
            &f.dest(),
            false,
        )
        .await
        .unwrap_err();
        assert_eq!(e.exit_code(), 1, "{e}");
    }

    #[tokio::test]
    async fn corrupt_zst_leaves_nothing() {
        let f = fixture(true).await;
        let mut z = compress_bulk(&segment_bytes(4), 1).unwrap();
        let mid = z.len() / 2;
        z[mid] ^= 0xFF;
        f.put(&format!("wal/{SEG}.zst"), z).await;
        let e = fetch(&f.store, SEG, &f.dest(), false).await.unwrap_err();
        assert!(matches!(e, FetchError::Corrupt { .. }), "{e}");
        assert_eq!(e.exit_code(), EXIT_FATAL);
        assert!(
            e.to_string().contains("is corrupt") && !e.to_string().contains('\n'),
            "{e}"
        );
        assert!(f.leftovers().is_empty(), "{:?}", f.leftovers());
    }

    #[tokio::test]
    async fn truncated_zst_leaves_nothing() {
        let f = fixture(true).await;
        let z = compress_bulk(&segment_bytes(5), 1).unwrap();
        f.put(&format!("wal/{SEG}.zst"), z[..z.len() * 2 / 3].to_vec())
            .await;
        let e = fetch(&f.store, SEG, &f.dest(), false).await.unwrap_err();
        assert!(matches!(e, FetchError::Corrupt { .. }), "{e}");
        assert!(e.to_string().contains("truncated"), "{e}");
        assert!(f.leftovers().is_empty(), "{:?}", f.leftovers());
    }

    #[tokio::test]
    async fn wrong_size_segment_is_corrupt() {
        let f = fixture(true).await;
        // Valid zstd, wrong content size.
        f.put(
            &format!("wal/{SEG}.zst"),
            compress_bulk(&[1u8; 1000], 1).unwrap(),
        )
        .await;
        let e = fetch(&f.store, SEG, &f.dest(), false).await.unwrap_err();
        assert!(
            e.to_string()
                .contains("segment holds 1000 bytes, expected 1048576"),
            "{e}"
        );
        f.store.delete(&format!("wal/{SEG}.zst")).await.unwrap();
        // Raw, too short.
        f.put(&format!("wal/{SEG}"), vec![0u8; 4096]).await;
        let e = fetch(&f.store, SEG, &f.dest(), false).await.unwrap_err();
        assert!(matches!(e, FetchError::Corrupt { .. }), "{e}");
        assert!(f.leftovers().is_empty(), "{:?}", f.leftovers());
    }

    #[tokio::test]
    async fn partial_served_only_when_allowed() {
        let f = fixture(true).await;
        let head: Vec<u8> = (0..300_000u32).map(|i| (i % 97) as u8 + 1).collect();
        f.put(
            &format!("wal/{SEG}.partial.zst"),
            compress_bulk(&head, 1).unwrap(),
        )
        .await;
        let e = fetch(&f.store, SEG, &f.dest(), false).await.unwrap_err();
        assert!(matches!(e, FetchError::NotFound { .. }), "{e}");

        let o = fetch(&f.store, SEG, &f.dest(), true).await.unwrap();
        assert!(o.from_partial);
        assert_eq!(o.bytes, 1 << 20);
        let got = fs::read(f.dest()).unwrap();
        assert_eq!(got.len(), 1 << 20);
        assert!(got[..head.len()] == head[..] && got[head.len()..].iter().all(|&b| b == 0));

        // A complete segment wins over the partial one.
        let full = segment_bytes(6);
        f.put(&format!("wal/{SEG}"), full.clone()).await;
        let o = fetch(&f.store, SEG, &f.dest(), true).await.unwrap();
        assert!(!o.from_partial);
        assert!(fs::read(f.dest()).unwrap() == full);

        // Asking for the .partial name by hand serves the partial object.
        let dest = f.pg_wal.join(format!("{SEG}.partial"));
        let o = fetch(&f.store, &format!("{SEG}.partial"), &dest, false)
            .await
            .unwrap();
        assert!(o.from_partial && o.key.ends_with(".partial.zst"));

        // An oversized partial is corrupt.
        f.put(
            &format!("wal/{SEG}.partial.zst"),
            compress_bulk(&vec![1u8; (1 << 20) + 1], 1).unwrap(),
        )
        .await;
        let e = fetch(&f.store, &format!("{SEG}.partial"), &dest, false)
            .await
            .unwrap_err();
        assert!(matches!(e, FetchError::Corrupt { .. }), "{e}");
    }

    #[tokio::test]
    async fn bad_names() {
        let f = fixture(true).await;
        for name in [
            "",
            "RECOVERYXLOG",
            "00000001000000000000000",
            "0000000100000000000000030",
            "00000001000000000000000G",
            "000000000000000000000003",
            "000000010000000000001000", // segment part out of range for 1 MB segments
            "00000000.history",
            "../../etc/passwd",
            "wal/000000010000000000000003",
            "000000010000000000000003.zst",
            "000000010000000000000003.backup",
        ] {
            let e = fetch(&f.store, name, &f.dest(), true).await.unwrap_err();
            assert!(matches!(e, FetchError::BadName(_)), "{name}: {e}");
            assert_eq!(e.exit_code(), EXIT_FATAL);
            assert!(!e.to_string().contains('\n'));
        }
        assert!(f.leftovers().is_empty());
    }

    #[tokio::test]
    async fn segment_without_meta() {
        let f = fixture(false).await;
        let e = fetch(&f.store, SEG, &f.dest(), false).await.unwrap_err();
        assert!(matches!(e, FetchError::NoMeta { .. }), "{e}");
        assert_eq!(e.exit_code(), EXIT_FATAL);
    }

    #[tokio::test]
    async fn lowercase_name() {
        let f = fixture(true).await;
        let data = segment_bytes(7);
        f.put(&format!("wal/{SEG}.zst"), compress_bulk(&data, 1).unwrap())
            .await;
        let o = fetch(&f.store, &SEG.to_ascii_lowercase(), &f.dest(), false)
            .await
            .unwrap();
        assert_eq!(o.key, format!("wal/{SEG}.zst"));
        assert_eq!(
            parse_request("000000010000000000000003").unwrap(),
            Request::Segment {
                name: SEG.into(),
                partial: false
            }
        );
    }
}
