//! The Kafka source end to end, with real PostgreSQL and the simulator, on
//! two brokers: every test runs as `NAME::mock`, on librdkafka's mock
//! cluster held by the test process (a Kafka-protocol broker on loopback
//! sockets, reachable from child daemons too), and as `NAME::tansu`, on a
//! tansu broker the test starts (an independent implementation, so the
//! client is not talking to its own library).

mod common;

use std::time::{Duration, Instant};

use common::{metric, wait_for, Backend, Daemon, Env, InProcess, KafkaBroker};
use conveyor::config::{Config, SourceKind};
use conveyor::tools::produce::{Intent, Mix, OrderGen};
use conveyor::tools::sim::Knobs;
use nix::sys::signal::Signal;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;

const PARTITIONS: i32 = 4;

fn kafka_config(env: &Env, brokers: &str, topic: &str) -> Config {
    let mut c = env.config();
    c.source.kind = SourceKind::Kafka;
    c.kafka.brokers = brokers.to_string();
    c.kafka.group_id = format!("{}-group", env.name);
    c.kafka.topics = vec![topic.to_string()];
    c.kafka.commit_interval = Duration::from_millis(200);
    c.kafka.lag_interval = Duration::from_millis(200);
    c.kafka
        .properties
        .insert("session.timeout.ms".into(), "6000".into());
    c
}

async fn produce(broker: &KafkaBroker, topic: &str, gen: &OrderGen, range: std::ops::Range<u64>) {
    broker
        .produce(topic, range.map(|i| (gen.order_id(i), gen.message(i).1)))
        .await;
}

/// (committed, log end) per partition; every partition must be readable.
async fn committed_and_end(broker: &KafkaBroker, group: &str, topic: &str) -> Vec<(i64, i64)> {
    let offsets = broker.committed_and_end(group, topic, PARTITIONS).await;
    assert_eq!(
        offsets.len(),
        PARTITIONS as usize,
        "offsets of every partition"
    );
    offsets
}

/// Environment of a child daemon consuming `topic`.
fn kafka_env(env: &Env, brokers: &str, topic: &str) -> Vec<(String, String)> {
    vec![
        (
            "CONVEYOR_CONFIG".into(),
            common::kafka_daemon_config_file(env),
        ),
        ("CONVEYOR__SOURCE__KIND".into(), "kafka".into()),
        ("CONVEYOR__KAFKA__BROKERS".into(), brokers.into()),
        (
            "CONVEYOR__KAFKA__GROUP_ID".into(),
            format!("{}-group", env.name),
        ),
        ("CONVEYOR__KAFKA__TOPICS".into(), topic.into()),
        ("CONVEYOR__KAFKA__COMMIT_INTERVAL".into(), "200ms".into()),
        ("CONVEYOR__KAFKA__LAG_INTERVAL".into(), "200ms".into()),
    ]
}

/// Rebalance events of a member, read from its metrics.
async fn rebalance_events(addr: std::net::SocketAddr, event: &str) -> f64 {
    metric(
        addr,
        &format!("conveyor_kafka_rebalance_events_total{{event=\"{event}\"}}"),
    )
    .await
    .unwrap_or_else(|| panic!("rebalance metric {event} exported"))
}

/// The revoke barrier held: every revoke's in-flight orders finished within
/// `kafka.revoke_timeout` (the downstream answers fast in these tests).
async fn assert_revokes_waited(who: &str, addr: std::net::SocketAddr) {
    assert_eq!(
        rebalance_events(addr, "revoke_timeout").await,
        0.0,
        "{who}: a revoke gave up on in-flight orders"
    );
}

async fn run_in_process(
    config: Config,
    until: impl Fn(
        std::net::SocketAddr,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>,
) -> conveyor::Report {
    let member = InProcess::start(config).await;
    wait_for("the run's goal", Duration::from_secs(180), || {
        until(member.addr)
    })
    .await;
    member.stop().await
}

fn acked_at_least(
    n: u64,
) -> impl Fn(std::net::SocketAddr) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>
{
    move |addr| {
        Box::pin(async move {
            metric(addr, "conveyor_messages_acked_total")
                .await
                .unwrap_or(0.0)
                >= n as f64
        })
    }
}

on_both_brokers! {
    async fn ten_thousand_orders_across_four_partitions_commit_to_the_log_end(backend: Backend) {
    let env = Env::new("k10k", Knobs::default()).await;
    let broker = KafkaBroker::start(backend).await;
    let topic = format!("{}-orders", env.name);
    broker.create_topic(&topic, PARTITIONS).await;
    let brokers = broker.bootstrap_servers();
    let gen = OrderGen::new(
        env.name.clone(),
        Mix {
            reject_pct: 3.0,
            decline_pct: 3.0,
            poison_pct: 0.0,
        },
    );
    let n = 10_000u64;
    produce(&broker, &topic, &gen, 0..n).await;

    let config = kafka_config(&env, &brokers, &topic);
    let started = Instant::now();
    let report = run_in_process(config, |addr| {
        Box::pin(async move {
            metric(addr, "conveyor_messages_acked_total").await.unwrap_or(0.0) >= n as f64
                // Lag is exported per partition and reaches 0 once the
                // commits are in (on tansu a batch early: its watermark
                // stops short of the last batch; the offsets are checked
                // against what it acknowledged below).
                && metric(addr, "conveyor_kafka_consumer_lag_messages").await == Some(0.0)
        })
    })
    .await;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "kafka 10k: {n} orders in {secs:.2} s incl. group join = {:.0} orders/s, peak RSS {} KiB ({report:?})",
        n as f64 / secs,
        conveyor::tools::demo::peak_rss_kib()
    );
    assert_eq!(report.acked, n);
    assert_eq!(env.rows().await, n as i64);
    let offsets = committed_and_end(&broker, &format!("{}-group", env.name), &topic).await;
    assert_eq!(offsets.len(), PARTITIONS as usize);
    for (committed, end) in &offsets {
        assert_eq!(
            committed, end,
            "committed offsets at the log end: {offsets:?}"
        );
    }
    assert!(
        offsets.iter().all(|(_, end)| *end > 0),
        "every partition had messages"
    );
    env.check_ledger().await;
    env.cleanup().await;
}
}

