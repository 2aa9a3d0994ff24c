package weights

import (
	"bytes"
	"testing"
)

// FuzzDecodeManifest: manifests come from peers; no input may panic Decode or Parse, and
// whatever decodes encodes back to the same bytes (the ID names one manifest).
func FuzzDecodeManifest(f *testing.F) {
	path, sum := writeModel(f)
	m, err := Build(path, sum)
	if err != nil {
		f.Fatal(err)
	}
	seed, err := m.Encode()
	if err != nil {
		f.Fatal(err)
	}
	f.Add(seed)
	f.Add(seed[:len(seed)/2])
	f.Add([]byte{0x95, 0x01})
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := Decode(b)
		if err != nil {
			return
		}
		again, err := m.Encode()
		if err != nil || !bytes.Equal(again, b) {
			t.Fatalf("decoded manifest encodes to other bytes (%v)", err)
		}
		_, _ = m.Parse()
	})
}
