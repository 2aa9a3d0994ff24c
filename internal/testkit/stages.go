package testkit

import (
	"context"
	"testing"

	"github.com/strata-llm/strata/shard"
)

// LoadStages loads in-process stages of the model at path over ranges, each with one thread and
// its own slice dir, closed when the test ends, and the model's tokenizer. opts follow the
// defaults, so a test can set the context or the session count.
func LoadStages(tb testing.TB, path string, ranges []shard.Range, opts ...shard.StageOption) ([]*shard.Stage, *shard.Tokenizer) {
	tb.Helper()
	var stages []*shard.Stage
	for _, r := range ranges {
		o := append([]shard.StageOption{shard.WithSliceDir(tb.TempDir()), shard.WithThreads(1)}, opts...)
		st, err := shard.LoadStage(context.Background(), path, r, o...)
		if err != nil {
			tb.Fatal(err)
		}
		tb.Cleanup(func() { st.Close() })
		stages = append(stages, st)
	}
	tok, err := shard.LoadTokenizer(path)
	if err != nil {
		tb.Fatal(err)
	}
	return stages, tok
}
