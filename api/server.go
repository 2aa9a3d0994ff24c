// Package api serves Strata's swarm through the OpenAI HTTP API (chat and text completions,
// plain and streamed as server-sent events, and the model list), Ollama's API (/api/...) and
// Anthropic's Messages (/v1/messages), so that clients of any of them can talk to any node.
package api

import (
	"context"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"runtime/debug"
	"strings"
	"time"

	"github.com/strata-llm/strata/pipeline"
)

// Backend is what the server needs from the node: the models it can serve and a way to run a
// completion on the swarm.
//
// Generate calls emit, from one goroutine at a time and only before it returns, with each
// piece of text as soon as it is final; if emit returns an error (the client went away)
// Generate should stop and return it. ctx is cancelled when the client disconnects. Errors
// with an HTTPStatus() int method anywhere in their chain are answered with that status.
// The pipeline's sentinels are mapped as OpenAI would answer them: ErrContextLength 400
// context_length_exceeded, ErrEmptyPrompt 400, ErrNoRoute 503, ErrStepTimeout 504. Others
// are answered 500. Once a stream has started, the error goes out as an SSE error event.
type Backend interface {
	Models(ctx context.Context) ([]pipeline.ModelCard, error)
	Generate(ctx context.Context, req pipeline.Request, emit func(pipeline.Delta) error) (pipeline.Result, error)
}

// Server is an http.Handler for the OpenAI-compatible API. The node can mount its own routes
// (/health, /metrics, a dashboard at "/") on the same mux with Handle.
type Server struct {
	backend Backend
	apiKey  string
	// protectAll: the node's routes need the key too (--protect-monitoring).
	protectAll bool
	log        *slog.Logger
	now        func() time.Time
	maxBody    int64
	templates  *templates

	apiMux   *http.ServeMux // /v1/...
	extraMux *http.ServeMux // everything else, mounted by the node
	handler  http.Handler
}

// Option configures a Server.
type Option func(*Server)

// WithAPIKey requires "Authorization: Bearer key" on every /v1/ route. Routes added with
// Handle are not covered: the node decides what /health or a dashboard expose. An empty key
// leaves the API open.
func WithAPIKey(key string) Option { return func(s *Server) { s.apiKey = key } }

// WithProtectAll puts the node's own routes (/health, /metrics, the dashboard and its JSON)
// behind the API key too, not only /v1.
func WithProtectAll() Option { return func(s *Server) { s.protectAll = true } }

// WithLogger sets the logger for request summaries and recovered panics.
func WithLogger(l *slog.Logger) Option {
	return func(s *Server) {
		if l != nil {
			s.log = l
		}
	}
}

// WithClock sets the time source for "created" fields and strftime_now in chat templates.
func WithClock(now func() time.Time) Option {
	return func(s *Server) {
		if now != nil {
			s.now = now
		}
	}
}

// WithMaxBodyBytes bounds request bodies (default 16 MiB); larger ones are answered 413.
func WithMaxBodyBytes(n int64) Option {
	return func(s *Server) {
		if n > 0 {
			s.maxBody = n
		}
	}
}

// NewServer returns the API handler for backend.
func NewServer(backend Backend, opts ...Option) *Server {
	s := &Server{
		backend:  backend,
		log:      slog.New(slog.NewTextHandler(io.Discard, nil)),
		now:      time.Now,
		maxBody:  16 << 20,
		apiMux:   http.NewServeMux(),
		extraMux: http.NewServeMux(),
	}
	for _, o := range opts {
		o(s)
	}
	s.templates = newTemplates(s.now)

	// Methods are checked in the handlers, not in the patterns, so that a wrong method gets
	// OpenAI's JSON error shape rather than the mux's plain-text 405.
	s.apiMux.Handle("/v1/chat/completions", s.method(http.MethodPost, s.handleChat))
	s.apiMux.Handle("/v1/completions", s.method(http.MethodPost, s.handleCompletion))
	s.apiMux.Handle("/v1/models", s.method(http.MethodGet, s.handleModels))
	s.apiMux.Handle("/v1/models/{id...}", s.method(http.MethodGet, s.handleModel))
	s.apiMux.Handle("/v1/embeddings", s.method(http.MethodPost, s.handleEmbeddings))
	s.mountOllama()
	s.mountAnthropic()
	s.apiMux.Handle("/v1/", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		writeError(w, invalidRequestCode(http.StatusNotFound, "", "unknown_url", fmt.Sprintf("unknown endpoint %s %s", r.Method, r.URL.Path)))
	}))
	api := s.auth(s.apiMux)
	var extra http.Handler = s.extraMux
	if s.protectAll {
		// Basic lets a browser ask for the key (as the password) on the dashboard and send
		// it with the page's own requests; scripts send a bearer token as to /v1.
		extra = s.authAs(s.extraMux, `Basic realm="strata", charset="UTF-8"`)
	}
	// Two muxes, split on the /v1 prefix: the node's routes (a dashboard at "GET /") would
	// otherwise conflict with the API's method-less patterns and make ServeMux panic.
	s.handler = s.recover(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if isAPIPath(r.URL.Path) {
			api.ServeHTTP(w, r)
			return
		}
		extra.ServeHTTP(w, r)
	}))
	return s
}

