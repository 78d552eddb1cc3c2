package main

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"io"
	"math"
	"net/http"
	"net/http/httptest"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
	"unicode"
	"unicode/utf8"
)

// The fuzz targets' seeds live in testdata/fuzz/FuzzXxx/ and run as ordinary tests
// in `make test`; to fuzz one, with DATABASE_URL set as `make test` sets it:
//
//	go test -run '^$' -fuzz '^FuzzNormalizeContent$' -fuzztime 60s .

// isValidationError reports whether err is a 422 naming field.
func isValidationError(err error, field string) bool {
	var ae *apiError
	return errors.As(err, &ae) && ae.kind == kindInvalid && ae.field == field
}

// referenceNormalize is the API's rule for message content, written as plainly as
// possible: split into lines at CR, LF or CRLF; a line with a control character
// (other than white space) is refused; each line's words, separated by Unicode
// White_Space or U+FEFF, are joined by one space; blank lines are dropped; what
// remains must be 1 to 480 runes.
func referenceNormalize(s string) (string, bool) {
	if !utf8.ValidString(s) {
		return "", false
	}
	isSpace := func(r rune) bool {
		return r != '\n' && r != '\r' && (unicode.Is(unicode.White_Space, r) || r == '\uFEFF')
	}
	var lines []string
	for _, line := range strings.FieldsFunc(s, func(r rune) bool { return r == '\n' || r == '\r' }) {
		for _, r := range line {
			if !isSpace(r) && unicode.IsControl(r) {
				return "", false
			}
		}
		if words := strings.FieldsFunc(line, isSpace); len(words) > 0 {
			lines = append(lines, strings.Join(words, " "))
		}
	}
	out := strings.Join(lines, "\n")
	return out, out != "" && utf8.RuneCountInString(out) <= maxContentRunes
}

func FuzzNormalizeContent(f *testing.F) {
	f.Add("hello")
	f.Add("  many   spaces\t\tand tabs  ")
	f.Add("a\r\nb\rc\n\n\n d \n")
	f.Add("\u00a0\u3000nbsp\u2028line\u2029para\u0085nel")
	f.Add("\ufeffbom\ufeff inside\ufeff")
	f.Add(strings.Repeat("x\n\n", 3000))
	f.Add("bell\x07")
	f.Add(strings.Repeat("é", 480) + "  \n ")
	f.Fuzz(func(t *testing.T, s string) {
		out, err := normalizeContent(s)
		want, wantOK := referenceNormalize(s)
		if err != nil {
			if !isValidationError(err, "content") {
				t.Fatalf("normalizeContent(%q): got error %v, want a 422 on content", s, err)
			}
			if wantOK {
				t.Fatalf("normalizeContent(%q): got %v, want %q", s, err, want)
			}
			return
		}
		if !wantOK || out != want {
			t.Fatalf("normalizeContent(%q) = %q, want %q (ok %v)", s, out, want, wantOK)
		}
		if !utf8.ValidString(out) {
			t.Fatalf("normalizeContent(%q) = %q: not UTF-8", s, out)
		}
		if n := utf8.RuneCountInString(out); n < 1 || n > maxContentRunes {
			t.Fatalf("normalizeContent(%q): %d runes, want 1 to %d", s, n, maxContentRunes)
		}
		for i, line := range strings.Split(out, "\n") {
			first, _ := utf8.DecodeRuneInString(line)
			last, _ := utf8.DecodeLastRuneInString(line)
			if line == "" || isContentSpace(first) || isContentSpace(last) {
				t.Fatalf("normalizeContent(%q) = %q: line %d %q is blank or not trimmed", s, out, i, line)
			}
			prevSpace := false
			for _, r := range line {
				if isContentSpace(r) && r != ' ' || unicode.IsControl(r) || r == ' ' && prevSpace {
					t.Fatalf("normalizeContent(%q) = %q: line %d has %q where one space or a character belongs", s, out, i, r)
				}
				prevSpace = r == ' '
			}
		}
		again, err := normalizeContent(out)
		if err != nil || again != out {
			t.Fatalf("normalizeContent(%q) = %q, %v; want it unchanged (idempotent)", out, again, err)
		}
	})
}

// schemaUsernameRE is the username CHECK of schema.sql, so the test follows the
// schema rather than a copy of it.
var schemaUsernameRE = regexp.MustCompile(regexp.MustCompile(`username ~ '([^']+)'`).FindStringSubmatch(schemaSQL)[1])

