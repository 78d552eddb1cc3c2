package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// labelledMetric reads one labelled metric, such as name{reason="x"}, from /metrics.
func labelledMetric(t *testing.T, ts *testServer, name string) float64 {
	t.Helper()
	return metricValue(t, ts, regexp.QuoteMeta(name))
}

// mustRefuseStream opens a stream that the server must refuse with status want,
// Retry-After and a JSON error.
func (c *client) mustRefuseStream(t *testing.T, want int) {
	t.Helper()
	resp := c.getStream(t)
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusOK {
		t.Fatalf("stream accepted, want %d", want)
	}
	b, _ := io.ReadAll(resp.Body)
	var body struct{ Error string }
	if resp.StatusCode != want || json.Unmarshal(b, &body) != nil || body.Error == "" {
		t.Fatalf("got %d %s, want %d with a JSON error", resp.StatusCode, b, want)
	}
	if resp.Header.Get("Retry-After") == "" {
		t.Fatalf("%d without Retry-After", want)
	}
}

func TestStreamCaps(t *testing.T) {
	ts := newTestServer(t, "STREAMS_PER_USER=3", "STREAMS_MAX=5")
	alice, bob, carol := ts.newUser(t, "alice"), ts.newUser(t, "bob"), ts.newUser(t, "carol")
	open := func() float64 { return metricValue(t, ts, "messenger_streams_open") }

	var aliceStreams []*sseStream
	for range 3 {
		aliceStreams = append(aliceStreams, alice.stream(""))
	}
	alice.mustRefuseStream(t, http.StatusTooManyRequests)
	bob.stream("")
	bob.stream("")
	waitFor(t, eventWait, "5 open streams", func() bool { return open() == 5 })
	carol.mustRefuseStream(t, http.StatusServiceUnavailable)
	alice.mustRefuseStream(t, http.StatusTooManyRequests) // her own cap comes first

	for _, tc := range []struct {
		reason string
		want   float64
	}{{"user_limit", 2}, {"server_full", 1}} {
		if got := labelledMetric(t, ts, `messenger_streams_refused_total{reason="`+tc.reason+`"}`); got != tc.want {
			t.Errorf("refused %s: got %v, want %v", tc.reason, got, tc.want)
		}
	}

	// A stream that closes frees its slot, in the server's count and its user's.
	aliceStreams[0].close()
	waitFor(t, eventWait, "a free slot", func() bool { return open() == 4 })
	carolStream := carol.stream("")
	alice.mustRefuseStream(t, http.StatusServiceUnavailable) // under her cap, but the server is full
	carolStream.close()
	waitFor(t, eventWait, "a free slot", func() bool { return open() == 4 })
	alice.stream("")
	alice.mustRefuseStream(t, http.StatusTooManyRequests)
}

// nextEvent returns the next event, skipping the stream's opening "ready" event
// (if the server sends one), which these tests do not look at.
func (s *sseStream) nextEvent(d time.Duration) sseEvent {
	s.t.Helper()
	for {
		if ev := s.next(d); ev.Event != "ready" {
			return ev
		}
	}
}

// mustReset reads the next event, which must be a reset at position head for reason.
func (s *sseStream) mustReset(head int64, reason string, missed int64) {
	s.t.Helper()
	ev := s.nextEvent(eventWait)
	var data struct {
		Reason string
		Missed int64
	}
	if ev.Event != "reset" || json.Unmarshal([]byte(ev.Data), &data) != nil {
		s.t.Fatalf("got %+v, want a reset", ev)
	}
	if ev.ID != strconv.FormatInt(head, 10) || data.Reason != reason || data.Missed != missed {
		s.t.Fatalf("got reset id %s %+v, want id %d reason %s missed %d", ev.ID, data, head, reason, missed)
	}
}