// isAPIPath: /v1/ is OpenAI's (and Anthropic's /v1/messages), /api/ Ollama's.
func isAPIPath(p string) bool {
	return p == "/v1" || strings.HasPrefix(p, "/v1/") || strings.HasPrefix(p, "/api/")
}

// Handle mounts a route of the node's (/health, /metrics, a dashboard at "/") beside the API,
// with http.ServeMux patterns. Routes outside /v1/ are not covered by the API key: the node
// decides what they expose. Routes under /v1/ join the API, behind its key; like ServeMux,
// a pattern that conflicts with an existing one panics at setup.
func (s *Server) Handle(pattern string, h http.Handler) {
	path := pattern
	if i := strings.IndexByte(path, ' '); i >= 0 { // "GET /path"
		path = strings.TrimLeft(path[i+1:], " \t")
	}
	if i := strings.IndexByte(path, '/'); i > 0 { // "host/path"
		path = path[i:]
	}
	if isAPIPath(path) {
		s.apiMux.Handle(pattern, h)
		return
	}
	s.extraMux.Handle(pattern, h)
}

// ServeHTTP implements http.Handler.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) { s.handler.ServeHTTP(w, r) }

func (s *Server) method(m string, h http.HandlerFunc) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != m {
			w.Header().Set("Allow", m)
			writeError(w, invalidRequestCode(http.StatusMethodNotAllowed, "", "method_not_allowed",
				fmt.Sprintf("%s %s is not allowed; use %s", r.Method, r.URL.Path, m)))
			return
		}
		h(w, r)
	})
}

// credentials extracts the key from an Authorization header: "Bearer KEY" with the scheme
// in any case (RFC 7235), or HTTP Basic with the key as the password, which is what a browser
// sends for a dashboard behind --protect-monitoring once it has asked for it.
func credentials(header string) (string, bool) {
	scheme, rest, ok := strings.Cut(strings.TrimSpace(header), " ")
	if !ok {
		return "", false
	}
	rest = strings.TrimSpace(rest)
	switch {
	case strings.EqualFold(scheme, "Bearer"):
		return rest, true
	case strings.EqualFold(scheme, "Basic"):
		raw, err := base64.StdEncoding.DecodeString(rest)
		if err != nil {
			return "", false
		}
		_, pass, ok := strings.Cut(string(raw), ":")
		return pass, ok
	}
	return "", false
}

func (s *Server) auth(h http.Handler) http.Handler {
	return s.authAs(h, `Bearer realm="strata"`)
}

func (s *Server) authAs(h http.Handler, challenge string) http.Handler {
	if s.apiKey == "" {
		return h
	}
	want := []byte(s.apiKey)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got := r.Header.Get("Authorization")
		if k := r.Header.Get("X-Api-Key"); got == "" && k != "" {
			got = "Bearer " + k // Anthropic's clients send the key this way
		}
		if got == "" {
			w.Header().Set("WWW-Authenticate", challenge)
			writeErrorFor(w, r, invalidRequestCode(http.StatusUnauthorized, "", "missing_api_key",
				"missing API key: send it as 'Authorization: Bearer KEY'"))
			return
		}
		if key, ok := credentials(got); !ok || subtle.ConstantTimeCompare([]byte(key), want) != 1 {
			w.Header().Set("WWW-Authenticate", challenge+`, error="invalid_token"`)
			writeErrorFor(w, r, invalidRequestCode(http.StatusUnauthorized, "", "invalid_api_key", "incorrect API key"))
			return
		}
		h.ServeHTTP(w, r)
	})
}

