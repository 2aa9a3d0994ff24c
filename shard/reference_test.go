package shard_test

import (
	"context"
	"encoding/binary"
	"io"
	"math"
	"os"
	"slices"
	"sort"
	"testing"

	fsggml "github.com/ollama/ollama/fs/ggml"

	"github.com/strata-llm/strata/internal/testkit"
	"github.com/strata-llm/strata/quant"
	"github.com/strata-llm/strata/shard"
)

// refModel is an independent float64 llama forward over a GGUF's F32 weights: the oracle
// that the engine's math (RMSNorm, RoPE as llama uses it, grouped-query attention, SwiGLU,
// the causal mask) is right, and the pieces other families add that Strata writes itself.
type refModel struct {
	w                               map[string][]float64
	hidden, heads, kvHeads, hd, ffn int
	layers, vocab                   int
	eps, ropeBase                   float64
	neox                            bool          // rotate (x[i], x[i+hd/2]) as Qwen does, not adjacent pairs
	keys, values                    [][][]float64 // [layer][pos] -> kvHeads*hd

	// Mixture of experts (Mixtral, qwen3moe): experts per layer, used per token, each one's
	// FFN width. route, when set, sees each layer's chosen experts; boundary, when set, may
	// change the stream entering layer l (a codec between stages).
	experts, used, expFFN int
	route                 func(l int, chosen []int)
	boundary              func(l int, x []float64)
	// Gemma's pieces. Its RMSNorm multiplies by (1 + w) in Hugging Face's code; GGUF files
	// store 1 + w (llama.cpp's converter adds the one) and the engine multiplies by what is
	// stored, so this reference does too, and the synthesizer draws Gemma's norms around 1 as
	// converted files have them. Post-norms (after attention and after the MLP) apply
	// wherever a file has them.
	embedScale        float64   // token embeddings times sqrt(hidden); 1 for other families
	attnCap, finalCap float64   // tanh soft caps of attention scores and of logits; 0: none
	geglu             bool      // GELU (tanh form) gate instead of SiLU
	geluMove          float64   // relative move of GELU's inputs, to measure the reference's spread
	window            []int     // per layer: attend to positions >= pos-window; 0: all
	layerBase         []float64 // per layer RoPE base (gemma3's local layers use their own)
}

func loadRef(t *testing.T, path string) *refModel {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	meta, err := fsggml.Decode(f, -1)
	if err != nil {
		t.Fatal(err)
	}
	kv := meta.KV()
	m := &refModel{
		w:        map[string][]float64{},
		hidden:   int(kv.EmbeddingLength()),
		heads:    int(kv.HeadCountMax()),
		kvHeads:  int(kv.HeadCountKVMax()),
		layers:   int(kv.BlockCount()),
		eps:      float64(kv.Float("attention.layer_norm_rms_epsilon")),
		ropeBase: float64(kv.Float("rope.freq_base")),
	}
	m.hd = m.hidden / m.heads
	if k := int(kv.Uint("attention.key_length")); k > 0 {
		m.hd = k
	}
	arch := kv.Architecture()
	gemma := arch == "gemma2" || arch == "gemma3"
	m.neox = arch == "qwen2" || arch == "qwen3" || arch == "qwen3moe" || gemma
	m.experts, m.used = int(kv.Uint("expert_count")), int(kv.Uint("expert_used_count"))
	m.embedScale = 1
	m.window = make([]int, m.layers)
	m.layerBase = make([]float64, m.layers)
	for l := range m.layerBase {
		m.layerBase[l] = m.ropeBase
	}
	if gemma {
		m.embedScale = math.Sqrt(float64(m.hidden))
		m.attnCap = float64(kv.Float("attn_logit_softcapping"))
		m.finalCap = float64(kv.Float("final_logit_softcapping"))
		m.geglu = true
		w := int(kv.Uint("attention.sliding_window"))
		for l := range m.window {
			// Gemma 2 slides on even layers; Gemma 3 on five of every six, with the local
			// RoPE base there.
			if arch == "gemma2" && l%2 == 0 {
				m.window[l] = w
			}
			if arch == "gemma3" && (l+1)%6 != 0 {
				m.window[l] = w
				m.layerBase[l] = float64(kv.Float("rope.local.freq_base", 10000))
			}
		}
	}
	base := meta.Tensors().Offset
	for _, tt := range meta.Tensors().Items() {
		b := make([]byte, tt.Size())
		if _, err := f.ReadAt(b, int64(base+tt.Offset)); err != nil && err != io.EOF {
			t.Fatal(err)
		}
		if fsggml.TensorType(tt.Kind) != fsggml.TensorTypeF32 {
			// Quantized weights: the oracle computes with their exact dequantized values.
			f32, err := quant.Decode(fsggml.TensorType(tt.Kind), b, tt.Elements())
			if err != nil {
				t.Fatalf("reference: %s: %v", tt.Name, err)
			}
			v := make([]float64, len(f32))
			for i, x := range f32 {
				v[i] = float64(x)
			}
			m.w[tt.Name] = v
			continue
		}
		v := make([]float64, len(b)/4)
		for i := range v {
			v[i] = float64(math.Float32frombits(binary.LittleEndian.Uint32(b[4*i:])))
		}
		m.w[tt.Name] = v
	}
	m.ffn = len(m.w["blk.0.ffn_up.weight"]) / m.hidden
	if m.experts > 0 {
		m.expFFN = len(m.w["blk.0.ffn_up_exps.weight"]) / m.hidden / m.experts
	}
	if _, ok := m.w["output.weight"]; !ok {
		m.w["output.weight"] = m.w["token_embd.weight"]
	}
	m.vocab = len(m.w["output.weight"]) / m.hidden
	m.keys = make([][][]float64, m.layers)
	m.values = make([][][]float64, m.layers)
	return m
}

