// Command loadgen is the load generator of `make bench` (bench/run.sh runs it). Its
// subcommands:
//
//	loadgen setup   signs in the benchmark's users and starts one conversation per
//	                pair, numbered so that bench/send.sql can pick them for pgbench
//	loadgen pgbench runs pgbench on a send script and records its transactions per
//	                second and where the CPU went
//	loadgen load    loads a running server: sends through HTTP while every user
//	                reads their event stream, then idle streams, then a fixed rate
//	loadgen hubs    loads a running server in the shapes of issue 15: a closed loop
//	                against pgbench's bare send, idle streams, open loops at fixed
//	                rates (profiled), and saturation
//	loadgen report  prints the results as one table and writes bench/out/results.md
//	loadgen quiet   waits, a bounded time, for the machine to be idle
//	loadgen idle    opens idle streams over HTTP/1.1 or h2c and reports the server's
//	                memory per stream (bench/streammem.sh runs it)
//	loadgen flood   sends requests with made-up methods and paths and reports the
//	                server's memory and /metrics size (bench/flood.sh runs it)
//
// Each subcommand writes what it measured as JSON for report to read.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"sync"
	"syscall"
	"time"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:]); err != nil {
		fmt.Fprintf(os.Stderr, "loadgen: %v\n", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string) error {
	if len(args) == 0 {
		return errors.New("usage: loadgen setup|pgbench|bare|load|hubs|report|quiet|flood|idle [flags]")
	}
	switch args[0] {
	case "setup":
		return runSetup(ctx, args[1:])
	case "pgbench":
		return runPgbench(ctx, args[1:])
	case "bare":
		return runBare(ctx, args[1:])
	case "load":
		return runLoad(ctx, args[1:])
	case "hubs":
		return runHubs(ctx, args[1:])
	case "report":
		return runReport(args[1:])
	case "quiet":
		return runQuiet(args[1:])
	case "flood":
		return runFlood(ctx, args[1:])
	case "idle":
		return runIdle(ctx, args[1:])
	}
	return fmt.Errorf("unknown subcommand %q: want setup, pgbench, bare, load, hubs, report, quiet, flood or idle", args[0])
}

// newFlags returns the flag set of a subcommand.
func newFlags(name string) *flag.FlagSet {
	return flag.NewFlagSet("loadgen "+name, flag.ContinueOnError)
}

// activeName is the username of the benchmark's i-th sending user, idleName that of
// its i-th idle user.
func activeName(i int) string { return fmt.Sprintf("bench-u-%05d", i) }
func idleName(i int) string   { return fmt.Sprintf("bench-idle-%05d", i) }

// benchContent is what every benchmark message says; bench/send.sql sends the same.
const benchContent = "benchmark message content of ordinary length"

// runSetup signs in users bench-u-00000 … in order and starts the conversation of
// each pair (2i, 2i+1), one at a time, on a fresh database: so user i gets id i+1
// and the pair's conversation id i+1, the numbering bench/send.sql relies on. Then
// it signs in the idle users (who hold the idle streams later) and pairs them in
// conversations too, so that the tables are not toy-sized: on a table of a few
// hundred rows PostgreSQL plans sequential scans that a real one would not get.
func runSetup(ctx context.Context, args []string) error {
	fs := newFlags("setup")
	base := fs.String("url", "http://127.0.0.1:3999", "the server")
	users := fs.Int("users", 1000, "active users to create (even)")
	idle := fs.Int("idle", 10000, "idle users to create")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *users < 2 || *users%2 != 0 {
		return fmt.Errorf("-users %d: want an even number of at least 2", *users)
	}
	c := newClient(*base, 16)
	if err := c.waitReady(ctx, 30*time.Second); err != nil {
		return err
	}
	tokens := make([]string, *users)
	for i := range *users {
		id, token, err := c.login(ctx, activeName(i))
		if err != nil {
			return err
		}
		if id != int64(i+1) {
			return fmt.Errorf("user %s got id %d, want %d: setup needs a fresh database", activeName(i), id, i+1)
		}
		tokens[i] = token
	}
	for i := 0; i < *users; i += 2 {
		id, status, err := c.conversation(ctx, tokens[i], activeName(i+1))
		if err != nil {
			return err
		}
		if want := int64(i/2 + 1); id != want || status != http.StatusCreated {
			return fmt.Errorf("conversation of %s and %s: got id %d (status %d), want %d (201): setup needs a fresh database",
				activeName(i), activeName(i+1), id, status, want)
		}
	}
	idleTokens := make([]string, *idle)
	err := parallel(ctx, *idle, 16, func(ctx context.Context, i int) error {
		_, token, err := c.login(ctx, idleName(i))
		idleTokens[i] = token
		return err
	})
	if err != nil {
		return err
	}
	err = parallel(ctx, *idle/2, 16, func(ctx context.Context, i int) error {
		_, _, err := c.conversation(ctx, idleTokens[2*i], idleName(2*i+1))
		return err
	})
	if err != nil {
		return err
	}
	fmt.Printf("setup: %d users, %d conversations (conversation i is between users 2i-1 and 2i), and %d idle users in %d conversations\n",
		*users, *users/2, *idle, *idle/2)
	return nil
}

// quietFlags are the flags of waiting for a quiet machine, shared by the
// subcommands that measure.
type quietFlags struct {
	maxBusy *float64
	maxWait *time.Duration
}

func addQuietFlags(fs *flag.FlagSet) quietFlags {
	return quietFlags{
		maxBusy: fs.Float64("quiet-below", 0.3, "before measuring, wait for the machine to be less than this many cores busy"),
		maxWait: fs.Duration("quiet-wait", 20*time.Second, "but wait no longer than this"),
	}
}

func (q quietFlags) wait() (cpuSplit, error) { return waitQuiet(*q.maxBusy, *q.maxWait) }

// runQuiet waits for a quiet machine, as the flags say.
func runQuiet(args []string) error {
	fs := newFlags("quiet")
	q := addQuietFlags(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	_, err := q.wait()
	return err
}

// client talks to the server under test.
type client struct {
	base    string
	api     *http.Client // requests, over a pool of kept-alive connections
	streams *http.Client // event streams, one connection each
}

func newClient(base string, conns int) *client {
	dial := (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext
	return &client{
		base: base,
		api: &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{
			DialContext: dial, MaxIdleConns: conns, MaxIdleConnsPerHost: conns, DisableCompression: true,
		}},
		streams: &http.Client{Transport: &http.Transport{
			DialContext: dial, MaxIdleConnsPerHost: -1, DisableCompression: true,
		}},
	}
}

// call sends in as JSON, decodes a 2xx answer into out, and returns the status; any
// status not in ok is an error.
func (c *client) call(ctx context.Context, method, path, token string, in, out any, ok ...int) (int, error) {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return 0, err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, body)
	if err != nil {
		return 0, err
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := c.api.Do(req)
	if err != nil {
		return 0, fmt.Errorf("%s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return resp.StatusCode, fmt.Errorf("%s %s: %w", method, path, err)
	}
	if !slices.Contains(ok, resp.StatusCode) {
		return resp.StatusCode, fmt.Errorf("%s %s: status %d: %s", method, path, resp.StatusCode, bytes.TrimSpace(b))
	}
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			return resp.StatusCode, fmt.Errorf("%s %s: %w", method, path, err)
		}
	}
	return resp.StatusCode, nil
}

// waitReady waits, at most timeout, for the server to answer GET /readyz.
func (c *client) waitReady(ctx context.Context, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		_, err := c.call(ctx, http.MethodGet, "/readyz", "", nil, nil, http.StatusOK)
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("server not ready after %v: %w", timeout, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// login signs in username (POST /api/login) and returns its id and token.
func (c *client) login(ctx context.Context, username string) (int64, string, error) {
	var out struct {
		AuthUser struct {
			ID string `json:"id"`
		} `json:"authUser"`
		Token string `json:"token"`
	}
	if _, err := c.call(ctx, http.MethodPost, "/api/login", "", map[string]string{"username": username}, &out, http.StatusOK); err != nil {
		return 0, "", err
	}
	id, err := strconv.ParseInt(out.AuthUser.ID, 10, 64)
	if err != nil {
		return 0, "", fmt.Errorf("login %s: user id %q", username, out.AuthUser.ID)
	}
	return id, out.Token, nil
}

// conversation returns the id of the conversation with username (POST
// /api/conversations), and the status: 201 when it was created.
func (c *client) conversation(ctx context.Context, token, username string) (int64, int, error) {
	var out struct {
		ID string `json:"id"`
	}
	status, err := c.call(ctx, http.MethodPost, "/api/conversations", token, map[string]string{"username": username}, &out,
		http.StatusOK, http.StatusCreated)
	if err != nil {
		return 0, status, err
	}
	id, err := strconv.ParseInt(out.ID, 10, 64)
	if err != nil {
		return 0, status, fmt.Errorf("conversation with %s: id %q", username, out.ID)
	}
	return id, status, nil
}

// sendBody is the body of every benchmark send.
var sendBody = []byte(`{"content":"` + benchContent + `"}`)

// send posts the benchmark message to conversation and returns the status and, for
// 201, the new message's id.
func (c *client) send(ctx context.Context, token string, conversation int64) (int, int64, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost,
		c.base+"/api/conversations/"+strconv.FormatInt(conversation, 10)+"/messages", bytes.NewReader(sendBody))
	if err != nil {
		return 0, 0, err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := c.api.Do(req)
	if err != nil {
		return 0, 0, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusCreated {
		return resp.StatusCode, 0, err
	}
	var m struct {
		ID string `json:"id"`
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return resp.StatusCode, 0, fmt.Errorf("decode message: %w", err)
	}
	id, err := strconv.ParseInt(m.ID, 10, 64)
	return resp.StatusCode, id, err
}

// parallel runs f(0) … f(n-1) on workers goroutines and returns the first error.
func parallel(ctx context.Context, n, workers int, f func(ctx context.Context, i int) error) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex // guards next and first
		next  int
		first error
	)
	for range min(workers, n) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				mu.Lock()
				i := next
				next++
				stop := first != nil
				mu.Unlock()
				if i >= n || stop {
					return
				}
				if err := f(ctx, i); err != nil {
					mu.Lock()
					if first == nil {
						first = err
						cancel()
					}
					mu.Unlock()
					return
				}
			}
		}()
	}
	wg.Wait()
	return first
}

// writeJSON writes v to path, indented.
func writeJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}

// readJSON reads path into v.
func readJSON(path string, v any) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return nil
}
