package main

// Tests of signing in: the OAuth state (no storage per start), the browser binding
// of a GitHub sign-in, client addresses behind trusted proxies, GitHub names that
// are taken, and the metrics listener.

import (
	"database/sql"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// totalRows counts the rows of every table of the public schema, whatever the
// schema holds, so that a test can tell whether a request wrote anything.
func totalRows(t testing.TB, db *sql.DB) int64 {
	t.Helper()
	var n int64
	err := db.QueryRow(`SELECT coalesce(sum((xpath('/row/c/text()',
		query_to_xml(format('SELECT count(*) AS c FROM %I.%I', schemaname, tablename), false, true, '')))[1]::text::bigint), 0)
		FROM pg_tables WHERE schemaname = 'public'`).Scan(&n)
	if err != nil {
		t.Fatalf("count rows: %v", err)
	}
	return n
}

// gitHub is a fake GitHub whose codes name the account they sign in: the code
// "<id>:<login>" is exchanged for an access token of the same text, and GET /user
// with that token answers that account. Its authorize page sends the browser
// straight back to the redirect_uri with the code of the account set by signInAs.
type gitHub struct {
	*httptest.Server

	mu sync.Mutex // guards as
	as string     // the code the authorize page hands out
}

func newGitHub(t testing.TB) *gitHub {
	gh := &gitHub{}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /login/oauth/authorize", func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		gh.mu.Lock()
		code := gh.as
		gh.mu.Unlock()
		dest := q.Get("redirect_uri") + "?" + url.Values{"code": {code}, "state": {q.Get("state")}}.Encode()
		http.Redirect(w, r, dest, http.StatusFound)
	})
	mux.HandleFunc("POST /login/oauth/access_token", func(w http.ResponseWriter, r *http.Request) {
		r.ParseForm()
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(map[string]string{"access_token": r.Form.Get("code"), "token_type": "bearer"})
	})
	mux.HandleFunc("GET /user", func(w http.ResponseWriter, r *http.Request) {
		id, login, ok := strings.Cut(strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer "), ":")
		if !ok {
			http.Error(w, "unauthorized", http.StatusUnauthorized)
			return
		}
		fmt.Fprintf(w, `{"id":%s,"login":%q,"avatar_url":"https://avatars.example/u/%s"}`, id, login, id)
	})
	gh.Server = httptest.NewServer(mux)
	t.Cleanup(gh.Close)
	return gh
}

// signInAs makes the authorize page sign in as the GitHub account id, login.
func (gh *gitHub) signInAs(id int64, login string) {
	gh.mu.Lock()
	defer gh.mu.Unlock()
	gh.as = gitHubCode(id, login)
}

func gitHubCode(id int64, login string) string { return strconv.FormatInt(id, 10) + ":" + login }

// env is the configuration that makes a server sign in with gh.
func (gh *gitHub) env() []string {
	return []string{"GITHUB_CLIENT_ID=cid", "GITHUB_CLIENT_SECRET=secret", "GITHUB_WEB_URL=" + gh.URL, "GITHUB_API_URL=" + gh.URL}
}

// oauthStart starts a GitHub sign-in as a browser holding cookie (none if empty)
// would; it returns the response, the state sent to GitHub and the cookie value.
func oauthStart(t testing.TB, ts *testServer, query, cookie string) (res rawResponse, state, browser string) {
	t.Helper()
	h := http.Header{}
	if cookie != "" {
		h.Set("Cookie", stateCookie+"="+cookie)
	}
	res = mustRaw(t, "GET", ts.URL+"/api/oauth/github"+query, nil, h)
	if res.status != http.StatusFound {
		return res, "", ""
	}
	loc, err := url.Parse(res.header.Get("Location"))
	if err != nil {
		t.Fatalf("start: redirect %q: %v", res.header.Get("Location"), err)
	}
	for _, c := range (&http.Response{Header: res.header}).Cookies() {
		if c.Name == stateCookie {
			browser = c.Value
		}
	}
	return res, loc.Query().Get("state"), browser
}

