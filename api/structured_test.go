package api

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
	"github.com/openai/openai-go/v3/shared"

	"github.com/strata-llm/strata/internal/testkit"
	"github.com/strata-llm/strata/pipeline"
	"github.com/strata-llm/strata/quant"
	"github.com/strata-llm/strata/shard"
)

// structuredServer serves the tiny model split over two in-process stages with room for
// tool descriptions in the prompt.
func structuredServer(t *testing.T) *generatorBackend {
	t.Helper()
	path := testkit.TinyModel(t)
	info, err := shard.ReadModelInfo(path)
	if err != nil {
		t.Fatal(err)
	}
	stages, tok := testkit.LoadStages(t, path, []shard.Range{{Start: 0, End: 3}, {Start: 3, End: 6}}, shard.WithMaxContext(1024), shard.WithMaxSessions(2))
	gen := pipeline.NewGenerator(tok, pipeline.LocalRouter{Stages: stages, Codec: quant.CodecF16}, pipeline.WithMaxContext(1024))
	return &generatorBackend{gen: gen, card: pipeline.ModelCard{
		ID: "tiny", ContextLength: gen.MaxContext(), ChatTemplate: info.ChatTemplate, BOS: tok.BOS, EOS: tok.EOS, Vocab: info.Vocab, Ready: true,
	}}
}

var apiSchemas = []string{
	`{"type":"object","properties":{"name":{"type":"string"},"age":{"type":"integer"},"member":{"type":"boolean"}},"required":["name","age","member"],"additionalProperties":false}`,
	`{"type":"object","properties":{"city":{"enum":["Paris","Oslo","Lima"]},"temps":{"type":"array","items":{"type":"number"},"minItems":2,"maxItems":3},"note":{"type":["string","null"]}},"required":["city","temps","note"],"additionalProperties":false}`,
	`{"$defs":{"p":{"type":"object","properties":{"x":{"type":"integer"},"y":{"type":"integer"}},"required":["x","y"],"additionalProperties":false}},"type":"object","properties":{"from":{"$ref":"#/$defs/p"},"to":{"$ref":"#/$defs/p"}},"required":["from","to"],"additionalProperties":false}`,
}

// The official client gets schema-valid JSON from response_format json_schema and a JSON
// object from json_object, from a model with random weights, plain and streamed.
func TestResponseFormatThroughClient(t *testing.T) {
	ts := startServer(t, structuredServer(t))
	c := client(ts)
	ctx := context.Background()
	for i, schema := range apiSchemas {
		var s map[string]any
		if err := json.Unmarshal([]byte(schema), &s); err != nil {
			t.Fatal(err)
		}
		for seed := range int64(3) {
			params := openai.ChatCompletionNewParams{Model: "tiny", Seed: openai.Int(seed), MaxTokens: openai.Int(60),
				Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("Describe it as JSON.")},
				ResponseFormat: openai.ChatCompletionNewParamsResponseFormatUnion{OfJSONSchema: &shared.ResponseFormatJSONSchemaParam{
					JSONSchema: shared.ResponseFormatJSONSchemaJSONSchemaParam{Name: "thing", Schema: s, Strict: openai.Bool(true)}}}}
			if seed == 2 {
				params.Temperature = openai.Float(0)
			}
			resp, err := c.Chat.Completions.New(ctx, params)
			if err != nil {
				t.Fatal(err)
			}
			text := resp.Choices[0].Message.Content
			if err := testkit.ValidateJSON([]byte(schema), []byte(text)); err != nil {
				t.Errorf("schema %d seed %d: %v", i, seed, err)
			}
			// Streamed, the same request (same seed) gives the same text in pieces.
			st := c.Chat.Completions.NewStreaming(ctx, params)
			var streamed strings.Builder
			for st.Next() {
				if ch := st.Current(); len(ch.Choices) > 0 {
					streamed.WriteString(ch.Choices[0].Delta.Content)
				}
			}
			if err := st.Err(); err != nil {
				t.Fatal(err)
			}
			if streamed.String() != text {
				t.Errorf("schema %d seed %d: streamed %q, plain %q", i, seed, streamed.String(), text)
			}
		}
	}
	resp, err := c.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{Model: "tiny", MaxTokens: openai.Int(40), Seed: openai.Int(9),
		Messages:       []openai.ChatCompletionMessageParamUnion{openai.UserMessage("JSON please")},
		ResponseFormat: openai.ChatCompletionNewParamsResponseFormatUnion{OfJSONObject: &shared.ResponseFormatJSONObjectParam{}}})
	if err != nil {
		t.Fatal(err)
	}
	if err := testkit.ValidateJSON([]byte(`{"type":"object"}`), []byte(resp.Choices[0].Message.Content)); err != nil {
		t.Errorf("json_object: %v", err)
	}

	// /v1/completions takes response_format too (llama.cpp's extension).
	cresp, err := c.Completions.New(ctx, openai.CompletionNewParams{Model: openai.CompletionNewParamsModel("tiny"),
		Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String("{")}, MaxTokens: openai.Int(40), Seed: openai.Int(3)},
		option.WithJSONSet("response_format", map[string]any{"type": "json_schema", "json_schema": map[string]any{"name": "x", "schema": json.RawMessage(apiSchemas[0])}}))
	if err != nil {
		t.Fatal(err)
	}
	if err := testkit.ValidateJSON([]byte(apiSchemas[0]), []byte(cresp.Choices[0].Text)); err != nil {
		t.Errorf("completions: %v", err)
	}
}

