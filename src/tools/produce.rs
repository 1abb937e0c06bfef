//! Load generation: a deterministic mix of orders (good, to-be-rejected,
//! to-be-declined, poison) and publishers for RabbitMQ (publisher confirms)
//! and Kafka (`acks=all`, idempotent), used by `conveyor produce`, the tests
//! and the benchmarks.
//!
//! Both publishers pace messages on a schedule (message `n` is due at
//! `start + n / rate`, so a late message does not push back the ones after
//! it) and keep a bounded window of unacknowledged messages, reporting
//! progress as acknowledgements arrive.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt as _;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::types::RDKafkaRespErr;

use crate::config::{KafkaConfig, RabbitConfig};
use crate::source::kafka::producer_config;
use crate::source::rabbitmq::{declare_topology, TIMESTAMP_HEADER};

/// What a generated message is meant to become.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    Accept,
    Reject,
    Decline,
    Poison,
}

/// How many messages of a run carry each intent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IntentCounts {
    pub accept: u64,
    pub reject: u64,
    pub decline: u64,
    pub poison: u64,
}

/// Percentages of each kind; the rest are good orders.
#[derive(Debug, Clone, Copy)]
pub struct Mix {
    pub poison_pct: f64,
    pub reject_pct: f64,
    pub decline_pct: f64,
}

impl Default for Mix {
    fn default() -> Self {
        Self {
            poison_pct: 0.0,
            reject_pct: 0.0,
            decline_pct: 0.0,
        }
    }
}

/// A deterministic order generator: message `i` of run `run_id` is always
/// the same bytes, so a second publish of a range is a true redelivery.
#[derive(Debug, Clone)]
pub struct OrderGen {
    pub run_id: String,
    pub mix: Mix,
    pub customers: u64,
}

impl OrderGen {
    pub fn new(run_id: impl Into<String>, mix: Mix) -> Self {
        Self {
            run_id: run_id.into(),
            mix,
            customers: 1000,
        }
    }

    pub fn order_id(&self, i: u64) -> String {
        format!("{}-{i:08}", self.run_id)
    }

    /// The intent of message `i`, spread evenly through the sequence.
    pub fn intent(&self, i: u64) -> Intent {
        // A low-discrepancy walk keeps each share exact-ish in any window.
        let x = ((i as f64) * 0.618_033_988_749_895).fract() * 100.0;
        let m = &self.mix;
        if x < m.poison_pct {
            Intent::Poison
        } else if x < m.poison_pct + m.reject_pct {
            Intent::Reject
        } else if x < m.poison_pct + m.reject_pct + m.decline_pct {
            Intent::Decline
        } else {
            Intent::Accept
        }
    }

    /// The intents of messages `0..n`, counted.
    pub fn intent_counts(&self, n: u64) -> IntentCounts {
        let mut c = IntentCounts::default();
        for i in 0..n {
            match self.intent(i) {
                Intent::Accept => c.accept += 1,
                Intent::Reject => c.reject += 1,
                Intent::Decline => c.decline += 1,
                Intent::Poison => c.poison += 1,
            }
        }
        c
    }

    pub fn message(&self, i: u64) -> (Intent, Vec<u8>) {
        let intent = self.intent(i);
        let id = self.order_id(i);
        let customer = match intent {
            Intent::Reject => format!("reject-{}", i % self.customers),
            Intent::Decline => format!("decline-{}", i % self.customers),
            _ => format!("c-{}", i % self.customers),
        };
        let qty = 1 + (i % 3) as i64;
        let price = 100 + (i % 997) as i64;
        let body = serde_json::json!({
            "order_id": id,
            "customer_id": customer,
            "currency": "EUR",
            "amount_cents": qty * price + 250,
            "items": [
                {"sku": format!("SKU-{}", i % 50), "qty": qty, "unit_price_cents": price},
                {"sku": "SHIP", "qty": 1, "unit_price_cents": 250}
            ],
            "created_at": "2026-11-22T10:00:00Z",
        });
        let mut bytes = serde_json::to_vec(&body).unwrap_or_default();
        if intent == Intent::Poison {
            // Rotate through the kinds of damage a real feed carries.
            bytes = match i % 4 {
                0 => b"{\"order_id\": \"truncated".to_vec(),
                1 => String::from_utf8_lossy(&bytes)
                    .replace("\"EUR\"", "\"EURO\"")
                    .into_bytes(),
                2 => String::from_utf8_lossy(&bytes)
                    .replace("\"currency\"", "\"currency_code\"")
                    .into_bytes(),
                _ => String::from_utf8_lossy(&bytes)
                    .replacen("\"amount_cents\":", "\"amount_cents\":-", 1)
                    .into_bytes(),
            };
        }
        (intent, bytes)
    }
}

