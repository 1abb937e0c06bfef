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

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{AckToken, DeadLetter, Delivery, Held, Position, Settlement, TokenKind};
use super::{DEAD_LETTER_ATTEMPTS, DEAD_LETTER_RETRY_INITIAL, DEAD_LETTER_RETRY_MAX};
use crate::ack::{OffsetTracker, TopicPartition};
use crate::config::KafkaConfig;
use crate::downstream::retry::FullJitter;
use crate::telemetry::{Health, Metrics};

/// Bounds of the jittered wait between refused final commits.
const FINAL_COMMIT_RETRY_INITIAL: Duration = Duration::from_millis(100);
const FINAL_COMMIT_RETRY_MAX: Duration = Duration::from_millis(1000);

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

/// A revoke waiting for the settlement loop: the partitions with the epoch
/// of the assignment being revoked.
struct Revoke {
    partitions: Vec<(TopicPartition, u64)>,
    reply: std::sync::mpsc::SyncSender<Vec<(TopicPartition, i64)>>,
}

/// librdkafka's callbacks land here.
pub struct KafkaContext {
    tracker: Arc<Mutex<OffsetTracker>>,
    revokes: mpsc::UnboundedSender<Revoke>,
    revoke_timeout: Duration,
    /// Set when an asynchronous commit was rejected (e.g. during a
    /// rebalance): the next periodic commit then resends every position.
    commit_failed: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
}

impl KafkaContext {
    /// A revoke after the settlement loop has ended (the consumer is
    /// closing): what is done is final, so commit what was not committed
    /// yet here, inside the rebalance, where the coordinator accepts it even
    /// if the final commit was refused.
    fn release(&self, consumer: &BaseConsumer<Self>, parts: &[TopicPartition]) {
        let positions: Vec<_> = match self.tracker.lock() {
            Ok(mut t) => parts
                .iter()
                .filter_map(|tp| t.release(tp).map(|pos| (tp.clone(), pos)))
                .collect(),
            Err(_) => Vec::new(),
        };
        if positions.is_empty() {
            return;
        }
        match consumer.commit(&tpl_of(&positions), CommitMode::Sync) {
            Ok(()) => tracing::info!(?positions, "committed released partitions"),
            Err(e) => tracing::error!(error = %e, ?positions,
                "commit on close failed; the next owner re-processes from the last commit"),
        }
    }

    /// Resumes newly assigned partitions from the positions this member
    /// could not commit when they were revoked, unless the group committed
    /// further meanwhile (another member owned them in between).
    fn resume_unsettled(&self, consumer: &BaseConsumer<Self>, assigned: &[TopicPartition]) {
        let unsettled = match self.tracker.lock() {
            Ok(mut t) => t.take_unsettled(assigned),
            Err(_) => return,
        };
        if unsettled.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), _) in &unsettled {
            tpl.add_partition(topic, *partition);
        }
        let committed = match consumer.committed_offsets(tpl, self.revoke_timeout) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, ?unsettled,
                    "cannot read the group's offsets; re-processing from the last commit");
                return;
            }
        };
        let Ok(mut t) = self.tracker.lock() else {
            return;
        };
        for (tp, pos) in unsettled {
            let group = committed
                .find_partition(&tp.0, tp.1)
                .and_then(|e| e.offset().to_raw());
            if group.is_none_or(|c| c < pos) {
                t.resume_from(&tp, pos);
                self.metrics.rebalance_event("resumed", 1);
                tracing::info!(partition = ?tp, position = pos, group_offset = ?group,
                    "resuming from the position whose commit was refused at the last revoke");
            }
        }
    }
}

impl ClientContext for KafkaContext {}

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

