package main

import (
	"context"
	"database/sql"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"testing"
)

// openPrivateDatabase returns a fresh empty database of the test's own, open.
func openPrivateDatabase(t *testing.T) (string, *sql.DB) {
	t.Helper()
	u := privateDatabase(t)
	db, err := sql.Open("postgres", u)
	if err != nil {
		t.Fatalf("open database: %v", err)
	}
	t.Cleanup(func() { db.Close() })
	return u, db
}

func mustMigrate(t *testing.T, db *sql.DB) {
	t.Helper()
	if err := migrate(context.Background(), db, slog.New(slog.NewTextHandler(io.Discard, nil))); err != nil {
		t.Fatalf("migrate: %v", err)
	}
}

func mustExec(t *testing.T, db *sql.DB, query string, args ...any) {
	t.Helper()
	if _, err := db.Exec(query, args...); err != nil {
		t.Fatalf("exec %.60q: %v", query, err)
	}
}

// migrationVersions returns the number of files in migrations/ and the newest version.
func migrationVersions(t *testing.T, db *sql.DB) (count int, latest int64) {
	t.Helper()
	p, err := newMigrator(db)
	if err != nil {
		t.Fatal(err)
	}
	srcs := p.ListSources()
	return len(srcs), srcs[len(srcs)-1].Version
}

// catalog describes a database's schema, outside goose's own tables, as sorted lines:
// columns, constraints, indexes, functions and triggers.
func catalog(t *testing.T, db *sql.DB) string {
	t.Helper()
	queries := []string{
		`SELECT format('column %s.%s %s null=%s default=%s', table_name, column_name, data_type, is_nullable, coalesce(column_default, ''))
		   FROM information_schema.columns WHERE table_schema = 'public' AND table_name NOT LIKE 'goose%'`,
		`SELECT format('constraint %s %s %s', conrelid::regclass, conname, pg_get_constraintdef(oid))
		   FROM pg_constraint WHERE connamespace = 'public'::regnamespace AND conrelid::regclass::text NOT LIKE 'goose%'`,
		`SELECT 'index ' || indexdef FROM pg_indexes WHERE schemaname = 'public' AND tablename NOT LIKE 'goose%'`,
		`SELECT format('function %s(%s) %s', proname, pg_get_function_identity_arguments(oid), md5(pg_get_functiondef(oid)))
		   FROM pg_proc WHERE pronamespace = 'public'::regnamespace`,
		`SELECT 'trigger ' || pg_get_triggerdef(oid) FROM pg_trigger
		  WHERE NOT tgisinternal AND tgrelid::regclass::text NOT LIKE 'goose%'`,
	}
	var lines []string
	for _, q := range queries {
		rows, err := db.Query(q + ` ORDER BY 1`)
		if err != nil {
			t.Fatalf("catalog: %v", err)
		}
		for rows.Next() {
			var s string
			if err := rows.Scan(&s); err != nil {
				t.Fatal(err)
			}
			lines = append(lines, s)
		}
		if err := rows.Err(); err != nil {
			t.Fatal(err)
		}
		rows.Close()
	}
	return strings.Join(lines, "\n")
}

// TestMigrationsMatchSchema checks that schema.sql, the schema people read, is the
// schema the migrations build.
func TestMigrationsMatchSchema(t *testing.T) {
	t.Parallel()
	_, fromSchema := openPrivateDatabase(t)
	mustExec(t, fromSchema, schemaSQL)
	_, fromMigrations := openPrivateDatabase(t)
	mustMigrate(t, fromMigrations)

	want, got := catalog(t, fromSchema), catalog(t, fromMigrations)
	if got != want {
		t.Errorf("the migrations build another schema than schema.sql:\n%s", lineDiff(want, got))
	}
	if !strings.Contains(got, "column users.event_seq") {
		t.Fatalf("catalog is missing what it should describe:\n%s", got)
	}
}

// lineDiff lists the lines only in a (-) and only in b (+).
func lineDiff(a, b string) string {
	in := func(s string) map[string]bool {
		m := map[string]bool{}
		for _, l := range strings.Split(s, "\n") {
			m[l] = true
		}
		return m
	}
	ina, inb := in(a), in(b)
	var out strings.Builder
	for _, l := range strings.Split(a, "\n") {
		if !inb[l] {
			fmt.Fprintf(&out, "- schema.sql:  %s\n", l)
		}
	}
	for _, l := range strings.Split(b, "\n") {
		if !ina[l] {
			fmt.Fprintf(&out, "+ migrations: %s\n", l)
		}
	}
	return out.String()
}

