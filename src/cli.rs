//! Command-line interface: argument parsing only. `main.rs` dispatches.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::archive::Compression;
use crate::receive::AckMode;
use crate::wal::Lsn;

#[derive(Debug, Parser)]
#[command(
    name = "walagent",
    version,
    about = "Stream PostgreSQL WAL into a durable, verified, compressed archive",
    long_about = "walagent connects to PostgreSQL as a physical replication client, checks every WAL page \
                  and record checksum as it arrives, and archives complete segments zstd-compressed. The flush \
                  position it reports to the server only covers WAL that is durable in the archive, so a \
                  replication slot keeps anything not yet safe on the server.",
    after_help = "Examples:\n  \
        walagent stream --source 'postgresql://replicator@db1/postgres' --archive /backup/wal --slot walagent --create-slot\n  \
        walagent wal-fetch --archive /backup/wal %f %p      (as restore_command)\n\n\
        Logging: set WALAGENT_LOG (e.g. WALAGENT_LOG=debug); logs go to stderr."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Stream WAL from a server into the archive, like pg_receivewal, until stopped.
    #[command(
        long_about = "Stream WAL from a server into the archive, like pg_receivewal, until stopped.\n\n\
            WAL is written to <segment>.partial in the spool directory; each complete segment is verified, \
            compressed and stored in the archive, and only then reported to the server as flushed. After a \
            crash or restart, streaming resumes exactly where the archive and spool end (then at the slot's \
            restart_lsn, then at the server's current position). Timeline switches (a promoted standby) are \
            followed and their .history files archived. SIGTERM or SIGINT: flush, report, exit 0."
    )]
    Stream(StreamArgs),
    /// Copy one WAL segment or history file out of the archive (for restore_command).
    #[command(
        long_about = "Copy one WAL segment or history file out of the archive, decompressed, to DEST.\n\n\
            Meant as PostgreSQL's restore_command:\n  \
            restore_command = 'walagent wal-fetch --archive /backup/wal %f %p'\n\
            DEST appears atomically (never half written). Exit status: 0 when copied, 1 when the archive does \
            not have the file (PostgreSQL then tries elsewhere or ends recovery), 126 on any other error \
            (a corrupt object, an unreachable archive), which makes PostgreSQL stop recovery instead of \
            ending it early."
    )]
    WalFetch(WalFetchArgs),
}

#[derive(Debug, Args)]
pub struct StreamArgs {
    /// Server to stream from: a libpq URI (postgresql://user:pw@host:port/db?sslmode=...) or key=value
    /// string. PGHOST, PGPORT, PGUSER, PGPASSWORD, PGSSLMODE... and ~/.pgpass fill the gaps.
    #[arg(
        long,
        env = "WALAGENT_SOURCE",
        value_name = "CONNINFO",
        hide_env_values = true
    )]
    pub source: String,

    /// Archive: a directory (created when missing) or s3://BUCKET/PREFIX. S3 settings come from
    /// the AWS variables and profiles (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION,
    /// AWS_ENDPOINT_URL, AWS_PROFILE), plus AWS_S3_FORCE_PATH_STYLE=true for S3-compatible
    /// servers and WALAGENT_S3_CHECKSUM=when_required for servers that reject SDK checksums.
    #[arg(long, env = "WALAGENT_ARCHIVE", value_name = "PATH|s3://BUCKET/PREFIX")]
    pub archive: String,

    /// Physical replication slot that keeps WAL on the server until it is archived.
    #[arg(long, value_name = "NAME", value_parser = parse_slot_name)]
    pub slot: String,

    /// Create the slot (with reserved WAL) if it does not exist yet.
    #[arg(long)]
    pub create_slot: bool,

    /// Stop once WAL up to this position (e.g. 0/5000000) is archived or spooled durably, then exit 0.
    #[arg(long, value_name = "LSN")]
    pub endpos: Option<Lsn>,

    /// Exit on a lost connection instead of reconnecting with backoff.
    #[arg(long)]
    pub no_loop: bool,

    /// Fsync and report the flush position after every message, so walagent can serve as a
    /// synchronous standby (list its application_name in synchronous_standby_names).
    #[arg(long)]
    pub synchronous: bool,

    /// Compression of archived segments: zstd, zstd:LEVEL (e.g. zstd:3) or none.
    #[arg(long, value_name = "METHOD", default_value = "zstd:1")]
    pub compress: Compression,

    /// Seconds between status updates to the server.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub status_interval: u64,

    /// Spool directory for segments being received and waiting for the archive
    /// (default: <archive>/spool for a local archive, ./walagent-spool for S3).
    #[arg(long, value_name = "DIR")]
    pub spool: Option<PathBuf>,

    /// Most complete segments' bytes kept in the spool while the archive is slow or away; when
    /// full, walagent stops reading and the replication slot holds the WAL on the server.
    #[arg(long, value_name = "SIZE", default_value = "1GB", value_parser = parse_size)]
    pub spool_max_size: u64,

    /// What the flush position reported to the server means: `archived` (durable in the
    /// archive) or `fsync` (fsynced in the local spool; faster to advance, weaker).
    /// --synchronous implies fsync.
    #[arg(long, value_name = "MODE", default_value = "archived")]
    pub ack: AckMode,

    /// Seconds between uploads of the unfinished segment as <segment>.partial, bounding what a
    /// lost host loses (default: 10 for S3, 0 = only when stopping, for a local archive).
    #[arg(long, value_name = "SECS")]
    pub partial_interval: Option<u64>,

    /// Segments compressed and stored at once (default: number of CPUs, at most 4).
    #[arg(long, value_name = "N", hide = true)]
    pub archive_workers: Option<usize>,
}

