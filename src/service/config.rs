//! The TOML configuration file of `walagent run`: parsing (unknown keys are errors naming the key
//! and its line), `[defaults]` merged into every `[cluster.NAME]`, secrets from a file or an
//! environment variable, `WALAGENT_*` / flag overrides of the top-level keys, the backup
//! schedule (pure, unit-tested) and the masked rendering of `walagent config check`.
//!
//! Format (see README "Running as a service" and `examples/walagent.toml`):
//!
//! ```toml
//! metrics_addr = "127.0.0.1:9187"   # optional
//! log_format = "text"               # or "json"
//! [defaults]                        # optional: any cluster key, for every cluster
//! compress = "zstd:3"
//! [cluster.db1]
//! source = "host=db1 user=replicator"
//! source_password_file = "/run/secrets/db1"
//! archive = "s3://backups/db1"
//! slot = "walagent"
//! backup_every = "24h"              # or backup_at = "01:30" (UTC)
//! retain_full = 7                   # or retain_days = 14
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;

use crate::archive::{self, Compression};
use crate::lifecycle::expire::RetentionPolicy;
use crate::protocol::conninfo::{mask_password, ConnInfo};
use crate::receive::AckMode;

/// The environment variable naming the config file (`--config` wins).
pub const CONFIG_ENV: &str = "WALAGENT_CONFIG";
/// Overrides `metrics_addr` (`--metrics-addr` wins).
pub const METRICS_ADDR_ENV: &str = "WALAGENT_METRICS_ADDR";
/// Overrides `log_format` (`--log-format` wins).
pub const LOG_FORMAT_ENV: &str = "WALAGENT_LOG_FORMAT";

/// Shortest accepted `backup_every` (tests use a few seconds; production a day).
pub const MIN_BACKUP_EVERY: Duration = Duration::from_secs(1);

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    /// JSON lines (timestamp, level, cluster, message, fields).
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!(
                "unknown log format {:?}: use json or text",
                short(s)
            )),
        }
    }
}

impl std::fmt::Display for LogFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

/// Values from flags and the environment that win over the file (flags over variables; the
/// command line resolves that order before handing them here).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    pub metrics_addr: Option<String>,
    pub log_format: Option<String>,
}

/// A config file that cannot be used. Every message names the file and, where known, the line,
/// the cluster and the key; no message quotes a secret.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}{line}: {message}")]
    Syntax {
        path: String,
        /// ` line N` or empty.
        line: String,
        message: String,
        unknown_key: bool,
    },
    #[error("config file {path}: cluster {cluster:?}, key {key}: {message}")]
    Value {
        path: String,
        cluster: String,
        key: &'static str,
        message: String,
        hint: Option<String>,
    },
    #[error("config file {path}: {key}: {message}")]
    Top {
        path: String,
        key: &'static str,
        message: String,
        hint: Option<String>,
    },
    #[error("config file {path} declares no [cluster.NAME] section")]
    NoClusters { path: String },
}

impl ConfigError {
    pub fn hint(&self) -> Option<String> {
        match self {
            ConfigError::Read { .. } => Some(
                "pass an existing file with --config FILE (or WALAGENT_CONFIG); see examples/walagent.toml".into(),
            ),
            ConfigError::Syntax { unknown_key: true, .. } => Some(
                "cluster keys are the long options of `walagent stream` and `walagent backup` with _ for - \
                 (source, archive, slot, create_slot, spool, compress, ack, ...) plus source_password_file, \
                 source_password_env, backup_compress, backup_every, backup_at, retain_full, retain_days; \
                 top-level keys are metrics_addr, log_format, [defaults] and [cluster.NAME]"
                    .into(),
            ),
            ConfigError::Syntax { .. } => Some("fix the TOML syntax at that line".into()),
            ConfigError::Value { hint, .. } | ConfigError::Top { hint, .. } => hint.clone(),
            ConfigError::NoClusters { .. } => {
                Some("add a [cluster.NAME] section with source, archive and slot".into())
            }
        }
    }
}

/// The keys of a `[cluster.NAME]` (and of `[defaults]`), as written in the file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    // The stream (`walagent stream`'s long options).
    source: Option<String>,
    source_password_file: Option<PathBuf>,
    source_password_env: Option<String>,
    archive: Option<String>,
    slot: Option<String>,
    create_slot: Option<bool>,
    synchronous: Option<bool>,
    compress: Option<String>,
    compress_inline: Option<bool>,
    status_interval: Option<Secs>,
    spool: Option<PathBuf>,
    spool_max_size: Option<Size>,
    ack: Option<String>,
    partial_interval: Option<Secs>,
    archive_workers: Option<u32>,
    stop_timeout: Option<Secs>,
    // Backups (`walagent backup`'s long options; `backup_compress` as its --compress).
    checkpoint: Option<String>,
    max_rate: Option<Size>,
    backup_compress: Option<String>,
    compress_threads: Option<u32>,
    label: Option<String>,
    backup_every: Option<String>,
    backup_at: Option<String>,
    // Retention after each scheduled backup.
    retain_full: Option<u32>,
    retain_days: Option<u32>,
}

/// Seconds as an integer or a duration string ("90s", "2m").
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Secs {
    Int(u64),
    Text(String),
}

/// Bytes as an integer or a size string ("1GB", "512MB", "64kB").
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Size {
    Int(u64),
    Text(String),
}

