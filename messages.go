package main

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"
)

// Message is one message of a conversation; Mine is from the reader's point of view.
type Message struct {
	ID             int64     `json:"id,string"`
	Content        string    `json:"content"`
	ConversationID int64     `json:"conversationId,string"`
	CreatedAt      time.Time `json:"-"`
	Mine           bool      `json:"mine"`
}

// messageJSON is Message as the API shows it: createdAt in UTC with milliseconds.
type messageJSON struct {
	ID             int64  `json:"id,string"`
	Content        string `json:"content"`
	ConversationID int64  `json:"conversationId,string"`
	CreatedAt      string `json:"createdAt"`
	Mine           bool   `json:"mine"`
}

// timeLayout is how the API writes times: RFC 3339 in UTC with milliseconds.
const timeLayout = "2006-01-02T15:04:05.000Z07:00"

// MarshalJSON writes m in the API's shape.
func (m Message) MarshalJSON() ([]byte, error) {
	return json.Marshal(messageJSON{m.ID, m.Content, m.ConversationID, m.CreatedAt.UTC().Format(timeLayout), m.Mine})
}

const (
	maxContentRunes   = 480
	messagesPageSize  = 25
	maxIdempotencyKey = 255
)

// normalizeContent trims content, turns CRLF and CR into LF, collapses each run of
// spaces and tabs into one space, and drops blank lines. It returns a 422 apiError
// for control characters (other than newlines and tabs), for nothing left, and for
// more than 480 runes. The web client (web/conversation.js, normalize) mirrors these
// rules to match a send whose answer was lost with its copy from the stream.
func normalizeContent(content string) (string, error) {
	if !utf8.ValidString(content) {
		return "", validationError("content", "Content must be valid UTF-8")
	}
	content = strings.ReplaceAll(content, "\r\n", "\n")
	content = strings.ReplaceAll(content, "\r", "\n")
	var b strings.Builder
	b.Grow(len(content))
	for line := range strings.SplitSeq(content, "\n") {
		start := b.Len()
		if start > 0 {
			b.WriteByte('\n')
		}
		wrote, space := false, false
		for _, c := range line {
			switch {
			case c == ' ' || c == '\t' || (unicode.IsSpace(c) && c != '\n'):
				space = wrote
			case unicode.IsControl(c):
				return "", validationError("content", "Content must not contain control characters")
			default:
				if space {
					b.WriteByte(' ')
					space = false
				}
				b.WriteRune(c)
				wrote = true
			}
		}
		if !wrote { // a blank line: take back its newline
			s := b.String()[:start]
			b.Reset()
			b.WriteString(s)
		}
	}
	out := b.String()
	if out == "" {
		return "", validationError("content", "Content required")
	}
	if utf8.RuneCountInString(out) > maxContentRunes {
		return "", validationError("content", fmt.Sprintf("Message too long. %d max", maxContentRunes))
	}
	return out, nil
}

// validIdempotencyKey reports whether key is 1 to 255 printable ASCII characters.
func validIdempotencyKey(key string) bool {
	if len(key) == 0 || len(key) > maxIdempotencyKey {
		return false
	}
	for i := 0; i < len(key); i++ {
		if key[i] < 0x20 || key[i] > 0x7e {
			return false
		}
	}
	return true
}

// sendOutcome is what send_message reports.
type sendOutcome string

const (
	sendCreated     sendOutcome = "created"
	sendReplayed    sendOutcome = "replayed"
	sendKeyConflict sendOutcome = "key_conflict"
	sendNotFound    sendOutcome = "not_found"
)

// sendMessage stores a message from sender in conversation, with its events, in one
// transaction (the schema's send_message), and returns it with the outcome. key may
// be empty.
func (s *server) sendMessage(ctx context.Context, conversation, sender int64, content, key string) (Message, sendOutcome, error) {
	m := Message{ConversationID: conversation, Mine: true}
	var outcome string
	var id sql.NullInt64
	var at sql.NullTime
	var stored sql.NullString
	var keyArg sql.NullString
	if key != "" {
		keyArg = sql.NullString{String: key, Valid: true}
	}
	err := s.sendStmt.QueryRowContext(ctx, conversation, sender, content, keyArg).Scan(&outcome, &id, &at, &stored)
	if err != nil {
		return m, "", fmt.Errorf("send message: %w", err)
	}
	m.ID, m.CreatedAt, m.Content = id.Int64, at.Time, stored.String
	return m, sendOutcome(outcome), nil
}

