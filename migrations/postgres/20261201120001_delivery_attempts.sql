-- Deliveries counted by conveyor where the broker does not count them
-- (classic RabbitMQ queues, Kafka): one row per message that came back
-- flagged as redelivered, written before any work is done on it, so that a
-- message that keeps killing the process is dead-lettered as
-- `redelivery_limit` instead of looping for ever. `message_key` is
-- `rabbitmq:<queue>:<sha256 of the body>` or `kafka:<topic>/<partition>@<offset>`.
CREATE TABLE IF NOT EXISTS delivery_attempts (
    message_key text        PRIMARY KEY,
    deliveries  integer     NOT NULL CHECK (deliveries > 0),
    last_at     timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS delivery_attempts_last_at_idx ON delivery_attempts (last_at);
