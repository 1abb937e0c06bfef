//! Quorum queues and crash-loop containment on RabbitMQ, against the local
//! broker (quorum queues work on a single node):
//!
//! * a quorum queue is declared with its type, the broker's delivery limit
//!   and the dead-letter exchange, so that the broker's own limit
//!   dead-letters a message instead of dropping it;
//! * a message that keeps killing the daemon — its charge never answers
//!   (the simulator hangs on customers named `hang…`) and the daemon is
//!   killed with SIGKILL while it waits, again and again — is dead-lettered
//!   as `redelivery_limit` once it has been delivered more than
//!   `source.max_deliveries` times, counted by the broker on a quorum queue
//!   and by the store on a classic one; the rest of the queue drains and
//!   the order is charged once whatever the number of deliveries;
//! * the orders that were in flight beside it at a kill (charged, waiting
//!   for their batch) are not dead-lettered with it: a last chance is worked
//!   on alone, and on a quorum queue, whose broker counts every message the
//!   daemon held, only a message that died alone is convicted.

mod common;

use std::time::Duration;

use common::crash::{kill_while_hung, order, Neighbours};
use common::{unacked, wait_for, Daemon, Env};
use conveyor::config::{QueueType, RabbitConfig};
use conveyor::tools::sim::Knobs;
use lapin::options::{BasicGetOptions, BasicRejectOptions};
use nix::sys::signal::Signal;

fn rabbit(env: &Env, queue_type: QueueType) -> RabbitConfig {
    RabbitConfig {
        queue_type,
        ..env.rabbit()
    }
}

fn queue_type_env(queue_type: QueueType) -> &'static str {
    match queue_type {
        QueueType::Classic => "classic",
        QueueType::Quorum => "quorum",
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_queue_is_declared_with_its_limit_and_the_broker_dead_letters_past_it() {
    let env = Env::new("quorumdecl", Knobs::default()).await;
    let cfg = RabbitConfig {
        delivery_limit: 2,
        ..rabbit(&env, QueueType::Quorum)
    };
    let conn = conveyor::tools::produce::connect_rabbit(&cfg)
        .await
        .expect("declare the quorum topology");
    let listed = common::broker::rabbitmqctl(&[
        "list_queues",
        "-q",
        "--no-table-headers",
        "name",
        "type",
        "arguments",
    ])
    .await
    .expect("list queues");
    let line = listed
        .lines()
        .find(|l| l.split_whitespace().next() == Some(env.queue.as_str()))
        .unwrap_or_else(|| panic!("{} not listed: {listed}", env.queue));
    assert!(line.contains("quorum"), "{line}");
    assert!(line.contains("x-delivery-limit"), "{line}");
    assert!(line.contains("x-dead-letter-exchange"), "{line}");

    // Declaring again (a restart, a second replica) accepts the queue as it is.
    conveyor::tools::produce::connect_rabbit(&cfg)
        .await
        .expect("an existing quorum queue is accepted");
    // A classic declaration of the same queue is refused, naming the key.
    let err = conveyor::tools::produce::connect_rabbit(&rabbit(&env, QueueType::Classic))
        .await
        .expect_err("a classic declare of a quorum queue fails");
    assert!(
        format!("{err:#}").contains("rabbitmq.queue_type"),
        "the error names the key: {err:#}"
    );

    // Returned three times with a limit of two: the broker dead-letters it.
    env.publish_to(&cfg, [order("q-1", "c-1")]).await;
    let ch = conn.create_channel().await.expect("channel");
    for returned in 0..3u32 {
        let got = ch
            .basic_get(env.queue.as_str().into(), BasicGetOptions::default())
            .await
            .expect("basic.get")
            .unwrap_or_else(|| panic!("message gone after {returned} returns"));
        let count = got
            .delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("x-delivery-count").cloned());
        if returned > 0 {
            assert!(count.is_some(), "a returned message carries its count");
        }
        got.delivery
            .acker
            .reject(BasicRejectOptions { requeue: true })
            .await
            .expect("reject with requeue");
    }
    wait_for(
        "the broker to dead-letter past the limit",
        Duration::from_secs(10),
        || async { env.ready(&format!("{}.dlq", env.queue)).await == 1 },
    )
    .await;
    assert_eq!(env.ready(&env.queue).await, 0);
    conn.close(200, "done".into()).await.ok();
    env.cleanup().await;
}

