//! Whether what the daemon is told to consume can be consumed, so that a
//! permanent problem is never a silent stall:
//!
//! * a configured topic that does not exist or is not authorised (asked of
//!   the broker's metadata every `kafka.lag_interval`):
//!   `conveyor_kafka_topic_unavailable{topic}` = 1;
//! * a permanent consumer error (a codec this build cannot decode, a
//!   corrupt batch, a topic gone): `conveyor_kafka_consumer_errors_total{code}`;
//!   librdkafka reports it without the partition, so a partition is named
//!   *stuck* (`conveyor_kafka_partition_stuck{topic,partition}` = 1) when,
//!   with such errors recurring, it has lag, nothing in flight and its
//!   committed offset has not moved for [`STUCK_AFTER`].
//!
//! * the broker refusing this client's authentication (SASL: a wrong
//!   password, an unknown user, a mechanism the broker does not offer),
//!   from librdkafka's global errors: counted as
//!   `conveyor_kafka_consumer_errors_total{code="Authentication"}`; it clears
//!   once the broker answers a metadata request.
//!
//! Each makes `/readyz` answer 503 with the reason, until it clears, and is
//! logged when it starts and then at most once every [`LOG_EVERY`]
//! (librdkafka logs each refused login itself).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

use super::offsets::TopicPartition;
use crate::telemetry::{Metrics, ReadinessCheck};

/// How long a partition with lag must make no progress, with permanent
/// consumer errors recurring, to be reported stuck.
pub const STUCK_AFTER: Duration = Duration::from_secs(10);
/// A permanent consumer error counts as recurring for this long after it
/// was last seen.
const RECENT: Duration = Duration::from_secs(30);
/// The same problem is logged at most this often.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// Whether a consumer error is permanent: retrying the same fetch gives the
/// same answer, so the partition (or topic) cannot move on by itself.
pub fn is_permanent(e: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::BadCompression
                | C::NotImplemented
                | C::BadMessage
                | C::InvalidMessage
                | C::UnsupportedCompressionType
                | C::UnsupportedVersion
                | C::UnknownTopicOrPartition
                | C::UnknownTopic
                | C::UnknownPartition
                | C::TopicAuthorizationFailed
                | C::GroupAuthorizationFailed
        )
    )
}

/// The consumability of the subscription, shared by intake (consumer
/// errors), the lag refresh (metadata, progress) and `/readyz`.
pub struct Consumable {
    metrics: Arc<Metrics>,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Consumable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumable")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// False until the first metadata check has answered.
    checked: bool,
    /// Topic -> why it cannot be consumed.
    topics: BTreeMap<String, String>,
    /// The last permanent consumer error and when it was seen.
    last_error: Option<(String, Instant)>,
    /// Why the broker refused to authenticate this client, until it answers.
    refused_login: Option<String>,
    /// Per owned partition: the committed offset last seen and since when.
    progress: BTreeMap<(String, i32), (i64, Instant)>,
    /// Stuck partitions -> why.
    stuck: BTreeMap<(String, i32), String>,
    /// Problem -> when it was last logged.
    logged: BTreeMap<String, Instant>,
}

impl Inner {
    /// Logs `problem` now if it is new or was last logged [`LOG_EVERY`] ago.
    fn should_log(&mut self, problem: &str) -> bool {
        let now = Instant::now();
        match self.logged.get(problem) {
            Some(at) if now.duration_since(*at) < LOG_EVERY => false,
            _ => {
                self.logged.insert(problem.to_string(), now);
                true
            }
        }
    }
}

/// One owned partition as the lag refresh saw it.
pub struct PartitionSeen {
    pub tp: TopicPartition,
    pub committed: i64,
    pub high: i64,
    pub outstanding: usize,
}

