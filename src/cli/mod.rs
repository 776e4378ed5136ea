//! Command-line interface: argument parsing here, every default resolved in [`resolve`].
//! `main.rs` dispatches.

mod resolve;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::archive::Compression;
use crate::receive::AckMode;
use crate::wal::Lsn;

pub use resolve::{
    archive_identity, default_archive_workers, default_compress_threads, partial_interval,
    show_progress, ArgError,
};

// Examples are broken with shell continuations and kept under 72 columns, so that clap never
// wraps them (a wrapped `--create-slot` at the start of a line reads like a command); see the
// `help_examples_do_not_wrap` test.
const TOP_EXAMPLES: &str = "Examples:
  walagent stream --source 'postgresql://replicator@db1/postgres' \\
      --archive /backup/wal --slot walagent --create-slot
  walagent wal-fetch --archive /backup/wal %f %p    (as restore_command)
  walagent wal-push --archive /backup/wal %p        (as archive_command)
  walagent backup --source 'host=db1 user=replicator' \\
      --archive /backup/wal --checkpoint fast
  walagent restore --archive /backup/wal --pgdata /srv/pg/restored \\
      --target-time '2026-11-22 09:15:00+01'

Logging: set WALAGENT_LOG (e.g. WALAGENT_LOG=debug); logs go to stderr.";

const BACKUP_EXAMPLE: &str = "Example:
  walagent backup --source 'postgresql://replicator@db1/postgres' \\
      --archive s3://backups/db1 --checkpoint fast";

const SEED_EXAMPLE: &str = "Example:
  walagent seed-standby --source 'postgresql://replicator@db1/postgres' \\
      --pgdata /var/lib/postgresql/15/main --slot standby1 --create-slot";

const RESTORE_EXAMPLES: &str = "Examples:
  walagent restore --archive s3://backups/db1 \\
      --pgdata /var/lib/postgresql/15/main \\
      --target-time '2026-11-22 09:15:00+01'
  walagent restore --archive /backup/db1 --pgdata /srv/pg/restored \\
      --target-name before_upgrade --target-action pause
  walagent restore --standby --archive s3://backups/db1 \\
      --pgdata /var/lib/postgresql/15/main \\
      --source 'host=db1 user=replicator' --slot standby1 --create-slot";

