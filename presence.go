package main

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// presence tells the notifier whether another instance shares the database, so
// that an instance alone sends no NOTIFY at all: it delivers to its own streams
// straight after the commit (notifier.enqueue), and a NOTIFY nobody else listens
// to cost PostgreSQL about 0.23 ms of CPU per send at 500 sends a second, a third
// of the send itself (docs/performance.md).
//
// Every instance holds a session advisory lock (presenceLockClass, key) on a
// connection of its own, straight to PostgreSQL (DATABASE_LISTEN_URL), for as long
// as it runs; PostgreSQL drops the lock with the connection, so pg_locks lists the
// live instances, with no heartbeat to tune. Each instance reads that list, and
// checks its own lock's connection, every PRESENCE_INTERVAL (1 s).
//
// A new instance must not serve a stream before every running instance knows it
// is there, or an event committed meanwhile would reach its streams only at the
// next sync. So register, before the server serves: takes the lock, reads the
// others' keys, announces itself on instancesChannel ({"hello": key}), and waits
// until each of them has answered ({"ack": key, "from": theirs}), at most
// presenceAckTimeout. An instance answers only after it has started to notify, and
// the notifier reads the flag after each commit: so an event committed before the
// answer was visible in the log when the new instance's streams read it, and one
// committed after is announced.
//
// If the lock's connection is lost (the others then stop notifying this
// instance), watch takes a new one, registers again, and has every stream read
// the log for what it may have missed. Whenever an instance may not know who is
// there (not registered, its LISTEN connection reconnected, a read failed), it
// notifies until its next read of pg_locks.
//
// Instances of versions before this hold no lock: while any runs (a rolling
// upgrade), set NOTIFY_ALWAYS on the new ones.
type presence struct {
	direct  *sql.DB // PostgreSQL itself, for the lock's connection
	db      *sql.DB // the pool: polls and announcements
	hub     *Hub
	metrics *metrics
	logger  *slog.Logger

	conn *sql.Conn    // holds the lock; only register and run use it
	key  atomic.Int64 // this instance's lock is (presenceLockClass, key)

	others atomic.Bool // another instance holds a lock: notify

	mu       sync.Mutex     // guards gen and waiting
	gen      uint64         // bumped by every hello: a poll read before one may not clear others
	waiting  map[int64]bool // the instances whose answer register still awaits
	answered chan struct{}  // signalled when waiting becomes empty

	acks     chan int64    // hellos to answer, for answer
	interval time.Duration // how often watch polls
	always   bool          // NOTIFY_ALWAYS: notify even when alone
}

const (
	presenceLockClass  = 0x6d736772 // "msgr"
	instancesChannel   = "messenger_instances"
	presenceAckTimeout = 5 * time.Second
	maxPendingAcks     = 64
)

func newPresence(direct, db *sql.DB, hub *Hub, interval time.Duration, m *metrics, logger *slog.Logger) *presence {
	return &presence{direct: direct, db: db, hub: hub, metrics: m, logger: logger, interval: interval,
		answered: make(chan struct{}, 1), acks: make(chan int64, maxPendingAcks)}
}

// alone reports whether no other instance shares the database, so that nothing
// need be notified. A nil presence (NATS: the bus routes by user) and one told to
// notify always (NOTIFY_ALWAYS) are never alone.
func (p *presence) alone() bool {
	return p != nil && !p.always && !p.others.Load()
}

// register takes this instance's lock and waits until the instances already
// running have answered its hello (see presence). The listener and answer must be
// running. On an error it holds no lock, and the caller tries again.
func (p *presence) register(ctx context.Context) error {
	p.release()
	p.notifyAnyway() // until registered
	conn, err := p.direct.Conn(ctx)
	if err != nil {
		return fmt.Errorf("presence connection: %w", err)
	}
	for p.conn == nil {
		key := 1 + rand.Int64N(1<<31-1) // 0 means none in the announcements
		var ok bool
		if err := conn.QueryRowContext(ctx, `SELECT pg_try_advisory_lock($1::int, $2::int)`, presenceLockClass, key).Scan(&ok); err != nil {
			conn.Close()
			return fmt.Errorf("presence lock: %w", err)
		}
		if ok { // else another instance drew the same key: draw again
			p.conn = conn
			p.key.Store(key)
		}
	}
	if err := p.greet(ctx); err != nil {
		p.release()
		return err
	}
	return nil
}

