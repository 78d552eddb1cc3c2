package main

import (
	"fmt"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// BenchmarkSendsWhilePruning measures send throughput (16 concurrent senders over
// HTTP, each to a receiver of its own) with a log of oldEvents events past the
// retention, first with the pruner off, then with the pruner deleting them while
// the sends run:
//
//	go test -run '^$' -bench SendsWhilePruning -benchtime 20000x .
func BenchmarkSendsWhilePruning(b *testing.B) {
	const senders, oldUsers, oldPerUser = 16, 400, 1000
	seed := newTestServer(b)
	tag := randomHex(4)
	if _, err := seed.DB.Exec(`
		WITH u AS (
			INSERT INTO users (username, event_seq)
			SELECT 'old_' || $1 || '_' || g, $3 FROM generate_series(1, $2::int) g RETURNING id)
		INSERT INTO events (user_id, seq, kind, payload, created_at)
		SELECT u.id, s, 'read', '{}', now() - interval '30 days' FROM u, generate_series(1, $3::int) s`,
		tag, oldUsers, oldPerUser); err != nil {
		b.Fatal(err)
	}
	seed.DB.Exec(`VACUUM ANALYZE events`)
	oldCount := func(ts *testServer) (n int) {
		ts.DB.QueryRow(`SELECT count(*) FROM events WHERE user_id IN (SELECT id FROM users WHERE username LIKE 'old\_' || $1 || '\_%')`, tag).Scan(&n)
		return n
	}
	b.Logf("%d old events in the log", oldCount(seed))
	seed.stop(b)

	for _, tc := range []struct {
		name string
		env  []string
	}{
		{"pruner-off", []string{"EVENT_RETENTION=24h", "EVENT_PRUNE_INTERVAL=1000h"}},
		{"pruner-on", []string{"EVENT_RETENTION=24h", "EVENT_PRUNE_INTERVAL=10ms"}},
	} {
		b.Run(tc.name, func(b *testing.B) {
			ts := newTestServer(b, tc.env...)
			var pairs [][2]string // token, conversation
			for i := range senders {
				s, r := ts.newUser(b, fmt.Sprintf("s%d", i)), ts.newUser(b, fmt.Sprintf("r%d", i))
				pairs = append(pairs, [2]string{s.Token, s.startConversation(r).ID})
			}
			jobs := make(chan struct{}, senders)
			var failed atomic.Int64
			var wg sync.WaitGroup
			for _, p := range pairs {
				wg.Go(func() {
					for range jobs {
						req, _ := http.NewRequest("POST", ts.URL+"/api/conversations/"+p[1]+"/messages", strings.NewReader(`{"content":"hi"}`))
						req.Header.Set("Content-Type", "application/json")
						req.Header.Set("Authorization", "Bearer "+p[0])
						resp, err := http.DefaultClient.Do(req)
						if err != nil || resp.StatusCode != http.StatusCreated {
							failed.Add(1)
						}
						if err == nil {
							resp.Body.Close()
						}
					}
				})
			}
			start := time.Now()
			for b.Loop() {
				jobs <- struct{}{}
			}
			close(jobs)
			wg.Wait()
			elapsed := time.Since(start)
			if n := failed.Load(); n > 0 {
				b.Fatalf("%d sends failed", n)
			}
			b.ReportMetric(float64(b.N)/elapsed.Seconds(), "sends/s")
			b.ReportMetric(metricValue(b, ts, "messenger_events_pruned_total"), "pruned")
			b.Logf("%d sends in %v; old events left: %d", b.N, elapsed.Round(time.Millisecond), oldCount(ts))
		})
	}
}
