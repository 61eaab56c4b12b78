-- Delivery webhooks (docs/webhooks.md): the durable queue of events to POST.
-- A row is written in the transaction of the state change it reports and deleted
-- only after the receiver answered 2xx (or when older than webhooks.max_age_hours).
CREATE TABLE webhook_events (
    queue_id        INTEGER PRIMARY KEY AUTOINCREMENT,
    -- 'evt_' + 32 hex digits: sent unchanged on every retry, for de-duplication.
    event_id        TEXT NOT NULL,
    type            TEXT NOT NULL,
    message_id      TEXT,
    device_id       TEXT NOT NULL,
    user_id         TEXT,
    seq             INTEGER,
    provider        TEXT,
    error           TEXT,
    -- When it happened / was queued / may be (re)sent (unix ms).
    at              INTEGER NOT NULL,
    queued_at       INTEGER NOT NULL,
    next_attempt_at INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX webhook_events_due ON webhook_events (next_attempt_at);
