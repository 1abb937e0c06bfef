//! The capacity schedule: the simulator's capacity (both endpoints) moves
//! through `--capacities` at run time while one contestant works off a
//! backlog — fixed C, the oracle, adaptive — and each phase is judged on
//! throughput, p99 receive → commit, refused calls, retries, and (adaptive)
//! how soon the limit settles near the new capacity.
//!
//! The oracle cannot change its concurrency at run time, so it is
//! restarted at each change: SIGTERM (its orders finish at the capacity it
//! was sized for, the unstarted ones go back to the queue), then the
//! capacity changes and a daemon with C = the new capacity starts; its
//! phase is measured from the moment that one is ready: the ideal a fixed
//! limit could reach if it were always right, without the restart's gap.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::json;

use super::world::{self, Sample, Sampler, SimLimits};
use super::FlowArgs;
use crate::harness::Bench;
use crate::report::Stat;
use crate::say;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Contestant {
    Fixed(u32),
    Oracle,
    Adaptive,
}

impl Contestant {
    pub(crate) fn label(&self) -> String {
        match self {
            Contestant::Fixed(c) => format!("fixed C = {c}"),
            Contestant::Oracle => "oracle (C = capacity)".into(),
            Contestant::Adaptive => "adaptive".into(),
        }
    }

    /// The daemon's overrides while the capacity is `cap`.
    fn env(&self, cap: u32) -> Vec<(&'static str, String)> {
        let fixed = |c: u32| {
            vec![
                ("CONVEYOR__PIPELINE__VALIDATE_CONCURRENCY", c.to_string()),
                ("CONVEYOR__PIPELINE__CHARGE_CONCURRENCY", c.to_string()),
            ]
        };
        match self {
            Contestant::Fixed(c) => fixed(*c),
            Contestant::Oracle => fixed(cap),
            Contestant::Adaptive => vec![
                (
                    "CONVEYOR__RULE_ENGINE__CONCURRENCY__MODE",
                    "adaptive".into(),
                ),
                ("CONVEYOR__PAYMENT__CONCURRENCY__MODE", "adaptive".into()),
            ],
        }
    }

    /// The most calls it keeps in flight at capacity `cap`.
    fn reach(&self, cap: u32) -> u32 {
        match self {
            Contestant::Fixed(c) => cap.min(*c),
            _ => cap,
        }
    }
}

/// One phase of one contestant's run.
#[derive(Clone, Copy, Default)]
pub(crate) struct Phase {
    pub(crate) rate: f64,
    pub(crate) p99_ms: f64,
    /// 503 and 429 answers over all downstream calls, both downstreams.
    pub(crate) refused_share: f64,
    pub(crate) retries: f64,
    /// Seconds from the change until both limits stay within ±25 % of the
    /// capacity; `None` when they did not by the phase's end.
    pub(crate) settle: Option<f64>,
    /// Median sampled limit over the phase's second half: rule engine, payment.
    pub(crate) limit: [f64; 2],
    /// The payment provider's mean RTT over the phase (ms), as conveyor saw it.
    pub(crate) rtt_ms: f64,
}

/// One contestant's run through the schedule.
pub(crate) struct Run {
    pub(crate) phases: Vec<Phase>,
    /// Orders committed per second over time.
    pub(crate) throughput: Vec<(f64, f64)>,
    /// The payment and rule-engine limits over time.
    pub(crate) limits: [Vec<(f64, f64)>; 2],
}

pub(crate) struct ScheduleResults {
    pub(crate) contestants: Vec<Contestant>,
    /// `runs[contestant][run]`.
    pub(crate) runs: Vec<Vec<Run>>,
}

