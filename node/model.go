package node

import (
	"context"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"
	"sync"

	"github.com/strata-llm/strata/fetch"
)

// ResolveModel turns --model into a GGUF path without the network (see fetch.ResolveLocal).
func ResolveModel(model, ollamaDir string) (string, error) {
	return fetch.ResolveLocal(model, ollamaDir)
}

func defaultModel() (string, error) { return fetch.DefaultModel() }

// resolveModel turns --model into a local GGUF path, downloading an hf:// reference or a URL
// into DATA_DIR/models first (once: a verified download is used again offline).
func (n *Node) resolveModel(ctx context.Context) (string, error) {
	report := n.progressFor("downloading " + modelID(n.cfg.Model))
	f := fetch.New(filepath.Join(n.cfg.DataDir, "models"), fetch.WithLogger(n.log),
		fetch.WithProgress(func(done, total int64) {
			if total > 0 {
				report(float32(done) / float32(total))
			}
		}))
	return f.Resolve(ctx, n.cfg.Model)
}

// progressFor reports a labelled task (downloading the model, cutting and loading a slice)
// through the configured reporter, a bar on a terminal, else as a log line every quarter.
func (n *Node) progressFor(label string) func(float32) {
	if n.cfg.Progress != nil {
		return n.cfg.Progress(label)
	}
	return logProgress(n.log, label)
}

func logProgress(log *slog.Logger, label string) func(float32) {
	var mu sync.Mutex
	next := float32(0.25)
	return func(f float32) {
		mu.Lock()
		defer mu.Unlock()
		if f >= next {
			log.Info(label, "done", fmt.Sprintf("%.0f%%", f*100))
			for next <= f {
				next += 0.25
			}
		}
	}
}

// modelID is the name clients use for a --model value: an Ollama name as is, a file's or a
// download's base name without .gguf.
func modelID(model string) string {
	id, _, _ := strings.Cut(model, "#")
	if strings.HasSuffix(id, ".gguf") || strings.Contains(id, string(filepath.Separator)) {
		id = strings.TrimSuffix(filepath.Base(id), ".gguf")
	}
	return id
}
