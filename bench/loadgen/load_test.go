package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// drain counts the tokens of a schedule until it is closed, failing after limit.
func drain(t *testing.T, jobs <-chan time.Time, limit time.Duration) int {
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
	if n := drain(t, schedule(ctx, phaseSpec{count: 7}, time.Now()), 5*time.Second); n != 7 {
		t.Errorf("closed loop of 7 sends: %d tokens", n)
	}
	// An open loop of 200 a second for 0.1 s: 20 tokens, spread over about 0.1 s.
	begin := time.Now()
	if n := drain(t, schedule(ctx, phaseSpec{rate: 200, duration: 100 * time.Millisecond}, begin), 5*time.Second); n != 20 {
		t.Errorf("open loop: %d tokens, want 20", n)
	}
	if took := time.Since(begin); took < 90*time.Millisecond {
		t.Errorf("open loop of 0.1 s done after %v: not paced", took)
	}
	// A closed loop for a duration hands out tokens as fast as they are taken, and
	// stops when the time is up.
	begin = time.Now()
	n := drain(t, schedule(ctx, phaseSpec{duration: 100 * time.Millisecond}, begin), 5*time.Second)
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

// reportHas fails t for each of want that the report md lacks.
func reportHas(t *testing.T, md string, want ...string) {
	t.Helper()
	for _, w := range want {
		if !strings.Contains(md, w) {
			t.Errorf("report lacks %q:\n%s", w, md)
		}
	}
}

func TestReportHubsVerdicts(t *testing.T) {
	ok := phaseStats{Senders: 16, Attempted: 100, Created: 100, PerSecond: 2000, TargetRate: 500,
		DeliveryP50: 1, DeliveryP99: 5, CPU: cpuSplit{Seconds: 1, Server: 0.02, Postgres: 0.03}}
	lost := ok
	lost.LostReceiver, lost.Duplicates = 2, 1
	md := reportHubs(hubsResult{Users: 200, Closed: ok, Open: ok, Saturation: lost,
		Idle: idleStats{Streams: 5000, KBPerStream: 9.5}}, map[string]*pgbenchResult{"series": {Clients: 16, Seconds: 10, TPS: 1000}})
	reportHas(t, md,
		"| closed loop: 16 senders, 100 sends | 2,000 msg/s, 2.00× the bare send | ≥ 1.0× | pass |",
		"| saturation: failed, lost / duplicated | 0, 2 / 1 | 0, 0 / 0 | **miss** |",
		"| open loop at 500 msg/s: CPU per 1,000 messages, server + PostgreSQL | 0.20 + 0.30 = 0.50 s | ≤ 1.0 s | pass |",
		"9.5 KB a stream",
	)
}

// TestReportHubsBareSendTwice: with the bare send run before and after the phases,
// the ratios are to their mean, with the range against either run.
func TestReportHubsBareSendTwice(t *testing.T) {
	ok := phaseStats{Senders: 16, Attempted: 100, Created: 100, PerSecond: 2000}
	md := reportHubs(hubsResult{Users: 200, Closed: ok, Saturation: ok}, map[string]*pgbenchResult{
		"series":       {Clients: 16, Seconds: 10, TPS: 1500},
		"series-after": {Clients: 16, Seconds: 10, TPS: 2500}})
	reportHas(t, md,
		"| the series' bare send again, after the phases below | 2,500 tx/s",
		"the ratios below are to the mean, 2,000 tx/s",
		"| closed loop: 16 senders, 100 sends | 2,000 msg/s, 1.00 (0.80–1.33)× the bare send | ≥ 1.0× | pass |",
	)
}

// TestReportHubsCeilingAndFloor: the report sets the whole path's CPU per message
// against the bare send's, and shows the bare send's own latency at the open
// loop's rate.
func TestReportHubsCeilingAndFloor(t *testing.T) {
	closed := phaseStats{Senders: 16, Attempted: 100, Created: 100, PerSecond: 250,
		CPU: cpuSplit{Seconds: 1, Server: 0.1, Postgres: 0.2, Load: 0.1}}
	open := closed
	open.TargetRate = 500
	open.Batches = batchesBetween(sendBatches{count: 10, messages: 12, seconds: 0.01},
		sendBatches{count: 410, messages: 512, seconds: 0.61}, 1) // 500 messages in 400 batches, 0.6 s
	half := closed
	half.TargetRate = 250
	noCPU := phaseStats{Senders: 32, Created: 100, PerSecond: 100} // its CPU not sampled
	md := reportHubs(hubsResult{Users: 200, Closed: closed, Open: open, OpenHalf: half, Saturation: noCPU}, map[string]*pgbenchResult{
		"series": {Clients: 16, Seconds: 10, TPS: 1000, CPU: cpuSplit{Postgres: 0.9, Load: 0.1}},
		"series-paced": {Clients: 16, Seconds: 10, Rate: 500, P50Ms: 0.8, P99Ms: 2.5, TPS: 500,
			CPU: cpuSplit{Postgres: 0.25, Load: 0.1}},
		"series-even": {Clients: 16, Seconds: 10, Rate: 500, P50Ms: 1, P99Ms: 3, TPS: 490, Failed: 3,
			CPU: cpuSplit{Postgres: 0.24, Load: 0.14}},
		// Not paced (an old result, or a run without -rate): no row.
		"series-paced-half": {Clients: 16, Seconds: 10, TPS: 3000}})
	reportHas(t, md,
		"| 4.000 ms against 1.000 ms: filled at this cost, the machine would send 0.25× the bare send |",
		"| the bare send alone at 500 tx/s (pgbench -R: arrivals at random; latency from each transaction's scheduled start; 16 clients, 10s): latency p50 / p99; achieved rate; CPU per 1,000 transactions | 0.8 / 2.5 ms; 500 tx/s; 0.50 s PostgreSQL + 0.20 s the client |",
		"| open loop at 500 msg/s: the server's send transactions (from its /metrics) | 400 a second, 1.2 messages each on average; their round trips add up to 60 % of the phase's time |",
		"| the bare send alone at 500 tx/s (loadgen bare: evenly spaced, as the open loop; latency from each transaction's release; 16 clients, 10s): latency p50 / p99; achieved rate; CPU per 1,000 transactions | 1.0 / 3.0 ms; 490 tx/s; **3 failed**; 0.49 s PostgreSQL + 0.29 s the client |",
	)
	if strings.Contains(md, "saturation: CPU per message") {
		t.Errorf("report has a CPU row of a phase whose CPU was not sampled:\n%s", md)
	}
	if strings.Count(md, "send transactions") != 1 {
		t.Errorf("report has a send transactions row for a phase without them:\n%s", md)
	}
	if got := batchesBetween(sendBatches{count: 5}, sendBatches{count: 5}, 1); got != (batchStats{}) {
		t.Errorf("no transaction between two reads gave %+v, want none", got)
	}
	if strings.Count(md, "the bare send alone at") != 2 {
		t.Errorf("report has a row for a bare send that was not paced:\n%s", md)
	}
}

// TestTxLatencies reads pgbench's per-transaction logs of a paced run, one file a
// thread, with each latency counted from the transaction's scheduled start, and
// leaves failed transactions out.
func TestTxLatencies(t *testing.T) {
	prefix := filepath.Join(t.TempDir(), "tx")
	// client_id transaction_no time script_no time_epoch time_us schedule_lag
	write := func(name, lines string) {
		if err := os.WriteFile(name, []byte(lines), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write(prefix+".77", "0 0 1000 0 1700000000 1 500\n1 0 2000 0 1700000000 2 0\n\n")
	write(prefix+".77.1", "2 0 3000 0 1700000000 3 0\n3 0 failed 0 1700000000 4 0\n3 1 4000 0 1700000000 5 3000\n")
	p50, p99, err := txLatencies(prefix)
	if err != nil {
		t.Fatal(err)
	}
	// From the scheduled start, lag included: 1.0, 2.0, 3.0 and 4.0 ms.
	if p50 != 2 || p99 != 4 {
		t.Errorf("p50, p99 = %v, %v; want 2, 4", p50, p99)
	}
	write(prefix+".78", "0 0 1500 0 1700000000 1\n")
	if _, _, err := txLatencies(prefix); err == nil {
		t.Error("a log without schedule lag (a run without -R) was read")
	}
	if _, _, err := txLatencies(filepath.Join(t.TempDir(), "tx")); err == nil {
		t.Error("no log at all was read")
	}
	only := filepath.Join(t.TempDir(), "tx")
	write(only+".79", "0 0 failed 0 1700000000 1 0\n")
	if _, _, err := txLatencies(only); err == nil {
		t.Error("a log of failed transactions only gave latencies")
	}
}

// TestScheduleReleaseTimes: an open loop's tokens carry the time each was
// released, no earlier than its due time and no later than timerSlack after it; a
// closed loop's carry none; and a send counts as started at that time, so that a
// wait for a free worker is part of its latency.
func TestScheduleReleaseTimes(t *testing.T) {
	begin := time.Now()
	var got []time.Time
	for released := range schedule(context.Background(), phaseSpec{rate: 200, duration: 50 * time.Millisecond}, begin) {
		got = append(got, released)
	}
	if len(got) != 10 {
		t.Fatalf("%d tokens, want 10", len(got))
	}
	for i, released := range got {
		due := begin.Add(time.Duration(i) * 5 * time.Millisecond)
		if released.Before(due) || released.After(due.Add(timerSlack)) {
			t.Errorf("token %d counts from %v after begin, want from its due time %v to %v later",
				i, released.Sub(begin), due.Sub(begin), timerSlack)
		}
	}
	// A schedule held up (here: begun 50 ms ago) releases its late tokens at once,
	// each counting from its due time plus timerSlack at most, not from now.
	late := time.Now().Add(-50 * time.Millisecond)
	i := 0
	for released := range schedule(context.Background(), phaseSpec{rate: 200, duration: 20 * time.Millisecond}, late) {
		if due := late.Add(time.Duration(i) * 5 * time.Millisecond); released.After(due.Add(timerSlack)) {
			t.Errorf("late token %d counts from %v after its due time, want at most %v", i, released.Sub(due), timerSlack)
		}
		i++
	}
	for released := range schedule(context.Background(), phaseSpec{count: 3}, begin) {
		if !released.IsZero() {
			t.Errorf("a closed loop's token carries %v", released)
		}
	}
	now := time.Now()
	earlier := now.Add(-20 * time.Millisecond)
	if s := startOf(earlier, now); !s.Equal(earlier) {
		t.Errorf("a send released 20 ms ago starts %v ago, want at its release", now.Sub(s))
	}
	if s := startOf(time.Time{}, now); !s.Equal(now) {
		t.Error("a closed loop's send does not start when it is taken")
	}
	if s := startOf(now.Add(time.Second), now); !s.Equal(now) {
		t.Error("a send released in the future starts in the future")
	}
}