func FuzzValidateUsername(f *testing.F) {
	for _, s := range []string{"jane", "Jane_Doe-99", "", "a b", strings.Repeat("x", 39), strings.Repeat("x", 40), "jäne", "bob\n"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		err := validateUsername(s)
		if got, want := err == nil, schemaUsernameRE.MatchString(s); got != want {
			t.Fatalf("validateUsername(%q) = %v, but the schema's %s matches: %v", s, err, schemaUsernameRE, want)
		}
		if err != nil && !isValidationError(err, "username") {
			t.Fatalf("validateUsername(%q): got %v, want a 422 on username", s, err)
		}
	})
}

func FuzzParseID(f *testing.F) {
	for _, s := range []string{"1", "42", "0", "-1", "+1", "007", "9223372036854775807", "9223372036854775808", " 1", "1e3", "0x1f", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		id, err := parseID(s)
		n, perr := strconv.ParseInt(s, 10, 64)
		canonical := perr == nil && n > 0 && strconv.FormatInt(n, 10) == s
		switch {
		case err == nil && (!canonical || id != n):
			t.Fatalf("parseID(%q) = %d, want errNotFound: only the canonical spelling of a positive id is an id", s, id)
		case err != nil && canonical:
			t.Fatalf("parseID(%q) = %v, want %d", s, err, n)
		case err != nil && err != error(errNotFound):
			t.Fatalf("parseID(%q): got %v, want errNotFound", s, err)
		}

		// As a ?before= cursor: absent is the first page, anything else a 400.
		r := httptest.NewRequest("GET", "/?before="+url.QueryEscape(s), nil)
		cursor, err := parseCursor(r)
		var ae *apiError
		switch {
		case s == "" && (err != nil || cursor != 0):
			t.Fatalf("parseCursor(empty) = %d, %v; want 0, nil", cursor, err)
		case s != "" && canonical && (err != nil || cursor != n):
			t.Fatalf("parseCursor(%q) = %d, %v; want %d", s, cursor, err, n)
		case s != "" && !canonical && !(errors.As(err, &ae) && ae.kind == kindMalformed):
			t.Fatalf("parseCursor(%q) = %d, %v; want a 400", s, cursor, err)
		}
	})
}

// TestTokenSignatureUnchanged checks that the pooled signer signs as before it was
// pooled, the HMAC of "token:" and the payload, each time it is used: tokens that
// running instances issued stay valid across an upgrade.
func TestTokenSignatureUnchanged(t *testing.T) {
	signer := &tokenSigner{key: []byte("a key of at least thirty-two bytes, for tests"), ttl: time.Hour}
	for _, payload := range []string{"42.7.1800003600", "1.1.1", "42.7.1800003600"} {
		if got, want := signer.sign([]byte(payload)), hmacSHA256(signer.key, "token:"+payload); !bytes.Equal(got, want) {
			t.Fatalf("sign(%q) = %x, want %x", payload, got, want)
		}
	}
}

