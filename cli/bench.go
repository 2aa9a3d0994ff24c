package cli

import (
	"errors"

	"github.com/spf13/cobra"
)

func newBenchCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "bench",
		Short: "Measure a local swarm against the whole model in one process",
		RunE:  func(*cobra.Command, []string) error { return errors.New("not implemented yet") },
	}
}
