package main

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"log/slog"
	"sync"
	"time"

	"github.com/lib/pq"
)

// maxNotifyPayload keeps each NOTIFY payload under PostgreSQL's limit of 8000 bytes.
const maxNotifyPayload = 7900

// notifier announces committed events to every instance (this one included) with
// NOTIFY, or through the bus when NATS_URL is set (see natsBus), after the
// transaction that stored them has committed. pg_notify inside the send
// transaction would serialise every commit on PostgreSQL's notify lock, which the
// benchmark measured at about a quarter of the throughput. Notifications
// that pile up while one NOTIFY is in flight go out together, packed into as few
// payloads as fit, in one round trip.
//
// A lost notification (this process dies after the commit, or the NOTIFY fails) loses
// no event: the events are in the log, and streams sync with it every
// SSE_SYNC_INTERVAL and whenever a later event shows a gap.
type notifier struct {
	db      *sql.DB
	hub     *Hub      // this instance's: its streams get each event at once
	bus     *natsBus  // if set, notifications go through it instead of NOTIFY
	peers   *presence // without the bus: whether any other instance listens
	logger  *slog.Logger
	metrics *metrics

	mu      sync.Mutex    // guards pending
	pending []pendingNote // in the order they were queued
	wake    chan struct{}
}

// pendingNote is one encoded notification waiting to be sent: to every instance
// (user 0, through NOTIFY), or to the instances holding user's streams (the bus),
// with To cut down to that user.
type pendingNote struct {
	user int64
	b    []byte
}

func newNotifier(db *sql.DB, hub *Hub, bus *natsBus, m *metrics, logger *slog.Logger) *notifier {
	return &notifier{db: db, hub: hub, bus: bus, logger: logger, metrics: m, wake: make(chan struct{}, 1)}
}

// enqueue hands n, committed, to this instance's streams at once, and queues it for
// the next NOTIFY, or the next publish of each of its users' subjects, for the
// other instances; it never waits. The local delivery saves the round trip through
// PostgreSQL (or NATS) and back; n carries this instance as its origin, so that
// the hub skips it when it comes back. Per-user order needs nothing more: a stream
// writes events by sequence number and reads any gap from the log.
//
// An instance alone (see presence) sends nothing: nobody else would read it. The
// flag is read after the commit, which is what presence.register relies on.
func (nf *notifier) enqueue(n notification) {
	nf.hub.dispatchOne(n)
	if nf.bus == nil && nf.peers.alone() {
		return
	}
	n.Origin = nf.hub.origin
	var notes []pendingNote
	if nf.bus == nil {
		notes = append(notes, pendingNote{b: nf.encode(n)})
	} else {
		all := n.To
		for _, to := range all {
			n.To = [][2]int64{to}
			notes = append(notes, pendingNote{user: to[0], b: nf.encode(n)})
		}
	}
	nf.mu.Lock()
	for _, p := range notes {
		if p.b != nil {
			nf.pending = append(nf.pending, p)
		}
	}
	nf.mu.Unlock()
	wake(nf.wake)
}

// encode returns n as JSON, or nil if it does not encode.
func (nf *notifier) encode(n notification) []byte {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(n); err != nil {
		nf.logger.Error("encode notification", "err", err)
		return nil
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte("\n"))
}

// run sends the queued notifications until ctx is done, then sends what is left.
func (nf *notifier) run(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			final, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			nf.flush(final)
			cancel()
			return
		case <-nf.wake:
			nf.flush(ctx)
		}
	}
}

// flush sends everything queued, packed into JSON arrays of at most
// maxNotifyPayload bytes: all in one NOTIFY round trip, or one bus message per
// user (more if they do not fit), in the order they were queued.
func (nf *notifier) flush(ctx context.Context) {
	nf.mu.Lock()
	batch := nf.pending
	nf.pending = nil
	nf.mu.Unlock()
	if len(batch) == 0 {
		return
	}
	if nf.bus != nil {
		var users []int64
		byUser := map[int64][][]byte{}
		for _, p := range batch {
			if byUser[p.user] == nil {
				users = append(users, p.user)
			}
			byUser[p.user] = append(byUser[p.user], p.b)
		}
		for _, u := range users {
			for _, payload := range packNotifications(byUser[u]) {
				nf.bus.publish(u, payload)
			}
		}
		return
	}
	var payloads []string
	for _, p := range packNotifications(batchBytes(batch)) {
		payloads = append(payloads, string(p))
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	_, err := nf.db.ExecContext(ctx, `SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p`,
		notifyChannel, pq.Array(payloads))
	if err != nil {
		nf.metrics.notifyFailures.Inc()
		nf.logger.Warn("notify: events will reach other streams at the next sync", "events", len(batch), "err", err)
	}
}

func batchBytes(batch []pendingNote) [][]byte {
	bs := make([][]byte, len(batch))
	for i, p := range batch {
		bs[i] = p.b
	}
	return bs
}

// packNotifications packs encoded notifications, in order, into JSON arrays of at
// most maxNotifyPayload bytes (a single notification larger than that is sent alone).
func packNotifications(batch [][]byte) [][]byte {
	var payloads [][]byte
	var cur []byte
	for _, b := range batch {
		if len(cur) > 0 && len(cur)+1+len(b)+1 > maxNotifyPayload {
			payloads = append(payloads, append(cur, ']'))
			cur = nil
		}
		if len(cur) == 0 {
			cur = append(cur, '[')
		} else {
			cur = append(cur, ',')
		}
		cur = append(cur, b...)
	}
	return append(payloads, append(cur, ']'))
}
