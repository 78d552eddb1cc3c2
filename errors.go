package main

import (
	"context"
	"errors"
	"net/http"
	"strconv"
	"time"
)

// Errors. Code below the handlers (data access, validation, limits, the hub) says
// what went wrong in its own terms, with an apiError of one of the kinds below, or
// returns any other error for a fault of the server. respondError turns both into
// the answer: statusOf maps each kind to its status code, in this one place, and
// faults become a logged 500 (or 503 when the database cannot be reached) whose
// text never reaches the client.

// errorKind is what kind of failure an apiError is.
type errorKind uint8

const (
	kindMalformed        errorKind = iota + 1 // the request cannot be read: 400
	kindUnauthenticated                       // no valid token or session: 401
	kindForbidden                             // allowed to nobody: 403
	kindNotFound                              // no such thing, or not the caller's: 404
	kindMethodNotAllowed                      // 405
	kindNotAcceptable                         // the client does not accept what the route serves: 406
	kindTooLarge                              // 413
	kindUnsupportedMedia                      // 415
	kindInvalid                               // a field's value is not allowed: 422
	kindTooMany                               // a rate limit or a cap: 429
	kindUnavailable                           // try again shortly: 503
)

// statusOf is the status code of each kind.
var statusOf = map[errorKind]int{
	kindMalformed:        http.StatusBadRequest,
	kindUnauthenticated:  http.StatusUnauthorized,
	kindForbidden:        http.StatusForbidden,
	kindNotFound:         http.StatusNotFound,
	kindMethodNotAllowed: http.StatusMethodNotAllowed,
	kindNotAcceptable:    http.StatusNotAcceptable,
	kindTooLarge:         http.StatusRequestEntityTooLarge,
	kindUnsupportedMedia: http.StatusUnsupportedMediaType,
	kindInvalid:          http.StatusUnprocessableEntity,
	kindTooMany:          http.StatusTooManyRequests,
	kindUnavailable:      http.StatusServiceUnavailable,
}

// apiError is a failure the client is told about: its kind, the message it sees,
// and for kindInvalid the field at fault.
type apiError struct {
	kind       errorKind
	msg        string
	field      string        // kindInvalid: the body field or header at fault
	retryAfter time.Duration // kindTooMany, kindUnavailable: when to try again
}

func (e *apiError) Error() string { return e.msg }

func malformed(msg string) *apiError       { return &apiError{kind: kindMalformed, msg: msg} }
func unauthenticated(msg string) *apiError { return &apiError{kind: kindUnauthenticated, msg: msg} }
func forbidden(msg string) *apiError       { return &apiError{kind: kindForbidden, msg: msg} }
func notFound(msg string) *apiError        { return &apiError{kind: kindNotFound, msg: msg} }

// invalid reports that field holds a value that is not allowed.
func invalid(field, msg string) *apiError {
	return &apiError{kind: kindInvalid, msg: msg, field: field}
}

// tooMany reports a limit reached; the client may try again after retryAfter.
func tooMany(msg string, retryAfter time.Duration) *apiError {
	return &apiError{kind: kindTooMany, msg: msg, retryAfter: retryAfter}
}

// unavailable reports that the server cannot answer now; the client may try again
// after retryAfter.
func unavailable(msg string, retryAfter time.Duration) *apiError {
	return &apiError{kind: kindUnavailable, msg: msg, retryAfter: retryAfter}
}

// errNotFound is returned for anything the caller cannot see: a missing row, or one
// that belongs to somebody else.
var errNotFound = notFound("not found")

// apiHandler is a handler that returns its failure instead of answering it.
type apiHandler func(w http.ResponseWriter, r *http.Request) error

// api turns h into an http.HandlerFunc that answers h's error with respondError.
func (s *server) api(h apiHandler) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if err := h(w, r); err != nil {
			s.respondError(w, r, err)
		}
	}
}

// respondError answers err: an apiError with its kind's status code and message,
// any other error as a fault of the server, logged, with a generic message.
func (s *server) respondError(w http.ResponseWriter, r *http.Request, err error) {
	var ae *apiError
	switch {
	case errors.Is(r.Context().Err(), context.Canceled):
		// The client is gone: whatever failed (often a query cancelled with the
		// request, which PostgreSQL reports as 57014) is no fault to log, and there
		// is nobody to answer. A request that ran out of time (DeadlineExceeded) is
		// answered 503 below.
		return
	case errors.As(err, &ae):
	case isUnavailable(err):
		s.logger.Error("database unavailable", "method", r.Method, "path", r.URL.Path, "err", err)
		ae = unavailable("service unavailable, try again shortly", time.Second)
	default:
		s.logger.Error("internal error", "method", r.Method, "path", r.URL.Path, "err", err)
		respondJSONError(w, http.StatusInternalServerError, "internal server error", nil)
		return
	}
	status := statusOf[ae.kind]
	if status == 0 {
		status = http.StatusInternalServerError
	}
	if ae.kind == kindUnauthenticated {
		w.Header().Set("WWW-Authenticate", `Bearer realm="messenger"`)
	}
	if ae.retryAfter > 0 {
		w.Header().Set("Retry-After", strconv.Itoa(int((ae.retryAfter+time.Second-1)/time.Second)))
	}
	var fields map[string]string
	if ae.field != "" {
		fields = map[string]string{ae.field: ae.msg}
	}
	respondJSONError(w, status, ae.msg, fields)
}

// respondJSONError writes the error body. message repeats error for the original
// front end of the article series, which reads it (docs/api.md, "Differences from
// the original front end").
func respondJSONError(w http.ResponseWriter, status int, msg string, fields map[string]string) {
	respond(w, status, errorBody(msg, fields))
}

// errorBody is the JSON body of an error answer.
func errorBody(msg string, fields map[string]string) any {
	return struct {
		Error   string            `json:"error"`
		Message string            `json:"message"`
		Errors  map[string]string `json:"errors,omitempty"`
	}{msg, msg, fields}
}
