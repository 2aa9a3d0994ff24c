package cli

import "github.com/spf13/cobra"

// extraCommands are the commands whose packages are wired in beside the model tools.
func extraCommands() []func() *cobra.Command {
	return []func() *cobra.Command{newNodeCommand, newStatusCommand, NewChatCommand, newDemoCommand, newBenchCommand, newSwarmKeyCommand}
}
