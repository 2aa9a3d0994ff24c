package cli

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"runtime/pprof"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	"github.com/strata-llm/strata/bench"
	"github.com/strata-llm/strata/p2p"
	"github.com/strata-llm/strata/quant"
)

func newBenchCommand() *cobra.Command {
	var (
		cfg                  bench.Config
		conc, codec, bw, out string
		cpuProfile           string
	)
	cmd := &cobra.Command{
		Use:   "bench [--preset 70b --layers N] [--nodes K] [--concurrency 1,4,8]",
		Short: "Measure a local swarm against the whole model in one process",
		Long: `Synthesizes a model (cached in the data dir; or --model FILE), measures it whole in this
process, then starts K local 'strata node start' processes that split it into a K-stage
pipeline and measures them the same way, through the OpenAI API: time to first token,
prefill and decode tokens/s for each number of concurrent streams, each node's peak memory
against its slice, and bytes on the wire per token. --latency (and --bandwidth) add a run
with that one-way latency injected into every node's libp2p streams. Prints markdown tables;
--json writes everything measured.

Nodes share this machine's cores through one CPU lock (strata node start --cpu-lock): each
computes with every core while it holds it, as the whole model does. Without it
(--no-cpu-lock) each node gets cores / nodes threads: ggml's worker threads spin at every
barrier, so more would preempt each other. Each node gets just the --max-memory its share
of layers needs, so the planner forms exactly one K-stage chain.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var err error
			for _, s := range strings.Split(conc, ",") {
				n, perr := strconv.Atoi(strings.TrimSpace(s))
				if perr != nil {
					return fmt.Errorf("--concurrency %q: want comma-separated stream counts such as 1,4,8", conc)
				}
				cfg.Concurrency = append(cfg.Concurrency, n)
			}
			if cfg.Codec, err = quant.ParseCodec(codec); err != nil {
				return fmt.Errorf("--codec: %w", err)
			}
			if cfg.Bandwidth, err = p2p.ParseBandwidth(bw); err != nil {
				return fmt.Errorf("--bandwidth: %w", err)
			}
			if cfg.Layers < 0 {
				return errors.New("--layers must not be negative")
			}
			cfg.Log = slog.Default()
			cfg.Progress = cmd.ErrOrStderr()
			if cpuProfile != "" {
				f, err := os.Create(cpuProfile)
				if err != nil {
					return fmt.Errorf("--cpuprofile: %w", err)
				}
				defer f.Close()
				if err := pprof.StartCPUProfile(f); err != nil {
					return fmt.Errorf("--cpuprofile: %w", err)
				}
				defer pprof.StopCPUProfile()
			}
			rep, runErr := bench.Run(cmd.Context(), cfg)
			if rep != nil && cfg.PlanOnly {
				// Shell assignments, for scripts that start the nodes themselves (scripts/netns-bench.sh).
				s := rep.Settings
				fmt.Fprintf(cmd.OutOrStdout(), "STRATA_MODEL=%q\nSTRATA_NODE_MEMORY=%d\nSTRATA_CONTEXT=%d\nSTRATA_SESSIONS=%d\nSTRATA_THREADS=%d\nSTRATA_CODEC=%s\n",
					rep.Model.Path, s.NodeMemory, s.Context, s.Sessions, s.ThreadsPerNode, s.Codec)
				return runErr
			}
			if rep != nil {
				fmt.Fprintln(cmd.OutOrStdout())
				rep.Markdown(cmd.OutOrStdout())
				if out != "" {
					if err := rep.WriteJSON(out); err != nil {
						return errors.Join(runErr, err)
					}
				}
			}
			return runErr
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfg.Arch, "arch", "llama", "architecture of the synthesized model (see strata model synth --arch)")
	f.StringVar(&cfg.Preset, "preset", "70b", "shape of the synthesized model: tiny, small, 8b, 70b, or the architecture's real shapes")
	f.IntVar(&cfg.Layers, "layers", 0, "layers of the synthesized model (default: the preset's)")
	f.IntVar(&cfg.Experts, "experts", 0, "experts per layer of the synthesized model (default: the preset's; the table says when set)")
	f.StringVar(&cfg.Type, "type", "q4_0", "weight format of the synthesized model")
	f.Uint64Var(&cfg.Seed, "seed", 1, "seed of the synthesized model's weights")
	f.StringVar(&cfg.Model, "model", "", "measure this GGUF file instead of a synthesized model")
	f.IntVar(&cfg.Nodes, "nodes", 3, "local nodes in the swarm")
	f.StringVar(&conc, "concurrency", "1,4,8", "concurrent streams, one measurement each")
	f.StringVar(&codec, "codec", "f16", "activations on the wire: f32, f16, q8")
	f.DurationVar(&cfg.Latency, "latency", 0, "also measure one stream with this one-way latency injected on every link, e.g. 20ms")
	f.StringVar(&bw, "bandwidth", "", "bandwidth of the injected link, e.g. 1Gbit (default: unlimited)")
	f.IntVar(&cfg.Tokens, "tokens", 64, "new tokens per stream")
	f.IntVar(&cfg.PromptTokens, "prompt-tokens", 128, "tokens per prompt, BOS included")
	f.IntVar(&cfg.Cores, "cores", 0, "cores the nodes share and the whole model uses (default: all)")
	f.IntVar(&cfg.NodeThreads, "node-threads", 0, "ggml threads per node (default: all cores; cores / nodes with --no-cpu-lock)")
	f.BoolVar(&cfg.NoCPULock, "no-cpu-lock", false, "let the nodes compute at the same time, each with its share of the cores")
	f.BoolVar(&cfg.SkipWhole, "no-whole", false, "skip the whole-model baseline")
	f.BoolVar(&cfg.WholeAll, "whole-all", false, "measure the whole model at every concurrency, not only the fewest and most streams")
	f.BoolVar(&cfg.WholeOnly, "whole-only", false, "measure the whole model only, no swarm")
	f.IntVar(&cfg.Paired, "paired", 3, "after the swarm's 1-stream level, this many more single streams on the whole model and the swarm in turn, both loaded, for the ratio; with --baseline-binary, as many on this build's whole model and the baseline's (0: none)")
	f.StringVar(&cfg.BaselineBinary, "baseline-binary", "", "also measure the whole model with this strata build (e.g. bin/strata-plain from `make plain`), for the ratio")
	f.BoolVar(&cfg.BaselineFirst, "baseline-first", false, "measure the --baseline-binary before this build")
	f.StringVar(&cfg.DataDir, "data-dir", "", "model cache and the nodes' state (default ~/.strata)")
	f.StringVar(&cfg.API, "api", "", "measure the running swarm behind this node's API (host:port) instead of starting one; needs --model")
	f.BoolVar(&cfg.PlanOnly, "plan", false, "print the model path and each node's --max-memory, --context, --max-sessions, --threads as shell assignments, and stop")
	f.StringVar(&out, "json", "", "write every measurement to this JSON file")
	f.StringVar(&cpuProfile, "cpuprofile", "", "write this process's CPU profile (the whole-model run and the client) to a file")
	cmd.Flags().SortFlags = false
	cmd.AddCommand(newBenchLoadCommand())
	return cmd
}