var weatherParams = `{"type":"object","properties":{"city":{"type":"string","maxLength":20},"days":{"type":"integer"},"unit":{"enum":["celsius","fahrenheit"]}},"required":["city","days","unit"],"additionalProperties":false}`

func weatherTools(t *testing.T) []openai.ChatCompletionToolUnionParam {
	var p map[string]any
	if err := json.Unmarshal([]byte(weatherParams), &p); err != nil {
		t.Fatal(err)
	}
	return []openai.ChatCompletionToolUnionParam{
		openai.ChatCompletionFunctionTool(shared.FunctionDefinitionParam{Name: "get_weather", Description: openai.String("Weather forecast"), Parameters: p}),
		openai.ChatCompletionFunctionTool(shared.FunctionDefinitionParam{Name: "get_time", Parameters: shared.FunctionParameters{"type": "object", "properties": map[string]any{"tz": map[string]any{"type": "string", "maxLength": 10}}, "required": []string{"tz"}}}),
	}
}

// tool_choice "required" forces a well-formed call in the template's syntax even from random
// weights, and the client gets it parsed: a known function, arguments that satisfy its
// parameters, finish_reason tool_calls; plain and streamed (as tool_calls deltas).
func TestToolChoiceRequiredThroughClient(t *testing.T) {
	ts := startServer(t, structuredServer(t))
	c := client(ts)
	ctx := context.Background()
	schemas := map[string]string{"get_weather": weatherParams, "get_time": `{"type":"object","properties":{"tz":{"type":"string","maxLength":10}},"required":["tz"]}`}
	for seed := range int64(4) {
		params := openai.ChatCompletionNewParams{Model: "tiny", Seed: openai.Int(seed), MaxTokens: openai.Int(80),
			Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("What is the weather in Oslo?")},
			Tools:    weatherTools(t), ToolChoice: openai.ChatCompletionToolChoiceOptionUnionParam{OfAuto: openai.String("required")}}
		if seed == 3 {
			params.ToolChoice = openai.ChatCompletionToolChoiceOptionUnionParam{OfFunctionToolChoice: &openai.ChatCompletionNamedToolChoiceParam{
				Function: openai.ChatCompletionNamedToolChoiceFunctionParam{Name: "get_time"}}}
		}
		resp, err := c.Chat.Completions.New(ctx, params)
		if err != nil {
			t.Fatal(err)
		}
		ch := resp.Choices[0]
		if ch.FinishReason != "tool_calls" || len(ch.Message.ToolCalls) != 1 {
			t.Fatalf("seed %d: finish %s, message %+v", seed, ch.FinishReason, ch.Message)
		}
		call := ch.Message.ToolCalls[0]
		schema, ok := schemas[call.Function.Name]
		if !ok || call.ID == "" || call.Type != "function" {
			t.Fatalf("seed %d: call %+v", seed, call)
		}
		if seed == 3 && call.Function.Name != "get_time" {
			t.Fatalf("named tool_choice get_time, called %s", call.Function.Name)
		}
		if err := testkit.ValidateJSON([]byte(schema), []byte(call.Function.Arguments)); err != nil {
			t.Errorf("seed %d: %s arguments: %v", seed, call.Function.Name, err)
		}

		st := c.Chat.Completions.NewStreaming(ctx, params)
		var acc openai.ChatCompletionAccumulator
		for st.Next() {
			acc.AddChunk(st.Current())
		}
		if err := st.Err(); err != nil {
			t.Fatal(err)
		}
		got := acc.Choices[0].Message.ToolCalls
		if len(got) != 1 || got[0].Function.Name != call.Function.Name || got[0].Function.Arguments != call.Function.Arguments || acc.Choices[0].FinishReason != "tool_calls" {
			t.Errorf("seed %d: streamed %+v (%s), plain %+v", seed, got, acc.Choices[0].FinishReason, call)
		}

		// The call and its result go back in the conversation.
		follow := params
		follow.ToolChoice = openai.ChatCompletionToolChoiceOptionUnionParam{}
		follow.Messages = append(follow.Messages, ch.Message.ToParam(), openai.ToolMessage(`{"temp": 3}`, call.ID))
		if _, err := c.Chat.Completions.New(ctx, follow); err != nil {
			t.Fatalf("seed %d: conversation with a tool result: %v", seed, err)
		}
	}
}

