// Package fetch downloads a model file named by a URL or a Hugging Face reference into a local
// cache, so `--model hf://bartowski/Llama-3.3-70B-Instruct-GGUF/Llama-3.3-70B-Instruct-Q4_K_M.gguf`
// works like a path. A download resumes where a broken one stopped (HTTP Range), is checked
// against the sha256 the hub publishes for LFS files (or one given in the reference), and is
// renamed into place only when complete, so a cache hit is always a whole, verified file and
// a node restarts without the network once it has its model.
package fetch

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// DefaultHFEndpoint is the hub's address; $HF_ENDPOINT overrides it, as in huggingface_hub.
const DefaultHFEndpoint = "https://huggingface.co"

// Fetcher downloads models into a cache directory.
type Fetcher struct {
	dir      string
	client   *http.Client
	endpoint string
	token    string
	progress func(done, total int64)
	log      *slog.Logger
}

// Option configures a Fetcher.
type Option func(*Fetcher)

// WithHTTPClient sets the client (default: one with no overall timeout, since a model takes
// minutes, but a 30 s limit on each response's headers).
func WithHTTPClient(c *http.Client) Option { return func(f *Fetcher) { f.client = c } }

// WithHFEndpoint sets the hub's base URL (default $HF_ENDPOINT, else DefaultHFEndpoint).
func WithHFEndpoint(u string) Option {
	return func(f *Fetcher) { f.endpoint = strings.TrimRight(u, "/") }
}

// WithToken sets the bearer token for gated or private repositories (default $HF_TOKEN). It is
// sent only to the hub's own host, never to a plain URL's or to the CDN a download redirects to.
func WithToken(t string) Option { return func(f *Fetcher) { f.token = t } }

// WithProgress reports bytes downloaded so far and the file's size (0 when unknown).
func WithProgress(p func(done, total int64)) Option { return func(f *Fetcher) { f.progress = p } }

// WithLogger sets the logger (default slog.Default()).
func WithLogger(l *slog.Logger) Option { return func(f *Fetcher) { f.log = l } }

// New returns a Fetcher that keeps files under dir.
func New(dir string, opts ...Option) *Fetcher {
	f := &Fetcher{
		dir:      dir,
		endpoint: strings.TrimRight(os.Getenv("HF_ENDPOINT"), "/"),
		token:    os.Getenv("HF_TOKEN"),
		log:      slog.Default(),
	}
	if f.endpoint == "" {
		f.endpoint = DefaultHFEndpoint
	}
	for _, o := range opts {
		o(f)
	}
	if f.client == nil {
		tr := http.DefaultTransport.(*http.Transport).Clone()
		tr.ResponseHeaderTimeout = 30 * time.Second
		f.client = &http.Client{Transport: tr}
	}
	// The hub answers a download with a redirect to its CDN; the token is for the hub alone.
	// net/http drops it only for other domains, so drop it on every redirect.
	c := *f.client
	next := c.CheckRedirect
	c.CheckRedirect = func(req *http.Request, via []*http.Request) error {
		req.Header.Del("Authorization")
		if next != nil {
			return next(req, via)
		}
		if len(via) >= 10 {
			return errors.New("stopped after 10 redirects")
		}
		return nil
	}
	f.client = &c
	return f
}

// IsRemote reports whether a --model value names something to download rather than a file
// or an Ollama model.
func IsRemote(ref string) bool {
	return strings.HasPrefix(ref, "hf://") || strings.HasPrefix(ref, "http://") || strings.HasPrefix(ref, "https://")
}

// Ref is a parsed model reference.
type Ref struct {
	URL    string // what to GET
	Hub    bool   // on the Hugging Face hub: the token may go with it
	SHA256 string // expected digest, when the reference gives one (#sha256=...)
	Cache  string // path under the cache dir
}

