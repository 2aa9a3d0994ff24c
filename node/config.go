// Package node is the Strata daemon: it joins the swarm, agrees with the other nodes on who
// serves which layers, loads its slice, serves it to the stage protocol, and answers the
// OpenAI-compatible API by routing requests through the swarm.
package node

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/strata-llm/strata/quant"
)

// Config is what `strata node start` is told. The zero value of each field means its default.
type Config struct {
	Model      string   // GGUF path or Ollama model name (default: the only one in Ollama's store)
	DataDir    string   // identity, slice cache, multiaddr file (default ~/.strata)
	Listen     []string // libp2p multiaddrs (default TCP and, without a swarm key, QUIC on port 4001)
	API        string   // host:port of the HTTP API (default 127.0.0.1:8080)
	Join       []string // bootstrap peers' multiaddrs
	Gossip     string   // host:port of memberlist (default: the libp2p host, port+1)
	SwarmKey   string   // path of a pre-shared key file: a private swarm (TCP only)
	MaxMemory  int64    // bytes this node offers for weights and KV cache (default: 80% of the RAM free at start)
	MDNS       bool     // find peers on the LAN
	ClientOnly bool     // serve the API only, hold no layers
	APIKey     string   // bearer token the API requires, if set
	// ProtectMonitoring puts /health, /metrics, the dashboard and its JSON behind APIKey too.
	ProtectMonitoring bool
	Threads           int // ggml CPU threads (default: all cores)
	// GPULayers bounds the layers a stage puts on the GPUs: 0 (default) as many as their
	// memory holds, negative none (CPU only).
	GPULayers int
	// Devices picks the GPUs to compute on among those ggml sees (shard.SelectDevices):
	// "Vulkan0,CUDA1", a library ("CUDA"), indices, or "cpu"; empty: all.
	Devices string
	// CPULock, if set, is a file the nodes sharing this machine's cores all name: each
	// computes with all its threads while it holds the lock (internal/cpulock).
	CPULock     string
	MaxSessions int // sessions a stage holds at once (default 8)
	MaxContext  int // tokens per session (default 2048)
	// Deterministic runs each step alone, in a KV cache of its session's own, on this node's
	// stages, so a session's tokens do not depend on what else the swarm serves (see
	// shard.WithUnbatched).
	Deterministic bool
	Codec         quant.Codec
	Logger        *slog.Logger
	// Progress, if set, makes a progress reporter for a labelled task (cutting and loading a
	// slice); the CLI draws bars on a terminal. Unset, progress goes to the log.
	Progress func(label string) func(float32)

	// RecoverFor is how long a generation whose stage failed keeps trying to rebuild its
	// route, waiting for the swarm to re-plan, before the client gets an error naming the
	// missing layers (default 30s).
	RecoverFor time.Duration

	// Queue bounds the requests waiting at this entry for room on a busy swarm (default 64;
	// negative: none, a busy swarm is answered 429 at once); QueueTimeout is how long one
	// may wait before it is answered 429 (default 60s).
	Queue        int
	QueueTimeout time.Duration

	// Tuning, mostly for tests.
	ReplanDelay time.Duration // settle time after a membership change (default 300ms)
	DrainWait   time.Duration // how long a replaced stage waits for its sessions (default 30s)
	// Speed tunes how the node re-measures its speed while it runs (speed.go).
	Speed SpeedOptions

	// FetchBandwidth caps the bytes per second of weights this node fetches and serves
	// (0: no cap), so serving slices to joining peers leaves room for pipeline traffic.
	FetchBandwidth int64
	// SlicesOnly, with an hf:// or URL Model, reads the GGUF header and then only this node's
	// slices from the server with Range requests instead of downloading the whole file.
	SlicesOnly bool

	// threadsDefault: Threads was not given, so the node computes with every core (host.go).
	threadsDefault bool

	// swarmName is set when --model names a model this machine lacks, to be taken from the
	// swarm (see nameInSwarm).
	swarmName string

	// Benchmarks only: emulate a slower network on this node's libp2p streams (p2p.WithLatency).
	InjectLatency   time.Duration // one-way latency added to every frame this node sends
	InjectBandwidth float64       // bytes/s of the emulated link; 0: unlimited
}

