-- Sessions that can be ended (issue 12): every sign-in is a row, and a token is
-- accepted only while its session stands.

-- +goose Up
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

-- +goose Down
DROP TABLE IF EXISTS sessions;
