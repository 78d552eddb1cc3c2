package main

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"golang.org/x/oauth2"
)

// tokenSigner issues and checks the bearer tokens: "<payload>.<signature>", both
// base64url, where the payload is "<user id>.<expiry in Unix seconds>" and the
// signature is its HMAC-SHA256 under the server's key. The standard library's HMAC
// is all a token that only this server reads needs; a JWT library would add
// algorithm negotiation we would then have to defend against.
type tokenSigner struct {
	key []byte
	ttl time.Duration
}

var (
	errTokenMissing = &apiError{status: http.StatusUnauthorized, msg: "missing token"}
	errTokenInvalid = &apiError{status: http.StatusUnauthorized, msg: "invalid token"}
	errTokenExpired = &apiError{status: http.StatusUnauthorized, msg: "token expired"}
)

// maxTokenLen bounds what parse reads; real tokens are under 100 bytes.
const maxTokenLen = 256

// issue returns a token for userID that expires after the signer's TTL.
func (ts *tokenSigner) issue(userID int64, now time.Time) (string, time.Time) {
	exp := now.Add(ts.ttl).Truncate(time.Second)
	payload := strconv.FormatInt(userID, 10) + "." + strconv.FormatInt(exp.Unix(), 10)
	enc := base64.RawURLEncoding
	return enc.EncodeToString([]byte(payload)) + "." + enc.EncodeToString(ts.sign("token:"+payload)), exp
}

// parse checks token and returns its user id and expiry. It returns errTokenInvalid
// for a malformed or forged token and errTokenExpired for one past its expiry.
func (ts *tokenSigner) parse(token string, now time.Time) (int64, time.Time, error) {
	if len(token) > maxTokenLen {
		return 0, time.Time{}, errTokenInvalid
	}
	p64, s64, ok := strings.Cut(token, ".")
	if !ok {
		return 0, time.Time{}, errTokenInvalid
	}
	enc := base64.RawURLEncoding
	payload, err1 := enc.DecodeString(p64)
	sig, err2 := enc.DecodeString(s64)
	// The decoder ignores newlines and the unused low bits of the last character,
	// so several strings decode alike: only the one issue writes is the token.
	canonical := enc.EncodeToString(payload) == p64 && enc.EncodeToString(sig) == s64
	if err1 != nil || err2 != nil || !canonical || !hmac.Equal(sig, ts.sign("token:"+string(payload))) {
		return 0, time.Time{}, errTokenInvalid
	}
	uid, expStr, ok := strings.Cut(string(payload), ".")
	userID, err1 := strconv.ParseInt(uid, 10, 64)
	expUnix, err2 := strconv.ParseInt(expStr, 10, 64)
	if !ok || err1 != nil || err2 != nil || userID <= 0 {
		return 0, time.Time{}, errTokenInvalid
	}
	exp := time.Unix(expUnix, 0)
	if !now.Before(exp) {
		return 0, time.Time{}, errTokenExpired
	}
	return userID, exp, nil
}

func (ts *tokenSigner) sign(msg string) []byte {
	mac := hmac.New(sha256.New, ts.key)
	mac.Write([]byte(msg))
	return mac.Sum(nil)
}

// session is who made a request, as its token says.
type session struct {
	userID  int64
	expires time.Time
}

type sessionKey struct{}

// sessionFrom returns the session authenticate stored in ctx.
func sessionFrom(ctx context.Context) session {
	s, _ := ctx.Value(sessionKey{}).(session)
	return s
}

// authenticate lets a request through only with a valid token, from the
// Authorization header or, for EventSource which cannot set headers, ?token=.
func (s *server) authenticate(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		token, err := bearerToken(r)
		var userID int64
		var exp time.Time
		if err == nil {
			userID, exp, err = s.tokens.parse(token, time.Now())
		}
		if err != nil {
			s.respondError(w, r, err)
			return
		}
		ctx := context.WithValue(r.Context(), sessionKey{}, session{userID: userID, expires: exp})
		h(w, r.WithContext(ctx))
	}
}

func bearerToken(r *http.Request) (string, error) {
	if h := r.Header.Get("Authorization"); h != "" {
		scheme, token, ok := strings.Cut(h, " ")
		if !ok || !strings.EqualFold(scheme, "Bearer") || token == "" {
			return "", errTokenInvalid
		}
		return strings.TrimSpace(token), nil
	}
	if token := r.URL.Query().Get("token"); token != "" {
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
func (s *server) handleLogin() http.HandlerFunc {
	type request struct {
		Username string `json:"username"`
	}
	return func(w http.ResponseWriter, r *http.Request) {
		if !s.cfg.devLogin {
			s.respondError(w, r, errNotFound)
			return
		}
		if err := s.limits.logins.allow(clientIP(r)); err != nil {
			s.respondError(w, r, err)
			return
		}
		var req request
		if err := decodeJSON(w, r, &req); err != nil {
			s.respondError(w, r, err)
			return
		}
		if err := validateUsername(req.Username); err != nil {
			s.respondError(w, r, err)
			return
		}
		user, err := upsertUser(r.Context(), s.db, req.Username)
		if err != nil {
			s.respondError(w, r, err)
			return
		}
		token, exp := s.tokens.issue(user.ID, time.Now())
		respond(w, http.StatusOK, authResponse{AuthUser: user, Token: token, ExpiresAt: exp.UTC()})
	}
}

// handleAuthUser serves GET /api/auth_user: the signed-in user.
func (s *server) handleAuthUser() http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		user, err := userByID(r.Context(), s.db, sessionFrom(r.Context()).userID)
		if errors.Is(err, errNotFound) {
			err = errTokenInvalid // the token names a user that no longer exists
		}
		if err != nil {
			s.respondError(w, r, err)
			return
		}
		respond(w, http.StatusOK, user)
	}
}

