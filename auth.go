package main

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/oauth2"
)

// tokenSigner issues and checks the bearer tokens: "<payload>.<signature>", both
// base64url, where the payload is "<user id>.<session id>.<expiry in Unix seconds>"
// and the signature is its HMAC-SHA256 under the server's key. The standard
// library's HMAC is all a token that only this server reads needs; a JWT library
// would add algorithm negotiation we would then have to defend against. A token is
// good only while its session is (see authenticate): the signature says who and
// which session, the sessions table says whether that session still stands.
// Tokens issued before sessions existed ("<user id>.<expiry>") are refused as
// invalid, so their holders sign in again.
type tokenSigner struct {
	key  []byte
	ttl  time.Duration
	macs sync.Pool // HMAC-SHA256 states keyed with key, for sign to reuse
}

var (
	errTokenMissing = unauthenticated("missing token")
	errTokenInvalid = unauthenticated("invalid token")
	errTokenExpired = unauthenticated("token expired")
	errTokenInQuery = unauthenticated("a token in the URL is accepted only by GET /api/messages; send Authorization: Bearer <token>")
)

// maxTokenLen bounds what parse reads; real tokens are about 100 bytes.
const maxTokenLen = 256

// tokenClaims is what a valid token says.
type tokenClaims struct {
	userID    int64
	sessionID int64
	expires   time.Time
}

// issue returns a token for session sessionID of userID that expires after the
// signer's TTL, or at notAfter (the session's hard end) if that comes first.
func (ts *tokenSigner) issue(userID, sessionID int64, now, notAfter time.Time) (string, time.Time) {
	exp := now.Add(ts.ttl)
	if !notAfter.IsZero() && notAfter.Before(exp) {
		exp = notAfter
	}
	exp = exp.Truncate(time.Second)
	payload := strconv.FormatInt(userID, 10) + "." + strconv.FormatInt(sessionID, 10) + "." + strconv.FormatInt(exp.Unix(), 10)
	enc := base64.RawURLEncoding
	return enc.EncodeToString([]byte(payload)) + "." + enc.EncodeToString(ts.sign([]byte(payload))), exp
}

// parse checks token and returns what it says. It returns errTokenInvalid for a
// malformed or forged token (or one in the format from before sessions) and
// errTokenExpired for one past its expiry.
func (ts *tokenSigner) parse(token string, now time.Time) (tokenClaims, error) {
	var c tokenClaims
	if len(token) > maxTokenLen {
		return c, errTokenInvalid
	}
	p64, s64, ok := strings.Cut(token, ".")
	if !ok {
		return c, errTokenInvalid
	}
	enc := base64.RawURLEncoding
	payload, err1 := enc.DecodeString(p64)
	sig, err2 := enc.DecodeString(s64)
	// The decoder ignores newlines and the unused low bits of the last character,
	// so several strings decode alike: only the one issue writes is the token.
	canonical := enc.EncodeToString(payload) == p64 && enc.EncodeToString(sig) == s64
	if err1 != nil || err2 != nil || !canonical || !hmac.Equal(sig, ts.sign(payload)) {
		return c, errTokenInvalid
	}
	fields := strings.Split(string(payload), ".")
	if len(fields) != 3 {
		return c, errTokenInvalid
	}
	userID, err1 := strconv.ParseInt(fields[0], 10, 64)
	sessionID, err2 := strconv.ParseInt(fields[1], 10, 64)
	expUnix, err3 := strconv.ParseInt(fields[2], 10, 64)
	if err1 != nil || err2 != nil || err3 != nil || userID <= 0 || sessionID <= 0 {
		return c, errTokenInvalid
	}
	c = tokenClaims{userID: userID, sessionID: sessionID, expires: time.Unix(expUnix, 0)}
	if !now.Before(c.expires) {
		return tokenClaims{}, errTokenExpired
	}
	return c, nil
}

// sign returns a token's signature of payload: hmacSHA256(ts.key, "token:"+payload).
// Every request checks one, so the keyed HMAC states are pooled: keying one costs
// two SHA-256 blocks and 0.7 KB of garbage, resetting one costs nothing.
func (ts *tokenSigner) sign(payload []byte) []byte {
	mac, _ := ts.macs.Get().(hash.Hash)
	if mac == nil {
		mac = hmac.New(sha256.New, ts.key)
	} else {
		mac.Reset()
	}
	mac.Write([]byte("token:"))
	mac.Write(payload)
	sum := mac.Sum(nil)
	ts.macs.Put(mac)
	return sum
}

// session is who made a request, as its token and the sessions table say.
type session struct {
	userID    int64
	sessionID int64
	expires   time.Time // the token's expiry
	ends      time.Time // the session's hard end, which no refresh moves
}