on_both_brokers! {
    async fn a_restart_resumes_from_the_committed_offsets(backend: Backend) {
    let env = Env::new("krestart", Knobs::default()).await;
    let broker = KafkaBroker::start(backend).await;
    let topic = format!("{}-orders", env.name);
    broker.create_topic(&topic, PARTITIONS).await;
    let brokers = broker.bootstrap_servers();
    let gen = OrderGen::new(env.name.clone(), Mix::default());
    let n = 10_000u64;
    produce(&broker, &topic, &gen, 0..n).await;

    let first = run_in_process(kafka_config(&env, &brokers, &topic), acked_at_least(3_000)).await;
    assert!(first.drained && first.acked < n, "{first:?}");
    let stored = env.rows().await;
    assert_eq!(
        stored as u64, first.acked,
        "a clean drain commits exactly what it stored"
    );
    let rows_target = n as i64;
    let pool = env.pool.clone();
    let second = run_in_process(kafka_config(&env, &brokers, &topic), move |_| {
        let pool = pool.clone();
        Box::pin(async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM orders")
                .fetch_one(&pool)
                .await
                .unwrap_or(0)
                == rows_target
        })
    })
    .await;
    println!(
        "restart: first run acked {}, second received {}",
        first.acked, second.received
    );
    assert_eq!(
        second.received,
        n - first.acked,
        "the second run starts exactly where the first committed"
    );
    assert_eq!(env.rows().await, n as i64);
    assert_eq!(env.check_ledger().await, n as usize);
    env.cleanup().await;
}
}

on_both_brokers! {
    async fn poison_goes_to_the_dead_letter_topic_with_headers_and_offsets_move_past_it(backend: Backend) {
    let env = Env::new("kpoison", Knobs::default()).await;
    let broker = KafkaBroker::start(backend).await;
    let topic = format!("{}-orders", env.name);
    let dlq = format!("{topic}.dlq");
    broker.create_topic(&topic, PARTITIONS).await;
    broker.create_topic(&dlq, 1).await;
    let brokers = broker.bootstrap_servers();
    let gen = OrderGen::new(
        env.name.clone(),
        Mix {
            poison_pct: 10.0,
            reject_pct: 0.0,
            decline_pct: 0.0,
        },
    );
    let n = 1_000u64;
    produce(&broker, &topic, &gen, 0..n).await;
    let poison: Vec<u64> = (0..n)
        .filter(|i| gen.intent(*i) == Intent::Poison)
        .collect();

    let report = run_in_process(kafka_config(&env, &brokers, &topic), acked_at_least(n)).await;
    assert_eq!(report.dead_lettered, poison.len() as u64);
    assert_eq!(env.rows().await, (n as usize - poison.len()) as i64);
    for (committed, end) in
        committed_and_end(&broker, &format!("{}-group", env.name), &topic).await
    {
        assert_eq!(committed, end);
    }

    let reader: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", format!("{}-reader", env.name))
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("reader");
    reader.subscribe(&[dlq.as_str()]).expect("subscribe");
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.len() < poison.len() && Instant::now() < deadline {
        if let Some(Ok(m)) = reader.poll(Duration::from_millis(200)) {
            let h = m.headers().expect("dead letters carry headers");
            let text = |k| conveyor::source::kafka::header_text(h, k).unwrap_or_default();
            assert!(!text("x-conveyor-reason").is_empty());
            assert_eq!(text("x-conveyor-stage"), "decode");
            assert_eq!(text("x-conveyor-topic"), topic);
            assert!(text("x-conveyor-offset").parse::<i64>().is_ok());
            assert!(!text("x-conveyor-failed-at").is_empty());
            let key = String::from_utf8_lossy(m.key().expect("original key kept")).into_owned();
            seen.push(key);
        }
    }
    seen.sort();
    let mut want: Vec<String> = poison.iter().map(|i| gen.order_id(*i)).collect();
    want.sort();
    assert_eq!(seen, want, "every poison message, keyed as it came");
    env.cleanup().await;
}
}

