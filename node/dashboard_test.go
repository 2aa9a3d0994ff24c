package node

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/strata-llm/strata/internal/testkit"
)

func TestPeerAPIAddr(t *testing.T) {
	for _, c := range []struct {
		api, gossip, want, err string
	}{
		{"127.0.0.1:8080", "127.0.0.1:4002", "127.0.0.1:8080", ""},
		{"10.0.0.5:8080", "10.0.0.5:4002", "10.0.0.5:8080", ""},
		{"0.0.0.0:8080", "10.0.0.5:4002", "10.0.0.5:8080", ""},
		{"[::]:8080", "[fd00::5]:4002", "[fd00::5]:8080", ""},
		{"0.0.0.0:8080", "0.0.0.0:4002", "", "says nothing better"},
		{"127.0.0.1:8080", "10.0.0.5:4002", "", "on its own machine only"},
		{"", "10.0.0.5:4002", "", "no API address"},
		{"node.example:8080", "10.0.0.5:4002", "", "not an IP address"},
		{"garbage", "10.0.0.5:4002", "", "API address"},
	} {
		got, err := peerAPIAddr(PeerHealth{API: c.api, Gossip: c.gossip})
		switch {
		case c.err == "" && (err != nil || got != c.want):
			t.Errorf("api %q gossip %q: got %q, %v; want %q", c.api, c.gossip, got, err, c.want)
		case c.err != "" && (err == nil || !strings.Contains(err.Error(), c.err)):
			t.Errorf("api %q gossip %q: got %q, %v; want an error saying %q", c.api, c.gossip, got, err, c.err)
		}
	}
}

