package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// loadResult is what runLoad measured; report reads it from load.json.
type loadResult struct {
	Users      int        `json:"users"`
	Background cpuSplit   `json:"background"` // the machine at rest, just before the sends
	Send       phaseStats `json:"send"`       // as fast as the senders go
	Idle       idleStats  `json:"idle"`
	Rate       phaseStats `json:"rate"` // at a fixed rate, with the idle streams open
	Reconnects int        `json:"reconnects"`
	Failures   int        `json:"streamFailures"` // streams that could not stay open
	Duplicates int        `json:"duplicates"`     // message events read twice on one stream
}

// phaseStats describes one phase of sends and their deliveries. Times are in
// milliseconds.
type phaseStats struct {
	Streams      int        `json:"streams"` // open while it ran
	Senders      int        `json:"senders"`
	TargetRate   float64    `json:"targetRate"` // sends a second asked for; 0: as fast as possible
	Attempted    int        `json:"attempted"`
	Created      int        `json:"created"` // answered 201
	Failed       int        `json:"failed"`  // any other answer, or none
	Seconds      float64    `json:"seconds"` // first send to last answer
	PerSecond    float64    `json:"perSecond"`
	SendP50      float64    `json:"sendP50"`
	SendP99      float64    `json:"sendP99"`
	DeliveryP50  float64    `json:"deliveryP50"`
	DeliveryP99  float64    `json:"deliveryP99"`
	DeliveryMax  float64    `json:"deliveryMax"`
	LostReceiver int        `json:"lostReceiver"` // 201 messages that never reached the receiver's stream
	LostSender   int        `json:"lostSender"`   // nor the sender's own stream (when it has one)
	Duplicates   int        `json:"duplicates"`   // this phase's messages read twice on one stream
	CPU          cpuSplit   `json:"cpu"`
	Waits        waitTally  `json:"waits,omitempty"` // PostgreSQL's wait events, when sampled
	Batches      batchStats `json:"batches"`         // the server's send transactions, from /metrics
}

// batchStats is what the server's send transactions did in a phase, from the
// difference of two reads of its /metrics: zero where the server has no such
// metrics.
type batchStats struct {
	PerSecond float64 `json:"perSecond"` // transactions a second
	Messages  float64 `json:"messages"`  // messages a transaction, on average
	// Busy is the share of the phase's time that a transaction was in flight:
	// near 1, the next batch waits for the last.
	Busy float64 `json:"busy"`
}

// sendBatches is the server's running count of send transactions, of the
// messages they carried, and of the seconds they took, from GET /metrics.
type sendBatches struct{ count, messages, seconds float64 }

// sendBatches reads the server's send transaction counters. ok is false if they
// cannot be read: a server without them, or one whose /metrics is on a port of
// its own (METRICS_ADDR); the report then has no row for them.
func (c *client) sendBatches(ctx context.Context) (sb sendBatches, ok bool) {
	names := []string{"messenger_send_batch_duration_seconds_count", "messenger_send_batch_messages_sum",
		"messenger_send_batch_duration_seconds_sum"}
	m, err := c.metrics(ctx, names...)
	if err != nil || len(m) < len(names) {
		return sb, false
	}
	return sendBatches{count: m[names[0]], messages: m[names[1]], seconds: m[names[2]]}, true
}

// batchesBetween is what the send transactions did from a to b, over seconds.
func batchesBetween(a, b sendBatches, seconds float64) batchStats {
	n := b.count - a.count
	if n <= 0 || seconds <= 0 {
		return batchStats{}
	}
	return batchStats{PerSecond: n / seconds, Messages: (b.messages - a.messages) / n, Busy: (b.seconds - a.seconds) / seconds}
}

// cpuPer1000 returns the CPU seconds that the server and PostgreSQL spent per
// 1,000 messages created in the phase.
func (ps phaseStats) cpuPer1000() (server, postgres float64) {
	return ps.per1000(ps.CPU.Server), ps.per1000(ps.CPU.Postgres)
}

