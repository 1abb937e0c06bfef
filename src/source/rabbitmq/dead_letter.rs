//! Dead letters on RabbitMQ: the original bytes with `x-conveyor-*`
//! headers, published persistent and mandatory on the confirm-mode channel
//! to `rabbitmq.dead_letter_exchange` (or straight to the dead-letter
//! queue), retried with jitter; only a confirmed, routed publish counts.

use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel};

use crate::downstream::retry::FullJitter;
use crate::source::DeadLetter;
use crate::source::{DEAD_LETTER_ATTEMPTS, DEAD_LETTER_RETRY_INITIAL, DEAD_LETTER_RETRY_MAX};

fn header(table: &mut FieldTable, key: &str, value: &str) {
    table.insert(
        ShortString::from(key),
        AMQPValue::LongString(LongString::from(value.as_bytes().to_vec())),
    );
}

/// Publishes with confirms, retrying a nack or a transient failure a few
/// times before giving up (the original then stays unacknowledged).
pub(super) async fn publish_dead_letter(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    dl: &DeadLetter,
) -> Result<(), String> {
    let mut headers = FieldTable::default();
    header(&mut headers, "x-conveyor-reason", dl.reason.as_str());
    header(&mut headers, "x-conveyor-detail", &dl.detail);
    header(&mut headers, "x-conveyor-stage", dl.stage.as_str());
    header(&mut headers, "x-conveyor-source", &dl.position.to_string());
    header(
        &mut headers,
        "x-conveyor-failed-at",
        &chrono::Utc::now().to_rfc3339(),
    );
    if let Some(id) = &dl.order_id {
        header(&mut headers, "x-conveyor-order-id", id);
    }
    for (key, value) in &dl.extra_headers {
        header(&mut headers, key, value);
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
