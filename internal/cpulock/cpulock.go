// Package cpulock is a lock on a machine's cores, shared by the Strata nodes running on it.
package cpulock

import (
	"fmt"
	"os"
	"sync"
	"syscall"
)

// Lock is an exclusive flock(2) on a file, plus a mutex for the stages of one process: flock
// locks belong to an open file, so two goroutines of a process would both "hold" it.
type Lock struct {
	mu sync.Mutex
	f  *os.File
}

// Open creates (if need be) and opens the lock file at path.
func Open(path string) (*Lock, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("cpu lock: %w", err)
	}
	return &Lock{f: f}, nil
}

// Lock blocks until this process holds the cores. A failing flock (a file system without
// locks) leaves only the in-process mutex: slower nodes, never a stuck one.
func (l *Lock) Lock() {
	l.mu.Lock()
	for {
		err := syscall.Flock(int(l.f.Fd()), syscall.LOCK_EX)
		if err != syscall.EINTR {
			return
		}
	}
}

// Unlock hands the cores on.
func (l *Lock) Unlock() {
	_ = syscall.Flock(int(l.f.Fd()), syscall.LOCK_UN)
	l.mu.Unlock()
}

// Close releases the file.
func (l *Lock) Close() error { return l.f.Close() }
