package main

// Tests of what a client can make the server spend (issue 11, docs/limits.md):
// request labels and log lines, the normalizer's cost and rule, and the order of
// the send checks.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"os"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/chromedp/chromedp"
)

// randomLetters returns n random capital letters: a valid HTTP method, or path.
func randomLetters(n int) string {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte('A' + rand.IntN(26))
	}
	return string(b)
}

// TestLimitsMadeUpMethodsAndPaths sends thousands of requests with made-up methods
// (up to 4 KB) and paths (up to 2 KB, some with encoded control characters): no
// method or path becomes a metric label, /metrics stays within a few KB of its size
// before, and each request adds one log line of bounded length that no control
// character can split.
func TestLimitsMadeUpMethodsAndPaths(t *testing.T) {
	t.Parallel()
	ts := newTestServer(t)
	metrics := func() string { return string(mustRaw(t, "GET", ts.URL+"/metrics", nil, nil).body) }
	requestLines := func() int { return strings.Count(ts.logs.String(), " msg=request ") }
	// One request of each kind first, so that the series they add exist before.
	for _, method := range []string{"GET", "BREW"} {
		for _, path := range []string{"/nowhere", "/api/nowhere"} {
			mustRaw(t, method, ts.URL+path, nil, nil)
		}
	}
	waitFor(t, 5*time.Second, "the first requests' log lines", func() bool { return requestLines() == 4 })
	before := len(metrics())
	logBefore := len(ts.logs.String())

	const n, workers = 3000, 8
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Go(func() {
			for i := w; i < n; i += workers {
				path := "/" + randomLetters(1+rand.IntN(2048))
				switch i % 4 {
				case 1:
					path = "/api" + path
				case 2:
					path += "%0Atime=forged%20level=ERROR%20msg=forged%00%1b%7f" + randomLetters(rand.IntN(512))
				}
				res, err := rawDo(randomLetters(1+rand.IntN(4096)), ts.URL+path, nil, nil)
				if err == nil && res.status != http.StatusNotFound && res.status != http.StatusMethodNotAllowed {
					err = fmt.Errorf("%.40s: got %d %s, want 404 or 405", path, res.status, res.body)
				}
				if err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	waitFor(t, 30*time.Second, "a log line per request", func() bool { return requestLines() >= 4+n })

	m := metrics()
	if grew := len(m) - before; grew > 4<<10 {
		t.Errorf("/metrics grew by %d bytes to %d, want at most 4 KB", grew, len(m))
	}
	if !strings.Contains(m, `messenger_http_requests_total{method="other",route="(not found)",status="405"}`) {
		t.Errorf("metrics lack the made-up methods' series (method other, status 405)")
	}
	for line := range strings.Lines(m) {
		if len(line) > 300 {
			t.Fatalf("a /metrics line of %d bytes: %.200s…", len(line), line)
		}
	}

	logs := ts.logs.String()[logBefore:]
	// A line holds two cut strings (method, path); a control character is written
	// as an escape of at most 4 bytes.
	maxLine := 2*4*(maxLogValue+32) + 256
	lines := 0
	for line := range strings.Lines(logs) {
		lines++
		if len(line) > maxLine {
			t.Fatalf("a log line of %d bytes, want at most %d: %.300s…", len(line), maxLine, line)
		}
		if strings.HasPrefix(line, "time=forged") {
			t.Fatalf("a request forged a log line: %.300s", line)
		}
	}
	if lines != n {
		t.Errorf("the requests wrote %d log lines, want one each (%d)", lines, n)
	}
	if t.Failed() {
		t.Logf("last log line: %.2000s", logs[strings.LastIndex(logs[:len(logs)-1], "\n")+1:])
	}
}

// TestLimitsLogStringsCut checks that every string a log line carries (message,
// attribute, error, group member, net/http's ErrorLog line) is cut to its limit,
// at a character boundary, in both log formats.
func TestLimitsLogStringsCut(t *testing.T) {
	t.Parallel()
	long := strings.Repeat("é", 5000) // 2 bytes each: a cut must not split one
	for _, format := range []string{"text", "json"} {
		t.Run(format, func(t *testing.T) {
			var buf bytes.Buffer
			logger := newLogger(format, &buf)
			logger.Info(long, "s", long, "n", 42)
			logger.Warn("error", "err", fmt.Errorf("wrapped: %w", errors.New(long)))
			logger.Info("group", slog.Group("request", "path", long))
			logger.With("with", long).Info("with")
			slog.NewLogLogger(logger.Handler(), slog.LevelWarn).Print("http: " + long) // the server's ErrorLog
			lines := strings.Split(strings.TrimSuffix(buf.String(), "\n"), "\n")
			if len(lines) != 5 {
				t.Fatalf("got %d log lines, want 5:\n%s", len(lines), buf.String())
			}
			for _, line := range lines {
				if !utf8.ValidString(line) {
					t.Errorf("a log line is not UTF-8: %.200q", line)
				}
				if max := maxLogMessage + maxLogValue + 256; len(line) > max {
					t.Errorf("a log line of %d bytes, want at most %d: %.200s", len(line), max, line)
				}
				if !strings.Contains(line, " more bytes)") {
					t.Errorf("a log line does not say that it was cut: %.200s", line)
				}
			}
			if !strings.Contains(lines[0], "42") {
				t.Errorf("a number attribute was lost: %.200s", lines[0])
			}
		})
	}
}

// normalizeCase is one case of testdata/normalize_cases.json, the table the
// server (TestNormalizeCases) and the web client (TestE2ENormalizeCases) are both
// checked against: Want is what content Input is stored as, or Refused is the
// message of the server's 422 for it.
type normalizeCase struct {
	Name    string  `json:"name"`
	Input   string  `json:"input"`
	Want    *string `json:"want"`
	Refused string  `json:"refused"`
}

func loadNormalizeCases(t *testing.T) []normalizeCase {
	t.Helper()
	b, err := os.ReadFile("testdata/normalize_cases.json")
	if err != nil {
		t.Fatal(err)
	}
	var cases []normalizeCase
	if err := json.Unmarshal(b, &cases); err != nil {
		t.Fatalf("testdata/normalize_cases.json: %v", err)
	}
	for _, tc := range cases {
		if (tc.Want == nil) == (tc.Refused == "") {
			t.Fatalf("case %q: want exactly one of want and refused", tc.Name)
		}
	}
	return cases
}

// TestNormalizeCases runs the shared table against the server's normalizeContent.
func TestNormalizeCases(t *testing.T) {
	t.Parallel()
	for _, tc := range loadNormalizeCases(t) {
		t.Run(tc.Name, func(t *testing.T) {
			got, err := normalizeContent(tc.Input)
			if tc.Refused != "" {
				var ae *apiError
				if !errors.As(err, &ae) || ae.kind != kindInvalid || ae.field != "content" || ae.msg != tc.Refused {
					t.Fatalf("normalizeContent(%q) = %q, %v; want a 422 %q", tc.Input, got, err, tc.Refused)
				}
				return
			}
			if err != nil || got != *tc.Want {
				t.Fatalf("normalizeContent(%q) = %q, %v; want %q", tc.Input, got, err, *tc.Want)
			}
		})
	}
}

// TestE2ENormalizeCases runs the shared table against the web client's
// normalize (web/normalize.js) in Chromium, as the server serves it. Where the
// server stores content, normalize must give the same; the client does not refuse
// anything, so for a refused case normalize must only not throw, give "" where
// the server finds nothing left, and more than 480 characters where it finds too
// many (control characters are left to the server).
func TestE2ENormalizeCases(t *testing.T) {
	cases := loadNormalizeCases(t)
	ts := newTestServer(t)
	b := newBrowser(t, ts, "normalize", desktop)
	b.do("open the web client", chromedp.Navigate(ts.URL+"/"))
	// The file's own text is the JavaScript expression, so that the page sees the
	// inputs exactly as written there (a lone surrogate stays one; decoded in Go
	// first, it would arrive as U+FFFD).
	js, err := os.ReadFile("testdata/normalize_cases.json")
	if err != nil {
		t.Fatal(err)
	}
	type result struct {
		Out   string `json:"out"`
		Same  bool   `json:"same"` // out === want, compared in the page (the way back turns lone surrogates to U+FFFD)
		Error string `json:"error"`
	}
	expr := `import('/normalize.js').then(({ normalize }) => (` + string(js) + `).map(({ input, want }) => {
		try { const out = normalize(input); return { out, same: out === want }; } catch (e) { return { error: String(e) }; }
	}))`
	ctx, cancel := context.WithTimeout(b.ctx, e2eWait)
	defer cancel()
	results, err := chromedp.Run(ctx, chromedp.Evaluate[[]result](expr, chromedp.EvalAwaitPromise))
	if err != nil {
		b.fail("run normalize in the page", err)
	}
	if len(results) != len(cases) {
		t.Fatalf("got %d results, want %d", len(results), len(cases))
	}
	tooLong := regexp.MustCompile(`^Message too long\. ` + strconv.Itoa(maxContentRunes) + ` max$`)
	for i, tc := range cases {
		got := results[i]
		switch {
		case got.Error != "":
			t.Errorf("%s: normalize(%q) threw %s", tc.Name, tc.Input, got.Error)
		case tc.Want != nil && (got.Out != *tc.Want || !got.Same):
			t.Errorf("%s: normalize(%q) = %q, want %q as the server stores it", tc.Name, tc.Input, got.Out, *tc.Want)
		case tc.Refused == "Content required" && got.Out != "":
			t.Errorf("%s: normalize(%q) = %q, want \"\" (the server finds nothing left)", tc.Name, tc.Input, got.Out)
		case tooLong.MatchString(tc.Refused) && utf8.RuneCountInString(got.Out) <= maxContentRunes:
			t.Errorf("%s: normalize(%q) has %d characters, want more than %d (the server refuses it as too long)",
				tc.Name, tc.Input, utf8.RuneCountInString(got.Out), maxContentRunes)
		}
	}
}

// TestLimitsRateLimitFirst checks that the send and conversation rate limits come
// before anything else a request costs: once a user is limited, a request with a
// body too large, malformed, of the wrong type or refused content, or to a
// conversation that does not exist, gets 429 (not 413, 400, 415, 422 or 404) and
// changes nothing; and, as documented, every attempt takes a token, whatever it
// is answered.
func TestLimitsRateLimitFirst(t *testing.T) {
	t.Parallel()
	// A database of its own: the test compares whole-table row counts, which
	// tests running beside it would change in the shared one.
	ts := newTestServer(t, "DATABASE_URL="+privateDatabase(t), "RATE_LIMIT_SENDS=1/h,3", "RATE_LIMIT_CONVERSATIONS=1/h,1")
	alice, bob := ts.newUser(t, "alice"), ts.newUser(t, "bob")
	conv := alice.startConversation(bob) // alice's one conversation token
	endpoint := "/api/conversations/" + conv.ID + "/messages"
	huge := []byte(`{"content":"` + strings.Repeat("x", 2*maxBodyBytes) + `"}`)
	type attempt struct {
		name   string
		path   string
		body   []byte
		header http.Header
		status int // answered before the limit is reached
	}
	tooLarge := attempt{"too large", endpoint, huge, jsonHeader(alice.Token), http.StatusRequestEntityTooLarge}
	malformed := attempt{"malformed", endpoint, []byte(`{"content":`), jsonHeader(alice.Token), http.StatusBadRequest}
	valid := attempt{"valid", endpoint, []byte(`{"content":"hi"}`), jsonHeader(alice.Token), http.StatusCreated}
	do := func(a attempt) rawResponse { return mustRaw(t, "POST", ts.URL+a.path, a.body, a.header) }

	// Three tokens: the failed attempts take theirs too.
	for _, a := range []attempt{tooLarge, malformed, valid} {
		if res := do(a); res.status != a.status {
			t.Fatalf("%s send within the burst: got %d %s, want %d", a.name, res.status, res.body, a.status)
		}
	}
	before := dbFingerprint(t, ts.DB)
	for _, a := range []attempt{
		valid, tooLarge, malformed,
		{"not JSON", endpoint, []byte(`content=hi`), http.Header{"Authorization": {"Bearer " + alice.Token}, "Content-Type": {"text/plain"}}, 0},
		{"refused content", endpoint, []byte(`{"content":"\u0007"}`), jsonHeader(alice.Token), 0},
		{"no such conversation", "/api/conversations/999999999/messages", valid.body, jsonHeader(alice.Token), 0},
		{"bad conversation id", "/api/conversations/x/messages", valid.body, jsonHeader(alice.Token), 0},
	} {
		res := do(a)
		if res.status != http.StatusTooManyRequests {
			t.Fatalf("%s send once limited: got %d %s, want 429", a.name, res.status, res.body)
		}
		if p := errorBodyProblem(res); p != "" || res.header.Get("Retry-After") == "" {
			t.Fatalf("%s send once limited: %s, Retry-After %q", a.name, p, res.header.Get("Retry-After"))
		}
	}
	if after := dbFingerprint(t, ts.DB); after != before {
		t.Fatalf("refused sends wrote to the database:\n got %s\nwant %s", after, before)
	}
	if res := mustRaw(t, "POST", ts.URL+endpoint, valid.body, jsonHeader(bob.Token)); res.status != http.StatusCreated {
		t.Fatalf("bob's send while alice is limited: got %d %s, want 201", res.status, res.body)
	}

	for _, body := range [][]byte{huge, []byte(`{"username":`), []byte(`{"username":"` + bob.User.Username + `"}`)} {
		res := mustRaw(t, "POST", ts.URL+"/api/conversations", body, jsonHeader(alice.Token))
		if res.status != http.StatusTooManyRequests {
			t.Fatalf("conversation start once limited (%.20s): got %d %s, want 429", body, res.status, res.body)
		}
	}
}

// BenchmarkNormalizeContent compares the content of a 16 KiB request body made of
// blank lines with that of a plain 16 KiB body (docs/limits.md, "Cost before
// checks"):
//
//	go test -run '^$' -bench NormalizeContent -benchmem .
func BenchmarkNormalizeContent(b *testing.B) {
	const body = maxBodyBytes - len(`{"content":""}`) // JSON bytes left for the content
	for _, bc := range []struct{ name, content string }{
		{"plain", strings.Repeat("word ", body/len("word "))},
		{"blank-lines", strings.Repeat("x\n\n", body/len(`x\n\n`))}, // \n is 2 bytes of JSON
	} {
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				normalizeContent(bc.content)
			}
		})
	}
}
