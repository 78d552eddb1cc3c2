package main

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestLogin(t *testing.T) {
	t.Parallel()
	ts := newTestServer(t)
	name := uniqueName("Jane")
	c := ts.login(t, name)
	if c.User.Username != name || c.User.ID == 0 || c.User.AvatarURL != nil {
		t.Fatalf("got user %+v, want %q without avatar", c.User, name)
	}
	// The same name, in another case, is the same user.
	again := ts.login(t, strings.ToLower(name))
	if again.User.ID != c.User.ID {
		t.Fatalf("got user id %d, want %d", again.User.ID, c.User.ID)
	}

	var resp map[string]any
	c.mustDo("POST", "/api/login", map[string]string{"username": uniqueName("x")}, http.StatusOK, &resp)
	exp, err := time.Parse(time.RFC3339, resp["expiresAt"].(string))
	if err != nil {
		t.Fatalf("expiresAt %v: %v", resp["expiresAt"], err)
	}
	if d := time.Until(exp); d < 13*24*time.Hour || d > 14*24*time.Hour+time.Minute {
		t.Fatalf("got expiry in %v, want 14 days", d)
	}

	anon := &client{t: t, base: ts.URL}
	for _, tc := range []struct {
		name string
		body any
		want int
	}{
		{"empty", map[string]string{"username": ""}, http.StatusUnprocessableEntity},
		{"too long", map[string]string{"username": strings.Repeat("a", 40)}, http.StatusUnprocessableEntity},
		{"bad characters", map[string]string{"username": "jane doe"}, http.StatusUnprocessableEntity},
		{"wrong type", `{"username": 5}`, http.StatusBadRequest},
		{"malformed", `{"username":`, http.StatusBadRequest},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, b := anon.do("POST", "/api/login", tc.body)
			if resp.StatusCode != tc.want {
				t.Fatalf("got %d %s, want %d", resp.StatusCode, b, tc.want)
			}
			var e struct{ Error string }
			if json.Unmarshal(b, &e) != nil || e.Error == "" {
				t.Fatalf("got body %s, want a JSON error", b)
			}
		})
	}

	// With development sign-in off the route does not exist.
	prod := newTestServer(t, "DEV_LOGIN=false", "TOKEN_KEY="+strings.Repeat("k", 32))
	anon.base = prod.URL
	anon.mustDo("POST", "/api/login", map[string]string{"username": "jane"}, http.StatusNotFound, nil)
}

func TestAuthUserAndRefresh(t *testing.T) {
	t.Parallel()
	ts := newTestServer(t)
	c := ts.newUser(t, "a")
	var u apiUser
	c.mustDo("GET", "/api/auth_user", nil, http.StatusOK, &u)
	if u.ID != fmt.Sprint(c.User.ID) || u.Username != c.User.Username {
		t.Fatalf("got %+v, want %+v", u, c.User)
	}
	var tok struct {
		Token     string
		ExpiresAt time.Time
	}
	c.mustDo("POST", "/api/refresh_token", nil, http.StatusOK, &tok)
	if tok.Token == "" || time.Until(tok.ExpiresAt) < 13*24*time.Hour {
		t.Fatalf("got %+v, want a token valid for 14 days", tok)
	}
	fresh := *c
	fresh.Token = tok.Token
	fresh.mustDo("GET", "/api/auth_user", nil, http.StatusOK, nil)

	for _, tc := range []struct{ name, header string }{
		{"missing", ""},
		{"not bearer", "Basic abc"},
		{"garbage", "Bearer garbage"},
		{"tampered", "Bearer " + c.Token[:len(c.Token)-2] + "xx"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			anon := &client{t: t, base: ts.URL}
			var headers []string
			if tc.header != "" {
				headers = append(headers, "Authorization: "+tc.header)
			}
			anon.mustDo("GET", "/api/auth_user", nil, http.StatusUnauthorized, nil, headers...)
		})
	}
	// A token for another server's key is forged, as far as this one knows.
	other := newTestServer(t, "DEV_LOGIN=true", "TOKEN_KEY="+strings.Repeat("z", 32))
	c.as(other).mustDo("GET", "/api/auth_user", nil, http.StatusUnauthorized, nil)

	// An expired token is refused.
	short := newTestServer(t, "TOKEN_TTL=1s")
	sc := short.newUser(t, "short")
	time.Sleep(1100 * time.Millisecond) // the token's whole life; nothing to wait on
	var e struct{ Error string }
	sc.mustDo("GET", "/api/auth_user", nil, http.StatusUnauthorized, &e)
	if e.Error != "token expired" {
		t.Fatalf("got error %q, want token expired", e.Error)
	}
}

