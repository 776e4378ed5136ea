//! `S3Store` against a real S3 server (s3s-fs 0.14.1, see tests/support/s3.rs): round trips,
//! listing, no-overwrite semantics, multipart, corruption detection, error mapping, outages and
//! both checksum policies. Every test starts its own server; the client gets explicit settings,
//! so nothing here reads or changes the process environment.

mod support;

use std::fs;
use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use support::s3::{S3Server, SECRET_KEY};
use walagent::archive::s3::{ChecksumPolicy, S3Location, S3Options, S3Settings, S3Store};
use walagent::archive::{ObjectInfo, PutMode, Store, StoreError};

const MIB: usize = 1024 * 1024;

async fn open(s: &S3Server, prefix: &str) -> S3Store {
    open_with(s, prefix, S3Options::default(), s.settings()).await
}

async fn open_with(s: &S3Server, prefix: &str, opts: S3Options, settings: S3Settings) -> S3Store {
    S3Store::open_with(s.location(prefix), opts, settings)
        .await
        .unwrap()
}

/// Deterministic, incompressible-looking bytes.
fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn keys(mut v: Vec<ObjectInfo>) -> Vec<String> {
    v.sort_by(|a, b| a.key.cmp(&b.key));
    v.into_iter().map(|o| o.key).collect()
}

fn flip_byte(path: &Path, at: usize) {
    let mut b = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    b[at] ^= 0x40;
    fs::write(path, b).unwrap();
}

fn truncate(path: &Path, len: u64) {
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

const SEG: &str = "wal/000000010000000000000003.zst";

#[tokio::test]
async fn put_get_round_trip_is_byte_identical() {
    let s = S3Server::start();
    let store = open(&s, "cluster-a/").await;
    assert_eq!(store.location(), "s3://wal/cluster-a");
    store.check().await.unwrap();

    let t = support::tempdir();
    let src = t.join("seg");
    let bytes = data(3 * MIB + 123, 1);
    fs::write(&src, &bytes).unwrap();
    store
        .put_file(SEG, &src, PutMode::NoOverwrite)
        .await
        .unwrap();
    assert!(src.exists(), "the store copies; the caller removes src");

    // Stored as a plain file under the prefix.
    assert!(fs::read(s.object_path(&format!("cluster-a/{SEG}"))).unwrap() == bytes);

    let dest = t.join("restored");
    assert!(store.get_to_file(SEG, &dest).await.unwrap());
    assert!(fs::read(&dest).unwrap() == bytes);
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&dest).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    assert!(store.get_bytes(SEG).await.unwrap().unwrap() == bytes);

    // Small objects from memory; empty objects too.
    store
        .put_bytes(
            "walagent.json",
            Bytes::from_static(b"{\"format\":1}"),
            PutMode::Replace,
        )
        .await
        .unwrap();
    assert_eq!(
        store.get_bytes("walagent.json").await.unwrap().unwrap(),
        &b"{\"format\":1}"[..]
    );
    store
        .put_bytes("empty", Bytes::new(), PutMode::NoOverwrite)
        .await
        .unwrap();
    assert_eq!(store.get_bytes("empty").await.unwrap().unwrap().len(), 0);

    // Absent keys: None / false, and no file is created.
    assert_eq!(
        store
            .get_bytes("wal/000000010000000000000004.zst")
            .await
            .unwrap(),
        None
    );
    let none = t.join("none");
    assert!(!store
        .get_to_file("wal/000000010000000000000004.zst", &none)
        .await
        .unwrap());
    assert!(!none.exists());

    // Bad keys never reach the server.
    for k in ["", "/abs", "../x", "wal//x", "wal/.hidden", "a\\b"] {
        let e = store
            .put_bytes(k, Bytes::new(), PutMode::Replace)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("invalid archive key"), "{k}: {e}");
    }
}

