//! Shared helpers for the whole-daemon tests, by concern:
//!
//! * [`env`]: one test's private world — a fresh PostgreSQL database and
//!   RabbitMQ queue, the simulator on a loopback port;
//! * [`daemon`]: the daemon as a child process or in-process;
//! * [`broker`]: what RabbitMQ's own CLI reports (unacknowledged counts);
//! * [`crash`]: the crash loop of the redelivery-limit tests;
//! * [`faults`]: fault injection for `tests/chaos.rs` (RabbitMQ stopped,
//!   a database refusing connections, connections closed by the broker);
//! * [`kafka`]: the Kafka broker of a test (mock cluster or tansu),
//!   producing to it and reading positions from it;
//! * here: polling with deadlines and scraping the daemon's endpoints.
//!
//! Services are never skipped: a missing one fails the test and says what
//! to start. Shell-outs (`rabbitmqctl`, `psql`) and blocking client calls
//! run off the async workers (`tokio::process`, `spawn_blocking`), so a
//! slow CLI never stalls the daemon running in the same runtime.

#![allow(dead_code, unused_imports)]

pub mod broker;
pub mod crash;
pub mod daemon;
pub mod env;
pub mod faults;
pub mod kafka;
pub mod otlp;
pub mod tls;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

pub use broker::unacked;
pub use daemon::{binary, free_port, Daemon, InProcess};
pub use env::{Env, AMQP, PG_ADMIN};
pub use faults::{close_consumer_connections, PgOutage, RabbitOutage};
pub use kafka::{
    kafka_committed_and_end, kafka_daemon_config_file, kafka_produce, Backend, KafkaBroker,
};

/// The HTTP client of the helpers. Every request has a timeout: a poll
/// with a deadline only checks it between attempts, so one request that
/// never gets an answer (a port taken meanwhile by something that does not
/// speak HTTP, a daemon frozen mid-response) must not hang the test.
pub fn http() -> &'static reqwest::Client {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .expect("HTTP client")
    })
}

/// Polls `cond` until it holds or `limit` passes; panics with `what`.
pub async fn wait_for<F, Fut>(what: &str, limit: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if cond().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One metric's value from a `/metrics` scrape (sum over label sets).
pub async fn metric(addr: SocketAddr, name: &str) -> Option<f64> {
    let text = http()
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        let value: f64 = rest.rsplit(' ').next()?.parse().ok()?;
        *found.get_or_insert(0.0) += value;
    }
    found
}

/// `/readyz` of a daemon: Some(true) 200, Some(false) 503, None unreachable.
pub async fn ready(addr: SocketAddr) -> Option<bool> {
    let r = http()
        .get(format!("http://{addr}/readyz"))
        .send()
        .await
        .ok()?;
    Some(r.status().is_success())
}
