package api

import (
	"encoding/json"
	"testing"
)

// FuzzRequestShapes: the prompt decoder and the unknown-field scan never panic, and a prompt
// they accept is non-empty with non-negative ids.
func FuzzRequestShapes(f *testing.F) {
	for _, s := range []string{`"hi"`, `["a","b"]`, `[1,2,3]`, `[[1],[2,3]]`, `[]`, `[[]]`, `[1,"a"]`, `{"model":"x","prompt":[1]}`, `null`, `[[-1]]`, `[1e20]`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		_ = unknownField(b, completionKeys)
		ps, e := completionPrompts(json.RawMessage(b))
		if e != nil {
			return
		}
		if len(ps) == 0 {
			t.Fatalf("%q: accepted with no prompt", b)
		}
		for _, p := range ps {
			for _, id := range p.ids {
				if id < 0 {
					t.Fatalf("%q: id %d", b, id)
				}
			}
		}
	})
}
