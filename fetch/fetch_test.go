package fetch_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/strata-llm/strata/fetch"
)

// hub is a local server laid out like the Hugging Face hub: /OWNER/REPO/resolve/REV/FILE
// answers 302 to a CDN path with the LFS file's sha256 in X-Linked-Etag, and the CDN serves
// the bytes with Range support.
type hub struct {
	*httptest.Server
	file     []byte
	sum      string
	token    string // required when set
	cutFirst int    // the first CDN response breaks after this many bytes (0: never)
	wrongSum bool

	mu       sync.Mutex
	cdnAuth  []string // Authorization headers the CDN saw
	ranges   []string // Range headers the CDN saw
	requests int
}

func newHub(t *testing.T, size int) *hub {
	t.Helper()
	h := &hub{file: make([]byte, size)}
	r := rand.New(rand.NewPCG(1, 2))
	for i := range h.file {
		h.file[i] = byte(r.Uint32())
	}
	sum := sha256.Sum256(h.file)
	h.sum = hex.EncodeToString(sum[:])
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{owner}/{repo}/resolve/{rev}/{file...}", func(w http.ResponseWriter, r *http.Request) {
		h.mu.Lock()
		h.requests++
		h.mu.Unlock()
		if r.PathValue("owner") != "meta" || r.PathValue("repo") != "tiny-GGUF" || r.PathValue("rev") != "main" || r.PathValue("file") != "sub/model.gguf" {
			http.Error(w, "Entry not found", http.StatusNotFound)
			return
		}
		if h.token != "" && r.Header.Get("Authorization") != "Bearer "+h.token {
			http.Error(w, "Access to model meta/tiny-GGUF is restricted", http.StatusUnauthorized)
			return
		}
		etag := h.sum
		if h.wrongSum {
			etag = strings.Repeat("ab", 32)
		}
		w.Header().Set("X-Linked-Etag", `"`+etag+`"`)
		w.Header().Set("X-Linked-Size", "1")
		http.Redirect(w, r, "/cdn/"+h.sum, http.StatusFound)
	})
	mux.HandleFunc("GET /cdn/{sum}", func(w http.ResponseWriter, r *http.Request) {
		h.mu.Lock()
		h.cdnAuth = append(h.cdnAuth, r.Header.Get("Authorization"))
		h.ranges = append(h.ranges, r.Header.Get("Range"))
		first := len(h.ranges) == 1
		h.mu.Unlock()
		w.Header().Set("ETag", `"cdn-etag-not-a-digest"`)
		if first && h.cutFirst > 0 {
			w.Header().Set("Content-Length", strconv.Itoa(len(h.file)))
			w.WriteHeader(http.StatusOK)
			w.Write(h.file[:h.cutFirst])
			panic(http.ErrAbortHandler) // the connection breaks mid-file
		}
		http.ServeContent(w, r, "model.gguf", time.Time{}, bytes.NewReader(h.file))
	})
	h.Server = httptest.NewServer(mux)
	t.Cleanup(h.Close)
	return h
}

const ref = "hf://meta/tiny-GGUF/sub/model.gguf"

func TestFetchFromHub(t *testing.T) {
	h := newHub(t, 3<<20)
	h.token = "hf_secret"
	var last, total int64
	f := fetch.New(t.TempDir(), fetch.WithHFEndpoint(h.URL), fetch.WithToken("hf_secret"),
		fetch.WithProgress(func(d, tot int64) { last, total = d, tot }))
	p, err := f.Fetch(context.Background(), ref)
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(p)
	if err != nil || !bytes.Equal(got, h.file) {
		t.Fatalf("fetched file differs (err %v)", err)
	}
	if last != int64(len(h.file)) || total != int64(len(h.file)) {
		t.Fatalf("progress ended at %d/%d, want %d", last, total, len(h.file))
	}
	// The token goes to the hub, never to the CDN it redirects to.
	for _, a := range h.cdnAuth {
		if a != "" {
			t.Fatalf("the CDN was sent Authorization %q", a)
		}
	}
}

// TestFetchResumes: a connection broken mid-file is resumed with a Range request from the
// byte it reached, not started over.
func TestFetchResumes(t *testing.T) {
	h := newHub(t, 2<<20)
	h.cutFirst = 700 << 10
	f := fetch.New(t.TempDir(), fetch.WithHFEndpoint(h.URL))
	p, err := f.Fetch(context.Background(), ref)
	if err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(p)
	if !bytes.Equal(got, h.file) {
		t.Fatal("resumed file differs")
	}
	if len(h.ranges) != 2 || h.ranges[0] != "" || !strings.HasPrefix(h.ranges[1], "bytes=") || h.ranges[1] == "bytes=0-" {
		t.Fatalf("CDN saw Range headers %q, want none then a resume", h.ranges)
	}
}

