//! walagent: argument parsing and dispatch. The work lives in the library.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser as _;
use tokio::sync::watch;

use walagent::archive;
use walagent::backup;
use walagent::cli::{
    BackupArgs, BackupsArgs, Cli, Command, ConfigCommand, RestoreArgs, RunArgs, StreamArgs,
    WalFetchArgs, WalPushArgs,
};
use walagent::protocol::conninfo::ConnInfo;
use walagent::receive::{self, Finished};
use walagent::restore::{fetch_cmd, wal_fetch};

fn main() -> ExitCode {
    limit_heap_growth();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = walagent::cli::parse_error_exit_code(std::env::args_os(), &e);
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    init_logging(log_format(&cli));
    if let Command::WalFetch(WalFetchArgs {
        env_file: Some(path),
        ..
    })
    | Command::WalPush(WalPushArgs {
        env_file: Some(path),
        ..
    }) = &cli.command
    {
        // Before any thread exists: set_var is only sound single-threaded.
        if let Err(e) = walagent::restore::envfile::load(path) {
            let code = match cli.command {
                Command::WalPush(_) => 1,
                _ => wal_fetch::EXIT_FATAL as u8,
            };
            return fail(&e.to_string(), None, code);
        }
    }
    // `run` serves many clusters: worker threads, so that one cluster's synchronous file work
    // (spool fsyncs) never holds up another's stream; more blocking threads for their archivers.
    let builder = match cli.command {
        Command::Run(_) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
            b.worker_threads(cpus.clamp(2, 4)).max_blocking_threads(64);
            b
        }
        _ => {
            let mut b = tokio::runtime::Builder::new_current_thread();
            b.max_blocking_threads(8);
            b
        }
    };
    let runtime = match { builder }.enable_all().build() {
        Ok(r) => r,
        Err(e) => return fail(&format!("cannot start the async runtime: {e}"), None, 2),
    };
    let code = match cli.command {
        Command::Stream(args) => runtime.block_on(stream(args)),
        Command::WalFetch(args) => runtime.block_on(fetch(args)),
        Command::Backup(args) => runtime.block_on(take_backup(args)),
        Command::Backups(args) => runtime.block_on(list_backups(args)),
        Command::SeedStandby(args) => runtime.block_on(seed_standby(args)),
        Command::Restore(args) => runtime.block_on(restore(args)),
        Command::Status(args) => runtime.block_on(status(args)),
        Command::Expire(args) => runtime.block_on(expire(args)),
        Command::WalPush(args) => runtime.block_on(wal_push(args)),
        Command::Run(args) => runtime.block_on(run_service(args, cli.log_format)),
        Command::Config(ConfigCommand::Check(args)) => config_check(&args.file),
        Command::Verify(args) => runtime.block_on(verify(args)),
    };
    // A stop cut short (stop timeout, second signal) leaves work behind on purpose: do not wait
    // for it (dropping a runtime waits for blocking tasks without limit).
    runtime.shutdown_timeout(Duration::from_secs(2));
    code
}

