//! Storing one WAL file the way every writer stores it: complete segments never overwritten,
//! identical WAL already there (in any encoding) taken as success, different WAL a
//! [`StoreError::Conflict`]. `walagent stream`'s archiver (spooled files) and `walagent wal-push`
//! (PostgreSQL's archive_command, a file in `pg_wal`) both go through [`put_complete`];
//! `wal-push` also uses [`find_archived`], [`store_complete_segment`] and the `.partial` rule
//! [`compare_partial`]. See `proto-notes/wal-push.md`.
//!
//! Checksums are the stores' (S3: `walagent-crc32` metadata and the CRC-32 header; zstd frames
//! carry their content checksum); durability too (every put returns once the object is durable).

use std::path::Path;

use bytes::Bytes;

use super::compact::{compare_content, Compared};
use super::layout::segment_key_by_name;
use super::{compress, read_wal_object, Compression, PutMode, Store, StoreError};

/// What a put is made from.
#[derive(Debug, Clone)]
pub enum Body<'a> {
    /// A local file (the store may move it: see [`Store::put_file`]).
    File(&'a Path),
    /// Bytes in memory.
    Bytes(Bytes),
}

/// The WAL an object holds, to compare with what is already archived (in pieces: a file is read
/// as it is compared, a zstd body decompressed as it is compared).
#[derive(Debug, Clone)]
pub enum Raw<'a> {
    /// A file of the raw WAL.
    File(&'a Path),
    /// The raw WAL in memory.
    Bytes(Bytes),
    /// The WAL as a zstd body in memory (the writer's own output, e.g. a backup's compressed
    /// segment): decompressed on its own thread while it is compared, never whole.
    Zstd(Bytes),
}

/// How a no-overwrite put ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// The object is durable under its key (new, or byte-identical to what was there: the
    /// stores do not tell these apart).
    Put,
    /// The key held the same WAL in another encoding (another zstd level, another writer);
    /// nothing was written.
    SameWal,
}

/// Puts a complete segment (or any WAL object that never changes) under `key` without
/// overwriting. Different content already under the key is [`StoreError::Conflict`]; the same
/// WAL once decompressed is [`Stored::SameWal`]. A transient failure while comparing is returned
/// as such (the caller may retry); any other failure to read the stored object leaves the
/// conflict standing.
pub async fn put_complete(
    store: &dyn Store,
    key: &str,
    body: Body<'_>,
    raw: Raw<'_>,
) -> Result<Stored, StoreError> {
    let put = match body {
        Body::File(p) => store.put_file(key, p, PutMode::NoOverwrite).await,
        Body::Bytes(b) => store.put_bytes(key, b, PutMode::NoOverwrite).await,
    };
    match put {
        Ok(()) => Ok(Stored::Put),
        Err(conflict @ StoreError::Conflict { .. }) => {
            // A raw file that cannot be read leaves the conflict standing, as any other
            // non-transient failure to compare.
            match super::same_wal_content(store, key, raw).await {
                Ok(true) => Ok(Stored::SameWal),
                Err(e) if e.is_transient() => Err(e),
                Ok(false) | Err(_) => Err(conflict),
            }
        }
        Err(e) => Err(e),
    }
}

/// A WAL object already in the archive under one of a name's keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Archived {
    pub key: String,
    /// Its content, decompressed.
    pub content: Vec<u8>,
}

/// The archived object for the segment file `name` (24 hex digits), complete or (`partial`) the
/// `.partial`, in either encoding: `wal/<name>[.partial].zst` first, then the raw key, as
/// wal-fetch looks them up (and `.zst` once more). Three reads at most, no listing.
pub async fn find_archived(
    store: &dyn Store,
    name: &str,
    partial: bool,
) -> Result<Option<Archived>, StoreError> {
    // `.zst`, raw, then `.zst` again: compaction (`archive::compact`) writes `X.zst` before it
    // removes `X`, so a segment being compacted between the first two looks is found by the
    // third; two looks alone could miss both and call an archived segment missing.
    for compressed in [true, false, true] {
        let key = segment_key_by_name(name, compressed, partial);
        if let Some(content) = read_wal_object(store, &key).await? {
            return Ok(Some(Archived { key, content }));
        }
    }
    Ok(None)
}