impl RawCluster {
    /// Each key of `self`, else of `defaults`.
    fn or(self, d: &RawCluster) -> RawCluster {
        macro_rules! pick {
            ($($f:ident),*) => { RawCluster { $($f: self.$f.or_else(|| d.$f.clone())),* } };
        }
        pick!(
            source,
            source_password_file,
            source_password_env,
            archive,
            slot,
            create_slot,
            synchronous,
            compress,
            compress_inline,
            status_interval,
            spool,
            spool_max_size,
            ack,
            partial_interval,
            archive_workers,
            stop_timeout,
            checkpoint,
            max_rate,
            backup_compress,
            compress_threads,
            label,
            backup_every,
            backup_at,
            retain_full,
            retain_days
        )
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    metrics_addr: Option<String>,
    log_format: Option<String>,
    #[serde(default)]
    defaults: RawCluster,
    #[serde(default)]
    cluster: BTreeMap<String, RawCluster>,
}

/// Where a cluster's password comes from (shown by `config check`; never the password).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PasswordFrom {
    /// In `source`, `PGPASSWORD`, a password file (`passfile=`, `PGPASSFILE`, `~/.pgpass`), or none.
    Libpq,
    File(PathBuf),
    Env(String),
}

/// The stream options of one cluster (the `walagent stream` flags; `None`: the same default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSettings {
    pub slot: String,
    pub create_slot: bool,
    pub synchronous: bool,
    pub compress: Compression,
    /// Compress every segment before it counts as archived (`--compress-inline`).
    pub compress_inline: bool,
    pub status_interval: Duration,
    pub spool: Option<PathBuf>,
    pub spool_max_size: u64,
    pub ack: AckMode,
    pub partial_interval: Option<Duration>,
    pub archive_workers: Option<usize>,
    pub stop_timeout: Duration,
}

/// The backup options of one cluster (the `walagent backup` flags).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupSettings {
    pub checkpoint_fast: bool,
    pub max_rate_kbps: Option<u32>,
    pub compress: Compression,
    pub compress_threads: Option<u32>,
    pub label: Option<String>,
}

/// When scheduled backups run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// `backup_every`: this long after the end of the newest backup in the archive.
    Every(Duration),
    /// `backup_at = "HH:MM"`: daily at this UTC time (minutes after midnight).
    DailyAt(u32),
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Schedule::Every(d) => write!(f, "every {}", humantime::format_duration(*d)),
            Schedule::DailyAt(m) => write!(f, "daily at {:02}:{:02} UTC", m / 60, m % 60),
        }
    }
}

/// One `[cluster.NAME]`, resolved: everything its task needs but the opened archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    pub name: String,
    /// Parsed `source` with the password from `password_from` put in.
    pub conninfo: ConnInfo,
    /// `source` as written, for display through [`mask_password`] only.
    source: String,
    pub password_from: PasswordFrom,
    pub archive: String,
    pub stream: StreamSettings,
    pub backup: BackupSettings,
    pub schedule: Option<Schedule>,
    pub retention: Option<RetentionPolicy>,
}

/// A whole config file, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub path: PathBuf,
    pub metrics_addr: Option<SocketAddr>,
    /// For the logger (the lead wires it into main.rs's logging set-up).
    pub log_format: LogFormat,
    pub clusters: BTreeMap<String, ClusterConfig>,
}

impl Config {
    /// Reads, parses and resolves `path` (secrets are read now), then applies `overrides`.
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(path, &text, overrides, &|k| std::env::var(k).ok())
    }

    /// [`Config::load`] on `text`, with `env` for `source_password_env`.
    pub fn parse(
        path: &Path,
        text: &str,
        overrides: &Overrides,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let p = path.display().to_string();
        let raw: RawConfig = toml::from_str(text).map_err(|e| syntax_error(&p, text, &e))?;
        let top = |key, message: String, hint: Option<&str>| ConfigError::Top {
            path: p.clone(),
            key,
            message,
            hint: hint.map(str::to_string),
        };
        let metrics_addr = match overrides.metrics_addr.clone().or(raw.metrics_addr) {
            None => None,
            Some(s) if s.is_empty() => None,
            Some(s) => Some(s.parse::<SocketAddr>().map_err(|_| {
                top(
                    "metrics_addr",
                    format!("{:?} is not an IP address with a port", short(&s)),
                    Some("use IP:PORT, e.g. 127.0.0.1:9187 or [::]:9187"),
                )
            })?),
        };
        let log_format = match overrides.log_format.clone().or(raw.log_format) {
            None => LogFormat::default(),
            Some(s) => s.parse().map_err(|m| {
                top(
                    "log_format",
                    m,
                    Some("use log_format = \"json\" or \"text\""),
                )
            })?,
        };
        if raw.cluster.is_empty() {
            return Err(ConfigError::NoClusters { path: p });
        }
        let mut clusters = BTreeMap::new();
        for (name, c) in raw.cluster {
            let c = resolve_cluster(&p, &name, c.or(&raw.defaults), env)?;
            clusters.insert(name, c);
        }
        check_no_sharing(&p, &clusters)?;
        Ok(Config {
            path: path.to_path_buf(),
            metrics_addr,
            log_format,
            clusters,
        })
    }

    /// The log format `walagent run` will use, read before logging starts (and before the
    /// file is fully loaded): the override, else the file's `log_format`; text when neither
    /// says (a file that does not load fails right after, in [`Config::load`], with its error).
    pub fn peek_log_format(path: &Path, overrides: &Overrides) -> LogFormat {
        let from_file = || {
            let text = std::fs::read_to_string(path).ok()?;
            let raw: RawConfig = toml::from_str(&text).ok()?;
            raw.log_format
        };
        overrides
            .log_format
            .clone()
            .or_else(from_file)
            .and_then(|s| s.parse().ok())
            .unwrap_or_default()
    }

    /// The effective settings for `walagent config check`: secrets masked, password files and
    /// variables shown by name.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "# effective settings of {}", self.path.display());
        match self.metrics_addr {
            Some(a) => {
                let _ = writeln!(o, "metrics_addr = \"{a}\"");
            }
            None => {
                let _ = writeln!(o, "# metrics_addr not set: no metrics endpoint");
            }
        }
        let _ = writeln!(o, "log_format = \"{}\"", self.log_format);
        for c in self.clusters.values() {
            c.render_into(&mut o);
        }
        o
    }
}