#[derive(Debug, Parser)]
#[command(
    name = "walagent",
    version,
    about = "Stream PostgreSQL WAL into a durable, verified, compressed archive; take base backups and restore to a point in time",
    long_about = "walagent connects to PostgreSQL as a physical replication client, checks every WAL page \
                  and record checksum as it arrives, and archives complete segments zstd-compressed. The flush \
                  position it reports to the server only covers WAL that is durable in the archive, so a \
                  replication slot keeps anything not yet safe on the server.",
    after_help = TOP_EXAMPLES
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// Log lines on stderr: text, or json (one object a line: timestamp, level, cluster, message,
    /// fields), for log collectors [default: text; for `run`, the config file's log_format].
    #[arg(long, global = true, env = "WALAGENT_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    /// As the config file spells it (`service::config`'s `log_format`).
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// The exit code for a command line clap could not parse (or `--help`/`--version`, which exit
/// 0). `wal-fetch` runs as PostgreSQL's restore_command, where exit 1..=125 means "not in the
/// archive" and lets recovery end early and promote: a wal-fetch whose arguments do not parse (a
/// typo in restore_command, a binary of another version) exits 126 instead, which stops recovery
/// ([`crate::restore::wal_fetch::EXIT_FATAL`]). Every other command keeps clap's 2.
pub fn parse_error_exit_code<I, S>(args: I, err: &clap::Error) -> u8
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let code = err.exit_code();
    if code == 0 {
        return 0;
    }
    // The subcommand is the first argument after the program name that is not an option (nor
    // the value of `--log-format`, the one global option that takes one).
    let mut after_option = false;
    let sub = args.into_iter().skip(1).find(|a| {
        let a = a.as_ref().to_string_lossy();
        let value = std::mem::replace(&mut after_option, a == "--log-format");
        !value && !a.starts_with('-')
    });
    if sub.is_some_and(|a| a.as_ref() == "wal-fetch") {
        crate::restore::wal_fetch::EXIT_FATAL as u8
    } else {
        u8::try_from(code).unwrap_or(2)
    }
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
            (a corrupt object, an unreachable archive, a bad --env-file), which makes PostgreSQL stop \
            recovery instead of ending it early. A command line that does not parse exits 2 before \
            anything runs, which PostgreSQL also reads as \"not found\": run restore_command once by hand."
    )]
    WalFetch(WalFetchArgs),
    /// Take a base backup over the replication protocol into the archive.
    #[command(
        long_about = "Take a base backup over the replication protocol (BASE_BACKUP) into the archive.\n\n\
            The tar stream goes zstd-compressed straight into the archive (a multipart upload on S3), \
            without staging the backup on local disk. The WAL from the backup's start to its end comes with it, \
            is checked, and is stored as ordinary archived segments, so the backup is restorable by itself \
            even when no `walagent stream` is running. The server's backup_manifest is kept. The backup \
            becomes usable (listed by `walagent backups`, chosen by `walagent restore`) only when everything \
            is stored; an interrupted backup never is. Needs PostgreSQL 15 or later and a role with REPLICATION.",
        after_help = BACKUP_EXAMPLE
    )]
    Backup(BackupArgs),
    /// List the base backups in the archive.
    Backups(BackupsArgs),
    /// Create a standby's data directory from a primary, like pg_basebackup -R.
    #[command(
        long_about = "Create a standby's data directory from a running server, like `pg_basebackup -Fp -X fetch -R`.\n\n\
            Files are written as they arrive, with the WAL the standby needs to start (kept on the server by a \
            temporary slot while the copy runs). Then standby.signal and primary_conninfo (and primary_slot_name \
            with --slot) are written to postgresql.auto.conf, so `pg_ctl start -D DIR` starts a streaming \
            standby. As after `pg_basebackup -R`, primary_conninfo has no application_name unless \
            --application-name gives one. \
            DIR must be empty or absent. Run as root, the files take the owner of DIR (or of its parent when \
            DIR is created), so the postgres OS user can start it.",
        after_help = SEED_EXAMPLE
    )]
    SeedStandby(SeedStandbyArgs),
    /// Restore a cluster to a point in time from the archive's backups and WAL.
    #[command(
        long_about = "Restore a cluster from the archive into an empty data directory, set up to replay WAL to \
            a target (point-in-time recovery).\n\n\
            walagent picks the newest complete backup that can reach the target (or --backup ID) and, before \
            writing anything, proves that the archive holds an unbroken WAL chain from that backup's start \
            along the timeline path of the .history files up to the target; if not, it names the missing \
            segment, or says that the target lies outside the archive, and leaves DIR untouched. Then it \
            downloads and unpacks the backup (checking every file against the backup manifest), writes \
            recovery.signal and, in postgresql.auto.conf, restore_command (walagent wal-fetch on the same \
            archive), the recovery target, recovery_target_action and recovery_target_timeline. \
            `pg_ctl start -D DIR` then replays exactly to the target.\n\n\
            Without a target, recovery replays to the end of the archive.\n\n\
            With --standby, a standby is seeded from the archive instead of loading the primary (like \
            pgBackRest's --type=standby): the same backup choice and checks as without a target, but \
            standby.signal, recovery_target_timeline = 'latest' and no target, so the server replays the \
            archive and stays in recovery. With --source it then streams from that primary (written as \
            primary_conninfo; the password only if --source holds one, as pg_basebackup -R does), using \
            --slot as primary_slot_name (created with --create-slot, which refuses an existing slot). \
            --source is checked first: its system identifier must be the archive's. Without --source \
            the standby only follows the archive through restore_command.",
        after_help = RESTORE_EXAMPLES
    )]
    Restore(RestoreArgs),
    /// Show what the archive can restore: timelines, gaps, backups, the recoverable window.
    #[command(long_about = "Show what the archive can restore (read-only).\n\n\
            Per timeline: first and last segment, begin and end LSN, gaps, a trailing .partial; the \
            timeline history; every backup (complete or incomplete) and how far its recovery reaches; the \
            recoverable window along the latest timeline (earliest and latest point, as LSN and time); and \
            problems, each naming the segment, history file or backup. Exit status: 0 when the newest \
            backup reaches the newest archived WAL and no problem limits recovery, 1 when a problem \
            limits recovery, 2 when the archive cannot be read.")]
    Status(StatusArgs),
    /// Delete backups beyond a retention policy, and the WAL no kept backup needs.
    #[command(
        long_about = "Delete backups beyond a retention policy, and the WAL no kept backup needs.\n\n\
            --retain-full N keeps the newest N complete backups; --retain-days D keeps those that \
            finished within the last D days. The newest complete backup and the newest one that can be \
            restored are always kept, and so is every WAL segment from the oldest kept backup's start \
            on (all timelines) and every history file. Incomplete backups are deleted only when older \
            than the oldest kept one. Everything is planned before the first delete, and deletes run in \
            an order that leaves a consistent archive: an interrupted run is finished by running it again."
    )]
    Expire(ExpireArgs),
    /// Check every object of the archive: checksums, WAL records and continuity, backups.
    #[command(
        long_about = "Check every object of the archive, reading it: stored checksums, decompression, every WAL \
            page header and record CRC, that each segment continues the one before it on its timeline (xl_prev \
            across segment boundaries, timeline switches where the history files say), segments missing between \
            a timeline's first and last, each complete backup's files against its backup_manifest, and that the \
            WAL each backup needs is there.\n\n\
            Incremental: the watermark object verify.json in the archive records what verified clean, so the \
            next run reads only new or changed objects (size or ETag / modification time); --full reads \
            everything. verify.json is the only object verify writes.\n\n\
            Exit status: 0 when no problem was found, 1 when objects are damaged or missing (each is named), \
            2 when the archive could not be read."
    )]
    Verify(VerifyArgs),
    /// Store one WAL file PostgreSQL hands archive_command (%p) in the archive.
    #[command(
        long_about = "Store one file that PostgreSQL hands archive_command in the archive: a WAL segment, a \
            timeline .history file, a <segment>.partial (the old timeline's last segment after a promotion) \
            or a backup history file.\n\n\
            Meant as PostgreSQL's archive_command:\n  \
            archive_command = 'walagent wal-push --archive /backup/wal %p'\n\
            The file is checked first (WAL pages and records, and the archive's walagent.json: the same \
            cluster and segment size) and stored as walagent stream stores it (zstd, never overwriting). \
            WAL that is already archived with the same content (by a running walagent stream, or an \
            earlier push) is success; different content under the name is refused and nothing is \
            overwritten. Exit status: 0 once the file is durable in the archive (PostgreSQL may then \
            remove it), 1 on any failure (PostgreSQL logs the error line, keeps the file and retries)."
    )]
    WalPush(WalPushArgs),
    /// Run as a service: every cluster of a config file (streams, scheduled backups, retention).
    #[command(
        long_about = "Run as a service: stream, back up and expire every cluster declared in a TOML config file, \
            each independently (one failing server or bucket never stalls the others).\n\n\
            SIGHUP reloads the file (clusters added, removed or changed are started, stopped or restarted; \
            the others go on; a file that does not load is refused and the running one kept). SIGTERM or \
            SIGINT stops every cluster within its stop_timeout (a second signal at once) and exits 0 when \
            all stopped cleanly. Under systemd (Type=notify) it sends READY=1, STATUS=, WATCHDOG=1 and \
            STOPPING=1. See README \"Running as a service\" and examples/walagent.toml.",
        after_help = RUN_EXAMPLE
    )]
    Run(RunArgs),
    /// Check a config file of `walagent run`.
    #[command(subcommand)]
    Config(ConfigCommand),
}

