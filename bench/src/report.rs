//! The figures and the report: a [`Stat`] is one figure over the runs
//! (median and range), a [`Kind`] one kind of run, [`Results`] everything
//! measured; [`report`] turns them into the markdown table written to
//! `bench/results/` and printed.

use std::path::Path;
use std::time::Instant;

use crate::Args;

/// Median and range of one figure over the runs.
#[derive(Default, Clone)]
pub(crate) struct Stat(pub(crate) Vec<f64>);

impl Stat {
    pub(crate) fn push(&mut self, v: f64) {
        self.0.push(v);
    }

    pub(crate) fn median(&self) -> f64 {
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }

    pub(crate) fn min(&self) -> f64 {
        self.0.iter().copied().fold(f64::INFINITY, f64::min)
    }

    pub(crate) fn max(&self) -> f64 {
        self.0.iter().copied().fold(f64::NEG_INFINITY, f64::max)
    }

    pub(crate) fn show(&self, decimals: usize) -> (String, String) {
        (
            format!("{:.*}", decimals, self.median()),
            format!("{:.*}–{:.*}", decimals, self.min(), decimals, self.max()),
        )
    }
}

/// What the database says about one consumer run.
pub(crate) struct Outcome {
    pub(crate) rows: i64,
    /// Rows committed after the first batch over the time since it.
    pub(crate) rate: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) series: Vec<(f64, f64)>,
    /// conveyor's mean time per order in the charge stage (its slot
    /// occupancy: the HTTP call as conveyor sees it), if measured.
    pub(crate) charge_ms: f64,
}

/// Per run kind: throughput, latency percentiles, one run's series.
#[derive(Default)]
pub(crate) struct Kind {
    pub(crate) rate: Stat,
    pub(crate) p50: Stat,
    pub(crate) p99: Stat,
    pub(crate) series: Vec<(f64, f64)>,
}

impl Kind {
    pub(crate) fn add(&mut self, o: &Outcome) {
        self.rate.push(o.rate);
        self.p50.push(o.p50_ms);
        self.p99.push(o.p99_ms);
        self.series = o.series.clone();
    }
}

#[derive(Default)]
pub(crate) struct Results {
    pub(crate) consume_ack: Stat,
    pub(crate) insert: Stat,
    pub(crate) floor: Kind,
    pub(crate) conveyor: Kind,
    pub(crate) vs_floor: Stat,
    pub(crate) cpu_us: Stat,
    pub(crate) bound: Kind,
    pub(crate) vs_bound: Stat,
    pub(crate) charge_ms: Stat,
    pub(crate) vs_effective: Stat,
    pub(crate) naive: Kind,
    pub(crate) vs_naive: Stat,
    pub(crate) rss_small: Stat,
    pub(crate) rss_large: Stat,
    pub(crate) rss_ratio: Stat,
    pub(crate) drain: Stat,
}

pub(crate) fn commit() -> String {
    let out = std::process::Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        _ => "unknown".into(),
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "**missed**"
    }
}