#[tokio::test]
async fn list_with_prefix_and_delete() {
    let s = S3Server::start();
    let store = open(&s, "a").await;
    let other = open(&s, "ab").await; // shares the "a" string prefix but not the folder
    let root = open(&s, "").await;
    for k in [
        "wal/000000010000000000000001.zst",
        "wal/000000010000000000000002.zst",
        "wal/00000002.history",
        "walagent.json",
        "base/b1/data",
    ] {
        store
            .put_bytes(k, Bytes::from(k.as_bytes().to_vec()), PutMode::NoOverwrite)
            .await
            .unwrap();
    }
    other
        .put_bytes(
            "wal/000000010000000000000009.zst",
            Bytes::from_static(b"x"),
            PutMode::NoOverwrite,
        )
        .await
        .unwrap();

    let wal = store.list("wal/").await.unwrap();
    assert_eq!(
        keys(wal.clone()),
        vec![
            "wal/000000010000000000000001.zst",
            "wal/000000010000000000000002.zst",
            "wal/00000002.history"
        ]
    );
    assert!(wal.iter().all(|o| o.size == o.key.len() as u64), "{wal:?}");
    assert_eq!(
        keys(store.list("wal/000000010000000000000002").await.unwrap()),
        vec!["wal/000000010000000000000002.zst"]
    );
    assert_eq!(
        keys(store.list("base/").await.unwrap()),
        vec!["base/b1/data"]
    );
    assert_eq!(
        keys(store.list("walagent").await.unwrap()),
        vec!["walagent.json"]
    );
    assert_eq!(store.list("").await.unwrap().len(), 5);
    assert!(store.list("nothing/here/").await.unwrap().is_empty());
    assert_eq!(
        keys(other.list("").await.unwrap()),
        vec!["wal/000000010000000000000009.zst"]
    );
    assert_eq!(root.list("").await.unwrap().len(), 6);
    assert_eq!(
        keys(root.list("ab/").await.unwrap()),
        vec!["ab/wal/000000010000000000000009.zst"]
    );

    store.delete("wal/00000002.history").await.unwrap();
    store.delete("wal/00000002.history").await.unwrap(); // absent is fine
    assert_eq!(store.list("wal/").await.unwrap().len(), 2);
    assert_eq!(store.get_bytes("wal/00000002.history").await.unwrap(), None);
}

#[tokio::test]
async fn list_paginates() {
    // More keys than one ListObjectsV2 page (1000). Written straight into the server's directory
    // (s3s-fs serves plain files), which is much faster than 1100 PUTs.
    let s = S3Server::start();
    let dir = s.object_path("p/wal");
    fs::create_dir_all(&dir).unwrap();
    for i in 0..1100u32 {
        fs::write(dir.join(format!("{i:08X}")), i.to_be_bytes()).unwrap();
    }
    let store = open(&s, "p").await;
    let all = store.list("wal/").await.unwrap();
    assert_eq!(all.len(), 1100);
    let mut k = keys(all);
    k.dedup();
    assert_eq!(k.len(), 1100);
    assert_eq!(k[0], "wal/00000000");
    assert_eq!(k[1099], "wal/0000044B");
}

