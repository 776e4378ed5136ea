#!/usr/bin/env python3
"""Writes the seed inputs of every fuzz target into fuzz/corpus-work/<target>/.

Seeds are small real inputs: WAL pages from tests/fixtures/wal, history files, manifests cut
down from tests/fixtures/backup (checksum recomputed), tar archives made with Python's tarfile
in the formats the parser supports, backend message streams, connection strings and recovery
targets. The control bytes each entry point expects (see fuzz/entries.rs) come first.

Usage (from the repository root): python3 fuzz/make_seeds.py
"""

import hashlib
import io
import json
import os
import struct
import subprocess
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "fuzz", "corpus-work")
WAL = os.path.join(ROOT, "tests", "fixtures", "wal")
BACKUP = os.path.join(ROOT, "tests", "fixtures", "backup")


def write(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def segment(name):
    return subprocess.run(
        ["zstd", "-dc", os.path.join(WAL, name + ".zst")], check=True, capture_output=True
    ).stdout


# --- wal_verify: flags, timeline-1, segno u16 LE, seed u32 LE, then WAL from the segment start.
def wal_seeds():
    cases = [
        ("000000010000000000000009", 1, 0x09, 24 << 10, 0),
        ("00000001000000000000000A", 1, 0x0A, 32 << 10, 0),
        ("00000002000000000000000B", 2, 0x0B, 16 << 10, 0),
        ("00000003000000000000000C", 3, 0x0C, 24 << 10, 2),
        ("00000003000000000000000F", 3, 0x0F, 16 << 10, 2),
    ]
    for name, tli, segno, length, flags in cases:
        wal = segment(name)[:length]
        head = bytes([flags, tli - 1]) + struct.pack("<H", segno) + struct.pack("<I", 0x9E3779B9)
        write("wal_verify", name, head + wal)
    # Programs for build_wal (flag bit 2): op 0 = record(len), 1 = switch, 2 = aborted(len),
    # 3 = timeline + 1, 4 = bit flip(offset, xor).
    def rec(n):
        return b"\0" + struct.pack("<H", n)
    seed = struct.pack("<I", 0x2545F491)
    programs = {
        "built_records": rec(100) + rec(9000) + rec(0) + rec(65535) + rec(8100) * 4 + rec(30),
        "built_switch": rec(500) * 3 + b"\1" + rec(200) * 2 + b"\1",
        "built_segments": rec(65535) * 18 + rec(1000),
        "built_aborted": rec(8000) + b"\2" + struct.pack("<H", 20000) + rec(100) + b"\3" + rec(10),
        "built_flip": rec(300) * 5 + b"\4" + struct.pack("<I", 1000) + b"\x10",
    }
    for name, prog in programs.items():
        head = bytes([4, 0]) + struct.pack("<H", 0x10) + seed
        write("wal_verify", name, head + prog)


# --- codec: 8 seed bytes, then backend frames.
def frame(tag, body):
    return tag + struct.pack(">I", len(body) + 4) + body


def cstr(s):
    return s.encode() + b"\0"


def codec_seeds():
    seed = struct.pack("<Q", 0x0123456789ABCDEF)
    startup = (
        frame(b"R", struct.pack(">I", 10) + cstr("SCRAM-SHA-256-PLUS") + cstr("SCRAM-SHA-256") + b"\0")
        + frame(b"R", struct.pack(">I", 11) + b"r=abc,s=c2FsdA==,i=4096")
        + frame(b"R", struct.pack(">I", 12) + b"v=c2lnbmF0dXJl")
        + frame(b"R", struct.pack(">I", 0))
        + frame(b"S", cstr("server_version") + cstr("15.18"))
        + frame(b"S", cstr("integer_datetimes") + cstr("on"))
        + frame(b"K", struct.pack(">ii", 4242, -7))
        + frame(b"Z", b"I")
    )
    write("codec", "startup", seed + startup)
    write("codec", "md5", seed + frame(b"R", struct.pack(">I", 5) + b"salt") + frame(b"R", struct.pack(">I", 3)))
    row = (
        frame(b"T", struct.pack(">H", 2) + cstr("systemid") + b"\0" * 18 + cstr("timeline") + b"\0" * 18)
        + frame(b"D", struct.pack(">H", 2) + struct.pack(">i", 19) + b"7710843067740758272" + struct.pack(">i", -1))
        + frame(b"C", cstr("IDENTIFY_SYSTEM"))
        + frame(b"I", b"")
        + frame(b"Z", b"I")
    )
    write("codec", "query", seed + row)
    xlog = b"w" + struct.pack(">QQq", 0x900000, 0x900100, 123456789) + bytes(range(64))
    keep = b"k" + struct.pack(">Qq", 0x900100, 123456790) + b"\x01"
    copy = (
        frame(b"W", b"\0" + struct.pack(">H", 0))
        + frame(b"d", xlog)
        + frame(b"d", keep)
        + frame(b"c", b"")
        + frame(b"T", struct.pack(">H", 2) + cstr("next_tli") + b"\0" * 18 + cstr("next_tli_startpos") + b"\0" * 18)
        + frame(b"D", struct.pack(">H", 2) + struct.pack(">i", 1) + b"2" + struct.pack(">i", 9) + b"0/B0000D8")
        + frame(b"C", cstr("START_STREAMING"))
        + frame(b"H", b"\0" + struct.pack(">H", 0))
        + frame(b"G", b"\0" + struct.pack(">H", 0))
    )
    write("codec", "copyboth", seed + copy)
    err = frame(
        b"E",
        b"SFATAL\0VFATAL\0C28P01\0Mpassword authentication failed for user \"x\"\0Dsome detail\0Hsome hint\0\0",
    ) + frame(b"N", b"SWARNING\0C01000\0Mnotice text\0\0") + frame(b"v", b"\0\0\0\0") + frame(b"A", b"")
    write("codec", "errors", seed + err)
    write("codec", "keepalive_only", seed + keep)


# --- tarstream: flags + 7 seed bytes, then the archive.
def tar_bytes(fmt, members, trailer=True):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for info, data in members:
            t.addfile(info, io.BytesIO(data) if data is not None else None)
    raw = buf.getvalue()
    if not trailer:
        # Cut the end-of-archive marker (and tarfile's record padding).
        end = len(raw)
        while end >= 512 and raw[end - 512 : end] == b"\0" * 512:
            end -= 512
        raw = raw[:end]
    return raw


def member(name, data=b"", kind=tarfile.REGTYPE, link="", pax=None, mode=0o600):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = 1700000000
    info.linkname = link
    if kind == tarfile.REGTYPE:
        info.size = len(data)
    if pax:
        info.pax_headers = pax
    return info, data if kind == tarfile.REGTYPE else None


def tar_seeds():
    head = bytes([0]) + bytes.fromhex("0123456789abcd")
    pgv = open(os.path.join(BACKUP, "files", "PG_VERSION"), "rb").read()
    fmap = open(os.path.join(BACKUP, "files", "global", "pg_filenode.map"), "rb").read()
    basic = [
        member("./", kind=tarfile.DIRTYPE, mode=0o700),
        member("PG_VERSION", pgv),
        member("global", kind=tarfile.DIRTYPE, mode=0o700),
        member("global/pg_filenode.map", fmap),
        member("pg_tblspc/16384", kind=tarfile.SYMTYPE, link="/srv/ts1"),
        member("backup_label", b"START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n"),
        member("pg_wal", kind=tarfile.DIRTYPE),
    ]
    write("tarstream", "ustar", head + tar_bytes(tarfile.USTAR_FORMAT, basic))
    long_name = "base/1/" + "x" * 150
    gnu = [
        member(long_name, b"long name content"),
        member("hard", kind=tarfile.LNKTYPE, link=long_name),
        member("link", kind=tarfile.SYMTYPE, link="/" + "t" * 120),
    ]
    write("tarstream", "gnu", head + tar_bytes(tarfile.GNU_FORMAT, gnu))
    pax = [
        member("base/1/" + "é" * 60, b"pax path", pax={"comment": "ignored"}),
        member("f", b"0123456789", pax={"mtime": "1700000000.5"}),
    ]
    write("tarstream", "pax", head + tar_bytes(tarfile.PAX_FORMAT, pax))
    # A pax global header before the entries.
    g = tarfile.TarInfo("global-header")
    g.type = tarfile.XGLTYPE
    g.pax_headers = {"mtime": "1600000000"}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        t.addfile(g)
        info, data = member("after-global", b"abc")
        t.addfile(info, io.BytesIO(data))
    write("tarstream", "pax_global", head + buf.getvalue())
    write("tarstream", "no_trailer", bytes([1]) + head[1:] + tar_bytes(tarfile.USTAR_FORMAT, basic[:2], trailer=False))
    write("tarstream", "empty", head + b"\0" * 1024)
    fifo = [member("fifo", kind=tarfile.FIFOTYPE), member("chr", kind=tarfile.CHRTYPE)]
    write("tarstream", "other_kinds", head + tar_bytes(tarfile.USTAR_FORMAT, fifo))


# --- manifest: real manifests cut to a few files, checksum recomputed.
def rechecksum(text):
    key = '"Manifest-Checksum"'
    pos = text.rindex(key)
    digest = hashlib.sha256(text[:pos].encode()).hexdigest()
    return text[:pos] + key + ': "' + digest + '"}\n'


def small_manifest(path, nfiles, version=1, sysid=None):
    lines = open(path).read().split("\n")
    files = [l for l in lines if l.startswith('{ "Path"')][:nfiles]
    wal = [l for l in lines if l.startswith('{ "Timeline"')]
    head = '{ "PostgreSQL-Backup-Manifest-Version": %d,\n' % version
    if sysid is not None:
        head += '"System-Identifier": %d,\n' % sysid
    files[-1] = files[-1].rstrip(",")
    text = head + '"Files": [\n' + "\n".join(files) + '\n],\n"WAL-Ranges": [\n' + "\n".join(wal) + '\n],\n"Manifest-Checksum": ""}\n'
    return rechecksum(text)


def manifest_seeds():
    crc = os.path.join(BACKUP, "backup_manifest.crc32c")
    sha = os.path.join(BACKUP, "backup_manifest.sha256")
    write("manifest", "crc32c_v1", small_manifest(crc, 4))
    write("manifest", "sha256_v1", small_manifest(sha, 3))
    write("manifest", "v2", small_manifest(crc, 2, version=2, sysid=7710843067740758272))
    enc = rechecksum(
        '{ "PostgreSQL-Backup-Manifest-Version": 1,\n"Files": [\n'
        '{ "Encoded-Path": "2f746d702fff", "Size": 0, "Last-Modified": "2026-11-22 06:06:05 GMT", "Checksum-Algorithm": "NONE" },\n'
        '{ "Path": "a", "Size": 3, "Last-Modified": "2026-11-22 06:06:05 GMT", "Checksum-Algorithm": "SHA512", "Checksum": "' + "ab" * 64 + '" }\n'
        '],\n"WAL-Ranges": [\n{ "Timeline": 1, "Start-LSN": "0/2000028", "End-LSN": "0/2000100" }\n],\n"Manifest-Checksum": ""}\n'
    )
    write("manifest", "encoded_path", enc)
    write("manifest", "algorithms", "CRC32C")


# --- conninfo: form byte, then the string.
def conninfo_seeds():
    strings = [
        "host=127.0.0.1 port=5432 user=replicator password=pw dbname=postgres sslmode=require",
        "host='127.0.0.1 password=Secret",
        r"password='a\'b' host=h application_name='my app' options='-c a=b'",
        r"password=\\ user=u",
        "password = Secret host=h",
        "host=h password",
        "PASSWORD=Secret",
        "host=a,/tmp port=1,2 connect_timeout=10 channel_binding=require sslrootcert=system",
        "postgresql://u:Secret@h:5433/db?sslmode=verify-full&application_name=x",
        "postgresql://u:Sec%72et%40@[::1]:5432,h2/db?password=x&ssl=true",
        "postgresql://u:Secret@[::1/db",
        "postgres://h/db?pass%77ord=Secret&&x",
        "postgresql://h?password=p@ss",
        "postgresql://u:pa/ss@h/db",
        "postgresql:///db?host=/var/run/postgresql",
        "host= password=Secret\x01 user=u",
        "requiressl=1 gssencmode=disable target_session_attrs=any",
    ]
    for i, s in enumerate(strings):
        write("conninfo", "s%02d" % i, bytes([i % 6]) + s.encode())


def history_seeds():
    for name in ["00000002.history", "00000003.history"]:
        write("history", name, open(os.path.join(WAL, name), "rb").read())
    write("history", "comments", "# comment\n1\t0/4000128\tno recovery target specified\n\n2 0/5000000 before 2026-11-22 10:15:00+00\r\n")
    write("history", "nonutf8", b"1\t0/1\t\xff\xfe reason\n")


def target_seeds():
    for i, s in enumerate([
        "2026-11-22 10:15:00+01",
        "2026-11-22T10:15:00.123456Z",
        "2026-11-22 10:15 UTC",
        "2026-11-22 10:15:00.5+05:30",
        "2026-11-22 10:15:00 GMT",
        "2026-11-22 10:15:00 +0100",
        "0/9000028",
        "FFFFFFFF/FFFFFFFF",
        "1234",
        "0x100000003",
        "immediate",
        "latest",
        "current",
        "0x2",
        "promote",
        "before-upgrade",
        "name with\nnewline",
    ]):
        write("target", "t%02d" % i, s)


if __name__ == "__main__":
    wal_seeds()
    codec_seeds()
    tar_seeds()
    manifest_seeds()
    conninfo_seeds()
    history_seeds()
    target_seeds()
    for t in sorted(os.listdir(OUT)):
        if not os.path.isdir(os.path.join(OUT, t)) or t.endswith(".min"):
            continue
        files = os.listdir(os.path.join(OUT, t))
        size = sum(os.path.getsize(os.path.join(OUT, t, f)) for f in files)
        print(f"{t}: {len(files)} seeds, {size} bytes")
