//! RabbitMQ source (lapin): `basic.qos(prefetch)`, manual acks, dead
//! letters published with publisher confirms before the original is acked,
//! and explicit reconnection.
//!
//! A `Session` is one connection with two channels: `consume` carries
//! deliveries and their acks (delivery tags are per channel), `publish` is
//! in confirm mode for dead letters. Each session has a *generation*, which
//! every token it hands out carries.
//!
//! When a session fails (the consumer stream errors or ends, an ack or a
//! dead-letter publish fails, the connection reports an error), intake
//! closes it and opens the next generation with exponential backoff:
//! connect, declare the topology, `basic.qos`, consume. lapin's own
//! recovery stays off, so nothing is replayed behind our back and the
//! generation boundary is exact. `broker_connected` is false in between.
//! Settlements carrying a token of an older generation are dropped, never
//! acknowledged on the new channel: the broker redelivers those messages
//! flagged `redelivered`, and the stored outcome makes that a no-op.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer, ExchangeKind};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use super::{AckToken, DeadLetter, Delivery, Held, Position, Settlement, TokenKind};
use super::{DEAD_LETTER_ATTEMPTS, DEAD_LETTER_RETRY_INITIAL, DEAD_LETTER_RETRY_MAX};
use crate::ack::AmqpAckRuns;
use crate::config::{resolve_secret, RabbitConfig};
use crate::downstream::retry::FullJitter;
use crate::telemetry::{Health, Metrics};

/// Header RabbitMQ's message-timestamp plugin (and `conveyor produce`) set:
/// publish time in Unix milliseconds.
pub const TIMESTAMP_HEADER: &str = "timestamp_in_ms";

