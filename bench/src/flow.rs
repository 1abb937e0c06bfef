//! `conveyor-bench flow` (`scripts/bench flow`): the flow-control benchmark.
//!
//! Against the simulator's capacity model at L = 10 ms it runs a capacity
//! schedule (48 → 12 → 32 calls served at once, changed at run time through
//! `PUT /knobs`) with four contestants — fixed C = 8, fixed C = 64, an
//! oracle fixed at each phase's capacity, and adaptive concurrency — then
//! the rate-limit rows (provider limited to R/s, conveyor's own limit just
//! under it or none), the partial-failure rows (a share of transient 503s,
//! breaker on against retries alone) and the outage rows (half the calls to
//! the payment provider failing, with and without a retry budget). It
//! writes a markdown table and an SVG plot of the limit and throughput over
//! time to `bench/results/flow-<date>T<time>Z.{md,svg}`.
//!
//! Every figure is the median of `--runs` runs with its min–max.

mod plot;
mod report;
mod scenarios;
mod schedule;
mod world;

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;

use crate::harness::Bench;
use crate::{say, Args};

#[derive(Parser, Clone)]
#[command(
    name = "conveyor-bench flow",
    about = "Flow control: capacity schedule, rate limits, partial failures, outages"
)]
pub(crate) struct FlowArgs {
    /// Runs of each measurement (medians are reported).
    #[arg(long, default_value_t = 3)]
    pub(crate) runs: usize,
    /// Simulator latency (both endpoints).
    #[arg(long, default_value_t = 10)]
    pub(crate) latency_ms: u64,
    /// The capacity schedule: calls each endpoint serves at once, per phase.
    #[arg(long, value_delimiter = ',', default_value = "48,12,32")]
    pub(crate) capacities: Vec<u32>,
    /// Seconds per phase of the capacity schedule.
    #[arg(long, default_value_t = 20.0)]
    pub(crate) phase_secs: f64,
    /// Calls that may wait at an endpoint past its capacity; beyond, 503.
    #[arg(long, default_value_t = 16)]
    pub(crate) queue_limit: u32,
    /// The fixed-concurrency contestants (validate and charge stage alike);
    /// `--fixed` alone runs none.
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "8,64")]
    pub(crate) fixed: Vec<u32>,
    /// How often the daemon's /metrics is sampled (the limit over time).
    #[arg(long, default_value_t = 200)]
    pub(crate) sample_ms: u64,
    /// The provider's rate limit (requests/s per endpoint) of the rate-limit rows.
    #[arg(long, default_value_t = 1000)]
    pub(crate) provider_rate: u32,
    /// conveyor's own rate limit (per downstream) in the first rate-limit row.
    #[arg(long, default_value_t = 950)]
    pub(crate) conveyor_rate: u32,
    /// Seconds per rate-limit run.
    #[arg(long, default_value_t = 20.0)]
    pub(crate) rate_secs: f64,
    /// Orders/s published during the partial-failure and outage runs.
    #[arg(long, default_value_t = 200.0)]
    pub(crate) arrival_rate: f64,
    /// Shares of transient 503s (both endpoints) of the partial-failure rows.
    #[arg(long, value_delimiter = ',', default_value = "0.1,0.2,0.3,0.5")]
    pub(crate) error_rates: Vec<f64>,
    /// Seconds of arrivals per partial-failure run.
    #[arg(long, default_value_t = 15.0)]
    pub(crate) failure_secs: f64,
    /// Seconds of healthy service before the outage of an outage run.
    #[arg(long, default_value_t = 10.0)]
    pub(crate) healthy_secs: f64,
    /// Seconds of the outage (50 % 503 at the payment provider).
    #[arg(long, default_value_t = 15.0)]
    pub(crate) outage_secs: f64,
    /// Sections to run (all by default).
    #[arg(long, value_delimiter = ',', value_enum)]
    pub(crate) only: Vec<Section>,
    /// PostgreSQL server (the benchmark database is created on it).
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432")]
    pub(crate) postgres: String,
    /// The queue the runs use (purged before, deleted after).
    #[arg(long, default_value = "conveyor.bench.flow")]
    pub(crate) queue: String,
    /// The database the runs use (created anew, dropped after).
    #[arg(long, default_value = "conveyor_bench_flow")]
    pub(crate) database: String,
    /// Where the markdown table and the plot go.
    #[arg(long, default_value = "bench/results")]
    pub(crate) out: PathBuf,
}

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Section {
    Schedule,
    Rate,
    Partial,
    Outage,
}

impl FlowArgs {
    fn wants(&self, s: Section) -> bool {
        self.only.is_empty() || self.only.contains(&s)
    }
}

/// Runs the flow benchmark; `argv` starts with the subcommand's name.
pub(crate) async fn main(argv: impl IntoIterator<Item = std::ffi::OsString>) -> anyhow::Result<()> {
    let args = FlowArgs::parse_from(argv);
    anyhow::ensure!(args.runs >= 1, "--runs must be at least 1");
    anyhow::ensure!(
        !args.capacities.is_empty(),
        "--capacities: at least one phase"
    );
    anyhow::ensure!(
        args.capacities.iter().all(|c| *c > 0),
        "--capacities: each at least 1"
    );
    anyhow::ensure!(args.phase_secs >= 2.0, "--phase-secs: at least 2");
    anyhow::ensure!(args.rate_secs >= 3.0, "--rate-secs: at least 3");
    anyhow::ensure!(args.healthy_secs >= 2.0, "--healthy-secs: at least 2");
    anyhow::ensure!(args.outage_secs > 0.0, "--outage-secs: more than 0");
    anyhow::ensure!(args.arrival_rate > 0.0, "--arrival-rate: more than 0");
    let started = Instant::now();
    // The harness's world (queue, database, binaries), with this
    // benchmark's names.
    let base = Args::parse_from([
        "conveyor-bench",
        "--runs",
        &args.runs.to_string(),
        "--postgres",
        &args.postgres,
        "--queue",
        &args.queue,
        "--database",
        &args.database,
    ]);
    let mut b = Bench::setup(base).await?;
    let mut r = report::FlowResults {
        load_at_start: report::load_average(),
        ..report::FlowResults::default()
    };
    if args.wants(Section::Schedule) {
        r.schedule = Some(schedule::measure(&mut b, &args).await?);
    }
    if args.wants(Section::Rate) {
        r.rate = Some(scenarios::rate_limit(&mut b, &args).await?);
    }
    if args.wants(Section::Partial) {
        r.partial = Some(scenarios::partial_failure(&mut b, &args).await?);
    }
    if args.wants(Section::Outage) {
        r.outage = Some(scenarios::outage(&mut b, &args).await?);
    }
    std::fs::create_dir_all(&args.out)?;
    let stamp = chrono::Utc::now().format("%Y-%m-%dT%H%MZ");
    let svg = args.out.join(format!("flow-{stamp}.svg"));
    let md = args.out.join(format!("flow-{stamp}.md"));
    if let Some(s) = &r.schedule {
        plot::render(&svg, &args, s)?;
    }
    let text = report::render(
        &args,
        &r,
        started,
        r.schedule.as_ref().map(|_| svg.as_path()),
    );
    std::fs::write(&md, &text)?;
    println!("{text}");
    say(format!("wrote {}", md.display()));
    b.cleanup().await
}
