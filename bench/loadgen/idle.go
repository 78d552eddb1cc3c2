package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"time"
)

// runIdle opens idle streams over one protocol and reports the server's memory per
// stream (bench/streammem.sh runs it once per protocol, on a fresh server each).
func runIdle(ctx context.Context, args []string) error {
	fs := newFlags("idle")
	base := fs.String("url", "http://127.0.0.1:3999", "the server")
	serverPid := fs.Int("server-pid", 0, "the server's process id, for its resident memory")
	n := fs.Int("n", 2000, "idle streams to open, one user each")
	proto := fs.String("proto", "http1", "http1; h2c (cleartext HTTP/2, a connection a stream); "+
		"or h2c-shared (streams share connections, as many as the server allows on one)")
	hold := fs.Duration("hold", 0, "then hold the streams this long and report the server's CPU meanwhile (needs -server-pid)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	c := newClient(*base, 16)
	switch *proto {
	case "http1":
	case "h2c":
		c.streams = &http.Client{Transport: connPerRequest{}}
	case "h2c-shared":
		c.streams = &http.Client{Transport: h2cTransport()}
	default:
		return fmt.Errorf("-proto %q: want http1, h2c or h2c-shared", *proto)
	}
	if err := c.waitReady(ctx, 30*time.Second); err != nil {
		return err
	}
	streamCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	l := &loadRun{c: c, serverPid: *serverPid}
	is, err := l.idleStreams(ctx, streamCtx, *n)
	if err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "idle over %s: %d streams, resident %d → %d KB: %.1f KB a stream (Go heap %.1f KB, stacks %.1f KB, %.1f goroutines)\n",
		*proto, is.Streams, is.RSSBeforeKB, is.RSSAfterKB, is.KBPerStream, is.HeapKBPerStream, is.StackKBPerStream, is.GoroutinesPerStr)
	var cpu float64 // the server's CPU seconds per second of hold
	if *hold > 0 && *serverPid > 0 {
		before, err := procTicks(*serverPid, false)
		if err != nil {
			return err
		}
		start := time.Now()
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(*hold):
		}
		after, err := procTicks(*serverPid, false)
		if err != nil {
			return err
		}
		cpu = float64(after-before) / clockTicks / time.Since(start).Seconds()
		fmt.Fprintf(os.Stderr, "held %d idle streams for %v: the server used %.4f of a core (%.1f ms of CPU a second)\n",
			is.Streams, *hold, cpu, cpu*1000)
	}
	return json.NewEncoder(os.Stdout).Encode(struct {
		Proto   string  `json:"proto"`
		HoldCPU float64 `json:"holdCores,omitempty"`
		idleStats
	}{*proto, cpu, is})
}

// h2cTransport speaks only cleartext HTTP/2 with prior knowledge.
func h2cTransport() *http.Transport {
	var p http.Protocols
	p.SetUnencryptedHTTP2(true)
	return &http.Transport{Protocols: &p, DisableCompression: true}
}

// connPerRequest sends each request over an h2c connection of its own, as streams
// of different people would come.
type connPerRequest struct{}

func (connPerRequest) RoundTrip(req *http.Request) (*http.Response, error) {
	return h2cTransport().RoundTrip(req)
}
