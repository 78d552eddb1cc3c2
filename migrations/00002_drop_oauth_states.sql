-- A sign-in no longer stores its OAuth state: the state is signed and bound to the
-- browser by a cookie (oauth.go), so starting a sign-in costs no storage.

-- +goose Up
DROP TABLE IF EXISTS oauth_states;

-- +goose Down
CREATE TABLE IF NOT EXISTS oauth_states (
    state       TEXT PRIMARY KEY,
    expires_at  TIMESTAMPTZ NOT NULL
);
