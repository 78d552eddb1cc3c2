-- The messenger schema: the whole schema of a new database, to read first. The server
-- does not run this file: it applies the numbered migrations in migrations/ (goose),
-- and TestMigrationsMatchSchema checks that a database built by them has exactly this
-- schema. A change to the schema is a new migration AND an edit here.
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
    -- The sender: no foreign key (see delete_users_events below).
    user_id         BIGINT NOT NULL,
    content         TEXT NOT NULL CHECK (char_length(content) BETWEEN 1 AND 480),
    created_at      TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS messages_conversation ON messages (conversation_id, id DESC);

-- events is each user's log: the stream's "id:" is seq, and a reconnecting stream
-- replays the rows after its Last-Event-ID. A message event points at the message
-- (the reader's "mine" is derived); a read event carries its payload. Neither
-- user_id nor message_id has a foreign key (see delete_users_events below).
CREATE TABLE IF NOT EXISTS events (
    user_id     BIGINT NOT NULL,
    seq         BIGINT NOT NULL CHECK (seq > 0),
    kind        TEXT NOT NULL CHECK (kind IN ('message', 'read')),
    message_id  BIGINT,
    payload     JSONB,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, seq),
    CHECK ((kind = 'message') = (message_id IS NOT NULL))
);
-- events_created serves the pruner, which deletes events older than EVENT_RETENTION
-- in small batches, oldest first (retention.go).
CREATE INDEX IF NOT EXISTS events_created ON events (created_at);

-- The send path writes messages and events without foreign-key checks: a check ran
-- a query per inserted row that locked the referenced row (the users row just
-- updated, the message just inserted), each lock written to the WAL, and with 16
-- messages a call they took a sixth to a quarter of PostgreSQL's CPU
-- (docs/performance.md). What they checked holds by the lock order: events are
-- written only for users rows their transaction has locked (send_messages,
-- read_messages), and a message's sender is locked and in its conversation, which
-- messages_conversation_id_fkey checks. What they cascaded these triggers do, one
-- DELETE per statement rather than per row: a deleted user's events, and a deleted
-- message's events (a deleted user's conversations, and with them their messages,
-- go by the foreign keys).
CREATE OR REPLACE FUNCTION delete_users_events() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM events e USING gone g WHERE e.user_id = g.id;
    RETURN NULL;
END;
$$;
CREATE OR REPLACE TRIGGER users_deleted AFTER DELETE ON users
    REFERENCING OLD TABLE AS gone FOR EACH STATEMENT
    EXECUTE FUNCTION delete_users_events();

CREATE OR REPLACE FUNCTION delete_messages_events() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM events e USING gone g WHERE e.message_id = g.id;
    RETURN NULL;
END;
$$;
CREATE OR REPLACE TRIGGER messages_deleted AFTER DELETE ON messages
    REFERENCING OLD TABLE AS gone FOR EACH STATEMENT
    EXECUTE FUNCTION delete_messages_events();

-- A TRUNCATE fires no DELETE trigger, and has no foreign key to follow from users
-- or messages to events: a TRUNCATE of either empties events. Ids are never
-- changed (no foreign key refuses an UPDATE of users.id or messages.id any more).
CREATE OR REPLACE FUNCTION truncate_events() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    TRUNCATE events;
    RETURN NULL;
END;
$$;
CREATE OR REPLACE TRIGGER users_truncated AFTER TRUNCATE ON users
    FOR EACH STATEMENT EXECUTE FUNCTION truncate_events();
CREATE OR REPLACE TRIGGER messages_truncated AFTER TRUNCATE ON messages
    FOR EACH STATEMENT EXECUTE FUNCTION truncate_events();

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