// handleCreateMessage serves POST /api/conversations/:id/messages. A retry with the
// Idempotency-Key of an earlier send returns that message with 200.
func (s *server) handleCreateMessage() http.HandlerFunc {
	type request struct {
		Content string `json:"content"`
	}
	return func(w http.ResponseWriter, r *http.Request) {
		me := sessionFrom(r.Context()).userID
		id, err := pathID(r)
		if err != nil {
			s.respondError(w, r, err)
			return
		}
		var req request
		if err := decodeJSON(w, r, &req); err != nil {
			s.respondError(w, r, err)
			return
		}
		content, err := normalizeContent(req.Content)
		if err != nil {
			s.respondError(w, r, err)
			return
		}
		key := r.Header.Get("Idempotency-Key")
		if _, present := r.Header["Idempotency-Key"]; present && !validIdempotencyKey(key) {
			s.respondError(w, r, validationError("Idempotency-Key", "Idempotency-Key must be 1 to 255 printable ASCII characters"))
			return
		}
		if err := s.limits.sends.allow(me); err != nil {
			s.respondError(w, r, err)
			return
		}
		m, outcome, err := s.sendMessage(r.Context(), id, me, content, key)
		switch {
		case err != nil:
			s.respondError(w, r, err)
		case outcome == sendNotFound:
			s.respondError(w, r, errNotFound)
		case outcome == sendKeyConflict:
			s.respondError(w, r, validationError("Idempotency-Key", "Idempotency-Key was already used for a different message"))
		case outcome == sendReplayed:
			respond(w, http.StatusOK, m)
		default:
			respond(w, http.StatusCreated, m)
		}
	}
}

// handleListMessages serves GET /api/conversations/:id/messages?before=: newest
// first, a page at a time; before is the id of the oldest message already shown.
// Listing does not mark anything read.
func (s *server) handleListMessages() http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		me := sessionFrom(r.Context()).userID
		id, err := pathID(r)
		if err != nil {
			s.respondError(w, r, err)
			return
		}
		before, err := parseCursor(r)
		if err != nil {
			s.respondError(w, r, err)
			return
		}
		if err := s.checkParticipant(r.Context(), me, id); err != nil {
			s.respondError(w, r, err)
			return
		}
		query := `SELECT id, content, user_id, created_at FROM messages WHERE conversation_id = $1`
		args := []any{id, messagesPageSize}
		if before > 0 {
			query += ` AND id < $3`
			args = append(args, before)
		}
		rows, err := s.db.QueryContext(r.Context(), query+` ORDER BY id DESC LIMIT $2`, args...)
		if err != nil {
			s.respondError(w, r, fmt.Errorf("list messages: %w", err))
			return
		}
		defer rows.Close()
		list := []Message{}
		for rows.Next() {
			m := Message{ConversationID: id}
			var sender int64
			if err := rows.Scan(&m.ID, &m.Content, &sender, &m.CreatedAt); err != nil {
				s.respondError(w, r, fmt.Errorf("scan message: %w", err))
				return
			}
			m.Mine = sender == me
			list = append(list, m)
		}
		if err := rows.Err(); err != nil {
			s.respondError(w, r, fmt.Errorf("list messages: %w", err))
			return
		}
		respond(w, http.StatusOK, list)
	}
}

// checkParticipant returns errNotFound unless user is in conversation.
func (s *server) checkParticipant(ctx context.Context, user, conversation int64) error {
	var one int
	err := s.db.QueryRowContext(ctx, `SELECT 1 FROM participants WHERE user_id = $1 AND conversation_id = $2`,
		user, conversation).Scan(&one)
	if errors.Is(err, sql.ErrNoRows) {
		return errNotFound
	}
	if err != nil {
		return fmt.Errorf("check participant: %w", err)
	}
	return nil
}

// handleReadMessages serves POST /api/conversations/:id/read_messages: everything up
// to now is read, and the other participant's streams get a read event.
func (s *server) handleReadMessages() http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		id, err := pathID(r)
		if err != nil {
			s.respondError(w, r, err)
			return
		}
		var outcome string
		err = s.db.QueryRowContext(r.Context(), `SELECT read_messages($1, $2)`, id, sessionFrom(r.Context()).userID).Scan(&outcome)
		if err != nil {
			s.respondError(w, r, fmt.Errorf("read messages: %w", err))
			return
		}
		if outcome == "not_found" {
			s.respondError(w, r, errNotFound)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	}
}

// handleTyping serves POST /api/conversations/:id/typing: the other participant's
// streams get a fleeting typing event.
func (s *server) handleTyping() http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		me := sessionFrom(r.Context()).userID
		id, err := pathID(r)
		if err != nil {
			s.respondError(w, r, err)
			return
		}
		if err := s.limits.typing.allow(me); err != nil {
			s.respondError(w, r, err)
			return
		}
		other, err := otherParticipant(r.Context(), s.db, me, id)
		if err != nil {
			s.respondError(w, r, err)
			return
		}
		if err := notifyTyping(r.Context(), s.db, other.ID, id, me); err != nil {
			s.respondError(w, r, err)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	}
}