/// Connects to RabbitMQ with the configured credentials, and declares the
/// topology when `rabbitmq.declare` is on.
pub async fn connect_rabbit(cfg: &RabbitConfig) -> anyhow::Result<Connection> {
    let connection = crate::source::rabbitmq::connect(cfg, ConnectionProperties::default())
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "connecting to RabbitMQ at {}: {e}",
                crate::config::redact_url(&cfg.url)
            )
        })?;
    if cfg.declare {
        let channel = connection.create_channel().await?;
        declare_topology(&channel, cfg).await?;
        channel.close(200, "declared".into()).await.ok();
    }
    Ok(connection)
}

/// A channel in confirm mode. Each publish is `mandatory`, so a message no
/// queue takes comes back as a failure instead of vanishing.
pub struct ConfirmChannel {
    channel: lapin::Channel,
}

/// Resolves once the broker has confirmed (or refused) one publish.
pub type Confirm = std::pin::Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;

impl ConfirmChannel {
    pub async fn open(connection: &Connection) -> anyhow::Result<Self> {
        let channel = connection
            .create_channel()
            .await
            .context("opening a RabbitMQ channel")?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .context("putting the channel in confirm mode")?;
        Ok(Self { channel })
    }

    /// Persistent JSON message properties, stamped with the publish time
    /// (the daemon's end-to-end latency starts there).
    pub fn properties(mut headers: FieldTable) -> BasicProperties {
        headers.insert(
            ShortString::from(TIMESTAMP_HEADER),
            AMQPValue::LongLongInt(chrono::Utc::now().timestamp_millis()),
        );
        BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type(ShortString::from("application/json"))
            .with_headers(headers)
    }

    /// Publishes one message; the returned future is its confirmation.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> anyhow::Result<Confirm> {
        let exchange = ShortString::try_new(exchange)
            .map_err(|_| anyhow::anyhow!("exchange name longer than 255 bytes"))?;
        let key = ShortString::try_new(routing_key)
            .map_err(|_| anyhow::anyhow!("routing key longer than 255 bytes"))?;
        let confirm = self
            .channel
            .basic_publish(
                exchange,
                key,
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                properties,
            )
            .await
            .with_context(|| format!("publishing to RabbitMQ queue {routing_key:?}"))?;
        Ok(Box::pin(async move {
            let confirmation = confirm.await.context("waiting for a publisher confirm")?;
            if !confirmation.is_ack() {
                anyhow::bail!("the broker nacked a published message");
            }
            if confirmation.take_message().is_some() {
                anyhow::bail!("the broker could not route the message to a queue");
            }
            Ok(())
        }))
    }

    pub fn channel(&self) -> &lapin::Channel {
        &self.channel
    }

    pub async fn close(self) {
        self.channel.close(200, "done".into()).await.ok();
    }
}

/// Publishes bodies to the configured queue with publisher confirms,
/// keeping up to `window` unconfirmed. Declares the topology first when
/// `declare` is on. `on_progress` is called with the count confirmed so far.
pub async fn publish_rabbit<I>(
    cfg: &RabbitConfig,
    bodies: I,
    window: usize,
    rate_per_sec: Option<f64>,
    mut on_progress: impl FnMut(u64),
) -> anyhow::Result<u64>
where
    I: IntoIterator<Item = Vec<u8>>,
{
    let mut pace = Pace::new(rate_per_sec)?;
    let connection = connect_rabbit(cfg).await?;
    let channel = ConfirmChannel::open(&connection).await?;
    anyhow::ensure!(
        cfg.queue.len() <= 255,
        "rabbitmq.queue is longer than 255 bytes"
    );
    let mut in_flight = InFlight::new(window);
    pace.start();
    let mut sent = 0u64;
    for body in bodies {
        if let Some(due) = pace.due(sent)? {
            in_flight.sleep_until(due, &mut on_progress).await?;
        }
        in_flight.make_room(&mut on_progress).await?;
        // A fresh W3C trace context that the daemon's trace of the order continues.
        let mut headers = FieldTable::default();
        headers.insert(
            ShortString::from("traceparent"),
            AMQPValue::LongString(crate::telemetry::traces::new_traceparent().into()),
        );
        let props = ConfirmChannel::properties(headers);
        let confirm = channel.publish("", &cfg.queue, &body, props).await?;
        in_flight.push(confirm);
        sent += 1;
    }
    in_flight.drain(&mut on_progress).await?;
    channel.close().await;
    connection.close(200, "done".into()).await.ok();
    Ok(sent)
}

