package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"mime"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"strings"
	"sync"
	"testing"

	"github.com/getkin/kin-openapi/openapi3"
	"github.com/getkin/kin-openapi/openapi3filter"
	"github.com/getkin/kin-openapi/routers"
	"github.com/getkin/kin-openapi/routers/gorillamux"
)

// The contract check: every response to an API request that the test suite
// receives (through http.DefaultTransport, which the harness's clients use) is
// validated against docs/openapi.yaml. A route, a status or a body shape that the
// document does not allow is recorded as a violation, and the test whose server
// answered it fails (see newTestServer), as does the run (TestMain).

// contractChecker validates responses and keeps the violations it finds.
type contractChecker struct {
	router routers.Router

	mu         sync.Mutex // guards violations
	violations []violation
}

// violation is one response that broke the contract, and the server that sent it.
type violation struct {
	host string // host:port of the server
	what string
}

// contract is the test run's checker, installed by TestMain.
var contract *contractChecker

// loadContract parses and validates docs/openapi.yaml; servers are dropped so that
// routes match on any host (test servers listen on random ports).
func loadContract() (*contractChecker, error) {
	loader := openapi3.NewLoader()
	doc, err := loader.LoadFromFile("docs/openapi.yaml")
	if err != nil {
		return nil, fmt.Errorf("load docs/openapi.yaml: %w", err)
	}
	if err := doc.Validate(context.Background()); err != nil {
		return nil, fmt.Errorf("docs/openapi.yaml is not a valid OpenAPI document: %w", err)
	}
	doc.Servers = nil
	router, err := gorillamux.NewRouter(doc)
	if err != nil {
		return nil, fmt.Errorf("route docs/openapi.yaml: %w", err)
	}
	return &contractChecker{router: router}, nil
}

// installContractCheck makes http.DefaultTransport check every API response.
func installContractCheck() error {
	c, err := loadContract()
	if err != nil {
		return err
	}
	contract = c
	http.DefaultTransport = &contractTransport{next: http.DefaultTransport, check: c}
	return nil
}

// contractTransport checks each response it carries; it never changes one.
type contractTransport struct {
	next  http.RoundTripper
	check *contractChecker
}

func (ct *contractTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := ct.next.RoundTrip(req)
	if err != nil || !contractCovers(req) || resp.StatusCode == http.StatusRequestHeaderFieldsTooLarge {
		// 431 is net/http's own plain-text answer to oversized headers, sent before
		// any route is looked at (docs/api.md, "Limits").
		return resp, err
	}
	if isEventStream(resp) {
		// The stream's body is live; its status and headers are checked.
		if v := ct.check.validate(req, resp, nil); v != "" {
			ct.check.record(req.URL.Host, v)
		}
		return resp, nil
	}
	body, readErr := io.ReadAll(resp.Body)
	resp.Body.Close()
	resp.Body = io.NopCloser(bytes.NewReader(body))
	if readErr != nil {
		return resp, nil // the connection broke: nothing to judge
	}
	if v := ct.check.validate(req, resp, body); v != "" {
		ct.check.record(req.URL.Host, v)
	}
	return resp, nil
}

// contractCovers reports whether the document describes req's path: the API and
// the operations endpoints. CORS preflights (OPTIONS) are answered by middleware
// for every API path and described in docs/api.md.
func contractCovers(req *http.Request) bool {
	if req.Method == http.MethodOptions {
		return false
	}
	p := req.URL.Path
	return isAPI(p) || strings.TrimLeft(p, "/") == "api" || p == "/healthz" || p == "/readyz" || p == "/metrics"
}

func isEventStream(resp *http.Response) bool {
	mt, _, _ := mime.ParseMediaType(resp.Header.Get("Content-Type"))
	return mt == "text/event-stream"
}

