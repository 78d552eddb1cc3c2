package main

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// oauthStateTTL is how long a sign-in may take between leaving for GitHub and
// coming back.
const oauthStateTTL = 10 * time.Minute

// oauthStates issues and checks the OAuth state of GitHub sign-ins without storing
// anything: a state is "<expiry>.<nonce>.<client nonce>.<MAC>", where the MAC, under
// a key derived from the token key for this use alone, covers the other three and
// the value of the browser's state cookie. A state is good only in the browser that
// started the sign-in (it holds the cookie), only until its expiry, and only as this
// server wrote it. The client nonce is the web client's own (see handleGitHubStart),
// carried through GitHub and handed back with the token; it may be empty.
type oauthStates struct {
	key []byte
}

func newOAuthStates(tokenKey []byte) *oauthStates {
	mac := hmac.New(sha256.New, tokenKey)
	mac.Write([]byte("messenger oauth state v1"))
	return &oauthStates{key: mac.Sum(nil)}
}

// browserCookieLen is the length of the state cookie's value: 16 random bytes,
// base64url.
const browserCookieLen = 22

// newBrowserValue returns a fresh value for the state cookie.
func newBrowserValue() string {
	b := make([]byte, 16)
	rand.Read(b)
	return base64.RawURLEncoding.EncodeToString(b)
}

// validClientNonce reports whether s may be a client nonce: empty, or 16 to 64
// characters of the base64url alphabet.
func validClientNonce(s string) bool {
	if s == "" {
		return true
	}
	if len(s) < 16 || len(s) > 64 {
		return false
	}
	return isBase64URL(s)
}

func isBase64URL(s string) bool {
	for _, c := range []byte(s) {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
			return false
		}
	}
	return true
}

// issue returns a state for the browser holding cookie, expiring at exp.
func (o *oauthStates) issue(cookie, clientNonce string, exp time.Time) string {
	n := make([]byte, 16)
	rand.Read(n)
	head := strconv.FormatInt(exp.Unix(), 10) + "." + base64.RawURLEncoding.EncodeToString(n) + "." + clientNonce
	return head + "." + base64.RawURLEncoding.EncodeToString(o.mac(head, cookie))
}

// check returns the client nonce of state if this server issued it for the browser
// holding cookie and it has not expired.
func (o *oauthStates) check(state, cookie string, now time.Time) (clientNonce string, ok bool) {
	if len(state) > 256 || len(cookie) != browserCookieLen || !isBase64URL(cookie) {
		return "", false
	}
	i := strings.LastIndexByte(state, '.')
	if i < 0 {
		return "", false
	}
	head, sig64 := state[:i], state[i+1:]
	sig, err := base64.RawURLEncoding.DecodeString(sig64)
	if err != nil || !hmac.Equal(sig, o.mac(head, cookie)) {
		return "", false
	}
	parts := strings.Split(head, ".")
	if len(parts) != 3 {
		return "", false
	}
	exp, err := strconv.ParseInt(parts[0], 10, 64)
	if err != nil || !now.Before(time.Unix(exp, 0)) {
		return "", false
	}
	return parts[2], true
}

func (o *oauthStates) mac(head, cookie string) []byte {
	mac := hmac.New(sha256.New, o.key)
	mac.Write([]byte(head))
	mac.Write([]byte{0})
	mac.Write([]byte(cookie))
	return mac.Sum(nil)
}

// stateCookieFor returns the state cookie to set, keeping the value of a browser
// that already has one, so that sign-ins started in two tabs both work.
func (s *server) stateCookieFor(r *http.Request) *http.Cookie {
	value := newBrowserValue()
	if c, err := r.Cookie(stateCookie); err == nil && len(c.Value) == browserCookieLen && isBase64URL(c.Value) {
		value = c.Value
	}
	return &http.Cookie{
		Name:     stateCookie,
		Value:    value,
		Path:     "/api/oauth/github",
		MaxAge:   int(oauthStateTTL.Seconds()),
		HttpOnly: true,
		Secure:   s.cfg.origin.Scheme == "https",
		SameSite: http.SameSiteLaxMode,
	}
}