func FuzzTokenParse(f *testing.F) {
	signer := &tokenSigner{key: []byte("a fuzzing key of at least thirty-two bytes"), ttl: time.Hour}
	now := time.Unix(1_800_000_000, 0)
	valid, _ := signer.issue(42, 7, now, time.Time{})
	f.Add(valid, int64(42), uint16(0), byte('B'))
	f.Add(valid[:len(valid)-1]+"B", int64(1), uint16(len(valid)-1), byte('B'))
	f.Add("", int64(0), uint16(3), byte('.'))
	f.Add("NDIuMTgwMDAwMzYwMA.", int64(-5), uint16(7), byte('\n'))
	f.Add(valid[:10]+"\r\n"+valid[10:], int64(42), uint16(10), byte('\r'))
	f.Add("a.b.c", int64(math.MaxInt64), uint16(65535), byte(0xff))
	// A well-signed token in the format from before sessions (user.expiry).
	old := base64.RawURLEncoding.EncodeToString([]byte("42.1800003600"))
	f.Add(old+"."+base64.RawURLEncoding.EncodeToString(signer.sign([]byte("42.1800003600"))), int64(42), uint16(0), byte('A'))
	f.Fuzz(func(t *testing.T, token string, userID int64, pos uint16, b byte) {
		// Any string: parse never panics and accepts only what issue produced.
		if c, err := signer.parse(token, now); err == nil {
			if want, _ := signer.issue(c.userID, c.sessionID, c.expires.Add(-signer.ttl), time.Time{}); token != want ||
				c.userID <= 0 || c.sessionID <= 0 || !now.Before(c.expires) {
				t.Fatalf("parse(%q) accepted %+v; issue makes %q", token, c, want)
			}
		} else if err != error(errTokenInvalid) && err != error(errTokenExpired) {
			t.Fatalf("parse(%q): got %v, want errTokenInvalid or errTokenExpired", token, err)
		}

		// A token issue produced is accepted until it expires, and the same token
		// with any one byte changed is refused.
		if userID <= 0 {
			userID = max(userID&math.MaxInt64, 1)
		}
		sessionID := userID/2 + 1
		tok, exp := signer.issue(userID, sessionID, now, time.Time{})
		if c, err := signer.parse(tok, now); err != nil || c.userID != userID || c.sessionID != sessionID || !c.expires.Equal(exp) {
			t.Fatalf("parse(issue(%d, %d)) = %+v, %v; want %d, %d, %v", userID, sessionID, c, err, userID, sessionID, exp)
		}
		if _, err := signer.parse(tok, exp.Add(-time.Nanosecond)); err != nil {
			t.Fatalf("parse(issue(%d)) just before expiry: %v", userID, err)
		}
		if _, err := signer.parse(tok, exp); err != error(errTokenExpired) {
			t.Fatalf("parse(issue(%d)) at expiry: got %v, want errTokenExpired", userID, err)
		}
		i := int(pos) % len(tok)
		if b == tok[i] {
			b ^= 0x01
		}
		changed := tok[:i] + string([]byte{b}) + tok[i+1:]
		if c, err := signer.parse(changed, now); err == nil {
			t.Fatalf("parse(%q) accepted %+v: it is %q with byte %d changed", changed, c, tok, i)
		}
		inserted := tok[:i] + string([]byte{b}) + tok[i:]
		if c, err := signer.parse(inserted, now); err == nil {
			t.Fatalf("parse(%q) accepted %+v: it is %q with a byte inserted at %d", inserted, c, tok, i)
		}
	})
}

// isHTTPToken reports whether s is an HTTP token (a method or header name).
func isHTTPToken(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0) {
			return false
		}
	}
	return true
}

// isHeaderValue reports whether s can be sent as a header value.
func isHeaderValue(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < ' ' && c != '\t' || c == 0x7f {
			return false
		}
	}
	return true
}

// escapeQuery percent-encodes the bytes a request line cannot carry, and leaves the
// rest of the query string as the fuzzer wrote it.
func escapeQuery(q string) string {
	var b strings.Builder
	for i := 0; i < len(q); i++ {
		if c := q[i]; c <= ' ' || c >= 0x7f || c == '#' {
			b.WriteString("%" + strings.ToUpper(strconv.FormatUint(uint64(c)|0x100, 16)[1:]))
		} else {
			b.WriteByte(c)
		}
	}
	return b.String()
}

