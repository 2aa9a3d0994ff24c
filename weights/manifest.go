// Package weights describes a model's weights so that a node can fetch just its slice from
// untrusted sources and check every byte: a manifest holds the GGUF's header (metadata and
// tensor table) and a sha256 per tensor, and is itself named by its sha256. It parses GGUF
// headers but links no ggml code, so its decoder can be fuzzed cheaply.
package weights

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"sort"

	fsggml "github.com/ollama/ollama/fs/ggml"
	"github.com/vmihailenco/msgpack/v5"

	"github.com/strata-llm/strata/internal/gguf"
)

// Limits a decoded manifest must keep. A GGUF header with Llama 3's 128k-token vocabulary
// and merges takes about 10 MB; DeepSeek V3's 1025 tensors are far below the tensor limit.
const (
	MaxHeaderBytes   = 64 << 20
	MaxTensors       = 1 << 16
	MaxTensorName    = 256
	MaxManifestBytes = MaxHeaderBytes + MaxTensors*(MaxTensorName+64) + 1024
	version          = 1
)

// ErrBadManifest is wrapped by every decoding and validation error.
var ErrBadManifest = errors.New("bad manifest")

// Manifest is a model's header plus a digest of each tensor.
type Manifest struct {
	ModelSHA256 string   // the whole file's sha256, hex: the model's name in the swarm
	FileSize    int64    // the whole file's size
	Header      []byte   // the file's bytes before the first tensor: metadata, tensor table, padding
	Tensors     []Tensor // in file order
}

// Tensor is where one tensor's bytes lie in the whole file and what they hash to.
type Tensor struct {
	Name   string
	Offset int64 // from the start of the whole file
	Size   int64
	SHA256 [32]byte
}

// Tensor finds a tensor by name.
func (m *Manifest) Tensor(name string) (Tensor, bool) {
	for _, t := range m.Tensors {
		if t.Name == name {
			return t, true
		}
	}
	return Tensor{}, false
}

// ID is the manifest's name: the hex sha256 of its encoding.
func ID(encoded []byte) string {
	s := sha256.Sum256(encoded)
	return hex.EncodeToString(s[:])
}

// Build reads the whole model file at path and hashes each tensor. modelSHA256 is the
// file's sha256 as the caller verified it (against the hub or a #sha256= pin); Build does
// not hash the whole file again, but it does read every tensor.
func Build(path, modelSHA256 string) (*Manifest, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("build manifest: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("build manifest: %w", err)
	}
	meta, err := gguf.Decode(f)
	if err != nil {
		return nil, fmt.Errorf("build manifest of %s: %w", path, err)
	}
	base := int64(meta.Tensors().Offset)
	m := &Manifest{ModelSHA256: modelSHA256, FileSize: st.Size(), Header: make([]byte, base)}
	if _, err := f.ReadAt(m.Header, 0); err != nil {
		return nil, fmt.Errorf("build manifest: read header: %w", err)
	}
	buf := make([]byte, 1<<20)
	for _, t := range meta.Tensors().Items() {
		off, size := base+int64(t.Offset), int64(t.Size())
		h := sha256.New()
		if _, err := io.CopyBuffer(h, io.NewSectionReader(f, off, size), buf); err != nil {
			return nil, fmt.Errorf("build manifest: hash %s: %w", t.Name, err)
		}
		tt := Tensor{Name: t.Name, Offset: off, Size: size}
		h.Sum(tt.SHA256[:0])
		m.Tensors = append(m.Tensors, tt)
	}
	sort.SliceStable(m.Tensors, func(i, j int) bool { return m.Tensors[i].Offset < m.Tensors[j].Offset })
	if err := m.validate(); err != nil {
		return nil, err
	}
	return m, nil
}

// Encode is the manifest's wire form: a msgpack array
// [version, model sha256, file size, header, [[name, offset, size, sha256]...]] in the
// smallest encodings, so the same manifest always has the same ID.
func (m *Manifest) Encode() ([]byte, error) {
	var b bytes.Buffer
	e := msgpack.NewEncoder(&b)
	err := errors.Join(
		e.EncodeArrayLen(5),
		e.EncodeUint(version),
		e.EncodeString(m.ModelSHA256),
		e.EncodeUint(uint64(m.FileSize)),
		e.EncodeBytes(m.Header),
		e.EncodeArrayLen(len(m.Tensors)),
	)
	for _, t := range m.Tensors {
		err = errors.Join(err,
			e.EncodeArrayLen(4),
			e.EncodeString(t.Name),
			e.EncodeUint(uint64(t.Offset)),
			e.EncodeUint(uint64(t.Size)),
			e.EncodeBytes(t.SHA256[:]),
		)
	}
	if err != nil {
		return nil, fmt.Errorf("encode manifest: %w", err)
	}
	return b.Bytes(), nil
}

