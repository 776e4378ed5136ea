//! The supervisor of `walagent run`: one task per cluster (its stream, restarted with backoff
//! after a fatal error; its backup schedule beside it, with retention after each backup), SIGHUP
//! reload (only the clusters that changed are stopped and started), a bounded stop on
//! SIGTERM/SIGINT, and systemd notifications.
//!
//! Isolation: every cluster runs in its own tokio task with its own connections, archive and
//! spool; nothing a cluster does waits on another one. A cluster whose server is down keeps
//! reconnecting inside `receive::run`; one whose stream ends in an error is restarted after a
//! delay (2 s doubling to 2 min, reset after 5 min of streaming), each failure logged.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::Instrument as _;

use super::config::{next_backup, ClusterConfig, Config, ConfigError, Overrides, Schedule};
use super::metrics::{self, ClusterStats, Registry};
use super::notify::Notifier;
use crate::archive::{self, catalog, Store};
use crate::backup::take::BackupOptions;
use crate::lifecycle::expire;
use crate::receive::{self, Finished, ReceiveError, StreamOptions};

/// Why `walagent run` ended badly.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{} of {total} clusters did not stop cleanly: {}", failed.len(), failed.join("; "))]
    Unclean { total: usize, failed: Vec<String> },
}

impl ServiceError {
    pub fn hint(&self) -> Option<String> {
        match self {
            ServiceError::Config(e) => e.hint(),
            ServiceError::Unclean { .. } => Some(
                "nothing acknowledged is lost: each replication slot still holds that WAL and the next \
                 walagent run archives what stayed in the spools first (raise stop_timeout to wait longer)"
                    .into(),
            ),
        }
    }

    /// 2 for a config that cannot be used, 1 for a stop cut short.
    pub fn exit_code(&self) -> u8 {
        match self {
            ServiceError::Config(_) => 2,
            ServiceError::Unclean { .. } => 1,
        }
    }
}

/// What the process receives from outside: stop requests (counted) and reload requests.
pub struct Signals {
    pub stop: watch::Receiver<u32>,
    pub reload: mpsc::Receiver<()>,
}

/// SIGTERM/SIGINT counted into `stop`, SIGHUP into `reload`. Call before anything slow, so that
/// an early signal is a clean stop rather than death.
pub fn signals() -> Signals {
    use tokio::signal::unix::{signal, SignalKind};
    let (stop_tx, stop) = watch::channel(0u32);
    let (reload_tx, reload) = mpsc::channel(4);
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::warn!("cannot install signal handlers; SIGHUP and bounded stops are unavailable");
        return Signals { stop, reload };
    };
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
                _ = hup.recv() => {
                    // Several SIGHUPs in a row are one reload.
                    let _ = reload_tx.try_send(());
                    continue;
                }
            }
            stop_tx.send_modify(|c| *c += 1);
        }
    });
    Signals { stop, reload }
}

/// What a cluster's task is doing, for STATUS= lines and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Starting,
    Running,
    /// Restarting after this error, at this time.
    Failed(String),
    Stopping,
}

#[derive(Debug)]
struct ClusterState {
    phase: Phase,
    backing_up: bool,
}

type Shared = Arc<Mutex<ClusterState>>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, ClusterState> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running cluster task.
struct Handle {
    cfg: ClusterConfig,
    stop: watch::Sender<u32>,
    /// Turns true when the task has ended (its spool and archive locks released).
    done: watch::Receiver<bool>,
    join: JoinHandle<Result<(), String>>,
    state: Shared,
    stats: Arc<ClusterStats>,
}

impl Handle {
    fn request_stop(&self, count: u32) {
        self.stop.send_if_modified(|c| {
            let n = (*c).max(count);
            let changed = n != *c;
            *c = n;
            changed
        });
    }
}

