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
// NOTIFY, after the transaction that stored them has committed. pg_notify inside
// the send transaction would serialise every commit on PostgreSQL's notify lock,
// which the benchmark measured at about a quarter of the throughput. Notifications
// that pile up while one NOTIFY is in flight go out together, packed into as few
// payloads as fit, in one round trip.
//
// A lost notification (this process dies after the commit, or the NOTIFY fails) loses
// no event: the events are in the log, and streams sync with it every
// SSE_SYNC_INTERVAL and whenever a later event shows a gap.
type notifier struct {
	db      *sql.DB
	logger  *slog.Logger
	metrics *metrics

	mu      sync.Mutex // guards pending
	pending [][]byte   // encoded notifications, in the order they were queued
	wake    chan struct{}
}

func newNotifier(db *sql.DB, m *metrics, logger *slog.Logger) *notifier {
	return &notifier{db: db, logger: logger, metrics: m, wake: make(chan struct{}, 1)}
}

// enqueue queues n for the next NOTIFY; it never waits.
func (nf *notifier) enqueue(n notification) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(n); err != nil {
		nf.logger.Error("encode notification", "err", err)
		return
	}
	b := bytes.TrimSuffix(buf.Bytes(), []byte("\n"))
	nf.mu.Lock()
	nf.pending = append(nf.pending, b)
	nf.mu.Unlock()
	select {
	case nf.wake <- struct{}{}:
	default:
	}
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
// maxNotifyPayload bytes.
func (nf *notifier) flush(ctx context.Context) {
	nf.mu.Lock()
	batch := nf.pending
	nf.pending = nil
	nf.mu.Unlock()
	if len(batch) == 0 {
		return
	}
	var payloads []string
	var cur []byte
	for _, b := range batch {
		if len(cur) > 0 && len(cur)+1+len(b)+1 > maxNotifyPayload {
			payloads = append(payloads, string(append(cur, ']')))
			cur = nil
		}
		if len(cur) == 0 {
			cur = append(cur, '[')
		} else {
			cur = append(cur, ',')
		}
		cur = append(cur, b...)
	}
	payloads = append(payloads, string(append(cur, ']')))

	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	_, err := nf.db.ExecContext(ctx, `SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p`,
		notifyChannel, pq.Array(payloads))
	if err != nil {
		nf.metrics.notifyFailures.Inc()
		nf.logger.Warn("notify: events will reach other streams at the next sync", "events", len(batch), "err", err)
	}
}
