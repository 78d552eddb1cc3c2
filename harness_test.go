package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"
)

// testDatabaseURL is the database this test run created for itself (TestMain); every
// test server uses it, and tests keep out of each other's way by using fresh users.
var testDatabaseURL string

func TestMain(m *testing.M) {
	os.Exit(runTests(m))
}

func runTests(m *testing.M) int {
	base := os.Getenv("DATABASE_URL")
	if base == "" {
		base = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"
	}
	u, err := url.Parse(base)
	if err != nil {
		fmt.Fprintln(os.Stderr, "DATABASE_URL:", err)
		return 1
	}
	admin, err := sql.Open("postgres", base)
	if err != nil {
		fmt.Fprintln(os.Stderr, "open admin database:", err)
		return 1
	}
	defer admin.Close()
	name := "messenger_test_" + randomHex(6)
	if _, err := admin.Exec(`CREATE DATABASE ` + name); err != nil {
		fmt.Fprintln(os.Stderr, "create test database:", err)
		return 1
	}
	defer func() {
		if _, err := admin.Exec(`DROP DATABASE IF EXISTS ` + name + ` WITH (FORCE)`); err != nil {
			fmt.Fprintln(os.Stderr, "drop test database:", err)
		}
	}()
	u.Path = "/" + name
	testDatabaseURL = u.String()
	if os.Getenv(pgBouncerEnv) != "" {
		fmt.Println("test database:", name) // for TestThroughPgBouncer
	}
	if err := installContractCheck(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	code := m.Run()
	if v := contract.of(""); len(v) > 0 && code == 0 {
		fmt.Fprintf(os.Stderr, "%d responses that docs/openapi.yaml does not allow:\n%s\n", len(v), strings.Join(v, "\n"))
		code = 1
	}
	return code
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// skipInShortMode skips a long test (a browser, a second process, a restarted
// cluster) in go test -short, the quick loop; make test and CI run everything.
func skipInShortMode(t testing.TB, what string) {
	t.Helper()
	if testing.Short() {
		t.Skipf("%s: not in -short", what)
	}
}

// uniqueName returns a fresh valid username starting with prefix.
func uniqueName(prefix string) string {
	return prefix + "_" + randomHex(5)
}

// syncBuffer is a bytes.Buffer safe for concurrent use, for server logs.
type syncBuffer struct {
	mu  sync.Mutex // guards buf
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// testServer is the real server, started through run on a free port of 127.0.0.1.
type testServer struct {
	URL  string
	DB   *sql.DB // for assertions on what the server stored
	env  map[string]string
	logs *syncBuffer
	hc   *http.Client // speaks the server's protocol (see newTestServerOver); nil: http.DefaultClient

	mu     sync.Mutex // guards cancel and done
	cancel context.CancelFunc
	done   chan error
}

// newTestServer starts a server on the test database with development sign-in on
// and rate limits off; env ("KEY=value") overrides any setting. It is stopped when
// the test ends, and its log is shown if the test failed.
func newTestServer(t testing.TB, env ...string) *testServer {
	t.Helper()
	ts := &testServer{
		env: map[string]string{
			"DATABASE_URL":             testDatabaseURL,
			"HOST":                     "127.0.0.1",
			"PORT":                     "0",
			"DEV_LOGIN":                "true",
			"DB_MAX_CONNS":             "8",
			"RATE_LIMIT_SENDS":         "off",
			"RATE_LIMIT_CONVERSATIONS": "off",
			"RATE_LIMIT_LOGINS":        "off",
			// Streams notice a departed client at their next keep-alive.
			"SSE_KEEPALIVE": "1s",
		},
		logs: &syncBuffer{},
	}
	if bouncer := os.Getenv(pgBouncerEnv); bouncer != "" {
		// TestThroughPgBouncer's run: the pool goes through PgBouncer in
		// transaction mode, LISTEN straight to PostgreSQL.
		ts.env["DATABASE_URL"] = viaPgBouncer(testDatabaseURL, bouncer)
		ts.env["DATABASE_LISTEN_URL"] = testDatabaseURL
	}
	for _, kv := range env {
		k, v, _ := strings.Cut(kv, "=")
		ts.env[k] = v
	}
	// The test's own connection goes straight to PostgreSQL.
	direct := ts.env["DATABASE_URL"]
	if u := ts.env["DATABASE_LISTEN_URL"]; u != "" {
		direct = u
	}
	db, err := sql.Open("postgres", direct)
	if err != nil {
		t.Fatalf("open database: %v", err)
	}
	db.SetMaxOpenConns(4)
	ts.DB = db
	failOnContractViolations(t, ts)
	ts.start(t)
	t.Cleanup(func() {
		ts.stop(t)
		db.Close()
		if t.Failed() {
			t.Logf("server log:\n%s", ts.logs.String())
		}
	})
	return ts
}

var listeningRE = regexp.MustCompile(`listening on (https?)://(\S+)`)

// start runs the server (again, after stop, on the same port) and waits until it
// listens.
func (ts *testServer) start(t testing.TB) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	pr, pw := io.Pipe()
	done := make(chan error, 1)
	env := func(k string) string { return ts.env[k] }
	go func() {
		err := run(ctx, []string{"messenger"}, env, pw, ts.logs)
		pw.CloseWithError(fmt.Errorf("server stopped: %v", err))
		done <- err
	}()
	addr := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			if m := listeningRE.FindStringSubmatch(sc.Text()); m != nil {
				addr <- m[1] + "://" + m[2]
			}
		}
		close(addr)
	}()
	select {
	case a, ok := <-addr:
		if !ok {
			cancel()
			t.Fatalf("server did not start: %v\n%s", <-done, ts.logs.String())
		}
		ts.URL = a
		_, a, _ = strings.Cut(a, "://")
		_, port, _ := strings.Cut(a, "]:")
		if port == "" {
			_, port, _ = strings.Cut(a, ":")
		}
		ts.env["PORT"] = port
	case <-time.After(30 * time.Second):
		cancel()
		t.Fatalf("server did not start within 30s\n%s", ts.logs.String())
	}
	ts.mu.Lock()
	ts.cancel, ts.done = cancel, done
	ts.mu.Unlock()
}