/// Runs the service until stopped: loads `path`, starts every cluster, reloads on SIGHUP.
pub async fn run(
    path: PathBuf,
    overrides: Overrides,
    mut signals: Signals,
) -> Result<(), ServiceError> {
    let mut config = Config::load(&path, &overrides)?;
    let notifier = Notifier::from_env();
    let registry = Arc::new(Registry::default());
    let (metrics_stop_tx, metrics_stop) = watch::channel(false);
    let metrics_task = config.metrics_addr.map(|addr| {
        let registry = registry.clone();
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(addr, registry, metrics_stop).await {
                tracing::error!("metrics endpoint {addr}: {e}");
            }
        })
    });
    tracing::info!(
        config = %path.display(),
        clusters = config.clusters.len(),
        "walagent run: starting {}",
        config.clusters.keys().cloned().collect::<Vec<_>>().join(", ")
    );
    let mut active: BTreeMap<String, Handle> = BTreeMap::new();
    let mut retiring: Vec<(String, Handle)> = Vec::new();
    for c in config.clusters.values() {
        active.insert(c.name.clone(), start_cluster(c.clone(), &registry, None));
    }
    // READY once every cluster's task runs (not once each streams: a server that is down must
    // not hold the unit in "activating"); STATUS= says which are streaming.
    let mut last_status = status_line(&active);
    notifier.ready(&last_status);

    let mut watchdog = notifier.watchdog_interval().map(tokio::time::interval);
    // STATUS= follows changes within a second under systemd; otherwise the tick only retires
    // removed clusters from the metrics and can be slow (fewer wake-ups when idle).
    let mut tick =
        tokio::time::interval(Duration::from_secs(if notifier.enabled() { 1 } else { 10 }));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stop = signals.stop.clone();
    loop {
        tokio::select! {
            r = stop.wait_for(|c| *c >= 1) => {
                let _ = r;
                break;
            }
            Some(()) = signals.reload.recv() => {
                notifier.reloading();
                match Config::load(&path, &overrides) {
                    Err(e) => {
                        let hint = e.hint().map(|h| format!("; hint: {h}")).unwrap_or_default();
                        tracing::error!("SIGHUP: config refused, the running configuration stays: {e}{hint}");
                        notifier.ready(&format!("reload refused ({e}); {}", status_line(&active)));
                        last_status.clear();
                    }
                    Ok(new) => {
                        apply_reload(&config, &new, &mut active, &mut retiring, &registry);
                        config = new;
                        last_status = status_line(&active);
                        notifier.ready(&last_status);
                    }
                }
            }
            _ = tick.tick() => {
                // Retired clusters that have ended leave the metrics (unless they came back).
                retiring.retain(|(name, h)| {
                    if !*h.done.borrow() {
                        return true;
                    }
                    if !active.contains_key(name) {
                        registry.remove_cluster(name);
                    }
                    false
                });
                let s = status_line(&active);
                if s != last_status {
                    notifier.status(&s);
                    last_status = s;
                }
            }
            _ = async {
                match watchdog.as_mut() {
                    Some(w) => {
                        w.tick().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            } => {
                notifier.watchdog();
            }
        }
    }

    // Bounded stop: every cluster at once, each within its own stop_timeout; a second signal
    // is passed on and ends them at once.
    let total = active.len();
    tracing::info!("stop requested; stopping {total} clusters (a second signal stops at once)");
    let mut all: Vec<(String, Handle)> = active.into_iter().collect();
    all.append(&mut retiring);
    notifier.stopping(&format!("stopping {} clusters", all.len()));
    for (_, h) in &all {
        h.request_stop(*signals.stop.borrow());
    }
    let forward = {
        let senders: Vec<watch::Sender<u32>> = all.iter().map(|(_, h)| h.stop.clone()).collect();
        let mut stop = signals.stop.clone();
        tokio::spawn(async move {
            while stop.changed().await.is_ok() {
                let n = *stop.borrow_and_update();
                for s in &senders {
                    s.send_modify(|c| *c = (*c).max(n));
                }
            }
        })
    };
    let mut failed = Vec::new();
    for (name, h) in all {
        match h.join.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failed.push(format!("{name}: {e}")),
            Err(e) => failed.push(format!("{name}: its task ended abnormally: {e}")),
        }
    }
    forward.abort();
    let _ = metrics_stop_tx.send(true);
    if let Some(t) = metrics_task {
        let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
    }
    if failed.is_empty() {
        tracing::info!("all clusters stopped cleanly");
        Ok(())
    } else {
        Err(ServiceError::Unclean { total, failed })
    }
}

