-- SHA-256 (lowercase hex) of the stored canonical payload; see the
-- PostgreSQL twin. NULL for rows stored before the column existed.
ALTER TABLE orders
    ADD COLUMN payload_digest TEXT
    CONSTRAINT orders_payload_digest_hex CHECK (payload_digest IS NULL OR (length(payload_digest) = 64 AND payload_digest NOT GLOB '*[^0-9a-f]*'));
