//! Logs and traces for every taskfleet binary: a `tracing` subscriber (text or JSON), an
//! OpenTelemetry layer that exports spans over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set,
//! and W3C trace-context propagation through NATS message headers and event fields.
//!
//! The log filter (`TASKFLEET_LOG`) applies to the log output only: taskfleet's own spans
//! (`info` level, targets `taskfleet*`) reach the exporter whatever the log level, so a quiet
//! log does not cut traces short. The standard SDK variables apply as well: the sampler
//! (`OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`) and the batch processor
//! (`OTEL_BSP_SCHEDULE_DELAY`, `OTEL_BSP_MAX_QUEUE_SIZE`, `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`).

use async_nats::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracer, SdkTracerProvider};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use taskfleet_config::{LogFormat, TelemetryConfig};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{FilterExt, Targets};
use tracing_subscriber::{EnvFilter, Layer, layer::SubscriberExt, util::SubscriberInitExt};

/// Name of the W3C trace-context header that carries trace id, parent span id and flags.
pub const TRACEPARENT: &str = "traceparent";

/// An attribute of a [`root_span`].
pub use opentelemetry::KeyValue;
/// The kind of a [`root_span`] (`Producer` for a submission).
pub use opentelemetry::trace::SpanKind;

/// Whether this process exports spans; set once by [`init`].
static EXPORTING: AtomicBool = AtomicBool::new(false);
/// Whether the sampler follows the parent's decision (`OTEL_TRACES_SAMPLER` unset or
/// `parentbased_*`); set by [`init`].
static PARENT_BASED: AtomicBool = AtomicBool::new(true);
/// The tracer of [`root_span`]; set by [`init`].
static TRACER: OnceLock<SdkTracer> = OnceLock::new();

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The log filter does not parse.
    #[error("invalid log filter {filter:?}: {message}")]
    Filter {
        /// The filter.
        filter: String,
        /// Parser message.
        message: String,
    },
    /// The OTLP exporter could not be built.
    #[error("cannot build OTLP exporter: {0}")]
    Exporter(String),
    /// A global subscriber was already installed.
    #[error("a tracing subscriber is already installed: {0}")]
    AlreadyInstalled(String),
}

/// Keeps the tracer provider alive; dropping it (or calling [`Telemetry::shutdown`]) flushes
/// spans still buffered.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Flushes and stops span export.
    pub fn shutdown(mut self) {
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown()
        {
            tracing::warn!(error = %e, "trace exporter shutdown failed");
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

/// Spans the batch processor holds for export before it drops new ones, unless
/// `OTEL_BSP_MAX_QUEUE_SIZE` says otherwise (the SDK's default).
pub const DEFAULT_MAX_QUEUE_SIZE: usize = 2_048;

/// Installs the global subscriber for `service` (the OpenTelemetry service name unless
/// `OTEL_SERVICE_NAME` says otherwise). Spans are exported only when
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is set; the OpenTelemetry layer is installed either way so
/// that trace ids flow through NATS headers.
pub fn init(service: &str, cfg: &TelemetryConfig) -> Result<Telemetry, TelemetryError> {
    init_with_queue(service, cfg, DEFAULT_MAX_QUEUE_SIZE)
}

/// [`init`] with another default for the export queue (`OTEL_BSP_MAX_QUEUE_SIZE` still wins),
/// for a process that makes spans in bursts faster than one exporter ships them, such as the
/// CLI submitting thousands of tasks a second.
pub fn init_with_queue(
    service: &str,
    cfg: &TelemetryConfig,
    max_queue_size: usize,
) -> Result<Telemetry, TelemetryError> {
    let parse = || {
        EnvFilter::try_new(&cfg.log)
            .map_err(|e| TelemetryError::Filter { filter: cfg.log.clone(), message: e.to_string() })
    };
    let log_filter = parse()?;
    // Spans for export: what the log filter lets through, and taskfleet's own spans always.
    let span_filter = parse()?.or(Targets::new().with_target("taskfleet", tracing::Level::INFO));
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());

    let service_name =
        std::env::var("OTEL_SERVICE_NAME").ok().filter(|s| !s.is_empty()).unwrap_or_else(|| service.to_string());
    let resource = opentelemetry_sdk::Resource::builder().with_service_name(service_name).build();
    let mut builder = SdkTracerProvider::builder().with_resource(resource);
    let exporting = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").is_ok_and(|v| !v.is_empty());
    if exporting {
        // The exporter's HTTP client (reqwest, `rustls-no-provider`) needs the process's TLS
        // crypto provider, the one every taskfleet binary uses; a second call is a no-op.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
        let queue = std::env::var("OTEL_BSP_MAX_QUEUE_SIZE")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(max_queue_size);
        // The other `OTEL_BSP_*` variables (delay, batch size, timeout) apply as usual.
        let batch = BatchConfigBuilder::default().with_max_queue_size(queue).build();
        builder = builder.with_span_processor(BatchSpanProcessor::builder(exporter).with_batch_config(batch).build());
    }
    let provider = builder.build();
    // No source locations or thread names on spans: taskfleet's span names are unique, and a
    // task hops between threads anyway; exported spans are about 40% smaller without them.
    let otel_layer = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer(service.to_string()))
        .with_location(false)
        .with_threads(false)
        .with_filter(span_filter);

    let registry = tracing_subscriber::registry().with(otel_layer);
    let result = match cfg.log_format {
        LogFormat::Json => registry
            .with(tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr).with_filter(log_filter))
            .try_init(),
        LogFormat::Text => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_filter(log_filter))
            .try_init(),
    };
    result.map_err(|e| TelemetryError::AlreadyInstalled(e.to_string()))?;
    opentelemetry::global::set_tracer_provider(provider.clone());
    EXPORTING.store(exporting, Ordering::Relaxed);
    let sampler = std::env::var("OTEL_TRACES_SAMPLER").unwrap_or_default();
    PARENT_BASED.store(sampler.is_empty() || sampler.starts_with("parentbased_"), Ordering::Relaxed);
    let _ = TRACER.set(provider.tracer(service.to_string()));
    tracing::debug!(exporting, "telemetry initialised");
    Ok(Telemetry { provider: Some(provider) })
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_ref()).collect()
    }
}