// FuzzHTTP throws requests at every route of one server, on a database of its own,
// and checks that no answer is a 5xx, that errors under /api/ are JSON, and that a
// refused request (4xx) changed nothing in the database.
func FuzzHTTP(f *testing.F) {
	ts := newTestServer(f, "DATABASE_URL="+privateDatabase(f))
	alice, bob, carol := ts.login(f, "alice"), ts.login(f, "bob"), ts.login(f, "carol")
	conv := alice.startConversation(bob) // id 1 in this fresh database, as are alice's user and first message
	bob.startConversation(carol)
	alice.send(conv.ID, "hello")
	bob.send(conv.ID, "hi alice")
	expired, _ := devSigner(f, ts, -time.Hour).issue(alice.User.ID, 1, time.Now(), time.Time{})
	ghost, _ := devSigner(f, ts, time.Hour).issue(1<<40, 1<<40, time.Now(), time.Time{})
	tokens := []string{"", alice.Token, bob.Token, carol.Token, alice.Token, "garbage", expired, ghost}
	host := strings.TrimPrefix(ts.URL, "http://")

	f.Add("GET", "/api/conversations", "before=1", "", "", "", []byte(nil), uint8(1))
	f.Add("POST", "/api/conversations/1/messages", "", "Idempotency-Key", "k1", "application/json", []byte(`{"content":"hi"}`), uint8(3))
	f.Add("GET", "/api/messages", "last_event_id=1", "Accept", "text/event-stream", "", []byte(nil), uint8(4))
	f.Add("POST", "/api/login", "", "", "", "application/json", []byte(`{"username":"ja\xffne"}`), uint8(0))

	f.Fuzz(func(t *testing.T, method, path, query, hname, hvalue, ctype string, body []byte, auth uint8) {
		// Requests net/http itself refuses or rewrites (bad methods and headers, request
		// lines and headers over the limit, Expect and framing headers) test net/http,
		// not this server.
		if !isHTTPToken(method) || method == "CONNECT" || len(path) > 4096 || len(query) > 8192 ||
			len(hvalue) > 8192 || len(ctype) > 1024 || !isHeaderValue(ctype) || len(body) > 64<<10 {
			return
		}
		if hname != "" && (!isHTTPToken(hname) || !isHeaderValue(hvalue)) {
			return
		}
		switch http.CanonicalHeaderKey(hname) {
		case "Expect", "Content-Length", "Transfer-Encoding", "Host", "Connection", "Upgrade", "Te", "Trailer":
			return
		}
		if !strings.HasPrefix(path, "/") {
			path = "/" + path
		}
		token := tokens[int(auth)%len(tokens)]
		if auth%uint8(len(tokens)) == 4 && token != "" {
			query = "token=" + token + "&" + query
			token = ""
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		req, err := http.NewRequestWithContext(ctx, method, ts.URL, strings.NewReader(string(body)))
		if err != nil {
			t.Fatalf("new request: %v", err)
		}
		req.URL = &url.URL{Scheme: "http", Host: host, Path: path, RawQuery: escapeQuery(query)}
		if len(body) == 0 {
			req.Body, req.ContentLength = http.NoBody, 0
		}
		if ctype != "" {
			req.Header.Set("Content-Type", ctype)
		}
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		if hname != "" {
			req.Header.Add(hname, hvalue)
		}

		before := dbFingerprint(t, ts.DB)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatalf("%s %s?%s: %v", method, path, query, err)
		}
		res := rawResponse{status: resp.StatusCode, header: resp.Header}
		if strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream") {
			cancel() // a stream that opened; it would go on forever
		} else if res.body, err = io.ReadAll(io.LimitReader(resp.Body, 4<<20)); err != nil {
			t.Fatalf("%s %s?%s: read body: %v", method, path, query, err)
		}
		resp.Body.Close()

		if res.status >= 500 {
			t.Fatalf("%s %s?%s: got %d %.300s", method, path, query, res.status, res.body)
		}
		if (path == "/api" || strings.HasPrefix(path, "/api/")) && method != "HEAD" {
			if p := errorBodyProblem(res); p != "" {
				t.Fatalf("%s %s?%s: %d: %s", method, path, query, res.status, p)
			}
		}
		if res.status >= 400 {
			if after := dbFingerprint(t, ts.DB); after != before {
				t.Fatalf("%s %s?%s: %d, and the database changed:\n got %s\nwant %s", method, path, query, res.status, after, before)
			}
		}
	})
}

// messageShape is Message as the API shows it, as a plain struct: what
// encoding/json writes for it is the oracle appendMessageJSON must match.
type messageShape struct {
	ID             int64  `json:"id,string"`
	Content        string `json:"content"`
	ConversationID int64  `json:"conversationId,string"`
	CreatedAt      string `json:"createdAt"`
	Mine           bool   `json:"mine"`
}

// FuzzMessageJSON checks that appendMessageJSON, which writes the 201 and the
// streams' frames, and Message's MarshalJSON (lists of messages) write exactly
// what encoding/json writes for the API's shape, for any content and time.
func FuzzMessageJSON(f *testing.F) {
	f.Add("hello", int64(1))
	f.Add("<script>&\u2028\u2029\"\\\n\t</script>", int64(1<<62))
	f.Add("\xff invalid UTF-8 \xc3", int64(7))
	f.Add("\x00\x01\b\f\r\x1f\x7f \u00e9\U0001F600 \xed\xa0\x80", int64(-5))
	f.Fuzz(func(t *testing.T, content string, id int64) {
		m := Message{ID: id, Content: content, ConversationID: id / 2, CreatedAt: time.UnixMicro(id % (1 << 50)), Mine: id%2 == 0}
		want, err := json.Marshal(messageShape{m.ID, m.Content, m.ConversationID, m.CreatedAt.UTC().Format(timeLayout), m.Mine})
		if err != nil {
			t.Fatal(err)
		}
		if got := appendMessageJSON([]byte("x"), m); !bytes.Equal(got[1:], want) || got[0] != 'x' {
			t.Fatalf("appendMessageJSON = %s, encoding/json = %s", got, want)
		}
		inList, err := json.Marshal([]Message{m})
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(inList, append(append([]byte("["), want...), ']')) {
			t.Fatalf("json.Marshal([]Message) = %s, want [%s]", inList, want)
		}
	})
}