impl ClusterConfig {
    fn render_into(&self, o: &mut String) {
        let s = &self.stream;
        let b = &self.backup;
        let q = |v: &str| toml_quote(v);
        let _ = writeln!(o, "\n[cluster.{}]", self.name);
        let _ = writeln!(o, "source = {}", q(&mask_password(&self.source)));
        let _ = writeln!(
            o,
            "# connects as: {}",
            self.conninfo.display_safe().replace('\n', " ")
        );
        match &self.password_from {
            PasswordFrom::File(f) => {
                let _ = writeln!(o, "source_password_file = {}", q(&f.display().to_string()));
            }
            PasswordFrom::Env(v) => {
                let _ = writeln!(o, "source_password_env = {}", q(v));
            }
            PasswordFrom::Libpq => {
                let _ = writeln!(
                    o,
                    "# password: {}",
                    if self.conninfo.password.is_some() {
                        "given (in source or PGPASSWORD), not shown"
                    } else {
                        "none given (a password file is consulted: passfile, PGPASSFILE, ~/.pgpass)"
                    }
                );
            }
        }
        let _ = writeln!(o, "archive = {}", q(&self.archive));
        let _ = writeln!(o, "slot = {}", q(&s.slot));
        let _ = writeln!(o, "create_slot = {}", s.create_slot);
        let _ = writeln!(o, "synchronous = {}", s.synchronous);
        let _ = writeln!(o, "compress = {}", q(&s.compress.to_string()));
        let _ = writeln!(o, "compress_inline = {}", s.compress_inline);
        let _ = writeln!(o, "ack = {}", q(ack_name(s.ack)));
        let _ = writeln!(o, "status_interval = {}", s.status_interval.as_secs());
        let remote = archive::is_remote(&self.archive);
        match &s.spool {
            Some(sp) => {
                let _ = writeln!(o, "spool = {}", q(&sp.display().to_string()));
            }
            None => {
                let d = crate::receive::spool::default_dir(&self.archive, remote);
                let _ = writeln!(o, "# spool: default, {}", d.display());
            }
        }
        let _ = writeln!(o, "spool_max_size = {}", s.spool_max_size);
        match s.partial_interval {
            Some(d) => {
                let _ = writeln!(o, "partial_interval = {}", d.as_secs());
            }
            None => {
                let _ = writeln!(
                    o,
                    "# partial_interval: default ({})",
                    if remote {
                        "10 s for S3"
                    } else {
                        "only when stopping, for a directory"
                    }
                );
            }
        }
        match s.archive_workers {
            Some(n) => {
                let _ = writeln!(o, "archive_workers = {n}");
            }
            None => {
                let _ = writeln!(o, "# archive_workers: default (CPUs, at most 4)");
            }
        }
        let _ = writeln!(o, "stop_timeout = {}", s.stop_timeout.as_secs());
        let _ = writeln!(
            o,
            "checkpoint = {}",
            q(if b.checkpoint_fast { "fast" } else { "spread" })
        );
        if let Some(r) = b.max_rate_kbps {
            let _ = writeln!(o, "max_rate = \"{r}kB\"");
        }
        let _ = writeln!(o, "backup_compress = {}", q(&b.compress.to_string()));
        if let Some(n) = b.compress_threads {
            let _ = writeln!(o, "compress_threads = {n}");
        }
        if let Some(l) = &b.label {
            let _ = writeln!(o, "label = {}", q(l));
        }
        match self.schedule {
            Some(Schedule::Every(d)) => {
                let _ = writeln!(
                    o,
                    "backup_every = {}",
                    q(&humantime::format_duration(d).to_string())
                );
            }
            Some(Schedule::DailyAt(m)) => {
                let _ = writeln!(o, "backup_at = \"{:02}:{:02}\"  # UTC", m / 60, m % 60);
            }
            None => {
                let _ = writeln!(o, "# no backup schedule");
            }
        }
        match self.retention {
            Some(RetentionPolicy::Full(n)) => {
                let _ = writeln!(o, "retain_full = {n}");
            }
            Some(RetentionPolicy::Days(d)) => {
                let _ = writeln!(o, "retain_days = {d}");
            }
            None => {
                let _ = writeln!(o, "# no retention policy: nothing is expired");
            }
        }
    }
}

fn ack_name(a: AckMode) -> &'static str {
    match a {
        AckMode::Archived => "archived",
        AckMode::Fsync => "fsync",
    }
}