// DefaultDataDir is where a node keeps its identity, slices and downloaded models when
// --data-dir is not given: ~/.strata.
func DefaultDataDir() (string, error) {
	home, err := os.UserHomeDir()
	if err != nil {
		return "", fmt.Errorf("data dir: %w", err)
	}
	return filepath.Join(home, ".strata"), nil
}

func (c *Config) setDefaults() error {
	if c.Model == "" {
		m, err := defaultModel()
		if err != nil && len(c.Join) > 0 {
			m, err = SwarmModel, nil // joining a swarm: take its model (weights.go)
		}
		if err != nil {
			return err
		}
		c.Model = m
		if c.Logger != nil {
			c.Logger.Info("no --model given: serving the only model in Ollama's store", "model", m)
		}
	}
	if c.DataDir == "" {
		d, err := DefaultDataDir()
		if err != nil {
			return err
		}
		c.DataDir = d
	}
	if len(c.Listen) == 0 {
		// TCP first: it is the faster transport on a LAN (measured ~2x QUIC's throughput for
		// 1 MB frames) and the gossip port derives from it. QUIC beside it helps through NATs,
		// but go-libp2p's private networks cannot run over it.
		c.Listen = []string{"/ip4/0.0.0.0/tcp/4001"}
		if c.SwarmKey == "" {
			c.Listen = append(c.Listen, "/ip4/0.0.0.0/udp/4001/quic-v1")
		}
	}
	if c.API == "" {
		c.API = "127.0.0.1:8080"
	}
	if c.Threads <= 0 {
		c.Threads, c.threadsDefault = runtime.NumCPU(), true
	}
	if c.MaxSessions <= 0 {
		c.MaxSessions = 8
	}
	if c.MaxContext <= 0 {
		c.MaxContext = 2048
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.ReplanDelay <= 0 {
		c.ReplanDelay = 300 * time.Millisecond
	}
	if c.DrainWait <= 0 {
		c.DrainWait = 30 * time.Second
	}
	if c.Queue == 0 {
		c.Queue = 64
	}
	if c.QueueTimeout <= 0 {
		c.QueueTimeout = 60 * time.Second
	}
	c.Speed.setDefaults()
	if c.RecoverFor <= 0 {
		c.RecoverFor = 30 * time.Second
	}
	return nil
}

// ParseSize reads sizes like "12GiB", "512MB", "8g" or a plain byte count.
func ParseSize(s string) (int64, error) {
	s = strings.TrimSpace(strings.ToLower(s))
	if s == "" {
		return 0, nil
	}
	units := []struct {
		suffix string
		mult   float64
	}{
		{"tib", 1 << 40}, {"gib", 1 << 30}, {"mib", 1 << 20}, {"kib", 1 << 10},
		{"tb", 1e12}, {"gb", 1e9}, {"mb", 1e6}, {"kb", 1e3},
		{"t", 1 << 40}, {"g", 1 << 30}, {"m", 1 << 20}, {"k", 1 << 10}, {"b", 1},
	}
	mult := 1.0
	for _, u := range units {
		if num, ok := strings.CutSuffix(s, u.suffix); ok {
			s, mult = strings.TrimSpace(num), u.mult
			break
		}
	}
	f, err := strconv.ParseFloat(s, 64)
	if err != nil || f < 0 {
		return 0, fmt.Errorf("bad size %q: want a number with an optional unit such as 12GiB", s)
	}
	return int64(f * mult), nil
}

// freeMemory is the memory available for new allocations, from /proc/meminfo.
func freeMemory() int64 {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "MemAvailable:"); ok {
			f := strings.Fields(rest)
			if len(f) > 0 {
				kb, _ := strconv.ParseInt(f[0], 10, 64)
				return kb << 10
			}
		}
	}
	return 0
}
