package cli

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/strata-llm/strata/p2p"
)

// newSwarmKeyCommand is `strata swarm-key FILE`: a new pre-shared key for a private swarm.
func newSwarmKeyCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "swarm-key FILE",
		Short: "Write a new pre-shared key for a private swarm (- prints it)",
		Long: `Writes a new random 32-byte pre-shared key in the IPFS swarm.key format to FILE (mode
0600; an existing file is never overwritten). Nodes started with --swarm-key FILE talk only
to nodes holding the same key: libp2p connections are encrypted with it (TCP only) and so is
membership gossip. Copy the file to every machine of the swarm. With FILE "-" the key is
printed to stdout instead, e.g. to write it from inside a container:
  docker run --rm --entrypoint strata strata swarm-key - > swarm.key`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if args[0] != "-" {
				if _, err := os.Lstat(args[0]); err == nil {
					return fmt.Errorf("%s already exists: a swarm key is never overwritten (nodes holding the old one would be shut out); pass that file to --swarm-key, or choose another name", args[0])
				}
				if err := p2p.GenerateSwarmKey(args[0]); err != nil {
					return err
				}
				fmt.Fprintf(cmd.ErrOrStderr(), "wrote %s: pass it to every node with --swarm-key %s\n", args[0], args[0])
				return nil
			}
			// p2p writes keys only to new files; a private temporary one keeps the format in
			// one place.
			dir, err := os.MkdirTemp("", "strata-swarm-key")
			if err != nil {
				return fmt.Errorf("swarm key: %w", err)
			}
			defer os.RemoveAll(dir)
			path := filepath.Join(dir, "swarm.key")
			if err := p2p.GenerateSwarmKey(path); err != nil {
				return err
			}
			b, err := os.ReadFile(path)
			if err != nil {
				return fmt.Errorf("swarm key: %w", err)
			}
			_, err = cmd.OutOrStdout().Write(b)
			return err
		},
	}
}