on_both_brokers! {
    async fn two_daemons_share_the_group_one_stops_another_joins_under_load(backend: Backend) {
    let env = Env::new("kgroup", Knobs::default()).await;
    let broker = KafkaBroker::start(backend).await;
    let topic = format!("{}-orders", env.name);
    broker.create_topic(&topic, PARTITIONS).await;
    let brokers = broker.bootstrap_servers();
    let gen = OrderGen::new(env.name.clone(), Mix::default());
    let n = 12_000u64;
    produce(&broker, &topic, &gen, 0..3_000).await;

    let vars = kafka_env(&env, &brokers, &topic);
    let extra: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let extra_props = [("CONVEYOR__KAFKA__REVOKE_TIMEOUT", "5s")];
    let all: Vec<(&str, &str)> = extra.iter().chain(extra_props.iter()).copied().collect();
    let mut a = Daemon::start(&env, &all).await;
    let mut b = Daemon::start(&env, &all).await;
    // Keep producing while the group changes.
    produce(&broker, &topic, &gen, 3_000..6_000).await;
    wait_for("both members working", Duration::from_secs(60), || async {
        metric(a.http, "conveyor_messages_acked_total")
            .await
            .unwrap_or(0.0)
            > 0.0
            && metric(b.http, "conveyor_messages_acked_total")
                .await
                .unwrap_or(0.0)
                > 0.0
    })
    .await;
    assert_revokes_waited("a", a.http).await;
    a.signal(Signal::SIGTERM);
    produce(&broker, &topic, &gen, 6_000..9_000).await;
    let (code, _) = a.wait(Duration::from_secs(30)).await;
    assert_eq!(code, Some(0), "log:\n{}", a.log_text());
    let mut c = Daemon::start(&env, &all).await;
    produce(&broker, &topic, &gen, 9_000..n).await;
    wait_for("every order stored", Duration::from_secs(180), || async {
        env.rows().await == n as i64
    })
    .await;
    assert_revokes_waited("b", b.http).await;
    assert_revokes_waited("c", c.http).await;
    assert!(
        rebalance_events(b.http, "revoked").await >= 2.0,
        "b saw a leave and took part in c's join"
    );
    for d in [&mut b, &mut c] {
        d.signal(Signal::SIGTERM);
        let (code, _) = d.wait(Duration::from_secs(30)).await;
        assert_eq!(code, Some(0), "log:\n{}", d.log_text());
    }
    assert_eq!(env.rows().await, n as i64);
    assert_eq!(env.check_ledger().await, n as usize);
    let offsets = committed_and_end(&broker, &format!("{}-group", env.name), &topic).await;
    assert!(
        offsets.iter().all(|(committed, end)| committed == end),
        "committed offsets at the log end, per partition (committed, end): {offsets:?}\n\
         a's log:\n{}\nb's log:\n{}\nc's log:\n{}",
        a.log_text(),
        b.log_text(),
        c.log_text()
    );
    env.cleanup().await;
}
}

on_both_brokers! {
    async fn cooperative_sticky_rebalances_lose_and_double_nothing(backend: Backend) {
    let env = Env::new("kcoop", Knobs::default()).await;
    let broker = KafkaBroker::start(backend).await;
    let topic = format!("{}-orders", env.name);
    broker.create_topic(&topic, PARTITIONS).await;
    let brokers = broker.bootstrap_servers();
    let gen = OrderGen::new(env.name.clone(), Mix::default());
    let n = 9_000u64;
    let config = || {
        let mut c = kafka_config(&env, &brokers, &topic);
        c.kafka.properties.insert(
            "partition.assignment.strategy".into(),
            "cooperative-sticky".into(),
        );
        c
    };
    produce(&broker, &topic, &gen, 0..3_000).await;
    let a = InProcess::start(config()).await;
    let b = InProcess::start(config()).await;
    produce(&broker, &topic, &gen, 3_000..6_000).await;
    wait_for("both members working", Duration::from_secs(60), || async {
        metric(a.addr, "conveyor_messages_acked_total")
            .await
            .unwrap_or(0.0)
            > 0.0
            && metric(b.addr, "conveyor_messages_acked_total")
                .await
                .unwrap_or(0.0)
                > 0.0
    })
    .await;
    assert_revokes_waited("a", a.addr).await;
    let report_a = a.stop().await;
    assert!(report_a.drained);
    let c = InProcess::start(config()).await;
    produce(&broker, &topic, &gen, 6_000..n).await;
    wait_for("every order stored", Duration::from_secs(180), || async {
        env.rows().await == n as i64
    })
    .await;
    assert_revokes_waited("b", b.addr).await;
    assert_revokes_waited("c", c.addr).await;
    let (rb, rc) = (b.stop().await, c.stop().await);
    println!(
        "cooperative: a acked {}, b {}, c {}",
        report_a.acked, rb.acked, rc.acked
    );
    assert_eq!(env.rows().await, n as i64);
    assert_eq!(env.check_ledger().await, n as usize);
    for (committed, end) in
        committed_and_end(&broker, &format!("{}-group", env.name), &topic).await
    {
        assert_eq!(committed, end);
    }
    env.cleanup().await;
}
}
