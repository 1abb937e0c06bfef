use prometheus::Histogram;
use tokio::sync::Semaphore;

use super::*;
use crate::downstream::concurrency::{ConcurrencyConfig, ConcurrencyMetrics};

fn gauge() -> IntGauge {
    IntGauge::new("prefetch_limit", "limit").expect("gauge")
}

fn fixed(limit: usize) -> Arc<ConcurrencyLimit> {
    Arc::new(ConcurrencyLimit::new(
        &ConcurrencyConfig::default(),
        limit,
        ConcurrencyMetrics {
            downstream: "test",
            limit: IntGauge::new("limit", "limit").expect("gauge"),
            in_flight: IntGauge::new("in_flight", "in flight").expect("gauge"),
            rtt: Histogram::with_opts(prometheus::HistogramOpts::new("rtt", "rtt"))
                .expect("histogram"),
        },
    ))
}

#[test]
fn the_target_is_the_stage_limits_plus_the_batch_plus_slack_within_its_bounds() {
    assert_eq!(target(8, 1, 1, 512), 8 + 1 + SLACK);
    assert_eq!(target(128, 600, 16, 512), 512, "the ceiling");
    assert_eq!(target(0, 0, 16, 512), 16, "the floor");
    assert_eq!(target(8, 0, 40, 32), 40, "a floor over the ceiling wins");
}

#[test]
fn the_batch_term_is_what_the_batcher_holds_at_the_rate_with_headroom() {
    let cycle = Duration::from_millis(25);
    // A replica whose charge stage does 4 calls of 200 ms: 20 orders/s.
    assert_eq!(batch_term(20.0, cycle, 256, 2), 2);
    assert_eq!(batch_term(1.0, cycle, 256, 2), 0, "under half an order");
    // A fast one: 4 × 5,000/s × 25 ms = 500, under 3 batches of 256.
    assert_eq!(batch_term(5_000.0, cycle, 256, 2), 500);
    assert_eq!(batch_term(100_000.0, cycle, 256, 2), 768, "capped");
    assert_eq!(batch_term(0.0, cycle, 256, 2), 0, "idle");
    assert_eq!(batch_term(-1.0, cycle, 256, 2), 0);
}

#[test]
fn the_hoarding_replica_holds_its_stage_limits_and_slack() {
    // Replica B of the hoarding scenario: both stages at 4, 20 orders/s.
    let b = target(
        8,
        batch_term(20.0, Duration::from_millis(25), 256, 2),
        16,
        512,
    );
    assert_eq!(b, 18);
    // Replica A, fast: what `source.prefetch` allows.
    let a = target(
        128,
        batch_term(10_000.0, Duration::from_millis(30), 256, 2),
        16,
        512,
    );
    assert_eq!(a, 512);
}

#[test]
fn raises_apply_at_once_and_cuts_after_a_few_intervals_below() {
    let mut h = Hysteresis::default();
    assert_eq!(h.next(100, 120), Some(120));
    assert_eq!(h.next(120, 120), None);
    assert_eq!(h.next(120, 90), None);
    assert_eq!(h.next(120, 110), None);
    assert_eq!(h.next(120, 100), Some(110), "the highest of the three");
    assert_eq!(h.next(110, 100), None);
    assert_eq!(h.next(110, 130), Some(130), "a raise resets the count");
    assert_eq!(h.next(130, 100), None);
    assert_eq!(h.next(130, 100), None);
    assert_eq!(h.next(130, 100), Some(100));
}

#[tokio::test]
async fn a_cut_waits_for_held_permits_and_a_raise_cancels_the_debt_first() {
    let p = Prefetch::new(10, gauge());
    let mut held = Vec::new();
    for _ in 0..10 {
        held.push(p.acquire().await.expect("permit"));
    }
    p.resize(4);
    assert_eq!((p.limit(), p.available()), (4, 0));
    assert_eq!(*p.subscribe().borrow(), 4);
    // The first six settled are forgotten: the daemon holds four, the limit.
    for _ in 0..6 {
        held.pop();
    }
    assert_eq!(p.available(), 0, "4 held, limit 4");
    held.pop();
    assert_eq!(p.available(), 1, "3 held, limit 4");

    // Cut below what is held again, then raise before the debt is paid:
    // the raise pays it off instead of adding permits.
    p.resize(1);
    assert_eq!(p.available(), 0, "the free one forgotten, 2 still owed");
    p.resize(3);
    assert_eq!(p.available(), 0, "3 held, limit 3: nothing to add");
    held.pop();
    assert_eq!(p.available(), 1, "2 held, limit 3");
    drop(held);
    assert_eq!(p.available(), 3, "every permit back, exactly the limit");
}

#[tokio::test]
async fn a_permit_of_a_plain_semaphore_is_released_as_it_was() {
    let s = Arc::new(Semaphore::new(1));
    let p: PrefetchPermit = s.clone().try_acquire_owned().expect("permit").into();
    assert_eq!(s.available_permits(), 0);
    drop(p);
    assert_eq!(s.available_permits(), 1);
}

/// `follow` with paused time: acks counted at 20/s hold the limit at the
/// stages' limits and slack; at 20,000/s it climbs to the ceiling; idle it
/// comes back down, all in a few intervals.
#[tokio::test(start_paused = true)]
async fn the_limit_follows_the_rate_and_the_stage_limits() {
    let metrics = Arc::new(Metrics::new().expect("metrics"));
    let stages = vec![fixed(4), fixed(4)];
    let inputs = FollowInputs {
        stages,
        floor: 4,
        ceiling: 512,
        batch_max_size: 256,
        batch_writers: 2,
        batch_max_wait: Duration::from_millis(20),
    };
    assert_eq!(inputs.initial(), 16);
    let prefetch = Arc::new(Prefetch::new(inputs.initial(), gauge()));
    let stop = CancellationToken::new();
    let task = tokio::spawn(follow(
        prefetch.clone(),
        inputs,
        metrics.clone(),
        stop.clone(),
    ));
    let run = |per_interval: u64, intervals: usize| {
        let metrics = metrics.clone();
        async move {
            for _ in 0..intervals {
                metrics.acked.inc_by(per_interval);
                tokio::time::sleep(FOLLOW_INTERVAL).await;
            }
        }
    };
    // Acks land between the follower's ticks.
    tokio::time::sleep(FOLLOW_INTERVAL / 2).await;
    run(2, 20).await;
    assert_eq!(prefetch.limit(), 4 + 4 + 2 + SLACK, "20/s");
    run(2_000, 10).await;
    assert_eq!(prefetch.limit(), 512, "20,000/s: the ceiling");
    run(0, 30).await;
    assert_eq!(prefetch.limit(), 4 + 4 + SLACK, "idle: the stages alone");
    stop.cancel();
    task.await.expect("follow ends on stop");
}