// per1000 returns what cores busy on average through the phase come to, in CPU
// seconds per 1,000 messages created (0 if none was).
func (ps phaseStats) per1000(cores float64) float64 {
	if ps.Created == 0 {
		return 0
	}
	return cores * ps.CPU.Seconds / float64(ps.Created) * 1000
}

// phaseSpec says how a phase sends: workers goroutines send count messages, or,
// with duration > 0, for that long; with rate > 0 the sends start at that many a
// second (an open loop), otherwise each worker sends again as soon as it is
// answered (a closed loop). profile, when set, profiles the phase.
type phaseSpec struct {
	workers  int
	count    int
	rate     float64
	duration time.Duration
	grace    time.Duration
	profile  *profiler
	name     string // of the profile files
}

// idleStats is the memory the server holds for idle streams.
type idleStats struct {
	Streams          int     `json:"streams"`
	OpenSeconds      float64 `json:"openSeconds"`
	RSSBeforeKB      int64   `json:"rssBeforeKB"`
	RSSAfterKB       int64   `json:"rssAfterKB"`
	KBPerStream      float64 `json:"kbPerStream"`
	HeapKBPerStream  float64 `json:"heapKBPerStream"`  // Go heap in use, from /metrics
	StackKBPerStream float64 `json:"stackKBPerStream"` // goroutine stacks in use, from /metrics
	GoroutinesPerStr float64 `json:"goroutinesPerStream"`
}

// loadRun is the state of one runLoad: the users, their streams, and what they read.
type loadRun struct {
	c         *client
	meter     cpuMeter
	serverPid int

	users         []string       // tokens of the active users, by index
	conversations []int64        // conversation i is between users 2i and 2i+1
	streams       []*eventStream // by user index; nil for a user without a stream
	idle          []*eventStream
	oneWay        bool         // the first user of each pair sends, the second receives
	delivered     atomic.Int64 // message events read, on every stream
}

// serverFlags are the flags of the subcommands that load a running server.
type serverFlags struct {
	base      *string
	serverPid *int
	db        *string
	users     *int
	senders   *int
	sends     *int
	idle      *int
	warmup    *int
	grace     *time.Duration
	quiet     quietFlags
}

func addServerFlags(fs *flag.FlagSet, users, idle int, usersHelp string) serverFlags {
	return serverFlags{
		base:      fs.String("url", "http://127.0.0.1:3999", "the server"),
		serverPid: fs.Int("server-pid", 0, "the server's process id, for its CPU time and memory"),
		db:        fs.String("db", "messenger_bench", "the server's database, for PostgreSQL's CPU time"),
		users:     fs.Int("users", users, usersHelp),
		senders:   fs.Int("senders", 16, "concurrent senders of the closed loop"),
		sends:     fs.Int("sends", 20000, "messages the closed loop sends, as fast as it is answered"),
		idle:      fs.Int("idle", idle, "idle streams to open"),
		warmup:    fs.Int("warmup", 500, "sends before measuring, to warm the server's pool and caches"),
		grace:     fs.Duration("grace", 5*time.Second, "how long to wait for the last deliveries"),
		quiet:     addQuietFlags(fs),
	}
}

// newLoadRun checks the flags and returns the run they describe, once the server
// answers.
func (f serverFlags) newLoadRun(ctx context.Context, conns int) (*loadRun, error) {
	if *f.serverPid <= 0 {
		return nil, errors.New("-server-pid is required")
	}
	if *f.users < 2 || *f.users%2 != 0 {
		return nil, fmt.Errorf("-users %d: want an even number of at least 2", *f.users)
	}
	l := &loadRun{
		c:         newClient(*f.base, max(*f.senders, conns)),
		meter:     cpuMeter{db: *f.db, serverPid: *f.serverPid, loadPid: os.Getpid()},
		serverPid: *f.serverPid,
	}
	return l, l.c.waitReady(ctx, 30*time.Second)
}

