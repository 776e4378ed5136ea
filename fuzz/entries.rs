//! Entry points of the fuzz targets, one function per target. Each takes the raw fuzz input,
//! runs it through walagent's public API and panics when a property fails; walagent itself must
//! never panic, whatever the input.
//!
//! Shared by the cargo-fuzz binaries (`fuzz/fuzz_targets/*.rs`) and by the stable replay test
//! `tests/fuzz_corpus.rs` (included there with `#[path]`), so CI checks the corpus with exactly
//! the code that produced it. Depends only on `walagent` and `bytes`.

use std::ops::Range;

use bytes::{Bytes, BytesMut};

use walagent::datadir::manifest::{BackupManifest, ChecksumAlgorithm};
use walagent::datadir::recovery::render_auto_conf_lines;
use walagent::datadir::tar::{TarEvent, TarParser};
use walagent::protocol::codec::{decode_frame, BackendMessage, CodecError, ReplicationMessage};
use walagent::protocol::conninfo::{mask_password, ConnInfo};
use walagent::restore::target::{
    recovery_settings, RecoveryTarget, TargetAction, TargetTime, TargetTimeline,
};
use walagent::wal::history::TimelineHistory;
use walagent::wal::verify::{check_segment, VerifyParams, WalVerifier};
use walagent::wal::{Lsn, SegmentSize, Timeline};

/// A target's entry point.
pub type Entry = fn(&[u8]);

/// Every target name, as used for `fuzz/corpus/<name>/`.
pub const TARGETS: &[(&str, Entry)] = &[
    ("codec", codec),
    ("wal_verify", wal_verify),
    ("tarstream", tarstream),
    ("manifest", manifest),
    ("conninfo", conninfo),
    ("history", history),
    ("target", target),
];

// ---------------------------------------------------------------------------------------------
// Chunking
// ---------------------------------------------------------------------------------------------

/// Splits `data` into a control prefix of `n` bytes (zero-padded when shorter) and the rest.
fn control<const N: usize>(data: &[u8]) -> ([u8; N], &[u8]) {
    let mut c = [0u8; N];
    let n = data.len().min(N);
    c[..n].copy_from_slice(&data[..n]);
    (c, &data[n..])
}

