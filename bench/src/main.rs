//! `conveyor-bench`: measures conveyor against this machine's floor on the
//! real local RabbitMQ and PostgreSQL, with the simulator as a separate
//! process, and writes a markdown table and an SVG plot to `bench/results/`.
//!
//! Every figure is the median of `--runs` runs with its min–max; every
//! ratio is taken within one run (conveyor and its baseline measured back
//! to back) and then summarised the same way. Run it with `scripts/bench`.

mod floor;
mod plot;
mod procs;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use conveyor::config::RabbitConfig;
use conveyor::produce::{publish_rabbit, Mix, OrderGen};
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Connection, ConnectionProperties};
use sqlx::postgres::{PgPool, PgPoolOptions};

use procs::{free_port, Proc};

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

/// Median and range of one figure over the runs.
#[derive(Default, Clone)]
struct Stat(Vec<f64>);

impl Stat {
    fn push(&mut self, v: f64) {
        self.0.push(v);
    }

    fn median(&self) -> f64 {
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }

    fn min(&self) -> f64 {
        self.0.iter().copied().fold(f64::INFINITY, f64::min)
    }

    fn max(&self) -> f64 {
        self.0.iter().copied().fold(f64::NEG_INFINITY, f64::max)
    }

    fn show(&self, decimals: usize) -> (String, String) {
        (
            format!("{:.*}", decimals, self.median()),
            format!("{:.*}–{:.*}", decimals, self.min(), decimals, self.max()),
        )
    }
}

/// What the database says about one consumer run.
struct Outcome {
    rows: i64,
    /// Rows committed after the first batch over the time since it.
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    series: Vec<(f64, f64)>,
    /// conveyor's mean time per order in the charge stage (its slot
    /// occupancy: the HTTP call as conveyor sees it), if measured.
    charge_ms: f64,
}

/// Per run kind: throughput, latency percentiles, one run's series.
#[derive(Default)]
struct Kind {
    rate: Stat,
    p50: Stat,
    p99: Stat,
    series: Vec<(f64, f64)>,
}

impl Kind {
    fn add(&mut self, o: &Outcome) {
        self.rate.push(o.rate);
        self.p50.push(o.p50_ms);
        self.p99.push(o.p99_ms);
        self.series = o.series.clone();
    }
}

#[derive(Default)]
struct Results {
    consume_ack: Stat,
    insert: Stat,
    floor: Kind,
    conveyor: Kind,
    vs_floor: Stat,
    cpu_us: Stat,
    bound: Kind,
    vs_bound: Stat,
    charge_ms: Stat,
    vs_effective: Stat,
    naive: Kind,
    vs_naive: Stat,
    rss_small: Stat,
    rss_large: Stat,
    rss_ratio: Stat,
    drain: Stat,
}

struct Bench {
    args: Args,
    bin: PathBuf,
    pool: PgPool,
    db_url: String,
    rabbit: RabbitConfig,
    logs: tempfile::TempDir,
    publishes: u64,
}

impl Bench {
    async fn setup(args: Args) -> anyhow::Result<Self> {
        let bin = std::env::current_exe()?.with_file_name("conveyor");
        anyhow::ensure!(
            bin.exists(),
            "{} not found: build it first (`cargo build --release --workspace`, which scripts/bench does)",
            bin.display()
        );
        let database = &args.database;
        anyhow::ensure!(
            !database.is_empty()
                && database
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "--database: letters, digits and _ only"
        );
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&format!("{}/postgres", args.postgres))
            .await
            .with_context(|| {
                format!(
                    "connecting to PostgreSQL at {} (start it with scripts/services)",
                    args.postgres
                )
            })?;
        sqlx::query(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
            .execute(&admin)
            .await?;
        sqlx::query(&format!("CREATE DATABASE {database}"))
            .execute(&admin)
            .await?;
        admin.close().await;
        let db_url = format!("{}/{database}", args.postgres);
        let status = std::process::Command::new(&bin)
            .arg("migrate")
            .env("CONVEYOR__DATABASE__URL", &db_url)
            .env("CONVEYOR__LOG__LEVEL", "warn")
            .status()?;
        anyhow::ensure!(status.success(), "conveyor migrate failed");
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect(&db_url)
            .await?;
        let rabbit = RabbitConfig {
            queue: args.queue.clone(),
            ..RabbitConfig::default()
        };
        let bench = Self {
            args,
            bin,
            pool,
            db_url,
            rabbit,
            logs: tempfile::tempdir()?,
            publishes: 0,
        };
        bench
            .purge()
            .await
            .context("RabbitMQ at 127.0.0.1:5672 (start it with scripts/services)")?;
        Ok(bench)
    }

