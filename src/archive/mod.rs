//! The archive: where completed WAL segments, timeline history files and (later) base backups
//! live. One [`Store`] trait with a local-filesystem backend (and S3 to come), one object
//! layout ([`layout`]) shared by every backend, and zstd compression ([`compress`]).

pub mod catalog;
pub mod compact;
pub mod compress;
pub mod index;
pub mod layout;
pub mod local;
pub mod lock;
pub mod memory;
pub mod meta;
pub mod s3;
pub mod segment;

use std::path::Path;

use async_trait::async_trait;
use bytes::Bytes;

pub use compress::Compression;
pub use local::LocalStore;
pub use meta::ArchiveMeta;

/// What to do when the key already exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutMode {
    /// Never overwrite: identical existing content is success, different content is
    /// [`StoreError::Conflict`]. Used for completed segments and history files.
    NoOverwrite,
    /// Replace whatever is there (partial segments, metadata that grows).
    Replace,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Key relative to the archive root, e.g. `wal/000000010000000000000003.zst`.
    pub key: String,
    pub size: u64,
    /// What changes when the object is replaced, for change detection (`walagent verify`): the
    /// S3 ETag; for the local store the modification time (ns) and inode. `None` when unknown.
    pub etag: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("archive object {key} already exists with different content; refusing to overwrite it (another cluster or agent writing to the same archive?)")]
    Conflict { key: String },
    #[error("archive object {key} is corrupt: {detail}")]
    Corrupt { key: String, detail: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The store could not be reached or answered with a retryable failure (network error,
    /// timeout, HTTP 5xx, throttling). Retrying later may succeed.
    #[error("{context}: {detail}")]
    Unavailable { context: String, detail: String },
    /// The store refused the credentials or the request (HTTP 403, bad signature, unknown key).
    #[error("{context}: access denied ({detail}); check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (or the profile) and the bucket policy")]
    AccessDenied { context: String, detail: String },
    /// The bucket does not exist.
    #[error("bucket {bucket:?} does not exist at {endpoint}; create it or fix the s3:// URL (and AWS_ENDPOINT_URL / AWS_REGION)")]
    NoSuchBucket { bucket: String, endpoint: String },
    /// Any other failure the store reported; not retried.
    #[error("{context}: {detail}")]
    Remote { context: String, detail: String },
    /// The store cannot be used as configured (e.g. an unusable CA bundle, a server certificate
    /// no trusted CA signed); `fix` is the hint. Not retried.
    #[error("{cause}")]
    Misconfigured { cause: String, fix: String },
}

/// What is wrong with an archive object, for an error message: a finding in words, or a
/// failure with its own error type, kept as the error's source (after an optional lead-in such
/// as `"not JSON: "`).
#[derive(Debug, thiserror::Error)]
pub enum Detail {
    #[error("{0}")]
    Text(String),
    #[error("{context}{source}")]
    Error {
        context: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
}

impl Detail {
    /// `source`'s message, keeping `source` as the cause.
    pub fn error(source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::context("", source)
    }

    /// `context` followed by `source`'s message, keeping `source` as the cause.
    pub fn context(
        context: &'static str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Detail::Error {
            context,
            source: Box::new(source),
        }
    }
}

impl From<String> for Detail {
    fn from(s: String) -> Self {
        Detail::Text(s)
    }
}

impl From<&str> for Detail {
    fn from(s: &str) -> Self {
        Detail::Text(s.to_string())
    }
}

impl StoreError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        StoreError::Io {
            context: context.into(),
            source,
        }
    }

    /// The fix for failures with a well-known one.
    pub fn hint(&self) -> Option<String> {
        match self {
            StoreError::Conflict { .. } => {
                Some("use a separate archive for each cluster and run one agent per archive".into())
            }
            StoreError::Io { .. } => {
                Some("check free space and permissions of the archive and spool directories".into())
            }
            StoreError::Misconfigured { fix, .. } => Some(fix.clone()),
            _ => None,
        }
    }

    /// Failures that a retry after a pause may cure.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. })
    }
}