/// Compares the file `raw` with the archived complete segment or `.partial` `name` under either
/// key (`.zst`, raw, `.zst` again, as [`find_archived`]), streamed: the object is read piece by
/// piece and decompressed into a comparison with the file, so neither is held whole (wal-push's
/// already-archived path stays inside the memory budget). `None` when nothing is archived, else
/// the key found and whether it holds exactly the file's bytes (a corrupt object is "not the
/// same").
pub async fn compare_archived_file(
    store: &dyn Store,
    name: &str,
    partial: bool,
    raw: &Path,
) -> Result<Option<(String, bool)>, StoreError> {
    for compressed in [true, false, true] {
        let key = segment_key_by_name(name, compressed, partial);
        let what = format!("comparing archive object {key} with {}", raw.display());
        let file = raw.to_path_buf();
        let open = move || std::fs::File::open(file);
        let Some(c) = compare_object(store, &key, compressed, open, false, what).await? else {
            continue;
        };
        return Ok(Some((key, matches!(c, Compared::Same))));
    }
    Ok(None)
}

/// Compares the stored object `key` (zstd when `compressed`) with what `open_other` opens, both
/// in pieces on a blocking thread: the object is pulled piece by piece from the store
/// ([`BlockingObjectReader`]) through the decompressor into [`compact::compare_content`] (see
/// there for `to_end`). `None` when the object is absent. A failure of the store while reading
/// is returned as the store reported it (a transient one stays transient); a failure to open or
/// read the other side, or of the blocking thread, is [`StoreError::Io`] with `what`.
async fn compare_object<R, F>(
    store: &dyn Store,
    key: &str,
    compressed: bool,
    open_other: F,
    to_end: bool,
    what: String,
) -> Result<Option<Compared>, StoreError>
where
    R: std::io::Read,
    F: FnOnce() -> std::io::Result<R> + Send + 'static,
{
    let Some(reader) = store.open_reader(key).await? else {
        return Ok(None);
    };
    let handle = tokio::runtime::Handle::current();
    let (res, failed) = tokio::task::spawn_blocking(move || {
        let mut src = BlockingObjectReader {
            reader,
            handle,
            chunk: Bytes::new(),
            failed: None,
        };
        let res =
            open_other().and_then(|other| compare_content(&mut src, compressed, other, to_end));
        (res, src.failed)
    })
    .await
    .map_err(|e| StoreError::io(what.clone(), std::io::Error::other(e)))?;
    if let Some(e) = failed {
        return Err(e);
    }
    res.map(Some).map_err(|e| StoreError::io(what, e))
}

/// Whether the stored WAL object `key` holds exactly the WAL `raw` once decompressed (`.zst`
/// keys), read, decompressed and compared in pieces ([`compare_object`]): see
/// [`super::same_wal_content`].
pub(super) async fn same_wal_as(
    store: &dyn Store,
    key: &str,
    raw: Raw<'_>,
) -> Result<bool, StoreError> {
    let compressed = key.ends_with(super::layout::ZSTD_SUFFIX);
    let compared = match raw {
        Raw::Bytes(b) => {
            let what = format!("comparing archive object {key} with the WAL to archive");
            let open = move || Ok(std::io::Cursor::new(b));
            compare_object(store, key, compressed, open, true, what).await?
        }
        Raw::File(p) => {
            let what = format!("comparing archive object {key} with {}", p.display());
            let file = p.to_path_buf();
            let open = move || std::fs::File::open(file);
            compare_object(store, key, compressed, open, true, what).await?
        }
        Raw::Zstd(body) => {
            let what = format!("comparing archive object {key} with the compressed WAL to archive");
            let open = move || DecompressingReader::start(body);
            compare_object(store, key, compressed, open, true, what).await?
        }
    };
    match compared {
        None | Some(Compared::Different) => Ok(false),
        Some(Compared::Same) => Ok(true),
        Some(Compared::Corrupt(e)) => Err(StoreError::Corrupt {
            key: key.to_string(),
            detail: e.to_string(),
        }),
    }
}

/// A `std::io::Read` of the WAL a zstd body holds: [`compress::decompress_stream`] runs on a
/// thread of its own and hands its output over in pieces (a bounded channel: the decoder's
/// buffers and two pieces of up to 256 KiB at once, never the whole WAL). A body that does not
/// decode fails the read at that point with the decoder's error. Dropping the reader early
/// stops the thread at its next piece.
struct DecompressingReader {
    rx: std::sync::mpsc::Receiver<Vec<u8>>,
    piece: Vec<u8>,
    at: usize,
    thread: Option<std::thread::JoinHandle<std::io::Result<u64>>>,
}