// matvec computes W x for W stored GGUF-style: ncols = len(x), one output per row.
func matvec(w, x []float64) []float64 {
	n := len(x)
	out := make([]float64, len(w)/n)
	for r := range out {
		var s float64
		row := w[r*n : (r+1)*n]
		for c, xv := range x {
			s += row[c] * xv
		}
		out[r] = s
	}
	return out
}

func (m *refModel) rmsnorm(x, w []float64) []float64 {
	var ss float64
	for _, v := range x {
		ss += v * v
	}
	scale := 1 / math.Sqrt(ss/float64(len(x))+m.eps)
	out := make([]float64, len(x))
	for i, v := range x {
		out[i] = v * scale * w[i]
	}
	return out
}

// rope rotates adjacent pairs (x[2i], x[2i+1]) of every head, as llama's GGUF layout expects,
// or the halves (x[i], x[i+hd/2]) for NeoX-style families.
func (m *refModel) rope(x []float64, nHeads, pos int, base float64) {
	for h := range nHeads {
		v := x[h*m.hd : (h+1)*m.hd]
		for i := 0; i < m.hd/2; i++ {
			theta := float64(pos) * math.Pow(base, -2*float64(i)/float64(m.hd))
			c, s := math.Cos(theta), math.Sin(theta)
			j, k := 2*i, 2*i+1
			if m.neox {
				j, k = i, i+m.hd/2
			}
			a, b := v[j], v[k]
			v[j], v[k] = a*c-b*s, a*s+b*c
		}
	}
}

// addBias adds a projection's bias when the file has one (Qwen 2's Q, K and V).
func (m *refModel) addBias(x []float64, name string) []float64 {
	if b, ok := m.w[name]; ok {
		for i := range x {
			x[i] += b[i]
		}
	}
	return x
}

// headNorm applies an RMSNorm to each head when the file has one (Qwen 3's Q and K norms).
func (m *refModel) headNorm(x []float64, name string) {
	w, ok := m.w[name]
	if !ok {
		return
	}
	for h := 0; h < len(x)/m.hd; h++ {
		copy(x[h*m.hd:(h+1)*m.hd], m.rmsnorm(x[h*m.hd:(h+1)*m.hd], w))
	}
}

// step runs one token at position len(cache) and returns its logits.
func (m *refModel) step(token int32, pos int) []float64 {
	logits := matvec(m.w["output.weight"], m.final(token, pos))
	if m.finalCap > 0 {
		for i, v := range logits {
			logits[i] = math.Tanh(v/m.finalCap) * m.finalCap
		}
	}
	return logits
}

