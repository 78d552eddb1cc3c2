package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	mathrand "math/rand/v2"
	"mime"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/lib/pq"
)

// How events travel. Every event that is kept (a message, a read) is a row of the
// user's log, numbered by the user's own sequence (events.seq), written in the same
// transaction as what it reports, and announced with NOTIFY on notifyChannel; the
// schema's lock order makes each user's sequence commit in order. Every instance,
// the one that took the request included, LISTENs and hands each notification to
// its Hub, which passes it to the user's open streams. A stream writes events in
// sequence order, skips what it already wrote and reads any gap from the log, so a
// notification that is late, doubled or lost changes nothing but latency: after
// the listener reconnects, and every syncInterval, each stream is told how far its
// user's log reaches and catches up. With NATS_URL set, a NATS subject per user
// carries the notifications instead, to the instances holding that user's streams
// (see natsBus); everything else stays the same.

// notifyChannel is the PostgreSQL channel every instance listens on.
const notifyChannel = "messenger_events"

// notification is one event announced on notifyChannel; a NOTIFY payload is a JSON
// array of them (see notifier).
type notification struct {
	Kind string     `json:"kind"` // "message", "read" or "typing"
	To   [][2]int64 `json:"to"`   // [user id, seq]: who gets it, and its place in their log (0: fleeting)
	// Origin is the instance that committed the event; it has delivered it to its
	// own streams already (see notifier.enqueue), so it skips it when it comes back.
	Origin string `json:"origin,omitempty"`

	// Message fields.
	Sender         int64  `json:"sender"`
	ID             int64  `json:"id"`
	ConversationID int64  `json:"conversationId"`
	Content        string `json:"content"`
	CreatedAt      int64  `json:"createdAt"` // Unix microseconds

	// Data is the payload of read and typing events, as the stream sends it.
	Data json.RawMessage `json:"data"`
}

// event is one thing to send down a user's streams.
type event struct {
	seq   int64  // place in the user's log; 0 for fleeting events and sync marks
	frame []byte // the whole SSE frame, encoded once for all the user's streams
	// syncTo, on a sync mark, is how far the user's log is known to reach; the
	// stream reads from the log whatever it has not written up to there.
	syncTo int64
}

// Hub fans events out to the open streams of each user on this instance.
type Hub struct {
	db      *sql.DB
	buffer  int // most events that wait in each stream's queue (SSE_BUFFER)
	perUser int // open streams one user may hold (STREAMS_PER_USER)
	max     int // open streams in all (STREAMS_MAX)
	metrics *metrics
	logger  *slog.Logger
	running sync.WaitGroup // registered streams, until they unregister (see handleStream)

	// origin names this instance in the notifications it sends (see notification).
	origin string

	// bus, if set, carries the wake-ups instead of NOTIFY: the hub subscribes to a
	// user's on their first stream here and unsubscribes on their last.
	bus    *natsBus
	resync chan struct{} // a sync of every stream is due (see resyncSoon)

	errUserLimit *apiError // the answer past perUser

	mu      sync.RWMutex        // guards streams, open and closed
	streams map[int64][]*stream // user id → that user's open streams (at most perUser)
	open    int                 // streams in all the sets of streams
	closed  bool                // set on shutdown: no new streams
	// nextSlot is the keep-alive slot of the next stream (see keepAlives).
	nextSlot uint8
}

// defaultStreamsPerUser is STREAMS_PER_USER's default: a person with a dozen tabs on
// each of a laptop, a desktop and a phone stays under it, and a client that opens
// streams in a loop is stopped long before it holds a noticeable share of STREAMS_MAX.
const defaultStreamsPerUser = 32

// defaultStreamsMax is STREAMS_MAX's default: the process's open-file limit
// (RLIMIT_NOFILE, which the Go runtime raises to the hard limit at start), less one
// descriptor for each pooled database connection, two for the listener connection
// and the listening socket, and a tenth of the limit (at least 256) for ordinary
// requests, log files and the like. Each stream holds one descriptor.
func defaultStreamsMax(dbConns int) int {
	n, ok := openFileLimit()
	if !ok {
		return 1000
	}
	return max(1, n-dbConns-2-max(256, n/10))
}

// openFileLimit is the process's open-file limit (RLIMIT_NOFILE), if it can be read.
func openFileLimit() (int, bool) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 0, false
	}
	return int(min(lim.Cur, 1<<24)), true // RLIM_INFINITY is a huge number
}

// The answers to a stream request the hub refuses; the 429 for a user over the cap
// is built in newHub, with the cap in its text.
var (
	errServerFull   = unavailable("too many open streams on this server; try again shortly", 5*time.Second)
	errShuttingDown = unavailable("server is shutting down", time.Second)
)

func newHub(db *sql.DB, cfg config, m *metrics, logger *slog.Logger) *Hub {
	return &Hub{db: db, origin: rand.Text(), buffer: cfg.streamBuffer, perUser: cfg.streamsPerUser, max: cfg.streamsMax,
		metrics: m, logger: logger, streams: make(map[int64][]*stream), resync: make(chan struct{}, 1),
		errUserLimit: tooMany(fmt.Sprintf("too many open streams: at most %d per user; close one (another tab or device)", cfg.streamsPerUser),
			10*time.Second),
	}
}