func runLoad(ctx context.Context, args []string) error {
	fs := newFlags("load")
	sf := addServerFlags(fs, 1000, 10000, "active users (even), each with one stream")
	users, senders, sends, idle, warmup, grace, quiet := sf.users, sf.senders, sf.sends, sf.idle, sf.warmup, sf.grace, sf.quiet
	rate := fs.Float64("rate", 1000, "sends a second in the fixed-rate phase")
	rateSeconds := fs.Float64("rate-seconds", 10, "length of the fixed-rate phase")
	out := fs.String("out", "bench/out/load.json", "where to write the results")
	if err := fs.Parse(args); err != nil {
		return err
	}
	l, err := sf.newLoadRun(ctx, 64)
	if err != nil {
		return err
	}
	streamCtx, closeStreams := context.WithCancel(ctx)
	defer closeStreams()
	res := loadResult{Users: *users}

	start := time.Now()
	if err := l.prepare(ctx, streamCtx, *users, false); err != nil {
		return err
	}
	logf("%d users signed in, %d conversations, %d streams open (%.1fs)", *users, len(l.conversations), len(l.streams), time.Since(start).Seconds())

	if _, err := l.phase(ctx, phaseSpec{workers: *senders, count: *warmup, grace: *grace}); err != nil {
		return err
	}
	// The machine at rest, to tell the benchmark's load from other work.
	if res.Background, err = quiet.wait(); err != nil {
		return err
	}
	if res.Send, err = l.phase(ctx, phaseSpec{workers: *senders, count: *sends, grace: *grace}); err != nil {
		return err
	}
	logf("send: %.0f sends/s, send p50 %.1fms p99 %.1fms, delivery p50 %.1fms p99 %.1fms max %.1fms, lost %d/%d",
		res.Send.PerSecond, res.Send.SendP50, res.Send.SendP99, res.Send.DeliveryP50, res.Send.DeliveryP99,
		res.Send.DeliveryMax, res.Send.LostReceiver, res.Send.LostSender)

	if res.Idle, err = l.idleStreams(ctx, streamCtx, *idle); err != nil {
		return err
	}
	logf("idle: %d streams opened in %.1fs, resident %d → %d KB, %.1f KB a stream",
		res.Idle.Streams, res.Idle.OpenSeconds, res.Idle.RSSBeforeKB, res.Idle.RSSAfterKB, res.Idle.KBPerStream)

	count := int(*rate * *rateSeconds)
	if _, err := quiet.wait(); err != nil {
		return err
	}
	if res.Rate, err = l.phase(ctx, phaseSpec{workers: 64, count: count, rate: *rate, grace: *grace}); err != nil {
		return err
	}
	logf("rate: %d streams, %.0f sends/s (asked %.0f), delivery p50 %.1fms p99 %.1fms max %.1fms, lost %d/%d",
		res.Rate.Streams, res.Rate.PerSecond, *rate, res.Rate.DeliveryP50, res.Rate.DeliveryP99, res.Rate.DeliveryMax,
		res.Rate.LostReceiver, res.Rate.LostSender)

	closeStreams()
	if res.Reconnects, res.Failures, err = l.streamsEnded(); err != nil {
		return err
	}
	for _, st := range l.streams {
		if st == nil {
			continue
		}
		seen := make(map[int64]bool)
		for _, r := range st.receipts() {
			if seen[r.id] {
				res.Duplicates++
			}
			seen[r.id] = true
		}
	}
	logf("streams: %d reconnects, %d failed, %d duplicate events", res.Reconnects, res.Failures, res.Duplicates)
	return writeJSON(*out, res)
}

// streamsEnded waits for every stream to end after their context was cancelled and
// counts their reconnects and the streams that failed.
func (l *loadRun) streamsEnded() (reconnects, failures int, err error) {
	timeout := time.After(10 * time.Second)
	for _, st := range append(slices.Clone(l.streams), l.idle...) {
		if st == nil {
			continue
		}
		select {
		case <-st.done:
		case <-timeout:
			return reconnects, failures, errors.New("streams still open 10s after closing them")
		}
		reconnects += int(st.reconnects.Load())
		if st.failed != nil {
			failures++
		}
	}
	return reconnects, failures, nil
}

