//! Compression of archived WAL: zstd frames (with content checksum and content size) or none.
//!
//! A compressed segment is a size header (a zstd skippable frame holding the content length) and
//! frames of [`FRAME`] bytes ([`compress_streaming`]); older objects are one frame. The format is
//! plain zstd, so `zstd -d 000000010000000000000003.zst` restores a segment without walagent. See
//! `proto-notes/archive-layout.md`, "Compression".

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::str::FromStr;

use zstd::stream::raw::{CParameter, Decoder as RawDecoder, InBuffer, Operation, OutBuffer};

/// How archived WAL segments are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Stored as is (`wal/<name>`).
    None,
    /// zstd (`wal/<name>.zst`; frames of [`FRAME`] bytes). `level` may be negative (faster, larger).
    Zstd { level: i32 },
}

impl Compression {
    /// zstd level 1: on WAL it is several hundred MB/s per core and within a few percent of the
    /// ratio of level 3 (see `benches/compress.rs`).
    pub const DEFAULT: Compression = Compression::Zstd { level: 1 };

    /// Key suffix: `""` or `".zst"`.
    pub fn suffix(self) -> &'static str {
        match self {
            Compression::None => "",
            Compression::Zstd { .. } => ".zst",
        }
    }

    pub fn is_compressed(self) -> bool {
        !matches!(self, Compression::None)
    }
}

impl Default for Compression {
    fn default() -> Self {
        Compression::DEFAULT
    }
}

/// Prints the form [`FromStr`] accepts: `none` or `zstd:N`.
impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Compression::None => f.write_str("none"),
            Compression::Zstd { level } => write!(f, "zstd:{level}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid compression {text:?}: expected none, zstd (level 1) or zstd:LEVEL with LEVEL from {min} to {max} (negative levels are faster), e.g. zstd:3"
)]
pub struct ParseCompressionError {
    pub text: String,
    pub min: i32,
    pub max: i32,
}

impl FromStr for Compression {
    type Err = ParseCompressionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let range = zstd::compression_level_range();
        let err = || ParseCompressionError {
            text: s.to_string(),
            min: *range.start(),
            max: *range.end(),
        };
        let t = s.trim();
        if t.eq_ignore_ascii_case("none") {
            return Ok(Compression::None);
        }
        if t.eq_ignore_ascii_case("zstd") {
            return Ok(Compression::DEFAULT);
        }
        let (algo, level) = t.split_once(':').ok_or_else(err)?;
        if !algo.eq_ignore_ascii_case("zstd") {
            return Err(err());
        }
        let level: i32 = level.trim().parse().map_err(|_| err())?;
        if !range.contains(&level) {
            return Err(err());
        }
        Ok(Compression::Zstd { level })
    }
}

/// [`decompress_stream`]'s input and output buffers, each. A quarter of a MiB: every reader of
/// archived WAL (wal-fetch and its prefetch worker's downloads, status, verify, the conflict
/// checks) holds one or more decoders at once within the `--memory-limit` budget, and zstd
/// produces at most a 128 KiB block per step anyway.
const DECODE_BUF: usize = 256 << 10;

