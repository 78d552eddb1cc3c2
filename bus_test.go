package main

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	natsserver "github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// natsTestServer is a NATS server running in the test process, which a test may
// shut down and start again on the same port.
type natsTestServer struct {
	port int
	ns   *natsserver.Server
}

// newNATSServer starts a NATS server on a free port of 127.0.0.1; it is shut down
// when the test ends.
func newNATSServer(t testing.TB) *natsTestServer {
	t.Helper()
	n := &natsTestServer{port: -1} // -1: a random port, kept for restarts
	n.start(t)
	n.port = n.ns.Addr().(*net.TCPAddr).Port
	t.Cleanup(n.shutdown)
	return n
}

// start starts the server (again, on the same port) and waits until it accepts
// connections.
func (n *natsTestServer) start(t testing.TB) {
	t.Helper()
	ns, err := natsserver.NewServer(&natsserver.Options{Host: "127.0.0.1", Port: n.port, NoLog: true, NoSigs: true})
	if err != nil {
		t.Fatalf("NATS server: %v", err)
	}
	go ns.Start()
	if !ns.ReadyForConnections(20 * time.Second) {
		t.Fatalf("NATS server did not start within 20s")
	}
	n.ns = ns
}

// shutdown stops the server, dropping every client's connection.
func (n *natsTestServer) shutdown() {
	n.ns.Shutdown()
	n.ns.WaitForShutdown()
}

func (n *natsTestServer) URL() string {
	return "nats://127.0.0.1:" + strconv.Itoa(n.port)
}

// subjects returns the subjects each client connection subscribes to, sorted.
func (n *natsTestServer) subjects(t testing.TB) [][]string {
	t.Helper()
	connz, err := n.ns.Connz(&natsserver.ConnzOptions{Subscriptions: true})
	if err != nil {
		t.Fatalf("connz: %v", err)
	}
	var subs [][]string
	for _, c := range connz.Conns {
		s := slices.Clone(c.Subs)
		slices.Sort(s)
		subs = append(subs, s)
	}
	return subs
}

// testBus is the bus a test's instances wake each other through.
type testBus struct {
	name string
	env  []string        // settings for newTestServer
	nats *natsTestServer // nil for PostgreSQL's LISTEN/NOTIFY
}

// forEachBus runs test once with each bus: LISTEN/NOTIFY, and NATS started in the
// test process.
func forEachBus(t *testing.T, test func(t *testing.T, bus testBus)) {
	for _, name := range []string{"postgres", "nats"} {
		t.Run(name, func(t *testing.T) {
			bus := testBus{name: name}
			if name == "nats" {
				bus.nats = newNATSServer(t)
				bus.env = []string{"NATS_URL=" + bus.nats.URL()}
			}
			test(t, bus)
		})
	}
}

// with returns the bus's settings followed by env.
func (b testBus) with(env ...string) []string {
	return slices.Concat(b.env, env)
}

