-- The inbox table in insertion order (#12; BENCHMARKS.md, "SQLite inbox layout").
--
-- Keyed by (device_id, seq) WITHOUT ROWID, a group of 256 publishes to 256 devices
-- dirtied ~256 scattered table pages, and its sent marks and acks, one group later,
-- the same 256 pages again: each commit wrote a page image per device to the WAL.
-- As a rowid table the rows of one group sit together, so the group's inserts, and
-- the sent marks and acks that follow, dirty a few adjacent pages; only the small
-- (device_id, seq) index stays scattered. Same columns, same uniqueness, same indexes,
-- and one more: `push_always`.
CREATE TABLE deliveries_in_order (
    device_id     TEXT NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    seq           INTEGER NOT NULL,
    message_id    TEXT NOT NULL,
    expires_at    INTEGER NOT NULL,
    sent_at       INTEGER,
    acked_at      INTEGER,
    -- NULL (no push wanted) | 'pending' (due at push_due_at) | 'sending' (a worker
    -- holds it since push_at) | 'pushed' | 'failed'
    push_state    TEXT,
    push_due_at   INTEGER,
    push_attempts INTEGER NOT NULL DEFAULT 0,
    push_at       INTEGER,
    push_provider TEXT,
    reason        TEXT,
    -- 1 for a `push: "always"` entry: an ack does not cancel its push (it is sent as
    -- well as the live delivery), where it cancels a `fallback` one.
    push_always   INTEGER NOT NULL DEFAULT 0
);

INSERT INTO deliveries_in_order
    (device_id, seq, message_id, expires_at, sent_at, acked_at, push_state, push_due_at,
     push_attempts, push_at, push_provider, reason, push_always)
SELECT device_id, seq, message_id, expires_at, sent_at, acked_at, push_state, push_due_at,
       push_attempts, push_at, push_provider, reason,
       -- Only an unsettled push still needs to know.
       CASE WHEN push_state IN ('pending', 'sending')
             AND (SELECT json_extract(m.payload, '$.push') FROM messages m
                  WHERE m.id = deliveries.message_id) = 'always'
            THEN 1 ELSE 0 END
FROM deliveries;

DROP TABLE deliveries;
ALTER TABLE deliveries_in_order RENAME TO deliveries;

-- Was the primary key: one row per (device, seq), and every inbox page reads by it.
CREATE UNIQUE INDEX deliveries_by_device ON deliveries (device_id, seq);
CREATE INDEX deliveries_by_message ON deliveries (message_id);
CREATE INDEX deliveries_by_expiry ON deliveries (expires_at);
CREATE INDEX deliveries_push_due ON deliveries (push_due_at) WHERE push_state IN ('pending', 'sending');
