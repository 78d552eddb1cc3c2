package main

import (
	"bytes"
	"context"
	"database/sql"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// pgBouncerEnv, in a test process's environment, is the address of a PgBouncer in
// front of the test cluster: newTestServer then points the pool through it.
const pgBouncerEnv = "MESSENGER_TEST_PGBOUNCER"

// pgBouncerTests are the API and stream tests TestThroughPgBouncer runs again with
// the pool behind PgBouncer in transaction mode.
const pgBouncerTests = `^(TestLogin|TestAuthUserAndRefresh|TestUsernames|TestConversations|` +
	`TestCreateConversationConcurrently|TestPagination|TestMessageContent|TestIdempotentSend|` +
	`TestStream.*|TestSlowStreamIsDropped|TestReadAndTypingReachOnlyTheOther|` +
	`TestCrossInstanceDelivery|TestListenerConnectionKilled|TestInstanceStopped|TestMigrateConcurrently|` +
	`TestBatchSplitsPastHeldLock)$`

// viaPgBouncer returns dbURL with its host and port replaced by PgBouncer's.
func viaPgBouncer(dbURL, bouncer string) string {
	u, err := url.Parse(dbURL)
	if err != nil {
		panic(err)
	}
	u.Host = bouncer
	return u.String()
}

// startPgBouncer runs PgBouncer in transaction mode in front of the cluster of
// testDatabaseURL, for any database on it, until the test ends; it returns its
// address.
func startPgBouncer(t *testing.T) string {
	t.Helper()
	bin, err := exec.LookPath("pgbouncer")
	if err != nil {
		bin = "/usr/sbin/pgbouncer"
		if _, err := os.Stat(bin); err != nil {
			t.Fatal("pgbouncer is not installed (apt-get install pgbouncer; make test installs it)")
		}
	}
	pg, err := url.Parse(testDatabaseURL)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	_, port, _ := net.SplitHostPort(addr)
	pgHost, pgPort, _ := net.SplitHostPort(pg.Host)

	dir := t.TempDir()
	os.Chmod(dir, 0o755) // PgBouncer runs as postgres when we are root
	conf := fmt.Sprintf(`[databases]
* = host=%s port=%s
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = %s
unix_socket_dir =
auth_type = trust
auth_file = %s
admin_users = postgres
pool_mode = transaction
max_client_conn = 1000
default_pool_size = 20
ignore_startup_parameters = extra_float_digits
`, pgHost, pgPort, port, filepath.Join(dir, "users.txt"))
	must := func(err error) {
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.WriteFile(filepath.Join(dir, "users.txt"), []byte(`"postgres" ""`+"\n"), 0o644))
	must(os.WriteFile(filepath.Join(dir, "pgbouncer.ini"), []byte(conf), 0o644))

	args := []string{filepath.Join(dir, "pgbouncer.ini")}
	if u, err := user.Current(); err == nil && u.Uid == "0" {
		args = append([]string{"-u", "postgres"}, args...) // it refuses to run as root
	}
	var logs syncBuffer
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = &logs, &logs
	must(cmd.Start())
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		if t.Failed() {
			t.Logf("pgbouncer log:\n%s", logs.String())
		}
	})
	db, err := sql.Open("postgres", viaPgBouncer(testDatabaseURL, addr))
	must(err)
	defer db.Close()
	waitFor(t, 20*time.Second, "PgBouncer answers", func() bool { return db.Ping() == nil })
	return addr
}

// pgBouncerStats returns PgBouncer's count of transactions and queries for database.
func pgBouncerStats(t *testing.T, addr, database string) (xacts, queries int64) {
	t.Helper()
	u, _ := url.Parse(testDatabaseURL)
	u.Host, u.Path = addr, "/pgbouncer"
	// The admin console speaks only the simple protocol.
	admin, err := sql.Open("postgres", u.String()+"&binary_parameters=no")
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	rows, err := admin.Query("SHOW STATS")
	if err != nil {
		t.Fatalf("SHOW STATS: %v", err)
	}
	defer rows.Close()
	cols, _ := rows.Columns()
	for rows.Next() {
		vals := make([]any, len(cols))
		ptrs := make([]any, len(cols))
		for i := range vals {
			ptrs[i] = &vals[i]
		}
		if err := rows.Scan(ptrs...); err != nil {
			t.Fatal(err)
		}
		if fmt.Sprint(asString(vals[0])) != database {
			continue
		}
		for i, c := range cols {
			var n int64
			fmt.Sscan(asString(vals[i]), &n)
			switch c {
			case "total_xact_count":
				xacts = n
			case "total_query_count":
				queries = n
			}
		}
	}
	return xacts, queries
}

func asString(v any) string {
	if b, ok := v.([]byte); ok {
		return string(b)
	}
	return fmt.Sprint(v)
}

// TestThroughPgBouncer runs the API and stream tests again, in a process of their
// own, with every server's pool behind PgBouncer in transaction mode and LISTEN on
// a direct connection (DATABASE_LISTEN_URL), and checks that they passed and that
// their queries went through PgBouncer.
func TestThroughPgBouncer(t *testing.T) {
	skipInShortMode(t, "a second test process behind PgBouncer")
	if os.Getenv(pgBouncerEnv) != "" {
		t.Skip("already behind PgBouncer")
	}
	addr := startPgBouncer(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run", pgBouncerTests, "-test.count=1", "-test.v")
	base, _ := url.Parse(testDatabaseURL)
	base.Path = "/postgres"
	cmd.Env = append(os.Environ(), pgBouncerEnv+"="+addr, "DATABASE_URL="+base.String())
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	passed := regexp.MustCompile(`(?m)^--- PASS: (\S+)`).FindAllStringSubmatch(out.String(), -1)
	if err != nil || len(passed) < 15 {
		t.Fatalf("the tests behind PgBouncer: %v, %d passed:\n%s", err, len(passed), out.String())
	}
	// The child's database is messenger_test_<hex>; its traffic went through PgBouncer.
	m := regexp.MustCompile(`messenger_test_[0-9a-f]+`).FindString(out.String())
	if m == "" {
		t.Fatalf("the child did not print its database name:\n%s", out.String())
	}
	xacts, queries := pgBouncerStats(t, addr, m)
	if xacts < 100 || queries < 100 {
		t.Fatalf("PgBouncer carried %d transactions, %d queries for %s; the pools did not go through it", xacts, queries, m)
	}
	var names []string
	for _, p := range passed {
		names = append(names, p[1])
	}
	t.Logf("%d tests passed behind PgBouncer (%d transactions, %d queries through it): %s",
		len(passed), xacts, queries, strings.Join(names, " "))
}
