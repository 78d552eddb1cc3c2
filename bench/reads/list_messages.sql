-- The first message page of a random participant (messages.go: checkParticipant, handleListMessages).
-- docs/scaling.md: pgbench -n -M extended -c 8 -j 2 -T 12 -D nconv=<conversations> -f bench/reads/list_messages.sql <db>
\set conv random(1, :nconv)
\set me 2 * :conv - 1 + random(0, 1)
SELECT 1 FROM participants WHERE user_id = :me AND conversation_id = :conv;
SELECT id, content, user_id, created_at FROM messages WHERE conversation_id = :conv ORDER BY id DESC LIMIT 50;