// oauthCallback comes back from GitHub with state and code as a browser holding
// cookie (none if empty) would, and returns the response and the fragment of
// where it redirects.
func oauthCallback(t testing.TB, ts *testServer, state, code, cookie string) (rawResponse, url.Values) {
	t.Helper()
	h := http.Header{}
	if cookie != "" {
		h.Set("Cookie", stateCookie+"="+cookie)
	}
	res := mustRaw(t, "GET", ts.URL+"/api/oauth/github/callback?"+url.Values{"state": {state}, "code": {code}}.Encode(), nil, h)
	loc, _ := url.Parse(res.header.Get("Location"))
	var frag url.Values
	if loc != nil {
		frag, _ = url.ParseQuery(loc.Fragment)
	}
	return res, frag
}

// TestOAuthStartStoresNothing: starting sign-ins writes no row, however many.
func TestOAuthStartStoresNothing(t *testing.T) {
	t.Parallel()
	gh := newGitHub(t)
	ts := newTestServer(t, append(gh.env(), "DATABASE_URL="+privateDatabase(t))...)
	before := totalRows(t, ts.DB)
	for i := range 200 {
		cookie := ""
		if i%2 == 1 {
			cookie = newBrowserValue()
		}
		if res, state, _ := oauthStart(t, ts, "", cookie); res.status != http.StatusFound || state == "" {
			t.Fatalf("start %d: got %d %s, want 302 with a state", i, res.status, res.body)
		}
	}
	if after := totalRows(t, ts.DB); after != before {
		t.Fatalf("got %d rows after 200 starts, want %d as before", after, before)
	}
}

// TestOAuthState: the callback takes only a state this server issued, before it
// expires, in the browser that started the sign-in; and it hands the client's
// nonce back with the token.
func TestOAuthState(t *testing.T) {
	t.Parallel()
	gh := newGitHub(t)
	key := strings.Repeat("s", 40)
	ts := newTestServer(t, append(gh.env(), "TOKEN_KEY="+key)...)
	ghID := time.Now().UnixNano() % 1e12
	code := gitHubCode(ghID, uniqueName("gh"))
	nonce := "n0nce-" + randomHex(8)

	// A sign-in that works, carrying the client's nonce; the browser keeps its
	// cookie value across starts, so two tabs may sign in at once.
	_, state, browser := oauthStart(t, ts, "?nonce="+nonce, "")
	_, state2, browser2 := oauthStart(t, ts, "", browser)
	if browser == "" || browser2 != browser {
		t.Fatalf("got cookies %q then %q, want one value kept", browser, browser2)
	}
	res, frag := oauthCallback(t, ts, state, code, browser)
	if res.status != http.StatusFound || frag.Get("token") == "" || frag.Get("nonce") != nonce {
		t.Fatalf("callback: got %d to %s, want 302 with a token and nonce %s", res.status, res.header.Get("Location"), nonce)
	}
	if res, frag := oauthCallback(t, ts, state2, code, browser); res.status != http.StatusFound || frag.Has("nonce") {
		t.Fatalf("second tab: got %d to %s, want 302 without a nonce", res.status, res.header.Get("Location"))
	}

	other := newOAuthStates([]byte(strings.Repeat("x", 40)))
	_, fresh, mine := oauthStart(t, ts, "", "")
	_, _, theirs := oauthStart(t, ts, "", "")
	for _, tc := range []struct{ name, state, cookie string }{
		{"another browser", fresh, theirs},
		{"no cookie", fresh, ""},
		{"a malformed cookie", fresh, mine + "x"},
		{"a MAC under another key", other.issue(mine, "", time.Now().Add(time.Minute)), mine},
		{"a changed nonce", strings.Replace(fresh, ".", ".A", 2), mine},
		{"an expired state", newOAuthStates([]byte(key)).issue(mine, "", time.Now().Add(-time.Second)), mine},
		{"an empty state", "", mine},
		{"garbage", "a.b.c.d.e", mine},
	} {
		t.Run(tc.name, func(t *testing.T) {
			res, frag := oauthCallback(t, ts, tc.state, code, tc.cookie)
			if res.status != http.StatusBadRequest || frag.Has("token") {
				t.Fatalf("got %d %s, want 400", res.status, res.body)
			}
		})
	}
	// The same state, signed with the right key and not yet expired, works.
	if res, _ := oauthCallback(t, ts, newOAuthStates([]byte(key)).issue(mine, "", time.Now().Add(time.Minute)), code, mine); res.status != http.StatusFound {
		t.Fatalf("valid state: got %d %s, want 302", res.status, res.body)
	}

	// A malformed client nonce is refused at the start.
	for _, bad := range []string{"short", strings.Repeat("a", 65), "has.dot.in.it.abcdef", "spaces%20are%20not%20ok"} {
		if res, _, _ := oauthStart(t, ts, "?nonce="+bad, ""); res.status != http.StatusBadRequest {
			t.Errorf("nonce %q: got %d, want 400", bad, res.status)
		}
	}
}

