//! Compression throughput on one 16 MiB WAL segment.
//!
//! Input: the segment file named by `WALAGENT_BENCH_SEGMENT` (e.g. a real PostgreSQL segment
//! copied out of pg_wal), plus always a synthetic one (half random bytes, half zeros, in 256-byte
//! runs: compresses about 2x). Run: `cargo bench --bench compress` (add `-- --quick` for a fast
//! pass). The compression ratio of each level is printed once before the measurements.
//!
//! Groups:
//! - `compress/<input>/bulk/L`: `zstd::bulk` on a warm in-memory buffer, levels -1, 1, 3;
//! - `compress/<input>/stream/1`: `compress_streaming` (a size header and 1 MiB frames, each
//!   compressed in one call) on the same buffer, and `compress/<input>/encoder/1`: what it
//!   replaced, zstd's streaming encoder fed 1 MiB at a time (one frame);
//! - `compress_many/N-segments/{stream,encoder}/1`: the same two over up to 16 different
//!   segments per iteration, when `WALAGENT_BENCH_WAL_DIR` names a directory of 16 MiB segments
//!   (a pg_wal): the cache-cold case the archiver and the compactor see;
//! - `compress_file/<input>/L`: the real `compress_file`, file to file (page cache), levels -1,
//!   1, and `compress_file/<input>/whole-bulk/1`: read the whole file, `zstd::bulk`, write;
//! - `decompress/<input>/L`: `decompress_stream` from memory into a sink.

use std::hint::black_box;
use std::io;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use walagent::archive::compress::{
    compress_bulk, compress_file, compress_streaming, decompress_stream,
};
use walagent::archive::Compression;

const SEG: usize = 16 << 20;
const LEVELS: [i32; 3] = [-1, 1, 3];

fn synthetic() -> Vec<u8> {
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut v = vec![0u8; SEG];
    for (i, run) in v.chunks_mut(256).enumerate() {
        if i % 2 == 0 {
            for b in run {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = (x >> 24) as u8;
            }
        }
    }
    v
}

fn inputs() -> Vec<(String, Vec<u8>)> {
    let mut v = Vec::new();
    if let Ok(path) = std::env::var("WALAGENT_BENCH_SEGMENT") {
        match std::fs::read(&path) {
            Ok(data) if !data.is_empty() => v.push(("pgwal".to_string(), data)),
            Ok(_) => eprintln!("WALAGENT_BENCH_SEGMENT={path} is empty; skipping it"),
            Err(e) => eprintln!("cannot read WALAGENT_BENCH_SEGMENT={path}: {e}; skipping it"),
        }
    }
    v.push(("synthetic".to_string(), synthetic()));
    v
}

/// zstd's streaming encoder fed 1 MiB at a time, one frame: what `compress_streaming` was
/// before frames of 1 MiB.
fn encoder(d: &[u8], level: i32) -> Vec<u8> {
    let mut out = Vec::with_capacity(d.len());
    let mut enc = zstd::stream::write::Encoder::new(&mut out, level).expect("encoder");
    enc.include_checksum(true).expect("checksum");
    enc.set_pledged_src_size(Some(d.len() as u64))
        .expect("size");
    for piece in d.chunks(1 << 20) {
        std::io::Write::write_all(&mut enc, piece).expect("compress");
    }
    enc.finish().expect("finish");
    out
}

/// Up to 16 segment files of `WALAGENT_BENCH_WAL_DIR` (e.g. a pg_wal), in name order.
fn many_segments() -> Option<Vec<Vec<u8>>> {
    let dir = std::env::var("WALAGENT_BENCH_WAL_DIR").ok()?;
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .map_err(|e| eprintln!("cannot read WALAGENT_BENCH_WAL_DIR={dir}: {e}"))
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().len() == 24 && e.metadata().is_ok_and(|m| m.len() == 16 << 20))
        .map(|e| e.path())
        .collect();
    names.sort();
    let v: Vec<Vec<u8>> = names
        .iter()
        .take(16)
        .filter_map(|p| std::fs::read(p).ok())
        .collect();
    (!v.is_empty()).then_some(v)
}