const RUN_EXAMPLE: &str = "Example:
  walagent config check /etc/walagent.toml
  walagent run --config /etc/walagent.toml";

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The TOML config file.
    #[arg(long, env = "WALAGENT_CONFIG", value_name = "FILE")]
    pub config: PathBuf,

    /// Serve metrics and health checks on IP:PORT (overrides the file's metrics_addr; an
    /// empty value turns them off).
    #[arg(long, env = "WALAGENT_METRICS_ADDR", value_name = "IP:PORT")]
    pub metrics_addr: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Parse and resolve a config file and print the effective settings, secrets masked
    /// (exit 0 when it is usable, 2 when not). WALAGENT_METRICS_ADDR and WALAGENT_LOG_FORMAT
    /// apply as for `walagent run`.
    Check(ConfigCheckArgs),
}

#[derive(Debug, Args)]
pub struct ConfigCheckArgs {
    /// The TOML config file.
    #[arg(env = "WALAGENT_CONFIG", value_name = "FILE")]
    pub file: PathBuf,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Archive: a directory or s3://BUCKET/PREFIX.
    #[arg(long, env = "WALAGENT_ARCHIVE", value_name = "PATH|s3://BUCKET/PREFIX")]
    pub archive: String,

    /// JSON for scripts: {problems: [{object, problem}], counts, ...}.
    #[arg(long)]
    pub json: bool,

