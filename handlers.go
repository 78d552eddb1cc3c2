package main

import (
	"bytes"
	"context"
	"database/sql"
	"database/sql/driver"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net"
	"net/http"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unicode/utf8"

	"github.com/lib/pq"
	"github.com/matryer/way"
)

// maxBodyBytes caps every request body; the largest legitimate one (a message of 480
// four-byte runes, JSON-escaped) is far smaller.
const maxBodyBytes = 16 << 10

// routes returns the whole HTTP handler: the API, the metrics and health checks, and
// the web client, wrapped in the middleware every request goes through.
func (s *server) routes() http.Handler {
	r := way.NewRouter()
	s.addRoutes(r)
	r.NotFound = s.instrument("(not found)", http.HandlerFunc(s.handleNotFound))
	return s.recoverPanics(s.clientAddress(s.securityHeaders(s.cors(r))))
}

// addRoutes lists every route of the server.
func (s *server) addRoutes(r *way.Router) {
	handle := func(method, pattern string, h apiHandler) {
		r.Handle(method, pattern, s.instrument(pattern, withTimeout(requestTimeout, s.api(h))))
	}
	authed := func(method, pattern string, h apiHandler) {
		r.Handle(method, pattern, s.instrument(pattern, s.authenticate(s.api(h), false, requestTimeout)))
	}

	handle("POST", "/api/login", s.handleLogin())
	handle("GET", "/api/oauth/github", s.handleGitHubStart())
	handle("GET", "/api/oauth/github/callback", s.handleGitHubCallback())
	handle("POST", "/api/oauth/github/claim", s.handleGitHubClaim())
	authed("GET", "/api/auth_user", s.handleAuthUser())
	authed("POST", "/api/refresh_token", s.handleRefreshToken())
	authed("POST", "/api/logout", s.handleLogout())
	authed("POST", "/api/logout/all", s.handleLogoutAll())
	authed("GET", "/api/usernames", s.handleUsernames())

	authed("POST", "/api/conversations", s.handleCreateConversation())
	authed("GET", "/api/conversations", s.handleListConversations())
	authed("GET", "/api/conversations/:id", s.handleGetConversation())
	authed("GET", "/api/conversations/:id/other_participant", s.handleOtherParticipant())
	authed("POST", "/api/conversations/:id/messages", s.handleCreateMessage())
	authed("GET", "/api/conversations/:id/messages", s.handleListMessages())
	authed("POST", "/api/conversations/:id/read_messages", s.handleReadMessages())
	authed("POST", "/api/conversations/:id/typing", s.handleTyping())
	// The stream lives as long as its client: no request timeout. It is the one
	// route that takes ?token=, since EventSource cannot send headers.
	r.Handle("GET", "/api/messages", s.instrument("/api/messages", s.authenticate(s.api(s.handleStream()), true, 0)))

	handle("GET", "/api/openapi.yaml", handleOpenAPI())
	handle("GET", "/healthz", s.handleHealthz())
	handle("GET", "/readyz", s.handleReadyz())
	if s.cfg.metricsAddr == "" {
		r.Handle("GET", "/metrics", s.metrics.handler())
	} else {
		// Served on METRICS_ADDR only (see serveMetrics).
		handle("GET", "/metrics", func(http.ResponseWriter, *http.Request) error { return errNotFound })
	}
}

// requestTimeout bounds every request but the event stream, so that a database
// that stops answering turns into errors instead of piled-up requests.
const requestTimeout = 15 * time.Second

func withTimeout(d time.Duration, h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), d)
		defer cancel()
		h(w, r.WithContext(ctx))
	}
}

// isAPI reports whether path is under /api/ as the router sees it (it ignores
// extra leading slashes).
func isAPI(path string) bool {
	return strings.HasPrefix(strings.TrimLeft(path, "/"), "api/")
}

// handleNotFound answers paths no route matched: JSON 404 under /api/, the web
// client everywhere else (so client-side routes survive a reload).
func (s *server) handleNotFound(w http.ResponseWriter, r *http.Request) {
	if isAPI(r.URL.Path) || strings.TrimLeft(r.URL.Path, "/") == "api" {
		s.respondError(w, r, errNotFound)
		return
	}
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		s.respondError(w, r, &apiError{kind: kindMethodNotAllowed, msg: "method not allowed"})
		return
	}
	serveWeb(w, r)
}

// handleHealthz serves GET /healthz: the process is up.
func (s *server) handleHealthz() apiHandler {
	return func(w http.ResponseWriter, r *http.Request) error {
		respond(w, http.StatusOK, map[string]string{"status": "ok"})
		return nil
	}
}

