package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"regexp"
	"runtime"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

const eventWait = 5 * time.Second

func TestStreamDeliversToEveryStreamOnce(t *testing.T) {
	t.Parallel()
	ts := newTestServer(t)
	alice, bob := ts.newUser(t, "alice"), ts.newUser(t, "bob")
	conv := alice.startConversation(bob)
	aliceTab1, aliceTab2, bobTab := alice.stream(""), alice.stream(""), bob.stream("")

	m := alice.send(conv.ID, "hello")
	for _, tc := range []struct {
		name     string
		s        *sseStream
		wantMine bool
	}{
		{"alice tab 1", aliceTab1, true},
		{"alice tab 2", aliceTab2, true},
		{"bob", bobTab, false},
	} {
		ev, got := tc.s.nextMessage(eventWait)
		if got.ID != m.ID || got.Content != "hello" || got.ConversationID != conv.ID || got.Mine != tc.wantMine {
			t.Fatalf("%s: got %+v, want message %s with mine=%v", tc.name, got, m.ID, tc.wantMine)
		}
		if ev.ID == "" {
			t.Fatalf("%s: message event has no id", tc.name)
		}
		tc.s.expectNone(200 * time.Millisecond)
	}
}

func TestStreamProtocol(t *testing.T) {
	t.Parallel()
	ts := newTestServer(t, "SSE_KEEPALIVE=100ms")
	alice := ts.newUser(t, "alice")

	req, _ := http.NewRequest("GET", ts.URL+"/api/messages?token="+alice.Token, nil)
	req.Header.Set("Accept", "text/event-stream")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	for k, want := range map[string]string{
		"Content-Type":      "text/event-stream",
		"Cache-Control":     "no-cache",
		"X-Accel-Buffering": "no",
	} {
		if got := resp.Header.Get(k); got != want {
			t.Errorf("header %s: got %q, want %q", k, got, want)
		}
	}
	lines := make(chan string, 100)
	go func() {
		sc := bufio.NewScanner(resp.Body)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	want := []*regexp.Regexp{
		regexp.MustCompile(`^: connected$`),
		regexp.MustCompile(`^retry: \d+$`),
	}
	for _, re := range want {
		select {
		case l := <-lines:
			if !re.MatchString(l) {
				t.Fatalf("got line %q, want %v", l, re)
			}
		case <-time.After(eventWait):
			t.Fatalf("no line matching %v", re)
		}
	}
	deadline := time.After(eventWait)
	for {
		select {
		case l := <-lines:
			if l == ": keep-alive" {
				goto keptAlive
			}
		case <-deadline:
			t.Fatal("no keep-alive comment")
		}
	}
keptAlive:

	anon := &client{t: t, base: ts.URL}
	for _, tc := range []struct {
		name    string
		headers []string
		query   string
		want    int
	}{
		{"no accept", []string{"Authorization: Bearer " + alice.Token}, "", http.StatusNotAcceptable},
		{"json accept", []string{"Authorization: Bearer " + alice.Token, "Accept: application/json"}, "", http.StatusNotAcceptable},
		{"no token", []string{"Accept: text/event-stream"}, "", http.StatusUnauthorized},
		{"bad token", []string{"Accept: text/event-stream"}, "?token=bad", http.StatusUnauthorized},
		{"bad last event id", []string{"Accept: text/event-stream", "Last-Event-ID: x"}, "?token=" + alice.Token, http.StatusBadRequest},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, b := anon.do("GET", "/api/messages"+tc.query, nil, tc.headers...)
			if resp.StatusCode != tc.want {
				t.Fatalf("got %d %s, want %d", resp.StatusCode, b, tc.want)
			}
		})
	}

	// An expired token is refused, and a stream ends when its token expires.
	short := newTestServer(t, "TOKEN_TTL=2s")
	sc := short.newUser(t, "short")
	s := sc.stream("")
	if !s.ended(5 * time.Second) {
		t.Fatal("stream outlived its token")
	}
	resp2, _ := sc.do("GET", "/api/messages", nil, "Accept: text/event-stream")
	if resp2.StatusCode != http.StatusUnauthorized {
		t.Fatalf("expired token: got %d, want 401", resp2.StatusCode)
	}
}