// TestDashboardStatic: the page, its two files and its icon are embedded and served with a policy
// that keeps the page to its own node.
func TestDashboardStatic(t *testing.T) {
	h := newDashboard(nil).static()
	for path, ctype := range map[string]string{"/": "text/html", "/app.js": "javascript", "/style.css": "text/css", "/favicon.svg": "image/svg+xml"} {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
		if rec.Code != http.StatusOK || !strings.Contains(rec.Header().Get("Content-Type"), ctype) || rec.Body.Len() == 0 {
			t.Errorf("GET %s: %d %q, %d bytes", path, rec.Code, rec.Header().Get("Content-Type"), rec.Body.Len())
		}
		if csp := rec.Header().Get("Content-Security-Policy"); !strings.Contains(csp, "default-src 'self'") {
			t.Errorf("GET %s: Content-Security-Policy %q", path, csp)
		}
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/nothing-here", nil))
	if rec.Code != http.StatusNotFound {
		t.Errorf("GET /nothing-here: %d", rec.Code)
	}
	// Nothing may come from outside the node: the swarm may have no internet.
	for _, f := range []string{"web/index.html", "web/app.js", "web/style.css"} {
		b, err := webFiles.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, bad := range []string{"http://", "https://", "//cdn", "@import", "fonts.googleapis"} {
			if strings.Contains(string(b), bad) {
				t.Errorf("%s refers to %q: the dashboard must load nothing from outside the node", f, bad)
			}
		}
	}
}

// findChromium finds a Chromium or Chrome binary; STRATA_CHROMIUM overrides the search.
func findChromium() string {
	if p := os.Getenv("STRATA_CHROMIUM"); p != "" {
		return p
	}
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "headless_shell"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	return ""
}

// TestDashboardInChromium opens the dashboard of a three-node swarm in headless Chromium:
// the layer map must show every node, and a chat message typed into the page must get a
// streamed answer, the same one the API gives for the same request.
func TestDashboardInChromium(t *testing.T) {
	t.Parallel() // its own processes, ports and temp dirs: it shares nothing with other tests
	bin := findChromium()
	if bin == "" {
		t.Skip("no chromium binary found (Debian: apt-get install chromium, or scripts/install-deps.sh; or set STRATA_CHROMIUM): skipping the dashboard browser test")
	}
	if testing.Short() {
		t.Skip("-short: skipping the browser test")
	}
	model := testkit.Model(t, testkit.SynthOptions{Preset: "tiny", Seed: 1, Type: "f32"})
	s := testkit.NewSwarm(t, testkit.SwarmOptions{Nodes: 3, Model: model, Args: []string{"--max-memory", "5MiB"}})
	s.MustReady(t, 3, 30*time.Second)
	entry := s.Nodes[0]
	var h Health
	if err := dashGetJSON("http://"+entry.API+"/health", &h); err != nil {
		t.Fatal(err)
	}
	var want []string
	for _, p := range h.Peers {
		want = append(want, p.PeerID)
	}
	slices.Sort(want)

	// The network is closed here: nothing in the browser may try to reach out.
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(bin),
		chromedp.Headless,
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		chromedp.NoFirstRun,
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.UserDataDir(t.TempDir()),
		chromedp.WindowSize(1280, 1000),
	)
	allocCtx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	defer cancelAlloc()
	bctx, cancelBrowser := chromedp.NewContext(allocCtx)
	defer cancelBrowser()
	started := time.Now()
	if err := chromedp.Do(bctx); err != nil { // starts the browser, bound to bctx (no timeout)
		t.Fatalf("start %s: %v", bin, err)
	}
	t.Logf("chromium started in %s", time.Since(started).Round(time.Millisecond))
	ctx, cancel := context.WithTimeout(bctx, 45*time.Second)
	defer cancel()

	poll := func(what, expr string) string {
		t.Helper()
		v, err := chromedp.Run(ctx, chromedp.Poll[string](expr, chromedp.WithPollingInterval(100*time.Millisecond), chromedp.WithPollingTimeout(20*time.Second)))
		if err != nil {
			t.Fatalf("waiting for %s: %v", what, err)
		}
		return v
	}
	eval := func(expr string) string {
		t.Helper()
		v, err := chromedp.Run(ctx, chromedp.Evaluate[string](expr))
		if err != nil {
			t.Fatalf("evaluate %s: %v", expr, err)
		}
		return v
	}

	if err := chromedp.Do(ctx, chromedp.Navigate("http://"+entry.API+"/")); err != nil {
		t.Fatal(err)
	}
	// The layer map: one segment per node, together covering every layer (no gap segment).
	got := poll("the layer map to show three nodes", `(() => {
		const ids = [...new Set([...document.querySelectorAll('#layermap .seg[data-peer]')].map(e => e.dataset.peer))];
		return ids.length === 3 ? ids.sort().join(',') : '';
	})()`)
	if got != strings.Join(want, ",") {
		t.Fatalf("layer map shows nodes %s, want %s", got, strings.Join(want, ","))
	}
	if gaps := eval(`String(document.querySelectorAll('#layermap .seg.gap').length)`); gaps != "0" {
		t.Errorf("layer map shows %s gaps in a covered model", gaps)
	}
	if rows := eval(`String(document.querySelectorAll('#nodes tbody tr').length)`); rows != "3" {
		t.Errorf("node table has %s rows, want 3", rows)
	}
	if badge := eval(`document.getElementById('ready').textContent`); badge != "ready" {
		t.Errorf("readiness badge says %q", badge)
	}

	// Chat: type, press send, wait for the streamed answer to finish.
	const maxTokens, prompt = 32, "Hello, swarm!"
	if err := chromedp.Do(ctx,
		chromedp.SetValue(chromedp.ID("max-tokens"), "32"),
		chromedp.SetValue(chromedp.ID("temperature"), "0"),
		chromedp.SendKeys(chromedp.ID("chat-input"), prompt),
		chromedp.Click(chromedp.ID("send")),
	); err != nil {
		t.Fatal(err)
	}
	state := poll("the answer to finish", `(() => {
		const m = document.querySelector('#messages .msg.assistant');
		return m && m.dataset.state !== 'streaming' ? m.dataset.state : '';
	})()`)
	answer := eval(`document.querySelector('#messages .msg.assistant .text').textContent`)
	chunks := eval(`document.querySelector('#messages .msg.assistant').dataset.chunks`)
	stats := eval(`(document.querySelector('#messages .msg.assistant .stats') || {}).textContent || ''`)
	if state != "done" || answer == "" {
		t.Fatalf("answer %s: %q", state, answer)
	}
	if chunks == "0" || chunks == "1" {
		t.Errorf("the answer came in %s chunk(s): not streamed", chunks)
	}
	// Greedy decoding of f32 weights: the API must give the page's answer to the same request.
	direct, err := dashChatOnce(entry.API, h.Model, prompt, maxTokens)
	if err != nil {
		t.Fatal(err)
	}
	if direct != answer {
		t.Errorf("the page shows %q, the API answers %q", answer, direct)
	}
	// The totals pick the tokens up on the next poll.
	poll("the token total", `(() => { const v = document.getElementById('tokens').textContent; return v !== '–' && v !== '0' ? v : ''; })()`)
	t.Logf("answer in %s chunks (%s): %q", chunks, stats, answer)

	png, err := chromedp.Run(ctx, chromedp.FullScreenshot(100))
	if err != nil {
		t.Fatal(err)
	}
	dir := os.Getenv("STRATA_ARTIFACTS")
	if dir == "" {
		dir = t.TempDir()
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "dashboard.png")
	if err := os.WriteFile(path, png, 0o644); err != nil {
		t.Fatal(err)
	}
	// A copy where someone looking at a test run can find it without the temp dir.
	shared := filepath.Join(os.TempDir(), "dashboard.png")
	if err := os.WriteFile(shared, png, 0o644); err != nil {
		t.Logf("copy screenshot to %s: %v", shared, err)
	}
	t.Logf("screenshot: %s (%d bytes), copy at %s", path, len(png), shared)
}