func TestUsernames(t *testing.T) {
	t.Parallel()
	ts := newTestServer(t)
	prefix := "zq" + randomHex(3)
	me := ts.login(t, prefix+"_me")
	for _, n := range []string{"b", "A", "c", "d", "e", "f"} {
		ts.login(t, prefix+n)
	}
	var names []string
	me.mustDo("GET", "/api/usernames?search="+strings.ToUpper(prefix), nil, http.StatusOK, &names)
	want := []string{prefix + "A", prefix + "b", prefix + "c", prefix + "d", prefix + "e"}
	if fmt.Sprint(names) != fmt.Sprint(want) {
		t.Fatalf("got %v, want %v", names, want)
	}
	me.mustDo("GET", "/api/usernames?search="+prefix+"_m", nil, http.StatusOK, &names)
	if len(names) != 0 {
		t.Fatalf("got %v, want nothing (never the caller)", names)
	}
	me.mustDo("GET", "/api/usernames?search=%25", nil, http.StatusOK, &names)
	if len(names) != 0 {
		t.Fatalf("got %v for %%, want nothing", names)
	}
}

func TestConversations(t *testing.T) {
	t.Parallel()
	ts := newTestServer(t)
	alice, bob := ts.newUser(t, "alice"), ts.newUser(t, "bob")

	var conv apiConversation
	alice.mustDo("POST", "/api/conversations", map[string]string{"username": bob.User.Username}, http.StatusCreated, &conv)
	if conv.OtherParticipant.Username != bob.User.Username || conv.LastMessage != nil || conv.HasUnreadMessages || conv.UnreadCount != 0 {
		t.Fatalf("got %+v", conv)
	}
	var again apiConversation
	bob.mustDo("POST", "/api/conversations", map[string]string{"username": alice.User.Username}, http.StatusOK, &again)
	if again.ID != conv.ID || again.OtherParticipant.Username != alice.User.Username {
		t.Fatalf("got %+v, want conversation %s with alice", again, conv.ID)
	}
	alice.mustDo("POST", "/api/conversations", map[string]string{"username": "nobody_" + randomHex(4)}, http.StatusNotFound, nil)
	alice.mustDo("POST", "/api/conversations", map[string]string{"username": alice.User.Username}, http.StatusForbidden, nil)

	var got apiConversation
	bob.mustDo("GET", "/api/conversations/"+conv.ID, nil, http.StatusOK, &got)
	if got.ID != conv.ID || got.OtherParticipant.Username != alice.User.Username {
		t.Fatalf("got %+v", got)
	}
	var other apiUser
	bob.mustDo("GET", "/api/conversations/"+conv.ID+"/other_participant", nil, http.StatusOK, &other)
	if other.Username != alice.User.Username {
		t.Fatalf("got %+v, want alice", other)
	}

	// Messages update the list: last message, unread counts, order.
	m1 := alice.send(conv.ID, "one")
	alice.send(conv.ID, "two")
	var list []apiConversation
	bob.mustDo("GET", "/api/conversations", nil, http.StatusOK, &list)
	if len(list) != 1 || list[0].LastMessage == nil || list[0].LastMessage.Content != "two" || list[0].LastMessage.Mine ||
		!list[0].HasUnreadMessages || list[0].UnreadCount != 2 {
		t.Fatalf("got %+v, want one conversation with 2 unread, last 'two'", list)
	}
	alice.mustDo("GET", "/api/conversations", nil, http.StatusOK, &list)
	if list[0].UnreadCount != 0 || !list[0].LastMessage.Mine {
		t.Fatalf("got %+v, want alice's view: nothing unread, last message mine", list[0])
	}

	// Listing messages does not mark them read; read_messages does.
	var msgs []apiMessage
	bob.mustDo("GET", "/api/conversations/"+conv.ID+"/messages", nil, http.StatusOK, &msgs)
	if len(msgs) != 2 || msgs[0].Content != "two" || msgs[1].ID != m1.ID || msgs[0].Mine {
		t.Fatalf("got %+v, want two, one (newest first)", msgs)
	}
	bob.mustDo("GET", "/api/conversations/"+conv.ID, nil, http.StatusOK, &got)
	if got.UnreadCount != 2 {
		t.Fatalf("got unread %d after listing, want 2", got.UnreadCount)
	}
	bob.mustDo("POST", "/api/conversations/"+conv.ID+"/read_messages", nil, http.StatusNoContent, nil)
	bob.mustDo("GET", "/api/conversations/"+conv.ID, nil, http.StatusOK, &got)
	if got.UnreadCount != 0 || got.HasUnreadMessages {
		t.Fatalf("got %+v after read_messages, want nothing unread", got)
	}

	// Outsiders see nothing of it: 404 on the conversation and every sub-path.
	eve := ts.newUser(t, "eve")
	for _, tc := range []struct{ method, path string }{
		{"GET", "/api/conversations/" + conv.ID},
		{"GET", "/api/conversations/" + conv.ID + "/other_participant"},
		{"GET", "/api/conversations/" + conv.ID + "/messages"},
		{"POST", "/api/conversations/" + conv.ID + "/messages"},
		{"POST", "/api/conversations/" + conv.ID + "/read_messages"},
		{"POST", "/api/conversations/" + conv.ID + "/typing"},
		{"GET", "/api/conversations/999999999"},
		{"GET", "/api/conversations/abc"},
		{"GET", "/api/conversations/-1/messages"},
	} {
		var body any
		if tc.method == "POST" {
			body = map[string]string{"content": "hi"}
		}
		resp, b := eve.do(tc.method, tc.path, body)
		if resp.StatusCode != http.StatusNotFound {
			t.Errorf("%s %s: got %d %s, want 404", tc.method, tc.path, resp.StatusCode, b)
		}
	}
	var count int
	ts.DB.QueryRow(`SELECT count(*) FROM messages WHERE conversation_id = $1`, conv.ID).Scan(&count)
	if count != 2 {
		t.Fatalf("got %d messages, want 2", count)
	}
}