    /// Read every object again, ignoring what earlier runs verified.
    #[arg(long)]
    pub full: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Archive: a directory or s3://BUCKET/PREFIX.
    #[arg(long, env = "WALAGENT_ARCHIVE", value_name = "PATH|s3://BUCKET/PREFIX")]
    pub archive: String,

    /// JSON for scripts (documented in proto-notes/status-and-expire.md).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("policy").required(true).args(["retain_full", "retain_days"])))]
pub struct ExpireArgs {
    /// Archive: a directory or s3://BUCKET/PREFIX.
    #[arg(long, env = "WALAGENT_ARCHIVE", value_name = "PATH|s3://BUCKET/PREFIX")]
    pub archive: String,

    /// Keep the newest N complete backups (N >= 1).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..), conflicts_with = "retain_days")]
    pub retain_full: Option<u32>,

    /// Keep the backups that finished within the last D days (and always the newest one).
    #[arg(long, value_name = "D", conflicts_with = "retain_full")]
    pub retain_days: Option<u32>,

    /// Print what would be deleted; delete nothing.
    #[arg(long)]
    pub dry_run: bool,

    /// JSON for scripts instead of text.
    #[arg(long)]
    pub json: bool,
}

impl ExpireArgs {
    /// The policy (clap guarantees exactly one is given).
    pub fn policy(&self) -> crate::lifecycle::expire::RetentionPolicy {
        use crate::lifecycle::expire::RetentionPolicy;
        match (self.retain_full, self.retain_days) {
            (Some(n), _) => RetentionPolicy::Full(n),
            (None, Some(d)) => RetentionPolicy::Days(d),
            (None, None) => RetentionPolicy::Full(u32::MAX),
        }
    }
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("recovery_target").multiple(false).args(["target_time", "target_lsn", "target_xid", "target_name", "target"])))]
pub struct RestoreArgs {
    /// Archive: a directory or s3://BUCKET/PREFIX.
    #[arg(long, env = "WALAGENT_ARCHIVE", value_name = "PATH|s3://BUCKET/PREFIX")]
    pub archive: String,

    /// Data directory to create: absent (created, mode 0700) or empty.
    #[arg(long, value_name = "DIR")]
    pub pgdata: PathBuf,

    /// Peak memory (resident set) to plan the pipelines for, e.g. 32MB (the default) or 128MB:
    /// sets S3 part sizes, parts in flight, buffers and zstd workers (at least 26MB).
    #[arg(long, value_name = "SIZE", default_value = "32MB", value_parser = parse_memory_limit)]
    pub memory_limit: u64,

    /// Stop at this time, with a zone: RFC 3339 (2026-11-22T09:15:00Z) or PostgreSQL's form
    /// (2026-11-22 10:15:00+01).
    #[arg(long, value_name = "TS")]
    pub target_time: Option<String>,

    /// Stop at this WAL position (e.g. 0/5000060).
    #[arg(long, value_name = "LSN")]
    pub target_lsn: Option<String>,

    /// Stop at the commit of this transaction id.
    #[arg(long, value_name = "XID")]
    pub target_xid: Option<String>,

    /// Stop at this restore point (pg_create_restore_point).
    #[arg(long, value_name = "NAME")]
    pub target_name: Option<String>,

    /// `immediate`: stop as soon as the backup is consistent.
    #[arg(long, value_name = "immediate")]
    pub target: Option<String>,

    /// Stop just before the target instead of just after it (recovery_target_inclusive = off).
    #[arg(long)]
    pub exclusive: bool,

    /// Timeline to recover along: latest (default), current (the backup's), or a number.
    #[arg(long, value_name = "latest|current|N", default_value = "latest")]
    pub target_timeline: String,

    /// What the server does at the target: promote (default; open for writes), pause, shutdown.
    #[arg(long, value_name = "ACTION", default_value = "promote")]
    pub target_action: String,

