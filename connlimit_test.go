package main

import (
	"bufio"
	"crypto/tls"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// rawConn is a keep-alive connection a test opens itself, from a local address of
// its choice, so that it controls how many are open and from where.
type rawConn struct {
	net.Conn
	br   *bufio.Reader
	host string
}

// dialFrom opens a connection to ts from the local address from (127.0.0.x); it is
// closed when the test ends.
func dialFrom(t *testing.T, ts *testServer, from string) *rawConn {
	t.Helper()
	host := strings.TrimPrefix(ts.URL, "http://")
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}, Timeout: 30 * time.Second}
	c, err := d.Dial("tcp", host)
	if err != nil {
		t.Fatalf("dial from %s: %v", from, err)
	}
	t.Cleanup(func() { c.Close() })
	return &rawConn{Conn: c, br: bufio.NewReader(c), host: host}
}

// get sends GET path on the connection and reads the answer; a connection the
// server closed without an answer gives status 0. The header has Connection: close
// if the answer closes the connection.
func (c *rawConn) get(t *testing.T, path string) (status int, header http.Header, body []byte) {
	t.Helper()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := io.WriteString(c, "GET "+path+" HTTP/1.1\r\nHost: "+c.host+"\r\n\r\n"); err != nil {
		return 0, nil, nil
	}
	resp, err := http.ReadResponse(c.br, nil)
	if err != nil {
		return 0, nil, nil
	}
	defer resp.Body.Close()
	body, err = io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("read body: %v", err)
	}
	if resp.Close { // ReadResponse takes Connection: close out of the header
		resp.Header.Set("Connection", "close")
	}
	return resp.StatusCode, resp.Header, body
}

// getOnNew opens a connection from the local address from and sends GET /healthz.
func getOnNew(t *testing.T, ts *testServer, from string) (*rawConn, int, http.Header, []byte) {
	t.Helper()
	c := dialFrom(t, ts, from)
	status, header, body := c.get(t, "/healthz")
	return c, status, header, body
}

// checkRefusal checks a connection-level refusal: its status, Retry-After, and
// JSON error.
func checkRefusal(t *testing.T, status int, header http.Header, body []byte, want int) {
	t.Helper()
	if status != want {
		t.Fatalf("status %d, want %d (body %q)", status, want, body)
	}
	if got := header.Get("Retry-After"); got != "5" {
		t.Errorf("Retry-After %q, want 5", got)
	}
	if got := header.Get("Connection"); got != "close" {
		t.Errorf("Connection %q, want close", got)
	}
	var e struct{ Error, Message string }
	if err := json.Unmarshal(body, &e); err != nil || e.Error == "" || e.Message != e.Error {
		t.Errorf("body %q: want a JSON error with error and message", body)
	}
}

func TestConnectionsPerAddressCap(t *testing.T) {
	t.Parallel()
	const perAddr = 5
	ts := newTestServer(t, "CONN_MAX_PER_ADDR=5")

	var held []*rawConn
	for i := range perAddr {
		c, status, _, body := getOnNew(t, ts, "127.0.0.3")
		if status != http.StatusOK {
			t.Fatalf("connection %d: status %d, want 200 (body %q)", i+1, status, body)
		}
		held = append(held, c)
	}
	for range 3 {
		_, status, header, body := getOnNew(t, ts, "127.0.0.3")
		checkRefusal(t, status, header, body, http.StatusTooManyRequests)
	}
	// The connections under the cap still serve requests.
	if status, _, _ := held[0].get(t, "/healthz"); status != http.StatusOK {
		t.Errorf("held connection: status %d, want 200", status)
	}
	// Another address is not affected.
	for range perAddr {
		if _, status, _, _ := getOnNew(t, ts, "127.0.0.2"); status != http.StatusOK {
			t.Fatalf("from 127.0.0.2: status %d, want 200", status)
		}
	}
	if got := labelledMetric(t, ts, `messenger_connections_refused_total{reason="addr_limit"}`); got != 3 {
		t.Errorf("addr_limit refusals %v, want 3", got)
	}

	// Closing connections frees their slots, once the server has seen them close.
	held[0].Close()
	held[1].Close()
	var reopened int
	waitFor(t, 20*time.Second, "two slots freed", func() bool {
		c, status, _, _ := getOnNew(t, ts, "127.0.0.3")
		if status == http.StatusOK {
			held = append(held, c)
			reopened++
		}
		return reopened == 2
	})
	_, status, header, body := getOnNew(t, ts, "127.0.0.3")
	checkRefusal(t, status, header, body, http.StatusTooManyRequests)
}

