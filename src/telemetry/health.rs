//! Readiness: the flags each component owns (broker connected, database
//! reachable, draining) and the checks registered by others (a circuit
//! breaker open too long), combined into the verdict of `/readyz`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Something that can make the daemon unready on its own terms, asked each
/// time readiness is computed (a circuit breaker open for too long: its
/// verdict changes with the passing of time, not only on events).
pub trait ReadinessCheck: Send + Sync + std::fmt::Debug {
    /// Why the daemon is not ready, or `None` when this check is fine.
    fn not_ready(&self) -> Option<String>;
}

/// What `/readyz` is made of. Each flag is owned by the component it names.
#[derive(Debug, Default)]
pub struct Health {
    pub broker_connected: AtomicBool,
    pub database_ok: AtomicBool,
    pub draining: AtomicBool,
    /// Registered by the stages: their downstreams' circuit breakers.
    checks: Mutex<Vec<Arc<dyn ReadinessCheck>>>,
}

impl Health {
    pub fn ready(&self) -> bool {
        self.broker_connected.load(Ordering::Relaxed)
            && self.database_ok.load(Ordering::Relaxed)
            && !self.draining.load(Ordering::Relaxed)
            && self.check_failures().is_empty()
    }

    /// Adds a check that readiness consults from now on.
    pub fn watch(&self, check: Arc<dyn ReadinessCheck>) {
        if let Ok(mut checks) = self.checks.lock() {
            checks.push(check);
        }
    }

    /// The reasons given by the registered checks that fail right now.
    pub fn check_failures(&self) -> Vec<String> {
        self.checks
            .lock()
            .map(|checks| checks.iter().filter_map(|c| c.not_ready()).collect())
            .unwrap_or_default()
    }

    pub fn set(flag: &AtomicBool, value: bool) {
        flag.store(value, Ordering::Relaxed);
    }
}
