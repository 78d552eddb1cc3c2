package main

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/lib/pq"
)

// Message is one message of a conversation; Mine is from the reader's point of view.
type Message struct {
	ID             int64     `json:"id,string"`
	Content        string    `json:"content"`
	ConversationID int64     `json:"conversationId,string"`
	CreatedAt      time.Time `json:"-"`
	Mine           bool      `json:"mine"`
}

// timeLayout is how the API writes times: RFC 3339 in UTC with milliseconds.
const timeLayout = "2006-01-02T15:04:05.000Z07:00"

// MarshalJSON writes m in the API's shape (see appendMessageJSON).
func (m Message) MarshalJSON() ([]byte, error) {
	return m.encode(), nil
}

// encode returns m in the API's shape, in a buffer sized for it.
func (m Message) encode() []byte {
	return appendMessageJSON(make([]byte, 0, 128+len(m.Content)), m)
}

// appendMessageJSON appends m in the API's shape: ids as strings, createdAt in UTC
// with milliseconds. It writes byte for byte what encoding/json writes for that
// shape as a struct (FuzzMessageJSON holds it to this), without reflection: a send
// encodes its message twice, for the 201 and for the streams' frame, and
// json.Marshal took 16 to 18 µs of CPU for each at 500 msg/s.
func appendMessageJSON(b []byte, m Message) []byte {
	b = append(b, `{"id":"`...)
	b = strconv.AppendInt(b, m.ID, 10)
	b = append(b, `","content":`...)
	b = appendJSONString(b, m.Content)
	b = append(b, `,"conversationId":"`...)
	b = strconv.AppendInt(b, m.ConversationID, 10)
	b = append(b, `","createdAt":"`...)
	b = m.CreatedAt.UTC().AppendFormat(b, timeLayout)
	b = append(b, `","mine":`...)
	b = strconv.AppendBool(b, m.Mine)
	return append(b, '}')
}

// appendJSONString appends s as a JSON string, escaped as encoding/json escapes
// it: quote, backslash and control characters; <, > and & (for HTML); U+2028
// and U+2029 (for JavaScript); and each byte of invalid UTF-8 as U+FFFD.
func appendJSONString(b []byte, s string) []byte {
	const hex = "0123456789abcdef"
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' && c != '<' && c != '>' && c != '&' {
				i++
				continue
			}
			b = append(b, s[start:i]...)
			switch c {
			case '"', '\\':
				b = append(b, '\\', c)
			case '\b':
				b = append(b, '\\', 'b')
			case '\f':
				b = append(b, '\\', 'f')
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			default:
				b = append(b, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && size == 1:
			b = append(b, s[start:i]...)
			b = append(b, `\ufffd`...)
		case r == '\u2028' || r == '\u2029':
			b = append(b, s[start:i]...)
			b = append(b, '\\', 'u', '2', '0', '2', hex[r&0xf])
		default:
			i += size
			continue
		}
		i += size
		start = i
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}

const (
	maxContentRunes   = 480
	messagesPageSize  = 25
	maxIdempotencyKey = 255
)

// normalizeContent trims content, ends lines at LF, CR or CRLF, collapses each run of
// white space within a line into one space, and drops blank lines. White space is
// Unicode's White_Space (Go's unicode.IsSpace: tab, VT, FF, space, NEL, NBSP, the
// Zs spaces, U+2028, U+2029) plus U+FEFF (the byte order mark, which JavaScript
// also counts as white space). It returns a 422 apiError for invalid UTF-8, for
// other control characters, for nothing left, and for more than 480 runes. It
// reads its input once, in time linear in its length. The web client
// (web/normalize.js) follows the same rule, checked against one table of cases
// (testdata/normalize_cases.json), to match a send whose answer was lost with its
// copy from the stream.
func normalizeContent(content string) (string, error) {
	if !utf8.ValidString(content) {
		return "", invalid("content", "Content must be valid UTF-8")
	}
	var b strings.Builder
	b.Grow(len(content))
	// A newline or a space is written only before the next character that is
	// neither, so a blank line or trailing white space never reaches b. CR, LF
	// and CRLF each end a line; since blank lines are dropped, CRLF needs no case
	// of its own.
	newline, space := false, false
	for _, c := range content {
		switch {
		case c == '\n' || c == '\r':
			newline, space = b.Len() > 0, false
		case isContentSpace(c):
			space = b.Len() > 0
		case unicode.IsControl(c):
			return "", invalid("content", "Content must not contain control characters")
		default:
			if newline {
				b.WriteByte('\n')
			} else if space {
				b.WriteByte(' ')
			}
			newline, space = false, false
			b.WriteRune(c)
		}
	}
	out := b.String()
	if out == "" {
		return "", invalid("content", "Content required")
	}
	if utf8.RuneCountInString(out) > maxContentRunes {
		return "", invalid("content", fmt.Sprintf("Message too long. %d max", maxContentRunes))
	}
	return out, nil
}