// validate returns why resp breaks the contract, or "". body nil: the body is not
// checked. A request no documented route matches must get the API's 404.
func (c *contractChecker) validate(req *http.Request, resp *http.Response, body []byte) string {
	where := fmt.Sprintf("%s %s → %d", req.Method, req.URL.Path, resp.StatusCode)
	route, params, err := c.router.FindRoute(req)
	if err != nil {
		var e struct {
			Error *string `json:"error"`
		}
		if resp.StatusCode == http.StatusNotFound && json.Unmarshal(body, &e) == nil && e.Error != nil {
			return ""
		}
		return fmt.Sprintf("%s: no such route in docs/openapi.yaml (%v), and not the API's 404", where, err)
	}
	input := &openapi3filter.ResponseValidationInput{
		RequestValidationInput: &openapi3filter.RequestValidationInput{Request: req, PathParams: params, Route: route},
		Status:                 resp.StatusCode,
		Header:                 resp.Header,
		Options:                &openapi3filter.Options{IncludeResponseStatus: true, ExcludeResponseBody: body == nil},
	}
	input.Options.WithCustomSchemaErrorFunc(func(err *openapi3.SchemaError) string {
		return fmt.Sprintf("at %s: %s", strings.Join(err.JSONPointer(), "/"), err.Reason) // not the whole schema
	})
	input.SetBodyBytes(body)
	if err := openapi3filter.ValidateResponse(context.Background(), input); err != nil {
		return fmt.Sprintf("%s: %v; body %.300s", where, err, body)
	}
	return ""
}

func (c *contractChecker) record(host, what string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.violations = append(c.violations, violation{host, what})
}

// of returns the violations of the server at host ("": of every server).
func (c *contractChecker) of(host string) []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []string
	for _, v := range c.violations {
		if host == "" || v.host == host {
			out = append(out, v.what)
		}
	}
	return out
}

// failOnContractViolations fails t if the server ts answers anything the contract
// does not allow while t runs (each test server listens on a port of its own, so
// tests running in parallel are told apart).
func failOnContractViolations(t testing.TB, ts *testServer) {
	t.Cleanup(func() {
		if contract == nil || ts.URL == "" {
			return
		}
		u, err := url.Parse(ts.URL)
		if err != nil {
			return
		}
		if v := contract.of(u.Host); len(v) > 0 {
			t.Errorf("%d responses that docs/openapi.yaml does not allow:\n%s", len(v), strings.Join(v, "\n"))
		}
	})
}

// TestContractCheckCatchesDrift shows the check can fail: an undocumented status,
// a body of the wrong shape and an undocumented route are each reported, and a
// documented answer is not.
func TestContractCheckCatchesDrift(t *testing.T) {
	t.Parallel()
	c, err := loadContract()
	if err != nil {
		t.Fatal(err)
	}
	answer := func(method, path string, status int, body string) string {
		req := httptest.NewRequest(method, "http://127.0.0.1:1"+path, nil)
		rec := httptest.NewRecorder()
		rec.Header().Set("Content-Type", "application/json; charset=utf-8")
		rec.WriteHeader(status)
		rec.WriteString(body)
		return c.validate(req, rec.Result(), []byte(body))
	}
	for _, tc := range []struct {
		name, method, path string
		status             int
		body               string
		ok                 bool
	}{
		{"documented", "GET", "/api/auth_user", 200, `{"id":"1","username":"ann","avatarURL":null}`, true},
		{"documented error", "GET", "/api/auth_user", 401, `{"error":"missing token","message":"missing token"}`, true},
		{"undocumented status", "GET", "/api/auth_user", 418, `{"error":"teapot"}`, false},
		{"wrong shape", "GET", "/api/auth_user", 200, `{"id":1,"username":"ann"}`, false},
		{"extra field", "GET", "/api/auth_user", 200, `{"id":"1","username":"ann","avatarURL":null,"admin":true}`, false},
		{"undocumented route", "GET", "/api/secret", 200, `{}`, false},
		{"unknown route's 404", "GET", "/api/secret", 404, `{"error":"not found","message":"not found"}`, true},
		{"undocumented method", "DELETE", "/api/conversations", 200, `[]`, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v := answer(tc.method, tc.path, tc.status, tc.body)
			if (v == "") != tc.ok {
				t.Errorf("got violation %q, want ok=%v", v, tc.ok)
			}
		})
	}
}

// TestOpenAPIServed checks GET /api/openapi.yaml serves the document in the repository.
func TestOpenAPIServed(t *testing.T) {
	t.Parallel()
	ts := newTestServer(t)
	resp, err := http.Get(ts.URL + "/api/openapi.yaml")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	got, _ := io.ReadAll(resp.Body)
	want, err := os.ReadFile("docs/openapi.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK || !bytes.Equal(got, want) {
		t.Fatalf("GET /api/openapi.yaml: status %d, %d bytes; want 200 and docs/openapi.yaml (%d bytes)", resp.StatusCode, len(got), len(want))
	}
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/yaml") {
		t.Errorf("Content-Type: got %q, want application/yaml", ct)
	}
}
