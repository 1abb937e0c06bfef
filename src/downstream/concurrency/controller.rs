//! The adaptive controller's state and rules (the module doc of
//! [`super`] says what they are and why).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::{
    Feedback, BASE_PERIOD, DECREASE_RATIO, EWMA_ALPHA, MIN_WINDOW, PROBE_AFTER_CUT, PROBE_RATIO,
    PROBE_WINDOWS, QUEUE_K, QUEUE_TOLERANCE, REACHED_SHARE, UNUSED_FOR,
};

/// The AIMD state (see the module doc). Times in seconds.
#[derive(Debug, Default)]
pub(super) struct Controller {
    /// The downstream, for the log lines.
    downstream: &'static str,
    min: usize,
    max: usize,
    /// EWMA of every window's mean RTT, failures included: the window's
    /// length.
    span: Option<f64>,
    /// EWMA of the calls under way on average over each window.
    busy: Option<f64>,
    /// EWMA of the good windows' mean RTT, and its variance.
    mean: Option<f64>,
    var: f64,
    /// The last two good windows' mean RTT since the limit last jumped.
    recent: [Option<f64>; 2],
    /// The RTT the latest believed probe measured.
    base_probe: Option<f64>,
    /// Until a probe is believed: the least smoothed RTT.
    base_since: Option<f64>,
    /// When the next probe is due; the one under way.
    next_probe: Option<Instant>,
    probe: Option<Probe>,
    /// When the limit was last cut for back-pressure or a queue: only calls
    /// sent after it are evidence for the next cut.
    last_cut: Option<Instant>,
    /// Since when no window reached the limit, and the most calls used
    /// since (one more than those kept under way on average, at most the
    /// most under way at once).
    unreached_since: Option<Instant>,
    unreached_peak: usize,
    window: Window,
}

/// A probe under way: the limit held at [`PROBE_RATIO`] of `resume` until
/// [`PROBE_WINDOWS`] windows have answered calls sent at it.
#[derive(Debug)]
struct Probe {
    resume: usize,
    /// The probe's limit as a share of `resume`.
    ratio: f64,
    /// The smoothed RTT at `resume` when the probe began.
    before: Option<f64>,
    sum: f64,
    n: u32,
    windows: u32,
}

impl Probe {
    /// Whether `rtt`, measured at the probe's limit, is the unloaded RTT: it
    /// is if it is less than the base, or if it did not fall with the limit
    /// by even half as much — calls that queue at the downstream take time
    /// in proportion to how many there are, so a probe that still queues
    /// sees the RTT fall by the probe's ratio, while a downstream or a host
    /// that really got slower is as slow at the lower limit.
    fn believed(&self, rtt: f64, base: Option<f64>) -> bool {
        // A probe at the floor cannot go lower: what it sees is the best
        // there is.
        let floor = self.ratio >= 1.0;
        let lower = base.is_none_or(|base| rtt <= base);
        let steady = self
            .before
            .is_none_or(|before| rtt >= before * (1.0 + self.ratio) / 2.0);
        floor || lower || steady
    }
}

/// What one window saw.
#[derive(Debug, Default)]
struct Window {
    start: Option<Instant>,
    /// Answered calls: summed RTT, count.
    rtt_sum: f64,
    rtt_n: u32,
    /// Every call, failures included.
    all_sum: f64,
    all_n: u32,
    /// Answered calls sent after the last cut.
    fresh_sum: f64,
    fresh_n: u32,
    /// Back-pressure on a call sent after the last cut.
    back_pressure: bool,
    /// Back-pressure on any call: the window's RTT is not the norm.
    troubled: bool,
}

fn ewma(avg: &mut Option<f64>, x: f64) {
    let prev = avg.unwrap_or(x);
    *avg = Some(prev + EWMA_ALPHA * (x - prev));
}

impl Controller {
    pub(super) fn new(downstream: &'static str, min: usize, max: usize) -> Self {
        Self {
            downstream,
            min,
            max,
            ..Self::default()
        }
    }

    pub(super) fn sample(&mut self, sent: Instant, rtt: f64, feedback: Feedback) {
        let w = &mut self.window;
        let fresh = self.last_cut.is_none_or(|cut| sent >= cut);
        w.all_sum += rtt;
        w.all_n += 1;
        match feedback {
            Feedback::Answered => {
                w.rtt_sum += rtt;
                w.rtt_n += 1;
                if fresh {
                    w.fresh_sum += rtt;
                    w.fresh_n += 1;
                }
            }
            Feedback::BackPressure => {
                w.troubled = true;
                w.back_pressure |= fresh;
            }
        }
    }

