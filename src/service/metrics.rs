//! Prometheus metrics (`/metrics`) and health endpoints (`/healthz`, `/readyz`) for `walagent run`
//! and `walagent stream --metrics-addr`.
//!
//! Interface (stable between the service and metrics work): the runner registers each cluster
//! with [`Registry::add_cluster`], hands `ClusterStats::stream` to the cluster's
//! `StreamOptions::stats`, records backups in the other fields, and calls [`serve`] once (or
//! [`bind`] first, to report a busy address with its fix before anything else starts, then
//! [`serve_on`]).
//!
//! Nothing is counted twice: every figure lives in the clusters' atomics and is read at scrape
//! time by a prometheus-client [`Collector`], so a cluster added or removed between scrapes
//! simply appears or disappears. The metric names, types and meanings are in
//! `proto-notes/metrics.md`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::receive::stats::StreamStats;

/// One cluster's figures: the stream's, plus the scheduler's (backups, retention).
#[derive(Debug, Default)]
pub struct ClusterStats {
    pub name: String,
    pub stream: Arc<StreamStats>,
    /// End of the last successful backup, seconds since the epoch (0: none yet).
    pub last_backup_unix: AtomicU64,
    pub last_backup_duration_ms: AtomicU64,
    /// Earliest point a restore can reach, seconds since the epoch (0: unknown).
    pub window_start_unix: AtomicU64,
}

impl ClusterStats {
    /// Ready: streaming, and the archive answered the last time it was used.
    pub fn is_ready(&self) -> bool {
        StreamStats::flag(&self.stream.streaming)
            && StreamStats::flag(&self.stream.archive_reachable)
    }

    /// Why the cluster is not ready (`None`: it is).
    fn not_ready_because(&self) -> Option<&'static str> {
        let streaming = StreamStats::flag(&self.stream.streaming);
        let reachable = StreamStats::flag(&self.stream.archive_reachable);
        match (streaming, reachable) {
            (true, true) => None,
            (false, true) => Some("not streaming"),
            (true, false) => Some("archive unreachable"),
            (false, false) => Some("not streaming, archive unreachable"),
        }
    }
}

/// Every cluster of the process, by name.
#[derive(Debug, Default)]
pub struct Registry {
    clusters: Mutex<BTreeMap<String, Arc<ClusterStats>>>,
}

impl Registry {
    /// Registers `name` (or returns the one already registered).
    pub fn add_cluster(&self, name: &str) -> Arc<ClusterStats> {
        let mut c = self.clusters.lock().unwrap_or_else(|p| p.into_inner());
        c.entry(name.to_string())
            .or_insert_with(|| {
                Arc::new(ClusterStats {
                    name: name.to_string(),
                    ..Default::default()
                })
            })
            .clone()
    }

    pub fn remove_cluster(&self, name: &str) {
        let mut c = self.clusters.lock().unwrap_or_else(|p| p.into_inner());
        c.remove(name);
    }

    pub fn clusters(&self) -> Vec<Arc<ClusterStats>> {
        let c = self.clusters.lock().unwrap_or_else(|p| p.into_inner());
        c.values().cloned().collect()
    }

    /// The `/readyz` answer: `Ok` when every registered cluster is ready (and there is at least
    /// one), else the reasons, one `NAME: WHY` per cluster that is not.
    pub fn readiness(&self) -> Result<(), String> {
        let clusters = self.clusters();
        if clusters.is_empty() {
            return Err("no cluster registered".into());
        }
        let not: Vec<String> = clusters
            .iter()
            .filter_map(|c| {
                c.not_ready_because()
                    .map(|why| format!("{}: {why}", c.name))
            })
            .collect();
        if not.is_empty() {
            Ok(())
        } else {
            Err(not.join("; "))
        }
    }
}

/// Error kinds always exported (as 0 until they happen), so that `rate()` and alerts see the
/// series from the start; kinds counted that are not listed here are exported too.
const ERROR_KINDS: [&str; 6] = ["archive", "connection", "server", "slot", "spool", "wal"];

/// Reads the registry's clusters at scrape time.
#[derive(Debug)]
struct ClusterCollector(Arc<Registry>);