#[tokio::test]
async fn no_overwrite_identical_ok_different_conflict() {
    let s = S3Server::start();
    let store = open(&s, "").await;
    let t = support::tempdir();
    let key = "wal/000000010000000000000003";
    let src = t.join("seg");
    let orig = data(100_000, 2);
    fs::write(&src, &orig).unwrap();
    store
        .put_file(key, &src, PutMode::NoOverwrite)
        .await
        .unwrap();

    // Identical re-put (e.g. after a crash between upload and spool cleanup): Ok.
    store
        .put_file(key, &src, PutMode::NoOverwrite)
        .await
        .unwrap();
    store
        .put_bytes(key, Bytes::from(orig.clone()), PutMode::NoOverwrite)
        .await
        .unwrap();

    // Different content, same size and different size: Conflict; the object is untouched.
    let mut other = orig.clone();
    other[99_999] ^= 1;
    fs::write(&src, &other).unwrap();
    let e = store
        .put_file(key, &src, PutMode::NoOverwrite)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, StoreError::Conflict { key: k } if k == key),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains("already exists with different content"),
        "{e}"
    );
    let e = store
        .put_bytes(key, Bytes::from_static(b"short"), PutMode::NoOverwrite)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Conflict { .. }), "{e}");
    assert!(store.get_bytes(key).await.unwrap().unwrap() == orig);

    // Replace overwrites.
    store
        .put_bytes(key, Bytes::from_static(b"partial v2"), PutMode::Replace)
        .await
        .unwrap();
    assert_eq!(
        store.get_bytes(key).await.unwrap().unwrap(),
        &b"partial v2"[..]
    );
    fs::write(&src, b"partial v3").unwrap();
    store.put_file(key, &src, PutMode::Replace).await.unwrap();
    assert_eq!(fs::read(s.object_path(key)).unwrap(), b"partial v3");
}

#[tokio::test]
async fn objects_written_by_other_tools() {
    // No walagent-crc32 metadata: reads are accepted unverified, and a no-overwrite put compares
    // the content itself.
    let s = S3Server::start();
    let store = open(&s, "").await;
    let key = "wal/00000002.history";
    fs::create_dir_all(s.object_path("wal")).unwrap();
    fs::write(s.object_path(key), b"1\t0/3000000\tno recovery target\n").unwrap();
    assert_eq!(
        store.get_bytes(key).await.unwrap().unwrap(),
        &b"1\t0/3000000\tno recovery target\n"[..]
    );
    store
        .put_bytes(
            key,
            Bytes::from_static(b"1\t0/3000000\tno recovery target\n"),
            PutMode::NoOverwrite,
        )
        .await
        .unwrap();
    let e = store
        .put_bytes(
            key,
            Bytes::from_static(b"1\t0/3000000\tno recovery targeT\n"),
            PutMode::NoOverwrite,
        )
        .await;
    assert!(matches!(e, Err(StoreError::Conflict { .. })), "{e:?}");
}

