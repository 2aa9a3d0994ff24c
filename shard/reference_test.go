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
	embedScale        float64 // token embeddings times sqrt(hidden); 1 for other families
	attnCap, finalCap float64 // tanh soft caps of attention scores and of logits; 0: none
	geglu             bool    // GELU (tanh form) gate instead of SiLU
	// GELU's table rounds its input to half precision (see gelu): tau is the relative
	// distance to a rounding midpoint within which an input counts as near, near collects
	// the current layer's near sites, flip the sites to round the other way.
	tau       float64
	near      []geluSite
	flip      map[geluSite]bool
	window    []int     // per layer: attend to positions >= pos-window; 0: all
	layerBase []float64 // per layer RoPE base (gemma3's local layers use their own)
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
	return m.head(m.final(token, pos))
}

// head is the output projection of the final norm's output, soft-capped where the model
// caps its logits.
func (m *refModel) head(xn []float64) []float64 {
	logits := matvec(m.w["output.weight"], xn)
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
	x := m.embed(token)
	for l := range m.layers {
		if m.boundary != nil {
			m.boundary(l, x)
		}
		m.layer(l, pos, x)
	}
	return m.rmsnorm(x, m.w["output_norm.weight"])
}

// embed is a token's row of the embeddings, scaled as the family scales it.
func (m *refModel) embed(token int32) []float64 {
	x := append([]float64(nil), m.w["token_embd.weight"][int(token)*m.hidden:(int(token)+1)*m.hidden]...)
	for i := range x {
		x[i] *= m.embedScale
	}
	return x
}

// layer runs block l on the stream x of the token at position pos (len(cache)), in place,
// appending its key and value to the layer's cache.
func (m *refModel) layer(l, pos int, x []float64) {
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
		return
	}
	g, u := matvec(p("ffn_gate"), xn), matvec(p("ffn_up"), xn)
	for i := range g {
		if m.geglu {
			g[i] = m.gelu(l, i, g[i]) * u[i]
		} else {
			g[i] = g[i] / (1 + math.Exp(-g[i])) * u[i]
		}
	}
	d := m.postNorm(matvec(p("ffn_down"), g), b+"post_ffw_norm.weight")
	for i := range x {
		x[i] += d[i]
	}
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
// GGML_GELU_FP16): a table of half-precision values indexed by the input rounded to half
// precision, exact beyond +-10. The exact function differs from the table by up to 1e-3 in the
// tiny Gemma models' logits, ten times the bound, so the reference models the table, entry for
// entry (geluEntry). What no reference can know is which way the engine's float32 input went
// where it sits within float32 error of a half-precision rounding midpoint: such inputs are
// recorded in near (when tau > 0) and rounded the other way where flip says so (see
// resolveGELU).
func (m *refModel) gelu(l, i int, x float64) float64 {
	switch {
	case x <= -10:
		return 0
	case x >= 10:
		return x
	}
	h := toHalf(x)
	if o := toHalf(2*x - h); o != h && math.Abs(x-(h+o)/2) <= m.tau*math.Abs(x) {
		s := geluSite{layer: l, index: i}
		m.near = append(m.near, s)
		if m.flip[s] {
			h = o
		}
	}
	v := geluEntry(h, true)
	if u := geluEntry(h, false); u != v {
		s := geluSite{layer: l, index: i, entry: true}
		m.near = append(m.near, s)
		if m.flip[s] {
			v = u
		}
	}
	return v
}

// geluSite is one GELU of the reference's forward and which of its roundings may go either
// way: the input's to half precision, or (entry) the table's value.
type geluSite struct {
	layer, index int
	entry        bool
}

