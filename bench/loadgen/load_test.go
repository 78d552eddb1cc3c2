package main

import (
	"context"
	"strings"
	"testing"
	"time"
)

// drain counts the tokens of a schedule until it is closed, failing after limit.
func drain(t *testing.T, jobs <-chan struct{}, limit time.Duration) int {
	t.Helper()
	n := 0
	deadline := time.After(limit)
	for {
		select {
		case _, ok := <-jobs:
			if !ok {
				return n
			}
			n++
		case <-deadline:
			t.Fatalf("schedule still open after %v (%d tokens)", limit, n)
		}
	}
}

func TestScheduleShapes(t *testing.T) {
	ctx := context.Background()
	l := &loadRun{}
	if n := drain(t, l.schedule(ctx, phaseSpec{count: 7}, time.Now()), 5*time.Second); n != 7 {
		t.Errorf("closed loop of 7 sends: %d tokens", n)
	}
	// An open loop of 200 a second for 0.1 s: 20 tokens, spread over about 0.1 s.
	begin := time.Now()
	if n := drain(t, l.schedule(ctx, phaseSpec{rate: 200, duration: 100 * time.Millisecond}, begin), 5*time.Second); n != 20 {
		t.Errorf("open loop: %d tokens, want 20", n)
	}
	if took := time.Since(begin); took < 90*time.Millisecond {
		t.Errorf("open loop of 0.1 s done after %v: not paced", took)
	}
	// A closed loop for a duration hands out tokens as fast as they are taken, and
	// stops when the time is up.
	begin = time.Now()
	n := drain(t, l.schedule(ctx, phaseSpec{duration: 100 * time.Millisecond}, begin), 5*time.Second)
	if n == 0 || time.Since(begin) < 100*time.Millisecond {
		t.Errorf("closed loop for 0.1 s: %d tokens in %v", n, time.Since(begin))
	}
}

func TestCPUPer1000(t *testing.T) {
	ps := phaseStats{Created: 500, CPU: cpuSplit{Seconds: 2, Server: 0.25, Postgres: 0.5}}
	srv, pg := ps.cpuPer1000()
	// 0.25 cores for 2 s is 0.5 CPU s for 500 messages: 1 s per 1,000.
	if srv != 1 || pg != 2 {
		t.Errorf("cpuPer1000 = %v, %v; want 1, 2", srv, pg)
	}
	if srv, pg := (phaseStats{}).cpuPer1000(); srv != 0 || pg != 0 {
		t.Errorf("no messages: %v, %v; want 0, 0", srv, pg)
	}
}

func TestReportHubsVerdicts(t *testing.T) {
	ok := phaseStats{Senders: 16, Attempted: 100, Created: 100, PerSecond: 2000, TargetRate: 500,
		DeliveryP50: 1, DeliveryP99: 5, CPU: cpuSplit{Seconds: 1, Server: 0.02, Postgres: 0.03}}
	lost := ok
	lost.LostReceiver, lost.Duplicates = 2, 1
	md := reportHubs(hubsResult{Users: 200, Closed: ok, Open: ok, Saturation: lost,
		Idle: idleStats{Streams: 5000, KBPerStream: 9.5}}, &pgbenchResult{Clients: 16, Seconds: 10, TPS: 1000}, nil)
	for _, want := range []string{
		"| closed loop: 16 senders, 100 sends | 2,000 msg/s, 2.00× the bare send | ≥ 1.0× | pass |",
		"| saturation: failed, lost / duplicated | 0, 2 / 1 | 0, 0 / 0 | **miss** |",
		"| open loop at 500 msg/s: CPU per 1,000 messages, server + PostgreSQL | 0.20 + 0.30 = 0.50 s | ≤ 1.0 s | pass |",
		"9.5 KB a stream",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("report lacks %q:\n%s", want, md)
		}
	}
}

// TestReportHubsBareSendTwice: with the bare send run before and after the phases,
// the ratios are to their mean, with the range against either run.
func TestReportHubsBareSendTwice(t *testing.T) {
	ok := phaseStats{Senders: 16, Attempted: 100, Created: 100, PerSecond: 2000}
	md := reportHubs(hubsResult{Users: 200, Closed: ok, Saturation: ok},
		&pgbenchResult{Clients: 16, Seconds: 10, TPS: 1500}, &pgbenchResult{Clients: 16, Seconds: 10, TPS: 2500})
	for _, want := range []string{
		"| the series' bare send again, after the phases below | 2,500 tx/s",
		"the ratios below are to the mean, 2,000 tx/s",
		"| closed loop: 16 senders, 100 sends | 2,000 msg/s, 1.00 (0.80–1.33)× the bare send | ≥ 1.0× | pass |",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("report lacks %q:\n%s", want, md)
		}
	}
}
