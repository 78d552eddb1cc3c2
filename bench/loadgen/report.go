package main

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"
)

// The targets of the issue "Performance: measure sends and deliveries against the
// database's own limit".
const (
	targetRatio           = 0.7  // server sends/s ÷ pgbench tx/s
	targetDeliveryP99     = 25.0 // ms, at full load
	targetKBPerStream     = 12.0
	targetStreams         = 10000
	targetRateDeliveryP99 = 50.0 // ms, at the fixed rate with targetStreams open
)

// runReport reads the results of a `make bench` run and prints them as one table,
// which it also writes as Markdown.
func runReport(args []string) error {
	fset := newFlags("report")
	dir := fset.String("dir", "bench/out", "where the runs wrote their results")
	out := fset.String("out", "bench/out/results.md", "where to write the table")
	pgVersion := fset.String("pg-version", "", "PostgreSQL's version")
	commit := fset.String("commit", "", "the commit measured")
	if err := fset.Parse(args); err != nil {
		return err
	}
	var load loadResult
	if err := readJSON(filepath.Join(*dir, "load.json"), &load); err != nil {
		return err
	}
	runs := map[string]*pgbenchResult{}
	for _, name := range []string{"send", "notify-intx", "notify-after", "series", "series-after", "series-paced", "series-paced-half", "series-even", "series-even-half"} {
		var r pgbenchResult
		err := readJSON(filepath.Join(*dir, "pgbench-"+name+".json"), &r)
		if errors.Is(err, fs.ErrNotExist) && name != "send" {
			continue // the comparison was skipped
		}
		if err != nil {
			return err
		}
		runs[name] = &r
	}
	md := report(load, runs, machine(*pgVersion, *commit))
	var hubs hubsResult
	err := readJSON(filepath.Join(*dir, "hubs.json"), &hubs)
	switch {
	case err == nil:
		md += reportHubs(hubs, runs)
	case !errors.Is(err, fs.ErrNotExist):
		return err
	}
	fmt.Print(md)
	return os.WriteFile(*out, []byte(md), 0o644)
}

// machine describes where the benchmark ran, in one line.
func machine(pgVersion, commit string) string {
	model := "unknown CPU"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for line := range strings.SplitSeq(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				model = strings.TrimSpace(v)
				break
			}
		}
	}
	mem := "?"
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		for line := range strings.SplitSeq(string(b), "\n") {
			if rest, ok := strings.CutPrefix(line, "MemTotal:"); ok {
				kb, _ := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 64)
				mem = fmt.Sprintf("%.1f GiB", kb/(1<<20))
			}
		}
	}
	s := fmt.Sprintf("%d cores (%s), %s memory, PostgreSQL %s, %s/%s", runtime.NumCPU(), model, mem, pgVersion,
		runtime.GOOS, runtime.Version())
	if commit != "" {
		s += ", commit " + commit
	}
	return s
}