#[tokio::test]
async fn multipart_round_trip() {
    let s = S3Server::start();
    let opts = S3Options {
        multipart_threshold: 5 * MIB as u64,
        part_size: 5 * MIB as u64,
        ..Default::default()
    };
    let store = open_with(&s, "mp", opts, s.settings()).await;
    let t = support::tempdir();
    let src = t.join("big");
    let bytes = data(12 * MIB + 7, 3);
    fs::write(&src, &bytes).unwrap();
    let key = "base/000000010000000000000005/base.tar.zst";
    store
        .put_file(key, &src, PutMode::NoOverwrite)
        .await
        .unwrap();
    assert!(fs::read(s.object_path(&format!("mp/{key}"))).unwrap() == bytes);
    let dest = t.join("back");
    assert!(store.get_to_file(key, &dest).await.unwrap());
    assert!(fs::read(&dest).unwrap() == bytes);
    let listed = store.list("base/").await.unwrap();
    assert_eq!(
        listed
            .iter()
            .map(|o| (o.key.as_str(), o.size))
            .collect::<Vec<_>>(),
        vec![(key, bytes.len() as u64)]
    );
    assert!(listed[0].etag.is_some(), "S3 listings carry the ETag");

    // Identical again: Ok without uploading; different: Conflict.
    store
        .put_file(key, &src, PutMode::NoOverwrite)
        .await
        .unwrap();
    let mut other = bytes.clone();
    other[6 * MIB] ^= 1;
    fs::write(&src, &other).unwrap();
    let e = store
        .put_file(key, &src, PutMode::NoOverwrite)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Conflict { .. }), "{e}");
    // Replace goes through.
    store.put_file(key, &src, PutMode::Replace).await.unwrap();
    assert!(store.get_bytes(key).await.unwrap().unwrap() == other);

    // No upload parts left behind on the server.
    let leftovers: Vec<String> = fs::read_dir(s.data_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("upload_id") || n.contains(".upload-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

async fn corruption_is_detected(policy: ChecksumPolicy) {
    let s = S3Server::start();
    let store = open_with(&s, "c", S3Options::default(), s.settings().checksum(policy)).await;
    let t = support::tempdir();
    let bytes = data(2 * MIB, 4);
    let src = t.join("seg");
    fs::write(&src, &bytes).unwrap();
    store
        .put_file(SEG, &src, PutMode::NoOverwrite)
        .await
        .unwrap();
    let obj = s.object_path(&format!("c/{SEG}"));

    // A flipped byte (bit rot on the server's disk).
    flip_byte(&obj, MIB + 17);
    let e = store.get_bytes(SEG).await.unwrap_err();
    eprintln!("{policy}, flipped byte: {e}");
    assert!(
        matches!(&e, StoreError::Corrupt { key, .. } if key == SEG),
        "{policy}: {e}"
    );
    let dest = t.join("dest");
    let e = store.get_to_file(SEG, &dest).await.unwrap_err();
    assert!(matches!(e, StoreError::Corrupt { .. }), "{policy}: {e}");
    assert!(
        !dest.exists(),
        "{policy}: unverified bytes are not left behind"
    );
    let msg = e.to_string();
    assert!(msg.contains("is corrupt") && msg.contains(SEG), "{msg}");

    // A truncated object.
    store.put_file(SEG, &src, PutMode::Replace).await.unwrap();
    assert!(store.get_bytes(SEG).await.unwrap().unwrap() == bytes);
    truncate(&obj, MIB as u64);
    let e = store.get_bytes(SEG).await.unwrap_err();
    eprintln!("{policy}, truncated: {e}");
    assert!(matches!(e, StoreError::Corrupt { .. }), "{policy}: {e}");
    assert!(matches!(
        store.get_to_file(SEG, &dest).await,
        Err(StoreError::Corrupt { .. })
    ));

    // A corrupt object is a conflict for an identical no-overwrite put, never silently "same".
    let e = store
        .put_file(SEG, &src, PutMode::NoOverwrite)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Conflict { .. }), "{policy}: {e}");
}

#[tokio::test]
async fn corruption_is_detected_when_supported() {
    corruption_is_detected(ChecksumPolicy::WhenSupported).await;
}

#[tokio::test]
async fn corruption_is_detected_when_required() {
    corruption_is_detected(ChecksumPolicy::WhenRequired).await;
}

#[tokio::test]
async fn checksum_policies_round_trip() {
    let s = S3Server::start();
    let t = support::tempdir();
    for (i, policy) in [ChecksumPolicy::WhenSupported, ChecksumPolicy::WhenRequired]
        .into_iter()
        .enumerate()
    {
        for (req, resp) in [(policy, policy), (policy, other_policy(policy))] {
            let settings = S3Settings {
                request_checksum: Some(req),
                response_checksum: Some(resp),
                ..s.settings()
            };
            let opts = S3Options {
                multipart_threshold: 5 * MIB as u64,
                part_size: 5 * MIB as u64,
                ..Default::default()
            };
            let store = open_with(&s, &format!("{req}-{resp}"), opts, settings).await;
            for (n, len) in [(0usize, 1000usize), (1, 11 * MIB)] {
                let bytes = data(len, (i * 10 + n) as u64);
                let src = t.join(format!("src-{req}-{resp}-{n}"));
                fs::write(&src, &bytes).unwrap();
                let key = format!("wal/{n}");
                store
                    .put_file(&key, &src, PutMode::NoOverwrite)
                    .await
                    .unwrap_or_else(|e| panic!("{req}/{resp}: {e}"));
                store
                    .put_file(&key, &src, PutMode::NoOverwrite)
                    .await
                    .unwrap();
                let dest = t.join(format!("dest-{req}-{resp}-{n}"));
                assert!(store.get_to_file(&key, &dest).await.unwrap());
                assert!(fs::read(&dest).unwrap() == bytes, "{req}/{resp} {len}");
            }
        }
    }
}

