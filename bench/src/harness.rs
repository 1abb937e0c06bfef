//! The harness: one benchmark's private world on the local services (its
//! queue, its database, a log directory) and every kind of run in it — the
//! simulator and conveyor as child processes, the floor and the naive
//! consumer in-process, consume + ack and the batched insert alone, the
//! backlog runs — each returning what the database says about it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use conveyor::config::RabbitConfig;
use conveyor::tools::produce::{publish_rabbit, Mix, OrderGen};
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Connection, ConnectionProperties};
use sqlx::postgres::{PgPool, PgPoolOptions};

use crate::procs::{free_port, Proc};
use crate::report::Outcome;
use crate::{floor, say, Args, AMQP};

pub(crate) struct Bench {
    pub(crate) args: Args,
    pub(crate) bin: PathBuf,
    pub(crate) pool: PgPool,
    pub(crate) db_url: String,
    pub(crate) rabbit: RabbitConfig,
    pub(crate) logs: tempfile::TempDir,
    pub(crate) publishes: u64,
}

impl Bench {
    pub(crate) async fn setup(args: Args) -> anyhow::Result<Self> {
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

    pub(crate) async fn amqp(&self) -> anyhow::Result<(Connection, lapin::Channel)> {
        let conn = Connection::connect(AMQP, ConnectionProperties::default()).await?;
        let ch = conn.create_channel().await?;
        Ok((conn, ch))
    }

    pub(crate) fn queue(&self) -> ShortString {
        ShortString::from(self.rabbit.queue.as_str())
    }

    /// Empties the queue (declaring it and its dead-letter queue).
    pub(crate) async fn purge(&self) -> anyhow::Result<()> {
        let (conn, ch) = self.amqp().await?;
        conveyor::source::rabbitmq::declare_topology(&ch, &self.rabbit).await?;
        ch.queue_purge(self.queue(), QueuePurgeOptions::default())
            .await?;
        conn.close(200, "done".into()).await.ok();
        Ok(())
    }

    /// Deletes the queues and the database the runs used.
    pub(crate) async fn cleanup(self) -> anyhow::Result<()> {
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
    pub(crate) async fn publish(&mut self, n: u64, progress: bool) -> anyhow::Result<()> {
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

    pub(crate) async fn rows(&self) -> anyhow::Result<i64> {
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

    pub(crate) async fn simulator(&self, latency_ms: u64) -> anyhow::Result<(Proc, String)> {
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
    pub(crate) async fn daemon(
        &self,
        sim_url: &str,
        extra: &[(&str, String)],
    ) -> anyhow::Result<(Proc, u16)> {
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
    pub(crate) async fn conveyor(
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

    pub(crate) async fn floor(&mut self, sim_url: &str, n: u64) -> anyhow::Result<Outcome> {
        self.reset_db().await?;
        self.publish(n, false).await?;
        floor::pipeline(AMQP, &self.rabbit.queue, 512, sim_url, self.pool.clone(), n).await?;
        self.outcome().await
    }

    pub(crate) async fn naive(&mut self, sim_url: &str, n: u64) -> anyhow::Result<Outcome> {
        self.reset_db().await?;
        self.publish(n, false).await?;
        floor::naive(AMQP, &self.rabbit.queue, sim_url, &self.pool, n).await?;
        self.outcome().await
    }

    pub(crate) async fn consume_ack(&mut self, n: u64) -> anyhow::Result<f64> {
        self.publish(n, false).await?;
        let secs = floor::consume_ack(AMQP, &self.rabbit.queue, 512, n).await?;
        Ok(n as f64 / secs)
    }

    pub(crate) async fn insert(&mut self, n: u64) -> anyhow::Result<f64> {
        self.reset_db().await?;
        self.publishes += 1;
        let rows = floor::rows(&format!("ins{}", self.publishes), n);
        let secs = floor::insert(&self.pool, rows).await?;
        Ok(n as f64 / secs)
    }

    /// Takes `large_take` orders off the large backlog, then SIGTERM:
    /// (peak RSS KiB, drain seconds, stored).
    pub(crate) async fn backlog_run(&mut self, sim_url: &str) -> anyhow::Result<(u64, f64, u64)> {
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