    /// Seed a standby instead of recovering to a target: standby.signal, timeline latest, no
    /// target; it replays the archive, then streams from --source (without --source it only
    /// follows the archive). Not with --target-*, --exclusive.
    #[arg(long, conflicts_with_all = ["target_time", "target_lsn", "target_xid", "target_name", "target", "exclusive", "target_timeline", "target_action"])]
    pub standby: bool,

    /// With --standby: the primary to stream from once the archive is replayed (libpq URI or
    /// key=value), written as primary_conninfo; its system identifier must be the archive's.
    #[arg(long, value_name = "CONNINFO", requires = "standby")]
    pub source: Option<String>,

    /// With --source: the physical replication slot the standby streams from (written as
    /// primary_slot_name); it must exist unless --create-slot. Never the slot of `walagent
    /// stream` (the standby would advance it past WAL not yet archived).
    #[arg(long, value_name = "NAME", value_parser = parse_slot_name, requires = "source")]
    pub slot: Option<String>,

    /// Create --slot on the primary (physical; it keeps WAL from the primary's last checkpoint
    /// on); refused when it exists already.
    #[arg(long, requires = "slot")]
    pub create_slot: bool,

    /// Restore this backup (an id from `walagent backups`) instead of choosing one.
    #[arg(long, value_name = "ID")]
    pub backup: Option<String>,

    /// Put the tablespace at OLDDIR into NEWDIR instead (repeatable).
    #[arg(long = "tablespace-mapping", short = 'T', value_name = "OLDDIR=NEWDIR", value_parser = parse_mapping)]
    pub tablespace_mapping: Vec<(PathBuf, PathBuf)>,

    /// walagent binary written into restore_command (default: this one); it must be executable
    /// by the OS user that runs PostgreSQL.
    #[arg(long, value_name = "PATH")]
    pub walagent_path: Option<PathBuf>,

    /// Check and print the plan, write nothing.
    #[arg(long)]
    pub dry_run: bool,

    /// Download and unpack up to N of the backup's tar objects (base.tar, one per tablespace)
    /// at once (default: the number of CPUs, at most the number of objects).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub jobs: Option<u16>,

    /// No progress bar, even on a terminal.
    #[arg(long)]
    pub no_progress: bool,
}

/// Checkpoint mode at the start of a base backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CheckpointMode {
    /// Spread the checkpoint over checkpoint_completion_target (gentle; the backup starts later).
    Spread,
    /// An immediate checkpoint (starts at once; a burst of I/O on the server).
    Fast,
}

#[derive(Debug, Args)]
pub struct BackupArgs {
    /// Server to back up (libpq URI or key=value; PG* variables and ~/.pgpass fill the gaps).
    #[arg(
        long,
        env = "WALAGENT_SOURCE",
        value_name = "CONNINFO",
        hide_env_values = true
    )]
    pub source: String,

    /// Archive: a directory (created when missing) or s3://BUCKET/PREFIX (AWS settings as for stream).
    #[arg(long, env = "WALAGENT_ARCHIVE", value_name = "PATH|s3://BUCKET/PREFIX")]
    pub archive: String,

    /// Checkpoint at the start: spread (default, like pg_basebackup) or fast.
    #[arg(long, value_enum, default_value = "spread")]
    pub checkpoint: CheckpointMode,

    /// Most bytes per second the server sends (e.g. 50MB); 32kB to 1GB.
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub max_rate: Option<u32>,

    /// Compression of the stored tar files: zstd, zstd:LEVEL or none.
    #[arg(long, value_name = "METHOD", default_value = "zstd:1")]
    pub compress: Compression,

    /// zstd worker threads (default: number of CPUs, at most 8, and as many as --memory-limit
    /// allows).
    #[arg(long, value_name = "N")]
    pub compress_threads: Option<u32>,

    /// Peak memory (resident set) to plan the pipelines for, e.g. 32MB (the default) or 128MB:
    /// sets S3 part sizes, parts in flight, buffers and zstd workers (at least 26MB).
    #[arg(long, value_name = "SIZE", default_value = "32MB", value_parser = parse_memory_limit)]
    pub memory_limit: u64,

    /// Backup label recorded by the server (default: walagent <id>).
    #[arg(long, value_name = "TEXT")]
    pub label: Option<String>,

    /// Print the new backup's metadata as JSON on stdout instead of a summary line.
    #[arg(long)]
    pub json: bool,

    /// No progress bar, even on a terminal.
    #[arg(long)]
    pub no_progress: bool,
}