// final runs one token at position len(cache) and returns the final norm's output: the
// hidden state embeddings are pooled from.
func (m *refModel) final(token int32, pos int) []float64 {
	x := append([]float64(nil), m.w["token_embd.weight"][int(token)*m.hidden:(int(token)+1)*m.hidden]...)
	for i := range x {
		x[i] *= m.embedScale
	}
	for l := range m.layers {
		if m.boundary != nil {
			m.boundary(l, x)
		}
		p := func(s string) []float64 { return m.w["blk."+itoa(l)+"."+s+".weight"] }
		xn := m.rmsnorm(x, p("attn_norm"))
		b := "blk." + itoa(l) + "."
		q := m.addBias(matvec(p("attn_q"), xn), b+"attn_q.bias")
		k := m.addBias(matvec(p("attn_k"), xn), b+"attn_k.bias")
		v := m.addBias(matvec(p("attn_v"), xn), b+"attn_v.bias")
		m.headNorm(q, b+"attn_q_norm.weight")
		m.headNorm(k, b+"attn_k_norm.weight")
		m.rope(q, m.heads, pos, m.layerBase[l])
		m.rope(k, m.kvHeads, pos, m.layerBase[l])
		m.keys[l] = append(m.keys[l], k)
		m.values[l] = append(m.values[l], v)
		attn := make([]float64, m.heads*m.hd)
		group := m.heads / m.kvHeads
		for h := range m.heads {
			kh := h / group
			qh := q[h*m.hd : (h+1)*m.hd]
			scores := make([]float64, pos+1)
			mx := math.Inf(-1)
			for t := 0; t <= pos; t++ {
				var s float64
				kt := m.keys[l][t][kh*m.hd : (kh+1)*m.hd]
				for i := range qh {
					s += qh[i] * kt[i]
				}
				scores[t] = s / math.Sqrt(float64(m.hd))
				if m.attnCap > 0 {
					scores[t] = math.Tanh(scores[t]/m.attnCap) * m.attnCap
				}
				if m.window[l] > 0 && t < pos-m.window[l] {
					scores[t] = math.Inf(-1)
				}
				mx = math.Max(mx, scores[t])
			}
			var sum float64
			for t := range scores {
				scores[t] = math.Exp(scores[t] - mx)
				sum += scores[t]
			}
			for t := range scores {
				vt := m.values[l][t][kh*m.hd : (kh+1)*m.hd]
				for i := range vt {
					attn[h*m.hd+i] += scores[t] / sum * vt[i]
				}
			}
		}
		o := m.postNorm(matvec(p("attn_output"), attn), b+"post_attention_norm.weight")
		for i := range x {
			x[i] += o[i]
		}
		xn = m.rmsnorm(x, p("ffn_norm"))
		if m.experts > 0 {
			d := m.moe(l, xn, p)
			for i := range x {
				x[i] += d[i]
			}
			continue
		}
		g, u := matvec(p("ffn_gate"), xn), matvec(p("ffn_up"), xn)
		for i := range g {
			if m.geglu {
				g[i] = gelu(g[i]*(1+m.geluMove)) * u[i]
			} else {
				g[i] = g[i] / (1 + math.Exp(-g[i])) * u[i]
			}
		}
		d := m.postNorm(matvec(p("ffn_down"), g), b+"post_ffw_norm.weight")
		for i := range x {
			x[i] += d[i]
		}
	}
	return m.rmsnorm(x, m.w["output_norm.weight"])
}

// moe is the mixture-of-experts MLP written from its definition: softmax over every
// expert's router logit, the top k by probability, their SwiGLU outputs summed with those
// probabilities renormalised to sum to one (Mixtral, and qwen3moe's norm_top_k_prob).
func (m *refModel) moe(l int, xn []float64, p func(string) []float64) []float64 {
	logits := matvec(p("ffn_gate_inp"), xn)
	mx := slices.Max(logits)
	var sum float64
	prob := make([]float64, len(logits))
	for e, v := range logits {
		prob[e] = math.Exp(v - mx)
		sum += prob[e]
	}
	order := make([]int, m.experts)
	for e := range order {
		order[e] = e
		prob[e] /= sum
	}
	sort.SliceStable(order, func(i, j int) bool { return prob[order[i]] > prob[order[j]] })
	chosen := order[:m.used]
	if m.route != nil {
		m.route(l, chosen)
	}
	var norm float64
	for _, e := range chosen {
		norm += prob[e]
	}
	out := make([]float64, m.hidden)
	gate, up, down := p("ffn_gate_exps"), p("ffn_up_exps"), p("ffn_down_exps")
	size := m.expFFN * m.hidden
	for _, e := range chosen {
		g, u := matvec(gate[e*size:(e+1)*size], xn), matvec(up[e*size:(e+1)*size], xn)
		for i := range g {
			g[i] = g[i] / (1 + math.Exp(-g[i])) * u[i]
		}
		d := matvec(down[e*size:(e+1)*size], g)
		for i := range out {
			out[i] += prob[e] / norm * d[i]
		}
	}
	return out

}

