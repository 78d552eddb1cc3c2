-- A TRUNCATE of users or messages empties events too (issue 15, after 00009): a
-- TRUNCATE fires no DELETE trigger, and since 00009 events has no foreign key for
-- TRUNCATE ... CASCADE to follow. Without this, events of users and messages gone
-- would be left, and after TRUNCATE ... RESTART IDENTITY they would collide with new
-- users' events and be replayed to them.

-- +goose Up
-- +goose StatementBegin
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
-- +goose StatementEnd

-- +goose Down
-- +goose StatementBegin
DROP TRIGGER messages_truncated ON messages;
DROP TRIGGER users_truncated ON users;
DROP FUNCTION truncate_events();
-- +goose StatementEnd
