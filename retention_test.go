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
// HTTP, each to a receiver of its own) with a log holding 400,000 events past the
// retention, in three cases that take turns for 3 rounds: without the index on
// created_at that the pruner needs (pruner off), with it (pruner off), and with the
// pruner deleting those events while the sends run. For the last it also reports
// how long the pruning took and the sends' rate meanwhile (docs/limits.md):
//
//	go test -run '^$' -bench SendsWhilePruning -benchtime 10000x .
func BenchmarkSendsWhilePruning(b *testing.B) {
	const senders, oldUsers, oldPerUser, rounds = 16, 400, 1000, 3
	seed := newTestServer(b) // applies the schema
	seed.stop(b)
	mustExec := func(q string, args ...any) {
		if _, err := seed.DB.Exec(q, args...); err != nil {
			b.Fatalf("%s: %v", q, err)
		}
	}
	type benchCase struct {
		name    string
		env     []string
		noIndex bool
		prunes  bool
	}
	var cases []benchCase
	// The cases take turns, so that the machine's changing load falls on each alike.
	for range rounds {
		cases = append(cases,
			benchCase{"no-index", []string{"EVENT_PRUNE_INTERVAL=1000h"}, true, false},
			benchCase{"pruner-off", []string{"EVENT_PRUNE_INTERVAL=1000h"}, false, false},
			benchCase{"pruner-on", []string{"EVENT_PRUNE_INTERVAL=10ms"}, false, true})
	}
	for _, tc := range cases {
		b.Run(tc.name, func(b *testing.B) {
			// Start from a log whose only old events are these.
			mustExec(`DELETE FROM events WHERE created_at < now() - interval '1 day'`)
			mustExec(`
				WITH u AS (
					INSERT INTO users (username, event_seq)
					SELECT 'old_' || $1 || '_' || g, $3 FROM generate_series(1, $2::int) g RETURNING id)
				INSERT INTO events (user_id, seq, kind, payload, created_at)
				SELECT u.id, s, 'read', '{}', now() - interval '30 days' FROM u, generate_series(1, $3::int) s`,
				randomHex(4), oldUsers, oldPerUser)
			mustExec(`VACUUM ANALYZE events`)
			ts := newTestServer(b, append(tc.env, "EVENT_RETENTION=24h")...)
			if tc.noIndex {
				mustExec(`DROP INDEX events_created`) // the next server puts it back
			}

			var pairs [][2]string // token, conversation
			for i := range senders {
				s, r := ts.newUser(b, fmt.Sprintf("s%d", i)), ts.newUser(b, fmt.Sprintf("r%d", i))
				pairs = append(pairs, [2]string{s.Token, s.startConversation(r).ID})
			}
			jobs := make(chan struct{}, senders)
			var sent, failed atomic.Int64
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
						} else {
							sent.Add(1)
						}
						if err == nil {
							resp.Body.Close()
						}
					}
				})
			}
			// How long the pruning took, and how many sends went through meanwhile.
			var pruneTime time.Duration
			var sentWhilePruning int64
			start := time.Now()
			watching := make(chan struct{})
			var watch sync.WaitGroup
			if tc.prunes {
				watch.Go(func() {
					for metricValue(b, ts, "messenger_events_pruned_total") < oldUsers*oldPerUser {
						select {
						case <-watching:
							return
						case <-time.After(100 * time.Millisecond):
						}
					}
					pruneTime, sentWhilePruning = time.Since(start), sent.Load()
				})
			}
			for b.Loop() {
				jobs <- struct{}{}
			}
			close(jobs)
			wg.Wait()
			elapsed := time.Since(start)
			close(watching)
			watch.Wait()
			if n := failed.Load(); n > 0 {
				b.Fatalf("%d sends failed", n)
			}
			b.ReportMetric(float64(b.N)/elapsed.Seconds(), "sends/s")
			if pruneTime > 0 {
				b.ReportMetric(pruneTime.Seconds(), "prune-s")
				b.ReportMetric(float64(sentWhilePruning)/pruneTime.Seconds(), "sends/s-while-pruning")
			}
			b.Logf("%d sends in %v; pruned %v events in %v", b.N, elapsed.Round(time.Millisecond),
				metricValue(b, ts, "messenger_events_pruned_total"), pruneTime.Round(time.Millisecond))
		})
	}
}