/// Starts, stops and restarts the clusters that differ between `old` and `new`; the others go
/// on untouched.
fn apply_reload(
    old: &Config,
    new: &Config,
    active: &mut BTreeMap<String, Handle>,
    retiring: &mut Vec<(String, Handle)>,
    registry: &Arc<Registry>,
) {
    if old.metrics_addr != new.metrics_addr {
        tracing::warn!(
            "SIGHUP: metrics_addr changed; it takes effect at the next start of walagent run"
        );
    }
    if old.log_format != new.log_format {
        tracing::warn!(
            "SIGHUP: log_format changed; it takes effect at the next start of walagent run"
        );
    }
    let mut started = Vec::new();
    let mut stopped = Vec::new();
    let mut restarted = Vec::new();
    let names: Vec<String> = active.keys().cloned().collect();
    for name in names {
        let changed = match new.clusters.get(&name) {
            None => {
                stopped.push(name.clone());
                true
            }
            Some(c) => {
                let differs = active.get(&name).is_some_and(|h| h.cfg != *c);
                if differs {
                    restarted.push(name.clone());
                }
                differs
            }
        };
        if changed {
            if let Some(h) = active.remove(&name) {
                h.request_stop(1);
                retiring.push((name, h));
            }
        }
    }
    for (name, c) in &new.clusters {
        if active.contains_key(name) {
            continue;
        }
        // The same name still stopping (changed, or removed and added back): wait for it, so
        // that its spool and archive locks are free.
        let prev = retiring
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, h)| h.done.clone());
        if !restarted.contains(name) {
            started.push(name.clone());
        }
        active.insert(name.clone(), start_cluster(c.clone(), registry, prev));
    }
    tracing::info!(
        "SIGHUP: configuration reloaded: {} started, {} stopped, {} restarted, {} unchanged",
        list(&started),
        list(&stopped),
        list(&restarted),
        active.len() - started.len() - restarted.len()
    );
}

fn list(v: &[String]) -> String {
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// One STATUS= line: every cluster and what it is doing.
fn status_line(active: &BTreeMap<String, Handle>) -> String {
    let mut streaming = 0;
    let parts: Vec<String> = active
        .iter()
        .map(|(name, h)| {
            let st = lock(&h.state);
            let s = match &st.phase {
                Phase::Starting => "starting".to_string(),
                Phase::Running if h.stats.stream.streaming.load(Ordering::Relaxed) => {
                    streaming += 1;
                    "streaming".to_string()
                }
                Phase::Running => "running".to_string(),
                Phase::Failed(e) => format!("failed, restarting ({})", short(e, 80)),
                Phase::Stopping => "stopping".to_string(),
            };
            if st.backing_up {
                format!("{name} {s}, backup running")
            } else {
                format!("{name} {s}")
            }
        })
        .collect();
    format!(
        "{} clusters, {streaming} streaming: {}",
        active.len(),
        parts.join("; ")
    )
}

fn short(s: &str, n: usize) -> String {
    let mut t: String = s.chars().take(n).collect();
    if t.len() < s.len() {
        t.push_str("...");
    }
    t
}

fn start_cluster(
    cfg: ClusterConfig,
    registry: &Arc<Registry>,
    prev: Option<watch::Receiver<bool>>,
) -> Handle {
    let stats = registry.add_cluster(&cfg.name);
    let (stop_tx, stop_rx) = watch::channel(0u32);
    let (done_tx, done_rx) = watch::channel(false);
    let state = Arc::new(Mutex::new(ClusterState {
        phase: Phase::Starting,
        backing_up: false,
    }));
    let span = tracing::info_span!("cluster", cluster = %cfg.name);
    let task = {
        let cfg = cfg.clone();
        let stats = stats.clone();
        let state = state.clone();
        async move {
            if let Some(mut prev) = prev {
                let _ = prev.wait_for(|d| *d).await;
            }
            let r = cluster_main(cfg, stats, stop_rx, state).await;
            let _ = done_tx.send(true);
            r
        }
        .instrument(span)
    };
    Handle {
        cfg,
        stop: stop_tx,
        done: done_rx,
        join: tokio::spawn(task),
        state,
        stats,
    }
}

/// Delays between restarts of a failing cluster.
struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_secs(2);
    const MAX: Duration = Duration::from_secs(120);
    /// A stream that ran this long before failing starts over at FIRST.
    const HEALTHY: Duration = Duration::from_secs(300);

    fn new() -> Backoff {
        Backoff { next: Self::FIRST }
    }

    fn after_failure(&mut self, ran: Duration) -> Duration {
        if ran >= Self::HEALTHY {
            self.next = Self::FIRST;
        }
        let d = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        d
    }
}