impl Consumable {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            inner: Mutex::default(),
        }
    }

    /// A consumer error from `recv()`; counts and logs it if permanent.
    /// Returns whether it was.
    pub fn consumer_error(&self, e: &KafkaError) -> bool {
        if !is_permanent(e) {
            return false;
        }
        let code = e
            .rdkafka_error_code()
            .map(|c| format!("{c:?}"))
            .unwrap_or_default();
        self.metrics
            .kafka_consumer_errors
            .with_label_values(&[&code])
            .inc();
        let Ok(mut g) = self.inner.lock() else {
            return true;
        };
        let text = e.to_string();
        g.last_error = Some((text.clone(), Instant::now()));
        if g.should_log(&text) {
            tracing::error!(error = %e, code = %code,
                "kafka: permanent consumer error; the partition it concerns cannot move on \
                 (see conveyor_kafka_partition_stuck and /readyz)");
        }
        true
    }

    /// The metadata answer for one configured topic: `None` when it can be
    /// consumed, else the broker's error.
    pub fn topic(&self, topic: &str, problem: Option<String>) {
        let gauge = self
            .metrics
            .kafka_topic_unavailable
            .with_label_values(&[topic]);
        let Ok(mut g) = self.inner.lock() else {
            return;
        };
        match problem {
            Some(why) => {
                gauge.set(1);
                let reason = format!("kafka topic {topic:?} cannot be consumed: {why}");
                if g.should_log(&reason) {
                    tracing::error!(%topic, error = %why,
                        "kafka: a configured topic cannot be consumed (does it exist, is this member authorised?)");
                }
                g.topics.insert(topic.to_string(), reason);
            }
            None => {
                gauge.set(0);
                if g.topics.remove(topic).is_some() {
                    tracing::info!(%topic, "kafka: topic can be consumed again");
                }
            }
        }
    }

    /// A global client error from librdkafka: an authentication failure
    /// makes the daemon not ready, saying why (the reason names the
    /// mechanism and the broker's answer, never the password).
    pub fn client_error(&self, e: &KafkaError, reason: &str) {
        if e.rdkafka_error_code() != Some(RDKafkaErrorCode::Authentication) {
            return;
        }
        self.metrics
            .kafka_consumer_errors
            .with_label_values(&["Authentication"])
            .inc();
        if let Ok(mut g) = self.inner.lock() {
            g.refused_login = Some(format!(
                "kafka: the broker refused authentication (check kafka.security: \
                 sasl_mechanism, username, password): {reason}"
            ));
        }
    }

    /// Every configured topic was asked about once: the broker answered, so
    /// a refused login is over.
    pub fn checked(&self) {
        if let Ok(mut g) = self.inner.lock() {
            g.checked = true;
            g.refused_login = None;
        }
    }

    /// The owned partitions as the lag refresh saw them: flags those that
    /// are stuck behind a recurring permanent consumer error.
    pub fn partitions(&self, seen: &[PartitionSeen]) {
        let Ok(mut g) = self.inner.lock() else {
            return;
        };
        let now = Instant::now();
        let recent_error = g
            .last_error
            .as_ref()
            .filter(|(_, at)| now.duration_since(*at) < RECENT)
            .map(|(e, _)| e.clone());
        let mut still_owned = BTreeMap::new();
        for p in seen {
            let key = (p.tp.0.to_string(), p.tp.1);
            let since = match g.progress.get(&key) {
                Some((c, since)) if *c == p.committed => *since,
                _ => now,
            };
            still_owned.insert(key.clone(), (p.committed, since));
            let gauge = self
                .metrics
                .kafka_partition_stuck
                .with_label_values(&[&key.0, &key.1.to_string()]);
            let stuck = p.high > p.committed
                && p.outstanding == 0
                && now.duration_since(since) >= STUCK_AFTER;
            match (&recent_error, stuck) {
                (Some(e), true) => {
                    gauge.set(1);
                    let reason = format!(
                        "kafka partition {}/{} stuck at offset {} (log end {}) for {} s: {e}",
                        key.0,
                        key.1,
                        p.committed,
                        p.high,
                        now.duration_since(since).as_secs()
                    );
                    let problem = format!("stuck {}/{}", key.0, key.1);
                    if g.should_log(&problem) {
                        tracing::error!(topic = %key.0, partition = key.1, offset = p.committed,
                            error = %e, "kafka: partition stuck behind a permanent consumer error");
                    }
                    g.stuck.insert(key, reason);
                }
                _ => {
                    gauge.set(0);
                    g.stuck.remove(&key);
                }
            }
        }
        // Partitions given up meanwhile are no longer this member's concern.
        let gone: Vec<_> = g
            .stuck
            .keys()
            .filter(|k| !still_owned.contains_key(*k))
            .cloned()
            .collect();
        for k in gone {
            self.metrics
                .kafka_partition_stuck
                .with_label_values(&[&k.0, &k.1.to_string()])
                .set(0);
            g.stuck.remove(&k);
        }
        g.progress = still_owned;
    }
}