impl ConsumerContext for KafkaContext {
    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        if let Err(e) = result {
            tracing::warn!(error = %e, "offset commit rejected; resending with the next commit");
            self.commit_failed.store(true, Ordering::Relaxed);
        }
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                // Before librdkafka assigns: the tracker must know a
                // partition before its first message can arrive.
                let parts = partitions_of(tpl);
                if let Ok(mut t) = self.tracker.lock() {
                    for tp in &parts {
                        t.assign(tp.clone());
                    }
                }
                tracing::info!(partitions = ?parts, "partitions assigned");
                self.metrics.rebalance_event("assigned", parts.len());
                self.resume_unsettled(consumer, &parts);
            }
            Rebalance::Revoke(tpl) => {
                let parts = partitions_of(tpl);
                tracing::info!(partitions = ?parts, "partitions revoked; finishing their in-flight orders");
                self.metrics.rebalance_event("revoked", parts.len());
                let owned: Vec<(TopicPartition, u64)> = match self.tracker.lock() {
                    Ok(t) => parts
                        .iter()
                        .filter_map(|tp| t.epoch(tp).map(|e| (tp.clone(), e)))
                        .collect(),
                    Err(_) => Vec::new(),
                };
                let (reply, answer) = std::sync::mpsc::sync_channel(1);
                if self
                    .revokes
                    .send(Revoke {
                        partitions: owned,
                        reply,
                    })
                    .is_err()
                {
                    self.release(consumer, &parts);
                    return;
                }
                let wait = self.revoke_timeout + Duration::from_secs(1);
                let receive = || answer.recv_timeout(wait);
                // Let the runtime move other tasks (the settlement loop
                // among them) off this worker while it blocks.
                let positions =
                    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
                        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => {
                            tokio::task::block_in_place(receive)
                        }
                        _ => receive(),
                    };
                match positions {
                    Ok(positions) if !positions.is_empty() => {
                        match consumer.commit(&tpl_of(&positions), CommitMode::Sync) {
                            Ok(()) => tracing::info!(?positions, "committed revoked partitions"),
                            Err(e) => {
                                tracing::warn!(error = %e, ?positions,
                                    "commit on revoke refused; kept in case the partitions come back, else their next owner re-processes from the last commit");
                                self.metrics
                                    .rebalance_event("revoke_commit_refused", positions.len());
                                if let Ok(mut t) = self.tracker.lock() {
                                    t.keep_unsettled(&positions);
                                }
                            }
                        }
                    }
                    Ok(_) => {}
                    // The settlement loop ended before serving it.
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                        self.release(consumer, &parts)
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                        tracing::error!("revoke barrier timed out")
                    }
                }
            }
            Rebalance::Error(e) => tracing::error!(error = %e, "rebalance error"),
        }
    }
}

type KafkaConsumer = StreamConsumer<KafkaContext>;

pub struct KafkaSource {
    cfg: KafkaConfig,
    consumer: Arc<KafkaConsumer>,
    producer: FutureProducer,
    tracker: Arc<Mutex<OffsetTracker>>,
    revokes: mpsc::UnboundedReceiver<Revoke>,
    commit_failed: Arc<AtomicBool>,
    /// How many messages after each assignment are flagged as possibly
    /// redelivered (see `intake`).
    prefetch: u64,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
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
        let commit_failed = Arc::new(AtomicBool::new(false));
        let context = KafkaContext {
            tracker: tracker.clone(),
            revokes: revokes_tx,
            revoke_timeout: cfg.revoke_timeout,
            commit_failed: commit_failed.clone(),
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
        tracing::info!(topics = ?cfg.topics, group = %cfg.group_id, "consuming from Kafka");
        Ok(Self {
            cfg: cfg.clone(),
            consumer: Arc::new(consumer),
            producer,
            tracker,
            revokes,
            commit_failed,
            prefetch: u64::from(prefetch),
            metrics,
            health,
        })
    }

