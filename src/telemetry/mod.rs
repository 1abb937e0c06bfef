//! Telemetry: what the daemon tells its operators. [`metrics`] is the
//! Prometheus registry every component counts into, [`health`] the flags
//! and checks behind `/readyz`, [`server`] the HTTP endpoint serving
//! `/metrics`, `/healthz` and `/readyz`, [`events`] the log and count of
//! each per-message event; tracing set-up is here.

pub mod drain;
pub mod events;
pub mod health;
pub mod metrics;
pub mod runtime;
pub mod server;
pub mod traces;

pub use drain::Destination;
pub use health::{Health, ReadinessCheck};
pub use metrics::{histogram_quantile, HeldClock, Metrics, REBALANCE_EVENTS};
pub use server::serve;

use crate::config::{LogConfig, LogFormat, OtlpConfig};

/// Installs the global tracing subscriber: log lines (`RUST_LOG` wins over
/// the config) and, when OTLP export is on, spans to the collector. Runs
/// inside the runtime (the export task is spawned on it); the returned
/// export is flushed at exit.
pub fn init_tracing(
    cfg: &LogConfig,
    otlp: Option<&OtlpConfig>,
    secrets: crate::config::Scrubber,
) -> Option<traces::Export> {
    use tracing_subscriber::filter::{EnvFilter, Targets};
    use tracing_subscriber::prelude::*;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt::layer().with_writer(secrets.writer(std::io::stderr));
    let logs = match cfg.format {
        LogFormat::Json => logs.json().flatten_event(true).boxed(),
        LogFormat::Pretty => logs.boxed(),
    }
    .with_filter(filter);
    let export = if let Some(otlp) = otlp.filter(|o| traces::enabled(o)) {
        match traces::init(otlp) {
            Ok(e) => Some(e),
            Err(e) => {
                eprintln!("conveyor: traces not exported: {e:#}");
                None
            }
        }
    } else {
        None
    };
    // conveyor's own spans (and its log lines inside them, as span events).
    // An order's child spans are DEBUG: with no export (and logs at INFO)
    // nothing is interested in them and they cost nothing;
    // never the libraries' (the HTTP client of the export itself among them).
    // A static target filter: its interest is cached per callsite.
    let spans = export.as_ref().map(|e| {
        tracing_opentelemetry::layer()
            .with_tracer(traces::tracer(e))
            .with_location(false)
            .with_threads(false)
            .with_filter(Targets::new().with_target("conveyor", tracing::Level::DEBUG))
    });
    // A second init (tests, or `demo` after `simulate`) keeps the first.
    drop(
        tracing_subscriber::registry()
            .with(logs)
            .with(spans)
            .try_init(),
    );
    export
}
