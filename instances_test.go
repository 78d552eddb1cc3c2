package main

import (
	"fmt"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestCrossInstanceDelivery runs two instances on one database: a stream on either
// gets what was sent through the other, exactly once, on either bus.
func TestCrossInstanceDelivery(t *testing.T) {
	forEachBus(t, func(t *testing.T, bus testBus) {
		a, b := newTestServer(t, bus.env...), newTestServer(t, bus.env...)
		aliceA, bobA := a.newUser(t, "alice"), a.newUser(t, "bob")
		aliceB, bobB := aliceA.as(b), bobA.as(b)
		conv := aliceA.startConversation(bobA)

		bobOnB, aliceOnA, aliceOnB := bobB.stream(""), aliceA.stream(""), aliceB.stream("")
		m1 := aliceA.send(conv.ID, "via A")
		m2 := bobB.send(conv.ID, "via B")
		for _, tc := range []struct {
			name string
			s    *sseStream
			mine []bool
		}{
			{"bob on B", bobOnB, []bool{false, true}},
			{"alice on A", aliceOnA, []bool{true, false}},
			{"alice on B", aliceOnB, []bool{true, false}},
		} {
			for i, want := range []apiMessage{m1, m2} {
				_, got := tc.s.nextMessage(eventWait)
				if got.ID != want.ID || got.Mine != tc.mine[i] {
					t.Fatalf("%s: got %+v, want %s mine=%v", tc.name, got, want.ID, tc.mine[i])
				}
			}
			tc.s.expectNone(100 * time.Millisecond)
		}
	})
}

// TestListenerConnectionKilled cuts every instance off its bus while messages
// flow: with LISTEN/NOTIFY it kills the LISTEN connections; with NATS it shuts the
// NATS server down and starts it again on the same port. Every message still
// arrives, in order, exactly once, on both.
func TestListenerConnectionKilled(t *testing.T) {
	forEachBus(t, func(t *testing.T, bus testBus) {
		// A long sync interval, so that recovery comes from the reconnect itself.
		a, b := newTestServer(t, bus.with("SSE_SYNC_INTERVAL=1h")...), newTestServer(t, bus.with("SSE_SYNC_INTERVAL=1h")...)
		alice, bob := a.newUser(t, "alice"), a.newUser(t, "bob")
		conv := alice.startConversation(bob)
		streams := map[string]*sseStream{
			"bob on A": bob.stream(""), "bob on B": bob.as(b).stream(""),
			"alice on A": alice.stream(""), "alice on B": alice.as(b).stream(""),
		}

		reconnects := "messenger_listener_reconnects_total"
		var cut, restore func(round int)
		if bus.nats == nil {
			dbName := strings.TrimPrefix(mustParseURL(t, testDatabaseURL).Path, "/")
			cut = func(int) {
				var n int
				err := a.DB.QueryRow(`
					SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
					WHERE datname = $1 AND query LIKE 'LISTEN%'`, dbName).Scan(&n)
				if err != nil {
					t.Fatalf("kill listeners: %v", err)
				}
				if n < 2 {
					t.Fatalf("killed %d listener connections, want both instances'", n)
				}
			}
			restore = func(int) {} // the listeners reconnect by themselves
		} else {
			reconnects = "messenger_bus_reconnects_total"
			cut = func(int) { bus.nats.shutdown() }
			restore = func(int) { bus.nats.start(t) }
		}
		// Before the next cut, both instances are back (on a fast machine the
		// sends in between take less than lib/pq's reconnect interval).
		reconnected := func(round int) {
			restore(round)
			waitFor(t, 20*time.Second, "both instances to reconnect", func() bool {
				return metricValue(t, a, reconnects) >= float64(round) && metricValue(t, b, reconnects) >= float64(round)
			})
		}

		const total = 60
		var sent []apiMessage
		for i := range total {
			from := alice
			if i%2 == 1 {
				from = bob.as(b)
			}
			sent = append(sent, from.send(conv.ID, fmt.Sprintf("m%d", i)))
			// The second time, the last messages are sent while the bus is down.
			switch i {
			case 20:
				cut(1)
			case 30:
				reconnected(1)
			case 45:
				cut(2)
			case total - 1:
				reconnected(2)
			}
		}
		for name, s := range streams {
			prev := 0
			for i := range total {
				ev, m := s.nextMessage(10 * time.Second)
				if m.ID != sent[i].ID {
					t.Fatalf("%s: message %d: got %s, want %s", name, i, m.ID, sent[i].ID)
				}
				id, _ := strconv.Atoi(ev.ID)
				if prev != 0 && id != prev+1 {
					t.Fatalf("%s: event id %d after %d", name, id, prev)
				}
				prev = id
			}
			s.expectNone(100 * time.Millisecond)
		}
		for _, ts := range []*testServer{a, b} {
			if n := metricValue(t, ts, reconnects); n < 2 {
				t.Fatalf("%s: %v, want 2", reconnects, n)
			}
		}
	})
}

// TestInstanceStopped stops the instance holding a stream mid-flow; the client
// reconnects to the other with Last-Event-ID and loses nothing.
func TestInstanceStopped(t *testing.T) {
	forEachBus(t, func(t *testing.T, bus testBus) {
		a, b := newTestServer(t, bus.env...), newTestServer(t, bus.env...)
		alice, bob := b.newUser(t, "alice"), b.newUser(t, "bob")
		conv := alice.startConversation(bob)
		onA := bob.as(a).stream("")

		var mu sync.Mutex
		var sent []apiMessage
		done := make(chan struct{})
		go func() {
			defer close(done)
			for i := range 80 {
				m := alice.send(conv.ID, fmt.Sprintf("m%d", i))
				mu.Lock()
				sent = append(sent, m)
				mu.Unlock()
			}
		}()
		waitFor(t, eventWait, "some messages sent", func() bool {
			mu.Lock()
			defer mu.Unlock()
			return len(sent) >= 20
		})
		if err := a.stop(t); err != nil {
			t.Fatalf("stop A: %v", err)
		}
		var got []string
		for ev := range onA.events { // until A ended the stream
			got = append(got, ev.Data)
		}
		onB := bob.as(b).stream(onA.lastEventID())
		<-done
		for i := len(got); i < 80; i++ {
			_, m := onB.nextMessage(eventWait)
			got = append(got, fmt.Sprintf(`{"id":"%s"`, m.ID))
		}
		onB.expectNone(100 * time.Millisecond)
		for i, data := range got {
			if !strings.HasPrefix(data, fmt.Sprintf(`{"id":"%s"`, sent[i].ID)) {
				t.Fatalf("message %d: got %s, want id %s", i, data, sent[i].ID)
			}
		}
	})
}

func mustParseURL(t *testing.T, s string) *url.URL {
	t.Helper()
	u, err := url.Parse(s)
	if err != nil {
		t.Fatal(err)
	}
	return u
}

// BenchmarkDeliveryLatency measures how long a message takes from the start of its
// send to its arrival on the receiver's stream, with the stream on the instance
// that took the send and on another instance, on each bus (go test -run '^$'
// -bench Delivery). Every delivery goes through the bus, the same instance's too;
// the difference is the cost of the second instance.
func BenchmarkDeliveryLatency(b *testing.B) {
	for _, bus := range []string{"postgres", "nats"} {
		b.Run(bus, func(b *testing.B) {
			var env []string
			if bus == "nats" {
				env = []string{"NATS_URL=" + newNATSServer(b).URL()}
			}
			benchmarkDeliveryLatency(b, env)
		})
	}
}

func benchmarkDeliveryLatency(b *testing.B, env []string) {
	a, other := newTestServer(b, env...), newTestServer(b, env...)
	alice, bob := a.newUser(b, "alice"), a.newUser(b, "bob")
	conv := alice.startConversation(bob)
	for _, tc := range []struct {
		name string
		on   *testServer
	}{{"same-instance", a}, {"cross-instance", other}} {
		b.Run(tc.name, func(b *testing.B) {
			s := bob.as(tc.on).stream("")
			var lat []time.Duration
			for b.Loop() {
				start := time.Now()
				m := alice.send(conv.ID, "ping")
				if _, got := s.nextMessage(eventWait); got.ID != m.ID {
					b.Fatalf("got %s, want %s", got.ID, m.ID)
				}
				lat = append(lat, time.Since(start))
			}
			slices.Sort(lat)
			pct := func(p float64) float64 {
				return float64(lat[int(p*float64(len(lat)-1))].Microseconds()) / 1000
			}
			b.ReportMetric(pct(0.5), "p50-ms")
			b.ReportMetric(pct(0.99), "p99-ms")
			s.close()
		})
	}
}