/// Creates (or truncates) `path` for writing with mode 0600.
pub(crate) fn create_private(path: &Path) -> io::Result<File> {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    // An existing file keeps its mode on open; force 0600 either way.
    let perm = f.metadata()?.permissions();
    if perm.mode() & 0o777 != 0o600 {
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(f)
}

fn with_path(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

/// Compresses the file `src` into the new file `dst` (created with mode 0600, truncated if it
/// exists). `dst` is not fsynced: the store does that when it takes the file. The output is
/// [`compress_streaming`]'s: a size header, then zstd frames of [`FRAME`] bytes each, every frame
/// with its content checksum and content size. Returns the number of bytes written to `dst`.
pub fn compress_file(src: &Path, dst: &Path, c: Compression) -> io::Result<u64> {
    let mut input = File::open(src).map_err(|e| with_path(e, "cannot open", src))?;
    let len = input
        .metadata()
        .map_err(|e| with_path(e, "cannot stat", src))?
        .len();
    let mut output = create_private(dst).map_err(|e| with_path(e, "cannot create", dst))?;
    match c {
        // std::io::copy between files uses copy_file_range/sendfile on Linux.
        Compression::None => {
            io::copy(&mut input, &mut output).map_err(|e| with_path(e, "cannot copy into", dst))
        }
        Compression::Zstd { level } => compress_streaming(&mut input, len, &mut output, level)
            .map_err(|e| with_path(e, &format!("cannot compress {} into", src.display()), dst)),
    }
}

/// Compresses `data` into one zstd frame with content size and checksum.
pub fn compress_bulk(data: &[u8], level: i32) -> io::Result<Vec<u8>> {
    let mut c = zstd::bulk::Compressor::new(level)?;
    c.set_parameter(CParameter::ChecksumFlag(true))?;
    c.set_parameter(CParameter::ContentSizeFlag(true))?;
    c.compress(data)
}

/// Content bytes per zstd frame written by [`compress_streaming`].
///
/// Why frames of 1 MiB and not one frame per object: zstd's streaming encoder copies its input
/// into a window buffer and, once that wraps, compresses in its slower "extDict" mode; a frame
/// compressed in one call from a contiguous buffer skips both. On a 16 MiB segment of the benches'
/// WAL, 1 MiB frames took 0.81x the CPU of the streaming encoder (median of 11 alternating runs)
/// at the same ratio (the level-1 window is 512 KiB, so few matches cross a frame boundary), and
/// need 1 MiB in and about 1 MiB out, where one-shot compression of the whole segment needs the
/// segment in memory. See `proto-notes/archive-layout.md`, "Compression".
pub const FRAME: usize = 1 << 20;

/// The skippable-frame magic number of walagent's size header (zstd reserves
/// 0x184D2A50..=0x184D2A5F for skippable frames, which every zstd decoder skips).
const SIZE_HEADER_MAGIC: u32 = 0x184D_2A57;
/// The size header's payload: 8 bytes of tag, then the content length (u64, little-endian).
const SIZE_HEADER_TAG: &[u8; 8] = b"walagent";
/// Length of the whole size header: magic, payload length, payload.
const SIZE_HEADER_LEN: usize = 4 + 4 + 16;

/// The size header written before the frames: a zstd skippable frame holding the content length,
/// so that an object cut exactly at a frame boundary (which is itself valid zstd) is still found
/// short by [`decompress_stream`]. zstd's own tools skip it (`zstd -d` works as before).
fn size_header(len: u64) -> [u8; SIZE_HEADER_LEN] {
    let mut h = [0u8; SIZE_HEADER_LEN];
    h[..4].copy_from_slice(&SIZE_HEADER_MAGIC.to_le_bytes());
    h[4..8].copy_from_slice(&16u32.to_le_bytes());
    h[8..16].copy_from_slice(SIZE_HEADER_TAG);
    h[16..].copy_from_slice(&len.to_le_bytes());
    h
}

/// The content length in a size header at the start of `head` (at least [`SIZE_HEADER_LEN`]
/// bytes, or the whole object when it is shorter); `None` when the object does not start with one
/// (a single frame, as written before frames of [`FRAME`] bytes, or by `walagent backup`).
fn parse_size_header(head: &[u8]) -> Option<u64> {
    let h: &[u8; SIZE_HEADER_LEN] = head.get(..SIZE_HEADER_LEN)?.try_into().ok()?;
    if h[..4] != SIZE_HEADER_MAGIC.to_le_bytes()
        || h[4..8] != 16u32.to_le_bytes()
        || h[8..16] != SIZE_HEADER_TAG[..]
    {
        return None;
    }
    let mut n = [0u8; 8];
    n.copy_from_slice(&h[16..]);
    Some(u64::from_le_bytes(n))
}

/// Compresses `input` (whose length is `len`) into `output`; returns the bytes written.
///
/// Format: a size header (a zstd skippable frame holding `len`), then one zstd frame per
/// [`FRAME`] bytes of input (the last one shorter; one empty frame when `len` is 0), each
/// compressed in one call with content checksum and content size. Plain zstd: any decoder
/// concatenates the frames. `input` must yield exactly `len` bytes (an error otherwise: the file
/// changed while it was compressed).
pub fn compress_streaming(
    input: &mut impl Read,
    len: u64,
    output: &mut impl Write,
    level: i32,
) -> io::Result<u64> {
    let mut c = zstd::bulk::Compressor::new(level)?;
    c.set_parameter(CParameter::ChecksumFlag(true))?;
    c.set_parameter(CParameter::ContentSizeFlag(true))?;
    output.write_all(&size_header(len))?;
    let mut written = SIZE_HEADER_LEN as u64;
    let mut buf = vec![0u8; FRAME];
    let mut out = vec![0u8; zstd::zstd_safe::compress_bound(FRAME)];
    let mut total: u64 = 0;
    loop {
        let n = read_full(input, &mut buf)?;
        total += n as u64;
        if total > len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the source grew while it was compressed (more than {len} bytes)"),
            ));
        }
        if n == 0 && total > 0 {
            break;
        }
        let z = c.compress_to_buffer(&buf[..n], &mut out[..])?;
        output.write_all(&out[..z])?;
        written += z as u64;
        if n < FRAME {
            break;
        }
    }
    if total != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("the source shrank while it was compressed ({total} of {len} bytes)"),
        ));
    }
    Ok(written)
}

