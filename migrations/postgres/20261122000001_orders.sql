-- One row per order: its outcome, the charge it produced, and the payload as received.
CREATE TABLE IF NOT EXISTS orders (
    order_id        text        PRIMARY KEY,
    status          text        NOT NULL CHECK (status IN ('accepted', 'rejected', 'declined')),
    customer_id     text        NOT NULL,
    amount_cents    bigint      NOT NULL CHECK (amount_cents > 0),
    currency        char(3)     NOT NULL,
    charge_id       text,
    reasons         jsonb       NOT NULL DEFAULT '[]'::jsonb,
    payload         jsonb       NOT NULL,
    source_position text        NOT NULL,
    received_at     timestamptz NOT NULL,
    committed_at    timestamptz NOT NULL DEFAULT now(),
    CHECK ((status = 'rejected') OR (charge_id IS NOT NULL))
);

CREATE INDEX IF NOT EXISTS orders_committed_at_idx ON orders (committed_at);