// TestBusSubscribesOnlyHeldUsers checks that, with NATS, an instance subscribes to
// the subjects of the users whose streams it holds, and no others, so that it
// receives only their wake-ups; and that it unsubscribes with the user's last
// stream.
func TestBusSubscribesOnlyHeldUsers(t *testing.T) {
	n := newNATSServer(t)
	a, b := newTestServer(t, "NATS_URL="+n.URL()), newTestServer(t, "NATS_URL="+n.URL())
	alice, bob := a.newUser(t, "alice"), a.newUser(t, "bob")
	carol, dave := a.newUser(t, "carol"), a.newUser(t, "dave")
	aliceBob, carolDave := alice.startConversation(bob), carol.startConversation(dave)

	var prefix string
	if err := a.DB.QueryRow(`SELECT value FROM settings WHERE name = 'bus_subject_prefix'`).Scan(&prefix); err != nil {
		t.Fatalf("read the subject prefix both instances agreed on: %v", err)
	}
	subject := func(c *client) string { return "messenger." + prefix + ".user." + strconv.FormatInt(c.User.ID, 10) }

	aliceOnA, aliceOnA2, bobOnB := alice.stream(""), alice.stream(""), bob.as(b).stream("")
	want := [][]string{{subject(alice)}, {subject(bob)}}
	got := n.subjects(t)
	slices.SortFunc(got, slices.Compare)
	slices.SortFunc(want, slices.Compare)
	if !slices.EqualFunc(got, want, slices.Equal) {
		t.Fatalf("subscriptions per connection: got %v, want %v", got, want)
	}

	// Users with no stream anywhere: nobody receives their wake-ups.
	for i := range 10 {
		carol.send(carolDave.ID, "unheard "+strconv.Itoa(i))
	}
	m := alice.send(aliceBob.ID, "heard")
	for name, s := range map[string]*sseStream{"alice on A": aliceOnA, "alice on A again": aliceOnA2, "bob on B": bobOnB} {
		if _, got := s.nextMessage(eventWait); got.ID != m.ID {
			t.Fatalf("%s: got %s, want %s", name, got.ID, m.ID)
		}
	}
	// One publisher's messages arrive in order, so carol's and dave's wake-ups, had
	// they been received, would have come before alice's and bob's.
	for _, ts := range []*testServer{a, b} {
		if got := metricValue(t, ts, `messenger_bus_messages_total\{direction="received"\}`); got != 1 {
			t.Errorf("bus messages received: got %v, want 1 (one user's one message)", got)
		}
	}
	if got := metricValue(t, a, `messenger_bus_messages_total\{direction="published"\}`); got != 22 {
		t.Errorf("bus messages published by A: got %v, want 22 (two users of 11 messages)", got)
	}

	// The subscription goes with the user's last stream, not before.
	aliceOnA.close()
	waitFor(t, eventWait, "A to notice the first stream left", func() bool { return metricValue(t, a, "messenger_streams_open") == 1 })
	if got := n.subjects(t); !slices.ContainsFunc(got, func(s []string) bool { return slices.Equal(s, []string{subject(alice)}) }) {
		t.Fatalf("subscriptions with one of alice's streams left: got %v, want alice's still there", got)
	}
	aliceOnA2.close()
	waitFor(t, eventWait, "alice's subscription to go", func() bool {
		return !slices.ContainsFunc(n.subjects(t), func(s []string) bool { return slices.Contains(s, subject(alice)) })
	})
}

// TestBusSubjectPrefixSetting checks NATS_SUBJECT_PREFIX: a valid prefix names the
// subjects, and an invalid one stops the server from starting.
func TestBusSubjectPrefixSetting(t *testing.T) {
	for _, tc := range []struct {
		prefix string
		ok     bool
	}{
		{"prod.eu-1", true},
		{"a_b", true},
		{"", true},
		{"has space", false},
		{"wild.*", false},
		{"tail.>", false},
		{"double..dot", false},
		{".lead", false},
	} {
		_, err := loadConfig(func(k string) string {
			return map[string]string{"DEV_LOGIN": "true", "NATS_SUBJECT_PREFIX": tc.prefix}[k]
		})
		if (err == nil) != tc.ok {
			t.Errorf("NATS_SUBJECT_PREFIX=%q: got error %v, want ok=%v", tc.prefix, err, tc.ok)
		}
	}

	n := newNATSServer(t)
	ts := newTestServer(t, "NATS_URL="+n.URL(), "NATS_SUBJECT_PREFIX=custom.deploy")
	alice := ts.newUser(t, "alice")
	alice.stream("")
	if got, want := n.subjects(t), [][]string{{"custom.deploy.user." + strconv.FormatInt(alice.User.ID, 10)}}; !slices.EqualFunc(got, want, slices.Equal) {
		t.Fatalf("subjects: got %v, want %v", got, want)
	}
}

