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

/// Circuit breaker of one downstream. It opens when, among the last `window`
/// calls (at least `min_calls` of them), the share of transient failures
/// (timeout, connect error, 5xx, 429) reaches `failure_rate`; a 4xx answer
/// is the downstream working and counts as a success. While open, the stage
/// takes no new orders and in-flight orders wait (intake pauses through the
/// backpressure chain instead of dead-lettering the backlog). After
/// `open_for` it turns half-open and lets `half_open_probes` calls through:
/// all succeeding close it, one failing opens it again.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// Off: every call goes through and retries alone decide an order's fate.
    pub enabled: bool,
    /// Share of failed calls in the window that opens the circuit, in (0, 1].
    pub failure_rate: f64,
    /// How many of the most recent calls the failure rate is computed over.
    pub window: u32,
    /// Fewer calls than this in the window never open the circuit, so a
    /// couple of failures after a quiet spell do not stop the stage.
    pub min_calls: u32,
    /// How long the circuit stays open before it lets probes through.
    #[serde(with = "humantime_serde")]
    pub open_for: Duration,
    /// Calls let through while half-open; all must succeed to close it.
    pub half_open_probes: u32,
    /// `/readyz` turns false once the circuit has gone this long without
    /// closing (open and half-open alike): an outage that is not a blip.
    #[serde(with = "humantime_serde")]
    pub not_ready_after: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            failure_rate: 0.5,
            window: 20,
            min_calls: 10,
            open_for: Duration::from_secs(5),
            half_open_probes: 3,
            not_ready_after: Duration::from_secs(30),
        }
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
