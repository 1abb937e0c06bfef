use std::sync::atomic::AtomicBool;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

fn metrics() -> ConcurrencyMetrics {
    ConcurrencyMetrics {
        downstream: "test",
        limit: IntGauge::new("limit", "limit").expect("gauge"),
        in_flight: IntGauge::new("in_flight", "in flight").expect("gauge"),
        rtt: Histogram::with_opts(prometheus::HistogramOpts::new("rtt", "rtt")).expect("histogram"),
    }
}

fn adaptive(initial: usize, min: usize, max: usize) -> Arc<ConcurrencyLimit> {
    let cfg = ConcurrencyConfig {
        mode: Mode::Adaptive,
        initial,
        min,
        max,
    };
    assert_eq!(cfg.problem(), None);
    Arc::new(ConcurrencyLimit::new(&cfg, 64, metrics()))
}

/// A downstream that serves `capacity` calls at once in `latency` each and
/// queues the rest: a call's RTT grows with the calls in flight beyond it.
#[derive(Clone)]
struct Model {
    latency: Duration,
    capacity: Arc<AtomicUsize>,
    /// Added to every call's RTT per call in flight: a busy client host
    /// (its scheduler, its sockets) rather than a queue at the downstream,
    /// so more calls still get more done.
    host_per_call: Duration,
    /// Calls answered 503 while this is set.
    failing: Arc<AtomicBool>,
    /// Calls that may wait past the capacity; beyond, 503 at once (as
    /// `conveyor simulate --queue-limit`).
    queue_limit: usize,
    /// Each call's RTT is scaled by a uniform random factor in
    /// `1 ± jitter`, drawn from a seeded generator (the runs repeat).
    jitter: f64,
    /// And by a factor in `1 ± host_jitter` that is drawn anew every
    /// [`HOST_EPOCH`] and shared by every call: a host whose scheduler
    /// slows all calls of a window alike.
    host_jitter: f64,
    host: Arc<Mutex<(Option<Instant>, f64)>>,
    rng: Arc<Mutex<StdRng>>,
}

const HOST_EPOCH: Duration = Duration::from_millis(25);

/// Runs `workers` stage workers (each: a slot, one call, again) until
/// `stop`; returns the calls made, and checks the pool never held more busy
/// slots than the limit allowed when each was taken.
async fn drive(
    limit: Arc<ConcurrencyLimit>,
    model: Model,
    workers: usize,
    run_for: Duration,
) -> (usize, Vec<usize>) {
    let done = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + run_for;
    let mut tasks = tokio::task::JoinSet::new();
    let samples = Arc::new(Mutex::new(Vec::new()));
    for _ in 0..workers {
        let (limit, model, done) = (limit.clone(), model.clone(), done.clone());
        tasks.spawn(async move {
            while Instant::now() < deadline {
                let Some(mut slot) = limit.acquire().await else {
                    return;
                };
                slot.busy();
                let call = limit.call();
                let in_flight = limit.in_flight();
                let cap = model.capacity.load(Ordering::Acquire).max(1);
                if in_flight > cap + model.queue_limit {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    limit.record(call, Feedback::BackPressure);
                    continue;
                }
                let rtt = model
                    .latency
                    .mul_f64((in_flight as f64 / cap as f64).max(1.0))
                    + model.host_per_call * in_flight as u32;
                let rtt = rtt.mul_f64(model.noise());
                tokio::time::sleep(rtt).await;
                let feedback = if model.failing.load(Ordering::Acquire) {
                    Feedback::BackPressure
                } else {
                    Feedback::Answered
                };
                limit.record(call, feedback);
                done.fetch_add(1, Ordering::AcqRel);
                drop(slot);
            }
        });
    }
    // Sample the limit every 100 ms.
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Ok(mut s) = samples.lock() {
            s.push(limit.limit());
        }
    }
    while tasks.join_next().await.is_some() {}
    let samples = samples.lock().map(|s| s.clone()).unwrap_or_default();
    (done.load(Ordering::Acquire), samples)
}

