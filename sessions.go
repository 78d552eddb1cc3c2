package main

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/lib/pq"
)

// Sessions. Every sign-in starts a session, a row of the sessions table with a hard
// end (SESSION_MAX_AGE after it started), and every token names its session.
// authenticate looks the session up (one primary-key lookup) and remembers an open
// session for SESSION_CACHE_TTL. The database announces every end of a session on
// sessionsChannel, whoever ended it (a trigger on the sessions table: a sign-out,
// an operator's UPDATE or DELETE, a deleted user, a TRUNCATE), and every instance
// then forgets that user's sessions: so a session that ends stops every token of it
// at once on the instance that ended it and within milliseconds on the others. A
// session past its hard end is refused from the cache itself. The TTL only bounds
// what a notification lost with the LISTEN connection could leave behind, and a
// reconnected listener empties the cache too. Refreshing issues a new token for
// the same session, never past its end.
//
// Streams are not checked per event, to keep sessions off the delivery path.
// Ending sessions announces the user on sessionsChannel; each instance's
// sessionWatcher then checks that user's local streams against the table (one
// query) and ends those whose session ended, with a session_ended event that says
// why. The database announces every end of a session, and a reconnected LISTEN
// connection has every stream checked, so the periodic check of every stream once
// per SESSION_CHECK_INTERVAL (1 minute) is only a safety net. A stream also ends
// at its token's expiry, which is never past its session's hard end. With 5,000
// streams, checking all of them at once every 5 s was one of the bursts behind the
// send tail of docs/performance.md (issue 15); the check is now spread over the
// interval, a sixteenth of the sessions at a time.

// sessionsChannel is the PostgreSQL channel on which ended sessions are announced,
// by the trigger of migration 00005: the payload is {"user": <id>}, meaning "some
// sessions of this user ended", and user 0 means everybody's.
const sessionsChannel = "messenger_sessions"

// Why a session ended: the values of sessions.end_reason and of the session_ended
// event's reason. endGone is for a session whose row is gone (its user was
// deleted); endRevoked is for operators, who end sessions in SQL.
const (
	endSignedOut           = "signed_out"
	endSignedOutEverywhere = "signed_out_everywhere"
	endTooMany             = "too_many_sessions"
	endRevoked             = "revoked"
	endExpired             = "expired"
	endGone                = "ended"
)

var errSessionEnded = unauthenticated("session ended; sign in again")

// startSession starts a session for user and returns its first token. A user keeps
// at most MAX_SESSIONS_PER_USER open sessions: signing in once more ends the
// oldest.
func (s *server) startSession(ctx context.Context, user int64) (string, time.Time, error) {
	var id int64
	var ends time.Time
	err := s.db.QueryRowContext(ctx, `
		INSERT INTO sessions (user_id, expires_at) VALUES ($1, now() + $2 * interval '1 millisecond')
		RETURNING id, expires_at`, user, s.cfg.sessionMaxAge.Milliseconds()).Scan(&id, &ends)
	if err != nil {
		return "", time.Time{}, fmt.Errorf("start session: %w", err)
	}
	if err := s.endSessions(ctx, user, 0, s.cfg.maxSessionsPerUser, endTooMany); err != nil {
		return "", time.Time{}, err
	}
	token, exp := s.tokens.issue(user, id, time.Now(), ends)
	return token, exp, nil
}

// endSessions ends user's open sessions, with reason: only session if it is not 0,
// else all but the newest keep (0: all of them). The sessions table's trigger
// announces the user on sessionsChannel when it ended any. Both the UPDATE and its
// subquery name the user, so that a database split by user (docs/scaling.md) runs
// the statement on one shard.
func (s *server) endSessions(ctx context.Context, user, session int64, keep int, reason string) error {
	var n int
	err := s.db.QueryRowContext(ctx, `
		WITH ended AS (
			UPDATE sessions SET ended_at = now(), end_reason = $4
			WHERE user_id = $1 AND id IN (
				SELECT id FROM sessions
				WHERE user_id = $1 AND ($2 = 0 OR id = $2) AND ended_at IS NULL
				ORDER BY id DESC OFFSET $3)
			RETURNING id)
		SELECT count(*) FROM ended`, user, session, keep, reason).Scan(&n)
	if err != nil {
		return fmt.Errorf("end sessions: %w", err)
	}
	if n > 0 {
		s.sessionCache.forgetUser(user)
	}
	s.metrics.sessionsEnded.WithLabelValues(reason).Add(float64(n))
	return nil
}

