//! The on-disk form of a compressed 16 MiB segment: a size header (a zstd skippable frame) and
//! frames of 1 MiB (`archive::compress::FRAME`). Checked on segments a real `walagent stream`
//! archived from a real PostgreSQL 15 (default 16 MB segments, inline compression so every
//! segment is `.zst`): the object is plain zstd (`zstd -dc` gives pg_wal's bytes), it has one
//! frame per MiB, and an object cut exactly at a frame boundary (which is valid zstd, only
//! shorter) is refused by `wal-fetch` (exit 126, no DEST, the fix in the hint) and reported by
//! `verify`, never taken as a short segment. Objects of the old form (one frame) still read.

mod support;

use std::fs;
use std::path::Path;
use std::process::Command;

use support::{error_line, run_walagent, stderr_of, PgCluster, PgOptions};

/// Offsets where each frame of `z` ends (the size header's end first).
fn frame_ends(z: &[u8]) -> Vec<usize> {
    let mut ends = Vec::new();
    let mut at = 0;
    while at < z.len() {
        let n = zstd::zstd_safe::find_frame_compressed_size(&z[at..]).unwrap();
        at += n;
        ends.push(at);
    }
    ends
}

#[test]
fn segments_are_plain_zstd_in_one_mib_frames_and_a_cut_at_a_frame_boundary_is_refused() {
    let pg = PgCluster::start(PgOptions::default());
    pg.psql("SELECT pg_create_physical_replication_slot('frames', true)");
    pg.generate_wal(40);
    pg.switch_wal();
    let end = pg.current_lsn();
    let dir = support::tempdir();
    let archive = dir.join("archive");
    let a = archive.to_str().unwrap();
    let uri = pg.repl_uri();
    let out = run_walagent(
        &[
            "stream",
            "--source",
            &uri,
            "--archive",
            a,
            "--slot",
            "frames",
            "--endpos",
            &end,
            "--no-loop",
        ],
        &[support::inline_env()],
    );
    assert!(out.status.success(), "stream: {}", stderr_of(&out));
    let segments = support::zst_segments(&archive);
    assert!(segments.len() >= 2, "{segments:?}");
    let name = segments[0].clone();
    let expected = pg.read_wal_file(&name);
    assert_eq!(expected.len(), 16 << 20);
    let path = archive.join("wal").join(format!("{name}.zst"));
    let z = fs::read(&path).unwrap();

    // A size header of 24 bytes, then 16 frames of 1 MiB each.
    let ends = frame_ends(&z);
    assert_eq!(ends.len(), 17, "{ends:?}");
    assert_eq!(ends[0], 24);
    for w in ends.windows(2) {
        let frame = &z[w[0]..w[1]];
        assert_eq!(
            zstd::zstd_safe::get_frame_content_size(frame).unwrap(),
            Some(1 << 20)
        );
    }
    // Plain zstd: any decoder gives the segment.
    assert!(zstd::stream::decode_all(&z[..]).unwrap() == expected);
    match Command::new("zstd").arg("-dc").arg(&path).output() {
        Ok(o) => {
            assert!(o.status.success(), "zstd -dc: {}", stderr_of(&o));
            assert!(o.stdout == expected, "zstd -dc differs from pg_wal");
        }
        Err(e) => eprintln!("zstd tool not found ({e}); checked with the library only"),
    }

    // Cut after 8 of the 16 frames: valid zstd holding 8 MiB.
    let cut = &z[..ends[8]];
    assert_eq!(zstd::stream::decode_all(cut).unwrap().len(), 8 << 20);
    fs::write(&path, cut).unwrap();

    let pg_wal = dir.join("pg_wal");
    fs::create_dir(&pg_wal).unwrap();
    let dest = pg_wal.join("RECOVERYXLOG");
    let o = run_walagent(
        &[
            "wal-fetch",
            &name,
            dest.to_str().unwrap(),
            "--archive",
            a,
            "--prefetch",
            "0",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(126), "{}", stderr_of(&o));
    let line = error_line(&o);
    assert!(line.contains(&name) && line.contains("; hint: "), "{line}");
    assert!(!dest.exists(), "a short segment was handed to PostgreSQL");

    let o = run_walagent(&["verify", "--archive", a], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr_of(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains(&name), "verify does not name {name}:\n{text}");

    // The next segment, rewritten in the old form (one frame, no header), still serves.
    let next = &segments[1];
    let next_wal = pg.read_wal_file(next);
    let old_form = walagent::archive::compress::compress_bulk(&next_wal, 1).unwrap();
    fs::write(archive.join("wal").join(format!("{next}.zst")), &old_form).unwrap();
    let dest2 = pg_wal.join("RECOVERYXLOG2");
    let o = run_walagent(
        &[
            "wal-fetch",
            next,
            dest2.to_str().unwrap(),
            "--archive",
            a,
            "--prefetch",
            "0",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert!(fs::read(&dest2).unwrap() == next_wal);
    assert!(Path::new(&dest2).exists());
}
