package main

import (
	"net/http"
	"testing"

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
