-- The limit: one send, exactly the server's send transaction when it is idle (its
-- batch of one; under load it puts up to 64 concurrent sends in one call), from a
-- random participant of a random conversation. bench/loadgen's setup numbers them:
-- conversation c is between users 2c-1 and 2c. pgbench -D nconv=<conversations>.
\set conv random(1, :nconv)
\set sender 2 * :conv - 1 + random(0, 1)
SELECT * FROM send_messages(ARRAY[:conv::bigint], ARRAY[:sender::bigint],
    ARRAY['benchmark message content of ordinary length'], ARRAY['']);