/// Deterministic chunk boundaries for `len` bytes, from `seed`: mostly small chunks (to split
/// headers), some around block and page sizes, now and then large ones.
fn chunks(seed: u64, len: usize) -> Vec<Range<usize>> {
    let mut state = seed | 1;
    let mut next = move || {
        // xorshift64*
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let mut out = Vec::new();
    let mut at = 0;
    while at < len {
        let r = next();
        let size = match r % 8 {
            0..=3 => 1 + (r >> 8) as usize % 16,
            4 | 5 => 1 + (r >> 8) as usize % 600,
            6 => 1 + (r >> 8) as usize % 9000,
            _ => 1 + (r >> 8) as usize % 70_000,
        };
        let end = (at + size).min(len);
        out.push(at..end);
        at = end;
    }
    out
}

// ---------------------------------------------------------------------------------------------
// codec: backend frames and CopyBoth payloads
// ---------------------------------------------------------------------------------------------

#[derive(Debug, PartialEq)]
struct Decoded {
    messages: Vec<BackendMessage>,
    replication: Vec<Result<ReplicationMessage, CodecError>>,
    error: Option<CodecError>,
}

fn decode_stream(input: &[u8], pieces: &[Range<usize>]) -> Decoded {
    let mut buf = BytesMut::new();
    let mut d = Decoded {
        messages: Vec::new(),
        replication: Vec::new(),
        error: None,
    };
    for piece in pieces {
        buf.extend_from_slice(&input[piece.clone()]);
        loop {
            match decode_frame(&mut buf) {
                Ok(Some(m)) => {
                    if let BackendMessage::CopyData(payload) = &m {
                        d.replication
                            .push(ReplicationMessage::decode(payload.clone()));
                    }
                    let _ = format!("{m:?}");
                    if let BackendMessage::Error(n) | BackendMessage::Notice(n) = &m {
                        let _ = n.to_string();
                    }
                    d.messages.push(m);
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = e.to_string();
                    d.error = Some(e);
                    return d;
                }
            }
        }
    }
    d
}

/// Backend frames (`decode_frame`) and, inside CopyData, replication messages. Input: 8 bytes
/// of chunking seed, then the byte stream. Property: any split of the stream into reads decodes
/// to the same messages and the same error as the whole stream at once.
pub fn codec(data: &[u8]) {
    let (seed, input) = control::<8>(data);
    let seed = u64::from_le_bytes(seed);
    let whole = decode_stream(input, std::slice::from_ref(&(0..input.len())));
    let split = decode_stream(input, &chunks(seed, input.len()));
    assert_eq!(whole, split, "chunking changed the decoded stream");
    // The raw input as one CopyData payload.
    let _ = ReplicationMessage::decode(Bytes::copy_from_slice(input));
}

// ---------------------------------------------------------------------------------------------
// wal_verify: the streaming WAL verifier
// ---------------------------------------------------------------------------------------------

/// The system identifier of the WAL fixtures (tests/fixtures/wal).
pub const FIXTURE_SYSID: u64 = 7710843067740758272;

/// `WalVerifier::feed`. Input: flags (bit 0: 16 MiB segments instead of 1 MiB; bit 1: also run
/// `check_segment` on the data zero-padded to a whole segment; bit 2: the rest is a program for
/// [`build_wal`], not WAL), timeline (1..=4 from the low bits), segment number (u16 LE), 4
/// bytes of chunking seed, then WAL from the segment start (or the program). Properties:
/// feeding in random chunks gives the same outcome (error, position, records verified) as
/// feeding everything at once; WAL built without damage verifies.
pub fn wal_verify(data: &[u8]) {
    let (c, rest) = control::<8>(data);
    let built;
    let mut must_verify = false;
    let wal: &[u8] = if c[0] & 4 != 0 {
        let seg = if c[0] & 1 != 0 { 16 << 20 } else { 1 << 20 };
        let start = u64::from(u16::from_le_bytes([c[2], c[3]])) * seg;
        let Some((bytes, clean)) = build_wal(rest, u32::from(c[1] % 4) + 1, seg, start) else {
            return;
        };
        built = bytes;
        must_verify = clean;
        &built
    } else {
        rest
    };
    let seg_bytes: u64 = if c[0] & 1 != 0 { 16 << 20 } else { 1 << 20 };
    let Ok(segment_size) = SegmentSize::new(seg_bytes) else {
        return;
    };
    let params = VerifyParams {
        system_identifier: FIXTURE_SYSID,
        segment_size,
        timeline: match Timeline::new(u32::from(c[1] % 4) + 1) {
            Some(t) => t,
            None => return,
        },
    };
    let start = Lsn(u64::from(u16::from_le_bytes([c[2], c[3]])) * seg_bytes);
    let seed = u64::from(u32::from_le_bytes([c[4], c[5], c[6], c[7]]));

    let run = |pieces: &[Range<usize>]| {
        let mut v = WalVerifier::new(params, start);
        let mut result = Ok(());
        for p in pieces {
            result = v.feed(&wal[p.clone()]);
            if result.is_err() {
                break;
            }
        }
        if let Err(e) = &result {
            let _ = (e.to_string(), e.lsn());
        }
        let position = result.is_ok().then(|| v.position());
        (result, position, v.records_verified(), v.server_major())
    };
    let whole = run(std::slice::from_ref(&(0..wal.len())));
    let split = run(&chunks(seed, wal.len()));
    assert_eq!(whole, split, "chunking changed the verifier's outcome");
    if must_verify {
        assert!(whole.0.is_ok(), "valid WAL rejected: {:?}", whole.0);
    }

    if c[0] & 2 != 0 && seg_bytes == 1 << 20 {
        let mut seg = wal.to_vec();
        seg.resize(seg_bytes as usize, 0);
        let _ = check_segment(params, start, &seg);
        // The wrong length is an error, never a panic.
        let _ = check_segment(params, start, wal);
    }
}

/// Builds WAL with `synth::WalBuilder` from a small program, so the verifier sees records with
/// valid CRCs, page-spanning and segment-spanning records, switches and aborted records, then
/// damages it. Ops (one byte each, then arguments): `0 len:u16` record of `len` payload bytes,
/// `1` XLOG_SWITCH, `2 len:u16` aborted record (crash before its end), `3` bump the timeline,
/// `4 off:u32 xor:u8` flip bits at `off % len` after building. Stops at 3 MiB of WAL. Returns
/// the bytes and whether they are undamaged valid WAL (only ops 0 and 1, timeline unchanged).
fn build_wal(program: &[u8], tli: u32, seg: u64, start: u64) -> Option<(Vec<u8>, bool)> {
    use walagent::wal::synth::WalBuilder;
    let size = SegmentSize::new(seg).ok()?;
    let mut b = WalBuilder::new(FIXTURE_SYSID, size, tli, Lsn(start));
    let mut clean = true;
    let mut flips = Vec::new();
    let mut p = program;
    let take = |p: &mut &[u8], n: usize| -> Option<Vec<u8>> {
        let (h, t) = (p.get(..n)?, p.get(n..)?);
        *p = t;
        Some(h.to_vec())
    };
    let mut ops = 0;
    while let Some(op) = take(&mut p, 1) {
        ops += 1;
        if ops > 256 || b.bytes().len() > 3 << 20 {
            break;
        }
        match op[0] % 5 {
            0 | 2 => {
                let Some(l) = take(&mut p, 2) else { break };
                let len = usize::from(u16::from_le_bytes([l[0], l[1]]));
                let payload: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31)).collect();
                if op[0] % 5 == 0 {
                    b.push(10, 0, 1000, &payload);
                } else {
                    clean = false;
                    let _ = b.push_aborted(10, 0, 1000, &payload);
                }
            }
            1 => {
                b.push_switch();
            }
            3 => {
                clean = false;
                b.set_timeline(tli + 1);
            }
            _ => {
                let Some(f) = take(&mut p, 5) else { break };
                clean = false;
                flips.push((u32::from_le_bytes([f[0], f[1], f[2], f[3]]) as usize, f[4]));
            }
        }
    }
    let mut bytes = b.into_bytes();
    if !bytes.is_empty() {
        for (off, x) in flips {
            let i = off % bytes.len();
            bytes[i] ^= x;
        }
    }
    Some((bytes, clean))
}