fn with_hint(msg: &str, hint: Option<String>) -> String {
    match hint {
        Some(h) => format!("{msg}; hint: {h}"),
        None => msg.to_string(),
    }
}

/// Sleeps `d` unless a stop is requested first (then false).
async fn sleep_unless_stopped(d: Duration, stop: &mut watch::Receiver<u32>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = stop.wait_for(|c| *c >= 1) => false,
    }
}

/// One cluster: open the archive, run the stream (restarted after errors) with the backup
/// schedule beside it, until stopped. `Err` names what a stop left undone.
async fn cluster_main(
    cfg: ClusterConfig,
    stats: Arc<ClusterStats>,
    mut stop: watch::Receiver<u32>,
    state: Shared,
) -> Result<(), String> {
    tracing::info!(source = %cfg.conninfo.display_safe(), archive = %cfg.archive, slot = %cfg.stream.slot, "cluster starting");
    let mut backoff = Backoff::new();
    let store = loop {
        let opened = tokio::select! {
            s = archive::open(&cfg.archive, true) => s,
            _ = stop.wait_for(|c| *c >= 1) => return Ok(()),
        };
        match opened {
            Ok(s) => break s,
            Err(e) => {
                let msg = with_hint(&e.to_string(), e.hint());
                let d = backoff.after_failure(Duration::ZERO);
                tracing::error!("cannot open the archive: {msg}; retrying in {d:?}");
                lock(&state).phase = Phase::Failed(e.to_string());
                if !sleep_unless_stopped(d, &mut stop).await {
                    return Ok(());
                }
            }
        }
    };
    let (cancel_tx, cancel_rx) = watch::channel(false);
    // A stop cancels a running backup at once (an interrupted backup is never used), while the
    // stream gets its stop_timeout.
    let cancel_on_stop = {
        let cancel_tx = cancel_tx.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let _ = stop.wait_for(|c| *c >= 1).await;
            let _ = cancel_tx.send(true);
        })
    };
    let scheduler = cfg.schedule.map(|schedule| {
        let cfg = cfg.clone();
        let store = store.clone();
        let stats = stats.clone();
        let state = state.clone();
        tokio::spawn(
            scheduler(cfg, schedule, store, stats, cancel_rx, state)
                .instrument(tracing::Span::current()),
        )
    });
    let opts = stream_options(&cfg, store, stats.stream.clone());
    let result = loop {
        lock(&state).phase = Phase::Running;
        let started = Instant::now();
        let r = receive::run(opts.clone(), stop.clone()).await;
        let stopping = *stop.borrow() >= 1;
        match r {
            Ok(Finished::Signal(lsn)) => {
                tracing::info!(%lsn, "stream stopped");
                break Ok(());
            }
            Err(e @ ReceiveError::StopTimedOut { .. }) => {
                tracing::error!("{}", with_hint(&e.to_string(), e.hint()));
                break Err(e.to_string());
            }
            Err(e) if stopping => {
                tracing::error!("{}", with_hint(&e.to_string(), e.hint()));
                break Err(e.to_string());
            }
            Ok(other) => {
                // No endpos and no --no-loop here: not expected; start again.
                let d = backoff.after_failure(started.elapsed());
                tracing::warn!("stream ended ({other:?}); starting again in {d:?}");
                if !sleep_unless_stopped(d, &mut stop).await {
                    break Ok(());
                }
            }
            Err(e) => {
                let d = backoff.after_failure(started.elapsed());
                tracing::error!(
                    "stream failed: {}; restarting in {d:?}",
                    with_hint(&e.to_string(), e.hint())
                );
                lock(&state).phase = Phase::Failed(e.to_string());
                if !sleep_unless_stopped(d, &mut stop).await {
                    break Ok(());
                }
            }
        }
    };
    lock(&state).phase = Phase::Stopping;
    let _ = cancel_tx.send(true);
    cancel_on_stop.abort();
    if let Some(s) = scheduler {
        let _ = s.await;
    }
    result
}