#[derive(Debug, Args)]
pub struct BackupsArgs {
    /// Archive: a directory or s3://BUCKET/PREFIX.
    #[arg(long, env = "WALAGENT_ARCHIVE", value_name = "PATH|s3://BUCKET/PREFIX")]
    pub archive: String,

    /// JSON for scripts (an array, oldest first) instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct SeedStandbyArgs {
    /// The primary (libpq URI or key=value); also written as the standby's primary_conninfo.
    #[arg(
        long,
        env = "WALAGENT_SOURCE",
        value_name = "CONNINFO",
        hide_env_values = true
    )]
    pub source: String,

    /// The standby's data directory: absent (created, mode 0700) or empty.
    #[arg(long, value_name = "DIR")]
    pub pgdata: PathBuf,

    /// Physical replication slot for the standby (written as primary_slot_name).
    #[arg(long, value_name = "NAME", value_parser = parse_slot_name)]
    pub slot: Option<String>,

    /// Create the slot (with reserved WAL) before copying.
    #[arg(long, requires = "slot")]
    pub create_slot: bool,

    /// Checkpoint at the start: spread (default) or fast.
    #[arg(long, value_enum, default_value = "spread")]
    pub checkpoint: CheckpointMode,

    /// Most bytes per second the server sends (e.g. 50MB); 32kB to 1GB.
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub max_rate: Option<u32>,

    /// Put the tablespace at OLDDIR into NEWDIR instead (repeatable), as pg_basebackup -T does.
    #[arg(long = "tablespace-mapping", short = 'T', value_name = "OLDDIR=NEWDIR", value_parser = parse_mapping)]
    pub tablespace_mapping: Vec<(PathBuf, PathBuf)>,

    /// application_name for the standby's primary_conninfo (how pg_stat_replication and
    /// synchronous_standby_names know it). Default: none, as pg_basebackup -R writes, so the
    /// standby uses its cluster_name, else "walreceiver". The one in --source names only
    /// walagent's own connection.
    #[arg(long, value_name = "NAME", value_parser = parse_application_name)]
    pub application_name: Option<String>,

    /// No progress bar, even on a terminal.
    #[arg(long)]
    pub no_progress: bool,
}

/// `--application-name`: non-empty, printable ASCII (PostgreSQL replaces anything else in
/// application_name with `?`), under NAMEDATALEN.
fn parse_application_name(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() >= 64 || !s.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(format!(
            "--application-name {s:?}: use 1 to 63 printable ASCII characters"
        ));
    }
    Ok(s.to_string())
}

/// `--max-rate`: bytes per second as a size, returned in kB/s as MAX_RATE wants (32..=1048576).
pub fn parse_rate(s: &str) -> Result<u32, String> {
    let bytes = parse_size(s)?;
    let kb = bytes / 1024;
    if !(32..=1_048_576).contains(&kb) {
        return Err(format!("--max-rate {s:?} is outside 32kB..1GB per second"));
    }
    Ok(kb as u32)
}

