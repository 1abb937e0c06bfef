//! Money safety on odd input, end to end: real RabbitMQ, real PostgreSQL,
//! the simulator over real sockets, the daemon in-process.
//!
//! One mixed run feeds every class of input a real producer can emit — ids
//! that differ only by surrounding spaces, case or Unicode form, ids with
//! `%` and non-ASCII letters, unknown fields the database cannot hold,
//! legal text that looks like an escape, the same order sent again, another
//! order reusing a stored id, two orders with one id in flight together —
//! with the broker forced to redeliver in the middle. Then it checks the
//! books: every ledger charge belongs to exactly one stored row of the same
//! order and parameters, and nothing was charged twice or for nothing.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{close_consumer_connections, metric, wait_for, Env, InProcess};
use conveyor::tools::produce::{Mix, OrderGen};
use conveyor::tools::sim::Knobs;

/// An order body with `id`, `customer`, one item worth `amount` and `extra`
/// spliced in as more top-level fields (raw JSON text, may be empty).
fn order(id: &str, customer: &str, amount: i64, extra: &str) -> Vec<u8> {
    let id = serde_json::to_string(id).expect("id");
    let customer = serde_json::to_string(customer).expect("customer");
    let extra = if extra.is_empty() {
        String::new()
    } else {
        format!(",{extra}")
    };
    format!(
        r#"{{"order_id":{id},"customer_id":{customer},"currency":"EUR","amount_cents":{amount},"items":[{{"sku":"S-1","qty":1,"unit_price_cents":{amount}}}],"created_at":"2026-12-01T10:00:00Z"{extra}}}"#
    )
    .into_bytes()
}

/// Ids that must each be stored and charged on their own: no two may share
/// an idempotency key.
const DISTINCT_IDS: &[&str] = &[
    "A-1",
    " A-1",
    "A-1 ",
    "  A-1  ",
    "a-1",
    "Ä-1",
    "ä-1",
    "A\u{308}-1",
    "注文-1",
    "😀-1",
    "A%201",
    "A 1",
    "%",
    "%25",
    "A\u{a0}1",
    "A\u{2028}1",
];

