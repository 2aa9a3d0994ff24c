package cli

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"

	"github.com/spf13/cobra"

	"github.com/strata-llm/strata/pipeline"
	"github.com/strata-llm/strata/pipeline/sample"
	"github.com/strata-llm/strata/quant"
	"github.com/strata-llm/strata/shard"
)

func newRunCommand() *cobra.Command {
	var (
		model, prompt, codec, sliceDir string
		maxTokens, split, threads, ctx int
		sp                             sample.Params
	)
	cmd := &cobra.Command{
		Use:   "run --model FILE --prompt TEXT",
		Short: "Generate text in one process, whole or split into K in-process stages",
		Long: `Generates in this process. With --split K the model runs as K stages, and activations pass
between them as the raw little-endian bytes of the wire codec, exactly as between nodes:
greedy output is identical to the whole model.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if model == "" {
				return fmt.Errorf("--model is required")
			}
			model, err := resolveModel(cmd.Context(), model, "")
			if err != nil {
				return err
			}
			c, err := quant.ParseCodec(codec)
			if err != nil {
				return err
			}
			info, err := shard.ReadModelInfo(model)
			if err != nil {
				return err
			}
			if split < 1 || split > info.Layers {
				return fmt.Errorf("--split must be between 1 and the model's %d layers", info.Layers)
			}
			if sliceDir == "" {
				sliceDir = filepath.Join(os.TempDir(), "strata-slices")
			}
			ctx = min(ctx, max(info.ContextLength, 256))
			var stages []*shard.Stage
			defer func() {
				for _, st := range stages {
					st.Close()
				}
			}()
			for i, r := range EvenSplit(info.Layers, split) {
				bar := newProgressBar(os.Stderr, fmt.Sprintf("loading stage %d/%d %s", i+1, split, r))
				st, err := shard.LoadStage(cmd.Context(), model, r, shard.WithSliceDir(sliceDir), shard.WithThreads(threads),
					shard.WithMaxContext(ctx), shard.WithMaxSessions(1), shard.WithProgress(bar.Set))
				if err != nil {
					return err
				}
				bar.Done()
				stages = append(stages, st)
			}
			tok, err := shard.LoadTokenizer(model)
			if err != nil {
				return err
			}
			gen := pipeline.NewGenerator(tok, pipeline.LocalRouter{Stages: stages, Codec: c}, pipeline.WithMaxContext(ctx))
			out := cmd.OutOrStdout()
			_, err = gen.Generate(cmd.Context(), pipeline.Request{Prompt: prompt, MaxTokens: maxTokens, Sampling: sp},
				func(d pipeline.Delta) error {
					_, err := fmt.Fprint(out, d.Text)
					return err
				})
			fmt.Fprintln(out)
			return err
		},
	}
	f := cmd.Flags()
	f.StringVar(&model, "model", "", "GGUF file, Ollama model name, hf://OWNER/REPO/FILE.gguf or URL")
	f.StringVar(&prompt, "prompt", "", "prompt text (sent as is, no chat template)")
	f.IntVar(&maxTokens, "max-tokens", 64, "tokens to generate")
	f.Float32Var(&sp.Temperature, "temperature", 0, "sampling temperature (0: greedy)")
	f.IntVar(&sp.TopK, "top-k", 0, "keep the k most likely tokens (0: all)")
	f.Float32Var(&sp.TopP, "top-p", 0, "nucleus sampling threshold (0: off)")
	f.Float32Var(&sp.MinP, "min-p", 0, "drop tokens below this fraction of the best one's probability")
	f.Float32Var(&sp.RepeatPenalty, "repeat-penalty", 0, "penalty for repeating recent tokens (1 or 0: off)")
	f.IntVar(&sp.RepeatLastN, "repeat-last-n", 64, "how many recent tokens the penalty sees")
	f.Uint64Var(&sp.Seed, "seed", 0, "sampling seed (0: random)")
	f.IntVar(&split, "split", 1, "run as K in-process stages")
	f.StringVar(&codec, "codec", "f32", "activation codec between stages: f32, f16, q8")
	f.IntVar(&threads, "threads", runtime.NumCPU(), "CPU threads per stage")
	f.IntVar(&ctx, "context", 2048, "context length")
	f.StringVar(&sliceDir, "slice-dir", "", "where slice files are cut and cached (default: the temp dir)")
	return cmd
}

// EvenSplit cuts layers into k contiguous ranges whose sizes differ by at most one.
func EvenSplit(layers, k int) []shard.Range {
	rs := make([]shard.Range, 0, k)
	start := 0
	for i := range k {
		n := layers / k
		if i < layers%k {
			n++
		}
		rs = append(rs, shard.Range{Start: start, End: start + n})
		start += n
	}
	return rs
}
