-- The messenger schema. The server applies it on every start, so each statement is
-- idempotent (IF NOT EXISTS, CREATE OR REPLACE).
--
-- Lock order: every transaction that writes events locks the users rows it bumps
-- (users.event_seq) first, lower id first, and only then touches participants,
-- messages or events. That single rule rules out deadlocks between sends and reads,
-- and it makes each user's event sequence commit in order: event n+1 of a user can
-- only be numbered after the transaction that numbered event n has committed.

CREATE TABLE IF NOT EXISTS users (
    id          BIGSERIAL PRIMARY KEY,
    username    TEXT NOT NULL CHECK (username ~ '^[A-Za-z0-9_-]{1,39}$'),
    github_id   BIGINT UNIQUE,
    avatar_url  TEXT,
    -- event_seq is the sequence number of the user's latest event (events.seq).
    event_seq   BIGINT NOT NULL DEFAULT 0,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX IF NOT EXISTS users_username_key ON users (lower(username));
CREATE INDEX IF NOT EXISTS users_username_prefix ON users (lower(username) text_pattern_ops);

-- A conversation is between exactly two users; the pair is stored ordered, so the
-- unique constraint makes "one conversation per pair" hold under any concurrency.
CREATE TABLE IF NOT EXISTS conversations (
    id          BIGSERIAL PRIMARY KEY,
    user_low    BIGINT NOT NULL REFERENCES users ON DELETE CASCADE,
    user_high   BIGINT NOT NULL REFERENCES users ON DELETE CASCADE,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK (user_low < user_high),
    UNIQUE (user_low, user_high)
);
CREATE INDEX IF NOT EXISTS conversations_user_high ON conversations (user_high);

-- participants holds each user's view of a conversation: where it sorts in their
-- list (last_activity_at, conversation_id), its last message and what they have read.
CREATE TABLE IF NOT EXISTS participants (
    user_id              BIGINT NOT NULL REFERENCES users ON DELETE CASCADE,
    conversation_id      BIGINT NOT NULL REFERENCES conversations ON DELETE CASCADE,
    last_activity_at     TIMESTAMPTZ NOT NULL,
    last_message_id      BIGINT,
    unread_count         INT NOT NULL DEFAULT 0 CHECK (unread_count >= 0),
    last_read_message_id BIGINT NOT NULL DEFAULT 0,
    messages_read_at     TIMESTAMPTZ,
    PRIMARY KEY (user_id, conversation_id)
);
CREATE INDEX IF NOT EXISTS participants_activity
    ON participants (user_id, last_activity_at DESC, conversation_id DESC);

CREATE TABLE IF NOT EXISTS messages (
    id              BIGSERIAL PRIMARY KEY,
    conversation_id BIGINT NOT NULL REFERENCES conversations ON DELETE CASCADE,
    user_id         BIGINT NOT NULL REFERENCES users ON DELETE CASCADE,
    content         TEXT NOT NULL CHECK (char_length(content) BETWEEN 1 AND 480),
    created_at      TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS messages_conversation ON messages (conversation_id, id DESC);

-- events is each user's log: the stream's "id:" is seq, and a reconnecting stream
-- replays the rows after its Last-Event-ID. A message event points at the message
-- (the reader's "mine" is derived); a read event carries its payload.
CREATE TABLE IF NOT EXISTS events (
    user_id     BIGINT NOT NULL REFERENCES users ON DELETE CASCADE,
    seq         BIGINT NOT NULL CHECK (seq > 0),
    kind        TEXT NOT NULL CHECK (kind IN ('message', 'read')),
    message_id  BIGINT REFERENCES messages ON DELETE CASCADE,
    payload     JSONB,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, seq),
    CHECK ((kind = 'message') = (message_id IS NOT NULL))
);

-- idempotency_keys remembers the message each Idempotency-Key created, so that a
-- retried send returns the first message instead of creating another.
CREATE TABLE IF NOT EXISTS idempotency_keys (
    user_id         BIGINT NOT NULL REFERENCES users ON DELETE CASCADE,
    key             TEXT NOT NULL CHECK (char_length(key) BETWEEN 1 AND 255),
    conversation_id BIGINT NOT NULL REFERENCES conversations ON DELETE CASCADE,
    content         TEXT NOT NULL,
    -- message_id is NULL only inside the transaction that claims the key.
    message_id      BIGINT REFERENCES messages ON DELETE CASCADE,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, key)
);
CREATE INDEX IF NOT EXISTS idempotency_keys_created ON idempotency_keys (created_at);

-- oauth_states holds the state of each OAuth sign-in in flight; the callback deletes
-- it, so a state is good for one sign-in only.
CREATE TABLE IF NOT EXISTS oauth_states (
    state       TEXT PRIMARY KEY,
    expires_at  TIMESTAMPTZ NOT NULL
);

-- settings holds server-wide values, such as the development token key.
CREATE TABLE IF NOT EXISTS settings (
    name   TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);

-- send_message stores a message and one event for each participant, and notifies
-- every server instance, in one round trip. outcome is 'created', 'replayed' (the
-- idempotency key was used before, for the same conversation and content),
-- 'key_conflict' (used before for something else) or 'not_found' (no such
-- conversation, or the sender is not in it). The benchmark's pgbench script calls
-- exactly this function, so it measures the server's own send transaction.
CREATE OR REPLACE FUNCTION send_message(
    p_conversation_id BIGINT, p_sender_id BIGINT, p_content TEXT, p_key TEXT DEFAULT NULL)
RETURNS TABLE (outcome TEXT, message_id BIGINT, created_at TIMESTAMPTZ, content TEXT)
LANGUAGE plpgsql AS $$
DECLARE
    v_other      BIGINT;
    v_id         BIGINT;
    v_at         TIMESTAMPTZ;
    v_sender_seq BIGINT;
    v_other_seq  BIGINT;
    v_prev       idempotency_keys%ROWTYPE;
BEGIN
    SELECT CASE p_sender_id WHEN c.user_low THEN c.user_high WHEN c.user_high THEN c.user_low END
      INTO v_other
      FROM conversations c WHERE c.id = p_conversation_id;
    IF v_other IS NULL THEN
        RETURN QUERY SELECT 'not_found'::text, NULL::bigint, NULL::timestamptz, NULL::text;
        RETURN;
    END IF;

    IF p_key IS NOT NULL THEN
        -- A concurrent request with the same key waits here until the first commits.
        INSERT INTO idempotency_keys (user_id, key, conversation_id, content)
        VALUES (p_sender_id, p_key, p_conversation_id, p_content)
        ON CONFLICT DO NOTHING;
        IF NOT FOUND THEN
            SELECT * INTO v_prev FROM idempotency_keys k
             WHERE k.user_id = p_sender_id AND k.key = p_key;
            IF v_prev.conversation_id <> p_conversation_id OR v_prev.content <> p_content THEN
                RETURN QUERY SELECT 'key_conflict'::text, NULL::bigint, NULL::timestamptz, NULL::text;
            ELSE
                RETURN QUERY SELECT 'replayed'::text, m.id, m.created_at, m.content
                               FROM messages m WHERE m.id = v_prev.message_id;
            END IF;
            RETURN;
        END IF;
    END IF;

    -- Lock order: lower user id first.
    IF p_sender_id < v_other THEN
        UPDATE users SET event_seq = event_seq + 1 WHERE id = p_sender_id RETURNING event_seq INTO v_sender_seq;
        UPDATE users SET event_seq = event_seq + 1 WHERE id = v_other RETURNING event_seq INTO v_other_seq;
    ELSE
        UPDATE users SET event_seq = event_seq + 1 WHERE id = v_other RETURNING event_seq INTO v_other_seq;
        UPDATE users SET event_seq = event_seq + 1 WHERE id = p_sender_id RETURNING event_seq INTO v_sender_seq;
    END IF;

    -- The id and time are taken under the locks, so within a conversation they rise
    -- in commit order.
    v_at := clock_timestamp();
    INSERT INTO messages (conversation_id, user_id, content, created_at)
    VALUES (p_conversation_id, p_sender_id, p_content, v_at)
    RETURNING id INTO v_id;
    IF p_key IS NOT NULL THEN
        UPDATE idempotency_keys k SET message_id = v_id WHERE k.user_id = p_sender_id AND k.key = p_key;
    END IF;

    UPDATE participants p
       SET last_activity_at = v_at,
           last_message_id = v_id,
           unread_count = p.unread_count + (p.user_id = v_other)::int
     WHERE p.user_id IN (p_sender_id, v_other) AND p.conversation_id = p_conversation_id;

    INSERT INTO events (user_id, seq, kind, message_id)
    VALUES (p_sender_id, v_sender_seq, 'message', v_id), (v_other, v_other_seq, 'message', v_id);

    PERFORM pg_notify('messenger_events', json_build_object(
        'kind', 'message',
        'to', json_build_array(json_build_array(p_sender_id, v_sender_seq), json_build_array(v_other, v_other_seq)),
        'sender', p_sender_id,
        'id', v_id,
        'conversationId', p_conversation_id,
        'content', p_content,
        'createdAt', (extract(epoch FROM v_at) * 1000000)::bigint)::text);

    RETURN QUERY SELECT 'created'::text, v_id, v_at, p_content;
END;
$$;

-- read_messages marks a conversation read up to its last message for p_reader and,
-- when there was something unread, logs and notifies a read event for the other
-- participant. outcome is 'read', 'unchanged' or 'not_found'.
CREATE OR REPLACE FUNCTION read_messages(p_conversation_id BIGINT, p_reader_id BIGINT)
RETURNS TEXT
LANGUAGE plpgsql AS $$
DECLARE
    v_other  BIGINT;
    v_unread INT;
    v_seq    BIGINT;
    v_at     TIMESTAMPTZ;
    v_data   JSONB;
BEGIN
    SELECT CASE p_reader_id WHEN c.user_low THEN c.user_high WHEN c.user_high THEN c.user_low END
      INTO v_other
      FROM conversations c WHERE c.id = p_conversation_id;
    IF v_other IS NULL THEN
        RETURN 'not_found';
    END IF;
    SELECT p.unread_count INTO v_unread FROM participants p
     WHERE p.user_id = p_reader_id AND p.conversation_id = p_conversation_id;
    IF v_unread = 0 THEN
        RETURN 'unchanged';
    END IF;

    -- Lock order: the only users row this takes is the other participant's.
    UPDATE users SET event_seq = event_seq + 1 WHERE id = v_other RETURNING event_seq INTO v_seq;
    v_at := clock_timestamp();
    UPDATE participants p
       SET unread_count = 0, last_read_message_id = coalesce(p.last_message_id, 0), messages_read_at = v_at
     WHERE p.user_id = p_reader_id AND p.conversation_id = p_conversation_id;
    v_data := jsonb_build_object(
        'conversationId', p_conversation_id::text,
        'userId', p_reader_id::text,
        'readAt', to_char(v_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'));
    INSERT INTO events (user_id, seq, kind, payload) VALUES (v_other, v_seq, 'read', v_data);
    PERFORM pg_notify('messenger_events', json_build_object(
        'kind', 'read',
        'to', json_build_array(json_build_array(v_other, v_seq)),
        'data', v_data)::text);
    RETURN 'read';
END;
$$;