// TestStreamOrderUnderConcurrentCommits holds a send open in one conversation while
// another conversation's send to the same receiver tries to commit. The second
// cannot take a sequence number until the first commits, so a client that resumes
// from its last id can never have skipped the first.
func TestStreamOrderUnderConcurrentCommits(t *testing.T) {
	t.Parallel()
	ts := newTestServer(t)
	alice, bob, carol := ts.newUser(t, "alice"), ts.newUser(t, "bob"), ts.newUser(t, "carol")
	convA := alice.startConversation(bob)
	convB := carol.startConversation(bob)
	dave, erin := ts.newUser(t, "dave"), ts.newUser(t, "erin")
	convOther := dave.startConversation(erin)

	stream := bob.stream("")
	warm := carol.send(convB.ID, "before")
	ev, _ := stream.nextMessage(eventWait)
	lastID := ev.ID

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	tx, err := ts.DB.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback()
	var heldID int64
	var outcome string
	if err := tx.QueryRowContext(ctx, `SELECT outcome, message_id FROM send_messages(ARRAY[$1::bigint], ARRAY[$2::bigint], ARRAY['held'], ARRAY[''])`,
		convA.ID, alice.User.ID).Scan(&outcome, &heldID); err != nil || outcome != "created" {
		t.Fatalf("held send: %v %s", err, outcome)
	}

	sentB := make(chan apiMessage, 1)
	go func() {
		var m apiMessage
		carol.mustDo("POST", "/api/conversations/"+convB.ID+"/messages", map[string]string{"content": "after"}, http.StatusCreated, &m)
		sentB <- m
	}()
	// Sends that do not involve bob are not held up.
	dave.send(convOther.ID, "unrelated")
	select {
	case m := <-sentB:
		t.Fatalf("message %s committed while an earlier send to the same receiver was open", m.ID)
	case <-time.After(300 * time.Millisecond):
	}
	stream.expectNone(100 * time.Millisecond)
	stream.close() // the client drops while the first send is still open

	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	var mB apiMessage
	select {
	case mB = <-sentB:
	case <-time.After(eventWait):
		t.Fatal("second send did not complete after the first committed")
	}

	resumed := bob.stream(lastID)
	ev1, m1 := resumed.nextMessage(eventWait)
	ev2, m2 := resumed.nextMessage(eventWait)
	if m1.ID != strconv.FormatInt(heldID, 10) || m2.ID != mB.ID {
		t.Fatalf("resumed with %s, %s; want held %d then %s", m1.ID, m2.ID, heldID, mB.ID)
	}
	id0, _ := strconv.Atoi(lastID)
	id1, _ := strconv.Atoi(ev1.ID)
	id2, _ := strconv.Atoi(ev2.ID)
	if id1 != id0+1 || id2 != id0+2 {
		t.Fatalf("got event ids %d, %d after %d; want consecutive", id1, id2, id0)
	}
	resumed.expectNone(200 * time.Millisecond)
	_ = warm
}

func TestStreamResume(t *testing.T) {
	t.Parallel()
	ts := newTestServer(t)
	bob := ts.newUser(t, "bob")
	var senders []*client
	var convs []apiConversation
	for i := range 5 {
		s := ts.newUser(t, fmt.Sprintf("s%d", i))
		senders = append(senders, s)
		convs = append(convs, s.startConversation(bob))
	}
	first := bob.stream("")
	// The stream tells a new client where it stands before any event.
	waitFor(t, eventWait, "the initial id", func() bool { return first.lastEventID() != "" })
	start := first.lastEventID()
	first.close()

	var sent []apiMessage
	for i := range 100 {
		sent = append(sent, senders[i%5].send(convs[i%5].ID, fmt.Sprintf("missed %d", i)))
	}

	for _, how := range []string{"header", "query"} {
		t.Run(how, func(t *testing.T) {
			var s *sseStream
			if how == "header" {
				s = bob.stream(start)
			} else {
				s = bob.streamWithQuery(t, start)
			}
			prev, _ := strconv.Atoi(start)
			for i := range sent {
				ev, m := s.nextMessage(eventWait)
				id, _ := strconv.Atoi(ev.ID)
				if id != prev+1 {
					t.Fatalf("event %d: id %d after %d, want consecutive", i, id, prev)
				}
				prev = id
				if m.ID != sent[i].ID || m.Content != sent[i].Content || m.Mine {
					t.Fatalf("event %d: got %+v, want %+v", i, m, sent[i])
				}
			}
			s.expectNone(100 * time.Millisecond)
			live := senders[0].send(convs[0].ID, "live "+how)
			if _, m := s.nextMessage(eventWait); m.ID != live.ID {
				t.Fatalf("live: got %s, want %s", m.ID, live.ID)
			}
			sent = append(sent, live) // the next subtest resumes from the same point
			s.close()
		})
	}
}

