package pipeline

import (
	"strings"
	"testing"

	"github.com/strata-llm/strata/internal/testkit"
	"github.com/strata-llm/strata/shard"
)

// byteTokens spells s byte by byte with byte-level BPE's byte tokens (GPT-2's byte-to-unicode
// mapping: printable bytes stand for themselves, the rest for 256 upwards).
func byteTokens(t *testing.T, tok *shard.Tokenizer, s string) []int32 {
	t.Helper()
	printable := func(b int) bool {
		return (b >= '!' && b <= '~') || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff)
	}
	var ids []int32
	for _, b := range []byte(s) {
		r := rune(b)
		if !printable(int(b)) {
			n := 0
			for c := 0; c < int(b); c++ {
				if !printable(c) {
					n++
				}
			}
			r = rune(256 + n)
		}
		id := tok.TokenID(string(r))
		if id < 0 {
			t.Fatalf("no token for byte %#x", b)
		}
		ids = append(ids, id)
	}
	return ids
}

// TestTextStreamUTF8AndStops: a character split over tokens waits for its last byte, a stray
// invalid byte does not hold back what follows, and a possible stop sequence is held until it
// resolves.
func TestTextStreamUTF8AndStops(t *testing.T) {
	tok, err := shard.LoadTokenizer(testkit.TinyModel(t))
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	ts := newTextStream(tok, []string{"STOP"}, func(d Delta) error { got = append(got, d.Text); return nil })
	push := func(s string) {
		for _, id := range byteTokens(t, tok, s) {
			if stop, err := ts.push(id); err != nil || stop {
				t.Fatalf("push %q: stop=%v err=%v", s, stop, err)
			}
		}
	}
	push("é") // two bytes: nothing goes out after the first
	if strings.Join(got, "") != "é" {
		t.Fatalf("after é: %q", got)
	}
	push("\x93ab") // a stray continuation byte, then text
	if strings.Join(got, "") != "é\x93ab" {
		t.Fatalf("after a stray byte: %q", strings.Join(got, ""))
	}
	push("xST") // could be the start of STOP
	if strings.Join(got, "") != "é\x93abx" {
		t.Fatalf("a possible stop sequence went out: %q", strings.Join(got, ""))
	}
	ids := byteTokens(t, tok, "OP")
	if stop, _ := ts.push(ids[0]); stop {
		t.Fatal("stopped early")
	}
	if stop, _ := ts.push(ids[1]); !stop {
		t.Fatal("did not stop at STOP")
	}
	if ts.text() != "é\x93abx" || strings.Join(got, "") != ts.text() {
		t.Fatalf("final %q, streamed %q", ts.text(), strings.Join(got, ""))
	}
}
