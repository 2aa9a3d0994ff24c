package cli

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	"github.com/strata-llm/strata/bench"
)

func newBenchLoadCommand() *cobra.Command {
	var (
		cfg          bench.LoadConfig
		clients, out string
	)
	cmd := &cobra.Command{
		Use:   "load [--clients 10,50,100] [--duration 60s] [--soak 10m]",
		Short: "Load a local swarm with many clients: requests per minute, TTFT and queue wait, RSS over a soak",
		Long: `Starts --nodes local 'strata node start' processes of a synthesized model (or --model FILE;
or loads the running swarm behind --api), then runs closed-loop clients, each sending its next
streamed completion as soon as the last one ends, for --duration at each --clients level. For
each level it prints the requests answered per minute, the errors by kind (a 429 from a full
queue counts as one), the time to first token (p50, p99) and the wait in the entry's admission
queue (p50 and an upper bound of p99, from the node's strata_queue_wait_seconds histogram).
Then it soaks the swarm with --soak-clients for --soak and samples each node's RSS every
--sample-every. The nodes share the machine's cores through one CPU lock; other work on the
machine changes every figure, so the load average is printed beside them.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			for _, s := range strings.Split(clients, ",") {
				n, err := strconv.Atoi(strings.TrimSpace(s))
				if err != nil {
					return fmt.Errorf("--clients %q: want comma-separated client counts such as 10,50,100", clients)
				}
				cfg.Clients = append(cfg.Clients, n)
			}
			if cfg.Soak == 0 {
				cfg.Soak = -1 // --soak 0: none
			}
			cfg.Progress = cmd.ErrOrStderr()
			rep, runErr := bench.RunLoad(cmd.Context(), cfg)
			if rep == nil {
				return runErr
			}
			fmt.Fprintln(cmd.OutOrStdout())
			rep.Markdown(cmd.OutOrStdout())
			if out != "" {
				b, err := json.MarshalIndent(rep, "", "  ")
				if err == nil {
					err = os.WriteFile(out, b, 0o644)
				}
				if err != nil {
					return errors.Join(runErr, fmt.Errorf("--json: %w", err))
				}
			}
			return runErr
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfg.Preset, "preset", "tiny", "shape of the synthesized llama model: tiny, small, 8b, 70b")
	f.StringVar(&cfg.Type, "type", "q8_0", "weight format of the synthesized model")
	f.StringVar(&cfg.Model, "model", "", "load a swarm of this GGUF file instead of a synthesized model")
	f.IntVar(&cfg.Nodes, "nodes", 3, "local nodes in the swarm")
	f.IntVar(&cfg.MaxSessions, "max-sessions", 8, "each node's --max-sessions")
	f.IntVar(&cfg.Queue, "queue", 256, "the entry node's --queue")
	f.DurationVar(&cfg.QueueTimeout, "queue-timeout", 0, "the entry node's --queue-timeout (default 2m)")
	f.IntVar(&cfg.Cores, "cores", 0, "ggml threads per node (default: all cores; the nodes take turns through one CPU lock)")
	f.StringVar(&clients, "clients", "10,50,100", "closed-loop clients, one level each")
	f.DurationVar(&cfg.Duration, "duration", 0, "how long each level runs (default 60s)")
	f.DurationVar(&cfg.Soak, "soak", 0, "how long the soak runs after the levels (e.g. 10m; 0: no soak)")
	f.IntVar(&cfg.SoakClients, "soak-clients", 0, "clients during the soak (default: the first level's)")
	f.DurationVar(&cfg.SampleEvery, "sample-every", 0, "how often each node's RSS is read during the soak (default 10s)")
	f.IntVar(&cfg.Tokens, "tokens", 16, "new tokens per request")
	f.IntVar(&cfg.PromptTokens, "prompt-tokens", 32, "tokens per prompt, BOS included")
	f.StringVar(&cfg.API, "api", "", "load the running swarm behind this node's API (host:port) instead of starting one; needs --model")
	f.StringVar(&cfg.DataDir, "data-dir", "", "model cache and the nodes' state (default ~/.strata)")
	f.StringVar(&out, "json", "", "write every measurement to this JSON file")
	cmd.Flags().SortFlags = false
	return cmd
}
