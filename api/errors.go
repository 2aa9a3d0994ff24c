package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"strconv"

	"github.com/strata-llm/strata/pipeline"
)

// apiError is an error in OpenAI's shape, with the HTTP status it is answered with.
type apiError struct {
	Status  int     `json:"-"`
	Message string  `json:"message"`
	Type    string  `json:"type"`
	Param   *string `json:"param"`
	Code    *string `json:"code"`
	// RetryAfter, in seconds, goes out as the Retry-After header (a busy swarm's 429).
	RetryAfter int `json:"-"`
}

func (e *apiError) Error() string { return e.Message }

func strp(s string) *string {
	if s == "" {
		return nil
	}
	return &s
}

func invalidRequest(param, message string) *apiError {
	return &apiError{Status: http.StatusBadRequest, Message: message, Type: "invalid_request_error", Param: strp(param)}
}

func invalidRequestCode(status int, param, code, message string) *apiError {
	return &apiError{Status: status, Message: message, Type: "invalid_request_error", Param: strp(param), Code: strp(code)}
}

func serverError(status int, message string) *apiError {
	t := "server_error"
	if status == http.StatusServiceUnavailable {
		t = "service_unavailable"
	}
	return &apiError{Status: status, Message: message, Type: t}
}

// statusError is how a Backend classifies its own errors: an error anywhere in the chain with
// an HTTPStatus method is answered with that status (4xx as invalid_request_error, e.g. a
// prompt longer than the context; 5xx as server errors). Others answer 500.
type statusError interface {
	error
	HTTPStatus() int
}

// backendError maps an error from the Backend to the answer the client gets. promptParam
// names the request field that holds the prompt ("messages" or "prompt"), which OpenAI
// blames when the prompt does not fit.
func backendError(err error, promptParam string) *apiError {
	var ae *apiError
	if errors.As(err, &ae) {
		return ae
	}
	// A swarm too busy to take the request now: come back later, as rate limits say.
	var ra interface{ RetryAfterSeconds() int }
	if errors.As(err, &ra) || errors.Is(err, pipeline.ErrBusy) {
		after := 1
		if ra != nil {
			after = ra.RetryAfterSeconds()
		}
		return &apiError{Status: http.StatusTooManyRequests, Message: err.Error(), Type: "rate_limit_error",
			Code: strp("rate_limit_exceeded"), RetryAfter: after}
	}
	var se statusError
	if errors.As(err, &se) {
		st := se.HTTPStatus()
		if st >= 400 && st < 500 {
			return &apiError{Status: st, Message: err.Error(), Type: "invalid_request_error"}
		}
		if st >= 500 && st < 600 {
			return serverError(st, err.Error())
		}
	}
	// The pipeline's own refusals. They are the client's to fix or the swarm's to heal, and a
	// 500 would tell an OpenAI client neither (its SDKs retry 503s and 504s, not 400s).
	switch {
	case errors.Is(err, pipeline.ErrContextLength):
		return invalidRequestCode(http.StatusBadRequest, promptParam, "context_length_exceeded", err.Error())
	case errors.Is(err, pipeline.ErrEmptyPrompt):
		return invalidRequest(promptParam, err.Error())
	case errors.Is(err, pipeline.ErrNoRoute), errors.Is(err, pipeline.ErrRouteUnavailable):
		return serverError(http.StatusServiceUnavailable, "the swarm cannot serve the model now: "+err.Error())
	case errors.Is(err, pipeline.ErrStepTimeout):
		return serverError(http.StatusGatewayTimeout, "a stage stopped answering: "+err.Error())
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return serverError(http.StatusGatewayTimeout, "generation timed out: "+err.Error())
	}
	return serverError(http.StatusInternalServerError, "generation failed: "+err.Error())
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetEscapeHTML(false) // prompts are full of <|special|> tokens; \u003c is just noise
	// The status is out; an encode error here means the client went away.
	_ = enc.Encode(v)
}

// marshal is json.Marshal without HTML escaping and without the trailing newline.
func marshal(v any) ([]byte, error) {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	return bytes.TrimSuffix(b.Bytes(), []byte("\n")), nil
}

func writeError(w http.ResponseWriter, e *apiError) {
	if e.RetryAfter > 0 {
		w.Header().Set("Retry-After", strconv.Itoa(e.RetryAfter))
	}
	writeJSON(w, e.Status, struct {
		Error *apiError `json:"error"`
	}{e})
}
