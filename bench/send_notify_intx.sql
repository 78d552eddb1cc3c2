-- bench/send.sql with the notification inside the send transaction (pg_notify in
-- the same statement), as the server did before the notify moved after the commit.
-- The payload is the server's: a JSON array of one notification.
\set conv random(1, :nconv)
\set sender 2 * :conv - 1 + random(0, 1)
SELECT s.*, pg_notify('messenger_events', json_build_array(json_build_object(
        'kind', 'message',
        'to', json_build_array(json_build_array(:sender::bigint, s.sender_seq), json_build_array(s.other_id, s.other_seq)),
        'sender', :sender::bigint, 'id', s.message_id, 'conversationId', :conv::bigint, 'content', s.content,
        'createdAt', (extract(epoch FROM s.created_at) * 1000000)::bigint))::text)
  FROM send_messages(ARRAY[:conv::bigint], ARRAY[:sender::bigint],
    ARRAY['benchmark message content of ordinary length'], ARRAY['']) AS s;
