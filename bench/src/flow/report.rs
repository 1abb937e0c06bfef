//! The flow benchmark's markdown: a table per phase of the capacity
//! schedule with the `adaptive ÷ oracle` row, the rate-limit, partial-
//! failure and outage rows, each figure a median with its min–max, and the
//! issue's targets marked met or missed.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use super::scenarios::{OutageRun, PartialResults, RateRun, Variants};
use super::schedule::{Contestant, ScheduleResults};
use super::FlowArgs;
use crate::report::{commit, Stat};

#[derive(Default)]
pub(crate) struct FlowResults {
    pub(crate) schedule: Option<ScheduleResults>,
    pub(crate) rate: Option<Variants<RateRun>>,
    pub(crate) partial: Option<PartialResults>,
    pub(crate) outage: Option<Variants<OutageRun>>,
    /// The 1-minute load average when the benchmark began.
    pub(crate) load_at_start: String,
}

fn stat(values: impl IntoIterator<Item = f64>) -> Stat {
    Stat(values.into_iter().collect())
}

/// "median (min–max)", or the median alone when every run agrees.
fn cell(s: &Stat, decimals: usize) -> String {
    let (m, range) = s.show(decimals);
    if s.0.len() < 2 || format!("{:.*}", decimals, s.min()) == format!("{:.*}", decimals, s.max()) {
        m
    } else {
        format!("{m} ({range})")
    }
}

/// The 1-minute load average (other work on the machine skews figures).
pub(crate) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "**missed**"
    }
}

pub(crate) fn render(
    a: &FlowArgs,
    r: &FlowResults,
    started: Instant,
    svg: Option<&Path>,
) -> String {
    let mut t = String::new();
    let load = load_average();
    let _ = writeln!(
        t,
        "# conveyor flow-control benchmark, {}\n\n\
         commit {}; {} build; `scripts/bench flow` (runs: {}, {:.0} s; load average {} at the start, \
         {load} at the end, {} CPUs). RabbitMQ and PostgreSQL on loopback; the simulator (`conveyor simulate`) and conveyor \
         (`conveyor run`) as child processes; simulator latency L = {} ms at both endpoints; \
         the daemon as configured by default except as stated, with `shutdown.drain_timeout` = 5 s \
         (a drain that waits for an open circuit leaves the rest queued). Every figure: median of the runs (min–max).\n",
        chrono::Utc::now().format("%Y-%m-%d %H:%MZ"),
        commit(),
        if cfg!(debug_assertions) { "debug" } else { "release" },
        a.runs,
        started.elapsed().as_secs_f64(),
        r.load_at_start,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        a.latency_ms,
    );
    if let Some(s) = &r.schedule {
        schedule(&mut t, a, s);
    }
    if let Some(v) = &r.rate {
        rate(&mut t, a, v);
    }
    if let Some(p) = &r.partial {
        partial(&mut t, a, p);
    }
    if let Some(o) = &r.outage {
        outage(&mut t, a, o);
    }
    if let Some(svg) = svg {
        let name = svg
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let _ = writeln!(t, "Plot: `{name}` (the last run of each contestant).");
    }
    t
}

