package cli

import (
	"errors"

	"github.com/spf13/cobra"
)

func newDemoCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "demo",
		Short: "Start a local three-node swarm on a synthesized tiny model and chat with it",
		RunE:  func(*cobra.Command, []string) error { return errors.New("not implemented yet") },
	}
}
