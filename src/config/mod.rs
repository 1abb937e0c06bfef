//! Typed configuration: one TOML file, every key overridable from the
//! environment (`CONVEYOR__SECTION__KEY`), secrets from the environment or a
//! file, validated at start with errors that name the key at fault.
//!
//! The doc comments on the fields are the user documentation; the example in
//! `config/conveyor.toml` carries every key with its default.
//!
//! The schema is split by concern: `source` (which broker, RabbitMQ,
//! Kafka), `downstream` (the rule engine and the payment provider: retry,
//! breaker, budget, rate limit), `store` (the database), `pipeline`
//! (stages, batches, drain), `ingest` and `telemetry` (HTTP endpoints,
//! logs, traces). `secret` keeps secrets out of everything shown, and
//! `validate` checks a loaded configuration before anything starts.

mod downstream;
mod ingest;
mod pipeline;
mod secret;
mod source;
mod store;
mod telemetry;
mod validate;

#[cfg(test)]
mod tests;

use std::path::Path;

use serde::{Deserialize, Serialize};

pub use downstream::{
    BreakerConfig, DownstreamConfig, RateLimitConfig, RetryBudgetConfig, RetryConfig,
};
pub use ingest::IngestConfig;
pub use pipeline::{BatchConfig, PipelineConfig, ShutdownConfig};
pub use secret::{
    is_secret_name, redact_url, redacted_properties, resolve_secret, Scrubber, ScrubbingWriter,
    Secret, REDACTED,
};
pub use source::{
    KafkaConfig, KafkaSecurity, PrefetchFollow, QueueType, RabbitConfig, RabbitTls, SourceConfig,
    SourceKind,
};
pub use store::DatabaseConfig;
pub use telemetry::{HttpConfig, LogConfig, LogFormat, OtlpConfig, TelemetryConfig};

/// Prefix of environment overrides: `CONVEYOR__BATCH__MAX_SIZE=1000`.
pub const ENV_PREFIX: &str = "CONVEYOR";

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub source: SourceConfig,
    pub rabbitmq: RabbitConfig,
    pub kafka: KafkaConfig,
    pub database: DatabaseConfig,
    pub pipeline: PipelineConfig,
    pub batch: BatchConfig,
    pub rule_engine: DownstreamConfig,
    pub payment: DownstreamConfig,
    pub shutdown: ShutdownConfig,
    pub http: HttpConfig,
    pub log: LogConfig,
    pub ingest: IngestConfig,
    pub telemetry: TelemetryConfig,
}

/// One problem with the configuration, naming the key at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct KeyError {
    pub key: String,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Load(#[from] config::ConfigError),
    #[error("invalid configuration:\n{}", .0.iter().map(|e| format!("  {e}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<KeyError>),
}

impl Config {
    /// Loads the file (if given) then the environment overrides, and
    /// validates the result.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with_env(path, None)
    }

    /// As [`Config::load`], with the environment given explicitly (tests).
    pub fn load_with_env(
        path: Option<&Path>,
        env: Option<std::collections::HashMap<String, String>>,
    ) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(path) = path {
            builder = builder.add_source(
                config::File::from(path)
                    .format(config::FileFormat::Toml)
                    .required(true),
            );
        }
        let mut environment = config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .with_list_parse_key("kafka.topics");
        if env.is_some() {
            environment = environment.source(env);
        }
        let cfg: Config = builder.add_source(environment).build()?.try_deserialize()?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The effective configuration as TOML, secrets redacted.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}
