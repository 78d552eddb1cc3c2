// Command connflood opens many keep-alive connections to the server from one local
// address, sends GET /healthz once on each and keeps them open, then reports what
// the server answered and what it holds (docs/limits.md, "Connections"):
//
//	connflood -url http://127.0.0.1:3000 -n 3000 -from 127.0.0.3
//
// The server's goroutines and open connections come from its /metrics (-metrics,
// its METRICS_ADDR, whose listener has no caps), its open descriptors and resident
// memory from /proc/<-pid>, before and after; then one GET /healthz from another
// address (127.0.0.2) shows whether others are still served. It stops opening
// connections after 20 in a row get no answer (the server cannot accept).
package main

import (
	"bufio"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"regexp"
	"strconv"
	"strings"
	"time"
)

func main() {
	base := flag.String("url", "http://127.0.0.1:3000", "the server")
	n := flag.Int("n", 3000, "connections to open")
	from := flag.String("from", "127.0.0.3", "local address of the connections")
	metricsAddr := flag.String("metrics", "", "the server's METRICS_ADDR (host:port)")
	pid := flag.Int("pid", 0, "the server's process id")
	flag.Parse()
	if err := run(strings.TrimPrefix(*base, "http://"), *n, *from, *metricsAddr, *pid); err != nil {
		fmt.Fprintln(os.Stderr, "connflood:", err)
		os.Exit(1)
	}
}

func run(host string, n int, from, metricsAddr string, pid int) error {
	before := stats(metricsAddr, pid)
	statuses := map[string]int{}
	var held []net.Conn
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	tried, unanswered := 0, 0
	for ; tried < n && unanswered < 20; tried++ {
		c, status := get(host, from)
		statuses[status]++
		if c != nil {
			held = append(held, c)
		}
		if status == "no answer" || status == "dial error" {
			unanswered++
		} else {
			unanswered = 0
		}
	}
	time.Sleep(time.Second) // refused connections finish closing on the server
	after := stats(metricsAddr, pid)
	_, other := get(host, "127.0.0.2")
	fmt.Printf("%d connections tried from %s: %v; held open: %d\n", tried, from, statuses, len(held))
	fmt.Printf("GET /healthz from 127.0.0.2 afterwards: %s\n", other)
	fmt.Printf("%-30s %12s %12s\n", "server", "before", "after")
	for _, k := range []string{"go_goroutines", "process_open_fds", "process_resident_memory_bytes", "messenger_connections_open"} {
		fmt.Printf("%-30s %12s %12s\n", k, before[k], after[k])
	}
	return nil
}

// get opens a connection from the local address from and sends GET /healthz; it
// returns the connection if the answer leaves it open, and the status or error.
func get(host, from string) (net.Conn, string) {
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}, Timeout: 3 * time.Second}
	c, err := d.Dial("tcp", host)
	if err != nil {
		return nil, "dial error"
	}
	c.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := io.WriteString(c, "GET /healthz HTTP/1.1\r\nHost: "+host+"\r\n\r\n"); err != nil {
		c.Close()
		return nil, "write error"
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		c.Close()
		return nil, "no answer"
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	c.SetDeadline(time.Time{})
	if resp.Close {
		c.Close()
		return nil, strconv.Itoa(resp.StatusCode)
	}
	return c, strconv.Itoa(resp.StatusCode)
}

var metricRE = regexp.MustCompile(`(?m)^(go_goroutines|messenger_connections_open) (\S+)$`)

// stats reads the server's goroutines and connections from /metrics at
// metricsAddr, and its descriptors and memory from /proc; "-" where it cannot.
func stats(metricsAddr string, pid int) map[string]string {
	out := map[string]string{}
	for _, k := range []string{"go_goroutines", "process_open_fds", "process_resident_memory_bytes", "messenger_connections_open"} {
		out[k] = "-"
	}
	if pid > 0 {
		if fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid)); err == nil {
			out["process_open_fds"] = strconv.Itoa(len(fds))
		}
		if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid)); err == nil {
			if m := regexp.MustCompile(`VmRSS:\s+(\d+) kB`).FindSubmatch(b); m != nil {
				kb, _ := strconv.Atoi(string(m[1]))
				out["process_resident_memory_bytes"] = fmt.Sprintf("%.1f MB", float64(kb)/1000)
			}
		}
	}
	if metricsAddr == "" {
		return out
	}
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := hc.Get("http://" + metricsAddr + "/metrics")
	if err != nil {
		return out
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	for _, m := range metricRE.FindAllSubmatch(b, -1) {
		out[string(m[1])] = string(m[2])
	}
	return out
}
