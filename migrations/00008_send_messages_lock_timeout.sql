-- send_messages with a lock timeout (issue 15): the server runs one batch at a
-- time, and a batch that waits for a lock another transaction holds on one of its
-- users would hold up every message in it; with a lock timeout it fails instead,
-- and the server sends each message alone (docs/performance.md).

-- +goose Up
-- +goose StatementBegin
-- send_messages with a lock timeout, for the server's batches of more than one
-- message: a batch that waits for a lock another transaction holds on one of its
-- users fails with lock_not_available (55P03) after p_lock_timeout instead of
-- holding up every message in it, and the server then sends each message alone.
-- set_config(..., true) lasts until the end of the call's own transaction.
CREATE OR REPLACE FUNCTION send_messages(
    p_conversations BIGINT[], p_senders BIGINT[], p_contents TEXT[], p_keys TEXT[], p_lock_timeout TEXT)
RETURNS TABLE (idx INT, outcome TEXT, message_id BIGINT, created_at TIMESTAMPTZ, content TEXT,
               other_id BIGINT, sender_seq BIGINT, other_seq BIGINT)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('lock_timeout', p_lock_timeout, true);
    RETURN QUERY SELECT * FROM send_messages(p_conversations, p_senders, p_contents, p_keys);
END;
$$;
-- +goose StatementEnd

-- +goose Down
-- +goose StatementBegin
DROP FUNCTION send_messages(BIGINT[], BIGINT[], TEXT[], TEXT[], TEXT);
-- +goose StatementEnd