/// A TOML basic string.
fn toml_quote(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(o, "\\u{:04X}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// A value for an error message, cut short (values here are never secrets: `source` and
/// passwords are not quoted anywhere).
fn short(s: &str) -> String {
    let mut t: String = s.chars().take(60).collect();
    if t.len() < s.len() {
        t.push_str("...");
    }
    t
}

/// One line from a TOML error: its message and line, "unknown field" named as a key, the
/// section named when the error is inside one.
fn syntax_error(path: &str, text: &str, e: &toml::de::Error) -> ConfigError {
    let line_no = e
        .span()
        .and_then(|s| text.get(..s.start))
        .map(|t| t.matches('\n').count() + 1);
    let first = e.message().lines().next().unwrap_or("").trim().to_string();
    let section = line_no.and_then(|n| section_of(text, n));
    let (message, unknown_key) = match first.strip_prefix("unknown field `") {
        Some(rest) => {
            let key = rest.split('`').next().unwrap_or("");
            let inside = section.map(|s| format!(" in [{s}]")).unwrap_or_default();
            (format!("unknown key {:?}{inside}", short(key)), true)
        }
        None => {
            let inside = section.map(|s| format!(" (in [{s}])")).unwrap_or_default();
            (format!("{first}{inside}"), false)
        }
    };
    ConfigError::Syntax {
        path: path.to_string(),
        line: line_no.map(|n| format!(" line {n}")).unwrap_or_default(),
        message,
        unknown_key,
    }
}

/// The table header (`cluster.db1`) in force at 1-based line `n`.
fn section_of(text: &str, n: usize) -> Option<String> {
    text.lines()
        .take(n)
        .filter_map(|l| {
            let t = l.trim();
            let inner = t.strip_prefix('[')?;
            let end = inner.find(']')?;
            Some(inner[..end].trim().to_string())
        })
        .last()
}

/// `[A-Za-z0-9_-]{1,63}`: cluster names label metrics and log lines.
fn valid_cluster_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// As `walagent stream --slot`: lower-case letters, digits and `_`, at most 63.
fn valid_slot(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Sizes like `1GB`, `512MB`, `64kB` or a number of bytes (as the command line's `--spool-max-size`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let bad = || {
        format!(
            "invalid size {:?}: use a number with kB, MB or GB",
            short(s)
        )
    };
    let n: u64 = t[..split].parse().map_err(|_| bad())?;
    let mult: u64 = match t[split..].trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1 << 10,
        "m" | "mb" => 1 << 20,
        "g" | "gb" => 1 << 30,
        "t" | "tb" => 1 << 40,
        _ => return Err(bad()),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {:?} is too large", short(s)))
}

/// A duration: an integer is seconds; a string is humantime's ("90s", "24h", "1h 30m").
fn parse_secs(v: &Secs) -> Result<Duration, String> {
    match v {
        Secs::Int(n) => Ok(Duration::from_secs(*n)),
        Secs::Text(s) => parse_duration(s),
    }
}

/// `backup_every` and duration strings: "24h", "30m", "5s", "1h 30m".
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| {
        format!(
            "invalid duration {:?} ({e}): use a number with a unit, e.g. \"24h\", \"30m\", \"90s\"",
            short(s)
        )
    })
}