// stream is one open GET /api/messages response.
type stream struct {
	userID int64

	// queue holds the events publish gave the stream that it has not taken yet,
	// at most the hub's buffer of them; signal tells the stream when it fills
	// from empty. A slice that exists only while events wait, rather than a
	// channel with a buffer of SSE_BUFFER, costs an idle stream nothing (see
	// take).
	mu    sync.Mutex // guards queue
	queue []*event

	// How signal reaches the stream: a stream served by a goroutine of its own
	// waits on ready; a parked stream (see streamConn.park), which has no
	// goroutine while it has nothing to do, is run when signalled and not
	// running already, and has no ready (nil: signals before park are dropped,
	// and park looks for itself).
	ready   chan struct{}
	parked  atomic.Pointer[streamConn]
	running atomic.Bool

	done     chan struct{} // closed by end: the hub wants this stream gone
	ended    atomic.Bool
	slow     atomic.Bool // ended because it fell behind
	expired  atomic.Bool // ended because its token expired
	shutdown atomic.Bool // ended because the server is shutting down

	// sessionID is the session of the token that opened the stream, and
	// sessionEnded why that session ended, if that is why the stream was ended.
	sessionID    int64
	sessionEnded atomic.Pointer[string]

	// A stream that resumes starts out replaying: until goLive, publish queues none
	// of its events but raises heldTo to the highest position it was told of (an
	// event's seq or a sync mark), so a long replay can neither fill the queue nor
	// be overtaken by live events. replaying changes only under the hub's write
	// lock; heldTo is raised under its read lock, by the dispatch and sync
	// goroutines at once, hence atomic.
	replaying atomic.Bool
	heldTo    atomic.Int64

	// written is how far the stream has written its user's log (its streamConn's
	// last), so that a sync mark that would tell it nothing new is not queued: the
	// periodic sync then wakes no stream that is up to date.
	written atomic.Int64

	// slot is the group of streams whose keep-alives are due together, and
	// keepAliveDue is set, and the stream signalled, when its keep-alive is due (see
	// keepAlives).
	slot         uint8
	keepAliveDue atomic.Bool
}

// push queues ev unless max events wait already; it reports whether it did.
func (st *stream) push(ev *event, max int) bool {
	st.mu.Lock()
	if len(st.queue) >= max {
		st.mu.Unlock()
		return false
	}
	st.queue = append(st.queue, ev)
	first := len(st.queue) == 1
	st.mu.Unlock()
	if first {
		st.signal()
	}
	return true
}

// signal tells the stream it has something to do: events queued, a keep-alive due,
// or its end.
func (st *stream) signal() {
	if sc := st.parked.Load(); sc != nil {
		if st.running.CompareAndSwap(false, true) {
			go sc.run()
		}
		return
	}
	wake(st.ready)
}

// over reports whether the stream was ended. It reads done, not ended: endFor
// records why the stream ended between the two.
func (st *stream) over() bool {
	select {
	case <-st.done:
		return true
	default:
		return false
	}
}

// pending reports whether the stream has something to do (see signal).
func (st *stream) pending() bool {
	if st.over() || st.keepAliveDue.Load() {
		return true
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	return len(st.queue) > 0
}

// take returns the waiting events, in order, and empties the queue.
func (st *stream) take() []*event {
	st.mu.Lock()
	defer st.mu.Unlock()
	evs := st.queue
	st.queue = nil
	return evs
}

// giveBack lets the queue reuse evs, written and emptied, if nothing was queued
// since take.
func (st *stream) giveBack(evs []*event) {
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.queue == nil {
		st.queue = evs[:0]
	}
}

// end asks the stream to finish; it reports whether this call was the first.
func (st *stream) end() bool { return st.endFor(nil) }

// endFor is end, setting why (if not nil) first if this call is the first: the
// stream then knows why it ended as soon as it sees done.
func (st *stream) endFor(why *atomic.Bool) bool {
	if st.ended.CompareAndSwap(false, true) {
		if why != nil {
			why.Store(true)
		}
		close(st.done)
		st.signal()
		return true
	}
	return false
}

// holdBack raises st.heldTo to position to, unless it is there already.
func (st *stream) holdBack(to int64) {
	for {
		held := st.heldTo.Load()
		if to <= held || st.heldTo.CompareAndSwap(held, to) {
			return
		}
	}
}

// register adds a stream for user's session, replaying (see stream) if it resumes
// from a position; waits says a goroutine of its own will wait on it (ready),
// rather than the stream being parked (see streamConn.park). It is the one place that enforces the stream caps: it returns
// h.errUserLimit (429) when user already holds STREAMS_PER_USER streams here,
// errServerFull (503) when STREAMS_MAX are open, and errShuttingDown (503) once
// the hub is closing.
func (h *Hub) register(user, session int64, replaying, waits bool) (*stream, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	switch {
	case h.closed:
		return nil, errShuttingDown
	case len(h.streams[user]) >= h.perUser:
		h.metrics.streamsRefused.WithLabelValues("user_limit").Inc()
		return nil, h.errUserLimit
	case h.open >= h.max:
		h.metrics.streamsRefused.WithLabelValues("server_full").Inc()
		return nil, errServerFull
	}
	st := &stream{userID: user, sessionID: session, done: make(chan struct{}), slot: h.nextSlot}
	if waits {
		st.ready = make(chan struct{}, 1)
	}
	h.nextSlot = (h.nextSlot + 1) % keepAliveSlots
	st.replaying.Store(replaying)
	if h.streams[user] == nil && h.bus != nil {
		h.bus.subscribe(user)
	}
	h.streams[user] = append(h.streams[user], st)
	h.open++
	h.metrics.streamsOpen.Inc()
	h.running.Add(1) // under mu, after the closed check: shutdown's Wait cannot miss it
	return st, nil
}

// unregister removes st; the hub sends it nothing more.
func (h *Hub) unregister(st *stream) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if set := h.streams[st.userID]; slices.Contains(set, st) {
		set = slices.DeleteFunc(set, func(s *stream) bool { return s == st })
		h.streams[st.userID] = set
		if len(set) == 0 {
			delete(h.streams, st.userID)
			if h.bus != nil {
				h.bus.unsubscribe(st.userID)
			}
		}
		h.open--
		h.metrics.streamsOpen.Dec()
		h.running.Done()
	}
}

