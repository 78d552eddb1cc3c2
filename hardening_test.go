package main

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// privateDatabase creates an empty database for one test (or fuzz target) on the
// test run's cluster and returns its URL, so that the test can assert on whole-table
// row counts while other tests run. It is dropped when the test ends, after the
// servers started later by the test (cleanups run last-in, first-out).
func privateDatabase(t testing.TB) string {
	t.Helper()
	admin, err := sql.Open("postgres", testDatabaseURL)
	if err != nil {
		t.Fatalf("open admin database: %v", err)
	}
	name := "messenger_h_" + randomHex(6)
	if _, err := admin.Exec(`CREATE DATABASE ` + name); err != nil {
		admin.Close()
		t.Fatalf("create database: %v", err)
	}
	t.Cleanup(func() {
		if _, err := admin.Exec(`DROP DATABASE IF EXISTS ` + name + ` WITH (FORCE)`); err != nil {
			t.Errorf("drop database %s: %v", name, err)
		}
		admin.Close()
	})
	u, err := url.Parse(testDatabaseURL)
	if err != nil {
		t.Fatalf("parse test database URL: %v", err)
	}
	u.Path = "/" + name
	return u.String()
}

// dbFingerprint sums up everything a request could change: the row count of every
// table, and the counters that change in place (event sequences, unread counts,
// read marks). Two equal fingerprints mean nothing was written in between.
func dbFingerprint(t testing.TB, db *sql.DB) string {
	t.Helper()
	var v [10]int64
	err := db.QueryRow(`SELECT
		(SELECT count(*) FROM users), (SELECT coalesce(sum(event_seq), 0) FROM users),
		(SELECT count(*) FROM conversations), (SELECT count(*) FROM participants),
		(SELECT coalesce(sum(unread_count), 0) FROM participants),
		(SELECT count(messages_read_at) FROM participants),
		(SELECT count(*) FROM messages), (SELECT count(*) FROM events),
		(SELECT count(*) FROM idempotency_keys), (SELECT count(*) FROM settings)`).Scan(
		&v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6], &v[7], &v[8], &v[9])
	if err != nil {
		t.Fatalf("database fingerprint: %v", err)
	}
	return fmt.Sprintf("users=%d event_seq=%d conversations=%d participants=%d unread=%d reads=%d messages=%d events=%d idempotency_keys=%d settings=%d",
		v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9])
}

// rawResponse is a response read whole.
type rawResponse struct {
	status int
	header http.Header
	body   []byte
}

// rawClient bounds every request, so that a server that hangs fails the test
// instead of stalling it.
var rawClient = &http.Client{
	Timeout: 15 * time.Second,
	// Redirects are part of what is tested, not followed.
	CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
}

// rawDo sends exactly the request described (nothing is added: no Content-Type, no
// token) and reads the whole answer. It is safe to call from any goroutine.
func rawDo(method, url string, body []byte, header http.Header) (rawResponse, error) {
	return rawDoWith(rawClient, method, url, body, header)
}

// rawDoWith is rawDo with another client (another timeout).
func rawDoWith(c *http.Client, method, url string, body []byte, header http.Header) (rawResponse, error) {
	var r io.Reader
	if body != nil {
		r = bytes.NewReader(body)
	}
	req, err := http.NewRequest(method, url, r)
	if err != nil {
		return rawResponse{}, err
	}
	for k, vs := range header {
		req.Header[k] = vs
	}
	resp, err := c.Do(req)
	if err != nil {
		return rawResponse{}, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return rawResponse{}, fmt.Errorf("read body: %w", err)
	}
	return rawResponse{status: resp.StatusCode, header: resp.Header, body: b}, nil
}

// mustRaw is rawDo for the test goroutine.
func mustRaw(t testing.TB, method, url string, body []byte, header http.Header) rawResponse {
	t.Helper()
	res, err := rawDo(method, url, body, header)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	return res
}

// jsonHeader returns a header with Content-Type: application/json, the Bearer
// token (unless empty) and the extra "Name: value" pairs.
func jsonHeader(token string, extra ...string) http.Header {
	h := http.Header{"Content-Type": {"application/json"}}
	if token != "" {
		h.Set("Authorization", "Bearer "+token)
	}
	for _, kv := range extra {
		k, v, _ := strings.Cut(kv, ":")
		h.Set(strings.TrimSpace(k), strings.TrimSpace(v))
	}
	return h
}

// errorBodyProblem says what is wrong with an error response, or "" if nothing:
// it must be JSON {"error": "…"} (with an optional "errors" object) and carry no
// internal detail.
func errorBodyProblem(res rawResponse) string {
	if res.status < 400 {
		return ""
	}
	if ct := res.header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
		return fmt.Sprintf("Content-Type %q, want application/json", ct)
	}
	var e struct {
		Error  *string           `json:"error"`
		Errors map[string]string `json:"errors"`
	}
	if err := json.Unmarshal(res.body, &e); err != nil || e.Error == nil || *e.Error == "" {
		return fmt.Sprintf("body %.200q, want {\"error\": …}", res.body)
	}
	for _, leak := range []string{"pq:", "sql:", "SQLSTATE", "goroutine ", "panic", ".go:"} {
		if strings.Contains(string(res.body), leak) {
			return fmt.Sprintf("body %.200q leaks internal detail %q", res.body, leak)
		}
	}
	return ""
}

// devSigner returns a token signer with ts's development key (from its settings
// table) and ttl, to forge tokens the server accepts as its own: expired ones, and
// ones for users that do not exist.
func devSigner(t testing.TB, ts *testServer, ttl time.Duration) *tokenSigner {
	t.Helper()
	var key string
	if err := ts.DB.QueryRow(`SELECT value FROM settings WHERE name = 'dev_token_key'`).Scan(&key); err != nil {
		t.Fatalf("read development token key: %v", err)
	}
	return &tokenSigner{key: []byte(key), ttl: ttl}
}

