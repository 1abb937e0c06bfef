//! Handing a checked batch to the broker, durably: RabbitMQ with publisher
//! confirms on a channel of the request's own, Kafka with `acks=all` and
//! the idempotent producer. A batch is *confirmed* only when every one of
//! its orders is; anything else (broker down, connection blocked by a
//! resource alarm, producer queue full, confirms not back within
//! `ingest.publish_timeout`) is [`Unavailable`], and the request is answered
//! 503 with nothing reported accepted. Some of its orders may be on the
//! broker by then: a retry publishes them again, and the daemon's
//! idempotency makes the second copy a no-op.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt as _};
use lapin::types::FieldTable;
use lapin::Connection;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use tokio_util::sync::CancellationToken;

use super::batch::Valid;
use crate::config::{Config, KafkaConfig, RabbitConfig, SourceKind};
use crate::tools::produce::{connect_rabbit, ConfirmChannel};

/// The broker cannot take the batch now; the client should retry later.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(pub String);

fn unavailable(what: &str) -> impl FnOnce(anyhow::Error) -> Unavailable + '_ {
    move |e| Unavailable(format!("{what}: {e:#}"))
}

/// The broker side of ingest.
pub enum Publisher {
    /// Boxed: the RabbitMQ configuration it carries is large.
    Rabbit(Box<RabbitPublisher>),
    Kafka(KafkaPublisher),
}

impl Publisher {
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        let timeout = config.ingest.publish_timeout;
        Ok(match config.source.kind {
            SourceKind::Rabbitmq => Publisher::Rabbit(Box::new(RabbitPublisher {
                cfg: config.rabbitmq.clone(),
                connection: Mutex::new(None),
            })),
            SourceKind::Kafka => Publisher::Kafka(KafkaPublisher::new(&config.kafka, timeout)?),
        })
    }

    /// Publishes every order; `Ok` only once the broker has confirmed all.
    pub async fn publish(
        &self,
        orders: &[Valid<'_>],
        window: usize,
        timeout: Duration,
    ) -> Result<(), Unavailable> {
        if orders.is_empty() {
            return Ok(());
        }
        match self {
            Publisher::Rabbit(p) => p.publish(orders, window, timeout).await,
            Publisher::Kafka(p) => p.publish(orders, window, timeout).await,
        }
    }

    /// Keeps the broker connection up (and its health known) until `stop`.
    pub async fn keep_connected(
        &self,
        connected: Arc<std::sync::atomic::AtomicBool>,
        stop: CancellationToken,
    ) {
        use std::sync::atomic::Ordering;
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let ok = match self {
                Publisher::Rabbit(p) => p.ensure_connected().await,
                Publisher::Kafka(p) => p.reachable().await,
            };
            if ok != connected.swap(ok, Ordering::Relaxed) {
                if ok {
                    tracing::info!("broker connected");
                } else {
                    tracing::warn!("broker unreachable; batches are answered 503");
                }
            }
        }
    }

    pub async fn close(&self) {
        match self {
            Publisher::Rabbit(p) => {
                let conn = p.connection.lock().ok().and_then(|mut c| c.take());
                if let Some(c) = conn {
                    c.close(200, "ingest stopped".into()).await.ok();
                }
            }
            Publisher::Kafka(p) => {
                let producer = p.producer.clone();
                let _ = tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(5)))
                    .await;
            }
        }
    }
}

/// One long-lived connection, re-opened by the keeper when it dies; each
/// request publishes on a confirm channel of its own, so one request's
/// failure never touches another's confirms.
pub struct RabbitPublisher {
    cfg: RabbitConfig,
    connection: Mutex<Option<Arc<Connection>>>,
}

impl RabbitPublisher {
    fn current(&self) -> Option<Arc<Connection>> {
        self.connection
            .lock()
            .ok()
            .and_then(|c| c.clone())
            .filter(|c| c.status().connected())
    }