// isContentSpace reports whether c is white space within a line of a message.
func isContentSpace(c rune) bool {
	return unicode.IsSpace(c) || c == '\uFEFF'
}

// validIdempotencyKey reports whether key is 1 to 255 printable ASCII characters.
func validIdempotencyKey(key string) bool {
	if len(key) == 0 || len(key) > maxIdempotencyKey {
		return false
	}
	for i := 0; i < len(key); i++ {
		if key[i] < 0x20 || key[i] > 0x7e {
			return false
		}
	}
	return true
}

// sendOutcome is what send_messages reports for one message.
type sendOutcome string

const (
	sendCreated     sendOutcome = "created"
	sendReplayed    sendOutcome = "replayed"
	sendKeyConflict sendOutcome = "key_conflict"
	sendNotFound    sendOutcome = "not_found"
)

// sendRequest is one message waiting for its batch.
type sendRequest struct {
	conversation, sender int64
	content, key         string
	deadline             time.Time        // the request's: past it, nobody waits for the answer
	done                 chan batchResult // buffered: the batch never waits on the handler
}

type batchResult struct {
	msg     Message
	outcome sendOutcome
	err     error
}

// sendBatcher gathers concurrent sends into one transaction each (the schema's
// send_messages): group commit, so that many sends share one commit and one round
// trip. A send that finds the batcher idle goes alone, at once; under load, the
// next batch takes whatever queued while the last one ran, up to maxSendBatch.
// Every 201 still means the message is durably committed: results are handed out
// only after the transaction's commit was acknowledged.
//
// One batch runs at a time: the worker that holds the turn, the right to gather a
// batch, keeps it from one batch to the next, so that each batch is as big as the
// load makes it: on a 2-core machine, one batch at a time cost
// PostgreSQL 0.14 ms of CPU a message at saturation against 0.18 to 0.19 with two
// workers side by side, each with its own conversations (docs/performance.md).
// Concurrent batches also wait for each other inside PostgreSQL whenever they
// share a user, since send_messages locks the users rows of its batch.
//
// A batch that has not committed within sendSpillAfter and is waiting for a lock
// that another transaction holds (a user being deleted, a read receipt), as
// pg_stat_activity tells, holds up only its own users' sends: its worker passes the
// turn on, and the next worker gathers the sends queued meanwhile. A batch that is
// slow for another reason (a slow commit) keeps the turn, and is looked at again
// every sendSpillAfter. Behind a pooler, where the backend is not known, a batch
// passes the turn on after sendSpillAfter whatever it waits for. Order needs no
// care here: the users rows are locked in id order and each event's sequence
// number is taken under the lock, so two batches that share a user commit one
// after the other whichever runs first. With all sendWorkers stuck, sends queue
// until their request times out. A batch of more than one message that a lock
// holds up for sendLockTimeout is split: see execute.
//
// Each worker runs its batches on a connection of its own (a *sql.Conn), opened
// when it gets the turn and given back when it passes it on: normally one
// connection does all the sends. A statement run through the pool is re-run on
// another connection when the driver reports a broken one, even if the first run
// had committed, which would store the batch twice; on a dedicated connection a
// broken connection is an error, answered as 503, and the worker takes a fresh
// one.
//
// Straight to PostgreSQL, the worker prepares the statement once per connection:
// PostgreSQL then neither parses nor plans the call each time, which saved it 0.06
// to 0.08 ms of CPU per lone send (pgbench -M prepared against -M extended at 500
// sends a second). Behind a pooler in transaction mode, which DATABASE_LISTEN_URL
// set apart from DATABASE_URL says, a named statement would not survive, and the
// query goes unprepared (with binary_parameters, see poolerSafeDSN, that is one
// round trip too).
type sendBatcher struct {
	db      *sql.DB
	deliver func(notification) // hands a committed message's events on (notifier.enqueue)
	queue   chan *sendRequest
	turn    chan struct{} // holds the turn while no worker has it
	prepare bool          // prepare the statement on each worker's connection
	maxAge  time.Duration // a worker's connection is replaced once this old (DB_CONN_MAX_LIFETIME)
	metrics *metrics      // nil: none
	logger  *slog.Logger
}

