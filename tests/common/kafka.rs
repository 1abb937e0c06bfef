//! Kafka from the test's side: the broker a test runs against
//! ([`KafkaBroker`]: librdkafka's mock cluster or a tansu process, one test
//! body for both through [`on_both_brokers!`]), producing a load with
//! `acks=all`, the configuration file child daemons need, and the group's
//! committed positions against the log end (librdkafka's blocking calls,
//! run on the blocking pool).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

use super::daemon::free_port;
use super::env::Env;

/// Which Kafka broker a test runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// librdkafka's in-process mock cluster: the same library on both ends
    /// of the wire, fast joins, silent retention limits.
    Mock,
    /// tansu 0.6.0, an independently written Kafka broker (memory storage),
    /// as a child process of the test (installed by `scripts/setup`).
    Tansu,
}

impl Backend {
    /// `mock` or `tansu`, as in the test names.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Mock => "mock",
            Backend::Tansu => "tansu",
        }
    }
}

/// Generates `NAME::mock` and `NAME::tansu` tests running one body,
/// `async fn NAME(backend: Backend)`, on each broker.
#[macro_export]
macro_rules! on_both_brokers {
    ($(#[$meta:meta])* async fn $name:ident($backend:ident: $ty:ty) $body:block) => {
        $(#[$meta])*
        async fn $name($backend: $ty) $body

        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mock() {
                super::$name($crate::common::kafka::Backend::Mock).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn tansu() {
                super::$name($crate::common::kafka::Backend::Tansu).await
            }
        }
    };
}

/// A Kafka broker for one test, gone when it is dropped (the mock cluster
/// destroyed, the tansu process killed: its memory storage goes with it).
pub struct KafkaBroker {
    pub backend: Backend,
    bootstrap: String,
    mock: Option<MockCluster<'static, DefaultProducerContext>>,
    tansu: Option<Tansu>,
    /// Per (topic, partition): one past the highest offset the broker
    /// acknowledged to [`KafkaBroker::produce`].
    acked_ends: Mutex<HashMap<(String, i32), i64>>,
}

impl KafkaBroker {
    pub async fn start(backend: Backend) -> Self {
        match backend {
            Backend::Mock => {
                let mock = MockCluster::new(1).expect("mock cluster");
                Self {
                    backend,
                    bootstrap: mock.bootstrap_servers(),
                    mock: Some(mock),
                    tansu: None,
                    acked_ends: Mutex::default(),
                }
            }
            Backend::Tansu => {
                let port = free_port();
                let tansu = Tansu::start(port, port).await;
                Self {
                    backend,
                    bootstrap: format!("127.0.0.1:{port}"),
                    mock: None,
                    tansu: Some(tansu),
                    acked_ends: Mutex::default(),
                }
            }
        }
    }

    /// tansu listening in plaintext on `port` while advertising
    /// `advertised` to clients: a TLS terminator on `advertised` then sees
    /// every connection a client opens (the brokers' addresses come from
    /// metadata, not from the bootstrap list).
    pub async fn tansu_behind(port: u16, advertised: u16) -> Self {
        Self {
            backend: Backend::Tansu,
            bootstrap: format!("127.0.0.1:{advertised}"),
            mock: None,
            tansu: Some(Tansu::start(port, advertised).await),
            acked_ends: Mutex::default(),
        }
    }

    /// tansu requiring SASL authentication (`--authentication`) from
    /// every client. With memory storage it holds no user, and none can be
    /// added (`tansu user create` connects unauthenticated and is refused
    /// `NotAuthenticated`): every login is refused.
    pub async fn tansu_authenticating() -> Self {
        let port = free_port();
        Self {
            backend: Backend::Tansu,
            bootstrap: format!("127.0.0.1:{port}"),
            mock: None,
            tansu: Some(Tansu::start_with(port, port, &["--authentication"]).await),
            acked_ends: Mutex::default(),
        }
    }

    pub fn bootstrap_servers(&self) -> String {
        self.bootstrap.clone()
    }

    /// Takes the broker away (`false`) or gives it back (`true`), its log
    /// kept. The mock cluster's broker drops every connection and refuses
    /// new ones; tansu is frozen with SIGSTOP (its memory log would not
    /// survive a kill), so connections stay open and nothing is answered.
    pub fn set_reachable(&self, up: bool) {
        if let Some(mock) = &self.mock {
            let r = if up {
                mock.broker_up(1)
            } else {
                mock.broker_down(1)
            };
            r.expect("mock broker up/down");
        }
        if let Some(t) = &self.tansu {
            use nix::sys::signal::{kill, Signal};
            let pid = nix::unistd::Pid::from_raw(i32::try_from(t.child.id()).expect("pid"));
            kill(pid, if up { Signal::SIGCONT } else { Signal::SIGSTOP }).expect("signal tansu");
        }
    }

    /// The broker's own log (tansu only), for failure messages.
    pub fn log_text(&self) -> String {
        self.tansu
            .as_ref()
            .map(|t| std::fs::read_to_string(&t.log).unwrap_or_default())
            .unwrap_or_default()
    }

    /// Produces `(key, body)` messages with `acks=all` (see [`kafka_produce`])
    /// and remembers where each partition's log ends.
    pub async fn produce(
        &self,
        topic: &str,
        messages: impl IntoIterator<Item = (String, Vec<u8>)>,
    ) {
        let ends = kafka_produce(&self.bootstrap, topic, messages).await;
        self.remember(topic, ends);
    }

    /// Writes `(key, value)` records with the independent client
    /// ([`independent_write`]) and remembers where each partition ends.
    pub async fn independent_write(
        &self,
        topic: &str,
        codec: &str,
        records: impl IntoIterator<Item = (String, String)>,
    ) {
        let ends = independent_write(&self.bootstrap, &[], topic, codec, records).await;
        self.remember(topic, ends);
    }

    fn remember(&self, topic: &str, ends: HashMap<i32, i64>) {
        let mut known = self.acked_ends.lock().expect("acked ends");
        for (partition, end) in ends {
            let e = known.entry((topic.to_string(), partition)).or_insert(0);
            *e = (*e).max(end);
        }
    }

    /// (committed offset, log end) of partitions `0..partitions` of a topic
    /// for a group; -1 where nothing is committed. Empty when the broker
    /// cannot be asked.
    ///
    /// The log end is the broker's high watermark on the mock cluster. On
    /// tansu 0.6.0 it is what the broker acknowledged to
    /// [`KafkaBroker::produce`]: tansu answers ListOffsets with one past the
    /// *first* offset of a partition's last record batch, not one past its
    /// last record (produce 10 records in one batch to an empty partition:
    /// tansu says the log ends at 1), so its watermark is short by up to a
    /// batch. The watermark is checked to be within that error.
    pub async fn committed_and_end(
        &self,
        group: &str,
        topic: &str,
        partitions: i32,
    ) -> Vec<(i64, i64)> {
        let offsets = kafka_committed_and_end(&self.bootstrap, group, topic, partitions).await;
        if self.backend == Backend::Mock || offsets.len() != partitions as usize {
            return offsets;
        }
        let known = self.acked_ends.lock().expect("acked ends");
        offsets
            .into_iter()
            .enumerate()
            .map(|(p, (committed, watermark))| {
                let acked = known
                    .get(&(topic.to_string(), p as i32))
                    .copied()
                    .unwrap_or(0);
                assert!(
                    watermark <= acked,
                    "tansu's watermark {watermark} of {topic}/{p} is past the acknowledged end {acked}"
                );
                (committed, acked)
            })
            .collect()
    }

    /// Creates a topic and waits until its metadata shows every partition.
    pub async fn create_topic(&self, topic: &str, partitions: i32) {
        if let Some(mock) = &self.mock {
            mock.create_topic(topic, partitions, 1).expect("topic");
            return;
        }
        let admin: AdminClient<DefaultClientContext> = rdkafka::config::ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .create()
            .expect("admin client");
        let results = admin
            .create_topics(
                &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await
            .unwrap_or_else(|e| panic!("create topic {topic}: {e}\n{}", self.log_text()));
        for r in results {
            r.unwrap_or_else(|(t, e)| panic!("create topic {t}: {e}\n{}", self.log_text()));
        }
        let (bootstrap, topic) = (self.bootstrap.clone(), topic.to_string());
        tokio::task::spawn_blocking(move || {
            use rdkafka::consumer::{BaseConsumer, Consumer};
            let probe: BaseConsumer = rdkafka::config::ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .set("allow.auto.create.topics", "false")
                .create()
                .expect("metadata client");
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let seen = probe
                    .fetch_metadata(Some(&topic), Duration::from_secs(5))
                    .ok()
                    .and_then(|m| {
                        m.topics()
                            .first()
                            .filter(|t| t.error().is_none())
                            .map(|t| t.partitions().len())
                    });
                if seen == Some(partitions as usize) {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "topic {topic} not in the metadata with {partitions} partitions (saw {seen:?})"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        })
        .await
        .expect("metadata probe panicked");
    }
}

/// Where `scripts/setup` put the tansu binary (`CONVEYOR_TANSU` overrides).
pub fn tansu_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("CONVEYOR_TANSU") {
        return PathBuf::from(path);
    }
    tools_dir().join("bin/tansu")
}

/// `scripts/setup`'s tool directory: `$CONVEYOR_TOOLS`, else
/// `${XDG_CACHE_HOME:-$HOME/.cache}/conveyor/tools`.
pub fn tools_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CONVEYOR_TOOLS") {
        return PathBuf::from(dir);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache")
        });
    cache.join("conveyor/tools")
}