fn other_policy(p: ChecksumPolicy) -> ChecksumPolicy {
    match p {
        ChecksumPolicy::WhenSupported => ChecksumPolicy::WhenRequired,
        ChecksumPolicy::WhenRequired => ChecksumPolicy::WhenSupported,
    }
}

#[tokio::test]
async fn wrong_credentials_are_access_denied() {
    let s = S3Server::start();
    let wrong = "definitely-not-the-secret-0123456789";
    let settings = S3Settings {
        secret_key: Some(wrong.into()),
        ..s.settings()
    };
    let store = open_with(&s, "x", S3Options::default(), settings).await;
    let t0 = Instant::now();
    let e = store.check().await.unwrap_err();
    eprintln!("wrong secret: {e}");
    assert!(matches!(e, StoreError::AccessDenied { .. }), "{e}");
    assert!(!e.is_transient());
    let msg = e.to_string();
    assert!(
        msg.contains("AWS_SECRET_ACCESS_KEY") && msg.contains("SignatureDoesNotMatch"),
        "{msg}"
    );
    assert!(
        !msg.contains(wrong) && !msg.contains(SECRET_KEY),
        "a secret leaked into: {msg}"
    );
    assert!(!msg.contains('\n'), "one line: {msg}");
    let e = store
        .put_bytes("walagent.json", Bytes::from_static(b"{}"), PutMode::Replace)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::AccessDenied { .. }), "{e}");
    assert!(
        e.to_string().contains("PutObject s3://wal/x/walagent.json"),
        "{e}"
    );
    let e = store.get_bytes("walagent.json").await.unwrap_err();
    assert!(matches!(e, StoreError::AccessDenied { .. }), "{e}");
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "403 is not retried: {:?}",
        t0.elapsed()
    );

    // An unknown access key.
    let settings = S3Settings {
        access_key: Some("no-such-key".into()),
        ..s.settings()
    };
    let store = open_with(&s, "x", S3Options::default(), settings).await;
    let e = store.check().await.unwrap_err();
    assert!(matches!(e, StoreError::AccessDenied { .. }), "{e}");
}

#[tokio::test]
async fn missing_bucket() {
    let s = S3Server::start();
    let loc: S3Location = "s3://no-such-bucket/p".parse().unwrap();
    let store = S3Store::open_with(loc, S3Options::default(), s.settings())
        .await
        .unwrap();
    let e = store.check().await.unwrap_err();
    eprintln!("missing bucket: {e}");
    assert!(
        matches!(&e, StoreError::NoSuchBucket { bucket, .. } if bucket == "no-such-bucket"),
        "{e}"
    );
    assert!(e.to_string().contains(&s.endpoint()), "{e}");
    assert!(
        e.to_string().contains("create it or fix the s3:// URL"),
        "{e}"
    );
    let e = store.list("wal/").await.unwrap_err();
    assert!(matches!(e, StoreError::NoSuchBucket { .. }), "{e}");
    // A no-overwrite put HEADs first only on servers without conditional writes, and s3s-fs
    // answers GetObject/PutObject on a missing bucket like a missing key / by creating the
    // bucket directory (AWS answers NoSuchBucket): so check() is what catches this at startup.
    assert!(!s.data_dir().join("no-such-bucket").exists());
}

