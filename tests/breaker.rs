//! Failure semantics end to end: a payment outage opens the circuit and
//! pauses intake (nothing dead-lettered, prefetch respected, every order
//! stored and charged once after recovery), at a busy stage's traffic and
//! at a trickle of orders too few for the breaker's `min_calls`; a
//! message's W3C `traceparent` reaches both downstreams. Real RabbitMQ,
//! PostgreSQL and simulator.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{metric, unacked, wait_for, Env, InProcess};
use conveyor::tools::produce::{Mix, OrderGen};
use conveyor::tools::sim::{EndpointKnobs, Knobs};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};

const PAYMENT_CIRCUIT: &str = "conveyor_circuit_state{downstream=\"payment\"}";

/// Reads of an in-process daemon's HTTP surface.
trait Probe {
    async fn metric(&self, name: &str) -> f64;
    async fn readyz(&self) -> (u16, String);
}

impl Probe for InProcess {
    async fn metric(&self, name: &str) -> f64 {
        metric(self.addr, name).await.unwrap_or(0.0)
    }

    async fn readyz(&self) -> (u16, String) {
        match reqwest::get(format!("http://{}/readyz", self.addr)).await {
            Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
            Err(e) => (0, e.to_string()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_outage_pauses_intake_and_dead_letters_nothing() {
    const N: u64 = 2_000;
    const PREFETCH: u32 = 200;
    const OUTAGE: Duration = Duration::from_secs(10);
    let broken = Knobs {
        charge: EndpointKnobs {
            error_rate: 1.0,
            ..Default::default()
        },
        ..Knobs::default()
    };
    let env = Env::new("breaker", broken).await;
    let gen = OrderGen::new(
        env.name.clone(),
        Mix {
            poison_pct: 0.0,
            reject_pct: 3.0,
            decline_pct: 3.0,
        },
    );
    env.publish((0..N).map(|i| gen.message(i).1)).await;

    let mut config = env.config();
    config.source.prefetch = PREFETCH;
    // Far shorter than the outage: without the breaker pausing the orders,
    // every one in the charge stage would be dead-lettered as
    // retries_exhausted after 3 s.
    config.payment.retry.max_elapsed = Duration::from_secs(3);
    // Several half-open rounds (3 failing probes each) during the outage.
    config.payment.breaker.open_for = Duration::from_secs(1);
    config.payment.breaker.not_ready_after = Duration::from_secs(3);

    let daemon = InProcess::start(config).await;
    let outage_started = Instant::now();
    wait_for("the payment circuit to open", OUTAGE, || async {
        daemon.metric(PAYMENT_CIRCUIT).await == 2.0
    })
    .await;
    let opened_after = outage_started.elapsed();
    let payment_errors =
        "conveyor_downstream_requests_total{downstream=\"payment\",result=\"server_error\"}";
    let calls_at_open = daemon.metric(payment_errors).await;

    // While the provider is down: sample what the daemon holds and does.
    let mut max_unacked = 0.0f64;
    let mut max_rabbit_unacked = 0u64;
    let mut states_seen = HashMap::<i64, u32>::new();
    let mut unready = None;
    let mut received_at = Vec::new();
    let mut last_rabbit_sample = Instant::now() - Duration::from_secs(1);
    while outage_started.elapsed() < OUTAGE {
        max_unacked = max_unacked.max(daemon.metric("conveyor_unacked_messages").await);
        *states_seen
            .entry(daemon.metric(PAYMENT_CIRCUIT).await as i64)
            .or_default() += 1;
        received_at.push((
            outage_started.elapsed(),
            daemon.metric("conveyor_messages_received_total").await,
        ));
        assert_eq!(
            daemon.metric("conveyor_dead_letters_total").await,
            0.0,
            "dead-lettered during the outage"
        );
        if unready.is_none() {
            let (status, body) = daemon.readyz().await;
            if status == 503 && body.contains("payment circuit") {
                unready = Some((outage_started.elapsed(), body));
            }
        }
        if last_rabbit_sample.elapsed() >= Duration::from_secs(1) {
            max_rabbit_unacked = max_rabbit_unacked.max(unacked(&env.queue).await);
            last_rabbit_sample = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let received_during = |from: Duration| {
        let at = |t: Duration| {
            received_at
                .iter()
                .find(|(when, _)| *when >= t)
                .or(received_at.last())
                .map(|(_, n)| *n)
                .unwrap_or(0.0)
        };
        (at(from), at(OUTAGE))
    };
    let (received_2s, received_end) = received_during(Duration::from_secs(2));
    let stored_during_outage = env.rows_by_status().await;
    let calls_while_open = daemon.metric(payment_errors).await - calls_at_open;

    // The provider comes back.
    env.sim.set_knobs(Knobs::default());
    let healed = Instant::now();
    wait_for(
        "the payment circuit to close",
        Duration::from_secs(30),
        || async { daemon.metric(PAYMENT_CIRCUIT).await == 0.0 },
    )
    .await;
    let closed_after = healed.elapsed();
    wait_for("every message acked", Duration::from_secs(120), || async {
        daemon.metric("conveyor_messages_acked_total").await >= N as f64
    })
    .await;
    let all_acked_after = healed.elapsed();
    let (ready_status, ready_body) = daemon.readyz().await;
    let report = daemon.stop().await;

    println!(
        "outage: circuit open {:.2} s after start; states seen (0 closed, 1 half-open, 2 open): \
         {states_seen:?}; received {received_2s} at 2 s and {received_end} at {} s \
         (of {N}; intake held), unacked max {max_unacked} (RabbitMQ's own count max \
         {max_rabbit_unacked}, prefetch {PREFETCH}); payment calls after it opened: \
         {calls_while_open} (probes); /readyz unready at {:?}; \
         stored during the outage: {stored_during_outage:?}",
        opened_after.as_secs_f64(),
        OUTAGE.as_secs(),
        unready
            .as_ref()
            .map(|(t, b)| format!("{:.1} s: {}", t.as_secs_f64(), b.trim())),
    );
    println!(
        "recovery: circuit closed {:.2} s after the provider came back, all {N} acked after \
         {:.2} s; {report:?}",
        closed_after.as_secs_f64(),
        all_acked_after.as_secs_f64()
    );

    assert!(
        states_seen.contains_key(&2),
        "the circuit was never seen open"
    );
    assert!(
        max_unacked <= PREFETCH as f64,
        "unacked {max_unacked} > prefetch {PREFETCH}"
    );
    assert!(max_rabbit_unacked <= PREFETCH as u64);
    // Intake is paused: what came in is what the permits allow, plus one
    // per order settled meanwhile, and only rejected orders (which never
    // reach the charge stage) can settle.
    let settled = stored_during_outage.values().sum::<i64>() as f64;
    assert_eq!(
        stored_during_outage.keys().collect::<Vec<_>>(),
        vec!["rejected"],
        "only rejected orders can be stored while payment is down"
    );
    assert!(
        received_end <= PREFETCH as f64 + settled,
        "intake went on: {received_end} received, {settled} settled"
    );
    // At 100 % failures every probe fails: one round of
    // `half_open_probes` per `open_for`, not 64 workers retrying.
    assert!(
        calls_while_open <= 64.0 + 3.0 * 10.0,
        "{calls_while_open} calls"
    );
    let (_, reason) = unready.expect("/readyz turned false during the outage");
    assert!(
        reason.contains("payment circuit not closed for"),
        "{reason}"
    );
    assert_eq!(
        ready_status, 200,
        "still unready after recovery: {ready_body}"
    );

    assert!(report.drained);
    assert_eq!(report.dead_lettered, 0, "{report:?}");
    assert_eq!(report.acked, N);
    assert_eq!(
        report.accepted + report.rejected + report.declined,
        N,
        "{report:?}"
    );
    assert_eq!(
        env.rows().await,
        N as i64,
        "every order stored exactly once"
    );
    let dead = env.drain_dlq().await;
    assert!(
        dead.is_empty(),
        "dead letters: {:?}",
        dead.iter()
            .map(|(h, _)| h.get("x-conveyor-reason"))
            .collect::<Vec<_>>()
    );
    assert_eq!(env.ready(&env.queue).await, 0, "messages left in the queue");
    let by_status = env.rows_by_status().await;
    let charges = env.check_ledger().await;
    assert_eq!(
        charges as i64,
        by_status.get("accepted").copied().unwrap_or(0)
            + by_status.get("declined").copied().unwrap_or(0),
        "one charge per charged order"
    );
    env.cleanup().await;
}

/// Eight orders into a payment outage: their calls, retries included, never
/// reach `min_calls` (100) in a window before `retry.max_elapsed` (10 s
/// here) would dead-letter them, so only the low-traffic rule — 30 failures
/// in a row — can open the circuit; it must, and the orders wait for the
/// provider instead of going to the dead-letter queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickle_of_orders_into_an_outage_opens_the_circuit_too() {
    const N: u64 = 8;
    let broken = Knobs {
        charge: EndpointKnobs {
            error_rate: 1.0,
            ..Default::default()
        },
        ..Knobs::default()
    };
    let env = Env::new("breakertrickle", broken).await;
    let gen = OrderGen::new(
        env.name.clone(),
        Mix {
            poison_pct: 0.0,
            reject_pct: 0.0,
            decline_pct: 0.0,
        },
    );
    env.publish((0..N).map(|i| gen.message(i).1)).await;
    let mut config = env.config();
    config.payment.retry.max_elapsed = Duration::from_secs(10);
    let daemon = InProcess::start(config).await;
    wait_for(
        "the payment circuit to open",
        Duration::from_secs(10),
        || async { daemon.metric(PAYMENT_CIRCUIT).await == 2.0 },
    )
    .await;
    let calls = daemon
        .metric(
            "conveyor_downstream_requests_total{downstream=\"payment\",result=\"server_error\"}",
        )
        .await;
    assert!(
        calls < 100.0,
        "opened on the low-traffic rule: {calls} calls"
    );
    // Past the retry budget the orders would be dead letters by now.
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(daemon.metric("conveyor_dead_letters_total").await, 0.0);
    env.sim.set_knobs(Knobs::default());
    wait_for("every order stored", Duration::from_secs(60), || async {
        env.rows().await == N as i64
    })
    .await;
    let report = daemon.stop().await;
    assert_eq!(report.dead_lettered, 0, "{report:?}");
    assert!(env.drain_dlq().await.is_empty());
    assert_eq!(env.check_ledger().await, N as usize, "one charge per order");
    env.cleanup().await;
}

/// Publishes `(body, traceparent)` pairs with publisher confirms, the
/// traceparent as an AMQP long-string header.
async fn publish_with_traceparent(env: &Env, messages: &[(Vec<u8>, Option<String>)]) {
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
    for (body, traceparent) in messages {
        let mut headers = FieldTable::default();
        if let Some(tp) = traceparent {
            headers.insert(
                ShortString::from("traceparent"),
                AMQPValue::LongString(LongString::from(tp.as_str())),
            );
        }
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
    }
    conn.close(200, "done".into()).await.ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traceparent_published_with_the_message_reaches_both_downstreams() {
    let env = Env::new("traceparent", Knobs::default()).await;
    let gen = OrderGen::new(
        env.name.clone(),
        Mix {
            poison_pct: 0.0,
            reject_pct: 0.0,
            decline_pct: 0.0,
        },
    );
    let traceparent = |i: u64| format!("00-{:032x}-{:016x}-01", 0xabc0_0000 + i, 0x1000 + i);
    let mut messages = Vec::new();
    for i in 0..20u64 {
        let tp = match i {
            // No header, and one that is not a trace context: neither is forwarded.
            18 => None,
            19 => Some("not-a-traceparent".to_string()),
            _ => Some(traceparent(i)),
        };
        messages.push((gen.message(i).1, tp));
    }
    publish_with_traceparent(&env, &messages).await;

    let daemon = InProcess::start(env.config()).await;
    wait_for("every message acked", Duration::from_secs(60), || async {
        daemon.metric("conveyor_messages_acked_total").await >= 20.0
    })
    .await;
    let report = daemon.stop().await;
    assert_eq!(report.accepted, 20, "{report:?}");

    let ledger = env.sim.ledger();
    let charged: HashMap<&str, Option<&str>> = ledger
        .charges
        .iter()
        .map(|e| (e.order_id.as_str(), e.traceparent.as_deref()))
        .collect();
    for i in 0..20u64 {
        let order_id = gen.order_id(i);
        let want = (i < 18).then(|| traceparent(i));
        assert_eq!(
            charged.get(order_id.as_str()).copied().flatten(),
            want.as_deref(),
            "charge of order {i}"
        );
        assert_eq!(
            ledger.validate_traceparents.get(&order_id),
            want.as_ref(),
            "validation of order {i}"
        );
    }
    println!(
        "traceparent: 18 forwarded to /validate and /charges, 2 (absent, malformed) not; e.g. {}",
        traceparent(0)
    );
    env.check_ledger().await;
    env.cleanup().await;
}
