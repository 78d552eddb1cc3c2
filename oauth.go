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
// carried through GitHub and handed back with the sign-in claim (see oauthClaims).
type oauthStates struct {
	key []byte
}

func newOAuthStates(tokenKey []byte) *oauthStates {
	return &oauthStates{key: deriveKey(tokenKey, "messenger oauth state v1")}
}

// hmacSHA256 is the HMAC-SHA256 of the parts under key, each part after the first
// preceded by a zero byte (which no part contains). Tokens, OAuth states and
// claims, and the keys derived for them, are all made with it.
func hmacSHA256(key []byte, parts ...string) []byte {
	mac := hmac.New(sha256.New, key)
	for i, p := range parts {
		if i > 0 {
			mac.Write([]byte{0})
		}
		mac.Write([]byte(p))
	}
	return mac.Sum(nil)
}

// deriveKey returns the key for purpose derived from tokenKey, so that a MAC made
// for one use is worth nothing in another.
func deriveKey(tokenKey []byte, purpose string) []byte { return hmacSHA256(tokenKey, purpose) }

// macOf is the MAC under key of head and the value it is bound to.
func macOf(key []byte, head, bound string) []byte { return hmacSHA256(key, head, bound) }

// browserCookieLen is the length of the state cookie's value: 16 random bytes,
// base64url.
const browserCookieLen = 22

// newBrowserValue returns a fresh value for the state cookie.
func newBrowserValue() string {
	b := make([]byte, 16)
	rand.Read(b)
	return base64.RawURLEncoding.EncodeToString(b)
}

// validClientNonce reports whether s may be a client nonce: 16 to 64 characters
// of the base64url alphabet.
func validClientNonce(s string) bool {
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
	return head + "." + base64.RawURLEncoding.EncodeToString(macOf(o.key, head, cookie))
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
	if err != nil || !hmac.Equal(sig, macOf(o.key, head, cookie)) {
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

// oauthClaimTTL is how long the web client has to claim a session after GitHub
// sent the person back.
const oauthClaimTTL = 2 * time.Minute

// oauthClaims issues and checks the codes with which the web client claims the
// session of a GitHub sign-in, storing nothing: a code is "<user>.<expiry>.<MAC>",
// where the MAC, under a key derived from the token key for this use alone, covers
// both and the client's nonce. The callback hands a code out instead of a session,
// so a sign-in forced on a browser by another site (which never learns the code,
// nor has the page's nonce) starts no session.
type oauthClaims struct {
	key []byte
}

func newOAuthClaims(tokenKey []byte) *oauthClaims {
	return &oauthClaims{key: deriveKey(tokenKey, "messenger oauth claim v1")}
}

// issue returns a code that claims a session of user for the client holding
// nonce, until exp.
func (o *oauthClaims) issue(user int64, nonce string, exp time.Time) string {
	head := strconv.FormatInt(user, 10) + "." + strconv.FormatInt(exp.Unix(), 10)
	return head + "." + base64.RawURLEncoding.EncodeToString(macOf(o.key, head, nonce))
}

// check returns the user of code if this server issued it for nonce and it has
// not expired.
func (o *oauthClaims) check(code, nonce string, now time.Time) (user int64, ok bool) {
	if len(code) > 128 || !validClientNonce(nonce) {
		return 0, false
	}
	i := strings.LastIndexByte(code, '.')
	if i < 0 {
		return 0, false
	}
	head, sig64 := code[:i], code[i+1:]
	sig, err := base64.RawURLEncoding.DecodeString(sig64)
	if err != nil || !hmac.Equal(sig, macOf(o.key, head, nonce)) {
		return 0, false
	}
	userText, expText, found := strings.Cut(head, ".")
	if !found {
		return 0, false
	}
	user, err = strconv.ParseInt(userText, 10, 64)
	if err != nil || user <= 0 {
		return 0, false
	}
	exp, err := strconv.ParseInt(expText, 10, 64)
	if err != nil || !now.Before(time.Unix(exp, 0)) {
		return 0, false
	}
	return user, true
}

// stateCookieFor returns the state cookie to set, keeping the value of a browser
// that already has one, so that sign-ins started in two tabs both work. The
// callback leaves it be for the same reason; it expires with the states.
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
