package main

import (
	"context"
	"database/sql"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lib/pq"
)

// testListener listens on channel (notifyChannel if none) of the database at url,
// as another instance would (but holding no presence lock, so nobody notifies it
// for itself).
func testListener(t *testing.T, url string, channel ...string) *pq.Listener {
	t.Helper()
	connected := make(chan struct{}, 1)
	l := pq.NewListener(url, 100*time.Millisecond, time.Second, func(ev pq.ListenerEventType, _ error) {
		if ev == pq.ListenerEventConnected {
			connected <- struct{}{}
		}
	})
	t.Cleanup(func() { l.Close() })
	if len(channel) == 0 {
		channel = []string{notifyChannel}
	}
	for _, c := range channel {
		if err := l.Listen(c); err != nil {
			t.Fatal(err)
		}
	}
	select {
	case <-connected:
	case <-time.After(10 * time.Second):
		t.Fatal("test listener did not connect")
	}
	return l
}

// notifications returns how many notifications l got so far, once none has come
// for a while: the notifier sends within milliseconds of a commit, and the
// caller has seen the commits' events on a stream.
func notifications(l *pq.Listener) int {
	n := 0
	for {
		select {
		case <-l.Notify:
			n++
		case <-time.After(300 * time.Millisecond):
			return n
		}
	}
}

// TestNotifyOnlyWithPeers: an instance alone sends no NOTIFY; a second instance
// is notified from its first stream on, with no sync to fall back on; once it
// has gone, the first stops notifying again.
func TestNotifyOnlyWithPeers(t *testing.T) {
	t.Parallel()
	url := privateDatabase(t)
	a := newTestServer(t, "DATABASE_URL="+url, "SSE_SYNC_INTERVAL=1h")
	l := testListener(t, url)
	alice, bob := a.newUser(t, "alice"), a.newUser(t, "bob")
	conv := alice.startConversation(bob)
	onA := bob.stream("")
	sendAndExpect := func(what string, streams ...*sseStream) {
		t.Helper()
		for i := range 3 {
			m := alice.send(conv.ID, fmt.Sprintf("%s %d", what, i))
			for _, s := range streams {
				if _, got := s.nextMessage(eventWait); got.ID != m.ID {
					t.Fatalf("%s: got message %s, want %s", what, got.ID, m.ID)
				}
			}
		}
	}

	if n := metricValue(t, a, "messenger_peer_instances"); n != 0 {
		t.Fatalf("alone: messenger_peer_instances = %v, want 0", n)
	}
	sendAndExpect("alone", onA)
	if n := notifications(l); n != 0 {
		t.Fatalf("alone: %d notifications sent, want none", n)
	}

	b := newTestServer(t, "DATABASE_URL="+url, "SSE_SYNC_INTERVAL=1h")
	if strings.Contains(b.logs.String(), "did not answer") {
		t.Fatalf("A did not answer B's hello:\n%s", b.logs.String())
	}
	onB := bob.as(b).stream("")
	sendAndExpect("two instances", onA, onB)
	if n := notifications(l); n == 0 {
		t.Fatal("two instances: no notification sent")
	}
	waitFor(t, 10*time.Second, "A to count B", func() bool { return metricValue(t, a, "messenger_peer_instances") == 1 })

	b.stop(t)
	waitFor(t, 10*time.Second, "A to see B gone", func() bool { return metricValue(t, a, "messenger_peer_instances") == 0 })
	sendAndExpect("alone again", onA)
	if n := notifications(l); n != 0 {
		t.Fatalf("alone again: %d notifications sent, want none", n)
	}
}

