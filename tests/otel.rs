//! Traces over OTLP, end to end: the daemon binary (RabbitMQ, PostgreSQL,
//! the simulator) exports to a real OTLP/HTTP receiver on a loopback socket.
//! An order published with a `traceparent` arrives as one trace with the
//! spans, attributes and parent/link structure of the messaging and HTTP
//! conventions; with the receiver gone the daemon stores everything, stays
//! within its memory and counts the spans it dropped.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::otlp::{hex, OtlpReceiver, Received};
use common::{free_port, wait_for, Backend, Daemon, Env, KafkaBroker};
use conveyor::tools::produce::{Mix, OrderGen};
use conveyor::tools::sim::Knobs;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use nix::sys::signal::Signal;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PRODUCER_SPAN: &str = "00f067aa0ba902b7";

async fn publish_with_traceparent(env: &Env, body: &[u8], traceparent: &str) {
    let conn = Connection::connect(common::AMQP, ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    conveyor::source::rabbitmq::declare_topology(&ch, &env.rabbit())
        .await
        .expect("declare");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from("traceparent"),
        AMQPValue::LongString(LongString::from(traceparent)),
    );
    ch.basic_publish(
        ShortString::from(""),
        ShortString::from(env.queue.as_str()),
        BasicPublishOptions::default(),
        body,
        BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(headers),
    )
    .await
    .expect("publish")
    .await
    .expect("confirmed");
    conn.close(200, "done".into()).await.ok();
}

fn otlp_env(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("CONVEYOR__TELEMETRY__OTLP__ENDPOINT", endpoint.to_string()),
        ("CONVEYOR__TELEMETRY__OTLP__BATCH_INTERVAL", "200ms".into()),
        ("CONVEYOR__TELEMETRY__OTLP__TIMEOUT", "1s".into()),
        ("CONVEYOR__BATCH__MAX_WAIT", "20ms".into()),
    ]
}

fn by_name<'a>(spans: &'a [Received], name: &str) -> Vec<&'a Received> {
    spans.iter().filter(|s| s.span.name == name).collect()
}

fn one<'a>(spans: &'a [Received], name: &str) -> &'a Received {
    let found = by_name(spans, name);
    assert_eq!(found.len(), 1, "one {name:?} span in {:#?}", names(spans));
    found[0]
}