pub(crate) async fn measure(b: &mut Bench, args: &FlowArgs) -> anyhow::Result<ScheduleResults> {
    let mut contestants: Vec<Contestant> =
        args.fixed.iter().map(|c| Contestant::Fixed(*c)).collect();
    contestants.extend([Contestant::Oracle, Contestant::Adaptive]);
    let mut runs: Vec<Vec<Run>> = contestants.iter().map(|_| Vec::new()).collect();
    world::reset(b).await?;
    for run in 1..=args.runs {
        for (i, c) in contestants.iter().enumerate() {
            say(format!(
                "capacity schedule {:?}, run {run}/{}: {}",
                args.capacities,
                args.runs,
                c.label()
            ));
            let mut attempt = 1;
            let r = loop {
                match one(b, args, *c).await {
                    Ok(r) => break r,
                    Err(e) => world::recover(b, attempt, e).await?,
                }
                attempt += 1;
            };
            for (k, p) in r.phases.iter().enumerate() {
                say(format!(
                    "  phase {} (capacity {}): {:.0}/s, p99 {:.0} ms, refused {:.2} %, {:.0} retries{}{}",
                    k + 1,
                    args.capacities[k],
                    p.rate,
                    p.p99_ms,
                    100.0 * p.refused_share,
                    p.retries,
                    match (c, p.settle) {
                        (Contestant::Adaptive, Some(s)) => format!(", settled in {s:.1} s"),
                        (Contestant::Adaptive, None) => ", not settled".into(),
                        _ => String::new(),
                    },
                    match c {
                        Contestant::Adaptive => format!(
                            ", limits {:.0} / {:.0} (payment / rule engine, second half), payment RTT {:.1} ms",
                            p.limit[1], p.limit[0], p.rtt_ms
                        ),
                        _ => String::new(),
                    }
                ));
            }
            runs[i].push(r);
        }
    }
    world::reset(b).await?;
    Ok(ScheduleResults { contestants, runs })
}

async fn one(b: &mut Bench, args: &FlowArgs, c: Contestant) -> anyhow::Result<Run> {
    let caps = &args.capacities;
    let secs = args.phase_secs;
    let limits = SimLimits {
        capacity: caps[0],
        queue_limit: args.queue_limit,
        rate_limit: 0,
    };
    let (mut sim, url) = world::simulator(b, args.latency_ms, limits, "schedule").await?;
    world::clear_store(b).await?;
    // Enough queued that no phase runs dry: the most the contestant can
    // take at each phase's capacity, with a tenth to spare. What one run
    // leaves in the queue serves the next.
    let l = args.latency_ms.max(1) as f64 / 1000.0;
    let need = caps
        .iter()
        .map(|cap| f64::from(c.reach(*cap)) / l * secs)
        .sum::<f64>()
        * 1.1;
    let mut queued = world::depths(b).await?.0;
    if (queued as f64) < need {
        let n = need as u64 - queued;
        say(format!("  publishing {n} orders"));
        b.publish(n, false).await?;
        queued += n;
    }

    let (mut d, port) = world::daemon(b, &url, &c.env(caps[0])).await?;
    let i0 = Instant::now();
    let t0 = Utc::now();
    let sampler = Sampler::start(port, Duration::from_millis(args.sample_ms), i0);
    // Per phase: when the capacity changed, and when measuring began.
    let mut changes: Vec<(f64, DateTime<Utc>)> = vec![(0.0, t0)];
    let mut froms: Vec<(f64, DateTime<Utc>)> = vec![(0.0, t0)];
    for (i, cap) in caps.iter().enumerate().skip(1) {
        tokio::time::sleep_until((i0 + Duration::from_secs_f64(i as f64 * secs)).into()).await;
        let change = (i0.elapsed().as_secs_f64(), Utc::now());
        let knob = json!({"validate": {"capacity": cap}, "charge": {"capacity": cap}});
        changes.push(change);
        if c == Contestant::Oracle {
            // The old daemon drains at the capacity it was sized for, then
            // the capacity changes and the new one starts.
            sampler.port.store(0, std::sync::atomic::Ordering::Release);
            stop(&mut d).await?;
            world::knobs(&url, knob).await?;
            let (nd, np) = world::daemon(b, &url, &c.env(*cap)).await?;
            d = nd;
            sampler.port.store(np, std::sync::atomic::Ordering::Release);
            let ready = i0.elapsed().as_secs_f64();
            say(format!(
                "  oracle restarted with C = {cap} in {:.2} s",
                ready - change.0
            ));
            froms.push((ready, Utc::now()));
        } else {
            world::knobs(&url, knob).await?;
            froms.push(change);
        }
    }
    tokio::time::sleep_until((i0 + Duration::from_secs_f64(caps.len() as f64 * secs)).into()).await;
    let end = (i0.elapsed().as_secs_f64(), Utc::now());
    let samples = sampler.finish();
    stop(&mut d).await?;

    world::account(b, &url, queued).await?;
    sim.terminate(Duration::from_secs(10)).await?;

    let mut phases = Vec::new();
    for (i, cap) in caps.iter().enumerate() {
        let (from_t, from) = froms[i];
        let (to_t, to) = changes.get(i + 1).copied().unwrap_or(end);
        let (n, p99_ms) = world::window(b, from, to).await?;
        let span = (to - from).num_milliseconds() as f64 / 1000.0;
        let requests = world::rise(&samples, from_t, to_t, |m| m.requests);
        let refused = world::rise(&samples, from_t, to_t, |m| m.refused);
        phases.push(Phase {
            rate: if span > 0.0 {
                n as f64 / span
            } else {
                f64::NAN
            },
            p99_ms,
            refused_share: if requests > 0.0 {
                refused / requests
            } else {
                0.0
            },
            retries: world::rise(&samples, from_t, to_t, |m| m.retries),
            settle: settle(&samples, changes[i].0, to_t, *cap),
            rtt_ms: {
                let sum = world::rise(&samples, from_t, to_t, |m| m.payment_rtt[0]);
                let n = world::rise(&samples, from_t, to_t, |m| m.payment_rtt[1]);
                if n > 0.0 {
                    1000.0 * sum / n
                } else {
                    f64::NAN
                }
            },
            limit: [0, 1].map(|k| {
                let half = (from_t + to_t) / 2.0;
                Stat(
                    samples
                        .iter()
                        .filter(|s| s.t >= half && s.t < to_t)
                        .map(|s| s.m.limit[k])
                        .collect(),
                )
                .median()
            }),
        });
    }
    let limit = |k: usize| samples.iter().map(|s| (s.t, s.m.limit[k])).collect();
    Ok(Run {
        phases,
        throughput: world::committed_series(b, t0, 0.5).await?,
        limits: [limit(1), limit(0)],
    })
}

