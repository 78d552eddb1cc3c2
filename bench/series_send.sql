-- The article series' bare send, on its own copy of the series' tables
-- (bench/series_schema.sql): check that the sender takes part in the conversation,
-- insert the message, set the conversation's last message; one transaction, no
-- event log, no idempotency, no notification. pgbench -M prepared -D nconv=<n>.
\set conv random(1, :nconv)
\set sender 2 * :conv - 1 + random(0, 1)
BEGIN;
SELECT EXISTS (SELECT 1 FROM series.participants WHERE user_id = :sender AND conversation_id = :conv);
INSERT INTO series.messages (content, user_id, conversation_id)
    VALUES ('benchmark message content of ordinary length', :sender, :conv) RETURNING id, created_at \gset
UPDATE series.conversations SET last_message_id = :id WHERE id = :conv;
COMMIT;
