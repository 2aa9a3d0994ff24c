package api

import (
	"context"
	"math"
	"testing"

	"github.com/openai/openai-go/v3"

	"github.com/strata-llm/strata/pipeline"
	"github.com/strata-llm/strata/shard"
)

// Embeddings through openai-go (float and base64) and Ollama's /api/embed and /api/embeddings,
// on the tiny model split over two in-process stages: every vector is unit length, the
// endpoints agree with each other and with the generator's own pooled hidden state
// normalised, dimensions cuts and renormalises, and a prompt longer than a prefill chunk
// gives what one step gives.
func TestEmbeddings(t *testing.T) {
	b := realServer(t, shard.Range{Start: 0, End: 3}, shard.Range{Start: 3, End: 6})
	ts := startServer(t, b)
	c := client(ts)
	ctx := context.Background()
	texts := []string{"The quick brown fox", "jumps over the lazy dog"}

	var lone [][]float32 // each text embedded alone
	for _, text := range texts {
		raw, err := b.gen.Embed(ctx, pipeline.EmbedRequest{Prompt: text})
		if err != nil {
			t.Fatal(err)
		}
		v, _ := normalize(raw.Embedding)
		lone = append(lone, v)
	}
	want := lone[0]

	resp, err := c.Embeddings.New(ctx, openai.EmbeddingNewParams{Model: "tiny",
		Input: openai.EmbeddingNewParamsInputUnion{OfArrayOfStrings: texts}})
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Data) != 2 || resp.Usage.PromptTokens == 0 || resp.Usage.TotalTokens != resp.Usage.PromptTokens {
		t.Fatalf("response %+v", resp)
	}
	close := func(what string, got []float64, want []float32, tol float64) {
		t.Helper()
		if len(got) != len(want) {
			t.Fatalf("%s: %d values, want %d", what, len(got), len(want))
		}
		var norm, d float64
		for i, v := range got {
			norm += v * v
			d = math.Max(d, math.Abs(v-float64(want[i])))
		}
		if math.Abs(norm-1) > 1e-5 || d > tol {
			t.Fatalf("%s: |v|^2 = %g, max diff %g", what, norm, d)
		}
	}
	// The inputs of one request run as concurrent sessions, so the two in-process stages
	// compute at once; each input's vector is still its lone one. (Before engine patch 0005
	// the stages shared one CPU backend, whose work buffer holds the queries converted for the
	// f16 KV cache: 6 of 30 runs moved a vector by 0.01-0.06.)
	close("openai float", resp.Data[0].Embedding, want, 1e-6)
	close("openai float 2", resp.Data[1].Embedding, lone[1], 1e-6)

	b64, err := c.Embeddings.New(ctx, openai.EmbeddingNewParams{Model: "tiny", EncodingFormat: openai.EmbeddingNewParamsEncodingFormatBase64,
		Input: openai.EmbeddingNewParamsInputUnion{OfString: openai.String(texts[0])}})
	if err != nil {
		t.Fatal(err)
	}
	close("openai base64", b64.Data[0].Embedding, want, 0)

	short, err := c.Embeddings.New(ctx, openai.EmbeddingNewParams{Model: "tiny", Dimensions: openai.Int(8),
		Input: openai.EmbeddingNewParamsInputUnion{OfString: openai.String(texts[0])}})
	if err != nil {
		t.Fatal(err)
	}
	cut, _ := normalize(want[:8])
	close("dimensions 8", short.Data[0].Embedding, cut, 1e-6)

	status, lines := ollamaDo(t, ts, "POST", "/api/embed", `{"model":"tiny","input":["The quick brown fox","jumps over the lazy dog"]}`)
	if status != 200 || len(lines) != 1 {
		t.Fatalf("/api/embed: %d %v", status, lines)
	}
	vecs := lines[0]["embeddings"].([]any)
	if len(vecs) != 2 || lines[0]["prompt_eval_count"].(float64) != float64(resp.Usage.PromptTokens) {
		t.Fatalf("/api/embed: %v", lines[0])
	}
	close("ollama embed", floats(vecs[0]), want, 1e-6)
	close("ollama embed 2", floats(vecs[1]), lone[1], 1e-6)
	status, lines = ollamaDo(t, ts, "POST", "/api/embeddings", `{"model":"tiny:latest","prompt":"The quick brown fox"}`)
	if status != 200 {
		t.Fatalf("/api/embeddings: %d %v", status, lines)
	}
	close("ollama embeddings", floats(lines[0]["embedding"]), want, 1e-6)

	// Chunked: a prompt of more than one prefill chunk pools the same as one step.
	long := "one two three four five six seven eight nine ten eleven twelve"
	ids, err := b.gen.Encode(long)
	if err != nil {
		t.Fatal(err)
	}
	one, err := b.gen.Embed(ctx, pipeline.EmbedRequest{PromptIDs: ids})
	if err != nil {
		t.Fatal(err)
	}
	chunked := pipeline.NewGenerator(b.tok, b.router, pipeline.WithChunk(5), pipeline.WithMaxContext(realContext))
	many, err := chunked.Embed(ctx, pipeline.EmbedRequest{PromptIDs: ids})
	if err != nil {
		t.Fatal(err)
	}
	if len(ids) <= 5 {
		t.Fatalf("prompt of %d tokens is one chunk", len(ids))
	}
	close("chunked", toF64(mustNorm(many.Embedding)), mustNorm(one.Embedding), 1e-5)

	for _, tc := range []struct{ path, body string }{
		{"/v1/embeddings", `{"model":"tiny","input":""}`},
		{"/v1/embeddings", `{"model":"tiny","input":"x","encoding_format":"hex"}`},
		{"/v1/embeddings", `{"model":"tiny","input":[99999]}`},
		{"/v1/embeddings", `{"model":"tiny","input":"x","dimensions":0}`},
		{"/api/embed", `{"model":"tiny","input":[1,2]}`},
		{"/api/embed", `{"model":"tiny","input":"x","options":{"temperature":1}}`},
	} {
		if status, out := postJSON(t, ts.URL+tc.path, tc.body); status != 400 {
			t.Errorf("%s %s: %d %v", tc.path, tc.body, status, out)
		}
	}
	// Too long for the context: refused by OpenAI's endpoint, truncated by Ollama's (its default).
	huge := `"` + repeat("word ", 200) + `"`
	if status, out := postJSON(t, ts.URL+"/v1/embeddings", `{"model":"tiny","input":`+huge+`}`); status != 400 {
		t.Errorf("long input: %d %v", status, out)
	}
	if status, out := postJSON(t, ts.URL+"/api/embed", `{"model":"tiny","input":`+huge+`}`); status != 200 || out["prompt_eval_count"].(float64) != realContext {
		t.Errorf("long input, truncated: %d %v", status, out)
	}
	if status, out := postJSON(t, ts.URL+"/api/embed", `{"model":"tiny","truncate":false,"input":`+huge+`}`); status != 400 {
		t.Errorf("long input, truncate false: %d %v", status, out)
	}
}

func repeat(s string, n int) string {
	out := ""
	for range n {
		out += s
	}
	return out
}

func floats(v any) []float64 {
	list := v.([]any)
	out := make([]float64, len(list))
	for i, x := range list {
		out[i] = x.(float64)
	}
	return out
}

func toF32(v []float64) []float32 {
	out := make([]float32, len(v))
	for i, x := range v {
		out[i] = float32(x)
	}
	return out
}

func toF64(v []float32) []float64 {
	out := make([]float64, len(v))
	for i, x := range v {
		out[i] = float64(x)
	}
	return out
}

func mustNorm(v []float32) []float32 {
	out, err := normalize(v)
	if err != nil {
		panic(err)
	}
	return out
}
