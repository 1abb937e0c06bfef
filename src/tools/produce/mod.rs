//! Load generation: a deterministic mix of orders (good, to-be-rejected,
//! to-be-declined, poison) and publishers for RabbitMQ (publisher confirms)
//! and Kafka (`acks=all`, idempotent), used by `conveyor produce`, the tests
//! and the benchmarks.
//!
//! Both publishers pace messages on a schedule (message `n` is due at
//! `start + n / rate`, so a late message does not push back the ones after
//! it) and keep a bounded window of unacknowledged messages, reporting
//! progress as acknowledgements arrive.
//!
//! `orders` generates the messages, `rabbitmq` and `kafka` publish them,
//! `pace` holds the schedule and the window both publishers share.

mod kafka;
mod orders;
mod pace;
mod rabbitmq;

pub use kafka::publish_kafka;
pub use orders::{Intent, IntentCounts, Mix, OrderGen};
pub use rabbitmq::{connect_rabbit, publish_rabbit, Confirm, ConfirmChannel};