func report(load loadResult, runs map[string]*pgbenchResult, machine string) string {
	var b strings.Builder
	p := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	limit := runs["send"]
	send, rate, idle := load.Send, load.Rate, load.Idle
	ratio := 0.0
	if limit.TPS > 0 {
		ratio = send.PerSecond / limit.TPS
	}
	lost := send.LostReceiver + send.LostSender + rate.LostReceiver + rate.LostSender

	p("## `make bench`, %s\n\n", time.Now().UTC().Format("2006-01-02 15:04 MST"))
	p("Machine: %s.\n", machine)
	p("Load: %d users in %d conversations, one stream each; K = %d concurrent senders (pgbench: %d clients).\n",
		load.Users, load.Users/2, send.Senders, limit.Clients)
	p("Before the run the machine was %.2f of %d cores busy with other work.\n\n", load.Background.Machine, load.Background.Cores)

	p("| measure | result | target | |\n| --- | --- | --- | --- |\n")
	p("| the limit: pgbench on the send transaction (`send_messages`, one message), %d clients, %ds | %s tx/s (seconds from %s to %s; avg %.1f ms) | | |\n",
		limit.Clients, limit.Seconds, num(limit.TPS), num(limit.MinTPS), num(limit.MaxTPS), limit.LatencyMs)
	p("| server send throughput, %d HTTP senders, %s sends | %s sends/s | ≥ %s | %s |\n",
		send.Senders, num(float64(send.Attempted)), num(send.PerSecond), num(targetRatio*limit.TPS),
		verdict(ratio >= targetRatio))
	p("| server ÷ pgbench | %.2f | ≥ %.2f | %s |\n", ratio, targetRatio, verdict(ratio >= targetRatio))
	p("| send latency p50 / p99 | %.1f / %.1f ms | | |\n", send.SendP50, send.SendP99)
	p("| delivery latency p50 / p99 / max (send start → receiver's stream) | %.1f / %.1f / %.1f ms | p99 ≤ %.0f ms | %s |\n",
		send.DeliveryP50, send.DeliveryP99, send.DeliveryMax, targetDeliveryP99, verdict(send.DeliveryP99 <= targetDeliveryP99))
	p("| sends failed (not 201) | %d + %d | 0 | %s |\n", send.Failed, rate.Failed, verdict(send.Failed+rate.Failed == 0))
	p("| events lost (receiver / sender stream), both phases | %d / %d | 0 | %s |\n",
		send.LostReceiver+rate.LostReceiver, send.LostSender+rate.LostSender, verdict(lost == 0))
	p("| resident memory per idle stream (%s streams, VmRSS %s → %s KB) | %.1f KB (Go heap %.1f KB, stacks %.1f KB) | ≤ %.0f KB | %s |\n",
		num(float64(idle.Streams)), num(float64(idle.RSSBeforeKB)), num(float64(idle.RSSAfterKB)),
		idle.KBPerStream, idle.HeapKBPerStream, idle.StackKBPerStream, targetKBPerStream, verdict(idle.KBPerStream <= targetKBPerStream))
	p("| %s open streams at %s sends/s (%.0f achieved): delivery p50 / p99 / max | %.1f / %.1f / %.1f ms | p99 ≤ %.0f ms | %s |\n",
		num(float64(rate.Streams)), num(rate.TargetRate), rate.PerSecond, rate.DeliveryP50, rate.DeliveryP99,
		rate.DeliveryMax, targetRateDeliveryP99,
		verdict(rate.Streams >= targetStreams && rate.DeliveryP99 <= targetRateDeliveryP99 && rate.PerSecond >= 0.95*rate.TargetRate))
	p("| streams reconnected / failed / duplicate events | %d / %d / %d | 0 / 0 / 0 | %s |\n",
		load.Reconnects, load.Failures, load.Duplicates, verdict(load.Failures+load.Duplicates == 0))

	p("\nNOTIFY on the send path (pgbench, %d clients, %ds each; the server now notifies after the commit, one NOTIFY for whatever queued meanwhile):\n\n",
		limit.Clients, limit.Seconds)
	p("| variant | tx/s | slowest / fastest second | avg latency | vs (a) |\n| --- | --- | --- | --- | --- |\n")
	variants := []struct{ name, label string }{
		{"notify-intx", "(a) `pg_notify` inside the send transaction (the server before 2c3293f)"},
		{"send", "(b) the send transaction alone, no NOTIFY (the limit above)"},
		{"notify-after", "(c) (b), then one `SELECT pg_notify(…)` per send in its own transaction"},
	}
	base := runs["notify-intx"]
	for _, v := range variants {
		r := runs[v.name]
		if r == nil {
			p("| %s | skipped | | | |\n", v.label)
			continue
		}
		vs := ""
		if base != nil && base.TPS > 0 {
			vs = fmt.Sprintf("%.2f×", r.TPS/base.TPS)
		}
		p("| %s | %s | %s / %s | %.1f ms | %s |\n", v.label, num(r.TPS), num(r.MinTPS), num(r.MaxTPS), r.LatencyMs, vs)
	}

	p("\nWhere the CPU went (cores busy on average, of %d; \"other\" is work on the machine that is not the benchmark's):\n\n",
		load.Background.Cores)
	p("| run | PostgreSQL (bench database + cluster) | server | load generator or pgbench | other | whole machine |\n")
	p("| --- | --- | --- | --- | --- | --- |\n")
	worst := 0.0
	row := func(name string, c cpuSplit, server bool) {
		srv := ""
		if server {
			srv = fmt.Sprintf("%.2f", c.Server)
		}
		p("| %s | %.2f | %s | %.2f | %.2f | %.2f |\n", name, c.Postgres, srv, c.Load, c.other(), c.Machine)
		worst = max(worst, c.other())
	}
	for _, v := range variants {
		if r := runs[v.name]; r != nil {
			row("pgbench "+v.label[:3], r.CPU, false)
		}
	}
	row("server, sends as fast as possible", send.CPU, true)
	row(fmt.Sprintf("server, %s sends/s with %s streams", num(rate.TargetRate), num(float64(rate.Streams))), rate.CPU, true)
	if worst > 0.2 {
		p("\n**Other work took up to %.2f cores during a measurement: these numbers understate the server and the database; rerun on a quiet machine.**\n", worst)
	}
	if send.PerSecond > 0 && limit.TPS > 0 {
		p("\nCPU per send: pgbench (b) %.0f µs in PostgreSQL; server run %.0f µs in PostgreSQL + %.0f µs in the server + %.0f µs in the load generator.\n",
			1e6*limit.CPU.Postgres/limit.TPS, 1e6*send.CPU.Postgres/send.PerSecond, 1e6*send.CPU.Server/send.PerSecond,
			1e6*send.CPU.Load/send.PerSecond)
	}
	return b.String()
}

