package cli

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/strata-llm/strata/internal/testkit"
	"github.com/strata-llm/strata/shard"
)

// TestDemoMemorySplitsTheModel: the memory each demo node offers makes N nodes share the
// tiny model's 6 layers, and readiness waits for as many as the split needs.
func TestDemoMemorySplitsTheModel(t *testing.T) {
	info, err := shard.ReadModelInfo(testkit.Model(t, testkit.SynthOptions{Preset: "tiny", Seed: 1}))
	if err != nil {
		t.Fatal(err)
	}
	cost := shard.ModelShape{LayerBytes: info.LayerBytes[0], KVBytesPerToken: info.KVBytesPerToken(2), Context: demoContext * demoSessions}.LayerCost()
	for _, tc := range []struct{ nodes, perNode, serving int }{
		{1, 6, 1}, {2, 3, 2}, {3, 2, 3}, {4, 2, 3}, {6, 1, 6}, {16, 1, 6},
	} {
		mem, serving := demoMemory(info, tc.nodes)
		if serving != tc.serving {
			t.Errorf("%d nodes: readiness waits for %d serving, want %d", tc.nodes, serving, tc.serving)
		}
		if tc.nodes == 1 {
			if mem < info.TotalBytes {
				t.Errorf("1 node: offers %d bytes, less than the whole model's %d", mem, info.TotalBytes)
			}
			continue
		}
		// Room for perNode layers plus the embeddings (or the head), not for one layer more.
		if need := int64(tc.perNode)*cost + max(info.EmbedBytes, info.HeadBytes); mem < need {
			t.Errorf("%d nodes: offers %d bytes, %d layers and the embeddings need %d", tc.nodes, mem, tc.perNode, need)
		}
		if mem >= int64(tc.perNode+1)*cost {
			t.Errorf("%d nodes: offers %d bytes, enough for %d layers: the nodes would not split", tc.nodes, mem, tc.perNode+1)
		}
	}
}

// TestDemoBadFlags: bad input is refused before anything is synthesized or started.
func TestDemoBadFlags(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--nodes", "0"}, "--nodes 0"},
		{[]string{"--nodes", "99"}, "--nodes 99"},
		{[]string{"--model", "x.gguf", "--seed", "3"}, "do not apply with --model"},
		{[]string{"--timeout", "0s"}, "--timeout"},
		{[]string{"--api", "nonsense"}, "--api"},
		{[]string{"--preset", "huge"}, "unknown preset"},
		{[]string{"--model", filepath.Join(dir, "missing.gguf")}, "missing.gguf"},
	} {
		root := NewRootCommand()
		root.SetArgs(append([]string{"demo", "--data-dir", dir}, tc.args...))
		root.SetOut(io.Discard)
		root.SetErr(io.Discard)
		err := root.ExecuteContext(context.Background())
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("demo %v: error %v, want one mentioning %q", tc.args, err, tc.want)
		}
	}
	if m, _ := filepath.Glob(filepath.Join(dir, "*.gguf")); len(m) > 0 {
		t.Errorf("bad flags synthesized %v", m)
	}
}

var curlLine = regexp.MustCompile(`curl -N (http://[^ ]+)/v1/chat/completions`)