    pub async fn run(
        mut self,
        permits: Arc<Semaphore>,
        deliveries: mpsc::Sender<Delivery>,
        settlements: mpsc::UnboundedReceiver<Settlement>,
        stop_intake: CancellationToken,
    ) -> Result<(), KafkaSourceError> {
        // Intake on a task of its own: the revoke callback it runs blocks
        // until the settlement loop (this task) answers.
        let closing = CancellationToken::new();
        let intake = tokio::spawn(intake(
            self.consumer.clone(),
            self.tracker.clone(),
            self.prefetch,
            permits,
            deliveries,
            stop_intake,
            closing.clone(),
            self.metrics.clone(),
        ));
        // The settlement loop owns the revoke receiver; a closed stand-in
        // stays in `self`.
        let mut revokes = std::mem::replace(&mut self.revokes, mpsc::unbounded_channel().1);
        settle(&self, settlements, &mut revokes).await;
        // From here a revoke is answered by the callback itself (see
        // `KafkaContext::release`), and intake stops polling.
        drop(revokes);
        closing.cancel();
        let intake_result = match intake.await {
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

/// A producer that waits for every in-sync replica (`acks=all`) and never
/// duplicates on retry, with the configured properties a producer takes
/// (TLS, SASL, timeouts…). Used for dead letters and by `conveyor produce`.
pub(crate) fn producer_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers)
        .set("acks", "all")
        .set("enable.idempotence", "true");
    for (k, v) in &cfg.properties {
        if !is_consumer_only(k) {
            c.set(k, v);
        }
    }
    c
}

/// Keys of `kafka.properties` only a consumer takes; a producer given them
/// logs a warning per key.
fn is_consumer_only(key: &str) -> bool {
    key.starts_with("group.")
        || key.starts_with("session.")
        || key.starts_with("heartbeat.")
        || key.starts_with("partition.assignment")
        || key.starts_with("auto.")
        || key.starts_with("enable.auto")
        || key.starts_with("fetch.")
        || key.starts_with("queued.")
        || key.starts_with("max.poll")
        || key.starts_with("isolation.")
}

#[allow(clippy::too_many_arguments)]
async fn intake(
    consumer: Arc<KafkaConsumer>,
    tracker: Arc<Mutex<OffsetTracker>>,
    prefetch: u64,
    permits: Arc<Semaphore>,
    deliveries: mpsc::Sender<Delivery>,
    stop: CancellationToken,
    closing: CancellationToken,
    metrics: Arc<Metrics>,
) -> Result<(), KafkaSourceError> {
    let mut topics: HashMap<String, Arc<str>> = HashMap::new();
    let outcome = loop {
        // Without a permit nothing more is received: librdkafka's fetch
        // queue fills up to its cap and fetching stops.
        let permit = tokio::select! {
            biased;
            _ = stop.cancelled() => break Ok(()),
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break Ok(()),
            },
        };
        let msg = tokio::select! {
            biased;
            _ = stop.cancelled() => break Ok(()),
            m = consumer.recv() => m,
        };
        let m = match msg {
            Ok(m) => m,
            Err(e) => {
                if let Some(fatal) = fatal_error(&consumer) {
                    break Err(fatal);
                }
                tracing::warn!(error = %e, "kafka consumer error");
                metrics
                    .broker_errors
                    .with_label_values(&["kafka", "consumer_error"])
                    .inc();
                continue;
            }
        };
        let topic = match topics.get(m.topic()) {
            Some(t) => t.clone(),
            None => {
                let t: Arc<str> = Arc::from(m.topic());
                topics.insert(m.topic().to_string(), t.clone());
                t
            }
        };
        let tp = (topic.clone(), m.partition());
        let offset = m.offset();
        let received = match tracker.lock() {
            Ok(mut t) => t
                .received(&tp, offset)
                .map(|epoch| (epoch, t.received_since_assign(&tp))),
            Err(_) => None,
        };
        let Some((epoch, nth)) = received else {
            // A message of a partition we do not own (revoked meanwhile):
            // not processed, its next owner will.
            continue;
        };
        // Kafka has no redelivered flag. The previous owner of a partition
        // may have stored orders it had not committed yet: at a handover
        // (revoke commits synchronously) at most the `prefetch` it held in
        // flight, so the first `prefetch` messages of each assignment are
        // flagged and the pipeline acks those already stored without
        // calling anyone. After a crash the uncommitted window can be
        // longer (up to `commit_interval` of throughput); orders past the
        // flag go through the stages again, harmless thanks to the
        // idempotency key and the upsert, only not short-circuited.
        let redelivered = nth <= prefetch;
        metrics.received.inc();
        let delivery = Delivery {
            body: Bytes::copy_from_slice(m.payload().unwrap_or_default()),
            key: m.key().map(Bytes::copy_from_slice),
            position: Position::Kafka {
                topic: topic.clone(),
                partition: m.partition(),
                offset,
            },
            redelivered,
            received_at: Instant::now(),
            timestamp_ms: m.timestamp().to_millis(),
            traceparent: m.headers().and_then(|h| header_text(h, "traceparent")),
            token: AckToken {
                kind: TokenKind::Kafka {
                    topic,
                    partition: m.partition(),
                    offset,
                    epoch,
                },
                _permit: permit,
                _held: Held::new(&metrics),
            },
        };
        drop(m);
        if deliveries.send(delivery).await.is_err() {
            break Ok(());
        }
    };
    drop(deliveries);
    match &outcome {
        Ok(()) => tracing::info!("intake stopped"),
        Err(e) => {
            tracing::error!(error = %e, "intake failed");
            return outcome;
        }
    }
    serve_rebalances(&consumer, &closing).await
}

/// The client's fatal error, if it has one: the consumer cannot go on.
fn fatal_error(consumer: &KafkaConsumer) -> Option<KafkaSourceError> {
    consumer
        .client()
        .fatal_error()
        .map(|(code, reason)| KafkaSourceError::Fatal {
            code: format!("{code:?}"),
            reason,
        })
}

