//! The rows beside the capacity schedule, each run against a fresh
//! simulator at `--latency-ms`:
//!
//! * **rate limits**: the provider accepts `--provider-rate` requests/s per
//!   endpoint (429 with `Retry-After` beyond); conveyor works off a backlog
//!   with its own limit at `--conveyor-rate`, or with none (fixed C = 64 as
//!   shipped, and adaptive);
//! * **partial failure**: orders arrive at `--arrival-rate` while a share of
//!   calls at both endpoints is answered 503; the default breaker against
//!   retries alone (breaker off);
//! * **outage**: the same arrivals, healthy for `--healthy-secs`, then half
//!   the payment provider's answers 503 for `--outage-secs`; requests/s to
//!   it against the healthy rate, with retries alone, with the retry budget,
//!   and with the budget and the default breaker.

use std::time::{Duration, Instant};

use chrono::Utc;
use conveyor::tools::produce::{publish_rabbit, Mix, OrderGen};
use serde_json::json;

use super::world::{self, SimLimits};
use super::FlowArgs;
use crate::harness::Bench;
use crate::say;

pub(crate) struct RateRun {
    /// Orders/s once started (the first two seconds left out).
    pub(crate) rate: f64,
    /// 429 answers the provider gave, both endpoints.
    pub(crate) throttled: u64,
    /// … over every request it received.
    pub(crate) throttled_share: f64,
    pub(crate) dead: u64,
}

pub(crate) struct PartialRun {
    /// Orders stored by 2 s after the last arrival, over the arrivals.
    pub(crate) stored_share: f64,
    pub(crate) dead: u64,
    pub(crate) retries: f64,
}

pub(crate) struct OutageRun {
    /// Requests/s to the payment provider while healthy and in the outage.
    pub(crate) healthy: f64,
    pub(crate) outage: f64,
    pub(crate) budget_refusals: f64,
    pub(crate) dead: u64,
}

/// Per variant (its label): one result per run.
pub(crate) type Variants<T> = Vec<(String, Vec<T>)>;

/// Publishes `n` orders at `rate`/s in the background.
fn arrivals(b: &mut Bench, n: u64, rate: f64) -> tokio::task::JoinHandle<anyhow::Result<u64>> {
    b.publishes += 1;
    let gen = OrderGen::new(
        format!("f{}-{}", std::process::id(), b.publishes),
        Mix::default(),
    );
    let cfg = b.rabbit.clone();
    tokio::spawn(async move {
        publish_rabbit(
            &cfg,
            (0..n).map(|i| gen.message(i).1),
            1000,
            Some(rate),
            |_| {},
        )
        .await
    })
}

fn breaker_off() -> Vec<(&'static str, String)> {
    vec![
        ("CONVEYOR__RULE_ENGINE__BREAKER__ENABLED", "false".into()),
        ("CONVEYOR__PAYMENT__BREAKER__ENABLED", "false".into()),
    ]
}

