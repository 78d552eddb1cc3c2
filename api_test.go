package main

import (
	"net/http"
	"testing"
	"time"
)

func TestSmoke(t *testing.T) {
	ts := newTestServer(t)
	alice, bob := ts.newUser(t, "alice"), ts.newUser(t, "bob")
	conv := alice.startConversation(bob)
	bs := bob.stream("")
	m := alice.send(conv.ID, "hi")
	_, got := bs.nextMessage(5 * time.Second)
	if got.ID != m.ID || got.Mine {
		t.Fatalf("got %+v, want message %s not mine", got, m.ID)
	}
	alice.mustDo("GET", "/api/conversations/"+conv.ID, nil, http.StatusOK, nil)
}