// openSessionEnd returns the hard end of session of user, or errSessionEnded if it
// ended, passed its end or is not user's.
func openSessionEnd(ctx context.Context, db *sql.DB, session, user int64) (time.Time, error) {
	var ends time.Time
	err := db.QueryRowContext(ctx, `
		SELECT expires_at FROM sessions
		WHERE id = $1 AND user_id = $2 AND ended_at IS NULL AND expires_at > now()`,
		session, user).Scan(&ends)
	if errors.Is(err, sql.ErrNoRows) {
		return ends, errSessionEnded
	}
	if err != nil {
		return ends, fmt.Errorf("check session: %w", err)
	}
	return ends, nil
}

// refreshSession records that session of user was refreshed and returns its hard
// end. It returns errSessionEnded if the session ended (or passed its end) since
// the request was authenticated. The session is looked up with its user, as the
// token names both, so that a database split by user (docs/scaling.md) finds it on
// one shard.
func refreshSession(ctx context.Context, db *sql.DB, session, user int64) (time.Time, error) {
	var ends time.Time
	err := db.QueryRowContext(ctx, `
		UPDATE sessions SET refreshed_at = now()
		WHERE id = $1 AND user_id = $2 AND ended_at IS NULL AND expires_at > now()
		RETURNING expires_at`, session, user).Scan(&ends)
	if errors.Is(err, sql.ErrNoRows) {
		return ends, errSessionEnded
	}
	if err != nil {
		return ends, fmt.Errorf("refresh session: %w", err)
	}
	return ends, nil
}

// maxCachedSessions bounds the cache; when it is full, stale entries are dropped,
// and if that frees nothing, all of them.
const maxCachedSessions = 100_000

// sessionCache remembers the sessions authenticate found open, each for ttl
// (SESSION_CACHE_TTL): how long a session whose end was never announced here (the
// notification lost with the LISTEN connection) could still be accepted. A user's
// entries are forgotten whenever a session of theirs ends, here or on another
// instance (sessionsChannel), and all of them when the listener reconnects.
//
// Entries are also listed by user, so that forgetting one user's sessions (on
// every sign-out anywhere) costs that user's entries, not the whole cache.
type sessionCache struct {
	ttl     time.Duration // 0: remember nothing
	mu      sync.Mutex    // guards entries, byUser and gen
	entries map[int64]cachedSession
	byUser  map[int64][]int64 // the sessions in entries, by user
	gen     uint64            // bumped by clear: a lookup that began before may not store its answer
}

type cachedSession struct {
	userID  int64
	ends    time.Time // the session's hard end
	checked time.Time
}

func newSessionCache(ttl time.Duration) *sessionCache {
	return &sessionCache{ttl: ttl, entries: make(map[int64]cachedSession), byUser: make(map[int64][]int64)}
}

// get returns the hard end of session of user if it was found open less than
// c.ttl ago; otherwise ok is false and gen is what put needs.
func (c *sessionCache) get(session, user int64, now time.Time) (ends time.Time, gen uint64, ok bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, found := c.entries[session]
	if found && e.userID == user && now.Sub(e.checked) < c.ttl && now.Before(e.ends) {
		return e.ends, c.gen, true
	}
	return time.Time{}, c.gen, false
}

