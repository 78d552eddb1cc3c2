package main

import (
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
)

// TestE2EGitHubSignIn: a sign-in through GitHub works in the browser that started
// it, claiming its session from /callback; a callback link carrying another
// account's code does not sign a browser in (nor start a session), nor one whose
// nonce is not the one this tab stored; a code the server refuses shows the
// client's own text, as /callback#error= does.
func TestE2EGitHubSignIn(t *testing.T) {
	gh := newGitHub(t)
	port := strconv.Itoa(freePort(t))
	ts := newTestServer(t, append(gh.env(), "PORT="+port, "ORIGIN=http://127.0.0.1:"+port+"/")...)
	const notStartedHere = "That sign-in was not started in this browser, so it was ignored. Sign in again if you meant to."

	// Mallory signs in with GitHub and sends the link she lands on to Vic.
	malloryID := 1e11 + time.Now().UnixNano()%1e11
	_, state, cookie := oauthStart(t, ts, "?nonce=mallorys-own-nonce-0123", "")
	res, frag := oauthCallback(t, ts, state, gitHubCode(malloryID, uniqueName("mallory")), cookie)
	if res.status != http.StatusFound || frag.Get("code") == "" {
		t.Fatalf("mallory's sign-in: got %d %s", res.status, res.body)
	}
	mallory, _ := strconv.ParseInt(strings.Split(frag.Get("code"), ".")[0], 10, 64)
	forged := ts.URL + "/callback#" + frag.Encode()

	b := newBrowser(t, ts, "vic", desktop)
	signedOut := `location.pathname === '/login' && location.hash === '' && localStorage.getItem('messenger.auth') === null &&
		sessionStorage.getItem('messenger.githubNonce') === null && document.getElementById('login-message')?.textContent === `
	b.do("open mallory's link", chromedp.Navigate(forged))
	b.waitUntil("the link is refused", signedOut+jsString(notStartedHere))

	// A tab that did leave for GitHub still refuses a token with another nonce.
	b.do("leave for GitHub, then open mallory's link",
		chromedp.Evaluate[chromedp.Void](`sessionStorage.setItem('messenger.githubNonce', 'vics-own-nonce-0123456')`),
		chromedp.Navigate(forged))
	b.waitUntil("the link is refused", signedOut+jsString(notStartedHere))
	if n := sessionRows(t, ts.DB, mallory); n != 0 {
		t.Fatalf("mallory's account has %d sessions after vic's browser refused her link, want 0", n)
	}

	// A code the server refuses (forged, or past its two minutes) signs nobody in.
	b.do("open a forged code with this tab's nonce",
		chromedp.Evaluate[chromedp.Void](`sessionStorage.setItem('messenger.githubNonce', 'vics-own-nonce-0123456')`),
		chromedp.Navigate(ts.URL+"/callback#code=1.2.forged&nonce=vics-own-nonce-0123456"))
	b.waitUntil("the code is refused", signedOut+jsString("Sign-in with GitHub did not finish. Please try again."))

	// Error texts come from the client, never from the address.
	for _, tc := range []struct{ hash, want string }{
		{"error=Your+account+is+locked%2C+call+%2B1-555-0100", "Sign-in with GitHub did not finish. Please try again."},
		{"error=access_denied", "You did not allow Messenger to use your GitHub account."},
		{"error=__proto__", "Sign-in with GitHub did not finish. Please try again."},
	} {
		b.do("open /callback#"+tc.hash, chromedp.Navigate(ts.URL+"/callback#"+tc.hash))
		b.waitUntil("the fixed text shows", signedOut+jsString(tc.want))
		if eval[bool](b, `document.body.innerText.includes('555')`) {
			t.Errorf("#%s: the page shows text from the address", tc.hash)
		}
	}

	// The real flow, through GitHub and back, signs Vic in.
	vicID := malloryID + 1
	vic := uniqueName("vic")
	gh.signInAs(vicID, vic)
	b.do("sign in with GitHub", chromedp.Navigate(ts.URL+"/login"), chromedp.Click(chromedp.CSS("#github-sign-in")),
		// The page goes to GitHub and comes back: wait for the page to settle first.
		chromedp.WaitVisible(chromedp.CSS("#new-conversation-form")))
	b.waitUntil("the home page shows", `location.pathname === '/' && location.hash === '' && document.querySelector('#new-conversation-form') !== null &&
		JSON.parse(localStorage.getItem('messenger.auth'))?.token.length > 0 && sessionStorage.getItem('messenger.githubNonce') === null`)
	var me apiUser
	c := &client{t: t, base: ts.URL, Token: eval[string](b, `JSON.parse(localStorage.getItem('messenger.auth')).token`)}
	c.mustDo("GET", "/api/auth_user", nil, http.StatusOK, &me)
	if me.Username != vic {
		t.Fatalf("signed in as %q, want %q", me.Username, vic)
	}

	if n := sessionRows(t, ts.DB, mallory); n != 0 {
		t.Fatalf("mallory's account has %d sessions, want 0", n)
	}

	// Declining on GitHub comes back as access_denied.
	_, state, cookie = oauthStart(t, ts, "?nonce="+newNonce(), "")
	res = mustRaw(t, "GET", ts.URL+"/api/oauth/github/callback?"+url.Values{"state": {state},
		"error": {"access_denied"}, "error_description": {"The user has denied your application access."}}.Encode(),
		nil, http.Header{"Cookie": {stateCookie + "=" + cookie}})
	if loc := res.header.Get("Location"); res.status != http.StatusFound || loc != ts.URL+"/callback#error=access_denied" {
		t.Fatalf("declined: got %d to %q, want 302 to /callback#error=access_denied", res.status, loc)
	}
}
