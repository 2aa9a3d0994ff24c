package testkit

import (
	"crypto/sha256"
	"encoding/hex"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"sync/atomic"
	"testing"
)

// ServeHub serves files the way the Hugging Face hub does, on 127.0.0.1: GET
// /OWNER/REPO/resolve/REV/PATH answers 302 to a CDN path with the file's sha256 in
// X-Linked-Etag, and the CDN path serves the bytes with Range support. files maps
// "OWNER/REPO/resolve/REV/PATH" to a local file. Point HF_ENDPOINT (or fetch.WithHFEndpoint)
// at the returned URL.
func ServeHub(tb testing.TB, files map[string]string) string {
	tb.Helper()
	url, _ := ServeHubCounted(tb, files)
	return url
}

// ServeHubCounted is ServeHub that also counts the file bytes its CDN path sends, so a test
// can assert that a client read only the ranges it needed.
func ServeHubCounted(tb testing.TB, files map[string]string) (string, *atomic.Int64) {
	tb.Helper()
	served := &atomic.Int64{}
	sums := map[string]string{}
	for name, path := range files {
		f, err := os.Open(path)
		if err != nil {
			tb.Fatal(err)
		}
		h := sha256.New()
		_, err = io.Copy(h, f)
		f.Close()
		if err != nil {
			tb.Fatal(err)
		}
		sums[name] = hex.EncodeToString(h.Sum(nil))
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /cdn/{name...}", func(w http.ResponseWriter, r *http.Request) {
		path, ok := files[r.PathValue("name")]
		if !ok {
			http.NotFound(w, r)
			return
		}
		http.ServeFile(countingWriter{w, served}, r, path)
	})
	mux.HandleFunc("GET /{name...}", func(w http.ResponseWriter, r *http.Request) {
		name := r.PathValue("name")
		sum, ok := sums[name]
		if !ok {
			http.Error(w, "Entry not found", http.StatusNotFound)
			return
		}
		w.Header().Set("X-Linked-Etag", `"`+sum+`"`)
		http.Redirect(w, r, "/cdn/"+name, http.StatusFound)
	})
	srv := httptest.NewServer(mux)
	tb.Cleanup(srv.Close)
	return srv.URL, served
}

type countingWriter struct {
	http.ResponseWriter
	n *atomic.Int64
}

func (c countingWriter) Write(b []byte) (int, error) {
	k, err := c.ResponseWriter.Write(b)
	c.n.Add(int64(k))
	return k, err
}
