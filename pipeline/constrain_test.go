package pipeline_test

import (
	"fmt"
	"testing"

	"github.com/strata-llm/strata/internal/testkit"
	"github.com/strata-llm/strata/pipeline"
	"github.com/strata-llm/strata/pipeline/grammar"
	"github.com/strata-llm/strata/quant"
	"github.com/strata-llm/strata/shard"
)

var constrainSchemas = []string{
	`{"type":"object","properties":{"name":{"type":"string"},"age":{"type":"integer"},"ok":{"type":"boolean"}},"required":["name","age","ok"],"additionalProperties":false}`,
	`{"type":"object","properties":{"color":{"enum":["red","green","blue"]},"scores":{"type":"array","items":{"type":"number"},"minItems":1,"maxItems":4},"note":{"anyOf":[{"type":"string"},{"type":"null"}]}},"required":["color","scores","note"],"additionalProperties":false}`,
	`{"type":"object","properties":{"items":{"type":"array","items":{"type":"object","properties":{"id":{"type":"integer"},"tags":{"type":"array","items":{"type":"string"}}},"required":["id","tags"],"additionalProperties":false}}},"required":["items"],"additionalProperties":false}`,
}

// A model with random weights writes schema-valid JSON when constrained: greedy and sampled,
// on one stage and split over two (where the logits cross a stage boundary), and it ends
// within max_tokens.
func TestGenerateWithGrammar(t *testing.T) {
	whole, tok := tinyStages(t, shard.Range{Start: 0, End: 6})
	split, _ := tinyStages(t, shard.Range{Start: 0, End: 2}, shard.Range{Start: 2, End: 6})
	routers := map[string]pipeline.Router{
		"whole": pipeline.LocalRouter{Stages: whole},
		"split": pipeline.LocalRouter{Stages: split, Codec: quant.CodecF16},
	}
	for name, r := range routers {
		g := pipeline.NewGenerator(tok, r)
		for i, schema := range constrainSchemas {
			gr, err := grammar.FromSchema([]byte(schema))
			if err != nil {
				t.Fatal(err)
			}
			for seed := range uint64(3) {
				t.Run(fmt.Sprintf("%s/schema%d/seed%d", name, i, seed), func(t *testing.T) {
					sp := samp(0.9, seed+1)
					if seed == 0 {
						sp = samp(0, 0)
					}
					res, streamed := generate(t, g, pipeline.Request{Prompt: "Reply in JSON:", MaxTokens: 48, Sampling: sp, Grammar: gr})
					if res.Text != streamed {
						t.Fatalf("streamed %q, result %q", streamed, res.Text)
					}
					t.Logf("%d tokens (%s): %s", res.CompletionTokens, res.FinishReason, res.Text)
					if err := testkit.ValidateJSON([]byte(schema), []byte(res.Text)); err != nil {
						t.Fatalf("%s (%d tokens, %s)", err, res.CompletionTokens, res.FinishReason)
					}
				})
			}
		}
		gr := grammar.JSONObject()
		res, _ := generate(t, g, pipeline.Request{Prompt: "JSON:", MaxTokens: 32, Sampling: samp(1, 5), Grammar: gr})
		if err := testkit.ValidateJSON([]byte(`{"type":"object"}`), []byte(res.Text)); err != nil {
			t.Fatalf("%s json_object: %v", name, err)
		}
	}
}
