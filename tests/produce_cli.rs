//! `conveyor produce`, the real binary, against each broker: to Kafka on
//! librdkafka's mock cluster held by this process (its loopback listener is
//! reachable from the child), to RabbitMQ on 127.0.0.1:5672; then what the
//! broker holds is counted.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use conveyor::tools::produce::{Mix, OrderGen};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;

/// Runs `conveyor produce ARGS` with `env` and nothing else configured.
fn produce(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_conveyor"));
    cmd.arg("produce").args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("CONVEYOR") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied())
        .output()
        .expect("run conveyor produce")
}

fn stdout_of(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "conveyor produce failed ({})\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Messages ever appended to each partition of `topic`: the high
/// watermarks, the topic being new. Not high − low: the mock cluster trims
/// a partition's log past a few MB, moving its low watermark.
fn kafka_counts(brokers: &str, topic: &str, partitions: i32) -> Vec<i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("consumer");
    (0..partitions)
        .map(|p| {
            let (_, high) = consumer
                .fetch_watermarks(topic, p, Duration::from_secs(5))
                .expect("watermarks");
            high
        })
        .collect()
}

#[test]
fn produces_500_orders_to_kafka_across_two_partitions() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    let topic = format!("produce-{}", uuid::Uuid::new_v4().simple());
    cluster.create_topic(&topic, 2, 1).expect("topic");
    let brokers = cluster.bootstrap_servers();

    let out = produce(
        &["--to", "kafka", "--orders", "500", "--quiet"],
        &[
            ("CONVEYOR__KAFKA__BROKERS", brokers.as_str()),
            ("CONVEYOR__KAFKA__TOPICS", topic.as_str()),
        ],
    );
    let stdout = stdout_of(&out);
    assert!(
        stdout.contains(&format!("published 500 orders to Kafka topic {topic:?}")),
        "{stdout}"
    );
    // The CLI's default mix: 2 % poison, 3 % rejects, 3 % declines.
    let c = OrderGen::new(
        "any",
        Mix {
            poison_pct: 2.0,
            reject_pct: 3.0,
            decline_pct: 3.0,
        },
    )
    .intent_counts(500);
    let intents = format!(
        "accept {}  reject {}  decline {}  poison {}",
        c.accept, c.reject, c.decline, c.poison
    );
    assert!(stdout.contains(&intents), "{stdout}");

    let counts = kafka_counts(&brokers, &topic, 2);
    assert_eq!(counts.iter().sum::<i64>(), 500, "per partition: {counts:?}");
    // Keyed by order id: both partitions get a share.
    assert!(counts.iter().all(|&c| c > 0), "per partition: {counts:?}");
    drop(cluster);
}

#[test]
fn a_duration_at_a_rate_publishes_what_falls_due_in_it() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    let topic = format!("produce-{}", uuid::Uuid::new_v4().simple());
    cluster.create_topic(&topic, 1, 1).expect("topic");
    let brokers = cluster.bootstrap_servers();

    let started = Instant::now();
    let out = produce(
        &[
            "--to",
            "kafka",
            "--topic",
            &topic,
            "--duration",
            "1s",
            "--rate",
            "200",
            "--quiet",
        ],
        &[("CONVEYOR__KAFKA__BROKERS", brokers.as_str())],
    );
    let stdout = stdout_of(&out);
    let took = started.elapsed();
    assert!(stdout.contains("published 200 orders"), "{stdout}");
    // Paced, not a burst; and stopped when the time was up.
    assert!(took >= Duration::from_millis(900), "took {took:?}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert_eq!(kafka_counts(&brokers, &topic, 1), vec![200]);
    drop(cluster);
}

#[test]
fn a_missing_kafka_topic_fails_fast_and_says_so() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    let brokers = cluster.bootstrap_servers();
    // The mock cluster creates a topic on request unless told not to.
    let config = tempfile::NamedTempFile::new().expect("config file");
    std::fs::write(
        config.path(),
        format!(
            "[kafka]\nbrokers = {brokers:?}\n\n[kafka.properties]\n\"allow.auto.create.topics\" = \"false\"\n"
        ),
    )
    .expect("write the config");
    let config_path = config.path().display().to_string();
    let started = Instant::now();
    let out = produce(
        &[
            "--config",
            &config_path,
            "--to",
            "kafka",
            "--topic",
            "no-such-topic",
            "--orders",
            "10",
            "--quiet",
        ],
        &[],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("Kafka topic \"no-such-topic\" does not exist"),
        "{stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(15));
    drop(cluster);
}

/// Deletes a test queue and its dead-letter queue, on success and on panic.
struct QueueGuard(String);

impl QueueGuard {
    fn ready(&self) -> Option<u64> {
        let out = Command::new("rabbitmqctl")
            .args(["-q", "list_queues", "name", "messages_ready"])
            .output()
            .expect("run rabbitmqctl (is RabbitMQ installed?)");
        String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
            let mut cols = l.split_whitespace();
            (cols.next() == Some(self.0.as_str()))
                .then(|| cols.next().and_then(|n| n.parse().ok()))
                .flatten()
        })
    }
}

impl Drop for QueueGuard {
    fn drop(&mut self) {
        for q in [self.0.clone(), format!("{}.dlq", self.0)] {
            let _ = Command::new("rabbitmqctl")
                .args(["-q", "delete_queue", &q])
                .output();
        }
    }
}

#[test]
fn produces_300_orders_to_rabbitmq() {
    let queue = QueueGuard(format!(
        "conveyor.produce-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    ));
    let out = produce(
        &["--to", "rabbitmq", "--orders", "300", "--quiet"],
        &[("CONVEYOR__RABBITMQ__QUEUE", queue.0.as_str())],
    );
    let stdout = stdout_of(&out);
    assert!(
        stdout.contains(&format!(
            "published 300 orders to RabbitMQ queue {:?}",
            queue.0
        )),
        "{stdout}"
    );
    // Confirmed means enqueued, but poll the broker's count with a deadline
    // rather than trust one read.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = queue.ready();
        if ready == Some(300) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "queue {} holds {ready:?} messages, not 300",
            queue.0
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_signal_stops_publishing_and_the_summary_counts_what_the_broker_holds() {
    let queue = QueueGuard(format!(
        "conveyor.produce-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    ));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_conveyor"));
    for (k, _) in std::env::vars() {
        if k.starts_with("CONVEYOR") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    let child = cmd
        .args([
            "produce",
            "--to",
            "rabbitmq",
            "--duration",
            "60s",
            "--rate",
            "300",
            "--quiet",
        ])
        .env("CONVEYOR__RABBITMQ__QUEUE", &queue.0)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn conveyor produce");
    std::thread::sleep(Duration::from_millis(1500));
    let pid = i32::try_from(child.id()).expect("pid");
    kill(Pid::from_raw(pid), Signal::SIGINT).expect("SIGINT to our own child");
    let started = Instant::now();
    let out = child.wait_with_output().expect("wait for produce");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "stopped promptly"
    );
    let stdout = stdout_of(&out);
    assert!(stdout.contains("stopped by a signal"), "{stdout}");
    let sent: u64 = stdout
        .split("published ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {stdout}"));
    assert!((100..18_000).contains(&sent), "published {sent}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while queue.ready() != Some(sent) {
        assert!(
            Instant::now() < deadline,
            "queue holds {:?}, the summary says {sent}",
            queue.ready()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
