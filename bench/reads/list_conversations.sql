-- A page of the conversation list (conversations.go: conversationQuery) for a random user.
-- docs/scaling.md: pgbench -n -M extended -c 8 -j 2 -T 12 -D nconv=<conversations> -f bench/reads/list_conversations.sql <db>
\set me random(1, 2 * :nconv)
SELECT p.conversation_id, u.id, u.username, u.avatar_url, p.unread_count,
       m.id, m.content, m.user_id, m.created_at
FROM participants p
JOIN conversations c ON c.id = p.conversation_id
JOIN users u ON u.id = CASE WHEN c.user_low = p.user_id THEN c.user_high ELSE c.user_low END
LEFT JOIN messages m ON m.conversation_id = p.conversation_id AND m.id = p.last_message_id
WHERE p.user_id = :me
ORDER BY p.last_activity_at DESC, p.conversation_id DESC LIMIT 25;