fn bench(c: &mut Criterion) {
    let inputs = inputs();
    let dir = tempfile::tempdir().expect("temp dir for compress_file");

    for (name, data) in &inputs {
        for level in LEVELS {
            let z = compress_bulk(data, level).expect("compress");
            eprintln!(
                "{name} zstd:{level}: {} -> {} bytes, ratio {:.2}",
                data.len(),
                z.len(),
                data.len() as f64 / z.len() as f64
            );
        }
    }

    let mut g = c.benchmark_group("compress");
    g.sample_size(10).measurement_time(Duration::from_secs(4));
    for (name, data) in &inputs {
        g.throughput(Throughput::Bytes(data.len() as u64));
        for level in LEVELS {
            g.bench_with_input(
                BenchmarkId::new(format!("{name}/bulk"), level),
                data,
                |b, d| b.iter(|| compress_bulk(black_box(d), level).expect("compress")),
            );
        }
        // What compress_streaming replaced (session 5): zstd's streaming encoder, one frame,
        // fed 1 MiB at a time.
        g.bench_with_input(
            BenchmarkId::new(format!("{name}/encoder"), 1),
            data,
            |b, d| b.iter(|| encoder(d, 1)),
        );
        g.bench_with_input(
            BenchmarkId::new(format!("{name}/stream"), 1),
            data,
            |b, d| {
                b.iter(|| {
                    let mut out = Vec::with_capacity(d.len());
                    compress_streaming(&mut &d[..], d.len() as u64, &mut out, 1).expect("compress");
                    out
                })
            },
        );
    }
    g.finish();

    // Many different segments per iteration (the cache-cold case of the archiver and the
    // compactor, which never see a segment twice): the first 16 files of WALAGENT_BENCH_WAL_DIR.
    if let Some(many) = many_segments() {
        let total: usize = many.iter().map(Vec::len).sum();
        let mut g = c.benchmark_group("compress_many");
        g.sample_size(10).measurement_time(Duration::from_secs(8));
        g.throughput(Throughput::Bytes(total as u64));
        g.bench_function(
            BenchmarkId::new(format!("{}-segments/stream", many.len()), 1),
            |b| {
                b.iter(|| {
                    many.iter()
                        .map(|d| {
                            let mut out = Vec::with_capacity(d.len());
                            compress_streaming(&mut &d[..], d.len() as u64, &mut out, 1)
                                .expect("compress")
                        })
                        .sum::<u64>()
                })
            },
        );
        g.bench_function(
            BenchmarkId::new(format!("{}-segments/encoder", many.len()), 1),
            |b| b.iter(|| many.iter().map(|d| encoder(d, 1).len()).sum::<usize>()),
        );
        g.finish();
    }

    let mut g = c.benchmark_group("compress_file");
    g.sample_size(10).measurement_time(Duration::from_secs(4));
    for (name, data) in &inputs {
        let src = dir.path().join(format!("{name}.seg"));
        std::fs::write(&src, data).expect("write input");
        let dst = dir.path().join(format!("{name}.zst"));
        g.throughput(Throughput::Bytes(data.len() as u64));
        for level in [-1, 1] {
            g.bench_function(BenchmarkId::new(name.as_str(), level), |b| {
                b.iter(|| {
                    compress_file(&src, &dst, Compression::Zstd { level }).expect("compress_file")
                })
            });
        }
        // The alternative compress_file does not take: read the whole file, zstd::bulk, write.
        g.bench_function(BenchmarkId::new(format!("{name}/whole-bulk"), 1), |b| {
            b.iter(|| {
                let whole = std::fs::read(&src).expect("read");
                let z = compress_bulk(&whole, 1).expect("compress");
                std::fs::write(&dst, &z).expect("write");
                z.len()
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("decompress");
    g.sample_size(10).measurement_time(Duration::from_secs(4));
    for (name, data) in &inputs {
        g.throughput(Throughput::Bytes(data.len() as u64));
        for level in [1, 3] {
            let z = compress_bulk(data, level).expect("compress");
            g.bench_with_input(BenchmarkId::new(name.as_str(), level), &z, |b, z| {
                b.iter(|| {
                    decompress_stream(black_box(&z[..]), io::sink(), true).expect("decompress")
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