// mustParseToken returns what a token the server issued says.
func mustParseToken(t testing.TB, signer *tokenSigner, token string) tokenClaims {
	t.Helper()
	c, err := signer.parse(token, time.Now())
	if err != nil {
		t.Fatalf("parse token: %v", err)
	}
	return c
}

// flipBase64Char returns s with the base64url character at i replaced by one whose
// top bit differs, which is always significant, so the decoded bytes change.
func flipBase64Char(s string, i int) string {
	const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
	j := strings.IndexByte(alphabet, s[i])
	return s[:i] + string(alphabet[(j+32)%64]) + s[i+1:]
}

// TestHardeningBadRequests sends every endpoint requests it must refuse, and checks
// each answer's status, that it is a JSON error, and that the database is unchanged.
func TestHardeningBadRequests(t *testing.T) {
	t.Parallel()
	ts := newTestServer(t, "DATABASE_URL="+privateDatabase(t))
	alice, bob := ts.newUser(t, "alice"), ts.newUser(t, "bob")
	carol, dave := ts.newUser(t, "carol"), ts.newUser(t, "dave")
	conv := alice.startConversation(bob)
	conv2 := alice.startConversation(carol)
	foreign := carol.startConversation(dave)
	bob.send(conv.ID, "something for alice to read")
	carol.send(foreign.ID, "not for alice")
	alice.mustDo("POST", "/api/conversations/"+conv.ID+"/messages", map[string]string{"content": "first"},
		http.StatusCreated, nil, "Idempotency-Key: key-1")

	signer := devSigner(t, ts, time.Hour)
	aliceSession := mustParseToken(t, signer, alice.Token).sessionID
	expired, _ := (&tokenSigner{key: signer.key, ttl: -time.Hour}).issue(alice.User.ID, aliceSession, time.Now(), time.Time{})
	// Well-signed tokens for a user and a session that do not exist, for alice with
	// a session that does not exist, and for alice with bob's session.
	ghost, _ := signer.issue(1<<40, 1<<40, time.Now(), time.Time{})
	noSession, _ := signer.issue(alice.User.ID, 1<<40, time.Now(), time.Time{})
	otherSession, _ := signer.issue(alice.User.ID, mustParseToken(t, signer, bob.Token).sessionID, time.Now(), time.Time{})
	forged, _ := (&tokenSigner{key: []byte(strings.Repeat("f", 32)), ttl: time.Hour}).issue(alice.User.ID, aliceSession, time.Now(), time.Time{})
	// A well-signed token in the format from before sessions: user.expiry.
	oldPayload := fmt.Sprintf("%d.%d", alice.User.ID, time.Now().Add(time.Hour).Unix())
	oldFormat := base64.RawURLEncoding.EncodeToString([]byte(oldPayload)) + "." +
		base64.RawURLEncoding.EncodeToString(signer.sign([]byte(oldPayload)))
	_, aliceSig, _ := strings.Cut(alice.Token, ".")
	bobPayload, _, _ := strings.Cut(bob.Token, ".")
	swapped := bobPayload + "." + aliceSig // bob's payload under alice's signature
	flippedSig := flipBase64Char(alice.Token, len(alice.Token)-5)
	flippedPayload := flipBase64Char(alice.Token, 0)

	long := strings.Repeat("a", maxBodyBytes)
	runes := func(r string, n int) string { return strings.Repeat(r, n) }
	content := func(s string) string { b, _ := json.Marshal(map[string]string{"content": s}); return string(b) }
	username := func(s string) string { b, _ := json.Marshal(map[string]string{"username": s}); return string(b) }
	huge := strings.Repeat("9", 30000) // a query parameter of 30 kB, under the header limit

	const (
		none   = "none"             // no Authorization header
		noBody = "\x00no body\x00"  // send no body at all
		ctJSON = "application/json" // the default Content-Type of a case with a body
	)
	type badRequest struct {
		name   string
		method string
		path   string
		body   string   // sent as it is; "" sends none
		ctype  string   // Content-Type; "" is application/json when there is a body, none is none
		auth   string   // Authorization; "" is alice's Bearer token, none is none
		header []string // more "Name: value" pairs
		want   int
	}
	P := "/api/conversations/" + conv.ID
	cases := []badRequest{
		// POST /api/login
		{name: "login body too large", method: "POST", path: "/api/login", body: username(long), want: 413},
		{name: "login text/plain", method: "POST", path: "/api/login", body: username("jane"), ctype: "text/plain", want: 415},
		{name: "login no content type", method: "POST", path: "/api/login", body: username("jane"), ctype: none, want: 415},
		{name: "login form", method: "POST", path: "/api/login", body: "username=jane", ctype: "application/x-www-form-urlencoded", want: 415},
		{name: "login bad media type", method: "POST", path: "/api/login", body: username("jane"), ctype: "application/json; charset", want: 415},
		{name: "login malformed", method: "POST", path: "/api/login", body: `{"username":`, want: 400},
		{name: "login empty body", method: "POST", path: "/api/login", ctype: ctJSON, want: 400},
		{name: "login wrong type", method: "POST", path: "/api/login", body: `{"username":["jane"]}`, want: 400},
		{name: "login number", method: "POST", path: "/api/login", body: `{"username":5}`, want: 400},
		{name: "login not an object", method: "POST", path: "/api/login", body: `"jane"`, want: 400},
		{name: "login two values", method: "POST", path: "/api/login", body: `{"username":"a"}{"username":"b"}`, want: 400},
		{name: "login invalid UTF-8", method: "POST", path: "/api/login", body: "{\"username\":\"ja\xffne\"}", want: 422},
		{name: "login invalid UTF-8 outside strings", method: "POST", path: "/api/login", body: "{\"username\":\"jane\"}\xff", want: 422},
		{name: "login space in name", method: "POST", path: "/api/login", body: username("jane doe"), want: 422},
		{name: "login name too long", method: "POST", path: "/api/login", body: username(runes("a", 40)), want: 422},
		{name: "login empty name", method: "POST", path: "/api/login", body: username(""), want: 422},
		{name: "login NUL in name", method: "POST", path: "/api/login", body: username("jane\x00"), want: 422},
		{name: "login non-ASCII name", method: "POST", path: "/api/login", body: username("jäne"), want: 422},
		{name: "login GET", method: "GET", path: "/api/login", want: 404},

		// POST /api/conversations
		{name: "conversation body too large", method: "POST", path: "/api/conversations", body: username(long), want: 413},
		{name: "conversation text/plain", method: "POST", path: "/api/conversations", body: username(bob.User.Username), ctype: "text/plain", want: 415},
		{name: "conversation malformed", method: "POST", path: "/api/conversations", body: `{"username"`, want: 400},
		{name: "conversation wrong type", method: "POST", path: "/api/conversations", body: `{"username":true}`, want: 400},
		{name: "conversation invalid UTF-8", method: "POST", path: "/api/conversations", body: "{\"username\":\"\xc0\xaf\"}", want: 422},
		{name: "conversation bad username", method: "POST", path: "/api/conversations", body: username("no/such"), want: 422},
		{name: "conversation unknown user", method: "POST", path: "/api/conversations", body: username("nobody_" + randomHex(4)), want: 404},
		{name: "conversation with yourself", method: "POST", path: "/api/conversations", body: username(alice.User.Username), want: 403},
		{name: "conversation no token", method: "POST", path: "/api/conversations", body: username(bob.User.Username), auth: none, want: 401},
		{name: "conversation ghost token", method: "POST", path: "/api/conversations", body: username(bob.User.Username), auth: "Bearer " + ghost, want: 401},

		// POST /api/conversations/:id/messages
		{name: "send body too large", method: "POST", path: P + "/messages", body: content(long), want: 413},
		{name: "send text/plain", method: "POST", path: P + "/messages", body: content("hi"), ctype: "text/plain", want: 415},
		{name: "send no content type", method: "POST", path: P + "/messages", body: content("hi"), ctype: none, want: 415},
		{name: "send malformed", method: "POST", path: P + "/messages", body: `{"content":"hi"`, want: 400},
		{name: "send raw newline in string", method: "POST", path: P + "/messages", body: "{\"content\":\"a\nb\"}", want: 400},
		{name: "send number", method: "POST", path: P + "/messages", body: `{"content":42}`, want: 400},
		{name: "send object", method: "POST", path: P + "/messages", body: `{"content":{"text":"hi"}}`, want: 400},
		{name: "send array", method: "POST", path: P + "/messages", body: `["hi"]`, want: 400},
		{name: "send empty body", method: "POST", path: P + "/messages", ctype: ctJSON, want: 400},
		{name: "send invalid UTF-8", method: "POST", path: P + "/messages", body: "{\"content\":\"caf\xe9\"}", want: 422},
		{name: "send overlong UTF-8", method: "POST", path: P + "/messages", body: "{\"content\":\"\xc0\xaf\"}", want: 422},
		{name: "send UTF-8 surrogate", method: "POST", path: P + "/messages", body: "{\"content\":\"\xed\xa0\x80\"}", want: 422},
		{name: "send NUL", method: "POST", path: P + "/messages", body: content("a\x00b"), want: 422},
		{name: "send BEL", method: "POST", path: P + "/messages", body: content("ring\x07"), want: 422},
		{name: "send ESC", method: "POST", path: P + "/messages", body: content("\x1b[31mred"), want: 422},
		{name: "send DEL", method: "POST", path: P + "/messages", body: content("a\x7f"), want: 422},
		{name: "send C1 control", method: "POST", path: P + "/messages", body: content("a\u009bb"), want: 422},
		{name: "send empty", method: "POST", path: P + "/messages", body: content(""), want: 422},
		{name: "send whitespace only", method: "POST", path: P + "/messages", body: content(" \t\r\n  \n\u00a0\u3000 "), want: 422},
		{name: "send null content", method: "POST", path: P + "/messages", body: `{"content":null}`, want: 422},
		{name: "send no content field", method: "POST", path: P + "/messages", body: `{}`, want: 422},
		{name: "send 481 runes", method: "POST", path: P + "/messages", body: content(runes("a", 481)), want: 422},
		{name: "send 481 two-byte runes", method: "POST", path: P + "/messages", body: content(runes("é", 481)), want: 422},
		{name: "send 481 four-byte runes", method: "POST", path: P + "/messages", body: content(runes("😀", 481)), want: 422},
		{name: "send 481 runes across lines", method: "POST", path: P + "/messages", body: content(runes("a", 240) + "\n\n\n" + runes("b", 240)), want: 422},
		{name: "send idempotency key too long", method: "POST", path: P + "/messages", body: content("hi"), header: []string{"Idempotency-Key: " + runes("k", 256)}, want: 422},
		{name: "send idempotency key empty", method: "POST", path: P + "/messages", body: content("hi"), header: []string{"Idempotency-Key:"}, want: 422},
		{name: "send idempotency key not ASCII", method: "POST", path: P + "/messages", body: content("hi"), header: []string{"Idempotency-Key: clé"}, want: 422},
		{name: "send idempotency key reused for other content", method: "POST", path: P + "/messages", body: content("second"), header: []string{"Idempotency-Key: key-1"}, want: 422},
		{name: "send idempotency key reused in other conversation", method: "POST", path: "/api/conversations/" + conv2.ID + "/messages", body: content("first"), header: []string{"Idempotency-Key: key-1"}, want: 422},
		{name: "send no token", method: "POST", path: P + "/messages", body: content("hi"), auth: none, want: 401},
		{name: "send ghost token", method: "POST", path: P + "/messages", body: content("hi"), auth: "Bearer " + ghost, want: 401},

		// Cursors and oversized query parameters.
		{name: "conversations before=abc", method: "GET", path: "/api/conversations?before=abc", want: 400},
		{name: "conversations before=0", method: "GET", path: "/api/conversations?before=0", want: 400},
		{name: "conversations before=-1", method: "GET", path: "/api/conversations?before=-1", want: 400},
		{name: "conversations before=1.5", method: "GET", path: "/api/conversations?before=1.5", want: 400},
		{name: "conversations before=+1", method: "GET", path: "/api/conversations?before=%2B" + conv.ID, want: 400},
		{name: "conversations before=2^63", method: "GET", path: "/api/conversations?before=9223372036854775808", want: 400},
		{name: "conversations before=NUL", method: "GET", path: "/api/conversations?before=%00", want: 400},
		{name: "conversations before unknown", method: "GET", path: "/api/conversations?before=9223372036854775807", want: 400},
		{name: "conversations before foreign", method: "GET", path: "/api/conversations?before=" + foreign.ID, want: 400},
		{name: "conversations before oversized", method: "GET", path: "/api/conversations?before=" + huge, want: 400},
		{name: "messages before=abc", method: "GET", path: P + "/messages?before=abc", want: 400},
		{name: "messages before=0", method: "GET", path: P + "/messages?before=0", want: 400},
		{name: "messages before=-5", method: "GET", path: P + "/messages?before=-5", want: 400},
		{name: "messages before=1e3", method: "GET", path: P + "/messages?before=1e3", want: 400},
		{name: "messages before oversized", method: "GET", path: P + "/messages?before=" + huge, want: 400},
		{name: "usernames search oversized", method: "GET", path: "/api/usernames?search=" + huge, want: 200},
		{name: "usernames search pattern", method: "GET", path: "/api/usernames?search=%25%5F%5C", want: 200},

		// GET /api/messages
		{name: "stream without Accept", method: "GET", path: "/api/messages", want: 406},
		{name: "stream Accept JSON", method: "GET", path: "/api/messages", header: []string{"Accept: application/json"}, want: 406},
		{name: "stream bad Last-Event-ID", method: "GET", path: "/api/messages", header: []string{"Accept: text/event-stream", "Last-Event-ID: abc"}, want: 400},
		{name: "stream negative Last-Event-ID", method: "GET", path: "/api/messages", header: []string{"Accept: text/event-stream", "Last-Event-ID: -1"}, want: 400},
		{name: "stream bad last_event_id", method: "GET", path: "/api/messages?last_event_id=1e9", header: []string{"Accept: text/event-stream"}, want: 400},
		{name: "stream no token", method: "GET", path: "/api/messages", auth: none, header: []string{"Accept: text/event-stream"}, want: 401},
		{name: "stream bad query token", method: "GET", path: "/api/messages?token=garbage", auth: none, header: []string{"Accept: text/event-stream"}, want: 401},
		{name: "stream expired query token", method: "GET", path: "/api/messages?token=" + expired, auth: none, header: []string{"Accept: text/event-stream"}, want: 401},
		{name: "stream ghost token", method: "GET", path: "/api/messages", auth: "Bearer " + ghost, header: []string{"Accept: text/event-stream"}, want: 401},

		// Tokens.
		{name: "token missing", method: "GET", path: "/api/auth_user", auth: none, want: 401},
		{name: "token basic auth", method: "GET", path: "/api/auth_user", auth: "Basic YWxpY2U6c2VjcmV0", want: 401},
		{name: "token bearer without token", method: "GET", path: "/api/auth_user", auth: "Bearer", want: 401},
		{name: "token bearer blank", method: "GET", path: "/api/auth_user", auth: "Bearer    ", want: 401},
		{name: "token garbage", method: "GET", path: "/api/auth_user", auth: "Bearer garbage", want: 401},
		{name: "token two dots", method: "GET", path: "/api/auth_user", auth: "Bearer " + alice.Token + ".x", want: 401},
		{name: "token empty parts", method: "GET", path: "/api/auth_user", auth: "Bearer .", want: 401},
		{name: "token oversized", method: "GET", path: "/api/auth_user", auth: "Bearer " + runes("A", 4000), want: 401},
		{name: "token forged", method: "GET", path: "/api/auth_user", auth: "Bearer " + forged, want: 401},
		{name: "token expired", method: "GET", path: "/api/auth_user", auth: "Bearer " + expired, want: 401},
		{name: "token expired in query", method: "GET", path: "/api/auth_user?token=" + expired, auth: none, want: 401},
		{name: "token payload swapped", method: "GET", path: "/api/auth_user", auth: "Bearer " + swapped, want: 401},
		{name: "token signature changed", method: "GET", path: "/api/auth_user", auth: "Bearer " + flippedSig, want: 401},
		{name: "token payload changed", method: "GET", path: "/api/auth_user", auth: "Bearer " + flippedPayload, want: 401},
		{name: "token ghost user", method: "GET", path: "/api/auth_user", auth: "Bearer " + ghost, want: 401},
		{name: "token ghost refresh", method: "POST", path: "/api/refresh_token", auth: "Bearer " + ghost, want: 401},
		{name: "token expired refresh", method: "POST", path: "/api/refresh_token", auth: "Bearer " + expired, want: 401},
		{name: "token expired send", method: "POST", path: P + "/messages", body: content("hi"), auth: "Bearer " + expired, want: 401},
		{name: "token expired read", method: "POST", path: P + "/read_messages", auth: "Bearer " + expired, want: 401},
		{name: "token bad header beats good query", method: "GET", path: "/api/auth_user?token=" + alice.Token, auth: "Bearer garbage", want: 401},
		{name: "token no such session", method: "GET", path: "/api/auth_user", auth: "Bearer " + noSession, want: 401},
		{name: "token another user's session", method: "GET", path: "/api/auth_user", auth: "Bearer " + otherSession, want: 401},
		{name: "token from before sessions", method: "GET", path: "/api/auth_user", auth: "Bearer " + oldFormat, want: 401},
		{name: "token from before sessions on the stream", method: "GET", path: "/api/messages?token=" + oldFormat, auth: none, header: []string{"Accept: text/event-stream"}, want: 401},
		{name: "token no such session refresh", method: "POST", path: "/api/refresh_token", auth: "Bearer " + noSession, want: 401},
		{name: "logout no token", method: "POST", path: "/api/logout", auth: none, want: 401},
		{name: "logout all no token", method: "POST", path: "/api/logout/all", auth: none, want: 401},
		{name: "logout ghost token", method: "POST", path: "/api/logout", auth: "Bearer " + ghost, want: 401},
		{name: "logout all in query", method: "POST", path: "/api/logout/all?token=" + alice.Token, auth: none, want: 401},
		{name: "logout GET", method: "GET", path: "/api/logout", want: 404},

		// Routes that do not exist.
		{name: "unknown API path", method: "GET", path: "/api/nope", want: 404},
		{name: "API root", method: "GET", path: "/api", want: 404},
		{name: "unknown sub-path", method: "POST", path: P + "/nope", want: 404},
		{name: "wrong method", method: "DELETE", path: P, want: 404},
		{name: "PUT messages", method: "PUT", path: P + "/messages", body: content("hi"), want: 404},
		{name: "POST web client", method: "POST", path: "/", body: content("hi"), want: 405},
	}

	// Every sub-path of a conversation answers 404 for ids that are not numbers,
	// not positive, too large, unknown, or somebody else's conversation.
	subPaths := []struct{ method, suffix, body string }{
		{"GET", "", ""},
		{"GET", "/other_participant", ""},
		{"POST", "/messages", content("hi")},
		{"GET", "/messages", ""},
		{"POST", "/read_messages", ""},
		{"POST", "/typing", ""},
	}
	for _, id := range []struct{ name, id string }{
		{"non-numeric", "abc"},
		{"zero", "0"},
		{"negative", "-" + conv.ID},
		{"plus sign", "%2B" + conv.ID},
		{"leading zero", "0" + conv.ID},
		{"decimal", conv.ID + ".0"},
		{"exponent", "1e1"},
		{"hex", "0x" + conv.ID},
		{"space", "%20" + conv.ID},
		{"NUL", conv.ID + "%00"},
		{"empty", ""},
		{"2^63", "9223372036854775808"},
		{"huge", strings.Repeat("9", 40)},
		{"unknown", "9223372036854775807"},
		{"foreign", foreign.ID},
	} {
		for _, sp := range subPaths {
			if id.id == "" && sp.suffix == "" {
				continue // "/api/conversations/" is the list, with a trailing slash
			}
			cases = append(cases, badRequest{
				name:   fmt.Sprintf("%s id %s%s", id.name, sp.method, sp.suffix),
				method: sp.method, path: "/api/conversations/" + id.id + sp.suffix, body: sp.body, want: 404,
			})
		}
	}

	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			h := http.Header{}
			var body []byte
			if tc.body != "" {
				body = []byte(tc.body)
			}
			switch {
			case tc.ctype == none:
			case tc.ctype != "":
				h.Set("Content-Type", tc.ctype)
			case body != nil:
				h.Set("Content-Type", ctJSON)
			}
			switch tc.auth {
			case none:
			case "":
				h.Set("Authorization", "Bearer "+alice.Token)
			default:
				h.Set("Authorization", tc.auth)
			}
			for _, kv := range tc.header {
				k, v, _ := strings.Cut(kv, ":")
				h.Set(k, strings.TrimSpace(v))
			}
			before := dbFingerprint(t, ts.DB)
			res := mustRaw(t, tc.method, ts.URL+tc.path, body, h)
			if res.status != tc.want {
				t.Errorf("got status %d, want %d; body %.300s", res.status, tc.want, res.body)
			}
			if p := errorBodyProblem(res); p != "" {
				t.Errorf("error body: %s", p)
			}
			if res.status == http.StatusUnauthorized && res.header.Get("WWW-Authenticate") == "" {
				t.Errorf("401 without WWW-Authenticate")
			}
			if after := dbFingerprint(t, ts.DB); after != before {
				t.Errorf("database changed:\n got %s\nwant %s", after, before)
			}
		})
	}

	// A request line over the server's header limit is refused by net/http itself,
	// before any handler (so its body is net/http's plain text), and never with a 5xx.
	t.Run("URL over the header limit", func(t *testing.T) {
		before := dbFingerprint(t, ts.DB)
		res := mustRaw(t, "GET", ts.URL+"/api/usernames?search="+strings.Repeat("a", 100<<10), nil, jsonHeader(alice.Token))
		if res.status != http.StatusRequestHeaderFieldsTooLarge {
			t.Errorf("got status %d, want 431", res.status)
		}
		if after := dbFingerprint(t, ts.DB); after != before {
			t.Errorf("database changed:\n got %s\nwant %s", after, before)
		}
	})

	// The limits themselves are allowed: 480 runes of any width.
	t.Run("480 runes", func(t *testing.T) {
		for _, r := range []string{"a", "é", "😀"} {
			var m apiMessage
			alice.mustDo("POST", P+"/messages", map[string]string{"content": "  " + runes(r, 480) + " \n\n "}, http.StatusCreated, &m)
			if m.Content != runes(r, 480) {
				t.Errorf("got content of %d bytes, want 480 × %q", len(m.Content), r)
			}
		}
	})
}

