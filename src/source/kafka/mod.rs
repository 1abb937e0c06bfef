//! Kafka source (rdkafka): a consumer group with in-order offset commits,
//! rebalance safety, a dead-letter topic and per-partition lag.
//!
//! Offsets: `enable.auto.commit=false` and explicit commits of positions the
//! [`OffsetTracker`] computes. Auto-commit with `enable.auto.offset.store=false`
//! would also work, but the position to commit is ours to compute anyway
//! (never past a gap), and explicit commits let the revoke path commit the
//! final positions synchronously before the partitions are released.
//!
//! Rebalances: librdkafka runs the rebalance callback on the thread polling
//! the consumer (the intake task, inside `recv()`). On revoke the callback
//! sends the revoked partitions to the settlement loop, which runs on a task
//! of its own, with a reply channel and waits: the settlement loop lets
//! their in-flight orders finish (up to `kafka.revoke_timeout`), stops
//! tracking them, and replies with their final positions, which the callback
//! commits synchronously before returning. No lock is held across the wait;
//! intake is naturally stopped because it is the one blocked in the callback.
//! A revoke commit the coordinator refuses is kept: if the partition comes
//! back to this member, it resumes from that position.
//!
//! Shutdown: intake stops taking messages but keeps polling the consumer
//! until the final commit is in, so that a rebalance started meanwhile (a
//! member leaving: several pods stopped at once) can complete; the
//! coordinator refuses commits while it waits for members to rejoin.
//!
//! The modules follow one message: `intake` polls the consumer under a
//! prefetch permit and hands the pipeline a delivery; `settle` marks what
//! the pipeline finished in the `offsets` tracker and commits; failed
//! orders go out through `dead_letter`; `rebalance` is librdkafka's
//! callback side (assign, revoke barrier, release on close); `lag`
//! exports how far behind the group is, and `consumable` makes a topic or
//! partition that cannot be consumed visible (metrics, `/readyz`, logs).

pub mod consumable;
mod dead_letter;
mod intake;
mod lag;
pub mod offsets;
mod rebalance;
mod settle;

use std::sync::{Arc, Mutex};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::FutureProducer;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use super::prefetch::Prefetch;
use super::{Delivery, Settlement};
use crate::config::KafkaConfig;
use crate::telemetry::{Health, Metrics};
pub(crate) use dead_letter::producer_config;
pub use intake::header_text;
use offsets::{OffsetTracker, TopicPartition};
use rebalance::{KafkaContext, Revoke};

#[derive(Debug, thiserror::Error)]
pub enum KafkaSourceError {
    #[error("kafka: {what}: {source}")]
    Client {
        what: &'static str,
        #[source]
        source: KafkaError,
    },
    #[error("kafka: fatal client error {code:?}: {reason}")]
    Fatal { code: String, reason: String },
    #[error("kafka: the intake task failed: {0}")]
    Intake(String),
}

fn client(what: &'static str) -> impl FnOnce(KafkaError) -> KafkaSourceError {
    move |source| KafkaSourceError::Client { what, source }
}

fn partitions_of(tpl: &TopicPartitionList) -> Vec<TopicPartition> {
    tpl.elements()
        .iter()
        .map(|e| (Arc::from(e.topic()), e.partition()))
        .collect()
}

fn tpl_of(positions: &[(TopicPartition, i64)]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in positions {
        // Only fails for an invalid offset value, which positions never are.
        let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset));
    }
    tpl
}

type KafkaConsumer = StreamConsumer<KafkaContext>;

pub struct KafkaSource {
    cfg: KafkaConfig,
    consumer: Arc<KafkaConsumer>,
    producer: FutureProducer,
    tracker: Arc<Mutex<OffsetTracker>>,
    revokes: mpsc::UnboundedReceiver<Revoke>,
    /// How many messages after each assignment are flagged as possibly
    /// redelivered (see `intake`).
    prefetch: u64,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    consumable: Arc<consumable::Consumable>,
}

