//! The memory bound with large messages: what the daemon holds is at most
//! `source.prefetch` messages, each kept twice while in flight (the bytes as
//! received, for the rule engine and a dead letter, and the canonical
//! payload the store gets) beside the transient copies of receiving,
//! decoding, the HTTP exchange and the batch commit; measured here, peak RSS
//! grows by 5–6 message sizes per prefetch permit over its idle size,
//! whatever the backlog. `source.max_message_bytes` caps the size of an accepted order; a
//! larger message is dead-lettered as soon as it arrives, but it was already
//! delivered: the broker's own maximum message size (RabbitMQ's
//! `max_message_size`, Kafka's `message.max.bytes`) is what caps those.
//!
//! Real RabbitMQ and PostgreSQL, the daemon as a child process, a slow
//! payment provider so that every window stays full while it is measured.

mod common;

use std::time::Duration;

use common::{metric, Daemon, Env};
use conveyor::tools::sim::{EndpointKnobs, Knobs};
use nix::sys::signal::Signal;

const MIB: u64 = 1024 * 1024;
/// Each message: a valid order carrying this much in an unknown field.
const MESSAGE_MIB: u64 = 4;

fn large_order(i: u64) -> Vec<u8> {
    let filler = "x".repeat((MESSAGE_MIB * MIB) as usize - 400);
    format!(
        r#"{{"order_id":"big-{i}","customer_id":"c-{i}","currency":"EUR","amount_cents":100,"items":[{{"sku":"S","qty":1,"unit_price_cents":100}}],"created_at":"2026-12-01T10:00:00Z","attachment":"{filler}"}}"#
    )
    .into_bytes()
}

/// Peak RSS growth (MiB) of a daemon at `prefetch` while its window is full
/// of large orders, and the number of orders it held at once.
async fn peak_growth(prefetch: u64) -> (f64, f64) {
    let env = Env::new(
        "bigmsg",
        Knobs {
            charge: EndpointKnobs {
                latency_ms: 1500,
                ..Default::default()
            },
            ..Knobs::default()
        },
    )
    .await;
    let mut daemon = Daemon::start(
        &env,
        &[
            ("CONVEYOR__SOURCE__PREFETCH", prefetch.to_string().as_str()),
            (
                "CONVEYOR__SOURCE__MAX_MESSAGE_BYTES",
                (8 * MIB).to_string().as_str(),
            ),
            ("CONVEYOR__PAYMENT__TIMEOUT", "10s"),
        ],
    )
    .await;
    let (idle_kib, _) = daemon.rss_kib();
    let total = 3 * prefetch;
    env.publish((0..total).map(large_order)).await;
    // Each order is a 4 MiB JSON document parsed by the daemon and the
    // (debug-built, in-process) simulator: on a loaded two-core host the
    // prefetch-12 round took over 120 s, so the bound is generous and a
    // failure says how far it got.
    let mut held_max = 0.0f64;
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    loop {
        let held = metric(daemon.http, "conveyor_unacked_messages")
            .await
            .unwrap_or(0.0);
        held_max = held_max.max(held);
        let acked = metric(daemon.http, "conveyor_messages_acked_total")
            .await
            .unwrap_or(0.0);
        if acked >= total as f64 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "prefetch {prefetch}: {acked} of {total} large orders acked after 300 s, \
             {held} held; log:\n{}",
            daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, peak_kib) = daemon.rss_kib();
    daemon.signal(Signal::SIGTERM);
    let (code, _) = daemon.wait(Duration::from_secs(20)).await;
    assert_eq!(code, Some(0), "log:\n{}", daemon.log_text());
    assert_eq!(env.rows().await, total as i64);
    env.cleanup().await;
    (peak_kib.saturating_sub(idle_kib) as f64 / 1024.0, held_max)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peak_memory_follows_prefetch_times_message_size() {
    let mut seen = Vec::new();
    for prefetch in [4u64, 12] {
        let (growth_mib, held) = peak_growth(prefetch).await;
        println!(
            "prefetch {prefetch} x {MESSAGE_MIB} MiB: peak RSS +{growth_mib:.0} MiB \
             ({:.1} x the held bytes), held at most {held}",
            growth_mib / (prefetch * MESSAGE_MIB) as f64
        );
        assert!(held <= prefetch as f64, "held {held} > prefetch {prefetch}");
        seen.push((prefetch, growth_mib));
    }
    for (prefetch, growth_mib) in seen {
        // The bytes as received and the canonical payload per held order,
        // plus the transient copies of decode, the HTTP exchange and one
        // batch's commit: at most 6 message sizes per permit.
        let bound = (BYTES_PER_PERMIT * prefetch * MESSAGE_MIB) as f64 + 32.0;
        assert!(
            growth_mib <= bound,
            "peak RSS grew {growth_mib:.0} MiB at prefetch {prefetch}, above {bound:.0} MiB"
        );
    }
}

/// The documented bound: peak RSS over idle ≤ this many message sizes per
/// prefetch permit (README, "Bounded memory").
const BYTES_PER_PERMIT: u64 = 6;