impl Model {
    fn noise(&self) -> f64 {
        let Ok(mut rng) = self.rng.lock() else {
            return 1.0;
        };
        let call = 1.0 + self.jitter * (2.0 * rng.random::<f64>() - 1.0);
        let Ok(mut host) = self.host.lock() else {
            return call;
        };
        let now = Instant::now();
        if host.0.is_none_or(|at| now.duration_since(at) >= HOST_EPOCH) {
            *host = (
                Some(now),
                1.0 + self.host_jitter * (2.0 * rng.random::<f64>() - 1.0),
            );
        }
        call * host.1
    }
}

fn model(latency_ms: u64, capacity: usize) -> Model {
    Model {
        latency: Duration::from_millis(latency_ms),
        capacity: Arc::new(AtomicUsize::new(capacity)),
        host_per_call: Duration::ZERO,
        failing: Arc::new(AtomicBool::new(false)),
        queue_limit: usize::MAX / 2,
        jitter: 0.0,
        host_jitter: 0.0,
        host: Arc::new(Mutex::new((None, 1.0))),
        rng: Arc::new(Mutex::new(StdRng::seed_from_u64(7))),
    }
}

#[tokio::test(start_paused = true)]
async fn the_limit_grows_by_one_per_round_trip_while_it_is_reached() {
    let limit = adaptive(4, 1, 1000);
    // A downstream with room to spare and more work than the limit.
    let (_, samples) = drive(
        limit.clone(),
        model(10, 1000),
        200,
        Duration::from_millis(500),
    )
    .await;
    let grown = limit.limit();
    // 500 ms of 10 ms round trips: about +1 per window, 50 windows.
    assert!(
        (30..=60).contains(&grown),
        "limit {grown}, samples {samples:?}"
    );
    assert!(samples.windows(2).all(|w| w[0] <= w[1]), "{samples:?}");
}

