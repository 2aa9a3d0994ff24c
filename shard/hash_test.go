package shard

import (
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"testing"
)

// Hashing reports its progress up to 1, gives the file's SHA-256, and a second call reads
// the memo without hashing (and without reporting).
func TestFileSHA256Progress(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "m.gguf")
	data := make([]byte, 3<<20)
	for i := range data {
		data[i] = byte(i * 7)
	}
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	var seen []float32
	sum, err := FileSHA256WithProgress(path, filepath.Join(dir, "cache"), func(f float32) { seen = append(seen, f) })
	want := sha256.Sum256(data)
	if err != nil || sum != hex.EncodeToString(want[:]) {
		t.Fatalf("sum %s %v", sum, err)
	}
	if len(seen) < 2 || seen[len(seen)-1] != 1 {
		t.Fatalf("progress %v, want steps ending at 1", seen)
	}
	for i := 1; i < len(seen); i++ {
		if seen[i] < seen[i-1] {
			t.Fatalf("progress went back: %v", seen)
		}
	}
	seen = nil
	if again, err := FileSHA256WithProgress(path, filepath.Join(dir, "cache"), func(f float32) { seen = append(seen, f) }); err != nil || again != sum || len(seen) != 0 {
		t.Fatalf("memo: %s %v, progress %v", again, err, seen)
	}
}