// greet reads the other instances, says hello, and waits for their answers: at
// most presenceAckTimeout, and no longer for an instance whose lock is gone.
func (p *presence) greet(ctx context.Context) error {
	others, err := p.count(ctx)
	if err != nil || len(others) == 0 {
		return err
	}
	p.mu.Lock()
	p.waiting = make(map[int64]bool, len(others))
	for _, k := range others {
		p.waiting[k] = true
	}
	p.mu.Unlock()
	if err := p.announce(ctx, map[string]int64{"hello": p.key.Load()}); err != nil {
		return err
	}
	timeout := time.NewTimer(presenceAckTimeout)
	defer timeout.Stop()
	recheck := time.NewTicker(presenceAckTimeout / 20)
	defer recheck.Stop()
	for {
		p.mu.Lock()
		left := len(p.waiting)
		p.mu.Unlock()
		if left == 0 {
			return nil
		}
		select {
		case <-p.answered:
		case <-recheck.C:
			// An instance that has stopped, or is stopping (it releases its lock
			// before it stops listening), will not answer.
			now, err := p.holders(ctx)
			if err != nil {
				return err
			}
			p.mu.Lock()
			for k := range p.waiting {
				if !slices.Contains(now, k) {
					delete(p.waiting, k)
				}
			}
			p.mu.Unlock()
		case <-timeout.C:
			p.logger.Warn("instances did not answer; their events may reach this instance's streams only at the next sync",
				"instances", left)
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// release gives up the lock, if held, by discarding its connection: Close
// alone would return the connection to the pool with the lock still held.
func (p *presence) release() {
	if p.conn != nil {
		p.conn.Raw(func(any) error { return driver.ErrBadConn })
		p.conn.Close()
		p.conn = nil
	}
}

// notifyAnyway makes the notifier notify until a later read of pg_locks says this
// instance is alone: for whenever this instance may not know who is there (not
// registered; a hello possibly lost with the LISTEN connection; a failed read).
func (p *presence) notifyAnyway() {
	if p == nil {
		return
	}
	p.mu.Lock()
	p.gen++
	p.others.Store(true)
	p.mu.Unlock()
}

// holders returns the keys of the other instances' locks.
func (p *presence) holders(ctx context.Context) ([]int64, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	rows, err := p.db.QueryContext(ctx, `
		SELECT objid::bigint FROM pg_locks
		WHERE locktype = 'advisory' AND granted AND objsubid = 2 AND classid::bigint = $1
		  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
		  AND objid::bigint <> $2`, presenceLockClass, p.key.Load())
	if err != nil {
		return nil, fmt.Errorf("read instances: %w", err)
	}
	defer rows.Close()
	var keys []int64
	for rows.Next() {
		var k int64
		if err := rows.Scan(&k); err != nil {
			return nil, fmt.Errorf("scan instance: %w", err)
		}
		keys = append(keys, k)
	}
	return keys, rows.Err()
}

// announce sends v on instancesChannel.
func (p *presence) announce(ctx context.Context, v map[string]int64) error {
	payload, _ := json.Marshal(v)
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if _, err := p.db.ExecContext(ctx, `SELECT pg_notify($1, $2)`, instancesChannel, string(payload)); err != nil {
		return fmt.Errorf("announce instance: %w", err)
	}
	return nil
}

// noted takes a notification from instancesChannel; it never waits. A hello
// makes this instance notify from now on, before answer answers it; an answer
// to this instance's hello is counted.
func (p *presence) noted(payload string) {
	var n struct {
		Hello, Ack, From int64
	}
	if err := json.Unmarshal([]byte(payload), &n); err != nil {
		p.logger.Error("decode instance notification", "err", err)
		p.notifyAnyway()
		return
	}
	switch {
	case n.Hello != 0 && n.Hello != p.key.Load():
		p.notifyAnyway()
		select {
		case p.acks <- n.Hello:
		default: // that instance waits presenceAckTimeout, then serves
			p.logger.Warn("too many instances to answer", "instance", n.Hello)
		}
	case n.Ack != 0 && n.Ack == p.key.Load():
		p.mu.Lock()
		delete(p.waiting, n.From)
		empty := len(p.waiting) == 0
		p.mu.Unlock()
		if empty {
			wake(p.answered)
		}
	}
}

// answer answers the hellos of starting instances until ctx is done. It runs
// from before register, so that two instances starting at once answer each other.
func (p *presence) answer(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case k := <-p.acks:
			if err := p.announce(ctx, map[string]int64{"ack": k, "from": p.key.Load()}); err != nil && ctx.Err() == nil {
				p.logger.Warn("answer instance", "err", err)
			}
		}
	}
}

// watch reads which instances hold a lock every interval, and registers again
// when this instance's own lock is lost, until ctx is done.
func (p *presence) watch(ctx context.Context) {
	every(ctx, p.interval, nil, func() {
		if err := p.poll(ctx); err != nil && ctx.Err() == nil {
			p.notifyAnyway()
			p.logger.Warn("instances", "err", err)
		}
	})
}

// poll registers again if this instance lost its lock, and reads the others.
func (p *presence) poll(ctx context.Context) error {
	err := errNotRegistered
	if p.conn != nil {
		pingCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
		err = p.conn.PingContext(pingCtx)
		cancel()
	}
	if err != nil {
		// The others stop notifying this instance once they see the lock gone.
		p.logger.Warn("presence lock lost; registering again", "err", err)
		if err := p.register(ctx); err != nil {
			return err
		}
		p.hub.resyncSoon() // read the log for what the streams missed meanwhile
		return nil
	}
	_, err = p.count(ctx)
	return err
}

// count reads the other instances' locks and returns their keys. With any, this
// instance notifies from now on; with none, it stops, unless a hello came while
// it read, which the read may predate.
func (p *presence) count(ctx context.Context) ([]int64, error) {
	p.mu.Lock()
	gen := p.gen
	p.mu.Unlock()
	others, err := p.holders(ctx)
	if err != nil {
		return nil, err
	}
	p.mu.Lock()
	if len(others) > 0 || p.gen == gen {
		p.others.Store(len(others) > 0)
	}
	p.mu.Unlock()
	p.metrics.peerInstances.Set(float64(len(others)))
	return others, nil
}

// close releases the lock.
func (p *presence) close() {
	if p == nil {
		return
	}
	p.release()
	p.direct.Close()
}

var errNotRegistered = errors.New("no lock held")
