-- send_messages with 16 messages a call, the shape of the closed loop's batches: 16
-- consecutive conversations from a random one, each from its first user (loadgen's
-- setup: conversation c is between users 2c-1 and 2c). For bench/pgcpu.sh with one
-- client, as the server runs one batch at a time; it assumes at least 100
-- conversations.
\set c random(0, 99)
SELECT count(*) FROM send_messages(ARRAY(SELECT ((:c + i) % 100) + 1 FROM generate_series(0, 15) i)::bigint[],
  ARRAY(SELECT 2 * (((:c + i) % 100) + 1) - 1 FROM generate_series(0, 15) i)::bigint[],
  array_fill('benchmark message content of ordinary length'::text, ARRAY[16]), array_fill(''::text, ARRAY[16]));
