-- SHA-256 (lowercase hex) of the stored canonical payload. An order_id that
-- comes again with another digest is a conflicting duplicate, not a
-- redelivery. Rows stored before this column existed keep NULL: their
-- contents cannot be compared, and a redelivery of one is treated as the
-- same order, as it was before.
ALTER TABLE orders
    ADD COLUMN IF NOT EXISTS payload_digest text
    CONSTRAINT orders_payload_digest_hex CHECK (payload_digest ~ '^[0-9a-f]{64}$');
