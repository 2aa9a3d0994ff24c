package node_test

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/shared"

	"github.com/strata-llm/strata/internal/testkit"
)

// TestStructuredThroughSwarm: against a three-node swarm, the OpenAI client gets schema-valid
// JSON from response_format json_schema and a parsed tool call with tool_choice required,
// from random weights: the entry masks the logits the last stage sends back over libp2p.
func TestStructuredThroughSwarm(t *testing.T) {
	t.Parallel() // its own processes, ports and temp dirs: it shares nothing with other tests
	model := swarmModel(t)
	bin := testkit.BuildStrata(t)
	s := testkit.NewSwarm(t, testkit.SwarmOptions{Binary: bin, Nodes: 3, Model: model, Args: exactArgs})
	s.MustReady(t, 3, 30*time.Second)
	ctx := context.Background()
	c := client(s.Nodes[1])

	schema := `{"type":"object","properties":{"city":{"enum":["Paris","Oslo"]},"days":{"type":"array","items":{"type":"integer"},"maxItems":3},"rain":{"type":"boolean"}},"required":["city","days","rain"],"additionalProperties":false}`
	var sm map[string]any
	if err := json.Unmarshal([]byte(schema), &sm); err != nil {
		t.Fatal(err)
	}
	for seed := range int64(2) {
		resp, err := c.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{Model: modelID, Seed: openai.Int(seed), MaxTokens: openai.Int(48),
			Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("Forecast as JSON")},
			ResponseFormat: openai.ChatCompletionNewParamsResponseFormatUnion{OfJSONSchema: &shared.ResponseFormatJSONSchemaParam{
				JSONSchema: shared.ResponseFormatJSONSchemaJSONSchemaParam{Name: "forecast", Schema: sm, Strict: openai.Bool(true)}}}})
		if err != nil {
			t.Fatal(err)
		}
		if err := testkit.ValidateJSON([]byte(schema), []byte(resp.Choices[0].Message.Content)); err != nil {
			t.Errorf("seed %d: %v", seed, err)
		}
	}

	params := `{"type":"object","properties":{"city":{"type":"string","maxLength":16},"days":{"type":"integer"}},"required":["city","days"],"additionalProperties":false}`
	var pm map[string]any
	if err := json.Unmarshal([]byte(params), &pm); err != nil {
		t.Fatal(err)
	}
	resp, err := c.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{Model: modelID, Seed: openai.Int(4), MaxTokens: openai.Int(64),
		Messages:   []openai.ChatCompletionMessageParamUnion{openai.UserMessage("Weather in Oslo?")},
		Tools:      []openai.ChatCompletionToolUnionParam{openai.ChatCompletionFunctionTool(shared.FunctionDefinitionParam{Name: "get_weather", Parameters: pm})},
		ToolChoice: openai.ChatCompletionToolChoiceOptionUnionParam{OfAuto: openai.String("required")}})
	if err != nil {
		t.Fatal(err)
	}
	ch := resp.Choices[0]
	if ch.FinishReason != "tool_calls" || len(ch.Message.ToolCalls) != 1 || ch.Message.ToolCalls[0].Function.Name != "get_weather" {
		t.Fatalf("finish %s, message %+v", ch.FinishReason, ch.Message)
	}
	if err := testkit.ValidateJSON([]byte(params), []byte(ch.Message.ToolCalls[0].Function.Arguments)); err != nil {
		t.Fatal(err)
	}
}
