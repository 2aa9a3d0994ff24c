// Package cli is the strata command line: each command is a thin layer over the packages
// that do the work.
package cli

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"

	"github.com/spf13/cobra"
)

// Execute runs the strata command with args and returns the process exit code.
func Execute(ctx context.Context, args []string) int {
	root := NewRootCommand()
	root.SetArgs(args)
	if err := root.ExecuteContext(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "strata:", err)
		return 1
	}
	return 0
}

// NewRootCommand builds the command tree.
func NewRootCommand() *cobra.Command {
	var verbose bool
	root := &cobra.Command{
		Use:   "strata",
		Short: "Run large language models across a swarm of ordinary machines",
		Long: `Strata cuts a model into contiguous slices of transformer layers, lets each machine load
only its slice, and streams activations between them over libp2p. Any node serves an
OpenAI-compatible API.`,
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRun: func(cmd *cobra.Command, _ []string) {
			level := slog.LevelWarn
			if verbose {
				level = slog.LevelInfo
			}
			setLogger(cmd.ErrOrStderr(), level)
		},
	}
	root.PersistentFlags().BoolVarP(&verbose, "verbose", "v", false, "log what the engine and the swarm do")
	root.AddCommand(newModelCommand(), newQuantCommand(), newRunCommand())
	for _, extra := range extraCommands() {
		root.AddCommand(extra())
	}
	return root
}

func setLogger(w io.Writer, level slog.Level) {
	slog.SetDefault(slog.New(quietEngine{slog.NewTextHandler(w, &slog.HandlerOptions{Level: level})}))
}

// quietEngine lowers to debug what the engine logs at info on every model load but that says
// nothing to a user: ollama's model summary (an empty message) and, on a CPU, that no layer
// went to a GPU.
type quietEngine struct{ slog.Handler }

func (q quietEngine) Handle(ctx context.Context, r slog.Record) error {
	if r.Level == slog.LevelInfo && engineNoise(r.Message) {
		if !q.Handler.Enabled(ctx, slog.LevelDebug) {
			return nil
		}
		r.Level = slog.LevelDebug
	}
	return q.Handler.Handle(ctx, r)
}

func (q quietEngine) WithAttrs(as []slog.Attr) slog.Handler {
	return quietEngine{q.Handler.WithAttrs(as)}
}

func (q quietEngine) WithGroup(name string) slog.Handler {
	return quietEngine{q.Handler.WithGroup(name)}
}

func engineNoise(msg string) bool {
	return msg == "" || strings.HasPrefix(msg, "offloaded 0/") || msg == "offloading 0 repeating layers to GPU" ||
		msg == "offloading output layer to CPU"
}

// isTerminal reports whether f is an interactive terminal, where progress bars belong.
func isTerminal(f *os.File) bool {
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}
