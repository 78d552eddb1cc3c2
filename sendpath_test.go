package main

import (
	"database/sql"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lib/pq"
)

// TestLoneSendMatchesBatch runs the same sends through send_messages twice, on two
// pairs of users: once one message a call (the short path of a lone message), and
// once each message in a batch with a message for no conversation (the general
// statement). The outcomes, and what each pair's rows look like afterwards, must
// be the same.
func TestLoneSendMatchesBatch(t *testing.T) {
	t.Parallel()
	_, db := openPrivateDatabase(t)
	mustMigrate(t, db)
	mustExec(t, db, `INSERT INTO users (id, username) VALUES (1, 'a1'), (2, 'b1'), (3, 'a2'), (4, 'b2'), (5, 'c')`)
	mustExec(t, db, `INSERT INTO conversations (id, user_low, user_high) VALUES (10, 1, 2), (20, 3, 4), (30, 1, 5), (40, 3, 5)`)
	mustExec(t, db, `INSERT INTO participants (user_id, conversation_id, last_activity_at)
		SELECT u, c.id, now() FROM conversations c, LATERAL (VALUES (c.user_low), (c.user_high)) AS p(u)`)

	type send struct {
		sender, other int // 0: the outsider, user 5
		conv          int // 0: the pair's conversation; -1: none such
		content, key  string
	}
	sends := []send{
		{sender: 1, content: "hello"},
		{sender: 2, content: "hi", key: "k1"},
		{sender: 2, content: "hi", key: "k1"},       // replayed
		{sender: 2, content: "hi again", key: "k1"}, // key_conflict
		{sender: 1, content: "same key, other sender", key: "k1"},
		{sender: 1, conv: -1, content: "nowhere"},        // not_found
		{sender: 0, content: "not a participant"},        // not_found
		{sender: 1, content: "to the outsider", conv: 1}, // the pair's first user and user 5
		{sender: 2, content: "last", key: "k2"},
	}
	// run sends each message of a pair (base 0: users 1, 2, conversation 10; base
	// 2: users 3, 4, conversation 20) and returns what each call answered for it,
	// with users relative to the pair's first and message ids by the send that
	// created them.
	run := func(base int, batch bool) []string {
		var answers []string
		created := map[int64]int{} // message id → the send that created it
		for n, s := range sends {
			sender, conv := int64(s.sender+base), int64(10*(base/2+1))
			switch {
			case s.sender == 0:
				sender = 5
			case s.conv == -1:
				conv = 99
			case s.conv == 1:
				conv += 20
			}
			convs, senders, contents, keys := []int64{conv}, []int64{sender}, []string{s.content}, []string{s.key}
			if batch {
				convs, senders = append(convs, 99), append(senders, sender)
				contents, keys = append(contents, "filler"), append(keys, "")
			}
			rows, err := db.Query(`SELECT idx, outcome, message_id, content, other_id, sender_seq, other_seq
				FROM send_messages($1, $2, $3, $4) ORDER BY idx`,
				pq.Array(convs), pq.Array(senders), pq.Array(contents), pq.Array(keys))
			if err != nil {
				t.Fatalf("send %+v: %v", s, err)
			}
			for rows.Next() {
				var idx int
				var outcome string
				var id, other, senderSeq, otherSeq sql.NullInt64
				var content sql.NullString
				if err := rows.Scan(&idx, &outcome, &id, &content, &other, &senderSeq, &otherSeq); err != nil {
					t.Fatal(err)
				}
				if idx != 1 {
					if outcome != "not_found" {
						t.Errorf("the filler: %s", outcome)
					}
					continue
				}
				a := outcome
				switch outcome {
				case "created":
					created[id.Int64] = n
					if other.Int64 == 5 { // both runs' outsider: its numbers depend on the order of the runs
						a += fmt.Sprintf(" %q, to the outsider, sequence number %d", content.String, senderSeq.Int64)
						break
					}
					a += fmt.Sprintf(" %q, other %d, sequence numbers %d and %d",
						content.String, other.Int64-int64(base), senderSeq.Int64, otherSeq.Int64)
				case "replayed":
					first, ok := created[id.Int64]
					a += fmt.Sprintf(" %q, the message of send %d (%v)", content.String, first, ok)
				}
				answers = append(answers, a)
			}
			if err := rows.Close(); err != nil {
				t.Fatal(err)
			}
		}
		return answers
	}
	// state describes a pair's rows, by position instead of by id.
	state := func(first int) []string {
		var lines []string
		rows, err := db.Query(`
			SELECT format('user %s: event_seq %s, events %s', u.id - $1, u.event_seq,
			              (SELECT string_agg(format('%s:%s', e.seq, m.content), ' ' ORDER BY e.seq)
			                 FROM events e JOIN messages m ON m.id = e.message_id WHERE e.user_id = u.id))
			  FROM users u WHERE u.id IN ($1, $1 + 1)
			UNION ALL
			SELECT format('participant %s in %s: unread %s, last %s', p.user_id - $1,
			              CASE WHEN p.conversation_id IN (10, 20) THEN 'pair' ELSE 'outsider' END,
			              p.unread_count, m.content)
			  FROM participants p LEFT JOIN messages m ON m.id = p.last_message_id
			 WHERE p.user_id IN ($1, $1 + 1)
			UNION ALL
			SELECT format('key %s of %s: %s', k.key, k.user_id - $1, m.content)
			  FROM idempotency_keys k JOIN messages m ON m.id = k.message_id WHERE k.user_id IN ($1, $1 + 1)
			ORDER BY 1`, first)
		if err != nil {
			t.Fatal(err)
		}
		defer rows.Close()
		for rows.Next() {
			var l string
			if err := rows.Scan(&l); err != nil {
				t.Fatal(err)
			}
			lines = append(lines, l)
		}
		return lines
	}

	lone, batched := run(0, false), run(2, true)
	want := []string{
		`created "hello", other 2, sequence numbers 1 and 1`,
		`created "hi", other 1, sequence numbers 2 and 2`,
		`replayed "hi", the message of send 1 (true)`,
		"key_conflict",
		`created "same key, other sender", other 2, sequence numbers 3 and 3`,
		"not_found",
		"not_found",
		`created "to the outsider", to the outsider, sequence number 4`,
		`created "last", other 1, sequence numbers 4 and 5`,
	}
	if !reflect.DeepEqual(lone, want) {
		t.Errorf("one message a call:\n%s\nwant:\n%s", lines(lone), lines(want))
	}
	if !reflect.DeepEqual(batched, want) {
		t.Errorf("in a batch:\n%s\nwant:\n%s", lines(batched), lines(want))
	}
	a, b := state(1), state(3)
	if !reflect.DeepEqual(a, b) {
		t.Errorf("the rows differ:\none message a call:\n%s\nin a batch:\n%s", lines(a), lines(b))
	}
	if len(a) < 8 {
		t.Errorf("the rows the test looked at:\n%s", lines(a))
	}

	// Arrays of one element that are not one message each (only SQL callers make
	// them) take the general statement, as before the short path.
	for _, c := range []struct{ call, want string }{
		{`send_messages('{10}', '{1,1}', '{a,b}', '{"",""}')`, "1 created a, 2 not_found"},
		{`send_messages('{10}', '{1}', '[0:0]={c}', '{""}')`, "1 created c"},
	} {
		var got string
		if err := db.QueryRow(`SELECT string_agg(concat_ws(' ', idx, outcome, content), ', ' ORDER BY idx) FROM ` + c.call).Scan(&got); err != nil {
			t.Errorf("%s: %v", c.call, err)
		} else if got != c.want {
			t.Errorf("%s = %q, want %q", c.call, got, c.want)
		}
	}
}