// TestHardeningIdempotency checks that a retried send returns the first message
// without writing anything, and that concurrent retries create one message.
func TestHardeningIdempotency(t *testing.T) {
	t.Parallel()
	ts := newTestServer(t, "DATABASE_URL="+privateDatabase(t))
	alice, bob := ts.newUser(t, "alice"), ts.newUser(t, "bob")
	conv := alice.startConversation(bob)
	endpoint := ts.URL + "/api/conversations/" + conv.ID + "/messages"
	body := []byte(`{"content":"  once  upon a time "}`)

	first := mustRaw(t, "POST", endpoint, body, jsonHeader(alice.Token, "Idempotency-Key: retry-1"))
	if first.status != http.StatusCreated {
		t.Fatalf("first send: got %d %s, want 201", first.status, first.body)
	}
	before := dbFingerprint(t, ts.DB)
	for _, b := range [][]byte{body, []byte(`{"content":"once upon a time"}`)} { // the same content once normalized
		retry := mustRaw(t, "POST", endpoint, b, jsonHeader(alice.Token, "Idempotency-Key: retry-1"))
		if retry.status != http.StatusOK || !bytes.Equal(retry.body, first.body) {
			t.Fatalf("retry: got %d %s, want 200 %s", retry.status, retry.body, first.body)
		}
	}
	if after := dbFingerprint(t, ts.DB); after != before {
		t.Fatalf("retry wrote to the database (a new event?):\n got %s\nwant %s", after, before)
	}
	other := mustRaw(t, "POST", endpoint, []byte(`{"content":"twice"}`), jsonHeader(alice.Token, "Idempotency-Key: retry-1"))
	if other.status != http.StatusUnprocessableEntity || errorBodyProblem(other) != "" {
		t.Fatalf("same key, other body: got %d %s, want a JSON 422", other.status, other.body)
	}
	if after := dbFingerprint(t, ts.DB); after != before {
		t.Fatalf("refused send wrote to the database:\n got %s\nwant %s", after, before)
	}

	// Twenty concurrent sends with one key: one 201, nineteen 200s, one message.
	const n = 20
	var wg sync.WaitGroup
	results := make([]rawResponse, n)
	errs := make([]error, n)
	start := make(chan struct{})
	for i := range n {
		wg.Go(func() {
			<-start
			results[i], errs[i] = rawDo("POST", endpoint, []byte(`{"content":"together"}`), jsonHeader(alice.Token, "Idempotency-Key: concurrent"))
		})
	}
	close(start)
	wg.Wait()
	created, replayed := 0, 0
	ids := map[string]int{}
	for i, res := range results {
		if errs[i] != nil {
			t.Fatalf("request %d: %v", i, errs[i])
		}
		var m apiMessage
		if err := json.Unmarshal(res.body, &m); err != nil {
			t.Fatalf("request %d: got %d %s, want a message", i, res.status, res.body)
		}
		ids[m.ID]++
		switch res.status {
		case http.StatusCreated:
			created++
		case http.StatusOK:
			replayed++
		default:
			t.Fatalf("request %d: got %d %s, want 201 or 200", i, res.status, res.body)
		}
	}
	if created != 1 || replayed != n-1 || len(ids) != 1 {
		t.Fatalf("got %d created, %d replayed, ids %v; want 1, %d, one id", created, replayed, ids, n-1)
	}
	var messages, events int
	ts.DB.QueryRow(`SELECT count(*) FROM messages WHERE content = 'together'`).Scan(&messages)
	ts.DB.QueryRow(`SELECT count(*) FROM events e JOIN messages m ON m.id = e.message_id WHERE m.content = 'together'`).Scan(&events)
	if messages != 1 || events != 2 {
		t.Fatalf("got %d messages and %d events, want 1 and 2", messages, events)
	}
}