// sendQuery is the whole send transaction; sendQueryTimed is the same with a lock
// timeout ($5), for batches of more than one message (see execute).
const (
	sendQuery = `
	SELECT idx, outcome, message_id, created_at, content, other_id, sender_seq, other_seq
	FROM send_messages($1, $2, $3, $4)`
	sendQueryTimed = `
	SELECT idx, outcome, message_id, created_at, content, other_id, sender_seq, other_seq
	FROM send_messages($1, $2, $3, $4, $5)`
)

const (
	maxSendBatch   = 64
	sendWorkers    = 4                     // batches at most in flight, each on its own connection
	sendSpillAfter = 20 * time.Millisecond // a batch this old that waits for a lock passes the turn on
	// sendLockTimeout is how long a batch of more than one message waits for a
	// lock before it is refused and split (execute): well above a commit's
	// latency, so that the server's own batches, which share users once the turn
	// has been passed on, wait for each other's commits rather than split each
	// other when commits are slow.
	sendLockTimeout = "200ms"
)

func newSendBatcher(db *sql.DB, deliver func(notification), prepare bool, maxAge time.Duration, m *metrics, logger *slog.Logger) *sendBatcher {
	b := &sendBatcher{db: db, deliver: deliver, prepare: prepare, maxAge: maxAge, metrics: m, logger: logger,
		queue: make(chan *sendRequest, maxSendBatch), turn: make(chan struct{}, 1)}
	b.turn <- struct{}{}
	return b
}

// sendConn is a send worker's own connection, and the statements prepared on it.
// A *sql.Conn is out of the pool, where DB_CONN_MAX_LIFETIME would not reach it,
// so the worker replaces it itself (see renew).
type sendConn struct {
	conn      *sql.Conn
	pid       int       // conn's backend, straight to PostgreSQL; 0: behind a pooler, or none yet
	stmt      *sql.Stmt // sendQuery; nil: not prepared
	stmtTimed *sql.Stmt // sendQueryTimed; nil: not prepared
	renewAt   time.Time // when to replace conn with a fresh one
}

// renewRetry is how long a worker keeps its connection after a failed renewal
// before it tries again.
const renewRetry = 10 * time.Second

func (sc *sendConn) close() {
	for _, st := range []**sql.Stmt{&sc.stmt, &sc.stmtTimed} {
		if *st != nil {
			(*st).Close()
			*st = nil
		}
	}
	sc.pid = 0
	if sc.conn != nil {
		sc.conn.Close()
		sc.conn = nil
	}
}

// run works off the queue until ctx is done. The server cancels ctx only after
// the HTTP server has shut down, so no handler is left waiting.
func (b *sendBatcher) run(ctx context.Context) {
	var wg sync.WaitGroup
	for range sendWorkers {
		wg.Go(func() {
			var sc sendConn
			defer sc.close()
			turn := false
			for {
				batch := b.gather(ctx, turn)
				if batch == nil {
					return
				}
				if sc.conn == nil {
					// Connect here rather than in store, so that the spill below
					// knows the backend. On failure store tries again, and the
					// error goes to the batch's requests (each handler logs it).
					cctx, cancel := context.WithTimeout(ctx, requestTimeout)
					_ = b.connect(cctx, &sc)
					cancel()
				}
				var passed atomic.Bool
				pid := sc.pid
				spill := time.AfterFunc(sendSpillAfter, func() {
					// Until the batch ends, while it waits for anything but a
					// lock (a slow commit, say), it keeps the turn.
					for !passed.Load() {
						if pid == 0 || b.waitsForLock(pid) {
							if passed.CompareAndSwap(false, true) {
								b.turn <- struct{}{}
							}
							return
						}
						time.Sleep(sendSpillAfter)
					}
				})
				b.execute(&sc, batch)
				spill.Stop()
				// Unless the batch passed the turn on, the worker keeps it, and
				// with it its connection in use. A worker that passed it gives
				// its connection back: the others hold one only while a batch of
				// theirs runs.
				if turn = passed.CompareAndSwap(false, true); turn {
					b.renew(&sc)
				} else {
					sc.close()
				}
			}
		})
	}
	wg.Wait()
}