impl DecompressingReader {
    fn start(body: Bytes) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(1);
        let thread = std::thread::Builder::new()
            .name("walagent-zstd-compare".into())
            .spawn(move || compress::decompress_stream(&body[..], PieceSender(tx), true))?;
        Ok(DecompressingReader {
            rx,
            piece: Vec::new(),
            at: 0,
            thread: Some(thread),
        })
    }
}

impl std::io::Read for DecompressingReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at >= self.piece.len() {
            match self.rx.recv() {
                Ok(p) => (self.piece, self.at) = (p, 0),
                Err(_) => {
                    // The decoder is done: its end, or its error.
                    return match self.thread.take().map(std::thread::JoinHandle::join) {
                        None | Some(Ok(Ok(_))) => Ok(0),
                        // Not the decoder's "corrupt" error as such: that would blame the
                        // archived object the WAL is compared with.
                        Some(Ok(Err(e))) => Err(std::io::Error::other(format!(
                            "the WAL to archive does not decompress: {e}"
                        ))),
                        Some(Err(_)) => Err(std::io::Error::other("the zstd thread panicked")),
                    };
                }
            }
        }
        let n = buf.len().min(self.piece.len() - self.at);
        buf[..n].copy_from_slice(&self.piece[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// The decoder's output side of [`DecompressingReader`]; fails once the reader is gone.
struct PieceSender(std::sync::mpsc::SyncSender<Vec<u8>>);

/// Most bytes [`PieceSender`] hands over at once (the decoder writes up to 1 MiB; with one piece
/// queued and one being compared, smaller pieces hold less).
const PIECE: usize = 256 * 1024;

impl std::io::Write for PieceSender {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        // A partial write: the decoder's write_all hands over the rest.
        let piece = &data[..data.len().min(PIECE)];
        self.0
            .send(piece.to_vec())
            .map_err(|_| std::io::Error::other("comparison stopped"))?;
        Ok(piece.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `std::io::Read` over an [`ObjectReader`](super::ObjectReader), for a blocking thread: each
/// piece is awaited on the runtime's handle. A failure of the store is kept in `failed` (the
/// read fails with its message), for the caller to return as the store reported it.
struct BlockingObjectReader {
    reader: Box<dyn super::ObjectReader>,
    handle: tokio::runtime::Handle,
    chunk: Bytes,
    failed: Option<StoreError>,
}

impl std::io::Read for BlockingObjectReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.chunk.is_empty() {
            if let Some(e) = &self.failed {
                return Err(std::io::Error::other(e.to_string()));
            }
            match self.handle.block_on(self.reader.next_chunk()) {
                Ok(Some(c)) => self.chunk = c,
                Ok(None) => return Ok(0),
                Err(e) => {
                    let err = std::io::Error::other(e.to_string());
                    self.failed = Some(e);
                    return Err(err);
                }
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        bytes::Buf::advance(&mut self.chunk, n);
        Ok(n)
    }
}

/// Encodes `raw` for `key`'s suffix (zstd when compressed) on a blocking thread.
pub async fn encode(raw: Bytes, compression: Compression) -> Result<Bytes, StoreError> {
    match compression {
        Compression::None => Ok(raw),
        Compression::Zstd { level } => tokio::task::spawn_blocking(move || {
            compress::compress_bulk(&raw, level).map(Bytes::from)
        })
        .await
        .map_err(|e| StoreError::io("compressing WAL", std::io::Error::other(e)))?
        .map_err(|e| StoreError::io("compressing WAL", e)),
    }
}

/// How a complete segment reached the archive ([`store_complete_segment`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SegmentOutcome {
    /// Stored now under `key`.
    Stored { key: String },
    /// The archive already held the same WAL under `key` (the stream, an earlier push).
    AlreadyArchived { key: String },
}

/// Stores the complete segment file `name` whose bytes `raw` the caller has verified: if either
/// encoding of it is archived already, identical WAL is success and different WAL is
/// [`StoreError::Conflict`] naming that key (never an overwrite, and never a second, different
/// copy under the other encoding's key, which wal-fetch might serve instead); otherwise it is
/// compressed and put with [`put_complete`] (a writer that got there meanwhile is handled the
/// same way).
pub async fn store_complete_segment(
    store: &dyn Store,
    name: &str,
    raw: Bytes,
    compression: Compression,
) -> Result<SegmentOutcome, StoreError> {
    if let Some(found) = find_archived(store, name, false).await? {
        return if found.content == raw[..] {
            Ok(SegmentOutcome::AlreadyArchived { key: found.key })
        } else {
            Err(StoreError::Conflict { key: found.key })
        };
    }
    put_new_segment(store, name, raw, compression).await
}

/// The second half of [`store_complete_segment`], for a caller that already found neither
/// encoding archived: compresses `raw` and puts it with [`put_complete`].
pub async fn put_new_segment(
    store: &dyn Store,
    name: &str,
    raw: Bytes,
    compression: Compression,
) -> Result<SegmentOutcome, StoreError> {
    let key = segment_key_by_name(name, compression.is_compressed(), false);
    let body = encode(raw.clone(), compression).await?;
    match put_complete(store, &key, Body::Bytes(body), Raw::Bytes(raw)).await? {
        Stored::Put => Ok(SegmentOutcome::Stored { key }),
        Stored::SameWal => Ok(SegmentOutcome::AlreadyArchived { key }),
    }
}

/// What to do with a `.partial` segment's WAL `new` when the archive already holds `old` for
/// the same segment (the `.partial` of `walagent stream` or an earlier push, or the complete
/// segment). Both are the WAL of one timeline from the segment's start, each as far as its
/// writer had it; WAL is append-only, so one must be a prefix of the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartialCompare {
    /// The same bytes.
    Identical,
    /// `old` holds all of `new` and more: keep it.
    ArchivedHoldsMore,
    /// `new` holds all of `old` and more: `old` may be replaced by `new`.
    NewHoldsMore,
    /// They differ within their common length: different WAL.
    Different,
}

pub fn compare_partial(old: &[u8], new: &[u8]) -> PartialCompare {
    let common = old.len().min(new.len());
    if old.get(..common) != new.get(..common) {
        return PartialCompare::Different;
    }
    match old.len().cmp(&new.len()) {
        std::cmp::Ordering::Equal => PartialCompare::Identical,
        std::cmp::Ordering::Greater => PartialCompare::ArchivedHoldsMore,
        std::cmp::Ordering::Less => PartialCompare::NewHoldsMore,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::LocalStore;

    #[test]
    fn partial_rules() {
        use PartialCompare::*;
        assert_eq!(compare_partial(b"abc", b"abc"), Identical);
        assert_eq!(compare_partial(b"abcd", b"abc"), ArchivedHoldsMore);
        assert_eq!(compare_partial(b"ab", b"abc"), NewHoldsMore);
        assert_eq!(compare_partial(b"", b"abc"), NewHoldsMore);
        assert_eq!(compare_partial(b"abd", b"abc"), Different);
        assert_eq!(compare_partial(b"abdx", b"abc"), Different);
        assert_eq!(compare_partial(b"xb", b"abc"), Different);
    }

    fn temp_store(tag: &str) -> (std::path::PathBuf, LocalStore) {
        let dir = std::env::temp_dir().join(format!(
            "walagent-segment-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let store = LocalStore::open(&dir).unwrap();
        (dir, store)
    }

    /// The streamed comparison agrees with reading the object whole: the same bytes under the
    /// `.zst` or the raw key, different bytes, a longer or shorter file, a corrupt `.zst`, and
    /// nothing archived. Pieces bigger than the read buffers (3 MiB) cross every boundary.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn compare_archived_file_streams_and_agrees() {
        let (dir, store) = temp_store("compare");
        let name = "000000010000000000000004";
        let wal: Vec<u8> = (0..3u32 << 20).map(|i| (i % 251) as u8).collect();
        let file = dir.join("segment-file");
        std::fs::write(&file, &wal).unwrap();
        assert_eq!(
            compare_archived_file(&store, name, false, &file)
                .await
                .unwrap(),
            None
        );
        let zst_key = format!("wal/{name}.zst");
        let raw_key = format!("wal/{name}");
        for (key, body) in [
            (&zst_key, compress::compress_bulk(&wal, 1).unwrap()),
            (&raw_key, wal.clone()),
        ] {
            store
                .put_bytes(key, Bytes::from(body), PutMode::Replace)
                .await
                .unwrap();
            assert_eq!(
                compare_archived_file(&store, name, false, &file)
                    .await
                    .unwrap(),
                Some((key.clone(), true)),
                "{key}"
            );
            let mut other = wal.clone();
            other[(2 << 20) + 7] ^= 1;
            for (tag, content) in [
                ("different", other),
                ("longer", [&wal[..], b"x"].concat()),
                ("shorter", wal[..wal.len() - 1].to_vec()),
            ] {
                let f = dir.join(tag);
                std::fs::write(&f, &content).unwrap();
                assert_eq!(
                    compare_archived_file(&store, name, false, &f)
                        .await
                        .unwrap(),
                    Some((key.clone(), false)),
                    "{key} {tag}"
                );
            }
            store.delete(key).await.unwrap();
        }
        // A `.zst` that is not zstd: not the same WAL (never "already archived").
        store
            .put_bytes(
                &zst_key,
                Bytes::from_static(b"not zstd at all"),
                PutMode::Replace,
            )
            .await
            .unwrap();
        assert_eq!(
            compare_archived_file(&store, name, false, &file)
                .await
                .unwrap(),
            Some((zst_key, false))
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn complete_segments_are_never_overwritten() {
        let (dir, store) = temp_store("complete");
        let name = "000000010000000000000003";
        let wal = Bytes::from(vec![7u8; 4096]);
        let z = Compression::DEFAULT;
        // New: stored compressed.
        let o = store_complete_segment(&store, name, wal.clone(), z)
            .await
            .unwrap();
        assert_eq!(
            o,
            SegmentOutcome::Stored {
                key: format!("wal/{name}.zst")
            }
        );
        // Again, and with another encoding: the same WAL is there.
        for c in [z, Compression::None, Compression::Zstd { level: 5 }] {
            let o = store_complete_segment(&store, name, wal.clone(), c)
                .await
                .unwrap();
            assert_eq!(
                o,
                SegmentOutcome::AlreadyArchived {
                    key: format!("wal/{name}.zst")
                }
            );
        }
        assert!(!dir.join("wal").join(name).exists());
        // Different WAL: a conflict naming the key, the object untouched.
        let other = Bytes::from(vec![8u8; 4096]);
        for c in [z, Compression::None] {
            let e = store_complete_segment(&store, name, other.clone(), c)
                .await
                .unwrap_err();
            assert!(
                matches!(&e, StoreError::Conflict { key } if key == &format!("wal/{name}.zst")),
                "{e:?}"
            );
        }
        let kept = read_wal_object(&store, &format!("wal/{name}.zst"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(kept, wal[..]);

        // A raw object of another writer counts too.
        let name2 = "000000010000000000000004";
        store
            .put_bytes(&format!("wal/{name2}"), wal.clone(), PutMode::NoOverwrite)
            .await
            .unwrap();
        let o = store_complete_segment(&store, name2, wal.clone(), z)
            .await
            .unwrap();
        assert_eq!(
            o,
            SegmentOutcome::AlreadyArchived {
                key: format!("wal/{name2}")
            }
        );
        let e = store_complete_segment(&store, name2, other.clone(), z)
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::Conflict { .. }), "{e:?}");
        assert!(!dir.join("wal").join(format!("{name2}.zst")).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn put_complete_tells_same_wal_from_a_conflict() {
        let (dir, store) = temp_store("put");
        // Varied enough that zstd levels encode it differently.
        let wal: Vec<u8> = (0u64..200_000)
            .map(|i| (i * i % 251) as u8 ^ (i / 7) as u8)
            .collect();
        let key = "wal/000000010000000000000005.zst";
        let body = compress::compress_bulk(&wal, 1).unwrap();
        let r = put_complete(
            &store,
            key,
            Body::Bytes(Bytes::from(body.clone())),
            Raw::Bytes(Bytes::from(wal.clone())),
        )
        .await
        .unwrap();
        assert_eq!(r, Stored::Put);
        // Another zstd level: different bytes, same WAL.
        let body9 = compress::compress_bulk(&wal, 9).unwrap();
        assert_ne!(body9, body);
        let r = put_complete(
            &store,
            key,
            Body::Bytes(Bytes::from(body9)),
            Raw::Bytes(Bytes::from(wal.clone())),
        )
        .await
        .unwrap();
        assert_eq!(r, Stored::SameWal);
        // From files, as the archiver calls it.
        let raw_path = dir.join("raw");
        std::fs::write(&raw_path, &wal).unwrap();
        let z_path = dir.join("z");
        let body19 = compress::compress_bulk(&wal, 19).unwrap();
        assert_ne!(body19, body);
        std::fs::write(&z_path, body19).unwrap();
        let r = put_complete(&store, key, Body::File(&z_path), Raw::File(&raw_path))
            .await
            .unwrap();
        assert_eq!(r, Stored::SameWal);
        let other = vec![4u8; 1000];
        let e = put_complete(
            &store,
            key,
            Body::Bytes(Bytes::from(compress::compress_bulk(&other, 1).unwrap())),
            Raw::Bytes(Bytes::from(other.clone())),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, StoreError::Conflict { .. }), "{e:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
