//! The simulator's capacity model: what an endpoint can serve at once
//! (`capacity`), how many requests may wait for it (`queue_limit`) and how
//! many it accepts per second (`rate_limit`), so flow control can be tried
//! against something that saturates like a real service.
//!
//! An arrival first meets the rate limit (an API gateway's, answered before
//! any work: 429 with `Retry-After`), then the capacity: at most `capacity`
//! requests are in service — their latency is being served — and the rest
//! wait in arrival order, so latency grows with the queue; an arrival that
//! finds `queue_limit` requests already waiting is answered 503 at once.
//! A request that is never answered (`timeout_rate`, `hang…` customers)
//! leaves service when its latency is over: a lost answer, not a stuck
//! worker. Every limit is 0 for "none" and can change at run time; in-service
//! requests finish when the capacity shrinks, and only then does the new
//! capacity hold.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::resizable::{Permit, Resizable};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::{Deserialize, Serialize};

/// Capacity and rate of one endpoint. Part of the `/knobs` document beside
/// [`super::EndpointKnobs`] (`{"charge": {"capacity": 12, …}}`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EndpointLimits {
    /// Requests served at once; 0 = unbounded.
    pub capacity: u32,
    /// Requests that may wait for service; an arrival beyond them is
    /// answered 503. 0 = unbounded.
    pub queue_limit: u32,
    /// Requests accepted per second (a token bucket holding one second's
    /// worth); beyond, 429 with `Retry-After`. 0 = unlimited.
    pub rate_limit: u32,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    pub validate: EndpointLimits,
    pub charge: EndpointLimits,
}

/// What the capacity model did at one endpoint (in `GET /ledger`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoadStats {
    /// Requests that went through service.
    pub served: u64,
    /// Answered 503 because the queue was full.
    pub overloaded: u64,
    /// Answered 429 by the rate limit.
    pub rate_limited: u64,
    /// The most requests in service at once.
    pub peak_in_service: u32,
    /// The most requests waiting at once.
    pub peak_queued: u32,
}

/// Far more than any test sends at once: "unbounded" is a capacity too, so
/// a change from or to it needs no other path.
const UNBOUNDED: u32 = 1 << 30;

/// Why an arrival was turned away.
pub(super) enum Refusal {
    /// The rate limit: retry after this long.
    RateLimited(Duration),
    /// The queue was full.
    Overloaded,
}

/// One endpoint's limits and their state.
pub(super) struct EndpointLoad {
    limits: Mutex<EndpointLimits>,
    /// `capacity` permits, resized as the knob moves (a shrink waits for
    /// the requests in service).
    slots: Resizable,
    rate: Mutex<Option<(u32, Arc<DefaultDirectRateLimiter>)>>,
    queued: AtomicU32,
    in_service: Arc<AtomicU32>,
    served: AtomicU64,
    overloaded: AtomicU64,
    rate_limited: AtomicU64,
    peak_in_service: Arc<AtomicU32>,
    peak_queued: AtomicU32,
}

/// A request in service; leaving service frees its slot.
pub(super) struct InService {
    _permit: Permit,
    in_service: Arc<AtomicU32>,
}

impl Drop for InService {
    fn drop(&mut self) {
        self.in_service.fetch_sub(1, Ordering::Relaxed);
    }
}

impl EndpointLoad {
    pub(super) fn new(limits: EndpointLimits) -> Self {
        let load = Self {
            limits: Mutex::new(EndpointLimits::default()),
            slots: Resizable::new(0),
            rate: Mutex::new(None),
            queued: AtomicU32::new(0),
            in_service: Arc::new(AtomicU32::new(0)),
            served: AtomicU64::new(0),
            overloaded: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            peak_in_service: Arc::new(AtomicU32::new(0)),
            peak_queued: AtomicU32::new(0),
        };
        load.set(limits);
        load
    }

    pub(super) fn limits(&self) -> EndpointLimits {
        self.limits.lock().map(|l| *l).unwrap_or_default()
    }

    pub(super) fn set(&self, limits: EndpointLimits) {
        if let Ok(mut l) = self.limits.lock() {
            *l = limits;
        }
        self.slots.resize(if limits.capacity == 0 {
            UNBOUNDED
        } else {
            limits.capacity
        } as usize);
        if let Ok(mut rate) = self.rate.lock() {
            let current = rate.as_ref().map(|(r, _)| *r);
            if current != Some(limits.rate_limit) {
                *rate = NonZeroU32::new(limits.rate_limit)
                    .map(|r| (r.get(), Arc::new(RateLimiter::direct(Quota::per_second(r)))));
            }
        }
    }