func dashGetJSON(url string, v any) error {
	resp, err := http.Get(url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return &dashHTTPError{url, resp.Status}
	}
	return json.NewDecoder(resp.Body).Decode(v)
}

type dashHTTPError struct{ url, status string }

func (e *dashHTTPError) Error() string { return "GET " + e.url + ": " + e.status }

// dashChatOnce asks for one greedy completion without streaming.
func dashChatOnce(api, model, user string, maxTokens int) (string, error) {
	body, _ := json.Marshal(map[string]any{
		"model": model, "messages": []map[string]string{{"role": "user", "content": user}},
		"max_tokens": maxTokens, "temperature": 0,
	})
	resp, err := http.Post("http://"+api+"/v1/chat/completions", "application/json", strings.NewReader(string(body)))
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	var out struct {
		Choices []struct {
			Message struct {
				Content string `json:"content"`
			} `json:"message"`
		} `json:"choices"`
	}
	if resp.StatusCode != http.StatusOK {
		return "", &dashHTTPError{api + "/v1/chat/completions", resp.Status}
	}
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		return "", err
	}
	if len(out.Choices) == 0 {
		return "", nil
	}
	return out.Choices[0].Message.Content, nil
}

// DashboardPoll opens a node's dashboard in headless Chromium and polls the JavaScript
// expression expr until it yields a non-empty string, which it returns; ok is false (and
// the check is skipped) without a Chromium binary or with -short. Exported for the swarm
// tests of package node_test, which check what their swarm's page shows.
func DashboardPoll(t *testing.T, api, what, expr string) (v string, ok bool) {
	t.Helper()
	bin := findChromium()
	if bin == "" || testing.Short() {
		t.Logf("no chromium (or -short): not checking that the dashboard shows %s", what)
		return "", false
	}
	opts := append(chromedp.DefaultExecAllocatorOptions[:], chromedp.ExecPath(bin), chromedp.Headless, chromedp.NoSandbox,
		chromedp.DisableGPU, chromedp.NoFirstRun, chromedp.UserDataDir(t.TempDir()),
		chromedp.Flag("disable-background-networking", true), chromedp.Flag("disable-component-update", true))
	allocCtx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	defer cancelAlloc()
	bctx, cancelBrowser := chromedp.NewContext(allocCtx)
	defer cancelBrowser()
	ctx, cancel := context.WithTimeout(bctx, 90*time.Second) // a hang guard
	defer cancel()
	if err := chromedp.Do(ctx, chromedp.Navigate("http://"+api+"/")); err != nil {
		t.Fatalf("open the dashboard: %v", err)
	}
	v, err := chromedp.Run(ctx, chromedp.Poll[string](expr, chromedp.WithPollingInterval(100*time.Millisecond), chromedp.WithPollingTimeout(60*time.Second)))
	if err != nil {
		t.Fatalf("waiting for the dashboard to show %s: %v", what, err)
	}
	return v, true
}
