-- Deliveries counted by conveyor where the broker does not count them; see
-- the PostgreSQL twin.
CREATE TABLE IF NOT EXISTS delivery_attempts (
    message_key TEXT    PRIMARY KEY NOT NULL,
    deliveries  INTEGER NOT NULL CHECK (deliveries > 0),
    -- RFC 3339 in UTC with a fixed width, so text order is time order.
    last_at     TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
) STRICT;

CREATE INDEX IF NOT EXISTS delivery_attempts_last_at_idx ON delivery_attempts (last_at);
