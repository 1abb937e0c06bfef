//! What every flow run needs around the daemon: a simulator with a capacity
//! model, its knobs and ledger, the daemon's metrics (read once, or sampled
//! in the background), the queue's depth, and what the store says about a
//! window of time.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use lapin::options::{QueueDeclareOptions, QueuePurgeOptions};
use lapin::types::{FieldTable, ShortString};

use crate::harness::Bench;
use crate::procs::{free_port, Proc};

/// The simulator's capacity model at both endpoints.
#[derive(Clone, Copy, Default)]
pub(crate) struct SimLimits {
    pub(crate) capacity: u32,
    pub(crate) queue_limit: u32,
    pub(crate) rate_limit: u32,
}

/// Starts `conveyor simulate` at `latency_ms` with `limits`.
pub(crate) async fn simulator(
    b: &Bench,
    latency_ms: u64,
    limits: SimLimits,
    name: &str,
) -> anyhow::Result<(Proc, String)> {
    let listen = format!("127.0.0.1:{}", free_port()?);
    let (l, c, q, r) = (
        latency_ms.to_string(),
        limits.capacity.to_string(),
        limits.queue_limit.to_string(),
        limits.rate_limit.to_string(),
    );
    let mut sim = Proc::spawn(
        &b.bin,
        &[
            "simulate",
            "--listen",
            &listen,
            "--latency-ms",
            &l,
            "--capacity",
            &c,
            "--queue-limit",
            &q,
            "--rate-limit",
            &r,
        ],
        &[("CONVEYOR__LOG__LEVEL".into(), "warn".into())],
        b.logs.path().join(format!("simulator-{name}.log")),
    )?;
    let url = format!("http://{listen}");
    sim.wait_http_ok(&format!("{url}/healthz"), Duration::from_secs(20))
        .await?;
    Ok((sim, url))
}

/// How long a stopped daemon may drain: a drain waiting for an open
/// circuit gives up after it (what is unfinished goes back to the queue),
/// so a run ends without the default 20 s of waiting.
pub(crate) const DRAIN_TIMEOUT: (&str, &str) = ("CONVEYOR__SHUTDOWN__DRAIN_TIMEOUT", "5s");

/// Starts the daemon with `env` and [`DRAIN_TIMEOUT`].
pub(crate) async fn daemon(
    b: &Bench,
    sim_url: &str,
    env: &[(&str, String)],
) -> anyhow::Result<(Proc, u16)> {
    let mut env = env.to_vec();
    env.push((DRAIN_TIMEOUT.0, DRAIN_TIMEOUT.1.to_string()));
    b.daemon(sim_url, &env).await
}

/// Merges `patch` into the simulator's knobs (`PUT /knobs`).
pub(crate) async fn knobs(url: &str, patch: serde_json::Value) -> anyhow::Result<()> {
    let r = reqwest::Client::new()
        .put(format!("{url}/knobs"))
        .json(&patch)
        .send()
        .await?;
    anyhow::ensure!(
        r.status().is_success(),
        "PUT /knobs {patch}: {}",
        r.status()
    );
    Ok(())
}

/// The simulator's books, as far as the benchmark reads them.
#[derive(Default, Clone, Copy)]
pub(crate) struct SimBooks {
    pub(crate) double_charged: u64,
    /// Served, 503 for a full queue, 429: both endpoints together.
    pub(crate) served: u64,
    pub(crate) overloaded: u64,
    pub(crate) rate_limited: u64,
}

pub(crate) async fn ledger(url: &str) -> anyhow::Result<SimBooks> {
    let v: serde_json::Value = reqwest::get(format!("{url}/ledger")).await?.json().await?;
    let n = |path: &[&str]| {
        path.iter()
            .try_fold(&v, |v, k| v.get(*k))
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0)
    };
    let both = |field: &str| n(&["validate_load", field]) + n(&["charge_load", field]);
    Ok(SimBooks {
        double_charged: n(&["double_charged_orders"]),
        served: both("served"),
        overloaded: both("overloaded"),
        rate_limited: both("rate_limited"),
    })
}