// The goals of issue 15.
const (
	goalRatio      = 1.0 // server msg/s ÷ the series' bare send, closed loop and saturation
	goalOpenP50    = 1.5 // ms, delivery in the open loops
	goalOpenP99    = 10.0
	goalCPUPer1000 = 1.0 // s, server + PostgreSQL, in the open loops
	goalKBPerIdle  = 9.9
)

// reportHubs is the table of issue 15's shapes: against the article series' bare
// send (pgbench in the same run: runs["series"]), and those of the realtime hubs
// comparison. With runs["series-after"], the bare send run again once the server's
// phases are over, the ratios are to the mean of the two, each ratio followed by
// its range against either run: on a shared machine the speed of both can move by
// half between them. The bare send paced at the open loops' rates, by pgbench -R
// (runs["series-paced"], runs["series-paced-half"]) and by loadgen bare on the open
// loops' own schedule (runs["series-even"], runs["series-even-half"]), is the
// database's own latency there.
func reportHubs(h hubsResult, runs map[string]*pgbenchResult) string {
	series, after := runs["series"], runs["series-after"]
	var b strings.Builder
	p := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	tps := h.SeriesTPS
	if series != nil {
		tps = series.TPS
	}
	if series != nil && after != nil {
		tps = (series.TPS + after.TPS) / 2
	}
	ratio := func(v float64) string {
		if tps <= 0 {
			return "—"
		}
		if series == nil || after == nil {
			return fmt.Sprintf("%.2f", v/tps)
		}
		lo, hi := v/max(series.TPS, after.TPS), v/min(series.TPS, after.TPS)
		return fmt.Sprintf("%.2f (%.2f–%.2f)", v/tps, lo, hi)
	}
	lostDup := func(ps phaseStats) string {
		return fmt.Sprintf("%d / %d", ps.LostReceiver+ps.LostSender, ps.Duplicates)
	}
	ok := func(ps phaseStats) bool { return ps.LostReceiver+ps.LostSender+ps.Duplicates+ps.Failed == 0 }
	p("\n### Issue 15: against the series' bare send, and the hubs' shapes\n\n")
	p("%d users in %d pairs; the second of each pair holds a stream and the first sends to it. Before the run the machine was %.2f of %d cores busy with other work.\n\n",
		h.Users, h.Users/2, h.Background.Machine, h.Background.Cores)
	p("| measure | result | goal | |\n| --- | --- | --- | --- |\n")
	if series != nil {
		p("| the series' bare send: pgbench on `bench/series_send.sql`, %d clients, prepared, %ds | %s tx/s (seconds from %s to %s; avg %.1f ms) | | |\n",
			series.Clients, series.Seconds, num(series.TPS), num(series.MinTPS), num(series.MaxTPS), series.LatencyMs)
		p("| the series' bare send: CPU per 1,000 transactions, PostgreSQL | %.2f s | | |\n", series.per1000(series.CPU.Postgres))
	}
	if series != nil && after != nil {
		p("| the series' bare send again, after the phases below | %s tx/s (seconds from %s to %s); the ratios below are to the mean, %s tx/s, and in brackets to either run | | |\n",
			num(after.TPS), num(after.MinTPS), num(after.MaxTPS), num(tps))
	}
	c := h.Closed
	p("| closed loop: %d senders, %s sends | %s msg/s, %s× the bare send | ≥ %.1f× | %s |\n",
		c.Senders, num(float64(c.Attempted)), num(c.PerSecond), ratio(c.PerSecond), goalRatio, verdict(tps > 0 && c.PerSecond >= goalRatio*tps))
	p("| closed loop: send p50 / p99; delivery p50 / p99 / max | %.1f / %.1f ms; %.1f / %.1f / %.1f ms | | |\n",
		c.SendP50, c.SendP99, c.DeliveryP50, c.DeliveryP99, c.DeliveryMax)
	srv, pg := c.cpuPer1000()
	p("| closed loop: CPU per 1,000 messages, server + PostgreSQL | %.2f + %.2f s | | |\n", srv, pg)
	ceiling := func(phase string, ps phaseStats) {
		if series == nil {
			return
		}
		// Against the first run of the bare send, the one whose CPU the ratios'
		// mean also starts from.
		bare := series.per1000(series.CPU.Postgres + series.CPU.Load)
		ours := ps.per1000(ps.CPU.Server + ps.CPU.Postgres + ps.CPU.Load)
		if ours <= 0 || bare <= 0 {
			return // no transaction or message, or a CPU not sampled
		}
		p("| %s: CPU per message of the whole path (server + PostgreSQL + load generator), against the bare send's (PostgreSQL + pgbench) | %.3f ms against %.3f ms: filled at this cost, the machine would send %.2f× the bare send | | |\n",
			phase, ours, bare, bare/ours)
	}
	batches := func(phase string, ps phaseStats) {
		if b := ps.Batches; b.PerSecond > 0 {
			p("| %s: the server's send transactions (from its /metrics) | %s a second, %.1f messages each on average; their round trips add up to %.0f %% of the phase's time | | |\n",
				phase, num(b.PerSecond), b.Messages, 100*b.Busy)
		}
	}
	batches("closed loop", c)
	ceiling("closed loop", c)
	p("| closed loop: failed, lost / duplicated | %d, %s | 0, 0 / 0 | %s |\n", c.Failed, lostDup(c), verdict(ok(c)))
	i := h.Idle
	p("| idle streams: %s, VmRSS %s → %s KB | %.1f KB a stream (Go heap %.1f, stacks %.1f) | ≤ %.1f KB | %s |\n",
		num(float64(i.Streams)), num(float64(i.RSSBeforeKB)), num(float64(i.RSSAfterKB)), i.KBPerStream,
		i.HeapKBPerStream, i.StackKBPerStream, goalKBPerIdle, verdict(i.KBPerStream <= goalKBPerIdle))
	for i, o := range []phaseStats{h.Open, h.OpenHalf} {
		if o.TargetRate == 0 {
			continue
		}
		suffix := []string{"", "-half"}[i]
		for _, f := range []struct{ name, how string }{
			{"series-paced" + suffix, "pgbench -R: arrivals at random; latency from each transaction's scheduled start"},
			{"series-even" + suffix, "loadgen bare: evenly spaced, as the open loop; latency from each transaction's release"},
		} {
			floor := runs[f.name]
			if floor == nil || floor.Rate <= 0 || floor.TPS <= 0 {
				continue
			}
			failed := ""
			if floor.Failed > 0 {
				failed = fmt.Sprintf("; **%d failed**", floor.Failed)
			}
			p("| the bare send alone at %s tx/s (%s; %d clients, %ds): latency p50 / p99; achieved rate; CPU per 1,000 transactions | %.1f / %.1f ms; %s tx/s%s; %.2f s PostgreSQL + %.2f s the client | | |\n",
				num(floor.Rate), f.how, floor.Clients, floor.Seconds, floor.P50Ms, floor.P99Ms, num(floor.TPS), failed,
				floor.per1000(floor.CPU.Postgres), floor.per1000(floor.CPU.Load))
		}
		srv, pg := o.cpuPer1000()
		p("| open loop at %s msg/s (%.0f achieved), %d streams: delivery p50 / p99 / max | %.1f / %.1f / %.1f ms | ≤ %.1f / ≤ %.0f ms | %s |\n",
			num(o.TargetRate), o.PerSecond, o.Streams, o.DeliveryP50, o.DeliveryP99, o.DeliveryMax, goalOpenP50, goalOpenP99,
			verdict(o.DeliveryP50 <= goalOpenP50 && o.DeliveryP99 <= goalOpenP99))
		p("| open loop at %s msg/s: send p50 / p99 | %.1f / %.1f ms | | |\n", num(o.TargetRate), o.SendP50, o.SendP99)
		p("| open loop at %s msg/s: CPU per 1,000 messages, server + PostgreSQL | %.2f + %.2f = %.2f s | ≤ %.1f s | %s |\n",
			num(o.TargetRate), srv, pg, srv+pg, goalCPUPer1000, verdict(srv+pg <= goalCPUPer1000))
		batches(fmt.Sprintf("open loop at %s msg/s", num(o.TargetRate)), o)
		p("| open loop at %s msg/s: failed, lost / duplicated | %d, %s | 0, 0 / 0 | %s |\n", num(o.TargetRate), o.Failed, lostDup(o), verdict(ok(o)))
	}
	s := h.Saturation
	srv, pg = s.cpuPer1000()
	p("| saturation: %d closed-loop publishers for %.0f s | %s msg/s, %s× the bare send | ≥ %.1f× | %s |\n",
		s.Senders, s.Seconds, num(s.PerSecond), ratio(s.PerSecond), goalRatio, verdict(tps > 0 && s.PerSecond >= goalRatio*tps))
	p("| saturation: send p50 / p99; delivery p50 / p99 | %.1f / %.1f ms; %.1f / %.1f ms | | |\n",
		s.SendP50, s.SendP99, s.DeliveryP50, s.DeliveryP99)
	p("| saturation: CPU per 1,000 messages, server + PostgreSQL | %.2f + %.2f s | | |\n", srv, pg)
	batches("saturation", s)
	ceiling("saturation", s)
	p("| saturation: failed, lost / duplicated | %d, %s | 0, 0 / 0 | %s |\n", s.Failed, lostDup(s), verdict(ok(s)))
	p("| streams reconnected / failed | %d / %d | 0 / 0 | %s |\n", h.Reconnects, h.Failures, verdict(h.Failures == 0))

	p("\nWhere the CPU went in these phases (cores busy on average, of %d):\n\n", h.Background.Cores)
	p("| phase | PostgreSQL | server | load generator | other | whole machine |\n| --- | --- | --- | --- | --- | --- |\n")
	type named struct {
		name string
		ps   phaseStats
	}
	for _, ph := range []named{{"closed loop", h.Closed}, {"open loop", h.Open}, {"open loop, half the bare send", h.OpenHalf}, {"saturation", h.Saturation}} {
		if ph.ps.Created == 0 {
			continue
		}
		cu := ph.ps.CPU
		p("| %s | %.2f | %.2f | %.2f | %.2f | %.2f |\n", ph.name, cu.Postgres, cu.Server, cu.Load, cu.other(), cu.Machine)
	}
	for _, ph := range []named{{fmt.Sprintf("the open loop at %s msg/s", num(h.Open.TargetRate)), h.Open}, {"saturation", h.Saturation}} {
		w := ph.ps.Waits
		if w.Samples == 0 {
			continue
		}
		p("\nPostgreSQL's client backends for the bench database during %s, from %d samples of `pg_stat_activity` (backends in each state, on average):\n\n",
			ph.name, w.Samples)
		p("| state / wait event | backends |\n| --- | --- |\n")
		keys := make([]string, 0, len(w.Seen))
		for k := range w.Seen {
			keys = append(keys, k)
		}
		slices.SortFunc(keys, func(a, b string) int { return w.Seen[b] - w.Seen[a] })
		for _, k := range keys {
			p("| %s | %.2f |\n", k, float64(w.Seen[k])/float64(w.Samples))
		}
	}
	return b.String()
}

func verdict(ok bool) string {
	if ok {
		return "pass"
	}
	return "**miss**"
}

// num formats n with thousands separators and no decimals.
func num(n float64) string {
	s := strconv.FormatInt(int64(n+0.5), 10)
	for i := len(s) - 3; i > 0; i -= 3 {
		s = s[:i] + "," + s[i:]
	}
	return s
}
