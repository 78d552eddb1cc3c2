package main

import (
	"context"
	"encoding/json"
	"log/slog"
	"net/http"
	"net/url"
	"testing"
	"time"

	"github.com/lib/pq"
)

// authedRoute is one request to a route that needs a token.
type authedRoute struct {
	method, path string
	body         any
	headers      []string
}

// authedRoutes returns a request to every route that takes a token, the event
// stream included, against conversation conv.
func authedRoutes(conv string) []authedRoute {
	P := "/api/conversations/" + conv
	return []authedRoute{
		{method: "GET", path: "/api/auth_user"},
		{method: "POST", path: "/api/refresh_token"},
		{method: "GET", path: "/api/usernames?search=a"},
		{method: "POST", path: "/api/conversations", body: map[string]string{"username": "nobody"}},
		{method: "GET", path: "/api/conversations"},
		{method: "GET", path: P},
		{method: "GET", path: P + "/other_participant"},
		{method: "POST", path: P + "/messages", body: map[string]string{"content": "after sign-out"}},
		{method: "GET", path: P + "/messages"},
		{method: "POST", path: P + "/read_messages"},
		{method: "POST", path: P + "/typing"},
		{method: "POST", path: "/api/logout"},
		{method: "POST", path: "/api/logout/all"},
		{method: "GET", path: "/api/messages", headers: []string{"Accept: text/event-stream"}},
	}
}

// expectRefused checks that c's token gets 401 (with WWW-Authenticate) on every
// route, the stream with ?token= included, once it is refused on one, which must
// happen within d.
func expectRefused(t *testing.T, c *client, conv string, d time.Duration) {
	t.Helper()
	waitFor(t, d, "the token to be refused on "+c.base, func() bool {
		resp, _ := c.do("GET", "/api/auth_user", nil)
		return resp.StatusCode == http.StatusUnauthorized
	})
	for _, r := range authedRoutes(conv) {
		resp, b := c.do(r.method, r.path, r.body, r.headers...)
		if resp.StatusCode != http.StatusUnauthorized || resp.Header.Get("WWW-Authenticate") == "" {
			t.Errorf("%s %s on %s: got %d %s, want 401 with WWW-Authenticate", r.method, r.path, c.base, resp.StatusCode, b)
		}
	}
	anon := &client{t: t, base: c.base}
	resp, b := anon.do("GET", "/api/messages?token="+url.QueryEscape(c.Token), nil, "Accept: text/event-stream")
	if resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("GET /api/messages?token= on %s: got %d %s, want 401", c.base, resp.StatusCode, b)
	}
}

// expectSessionEnded waits until deadline for s to send session_ended with
// reason, and then to end.
func expectSessionEnded(t *testing.T, name string, s *sseStream, reason string, deadline time.Time) {
	t.Helper()
	for {
		select {
		case ev, ok := <-s.events:
			if !ok {
				t.Fatalf("%s: stream ended without session_ended (%v)", name, s.err)
			}
			if ev.Event != "session_ended" {
				continue
			}
			var data struct{ Reason string }
			if err := json.Unmarshal([]byte(ev.Data), &data); err != nil || data.Reason != reason {
				t.Fatalf("%s: session_ended data %s, want reason %q", name, ev.Data, reason)
			}
			if !s.ended(time.Until(deadline) + time.Second) {
				t.Fatalf("%s: stream still open after session_ended", name)
			}
			return
		case <-time.After(time.Until(deadline)):
			t.Fatalf("%s: no session_ended by the deadline", name)
		}
	}
}

// expectOpen checks that the streams of c still deliver: a message bob sends now
// reaches each of them.
func expectOpen(t *testing.T, bob *client, conv string, streams map[string]*sseStream) {
	t.Helper()
	m := bob.send(conv, "still here?")
	for name, s := range streams {
		for {
			ev := s.next(eventWait)
			if ev.Event == "session_ended" {
				t.Fatalf("%s: got session_ended %s, want the stream to go on", name, ev.Data)
			}
			var got apiMessage
			if ev.Event == "" && json.Unmarshal([]byte(ev.Data), &got) == nil && got.ID == m.ID {
				break
			}
		}
	}
}