func lines(ls []string) string {
	var s string
	for _, l := range ls {
		s += fmt.Sprintf("  %s\n", l)
	}
	return s
}

// TestSendConnectionRenewed checks that a send worker replaces its connection once
// it is DB_CONN_MAX_LIFETIME old: the connection is out of the pool, where the
// pool's own limit would not reach it, and it keeps the plans made when it opened.
func TestSendConnectionRenewed(t *testing.T) {
	t.Parallel()
	ts, app := namedServer(t, testDatabaseURL, "renew", "DB_CONN_MAX_LIFETIME=300ms")
	ann, bob := ts.newUser(t, "ann"), ts.newUser(t, "bob")
	conv := ann.startConversation(bob)

	// sender returns the backend that ran the last send_messages for this server.
	sender := func() (pid int) {
		err := ts.DB.QueryRow(`SELECT pid FROM pg_stat_activity
			WHERE application_name = $1 AND query LIKE '%send_messages%' AND query NOT LIKE '%pg_stat_activity%'
			ORDER BY query_start DESC LIMIT 1`, app).Scan(&pid)
		if err != nil {
			t.Fatalf("the backend that sent: %v", err)
		}
		return pid
	}
	ann.send(conv.ID, "first")
	first := sender()
	waitFor(t, 10*time.Second, "a send on another connection", func() bool {
		ann.send(conv.ID, "again")
		return sender() != first
	})
	waitFor(t, 10*time.Second, "the first connection to close", func() bool {
		var n int
		if err := ts.DB.QueryRow(`SELECT count(*) FROM pg_stat_activity WHERE pid = $1`, first).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n == 0
	})
}

