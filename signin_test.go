package main

// Tests of signing in: the OAuth state (no storage per start), the browser binding
// of a GitHub sign-in, client addresses behind trusted proxies, GitHub names that
// are taken, and the metrics listener.

import (
	"database/sql"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/cookiejar"
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

// claimSession claims the session of a GitHub sign-in with the code and nonce of
// the callback's fragment, as the web client does.
func claimSession(t testing.TB, ts *testServer, code, nonce string) rawResponse {
	t.Helper()
	body, _ := json.Marshal(map[string]string{"code": code, "nonce": nonce})
	return mustRaw(t, "POST", ts.URL+"/api/oauth/github/claim", body, jsonHeader(""))
}

// mustClaim claims the session of frag, the callback's fragment, and returns its
// token.
func mustClaim(t testing.TB, ts *testServer, frag url.Values) string {
	t.Helper()
	res := claimSession(t, ts, frag.Get("code"), frag.Get("nonce"))
	var auth authResponse
	if res.status != http.StatusOK || json.Unmarshal(res.body, &auth) != nil || auth.Token == "" {
		t.Fatalf("claim %v: got %d %s, want 200 with a token", frag, res.status, res.body)
	}
	return auth.Token
}

// newNonce returns a fresh client nonce, as the web client makes one.
func newNonce() string { return randomHex(16) }

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
		if res, state, _ := oauthStart(t, ts, "?nonce="+newNonce(), cookie); res.status != http.StatusFound || state == "" {
			t.Fatalf("start %d: got %d %s, want 302 with a state", i, res.status, res.body)
		}
	}
	if after := totalRows(t, ts.DB); after != before {
		t.Fatalf("got %d rows after 200 starts, want %d as before", after, before)
	}
}

// TestOAuthState: the callback takes only a state this server issued, before it
// expires, in the browser that started the sign-in, and sends any other to the web
// client's error page; it hands the client's nonce back with the claim code; and
// the start needs a nonce.
func TestOAuthState(t *testing.T) {
	t.Parallel()
	gh := newGitHub(t)
	key := strings.Repeat("s", 40)
	ts := newTestServer(t, append(gh.env(), "TOKEN_KEY="+key)...)
	ghID := time.Now().UnixNano() % 1e12
	code := gitHubCode(ghID, uniqueName("gh"))
	nonce, nonce2 := "n0nce-"+randomHex(8), newNonce()

	// A sign-in that works, carrying the client's nonce; the browser keeps its
	// cookie value across starts, so two tabs may sign in at once.
	_, state, browser := oauthStart(t, ts, "?nonce="+nonce, "")
	_, state2, browser2 := oauthStart(t, ts, "?nonce="+nonce2, browser)
	if browser == "" || browser2 != browser {
		t.Fatalf("got cookies %q then %q, want one value kept", browser, browser2)
	}
	res, frag := oauthCallback(t, ts, state, code, browser)
	if res.status != http.StatusFound || frag.Get("code") == "" || frag.Get("nonce") != nonce || frag.Has("token") {
		t.Fatalf("callback: got %d to %s, want 302 with a code and nonce %s", res.status, res.header.Get("Location"), nonce)
	}
	mustClaim(t, ts, frag)
	if res, frag := oauthCallback(t, ts, state2, code, browser); res.status != http.StatusFound || frag.Get("nonce") != nonce2 {
		t.Fatalf("second tab: got %d to %s, want 302 with nonce %s", res.status, res.header.Get("Location"), nonce2)
	}

	other := newOAuthStates([]byte(strings.Repeat("x", 40)))
	_, fresh, mine := oauthStart(t, ts, "?nonce="+newNonce(), "")
	_, _, theirs := oauthStart(t, ts, "?nonce="+newNonce(), "")
	for _, tc := range []struct{ name, state, cookie string }{
		{"another browser", fresh, theirs},
		{"no cookie", fresh, ""},
		{"a malformed cookie", fresh, mine + "x"},
		{"a MAC under another key", other.issue(mine, nonce, time.Now().Add(time.Minute)), mine},
		{"a changed nonce", strings.Replace(fresh, ".", ".A", 2), mine},
		{"an expired state", newOAuthStates([]byte(key)).issue(mine, nonce, time.Now().Add(-time.Second)), mine},
		{"no client nonce", newOAuthStates([]byte(key)).issue(mine, "", time.Now().Add(time.Minute)), mine},
		{"an empty state", "", mine},
		{"garbage", "a.b.c.d.e", mine},
	} {
		t.Run(tc.name, func(t *testing.T) {
			res, _ := oauthCallback(t, ts, tc.state, code, tc.cookie)
			if loc := res.header.Get("Location"); res.status != http.StatusFound || !strings.HasSuffix(loc, "/callback#error=sign_in_failed") {
				t.Fatalf("got %d to %q %s, want 302 to /callback#error=sign_in_failed", res.status, loc, res.body)
			}
		})
	}
	// The same state, signed with the right key and not yet expired, works.
	if res, frag := oauthCallback(t, ts, newOAuthStates([]byte(key)).issue(mine, nonce, time.Now().Add(time.Minute)), code, mine); res.status != http.StatusFound || frag.Get("code") == "" {
		t.Fatalf("valid state: got %d to %s, want 302 with a code", res.status, res.header.Get("Location"))
	}

	// A missing or malformed client nonce is refused at the start.
	for _, query := range []string{"", "?nonce=", "?nonce=short", "?nonce=" + strings.Repeat("a", 65), "?nonce=has.dot.in.it.abcdef", "?nonce=spaces%20are%20not%20ok"} {
		if res, _, _ := oauthStart(t, ts, query, ""); res.status != http.StatusBadRequest {
			t.Errorf("start%s: got %d, want 400", query, res.status)
		}
	}
}

