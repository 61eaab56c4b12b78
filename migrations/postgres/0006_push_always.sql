-- A `push: "always"` entry's push is sent as well as its live delivery: an ack does
-- not cancel it, where it cancels a `fallback` one. Which of the two an entry is was
-- only in the message body; the ack and the claim need it on the inbox row.
ALTER TABLE deliveries ADD COLUMN push_always BOOLEAN NOT NULL DEFAULT FALSE;

-- Only an unsettled push still needs to know.
UPDATE deliveries d SET push_always = TRUE
FROM messages m
WHERE m.id = d.message_id AND d.push_state IN ('pending', 'sending')
  AND m.payload::jsonb ->> 'push' = 'always';