// streamWithQuery opens the stream with ?token= and ?last_event_id=, as a client
// that starts a new EventSource does.
// TestStreamReadyFirst: every stream starts with a "ready" event whose id and data
// give the position it starts from, a fresh one (the log's end) or a resumed one;
// a resumed stream replays after it, so ids never go back.
func TestStreamReadyFirst(t *testing.T) {
	t.Parallel()
	ts := newTestServer(t)
	alice, bob := ts.newUser(t, "alice"), ts.newUser(t, "bob")
	ready := func(s *sseStream, want string) {
		t.Helper()
		ev := s.next(eventWait)
		if ev.Event != "ready" || ev.ID != want || ev.Data != `{"lastEventId":"`+want+`"}` {
			t.Fatalf("first event %+v, want ready with id %s", ev, want)
		}
	}
	// A user with no events yet starts at 0, which a client must be able to send back.
	ready(bob.streamWithReady(""), "0")

	conv := alice.startConversation(bob)
	var sent []apiMessage
	for i := range 3 {
		sent = append(sent, alice.send(conv.ID, fmt.Sprintf("m%d", i)))
	}
	var head string
	ts.DB.QueryRow(`SELECT event_seq FROM users WHERE id = $1`, bob.User.ID).Scan(&head)
	fresh := bob.streamWithReady("")
	ready(fresh, head)
	fresh.expectNone(100 * time.Millisecond)

	n, _ := strconv.Atoi(head)
	from := strconv.Itoa(n - 3)
	resumed := bob.streamWithReady(from)
	ready(resumed, from)
	for i, want := range sent {
		ev, m := resumed.nextMessage(eventWait)
		if m.ID != want.ID || ev.ID != strconv.Itoa(n-2+i) {
			t.Fatalf("replayed event %d: id %s message %s, want id %d message %s", i, ev.ID, m.ID, n-2+i, want.ID)
		}
	}
	resumed.expectNone(100 * time.Millisecond)
}

func (c *client) streamWithQuery(t *testing.T, lastEventID string) *sseStream {
	t.Helper()
	req, _ := http.NewRequest("GET", c.base+"/api/messages?token="+c.Token+"&last_event_id="+lastEventID, nil)
	req.Header.Set("Accept", "text/event-stream")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	s := &sseStream{t: t, resp: resp, cancel: func() {}, events: make(chan sseEvent, 10000)}
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("stream with query: status %d", resp.StatusCode)
	}
	go s.read()
	t.Cleanup(s.close)
	return s
}

// metricValue reads one unlabelled metric from /metrics.
func metricValue(t testing.TB, ts *testServer, name string) float64 {
	t.Helper()
	resp, b := (&client{t: t, base: ts.URL, hc: ts.hc}).do("GET", "/metrics", nil)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("metrics: %d", resp.StatusCode)
	}
	m := regexp.MustCompile(`(?m)^` + name + ` (\S+)$`).FindSubmatch(b)
	if m == nil {
		t.Fatalf("metric %s not found", name)
	}
	v, _ := strconv.ParseFloat(string(m[1]), 64)
	return v
}

func TestSlowStreamIsDropped(t *testing.T) {
	t.Parallel()
	ts := newTestServer(t, "SSE_BUFFER=8", "SSE_WRITE_TIMEOUT=1s")
	alice, bob := ts.newUser(t, "alice"), ts.newUser(t, "bob")
	conv := alice.startConversation(bob)
	healthy := bob.stream("")

	openSilentStream(t, ts, bob, "")
	waitFor(t, eventWait, "two open streams", func() bool { return metricValue(t, ts, "messenger_streams_open") == 2 })

	big := strings.Repeat("€", 480) // about 1.5 KB a frame
	var slowest time.Duration
	sent := 0
	for sent%25 != 0 || metricValue(t, ts, "messenger_streams_open") > 1 {
		if sent >= 4000 {
			t.Fatal("the stream that never reads was not dropped after 4000 messages")
		}
		start := time.Now()
		m := alice.send(conv.ID, big)
		slowest = max(slowest, time.Since(start))
		sent++
		_, got := healthy.nextMessage(eventWait)
		if got.ID != m.ID {
			t.Fatalf("healthy stream: got %s, want %s", got.ID, m.ID)
		}
	}
	t.Logf("the silent stream was dropped after %d messages; slowest send %v", sent, slowest)
	// A send never waits on a reader; the bound is generous, for a loaded machine.
	if slowest > 10*time.Second {
		t.Fatalf("a send took %v while a stream was stuck: sends must not wait on readers", slowest)
	}
	// The healthy stream goes on.
	m := alice.send(conv.ID, "still here")
	if _, got := healthy.nextMessage(eventWait); got.ID != m.ID {
		t.Fatalf("got %s, want %s", got.ID, m.ID)
	}
}

