package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// protocol is a way a client reaches the server: the server speaks them all on
// one listener (cleartext) or all over TLS.
type protocol struct {
	name       string
	protoMajor int      // what the responses must say
	tls        bool     // the server serves TLS (TLS_CERT_FILE, TLS_KEY_FILE)
	env        []string // further settings
}

// protocols are those every stream guarantee is checked over; protocolNamed finds one.
var protocols = []protocol{
	{name: "HTTP1.1-hijacked", protoMajor: 1},
	{name: "HTTP1.1-in-handler", protoMajor: 1, env: []string{"SSE_HIJACK=false"}},
	{name: "h2c", protoMajor: 2},
	{name: "HTTP2-TLS", protoMajor: 2, tls: true},
}

func protocolNamed(name string) protocol {
	for _, p := range protocols {
		if p.name == name {
			return p
		}
	}
	panic("no protocol " + name)
}

// newTestServerOver starts a test server whose clients speak proto: over TLS with a
// certificate made for the test, or in cleartext HTTP/2 with prior knowledge
// (h2c), or HTTP/1.1. Every response is checked against the contract as usual.
func newTestServerOver(t testing.TB, proto protocol, env ...string) *testServer {
	t.Helper()
	env = append(append([]string(nil), proto.env...), env...)
	var roots *x509.CertPool
	if proto.tls {
		certFile, keyFile, pool := selfSignedCert(t)
		roots = pool
		env = append(env, "TLS_CERT_FILE="+certFile, "TLS_KEY_FILE="+keyFile)
	}
	ts := newTestServer(t, env...)
	if proto.protoMajor == 2 {
		ts.hc = http2Client(t, roots, 0)
	}
	return ts
}

// http2Client returns a client that speaks only HTTP/2: over TLS trusting roots, or
// h2c when roots is nil. window, if not 0, is how much of a response it buffers
// unread, per stream.
func http2Client(t testing.TB, roots *x509.CertPool, window int) *http.Client {
	var p http.Protocols
	tr := &http.Transport{Protocols: &p, HTTP2: &http.HTTP2Config{}}
	if roots != nil {
		p.SetHTTP2(true)
		tr.TLSClientConfig = &tls.Config{RootCAs: roots}
	} else {
		p.SetUnencryptedHTTP2(true)
	}
	if window > 0 {
		tr.HTTP2.MaxReceiveBufferPerStream = window
		tr.HTTP2.MaxReceiveBufferPerConnection = 64 << 10
	}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: &contractTransport{next: tr, check: contract}}
}

// selfSignedCert writes a certificate for 127.0.0.1 and localhost, and its key, to
// files of the test's own, and returns them with a pool that trusts it.
func selfSignedCert(t testing.TB) (certFile, keyFile string, roots *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "messenger test"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1)},
		DNSNames:              []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	roots = x509.NewCertPool()
	roots.AddCert(cert)
	return certFile, keyFile, roots
}