/// `OLDDIR=NEWDIR`, both absolute (`\=` for a `=` inside a path, as pg_basebackup -T).
fn parse_mapping(s: &str) -> Result<(PathBuf, PathBuf), String> {
    crate::datadir::extract::parse_tablespace_mapping(s).map_err(|e| e.to_string())
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

    /// Compression of archived segments: zstd, zstd:LEVEL (e.g. zstd:3) or none. With a local
    /// archive, segments received while archiving is behind (a catch-up) are stored raw at once
    /// and compressed to LEVEL in the background once archiving is idle.
    #[arg(long, value_name = "METHOD", default_value = "zstd:1")]
    pub compress: Compression,

    /// Compress every segment before it counts as archived, also while catching up (a local
    /// archive then never holds raw segments from this agent).
    /// Env WALAGENT_COMPRESS_INLINE: 0/false/no/off or empty: off, anything else: on.
    #[arg(long, env = "WALAGENT_COMPRESS_INLINE", value_parser = clap::builder::FalseyValueParser::new())]
    pub compress_inline: bool,

    /// Seconds between status updates to the server.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub status_interval: u64,

    /// Spool directory for segments being received and waiting for the archive (default:
    /// <archive>/spool for a local archive, ./walagent-spool/<bucket>_<prefix>-<hash> for S3).
    /// A spool belongs to one cluster and one archive (walagent-spool.json) and to one running
    /// agent at a time (walagent.lock).
    #[arg(long, value_name = "DIR")]
    pub spool: Option<PathBuf>,

    /// Most complete segments' bytes kept in the spool while the archive is slow or away; when
    /// full, walagent stops reading and the replication slot holds the WAL on the server.
    #[arg(long, value_name = "SIZE", default_value = "1GB", value_parser = parse_size)]
    pub spool_max_size: u64,

    /// Peak memory (resident set) to plan the pipelines for, e.g. 32MB (the default) or 128MB:
    /// sets S3 part sizes, parts in flight, buffers and zstd workers (at least 26MB).
    #[arg(long, value_name = "SIZE", default_value = "32MB", value_parser = parse_memory_limit)]
    pub memory_limit: u64,

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

    /// Seconds a stop (SIGTERM/SIGINT) may take to archive what was received; then, or at a
    /// second signal, walagent exits 1 naming what stays in the spool (archived by the next start;
    /// the slot keeps it on the server). Below Kubernetes' default 30 s grace period.
    #[arg(long, value_name = "SECS", default_value_t = 20)]
    pub stop_timeout: u64,

    /// Serve Prometheus metrics at /metrics and health checks at /healthz and /readyz on this
    /// address (IP:PORT, e.g. 127.0.0.1:9790, or 0.0.0.0:9790 in a container); the cluster is
    /// labelled cluster="default".
    #[arg(long, env = "WALAGENT_METRICS_ADDR", value_name = "IP:PORT")]
    pub metrics_addr: Option<std::net::SocketAddr>,
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
    /// next calls are served from a local cache by a rename (default: 8; 0 = off). Only plain
    /// segment names use it, never history or .partial.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(0..=256))]
    pub prefetch: Option<u32>,

    /// The prefetch cache (default: <DEST's directory>/.walagent-prefetch, i.e. inside pg_wal,
    /// on DEST's filesystem so that serving is a rename).
    #[arg(long, value_name = "DIR")]
    pub prefetch_dir: Option<PathBuf>,

    /// Prefetch downloads at once (default: N, at most 4, and as many as --memory-limit allows).
    #[arg(long, value_name = "J", hide = true, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub prefetch_jobs: Option<u32>,

    /// Peak memory (resident set) to plan the pipelines for, e.g. 32MB (the default) or 128MB:
    /// sets the prefetch downloads at once and their buffers (at least 26MB). Applies to the
    /// call and to the background prefetch worker it starts.
    #[arg(long, value_name = "SIZE", default_value = "32MB", value_parser = parse_memory_limit)]
    pub memory_limit: u64,

    /// Read AWS_* and WALAGENT_* settings from this file (KEY=VALUE lines; written 0600 by
    /// `walagent restore` so that restore_command works for the server's OS user).
    #[arg(long, value_name = "FILE")]
    pub env_file: Option<PathBuf>,

    /// Internal: run as the detached background prefetch worker (WALFILE: the segment just
    /// served; DEST is not touched).
    #[arg(long, hide = true)]
    pub prefetch_worker: bool,
}

#[derive(Debug, Args)]
pub struct WalPushArgs {
    /// Archive: a directory (created when missing) or s3://BUCKET/PREFIX (same settings as for
    /// stream).
    #[arg(long, env = "WALAGENT_ARCHIVE", value_name = "PATH|s3://BUCKET/PREFIX")]
    pub archive: String,

    /// Compression of newly stored segments: zstd, zstd:LEVEL or none (as for stream).
    #[arg(long, value_name = "METHOD", default_value = "zstd:1")]
    pub compress: Compression,

    /// Read AWS_* and WALAGENT_* settings from this file (KEY=VALUE lines, as for wal-fetch),
    /// for a server whose OS user has none of them.
    #[arg(long, value_name = "FILE")]
    pub env_file: Option<PathBuf>,

    /// The file (%p), e.g. pg_wal/000000010000000000000003, relative to the data directory.
    #[arg(value_name = "PATH")]
    pub path: PathBuf,
}

