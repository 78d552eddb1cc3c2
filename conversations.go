package main

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/lib/pq"
)

// Conversation is a chat between the caller and one other participant, as the
// caller sees it.
type Conversation struct {
	ID                int64    `json:"id,string"`
	OtherParticipant  User     `json:"otherParticipant"`
	LastMessage       *Message `json:"lastMessage"`
	HasUnreadMessages bool     `json:"hasUnreadMessages"`
	UnreadCount       int      `json:"unreadCount"`
}

// conversationsPageSize is how many conversations one page of the list holds.
const conversationsPageSize = 25

// conversationQuery selects conversations as user $1 sees them; callers add the
// WHERE conditions after it and the ORDER BY. The last message is looked up by its
// conversation too, which it always belongs to: a database that splits messages by
// conversation (docs/scaling.md) then finds it on one shard.
const conversationQuery = `
	SELECT p.conversation_id, u.id, u.username, u.avatar_url, p.unread_count,
	       m.id, m.content, m.user_id, m.created_at
	FROM participants p
	JOIN conversations c ON c.id = p.conversation_id
	JOIN users u ON u.id = CASE WHEN c.user_low = p.user_id THEN c.user_high ELSE c.user_low END
	LEFT JOIN messages m ON m.conversation_id = p.conversation_id AND m.id = p.last_message_id
	WHERE p.user_id = $1`

func scanConversation(row interface{ Scan(...any) error }, me int64) (Conversation, error) {
	var c Conversation
	var avatar sql.NullString
	var msgID, msgSender sql.NullInt64
	var msgContent sql.NullString
	var msgAt sql.NullTime
	err := row.Scan(&c.ID, &c.OtherParticipant.ID, &c.OtherParticipant.Username, &avatar, &c.UnreadCount,
		&msgID, &msgContent, &msgSender, &msgAt)
	if err != nil {
		return c, err
	}
	if avatar.Valid {
		c.OtherParticipant.AvatarURL = &avatar.String
	}
	if msgID.Valid {
		c.LastMessage = &Message{ID: msgID.Int64, Content: msgContent.String, ConversationID: c.ID,
			CreatedAt: msgAt.Time, Mine: msgSender.Int64 == me}
	}
	c.HasUnreadMessages = c.UnreadCount > 0
	return c, nil
}

// conversationByID returns conversation id as user me sees it, or errNotFound when
// it does not exist or me is not in it.
func conversationByID(ctx context.Context, db *sql.DB, me, id int64) (Conversation, error) {
	c, err := scanConversation(db.QueryRowContext(ctx, conversationQuery+` AND p.conversation_id = $2`, me, id), me)
	if errors.Is(err, sql.ErrNoRows) {
		return c, errNotFound
	}
	if err != nil {
		return c, fmt.Errorf("conversation by id: %w", err)
	}
	return c, nil
}

// otherParticipant returns the user me talks to in conversation id, or errNotFound.
func otherParticipant(ctx context.Context, db *sql.DB, me, id int64) (User, error) {
	u, err := scanUser(db.QueryRowContext(ctx, `
		SELECT u.id, u.username, u.avatar_url
		FROM conversations c
		JOIN users u ON u.id = CASE $1::bigint WHEN c.user_low THEN c.user_high WHEN c.user_high THEN c.user_low END
		WHERE c.id = $2`, me, id))
	if errors.Is(err, sql.ErrNoRows) {
		return u, errNotFound
	}
	if err != nil {
		return u, fmt.Errorf("other participant: %w", err)
	}
	return u, nil
}

// handleCreateConversation serves POST /api/conversations: it starts a conversation
// with the named user (201), or returns the one the two already have (200).
func (s *server) handleCreateConversation() apiHandler {
	type request struct {
		Username string `json:"username"`
	}
	return func(w http.ResponseWriter, r *http.Request) error {
		me := sessionFrom(r.Context()).userID
		// The rate limit comes first, as for sends: every attempt takes a token.
		if err := s.limits.conversations.allow(me); err != nil {
			return err
		}
		var req request
		if err := decodeJSON(w, r, &req); err != nil {
			return err
		}
		if err := validateUsername(req.Username); err != nil {
			return err
		}
		id, created, err := createConversation(r.Context(), s.db, me, req.Username)
		if err != nil {
			return err
		}
		c, err := conversationByID(r.Context(), s.db, me, id)
		if err != nil {
			return err
		}
		status := http.StatusOK
		if created {
			status = http.StatusCreated
		}
		respond(w, status, c)
		return nil
	}
}

