//! The states of a circuit and the series a breaker keeps up to date.

use prometheus::{IntCounter, IntGauge};
use tokio::time::Instant;

/// Where a circuit stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    Open {
        until: Instant,
    },
    HalfOpen {
        admitted: u32,
        succeeded: u32,
        failed: u32,
    },
}

impl State {
    /// The value of `conveyor_circuit_state`.
    pub fn gauge_value(&self) -> i64 {
        match self {
            State::Closed => 0,
            State::HalfOpen { .. } => 1,
            State::Open { .. } => 2,
        }
    }

    pub(super) fn name(&self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::HalfOpen { .. } => "half-open",
            State::Open { .. } => "open",
        }
    }
}

/// The series one breaker keeps up to date.
#[derive(Debug, Clone)]
pub struct BreakerMetrics {
    /// `conveyor_circuit_state{downstream}`.
    pub state: IntGauge,
    /// `conveyor_circuit_openings_total{downstream}`: closed → open only.
    pub openings: IntCounter,
}

impl BreakerMetrics {
    /// Unregistered series, for tests.
    #[cfg(test)]
    pub fn detached() -> Self {
        Self {
            state: IntGauge::new("circuit_state_test", "test").expect("gauge"),
            openings: IntCounter::new("circuit_openings_test", "test").expect("counter"),
        }
    }
}