// TestHardeningTokenExpiry checks that an expired token is refused and that a
// stream ends when its token expires.
func TestHardeningTokenExpiry(t *testing.T) {
	t.Parallel()
	ts := newTestServer(t, "TOKEN_TTL=2s")
	c := ts.newUser(t, "short")
	s := c.stream("")
	waitFor(t, 5*time.Second, "the token to expire", func() bool {
		res := mustRaw(t, "GET", ts.URL+"/api/auth_user", nil, jsonHeader(c.Token))
		return res.status == http.StatusUnauthorized && errorBodyProblem(res) == ""
	})
	if !s.ended(5 * time.Second) {
		t.Fatalf("stream still open after its token expired")
	}
	if s.err != nil {
		t.Fatalf("stream ended with %v, want a clean end", s.err)
	}
	res := mustRaw(t, "GET", ts.URL+"/api/messages", nil, jsonHeader(c.Token, "Accept: text/event-stream"))
	if res.status != http.StatusUnauthorized {
		t.Fatalf("reopening with the expired token: got %d, want 401", res.status)
	}
}

// TestHardeningTokensNotLogged checks that ?token= values never reach the log.
func TestHardeningTokensNotLogged(t *testing.T) {
	t.Parallel()
	ts := newTestServer(t)
	c := ts.newUser(t, "logged")
	bogus := "bogus" + randomHex(16)
	mustRaw(t, "GET", ts.URL+"/api/auth_user?token="+c.Token, nil, nil)
	mustRaw(t, "GET", ts.URL+"/api/auth_user?token="+bogus, nil, nil)
	mustRaw(t, "GET", ts.URL+"/api/conversations/abc?token="+c.Token, nil, nil)
	mustRaw(t, "GET", ts.URL+"/api/messages?token="+c.Token, nil, nil) // 406
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, "GET", ts.URL+"/api/messages?token="+c.Token+"&last_event_id=0", nil)
	req.Header.Set("Accept", "text/event-stream")
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("open stream with ?token=: %v %v", resp, err)
	}
	cancel()
	resp.Body.Close()
	waitFor(t, 5*time.Second, "the stream's log line", func() bool {
		return strings.Count(ts.logs.String(), "route=/api/messages") >= 2
	})
	logs := ts.logs.String()
	for _, secret := range []string{c.Token, bogus, strings.SplitN(c.Token, ".", 2)[1]} {
		if strings.Contains(logs, secret) {
			t.Fatalf("log contains a token:\n%s", logs)
		}
	}
}

