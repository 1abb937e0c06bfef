//! `conveyor simulate`.

use std::net::SocketAddr;

use crate::tools::sim::{self, EndpointKnobs, Knobs};

/// `conveyor simulate`.
#[derive(clap::Args)]
pub struct SimulateCli {
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Added latency per request, both endpoints.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Random extra latency, uniform in [0, jitter].
    #[arg(long, default_value_t = 0)]
    jitter_ms: u64,
    /// Fraction of requests answered 503.
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// Fraction of requests never answered.
    #[arg(long, default_value_t = 0.0)]
    timeout_rate: f64,
    /// Fraction of requests answered 429.
    #[arg(long, default_value_t = 0.0)]
    throttle_rate: f64,
    /// Fraction of orders rejected by the rule engine.
    #[arg(long, default_value_t = 0.0)]
    reject_rate: f64,
    /// Fraction of charges declined.
    #[arg(long, default_value_t = 0.0)]
    decline_rate: f64,
    /// The capacity model: --capacity, --queue-limit, --rate-limit.
    #[command(flatten)]
    limits: sim::LimitArgs,
}

impl SimulateCli {
    /// Serves until SIGTERM/SIGINT.
    pub async fn run(self) -> anyhow::Result<()> {
        simulate(self).await
    }
}

async fn simulate(a: SimulateCli) -> anyhow::Result<()> {
    let endpoint = EndpointKnobs {
        latency_ms: a.latency_ms,
        jitter_ms: a.jitter_ms,
        error_rate: a.error_rate,
        timeout_rate: a.timeout_rate,
        throttle_rate: a.throttle_rate,
    };
    let knobs = Knobs {
        validate: endpoint.clone(),
        charge: endpoint,
        reject_rate: a.reject_rate,
        decline_rate: a.decline_rate,
    };
    let stop = crate::shutdown::install()?;
    let handle = sim::start_with(a.listen, knobs, a.limits.into()).await?;
    tracing::info!(url = %handle.url, "simulator listening (POST /validate, POST /charges, GET /ledger, GET|PUT /knobs)");
    stop.cancelled().await;
    handle.stop().await;
    Ok(())
}