// handleReadyz serves GET /readyz: the database answers.
func (s *server) handleReadyz() apiHandler {
	return func(w http.ResponseWriter, r *http.Request) error {
		ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
		defer cancel()
		if err := s.db.PingContext(ctx); err != nil {
			respond(w, http.StatusServiceUnavailable, map[string]string{"status": "database unavailable"})
			return nil
		}
		respond(w, http.StatusOK, map[string]string{"status": "ok"})
		return nil
	}
}

// respond writes v as JSON with the status code.
func respond(w http.ResponseWriter, status int, v any) {
	var b []byte
	if m, ok := v.(Message); ok {
		// json.Marshal would run Message's MarshalJSON and then scan its output
		// again, byte by byte, to compact it: 4 % of the server's CPU at
		// saturation, for output that is compact already.
		b = m.encode()
	} else {
		var err error
		if b, err = json.Marshal(v); err != nil {
			http.Error(w, `{"error":"internal server error"}`, http.StatusInternalServerError)
			return
		}
	}
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.WriteHeader(status)
	w.Write(append(b, '\n'))
}

// isUnavailable reports whether err means the database cannot be reached right now,
// as during a restart or failover.
func isUnavailable(err error) bool {
	if errors.Is(err, errNoConnection) {
		return true
	}
	var pqErr *pq.Error
	if errors.As(err, &pqErr) {
		class := string(pqErr.Code)[:2]
		return class == "08" || class == "57" || class == "53"
	}
	var netErr net.Error
	return errors.Is(err, driver.ErrBadConn) || errors.Is(err, sql.ErrConnDone) || errors.Is(err, syscall.ECONNREFUSED) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, context.DeadlineExceeded) || errors.As(err, &netErr)
}

// decodeJSON reads a JSON request body into dst. It answers 415 for a body that is
// not JSON, 413 for one over maxBodyBytes, 422 for one that is not UTF-8 and 400 for
// malformed JSON or a field of the wrong type.
func decodeJSON(w http.ResponseWriter, r *http.Request, dst any) error {
	mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if err != nil || (mt != "application/json" && !strings.HasSuffix(mt, "+json")) {
		return &apiError{kind: kindUnsupportedMedia, msg: "request body must be JSON (Content-Type: application/json)"}
	}
	body, err := readBody(http.MaxBytesReader(w, r.Body, maxBodyBytes), r.ContentLength)
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			return &apiError{kind: kindTooLarge, msg: fmt.Sprintf("request body too large: %d bytes max", maxBodyBytes)}
		}
		return malformed("could not read request body")
	}
	if !utf8.Valid(body) {
		return &apiError{kind: kindInvalid, msg: "request body is not valid UTF-8"}
	}
	// One value and nothing else decodes at once; anything else goes through a
	// Decoder, whose errors say what is wrong (and which costs a buffer of its own).
	if json.Unmarshal(body, dst) == nil {
		return nil
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	if err := dec.Decode(dst); err != nil {
		var typeErr *json.UnmarshalTypeError
		switch {
		case errors.As(err, &typeErr) && typeErr.Field != "":
			return malformed(fmt.Sprintf("field %q must be a %s", typeErr.Field, typeErr.Type.Kind()))
		case errors.As(err, &typeErr):
			return malformed("request body must be a JSON object")
		case errors.Is(err, io.EOF):
			return malformed("request body is empty")
		default:
			return malformed("malformed JSON")
		}
	}
	if dec.More() {
		return malformed("malformed JSON: more than one value")
	}
	return nil
}

// readBody reads all of body, whose length the request declared as length (-1:
// unknown), into a buffer of that size: io.ReadAll would start at 512 bytes,
// several times an ordinary message.
func readBody(body io.Reader, length int64) ([]byte, error) {
	size := 512
	if length >= 0 && length < maxBodyBytes {
		size = int(length) + 1 // room to see the end of the body without growing
	}
	b := make([]byte, 0, size)
	for {
		n, err := body.Read(b[len(b):cap(b)])
		b = b[:len(b)+n]
		if err == io.EOF {
			return b, nil
		}
		if err != nil {
			return b, err
		}
		if len(b) == cap(b) {
			b = append(b, 0)[:len(b)]
		}
	}
}

// parseID parses an id from a path or query; anything but a positive integer in
// its one canonical spelling (no sign, no leading zeros) is reported as
// errNotFound, since no such row can exist.
func parseID(s string) (int64, error) {
	if len(s) == 0 || len(s) > 19 || s[0] < '1' || s[0] > '9' {
		return 0, errNotFound
	}
	id, err := strconv.ParseInt(s, 10, 64)
	if err != nil || id <= 0 {
		return 0, errNotFound
	}
	return id, nil
}