/// Keeps large buffers (whole compressed segments for S3 PUTs) out of glibc's per-thread arenas.
/// By default glibc raises its mmap threshold after the first large free, after which every later
/// segment-sized buffer is carved from an arena and stays resident. A fixed threshold returns them
/// to the kernel on free.
fn limit_heap_growth() {
    // SAFETY: mallopt only adjusts allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

/// Whether `--log-format json` was given (the final error line is then JSON too).
static JSON_LOGS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `--log-format` (or WALAGENT_LOG_FORMAT), else for `run` the config file's `log_format`
/// (read before logging starts; a file that does not load fails right after with its error),
/// else text.
fn log_format(cli: &Cli) -> walagent::service::log::Format {
    use walagent::cli::LogFormat;
    use walagent::service::config::{Config, LogFormat as FileFormat, Overrides};
    use walagent::service::log::Format;
    match (cli.log_format, &cli.command) {
        (Some(LogFormat::Json), _) => Format::Json,
        (Some(LogFormat::Text), _) => Format::Text,
        (None, Command::Run(args)) => {
            match Config::peek_log_format(&args.config, &Overrides::default()) {
                FileFormat::Json => Format::Json,
                FileFormat::Text => Format::Text,
            }
        }
        (None, _) => Format::Text,
    }
}

fn init_logging(format: walagent::service::log::Format) {
    use walagent::service::log::{self, Format};
    JSON_LOGS.store(format == Format::Json, std::sync::atomic::Ordering::Relaxed);
    log::init(format);
}

/// Prints one line naming the cause (and the fix when known) and returns the exit code.
fn fail(cause: &str, hint: Option<String>, code: u8) -> ExitCode {
    if JSON_LOGS.load(std::sync::atomic::Ordering::Relaxed) {
        eprintln!(
            "{}",
            walagent::service::log::error_line(cause, hint.as_deref())
        );
        return ExitCode::from(code);
    }
    match hint {
        Some(h) => eprintln!("walagent: error: {cause}; hint: {h}"),
        None => eprintln!("walagent: error: {cause}"),
    }
    ExitCode::from(code)
}

async fn stream(args: StreamArgs) -> ExitCode {
    // First: a SIGTERM while the archive is being opened must be a clean stop, not the
    // default action (death by signal).
    let signals = stop_signals();
    let conninfo = match parse_source(&args.source) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let store = match archive::open(&args.archive, true).await {
        Ok(s) => s,
        Err(e) => return fail(&e.to_string(), e.hint(), 2),
    };
    // Bound before streaming starts, so that a busy port is reported at once.
    let metrics = match args.metrics_addr {
        Some(addr) => match walagent::service::metrics::bind(addr).await {
            Ok(l) => Some(l),
            Err(e) => return fail(&e.to_string(), e.hint(), 2),
        },
        None => None,
    };
    let mut opts = args.resolve(conninfo, store);
    tracing::info!(source = %opts.conninfo.display_safe(), archive = %opts.store.location(), slot = %opts.slot, "walagent stream");
    let (_stop_metrics, metrics_stopped) = watch::channel(false);
    if let Some(listener) = metrics {
        let registry = std::sync::Arc::new(walagent::service::metrics::Registry::default());
        opts.stats = registry.add_cluster("default").stream.clone();
        tokio::spawn(walagent::service::metrics::serve_on(
            listener,
            registry,
            metrics_stopped,
        ));
    }
    match receive::run(opts, signals).await {
        Ok(Finished::EndPos(lsn)) => {
            tracing::info!(%lsn, "stopped at --endpos");
            ExitCode::SUCCESS
        }
        Ok(Finished::Signal(lsn)) => {
            tracing::info!(%lsn, "stopped on signal");
            ExitCode::SUCCESS
        }
        Ok(Finished::Disconnected(lsn)) => fail(
            &format!("the server ended the stream at {lsn} and --no-loop was given"),
            None,
            1,
        ),
        Err(e) => fail(&e.to_string(), e.hint(), 1),
    }
}

async fn fetch(args: WalFetchArgs) -> ExitCode {
    match fetch_cmd::run(&args.resolve()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e.to_string(), e.hint(), e.exit_code().clamp(1, 255) as u8),
    }
}

/// Counts SIGTERM/SIGINT (the stream's stop is bounded and a second signal cuts it short).
/// SIGHUP, which would otherwise kill the process, is logged and ignored: `stream` has no
/// configuration file to reload.
fn stop_signals() -> watch::Receiver<u32> {
    let (tx, rx) = watch::channel(0u32);
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        return rx;
    };
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
                _ = hup.recv() => {
                    tracing::info!("SIGHUP received: nothing to reload (no configuration file), going on");
                    continue;
                }
            }
            let mut n = 0;
            tx.send_modify(|c| {
                *c += 1;
                n = *c;
            });
            if n == 1 {
                tracing::info!("stop requested; finishing (a second signal stops at once)");
            }
        }
    });
    rx
}

/// Turns true on SIGTERM or SIGINT.
fn shutdown_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        let _ = tx.send(true);
    });
    rx
}

/// Parses `--source`. The error never quotes the string, not even masked: a string that does
/// not parse may hold a password where no masking rule expects one. The error names the
/// offending keyword where that is safe.
fn parse_source(source: &str) -> Result<ConnInfo, ExitCode> {
    ConnInfo::parse(source).map_err(|e| fail(&format!("--source: {e}"), e.hint(), 2))
}