func TestConnectionsPerAddressCapOff(t *testing.T) {
	t.Parallel()
	ts := newTestServer(t, "CONN_MAX_PER_ADDR=off")
	for i := range 20 {
		if _, status, _, _ := getOnNew(t, ts, "127.0.0.3"); status != http.StatusOK {
			t.Fatalf("connection %d: status %d, want 200", i+1, status)
		}
	}
}

func TestConnectionsTotalCap(t *testing.T) {
	t.Parallel()
	const max = 8
	ts := newTestServer(t, "CONN_MAX=8", "CONN_MAX_PER_ADDR=off")

	// The test's own client may hold a connection or two from 127.0.0.1; the
	// connections from 127.0.0.2 fill the rest.
	var held []*rawConn
	refused := false
	for range max + 1 {
		c, status, header, body := getOnNew(t, ts, "127.0.0.2")
		if status == http.StatusServiceUnavailable {
			checkRefusal(t, status, header, body, http.StatusServiceUnavailable)
			refused = true
			break
		}
		if status != http.StatusOK {
			t.Fatalf("status %d, want 200 or 503", status)
		}
		held = append(held, c)
	}
	if !refused || len(held) == 0 || len(held) > max {
		t.Fatalf("%d connections opened before a refusal (refused: %v), want 1 to %d and then 503", len(held), refused, max)
	}
	// The server is full for every address.
	_, status, header, body := getOnNew(t, ts, "127.0.0.3")
	checkRefusal(t, status, header, body, http.StatusServiceUnavailable)

	// A closed connection frees a slot for anyone.
	held[0].Close()
	waitFor(t, 20*time.Second, "a slot freed", func() bool {
		_, status, _, _ := getOnNew(t, ts, "127.0.0.3")
		return status == http.StatusOK
	})
	for _, c := range held[1:] {
		c.Close()
	}
	// Read on a connection of its own: the test's HTTP client may have none open,
	// and could be refused until the server has seen the others close.
	waitFor(t, 20*time.Second, "the refusals counted", func() bool {
		c := dialFrom(t, ts, "127.0.0.4")
		defer c.Close()
		status, _, body := c.get(t, "/metrics")
		m := regexp.MustCompile(`(?m)^messenger_connections_refused_total\{reason="server_full"\} (\d+)$`).FindSubmatch(body)
		if status != http.StatusOK || m == nil {
			return false
		}
		n, _ := strconv.Atoi(string(m[1]))
		return n >= 2
	})
}

// TestConnectionsStreamsCounted checks that a stream's connection, which the
// handler takes over from the HTTP server, is counted until the stream closes, and
// uncounted exactly once.
func TestConnectionsStreamsCounted(t *testing.T) {
	t.Parallel()
	ts := newTestServer(t)
	bob := ts.newUser(t, "bob")
	before := metricValue(t, ts, "messenger_connections_open")
	if before < 1 {
		t.Fatalf("messenger_connections_open %v before the streams, want at least 1 (the scrape's own)", before)
	}
	var streams []*sseStream
	for range 3 {
		streams = append(streams, bob.stream(""))
	}
	waitFor(t, eventWait, "three more connections", func() bool {
		return metricValue(t, ts, "messenger_connections_open") == before+3
	})
	for _, s := range streams {
		s.close()
	}
	waitFor(t, 20*time.Second, "the streams' connections released", func() bool {
		return metricValue(t, ts, "messenger_streams_open") == 0
	})
	waitFor(t, 20*time.Second, "the connection count back", func() bool {
		return metricValue(t, ts, "messenger_connections_open") == before
	})
}

