package main

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
)

// natsBus carries wake-ups between instances through NATS instead of NOTIFY, when
// NATS_URL is set. Each user has a subject of their own (prefix.user.<id>); an
// instance subscribes to a user's subject while it holds one of their streams, so
// it receives the wake-ups of its own users only, where NOTIFY hands every
// notification to every instance.
//
// A message is what a NOTIFY payload would be (a JSON array of notifications), with
// each notification's To cut down to the subject's user. Like NOTIFY, it only says
// "look": PostgreSQL stays the only record. A wake-up lost on the way (NATS is down,
// the subscription's queue overflows, a publish fails) costs latency, not events:
// a later event shows the stream a gap, every stream syncs with the log after the
// connection comes back and after a drop, and every SSE_SYNC_INTERVAL anyway.
type natsBus struct {
	conn    *nats.Conn
	prefix  string // subjects are prefix.user.<id>
	metrics *metrics
	logger  *slog.Logger

	msgs    chan *nats.Msg // what every subscription received, in order per user
	lost    chan struct{}  // wake-ups may have been lost: sync every stream
	failing atomic.Bool    // the last publish failed (logged once per run of failures)

	mu   sync.Mutex                   // guards subs
	subs map[int64]*nats.Subscription // user id → the subscription to their subject
}

const (
	// busQueue is how many received messages wait for the hub; past it NATS drops
	// messages (a slow consumer) and the streams sync with the log.
	busQueue = 4096
	// busReconnectWait is how long the client waits between attempts to reconnect.
	busReconnectWait = 250 * time.Millisecond
	// busSettleTimeout bounds the round trip that confirms a new subscription.
	busSettleTimeout = time.Second
)

// busPrefixRE is what NATS_SUBJECT_PREFIX may be: dot-separated tokens without
// NATS's wildcards or spaces.
var busPrefixRE = regexp.MustCompile(`^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$`)

// openBus connects to the NATS server at cfg.natsURL. The subject prefix is
// cfg.natsSubjectPrefix or, by default, one kept in the database, so that two
// deployments sharing a NATS server never wake each other's streams while every
// instance on one database agrees.
func openBus(ctx context.Context, cfg config, db *sql.DB, m *metrics, logger *slog.Logger) (*natsBus, error) {
	prefix := cfg.natsSubjectPrefix
	if prefix == "" {
		b := make([]byte, 8)
		rand.Read(b)
		id, err := storedSetting(ctx, db, "bus_subject_prefix", hex.EncodeToString(b))
		if err != nil {
			return nil, err
		}
		prefix = "messenger." + id
	}
	bus := &natsBus{
		prefix: prefix, metrics: m, logger: logger,
		msgs: make(chan *nats.Msg, busQueue), lost: make(chan struct{}, 1),
		subs: make(map[int64]*nats.Subscription),
	}
	conn, err := nats.Connect(cfg.natsURL,
		nats.Name("messenger"),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(busReconnectWait),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			logger.Warn("bus disconnected: streams sync with the log when it is back", "err", err)
		}),
		nats.ReconnectHandler(func(*nats.Conn) {
			// The subscriptions are back; what was published meanwhile is not.
			m.busReconnects.Inc()
			logger.Info("bus reconnected")
			bus.markLost()
		}),
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			logger.Warn("bus", "err", err)
			if errors.Is(err, nats.ErrSlowConsumer) {
				m.busSlow.Inc()
				bus.markLost()
			}
		}),
	)
	if err != nil {
		return nil, fmt.Errorf("connect to NATS: %w", err)
	}
	bus.conn = conn
	return bus, nil
}