// prepare signs in the active users, finds their conversations (which setup
// created) and opens one stream for each user, or with receiversOnly for the
// second of each pair only, read until streamCtx is done.
func (l *loadRun) prepare(ctx, streamCtx context.Context, users int, receiversOnly bool) error {
	l.users = make([]string, users)
	err := parallel(ctx, users, 16, func(ctx context.Context, i int) error {
		_, token, err := l.c.login(ctx, activeName(i))
		l.users[i] = token
		return err
	})
	if err != nil {
		return err
	}
	l.conversations = make([]int64, users/2)
	err = parallel(ctx, users/2, 16, func(ctx context.Context, i int) error {
		id, _, err := l.c.conversation(ctx, l.users[2*i], activeName(2*i+1))
		l.conversations[i] = id
		return err
	})
	if err != nil {
		return err
	}
	l.streams = make([]*eventStream, users)
	return parallel(ctx, users, 32, func(ctx context.Context, i int) error {
		if receiversOnly && i%2 == 0 {
			return nil
		}
		st, err := l.c.openStream(streamCtx, l.users[i], &l.delivered)
		l.streams[i] = st
		return err
	})
}

// sendRecord is one send: who sent it to whom, when it started and how long its
// answer took.
type sendRecord struct {
	from, to int // user indexes
	start    time.Time
	took     time.Duration
	status   int // 0: no answer
	id       int64
}

// phase sends messages as spec says, each from a random user of a random
// conversation (with oneWay, from its first user) to the other participant. It
// then waits at most spec.grace for every message to reach the streams of both.
func (l *loadRun) phase(ctx context.Context, spec phaseSpec) (phaseStats, error) {
	ps := phaseStats{Streams: l.openStreams(), Senders: spec.workers, TargetRate: spec.rate, Attempted: spec.count}
	deliveredBefore := l.delivered.Load()
	batchesBefore, batchesKnown := l.c.sendBatches(ctx)
	a, err := l.meter.sample()
	if err != nil {
		return ps, err
	}
	begin := time.Now()
	jobs := schedule(ctx, spec, begin)
	var stopProfile func() error
	if spec.profile != nil {
		stopProfile = spec.profile.start(ctx, spec.name)
	}
	records := make([][]sendRecord, spec.workers)
	var wg sync.WaitGroup
	for w := range spec.workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rnd := rand.New(rand.NewPCG(uint64(w), uint64(time.Now().UnixNano())))
			for released := range jobs {
				if ctx.Err() != nil {
					return
				}
				conv := rnd.IntN(len(l.conversations))
				side := rnd.IntN(2)
				if l.oneWay {
					side = 0
				}
				r := sendRecord{from: 2*conv + side, to: 2*conv + 1 - side, start: startOf(released, time.Now())}
				sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
				status, id, err := l.c.send(sctx, l.users[r.from], l.conversations[conv])
				cancel()
				r.took = time.Since(r.start)
				if err == nil {
					r.status, r.id = status, id
				}
				records[w] = append(records[w], r)
			}
		}()
	}
	wg.Wait()
	end := time.Now()
	b, err := l.meter.sample()
	if err != nil {
		return ps, err
	}
	if batchesAfter, ok := l.c.sendBatches(ctx); batchesKnown && ok {
		ps.Batches = batchesBetween(batchesBefore, batchesAfter, end.Sub(begin).Seconds())
	}
	if stopProfile != nil {
		if err := stopProfile(); err != nil {
			return ps, err
		}
		ps.Waits = spec.profile.waits[spec.name]
	}
	if ctx.Err() != nil {
		return ps, ctx.Err()
	}
	ps.CPU = split(a, b)
	ps.Seconds = end.Sub(begin).Seconds()

	all := slices.Concat(records...)
	ps.Attempted = len(all)
	var took []time.Duration
	for _, r := range all {
		if r.status == http.StatusCreated {
			ps.Created++
			took = append(took, r.took)
		} else {
			ps.Failed++
		}
	}
	ps.PerSecond = float64(ps.Created) / ps.Seconds
	ps.SendP50, ps.SendP99 = ms(percentile(took, 50)), ms(percentile(took, 99))

	perSend := int64(2)
	if l.oneWay && l.streams[0] == nil {
		perSend = 1 // senders hold no stream
	}
	want := deliveredBefore + perSend*int64(ps.Created)
	deadline := time.Now().Add(spec.grace)
	for l.delivered.Load() < want && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	// For each stream, when it first read each message, and how often.
	type seen struct {
		at time.Time
		n  int
	}
	received := make([]map[int64]*seen, len(l.streams))
	got := func(user int, id int64) (*seen, bool) {
		if received[user] == nil {
			received[user] = make(map[int64]*seen)
			for _, r := range l.streams[user].receipts() {
				if s := received[user][r.id]; s != nil {
					s.n++
				} else {
					received[user][r.id] = &seen{at: r.at, n: 1}
				}
			}
		}
		s, ok := received[user][id]
		return s, ok
	}
	var delivery []time.Duration
	for _, r := range all {
		if r.status != http.StatusCreated {
			continue
		}
		if s, ok := got(r.to, r.id); ok {
			delivery = append(delivery, s.at.Sub(r.start))
			ps.Duplicates += s.n - 1
		} else {
			ps.LostReceiver++
		}
		if l.streams[r.from] == nil {
			continue
		}
		if s, ok := got(r.from, r.id); ok {
			ps.Duplicates += s.n - 1
		} else {
			ps.LostSender++
		}
	}
	ps.DeliveryP50, ps.DeliveryP99 = ms(percentile(delivery, 50)), ms(percentile(delivery, 99))
	ps.DeliveryMax = ms(percentile(delivery, 100))
	return ps, nil
}