// TestHardeningCORSAndHeaders checks CORS preflights and the security headers.
func TestHardeningCORSAndHeaders(t *testing.T) {
	t.Parallel()
	const origin = "https://chat.example.test:8443"
	ts := newTestServer(t, "ORIGIN="+origin+"/")
	c := ts.newUser(t, "cors")
	preflight := func(from string) rawResponse {
		return mustRaw(t, "OPTIONS", ts.URL+"/api/conversations", nil, http.Header{
			"Origin":                         {from},
			"Access-Control-Request-Method":  {"POST"},
			"Access-Control-Request-Headers": {"authorization, content-type"},
		})
	}
	res := preflight(origin)
	if res.status >= 300 || res.header.Get("Access-Control-Allow-Origin") != origin ||
		!strings.Contains(strings.ToLower(res.header.Get("Access-Control-Allow-Headers")), "authorization") {
		t.Fatalf("preflight from ORIGIN: got %d %v, want 2xx allowing %s", res.status, res.header, origin)
	}
	for _, other := range []string{"https://evil.example.test", "http://chat.example.test:8443", "https://chat.example.test:8443.evil.test", "null"} {
		res := preflight(other)
		if got := res.header.Get("Access-Control-Allow-Origin"); got != "" || res.status < 400 {
			t.Errorf("preflight from %s: got %d Access-Control-Allow-Origin %q, want a refusal", other, res.status, got)
		}
		if p := errorBodyProblem(res); p != "" {
			t.Errorf("preflight from %s: %s", other, p)
		}
		// A simple request from elsewhere is answered, but the browser may not read it.
		h := jsonHeader(c.Token)
		h.Set("Origin", other)
		if got := mustRaw(t, "GET", ts.URL+"/api/auth_user", nil, h).header.Get("Access-Control-Allow-Origin"); got != "" {
			t.Errorf("GET from %s: got Access-Control-Allow-Origin %q, want none", other, got)
		}
	}

	for _, path := range []string{"/", "/conversations/7", "/app.js", "/style.css"} {
		res := mustRaw(t, "GET", ts.URL+path, nil, nil)
		csp := res.header.Get("Content-Security-Policy")
		if res.status != http.StatusOK || !strings.Contains(csp, "default-src 'self'") ||
			strings.Contains(csp, "unsafe-inline") || res.header.Get("X-Content-Type-Options") != "nosniff" {
			t.Errorf("GET %s: got %d CSP %q nosniff %q, want 200 with a strict CSP and nosniff",
				path, res.status, csp, res.header.Get("X-Content-Type-Options"))
		}
	}
	res = mustRaw(t, "GET", ts.URL+"/api/auth_user", nil, jsonHeader(c.Token))
	if res.header.Get("X-Content-Type-Options") != "nosniff" || res.header.Get("Cache-Control") != "no-store" {
		t.Errorf("GET /api/auth_user: got headers %v, want nosniff and no-store", res.header)
	}
}