// geluEntry is ggml's table entry for the half-precision input h: ggml_gelu_f32 evaluated in
// float32 (tanhf, correctly rounded here), rounded to half precision. gcc contracts
// 1 + a*x*x into a fused multiply-add when the target has one (-march=native on CI and
// here); the unfused value differs in a few entries, and one of them is the entry the tiny
// gemma2 reads at position 11, layer 0, where the fused one matches the engine (1e-5 -> 1e-6).
// Entries where the two differ are recorded as near sites, so a build without FMA still
// resolves.
func geluEntry(h float64, fused bool) float64 {
	const c, a = float32(0.79788456080286535587989211986876), float32(0.044715)
	x := float32(h)
	in := float32(1) + float32(float32(a*x)*x)
	if fused {
		in = float32(math.FMA(float64(float32(a*x)), float64(x), 1))
	}
	t := float32(math.Tanh(float64(float32(float32(c*x) * in))))
	return toHalf(float64(float32(float32(float32(0.5)*x) * float32(1+t))))
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
	// gemma2 adds the embedding scale, attention and final soft caps, sliding windows and
	// post-norms; gemma3 per-head Q/K norms and the local RoPE base of its sliding layers.
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

// geluNear is the reference's tau for GeGLU models (see resolveGELU): a relative distance
// to a half-precision midpoint of about 80 float32 epsilons. The reference's GELU inputs differ
// from the engine's by the float32 rounding the engine accumulated over the layers so far, a
// few 1e-7 relative on the tiny Gemma models, more where a sum cancels. Measured final logits
// against the engine's (gemma2, gemma3): 3e-6 leaves some flips unresolved (1.2e-5, 1.2e-5),
// 1e-5 gives 9.1e-7 and 1.4e-6, 3e-5 starts taking coincidences (5.7e-6, 1.0e-5).
const geluNear = 1e-5

func testWholeMatchesFloat64Reference(t *testing.T, path string) {
	if w := worstVersusReference(t, path, loadRef(t, path)); w > 1e-4 {
		t.Fatalf("engine disagrees with the float64 reference: max abs diff %.3g > 1e-4", w)
	}
}

// worstVersusReference is the largest |logit - reference| over 24 positions of a prompt.
func worstVersusReference(t *testing.T, path string, ref *refModel) float64 {
	ctx := context.Background()
	load := func(r shard.Range, opts ...shard.StageOption) *shard.Stage {
		opts = append(opts, shard.WithSliceDir(t.TempDir()), shard.WithCacheType("f32"), shard.WithMaxContext(64), shard.WithMaxSessions(1))
		st, err := shard.LoadStage(ctx, path, r, opts...)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { st.Close() })
		if err := st.OpenSession(7); err != nil {
			t.Fatal(err)
		}
		return st
	}
	whole := load(shard.Range{Start: 0, End: ref.layers})
	// GeGLU models: the same model one layer per stage, whose F32 boundaries show the
	// engine's stream after every layer (split == whole: the last stage's logits equal
	// whole's, checked below), for resolveGELU.
	var layers []*shard.Stage
	if ref.geglu {
		ref.tau = geluNear
		for l := range ref.layers {
			layers = append(layers, load(shard.Range{Start: l, End: l + 1}, shard.WithThreads(1)))
		}
	}
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
	var worst float64
	var flips int
	for pos, id := range ids[:positions] {
		out, err := whole.Forward(ctx, shard.Step{Session: 7, Positions: []int32{int32(pos)}, Tokens: []int32{id}})
		if err != nil {
			t.Fatal(err)
		}
		var want []float64
		if layers == nil {
			want = ref.step(id, pos)
		} else {
			var n int
			want, n = ref.resolveGELU(t, layers, id, pos, out.Logits)
			flips += n
		}
		if len(out.Logits) != len(want) {
			t.Fatalf("pos %d: %d logits, want %d", pos, len(out.Logits), len(want))
		}
		for i, w := range want {
			worst = math.Max(worst, math.Abs(float64(out.Logits[i])-w))
		}
	}
	t.Logf("max |logit - float64 reference| over %d positions x %d vocab: %.3g (GELU table roundings taken the engine's way: %d)",
		positions, ref.vocab, worst, flips)
	return worst
}

// resolveGELU runs the reference one token on, layer by layer beside the engine's one-layer
// stages, and returns its logits and how many GELU roundings it took the other way.
//
// Why: ggml's GELU reads a half-precision table (see gelu), so an input within float32 error
// of a rounding midpoint lands on either neighbour, and which one depends on the engine's
// float32 sums, not on the real numbers. One flip moves a GELU by a half-precision step;
// Gemma's post-MLP norm rescales the small MLP output to unit size and so magnifies it, and
// the layers after carry it on. With every input rounded the real numbers' way, the tiny
// gemma3's logits differ from the engine's by 2.2e-4 (gemma2 9.8e-5), and moving every GELU
// input by 1e-6 moves the reference's own logits by 3.7e-4: 1e-4 cannot hold for a reference
// that ignores the table's ambiguity, whatever else it gets right. Nothing else is off:
// layer by layer, from the engine's own stream, each Gemma layer agrees to 1.5e-6 (gemma2
// 3.8e-6; 3.7e-4 unresolved) once the one or two near inputs a position and layer has are
// rounded as the engine's output says; the unexplained jumps (up to 5.7e-5 with no near
// input) were table entries the float64 GELU rounded the other way (see geluEntry).
//
// So: at each layer the reference notes its GELU inputs within geluNear of a midpoint (about
// four a layer and position, of 192) and, one at a time, rounds each the other way, keeping the
// flip only if the layer's output then lies closer to the engine's. It never takes the
// engine's numbers, only those binary choices, and its own stream runs on. That leaves the
// oracle its teeth: with the reference's embedding scale off by 0.1%, its local RoPE base by
// 1%, its RMSNorm epsilon by 10x, gemma2's attention cap by 1%, or a window one token wider,
// the resolved logits still differ by 1.5e-3 to 1.95 (tried by hand, not kept as tests).
func (m *refModel) resolveGELU(t *testing.T, layers []*shard.Stage, token int32, pos int, logits []float32) ([]float64, int) {
	t.Helper()
	x := m.embed(token)
	var hidden []float32
	var flips int
	var out []float64
	for l, st := range layers {
		step := shard.Step{Session: 7, Positions: []int32{int32(pos)}, Hidden: hidden}
		if l == 0 {
			step.Tokens = []int32{token}
		}
		o, err := st.Forward(context.Background(), step)
		if err != nil {
			t.Fatal(err)
		}
		last := l == len(layers)-1
		engine := o.Hidden
		if last {
			engine = o.Logits
			if !slices.Equal(engine, logits) {
				t.Fatalf("pos %d: one stage per layer gives other logits than the whole model", pos)
			}
		}
		run := func(flip map[geluSite]bool) []float64 {
			m.keys[l], m.values[l] = m.keys[l][:pos], m.values[l][:pos]
			m.flip, m.near = flip, nil
			y := slices.Clone(x)
			m.layer(l, pos, y)
			if last {
				return m.head(m.rmsnorm(y, m.w["output_norm.weight"]))
			}
			return y
		}
		dist := func(y []float64) float64 {
			var d float64
			for i, v := range y {
				d = math.Max(d, math.Abs(float64(engine[i])-v))
			}
			return d
		}
		flip := map[geluSite]bool{}
		best := dist(run(flip))
		for _, s := range m.near {
			flip[s] = true
			if d := dist(run(flip)); d < best {
				best = d
			} else {
				delete(flip, s)
			}
		}
		flips += len(flip)
		out = run(flip)
		if !last {
			x, hidden = out, o.Hidden
		}
	}
	m.flip, m.near = nil, nil
	return out, flips
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
