package main

import (
	"context"
	"database/sql"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// TestBare runs the series' bare send against the real PostgreSQL (DATABASE_URL,
// as `make test` sets it), on a database of its own with the series' tables, and
// checks that it committed at the rate asked, one message per transaction, and
// reported it.
func TestBare(t *testing.T) {
	base := os.Getenv("DATABASE_URL")
	if base == "" {
		t.Skip("DATABASE_URL is not set")
	}
	admin, err := sql.Open("postgres", base)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	name := fmt.Sprintf("loadgen_bare_%d", time.Now().UnixNano())
	if _, err := admin.Exec(`CREATE DATABASE ` + name); err != nil {
		t.Fatal(err)
	}
	defer admin.Exec(`DROP DATABASE IF EXISTS ` + name + ` WITH (FORCE)`)
	url := regexp.MustCompile(`^(postgres(ql)?://[^/?]*)(/[^?]*)?`).ReplaceAllString(base, "${1}/"+name)
	db, err := sql.Open("postgres", url)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	schema, err := os.ReadFile("../series_schema.sql")
	if err != nil {
		t.Fatal(err)
	}
	// psql's variables by hand, and no VACUUM, which cannot run in the implicit
	// transaction of a multi-statement query.
	q := strings.NewReplacer(":users", "20", ":convs", "10").Replace(string(schema))
	q = regexp.MustCompile(`(?m)^VACUUM.*$`).ReplaceAllString(q, "")
	if _, err := db.Exec(q); err != nil {
		t.Fatal(err)
	}

	out := filepath.Join(t.TempDir(), "bare.json")
	err = runBare(context.Background(), []string{"-name", "t", "-url", url, "-db", name, "-rate", "200",
		"-seconds", "1", "-clients", "2", "-conversations", "10", "-quiet-wait", "1ms", "-out", out})
	if err != nil {
		t.Fatal(err)
	}
	var res pgbenchResult
	if err := readJSON(out, &res); err != nil {
		t.Fatal(err)
	}
	var stored int
	if err := db.QueryRow(`SELECT count(*) FROM series.messages`).Scan(&stored); err != nil {
		t.Fatal(err)
	}
	if stored != 200 || res.Failed != 0 {
		t.Errorf("%d messages stored, %d transactions failed; want 200 and 0", stored, res.Failed)
	}
	var stale int
	if err := db.QueryRow(`SELECT count(*) FROM series.conversations c
		WHERE c.last_message_id IS DISTINCT FROM (SELECT max(m.id) FROM series.messages m WHERE m.conversation_id = c.id)`).Scan(&stale); err != nil {
		t.Fatal(err)
	}
	if stale != 0 {
		t.Errorf("%d conversations whose last message is not their newest", stale)
	}
	// Paced: 200 transactions over at least a second, not as fast as they go (two
	// clients unpaced do several times that). A slow machine may take longer.
	if res.TPS <= 0 || res.TPS > 260 || res.Rate != 200 || res.Clients != 2 {
		t.Errorf("result %+v: want at most about 200 tx/s at rate 200 over 2 clients", res)
	}
	if res.P50Ms <= 0 || res.P99Ms < res.P50Ms {
		t.Errorf("latency p50 %v ms, p99 %v ms", res.P50Ms, res.P99Ms)
	}
}