#[derive(Debug, Args)]
pub struct WalFetchArgs {
    /// Archive: a directory or s3://BUCKET/PREFIX (same settings as for stream).
    #[arg(long, env = "WALAGENT_ARCHIVE", value_name = "PATH|s3://BUCKET/PREFIX")]
    pub archive: String,

    /// Serve the newest partial segment under the full name when the complete one is missing
    /// (for the last segment of a timeline).
    #[arg(long)]
    pub allow_partial: bool,

    /// File PostgreSQL asks for (%f), e.g. 000000010000000000000003 or 00000002.history.
    #[arg(value_name = "WALFILE")]
    pub walfile: String,

    /// Where to put it (%p).
    #[arg(value_name = "DEST")]
    pub dest: PathBuf,

    /// Segments to download ahead of WALFILE, in parallel and in the background, so that the
    /// next calls are served from a local cache by a rename (default: 8 for s3:// archives,
    /// 0 = off for a directory). Only plain segment names use it, never history or .partial.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(0..=256))]
    pub prefetch: Option<u32>,

    /// The prefetch cache (default: <DEST's directory>/.walagent-prefetch, i.e. inside pg_wal,
    /// on DEST's filesystem so that serving is a rename).
    #[arg(long, value_name = "DIR")]
    pub prefetch_dir: Option<PathBuf>,

    /// Prefetch downloads at once (default: N, at most 4).
    #[arg(long, value_name = "J", hide = true, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub prefetch_jobs: Option<u32>,

    /// Internal: run as the detached background prefetch worker (WALFILE: the segment just
    /// served; DEST is not touched).
    #[arg(long, hide = true)]
    pub prefetch_worker: bool,
}

/// Sizes like `1GB`, `512MB`, `64kB` or a number of bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let n: u64 = t[..split]
        .parse()
        .map_err(|_| format!("invalid size {s:?}: use a number with kB, MB or GB"))?;
    let mult = match t[split..].trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1 << 10,
        "m" | "mb" => 1 << 20,
        "g" | "gb" => 1 << 30,
        "t" | "tb" => 1 << 40,
        _ => {
            return Err(format!(
                "invalid size {s:?}: use a number with kB, MB or GB"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

fn parse_slot_name(s: &str) -> Result<String, String> {
    if s.is_empty()
        || s.len() > 63
        || !s
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(
            "slot names use only lower-case letters, digits and underscores, at most 63 characters"
                .into(),
        );
    }
    Ok(s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1GB"), Ok(1 << 30));
        assert_eq!(parse_size("512MB"), Ok(512 << 20));
        assert_eq!(parse_size("64kB"), Ok(64 << 10));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert!(parse_size("1.5GB").is_err());
        assert!(parse_size("GB").is_err());
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn stream_arguments() {
        let cli = Cli::try_parse_from([
            "walagent",
            "stream",
            "--source",
            "host=x",
            "--archive",
            "/a",
            "--slot",
            "s1",
            "--endpos",
            "0/5000000",
            "--compress",
            "none",
            "--no-loop",
        ])
        .unwrap();
        let Command::Stream(a) = cli.command else {
            panic!()
        };
        assert_eq!(a.endpos, Some(Lsn(0x500_0000)));
        assert_eq!(a.compress, Compression::None);
        assert!(a.no_loop && !a.synchronous);
        assert!(Cli::try_parse_from([
            "walagent",
            "stream",
            "--source",
            "x",
            "--archive",
            "/a",
            "--slot",
            "Bad-Name"
        ])
        .is_err());
    }
}
