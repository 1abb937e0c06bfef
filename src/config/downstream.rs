//! One downstream (the rule engine, the payment provider): its URL and
//! timeout, and how calls to it are retried, broken, budgeted and limited.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::secret::{redact_url, serialize_redacted_url};

#[derive(Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DownstreamConfig {
    /// Base URL, `http[s]://HOST[:PORT][/PATH]`; the rule engine answers
    /// `POST /validate`, the payment provider `POST /charges`. Userinfo
    /// (`https://user:password@host`) is sent as basic auth and its password
    /// redacted wherever the URL is shown.
    #[serde(serialize_with = "serialize_redacted_url")]
    pub url: String,
    /// Timeout of one attempt, connect included.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Idle keep-alive connections kept per host.
    pub pool_max_idle: usize,
    pub retry: RetryConfig,
    pub breaker: BreakerConfig,
    pub rate_limit: RateLimitConfig,
    pub retry_budget: RetryBudgetConfig,
    pub concurrency: crate::downstream::concurrency::ConcurrencyConfig,
}

/// How much retries may add to a downstream's load: over the last `window`,
/// at most `ratio` retries per first attempt, plus `min_per_second` (so a
/// quiet downstream can still retry). A retry over budget waits for room —
/// backpressure, never a dead letter. Off by default: the breaker already
/// stops an outage; the budget is for a downstream failing in part under a
/// load that retries would make worse.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryBudgetConfig {
    pub enabled: bool,
    pub ratio: f32,
    pub min_per_second: u32,
    #[serde(with = "humantime_serde")]
    pub window: Duration,
}

impl Default for RetryBudgetConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            ratio: 0.2,
            min_per_second: 10,
            window: Duration::from_secs(10),
        }
    }
}

/// Most calls per second to one downstream, retries included (0: no
/// limit), and how many may go at once after a quiet spell (0: as many as
/// `per_second`). Set it a little under the provider's published limit.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitConfig {
    pub per_second: u32,
    pub burst: u32,
}

impl Default for DownstreamConfig {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8080".into(),
            timeout: Duration::from_secs(2),
            pool_max_idle: 128,
            retry: RetryConfig::default(),
            breaker: BreakerConfig::default(),
            rate_limit: RateLimitConfig::default(),
            retry_budget: RetryBudgetConfig::default(),
            concurrency: Default::default(),
        }
    }
}

impl fmt::Debug for DownstreamConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Destructured so that a new field cannot be left out unseen.
        let Self {
            url,
            timeout,
            pool_max_idle,
            retry,
            breaker,
            rate_limit,
            retry_budget,
            concurrency,
        } = self;
        f.debug_struct("DownstreamConfig")
            .field("url", &redact_url(url))
            .field("timeout", timeout)
            .field("pool_max_idle", pool_max_idle)
            .field("retry", retry)
            .field("breaker", breaker)
            .field("rate_limit", rate_limit)
            .field("retry_budget", retry_budget)
            .field("concurrency", concurrency)
            .finish()
    }
}

/// Circuit breaker of one downstream, for outages rather than partial
/// failures. It opens when some recent stretch of the last `window` — back
/// to a bucket boundary, `window`/40 wide — holds at least `min_calls` calls
/// and fails transiently (timeout, connect error, 5xx, 429) at
/// `failure_rate` or more, an order's retries weighing a quarter of its
/// first attempt; a 4xx answer is the downstream working and counts as a
/// success. While open, the stage takes no new orders and in-flight orders
/// wait (intake pauses through the backpressure chain instead of
/// dead-lettering the backlog). After `open_for` it turns half-open and lets
/// `half_open_probes` calls through: `half_open_successes` of them
/// succeeding close it; once that many can no longer succeed, it opens
/// again. The defaults keep a 50 % partial failure closed with a negligible
/// chance of opening (the maths is in the breaker module's documentation).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// Off: every call goes through and retries alone decide an order's fate.
    pub enabled: bool,
    /// Share of failed calls in a judged stretch that opens the circuit, in
    /// (0, 1].
    pub failure_rate: f64,
    /// How far back the outcomes of calls are kept and judged, a time span
    /// (`"10s"`). A count of calls, the form of older versions, is refused
    /// with a message saying so.
    #[serde(
        deserialize_with = "deserialize_window",
        serialize_with = "humantime_serde::serialize"
    )]
    pub window: Duration,
    /// Calls (first attempts and retries alike) a stretch must hold before
    /// its failure rate is judged, so that a handful of failures never
    /// opens the circuit; the larger, the less likely a partial failure
    /// opens it, and the longer an outage at low traffic takes to.
    pub min_calls: u32,
    /// How long the circuit stays open before it lets probes through.
    #[serde(with = "humantime_serde")]
    pub open_for: Duration,
    /// Calls let through while half-open.
    pub half_open_probes: u32,
    /// Probes that must succeed to close the circuit, in
    /// 1..=`half_open_probes`.
    pub half_open_successes: u32,
    /// `/readyz` turns false once the circuit has gone this long without
    /// closing (open and half-open alike): an outage that is not a blip.
    #[serde(with = "humantime_serde")]
    pub not_ready_after: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            failure_rate: 0.9,
            window: Duration::from_secs(10),
            min_calls: 100,
            open_for: Duration::from_secs(5),
            half_open_probes: 3,
            half_open_successes: 2,
            not_ready_after: Duration::from_secs(30),
        }
    }
}

/// `breaker.window`: a time span. A bare number is the count window of
/// older versions, refused with what replaces it (the config layer adds the
/// key to the message).
fn deserialize_window<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Count(u64),
        Span(String),
    }
    match Raw::deserialize(d)? {
        Raw::Span(s) => humantime::parse_duration(&s).map_err(|e| {
            serde::de::Error::custom(format!(
                "must be a time span such as \"10s\", got {s:?}: {e}"
            ))
        }),
        Raw::Count(n) => Err(serde::de::Error::custom(format!(
            "a count of calls ({n}) is no longer accepted: the window is now a time span \
             such as \"10s\" (and breaker.min_calls the calls a stretch of it must hold \
             to be judged)"
        ))),
    }
}

/// Exponential backoff with full jitter: attempt n waits a uniform random
/// time in `[0, min(max_interval, initial_interval * multiplier^n)]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    #[serde(with = "humantime_serde")]
    pub initial_interval: Duration,
    pub multiplier: f64,
    #[serde(with = "humantime_serde")]
    pub max_interval: Duration,
    /// Past this, a transiently failing order is dead-lettered with reason
    /// `retries_exhausted`. Time spent waiting for an open circuit does not
    /// count: an order that has to wait for the circuit starts its budget over.
    #[serde(with = "humantime_serde")]
    pub max_elapsed: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            initial_interval: Duration::from_millis(50),
            multiplier: 2.0,
            max_interval: Duration::from_secs(2),
            max_elapsed: Duration::from_secs(30),
        }
    }
}