// TestDemoServesAndStopsCleanly runs the real binary's demo twice on one data dir (the second
// run reuses the model and the nodes' identities and must not read the first run's address
// files). Each run waits for the curl line and runs a chat completion against the printed
// address (and the curl line itself when curl is installed); the first runs with --no-chat,
// the second chats through stdin and must print an answer. Then SIGINT: the demo must exit
// and no node process it started may be left.
func TestDemoServesAndStopsCleanly(t *testing.T) {
	t.Parallel() // its own processes, ports and temp dirs: it shares nothing with other tests
	if testing.Short() {
		t.Skip("starts three node processes")
	}
	bin := testkit.BuildStrata(t)
	dir := t.TempDir()
	t.Cleanup(func() {
		// A failing run must not leave its nodes behind on the machine.
		for _, pid := range processPIDsMentioning(dir) {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	})
	for run := 1; run <= 2; run++ {
		t.Run(fmt.Sprintf("run%d", run), func(t *testing.T) { demoOnce(t, bin, dir, run, run == 2) })
	}
}

func demoOnce(t *testing.T, bin, dir string, run int, chat bool) {
	start := time.Now()
	args := []string{"demo", "--data-dir", dir, "--api", "127.0.0.1:0", "--max-tokens", "16"}
	if !chat {
		args = append(args, "--no-chat")
	}
	cmd := exec.Command(bin, args...)
	var stderr syncBuffer
	cmd.Stderr = &stderr
	stdin, err := cmd.StdinPipe() // stays open: the chat must wait for more, not see EOF
	if err != nil {
		t.Fatal(err)
	}
	defer stdin.Close()
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	var outText syncBuffer
	lines := make(chan string, 64)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	defer func() {
		if cmd.ProcessState == nil {
			_ = cmd.Process.Kill()
		}
		if t.Failed() {
			t.Logf("demo stdout:\n%s\ndemo stderr:\n%s", outText.String(), stderr.String())
		}
	}()

	var base, curl string
	deadline := time.After(3 * time.Minute)
	for base == "" {
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatalf("demo ended its output before the curl line: %v", cmd.Wait())
			}
			outText.Write([]byte(l + "\n"))
			if m := curlLine.FindStringSubmatch(l); m != nil {
				base, curl = m[1], strings.TrimSpace(l)
			}
		case <-deadline:
			t.Fatal("no curl line in 3 minutes")
		}
	}
	t.Logf("run %d: curl line after %.1fs", run, time.Since(start).Seconds())
	if chat {
		if _, err := io.WriteString(stdin, "hello\n"); err != nil {
			t.Fatal(err)
		}
		answer := ""
		for answer == "" {
			select {
			case l, ok := <-lines:
				if !ok {
					t.Fatalf("demo ended its output before answering the chat: %v", cmd.Wait())
				}
				outText.Write([]byte(l + "\n"))
				answer = strings.TrimSpace(l)
			case <-time.After(time.Minute):
				t.Fatal("no chat answer in a minute")
			}
		}
		t.Logf("chat answer through the demo: %q", answer)
	}
	drained := make(chan struct{})
	go func() {
		defer close(drained)
		for l := range lines {
			outText.Write([]byte(l + "\n")) // keep draining so the demo never blocks on stdout
		}
	}()

	children := childPIDs(cmd.Process.Pid)
	if len(children) != 3 {
		t.Errorf("demo has %d child processes %v, want 3 nodes", len(children), children)
	}
	if run == 2 && !strings.Contains(stderr.String(), "synthesized earlier") {
		t.Errorf("second run did not reuse the synthesized model")
	}

	// A chat completion against the printed address; its model is the one the curl line names.
	model := regexp.MustCompile(`"model":"([^"]+)"`).FindStringSubmatch(curl)
	if model == nil {
		t.Fatalf("curl line names no model: %s", curl)
	}
	body, _ := json.Marshal(map[string]any{"model": model[1], "max_tokens": 16, "temperature": 0,
		"messages": []map[string]string{{"role": "user", "content": "hello"}}})
	resp, err := http.Post(base+"/v1/chat/completions", "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	var cc struct {
		Choices []struct {
			Message struct{ Content string } `json:"message"`
		} `json:"choices"`
		Usage struct {
			CompletionTokens int `json:"completion_tokens"`
		} `json:"usage"`
	}
	raw, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err := json.Unmarshal(raw, &cc); err != nil || resp.StatusCode != http.StatusOK || len(cc.Choices) != 1 || cc.Usage.CompletionTokens == 0 {
		t.Fatalf("chat completion: %s %s (%v)", resp.Status, raw, err)
	}
	t.Logf("chat completion through the demo swarm: %d tokens: %q", cc.Usage.CompletionTokens, cc.Choices[0].Message.Content)

	// The printed curl line works as printed.
	if _, err := exec.LookPath("curl"); err == nil {
		out, err := exec.Command("sh", "-c", curl+" -sS --max-time 60").CombinedOutput()
		if err != nil || !strings.Contains(string(out), "data: ") || !strings.Contains(string(out), "[DONE]") {
			t.Errorf("the printed curl line: %v\n%s", err, out)
		}
	}

	if err := cmd.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	go func() { exited <- cmd.Wait() }()
	select {
	case err := <-exited:
		<-drained
		if err != nil {
			t.Errorf("demo exited with %v after SIGINT", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("demo still running 30 s after SIGINT")
	}
	for _, pid := range children {
		if alive(pid) {
			t.Errorf("node process %d outlived the demo", pid)
		}
	}
	if left := processesMentioning(dir); len(left) > 0 {
		t.Errorf("processes still using the demo's data dir: %v", left)
	}
}

// childPIDs lists the live children of pid, from /proc.
func childPIDs(pid int) []int {
	var kids []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// Fields after the command name, which is in parentheses and may hold spaces.
		rest := string(b[bytes.LastIndexByte(b, ')')+1:])
		f := strings.Fields(rest)
		if len(f) > 1 && f[1] == strconv.Itoa(pid) && f[0] != "Z" {
			kids = append(kids, p)
		}
	}
	return kids
}

// alive reports whether pid is a running (not zombie) process.
func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
	return len(f) > 0 && f[0] != "Z"
}

// processesMentioning lists running processes whose command line contains s.
func processesMentioning(s string) []string {
	var found []string
	for _, p := range processPIDsMentioning(s) {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", p))
		found = append(found, fmt.Sprintf("%d: %s", p, bytes.ReplaceAll(b, []byte{0}, []byte{' '})))
	}
	return found
}

func processPIDsMentioning(s string) []int {
	var found []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		p, err := strconv.Atoi(e.Name())
		if err != nil || p == os.Getpid() || !alive(p) {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && bytes.Contains(b, []byte(s)) {
			found = append(found, p)
		}
	}
	return found
}