// TestStreamsDoNotLeak: 1,000 streams opened and closed leave no goroutine
// behind, over HTTP/1.1 (hijacked) and over h2c (served in the handler).
func TestStreamsDoNotLeak(t *testing.T) {
	for _, proto := range []string{"HTTP1.1-hijacked", "h2c"} {
		t.Run(proto, func(t *testing.T) { testStreamsDoNotLeak(t, protocolNamed(proto)) })
	}
}

func testStreamsDoNotLeak(t *testing.T, proto protocol) {
	// A thousand streams from one address (over HTTP/1.1, a thousand connections):
	// past CONN_MAX_PER_ADDR's default.
	ts := newTestServerOver(t, proto, "STREAMS_PER_USER=1000", "CONN_MAX_PER_ADDR=off")
	alice := ts.newUser(t, "alice")
	tr := &http.Transport{MaxIdleConnsPerHost: -1}
	if proto.protoMajor == 2 {
		tr.Protocols = new(http.Protocols)
		tr.Protocols.SetUnencryptedHTTP2(true)
	}
	defer tr.CloseIdleConnections()
	hc := &http.Client{Transport: tr}
	open := func() (*http.Response, context.CancelFunc) {
		ctx, cancel := context.WithCancel(context.Background())
		req, _ := http.NewRequestWithContext(ctx, "GET", ts.URL+"/api/messages", nil)
		req.Header.Set("Accept", "text/event-stream")
		req.Header.Set("Authorization", "Bearer "+alice.Token)
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		if resp.ProtoMajor != proto.protoMajor {
			t.Fatalf("stream over HTTP/%d, want HTTP/%d", resp.ProtoMajor, proto.protoMajor)
		}
		br := bufio.NewReader(resp.Body)
		if l, err := br.ReadString('\n'); err != nil || l != ": connected\n" {
			t.Fatalf("got %q, %v", l, err)
		}
		return resp, cancel
	}
	// Warm up whatever starts once (pools, timers), then take the baseline.
	r, c := open()
	c()
	r.Body.Close()
	waitFor(t, eventWait, "no open streams", func() bool { return metricValue(t, ts, "messenger_streams_open") == 0 })
	tr.CloseIdleConnections()
	runtime.GC()
	baseline := runtime.NumGoroutine()

	const n = 1000
	var wg sync.WaitGroup
	cancels := make([]context.CancelFunc, n)
	bodies := make([]io.Closer, n)
	sem := make(chan struct{}, 50)
	for i := range n {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			r, c := open()
			cancels[i], bodies[i] = c, r.Body
		})
	}
	wg.Wait()
	if got := metricValue(t, ts, "messenger_streams_open"); got != n {
		t.Fatalf("got %v open streams, want %d", got, n)
	}
	for i := range n {
		cancels[i]()
		bodies[i].Close()
	}
	waitFor(t, 10*time.Second, "all streams closed", func() bool { return metricValue(t, ts, "messenger_streams_open") == 0 })
	tr.CloseIdleConnections()
	waitFor(t, 10*time.Second, "goroutines back to the baseline", func() bool {
		return runtime.NumGoroutine() <= baseline+5
	})
}

// TestReadAndTypingReachOnlyTheOther runs on either bus, with the streams on
// another instance than the one taking the requests.
func TestReadAndTypingReachOnlyTheOther(t *testing.T) {
	t.Parallel()
	forEachBus(t, testReadAndTypingReachOnlyTheOther)
}