// TestSendConnectionKeptWhenRenewalFails: a send worker whose connection is due
// for renewal opens the fresh one before it lets the old one go, so that sends go
// on over the old one while no new connection can be made.
func TestSendConnectionKeptWhenRenewalFails(t *testing.T) {
	t.Parallel()
	if os.Getenv(pgBouncerEnv) != "" {
		t.Skip("behind PgBouncer, the server's connections are PgBouncer's")
	}
	dbURL := privateDatabase(t)
	ts := newTestServer(t, "DATABASE_URL="+dbURL, "DB_CONN_MAX_LIFETIME=200ms")
	ann, bob := ts.newUser(t, "ann"), ts.newUser(t, "bob")
	conv := ann.startConversation(bob)
	ann.send(conv.ID, "first")

	// From now on nobody can connect to the server's database. Signed-in users'
	// sessions are cached, so a send needs only the worker's connection.
	u, err := url.Parse(dbURL)
	if err != nil {
		t.Fatal(err)
	}
	name := strings.TrimPrefix(u.Path, "/")
	admin, err := sql.Open("postgres", testDatabaseURL)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	mustExec(t, admin, `ALTER DATABASE `+name+` ALLOW_CONNECTIONS false`)

	waitFor(t, 15*time.Second, "a renewal to fail", func() bool {
		ann.send(conv.ID, "while the worker tries to renew") // 201, or the test fails
		return strings.Contains(ts.logs.String(), "send worker keeps its connection")
	})
	ann.send(conv.ID, "after the failed renewal")
	fresh, err := sql.Open("postgres", dbURL)
	if err != nil {
		t.Fatal(err)
	}
	defer fresh.Close()
	if err := fresh.Ping(); err == nil {
		t.Error("a new connection to the server's database was accepted: the test proved nothing")
	}

	// Once the worker's connection is gone too, sends get 503 (retry later), not
	// 500; and once connections are allowed again, sends succeed again.
	mustExec(t, admin, `SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1`, name)
	for range 2 {
		if resp, body := ann.do("POST", "/api/conversations/"+conv.ID+"/messages", map[string]string{"content": "refused"}); resp.StatusCode != http.StatusServiceUnavailable {
			t.Errorf("a send with no connection to be had: %d %s, want 503", resp.StatusCode, body)
		}
	}
	mustExec(t, admin, `ALTER DATABASE `+name+` ALLOW_CONNECTIONS true`)
	waitFor(t, 15*time.Second, "sends to succeed again", func() bool {
		resp, _ := ann.do("POST", "/api/conversations/"+conv.ID+"/messages", map[string]string{"content": "back"})
		return resp.StatusCode == http.StatusCreated
	})
}