// goLive ends st's replay: from now on publish queues its events. It returns the
// highest position publish held back meanwhile, which the stream must still read
// from the log. Under the write lock, no publish is halfway between reading
// st.replaying and raising st.heldTo.
func (h *Hub) goLive(st *stream) int64 {
	h.mu.Lock()
	defer h.mu.Unlock()
	st.replaying.Store(false)
	return st.heldTo.Load()
}

// hasStreams reports whether user has an open stream here.
func (h *Hub) hasStreams(user int64) bool {
	h.mu.RLock()
	defer h.mu.RUnlock()
	return len(h.streams[user]) > 0
}

// publish queues ev on each of user's streams without ever waiting: a stream whose
// queue is full is ended instead, and its client resumes from the log. A stream
// still replaying gets nothing queued; publish only notes how far it must read.
func (h *Hub) publish(user int64, ev *event) {
	h.mu.RLock()
	defer h.mu.RUnlock()
	for _, st := range h.streams[user] {
		if st.replaying.Load() {
			// The replay reads the event from the log; a fleeting one is dropped.
			st.holdBack(max(ev.seq, ev.syncTo))
			continue
		}
		if ev.syncTo > 0 && ev.syncTo <= st.written.Load() {
			continue // nothing to catch up on
		}
		if !st.push(ev, h.buffer) && st.endFor(&st.slow) {
			h.metrics.streamsDroppedSlow.Inc()
		}
	}
}

// closeAll ends every stream and refuses new ones; it runs on shutdown.
func (h *Hub) closeAll() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.closed = true
	for _, set := range h.streams {
		for _, st := range set {
			st.shutdown.Store(true)
			st.end()
		}
	}
}

// shutdownRetry is the retry a stream ended by a shutdown sends last: a random
// 1 to 5 seconds, so that the clients of an instance that stops come back to the
// others spread over a few seconds rather than all at once.
func shutdownRetry() []byte {
	ms := 1000 + mathrand.IntN(4000)
	return []byte("retry: " + strconv.Itoa(ms) + "\n\n")
}

// syncStreams syncs every stream with the event log every interval, and soon
// after resyncSoon (a bus or the listener lost notifications), until ctx is done.
func (h *Hub) syncStreams(ctx context.Context, interval time.Duration) {
	every(ctx, interval, h.resync, func() { h.sync(ctx) })
}

// keepAliveSlots is how many groups the streams' keep-alives are spread over.
const keepAliveSlots = 16

// keepAlives has every live stream write a keep-alive once every interval
// (SSE_KEEPALIVE), until ctx is done. The streams are dealt into keepAliveSlots
// groups as they open, and one group is due every interval/keepAliveSlots: so the
// streams that opened together (an instance's clients after a restart, or a load
// test's) write their keep-alives in small batches spread over the interval, not in
// one burst that holds back the sends due at that moment (docs/performance.md,
// issue 15), and one ticker serves every stream instead of one each. The request
// is a flag beside the queue, so that it takes no place in it.
func (h *Hub) keepAlives(ctx context.Context, interval time.Duration) {
	var slot uint8
	every(ctx, max(interval/keepAliveSlots, time.Millisecond), nil, func() {
		h.mu.RLock()
		for _, set := range h.streams {
			for _, st := range set {
				if st.slot == slot && !st.replaying.Load() {
					st.keepAliveDue.Store(true)
					st.signal()
				}
			}
		}
		h.mu.RUnlock()
		slot = (slot + 1) % keepAliveSlots
	})
}

// resyncSoon has every stream synced with the log: notifications may have been lost.
func (h *Hub) resyncSoon() { wake(h.resync) }

// wake signals ch, a channel with a buffer of one that a loop waits on, without
// waiting: a wake-up already pending stands for this one too.
func wake(ch chan<- struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// every calls fn every interval, and whenever wake fires, until ctx is done.
func every(ctx context.Context, interval time.Duration, wake <-chan struct{}, fn func()) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-wake:
		}
		fn()
	}
}