func testReadAndTypingReachOnlyTheOther(t *testing.T, bus testBus) {
	ts, other := newTestServer(t, bus.env...), newTestServer(t, bus.env...)
	alice, bob := ts.newUser(t, "alice"), ts.newUser(t, "bob")
	conv := alice.startConversation(bob)
	as, bs := alice.as(other).stream(""), bob.as(other).stream("")

	m := alice.send(conv.ID, "read me")
	as.nextMessage(eventWait)
	bs.nextMessage(eventWait)

	bob.mustDo("POST", "/api/conversations/"+conv.ID+"/read_messages", nil, http.StatusNoContent, nil)
	ev := as.next(eventWait)
	if ev.Event != "read" || ev.ID == "" ||
		!strings.Contains(ev.Data, `"conversationId":"`+conv.ID+`"`) || strings.Contains(ev.Data, " ") ||
		!strings.Contains(ev.Data, fmt.Sprintf(`"userId":"%d"`, bob.User.ID)) ||
		!strings.Contains(ev.Data, `"readAt":"`) {
		t.Fatalf("alice got %+v, want a read event from bob", ev)
	}
	// Reading again with nothing new tells nobody anything.
	bob.mustDo("POST", "/api/conversations/"+conv.ID+"/read_messages", nil, http.StatusNoContent, nil)

	alice.mustDo("POST", "/api/conversations/"+conv.ID+"/typing", nil, http.StatusNoContent, nil)
	ev = bs.next(eventWait)
	if ev.Event != "typing" || ev.ID != "" ||
		ev.Data != fmt.Sprintf(`{"conversationId":"%s","userId":"%d"}`, conv.ID, alice.User.ID) {
		t.Fatalf("bob got %+v, want a typing event without id", ev)
	}
	as.expectNone(200 * time.Millisecond)
	bs.expectNone(100 * time.Millisecond)

	// A read event is replayed on resume; typing is not.
	var readID string
	ts.DB.QueryRow(`SELECT max(seq) FROM events WHERE user_id = $1`, alice.User.ID).Scan(&readID)
	prev, _ := strconv.Atoi(readID)
	resumed := alice.stream(strconv.Itoa(prev - 1))
	if ev := resumed.next(eventWait); ev.Event != "read" || ev.ID != readID {
		t.Fatalf("resumed: got %+v, want the read event %s", ev, readID)
	}
	resumed.expectNone(100 * time.Millisecond)
	_ = m
}

// TestLocalDeliveryNeedsNoBus: the instance that commits an event writes it to its
// own streams at once, without waiting for it to come back through the bus. With
// the bus down (NATS shut down after the streams opened) and the periodic sync an
// hour away, a message, a read receipt and a typing notice still reach the streams
// on the committing instance, each exactly once.
func TestLocalDeliveryNeedsNoBus(t *testing.T) {
	t.Parallel()
	nats := newNATSServer(t)
	ts := newTestServer(t, "NATS_URL="+nats.URL(), "SSE_SYNC_INTERVAL=1h")
	alice, bob := ts.newUser(t, "alice"), ts.newUser(t, "bob")
	conv := alice.startConversation(bob)
	as, bs := alice.stream(""), bob.stream("")
	nats.shutdown()

	alice.send(conv.ID, "no bus needed")
	for _, s := range []*sseStream{as, bs} {
		if _, m := s.nextMessage(eventWait); m.Content != "no bus needed" {
			t.Fatalf("got %q, want the message", m.Content)
		}
	}
	bob.mustDo("POST", "/api/conversations/"+conv.ID+"/read_messages", nil, http.StatusNoContent, nil)
	if ev := as.next(eventWait); ev.Event != "read" {
		t.Fatalf("alice got %+v, want a read event", ev)
	}
	alice.mustDo("POST", "/api/conversations/"+conv.ID+"/typing", nil, http.StatusNoContent, nil)
	if ev := bs.next(eventWait); ev.Event != "typing" {
		t.Fatalf("bob got %+v, want a typing event", ev)
	}
	as.expectNone(300 * time.Millisecond)
	bs.expectNone(100 * time.Millisecond)
}

// TestOwnNotificationsDeliveredOnce: an instance's own notifications come back to
// it through LISTEN; it skips them, so a fleeting typing event (which has no
// sequence number to tell a repeat by) is written once.
func TestOwnNotificationsDeliveredOnce(t *testing.T) {
	t.Parallel()
	forEachBus(t, func(t *testing.T, bus testBus) {
		ts := newTestServer(t, bus.env...)
		alice, bob := ts.newUser(t, "alice"), ts.newUser(t, "bob")
		conv := alice.startConversation(bob)
		bs := bob.stream("")
		for range 3 {
			alice.mustDo("POST", "/api/conversations/"+conv.ID+"/typing", nil, http.StatusNoContent, nil)
			if ev := bs.next(eventWait); ev.Event != "typing" {
				t.Fatalf("bob got %+v, want a typing event", ev)
			}
			bs.expectNone(300 * time.Millisecond)
		}
	})
}