// stop shuts the server down as SIGTERM would and waits for run to return; it
// returns run's error. Stopping a stopped server does nothing.
func (ts *testServer) stop(t testing.TB) error {
	t.Helper()
	ts.mu.Lock()
	cancel, done := ts.cancel, ts.done
	ts.cancel, ts.done = nil, nil
	ts.mu.Unlock()
	if cancel == nil {
		return nil
	}
	cancel()
	select {
	case err := <-done:
		return err
	case <-time.After(30 * time.Second):
		t.Fatalf("server did not stop within 30s")
		return nil
	}
}

// client is a signed-in user of a test server.
type client struct {
	t     testing.TB
	base  string
	Token string
	User  User
	hc    *http.Client // nil: http.DefaultClient
}

// httpClient is the HTTP client c sends its requests with.
func (c *client) httpClient() *http.Client {
	if c.hc != nil {
		return c.hc
	}
	return http.DefaultClient
}

// login signs in as username through POST /api/login.
func (ts *testServer) login(t testing.TB, username string) *client {
	t.Helper()
	c := &client{t: t, base: ts.URL, hc: ts.hc}
	var res authResponse
	c.mustDo("POST", "/api/login", map[string]string{"username": username}, http.StatusOK, &res)
	c.Token, c.User = res.Token, res.AuthUser
	return c
}

// newUser signs in as a fresh user.
func (ts *testServer) newUser(t testing.TB, prefix string) *client {
	t.Helper()
	return ts.login(t, uniqueName(prefix))
}

// as returns a client of this user against another server (another instance).
func (c *client) as(ts *testServer) *client {
	cc := *c
	cc.base, cc.hc = ts.URL, ts.hc
	return &cc
}

