//! Throughput of the streaming WAL verifier on a realistic 16 MiB segment fed in 128 KiB chunks
//! (the walsender's MAX_SEND_SIZE).
//!
//! The segment is synthesized: the records of a real PostgreSQL 15 segment
//! (`tests/fixtures/wal/000000010000000000000009.zst`: heap inserts and updates, full-page
//! images, 20 KB logical messages) are laid out again, in order and repeatedly, into a 16 MiB
//! segment with fresh page headers, prev-links and CRCs. So the record-size mix is real and
//! no 16 MiB file is stored.
//!
//! `segment_checker_16MiB_in_1MiB_pieces` is wal-fetch's check (`SegmentChecker`, fed the 1 MiB
//! pieces that decompression writes), to be set against the decompression of the same segment.
//!
//! Run: `cargo bench --bench wal_verify -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use walagent::wal::synth::WalBuilder;
use walagent::wal::verify::{check_segment, SegmentChecker, VerifyParams, WalVerifier};
use walagent::wal::{Lsn, SegmentSize, Timeline, WAL_PAGE_SIZE};

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/wal/000000010000000000000009.zst"
);
const FIXTURE_SEG: usize = 1 << 20;
const SEG: u64 = 16 << 20;
const CHUNK: usize = 128 << 10;
const SYSID: u64 = 7710843067740758272;

/// Record images (header + payload) of a real segment, in order. The segment starts right after
/// a switch, so there is no continuation to skip on its first page.
fn fixture_records() -> Vec<Vec<u8>> {
    let compressed = std::fs::read(FIXTURE).expect("read fixture");
    let seg = zstd::stream::decode_all(&compressed[..]).expect("decompress fixture");
    assert_eq!(seg.len(), FIXTURE_SEG);
    // Drop the page headers: what remains is the records back to back, MAXALIGN padded.
    let page = WAL_PAGE_SIZE as usize;
    let mut stream = Vec::with_capacity(seg.len());
    for (i, p) in seg.chunks(page).enumerate() {
        stream.extend_from_slice(&p[if i == 0 { 40 } else { 24 }..]);
    }
    let mut out = Vec::new();
    let mut off = 0;
    while off + 4 <= stream.len() {
        let tot = u32::from_le_bytes([
            stream[off],
            stream[off + 1],
            stream[off + 2],
            stream[off + 3],
        ]) as usize;
        if tot == 0 || off + tot > stream.len() {
            break; // the last record continues into the next segment
        }
        out.push(stream[off..off + tot].to_vec());
        off = (off + tot + 7) & !7;
    }
    out
}

fn build_segment() -> (VerifyParams, Lsn, Vec<u8>) {
    let size = SegmentSize::new(SEG).expect("16 MiB");
    let start = Lsn(0x1_0000_0000);
    let records = fixture_records();
    let mut b = WalBuilder::new(SYSID, size, 1, start);
    b.set_prev(Lsn(start.0 - 24));
    'fill: loop {
        for r in &records {
            if b.position().0 >= start.0 + SEG {
                break 'fill;
            }
            b.push(
                r[17],
                r[16],
                u32::from_le_bytes([r[4], r[5], r[6], r[7]]),
                &r[24..],
            );
        }
    }
    let mut bytes = b.into_bytes();
    bytes.truncate(SEG as usize);
    let params = VerifyParams {
        system_identifier: SYSID,
        segment_size: size,
        timeline: Timeline::FIRST,
    };
    (params, start, bytes)
}

fn bench(c: &mut Criterion) {
    let (params, start, seg) = build_segment();
    // Sanity: the synthesized segment verifies, and holds many records.
    let mut v = WalVerifier::new(params, start);
    for chunk in seg.chunks(CHUNK) {
        v.feed(chunk).expect("synthesized segment verifies");
    }
    let records = v.records_verified();
    assert!(records > 30_000, "{records} records");
    eprintln!(
        "16 MiB segment: {records} records from {} fixture records (mean {} bytes)",
        fixture_records().len(),
        SEG / records
    );

    let mut g = c.benchmark_group("wal_verify");
    g.throughput(Throughput::Bytes(SEG));
    g.bench_function("feed_16MiB_in_128KiB_chunks", |b| {
        b.iter(|| {
            let mut v = WalVerifier::new(params, start);
            for chunk in seg.chunks(CHUNK) {
                v.feed(black_box(chunk)).expect("verifies");
            }
            v.records_verified()
        })
    });
    g.bench_function("check_segment_16MiB", |b| {
        b.iter(|| {
            check_segment(params, start, black_box(&seg))
                .expect("verifies")
                .records
        })
    });
    g.bench_function("segment_checker_16MiB_in_1MiB_pieces", |b| {
        b.iter(|| {
            let mut c = SegmentChecker::new(params, start);
            for piece in seg.chunks(1 << 20) {
                c.update(black_box(piece)).expect("verifies");
            }
            c.finish().expect("verifies").records
        })
    });
    // The ceiling: CRC-32C alone over the same bytes.
    g.bench_function("crc32c_only_16MiB", |b| {
        b.iter(|| crc32c::crc32c(black_box(&seg)))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
