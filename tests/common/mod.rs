//! Shared helpers for the whole-daemon tests: a fresh PostgreSQL database
//! and RabbitMQ queue per test, the simulator on a loopback port, the daemon
//! in-process or as a child process, and polling with deadlines.
//!
//! Services are never skipped: a missing one fails the test and says what
//! to start.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use conveyor::config::{Config, RabbitConfig};
use conveyor::sim::{self, Knobs, SimHandle};
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

pub const PG_ADMIN: &str = "postgres://postgres@127.0.0.1:5432/postgres";
pub const AMQP: &str = "amqp://127.0.0.1:5672/%2f";

fn pg_admin_url() -> String {
    std::env::var("CONVEYOR_TEST_PG").unwrap_or_else(|_| PG_ADMIN.to_string())
}

/// One test's private world.
pub struct Env {
    pub name: String,
    pub db_url: String,
    pub queue: String,
    pub pool: PgPool,
    pub sim: SimHandle,
}

impl Env {
    pub async fn new(tag: &str, knobs: Knobs) -> Self {
        let suffix = uuid::Uuid::new_v4().simple().to_string()[..10].to_string();
        let name = format!("conveyor_{tag}_{suffix}");
        let admin_url = pg_admin_url();
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .connect(&admin_url)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "PostgreSQL is not reachable at {admin_url} ({e}). Start it: \
                     pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
                )
            });
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await
            .expect("create the test database");
        admin.close().await;
        let db_url = admin_url
            .rsplit_once('/')
            .map(|(base, _)| format!("{base}/{name}"))
            .expect("db url");
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect(&db_url)
            .await
            .expect("connect to the test database");
        // Fail early and clearly if RabbitMQ is down.
        Connection::connect(AMQP, ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "RabbitMQ is not reachable at {AMQP} ({e}). Start it: \
                     rabbitmq-server -detached && rabbitmqctl await_startup"
                )
            })
            .close(200, "probe".into())
            .await
            .ok();
        let sim = sim::start("127.0.0.1:0".parse().expect("addr"), knobs)
            .await
            .expect("start the simulator");
        Self {
            queue: name.replace('_', "."),
            name,
            db_url,
            pool,
            sim,
        }
    }

    /// The daemon's configuration for this test.
    pub fn config(&self) -> Config {
        let mut c = Config::default();
        c.rabbitmq.queue = self.queue.clone();
        c.database.url = self.db_url.clone();
        c.rule_engine.url = self.sim.url.clone();
        c.payment.url = self.sim.url.clone();
        c.http.listen = "127.0.0.1:0".parse().expect("addr");
        c.shutdown.drain_timeout = Duration::from_secs(10);
        c
    }

    /// The same configuration as environment variables, for a child process.
    pub fn env_vars(&self, http_port: u16) -> HashMap<String, String> {
        [
            ("CONVEYOR__RABBITMQ__QUEUE", self.queue.clone()),
            ("CONVEYOR__DATABASE__URL", self.db_url.clone()),
            ("CONVEYOR__RULE_ENGINE__URL", self.sim.url.clone()),
            ("CONVEYOR__PAYMENT__URL", self.sim.url.clone()),
            ("CONVEYOR__HTTP__LISTEN", format!("127.0.0.1:{http_port}")),
            ("CONVEYOR__SHUTDOWN__DRAIN_TIMEOUT", "10s".to_string()),
            ("CONVEYOR__LOG__FORMAT", "json".to_string()),
            ("CONVEYOR__LOG__LEVEL", "warn,conveyor=info".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    pub fn rabbit(&self) -> RabbitConfig {
        RabbitConfig {
            queue: self.queue.clone(),
            ..RabbitConfig::default()
        }
    }

    pub async fn publish(&self, bodies: impl IntoIterator<Item = Vec<u8>>) -> u64 {
        conveyor::produce::publish_rabbit(&self.rabbit(), bodies, 500, None, |_| {})
            .await
            .expect("publish")
    }

    pub async fn rows(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM orders")
            .fetch_one(&self.pool)
            .await
            .unwrap_or(0)
    }

    pub async fn rows_by_status(&self) -> HashMap<String, i64> {
        sqlx::query_as::<_, (String, i64)>("SELECT status, count(*) FROM orders GROUP BY status")
            .fetch_all(&self.pool)
            .await
            .expect("count rows")
            .into_iter()
            .collect()
    }

    /// Messages ready in a queue (passive declare).
    pub async fn ready(&self, queue: &str) -> u32 {
        let conn = Connection::connect(AMQP, ConnectionProperties::default())
            .await
            .expect("connect");
        let ch = conn.create_channel().await.expect("channel");
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("passive declare");
        conn.close(200, "done".into()).await.ok();
        q.message_count()
    }

    /// Takes every message from the dead-letter queue: (headers, body).
    pub async fn drain_dlq(&self) -> Vec<(HashMap<String, String>, Vec<u8>)> {
        let conn = Connection::connect(AMQP, ConnectionProperties::default())
            .await
            .expect("connect");
        let ch = conn.create_channel().await.expect("channel");
        let mut out = Vec::new();
        while let Some(msg) = ch
            .basic_get(
                format!("{}.dlq", self.queue).as_str().into(),
                BasicGetOptions::default(),
            )
            .await
            .expect("basic.get")
        {
            let mut headers = HashMap::new();
            if let Some(h) = msg.delivery.properties.headers() {
                for (k, v) in h.inner() {
                    if let AMQPValue::LongString(s) = v {
                        headers.insert(k.to_string(), s.to_string());
                    }
                }
            }
            out.push((headers, msg.delivery.data.clone()));
            msg.delivery
                .acker
                .ack(BasicAckOptions::default())
                .await
                .expect("ack");
        }
        conn.close(200, "done".into()).await.ok();
        out
    }

    /// Checks the ledger against the stored rows: every charged row has
    /// exactly one ledger charge with the same id, and no order was charged
    /// twice. Returns the number of ledger charges.
    pub async fn check_ledger(&self) -> usize {
        let ledger = self.sim.ledger();
        assert_eq!(
            ledger.double_charged_orders, 0,
            "an order was charged twice"
        );
        let by_order: HashMap<&str, &conveyor::sim::LedgerEntry> = ledger
            .charges
            .iter()
            .map(|e| (e.order_id.as_str(), e))
            .collect();
        assert_eq!(
            by_order.len(),
            ledger.charges.len(),
            "duplicate ledger entries"
        );
        let rows: Vec<(String, String, Option<String>)> =
            sqlx::query_as("SELECT order_id, status, charge_id FROM orders")
                .fetch_all(&self.pool)
                .await
                .expect("rows");
        let mut charged = 0usize;
        for (order_id, status, charge_id) in &rows {
            match status.as_str() {
                "accepted" | "declined" => {
                    let entry = by_order.get(order_id.as_str()).unwrap_or_else(|| {
                        panic!("{order_id} stored as {status} but never charged")
                    });
                    assert_eq!(Some(&entry.charge_id), charge_id.as_ref(), "{order_id}");
                    let want = if status == "accepted" {
                        "succeeded"
                    } else {
                        "declined"
                    };
                    assert_eq!(entry.status, want, "{order_id}");
                    charged += 1;
                }
                _ => assert!(charge_id.is_none(), "{order_id} rejected but charged"),
            }
        }
        assert_eq!(
            charged,
            ledger.charges.len(),
            "ledger charges without a stored order"
        );
        ledger.charges.len()
    }

    pub async fn cleanup(self) {
        if let Ok(conn) = Connection::connect(AMQP, ConnectionProperties::default()).await {
            if let Ok(ch) = conn.create_channel().await {
                for q in [self.queue.clone(), format!("{}.dlq", self.queue)] {
                    ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                        .await
                        .ok();
                }
            }
            conn.close(200, "done".into()).await.ok();
        }
        self.pool.close().await;
        self.sim.stop().await;
        if let Ok(admin) = PgPoolOptions::new()
            .max_connections(1)
            .connect(&pg_admin_url())
            .await
        {
            sqlx::query(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .execute(&admin)
            .await
            .ok();
        }
    }
}

/// Polls `cond` until it holds or `limit` passes; panics with `what`.
pub async fn wait_for<F, Fut>(what: &str, limit: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if cond().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One metric's value from a `/metrics` scrape (sum over label sets).
pub async fn metric(addr: SocketAddr, name: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        let value: f64 = rest.rsplit(' ').next()?.parse().ok()?;
        *found.get_or_insert(0.0) += value;
    }
    found
}

/// A port free right now on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_conveyor"))
}

/// The daemon as a child process, with its logs in a file.
pub struct Daemon {
    pub child: Child,
    pub http: SocketAddr,
    pub log: PathBuf,
}

impl Daemon {
    pub async fn start(env: &Env, extra: &[(&str, &str)]) -> Self {
        Self::start_with(env, extra, false).await
    }

    /// As `start`; with `as_watchdog_pid`, through `sh -c 'exec …'` so that
    /// `WATCHDOG_PID` can name the daemon's own pid, as systemd does.
    pub async fn start_with(env: &Env, extra: &[(&str, &str)], as_watchdog_pid: bool) -> Self {
        let port = free_port();
        let log = std::env::temp_dir().join(format!("{}-{port}.log", env.name));
        let file = std::fs::File::create(&log).expect("log file");
        let mut cmd = if as_watchdog_pid {
            let mut c = Command::new("sh");
            c.args(["-c", "WATCHDOG_PID=$$ exec \"$0\" run"])
                .arg(binary());
            c
        } else {
            let mut c = Command::new(binary());
            c.arg("run");
            c
        };
        cmd.envs(env.env_vars(port))
            .envs(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file);
        let child = cmd.spawn().expect("spawn conveyor");
        let http: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let d = Self { child, http, log };
        let started = Instant::now();
        loop {
            if let Ok(r) = reqwest::get(format!("http://{http}/readyz")).await {
                if r.status().is_success() {
                    break;
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "daemon not ready after 30 s; log:\n{}",
                d.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        d
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill({}, {sig})", self.pid());
    }

    /// Waits for exit; returns the exit code and how long it took.
    pub async fn wait(&mut self, limit: Duration) -> (Option<i32>, Duration) {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return (status.code(), started.elapsed());
            }
            if started.elapsed() > limit {
                self.child.kill().ok();
                panic!(
                    "daemon did not exit within {limit:?}; log:\n{}",
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Resident set size now and at its peak, in KiB.
    pub fn rss_kib(&self) -> (u64, u64) {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.child.kill().ok();
            self.child.wait().ok();
        }
    }
}

/// Unacknowledged messages of a queue, as RabbitMQ itself reports them.
pub fn unacked(queue: &str) -> u64 {
    let out = Command::new("rabbitmqctl")
        .args([
            "list_queues",
            "-q",
            "--no-table-headers",
            "name",
            "messages_unacknowledged",
        ])
        .output()
        .expect("run rabbitmqctl (RabbitMQ's CLI must be installed)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            (parts.next()? == queue).then(|| parts.next()?.parse().ok())?
        })
        .next()
        .unwrap_or(0)
}

// ---- Fault injection (tests/chaos.rs) ----------------------------------

/// RabbitMQ's application stopped (`rabbitmqctl stop_app`; the Erlang node
/// stays up, so it comes back in seconds) until [`RabbitOutage::end`] or
/// drop, whatever happens in between: every other test on this machine
/// needs the broker back.
pub struct RabbitOutage {
    up: bool,
}

fn rabbitmqctl(args: &[&str]) -> Result<(), String> {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .map_err(|e| format!("rabbitmqctl {args:?}: {e} (RabbitMQ's CLI must be installed)"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "rabbitmqctl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

impl RabbitOutage {
    pub fn begin() -> Self {
        let mut outage = Self { up: false };
        if let Err(e) = rabbitmqctl(&["-q", "stop_app"]) {
            outage.end();
            panic!("{e}");
        }
        outage
    }

    /// Starts the application again and waits until it accepts connections.
    pub fn end(&mut self) {
        if self.up {
            return;
        }
        self.up = true;
        let started = rabbitmqctl(&["-q", "start_app"])
            .and_then(|()| rabbitmqctl(&["-q", "await_startup", "--timeout", "120"]));
        if let Err(e) = started {
            // Not a panic: this also runs from drop, maybe while unwinding.
            eprintln!(
                "could not bring RabbitMQ back ({e}); start it: \
                 rabbitmqctl start_app || rabbitmq-server -detached"
            );
        }
    }
}

impl Drop for RabbitOutage {
    fn drop(&mut self) {
        self.end();
    }
}

fn psql_admin(sql: &str) -> Result<String, String> {
    let out = Command::new("psql")
        .args([
            pg_admin_url().as_str(),
            "-v",
            "ON_ERROR_STOP=1",
            "-tAc",
            sql,
        ])
        .output()
        .map_err(|e| format!("psql: {e} (PostgreSQL's client must be installed)"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "psql -c {sql:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// One test database made unavailable: new connections refused
/// (`ALLOW_CONNECTIONS false`) and the open ones terminated. Scoped to that
/// database, so tests running beside it are not disturbed. Connections are
/// allowed again on [`PgOutage::end`] or drop.
pub struct PgOutage {
    db: String,
    active: bool,
}

impl PgOutage {
    /// Returns the outage and how many backends it terminated.
    pub fn begin(db: &str) -> (Self, u64) {
        let mut outage = Self {
            db: db.to_string(),
            active: true,
        };
        let killed =
            psql_admin(&format!("ALTER DATABASE {db} ALLOW_CONNECTIONS false")).and_then(|_| {
                psql_admin(&format!(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                     WHERE datname = '{db}' AND pid <> pg_backend_pid()"
                ))
            });
        match killed {
            Ok(n) => (outage, n.parse().unwrap_or(0)),
            Err(e) => {
                outage.end();
                panic!("{e}");
            }
        }
    }

    pub fn end(&mut self) {
        if !self.active {
            return;
        }
        self.active = false;
        if let Err(e) = psql_admin(&format!(
            "ALTER DATABASE {} ALLOW_CONNECTIONS true",
            self.db
        )) {
            eprintln!("could not end the outage of {}: {e}", self.db);
        }
    }
}

impl Drop for PgOutage {
    fn drop(&mut self) {
        self.end();
    }
}

/// `/readyz` of a daemon: Some(true) 200, Some(false) 503, None unreachable.
pub async fn ready(addr: SocketAddr) -> Option<bool> {
    let r = reqwest::get(format!("http://{addr}/readyz")).await.ok()?;
    Some(r.status().is_success())
}

/// Makes RabbitMQ close the connection(s) consuming `queue`, as an operator
/// or a broker policy would: only that daemon is affected, so this is safe
/// beside other tests. Returns how many connections were closed.
pub fn close_consumer_connections(queue: &str) -> usize {
    let list = |args: &[&str]| -> Vec<Vec<String>> {
        let out = Command::new("rabbitmqctl")
            .args(args)
            .output()
            .expect("run rabbitmqctl (RabbitMQ's CLI must be installed)");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.split_whitespace().map(str::to_string).collect())
            .collect()
    };
    let channels: Vec<String> = list(&[
        "list_consumers",
        "-q",
        "--no-table-headers",
        "queue_name",
        "channel_pid",
    ])
    .into_iter()
    .filter(|row| row.first().map(String::as_str) == Some(queue))
    .filter_map(|row| row.get(1).cloned())
    .collect();
    let mut connections: Vec<String> = list(&[
        "list_channels",
        "-q",
        "--no-table-headers",
        "pid",
        "connection",
    ])
    .into_iter()
    .filter(|row| row.first().is_some_and(|pid| channels.contains(pid)))
    .filter_map(|row| row.get(1).cloned())
    .collect();
    connections.sort();
    connections.dedup();
    for c in &connections {
        if let Err(e) = rabbitmqctl(&["-q", "close_connection", c, "chaos: closed by the test"]) {
            panic!("{e}");
        }
    }
    connections.len()
}

/// Produces `(key, body)` messages to a Kafka topic with `acks=all`,
/// keeping up to 500 unconfirmed.
pub async fn kafka_produce(
    brokers: &str,
    topic: &str,
    messages: impl IntoIterator<Item = (String, Vec<u8>)>,
) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .set("linger.ms", "5")
        .create()
        .expect("producer");
    let mut pending = Vec::new();
    for (key, body) in messages {
        let p = producer.clone();
        let topic = topic.to_string();
        pending.push(async move {
            p.send(
                FutureRecord::to(&topic).key(&key).payload(&body),
                Duration::from_secs(30),
            )
            .await
            .map(|_| ())
            .map_err(|(e, _)| e)
        });
        if pending.len() >= 500 {
            futures::future::try_join_all(std::mem::take(&mut pending))
                .await
                .expect("produce");
        }
    }
    futures::future::try_join_all(pending)
        .await
        .expect("produce");
}

/// A configuration file for child daemons on the mock cluster: a short
/// session timeout, since the mock holds every rebalance for about
/// `session.timeout.ms` and a killed member keeps its partitions that long.
/// Returns its path, for `CONVEYOR_CONFIG`.
pub fn kafka_daemon_config_file(env: &Env) -> String {
    let file = std::env::temp_dir().join(format!("{}-kafka.toml", env.name));
    std::fs::write(
        &file,
        "[kafka.properties]\n\"session.timeout.ms\" = \"3000\"\n\"heartbeat.interval.ms\" = \"500\"\n",
    )
    .expect("write the daemon's configuration file");
    file.display().to_string()
}

/// (committed offset, log end) of partitions `0..partitions` of a topic for
/// a group, read from the broker; -1 where nothing is committed. Empty when
/// the broker cannot be asked.
pub fn kafka_committed_and_end(
    brokers: &str,
    group: &str,
    topic: &str,
    partitions: i32,
) -> Vec<(i64, i64)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let Ok(consumer) = rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create::<BaseConsumer>()
    else {
        return Vec::new();
    };
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let t = Duration::from_secs(5);
    let Ok(committed) = consumer.committed_offsets(tpl, t) else {
        return Vec::new();
    };
    committed
        .elements()
        .iter()
        .filter_map(|e| {
            let (_, high) = consumer.fetch_watermarks(topic, e.partition(), t).ok()?;
            let c = match e.offset() {
                rdkafka::Offset::Offset(c) => c,
                _ => -1,
            };
            Some((c, high))
        })
        .collect()
}

/// The daemon running in-process (`conveyor::run_with`), stopped through
/// its shutdown future as SIGTERM would.
pub struct InProcess {
    pub addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<conveyor::Report>>,
}

impl InProcess {
    /// Starts it and waits until it is ready.
    pub async fn start(config: Config) -> Self {
        // `RUST_LOG=conveyor=info cargo nextest run --no-capture …` shows
        // what in-process daemons log; silent otherwise.
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_test_writer()
                .try_init();
        }
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
        let hooks = conveyor::Hooks {
            on_ready: Some(Box::new(move |addr| {
                let _ = addr_tx.send(addr);
            })),
            metrics: None,
        };
        let task = tokio::spawn(conveyor::run_with(
            config,
            async move {
                let _ = stop_rx.await;
            },
            hooks,
        ));
        let addr = addr_rx.await.expect("daemon became ready");
        Self { addr, stop, task }
    }

    /// Drains it and returns its report.
    pub async fn stop(self) -> conveyor::Report {
        self.stop.send(()).expect("daemon still running");
        self.task.await.expect("join").expect("run succeeded")
    }
}
