-- A stream's replay (sse.go: readLog) from five events before a random user's head.
-- docs/scaling.md: pgbench -n -M extended -c 8 -j 2 -T 12 -D nconv=<conversations> -f bench/reads/read_log.sql <db>
\set me random(1, 2 * :nconv)
SELECT e.seq, e.kind, e.payload, m.id, m.conversation_id, m.user_id, m.content, m.created_at
FROM events e LEFT JOIN messages m ON m.id = e.message_id
WHERE e.user_id = :me AND e.seq > greatest((SELECT event_seq FROM users WHERE id = :me) - 5, 0) AND e.seq <= 9223372036854775807
ORDER BY e.seq LIMIT 500;
