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
//! prefetch permit, then a delivery, and hands it to the pipeline, reading
//! from the consumer that `swap` replaces when a quorum queue's prefetch
//! follows the stages; `settle` acknowledges what the pipeline finished, turning delivery tags
//! into the fewest `basic.ack`s with `acks`; `dead_letter` publishes
//! failed orders with confirms before their originals are acked.

pub mod acks;
mod dead_letter;
mod intake;
mod session;
mod settle;
pub mod swap;

use std::sync::Arc;

use lapin::options::BasicQosOptions;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::AMQPUri;
use lapin::{
    Channel, Connection, ConnectionProperties, Consumer, DefaultConnectionBuilder, ExchangeKind,
};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::prefetch::Prefetch;
use super::{Delivery, Settlement};
use crate::config::{resolve_secret, QueueType, RabbitConfig};
use crate::telemetry::{Health, Metrics};
use session::{channel_prefetch, Link, Session};

/// Header RabbitMQ's message-timestamp plugin (and `conveyor produce`) set:
/// publish time in Unix milliseconds.
pub const TIMESTAMP_HEADER: &str = "timestamp_in_ms";

#[derive(Debug, thiserror::Error)]
pub enum RabbitError {
    #[error("rabbitmq.{key}: {message}")]
    Config { key: &'static str, message: String },
    #[error("RabbitMQ TLS: {source}; {hint}")]
    Tls {
        hint: String,
        #[source]
        source: lapin::Error,
    },
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

/// The TLS settings of `rabbitmq.tls`, files read now.
pub fn tls_config(cfg: &RabbitConfig) -> Result<OwnedTLSConfig, RabbitError> {
    let read = |key: &'static str, file: &std::path::Path| {
        std::fs::read(file).map_err(|e| RabbitError::Config {
            key,
            message: format!("cannot read {}: {e}", file.display()),
        })
    };
    let mut tls = OwnedTLSConfig::default();
    if let Some(ca) = &cfg.tls.ca_file {
        let pem = read("tls.ca_file", ca)?;
        tls.cert_chain = Some(String::from_utf8_lossy(&pem).into_owned());
    }
    if let (Some(cert), Some(key)) = (&cfg.tls.cert_file, &cfg.tls.key_file) {
        tls.identity = Some(OwnedIdentity::PKCS8 {
            pem: read("tls.cert_file", cert)?,
            key: read("tls.key_file", key)?,
        });
    }
    Ok(tls)
}

/// Connects with the configured credentials and TLS settings. A refused
/// TLS handshake says which keys decide it.
pub async fn connect(
    cfg: &RabbitConfig,
    props: ConnectionProperties,
) -> Result<Connection, RabbitError> {
    let uri = amqp_uri(cfg)?;
    let builder = DefaultConnectionBuilder::new()
        .map_err(broker("starting the AMQP client"))?
        .with_uri(uri)
        .with_properties(props)
        .with_tls_config(tls_config(cfg)?);
    builder.connect().await.map_err(|source| {
        let text = source.to_string().to_ascii_lowercase();
        if cfg.url.starts_with("amqps://")
            && ["certificate", "tls", "handshake", "issuer"]
                .iter()
                .any(|w| text.contains(w))
        {
            let client_cert = text.contains("certificaterequired")
                || text.contains("certificate required")
                || text.contains("unknownca")
                || text.contains("badcertificate");
            RabbitError::Tls {
                hint: match &cfg.tls.ca_file {
                    _ if client_cert => match &cfg.tls.cert_file {
                        None => "the broker wants a client certificate: set \
                                 rabbitmq.tls.cert_file and rabbitmq.tls.key_file"
                            .into(),
                        Some(f) => format!(
                            "the broker refused the client certificate rabbitmq.tls.cert_file ({})",
                            f.display()
                        ),
                    },
                    Some(f) => format!(
                        "does the broker's certificate chain to rabbitmq.tls.ca_file ({}) \
                         and name the host of rabbitmq.url?",
                        f.display()
                    ),
                    None => "rabbitmq.tls.ca_file is unset, so only the system's CA store \
                             is trusted"
                        .into(),
                },
                source,
            }
        } else {
            RabbitError::Broker {
                what: "connecting",
                source,
            }
        }
    })
}

/// The arguments the work queue is declared with: none for a classic
/// queue (as it always was, so an existing one still matches); for a
/// quorum queue its type, the broker's delivery limit, and the dead-letter
/// exchange that a message over that limit goes to (at least once, which
/// RabbitMQ allows only with `reject-publish` overflow).
pub fn queue_arguments(cfg: &RabbitConfig) -> Result<FieldTable, RabbitError> {
    let mut args = FieldTable::default();
    if cfg.queue_type != QueueType::Quorum {
        return Ok(args);
    }
    let text = |v: &str| AMQPValue::LongString(LongString::from(v.as_bytes().to_vec()));
    args.insert(ShortString::from("x-queue-type"), text("quorum"));
    args.insert(
        ShortString::from("x-delivery-limit"),
        AMQPValue::LongInt(i32::try_from(cfg.delivery_limit).unwrap_or(i32::MAX)),
    );
    if !cfg.dead_letter_exchange.is_empty() {
        args.insert(
            ShortString::from("x-dead-letter-exchange"),
            text(&cfg.dead_letter_exchange),
        );
        args.insert(
            ShortString::from("x-dead-letter-routing-key"),
            text(&cfg.queue),
        );
        args.insert(
            ShortString::from("x-dead-letter-strategy"),
            text("at-least-once"),
        );
        args.insert(ShortString::from("x-overflow"), text("reject-publish"));
    } else {
        // Straight to the dead-letter queue through the default exchange.
        args.insert(ShortString::from("x-dead-letter-exchange"), text(""));
        args.insert(
            ShortString::from("x-dead-letter-routing-key"),
            text(&cfg.dead_letter_queue()),
        );
    }
    Ok(args)
}

/// Declares the work queue, the dead-letter exchange and queue, durable.
/// A queue that exists with other arguments (classic where quorum is
/// configured, or the reverse) is refused by the broker; the error names
/// `rabbitmq.queue_type`.
pub async fn declare_topology(channel: &Channel, cfg: &RabbitConfig) -> Result<(), RabbitError> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    // The dead-letter side first: a quorum queue names it as its target.
    let dlq = cfg.dead_letter_queue();
    channel
        .queue_declare(
            short("dead_letter_queue", &dlq)?,
            durable,
            FieldTable::default(),
        )
        .await
        .map_err(broker("declaring the dead-letter queue"))?;
    channel
        .queue_declare(short("queue", &cfg.queue)?, durable, queue_arguments(cfg)?)
        .await
        .map_err(|e| {
            let text = e.to_string();
            if text.contains("PRECONDITION_FAILED") || text.contains("inequivalent") {
                RabbitError::Config {
                    key: "queue_type",
                    message: format!(
                        "queue {:?} exists with other arguments than a {:?} queue with \
                         delivery_limit {} (rabbitmq.queue_type, rabbitmq.delivery_limit, \
                         rabbitmq.dead_letter_exchange): {text}",
                        cfg.queue, cfg.queue_type, cfg.delivery_limit
                    ),
                }
            } else {
                RabbitError::Broker {
                    what: "declaring the queue",
                    source: e,
                }
            }
        })?;
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

/// Re-issues the per-channel `basic.qos` on the live session whenever the
/// following prefetch limit moves (see `session` for why per channel). A
/// session opened meanwhile sets the then current limit itself; a failed
/// `basic.qos` means the channel is gone, which intake notices and
/// reconnects.
async fn follow_qos(mut follow: watch::Receiver<u32>, mut sessions: watch::Receiver<Arc<Session>>) {
    let mut set: Option<(u64, u32)> = None;
    loop {
        let session = sessions.borrow_and_update().clone();
        let limit = *follow.borrow_and_update();
        if !session.lost.is_cancelled() && set != Some((session.generation, limit)) {
            let count = channel_prefetch(limit);
            match session
                .consume
                .basic_qos(count, BasicQosOptions { global: true })
                .await
            {
                Ok(()) => {
                    set = Some((session.generation, limit));
                    tracing::debug!(prefetch = count, "per-channel basic.qos issued");
                }
                Err(e) => tracing::debug!(error = %e, "issuing the per-channel basic.qos"),
            }
        }
        drop(session);
        tokio::select! {
            r = follow.changed() => if r.is_err() { return },
            r = sessions.changed() => if r.is_err() { return },
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
    ///
    /// `follow` is the following prefetch limit, when
    /// `source.prefetch_follow` is on. On a classic queue it is set as a
    /// per-channel `basic.qos` on each session and re-issued whenever it
    /// moves; on a quorum queue it is the consumer's own prefetch, and the
    /// consumer is swapped for one with the new count when it moves enough
    /// (see [`swap`]).
    pub async fn connect(
        cfg: &RabbitConfig,
        prefetch: u32,
        follow: Option<watch::Receiver<u32>>,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> Result<Self, RabbitError> {
        let prefetch = u16::try_from(prefetch).map_err(|_| RabbitError::Config {
            key: "prefetch",
            message: "AMQP prefetch is at most 65535".into(),
        })?;
        amqp_uri(cfg)?;
        let link = Link {
            cfg: cfg.clone(),
            prefetch,
            follow,
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
        permits: Arc<Prefetch>,
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
        let work = async { tokio::join!(intake, settle) };
        let qos = async {
            let classic = link.cfg.queue_type == QueueType::Classic;
            if let Some(follow) = link.follow.clone().filter(|_| classic) {
                follow_qos(follow, sessions.clone()).await;
            }
        };
        tokio::pin!(work);
        // The qos follower ends only when its channels close; the run ends
        // when intake and settlement are done.
        let (intake_result, ()) = tokio::select! {
            r = &mut work => r,
            () = qos => work.await,
        };
        Health::set(&health.broker_connected, false);
        let last = sessions.borrow().clone();
        last.close("conveyor stopped").await;
        intake_result
    }
}
