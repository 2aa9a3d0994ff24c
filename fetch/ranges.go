package fetch

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"sync/atomic"
)

// Remote reads byte ranges of a remote model file without downloading it: a node that needs
// only its slice reads the GGUF header and then only its tensors' ranges.
type Remote struct {
	f      *Fetcher
	ref    Ref
	size   int64
	sha256 string // the hub's digest of the whole file, or the reference's #sha256=
	bytes  atomic.Int64
}

// OpenRemote resolves ref (hf://... or a URL) and learns the file's size and, from the hub,
// its sha256, with a one-byte Range request.
func (f *Fetcher) OpenRemote(ctx context.Context, ref string) (*Remote, error) {
	r, err := f.ParseRef(ref)
	if err != nil {
		return nil, err
	}
	rm := &Remote{f: f, ref: r, sha256: r.SHA256}
	var one [1]byte
	resp, err := rm.get(ctx, 0, one[:])
	if err != nil {
		return nil, err
	}
	if rm.sha256 == "" {
		rm.sha256 = hubDigest(resp)
	}
	return rm, nil
}

// Size is the remote file's size.
func (r *Remote) Size() int64 { return r.size }

// SHA256 is the whole file's digest as the hub (or the reference) names it; "" if unknown.
// A slice read from ranges cannot be checked against it.
func (r *Remote) SHA256() string { return r.sha256 }

// BytesRead is the body bytes received so far.
func (r *Remote) BytesRead() int64 { return r.bytes.Load() }

// ReadAt reads len(p) bytes at off with one Range request. Each request is resolved anew
// from the hub: Xet-backed files sign each CDN URL for one range.
func (r *Remote) ReadAt(p []byte, off int64) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	if off >= r.size && r.size > 0 {
		return 0, io.EOF
	}
	n := len(p)
	if r.size > 0 && int64(n) > r.size-off {
		n = int(r.size - off)
	}
	if _, err := r.get(context.Background(), off, p[:n]); err != nil {
		return 0, err
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// ReadRange is ReadAt with a context.
func (r *Remote) ReadRange(ctx context.Context, off int64, p []byte) error {
	_, err := r.get(ctx, off, p)
	return err
}

// get fills p from a Range request at off, insisting on 206 and the range asked for.
func (r *Remote) get(ctx context.Context, off int64, p []byte) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, r.ref.URL, nil)
	if err != nil {
		return nil, err
	}
	if r.ref.Hub && r.f.token != "" {
		req.Header.Set("Authorization", "Bearer "+r.f.token)
	}
	req.Header.Set("Range", "bytes="+strconv.FormatInt(off, 10)+"-"+strconv.FormatInt(off+int64(len(p))-1, 10))
	resp, err := r.f.client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("range request: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusPartialContent {
		// A 200 would be the whole file: reading it to take a range defeats the purpose.
		return nil, fmt.Errorf("range request for bytes %d-%d of %s: %s, want 206 Partial Content", off, off+int64(len(p))-1, r.ref.URL, resp.Status)
	}
	start, size, ok := parseContentRange(resp.Header.Get("Content-Range"))
	if !ok || start != off {
		return nil, fmt.Errorf("range request at %d answered with Content-Range %q", off, resp.Header.Get("Content-Range"))
	}
	if r.size == 0 {
		r.size = size
	} else if size != r.size {
		return nil, fmt.Errorf("remote file changed size from %d to %d bytes", r.size, size)
	}
	k, err := io.ReadFull(resp.Body, p)
	r.bytes.Add(int64(k))
	if err != nil {
		return nil, fmt.Errorf("range request at %d: %w", off, err)
	}
	if extra, _ := resp.Body.Read(make([]byte, 1)); extra > 0 {
		return nil, errors.New("range request answered with more bytes than asked for")
	}
	return resp, nil
}
