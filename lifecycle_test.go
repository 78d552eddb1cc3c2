package main

import (
	"io"
	"net/http"
	"regexp"
	"strconv"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// TestServerLeavesNoGoroutines runs a server through everything that starts a
// goroutine (streams, sends, read receipts, typing, a sign-out that ends a stream,
// the background loops), stops it, and checks that every goroutine it started has
// ended. It runs serially, so no other test's goroutines come and go meanwhile;
// those of tests that ran before are ignored.
func TestServerLeavesNoGoroutines(t *testing.T) {
	before := goleak.IgnoreCurrent()
	ts := newTestServer(t)
	alice, bob := ts.newUser(t, "alice"), ts.newUser(t, "bob")
	conv := alice.startConversation(bob)
	bobStream := bob.stream("")
	aliceStream := alice.stream("")
	for _, text := range []string{"one", "two"} {
		alice.send(conv.ID, text)
		bobStream.nextMessage(eventWait)
	}
	bob.mustDo("POST", "/api/conversations/"+conv.ID+"/read_messages", nil, http.StatusNoContent, nil)
	bob.mustDo("POST", "/api/conversations/"+conv.ID+"/typing", nil, http.StatusNoContent, nil)
	alice.mustDo("POST", "/api/logout", nil, http.StatusNoContent, nil)
	if !aliceStream.ended(eventWait) {
		t.Fatal("alice's stream did not end after she signed out")
	}
	if err := ts.stop(t); err != nil {
		t.Fatalf("stop: %v", err)
	}
	if !bobStream.ended(eventWait) {
		t.Fatal("bob's stream did not end when the server stopped")
	}
	http.DefaultClient.CloseIdleConnections()
	ts.DB.Close() // the test's own connection to look at the database
	goleak.VerifyNone(t, before)
}

// TestShutdownEndsStreamsWithRetry: when the server stops, each stream's last frame
// is a retry of 1 to 5 seconds, so that the clients of a stopping instance come
// back to the others spread out rather than all at once.
func TestShutdownEndsStreamsWithRetry(t *testing.T) {
	t.Parallel()
	ts := newTestServer(t)
	alice := ts.newUser(t, "alice")
	resp := alice.getStream(t)
	defer resp.Body.Close()
	body := make(chan []byte, 1)
	go func() {
		b, _ := io.ReadAll(resp.Body) // to the end of the stream
		body <- b
	}()
	waitFor(t, eventWait, "the stream to open", func() bool { return metricValue(t, ts, "messenger_streams_open") == 1 })
	if err := ts.stop(t); err != nil {
		t.Fatalf("stop: %v", err)
	}
	var b []byte
	select {
	case b = <-body:
	case <-time.After(eventWait):
		t.Fatal("the stream did not end when the server stopped")
	}
	m := regexp.MustCompile(`\nretry: (\d+)\n\n$`).FindSubmatch(b)
	if m == nil {
		t.Fatalf("the stream's last frame is not a retry:\n%s", b)
	}
	if ms, _ := strconv.Atoi(string(m[1])); ms < 1000 || ms > 5000 {
		t.Errorf("retry: %d ms, want 1,000 to 5,000", ms)
	}
}
