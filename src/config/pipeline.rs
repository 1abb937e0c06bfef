//! The flow between intake and the store: stage concurrency, batching of
//! commits, and the drain on shutdown.

use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineConfig {
    /// Orders validated concurrently (rule-engine calls in flight).
    pub validate_concurrency: usize,
    /// Orders charged concurrently (payment calls in flight).
    pub charge_concurrency: usize,
    /// Capacity of the channels joining the stages. Small on purpose: the
    /// prefetch limit, not these, is what holds work.
    pub channel_capacity: usize,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            validate_concurrency: 64,
            charge_concurrency: 64,
            channel_capacity: 64,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchConfig {
    /// A batch is committed when it holds this many orders…
    pub max_size: usize,
    /// …or when its first order has waited this long, whichever comes first.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// Batches committed concurrently, each in its own transaction.
    pub writers: usize,
    /// Backoff between attempts of a batch whose commit failed transiently.
    #[serde(with = "humantime_serde")]
    pub retry_initial_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_max_interval: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_size: 256,
            max_wait: Duration::from_millis(20),
            writers: 2,
            retry_initial_interval: Duration::from_millis(100),
            retry_max_interval: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// Time from SIGTERM to exit. In-flight orders finish and their batches
    /// commit within it; what is unfinished then is left unacked and the
    /// broker redelivers it. Keep systemd's `TimeoutStopSec` and Kubernetes'
    /// `terminationGracePeriodSeconds` above it.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            drain_timeout: Duration::from_secs(20),
        }
    }
}
