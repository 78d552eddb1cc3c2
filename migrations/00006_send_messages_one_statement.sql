-- send_messages in one statement with a generic plan (issue 15). The PL/pgSQL
-- function of 00001 ran about nine statements per call, and PostgreSQL re-planned
-- them on most calls (the arrays made custom plans look cheaper); with one message,
-- PostgreSQL spent 0.94 ms of CPU per call at 500 calls a second, against 0.63 ms
-- now (pgbench, bench/send.sql, -R 500; docs/performance.md).

-- +goose Up
-- +goose StatementBegin
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
-- Lock order: every users row involved, by id (locked), and only then anything
-- else. The ids and times of the messages are taken under those locks (the gate on
-- locked in cand), so within a conversation they rise in commit order, and each
-- user's events are numbered from the sequence as locked. An idempotency key
-- belongs to its sender, whose row is locked first, so two sends never wait for
-- each other's key.
CREATE OR REPLACE FUNCTION send_messages(
    p_conversations BIGINT[], p_senders BIGINT[], p_contents TEXT[], p_keys TEXT[])
RETURNS TABLE (idx INT, outcome TEXT, message_id BIGINT, created_at TIMESTAMPTZ, content TEXT,
               other_id BIGINT, sender_seq BIGINT, other_seq BIGINT)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
#variable_conflict use_column
DECLARE
    r      RECORD;
    v_prev idempotency_keys%ROWTYPE;
BEGIN
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
-- +goose StatementEnd

-- +goose Down
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION send_messages(
    p_conversations BIGINT[], p_senders BIGINT[], p_contents TEXT[], p_keys TEXT[])
RETURNS TABLE (idx INT, outcome TEXT, message_id BIGINT, created_at TIMESTAMPTZ, content TEXT,
               other_id BIGINT, sender_seq BIGINT, other_seq BIGINT)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    n        INT := coalesce(array_length(p_conversations, 1), 0);
    v_others BIGINT[];
    v_dup    BOOLEAN[] := array_fill(false, ARRAY[n]);
    v_prev   idempotency_keys%ROWTYPE;
    i        INT;
    pos      INT;
    -- The messages to create, in batch order: c_idx[j] is their place in the batch.
    c_idx    INT[] := '{}';
    c_conv   BIGINT[] := '{}';
    c_sender BIGINT[] := '{}';
    c_other  BIGINT[] := '{}';
    c_id     BIGINT[] := '{}';
    c_at     TIMESTAMPTZ[] := '{}';
    c_sseq   BIGINT[] := '{}';
    c_oseq   BIGINT[] := '{}';
    -- Each user's sequence number before this batch, then as numbered so far.
    u_id     BIGINT[] := '{}';
    u_seq    BIGINT[] := '{}';
    r        RECORD;