fn schedule(t: &mut String, a: &FlowArgs, s: &ScheduleResults) {
    let caps: Vec<String> = a.capacities.iter().map(u32::to_string).collect();
    let _ = writeln!(
        t,
        "## Capacity schedule {} ({:.0} s each)\n\n\
         The simulator serves at most `capacity` calls at once per endpoint, queues up to {} more \
         (latency grows) and answers 503 beyond; the capacity changes at run time through \
         `PUT /knobs`. Each contestant works off a backlog deep enough for every phase. Orders/s \
         and p99 receive → commit come from the stored rows committed in the phase; 503/429 share \
         and retries from conveyor's `/metrics` (both downstreams); the adaptive limits are sampled \
         from `conveyor_downstream_concurrency_limit` every {} ms, and *settled* is the time after \
         the change until both downstreams' limits stay within ±25 % of the capacity. The oracle \
         is stopped at each change (it drains at the capacity it was sized for), then the capacity \
         changes and it starts again with C = the new capacity; its phase is measured from the moment \
         it is ready (the restart's gap is not held against it). *Limit* is the median of the sampled \
         limits over the phase's second half, payment / rule engine. Stage concurrency C applies to \
         both the validate and the charge stage.\n",
        caps.join(" → "),
        a.phase_secs,
        a.queue_limit,
        a.sample_ms,
    );
    let find = |c: Contestant| s.contestants.iter().position(|x| *x == c);
    let (oracle, adaptive) = (find(Contestant::Oracle), find(Contestant::Adaptive));
    let mut targets = Vec::new();
    for (k, cap) in a.capacities.iter().enumerate() {
        let _ = writeln!(
            t,
            "### Phase {} — capacity {cap} (bound {:.0} orders/s)\n\n\
             | contestant | orders/s | p99 receive → commit (ms) | 503/429 share of calls (%) | retries | settled (s) | limit |\n\
             |---|---:|---:|---:|---:|---:|---:|",
            k + 1,
            f64::from(*cap) * 1000.0 / a.latency_ms.max(1) as f64,
        );
        for (i, c) in s.contestants.iter().enumerate() {
            let runs = &s.runs[i];
            let ph = |f: &dyn Fn(&super::schedule::Phase) -> f64| {
                stat(runs.iter().filter_map(|r| r.phases.get(k)).map(f))
            };
            let settled = if *c == Contestant::Adaptive {
                settle_cell(
                    runs.iter()
                        .filter_map(|r| r.phases.get(k))
                        .map(|p| p.settle),
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                t,
                "| {} | {} | {} | {} | {} | {settled} | {} / {} |",
                c.label(),
                cell(&ph(&|p| p.rate), 0),
                cell(&ph(&|p| p.p99_ms), 0),
                cell(&ph(&|p| 100.0 * p.refused_share), 2),
                cell(&ph(&|p| p.retries), 0),
                cell(&ph(&|p| p.limit[1]), 0),
                cell(&ph(&|p| p.limit[0]), 0),
            );
        }
        if let (Some(o), Some(ad)) = (oracle, adaptive) {
            let pairs: Vec<_> = s.runs[ad]
                .iter()
                .zip(&s.runs[o])
                .filter_map(|(x, y)| Some((x.phases.get(k)?, y.phases.get(k)?)))
                .collect();
            let rate = stat(pairs.iter().map(|(x, y)| x.rate / y.rate));
            let p99 = stat(pairs.iter().map(|(x, y)| x.p99_ms / y.p99_ms));
            let _ = writeln!(
                t,
                "| **adaptive ÷ oracle** | {} | {} | | | | |\n",
                cell(&rate, 2),
                cell(&p99, 2)
            );
            let refused = stat(pairs.iter().map(|(x, _)| 100.0 * x.refused_share));
            let settle_med = stat(pairs.iter().map(|(x, _)| x.settle.unwrap_or(f64::INFINITY)));
            targets.push((
                k,
                *cap,
                rate.median(),
                p99.median(),
                refused.median(),
                settle_med.median(),
            ));
        } else {
            t.push('\n');
        }
    }
    if !targets.is_empty() {
        let _ = writeln!(
            t,
            "Targets (medians): adaptive ≥ 0.90 × the oracle's throughput, p99 ≤ 1.5 × the oracle's, \
             503/429 ≤ 1 % of calls, settled within 5 s of each change.\n\n\
             | phase | throughput ÷ oracle | p99 ÷ oracle | 503/429 (%) | settled (s) |\n\
             |---|---|---|---|---|"
        );
        for (k, cap, rate, p99, refused, settle) in targets {
            let _ = writeln!(
                t,
                "| {} (capacity {cap}) | {rate:.2}: {} | {p99:.2}: {} | {refused:.2}: {} | {}: {} |",
                k + 1,
                verdict(rate >= 0.90),
                verdict(p99 <= 1.5),
                verdict(refused <= 1.0),
                if settle.is_finite() { format!("{settle:.1}") } else { "not settled".into() },
                verdict(settle <= 5.0),
            );
        }
        t.push('\n');
    }
}

fn settle_cell(values: impl Iterator<Item = Option<f64>>) -> String {
    let v: Vec<Option<f64>> = values.collect();
    let unsettled = v.iter().filter(|x| x.is_none()).count();
    let s = stat(v.iter().map(|x| x.unwrap_or(f64::INFINITY)));
    let mut out = if s.median().is_finite() {
        cell(&stat(v.iter().flatten().copied()), 1)
    } else {
        "not settled".into()
    };
    if unsettled > 0 && s.median().is_finite() {
        let _ = write!(out, "; {unsettled} run(s) not settled");
    }
    out
}

fn rate(t: &mut String, a: &FlowArgs, v: &Variants<RateRun>) {
    let _ = writeln!(
        t,
        "## Rate limit: provider at {} requests/s per endpoint ({:.0} s per run)\n\n\
         The simulator answers 429 with `Retry-After` past {} requests/s at each endpoint; conveyor \
         works off a backlog. Orders/s from the rows committed after the first 2 s; 429 answers \
         from the simulator's books (both endpoints, the whole run).\n\n\
         | conveyor | orders/s | ÷ {}/s | 429 answers | 429 share of requests (%) | dead letters |\n\
         |---|---:|---:|---:|---:|---:|",
        a.provider_rate, a.rate_secs, a.provider_rate, a.conveyor_rate,
    );
    let target = f64::from(a.conveyor_rate);
    for (label, runs) in v {
        let _ = writeln!(
            t,
            "| {label} | {} | {} | {} | {} | {} |",
            cell(&stat(runs.iter().map(|r| r.rate)), 0),
            cell(&stat(runs.iter().map(|r| r.rate / target)), 3),
            cell(&stat(runs.iter().map(|r| r.throttled as f64)), 0),
            cell(&stat(runs.iter().map(|r| 100.0 * r.throttled_share)), 2),
            cell(&stat(runs.iter().map(|r| r.dead as f64)), 0),
        );
    }
    if let Some((_, own)) = v.first() {
        let r429 = stat(own.iter().map(|r| r.throttled as f64)).median();
        let dev = (stat(own.iter().map(|r| r.rate)).median() / target - 1.0).abs();
        let _ = writeln!(
            t,
            "\nTargets: with conveyor's limit at {}/s, 0 answers 429 ({}) and throughput within 2 % of \
             it ({:.1} %: {}).",
            a.conveyor_rate,
            verdict(r429 == 0.0),
            100.0 * dev,
            verdict(dev <= 0.02)
        );
    }
    for (label, runs) in v.iter().skip(1) {
        let share = stat(runs.iter().map(|r| 100.0 * r.throttled_share)).median();
        let dead = runs.iter().map(|r| r.dead).sum::<u64>();
        let _ = writeln!(
            t,
            "With {label}: 429 share ≤ 2 % ({share:.2} %: {}), nothing dead-lettered ({dead}: {}).",
            verdict(share <= 2.0),
            verdict(dead == 0)
        );
    }
    t.push('\n');
}

fn partial(t: &mut String, a: &FlowArgs, p: &PartialResults) {
    let _ = writeln!(
        t,
        "## Partial failure: transient 503s at {:.0} orders/s ({:.0} s of arrivals per run)\n\n\
         Orders are published at {:.0}/s while the simulator answers the given share of calls at \
         both endpoints with 503 (after its latency). *Stored* counts the rows committed by 2 s \
         after the last arrival, as a share of the arrivals; the ratio divides the default \
         breaker's by the breaker-off run's (retries alone) of the same round. Stage concurrency \
         as shipped (64).\n\n\
         | 503 share | stored, breaker defaults (%) | stored, breaker off (%) | ratio | target | dead letters (on / off) | retries (on / off) |\n\
         |---:|---:|---:|---:|---|---:|---:|",
        a.arrival_rate, a.failure_secs, a.arrival_rate,
    );
    for (e, on, off) in p {
        let ratio = stat(
            on.iter()
                .zip(off)
                .map(|(x, y)| x.stored_share / y.stored_share),
        );
        let target = match (e * 100.0).round() as u32 {
            0..=10 => 0.95,
            11..=20 => 0.90,
            21..=30 => 0.80,
            _ => 0.50,
        };
        let dead_on: u64 = on.iter().map(|r| r.dead).sum();
        let _ = writeln!(
            t,
            "| {:.0} % | {} | {} | {} | ≥ {target:.2}, none dead-lettered: {} | {} / {} | {} / {} |",
            100.0 * e,
            cell(&stat(on.iter().map(|r| 100.0 * r.stored_share)), 1),
            cell(&stat(off.iter().map(|r| 100.0 * r.stored_share)), 1),
            cell(&ratio, 2),
            verdict(ratio.median() >= target && dead_on == 0),
            cell(&stat(on.iter().map(|r| r.dead as f64)), 0),
            cell(&stat(off.iter().map(|r| r.dead as f64)), 0),
            cell(&stat(on.iter().map(|r| r.retries)), 0),
            cell(&stat(off.iter().map(|r| r.retries)), 0),
        );
    }
    t.push('\n');
}

fn outage(t: &mut String, a: &FlowArgs, o: &Variants<OutageRun>) {
    let _ = writeln!(
        t,
        "## Outage: half the payment provider's answers 503\n\n\
         Orders arrive at {:.0}/s; {:.0} s healthy, then {:.0} s with 50 % of charge calls answered \
         503. Requests/s to the payment provider from conveyor's \
         `conveyor_downstream_requests_total{{downstream=\"payment\"}}` (healthy: from 1 s to the \
         change). Budget as shipped: `ratio` 0.2, `min_per_second` 10, `window` 10 s, so the bound \
         is (1 + 0.2) × the healthy rate.\n\n\
         | conveyor | healthy (req/s) | outage (req/s) | outage ÷ healthy | target ≤ 1.2 | budget refusals | dead letters |\n\
         |---|---:|---:|---:|---|---:|---:|",
        a.arrival_rate, a.healthy_secs, a.outage_secs,
    );
    for (label, runs) in o {
        let ratio = stat(runs.iter().map(|r| r.outage / r.healthy));
        let bounded = label.starts_with("retry budget");
        let _ = writeln!(
            t,
            "| {label} | {} | {} | {} | {} | {} | {} |",
            cell(&stat(runs.iter().map(|r| r.healthy)), 0),
            cell(&stat(runs.iter().map(|r| r.outage)), 0),
            cell(&ratio, 2),
            if bounded {
                verdict(ratio.median() <= 1.2)
            } else {
                "(reference)"
            },
            cell(&stat(runs.iter().map(|r| r.budget_refusals)), 0),
            cell(&stat(runs.iter().map(|r| r.dead as f64)), 0),
        );
    }
    t.push('\n');
}