/// Sizes like `1GB`, `512MB`, `64kB` or a number of bytes: the config file's rule
/// (`service::config::parse_size`), so a flag and a key take the same values.
pub fn parse_size(s: &str) -> Result<u64, String> {
    crate::service::config::parse_size(s)
}

/// `--memory-limit`: a size ([`parse_size`]) of at least the smallest workable budget.
pub fn parse_memory_limit(s: &str) -> Result<u64, String> {
    let n = parse_size(s)?;
    let min = crate::archive::memory::MIN_LIMIT;
    if n < min {
        return Err(format!(
            "memory limit {s:?} is below the smallest workable budget, {}MB",
            min >> 20
        ));
    }
    Ok(n)
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
    fn wal_fetch_argument_errors_stop_recovery() {
        use clap::Parser;
        let code = |args: &[&str]| {
            let argv: Vec<&str> = std::iter::once("walagent")
                .chain(args.iter().copied())
                .collect();
            match Cli::try_parse_from(&argv) {
                Ok(_) => None,
                Err(e) => Some(parse_error_exit_code(&argv, &e)),
            }
        };
        // restore_command with a typo or a missing argument: 126, not a "not found" 2.
        assert_eq!(
            code(&["wal-fetch", "--archive", "/a", "--bogus", "x", "y"]),
            Some(126)
        );
        assert_eq!(code(&["wal-fetch", "000000010000000000000001"]), Some(126));
        assert_eq!(
            code(&[
                "wal-fetch",
                "--prefetch",
                "many",
                "--archive",
                "/a",
                "x",
                "y"
            ]),
            Some(126)
        );
        // The global --log-format's value is not taken for the subcommand.
        assert_eq!(code(&["--log-format", "json", "wal-fetch", "x"]), Some(126));
        assert_eq!(code(&["--log-format", "yaml", "stream"]), Some(2));
        // Other commands keep clap's usage error; help is success.
        assert_eq!(code(&["stream", "--bogus"]), Some(2));
        assert_eq!(code(&["no-such-command"]), Some(2));
        assert_eq!(code(&["wal-fetch", "--help"]), Some(0));
        assert_eq!(code(&["--version"]), Some(0));
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

    /// At 80 and 100 columns clap prints every example exactly as written: no example is
    /// re-wrapped, so no option lands at the start of a line where it reads like a command.
    #[test]
    fn help_examples_do_not_wrap() {
        for width in [80, 100] {
            let mut top = Cli::command().term_width(width);
            let text = top.render_long_help().to_string();
            assert!(text.contains(TOP_EXAMPLES), "{width}:\n{text}");
            for (name, examples) in [
                ("backup", BACKUP_EXAMPLE),
                ("seed-standby", SEED_EXAMPLE),
                ("restore", RESTORE_EXAMPLES),
            ] {
                let mut sub = Cli::command().term_width(width);
                let sub = sub.find_subcommand_mut(name).unwrap();
                let text = sub.render_long_help().to_string();
                assert!(text.contains(examples), "{name} at {width}:\n{text}");
            }
        }
        for examples in [TOP_EXAMPLES, BACKUP_EXAMPLE, SEED_EXAMPLE, RESTORE_EXAMPLES] {
            for line in examples.lines() {
                assert!(line.len() <= 76, "{line}");
                let t = line.trim_start();
                assert!(
                    line.is_empty()
                        || !line.starts_with(' ')
                        || t.starts_with("walagent ")
                        || (line.starts_with("      --") && t.starts_with("--")),
                    "{line}"
                );
            }
        }
    }

    #[test]
    fn seed_standby_application_name() {
        let parse = |extra: &[&str]| {
            let mut args = vec![
                "walagent",
                "seed-standby",
                "--source",
                "x",
                "--pgdata",
                "/d",
            ];
            args.extend_from_slice(extra);
            Cli::try_parse_from(args).map(|c| match c.command {
                Command::SeedStandby(a) => a.application_name,
                _ => panic!(),
            })
        };
        assert_eq!(parse(&[]).unwrap(), None);
        assert_eq!(
            parse(&["--application-name", "standby 2"])
                .unwrap()
                .as_deref(),
            Some("standby 2")
        );
        for bad in ["", "caf\u{e9}", "a\tb", &"x".repeat(64)] {
            assert!(parse(&["--application-name", bad]).is_err(), "{bad:?}");
        }
    }
}
