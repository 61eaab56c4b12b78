-- Delivery webhooks (docs/webhooks.md): the durable queue of events to POST.
-- A row is written in the transaction of the state change it reports and deleted
-- only after the receiver answered 2xx (or when older than webhooks.max_age_hours).
-- Nodes claim due rows FOR UPDATE SKIP LOCKED and move next_attempt_at ahead (a
-- lease), so two nodes never post the same event at once.
CREATE TABLE webhook_events (
    queue_id        BIGSERIAL PRIMARY KEY,
    -- 'evt_' + 32 hex digits: sent unchanged on every retry, for de-duplication.
    event_id        TEXT NOT NULL,
    type            TEXT NOT NULL,
    message_id      TEXT,
    device_id       TEXT NOT NULL,
    user_id         TEXT,
    seq             BIGINT,
    provider        TEXT,
    error           TEXT,
    -- When it happened / was queued / may be (re)sent (unix ms).
    at              BIGINT NOT NULL,
    queued_at       BIGINT NOT NULL,
    next_attempt_at BIGINT NOT NULL,
    attempts        BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX webhook_events_due ON webhook_events (next_attempt_at);