// recover is the last resort: a panic in a handler is logged with its stack and answered 500
// (if nothing was written yet) instead of killing the connection silently.
// writeErrorFor answers e in the shape the path's API uses: Ollama's under /api/, Anthropic's
// at /v1/messages, OpenAI's elsewhere.
func writeErrorFor(w http.ResponseWriter, r *http.Request, e *apiError) {
	switch {
	case strings.HasPrefix(r.URL.Path, "/api/"):
		ollamaAPIError(w, e)
	case r.URL.Path == "/v1/messages":
		anthropicError(w, e)
	default:
		writeError(w, e)
	}
}

func (s *Server) recover(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rw := &recordingWriter{ResponseWriter: w}
		defer func() {
			v := recover()
			if v == nil {
				return
			}
			if err, ok := v.(error); ok && errors.Is(err, http.ErrAbortHandler) {
				panic(v) // net/http's own way to abort a response
			}
			s.log.Error("panic serving request", "method", r.Method, "path", r.URL.Path, "panic", v, "stack", string(debug.Stack()))
			if !rw.wrote {
				writeErrorFor(rw, r, serverError(http.StatusInternalServerError, "internal error"))
			}
		}()
		h.ServeHTTP(rw, r)
	})
}

// recordingWriter notes whether the response has started. Unwrap lets
// http.ResponseController reach the real writer's Flush.
type recordingWriter struct {
	http.ResponseWriter
	wrote bool
}

func (w *recordingWriter) WriteHeader(code int) {
	w.wrote = true
	w.ResponseWriter.WriteHeader(code)
}

func (w *recordingWriter) Write(b []byte) (int, error) {
	w.wrote = true
	return w.ResponseWriter.Write(b)
}

func (w *recordingWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

func (s *Server) handleModels(w http.ResponseWriter, r *http.Request) {
	cards, err := s.backend.Models(r.Context())
	if err != nil {
		writeError(w, serverError(http.StatusServiceUnavailable, "listing models: "+err.Error()))
		return
	}
	list := modelList{Object: "list", Data: make([]modelObject, 0, len(cards))}
	for _, c := range cards {
		list.Data = append(list.Data, modelObj(c))
	}
	writeJSON(w, http.StatusOK, list)
}

func (s *Server) handleModel(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	cards, err := s.backend.Models(r.Context())
	if err != nil {
		writeError(w, serverError(http.StatusServiceUnavailable, "listing models: "+err.Error()))
		return
	}
	for _, c := range cards {
		if c.ID == id {
			writeJSON(w, http.StatusOK, modelObj(c))
			return
		}
	}
	writeError(w, invalidRequestCode(http.StatusNotFound, "model", "model_not_found", fmt.Sprintf("model %q does not exist", id)))
}

func modelObj(c pipeline.ModelCard) modelObject {
	return modelObject{ID: c.ID, Object: "model", OwnedBy: "strata", ContextLength: c.ContextLength, SHA256: c.SHA256, Ready: c.Ready}
}

// findModel resolves the request's model. An empty name is accepted when the swarm serves
// exactly one model, as local servers commonly allow.
func (s *Server) findModel(ctx context.Context, name string) (pipeline.ModelCard, *apiError) {
	cards, err := s.backend.Models(ctx)
	if err != nil {
		return pipeline.ModelCard{}, serverError(http.StatusServiceUnavailable, "listing models: "+err.Error())
	}
	if name == "" {
		if len(cards) == 1 {
			return cards[0], nil
		}
		return pipeline.ModelCard{}, invalidRequest("model", "you must provide a model parameter")
	}
	for _, c := range cards {
		if c.ID == name {
			return c, nil
		}
	}
	ids := make([]string, len(cards))
	for i, c := range cards {
		ids[i] = c.ID
	}
	return pipeline.ModelCard{}, invalidRequestCode(http.StatusNotFound, "model", "model_not_found",
		fmt.Sprintf("model %q does not exist; this swarm serves: %s", name, strings.Join(ids, ", ")))
}