async fn take_backup(args: BackupArgs) -> ExitCode {
    let conninfo = match parse_source(&args.source) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let store = match archive::open(&args.archive, true).await {
        Ok(s) => s,
        Err(e) => return fail(&e.to_string(), e.hint(), 2),
    };
    let json = args.json;
    let opts = args.resolve(conninfo);
    match backup::take::take(&opts, store, shutdown_signal()).await {
        Ok(info) => {
            if json {
                print!("{}", String::from_utf8_lossy(&info.to_json()));
            } else {
                println!(
                    "backup {} complete: {} of data stored as {}, consistent at {} (WAL {}..{})",
                    info.id,
                    backup::listing::human_bytes(info.data_bytes),
                    backup::listing::human_bytes(info.stored_bytes),
                    info.end_lsn,
                    info.wal_start_segment,
                    info.wal_end_segment
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e.to_string(), e.hint(), 1),
    }
}

async fn list_backups(args: BackupsArgs) -> ExitCode {
    let store = match archive::open(&args.archive, false).await {
        Ok(s) => s,
        Err(e) => return fail(&e.to_string(), e.hint(), 2),
    };
    match archive::catalog::list(store.as_ref()).await {
        Ok(list) => {
            if args.json {
                print!("{}", backup::listing::render_json(&list));
            } else if list.is_empty() {
                println!("no backups in {}", store.location());
            } else {
                print!("{}", backup::listing::render_table(&list));
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e.to_string(), e.hint(), 1),
    }
}

async fn verify(args: walagent::cli::VerifyArgs) -> ExitCode {
    use walagent::lifecycle::verify;
    let store = match archive::open(&args.archive, false).await {
        Ok(s) => s,
        Err(e) => return fail(&e.to_string(), e.hint(), 2),
    };
    let opts = verify::VerifyOptions {
        full: args.full,
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    match verify::verify(store, opts).await {
        Ok(r) => {
            if args.json {
                print!("{}", r.to_json());
            } else {
                print!("{}", r.render_text());
            }
            if r.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => fail(&e.to_string(), e.hint(), 2),
    }
}

async fn seed_standby(args: walagent::cli::SeedStandbyArgs) -> ExitCode {
    let conninfo = match parse_source(&args.source) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let opts = args.resolve(conninfo);
    match backup::seed::seed(&opts, shutdown_signal()).await {
        Ok(r) => {
            println!(
                "standby data directory {} ready: {} files, {}, consistent at {} on timeline {}; start it with pg_ctl start -D {}",
                args.pgdata.display(),
                r.stats.files,
                backup::listing::human_bytes(r.stats.bytes),
                r.end_lsn,
                r.timeline,
                args.pgdata.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e.to_string(), e.hint(), 1),
    }
}

async fn restore(args: RestoreArgs) -> ExitCode {
    use walagent::restore::pitr;
    let opts = match args.resolve() {
        Ok(o) => o,
        Err(e) => return fail(&e.to_string(), e.hint(), 2),
    };
    let store = match archive::open(&args.archive, false).await {
        Ok(s) => s,
        Err(e) => return fail(&e.to_string(), e.hint(), 2),
    };
    match pitr::restore(&opts, store, shutdown_signal()).await {
        Ok(r) => {
            println!("{}", pitr::describe_plan(&r.plan, &opts));
            if args.dry_run {
                println!("dry run: nothing written");
            } else {
                println!(
                    "restored {} files ({}) into {}; start it with: pg_ctl start -D {}",
                    r.files,
                    backup::listing::human_bytes(r.bytes),
                    args.pgdata.display(),
                    args.pgdata.display()
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e.to_string(), e.hint(), 1),
    }
}

async fn status(args: walagent::cli::StatusArgs) -> ExitCode {
    use walagent::lifecycle::status;
    let store = match archive::open(&args.archive, false).await {
        Ok(s) => s,
        Err(e) => return fail(&e.to_string(), e.hint(), 2),
    };
    match status::status(store.as_ref()).await {
        Ok(st) => {
            if args.json {
                println!("{:#}", status::to_json(&st));
            } else {
                print!("{}", status::render(&st));
            }
            ExitCode::from(st.exit_code())
        }
        Err(e) => fail(&e.to_string(), e.hint(), 2),
    }
}

async fn expire(args: walagent::cli::ExpireArgs) -> ExitCode {
    use walagent::lifecycle::expire;
    let store = match archive::open(&args.archive, false).await {
        Ok(s) => s,
        Err(e) => return fail(&e.to_string(), e.hint(), 2),
    };
    match expire::expire(store.as_ref(), args.policy(), args.dry_run).await {
        Ok(r) => {
            if args.json {
                println!("{:#}", expire::to_json(&r));
            } else {
                print!("{}", expire::render(&r, &store.location()));
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e.to_string(), e.hint(), 2),
    }
}

async fn wal_push(args: WalPushArgs) -> ExitCode {
    use walagent::lifecycle::push;
    let opts = push::PushOptions {
        archive: args.archive,
        path: args.path,
        compression: args.compress,
    };
    match push::run(&opts).await {
        Ok(p @ push::Pushed::KeptDifferentBackupHistory { .. }) => {
            tracing::warn!("{}", p.describe(&opts.path));
            ExitCode::SUCCESS
        }
        Ok(p) => {
            tracing::info!("{}", p.describe(&opts.path));
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e.to_string(), e.hint(), e.exit_code()),
    }
}

async fn run_service(args: RunArgs, log_format: Option<walagent::cli::LogFormat>) -> ExitCode {
    use walagent::service::{config::Overrides, run};
    // First: a SIGTERM while the clusters start must be a clean stop.
    let signals = run::signals();
    let overrides = Overrides {
        metrics_addr: args.metrics_addr,
        log_format: log_format.map(|f| f.as_str().to_string()),
    };
    match run::run(args.config, overrides, signals).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e.to_string(), e.hint(), e.exit_code()),
    }
}

fn config_check(file: &std::path::Path) -> ExitCode {
    use walagent::service::config::{Config, Overrides, LOG_FORMAT_ENV, METRICS_ADDR_ENV};
    let overrides = Overrides {
        metrics_addr: std::env::var(METRICS_ADDR_ENV).ok(),
        log_format: std::env::var(LOG_FORMAT_ENV).ok(),
    };
    match Config::load(file, &overrides) {
        Ok(c) => {
            print!("{}", c.render());
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e.to_string(), e.hint(), 2),
    }
}
