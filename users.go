package main

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"

	"github.com/lib/pq"
)

// User is a person who can sign in and chat.
type User struct {
	ID        int64   `json:"id,string"`
	Username  string  `json:"username"`
	AvatarURL *string `json:"avatarURL"`
}

// validateUsername checks the rule the schema also enforces: 1 to 39 letters,
// digits, '-' or '_' (GitHub's logins fit it).
func validateUsername(name string) error {
	if name == "" {
		return invalid("username", "Username required")
	}
	if len(name) > 39 {
		return invalid("username", "Username too long. 39 max")
	}
	for _, c := range name {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
			return invalid("username", "Username may only contain letters, digits, '-' and '_'")
		}
	}
	return nil
}

const userColumns = `id, username, avatar_url`

func scanUser(row interface{ Scan(...any) error }) (User, error) {
	var u User
	var avatar sql.NullString
	if err := row.Scan(&u.ID, &u.Username, &avatar); err != nil {
		return u, err
	}
	if avatar.Valid {
		u.AvatarURL = &avatar.String
	}
	return u, nil
}

// upsertUser returns the user named username (case-insensitively), creating it if
// there is none.
func upsertUser(ctx context.Context, db *sql.DB, username string) (User, error) {
	// The insert comes first so that two concurrent first sign-ins agree: the loser
	// of the race waits for the winner's commit and then finds its row.
	for range 2 {
		u, err := scanUser(db.QueryRowContext(ctx, `
			WITH ins AS (
				INSERT INTO users (username) VALUES ($1)
				ON CONFLICT ((lower(username))) DO NOTHING
				RETURNING `+userColumns+`)
			SELECT `+userColumns+` FROM ins
			UNION ALL
			SELECT `+userColumns+` FROM users WHERE lower(username) = lower($1)
			LIMIT 1`, username))
		if errors.Is(err, sql.ErrNoRows) {
			continue // inserted concurrently after this statement's snapshot: look again
		}
		if err != nil {
			return u, fmt.Errorf("upsert user: %w", err)
		}
		return u, nil
	}
	return User{}, fmt.Errorf("upsert user %q: not found after insert", username)
}

// upsertGitHubUser returns the user with gh's GitHub id, creating it on first
// sign-in. A new account is named after the GitHub login; when another account
// has that name, it takes the first free name of "<login>-<id>", "<login>-<id>-2",
// "<login>-<id>-3", … (the login cut so that the name fits 39 characters). The
// order is fixed, so the choice is deterministic, and as there are finitely many
// users one of them is free: a name never fails a sign-in.
func upsertGitHubUser(ctx context.Context, db *sql.DB, gh githubUser) (User, error) {
	var avatar *string
	if gh.AvatarURL != "" && strings.HasPrefix(gh.AvatarURL, "https://") {
		avatar = &gh.AvatarURL
	}
	for n := 0; ; n++ {
		name := githubUsername(gh, n)
		u, err := scanUser(db.QueryRowContext(ctx, `
			INSERT INTO users (username, github_id, avatar_url) VALUES ($1, $2, $3)
			ON CONFLICT (github_id) DO UPDATE SET avatar_url = EXCLUDED.avatar_url
			RETURNING `+userColumns, name, gh.ID, avatar))
		var pqErr *pq.Error
		if errors.As(err, &pqErr) && pqErr.Code == "23505" && pqErr.Constraint == "users_username_key" {
			continue
		}
		if err != nil {
			return u, fmt.Errorf("upsert github user: %w", err)
		}
		return u, nil
	}
}

// githubUsername is the n-th name upsertGitHubUser tries for gh: the login, then
// "<login>-<id>", then "<login>-<id>-<n>", each within the username rule.
func githubUsername(gh githubUser, n int) string {
	if n == 0 {
		return gh.Login
	}
	suffix := "-" + strconv.FormatInt(gh.ID, 10)
	if n > 1 {
		suffix += "-" + strconv.Itoa(n)
	}
	return gh.Login[:min(len(gh.Login), 39-len(suffix))] + suffix
}

// userByID returns the user with id, or errNotFound.
func userByID(ctx context.Context, db *sql.DB, id int64) (User, error) {
	u, err := scanUser(db.QueryRowContext(ctx, `SELECT `+userColumns+` FROM users WHERE id = $1`, id))
	if errors.Is(err, sql.ErrNoRows) {
		return u, errNotFound
	}
	if err != nil {
		return u, fmt.Errorf("user by id: %w", err)
	}
	return u, nil
}

// handleUsernames serves GET /api/usernames?search=: up to 5 usernames that start
// with search, case-insensitively, never the caller's own.
func (s *server) handleUsernames() apiHandler {
	return func(w http.ResponseWriter, r *http.Request) error {
		names, err := searchUsernames(r.Context(), s.db, sessionFrom(r.Context()).userID, r.URL.Query().Get("search"))
		if err != nil {
			return err
		}
		respond(w, http.StatusOK, names)
		return nil
	}
}

// searchUsernames returns up to 5 usernames that start with prefix,
// case-insensitively, never me's own.
func searchUsernames(ctx context.Context, db *sql.DB, me int64, prefix string) ([]string, error) {
	names := []string{}
	// A search outside the username alphabet can match nobody.
	if prefix == "" || validateUsername(prefix) != nil {
		return names, nil
	}
	rows, err := db.QueryContext(ctx, `
		SELECT username FROM users
		WHERE lower(username) LIKE lower($1) || '%' AND id <> $2
		ORDER BY lower(username) LIMIT 5`,
		strings.NewReplacer("_", `\_`).Replace(prefix), me)
	if err != nil {
		return nil, fmt.Errorf("search usernames: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var name string
		if err := rows.Scan(&name); err != nil {
			return nil, fmt.Errorf("scan username: %w", err)
		}
		names = append(names, name)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("search usernames: %w", err)
	}
	return names, nil
}
