package main

import (
	"context"
	"database/sql"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"

	_ "github.com/lib/pq"
)

// waitTally is what PostgreSQL's backends for the bench database were doing, from
// pg_stat_activity sampled through a phase: for each state (on CPU, a wait event,
// idle waiting for the server), the number of samples that found a backend so.
type waitTally struct {
	Samples int            `json:"samples"`
	Seen    map[string]int `json:"seen,omitempty"`
}

// profiler profiles the phases that ask for it: the server's CPU through its
// net/http/pprof endpoint, and PostgreSQL's wait events.
type profiler struct {
	pprof   string        // base URL of the server's PPROF_ADDR; "": no CPU profile
	seconds int           // of each CPU profile
	db      *sql.DB       // any database of the cluster: pg_stat_activity shows all
	dbName  string        // the bench database, whose backends are sampled
	dir     string        // where the profiles go
	every   time.Duration // between two samples of pg_stat_activity

	mu    sync.Mutex // guards waits
	waits map[string]waitTally
}

// newProfiler returns a profiler; pgURL should name another database of the
// cluster than the bench database, so that the sampler's own backend does not count
// in the bench database's CPU time.
func newProfiler(pprofURL string, seconds int, pgURL, dbName, dir string) (*profiler, error) {
	p := &profiler{pprof: pprofURL, seconds: seconds, dbName: dbName, dir: dir, every: 20 * time.Millisecond,
		waits: map[string]waitTally{}}
	if pgURL != "" {
		db, err := sql.Open("postgres", pgURL)
		if err != nil {
			return nil, err
		}
		db.SetMaxOpenConns(1)
		p.db = db
	}
	return p, nil
}

// start starts profiling the phase name and returns the function that ends it:
// it stops sampling wait events and waits for the CPU profile (of p.seconds from
// the start) to be written to cpu-NAME.pprof.
func (p *profiler) start(ctx context.Context, name string) func() error {
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var cpuErr, sampleErr error
	if p.pprof != "" {
		wg.Go(func() { cpuErr = p.cpuProfile(ctx, name) })
	}
	if p.db != nil {
		wg.Go(func() { sampleErr = p.sampleWaits(ctx, stop, name) })
	}
	return func() error {
		close(stop)
		wg.Wait()
		if cpuErr != nil {
			return cpuErr
		}
		return sampleErr
	}
}

// cpuProfile fetches a CPU profile of the server, p.seconds long.
func (p *profiler) cpuProfile(ctx context.Context, name string) error {
	ctx, cancel := context.WithTimeout(ctx, time.Duration(p.seconds+30)*time.Second)
	defer cancel()
	url := fmt.Sprintf("%s/debug/pprof/profile?seconds=%d", p.pprof, p.seconds)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("cpu profile: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("cpu profile: status %d", resp.StatusCode)
	}
	f, err := os.Create(filepath.Join(p.dir, "cpu-"+name+".pprof"))
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, resp.Body); err != nil {
		f.Close()
		return fmt.Errorf("cpu profile: %w", err)
	}
	return f.Close()
}

// sampleWaits samples the state and wait event of the bench database's client
// backends every p.every until stop is closed.
func (p *profiler) sampleWaits(ctx context.Context, stop <-chan struct{}, name string) error {
	tally := waitTally{Seen: map[string]int{}}
	t := time.NewTicker(p.every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-stop:
			p.mu.Lock()
			p.waits[name] = tally
			p.mu.Unlock()
			return nil
		case <-t.C:
		}
		rows, err := p.db.QueryContext(ctx, `
			SELECT CASE WHEN state <> 'active' THEN 'not active: ' || coalesce(state, '?')
			            WHEN wait_event IS NULL THEN 'active: on CPU'
			            ELSE 'active: ' || wait_event_type || '/' || wait_event END
			FROM pg_stat_activity
			WHERE datname = $1 AND backend_type = 'client backend' AND pid <> pg_backend_pid()`, p.dbName)
		if err != nil {
			return fmt.Errorf("wait events: %w", err)
		}
		for rows.Next() {
			var what string
			if err := rows.Scan(&what); err != nil {
				rows.Close()
				return fmt.Errorf("wait events: %w", err)
			}
			tally.Seen[what]++
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return fmt.Errorf("wait events: %w", err)
		}
		tally.Samples++
	}
}