// TestLogoutEndsOneSession: after POST /api/logout the token gets 401 on every
// route, at once on the instance that took the sign-out and within a second on
// another, and its streams on both get session_ended and
// close within 5 s; the same person's other session, and its streams, go on.
func TestLogoutEndsOneSession(t *testing.T) {
	t.Parallel()
	forEachBus(t, testLogoutEndsOneSession) // sign-outs travel on PostgreSQL with either
}

func testLogoutEndsOneSession(t *testing.T, bus testBus) {
	a, b := newTestServer(t, bus.env...), newTestServer(t, bus.env...)
	name := uniqueName("leaver")
	phone, laptop := a.login(t, name), a.login(t, name)
	bob := a.newUser(t, "bob")
	conv := bob.startConversation(phone)
	phoneOnA, phoneOnB := phone.stream(""), phone.as(b).stream("")
	laptopOnA, laptopOnB := laptop.stream(""), laptop.as(b).stream("")

	phone.mustDo("POST", "/api/logout", nil, http.StatusNoContent, nil)
	loggedOut := time.Now()
	expectRefused(t, phone, conv.ID, 0)
	expectRefused(t, phone.as(b), conv.ID, time.Until(loggedOut.Add(time.Second)))
	expectSessionEnded(t, "phone on A", phoneOnA, "signed_out", loggedOut.Add(5*time.Second))
	expectSessionEnded(t, "phone on B", phoneOnB, "signed_out", loggedOut.Add(5*time.Second))

	for _, c := range []*client{laptop, laptop.as(b)} {
		c.mustDo("GET", "/api/conversations", nil, http.StatusOK, nil)
		c.mustDo("GET", "/api/usernames?search=b", nil, http.StatusOK, nil)
	}
	expectOpen(t, bob, conv.ID, map[string]*sseStream{"laptop on A": laptopOnA, "laptop on B": laptopOnB})

	// Signing in again starts a new session that works.
	again := b.login(t, name)
	again.mustDo("GET", "/api/auth_user", nil, http.StatusOK, nil)
}

// TestLogoutAllEndsEverySession: POST /api/logout/all ends every session of the
// caller on every instance, and nobody else's.
func TestLogoutAllEndsEverySession(t *testing.T) {
	t.Parallel()
	a, b := newTestServer(t), newTestServer(t)
	name := uniqueName("everywhere")
	s1, s2, s3 := a.login(t, name), a.login(t, name), b.login(t, name)
	bob := a.newUser(t, "bob")
	conv := bob.startConversation(s1)
	streams := map[string]*sseStream{
		"s1 on A": s1.stream(""), "s2 on B": s2.as(b).stream(""), "s3 on B": s3.stream(""), "s3 on A": s3.as(a).stream(""),
	}
	bobStream := bob.as(b).stream("")

	s2.mustDo("POST", "/api/logout/all", nil, http.StatusNoContent, nil)
	loggedOut := time.Now()
	for _, c := range []*client{s1, s2, s3} {
		expectRefused(t, c.as(a), conv.ID, 0)
	}
	for _, c := range []*client{s1, s2, s3} {
		expectRefused(t, c.as(b), conv.ID, time.Until(loggedOut.Add(time.Second)))
	}
	for name, s := range streams {
		expectSessionEnded(t, name, s, "signed_out_everywhere", loggedOut.Add(5*time.Second))
	}
	bob.mustDo("GET", "/api/conversations", nil, http.StatusOK, nil)
	expectOpen(t, bob, conv.ID, map[string]*sseStream{"bob on B": bobStream})
	a.login(t, name).mustDo("GET", "/api/conversations/"+conv.ID, nil, http.StatusOK, nil)
}