#[tokio::test(start_paused = true)]
async fn a_limit_never_reached_does_not_grow_and_comes_down_to_what_is_used() {
    let limit = adaptive(8, 1, 1000);
    // Three workers: never eight calls at once. For less than UNUSED_FOR
    // the limit holds (a pause in the demand is not a drop in it).
    let (_, samples) = drive(
        limit.clone(),
        model(10, 1000),
        3,
        UNUSED_FOR - Duration::from_millis(300),
    )
    .await;
    assert!(samples.iter().all(|l| *l == 8), "{samples:?}");
    // Then it comes down to the three calls under way at most; that is
    // reached, so it grows to four, which is not: it saws between the two.
    let (_, samples) = drive(limit.clone(), model(10, 1000), 3, Duration::from_secs(3)).await;
    assert!(samples.iter().any(|l| *l <= 4), "{samples:?}");
    assert!(
        samples
            .iter()
            .skip_while(|l| **l > 4)
            .all(|l| (3..=4).contains(l)),
        "{samples:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_stall_of_every_call_cuts_once_not_once_per_window() {
    let limit = adaptive(40, 1, 40);
    let m = model(10, 1000);
    // Steady at the ceiling for a while: the RTT history is 10 ms.
    drive(limit.clone(), m.clone(), 40, Duration::from_secs(1)).await;
    assert_eq!(limit.limit(), 40);
    // Then the client stalls: the calls under way are answered late, a
    // group at a time, each later than the last. The windows that close on
    // those answers are judged on calls all sent before the first cut.
    let mut calls = Vec::new();
    for _ in 0..40 {
        calls.push(limit.call());
    }
    tokio::time::advance(Duration::from_millis(15)).await;
    for (i, call) in calls.into_iter().enumerate() {
        limit.record(call, Feedback::Answered);
        if i % 8 == 7 {
            tokio::time::advance(Duration::from_millis(12)).await;
        }
    }
    assert_eq!(limit.limit(), 36, "one cut of a tenth");
}

#[tokio::test(start_paused = true)]
async fn the_limit_stops_at_its_ceiling() {
    let limit = adaptive(4, 1, 20);
    let (_, samples) = drive(limit.clone(), model(10, 1000), 200, Duration::from_secs(1)).await;
    assert_eq!(limit.limit(), 20);
    assert!(samples.iter().all(|l| *l <= 20), "{samples:?}");
}

#[tokio::test(start_paused = true)]
async fn back_pressure_cuts_the_limit_by_a_tenth_per_window_down_to_its_floor() {
    let limit = adaptive(100, 5, 200);
    let m = model(10, 1000);
    m.failing.store(true, Ordering::Release);
    // The first answers (at 10 ms) open the window; it closes one RTT later:
    // hundreds of errors, one cut per 10 ms window after the first.
    let started = Instant::now();
    let (errors, _) = drive(limit.clone(), m.clone(), 200, Duration::from_millis(25)).await;
    let windows = (started.elapsed().as_millis() / 10) as usize;
    let cuts: Vec<usize> =
        std::iter::successors(Some(100usize), |l| Some((*l as f64 * 0.9) as usize))
            .take(windows)
            .collect();
    assert!(errors >= 400, "{errors}");
    assert!(limit.limit() < 100, "no cut");
    assert!(
        cuts.contains(&limit.limit()),
        "{} after {windows} windows",
        limit.limit()
    );
    let (_, samples) = drive(limit.clone(), m, 200, Duration::from_secs(2)).await;
    assert_eq!(limit.limit(), 5, "{samples:?}");
    assert!(samples.iter().all(|l| *l >= 5), "{samples:?}");
}

#[tokio::test(start_paused = true)]
async fn the_limit_settles_near_the_downstreams_capacity_and_follows_it() {
    let limit = adaptive(4, 1, 500);
    let m = model(10, 48);
    drive(limit.clone(), m.clone(), 500, Duration::from_secs(5)).await;
    let at48 = limit.limit();
    assert!((36..=60).contains(&at48), "at capacity 48: {at48}");
    m.capacity.store(12, Ordering::Release);
    let (_, samples) = drive(limit.clone(), m.clone(), 500, Duration::from_secs(5)).await;
    let at12 = limit.limit();
    assert!(
        (9..=15).contains(&at12),
        "at capacity 12: {at12}, {samples:?}"
    );
    m.capacity.store(32, Ordering::Release);
    drive(limit.clone(), m, 500, Duration::from_secs(5)).await;
    let at32 = limit.limit();
    assert!((24..=40).contains(&at32), "at capacity 32: {at32}");
}

#[tokio::test(start_paused = true)]
async fn a_cut_lets_work_in_flight_finish_and_takes_no_more_until_under_it() {
    let limit = adaptive(10, 1, 10);
    let mut held = Vec::new();
    for _ in 0..10 {
        let mut s = limit.acquire().await.expect("slot");
        s.busy();
        held.push(s);
    }
    // Back-pressure over a window: 10 → 9, with every slot in use.
    limit.record(limit.call(), Feedback::BackPressure);
    tokio::time::advance(Duration::from_millis(2)).await;
    limit.record(limit.call(), Feedback::BackPressure);
    assert_eq!(limit.limit(), 9);
    assert_eq!(limit.in_flight(), 10);
    // The first slot back pays the debt; only the second frees room.
    held.pop();
    let mut next = Box::pin(limit.acquire());
    assert!(futures::poll!(&mut next).is_pending());
    held.pop();
    assert!(futures::poll!(&mut next).is_ready());
}

#[test]
fn fixed_mode_is_the_stage_concurrency() {
    let limit = ConcurrencyLimit::new(&ConcurrencyConfig::default(), 64, metrics());
    assert_eq!(limit.limit(), 64);
    limit.record(limit.call(), Feedback::BackPressure);
    assert_eq!(limit.limit(), 64);
}

#[test]
fn bad_bounds_are_named() {
    let cfg = |initial, min, max| ConcurrencyConfig {
        mode: Mode::Adaptive,
        initial,
        min,
        max,
    };
    assert_eq!(cfg(8, 1, 256).problem(), None);
    assert_eq!(cfg(8, 0, 256).problem().map(|p| p.0), Some("min"));
    assert_eq!(cfg(300, 1, 256).problem().map(|p| p.0), Some("initial"));
    assert_eq!(cfg(8, 1, 0).problem().map(|p| p.0), Some("max"));
    assert_eq!(cfg(8, 9, 8).problem().map(|p| p.0), Some("min"));
}

/// The median and the largest of each `slice`-long run of 100 ms samples.
fn slices(samples: &[usize], slice: Duration) -> Vec<(usize, usize)> {
    let per = (slice.as_millis() / 100) as usize;
    samples
        .chunks(per)
        .filter(|c| c.len() == per)
        .map(|c| {
            let mut c = c.to_vec();
            c.sort_unstable();
            (c[c.len() / 2], c[c.len() - 1])
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_queue_at_the_downstream_does_not_creep_the_limit_up() {
    // Two minutes against a steady downstream of capacity 12: the saw's
    // low point carries a small queue, and a base taken from it would rise
    // a few per cent per period and take the limit with it (it reached 30
    // in two minutes before the probe measured the base).
    let limit = adaptive(8, 1, 500);
    let (_, samples) = drive(limit.clone(), model(10, 12), 500, Duration::from_secs(120)).await;
    let slices = slices(&samples, Duration::from_secs(20));
    assert_eq!(slices.len(), 6, "{samples:?}");
    for (median, max) in &slices {
        assert!((9..=15).contains(median), "{slices:?}");
        assert!(*max <= 18, "{slices:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_client_host_that_slows_with_its_own_load_is_believed_within_a_few_probes() {
    // Capacity 48 at 50 ms (paused time rounds each sleep up to the
    // millisecond: 50 ms keeps that under 2 %), but every call in flight
    // adds 0.6 ms at the client (a busy host): 8 calls take 54.8 ms, 30
    // take 68 ms. A base kept from the first windows would read that as a
    // queue and hold the limit near 13; the probe at four fifths of the
    // limit shows the RTT is the host's and is believed, and the limit
    // climbs until a fifth more calls cost the busy mark's few per cent
    // more RTT (past 40 here), never past the capacity, where the queue
    // begins.
    let limit = adaptive(8, 1, 500);
    let mut m = model(50, 48);
    m.host_per_call = Duration::from_micros(600);
    drive(limit.clone(), m.clone(), 500, BASE_PERIOD * 10).await;
    let (_, samples) = drive(limit.clone(), m, 500, Duration::from_secs(30)).await;
    let slices = slices(&samples, Duration::from_secs(30));
    let (median, max) = slices[0];
    assert!((32..=48).contains(&median), "{samples:?}");
    assert!(max <= 52, "{samples:?}");
}

/// When the limit entered `capacity ± 25 %` for good, 100 ms samples.
fn settled(samples: &[usize], capacity: usize) -> Option<Duration> {
    let band = (capacity as f64 * 0.75)..=(capacity as f64 * 1.25);
    let out = samples.iter().rposition(|l| !band.contains(&(*l as f64)));
    match out {
        None => Some(Duration::ZERO),
        Some(i) if i + 1 < samples.len() => Some(Duration::from_millis(100 * (i as u64 + 1))),
        Some(_) => None,
    }
}

#[tokio::test(start_paused = true)]
async fn a_capacity_schedule_is_followed_and_settles_within_the_band() {
    // The benchmark's schedule 48 → 12 → 32 at 50 ms (paused time rounds
    // sleeps to the millisecond; 50 ms keeps that under 2 %), each call's
    // RTT ±10 % at random, a host adding 0.15 ms per call in flight. At
    // 50 ms a window is five times as long as at the benchmark's 10 ms, so
    // its 5 s to settle are 25 s here.
    let limit = adaptive(8, 1, 500);
    let mut m = model(50, 48);
    m.queue_limit = 16;
    m.jitter = 0.1;
    m.host_per_call = Duration::from_micros(150);
    for cap in [48, 12, 32] {
        m.capacity.store(cap, Ordering::Release);
        let (_, samples) = drive(limit.clone(), m.clone(), 500, Duration::from_secs(60)).await;
        // Settled within 25 s but for the odd sample a noisy climb takes
        // one call past the band (for 12, one call is 8 %): 97 % of the
        // samples after it in the band, the median in the hold band.
        let after = &samples[250..];
        let band = |l: &usize| (*l as f64 - cap as f64).abs() <= 0.25 * cap as f64;
        let inside = after.iter().filter(|l| band(l)).count() as f64 / after.len() as f64;
        let mut sorted = after.to_vec();
        sorted.sort_unstable();
        let median = sorted[sorted.len() / 2];
        assert!(
            inside >= 0.97 && (cap..=cap + cap / 5).contains(&median),
            "capacity {cap}: {inside:.3} in the band, median {median}, settled {:?}, {samples:?}",
            settled(&samples, cap)
        );
    }
}