func TestCreateConversationConcurrently(t *testing.T) {
	t.Parallel()
	ts := newTestServer(t)
	alice, bob := ts.newUser(t, "alice"), ts.newUser(t, "bob")
	const n = 50
	ids := make([]string, n)
	codes := make([]int, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			from, to := alice, bob
			if i%2 == 1 {
				from, to = bob, alice
			}
			resp, b := from.do("POST", "/api/conversations", map[string]string{"username": to.User.Username})
			codes[i] = resp.StatusCode
			var c apiConversation
			json.Unmarshal(b, &c)
			ids[i] = c.ID
		})
	}
	wg.Wait()
	created := 0
	for i := range n {
		if codes[i] == http.StatusCreated {
			created++
		} else if codes[i] != http.StatusOK {
			t.Fatalf("request %d: status %d", i, codes[i])
		}
		if ids[i] != ids[0] {
			t.Fatalf("request %d: conversation %s, want %s", i, ids[i], ids[0])
		}
	}
	if created != 1 {
		t.Fatalf("got %d created, want 1", created)
	}
	var count int
	ts.DB.QueryRow(`SELECT count(*) FROM conversations WHERE user_low = $1 AND user_high = $2`,
		min(alice.User.ID, bob.User.ID), max(alice.User.ID, bob.User.ID)).Scan(&count)
	if count != 1 {
		t.Fatalf("got %d conversations, want 1", count)
	}
}