type sessionKey struct{}

// sessionFrom returns the session authenticate stored in ctx.
func sessionFrom(ctx context.Context) session {
	s, _ := ctx.Value(sessionKey{}).(session)
	return s
}

// authenticate lets a request through only with a valid token of a session that
// has not ended: a primary-key lookup of the sessions table, remembered for at
// most sessionCacheTTL (see sessions.go), so an ended session (signed out, its
// user deleted, past SESSION_MAX_AGE) is refused within that time on every
// instance. The token comes from the Authorization header. Only when queryToken
// is set (the event stream: EventSource cannot send headers) is ?token= accepted
// too; anywhere else a token in the URL is refused, since URLs reach the logs of
// proxies and browsers (this server never logs the query).
//
// A timeout other than 0 bounds the request from the token check on, as
// withTimeout would; done here, the request is copied once for both (a copy of
// http.Request is about 300 bytes of garbage).
func (s *server) authenticate(h http.HandlerFunc, queryToken bool, timeout time.Duration) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		ctx := r.Context()
		if timeout > 0 {
			var cancel context.CancelFunc
			ctx, cancel = context.WithTimeout(ctx, timeout)
			defer cancel()
		}
		sess, err := s.checkToken(ctx, r, queryToken)
		if err != nil {
			s.respondError(w, r, err)
			return
		}
		h(w, r.WithContext(context.WithValue(ctx, sessionKey{}, sess)))
	}
}

// checkToken returns the session of the request's token (see authenticate). It
// returns errSessionEnded for a well-signed token whose session ended.
func (s *server) checkToken(ctx context.Context, r *http.Request, queryToken bool) (session, error) {
	token, err := bearerToken(r, queryToken)
	if err != nil {
		return session{}, err
	}
	c, err := s.tokens.parse(token, time.Now())
	if err != nil {
		return session{}, err
	}
	sess := session{userID: c.userID, sessionID: c.sessionID, expires: c.expires}
	now := time.Now()
	ends, gen, ok := s.sessionCache.get(c.sessionID, c.userID, now)
	if ok {
		sess.ends = ends
		return sess, nil
	}
	if sess.ends, err = openSessionEnd(ctx, s.db, c.sessionID, c.userID); err != nil {
		return session{}, err
	}
	s.sessionCache.put(c.sessionID, c.userID, sess.ends, now, gen)
	return sess, nil
}

// bearerToken returns the request's token: from the Authorization header, or from
// ?token= if queryToken is set. A ?token= where it is not accepted is refused
// even next to a good header, so that clients stop putting tokens in URLs.
func bearerToken(r *http.Request, queryToken bool) (string, error) {
	query := r.URL.Query()
	if !queryToken && query.Has("token") {
		return "", errTokenInQuery
	}
	if h := r.Header.Get("Authorization"); h != "" {
		scheme, token, ok := strings.Cut(h, " ")
		if !ok || !strings.EqualFold(scheme, "Bearer") || token == "" {
			return "", errTokenInvalid
		}
		return strings.TrimSpace(token), nil
	}
	if token := query.Get("token"); token != "" {
		return token, nil
	}
	return "", errTokenMissing
}

// authResponse is what a sign-in returns.
type authResponse struct {
	AuthUser  User      `json:"authUser"`
	Token     string    `json:"token"`
	ExpiresAt time.Time `json:"expiresAt"`
}

// handleLogin serves POST /api/login: development sign-in by username, creating the
// user on first use. It is 404 unless DEV_LOGIN is on.
func (s *server) handleLogin() apiHandler {
	type request struct {
		Username string `json:"username"`
	}
	return func(w http.ResponseWriter, r *http.Request) error {
		if !s.cfg.devLogin {
			return errNotFound
		}
		if err := s.limits.logins.allow(clientIP(r)); err != nil {
			return err
		}
		var req request
		if err := decodeJSON(w, r, &req); err != nil {
			return err
		}
		if err := validateUsername(req.Username); err != nil {
			return err
		}
		user, err := upsertUser(r.Context(), s.db, req.Username)
		if err != nil {
			return err
		}
		return s.respondSignedIn(w, r, user)
	}
}

// respondSignedIn starts a session for user and answers a sign-in with its first
// token.
func (s *server) respondSignedIn(w http.ResponseWriter, r *http.Request, user User) error {
	token, exp, err := s.startSession(r.Context(), user.ID)
	if err != nil {
		return err
	}
	respond(w, http.StatusOK, authResponse{AuthUser: user, Token: token, ExpiresAt: exp.UTC()})
	return nil
}

