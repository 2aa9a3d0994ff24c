package cpulock

import (
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"
)

// Two opens of one file, as two nodes on a machine would hold, exclude each other.
func TestExcludesOtherOpens(t *testing.T) {
	path := filepath.Join(t.TempDir(), "cpu.lock")
	a, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	a.Lock()
	var got atomic.Bool
	done := make(chan struct{})
	go func() {
		b.Lock()
		got.Store(true)
		b.Unlock()
		close(done)
	}()
	time.Sleep(50 * time.Millisecond)
	if got.Load() {
		t.Fatal("second open took the lock while the first held it")
	}
	a.Unlock()
	<-done
}