// BenchmarkBuses measures, for each bus and 1, 2 and 4 instances in this process,
// the CPU spent per delivered message and the delivery latency (send start to the
// recipient's stream). busPairs pairs of users each hold one stream per user,
// spread over the instances; each pair's sender sends through another instance
// than its own stream's; busMessages messages go out at busRate a second. CPU is
// this process's (instances, clients, and the NATS server when it is the bus) and
// that of the PostgreSQL backends connected to the test database (the pools, the
// listeners, and the tests' own):
//
//	go test -run '^$' -bench Buses -benchtime 1x .
func BenchmarkBuses(b *testing.B) {
	// Each instance count runs both buses back to back, so that they compare under
	// the same load of a shared machine.
	for _, n := range []int{1, 2, 4} {
		for _, bus := range []string{"postgres", "nats"} {
			b.Run(fmt.Sprintf("instances=%d/%s", n, bus), func(b *testing.B) {
				var env []string
				if bus == "nats" {
					env = []string{"NATS_URL=" + newNATSServer(b).URL()}
				}
				var instances []*testServer
				for range n {
					instances = append(instances, newTestServer(b, env...))
				}
				for range b.N {
					benchmarkBusRound(b, instances)
				}
			})
		}
	}
}

const (
	busPairs    = 50
	busMessages = 900
	busRate     = 150 // messages a second
)

func benchmarkBusRound(b *testing.B, instances []*testServer) {
	n := len(instances)
	type pair struct {
		from, to    *client
		conv        string
		fromS, toS  *sseStream
		sendThrough *testServer
	}
	pairs := make([]pair, busPairs)
	for i := range pairs {
		home := instances[i%n]
		p := &pairs[i]
		p.from, p.to = home.newUser(b, "bf"), home.newUser(b, "bt")
		p.conv = p.from.startConversation(p.to).ID
		p.sendThrough = instances[(i+1)%n]
		p.fromS, p.toS = p.from.as(p.sendThrough).stream(""), p.to.stream("")
	}

	var mu sync.Mutex // guards sentAt
	sentAt := make(map[string]time.Time, busMessages)
	perPair := busMessages / busPairs
	var lat []time.Duration
	var latMu sync.Mutex // guards lat
	var readers sync.WaitGroup
	deadline := time.Now().Add(2 * time.Minute)
	for i := range pairs {
		p := &pairs[i]
		for _, s := range []*sseStream{p.fromS, p.toS} {
			recipient := s == p.toS
			readers.Go(func() {
				for got := 0; got < perPair; {
					select {
					case ev, ok := <-s.events:
						if !ok {
							b.Errorf("stream ended after %d messages", got)
							return
						}
						var m apiMessage
						if ev.Event != "" || json.Unmarshal([]byte(ev.Data), &m) != nil {
							continue
						}
						got++
						if recipient {
							mu.Lock()
							d := time.Since(sentAt[m.Content])
							mu.Unlock()
							latMu.Lock()
							lat = append(lat, d)
							latMu.Unlock()
						}
					case <-time.After(time.Until(deadline)):
						b.Errorf("%d of %d messages after 2 minutes", got, perPair)
						return
					}
				}
			})
		}
	}

	cpu0, pg0 := processCPU(), backendCPU(b, instances[0].DB)
	start := time.Now()
	tick := time.NewTicker(time.Second / busRate)
	var sends sync.WaitGroup
	httpClient := &http.Client{Timeout: 30 * time.Second}
	for i := range busMessages {
		<-tick.C
		p := &pairs[i%busPairs]
		content := fmt.Sprintf("bench %d", i)
		sends.Go(func() {
			mu.Lock()
			sentAt[content] = time.Now()
			mu.Unlock()
			body, _ := json.Marshal(map[string]string{"content": content})
			res, err := rawDoWith(httpClient, "POST", p.sendThrough.URL+"/api/conversations/"+p.conv+"/messages", body, jsonHeader(p.from.Token))
			if err != nil || res.status != http.StatusCreated {
				b.Errorf("send: %v %d %s", err, res.status, res.body)
			}
		})
	}
	tick.Stop()
	sends.Wait()
	readers.Wait()
	elapsed := time.Since(start)
	cpu, pg := processCPU()-cpu0, cpuSince(pg0, backendCPU(b, instances[0].DB))
	delivered := float64(2 * busMessages)

	slices.Sort(lat)
	if len(lat) == 0 {
		b.Fatal("nothing delivered")
	}
	pct := func(p float64) float64 { return float64(lat[int(p*float64(len(lat)-1))].Microseconds()) / 1000 }
	b.ReportMetric(float64(cpu.Microseconds())/delivered, "proc-cpu-µs/msg")
	b.ReportMetric(float64(pg.Microseconds())/delivered, "pg-cpu-µs/msg")
	b.ReportMetric(float64((cpu+pg).Microseconds())/delivered, "total-cpu-µs/msg")
	b.ReportMetric(pct(0.5), "p50-ms")
	b.ReportMetric(pct(0.99), "p99-ms")
	b.ReportMetric(float64(busMessages)/elapsed.Seconds(), "sent/s")
	for i := range pairs {
		pairs[i].fromS.close()
		pairs[i].toS.close()
	}
}

