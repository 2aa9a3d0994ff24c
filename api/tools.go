package api

import (
	"bytes"
	"encoding/json"
	"fmt"
	"maps"
	"strings"
	"sync"

	"github.com/strata-llm/strata/api/toolcall"
	"github.com/strata-llm/strata/pipeline/grammar"
)

// responseFormat is OpenAI's response_format: text, json_object, or json_schema.
type responseFormat struct {
	Type       string `json:"type"`
	JSONSchema *struct {
		Name   string          `json:"name"`
		Schema json.RawMessage `json:"schema"`
		Strict *bool           `json:"strict"`
	} `json:"json_schema"`
}

// grammar compiles the format into the constraint the generator applies (nil for text).
func (rf *responseFormat) grammar() (*grammar.Grammar, *apiError) {
	if rf == nil {
		return nil, nil
	}
	switch rf.Type {
	case "", "text":
		return nil, nil
	case "json_object":
		return grammar.JSONObject(), nil
	case "json_schema":
		if rf.JSONSchema == nil || len(bytes.TrimSpace(rf.JSONSchema.Schema)) == 0 {
			return nil, invalidRequest("response_format.json_schema.schema", "response_format json_schema needs json_schema.schema")
		}
		g, err := grammar.FromSchema(rf.JSONSchema.Schema)
		if err != nil {
			return nil, invalidRequest("response_format.json_schema.schema", err.Error())
		}
		return g, nil
	}
	return nil, invalidRequest("response_format.type", fmt.Sprintf("response_format type %q is not supported (text, json_object or json_schema)", rf.Type))
}

// toolSet is a chat request's tools and what the model's template makes of them.
type toolSet struct {
	raw    []any // the tools as sent, for the template's "tools" variable
	fns    []toolcall.Function
	family toolcall.Family
	force  []toolcall.Function // tool_choice "required" or a named function
	native bool                // the template renders tools itself
}

type toolDef struct {
	Type     string `json:"type"`
	Function *struct {
		Name        string          `json:"name"`
		Description string          `json:"description"`
		Parameters  json.RawMessage `json:"parameters"`
	} `json:"function"`
}

// parseTools reads tools and tool_choice; nil means the request uses no tools (none sent,
// or tool_choice "none").
func parseTools(rawTools, rawChoice json.RawMessage, template string) (*toolSet, *apiError) {
	rawTools = bytes.TrimSpace(rawTools)
	if len(rawTools) == 0 || string(rawTools) == "null" || string(rawTools) == "[]" {
		if c := bytes.TrimSpace(rawChoice); len(c) > 0 && string(c) != "null" && string(c) != `"none"` && string(c) != `"auto"` {
			return nil, invalidRequest("tool_choice", "tool_choice needs tools")
		}
		return nil, nil
	}
	var defs []toolDef
	if err := json.Unmarshal(rawTools, &defs); err != nil {
		return nil, invalidRequest("tools", "tools must be an array of {type: function, function: {name, parameters}}: "+err.Error())
	}
	ts := &toolSet{family: toolcall.Detect(template), native: strings.Contains(template, "tools")}
	_ = json.Unmarshal(rawTools, &ts.raw)
	for i, d := range defs {
		if d.Type != "function" || d.Function == nil || d.Function.Name == "" {
			return nil, invalidRequest(fmt.Sprintf("tools[%d]", i), fmt.Sprintf("tools[%d]: only {type: function, function: {name, ...}} tools are supported", i))
		}
		params := d.Function.Parameters
		if p := bytes.TrimSpace(params); len(p) > 0 && string(p) != "null" {
			if _, err := grammar.FromSchema(p); err != nil {
				return nil, invalidRequest(fmt.Sprintf("tools[%d].function.parameters", i), err.Error())
			}
		}
		ts.fns = append(ts.fns, toolcall.Function{Name: d.Function.Name, Parameters: params})
	}
	choice := bytes.TrimSpace(rawChoice)
	switch string(choice) {
	case "", "null", `"auto"`:
	case `"none"`:
		return nil, nil
	case `"required"`:
		ts.force = ts.fns
	default:
		var named struct {
			Type     string `json:"type"`
			Function struct {
				Name string `json:"name"`
			} `json:"function"`
		}
		if err := json.Unmarshal(choice, &named); err != nil || named.Type != "function" || named.Function.Name == "" {
			return nil, invalidRequest("tool_choice", `tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}`)
		}
		for _, f := range ts.fns {
			if f.Name == named.Function.Name {
				ts.force = []toolcall.Function{f}
			}
		}
		if ts.force == nil {
			return nil, invalidRequest("tool_choice", fmt.Sprintf("tool_choice names function %q, which is not among the tools", named.Function.Name))
		}
	}
	return ts, nil
}