type Labels = Vec<(&'static str, String)>;

fn gauge<N: prometheus_client::encoding::EncodeGaugeValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (Labels, N)>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in series {
        ConstGauge::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// `name` without `_total` (the encoder appends it to counters).
fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (Labels, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in series {
        ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// An LSN or byte count as a gauge value (Prometheus keeps them as doubles anyway).
fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Collector for ClusterCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let clusters = self.0.clusters();
        let label = |c: &ClusterStats| -> Labels { vec![("cluster", c.name.clone())] };
        let each = |f: &dyn Fn(&ClusterStats) -> u64| -> Vec<(Labels, i64)> {
            clusters.iter().map(|c| (label(c), int(f(c)))).collect()
        };
        let each_counter = |f: &dyn Fn(&StreamStats) -> u64| -> Vec<(Labels, u64)> {
            clusters.iter().map(|c| (label(c), f(&c.stream))).collect()
        };
        let g = StreamStats::get;
        let e = &mut enc;
        gauge(
            e,
            "walagent_up",
            "1 while the cluster's replication stream is running, else 0",
            each(&|c| u64::from(StreamStats::flag(&c.stream.streaming))),
        )?;
        gauge(
            e,
            "walagent_archive_reachable",
            "1 while the last store operation on the cluster's archive succeeded, else 0",
            each(&|c| u64::from(StreamStats::flag(&c.stream.archive_reachable))),
        )?;
        gauge(
            e,
            "walagent_received_lsn",
            "End of the WAL received from the server (byte position)",
            each(&|c| g(&c.stream.received_lsn)),
        )?;
        gauge(
            e,
            "walagent_flushed_lsn",
            "Flush position last reported to the server (byte position; pg_stat_replication.flush_lsn)",
            each(&|c| g(&c.stream.flushed_lsn)),
        )?;
        gauge(
            e,
            "walagent_archived_lsn",
            "End of the contiguous WAL durable in the archive, newest .partial included (byte position)",
            each(&|c| g(&c.stream.archived_lsn)),
        )?;
        gauge(
            e,
            "walagent_server_lsn",
            "The server's WAL end as last seen in the stream (byte position)",
            each(&|c| g(&c.stream.server_lsn)),
        )?;
        gauge(
            e,
            "walagent_lag_bytes",
            "walagent_server_lsn - walagent_flushed_lsn: WAL the server has that is not yet reported safe",
            each(&|c| {
                g(&c.stream.server_lsn).saturating_sub(g(&c.stream.flushed_lsn))
            }),
        )?;
        gauge(
            e,
            "walagent_spool_bytes",
            "WAL received but not yet archived as complete segments (held in the spool)",
            each(&|c| g(&c.stream.spool_bytes)),
        )?;
        counter(
            e,
            "walagent_segments_archived",
            "Complete WAL segments stored in the archive",
            each_counter(&|s| g(&s.segments_archived)),
        )?;
        counter(
            e,
            "walagent_wal_bytes",
            "Raw WAL bytes stored in the archive (segments and .partial uploads, before compression)",
            each_counter(&|s| g(&s.wal_bytes)),
        )?;
        counter(
            e,
            "walagent_stored_bytes",
            "Bytes written to the archive for WAL (after compression)",
            each_counter(&|s| g(&s.stored_bytes)),
        )?;
        counter(
            e,
            "walagent_reconnects",
            "Times the stream was retried after losing or failing to open its connection",
            each_counter(&|s| g(&s.reconnects)),
        )?;
        let mut errors = Vec::new();
        for c in &clusters {
            let counted = c.stream.errors();
            let mut kinds: Vec<&str> = ERROR_KINDS.to_vec();
            for (k, _) in &counted {
                if !kinds.contains(k) {
                    kinds.push(k);
                }
            }
            kinds.sort_unstable();
            for k in kinds {
                let n = counted
                    .iter()
                    .find(|(ck, _)| *ck == k)
                    .map_or(0, |(_, n)| *n);
                errors.push((
                    vec![("cluster", c.name.clone()), ("kind", k.to_string())],
                    n,
                ));
            }
        }
        counter(
            e,
            "walagent_errors",
            "Errors by kind: archive, connection, server, slot, spool, wal",
            errors,
        )?;
        gauge(
            e,
            "walagent_last_archived_timestamp_seconds",
            "When WAL was last stored in the archive (Unix time; 0: not yet)",
            each(&|c| g(&c.stream.last_archived_unix)),
        )?;
        gauge(
            e,
            "walagent_last_backup_timestamp_seconds",
            "When the last successful base backup ended (Unix time; 0: none yet)",
            each(&|c| g(&c.last_backup_unix)),
        )?;
        gauge(
            e,
            "walagent_last_backup_duration_seconds",
            "How long the last successful base backup took",
            clusters
                .iter()
                .map(|c| (label(c), g(&c.last_backup_duration_ms) as f64 / 1000.0)),
        )?;
        gauge(
            e,
            "walagent_recoverable_window_start_timestamp_seconds",
            "The earliest point a restore can reach (Unix time; 0: unknown)",
            each(&|c| g(&c.window_start_unix)),
        )?;
        Ok(())
    }
}

/// The registry's figures in the Prometheus text format (version 0.0.4).
pub fn render(registry: &Arc<Registry>) -> String {
    let mut prom = prometheus_client::registry::Registry::default();
    prom.register_collector(Box::new(ClusterCollector(registry.clone())));
    let mut out = String::new();
    // Writing to a String cannot fail; the collector returns no error of its own.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &prom);
    out
}

/// The metrics address could not be used.
#[derive(Debug, thiserror::Error)]
#[error("metrics address {addr}: {source}")]
pub struct BindError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

impl BindError {
    pub fn hint(&self) -> Option<String> {
        Some(match self.source.kind() {
            std::io::ErrorKind::AddrInUse => format!(
                "another process listens on port {} (another walagent?): pick a free port with --metrics-addr (config metrics_addr)",
                self.addr.port()
            ),
            std::io::ErrorKind::PermissionDenied => {
                "ports below 1024 need privileges: use a port of 1024 or above".into()
            }
            std::io::ErrorKind::AddrNotAvailable => format!(
                "{} is not an address of this host: use 0.0.0.0 (all) or 127.0.0.1 (local only)",
                self.addr.ip()
            ),
            _ => "check --metrics-addr (HOST:PORT)".into(),
        })
    }
}

/// Binds the metrics address (before anything else starts, so a busy port is reported first).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })
}

/// Most connections served at once; more are closed at once (scrapers and probes need few).
const MAX_CONNECTIONS: usize = 64;

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr` until `shutdown` turns true.
pub async fn serve(
    addr: SocketAddr,
    registry: Arc<Registry>,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let listener = bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.source.kind(), e.to_string()))?;
    serve_on(listener, registry, shutdown).await
}

/// Serves on a listener from [`bind`] until `shutdown` turns true (or its sender is dropped).
pub async fn serve_on(
    listener: TcpListener,
    registry: Arc<Registry>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    if let Ok(a) = listener.local_addr() {
        tracing::info!(addr = %a, "serving /metrics, /healthz and /readyz");
    }
    let mut conns = tokio::task::JoinSet::new();
    loop {
        if *shutdown.borrow_and_update() {
            break;
        }
        let accepted = tokio::select! {
            a = listener.accept() => a,
            c = shutdown.changed() => {
                if c.is_err() {
                    break;
                }
                continue;
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of file descriptors and the like: wait a little rather than spin.
                tracing::warn!("metrics endpoint: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if conns.len() >= MAX_CONNECTIONS {
            drop(stream);
            continue;
        }
        let registry = registry.clone();
        conns.spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let registry = registry.clone();
                async move { Ok::<_, Infallible>(respond(&req, &registry)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
    conns.abort_all();
    Ok(())
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    r
}

/// The answer to one request.
fn respond<B>(req: &Request<B>, registry: &Arc<Registry>) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            PLAIN,
            "only GET and HEAD\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => text(
            StatusCode::OK,
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            render(registry),
        ),
        "/healthz" => text(StatusCode::OK, PLAIN, "ok\n".into()),
        "/readyz" => match registry.readiness() {
            Ok(()) => text(StatusCode::OK, PLAIN, "ready\n".into()),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                PLAIN,
                format!("not ready: {why}\n"),
            ),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            PLAIN,
            "not found: try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Arc<Registry> {
        let r = Arc::new(Registry::default());
        let a = r.add_cluster("main");
        StreamStats::set(&a.stream.server_lsn, 0x3000100);
        StreamStats::set(&a.stream.flushed_lsn, 0x3000000);
        StreamStats::add(&a.stream.segments_archived, 2);
        a.stream.error("connection");
        a.stream.error("odd");
        StreamStats::set(&a.last_backup_duration_ms, 1500);
        r
    }

    /// `NAME{LABELS} VALUE` lines of the rendered text.
    fn value(text: &str, series: &str) -> Option<String> {
        text.lines().find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')
                .map(str::to_string)
        })
    }

    #[test]
    fn renders_every_metric_with_its_type_and_cluster_label() {
        let r = sample();
        let t = render(&r);
        for (name, kind) in [
            ("walagent_up", "gauge"),
            ("walagent_received_lsn", "gauge"),
            ("walagent_flushed_lsn", "gauge"),
            ("walagent_archived_lsn", "gauge"),
            ("walagent_server_lsn", "gauge"),
            ("walagent_lag_bytes", "gauge"),
            ("walagent_segments_archived_total", "counter"),
            ("walagent_wal_bytes_total", "counter"),
            ("walagent_stored_bytes_total", "counter"),
            ("walagent_spool_bytes", "gauge"),
            ("walagent_reconnects_total", "counter"),
            ("walagent_errors_total", "counter"),
            ("walagent_last_archived_timestamp_seconds", "gauge"),
            ("walagent_last_backup_timestamp_seconds", "gauge"),
            ("walagent_last_backup_duration_seconds", "gauge"),
            (
                "walagent_recoverable_window_start_timestamp_seconds",
                "gauge",
            ),
        ] {
            assert!(
                t.contains(&format!("# TYPE {name} {kind}\n")),
                "{name}:\n{t}"
            );
            assert!(
                t.contains(&format!("\n{name}{{cluster=\"main\"")),
                "{name}:\n{t}"
            );
        }
        assert_eq!(
            value(&t, "walagent_lag_bytes{cluster=\"main\"}").as_deref(),
            Some("256")
        );
        assert_eq!(
            value(&t, "walagent_flushed_lsn{cluster=\"main\"}").as_deref(),
            Some("50331648")
        );
        assert_eq!(
            value(&t, "walagent_segments_archived_total{cluster=\"main\"}").as_deref(),
            Some("2")
        );
        assert_eq!(
            value(
                &t,
                "walagent_last_backup_duration_seconds{cluster=\"main\"}"
            )
            .as_deref(),
            Some("1.5")
        );
        let errors = |kind: &str| {
            value(
                &t,
                &format!("walagent_errors_total{{cluster=\"main\",kind=\"{kind}\"}}"),
            )
        };
        assert_eq!(errors("connection").as_deref(), Some("1"));
        assert_eq!(
            errors("archive").as_deref(),
            Some("0"),
            "known kinds start at 0"
        );
        assert_eq!(errors("odd").as_deref(), Some("1"), "other kinds are kept");
    }

    #[test]
    fn clusters_added_and_removed_between_scrapes() {
        let r = sample();
        assert!(!render(&r).contains("cluster=\"other\""));
        r.add_cluster("other");
        let t = render(&r);
        assert!(t.contains("walagent_up{cluster=\"other\"} 0"), "{t}");
        assert!(t.contains("walagent_up{cluster=\"main\"} 0"), "{t}");
        r.remove_cluster("main");
        let t = render(&r);
        assert!(!t.contains("cluster=\"main\""), "{t}");
        assert!(t.contains("cluster=\"other\""), "{t}");
        r.remove_cluster("other");
        let t = render(&r);
        assert!(
            t.contains("# TYPE walagent_up gauge"),
            "descriptors stay: {t}"
        );
        assert!(!t.contains("cluster="), "{t}");
    }

    #[test]
    fn label_values_are_escaped() {
        let r = Arc::new(Registry::default());
        r.add_cluster("we\"ird\\name\n");
        let t = render(&r);
        assert!(
            t.contains(r#"walagent_up{cluster="we\"ird\\name\n"} 0"#),
            "{t}"
        );
    }

    #[test]
    fn readiness_names_the_clusters_that_are_not_ready() {
        let r = Arc::new(Registry::default());
        assert_eq!(r.readiness(), Err("no cluster registered".into()));
        let a = r.add_cluster("a");
        let b = r.add_cluster("b");
        for c in [&a, &b] {
            StreamStats::set_flag(&c.stream.streaming, true);
            StreamStats::set_flag(&c.stream.archive_reachable, true);
        }
        assert_eq!(r.readiness(), Ok(()));
        StreamStats::set_flag(&b.stream.archive_reachable, false);
        assert_eq!(r.readiness(), Err("b: archive unreachable".into()));
        StreamStats::set_flag(&a.stream.streaming, false);
        assert_eq!(
            r.readiness(),
            Err("a: not streaming; b: archive unreachable".into())
        );
    }

    #[test]
    fn a_busy_address_names_the_fix() {
        let e = BindError {
            addr: "127.0.0.1:9187".parse().unwrap(),
            source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
        };
        assert!(e.hint().unwrap().contains("9187"), "{:?}", e.hint());
        assert!(!e.to_string().contains('\n'));
    }

    #[test]
    fn routes() {
        let r = sample();
        let get = |path: &str| {
            let req = Request::get(path).body(()).unwrap();
            respond(&req, &r)
        };
        assert_eq!(get("/metrics").status(), StatusCode::OK);
        assert_eq!(get("/healthz").status(), StatusCode::OK);
        assert_eq!(get("/readyz").status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(get("/nope").status(), StatusCode::NOT_FOUND);
        let post = Request::post("/metrics").body(()).unwrap();
        assert_eq!(respond(&post, &r).status(), StatusCode::METHOD_NOT_ALLOWED);
    }
}
