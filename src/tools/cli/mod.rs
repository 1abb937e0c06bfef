//! The command-line arguments of the subcommands, kept beside the tools so
//! that `main` only parses and dispatches: `export`, `dlq`, `produce`,
//! `simulate` and `demo`, each with its `run`, and the value parsers they
//! share.

mod demo;
mod dlq;
mod export;
mod produce;
mod simulate;

use chrono::{DateTime, Utc};

pub use demo::DemoCli;
pub use dlq::DlqCli;
pub use export::ExportCli;
pub use produce::ProduceCli;
pub use simulate::SimulateCli;

fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("{e} (RFC 3339, e.g. 2026-11-22T10:00:00Z)"))
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        Ok(_) => Err("must be a positive number".into()),
        Err(e) => Err(e.to_string()),
    }
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => Err("must be longer than zero".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

fn parse_pct(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => Ok(p),
        Ok(_) => Err("must be between 0 and 100".into()),
        Err(e) => Err(e.to_string()),
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
enum Broker {
    Rabbitmq,
    Kafka,
}