// TestHardeningRequiresTokenKey checks that the server refuses to start without
// TOKEN_KEY unless development sign-in is on.
func TestHardeningRequiresTokenKey(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		env  map[string]string
	}{
		{"DEV_LOGIN unset", map[string]string{}},
		{"DEV_LOGIN false", map[string]string{"DEV_LOGIN": "false"}},
		{"DEV_LOGIN 0", map[string]string{"DEV_LOGIN": "0"}},
		{"TOKEN_KEY too short", map[string]string{"DEV_LOGIN": "false", "TOKEN_KEY": "short"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env := map[string]string{"DATABASE_URL": testDatabaseURL, "HOST": "127.0.0.1", "PORT": "0"}
			for k, v := range tc.env {
				env[k] = v
			}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			done := make(chan error, 1)
			go func() {
				done <- run(ctx, []string{"messenger"}, func(k string) string { return env[k] }, io.Discard, io.Discard)
			}()
			select {
			case err := <-done:
				if err == nil || !strings.Contains(err.Error(), "TOKEN_KEY") {
					t.Fatalf("got %v, want an error about TOKEN_KEY", err)
				}
			case <-time.After(10 * time.Second):
				cancel()
				<-done
				t.Fatalf("the server started without TOKEN_KEY")
			}
		})
	}
}