/// SIGTERM, and the exit judged: 0, or the drain deadline's code when
/// orders were still waiting for an open circuit (they are left unacked
/// and come back; [`world::account`] then finds them queued).
pub(crate) async fn stop(d: &mut crate::procs::Proc) -> anyhow::Result<()> {
    let (secs, exit) = d.terminate(Duration::from_secs(60)).await?;
    match exit.code {
        Some(0) => Ok(()),
        Some(c) if c == i32::from(conveyor::EXIT_DRAIN_TIMEOUT) => {
            say(format!(
                "  the daemon's drain ran out its deadline ({secs:.1} s): unfinished orders went back to the queue"
            ));
            Ok(())
        }
        other => anyhow::bail!("daemon exit {other:?}:\n{}", d.log_tail()),
    }
}

/// Seconds after `from` until both limits stay within ±25 % of `cap` up to
/// `to` (to the sampling interval), or `None` if the last sample is outside.
fn settle(samples: &[Sample], from: f64, to: f64, cap: u32) -> Option<f64> {
    let cap = f64::from(cap);
    let inside = |s: &Sample| s.m.limit.iter().all(|l| (l - cap).abs() <= 0.25 * cap);
    let window: Vec<&Sample> = samples.iter().filter(|s| s.t >= from && s.t < to).collect();
    let last_out = window.iter().rposition(|s| !inside(s));
    match last_out {
        None => window.first().map(|s| s.t - from),
        Some(k) => window.get(k + 1).map(|s| s.t - from),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::world::Metrics;

    fn at(t: f64, l: f64) -> Sample {
        Sample {
            t,
            m: Metrics {
                limit: [l, l],
                ..Metrics::default()
            },
        }
    }

    #[test]
    fn settles_when_the_limit_stays_in_the_band() {
        let s = [
            at(10.0, 48.0),
            at(10.5, 30.0),
            at(11.0, 14.0),
            at(11.5, 12.0),
            at(12.0, 10.0),
        ];
        assert_eq!(settle(&s, 10.0, 20.0, 12), Some(1.0));
        let s = [at(10.0, 48.0), at(10.5, 12.0), at(11.0, 30.0)];
        assert_eq!(settle(&s, 10.0, 20.0, 12), None);
        let s = [at(10.2, 13.0), at(10.5, 12.0)];
        assert_eq!(
            settle(&s, 10.0, 20.0, 12).map(|x| (x * 10.0).round()),
            Some(2.0)
        );
    }
}
