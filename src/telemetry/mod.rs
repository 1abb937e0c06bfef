//! Telemetry: what the daemon tells its operators. [`metrics`] is the
//! Prometheus registry every component counts into, [`health`] the flags
//! and checks behind `/readyz`, [`server`] the HTTP endpoint serving
//! `/metrics`, `/healthz` and `/readyz`, [`events`] the log and count of
//! each per-message event; tracing set-up is here.

pub mod events;
pub mod health;
pub mod metrics;
pub mod server;

pub use health::{Health, ReadinessCheck};
pub use metrics::{histogram_quantile, HeldClock, Metrics, REBALANCE_EVENTS};
pub use server::serve;

use crate::config::{LogConfig, LogFormat};

/// Installs the global tracing subscriber. `RUST_LOG` wins over the config.
pub fn init_tracing(cfg: &LogConfig, secrets: crate::config::Scrubber) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(secrets.writer(std::io::stderr));
    let result = match cfg.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
    // A second init (tests, or `demo` after `simulate`) keeps the first.
    drop(result);
}
