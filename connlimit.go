package main

import (
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"sync"
	"syscall"
	"time"
)

// Connection caps. Every connection holds a descriptor and a goroutine until it
// closes, and an idle keep-alive connection stays open as long as its client sends
// a request within IdleTimeout, so a client could otherwise hold every descriptor
// the process may open. connLimiter caps the connections open at once from one
// address (CONN_MAX_PER_ADDR) and in all (CONN_MAX), and answers a connection over
// a cap with a short HTTP error instead of serving it.

// defaultConnMaxPerAddr is CONN_MAX_PER_ADDR's default. A browser opens at most six
// HTTP/1.1 connections to a host, plus one per event stream (at most
// STREAMS_PER_USER, 32, for one user), so a whole household or small office behind
// one NAT address stays well under it, while one address can hold at most 256 of
// the descriptors. Behind a reverse proxy every client shares the proxy's address:
// list the proxy in TRUSTED_PROXIES (its connections are then only under CONN_MAX)
// or set CONN_MAX_PER_ADDR=off.
const defaultConnMaxPerAddr = 256

// defaultConnMax is CONN_MAX's default: the open-file limit less the database pool,
// the LISTEN connection and listening socket, and a twentieth of the limit (at least
// 128) for log files and the like. It leaves half the margin defaultStreamsMax
// leaves, so that by default it is always above STREAMS_MAX: streams hit their own
// cap (and its clearer answer) first, and ordinary requests still have room when
// the streams are full.
func defaultConnMax(dbConns int) int {
	n, ok := openFileLimit()
	if !ok {
		return 1200
	}
	return max(1, n-dbConns-2-max(128, n/20))
}

// parseConnMaxPerAddr reads CONN_MAX_PER_ADDR: a positive number, or 0 or off for
// no per-address cap.
func parseConnMaxPerAddr(getenv func(string) string) (int, error) {
	switch s := getenv("CONN_MAX_PER_ADDR"); s {
	case "":
		return defaultConnMaxPerAddr, nil
	case "0", "off":
		return 0, nil
	default:
		n, err := strconv.Atoi(s)
		if err != nil || n < 0 {
			return 0, fmt.Errorf("CONN_MAX_PER_ADDR %q: want a whole number, or 0 or off for no cap", s)
		}
		return n, nil
	}
}

const (
	// refuseTimeout bounds how long a refused connection is kept to answer it: the
	// write, then reading what the client already sent until it closes (closing with
	// unread data would reset the connection and could lose the answer).
	refuseTimeout = time.Second
	// maxRefusing is how many refused connections are answered at once; past it, a
	// refused connection is closed without an answer, so that a flood of connections
	// costs at most this many descriptors and goroutines beyond CONN_MAX.
	maxRefusing = 64
	// connRetryAfter is the Retry-After of a refusal.
	connRetryAfter = 5 * time.Second
)

// The reasons a connection is refused, as the label of
// messenger_connections_refused_total.
const (
	refusedAddrLimit  = "addr_limit"  // CONN_MAX_PER_ADDR
	refusedServerFull = "server_full" // CONN_MAX
)

// connLimiter is a net.Listener that counts the connections it has accepted until
// each closes, and refuses, with an HTTP answer, one that would exceed a cap.
// Connections are counted until their Close, whoever calls it: the HTTP server, or
// a stream that took its connection over (Hijack returns the connection Accept
// returned).
type connLimiter struct {
	net.Listener
	perAddr int                   // most connections from one address; 0: no cap
	max     int                   // most connections in all
	exempt  func(netip.Addr) bool // peers the per-address cap skips (trusted proxies)
	metrics *metrics
	answers map[string][]byte // the refusal of each reason, as written

	mu     sync.Mutex // guards open and byAddr
	open   int
	byAddr map[netip.Addr]int // open connections by addrKey; no zero entries

	tls      *tls.Config    // if set, refusals are answered over TLS (the server serves TLS)
	refusing chan struct{}  // a token for each refusal being answered
	refusals sync.WaitGroup // the goroutines answering them
}

func newConnLimiter(ln net.Listener, perAddr, max int, exempt func(netip.Addr) bool, m *metrics) *connLimiter {
	return &connLimiter{
		Listener: ln, perAddr: perAddr, max: max, exempt: exempt, metrics: m,
		answers: map[string][]byte{
			refusedAddrLimit: refusal(http.StatusTooManyRequests,
				fmt.Sprintf("too many connections from your address (at most %d); close some or try again shortly", perAddr)),
			refusedServerFull: refusal(http.StatusServiceUnavailable,
				"too many open connections on this server; try again shortly"),
		},
		byAddr:   map[netip.Addr]int{},
		refusing: make(chan struct{}, maxRefusing),
	}
}

