package main

import (
	"context"
	"fmt"
	"time"
)

// hubsResult is what runHubs measured; report reads it from hubs.json. The shapes
// are issue 15's: the closed loop against pgbench's bare send of the article
// series, and the comparison with the realtime hubs (Mercure, Centrifugo).
type hubsResult struct {
	Users      int        `json:"users"`
	SeriesTPS  float64    `json:"seriesTPS"` // pgbench's bare send of the series, this run
	Background cpuSplit   `json:"background"`
	Closed     phaseStats `json:"closed"`   // closed loop, a fixed number of sends
	Idle       idleStats  `json:"idle"`     // idle streams
	Open       phaseStats `json:"open"`     // open loop at a fixed rate
	OpenHalf   phaseStats `json:"openHalf"` // open loop at half SeriesTPS
	Saturation phaseStats `json:"saturation"`
	Reconnects int        `json:"reconnects"`
	Failures   int        `json:"streamFailures"`
}

// runHubs loads a freshly started server in the shapes of issue 15: users in pairs,
// the second of each pair holding a stream (the subscribers) and the first sending
// to it; a closed loop of -sends; -idle idle streams; an open loop at -rate and
// one at half the series' pgbench rate, each for -rate-seconds; a closed loop of
// -publishers for -saturation-seconds. The open loop at -rate and the saturation
// are profiled (the server's CPU through -pprof, PostgreSQL's wait events).
func runHubs(ctx context.Context, args []string) error {
	fs := newFlags("hubs")
	sf := addServerFlags(fs, 200, 5000, "users (even), in pairs; the second of each pair holds a stream")
	db, users, senders, sends, idle, warmup, grace, quiet := sf.db, sf.users, sf.senders, sf.sends, sf.idle, sf.warmup, sf.grace, sf.quiet
	rate := fs.Float64("rate", 500, "sends a second of the first open loop")
	rateSeconds := fs.Float64("rate-seconds", 20, "length of each open loop")
	series := fs.String("series", "", "pgbench-series.json: the second open loop runs at half its rate (none without it)")
	publishers := fs.Int("publishers", 32, "concurrent senders at saturation")
	satSeconds := fs.Float64("saturation-seconds", 15, "length of the saturation phase")
	pprofURL := fs.String("pprof", "", "the server's PPROF_ADDR as a URL, to profile its CPU")
	profSeconds := fs.Int("profile-seconds", 10, "length of each CPU profile")
	pgURL := fs.String("pg-url", "", "a database of the cluster other than -db, to sample wait events from")
	dir := fs.String("dir", "bench/out", "where the profiles go")
	out := fs.String("out", "bench/out/hubs.json", "where to write the results")
	if err := fs.Parse(args); err != nil {
		return err
	}
	res := hubsResult{Users: *users}
	if *series != "" {
		var r pgbenchResult
		if err := readJSON(*series, &r); err != nil {
			return err
		}
		res.SeriesTPS = r.TPS
	}
	// A CPU profile no longer than the phases it profiles.
	profileFor := max(min(*profSeconds, int(*rateSeconds), int(*satSeconds)), 1)
	prof, err := newProfiler(*pprofURL, profileFor, *pgURL, *db, *dir)
	if err != nil {
		return err
	}
	l, err := sf.newLoadRun(ctx, max(*publishers, 64))
	if err != nil {
		return err
	}
	l.oneWay = true
	streamCtx, closeStreams := context.WithCancel(ctx)
	defer closeStreams()
	if err := l.prepare(ctx, streamCtx, *users, true); err != nil {
		return err
	}
	logf("hubs: %d users in %d pairs, %d streams", *users, len(l.conversations), l.openStreams())
	if _, err := l.phase(ctx, phaseSpec{workers: *senders, count: *warmup, grace: *grace}); err != nil {
		return err
	}
	if res.Background, err = quiet.wait(); err != nil {
		return err
	}
	show := func(name string, ps phaseStats) {
		srv, pg := ps.cpuPer1000()
		logf("%s: %.0f msg/s, send p50 %.1fms p99 %.1fms, delivery p50 %.1fms p99 %.1fms, CPU per 1,000 msgs %.2fs server + %.2fs PostgreSQL, lost %d, duplicated %d",
			name, ps.PerSecond, ps.SendP50, ps.SendP99, ps.DeliveryP50, ps.DeliveryP99, srv, pg, ps.LostReceiver, ps.Duplicates)
	}
	if res.Closed, err = l.phase(ctx, phaseSpec{workers: *senders, count: *sends, grace: *grace}); err != nil {
		return err
	}
	show("closed loop", res.Closed)

	if res.Idle, err = l.idleStreams(ctx, streamCtx, *idle); err != nil {
		return err
	}
	logf("idle: %d streams, resident %d → %d KB, %.1f KB a stream",
		res.Idle.Streams, res.Idle.RSSBeforeKB, res.Idle.RSSAfterKB, res.Idle.KBPerStream)

	open := func(rate float64, name string, p *profiler) (phaseStats, error) {
		if _, err := quiet.wait(); err != nil {
			return phaseStats{}, err
		}
		ps, err := l.phase(ctx, phaseSpec{workers: 64, rate: rate, duration: seconds(*rateSeconds), grace: *grace,
			profile: p, name: name})
		if err == nil {
			show(fmt.Sprintf("open loop at %.0f/s", rate), ps)
		}
		return ps, err
	}
	if res.Open, err = open(*rate, "open", prof); err != nil {
		return err
	}
	if res.SeriesTPS > 0 {
		if res.OpenHalf, err = open(res.SeriesTPS/2, "open-half", nil); err != nil {
			return err
		}
	}
	if _, err := quiet.wait(); err != nil {
		return err
	}
	res.Saturation, err = l.phase(ctx, phaseSpec{workers: *publishers, duration: seconds(*satSeconds), grace: *grace,
		profile: prof, name: "saturation"})
	if err != nil {
		return err
	}
	show("saturation", res.Saturation)

	closeStreams()
	if res.Reconnects, res.Failures, err = l.streamsEnded(); err != nil {
		return err
	}
	return writeJSON(*out, res)
}

func seconds(s float64) time.Duration { return time.Duration(s * float64(time.Second)) }