// createConversation returns the id of the conversation between me and the user
// named username, creating it if there is none; created says which. It returns a
// 404 apiError for an unknown user and a 403 one for me.
func createConversation(ctx context.Context, db *sql.DB, me int64, username string) (id int64, created bool, err error) {
	var other int64
	err = db.QueryRowContext(ctx, `SELECT id FROM users WHERE lower(username) = lower($1)`, username).Scan(&other)
	if errors.Is(err, sql.ErrNoRows) {
		return 0, false, notFound("user not found")
	}
	if err != nil {
		return 0, false, fmt.Errorf("find user: %w", err)
	}
	if other == me {
		return 0, false, forbidden("cannot start a conversation with yourself")
	}
	low, high := min(me, other), max(me, other)

	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return 0, false, fmt.Errorf("create conversation: %w", err)
	}
	defer tx.Rollback()
	// A concurrent insert of the same pair waits here for the first to commit, then
	// inserts nothing; the select below then sees the winner's row.
	err = tx.QueryRowContext(ctx, `
		INSERT INTO conversations (user_low, user_high) VALUES ($1, $2)
		ON CONFLICT (user_low, user_high) DO NOTHING RETURNING id`, low, high).Scan(&id)
	if errors.Is(err, sql.ErrNoRows) {
		err = tx.QueryRowContext(ctx, `SELECT id FROM conversations WHERE user_low = $1 AND user_high = $2`, low, high).Scan(&id)
		if err != nil {
			return 0, false, fmt.Errorf("find conversation: %w", err)
		}
		return id, false, nil
	}
	var pqErr *pq.Error
	if errors.As(err, &pqErr) && pqErr.Code == "23503" { // foreign_key_violation
		// One of the two users is gone: the caller, whose token outlived the
		// account, or the other, deleted since it was looked up.
		if _, err := userByID(ctx, db, me); errors.Is(err, errNotFound) {
			return 0, false, errTokenInvalid
		}
		return 0, false, notFound("user not found")
	}
	if err != nil {
		return 0, false, fmt.Errorf("insert conversation: %w", err)
	}
	if _, err := tx.ExecContext(ctx, `
		INSERT INTO participants (user_id, conversation_id, last_activity_at)
		VALUES ($1, $3, now()), ($2, $3, now())`, low, high, id); err != nil {
		return 0, false, fmt.Errorf("insert participants: %w", err)
	}
	if err := tx.Commit(); err != nil {
		return 0, false, fmt.Errorf("create conversation: commit: %w", err)
	}
	return id, true, nil
}

// handleListConversations serves GET /api/conversations?before=: the caller's
// conversations, most recent activity first, a page at a time. before is the id of
// the last conversation of the previous page.
func (s *server) handleListConversations() apiHandler {
	return func(w http.ResponseWriter, r *http.Request) error {
		before, err := parseCursor(r)
		if err != nil {
			return err
		}
		list, err := listConversations(r.Context(), s.db, sessionFrom(r.Context()).userID, before)
		if err != nil {
			return err
		}
		respond(w, http.StatusOK, list)
		return nil
	}
}

// listConversations returns a page of me's conversations, most recent activity
// first, after conversation before in that order (0: the first page). A before
// that is not one of me's conversations is a malformed cursor.
func listConversations(ctx context.Context, db *sql.DB, me, before int64) ([]Conversation, error) {
	query, args := conversationQuery, []any{me, conversationsPageSize}
	if before > 0 {
		var at time.Time
		err := db.QueryRowContext(ctx, `
			SELECT last_activity_at FROM participants WHERE user_id = $1 AND conversation_id = $2`,
			me, before).Scan(&at)
		if errors.Is(err, sql.ErrNoRows) {
			return nil, malformed("before: no such conversation")
		}
		if err != nil {
			return nil, fmt.Errorf("conversation cursor: %w", err)
		}
		query += ` AND (p.last_activity_at, p.conversation_id) < ($3, $4)`
		args = append(args, at, before)
	}
	rows, err := db.QueryContext(ctx, query+` ORDER BY p.last_activity_at DESC, p.conversation_id DESC LIMIT $2`, args...)
	if err != nil {
		return nil, fmt.Errorf("list conversations: %w", err)
	}
	defer rows.Close()
	list := []Conversation{}
	for rows.Next() {
		c, err := scanConversation(rows, me)
		if err != nil {
			return nil, fmt.Errorf("scan conversation: %w", err)
		}
		list = append(list, c)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list conversations: %w", err)
	}
	return list, nil
}

// handleGetConversation serves GET /api/conversations/:id.
func (s *server) handleGetConversation() apiHandler {
	return func(w http.ResponseWriter, r *http.Request) error {
		id, err := pathID(r)
		if err != nil {
			return err
		}
		c, err := conversationByID(r.Context(), s.db, sessionFrom(r.Context()).userID, id)
		if err != nil {
			return err
		}
		respond(w, http.StatusOK, c)
		return nil
	}
}

// handleOtherParticipant serves GET /api/conversations/:id/other_participant.
func (s *server) handleOtherParticipant() apiHandler {
	return func(w http.ResponseWriter, r *http.Request) error {
		id, err := pathID(r)
		if err != nil {
			return err
		}
		u, err := otherParticipant(r.Context(), s.db, sessionFrom(r.Context()).userID, id)
		if err != nil {
			return err
		}
		respond(w, http.StatusOK, u)
		return nil
	}
}
