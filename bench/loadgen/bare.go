package main

import (
	"context"
	"database/sql"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"sync"
	"time"
)

// bareStatements are the article series' bare send, bench/series_send.sql's
// transaction: check that the sender takes part in the conversation, insert the
// message, set the conversation's last message.
var bareStatements = []string{
	`BEGIN`,
	`SELECT EXISTS (SELECT 1 FROM series.participants WHERE user_id = $1 AND conversation_id = $2)`,
	`INSERT INTO series.messages (content, user_id, conversation_id)
	 VALUES ('benchmark message content of ordinary length', $1, $2) RETURNING id, created_at`,
	`UPDATE series.conversations SET last_message_id = $1 WHERE id = $2`,
	`COMMIT`,
}

// bareConn is one client connection of runBare, with the statements prepared on it.
type bareConn struct {
	conn  *sql.Conn
	stmts []*sql.Stmt
}

// send runs the bare send of sender in conv: five round trips, as pgbench -M
// prepared runs the script.
func (c *bareConn) send(ctx context.Context, conv, sender int64) error {
	if _, err := c.stmts[0].ExecContext(ctx); err != nil {
		return err
	}
	var member bool
	err := c.stmts[1].QueryRowContext(ctx, sender, conv).Scan(&member)
	var id int64
	var at time.Time
	if err == nil {
		err = c.stmts[2].QueryRowContext(ctx, sender, conv).Scan(&id, &at)
	}
	if err == nil {
		_, err = c.stmts[3].ExecContext(ctx, id, conv)
	}
	if err == nil {
		_, err = c.stmts[4].ExecContext(ctx)
	}
	if err != nil {
		c.conn.ExecContext(ctx, `ROLLBACK`)
	}
	return err
}

// runBare runs the series' bare send from this process at a fixed rate, on the
// open loops' own schedule (schedule: evenly spaced, each transaction's latency
// from its release, see startOf), over -clients connections with prepared statements. It is
// the database's own latency at an open loop's rate with the open loop's arrivals;
// pgbench -R spaces its transactions at random (a Poisson process), which is
// burstier. The result has pgbench's shape, for the report.
func runBare(ctx context.Context, args []string) error {
	fs := newFlags("bare")
	name := fs.String("name", "", "name of the run, for the report")
	url := fs.String("url", "", "the database, as a URL")
	db := fs.String("db", "messenger_bench", "the database's name, for PostgreSQL's CPU time")
	rate := fs.Float64("rate", 500, "transactions a second, in all")
	seconds := fs.Int("seconds", 10, "length of the run")
	clients := fs.Int("clients", 16, "connections, each running one transaction at a time")
	convs := fs.Int("conversations", 0, "conversations of the series' tables (conversation c is between users 2c-1 and 2c)")
	out := fs.String("out", "", "where to write the result")
	quiet := addQuietFlags(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *name == "" || *url == "" || *out == "" || *convs <= 0 || *rate <= 0 || *clients <= 0 || *seconds <= 0 {
		return fmt.Errorf("bare: -name, -url, -out, -conversations, and a positive -rate, -clients and -seconds are required")
	}
	pool, err := sql.Open("postgres", *url)
	if err != nil {
		return err
	}
	defer pool.Close()
	pool.SetMaxOpenConns(*clients)
	pool.SetMaxIdleConns(*clients)
	conns := make([]*bareConn, *clients)
	for i := range conns {
		c := &bareConn{}
		if c.conn, err = pool.Conn(ctx); err != nil {
			return fmt.Errorf("bare: connect: %w", err)
		}
		defer c.conn.Close()
		for _, q := range bareStatements {
			st, err := c.conn.PrepareContext(ctx, q)
			if err != nil {
				return fmt.Errorf("bare: prepare: %w", err)
			}
			defer st.Close()
			c.stmts = append(c.stmts, st)
		}
		conns[i] = c
	}
	if _, err := quiet.wait(); err != nil {
		return err
	}
	meter := cpuMeter{db: *db, loadPid: os.Getpid()}
	a, err := meter.sample()
	if err != nil {
		return err
	}
	begin := time.Now()
	jobs := schedule(ctx, phaseSpec{rate: *rate, duration: time.Duration(*seconds) * time.Second}, begin)
	took := make([][]time.Duration, len(conns))
	failed := make([]int, len(conns))
	var firstErr error
	var once sync.Once
	var wg sync.WaitGroup
	for w, c := range conns {
		wg.Go(func() {
			rnd := rand.New(rand.NewPCG(uint64(w), uint64(time.Now().UnixNano())))
			for released := range jobs {
				start := startOf(released, time.Now())
				conv := int64(rnd.IntN(*convs) + 1)
				sender := 2*conv - 1 + int64(rnd.IntN(2))
				// No deadline: a context that can be cancelled costs lib/pq a
				// goroutine a statement, which pgbench does not pay.
				if err := c.send(context.Background(), conv, sender); err != nil {
					failed[w]++
					once.Do(func() { firstErr = err })
					continue
				}
				took[w] = append(took[w], time.Since(start))
			}
		})
	}
	wg.Wait()
	end := time.Now()
	b, err := meter.sample()
	if err != nil {
		return err
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	all := slices.Concat(took...)
	res := pgbenchResult{Name: *name, Script: "loadgen bare (bench/series_send.sql's transaction)", Clients: *clients,
		Seconds: *seconds, TPS: float64(len(all)) / end.Sub(begin).Seconds(), Rate: *rate, CPU: split(a, b)}
	for _, f := range failed {
		res.Failed += f
	}
	if res.Failed > 0 {
		logf("bare %s: %d transactions failed, the first with: %v", *name, res.Failed, firstErr)
	}
	if len(all) == 0 {
		return fmt.Errorf("bare %s: no transaction committed", *name)
	}
	res.P50Ms, res.P99Ms = ms(percentile(all, 50)), ms(percentile(all, 99))
	logf("bare %s at %.0f tx/s (%.0f achieved), %d clients: latency p50 %.2f ms, p99 %.2f ms (from each transaction's release on the schedule)",
		*name, *rate, res.TPS, *clients, res.P50Ms, res.P99Ms)
	return writeJSON(*out, res)
}
