//! `walagent wal-fetch --archive PATH %f %p`: PostgreSQL's `restore_command`.
//!
//! PostgreSQL asks restore_command for WAL segments (`000000010000000000000003`) and timeline
//! history files (`00000002.history`); it never asks for `.partial` files, and no longer for
//! `.backup` files (backup history files, which walagent never archives). A `.partial` name is
//! served too, for people fetching one by hand.
//!
//! The file appears at DEST atomically (temp file in DEST's directory, then rename); on any error
//! neither DEST nor a temp file is left (an existing DEST is left as it was). A segment must
//! decompress to exactly the segment size, and must be the WAL its name asks for before it is
//! placed: every page header is checked against the name (magic, `xlp_pageaddr`, `xlp_tli`) and
//! walagent.json (the long header's system identifier and segment size), and every record's
//! CRC-32C, by the streaming verifier of `walagent stream` ([`SegmentChecker`]) while the object
//! is decompressed. See [`fetch`] and `proto-notes/archive-layout.md` ("What wal-fetch checks").
//! Exit codes: not found → 1 (PostgreSQL: "not in the archive"), anything else → 126, which
//! makes PostgreSQL stop recovery rather than end it early (see [`EXIT_FATAL`]).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};

use bytes::Bytes;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::archive::compress::{create_private, decompress_stream, is_corrupt};
use crate::archive::layout::{history_key, segment_key_by_name, META_KEY};
use crate::archive::meta::MetaError;
use crate::archive::{ArchiveMeta, Detail, ObjectReader, OpenError, Store, StoreError};
use crate::wal::verify::{check_page_timelines, SegmentChecker, VerifyError, VerifyParams};
use crate::wal::{parse_history_file_name, Lsn, SegmentId, Timeline, TimelineHistory};

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
    #[error("archive object {key} in {archive} is corrupt ({detail})")]
    Corrupt {
        key: String,
        archive: String,
        #[source]
        detail: Detail,
    },
    /// The object decompressed fine but is not the WAL the name asks for (another segment,
    /// another cluster, another timeline's WAL past the fork, damaged records, a lost tail).
    #[error("archive object {key} in {archive} fails the WAL check for {name}: {detail}")]
    WrongWal {
        key: String,
        archive: String,
        name: String,
        #[source]
        detail: Detail,
    },
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The archive could not be opened (exit [`EXIT_FATAL`]: recovery must stop, not end).
    #[error("{0}")]
    Open(#[from] OpenError),
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

    /// What to do about it, for the `hint:` part of the error line.
    pub fn hint(&self) -> Option<String> {
        match self {
            FetchError::Corrupt { .. } => Some(
                "the object does not decompress to a whole segment (damaged or cut short) and is not served; restore it from another copy of the archive (or remove it to let recovery end before it)"
                    .to_string(),
            ),
            FetchError::WrongWal { .. } => Some(
                "the object holds other WAL than its name says, or damaged WAL, and is not served so that recovery stops here instead of replaying it; restore the object from another copy of the archive (or remove it to let recovery end before it)"
                    .to_string(),
            ),
            FetchError::Open(e) => e.hint(),
            // Since wal-fetch makes no bucket check before its GETs, a misconfiguration (an
            // untrusted certificate, bad credentials) shows up here and keeps its fix. The
            // store's generic I/O hint (free space of the archive and spool) does not fit a read.
            FetchError::Store(e) | FetchError::Meta(MetaError::Store(e)) => match e {
                StoreError::Io { .. } => None,
                e => e.hint(),
            },
            FetchError::Meta(e) => e.hint(),
            _ => None,
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
    History(Timeline),
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
    let mut opened: Option<(String, Option<Box<dyn ObjectReader>>)> = None;
    let local_root = store.local_root();
    let (candidates, expect) = match parse_request(name)? {
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
            // walagent.json and the first candidate at once: the two requests overlap, so a cold
            // call waits for one round trip instead of two. The object is only read once
            // walagent.json said what it must be (the reader is dropped on any error).
            // A local archive's objects are read in the decoder thread instead (below).
            let first_key = segment_key_by_name(&seg_name, true, partial);
            let meta = if local_root.is_some() {
                ArchiveMeta::load(store).await?
            } else {
                let (meta, first) =
                    tokio::join!(ArchiveMeta::load(store), store.open_reader(&first_key));
                let meta = meta?;
                opened = Some((first_key, first?));
                meta
            };
            let meta = meta.ok_or_else(|| FetchError::NoMeta {
                archive: archive.clone(),
            })?;
            let size = meta.wal_segment_size;
            let Some(id) = SegmentId::parse_file_name(&seg_name, size) else {
                return Err(FetchError::BadName(name.to_string()));
            };
            let mut c = Vec::new();
            if !partial {
                // `.zst`, raw, `.zst` again: compaction writes `X.zst` before it removes `X`, so a
                // segment compacted between the first two looks is found by the third (two looks
                // alone could call it missing, and "missing" ends recovery early).
                for compressed in [true, false, true] {
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
            let expect = Expect {
                params: VerifyParams {
                    system_identifier: meta.system_identifier,
                    segment_size: size,
                    timeline: id.timeline,
                },
                start: id.start_lsn(size),
            };
            (c, Some(expect))
        }
    };

    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let pid = std::process::id();
    let out = TempGuard::new(dir.join(format!(".walagent-fetch.{name}.{pid}.tmp")));

    for cand in candidates {
        let (key, archive2) = (cand.key.clone(), archive.clone());
        let partial = cand.partial;
        let exp = expect.clone();
        let direct = match (&local_root, cand.compressed) {
            (Some(root), true) => plain_local_object(root, &cand.key),
            _ => None,
        };
        let finished = if let Some(path) = direct {
            // A local archive's `.zst` object: read by the decoder thread itself, with no async
            // reads and no hand-over (each 1 MiB piece would be read on a blocking thread,
            // copied into a fresh buffer and copied again by the decoder).
            let dst = out.0.clone();
            let found = tokio::task::spawn_blocking(move || {
                let file = match File::open(&path) {
                    Ok(f) => f,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => {
                        return Err(FetchError::io(
                            format!("cannot open archive object {}", path.display()),
                            e,
                        ))
                    }
                };
                finish_file(Some(file), &dst, partial, exp.as_ref(), &key, &archive2).map(Some)
            })
            .await
            .map_err(|e| FetchError::io("wal-fetch I/O task failed", io::Error::other(e)))??;
            match found {
                Some(f) => f,
                None => continue,
            }
        } else if cand.compressed {
            // Streamed: the object's bytes go through zstd and the WAL check straight into DEST's
            // temp file, with no compressed copy on disk.
            let reader = match opened.take() {
                Some((k, r)) if k == cand.key => r,
                _ => store.open_reader(&cand.key).await?,
            };
            let Some(reader) = reader else { continue };
            stream_to_file(reader, out.0.clone(), partial, exp, key, archive2).await?
        } else {
            let found = store.get_to_file(&cand.key, &out.0).await?;
            if !found {
                // A backend may have created the file anyway.
                let _ = fs::remove_file(&out.0);
                continue;
            }
            let dst = out.0.clone();
            tokio::task::spawn_blocking(move || {
                finish_file(
                    None::<io::Empty>,
                    &dst,
                    partial,
                    exp.as_ref(),
                    &key,
                    &archive2,
                )
            })
            .await
            .map_err(|e| FetchError::io("wal-fetch I/O task failed", io::Error::other(e)))??
        };
        if let Some(exp) = &expect {
            check_timelines(store, exp, &finished.timelines, &cand.key).await?;
        }
        let bytes = finished.bytes;
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

/// The file of the local archive object `key` under `root`, when it can be read as a plain file:
/// not when it carries a CRC-32 sidecar (streamed objects), which only the store's reader checks.
fn plain_local_object(root: &Path, key: &str) -> Option<PathBuf> {
    let path = root.join(key);
    let sidecar = crate::archive::local::sidecar_path(&path);
    match fs::symlink_metadata(&sidecar) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Some(path),
        _ => None,
    }
}

/// What a segment request must turn out to be.
#[derive(Debug, Clone)]
struct Expect {
    /// walagent.json's system identifier and segment size; the name's timeline.
    params: VerifyParams,
    /// The LSN of the segment the name asks for.
    start: Lsn,
}

/// The final content of DEST's temp file.
struct Finished {
    /// Its size.
    bytes: u64,
    /// For segments: each `xlp_tli` its pages carry, with the last page carrying it.
    timelines: Vec<(Timeline, Lsn)>,
}

/// The WAL check of one segment object as its bytes go by; the first failure is kept (the bytes
/// are still counted, so a wrong size is reported as such).
struct Check {
    checker: SegmentChecker,
    failed: Option<VerifyError>,
}

impl Check {
    fn update(&mut self, data: &[u8]) {
        if self.failed.is_none() {
            if let Err(e) = self.checker.update(data) {
                self.failed = Some(e);
            }
        }
    }
}

/// Writes through to `inner` and shows every byte written to the check.
struct CheckingWriter<'a, W> {
    inner: W,
    check: Option<&'a mut Check>,
}

impl<W: Write> Write for CheckingWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        if let Some(c) = self.check.as_deref_mut() {
            c.update(&buf[..n]);
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Turns what was read into the final content of `dst`: decompresses `input` into `dst` when it
/// is given (a zstd object; otherwise `dst` already holds the raw bytes), checks the size of
/// segments, pads partial segments with zeros, and for segments (`expect`) checks the WAL: page
/// headers against the name and walagent.json, record CRCs, and for a complete (not `.partial`)
/// segment that it holds WAL up to its end. The timelines of its pages are left to
/// [`check_timelines`].
fn finish_file<R: Read>(
    input: Option<R>,
    dst: &Path,
    partial: bool,
    expect: Option<&Expect>,
    key: &str,
    archive: &str,
) -> Result<Finished, FetchError> {
    let corrupt = |detail: Detail| FetchError::Corrupt {
        key: key.to_string(),
        archive: archive.to_string(),
        detail,
    };
    let mut check = expect.map(|e| Check {
        checker: SegmentChecker::new(e.params, e.start),
        failed: None,
    });
    let mut len = if let Some(input) = input {
        let output = create_private(dst)
            .map_err(|e| FetchError::io(format!("cannot create {}", dst.display()), e))?;
        let mut w = CheckingWriter {
            inner: io::BufWriter::with_capacity(1 << 20, output),
            check: check.as_mut(),
        };
        let n = match decompress_stream(input, &mut w, true) {
            Ok(n) => n,
            Err(e) if is_corrupt(&e) => return Err(corrupt(Detail::error(e))),
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
        let len = fs::metadata(dst)
            .map_err(|e| FetchError::io(format!("cannot stat {}", dst.display()), e))?
            .len();
        if let Some(c) = check.as_mut() {
            check_file(dst, len, c)?;
        }
        len
    };
    let Some(exp) = expect else {
        return Ok(Finished {
            bytes: len,
            timelines: Vec::new(),
        });
    };
    let want = u64::from(exp.params.segment_size.bytes());
    if partial {
        if len > want {
            return Err(corrupt(
                format!("partial segment holds {len} bytes, more than the segment size {want}")
                    .into(),
            ));
        }
        if len < want {
            if let Some(c) = check.as_mut() {
                if c.failed.is_none() {
                    if let Err(e) = c.checker.update_zeros(want - len) {
                        c.failed = Some(e);
                    }
                }
            }
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
        return Err(corrupt(
            format!("segment holds {len} bytes, expected {want}").into(),
        ));
    }
    let wrong = |detail: Detail| FetchError::WrongWal {
        key: key.to_string(),
        archive: archive.to_string(),
        name: exp.name(),
        detail,
    };
    let Some(c) = check else {
        return Ok(Finished {
            bytes: len,
            timelines: Vec::new(),
        });
    };
    if let Some(e) = c.failed {
        return Err(wrong(Detail::error(e)));
    }
    let timelines = c.checker.timeline_pages().to_vec();
    let seg = c.checker.finish().map_err(|e| wrong(Detail::error(e)))?;
    if !partial && !seg.complete {
        return Err(wrong(format!(
            "expected WAL up to the segment end {}, found valid WAL up to {} and only zeros after it (the segment's tail is missing)",
            Lsn(exp.start.0 + want),
            seg.data_end
        ).into()));
    }
    Ok(Finished {
        bytes: len,
        timelines,
    })
}

/// Reads a zstd object from `reader` and hands its bytes, as they arrive, to [`finish_file`] on a
/// blocking thread (decompression, the WAL check and the write of `dst` overlap with the
/// download). The object's own end checks (its CRC-32, its length) come last, from the reader; a
/// failing one wins over what zstd said about the same bytes, since it names the cause.
async fn stream_to_file(
    mut reader: Box<dyn ObjectReader>,
    dst: PathBuf,
    partial: bool,
    exp: Option<Expect>,
    key: String,
    archive: String,
) -> Result<Finished, FetchError> {
    let batch_size = stream_batch(&archive);
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<Bytes>>(STREAM_QUEUE);
    let task = tokio::task::spawn_blocking(move || {
        let input = ChannelReader {
            rx,
            batch: Vec::new().into_iter(),
            cur: Bytes::new(),
        };
        finish_file(Some(input), &dst, partial, exp.as_ref(), &key, &archive)
    });
    let mut store_err = None;
    let mut decoder_gone = false;
    // HTTP bodies come in pieces of a few KiB: handed over one by one, each would wake the
    // decoder thread. They go in batches of about 1 MiB instead, as a list of the pieces
    // themselves: no copy and no fresh 1 MiB buffer (and its page faults) per batch.
    let mut batch: Vec<Bytes> = Vec::new();
    let mut batch_len = 0usize;
    loop {
        let (chunk, end) = match reader.next_chunk().await {
            Ok(Some(chunk)) => (Some(chunk), false),
            Ok(None) => (None, true),
            Err(e) => {
                store_err = Some(e);
                (None, true)
            }
        };
        if let Some(c) = chunk {
            if !c.is_empty() {
                batch_len += c.len();
                batch.push(c);
            }
        }
        if !batch.is_empty() && (end || batch_len >= batch_size) {
            let full = std::mem::take(&mut batch);
            batch_len = 0;
            // Once the decoder has stopped (it failed), the rest is still read for the
            // object's own check, which names the cause better.
            if !decoder_gone && tx.send(full).await.is_err() {
                decoder_gone = true;
            }
        }
        if end {
            break;
        }
    }
    drop(tx);
    let res = task
        .await
        .map_err(|e| FetchError::io("wal-fetch I/O task failed", io::Error::other(e)))?;
    if let Some(e) = store_err {
        return Err(FetchError::Store(e));
    }
    res
}

/// What [`stream_to_file`] hands to the decoder thread at once: the memory plan's batch for the
/// archive's kind (`--memory-limit`; 256 KiB at 32MB: with a batch filling, one queued and one
/// being decoded, each download holds three; see `archive::memory::prefetch_download_bytes`).
fn stream_batch(archive: &str) -> usize {
    use crate::archive::memory;
    memory::plan_for(memory::ArchiveKind::of(archive)).prefetch_batch
}
/// Batches queued for the decoder thread at most (bounds the memory of a download to a few MiB
/// when the decoder is slower than the network or disk; with several prefetch downloads at once
/// each queued MiB counts several times: `archive::memory::PREFETCH_DOWNLOAD`).
const STREAM_QUEUE: usize = 1;

/// A blocking [`Read`] over the chunks [`stream_to_file`] receives; the end of the channel is the
/// end of the object.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<Vec<Bytes>>,
    /// The rest of the batch being read.
    batch: std::vec::IntoIter<Bytes>,
    cur: Bytes,
}

impl Read for ChannelReader {
    /// Fills `buf` from the pieces at hand (several HTTP pieces of a few KiB each make one read,
    /// so zstd gets large inputs); waits for the next batch only when it has nothing yet.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut n = 0;
        while n < buf.len() {
            if self.cur.is_empty() {
                if let Some(b) = self.batch.next() {
                    self.cur = b;
                    continue;
                }
                if n > 0 {
                    break;
                }
                match self.rx.blocking_recv() {
                    Some(b) => {
                        self.batch = b.into_iter();
                        continue;
                    }
                    None => break,
                }
            }
            let k = (buf.len() - n).min(self.cur.len());
            buf[n..n + k].copy_from_slice(&self.cur[..k]);
            bytes::Buf::advance(&mut self.cur, k);
            n += k;
        }
        Ok(n)
    }
}

impl Expect {
    /// The segment file name asked for.
    fn name(&self) -> String {
        SegmentId::containing(self.params.timeline, self.start, self.params.segment_size)
            .file_name(self.params.segment_size)
    }
}

/// Shows the `len` bytes of the file `path` to the check.
fn check_file(path: &Path, len: u64, check: &mut Check) -> Result<(), FetchError> {
    let mut f = File::open(path)
        .map_err(|e| FetchError::io(format!("cannot open {}", path.display()), e))?;
    let mut buf = vec![0u8; (1 << 20).min(len.max(1)) as usize];
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(FetchError::io(format!("cannot read {}", path.display()), e)),
        };
        check.update(&buf[..n]);
        if check.failed.is_some() {
            return Ok(());
        }
    }
}

/// Pages of an older timeline in a segment must be that timeline's WAL before its switch point
/// in the history of the name's timeline ([`check_page_timelines`]); the history file is read
/// only when such pages are there (the first segment of a timeline).
async fn check_timelines(
    store: &dyn Store,
    exp: &Expect,
    timelines: &[(Timeline, Lsn)],
    key: &str,
) -> Result<(), FetchError> {
    let tli = exp.params.timeline;
    if timelines.iter().all(|&(t, _)| t == tli) {
        return Ok(());
    }
    let hkey = history_key(tli);
    let history = match store.get_bytes(&hkey).await? {
        Some(bytes) => Some(
            TimelineHistory::parse(&bytes).map_err(|e| FetchError::Corrupt {
                key: hkey.clone(),
                archive: store.location(),
                detail: Detail::error(e),
            })?,
        ),
        None => None,
    };
    check_page_timelines(tli, timelines, history.as_ref()).map_err(|e| FetchError::WrongWal {
        key: key.to_string(),
        archive: store.location(),
        name: exp.name(),
        detail: Detail::error(e),
    })
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
    use crate::wal::SegmentSize;
    use bytes::Bytes;

    const SEG: &str = "000000010000000000000003";

    fn seg_size() -> SegmentSize {
        SegmentSize::new(1 << 20).unwrap()
    }

    const SYSID: u64 = 7311;

    /// Valid WAL for segment `segno` (1 MB segments, timeline `tli`) of system `sysid`, full to
    /// its end; `seed` varies the record payloads.
    fn wal_segment(sysid: u64, tli: u32, segno: u64, seed: u8) -> Vec<u8> {
        use crate::wal::synth::WalBuilder;
        let start = Lsn(segno << 20);
        let mut b = WalBuilder::new(sysid, seg_size(), tli, start);
        b.set_prev(Lsn(start.0 - 0x100));
        let mut i = 0u32;
        while b.position().0 < start.0 + (1 << 20) {
            let payload: Vec<u8> = (0..(200 + (i * 37 + u32::from(seed)) % 3000))
                .map(|j| (j as u8).wrapping_mul(31) ^ seed ^ 0x5A)
                .collect();
            b.push(10, 0, i, &payload);
            i += 1;
        }
        let mut v = b.into_bytes();
        v.truncate(1 << 20);
        v
    }

    /// Segment 3 (SEG) of this archive's cluster.
    fn segment_bytes(seed: u8) -> Vec<u8> {
        wal_segment(SYSID, 1, 3, seed)
    }

    struct Fixture {
        _t: tempfile::TempDir,
        store: LocalStore,
        pg_wal: PathBuf,
    }

    async fn fixture(with_meta: bool) -> Fixture {
        fixture_of(with_meta.then_some(SYSID)).await
    }

    async fn fixture_of(sysid: Option<u64>) -> Fixture {
        let t = tempfile::tempdir().unwrap();
        let store = LocalStore::open(&t.path().join("archive")).unwrap();
        if let Some(sysid) = sysid {
            ArchiveMeta::new(sysid, seg_size(), 150018)
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

    #[test]
    fn channel_reader_fills_reads_from_many_pieces() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Vec<Bytes>>(4);
        tx.try_send(vec![
            Bytes::from_static(b"abc"),
            Bytes::from_static(b"defgh"),
        ])
        .unwrap();
        tx.try_send(vec![Bytes::from_static(b"ij")]).unwrap();
        drop(tx);
        let mut r = ChannelReader {
            rx,
            batch: Vec::new().into_iter(),
            cur: Bytes::new(),
        };
        let mut buf = [0u8; 16];
        // One read takes the whole batch at hand, and does not wait for the next one.
        assert_eq!(r.read(&mut buf).unwrap(), 8);
        assert_eq!(&buf[..8], b"abcdefgh");
        let mut small = [0u8; 1];
        assert_eq!(r.read(&mut small).unwrap(), 1);
        assert_eq!(&small, b"i");
        assert_eq!(r.read(&mut buf).unwrap(), 1);
        assert_eq!(&buf[..1], b"j");
        assert_eq!(r.read(&mut buf).unwrap(), 0);
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

    /// A local store that compacts `wal/SEG` (raw -> `.zst`, as `archive::compact` does: the
    /// `.zst` first, then the raw removed) at the moment the raw key is first looked at, after
    /// the `.zst` key was already found missing.
    struct CompactsOnRawLook {
        inner: LocalStore,
        done: AtomicBool,
    }

    impl CompactsOnRawLook {
        async fn maybe_compact(&self, key: &str) {
            if key == format!("wal/{SEG}") && !self.done.swap(true, Ordering::SeqCst) {
                let raw = self.inner.get_bytes(key).await.unwrap().unwrap();
                let z = compress_bulk(&raw, 1).unwrap();
                self.inner
                    .put_bytes(
                        &format!("wal/{SEG}.zst"),
                        Bytes::from(z),
                        PutMode::NoOverwrite,
                    )
                    .await
                    .unwrap();
                self.inner.delete(key).await.unwrap();
            }
        }
    }

    #[async_trait::async_trait]
    impl Store for CompactsOnRawLook {
        fn location(&self) -> String {
            self.inner.location()
        }
        async fn put_file(&self, key: &str, src: &Path, mode: PutMode) -> Result<(), StoreError> {
            self.inner.put_file(key, src, mode).await
        }
        async fn put_bytes(&self, key: &str, data: Bytes, mode: PutMode) -> Result<(), StoreError> {
            self.inner.put_bytes(key, data, mode).await
        }
        async fn get_bytes(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
            self.maybe_compact(key).await;
            self.inner.get_bytes(key).await
        }
        async fn get_to_file(&self, key: &str, dest: &Path) -> Result<bool, StoreError> {
            self.maybe_compact(key).await;
            self.inner.get_to_file(key, dest).await
        }
        async fn list(&self, prefix: &str) -> Result<Vec<crate::archive::ObjectInfo>, StoreError> {
            self.inner.list(prefix).await
        }
        async fn delete(&self, key: &str) -> Result<(), StoreError> {
            self.inner.delete(key).await
        }
        async fn create_writer(
            &self,
            key: &str,
        ) -> Result<Box<dyn crate::archive::ObjectWriter>, StoreError> {
            self.inner.create_writer(key).await
        }
        async fn open_reader(
            &self,
            key: &str,
        ) -> Result<Option<Box<dyn ObjectReader>>, StoreError> {
            self.maybe_compact(key).await;
            self.inner.open_reader(key).await
        }
    }

    #[tokio::test]
    async fn a_segment_compacted_between_the_looks_is_found() {
        let f = fixture(true).await;
        let raw = segment_bytes(2);
        f.put(&format!("wal/{SEG}"), raw.clone()).await;
        let store = CompactsOnRawLook {
            inner: f.store.clone(),
            done: AtomicBool::new(false),
        };
        let o = fetch(&store, SEG, &f.dest(), false).await.unwrap();
        assert!(
            store.done.load(Ordering::SeqCst),
            "the raw key was never looked at"
        );
        assert_eq!(o.key, format!("wal/{SEG}.zst"));
        assert!(fs::read(f.dest()).unwrap() == raw);
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
        // The fix goes in the hint, not in the cause (`walagent: error: CAUSE; hint: FIX`).
        assert!(
            e.hint().is_some_and(|h| h.contains("another copy"))
                && !e.to_string().contains("restore it"),
            "{e}"
        );
        // The decoder's error is kept as the cause.
        let FetchError::Corrupt { detail, .. } = &e else {
            unreachable!()
        };
        assert!(
            std::error::Error::source(detail)
                .is_some_and(|s| s.downcast_ref::<io::Error>().is_some()),
            "{detail:?}"
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
        let head = segment_bytes(9)[..300_000].to_vec();
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

    /// Fetches `name` expecting the WAL check to refuse it: exit 126, one line naming the object
    /// and what did not match, DEST as it was, no temp files.
    async fn assert_wrong_wal(f: &Fixture, name: &str, allow_partial: bool, what: &str) {
        let before = fs::read(f.dest()).ok();
        let e = fetch(&f.store, name, &f.dest(), allow_partial)
            .await
            .unwrap_err();
        assert!(matches!(e, FetchError::WrongWal { .. }), "{name}: {e}");
        assert_eq!(e.exit_code(), EXIT_FATAL);
        if let FetchError::WrongWal {
            detail: Detail::Error { source, .. },
            ..
        } = &e
        {
            // A verifier's or timeline check's error, kept as the cause.
            assert!(!source.to_string().is_empty());
        }
        let msg = e.to_string();
        assert!(
            msg.contains("archive object wal/") && msg.contains(what) && !msg.contains('\n'),
            "{name}: {msg}"
        );
        assert!(e.hint().is_some_and(|h| !h.contains('\n')));
        assert_eq!(fs::read(f.dest()).ok(), before, "DEST changed");
        let left: Vec<String> = f
            .leftovers()
            .into_iter()
            .filter(|n| n != "RECOVERYXLOG")
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[tokio::test]
    async fn another_segment_under_the_name_is_refused() {
        let f = fixture(true).await;
        // Segment 4's WAL stored as segment 3.
        f.put(
            &format!("wal/{SEG}.zst"),
            compress_bulk(&wal_segment(SYSID, 1, 4, 1), 1).unwrap(),
        )
        .await;
        assert_wrong_wal(
            &f,
            SEG,
            false,
            "expected xlp_pageaddr 0/300000, found 0/400000",
        )
        .await;
        // An earlier DEST stays as it was.
        fs::write(f.dest(), b"earlier").unwrap();
        assert_wrong_wal(&f, SEG, false, "xlp_pageaddr").await;
        // Raw too.
        f.store.delete(&format!("wal/{SEG}.zst")).await.unwrap();
        f.put(&format!("wal/{SEG}"), wal_segment(SYSID, 1, 2, 1))
            .await;
        assert_wrong_wal(&f, SEG, false, "found 0/200000").await;
    }

    #[tokio::test]
    async fn another_cluster_or_timeline_is_refused() {
        let f = fixture(true).await;
        f.put(
            &format!("wal/{SEG}.zst"),
            compress_bulk(&wal_segment(SYSID + 1, 1, 3, 1), 1).unwrap(),
        )
        .await;
        assert_wrong_wal(
            &f,
            SEG,
            false,
            "expected system identifier 7311, found 7312",
        )
        .await;
        // A timeline-2 segment asked for as timeline 1's.
        f.put(
            &format!("wal/{SEG}.zst"),
            compress_bulk(&wal_segment(SYSID, 2, 3, 1), 1).unwrap(),
        )
        .await;
        assert_wrong_wal(&f, SEG, false, "expected xlp_tli between 1 and 1, found 2").await;
        // Another segment size.
        let mut b = crate::wal::synth::WalBuilder::new(
            SYSID,
            SegmentSize::new(2 << 20).unwrap(),
            1,
            Lsn(0x200000),
        );
        while b.position().0 < 0x300000 + (1 << 20) {
            b.push(1, 0, 1, &[7; 5000]);
        }
        let v = b.into_bytes()[0x100000..0x200000].to_vec();
        f.put(&format!("wal/{SEG}.zst"), compress_bulk(&v, 1).unwrap())
            .await;
        assert_wrong_wal(&f, SEG, false, "0/300000").await;
    }

    #[tokio::test]
    async fn damaged_raw_segments_are_refused() {
        let f = fixture(true).await;
        let good = segment_bytes(1);
        // One bit in record data (mid-page, far from any header).
        let mut bad = good.clone();
        bad[5 * 8192 + 4000] ^= 0x10;
        f.put(&format!("wal/{SEG}"), bad).await;
        assert_wrong_wal(&f, SEG, false, "CRC-32C").await;
        // Garbage of the right size.
        let garbage: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 + 3) as u8).collect();
        f.put(&format!("wal/{SEG}"), garbage).await;
        assert_wrong_wal(&f, SEG, false, "xlp_magic").await;
        // The tail lost (zeroed): valid WAL, but not the whole segment.
        let mut cut = good.clone();
        cut[600_000..].fill(0);
        f.put(&format!("wal/{SEG}"), cut).await;
        assert_wrong_wal(&f, SEG, false, "tail is missing").await;
        // The good one still serves, byte-identical.
        f.put(&format!("wal/{SEG}"), good.clone()).await;
        fetch(&f.store, SEG, &f.dest(), false).await.unwrap();
        assert!(fs::read(f.dest()).unwrap() == good);
    }

    #[tokio::test]
    async fn partial_objects_are_checked_over_what_they_hold() {
        let f = fixture(true).await;
        let full = segment_bytes(2);
        let name = format!("{SEG}.partial");
        // A genuine partial: a prefix, padded with zeros.
        f.put(
            &format!("wal/{name}.zst"),
            compress_bulk(&full[..400_000], 1).unwrap(),
        )
        .await;
        let o = fetch(&f.store, SEG, &f.dest(), true).await.unwrap();
        assert!(o.from_partial);
        let got = fs::read(f.dest()).unwrap();
        assert!(got[..400_000] == full[..400_000] && got[400_000..].iter().all(|&b| b == 0));
        // A partial of another segment, and one with a flipped bit.
        f.put(
            &format!("wal/{name}.zst"),
            compress_bulk(&wal_segment(SYSID, 1, 5, 2)[..400_000], 1).unwrap(),
        )
        .await;
        assert_wrong_wal(&f, SEG, true, "found 0/500000").await;
        let mut bad = full[..400_000].to_vec();
        bad[100_000] ^= 1;
        f.store.delete(&format!("wal/{name}.zst")).await.unwrap();
        f.put(&format!("wal/{name}"), bad).await;
        assert_wrong_wal(&f, &name, false, "wal/000000010000000000000003.partial").await;
    }

    /// Real WAL (PostgreSQL 15.18): the first segment of timeline 2 starts with timeline 1's page.
    #[tokio::test]
    async fn first_segment_of_a_timeline_needs_its_history() {
        const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/wal");
        let read = |n: &str| fs::read(format!("{FIXTURES}/{n}")).unwrap();
        let f = fixture_of(Some(7710843067740758272)).await;
        let b = "00000002000000000000000B";
        let seg = zstd::stream::decode_all(&read(&format!("{b}.zst"))[..]).unwrap();
        f.put(&format!("wal/{b}.zst"), read(&format!("{b}.zst")))
            .await;
        // Without 00000002.history nothing says timeline 1's page belongs to timeline 2.
        assert_wrong_wal(&f, b, false, "no history file of timeline 2").await;
        // A history where timeline 1 ends before that page.
        f.put("wal/00000002.history", b"1\t0/B00000\tx\n".to_vec())
            .await;
        assert_wrong_wal(&f, b, false, "timeline 1 ends there").await;
        // The real one.
        f.put("wal/00000002.history", read("00000002.history"))
            .await;
        fetch(&f.store, b, &f.dest(), false).await.unwrap();
        assert!(fs::read(f.dest()).unwrap() == seg);
        // The same WAL asked for as timeline 3's (3 forked off 2 later, in segment C): fine.
        f.put(
            "wal/00000003000000000000000B.zst",
            read(&format!("{b}.zst")),
        )
        .await;
        f.put("wal/00000003.history", read("00000003.history"))
            .await;
        fetch(&f.store, "00000003000000000000000B", &f.dest(), false)
            .await
            .unwrap();
        // As timeline 1's: it has timeline 2 pages.
        f.put(
            "wal/00000001000000000000000B.zst",
            read(&format!("{b}.zst")),
        )
        .await;
        assert_wrong_wal(&f, "00000001000000000000000B", false, "found 2").await;
        // A corrupt history file is reported as such.
        f.put("wal/00000002.history", b"x\n".to_vec()).await;
        let e = fetch(&f.store, b, &f.dest(), false).await.unwrap_err();
        assert!(
            matches!(&e, FetchError::Corrupt { key, .. } if key == "wal/00000002.history"),
            "{e}"
        );
    }
}