// TestStreamOverEveryProtocol checks the stream's guarantees over HTTP/1.1 (the
// connection taken over, or served in the handler), h2c and HTTP/2 over TLS:
// delivery to every stream once, a departed client noticed, resume with
// Last-Event-ID, reset past REPLAY_MAX,
// a client that stops reading dropped, session_ended on sign-out, and shutdown
// ending the streams.
func TestStreamOverEveryProtocol(t *testing.T) {
	t.Parallel()
	for _, proto := range protocols {
		t.Run(proto.name, func(t *testing.T) {
			t.Parallel()
			ts := newTestServerOver(t, proto, "REPLAY_MAX=5", "SSE_BUFFER=8", "SSE_WRITE_TIMEOUT=1s")
			alice, bob := ts.newUser(t, "alice"), ts.newUser(t, "bob")
			conv := alice.startConversation(bob)

			// Delivery: every stream, once; several streams of one user share the
			// connection over HTTP/2.
			tab1, tab2, bobTab := alice.stream(""), alice.stream(""), bob.stream("")
			if got := tab1.resp.ProtoMajor; got != proto.protoMajor {
				t.Fatalf("stream over HTTP/%d, want HTTP/%d", got, proto.protoMajor)
			}
			m := alice.send(conv.ID, "hello")
			for i, s := range []*sseStream{tab1, tab2, bobTab} {
				if _, got := s.nextMessage(eventWait); got.ID != m.ID || got.Mine != (i < 2) {
					t.Fatalf("stream %d: got %+v, want message %s", i, got, m.ID)
				}
			}
			bobTab.expectNone(100 * time.Millisecond)

			// Resume: what was missed is replayed in order, then live events.
			start := bobTab.lastEventID()
			bobTab.close()
			// The server notices the departed client (over HTTP/2 at once, over a
			// hijacked connection at the next keep-alive) and lets the stream go.
			waitOpenStreams(t, ts, 2)
			var missed []apiMessage
			for i := range 3 {
				missed = append(missed, alice.send(conv.ID, fmt.Sprintf("missed %d", i)))
			}
			resumed := bob.stream(start)
			for i, want := range missed {
				if _, got := resumed.nextMessage(eventWait); got.ID != want.ID {
					t.Fatalf("replay %d: got %s, want %s", i, got.ID, want.ID)
				}
			}
			live := alice.send(conv.ID, "live")
			if _, got := resumed.nextMessage(eventWait); got.ID != live.ID {
				t.Fatalf("after the replay: got %s, want %s", got.ID, live.ID)
			}

			// Reset: more than REPLAY_MAX missed.
			from, _ := strconv.ParseInt(start, 10, 64)
			head := eventSeq(t, ts, bob)
			for range 6 {
				alice.send(conv.ID, "too many")
			}
			for range 6 {
				resumed.nextMessage(eventWait)
			}
			reset := bob.stream(start)
			reset.mustReset(head+6, "too_far_behind", head+6-from)
			reset.close()
			waitOpenStreams(t, ts, 3)

			// A client that stops reading is dropped; the others go on. Over
			// HTTP/1.1 that takes thousands of sends, to fill the socket buffers:
			// TestSlowStreamIsDropped checks a hijacked connection already, and the
			// in-handler one is left out of -short.
			if proto.protoMajor == 2 || (proto.name == "HTTP1.1-in-handler" && !testing.Short()) {
				checkStalledStreamDropped(t, ts, proto, alice, bob, conv, resumed)
			}

			// Signing out ends the session's streams with session_ended.
			bob.mustDo("POST", "/api/logout", nil, http.StatusNoContent, nil)
			expectSessionEnded(t, "bob", resumed, "signed_out", time.Now().Add(10*time.Second))

			// Shutdown ends the streams that are left.
			if err := ts.stop(t); err != nil {
				t.Fatalf("stop: %v", err)
			}
			for i, s := range []*sseStream{tab1, tab2} {
				if !s.ended(eventWait) {
					t.Fatalf("alice's stream %d still open after shutdown", i)
				}
			}
		})
	}
}

// waitOpenStreams waits until the server holds n open streams.
func waitOpenStreams(t *testing.T, ts *testServer, n float64) {
	t.Helper()
	waitFor(t, eventWait, fmt.Sprintf("%v open streams", n), func() bool {
		return metricValue(t, ts, "messenger_streams_open") == n
	})
}

// checkStalledStreamDropped opens a stream of bob's that is never read, and checks
// that it is dropped while alice sends, and that healthy, bob's other stream, gets
// every message meanwhile.
func checkStalledStreamDropped(t *testing.T, ts *testServer, proto protocol, alice, bob *client, conv apiConversation, healthy *sseStream) {
	t.Helper()
	before := metricValue(t, ts, "messenger_streams_open")
	openStalledStream(t, ts, proto, bob)
	waitOpenStreams(t, ts, before+1)
	big := strings.Repeat("€", 480) // about 1.5 KB a frame
	for sent := 0; metricValue(t, ts, "messenger_streams_open") > before; sent++ {
		if sent >= 4000 {
			t.Fatal("the stalled stream was not dropped after 4000 messages")
		}
		m := alice.send(conv.ID, big)
		if _, got := healthy.nextMessage(eventWait); got.ID != m.ID {
			t.Fatalf("healthy stream: got %s, want %s", got.ID, m.ID)
		}
	}
}

// openStalledStream opens c's stream over proto and never reads it: over HTTP/1.1 a
// connection with a tiny receive buffer (openSilentStream), over HTTP/2 a
// connection of its own whose flow-control window the unread events soon fill.
func openStalledStream(t *testing.T, ts *testServer, proto protocol, c *client) {
	t.Helper()
	if proto.protoMajor == 1 {
		openSilentStream(t, ts, c, "")
		return
	}
	var roots *x509.CertPool
	if proto.tls {
		roots = ts.hc.Transport.(*contractTransport).next.(*http.Transport).TLSClientConfig.RootCAs
	}
	req, _ := http.NewRequest("GET", ts.URL+"/api/messages", nil)
	req.Header.Set("Accept", "text/event-stream")
	req.Header.Set("Authorization", "Bearer "+c.Token)
	resp, err := http2Client(t, roots, 16<<10).Do(req)
	if err != nil {
		t.Fatalf("open stalled stream: %v", err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("open stalled stream: status %d", resp.StatusCode)
	}
}

// TestTLSSettings: TLS_CERT_FILE and TLS_KEY_FILE go together, and a pair that
// cannot be loaded stops the start with an error naming them.
func TestTLSSettings(t *testing.T) {
	t.Parallel()
	certFile, keyFile, _ := selfSignedCert(t)
	for _, tc := range []struct {
		name string
		env  map[string]string
	}{
		{"certificate alone", map[string]string{"TLS_CERT_FILE": certFile}},
		{"key alone", map[string]string{"TLS_KEY_FILE": keyFile}},
		{"key for certificate", map[string]string{"TLS_CERT_FILE": keyFile, "TLS_KEY_FILE": certFile}},
		{"missing files", map[string]string{"TLS_CERT_FILE": certFile + ".none", "TLS_KEY_FILE": keyFile}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.env["DEV_LOGIN"], tc.env["PORT"], tc.env["HOST"] = "true", "0", "127.0.0.1"
			tc.env["DATABASE_URL"] = testDatabaseURL
			var stdout strings.Builder
			err := run(t.Context(), nil, func(k string) string { return tc.env[k] }, &stdout, &syncBuffer{})
			if err == nil || !strings.Contains(err.Error(), "TLS_CERT_FILE") {
				t.Errorf("got %v, want an error naming TLS_CERT_FILE", err)
			}
			if stdout.Len() > 0 {
				t.Errorf("the server started: %s", stdout.String())
			}
		})
	}
}