/// The stream's options, with the same defaults as `walagent stream` (see cli::resolve; the
/// service may not use cli, so the few defaults that depend on the archive are applied here).
fn stream_options(
    cfg: &ClusterConfig,
    store: Arc<dyn Store>,
    stats: Arc<receive::stats::StreamStats>,
) -> StreamOptions {
    let s = &cfg.stream;
    let remote = archive::is_remote(&cfg.archive);
    let archive_identity = receive::defaults::archive_identity(store.as_ref());
    let partial_interval = receive::defaults::partial_interval(s.partial_interval, remote);
    StreamOptions {
        conninfo: cfg.conninfo.clone(),
        store,
        spool_dir: s
            .spool
            .clone()
            .unwrap_or_else(|| receive::spool::default_dir(&cfg.archive, remote)),
        slot: s.slot.clone(),
        create_slot: s.create_slot,
        endpos: None,
        no_loop: false,
        synchronous: s.synchronous,
        compression: s.compress,
        compress_inline: s.compress_inline,
        status_interval: s.status_interval,
        ack: s.ack,
        partial_interval,
        spool_max_bytes: s.spool_max_size,
        archive_workers: s
            .archive_workers
            .unwrap_or_else(|| receive::defaults::archive_workers(receive::defaults::cpus())),
        archive_identity,
        stop_timeout: s.stop_timeout,
        stats,
    }
}