/// The Python of `scripts/setup`'s virtualenv, which has confluent-kafka.
fn independent_python() -> PathBuf {
    let python = tools_dir().join("venv/bin/python");
    assert!(
        python.exists(),
        "the confluent-kafka virtualenv is not at {} (run scripts/setup, which makes it)",
        python.display()
    );
    python
}

fn independent_client() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/support/kafka_client.py")
}

/// Writes `(key, value)` records to `topic` with confluent-kafka, a Kafka
/// client that shares no code with conveyor's build of librdkafka,
/// compressing with `codec` (`none`, `gzip`, `snappy`, `lz4`, `zstd`).
/// `properties` are extra librdkafka settings (TLS). Returns, per partition,
/// one past the highest offset acknowledged.
pub async fn independent_write(
    brokers: &str,
    properties: &[(&str, &str)],
    topic: &str,
    codec: &str,
    records: impl IntoIterator<Item = (String, String)>,
) -> HashMap<i32, i64> {
    let mut input = String::new();
    for (key, value) in records {
        input.push_str(&serde_json::json!({ "key": key, "value": value }).to_string());
        input.push('\n');
    }
    let out = run_independent(&["write", brokers, topic, codec], properties, input).await;
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("the writer's summary");
    v["ends"]
        .as_object()
        .expect("ends")
        .iter()
        .map(|(p, e)| (p.parse().expect("partition"), e.as_i64().expect("end")))
        .collect()
}

