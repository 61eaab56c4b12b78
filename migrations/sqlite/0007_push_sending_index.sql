-- Pushes in flight ('sending'), by when they were claimed: the due poller looks for
-- claims a dead sender left behind on every poll, and without this index that was a
-- scan of the whole inbox (SQLite) or of every pending push (PostgreSQL).
CREATE INDEX deliveries_push_sending ON deliveries (push_at) WHERE push_state = 'sending';
