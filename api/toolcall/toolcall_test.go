package toolcall

import (
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/strata-llm/strata/internal/testkit"
	"github.com/strata-llm/strata/pipeline/grammar"
)

func TestParse(t *testing.T) {
	paris := Call{Name: "get_weather", Arguments: `{"city":"Paris","unit":"celsius"}`}
	tests := []struct {
		fam     Family
		text    string
		content string
		calls   []Call
	}{
		// Qwen 2.5 / Hermes 3, as the models write them.
		{Hermes, "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"celsius\"}}\n</tool_call>", "", []Call{paris}},
		{Hermes, "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"celsius\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>", "Let me check.", []Call{paris, {Name: "get_time", Arguments: `{}`}}},
		{Hermes, "The weather is sunny.", "The weather is sunny.", nil},
		{Hermes, "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Par", "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Par", nil},
		// Qwen3-Coder's XML form.
		{Hermes, "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=unit>\ncelsius\n</parameter>\n</function>\n</tool_call>", "", []Call{paris}},
		// Llama 3.1-3.3 JSON tool calling, with and without <|python_tag|>.
		{Llama3, `{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}`, "", []Call{paris}},
		{Llama3, `<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}<|eom_id|>`, "", []Call{paris}},
		{Llama3, `{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; {"name": "get_time", "parameters": {}}`, "", []Call{paris, {Name: "get_time", Arguments: `{}`}}},
		{Llama3, `{"type": "function", "name": "get_weather", "parameters": "{\"city\": \"Paris\", \"unit\": \"celsius\"}"}`, "", []Call{paris}},
		{Llama3, `The answer is {"a": 1}.`, `The answer is {"a": 1}.`, nil},
		{Llama3, `{"a": 1}`, `{"a": 1}`, nil},
		// Mistral Nemo (v3 tokenizer) and Mistral Small 3.2 / Devstral.
		{Mistral, `[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}, "id": "a1b2c3d4e"}]`, "", []Call{paris}},
		{Mistral, `[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}`, "", []Call{paris}},
		{Mistral, `[{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]`, "", []Call{paris}},
		// DeepSeek V3 and V3.1.
		{DeepSeek, "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Paris\", \"unit\": \"celsius\"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>", "", []Call{paris}},
		{DeepSeek, "Sure.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{\"city\": \"Paris\", \"unit\": \"celsius\"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>", "Sure.", []Call{paris}},
		// gpt-oss harmony.
		{GptOSS, `<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris","unit":"celsius"}<|call|>`, "", []Call{paris}},
		{GptOSS, `<|channel|>analysis<|message|>Easy.<|end|><|start|>assistant<|channel|>final<|message|>Hello!<|return|>`, "Hello!", nil},
	}
	for _, tc := range tests {
		content, calls := Parse(tc.fam, tc.text)
		if content != tc.content || !reflect.DeepEqual(calls, tc.calls) {
			t.Errorf("%s %q:\n got %q %+v\nwant %q %+v", tc.fam, tc.text, content, calls, tc.content, tc.calls)
		}
	}
}

func TestDetect(t *testing.T) {
	dir := "../../../shared/conformance/chat-templates"
	if _, err := os.Stat(dir); err != nil {
		t.Skipf("conformance data absent (%v)", err)
	}
	for file, want := range map[string]Family{
		"Qwen-Qwen2.5-7B-Instruct.jinja":                    Hermes,
		"Qwen-Qwen3-0.6B.jinja":                             Hermes,
		"NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja": Hermes,
		"meta-llama-Llama-3.1-8B-Instruct.jinja":            Llama3,
		"meta-llama-Llama-3.3-70B-Instruct.jinja":           Llama3,
		"mistralai-Mistral-Nemo-Instruct-2407.jinja":        Mistral,
		"Mistral-Small-3.2-24B-Instruct-2506.jinja":         Mistral,
		"deepseek-ai-DeepSeek-V3.1.jinja":                   DeepSeek,
		"openai-gpt-oss-120b.jinja":                         GptOSS,
	} {
		b, err := os.ReadFile(filepath.Join(dir, file))
		if err != nil {
			t.Fatal(err)
		}
		if got := Detect(string(b)); got != want {
			t.Errorf("%s: %s, want %s", file, got, want)
		}
	}
}

// A forced call, written by anything that follows the grammar, parses back into a call
// whose arguments satisfy the function's parameters.
func TestForceParsesBack(t *testing.T) {
	params := `{"type":"object","properties":{"city":{"type":"string"},"days":{"type":"integer"}},"required":["city","days"],"additionalProperties":false}`
	fns := []Function{{Name: "get_weather", Parameters: []byte(params)}, {Name: "get_time", Parameters: []byte(`{"type":"object","properties":{}}`)}}
	texts := map[Family]string{
		Hermes: "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\", \"days\": 3}}\n</tool_call>",
		Llama3: `{"name": "get_weather", "parameters": {"city": "Oslo", "days": 3}}`,
	}
	var toks [][]byte
	for b := range 256 {
		toks = append(toks, []byte{byte(b)})
	}
	v := grammar.NewVocab(append(toks, nil), []int32{256})
	for fam, text := range texts {
		g, err := Force(fam, fns)
		if err != nil {
			t.Fatal(err)
		}
		m := grammar.NewConstraint(g, v).Matcher()
		for i := 0; i < len(text); i++ {
			if err := m.Accept(int32(text[i])); err != nil {
				t.Fatalf("%s: %q rejected at %d: %v", fam, text, i, err)
			}
		}
		if !m.Complete() {
			t.Fatalf("%s: %q incomplete", fam, text)
		}
		_, calls := Parse(fam, text)
		if len(calls) != 1 || calls[0].Name != "get_weather" {
			t.Fatalf("%s: parsed %+v", fam, calls)
		}
		if err := testkit.ValidateJSON([]byte(params), []byte(calls[0].Arguments)); err != nil {
			t.Fatalf("%s: %v", fam, err)
		}
	}
}

// FuzzParse: no output text makes a parser panic, and every call it finds has a name and
// arguments that are JSON.
func FuzzParse(f *testing.F) {
	for _, s := range []string{"<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>", `{"name":"f","parameters":{}}`,
		`[TOOL_CALLS]f[ARGS]{}`, "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>f<｜tool▁sep｜>{}<｜tool▁call▁end｜>",
		`<|channel|>commentary to=functions.f <|constrain|>json<|message|>{}<|call|>`} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, text string) {
		for _, fam := range []Family{Hermes, Llama3, Mistral, DeepSeek, GptOSS} {
			_, calls := Parse(fam, text)
			for _, c := range calls {
				if c.Name == "" || !json.Valid([]byte(c.Arguments)) {
					t.Fatalf("%s %q: call %+v", fam, text, c)
				}
			}
		}
	})
}