// timerSlack is how late the schedule's timer may wake without it counting: Go's
// netpoller sleeps in whole milliseconds when the process is idle, so a timer
// wakes up to a millisecond late, and that lateness is the load generator's, not
// the server's. Counted, it added 0.5 to 0.6 ms to the p50 of the open loop at
// 500 msg/s.
const timerSlack = time.Millisecond

// schedule returns the channel that tells the workers of a phase to send: spec.count
// tokens, or with spec.duration as many as the workers take for that long; with
// spec.rate each one released at its due time from begin, and carrying the time a
// send counts from: its release, or its due time plus timerSlack if it was
// released later than that (the schedule's goroutine held up), so that no delay
// beyond the timer's own is lost. A closed loop's tokens carry the zero time. It
// is closed when the phase is over.
func schedule(ctx context.Context, spec phaseSpec, begin time.Time) <-chan time.Time {
	count := spec.count
	if spec.duration > 0 && spec.rate > 0 {
		count = int(spec.rate * spec.duration.Seconds())
	}
	if spec.rate <= 0 && spec.duration <= 0 {
		jobs := make(chan time.Time, count)
		for range count {
			jobs <- time.Time{}
		}
		close(jobs)
		return jobs
	}
	jobs := make(chan time.Time, max(count, 0))
	if spec.rate <= 0 { // closed loop for spec.duration
		jobs = make(chan time.Time)
	}
	go func() {
		defer close(jobs)
		if spec.rate <= 0 {
			stop := time.After(spec.duration)
			for {
				select {
				case <-ctx.Done():
					return
				case <-stop:
					return
				case jobs <- time.Time{}:
				}
			}
		}
		for i := range count {
			due := begin.Add(time.Duration(float64(i) / spec.rate * float64(time.Second)))
			if d := time.Until(due); d > 0 {
				select {
				case <-ctx.Done():
					return
				case <-time.After(d):
				}
			}
			from := time.Now()
			if limit := due.Add(timerSlack); from.After(limit) {
				from = limit
			}
			jobs <- from // never blocks: the channel holds every token
		}
	}()
	return jobs
}

// startOf is when a send taken from the schedule at now counts as started: in an
// open loop, the time its token carries (its release, see schedule), so that a
// send that waited for a free worker counts the wait, as pgbench -R counts its
// schedule lag; in a closed loop, now.
func startOf(released, now time.Time) time.Time {
	if released.IsZero() || released.After(now) {
		return now
	}
	return released
}