/// A place that keeps archive objects durably. Every method returns only once the effect is
/// durable (for the local backend: file and directory fsynced).
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Where this store is, for messages: a path or `s3://bucket/prefix`.
    fn location(&self) -> String;

    /// The directory of a local archive (where its lock lives); None for object stores.
    fn local_root(&self) -> Option<std::path::PathBuf> {
        None
    }

    /// Stores the content of the local file `src` under `key`. The store may move `src` instead of
    /// copying it; after success the caller removes `src` if it still exists.
    async fn put_file(&self, key: &str, src: &Path, mode: PutMode) -> Result<(), StoreError>;

    /// Stores a small object held in memory.
    async fn put_bytes(&self, key: &str, data: Bytes, mode: PutMode) -> Result<(), StoreError>;

    /// Reads a small object whole; `None` when absent.
    async fn get_bytes(&self, key: &str) -> Result<Option<Bytes>, StoreError>;

    /// Copies the stored bytes of `key` into the local file `dest` (created or truncated; not
    /// fsynced, not renamed). Returns false when the key is absent.
    async fn get_to_file(&self, key: &str, dest: &Path) -> Result<bool, StoreError>;

    /// Objects whose key starts with `prefix`, in no particular order.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError>;

    /// Removes `key`; absent is fine.
    async fn delete(&self, key: &str) -> Result<(), StoreError>;

    /// Starts writing a large object of unknown size in pieces (base backups): nothing is
    /// visible under `key` until [`ObjectWriter::finish`] returns, and an existing object is
    /// replaced then. On S3 this is a multipart upload with several parts in flight. The stored
    /// object carries its CRC-32 (S3: `walagent-crc32` metadata and a FULL_OBJECT checksum; local:
    /// a `.<name>.sfv` sidecar), which every read checks.
    async fn create_writer(&self, key: &str) -> Result<Box<dyn ObjectWriter>, StoreError>;

    /// Opens `key` for reading in pieces; `None` when absent. Objects stored with a whole-object
    /// CRC-32 are checked at the end of the stream (the last `next_chunk` fails on a mismatch).
    async fn open_reader(&self, key: &str) -> Result<Option<Box<dyn ObjectReader>>, StoreError>;
}

/// A large object being written; see [`Store::create_writer`]. Dropping it without `finish`
/// leaves nothing under the key (an S3 upload is aborted by `abort`, or expires by lifecycle
/// rule when the process died).
#[async_trait]
pub trait ObjectWriter: Send {
    /// Appends `data`. May wait while earlier pieces are being uploaded (back-pressure).
    async fn write(&mut self, data: Bytes) -> Result<(), StoreError>;
    /// Makes the object durable and visible under its key; returns its size in bytes.
    async fn finish(self: Box<Self>) -> Result<u64, StoreError>;
    /// Discards what was written (best effort).
    async fn abort(self: Box<Self>);
}

/// A stored object read in pieces; see [`Store::open_reader`].
#[async_trait]
pub trait ObjectReader: Send {
    /// The next piece, or `None` at the end (after the end-of-object checks passed).
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, StoreError>;
}

/// Reads a WAL object whole and decompresses it (`.zst` keys) on a blocking thread; `None` when
/// absent. A zstd frame that does not decode is [`StoreError::Corrupt`].
pub async fn read_wal_object(store: &dyn Store, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
    let Some(stored) = store.get_bytes(key).await? else {
        return Ok(None);
    };
    let compressed = key.ends_with(layout::ZSTD_SUFFIX);
    let key_owned = key.to_string();
    let stored_len = stored.len();
    let content = tokio::task::spawn_blocking(move || {
        let mut out = Vec::with_capacity(stored_len.max(1 << 20));
        compress::decompress_stream(&stored[..], &mut out, compressed).map(|_| out)
    })
    .await
    .map_err(|e| StoreError::io(format!("reading {key_owned}"), std::io::Error::other(e)))?
    .map_err(|e| StoreError::Corrupt {
        key: key.to_string(),
        detail: e.to_string(),
    })?;
    Ok(Some(content))
}

/// After a no-overwrite put of a WAL object failed with [`StoreError::Conflict`]: whether the
/// stored object holds the same WAL once decompressed. Two writers may encode identical WAL
/// differently (another zstd level, `walagent backup` beside `walagent stream`); only different
/// content is a real conflict. Streamed: the object is read, decompressed (`.zst` keys) and
/// compared with `raw` (bytes or a file, read as it goes) in pieces on a blocking thread, so
/// neither the stored object nor its WAL is held whole. An absent object, different content or
/// another length is `false`; a zstd stream that does not decode is [`StoreError::Corrupt`]
/// (wherever the damage is, also after a difference); the store's own failures pass through.
pub async fn same_wal_content(
    store: &dyn Store,
    key: &str,
    raw: segment::Raw<'_>,
) -> Result<bool, StoreError> {
    segment::same_wal_as(store, key, raw).await
}

/// Is this `--archive` value an object-store URL rather than a directory?
pub fn is_remote(spec: &str) -> bool {
    spec.get(..5)
        .is_some_and(|p| p.eq_ignore_ascii_case("s3://"))
}

