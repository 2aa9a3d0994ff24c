package pipeline_test

import (
	"context"
	"math"
	"strings"
	"testing"

	"github.com/strata-llm/strata/pipeline"
	"github.com/strata-llm/strata/pipeline/sample"
	"github.com/strata-llm/strata/quant"
	"github.com/strata-llm/strata/shard"
)

type collected struct {
	text   strings.Builder
	tokens []int32
	lps    []pipeline.TokenLogprobs
	deltas int
}

func collect(t *testing.T, g *pipeline.Generator, req pipeline.Request) (pipeline.Result, *collected) {
	t.Helper()
	c := &collected{}
	res, err := g.Generate(context.Background(), req, func(d pipeline.Delta) error {
		c.deltas++
		c.text.WriteString(d.Text)
		c.tokens = append(c.tokens, d.Tokens...)
		c.lps = append(c.lps, d.Logprobs...)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return res, c
}

func specialID(t *testing.T, tok *shard.Tokenizer, text string) int32 {
	t.Helper()
	ids, err := tok.Encode(text, false)
	if err != nil || len(ids) != 1 {
		t.Skipf("the tokenizer does not parse %q as one special token (%v, %v)", text, ids, err)
	}
	return ids[0]
}

// TestTokensLogprobsAndUsage: every completion token is handed out once, with its logprob and
// alternatives when asked, and usage counts exactly those; a prompt of token ids continues
// as the same prompt in text does; echo puts the prompt first.
func TestTokensLogprobsAndUsage(t *testing.T) {
	stages, tok := tinyStages(t, shard.Range{Start: 0, End: 3}, shard.Range{Start: 3, End: 6})
	g := pipeline.NewGenerator(tok, pipeline.LocalRouter{Stages: stages, Codec: quant.CodecF32})
	const prompt = "Once upon a time"
	res, c := collect(t, g, pipeline.Request{Prompt: prompt, MaxTokens: 24, Logprobs: true, TopLogprobs: 3})
	if len(c.tokens) != res.CompletionTokens || len(c.lps) != len(c.tokens) || res.CompletionTokens != 24 {
		t.Fatalf("usage %d, tokens handed out %d, logprobs %d", res.CompletionTokens, len(c.tokens), len(c.lps))
	}
	var joined strings.Builder
	for i, lp := range c.lps {
		if lp.ID != c.tokens[i] || len(lp.Top) != 3 || lp.Logprob > 0 || math.IsNaN(float64(lp.Logprob)) {
			t.Fatalf("token %d: %+v", i, lp)
		}
		// Greedy: the token is the most likely one, and its logprob is the top one's.
		if lp.Top[0].ID != lp.ID || lp.Top[0].Logprob != lp.Logprob || lp.Top[1].Logprob > lp.Top[0].Logprob {
			t.Fatalf("token %d: greedy pick %+v is not top %+v", i, lp.TokenText, lp.Top)
		}
		if !strings.HasPrefix(lp.Text, "<|") || !strings.HasSuffix(lp.Text, "|>") { // a control token shows no text
			joined.WriteString(lp.Text)
		}
	}
	if c.text.String() != res.Text || joined.String() != res.Text {
		t.Fatalf("text %q, streamed %q, token texts %q", res.Text, c.text.String(), joined.String())
	}

	ids, err := tok.Encode(prompt, true)
	if err != nil {
		t.Fatal(err)
	}
	byIDs, c2 := collect(t, g, pipeline.Request{PromptIDs: ids, MaxTokens: 24})
	if byIDs.Text != res.Text || byIDs.PromptTokens != res.PromptTokens || !equal(c2.tokens, c.tokens) {
		t.Fatalf("ids %v gave %q (%d prompt tokens), text gave %q (%d)", ids, byIDs.Text, byIDs.PromptTokens, res.Text, res.PromptTokens)
	}
	echoed, c3 := collect(t, g, pipeline.Request{PromptIDs: ids, MaxTokens: 24, Echo: true})
	if !strings.HasSuffix(echoed.Text, res.Text) || !strings.Contains(echoed.Text, prompt) || c3.text.String() != echoed.Text {
		t.Fatalf("echo: %q, streamed %q", echoed.Text, c3.text.String())
	}
	if _, err := g.Generate(context.Background(), pipeline.Request{PromptIDs: []int32{1, -5}}, nil); err == nil {
		t.Fatal("a negative token id was accepted")
	}

	// A control token shows no text but is handed out and counted; the end-of-sequence token
	// ends the completion uncounted.
	ctl := specialID(t, tok, tok.BOS)
	res, c = collect(t, g, pipeline.Request{Prompt: prompt, MaxTokens: 5, LogitBias: []sample.Bias{{Token: ctl, Value: 100}}})
	if res.Text != "" || res.CompletionTokens != 5 || len(c.tokens) != 5 || c.tokens[4] != ctl {
		t.Fatalf("control tokens: %+v, handed out %v", res, c.tokens)
	}
	eos := specialID(t, tok, tok.EOS)
	res, c = collect(t, g, pipeline.Request{Prompt: prompt, MaxTokens: 5, LogitBias: []sample.Bias{{Token: eos, Value: 100}}})
	if res.CompletionTokens != 0 || len(c.tokens) != 0 || res.FinishReason != "stop" {
		t.Fatalf("EOS first: %+v, handed out %v", res, c.tokens)
	}
}

func equal(a, b []int32) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}