// gather waits for the turn unless the worker has it, then for a first send, and
// returns it with whatever else is queued; nil once ctx is done.
func (b *sendBatcher) gather(ctx context.Context, turn bool) []*sendRequest {
	if !turn {
		select {
		case <-ctx.Done():
			return nil
		case <-b.turn:
		}
	}
	var batch []*sendRequest
	select {
	case <-ctx.Done():
		return nil
	case r := <-b.queue:
		batch = append(batch, r)
	}
	for len(batch) < maxSendBatch {
		select {
		case r := <-b.queue:
			batch = append(batch, r)
		default:
			return batch
		}
	}
	return batch
}

// send stores one message from sender in conversation (key may be empty) and
// returns it with the outcome. An error after the send was queued is ambiguous:
// the message may have been stored (a client that retries should send an
// Idempotency-Key).
func (b *sendBatcher) send(ctx context.Context, conversation, sender int64, content, key string) (Message, sendOutcome, error) {
	r := &sendRequest{conversation: conversation, sender: sender, content: content, key: key, done: make(chan batchResult, 1)}
	var ok bool
	if r.deadline, ok = ctx.Deadline(); !ok {
		r.deadline = time.Now().Add(requestTimeout)
	}
	select {
	case b.queue <- r:
	case <-ctx.Done():
		return Message{}, "", fmt.Errorf("queue send: %w", ctx.Err())
	}
	select {
	case res := <-r.done:
		return res.msg, res.outcome, res.err
	case <-ctx.Done():
		return Message{}, "", fmt.Errorf("wait for send: %w", ctx.Err())
	}
}

// errNoConnection marks a failure to get a database connection: whatever
// PostgreSQL answered (it may be refusing connections to the database, or it may
// not know it any more), the database cannot be reached, and the send is answered
// 503 (isUnavailable), for the client to retry.
var errNoConnection = errors.New("no database connection")

// connect gives sc a connection of its own from the pool, with the send statement
// prepared on it when b.prepare.
func (b *sendBatcher) connect(ctx context.Context, sc *sendConn) (err error) {
	if sc.conn, err = b.db.Conn(ctx); err != nil {
		return fmt.Errorf("send connection: %w: %w", errNoConnection, err)
	}
	if b.prepare {
		err = sc.conn.QueryRowContext(ctx, `SELECT pg_backend_pid()`).Scan(&sc.pid)
		if err == nil {
			sc.stmt, err = sc.conn.PrepareContext(ctx, sendQuery)
		}
		if err == nil {
			sc.stmtTimed, err = sc.conn.PrepareContext(ctx, sendQueryTimed)
		}
		if err != nil {
			sc.close()
			return fmt.Errorf("prepare send: %w", err)
		}
	}
	sc.renewAt = time.Now().Add(b.maxAge)
	return nil
}