/// Waits up to two minutes for RabbitMQ to take connections again (other
/// work on the machine may restart it).
pub(crate) async fn wait_rabbit(b: &Bench) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        match b.amqp().await {
            Ok((conn, _)) => {
                conn.close(200, "done".into()).await.ok();
                return Ok(());
            }
            Err(e) if started.elapsed() > Duration::from_secs(120) => {
                return Err(e.context("RabbitMQ at 127.0.0.1:5672 (start it with scripts/services)"))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// After a failed run: waits for RabbitMQ, then starts from an empty
/// queue, or gives up after `attempt` 3.
pub(crate) async fn recover(b: &Bench, attempt: u32, e: anyhow::Error) -> anyhow::Result<()> {
    if attempt >= 3 {
        return Err(e);
    }
    crate::say(format!(
        "  the run failed ({e:#}); once more from an empty queue"
    ));
    wait_rabbit(b).await?;
    reset(b).await
}

/// Empties the queue, its dead-letter queue and the orders table.
pub(crate) async fn reset(b: &Bench) -> anyhow::Result<()> {
    b.purge().await?;
    clear_store(b).await
}

/// Empties the dead-letter queue and the orders table; the queue keeps
/// what is left in it for the next run.
pub(crate) async fn clear_store(b: &Bench) -> anyhow::Result<()> {
    let (conn, ch) = b.amqp().await?;
    let dlq = ShortString::from(b.rabbit.dead_letter_queue().as_str());
    ch.queue_purge(dlq, QueuePurgeOptions::default()).await?;
    conn.close(200, "done".into()).await.ok();
    sqlx::query("TRUNCATE orders").execute(&b.pool).await?;
    Ok(())
}

/// Messages ready in the queue and in its dead-letter queue.
pub(crate) async fn depths(b: &Bench) -> anyhow::Result<(u64, u64)> {
    wait_rabbit(b).await?;
    let (conn, ch) = b.amqp().await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let q = ch
        .queue_declare(b.queue(), passive, FieldTable::default())
        .await?;
    let dlq = ShortString::from(b.rabbit.dead_letter_queue().as_str());
    let d = ch
        .queue_declare(dlq, passive, FieldTable::default())
        .await?;
    conn.close(200, "done".into()).await.ok();
    Ok((u64::from(q.message_count()), u64::from(d.message_count())))
}

/// Every order accounted for once the daemon is gone: stored, still queued
/// or dead-lettered, and none charged twice. RabbitMQ counts returned
/// messages a moment after the connection closes, so this polls.
pub(crate) async fn account(b: &Bench, sim_url: &str, published: u64) -> anyhow::Result<u64> {
    let started = Instant::now();
    loop {
        let (left, dead) = depths(b).await?;
        let stored = b.rows().await? as u64;
        if stored + left + dead == published {
            let books = ledger(sim_url).await?;
            anyhow::ensure!(
                books.double_charged == 0,
                "{} orders charged twice",
                books.double_charged
            );
            return Ok(dead);
        }
        if started.elapsed() > Duration::from_secs(10) {
            anyhow::bail!(
                "lost or doubled: {stored} stored + {left} queued + {dead} dead-lettered != {published}"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Rows committed in `[from, to)` and their p99 receive → commit (ms).
pub(crate) async fn window(
    b: &Bench,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> anyhow::Result<(i64, f64)> {
    let (n, p99): (i64, f64) = sqlx::query_as(
        "SELECT count(*),
                coalesce(percentile_cont(0.99) WITHIN GROUP
                    (ORDER BY extract(epoch FROM committed_at - received_at)), 0)::float8
         FROM orders WHERE committed_at >= $1 AND committed_at < $2",
    )
    .bind(from)
    .bind(to)
    .fetch_one(&b.pool)
    .await?;
    Ok((n, p99 * 1000.0))
}

/// Orders committed per second over time since `t0`, in `bucket`-second bins.
pub(crate) async fn committed_series(
    b: &Bench,
    t0: DateTime<Utc>,
    bucket: f64,
) -> anyhow::Result<Vec<(f64, f64)>> {
    let rows: Vec<(f64, i64)> = sqlx::query_as(
        "SELECT floor(extract(epoch FROM committed_at - $1) / $2)::float8 AS b, count(*)
         FROM orders WHERE committed_at >= $1 GROUP BY b ORDER BY b",
    )
    .bind(t0)
    .bind(bucket)
    .fetch_all(&b.pool)
    .await?;
    // A bin without a commit is a zero, not a gap for the line to bridge.
    let last = rows.last().map_or(0, |(k, _)| *k as usize);
    let mut counts = vec![0i64; last + 1];
    for (k, n) in rows {
        if let Some(c) = counts.get_mut(k as usize) {
            *c = n;
        }
    }
    Ok(counts
        .into_iter()
        .enumerate()
        .map(|(k, n)| ((k as f64 + 0.5) * bucket, n as f64 / bucket))
        .collect())
}

/// The daemon's counters and gauges that the flow benchmark reads.
#[derive(Default, Clone, Copy, Debug)]
pub(crate) struct Metrics {
    /// `conveyor_downstream_concurrency_limit`: rule engine, payment.
    pub(crate) limit: [f64; 2],
    /// Downstream requests, all results, both downstreams.
    pub(crate) requests: f64,
    /// … answered 503 (any 5xx) or 429.
    pub(crate) refused: f64,
    pub(crate) retries: f64,
    /// Requests to the payment provider alone, all results.
    pub(crate) payment_requests: f64,
    pub(crate) budget_refusals: f64,
    /// `conveyor_downstream_rtt_seconds` of the payment provider: sum, count.
    pub(crate) payment_rtt: [f64; 2],
}

/// Sums the samples of `name` whose labels include every `(key, value)`.
fn sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(key, _)| {
            let (n, rest) = key.split_once('{').unwrap_or((key, ""));
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|(_, v)| v.parse::<f64>().ok())
        .sum()
}

pub(crate) fn parse(text: &str) -> Metrics {
    let requests = "conveyor_downstream_requests_total";
    Metrics {
        limit: [
            sum(
                text,
                "conveyor_downstream_concurrency_limit",
                &[("downstream", "rule_engine")],
            ),
            sum(
                text,
                "conveyor_downstream_concurrency_limit",
                &[("downstream", "payment")],
            ),
        ],
        requests: sum(text, requests, &[]),
        refused: sum(text, requests, &[("result", "server_error")])
            + sum(text, requests, &[("result", "throttled")]),
        retries: sum(text, "conveyor_downstream_retries_total", &[]),
        payment_requests: sum(text, requests, &[("downstream", "payment")]),
        budget_refusals: sum(text, "conveyor_downstream_retry_budget_refusals_total", &[]),
        payment_rtt: ["sum", "count"].map(|k| {
            sum(
                text,
                &format!("conveyor_downstream_rtt_seconds_{k}"),
                &[("downstream", "payment")],
            )
        }),
    }
}

pub(crate) async fn metrics(port: u16) -> anyhow::Result<Metrics> {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await?
        .text()
        .await?;
    Ok(parse(&text))
}

/// One sample of the daemon's metrics, `t` seconds after the sampler began.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Sample {
    pub(crate) t: f64,
    pub(crate) m: Metrics,
}

/// Samples the metrics of whichever daemon listens on `port` (0: none right
/// now, as while the oracle restarts) every `every` until dropped.
pub(crate) struct Sampler {
    pub(crate) port: Arc<AtomicU16>,
    samples: Arc<Mutex<Vec<Sample>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    /// Sample times count from `started`.
    pub(crate) fn start(port: u16, every: Duration, started: Instant) -> Self {
        let port = Arc::new(AtomicU16::new(port));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let (p, s) = (port.clone(), samples.clone());
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let port = p.load(Ordering::Acquire);
                if port == 0 {
                    continue;
                }
                // A daemon going away mid-read is not an error here.
                if let Ok(m) = metrics(port).await {
                    let t = started.elapsed().as_secs_f64();
                    if let Ok(mut v) = s.lock() {
                        v.push(Sample { t, m });
                    }
                }
            }
        });
        Self {
            port,
            samples,
            task,
        }
    }

    pub(crate) fn finish(self) -> Vec<Sample> {
        self.task.abort();
        self.samples.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

/// How much a counter rose over `[from, to)` of the samples, a fall (a
/// restarted daemon) counting as a rise from zero.
pub(crate) fn rise(
    samples: &[Sample],
    from: f64,
    to: f64,
    counter: impl Fn(&Metrics) -> f64,
) -> f64 {
    let mut total = 0.0;
    // The last sample before the window is where its first rise starts.
    let mut prev: Option<f64> = None;
    for s in samples.iter().filter(|s| s.t < to) {
        let v = counter(&s.m);
        if let (Some(p), true) = (prev, s.t >= from) {
            total += if v >= p { v - p } else { v };
        }
        prev = Some(v);
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_labelled_samples() {
        let text = "# HELP x\n\
            conveyor_downstream_requests_total{downstream=\"payment\",result=\"ok\"} 10\n\
            conveyor_downstream_requests_total{downstream=\"payment\",result=\"server_error\"} 2\n\
            conveyor_downstream_requests_total{downstream=\"rule_engine\",result=\"throttled\"} 3\n\
            conveyor_downstream_concurrency_limit{downstream=\"payment\"} 17\n";
        let m = parse(text);
        assert_eq!(m.requests, 15.0);
        assert_eq!(m.refused, 5.0);
        assert_eq!(m.payment_requests, 12.0);
        assert_eq!(m.limit, [0.0, 17.0]);
    }

    #[test]
    fn a_restart_counts_from_zero() {
        let s = |t, v| Sample {
            t,
            m: Metrics {
                retries: v,
                ..Metrics::default()
            },
        };
        let samples = [s(0.0, 5.0), s(1.0, 8.0), s(2.0, 2.0), s(3.0, 4.0)];
        assert_eq!(rise(&samples, 0.0, 10.0, |m| m.retries), 3.0 + 2.0 + 2.0);
        assert_eq!(rise(&samples, 1.5, 10.0, |m| m.retries), 2.0 + 2.0);
        assert_eq!(rise(&samples, 0.5, 1.5, |m| m.retries), 3.0);
    }
}
