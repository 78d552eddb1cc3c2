-- Every end of a session is announced on the sessions channel (sessionsChannel in
-- sessions.go), by the database itself: a sign-out, an operator's UPDATE or DELETE,
-- a deleted user (the cascade deletes the user's sessions row by row) and a
-- TRUNCATE (announced as user 0: everybody's). Deleting a session that had already
-- ended or expired (the hourly clean-up) announces nothing: its end was announced,
-- or is checked against the cached hard end. The server then forgets the user's
-- cached sessions on every instance within milliseconds, which lets it remember an
-- open session for long (SESSION_CACHE_TTL) instead of looking it up on nearly every
-- request. PostgreSQL sends a transaction's identical notifications once, so ending
-- many sessions of one user announces that user once.

-- +goose Up
-- +goose StatementBegin
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
-- +goose StatementEnd
CREATE TRIGGER sessions_ended AFTER UPDATE ON sessions FOR EACH ROW
    WHEN (OLD.ended_at IS DISTINCT FROM NEW.ended_at OR OLD.expires_at IS DISTINCT FROM NEW.expires_at
          OR OLD.user_id IS DISTINCT FROM NEW.user_id)
    EXECUTE FUNCTION announce_session_end();
CREATE TRIGGER sessions_deleted AFTER DELETE ON sessions FOR EACH ROW
    WHEN (OLD.ended_at IS NULL AND OLD.expires_at > now())
    EXECUTE FUNCTION announce_session_end();
CREATE TRIGGER sessions_truncated AFTER TRUNCATE ON sessions FOR EACH STATEMENT
    EXECUTE FUNCTION announce_session_end();

-- +goose Down
DROP TRIGGER IF EXISTS sessions_truncated ON sessions;
DROP TRIGGER IF EXISTS sessions_deleted ON sessions;
DROP TRIGGER IF EXISTS sessions_ended ON sessions;
DROP FUNCTION IF EXISTS announce_session_end();
