package peerfetch

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"reflect"
	"slices"

	fsggml "github.com/ollama/ollama/fs/ggml"

	"github.com/strata-llm/strata/internal/gguf"
	"github.com/strata-llm/strata/shard"
	"github.com/strata-llm/strata/weights"
)

// Record is written beside a fetched slice file: where its bytes came from, whether every
// tensor matched a manifest, and the file's own digest, so a restart checks the cached slice
// with one read (no manifest, no network) and a slice the hub served unverified is checked
// once a manifest turns up.
type Record struct {
	ModelSHA256 string `json:"model_sha256"`
	Manifest    string `json:"manifest,omitempty"` // the id of the manifest the tensors matched
	Verified    bool   `json:"verified"`           // every tensor matched Manifest
	From        string `json:"from"`               // "peers" or "hub"
	SHA256      string `json:"sha256"`             // of the slice file
	Size        int64  `json:"size"`
}

func recordPath(slice string) string { return slice + ".fetched" }

// WriteRecord digests the slice file and writes rec beside it (atomically).
func WriteRecord(slice string, rec Record) error {
	sum, size, err := fileSHA256(slice)
	if err != nil {
		return fmt.Errorf("record slice: %w", err)
	}
	rec.SHA256, rec.Size = sum, size
	b, err := json.Marshal(rec)
	if err != nil {
		return fmt.Errorf("record slice: %w", err)
	}
	return writeAtomic(recordPath(slice), b)
}

// CheckRecord reads the record beside a fetched slice and checks the file against its
// digest. A slice without a record, or whose bytes changed, is an error: fetch it again.
func CheckRecord(slice, modelSHA256 string) (Record, error) {
	var rec Record
	b, err := os.ReadFile(recordPath(slice))
	if err != nil {
		return rec, fmt.Errorf("cached slice %s has no record: %w", filepath.Base(slice), err)
	}
	if err := json.Unmarshal(b, &rec); err != nil {
		return rec, fmt.Errorf("cached slice %s: record: %w", filepath.Base(slice), err)
	}
	if rec.ModelSHA256 != modelSHA256 {
		return rec, fmt.Errorf("cached slice %s is of model %s", filepath.Base(slice), short(rec.ModelSHA256))
	}
	st, err := os.Stat(slice)
	if err != nil {
		return rec, err
	}
	if st.Size() != rec.Size {
		return rec, fmt.Errorf("cached slice %s: %d bytes, recorded %d", filepath.Base(slice), st.Size(), rec.Size)
	}
	sum, _, err := fileSHA256(slice)
	if err != nil {
		return rec, err
	}
	if sum != rec.SHA256 {
		return rec, fmt.Errorf("cached slice %s: bytes changed since it was fetched (sha256 %s, recorded %s)", filepath.Base(slice), short(sum), short(rec.SHA256))
	}
	return rec, nil
}

// RemoveSlice deletes a slice file and its record.
func RemoveSlice(slice string) error {
	err := os.Remove(slice)
	if errors.Is(err, os.ErrNotExist) {
		err = nil
	}
	if rerr := os.Remove(recordPath(slice)); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
		err = errors.Join(err, rerr)
	}
	return err
}

