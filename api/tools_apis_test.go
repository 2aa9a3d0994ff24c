package api

import (
	"bufio"
	"encoding/json"
	"net/http"
	"strings"
	"testing"

	"github.com/strata-llm/strata/internal/testkit"
)

// postJSON posts body and decodes the JSON answer, whatever its status.
func postJSON(t *testing.T, url, body string) (int, map[string]any) {
	t.Helper()
	resp, err := http.Post(url, "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out map[string]any
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		t.Fatalf("%s: answer is not JSON: %v", url, err)
	}
	return resp.StatusCode, out
}

// Anthropic's Messages with tools on random weights: tool_choice any (plain) and a named tool
// (streamed) force a call, which comes back as a tool_use block whose input satisfies the
// tool's input_schema, streamed as Anthropic documents it (input_json_delta); tool_use and
// tool_result blocks in the conversation are accepted.
func TestAnthropicToolUse(t *testing.T) {
	ts := startServer(t, structuredServer(t))
	tools := `"tools":[{"name":"get_weather","description":"Weather forecast","input_schema":` + weatherParams + `},` +
		`{"name":"get_time","input_schema":{"type":"object","properties":{"tz":{"type":"string","maxLength":10}},"required":["tz"]}}]`
	base := `"model":"tiny","max_tokens":80,"temperature":0,` + tools + `,"messages":[{"role":"user","content":"Weather in Oslo?"}]`

	status, msg := postJSON(t, ts.URL+"/v1/messages", `{`+base+`,"tool_choice":{"type":"any"}}`)
	if status != 200 || msg["stop_reason"] != "tool_use" {
		t.Fatalf("%d %v", status, msg)
	}
	content := msg["content"].([]any)
	use := content[len(content)-1].(map[string]any)
	if use["type"] != "tool_use" || !strings.HasPrefix(use["id"].(string), "toolu_") {
		t.Fatalf("last block %v", use)
	}
	schema := map[string]string{"get_weather": weatherParams, "get_time": `{"type":"object","required":["tz"]}`}[use["name"].(string)]
	if err := testkit.ValidateJSON([]byte(schema), []byte(mustJSON(use["input"]))); schema == "" || err != nil {
		t.Fatalf("tool_use %v: %v", use, err)
	}

	req, _ := http.NewRequest("POST", ts.URL+"/v1/messages", strings.NewReader(`{"stream":true,`+base+`,"tool_choice":{"type":"tool","name":"get_time"}}`))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var names []string
	var input strings.Builder
	var started, stopReason any
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if n, ok := strings.CutPrefix(sc.Text(), "event: "); ok {
			names = append(names, n)
			continue
		}
		d, ok := strings.CutPrefix(sc.Text(), "data: ")
		if !ok {
			continue
		}
		var ev map[string]any
		if err := json.Unmarshal([]byte(d), &ev); err != nil {
			t.Fatal(err)
		}
		switch ev["type"] {
		case "content_block_start":
			started = ev["content_block"]
		case "content_block_delta":
			delta := ev["delta"].(map[string]any)
			if delta["type"] != "input_json_delta" {
				t.Fatalf("delta %v: the forced call leaves no text", delta)
			}
			input.WriteString(delta["partial_json"].(string))
		case "message_delta":
			stopReason = ev["delta"].(map[string]any)["stop_reason"]
		}
	}
	order := strings.Join(names, " ")
	if order != "message_start ping content_block_start content_block_delta content_block_stop message_delta message_stop" {
		t.Fatalf("events %s", order)
	}
	if b := started.(map[string]any); b["type"] != "tool_use" || b["name"] != "get_time" || stopReason != "tool_use" {
		t.Fatalf("block %v, stop %v", b, stopReason)
	}
	if err := testkit.ValidateJSON([]byte(`{"type":"object","required":["tz"]}`), []byte(input.String())); err != nil {
		t.Fatalf("streamed input %q: %v", input.String(), err)
	}

	// The call and its result go back in as blocks.
	turns := `"messages":[{"role":"user","content":"Weather in Oslo?"},` +
		`{"role":"assistant","content":[{"type":"text","text":"Checking."},{"type":"tool_use","id":"toolu_1","name":"get_weather","input":{"city":"Oslo","days":1,"unit":"celsius"}}]},` +
		`{"role":"user","content":[{"type":"tool_result","tool_use_id":"toolu_1","content":[{"type":"text","text":"3 degrees"}]},{"type":"text","text":"Thanks"}]}]`
	if status, msg := postJSON(t, ts.URL+"/v1/messages", `{"model":"tiny","max_tokens":4,`+tools+`,`+turns+`}`); status != 200 {
		t.Fatalf("tool_result turn: %d %v", status, msg)
	}
	for _, tc := range []struct{ body, says string }{
		{`{"model":"tiny","max_tokens":4,"tools":[{"type":"web_search_20250305","name":"web_search"}],"messages":[{"role":"user","content":"hi"}]}`, "web_search_20250305"},
		{`{"model":"tiny","max_tokens":4,` + tools + `,"tool_choice":{"type":"tool","name":"nope"},"messages":[{"role":"user","content":"hi"}]}`, "nope"},
		{`{"model":"tiny","max_tokens":4,"tool_choice":{"type":"any"},"messages":[{"role":"user","content":"hi"}]}`, "tool_choice"},
		{`{"model":"tiny","max_tokens":4,"messages":[{"role":"user","content":[{"type":"tool_use","name":"f","input":{}}]}]}`, "assistant"},
	} {
		status, e := postJSON(t, ts.URL+"/v1/messages", tc.body)
		if status != 400 || !strings.Contains(mustJSON(e), tc.says) {
			t.Errorf("%s: %d %v", tc.body, status, e)
		}
	}
}

