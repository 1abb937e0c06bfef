//! Swapping the consumer of a RabbitMQ channel, which is how the following
//! prefetch moves on a quorum queue (per-consumer `basic.qos` applies only
//! to consumers created after it; see `source::rabbitmq::swap`):
//!
//! * what the swap relies on, checked against the broker itself for both
//!   queue types: a cancelled consumer's deliveries stay unacknowledged on
//!   the channel (not requeued), are acked, rejected and dead-lettered
//!   there as usual, and a consumer started after `basic.qos` on the same
//!   channel — under the same tag — gets the new prefetch;
//! * the source under load on a quorum queue, its consumer swapped again
//!   and again while deliveries are in flight: every message is delivered
//!   once, and the queue ends empty.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::broker::ConsumerChannel;
use common::{unacked, wait_for, Env};
use conveyor::config::{QueueType, RabbitConfig};
use conveyor::source::prefetch::Prefetch;
use conveyor::source::rabbitmq::RabbitSource;
use conveyor::source::{Delivery, Position, Settlement};
use conveyor::telemetry::{Health, Metrics};
use conveyor::tools::sim::Knobs;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    BasicRejectOptions,
};
use lapin::types::FieldTable;
use lapin::Consumer;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// The next `n` deliveries of `consumer`, each within a few seconds.
async fn take(consumer: &mut Consumer, n: usize) -> Vec<lapin::message::Delivery> {
    let mut got = Vec::new();
    while got.len() < n {
        let d = tokio::time::timeout(Duration::from_secs(5), consumer.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} deliveries within 5 s", got.len()))
            .expect("the consumer is still running")
            .expect("a delivery");
        got.push(d);
    }
    got
}

/// Nothing more arrives on `consumer` for a while: its prefetch is full.
async fn nothing_more(consumer: &mut Consumer, prefetch: u16) {
    if let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(500), consumer.next()).await {
        panic!("a delivery beyond a prefetch of {prefetch}: {d:?}");
    }
}

async fn ready_and_unacked(env: &Env) -> (u32, u64) {
    (env.ready(&env.queue).await, unacked(&env.queue).await)
}

/// Waits until the broker reports `(ready, unacknowledged)` for the queue:
/// a quorum queue's figures in `rabbitmqctl list_queues` lag by seconds.
async fn counts(env: &Env, want: (u32, u64)) {
    let mut last = None;
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        let now = ready_and_unacked(env).await;
        if now == want {
            return;
        }
        last = Some(now);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!(
        "queue {}: (ready, unacked) {last:?}, not {want:?}",
        env.queue
    );
}