// ---------------------------------------------------------------------------------------------
// tarstream
// ---------------------------------------------------------------------------------------------

/// Events with adjacent `Data` and `Trailer` pieces merged, which is what chunking may change.
fn normalize(events: Vec<TarEvent>) -> Vec<TarEvent> {
    let mut out: Vec<TarEvent> = Vec::new();
    for e in events {
        match (out.last_mut(), e) {
            (Some(TarEvent::Data(a)), TarEvent::Data(b)) => {
                let mut m = BytesMut::from(&a[..]);
                m.extend_from_slice(&b);
                *a = m.freeze();
            }
            (Some(TarEvent::Trailer(a)), TarEvent::Trailer(b)) => {
                let mut m = BytesMut::from(&a[..]);
                m.extend_from_slice(&b);
                *a = m.freeze();
            }
            (_, e) => out.push(e),
        }
    }
    out
}

/// The push tar parser. Input: flags (bit 0: `allow_missing_trailer`), 7 bytes of chunking
/// seed, then the tar stream. Properties: chunking changes nothing but how `Data`/`Trailer` are
/// split; after a clean `finish`, the events' raw bytes are exactly the input; every `Entry` is
/// followed by `Data` totalling its size and one `EntryEnd`.
pub fn tarstream(data: &[u8]) {
    let (c, input) = control::<8>(data);
    let allow = c[0] & 1 != 0;
    let mut seed = [0u8; 8];
    seed[..7].copy_from_slice(&c[1..]);
    let seed = u64::from_le_bytes(seed);

    let run = |pieces: &[Range<usize>]| {
        let mut parser = TarParser::new().allow_missing_trailer(allow);
        let mut events = Vec::new();
        let mut result = Ok(());
        for p in pieces {
            result = parser.feed(Bytes::copy_from_slice(&input[p.clone()]), &mut events);
            if result.is_err() {
                break;
            }
        }
        if result.is_ok() {
            result = parser.finish(&mut events);
        }
        if let Err(e) = &result {
            let _ = e.to_string();
        }
        (normalize(events), result)
    };
    let whole = run(std::slice::from_ref(&(0..input.len())));
    let split = run(&chunks(seed, input.len()));
    assert_eq!(whole, split, "chunking changed the tar events");

    let (events, result) = whole;
    if result.is_ok() {
        let mut raw = Vec::with_capacity(input.len());
        for e in &events {
            raw.extend_from_slice(e.raw());
        }
        assert!(raw == input, "events do not reproduce the stream");
    }
    let mut in_entry: Option<u64> = None;
    for e in &events {
        match e {
            TarEvent::Entry { meta, .. } => {
                assert!(in_entry.is_none(), "Entry inside an entry");
                in_entry = Some(meta.size);
            }
            TarEvent::Data(d) => {
                let left = in_entry.as_mut().expect("Data outside an entry");
                *left = left
                    .checked_sub(d.len() as u64)
                    .expect("more Data than the entry's size");
            }
            TarEvent::EntryEnd { padding } => {
                assert_eq!(in_entry, Some(0), "EntryEnd before the entry's data");
                assert!(padding.len() < 512);
                in_entry = None;
            }
            TarEvent::Trailer(_) => assert!(in_entry.is_none(), "Trailer inside an entry"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// manifest
// ---------------------------------------------------------------------------------------------

/// `backup_manifest` parsing, with and without the checksum check, and the per-file helpers.
/// Property: a manifest that verifies also parses unverified, to the same value.
pub fn manifest(data: &[u8]) {
    let unverified = BackupManifest::parse_unverified(data);
    match BackupManifest::parse(data) {
        Ok(m) => assert_eq!(unverified.as_ref().ok(), Some(&m)),
        Err(e) => {
            let _ = e.to_string();
        }
    }
    if let Ok(m) = unverified {
        for f in m.files.iter().take(64) {
            let _ = (f.path_lossy(), f.crc32c(), f.verify(b""), f.verify(b"15\n"));
            assert!(m.file(&f.path_lossy()).is_some() || std::str::from_utf8(&f.path).is_err());
        }
    }
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(a) = ChecksumAlgorithm::parse(s) {
            assert_eq!(a.compute(data).len(), a.digest_len());
            assert_eq!(ChecksumAlgorithm::parse(a.as_str()).ok(), Some(a));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// conninfo
// ---------------------------------------------------------------------------------------------

/// What a password is replaced with in the constructive check; it must not occur in the input.
const MARKER: &str = "Zq7Secret";

fn conninfo_env(k: &str) -> Option<String> {
    match k {
        "USER" => Some("osuser".into()),
        "HOME" => Some("/nonexistent-walagent-home".into()),
        _ => None,
    }
}

/// Everything walagent might print about `s`.
fn conninfo_printed(s: &str) -> Vec<String> {
    let mut out = vec![mask_password(s)];
    match ConnInfo::parse_with_env(s, &conninfo_env) {
        Ok(c) => {
            out.push(format!("{c:?}"));
            out.push(c.display_safe());
            out.push(c.to_conninfo_string(false));
        }
        Err(e) => {
            out.push(e.to_string());
            out.push(format!("{e:?}"));
            out.push(e.hint().unwrap_or_default());
        }
    }
    out
}

/// Non-overlapping is not enough: counts every start position.
fn occurrences(hay: &str, needle: &str) -> usize {
    (0..hay.len())
        .filter(|&i| hay.is_char_boundary(i) && hay[i..].starts_with(needle))
        .count()
}

/// The conninfo parser and masker. Input: one form byte, then UTF-8 text.
///
/// Property 1 (the text as given): when it parses with a password that occurs exactly once in
/// the text, literally (no backslash or `%` anywhere, at least 2 characters, no `*` or `'`),
/// the masked text does not contain it.
///
/// Property 2 (constructive): the text is split at its first U+0001 into `a` and `b`, and a
/// marker is put in password position: `a password=M b`, `a password='M b`, `postgresql://a:M
/// b@...` (only when `a` has no `/`), `postgresql://a?password=M b`, by the form byte. Nothing
/// printed (mask, error, hint, Debug, display_safe) may contain the marker.
pub fn conninfo(data: &[u8]) {
    let (c, rest) = control::<1>(data);
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let masked = mask_password(text);
    match ConnInfo::parse_with_env(text, &conninfo_env) {
        Ok(ci) => {
            let _ = (
                format!("{ci:?}"),
                ci.display_safe(),
                ci.to_conninfo_string(true),
            );
            if let Some(p) = &ci.password {
                let literal = !text.contains(['\\', '%'])
                    && p.chars().count() >= 2
                    && !p.contains(['*', '\''])
                    && occurrences(text, p) == 1;
                if literal {
                    assert!(
                        !masked.contains(p.as_str()),
                        "masked {text:?} as {masked:?}, which holds the password {p:?}"
                    );
                }
            }
        }
        Err(e) => {
            let _ = (e.to_string(), e.hint());
        }
    }

    if text.contains(MARKER) {
        return;
    }
    let (a, b) = text.split_once('\u{1}').unwrap_or((text, ""));
    if c[0] % 6 == 3 && a.contains('/') {
        // "postgresql://x/y:M@h": with a '/' before it the ':' is in a path or query, not in
        // userinfo, so M is not in password position.
        return;
    }
    let s = match c[0] % 6 {
        0 => format!("{a} password={MARKER}{b}"),
        1 => format!("{a} password='{MARKER}{b}"),
        2 => format!("{a} password = '{MARKER}{b}'"),
        3 => format!("postgresql://{a}:{MARKER}{b}@h/db"),
        4 => format!("postgresql://{a}?password={MARKER}{b}"),
        _ => format!("postgresql://{a}?x=1&password={MARKER}{b}&sslmode=require"),
    };
    for out in conninfo_printed(&s) {
        assert!(!out.contains(MARKER), "{s:?} printed the password: {out:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// history
// ---------------------------------------------------------------------------------------------

/// Timeline history files. Property: a parsed history renders (`to_bytes`) to text that parses
/// back to the same entries.
pub fn history(data: &[u8]) {
    match TimelineHistory::parse(data) {
        Ok(h) => {
            let again = TimelineHistory::parse(&h.to_bytes())
                .unwrap_or_else(|e| panic!("rendered history does not parse: {e}"));
            assert_eq!(again, h, "history does not round-trip");
            let last = h
                .entries
                .last()
                .map_or(Timeline::FIRST, |e| e.parent_timeline);
            let after = last.next().unwrap_or(last);
            let _ = h.check_child(after);
            let _ = h.check_child(last);
            for e in h.entries.iter().take(64) {
                let _ = h.timeline_of(e.switch_lsn, after);
                assert_eq!(h.switch_point(e.parent_timeline), Some(e.switch_lsn));
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// target
// ---------------------------------------------------------------------------------------------

/// Recovery-target parsing: `--target-time`, `--target-lsn`, `--target-xid`, `--target-name`,
/// `--target`, `--target-timeline`, `--target-action` on the same text. Properties: times,
/// LSNs and timelines that parse render to text that parses back to the same value; a time
/// survives the trip through PostgreSQL microseconds; the settings written for a target take
/// one line each in `postgresql.auto.conf`.
pub fn target(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let mut targets = Vec::new();
    match s.parse::<TargetTime>() {
        Ok(t) => {
            let back: TargetTime = t
                .render()
                .parse()
                .unwrap_or_else(|e| panic!("{:?} renders as {:?}: {e}", s, t.render()));
            assert_eq!(back, t, "time does not round-trip through render()");
            assert_eq!(TargetTime::from_pg_micros(t.pg_micros()), Some(t));
            targets.push(RecoveryTarget::Time(t));
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
    if let Ok(l) = s.parse::<Lsn>() {
        assert_eq!(l.to_string().parse::<Lsn>().ok(), Some(l));
        targets.push(RecoveryTarget::Lsn(l));
    }
    for parsed in [
        RecoveryTarget::parse_xid(s),
        RecoveryTarget::parse_name(s),
        RecoveryTarget::parse_target(s),
    ] {
        match parsed {
            Ok(t) => targets.push(t),
            Err(e) => {
                let _ = e.to_string();
            }
        }
    }
    let timeline = match s.parse::<TargetTimeline>() {
        Ok(tl) => {
            assert_eq!(tl.to_string().parse::<TargetTimeline>().ok(), Some(tl));
            tl
        }
        Err(_) => TargetTimeline::Latest,
    };
    let action = s.parse::<TargetAction>().unwrap_or(TargetAction::Pause);
    targets.push(RecoveryTarget::End);
    for t in &targets {
        let _ = (t.to_string(), t.xid32(), t.is_set());
        let settings = recovery_settings(t, true, timeline, action, "walagent wal-fetch %f %p");
        // Each setting stays on its own line of postgresql.auto.conf, whatever the name holds.
        let lines = render_auto_conf_lines(&settings);
        assert_eq!(lines.lines().count(), settings.len(), "{lines:?}");
    }
}