impl ReadinessCheck for Consumable {
    fn not_ready(&self) -> Option<String> {
        let g = self.inner.lock().ok()?;
        if let Some(why) = &g.refused_login {
            return Some(why.clone());
        }
        if !g.checked {
            return Some("kafka: the configured topics are not checked yet".into());
        }
        let reasons: Vec<&str> = g
            .topics
            .values()
            .chain(g.stuck.values())
            .map(String::as_str)
            .collect();
        if reasons.is_empty() {
            None
        } else {
            Some(reasons.join("; "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn consumable() -> Consumable {
        Consumable::new(Arc::new(Metrics::new().expect("metrics")))
    }

    fn seen(committed: i64, high: i64, outstanding: usize) -> PartitionSeen {
        PartitionSeen {
            tp: (Arc::from("t"), 0),
            committed,
            high,
            outstanding,
        }
    }

    #[test]
    fn a_refused_login_is_not_ready_until_the_broker_answers() {
        let c = consumable();
        c.checked();
        // Other global errors are the connection's concern, not readiness'.
        c.client_error(
            &KafkaError::Global(RDKafkaErrorCode::AllBrokersDown),
            "1/1 brokers are down",
        );
        assert_eq!(c.not_ready(), None);
        c.client_error(
            &KafkaError::Global(RDKafkaErrorCode::Authentication),
            "SASL SCRAM authentication failed: broker responded with unknown-user",
        );
        let why = c.not_ready().expect("not ready");
        assert!(
            why.contains("refused authentication") && why.contains("unknown-user"),
            "{why}"
        );
        assert_eq!(
            c.metrics
                .kafka_consumer_errors
                .with_label_values(&["Authentication"])
                .get(),
            1
        );
        c.checked();
        assert_eq!(c.not_ready(), None, "the broker answered: logged in");
    }

    #[test]
    fn not_ready_until_checked_then_names_a_missing_topic() {
        let c = consumable();
        assert!(c.not_ready().is_some());
        c.checked();
        assert_eq!(c.not_ready(), None);
        c.topic("nope", Some("Broker: Unknown topic or partition".into()));
        let why = c.not_ready().expect("not ready");
        assert!(
            why.contains("\"nope\"") && why.contains("Unknown topic"),
            "{why}"
        );
        c.topic("nope", None);
        assert_eq!(c.not_ready(), None);
    }

    #[test]
    fn only_permanent_consumer_errors_count() {
        let c = consumable();
        assert!(c.consumer_error(&KafkaError::MessageConsumption(
            RDKafkaErrorCode::BadCompression
        )));
        assert!(!c.consumer_error(&KafkaError::MessageConsumption(
            RDKafkaErrorCode::BrokerTransportFailure
        )));
    }

    #[test]
    fn a_partition_without_progress_is_stuck_only_behind_a_permanent_error() {
        let c = consumable();
        c.checked();
        c.partitions(&[seen(5, 10, 0)]);
        // Backdate the last progress past STUCK_AFTER.
        if let Ok(mut g) = c.inner.lock() {
            for (_, since) in g.progress.values_mut() {
                *since -= STUCK_AFTER;
            }
        }
        c.partitions(&[seen(5, 10, 0)]);
        assert_eq!(c.not_ready(), None, "no consumer error: slow, not stuck");
        c.consumer_error(&KafkaError::MessageConsumption(
            RDKafkaErrorCode::BadCompression,
        ));
        c.partitions(&[seen(5, 10, 0)]);
        let why = c.not_ready().expect("stuck");
        assert!(why.contains("t/0 stuck at offset 5 (log end 10)"), "{why}");
        // In flight: working, not stuck.
        c.partitions(&[seen(5, 10, 3)]);
        assert_eq!(c.not_ready(), None);
        // Progress clears it, and so does losing the partition.
        c.partitions(&[seen(6, 10, 0)]);
        assert_eq!(c.not_ready(), None);
        c.partitions(&[]);
        assert_eq!(c.not_ready(), None);
    }
}
