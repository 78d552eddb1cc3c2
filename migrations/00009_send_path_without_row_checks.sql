-- The send path without foreign-key checks on the rows it writes (issue 15). Each
-- foreign key on messages and events ran a query per inserted row that locked the
-- referenced row: the users row just updated, the message just inserted, each lock
-- written to the WAL. With 16 messages a call they took a sixth to a quarter of
-- PostgreSQL's CPU (docs/performance.md). What those keys checked holds by the lock
-- order instead: events are written only for users rows the writing transaction
-- has locked (send_messages, read_messages), and a message's sender is locked and
-- in its conversation, which messages_conversation_id_fkey still checks.
-- What they cascaded is done by statement triggers, one DELETE per statement
-- rather than one per row: a deleted user's events, and a deleted message's events
-- (a conversation's messages go by messages_conversation_id_fkey, as before).

-- +goose Up
-- +goose StatementBegin
ALTER TABLE events DROP CONSTRAINT events_user_id_fkey, DROP CONSTRAINT events_message_id_fkey;
ALTER TABLE messages DROP CONSTRAINT messages_user_id_fkey;

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
-- +goose StatementEnd

-- +goose Down
-- +goose StatementBegin
DROP TRIGGER messages_deleted ON messages;
DROP TRIGGER users_deleted ON users;
DROP FUNCTION delete_messages_events();
DROP FUNCTION delete_users_events();
ALTER TABLE messages ADD CONSTRAINT messages_user_id_fkey
    FOREIGN KEY (user_id) REFERENCES users ON DELETE CASCADE;
ALTER TABLE events ADD CONSTRAINT events_user_id_fkey
    FOREIGN KEY (user_id) REFERENCES users ON DELETE CASCADE,
    ADD CONSTRAINT events_message_id_fkey
    FOREIGN KEY (message_id) REFERENCES messages ON DELETE CASCADE;
-- +goose StatementEnd