// parseCursor parses an optional ?before= cursor; 0 means the first page. A malformed
// cursor is a 400.
func parseCursor(r *http.Request) (int64, error) {
	s := r.URL.Query().Get("before")
	if s == "" {
		return 0, nil
	}
	id, err := parseID(s)
	if err != nil {
		return 0, malformed("before must be an id")
	}
	return id, nil
}

// pathID returns the :id path parameter.
func pathID(r *http.Request) (int64, error) {
	return parseID(way.Param(r.Context(), "id"))
}

// statusRecorder remembers the status a handler wrote, for logs and metrics.
type statusRecorder struct {
	http.ResponseWriter
	status int
}

func (rec *statusRecorder) WriteHeader(code int) {
	if rec.status == 0 {
		rec.status = code
	}
	rec.ResponseWriter.WriteHeader(code)
}

func (rec *statusRecorder) Write(b []byte) (int, error) {
	if rec.status == 0 {
		rec.status = http.StatusOK
	}
	return rec.ResponseWriter.Write(b)
}

// Unwrap lets http.ResponseController reach the connection (flush, deadlines).
func (rec *statusRecorder) Unwrap() http.ResponseWriter { return rec.ResponseWriter }

// statusClientGone is what the log and the metrics record for a request whose
// client left before it was answered (nginx's 499); no client ever receives it.
const statusClientGone = 499

// instrument logs one line per request and records its metrics under route.
func (s *server) instrument(route string, h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		rec := &statusRecorder{ResponseWriter: w}
		defer func() {
			switch {
			case rec.status != 0:
			case r.Context().Err() != nil:
				rec.status = statusClientGone // answered nothing: the client left first
			default:
				rec.status = http.StatusOK
			}
			d := time.Since(start)
			s.metrics.observeRequest(route, r.Method, rec.status, d)
			// The path is logged without its query: ?token= must never reach a log.
			s.logger.Info("request", "method", r.Method, "route", route, "path", r.URL.Path,
				"status", rec.status, "duration", d.Round(time.Microsecond), "client", clientIP(r))
		}()
		h.ServeHTTP(rec, r)
	})
}

// recoverPanics turns a panicking handler into a logged 500 instead of a dropped
// connection.
func (s *server) recoverPanics(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer func() {
			if v := recover(); v != nil {
				if v == http.ErrAbortHandler {
					panic(v)
				}
				s.respondError(w, r, fmt.Errorf("panic: %v", v))
			}
		}()
		h.ServeHTTP(w, r)
	})
}

// contentSecurityPolicy allows the web client its own scripts, styles and API, and
// avatars from https; nothing inline.
const contentSecurityPolicy = "default-src 'self'; img-src 'self' https: data:; style-src 'self'; " +
	"script-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"

// securityHeaders sets the headers every response carries.
func (s *server) securityHeaders(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hdr := w.Header()
		hdr.Set("X-Content-Type-Options", "nosniff")
		hdr.Set("Referrer-Policy", "no-referrer")
		if isAPI(r.URL.Path) {
			hdr.Set("Cache-Control", "no-store")
		} else {
			hdr.Set("Content-Security-Policy", contentSecurityPolicy)
			hdr.Set("X-Frame-Options", "DENY")
		}
		if s.cfg.origin.Scheme == "https" {
			hdr.Set("Strict-Transport-Security", "max-age=31536000")
		}
		h.ServeHTTP(w, r)
	})
}

// cors allows cross-origin API calls from ORIGIN only, and answers its preflights.
func (s *server) cors(h http.Handler) http.Handler {
	allowed := s.cfg.origin.Scheme + "://" + s.cfg.origin.Host
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		origin := r.Header.Get("Origin")
		if origin == "" || !isAPI(r.URL.Path) {
			h.ServeHTTP(w, r)
			return
		}
		w.Header().Add("Vary", "Origin")
		if origin != allowed {
			if r.Method == http.MethodOptions {
				s.respondError(w, r, forbidden("origin not allowed"))
				return
			}
			h.ServeHTTP(w, r)
			return
		}
		w.Header().Set("Access-Control-Allow-Origin", allowed)
		w.Header().Set("Access-Control-Allow-Credentials", "true")
		if r.Method == http.MethodOptions && r.Header.Get("Access-Control-Request-Method") != "" {
			w.Header().Set("Access-Control-Allow-Methods", "GET, POST")
			w.Header().Set("Access-Control-Allow-Headers", "Authorization, Content-Type, Idempotency-Key, Last-Event-ID")
			w.Header().Set("Access-Control-Max-Age", "600")
			w.WriteHeader(http.StatusNoContent)
			return
		}
		h.ServeHTTP(w, r)
	})
}