// grammar is the constraint that forces a call, or nil when the model may answer freely.
func (ts *toolSet) grammar() (*grammar.Grammar, *apiError) {
	if ts == nil || ts.force == nil {
		return nil, nil
	}
	g, err := toolcall.Force(ts.family, ts.force)
	if err != nil {
		return nil, invalidRequest("tools", err.Error())
	}
	return g, nil
}

// templateVars are the variables the chat template sees besides messages.
func (ts *toolSet) templateVars() map[string]any {
	if ts == nil || !ts.native {
		return nil
	}
	return map[string]any{"tools": withDescriptions(ts.raw)}
}

// withDescriptions gives every function and parameter a description ("" when the client
// sent none): templates write them with |trim, which in Hugging Face's Jinja turns a
// missing one into "" but fails in this engine.
func withDescriptions(tools []any) []any {
	out := make([]any, len(tools))
	for i, t := range tools {
		out[i] = t
		tm, ok := t.(map[string]any)
		if !ok {
			continue
		}
		fn, ok := tm["function"].(map[string]any)
		if !ok {
			continue
		}
		fn2 := maps.Clone(fn)
		if _, ok := fn2["description"]; !ok {
			fn2["description"] = ""
		}
		if params, ok := fn2["parameters"].(map[string]any); ok {
			if props, ok := params["properties"].(map[string]any); ok {
				props2 := map[string]any{}
				for k, v := range props {
					if pm, ok := v.(map[string]any); ok {
						if _, has := pm["description"]; !has {
							pm = maps.Clone(pm)
							pm["description"] = ""
						}
						v = pm
					}
					props2[k] = v
				}
				params = maps.Clone(params)
				params["properties"] = props2
				fn2["parameters"] = params
			}
		}
		tm2 := maps.Clone(tm)
		tm2["function"] = fn2
		out[i] = tm2
	}
	return out
}

// parse reads the calls in text: in the template's syntax, or, for a template that does
// not render tools itself (so the model was asked for bare JSON), as bare JSON too.
func (ts *toolSet) parse(text string) (string, []toolcall.Call) {
	content, calls := toolcall.Parse(ts.family, text)
	// A forced call is bare JSON in every family but Hermes (toolcall.Force), so it is read
	// as such whatever the template's own syntax.
	if len(calls) == 0 && (!ts.native || ts.force != nil) && ts.family != toolcall.Llama3 {
		if c2, calls2 := toolcall.Parse(toolcall.Llama3, text); len(calls2) > 0 {
			return c2, calls2
		}
	}
	return content, calls
}

// fallbackPrompt describes the tools for a template with no tool support of its own (it
// never reads "tools"), in Llama 3.1's JSON tool-calling words, which Parse reads back.
func (ts *toolSet) fallbackPrompt() string {
	if ts == nil || ts.native {
		return ""
	}
	var b strings.Builder
	b.WriteString("You have access to the following functions. To call a function, respond with only a JSON object of the form {\"name\": function name, \"parameters\": dictionary of argument name and its value}.\n\n")
	for _, t := range ts.raw {
		j, _ := json.Marshal(t)
		b.Write(j)
		b.WriteString("\n")
	}
	return b.String()
}

// withFallback puts the fallback tool description into the conversation's system message.
func (ts *toolSet) withFallback(msgs []map[string]any) []map[string]any {
	p := ts.fallbackPrompt()
	if p == "" {
		return msgs
	}
	if len(msgs) > 0 && msgs[0]["role"] == "system" {
		first := map[string]any{}
		for k, v := range msgs[0] {
			first[k] = v
		}
		first["content"] = p + "\n" + fmt.Sprint(first["content"])
		return append([]map[string]any{first}, msgs[1:]...)
	}
	return append([]map[string]any{{"role": "system", "content": p}}, msgs...)
}

// toolMessageFields adds an assistant's tool_calls and a tool message's tool_call_id to the
// message the template sees, with arguments decoded into objects as templates expect
// (they write them with tojson).
func toolMessageFields(i int, m chatMessage, msg map[string]any) *apiError {
	if m.ToolCallID != "" {
		msg["tool_call_id"] = m.ToolCallID
	}
	raw := bytes.TrimSpace(m.ToolCalls)
	if len(raw) == 0 || string(raw) == "null" {
		return nil
	}
	var calls []struct {
		ID       string `json:"id"`
		Type     string `json:"type"`
		Function struct {
			Name      string `json:"name"`
			Arguments string `json:"arguments"`
		} `json:"function"`
	}
	param := fmt.Sprintf("messages[%d].tool_calls", i)
	if err := json.Unmarshal(raw, &calls); err != nil {
		return invalidRequest(param, param+" must be an array of {id, type: function, function: {name, arguments}}: "+err.Error())
	}
	in := make([]callIn, len(calls))
	for j, c := range calls {
		var args any = map[string]any{}
		if strings.TrimSpace(c.Function.Arguments) != "" {
			if err := json.Unmarshal([]byte(c.Function.Arguments), &args); err != nil {
				return invalidRequest(param, fmt.Sprintf("%s[%d].function.arguments is not JSON: %v", param, j, err))
			}
		}
		in[j] = callIn{ID: c.ID, Name: c.Function.Name, Args: args}
	}
	msg["tool_calls"] = templateCalls(in)
	return nil
}