/// `backup_at = "HH:MM"` (24-hour, UTC): minutes after midnight.
pub fn parse_daily_time(s: &str) -> Result<u32, String> {
    let bad = || {
        format!(
            "invalid time of day {:?}: use HH:MM (24-hour, UTC), e.g. \"01:30\"",
            short(s)
        )
    };
    let (h, m) = s.trim().split_once(':').ok_or_else(bad)?;
    let digits = |t: &str| t.bytes().all(|b| b.is_ascii_digit());
    if h.is_empty() || h.len() > 2 || m.len() != 2 || !digits(h) || !digits(m) {
        return Err(bad());
    }
    let h: u32 = h.parse().map_err(|_| bad())?;
    let m: u32 = m.parse().map_err(|_| bad())?;
    if h > 23 || m > 59 {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

fn resolve_cluster(
    path: &str,
    name: &str,
    c: RawCluster,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<ClusterConfig, ConfigError> {
    let err = |key: &'static str, message: String, hint: Option<String>| ConfigError::Value {
        path: path.to_string(),
        cluster: name.to_string(),
        key,
        message,
        hint,
    };
    let missing = |key: &'static str, example: &str| {
        err(
            key,
            "missing".into(),
            Some(format!(
                "set {key} in [cluster.{name}] (or in [defaults]), e.g. {key} = {example}"
            )),
        )
    };
    if !valid_cluster_name(name) {
        return Err(err(
            "name",
            format!("invalid cluster name {:?}", short(name)),
            Some("use 1 to 63 letters, digits, _ or - in [cluster.NAME]".into()),
        ));
    }
    let source = c
        .source
        .ok_or_else(|| missing("source", "\"host=db1 user=replicator\""))?;
    let mut conninfo =
        ConnInfo::parse(&source).map_err(|e| err("source", e.to_string(), e.hint()))?;
    let password_from = match (c.source_password_file, c.source_password_env) {
        (Some(_), Some(_)) => {
            return Err(err(
                "source_password_file",
                "both source_password_file and source_password_env are set".into(),
                Some("keep one of them".into()),
            ))
        }
        (Some(file), None) => {
            let text = std::fs::read_to_string(&file).map_err(|e| {
                err(
                    "source_password_file",
                    format!("cannot read {}: {e}", file.display()),
                    Some("point it at a readable file holding only the password".into()),
                )
            })?;
            let pw = text.strip_suffix('\n').unwrap_or(&text);
            let pw = pw.strip_suffix('\r').unwrap_or(pw);
            if pw.is_empty() {
                return Err(err(
                    "source_password_file",
                    format!("{} is empty", file.display()),
                    Some("write the password into it (one line)".into()),
                ));
            }
            conninfo.password = Some(pw.to_string());
            PasswordFrom::File(file)
        }
        (None, Some(var)) => {
            let pw = env(&var).filter(|v| !v.is_empty()).ok_or_else(|| {
                err(
                    "source_password_env",
                    format!("environment variable {:?} is not set", short(&var)),
                    Some(format!(
                        "export {var} in the service's environment (e.g. an EnvironmentFile)"
                    )),
                )
            })?;
            conninfo.password = Some(pw);
            PasswordFrom::Env(var)
        }
        (None, None) => PasswordFrom::Libpq,
    };
    let archive = c
        .archive
        .filter(|a| !a.is_empty())
        .ok_or_else(|| missing("archive", "\"/backup/db1\" or \"s3://bucket/db1\""))?;
    if archive::is_remote(&archive) {
        // Checked now: a location that cannot parse would only be retried at run time.
        archive.parse::<archive::s3::S3Location>().map_err(|e| {
            err(
                "archive",
                e.to_string(),
                Some("write s3://BUCKET/PREFIX".into()),
            )
        })?;
    }
    let slot = c.slot.ok_or_else(|| missing("slot", "\"walagent\""))?;
    if !valid_slot(&slot) {
        return Err(err(
            "slot",
            format!("invalid slot name {:?}", short(&slot)),
            Some("slot names use only lower-case letters, digits and underscores, at most 63 characters".into()),
        ));
    }
    let compression =
        |key: &'static str, v: Option<String>| -> Result<Option<Compression>, ConfigError> {
            v.map(|s| {
                s.parse::<Compression>().map_err(|e| {
                    err(
                        key,
                        e.to_string(),
                        Some("use zstd, zstd:LEVEL or none".into()),
                    )
                })
            })
            .transpose()
        };
    let compress = compression("compress", c.compress)?.unwrap_or(Compression::DEFAULT);
    let backup_compress = compression("backup_compress", c.backup_compress)?.unwrap_or(compress);
    let secs = |key: &'static str, v: Option<Secs>| -> Result<Option<Duration>, ConfigError> {
        v.as_ref()
            .map(|v| parse_secs(v).map_err(|m| err(key, m, None)))
            .transpose()
    };
    let size = |key: &'static str, v: Option<Size>| -> Result<Option<u64>, ConfigError> {
        v.map(|v| match v {
            Size::Int(n) => Ok(n),
            Size::Text(s) => parse_size(&s).map_err(|m| err(key, m, None)),
        })
        .transpose()
    };
    let status_interval = secs("status_interval", c.status_interval)?
        .unwrap_or(Duration::from_secs(10))
        .max(Duration::from_secs(1));
    let synchronous = c.synchronous.unwrap_or(false);
    let ack = match c.ack {
        None => AckMode::Archived,
        Some(a) => a.parse().map_err(|m| err("ack", m, None))?,
    };
    let partial_interval = secs("partial_interval", c.partial_interval)?;
    let stream = StreamSettings {
        slot,
        create_slot: c.create_slot.unwrap_or(false),
        synchronous,
        compress,
        compress_inline: c.compress_inline.unwrap_or(false),
        status_interval,
        spool: c.spool,
        spool_max_size: size("spool_max_size", c.spool_max_size)?.unwrap_or(1 << 30),
        // A synchronous standby's flush must mean on disk now, not once archived.
        ack: if synchronous { AckMode::Fsync } else { ack },
        partial_interval,
        archive_workers: match c.archive_workers {
            None => None,
            Some(0) => {
                return Err(err("archive_workers", "must be at least 1".into(), None));
            }
            Some(n) => Some(n as usize),
        },
        stop_timeout: secs("stop_timeout", c.stop_timeout)?.unwrap_or(Duration::from_secs(20)),
    };
    let checkpoint_fast = match c.checkpoint.as_deref() {
        None | Some("spread") => false,
        Some("fast") => true,
        Some(o) => {
            return Err(err(
                "checkpoint",
                format!("unknown checkpoint mode {:?}", short(o)),
                Some("use spread or fast".into()),
            ))
        }
    };
    let max_rate_kbps = match size("max_rate", c.max_rate)? {
        None => None,
        Some(b) => {
            let kb = b / 1024;
            if !(32..=1_048_576).contains(&kb) {
                return Err(err("max_rate", "outside 32kB..1GB per second".into(), None));
            }
            Some(kb as u32)
        }
    };
    let backup = BackupSettings {
        checkpoint_fast,
        max_rate_kbps,
        compress: backup_compress,
        compress_threads: c.compress_threads,
        label: c.label,
    };
    let schedule = match (c.backup_every, c.backup_at) {
        (Some(_), Some(_)) => {
            return Err(err(
                "backup_every",
                "both backup_every and backup_at are set".into(),
                Some("keep one: an interval (backup_every = \"24h\") or a daily UTC time (backup_at = \"01:30\")".into()),
            ))
        }
        (Some(e), None) => {
            let d = parse_duration(&e).map_err(|m| err("backup_every", m, None))?;
            if d < MIN_BACKUP_EVERY {
                return Err(err("backup_every", "must be at least 1s".into(), None));
            }
            Some(Schedule::Every(d))
        }
        (None, Some(a)) => Some(Schedule::DailyAt(
            parse_daily_time(&a).map_err(|m| err("backup_at", m, None))?,
        )),
        (None, None) => None,
    };
    let retention = match (c.retain_full, c.retain_days) {
        (Some(_), Some(_)) => {
            return Err(err(
                "retain_full",
                "both retain_full and retain_days are set".into(),
                Some("keep one: the newest N backups (retain_full) or those of the last D days (retain_days)".into()),
            ))
        }
        (Some(0), None) => return Err(err("retain_full", "must be at least 1".into(), None)),
        (None, Some(0)) => return Err(err("retain_days", "must be at least 1".into(), None)),
        (Some(n), None) => Some(RetentionPolicy::Full(n)),
        (None, Some(d)) => Some(RetentionPolicy::Days(d)),
        (None, None) => None,
    };
    if retention.is_some() && schedule.is_none() {
        return Err(err(
            if c.retain_full.is_some() {
                "retain_full"
            } else {
                "retain_days"
            },
            "a retention policy is applied after each scheduled backup, but no schedule is set"
                .into(),
            Some("add backup_every or backup_at, or run walagent expire yourself".into()),
        ));
    }
    Ok(ClusterConfig {
        name: name.to_string(),
        conninfo,
        source,
        password_from,
        archive,
        stream,
        backup,
        schedule,
        retention,
    })
}