// TestHardeningRateLimits checks each limit: the burst passes, the next request
// gets 429 with Retry-After and changes nothing, and after Retry-After seconds
// requests pass again.
func TestHardeningRateLimits(t *testing.T) {
	t.Parallel()
	// burst makes requests (do(i)) until one is refused, checks that refusal and
	// that it changed nothing, and returns its Retry-After. With 2/s and a burst of
	// 3, the 4th request is refused when the first four take under half a second;
	// a slower machine has refilled a token by then, so one more may pass.
	burst := func(t *testing.T, ts *testServer, ok int, do func(i int) rawResponse) time.Duration {
		t.Helper()
		start := time.Now()
		for i := range 10 {
			before := dbFingerprint(t, ts.DB)
			res := do(i)
			if res.status == ok {
				continue
			}
			if res.status != http.StatusTooManyRequests {
				t.Fatalf("request %d: got %d %s, want %d or 429", i+1, res.status, res.body, ok)
			}
			if i < 3 || i > 3 && time.Since(start) < 500*time.Millisecond {
				t.Fatalf("request %d refused, want the 4th to be", i+1)
			}
			if p := errorBodyProblem(res); p != "" {
				t.Fatalf("429: %s", p)
			}
			secs, err := strconv.Atoi(res.header.Get("Retry-After"))
			if err != nil || secs < 1 || secs > 5 {
				t.Fatalf("got Retry-After %q, want 1 to 5 seconds", res.header.Get("Retry-After"))
			}
			if after := dbFingerprint(t, ts.DB); after != before {
				t.Fatalf("refused request wrote to the database:\n got %s\nwant %s", after, before)
			}
			return time.Duration(secs) * time.Second
		}
		t.Fatalf("10 requests in a row passed, want a 429")
		return 0
	}

	t.Run("sends", func(t *testing.T) {
		ts := newTestServer(t, "DATABASE_URL="+privateDatabase(t), "RATE_LIMIT_SENDS=2/s,3")
		alice, bob := ts.newUser(t, "alice"), ts.newUser(t, "bob")
		conv := alice.startConversation(bob)
		endpoint := ts.URL + "/api/conversations/" + conv.ID + "/messages"
		send := func(c *client, n int) rawResponse {
			return mustRaw(t, "POST", endpoint, []byte(`{"content":"n`+strconv.Itoa(n)+`"}`), jsonHeader(c.Token))
		}
		wait := burst(t, ts, http.StatusCreated, func(i int) rawResponse { return send(alice, i) })
		if res := send(bob, 0); res.status != http.StatusCreated {
			t.Fatalf("bob's send while alice is limited: got %d, want 201 (limits are per user)", res.status)
		}
		time.Sleep(wait) // what the server asked for
		if res := send(alice, 99); res.status != http.StatusCreated {
			t.Fatalf("send after Retry-After: got %d %s, want 201", res.status, res.body)
		}
	})

	t.Run("conversations", func(t *testing.T) {
		ts := newTestServer(t, "DATABASE_URL="+privateDatabase(t), "RATE_LIMIT_CONVERSATIONS=2/s,3")
		alice := ts.newUser(t, "alice")
		others := make([]*client, 12)
		for i := range others {
			others[i] = ts.newUser(t, "other")
		}
		create := func(i int) rawResponse {
			return mustRaw(t, "POST", ts.URL+"/api/conversations", []byte(`{"username":"`+others[i].User.Username+`"}`), jsonHeader(alice.Token))
		}
		wait := burst(t, ts, http.StatusCreated, create)
		time.Sleep(wait)
		if res := create(11); res.status != http.StatusCreated {
			t.Fatalf("conversation after Retry-After: got %d %s, want 201", res.status, res.body)
		}
	})

	t.Run("logins", func(t *testing.T) {
		ts := newTestServer(t, "DATABASE_URL="+privateDatabase(t), "RATE_LIMIT_LOGINS=2/s,3")
		login := func(int) rawResponse {
			return mustRaw(t, "POST", ts.URL+"/api/login", []byte(`{"username":"`+uniqueName("u")+`"}`), jsonHeader(""))
		}
		wait := burst(t, ts, http.StatusOK, login)
		time.Sleep(wait)
		if res := login(0); res.status != http.StatusOK {
			t.Fatalf("login after Retry-After: got %d %s, want 200", res.status, res.body)
		}
	})
}

