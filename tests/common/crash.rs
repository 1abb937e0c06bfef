//! The crash loop of `tests/redelivery_limit.rs` and
//! `tests/kafka_redelivery_limit.rs`: one order whose charge never answers
//! (the simulator hangs on customers named `hang…`) among good ones, and a
//! daemon killed with SIGKILL while it waits on that charge, again and
//! again.

use std::time::Duration;

use nix::sys::signal::Signal;

use super::{wait_for, Daemon, Env};

/// Where the good orders are when the daemon is killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Neighbours {
    /// Stored by the first run; on Kafka seen again after each kill.
    Stored,
    /// Charged and waiting for their batch beside the hung one at the
    /// first kill: killed with it.
    InFlight,
}

impl Neighbours {
    /// `batch.max_wait` for the scenario: long enough, for `InFlight`, that
    /// the neighbours are charged and still in flight when the hung charge
    /// is seen and the kill comes.
    pub fn batch_wait(self) -> &'static str {
        match self {
            Neighbours::Stored => "20ms",
            Neighbours::InFlight => "2s",
        }
    }
}

/// An order of 12.00 EUR by `customer`.
pub fn order(id: &str, customer: &str) -> Vec<u8> {
    serde_json::json!({
        "order_id": id,
        "customer_id": customer,
        "currency": "EUR",
        "amount_cents": 1200,
        "items": [{"sku": "A-1", "qty": 2, "unit_price_cents": 600}],
        "created_at": "2026-11-22T10:00:00Z",
    })
    .to_string()
    .into_bytes()
}

/// Charge requests the simulator has seen for `order_id`.
pub fn charge_requests(env: &Env, order_id: &str) -> u64 {
    env.sim
        .ledger()
        .charges
        .iter()
        .find(|c| c.order_id == order_id)
        .map_or(0, |c| c.requests)
}

/// Starts the daemon `kills` times with `vars` and kills each run with
/// SIGKILL once the hung order's charge has been requested once more and
/// the `good` other orders are where `neighbours` says.
pub async fn kill_while_hung(
    env: &Env,
    vars: &[(&str, &str)],
    hung_id: &str,
    good: i64,
    kills: u32,
    neighbours: Neighbours,
) {
    let stored = neighbours == Neighbours::Stored;
    let all_charged = || env.sim.ledger().charges.len() == 1 + good as usize;
    for delivery in 1..=kills {
        let mut daemon = Daemon::start(env, vars).await;
        wait_for(
            "the good orders where wanted and the hung charge requested",
            Duration::from_secs(60),
            || async {
                let placed = if stored {
                    env.rows().await == good
                } else {
                    delivery > 1 || all_charged()
                };
                placed && charge_requests(env, hung_id) >= u64::from(delivery)
            },
        )
        .await;
        if !stored && delivery == 1 {
            assert_eq!(env.rows().await, 0, "the neighbours were still in flight");
        }
        daemon.signal(Signal::SIGKILL);
        daemon.wait(Duration::from_secs(10)).await;
    }
}