// TestPresenceLockLost: when an instance's presence connection is killed, the
// other stops notifying it (it sees its lock gone), and it takes a new lock at its
// next check. A message sent while nobody notified it still reaches its stream,
// which reads the log once the instance is registered again: there is no
// periodic sync to fall back on.
func TestPresenceLockLost(t *testing.T) {
	t.Parallel()
	url := privateDatabase(t)
	// A notices at once that B's lock is gone; B notices its loss seconds later.
	a := newTestServer(t, "DATABASE_URL="+url, "SSE_SYNC_INTERVAL=1h", "PRESENCE_INTERVAL=50ms")
	locks := `
		SELECT coalesce(array_agg(pid), '{}') FROM pg_locks
		WHERE locktype = 'advisory' AND classid::bigint = $1 AND objsubid = 2 AND granted
		  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())`
	var aLock pq.Int64Array
	if err := a.DB.QueryRow(locks, presenceLockClass).Scan(&aLock); err != nil || len(aLock) != 1 {
		t.Fatalf("A's presence lock: %v %v", aLock, err)
	}
	b := newTestServer(t, "DATABASE_URL="+url, "SSE_SYNC_INTERVAL=1h", "PRESENCE_INTERVAL=2s")
	alice, bob := a.newUser(t, "alice"), a.newUser(t, "bob")
	conv := alice.startConversation(bob)
	onB := bob.as(b).stream("")
	for round := range 2 {
		var pids pq.Int64Array
		if err := a.DB.QueryRow(locks, presenceLockClass).Scan(&pids); err != nil {
			t.Fatal(err)
		}
		bLock := slices.DeleteFunc(pids, func(p int64) bool { return p == aLock[0] })
		if len(bLock) != 1 {
			t.Fatalf("round %d: B's presence locks: %v (all: %v, A's %v)", round, bLock, pids, aLock)
		}
		if _, err := a.DB.Exec(`SELECT pg_terminate_backend($1)`, bLock[0]); err != nil {
			t.Fatal(err)
		}
		waitFor(t, 10*time.Second, "A to see B gone", func() bool { return metricValue(t, a, "messenger_peer_instances") == 0 })
		m := alice.send(conv.ID, fmt.Sprintf("while B is not counted %d", round))
		if _, got := onB.nextMessage(10 * time.Second); got.ID != m.ID {
			t.Fatalf("round %d: got message %s, want %s", round, got.ID, m.ID)
		}
		waitFor(t, 10*time.Second, "A to count B again", func() bool { return metricValue(t, a, "messenger_peer_instances") == 1 })
		m = alice.send(conv.ID, fmt.Sprintf("registered again %d", round))
		if _, got := onB.nextMessage(eventWait); got.ID != m.ID {
			t.Fatalf("round %d: got message %s, want %s", round, got.ID, m.ID)
		}
	}
}

// TestNotifyAlways: with NOTIFY_ALWAYS an instance alone notifies anyway, for
// instances of older versions, which hold no presence lock.
func TestNotifyAlways(t *testing.T) {
	t.Parallel()
	url := privateDatabase(t)
	a := newTestServer(t, "DATABASE_URL="+url, "NOTIFY_ALWAYS=true")
	l := testListener(t, url)
	alice, bob := a.newUser(t, "alice"), a.newUser(t, "bob")
	conv := alice.startConversation(bob)
	s := bob.stream("")
	m := alice.send(conv.ID, "to whoever listens")
	if _, got := s.nextMessage(eventWait); got.ID != m.ID {
		t.Fatalf("got message %s, want %s", got.ID, m.ID)
	}
	if n := notifications(l); n == 0 {
		t.Fatal("no notification sent")
	}
}

// TestPresenceReleaseDropsLock: giving up the lock discards its connection, so
// the lock is gone at once; returned to the pool, the connection would keep it,
// and every instance would count this one forever.
func TestPresenceReleaseDropsLock(t *testing.T) {
	t.Parallel()
	url := privateDatabase(t)
	direct, err := sql.Open("postgres", url)
	if err != nil {
		t.Fatal(err)
	}
	db, err := sql.Open("postgres", url)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	p := newPresence(direct, db, nil, time.Second, newMetrics(db), slog.New(slog.DiscardHandler))
	defer p.close()
	locks := func() int {
		var n int
		if err := db.QueryRow(`
			SELECT count(*) FROM pg_locks
			WHERE locktype = 'advisory' AND classid::bigint = $1 AND objsubid = 2 AND granted
			  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())`,
			presenceLockClass).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	for round := range 2 {
		if err := p.register(context.Background()); err != nil {
			t.Fatalf("round %d: register: %v", round, err)
		}
		if n := locks(); n != 1 {
			t.Fatalf("round %d: %d presence locks held, want 1", round, n)
		}
		if !p.alone() {
			t.Fatalf("round %d: alone, yet not alone", round)
		}
		p.release()
		waitFor(t, 5*time.Second, "the lock to be gone", func() bool { return locks() == 0 })
	}
}

// TestPresenceIntervalBounded: PRESENCE_INTERVAL must stay under the time a
// starting instance waits for answers.
func TestPresenceIntervalBounded(t *testing.T) {
	t.Parallel()
	for value, ok := range map[string]bool{"1s": true, "4s": true, "5s": false, "1m": false} {
		_, err := loadConfig(func(k string) string {
			return map[string]string{"DEV_LOGIN": "true", "PRESENCE_INTERVAL": value}[k]
		})
		if (err == nil) != ok {
			t.Errorf("PRESENCE_INTERVAL=%s: got error %v, want ok=%v", value, err, ok)
		}
	}
}