/// Why [`open`] could not open the archive named by `--archive`.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// An `s3://` URL that does not parse.
    #[error("{0}")]
    Location(#[from] s3::S3LocationError),
    /// The S3 settings are wrong, or the bucket could not be reached or listed.
    #[error("{0}")]
    S3(#[source] StoreError),
    /// The local directory could not be created or opened (the cause names the path).
    #[error("cannot open archive: {source}")]
    Local {
        spec: String,
        #[source]
        source: StoreError,
    },
}

impl OpenError {
    /// The fix, where the cause does not already name it. The store's generic I/O hint (free
    /// space in the archive and spool) does not fit a failed open, so it is not passed on.
    pub fn hint(&self) -> Option<String> {
        match self {
            OpenError::Location(_) => None,
            OpenError::Local {
                source: StoreError::Io { source, .. },
                ..
            } if source.kind() == std::io::ErrorKind::NotFound => Some(
                "--archive must name an existing archive directory (walagent stream, backup and \
                 wal-push create one)"
                    .into(),
            ),
            OpenError::S3(e) | OpenError::Local { source: e, .. } => match e {
                StoreError::Io { .. } => None,
                e => e.hint(),
            },
        }
    }
}

/// Opens the archive named on the command line: `s3://BUCKET/PREFIX` (settings from the AWS
/// environment; the bucket is checked) or a local directory. A writer's directory is created when
/// missing; a reader's must exist and is left untouched.
pub async fn open(spec: &str, write: bool) -> Result<std::sync::Arc<dyn Store>, OpenError> {
    if is_remote(spec) {
        let location: s3::S3Location = spec.parse()?;
        let store = s3::S3Store::open(location, s3::S3Options::default())
            .await
            .map_err(OpenError::S3)?;
        store.check().await.map_err(OpenError::S3)?;
        Ok(std::sync::Arc::new(store))
    } else {
        let path = Path::new(spec);
        let store = if write {
            LocalStore::open(path)
        } else {
            LocalStore::open_existing(path)
        };
        store
            .map(|s| std::sync::Arc::new(s) as std::sync::Arc<dyn Store>)
            .map_err(|source| OpenError::Local {
                spec: spec.to_string(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn open_keeps_the_cause() {
        let e = open("s3://", false).await.err().unwrap();
        assert!(matches!(e, OpenError::Location(_)), "{e:?}");
        assert!(e.to_string().contains("s3://BUCKET"), "{e}");
        assert_eq!(e.hint(), None);

        let dir = std::env::temp_dir().join(format!("walagent-open-{}", std::process::id()));
        let missing = dir.join("missing");
        let spec = missing.to_str().unwrap();
        let e = open(spec, false).await.err().unwrap();
        let OpenError::Local { source, .. } = &e else {
            panic!("{e:?}")
        };
        assert!(matches!(source, StoreError::Io { .. }), "{source:?}");
        let io = std::error::Error::source(&e)
            .and_then(std::error::Error::source)
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .unwrap();
        assert_eq!(io.kind(), std::io::ErrorKind::NotFound);
        assert_eq!(
            e.to_string(),
            format!("cannot open archive: {spec} (check --archive): No such file or directory (os error 2)"),
        );
        assert!(e.hint().unwrap().contains("existing archive directory"));
        // A reader leaves a missing directory missing; a writer creates it.
        assert!(!missing.exists());
        let store = open(spec, true).await.unwrap();
        assert!(missing.is_dir() && store.local_root().is_some());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The streamed comparison after a conflict, for each encoding and for the new WAL in memory
    /// and in a file: the same WAL (another zstd level, several frames) is the same; different
    /// bytes, a longer or shorter object, or nothing stored are not; a `.zst` that does not
    /// decode is `Corrupt` (as when it was read whole), also truncated and also when its
    /// decodable start already differs. 3 MiB crosses the pieces of every stage.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn same_wal_content_streams() {
        use segment::Raw;
        let dir = std::env::temp_dir().join(format!("walagent-samewal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = LocalStore::open(&dir.join("archive")).unwrap();
        let wal: Vec<u8> = (0..3u32 << 20)
            .map(|i| (i % 251) as u8 ^ (i >> 13) as u8)
            .collect();
        let file = dir.join("new-wal");
        std::fs::write(&file, &wal).unwrap();
        let name = "000000010000000000000007";
        let zst_key = format!("wal/{name}.zst");
        let raw_key = format!("wal/{name}");
        async fn same(store: &LocalStore, key: &str, new: &[u8], file: &Path) -> Option<bool> {
            let a = same_wal_content(store, key, Raw::Bytes(Bytes::copy_from_slice(new))).await;
            std::fs::write(file, new).unwrap();
            let b = same_wal_content(store, key, Raw::File(file)).await;
            // The new WAL as the writer's own zstd body, in two frames.
            let half = new.len() / 2;
            let body = [
                compress::compress_bulk(&new[..half], 2).unwrap(),
                compress::compress_bulk(&new[half..], 2).unwrap(),
            ]
            .concat();
            let c = same_wal_content(store, key, Raw::Zstd(Bytes::from(body))).await;
            match (a, b, c) {
                (Ok(a), Ok(b), Ok(c)) => {
                    assert_eq!((a, a), (b, c), "{key}: bytes, file and zstd body disagree");
                    Some(a)
                }
                (
                    Err(StoreError::Corrupt { key: k1, .. }),
                    Err(StoreError::Corrupt { key: k2, .. }),
                    Err(StoreError::Corrupt { key: k3, .. }),
                ) if [&k1, &k2, &k3].iter().all(|k| *k == key) => None,
                other => panic!("{key}: {other:?}"),
            }
        }
        // Nothing stored.
        assert_eq!(same(&store, &zst_key, &wal, &file).await, Some(false));
        assert_eq!(same(&store, &raw_key, &wal, &file).await, Some(false));
        let mut other = wal.clone();
        other[(2 << 20) + 9] ^= 0x40;
        let longer = [&wal[..], b"x"].concat();
        let shorter = wal[..wal.len() - 1].to_vec();
        let two_frames = [
            compress::compress_bulk(&wal[..1 << 20], 3).unwrap(),
            compress::compress_bulk(&wal[1 << 20..], 3).unwrap(),
        ]
        .concat();
        for (key, body) in [
            (&zst_key, compress::compress_bulk(&wal, 1).unwrap()),
            (&zst_key, compress::compress_bulk(&wal, 19).unwrap()),
            (&zst_key, two_frames),
            (&raw_key, wal.clone()),
        ] {
            store
                .put_bytes(key, Bytes::from(body), PutMode::Replace)
                .await
                .unwrap();
            assert_eq!(same(&store, key, &wal, &file).await, Some(true), "{key}");
            for (tag, new) in [
                ("different", &other),
                ("longer", &longer),
                ("shorter", &shorter),
            ] {
                assert_eq!(
                    same(&store, key, new, &file).await,
                    Some(false),
                    "{key} {tag}"
                );
            }
            assert_eq!(
                same(&store, key, b"", &file).await,
                Some(false),
                "{key} empty"
            );
            store.delete(key).await.unwrap();
        }
        // Stored objects that are not the new WAL's encoding: shorter or longer WAL, and
        // `.zst` objects that do not decode.
        let z = compress::compress_bulk(&wal, 1).unwrap();
        let mut flipped = z.clone();
        let at = flipped.len() - 100;
        flipped[at] ^= 0xff;
        for (body, expect) in [
            (compress::compress_bulk(&shorter, 1).unwrap(), Some(false)),
            (compress::compress_bulk(&longer, 1).unwrap(), Some(false)),
            (z[..z.len() / 2].to_vec(), None),
            (z[..z.len() - 1].to_vec(), None),
            (flipped, None),
            (b"not zstd at all".to_vec(), None),
            (Vec::new(), None),
        ] {
            store
                .put_bytes(&zst_key, Bytes::from(body), PutMode::Replace)
                .await
                .unwrap();
            assert_eq!(same(&store, &zst_key, &wal, &file).await, expect);
            // Damage is found even when the start already differs.
            if expect.is_none() {
                assert_eq!(same(&store, &zst_key, &other[..7], &file).await, None);
            }
        }
        // A raw object is compared byte for byte: any bytes are just "not the same".
        store
            .put_bytes(
                &raw_key,
                Bytes::from_static(b"not zstd at all"),
                PutMode::Replace,
            )
            .await
            .unwrap();
        assert_eq!(same(&store, &raw_key, &wal, &file).await, Some(false));
        // A new zstd body that does not decode is an error of its own, never blamed on the
        // archived object (which is fine here) and never "the same".
        store
            .put_bytes(&zst_key, Bytes::from(z.clone()), PutMode::Replace)
            .await
            .unwrap();
        assert_eq!(same(&store, &zst_key, &wal, &file).await, Some(true));
        for bad in [z[..z.len() / 2].to_vec(), b"not zstd".to_vec()] {
            let e = same_wal_content(&store, &zst_key, Raw::Zstd(Bytes::from(bad)))
                .await
                .unwrap_err();
            assert!(matches!(e, StoreError::Io { .. }), "{e:?}");
            assert!(e.to_string().contains("does not decompress"), "{e}");
        }
        // A new WAL file that cannot be read is an error, not "the same".
        let e = same_wal_content(&store, &raw_key, segment::Raw::File(&dir.join("missing")))
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::Io { .. }), "{e:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