pub(crate) fn table(a: &Args, r: &Results) -> String {
    let (l, c) = (a.latency_ms, a.concurrency);
    let bound = f64::from(c) / (l as f64 / 1000.0);
    let lat = |k: &Kind| format!("{:.1} / {:.1}", k.p50.median(), k.p99.median());
    let none = String::new;
    let mut rows: Vec<[String; 5]> = Vec::new();
    let mut row = |what: &str, s: &Stat, d: usize, target: String, latency: String| {
        let (m, range) = s.show(d);
        rows.push([what.to_string(), m, range, target, latency]);
    };
    row(
        "floor: RabbitMQ consume + multi-ack alone (msg/s)",
        &r.consume_ack,
        0,
        none(),
        none(),
    );
    row(
        "floor: batched insert alone (rows/s)",
        &r.insert,
        0,
        none(),
        none(),
    );
    row(
        "floor: consume → 2 HTTP calls → batched insert → multi-ack (orders/s)",
        &r.floor.rate,
        0,
        none(),
        lat(&r.floor),
    );
    row(
        "conveyor, simulator at 0 ms (orders/s)",
        &r.conveyor.rate,
        0,
        none(),
        lat(&r.conveyor),
    );
    row(
        "conveyor ÷ floor",
        &r.vs_floor,
        2,
        format!("≥ 0.90: {}", verdict(r.vs_floor.median() >= 0.9)),
        none(),
    );
    row(
        &format!("conveyor at L = {l} ms, C = {c} (orders/s)"),
        &r.bound.rate,
        0,
        none(),
        lat(&r.bound),
    );
    row(
        &format!("… ÷ Little's-law bound C/L = {bound:.0}/s"),
        &r.vs_bound,
        2,
        format!("≥ 0.95: {}", verdict(r.vs_bound.median() >= 0.95)),
        none(),
    );
    row(
        "… mean charge-stage time per order as conveyor sees it, L' (ms)",
        &r.charge_ms,
        2,
        none(),
        none(),
    );
    row(
        "… ÷ C/L' (the bound at the latency actually served)",
        &r.vs_effective,
        2,
        none(),
        none(),
    );
    row(
        &format!("naive, one at a time, L = {l} ms (orders/s)"),
        &r.naive.rate,
        1,
        none(),
        lat(&r.naive),
    );
    row(
        "conveyor ÷ naive at the same latency",
        &r.vs_naive,
        0,
        format!("≥ 20: {}", verdict(r.vs_naive.median() >= 20.0)),
        none(),
    );
    row(
        "conveyor CPU (user + sys) per order at saturation (µs)",
        &r.cpu_us,
        0,
        format!("≤ 100: {}", verdict(r.cpu_us.median() <= 100.0)),
        none(),
    );
    row(
        &format!("peak RSS, {} backlog (MiB)", a.small_backlog),
        &r.rss_small,
        1,
        none(),
        none(),
    );
    row(
        &format!("peak RSS, {} backlog (MiB)", a.large_backlog),
        &r.rss_large,
        1,
        format!("≤ 64: {}", verdict(r.rss_large.median() <= 64.0)),
        none(),
    );
    row(
        "… ÷ RSS at the small backlog",
        &r.rss_ratio,
        2,
        format!("≤ 1.10: {}", verdict(r.rss_ratio.median() <= 1.1)),
        none(),
    );
    row(
        "drain: SIGTERM → exit at full load, default config (s)",
        &r.drain,
        3,
        format!("≤ 2: {}", verdict(r.drain.median() <= 2.0)),
        none(),
    );
    let mut md = String::from(
        "| measure | median | min–max | target | p50 / p99 latency (ms) |\n\
         |---|---:|---:|---|---:|\n",
    );
    for [a, b, c, d, e] in rows {
        md.push_str(&format!("| {a} | {b} | {c} | {d} | {e} |\n"));
    }
    md
}

pub(crate) fn report(a: &Args, r: &Results, started: Instant, svg: &Path) -> String {
    let date = chrono::Utc::now().format("%Y-%m-%d %H:%MZ");
    format!(
        "# conveyor benchmark, {date}\n\n\
         commit {commit}; {cpus} × {cpu}; release build; `scripts/bench` ({runs} runs, {secs:.0} s).\n\
         RabbitMQ and PostgreSQL on loopback, the simulator in its own process;\n\
         {n} orders per throughput run, all of them good orders (validated and charged).\n\n\
         {table}\n\
         Ratios are taken within each run, then summarised. Latency is receive → commit\n\
         per order (`committed_at − received_at` of the stored rows; `committed_at` is the\n\
         batch's transaction time). Throughput counts rows committed after the first\n\
         batch over the time since it. RSS is the daemon's peak (`VmHWM`); the large\n\
         backlog runs take {take} orders each off the queue, then get SIGTERM.\n\n\
         Plot: `{plot}`\n",
        commit = commit(),
        cpus = std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu = cpu_model(),
        runs = a.runs,
        secs = started.elapsed().as_secs_f64(),
        n = a.orders,
        table = table(a, r),
        take = a.large_take,
        plot = svg
            .file_name()
            .map_or_else(String::new, |f| f.to_string_lossy().into_owned()),
    )
}
