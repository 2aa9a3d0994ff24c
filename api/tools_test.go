package api

import (
	"strings"
	"testing"

	"github.com/strata-llm/strata/api/toolcall"
)

// The stream sends text as it comes until it may be a call, and never sends a call's
// markup as content.
func TestToolStreamHoldsCalls(t *testing.T) {
	tests := []struct {
		fam     toolcall.Family
		pieces  []string
		sent    string // content streamed before the end
		content string // content left at the end
		calls   int
	}{
		{toolcall.Hermes, []string{"Let me ", "check. <to", "ol_call>\n{\"name\": \"f\", ", "\"arguments\": {}}\n</tool_call>"}, "Let me check. ", "", 1},
		{toolcall.Hermes, []string{"Plain ", "<b>text</b>", " here"}, "Plain <b>text</b> here", "", 0},
		{toolcall.Hermes, []string{"a <tool", "box"}, "a <toolbox", "", 0}, // released once it cannot be a marker
		{toolcall.Llama3, []string{" ", "{\"name\": \"f\",", " \"parameters\": {\"x\": 1}}"}, "", "", 1},
		{toolcall.Llama3, []string{"Sure", ", {not json}"}, "Sure, {not json}", "", 0},
		{toolcall.Llama3, []string{"{\"a\": ", "1}"}, "", "{\"a\": 1}", 0},
		{toolcall.DeepSeek, []string{"Ok.", "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>f<｜tool▁sep｜>{}<｜tool▁call▁end｜><｜tool▁calls▁end｜>"}, "Ok.", "", 1},
	}
	for _, tc := range tests {
		s := &toolStream{ts: &toolSet{family: tc.fam, native: true}}
		var sent strings.Builder
		for _, p := range tc.pieces {
			sent.WriteString(s.push(p))
		}
		content, calls := s.finish()
		if sent.String() != tc.sent || content != tc.content || len(calls) != tc.calls {
			t.Errorf("%s %q: sent %q, then %q and %d calls; want %q, %q, %d", tc.fam, tc.pieces, sent.String(), content, len(calls), tc.sent, tc.content, tc.calls)
		}
	}
}

// A forced call is bare JSON whatever the family's own syntax: it is held whole when
// streamed and read as a call (gpt-oss's harmony markers are control tokens text cannot spell).
func TestForcedCallBareJSON(t *testing.T) {
	for _, fam := range []toolcall.Family{toolcall.GptOSS, toolcall.Mistral, toolcall.DeepSeek} {
		ts := &toolSet{family: fam, native: true, force: []toolcall.Function{{Name: "f"}}}
		s := &toolStream{ts: ts}
		var sent string
		for _, p := range []string{`{"name": "f", `, `"arguments": {"x": 1}}`} {
			sent += s.push(p)
		}
		content, calls := s.finish()
		if sent != "" || content != "" || len(calls) != 1 || calls[0].Name != "f" || calls[0].Arguments != `{"x":1}` {
			t.Errorf("%s: sent %q, content %q, calls %+v", fam, sent, content, calls)
		}
	}
}
