//! What the daemon shows of itself: the HTTP address of `/metrics`,
//! `/healthz` and `/readyz`, its logs, and trace export over OTLP.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::secret::{serialize_redacted_opt_url, Secret};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    pub listen: SocketAddr,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter, e.g. `info` or `conveyor=debug,lapin=warn`.
    /// `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Pretty,
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    pub otlp: OtlpConfig,
}

/// Trace export over OTLP/HTTP (protobuf), off unless an endpoint is given
/// here or in `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT`
/// (`OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` turn it off again).
/// A key set here wins over its `OTEL_*` variable, as in the OpenTelemetry SDKs.
/// Read from the environment as the SDK does: `OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT`,
/// `OTEL_EXPORTER_OTLP_(TRACES_)HEADERS`, `OTEL_SERVICE_NAME`,
/// `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER(_ARG)`, `OTEL_SDK_DISABLED`.
/// Not read: `OTEL_BSP_*` and `OTEL_EXPORTER_OTLP_TIMEOUT` (conveyor's own
/// bounded export queue replaces the SDK's batch processor: `queue_size`,
/// `batch_size`, `batch_interval`, `timeout`) and `OTEL_EXPORTER_OTLP_PROTOCOL`
/// (always `http/protobuf`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct OtlpConfig {
    /// Collector base URL, e.g. `http://127.0.0.1:4318`; spans go to
    /// `{endpoint}/v1/traces` (a URL already ending in `/v1/traces` is used as
    /// it is). Unset: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, then
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`, else no export.
    #[serde(serialize_with = "serialize_redacted_opt_url")]
    pub endpoint: Option<String>,
    /// `http/protobuf`, the one OTLP transport this build speaks.
    pub protocol: String,
    /// Extra request headers (an API key, `authorization`). Secret: redacted
    /// wherever the configuration is shown; added to by `OTEL_EXPORTER_OTLP_HEADERS`.
    pub headers: std::collections::BTreeMap<String, Secret>,
    /// Share of orders traced, 0..=1, decided by trace id (so every service
    /// sampling by ratio keeps or drops the same traces). Unset: the SDK's
    /// `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`, by default all.
    pub sample_ratio: Option<f64>,
    /// `service.name` of the spans. Unset: `OTEL_SERVICE_NAME`, else `conveyor`.
    pub service_name: Option<String>,
    /// Finished spans waiting for export at most; more are dropped and
    /// counted in `conveyor_trace_spans_dropped_total`, so a slow or dead
    /// collector never holds up or grows the daemon.
    pub queue_size: usize,
    /// Spans per export request at most.
    pub batch_size: usize,
    /// Longest a finished span waits before its batch is sent.
    #[serde(with = "humantime_serde")]
    pub batch_interval: Duration,
    /// Per export request; a batch that times out is dropped and counted.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for OtlpConfig {
    fn default() -> Self {
        Self {
            endpoint: None,
            protocol: "http/protobuf".into(),
            headers: Default::default(),
            sample_ratio: None,
            service_name: None,
            queue_size: 4096,
            batch_size: 512,
            batch_interval: Duration::from_secs(2),
            timeout: Duration::from_secs(5),
        }
    }
}
