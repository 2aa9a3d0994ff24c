package cli

import (
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/strata-llm/strata/node"
	"github.com/strata-llm/strata/p2p"
	"github.com/strata-llm/strata/quant"
	"github.com/strata-llm/strata/shard"
)

func newNodeCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "node", Short: "Run a swarm node"}
	cmd.AddCommand(newNodeStartCommand())
	return cmd
}

func newNodeStartCommand() *cobra.Command {
	var (
		cfg          node.Config
		join, maxMem string
		codec        string
		injectBW     string
		fetchBW      string
		gpuLayers    string
	)
	cmd := &cobra.Command{
		Use:   "start --model MODEL",
		Short: "Join (or start) a swarm, take a share of the model's layers, and serve the API",
		Long: `Starts a node: it finds peers (mDNS on the LAN, --join for bootstrap peers), agrees with them
on which contiguous layers each serves, loads only its slice, and serves the OpenAI-compatible
API on --api. Its full multiaddr is logged and written to DATA_DIR/multiaddr for others to --join.
--model is a GGUF path, an Ollama model name found in Ollama's local store, hf://OWNER/REPO[@REV]/FILE.gguf
from the Hugging Face hub, or an https:// URL (append #sha256=HEX to check it); downloads land in
DATA_DIR/models. A --model this machine lacks (the model ID a swarm serves), --model swarm, or
no --model on a node that joins a swarm and has no Ollama model, takes the swarm's model and
fetches only this node's slices from its peers, checked against the model's manifest. Clients name the model by its ID: the Ollama name, or the GGUF
file's name without .gguf (GET /v1/models lists it).
Several nodes on one machine need their own --listen, --api and --data-dir; by default they
split its memory between them and, without --threads, take turns on its cores through a lock
file of the machine's (--max-memory and --cpu-lock set either by hand).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var err error
			if cfg.MaxMemory, err = node.ParseSize(maxMem); err != nil {
				return fmt.Errorf("--max-memory: %w", err)
			}
			if cfg.GPULayers, err = parseGPULayers(gpuLayers); err != nil {
				return err
			}
			if cfg.Codec, err = quant.ParseCodec(codec); err != nil {
				return err
			}
			if cfg.InjectBandwidth, err = p2p.ParseBandwidth(injectBW); err != nil {
				return fmt.Errorf("--inject-bandwidth: %w", err)
			}
			if bw, err := p2p.ParseBandwidth(fetchBW); err != nil {
				return fmt.Errorf("--fetch-bandwidth: %w", err)
			} else {
				cfg.FetchBandwidth = int64(bw)
			}
			for _, j := range strings.Split(join, ",") {
				if j = strings.TrimSpace(j); j != "" {
					cfg.Join = append(cfg.Join, j)
				}
			}
			cfg.Logger = slog.Default()
			if !cmd.Flags().Changed("verbose") {
				setLogger(cmd.ErrOrStderr(), slog.LevelInfo) // a daemon says what it does
				cfg.Logger = slog.Default()
			}
			if isTerminal(os.Stderr) {
				cfg.Progress = func(label string) func(float32) {
					bar := newProgressBar(os.Stderr, label)
					return func(f float32) {
						bar.Set(f)
						if f >= 1 {
							bar.Done()
						}
					}
				}
			}
			return node.Run(cmd.Context(), cfg)
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfg.Model, "model", "", "GGUF file, Ollama model name (e.g. llama3.3:70b), hf://OWNER/REPO/FILE.gguf or https:// URL (default: the only model in Ollama's store)")
	f.StringVar(&cfg.DataDir, "data-dir", "", "identity, slice cache and address files (default ~/.strata)")
	f.StringSliceVar(&cfg.Listen, "listen", nil, "libp2p listen multiaddrs (default /ip4/0.0.0.0/tcp/4001 and, without --swarm-key, /ip4/0.0.0.0/udp/4001/quic-v1)")
	f.StringVar(&cfg.API, "api", "127.0.0.1:8080", "host:port of the OpenAI-compatible API")
	f.StringVar(&join, "join", "", "comma-separated multiaddrs of peers to join (…/p2p/ID)")
	f.StringVar(&cfg.Gossip, "gossip", "", "host:port for membership gossip (default: the libp2p port + 1)")
	f.StringVar(&cfg.SwarmKey, "swarm-key", "", "pre-shared key file: a private swarm (TCP only)")
	f.StringVar(&maxMem, "max-memory", "", "RAM to offer for weights and KV cache, e.g. 12GiB (default: 80% of the RAM free at start, split between the nodes of one machine; the GPUs' memory is offered beside it)")
	f.BoolVar(&cfg.SlicesOnly, "slices-only", false, "with an hf:// or URL --model: read only this node's slices with HTTP Range requests, not the whole file")
	f.StringVar(&fetchBW, "fetch-bandwidth", "", "cap on the weights this node fetches from and serves to peers, e.g. 200Mbit (default: none)")
	f.BoolVar(&cfg.MDNS, "mdns", true, "find peers on the local network")
	f.BoolVar(&cfg.ClientOnly, "client-only", false, "serve the API without holding layers")
	f.StringVar(&cfg.APIKey, "api-key", os.Getenv("STRATA_API_KEY"), "bearer token the API requires")
	f.BoolVar(&cfg.ProtectMonitoring, "protect-monitoring", false, "put /health, /metrics and the dashboard behind the API key too")
	f.IntVar(&cfg.Threads, "threads", 0, "ggml CPU threads (default: all cores)")
	f.StringVar(&gpuLayers, "gpu-layers", "auto", "at most this many of the node's layers on its GPUs; auto: as many as their memory holds; 0: CPU only")
	f.StringVar(&cfg.Devices, "devices", "", "GPUs to compute on, e.g. Vulkan0,CUDA1, CUDA, or 0,1 (default: every GPU ggml sees; cpu: none)")
	f.StringVar(&cfg.CPULock, "cpu-lock", "", "nodes sharing one machine's cores name the same file: one computes at a time, with all its threads (default: the machine's own, for nodes without --threads)")
	f.IntVar(&cfg.MaxSessions, "max-sessions", 8, "sessions a stage holds at once")
	f.IntVar(&cfg.MaxContext, "context", 2048, "tokens per session")
	f.BoolVar(&cfg.Deterministic, "deterministic", false, "run each step alone, never batched, in a KV cache of its session's own: greedy text equals `strata run` under any load (with --codec f32), at a cost in throughput")
	f.StringVar(&codec, "codec", "f16", "activation codec on the wire: f32, f16, q8")
	f.DurationVar(&cfg.RecoverFor, "recover-for", 30*time.Second, "how long a generation whose stage died waits for a new route before it fails")
	f.IntVar(&cfg.Queue, "queue", 64, "requests this entry holds while every route is full (429 beyond; -1: none)")
	f.DurationVar(&cfg.QueueTimeout, "queue-timeout", 60*time.Second, "how long a queued request waits for a session before it gets 429")
	// Benchmarks only (strata bench, scripts/netns-bench.sh): a slower network on one machine.
	f.DurationVar(&cfg.InjectLatency, "inject-latency", 0, "add this one-way latency to every frame sent to a peer")
	f.StringVar(&injectBW, "inject-bandwidth", "", "emulate a link of this bandwidth to each peer, e.g. 1Gbit")
	_ = f.MarkHidden("inject-latency")
	_ = f.MarkHidden("inject-bandwidth")
	// Tests and experiments only: how the node re-measures its speed (node.SpeedOptions).
	f.IntVar(&cfg.Speed.Window, "speed-window", 0, "solo decode steps per speed measurement (default 32)")
	f.DurationVar(&cfg.Speed.LastingFor, "speed-lasting-for", 0, "how long a speed change must last before it is announced (default 30s; negative: no minimum)")
	f.DurationVar(&cfg.Speed.Rebench, "speed-rebench", 0, "how often an idle node runs its self-benchmark again (default 1m; negative: never)")
	for _, name := range []string{"speed-window", "speed-lasting-for", "speed-rebench"} {
		_ = f.MarkHidden(name)
	}
	return cmd
}

func newStatusCommand() *cobra.Command {
	var addr string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "status [--api HOST:PORT]",
		Short: "Show a node's view of the swarm: readiness, peers and their layers",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if addr == "" {
				addr = defaultAPI()
			}
			base, err := apiBaseURL(addr)
			if err != nil {
				return err
			}
			client := &http.Client{Timeout: 5 * time.Second}
			req, err := http.NewRequest(http.MethodGet, strings.TrimSuffix(base, "v1/")+"health", nil)
			if err != nil {
				return err
			}
			if key := os.Getenv("STRATA_API_KEY"); key != "" { // a node with --protect-monitoring
				req.Header.Set("Authorization", "Bearer "+key)
			}
			resp, err := client.Do(req)
			if err != nil {
				return explainAPIError(fmt.Errorf("no node answers at %s: %w", addr, err), addr)
			}
			defer resp.Body.Close()
			body, err := io.ReadAll(resp.Body)
			if err != nil {
				return err
			}
			if asJSON {
				_, err = cmd.OutOrStdout().Write(body)
				return err
			}
			var h node.Health
			if err := json.Unmarshal(body, &h); err != nil {
				return fmt.Errorf("bad /health answer: %w", err)
			}
			printStatus(cmd.OutOrStdout(), h)
			return nil
		},
	}
	cmd.Flags().StringVar(&addr, "api", "", apiDefaultHelp)
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the raw JSON")
	return cmd
}

func printStatus(w io.Writer, h node.Health) {
	ready := "READY"
	if !h.Ready {
		ready = "NOT READY: " + h.Missing
	}
	if h.Ready && h.Busy {
		ready += ", BUSY"
	}
	fmt.Fprintf(w, "swarm  %s\nmodel  %s (%d layers, sha256 %.12s)\nnode   %s (%s)\n", ready, h.Model, h.Layers, h.ModelSHA256, h.PeerID, h.State)
	if p := h.Placement; p != nil {
		fmt.Fprintf(w, "layers %s\n", p.Summary)
	}
	if sp := h.Speed; sp != nil {
		fmt.Fprintf(w, "speed  %s\n", speedLine(*sp))
	}
	if q := h.Queue; q != nil && q.Waiting > 0 {
		fmt.Fprintf(w, "queue  %d waiting of %d (oldest %d ms, mean wait %.0f ms)\n", q.Waiting, q.Depth, q.OldestWaitMs, q.MeanWaitMs)
	}
	fmt.Fprintln(w)
	for _, f := range h.Fetches {
		state := "fetching"
		switch {
		case f.Error != "":
			state = "failed: " + f.Error
		case f.Done && f.Verified:
			state = "done, verified"
		case f.Done:
			state = "done, not yet checked against a manifest"
		}
		fmt.Fprintf(w, "fetch  layers %s from %s (%d sources): %s of %s, %s/s, %s\n", f.Range, f.From, f.Sources,
			humanBytes(f.TensorBytes), humanBytes(f.SliceBytes), humanBytes(int64(f.BytesPerSec)), state)
		if len(f.Peers) > 0 {
			var srcs []string
			for _, p := range slices.Sorted(maps.Keys(f.Peers)) {
				srcs = append(srcs, shortPeer(p)+" "+humanBytes(f.Peers[p]))
			}
			fmt.Fprintf(w, "       received from %s\n", strings.Join(srcs, ", "))
		}
		if len(f.Dropped) > 0 {
			var d []string
			for _, p := range f.Dropped {
				d = append(d, shortPeer(p))
			}
			fmt.Fprintf(w, "       dropped (bytes failed the manifest's check): %s\n", strings.Join(d, ", "))
		}
	}
	if len(h.Fetches) > 0 {
		fmt.Fprintln(w)
	}
	// The GPU column appears only when some node has a GPU: on CPU-only swarms it would be
	// a column of zeros.
	gpu := slices.ContainsFunc(h.Peers, func(p node.PeerHealth) bool { return p.FreeGPU > 0 })
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	header := "PEER\tSTATE\tLAYERS\tCHAIN\tMEMORY\t"
	if gpu {
		header += "FREE GPU\t"
	}
	fmt.Fprintln(tw, header+"MS/LAYER\tSESSIONS\tAPI")
	for _, p := range h.Peers {
		id := shortPeer(p.PeerID)
		if p.Self {
			id += " *"
		}
		layers := "-"
		if p.Range.End > p.Range.Start {
			layers = p.Range.String()
		}
		if p.Next != nil {
			// Moving to a new plan: the old range is served until the new ones cover the model.
			layers += " retiring, next " + p.Next.String()
		}
		chain := "-"
		if p.Chain >= 0 {
			chain = strconv.Itoa(p.Chain)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t", id, p.State, layers, chain, humanBytes(p.Memory))
		if gpu {
			g := "-"
			if p.FreeGPU > 0 {
				g = humanBytes(int64(p.FreeGPU))
			}
			fmt.Fprintf(tw, "%s\t", g)
		}
		fmt.Fprintf(tw, "%.2f\t%d\t%s\n", p.MsPerLayer, p.Sessions, p.API)
	}
	tw.Flush()
	printRangeMemory(w, h.RangeMemory)
}

// printRangeMemory shows what this node's layers cost, per layer: runs of layers that cost
// the same (most of a dense model) share one row.
func printRangeMemory(w io.Writer, m *node.RangeMemory) {
	if m == nil {
		return
	}
	fmt.Fprintf(w, "\nlayers %s on this node: weights %s, KV cache %s (%d sessions x %d tokens, %d bytes per value)\n",
		m.Range, humanBytes(m.WeightBytes), humanBytes(m.KVBytes), m.Sessions, m.Context, m.KVElemBytes)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "LAYERS\tWEIGHTS EACH\tKV EACH\tATTENTION")
	if m.EmbedBytes > 0 {
		fmt.Fprintf(tw, "embeddings\t%s\t-\t-\n", humanBytes(m.EmbedBytes))
	}
	for i := 0; i < len(m.PerLayer); {
		l := m.PerLayer[i]
		j := i + 1
		for j < len(m.PerLayer) && m.PerLayer[j].WeightBytes == l.WeightBytes && m.PerLayer[j].KVBytes == l.KVBytes && m.PerLayer[j].Window == l.Window {
			j++
		}
		attn := "global"
		if l.Window > 0 {
			attn = fmt.Sprintf("window %d", l.Window)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", shard.Range{Start: l.Layer, End: m.PerLayer[j-1].Layer + 1}, humanBytes(l.WeightBytes), humanBytes(l.KVBytes), attn)
		i = j
	}
	if m.HeadBytes > 0 {
		fmt.Fprintf(tw, "head\t%s\t-\t-\n", humanBytes(m.HeadBytes))
	}
	tw.Flush()
}

// shortPeer is the one short form of a peer ID, here and on the dashboard: its last 8
// characters (the first ones are the same for every Ed25519 key), as p2p's logs show it.
func shortPeer(id string) string {
	if len(id) > 12 {
		return "…" + id[len(id)-8:]
	}
	return id
}

// parseGPULayers reads --gpu-layers: "auto" (node.Config's 0), or a count where 0 means none.
func parseGPULayers(s string) (int, error) {
	if s == "" || strings.EqualFold(s, "auto") {
		return 0, nil
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("--gpu-layers %q: want auto or a count of layers (0: CPU only)", s)
	}
	if n == 0 {
		return -1, nil
	}
	return n, nil
}

// speedLine is a node's speed for `strata status`: what it announces, where that came from,
// and what it measured at start and measures now.
func speedLine(sp node.SpeedHealth) string {
	ms := func(v float64) string {
		if v <= 0 {
			return "-"
		}
		return fmt.Sprintf("%.3g ms/layer", v)
	}
	s := "announces " + ms(float64(sp.AnnouncedMs))
	if sp.Source != "" {
		s += " (" + sp.Source + ")"
	}
	s += ", at start " + ms(sp.StartMs) + ", now " + ms(sp.CurrentMs)
	if sp.Steps > 0 || sp.Batched > 0 {
		s += fmt.Sprintf(" over %d decode steps alone (%d batched)", sp.Steps, sp.Batched)
	}
	if sp.Skipped > 0 {
		s += fmt.Sprintf(", %d left out while the swarm moved", sp.Skipped)
	}
	if sp.Drifting > 0 {
		s += fmt.Sprintf("; %d measurements beyond the band", sp.Drifting)
	}
	return s
}
