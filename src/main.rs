//! walagent: argument parsing and dispatch. The work lives in the library.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser as _;
use tokio::sync::watch;

use walagent::archive;
use walagent::backup;
use walagent::cli::{BackupArgs, BackupsArgs, Cli, Command, RestoreArgs, StreamArgs, WalFetchArgs};
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
    init_logging();
    if let Command::WalFetch(WalFetchArgs {
        env_file: Some(path),
        ..
    }) = &cli.command
    {
        // Before any thread exists: set_var is only sound single-threaded.
        if let Err(e) = walagent::restore::envfile::load(path) {
            return fail(&e.to_string(), None, wal_fetch::EXIT_FATAL as u8);
        }
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(8)
        .build()
    {
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

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WALAGENT_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(
            std::env::var_os("NO_COLOR").is_none()
                && std::io::IsTerminal::is_terminal(&std::io::stderr()),
        )
        .with_target(false)
        .init();
}

/// Prints one line naming the cause (and the fix when known) and returns the exit code.
fn fail(cause: &str, hint: Option<String>, code: u8) -> ExitCode {
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
    let opts = args.resolve(conninfo, store);
    tracing::info!(source = %opts.conninfo.display_safe(), archive = %opts.store.location(), slot = %opts.slot, "walagent stream");
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
