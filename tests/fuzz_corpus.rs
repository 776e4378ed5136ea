//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) through the fuzz targets' own
//! entry points (`fuzz/entries.rs`, included below), on stable and without fuzzing: every input
//! the fuzzer kept must still run without a panic and with every property holding. Fuzzing
//! itself is `cargo +nightly fuzz run <target>` in `fuzz/` (see proto-notes/fuzzing.md).

#[path = "../fuzz/entries.rs"]
mod entries;

use std::path::Path;

fn replay(target: &str) {
    let run = entries::TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .map(|(_, f)| *f)
        .unwrap_or_else(|| panic!("no entry point for {target}"));
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} is empty", dir.display());
    for path in &files {
        let data = std::fs::read(path).unwrap();
        let outcome = std::panic::catch_unwind(|| run(&data));
        assert!(outcome.is_ok(), "{target}: {} failed", path.display());
    }
}

#[test]
fn every_target_has_a_corpus() {
    for (name, _) in entries::TARGETS {
        assert!(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("fuzz/corpus")
                .join(name)
                .is_dir(),
            "fuzz/corpus/{name} is missing"
        );
    }
}

#[test]
fn codec() {
    replay("codec");
}

#[test]
fn wal_verify() {
    replay("wal_verify");
}

#[test]
fn tarstream() {
    replay("tarstream");
}

#[test]
fn manifest() {
    replay("manifest");
}

#[test]
fn conninfo() {
    replay("conninfo");
}

#[test]
fn history() {
    replay("history");
}

#[test]
fn target() {
    replay("target");
}