async fn cancelled_consumer_keeps_its_deliveries(queue_type: QueueType, tag: &str) {
    let env = Env::new(tag, Knobs::default()).await;
    let cfg = RabbitConfig {
        queue_type,
        ..env.rabbit()
    };
    env.publish_to(&cfg, (0..30).map(|i| format!("m{i}").into_bytes()))
        .await;
    let conn = conveyor::tools::produce::connect_rabbit(&cfg)
        .await
        .expect("connect to RabbitMQ");
    let ch = conn.create_channel().await.expect("channel");
    // A consumer after a per-consumer basic.qos, and the deliveries it gets
    // before its prefetch is full.
    let consume = |prefetch: u16, tag: &'static str| {
        let (ch, queue) = (ch.clone(), env.queue.clone());
        async move {
            ch.basic_qos(prefetch, BasicQosOptions { global: false })
                .await
                .expect("basic.qos");
            let mut consumer = ch
                .basic_consume(
                    queue.as_str().into(),
                    tag.into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .expect("basic.consume");
            let got = take(&mut consumer, usize::from(prefetch)).await;
            nothing_more(&mut consumer, prefetch).await;
            (consumer, got)
        }
    };

    let (mut old, held) = consume(5, "swap-probe-1").await;
    ch.basic_cancel("swap-probe-1".into(), BasicCancelOptions::default())
        .await
        .expect("basic.cancel");

    let end = tokio::time::timeout(Duration::from_secs(5), old.next())
        .await
        .expect("the cancelled consumer's stream ends");
    assert!(end.is_none(), "after cancel-ok: {end:?}");
    // The cancelled consumer's 5 stay unacknowledged, not requeued.
    counts(&env, (25, 5)).await;

    // A new consumer on the same channel after a per-consumer basic.qos:
    // it gets the new prefetch, beside the 5. (Under the old tag it would
    // not be new: a classic queue credits the old deliveries' acks to it,
    // a quorum queue counts them against its prefetch.)
    let (mut new, fresh) = consume(3, "swap-probe-2").await;
    counts(&env, (22, 8)).await;
    let tags: Vec<u64> = held.iter().chain(&fresh).map(|d| d.delivery_tag).collect();
    assert!(
        tags.windows(2).all(|w| w[0] < w[1]),
        "delivery tags grow across the consumers of a channel: {tags:?}"
    );

    // The old consumer's deliveries settle on the channel as usual: an ack,
    // a reject that requeues, a nack that dead-letters (quorum: to the
    // dead-letter queue; classic, declared without one: dropped), and one
    // `multiple` ack over the last two.
    ch.basic_ack(held[0].delivery_tag, BasicAckOptions::default())
        .await
        .expect("ack a cancelled consumer's delivery");
    ch.basic_reject(held[1].delivery_tag, BasicRejectOptions { requeue: true })
        .await
        .expect("requeue one");
    ch.basic_nack(
        held[2].delivery_tag,
        BasicNackOptions {
            requeue: false,
            multiple: false,
        },
    )
    .await
    .expect("dead-letter one");
    ch.basic_ack(held[4].delivery_tag, BasicAckOptions { multiple: true })
        .await
        .expect("ack the last two at once");
    // Acks have no reply: a passive declare on the same channel proves it
    // is still open (an unknown delivery tag would have closed it).
    ch.queue_declare(
        env.queue.as_str().into(),
        lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("the channel is still open after settling the old deliveries");
    // Settled: one requeued, the new consumer's 3 still out.
    counts(&env, (23, 3)).await;
    if queue_type == QueueType::Quorum {
        let dead = env.drain_dlq().await;
        assert_eq!(dead.len(), 1, "the nacked delivery is dead-lettered");
        assert_eq!(dead[0].1, held[2].data);
    }

    // The new consumer carries on past its prefetch once it acks.
    for d in &fresh {
        ch.basic_ack(d.delivery_tag, BasicAckOptions::default())
            .await
            .expect("ack");
    }
    let more = take(&mut new, 3).await;
    let bodies: HashSet<Vec<u8>> = held.iter().chain(&fresh).map(|d| d.data.clone()).collect();
    for d in &more {
        assert!(
            !bodies.contains(&d.data) || d.data == held[1].data,
            "only the requeued message comes again"
        );
    }
    conn.close(200, "done".into()).await.ok();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_consumers_deliveries_stay_on_the_channel_of_a_classic_queue() {
    cancelled_consumer_keeps_its_deliveries(QueueType::Classic, "cancelclassic").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_consumers_deliveries_stay_on_the_channel_of_a_quorum_queue() {
    cancelled_consumer_keeps_its_deliveries(QueueType::Quorum, "cancelquorum").await
}

/// The source on a quorum queue, its followed limit moved up and down
/// every 300 ms (the source swaps at most once a second) while each
/// delivery is acked after a short, varying delay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_swap_under_load_loses_and_duplicates_nothing() {
    const N: usize = 5_000;
    let env = Env::new("swapload", Knobs::default()).await;
    let cfg = RabbitConfig {
        queue_type: QueueType::Quorum,
        ..env.rabbit()
    };
    env.publish_to(&cfg, (0..N).map(|i| format!("m{i}").into_bytes()))
        .await;
    let metrics = Arc::new(Metrics::new().expect("metrics"));
    let health = Arc::new(Health::default());
    let (limit_tx, limit_rx) = watch::channel(16u32);
    let source = RabbitSource::connect(&cfg, 512, Some(limit_rx), metrics.clone(), health)
        .await
        .expect("connect the source");
    let permits = Arc::new(Prefetch::new(64, metrics.prefetch_limit.clone()));
    let (deliveries_tx, mut deliveries) = mpsc::channel::<Delivery>(8);
    let (settle_tx, settle_rx) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let run = tokio::spawn(source.run(permits, deliveries_tx, settle_rx, stop.clone()));

    // The limits the source is moved between; the channel never holds more
    // than the highest (starting the new consumer before the old one's
    // deliveries are settled would let it reach two limits together).
    const LIMITS: [u32; 10] = [40, 8, 64, 12, 30, 6, 50, 16, 40, 10];
    let highest = u64::from(LIMITS.iter().copied().max().unwrap_or_default());
    let sampling = CancellationToken::new();
    let sampled = Arc::new(AtomicUsize::new(0));
    let sampler = tokio::spawn({
        let mut channel = ConsumerChannel::new(&env.queue, "conveyor", QueueType::Quorum);
        let sampling = sampling.clone();
        let sampled = sampled.clone();
        async move {
            let mut held = Vec::new();
            while !sampling.is_cancelled() {
                if let Some((n, _)) = channel.read().await {
                    held.push(n);
                    sampled.store(held.len(), Ordering::Release);
                }
            }
            held
        }
    });
    let mover = tokio::spawn(async move {
        for limit in LIMITS.into_iter().cycle() {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if limit_tx.send(limit).is_err() {
                return;
            }
        }
    });
    let started = Instant::now();
    let mut seen: HashSet<Vec<u8>> = HashSet::new();
    let mut duplicates = Vec::new();
    let mut tags = HashSet::new();
    let mut i = 0u64;
    // Each sample is a `rabbitmqctl` run, slow on a loaded host: while the
    // channel has been sampled fewer than 3 times, more is published so
    // that the swaps go on under load until it has been.
    let mut total = N;
    while seen.len() < total || (sampled.load(Ordering::Acquire) < 3 && total < 4 * N) {
        if seen.len() == total {
            env.publish_to(
                &cfg,
                (total..total + 500).map(|i| format!("m{i}").into_bytes()),
            )
            .await;
            total += 500;
        }
        let d = tokio::time::timeout(Duration::from_secs(20), deliveries.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{} of {total} delivered, then nothing for 20 s; {} unacked at the broker",
                    seen.len(),
                    metrics.unacked.get()
                )
            })
            .expect("the source runs until stopped");
        if let Position::Rabbit { delivery_tag, .. } = d.position {
            assert!(
                tags.insert(delivery_tag),
                "delivery tag {delivery_tag} twice"
            );
        }
        if !seen.insert(d.body.to_vec()) {
            duplicates.push(String::from_utf8_lossy(&d.body).into_owned());
        }
        // 10–80 ms of "work" before the ack, so settlements trail intake
        // and the old consumer has deliveries in flight at every swap.
        let settle = settle_tx.clone();
        let delay = Duration::from_millis(10 + 10 * (i % 8));
        i += 1;
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = settle.send(Settlement::Done(vec![d.token]));
        });
    }
    let elapsed = started.elapsed();
    sampling.cancel();
    let held = sampler.await.expect("the sampler");
    wait_for(
        "the queue empty with nothing unacknowledged",
        Duration::from_secs(20),
        || async { ready_and_unacked(&env).await == (0, 0) },
    )
    .await;
    mover.abort();
    stop.cancel();
    drop(settle_tx);
    drop(deliveries);
    tokio::time::timeout(Duration::from_secs(15), run)
        .await
        .expect("the source stops")
        .expect("the source task")
        .expect("the source ends cleanly");
    let swaps = metrics.prefetch_swaps.get();
    println!(
        "{total} delivered once each in {:.1} s across {swaps} consumer swaps; \
         the channel held {held:?}",
        elapsed.as_secs_f64()
    );
    assert!(held.len() >= 3, "too few samples of the channel: {held:?}");
    assert!(
        held.iter().all(|&n| n <= highest),
        "the channel held more than the highest limit ({highest}): {held:?}"
    );
    assert!(duplicates.is_empty(), "delivered twice: {duplicates:?}");
    assert!(
        swaps >= 3,
        "only {swaps} consumer swaps: the test swapped too little"
    );
    env.cleanup().await;
}