func TestPagination(t *testing.T) {
	t.Parallel()
	ts := newTestServer(t)
	me := ts.newUser(t, "me")
	const n = 60
	var convIDs []string
	for i := range n {
		other := ts.newUser(t, fmt.Sprintf("p%d", i))
		convIDs = append(convIDs, me.startConversation(other).ID)
	}
	// Give half of them the same activity time, so the cursor must break ties.
	if _, err := ts.DB.Exec(`UPDATE participants SET last_activity_at = '2026-01-01T00:00:00Z'
		WHERE user_id = $1 AND conversation_id % 2 = 0`, me.User.ID); err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	var order []string
	before := ""
	for page := 0; ; page++ {
		var list []apiConversation
		path := "/api/conversations"
		if before != "" {
			path += "?before=" + before
		}
		me.mustDo("GET", path, nil, http.StatusOK, &list)
		if len(list) == 0 {
			break
		}
		if len(list) > 25 {
			t.Fatalf("page %d: %d conversations, want at most 25", page, len(list))
		}
		for _, c := range list {
			if seen[c.ID] {
				t.Fatalf("conversation %s listed twice", c.ID)
			}
			seen[c.ID] = true
			order = append(order, c.ID)
		}
		before = list[len(list)-1].ID
	}
	if len(seen) != n {
		t.Fatalf("got %d conversations, want %d", len(seen), n)
	}
	// Newest activity first: the untouched half (odd ids, newest created first),
	// then the tied half by id. Other tests create conversations meanwhile, so this
	// test's ids are not consecutive, and its newest two may both have been set back.
	newestUntouched := ""
	for _, id := range slices.Backward(convIDs) {
		if n, _ := strconv.ParseInt(id, 10, 64); n%2 == 1 {
			newestUntouched = id
			break
		}
	}
	if order[0] != newestUntouched {
		t.Fatalf("got first %s, want %s, the newest conversation not set back", order[0], newestUntouched)
	}

	other := ts.newUser(t, "talker")
	conv := me.startConversation(other)
	var sent []string
	for i := range n {
		sent = append(sent, other.send(conv.ID, fmt.Sprintf("message %d", i)).ID)
	}
	var got []string
	before = ""
	for {
		var msgs []apiMessage
		path := "/api/conversations/" + conv.ID + "/messages"
		if before != "" {
			path += "?before=" + before
		}
		me.mustDo("GET", path, nil, http.StatusOK, &msgs)
		if len(msgs) == 0 {
			break
		}
		if len(msgs) > 25 {
			t.Fatalf("got a page of %d messages, want at most 25", len(msgs))
		}
		for _, m := range msgs {
			got = append(got, m.ID)
		}
		before = msgs[len(msgs)-1].ID
	}
	if len(got) != n {
		t.Fatalf("got %d messages, want %d", len(got), n)
	}
	for i := range got {
		if got[i] != sent[n-1-i] {
			t.Fatalf("message %d: got %s, want %s (newest first, each once)", i, got[i], sent[n-1-i])
		}
	}
	me.mustDo("GET", "/api/conversations?before=abc", nil, http.StatusBadRequest, nil)
	me.mustDo("GET", "/api/conversations/"+conv.ID+"/messages?before=-3", nil, http.StatusBadRequest, nil)
}

func TestMessageContent(t *testing.T) {
	t.Parallel()
	ts := newTestServer(t)
	alice, bob := ts.newUser(t, "alice"), ts.newUser(t, "bob")
	conv := alice.startConversation(bob)
	for _, tc := range []struct {
		name, content, want string
		status              int
	}{
		{"plain", "hi", "hi", http.StatusCreated},
		{"trimmed and collapsed", "  hello \t  world  ", "hello world", http.StatusCreated},
		{"blank lines dropped", "one\n\n  \r\ntwo\r\n", "one\ntwo", http.StatusCreated},
		{"480 runes", strings.Repeat("é", 480), strings.Repeat("é", 480), http.StatusCreated},
		{"481 runes", strings.Repeat("é", 481), "", http.StatusUnprocessableEntity},
		{"only spaces", " \n \t ", "", http.StatusUnprocessableEntity},
		{"control character", "bell\a", "", http.StatusUnprocessableEntity},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, b := alice.do("POST", "/api/conversations/"+conv.ID+"/messages", map[string]string{"content": tc.content})
			if resp.StatusCode != tc.status {
				t.Fatalf("got %d %s, want %d", resp.StatusCode, b, tc.status)
			}
			if tc.status != http.StatusCreated {
				var e struct {
					Error  string
					Errors map[string]string
				}
				if json.Unmarshal(b, &e) != nil || e.Errors["content"] == "" {
					t.Fatalf("got %s, want an error naming content", b)
				}
				return
			}
			var m apiMessage
			json.Unmarshal(b, &m)
			if m.Content != tc.want || !m.Mine || m.ConversationID != conv.ID {
				t.Fatalf("got %+v, want content %q", m, tc.want)
			}
			if !regexp.MustCompile(`^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$`).MatchString(m.CreatedAt) {
				t.Fatalf("got createdAt %q, want RFC 3339 UTC with milliseconds", m.CreatedAt)
			}
		})
	}
}