// processCPU is the user and system CPU time this process has used.
func processCPU() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// backendCPU returns the user and system CPU time of each PostgreSQL backend
// connected to the test database, by pid, from /proc (PostgreSQL runs on this
// machine; clock ticks of 1/100 s).
func backendCPU(b *testing.B, db *sql.DB) map[int]time.Duration {
	rows, err := db.Query(`SELECT pid FROM pg_stat_activity WHERE datname = current_database()`)
	if err != nil {
		b.Fatalf("list backends: %v", err)
	}
	defer rows.Close()
	cpu := map[int]time.Duration{}
	for rows.Next() {
		var pid int
		rows.Scan(&pid)
		s, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			continue
		}
		end := bytes.LastIndexByte(s, ')')
		f := strings.Fields(string(s[end+1:]))
		if end < 0 || len(f) < 13 {
			continue
		}
		ut, _ := strconv.ParseInt(f[11], 10, 64) // utime, the 14th field
		st, _ := strconv.ParseInt(f[12], 10, 64)
		cpu[pid] = time.Duration(ut+st) * 10 * time.Millisecond
	}
	return cpu
}

// cpuSince is how much CPU the backends of after used since before (all of it, for
// a backend that started since).
func cpuSince(before, after map[int]time.Duration) time.Duration {
	var d time.Duration
	for pid, t := range after {
		d += t - before[pid]
	}
	return d
}

// TestBusSlowConsumerSyncs fills an instance's queue of received wake-ups: NATS
// drops the rest, which is counted, and the hub is asked to sync every stream.
func TestBusSlowConsumerSyncs(t *testing.T) {
	n := newNATSServer(t)
	db, err := sql.Open("postgres", testDatabaseURL)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	m := newMetrics(db)
	bus, err := openBus(context.Background(), config{natsURL: n.URL(), natsSubjectPrefix: "slow.test"}, db, m,
		slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer bus.close()
	bus.msgs = make(chan *nats.Msg, 4) // a small queue, and nothing drains it
	bus.subscribe(42)
	bus.settle()
	for range 50 {
		bus.publish(42, []byte(`[]`))
	}
	select {
	case <-bus.lost:
	case <-time.After(eventWait):
		t.Fatal("no sync asked for after wake-ups were dropped")
	}
	if got := testutil.ToFloat64(m.busSlow); got < 1 {
		t.Errorf("messenger_bus_slow_consumer_total: got %v, want at least 1", got)
	}
	if got := testutil.ToFloat64(m.busMessages.WithLabelValues("published")); got != 50 {
		t.Errorf("published: got %v, want 50", got)
	}
}