// Ollama's /api/chat with tools: Ollama has no tool_choice, so on random weights the call is
// forced with format (a schema of the bare-JSON call the tiny model's Llama 3 template asks
// for); the client gets it in Ollama's shape (arguments as an object), plain and streamed.
// tool_calls and tool messages in the conversation are accepted.
func TestOllamaToolCalls(t *testing.T) {
	ts := startServer(t, structuredServer(t))
	format := `{"type":"object","properties":{"name":{"enum":["get_weather"]},"parameters":` + weatherParams + `},"required":["name","parameters"],"additionalProperties":false}`
	tools := `"tools":[{"type":"function","function":{"name":"get_weather","description":"Weather forecast","parameters":` + weatherParams + `}}]`
	body := func(stream bool) string {
		return `{"model":"tiny","stream":` + map[bool]string{true: "true", false: "false"}[stream] + `,"options":{"num_predict":80,"seed":1},` + tools +
			`,"format":` + format + `,"messages":[{"role":"user","content":"Weather in Oslo?"}]}`
	}
	check := func(calls any) {
		t.Helper()
		list, _ := calls.([]any)
		if len(list) != 1 {
			t.Fatalf("tool_calls %v", calls)
		}
		fn := list[0].(map[string]any)["function"].(map[string]any)
		if fn["name"] != "get_weather" {
			t.Fatalf("call %v", fn)
		}
		if err := testkit.ValidateJSON([]byte(weatherParams), []byte(mustJSON(fn["arguments"]))); err != nil {
			t.Fatalf("arguments %v: %v", fn["arguments"], err)
		}
	}
	status, lines := ollamaDo(t, ts, "POST", "/api/chat", body(false))
	if status != 200 || len(lines) != 1 {
		t.Fatalf("%d %v", status, lines)
	}
	check(lines[0]["message"].(map[string]any)["tool_calls"])

	status, lines = ollamaDo(t, ts, "POST", "/api/chat", body(true))
	if status != 200 || len(lines) < 2 || lines[len(lines)-1]["done"] != true {
		t.Fatalf("%d %v", status, lines)
	}
	var calls any
	for _, l := range lines[:len(lines)-1] {
		m := l["message"].(map[string]any)
		if c, ok := m["tool_calls"]; ok {
			calls = c
		} else if m["content"] != "" {
			t.Fatalf("content %q streamed: the reply is a call", m["content"])
		}
	}
	check(calls)

	turns := `"messages":[{"role":"user","content":"Weather in Oslo?"},` +
		`{"role":"assistant","content":"","tool_calls":[{"function":{"name":"get_weather","arguments":{"city":"Oslo","days":1,"unit":"celsius"}}}]},` +
		`{"role":"tool","tool_name":"get_weather","content":"3 degrees"}]`
	if status, lines := ollamaDo(t, ts, "POST", "/api/chat", `{"model":"tiny","stream":false,"options":{"num_predict":2},`+tools+`,`+turns+`}`); status != 200 {
		t.Fatalf("tool turn: %d %v", status, lines)
	}
	if status, lines := ollamaDo(t, ts, "POST", "/api/generate", `{"model":"tiny","prompt":"hi",`+tools+`}`); status != 400 {
		t.Fatalf("generate with tools: %d %v", status, lines)
	}
}