// TestSendsPassStuckBatches: a batch that waits for a lock another transaction
// holds passes the turn on after sendSpillAfter, so that sends of other users go
// on, up to sendWorkers batches in flight; the stuck sends complete once the lock
// is released.
func TestSendsPassStuckBatches(t *testing.T) {
	t.Parallel()
	ts, app := namedServer(t, testDatabaseURL, "stuck")

	type pair struct {
		sender, receiver *client
		conv             apiConversation
	}
	pairs := make([]pair, sendWorkers)
	for i := range pairs {
		s, r := ts.newUser(t, "snd"), ts.newUser(t, "rcv")
		pairs[i] = pair{s, r, s.startConversation(r)}
	}
	stuck, free := pairs[:sendWorkers-1], pairs[sendWorkers-1]

	// Another transaction holds the receivers of all pairs but the last.
	var receivers []int64
	for _, p := range stuck {
		receivers = append(receivers, p.receiver.User.ID)
	}
	tx := holdUsers(t, ts.DB, receivers...)
	waiting := func() (n int) {
		err := ts.DB.QueryRow(`SELECT count(*) FROM pg_stat_activity
			WHERE application_name = $1 AND wait_event_type = 'Lock' AND query LIKE '%send_messages%'`, app).Scan(&n)
		if err != nil {
			t.Fatal(err)
		}
		return n
	}

	// Each stuck send is a batch of its own, on a worker of its own.
	done := make(chan int, len(stuck))
	for i, p := range stuck {
		go func() {
			resp, _ := p.sender.do("POST", "/api/conversations/"+p.conv.ID+"/messages", map[string]string{"content": "held"})
			done <- resp.StatusCode
		}()
		waitFor(t, eventWait, fmt.Sprintf("%d sends waiting for the lock", i+1), func() bool { return waiting() == i+1 })
	}
	sent := make(chan struct{})
	go func() {
		free.sender.send(free.conv.ID, "not held")
		close(sent)
	}()
	select {
	case <-sent:
	case <-time.After(eventWait):
		t.Fatalf("a send of other users waited for %d stuck batches", len(stuck))
	}
	select {
	case code := <-done:
		t.Fatalf("a held send was answered %d while its receiver was locked", code)
	default:
	}

	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	for range stuck {
		select {
		case code := <-done:
			if code != http.StatusCreated {
				t.Fatalf("held send: got %d, want 201", code)
			}
		case <-time.After(eventWait):
			t.Fatal("a held send did not complete once the lock was released")
		}
	}
}

// namedServer starts a test server on the database at dbURL whose connections
// carry a unique application_name, returned, by which pg_stat_activity tells them
// apart. Behind PgBouncer, where it would show PgBouncer's connections, the test
// is skipped.
func namedServer(t *testing.T, dbURL, prefix string, env ...string) (*testServer, string) {
	t.Helper()
	if os.Getenv(pgBouncerEnv) != "" {
		t.Skip("behind PgBouncer, pg_stat_activity shows PgBouncer's connections")
	}
	u, err := url.Parse(dbURL)
	if err != nil {
		t.Fatal(err)
	}
	app := uniqueName(prefix)
	q := u.Query()
	q.Set("application_name", app)
	u.RawQuery = q.Encode()
	return newTestServer(t, append([]string{"DATABASE_URL=" + u.String()}, env...)...), app
}