// TestDeletedUserTokensRefused: once a user is deleted (in SQL, as an operator
// would), their token gets 401 and their open stream closes.
func TestDeletedUserTokensRefused(t *testing.T) {
	t.Parallel()
	ts := newTestServer(t, "SESSION_CHECK_INTERVAL=1h", "SESSION_CACHE_TTL=1h")
	doomed := ts.newUser(t, "doomed")
	doomed.mustDo("GET", "/api/usernames?search=d", nil, http.StatusOK, nil)
	s := doomed.stream("")
	if _, err := ts.DB.Exec(`DELETE FROM users WHERE id = $1`, doomed.User.ID); err != nil {
		t.Fatalf("delete user: %v", err)
	}
	deleted := time.Now()
	// The cascade's DELETE of the sessions rows announces the user: every
	// instance forgets the sessions at once, however long it caches them.
	waitFor(t, time.Second, "the deleted user's token to be refused", func() bool {
		resp, _ := doomed.do("GET", "/api/usernames?search=d", nil)
		return resp.StatusCode == http.StatusUnauthorized
	})
	doomed.mustDo("GET", "/api/conversations", nil, http.StatusUnauthorized, nil)
	// The stream ends at the check the announcement starts, not at the periodic
	// one (SESSION_CHECK_INTERVAL is an hour here).
	expectSessionEnded(t, "doomed", s, "ended", deleted.Add(5*time.Second))
}

// TestRefreshStopsAtSessionMaxAge: refreshing over and over cannot carry a
// session past SESSION_MAX_AGE; each token expires by the session's end, and
// after it the session is refused.
func TestRefreshStopsAtSessionMaxAge(t *testing.T) {
	t.Parallel()
	const maxAge = 4 * time.Second
	ts := newTestServer(t, "TOKEN_TTL=2s", "SESSION_MAX_AGE="+maxAge.String())
	start := time.Now()
	c := ts.newUser(t, "clinger")
	end := start.Add(maxAge + time.Second) // the token's expiry is rounded to the second
	refreshes := 0
	waitFor(t, 3*maxAge, "refresh to be refused", func() bool {
		var tok struct {
			Token     string
			ExpiresAt time.Time
		}
		resp, b := c.do("POST", "/api/refresh_token", nil)
		if resp.StatusCode == http.StatusUnauthorized {
			return true
		}
		if resp.StatusCode != http.StatusOK || json.Unmarshal(b, &tok) != nil {
			t.Fatalf("refresh: got %d %s", resp.StatusCode, b)
		}
		if tok.ExpiresAt.After(end) {
			t.Fatalf("refresh %d gave a token until %v, past the session's end %v", refreshes, tok.ExpiresAt, end)
		}
		c.Token = tok.Token
		refreshes++
		time.Sleep(200 * time.Millisecond) // the pace of a client that refreshes often
		return false
	})
	if refreshes == 0 || time.Since(start) < maxAge-time.Second {
		t.Fatalf("refresh refused after %v and %d refreshes, want it refused only at the session's end (%v)", time.Since(start), refreshes, maxAge)
	}
	c.mustDo("GET", "/api/auth_user", nil, http.StatusUnauthorized, nil)
}