/// Two clusters must not share an archive or a spool (each is locked by one stream).
fn check_no_sharing(
    path: &str,
    clusters: &BTreeMap<String, ClusterConfig>,
) -> Result<(), ConfigError> {
    let mut archives: BTreeMap<String, &str> = BTreeMap::new();
    let mut spools: BTreeMap<PathBuf, &str> = BTreeMap::new();
    for c in clusters.values() {
        let remote = archive::is_remote(&c.archive);
        let key = if remote {
            c.archive.trim_end_matches('/').to_string()
        } else {
            Path::new(&c.archive)
                .components()
                .collect::<PathBuf>()
                .display()
                .to_string()
        };
        if let Some(other) = archives.insert(key, &c.name) {
            return Err(ConfigError::Value {
                path: path.to_string(),
                cluster: c.name.clone(),
                key: "archive",
                message: format!("the same archive as cluster {other:?}"),
                hint: Some(
                    "give each cluster its own archive (a directory or an S3 prefix)".into(),
                ),
            });
        }
        let spool = c
            .stream
            .spool
            .clone()
            .unwrap_or_else(|| crate::receive::spool::default_dir(&c.archive, remote));
        let spool: PathBuf = spool.components().collect();
        if let Some(other) = spools.insert(spool, &c.name) {
            return Err(ConfigError::Value {
                path: path.to_string(),
                cluster: c.name.clone(),
                key: "spool",
                message: format!("the same spool directory as cluster {other:?}"),
                hint: Some("give each cluster its own spool".into()),
            });
        }
    }
    Ok(())
}