/// One hanging order among good ones; the daemon is killed while it waits
/// on that order's charge, `max` times. The next start dead-letters it
/// before any work, and only it.
async fn crash_loop_is_contained(queue_type: QueueType, neighbours: Neighbours) {
    let (good, max): (i64, u32) = match neighbours {
        Neighbours::Stored => (30, 3),
        Neighbours::InFlight => (4, 2),
    };
    let stored = neighbours == Neighbours::Stored;
    let env = Env::new(
        &format!(
            "crash{}{}",
            queue_type_env(queue_type),
            if stored { "" } else { "near" }
        ),
        Knobs::default(),
    )
    .await;
    let cfg = rabbit(&env, queue_type);
    let hung_id = format!("{}-hang", env.name);
    let mut bodies = vec![order(&hung_id, "hang-forever")];
    bodies.extend((0..good).map(|i| order(&format!("{}-{i}", env.name), "c-7")));
    env.publish_to(&cfg, bodies).await;

    let max_text = max.to_string();
    let extra = [
        ("CONVEYOR__RABBITMQ__QUEUE_TYPE", queue_type_env(queue_type)),
        ("CONVEYOR__SOURCE__MAX_DELIVERIES", max_text.as_str()),
        // The hung charge outlives every run: only the kill ends it.
        ("CONVEYOR__PAYMENT__TIMEOUT", "120s"),
        ("CONVEYOR__BATCH__MAX_WAIT", neighbours.batch_wait()),
    ];
    kill_while_hung(&env, &extra, &hung_id, good, max, neighbours).await;
    let mut daemon = Daemon::start(&env, &extra).await;
    wait_for(
        "the crashing message in the dead-letter queue",
        Duration::from_secs(30),
        || async { env.ready(&format!("{}.dlq", env.queue)).await == 1 },
    )
    .await;
    wait_for(
        "the queue empty and acked",
        Duration::from_secs(40),
        || async { env.ready(&env.queue).await == 0 && unacked(&env.queue).await == 0 },
    )
    .await;
    daemon.signal(Signal::SIGTERM);
    let (code, _) = daemon.wait(Duration::from_secs(20)).await;
    assert_eq!(code, Some(0), "drained; log:\n{}", daemon.log_text());

    let dead = env.drain_dlq().await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    let (headers, body) = &dead[0];
    assert_eq!(
        headers.get("x-conveyor-reason").map(String::as_str),
        Some("redelivery_limit"),
        "{headers:?}"
    );
    assert_eq!(
        headers.get("x-conveyor-deliveries").map(String::as_str),
        Some((max + 1).to_string().as_str()),
        "{headers:?}"
    );
    assert_eq!(body, &order(&hung_id, "hang-forever"));
    assert_eq!(env.rows().await, good, "every good order stored once");
    let ledger = env.sim.ledger();
    assert_eq!(
        ledger.double_charged_orders, 0,
        "an order was charged twice"
    );
    let hung: Vec<_> = ledger
        .charges
        .iter()
        .filter(|c| c.order_id == hung_id)
        .collect();
    assert_eq!(hung.len(), 1, "one charge for the hung order: {hung:?}");
    assert_eq!(
        hung[0].requests,
        u64::from(max),
        "charged on each of the {max} deliveries that got that far, never after"
    );
    println!(
        "crash loop {queue_type:?}: {max} kills, then dead-lettered on delivery {}; {good} stored",
        max + 1
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_keeps_killing_the_daemon_is_dead_lettered_on_a_quorum_queue() {
    crash_loop_is_contained(QueueType::Quorum, Neighbours::Stored).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_keeps_killing_the_daemon_is_dead_lettered_on_a_classic_queue() {
    crash_loop_is_contained(QueueType::Classic, Neighbours::Stored).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_orders_killed_beside_it_are_not_dead_lettered_with_it_on_a_classic_queue() {
    crash_loop_is_contained(QueueType::Classic, Neighbours::InFlight).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_orders_killed_beside_it_are_not_dead_lettered_with_it_on_a_quorum_queue() {
    crash_loop_is_contained(QueueType::Quorum, Neighbours::InFlight).await;
}