// TestGitHubNameTaken: a person whose GitHub login, and login-id, belong to other
// accounts still signs in, under a name chosen the same way each time.
func TestGitHubNameTaken(t *testing.T) {
	t.Parallel()
	gh := newGitHub(t)
	ts := newTestServer(t, gh.env()...)
	signIn := func(id int64, login string) apiUser {
		t.Helper()
		_, state, browser := oauthStart(t, ts, "", "")
		res, frag := oauthCallback(t, ts, state, gitHubCode(id, login), browser)
		if res.status != http.StatusFound {
			t.Fatalf("sign in as %s: got %d %s, want 302", login, res.status, res.body)
		}
		var u apiUser
		(&client{t: t, base: ts.URL, Token: frag.Get("token")}).mustDo("GET", "/api/auth_user", nil, http.StatusOK, &u)
		return u
	}
	id := 1e11 + time.Now().UnixNano()%1e11 // 12 digits: "-<id>" is 13 characters
	long := "L" + randomHex(19)             // 39 characters
	for _, tc := range []struct {
		login string
		taken []string
		want  string
	}{
		{"o" + randomHex(4), []string{"{login}", "{login}-{id}"}, "{login}-{id}-2"},
		{"o" + randomHex(4), []string{"{login}", "{login}-{id}", "{login}-{id}-2", "{login}-{id}-3"}, "{login}-{id}-4"},
		{long, []string{long, long[:39-13] + "-{id}", long[:39-15] + "-{id}-2"}, long[:39-15] + "-{id}-3"},
	} {
		id++
		name := func(s string) string {
			return strings.NewReplacer("{login}", tc.login, "{id}", strconv.FormatInt(id, 10)).Replace(s)
		}
		for _, taken := range tc.taken {
			ts.login(t, name(taken))
		}
		u := signIn(id, tc.login)
		if want := name(tc.want); u.Username != want {
			t.Fatalf("login %s with %v taken: got %q, want %q", tc.login, tc.taken, u.Username, want)
		}
		if again := signIn(id, tc.login); again.ID != u.ID || again.Username != u.Username {
			t.Fatalf("second sign-in: got %+v, want %+v", again, u)
		}
	}
}

// BenchmarkOAuthStart measures GET /api/oauth/github from one client, one request
// at a time, and reports the rows each start leaves in the database.
//
//	go test -run '^$' -bench BenchmarkOAuthStart -benchtime 5000x .
func BenchmarkOAuthStart(b *testing.B) {
	gh := newGitHub(b)
	ts := newTestServer(b, append(gh.env(), "DATABASE_URL="+privateDatabase(b), "LOG_FORMAT=json")...)
	before := totalRows(b, ts.DB)
	start := time.Now()
	b.ResetTimer()
	for range b.N {
		res, err := rawDo("GET", ts.URL+"/api/oauth/github", nil, nil)
		if err != nil || res.status != http.StatusFound {
			b.Fatalf("start: %v %d", err, res.status)
		}
	}
	b.StopTimer()
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "starts/s")
	b.ReportMetric(float64(totalRows(b, ts.DB)-before)/float64(b.N), "rows/start")
}

// requestClient sends GET /api/probe/<n> with header and returns the client
// address the server's request log names for it.
func requestClient(t *testing.T, ts *testServer, n int, header http.Header) string {
	t.Helper()
	path := "/api/probe/" + strconv.Itoa(n)
	mustRaw(t, "GET", ts.URL+path, nil, header)
	re := regexp.MustCompile(`path=` + regexp.QuoteMeta(path) + ` .*client="?([^"\s]+)`)
	var got string
	waitFor(t, 10*time.Second, "the log line of "+path, func() bool {
		m := re.FindStringSubmatch(ts.logs.String())
		if m != nil {
			got = m[1]
		}
		return m != nil
	})
	return got
}