// TestQueryTokenOnlyOnStream: ?token= opens the stream and is refused with 401
// everywhere else, even next to a good Authorization header.
func TestQueryTokenOnlyOnStream(t *testing.T) {
	t.Parallel()
	ts := newTestServer(t)
	alice, bob := ts.newUser(t, "alice"), ts.newUser(t, "bob")
	conv := alice.startConversation(bob)
	q := "token=" + url.QueryEscape(alice.Token)
	for _, r := range authedRoutes(conv.ID) {
		if r.path == "/api/messages" {
			continue
		}
		sep := "?"
		if u, _ := url.Parse(r.path); u.RawQuery != "" {
			sep = "&"
		}
		anon := &client{t: t, base: ts.URL}
		for _, c := range []*client{anon, alice} { // with the query alone, and with a good header too
			resp, b := c.do(r.method, r.path+sep+q, r.body, r.headers...)
			if resp.StatusCode != http.StatusUnauthorized || resp.Header.Get("WWW-Authenticate") == "" {
				t.Errorf("%s %s?token= (header %v): got %d %s, want 401 with WWW-Authenticate", r.method, r.path, c.Token != "", resp.StatusCode, b)
			}
		}
	}
	alice.mustDo("GET", "/api/auth_user", nil, http.StatusOK, nil) // nothing above ended the session

	ctx, cancel := context.WithTimeout(context.Background(), eventWait)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "GET", ts.URL+"/api/messages?"+q, nil)
	req.Header.Set("Accept", "text/event-stream")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("open stream with ?token=: %v", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != "text/event-stream" {
		t.Fatalf("open stream with ?token=: got %d %s, want 200 text/event-stream", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
}

// TestTooManySessions: signing in once more than MAX_SESSIONS_PER_USER ends the
// oldest session, and only that one.
func TestTooManySessions(t *testing.T) {
	t.Parallel()
	ts := newTestServer(t, "MAX_SESSIONS_PER_USER=3")
	name := uniqueName("many")
	var sessions []*client
	for range 4 {
		sessions = append(sessions, ts.login(t, name))
	}
	sessions[0].mustDo("GET", "/api/auth_user", nil, http.StatusUnauthorized, nil)
	for _, c := range sessions[1:] {
		c.mustDo("GET", "/api/auth_user", nil, http.StatusOK, nil)
	}
	var open int
	if err := ts.DB.QueryRow(`SELECT count(*) FROM sessions WHERE user_id = $1 AND ended_at IS NULL`, sessions[0].User.ID).Scan(&open); err != nil || open != 3 {
		t.Fatalf("open sessions: got %d (%v), want 3", open, err)
	}
}

// BenchmarkAuthenticatedRequest measures a cheap authenticated request end to end
// (GET /api/conversations of a user with none), from parallel clients: run it here
// and on the commit before sessions to see what the session check adds per request
// (go test -run '^$' -bench AuthenticatedRequest -benchtime 5000x).
func BenchmarkAuthenticatedRequest(b *testing.B) {
	ts := newTestServer(b)
	c := ts.newUser(b, "bench")
	b.SetParallelism(4)
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if resp, body := c.do("GET", "/api/conversations", nil); resp.StatusCode != http.StatusOK {
				b.Errorf("got %d %s", resp.StatusCode, body)
				return
			}
		}
	})
}