// do sends a request with the client's token; body is JSON-encoded unless it is a
// string or []byte, sent as it is. headers are "Name: value" pairs.
func (c *client) do(method, path string, body any, headers ...string) (*http.Response, []byte) {
	c.t.Helper()
	var r io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		r = strings.NewReader(b)
	case []byte:
		r = bytes.NewReader(b)
	default:
		j, err := json.Marshal(b)
		if err != nil {
			c.t.Fatalf("encode body: %v", err)
		}
		r = bytes.NewReader(j)
	}
	req, err := http.NewRequest(method, c.base+path, r)
	if err != nil {
		c.t.Fatalf("new request: %v", err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if c.Token != "" {
		req.Header.Set("Authorization", "Bearer "+c.Token)
	}
	for _, h := range headers {
		k, v, _ := strings.Cut(h, ":")
		req.Header.Set(strings.TrimSpace(k), strings.TrimSpace(v))
	}
	resp, err := c.httpClient().Do(req)
	if err != nil {
		c.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		c.t.Fatalf("%s %s: read body: %v", method, path, err)
	}
	return resp, b
}

// mustDo sends a request, checks its status and decodes the JSON answer into out
// (if not nil).
func (c *client) mustDo(method, path string, body any, want int, out any, headers ...string) *http.Response {
	c.t.Helper()
	resp, b := c.do(method, path, body, headers...)
	if resp.StatusCode != want {
		c.t.Fatalf("%s %s: got status %d, want %d; body %s", method, path, resp.StatusCode, want, b)
	}
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			c.t.Fatalf("%s %s: decode %s: %v", method, path, b, err)
		}
	}
	return resp
}

// apiConversation and apiMessage are the API's shapes as a client decodes them.
type apiConversation struct {
	ID                string      `json:"id"`
	OtherParticipant  apiUser     `json:"otherParticipant"`
	LastMessage       *apiMessage `json:"lastMessage"`
	HasUnreadMessages bool        `json:"hasUnreadMessages"`
	UnreadCount       int         `json:"unreadCount"`
}

type apiUser struct {
	ID        string  `json:"id"`
	Username  string  `json:"username"`
	AvatarURL *string `json:"avatarURL"`
}

type apiMessage struct {
	ID             string `json:"id"`
	Content        string `json:"content"`
	ConversationID string `json:"conversationId"`
	CreatedAt      string `json:"createdAt"`
	Mine           bool   `json:"mine"`
}

// startConversation starts (or gets) the conversation with other.
func (c *client) startConversation(other *client) apiConversation {
	c.t.Helper()
	var conv apiConversation
	resp, b := c.do("POST", "/api/conversations", map[string]string{"username": other.User.Username})
	if resp.StatusCode != http.StatusCreated && resp.StatusCode != http.StatusOK {
		c.t.Fatalf("start conversation: status %d: %s", resp.StatusCode, b)
	}
	if err := json.Unmarshal(b, &conv); err != nil {
		c.t.Fatalf("decode conversation: %v", err)
	}
	return conv
}

// send sends content to conversation, with headers ("Name: value") if any, and
// returns the message.
func (c *client) send(conversation, content string, headers ...string) apiMessage {
	c.t.Helper()
	var m apiMessage
	c.mustDo("POST", "/api/conversations/"+conversation+"/messages", map[string]string{"content": content}, http.StatusCreated, &m, headers...)
	return m
}

// sseEvent is one event read from a stream.
type sseEvent struct {
	ID    string // the id: field ("" for none)
	Event string // the event: field ("" for the default type)
	Data  string
}

// sseStream is an open GET /api/messages.
type sseStream struct {
	t      testing.TB
	resp   *http.Response
	cancel context.CancelFunc
	events chan sseEvent
	err    error // why the stream ended, once events is closed

	// keepReady passes the "ready" event on in events; without it, it is left
	// out (most tests look at what comes after), though its id counts.
	keepReady bool

	mu     sync.Mutex // guards lastID
	lastID string     // what an EventSource would send as Last-Event-ID
}

// stream opens the client's event stream; lastEventID is sent as Last-Event-ID
// unless it is empty.
func (c *client) stream(lastEventID string) *sseStream {
	c.t.Helper()
	return c.openStream(lastEventID, false)
}

// streamWithReady is stream, with the "ready" event in events, in its place.
func (c *client) streamWithReady(lastEventID string) *sseStream {
	c.t.Helper()
	return c.openStream(lastEventID, true)
}