// TestBatchSplitsPastHeldLock: a batch of three, the first two of which go to a
// user that another transaction holds, is refused after the lock timeout and split:
// the third message is stored and answered while the lock is still held, the first
// once it is released, and the second, whose request's deadline passes meanwhile,
// is answered with an error and never stored.
func TestBatchSplitsPastHeldLock(t *testing.T) {
	t.Parallel()
	ts := newTestServer(t)
	// Unprepared, the batcher sends its statements as it does behind a pooler, and
	// through PgBouncer in TestThroughPgBouncer's run.
	unprepared := testDatabaseURL
	if bouncer := os.Getenv(pgBouncerEnv); bouncer != "" {
		unprepared = viaPgBouncer(testDatabaseURL, bouncer)
	}
	unprepared, err := poolerSafeDSN(unprepared)
	if err != nil {
		t.Fatal(err)
	}
	pooled, err := sql.Open("postgres", unprepared)
	if err != nil {
		t.Fatal(err)
	}
	defer pooled.Close()
	for _, prepared := range []bool{true, false} {
		db := ts.DB
		if !prepared {
			db = pooled
		}
		t.Run(fmt.Sprintf("prepared=%v", prepared), func(t *testing.T) {
			ann, bob := ts.newUser(t, "ann"), ts.newUser(t, "bob")
			cat, dan := ts.newUser(t, "cat"), ts.newUser(t, "dan")
			request := func(sender *client, conv apiConversation, content string, within time.Duration) *sendRequest {
				c, err := strconv.ParseInt(conv.ID, 10, 64)
				if err != nil {
					t.Fatal(err)
				}
				return &sendRequest{conversation: c, sender: sender.User.ID, content: content,
					deadline: time.Now().Add(within), done: make(chan batchResult, 1)}
			}
			heldConv := ann.startConversation(bob)
			held := request(ann, heldConv, "held", time.Minute)
			late := request(ann, heldConv, "late", 100*time.Millisecond)
			free := request(cat, cat.startConversation(dan), "free", time.Minute)

			var mu sync.Mutex
			var delivered []string
			b := newSendBatcher(db, func(n notification) {
				mu.Lock()
				defer mu.Unlock()
				delivered = append(delivered, n.Content)
			}, prepared, time.Hour, nil, slog.New(slog.DiscardHandler))

			tx := holdUsers(t, ts.DB, bob.User.ID)
			var sc sendConn
			executed := make(chan struct{})
			go func() {
				defer close(executed)
				b.execute(&sc, []*sendRequest{held, late, free})
			}()
			t.Cleanup(func() {
				<-executed
				sc.close()
			})
			wantCreated := func(r *sendRequest) {
				t.Helper()
				select {
				case res := <-r.done:
					if res.err != nil || res.outcome != sendCreated || res.msg.Content != r.content {
						t.Fatalf("%s: got %+v, want it created", r.content, res)
					}
				case <-time.After(eventWait):
					t.Fatalf("%s: no answer", r.content)
				}
			}
			wantCreated(free)
			select {
			case res := <-late.done:
				if res.err == nil {
					t.Fatalf("late: got %+v past its deadline, want an error", res)
				}
			case <-time.After(eventWait):
				t.Fatal("late: no answer past its deadline")
			}
			select {
			case res := <-held.done:
				t.Fatalf("held: answered %+v while its receiver was locked", res)
			default:
			}
			if err := tx.Commit(); err != nil {
				t.Fatal(err)
			}
			wantCreated(held)
			var stored int
			if err := ts.DB.QueryRow(`SELECT count(*) FROM messages WHERE conversation_id = $1 AND content = 'late'`,
				late.conversation).Scan(&stored); err != nil || stored != 0 {
				t.Fatalf("late: %d stored (%v), want none", stored, err)
			}
			mu.Lock()
			defer mu.Unlock()
			if !reflect.DeepEqual(delivered, []string{"free", "held"}) {
				t.Fatalf("delivered %q, want free then held", delivered)
			}
		})
	}
}

// holdUsers locks the users rows of ids in a transaction of db's, as another
// writer would, until the caller commits it or the test ends.
func holdUsers(t *testing.T, db *sql.DB, ids ...int64) *sql.Tx {
	t.Helper()
	tx, err := db.Begin()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tx.Rollback() })
	if _, err := tx.Exec(`SELECT 1 FROM users WHERE id = ANY($1) FOR UPDATE`, pq.Array(ids)); err != nil {
		t.Fatal(err)
	}
	return tx
}

