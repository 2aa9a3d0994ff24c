// Package toolcall reads the tool calls a model writes in its own syntax, per model family,
// and says how to force one: the grammar of a well-formed call in that syntax.
package toolcall

import (
	"bytes"
	"encoding/json"
	"fmt"
	"regexp"
	"strings"

	"github.com/strata-llm/strata/pipeline/grammar"
)

// Family is a tool-call syntax.
type Family string

// The syntaxes known. Llama3 is the default: bare JSON {"name": ..., "parameters": ...},
// which is also what Strata renders for a template that has no tool support of its own.
const (
	Hermes   Family = "hermes"   // Hermes 2/3, Qwen 2.5/3: <tool_call>{json}</tool_call>
	Llama3   Family = "llama3"   // Llama 3.1-3.3: [<|python_tag|>]{"name":..,"parameters":..}
	Mistral  Family = "mistral"  // [TOOL_CALLS][{...}] or [TOOL_CALLS]name[ARGS]{...}
	DeepSeek Family = "deepseek" // <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>...
	GptOSS   Family = "gpt-oss"  // harmony: <|channel|>commentary to=functions.x ...<|message|>{...}<|call|>
)

// Detect tells a chat template's tool-call syntax from its text.
func Detect(template string) Family {
	switch {
	case strings.Contains(template, "<tool_call>"):
		return Hermes
	case strings.Contains(template, "[TOOL_CALLS]"):
		return Mistral
	case strings.Contains(template, "tool▁calls▁begin"):
		return DeepSeek
	case strings.Contains(template, "to=functions") || strings.Contains(template, "<|channel|>"):
		return GptOSS
	}
	return Llama3
}

// Call is one parsed tool call: a function name and its arguments as JSON text.
type Call struct {
	Name      string
	Arguments string
}

// Parse splits a model's output into its text content and the tool calls it made. Text
// that is not a well-formed call stays content, so nothing the model wrote is lost.
func Parse(f Family, text string) (content string, calls []Call) {
	switch f {
	case Hermes:
		content, calls = parseHermes(text)
	case Mistral:
		content, calls = parseMistral(text)
	case DeepSeek:
		content, calls = parseDeepSeek(text)
	case GptOSS:
		content, calls = parseHarmony(text)
	default:
		content, calls = parseLlama3(text)
	}
	for _, c := range calls {
		// A call needs a name and an arguments object; anything else is text after all.
		if c.Name == "" || !strings.HasPrefix(c.Arguments, "{") || !json.Valid([]byte(c.Arguments)) {
			return strings.TrimSpace(text), nil
		}
	}
	return content, calls
}

// callObject reads {"name": ..., "arguments"|"parameters": {...}} (arguments may also be a
// JSON string holding the object, as some models write them).
func callObject(raw []byte) (Call, bool) {
	var obj struct {
		Name       string          `json:"name"`
		Arguments  json.RawMessage `json:"arguments"`
		Parameters json.RawMessage `json:"parameters"`
		Function   *struct {
			Name      string          `json:"name"`
			Arguments json.RawMessage `json:"arguments"`
		} `json:"function"`
	}
	if err := json.Unmarshal(raw, &obj); err != nil {
		return Call{}, false
	}
	if obj.Function != nil && obj.Name == "" {
		obj.Name, obj.Arguments = obj.Function.Name, obj.Function.Arguments
	}
	args := obj.Arguments
	if len(args) == 0 {
		args = obj.Parameters
	}
	if obj.Name == "" {
		return Call{}, false
	}
	return Call{Name: obj.Name, Arguments: normArgs(args)}, true
}

// normArgs returns arguments as compact JSON object text ("{}" when absent).
func normArgs(args json.RawMessage) string {
	args = bytes.TrimSpace(args)
	if len(args) == 0 || string(args) == "null" {
		return "{}"
	}
	if args[0] == '"' { // a string holding JSON
		var s string
		if json.Unmarshal(args, &s) == nil && json.Valid([]byte(s)) {
			args = []byte(s)
		}
	}
	var b bytes.Buffer
	if json.Compact(&b, args) != nil {
		return string(args)
	}
	return b.String()
}

// jsonPrefix decodes the first JSON value of s, returning it and the rest of s.
func jsonPrefix(s string) (json.RawMessage, string, bool) {
	d := json.NewDecoder(strings.NewReader(s))
	var raw json.RawMessage
	if err := d.Decode(&raw); err != nil {
		return nil, s, false
	}
	return raw, s[d.InputOffset():], true
}