    async fn ensure_connected(&self) -> bool {
        if self.current().is_some() {
            return true;
        }
        match tokio::time::timeout(Duration::from_secs(5), connect_rabbit(&self.cfg)).await {
            Ok(Ok(c)) => {
                if let Ok(mut slot) = self.connection.lock() {
                    *slot = Some(Arc::new(c));
                }
                true
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %format!("{e:#}"), "RabbitMQ connect failed");
                false
            }
            Err(_) => false,
        }
    }

    async fn publish(
        &self,
        orders: &[Valid<'_>],
        window: usize,
        timeout: Duration,
    ) -> Result<(), Unavailable> {
        let conn = self
            .current()
            .ok_or_else(|| Unavailable("RabbitMQ is not connected".into()))?;
        if conn.status().blocked() {
            return Err(Unavailable(
                "RabbitMQ has blocked publishing (connection.blocked: a resource alarm)".into(),
            ));
        }
        let channel = tokio::time::timeout(timeout, ConfirmChannel::open(&conn))
            .await
            .map_err(|_| Unavailable("opening a RabbitMQ channel timed out".into()))?
            .map_err(unavailable("opening a RabbitMQ channel"))?;
        let queue = self.cfg.queue.as_str();
        let all = async {
            let mut pending = FuturesUnordered::new();
            for o in orders {
                while pending.len() >= window.max(1) {
                    if let Some(r) = pending.next().await {
                        r?;
                    }
                }
                if conn.status().blocked() {
                    anyhow::bail!("RabbitMQ blocked publishing mid-batch (a resource alarm)");
                }
                let props = ConfirmChannel::properties(FieldTable::default());
                let confirm = channel.publish("", queue, o.bytes, props).await?;
                pending.push(confirm);
            }
            while let Some(r) = pending.next().await {
                r?;
            }
            Ok(())
        };
        let result = match tokio::time::timeout(timeout, all).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Unavailable(format!("RabbitMQ refused the batch: {e:#}"))),
            Err(_) => Err(Unavailable(format!(
                "publisher confirms not back within ingest.publish_timeout ({})",
                humantime::format_duration(timeout)
            ))),
        };
        // A blocked or dying connection may never answer the close: do not
        // hold the request for it.
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), channel.close()).await;
        });
        result
    }
}

/// One idempotent producer for the process (librdkafka batches across
/// requests), to the first of `kafka.topics`, keyed by `order_id`.
pub struct KafkaPublisher {
    producer: FutureProducer,
    topic: String,
    brokers: String,
}

/// librdkafka's own queue, capped so that a stalled broker turns into
/// `QueueFull` (503) rather than memory.
const KAFKA_QUEUE_KBYTES: &str = "65536";

impl KafkaPublisher {
    fn new(cfg: &KafkaConfig, timeout: Duration) -> anyhow::Result<Self> {
        let topic = cfg
            .topics
            .first()
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("kafka.topics is empty: ingest needs a topic"))?;
        let mut c = crate::source::kafka::producer_config(cfg);
        // A message not delivered by then fails its delivery future, so an
        // abandoned batch does not sit in the producer for the default 5 min.
        let ms = (timeout.as_millis() as u64).max(1000) + 1000;
        c.set("message.timeout.ms", ms.to_string());
        if !cfg.properties.contains_key("queue.buffering.max.kbytes") {
            c.set("queue.buffering.max.kbytes", KAFKA_QUEUE_KBYTES);
        }
        if !cfg.properties.contains_key("linger.ms") {
            c.set("linger.ms", "5");
        }
        let producer: FutureProducer = c
            .create()
            .map_err(|e| anyhow::anyhow!("creating the Kafka producer: {e}"))?;
        Ok(Self {
            producer,
            topic,
            brokers: cfg.brokers.clone(),
        })
    }

    async fn reachable(&self) -> bool {
        let p = self.producer.clone();
        let topic = self.topic.clone();
        let ok = tokio::task::spawn_blocking(move || {
            p.client()
                .fetch_metadata(Some(&topic), Duration::from_secs(2))
                .is_ok()
        })
        .await
        .unwrap_or(false);
        if !ok {
            tracing::debug!(brokers = %self.brokers, "Kafka metadata request failed");
        }
        ok
    }

    async fn publish(
        &self,
        orders: &[Valid<'_>],
        window: usize,
        timeout: Duration,
    ) -> Result<(), Unavailable> {
        let all = async {
            let mut pending = FuturesUnordered::new();
            for o in orders {
                while pending.len() >= window.max(1) {
                    if let Some(r) = pending.next().await {
                        r?;
                    }
                }
                let traceparent = crate::telemetry::traces::new_traceparent();
                let record = FutureRecord::to(&self.topic)
                    .key(o.order_id.as_str())
                    .payload(o.bytes)
                    .headers(OwnedHeaders::new().insert(Header {
                        key: "traceparent",
                        value: Some(traceparent.as_bytes()),
                    }));
                let delivery = match self.producer.send_result(record) {
                    Ok(d) => d,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        return Err(Unavailable(
                            "the Kafka producer's queue is full (the broker is not keeping up)"
                                .into(),
                        ))
                    }
                    Err((e, _)) => return Err(Unavailable(format!("producing to Kafka: {e}"))),
                };
                pending.push(async move {
                    match delivery.await {
                        Ok(Ok(_)) => Ok(()),
                        Ok(Err((e, _))) => Err(Unavailable(format!("Kafka delivery failed: {e}"))),
                        Err(_) => Err(Unavailable("the Kafka producer went away".into())),
                    }
                });
            }
            while let Some(r) = pending.next().await {
                r?;
            }
            Ok(())
        };
        match tokio::time::timeout(timeout, all).await {
            Ok(r) => r,
            Err(_) => Err(Unavailable(format!(
                "Kafka acknowledgements not back within ingest.publish_timeout ({})",
                humantime::format_duration(timeout)
            ))),
        }
    }
}
