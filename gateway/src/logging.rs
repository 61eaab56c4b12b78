//! Log setup for the `herald` binary: `log_format` (`HERALD_LOG_FORMAT`) picks text or
//! one JSON object per line; `HERALD_LOG` filters; with the `otel` cargo feature and
//! `OTEL_EXPORTER_OTLP_ENDPOINT` set, spans are also exported over OTLP/HTTP.

use serde_json::{json, Map, Value};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::clock::{now_ms, rfc3339};
use crate::config::LogFormat;

/// What `HERALD_LOG` filters to when unset.
pub const DEFAULT_FILTER: &str = "info,sqlx=warn";

/// Keeps the OTLP exporter alive; dropping it flushes the spans not yet sent.
#[must_use]
pub struct LogGuard {
    #[cfg(feature = "otel")]
    otel: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        #[cfg(feature = "otel")]
        if let Some(provider) = self.otel.take() {
            if let Err(e) = provider.shutdown() {
                eprintln!("OpenTelemetry: cannot flush spans: {e}");
            }
        }
    }
}

/// Installs the global subscriber: logs on stderr in `format`.
pub fn init(format: LogFormat) -> LogGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HERALD_LOG")
        .unwrap_or_else(|_| DEFAULT_FILTER.into());
    let text = (format == LogFormat::Text).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            // Its fallback for a failed log write is eprintln!, which panics when
            // stderr is a closed pipe (`herald serve | head`): the logging task
            // (shutdown's, say) would die with it. A lost log line must cost only
            // the line.
            .log_internal_errors(false)
    });
    let json = (format == LogFormat::Json).then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .with_writer(std::io::stderr)
            .log_internal_errors(false)
    });
    #[cfg(feature = "otel")]
    let (otel_layer, otel) = match otel::provider() {
        Ok(Some(provider)) => {
            use opentelemetry::trace::TracerProvider as _;
            let tracer = provider.tracer("herald");
            (
                Some(tracing_opentelemetry::layer().with_tracer(tracer)),
                Some(provider),
            )
        }
        Ok(None) => (None, None),
        Err(e) => {
            eprintln!("OpenTelemetry: cannot set up the OTLP exporter: {e}");
            (None, None)
        }
    };
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json);
    #[cfg(feature = "otel")]
    let registry = registry.with(otel_layer);
    registry.init();
    LogGuard {
        #[cfg(feature = "otel")]
        otel,
    }
}

/// A line for stdout in `format`: the text as it is, or (json) an object shaped like
/// the log lines: `{"timestamp","level":"INFO","fields":{"message",…},"target":"herald"}`.
pub fn stdout_line(format: LogFormat, message: &str, fields: &[(&str, Value)]) -> String {
    match format {
        LogFormat::Text => message.to_owned(),
        LogFormat::Json => json_line("INFO", message, fields),
    }
}

/// One JSON log object (no newline).
pub fn json_line(level: &str, message: &str, fields: &[(&str, Value)]) -> String {
    let mut f = Map::new();
    f.insert("message".into(), Value::String(message.to_owned()));
    for (k, v) in fields {
        f.insert((*k).to_owned(), v.clone());
    }
    json!({
        "timestamp": rfc3339(now_ms()),
        "level": level,
        "fields": f,
        "target": "herald",
    })
    .to_string()
}

#[cfg(feature = "otel")]
mod otel {
    use opentelemetry_sdk::trace::SdkTracerProvider;

    /// A tracer provider exporting over OTLP/HTTP (protobuf) when
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set;
    /// the exporter reads those and the other standard `OTEL_*` variables itself.
    pub fn provider() -> anyhow::Result<Option<SdkTracerProvider>> {
        let set = |v: &str| std::env::var_os(v).is_some_and(|s| !s.is_empty());
        if !set("OTEL_EXPORTER_OTLP_ENDPOINT") && !set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
            return Ok(None);
        }
        use opentelemetry_otlp::WithExportConfig as _;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .build()?;
        let mut resource = opentelemetry_sdk::Resource::builder();
        if !set("OTEL_SERVICE_NAME") {
            resource = resource.with_service_name("herald");
        }
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build();
        opentelemetry::global::set_tracer_provider(provider.clone());
        Ok(Some(provider))
    }
}
