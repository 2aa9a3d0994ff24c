package bench

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/strata-llm/strata/api"
	"github.com/strata-llm/strata/pipeline"
	"github.com/strata-llm/strata/quant"
	"github.com/strata-llm/strata/shard"
)

// Whole is the baseline: the whole model in this process (one shard stage, the same
// generator the nodes run) behind the same OpenAI API server, so that it is measured by the
// same client through the same HTTP path as the swarm and differs only in having no pipeline.
type Whole struct {
	stage *shard.Stage
	srv   *http.Server
	addr  string
}

// StartWhole loads the model at path whole and serves the API on a free port of 127.0.0.1.
func StartWhole(ctx context.Context, path string, threads, context, sessions int, codec quant.Codec, sliceDir string, log *slog.Logger) (*Whole, error) {
	info, err := shard.ReadModelInfo(path)
	if err != nil {
		return nil, fmt.Errorf("whole model: %w", err)
	}
	st, err := shard.LoadStage(ctx, path, shard.Range{Start: 0, End: info.Layers},
		shard.WithThreads(threads), shard.WithMaxContext(context), shard.WithMaxSessions(sessions),
		shard.WithSliceDir(sliceDir), shard.WithLogger(log))
	if err != nil {
		return nil, fmt.Errorf("whole model: %w", err)
	}
	tok, err := shard.LoadTokenizer(path)
	if err != nil {
		st.Close()
		return nil, fmt.Errorf("whole model: %w", err)
	}
	gen := pipeline.NewGenerator(tok, pipeline.LocalRouter{Stages: []*shard.Stage{st}, Codec: codec},
		pipeline.WithMaxContext(context), pipeline.WithGeneratorLogger(log))
	card := pipeline.ModelCard{ID: info.Name, SHA256: st.Info().ModelSHA256, ContextLength: context, Ready: true,
		BOS: tok.BOS, EOS: tok.EOS}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		st.Close()
		return nil, fmt.Errorf("whole model: listen: %w", err)
	}
	w := &Whole{stage: st, addr: ln.Addr().String()}
	w.srv = &http.Server{Handler: api.NewServer(wholeBackend{card: card, gen: gen}, api.WithLogger(log)), ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := w.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("whole model API", "err", err)
		}
	}()
	return w, nil
}

// API is the server's host:port.
func (w *Whole) API() string { return w.addr }

// Close stops the server and frees the model.
func (w *Whole) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := w.srv.Shutdown(ctx)
	return errors.Join(err, w.stage.Close())
}

type wholeBackend struct {
	card pipeline.ModelCard
	gen  *pipeline.Generator
}

func (b wholeBackend) Models(context.Context) ([]pipeline.ModelCard, error) {
	return []pipeline.ModelCard{b.card}, nil
}

func (b wholeBackend) Generate(ctx context.Context, req pipeline.Request, emit func(pipeline.Delta) error) (pipeline.Result, error) {
	return b.gen.Generate(ctx, req, emit)
}