    /// Admits an arrival into service, waiting in the queue if every slot
    /// is taken, or says why it is turned away.
    pub(super) async fn admit(&self) -> Result<InService, Refusal> {
        let limiter = self.rate.lock().ok().and_then(|r| r.clone());
        if let Some((_, limiter)) = limiter {
            if let Err(not_until) = limiter.check() {
                self.rate_limited.fetch_add(1, Ordering::Relaxed);
                return Err(Refusal::RateLimited(
                    not_until.wait_time_from(DefaultClock::default().now()),
                ));
            }
        }
        let permit = match self.slots.try_acquire() {
            Some(p) => p,
            None => {
                let limit = self.limits().queue_limit;
                let queued = self.queued.fetch_add(1, Ordering::AcqRel) + 1;
                if limit > 0 && queued > limit {
                    self.queued.fetch_sub(1, Ordering::AcqRel);
                    self.overloaded.fetch_add(1, Ordering::Relaxed);
                    return Err(Refusal::Overloaded);
                }
                self.peak_queued.fetch_max(queued, Ordering::Relaxed);
                let acquired = self.slots.acquire().await;
                self.queued.fetch_sub(1, Ordering::AcqRel);
                // The semaphore is never closed.
                acquired.ok_or(Refusal::Overloaded)?
            }
        };
        let now = self.in_service.fetch_add(1, Ordering::AcqRel) + 1;
        self.peak_in_service.fetch_max(now, Ordering::Relaxed);
        self.served.fetch_add(1, Ordering::Relaxed);
        Ok(InService {
            _permit: permit,
            in_service: self.in_service.clone(),
        })
    }

    pub(super) fn stats(&self) -> LoadStats {
        LoadStats {
            served: self.served.load(Ordering::Relaxed),
            overloaded: self.overloaded.load(Ordering::Relaxed),
            rate_limited: self.rate_limited.load(Ordering::Relaxed),
            peak_in_service: self.peak_in_service.load(Ordering::Relaxed),
            peak_queued: self.peak_queued.load(Ordering::Relaxed),
        }
    }
}

/// RFC 7396 JSON merge patch: objects merge key by key, `null` removes a
/// key (back to its default), anything else replaces.
pub(super) fn merge_patch(target: &mut serde_json::Value, patch: serde_json::Value) {
    use serde_json::Value;
    let Value::Object(patch) = patch else {
        *target = patch;
        return;
    };
    if !target.is_object() {
        *target = Value::Object(serde_json::Map::new());
    }
    if let Value::Object(t) = target {
        for (k, v) in patch {
            if v.is_null() {
                t.remove(&k);
            } else {
                merge_patch(t.entry(k).or_insert(Value::Null), v);
            }
        }
    }
}

/// The `/knobs` document: the faults and the limits of each endpoint in
/// one object per endpoint.
pub(super) fn document(knobs: &super::Knobs, limits: &Limits) -> serde_json::Value {
    let mut doc = serde_json::to_value(knobs).unwrap_or_default();
    merge_patch(&mut doc, serde_json::to_value(limits).unwrap_or_default());
    doc
}

/// Splits a `/knobs` document back into faults and limits.
pub(super) fn split(
    mut doc: serde_json::Value,
) -> Result<(super::Knobs, Limits), serde_json::Error> {
    let limit_keys = match serde_json::to_value(EndpointLimits::default()) {
        Ok(serde_json::Value::Object(m)) => m.keys().cloned().collect::<Vec<_>>(),
        _ => vec![],
    };
    let mut limits = serde_json::Map::new();
    if let serde_json::Value::Object(top) = &mut doc {
        for endpoint in ["validate", "charge"] {
            if let Some(serde_json::Value::Object(e)) = top.get_mut(endpoint) {
                let mut own = serde_json::Map::new();
                for k in &limit_keys {
                    if let Some(v) = e.remove(k) {
                        own.insert(k.clone(), v);
                    }
                }
                limits.insert(endpoint.to_string(), serde_json::Value::Object(own));
            }
        }
    }
    let knobs = serde_json::from_value(doc)?;
    let limits = serde_json::from_value(serde_json::Value::Object(limits))?;
    Ok((knobs, limits))
}

/// The capacity model's flags of `conveyor simulate`, the same limits at
/// both endpoints (each endpoint has its own queue and rate).
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub struct LimitArgs {
    /// Requests each endpoint serves at once; beyond, they queue [0: unbounded].
    #[arg(long, default_value_t = 0)]
    pub capacity: u32,
    /// Requests that may queue at each endpoint; beyond, 503 [0: unbounded].
    #[arg(long, default_value_t = 0)]
    pub queue_limit: u32,
    /// Requests per second each endpoint accepts; beyond, 429 with Retry-After [0: unlimited].
    #[arg(long, default_value_t = 0)]
    pub rate_limit: u32,
}

impl From<LimitArgs> for Limits {
    fn from(a: LimitArgs) -> Self {
        let e = EndpointLimits {
            capacity: a.capacity,
            queue_limit: a.queue_limit,
            rate_limit: a.rate_limit,
        };
        Limits {
            validate: e,
            charge: e,
        }
    }
}