/// After intake stopped and until the source closes: polls the consumer so
/// that librdkafka can run a rebalance (its callbacks run inside `recv()`),
/// else this member could neither rejoin nor commit until the group evicts
/// it. Messages are not processed: not tracked, their offsets are never
/// committed by this member.
async fn serve_rebalances(
    consumer: &KafkaConsumer,
    closing: &CancellationToken,
) -> Result<(), KafkaSourceError> {
    // Paused partitions stop fetching; a partition assigned from now on is
    // fetched and its messages dropped.
    if let Ok(assigned) = consumer.assignment() {
        if let Err(e) = consumer.pause(&assigned) {
            tracing::debug!(error = %e, "cannot pause the assignment");
        }
    }
    loop {
        let msg = tokio::select! {
            biased;
            _ = closing.cancelled() => return Ok(()),
            m = consumer.recv() => m,
        };
        if msg.is_err() {
            if let Some(fatal) = fatal_error(consumer) {
                return Err(fatal);
            }
        }
    }
}

/// Marks completions in the tracker, produces dead letters, commits
/// periodically, serves revokes, refreshes lag; commits synchronously last.
async fn settle(
    src: &KafkaSource,
    mut settlements: mpsc::UnboundedReceiver<Settlement>,
    revokes: &mut mpsc::UnboundedReceiver<Revoke>,
) {
    let cfg = &src.cfg;
    let metrics = &src.metrics;
    let mut revokes_rx_closed = false;
    let mut publishing: JoinSet<(Box<DeadLetter>, Result<(), String>)> = JoinSet::new();
    let mut closed = false;
    let mut pending_revoke: Option<(Revoke, tokio::time::Instant)> = None;
    let mut commit_tick = tokio::time::interval(cfg.commit_interval);
    let mut lag_tick = tokio::time::interval(cfg.lag_interval);
    let mut lag_task: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        if closed && publishing.is_empty() && pending_revoke.is_none() {
            break;
        }
        let revoke_deadline = pending_revoke.as_ref().map(|(_, d)| *d);
        tokio::select! {
            s = settlements.recv(), if !closed => match s {
                Some(s) => {
                    accept(src, s, &mut publishing);
                    while let Ok(s) = settlements.try_recv() {
                        accept(src, s, &mut publishing);
                    }
                }
                None => closed = true,
            },
            Some(joined) = publishing.join_next(), if !publishing.is_empty() => match joined {
                Ok((dl, Ok(()))) => {
                    metrics.dead_letters.with_label_values(&[dl.reason.as_str()]).inc();
                    metrics.orders.with_label_values(&["dead_lettered"]).inc();
                    tracing::warn!(order_id = dl.order_id.as_deref().unwrap_or(""),
                        position = %dl.position, reason = %dl.reason, stage = dl.stage,
                        detail = %dl.detail, "dead-lettered");
                    mark_done(src, vec![dl.token]);
                }
                Ok((dl, Err(e))) => tracing::error!(position = %dl.position, error = %e,
                    "dead-letter produce failed; the offset stays uncommitted"),
                Err(e) => tracing::error!(error = %e, "dead-letter task failed"),
            },
            r = revokes.recv(), if !revokes_rx_closed && pending_revoke.is_none() => match r {
                Some(r) => {
                    let deadline = tokio::time::Instant::now() + cfg.revoke_timeout;
                    pending_revoke = Some((r, deadline));
                }
                None => revokes_rx_closed = true,
            },
            _ = sleep_until_opt(revoke_deadline) => {
                tracing::warn!("revoke timeout: unfinished orders of revoked partitions go to their next owner");
                if let Some((r, _)) = pending_revoke.take() {
                    metrics.rebalance_event("revoke_timeout", r.partitions.len());
                    finish_revoke(src, r);
                }
            },
            _ = commit_tick.tick() => commit(src, CommitMode::Async),
            _ = lag_tick.tick() => {
                if lag_task.as_ref().is_none_or(|t| t.is_finished()) {
                    lag_task = Some(refresh_lag(src));
                }
            },
        }
        if let Some((r, deadline)) = pending_revoke.take() {
            let busy = match src.tracker.lock() {
                Ok(t) => r
                    .partitions
                    .iter()
                    .filter(|(tp, e)| t.epoch(tp) == Some(*e))
                    .map(|(tp, _)| t.outstanding(tp))
                    .sum::<usize>(),
                Err(_) => 0,
            };
            if busy == 0 {
                finish_revoke(src, r);
            } else {
                pending_revoke = Some((r, deadline));
            }
        }
    }
    final_commit(src, revokes).await;
    if let Some(t) = lag_task {
        let _ = t.await;
    }
}

