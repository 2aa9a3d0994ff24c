package tokenizer

import (
	"strings"
	"unicode"
	"unicode/utf8"

	"golang.org/x/text/unicode/norm"
)

// wpm is llama.cpp's llm_tokenizer_wpm_session: normalize, split on whitespace and
// punctuation, then take the longest token from the left of each word ("▁" marks a word's
// start in the GGUF vocabulary); a word with a piece no token spells is the unknown token.
func (e *encoder) wpm(text string) error {
	t := e.t
	for _, w := range t.wpmWords(text) {
		if err := e.check(len(w)); err != nil {
			return err
		}
		word := "▁" + w
		before := len(e.out)
		for i := 0; i < len(word); {
			found := false
			for j := min(len(word), i+t.maxTokLen+1); j > i; j-- {
				if id, ok := t.ids[word[i:j]]; ok {
					e.out = append(e.out, id)
					i = j
					found = true
					break
				}
			}
			if !found {
				e.out = e.out[:before]
				break
			}
		}
		if len(e.out) == before {
			e.out = append(e.out, t.v.UNK)
		}
	}
	return nil
}

func (t *Tokenizer) wpmWords(text string) []string {
	var words []string
	var cur strings.Builder
	flush := func() {
		if cur.Len() > 0 {
			words = append(words, cur.String())
			cur.Reset()
		}
	}
	for i := 0; i < len(text); {
		r, n := utf8.DecodeRuneInString(text[i:])
		i += n
		if t.v.StripAccents {
			r = nfdFirst(r)
		}
		f := flagsOf(r)
		if f.space {
			flush()
			continue
		}
		if r == 0 || r == utf8.RuneError || f.cls == clsControl {
			continue
		}
		if t.v.StripAccents && f.cls == clsMark {
			continue
		}
		if t.v.Lowercase {
			r = unicode.ToLower(r)
		}
		if f.cls == clsPunct || (r < 0x7F && f.cls == clsSymbol) || isChinese(r) {
			flush()
			cur.WriteRune(r)
			flush()
			continue
		}
		cur.WriteRune(r)
	}
	flush()
	return words
}

// nfdFirst is the first codepoint of r's canonical decomposition: llama.cpp's NFD table keeps
// only that one.
func nfdFirst(r rune) rune {
	if r < 0xC0 {
		return r
	}
	var buf [utf8.UTFMax]byte
	n := utf8.EncodeRune(buf[:], r)
	d := norm.NFD.Bytes(buf[:n])
	f, _ := utf8.DecodeRune(d)
	return f
}

func isChinese(r rune) bool {
	return (r >= 0x4E00 && r <= 0x9FFF) || (r >= 0x3400 && r <= 0x4DBF) || (r >= 0x20000 && r <= 0x2A6DF) ||
		(r >= 0x2A700 && r <= 0x2B73F) || (r >= 0x2B740 && r <= 0x2B81F) || (r >= 0x2B920 && r <= 0x2CEAF) ||
		(r >= 0xF900 && r <= 0xFAFF) || (r >= 0x2F800 && r <= 0x2FA1F)
}