// BenchmarkSessionCheck measures what authenticate does for each request: parsing
// the token alone (all it did before sessions), parsing it and looking the session
// up, and parsing it and finding the session in the cache; and what the periodic check of streams costs per 1000 streams
// (go test -run '^$' -bench SessionCheck).
func BenchmarkSessionCheck(b *testing.B) {
	ts := newTestServer(b)
	c := ts.newUser(b, "bench")
	cfg, err := loadConfig(func(k string) string { return ts.env[k] })
	if err != nil {
		b.Fatal(err)
	}
	srv, err := newServer(context.Background(), cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		b.Fatal(err)
	}
	defer srv.close()
	req, _ := http.NewRequest("GET", ts.URL+"/api/conversations", nil)
	req.Header.Set("Authorization", "Bearer "+c.Token)
	b.Run("parse only", func(b *testing.B) {
		for b.Loop() {
			if _, err := srv.tokens.parse(c.Token, time.Now()); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("parse and look up", func(b *testing.B) {
		for b.Loop() {
			srv.sessionCache.clear()
			if _, err := srv.checkToken(req.Context(), req, false); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("parse and find in cache", func(b *testing.B) {
		for b.Loop() {
			if _, err := srv.checkToken(req.Context(), req, false); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("streams check per 1000", func(b *testing.B) {
		var ids []int64
		rows, err := ts.DB.Query(`
			INSERT INTO sessions (user_id, expires_at)
			SELECT $1, now() + interval '1 hour' FROM generate_series(1, 1000) RETURNING id`, c.User.ID)
		if err != nil {
			b.Fatal(err)
		}
		for rows.Next() {
			var id int64
			rows.Scan(&id)
			ids = append(ids, id)
		}
		rows.Close()
		for b.Loop() {
			if ended, err := endedSessions(context.Background(), ts.DB, ids); err != nil || len(ended) != 0 {
				b.Fatalf("got %v, %v; want none ended", ended, err)
			}
		}
	})
}

// TestOperatorEndsSessions: sessions an operator ends in SQL (UPDATE, DELETE,
// TRUNCATE) are announced by the table's trigger: with a session cache and a
// periodic stream check far longer than the test, their tokens are refused within
// a second and their streams end at once.
func TestOperatorEndsSessions(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name, sql, reason string
		private           bool // TRUNCATE ends every session of the database
	}{
		{"update", `UPDATE sessions SET ended_at = now(), end_reason = 'revoked' WHERE user_id = $1`, "revoked", false},
		{"shorten", `UPDATE sessions SET expires_at = now() WHERE user_id = $1`, "expired", false},
		{"delete", `DELETE FROM sessions WHERE user_id = $1`, "ended", false},
		{"truncate", `TRUNCATE sessions`, "ended", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			env := []string{"SESSION_CHECK_INTERVAL=1h", "SESSION_CACHE_TTL=1h"}
			if tc.private {
				env = append(env, "DATABASE_URL="+privateDatabase(t))
			}
			ts := newTestServer(t, env...)
			c := ts.newUser(t, "suspect")
			c.mustDo("GET", "/api/conversations", nil, http.StatusOK, nil) // cached now
			s := c.stream("")
			args := []any{c.User.ID}
			if tc.private {
				args = nil
			}
			if _, err := ts.DB.Exec(tc.sql, args...); err != nil {
				t.Fatalf("end sessions: %v", err)
			}
			ended := time.Now()
			waitFor(t, time.Second, "the ended session's token to be refused", func() bool {
				resp, _ := c.do("GET", "/api/conversations", nil)
				return resp.StatusCode == http.StatusUnauthorized
			})
			expectSessionEnded(t, "suspect", s, tc.reason, ended.Add(5*time.Second))
		})
	}
}

// TestSessionCache: an entry is trusted for the cache's TTL and before the
// session's end only, for its own user only; a lookup that began before a clear
// stores nothing; and the cache never holds more than maxCachedSessions.
func TestSessionCache(t *testing.T) {
	t.Parallel()
	const ttl = 30 * time.Second
	c := newSessionCache(ttl)
	now := time.Now()
	ends := now.Add(time.Hour)
	_, gen, _ := c.get(1, 10, now)
	c.put(1, 10, ends, now, gen)
	for _, tc := range []struct {
		name    string
		session int64
		user    int64
		at      time.Time
		want    bool
	}{
		{"fresh", 1, 10, now.Add(ttl / 2), true},
		{"stale", 1, 10, now.Add(ttl), false},
		{"other user", 1, 11, now, false},
		{"other session", 2, 10, now, false},
	} {
		if _, _, ok := c.get(tc.session, tc.user, tc.at); ok != tc.want {
			t.Errorf("%s: got %v, want %v", tc.name, ok, tc.want)
		}
	}
	c.put(3, 10, now.Add(time.Millisecond), now, gen)
	if _, _, ok := c.get(3, 10, now.Add(2*time.Millisecond)); ok {
		t.Errorf("got a session past its end")
	}

	_, gen, _ = c.get(4, 10, now)
	c.clear()
	c.put(4, 10, ends, now, gen) // the answer of a lookup that raced with the clear
	if _, _, ok := c.get(4, 10, now); ok {
		t.Errorf("a lookup from before a clear was stored")
	}
	if _, _, ok := c.get(1, 10, now); ok {
		t.Errorf("clear kept an entry")
	}

	// Forgetting one user's sessions keeps the others'.
	_, gen, _ = c.get(0, 0, now)
	c.put(5, 10, ends, now, gen)
	c.put(6, 11, ends, now, gen)
	c.forgetUser(10)
	if _, _, ok := c.get(5, 10, now); ok {
		t.Errorf("forgetUser kept the user's session")
	}
	if _, _, ok := c.get(6, 11, now); !ok {
		t.Errorf("forgetUser dropped another user's session")
	}

	_, gen, _ = c.get(0, 0, now)
	for i := range int64(maxCachedSessions + 10) {
		c.put(i+1, 10, ends, now, gen)
	}
	if n := len(c.entries); n > maxCachedSessions {
		t.Errorf("cache holds %d entries, want at most %d", n, maxCachedSessions)
	}
	if _, _, ok := c.get(maxCachedSessions+10, 10, now); !ok {
		t.Errorf("the newest entry is not cached")
	}

	// The list by user follows every way an entry goes: forgetting a user after
	// the cache was full forgets all their sessions, and only theirs.
	_, gen, _ = c.get(0, 0, now)
	c.put(1, 11, ends, now, gen)
	c.forgetUser(10)
	if n := len(c.entries); n != 1 {
		t.Errorf("after forgetting user 10: %d entries, want user 11's one", n)
	}
	if _, _, ok := c.get(1, 11, now); !ok {
		t.Errorf("forgetUser(10) dropped user 11's session")
	}
	_, gen, _ = c.get(0, 0, now) // forgetUser moved gen on
	c.put(1, 12, ends, now, gen) // the same session id, another user's now
	c.forgetUser(11)
	if _, _, ok := c.get(1, 12, now); !ok {
		t.Errorf("forgetUser(11) dropped a session that is user 12's now")
	}
	for user, ids := range c.byUser {
		for _, id := range ids {
			if e, ok := c.entries[id]; !ok || e.userID != user {
				t.Errorf("byUser[%d] lists session %d, which is not theirs in entries", user, id)
			}
		}
	}
}

// TestCleanUpAnnouncesNothing: deleting sessions that had already ended or
// expired (the hourly clean-up) announces nothing, so it does not make every
// instance forget its cache; deleting an open one does.
func TestCleanUpAnnouncesNothing(t *testing.T) {
	t.Parallel()
	url := privateDatabase(t)
	ts := newTestServer(t, "DATABASE_URL="+url)
	l := testListener(t, url, sessionsChannel)
	ended, expired, open := ts.newUser(t, "ended"), ts.newUser(t, "expired"), ts.newUser(t, "open")
	ended.mustDo("POST", "/api/logout", nil, http.StatusNoContent, nil)
	if n := notifications(l); n != 1 {
		t.Fatalf("sign-out: %d announcements, want 1", n)
	}
	// Moving the hard end is itself announced; what matters is the delete after it.
	mustExec(t, ts.DB, `UPDATE sessions SET expires_at = now() - interval '1 second' WHERE user_id = $1`, expired.User.ID)
	if n := notifications(l); n != 1 {
		t.Fatalf("expiry moved: %d announcements, want 1", n)
	}
	mustExec(t, ts.DB, `DELETE FROM sessions WHERE user_id = ANY($1)`, pq.Array([]int64{ended.User.ID, expired.User.ID}))
	if n := notifications(l); n != 0 {
		t.Fatalf("deleting ended and expired sessions: %d announcements, want none", n)
	}
	mustExec(t, ts.DB, `DELETE FROM sessions WHERE user_id = $1`, open.User.ID)
	if n := notifications(l); n != 1 {
		t.Fatalf("deleting an open session: %d announcements, want 1", n)
	}
}
