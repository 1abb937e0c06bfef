//! `conveyor ingest`, the HTTP intake that publishes orders to the broker.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `conveyor ingest`, the HTTP intake in front of the broker. Its memory is
/// bounded by `max_concurrent_requests × max_body_bytes` (plus a small
/// constant per request), whatever the number of clients.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestConfig {
    /// Address of the API and of its own `/metrics`, `/healthz`, `/readyz`.
    pub listen: SocketAddr,
    /// Most orders in one `POST /orders/batch` (1..=100000).
    pub max_batch: usize,
    /// Largest request body accepted; a larger one is answered 413.
    pub max_body_bytes: usize,
    /// How long a batch may wait for its publisher confirms (or Kafka
    /// acknowledgements) before the request is answered 503.
    #[serde(with = "humantime_serde")]
    pub publish_timeout: Duration,
    /// Requests handled at once; one more is answered 429 at once.
    pub max_concurrent_requests: usize,
    /// Unconfirmed publishes per request at most.
    pub publish_window: usize,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            max_batch: 5000,
            max_body_bytes: 16 * 1024 * 1024,
            publish_timeout: Duration::from_secs(10),
            max_concurrent_requests: 16,
            publish_window: 1000,
        }
    }
}