// renew replaces the worker's connection once it has served DB_CONN_MAX_LIFETIME:
// a PostgreSQL session keeps the plans it made (the prepared statement's, and
// PL/pgSQL's inside send_messages) until a table's statistics change, and plans
// made on a new, empty database are scans. It runs between batches, after their
// answers, and opens the fresh connection before it lets the old one go: a
// database that cannot be reached, or a pool with nothing free within a second,
// leaves the old one in use for renewRetry more. The old connection goes back
// to the pool, which closes it, as it is older than the pool's own lifetime.
// (db.Conn may hand out a connection the pool opened earlier, so a worker's
// connection lives at most about twice DB_CONN_MAX_LIFETIME.)
func (b *sendBatcher) renew(sc *sendConn) {
	if sc.conn == nil || time.Now().Before(sc.renewAt) {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	var fresh sendConn
	if err := b.connect(ctx, &fresh); err != nil {
		b.logger.Warn("send worker keeps its connection: a fresh one failed", "retry", renewRetry, "err", err)
		sc.renewAt = time.Now().Add(renewRetry)
		return
	}
	sc.close()
	*sc = fresh
}

// execute runs one batch and answers each of its requests. A batch of more than
// one message runs with a lock timeout. If PostgreSQL refused it (so its
// transaction rolled back) for a reason other than being unavailable, each message
// is retried alone, so that one bad message cannot fail the others, nor one whose
// users another transaction holds hold up the others: first each with the lock
// timeout, then those that it refused, each waiting until its request's deadline.
// A request past its deadline is answered with an error and not stored: its
// handler has answered 503 already. Any other error leaves the outcome unknown and
// is returned as it is.
func (b *sendBatcher) execute(sc *sendConn, batch []*sendRequest) {
	results, err := b.store(sc, batch, len(batch) > 1, time.Now().Add(requestTimeout))
	var pqErr *pq.Error
	if err == nil || len(batch) == 1 || !errors.As(err, &pqErr) || isUnavailable(err) {
		answer(batch, results, err)
		return
	}
	var held []*sendRequest
	for _, r := range batch {
		results, err := b.storeAlone(sc, r, true)
		if errors.As(err, &pqErr) && pqErr.Code == "55P03" { // lock_not_available
			held = append(held, r)
			continue
		}
		answer([]*sendRequest{r}, results, err)
	}
	for _, r := range held {
		results, err := b.storeAlone(sc, r, false)
		answer([]*sendRequest{r}, results, err)
	}
}

// waitsForLock reports whether backend pid, running a batch, is waiting for a
// lock. If that cannot be told, it answers false: the check takes a connection from
// the pool, and a pool that cannot give one (the database refusing connections, or
// every connection busy) could not give the next worker one either.
func (b *sendBatcher) waitsForLock(pid int) bool {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	var lock bool
	err := b.db.QueryRowContext(ctx, `
		SELECT coalesce(wait_event_type = 'Lock', false) FROM pg_stat_activity WHERE pid = $1`, pid).Scan(&lock)
	return err == nil && lock
}

// storeAlone stores r's message alone, by r's deadline.
func (b *sendBatcher) storeAlone(sc *sendConn, r *sendRequest, timed bool) ([]batchResult, error) {
	if !time.Now().Before(r.deadline) {
		return nil, fmt.Errorf("send alone: %w", context.DeadlineExceeded)
	}
	return b.store(sc, []*sendRequest{r}, timed, r.deadline)
}

// answer hands each request of batch its result, or err.
func answer(batch []*sendRequest, results []batchResult, err error) {
	for i, r := range batch {
		if err != nil {
			r.done <- batchResult{err: err}
		} else {
			r.done <- results[i]
		}
	}
}

// store runs send_messages for batch on the worker's connection, with the lock
// timeout if timed and by deadline, and, once it has committed, hands on the
// notifications of the messages it created.
func (b *sendBatcher) store(sc *sendConn, batch []*sendRequest, timed bool, deadline time.Time) (results []batchResult, err error) {
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	defer cancel()
	defer func() {
		var pqErr *pq.Error
		switch {
		case err == nil:
		case !errors.As(err, &pqErr):
			sc.close() // the connection's state is unknown: take a fresh one next time
		case sc.stmt != nil && (pqErr.Code == "26000" || pqErr.Code == "0A000"):
			// The prepared statement is gone, or its plan no longer fits (the
			// function changed under it): prepare again on a fresh connection.
			sc.close()
		}
	}()
	if sc.conn == nil {
		if err := b.connect(ctx, sc); err != nil {
			return nil, err
		}
	}
	n := len(batch)
	convs, senders := make([]int64, n), make([]int64, n)
	contents, keys := make([]string, n), make([]string, n)
	for i, r := range batch {
		convs[i], senders[i], contents[i], keys[i] = r.conversation, r.sender, r.content, r.key
	}
	args := []any{pq.Array(convs), pq.Array(senders), pq.Array(contents), pq.Array(keys)}
	query, stmt := sendQuery, sc.stmt
	if timed {
		query, stmt = sendQueryTimed, sc.stmtTimed
		args = append(args, sendLockTimeout)
	}
	if b.metrics != nil {
		// Every call, whatever its outcome: each holds the send path for its time.
		defer func(start time.Time) {
			b.metrics.sendBatchDuration.Observe(time.Since(start).Seconds())
			b.metrics.sendBatchMessages.Observe(float64(n))
		}(time.Now())
	}
	var rows *sql.Rows
	if stmt != nil {
		rows, err = stmt.QueryContext(ctx, args...)
	} else {
		rows, err = sc.conn.QueryContext(ctx, query, args...)
	}
	if err != nil {
		return nil, fmt.Errorf("send messages: %w", err)
	}
	defer rows.Close()
	results = make([]batchResult, n)
	var notes []notification
	for rows.Next() {
		var idx int
		var outcome string
		var id, other, senderSeq, otherSeq sql.NullInt64
		var at sql.NullTime
		var content sql.NullString
		if err := rows.Scan(&idx, &outcome, &id, &at, &content, &other, &senderSeq, &otherSeq); err != nil {
			return nil, fmt.Errorf("scan sent message: %w", err)
		}
		if idx < 1 || idx > n {
			return nil, fmt.Errorf("send messages: result for message %d of %d", idx, n)
		}
		r := batch[idx-1]
		m := Message{ID: id.Int64, Content: content.String, ConversationID: r.conversation, CreatedAt: at.Time, Mine: true}
		results[idx-1] = batchResult{msg: m, outcome: sendOutcome(outcome)}
		if outcome == string(sendCreated) {
			notes = append(notes, notification{
				Kind: "message", To: [][2]int64{{r.sender, senderSeq.Int64}, {other.Int64, otherSeq.Int64}},
				Sender: r.sender, ID: m.ID, ConversationID: m.ConversationID, Content: m.Content,
				CreatedAt: m.CreatedAt.UnixMicro(),
			})
		}
	}
	// Only now, with every row read and no error, has the commit been acknowledged.
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("send messages: %w", err)
	}
	for i, res := range results {
		if res.outcome == "" {
			return nil, fmt.Errorf("send messages: no result for message %d", i+1)
		}
	}
	for _, note := range notes {
		b.deliver(note)
	}
	return results, nil
}