// put remembers that session of user was open at checked, unless the cache was
// cleared since get returned gen.
func (c *sessionCache) put(session, user int64, ends, checked time.Time, gen uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if gen != c.gen || c.ttl <= 0 {
		return
	}
	if len(c.entries) >= maxCachedSessions {
		for id, e := range c.entries {
			if checked.Sub(e.checked) >= c.ttl {
				delete(c.entries, id)
			}
		}
		if len(c.entries) >= maxCachedSessions {
			clear(c.entries)
		}
		clear(c.byUser)
		for id, e := range c.entries {
			c.byUser[e.userID] = append(c.byUser[e.userID], id)
		}
	}
	if old, found := c.entries[session]; !found || old.userID != user {
		if found {
			c.byUser[old.userID] = slices.DeleteFunc(c.byUser[old.userID], func(id int64) bool { return id == session })
		}
		c.byUser[user] = append(c.byUser[user], session)
	}
	c.entries[session] = cachedSession{userID: user, ends: ends, checked: checked}
}

// clear forgets every session.
func (c *sessionCache) clear() {
	c.mu.Lock()
	defer c.mu.Unlock()
	clear(c.entries)
	clear(c.byUser)
	c.gen++
}

// forgetUser forgets the sessions of user, whose sessions ended: one person
// signing out must not send every other session's next request to the database.
// gen moves on too, so that no lookup in flight stores what it found before.
func (c *sessionCache) forgetUser(user int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, id := range c.byUser[user] {
		delete(c.entries, id)
	}
	delete(c.byUser, user)
	c.gen++
}

// sessionWatcher ends the local streams of sessions that ended.
type sessionWatcher struct {
	hub      *Hub
	cache    *sessionCache // forgets the sessions of each user announced
	db       *sql.DB
	logger   *slog.Logger
	interval time.Duration

	mu    sync.Mutex     // guards users and all
	users map[int64]bool // users announced on sessionsChannel, to check at once
	all   bool           // check every stream at once (see missed)
	wake  chan struct{}
}

func newSessionWatcher(hub *Hub, cache *sessionCache, db *sql.DB, interval time.Duration, logger *slog.Logger) *sessionWatcher {
	return &sessionWatcher{hub: hub, cache: cache, db: db, logger: logger, interval: interval,
		users: make(map[int64]bool), wake: make(chan struct{}, 1)}
}

// noted takes a notification from sessionsChannel. It never waits: the user is
// queued for the next check, if any of their streams is open here (so the queue
// holds at most one entry per local user).
func (sw *sessionWatcher) noted(payload string) {
	var n struct {
		User int64 `json:"user"`
	}
	if err := json.Unmarshal([]byte(payload), &n); err != nil {
		sw.logger.Error("decode session notification", "err", err)
		sw.missed() // whose sessions ended is unknown
		return
	}
	if n.User == 0 {
		sw.missed() // everybody's
		return
	}
	sw.cache.forgetUser(n.User)
	if !sw.hub.hasStreams(n.User) {
		return
	}
	sw.mu.Lock()
	sw.users[n.User] = true
	sw.mu.Unlock()
	wake(sw.wake)
}

// missed is for announcements that may have been lost, or that name nobody in
// particular: the cache forgets every session, and every local stream is checked
// at once.
func (sw *sessionWatcher) missed() {
	sw.cache.clear()
	sw.mu.Lock()
	sw.all = true
	sw.mu.Unlock()
	wake(sw.wake)
}

// sessionCheckParts is how many parts the periodic check of every stream's session
// is split into (by session id), one part every SESSION_CHECK_INTERVAL /
// sessionCheckParts: so no moment of the interval reads every stream's session.
const sessionCheckParts = 16

