//! Publishing to RabbitMQ with publisher confirms.

use std::future::Future;

use anyhow::Context as _;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};

use super::pace::{InFlight, Pace};
use crate::config::RabbitConfig;
use crate::source::rabbitmq::{declare_topology, TIMESTAMP_HEADER};

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
