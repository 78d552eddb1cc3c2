package main

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"sync"
	"time"
)

// runFlood measures what requests with made-up methods and paths cost a running
// server (docs/limits.md, "Request labels and log lines"; bench/flood.sh runs it):
// it sends -n requests, each with a random method of -method bytes and, with
// -path, a random path of that many bytes under /api/, from -c connections, and
// prints the server's resident memory (with -server-pid) and the size of its
// /metrics before and after.
func runFlood(ctx context.Context, args []string) error {
	fs := newFlags("flood")
	base := fs.String("url", "http://127.0.0.1:3000", "the server")
	serverPid := fs.Int("server-pid", 0, "the server's process id, for its resident memory")
	n := fs.Int("n", 20000, "requests to send")
	methodLen := fs.Int("method", 4096, "bytes of each random method")
	pathLen := fs.Int("path", 0, "bytes of each random path under /api/ (0: the path is /)")
	conns := fs.Int("c", 16, "concurrent connections")
	if err := fs.Parse(args); err != nil {
		return err
	}
	c := newClient(*base, *conns)
	report := func(when string) error {
		req, err := http.NewRequestWithContext(ctx, "GET", *base+"/metrics", nil)
		if err != nil {
			return err
		}
		resp, err := c.api.Do(req)
		if err != nil {
			return fmt.Errorf("get /metrics: %w", err)
		}
		size, err := io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if err != nil {
			return fmt.Errorf("read /metrics: %w", err)
		}
		rss := "-"
		if *serverPid != 0 {
			kb, err := residentKB(*serverPid)
			if err != nil {
				return err
			}
			rss = fmt.Sprintf("%d kB", kb)
		}
		fmt.Printf("%s: /metrics %d bytes, RSS %s\n", when, size, rss)
		return nil
	}
	if err := report("before"); err != nil {
		return err
	}
	var mu sync.Mutex // guards statuses
	statuses := make(map[int]int)
	start := time.Now()
	err := parallel(ctx, *n, *conns, func(ctx context.Context, i int) error {
		path := "/"
		if *pathLen > 0 {
			path = "/api/" + randomLetters(*pathLen)
		}
		req, err := http.NewRequestWithContext(ctx, randomLetters(*methodLen), *base+path, nil)
		if err != nil {
			return err
		}
		resp, err := c.api.Do(req)
		if err != nil {
			return err
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		mu.Lock()
		statuses[resp.StatusCode]++
		mu.Unlock()
		return nil
	})
	if err != nil {
		return err
	}
	fmt.Printf("%d requests in %s: statuses %v\n", *n, time.Since(start).Round(time.Millisecond), statuses)
	return report("after")
}

// randomLetters returns n random capital letters: a valid HTTP method, or path.
func randomLetters(n int) string {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte('A' + rand.IntN(26))
	}
	return string(b)
}