/// Reads until `buf` is full or the end of `input`; returns the bytes read (short only at EOF).
pub(crate) fn read_full(input: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match input.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// The error inside the `InvalidData` [`io::Error`] that [`decompress_stream`] returns for a
/// corrupt or truncated zstd stream. Use [`is_corrupt`] to recognise it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CorruptStream(pub String);

/// True when `e` is [`decompress_stream`]'s "the compressed data is bad" error (as opposed to an
/// I/O error of the reader or writer).
pub fn is_corrupt(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::InvalidData
        && e.get_ref().is_some_and(|inner| inner.is::<CorruptStream>())
}

fn corrupt(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, CorruptStream(msg))
}

/// Decompresses (or, when `compressed` is false, copies) `src` into `dst`, returning the number of
/// bytes written. Concatenated zstd frames are accepted (one frame per object, as written before
/// frames of [`FRAME`] bytes and by `walagent backup`, or [`compress_streaming`]'s size header and
/// frames). A corrupt zstd stream (bad data, checksum or content-size mismatch, a total that is
/// not its size header's) or a truncated/empty one is an `InvalidData` error for which
/// [`is_corrupt`] is true; read and write errors pass through unchanged.
pub fn decompress_stream(
    mut src: impl Read,
    mut dst: impl Write,
    compressed: bool,
) -> io::Result<u64> {
    if !compressed {
        return io::copy(&mut src, &mut dst);
    }
    let mut dec = RawDecoder::new()?;
    let mut inbuf = vec![0u8; DECODE_BUF];
    let mut outbuf = vec![0u8; DECODE_BUF];
    let mut total_in: u64 = 0;
    let mut total_out: u64 = 0;
    // The object's first bytes, to find a size header (see `size_header`).
    let mut head: Vec<u8> = Vec::with_capacity(SIZE_HEADER_LEN);
    // zstd's hint: 0 right after a frame ended, non-zero inside a frame (or before the first).
    let mut hint: usize = 1;
    loop {
        let n = match src.read(&mut inbuf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        total_in += n as u64;
        if head.len() < SIZE_HEADER_LEN {
            let take = (SIZE_HEADER_LEN - head.len()).min(n);
            head.extend_from_slice(&inbuf[..take]);
        }
        let mut input = InBuffer::around(&inbuf[..n]);
        loop {
            let mut output = OutBuffer::around(&mut outbuf[..]);
            let before = input.pos();
            let h = dec.run(&mut input, &mut output).map_err(|e| {
                corrupt(format!(
                    "corrupt zstd data near compressed byte {total_in}: {e}"
                ))
            })?;
            let produced = output.pos();
            // A call that made no progress reports the next frame's header size even when the
            // previous frame just ended; only calls that did something tell where we are.
            if input.pos() != before || produced > 0 {
                hint = h;
            }
            if produced > 0 {
                dst.write_all(&outbuf[..produced])?;
                total_out += produced as u64;
            }
            // Done with this chunk once all input is consumed and zstd had room to spare.
            if input.pos() == n && produced < outbuf.len() {
                break;
            }
        }
    }
    if total_in == 0 {
        return Err(corrupt(
            "zstd stream is empty (truncated object?)".to_string(),
        ));
    }
    if hint != 0 {
        return Err(corrupt(format!(
            "zstd stream is truncated: it ends inside a frame after {total_in} compressed bytes"
        )));
    }
    // Frames of `FRAME` bytes: an object cut at a frame boundary is valid zstd, only shorter.
    if let Some(declared) = parse_size_header(&head) {
        if declared != total_out {
            return Err(corrupt(format!(
                "zstd stream holds {total_out} bytes but its size header says {declared} (truncated object?)"
            )));
        }
    }
    Ok(total_out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn wal_like(len: usize) -> Vec<u8> {
        // Half pseudo-random, half zero, in 256-byte runs.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut v = vec![0u8; len];
        for (i, chunk) in v.chunks_mut(256).enumerate() {
            if i % 2 == 0 {
                for b in chunk {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *b = x as u8;
                }
            }
        }
        v
    }

    #[test]
    fn parse_and_display() {
        assert_eq!("none".parse::<Compression>().unwrap(), Compression::None);
        assert_eq!(
            "zstd".parse::<Compression>().unwrap(),
            Compression::Zstd { level: 1 }
        );
        assert_eq!(
            "zstd:3".parse::<Compression>().unwrap(),
            Compression::Zstd { level: 3 }
        );
        assert_eq!(
            "zstd:-5".parse::<Compression>().unwrap(),
            Compression::Zstd { level: -5 }
        );
        assert_eq!(
            "zstd:22".parse::<Compression>().unwrap(),
            Compression::Zstd { level: 22 }
        );
        for bad in [
            "", "gzip", "zstd:", "zstd:23", "zstd:x", "lz4:1", "zstd:1:2", "none:1",
        ] {
            let e = bad.parse::<Compression>().unwrap_err().to_string();
            assert!(e.contains("expected none, zstd"), "{bad}: {e}");
            assert!(!e.contains('\n'));
        }
        for c in [
            Compression::None,
            Compression::Zstd { level: 7 },
            Compression::Zstd { level: -1 },
        ] {
            assert_eq!(c.to_string().parse::<Compression>().unwrap(), c);
        }
        assert_eq!(Compression::None.suffix(), "");
        assert_eq!(Compression::DEFAULT.suffix(), ".zst");
        assert_eq!(Compression::default(), Compression::DEFAULT);
    }

    #[test]
    fn file_round_trip_all_modes() {
        let dir = tempfile::tempdir().unwrap();
        let data = wal_like(3 << 20);
        let src = dir.path().join("seg");
        std::fs::write(&src, &data).unwrap();
        for c in [
            Compression::None,
            Compression::Zstd { level: 1 },
            Compression::Zstd { level: -1 },
        ] {
            let dst = dir.path().join(format!("out{}", c.suffix()));
            std::fs::write(&dst, b"old content that must be truncated away............").unwrap();
            std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o644)).unwrap();
            let n = compress_file(&src, &dst, c).unwrap();
            let meta = std::fs::metadata(&dst).unwrap();
            assert_eq!(meta.len(), n);
            assert_eq!(meta.permissions().mode() & 0o777, 0o600);
            let mut out = Vec::new();
            let m =
                decompress_stream(File::open(&dst).unwrap(), &mut out, c.is_compressed()).unwrap();
            assert_eq!(m, data.len() as u64);
            assert!(out == data);
            if c.is_compressed() {
                assert!(n < data.len() as u64 * 6 / 10, "ratio {n}");
                let bytes = std::fs::read(&dst).unwrap();
                assert_eq!(parse_size_header(&bytes), Some(data.len() as u64));
                assert_eq!(frame_sizes(&bytes), vec![FRAME as u64; 3]);
            }
        }
    }

    #[test]
    fn streaming_path_matches_bulk() {
        let data = wal_like(1 << 20);
        let mut out = Vec::new();
        let n = compress_streaming(&mut &data[..], data.len() as u64, &mut out, 1).unwrap();
        assert_eq!(n, out.len() as u64);
        assert_eq!(frame_sizes(&out), vec![data.len() as u64]);
        let mut back = Vec::new();
        decompress_stream(&out[..], &mut back, true).unwrap();
        assert!(back == data);
        // A source that is not the pledged length (file changed while compressing) is an error.
        assert!(compress_streaming(&mut &data[..1000], 2000, &mut Vec::new(), 1).is_err());
        assert!(compress_streaming(&mut &data[..3000], 2000, &mut Vec::new(), 1).is_err());
    }

    /// The content sizes of the zstd frames after the size header (each frame must declare one).
    fn frame_sizes(z: &[u8]) -> Vec<u64> {
        assert!(parse_size_header(z).is_some(), "no size header");
        let mut rest = &z[SIZE_HEADER_LEN..];
        let mut sizes = Vec::new();
        while !rest.is_empty() {
            let n = zstd::zstd_safe::find_frame_compressed_size(rest).unwrap();
            let size = zstd::zstd_safe::get_frame_content_size(&rest[..n]).unwrap();
            sizes.push(size.expect("every frame records its content size"));
            rest = &rest[n..];
        }
        sizes
    }

    /// Offsets (in the compressed bytes) where a frame ends, the size header's end included.
    fn frame_ends(z: &[u8]) -> Vec<usize> {
        let mut ends = vec![SIZE_HEADER_LEN];
        let mut at = SIZE_HEADER_LEN;
        while at < z.len() {
            at += zstd::zstd_safe::find_frame_compressed_size(&z[at..]).unwrap();
            ends.push(at);
        }
        ends
    }

    /// A reader that hands out at most `step` bytes per call.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
    }
    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.step.min(buf.len()).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    #[test]
    fn frames_of_one_mib_round_trip_with_any_decoder() {
        for len in [0, 1, 1000, FRAME - 1, FRAME, FRAME + 1, 3 * FRAME + 5] {
            let data = wal_like(len);
            let mut z = Vec::new();
            let n = compress_streaming(&mut &data[..], len as u64, &mut z, 1).unwrap();
            assert_eq!(n, z.len() as u64);
            assert_eq!(parse_size_header(&z), Some(len as u64), "{len}");
            let want: Vec<u64> = if len == 0 {
                vec![0]
            } else {
                data.chunks(FRAME).map(|c| c.len() as u64).collect()
            };
            assert_eq!(frame_sizes(&z), want, "{len}");
            // walagent's decoder, also when the object arrives in tiny pieces.
            for step in [1, 7, 64 << 10, usize::MAX] {
                let mut back = Vec::new();
                let got = decompress_stream(Trickle { data: &z, step }, &mut back, true).unwrap();
                assert_eq!(got, len as u64, "{len} step {step}");
                assert!(back == data, "{len} step {step}");
            }
            // Any zstd decoder (the zstd tool uses the same library): the header is skipped.
            assert!(zstd::stream::decode_all(&z[..]).unwrap() == data, "{len}");
        }
    }

    #[test]
    fn an_object_cut_at_a_frame_boundary_is_corrupt() {
        let data = wal_like(3 * FRAME + 5);
        let mut z = Vec::new();
        compress_streaming(&mut &data[..], data.len() as u64, &mut z, 1).unwrap();
        let ends = frame_ends(&z);
        assert_eq!(ends.len(), 5);
        // Every cut short of the end, at a frame boundary (valid zstd, only shorter) or inside
        // the header or a frame, is corrupt; the whole object is not.
        let mut cuts: Vec<usize> = ends[..ends.len() - 1].to_vec();
        cuts.extend([
            1,
            4,
            8,
            SIZE_HEADER_LEN - 1,
            SIZE_HEADER_LEN + 3,
            z.len() - 1,
        ]);
        for cut in cuts {
            let e = decompress_stream(&z[..cut], io::sink(), true).unwrap_err();
            assert!(is_corrupt(&e), "cut {cut}: {e}");
        }
        let e = decompress_stream(&z[..ends[2]], io::sink(), true).unwrap_err();
        assert!(e.to_string().contains("size header says"), "{e}");
        // A frame appended to a whole object: the total no longer matches the header.
        let mut longer = z.clone();
        longer.extend_from_slice(&compress_bulk(b"more", 1).unwrap());
        let e = decompress_stream(&longer[..], io::sink(), true).unwrap_err();
        assert!(is_corrupt(&e), "{e}");
        // A size header that lies is corrupt either way.
        let mut lie = z.clone();
        lie[16] ^= 1;
        let e = decompress_stream(&lie[..], io::sink(), true).unwrap_err();
        assert!(is_corrupt(&e), "{e}");
        assert_eq!(
            decompress_stream(&z[..], io::sink(), true).unwrap(),
            data.len() as u64
        );
    }

    #[test]
    fn the_old_single_frame_objects_still_read() {
        // Written before frames of FRAME bytes (and by `walagent backup`): one frame, no header.
        let data = wal_like(2 * FRAME + 3);
        let z = compress_bulk(&data, 1).unwrap();
        assert_eq!(parse_size_header(&z), None);
        let mut back = Vec::new();
        decompress_stream(&z[..], &mut back, true).unwrap();
        assert!(back == data);
    }

    #[test]
    fn corrupt_and_truncated_are_invalid_data() {
        let data = wal_like(1 << 20);
        let z = compress_bulk(&data, 1).unwrap();

        let mut flipped = z.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0x55;
        let e = decompress_stream(&flipped[..], io::sink(), true).unwrap_err();
        assert!(is_corrupt(&e), "{e}");
        assert!(e.to_string().contains("corrupt zstd data"), "{e}");

        // Checksum is the last 4 bytes: flipping it must fail too.
        let mut bad_sum = z.clone();
        let last = bad_sum.len() - 1;
        bad_sum[last] ^= 1;
        let e = decompress_stream(&bad_sum[..], io::sink(), true).unwrap_err();
        assert!(is_corrupt(&e), "{e}");

        let e = decompress_stream(&z[..z.len() - 10], io::sink(), true).unwrap_err();
        assert!(is_corrupt(&e), "{e}");
        assert!(e.to_string().contains("truncated"), "{e}");

        let e = decompress_stream(&[][..], io::sink(), true).unwrap_err();
        assert!(is_corrupt(&e) && e.to_string().contains("empty"), "{e}");

        let e = decompress_stream(&b"definitely not zstd"[..], io::sink(), true).unwrap_err();
        assert!(is_corrupt(&e), "{e}");

        // Concatenated frames decode to the concatenation.
        let mut two = z.clone();
        two.extend_from_slice(&z);
        let mut out = Vec::new();
        assert_eq!(
            decompress_stream(&two[..], &mut out, true).unwrap(),
            2 * data.len() as u64
        );
    }

    #[test]
    fn reader_errors_are_not_corruption() {
        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::new(io::ErrorKind::InvalidData, "disk said no"))
            }
        }
        let e = decompress_stream(Failing, io::sink(), true).unwrap_err();
        assert!(!is_corrupt(&e));
    }
}
