//! `conveyor demo`: the whole daemon with nothing installed. librdkafka's
//! in-process mock cluster is the broker (a real Kafka-protocol
//! implementation inside this process), a SQLite file is the store, the
//! simulator answers on a loopback port. It produces orders, processes them,
//! drains, and checks the invariants: stored + dead-lettered = produced, no
//! order charged twice, offsets committed to the log end.
//!
//! The mock cluster silently drops what exceeds its per-partition retention
//! (about 5 MiB or 100,000 messages), so the producer stays at most
//! [`AHEAD_PER_PARTITION`] orders per partition ahead of what the daemon has
//! acknowledged: any `--orders` completes, with memory flat. Should progress
//! ever stop for `--stall-timeout`, the demo ends with the invariant that
//! failed and its likely cause instead of waiting.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::oneshot;

use crate::config::{Config, SourceKind};
use crate::telemetry::{histogram_quantile, Metrics};
use crate::tools::produce::{Intent, Mix, OrderGen};
use crate::tools::sim::{self, EndpointKnobs, Knobs};

#[derive(Debug, Clone)]
pub struct DemoArgs {
    pub orders: u64,
    pub partitions: i32,
    pub latency_ms: u64,
    pub mix: Mix,
    pub prefetch: u32,
    /// Keep the SQLite file at this path instead of a temporary one.
    pub keep: Option<PathBuf>,
    pub quiet: bool,
    /// No order acknowledged for this long ends the demo as failed.
    pub stall_timeout: Duration,
}

/// How far the producer may run ahead of the daemon's acknowledgements, per
/// partition: about 1.2 MB of ~300-byte orders, a quarter of what the mock
/// cluster keeps of a partition, so nothing produced is ever dropped.
pub const AHEAD_PER_PARTITION: u64 = 4_000;

const TOPIC: &str = "orders";
const GROUP: &str = "conveyor-demo";

