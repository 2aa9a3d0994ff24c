package cli

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/strata-llm/strata/fetch"
	"github.com/strata-llm/strata/node"
)

// defaultModelCache is where downloaded models live: the models/ dir of the default data dir,
// the same place `strata node start` keeps them.
func defaultModelCache() string {
	d, err := node.DefaultDataDir()
	if err != nil {
		return filepath.Join(os.TempDir(), "strata-models")
	}
	return filepath.Join(d, "models")
}

// resolveModel turns a --model value into a local GGUF path, downloading a URL or hf://
// reference with a progress bar on a terminal.
func resolveModel(ctx context.Context, model, cacheDir string) (string, error) {
	if cacheDir == "" {
		cacheDir = defaultModelCache()
	}
	bar := newProgressBar(os.Stderr, "downloading "+filepath.Base(model))
	p, err := fetch.New(cacheDir, fetch.WithProgress(downloadProgress(bar))).Resolve(ctx, model)
	if err != nil {
		return "", err
	}
	if fetch.IsRemote(model) {
		bar.Done()
	}
	return p, nil
}

func downloadProgress(bar *progressBar) func(done, total int64) {
	return func(done, total int64) {
		if total > 0 {
			bar.Set(float32(done) / float32(total))
		}
	}
}

func newPullCommand() *cobra.Command {
	var dir string
	cmd := &cobra.Command{
		Use:   "pull hf://OWNER/REPO[@REV]/FILE.gguf | URL",
		Short: "Download a GGUF model from the Hugging Face hub or a URL into the cache",
		Long: `Downloads a model the way --model would on first use: resumed after a broken connection,
checked against the sha256 the hub publishes (or a #sha256=HEX suffix on a URL), and kept in
the cache dir, so later starts need no network. HF_TOKEN reads gated or private repositories;
HF_ENDPOINT points at a mirror.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if !fetch.IsRemote(args[0]) {
				return fmt.Errorf("%q is not an hf:// reference or an http(s) URL", args[0])
			}
			p, err := resolveModel(cmd.Context(), args[0], dir)
			if err != nil {
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), p)
			return nil
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "cache dir (default ~/.strata/models)")
	return cmd
}