// sessionRows counts the sessions of user, open or ended.
func sessionRows(t testing.TB, db *sql.DB, user int64) int {
	t.Helper()
	var n int
	if err := db.QueryRow(`SELECT count(*) FROM sessions WHERE user_id = $1`, user).Scan(&n); err != nil {
		t.Fatalf("count sessions: %v", err)
	}
	return n
}

// TestOAuthForcedSignIns: sign-ins another site forces on a browser (start and
// callback with the attacker's nonce, never claimed) start no session, so they
// cannot push the person's real sessions out nor add rows.
func TestOAuthForcedSignIns(t *testing.T) {
	t.Parallel()
	gh := newGitHub(t)
	ts := newTestServer(t, gh.env()...)
	id := 1e11 + time.Now().UnixNano()%1e11
	login := "forced" + randomHex(3)
	gh.signInAs(id, login)

	// The real sign-in, claimed by the tab that started it.
	_, state, browser := oauthStart(t, ts, "?nonce=realtabnonce_0123456", "")
	res, frag := oauthCallback(t, ts, state, gitHubCode(id, login), browser)
	if res.status != http.StatusFound {
		t.Fatalf("real sign-in: got %d %s, want 302", res.status, res.body)
	}
	real := &client{t: t, base: ts.URL, Token: mustClaim(t, ts, frag)}
	var me apiUser
	real.mustDo("GET", "/api/auth_user", nil, http.StatusOK, &me)
	userID, _ := strconv.ParseInt(me.ID, 10, 64)
	before := sessionRows(t, ts.DB, userID)

	for i := range 50 {
		_, state, _ := oauthStart(t, ts, "?nonce=attackernonce_012345", browser)
		if res, frag := oauthCallback(t, ts, state, gitHubCode(id, login), browser); res.status != http.StatusFound || frag.Get("code") == "" {
			t.Fatalf("forced sign-in %d: got %d to %s, want 302 with a code", i, res.status, res.header.Get("Location"))
		}
	}
	real.mustDo("GET", "/api/auth_user", nil, http.StatusOK, nil)
	if after := sessionRows(t, ts.DB, userID); after != before {
		t.Fatalf("got %d session rows after 50 forced sign-ins, want %d as before", after, before)
	}
}

