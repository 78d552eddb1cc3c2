-- The article series' tables ("Building a Messenger App"), translated from its
-- CockroachDB schema to PostgreSQL, in a schema of their own in the bench database:
-- the bare send that bench/series_send.sql runs has nothing of the server's (no
-- event log, no idempotency, no sequence numbers), so it is the database's own
-- limit for storing a message. bench/run.sh fills them as many rows as the
-- server's tables (psql -v users=N -v convs=M): conversation c is between users
-- 2c-1 and 2c, as bench/send.sql numbers them.
DROP SCHEMA IF EXISTS series CASCADE;
CREATE SCHEMA series;
SET search_path = series;

CREATE TABLE users (
    id BIGSERIAL PRIMARY KEY,
    username TEXT NOT NULL UNIQUE,
    avatar_url TEXT,
    github_id BIGINT NOT NULL UNIQUE
);

CREATE TABLE conversations (
    id BIGSERIAL PRIMARY KEY,
    last_message_id BIGINT
);
CREATE INDEX ON conversations (last_message_id DESC);

CREATE TABLE messages (
    id BIGSERIAL PRIMARY KEY,
    content TEXT NOT NULL,
    user_id BIGINT NOT NULL REFERENCES users ON DELETE CASCADE,
    conversation_id BIGINT NOT NULL REFERENCES conversations ON DELETE CASCADE,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX ON messages (created_at DESC);

CREATE TABLE participants (
    user_id BIGINT NOT NULL REFERENCES users ON DELETE CASCADE,
    conversation_id BIGINT NOT NULL REFERENCES conversations ON DELETE CASCADE,
    messages_read_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, conversation_id)
);

ALTER TABLE conversations ADD CONSTRAINT fk_last_message_id_ref_messages
    FOREIGN KEY (last_message_id) REFERENCES messages ON DELETE CASCADE;

INSERT INTO users (username, github_id)
    SELECT 'series-' || i, i FROM generate_series(1, :users) AS i;
INSERT INTO conversations (id) SELECT c FROM generate_series(1, :convs) AS c;
SELECT setval('conversations_id_seq', :convs);
INSERT INTO participants (user_id, conversation_id)
    SELECT 2 * c - 1 + side, c FROM generate_series(1, :convs) AS c, generate_series(0, 1) AS side;
VACUUM ANALYZE users, conversations, messages, participants;