#[tokio::test]
async fn stopped_server_is_unavailable_then_recovers() {
    let s = S3Server::start();
    let store = open(&s, "o").await;
    store
        .put_bytes("walagent.json", Bytes::from_static(b"{}"), PutMode::Replace)
        .await
        .unwrap();
    s.stop();

    let t0 = Instant::now();
    let e = store
        .put_bytes(
            "wal/00000002.history",
            Bytes::from_static(b"h"),
            PutMode::NoOverwrite,
        )
        .await
        .unwrap_err();
    let took = t0.elapsed();
    eprintln!("stopped server, after {took:?}: {e}");
    assert!(matches!(e, StoreError::Unavailable { .. }), "{e}");
    assert!(e.is_transient());
    assert!(took < Duration::from_secs(30), "took {took:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("PutObject s3://wal/o/wal/00000002.history") && msg.contains(&s.endpoint()),
        "{msg}"
    );
    for r in [
        store.check().await.map(|_| ()),
        store.get_bytes("walagent.json").await.map(|_| ()),
        store.list("").await.map(|_| ()),
        store.delete("walagent.json").await,
    ] {
        assert!(matches!(r, Err(StoreError::Unavailable { .. })), "{r:?}");
    }
    assert!(
        t0.elapsed() < Duration::from_secs(60),
        "took {:?}",
        t0.elapsed()
    );

    s.start_again();
    store
        .put_bytes(
            "wal/00000002.history",
            Bytes::from_static(b"h"),
            PutMode::NoOverwrite,
        )
        .await
        .unwrap();
    assert_eq!(
        store.get_bytes("walagent.json").await.unwrap().unwrap(),
        &b"{}"[..]
    );
}

#[tokio::test]
async fn hung_server_times_out_as_unavailable() {
    // Accepts connections but never answers: the per-attempt timeout has to fire.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let settings = S3Settings {
        endpoint: Some(endpoint),
        region: Some("us-east-1".into()),
        access_key: Some("k".into()),
        secret_key: Some("s".into()),
        force_path_style: Some(true),
        ..Default::default()
    };
    let opts = S3Options {
        io_timeout: Duration::from_secs(2),
        max_attempts: 2,
        ..Default::default()
    };
    let store = S3Store::open_with("s3://wal/x".parse().unwrap(), opts, settings)
        .await
        .unwrap();
    let t0 = Instant::now();
    let e = store.get_bytes("walagent.json").await.unwrap_err();
    eprintln!("hung server, after {:?}: {e}", t0.elapsed());
    assert!(matches!(e, StoreError::Unavailable { .. }), "{e}");
    assert!(
        t0.elapsed() < Duration::from_secs(15),
        "took {:?}",
        t0.elapsed()
    );
    let e = store
        .put_bytes("walagent.json", Bytes::from_static(b"{}"), PutMode::Replace)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Unavailable { .. }), "{e}");
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "took {:?}",
        t0.elapsed()
    );
    drop(listener);
}