// TestPeriodicSyncCatchesUp stores messages for bob with no notification at all,
// as a notification lost with the listener's connection would leave them: the
// periodic sync must tell his stream how far his log reaches, and the stream must
// read them from the log, in order. (The hub queues a sync mark only to a stream
// behind the log; this is the stream that must get one.)
func TestPeriodicSyncCatchesUp(t *testing.T) {
	t.Parallel()
	ts := newTestServer(t, "SSE_SYNC_INTERVAL=200ms")
	alice, bob := ts.newUser(t, "alice"), ts.newUser(t, "bob")
	conv := alice.startConversation(bob)
	s := bob.stream("")
	announced := alice.send(conv.ID, "announced")
	if _, m := s.nextMessage(eventWait); m.ID != announced.ID {
		t.Fatalf("got %s, want %s", m.ID, announced.ID)
	}
	sendMany(t, ts, alice, conv.ID, 3, "unannounced")
	for i := range 3 {
		if _, m := s.nextMessage(eventWait); m.Content != "unannounced" {
			t.Fatalf("message %d after the unannounced sends: got %q", i, m.Content)
		}
	}
	s.expectNone(500 * time.Millisecond)
}

// TestKeepAlivesSpread opens keepAliveSlots streams at once and checks that their
// first keep-alives are spread over SSE_KEEPALIVE instead of falling due together:
// streams that open together (an instance's clients after a restart) must not
// write their keep-alives in one burst, which held back the sends due at that
// moment (docs/performance.md, issue 15). Opened one after the other, the streams
// take consecutive slots, due SSE_KEEPALIVE/keepAliveSlots apart.
func TestKeepAlivesSpread(t *testing.T) {
	t.Parallel()
	const keepAlive = 3200 * time.Millisecond
	ts := newTestServer(t, "SSE_KEEPALIVE="+keepAlive.String())
	alice := ts.newUser(t, "alice")
	firsts := make(chan time.Time, keepAliveSlots)
	for range keepAliveSlots {
		resp := alice.getStream(t)
		t.Cleanup(func() { resp.Body.Close() })
		go func() {
			sc := bufio.NewScanner(resp.Body)
			for sc.Scan() {
				if sc.Text() == ": keep-alive" {
					firsts <- time.Now()
					return
				}
			}
		}()
	}
	var first, last time.Time
	for i := range keepAliveSlots {
		select {
		case at := <-firsts:
			if i == 0 {
				first = at
			}
			last = at
		case <-time.After(keepAlive + 10*time.Second):
			t.Fatalf("%d of %d streams had no keep-alive", keepAliveSlots-i, keepAliveSlots)
		}
	}
	// 15 slots apart: 3 s. Due together, they would all come within the time it
	// took to open the streams.
	if spread := last.Sub(first); spread < keepAlive*3/4 {
		t.Fatalf("first keep-alives spread over %v, want at least %v", spread, keepAlive*3/4)
	}
}

// TestIdleStreamsParked checks that a live stream on a connection taken over has
// no goroutine while it has nothing to write (streamConn.park), and that parked
// streams still get every event. It counts the goroutines in streamConn's code,
// so it runs alone: no other test's streams are open meanwhile.
func TestIdleStreamsParked(t *testing.T) {
	ts := newTestServer(t)
	alice, bob := ts.newUser(t, "alice"), ts.newUser(t, "bob")
	conv := alice.startConversation(bob)
	const n = 20
	streams := make([]*sseStream, n)
	for i := range streams {
		streams[i] = bob.stream("")
	}
	waitFor(t, eventWait, "the streams to open", func() bool { return metricValue(t, ts, "messenger_streams_open") == n })
	waitFor(t, eventWait, "the idle streams to hold no goroutine", func() bool { return streamGoroutines() == 0 })
	for round := range 3 {
		sent := alice.send(conv.ID, fmt.Sprintf("to the parked streams, %d", round))
		for i, s := range streams {
			if _, m := s.nextMessage(eventWait); m.ID != sent.ID {
				t.Fatalf("round %d, stream %d: got %s, want %s", round, i, m.ID, sent.ID)
			}
		}
		waitFor(t, eventWait, "the streams to go idle again", func() bool { return streamGoroutines() == 0 })
	}
}

// streamGoroutines counts the goroutines of this process that are in
// streamConn's code.
func streamGoroutines() int {
	var b bytes.Buffer
	pprof.Lookup("goroutine").WriteTo(&b, 2)
	n := 0
	for _, g := range strings.Split(b.String(), "\n\n") {
		if strings.Contains(g, ".(*streamConn).") {
			n++
		}
	}
	return n
}