// dispatch decodes a NOTIFY payload (an array of notifications) and publishes each
// to the local streams of each user it is for, encoding each user's frame once.
func (h *Hub) dispatch(payload string) {
	var notes []notification
	if err := json.Unmarshal([]byte(payload), &notes); err != nil {
		h.logger.Error("decode notification", "err", err)
		return
	}
	for _, n := range notes {
		if n.Origin != "" && n.Origin == h.origin {
			continue // delivered here when it was committed
		}
		h.dispatchOne(n)
	}
}

func (h *Hub) dispatchOne(n notification) {
	for _, to := range n.To {
		user, seq := to[0], to[1]
		if !h.hasStreams(user) {
			continue
		}
		var frame []byte
		switch n.Kind {
		case "message":
			m := Message{ID: n.ID, Content: n.Content, ConversationID: n.ConversationID,
				CreatedAt: time.UnixMicro(n.CreatedAt), Mine: user == n.Sender}
			frame = messageFrame(seq, m)
		case "read", "typing":
			frame = namedFrame(seq, n.Kind, compactJSON(n.Data))
		default:
			h.logger.Error("unknown notification", "kind", n.Kind)
			return
		}
		h.publish(user, &event{seq: seq, frame: frame})
	}
}

// sync tells every local stream how far its user's log reaches, so that any stream
// that missed a notification reads the rest from the log.
func (h *Hub) sync(ctx context.Context) {
	h.mu.RLock()
	users := make([]int64, 0, len(h.streams))
	for u := range h.streams {
		users = append(users, u)
	}
	h.mu.RUnlock()
	const chunk = 1000
	for len(users) > 0 {
		n := min(len(users), chunk)
		if err := h.syncUsers(ctx, users[:n]); err != nil {
			if ctx.Err() == nil {
				h.logger.Warn("sync streams", "err", err)
			}
			return
		}
		users = users[n:]
	}
}

func (h *Hub) syncUsers(ctx context.Context, users []int64) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	rows, err := h.db.QueryContext(ctx, `SELECT id, event_seq FROM users WHERE id = ANY($1)`, pq.Array(users))
	if err != nil {
		return fmt.Errorf("read event sequences: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var user, seq int64
		if err := rows.Scan(&user, &seq); err != nil {
			return fmt.Errorf("scan event sequence: %w", err)
		}
		h.publish(user, &event{syncTo: seq})
	}
	return rows.Err()
}

// messageFrame encodes a message event: the default event type, so that
// EventSource.onmessage receives it.
func messageFrame(seq int64, m Message) []byte {
	return namedFrame(seq, "", m.encode())
}

// namedFrame encodes one SSE frame; seq 0 leaves out the id (fleeting events) and
// an empty kind the event type. data must be one line, as encoded JSON is.
func namedFrame(seq int64, kind string, data []byte) []byte {
	b := make([]byte, 0, len(data)+48)
	if seq > 0 {
		b = append(b, "id: "...)
		b = strconv.AppendInt(b, seq, 10)
		b = append(b, '\n')
	}
	if kind != "" {
		b = append(b, "event: "...)
		b = append(b, kind...)
		b = append(b, '\n')
	}
	b = append(b, "data: "...)
	b = append(b, data...)
	return append(b, "\n\n"...)
}

// readyFrame encodes the first frame of every stream: event "ready", its id the
// position the stream starts from, repeated in the data, where a script can read it
// (an EventSource dispatches nothing for a frame without data, and a plain client
// ignores an event type it does not listen to). Unlike namedFrame, it writes id 0
// too: the position of a user with no events yet.
func readyFrame(last int64) []byte {
	id := strconv.FormatInt(last, 10)
	return []byte("id: " + id + "\nevent: ready\ndata: {\"lastEventId\":\"" + id + "\"}\n\n")
}

// compactJSON drops the spaces PostgreSQL puts in jsonb text, so an event's data
// reads the same whether it came live or from the log.
func compactJSON(b []byte) []byte {
	var buf bytes.Buffer
	if json.Compact(&buf, b) != nil {
		return b
	}
	return buf.Bytes()
}

// logPage is how many events one read of the log returns.
const logPage = 500

// readLog returns the frames of user's events after seq after, up to seq upTo (0: no
// bound), at most logPage of them, in order.
func readLog(ctx context.Context, db *sql.DB, user, after, upTo int64) ([]event, error) {
	if upTo == 0 {
		upTo = 1<<63 - 1
	}
	rows, err := db.QueryContext(ctx, `
		SELECT e.seq, e.kind, e.payload, m.id, m.conversation_id, m.user_id, m.content, m.created_at
		FROM events e LEFT JOIN messages m ON m.id = e.message_id
		WHERE e.user_id = $1 AND e.seq > $2 AND e.seq <= $3
		ORDER BY e.seq LIMIT $4`, user, after, upTo, logPage)
	if err != nil {
		return nil, fmt.Errorf("read event log: %w", err)
	}
	defer rows.Close()
	var evs []event
	for rows.Next() {
		var seq int64
		var kind string
		var payload []byte
		var msgID, conv, sender sql.NullInt64
		var content sql.NullString
		var at sql.NullTime
		if err := rows.Scan(&seq, &kind, &payload, &msgID, &conv, &sender, &content, &at); err != nil {
			return nil, fmt.Errorf("scan event: %w", err)
		}
		var frame []byte
		if kind == "message" {
			frame = messageFrame(seq, Message{ID: msgID.Int64, Content: content.String, ConversationID: conv.Int64,
				CreatedAt: at.Time, Mine: sender.Int64 == user})
		} else {
			frame = namedFrame(seq, kind, compactJSON(payload))
		}
		evs = append(evs, event{seq: seq, frame: frame})
	}
	return evs, rows.Err()
}

