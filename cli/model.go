package cli

import (
	"fmt"
	"os"
	"slices"
	"strings"

	"github.com/spf13/cobra"

	"github.com/strata-llm/strata/internal/testkit"
	"github.com/strata-llm/strata/quant"
	"github.com/strata-llm/strata/shard"
)

func newModelCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "model", Short: "Make, inspect and download GGUF models"}
	cmd.AddCommand(newSynthCommand(), newInfoCommand(), newPullCommand(), newTokenizeCommand())
	return cmd
}

func newSynthCommand() *cobra.Command {
	var o testkit.SynthOptions
	var out string
	cmd := &cobra.Command{
		Use:   "synth --out FILE [--arch A] --preset tiny|small|8b|70b|...",
		Short: "Write a GGUF of a supported architecture with seeded random weights and a real tokenizer",
		Long: `Writes a real llama-architecture GGUF: real shapes (70b: hidden 8192, 64 heads, 8 KV heads,
FFN 28672, vocabulary 128256), weights drawn from the seed and scaled so activations stay
finite over many layers, quantized with ggml's own quantizer, Llama 3's BPE tokenizer and
chat template. --layers keeps a big shape small enough to test with. deepseek2 (deepseek-v3,
MLA form; tiny-mha: ollama's per-head form) and gptoss (gpt-oss-20b, gpt-oss-120b; --type
mxfp4 for MXFP4 experts) keep each expert's real size with --experts N of them per layer.

--arch writes another family with every tensor and key its real files have: qwen2 (presets
tiny, small, qwen2.5-7b, qwen2.5-72b), qwen3 (qwen3-8b, qwen3-32b), mistral3
(mistral-small-24b), gemma2 (gemma2-9b, gemma2-27b), gemma3 (gemma3-12b, gemma3-27b), olmo3
(olmo3-7b, olmo3-32b). Gemma gets Gemma's SentencePiece vocabulary; the others Llama 3's BPE
vocabulary with their own special tokens, pre-tokenizer and chat template.

Mixture of experts: --arch llama --experts 8 is Mixtral (presets mixtral-8x7b, mixtral-8x22b
have it already), --arch qwen3moe is Qwen 3 MoE (qwen3-30b-a3b, qwen3-235b-a22b). --experts N
sets the experts per layer (each of real size), so a real shape's layers fit a small machine.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if out == "" {
				return fmt.Errorf("--out is required")
			}
			bar := newProgressBar(os.Stderr, "synthesizing "+o.Arch+" "+o.Preset)
			if err := testkit.Synthesize(cmd.Context(), out, o, bar.Set); err != nil {
				return err
			}
			bar.Done()
			info, err := shard.ReadModelInfo(out)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "wrote %s: %d layers, hidden %d, vocabulary %d, %s\n", out, info.Layers, info.Hidden, info.Vocab, humanBytes(info.FileSize))
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&out, "out", "", "output GGUF file")
	f.StringVar(&o.Arch, "arch", "llama", "architecture: "+strings.Join(testkit.SynthArchs(), ", "))
	f.StringVar(&o.Preset, "preset", "tiny", "model shape: tiny, small, or the architecture's real ones (llama: 8b, 70b)")
	f.IntVar(&o.Layers, "layers", 0, "number of layers (default: the preset's)")
	f.IntVar(&o.Experts, "experts", 0, "experts per layer (default: the preset's; on llama: Mixtral with N experts)")
	f.Uint64Var(&o.Seed, "seed", 1, "seed of the weights")
	f.StringVar(&o.Type, "type", "f16", "weight format: f32, f16, q8_0, q4_0, q4_k, ... (mxfp4: gptoss's experts, q8_0 elsewhere)")
	f.BoolVar(&o.Tied, "tied", false, "tie the LM head to the token embeddings")
	return cmd
}

func newInfoCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "info FILE",
		Short: "Print a GGUF model's shape and per-layer sizes",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			m, err := shard.ReadModelInfo(args[0])
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			fmt.Fprintf(w, "name        %s\narchitecture %s\nlayers      %d\nhidden      %d\nheads       %d (kv %d, dim %d)\nffn         %d\nvocabulary  %d\ncontext     %d\nweights     %s (layer %s, embeddings %s, head %s)\n",
				m.Name, m.Arch, m.Layers, m.Hidden, m.Heads, m.KVHeads, m.HeadDim, m.FFN, m.Vocab, m.ContextLength,
				humanBytes(m.TotalBytes), humanBytes(m.LayerBytes[0]), humanBytes(m.EmbedBytes), humanBytes(m.HeadBytes))
			if m.Experts > 0 {
				fmt.Fprintf(w, "experts     %d per layer, %d per token\n", m.Experts, m.ExpertsUsed)
			}
			sliding, window := 0, 0
			for _, w := range m.Windows {
				if w > 0 {
					sliding, window = sliding+1, w
				}
			}
			if sliding > 0 {
				fmt.Fprintf(w, "attention   sliding window of %d tokens on %d of %d layers (their KV cache holds only the window)\n", window, sliding, m.Layers)
			}
			if lo, hi := slices.Min(m.LayerBytes), slices.Max(m.LayerBytes); lo != hi { // dense and MoE blocks
				fmt.Fprintf(w, "layers      %s to %s each; KV cache %s per token per layer (f16)\n", humanBytes(lo), humanBytes(hi), humanBytes(m.KVBytesPerToken(2)))
			}
			return nil
		},
	}
}

func newQuantCommand() *cobra.Command {
	var in, out, typ string
	cmd := &cobra.Command{
		Use:   "quant --in FILE --out FILE --type q8_0|q4_0|q4_k|...",
		Short: "Requantize a GGUF model's weight matrices with ggml's quantizer",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if in == "" || out == "" {
				return fmt.Errorf("--in and --out are required")
			}
			f, err := quant.ParseFormat(typ)
			if err != nil {
				return err
			}
			bar := newProgressBar(os.Stderr, "quantizing to "+f.Name)
			if err := quant.Requantize(cmd.Context(), in, out, f, bar.Set); err != nil {
				return err
			}
			bar.Done()
			st, err := os.Stat(out)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "wrote %s (%s)\n", out, humanBytes(st.Size()))
			return nil
		},
	}
	cmd.Flags().StringVar(&in, "in", "", "input GGUF")
	cmd.Flags().StringVar(&out, "out", "", "output GGUF")
	cmd.Flags().StringVar(&typ, "type", "q8_0", "target format: "+fmt.Sprint(quant.Formats()))
	return cmd
}

func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