/// One record read by the independent client.
#[derive(Debug, serde::Deserialize)]
pub struct IndependentRecord {
    pub key: String,
    pub value: String,
    pub partition: i32,
    pub offset: i64,
    pub headers: HashMap<String, String>,
}

/// Reads `count` records of `topic` from the beginning with confluent-kafka.
pub async fn independent_read(
    brokers: &str,
    properties: &[(&str, &str)],
    topic: &str,
    count: usize,
    timeout: Duration,
) -> Vec<IndependentRecord> {
    let out = run_independent(
        &[
            "read",
            brokers,
            topic,
            &count.to_string(),
            &timeout.as_secs().to_string(),
        ],
        properties,
        String::new(),
    )
    .await;
    out.lines()
        .map(|l| serde_json::from_str(l).expect("a record line"))
        .collect()
}

async fn run_independent(args: &[&str], properties: &[(&str, &str)], input: String) -> String {
    use tokio::io::AsyncWriteExt;
    let props: serde_json::Map<String, serde_json::Value> = properties
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
        .collect();
    let mut child = tokio::process::Command::new(independent_python())
        .arg(independent_client())
        .args(args)
        .env("KAFKA_PROPS", serde_json::Value::Object(props).to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the independent Kafka client");
    let mut stdin = child.stdin.take().expect("stdin");
    let feed = async move {
        stdin
            .write_all(input.as_bytes())
            .await
            .expect("feed the client");
        drop(stdin);
    };
    let (_, out) = tokio::join!(feed, child.wait_with_output());
    let out = out.expect("the independent Kafka client ran");
    assert!(
        out.status.success(),
        "independent Kafka client {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// A tansu broker process, killed on drop.
struct Tansu {
    child: std::process::Child,
    log: PathBuf,
}

impl Tansu {
    async fn start(port: u16, advertised: u16) -> Self {
        Self::start_with(port, advertised, &[]).await
    }

    async fn start_with(port: u16, advertised: u16, extra: &[&str]) -> Self {
        let bin = tansu_binary();
        assert!(
            bin.exists(),
            "tansu is not installed at {} (run scripts/setup, which installs it)",
            bin.display()
        );
        let log = std::env::temp_dir().join(format!("tansu-{port}.log"));
        let file = std::fs::File::create(&log).expect("tansu log file");
        let child = std::process::Command::new(&bin)
            .args([
                "broker",
                "--listener-url",
                &format!("tcp://127.0.0.1:{port}"),
                "--advertised-listener-url",
                &format!("tcp://127.0.0.1:{advertised}"),
                "--storage-engine",
                "memory://tansu/",
            ])
            .args(extra)
            .env_remove("RUST_LOG")
            .stdin(std::process::Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
        let mut t = Self { child, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if let Ok(Some(status)) = t.child.try_wait() {
                panic!(
                    "tansu exited ({status}) before listening on {port}: {}",
                    std::fs::read_to_string(&t.log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "tansu not listening on {port} after 20 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        t
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Produces `(key, body)` messages to a Kafka topic with `acks=all`,
/// keeping up to 500 unconfirmed. Returns, per partition, one past the
/// highest offset the broker acknowledged.
pub async fn kafka_produce(
    brokers: &str,
    topic: &str,
    messages: impl IntoIterator<Item = (String, Vec<u8>)>,
) -> HashMap<i32, i64> {
    kafka_produce_with(brokers, topic, &[], messages).await
}

/// As [`kafka_produce`], with extra producer properties (a compression
/// codec, TLS settings).
pub async fn kafka_produce_with(
    brokers: &str,
    topic: &str,
    properties: &[(&str, &str)],
    messages: impl IntoIterator<Item = (String, Vec<u8>)>,
) -> HashMap<i32, i64> {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let mut config = rdkafka::config::ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .set("linger.ms", "5");
    for (k, v) in properties {
        config.set(*k, *v);
    }
    let producer: FutureProducer = config.create().expect("producer");
    let mut ends = HashMap::new();
    let mut pending = Vec::new();
    let mut settle = |done: Vec<(i32, i64)>| {
        for (partition, offset) in done {
            let end = ends.entry(partition).or_insert(0);
            *end = (*end).max(offset + 1);
        }
    };
    for (key, body) in messages {
        let p = producer.clone();
        let topic = topic.to_string();
        pending.push(async move {
            p.send(
                FutureRecord::to(&topic).key(&key).payload(&body),
                Duration::from_secs(30),
            )
            .await
            .map(|d| (d.partition, d.offset))
            .map_err(|(e, _)| e)
        });
        if pending.len() >= 500 {
            settle(
                futures::future::try_join_all(std::mem::take(&mut pending))
                    .await
                    .expect("produce"),
            );
        }
    }
    settle(
        futures::future::try_join_all(pending)
            .await
            .expect("produce"),
    );
    ends
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
pub async fn kafka_committed_and_end(
    brokers: &str,
    group: &str,
    topic: &str,
    partitions: i32,
) -> Vec<(i64, i64)> {
    let (brokers, group, topic) = (brokers.to_string(), group.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || committed_and_end(&brokers, &group, &topic, partitions))
        .await
        .expect("reading committed offsets panicked")
}

fn committed_and_end(brokers: &str, group: &str, topic: &str, partitions: i32) -> Vec<(i64, i64)> {
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
