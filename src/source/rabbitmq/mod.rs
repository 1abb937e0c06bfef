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
//!
//! The modules follow one message: `session` opens a connection with its
//! channels (and reopens it, with backoff, when it dies); `intake` takes a
//! prefetch permit, then a delivery, and hands it to the pipeline;
//! `settle` acknowledges what the pipeline finished, turning delivery tags
//! into the fewest `basic.ack`s with `acks`; `dead_letter` publishes
//! failed orders with confirms before their originals are acked.

pub mod acks;
mod dead_letter;
mod intake;
mod session;
mod settle;

use std::sync::Arc;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::uri::AMQPUri;
use lapin::{Channel, Consumer, ExchangeKind};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_util::sync::CancellationToken;

use super::{Delivery, Settlement};
use crate::config::{resolve_secret, RabbitConfig};
use crate::telemetry::{Health, Metrics};
use session::{Link, Session};

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
        let intake = intake::intake(
            &link,
            consumer,
            &sessions_tx,
            queue,
            permits,
            deliveries,
            stop_intake,
            &health,
        );
        let settle = settle::settle(settlements, sessions.clone(), &link.cfg, &link.metrics);
        let (intake_result, ()) = tokio::join!(intake, settle);
        Health::set(&health.broker_connected, false);
        let last = sessions.borrow().clone();
        last.close("conveyor stopped").await;
        intake_result
    }
}