// refuseOverTLS makes refusals answer over TLS with cert, as the server is served
// over TLS around this listener (http.Server.ServeTLS): the refusal does the
// handshake, offering only HTTP/1.1, whose answer it writes.
func (l *connLimiter) refuseOverTLS(cert tls.Certificate) {
	l.tls = &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"http/1.1"}}
}

// refusal is the whole HTTP/1.1 answer to a refused connection, its body the JSON
// error that respondJSONError writes.
func refusal(status int, msg string) []byte {
	body, _ := json.Marshal(errorBody(msg, nil)) // strings always encode
	body = append(body, '\n')
	return fmt.Appendf(nil, "HTTP/1.1 %d %s\r\nContent-Type: application/json; charset=utf-8\r\n"+
		"Retry-After: %d\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s",
		status, http.StatusText(status), int(connRetryAfter/time.Second), len(body), body)
}

// Accept returns the next connection that fits under the caps, answering and
// closing those that do not.
func (l *connLimiter) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		key, capped := l.addrKey(c.RemoteAddr())
		if reason := l.admit(key, capped); reason != "" {
			l.metrics.connectionsRefused.WithLabelValues(reason).Inc()
			l.refuse(c, l.answers[reason])
			continue
		}
		l.metrics.connectionsOpen.Inc()
		lc := &limitedConn{Conn: c}
		lc.release = func() { l.release(key, capped) }
		return lc, nil
	}
}

// addrKey is the key under which a connection from addr is counted: its IPv4
// address, or its IPv6 /64 (one host commonly holds a whole /64). capped is false
// when the per-address cap does not apply: it is off, the peer is exempt, or the
// connection is not TCP.
func (l *connLimiter) addrKey(addr net.Addr) (key netip.Addr, capped bool) {
	ta, ok := addr.(*net.TCPAddr)
	if !ok || l.perAddr == 0 {
		return netip.Addr{}, false
	}
	a := ta.AddrPort().Addr().Unmap().WithZone("")
	if l.exempt != nil && l.exempt(a) {
		return netip.Addr{}, false
	}
	if a.Is6() {
		p, _ := a.Prefix(64) // a valid IPv6 address always has a /64
		a = p.Addr()
	}
	return a, true
}

// admit counts a new connection from key, or returns why it may not open.
func (l *connLimiter) admit(key netip.Addr, capped bool) (refused string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.open >= l.max {
		return refusedServerFull
	}
	if capped {
		if l.byAddr[key] >= l.perAddr {
			return refusedAddrLimit
		}
		l.byAddr[key]++
	}
	l.open++
	return ""
}

// release uncounts a connection from key; limitedConn calls it once.
func (l *connLimiter) release(key netip.Addr, capped bool) {
	l.mu.Lock()
	l.open--
	if capped {
		if l.byAddr[key]--; l.byAddr[key] <= 0 {
			delete(l.byAddr, key)
		}
	}
	l.mu.Unlock()
	l.metrics.connectionsOpen.Dec()
}

// refuse writes answer to c (over TLS if l.tls is set) and closes it, in the
// background and within refuseTimeout; with maxRefusing refusals already under way it just closes c.
func (l *connLimiter) refuse(c net.Conn, answer []byte) {
	select {
	case l.refusing <- struct{}{}:
	default:
		c.Close()
		return
	}
	l.refusals.Go(func() {
		defer func() { <-l.refusing }()
		c.SetDeadline(time.Now().Add(refuseTimeout)) // the handshake's too
		if l.tls != nil {
			c = tls.Server(c, l.tls)
		}
		defer c.Close()
		if _, err := c.Write(answer); err != nil {
			return
		}
		if cw, ok := c.(interface{ CloseWrite() error }); ok {
			cw.CloseWrite()
		}
		io.Copy(io.Discard, io.LimitReader(c, 64<<10))
	})
}

// Close stops accepting and waits for the refusals being answered.
func (l *connLimiter) Close() error {
	err := l.Listener.Close()
	l.refusals.Wait()
	return err
}

// limitedConn is a connection connLimiter counts until it is first closed.
type limitedConn struct {
	net.Conn
	once    sync.Once
	release func()
}

func (c *limitedConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.release)
	return err
}

// SyscallConn gives a hijacked stream's client check (hijackedStream.left) the
// socket underneath.
func (c *limitedConn) SyscallConn() (syscall.RawConn, error) {
	if sc, ok := c.Conn.(syscall.Conn); ok {
		return sc.SyscallConn()
	}
	return nil, errors.ErrUnsupported
}

// CloseWrite lets net/http half-close the connection, as it does on a TCP one
// before closing it after an error answer.
func (c *limitedConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}