func TestIdempotentSend(t *testing.T) {
	t.Parallel()
	ts := newTestServer(t)
	alice, bob := ts.newUser(t, "alice"), ts.newUser(t, "bob")
	conv := alice.startConversation(bob)
	path := "/api/conversations/" + conv.ID + "/messages"
	var first, retry apiMessage
	alice.mustDo("POST", path, map[string]string{"content": "once"}, http.StatusCreated, &first, "Idempotency-Key: k1")
	alice.mustDo("POST", path, map[string]string{"content": "once"}, http.StatusOK, &retry, "Idempotency-Key: k1")
	if retry != first {
		t.Fatalf("got %+v on retry, want %+v", retry, first)
	}
	alice.mustDo("POST", path, map[string]string{"content": "other"}, http.StatusUnprocessableEntity, nil, "Idempotency-Key: k1")
	// Keys are per user.
	bob.mustDo("POST", path, map[string]string{"content": "once"}, http.StatusCreated, nil, "Idempotency-Key: k1")
	var events int
	ts.DB.QueryRow(`SELECT count(*) FROM events WHERE user_id = $1`, alice.User.ID).Scan(&events)
	if events != 2 {
		t.Fatalf("got %d events for alice, want 2", events)
	}
}

// fakeGitHub serves the three GitHub endpoints sign-in uses.
func fakeGitHub(t testing.TB, id int64, login string) *httptest.Server {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /login/oauth/access_token", func(w http.ResponseWriter, r *http.Request) {
		r.ParseForm()
		if r.Form.Get("code") != "good-code" {
			w.Header().Set("Content-Type", "application/json")
			fmt.Fprint(w, `{"error":"bad_verification_code"}`)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprint(w, `{"access_token":"gho_test","token_type":"bearer","scope":""}`)
	})
	mux.HandleFunc("GET /user", func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer gho_test" {
			http.Error(w, "unauthorized", http.StatusUnauthorized)
			return
		}
		fmt.Fprintf(w, `{"id":%d,"login":%q,"avatar_url":"https://avatars.example/u/%d"}`, id, login, id)
	})
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	return srv
}