// VerifySlice checks every tensor of a slice file against the manifest (the placeholder
// output tensor a first stage carries is not the model's and is skipped), and the slice's
// metadata against the manifest's header by the model sha256 the slice names.
func VerifySlice(slice string, m *weights.Manifest) error {
	f, err := os.Open(slice)
	if err != nil {
		return err
	}
	defer f.Close()
	meta, err := gguf.Decode(f)
	if err != nil {
		return fmt.Errorf("verify slice %s: %w", filepath.Base(slice), err)
	}
	if of, _ := meta.KV()[shard.SliceOfKey].(string); of != m.ModelSHA256 {
		return fmt.Errorf("verify slice %s: cut from model %s, manifest of %s", filepath.Base(slice), short(of), short(m.ModelSHA256))
	}
	whole, err := m.Parse()
	if err != nil {
		return err
	}
	// The decoder adds general.parameter_count, counted from the tensors the file holds.
	kv, wkv := maps.Clone(meta.KV()), maps.Clone(whole.KV())
	delete(kv, shard.SliceOfKey)
	delete(kv, "general.parameter_count")
	delete(wkv, "general.parameter_count")
	if !reflect.DeepEqual(kv, wkv) {
		return fmt.Errorf("verify slice %s: metadata differs from the manifest's header", filepath.Base(slice))
	}
	table := map[string]*fsggml.Tensor{}
	for _, t := range whole.Tensors().Items() {
		table[t.Name] = t
	}
	base := int64(meta.Tensors().Offset)
	buf := make([]byte, 1<<20)
	checked := 0
	for _, t := range meta.Tensors().Items() {
		if t.Name == shard.AbsentOutput {
			continue
		}
		mt, ok := m.Tensor(t.Name)
		wt := table[t.Name]
		if !ok || wt == nil {
			return fmt.Errorf("verify slice %s: tensor %q is not in the manifest", filepath.Base(slice), t.Name)
		}
		if wt.Kind != t.Kind || !slices.Equal(wt.Shape, t.Shape) {
			return fmt.Errorf("verify slice %s: tensor %q: type or shape differs from the manifest's header", filepath.Base(slice), t.Name)
		}
		if uint64(mt.Size) != t.Size() {
			return fmt.Errorf("verify slice %s: tensor %q has %d bytes, manifest %d", filepath.Base(slice), t.Name, t.Size(), mt.Size)
		}
		h := sha256.New()
		if _, err := io.CopyBuffer(h, io.NewSectionReader(f, base+int64(t.Offset), int64(t.Size())), buf); err != nil {
			return fmt.Errorf("verify slice %s: %s: %w", filepath.Base(slice), t.Name, err)
		}
		if [32]byte(h.Sum(nil)) != mt.SHA256 {
			return fmt.Errorf("verify slice %s: tensor %q does not match the manifest", filepath.Base(slice), t.Name)
		}
		checked++
	}
	if checked == 0 {
		return fmt.Errorf("verify slice %s: no tensor of the model in it", filepath.Base(slice))
	}
	return nil
}

// HubHeader is a remote model's GGUF header cached on disk, so a --slices-only node
// restarts without the network: the model's sha256 and size as the hub named them, and
// the header's bytes with their digest (checked on load against local damage, and against
// the swarm's manifest once one is known).
type HubHeader struct {
	Ref          string `json:"ref"`
	ModelSHA256  string `json:"model_sha256"`
	Size         int64  `json:"size"`
	HeaderSHA256 string `json:"header_sha256"`
	Manifest     string `json:"manifest,omitempty"` // the id of a manifest whose header it equals

	Header []byte `json:"-"`
}

// HubHeaderPath is where the header of ref is cached in dir.
func HubHeaderPath(dir, ref string) string {
	s := sha256.Sum256([]byte(ref))
	return filepath.Join(dir, "hub-"+hex.EncodeToString(s[:12]))
}

// Save writes the header (path, path+".gguf-header") atomically.
func (h *HubHeader) Save(path string) error {
	s := sha256.Sum256(h.Header)
	h.HeaderSHA256 = hex.EncodeToString(s[:])
	if err := writeAtomic(path+".gguf-header", h.Header); err != nil {
		return err
	}
	b, err := json.Marshal(h)
	if err != nil {
		return err
	}
	return writeAtomic(path, b)
}

// LoadHubHeader reads a cached header of ref and checks it: its digest, and that it parses.
func LoadHubHeader(path, ref string) (*HubHeader, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var h HubHeader
	if err := json.Unmarshal(b, &h); err != nil {
		return nil, fmt.Errorf("cached hub header: %w", err)
	}
	if h.Ref != ref {
		return nil, fmt.Errorf("cached hub header is of %s, not %s", h.Ref, ref)
	}
	if len(h.ModelSHA256) != 64 || h.Size <= 0 {
		return nil, errors.New("cached hub header: no model sha256 or size")
	}
	if h.Header, err = os.ReadFile(path + ".gguf-header"); err != nil {
		return nil, fmt.Errorf("cached hub header: %w", err)
	}
	if s := sha256.Sum256(h.Header); hex.EncodeToString(s[:]) != h.HeaderSHA256 {
		return nil, errors.New("cached hub header: bytes do not match their digest")
	}
	if _, err := weights.ParseHeader(h.Header, h.Size); err != nil {
		return nil, fmt.Errorf("cached hub header: %w", err)
	}
	return &h, nil
}

func fileSHA256(path string) (string, int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", 0, err
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		return "", 0, err
	}
	return hex.EncodeToString(h.Sum(nil)), n, nil
}

func writeAtomic(path string, b []byte) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	tmp := path + ".tmp"
	f, err := os.Create(tmp)
	if err != nil {
		return err
	}
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write %s: %w", filepath.Base(path), err)
	}
	return nil
}