func TestConnectionsAddrKey(t *testing.T) {
	t.Parallel()
	proxy := netip.MustParseAddr("10.0.0.7")
	l := &connLimiter{perAddr: 1, exempt: func(a netip.Addr) bool { return a == proxy }}
	for _, tc := range []struct {
		peer   string
		key    string
		capped bool
	}{
		{"192.0.2.1:5000", "192.0.2.1", true},
		{"[::ffff:192.0.2.1]:5000", "192.0.2.1", true},
		{"[2001:db8:1:2:aaaa::1]:5000", "2001:db8:1:2::", true},
		{"[2001:db8:1:2:bbbb::9]:5000", "2001:db8:1:2::", true},
		{"10.0.0.7:5000", "invalid IP", false},
	} {
		key, capped := l.addrKey(net.TCPAddrFromAddrPort(netip.MustParseAddrPort(tc.peer)))
		if key.String() != tc.key || capped != tc.capped {
			t.Errorf("%s: got %v %v, want %v %v", tc.peer, key, capped, tc.key, tc.capped)
		}
	}
}

func TestConnectionsConfig(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		perAddr string
		want    int
		wantErr bool
	}{
		{"", defaultConnMaxPerAddr, false},
		{"off", 0, false},
		{"0", 0, false},
		{"12", 12, false},
		{"-1", 0, true},
		{"many", 0, true},
	} {
		cfg, err := loadConfig(func(k string) string {
			return map[string]string{"DEV_LOGIN": "true", "CONN_MAX_PER_ADDR": tc.perAddr}[k]
		})
		if (err != nil) != tc.wantErr || (err == nil && cfg.connMaxPerAddr != tc.want) {
			t.Errorf("CONN_MAX_PER_ADDR=%q: got %d, %v; want %d, error %v", tc.perAddr, cfg.connMaxPerAddr, err, tc.want, tc.wantErr)
		}
	}
	cfg, err := loadConfig(func(k string) string { return map[string]string{"DEV_LOGIN": "true"}[k] })
	if err != nil {
		t.Fatal(err)
	}
	if cfg.connMax <= cfg.streamsMax {
		t.Errorf("default CONN_MAX %d, want above STREAMS_MAX %d", cfg.connMax, cfg.streamsMax)
	}
	if cfg.idleTimeout != 75*time.Second {
		t.Errorf("default HTTP_IDLE_TIMEOUT %v, want 75s", cfg.idleTimeout)
	}
}

// TestConnectionsRefusedOverTLS: when the server serves TLS, a refused connection
// gets its answer over TLS, as a browser (offering h2 and HTTP/1.1) reads it.
func TestConnectionsRefusedOverTLS(t *testing.T) {
	t.Parallel()
	ts := newTestServerOver(t, protocolNamed("HTTP2-TLS"), "CONN_MAX_PER_ADDR=1")
	roots := ts.hc.Transport.(*contractTransport).next.(*http.Transport).TLSClientConfig.RootCAs
	host := strings.TrimPrefix(ts.URL, "https://")
	dial := func() *rawConn {
		d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.0.0.3")}, Timeout: 30 * time.Second}
		c, err := tls.DialWithDialer(d, "tcp", host, &tls.Config{RootCAs: roots, ServerName: "127.0.0.1", NextProtos: []string{"http/1.1"}})
		if err != nil {
			t.Fatalf("dial: %v", err)
		}
		t.Cleanup(func() { c.Close() })
		return &rawConn{Conn: c, br: bufio.NewReader(c), host: host}
	}
	if status, _, body := dial().get(t, "/healthz"); status != http.StatusOK {
		t.Fatalf("first connection: status %d, want 200 (body %q)", status, body)
	}
	status, header, body := dial().get(t, "/healthz")
	checkRefusal(t, status, header, body, http.StatusTooManyRequests)
}