// handleRefreshToken serves POST /api/refresh_token: a fresh token for the caller.
func (s *server) handleRefreshToken() http.HandlerFunc {
	type response struct {
		Token     string    `json:"token"`
		ExpiresAt time.Time `json:"expiresAt"`
	}
	return func(w http.ResponseWriter, r *http.Request) {
		me := sessionFrom(r.Context()).userID
		if _, err := userByID(r.Context(), s.db, me); err != nil {
			if errors.Is(err, errNotFound) {
				err = errTokenInvalid // the token names a user that no longer exists
			}
			s.respondError(w, r, err)
			return
		}
		token, exp := s.tokens.issue(me, time.Now())
		respond(w, http.StatusOK, response{Token: token, ExpiresAt: exp.UTC()})
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

// handleGitHubStart serves GET /api/oauth/github[?nonce=]: it binds the sign-in
// to the browser with an HttpOnly cookie and redirects to GitHub with a signed
// state (see oauthStates), storing nothing. nonce is the web client's, handed back
// with the token so that the client accepts only sign-ins it started.
func (s *server) handleGitHubStart() http.HandlerFunc {
	states := newOAuthStates(s.cfg.tokenKey)
	return func(w http.ResponseWriter, r *http.Request) {
		conf := s.githubOAuth()
		if conf == nil {
			s.respondError(w, r, &apiError{status: http.StatusNotFound, msg: "GitHub sign-in is not configured"})
			return
		}
		nonce := r.URL.Query().Get("nonce")
		if !validClientNonce(nonce) {
			s.respondError(w, r, &apiError{status: http.StatusBadRequest, msg: "nonce must be 16 to 64 letters, digits, '-' or '_'"})
			return
		}
		cookie := s.stateCookieFor(r)
		http.SetCookie(w, cookie)
		state := states.issue(cookie.Value, nonce, time.Now().Add(oauthStateTTL))
		http.Redirect(w, r, conf.AuthCodeURL(state), http.StatusFound)
	}
}

// handleGitHubCallback serves GET /api/oauth/github/callback: it checks the state
// against the browser's cookie (and clears the cookie), exchanges the code, finds
// or creates the user by GitHub id and redirects to the web client with a token
// and the client's nonce.
func (s *server) handleGitHubCallback() http.HandlerFunc {
	badState := &apiError{status: http.StatusBadRequest, msg: "invalid or expired OAuth state; start the sign-in again"}
	githubFailed := &apiError{status: http.StatusBadGateway, msg: "GitHub sign-in failed; try again"}
	states := newOAuthStates(s.cfg.tokenKey)
	return func(w http.ResponseWriter, r *http.Request) {
		conf := s.githubOAuth()
		if conf == nil {
			s.respondError(w, r, &apiError{status: http.StatusNotFound, msg: "GitHub sign-in is not configured"})
			return
		}
		q := r.URL.Query()
		state, code := q.Get("state"), q.Get("code")
		http.SetCookie(w, &http.Cookie{Name: stateCookie, Path: "/api/oauth/github", MaxAge: -1, HttpOnly: true,
			Secure: s.cfg.origin.Scheme == "https", SameSite: http.SameSiteLaxMode})
		var nonce string
		c, err := r.Cookie(stateCookie)
		ok := err == nil
		if ok {
			nonce, ok = states.check(state, c.Value, time.Now())
		}
		if !ok {
			s.respondError(w, r, badState)
			return
		}
		dest := s.cfg.origin.ResolveReference(&url.URL{Path: "/callback"})
		if q.Get("error") != "" {
			// GitHub sent the person back without a code (they declined, say); the
			// web client shows its own text for the code, never GitHub's.
			reason := "sign_in_failed"
			if q.Get("error") == "access_denied" {
				reason = "access_denied"
			}
			http.Redirect(w, r, dest.String()+"#error="+reason, http.StatusFound)
			return
		}
		if code == "" || len(code) > 512 {
			s.respondError(w, r, &apiError{status: http.StatusBadRequest, msg: "missing code"})
			return
		}
		ctx, cancel := context.WithTimeout(r.Context(), 15*time.Second)
		defer cancel()
		ghUser, err := s.fetchGitHubUser(ctx, conf, code)
		if err != nil {
			s.logger.Warn("github sign-in", "err", err)
			s.respondError(w, r, githubFailed)
			return
		}
		user, err := upsertGitHubUser(ctx, s.db, ghUser)
		if err != nil {
			s.respondError(w, r, err)
			return
		}
		token, exp := s.tokens.issue(user.ID, time.Now())
		frag := url.Values{"token": {token}, "expires_at": {exp.UTC().Format(time.RFC3339)}}
		if nonce != "" {
			frag.Set("nonce", nonce)
		}
		http.Redirect(w, r, dest.String()+"#"+frag.Encode(), http.StatusFound)
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