// acceptsEventStream reports whether the request's Accept header allows
// text/event-stream.
func acceptsEventStream(r *http.Request) bool {
	for _, part := range strings.Split(r.Header.Get("Accept"), ",") {
		mt, _, err := mime.ParseMediaType(strings.TrimSpace(part))
		if err == nil && (mt == "text/event-stream" || mt == "text/*") {
			return true
		}
	}
	return false
}

// lastEventID returns the id a reconnecting client last received, from the
// Last-Event-ID header or ?last_event_id=; ok is false when there is none.
func lastEventID(r *http.Request) (id int64, ok bool, err error) {
	s := r.Header.Get("Last-Event-ID")
	if s == "" {
		s = r.URL.Query().Get("last_event_id")
	}
	if s == "" {
		return 0, false, nil
	}
	id, err = strconv.ParseInt(strings.TrimSpace(s), 10, 64)
	if err != nil || id < 0 {
		return 0, false, malformed("Last-Event-ID must be an event id")
	}
	return id, true, nil
}

// logBounds returns the head of user's event log (the seq of its last event, 0 when
// it has none) and the oldest event the log still holds, head+1 when it holds none
// (see pruneEvents): a lookup in the primary key (user_id, seq), read here rather
// than kept up to date by the pruner in a column of users, whose rows every send
// locks. In the same round trip it checks that user's session is still open, past
// the session cache. It returns errTokenInvalid when the user no longer exists and
// errSessionEnded when the session has ended.
func logBounds(ctx context.Context, db *sql.DB, user, session int64) (head, oldest int64, err error) {
	var open bool
	err = db.QueryRowContext(ctx, `
		SELECT u.event_seq, coalesce((SELECT min(e.seq) FROM events e WHERE e.user_id = u.id), u.event_seq + 1),
		       EXISTS (SELECT 1 FROM sessions s
		               WHERE s.id = $2 AND s.user_id = u.id AND s.ended_at IS NULL AND s.expires_at > now())
		FROM users u WHERE u.id = $1`, user, session).Scan(&head, &oldest, &open)
	switch {
	case errors.Is(err, sql.ErrNoRows):
		return 0, 0, errTokenInvalid
	case err != nil:
		return 0, 0, fmt.Errorf("read event log bounds: %w", err)
	case !open:
		return 0, 0, errSessionEnded
	}
	return head, oldest, nil
}

// errNotEventStream answers a stream request that does not accept text/event-stream.
var errNotEventStream = &apiError{kind: kindNotAcceptable,
	msg: "this endpoint serves text/event-stream; send Accept: text/event-stream"}

// handleStream serves GET /api/messages: the caller's events as Server-Sent Events,
// live, after replaying whatever came after Last-Event-ID. Until the stream starts,
// it returns its failures like any apiHandler; after that, the stream's end is
// logged (see streamConn.serve).
//
// Over HTTP/1.1 (unless SSE_HIJACK=false) the handler takes the connection over
// (Hijack), hands it to a goroutine of the stream's own and returns: net/http
// would otherwise keep its buffers and a second goroutine alive for the whole life
// of every stream (docs/performance.md, "Streams over HTTP/1.1 and HTTP/2"). That
// response is close-delimited (Connection: close, no chunking), which every
// HTTP/1.1 client and proxy reads. Over HTTP/2 there is no connection to take: the
// stream is served inside the handler, as one HTTP/2 stream of the connection.
func (s *server) handleStream() apiHandler {
	return func(w http.ResponseWriter, r *http.Request) error {
		if !acceptsEventStream(r) {
			return errNotEventStream
		}
		// A body would be buffered (over HTTP/2, up to the connection's window) for
		// the stream's whole life, and nothing reads it.
		if r.ContentLength != 0 {
			return malformed("a stream request carries no body")
		}
		sess := sessionFrom(r.Context())
		resumeFrom, resuming, err := lastEventID(r)
		if err != nil {
			return err
		}
		hijack := r.ProtoMajor == 1 && s.cfg.hijackStreams
		st, err := s.hub.register(sess.userID, sess.sessionID, resuming, !hijack)
		if err != nil {
			return err
		}
		started := false // from then on, serve unregisters st
		defer func() {
			if !started {
				s.hub.unregister(st)
			}
		}()
		s.hub.bus.settle() // before the log's end is read (below)
		// The stream is registered before the log's end is read, so every event
		// after that point is either in the log or in st.queue (or, while the
		// stream replays, below st.heldTo). The session is looked up once more in
		// the same query, past the cache, now that the stream is registered: a
		// sign-out announced between the token check and the registration found no
		// stream of this user here to end.
		head, oldest, err := logBounds(r.Context(), s.db, sess.userID, sess.sessionID)
		if err != nil {
			return err
		}
		last := head
		var reset []byte
		if resuming {
			var why string
			last, why, reset = resumePoint(resumeFrom, head, oldest, s.cfg.replayMax)
			if reset != nil {
				s.metrics.streamResets.WithLabelValues(why).Inc()
			}
		}

		h := w.Header()
		h.Set("Content-Type", "text/event-stream")
		h.Set("Cache-Control", "no-cache")
		h.Set("X-Accel-Buffering", "no")
		// Tell the client where it stands before any replay (so ids never go back),
		// so that a reconnect resumes here even if no event comes first: the id sets
		// the EventSource's last event id, and the data makes it visible to scripts.
		hello := []byte(": connected\nretry: 2000\n\n")
		hello = append(hello, readyFrame(last)...)
		hello = append(hello, reset...)

		sc := &streamConn{srv: s, st: st, expires: sess.expires}
		sc.advance(last)
		if hijack {
			conn, start, err := hijackStream(w, hello)
			if err != nil {
				return fmt.Errorf("stream: %w", err)
			}
			sc.out = streamWriter{to: conn, timeout: s.cfg.writeTimeout, buf: start}
			started = true
			go sc.serve(context.Background(), last < head)
			return nil
		}
		sc.out = streamWriter{to: newHandlerStream(w, r), timeout: s.cfg.writeTimeout, buf: hello}
		w.WriteHeader(http.StatusOK)
		started = true
		sc.serve(r.Context(), last < head)
		return nil
	}
}

