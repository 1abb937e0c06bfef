-- One row per order: its outcome, the charge it produced, and the payload as received.
-- The SQLite twin of migrations/postgres: STRICT makes column types binding,
-- and the CHECKs stand in for what Postgres' types refuse (char(3), jsonb), so
-- the same bad row is a constraint error on either database.
CREATE TABLE IF NOT EXISTS orders (
    order_id        TEXT    PRIMARY KEY NOT NULL,
    status          TEXT    NOT NULL CHECK (status IN ('accepted', 'rejected', 'declined')),
    customer_id     TEXT    NOT NULL,
    amount_cents    INTEGER NOT NULL CHECK (amount_cents > 0),
    currency        TEXT    NOT NULL CONSTRAINT orders_currency_length CHECK (length(currency) = 3),
    charge_id       TEXT,
    reasons         TEXT    NOT NULL DEFAULT '[]' CHECK (json_valid(reasons) AND json_type(reasons) = 'array'),
    payload         TEXT    NOT NULL CHECK (json_valid(payload)),
    source_position TEXT    NOT NULL,
    -- RFC 3339 in UTC with a fixed width, so text order is time order.
    received_at     TEXT    NOT NULL,
    committed_at    TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    CONSTRAINT orders_charged CHECK ((status = 'rejected') OR (charge_id IS NOT NULL))
) STRICT;

CREATE INDEX IF NOT EXISTS orders_committed_at_idx ON orders (committed_at);