// TestHardeningHealthAndMetrics checks the health checks and the metrics an
// operator watches.
func TestHardeningHealthAndMetrics(t *testing.T) {
	t.Parallel()
	ts := newTestServer(t)
	for _, path := range []string{"/healthz", "/readyz"} {
		if res := mustRaw(t, "GET", ts.URL+path, nil, nil); res.status != http.StatusOK {
			t.Fatalf("GET %s: got %d %s, want 200", path, res.status, res.body)
		}
	}
	alice, bob := ts.newUser(t, "alice"), ts.newUser(t, "bob")
	conv := alice.startConversation(bob)
	s := bob.stream("")
	alice.send(conv.ID, "counted")
	s.nextMessage(5 * time.Second)

	metrics := func() string { return string(mustRaw(t, "GET", ts.URL+"/metrics", nil, nil).body) }
	waitFor(t, 5*time.Second, "metrics of the open stream and its event", func() bool {
		m := metrics()
		return strings.Contains(m, "\nmessenger_streams_open 1\n") && strings.Contains(m, "\nmessenger_events_delivered_total 1\n")
	})
	m := metrics()
	for _, want := range []string{
		"\nmessenger_streams_dropped_slow_total 0\n",
		`messenger_http_requests_total{method="POST",route="/api/conversations/:id/messages",status="201"} 1`,
		`messenger_http_requests_total{method="POST",route="/api/login",status="200"} 2`,
		`go_sql_max_open_connections{db_name="messenger"} 8`,
		`go_sql_open_connections{db_name="messenger"}`,
		`go_sql_in_use_connections{db_name="messenger"}`,
		`go_sql_wait_count_total{db_name="messenger"}`,
	} {
		if !strings.Contains(m, want) {
			t.Errorf("metrics lack %q", want)
		}
	}
	if t.Failed() {
		t.Logf("metrics:\n%s", m)
	}
	s.close()
	waitFor(t, 5*time.Second, "messenger_streams_open to drop to 0", func() bool {
		return strings.Contains(metrics(), "\nmessenger_streams_open 0\n")
	})
}

// TestClientGoneIsNotAnOutage: a client that hangs up while its query waits is
// neither logged as a database outage nor counted as a 503 (a disconnecting client
// could otherwise raise false alerts): it is recorded as 499.
func TestClientGoneIsNotAnOutage(t *testing.T) {
	t.Parallel()
	ts := newTestServer(t)
	alice, bob := ts.newUser(t, "gone_a"), ts.newUser(t, "gone_b")
	conv := alice.startConversation(bob)
	bob.send(conv.ID, "unread")
	// read_messages waits for bob's users row, which this transaction holds.
	tx := holdUsers(t, ts.DB, bob.User.ID)
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "POST", ts.URL+"/api/conversations/"+conv.ID+"/read_messages", nil)
	req.Header.Set("Authorization", "Bearer "+alice.Token)
	if resp, err := http.DefaultClient.Do(req); err == nil {
		resp.Body.Close()
		t.Fatal("the read should still be waiting when the client gives up")
	}
	waitFor(t, 10*time.Second, "the request's log line", func() bool {
		return strings.Contains(ts.logs.String(), "route=/api/conversations/:id/read_messages")
	})
	tx.Rollback()
	logs := ts.logs.String()
	if strings.Contains(logs, "database unavailable") || strings.Contains(logs, "internal error") {
		t.Errorf("a departed client was logged as a fault:\n%s", logs)
	}
	if !strings.Contains(logs, "status=499") {
		t.Errorf("a departed client's request was not logged as 499:\n%s", logs)
	}
	_, metrics := (&client{t: t, base: ts.URL}).do("GET", "/metrics", nil)
	if strings.Contains(string(metrics), `route="/api/conversations/:id/read_messages",status="503"`) {
		t.Errorf("a departed client was counted as a 503")
	}
}