// postNorm applies the RMSNorm a file has after a sublayer (Gemma's), else nothing.
func (m *refModel) postNorm(x []float64, name string) []float64 {
	if w, ok := m.w[name]; ok {
		return m.rmsnorm(x, w)
	}
	return x
}

// gelu is GELU in the tanh form Gemma uses, as ggml's CPU backend computes it (built with
// GGML_GELU_FP16): read from a table of half-precision values indexed by the input rounded to
// half precision, exact beyond +-10. The exact function differs from the table by up to 1e-3
// in the tiny Gemma models' logits, ten times the bound, so the reference models the table.
// What it cannot model is which way an input within float32 error of a rounding midpoint
// goes: see testWholeMatchesFloat64Reference.
func gelu(x float64) float64 {
	switch {
	case x <= -10:
		return 0
	case x >= 10:
		return x
	}
	x = toHalf(x)
	return toHalf(0.5 * x * (1 + math.Tanh(math.Sqrt(2/math.Pi)*(x+0.044715*x*x*x))))
}

// toHalf rounds x to the nearest IEEE half-precision value (ties to even), as float32 ->
// float16 conversion does, for the range GELU's table covers (no overflow below 10).
func toHalf(x float64) float64 {
	const minNormal = 1.0 / (1 << 14)
	if math.Abs(x) < minNormal { // subnormal halves are multiples of 2^-24
		return math.RoundToEven(x*(1<<24)) / (1 << 24)
	}
	frac, exp := math.Frexp(x) // x = frac * 2^exp, 0.5 <= |frac| < 1: 11 significant bits
	return math.Ldexp(math.RoundToEven(frac*(1<<11)), exp-11)
}

func itoa(i int) string {
	if i < 10 {
		return string(rune('0' + i))
	}
	return itoa(i/10) + string(rune('0'+i%10))
}

// TestWholeMatchesFloat64Reference: the engine's logits agree with the float64 forward at 24
// positions, to 1e-4, with an F32 KV cache.
func TestWholeMatchesFloat64Reference(t *testing.T) {
	// qwen2 adds Q/K/V biases and NeoX RoPE, qwen3 per-head Q/K norms and heads*head_dim !=
	// hidden: the pieces of those families Strata writes itself.
	// mixtral and qwen3moe add top-k softmax routing over experts: Mixtral has no engine
	// implementation to compare with, so this is its oracle.
	for _, o := range []testkit.SynthOptions{
		{Arch: "llama"}, {Arch: "qwen2"}, {Arch: "qwen3"}, {Arch: "llama", Experts: 8}, {Arch: "qwen3moe"},
		{Arch: "gemma2"}, {Arch: "gemma3"},
	} {
		name := o.Arch
		if o.Arch == "llama" && o.Experts > 0 {
			name = "mixtral"
		}
		o.Preset, o.Seed, o.Type = "tiny", 1, "f32"
		t.Run(name, func(t *testing.T) {
			testWholeMatchesFloat64Reference(t, testkit.Model(t, o))
		})
	}
}