// TestTrustedProxies: behind a trusted proxy the client is the rightmost
// forwarded address that is not a trusted proxy, for the sign-in limit and the
// log; from any other peer the same headers change nothing.
func TestTrustedProxies(t *testing.T) {
	t.Parallel()
	h := func(kv ...string) http.Header {
		hdr := http.Header{}
		for i := 0; i < len(kv); i += 2 {
			hdr.Add(kv[i], kv[i+1])
		}
		return hdr
	}
	const xff, fwd = "X-Forwarded-For", "Forwarded"
	trusted := newTestServer(t, "TRUSTED_PROXIES=127.0.0.1/32, 10.0.0.0/8 ,::1")
	for i, tc := range []struct {
		name   string
		header http.Header
		want   string
	}{
		{"no header", h(), "127.0.0.1"},
		{"one address", h(xff, "198.51.100.7"), "198.51.100.7"},
		{"a spoofed address left of the client", h(xff, "203.0.113.9, 198.51.100.7"), "198.51.100.7"},
		{"a trusted hop right of the client", h(xff, "203.0.113.9,198.51.100.7, 10.1.2.3"), "198.51.100.7"},
		{"two header lines", h(xff, "203.0.113.9", xff, "198.51.100.7, 10.0.0.2"), "198.51.100.7"},
		{"only trusted hops", h(xff, "10.0.0.5, 10.0.0.6"), "10.0.0.5"},
		{"IPv6", h(xff, "2001:db8::1"), "2001:db8::1"},
		{"IPv6 with a port", h(xff, "[2001:db8::1]:4711"), "2001:db8::1"},
		{"IPv4 with a port", h(xff, "198.51.100.7:4711"), "198.51.100.7"},
		{"IPv4-mapped IPv6", h(xff, "::ffff:198.51.100.7"), "198.51.100.7"},
		{"IPv6 with a zone", h(xff, "fe80::1%eth0"), "fe80::1"},
		{"garbage beyond the client", h(xff, "garbage, 198.51.100.7"), "198.51.100.7"},
		{"Forwarded", h(fwd, "for=198.51.100.7;proto=https"), "198.51.100.7"},
		{"Forwarded, quoted IPv6 with a port", h(fwd, `for="[2001:db8:cafe::17]:4711"`), "2001:db8:cafe::17"},
		{"Forwarded, several elements", h(fwd, `for=203.0.113.9, For="198.51.100.7";by=10.0.0.1, for=10.0.0.1`), "198.51.100.7"},
		{"Forwarded, a quoted comma", h(fwd, `for=198.51.100.7;x="a,b"`), "198.51.100.7"},
		{"X-Forwarded-For over Forwarded", h(fwd, "for=203.0.113.9", xff, "198.51.100.7"), "198.51.100.7"},
		// A header that cannot be read up to the client leaves the peer.
		{"malformed", h(xff, "not-an-address"), "127.0.0.1"},
		{"malformed right of the client", h(xff, "198.51.100.7, garbage"), "127.0.0.1"},
		{"empty", h(xff, ""), "127.0.0.1"},
		{"empty entry", h(xff, "198.51.100.7,,"), "127.0.0.1"},
		{"a CIDR", h(xff, "198.51.100.0/24"), "127.0.0.1"},
		{"Forwarded, unknown", h(fwd, "for=unknown"), "127.0.0.1"},
		{"Forwarded, obfuscated", h(fwd, `for="_hidden"`), "127.0.0.1"},
		{"Forwarded without for", h(fwd, "proto=https;by=10.0.0.1"), "127.0.0.1"},
		{"Forwarded, unterminated quote", h(fwd, `for="198.51.100.7`), "127.0.0.1"},
		{"long", h(xff, strings.Repeat("garbage, ", 2000)+"198.51.100.7"), "198.51.100.7"},
	} {
		if got := requestClient(t, trusted, i, tc.header); got != tc.want {
			t.Errorf("trusted peer, %s: got client %s, want %s", tc.name, got, tc.want)
		}
	}

	// The same headers from a peer that is not trusted change nothing.
	untrusted := newTestServer(t, "TRUSTED_PROXIES=10.0.0.0/8")
	plain := newTestServer(t)
	for i, hdr := range []http.Header{h(xff, "198.51.100.7"), h(fwd, "for=198.51.100.7"), h(xff, "10.0.0.1")} {
		for _, ts := range []*testServer{untrusted, plain} {
			if got := requestClient(t, ts, i, hdr); got != "127.0.0.1" {
				t.Errorf("untrusted peer, %v: got client %s, want 127.0.0.1", hdr, got)
			}
		}
	}

	// The sign-in limit: per forwarded client behind a trusted proxy, shared by the
	// peer otherwise. Two sign-ins per client, then none for an hour.
	login := func(ts *testServer, forwardedFor string) int {
		return mustRaw(t, "POST", ts.URL+"/api/login", []byte(`{"username":"`+uniqueName("p")+`"}`),
			jsonHeader("", "X-Forwarded-For: "+forwardedFor)).status
	}
	for _, tc := range []struct {
		name    string
		proxies string
		want    []int // for clients .1, .1, .1, .2
	}{
		{"trusted", "127.0.0.1/32", []int{200, 200, 429, 200}},
		{"untrusted", "10.0.0.0/8", []int{200, 200, 429, 429}},
	} {
		ts := newTestServer(t, "DATABASE_URL="+privateDatabase(t), "RATE_LIMIT_LOGINS=1/h,2", "TRUSTED_PROXIES="+tc.proxies)
		var got []int
		for _, client := range []string{"198.51.100.1", "198.51.100.1", "198.51.100.1", "198.51.100.2"} {
			got = append(got, login(ts, client))
		}
		if fmt.Sprint(got) != fmt.Sprint(tc.want) {
			t.Errorf("%s proxy: got statuses %v, want %v", tc.name, got, tc.want)
		}
	}

	if _, err := loadConfig(func(k string) string {
		return map[string]string{"DEV_LOGIN": "true", "TRUSTED_PROXIES": "10.0.0.0/8,10.0.0.300"}[k]
	}); err == nil || !strings.Contains(err.Error(), "TRUSTED_PROXIES") {
		t.Errorf("TRUSTED_PROXIES with a bad entry: got %v, want an error naming it", err)
	}
}