// getStream sends GET /api/messages as c, with the token in the header, over
// HTTP/1.1, and returns the response whatever its status, for a test that reads
// the bytes themselves; the caller closes it.
func (c *client) getStream(t testing.TB) *http.Response {
	t.Helper()
	req, _ := http.NewRequest("GET", c.base+"/api/messages", nil)
	req.Header.Set("Accept", "text/event-stream")
	req.Header.Set("Authorization", "Bearer "+c.Token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

func (c *client) openStream(lastEventID string, keepReady bool) *sseStream {
	c.t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, "GET", c.base+"/api/messages", nil)
	req.Header.Set("Accept", "text/event-stream")
	req.Header.Set("Authorization", "Bearer "+c.Token)
	if lastEventID != "" {
		req.Header.Set("Last-Event-ID", lastEventID)
	}
	resp, err := c.httpClient().Do(req)
	if err != nil {
		cancel()
		c.t.Fatalf("open stream: %v", err)
	}
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		cancel()
		c.t.Fatalf("open stream: status %d: %s", resp.StatusCode, b)
	}
	s := &sseStream{t: c.t, resp: resp, cancel: cancel, events: make(chan sseEvent, 10000), lastID: lastEventID, keepReady: keepReady}
	go s.read()
	c.t.Cleanup(s.close)
	return s
}

// read parses the stream as the SSE spec says an EventSource does.
func (s *sseStream) read() {
	defer close(s.events)
	sc := bufio.NewScanner(s.resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	var ev sseEvent
	var data []string
	hasID := false
	for sc.Scan() {
		line := sc.Text()
		if line == "" {
			if hasID {
				s.mu.Lock()
				s.lastID = ev.ID
				s.mu.Unlock()
			}
			if data != nil {
				ev.Data = strings.Join(data, "\n")
				if ev.Event != "ready" || s.keepReady {
					s.events <- ev
				}
			}
			ev, data, hasID = sseEvent{}, nil, false
			continue
		}
		if strings.HasPrefix(line, ":") {
			continue
		}
		field, value, _ := strings.Cut(line, ":")
		value = strings.TrimPrefix(value, " ")
		switch field {
		case "id":
			ev.ID, hasID = value, true
		case "event":
			ev.Event = value
		case "data":
			data = append(data, value)
		}
	}
	s.err = sc.Err()
}

// lastEventID is what an EventSource would send as Last-Event-ID on reconnect:
// the last id: field read, including one on a frame with no data.
func (s *sseStream) lastEventID() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lastID
}

// next returns the next event, failing the test if none comes within d.
func (s *sseStream) next(d time.Duration) sseEvent {
	s.t.Helper()
	select {
	case ev, ok := <-s.events:
		if !ok {
			s.t.Fatalf("stream ended: %v", s.err)
		}
		return ev
	case <-time.After(d):
		s.t.Fatalf("no event within %v", d)
	}
	return sseEvent{}
}

// nextMessage returns the next event, which must be a message, decoded.
func (s *sseStream) nextMessage(d time.Duration) (sseEvent, apiMessage) {
	s.t.Helper()
	ev := s.next(d)
	var m apiMessage
	if ev.Event != "" {
		s.t.Fatalf("got event %q (%s), want a message", ev.Event, ev.Data)
	}
	if err := json.Unmarshal([]byte(ev.Data), &m); err != nil {
		s.t.Fatalf("decode message %q: %v", ev.Data, err)
	}
	return ev, m
}

// expectNone fails the test if an event arrives within d.
func (s *sseStream) expectNone(d time.Duration) {
	s.t.Helper()
	select {
	case ev, ok := <-s.events:
		if ok {
			s.t.Fatalf("got unexpected event %+v", ev)
		}
	case <-time.After(d):
	}
}

// ended waits up to d for the stream to end and reports whether it did.
func (s *sseStream) ended(d time.Duration) bool {
	deadline := time.After(d)
	for {
		select {
		case _, ok := <-s.events:
			if !ok {
				return true
			}
		case <-deadline:
			return false
		}
	}
}

func (s *sseStream) close() {
	s.cancel()
	s.resp.Body.Close()
}

// waitFor polls cond every 10ms until it holds or d passes.
func waitFor(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