// ParseRef parses "hf://OWNER/REPO[@REVISION]/PATH/FILE.gguf" or an http(s) URL, either with an
// optional "#sha256=HEX" suffix.
func (f *Fetcher) ParseRef(ref string) (Ref, error) {
	ref, frag, _ := strings.Cut(ref, "#")
	var r Ref
	if frag != "" {
		hexDigest, ok := strings.CutPrefix(frag, "sha256=")
		if !ok || !isHex64(hexDigest) {
			return Ref{}, fmt.Errorf("model reference %q: the fragment must be #sha256= and 64 hex digits", ref)
		}
		r.SHA256 = strings.ToLower(hexDigest)
	}
	if rest, ok := strings.CutPrefix(ref, "hf://"); ok {
		parts := strings.Split(rest, "/")
		if len(parts) < 3 {
			return Ref{}, fmt.Errorf("hugging face reference %q: want hf://OWNER/REPO[@REVISION]/FILE", ref)
		}
		owner, repo, file := parts[0], parts[1], parts[2:]
		rev := "main"
		if i := strings.Index(repo, "@"); i >= 0 {
			repo, rev = repo[:i], repo[i+1:]
		}
		for _, p := range append([]string{owner, repo, rev}, file...) {
			if p == "" || p == "." || p == ".." || strings.ContainsAny(p, `\`) {
				return Ref{}, fmt.Errorf("hugging face reference %q: bad path element %q", ref, p)
			}
		}
		fp := strings.Join(file, "/")
		r.URL = f.endpoint + "/" + url.PathEscape(owner) + "/" + url.PathEscape(repo) + "/resolve/" + url.PathEscape(rev) + "/" + escapePath(fp)
		r.Hub = true
		r.Cache = filepath.Join(f.dir, "hf", owner, repo, rev, filepath.FromSlash(fp))
		return r, nil
	}
	u, err := url.Parse(ref)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return Ref{}, fmt.Errorf("model reference %q: not an http(s) URL or hf:// reference", ref)
	}
	r.URL = u.String()
	if hu, err := url.Parse(f.endpoint); err == nil && hu.Host == u.Host {
		r.Hub = true
	}
	name := path.Base(u.Path)
	if name == "/" || name == "." || name == "" {
		name = "model.gguf"
	}
	sum := sha256.Sum256([]byte(r.URL))
	r.Cache = filepath.Join(f.dir, "url", hex.EncodeToString(sum[:8])+"-"+name)
	return r, nil
}

// sidecar records what a cached file was checked against, so a later start can trust it
// without the network.
type sidecar struct {
	URL    string `json:"url"`
	SHA256 string `json:"sha256"`
	Size   int64  `json:"size"`
}

// Fetch returns the local path of ref, downloading it first unless a complete copy is cached.
func (f *Fetcher) Fetch(ctx context.Context, ref string) (string, error) {
	r, err := f.ParseRef(ref)
	if err != nil {
		return "", err
	}
	if f.cached(r) {
		return r.Cache, nil
	}
	if err := os.MkdirAll(filepath.Dir(r.Cache), 0o755); err != nil {
		return "", fmt.Errorf("fetch %s: %w", ref, err)
	}
	f.log.Info("downloading model", "url", r.URL, "to", r.Cache)
	var last error
	for attempt := 0; attempt < 5; attempt++ {
		if attempt > 0 {
			f.log.Warn("download interrupted; resuming", "url", r.URL, "attempt", attempt+1, "err", last)
			select {
			case <-ctx.Done():
				return "", fmt.Errorf("fetch %s: %w", ref, ctx.Err())
			case <-time.After(time.Duration(attempt) * time.Second):
			}
		}
		var retry bool
		retry, last = f.download(ctx, r)
		if last == nil {
			return r.Cache, nil
		}
		if !retry || ctx.Err() != nil {
			break
		}
		// Nobody listens, or the name does not resolve: retrying would say the same
		// thing four more times.
		var dnsErr *net.DNSError
		if errors.Is(last, syscall.ECONNREFUSED) || errors.As(last, &dnsErr) {
			return "", fmt.Errorf("fetch %s: cannot reach the server (is the URL right, the network up?): %w", ref, last)
		}
	}
	return "", fmt.Errorf("fetch %s: %w", ref, last)
}

func (f *Fetcher) cached(r Ref) bool {
	st, err := os.Stat(r.Cache)
	if err != nil {
		return false
	}
	b, err := os.ReadFile(r.Cache + ".json")
	if err != nil {
		return false
	}
	var sc sidecar
	if json.Unmarshal(b, &sc) != nil || sc.URL != r.URL || sc.Size != st.Size() {
		return false
	}
	return r.SHA256 == "" || r.SHA256 == sc.SHA256
}

// download fetches r into its .partial file, resuming it, then verifies and renames it. It
// says whether a failure is worth another try (a broken connection) or final (a 404, a wrong
// digest).
func (f *Fetcher) download(ctx context.Context, r Ref) (retry bool, err error) {
	partial := r.Cache + ".partial"
	out, err := os.OpenFile(partial, os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		return false, err
	}
	defer out.Close()
	have, err := out.Seek(0, io.SeekEnd)
	if err != nil {
		return false, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, r.URL, nil)
	if err != nil {
		return false, err
	}
	if r.Hub && f.token != "" {
		req.Header.Set("Authorization", "Bearer "+f.token)
	}
	if have > 0 {
		req.Header.Set("Range", "bytes="+strconv.FormatInt(have, 10)+"-")
	}
	resp, err := f.client.Do(req)
	if err != nil {
		return true, err
	}
	defer resp.Body.Close()
	want := r.SHA256
	if want == "" {
		// The hub names an LFS file's sha256 in X-Linked-Etag on the redirect and in ETag on
		// the file itself; the client followed the redirect, so look at both responses.
		want = hubDigest(resp)
	}
	var total int64 = -1
	switch resp.StatusCode {
	case http.StatusOK:
		if have > 0 { // the server ignored Range: start over
			if err := out.Truncate(0); err != nil {
				return false, err
			}
			if _, err := out.Seek(0, io.SeekStart); err != nil {
				return false, err
			}
			have = 0
		}
		total = resp.ContentLength
	case http.StatusPartialContent:
		start, size, ok := parseContentRange(resp.Header.Get("Content-Range"))
		if !ok || start != have {
			return false, fmt.Errorf("server answered a resume from byte %d with Content-Range %q", have, resp.Header.Get("Content-Range"))
		}
		total = size
	case http.StatusRequestedRangeNotSatisfiable:
		// The partial file is already whole (or longer than the file now is): verify it below,
		// and if it is wrong start over.
		if size, ok := parseUnsatisfied(resp.Header.Get("Content-Range")); ok && size == have {
			total = have
			break
		}
		if err := out.Truncate(0); err != nil {
			return false, err
		}
		return true, errors.New("cached partial download does not match the file: starting over")
	case http.StatusUnauthorized, http.StatusForbidden:
		if r.Hub && f.token == "" {
			return false, fmt.Errorf("%s: the repository is gated or private: set HF_TOKEN to a token that may read it", resp.Status)
		}
		return false, fmt.Errorf("%s: access denied", resp.Status)
	case http.StatusNotFound:
		return false, fmt.Errorf("%s: no such file (check the repository, revision and file name)", resp.Status)
	default:
		return resp.StatusCode >= 500 || resp.StatusCode == http.StatusTooManyRequests, fmt.Errorf("unexpected response %s", resp.Status)
	}
	if total < 0 {
		total = 0
	}
	counted := &countingWriter{w: out, done: have, total: total, report: f.progress}
	counted.reportNow()
	_, err = io.Copy(counted, resp.Body)
	counted.reportNow()
	if err != nil {
		return true, fmt.Errorf("download: %w", err)
	}
	if total > 0 && counted.done != total {
		return true, fmt.Errorf("download ended at byte %d of %d", counted.done, total)
	}
	if err := out.Sync(); err != nil {
		return false, err
	}
	sum, size, err := hashFile(partial)
	if err != nil {
		return false, err
	}
	if want != "" && sum != want {
		os.Remove(partial)
		return false, fmt.Errorf("downloaded file has sha256 %s, want %s: removed it", sum, want)
	}
	b, _ := json.Marshal(sidecar{URL: r.URL, SHA256: sum, Size: size})
	if err := os.WriteFile(r.Cache+".json", b, 0o644); err != nil {
		return false, err
	}
	if err := os.Rename(partial, r.Cache); err != nil {
		return false, err
	}
	f.log.Info("downloaded model", "path", r.Cache, "bytes", size, "sha256", sum)
	return false, nil
}

func hubDigest(resp *http.Response) string {
	// X-Linked-Etag anywhere on the redirect chain first: a CDN's own ETag means something else.
	for _, h := range []string{"X-Linked-Etag", "Etag"} {
		for r := resp; r != nil; {
			v := strings.Trim(strings.TrimPrefix(r.Header.Get(h), "W/"), `"`)
			if isHex64(v) {
				return strings.ToLower(v)
			}
			if r.Request == nil {
				break
			}
			r = r.Request.Response
		}
	}
	return ""
}

// parseContentRange reads "bytes START-END/SIZE".
func parseContentRange(s string) (start, size int64, ok bool) {
	rest, ok := strings.CutPrefix(s, "bytes ")
	if !ok {
		return 0, 0, false
	}
	rng, sz, ok := strings.Cut(rest, "/")
	if !ok {
		return 0, 0, false
	}
	a, _, ok := strings.Cut(rng, "-")
	if !ok {
		return 0, 0, false
	}
	start, err1 := strconv.ParseInt(a, 10, 64)
	size, err2 := strconv.ParseInt(sz, 10, 64)
	if err1 != nil || err2 != nil {
		return 0, 0, false
	}
	return start, size, true
}

// parseUnsatisfied reads "bytes */SIZE".
func parseUnsatisfied(s string) (int64, bool) {
	rest, ok := strings.CutPrefix(s, "bytes */")
	if !ok {
		return 0, false
	}
	n, err := strconv.ParseInt(rest, 10, 64)
	return n, err == nil
}

func hashFile(p string) (string, int64, error) {
	f, err := os.Open(p)
	if err != nil {
		return "", 0, err
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		return "", 0, fmt.Errorf("hash %s: %w", p, err)
	}
	return hex.EncodeToString(h.Sum(nil)), n, nil
}

func isHex64(s string) bool {
	if len(s) != 64 {
		return false
	}
	_, err := hex.DecodeString(s)
	return err == nil
}

func escapePath(p string) string {
	parts := strings.Split(p, "/")
	for i, s := range parts {
		parts[i] = url.PathEscape(s)
	}
	return strings.Join(parts, "/")
}

type countingWriter struct {
	w           io.Writer
	done, total int64
	report      func(done, total int64)
	last        time.Time
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.done += int64(n)
	if c.report != nil && time.Since(c.last) > 100*time.Millisecond {
		c.reportNow()
	}
	return n, err
}

func (c *countingWriter) reportNow() {
	if c.report != nil {
		c.last = time.Now()
		c.report(c.done, c.total)
	}
}