// openStreams counts the streams open now.
func (l *loadRun) openStreams() int {
	n := len(l.idle)
	for _, st := range l.streams {
		if st != nil {
			n++
		}
	}
	return n
}

// idleStreams signs in n idle users and opens one stream for each, and measures how
// much the server's resident memory grew.
func (l *loadRun) idleStreams(ctx, streamCtx context.Context, n int) (idleStats, error) {
	is := idleStats{Streams: n}
	tokens := make([]string, n)
	err := parallel(ctx, n, 16, func(ctx context.Context, i int) error {
		_, token, err := l.c.login(ctx, idleName(i))
		tokens[i] = token
		return err
	})
	if err != nil {
		return is, err
	}
	time.Sleep(2 * time.Second)
	if is.RSSBeforeKB, err = residentKB(l.serverPid); err != nil {
		return is, err
	}
	before, err := l.c.runtimeMetrics(ctx)
	if err != nil {
		return is, err
	}
	start := time.Now()
	l.idle = make([]*eventStream, n)
	err = parallel(ctx, n, 32, func(ctx context.Context, i int) error {
		st, err := l.c.openStream(streamCtx, tokens[i], &l.delivered)
		l.idle[i] = st
		return err
	})
	if err != nil {
		return is, err
	}
	is.OpenSeconds = time.Since(start).Seconds()
	time.Sleep(3 * time.Second)
	if is.RSSAfterKB, err = residentKB(l.serverPid); err != nil {
		return is, err
	}
	after, err := l.c.runtimeMetrics(ctx)
	if err != nil {
		return is, err
	}
	if n > 0 {
		is.KBPerStream = float64(is.RSSAfterKB-is.RSSBeforeKB) / float64(n)
		is.HeapKBPerStream = (after.heap - before.heap) / 1024 / float64(n)
		is.StackKBPerStream = (after.stack - before.stack) / 1024 / float64(n)
		is.GoroutinesPerStr = (after.goroutines - before.goroutines) / float64(n)
	}
	return is, nil
}

// goRuntime is what the server's GET /metrics tells of its Go runtime.
type goRuntime struct {
	heap, stack float64 // bytes in use
	goroutines  float64
}

// runtimeMetrics reads the server's Go heap and stacks in use and its goroutines
// from GET /metrics.
func (c *client) runtimeMetrics(ctx context.Context) (goRuntime, error) {
	names := []string{"go_memstats_heap_inuse_bytes", "go_memstats_stack_inuse_bytes", "go_goroutines"}
	m, err := c.metrics(ctx, names...)
	if err != nil {
		return goRuntime{}, err
	}
	if len(m) != len(names) {
		return goRuntime{}, fmt.Errorf("metrics: found %d of %d Go runtime metrics", len(m), len(names))
	}
	return goRuntime{heap: m[names[0]], stack: m[names[1]], goroutines: m[names[2]]}, nil
}

// metrics reads the samples named (a metric's name with its labels, as GET
// /metrics writes them) from the server; a sample not found is not in the map.
func (c *client) metrics(ctx context.Context, names ...string) (map[string]float64, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.base+"/metrics", nil)
	if err != nil {
		return nil, err
	}
	resp, err := c.api.Do(req)
	if err != nil {
		return nil, fmt.Errorf("metrics: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("metrics: %s", resp.Status)
	}
	found := make(map[string]float64, len(names))
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		name, value, ok := strings.Cut(sc.Text(), " ")
		if !ok || !slices.Contains(names, name) {
			continue
		}
		if found[name], err = strconv.ParseFloat(value, 64); err != nil {
			return nil, fmt.Errorf("metrics: %s: %w", name, err)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("metrics: %w", err)
	}
	return found, nil
}

// percentile returns the p-th percentile of d (nearest rank); 100 is the maximum.
// It sorts d.
func percentile(d []time.Duration, p float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	slices.Sort(d)
	rank := int(p/100*float64(len(d))+0.999999) - 1
	return d[min(max(rank, 0), len(d)-1)]
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "loadgen: "+format+"\n", args...)
}
