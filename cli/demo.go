package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/strata-llm/strata/fetch"
	"github.com/strata-llm/strata/internal/testkit"
	"github.com/strata-llm/strata/node"
	"github.com/strata-llm/strata/shard"
)

// The demo's nodes budget their KV cache for this many sessions of this many tokens; the
// --max-memory arithmetic below must use the same numbers, so they are passed explicitly.
const (
	demoContext  = 2048
	demoSessions = 8
	demoMaxNodes = 16
	demoAPI      = "127.0.0.1:8080"
)

type demoOptions struct {
	nodes     int
	model     string
	preset    string
	seed      uint64
	dataDir   string
	api       string
	apiSet    bool // --api was given: a busy port is an error, not a reason to pick another
	noChat    bool
	maxTokens int
	timeout   time.Duration
}

func newDemoCommand() *cobra.Command {
	var o demoOptions
	cmd := &cobra.Command{
		Use:   "demo [--nodes N] [--model FILE] [--no-chat]",
		Short: "Start a local three-node swarm on a synthesized tiny model and chat with it",
		Long: `Synthesizes a tiny model (random weights, Llama 3's tokenizer; cached in the data dir),
starts N local node processes that split its layers between them, waits until the swarm
is ready, prints the API address and a curl line, and opens a chat. The synthesized model's
weights are random, so its answers are gibberish: the demo shows the machinery, not a model.
Ctrl-C (or /exit) stops every node it started. --model serves a real GGUF file instead.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			f := cmd.Flags()
			if o.model != "" && (f.Changed("preset") || f.Changed("seed")) {
				return errors.New("--preset and --seed choose the synthesized model: they do not apply with --model")
			}
			if o.nodes < 1 || o.nodes > demoMaxNodes {
				return fmt.Errorf("--nodes %d: want 1 to %d", o.nodes, demoMaxNodes)
			}
			if o.model == "" {
				if _, err := testkit.LookupPreset(o.preset); err != nil {
					return fmt.Errorf("--preset: %w", err)
				}
			}
			if _, _, err := net.SplitHostPort(o.api); err != nil {
				return fmt.Errorf("--api %q: want HOST:PORT: %w", o.api, err)
			}
			if o.maxTokens < 0 {
				return fmt.Errorf("--max-tokens %d: must not be negative", o.maxTokens)
			}
			if o.timeout <= 0 {
				return fmt.Errorf("--timeout %s: must be positive", o.timeout)
			}
			if o.dataDir == "" {
				home, err := os.UserHomeDir()
				if err != nil {
					return fmt.Errorf("--data-dir not given and no home directory: %w", err)
				}
				o.dataDir = filepath.Join(home, ".strata", "demo")
			}
			o.apiSet = f.Changed("api")
			return runDemo(cmd.Context(), o, cmd.InOrStdin(), cmd.OutOrStdout(), cmd.ErrOrStderr())
		},
	}
	f := cmd.Flags()
	f.IntVar(&o.nodes, "nodes", 3, "how many local nodes to start")
	f.StringVar(&o.model, "model", "", "GGUF file or Ollama model name to serve (default: synthesize one)")
	f.StringVar(&o.preset, "preset", "tiny", "shape of the synthesized model: tiny, small, 8b, 70b")
	f.Uint64Var(&o.seed, "seed", 1, "seed of the synthesized model's weights")
	f.StringVar(&o.dataDir, "data-dir", "", "where the model and the nodes' state go (default ~/.strata/demo)")
	f.StringVar(&o.api, "api", demoAPI, "API address of the first node (any free port if it is taken)")
	f.BoolVar(&o.noChat, "no-chat", false, "print the API address and wait for Ctrl-C instead of chatting")
	f.IntVar(&o.maxTokens, "max-tokens", 200, "most tokens per answer, in the chat and the curl line (0: up to the context)")
	f.DurationVar(&o.timeout, "timeout", 5*time.Minute, "how long to wait for the swarm to be ready")
	return cmd
}

// runDemo does the demo's three phases: start (interruptible), serve (chat or wait), stop.
func runDemo(ctx context.Context, o demoOptions, in io.Reader, out, errOut io.Writer) error {
	// Interrupts are handled here, not through ctx alone: the first Ctrl-C in the chat stops
	// one answer, and one while stopping kills the nodes at once.
	sig := make(chan os.Signal, 2)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	defer signal.Stop(sig)

	if err := os.MkdirAll(o.dataDir, 0o755); err != nil {
		return fmt.Errorf("demo data dir: %w", err)
	}
	unlock, err := lockDemoDir(o.dataDir)
	if err != nil {
		return err
	}
	defer unlock()

	startCtx, cancel := context.WithCancel(ctx)
	watchDone := make(chan struct{})
	go func() {
		select {
		case <-sig:
			cancel()
		case <-watchDone:
		}
	}()
	started := time.Now()
	s, info, err := startDemoSwarm(startCtx, o, errOut)
	close(watchDone)
	interrupted := startCtx.Err() != nil
	cancel()
	if s != nil {
		defer stopDemoSwarm(s, sig, errOut)
	}
	if err != nil {
		if interrupted {
			return errors.New("demo interrupted while starting")
		}
		return err
	}
	first := s.Nodes[0]
	fmt.Fprintf(errOut, "ready in %.1fs\n", time.Since(started).Seconds())
	printDemoSwarm(ctx, s, errOut)
	modelID := demoModelID(ctx, first.API, info)
	fmt.Fprintf(out, "\nAPI (OpenAI-compatible): http://%s/v1   model: %s\n", first.API, modelID)
	fmt.Fprintf(out, "Dashboard (layer map, nodes, live tokens/s, chat): http://%s/\n", first.API)
	fmt.Fprintf(out, "Try it from another terminal:\n  %s\n\n", demoCurl(first.API, modelID, o.maxTokens))
	if o.model == "" {
		fmt.Fprintln(errOut, "(the synthesized model's weights are random: expect gibberish, generated through the swarm)")
	}

	if o.noChat {
		fmt.Fprintln(errOut, "Press Ctrl-C to stop the swarm.")
		return waitDemo(ctx, s, sig, errOut)
	}
	chat, err := newChatSession(chatOptions{api: first.API, model: modelID, maxTokens: o.maxTokens}, in, out, errOut)
	if err != nil {
		return err
	}
	chat.interrupts = sig
	chat.interactive = isChatTerminal(in)
	// The chat ends on /exit, EOF or Ctrl-C at the prompt; main's context is cancelled by
	// the Ctrl-C that stops an answer, which must not end the session.
	return chat.loop(context.WithoutCancel(ctx))
}

// startDemoSwarm finds or synthesizes the model and starts the nodes one by one. The swarm it
// returns, even with an error, holds the nodes already started, for the caller to stop.
func startDemoSwarm(ctx context.Context, o demoOptions, log io.Writer) (*testkit.Swarm, *shard.ModelInfo, error) {
	path, err := demoModelPath(ctx, o, log)
	if err != nil {
		return nil, nil, err
	}
	info, err := shard.ReadModelInfo(path)
	if err != nil {
		return nil, nil, err
	}
	mem, want := demoMemory(info, o.nodes)
	fmt.Fprintf(log, "model %s: %d layers, %s; each node offers %s (weights and KV cache for %d x %d tokens)\n",
		path, info.Layers, humanBytes(info.FileSize), humanBytes(mem), demoSessions, demoContext)

	bin, err := os.Executable()
	if err != nil {
		return nil, nil, fmt.Errorf("finding the strata binary to start nodes with: %w", err)
	}
	api, err := demoAPIAddr(o, log)
	if err != nil {
		return nil, nil, err
	}
	dir := filepath.Join(o.dataDir, "nodes")
	model := path
	if o.model != "" && !fetch.IsRemote(o.model) {
		// The nodes resolve it themselves and serve it under its name: an Ollama model keeps
		// "llama3.2:1b" as its ID rather than the name of a blob in Ollama's store. A download
		// was made once, above, and the nodes share the file.
		model = o.model
	}
	s, err := testkit.StartSwarm(ctx, testkit.SwarmOptions{
		Binary: bin,
		Model:  model,
		Dir:    dir,
		// ggml's worker threads spin: nodes sharing this machine share its cores.
		Threads: max(1, runtime.NumCPU()/o.nodes),
		Args: []string{"--max-memory", fmt.Sprint(mem), "--context", fmt.Sprint(demoContext),
			"--max-sessions", fmt.Sprint(demoSessions)},
	})
	if err != nil {
		return nil, nil, err
	}
	for i := range o.nodes {
		// The launcher takes a node's address files as the sign that it is up: files left by
		// an earlier demo in the same directory would be read before the new node writes them.
		nodeDir := filepath.Join(dir, fmt.Sprintf("node%d", i))
		for _, name := range []string{"api", "multiaddr"} {
			if err := os.Remove(filepath.Join(nodeDir, name)); err != nil && !errors.Is(err, os.ErrNotExist) {
				return s, nil, fmt.Errorf("clearing node %d's old address file: %w", i+1, err)
			}
		}
		fmt.Fprintf(log, "starting node %d/%d ...", i+1, o.nodes)
		t0 := time.Now()
		var extra []string
		if i == 0 {
			extra = []string{"--api", api}
		}
		n, err := s.Add(ctx, extra...)
		if err != nil {
			fmt.Fprintln(log)
			return s, nil, fmt.Errorf("starting node %d: %w", i+1, err)
		}
		fmt.Fprintf(log, " up in %.1fs (api %s, log %s)\n", time.Since(t0).Seconds(), n.API, n.LogPath)
	}
	fmt.Fprintf(log, "waiting for the nodes to plan the split and load their layers ...\n")
	if err := s.WaitReady(ctx, want, o.timeout); err != nil {
		for _, n := range s.Nodes {
			fmt.Fprintf(log, "node %d log:%s\n", n.Index+1, n.Tail(15))
		}
		return s, nil, err
	}
	return s, info, nil
}

// demoModelPath resolves --model, or synthesizes the preset into the data dir once per seed.
func demoModelPath(ctx context.Context, o demoOptions, log io.Writer) (string, error) {
	if o.model != "" {
		// A download happens once, here, not once per node.
		if fetch.IsRemote(o.model) {
			return resolveModel(ctx, o.model, "")
		}
		return node.ResolveModel(o.model, "")
	}
	path := filepath.Join(o.dataDir, fmt.Sprintf("%s-seed%d.gguf", o.preset, o.seed))
	if _, err := os.Stat(path); err == nil {
		fmt.Fprintf(log, "using the %s model synthesized earlier: %s\n", o.preset, path)
		return path, nil
	}
	fmt.Fprintf(log, "synthesizing a %s model (seed %d) ...", o.preset, o.seed)
	t0 := time.Now()
	var bar *progressBar
	var progress func(float32)
	if f, ok := log.(*os.File); ok && isTerminal(f) {
		fmt.Fprintln(log)
		bar = newProgressBar(f, "synthesizing "+o.preset)
		progress = bar.Set
	}
	// The synthesizer writes through a temporary file: an interrupted run leaves no model
	// behind that a later run would take for a complete one.
	if err := testkit.Synthesize(ctx, path, testkit.SynthOptions{Preset: o.preset, Seed: o.seed}, progress); err != nil {
		fmt.Fprintln(log)
		return "", err
	}
	if bar != nil {
		bar.Done()
	}
	fmt.Fprintf(log, " done in %.1fs\n", time.Since(t0).Seconds())
	return path, nil
}

// demoMemory is the --max-memory every node gets so that the nodes split the model between
// them rather than each holding all of it: room for ceil(layers/nodes) layers and the larger
// of the embeddings and the head. It also returns how many nodes at least must serve for the
// model to be covered, which is what readiness waits for.
func demoMemory(info *shard.ModelInfo, nodes int) (mem int64, minServing int) {
	shape := shard.ModelShape{
		Layers:          info.Layers,
		LayerBytes:      slices.Max(info.LayerBytes),
		KVBytesPerToken: info.KVBytesPerToken(2), // the nodes' KV cache is F16
		EmbedBytes:      info.EmbedBytes,
		HeadBytes:       info.HeadBytes,
		Context:         demoContext * demoSessions,
	}
	per := (shape.Layers + nodes - 1) / nodes
	if per >= shape.Layers {
		return shape.TotalBytes(), 1
	}
	cost := shape.LayerCost()
	mem = int64(per)*cost + max(shape.EmbedBytes, shape.HeadBytes)
	most := per // the most layers any node can hold: a middle one may fit more than per
	if cost > 0 {
		most = max(per, int(mem/cost))
	}
	return mem, (shape.Layers + most - 1) / most
}

// demoAPIAddr is the first node's API address: --api, or the default unless something else
// already listens there, in which case any free port (the demo prints it).
func demoAPIAddr(o demoOptions, log io.Writer) (string, error) {
	ln, err := net.Listen("tcp", o.api)
	if err == nil {
		ln.Close()
		return o.api, nil
	}
	if o.apiSet {
		return "", fmt.Errorf("--api %s: %w", o.api, err)
	}
	host, _, _ := net.SplitHostPort(o.api)
	fmt.Fprintf(log, "%s is taken; the API gets a free port instead\n", o.api)
	return net.JoinHostPort(host, "0"), nil
}

// printDemoSwarm shows which layers each node serves, from each node's own /health.
func printDemoSwarm(ctx context.Context, s *testkit.Swarm, w io.Writer) {
	for _, n := range s.Nodes {
		h, err := demoHealth(ctx, n.API)
		layers := "no layers (spare)"
		switch {
		case err != nil:
			layers = "health unknown: " + err.Error()
		case h.Range != nil:
			layers = fmt.Sprintf("layers %s", h.Range)
		}
		fmt.Fprintf(w, "  node %d  %-18s api %s\n", n.Index+1, layers, n.API)
	}
}

func demoHealth(ctx context.Context, api string) (node.Health, error) {
	var h node.Health
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+api+"/health", nil)
	if err != nil {
		return h, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return h, err
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(resp.Body).Decode(&h); err != nil {
		return h, fmt.Errorf("bad /health answer from %s: %w", api, err)
	}
	return h, nil
}

// demoModelID is the name the API serves the model under, which clients must send.
func demoModelID(ctx context.Context, api string, info *shard.ModelInfo) string {
	if h, err := demoHealth(ctx, api); err == nil && h.Model != "" {
		return h.Model
	}
	return strings.TrimSuffix(filepath.Base(info.Path), ".gguf")
}

// demoCurl is a shell command line that streams a chat completion from the swarm.
func demoCurl(api, model string, maxTokens int) string {
	type message struct {
		Role    string `json:"role"`
		Content string `json:"content"`
	}
	body, _ := json.Marshal(struct {
		Model     string    `json:"model"`
		Stream    bool      `json:"stream"`
		MaxTokens int       `json:"max_tokens,omitempty"`
		Messages  []message `json:"messages"`
	}{model, true, maxTokens, []message{{"user", "Hello! Who are you?"}}})
	return fmt.Sprintf("curl -N http://%s/v1/chat/completions -H 'Content-Type: application/json' -d %s", api, shellQuote(string(body)))
}

// shellQuote single-quotes s for a POSIX shell.
func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// waitDemo waits for Ctrl-C (or the end of ctx), saying so when a node dies meanwhile.
func waitDemo(ctx context.Context, s *testkit.Swarm, sig <-chan os.Signal, log io.Writer) error {
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	reported := make([]bool, len(s.Nodes))
	for {
		select {
		case <-sig:
			fmt.Fprintln(log)
			return nil
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
		for i, n := range s.Nodes {
			if !reported[i] && n.Exited() {
				reported[i] = true
				fmt.Fprintf(log, "node %d exited on its own:%s\n", i+1, n.Tail(15))
			}
		}
	}
}

// stopDemoSwarm stops every node gracefully; a further Ctrl-C kills them at once.
func stopDemoSwarm(s *testkit.Swarm, sig <-chan os.Signal, log io.Writer) {
	if len(s.Nodes) == 0 {
		return
	}
	fmt.Fprintf(log, "stopping %d nodes (Ctrl-C again to kill them) ...", len(s.Nodes))
	t0 := time.Now()
	done := make(chan struct{})
	go func() {
		s.Close()
		close(done)
	}()
	select {
	case <-done:
	case <-sig:
		for _, n := range s.Nodes {
			n.Kill()
		}
		<-done
	}
	fmt.Fprintf(log, " stopped in %.1fs\n", time.Since(t0).Seconds())
}

// lockDemoDir keeps two demos from sharing node directories (and so identities and ports).
func lockDemoDir(dir string) (unlock func(), err error) {
	path := filepath.Join(dir, "demo.lock")
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("demo lock: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("another strata demo is running with data dir %s (stop it, or pass another --data-dir)", dir)
		}
		return nil, fmt.Errorf("demo lock %s: %w", path, err)
	}
	return func() { f.Close() }, nil
}
