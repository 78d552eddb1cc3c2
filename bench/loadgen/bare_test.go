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
	if !strings.Contains(url, "/"+name) {
		t.Fatalf("DATABASE_URL %q is not a postgres:// URL whose database can be replaced", base)
	}
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
	// Every conversation that got a message points at one of its own. (Not
	// necessarily the newest: two transactions may take ids in one order and set
	// the conversation in the other, as in the series' own send.)
	var wrong int
	if err := db.QueryRow(`SELECT count(*) FROM series.conversations c
		WHERE EXISTS (SELECT 1 FROM series.messages m WHERE m.conversation_id = c.id)
		  AND NOT EXISTS (SELECT 1 FROM series.messages m WHERE m.id = c.last_message_id AND m.conversation_id = c.id)`).Scan(&wrong); err != nil {
		t.Fatal(err)
	}
	if wrong != 0 {
		t.Errorf("%d conversations with messages whose last message is not one of theirs", wrong)
	}
	// Paced: the last of 200 transactions is due 0.995 s after the first, so the
	// rate over the run cannot be above 200 / 0.995; unpaced, two clients do
	// several times that. A slow machine only makes it lower.
	if res.TPS <= 0 || res.TPS > 200/0.995 || res.Rate != 200 || res.Clients != 2 {
		t.Errorf("result %+v: want at most 201 tx/s at rate 200 over 2 clients", res)
	}
}