func TestGitHubSignIn(t *testing.T) {
	t.Parallel()
	ghID := time.Now().UnixNano() % 1e12
	login := uniqueName("gh")
	gh := fakeGitHub(t, ghID, login)
	ts := newTestServer(t, "GITHUB_CLIENT_ID=cid", "GITHUB_CLIENT_SECRET=secret",
		"GITHUB_WEB_URL="+gh.URL, "GITHUB_API_URL="+gh.URL)
	noRedirect := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	nonce := newNonce()

	start := func() (state string, cookie *http.Cookie) {
		resp, err := noRedirect.Get(ts.URL + "/api/oauth/github?nonce=" + nonce)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusFound {
			t.Fatalf("start: got %d, want 302", resp.StatusCode)
		}
		loc, _ := url.Parse(resp.Header.Get("Location"))
		if !strings.HasPrefix(loc.String(), gh.URL+"/login/oauth/authorize") || loc.Query().Get("client_id") != "cid" {
			t.Fatalf("start: redirected to %s", loc)
		}
		for _, c := range resp.Cookies() {
			if c.Name == stateCookie {
				cookie = c
			}
		}
		if cookie == nil || !cookie.HttpOnly {
			t.Fatalf("start: no HttpOnly state cookie in %v", resp.Cookies())
		}
		return loc.Query().Get("state"), cookie
	}
	callback := func(state, code string, cookie *http.Cookie) *http.Response {
		req, _ := http.NewRequest("GET", ts.URL+"/api/oauth/github/callback?"+url.Values{"state": {state}, "code": {code}}.Encode(), nil)
		if cookie != nil {
			req.AddCookie(cookie)
		}
		resp, err := noRedirect.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp
	}

	state, cookie := start()
	resp := callback(state, "good-code", cookie)
	if resp.StatusCode != http.StatusFound {
		t.Fatalf("callback: got %d, want 302", resp.StatusCode)
	}
	loc, _ := url.Parse(resp.Header.Get("Location"))
	frag, _ := url.ParseQuery(loc.Fragment)
	if loc.Path != "/callback" || frag.Get("code") == "" || frag.Get("nonce") != nonce || frag.Has("token") {
		t.Fatalf("callback: redirected to %s", loc)
	}
	c := &client{t: t, base: ts.URL, Token: mustClaim(t, ts, frag)}
	var u apiUser
	c.mustDo("GET", "/api/auth_user", nil, http.StatusOK, &u)
	if u.Username != login || u.AvatarURL == nil || !strings.HasPrefix(*u.AvatarURL, "https://avatars.example/") {
		t.Fatalf("got %+v, want %s with avatar", u, login)
	}

	// The callback leaves the browser's state cookie for sign-ins of other tabs.
	if got := resp.Cookies(); len(got) != 0 {
		t.Fatalf("callback: got cookies %v, want none set", got)
	}
	// A forged state, or one without its cookie, goes to the client's error page.
	failed := func(what string, resp *http.Response) {
		t.Helper()
		if loc := resp.Header.Get("Location"); resp.StatusCode != http.StatusFound || !strings.HasSuffix(loc, "/callback#error=sign_in_failed") {
			t.Fatalf("%s: got %d to %q, want 302 to /callback#error=sign_in_failed", what, resp.StatusCode, loc)
		}
	}
	failed("state without its cookie", callback(state, "good-code", nil))
	state2, cookie2 := start()
	failed("forged state", callback("forged"+state2, "good-code", cookie2))
	state3, _ := start()
	failed("state without cookie", callback(state3, "good-code", nil))
	failed("forged cookie", callback(state3, "good-code", &http.Cookie{Name: stateCookie, Value: state3 + ".AAAA"}))
	// A bad code fails without leaking GitHub's answer.
	state4, cookie4 := start()
	failed("bad code", callback(state4, "bad-code", cookie4))
	state6, cookie6 := start()
	failed("missing code", callback(state6, "", cookie6))

	// Signing in again finds the same user.
	state5, cookie5 := start()
	resp = callback(state5, "good-code", cookie5)
	loc, _ = url.Parse(resp.Header.Get("Location"))
	frag, _ = url.ParseQuery(loc.Fragment)
	c.Token = mustClaim(t, ts, frag)
	var u2 apiUser
	c.mustDo("GET", "/api/auth_user", nil, http.StatusOK, &u2)
	if u2.ID != u.ID {
		t.Fatalf("second sign-in: user %s, want %s", u2.ID, u.ID)
	}

	// Without GitHub configured, the start route says so.
	plain := newTestServer(t)
	anon := &client{t: t, base: plain.URL}
	anon.mustDo("GET", "/api/oauth/github", nil, http.StatusNotFound, nil)
}

func TestWebClientRoutes(t *testing.T) {
	t.Parallel()
	ts := newTestServer(t)
	anon := &client{t: t, base: ts.URL}
	for _, path := range []string{"/", "/conversations/5", "/login"} {
		resp, b := anon.do("GET", path, nil)
		if resp.StatusCode != http.StatusOK || !strings.Contains(string(b), "<html") {
			t.Fatalf("GET %s: got %d, want index.html", path, resp.StatusCode)
		}
		if resp.Header.Get("Content-Security-Policy") == "" || resp.Header.Get("X-Content-Type-Options") != "nosniff" {
			t.Fatalf("GET %s: missing security headers: %v", path, resp.Header)
		}
	}
	resp, b := anon.do("GET", "/api/nope", nil)
	if resp.StatusCode != http.StatusNotFound || !strings.Contains(string(b), `"error"`) {
		t.Fatalf("GET /api/nope: got %d %s, want a JSON 404", resp.StatusCode, b)
	}
}