/// Writes the trace context of `span` (W3C `traceparent`/`tracestate`) into NATS headers.
pub fn inject_context(span: &tracing::Span, headers: &mut HeaderMap) {
    let cx = span.context();
    TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
}

/// Makes `span` a child of the trace context found in NATS headers, if any. Call it right
/// after creating the span, before entering it or creating children.
pub fn set_parent_from(span: &tracing::Span, headers: Option<&HeaderMap>) {
    if let Some(headers) = headers {
        let cx = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
        let _ = span.set_parent(cx);
    }
}

/// True when [`init`] found `OTEL_EXPORTER_OTLP_ENDPOINT`: spans leave this process. Callers
/// use it to skip tracing work nobody would see (root spans per submission, trace context in
/// events).
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// The W3C `traceparent` of `span` when it is part of a sampled trace, e.g. to carry it in a
/// message body where headers cannot be per task.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    use opentelemetry::trace::TraceContextExt;
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if !sc.is_valid() || !sc.is_sampled() {
        return None;
    }
    Some(format!("00-{}-{}-{:02x}", sc.trace_id(), sc.span_id(), sc.trace_flags().to_u8()))
}

/// True when `headers` carry a valid `traceparent` whose trace is not sampled and the sampler
/// follows the parent (the default): a child span would record nothing, so a caller that only
/// passes the context on can skip making one and forward the headers instead.
pub fn unsampled_parent(headers: Option<&HeaderMap>) -> bool {
    let Some(tp) = headers.and_then(|h| h.get(TRACEPARENT)).map(|v| v.as_str()) else {
        return false;
    };
    // 00-<32 hex trace id>-<16 hex span id>-<2 hex flags>; bit 0 of the flags is "sampled".
    let mut parts = tp.split('-');
    let (Some(_), Some(trace), Some(span), Some(flags), None) =
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let sampled = u8::from_str_radix(flags, 16).map(|f| f & 1 == 1);
    trace.len() == 32 && span.len() == 16 && sampled == Ok(false) && PARENT_BASED.load(Ordering::Relaxed)
}

/// A root span made with the OpenTelemetry API directly, for a client that starts one per
/// message at a high rate: far cheaper than a `tracing` span when the sampler drops the trace
/// (the attributes are then never built). Ends when dropped. Without [`init`] it is a no-op
/// with no trace context.
pub struct RootSpan {
    cx: opentelemetry::Context,
}