// TestSlowCommitsKeepTheTurn: batches that are slow because their commits are
// (commit_delay, 50 ms each), not because they wait for a lock, keep the turn:
// concurrent sends all go over one connection, in batches.
func TestSlowCommitsKeepTheTurn(t *testing.T) {
	t.Parallel()
	if os.Getenv(pgBouncerEnv) != "" {
		t.Skip("behind PgBouncer, pg_stat_activity shows PgBouncer's connections")
	}
	dbURL := privateDatabase(t)
	u, err := url.Parse(dbURL)
	if err != nil {
		t.Fatal(err)
	}
	admin, err := sql.Open("postgres", testDatabaseURL)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	name := strings.TrimPrefix(u.Path, "/")
	mustExec(t, admin, `ALTER DATABASE `+name+` SET commit_delay = 50000`)
	mustExec(t, admin, `ALTER DATABASE `+name+` SET commit_siblings = 0`)
	ts, app := namedServer(t, dbURL, "slow")

	pairs := make([]struct {
		sender *client
		conv   apiConversation
	}, 8)
	for i := range pairs {
		s, r := ts.newUser(t, "snd"), ts.newUser(t, "rcv")
		pairs[i].sender, pairs[i].conv = s, s.startConversation(r)
	}
	var wg sync.WaitGroup
	for _, p := range pairs {
		wg.Go(func() {
			for range 5 {
				p.sender.send(p.conv.ID, "slow")
			}
		})
	}
	wg.Wait()
	var backends int
	if err := ts.DB.QueryRow(`SELECT count(*) FROM pg_stat_activity
		WHERE application_name = $1 AND query LIKE '%send_messages%' AND query NOT LIKE '%pg_stat_activity%'`,
		app).Scan(&backends); err != nil {
		t.Fatal(err)
	}
	if backends != 1 {
		t.Fatalf("sends ran on %d connections, want 1", backends)
	}
}

// TestSendBatchMetrics checks messenger_send_batch_duration_seconds and
// messenger_send_batch_messages: one observation per send transaction, whose
// messages add up to the sends answered 201, lone sends in batches of one.
func TestSendBatchMetrics(t *testing.T) {
	t.Parallel()
	ts := newTestServer(t)
	const lone, together = 3, 16
	senders := make([]*client, together)
	convs := make([]apiConversation, together)
	for i := range senders {
		senders[i] = ts.newUser(t, "snd")
		convs[i] = senders[i].startConversation(ts.newUser(t, "rcv"))
	}
	for i := range lone {
		senders[0].send(convs[0].ID, fmt.Sprintf("lone %d", i))
	}
	if got := metricValue(t, ts, "messenger_send_batch_messages_count"); got != lone {
		t.Fatalf("%d sends one after the other: %v batches, want %d", lone, got, lone)
	}
	if got := metricValue(t, ts, `messenger_send_batch_messages_bucket\{le="1"\}`); got != lone {
		t.Fatalf("%d lone sends: %v batches of one, want %d", lone, got, lone)
	}
	var wg sync.WaitGroup
	for i := range senders {
		wg.Go(func() { senders[i].send(convs[i].ID, "together") })
	}
	wg.Wait()
	sent := float64(lone + together)
	if got := metricValue(t, ts, "messenger_send_batch_messages_sum"); got != sent {
		t.Fatalf("messages in batches: %v, want the %v sends", got, sent)
	}
	batches := metricValue(t, ts, "messenger_send_batch_messages_count")
	if batches <= lone || batches > sent {
		t.Fatalf("batches: %v, want more than %d and at most %v", batches, lone, sent)
	}
	if got := metricValue(t, ts, "messenger_send_batch_duration_seconds_count"); got != batches {
		t.Fatalf("batch durations: %v observed, want one per batch (%v)", got, batches)
	}
	if got := metricValue(t, ts, "messenger_send_batch_duration_seconds_sum"); got <= 0 {
		t.Fatalf("batch durations add up to %v s, want more than 0", got)
	}
}