func parseHermes(text string) (string, []Call) {
	var content strings.Builder
	var calls []Call
	rest := text
	for {
		i := strings.Index(rest, "<tool_call>")
		if i < 0 {
			content.WriteString(rest)
			break
		}
		content.WriteString(rest[:i])
		body := rest[i+len("<tool_call>"):]
		end := strings.Index(body, "</tool_call>")
		inner := body
		if end >= 0 {
			inner, rest = body[:end], body[end+len("</tool_call>"):]
		} else {
			rest = ""
		}
		if c, ok := callObject([]byte(strings.TrimSpace(inner))); ok {
			calls = append(calls, c)
		} else if c, ok := qwenXMLCall(inner); ok {
			calls = append(calls, c)
		} else {
			content.WriteString("<tool_call>" + inner)
		}
	}
	return strings.TrimSpace(content.String()), calls
}

var (
	qwenFunc  = regexp.MustCompile(`(?s)<function=([^>\s]+)>(.*?)(?:</function>|$)`)
	qwenParam = regexp.MustCompile(`(?s)<parameter=([^>\s]+)>\n?(.*?)\n?</parameter>`)
)

// qwenXMLCall reads Qwen3-Coder's <function=name><parameter=p>value</parameter></function>.
func qwenXMLCall(inner string) (Call, bool) {
	m := qwenFunc.FindStringSubmatch(inner)
	if m == nil {
		return Call{}, false
	}
	args := map[string]any{}
	for _, p := range qwenParam.FindAllStringSubmatch(m[2], -1) {
		var v any
		if json.Unmarshal([]byte(p[2]), &v) == nil {
			args[p[1]] = v
		} else {
			args[p[1]] = p[2]
		}
	}
	b, _ := json.Marshal(args)
	return Call{Name: m[1], Arguments: string(b)}, true
}

// parseLlama3 reads Llama 3.1's JSON calls: an output that is (after an optional
// <|python_tag|>) one JSON object with a name, or several separated by ";".
func parseLlama3(text string) (string, []Call) {
	s := strings.TrimSpace(text)
	s = strings.TrimSpace(strings.TrimPrefix(s, "<|python_tag|>"))
	if !strings.HasPrefix(s, "{") && !strings.HasPrefix(s, "[") {
		return strings.TrimSpace(text), nil
	}
	var calls []Call
	for s != "" {
		raw, rest, ok := jsonPrefix(s)
		if !ok {
			return strings.TrimSpace(text), nil
		}
		if raw[0] == '[' {
			var list []json.RawMessage
			if json.Unmarshal(raw, &list) != nil {
				return strings.TrimSpace(text), nil
			}
			for _, item := range list {
				c, ok := callObject(item)
				if !ok {
					return strings.TrimSpace(text), nil
				}
				calls = append(calls, c)
			}
		} else {
			c, ok := callObject(raw)
			if !ok {
				return strings.TrimSpace(text), nil
			}
			calls = append(calls, c)
		}
		s = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(rest), ";"))
		s = strings.TrimSpace(strings.TrimSuffix(s, "<|eom_id|>"))
	}
	return "", calls
}

func parseMistral(text string) (string, []Call) {
	i := strings.Index(text, "[TOOL_CALLS]")
	if i < 0 {
		// The marker is a control token: without KeepControl it is gone, and a bare JSON
		// array or object of calls is what is left.
		if c, calls := parseLlama3(text); len(calls) > 0 {
			return c, calls
		}
		return strings.TrimSpace(text), nil
	}
	content := strings.TrimSpace(text[:i])
	var calls []Call
	for _, part := range strings.Split(text[i:], "[TOOL_CALLS]")[1:] {
		part = strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(part), "</s>"))
		if name, args, ok := strings.Cut(part, "[ARGS]"); ok { // Mistral Small 3.2, Devstral
			raw, _, ok := jsonPrefix(args)
			if !ok {
				return strings.TrimSpace(text), nil
			}
			calls = append(calls, Call{Name: strings.TrimSpace(strings.Split(name, "[CALL_ID]")[0]), Arguments: normArgs(raw)})
			continue
		}
		_, cs := parseLlama3(part)
		if len(cs) == 0 {
			return strings.TrimSpace(text), nil
		}
		calls = append(calls, cs...)
	}
	return content, calls
}

const (
	dsCallsBegin = "<｜tool▁calls▁begin｜>"
	dsCallsEnd   = "<｜tool▁calls▁end｜>"
	dsCallBegin  = "<｜tool▁call▁begin｜>"
	dsCallEnd    = "<｜tool▁call▁end｜>"
	dsSep        = "<｜tool▁sep｜>"
)

