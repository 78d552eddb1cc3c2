-- Where a send's time goes inside PostgreSQL, statement by statement: bench/run.sh
-- runs this with psql on the bench database after the load (pg_stat_statements
-- needs shared_preload_libraries, that is a restart of the cluster, which a shared
-- machine does not get). auto_explain, loaded for this session only (a superuser
-- may), logs each statement inside send_messages with its plan, timing and
-- buffers; client_min_messages = log sends those lines to psql's stderr. Each send
-- runs in a transaction that is rolled back, so nothing is stored. The batch is 16
-- messages, one in each of conversations 1 to 16, as under load.
\set ON_ERROR_STOP on
LOAD 'auto_explain';
SET auto_explain.log_analyze = on;
SET auto_explain.log_buffers = on;
SET auto_explain.log_timing = on;
SET auto_explain.log_nested_statements = on;
-- Warm the function's plan cache first, as the server's long-lived connections have
-- it: five calls, logged nowhere.
SET auto_explain.log_min_duration = -1;
BEGIN;
SELECT count(*) FROM send_messages(ARRAY[1::bigint], ARRAY[1::bigint], ARRAY['warm-up'], ARRAY['']);
SELECT count(*) FROM send_messages(ARRAY[1::bigint], ARRAY[1::bigint], ARRAY['warm-up'], ARRAY['']);
SELECT count(*) FROM send_messages(ARRAY[1::bigint], ARRAY[1::bigint], ARRAY['warm-up'], ARRAY['']);
SELECT count(*) FROM send_messages(ARRAY[1::bigint], ARRAY[1::bigint], ARRAY['warm-up'], ARRAY['']);
SELECT count(*) FROM send_messages(ARRAY[1::bigint], ARRAY[1::bigint], ARRAY['warm-up'], ARRAY['']);
ROLLBACK;
SET auto_explain.log_min_duration = 0;
SET client_min_messages = log;
\echo '=== one message'
BEGIN;
EXPLAIN (ANALYZE, BUFFERS)
SELECT * FROM send_messages(ARRAY[1::bigint], ARRAY[1::bigint],
    ARRAY['benchmark message content of ordinary length'], ARRAY['']);
ROLLBACK;
\echo '=== a batch of 16 messages'
BEGIN;
EXPLAIN (ANALYZE, BUFFERS)
SELECT * FROM send_messages(
    (SELECT array_agg(c::bigint) FROM generate_series(1, 16) AS c),
    (SELECT array_agg((2 * c - 1)::bigint) FROM generate_series(1, 16) AS c),
    array_fill('benchmark message content of ordinary length'::text, ARRAY[16]),
    array_fill(''::text, ARRAY[16]));
ROLLBACK;
\echo '=== the bare send of the article series, for comparison'
BEGIN;
EXPLAIN (ANALYZE, BUFFERS)
SELECT EXISTS (SELECT 1 FROM series.participants WHERE user_id = 1 AND conversation_id = 1);
EXPLAIN (ANALYZE, BUFFERS)
INSERT INTO series.messages (content, user_id, conversation_id)
    VALUES ('benchmark message content of ordinary length', 1, 1) RETURNING id, created_at;
EXPLAIN (ANALYZE, BUFFERS)
UPDATE series.conversations SET last_message_id = currval('series.messages_id_seq') WHERE id = 1;
ROLLBACK;
\echo '=== the commit: WAL flush settings'
SHOW synchronous_commit;
SHOW wal_sync_method;
SHOW commit_delay;
