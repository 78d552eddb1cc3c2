package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// skipUnlessCI skips the test for a missing tool, except on CI, where everything
// the tests need must be there.
func skipUnlessCI(t *testing.T, format string, args ...any) {
	t.Helper()
	if os.Getenv("CI") != "" {
		t.Fatalf(format, args...)
	}
	t.Skipf(format+" (set CI to make this a failure)", args...)
}

// freePort returns a TCP port of 127.0.0.1 that nothing listens on right now.
func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("find a free port: %v", err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// pgCluster is a PostgreSQL cluster of one test's own, which the test may stop and
// start again while a server uses it.
type pgCluster struct {
	bin    string   // the directory of initdb and pg_ctl
	dir    string   // holds data/ and the log
	port   int      // TCP port of 127.0.0.1
	prefix []string // runs a command as the cluster's owner
}

// newPGCluster creates a cluster in a temporary directory and starts it; it is
// stopped when the test ends.
func newPGCluster(t *testing.T) *pgCluster {
	t.Helper()
	bin := ""
	if p, err := exec.LookPath("initdb"); err == nil {
		bin = filepath.Dir(p)
	} else if found, _ := filepath.Glob("/usr/lib/postgresql/*/bin/initdb"); len(found) > 0 {
		sort.Strings(found)
		bin = filepath.Dir(found[len(found)-1])
	} else {
		skipUnlessCI(t, "no initdb to create a private PostgreSQL cluster")
	}
	c := &pgCluster{bin: bin, dir: t.TempDir(), port: freePort(t)}
	if os.Geteuid() == 0 {
		// initdb refuses to run as root: the cluster belongs to postgres, which must
		// be able to reach its directory.
		u, err := user.Lookup("postgres")
		if err != nil {
			skipUnlessCI(t, "running as root and there is no postgres user to own a cluster")
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		if err := os.Chown(c.dir, uid, gid); err != nil {
			t.Fatalf("chown %s: %v", c.dir, err)
		}
		if err := os.Chmod(filepath.Dir(c.dir), 0o755); err != nil {
			t.Fatalf("chmod %s: %v", filepath.Dir(c.dir), err)
		}
		c.prefix = []string{"runuser", "-u", "postgres", "--"}
	}
	c.run(t, "initdb", "-D", c.data(), "-U", "postgres", "--auth=trust", "-N")
	c.start(t)
	t.Cleanup(func() {
		c.command("pg_ctl", "-D", c.data(), "-m", "immediate", "stop").Run()
		if t.Failed() {
			if b, err := os.ReadFile(filepath.Join(c.dir, "postgres.log")); err == nil {
				t.Logf("PostgreSQL log:\n%s", b)
			}
		}
	})
	return c
}

func (c *pgCluster) data() string { return filepath.Join(c.dir, "data") }

// URL is the cluster's postgres database.
func (c *pgCluster) URL() string {
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", c.port)
}

func (c *pgCluster) command(name string, args ...string) *exec.Cmd {
	argv := append(append(append([]string{}, c.prefix...), filepath.Join(c.bin, name)), args...)
	return exec.Command(argv[0], argv[1:]...)
}

func (c *pgCluster) run(t *testing.T, name string, args ...string) {
	t.Helper()
	if out, err := c.command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

// start starts the cluster and waits until it accepts connections.
func (c *pgCluster) start(t *testing.T) {
	t.Helper()
	c.run(t, "pg_ctl", "-D", c.data(), "-l", filepath.Join(c.dir, "postgres.log"), "-w", "-t", "60",
		"-o", fmt.Sprintf("-p %d -k /tmp -c listen_addresses=127.0.0.1 -c fsync=off", c.port), "start")
}

// stop shuts the cluster down as an operator restarting it would: every session
// is ended, and new connections are refused.
func (c *pgCluster) stop(t *testing.T) {
	t.Helper()
	c.run(t, "pg_ctl", "-D", c.data(), "-w", "-t", "60", "-m", "fast", "stop")
}

// eventSource reads a user's event stream as a browser's EventSource does: when
// the stream ends it opens it again with Last-Event-ID, until its context ends.
type eventSource struct {
	url, token string

	mu       sync.Mutex // guards the fields below
	lastID   string     // the last id: field received
	seqs     []int64    // the id of every event received, in order
	messages []apiMessage
	opened   int      // streams opened
	refused  []string // why opening a stream failed
}

func (es *eventSource) run(ctx context.Context) {
	for ctx.Err() == nil {
		es.once(ctx)
		select {
		case <-ctx.Done():
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func (es *eventSource) once(ctx context.Context) {
	req, _ := http.NewRequestWithContext(ctx, "GET", es.url+"/api/messages", nil)
	req.Header.Set("Accept", "text/event-stream")
	req.Header.Set("Authorization", "Bearer "+es.token)
	es.mu.Lock()
	if es.lastID != "" {
		req.Header.Set("Last-Event-ID", es.lastID)
	}
	es.mu.Unlock()
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		es.note(err.Error())
		return
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		es.note(resp.Status)
		return
	}
	es.mu.Lock()
	es.opened++
	es.mu.Unlock()
	sc := bufio.NewScanner(resp.Body)
	var id, kind, data string
	hasID := false
	for sc.Scan() {
		line := sc.Text()
		if line != "" {
			field, value, _ := strings.Cut(line, ":")
			value = strings.TrimPrefix(value, " ")
			switch field {
			case "id":
				id, hasID = value, true
			case "event":
				kind = value
			case "data":
				data = value
			}
			continue
		}
		es.mu.Lock()
		if hasID {
			es.lastID = id
		}
		if data != "" {
			seq, _ := strconv.ParseInt(id, 10, 64)
			es.seqs = append(es.seqs, seq)
			if kind == "" {
				var m apiMessage
				json.Unmarshal([]byte(data), &m)
				es.messages = append(es.messages, m)
			}
		}
		es.mu.Unlock()
		id, kind, data, hasID = "", "", "", false
	}
}

func (es *eventSource) note(why string) {
	es.mu.Lock()
	defer es.mu.Unlock()
	es.refused = append(es.refused, why)
}

// received returns how many times each message id was received.
func (es *eventSource) received() map[string]int {
	es.mu.Lock()
	defer es.mu.Unlock()
	n := map[string]int{}
	for _, m := range es.messages {
		n[m.ID]++
	}
	return n
}

// checkOnceInOrder fails the test unless every event was received once, in order.
func (es *eventSource) checkOnceInOrder(t *testing.T) {
	t.Helper()
	es.mu.Lock()
	defer es.mu.Unlock()
	for i := 1; i < len(es.seqs); i++ {
		if es.seqs[i] <= es.seqs[i-1] {
			t.Fatalf("event %d came after event %d: repeated or out of order", es.seqs[i], es.seqs[i-1])
		}
	}
}

// sendResult is what one send got.
type sendResult struct {
	status int
	id     string
	body   string
	took   time.Duration
	err    error
}

// sender sends messages until stopped, one at a time, each bounded by timeout.
type sender struct {
	url, token string
	client     *http.Client

	mu      sync.Mutex // guards results
	results []sendResult
}

func (s *sender) run(ctx context.Context) {
	for i := 0; ctx.Err() == nil; i++ {
		start := time.Now()
		res, err := rawDoWith(s.client, "POST", s.url, []byte(fmt.Sprintf(`{"content":"m%d"}`, i)), jsonHeader(s.token))
		r := sendResult{status: res.status, body: string(res.body), took: time.Since(start), err: err}
		if res.status == http.StatusServiceUnavailable && res.header.Get("Retry-After") == "" {
			r.err = errors.New("503 without Retry-After")
		} else if p := errorBodyProblem(res); p != "" && err == nil {
			r.err = errors.New(p)
		}
		var m apiMessage
		if res.status == http.StatusCreated && json.Unmarshal(res.body, &m) == nil {
			r.id = m.ID
		}
		s.mu.Lock()
		s.results = append(s.results, r)
		s.mu.Unlock()
		if r.status != http.StatusCreated {
			// Do not spin: a client backs off a little on failures.
			select {
			case <-ctx.Done():
			case <-time.After(20 * time.Millisecond):
			}
		}
	}
}

// count returns how many results since from have status.
func (s *sender) count(from, status int) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, r := range s.results[min(from, len(s.results)):] {
		if r.status == status {
			n++
		}
	}
	return n
}

func (s *sender) len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.results)
}

// TestFaultsPostgresRestart restarts PostgreSQL under a running server: requests
// during the outage fail fast with 503, nothing acknowledged is lost or delivered
// twice, and the server recovers by itself; on either bus.
func TestFaultsPostgresRestart(t *testing.T) {
	skipInShortMode(t, "a fault test")
	forEachBus(t, testFaultsPostgresRestart)
}

func testFaultsPostgresRestart(t *testing.T, bus testBus) {
	pg := newPGCluster(t)
	ts := newTestServer(t, bus.with("DATABASE_URL="+pg.URL(), "SSE_SYNC_INTERVAL=1s")...)
	alice, bob := ts.newUser(t, "alice"), ts.newUser(t, "bob")
	conv := alice.startConversation(bob)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	es := &eventSource{url: ts.URL, token: bob.Token}
	wg.Go(func() { es.run(ctx) })
	waitFor(t, 10*time.Second, "bob's stream to open", func() bool {
		es.mu.Lock()
		defer es.mu.Unlock()
		return es.opened > 0 && es.lastID != ""
	})
	sendCtx, stopSending := context.WithCancel(ctx)
	defer stopSending()
	// Each send is bounded: during the outage it must fail fast, not hang.
	s := &sender{url: ts.URL + "/api/conversations/" + conv.ID + "/messages", token: alice.Token,
		client: &http.Client{Timeout: 5 * time.Second}}
	sendDone := make(chan struct{})
	go func() { defer close(sendDone); s.run(sendCtx) }()

	readyz := func() int {
		res, err := rawDoWith(&http.Client{Timeout: 5 * time.Second}, "GET", ts.URL+"/readyz", nil, nil)
		if err != nil {
			return 0
		}
		return res.status
	}
	waitFor(t, 10*time.Second, "10 sends before the outage", func() bool { return s.count(0, http.StatusCreated) >= 10 })

	pg.stop(t)
	outage := s.len()
	if got := readyz(); got != http.StatusServiceUnavailable {
		t.Errorf("/readyz during the outage: got %d, want 503", got)
	}
	// A stream opened during the outage is refused at once too.
	start := time.Now()
	res, err := rawDoWith(&http.Client{Timeout: 5 * time.Second}, "GET", ts.URL+"/api/messages", nil,
		http.Header{"Authorization": {"Bearer " + bob.Token}, "Accept": {"text/event-stream"}})
	if err != nil || res.status != http.StatusServiceUnavailable || errorBodyProblem(res) != "" || time.Since(start) > 3*time.Second {
		t.Errorf("opening a stream during the outage: got %d %s, %v after %v; want a fast JSON 503",
			res.status, res.body, err, time.Since(start))
	}
	waitFor(t, 15*time.Second, "5 sends refused during the outage", func() bool {
		return s.count(outage, http.StatusServiceUnavailable) >= 5
	})

	pg.start(t)
	waitFor(t, 20*time.Second, "/readyz to answer 200 again", func() bool { return readyz() == http.StatusOK })
	recovered := s.len()
	waitFor(t, 20*time.Second, "10 sends after the restart", func() bool { return s.count(recovered, http.StatusCreated) >= 10 })
	stopSending()
	<-sendDone

	// Every answer was a 201 or a fast 503 with a JSON error and Retry-After.
	acked := map[string]bool{}
	for i, r := range s.results {
		switch {
		case r.err != nil:
			t.Errorf("send %d: %v (after %v)", i, r.err, r.took.Round(time.Millisecond))
		case r.status == http.StatusCreated:
			acked[r.id] = true
		case r.status == http.StatusServiceUnavailable:
			if r.took > 3*time.Second {
				t.Errorf("send %d: 503 after %v, want a fast failure", i, r.took)
			}
		default:
			t.Errorf("send %d: got %d %s, want 201 or 503", i, r.status, r.body)
		}
		if i >= recovered && r.status != http.StatusCreated && r.err == nil {
			t.Errorf("send %d, after /readyz was 200 again: got %d %s", i, r.status, r.body)
		}
	}

	// Every acknowledged message is stored...
	stored := map[string]bool{}
	waitFor(t, 10*time.Second, "the messages to be readable", func() bool {
		rows, err := ts.DB.Query(`SELECT id FROM messages WHERE conversation_id = $1`, conv.ID)
		if err != nil {
			return false
		}
		defer rows.Close()
		for rows.Next() {
			var id string
			rows.Scan(&id)
			stored[id] = true
		}
		return rows.Err() == nil
	})
	for id := range acked {
		if !stored[id] {
			t.Errorf("message %s was acknowledged with 201 but is not in the database", id)
		}
	}
	// ...and reached bob's stream, across its reconnects, exactly once.
	waitFor(t, 20*time.Second, "bob to receive every acknowledged message", func() bool {
		got := es.received()
		for id := range acked {
			if got[id] == 0 {
				return false
			}
		}
		return true
	})
	cancel()
	wg.Wait()
	for id, n := range es.received() {
		if n != 1 {
			t.Errorf("message %s received %d times, want once", id, n)
		}
	}
	es.checkOnceInOrder(t)
	t.Logf("%d sends, %d acknowledged, %d refused during the outage; bob's stream opened %d times",
		len(s.results), len(acked), s.count(outage, http.StatusServiceUnavailable), es.opened)
}

// TestFaultsSIGTERM stops the real binary with SIGTERM while messages flow: it
// exits 0 promptly, its streams end cleanly, and every acknowledged message was
// delivered before the end or is replayed by a fresh instance; on either bus.
func TestFaultsSIGTERM(t *testing.T) {
	skipInShortMode(t, "a fault test")
	forEachBus(t, testFaultsSIGTERM)
}

func testFaultsSIGTERM(t *testing.T, bus testBus) {
	goTool, err := exec.LookPath("go")
	if err != nil {
		skipUnlessCI(t, "no go command to build the server")
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "messenger")
	if out, err := exec.Command(goTool, "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}

	port := freePort(t)
	cmd := exec.Command(bin)
	cmd.Env = []string{
		"PATH=" + os.Getenv("PATH"), "HOME=" + os.Getenv("HOME"),
		"DATABASE_URL=" + testDatabaseURL, "DEV_LOGIN=true", "HOST=127.0.0.1", "PORT=" + strconv.Itoa(port),
		"RATE_LIMIT_SENDS=off", "RATE_LIMIT_CONVERSATIONS=off", "RATE_LIMIT_LOGINS=off",
	}
	cmd.Env = append(cmd.Env, bus.env...)
	logs := &syncBuffer{}
	cmd.Stderr = logs
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatalf("stdout pipe: %v", err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", bin, err)
	}
	exited := make(chan error, 1)
	listening := make(chan bool, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if listeningRE.MatchString(sc.Text()) {
				listening <- true
			}
		}
		exited <- cmd.Wait()
	}()
	t.Cleanup(func() {
		cmd.Process.Kill()
		if t.Failed() {
			t.Logf("server log:\n%s", logs.String())
		}
	})
	select {
	case <-listening:
	case err := <-exited:
		t.Fatalf("server exited before listening: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatalf("server did not listen within 30s")
	}

	srv := &testServer{URL: fmt.Sprintf("http://127.0.0.1:%d", port)}
	alice, bob := srv.newUser(t, "alice"), srv.newUser(t, "bob")
	conv := alice.startConversation(bob)
	users := []*client{alice, bob}
	streams := []*sseStream{alice.stream(""), bob.stream("")}

	// Four senders, two each way, until the server stops answering.
	var mu sync.Mutex // guards acked
	acked := map[string]bool{}
	ackedCount := func() int { mu.Lock(); defer mu.Unlock(); return len(acked) }
	var wg sync.WaitGroup
	httpClient := &http.Client{Timeout: 5 * time.Second}
	for i := range 4 {
		from := users[i%2]
		wg.Go(func() {
			for n := 0; ; n++ {
				res, err := rawDoWith(httpClient, "POST", srv.URL+"/api/conversations/"+conv.ID+"/messages",
					[]byte(fmt.Sprintf(`{"content":"s%d-%d"}`, i, n)), jsonHeader(from.Token))
				if err != nil || res.status != http.StatusCreated {
					return
				}
				var m apiMessage
				json.Unmarshal(res.body, &m)
				mu.Lock()
				acked[m.ID] = true
				mu.Unlock()
			}
		})
	}
	waitFor(t, 20*time.Second, "20 acknowledged sends", func() bool { return ackedCount() >= 20 })

	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatalf("SIGTERM: %v", err)
	}
	signalled := time.Now()
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("server exited with %v after SIGTERM, want status 0", err)
		}
		t.Logf("server exited %v after SIGTERM", time.Since(signalled).Round(time.Millisecond))
	case <-time.After(12 * time.Second):
		t.Fatalf("server still running 12s after SIGTERM")
	}
	wg.Wait()

	// The streams ended cleanly (EOF, not a hang or a reset); collect what each got.
	received := make([]map[string]bool, len(streams))
	for i, s := range streams {
		received[i] = map[string]bool{}
		deadline := time.After(5 * time.Second)
	collect:
		for {
			select {
			case ev, ok := <-s.events:
				if !ok {
					break collect
				}
				var m apiMessage
				if ev.Event == "" && json.Unmarshal([]byte(ev.Data), &m) == nil {
					if received[i][m.ID] {
						t.Errorf("%s received message %s twice", users[i].User.Username, m.ID)
					}
					received[i][m.ID] = true
				}
			case <-deadline:
				t.Fatalf("%s's stream did not end after the server exited", users[i].User.Username)
			}
		}
		if s.err != nil {
			t.Errorf("%s's stream ended with %v, want a clean end", users[i].User.Username, s.err)
		}
	}

	// Every acknowledged message is stored, and each user has it: from the stream
	// before it ended, or replayed by a fresh instance from the last event id.
	fresh := newTestServer(t, bus.env...)
	mu.Lock()
	defer mu.Unlock()
	for id := range acked {
		var n int
		if err := fresh.DB.QueryRow(`SELECT count(*) FROM messages WHERE id = $1`, id).Scan(&n); err != nil || n != 1 {
			t.Errorf("acknowledged message %s: %d rows, %v; want it stored", id, n, err)
		}
	}
	replayed := 0
	for i, u := range users {
		missing := map[string]bool{}
		for id := range acked {
			if !received[i][id] {
				missing[id] = true
			}
		}
		s := u.as(fresh).stream(streams[i].lastEventID())
		for len(missing) > 0 {
			ev, m := s.nextMessage(10 * time.Second)
			if received[i][m.ID] {
				t.Fatalf("%s: message %s (event %s) replayed, but the stream had delivered it", u.User.Username, m.ID, ev.ID)
			}
			received[i][m.ID] = true
			delete(missing, m.ID)
			replayed++
		}
	}
	t.Logf("%d messages acknowledged, %d replayed after the restart", len(acked), replayed)
}