-- sessions holds every sign-in. A token names its session, and is accepted only
-- while the session has not ended and is before its hard end (expires_at, set at
-- sign-in from SESSION_MAX_AGE; refreshing a token never moves it). Signing out
-- sets ended_at; deleting a user deletes their sessions. An operator ends a session
-- with UPDATE sessions SET ended_at = now(), end_reason = 'revoked' (or DELETE).
CREATE TABLE IF NOT EXISTS sessions (
    id            BIGSERIAL PRIMARY KEY,
    user_id       BIGINT NOT NULL REFERENCES users ON DELETE CASCADE,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at    TIMESTAMPTZ NOT NULL,
    refreshed_at  TIMESTAMPTZ,
    ended_at      TIMESTAMPTZ,
    end_reason    TEXT CHECK (end_reason IN ('signed_out', 'signed_out_everywhere', 'too_many_sessions', 'revoked'))
);
CREATE INDEX IF NOT EXISTS sessions_user ON sessions (user_id);

-- Every end of a session is announced on the channel messenger_sessions (see
-- sessions.go), whoever ends it: a sign-out, an operator's UPDATE or DELETE, a
-- deleted user (the cascade deletes the sessions row by row), a TRUNCATE (user 0:
-- everybody's). Each instance then forgets that user's cached sessions at once.
CREATE OR REPLACE FUNCTION announce_session_end() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        PERFORM pg_notify('messenger_sessions', '{"user":0}');
    ELSE
        PERFORM pg_notify('messenger_sessions', json_build_object('user', OLD.user_id)::text);
    END IF;
    RETURN NULL;
END;
$$;
CREATE OR REPLACE TRIGGER sessions_ended AFTER UPDATE ON sessions FOR EACH ROW
    WHEN (OLD.ended_at IS DISTINCT FROM NEW.ended_at OR OLD.expires_at IS DISTINCT FROM NEW.expires_at
          OR OLD.user_id IS DISTINCT FROM NEW.user_id)
    EXECUTE FUNCTION announce_session_end();
CREATE OR REPLACE TRIGGER sessions_deleted AFTER DELETE ON sessions FOR EACH ROW
    WHEN (OLD.ended_at IS NULL AND OLD.expires_at > now())
    EXECUTE FUNCTION announce_session_end();
CREATE OR REPLACE TRIGGER sessions_truncated AFTER TRUNCATE ON sessions FOR EACH STATEMENT
    EXECUTE FUNCTION announce_session_end();

-- settings holds server-wide values, such as the development token key.
CREATE TABLE IF NOT EXISTS settings (
    name   TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);

-- send_messages stores a batch of messages, each with one event for each participant,
-- in one transaction: the server gathers concurrent sends into one call (a batch of
-- one when it is idle), and the benchmark's pgbench script calls it with one message,
-- the very transaction of a lone send. Element i of the arrays is one message; key ''
-- means none. For each it returns a row: outcome is 'created', 'replayed' (the
-- idempotency key was used before, for the same conversation and content: the first
-- message is returned), 'key_conflict' (used before for something else) or
-- 'not_found' (no such conversation, or the sender is not in it). Created rows carry
-- the other participant and both events' sequence numbers, for the notification the
-- server sends after the commit.
--
-- One statement does the whole batch (data-modifying CTEs over the arrays), run
-- with a generic plan that PL/pgSQL keeps for the connection: no per-statement
-- executor start-up and no planning per call. Only a message whose key was used
-- before needs a second statement, whose fresh snapshot sees the first use.
--
-- A lone message that is created takes a shorter path: six small statements,
-- eight with an idempotency key. Starting the executor on the one statement's plan
-- (some sixty nodes) costs more than the work a single message needs; with one
-- message a call, the short path takes PostgreSQL 1.13 ms of CPU per call against
-- 1.42 (pgbench at 500 calls a second, bench/send.sql; docs/performance.md).
--
-- Lock order: every users row involved, by id (locked), and only then anything
-- else. The ids and times of the messages are taken under those locks (the gate on
-- locked in cand), so within a conversation they rise in commit order, and each
-- user's events are numbered from the sequence as locked. An idempotency key
-- belongs to its sender, whose row is locked first, so two sends never wait for
-- each other's key.
DROP FUNCTION IF EXISTS send_message(BIGINT, BIGINT, TEXT, TEXT);
CREATE OR REPLACE FUNCTION send_messages(
    p_conversations BIGINT[], p_senders BIGINT[], p_contents TEXT[], p_keys TEXT[])
RETURNS TABLE (idx INT, outcome TEXT, message_id BIGINT, created_at TIMESTAMPTZ, content TEXT,
               other_id BIGINT, sender_seq BIGINT, other_seq BIGINT)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
#variable_conflict use_column
DECLARE
    r        RECORD;
    v_prev   idempotency_keys%ROWTYPE;
    v_conv   BIGINT;
    v_sender BIGINT;
    v_other  BIGINT;
    v_key    TEXT;
    v_short  BOOLEAN := false;
    v_sseq   BIGINT;
    v_oseq   BIGINT;
    v_id     BIGINT;
    v_at     TIMESTAMPTZ;
BEGIN
    -- A lone message that is created (the batch of an idle server) takes a few
    -- small statements, whose executor start-up costs PostgreSQL far less than the
    -- general statement's. Any other case (no such conversation, a key used
    -- before, users deleted meanwhile) leaves this path having changed nothing and
    -- takes the general statement. The lock order is the same: both users rows,
    -- lower id first, then the rest; the id and time are taken under the locks.
    IF cardinality(p_conversations) = 1 AND cardinality(p_senders) = 1
       AND cardinality(p_contents) = 1 AND cardinality(p_keys) = 1
       AND p_conversations[1] IS NOT NULL AND p_senders[1] IS NOT NULL
       AND p_contents[1] IS NOT NULL AND p_keys[1] IS NOT NULL THEN
        v_conv := p_conversations[1];
        v_sender := p_senders[1];
        v_key := p_keys[1];
        SELECT CASE v_sender WHEN c.user_low THEN c.user_high WHEN c.user_high THEN c.user_low END
          INTO v_other
          FROM conversations c WHERE c.id = v_conv;
        IF v_other IS NOT NULL THEN
            SELECT count(*) = 2, max(l.event_seq) FILTER (WHERE l.id = v_sender),
                   max(l.event_seq) FILTER (WHERE l.id = v_other)
              INTO v_short, v_sseq, v_oseq
              FROM (SELECT u.id, u.event_seq FROM users u WHERE u.id IN (v_sender, v_other)
                     ORDER BY u.id FOR NO KEY UPDATE) l;
        END IF;
        -- The key belongs to the sender, whose row is now locked: a claim that
        -- committed before is visible to this statement, and none is under way.
        IF v_short AND v_key <> '' THEN
            PERFORM 1 FROM idempotency_keys k WHERE k.user_id = v_sender AND k.key = v_key;
            v_short := NOT FOUND;
        END IF;
        IF v_short THEN
            v_id := nextval('messages_id_seq'::regclass);
            v_at := clock_timestamp();
            INSERT INTO messages (id, conversation_id, user_id, content, created_at)
            VALUES (v_id, v_conv, v_sender, p_contents[1], v_at);
            IF v_key <> '' THEN
                INSERT INTO idempotency_keys (user_id, key, conversation_id, content, message_id)
                VALUES (v_sender, v_key, v_conv, p_contents[1], v_id)
                ON CONFLICT DO NOTHING;
                IF NOT FOUND THEN
                    -- Claimed meanwhile, by a writer that did not lock the sender.
                    DELETE FROM messages m WHERE m.id = v_id;
                    v_short := false;
                END IF;
            END IF;
        END IF;
        IF v_short THEN
            UPDATE users u SET event_seq = u.event_seq + 1 WHERE u.id IN (v_sender, v_other);
            INSERT INTO events (user_id, seq, kind, message_id)
            VALUES (v_sender, v_sseq + 1, 'message', v_id), (v_other, v_oseq + 1, 'message', v_id);
            UPDATE participants p
               SET last_activity_at = v_at, last_message_id = v_id,
                   unread_count = p.unread_count + (p.user_id = v_other)::int
             WHERE p.conversation_id = v_conv AND p.user_id IN (v_sender, v_other);
            idx := 1; outcome := 'created'; message_id := v_id; created_at := v_at;
            content := p_contents[1]; other_id := v_other; sender_seq := v_sseq + 1; other_seq := v_oseq + 1;
            RETURN NEXT;
            RETURN;
        END IF;
    END IF;
    FOR r IN
        WITH req AS (
            SELECT t.i::int AS i, t.conv, t.s, t.body, t.k,
                   CASE t.s WHEN c.user_low THEN c.user_high WHEN c.user_high THEN c.user_low END AS other
              FROM unnest(p_conversations, p_senders, p_contents, p_keys) WITH ORDINALITY AS t(conv, s, body, k, i)
              LEFT JOIN conversations c ON c.id = t.conv
        ), locked AS (
            SELECT u.id, u.event_seq FROM users u
             WHERE u.id IN (SELECT q.s FROM req q WHERE q.other IS NOT NULL
                            UNION SELECT q.other FROM req q WHERE q.other IS NOT NULL)
             ORDER BY u.id FOR NO KEY UPDATE
        ), cand AS (
            SELECT q.i, q.conv, q.s, q.other, q.body, q.k,
                   nextval('messages_id_seq'::regclass) AS id, clock_timestamp() AS at
              FROM req q
             WHERE q.other IS NOT NULL AND (SELECT count(*) FROM locked) > 0
             ORDER BY q.i
        ), claimed AS (
            INSERT INTO idempotency_keys AS k (user_id, key, conversation_id, content, message_id)
            SELECT c.s, c.k, c.conv, c.body, c.id FROM cand c WHERE c.k <> '' ORDER BY c.s, c.k, c.i
            ON CONFLICT DO NOTHING
            RETURNING k.message_id
        ), created AS (
            SELECT c.* FROM cand c
             WHERE c.k = '' OR c.id IN (SELECT m.message_id FROM claimed m)
        ), ev AS (
            SELECT x.u, x.id, l.event_seq + row_number() OVER (PARTITION BY x.u ORDER BY x.i) AS seq
              FROM (SELECT c.s AS u, c.i, c.id FROM created c
                    UNION ALL SELECT c.other, c.i, c.id FROM created c) x
              JOIN locked l ON l.id = x.u
        ), ins_messages AS (
            INSERT INTO messages (id, conversation_id, user_id, content, created_at)
            SELECT c.id, c.conv, c.s, c.body, c.at FROM created c
        ), ins_events AS (
            INSERT INTO events (user_id, seq, kind, message_id)
            SELECT e.u, e.seq, 'message', e.id FROM ev e
        ), upd_users AS (
            UPDATE users u SET event_seq = m.seq
              FROM (SELECT e.u, max(e.seq) AS seq FROM ev e GROUP BY e.u) m
             WHERE u.id = m.u
        ), upd_participants AS (
            UPDATE participants p
               SET last_activity_at = x.at, last_message_id = x.id, unread_count = p.unread_count + x.unread
              FROM (SELECT y.uid, y.conv, max(y.id) AS id, max(y.at) AS at, sum(y.unread)::int AS unread
                      FROM (SELECT c.s AS uid, c.conv, c.id, c.at, 0 AS unread FROM created c
                            UNION ALL
                            SELECT c.other, c.conv, c.id, c.at, 1 FROM created c) y
                     GROUP BY y.uid, y.conv) x
             WHERE p.user_id = x.uid AND p.conversation_id = x.conv
        )
        SELECT c.i, 'created'::text AS outcome, c.id, c.at, c.body, c.other,
               (SELECT e.seq FROM ev e WHERE e.u = c.s AND e.id = c.id) AS sseq,
               (SELECT e.seq FROM ev e WHERE e.u = c.other AND e.id = c.id) AS oseq
          FROM created c
        UNION ALL
        -- Not created: no such conversation or participant; a key used before;
        -- or (without a key) the users rows were deleted meanwhile.
        SELECT q.i, CASE WHEN q.other IS NULL OR q.k = '' THEN 'not_found' ELSE 'duplicate' END,
               NULL, NULL, NULL, NULL, NULL, NULL
          FROM req q
         WHERE q.other IS NULL OR NOT EXISTS (SELECT 1 FROM created c WHERE c.i = q.i)
    LOOP
        IF r.outcome = 'duplicate' THEN
            -- The key was claimed before (its row is visible now, to this new statement).
            SELECT * INTO v_prev FROM idempotency_keys k
             WHERE k.user_id = p_senders[r.i] AND k.key = p_keys[r.i];
            IF NOT FOUND THEN
                r.outcome := 'not_found'; -- the users rows were deleted meanwhile
            ELSIF v_prev.message_id IS NULL OR v_prev.conversation_id <> p_conversations[r.i]
               OR v_prev.content <> p_contents[r.i] THEN
                r.outcome := 'key_conflict';
            ELSE
                r.outcome := 'replayed';
                SELECT m.id, m.created_at, m.content INTO r.id, r.at, r.body
                  FROM messages m WHERE m.id = v_prev.message_id;
            END IF;
        END IF;
        idx := r.i; outcome := r.outcome; message_id := r.id; created_at := r.at; content := r.body;
        other_id := r.other; sender_seq := r.sseq; other_seq := r.oseq;
        RETURN NEXT;
    END LOOP;