// handleCreateMessage serves POST /api/conversations/:id/messages. A retry with the
// Idempotency-Key of an earlier send returns that message with 200. The rate limit
// comes first, before the body is read: every send attempt takes a token, whatever
// it is answered, so that a flood of sends, valid or not, costs the server least.
func (s *server) handleCreateMessage() apiHandler {
	type request struct {
		Content string `json:"content"`
	}
	return func(w http.ResponseWriter, r *http.Request) error {
		me := sessionFrom(r.Context()).userID
		if err := s.limits.sends.allow(me); err != nil {
			return err
		}
		id, err := pathID(r)
		if err != nil {
			return err
		}
		var req request
		if err := decodeJSON(w, r, &req); err != nil {
			return err
		}
		content, err := normalizeContent(req.Content)
		if err != nil {
			return err
		}
		key := r.Header.Get("Idempotency-Key")
		if _, present := r.Header["Idempotency-Key"]; present && !validIdempotencyKey(key) {
			return invalid("Idempotency-Key", "Idempotency-Key must be 1 to 255 printable ASCII characters")
		}
		m, outcome, err := s.sends.send(r.Context(), id, me, content, key)
		switch {
		case err != nil:
			return err
		case outcome == sendNotFound:
			return errNotFound
		case outcome == sendKeyConflict:
			return invalid("Idempotency-Key", "Idempotency-Key was already used for a different message")
		case outcome == sendReplayed:
			respond(w, http.StatusOK, m)
		default:
			respond(w, http.StatusCreated, m)
		}
		return nil
	}
}

// handleListMessages serves GET /api/conversations/:id/messages?before=: newest
// first, a page at a time; before is the id of the oldest message already shown.
// Listing does not mark anything read.
func (s *server) handleListMessages() apiHandler {
	return func(w http.ResponseWriter, r *http.Request) error {
		id, err := pathID(r)
		if err != nil {
			return err
		}
		before, err := parseCursor(r)
		if err != nil {
			return err
		}
		list, err := listMessages(r.Context(), s.db, sessionFrom(r.Context()).userID, id, before)
		if err != nil {
			return err
		}
		respond(w, http.StatusOK, list)
		return nil
	}
}

