//! `conveyor dlq`: the dead-letter destination of either broker, inspected
//! and worked off. `stats`, `list` and `show` read without removing
//! anything; `replay` moves matching dead letters back to the source
//! queue/topic and `purge` drops them.
//!
//! A replay *moves* a message: it leaves the dead-letter destination only
//! after its republish is confirmed (RabbitMQ: `basic.get`, publish with a
//! confirm, then `basic.ack`; Kafka: a replay consumer group whose offsets
//! are committed only after the produce is acknowledged), so an interrupted
//! replay loses nothing — at worst a message is both replayed and still
//! there, and the daemon's idempotency makes the second copy a no-op. A
//! replayed order that is still poison comes back to the dead letters, with
//! its reason, through the daemon.

pub mod kafka;
pub mod rabbitmq;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;

/// Header names the daemon's dead-letter publishers set.
pub const REASON: &str = "x-conveyor-reason";
pub const DETAIL: &str = "x-conveyor-detail";
pub const STAGE: &str = "x-conveyor-stage";
pub const FAILED_AT: &str = "x-conveyor-failed-at";
pub const ORDER_ID: &str = "x-conveyor-order-id";
/// Set on a replayed message: when, and how many times so far.
pub const REPLAYED_AT: &str = "x-conveyor-replayed-at";
pub const REPLAYS: &str = "x-conveyor-replays";

/// One dead letter as the tools see it.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetterMsg {
    /// Where it sits: `#n` (RabbitMQ, n-th from the head) or
    /// `topic/partition@offset` (Kafka).
    pub position: String,
    pub headers: BTreeMap<String, String>,
    /// The message body (UTF-8, lossily, for display).
    pub body: String,
    #[serde(skip)]
    pub raw: Vec<u8>,
    /// Kafka: the message key.
    #[serde(skip)]
    pub key: Option<Vec<u8>>,
}

impl DeadLetterMsg {
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(String::as_str).unwrap_or("")
    }
    pub fn reason(&self) -> &str {
        match self.header(REASON) {
            "" => "unknown",
            r => r,
        }
    }
    pub fn stage(&self) -> &str {
        self.header(STAGE)
    }
    pub fn order_id(&self) -> &str {
        self.header(ORDER_ID)
    }
    pub fn failed_at(&self) -> Option<DateTime<Utc>> {
        DateTime::parse_from_rfc3339(self.header(FAILED_AT))
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }
    /// How many times it was replayed before.
    pub fn replays(&self) -> u32 {
        self.header(REPLAYS).parse().unwrap_or(0)
    }
}

/// Which dead letters a command applies to; every given condition must hold.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub reason: Option<String>,
    pub stage: Option<String>,
    pub order_id: Option<String>,
    /// Bounds on `x-conveyor-failed-at`: `since` inclusive, `until` exclusive.
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
}

impl Filter {
    pub fn matches(&self, m: &DeadLetterMsg) -> bool {
        let time_ok = match (self.since, self.until) {
            (None, None) => true,
            (since, until) => m
                .failed_at()
                .is_some_and(|t| since.is_none_or(|s| t >= s) && until.is_none_or(|u| t < u)),
        };
        time_ok
            && self.reason.as_deref().is_none_or(|r| m.reason() == r)
            && self.stage.as_deref().is_none_or(|s| m.stage() == s)
            && self.order_id.as_deref().is_none_or(|o| m.order_id() == o)
    }
}

/// Counts by reason and stage, and the time span.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Stats {
    pub destination: String,
    pub total: u64,
    /// `reason` → `stage` → count.
    pub by_reason: BTreeMap<String, BTreeMap<String, u64>>,
    pub oldest: Option<DateTime<Utc>>,
    pub newest: Option<DateTime<Utc>>,
}

impl Stats {
    pub fn add(&mut self, m: &DeadLetterMsg) {
        self.total += 1;
        *self
            .by_reason
            .entry(m.reason().to_string())
            .or_default()
            .entry(m.stage().to_string())
            .or_default() += 1;
        if let Some(t) = m.failed_at() {
            self.oldest = Some(self.oldest.map_or(t, |o| o.min(t)));
            self.newest = Some(self.newest.map_or(t, |n| n.max(t)));
        }
    }