/// Produces `(key, value)` records to `topic` with `acks=all` and
/// idempotence, keeping up to `window` undelivered. `on_progress` is called
/// with the count delivered so far. Fails on the first failed delivery.
///
/// The producer takes `kafka.properties` (TLS, SASL, timeouts…) except the
/// consumer-only keys, as the source's dead-letter producer does; a property
/// given there wins over `acks` and `enable.idempotence`.
pub async fn publish_kafka<I>(
    cfg: &KafkaConfig,
    topic: &str,
    records: I,
    window: usize,
    rate_per_sec: Option<f64>,
    mut on_progress: impl FnMut(u64),
) -> anyhow::Result<u64>
where
    I: IntoIterator<Item = (String, Vec<u8>)>,
{
    let mut pace = Pace::new(rate_per_sec)?;
    let producer: FutureProducer = producer_config(cfg)
        .create()
        .context("creating the Kafka producer")?;
    check_topic(&producer, &cfg.brokers, topic).await?;
    let mut in_flight = InFlight::new(window);
    pace.start();
    let mut sent = 0u64;
    for (key, body) in records {
        if let Some(due) = pace.due(sent)? {
            in_flight.sleep_until(due, &mut on_progress).await?;
        }
        in_flight.make_room(&mut on_progress).await?;
        let traceparent = crate::telemetry::traces::new_traceparent();
        let mut record =
            FutureRecord::to(topic)
                .key(&key)
                .payload(&body)
                .headers(OwnedHeaders::new().insert(Header {
                    key: "traceparent",
                    value: Some(traceparent.as_bytes()),
                }));
        let delivery = loop {
            match producer.send_result(record) {
                Ok(delivery) => break delivery,
                // librdkafka's own queue is full (`queue.buffering.max.*`
                // below the window): wait for deliveries to make room.
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    if in_flight.is_empty() {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    } else {
                        in_flight.settle_one(&mut on_progress).await?;
                    }
                }
                Err((e, _)) => {
                    return Err(e).with_context(|| format!("producing order {key} to {topic}"))
                }
            }
        };
        in_flight.push(async move {
            match delivery.await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err((e, _))) => Err(anyhow::anyhow!(
                    "delivering order {key} to Kafka topic {topic} failed: {e}"
                )),
                Err(_) => Err(anyhow::anyhow!(
                    "the producer went away before order {key} was delivered"
                )),
            }
        });
        sent += 1;
    }
    in_flight.drain(&mut on_progress).await?;
    Ok(sent)
}

/// Fails fast, with the brokers named, when Kafka cannot be reached or the
/// topic does not exist: otherwise each message would wait out
/// `message.timeout.ms` (five minutes by default) before failing.
async fn check_topic(producer: &FutureProducer, brokers: &str, topic: &str) -> anyhow::Result<()> {
    let p = producer.clone();
    let t = topic.to_string();
    let topic_error = tokio::task::spawn_blocking(move || {
        p.client()
            .fetch_metadata(Some(&t), Duration::from_secs(10))
            .map(|m| m.topics().first().and_then(|t| t.error()))
    })
    .await
    .context("the metadata request task failed")?
    .with_context(|| format!("reaching Kafka at {brokers}"))?;
    // Other errors (e.g. no leader yet, while a broker auto-creates the
    // topic) are librdkafka's to retry.
    if topic_error == Some(RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART) {
        anyhow::bail!("Kafka topic {topic:?} does not exist at {brokers}");
    }
    Ok(())
}

/// When each message is due under a rate limit.
struct Pace {
    rate_per_sec: Option<f64>,
    started: Instant,
}

impl Pace {
    fn new(rate_per_sec: Option<f64>) -> anyhow::Result<Self> {
        if let Some(r) = rate_per_sec {
            anyhow::ensure!(
                r.is_finite() && r > 0.0,
                "the rate must be a positive number of messages per second, not {r}"
            );
        }
        Ok(Self {
            rate_per_sec,
            started: Instant::now(),
        })
    }

    /// The schedule starts now (after connecting, not before).
    fn start(&mut self) {
        self.started = Instant::now();
    }

    /// When message `n` (from 0) is due; `None` without a rate limit.
    fn due(&self, n: u64) -> anyhow::Result<Option<Instant>> {
        let Some(rate) = self.rate_per_sec else {
            return Ok(None);
        };
        Duration::try_from_secs_f64(n as f64 / rate)
            .ok()
            .and_then(|offset| self.started.checked_add(offset))
            .map(Some)
            .ok_or_else(|| anyhow::anyhow!("message {n} at {rate}/s is due too far in the future"))
    }
}

/// Published messages awaiting their acknowledgement, at most `window`.
struct InFlight<F> {
    pending: FuturesUnordered<F>,
    window: usize,
    settled: u64,
}

impl<F: Future<Output = anyhow::Result<()>>> InFlight<F> {
    fn new(window: usize) -> Self {
        Self {
            pending: FuturesUnordered::new(),
            window: window.max(1),
            settled: 0,
        }
    }