// TestOAuthTwoTabs: two sign-ins started in two tabs of one browser (one cookie
// jar) both finish.
func TestOAuthTwoTabs(t *testing.T) {
	t.Parallel()
	gh := newGitHub(t)
	ts := newTestServer(t, gh.env()...)
	id := 1e11 + time.Now().UnixNano()%1e11
	code := gitHubCode(id, uniqueName("tabs"))
	jar, _ := cookiejar.New(nil)
	browser := &http.Client{Jar: jar, Timeout: 30 * time.Second,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	get := func(u string) *http.Response {
		t.Helper()
		resp, err := browser.Get(u)
		if err != nil {
			t.Fatalf("GET %s: %v", u, err)
		}
		resp.Body.Close()
		return resp
	}
	start := func(nonce string) string {
		t.Helper()
		resp := get(ts.URL + "/api/oauth/github?nonce=" + nonce)
		loc, err := url.Parse(resp.Header.Get("Location"))
		if resp.StatusCode != http.StatusFound || err != nil {
			t.Fatalf("start: got %d to %q", resp.StatusCode, resp.Header.Get("Location"))
		}
		return loc.Query().Get("state")
	}
	nonces := []string{newNonce(), newNonce()}
	states := []string{start(nonces[0]), start(nonces[1])}
	for i, state := range states {
		resp := get(ts.URL + "/api/oauth/github/callback?" + url.Values{"state": {state}, "code": {code}}.Encode())
		loc, _ := url.Parse(resp.Header.Get("Location"))
		var frag url.Values
		if loc != nil {
			frag, _ = url.ParseQuery(loc.Fragment)
		}
		if resp.StatusCode != http.StatusFound || frag.Get("code") == "" || frag.Get("nonce") != nonces[i] {
			t.Fatalf("tab %d: got %d to %q, want 302 with a code and its nonce", i+1, resp.StatusCode, resp.Header.Get("Location"))
		}
		(&client{t: t, base: ts.URL, Token: mustClaim(t, ts, frag)}).mustDo("GET", "/api/auth_user", nil, http.StatusOK, nil)
	}
}

// TestOAuthClaim: a claim code is worth a session only with the nonce it was
// issued for, under this server's key, before it expires; anything else is 400
// and starts nothing. Claims count against the sign-in limit.
func TestOAuthClaim(t *testing.T) {
	t.Parallel()
	gh := newGitHub(t)
	key := strings.Repeat("c", 40)
	ts := newTestServer(t, append(gh.env(), "TOKEN_KEY="+key)...)
	id := 1e11 + time.Now().UnixNano()%1e11
	nonce := newNonce()
	_, state, browser := oauthStart(t, ts, "?nonce="+nonce, "")
	_, frag := oauthCallback(t, ts, state, gitHubCode(id, uniqueName("claim")), browser)
	code := frag.Get("code")
	userID, _ := strconv.ParseInt(strings.Split(code, ".")[0], 10, 64)
	if userID <= 0 || sessionRows(t, ts.DB, userID) != 0 {
		t.Fatalf("callback: got code %q and %d sessions, want a code for a user without sessions", code, sessionRows(t, ts.DB, userID))
	}
	mine := newOAuthClaims([]byte(key))
	for _, tc := range []struct{ name, code, nonce string }{
		{"a wrong nonce", code, newNonce()},
		{"no nonce", code, ""},
		{"no code", "", nonce},
		{"another user", strings.Replace(code, strconv.FormatInt(userID, 10), strconv.FormatInt(userID+1, 10), 1), nonce},
		{"a MAC under another key", newOAuthClaims([]byte(strings.Repeat("x", 40))).issue(userID, nonce, time.Now().Add(time.Minute)), nonce},
		{"a MAC for a state", newOAuthStates([]byte(key)).issue(browser, nonce, time.Now().Add(time.Minute)), nonce},
		{"an expired code", mine.issue(userID, nonce, time.Now().Add(-time.Second)), nonce},
		{"garbage", "a.b.c", nonce},
		{"a long code", strings.Repeat("1", 200) + code, nonce},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if res := claimSession(t, ts, tc.code, tc.nonce); res.status != http.StatusBadRequest || strings.Contains(string(res.body), "token") {
				t.Fatalf("got %d %s, want 400", res.status, res.body)
			}
		})
	}
	if n := sessionRows(t, ts.DB, userID); n != 0 {
		t.Fatalf("got %d sessions after refused claims, want 0", n)
	}
	// The real code, with its nonce, starts one session.
	mustClaim(t, ts, frag)
	if n := sessionRows(t, ts.DB, userID); n != 1 {
		t.Fatalf("got %d sessions after the claim, want 1", n)
	}

	// Claims count against the sign-in limit of the client's address.
	limited := newTestServer(t, append(gh.env(), "RATE_LIMIT_LOGINS=1/h,2")...)
	var got []int
	for range 3 {
		got = append(got, claimSession(t, limited, "a.b.c", nonce).status)
	}
	if fmt.Sprint(got) != "[400 400 429]" {
		t.Fatalf("three claims under RATE_LIMIT_LOGINS=1/h,2: got %v, want [400 400 429]", got)
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
		_, state, browser := oauthStart(t, ts, "?nonce="+newNonce(), "")
		res, frag := oauthCallback(t, ts, state, gitHubCode(id, login), browser)
		if res.status != http.StatusFound {
			t.Fatalf("sign in as %s: got %d %s, want 302", login, res.status, res.body)
		}
		var u apiUser
		(&client{t: t, base: ts.URL, Token: mustClaim(t, ts, frag)}).mustDo("GET", "/api/auth_user", nil, http.StatusOK, &u)
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
		res, err := rawDo("GET", ts.URL+"/api/oauth/github?nonce=benchmark-nonce-0123", nil, nil)
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
