//! Looking at a local archive: segment names, gaps, and the objects that hold a segment.
//!
//! A local zstd archive compresses lazily by default (deferred compression, see
//! proto-notes/durability.md): a complete segment is `wal/<name>.zst`, or raw `wal/<name>`
//! until the compactor gets to it, and for a moment (or after a crash in the middle of a
//! compaction step) both. Tests that look at the archive's files use the helpers here instead
//! of assuming one form. The same helpers work on an s3s-fs bucket directory (its objects are
//! files under their keys).

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// 24 hex digits: a WAL segment file name.
pub fn is_segment_name(n: &str) -> bool {
    n.len() == 24 && n.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Names of the complete segments in a local archive (`wal/<name>.zst` or raw), sorted; empty
/// while `wal/` does not exist yet.
pub fn archived_segments(archive: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(archive.join("wal"))
        .map(|rd| {
            rd.filter_map(|e| {
                let n = e.ok()?.file_name().into_string().ok()?;
                let base = n.strip_suffix(".zst").unwrap_or(&n).to_string();
                is_segment_name(&base).then_some(base)
            })
            .collect()
        })
        .unwrap_or_default();
    v.sort();
    // A segment being compacted is there raw and as .zst for a moment.
    v.dedup();
    v
}

/// Complete segments stored raw (`wal/<name>`, not yet compacted), sorted.
pub fn raw_segments(archive: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(archive.join("wal"))
        .map(|rd| {
            rd.filter_map(|e| {
                let n = e.ok()?.file_name().into_string().ok()?;
                is_segment_name(&n).then_some(n)
            })
            .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Complete segments stored as `wal/<name>.zst`, sorted.
pub fn zst_segments(archive: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(archive.join("wal"))
        .map(|rd| {
            rd.filter_map(|e| {
                let n = e.ok()?.file_name().into_string().ok()?;
                let base = n.strip_suffix(".zst")?;
                is_segment_name(base).then(|| base.to_string())
            })
            .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The objects that exist for complete segment `name`, in the order readers try them
/// (`wal/<name>.zst`, then raw `wal/<name>`). Two while a compaction step is under way (or was
/// interrupted): both hold the same WAL.
pub fn segment_objects(archive: &Path, name: &str) -> Vec<PathBuf> {
    let wal = archive.join("wal");
    [wal.join(format!("{name}.zst")), wal.join(name)]
        .into_iter()
        .filter(|p| p.symlink_metadata().is_ok())
        .collect()
}

/// The object a reader (wal-fetch, restore) reads for complete segment `name`: `.zst`, else
/// raw, else `.zst` again (compacted between the two looks), like the readers; `None` when the
/// archive does not have it.
pub fn try_archived_segment_path(archive: &Path, name: &str) -> Option<PathBuf> {
    let wal = archive.join("wal");
    let zst = wal.join(format!("{name}.zst"));
    let raw = wal.join(name);
    [zst.clone(), raw, zst]
        .into_iter()
        .find(|p| p.symlink_metadata().is_ok())
}

/// [`try_archived_segment_path`], panicking when the archive does not have `name`.
pub fn archived_segment_path(archive: &Path, name: &str) -> PathBuf {
    try_archived_segment_path(archive, name).unwrap_or_else(|| {
        panic!(
            "segment {name} is not in the archive {} (neither wal/{name}.zst nor wal/{name})",
            archive.display()
        )
    })
}

/// Whether the archive holds complete segment `name` (compressed or raw).
pub fn is_archived(archive: &Path, name: &str) -> bool {
    try_archived_segment_path(archive, name).is_some()
}

/// The content of an archive object holding WAL: decompressed when its name ends in `.zst`.
pub fn read_wal_object(path: &Path) -> Vec<u8> {
    let data =
        std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    if path.extension().is_some_and(|x| x == "zst") {
        zstd::decode_all(&data[..])
            .unwrap_or_else(|e| panic!("{} does not decompress: {e}", path.display()))
    } else {
        data
    }
}

/// The WAL of complete segment `name` as a reader gets it (decompressed when stored as
/// `.zst`).
pub fn read_archived_segment(archive: &Path, name: &str) -> Vec<u8> {
    read_wal_object(&archived_segment_path(archive, name))
}

/// The one object that holds complete segment `name`, for a test that damages or replaces it:
/// if both `.zst` and raw are there (a compaction step cut short), they must hold the same WAL
/// and the raw one is removed, as the compactor's last step does, so that what the test
/// changes is certainly what every reader reads. Panics when the archive does not have `name`.
/// Only while no `walagent stream` runs on the archive (its compactor could move the segment).
pub fn sole_segment_object(archive: &Path, name: &str) -> PathBuf {
    let objs = segment_objects(archive, name);
    match objs.as_slice() {
        [] => panic!("segment {name} is not in the archive {}", archive.display()),
        [one] => one.clone(),
        [zst, raw, ..] => {
            assert!(
                read_wal_object(zst) == read_wal_object(raw),
                "{} and {} hold different WAL",
                zst.display(),
                raw.display()
            );
            std::fs::remove_file(raw).unwrap();
            zst.clone()
        }
    }
}

/// Removes every object of complete segment `name` (compressed and raw); returns how many.
pub fn remove_archived_segment(archive: &Path, name: &str) -> usize {
    let objs = segment_objects(archive, name);
    assert!(
        !objs.is_empty(),
        "segment {name} is not in the archive {}",
        archive.display()
    );
    for p in &objs {
        std::fs::remove_file(p).unwrap_or_else(|e| panic!("remove {}: {e}", p.display()));
    }
    objs.len()
}

/// The objects of one segment moved out of the archive by [`set_segment_aside`].
#[must_use = "put_back() returns the segment to the archive"]
pub struct SetAside {
    moves: Vec<(PathBuf, PathBuf)>,
}

impl SetAside {
    /// Moves the objects back where they were.
    pub fn put_back(self) {
        for (from, to) in &self.moves {
            std::fs::rename(to, from)
                .unwrap_or_else(|e| panic!("rename {} back: {e}", to.display()));
        }
    }
}

/// Moves every object of complete segment `name` into directory `dir` (same filesystem), so
/// that the archive lacks the segment until [`SetAside::put_back`].
pub fn set_segment_aside(archive: &Path, name: &str, dir: &Path) -> SetAside {
    let objs = segment_objects(archive, name);
    assert!(
        !objs.is_empty(),
        "segment {name} is not in the archive {}",
        archive.display()
    );
    std::fs::create_dir_all(dir).unwrap();
    let moves: Vec<(PathBuf, PathBuf)> = objs
        .into_iter()
        .map(|p| {
            let to = dir.join(p.file_name().unwrap());
            std::fs::rename(&p, &to)
                .unwrap_or_else(|e| panic!("rename {} to {}: {e}", p.display(), to.display()));
            (p, to)
        })
        .collect();
    SetAside { moves }
}

/// `wal` in the encoding of `like` (zstd when its name ends in `.zst`).
pub fn encode_like(like: &Path, wal: &[u8]) -> Vec<u8> {
    if like.extension().is_some_and(|x| x == "zst") {
        zstd::encode_all(wal, 1).unwrap()
    } else {
        wal.to_vec()
    }
}

/// Writes `bytes` as a new file renamed over `path` (as a writer would: new inode, mode 0600).
pub fn replace_file(path: &Path, bytes: &[u8]) {
    let tmp = path.with_file_name(format!(
        ".{}.replace.tmp",
        path.file_name().unwrap().to_string_lossy()
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .unwrap_or_else(|e| panic!("create {}: {e}", tmp.display()));
    f.write_all(bytes).unwrap();
    f.sync_all().unwrap();
    drop(f);
    std::fs::rename(&tmp, path).unwrap();
}

/// Replaces the WAL of complete segment `name` with `wal`, in the encoding of the object that
/// holds it (see [`sole_segment_object`]); returns that object's path.
pub fn replace_segment_wal(archive: &Path, name: &str, wal: &[u8]) -> PathBuf {
    let obj = sole_segment_object(archive, name);
    replace_file(&obj, &encode_like(&obj, wal));
    obj
}

/// Flips one bit of the object that holds complete segment `name` (the one every reader reads,
/// see [`sole_segment_object`]) so that serving it must fail: in a `.zst`, a byte in the middle
/// of the compressed frame; in a raw segment, a non-zero byte well inside a page (record data,
/// which a record CRC covers; a zero byte might be padding). Returns the object's path.
pub fn damage_archived_segment(archive: &Path, name: &str) -> PathBuf {
    let obj = sole_segment_object(archive, name);
    let mut b = std::fs::read(&obj).unwrap();
    let at = if obj.extension().is_some_and(|x| x == "zst") {
        b.len() / 2
    } else {
        const PAGE: usize = 8192;
        let pages = b.len() / PAGE;
        (pages / 2..pages)
            .chain(1..pages / 2)
            .flat_map(|p| p * PAGE + 3000..(p + 1) * PAGE)
            .find(|&i| b[i] != 0)
            .unwrap_or_else(|| panic!("no record data in {}", obj.display()))
    };
    b[at] ^= 0x04;
    replace_file(&obj, &b);
    obj
}

/// The archive key (`wal/<file>`) of an object path under `wal/`.
pub fn wal_key(path: &Path) -> String {
    format!("wal/{}", path.file_name().unwrap().to_string_lossy())
}

/// Waits until no complete segment is left raw in the archive (a running `walagent stream`
/// compacts them once archiving has been idle for about a second); panics after `timeout`.
pub fn wait_for_compaction(archive: &Path, timeout: Duration) {
    super::wait::wait_until(timeout, "every raw segment compacted to .zst", || {
        raw_segments(archive).is_empty()
    });
}

/// No gap between the first and last archived segment of each timeline in `names` (sorted).
pub fn assert_contiguous(names: &[String]) {
    let nums: Vec<(u32, u64)> = names
        .iter()
        .map(|n| {
            (
                u32::from_str_radix(&n[..8], 16).unwrap(),
                u64::from_str_radix(&n[8..], 16).unwrap(),
            )
        })
        .collect();
    for w in nums.windows(2) {
        if w[0].0 == w[1].0 {
            assert!(
                w[1].1 == w[0].1 + 1 || (w[0].1 & 0xFF == 0xFF),
                "gap in the archive between {:?} and {:?}: {names:?}",
                w[0],
                w[1]
            );
        }
    }
}
