package api

import (
	"bufio"
	"encoding/json"
	"net/http"
	"strings"
	"testing"

	"github.com/strata-llm/strata/shard"
)

// TestAnthropicMessages: /v1/messages on a real generator, whole and streamed as Anthropic's
// events in their documented order, with errors in Anthropic's shape.
func TestAnthropicMessages(t *testing.T) {
	b := realServer(t, shard.Range{Start: 0, End: 3}, shard.Range{Start: 3, End: 6})
	ts := startServer(t, b, WithAPIKey("k"))
	post := func(body string) *http.Response {
		req, _ := http.NewRequest("POST", ts.URL+"/v1/messages", strings.NewReader(body))
		req.Header.Set("x-api-key", "k")
		req.Header.Set("anthropic-version", "2023-06-01")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		return resp
	}
	const base = `"model":"tiny","max_tokens":8,"temperature":0,"system":"Be brief.","messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}]`
	resp := post(`{` + base + `}`)
	var msg anthResponse
	if err := json.NewDecoder(resp.Body).Decode(&msg); err != nil || resp.StatusCode != 200 {
		t.Fatalf("%d %v", resp.StatusCode, err)
	}
	resp.Body.Close()
	if msg.Type != "message" || msg.Role != "assistant" || len(msg.Content) != 1 || msg.Content[0].Type != "text" ||
		*msg.StopReason != "max_tokens" || msg.Usage.OutputTokens != 8 || msg.Usage.InputTokens == 0 || !strings.HasPrefix(msg.ID, "msg_") {
		t.Fatalf("message %+v", msg)
	}

	resp = post(`{"stream":true,` + base + `}`)
	defer resp.Body.Close()
	var names []string
	var text strings.Builder
	var final map[string]any
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
		if err := json.Unmarshal([]byte(d), &ev); err != nil || ev["type"] != names[len(names)-1] {
			t.Fatalf("data %q after event %q", d, names[len(names)-1])
		}
		switch ev["type"] {
		case "content_block_delta":
			text.WriteString(ev["delta"].(map[string]any)["text"].(string))
		case "message_delta":
			final = ev
		case "message_start":
			if in := ev["message"].(map[string]any)["usage"].(map[string]any)["input_tokens"]; in != float64(msg.Usage.InputTokens) {
				t.Fatalf("message_start input_tokens %v, want %d", in, msg.Usage.InputTokens)
			}
		}
	}
	order := strings.Join(names, " ")
	if !strings.HasPrefix(order, "message_start content_block_start ping content_block_delta") ||
		!strings.HasSuffix(order, "content_block_delta content_block_stop message_delta message_stop") {
		t.Fatalf("events %s", order)
	}
	if text.String() != msg.Content[0].Text || final["delta"].(map[string]any)["stop_reason"] != "max_tokens" ||
		final["usage"].(map[string]any)["output_tokens"] != 8.0 {
		t.Fatalf("streamed %q vs %q, final %v", text.String(), msg.Content[0].Text, final)
	}

	for _, tc := range []struct{ body, typ, says string }{
		{`{"model":"tiny","messages":[{"role":"user","content":"hi"}]}`, "invalid_request_error", "max_tokens"},
		{`{"model":"tiny","max_tokens":5,"tools":[{"name":"f"}],"messages":[{"role":"user","content":"hi"}]}`, "invalid_request_error", "tools"},
		{`{"model":"tiny","max_tokens":5,"messages":[{"role":"user","content":[{"type":"image"}]}]}`, "invalid_request_error", "image"},
		{`{"model":"tiny","max_tokens":5,"temperature":1.5,"messages":[{"role":"user","content":"hi"}]}`, "invalid_request_error", "temperature"},
		{`{"model":"nope","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}`, "not_found_error", "nope"},
		{`{"model":"tiny","max_tokens":5,"container":"x","messages":[{"role":"user","content":"hi"}]}`, "invalid_request_error", "container"},
	} {
		resp := post(tc.body)
		var e anthropicErrorBody
		_ = json.NewDecoder(resp.Body).Decode(&e)
		resp.Body.Close()
		if resp.StatusCode < 400 || e.Type != "error" || e.Error.Type != tc.typ || !strings.Contains(e.Error.Message, tc.says) {
			t.Errorf("%s: %d %+v", tc.body, resp.StatusCode, e)
		}
	}
}