pub(crate) async fn rate_limit(
    b: &mut Bench,
    args: &FlowArgs,
) -> anyhow::Result<Variants<RateRun>> {
    let own = args.conveyor_rate.to_string();
    let variants: Vec<(String, Vec<(&'static str, String)>)> = vec![
        (
            format!("conveyor's limit {own}/s"),
            vec![
                ("CONVEYOR__RULE_ENGINE__RATE_LIMIT__PER_SECOND", own.clone()),
                ("CONVEYOR__PAYMENT__RATE_LIMIT__PER_SECOND", own.clone()),
            ],
        ),
        ("no conveyor limit, fixed C = 64".into(), vec![]),
        (
            "no conveyor limit, adaptive".into(),
            vec![
                (
                    "CONVEYOR__RULE_ENGINE__CONCURRENCY__MODE",
                    "adaptive".into(),
                ),
                ("CONVEYOR__PAYMENT__CONCURRENCY__MODE", "adaptive".into()),
            ],
        ),
    ];
    let mut out: Variants<RateRun> = variants.iter().map(|(l, _)| (l.clone(), vec![])).collect();
    for run in 1..=args.runs {
        for (k, (label, env)) in variants.iter().enumerate() {
            say(format!(
                "rate limit: provider {}/s, {label}, run {run}/{}",
                args.provider_rate, args.runs
            ));
            let mut attempt = 1;
            let r = loop {
                match rate_one(b, args, env).await {
                    Ok(r) => break r,
                    Err(e) => world::recover(b, attempt, e).await?,
                }
                attempt += 1;
            };
            say(format!(
                "  {:.0} orders/s, {} answers 429 ({:.2} %), {} dead-lettered",
                r.rate,
                r.throttled,
                100.0 * r.throttled_share,
                r.dead
            ));
            out[k].1.push(r);
        }
    }
    world::reset(b).await?;
    Ok(out)
}

async fn rate_one(
    b: &mut Bench,
    args: &FlowArgs,
    env: &[(&str, String)],
) -> anyhow::Result<RateRun> {
    let limits = SimLimits {
        rate_limit: args.provider_rate,
        ..SimLimits::default()
    };
    let (mut sim, url) = world::simulator(b, args.latency_ms, limits, "rate").await?;
    world::reset(b).await?;
    let n = (f64::from(args.provider_rate) * (args.rate_secs + 5.0) * 1.1) as u64;
    b.publish(n, false).await?;
    let (mut d, _) = world::daemon(b, &url, env).await?;
    let i0 = Instant::now();
    let t0 = Utc::now();
    tokio::time::sleep_until((i0 + Duration::from_secs_f64(args.rate_secs)).into()).await;
    let t1 = Utc::now();
    super::schedule::stop(&mut d).await?;
    let from = t0 + chrono::Duration::seconds(2);
    let (rows, _) = world::window(b, from, t1).await?;
    let span = (t1 - from).num_milliseconds() as f64 / 1000.0;
    let books = world::ledger(&url).await?;
    let dead = world::account(b, &url, n).await?;
    sim.terminate(Duration::from_secs(10)).await?;
    let all = books.served + books.overloaded + books.rate_limited;
    Ok(RateRun {
        rate: rows as f64 / span,
        throttled: books.rate_limited,
        throttled_share: if all > 0 {
            books.rate_limited as f64 / all as f64
        } else {
            0.0
        },
        dead,
    })
}

/// `[(error rate, breaker defaults, breaker off)]`.
pub(crate) type PartialResults = Vec<(f64, Vec<PartialRun>, Vec<PartialRun>)>;

pub(crate) async fn partial_failure(
    b: &mut Bench,
    args: &FlowArgs,
) -> anyhow::Result<PartialResults> {
    let mut out: PartialResults = args
        .error_rates
        .iter()
        .map(|e| (*e, vec![], vec![]))
        .collect();
    for run in 1..=args.runs {
        for (k, e) in args.error_rates.iter().enumerate() {
            for breaker in [true, false] {
                say(format!(
                    "partial failure: {:.0} % 503 at {}/s, breaker {}, run {run}/{}",
                    100.0 * e,
                    args.arrival_rate,
                    if breaker { "defaults" } else { "off" },
                    args.runs
                ));
                let env = if breaker { vec![] } else { breaker_off() };
                let mut attempt = 1;
                let r = loop {
                    match partial_one(b, args, *e, &env).await {
                        Ok(r) => break r,
                        Err(err) => world::recover(b, attempt, err).await?,
                    }
                    attempt += 1;
                };
                say(format!(
                    "  {:.1} % of arrivals stored, {:.0} retries, {} dead-lettered",
                    100.0 * r.stored_share,
                    r.retries,
                    r.dead
                ));
                let slot = &mut out[k];
                if breaker { &mut slot.1 } else { &mut slot.2 }.push(r);
            }
        }
    }
    world::reset(b).await?;
    Ok(out)
}

async fn partial_one(
    b: &mut Bench,
    args: &FlowArgs,
    error_rate: f64,
    env: &[(&str, String)],
) -> anyhow::Result<PartialRun> {
    let (mut sim, url) =
        world::simulator(b, args.latency_ms, SimLimits::default(), "partial").await?;
    world::knobs(
        &url,
        json!({"validate": {"error_rate": error_rate}, "charge": {"error_rate": error_rate}}),
    )
    .await?;
    world::reset(b).await?;
    let (mut d, port) = world::daemon(b, &url, env).await?;
    let n = (args.arrival_rate * args.failure_secs) as u64;
    let t0 = Utc::now();
    let published = arrivals(b, n, args.arrival_rate).await??;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t1 = Utc::now();
    let m = world::metrics(port).await?;
    super::schedule::stop(&mut d).await?;
    let (stored, _) = world::window(b, t0, t1).await?;
    let dead = world::account(b, &url, published).await?;
    sim.terminate(Duration::from_secs(10)).await?;
    Ok(PartialRun {
        stored_share: stored as f64 / published.max(1) as f64,
        dead,
        retries: m.retries,
    })
}

pub(crate) async fn outage(b: &mut Bench, args: &FlowArgs) -> anyhow::Result<Variants<OutageRun>> {
    let budget = || {
        vec![
            (
                "CONVEYOR__RULE_ENGINE__RETRY_BUDGET__ENABLED",
                "true".to_string(),
            ),
            (
                "CONVEYOR__PAYMENT__RETRY_BUDGET__ENABLED",
                "true".to_string(),
            ),
        ]
    };
    let variants: Vec<(String, Vec<(&'static str, String)>)> = vec![
        (
            "retries alone (breaker off, no budget)".into(),
            breaker_off(),
        ),
        (
            "retry budget, breaker off".into(),
            budget().into_iter().chain(breaker_off()).collect(),
        ),
        ("retry budget, breaker defaults".into(), budget()),
    ];
    let mut out: Variants<OutageRun> = variants.iter().map(|(l, _)| (l.clone(), vec![])).collect();
    for run in 1..=args.runs {
        for (k, (label, env)) in variants.iter().enumerate() {
            say(format!(
                "outage: 50 % 503 at the payment provider, {label}, run {run}/{}",
                args.runs
            ));
            let mut attempt = 1;
            let r = loop {
                match outage_one(b, args, env).await {
                    Ok(r) => break r,
                    Err(e) => world::recover(b, attempt, e).await?,
                }
                attempt += 1;
            };
            say(format!(
                "  payment requests/s healthy {:.0}, in the outage {:.0} ({:.2} ×), {:.0} budget refusals, {} dead-lettered",
                r.healthy,
                r.outage,
                r.outage / r.healthy,
                r.budget_refusals,
                r.dead
            ));
            out[k].1.push(r);
        }
    }
    world::reset(b).await?;
    Ok(out)
}

async fn outage_one(
    b: &mut Bench,
    args: &FlowArgs,
    env: &[(&str, String)],
) -> anyhow::Result<OutageRun> {
    let (mut sim, url) =
        world::simulator(b, args.latency_ms, SimLimits::default(), "outage").await?;
    world::reset(b).await?;
    let (mut d, port) = world::daemon(b, &url, env).await?;
    let total = args.healthy_secs + args.outage_secs;
    let n = (args.arrival_rate * total) as u64;
    let i0 = Instant::now();
    let publisher = arrivals(b, n, args.arrival_rate);
    let at = |s: f64| tokio::time::sleep_until((i0 + Duration::from_secs_f64(s)).into());
    // The first second is the publisher and the daemon warming up.
    at(1.0).await;
    let m0 = world::metrics(port).await?;
    at(args.healthy_secs).await;
    let m1 = world::metrics(port).await?;
    world::knobs(&url, json!({"charge": {"error_rate": 0.5}})).await?;
    at(total).await;
    let m2 = world::metrics(port).await?;
    let published = publisher.await??;
    super::schedule::stop(&mut d).await?;
    let dead = world::account(b, &url, published).await?;
    sim.terminate(Duration::from_secs(10)).await?;
    Ok(OutageRun {
        healthy: (m1.payment_requests - m0.payment_requests) / (args.healthy_secs - 1.0),
        outage: (m2.payment_requests - m1.payment_requests) / args.outage_secs,
        budget_refusals: m2.budget_refusals - m1.budget_refusals,
        dead,
    })
}