BEGIN
    IF n = 0 THEN
        RETURN;
    END IF;
    -- The other participant of each message's conversation; NULL: not found.
    SELECT array_agg(CASE t.s WHEN c.user_low THEN c.user_high WHEN c.user_high THEN c.user_low END ORDER BY t.ord)
      INTO v_others
      FROM unnest(p_conversations, p_senders) WITH ORDINALITY AS t(conv, s, ord)
      LEFT JOIN conversations c ON c.id = t.conv;

    -- Claim the idempotency keys. A concurrent send with the same key waits here
    -- until the first commits, then finds its row.
    FOR i IN SELECT t.ord FROM unnest(p_senders, p_keys) WITH ORDINALITY AS t(s, k, ord)
              WHERE t.k <> '' ORDER BY t.s, t.k, t.ord LOOP
        CONTINUE WHEN v_others[i] IS NULL;
        INSERT INTO idempotency_keys AS k (user_id, key, conversation_id, content)
        VALUES (p_senders[i], p_keys[i], p_conversations[i], p_contents[i])
        ON CONFLICT DO NOTHING;
        v_dup[i] := NOT FOUND;
    END LOOP;

    FOR i IN 1..n LOOP
        IF v_others[i] IS NOT NULL AND NOT v_dup[i] THEN
            c_idx := c_idx || i;
            c_conv := c_conv || p_conversations[i];
            c_sender := c_sender || p_senders[i];
            c_other := c_other || v_others[i];
        END IF;
    END LOOP;

    IF cardinality(c_idx) > 0 THEN
        -- Lock every users row whose sequence this batch bumps, in id order, and
        -- bump each once by its number of events.
        PERFORM 1 FROM users u WHERE u.id = ANY (c_sender || c_other) ORDER BY u.id FOR NO KEY UPDATE;
        FOR r IN
            UPDATE users u SET event_seq = u.event_seq + c.cnt
              FROM (SELECT x.uid, count(*) AS cnt FROM unnest(c_sender || c_other) AS x(uid) GROUP BY x.uid) c
             WHERE u.id = c.uid
            RETURNING u.id, u.event_seq - c.cnt AS base
        LOOP
            u_id := u_id || r.id;
            u_seq := u_seq || r.base;
        END LOOP;

        -- Number the messages and events in batch order. The ids and times are
        -- taken under the locks, so within a conversation they rise in commit order.
        FOR j IN 1..cardinality(c_idx) LOOP
            c_id := c_id || nextval(pg_get_serial_sequence('messages', 'id'));
            c_at := c_at || clock_timestamp();
            pos := array_position(u_id, c_sender[j]);
            u_seq[pos] := u_seq[pos] + 1;
            c_sseq := c_sseq || u_seq[pos];
            pos := array_position(u_id, c_other[j]);
            u_seq[pos] := u_seq[pos] + 1;
            c_oseq := c_oseq || u_seq[pos];
        END LOOP;

        INSERT INTO messages (id, conversation_id, user_id, content, created_at)
        SELECT t.id, t.conv, t.s, p_contents[t.i], t.at
          FROM unnest(c_id, c_conv, c_sender, c_idx, c_at) AS t(id, conv, s, i, at);

        IF EXISTS (SELECT 1 FROM unnest(p_keys) AS k WHERE k <> '') THEN
            UPDATE idempotency_keys k SET message_id = t.id
              FROM unnest(c_sender, c_idx, c_id) AS t(s, i, id)
             WHERE p_keys[t.i] <> '' AND k.user_id = t.s AND k.key = p_keys[t.i];
        END IF;

        -- One update per participant row, however many of its messages the batch holds.
        UPDATE participants p
           SET last_activity_at = x.at, last_message_id = x.id, unread_count = p.unread_count + x.unread
          FROM (SELECT y.uid, y.conv, max(y.id) AS id, max(y.at) AS at, sum(y.unread)::int AS unread
                  FROM (SELECT t.s AS uid, t.conv, t.id, t.at, 0 AS unread
                          FROM unnest(c_sender, c_conv, c_id, c_at) AS t(s, conv, id, at)
                        UNION ALL
                        SELECT t.o, t.conv, t.id, t.at, 1
                          FROM unnest(c_other, c_conv, c_id, c_at) AS t(o, conv, id, at)) y
                 GROUP BY y.uid, y.conv) x
         WHERE p.user_id = x.uid AND p.conversation_id = x.conv;

        INSERT INTO events (user_id, seq, kind, message_id)
        SELECT t.u, t.seq, 'message', t.id
          FROM unnest(c_sender || c_other, c_sseq || c_oseq, c_id || c_id) AS t(u, seq, id);
    END IF;

    RETURN QUERY
        SELECT t.i, 'created'::text, t.id, t.at, p_contents[t.i], t.o, t.ss, t.os
          FROM unnest(c_idx, c_id, c_at, c_other, c_sseq, c_oseq) AS t(i, id, at, o, ss, os);
    FOR i IN 1..n LOOP
        IF v_others[i] IS NULL THEN
            RETURN QUERY SELECT i, 'not_found'::text, NULL::bigint, NULL::timestamptz, NULL::text,
                                NULL::bigint, NULL::bigint, NULL::bigint;
        ELSIF v_dup[i] THEN
            SELECT * INTO v_prev FROM idempotency_keys k WHERE k.user_id = p_senders[i] AND k.key = p_keys[i];
            IF v_prev.message_id IS NULL OR v_prev.conversation_id <> p_conversations[i]
               OR v_prev.content <> p_contents[i] THEN
                RETURN QUERY SELECT i, 'key_conflict'::text, NULL::bigint, NULL::timestamptz, NULL::text,
                                    NULL::bigint, NULL::bigint, NULL::bigint;
            ELSE
                RETURN QUERY SELECT i, 'replayed'::text, m.id, m.created_at, m.content,
                                    NULL::bigint, NULL::bigint, NULL::bigint
                               FROM messages m WHERE m.id = v_prev.message_id;
            END IF;
        END IF;
    END LOOP;
END;
$$;
-- +goose StatementEnd