// TestStalledHTTP2ConnectionFreesStreams: a client that opens streams over h2c with
// a huge flow-control window and then never reads its socket must lose them within
// SSE_WRITE_TIMEOUT, so its user can open a stream again and shutdown is prompt.
func TestStalledHTTP2ConnectionFreesStreams(t *testing.T) {
	t.Parallel()
	ts := newTestServerOver(t, protocolNamed("h2c"), "SSE_WRITE_TIMEOUT=1s", "SSE_BUFFER=8",
		"STREAMS_PER_USER=16", "RATE_LIMIT_SENDS=1000/s,1000")
	alice, bob := ts.newUser(t, "alice"), ts.newUser(t, "bob")
	conv := alice.startConversation(bob)

	d := net.Dialer{Control: func(_, _ string, c syscall.RawConn) error {
		return c.Control(func(fd uintptr) { syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096) })
	}}
	conn, err := d.Dial("tcp", strings.TrimPrefix(ts.URL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	frame := func(typ, flags byte, id uint32, p []byte) []byte {
		h := []byte{byte(len(p) >> 16), byte(len(p) >> 8), byte(len(p)), typ, flags, 0, 0, 0, 0}
		binary.BigEndian.PutUint32(h[5:], id)
		return append(h, p...)
	}
	lit := func(b []byte, k, v string) []byte { // HPACK literal, new name, no Huffman; len(v) < 127
		b = append(b, 0, byte(len(k)))
		return append(append(append(b, k...), byte(len(v))), v...)
	}
	out := []byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
	out = append(out, frame(0x4, 0, 0, []byte{0, 4, 0x7f, 0xff, 0xff, 0xff})...) // INITIAL_WINDOW_SIZE 2^31-1
	out = append(out, frame(0x8, 0, 0, binary.BigEndian.AppendUint32(nil, 1<<31-1-65535))...)
	for i := range 16 {
		var h []byte
		h = lit(h, ":method", "GET")
		h = lit(h, ":scheme", "http")
		h = lit(h, ":path", "/api/messages")
		h = lit(h, ":authority", "127.0.0.1")
		h = lit(h, "accept", "text/event-stream")
		h = lit(h, "authorization", "Bearer "+bob.Token)
		out = append(out, frame(0x1, 0x4|0x1, uint32(2*i+1), h)...) // END_HEADERS|END_STREAM
	}
	out = append(out, frame(0x4, 0x1, 0, nil)...) // SETTINGS ACK
	if _, err := conn.Write(out); err != nil {
		t.Fatal(err)
	}
	waitOpenStreams(t, ts, 16)
	// From now on the socket is never read: the server's writes to it block.
	big := strings.Repeat("€", 480)
	for range 300 {
		alice.send(conv.ID, big)
	}
	waitFor(t, 15*time.Second, "bob's stalled streams let go", func() bool {
		return metricValue(t, ts, "messenger_streams_open") == 0
	})
	bob.stream("").close() // bob is not locked out by STREAMS_PER_USER
	_ = http.StatusOK
}

// TestStreamRequestWithBodyRefused: GET /api/messages carries no body. Over HTTP/2
// the server buffers up to 1 MiB of an unread request body per connection for as
// long as the handler runs, and a stream's handler runs for hours with no read
// deadline: a stream request that comes with a body must be refused.
func TestStreamRequestWithBodyRefused(t *testing.T) {
	t.Parallel()
	ts := newTestServerOver(t, protocolNamed("h2c"))
	alice := ts.newUser(t, "alice")
	pr, pw := io.Pipe()
	t.Cleanup(func() { pw.Close() })
	go pw.Write(make([]byte, 256<<10)) // the client sends it as DATA frames the handler never reads
	req, _ := http.NewRequest("GET", ts.URL+"/api/messages", pr)
	req.Header.Set("Accept", "text/event-stream")
	req.Header.Set("Authorization", "Bearer "+alice.Token)
	resp, err := ts.hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest {
		t.Fatalf("stream request with a body: status %d, want 400", resp.StatusCode)
	}
}