// callIn is an earlier tool call in a conversation, whichever API sent it: Ollama and
// Anthropic send arguments as objects, OpenAI as JSON text (decoded before it gets here).
type callIn struct {
	ID, Name string
	Args     any
}

// templateCalls is how chat templates expect an assistant's tool_calls: OpenAI's shape with
// arguments as objects (templates write them with tojson), and the fields flat as well,
// since some templates read them that way.
func templateCalls(calls []callIn) []any {
	out := make([]any, 0, len(calls))
	for _, c := range calls {
		args := c.Args
		if args == nil {
			args = map[string]any{}
		}
		fn := map[string]any{"name": c.Name, "arguments": args}
		out = append(out, map[string]any{"id": c.ID, "type": "function", "function": fn, "name": c.Name, "arguments": args})
	}
	return out
}

// toolCallOut is a tool call in a response: whole in a message, indexed in a stream delta.
type toolCallOut struct {
	Index    *int   `json:"index,omitempty"`
	ID       string `json:"id"`
	Type     string `json:"type"`
	Function struct {
		Name      string `json:"name"`
		Arguments string `json:"arguments"`
	} `json:"function"`
}

func (ts *toolSet) toOpenAI(calls []toolcall.Call, indexed bool) []toolCallOut {
	out := make([]toolCallOut, len(calls))
	for i, c := range calls {
		out[i].ID = "call_" + randomID()
		if ts.family == toolcall.Mistral {
			out[i].ID = randomID()[:9] // Mistral's templates accept 9 alphanumerics only
		}
		out[i].Type = "function"
		out[i].Function.Name = c.Name
		out[i].Function.Arguments = c.Arguments
		if indexed {
			out[i].Index = &i
		}
	}
	return out
}

// toolStream turns a streamed completion with tools into chat deltas: text goes out as it
// comes until it may be a tool call (a call marker, or for bare-JSON syntaxes a reply that
// starts with "{" or "["); from there it is held, and at the end parsed into tool_calls
// deltas (or, when it was no call after all, sent as text).
type toolStream struct {
	ts   *toolSet
	mu   sync.Mutex
	text strings.Builder
	sent int
	held bool
}

var callMarkers = map[toolcall.Family][]string{
	toolcall.Hermes:   {"<tool_call>"},
	toolcall.Llama3:   {"<|python_tag|>"},
	toolcall.Mistral:  {"[TOOL_CALLS]"},
	toolcall.DeepSeek: {"<｜tool▁calls▁begin｜>"},
	toolcall.GptOSS:   {"<|channel|>", "<|start|>"},
}

// push adds generated text and returns what may go out now as content.
func (s *toolStream) push(text string) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.text.WriteString(text)
	if s.ts.force != nil {
		s.held = true // the grammar makes the whole reply one call: nothing of it is content
	}
	if s.held {
		return ""
	}
	all := s.text.String()
	safe := len(all)
	if t := strings.TrimLeft(all, " \n\t"); s.sent == 0 && (t == "" || ((s.ts.family == toolcall.Llama3 || s.ts.family == toolcall.Mistral) && (t[0] == '{' || t[0] == '['))) {
		s.held = t != "" // a reply that opens with JSON is held whole: it may be a call
		return ""
	}
	for _, m := range callMarkers[s.ts.family] {
		if i := strings.Index(all[s.sent:], m); i >= 0 {
			safe = min(safe, s.sent+i)
			s.held = true
		}
		for k := min(len(m)-1, len(all)-s.sent); k > 0 && !s.held; k-- {
			if strings.HasSuffix(all, m[:k]) {
				safe = min(safe, len(all)-k)
				break
			}
		}
	}
	if safe <= s.sent {
		return ""
	}
	out := all[s.sent:safe]
	s.sent = safe
	return out
}

// finish parses what was held: the rest of the content and the calls.
func (s *toolStream) finish() (string, []toolcall.Call) {
	s.mu.Lock()
	defer s.mu.Unlock()
	all := s.text.String()
	content, calls := s.ts.parse(all[s.sent:])
	if len(calls) == 0 {
		return all[s.sent:], nil
	}
	return content, calls
}