fn backup_options(cfg: &ClusterConfig) -> BackupOptions {
    let b = &cfg.backup;
    BackupOptions {
        conninfo: cfg.conninfo.clone(),
        checkpoint_fast: b.checkpoint_fast,
        max_rate_kbps: b.max_rate_kbps,
        compression: b.compress,
        // The same default as `walagent backup`: the CPUs, capped by the memory plan.
        compress_threads: crate::backup::defaults::backup_compress_threads(
            b.compress_threads,
            &crate::archive::memory::plan_for(crate::archive::memory::ArchiveKind::of(
                &cfg.archive,
            )),
            receive::defaults::cpus(),
        ),
        label: b.label.clone(),
        progress: false,
    }
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn parse_time(s: &str) -> Option<SystemTime> {
    let t = chrono::DateTime::parse_from_rfc3339(s).ok()?;
    let secs = u64::try_from(t.timestamp()).ok()?;
    Some(
        UNIX_EPOCH
            + Duration::from_secs(secs)
            + Duration::from_nanos(u64::from(t.timestamp_subsec_nanos())),
    )
}

/// The ends of the oldest and the newest complete backups in the archive.
async fn backup_window(
    store: &dyn Store,
) -> Result<(Option<SystemTime>, Option<SystemTime>), String> {
    let list = catalog::list(store).await.map_err(|e| e.to_string())?;
    let ends: Vec<SystemTime> = list
        .iter()
        .filter_map(|l| match l {
            catalog::Listed::Complete(i) => parse_time(&i.stop_time),
            _ => None,
        })
        .collect();
    Ok((ends.iter().min().copied(), ends.iter().max().copied()))
}

/// Takes backups on `schedule` until `cancel`, expiring after each one when the cluster has a
/// retention policy. A failed backup is retried after 1 min, doubling to 1 h (never later
/// than the schedule's own next time).
async fn scheduler(
    cfg: ClusterConfig,
    schedule: Schedule,
    store: Arc<dyn Store>,
    stats: Arc<ClusterStats>,
    mut cancel: watch::Receiver<bool>,
    state: Shared,
) {
    let cancelled = |c: &mut watch::Receiver<bool>| {
        let mut c = c.clone();
        async move {
            let _ = c.wait_for(|v| *v).await;
        }
    };
    // The newest backup in the archive sets the first time (whoever took it).
    let mut last_end = loop {
        match backup_window(store.as_ref()).await {
            Ok((oldest, newest)) => {
                if let Some(o) = oldest {
                    metrics_set(&stats.window_start_unix, unix_secs(o));
                }
                if let Some(n) = newest {
                    metrics_set(&stats.last_backup_unix, unix_secs(n));
                }
                break newest;
            }
            Err(e) => {
                tracing::warn!("cannot list the backups in the archive: {e}; trying again in 60s");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(60)) => {}
                    _ = cancelled(&mut cancel) => return,
                }
            }
        }
    };
    let mut retry: Option<(SystemTime, Duration)> = None;
    loop {
        let now = SystemTime::now();
        let mut due = next_backup(schedule, last_end, now);
        if let Some((at, _)) = retry {
            due = due.max(at);
        }
        let wait = due.duration_since(now).unwrap_or(Duration::ZERO);
        if !wait.is_zero() {
            tracing::debug!(
                "next backup in {}",
                humantime::format_duration(Duration::from_secs(wait.as_secs()))
            );
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = cancelled(&mut cancel) => return,
        }
        lock(&state).backing_up = true;
        tracing::info!("scheduled backup starting ({schedule})");
        let started = Instant::now();
        let r =
            crate::backup::take::take(&backup_options(&cfg), store.clone(), cancel.clone()).await;
        lock(&state).backing_up = false;
        if *cancel.borrow() {
            return;
        }
        match r {
            Ok(info) => {
                let end = parse_time(&info.stop_time).unwrap_or_else(SystemTime::now);
                last_end = Some(end);
                retry = None;
                metrics_set(&stats.last_backup_unix, unix_secs(end));
                metrics_set(
                    &stats.last_backup_duration_ms,
                    u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                );
                tracing::info!(
                    backup = %info.id,
                    "scheduled backup complete: consistent at {}, {} stored",
                    info.end_lsn,
                    crate::backup::listing::human_bytes(info.stored_bytes)
                );
                if let Some(policy) = cfg.retention {
                    match expire::expire(store.as_ref(), policy, false).await {
                        Ok(rep) => {
                            tracing::info!(
                                "retention {policy}: {} backups and {} WAL objects expired ({}), {} backups kept",
                                rep.backups.len(),
                                rep.wal_objects.len(),
                                crate::backup::listing::human_bytes(rep.bytes),
                                rep.kept.len()
                            );
                            for n in &rep.notes {
                                tracing::info!("retention {policy}: {n}");
                            }
                        }
                        Err(e) => tracing::error!(
                            "retention {policy} failed: {}",
                            with_hint(&e.to_string(), e.hint())
                        ),
                    }
                }
                if let Ok((Some(oldest), _)) = backup_window(store.as_ref()).await {
                    metrics_set(&stats.window_start_unix, unix_secs(oldest));
                }
            }
            Err(e) => {
                let delay = retry.map_or(Duration::from_secs(60), |(_, d)| {
                    (d * 2).min(Duration::from_secs(3600))
                });
                tracing::error!(
                    "scheduled backup failed: {}; trying again in {}",
                    with_hint(&e.to_string(), e.hint()),
                    humantime::format_duration(delay)
                );
                retry = Some((SystemTime::now() + delay, delay));
                // Never later than the schedule itself would run the next one.
                if let Schedule::Every(every) = schedule {
                    if every < delay {
                        retry = Some((SystemTime::now() + every, delay));
                    }
                }
            }
        }
    }
}

fn metrics_set(v: &std::sync::atomic::AtomicU64, x: u64) {
    v.store(x, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_resets() {
        let mut b = Backoff::new();
        let d: Vec<u64> = (0..8)
            .map(|_| b.after_failure(Duration::ZERO).as_secs())
            .collect();
        assert_eq!(d, [2, 4, 8, 16, 32, 64, 120, 120]);
        assert_eq!(b.after_failure(Duration::from_secs(600)).as_secs(), 2);
    }

    #[test]
    fn backup_times_parse() {
        let t = parse_time("2026-12-01T17:00:00.250000Z").unwrap();
        assert_eq!(unix_secs(t), 1_796_144_400);
        assert!(parse_time("yesterday").is_none());
    }
}