// Why a resuming stream gets a reset frame instead of a replay: the reason field of
// the frame's data.
const (
	resetTooFarBehind    = "too_far_behind"   // more than REPLAY_MAX events were missed
	resetExpired         = "expired"          // the log no longer holds the events after the position
	resetUnknownPosition = "unknown_position" // past the end of the log: another database's position, or made up
)

// resumePoint decides where a stream resuming after position from starts, given the
// head of the user's log and the oldest event the log still holds. When the log
// holds every event after from, and at most replayMax of them, the stream replays
// them: resumePoint returns from and no reset. Otherwise the stream replays nothing
// and starts at head, after a reset frame (returned with its reason) that tells the
// client to fetch its state over REST. A position past head is not trusted either:
// it comes from another database (one restored from a backup, say), whose later
// events this one reuses the numbers of, so skipping to head could hide them.
func resumePoint(from, head, oldest int64, replayMax int) (last int64, why string, reset []byte) {
	data := struct {
		Reason string `json:"reason"`
		Missed int64  `json:"missed,omitempty"`
	}{}
	switch {
	case from > head:
		data.Reason = resetUnknownPosition
	case from < oldest-1:
		data.Reason = resetExpired
	case head-from > int64(replayMax):
		data.Reason, data.Missed = resetTooFarBehind, head-from
	default:
		return from, "", nil
	}
	b, _ := json.Marshal(data) // two plain fields always encode
	return head, data.Reason, fmt.Appendf(nil, "id: %d\nevent: reset\ndata: %s\n\n", head, b)
}

// streamConn is one event stream once it has started, over either transport.
type streamConn struct {
	srv     *server
	st      *stream
	out     streamWriter
	last    int64 // sequence number of the last event written
	expires time.Time
	start   time.Time
	expiry  *time.Timer

	// ctx is what reads of the log take when the stream is parked (see park):
	// the stream has no request of its own then.
	ctx context.Context
}

// serve writes the stream until the client leaves, the hub ends it, its token
// expires or a write fails; replay says the log holds events the client missed.
// Reads of the log take ctx: the request's, when the stream is served in its
// handler, so that a departed client's reads stop too.
//
// A stream on a connection taken over (whose transport has no gone channel) is
// parked once it is live: it has no goroutine while it has nothing to write, and
// each signal runs one while there is (see park). An idle stream then costs no
// goroutine stack, which every garbage collection would scan (docs/performance.md,
// issue 15). A stream served in its handler keeps the handler's goroutine anyway,
// and waits on it.
func (sc *streamConn) serve(ctx context.Context, replay bool) {
	st := sc.st
	sc.start = time.Now()
	if err := sc.out.flush(); err != nil {
		sc.finish("write failed")
		return
	}
	if st.replaying.Load() {
		if err := sc.replay(ctx, replay); err != nil {
			sc.finish(err.Error())
			return
		}
	}
	// A timer that runs a function holds no channel: a few hundred bytes less a stream.
	sc.expiry = time.AfterFunc(time.Until(sc.expires), func() { st.endFor(&st.expired) })
	gone := sc.out.to.gone()
	if gone == nil {
		sc.park(ctx)
		return
	}
	for {
		select {
		case <-st.done:
		case <-gone:
			sc.finish("client left")
			return
		case <-st.ready:
		}
		if reason, over := sc.step(ctx); over {
			sc.finish(reason)
			return
		}
	}
}

// park hands the stream over to signal, which runs it (run) in a goroutine of its
// own whenever it has something to do and is not running already; then the
// calling goroutine returns. Until park, signals found no ready to wake (a parked
// stream has none): park runs the stream once itself, so nothing signalled before
// is missed.
func (sc *streamConn) park(ctx context.Context) {
	sc.ctx = ctx
	sc.st.running.Store(true) // before parked: a signal from now on finds it running
	sc.st.parked.Store(sc)
	sc.run()
}

