//! Every default the command line leaves open, resolved in one place and unit-tested: the
//! spool, the partial-upload interval and the archive identity (which depend on the archive
//! kind), worker counts (from the CPU count), the ack mode `--synchronous` forces, recovery
//! targets, the restore_command binary, the wal-fetch prefetch settings. `main.rs` only opens
//! the archive, calls these and dispatches.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::{BackupArgs, CheckpointMode, RestoreArgs, SeedStandbyArgs, StreamArgs, WalFetchArgs};
use crate::archive::memory::{self, MemoryPlan};
use crate::archive::{self, Store};
use crate::backup::seed::SeedOptions;
use crate::backup::take::BackupOptions;
use crate::protocol::conninfo::{ConnInfo, ConnInfoError};
use crate::receive::{self, AckMode, StreamOptions};
use crate::restore::fetch_cmd::FetchCommand;
use crate::restore::pitr::RestoreOptions;
use crate::restore::prefetch::PrefetchConfig;
use crate::restore::standby::{StandbyOptions, StandbySource};
use crate::restore::target::{RecoveryTarget, TargetError};
use crate::wal::lsn::ParseLsnError;

/// An argument that parsed as text but does not hold (exit status 2).
#[derive(Debug, thiserror::Error)]
pub enum ArgError {
    /// `--target-time`, `--target-xid`, `--target-name` or `--target`.
    #[error("{flag}: {source}")]
    Target {
        flag: &'static str,
        #[source]
        source: TargetError,
    },
    #[error("--target-lsn: {0}")]
    TargetLsn(#[source] ParseLsnError),
    #[error("--target-timeline: {0}")]
    TargetTimeline(#[source] TargetError),
    #[error("--target-action: {0}")]
    TargetAction(#[source] TargetError),
    #[error("cannot find the walagent binary for restore_command: {0}")]
    WalagentPath(#[source] std::io::Error),
    /// `restore --standby --source`; never quotes the string (it may hold a password).
    #[error("--source: {0}")]
    Source(#[source] ConnInfoError),
}

impl ArgError {
    pub fn hint(&self) -> Option<String> {
        match self {
            ArgError::WalagentPath(_) => Some("pass --walagent-path".into()),
            ArgError::Source(e) => e.hint(),
            _ => None,
        }
    }
}

use crate::receive::defaults::cpus;

/// `--archive-workers` default (see `receive::defaults`).
pub fn default_archive_workers(cpus: Option<usize>) -> usize {
    receive::defaults::archive_workers(cpus)
}

/// `--compress-threads` default (see `backup::defaults`).
pub fn default_compress_threads(cpus: Option<usize>) -> u32 {
    crate::backup::defaults::compress_threads(cpus)
}

/// `--partial-interval` in seconds (see `receive::defaults::partial_interval`; 0: only when
/// stopping).
pub fn partial_interval(secs: Option<u64>, remote: bool) -> Option<Duration> {
    receive::defaults::partial_interval(secs.map(Duration::from_secs), remote)
}

pub use crate::receive::defaults::archive_identity;

/// A progress bar only for a person watching: stderr is a terminal and CI is not set.
pub fn show_progress(disabled: bool) -> bool {
    !disabled
        && std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("CI").is_none()
}

impl StreamArgs {
    /// The receiver's options for the opened archive `store`. Warns (once, in the log) about
    /// segments left in the old default spool of an S3 archive.
    pub fn resolve(self, conninfo: ConnInfo, store: Arc<dyn Store>) -> StreamOptions {
        if self.spool.is_none() && archive::is_remote(&self.archive) {
            receive::spool::warn_legacy_default(Path::new("walagent-spool"));
        }
        memory::install(MemoryPlan::for_limit(self.memory_limit));
        self.resolve_with(conninfo, store, cpus())
    }

    /// [`StreamArgs::resolve`] for a given CPU count, without the log warning.
    pub fn resolve_with(
        self,
        conninfo: ConnInfo,
        store: Arc<dyn Store>,
        cpus: Option<usize>,
    ) -> StreamOptions {
        let remote = archive::is_remote(&self.archive);
        let spool_dir = self
            .spool
            .unwrap_or_else(|| receive::spool::default_dir(&self.archive, remote));
        let archive_identity = archive_identity(store.as_ref());
        StreamOptions {
            conninfo,
            store,
            spool_dir,
            slot: self.slot,
            create_slot: self.create_slot,
            endpos: self.endpos,
            no_loop: self.no_loop,
            synchronous: self.synchronous,
            compression: self.compress,
            compress_inline: self.compress_inline,
            status_interval: Duration::from_secs(self.status_interval.max(1)),
            // A synchronous standby's flush must mean on disk now, not once archived.
            ack: if self.synchronous {
                AckMode::Fsync
            } else {
                self.ack
            },
            partial_interval: partial_interval(self.partial_interval, remote),
            spool_max_bytes: self.spool_max_size,
            archive_workers: self
                .archive_workers
                .unwrap_or_else(|| default_archive_workers(cpus)),
            archive_identity,
            stop_timeout: Duration::from_secs(self.stop_timeout),
            stats: Default::default(),
        }
    }
}

impl BackupArgs {
    /// The backup's options; installs the memory plan of `--memory-limit` for the pipeline.
    pub fn resolve(self, conninfo: ConnInfo) -> BackupOptions {
        let plan =
            MemoryPlan::for_archive(self.memory_limit, memory::ArchiveKind::of(&self.archive));
        memory::install(plan);
        self.resolve_with(conninfo, &plan, cpus())
    }

    /// [`BackupArgs::resolve`] for a given plan and CPU count, installing nothing.
    pub fn resolve_with(
        self,
        conninfo: ConnInfo,
        plan: &MemoryPlan,
        cpus: Option<usize>,
    ) -> BackupOptions {
        BackupOptions {
            conninfo,
            checkpoint_fast: self.checkpoint == CheckpointMode::Fast,
            max_rate_kbps: self.max_rate,
            compression: self.compress,
            compress_threads: backup_compress_threads(self.compress_threads, plan, cpus),
            label: self.label,
            progress: show_progress(self.no_progress),
        }
    }
}

pub use crate::backup::defaults::backup_compress_threads;

impl SeedStandbyArgs {
    pub fn resolve(&self, conninfo: ConnInfo) -> SeedOptions {
        SeedOptions {
            conninfo,
            pgdata: self.pgdata.clone(),
            slot: self.slot.clone(),
            create_slot: self.create_slot,
            checkpoint_fast: self.checkpoint == CheckpointMode::Fast,
            max_rate_kbps: self.max_rate,
            tablespace_mapping: self.tablespace_mapping.clone(),
            progress: show_progress(self.no_progress),
            application_name: self.application_name.clone(),
        }
    }
}

impl RestoreArgs {
    /// The recovery target named on the command line (at most one; clap enforces that), or the
    /// end of the archive.
    pub fn recovery_target(&self) -> Result<RecoveryTarget, ArgError> {
        let target = |flag, source| ArgError::Target { flag, source };
        if let Some(t) = &self.target_time {
            return t
                .parse()
                .map(RecoveryTarget::Time)
                .map_err(|e| target("--target-time", e));
        }
        if let Some(l) = &self.target_lsn {
            return l
                .parse()
                .map(RecoveryTarget::Lsn)
                .map_err(ArgError::TargetLsn);
        }
        if let Some(x) = &self.target_xid {
            return RecoveryTarget::parse_xid(x).map_err(|e| target("--target-xid", e));
        }
        if let Some(n) = &self.target_name {
            return RecoveryTarget::parse_name(n).map_err(|e| target("--target-name", e));
        }
        if let Some(t) = &self.target {
            return RecoveryTarget::parse_target(t).map_err(|e| target("--target", e));
        }
        Ok(RecoveryTarget::End)
    }

    /// The restore's options; the walagent binary for restore_command defaults to this one.
    pub fn resolve(&self) -> Result<RestoreOptions, ArgError> {
        // Restore's pipeline (GET body -> zstd -> tar -> files) takes its queues and its
        // number of jobs from the plan (`restore::pitr`).
        memory::install(MemoryPlan::for_limit(self.memory_limit));
        self.resolve_with(std::env::current_exe)
    }

    /// `--standby`'s options: `--source` parsed (PG* variables and ~/.pgpass fill the gaps, as
    /// for every connection), and whether the password is written in the string itself (only
    /// then does it go into primary_conninfo: PGPASSWORD belongs to the shell running the
    /// restore, ~/.pgpass is never copied).
    pub fn standby_options(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Option<StandbyOptions>, ArgError> {
        if !self.standby {
            return Ok(None);
        }
        let source = match &self.source {
            None => None,
            Some(s) => {
                let conninfo = ConnInfo::parse_with_env(s, env).map_err(ArgError::Source)?;
                let without_env_password =
                    ConnInfo::parse_with_env(s, &|k| (k != "PGPASSWORD").then(|| env(k)).flatten())
                        .map_err(ArgError::Source)?;
                Some(StandbySource {
                    conninfo,
                    password_in_source: without_env_password
                        .password
                        .is_some_and(|p| !p.is_empty()),
                    slot: self.slot.clone(),
                    create_slot: self.create_slot,
                })
            }
        };
        Ok(Some(StandbyOptions { source }))
    }

    /// [`RestoreArgs::resolve`] with another way to find the running binary.
    pub fn resolve_with(
        &self,
        current_exe: impl FnOnce() -> std::io::Result<std::path::PathBuf>,
    ) -> Result<RestoreOptions, ArgError> {
        let standby = self.standby_options(&|k| std::env::var(k).ok())?;
        let target = self.recovery_target()?;
        let timeline = self
            .target_timeline
            .parse()
            .map_err(ArgError::TargetTimeline)?;
        let action = self.target_action.parse().map_err(ArgError::TargetAction)?;
        let walagent_path = match &self.walagent_path {
            Some(p) => p.clone(),
            None => current_exe().map_err(ArgError::WalagentPath)?,
        };
        Ok(RestoreOptions {
            archive: self.archive.clone(),
            pgdata: self.pgdata.clone(),
            target,
            inclusive: !self.exclusive,
            timeline,
            action,
            backup: self.backup.clone(),
            tablespace_mapping: self.tablespace_mapping.clone(),
            walagent_path,
            dry_run: self.dry_run,
            progress: show_progress(self.no_progress),
            jobs: self.jobs.map(usize::from),
            standby,
        })
    }
}

impl WalFetchArgs {
    /// The call's settings; installs the memory plan of `--memory-limit` (the downloads' batch
    /// sizes follow it, in the call and in the worker it starts).
    pub fn resolve(self) -> FetchCommand {
        memory::install(MemoryPlan::for_limit(self.memory_limit));
        self.into_command()
    }

    /// [`WalFetchArgs::resolve`] without installing the plan.
    pub fn into_command(self) -> FetchCommand {
        let prefetch = PrefetchConfig::new(
            &self.archive,
            &self.dest,
            self.prefetch,
            self.prefetch_dir,
            self.prefetch_jobs,
            self.memory_limit,
        );
        FetchCommand {
            archive: self.archive,
            walfile: self.walfile,
            dest: self.dest,
            allow_partial: self.allow_partial,
            prefetch,
            worker: self.prefetch_worker,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::s3::{S3Location, S3Options, S3Settings, S3Store};
    use crate::archive::LocalStore;
    use crate::cli::{Cli, Command};
    use crate::restore::target::{TargetAction, TargetTimeline};
    use clap::Parser;

    fn stream_args(archive: &str, extra: &[&str]) -> StreamArgs {
        let mut argv = vec![
            "walagent",
            "stream",
            "--source",
            "host=db1 user=r",
            "--archive",
            archive,
            "--slot",
            "s1",
        ];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Stream(a) => a,
            c => panic!("{c:?}"),
        }
    }

    fn restore_args(extra: &[&str]) -> RestoreArgs {
        let mut argv = vec!["walagent", "restore", "--archive", "/a", "--pgdata", "/p"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Restore(a) => a,
            c => panic!("{c:?}"),
        }
    }

    fn conninfo() -> ConnInfo {
        ConnInfo::parse("host=db1 user=r").unwrap()
    }

    fn backup_args(extra: &[&str]) -> BackupArgs {
        let mut argv = vec![
            "walagent",
            "backup",
            "--source",
            "host=db1",
            "--archive",
            "/a",
        ];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Backup(a) => a,
            c => panic!("{c:?}"),
        }
    }

    #[test]
    fn memory_limit_defaults_and_bounds() {
        const MIB: u64 = 1 << 20;
        assert_eq!(stream_args("/a", &[]).memory_limit, 32 * MIB);
        assert_eq!(backup_args(&[]).memory_limit, 32 * MIB);
        assert_eq!(restore_args(&[]).memory_limit, 32 * MIB);
        assert_eq!(
            backup_args(&["--memory-limit", "128MB"]).memory_limit,
            128 * MIB
        );
        assert_eq!(
            restore_args(&["--memory-limit", "26MB"]).memory_limit,
            26 * MIB
        );
        for bad in ["25MB", "0", "lots"] {
            let argv = [
                "walagent",
                "backup",
                "--source",
                "h",
                "--archive",
                "/a",
                "--memory-limit",
                bad,
            ];
            let err = Cli::try_parse_from(argv).unwrap_err().to_string();
            assert!(err.contains("--memory-limit"), "{bad}: {err}");
        }
    }

    #[test]
    fn memory_plan_caps_backup_zstd_workers() {
        // The rules themselves: backup::defaults' tests. Here: `--memory-limit` reaches them.
        let small = MemoryPlan::for_limit(26 << 20);
        let opts =
            backup_args(&["--memory-limit", "26MB"]).resolve_with(conninfo(), &small, Some(4));
        assert_eq!(opts.compress_threads, 0);
    }

    fn temp_archive(name: &str) -> std::path::PathBuf {
        let d =
            std::env::temp_dir().join(format!("walagent-resolve-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    /// An S3 store that is never contacted (static settings; opening does not connect).
    async fn s3_store(spec: &str) -> Arc<dyn Store> {
        let settings = S3Settings {
            endpoint: Some("http://127.0.0.1:9".into()),
            region: Some("us-east-1".into()),
            access_key: Some("k".into()),
            secret_key: Some("s".into()),
            ..Default::default()
        };
        let loc: S3Location = spec.parse().unwrap();
        Arc::new(
            S3Store::open_with(loc, S3Options::default(), settings)
                .await
                .unwrap(),
        )
    }

    #[test]
    fn local_archive_defaults() {
        let dir = temp_archive("local");
        let store: Arc<dyn Store> = Arc::new(LocalStore::open(&dir).unwrap());
        let spec = dir.to_str().unwrap();
        let o = stream_args(spec, &[]).resolve_with(conninfo(), store.clone(), Some(16));
        assert_eq!(o.spool_dir, dir.join("spool"));
        assert_eq!(
            o.partial_interval, None,
            "local: a partial only when stopping"
        );
        assert_eq!(o.ack, AckMode::Archived);
        assert!(!o.synchronous);
        assert_eq!(
            o.archive_identity,
            std::fs::canonicalize(&dir).unwrap().display().to_string()
        );
        assert_eq!(o.archive_workers, 4);
        assert_eq!(o.status_interval, Duration::from_secs(10));
        assert_eq!(o.stop_timeout, Duration::from_secs(20));
        assert_eq!(o.spool_max_bytes, 1 << 30);
        assert_eq!(
            (o.slot.as_str(), o.create_slot, o.no_loop),
            ("s1", false, false)
        );

        // Explicit values win; a status interval of 0 would spin: at least 1 s.
        let o = stream_args(
            spec,
            &[
                "--spool",
                "/elsewhere",
                "--partial-interval",
                "5",
                "--archive-workers",
                "7",
                "--status-interval",
                "0",
            ],
        )
        .resolve_with(conninfo(), store, Some(16));
        assert_eq!(o.spool_dir, Path::new("/elsewhere"));
        assert_eq!(o.partial_interval, Some(Duration::from_secs(5)));
        assert_eq!(o.archive_workers, 7);
        assert_eq!(o.status_interval, Duration::from_secs(1));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn remote_archive_defaults() {
        let spec = "s3://bucket/db1";
        let store = s3_store(spec).await;
        let o = stream_args(spec, &[]).resolve_with(conninfo(), store.clone(), Some(2));
        assert_eq!(o.spool_dir, receive::spool::default_dir(spec, true));
        assert!(
            o.spool_dir.starts_with("walagent-spool"),
            "{:?}",
            o.spool_dir
        );
        assert_eq!(o.partial_interval, Some(Duration::from_secs(10)));
        assert_eq!(o.archive_identity, "s3://bucket/db1");
        assert_eq!(o.archive_workers, 2);
        // 0 = only when stopping, for S3 too.
        let o =
            stream_args(spec, &["--partial-interval", "0"]).resolve_with(conninfo(), store, None);
        assert_eq!(o.partial_interval, None);
        assert_eq!(o.archive_workers, 2, "unknown CPU count");
    }

    #[test]
    fn synchronous_forces_fsync_ack() {
        let dir = temp_archive("sync");
        let store: Arc<dyn Store> = Arc::new(LocalStore::open(&dir).unwrap());
        let spec = dir.to_str().unwrap();
        for extra in [
            &["--synchronous"][..],
            &["--synchronous", "--ack", "archived"],
        ] {
            let o = stream_args(spec, extra).resolve_with(conninfo(), store.clone(), None);
            assert!(o.synchronous);
            assert_eq!(o.ack, AckMode::Fsync, "{extra:?}");
        }
        let o = stream_args(spec, &["--ack", "fsync"]).resolve_with(conninfo(), store, None);
        assert!(!o.synchronous && o.ack == AckMode::Fsync);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn worker_counts_are_clamped() {
        assert_eq!(default_archive_workers(None), 2);
        assert_eq!(default_archive_workers(Some(0)), 1);
        assert_eq!(default_archive_workers(Some(1)), 1);
        assert_eq!(default_archive_workers(Some(3)), 3);
        assert_eq!(default_archive_workers(Some(64)), 4);
        assert_eq!(partial_interval(None, true), Some(Duration::from_secs(10)));
        assert_eq!(partial_interval(None, false), None);
        assert_eq!(partial_interval(Some(0), true), None);
        assert_eq!(
            partial_interval(Some(3), false),
            Some(Duration::from_secs(3))
        );
    }

    #[test]
    fn recovery_targets() {
        assert_eq!(
            restore_args(&[]).recovery_target().unwrap(),
            RecoveryTarget::End
        );
        assert_eq!(
            restore_args(&["--target-lsn", "0/5000060"])
                .recovery_target()
                .unwrap(),
            RecoveryTarget::Lsn(crate::wal::Lsn(0x500_0060))
        );
        assert!(matches!(
            restore_args(&["--target-time", "2026-11-22 10:15:00+01"]).recovery_target(),
            Ok(RecoveryTarget::Time(_))
        ));
        assert!(matches!(
            restore_args(&["--target-xid", "1234"]).recovery_target(),
            Ok(RecoveryTarget::Xid(_))
        ));
        assert!(matches!(
            restore_args(&["--target-name", "before"]).recovery_target(),
            Ok(RecoveryTarget::Name(_))
        ));
        assert!(matches!(
            restore_args(&["--target", "immediate"]).recovery_target(),
            Ok(RecoveryTarget::Immediate)
        ));
        // Each error names its flag and keeps the parser's error as its source.
        for (flag, bad) in [
            ("--target-time", "2026-11-22 10:15:00"),
            ("--target-lsn", "5000060"),
            ("--target-xid", "1"),
            ("--target-name", ""),
            ("--target", "soon"),
        ] {
            let e = restore_args(&[flag, bad]).recovery_target().unwrap_err();
            assert!(e.to_string().starts_with(&format!("{flag}: ")), "{e}");
            assert!(std::error::Error::source(&e).is_some(), "{e:?}");
            assert_eq!(e.hint(), None);
        }
    }

    #[test]
    fn restore_options() {
        let o = restore_args(&["--exclusive", "--backup", "b1"])
            .resolve_with(|| Ok("/usr/bin/walagent".into()))
            .unwrap();
        assert!(!o.inclusive && o.backup.as_deref() == Some("b1"));
        assert_eq!(o.timeline, TargetTimeline::Latest);
        assert_eq!(o.action, TargetAction::Promote);
        assert_eq!(o.walagent_path, Path::new("/usr/bin/walagent"));
        assert_eq!(
            (o.archive.as_str(), o.pgdata.as_path()),
            ("/a", Path::new("/p"))
        );

        // --walagent-path wins without asking for the running binary.
        let o = restore_args(&["--walagent-path", "/opt/w"])
            .resolve_with(|| panic!("not asked"))
            .unwrap();
        assert_eq!(o.walagent_path, Path::new("/opt/w"));

        let e = restore_args(&[])
            .resolve_with(|| Err(std::io::Error::from(std::io::ErrorKind::NotFound)))
            .unwrap_err();
        assert!(
            e.to_string().starts_with("cannot find the walagent binary"),
            "{e}"
        );
        assert_eq!(e.hint().as_deref(), Some("pass --walagent-path"));

        for (flag, bad) in [("--target-timeline", "zero"), ("--target-action", "stop")] {
            let e = restore_args(&[flag, bad])
                .resolve_with(|| Ok("/w".into()))
                .unwrap_err();
            assert!(e.to_string().starts_with(&format!("{flag}: ")), "{e}");
        }
    }

    #[test]
    fn standby_options() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["walagent", "restore", "--archive", "/a", "--pgdata", "/p"];
            argv.extend_from_slice(extra);
            Cli::try_parse_from(argv).map(|c| match c.command {
                Command::Restore(a) => a,
                c => panic!("{c:?}"),
            })
        };
        let env = |k: &str| (k == "PGPASSWORD").then(|| "from-env".to_string());
        assert!(restore_args(&[]).standby_options(&env).unwrap().is_none());
        // Archive only.
        let o = parse(&["--standby"])
            .unwrap()
            .standby_options(&env)
            .unwrap();
        assert!(o.unwrap().source.is_none());
        // The password in the string goes into primary_conninfo, PGPASSWORD does not.
        let a = parse(&[
            "--standby",
            "--source",
            "postgresql://rep:pw%27x@db1:5433/postgres",
            "--slot",
            "s1",
            "--create-slot",
        ])
        .unwrap();
        let src = a.standby_options(&env).unwrap().unwrap().source.unwrap();
        assert!(src.password_in_source && src.create_slot);
        assert_eq!(src.slot.as_deref(), Some("s1"));
        assert!(src.primary_conninfo().contains(r"password='pw\'x'"));
        let a = parse(&["--standby", "--source", "host=db1 user=rep"]).unwrap();
        let src = a.standby_options(&env).unwrap().unwrap().source.unwrap();
        assert_eq!(src.conninfo.password.as_deref(), Some("from-env"));
        assert!(!src.password_in_source);
        assert!(!src.primary_conninfo().contains("from-env"));
        // A --source that does not parse names the flag, never the string.
        let a = parse(&["--standby", "--source", "host=db1 password='secret"]).unwrap();
        let e = a.standby_options(&env).unwrap_err();
        assert!(e.to_string().starts_with("--source: "), "{e}");
        assert!(!e.to_string().contains("secret"), "{e}");

        // Refused combinations (usage errors).
        for bad in [
            &["--slot", "s1"][..],
            &["--standby", "--slot", "s1"],
            &["--standby", "--source", "host=x", "--create-slot"],
            &["--source", "host=x"],
            &["--standby", "--target-time", "2026-11-22 10:15:00+01"],
            &["--standby", "--target-lsn", "0/5000000"],
            &["--standby", "--target", "immediate"],
            &["--standby", "--target-name", "x"],
            &["--standby", "--target-xid", "1234"],
            &["--standby", "--exclusive"],
            &["--standby", "--target-timeline", "current"],
            &["--standby", "--target-action", "pause"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        let e = parse(&["--standby", "--target-time", "2026-11-22 10:15:00+01"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--standby") && e.contains("--target-time"),
            "{e}"
        );
        // Defaults of the target flags do not conflict.
        let o = parse(&["--standby"])
            .unwrap()
            .resolve_with(|| Ok("/w".into()))
            .unwrap();
        assert!(o.standby.is_some());
        assert_eq!(o.target, RecoveryTarget::End);
    }

    #[test]
    fn wal_fetch_command() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["walagent", "wal-fetch", "--archive"];
            argv.extend_from_slice(extra);
            match Cli::try_parse_from(argv).unwrap().command {
                Command::WalFetch(a) => a.into_command(),
                c => panic!("{c:?}"),
            }
        };
        let c = parse(&[
            "s3://b/p",
            "000000010000000000000003",
            "pg_wal/RECOVERYXLOG",
        ]);
        assert_eq!(c.walfile, "000000010000000000000003");
        assert_eq!(c.prefetch.depth, crate::restore::prefetch::DEFAULT_DEPTH);
        assert_eq!(c.prefetch.dir, Path::new("pg_wal/.walagent-prefetch"));
        assert!(!c.worker && !c.allow_partial);
        let c = parse(&["/a", "--allow-partial", "00000002.history", "x"]);
        assert_eq!(
            c.prefetch.depth,
            crate::restore::prefetch::DEFAULT_DEPTH,
            "a local archive prefetches too"
        );
        assert!(c.allow_partial);
        let c = parse(&["/a", "--prefetch", "0", "00000002.history", "x"]);
        assert_eq!(c.prefetch.depth, 0);

        // --memory-limit: 32MB by default; it reaches the prefetch settings (more downloads at
        // once from S3 at 64MB); --prefetch-jobs still wins.
        const MIB: u64 = 1 << 20;
        let seg = "000000010000000000000003";
        let c = parse(&["s3://b/p", seg, "x"]);
        assert_eq!((c.prefetch.memory_limit, c.prefetch.jobs), (32 * MIB, 2));
        let c = parse(&["s3://b/p", "--memory-limit", "64MB", seg, "x"]);
        assert_eq!(c.prefetch.memory_limit, 64 * MIB);
        assert!(c.prefetch.jobs > 2, "{:?}", c.prefetch);
        let c = parse(&[
            "s3://b/p",
            "--memory-limit",
            "1GB",
            "--prefetch-jobs",
            "1",
            seg,
            "x",
        ]);
        assert_eq!((c.prefetch.memory_limit, c.prefetch.jobs), (1 << 30, 1));
    }

    /// The worker's command line parses back to the call's prefetch settings, the memory
    /// limit among them.
    #[test]
    fn the_prefetch_worker_gets_the_calls_settings() {
        use crate::restore::prefetch::{worker_command, PrefetchConfig};
        for limit in [32u64 << 20, 64 << 20, 1 << 30] {
            let cfg = PrefetchConfig::new(
                "s3://b/p",
                Path::new("D"),
                None,
                Some("/c".into()),
                None,
                limit,
            );
            let cmd = worker_command(
                "walagent".into(),
                &cfg,
                "000000010000000000000003",
                Path::new("D"),
            );
            let argv = std::iter::once(std::ffi::OsString::from("walagent"))
                .chain(cmd.get_args().map(|a| a.to_os_string()));
            let Command::WalFetch(a) = Cli::try_parse_from(argv).unwrap().command else {
                panic!("not wal-fetch")
            };
            assert!(a.prefetch_worker);
            assert_eq!(a.into_command().prefetch, cfg);
        }
    }

    #[test]
    fn wal_fetch_memory_limit_below_the_minimum_is_refused() {
        for bad in ["25MB", "0", "lots"] {
            let argv = [
                "walagent",
                "wal-fetch",
                "--archive",
                "/a",
                "--memory-limit",
                bad,
                "x",
                "y",
            ];
            let err = Cli::try_parse_from(argv).unwrap_err();
            let msg = err.to_string();
            let first = msg.lines().next().unwrap_or_default();
            assert!(
                first.starts_with("error: invalid value") && first.contains("--memory-limit"),
                "{bad}: {msg}"
            );
            // As restore_command: an argument error stops recovery (126), never "not found".
            assert_eq!(crate::cli::parse_error_exit_code(argv, &err), 126);
        }
        let argv = [
            "walagent",
            "wal-fetch",
            "--archive",
            "/a",
            "--memory-limit",
            "20MB",
            "x",
            "y",
        ];
        let msg = Cli::try_parse_from(argv).unwrap_err().to_string();
        assert!(
            msg.lines()
                .next()
                .unwrap_or_default()
                .contains("is below the smallest workable budget, 26MB"),
            "{msg}"
        );
    }
}