/// The final, synchronous commit of everything done, moved or not (an
/// earlier asynchronous commit may have been rejected).
///
/// The group coordinator refuses commits while a rebalance is in progress
/// (another member just left or joined): retry with jittered backoff for up
/// to `kafka.revoke_timeout`, serving the revokes that rebalance brings
/// meanwhile (intake keeps polling, so this member takes part in it). A
/// revoke whose commit was refused leaves its positions unsettled: wait, as
/// long, for the rebalance to end, as it may give those partitions back to
/// commit them. If the commit still fails, the revoke that closing the
/// consumer triggers commits the same positions from the rebalance callback.
async fn final_commit(src: &KafkaSource, revokes: &mut mpsc::UnboundedReceiver<Revoke>) {
    let deadline = tokio::time::Instant::now() + src.cfg.revoke_timeout;
    let mut backoff = FullJitter::doubling(FINAL_COMMIT_RETRY_INITIAL, FINAL_COMMIT_RETRY_MAX);
    let mut revokes_open = true;
    let mut committed: Vec<(TopicPartition, i64)> = Vec::new();
    loop {
        // Again at every attempt: a rebalance may have taken partitions
        // away or given back one to resume.
        let (mut positions, unsettled) = match src.tracker.lock() {
            Ok(mut t) => (t.positions(), t.has_unsettled()),
            Err(_) => (Vec::new(), false),
        };
        positions.sort();
        let mut refused = None;
        if !positions.is_empty() && positions != committed {
            let consumer = src.consumer.clone();
            let attempt = tpl_of(&positions);
            let result =
                tokio::task::spawn_blocking(move || consumer.commit(&attempt, CommitMode::Sync))
                    .await;
            match result {
                Ok(Ok(())) => {
                    tracing::info!(?positions, "final offsets committed");
                    committed = positions;
                }
                Ok(Err(e)) => refused = Some(e.to_string()),
                Err(e) => refused = Some(e.to_string()),
            }
        }
        if refused.is_none() && !unsettled {
            return;
        }
        let wait = backoff.next_wait();
        if tokio::time::Instant::now() + wait >= deadline {
            match refused {
                Some(error) => {
                    tracing::error!(error = %error, "final commit failed; committing again when the partitions are released");
                    if let Ok(mut t) = src.tracker.lock() {
                        t.forget_commits();
                    }
                }
                None => tracing::warn!(
                    "the rebalance did not give back the partitions whose revoke commit was refused; their next owner re-processes from the last commit"
                ),
            }
            return;
        }
        match &refused {
            Some(error) => {
                tracing::warn!(error = %error, retry_in = ?wait, "final commit refused; retrying")
            }
            None => tracing::debug!(
                retry_in = ?wait,
                "waiting for the rebalance to give back partitions to commit"
            ),
        }
        let retry_at = tokio::time::Instant::now() + wait;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(retry_at) => break,
                r = revokes.recv(), if revokes_open => match r {
                    // Nothing is in flight any more: answer at once.
                    Some(r) => finish_revoke(src, r),
                    None => revokes_open = false,
                },
            }
        }
    }
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn finish_revoke(src: &KafkaSource, r: Revoke) {
    let positions = match src.tracker.lock() {
        Ok(mut t) => r
            .partitions
            .iter()
            .filter_map(|(tp, e)| t.revoke(tp, *e).map(|pos| (tp.clone(), pos)))
            .collect(),
        Err(_) => Vec::new(),
    };
    for ((topic, partition), _) in &r.partitions {
        let _ = src
            .metrics
            .kafka_lag
            .remove_label_values(&[topic.as_ref(), partition.to_string().as_str()]);
    }
    // The callback may have given up waiting; nothing to do then.
    let _ = r.reply.send(positions);
}

fn mark_done(src: &KafkaSource, tokens: Vec<AckToken>) {
    let Ok(mut t) = src.tracker.lock() else {
        return;
    };
    let mut count = 0;
    for token in &tokens {
        if let TokenKind::Kafka {
            topic,
            partition,
            offset,
            epoch,
        } = &token.kind
        {
            if t.done(&(topic.clone(), *partition), *offset, *epoch) {
                count += 1;
            }
        }
    }
    src.metrics.acked.inc_by(count);
    drop(t);
    drop(tokens);
}