    async fn amqp(&self) -> anyhow::Result<(Connection, lapin::Channel)> {
        let conn = Connection::connect(AMQP, ConnectionProperties::default()).await?;
        let ch = conn.create_channel().await?;
        Ok((conn, ch))
    }

    fn queue(&self) -> ShortString {
        ShortString::from(self.rabbit.queue.as_str())
    }

    /// Empties the queue (declaring it and its dead-letter queue).
    async fn purge(&self) -> anyhow::Result<()> {
        let (conn, ch) = self.amqp().await?;
        conveyor::source::rabbitmq::declare_topology(&ch, &self.rabbit).await?;
        ch.queue_purge(self.queue(), QueuePurgeOptions::default())
            .await?;
        conn.close(200, "done".into()).await.ok();
        Ok(())
    }

    /// Deletes the queues and the database the runs used.
    async fn cleanup(self) -> anyhow::Result<()> {
        let (conn, ch) = self.amqp().await?;
        for q in [self.rabbit.queue.clone(), self.rabbit.dead_letter_queue()] {
            ch.queue_delete(ShortString::from(q.as_str()), QueueDeleteOptions::default())
                .await?;
        }
        conn.close(200, "done".into()).await.ok();
        self.pool.close().await;
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&format!("{}/postgres", self.args.postgres))
            .await?;
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.args.database
        ))
        .execute(&admin)
        .await?;
        Ok(())
    }

    async fn queue_depth(&self) -> anyhow::Result<u64> {
        let (conn, ch) = self.amqp().await?;
        let q = ch
            .queue_declare(
                self.queue(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        conn.close(200, "done".into()).await.ok();
        Ok(u64::from(q.message_count()))
    }

    /// Publishes `n` good orders with a fresh run id, with confirms.
    async fn publish(&mut self, n: u64, progress: bool) -> anyhow::Result<()> {
        self.publishes += 1;
        let gen = OrderGen::new(
            format!("b{}-{}", std::process::id(), self.publishes),
            Mix::default(),
        );
        let started = Instant::now();
        let step = (n / 10).max(1);
        let mut shown = 0;
        publish_rabbit(
            &self.rabbit,
            (0..n).map(|i| gen.message(i).1),
            1000,
            None,
            |k| {
                if progress && k / step > shown {
                    shown = k / step;
                    say(format!(
                        "  published {k}/{n} ({:.0}/s)",
                        k as f64 / started.elapsed().as_secs_f64()
                    ));
                }
            },
        )
        .await?;
        Ok(())
    }

    async fn reset_db(&self) -> anyhow::Result<()> {
        sqlx::query("TRUNCATE orders").execute(&self.pool).await?;
        Ok(())
    }

    async fn rows(&self) -> anyhow::Result<i64> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM orders")
            .fetch_one(&self.pool)
            .await?)
    }

    /// Waits until `n` rows are stored, failing with the daemon's log if it
    /// exits or it takes far too long.
    async fn wait_rows(&self, n: i64, daemon: &mut Proc) -> anyhow::Result<()> {
        let limit = Duration::from_secs(60 + n as u64 / 200);
        let started = Instant::now();
        while self.rows().await? < n {
            if let Some(exit) = daemon.poll_exit()? {
                anyhow::bail!(
                    "the daemon exited ({:?}):\n{}",
                    exit.code,
                    daemon.log_tail()
                );
            }
            if started.elapsed() > limit {
                anyhow::bail!(
                    "{n} rows not stored within {limit:?}:\n{}",
                    daemon.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Throughput, receive → commit latency and a throughput series, from
    /// the rows' own timestamps (`committed_at` is the batch's transaction
    /// time).
    async fn outcome(&self) -> anyhow::Result<Outcome> {
        let (rows, span, after_first, p50, p99): (i64, f64, i64, f64, f64) = sqlx::query_as(
            "WITH t AS (SELECT min(committed_at) AS t0, max(committed_at) AS t1 FROM orders)
             SELECT count(*),
                    coalesce(extract(epoch FROM (SELECT t1 - t0 FROM t))::float8, 0),
                    count(*) FILTER (WHERE committed_at > (SELECT t0 FROM t)),
                    coalesce(percentile_cont(0.5) WITHIN GROUP
                        (ORDER BY extract(epoch FROM committed_at - received_at)), 0)::float8,
                    coalesce(percentile_cont(0.99) WITHIN GROUP
                        (ORDER BY extract(epoch FROM committed_at - received_at)), 0)::float8
             FROM orders",
        )
        .fetch_one(&self.pool)
        .await?;
        const BUCKET: f64 = 0.25;
        let buckets: Vec<(f64, i64)> = sqlx::query_as(
            "SELECT floor(extract(epoch FROM committed_at
                          - (SELECT min(committed_at) FROM orders)) / $1)::float8 AS b,
                    count(*)
             FROM orders GROUP BY b ORDER BY b",
        )
        .bind(BUCKET)
        .fetch_all(&self.pool)
        .await?;
        Ok(Outcome {
            rows,
            rate: if span > 0.0 {
                after_first as f64 / span
            } else {
                f64::NAN
            },
            p50_ms: p50 * 1000.0,
            p99_ms: p99 * 1000.0,
            series: buckets
                .into_iter()
                .map(|(b, n)| (b * BUCKET, n as f64 / BUCKET))
                .collect(),
            charge_ms: f64::NAN,
        })
    }

    fn log_path(&self, what: &str) -> PathBuf {
        self.logs.path().join(format!("{what}.log"))
    }

    async fn simulator(&self, latency_ms: u64) -> anyhow::Result<(Proc, String)> {
        let port = free_port()?;
        let listen = format!("127.0.0.1:{port}");
        let latency = latency_ms.to_string();
        let mut sim = Proc::spawn(
            &self.bin,
            &["simulate", "--listen", &listen, "--latency-ms", &latency],
            &[("CONVEYOR__LOG__LEVEL".into(), "warn".into())],
            self.log_path(&format!("simulator-{latency_ms}ms")),
        )?;
        let url = format!("http://{listen}");
        sim.wait_http_ok(&format!("{url}/healthz"), Duration::from_secs(20))
            .await?;
        Ok((sim, url))
    }

    /// Starts `conveyor run` against the benchmark queue and database.
    async fn daemon(&self, sim_url: &str, extra: &[(&str, String)]) -> anyhow::Result<(Proc, u16)> {
        let port = free_port()?;
        let mut env: Vec<(String, String)> = [
            ("CONVEYOR__SOURCE__KIND", "rabbitmq".to_string()),
            ("CONVEYOR__RABBITMQ__QUEUE", self.rabbit.queue.clone()),
            ("CONVEYOR__DATABASE__URL", self.db_url.clone()),
            ("CONVEYOR__RULE_ENGINE__URL", sim_url.to_string()),
            ("CONVEYOR__PAYMENT__URL", sim_url.to_string()),
            ("CONVEYOR__HTTP__LISTEN", format!("127.0.0.1:{port}")),
            ("CONVEYOR__LOG__LEVEL", "warn".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
        let mut d = Proc::spawn(&self.bin, &["run"], &env, self.log_path("daemon"))?;
        d.wait_http_ok(
            &format!("http://127.0.0.1:{port}/readyz"),
            Duration::from_secs(30),
        )
        .await?;
        Ok((d, port))
    }

    /// conveyor over `n` queued orders: outcome, CPU µs per order and peak
    /// RSS (KiB).
    async fn conveyor(
        &mut self,
        sim_url: &str,
        n: u64,
        extra: &[(&str, String)],
    ) -> anyhow::Result<(Outcome, f64, u64)> {
        self.reset_db().await?;
        self.publish(n, false).await?;
        let (mut d, port) = self.daemon(sim_url, extra).await?;
        let cpu0 = d.cpu_secs()?;
        self.wait_rows(n as i64, &mut d).await?;
        let cpu = d.cpu_secs()? - cpu0;
        let charge_ms = charge_call_ms(port).await?;
        let (_, exit) = d.terminate(Duration::from_secs(60)).await?;
        anyhow::ensure!(exit.code == Some(0), "daemon exit {:?}", exit.code);
        let mut o = self.outcome().await?;
        o.charge_ms = charge_ms;
        Ok((o, cpu * 1e6 / n as f64, exit.max_rss_kib))
    }

    async fn floor(&mut self, sim_url: &str, n: u64) -> anyhow::Result<Outcome> {
        self.reset_db().await?;
        self.publish(n, false).await?;
        floor::pipeline(AMQP, &self.rabbit.queue, 512, sim_url, self.pool.clone(), n).await?;
        self.outcome().await
    }

    async fn naive(&mut self, sim_url: &str, n: u64) -> anyhow::Result<Outcome> {
        self.reset_db().await?;
        self.publish(n, false).await?;
        floor::naive(AMQP, &self.rabbit.queue, sim_url, &self.pool, n).await?;
        self.outcome().await
    }

    async fn consume_ack(&mut self, n: u64) -> anyhow::Result<f64> {
        self.publish(n, false).await?;
        let secs = floor::consume_ack(AMQP, &self.rabbit.queue, 512, n).await?;
        Ok(n as f64 / secs)
    }

    async fn insert(&mut self, n: u64) -> anyhow::Result<f64> {
        self.reset_db().await?;
        self.publishes += 1;
        let rows = floor::rows(&format!("ins{}", self.publishes), n);
        let secs = floor::insert(&self.pool, rows).await?;
        Ok(n as f64 / secs)
    }

    /// Takes `large_take` orders off the large backlog, then SIGTERM:
    /// (peak RSS KiB, drain seconds, stored).
    async fn backlog_run(&mut self, sim_url: &str) -> anyhow::Result<(u64, f64, u64)> {
        self.reset_db().await?;
        let before = self.queue_depth().await?;
        let (mut d, _) = self.daemon(sim_url, &[]).await?;
        self.wait_rows(self.args.large_take as i64, &mut d).await?;
        let (drain, exit) = d.terminate(Duration::from_secs(60)).await?;
        anyhow::ensure!(exit.code == Some(0), "daemon exit {:?}", exit.code);
        let (stored, left) = (self.rows().await? as u64, self.queue_depth().await?);
        anyhow::ensure!(
            stored + left == before,
            "lost or doubled: {stored} stored + {left} queued != {before}"
        );
        Ok((exit.max_rss_kib, drain, stored))
    }
}

/// Mean seconds per order in the charge stage, from the daemon's metrics.
async fn charge_call_ms(port: u16) -> anyhow::Result<f64> {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await?
        .text()
        .await?;
    let value = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    let sum = value("conveyor_stage_duration_seconds_sum{stage=\"charge\"}");
    let count = value("conveyor_stage_duration_seconds_count{stage=\"charge\"}");
    Ok(match (sum, count) {
        (Some(s), Some(c)) if c > 0.0 => 1000.0 * s / c,
        _ => f64::NAN,
    })
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

fn commit() -> String {
    let out = std::process::Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        _ => "unknown".into(),
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "**missed**"
    }
}

fn table(a: &Args, r: &Results) -> String {
    let (l, c) = (a.latency_ms, a.concurrency);
    let bound = f64::from(c) / (l as f64 / 1000.0);
    let lat = |k: &Kind| format!("{:.1} / {:.1}", k.p50.median(), k.p99.median());
    let none = String::new;
    let mut rows: Vec<[String; 5]> = Vec::new();
    let mut row = |what: &str, s: &Stat, d: usize, target: String, latency: String| {
        let (m, range) = s.show(d);
        rows.push([what.to_string(), m, range, target, latency]);
    };
    row(
        "floor: RabbitMQ consume + multi-ack alone (msg/s)",
        &r.consume_ack,
        0,
        none(),
        none(),
    );
    row(
        "floor: batched insert alone (rows/s)",
        &r.insert,
        0,
        none(),
        none(),
    );
    row(
        "floor: consume → 2 HTTP calls → batched insert → multi-ack (orders/s)",
        &r.floor.rate,
        0,
        none(),
        lat(&r.floor),
    );
    row(
        "conveyor, simulator at 0 ms (orders/s)",
        &r.conveyor.rate,
        0,
        none(),
        lat(&r.conveyor),
    );
    row(
        "conveyor ÷ floor",
        &r.vs_floor,
        2,
        format!("≥ 0.90: {}", verdict(r.vs_floor.median() >= 0.9)),
        none(),
    );
    row(
        &format!("conveyor at L = {l} ms, C = {c} (orders/s)"),
        &r.bound.rate,
        0,
        none(),
        lat(&r.bound),
    );
    row(
        &format!("… ÷ Little's-law bound C/L = {bound:.0}/s"),
        &r.vs_bound,
        2,
        format!("≥ 0.95: {}", verdict(r.vs_bound.median() >= 0.95)),
        none(),
    );
    row(
        "… mean charge-stage time per order as conveyor sees it, L' (ms)",
        &r.charge_ms,
        2,
        none(),
        none(),
    );
    row(
        "… ÷ C/L' (the bound at the latency actually served)",
        &r.vs_effective,
        2,
        none(),
        none(),
    );
    row(
        &format!("naive, one at a time, L = {l} ms (orders/s)"),
        &r.naive.rate,
        1,
        none(),
        lat(&r.naive),
    );
    row(
        "conveyor ÷ naive at the same latency",
        &r.vs_naive,
        0,
        format!("≥ 20: {}", verdict(r.vs_naive.median() >= 20.0)),
        none(),
    );
    row(
        "conveyor CPU (user + sys) per order at saturation (µs)",
        &r.cpu_us,
        0,
        format!("≤ 100: {}", verdict(r.cpu_us.median() <= 100.0)),
        none(),
    );
    row(
        &format!("peak RSS, {} backlog (MiB)", a.small_backlog),
        &r.rss_small,
        1,
        none(),
        none(),
    );
    row(
        &format!("peak RSS, {} backlog (MiB)", a.large_backlog),
        &r.rss_large,
        1,
        format!("≤ 64: {}", verdict(r.rss_large.median() <= 64.0)),
        none(),
    );
    row(
        "… ÷ RSS at the small backlog",
        &r.rss_ratio,
        2,
        format!("≤ 1.10: {}", verdict(r.rss_ratio.median() <= 1.1)),
        none(),
    );
    row(
        "drain: SIGTERM → exit at full load, default config (s)",
        &r.drain,
        3,
        format!("≤ 2: {}", verdict(r.drain.median() <= 2.0)),
        none(),
    );
    let mut md = String::from(
        "| measure | median | min–max | target | p50 / p99 latency (ms) |\n\
         |---|---:|---:|---|---:|\n",
    );
    for [a, b, c, d, e] in rows {
        md.push_str(&format!("| {a} | {b} | {c} | {d} | {e} |\n"));
    }
    md
}

fn report(a: &Args, r: &Results, started: Instant, svg: &Path) -> String {
    let date = chrono::Utc::now().format("%Y-%m-%d %H:%MZ");
    format!(
        "# conveyor benchmark, {date}\n\n\
         commit {commit}; {cpus} × {cpu}; release build; `scripts/bench` ({runs} runs, {secs:.0} s).\n\
         RabbitMQ and PostgreSQL on loopback, the simulator in its own process;\n\
         {n} orders per throughput run, all of them good orders (validated and charged).\n\n\
         {table}\n\
         Ratios are taken within each run, then summarised. Latency is receive → commit\n\
         per order (`committed_at − received_at` of the stored rows; `committed_at` is the\n\
         batch's transaction time). Throughput counts rows committed after the first\n\
         batch over the time since it. RSS is the daemon's peak (`VmHWM`); the large\n\
         backlog runs take {take} orders each off the queue, then get SIGTERM.\n\n\
         Plot: `{plot}`\n",
        commit = commit(),
        cpus = std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu = cpu_model(),
        runs = a.runs,
        secs = started.elapsed().as_secs_f64(),
        n = a.orders,
        table = table(a, r),
        take = a.large_take,
        plot = svg
            .file_name()
            .map_or_else(String::new, |f| f.to_string_lossy().into_owned()),
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
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
