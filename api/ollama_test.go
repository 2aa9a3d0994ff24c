package api

import (
	"bufio"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/strata-llm/strata/pipeline"
	"github.com/strata-llm/strata/shard"
)

func ollamaDo(t *testing.T, ts *httptest.Server, method, path, body string) (int, []map[string]any) {
	t.Helper()
	req, err := http.NewRequest(method, ts.URL+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var lines []map[string]any
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var m map[string]any
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			t.Fatalf("%s %s: line %q is not JSON", method, path, sc.Text())
		}
		lines = append(lines, m)
	}
	return resp.StatusCode, lines
}

// TestOllamaAPI: Ollama's endpoints on a real generator: the model list, show, version, chat
// and generate streamed as NDJSON and not, and errors as {"error": ...}.
func TestOllamaAPI(t *testing.T) {
	b := realServer(t, shard.Range{Start: 0, End: 3}, shard.Range{Start: 3, End: 6})
	ts := startServer(t, b)

	st, l := ollamaDo(t, ts, "GET", "/api/version", "")
	if st != 200 || l[0]["version"] != ollamaAPIVersion {
		t.Fatalf("version: %d %v", st, l)
	}
	for _, path := range []string{"/api/tags", "/api/ps"} {
		st, l = ollamaDo(t, ts, "GET", path, "")
		models, _ := l[0]["models"].([]any)
		if st != 200 || len(models) != 1 || models[0].(map[string]any)["name"] != "tiny" {
			t.Fatalf("%s: %d %v", path, st, l)
		}
	}
	st, l = ollamaDo(t, ts, "POST", "/api/show", `{"model":"tiny:latest"}`)
	if st != 200 || l[0]["template"] == "" || l[0]["details"].(map[string]any)["format"] != "gguf" {
		t.Fatalf("show: %d %v", st, l)
	}

	opts := `"options":{"temperature":0,"num_predict":8,"seed":1,"num_ctx":4096}`
	st, l = ollamaDo(t, ts, "POST", "/api/chat", `{"model":"tiny","stream":false,`+opts+`,"messages":[{"role":"user","content":"hi"}]}`)
	if st != 200 || len(l) != 1 || l[0]["done"] != true || l[0]["done_reason"] != "length" || l[0]["eval_count"] != 8.0 {
		t.Fatalf("chat: %d %v", st, l)
	}
	whole := l[0]["message"].(map[string]any)["content"].(string)
	st, l = ollamaDo(t, ts, "POST", "/api/chat", `{"model":"tiny",`+opts+`,"keep_alive":"5m","messages":[{"role":"user","content":"hi"}]}`)
	var streamed strings.Builder
	for _, m := range l[:len(l)-1] {
		if m["done"] != false {
			t.Fatalf("piece %v", m)
		}
		streamed.WriteString(m["message"].(map[string]any)["content"].(string))
	}
	if last := l[len(l)-1]; st != 200 || last["done"] != true || streamed.String() != whole || last["prompt_eval_count"].(float64) < 1 {
		t.Fatalf("streamed chat: %d %q vs %q, last %v", st, streamed.String(), whole, last)
	}

	st, l = ollamaDo(t, ts, "POST", "/api/generate", `{"model":"tiny","prompt":"Once upon a time","raw":true,"stream":false,`+opts+`}`)
	if st != 200 || l[0]["done"] != true || l[0]["response"] == "" {
		t.Fatalf("generate: %d %v", st, l)
	}
	raw := l[0]["response"].(string)
	st, l = ollamaDo(t, ts, "POST", "/api/generate", `{"model":"tiny","prompt":"Once upon a time","raw":true,`+opts+`}`)
	streamed.Reset()
	for _, m := range l {
		streamed.WriteString(m["response"].(string))
	}
	if st != 200 || streamed.String() != raw || l[len(l)-1]["done"] != true {
		t.Fatalf("streamed generate %q vs %q: %v", streamed.String(), raw, l)
	}
	// An empty prompt loads the model, as Ollama answers it.
	if st, l = ollamaDo(t, ts, "POST", "/api/generate", `{"model":"tiny"}`); st != 200 || l[0]["done_reason"] != "load" {
		t.Fatalf("load: %d %v", st, l)
	}

	// format: the answer is JSON that the schema accepts, even from random weights.
	st, l = ollamaDo(t, ts, "POST", "/api/chat", `{"model":"tiny","stream":false,"options":{"num_predict":40},"format":{"type":"object","properties":{"ok":{"type":"boolean"}},"required":["ok"]},"messages":[{"role":"user","content":"hi"}]}`)
	if st != 200 {
		t.Fatalf("chat with format: %d %v", st, l)
	}
	content, _ := l[0]["message"].(map[string]any)["content"].(string)
	var obj struct {
		OK *bool `json:"ok"`
	}
	if err := json.Unmarshal([]byte(content), &obj); err != nil || obj.OK == nil {
		t.Fatalf("chat with format: content %q is not the schema's JSON (%v)", content, err)
	}

	for _, tc := range []struct {
		method, path, body string
		status             int
		says               string
	}{
		{"POST", "/api/chat", `{"model":"nope","messages":[{"role":"user","content":"hi"}]}`, 404, "model 'nope' not found"},
		{"POST", "/api/chat", `{"model":"tiny","format":"yaml","messages":[{"role":"user","content":"hi"}]}`, 400, "format"},
		{"POST", "/api/chat", `{"model":"tiny","tools":[{"type":"function"}],"messages":[{"role":"user","content":"hi"}]}`, 400, "tools"},
		{"POST", "/api/chat", `{"model":"tiny","options":{"mirostat":2},"messages":[{"role":"user","content":"hi"}]}`, 400, "mirostat"},
		{"POST", "/api/chat", `{"model":"tiny","options":{"bogus":1},"messages":[{"role":"user","content":"hi"}]}`, 400, "bogus"},
		{"POST", "/api/chat", `{"model":"tiny","messages":[{"role":"user","content":"hi","images":["aGk="]}]}`, 400, "images"},
		{"POST", "/api/chat", `{"model":"tiny","extra":1,"messages":[]}`, 400, "extra"},
		{"POST", "/api/generate", `{"model":"tiny","prompt":"` + strings.Repeat("word ", 2*realContext) + `"}`, 400, "context"},
		{"POST", "/api/generate", `{"model":"tiny","prompt":"a","template":"{{ .Prompt }}"}`, 400, "template"},
		{"GET", "/api/chat", ``, 405, "POST"},
		{"POST", "/api/pull", `{"model":"x"}`, 404, "unknown endpoint"},
	} {
		st, l := ollamaDo(t, ts, tc.method, tc.path, tc.body)
		msg, _ := l[0]["error"].(string)
		if st != tc.status || !strings.Contains(msg, tc.says) {
			t.Errorf("%s %s %s: %d %v, want %d saying %q", tc.method, tc.path, tc.body, st, l, tc.status, tc.says)
		}
	}
}

// Ollama's options are a JSON object, so their order carries no meaning: repeat_last_n 0
// turns the penalty off whether repeat_penalty comes before or after it.
func TestOllamaOptionsOrderFree(t *testing.T) {
	for _, body := range []string{
		`{"repeat_penalty":1.3,"repeat_last_n":0,"temperature":0.5,"top_k":7}`,
		`{"repeat_last_n":0,"temperature":0.5,"top_k":7,"repeat_penalty":1.3}`,
	} {
		for range 20 { // map iteration order varies run to run
			var o ollamaOptions
			if err := json.Unmarshal([]byte(body), &o); err != nil {
				t.Fatal(err)
			}
			var req pipeline.Request
			if e := o.apply(&req, pipeline.ModelCard{ContextLength: 128}); e != nil {
				t.Fatalf("%s: %v", body, e)
			}
			if p := req.Sampling; p.RepeatPenalty != 0 || p.Temperature != 0.5 || p.TopK != 7 {
				t.Fatalf("%s: got %+v, want the penalty off, temperature 0.5, top_k 7", body, p)
			}
		}
	}
}