func TestToolRequestErrors(t *testing.T) {
	ts := startServer(t, structuredServer(t))
	chat := "/v1/chat/completions"
	user := `"model":"tiny","messages":[{"role":"user","content":"hi"}]`
	for _, tc := range []struct{ body, param string }{
		{`{` + user + `,"tools":[{"type":"retrieval"}]}`, "tools[0]"},
		{`{` + user + `,"tools":"f"}`, "tools"},
		{`{` + user + `,"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"frob"}}}]}`, "tools[0].function.parameters"},
		{`{` + user + `,"tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":{"type":"function","function":{"name":"g"}}}`, "tool_choice"},
		{`{` + user + `,"tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":"sometimes"}`, "tool_choice"},
		{`{` + user + `,"tool_choice":"required"}`, "tool_choice"},
		{`{` + user + `,"functions":[{"name":"f"}]}`, "functions"},
		{`{` + user + `,"response_format":{"type":"yaml"}}`, "response_format.type"},
		{`{` + user + `,"response_format":{"type":"json_schema"}}`, "response_format.json_schema.schema"},
		{`{` + user + `,"response_format":{"type":"json_schema","json_schema":{"name":"x","schema":{"type":"object","properties":{"a":{"$ref":"https://x/y"}}}}}}`, "response_format.json_schema.schema"},
		{`{"model":"tiny","messages":[{"role":"assistant","content":null,"tool_calls":[{"id":"1","type":"function","function":{"name":"f","arguments":"{oops"}}]}]}`, "messages[0].tool_calls"},
	} {
		status, e := rawPost(t, ts, "POST", chat, tc.body, nil)
		if p, _ := e["param"].(string); status != http.StatusBadRequest || p != tc.param {
			t.Errorf("%s: %d %v, want 400 on %s", tc.body, status, e, tc.param)
		}
	}
}

// Real chat templates render the tools, an assistant's tool call and the tool's answer.
func TestToolTemplates(t *testing.T) {
	dir := "../../shared/conformance/chat-templates"
	if _, err := os.Stat(dir); err != nil {
		t.Skipf("conformance data absent (%v)", err)
	}
	var tools []any
	if err := json.Unmarshal([]byte(`[{"type":"function","function":{"name":"get_weather","description":"Weather forecast","parameters":`+weatherParams+`}}]`), &tools); err != nil {
		t.Fatal(err)
	}
	msgs := func() []map[string]any {
		call := chatMessage{Role: "assistant", Content: json.RawMessage(`""`), ToolCalls: json.RawMessage(`[{"id":"a1b2c3d4e","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Oslo\",\"days\":2,\"unit\":\"celsius\"}"}}]`)}
		a := map[string]any{"role": "assistant", "content": ""}
		if e := toolMessageFields(1, call, a); e != nil {
			t.Fatal(e)
		}
		tool := map[string]any{"role": "tool", "content": `{"temp": 3}`}
		_ = toolMessageFields(2, chatMessage{ToolCallID: "a1b2c3d4e"}, tool)
		return []map[string]any{{"role": "user", "content": "Weather in Oslo?"}, a, tool}
	}
	tpl := newTemplates(fixedNow)
	for _, file := range []string{
		"meta-llama-Llama-3.1-8B-Instruct.jinja", "meta-llama-Llama-3.3-70B-Instruct.jinja",
		"Qwen-Qwen2.5-7B-Instruct.jinja", "Qwen-Qwen3-0.6B.jinja", "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja",
		"mistralai-Mistral-Nemo-Instruct-2407.jinja", "Mistral-Small-3.2-24B-Instruct-2506.jinja", "deepseek-ai-DeepSeek-V3.1.jinja",
		"openai-gpt-oss-120b.jinja", // parses once template_fix.go rewrites its parenthesized conditional
	} {
		t.Run(file, func(t *testing.T) {
			src, err := os.ReadFile(filepath.Join(dir, file))
			if err != nil {
				t.Fatal(err)
			}
			ts, e := parseTools(json.RawMessage(mustJSON(tools)), nil, string(src))
			// DeepSeek V3.1's template leaves tools to the system prompt: Strata writes them there.
			if e != nil || ts.native == strings.HasPrefix(file, "deepseek") {
				t.Fatalf("parseTools: %v (native %v)", e, ts != nil && ts.native)
			}
			out, err := tpl.renderWith(string(src), "<s>", "</s>", ts.withFallback(msgs()), ts.templateVars())
			if err != nil {
				t.Fatal(err)
			}
			for _, want := range []string{"get_weather", "Oslo", "temp"} {
				if !strings.Contains(out, want) {
					t.Errorf("rendered prompt lacks %q:\n%s", want, out)
				}
			}
		})
	}
}

func mustJSON(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		panic(fmt.Sprint(err))
	}
	return string(b)
}