// TestFetchCachedOffline: a verified file is used again without asking the network.
func TestFetchCachedOffline(t *testing.T) {
	h := newHub(t, 1<<20)
	dir := t.TempDir()
	f := fetch.New(dir, fetch.WithHFEndpoint(h.URL))
	p1, err := f.Fetch(context.Background(), ref)
	if err != nil {
		t.Fatal(err)
	}
	h.Close()
	p2, err := fetch.New(dir, fetch.WithHFEndpoint(h.URL)).Fetch(context.Background(), ref)
	if err != nil || p2 != p1 {
		t.Fatalf("offline: %q, %v (first %q)", p2, err, p1)
	}
}

func TestFetchRejectsWrongDigest(t *testing.T) {
	h := newHub(t, 256<<10)
	h.wrongSum = true
	f := fetch.New(t.TempDir(), fetch.WithHFEndpoint(h.URL))
	p, err := f.Fetch(context.Background(), ref)
	if err == nil || !strings.Contains(err.Error(), "sha256") {
		t.Fatalf("got %q, %v: want a digest error", p, err)
	}
	r, _ := f.ParseRef(ref)
	if _, err := os.Stat(r.Cache); err == nil {
		t.Fatal("a file with the wrong digest was kept")
	}
}

func TestFetchPlainURLWithDigest(t *testing.T) {
	h := newHub(t, 64<<10)
	dir := t.TempDir()
	good := h.URL + "/cdn/x#sha256=" + h.sum
	p, err := fetch.New(dir).Fetch(context.Background(), good)
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(p); !bytes.Equal(got, h.file) {
		t.Fatal("file differs")
	}
	bad := h.URL + "/cdn/y#sha256=" + strings.Repeat("0", 64)
	if _, err := fetch.New(dir).Fetch(context.Background(), bad); err == nil || !strings.Contains(err.Error(), "want "+strings.Repeat("0", 64)) {
		t.Fatalf("wrong digest: %v", err)
	}
}

func TestFetchErrors(t *testing.T) {
	h := newHub(t, 1024)
	h.token = "hf_secret"
	f := fetch.New(t.TempDir(), fetch.WithHFEndpoint(h.URL), fetch.WithToken(""))
	cases := []struct{ ref, want string }{
		{ref, "set HF_TOKEN"},
		{"hf://meta/tiny-GGUF/missing.gguf", "no such file"},
		{"hf://meta/only-two", "want hf://OWNER/REPO"},
		{"hf://meta/../x/model.gguf", "bad path element"},
		{"ftp://example/model.gguf", "not an http(s) URL"},
		{h.URL + "/cdn/z#md5=00", "#sha256="},
	}
	for _, c := range cases {
		if _, err := f.Fetch(context.Background(), c.ref); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: got %v, want an error mentioning %q", c.ref, err, c.want)
		}
	}
	if h.requests > 2 {
		t.Errorf("final errors were retried: %d hub requests", h.requests)
	}

	// Nobody listening: one clear error, no retries (it used to log "resuming" four times).
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := "http://" + ln.Addr().String() + "/model.gguf"
	ln.Close()
	var logs bytes.Buffer
	f = fetch.New(t.TempDir(), fetch.WithLogger(slog.New(slog.NewTextHandler(&logs, nil))))
	if _, err := f.Fetch(context.Background(), dead); err == nil || !strings.Contains(err.Error(), "cannot reach the server") {
		t.Errorf("connection refused: %v", err)
	}
	if strings.Contains(logs.String(), "resuming") {
		t.Errorf("retried a refused connection:\n%s", logs.String())
	}
}

func TestParseRef(t *testing.T) {
	f := fetch.New("/cache", fetch.WithHFEndpoint("https://hub.example"))
	r, err := f.ParseRef("hf://bartowski/Llama-3.3-70B-Instruct-GGUF@v2/Q4_K_M/model-00001-of-00002.gguf")
	if err != nil {
		t.Fatal(err)
	}
	if r.URL != "https://hub.example/bartowski/Llama-3.3-70B-Instruct-GGUF/resolve/v2/Q4_K_M/model-00001-of-00002.gguf" || !r.Hub {
		t.Fatalf("url %s hub %v", r.URL, r.Hub)
	}
	if r.Cache != "/cache/hf/bartowski/Llama-3.3-70B-Instruct-GGUF/v2/Q4_K_M/model-00001-of-00002.gguf" {
		t.Fatalf("cache %s", r.Cache)
	}
	for ref, remote := range map[string]bool{"hf://a/b/c": true, "https://x/y.gguf": true, "llama3.3:70b": false, "./m.gguf": false} {
		if fetch.IsRemote(ref) != remote {
			t.Errorf("IsRemote(%q) = %v", ref, !remote)
		}
	}
}
