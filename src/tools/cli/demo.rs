//! `conveyor demo`.

use std::path::PathBuf;

use super::parse_duration;
use crate::tools::demo::{self, DemoArgs};
use crate::tools::produce::Mix;

/// `conveyor demo`.
#[derive(clap::Args)]
pub struct DemoCli {
    /// Orders to produce and process.
    #[arg(long, default_value_t = 50_000)]
    orders: u64,
    /// Partitions of the orders topic.
    #[arg(long, default_value_t = 8)]
    partitions: i32,
    /// Simulator latency per request, both endpoints.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    #[arg(long, default_value_t = 2.0)]
    poison_pct: f64,
    #[arg(long, default_value_t = 3.0)]
    reject_pct: f64,
    #[arg(long, default_value_t = 3.0)]
    decline_pct: f64,
    /// The prefetch limit.
    #[arg(long, default_value_t = 512)]
    prefetch: u32,
    /// Keep the SQLite database at this path for inspection.
    #[arg(long, value_name = "FILE", num_args = 0..=1, default_missing_value = "conveyor-demo.db")]
    keep: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Fail, naming the likely cause, when no order is acknowledged for this long.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    stall_timeout: std::time::Duration,
}

impl DemoCli {
    /// Fails when an invariant of the run does not hold.
    pub async fn run(self) -> anyhow::Result<()> {
        let a = self;
        let ok = demo::run(DemoArgs {
            orders: a.orders,
            partitions: a.partitions,
            latency_ms: a.latency_ms,
            mix: Mix {
                poison_pct: a.poison_pct,
                reject_pct: a.reject_pct,
                decline_pct: a.decline_pct,
            },
            prefetch: a.prefetch,
            keep: a.keep,
            quiet: a.quiet,
            stall_timeout: a.stall_timeout,
        })
        .await?;
        if ok {
            Ok(())
        } else {
            Err(anyhow::anyhow!("an invariant failed"))
        }
    }
}
