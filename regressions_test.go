package main

import (
	"bytes"
	"database/sql"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestHubSurvivesNotificationBacklog stalls the periodic sync while notifications
// pile up beyond what lib/pq's channels hold. The goroutine draining them must not
// also ping the listener (the ping's reply queues behind the backlog) or sync:
// live delivery would stop for good. The sleeps make the backlog; they wait for
// nothing.
func TestHubSurvivesNotificationBacklog(t *testing.T) {
	ts := newTestServer(t, "SSE_SYNC_INTERVAL=200ms")
	alice, bob := ts.newUser(t, "alice"), ts.newUser(t, "bob")
	conv := alice.startConversation(bob)
	s := bob.stream("")
	alice.send(conv.ID, "before")
	s.nextMessage(5 * time.Second)

	db, err := sql.Open("postgres", testDatabaseURL)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	// Stall hub.sync (SELECT ... FROM users) for a while so notifications back up.
	tx, err := db.Begin()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(`LOCK TABLE users IN ACCESS EXCLUSIVE MODE`); err != nil {
		t.Fatal(err)
	}
	time.Sleep(400 * time.Millisecond) // a tick fires, hub enters sync and blocks
	for i := range 300 {
		if _, err := db.Exec(`SELECT pg_notify('messenger_events', $1)`, "["+strings.Repeat(" ", i%3)+"]"); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(400 * time.Millisecond) // next tick pending
	tx.Rollback()
	time.Sleep(1 * time.Second)

	after := alice.send(conv.ID, "after")
	if _, m := s.nextMessage(8 * time.Second); m.ID != after.ID {
		t.Fatalf("got %s, want %s: live delivery stalled after a notification backlog", m.ID, after.ID)
	}
}

// pgProxy forwards TCP to PostgreSQL; once armed, the first client packet containing
// marker is forwarded to the server and then the client side is closed (clean FIN),
// as a proxy restart or a failover would.
type pgProxy struct {
	ln      net.Listener
	target  string
	marker  []byte
	armed   atomic.Bool
	tripped atomic.Int32
}

func (p *pgProxy) serve() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		go p.handle(c)
	}
}

func (p *pgProxy) handle(c net.Conn) {
	s, err := net.Dial("tcp", p.target)
	if err != nil {
		c.Close()
		return
	}
	var mute atomic.Bool
	var once sync.Once
	closeBoth := func() { once.Do(func() { c.Close(); s.Close() }) }
	go func() {
		buf := make([]byte, 64<<10)
		for {
			n, err := s.Read(buf)
			if n > 0 && !mute.Load() {
				if _, err := c.Write(buf[:n]); err != nil {
					break
				}
			}
			if err != nil {
				break
			}
		}
		closeBoth()
	}()
	buf := make([]byte, 64<<10)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			if p.armed.Load() && bytes.Contains(buf[:n], p.marker) && p.armed.CompareAndSwap(true, false) {
				p.tripped.Add(1)
				mute.Store(true)                                           // the client never sees the answer
				time.AfterFunc(200*time.Millisecond, func() { c.Close() }) // then sees EOF
				time.AfterFunc(3*time.Second, closeBoth)
			}
			if _, werr := s.Write(buf[:n]); werr != nil {
				closeBoth()
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// TestSendNotRepeatedOnBrokenConnection cuts the database connection after the send
// transaction reached PostgreSQL and before its answer came back. database/sql
// re-runs a pooled statement on another connection when the driver reports a
// broken one; the send would then be stored twice. It must be stored once.
func TestSendNotRepeatedOnBrokenConnection(t *testing.T) {
	t.Parallel()
	u := mustParseURL(t, testDatabaseURL)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	marker := "dup-marker-" + randomHex(4)
	p := &pgProxy{ln: ln, target: u.Host, marker: []byte(marker)}
	go p.serve()
	pu := *u
	pu.Host = ln.Addr().String()

	ts := newTestServer(t, "DATABASE_URL="+pu.String())
	alice, bob := ts.newUser(t, "alice"), ts.newUser(t, "bob")
	conv := alice.startConversation(bob)

	p.armed.Store(true)
	resp, body := alice.do("POST", "/api/conversations/"+conv.ID+"/messages", map[string]string{"content": marker})
	if p.tripped.Load() != 1 {
		t.Fatalf("the proxy did not cut the connection (status %d %s)", resp.StatusCode, body)
	}
	if resp.StatusCode != http.StatusServiceUnavailable {
		t.Fatalf("got %d %s, want 503: the outcome is unknown to the server", resp.StatusCode, body)
	}
	var n int
	if err := ts.DB.QueryRow(`SELECT count(*) FROM messages WHERE content = $1`, marker).Scan(&n); err != nil {
		t.Fatal(err)
	}
	var ev int
	ts.DB.QueryRow(`SELECT count(*) FROM events e JOIN messages m ON m.id = e.message_id WHERE m.content = $1`, marker).Scan(&ev)
	if n != 1 || ev != 2 {
		t.Fatalf("got %d messages and %d events, want the one send stored once (1 and 2)", n, ev)
	}
}

// TestStreamNoticesDepartedClient checks that a stream whose client closed the
// connection ends at its next keep-alive, found by the read check, not by a failed
// write one keep-alive later.
func TestStreamNoticesDepartedClient(t *testing.T) {
	t.Parallel()
	ts := newTestServer(t, "SSE_KEEPALIVE=500ms")
	alice := ts.newUser(t, "alice")
	conn, err := net.Dial("tcp", strings.TrimPrefix(ts.URL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(conn, "GET /api/messages HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\nAuthorization: Bearer %s\r\n\r\n", alice.Token)
	b := make([]byte, 4096)
	conn.Read(b)
	waitFor(t, eventWait, "the stream to open", func() bool { return metricValue(t, ts, "messenger_streams_open") == 1 })
	conn.Close()
	waitFor(t, eventWait, "the stream to close", func() bool { return metricValue(t, ts, "messenger_streams_open") == 0 })
	waitFor(t, eventWait, "its log line", func() bool { return strings.Contains(ts.logs.String(), `msg="stream closed"`) })
	if !strings.Contains(ts.logs.String(), `reason="client left"`) {
		t.Fatalf("stream ended for another reason:\n%s", ts.logs.String())
	}
}