// parseDeepSeek reads V3's "function<｜tool▁sep｜>name\n```json\n{...}\n```" and V3.1's
// "name<｜tool▁sep｜>{...}" between the call markers.
func parseDeepSeek(text string) (string, []Call) {
	i := strings.Index(text, dsCallsBegin)
	if i < 0 {
		return strings.TrimSpace(text), nil
	}
	content := strings.TrimSpace(text[:i])
	body := text[i+len(dsCallsBegin):]
	if j := strings.Index(body, dsCallsEnd); j >= 0 {
		body = body[:j]
	}
	var calls []Call
	for _, part := range strings.Split(body, dsCallBegin)[1:] {
		part, _, _ = strings.Cut(part, dsCallEnd)
		head, args, ok := strings.Cut(part, dsSep)
		if !ok {
			return strings.TrimSpace(text), nil
		}
		name := strings.TrimSpace(head)
		if name == "function" { // V3: the type, then the name on the args' first line
			var nl string
			name, nl, _ = strings.Cut(args, "\n")
			name, args = strings.TrimSpace(name), nl
		}
		args = strings.TrimSpace(args)
		args = strings.TrimPrefix(args, "```json")
		args = strings.TrimSuffix(strings.TrimSpace(args), "```")
		raw, _, ok := jsonPrefix(args)
		if !ok {
			return strings.TrimSpace(text), nil
		}
		calls = append(calls, Call{Name: name, Arguments: normArgs(raw)})
	}
	return content, calls
}

var harmonyCall = regexp.MustCompile(`(?s)(?:<\|start\|>assistant)?(?:<\|channel\|>)?commentary\s+to=functions\.([A-Za-z0-9_.\-]+)\s*(?:<\|constrain\|>)?\s*(?:json)?\s*<\|message\|>(.*?)(?:<\|call\|>|<\|end\|>|$)`)
var harmonyFinal = regexp.MustCompile(`(?s)<\|channel\|>final<\|message\|>(.*?)(?:<\|end\|>|<\|return\|>|$)`)

// parseHarmony reads gpt-oss's harmony format: calls on the commentary channel addressed
// to=functions.name, the answer on the final channel (analysis is reasoning, not content).
func parseHarmony(text string) (string, []Call) {
	var calls []Call
	for _, m := range harmonyCall.FindAllStringSubmatch(text, -1) {
		raw, _, ok := jsonPrefix(m[2])
		if !ok {
			return strings.TrimSpace(text), nil
		}
		calls = append(calls, Call{Name: m[1], Arguments: normArgs(raw)})
	}
	content := ""
	if m := harmonyFinal.FindStringSubmatch(text); m != nil {
		content = strings.TrimSpace(m[1])
	} else if len(calls) == 0 {
		content = strings.TrimSpace(text)
	}
	return content, calls
}

// Function is a tool the model may call: its name and its parameters' JSON schema.
type Function struct {
	Name       string
	Parameters json.RawMessage
}

// Force is the grammar of exactly one well-formed call to one of fns in family f's syntax,
// for tool_choice "required" or a named function. Families whose call markers are control
// tokens (Mistral, DeepSeek, gpt-oss) cannot be spelled in text; for them, and for Llama 3,
// the call is bare JSON, which Parse reads for every family.
func Force(f Family, fns []Function) (*grammar.Grammar, error) {
	if len(fns) == 0 {
		return nil, fmt.Errorf("no function to call")
	}
	argKey := "arguments"
	if f == Llama3 {
		argKey = "parameters"
	}
	var alts []json.RawMessage
	for _, fn := range fns {
		params := bytes.TrimSpace(fn.Parameters)
		if len(params) == 0 || string(params) == "null" {
			params = []byte(`{"type":"object"}`)
		}
		name, _ := json.Marshal(fn.Name)
		alts = append(alts, json.RawMessage(fmt.Sprintf(
			`{"type":"object","properties":{"name":{"const":%s},%q:%s},"required":["name",%q],"additionalProperties":false}`,
			name, argKey, params, argKey)))
	}
	var schema []byte
	if len(alts) == 1 {
		schema = alts[0]
	} else {
		schema, _ = json.Marshal(map[string]any{"anyOf": alts})
	}
	if f == Hermes {
		return grammar.Sequence(grammar.Text("<tool_call>\n"), grammar.Value(schema), grammar.Text("\n</tool_call>"))
	}
	return grammar.FromSchema(schema)
}