// run takes steps while the stream has something to do, then lets it go idle. The
// running flag makes runs one at a time: a signal that comes while one runs
// starts none, and the run looks again once it has cleared the flag, so that a
// signal in between is not lost.
func (sc *streamConn) run() {
	st := sc.st
	for {
		if reason, over := sc.step(sc.ctx); over {
			sc.finish(reason) // running stays set: nothing runs the stream again
			return
		}
		st.running.Store(false)
		if !st.pending() || !st.running.CompareAndSwap(false, true) {
			return
		}
	}
}

// step does what the stream has to do now: its last words if it was ended, or
// else the queued events, then a keep-alive if one is due, written at once. It
// returns why the stream is over, if it is.
func (sc *streamConn) step(ctx context.Context) (reason string, over bool) {
	st := sc.st
	if st.over() {
		reason = "ended by the server"
		if st.slow.Load() {
			reason = "too slow"
		}
		if st.expired.Load() {
			reason = "token expired"
			sc.out.write([]byte(": token expired\n\n"))
		}
		if why := st.sessionEnded.Load(); why != nil {
			reason = "session ended: " + *why
			sc.out.write(sessionEndedFrame(*why))
		}
		if st.shutdown.Load() {
			reason = "server shutting down"
			sc.out.write(shutdownRetry())
		}
		sc.out.flush()
		return reason, true
	}
	// Take everything queued, then write once. The slice goes back to the queue
	// emptied (the frames may go), unless a burst made it large.
	evs := st.take()
	for _, ev := range evs {
		if err := sc.handle(ctx, ev); err != nil {
			return err.Error(), true
		}
	}
	clear(evs)
	if cap(evs) <= 8 {
		st.giveBack(evs)
	}
	if st.keepAliveDue.Swap(false) {
		if sc.out.to.left() {
			return "client left", true
		}
		sc.out.write([]byte(": keep-alive\n\n"))
	}
	if err := sc.out.flush(); err != nil {
		return "write failed", true
	}
	return "", false
}

// finish releases what the stream held, once it is over.
func (sc *streamConn) finish(reason string) {
	if sc.expiry != nil {
		sc.expiry.Stop()
	}
	sc.out.to.close()
	sc.srv.hub.unregister(sc.st)
	sc.srv.logger.Info("stream closed", "user", sc.st.userID, "last", sc.last, "reason", reason,
		"duration", time.Since(sc.start).Round(time.Millisecond))
}

// replay writes from the log what a resuming client missed (if missed), while the
// hub holds the user's live events aside instead of queueing them (see stream), so
// that the queue cannot fill up and get the stream dropped as slow however long the
// replay takes, and no live event overtakes a replayed one. Then it goes live and
// reads from the log whatever the hub held back meanwhile; events queued after
// that which the log already gave are skipped by handle. Every event is written
// once, in order.
func (sc *streamConn) replay(ctx context.Context, missed bool) error {
	if missed {
		if err := sc.catchUp(ctx, 0); err != nil {
			return err
		}
	}
	if held := sc.srv.hub.goLive(sc.st); held > sc.last {
		return sc.catchUp(ctx, held)
	}
	return nil
}

// handle writes one queued event, in sequence: it skips what was written already
// and reads any gap before it from the log.
func (sc *streamConn) handle(ctx context.Context, ev *event) error {
	switch {
	case ev.syncTo > 0:
		if ev.syncTo > sc.last {
			return sc.catchUp(ctx, ev.syncTo)
		}
	case ev.seq == 0:
		sc.out.write(ev.frame)
	case ev.seq <= sc.last:
		// Already written, from the log or an earlier notification.
	default:
		if ev.seq > sc.last+1 {
			if err := sc.catchUp(ctx, ev.seq-1); err != nil {
				return err
			}
		}
		sc.out.write(ev.frame)
		sc.advance(ev.seq)
		sc.srv.metrics.eventsDelivered.Inc()
	}
	return nil
}

// advance records that the events up to seq were written.
func (sc *streamConn) advance(seq int64) {
	sc.last = seq
	sc.st.written.Store(seq)
}

// catchUp writes the user's events from the log after the last one written, up to
// upTo (0: to the end).
func (sc *streamConn) catchUp(ctx context.Context, upTo int64) error {
	ctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	for upTo == 0 || sc.last < upTo {
		evs, err := readLog(ctx, sc.srv.db, sc.st.userID, sc.last, upTo)
		if err != nil {
			return err
		}
		for _, ev := range evs {
			sc.out.write(ev.frame)
			sc.advance(ev.seq)
		}
		sc.srv.metrics.eventsDelivered.Add(float64(len(evs)))
		if err := sc.out.flush(); err != nil {
			return err
		}
		if len(evs) < logPage {
			break
		}
	}
	return nil
}

// streamWriter buffers frames and sends them to the client on flush, each write
// with its own deadline, so that a client that stops reading is cut off without a
// server-wide WriteTimeout. The first error sticks.
type streamWriter struct {
	to      streamTransport
	timeout time.Duration
	buf     []byte
	err     error
}

func (sw *streamWriter) write(b []byte) {
	if sw.err == nil {
		sw.buf = append(sw.buf, b...)
	}
}

func (sw *streamWriter) flush() error {
	if sw.err != nil || len(sw.buf) == 0 {
		return sw.err
	}
	sw.err = sw.to.send(sw.buf, sw.timeout)
	// An idle stream keeps no buffer.
	sw.buf = nil
	return sw.err
}