// run checks the announced users' streams as they come, and every stream every
// interval, a part at a time, until ctx is done.
func (sw *sessionWatcher) run(ctx context.Context) {
	t := time.NewTicker(max(sw.interval/sessionCheckParts, time.Millisecond))
	defer t.Stop()
	part := int64(0)
	for {
		var users []int64 // nil: everyone's
		var sessions []int64
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			sessions = slices.DeleteFunc(sw.hub.streamSessions(nil), func(id int64) bool { return id%sessionCheckParts != part })
			part = (part + 1) % sessionCheckParts
			if len(sessions) == 0 {
				continue
			}
		case <-sw.wake:
			sw.mu.Lock()
			all := sw.all
			for u := range sw.users {
				users = append(users, u)
			}
			clear(sw.users)
			sw.all = false
			sw.mu.Unlock()
			if all {
				users = nil
			} else if len(users) == 0 {
				continue
			}
		}
		if sessions == nil {
			sessions = sw.hub.streamSessions(users)
		}
		if err := sw.check(ctx, sessions); err != nil && ctx.Err() == nil {
			sw.logger.Warn("check stream sessions", "err", err)
		}
	}
}

// check ends the local streams of those of sessions that have ended.
func (sw *sessionWatcher) check(ctx context.Context, sessions []int64) error {
	const chunk = 1000
	for len(sessions) > 0 {
		n := min(len(sessions), chunk)
		ended, err := endedSessions(ctx, sw.db, sessions[:n])
		if err != nil {
			return err
		}
		if len(ended) > 0 {
			sw.hub.endSessionStreams(ended)
		}
		sessions = sessions[n:]
	}
	return nil
}

// endedSessions returns those of sessions that have ended, with why.
func endedSessions(ctx context.Context, db *sql.DB, sessions []int64) (map[int64]string, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	rows, err := db.QueryContext(ctx, `
		SELECT q.id, CASE WHEN s.id IS NULL THEN $2
		                  WHEN s.ended_at IS NOT NULL THEN coalesce(s.end_reason, $3)
		                  ELSE $4 END
		FROM unnest($1::bigint[]) AS q(id) LEFT JOIN sessions s ON s.id = q.id
		WHERE s.id IS NULL OR s.ended_at IS NOT NULL OR s.expires_at <= now()`,
		pq.Array(sessions), endGone, endRevoked, endExpired)
	if err != nil {
		return nil, fmt.Errorf("read sessions: %w", err)
	}
	defer rows.Close()
	ended := make(map[int64]string)
	for rows.Next() {
		var id int64
		var reason string
		if err := rows.Scan(&id, &reason); err != nil {
			return nil, fmt.Errorf("scan session: %w", err)
		}
		ended[id] = reason
	}
	return ended, rows.Err()
}

// streamSessions returns the sessions of the local streams of users (nil: of
// every user), each once.
func (h *Hub) streamSessions(users []int64) []int64 {
	h.mu.RLock()
	defer h.mu.RUnlock()
	seen := make(map[int64]bool)
	add := func(set []*stream) {
		for _, st := range set {
			seen[st.sessionID] = true
		}
	}
	if users == nil {
		for _, set := range h.streams {
			add(set)
		}
	}
	for _, u := range users {
		add(h.streams[u])
	}
	ids := make([]int64, 0, len(seen))
	for id := range seen {
		ids = append(ids, id)
	}
	return ids
}

// endSessionStreams ends the local streams of the ended sessions, each with its
// reason.
func (h *Hub) endSessionStreams(ended map[int64]string) {
	h.mu.RLock()
	defer h.mu.RUnlock()
	for _, set := range h.streams {
		for _, st := range set {
			if reason, ok := ended[st.sessionID]; ok {
				st.endSession(reason)
			}
		}
	}
}

// endSession ends the stream because its session ended; the stream's last words
// are a session_ended event with reason.
func (st *stream) endSession(reason string) {
	st.sessionEnded.CompareAndSwap(nil, &reason)
	st.end()
}

// sessionEndedFrame is the event that closes a stream whose session ended.
func sessionEndedFrame(reason string) []byte {
	data, _ := json.Marshal(struct {
		Reason string `json:"reason"`
	}{reason})
	return namedFrame(0, "session_ended", data)
}