// handleAuthUser serves GET /api/auth_user: the signed-in user.
func (s *server) handleAuthUser() apiHandler {
	return func(w http.ResponseWriter, r *http.Request) error {
		user, err := userByID(r.Context(), s.db, sessionFrom(r.Context()).userID)
		if errors.Is(err, errNotFound) {
			err = errTokenInvalid // the token names a user that no longer exists
		}
		if err != nil {
			return err
		}
		respond(w, http.StatusOK, user)
		return nil
	}
}

// handleRefreshToken serves POST /api/refresh_token: a fresh token for the caller's
// session. It expires after TOKEN_TTL or at the session's hard end, whichever
// comes first: refreshing never carries a session past SESSION_MAX_AGE.
func (s *server) handleRefreshToken() apiHandler {
	type response struct {
		Token     string    `json:"token"`
		ExpiresAt time.Time `json:"expiresAt"`
	}
	return func(w http.ResponseWriter, r *http.Request) error {
		sess := sessionFrom(r.Context())
		ends, err := refreshSession(r.Context(), s.db, sess.sessionID, sess.userID)
		if err != nil {
			return err
		}
		token, exp := s.tokens.issue(sess.userID, sess.sessionID, time.Now(), ends)
		respond(w, http.StatusOK, response{Token: token, ExpiresAt: exp.UTC()})
		return nil
	}
}

// handleLogout serves POST /api/logout: it ends the caller's session. Every token of
// it is refused from then on, on every instance, and its streams end with a
// session_ended event. The person's other sessions go on.
func (s *server) handleLogout() apiHandler {
	return func(w http.ResponseWriter, r *http.Request) error {
		sess := sessionFrom(r.Context())
		if err := s.endSessions(r.Context(), sess.userID, sess.sessionID, 0, endSignedOut); err != nil {
			return err
		}
		w.WriteHeader(http.StatusNoContent)
		return nil
	}
}

// handleLogoutAll serves POST /api/logout/all: it ends every session of the caller,
// this one included.
func (s *server) handleLogoutAll() apiHandler {
	return func(w http.ResponseWriter, r *http.Request) error {
		if err := s.endSessions(r.Context(), sessionFrom(r.Context()).userID, 0, 0, endSignedOutEverywhere); err != nil {
			return err
		}
		w.WriteHeader(http.StatusNoContent)
		return nil
	}
}

const stateCookie = "oauth_state"

// githubOAuth returns the OAuth2 configuration for GitHub, or nil when GitHub
// sign-in is not configured.
func (s *server) githubOAuth() *oauth2.Config {
	if s.cfg.githubClientID == "" || s.cfg.githubClientSecret == "" {
		return nil
	}
	return &oauth2.Config{
		ClientID:     s.cfg.githubClientID,
		ClientSecret: s.cfg.githubClientSecret,
		Endpoint: oauth2.Endpoint{
			AuthURL:  s.cfg.githubWebURL + "/login/oauth/authorize",
			TokenURL: s.cfg.githubWebURL + "/login/oauth/access_token",
		},
		RedirectURL: s.cfg.origin.ResolveReference(&url.URL{Path: "/api/oauth/github/callback"}).String(),
	}
}

// handleGitHubStart serves GET /api/oauth/github?nonce=: it binds the sign-in to
// the browser with an HttpOnly cookie and redirects to GitHub with a signed state
// (see oauthStates), storing nothing. nonce, required, is the web client's, handed
// back with the claim code so that the client claims only sign-ins it started.
func (s *server) handleGitHubStart() apiHandler {
	states := newOAuthStates(s.cfg.tokenKey)
	return func(w http.ResponseWriter, r *http.Request) error {
		conf := s.githubOAuth()
		if conf == nil {
			return notFound("GitHub sign-in is not configured")
		}
		nonce := r.URL.Query().Get("nonce")
		if !validClientNonce(nonce) {
			return malformed("nonce is required: 16 to 64 letters, digits, '-' or '_'")
		}
		cookie := s.stateCookieFor(r)
		http.SetCookie(w, cookie)
		state := states.issue(cookie.Value, nonce, time.Now().Add(oauthStateTTL))
		http.Redirect(w, r, conf.AuthCodeURL(state), http.StatusFound)
		return nil
	}
}

