//! `conveyor-bench`: measures conveyor against this machine's floor on the
//! real local RabbitMQ and PostgreSQL, with the simulator as a separate
//! process, and writes a markdown table and an SVG plot to `bench/results/`.
//!
//! Every figure is the median of `--runs` runs with its min–max; every
//! ratio is taken within one run (conveyor and its baseline measured back
//! to back) and then summarised the same way. Run it with `scripts/bench`.

mod floor;
mod flow;
mod harness;
mod plot;
mod procs;
mod report;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;

use harness::Bench;
use report::{report, Results};

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

#[derive(Parser)]
#[command(
    about = "Benchmark conveyor against a hand-written floor on local RabbitMQ and PostgreSQL"
)]
struct Args {
    /// Runs of each measurement (medians are reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Orders per throughput run at zero simulator latency.
    #[arg(long, default_value_t = 50_000)]
    orders: u64,
    /// Simulator latency of the latency-bound and naive runs.
    #[arg(long, default_value_t = 10)]
    latency_ms: u64,
    /// Stage concurrency C (validate and charge) of the latency-bound run.
    /// At 64 (the default config) and 10 ms the two cores saturate before
    /// the latency binds, so the run would not be latency-bound.
    #[arg(long, default_value_t = 32)]
    concurrency: u32,
    /// Orders per latency-bound run.
    #[arg(long, default_value_t = 20_000)]
    bound_orders: u64,
    /// Orders per naive run (one at a time: slow).
    #[arg(long, default_value_t = 300)]
    naive_orders: u64,
    /// The small backlog of the memory comparison.
    #[arg(long, default_value_t = 10_000)]
    small_backlog: u64,
    /// The large backlog of the memory comparison.
    #[arg(long, default_value_t = 1_000_000)]
    large_backlog: u64,
    /// Orders each run takes off the large backlog before SIGTERM.
    #[arg(long, default_value_t = 50_000)]
    large_take: u64,
    /// PostgreSQL server (the benchmark database is created on it).
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432")]
    postgres: String,
    /// The queue the runs use (purged before, deleted after).
    #[arg(long, default_value = "conveyor.bench")]
    queue: String,
    /// The database the runs use (created anew, dropped after).
    #[arg(long, default_value = "conveyor_bench")]
    database: String,
    /// Where the markdown table and the plot go.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

fn say(msg: impl AsRef<str>) {
    eprintln!("bench: {}", msg.as_ref());
}

async fn measure(b: &mut Bench) -> anyhow::Result<Results> {
    let mut r = Results::default();
    let runs = b.args.runs;
    let (n, latency) = (b.args.orders, b.args.latency_ms);

    let (mut sim, url) = b.simulator(0).await?;
    for run in 1..=runs {
        say(format!("zero latency, run {run}/{runs}: {n} orders each"));
        r.consume_ack.push(b.consume_ack(n).await?);
        r.insert.push(b.insert(n).await?);
        let f = b.floor(&url, n).await?;
        let (c, cpu_us, _) = b.conveyor(&url, n, &[]).await?;
        anyhow::ensure!(
            f.rows == n as i64 && c.rows == n as i64,
            "rows missing: floor {}, conveyor {}",
            f.rows,
            c.rows
        );
        r.vs_floor.push(c.rate / f.rate);
        r.cpu_us.push(cpu_us);
        say(format!(
            "  consume+ack {:.0}/s, insert {:.0}/s, floor {:.0}/s, conveyor {:.0}/s ({:.0} %), {cpu_us:.0} µs CPU/order",
            r.consume_ack.0[run - 1],
            r.insert.0[run - 1],
            f.rate,
            c.rate,
            100.0 * c.rate / f.rate
        ));
        r.floor.add(&f);
        r.conveyor.add(&c);
    }

    say(format!("memory: a {} orders backlog", b.args.small_backlog));
    for _ in 1..=runs {
        let (_, _, rss) = b.conveyor(&url, b.args.small_backlog, &[]).await?;
        r.rss_small.push(rss as f64 / 1024.0);
    }
    say(format!(
        "memory and drain: publishing a {} orders backlog",
        b.args.large_backlog
    ));
    b.purge().await?;
    b.publish(b.args.large_backlog, true).await?;
    for run in 1..=runs {
        let (rss, drain, stored) = b.backlog_run(&url).await?;
        let mib = rss as f64 / 1024.0;
        let small = r.rss_small.0.get(run - 1).copied().unwrap_or(f64::NAN);
        r.rss_large.push(mib);
        r.rss_ratio.push(mib / small);
        r.drain.push(drain);
        say(format!(
            "  run {run}/{runs}: peak RSS {mib:.1} MiB (small backlog: {small:.1}), drain {drain:.3} s, {stored} stored"
        ));
    }
    b.purge().await?;
    sim.terminate(Duration::from_secs(10)).await?;

    let (mut sim, url) = b.simulator(latency).await?;
    let c = b.args.concurrency;
    let bound = f64::from(c) / (latency as f64 / 1000.0);
    let extra = [
        ("CONVEYOR__PIPELINE__VALIDATE_CONCURRENCY", c.to_string()),
        ("CONVEYOR__PIPELINE__CHARGE_CONCURRENCY", c.to_string()),
    ];
    for run in 1..=runs {
        say(format!("latency {latency} ms, run {run}/{runs}"));
        let (o, _, _) = b.conveyor(&url, b.args.bound_orders, &extra).await?;
        let naive = b.naive(&url, b.args.naive_orders).await?;
        r.vs_bound.push(o.rate / bound);
        r.charge_ms.push(o.charge_ms);
        r.vs_effective
            .push(o.rate / (f64::from(c) / (o.charge_ms / 1000.0)));
        r.vs_naive.push(o.rate / naive.rate);
        say(format!(
            "  conveyor {:.0}/s of a {bound:.0}/s bound ({:.2} ms per charge call as conveyor sees it), naive {:.1}/s",
            o.rate, o.charge_ms, naive.rate
        ));
        r.bound.add(&o);
        r.naive.add(&naive);
    }
    sim.terminate(Duration::from_secs(10)).await?;
    Ok(r)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if std::env::args_os().nth(1).is_some_and(|a| a == "flow") {
        return flow::main(std::env::args_os().skip(1)).await;
    }
    let args = Args::parse();
    anyhow::ensure!(args.runs >= 1, "--runs must be at least 1");
    let started = Instant::now();
    let out = args.out.clone();
    let mut b = Bench::setup(args).await?;
    let r = measure(&mut b).await?;
    std::fs::create_dir_all(&out)?;
    let stamp = chrono::Utc::now().format("%Y-%m-%dT%H%MZ");
    let svg = out.join(format!("bench-{stamp}.svg"));
    let md = out.join(format!("bench-{stamp}.md"));
    let text = report(&b.args, &r, started, &svg);
    let l = b.args.latency_ms;
    let kinds = [
        ("floor, 0 ms".to_string(), &r.floor),
        ("conveyor, 0 ms".to_string(), &r.conveyor),
        (format!("conveyor, {l} ms"), &r.bound),
        (format!("naive, {l} ms"), &r.naive),
    ];
    let series: Vec<plot::Series> = kinds
        .iter()
        .map(|(label, k)| plot::Series {
            label: label.clone(),
            points: k.series.clone(),
        })
        .collect();
    let latency: Vec<plot::Latency> = kinds
        .iter()
        .map(|(label, k)| plot::Latency {
            label: label.clone(),
            p50_ms: k.p50.median(),
            p99_ms: k.p99.median(),
        })
        .collect();
    plot::render(
        &svg,
        "conveyor: throughput over time (last run of each kind), receive → commit latency",
        &series,
        &latency,
    )?;
    std::fs::write(&md, &text)?;
    println!("{text}");
    say(format!("wrote {} and {}", md.display(), svg.display()));
    b.cleanup().await
}