/// When the next scheduled backup should start, given the end of the newest backup in the
/// archive (`None`: there is none) and the time now. A time at or before `now` means now.
///
/// - `Every(d)`: `d` after the newest backup's end (now when there is none).
/// - `DailyAt(t)`: the next `t` (UTC); but now when the newest backup ended before the most
///   recent `t` (a run missed while the service was down, or no backup at all).
pub fn next_backup(
    schedule: Schedule,
    last_end: Option<SystemTime>,
    now: SystemTime,
) -> SystemTime {
    match schedule {
        Schedule::Every(d) => match last_end {
            None => now,
            Some(l) => l.checked_add(d).unwrap_or(now),
        },
        Schedule::DailyAt(minute) => {
            let now_s = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
            let day = now_s - now_s % 86_400;
            let at = u64::from(minute) * 60;
            let prev = if day + at <= now_s {
                day + at
            } else {
                (day + at).saturating_sub(86_400)
            };
            let prev_t = UNIX_EPOCH + Duration::from_secs(prev);
            match last_end {
                Some(l) if l >= prev_t => UNIX_EPOCH + Duration::from_secs(prev + 86_400),
                _ => now,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        parse_env(text, &[])
    }

    fn parse_env(text: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        Config::parse(
            Path::new("/etc/walagent.toml"),
            text,
            &Overrides::default(),
            &move |k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()),
        )
    }

    const TWO: &str = r#"
metrics_addr = "127.0.0.1:9187"
log_format = "json"

[defaults]
compress = "zstd:3"
stop_timeout = "30s"
slot = "walagent"

[cluster.db1]
source = "postgresql://replicator:hunter2@db1/postgres"
archive = "/backup/db1"
backup_every = "24h"
retain_full = 7

[cluster.db2]
source = "host=db2 user=replicator"
source_password_env = "DB2_PASSWORD"
archive = "s3://backups/db2"
slot = "other"
compress = "none"
backup_at = "01:30"
retain_days = 14
spool_max_size = "512MB"
status_interval = 5
"#;

    #[test]
    fn two_clusters_with_defaults() {
        let c = parse_env(TWO, &[("DB2_PASSWORD", "s3cret")]).unwrap();
        assert_eq!(c.metrics_addr, Some("127.0.0.1:9187".parse().unwrap()));
        assert_eq!(c.log_format, LogFormat::Json);
        let db1 = &c.clusters["db1"];
        assert_eq!(db1.stream.slot, "walagent");
        assert_eq!(db1.stream.compress, Compression::Zstd { level: 3 });
        assert_eq!(db1.backup.compress, Compression::Zstd { level: 3 });
        assert_eq!(db1.stream.stop_timeout, Duration::from_secs(30));
        assert_eq!(db1.stream.status_interval, Duration::from_secs(10));
        assert_eq!(
            db1.schedule,
            Some(Schedule::Every(Duration::from_secs(86_400)))
        );
        assert_eq!(db1.retention, Some(RetentionPolicy::Full(7)));
        assert_eq!(db1.password_from, PasswordFrom::Libpq);
        let db2 = &c.clusters["db2"];
        assert_eq!(db2.stream.slot, "other");
        assert_eq!(db2.stream.compress, Compression::None);
        assert_eq!(db2.stream.spool_max_size, 512 << 20);
        assert_eq!(db2.stream.status_interval, Duration::from_secs(5));
        assert_eq!(db2.conninfo.password.as_deref(), Some("s3cret"));
        assert_eq!(db2.password_from, PasswordFrom::Env("DB2_PASSWORD".into()));
        assert_eq!(db2.schedule, Some(Schedule::DailyAt(90)));
        assert_eq!(db2.retention, Some(RetentionPolicy::Days(14)));
    }

    /// examples/walagent.toml is a valid config (its password file pointed at a real one).
    #[test]
    fn example_file_parses() {
        let text = include_str!("../../examples/walagent.toml");
        let pw = std::env::temp_dir().join(format!("walagent-example-pw-{}", std::process::id()));
        std::fs::write(&pw, "x\n").unwrap();
        let text = text.replace("/etc/walagent/orders.pw", pw.to_str().unwrap());
        let c = parse_env(&text, &[("BILLING_PGPASSWORD", "y")]).unwrap();
        std::fs::remove_file(&pw).unwrap();
        assert_eq!(c.clusters.len(), 2);
        assert_eq!(c.clusters["orders"].schedule, Some(Schedule::DailyAt(90)));
        assert_eq!(
            c.clusters["billing"].retention,
            Some(RetentionPolicy::Days(14))
        );
        assert_eq!(c.clusters["billing"].stream.slot, "walagent");
    }

    #[test]
    fn render_masks_secrets() {
        let c = parse_env(TWO, &[("DB2_PASSWORD", "s3cret")]).unwrap();
        let r = c.render();
        assert!(!r.contains("hunter2") && !r.contains("s3cret"), "{r}");
        assert!(
            r.contains("postgresql://replicator:********@db1/postgres"),
            "{r}"
        );
        assert!(r.contains("source_password_env = \"DB2_PASSWORD\""), "{r}");
        assert!(
            r.contains("[cluster.db2]") && r.contains("backup_at = \"01:30\""),
            "{r}"
        );
        // The rendering is itself a config file (comments aside), to the same effect.
        let again = parse_env(&r, &[("DB2_PASSWORD", "s3cret")]).unwrap();
        assert_eq!(again.clusters["db2"], c.clusters["db2"]);
    }

    #[test]
    fn password_file() {
        let dir = std::env::temp_dir().join(format!("walagent-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("pw");
        std::fs::write(&f, "pa ss\n").unwrap();
        let text = format!(
            "[cluster.a]\nsource = \"host=h user=u\"\nsource_password_file = {}\narchive = \"/a\"\nslot = \"s\"\n",
            toml_quote(f.to_str().unwrap())
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.clusters["a"].conninfo.password.as_deref(), Some("pa ss"));
        assert!(!c.render().contains("pa ss"));
        std::fs::write(&f, "").unwrap();
        let e = parse(&text).unwrap_err();
        assert!(
            e.to_string()
                .contains("cluster \"a\", key source_password_file"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
        let e = parse(&text).unwrap_err();
        assert!(e.to_string().contains("cannot read"), "{e}");
        let e = parse_env("[cluster.a]\nsource = \"host=h\"\nsource_password_env = \"NOPE\"\narchive = \"/a\"\nslot = \"s\"\n", &[]).unwrap_err();
        assert!(e.to_string().contains("\"NOPE\" is not set"), "{e}");
    }

    #[test]
    fn unknown_keys_name_key_and_line() {
        let e = parse("[cluster.db1]\nsource = \"host=h\"\narchive = \"/a\"\nslot = \"s\"\ncompresss = \"none\"\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "config file /etc/walagent.toml line 5: unknown key \"compresss\" in [cluster.db1]"
        );
        assert!(e.hint().unwrap().contains("backup_every"));
        let e = parse("metrics = 1\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "config file /etc/walagent.toml line 1: unknown key \"metrics\""
        );
        let e = parse("[defaults]\nendpos = \"0/1\"\n").unwrap_err();
        assert!(
            e.to_string()
                .contains("line 2: unknown key \"endpos\" in [defaults]"),
            "{e}"
        );
        let e = parse("[cluster.db1]\nslot = 3\n").unwrap_err();
        assert!(e.to_string().contains("line 2:"), "{e}");
        assert!(e.to_string().contains("[cluster.db1]"), "{e}");
        let e = parse("[cluster.db1\n").unwrap_err();
        assert!(e.to_string().contains("line 1:"), "{e}");
        assert!(!e.to_string().contains('\n'));
    }

    #[test]
    fn bad_values_name_cluster_and_key() {
        let base = "[cluster.x]\nsource = \"host=h\"\narchive = \"/a\"\nslot = \"s\"\n";
        for (extra, key) in [
            ("backup_every = \"often\"", "backup_every"),
            ("backup_every = \"0s\"", "backup_every"),
            ("backup_at = \"25:00\"", "backup_at"),
            ("backup_at = \"1:3\"", "backup_at"),
            ("compress = \"gzip\"", "compress"),
            ("ack = \"maybe\"", "ack"),
            ("spool_max_size = \"lots\"", "spool_max_size"),
            ("stop_timeout = \"soon\"", "stop_timeout"),
            ("checkpoint = \"now\"", "checkpoint"),
            ("max_rate = \"1kB\"", "max_rate"),
            ("retain_full = 0", "retain_full"),
            (
                "retain_full = 2\nretain_days = 3\nbackup_every = \"1h\"",
                "retain_full",
            ),
            ("retain_days = 3", "retain_days"),
            (
                "backup_every = \"1h\"\nbackup_at = \"01:00\"",
                "backup_every",
            ),
            ("archive_workers = 0", "archive_workers"),
        ] {
            let e = parse(&format!("{base}{extra}\n")).unwrap_err();
            let s = e.to_string();
            assert!(
                s.contains(&format!("cluster \"x\", key {key}:")),
                "{extra}: {s}"
            );
        }
        let e = parse("[cluster.x]\nsource = \"host=h\"\narchive = \"/a\"\nslot = \"Bad-Slot\"\n")
            .unwrap_err();
        assert!(e.to_string().contains("key slot"), "{e}");
        let e = parse("[cluster.x]\nsource = \"host=h\"\narchive = \"s3:///p\"\nslot = \"s\"\n")
            .unwrap_err();
        assert!(e.to_string().contains("cluster \"x\", key archive:"), "{e}");
        let e = parse("[cluster.x]\narchive = \"/a\"\nslot = \"s\"\n").unwrap_err();
        assert!(e.to_string().contains("key source: missing"), "{e}");
        let e = parse("[cluster.\"a b\"]\nsource = \"host=h\"\narchive = \"/a\"\nslot = \"s\"\n")
            .unwrap_err();
        assert!(e.to_string().contains("invalid cluster name"), "{e}");
        let e = parse("log_format = \"xml\"\n[cluster.x]\nsource = \"host=h\"\narchive = \"/a\"\nslot = \"s\"\n").unwrap_err();
        assert!(
            e.to_string().contains("log_format: unknown log format"),
            "{e}"
        );
        assert!(matches!(
            parse("log_format = \"text\"\n"),
            Err(ConfigError::NoClusters { .. })
        ));
        // A conninfo error never quotes the string.
        let e = parse("[cluster.x]\nsource = \"host=h password=a b=secretword\"\narchive = \"/a\"\nslot = \"s\"\n");
        if let Err(e) = e {
            assert!(!e.to_string().contains("secretword"), "{e}");
        }
    }

    #[test]
    fn shared_archive_or_spool_is_refused() {
        let e = parse("[cluster.a]\nsource = \"host=h\"\narchive = \"/a\"\nslot = \"s\"\n[cluster.b]\nsource = \"host=i\"\narchive = \"/a/\"\nslot = \"s\"\n").unwrap_err();
        assert!(e.to_string().contains("same archive"), "{e}");
        let e = parse("[defaults]\nspool = \"/sp\"\n[cluster.a]\nsource = \"host=h\"\narchive = \"/a\"\nslot = \"s\"\n[cluster.b]\nsource = \"host=i\"\narchive = \"/b\"\nslot = \"s\"\n").unwrap_err();
        assert!(e.to_string().contains("same spool"), "{e}");
    }

    #[test]
    fn overrides_win_over_the_file() {
        let o = Overrides {
            metrics_addr: Some("[::1]:9000".into()),
            log_format: Some("text".into()),
        };
        let c = Config::parse(Path::new("f"), TWO, &o, &|_| Some("pw".into())).unwrap();
        assert_eq!(c.metrics_addr, Some("[::1]:9000".parse().unwrap()));
        assert_eq!(c.log_format, LogFormat::Text);
        // An empty override turns metrics off.
        let o = Overrides {
            metrics_addr: Some(String::new()),
            log_format: None,
        };
        let c = Config::parse(Path::new("f"), TWO, &o, &|_| Some("pw".into())).unwrap();
        assert_eq!((c.metrics_addr, c.log_format), (None, LogFormat::Json));
        let o = Overrides {
            metrics_addr: Some("localhost".into()),
            log_format: None,
        };
        let e = Config::parse(Path::new("f"), TWO, &o, &|_| Some("pw".into())).unwrap_err();
        assert!(e.to_string().contains("metrics_addr"), "{e}");
    }

    #[test]
    fn log_format_before_loading() {
        let dir = std::env::temp_dir().join(format!("walagent-peek-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.toml");
        std::fs::write(
            &f,
            "log_format = \"json\"\n[cluster.a]\nsource_password_file = \"/nope\"\n",
        )
        .unwrap();
        let none = Overrides::default();
        assert_eq!(Config::peek_log_format(&f, &none), LogFormat::Json);
        let text = Overrides {
            log_format: Some("text".into()),
            ..Default::default()
        };
        assert_eq!(Config::peek_log_format(&f, &text), LogFormat::Text);
        assert_eq!(
            Config::peek_log_format(&dir.join("missing"), &none),
            LogFormat::Text
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("").is_err());
        assert_eq!(parse_daily_time("01:30"), Ok(90));
        assert_eq!(parse_daily_time("23:59"), Ok(1439));
        assert_eq!(parse_daily_time("0:00"), Ok(0));
        for bad in [
            "24:00", "12:60", "1230", "12:3", ":30", "aa:bb", "-1:30", "+1:30", "1:+3",
        ] {
            assert!(parse_daily_time(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_size("1GB"), Ok(1 << 30));
        assert_eq!(parse_size("64kB"), Ok(64 << 10));
        assert!(parse_size("1.5GB").is_err());
        assert!(parse_size("99999999999TB").is_err());
    }

    fn t(s: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(s)
    }

    #[test]
    fn schedule_every() {
        let day = 86_400;
        let every = Schedule::Every(Duration::from_secs(day));
        assert_eq!(next_backup(every, None, t(1000)), t(1000), "none yet: now");
        assert_eq!(next_backup(every, Some(t(500)), t(1000)), t(500 + day));
        assert_eq!(
            next_backup(every, Some(t(0)), t(2 * day)),
            t(day),
            "overdue: in the past"
        );
    }

    #[test]
    fn schedule_daily() {
        let day = 86_400;
        let at = Schedule::DailyAt(90); // 01:30 UTC
        let d0 = 20_000 * day; // some midnight UTC
        let slot = d0 + 5400;
        // Before today's slot, yesterday's backup done: today's slot.
        assert_eq!(
            next_backup(at, Some(t(slot - day + 60)), t(d0 + 60)),
            t(slot)
        );
        // After today's slot, today's backup done: tomorrow's.
        assert_eq!(
            next_backup(at, Some(t(slot + 600)), t(slot + 3600)),
            t(slot + day)
        );
        // Today's slot missed (the service was down): now.
        assert_eq!(
            next_backup(at, Some(t(slot - day + 600)), t(slot + 3600)),
            t(slot + 3600)
        );
        // No backup at all: now.
        assert_eq!(next_backup(at, None, t(d0 + 60)), t(d0 + 60));
        // Exactly at the slot with yesterday's done: now.
        assert_eq!(next_backup(at, Some(t(slot - day + 600)), t(slot)), t(slot));
        let midnight = Schedule::DailyAt(0);
        assert_eq!(
            next_backup(midnight, Some(t(d0 + 1)), t(d0 + 100)),
            t(d0 + day)
        );
    }
}