    pub fn render(&self) -> String {
        let mut out = format!("dead letters in {}: {}\n", self.destination, self.total);
        if let (Some(o), Some(n)) = (self.oldest, self.newest) {
            out += &format!("  oldest {o}\n  newest {n}\n");
        }
        if self.total > 0 {
            out += &format!("  {:<24} {:<10} {:>10}\n", "reason", "stage", "count");
            for (reason, stages) in &self.by_reason {
                for (stage, n) in stages {
                    out += &format!("  {reason:<24} {stage:<10} {n:>10}\n");
                }
            }
        }
        out
    }
}

/// What to do with each matching dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Replay,
    Purge,
}

/// Limits of a replay or purge.
#[derive(Debug, Clone, Default)]
pub struct MoveOpts {
    pub filter: Filter,
    /// At most this many messages are replayed/purged.
    pub limit: Option<u64>,
    /// Messages per second at most.
    pub rate: Option<f64>,
    /// Count what would be done, change nothing.
    pub dry_run: bool,
}

/// What a replay or purge did.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct MoveReport {
    /// Dead letters looked at.
    pub examined: u64,
    /// Matching ones replayed/purged (with `--dry-run`: that would be).
    pub moved: u64,
    /// Left in place (not matching, or past the limit).
    pub kept: u64,
}

/// Paces an operation to at most `rate` per second: operation `n` is due
/// at `start + n / rate`.
pub(crate) struct Pace {
    rate: Option<f64>,
    start: Instant,
}

impl Pace {
    pub(crate) fn new(rate: Option<f64>) -> Self {
        Self {
            rate: rate.filter(|r| r.is_finite() && *r > 0.0),
            start: Instant::now(),
        }
    }

    pub(crate) async fn wait(&self, n: u64) {
        if let Some(r) = self.rate {
            if let Some(due) = Duration::try_from_secs_f64(n as f64 / r)
                .ok()
                .and_then(|d| self.start.checked_add(d))
            {
                tokio::time::sleep_until(due.into()).await;
            }
        }
    }
}

/// One line of `dlq list`.
pub fn list_line(m: &DeadLetterMsg) -> String {
    let mut detail: String = m.header(DETAIL).chars().take(100).collect();
    if detail.len() < m.header(DETAIL).len() {
        detail.push('…');
    }
    format!(
        "{:<22} {:<32} {:<20} {:<9} {:<28} {}",
        m.position,
        m.header(FAILED_AT),
        m.reason(),
        m.stage(),
        m.order_id(),
        detail
    )
}

/// `dlq show`: every header, then the body.
pub fn show_block(m: &DeadLetterMsg) -> String {
    let mut out = format!("── {}\n", m.position);
    for (k, v) in &m.headers {
        out += &format!("{k}: {v}\n");
    }
    out += &format!("\n{}\n", m.body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(reason: &str, at: &str, id: &str) -> DeadLetterMsg {
        let headers = [
            (REASON, reason),
            (STAGE, "decode"),
            (FAILED_AT, at),
            (ORDER_ID, id),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        DeadLetterMsg {
            position: "#0".into(),
            headers,
            body: String::new(),
            raw: Vec::new(),
            key: None,
        }
    }

    #[test]
    fn filters_combine_and_time_bounds_need_a_failure_time() {
        let m = letter("schema", "2026-11-22T10:00:00+00:00", "o-1");
        let t = |s: &str| Some(s.parse::<DateTime<Utc>>().expect("time"));
        assert!(Filter::default().matches(&m));
        let f = Filter {
            reason: Some("schema".into()),
            since: t("2026-11-22T10:00:00Z"),
            until: t("2026-11-22T11:00:00Z"),
            ..Filter::default()
        };
        assert!(f.matches(&m));
        assert!(!Filter {
            until: t("2026-11-22T10:00:00Z"),
            ..f.clone()
        }
        .matches(&m));
        assert!(!Filter {
            order_id: Some("o-2".into()),
            ..f.clone()
        }
        .matches(&m));
        assert!(!f.matches(&letter("schema", "", "o-1")));
    }

    #[test]
    fn stats_count_by_reason_and_stage_and_span_the_times() {
        let mut s = Stats::default();
        s.add(&letter("schema", "2026-11-22T10:00:00Z", "a"));
        s.add(&letter("schema", "2026-11-22T09:00:00Z", "b"));
        s.add(&letter("too_large", "2026-11-22T11:00:00Z", "c"));
        assert_eq!(s.total, 3);
        assert_eq!(s.by_reason["schema"]["decode"], 2);
        assert_eq!(s.oldest, Some("2026-11-22T09:00:00Z".parse().expect("t")));
        assert_eq!(s.newest, Some("2026-11-22T11:00:00Z".parse().expect("t")));
        assert!(s.render().contains("too_large"));
    }
}