// baselineSQL is the schema every database had before migrations began: the Up
// part of the first migration, as the server then applied it on every start.
func baselineSQL(t *testing.T) string {
	t.Helper()
	b, err := migrationFiles.ReadFile("migrations/00001_baseline.sql")
	if err != nil {
		t.Fatal(err)
	}
	_, s, ok := strings.Cut(string(b), "-- +goose StatementBegin\n")
	s, _, ok2 := strings.Cut(s, "-- +goose StatementEnd")
	if !ok || !ok2 {
		t.Fatal("00001_baseline.sql: no StatementBegin/StatementEnd block")
	}
	return s
}

// TestMigrateUpgradesExistingDatabase upgrades a database made by the schema.sql of
// before migrations, with data in it, and checks that every row is still there.
func TestMigrateUpgradesExistingDatabase(t *testing.T) {
	t.Parallel()
	dbURL, db := openPrivateDatabase(t)
	mustExec(t, db, baselineSQL(t))
	mustExec(t, db, `INSERT INTO users (id, username, github_id) VALUES (1, 'ann', NULL), (2, 'Bob', 42)`)
	mustExec(t, db, `INSERT INTO conversations (id, user_low, user_high) VALUES (7, 1, 2)`)
	mustExec(t, db, `INSERT INTO participants (user_id, conversation_id, last_activity_at) VALUES (1, 7, now()), (2, 7, now())`)
	mustExec(t, db, `SELECT * FROM send_messages('{7,7}', '{1,2}', '{"hello bob","hi ann"}', '{"k1",""}')`)
	mustExec(t, db, `SELECT * FROM read_messages(7, 2)`)
	mustExec(t, db, `INSERT INTO settings (name, value) VALUES ('dev_token_key', 'old-key')`)
	mustExec(t, db, `SELECT setval('users_id_seq', 2)`)

	// Every row of every table the old schema had, as text, in a stable order.
	tables := []string{"users", "conversations", "participants", "messages", "events", "idempotency_keys", "settings"}
	dump := func() map[string]string {
		m := map[string]string{}
		for _, tbl := range tables {
			var s sql.NullString
			if err := db.QueryRow(`SELECT string_agg(t::text, E'\n' ORDER BY t::text) FROM ` + tbl + ` t`).Scan(&s); err != nil {
				t.Fatalf("dump %s: %v", tbl, err)
			}
			m[tbl] = s.String
		}
		return m
	}
	before := dump()
	for _, tbl := range []string{"users", "messages", "events", "idempotency_keys"} {
		if before[tbl] == "" {
			t.Fatalf("the test put no rows in %s", tbl)
		}
	}

	mustMigrate(t, db)
	var version int64
	if err := db.QueryRow(`SELECT max(version_id) FROM goose_db_version WHERE is_applied`).Scan(&version); err != nil {
		t.Fatal(err)
	}
	if _, want := migrationVersions(t, db); version != want {
		t.Errorf("version after upgrade: got %d, want %d", version, want)
	}
	after := dump()
	for _, tbl := range tables {
		if !sameRows(before[tbl], after[tbl]) {
			t.Errorf("%s changed in the upgrade:\nbefore:\n%s\nafter:\n%s", tbl, before[tbl], after[tbl])
		}
	}

	// The upgraded database serves: ann (an existing user) reads her conversation.
	ts := newTestServer(t, "DATABASE_URL="+dbURL)
	ann := ts.login(t, "ann")
	var page []apiMessage
	ann.mustDo("GET", "/api/conversations/7/messages", nil, 200, &page)
	if len(page) != 2 {
		t.Errorf("messages after the upgrade: got %d, want 2", len(page))
	}
}

// sameRows reports whether every row before is still there after; migrations may
// add columns, which appear at the end of each row's text.
func sameRows(before, after string) bool {
	b, a := strings.Split(before, "\n"), strings.Split(after, "\n")
	if len(a) != len(b) {
		return false
	}
	for i := range b {
		if a[i] != b[i] && !strings.HasPrefix(a[i], strings.TrimSuffix(b[i], ")")+",") {
			return false
		}
	}
	return true
}