/// Order bodies that are poison, with the reason each must be dead-lettered
/// with (the store could not hold them, or the id cannot be a key).
fn poison() -> Vec<(Vec<u8>, &'static str)> {
    vec![
        (
            order("P-1", "c", 100, r#""note":"\ud800""#),
            "lone surrogate",
        ),
        (
            order("P-2", "c", 100, r#""note":"x\udc00y""#),
            "lone surrogate",
        ),
        (order("P-3", "c", 100, r#""n":1e200000"#), "beyond numeric"),
        (
            order("P-4", "c", 100, r#""note":"a\u0000b""#),
            "escaped NUL",
        ),
        (order("   ", "c", 100, ""), "blank id"),
        (order("\u{3000}", "c", 100, ""), "blank id"),
    ]
}

/// Valid orders whose unknown fields are legal but unusual.
fn odd_but_valid() -> Vec<Vec<u8>> {
    vec![
        // A backslash followed by `u0000`: ordinary text.
        order("V-1", "c", 100, r#""note":"\\u0000""#),
        order("V-2", "c", 100, r#""n":1e400,"m":-0.000000000000000000001"#),
        order(
            "V-3",
            "c",
            100,
            r#""n":123456789012345678901234567890.123456789"#,
        ),
        order("V-4", "c", 100, r#""dup":1,"dup":2"#),
        order("V-5", "c", 100, r#""pair":"\ud83d\ude00","ls":"\u2028""#),
        order(
            "V-6",
            "c",
            100,
            r#""deep":{"a":[{"b":[{"c":[1,2,{"d":null}]}]}]}"#,
        ),
    ]
}

async fn acked(addr: std::net::SocketAddr) -> f64 {
    metric(addr, "conveyor_messages_acked_total")
        .await
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_run_charges_each_stored_order_once_and_nothing_else() {
    let env = Env::new("money", Knobs::default()).await;
    let gen = OrderGen::new(
        env.name.clone(),
        Mix {
            poison_pct: 0.0,
            reject_pct: 3.0,
            decline_pct: 3.0,
        },
    );
    let plain = 2_000u64;

    // Phase 1: plain orders, the distinct ids, the odd ones and the poison,
    // with the consumer's connection closed midway so that the broker
    // redelivers what was in flight.
    let mut phase1: Vec<Vec<u8>> = (0..plain).map(|i| gen.message(i).1).collect();
    for (i, id) in DISTINCT_IDS.iter().enumerate() {
        phase1.push(order(id, &format!("cust-{i}"), 100 + i as i64, ""));
    }
    phase1.extend(odd_but_valid());
    let poison = poison();
    phase1.extend(poison.iter().map(|(b, _)| b.clone()));
    // The stored contents of C-1 and C-2 that phase 2 conflicts with.
    phase1.push(order("C-1", "alice", 500, ""));
    phase1.push(order("C-2", "bob", 700, r#""channel":"web""#));
    let published1 = env.publish(phase1.clone()).await;

    let daemon = InProcess::start(env.config()).await;
    let addr = daemon.addr;
    wait_for("some orders acked", Duration::from_secs(60), || async {
        acked(addr).await >= 300.0
    })
    .await;
    let closed = close_consumer_connections(&env.queue).await;
    assert!(closed > 0, "no consumer connection to close");
    wait_for("phase 1 acked", Duration::from_secs(120), || async {
        acked(addr).await >= published1 as f64
    })
    .await;

    // Phase 2: everything again (a producer's resend: same contents, no-op),
    // and two orders reusing stored ids with other contents: C-1 with another
    // customer and amount, C-2 with the same charge parameters but other
    // contents (which a provider would answer with the first charge).
    let mut phase2 = phase1.clone();
    phase2.push(order("C-1", "mallory", 900, ""));
    phase2.push(order("C-2", "bob", 700, r#""channel":"phone""#));
    let published2 = env.publish(phase2).await;
    wait_for("phase 2 acked", Duration::from_secs(120), || async {
        acked(addr).await >= (published1 + published2) as f64
    })
    .await;

    // Phase 3: two orders with one id, published back to back so that both
    // are in flight at once: one is stored, the other refused, never both
    // charged and never one charge for two.
    let published3 = env
        .publish(vec![
            order("D-1", "carol", 300, ""),
            order("D-1", "dave", 400, ""),
        ])
        .await;
    let total = published1 + published2 + published3;
    wait_for("phase 3 acked", Duration::from_secs(60), || async {
        acked(addr).await >= total as f64
    })
    .await;
    let report = daemon.stop().await;
    assert!(report.drained, "{report:?}");

    // The books.
    let charges = env.check_ledger().await;
    let ledger = env.sim.ledger();
    let rows: Vec<(String, String, i64, Option<String>)> =
        sqlx::query_as("SELECT order_id, customer_id, amount_cents, charge_id FROM orders")
            .fetch_all(&env.pool)
            .await
            .expect("rows");
    let rows: HashMap<String, (String, i64, Option<String>)> = rows
        .into_iter()
        .map(|(id, c, a, ch)| (id, (c, a, ch)))
        .collect();
    for entry in &ledger.charges {
        let (customer, amount, charge_id) = rows
            .get(&entry.order_id)
            .unwrap_or_else(|| panic!("charge {} has no stored order", entry.order_id));
        assert_eq!(
            charge_id.as_ref(),
            Some(&entry.charge_id),
            "{}",
            entry.order_id
        );
        assert_eq!(
            (customer, *amount),
            (&entry.customer_id, entry.amount_cents),
            "{}: the stored order is not the one charged",
            entry.order_id
        );
    }
    let charge_ids: std::collections::HashSet<&str> = ledger
        .charges
        .iter()
        .map(|e| e.charge_id.as_str())
        .collect();
    assert_eq!(
        charge_ids.len(),
        ledger.charges.len(),
        "one charge for two orders"
    );
    for id in DISTINCT_IDS {
        assert!(rows.contains_key(*id), "{id:?} not stored");
    }
    for (id, customer, amount) in [("C-1", "alice", 500), ("C-2", "bob", 700)] {
        assert_eq!(rows[id].0, customer, "{id} was overwritten");
        assert_eq!(rows[id].1, amount, "{id} was overwritten");
    }
    assert!(rows.contains_key("D-1"));
    for id in ["V-1", "V-2", "V-3", "V-4", "V-5", "V-6"] {
        assert!(rows.contains_key(id), "valid order {id} refused");
    }

    // The dead letters: the poison with its reasons, the conflicts with
    // both digests, the second D-1 one way or the other.
    let dead = env.drain_dlq().await;
    let by_reason = |reason: &str| {
        dead.iter()
            .filter(|(h, _)| h.get("x-conveyor-reason").map(String::as_str) == Some(reason))
            .collect::<Vec<_>>()
    };
    let conflicts = by_reason("conflicting_duplicate");
    let conflict_ids: Vec<&str> = conflicts
        .iter()
        .filter_map(|(h, _)| h.get("x-conveyor-order-id").map(String::as_str))
        .collect();
    assert!(conflict_ids.contains(&"C-1"), "{conflict_ids:?}");
    assert!(conflict_ids.contains(&"C-2"), "{conflict_ids:?}");
    for (h, _) in &conflicts {
        let ours = h.get("x-conveyor-payload-digest").expect("digest header");
        let theirs = h
            .get("x-conveyor-stored-digest")
            .expect("stored digest header");
        assert_eq!(ours.len(), 64);
        assert_ne!(ours, theirs);
    }
    let d1_refused = dead
        .iter()
        .filter(|(h, _)| h.get("x-conveyor-order-id").map(String::as_str) == Some("D-1"))
        .count();
    assert_eq!(d1_refused, 1, "exactly one D-1 must be refused");
    let poison_dead = dead
        .iter()
        .filter(|(h, _)| h.get("x-conveyor-stage").map(String::as_str) == Some("decode"))
        .filter(|(h, _)| {
            h.get("x-conveyor-reason").map(String::as_str) != Some("conflicting_duplicate")
        })
        .count();
    // Each poison message was published twice (phases 1 and 2).
    assert_eq!(poison_dead, 2 * poison.len(), "{dead:?}");
    for (body, why) in &poison {
        assert!(
            dead.iter().any(|(_, b)| b == body),
            "poison ({why}) not dead-lettered with its original bytes"
        );
    }
    let unique_orders = rows.len();
    println!(
        "money run: published {total}, stored {unique_orders}, dead letters {}, \
         ledger charges {charges}, conflicts {}, idempotency 409s {}, double-charged {}",
        dead.len(),
        conflicts.len(),
        ledger.idempotency_conflicts,
        ledger.double_charged_orders
    );
    env.cleanup().await;
}