fn accept(
    src: &KafkaSource,
    s: Settlement,
    publishing: &mut JoinSet<(Box<DeadLetter>, Result<(), String>)>,
) {
    match s {
        Settlement::Done(tokens) => mark_done(src, tokens),
        Settlement::DeadLetter(dl) => {
            let producer = src.producer.clone();
            let topic = match &dl.position {
                Position::Kafka { topic, .. } => src.cfg.dead_letter_topic(topic),
                Position::Rabbit { queue, .. } => src.cfg.dead_letter_topic(queue),
            };
            publishing.spawn(async move {
                let result = produce_dead_letter(&producer, &topic, &dl).await;
                (dl, result)
            });
        }
    }
}

async fn produce_dead_letter(
    producer: &FutureProducer,
    topic: &str,
    dl: &DeadLetter,
) -> Result<(), String> {
    let (src_topic, partition, offset) = match &dl.position {
        Position::Kafka {
            topic,
            partition,
            offset,
        } => (topic.to_string(), partition.to_string(), offset.to_string()),
        other => (other.to_string(), String::new(), String::new()),
    };
    let failed_at = chrono::Utc::now().to_rfc3339();
    let mut headers = OwnedHeaders::new();
    for (key, value) in [
        ("x-conveyor-reason", dl.reason.as_str()),
        ("x-conveyor-detail", dl.detail.as_str()),
        ("x-conveyor-stage", dl.stage),
        ("x-conveyor-topic", src_topic.as_str()),
        ("x-conveyor-partition", partition.as_str()),
        ("x-conveyor-offset", offset.as_str()),
        ("x-conveyor-failed-at", failed_at.as_str()),
        ("x-conveyor-order-id", dl.order_id.as_deref().unwrap_or("")),
    ] {
        headers = headers.insert(Header {
            key,
            value: Some(value),
        });
    }
    let mut last = String::new();
    let mut backoff = FullJitter::doubling(DEAD_LETTER_RETRY_INITIAL, DEAD_LETTER_RETRY_MAX);
    for attempt in 0..DEAD_LETTER_ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(backoff.next_wait()).await;
        }
        let mut record = FutureRecord::to(topic)
            .payload(dl.body.as_ref())
            .headers(headers.clone());
        if let Some(key) = &dl.key {
            record = record.key(key.as_ref());
        }
        match producer.send(record, Duration::from_secs(10)).await {
            Ok(_) => return Ok(()),
            Err((e, _)) => last = e.to_string(),
        }
    }
    Err(last)
}

fn commit(src: &KafkaSource, mode: CommitMode) {
    let resend = src.commit_failed.swap(false, Ordering::Relaxed);
    let positions = match src.tracker.lock() {
        Ok(mut t) => {
            if resend {
                t.forget_commits();
            }
            t.take_commits()
        }
        Err(_) => return,
    };
    if positions.is_empty() {
        return;
    }
    if let Err(e) = src.consumer.commit(&tpl_of(&positions), mode) {
        tracing::warn!(error = %e, "offset commit failed; it is retried with the next one");
    }
}

/// Lag per owned partition: high watermark − committed offset, read from
/// the broker on a blocking thread.
fn refresh_lag(src: &KafkaSource) -> tokio::task::JoinHandle<()> {
    let consumer = src.consumer.clone();
    let owned = match src.tracker.lock() {
        Ok(t) => t.owned(),
        Err(_) => Vec::new(),
    };
    let gauge = src.metrics.kafka_lag.clone();
    tokio::task::spawn_blocking(move || {
        if owned.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for (topic, partition) in &owned {
            tpl.add_partition(topic, *partition);
        }
        let committed = match consumer.committed_offsets(tpl, Duration::from_secs(5)) {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read committed offsets");
                return;
            }
        };
        for e in committed.elements() {
            let Ok((low, high)) =
                consumer.fetch_watermarks(e.topic(), e.partition(), Duration::from_secs(5))
            else {
                continue;
            };
            let lag = match e.offset() {
                Offset::Offset(c) => high - c,
                _ => high - low,
            };
            gauge
                .with_label_values(&[e.topic(), &e.partition().to_string()])
                .set(lag.max(0));
        }
    })
}

/// Reads a header of a Kafka message as text (tests, tools).
pub fn header_text<H: Headers>(headers: &H, name: &str) -> Option<String> {
    headers
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}