#[tokio::test]
async fn bad_settings_are_rejected() {
    let loc: S3Location = "s3://wal".parse().unwrap();
    let e = S3Store::open_with(
        loc.clone(),
        S3Options::default(),
        S3Settings {
            endpoint: Some("127.0.0.1:9000".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("AWS_ENDPOINT_URL"), "{e}");
    let e = S3Store::open_with(
        loc.clone(),
        S3Options::default(),
        S3Settings {
            access_key: Some("a".into()),
            region: Some("us-east-1".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("AWS_SECRET_ACCESS_KEY"), "{e}");
    let e = S3Store::open_with(
        loc,
        S3Options {
            part_size: 1024,
            ..Default::default()
        },
        S3Settings::default(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("part size"), "{e}");
}

async fn read_all(store: &dyn Store, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
    let Some(mut r) = store.open_reader(key).await? else {
        return Ok(None);
    };
    let mut out = Vec::new();
    while let Some(c) = r.next_chunk().await? {
        out.extend_from_slice(&c);
    }
    Ok(Some(out))
}

/// Streamed objects (base backups): one PutObject when small, a multipart upload with parts in
/// flight when not, nothing visible before finish, nothing left after abort.
#[tokio::test]
async fn streamed_writes_single_and_multipart() {
    let s = S3Server::start();
    let opts = S3Options {
        part_size: 5 * MIB as u64,
        ..S3Options::default()
    };
    let store = open_with(&s, "p", opts, s.settings()).await;

    // Small: single PUT, whole-object CRC recorded.
    let small = data(100_000, 7);
    let mut w = store.create_writer("backups/a/base.tar.zst").await.unwrap();
    for c in small.chunks(30_000) {
        w.write(Bytes::copy_from_slice(c)).await.unwrap();
    }
    assert_eq!(w.finish().await.unwrap(), small.len() as u64);
    assert_eq!(
        read_all(&store, "backups/a/base.tar.zst").await.unwrap(),
        Some(small)
    );

    // Large: 23 MiB + 5 in odd-sized writes -> 5 parts, several in flight.
    let big = data(23 * MIB + 5, 8);
    let mut w = store
        .create_writer("backups/a/16385.tar.zst")
        .await
        .unwrap();
    for c in big.chunks(777_777) {
        w.write(Bytes::copy_from_slice(c)).await.unwrap();
    }
    assert_eq!(
        read_all(&store, "backups/a/16385.tar.zst").await.unwrap(),
        None,
        "not visible before finish"
    );
    assert_eq!(w.finish().await.unwrap(), big.len() as u64);
    let back = read_all(&store, "backups/a/16385.tar.zst")
        .await
        .unwrap()
        .unwrap();
    assert!(back == big, "multipart object differs");

    // Aborted: nothing under the key.
    let mut w = store.create_writer("backups/b/base.tar.zst").await.unwrap();
    w.write(Bytes::from(data(12 * MIB, 9))).await.unwrap();
    w.abort().await;
    assert_eq!(
        read_all(&store, "backups/b/base.tar.zst").await.unwrap(),
        None
    );
    assert_eq!(read_all(&store, "backups/zzz").await.unwrap(), None);
}

/// A client built the way any SDK user builds one (default checksum settings: it validates
/// response checksums when the server returns them).
fn standard_client(s: &S3Server) -> aws_sdk_s3::Client {
    use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let conf = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .http_client(http)
        .region(Region::new(support::s3::REGION))
        .endpoint_url(s.endpoint())
        .force_path_style(true)
        .credentials_provider(Credentials::new(
            support::s3::ACCESS_KEY,
            SECRET_KEY,
            None,
            None,
            "test",
        ))
        .build();
    aws_sdk_s3::Client::from_conf(conf)
}

/// What a standard client sees of an object: (walagent-crc32 metadata, x-amz-checksum-crc32,
/// Content-Type), with checksum mode enabled; and the body a checked GetObject returns.
async fn standard_view(
    c: &aws_sdk_s3::Client,
    object_key: &str,
) -> (Option<String>, Option<String>, Option<String>, Vec<u8>) {
    use aws_sdk_s3::types::ChecksumMode;
    let h = c
        .head_object()
        .bucket(support::s3::BUCKET)
        .key(object_key)
        .checksum_mode(ChecksumMode::Enabled)
        .send()
        .await
        .unwrap();
    let meta = h
        .metadata()
        .and_then(|m| m.get(walagent::archive::s3::META_CRC32).cloned());
    let g = c
        .get_object()
        .bucket(support::s3::BUCKET)
        .key(object_key)
        .checksum_mode(ChecksumMode::Enabled)
        .send()
        .await
        .unwrap();
    let body = g.body.collect().await.unwrap().into_bytes().to_vec();
    (
        meta,
        h.checksum_crc32().map(str::to_string),
        h.content_type().map(str::to_string),
        body,
    )
}

/// The aws CLI, when installed: `head-object --checksum-mode ENABLED` as JSON.
fn aws_cli_head(s: &S3Server, object_key: &str) -> Option<serde_json::Value> {
    let out = std::process::Command::new("aws")
        .args([
            "s3api",
            "head-object",
            "--bucket",
            support::s3::BUCKET,
            "--key",
            object_key,
            "--checksum-mode",
            "ENABLED",
            "--endpoint-url",
            &s.endpoint(),
            "--output",
            "json",
        ])
        .envs(s.env())
        .output();
    match out {
        Ok(o) if o.status.success() => Some(serde_json::from_slice(&o.stdout).unwrap()),
        Ok(o) => panic!(
            "aws s3api head-object failed: {}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => {
            eprintln!("aws CLI not run ({e}); the SDK check stands alone");
            None
        }
    }
}

/// Every streamed object (base backups) carries its CRC-32 where a standard client finds it:
/// `walagent-crc32` metadata (single PUT and multipart alike, in both checksum policies), the
/// server's `x-amz-checksum-crc32` for single PUTs, and a Content-Type. A flipped byte on the
/// server's disk is Corrupt on every read path, naming the key.
#[tokio::test]
async fn streamed_objects_carry_a_checksum_standard_clients_check() {
    let s = S3Server::start();
    let client = standard_client(&s);
    for policy in [ChecksumPolicy::WhenSupported, ChecksumPolicy::WhenRequired] {
        let prefix = format!("{policy}");
        let opts = S3Options {
            part_size: 5 * MIB as u64,
            ..S3Options::default()
        };
        let store = open_with(&s, &prefix, opts, s.settings().checksum(policy)).await;
        for (name, len) in [
            ("base.tar.zst", 300_000usize),
            ("16385.tar.zst", 11 * MIB + 3),
        ] {
            let key = format!("backups/20261201T000000Z/{name}");
            let bytes = data(len, len as u64);
            let mut w = store.create_writer(&key).await.unwrap();
            for c in bytes.chunks(1_000_003) {
                w.write(Bytes::copy_from_slice(c)).await.unwrap();
            }
            assert_eq!(w.finish().await.unwrap(), len as u64);
            let crc = crc32fast::hash(&bytes);
            let object_key = format!("{prefix}/{key}");

            let (meta, server_crc, ctype, body) = standard_view(&client, &object_key).await;
            assert_eq!(meta, Some(format!("{crc:08x}")), "{policy} {name}");
            assert_eq!(
                ctype.as_deref(),
                Some("application/zstd"),
                "{policy} {name}"
            );
            assert!(body == bytes, "{policy} {name}: body differs");
            let b64 = base64_crc(crc);
            if len < 5 * MIB && policy == ChecksumPolicy::WhenSupported {
                assert_eq!(server_crc.as_deref(), Some(b64.as_str()), "{policy} {name}");
            }
            // s3s-fs keeps no checksum for multipart objects (AWS S3 keeps the FULL_OBJECT one
            // sent with CompleteMultipartUpload); whatever a server returns must be that CRC.
            if let Some(v) = &server_crc {
                assert_eq!(v, &b64, "{policy} {name}");
            }
            if let Some(j) = aws_cli_head(&s, &object_key) {
                assert_eq!(
                    j["Metadata"][walagent::archive::s3::META_CRC32],
                    serde_json::json!(format!("{crc:08x}")),
                    "{j}"
                );
                assert_eq!(
                    j["ContentType"],
                    serde_json::json!("application/zstd"),
                    "{j}"
                );
            }

            // Bit rot on the server's disk.
            flip_byte(&s.object_path(&object_key), len / 2);
            let e = read_all(&store, &key).await.unwrap_err();
            eprintln!("{policy} {name}: {e}");
            assert!(
                matches!(&e, StoreError::Corrupt { key: k, .. } if *k == key),
                "{policy} {name}: {e}"
            );
            assert!(e.to_string().contains(&key), "{e}");
            let e = store.get_bytes(&key).await.unwrap_err();
            assert!(
                matches!(e, StoreError::Corrupt { .. }),
                "{policy} {name}: {e}"
            );
        }
    }
    // Nothing left of the uploads.
    let leftovers: Vec<String> = fs::read_dir(s.data_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("upload_id"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

fn base64_crc(crc: u32) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(crc.to_be_bytes())
}