impl KafkaSource {
    pub fn connect(
        cfg: &KafkaConfig,
        prefetch: u32,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> Result<Self, KafkaSourceError> {
        let tracker = Arc::new(Mutex::new(OffsetTracker::new()));
        let (revokes_tx, revokes) = mpsc::unbounded_channel();
        let consumable = Arc::new(consumable::Consumable::new(metrics.clone()));
        let context = KafkaContext {
            consumable: consumable.clone(),
            tracker: tracker.clone(),
            revokes: revokes_tx,
            revoke_timeout: cfg.revoke_timeout,
            metrics: metrics.clone(),
        };
        let mut consumer_cfg = ClientConfig::new();
        consumer_cfg
            .set("bootstrap.servers", &cfg.brokers)
            .set("group.id", &cfg.group_id)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            // librdkafka's own prefetch: capped in bytes and messages so it
            // stays small beside our own prefetch limit.
            .set(
                "queued.max.messages.kbytes",
                cfg.fetch_queue_kbytes.to_string(),
            )
            .set(
                "queued.min.messages",
                (prefetch.clamp(100, 100_000)).to_string(),
            )
            // When the fetch queue is over those thresholds librdkafka
            // postpones the partition's next fetch by this much (default
            // 1 s): with a small queue that default caps intake near
            // 1,000 messages/s. The thresholds still bound memory.
            .set("fetch.queue.backoff.ms", "10");
        for (k, v) in cfg.security.librdkafka_properties() {
            consumer_cfg.set(k, v);
        }
        for (k, v) in &cfg.properties {
            consumer_cfg.set(k, v);
        }
        let consumer: KafkaConsumer = consumer_cfg
            .create_with_context(context)
            .map_err(client("creating the consumer"))?;
        let topics: Vec<&str> = cfg.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics).map_err(client("subscribing"))?;

        let producer: FutureProducer = producer_config(cfg)
            .create()
            .map_err(client("creating the dead-letter producer"))?;
        Health::set(&health.broker_connected, true);
        health.watch(consumable.clone());
        tracing::info!(topics = ?cfg.topics, group = %cfg.group_id, "consuming from Kafka");
        Ok(Self {
            cfg: cfg.clone(),
            consumer: Arc::new(consumer),
            producer,
            tracker,
            revokes,
            prefetch: u64::from(prefetch),
            metrics,
            health,
            consumable,
        })
    }

    pub async fn run(
        mut self,
        permits: Arc<Prefetch>,
        deliveries: mpsc::Sender<Delivery>,
        settlements: mpsc::UnboundedReceiver<Settlement>,
        stop_intake: CancellationToken,
    ) -> Result<(), KafkaSourceError> {
        // Intake on a task of its own: the revoke callback it runs blocks
        // until the settlement loop (this task) answers.
        let closing = CancellationToken::new();
        // Owned: if this task is aborted (the drain deadline), intake and
        // its handle on the consumer go with it.
        let mut intake = AbortOnDropHandle::new(tokio::spawn(intake::intake(
            self.consumer.clone(),
            self.tracker.clone(),
            self.prefetch,
            permits,
            deliveries,
            stop_intake,
            closing.clone(),
            self.metrics.clone(),
            self.consumable.clone(),
            Arc::from(self.cfg.group_id.as_str()),
        )));
        // The settlement loop owns the revoke receiver; a closed stand-in
        // stays in `self`.
        let mut revokes = std::mem::replace(&mut self.revokes, mpsc::unbounded_channel().1);
        settle::settle(&self, settlements, &mut revokes).await;
        // From here a revoke is answered by the callback itself (see
        // `KafkaContext::release`), and intake stops polling.
        drop(revokes);
        closing.cancel();
        let intake_result = match (&mut intake).await {
            Ok(r) => r,
            Err(e) => Err(KafkaSourceError::Intake(e.to_string())),
        };
        Health::set(&self.health.broker_connected, false);
        let consumer = self.consumer.clone();
        drop(self);
        let _ = tokio::task::spawn_blocking(move || {
            consumer.unsubscribe();
            drop(consumer);
        })
        .await;
        intake_result
    }
}