// TestMigrateConcurrently starts the migrations from several instances at once on
// a new database: each applies or waits, and each migration is recorded once.
func TestMigrateConcurrently(t *testing.T) {
	t.Parallel()
	_, db := openPrivateDatabase(t)
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for range 4 {
		wg.Go(func() {
			errs <- migrate(context.Background(), db, slog.New(slog.NewTextHandler(io.Discard, nil)))
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Errorf("migrate: %v", err)
		}
	}
	var rows, versions int
	if err := db.QueryRow(`SELECT count(*), count(DISTINCT version_id) FROM goose_db_version WHERE version_id > 0`).Scan(&rows, &versions); err != nil {
		t.Fatal(err)
	}
	if want, _ := migrationVersions(t, db); rows != want || versions != want {
		t.Errorf("goose_db_version: got %d rows of %d versions, want %d of %d", rows, versions, want, want)
	}
}

// TestMigrationRebuildsInvalidIndex: an index build of migration 00004 that was
// interrupted leaves an INVALID events_created behind; the migration must not take
// it as done (the pruner would scan the whole log).
func TestMigrationRebuildsInvalidIndex(t *testing.T) {
	t.Parallel()
	_, db := openPrivateDatabase(t)
	p, err := newMigrator(db)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.UpTo(context.Background(), 3); err != nil {
		t.Fatalf("migrate to 3: %v", err)
	}
	mustExec(t, db, `INSERT INTO users (username) VALUES ('ix')`)
	mustExec(t, db, `INSERT INTO events (user_id, seq, kind, payload, created_at)
		SELECT (SELECT id FROM users WHERE username = 'ix'), g, 'read', '{}', '2026-01-01' FROM generate_series(1, 2) g`)
	// A unique index on equal values fails to build, as an interrupted build does,
	// and leaves an INVALID index of the name behind.
	if _, err := db.Exec(`CREATE UNIQUE INDEX CONCURRENTLY events_created ON events (created_at)`); err == nil {
		t.Fatal("the stand-in build should fail")
	}
	mustMigrate(t, db)
	var valid, unique bool
	if err := db.QueryRow(`SELECT indisvalid, indisunique FROM pg_index WHERE indexrelid = 'events_created'::regclass`).Scan(&valid, &unique); err != nil {
		t.Fatal(err)
	}
	if !valid || unique {
		t.Errorf("events_created after migrating: valid %v, unique %v; want a valid, plain index", valid, unique)
	}
}

// TestStoredSettingConcurrently: instances starting together on a new database all
// read the one value of a setting that one of them stored. (An INSERT ... ON
// CONFLICT DO NOTHING that waited for a concurrent insert sees neither its own row
// nor, in the same statement's snapshot, the other's.)
func TestStoredSettingConcurrently(t *testing.T) {
	t.Parallel()
	_, db := openPrivateDatabase(t)
	mustMigrate(t, db)
	for round := range 20 {
		name := fmt.Sprintf("race_%d", round)
		values := make(chan string, 8)
		var wg sync.WaitGroup
		for i := range 8 {
			wg.Go(func() {
				v, err := storedSetting(context.Background(), db, name, fmt.Sprint(i))
				if err != nil {
					t.Errorf("storedSetting: %v", err)
				}
				values <- v
			})
		}
		wg.Wait()
		close(values)
		first := <-values
		for v := range values {
			if v != first {
				t.Fatalf("round %d: instances read %q and %q", round, first, v)
			}
		}
	}
}

// TestDeletedRowsTakeTheirEvents checks what the foreign keys on messages and
// events cascaded before migration 00009 and its triggers do now, with the keys of
// idempotency_keys, which stay: deleting a user deletes their events and keys,
// their conversations' messages, and the other participants' events and keys of
// those messages; deleting a message or a conversation deletes its messages'
// events and keys. Nothing else goes.
func TestDeletedRowsTakeTheirEvents(t *testing.T) {
	t.Parallel()
	ts := newTestServer(t)
	doomed, friend, other := ts.newUser(t, "doomed"), ts.newUser(t, "friend"), ts.newUser(t, "other")
	gone := doomed.startConversation(friend)
	kept := friend.startConversation(other)
	key := func() string { return "Idempotency-Key: " + randomHex(8) } // as the web client sends
	doomed.send(gone.ID, "from doomed", key())
	friend.send(gone.ID, "to doomed", key())
	friend.mustDo("POST", "/api/conversations/"+gone.ID+"/read_messages", nil, http.StatusNoContent, nil)
	friend.send(kept.ID, "stays", key())
	lost := other.send(kept.ID, "deleted alone", key())

	count := func(query string, args ...any) int {
		t.Helper()
		var n int
		if err := ts.DB.QueryRow(query, args...).Scan(&n); err != nil {
			t.Fatalf("%s: %v", query, err)
		}
		return n
	}
	// rowsOf returns c's events and idempotency keys.
	rowsOf := func(c *client) [2]int {
		return [2]int{count(`SELECT count(*) FROM events WHERE user_id = $1`, c.User.ID),
			count(`SELECT count(*) FROM idempotency_keys WHERE user_id = $1`, c.User.ID)}
	}
	want := func(when string, c *client, events, keys int) {
		t.Helper()
		if got := rowsOf(c); got != [2]int{events, keys} {
			t.Errorf("%s: %s has %d events and %d keys; want %d and %d", when, c.User.Username, got[0], got[1], events, keys)
		}
	}
	// doomed: 2 message events and friend's read; friend: 4 message events.
	want("before", doomed, 3, 1)
	want("before", friend, 4, 2)
	want("before", other, 2, 1)

	if _, err := ts.DB.Exec(`DELETE FROM users WHERE id = $1`, doomed.User.ID); err != nil {
		t.Fatalf("delete user: %v", err)
	}
	if n := count(`SELECT count(*) FROM messages WHERE conversation_id = $1`, gone.ID); n != 0 {
		t.Errorf("the deleted user's conversation still has %d messages", n)
	}
	want("after the user's deletion", doomed, 0, 0)
	want("after the user's deletion", friend, 2, 1)
	want("after the user's deletion", other, 2, 1)

	if _, err := ts.DB.Exec(`DELETE FROM messages WHERE id = $1`, lost.ID); err != nil {
		t.Fatalf("delete message: %v", err)
	}
	want("after the message's deletion", friend, 1, 1)
	want("after the message's deletion", other, 1, 0)

	if _, err := ts.DB.Exec(`DELETE FROM conversations WHERE id = $1`, kept.ID); err != nil {
		t.Fatalf("delete conversation: %v", err)
	}
	if n := count(`SELECT count(*) FROM messages WHERE conversation_id = $1`, kept.ID); n != 0 {
		t.Errorf("the deleted conversation still has %d messages", n)
	}
	want("after the conversation's deletion", friend, 0, 0)
	want("after the conversation's deletion", other, 0, 0)
}

// TestTruncateEmptiesEvents: since migration 00009 no foreign key leads from users
// or messages to events, so a TRUNCATE ... CASCADE would leave events behind (and,
// with RESTART IDENTITY, hand them to new users); the TRUNCATE triggers of 00010
// empty it. The keys of idempotency_keys, which stay, empty that table. On a database of its own: TRUNCATE empties tables for everyone.
func TestTruncateEmptiesEvents(t *testing.T) {
	t.Parallel()
	_, db := openPrivateDatabase(t)
	mustMigrate(t, db)
	for _, table := range []string{"messages", "conversations", "users"} {
		mustExec(t, db, `INSERT INTO users (username) VALUES ('a'), ('b')`)
		mustExec(t, db, `INSERT INTO conversations (user_low, user_high) SELECT min(id), max(id) FROM users`)
		mustExec(t, db, `INSERT INTO participants (user_id, conversation_id, last_activity_at)
			SELECT u.id, c.id, now() FROM users u, conversations c`)
		mustExec(t, db, `SELECT * FROM send_messages(ARRAY(SELECT id FROM conversations), ARRAY(SELECT min(id) FROM users),
			ARRAY['hello'], ARRAY['key'])`)
		rows := func() (n [2]int) {
			t.Helper()
			if err := db.QueryRow(`SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM idempotency_keys)`).Scan(&n[0], &n[1]); err != nil {
				t.Fatal(err)
			}
			return n
		}
		before := rows()
		mustExec(t, db, `TRUNCATE `+table+` RESTART IDENTITY CASCADE`)
		if after := rows(); before != [2]int{2, 1} || after != [2]int{0, 0} {
			t.Errorf("TRUNCATE %s: events and keys %v before, %v after; want [2 1] and [0 0]", table, before, after)
		}
		mustExec(t, db, `TRUNCATE users RESTART IDENTITY CASCADE`)
	}
}