// listMessages returns a page of conversation's messages as me sees them, newest
// first, older than before (0: the newest). It returns errNotFound unless me is in
// the conversation.
func listMessages(ctx context.Context, db *sql.DB, me, conversation, before int64) ([]Message, error) {
	if err := checkParticipant(ctx, db, me, conversation); err != nil {
		return nil, err
	}
	query := `SELECT id, content, user_id, created_at FROM messages WHERE conversation_id = $1`
	args := []any{conversation, messagesPageSize}
	if before > 0 {
		query += ` AND id < $3`
		args = append(args, before)
	}
	rows, err := db.QueryContext(ctx, query+` ORDER BY id DESC LIMIT $2`, args...)
	if err != nil {
		return nil, fmt.Errorf("list messages: %w", err)
	}
	defer rows.Close()
	list := []Message{}
	for rows.Next() {
		m := Message{ConversationID: conversation}
		var sender int64
		if err := rows.Scan(&m.ID, &m.Content, &sender, &m.CreatedAt); err != nil {
			return nil, fmt.Errorf("scan message: %w", err)
		}
		m.Mine = sender == me
		list = append(list, m)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list messages: %w", err)
	}
	return list, nil
}

// checkParticipant returns errNotFound unless user is in conversation.
func checkParticipant(ctx context.Context, db *sql.DB, user, conversation int64) error {
	var one int
	err := db.QueryRowContext(ctx, `SELECT 1 FROM participants WHERE user_id = $1 AND conversation_id = $2`,
		user, conversation).Scan(&one)
	if errors.Is(err, sql.ErrNoRows) {
		return errNotFound
	}
	if err != nil {
		return fmt.Errorf("check participant: %w", err)
	}
	return nil
}

// handleReadMessages serves POST /api/conversations/:id/read_messages: everything up
// to now is read, and the other participant's streams get a read event.
func (s *server) handleReadMessages() apiHandler {
	return func(w http.ResponseWriter, r *http.Request) error {
		id, err := pathID(r)
		if err != nil {
			return err
		}
		note, err := readMessages(r.Context(), s.db, sessionFrom(r.Context()).userID, id)
		if err != nil {
			return err
		}
		if note != nil {
			s.notifier.enqueue(*note)
		}
		w.WriteHeader(http.StatusNoContent)
		return nil
	}
}

// readMessages marks conversation read by reader up to now (the schema's
// read_messages) and returns the notification of the read event it logged for the
// other participant, or nil when there was nothing unread. It returns errNotFound
// unless reader is in the conversation.
func readMessages(ctx context.Context, db *sql.DB, reader, conversation int64) (*notification, error) {
	var outcome string
	var other, seq sql.NullInt64
	var data []byte
	err := db.QueryRowContext(ctx, `SELECT outcome, other_id, seq, data FROM read_messages($1, $2)`,
		conversation, reader).Scan(&outcome, &other, &seq, &data)
	switch {
	case err != nil:
		return nil, fmt.Errorf("read messages: %w", err)
	case outcome == "not_found":
		return nil, errNotFound
	case outcome == "read":
		return &notification{Kind: "read", To: [][2]int64{{other.Int64, seq.Int64}}, Data: data}, nil
	}
	return nil, nil
}

// handleTyping serves POST /api/conversations/:id/typing: the other participant's
// streams get a fleeting typing event.
func (s *server) handleTyping() apiHandler {
	return func(w http.ResponseWriter, r *http.Request) error {
		me := sessionFrom(r.Context()).userID
		id, err := pathID(r)
		if err != nil {
			return err
		}
		if err := s.limits.typing.allow(me); err != nil {
			return err
		}
		other, err := otherParticipant(r.Context(), s.db, me, id)
		if err != nil {
			return err
		}
		data, _ := json.Marshal(map[string]string{
			"conversationId": strconv.FormatInt(id, 10),
			"userId":         strconv.FormatInt(me, 10),
		})
		s.notifier.enqueue(notification{Kind: "typing", To: [][2]int64{{other.ID, 0}}, Data: data})
		w.WriteHeader(http.StatusNoContent)
		return nil
	}
}