// Decode parses and validates an encoded manifest: every length is checked against the
// bytes left before anything is allocated, the tensors must lie in order inside the file
// after the header, and the encoding must be the canonical one Encode writes. It does not
// parse the GGUF header: Parse does.
func Decode(b []byte) (*Manifest, error) {
	if len(b) > MaxManifestBytes {
		return nil, fmt.Errorf("%w: %d bytes, limit %d", ErrBadManifest, len(b), MaxManifestBytes)
	}
	d := &reader{b: b}
	if n := d.array(); n != 5 && d.err == nil {
		d.fail("top-level array of %d items, want 5", n)
	}
	if v := d.uint(); v != version && d.err == nil {
		d.fail("version %d, want %d", v, version)
	}
	m := &Manifest{}
	m.ModelSHA256 = string(d.str(64))
	m.FileSize = int64(d.uint())
	m.Header = slices.Clone(d.bin(MaxHeaderBytes))
	n := d.array()
	if d.err == nil && (n > MaxTensors || n > d.left()/8) {
		d.fail("%d tensors", n)
	}
	if d.err == nil {
		m.Tensors = make([]Tensor, 0, n)
	}
	for i := 0; d.err == nil && i < n; i++ {
		if k := d.array(); k != 4 && d.err == nil {
			d.fail("tensor entry of %d items, want 4", k)
		}
		t := Tensor{Name: string(d.str(MaxTensorName))}
		t.Offset = int64(d.uint())
		t.Size = int64(d.uint())
		if s := d.bin(32); len(s) != 32 && d.err == nil {
			d.fail("tensor %q digest of %d bytes", t.Name, len(s))
		} else {
			copy(t.SHA256[:], s)
		}
		m.Tensors = append(m.Tensors, t)
	}
	if d.err == nil && d.left() != 0 {
		d.fail("%d trailing bytes", d.left())
	}
	if d.err != nil {
		return nil, d.err
	}
	if err := m.validate(); err != nil {
		return nil, err
	}
	if again, err := m.Encode(); err != nil || !bytes.Equal(again, b) {
		return nil, fmt.Errorf("%w: not in canonical encoding", ErrBadManifest)
	}
	return m, nil
}

func (m *Manifest) validate() error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s", ErrBadManifest, fmt.Sprintf(format, args...))
	}
	if len(m.ModelSHA256) != 64 {
		return bad("model sha256 %q is not 64 hex digits", m.ModelSHA256)
	}
	if _, err := hex.DecodeString(m.ModelSHA256); err != nil || m.ModelSHA256 != hexLower(m.ModelSHA256) {
		return bad("model sha256 %q is not lowercase hex", m.ModelSHA256)
	}
	if m.FileSize <= 0 || len(m.Header) == 0 || int64(len(m.Header)) > m.FileSize || len(m.Header) > MaxHeaderBytes {
		return bad("header of %d bytes in a file of %d", len(m.Header), m.FileSize)
	}
	if len(m.Tensors) == 0 || len(m.Tensors) > MaxTensors {
		return bad("%d tensors", len(m.Tensors))
	}
	names := make(map[string]struct{}, len(m.Tensors))
	end := int64(len(m.Header))
	for _, t := range m.Tensors {
		if t.Name == "" || len(t.Name) > MaxTensorName {
			return bad("tensor name of %d bytes", len(t.Name))
		}
		if _, dup := names[t.Name]; dup {
			return bad("tensor %q listed twice", t.Name)
		}
		names[t.Name] = struct{}{}
		if t.Offset < end || t.Size < 0 || t.Size > m.FileSize-t.Offset {
			return bad("tensor %q at [%d,+%d) overlaps another or lies outside the file's %d bytes", t.Name, t.Offset, t.Size, m.FileSize)
		}
		end = t.Offset + t.Size
	}
	return nil
}

func hexLower(s string) string {
	b, _ := hex.DecodeString(s)
	return hex.EncodeToString(b)
}

// Parse decodes the manifest's GGUF header and checks that its tensor table lists exactly
// the manifest's tensors at the same places, so a slice written from the header and
// verified tensors is the file the manifest's builder held.
func (m *Manifest) Parse() (*fsggml.GGML, error) {
	meta, err := ParseHeader(m.Header, m.FileSize)
	if err != nil {
		return nil, err
	}
	base := int64(meta.Tensors().Offset)
	items := meta.Tensors().Items()
	if len(items) != len(m.Tensors) {
		return nil, fmt.Errorf("%w: header lists %d tensors, manifest %d", ErrBadManifest, len(items), len(m.Tensors))
	}
	for _, t := range items {
		mt, ok := m.Tensor(t.Name)
		if !ok || mt.Offset != base+int64(t.Offset) || uint64(mt.Size) != t.Size() {
			return nil, fmt.Errorf("%w: tensor %q: header and manifest disagree on where it lies", ErrBadManifest, t.Name)
		}
	}
	return meta, nil
}

// ParseHeader decodes a GGUF header: the bytes of a file of fileSize before its first
// tensor. It checks that the header says its tensors start right after it.
func ParseHeader(hdr []byte, fileSize int64) (*fsggml.GGML, error) {
	meta, err := gguf.Decode(&headerReader{hdr: hdr, size: fileSize})
	if err != nil {
		return nil, fmt.Errorf("%w: header: %w", ErrBadManifest, err)
	}
	if base := int64(meta.Tensors().Offset); base != int64(len(hdr)) {
		return nil, fmt.Errorf("%w: header says tensors start at %d, have %d header bytes", ErrBadManifest, base, len(hdr))
	}
	return meta, nil
}

// headerReader is a whole model file of which only the header is known: reads past the
// header see zeros. The GGUF decoder seeks to the end to check tensor bounds; it never
// reads tensor data.
type headerReader struct {
	hdr  []byte
	size int64
	off  int64
}

func (r *headerReader) Read(p []byte) (int, error) {
	if r.off >= r.size {
		return 0, io.EOF
	}
	n := int(min(int64(len(p)), r.size-r.off))
	k := 0
	if r.off < int64(len(r.hdr)) {
		k = copy(p[:n], r.hdr[r.off:])
	}
	clear(p[k:n])
	r.off += int64(n)
	return n, nil
}

func (r *headerReader) Seek(offset int64, whence int) (int64, error) {
	switch whence {
	case io.SeekStart:
	case io.SeekCurrent:
		offset += r.off
	case io.SeekEnd:
		offset += r.size
	default:
		return 0, errors.New("bad whence")
	}
	if offset < 0 {
		return 0, errors.New("negative offset")
	}
	r.off = offset
	return offset, nil
}