#[derive(Debug, thiserror::Error)]
pub enum RabbitError {
    #[error("rabbitmq.{key}: {message}")]
    Config { key: &'static str, message: String },
    #[error("RabbitMQ {what}: {source}")]
    Broker {
        what: &'static str,
        #[source]
        source: lapin::Error,
    },
}

fn broker(what: &'static str) -> impl FnOnce(lapin::Error) -> RabbitError {
    move |source| RabbitError::Broker { what, source }
}

fn short(key: &'static str, value: &str) -> Result<ShortString, RabbitError> {
    ShortString::try_new(value).map_err(|_| RabbitError::Config {
        key,
        message: format!("{} bytes, AMQP names are at most 255", value.len()),
    })
}

/// Builds the AMQP URI with the configured credentials.
pub fn amqp_uri(cfg: &RabbitConfig) -> Result<AMQPUri, RabbitError> {
    let mut uri: AMQPUri = cfg.url.parse().map_err(|e: String| RabbitError::Config {
        key: "url",
        message: e.to_string(),
    })?;
    let password =
        resolve_secret("rabbitmq.password", &cfg.password, &cfg.password_file).map_err(|e| {
            RabbitError::Config {
                key: "password_file",
                message: e.message,
            }
        })?;
    uri.authority.userinfo.username = cfg.username.clone();
    if let Some(pw) = password {
        uri.authority.userinfo.password = pw.expose().to_string();
    }
    Ok(uri)
}

/// Declares the work queue, the dead-letter exchange and queue, durable.
pub async fn declare_topology(channel: &Channel, cfg: &RabbitConfig) -> Result<(), RabbitError> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(short("queue", &cfg.queue)?, durable, FieldTable::default())
        .await
        .map_err(broker("declaring the queue"))?;
    let dlq = cfg.dead_letter_queue();
    channel
        .queue_declare(
            short("dead_letter_queue", &dlq)?,
            durable,
            FieldTable::default(),
        )
        .await
        .map_err(broker("declaring the dead-letter queue"))?;
    if !cfg.dead_letter_exchange.is_empty() {
        channel
            .exchange_declare(
                short("dead_letter_exchange", &cfg.dead_letter_exchange)?,
                ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(broker("declaring the dead-letter exchange"))?;
        channel
            .queue_bind(
                short("dead_letter_queue", &dlq)?,
                short("dead_letter_exchange", &cfg.dead_letter_exchange)?,
                short("queue", &cfg.queue)?,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(broker("binding the dead-letter queue"))?;
    }
    Ok(())
}

/// Reconnect backoff: the wait doubles from `RECONNECT_INITIAL` up to
/// `RECONNECT_MAX`, each one jittered so that many daemons losing the same
/// broker do not come back in lockstep.
const RECONNECT_INITIAL: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// An attempt that hangs (a broker that accepts TCP but never answers)
/// counts as failed after this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Closing a session that may already be dead must not hold up intake.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Exponential backoff with "equal jitter": each wait is uniform in
/// `[ceiling / 2, ceiling]`, so it never collapses to zero (full jitter
/// would let a broker that refuses at once be hammered).
#[derive(Debug)]
struct Backoff {
    ceiling: Duration,
    max: Duration,
}

impl Backoff {
    fn new(initial: Duration, max: Duration) -> Self {
        Self {
            ceiling: initial,
            max,
        }
    }

    fn next_wait(&mut self) -> Duration {
        let half = self.ceiling / 2;
        let wait = half + half.mul_f64(rand::random::<f64>());
        self.ceiling = (self.ceiling * 2).min(self.max);
        wait
    }
}

/// What opening a session needs: the broker address and everything that is
/// declared or set on each new connection.
struct Link {
    cfg: RabbitConfig,
    uri: AMQPUri,
    prefetch: u16,
    metrics: Arc<Metrics>,
}

/// One connection's worth of broker state, all of which dies together.
///
/// `consume` carries deliveries and their acks (delivery tags are per
/// channel, so an ack is only meaningful on the channel that delivered);
/// `publish` is in confirm mode for dead letters.
struct Session {
    /// Stamped on every token this session hands out; settlement acks a
    /// token only on the session of the same generation.
    generation: u64,
    connection: Connection,
    consume: Channel,
    publish: Channel,
    /// Cancelled by whoever first sees this session fail (intake, an ack,
    /// a dead-letter publish, a connection error event); intake then
    /// replaces it.
    lost: CancellationToken,
    /// Connection-event and queue-depth watchers, aborted with the session.
    _watchers: Vec<AbortOnDropHandle<()>>,
}

impl Session {
    /// Marks the session lost (idempotent); says why the first time.
    fn lose(&self, why: &str) {
        if !self.lost.is_cancelled() {
            tracing::warn!(
                generation = self.generation,
                reason = why,
                "RabbitMQ session lost"
            );
            self.lost.cancel();
        }
    }

    /// Closes the connection, which is what makes the broker requeue every
    /// delivery of this session that was not acknowledged. Best effort: a
    /// dead connection has nothing left to close.
    async fn close(&self, reason: &str) {
        let close = async {
            if let Err(e) = self.consume.close(200, reason.into()).await {
                tracing::debug!(error = %e, "closing the consume channel");
            }
            if let Err(e) = self.publish.close(200, reason.into()).await {
                tracing::debug!(error = %e, "closing the publish channel");
            }
            if let Err(e) = self.connection.close(200, reason.into()).await {
                tracing::debug!(error = %e, "closing the connection");
            }
        };
        if tokio::time::timeout(CLOSE_TIMEOUT, close).await.is_err() {
            tracing::debug!(
                generation = self.generation,
                "closing the session timed out"
            );
        }
    }
}

impl Link {
    /// Connects, declares the topology, sets `basic.qos` and starts the
    /// consumer: everything lapin's own recovery would otherwise replay
    /// behind our back, done explicitly so the generation boundary is ours.
    async fn open(&self, generation: u64) -> Result<(Session, Consumer), RabbitError> {
        let cfg = &self.cfg;
        let props = ConnectionProperties::default()
            .with_connection_name(LongString::from("conveyor".to_string()));
        let connection = Connection::connect_uri(self.uri.clone(), props)
            .await
            .map_err(broker("connecting"))?;
        // From here on an early return drops `connection`, which closes it,
        // and the watchers, which aborts them.
        let lost = CancellationToken::new();
        let mut watchers = vec![AbortOnDropHandle::new(tokio::spawn(watch_events(
            connection.events_listener(),
            lost.clone(),
            generation,
        )))];
        let consume = connection
            .create_channel()
            .await
            .map_err(broker("opening a channel"))?;
        if cfg.declare {
            declare_topology(&consume, cfg).await?;
        }
        consume
            .basic_qos(self.prefetch, BasicQosOptions::default())
            .await
            .map_err(broker("setting basic.qos"))?;
        let publish = connection
            .create_channel()
            .await
            .map_err(broker("opening a channel"))?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(broker("enabling publisher confirms"))?;
        let consumer = consume
            .basic_consume(
                short("queue", &cfg.queue)?,
                short("consumer_tag", &cfg.consumer_tag)?,
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(broker("starting the consumer"))?;
        watchers.push(AbortOnDropHandle::new(tokio::spawn(watch_depth(
            connection.create_channel().await.ok(),
            cfg.queue.clone(),
            self.metrics.clone(),
        ))));
        let session = Session {
            generation,
            connection,
            consume,
            publish,
            lost,
            _watchers: watchers,
        };
        Ok((session, consumer))
    }

    /// Opens the session of `generation`, retrying with backoff until it
    /// works. `None` when `stop` fires first.
    async fn reopen(
        &self,
        generation: u64,
        stop: &CancellationToken,
    ) -> Option<(Session, Consumer)> {
        let mut backoff = Backoff::new(RECONNECT_INITIAL, RECONNECT_MAX);
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let opened = tokio::select! {
                biased;
                _ = stop.cancelled() => return None,
                r = tokio::time::timeout(CONNECT_TIMEOUT, self.open(generation)) => r,
            };
            let error = match opened {
                Ok(Ok(opened)) => return Some(opened),
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {CONNECT_TIMEOUT:?}"),
            };
            let wait = backoff.next_wait();
            tracing::warn!(attempt, error = %error, retry_in = ?wait, "RabbitMQ reconnect failed");
            self.metrics
                .broker_errors
                .with_label_values(&["rabbitmq", "reconnect_failed"])
                .inc();
            tokio::select! {
                biased;
                _ = stop.cancelled() => return None,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// Turns the first connection-level error into "this session is lost", so
/// a dead connection is noticed even while intake is waiting for a permit
/// and nothing is being acknowledged.
async fn watch_events(
    events: impl futures::Stream<Item = lapin::Event> + Send + 'static,
    lost: CancellationToken,
    generation: u64,
) {
    let mut events = std::pin::pin!(events);
    while let Some(event) = events.next().await {
        if let lapin::Event::Error(e) = event {
            if !lost.is_cancelled() {
                tracing::warn!(generation, error = %e, "RabbitMQ connection error");
                lost.cancel();
            }
            return;
        }
    }
}

/// A connected RabbitMQ source, ready to consume. It keeps consuming across
/// lost connections: see [`RabbitSource::run`].
pub struct RabbitSource {
    link: Link,
    session: Session,
    consumer: Consumer,
    queue: Arc<str>,
    health: Arc<Health>,
}

impl RabbitSource {
    /// Opens the first session. Failing here is fatal (a wrong address or
    /// credentials should stop the daemon at start, not loop); a connection
    /// lost later is re-established by [`RabbitSource::run`].
    pub async fn connect(
        cfg: &RabbitConfig,
        prefetch: u32,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> Result<Self, RabbitError> {
        let prefetch = u16::try_from(prefetch).map_err(|_| RabbitError::Config {
            key: "prefetch",
            message: "AMQP prefetch is at most 65535".into(),
        })?;
        let link = Link {
            uri: amqp_uri(cfg)?,
            cfg: cfg.clone(),
            prefetch,
            metrics,
        };
        let (session, consumer) = link.open(1).await?;
        Health::set(&health.broker_connected, true);
        tracing::info!(queue = %cfg.queue, prefetch, "consuming from RabbitMQ");
        Ok(Self {
            queue: Arc::from(cfg.queue.as_str()),
            link,
            session,
            consumer,
            health,
        })
    }

    /// Runs intake and settlement until intake is stopped and every
    /// settlement has been handled (the pipeline dropped its senders).
    ///
    /// Intake stops on `stop_intake` (or when the pipeline is gone); then it
    /// drops `deliveries`, which is what drains the pipeline. A lost session
    /// does not stop it: intake reconnects with backoff (`broker_connected`
    /// is false meanwhile) and publishes the new session to settlement,
    /// which from then on acknowledges only tokens of the new generation.
    pub async fn run(
        self,
        permits: Arc<Semaphore>,
        deliveries: mpsc::Sender<Delivery>,
        settlements: mpsc::UnboundedReceiver<Settlement>,
        stop_intake: CancellationToken,
    ) -> Result<(), RabbitError> {
        let Self {
            link,
            session,
            consumer,
            queue,
            health,
        } = self;
        let (sessions_tx, sessions) = watch::channel(Arc::new(session));
        let intake = intake(
            &link,
            consumer,
            &sessions_tx,
            queue,
            permits,
            deliveries,
            stop_intake,
            &health,
        );
        let settle = settle(settlements, sessions.clone(), &link.cfg, &link.metrics);
        let (intake_result, ()) = tokio::join!(intake, settle);
        Health::set(&health.broker_connected, false);
        let last = sessions.borrow().clone();
        last.close("conveyor stopped").await;
        intake_result
    }
}

/// How often `conveyor_rabbitmq_queue_messages` is refreshed.
const DEPTH_INTERVAL: Duration = Duration::from_secs(5);

/// Refreshes the queue depth with a passive declare on its own channel (a
/// failed passive declare closes the channel it ran on).
async fn watch_depth(channel: Option<Channel>, queue: String, metrics: Arc<Metrics>) {
    let Some(channel) = channel else {
        return;
    };
    let Ok(name) = ShortString::try_new(queue.as_str()) else {
        return;
    };
    let gauge = metrics.rabbitmq_queue.with_label_values(&[queue.as_str()]);
    let mut tick = tokio::time::interval(DEPTH_INTERVAL);
    loop {
        tick.tick().await;
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        match channel
            .queue_declare(name.clone(), passive, FieldTable::default())
            .await
        {
            Ok(q) => gauge.set(i64::from(q.message_count())),
            Err(e) => {
                tracing::debug!(error = %e, "queue depth unavailable");
                return;
            }
        }
    }
}

/// How one session's intake ended.
enum Ended {
    /// `stop_intake` fired or the pipeline is gone: the daemon is stopping.
    Stopped,
    /// The session failed; intake reconnects.
    Lost(String),
}

/// Consumes session after session until stopped. Owns reconnection: it is
/// the only writer of `sessions`.
#[allow(clippy::too_many_arguments)]
async fn intake(
    link: &Link,
    mut consumer: Consumer,
    sessions: &watch::Sender<Arc<Session>>,
    queue: Arc<str>,
    permits: Arc<Semaphore>,
    deliveries: mpsc::Sender<Delivery>,
    stop: CancellationToken,
    health: &Health,
) -> Result<(), RabbitError> {
    loop {
        let session = sessions.borrow().clone();
        let ended = consume_session(
            &session,
            &mut consumer,
            &link.cfg,
            &queue,
            &permits,
            &deliveries,
            &stop,
            &link.metrics,
        )
        .await;
        match ended {
            Ended::Stopped => break,
            Ended::Lost(why) => {
                session.lose(&why);
                Health::set(&health.broker_connected, false);
                // Whatever of this session is still unacknowledged comes
                // back from the broker once the connection is closed.
                session.close("conveyor: session lost").await;
                let next = session.generation + 1;
                drop(session);
                let Some((fresh, c)) = link.reopen(next, &stop).await else {
                    break;
                };
                consumer = c;
                sessions.send_replace(Arc::new(fresh));
                Health::set(&health.broker_connected, true);
                tracing::info!(
                    generation = next,
                    queue = %link.cfg.queue,
                    "RabbitMQ reconnected; consuming again"
                );
            }
        }
    }
    // Stop the flow of new deliveries; what lapin has buffered but we did
    // not take stays unacknowledged and is requeued when the channel closes.
    let session = sessions.borrow().clone();
    if !session.lost.is_cancelled() {
        if let Ok(tag) = ShortString::try_new(link.cfg.consumer_tag.as_str()) {
            if let Err(e) = session
                .consume
                .basic_cancel(tag, BasicCancelOptions::default())
                .await
            {
                tracing::debug!(error = %e, "cancelling the consumer");
            }
        }
    }
    tracing::info!("intake stopped");
    Ok(())
}

/// Intake on one session: a permit, then a message, then hand it on.
#[allow(clippy::too_many_arguments)]
async fn consume_session(
    session: &Session,
    consumer: &mut Consumer,
    cfg: &RabbitConfig,
    queue: &Arc<str>,
    permits: &Arc<Semaphore>,
    deliveries: &mpsc::Sender<Delivery>,
    stop: &CancellationToken,
    metrics: &Arc<Metrics>,
) -> Ended {
    let generation = session.generation;
    let lost = || Ended::Lost("reported by settlement or the connection".into());
    loop {
        // The permit first: without one, nothing more is taken from the
        // broker. This is where backpressure stops intake.
        let permit = tokio::select! {
            biased;
            _ = stop.cancelled() => return Ended::Stopped,
            _ = session.lost.cancelled() => return lost(),
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return Ended::Stopped,
            },
        };
        let next = tokio::select! {
            biased;
            _ = stop.cancelled() => return Ended::Stopped,
            _ = session.lost.cancelled() => return lost(),
            n = consumer.next() => n,
        };
        let d = match next {
            Some(Ok(d)) => d,
            Some(Err(e)) => return Ended::Lost(format!("consumer error: {e}")),
            None => {
                return Ended::Lost(format!(
                    "the broker cancelled the consumer of queue {}",
                    cfg.queue
                ))
            }
        };
        metrics.received.inc();
        let timestamp_ms = d
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(TIMESTAMP_HEADER))
            .and_then(|v| match v {
                AMQPValue::LongLongInt(ms) => Some(*ms),
                AMQPValue::Timestamp(ms) => i64::try_from(*ms).ok(),
                _ => None,
            })
            .or_else(|| {
                d.properties
                    .timestamp()
                    .and_then(|s| i64::try_from(s).ok())
                    .map(|s| s * 1000)
            });
        let delivery = Delivery {
            position: Position::Rabbit {
                queue: queue.clone(),
                delivery_tag: d.delivery_tag,
            },
            redelivered: d.redelivered,
            received_at: Instant::now(),
            timestamp_ms,
            traceparent: d
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get("traceparent"))
                .and_then(|v| match v {
                    AMQPValue::LongString(s) => Some(s.to_string()),
                    AMQPValue::ShortString(s) => Some(s.to_string()),
                    _ => None,
                }),
            token: AckToken {
                kind: TokenKind::Rabbit {
                    generation,
                    delivery_tag: d.delivery_tag,
                },
                _permit: permit,
                _held: Held::new(metrics),
            },
            body: Bytes::from(d.data),
            key: None,
        };
        if deliveries.send(delivery).await.is_err() {
            return Ended::Stopped;
        }
    }
}

/// A dead-letter publish in progress: the letter, the session it was
/// published on, and how it went.
type Publishing = JoinSet<(Box<DeadLetter>, Arc<Session>, Result<(), String>)>;

/// Acknowledges settled deliveries on the current session; publishes dead
/// letters and acks their originals once the broker has confirmed them.
///
/// A token of another generation than the current session's is dropped
/// unacknowledged: its channel is gone, the broker redelivers the message
/// (flagged redelivered) and the stored outcome makes that a no-op. The ack
/// runs are per channel, so they start afresh with each generation.
async fn settle(
    mut settlements: mpsc::UnboundedReceiver<Settlement>,
    sessions: watch::Receiver<Arc<Session>>,
    cfg: &RabbitConfig,
    metrics: &Metrics,
) {
    let mut runs = AmqpAckRuns::new();
    let mut runs_generation = sessions.borrow().generation;
    let mut held: Vec<AckToken> = Vec::new();
    let mut publishing: Publishing = JoinSet::new();
    let mut closed = false;
    loop {
        tokio::select! {
            s = settlements.recv(), if !closed => match s {
                Some(s) => {
                    accept(s, &mut held, &mut publishing, &sessions, cfg);
                    // Take whatever else is ready so one ack covers it.
                    while let Ok(s) = settlements.try_recv() {
                        accept(s, &mut held, &mut publishing, &sessions, cfg);
                    }
                }
                None => closed = true,
            },
            Some(joined) = publishing.join_next(), if !publishing.is_empty() => match joined {
                Ok((dl, _, Ok(()))) => {
                    metrics.dead_letters.with_label_values(&[dl.reason.as_str()]).inc();
                    metrics.orders.with_label_values(&["dead_lettered"]).inc();
                    tracing::warn!(order_id = dl.order_id.as_deref().unwrap_or(""),
                        position = %dl.position, reason = %dl.reason, stage = dl.stage,
                        detail = %dl.detail, "dead-lettered");
                    held.push(dl.token);
                }
                Ok((dl, session, Err(e))) => {
                    // Dropping the token of a live channel would leave the
                    // original unacknowledged there until the channel
                    // closes; losing the session closes it, and the broker
                    // redelivers.
                    tracing::error!(position = %dl.position, error = %e,
                        "dead-letter publish failed; the original stays unacknowledged");
                    session.lose("a dead-letter publish failed");
                }
                Err(e) => tracing::error!(error = %e, "dead-letter task failed"),
            },
            else => break,
        }
        let session = sessions.borrow().clone();
        if session.generation != runs_generation {
            runs = AmqpAckRuns::new();
            runs_generation = session.generation;
        }
        // Acks on a channel being torn down are pointless: until intake
        // publishes the next session, everything settled comes back too.
        let live = !session.lost.is_cancelled();
        // Kept until their acks are sent: a token holds a prefetch permit.
        let mut acking = Vec::with_capacity(held.len());
        let mut stale = 0usize;
        for token in held.drain(..) {
            match token.kind {
                TokenKind::Rabbit {
                    generation,
                    delivery_tag,
                } if live && generation == session.generation => {
                    runs.done(delivery_tag);
                    acking.push(token);
                }
                _ => stale += 1,
            }
        }
        if stale > 0 {
            tracing::info!(
                stale,
                generation = session.generation,
                "settled deliveries of a lost session dropped; the broker redelivers them"
            );
        }
        if acking.is_empty() {
            continue;
        }
        let mut failed = false;
        for ack in runs.take_acks() {
            let options = BasicAckOptions {
                multiple: ack.multiple,
            };
            if let Err(e) = session.consume.basic_ack(ack.delivery_tag, options).await {
                // The channel is gone: its deliveries come back, and their
                // stored outcomes make the redelivery a no-op.
                tracing::error!(delivery_tag = ack.delivery_tag, error = %e,
                    "ack failed; unacknowledged deliveries will be redelivered");
                session.lose("an ack failed");
                failed = true;
                break;
            }
        }
        if !failed {
            metrics.acked.inc_by(acking.len() as u64);
        }
        drop(acking);
    }
}

fn accept(
    s: Settlement,
    held: &mut Vec<AckToken>,
    publishing: &mut Publishing,
    sessions: &watch::Receiver<Arc<Session>>,
    cfg: &RabbitConfig,
) {
    match s {
        Settlement::Done(tokens) => held.extend(tokens),
        Settlement::DeadLetter(dl) => {
            let session = sessions.borrow().clone();
            let current = matches!(dl.token.kind,
                TokenKind::Rabbit { generation, .. } if generation == session.generation);
            if !current || session.lost.is_cancelled() {
                // The original cannot be acked any more: it is redelivered
                // and dead-lettered again then. Publishing now would only
                // make a second copy.
                tracing::info!(position = %dl.position, reason = %dl.reason,
                    "dead letter of a lost session dropped; the broker redelivers the original");
                return;
            }
            let exchange = cfg.dead_letter_exchange.clone();
            let routing_key = if exchange.is_empty() {
                cfg.dead_letter_queue()
            } else {
                cfg.queue.clone()
            };
            publishing.spawn(async move {
                let result =
                    publish_dead_letter(&session.publish, &exchange, &routing_key, &dl).await;
                (dl, session, result)
            });
        }
    }
}

fn header(table: &mut FieldTable, key: &str, value: &str) {
    table.insert(
        ShortString::from(key),
        AMQPValue::LongString(LongString::from(value.as_bytes().to_vec())),
    );
}

/// Publishes with confirms, retrying a nack or a transient failure a few
/// times before giving up (the original then stays unacknowledged).
async fn publish_dead_letter(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    dl: &DeadLetter,
) -> Result<(), String> {
    let mut headers = FieldTable::default();
    header(&mut headers, "x-conveyor-reason", &dl.reason);
    header(&mut headers, "x-conveyor-detail", &dl.detail);
    header(&mut headers, "x-conveyor-stage", dl.stage);
    header(&mut headers, "x-conveyor-source", &dl.position.to_string());
    header(
        &mut headers,
        "x-conveyor-failed-at",
        &chrono::Utc::now().to_rfc3339(),
    );
    if let Some(id) = &dl.order_id {
        header(&mut headers, "x-conveyor-order-id", id);
    }
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(headers);
    let exchange = ShortString::try_new(exchange).map_err(|e| e.to_string())?;
    let routing_key = ShortString::try_new(routing_key).map_err(|e| e.to_string())?;
    let mut last = String::new();
    let mut backoff = FullJitter::doubling(DEAD_LETTER_RETRY_INITIAL, DEAD_LETTER_RETRY_MAX);
    for attempt in 0..DEAD_LETTER_ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(backoff.next_wait()).await;
        }
        if !channel.status().connected() {
            // Retrying on a dead channel only delays the redelivery.
            return Err(format!("the publish channel is closed ({last})"));
        }
        let confirm = channel
            .basic_publish(
                exchange.clone(),
                routing_key.clone(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &dl.body,
                props.clone(),
            )
            .await;
        match confirm {
            Ok(pending) => match pending.await {
                Ok(c) if c.is_ack() => {
                    if c.take_message().is_none() {
                        return Ok(());
                    }
                    last = "the broker could not route the dead letter".into();
                }
                Ok(_) => last = "the broker nacked the dead letter".into(),
                Err(e) => last = e.to_string(),
            },
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_backoff_doubles_to_its_cap_and_never_collapses() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut ceiling = Duration::from_millis(100);
        for _ in 0..20 {
            let wait = b.next_wait();
            assert!(
                wait >= ceiling / 2 && wait <= ceiling,
                "{wait:?} outside [{:?}, {ceiling:?}]",
                ceiling / 2
            );
            ceiling = (ceiling * 2).min(Duration::from_secs(5));
        }
        assert_eq!(b.ceiling, Duration::from_secs(5));
    }
}