    fn push(&mut self, acknowledgement: F) {
        self.pending.push(acknowledgement);
    }

    fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    fn settled(
        &mut self,
        result: anyhow::Result<()>,
        on_progress: &mut impl FnMut(u64),
    ) -> anyhow::Result<()> {
        result?;
        self.settled += 1;
        on_progress(self.settled);
        Ok(())
    }

    /// Waits for one acknowledgement, if any is pending.
    async fn settle_one(&mut self, on_progress: &mut impl FnMut(u64)) -> anyhow::Result<()> {
        match self.pending.next().await {
            Some(result) => self.settled(result, on_progress),
            None => Ok(()),
        }
    }

    /// Settles what is already acknowledged, then waits while the window is full.
    async fn make_room(&mut self, on_progress: &mut impl FnMut(u64)) -> anyhow::Result<()> {
        while let Some(Some(result)) = self.pending.next().now_or_never() {
            self.settled(result, on_progress)?;
        }
        while self.pending.len() >= self.window {
            self.settle_one(on_progress).await?;
        }
        Ok(())
    }

    /// Sleeps until `due`, settling acknowledgements meanwhile so progress
    /// stays current at low rates.
    async fn sleep_until(
        &mut self,
        due: Instant,
        on_progress: &mut impl FnMut(u64),
    ) -> anyhow::Result<()> {
        let sleep = tokio::time::sleep_until(due.into());
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = &mut sleep => return Ok(()),
                Some(result) = self.pending.next() => self.settled(result, on_progress)?,
            }
        }
    }

    /// Waits for every pending acknowledgement.
    async fn drain(&mut self, on_progress: &mut impl FnMut(u64)) -> anyhow::Result<()> {
        while !self.pending.is_empty() {
            self.settle_one(on_progress).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::order::decode;

    #[test]
    fn pace_schedules_each_message_from_the_start() {
        let pace = Pace::new(Some(4.0)).expect("pace");
        assert_eq!(pace.due(0).expect("due"), Some(pace.started));
        assert_eq!(
            pace.due(3).expect("due"),
            Some(pace.started + Duration::from_millis(750))
        );
        assert_eq!(Pace::new(None).expect("pace").due(7).expect("due"), None);
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(Pace::new(Some(bad)).is_err(), "{bad}");
        }
        let slow = Pace::new(Some(1e-300)).expect("pace");
        assert!(slow.due(1).is_err(), "due past the end of time");
    }

    /// An acknowledgement that arrives after `ms` (paused time).
    async fn ack_after(ms: u64, ok: bool) -> anyhow::Result<()> {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        anyhow::ensure!(ok, "nacked");
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn in_flight_stays_within_the_window_and_reports_every_acknowledgement() {
        let mut seen = Vec::new();
        let mut progress = |n| seen.push(n);
        let mut in_flight = InFlight::new(3);
        for _ in 0..10 {
            in_flight.make_room(&mut progress).await.expect("room");
            assert!(in_flight.pending.len() < 3);
            in_flight.push(ack_after(10, true));
        }
        in_flight.drain(&mut progress).await.expect("drain");
        assert!(in_flight.is_empty());
        assert_eq!(seen, (1..=10).collect::<Vec<u64>>());
    }

    #[tokio::test(start_paused = true)]
    async fn in_flight_settles_while_pacing_and_fails_on_a_nack() {
        let mut last = 0;
        let mut progress = |n| last = n;
        let mut in_flight = InFlight::new(100);
        in_flight.push(ack_after(10, true));
        in_flight.push(ack_after(20, true));
        let due = Instant::now() + Duration::from_millis(50);
        in_flight
            .sleep_until(due, &mut progress)
            .await
            .expect("sleep");
        assert!(in_flight.is_empty(), "settled during the sleep");
        in_flight.push(ack_after(10, false));
        assert!(in_flight.drain(&mut progress).await.is_err());
        assert_eq!(last, 2);
    }

    #[test]
    fn generated_orders_match_their_intent() {
        let g = OrderGen::new(
            "t",
            Mix {
                poison_pct: 5.0,
                reject_pct: 5.0,
                decline_pct: 5.0,
            },
        );
        let mut counts = [0u32; 4];
        for i in 0..10_000 {
            let (intent, body) = g.message(i);
            let decoded = decode(&body, 64 * 1024);
            match intent {
                Intent::Poison => {
                    assert!(decoded.is_err(), "message {i} should be poison");
                    counts[3] += 1;
                }
                _ => {
                    let o = decoded.expect("valid order");
                    assert_eq!(o.order_id, g.order_id(i));
                    counts[intent as usize] += 1;
                }
            }
        }
        for c in &counts[1..] {
            assert!((450..550).contains(c), "{counts:?}");
        }
        assert_eq!(g.message(7), g.message(7));
    }
}