// streamTransport is where a stream's bytes go, and how it learns that its client
// left: a hijacked HTTP/1.1 connection (hijackedStream) or the handler's own
// response, over HTTP/2 or HTTP/1.1 (handlerStream). serve, replay, catch-up, reset,
// session_ended and the slow-client cut are written once, above it.
type streamTransport interface {
	// send writes b to the client within timeout.
	send(b []byte, timeout time.Duration) error
	// gone is closed when the client is known to have left; nil when that is only
	// noticed by polling left or by a failed send.
	gone() <-chan struct{}
	// left reports whether the client has left; serve asks at each keep-alive.
	left() bool
	// close releases the transport once the stream has ended.
	close()
}

// hijackedStream is an HTTP/1.1 connection taken over from net/http.
type hijackedStream struct{ conn net.Conn }

// hijackStream takes w's connection over. It returns the stream's first bytes, the
// response's status line and headers (close-delimited: Connection: close, no
// chunking) and then hello, to be sent with the first flush; or the error of
// Hijack, before anything is written.
func hijackStream(w http.ResponseWriter, hello []byte) (*hijackedStream, []byte, error) {
	h := w.Header()
	h.Set("Connection", "close")
	var b bytes.Buffer
	b.WriteString("HTTP/1.1 200 OK\r\n")
	h.Write(&b)
	b.WriteString("\r\n")
	b.Write(hello)
	conn, _, err := http.NewResponseController(w).Hijack()
	if err != nil {
		return nil, nil, fmt.Errorf("hijack: %w", err)
	}
	return &hijackedStream{conn: conn}, b.Bytes(), nil
}

func (hs *hijackedStream) send(b []byte, timeout time.Duration) error {
	hs.conn.SetWriteDeadline(time.Now().Add(timeout))
	_, err := hs.conn.Write(b)
	return err
}

// gone is nil: nothing reads the connection (see left).
func (hs *hijackedStream) gone() <-chan struct{} { return nil }

// left reports whether the client has closed its side of the connection. The
// client sends nothing after its request, so a read that does not wait either
// finds the end of the stream or nothing. Checking at each keep-alive, instead of
// parking a goroutine in Read for the stream's whole life, saves 2 KB of stack per
// idle stream; a departed client is noticed within SSE_KEEPALIVE (or at once, by
// the next event's failed write). On a socket the check is one non-blocking read
// system call; on a TLS connection, a read with a deadline already due.
func (hs *hijackedStream) left() bool {
	if sc, ok := hs.conn.(syscall.Conn); ok {
		if raw, err := sc.SyscallConn(); err == nil {
			return socketClosed(raw)
		}
	}
	// A deadline already past would fail the read before it looks at the socket.
	hs.conn.SetReadDeadline(time.Now().Add(time.Millisecond))
	var b [64]byte
	for {
		_, err := hs.conn.Read(b[:])
		if err == nil {
			continue // stray bytes: ignore them
		}
		var ne net.Error
		return !(errors.As(err, &ne) && ne.Timeout())
	}
}

// socketClosed reports whether the peer of raw, a socket, has closed it: reading it
// without waiting finds the end of the stream or an error. Stray bytes are read
// and ignored, a bounded number of times.
func socketClosed(raw syscall.RawConn) bool {
	closed := false
	var b [64]byte
	err := raw.Read(func(fd uintptr) bool {
		for range 16 {
			n, err := syscall.Read(int(fd), b[:])
			switch {
			case err == syscall.EINTR || n > 0:
				continue
			case err == syscall.EAGAIN:
			default: // n == 0: the end of the stream; or an error
				closed = true
			}
			break
		}
		return true // never wait for the socket to become readable
	})
	return closed || err != nil
}

func (hs *hijackedStream) close() { hs.conn.Close() }

// handlerStream is a response served inside its handler: over HTTP/2, one stream of
// the connection (no connection to take over, and none needed: the connection's
// buffers are shared by all its streams); over HTTP/1.1 with SSE_HIJACK=false, a
// chunked response. net/http notices a departed client itself and cancels the
// request's context.
type handlerStream struct {
	w   http.ResponseWriter
	rc  *http.ResponseController
	ctx context.Context // the request's: done when the client has left
}

func newHandlerStream(w http.ResponseWriter, r *http.Request) *handlerStream {
	rc := http.NewResponseController(w)
	// The request has no body (handleStream refuses one); over HTTP/1.1 the
	// server's ReadTimeout would otherwise end the connection's background read,
	// and the stream with it. Over HTTP/2 the deadline stays.
	if r.ProtoMajor == 1 {
		rc.SetReadDeadline(time.Time{})
	}
	return &handlerStream{w: w, rc: rc, ctx: r.Context()}
}

func (hs *handlerStream) send(b []byte, timeout time.Duration) error {
	if err := hs.rc.SetWriteDeadline(time.Now().Add(timeout)); err != nil {
		return fmt.Errorf("set write deadline: %w", err)
	}
	if _, err := hs.w.Write(b); err != nil {
		return err
	}
	return hs.rc.Flush()
}

func (hs *handlerStream) gone() <-chan struct{} { return hs.ctx.Done() }

func (hs *handlerStream) left() bool { return hs.ctx.Err() != nil }

// close does nothing: the response ends when the handler returns.
func (hs *handlerStream) close() {}