    /// Closes the window if it is one RTT old; the new limit, if it moved.
    /// `peak` holds the most calls under way at once since the window began.
    pub(super) fn judge(
        &mut self,
        now: Instant,
        limit: usize,
        peak: &AtomicUsize,
        calls: usize,
    ) -> Option<usize> {
        let moved = self.decide(now, limit, peak, calls);
        if moved.is_some_and(|new| new < limit || new > limit + 1) {
            // A jump is not noise: the next windows' differences start
            // from it.
            self.recent = [None, None];
        }
        moved
    }

    fn decide(
        &mut self,
        now: Instant,
        limit: usize,
        peak: &AtomicUsize,
        calls: usize,
    ) -> Option<usize> {
        let start = *self.window.start.get_or_insert(now);
        // Before any window closed, the first answers' RTT is the length.
        let first = self.window.all_sum / f64::from(self.window.all_n.max(1));
        let length = Duration::from_secs_f64(self.span.unwrap_or(first)).max(MIN_WINDOW);
        let elapsed = now.duration_since(start);
        if elapsed < length {
            return None;
        }
        let peak = peak.swap(calls, Ordering::AcqRel);
        let w = std::mem::replace(
            &mut self.window,
            Window {
                start: Some(now),
                ..Window::default()
            },
        );
        // The calls under way on average over the window (Little's law): a
        // limit that only a burst's peak reached is not one the downstream
        // was worked at.
        let busy = w.all_sum / elapsed.as_secs_f64().max(f64::EPSILON);
        ewma(&mut self.busy, busy);
        let worked = self.busy.unwrap_or(busy);
        // Within a call of the share: a window that grew the limit by one
        // shows the calls of the limit before.
        let reached = peak >= limit && worked + 1.0 >= REACHED_SHARE * limit as f64;
        let mean_of = |sum: f64, n: u32| (n > 0).then(|| sum / f64::from(n));
        let current = mean_of(w.rtt_sum, w.rtt_n);
        let fresh = mean_of(w.fresh_sum, w.fresh_n);
        if let Some(all) = mean_of(w.all_sum, w.all_n) {
            ewma(&mut self.span, all);
        }
        // The deviation of the smoothed RTT before this window, which the
        // marks read: σ of a window's RTT times √(α / (2 − α)).
        let sigma = (self.var * EWMA_ALPHA / (2.0 - EWMA_ALPHA)).sqrt();
        if let (false, Some(rtt)) = (w.troubled, current) {
            ewma(&mut self.mean, rtt);
            if let [Some(older), Some(last)] = self.recent {
                // The second difference of three windows: a steady climb
                // (the limit's own +1 per window) leaves none of it, noise
                // of deviation σ gives it a variance of 6σ².
                let d2 = rtt - 2.0 * last + older;
                self.var = (1.0 - EWMA_ALPHA) * self.var + EWMA_ALPHA * d2 * d2 / 6.0;
            }
            self.recent = [self.recent[1], Some(rtt)];
            if let Some(smoothed) = self.mean {
                self.base_since = Some(self.base_since.map_or(smoothed, |b| b.min(smoothed)));
            }
        }
        let next_probe = *self.next_probe.get_or_insert(now + BASE_PERIOD);
        if let Some(mut probe) = self.probe.take() {
            if w.back_pressure {
                // The downstream pushes back even at the probe's limit: the
                // probe ends, the back-pressure rule below cuts from there,
                // and it measures again a period later.
                self.next_probe = Some(now + BASE_PERIOD);
            } else {
                if w.fresh_n > 0 {
                    probe.sum += w.fresh_sum;
                    probe.n += w.fresh_n;
                    probe.windows += 1;
                }
                if probe.windows < PROBE_WINDOWS {
                    self.probe = Some(probe);
                    return None;
                }
                self.next_probe = Some(now + BASE_PERIOD);
                let rtt = probe.sum / f64::from(probe.n.max(1));
                let believed = probe.believed(rtt, self.base());
                tracing::trace!(
                    downstream = self.downstream,
                    limit,
                    resume = probe.resume,
                    rtt,
                    before = probe.before,
                    base = self.base(),
                    believed,
                    "probe ended"
                );
                if believed {
                    self.base_probe = Some(rtt);
                    self.base_since = None;
                    self.unreached_since = None;
                    self.unreached_peak = 0;
                    let new = probe.resume.clamp(self.min, self.max);
                    return (new != limit).then_some(new);
                }
                // The RTT fell with the limit: the calls queued at the
                // downstream even at the probe's limit, or the base was
                // measured low. The base stays and so does the probe's
                // limit; the rules below move it from the next window on
                // (a cut now would compound with the probe's).
                self.unreached_since = None;
                self.unreached_peak = 0;
                return None;
            }
        } else if now >= next_probe
            && reached
            && self
                .mean
                .zip(self.mark(QUEUE_TOLERANCE / 2.0, sigma))
                .is_none_or(|(mean, busy)| mean >= busy)
            && self
                .last_cut
                .is_none_or(|cut| now.duration_since(cut) >= length * PROBE_AFTER_CUT)
        {
            // Only when the RTT is over the busy mark: under it the calls
            // see the downstream all but unloaded, and a probe would dip a
            // limit still climbing towards the capacity. Not just after a
            // cut either: that limit is under the one the downstream was
            // worked at, and a probe under it would dip the limit twice.
            // Calls sent from now on are the probe's: they go out only as
            // the calls under way fall under its limit.
            self.last_cut = Some(now);
            let at = self.scaled(limit, PROBE_RATIO).min(limit - 1).max(self.min);
            self.probe = Some(Probe {
                resume: limit,
                ratio: at as f64 / limit as f64,
                before: self.mean,
                sum: 0.0,
                n: 0,
                windows: 0,
            });
            return (at != limit).then_some(at);
        }
        // Calls show a queue when their mean RTT and the smoothed one are
        // both above the unloaded RTT by the tolerance: judged on the
        // smoothed RTT, so one lucky window does not become the norm nor
        // one unlucky window a queue; on the calls' own too, because the
        // smoothed RTT lags and a cut that worked shows at once in the
        // calls sent after it, which must stop the cutting before the mean
        // catches up.
        let queue_mark = self.mark(QUEUE_TOLERANCE, sigma);
        let busy_mark = self
            .mark(QUEUE_TOLERANCE / 2.0, sigma)
            .or(Some(f64::INFINITY));
        let smoothed = self.mean;
        let inflated = |rtt: Option<f64>| match (rtt, smoothed, queue_mark) {
            (Some(rtt), Some(mean), Some(over)) => mean >= over && rtt >= over,
            _ => false,
        };
        let since = if reached {
            self.unreached_since = None;
            self.unreached_peak = 0;
            now
        } else {
            let used = (worked.ceil() as usize + 1).min(peak);
            self.unreached_peak = self.unreached_peak.max(used);
            *self.unreached_since.get_or_insert(start)
        };
        // Cut only on calls sent after the last cut (a stall or a burst of
        // errors that they all met is one event, not one per window); grow
        // only when no call of the window, however old, saw trouble.
        let new = if w.back_pressure || inflated(fresh) {
            self.last_cut = Some(now);
            self.scaled(limit, DECREASE_RATIO)
        } else if reached
            && !w.troubled
            && current.is_some()
            && smoothed
                .zip(busy_mark)
                .is_some_and(|(mean, mark)| mean < mark)
        {
            (limit + 1).min(self.max)
        } else if now.duration_since(since) >= UNUSED_FOR {
            // A limit the calls have not reached for a while says nothing
            // about the downstream: it comes down to one more than the
            // calls kept under way, which the same demand again reaches
            // (and it grows from there, one call per round trip).
            let target = self.unreached_peak.clamp(self.min, self.max);
            self.unreached_since = Some(now);
            self.unreached_peak = 0;
            limit.min(target)
        } else {
            limit
        };
        tracing::trace!(
            downstream = self.downstream,
            limit,
            new,
            rtt = current,
            fresh,
            smoothed,
            base = self.base(),
            sigma,
            worked,
            peak,
            reached,
            back_pressure = w.back_pressure,
            "window judged"
        );
        (new != limit).then_some(new)
    }

    /// `limit` scaled down by `ratio`, not under the floor.
    fn scaled(&self, limit: usize, ratio: f64) -> usize {
        ((limit as f64 * ratio).floor() as usize).max(self.min)
    }

    /// `tolerance` over the unloaded RTT, plus the noise allowance: the busy
    /// mark (half the queue tolerance) and the queue mark.
    fn mark(&self, tolerance: f64, sigma: f64) -> Option<f64> {
        self.base()
            .map(|base| base * (1.0 + tolerance) + QUEUE_K * sigma)
    }

    /// The unloaded RTT: what the latest believed probe measured.
    fn base(&self) -> Option<f64> {
        self.base_probe.or(self.base_since)
    }
}
