-- bench/send.sql, then its notification in a transaction of its own after the send
-- has committed: one NOTIFY per send, a round trip each. (The server sends one
-- NOTIFY for whatever queued while the previous one was in flight, so under load
-- it sends far fewer.) The payload is the server's: a JSON array of one notification.
\set conv random(1, :nconv)
\set sender 2 * :conv - 1 + random(0, 1)
SELECT message_id, created_at, other_id, sender_seq, other_seq FROM send_messages(ARRAY[:conv::bigint], ARRAY[:sender::bigint],
    ARRAY['benchmark message content of ordinary length'], ARRAY['']) \gset
SELECT pg_notify('messenger_events', json_build_array(json_build_object(
        'kind', 'message',
        'to', json_build_array(json_build_array(:sender::bigint, :sender_seq::bigint), json_build_array(:other_id::bigint, :other_seq::bigint)),
        'sender', :sender::bigint, 'id', :message_id::bigint, 'conversationId', :conv::bigint,
        'content', 'benchmark message content of ordinary length'::text,
        'createdAt', (extract(epoch FROM :created_at::timestamptz) * 1000000)::bigint))::text);