func testWholeMatchesFloat64Reference(t *testing.T, path string) {
	ref := loadRef(t, path)
	// The spread: GELU from a half-precision table rounds its input to half precision, and an
	// input within float32 error of a rounding midpoint goes either way. One such flip changes
	// a GELU by half an ulp, and Gemma's post-MLP norm magnifies it, so the engine and any
	// float64 reference differ by as much as the reference does from itself with its GELU
	// inputs moved by 1e-6 (float32's error after a few layers): about 2e-4 on the tiny Gemma
	// models. The bound is 1e-4 or twice that spread, whichever is larger; the spread is 0
	// for SiLU families.
	var moved []*refModel
	if ref.geglu {
		for _, d := range []float64{1e-6, -1e-6} {
			r := loadRef(t, path)
			r.geluMove = d
			moved = append(moved, r)
		}
	}
	var spread float64
	st, err := shard.LoadStage(context.Background(), path, shard.Range{Start: 0, End: ref.layers},
		shard.WithSliceDir(t.TempDir()), shard.WithCacheType("f32"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	tok, err := shard.LoadTokenizer(path)
	if err != nil {
		t.Fatal(err)
	}
	// More positions than Gemma's sliding window (16 tokens in the tiny presets), so its
	// window masks some.
	const positions = 24
	ids, err := tok.Encode("The quick brown fox jumps over the lazy dog, said Strata, and then it ran across the wide green field to the old mill by the river.", true)
	if err != nil {
		t.Fatal(err)
	}
	if len(ids) < positions {
		t.Fatalf("want %d tokens, got %d", positions, len(ids))
	}
	if err := st.OpenSession(7); err != nil {
		t.Fatal(err)
	}
	var worst float64
	for pos, id := range ids[:positions] {
		out, err := st.Forward(context.Background(), shard.Step{Session: 7, Positions: []int32{int32(pos)}, Tokens: []int32{id}})
		if err != nil {
			t.Fatal(err)
		}
		want := ref.step(id, pos)
		for _, r := range moved {
			for i, v := range r.step(id, pos) {
				spread = math.Max(spread, math.Abs(v-want[i]))
			}
		}
		if len(out.Logits) != len(want) {
			t.Fatalf("pos %d: %d logits, want %d", pos, len(out.Logits), len(want))
		}
		for i, w := range want {
			worst = math.Max(worst, math.Abs(float64(out.Logits[i])-w))
		}
	}
	bound := max(1e-4, 2*spread)
	t.Logf("max |logit - float64 reference| over %d positions x %d vocab: %.3g (bound %.3g; the reference's own spread under 1e-6 moves of GELU's inputs: %.3g)",
		positions, ref.vocab, worst, bound, spread)
	if worst > bound {
		t.Fatalf("engine disagrees with the float64 reference: max abs diff %.3g > %.3g", worst, bound)
	}
}

// TestEmbeddingMatchesFloat64Reference: an Embed step over a whole prompt returns the final
// norm's hidden state of its last token (the tiny model names no pooling_type, so a decoder
// pools by its last token), as the float64 forward computes it, to 1e-4; split over two
// stages it is the same.
func TestEmbeddingMatchesFloat64Reference(t *testing.T) {
	path := testkit.TinyModel(t)
	ref := loadRef(t, path)
	tok, err := shard.LoadTokenizer(path)
	if err != nil {
		t.Fatal(err)
	}
	ids, err := tok.Encode("Embeddings pool the last hidden state.", true)
	if err != nil {
		t.Fatal(err)
	}
	var want []float64
	for pos, id := range ids {
		want = ref.final(id, pos)
	}
	pos := make([]int32, len(ids))
	for i := range pos {
		pos[i] = int32(i)
	}
	embed := func(ranges ...shard.Range) []float32 {
		var hidden []float32
		var out shard.Output
		for i, r := range ranges {
			st, err := shard.LoadStage(context.Background(), path, r, shard.WithSliceDir(t.TempDir()), shard.WithCacheType("f32"))
			if err != nil {
				t.Fatal(err)
			}
			defer st.Close()
			if err := st.OpenSession(1); err != nil {
				t.Fatal(err)
			}
			step := shard.Step{Session: 1, Positions: pos, Hidden: hidden, Embed: true}
			if i == 0 {
				step.Tokens = ids
			}
			if out, err = st.Forward(context.Background(), step); err != nil {
				t.Fatal(err)
			}
			hidden = out.Hidden
		}
		if out.Pooling != shard.PoolLast || len(out.Logits) != 0 {
			t.Fatalf("pooling %v, %d logits", out.Pooling, len(out.Logits))
		}
		return out.Embedding
	}
	whole := embed(shard.Range{Start: 0, End: ref.layers})
	var worst float64
	for i, w := range want {
		worst = math.Max(worst, math.Abs(float64(whole[i])-w))
	}
	t.Logf("max |embedding - float64 reference| over %d values: %.3g", len(want), worst)
	if len(whole) != len(want) || worst > 1e-4 {
		t.Fatalf("%d values (want %d), max abs diff %.3g > 1e-4", len(whole), len(want), worst)
	}
	split := embed(shard.Range{Start: 0, End: 2}, shard.Range{Start: 2, End: ref.layers})
	for i := range whole {
		if split[i] != whole[i] {
			t.Fatalf("split differs from whole at %d: %g vs %g", i, split[i], whole[i])
		}
	}
}
