-- Herald shared store (PostgreSQL). Same schema and meaning as migrations/sqlite:
-- times are unix milliseconds (UTC) in BIGINT columns, ids are TEXT.

CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE api_keys (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    prefix     TEXT NOT NULL,
    hash       BYTEA NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);
CREATE INDEX api_keys_by_prefix ON api_keys (prefix);

CREATE TABLE devices (
    id               TEXT PRIMARY KEY,
    user_id          TEXT NOT NULL,
    platform         TEXT,
    push_provider    TEXT,
    push_token       TEXT,
    apns_environment TEXT,
    token_state      TEXT NOT NULL DEFAULT 'none',
    token_error      TEXT,
    -- Seqs are assigned by `UPDATE devices SET last_seq = last_seq + 1 ... RETURNING`:
    -- the row lock serialises publishers of one device across all gateway nodes.
    last_seq         BIGINT NOT NULL DEFAULT 0,
    acked_seq        BIGINT NOT NULL DEFAULT 0,
    created_at       BIGINT NOT NULL,
    last_seen        BIGINT
);
CREATE INDEX devices_by_user ON devices (user_id);

CREATE TABLE subscriptions (
    topic     TEXT NOT NULL,
    device_id TEXT NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    PRIMARY KEY (topic, device_id)
);
CREATE INDEX subscriptions_by_device ON subscriptions (device_id);

CREATE TABLE messages (
    id              TEXT PRIMARY KEY,
    api_key_id      TEXT NOT NULL,
    target_kind     TEXT NOT NULL,
    target          TEXT NOT NULL,
    -- The serialized MessagePayload, kept verbatim (TEXT, not JSONB, so the
    -- sender's key order survives).
    payload         TEXT NOT NULL,
    recipients      BIGINT NOT NULL,
    created_at      BIGINT NOT NULL,
    expires_at      BIGINT NOT NULL,
    idempotency_key TEXT
);
-- Also the arbiter of concurrent publishes with one key on different nodes.
CREATE UNIQUE INDEX messages_by_idempotency_key
    ON messages (api_key_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX messages_by_expiry ON messages (expires_at);

-- One row per (device, seq): the device's inbox and the delivery record at once.
CREATE TABLE deliveries (
    device_id     TEXT NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    seq           BIGINT NOT NULL,
    message_id    TEXT NOT NULL,
    expires_at    BIGINT NOT NULL,
    sent_at       BIGINT,
    acked_at      BIGINT,
    -- NULL (no push wanted) | 'pending' (due at push_due_at) | 'sending' (a worker
    -- holds it since push_at) | 'pushed' | 'failed'
    push_state    TEXT,
    push_due_at   BIGINT,
    push_attempts BIGINT NOT NULL DEFAULT 0,
    push_at       BIGINT,
    push_provider TEXT,
    reason        TEXT,
    PRIMARY KEY (device_id, seq)
);
CREATE INDEX deliveries_by_message ON deliveries (message_id);
CREATE INDEX deliveries_by_expiry ON deliveries (expires_at);
CREATE INDEX deliveries_push_due ON deliveries (push_due_at) WHERE push_state IN ('pending', 'sending');