END;
$$;

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

-- read_messages marks a conversation read up to its last message for p_reader and,
-- when there was something unread, logs a read event for the other participant.
-- outcome is 'read' (with the event's recipient, sequence number and data, for the
-- notification the server sends after the commit), 'unchanged' or 'not_found'.
DROP FUNCTION IF EXISTS read_messages(BIGINT, BIGINT);
CREATE OR REPLACE FUNCTION read_messages(p_conversation_id BIGINT, p_reader_id BIGINT)
RETURNS TABLE (outcome TEXT, other_id BIGINT, seq BIGINT, data JSONB)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
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
        RETURN QUERY SELECT 'not_found'::text, NULL::bigint, NULL::bigint, NULL::jsonb;
        RETURN;
    END IF;
    -- Lock order: the only users row this takes is the other participant's. Taking
    -- it before reading unread_count makes two concurrent reads log one event.
    PERFORM 1 FROM users u WHERE u.id = v_other FOR NO KEY UPDATE;
    SELECT p.unread_count INTO v_unread FROM participants p
     WHERE p.user_id = p_reader_id AND p.conversation_id = p_conversation_id;
    IF v_unread = 0 THEN
        RETURN QUERY SELECT 'unchanged'::text, NULL::bigint, NULL::bigint, NULL::jsonb;
        RETURN;
    END IF;

    UPDATE users u SET event_seq = u.event_seq + 1 WHERE u.id = v_other RETURNING u.event_seq INTO v_seq;
    v_at := clock_timestamp();
    UPDATE participants p
       SET unread_count = 0, last_read_message_id = coalesce(p.last_message_id, 0), messages_read_at = v_at
     WHERE p.user_id = p_reader_id AND p.conversation_id = p_conversation_id;
    v_data := jsonb_build_object(
        'conversationId', p_conversation_id::text,
        'userId', p_reader_id::text,
        'readAt', to_char(v_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'));
    INSERT INTO events (user_id, seq, kind, payload) VALUES (v_other, v_seq, 'read', v_data);
    RETURN QUERY SELECT 'read'::text, v_other, v_seq, v_data;
END;
$$;