// handleGitHubCallback serves GET /api/oauth/github/callback: it checks the state
// against the browser's cookie (which it leaves for other tabs' sign-ins),
// exchanges the code, finds or creates the user by GitHub id and redirects to the
// web client with a claim code and the client's nonce (see oauthClaims). It starts
// no session: the client claims one with POST /api/oauth/github/claim once it has
// checked the nonce. A bad or expired state goes to /callback#error=sign_in_failed.
func (s *server) handleGitHubCallback() apiHandler {
	states := newOAuthStates(s.cfg.tokenKey)
	claims := newOAuthClaims(s.cfg.tokenKey)
	return func(w http.ResponseWriter, r *http.Request) error {
		conf := s.githubOAuth()
		if conf == nil {
			return notFound("GitHub sign-in is not configured")
		}
		q := r.URL.Query()
		state, code := q.Get("state"), q.Get("code")
		dest := s.cfg.origin.ResolveReference(&url.URL{Path: "/callback"}).String()
		var nonce string
		c, err := r.Cookie(stateCookie)
		ok := err == nil
		if ok {
			nonce, ok = states.check(state, c.Value, time.Now())
		}
		if !ok || nonce == "" {
			// The web client shows its own text for the code, never ours or GitHub's.
			http.Redirect(w, r, dest+"#error=sign_in_failed", http.StatusFound)
			return nil
		}
		if q.Get("error") != "" {
			// GitHub sent the person back without a code (they declined, say).
			reason := "sign_in_failed"
			if q.Get("error") == "access_denied" {
				reason = "access_denied"
			}
			http.Redirect(w, r, dest+"#error="+reason, http.StatusFound)
			return nil
		}
		// From here on, too, a failure sends the browser to the web client's own
		// error text rather than a JSON page (this is a top-level navigation, and a
		// reload cannot help: GitHub takes each code once).
		failed := func(why string, err error) error {
			s.logger.Warn("github sign-in", "step", why, "err", err)
			http.Redirect(w, r, dest+"#error=sign_in_failed", http.StatusFound)
			return nil
		}
		if code == "" || len(code) > 512 {
			return failed("code", errors.New("missing or overlong code"))
		}
		ctx, cancel := context.WithTimeout(r.Context(), 15*time.Second)
		defer cancel()
		ghUser, err := s.fetchGitHubUser(ctx, conf, code)
		if err != nil {
			return failed("exchange", err)
		}
		user, err := upsertGitHubUser(ctx, s.db, ghUser)
		if err != nil {
			return failed("user", err)
		}
		frag := url.Values{"code": {claims.issue(user.ID, nonce, time.Now().Add(oauthClaimTTL))}, "nonce": {nonce}}
		http.Redirect(w, r, dest+"#"+frag.Encode(), http.StatusFound)
		return nil
	}
}

// handleGitHubClaim serves POST /api/oauth/github/claim: it starts the session of a
// GitHub sign-in, given the code the callback handed the web client and the nonce
// the client started the sign-in with, and answers as POST /api/login does. A code
// this server did not issue for that nonce, or one past its two minutes, is 400.
// Claims count against the sign-in limit of the client's address.
func (s *server) handleGitHubClaim() apiHandler {
	type request struct {
		Code  string `json:"code"`
		Nonce string `json:"nonce"`
	}
	badClaim := malformed("invalid or expired sign-in code; sign in again")
	claims := newOAuthClaims(s.cfg.tokenKey)
	return func(w http.ResponseWriter, r *http.Request) error {
		if err := s.limits.logins.allow(clientIP(r)); err != nil {
			return err
		}
		var req request
		if err := decodeJSON(w, r, &req); err != nil {
			return err
		}
		userID, ok := claims.check(req.Code, req.Nonce, time.Now())
		if !ok {
			return badClaim
		}
		user, err := userByID(r.Context(), s.db, userID)
		if errors.Is(err, errNotFound) {
			return badClaim // the account was deleted in the meantime
		}
		if err != nil {
			return err
		}
		return s.respondSignedIn(w, r, user)
	}
}

// githubUser is the part of GitHub's GET /user this server uses.
type githubUser struct {
	ID        int64  `json:"id"`
	Login     string `json:"login"`
	AvatarURL string `json:"avatar_url"`
}

// fetchGitHubUser exchanges code for an access token and fetches the user it is for.
func (s *server) fetchGitHubUser(ctx context.Context, conf *oauth2.Config, code string) (githubUser, error) {
	var u githubUser
	ctx = context.WithValue(ctx, oauth2.HTTPClient, &http.Client{Timeout: 15 * time.Second})
	tok, err := conf.Exchange(ctx, code)
	if err != nil {
		return u, fmt.Errorf("exchange code: %w", err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, s.cfg.githubAPIURL+"/user", nil)
	if err != nil {
		return u, fmt.Errorf("user request: %w", err)
	}
	req.Header.Set("Accept", "application/vnd.github+json")
	resp, err := conf.Client(ctx, tok).Do(req)
	if err != nil {
		return u, fmt.Errorf("get user: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return u, fmt.Errorf("get user: status %s", resp.Status)
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&u); err != nil {
		return u, fmt.Errorf("decode user: %w", err)
	}
	if u.ID <= 0 || validateUsername(u.Login) != nil {
		return u, fmt.Errorf("unexpected user %d %q", u.ID, u.Login)
	}
	return u, nil
}