// TestMetricsAddr: with METRICS_ADDR, /metrics is served there and not on the
// public listener, and its listener starts and stops with the server.
func TestMetricsAddr(t *testing.T) {
	t.Parallel()
	addr := "127.0.0.1:" + strconv.Itoa(freePort(t))
	ts := newTestServer(t, "METRICS_ADDR="+addr)
	private := func() (rawResponse, error) { return rawDo("GET", "http://"+addr+"/metrics", nil, nil) }

	res, err := private()
	if err != nil || res.status != http.StatusOK || !strings.Contains(string(res.body), "messenger_streams_open") {
		t.Fatalf("GET /metrics on METRICS_ADDR: got %d, %v, want 200 with the metrics", res.status, err)
	}
	if res := mustRaw(t, "GET", ts.URL+"/metrics", nil, nil); res.status != http.StatusNotFound || strings.Contains(string(res.body), "messenger_") {
		t.Fatalf("GET /metrics on the public listener: got %d %.100s, want 404", res.status, res.body)
	}
	// Only /metrics is on the private listener.
	if other, err := rawDo("GET", "http://"+addr+"/healthz/other", nil, nil); err != nil || other.status != http.StatusNotFound {
		t.Fatalf("GET /healthz/other on METRICS_ADDR: got %d, %v, want 404", other.status, err)
	}

	// It stops with the server, freeing its port, and comes back with it.
	if err := ts.stop(t); err != nil {
		t.Fatalf("stop: %v", err)
	}
	if _, err := private(); err == nil {
		t.Fatal("METRICS_ADDR still answers after the server stopped")
	}
	ts.start(t)
	if res, err := private(); err != nil || res.status != http.StatusOK {
		t.Fatalf("GET /metrics after a restart: got %d, %v, want 200", res.status, err)
	}

	// Unset, /metrics stays on the public listener.
	plain := newTestServer(t)
	if res := mustRaw(t, "GET", plain.URL+"/metrics", nil, nil); res.status != http.StatusOK || !strings.Contains(string(res.body), "messenger_streams_open") {
		t.Fatalf("GET /metrics without METRICS_ADDR: got %d, want 200 with the metrics", res.status)
	}
	if _, err := loadConfig(func(k string) string {
		return map[string]string{"DEV_LOGIN": "true", "METRICS_ADDR": "9090"}[k]
	}); err == nil || !strings.Contains(err.Error(), "METRICS_ADDR") {
		t.Errorf("METRICS_ADDR without a host: got %v, want an error naming it", err)
	}
}
