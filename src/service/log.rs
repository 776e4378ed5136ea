//! Log output on stderr: `text` (tracing-subscriber's own format, for people) or `json` (one
//! object a line, for log collectors):
//!
//! ```json
//! {"timestamp":"2026-12-01T17:00:00.123456Z","level":"INFO","cluster":"default","message":"connected","fields":{"server":"db:5432","tls":false},"target":"walagent::receive"}
//! ```
//!
//! `cluster` is the `cluster` field of the innermost span that has one (`walagent run` wraps each
//! cluster's work in such a span), else `default`. `fields` holds the event's other fields:
//! numbers and booleans as JSON numbers and booleans, anything else as its text.

use std::fmt;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::{Context, SubscriberExt as _};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::Layer;

/// The cluster label when no span names one (a plain `walagent stream`).
pub const DEFAULT_CLUSTER: &str = "default";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

/// Installs the global subscriber: level from `$WALAGENT_LOG` (else `$RUST_LOG`, else `info`),
/// lines on stderr in `format`.
pub fn init(format: Format) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WALAGENT_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match format {
        Format::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(
                        std::env::var_os("NO_COLOR").is_none()
                            && std::io::IsTerminal::is_terminal(&std::io::stderr()),
                    )
                    .with_target(false),
            )
            .try_init(),
        Format::Json => registry
            .with(ClusterLayer)
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(false)
                    .event_format(JsonLines),
            )
            .try_init(),
    };
}

/// The final error of a command as a JSON line (what `walagent: error: CAUSE; hint: FIX` is in
/// text), so that every line a `--log-format json` process writes parses.
pub fn error_line(cause: &str, hint: Option<&str>) -> String {
    let mut fields = Map::new();
    if let Some(h) = hint {
        fields.insert("hint".into(), Value::String(h.to_string()));
    }
    line("ERROR", DEFAULT_CLUSTER, cause, fields, "walagent")
}

/// One JSON object, keys in a fixed order (timestamp first, as people read them).
fn line(
    level: &str,
    cluster: &str,
    message: &str,
    fields: Map<String, Value>,
    target: &str,
) -> String {
    let s = |v: &str| Value::String(v.to_string()).to_string();
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    format!(
        "{{\"timestamp\":{},\"level\":{},\"cluster\":{},\"message\":{},\"fields\":{},\"target\":{}}}",
        s(&now),
        s(level),
        s(cluster),
        s(message),
        Value::Object(fields),
        s(target)
    )
}

/// A span's `cluster` field, kept in the span's extensions by [`ClusterLayer`].
struct ClusterName(String);

/// Remembers the `cluster` field of each span that has one.
struct ClusterLayer;

impl<S> Layer<S> for ClusterLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut v = ClusterVisitor(None);
        attrs.record(&mut v);
        if let (Some(name), Some(span)) = (v.0, ctx.span(id)) {
            span.extensions_mut().replace(ClusterName(name));
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let mut v = ClusterVisitor(None);
        values.record(&mut v);
        if let (Some(name), Some(span)) = (v.0, ctx.span(id)) {
            span.extensions_mut().replace(ClusterName(name));
        }
    }
}

struct ClusterVisitor(Option<String>);

impl Visit for ClusterVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "cluster" {
            self.0 = Some(value.to_string());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "cluster" {
            self.0 = Some(format!("{value:?}"));
        }
    }
}

/// An event's fields as JSON values.
#[derive(Default)]
struct JsonVisitor(Map<String, Value>);

impl JsonVisitor {
    fn put(&mut self, field: &Field, v: Value) {
        self.0.insert(field.name().to_string(), v);
    }
}

impl Visit for JsonVisitor {
    fn record_f64(&mut self, field: &Field, value: f64) {
        let v = serde_json::Number::from_f64(value)
            .map(Value::Number)
            .unwrap_or_else(|| Value::String(value.to_string()));
        self.put(field, v);
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::Bool(value));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::String(value.to_string()));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, Value::String(value.to_string()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, Value::String(format!("{value:?}")));
    }
}

/// The `json` line format.
struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut v = JsonVisitor::default();
        event.record(&mut v);
        let message = match v.0.remove("message") {
            Some(Value::String(s)) => s,
            Some(other) => other.to_string(),
            None => String::new(),
        };
        let cluster = ctx
            .event_scope()
            .and_then(|scope| {
                scope
                    .into_iter()
                    .find_map(|span| span.extensions().get::<ClusterName>().map(|c| c.0.clone()))
            })
            .unwrap_or_else(|| DEFAULT_CLUSTER.to_string());
        let meta = event.metadata();
        writeln!(
            writer,
            "{}",
            line(
                meta.level().as_str(),
                &cluster,
                &message,
                v.0,
                meta.target()
            )
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Collects what the subscriber writes.
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn lines_of(f: impl FnOnce()) -> Vec<Value> {
        let buf = Buf::default();
        let w = buf.clone();
        let sub = tracing_subscriber::registry().with(ClusterLayer).with(
            tracing_subscriber::fmt::layer()
                .with_writer(move || w.clone())
                .event_format(JsonLines),
        );
        tracing::subscriber::with_default(sub, f);
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        out.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
            .collect()
    }

    #[test]
    fn json_lines_carry_level_cluster_message_and_fields() {
        let lines = lines_of(|| {
            tracing::info!(server = "db:5432", tls = false, n = 3u64, "connected");
            let span = tracing::info_span!("cluster", cluster = "main");
            let _g = span.enter();
            let inner = tracing::info_span!("backup", id = 7);
            let _g2 = inner.enter();
            tracing::warn!(file = %"a \"b\"\n", "set aside: {}", "why");
        });
        assert_eq!(lines.len(), 2);
        assert!(lines[0].to_string().contains("\"cluster\""));
        let a = &lines[0];
        assert_eq!(a["level"], "INFO");
        assert_eq!(a["cluster"], "default");
        assert_eq!(a["message"], "connected");
        assert_eq!(a["fields"]["server"], "db:5432");
        assert_eq!(a["fields"]["tls"], false);
        assert_eq!(a["fields"]["n"], 3);
        assert!(a["timestamp"].as_str().unwrap().ends_with('Z'), "{a}");
        let b = &lines[1];
        assert_eq!(b["level"], "WARN");
        assert_eq!(b["cluster"], "main", "from the enclosing span");
        assert_eq!(b["message"], "set aside: why");
        assert_eq!(b["fields"]["file"], "a \"b\"\n");
    }

    #[test]
    fn the_final_error_is_a_json_line_too() {
        let l = error_line("it broke", Some("fix it"));
        assert!(l.starts_with("{\"timestamp\":\""), "timestamp first: {l}");
        let v: Value = serde_json::from_str(&l).unwrap();
        assert_eq!(v["level"], "ERROR");
        assert_eq!(v["message"], "it broke");
        assert_eq!(v["fields"]["hint"], "fix it");
        let v: Value = serde_json::from_str(&error_line("it broke", None)).unwrap();
        assert!(v["fields"].as_object().unwrap().is_empty());
    }
}