// storedSetting returns the value of the setting name, storing value first if it
// has none, so that every instance reads the same value. When another instance
// stores it at the same moment, the INSERT waits for that one's commit and then
// stores nothing, while the SELECT, in the same statement's snapshot, cannot see
// the row yet: the statement finds no row, and a second one, with a fresh
// snapshot, reads it.
func storedSetting(ctx context.Context, db *sql.DB, name, value string) (string, error) {
	var v string
	var err error
	for range 2 {
		err = db.QueryRowContext(ctx, `
			WITH ins AS (
				INSERT INTO settings (name, value) VALUES ($1, $2)
				ON CONFLICT (name) DO NOTHING RETURNING value)
			SELECT value FROM ins UNION ALL SELECT value FROM settings WHERE name = $1
			LIMIT 1`, name, value).Scan(&v)
		if !errors.Is(err, sql.ErrNoRows) {
			break
		}
	}
	if err != nil {
		return "", fmt.Errorf("setting %s: %w", name, err)
	}
	return v, nil
}

func (b *natsBus) subject(user int64) string {
	return b.prefix + ".user." + strconv.FormatInt(user, 10)
}

func (b *natsBus) markLost() { wake(b.lost) }

// subscribe starts receiving user's wake-ups; the hub calls it, under its lock, when
// the user's first stream here opens. A failure is logged: the user's streams then
// live on the periodic sync.
func (b *natsBus) subscribe(user int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.subs[user] != nil {
		return
	}
	sub, err := b.conn.ChanSubscribe(b.subject(user), b.msgs)
	if err != nil {
		b.logger.Warn("bus: subscribe", "user", user, "err", err)
		return
	}
	b.subs[user] = sub
}

// unsubscribe stops receiving user's wake-ups; the hub calls it, under its lock,
// when the user's last stream here closes.
func (b *natsBus) unsubscribe(user int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if sub := b.subs[user]; sub != nil {
		delete(b.subs, user)
		if err := sub.Unsubscribe(); err != nil && !errors.Is(err, nats.ErrConnectionClosed) {
			b.logger.Warn("bus: unsubscribe", "user", user, "err", err)
		}
	}
}

// settle waits until the NATS server has seen the subscriptions made so far, so
// that a stream which reads the log's end after settle also receives every
// wake-up published after that. It does nothing on a nil bus, and does not wait
// while disconnected: the sync after the reconnect covers that time.
func (b *natsBus) settle() {
	if b == nil || !b.conn.IsConnected() {
		return
	}
	if err := b.conn.FlushTimeout(busSettleTimeout); err != nil {
		b.logger.Warn("bus: confirm subscriptions", "err", err)
	}
}

// publish sends payload, a JSON array of user's notifications, to user's subject;
// a failure counts as a failed notify, and the first of a run of them is logged.
func (b *natsBus) publish(user int64, payload []byte) {
	if err := b.conn.Publish(b.subject(user), payload); err != nil {
		b.metrics.notifyFailures.Inc()
		if b.failing.CompareAndSwap(false, true) {
			b.logger.Warn("bus: publish: events will reach streams at the next sync; failures counted in messenger_notify_failures_total until one succeeds", "err", err)
		}
		return
	}
	if b.failing.CompareAndSwap(true, false) {
		b.logger.Info("bus: publishing again")
	}
	b.metrics.busMessages.WithLabelValues("published").Inc()
}

// run hands what the subscriptions receive to h, as the listener does NOTIFY
// payloads, and asks h to sync every stream when wake-ups may have been lost, until
// ctx is done.
func (b *natsBus) run(ctx context.Context, h *Hub) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-b.lost:
			h.resyncSoon()
		case msg := <-b.msgs:
			b.metrics.busMessages.WithLabelValues("received").Inc()
			h.dispatch(string(msg.Data))
		}
	}
}

// close sends what is still buffered and disconnects; it runs after the notifier's
// last flush. It does nothing on a nil bus.
func (b *natsBus) close() {
	if b == nil {
		return
	}
	if err := b.conn.FlushTimeout(5 * time.Second); err != nil {
		b.logger.Warn("bus: last flush", "err", err)
	}
	b.conn.Close()
}
