package api

import (
	"encoding/base64"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/strata-llm/strata/pipeline"
)

// TestBusyAndRouteErrors: a busy swarm is a 429 with Retry-After (queue full, waited too long,
// or no queue at all), and a route that could not open is a 503 with the reason, never a 500.
func TestBusyAndRouteErrors(t *testing.T) {
	b := newEcho()
	ts := startServer(t, b)
	body := `{"model":"llama-test","messages":[{"role":"user","content":"a b"}]}`
	stream := `{"model":"llama-test","stream":true,"messages":[{"role":"user","content":"a b"}]}`
	for _, c := range []struct {
		err    error
		status int
		retry  string
		says   string
	}{
		{&pipeline.QueueError{Err: pipeline.ErrQueueFull, Depth: 4, After: 3 * time.Second}, 429, "3", "already queued"},
		{&pipeline.QueueError{Err: pipeline.ErrQueueTimeout, Depth: 4, Wait: time.Minute}, 429, "1", "stayed busy"},
		{fmt.Errorf("open route: %w", pipeline.ErrBusy), 429, "1", "busy"},
		{fmt.Errorf("%w: stage 12D3: unreachable: context deadline exceeded", pipeline.ErrRouteUnavailable), 503, "", "deadline"},
	} {
		b.err = c.err
		for _, bd := range []string{body, stream} {
			req, _ := http.NewRequest("POST", ts.URL+"/v1/chat/completions", strings.NewReader(bd))
			req.Header.Set("Content-Type", "application/json")
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			raw, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != c.status || resp.Header.Get("Retry-After") != c.retry || !strings.Contains(string(raw), c.says) {
				t.Errorf("%v: %d Retry-After %q: %s", c.err, resp.StatusCode, resp.Header.Get("Retry-After"), raw)
			}
		}
	}
}

// TestAuthSchemesAndProtectAll: the bearer scheme is case-insensitive (RFC 7235); with
// WithProtectAll the node's routes need the key too, as a bearer token or as a browser's
// Basic password.
func TestAuthSchemesAndProtectAll(t *testing.T) {
	for _, protect := range []bool{false, true} {
		opts := []Option{WithAPIKey("s3cret")}
		if protect {
			opts = append(opts, WithProtectAll())
		}
		srv := NewServer(newEcho(), opts...)
		srv.Handle("GET /health", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") }))
		srv.Handle("GET /metrics", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "m") }))
		srv.Handle("GET /api/swarm", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "{}") }))
		srv.Handle("GET /", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "dashboard") }))
		ts := httptest.NewServer(srv)
		get := func(path, auth string) int {
			req, _ := http.NewRequest("GET", ts.URL+path, nil)
			if auth != "" {
				req.Header.Set("Authorization", auth)
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			return resp.StatusCode
		}
		for _, auth := range []string{"Bearer s3cret", "bearer s3cret", "BEARER  s3cret", "Basic " + base64.StdEncoding.EncodeToString([]byte("me:s3cret"))} {
			if st := get("/v1/models", auth); st != 200 {
				t.Errorf("%q on /v1/models: %d", auth, st)
			}
		}
		if st := get("/v1/models", "bearer wrong"); st != 401 {
			t.Errorf("a wrong key: %d", st)
		}
		for _, path := range []string{"/health", "/metrics", "/strata/swarm", "/"} {
			want := 200
			if protect {
				want = 401
			}
			if st := get(path, ""); st != want {
				t.Errorf("protect=%v: %s without a key: %d, want %d", protect, path, st, want)
			}
			if st := get(path, "Bearer s3cret"); st != 200 {
				t.Errorf("protect=%v: %s with the key: %d", protect, path, st)
			}
		}
		ts.Close()
	}
}