/// Runs the demo; returns whether every invariant held.
pub async fn run(args: DemoArgs) -> anyhow::Result<bool> {
    let cluster = MockCluster::new(1).context("starting the in-process Kafka mock cluster")?;
    cluster
        .create_topic(TOPIC, args.partitions, 1)
        .context("creating the orders topic")?;
    cluster
        .create_topic(&format!("{TOPIC}.dlq"), 1, 1)
        .context("creating the dead-letter topic")?;
    let brokers = cluster.bootstrap_servers();

    let sim = sim::start(
        "127.0.0.1:0".parse()?,
        Knobs {
            validate: EndpointKnobs {
                latency_ms: args.latency_ms,
                ..Default::default()
            },
            charge: EndpointKnobs {
                latency_ms: args.latency_ms,
                ..Default::default()
            },
            ..Knobs::default()
        },
    )
    .await?;

    let tmp = tempfile::tempdir()?;
    let db_path = match &args.keep {
        Some(p) => p.clone(),
        None => tmp.path().join("conveyor-demo.db"),
    };
    if db_path.exists() {
        std::fs::remove_file(&db_path)
            .with_context(|| format!("removing the old {}", db_path.display()))?;
    }

    let mut config = Config::default();
    config.source.kind = SourceKind::Kafka;
    config.source.prefetch = args.prefetch;
    config.kafka.brokers = brokers.clone();
    config.kafka.group_id = GROUP.into();
    config.kafka.topics = vec![TOPIC.into()];
    config.kafka.commit_interval = Duration::from_millis(500);
    config.kafka.lag_interval = Duration::from_millis(500);
    config
        .kafka
        .properties
        .insert("session.timeout.ms".into(), "6000".into());
    config.database.url = format!("sqlite://{}", db_path.display());
    config.database.max_connections = 2;
    config.rule_engine.url = sim.url.clone();
    config.payment.url = sim.url.clone();
    config.http.listen = "127.0.0.1:0".parse()?;
    config.validate()?;

    // Produce in the background while the daemon consumes.
    let generator = OrderGen::new(
        format!("demo-{}", &uuid::Uuid::new_v4().simple().to_string()[..6]),
        args.mix,
    );
    let intents: Vec<Intent> = (0..args.orders).map(|i| generator.intent(i)).collect();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("acks", "all")
        .set("linger.ms", "5")
        .create()
        .context("creating the demo producer")?;
    let n = args.orders;
    let gen2 = generator.clone();
    let metrics = Arc::new(Metrics::new()?);
    let acked = metrics.acked.clone();
    let ahead = AHEAD_PER_PARTITION * u64::try_from(args.partitions.max(1)).unwrap_or(1);
    let producing = tokio::spawn(async move {
        let began = Instant::now();
        let mut pending = Vec::with_capacity(1000);
        for i in 0..n {
            // Bounded distance ahead of the consumer (and never a batch in
            // flight while waiting, so the wait cannot hold acks back).
            if i >= acked.get() + ahead {
                futures::future::try_join_all(std::mem::take(&mut pending)).await?;
                while i >= acked.get() + ahead {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            let (_, body) = gen2.message(i);
            let key = gen2.order_id(i);
            let p = producer.clone();
            pending.push(async move {
                p.send(
                    FutureRecord::to(TOPIC).key(&key).payload(&body),
                    Duration::from_secs(30),
                )
                .await
                .map(|_| ())
                .map_err(|(e, _)| e)
            });
            if pending.len() >= 1000 {
                futures::future::try_join_all(std::mem::take(&mut pending)).await?;
            }
        }
        futures::future::try_join_all(pending).await?;
        Ok::<_, rdkafka::error::KafkaError>(began.elapsed())
    });

    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (ready_tx, ready_rx) = oneshot::channel();
    let hooks = crate::Hooks {
        on_ready: Some(Box::new(move |_| {
            let _ = ready_tx.send(());
        })),
        metrics: Some(metrics.clone()),
    };
    let daemon = tokio::spawn(crate::run_with(
        config,
        async move {
            let _ = stop_rx.await;
        },
        hooks,
    ));
    ready_rx.await.context("the daemon did not start")?;
    // The clock starts at the first message: joining the group takes the
    // mock cluster a few seconds, which says nothing about throughput.
    let join_deadline = Instant::now() + Duration::from_secs(60);
    while metrics.received.get() == 0 && Instant::now() < join_deadline && !daemon.is_finished() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = Instant::now();
    let bar = if args.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(n)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} processed {pos}/{len} {wide_bar} {per_sec} ETA {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut last = (metrics.acked.get(), Instant::now());
    let stalled = loop {
        let done = metrics.acked.get();
        bar.set_position(done);
        if done >= n {
            break None;
        }
        if done != last.0 {
            last = (done, Instant::now());
        }
        if daemon.is_finished() || last.1.elapsed() >= args.stall_timeout {
            break Some((done, last.1.elapsed()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let secs = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    if let Some((done, quiet_for)) = stalled {
        let cause = stall_cause(&daemon, &producing, &metrics, &brokers, args.latency_ms).await;
        // Stop what is left; the daemon's own drain deadline bounds the wait.
        let _ = stop_tx.send(());
        producing.abort();
        let ended = tokio::time::timeout(Duration::from_secs(60), daemon).await;
        sim.stop().await;
        drop(cluster);
        println!("conveyor demo: {n} orders through the whole daemon");
        println!();
        println!(
            "  [FAIL] progress: {done} of {n} orders acknowledged, then none for {:.0} s",
            quiet_for.as_secs_f64()
        );
        println!("         likely cause: {cause}");
        if let Ok(Ok(Err(e))) = ended {
            println!("         the daemon ended with: {e:#}");
        }
        println!();
        println!("invariants: FAILED");
        return Ok(false);
    }
    let produced_in = producing
        .await
        .context("producer task")?
        .context("producing orders")?;
    let _ = stop_tx.send(());
    let report = daemon.await.context("daemon task")??;

    // Invariants, from the outside.
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db_path.display())).await?;
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&pool)
        .await?;
    let by_status: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM orders GROUP BY status ORDER BY status")
            .fetch_all(&pool)
            .await?;
    pool.close().await;
    let ledger = sim.ledger();
    let charged_rows: i64 = by_status
        .iter()
        .filter(|(s, _)| s != "rejected")
        .map(|(_, c)| c)
        .sum();
    let (dlq, lag) = {
        let brokers = brokers.clone();
        tokio::task::spawn_blocking(move || offsets(&brokers, n)).await??
    };
    let poison_expected = intents.iter().filter(|i| **i == Intent::Poison).count() as i64;

    let p = |q| histogram_quantile(&metrics.end_to_end, q).unwrap_or(0.0) * 1000.0;
    let rss = peak_rss_kib();
    println!("conveyor demo: {n} orders through the whole daemon");
    println!(
        "  broker     librdkafka mock cluster, topic {TOPIC:?} with {} partitions",
        args.partitions
    );
    println!("  store      SQLite {}", db_path.display());
    println!(
        "  downstream simulator at {} (latency {} ms)",
        sim.url, args.latency_ms
    );
    println!(
        "  producer   {n} orders in {:.2} s ({:.0}/s, acks=all), at most {ahead} ahead of the daemon",
        produced_in.as_secs_f64(),
        n as f64 / produced_in.as_secs_f64().max(1e-9)
    );
    println!();
    println!(
        "  throughput   {:.0} orders/s ({n} in {secs:.2} s)",
        n as f64 / secs
    );
    println!(
        "  outcomes     accepted {}  rejected {}  declined {}  dead-lettered {}",
        report.accepted, report.rejected, report.declined, report.dead_lettered
    );
    let reasons = dead_letter_reasons(&metrics);
    println!(
        "  dead letters {}",
        if reasons.is_empty() {
            "none".into()
        } else {
            reasons
        }
    );
    println!(
        "  end-to-end   p50 {:.1} ms  p99 {:.1} ms (broker timestamp → commit)",
        p(0.5),
        p(0.99)
    );
    println!(
        "  peak RSS     {:.1} MiB (whole process: daemon, embedded broker, simulator)",
        rss as f64 / 1024.0
    );
    println!();
    let checks = [
        (
            format!("stored + dead-lettered = produced ({stored} + {dlq} = {n})"),
            stored + dlq == n as i64,
        ),
        (
            format!("dead-lettered = poison produced ({dlq} = {poison_expected})"),
            dlq == poison_expected,
        ),
        (
            format!(
                "no order charged twice ({} double charges)",
                ledger.double_charged_orders
            ),
            ledger.double_charged_orders == 0,
        ),
        (
            format!(
                "one charge per charged order ({} charges, {charged_rows} rows)",
                ledger.charges.len()
            ),
            ledger.charges.len() as i64 == charged_rows,
        ),
        (
            format!("offsets committed to the log end (lag {lag})"),
            lag == 0,
        ),
        (format!("clean drain ({})", report.drained), report.drained),
    ];
    let mut ok = true;
    for (what, held) in &checks {
        println!("  [{}] {what}", if *held { " ok " } else { "FAIL" });
        ok &= held;
    }
    println!();
    println!("invariants: {}", if ok { "ok" } else { "FAILED" });
    if args.keep.is_some() {
        println!("kept {}", db_path.display());
    }
    sim.stop().await;
    drop(cluster);
    Ok(ok)
}

/// Why no order has been acknowledged for a while, from what can be seen:
/// the daemon or the producer ended, the broker dropped messages, orders
/// stuck inside the daemon, or nothing to consume.
async fn stall_cause(
    daemon: &tokio::task::JoinHandle<anyhow::Result<crate::Report>>,
    producing: &tokio::task::JoinHandle<Result<Duration, rdkafka::error::KafkaError>>,
    metrics: &Metrics,
    brokers: &str,
    latency_ms: u64,
) -> String {
    if daemon.is_finished() {
        return "the daemon stopped before every order was processed (its error follows)".into();
    }
    if producing.is_finished() && metrics.received.get() == 0 {
        return "producing failed or the daemon never received an order: is the topic there?"
            .into();
    }
    let brokers = brokers.to_string();
    let positions = tokio::task::spawn_blocking(move || partition_positions(&brokers)).await;
    let Ok(Ok(positions)) = positions else {
        return "the broker cannot be asked for its offsets: it is not answering".into();
    };
    let dropped: i64 = positions
        .iter()
        .map(|p| p.low.max(p.committed) - p.committed)
        .sum();
    if dropped > 0 {
        return format!(
            "the broker dropped {dropped} messages the daemon had not consumed yet (log start \
             past the committed offset: the mock cluster keeps about 5 MiB or 100,000 messages \
             per partition); they can never arrive"
        );
    }
    let unacked = metrics.unacked.get();
    if unacked > 0 {
        return format!(
            "{unacked} orders are held inside the daemon and none completes: a downstream \
             (simulator latency {latency_ms} ms) or the store is not answering in time"
        );
    }
    let behind: i64 = positions.iter().map(|p| p.end - p.committed).sum();
    if behind > 0 {
        return format!(
            "{behind} messages wait in the broker and the daemon receives none: the consumer \
             is not fetching (group join or rebalance stuck)"
        );
    }
    "the daemon has consumed everything the broker holds: the producer is not producing".into()
}

/// One partition of the orders topic as the broker sees it.
struct Position {
    low: i64,
    committed: i64,
    end: i64,
}

fn partition_positions(brokers: &str) -> anyhow::Result<Vec<Position>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", GROUP)
        .create()?;
    let timeout = Duration::from_secs(5);
    let metadata = consumer.fetch_metadata(Some(TOPIC), timeout)?;
    let mut tpl = TopicPartitionList::new();
    for t in metadata.topics() {
        for p in t.partitions() {
            tpl.add_partition(TOPIC, p.id());
        }
    }
    let committed = consumer.committed_offsets(tpl, timeout)?;
    let mut out = Vec::new();
    for e in committed.elements() {
        let (low, end) = consumer.fetch_watermarks(TOPIC, e.partition(), timeout)?;
        let committed = match e.offset() {
            Offset::Offset(c) => c,
            _ => 0,
        };
        out.push(Position {
            low,
            committed,
            end,
        });
    }
    Ok(out)
}

/// Messages in the dead-letter topic, and the group's total lag on the
/// orders topic (log end − committed), read from the broker.
fn offsets(brokers: &str, _produced: u64) -> anyhow::Result<(i64, i64)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", GROUP)
        .create()?;
    let timeout = Duration::from_secs(5);
    let (low, high) = consumer.fetch_watermarks(&format!("{TOPIC}.dlq"), 0, timeout)?;
    let metadata = consumer.fetch_metadata(Some(TOPIC), timeout)?;
    let mut tpl = TopicPartitionList::new();
    for t in metadata.topics() {
        for p in t.partitions() {
            tpl.add_partition(TOPIC, p.id());
        }
    }
    let committed = consumer.committed_offsets(tpl, timeout)?;
    let mut lag = 0;
    for e in committed.elements() {
        let (_, end) = consumer.fetch_watermarks(TOPIC, e.partition(), timeout)?;
        lag += match e.offset() {
            Offset::Offset(c) => end - c,
            _ => end,
        };
    }
    Ok((high - low, lag))
}

fn dead_letter_reasons(metrics: &Metrics) -> String {
    use prometheus::core::Collector;
    let mut parts = Vec::new();
    for family in metrics.dead_letters.collect() {
        for m in family.get_metric() {
            let reason = m
                .get_label()
                .iter()
                .find(|l| l.name() == "reason")
                .map(|l| l.value().to_string())
                .unwrap_or_default();
            parts.push(format!("{reason} {}", m.get_counter().get_value()));
        }
    }
    parts.sort();
    parts.join("  ")
}

/// Peak resident set size of this process (`VmHWM`), KiB.
pub fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}