/// Starts a [`RootSpan`] named `name`; `attributes` is called only when the span is sampled.
pub fn root_span(name: &'static str, kind: SpanKind, attributes: impl FnOnce() -> Vec<KeyValue>) -> RootSpan {
    use opentelemetry::trace::{Span as _, TraceContextExt, Tracer as _};
    let Some(tracer) = TRACER.get() else {
        return RootSpan { cx: opentelemetry::Context::new() };
    };
    let mut span = tracer.span_builder(name).with_kind(kind).start_with_context(tracer, &opentelemetry::Context::new());
    if span.is_recording() {
        span.set_attributes(attributes());
    }
    RootSpan { cx: opentelemetry::Context::new().with_span(span) }
}

impl RootSpan {
    /// Writes this span's trace context (W3C `traceparent`/`tracestate`) into NATS headers.
    pub fn inject(&self, headers: &mut HeaderMap) {
        TraceContextPropagator::new().inject_context(&self.cx, &mut HeaderInjector(headers));
    }
}

struct OneHeader<'a>(&'a str);

impl Extractor for OneHeader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == TRACEPARENT).then_some(self.0)
    }
    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT]
    }
}

/// Makes `span` a child of a W3C `traceparent` value (as [`traceparent`] writes it); an
/// unreadable value leaves the span a root. Call it right after creating the span.
pub fn set_parent_from_traceparent(span: &tracing::Span, traceparent: &str) {
    let cx = TraceContextPropagator::new().extract(&OneHeader(traceparent));
    let _ = span.set_parent(cx);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_round_trips_through_headers() {
        let provider = SdkTracerProvider::builder().build();
        let subscriber =
            tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let parent = tracing::info_span!("parent");
            let mut headers = HeaderMap::new();
            inject_context(&parent, &mut headers);
            let traceparent = headers.get("traceparent").expect("traceparent header").as_str().to_string();
            assert!(traceparent.starts_with("00-"), "{traceparent}");
            let child = tracing::info_span!("child");
            set_parent_from(&child, Some(&headers));
            use opentelemetry::trace::TraceContextExt;
            let parent_trace = parent.context().span().span_context().trace_id();
            let child_trace = child.context().span().span_context().trace_id();
            assert_eq!(parent_trace, child_trace);
        });
    }

    #[test]
    fn unsampled_parents_are_recognised() {
        let with = |tp: &str| {
            let mut h = HeaderMap::new();
            h.insert(TRACEPARENT, tp);
            h
        };
        let unsampled = with("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00");
        assert!(unsampled_parent(Some(&unsampled)));
        assert!(!unsampled_parent(Some(&with("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"))));
        assert!(!unsampled_parent(Some(&with("garbage"))));
        assert!(!unsampled_parent(Some(&HeaderMap::new())));
        assert!(!unsampled_parent(None));
    }

    #[test]
    fn root_span_without_init_has_no_context() {
        let span = root_span("x", SpanKind::Producer, || panic!("not sampled, not built"));
        let mut h = HeaderMap::new();
        span.inject(&mut h);
        assert!(h.get(TRACEPARENT).is_none());
    }

    #[test]
    fn traceparent_string_round_trips() {
        use opentelemetry::trace::TraceContextExt;
        let provider = SdkTracerProvider::builder().build();
        let subscriber =
            tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let parent = tracing::info_span!("parent");
            let tp = traceparent(&parent).expect("a sampled span has a traceparent");
            let mut headers = HeaderMap::new();
            inject_context(&parent, &mut headers);
            assert_eq!(headers.get(TRACEPARENT).map(|v| v.as_str()), Some(tp.as_str()));
            let child = tracing::info_span!("child");
            set_parent_from_traceparent(&child, &tp);
            let p = parent.context().span().span_context().clone();
            let c = child.context().span().span_context().clone();
            assert_eq!(p.trace_id(), c.trace_id());
            assert_ne!(p.span_id(), c.span_id());
            let orphan = tracing::info_span!("orphan");
            set_parent_from_traceparent(&orphan, "garbage");
            assert_ne!(orphan.context().span().span_context().trace_id(), p.trace_id());
        });
        assert!(traceparent(&tracing::Span::none()).is_none());
    }
}