// openSilentStream opens c's stream (from lastEventID, unless empty) on a
// connection with a tiny receive buffer, and reads nothing: the server's writes
// stall once a few KB are in flight. The connection closes when the test ends.
func openSilentStream(t *testing.T, ts *testServer, c *client, lastEventID string) net.Conn {
	t.Helper()
	d := net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
		return rc.Control(func(fd uintptr) {
			syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 1024)
		})
	}}
	conn, err := d.Dial("tcp", strings.TrimPrefix(ts.URL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	resume := ""
	if lastEventID != "" {
		resume = "Last-Event-ID: " + lastEventID + "\r\n"
	}
	fmt.Fprintf(conn, "GET /api/messages HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\nAuthorization: Bearer %s\r\n%s\r\n", c.Token, resume)
	return conn
}

// eventSeq returns the user's event sequence (the head of their log).
func eventSeq(t *testing.T, ts *testServer, c *client) int64 {
	t.Helper()
	var seq int64
	if err := ts.DB.QueryRow(`SELECT event_seq FROM users WHERE id = $1`, c.User.ID).Scan(&seq); err != nil {
		t.Fatal(err)
	}
	return seq
}

// sendMany stores n messages from c in conv with one call to send_messages, as a
// batch of the server's send workers would (no notification: streams learn of them
// from the log).
func sendMany(t *testing.T, ts *testServer, c *client, conv string, n int, content string) {
	t.Helper()
	var created int
	err := ts.DB.QueryRow(`
		SELECT count(*) FROM send_messages(array_fill($1::bigint, ARRAY[$3::int]), array_fill($2::bigint, ARRAY[$3::int]),
			array_fill($4::text, ARRAY[$3::int]), array_fill(''::text, ARRAY[$3::int]))
		WHERE outcome = 'created'`, conv, c.User.ID, n, content).Scan(&created)
	if err != nil || created != n {
		t.Fatalf("send %d messages: created %d, %v", n, created, err)
	}
}

func TestStreamReplayIsBounded(t *testing.T) {
	ts := newTestServer(t, "REPLAY_MAX=5")
	alice, bob := ts.newUser(t, "alice"), ts.newUser(t, "bob")
	conv := alice.startConversation(bob)
	start := eventSeq(t, ts, bob)
	for i := range 6 {
		alice.send(conv.ID, fmt.Sprintf("missed %d", i))
	}
	head := start + 6

	// One more than REPLAY_MAX missed: a reset, then live.
	s := bob.stream(strconv.FormatInt(start, 10))
	s.mustReset(head, "too_far_behind", 6)
	live := alice.send(conv.ID, "live")
	if ev, m := s.nextMessage(eventWait); m.ID != live.ID || ev.ID != strconv.FormatInt(head+1, 10) {
		t.Fatalf("after the reset: got %s (id %s), want %s (id %d)", m.ID, ev.ID, live.ID, head+1)
	}
	s.close()
	head++

	// REPLAY_MAX missed: replayed.
	s = bob.stream(strconv.FormatInt(head-5, 10))
	for i := range 5 {
		if ev, _ := s.nextMessage(eventWait); ev.ID != strconv.FormatInt(head-4+int64(i), 10) {
			t.Fatalf("replay %d: got id %s, want %d", i, ev.ID, head-4+int64(i))
		}
	}
	s.expectNone(200 * time.Millisecond)
	s.close()

	// A position past the log's end is not this database's: a reset.
	s = bob.stream(strconv.FormatInt(head+100, 10))
	s.mustReset(head, "unknown_position", 0)
	s.close()

	if got := labelledMetric(t, ts, `messenger_stream_resets_total{reason="too_far_behind"}`); got != 1 {
		t.Errorf("too_far_behind resets: got %v, want 1", got)
	}
}

// TestLongReplayWithLiveEvents resumes a stream that must replay nearly REPLAY_MAX
// events, through a client that does not read at first, so the replay stalls on
// the socket, while live messages keep coming to the same user through a queue of
// 4: the stream must neither be dropped as slow nor write anything out of order.
func TestLongReplayWithLiveEvents(t *testing.T) {
	ts := newTestServer(t, "SSE_BUFFER=4", "REPLAY_MAX=1000", "SSE_WRITE_TIMEOUT=60s")
	alice, bob := ts.newUser(t, "alice"), ts.newUser(t, "bob")
	conv := alice.startConversation(bob)
	start := eventSeq(t, ts, bob)
	const missed, live = 950, 20
	sendMany(t, ts, alice, conv.ID, missed, strings.Repeat("€", 480)) // about 1.5 KB a frame

	conn := openSilentStream(t, ts, bob, strconv.FormatInt(start, 10))
	waitFor(t, eventWait, "the stream to open", func() bool { return metricValue(t, ts, "messenger_streams_open") == 1 })
	for i := range live {
		alice.send(conv.ID, fmt.Sprintf("live %d", i))
	}

	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("stream: %v %v", resp, err)
	}
	s := &sseStream{t: t, resp: resp, cancel: func() {}, events: make(chan sseEvent, 10000)}
	go s.read()
	t.Cleanup(s.close)
	for i := range missed + live {
		ev, m := s.nextMessage(10 * time.Second)
		if want := strconv.FormatInt(start+1+int64(i), 10); ev.ID != want {
			t.Fatalf("event %d: got id %s, want %s", i, ev.ID, want)
		}
		if i >= missed && m.Content != fmt.Sprintf("live %d", i-missed) {
			t.Fatalf("event %d: got %q, want live %d", i, m.Content, i-missed)
		}
	}
	s.expectNone(200 * time.Millisecond)
	if got := metricValue(t, ts, "messenger_streams_dropped_slow_total"); got != 0 {
		t.Fatalf("%v streams dropped as slow", got)
	}
}

func TestEventRetention(t *testing.T) {
	ts := newTestServer(t, "EVENT_RETENTION=1h", "EVENT_PRUNE_INTERVAL=100ms")
	alice, bob := ts.newUser(t, "alice"), ts.newUser(t, "bob")
	conv := alice.startConversation(bob)
	start := eventSeq(t, ts, bob)
	for i := range 3 {
		alice.send(conv.ID, fmt.Sprintf("old %d", i))
	}
	if _, err := ts.DB.Exec(`UPDATE events SET created_at = now() - interval '2 hours' WHERE user_id = $1`, bob.User.ID); err != nil {
		t.Fatal(err)
	}
	recent := []apiMessage{alice.send(conv.ID, "recent 0"), alice.send(conv.ID, "recent 1")}
	head := start + 5

	waitFor(t, 10*time.Second, "the old events pruned", func() bool {
		var n int
		ts.DB.QueryRow(`SELECT count(*) FROM events WHERE user_id = $1`, bob.User.ID).Scan(&n)
		return n == 2
	})
	if got := metricValue(t, ts, "messenger_events_pruned_total"); got < 3 {
		t.Fatalf("events pruned: got %v, want at least 3", got)
	}

	// From a pruned position: a reset. From a held one: the replay.
	s := bob.stream(strconv.FormatInt(start+2, 10))
	s.mustReset(head, "expired", 0)
	s.close()
	s = bob.stream(strconv.FormatInt(start+3, 10))
	for _, want := range recent {
		if _, m := s.nextMessage(eventWait); m.ID != want.ID {
			t.Fatalf("replay: got %s, want %s", m.ID, want.ID)
		}
	}
	s.expectNone(200 * time.Millisecond)
}
