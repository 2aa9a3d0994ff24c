package shard_test

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/strata-llm/strata/internal/testkit"
	"github.com/strata-llm/strata/shard"
)

// TestSliceCacheHeals: a cached slice that a crash or a full disk left truncated, or whose
// bytes changed, is found out, deleted and cut again, not loaded (or retried) forever; stale
// temporary files from a crash mid-cut are removed.
func TestSliceCacheHeals(t *testing.T) {
	model := testkit.TinyModel(t)
	sum, err := shard.FileSHA256(model, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	cache := shard.SliceCache{Dir: t.TempDir()}
	ctx := context.Background()
	for _, r := range []shard.Range{{Start: 0, End: 2}, {Start: 2, End: 4}, {Start: 4, End: 6}} {
		p, err := cache.Ensure(ctx, model, sum, r, nil)
		if err != nil {
			t.Fatal(err)
		}
		whole, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		if err := shard.VerifySlice(model, sum, r, p); err != nil {
			t.Fatalf("a fresh slice %s: %v", r, err)
		}
		for name, damage := range map[string]func() error{
			"truncated": func() error { return os.Truncate(p, int64(len(whole)*2/3)) },
			"flipped": func() error {
				b := append([]byte(nil), whole...)
				b[len(b)-5] ^= 0xff
				return os.WriteFile(p, b, 0o644)
			},
			"empty": func() error { return os.WriteFile(p, nil, 0o644) },
		} {
			if err := damage(); err != nil {
				t.Fatal(err)
			}
			if err := shard.VerifySlice(model, sum, r, p); err == nil {
				t.Fatalf("%s slice %s passed verification", name, r)
			}
			if _, err := cache.Ensure(ctx, model, sum, r, nil); err != nil {
				t.Fatalf("%s slice %s: %v", name, r, err)
			}
			again, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			if string(again) != string(whole) {
				t.Fatalf("%s slice %s was not cut again: %d bytes, %d when whole", name, r, len(again), len(whole))
			}
		}
		// The healed slice loads.
		st, err := shard.LoadStage(ctx, model, r, shard.WithSliceDir(cache.Dir), shard.WithThreads(1))
		if err != nil {
			t.Fatal(err)
		}
		st.Close()
	}
	stale := filepath.Join(cache.Dir, ".tmp-x.gguf-123")
	if err := os.WriteFile(stale, []byte("half a slice"), 0o644); err != nil {
		t.Fatal(err)
	}
	if n, err := cache.RemoveStale(); err != nil || n != 1 {
		t.Fatalf("removed %d stale files: %v", n, err)
	}
	if _, err := os.Stat(stale); !os.IsNotExist(err) {
		t.Fatalf("stale temp file still there: %v", err)
	}
}