fn names(spans: &[Received]) -> Vec<String> {
    spans
        .iter()
        .map(|s| {
            format!(
                "{} {} {} parent {}",
                &hex(&s.span.trace_id)[..8],
                s.span.name,
                hex(&s.span.span_id),
                hex(&s.span.parent_span_id)
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_is_one_trace_from_the_producer_to_the_ack() {
    let receiver = OtlpReceiver::start().await;
    let env = Env::new("otel", Knobs::default()).await;
    let gen = OrderGen::new(
        env.name.clone(),
        Mix {
            poison_pct: 0.0,
            reject_pct: 0.0,
            decline_pct: 0.0,
        },
    );
    let order_id = gen.order_id(0);
    let traceparent = format!("00-{TRACE}-{PRODUCER_SPAN}-01");
    publish_with_traceparent(&env, &gen.message(0).1, &traceparent).await;
    let extra = otlp_env(&receiver.endpoint());
    let extra: Vec<(&str, &str)> = extra.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut daemon = Daemon::start(&env, &extra).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let t = receiver.trace(TRACE);
        if !by_name(&t, "ack").is_empty() && !by_name(&t, "process").is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no complete trace after 30 s: {} requests, spans {:#?}; log:\n{}",
            receiver.requests(),
            names(&receiver.spans()),
            daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(env.rows().await, 1);
    let spans = receiver.trace(TRACE);

    // The root: a consumer span continuing the producer's trace, linked to it.
    let process = one(&spans, "process");
    let p = &process.span;
    assert_eq!(process.service, "conveyor");
    assert_eq!(p.kind, SpanKind::Consumer as i32);
    assert_eq!(
        hex(&p.parent_span_id),
        PRODUCER_SPAN,
        "continues the producer"
    );
    assert_eq!(p.links.len(), 1, "links the producer");
    assert_eq!(hex(&p.links[0].trace_id), TRACE);
    assert_eq!(hex(&p.links[0].span_id), PRODUCER_SPAN);
    for (key, want) in [
        ("messaging.system", "rabbitmq"),
        ("messaging.operation.type", "process"),
        ("messaging.destination.name", env.queue.as_str()),
        ("messaging.message.id", order_id.as_str()),
        ("order_id", order_id.as_str()),
    ] {
        assert_eq!(process.str_attr(key).as_deref(), Some(want), "{key}");
    }
    assert_eq!(
        process.int_attr("messaging.rabbitmq.message.delivery_tag"),
        Some(1)
    );
    assert!(process.int_attr("messaging.message.body.size").unwrap_or(0) > 50);

    check_children(&spans, &env, &order_id, TRACE, 1);
    assert_eq!(spans.len(), 9, "{:#?}", names(&spans));

    assert!(common::metric(daemon.http, "conveyor_trace_spans_exported_total").await >= Some(9.0));
    assert_eq!(
        common::metric(daemon.http, "conveyor_trace_spans_dropped_total").await,
        Some(0.0)
    );
    daemon.signal(Signal::SIGTERM);
    let (code, _) = daemon.wait(Duration::from_secs(15)).await;
    assert_eq!(code, Some(0));
    env.check_ledger().await;
    env.cleanup().await;
}

/// The children of an order's `process` span, each once and in the order's
/// life, and one HTTP client span per downstream call whose id is the
/// parent the downstream was given.
fn check_children(spans: &[Received], env: &Env, order_id: &str, trace: &str, batch: i64) {
    let p = &one(spans, "process").span;
    // Its children, each once, in the order's life.
    let root = hex(&p.span_id);
    let child = |name: &str| {
        let s = one(spans, name);
        assert_eq!(
            hex(&s.span.parent_span_id),
            root,
            "{name} is a child of process"
        );
        assert!(
            s.span.start_time_unix_nano >= p.start_time_unix_nano,
            "{name} starts inside"
        );
        assert!(
            s.span.end_time_unix_nano <= p.end_time_unix_nano,
            "{name} ends inside"
        );
        s
    };
    let decode = child("decode");
    let validate = child("validate");
    let charge = child("charge");
    let wait = child("batch wait");
    let commit = child("commit");
    let ack = child("ack");
    // (A stage hands the order on before its own span ends, so stages may
    // overlap by that much; these steps may not.)
    assert!(decode.span.end_time_unix_nano <= validate.span.start_time_unix_nano);
    assert!(validate.span.start_time_unix_nano <= charge.span.start_time_unix_nano);
    assert!(charge.span.start_time_unix_nano <= wait.span.start_time_unix_nano);
    assert!(wait.span.end_time_unix_nano <= commit.span.start_time_unix_nano);
    assert!(commit.span.end_time_unix_nano <= ack.span.start_time_unix_nano);
    // Orders published together may share a batch.
    assert_eq!(commit.int_attr("db.operation.batch.size"), Some(batch));
    assert_eq!(
        commit.str_attr("db.system.name").as_deref(),
        Some("postgresql")
    );

    // One HTTP client span per downstream call, inside its stage, whose id
    // is the parent the downstream was given.
    let posts = by_name(spans, "POST");
    assert_eq!(posts.len(), 2, "{:#?}", names(spans));
    let ledger = env.sim.ledger();
    for (stage, forwarded) in [
        (
            validate,
            ledger.validate_traceparents.get(order_id).cloned(),
        ),
        (
            charge,
            ledger
                .charges
                .iter()
                .find(|c| c.order_id == order_id)
                .and_then(|c| c.traceparent.clone()),
        ),
    ] {
        let post = posts
            .iter()
            .find(|s| s.span.parent_span_id == stage.span.span_id)
            .unwrap_or_else(|| panic!("a POST under {}", stage.span.name));
        assert_eq!(post.span.kind, SpanKind::Client as i32);
        assert_eq!(post.int_attr("http.response.status_code"), Some(200));
        assert_eq!(post.int_attr("conveyor.attempt"), Some(1));
        assert_eq!(
            post.str_attr("http.request.method").as_deref(),
            Some("POST")
        );
        assert!(post
            .str_attr("url.full")
            .is_some_and(|u| u.starts_with(&env.sim.url)));
        assert_eq!(
            forwarded,
            Some(format!("00-{trace}-{}-01", hex(&post.span.span_id))),
            "the downstream got the client span as its parent"
        );
    }
}

/// The sampler decides once, at the order's root span: a kept trace is
/// whole, a dropped one exports nothing at all (no orphan child span
/// starting a trace of its own), and the downstreams are given the dropped
/// order's context marked unsampled, so they drop it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sampler_keeps_or_drops_an_order_whole() {
    // TraceIdRatioBased compares the low 8 bytes of the trace id with the
    // ratio: at 0.5 the first is always kept, the second always dropped.
    const KEPT: &str = "4bf92f3577b34da60000000000000001";
    const DROPPED: &str = "4bf92f3577b34da6fffffffffffffffe";
    let receiver = OtlpReceiver::start().await;
    let env = Env::new("otel_sampled", Knobs::default()).await;
    let gen = OrderGen::new(
        env.name.clone(),
        Mix {
            poison_pct: 0.0,
            reject_pct: 0.0,
            decline_pct: 0.0,
        },
    );
    let (kept_id, dropped_id) = (gen.order_id(0), gen.order_id(1));
    publish_with_traceparent(
        &env,
        &gen.message(0).1,
        &format!("00-{KEPT}-{PRODUCER_SPAN}-01"),
    )
    .await;
    publish_with_traceparent(
        &env,
        &gen.message(1).1,
        &format!("00-{DROPPED}-{PRODUCER_SPAN}-01"),
    )
    .await;
    let mut extra = otlp_env(&receiver.endpoint());
    extra.push(("CONVEYOR__TELEMETRY__OTLP__SAMPLE_RATIO", "0.5".into()));
    let extra: Vec<(&str, &str)> = extra.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut daemon = Daemon::start(&env, &extra).await;
    wait_for("both orders acked", Duration::from_secs(30), || async {
        common::metric(daemon.http, "conveyor_messages_acked_total").await == Some(2.0)
    })
    .await;
    wait_for(
        "the kept trace exported",
        Duration::from_secs(10),
        || async { !by_name(&receiver.trace(KEPT), "ack").is_empty() },
    )
    .await;
    // Three more export intervals for anything of the dropped order.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let spans = receiver.trace(KEPT);
    let batch = one(&spans, "commit")
        .int_attr("db.operation.batch.size")
        .unwrap_or(0);
    assert!((1..=2).contains(&batch), "batch of {batch}");
    check_children(&spans, &env, &kept_id, KEPT, batch);
    assert_eq!(spans.len(), 9, "{:#?}", names(&spans));
    assert_eq!(
        receiver.spans().len(),
        9,
        "nothing of the dropped order: {:#?}",
        names(&receiver.spans())
    );
    let ledger = env.sim.ledger();
    let forwarded = |id: &str| {
        let validate = ledger.validate_traceparents.get(id).cloned();
        let charge = ledger
            .charges
            .iter()
            .find(|c| c.order_id == id)
            .and_then(|c| c.traceparent.clone());
        [validate, charge]
    };
    for tp in forwarded(&dropped_id) {
        let tp = tp.expect("the dropped order's context is still passed on");
        assert!(
            tp.starts_with(&format!("00-{DROPPED}-")) && tp.ends_with("-00"),
            "the dropped order's trace, unsampled: {tp}"
        );
    }
    for tp in forwarded(&kept_id) {
        let tp = tp.expect("forwarded");
        assert!(
            tp.starts_with(&format!("00-{KEPT}-")) && tp.ends_with("-01"),
            "{tp}"
        );
    }
    assert_eq!(env.rows().await, 2);
    daemon.signal(Signal::SIGTERM);
    let (code, _) = daemon.wait(Duration::from_secs(15)).await;
    assert_eq!(code, Some(0));
    env.check_ledger().await;
    env.cleanup().await;
}

/// The same trace from a Kafka topic (the mock cluster): the `process`
/// span names the topic, partition, offset and consumer group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_order_is_one_trace_with_its_partition_and_offset() {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let receiver = OtlpReceiver::start().await;
    let env = Env::new("otel_kafka", Knobs::default()).await;
    let broker = KafkaBroker::start(Backend::Mock).await;
    let topic = format!("{}-orders", env.name);
    broker.create_topic(&topic, 2).await;
    let gen = OrderGen::new(
        env.name.clone(),
        Mix {
            poison_pct: 0.0,
            reject_pct: 0.0,
            decline_pct: 0.0,
        },
    );
    let order_id = gen.order_id(0);
    let traceparent = format!("00-{TRACE}-{PRODUCER_SPAN}-01");
    let producer: FutureProducer = rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap_servers())
        .set("acks", "all")
        .create()
        .expect("producer");
    let body = gen.message(0).1;
    let (partition, offset) = producer
        .send(
            FutureRecord::to(&topic)
                .key(&order_id)
                .payload(&body)
                .headers(OwnedHeaders::new().insert(Header {
                    key: "traceparent",
                    value: Some(traceparent.as_str()),
                })),
            Duration::from_secs(10),
        )
        .await
        .map(|d| (d.partition, d.offset))
        .map_err(|(e, _)| e)
        .expect("produced");
    let group = format!("{}-group", env.name);
    let config = common::kafka_daemon_config_file(&env);
    let mut extra = otlp_env(&receiver.endpoint());
    extra.extend([
        ("CONVEYOR_CONFIG", config),
        ("CONVEYOR__SOURCE__KIND", "kafka".into()),
        ("CONVEYOR__KAFKA__BROKERS", broker.bootstrap_servers()),
        ("CONVEYOR__KAFKA__GROUP_ID", group.clone()),
        ("CONVEYOR__KAFKA__TOPICS", topic.clone()),
        ("CONVEYOR__KAFKA__COMMIT_INTERVAL", "200ms".into()),
    ]);
    let extra: Vec<(&str, &str)> = extra.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut daemon = Daemon::start(&env, &extra).await;
    wait_for("the trace exported", Duration::from_secs(60), || async {
        let t = receiver.trace(TRACE);
        !by_name(&t, "ack").is_empty() && !by_name(&t, "process").is_empty()
    })
    .await;
    let spans = receiver.trace(TRACE);
    let process = one(&spans, "process");
    assert_eq!(process.span.kind, SpanKind::Consumer as i32);
    assert_eq!(hex(&process.span.parent_span_id), PRODUCER_SPAN);
    assert_eq!(process.span.links.len(), 1, "links the producer");
    assert_eq!(hex(&process.span.links[0].span_id), PRODUCER_SPAN);
    for (k, want) in [
        ("messaging.system", "kafka"),
        ("messaging.operation.type", "process"),
        ("messaging.destination.name", topic.as_str()),
        ("messaging.consumer.group.name", group.as_str()),
        ("messaging.message.id", order_id.as_str()),
    ] {
        assert_eq!(process.str_attr(k).as_deref(), Some(want), "{k}");
    }
    assert_eq!(
        process.str_attr("messaging.destination.partition.id"),
        Some(partition.to_string())
    );
    assert_eq!(process.int_attr("messaging.kafka.offset"), Some(offset));
    check_children(&spans, &env, &order_id, TRACE, 1);
    assert_eq!(spans.len(), 9, "{:#?}", names(&spans));
    assert_eq!(env.rows().await, 1);
    daemon.signal(Signal::SIGTERM);
    let (code, _) = daemon.wait(Duration::from_secs(20)).await;
    assert_eq!(code, Some(0));
    env.check_ledger().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_show_as_attempts_with_backoff_between() {
    let receiver = OtlpReceiver::start().await;
    let mut knobs = Knobs::default();
    // Half the charges answer 503 first: some orders need a second attempt.
    knobs.charge.error_rate = 0.5;
    let env = Env::new("otel_retry", knobs).await;
    let gen = OrderGen::new(
        env.name.clone(),
        Mix {
            poison_pct: 0.0,
            reject_pct: 0.0,
            decline_pct: 0.0,
        },
    );
    env.publish((0..20).map(|i| gen.message(i).1)).await;
    let mut extra = otlp_env(&receiver.endpoint());
    extra.push(("CONVEYOR__PAYMENT__RETRY__INITIAL_INTERVAL", "10ms".into()));
    // Retries only: a breaker opened by the failures would pause orders
    // instead (its waits are spans too, but not what this test reads).
    extra.push(("CONVEYOR__PAYMENT__BREAKER__ENABLED", "false".into()));
    let extra: Vec<(&str, &str)> = extra.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut daemon = Daemon::start(&env, &extra).await;
    wait_for(
        "20 orders acked and exported",
        Duration::from_secs(60),
        || async { by_name(&receiver.spans(), "ack").len() >= 20 },
    )
    .await;
    let spans = receiver.spans();
    let mut by_trace: HashMap<Vec<u8>, Vec<&Received>> = HashMap::new();
    for s in &spans {
        by_trace.entry(s.span.trace_id.clone()).or_default().push(s);
    }
    assert_eq!(
        by_trace.len(),
        20,
        "one trace per order (produce stamps a traceparent)"
    );
    let retried = spans
        .iter()
        .filter(|s| s.span.name == "POST" && s.int_attr("conveyor.attempt") == Some(2))
        .collect::<Vec<_>>();
    assert!(!retried.is_empty(), "some charge needed a second attempt");
    for second in retried {
        assert_eq!(second.int_attr("http.request.resend_count"), Some(1));
        let trace = &by_trace[&second.span.trace_id];
        let first = trace
            .iter()
            .find(|s| {
                s.span.name == "POST"
                    && s.span.parent_span_id == second.span.parent_span_id
                    && s.int_attr("conveyor.attempt") == Some(1)
            })
            .expect("the first attempt beside it");
        assert_eq!(first.int_attr("http.response.status_code"), Some(503));
        assert_eq!(
            first.str_attr("error.type").as_deref(),
            Some("server_error")
        );
        let backoff = trace
            .iter()
            .find(|s| {
                s.span.name == "retry backoff"
                    && s.span.parent_span_id == second.span.parent_span_id
            })
            .expect("a retry backoff span between the attempts");
        assert!(first.span.end_time_unix_nano <= backoff.span.start_time_unix_nano);
        assert!(backoff.span.end_time_unix_nano <= second.span.start_time_unix_nano);
    }
    daemon.signal(Signal::SIGTERM);
    let (code, _) = daemon.wait(Duration::from_secs(15)).await;
    assert_eq!(code, Some(0));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_collector_costs_dropped_spans_only() {
    const N: u64 = 3000;
    let env = Env::new("otel_dead", Knobs::default()).await;
    let gen = OrderGen::new(
        env.name.clone(),
        Mix {
            poison_pct: 0.0,
            reject_pct: 0.0,
            decline_pct: 0.0,
        },
    );
    env.publish((0..N).map(|i| gen.message(i).1)).await;
    // Nothing listens there: every export fails at once (connection refused).
    let dead = format!("http://127.0.0.1:{}", free_port());
    let mut extra = otlp_env(&dead);
    extra.push(("CONVEYOR__TELEMETRY__OTLP__QUEUE_SIZE", "256".into()));
    extra.push(("CONVEYOR__TELEMETRY__OTLP__BATCH_SIZE", "128".into()));
    let extra: Vec<(&str, &str)> = extra.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let started = Instant::now();
    let mut daemon = Daemon::start(&env, &extra).await;
    wait_for("every order stored", Duration::from_secs(120), || async {
        env.rows().await == N as i64
    })
    .await;
    let took = started.elapsed();
    wait_for("every message acked", Duration::from_secs(20), || async {
        common::metric(daemon.http, "conveyor_messages_acked_total").await == Some(N as f64)
    })
    .await;
    // 9 spans an order, all dropped (queued ones when they fail, others at the full queue).
    wait_for(
        "the dropped spans counted",
        Duration::from_secs(20),
        || async {
            common::metric(daemon.http, "conveyor_trace_spans_dropped_total")
                .await
                .is_some_and(|d| d >= (N * 9) as f64 * 0.99)
        },
    )
    .await;
    assert_eq!(
        common::metric(daemon.http, "conveyor_trace_spans_exported_total").await,
        Some(0.0)
    );
    let (rss, peak) = daemon.rss_kib();
    println!(
        "dead collector: {N} orders stored in {took:?}, {} spans dropped, RSS {rss} KiB (peak {peak} KiB)",
        common::metric(daemon.http, "conveyor_trace_spans_dropped_total").await.unwrap_or(0.0)
    );
    assert!(peak < 200 * 1024, "peak RSS {peak} KiB");
    assert!(
        daemon.log_text().matches("trace export failed").count() <= 2,
        "export failures are logged at most once a minute"
    );
    daemon.signal(Signal::SIGTERM);
    let (code, drain) = daemon.wait(Duration::from_secs(15)).await;
    assert_eq!(code, Some(0));
    assert!(
        drain < Duration::from_secs(8),
        "the export flush is bounded: {drain:?}"
    );
    env.check_ledger().await;
    env.cleanup().await;
}
