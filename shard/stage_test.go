package shard_test

import (
	"context"
	"testing"

	"github.com/strata-llm/strata/internal/testkit"
	"github.com/strata-llm/strata/shard"
)

func TestSmokeWhole(t *testing.T) {
	path := testkit.TinyModel(t)
	info, err := shard.ReadModelInfo(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%+v", *info)
	st, err := shard.LoadStage(context.Background(), path, shard.Range{Start: 0, End: info.Layers}, shard.WithSliceDir(t.TempDir()), shard.WithCacheType("f32"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	tok, err := shard.LoadTokenizer(path)
	if err != nil {
		t.Fatal(err)
	}
	ids, err := tok.Encode("hello world, this is Strata", true)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("ids %v", ids)
	if err := st.OpenSession(1); err != nil {
		t.Fatal(err)
	}
	pos := make([]int32, len(ids))
	for i := range pos {
		pos[i] = int32(i)
	}
	out, err := st.Forward(context.Background(), shard.Step{Session: 1, Positions: pos, Tokens: ids})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("logits %d first %v", len(out.Logits), out.Logits[:5])
}
