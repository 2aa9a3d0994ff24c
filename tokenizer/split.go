package tokenizer

import (
	"fmt"
	"strings"

	"github.com/dlclark/regexp2"
)

// A splitter refines a text's word boundaries: given the lengths (in codepoints) of the pieces
// so far, it returns the lengths after splitting each piece further, never joining two.
// llama.cpp's pre-tokenizers are lists of regexes applied one after the other this way.
type splitter interface {
	split(cpts []rune, lens []int) []int
}

// The two pre-tokenizer regexes that nearly every BPE vocabulary uses get hand-written
// splitters, as llama.cpp gives them (its unicode_regex_split_custom_*): faster than any regex
// engine, and Go's has no lookahead for `\s+(?!\S)`.
const (
	reGPT2   = `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)`
	reLlama3 = `(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
	// reQwen2 is Llama 3's with single digits; llama.cpp runs it through std::regex, which the
	// hand-written splitter matches (checked against the regex in the tests).
	reQwen2 = `(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
)

// preTokenizers maps tokenizer.ggml.pre to llama.cpp's regex list for it (llama-vocab.cpp).
var preTokenizers = func() map[string][]string {
	m := map[string][]string{}
	add := func(res []string, names ...string) {
		for _, n := range names {
			m[n] = res
		}
	}
	add([]string{reLlama3}, "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
		"jina-v5-nano", "dbrx", "smaug-bpe", "glm4", "chatglm-bpe")
	add([]string{
		`[\r\n]`,
		`\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+`,
		`\s?[!-/:-~！-／：-～‘-‟　-。]+`,
		`\s+$`,
		`[一-龥ࠀ-一가-퟿]+`,
		`\p{N}+`,
	}, "deepseek-llm")
	add([]string{`[\r\n]`, `\s?\p{L}+`, `\s?\p{P}+`, `[一-龥ࠀ-一가-퟿]+`, `\p{N}`}, "deepseek-coder")
	add([]string{
		`\p{N}{1,3}`,
		`[一-龥぀-ゟ゠-ヿ]+`,
		`[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_` + "`" + `{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`,
	}, "deepseek-v3", "hunyuan-dense", "joyai-llm")
	add([]string{`[\p{P}\$\+<=>\^~\|` + "`" + `]+`, reGPT2, `[0-9][0-9][0-9]`}, "falcon")
	add([]string{`\p{N}`, reGPT2}, "starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b", "mellum2")
	add([]string{reGPT2}, "gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0", "mellum",
		"modern-bert", "jina-v1-en", "jina-v2-code", "roberta-bpe", "mpt", "olmo", "jais", "trillion", "granite-docling", "exaone4")
	add([]string{reQwen2}, "qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan", "solar-open")
	add([]string{`(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`}, "qwen35")
	add([]string{` ?[^(\s|.,!?…。，、।۔،)]+`}, "poro-chat", "bloom", "gpt3-finnish")
	add([]string{` ?[^(\s|.,!?…。，、।۔،)]+`, `\p{N}`}, "viking")
	add([]string{`[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+`}, "tekken")
	add([]string{`[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+`}, "gpt-4o", "llama4", "kanana2", "minimax-m2")
	add([]string{`'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+`}, "bailingmoe", "bailingmoe2", "llada-moe")
	add([]string{`(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+`}, "seed-coder")
	add([]string{reQwen2}, "grok-2")
	add([]string{`\p{N}{1,3}`, `(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`}, "minicpm5")
	add([]string{`[\p{P}\$\+<=>\^~\|]+`, reGPT2, `\p{N}+`, `[0-9][0-9][0-9]`}, "default", "")
	return m
}()

// ignoreMerges lists the pre-tokenizers whose words that are tokens already skip merging.
var ignoreMerges = map[string]bool{"llama3": true, "llama-v3": true, "llama-bpe": true, "falcon3": true, "falcon-h1": true,
	"pixtral": true, "midm-2.0": true, "lfm2": true, "jina-v5-nano": true, "tekken": true, "minicpm5": true}

func newSplitters(res []string) ([]splitter, error) {
	var out []splitter
	for _, re := range res {
		switch re {
		case reGPT2:
			out = append(out, gpt2Splitter{})
		case reLlama3:
			out = append(out, llama3Splitter{digits: 3})
		case reQwen2:
			out = append(out, llama3Splitter{digits: 1})
		default:
			s, err := newRegexSplitter(re)
			if err != nil {
				return nil, err
			}
			out = append(out, s)
		}
	}
	return out, nil
}

// walk calls f on each piece of cpts with its bounds; f appends the new lengths.
func walk(cpts []rune, lens []int, f func(seg []rune, out []int) []int) []int {
	out := make([]int, 0, len(lens)*2)
	start := 0
	for _, n := range lens {
		out = f(cpts[start:start+n], out)
		start += n
	}
	return out
}

const outside = -1 // the codepoint past either end of a piece

func at(seg []rune, i int) rune {
	if i >= 0 && i < len(seg) {
		return seg[i]
	}
	return outside
}

func flagsAt(seg []rune, i int) cptFlags {
	if i >= 0 && i < len(seg) {
		return flagsOf(seg[i])
	}
	return cptFlags{}
}

func lower(r rune) rune {
	if r >= 'A' && r <= 'Z' {
		return r + 'a' - 'A'
	}
	return r
}

// gpt2Splitter is GPT-2's `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)`.
type gpt2Splitter struct{}

func (gpt2Splitter) split(cpts []rune, lens []int) []int {
	return walk(cpts, lens, func(seg []rune, out []int) []int {
		prev := 0
		emit := func(end int) {
			if end > prev {
				out = append(out, end-prev)
			}
			prev = end
		}
		for pos := 0; pos < len(seg); {
			c := seg[pos]
			if c == '\'' && pos+1 < len(seg) {
				n := seg[pos+1]
				if n == 's' || n == 't' || n == 'm' || n == 'd' {
					pos += 2
					emit(pos)
					continue
				}
				if pos+2 < len(seg) {
					nn := seg[pos+2]
					if (n == 'r' && nn == 'e') || (n == 'v' && nn == 'e') || (n == 'l' && nn == 'l') {
						pos += 3
						emit(pos)
						continue
					}
				}
			}
			f := flagsOf(c)
			f2 := f
			if c == ' ' {
				f2 = flagsAt(seg, pos+1)
			}
			if f2.letter() || f2.number() {
				cls := f2.cls
				if c == ' ' {
					pos++
				}
				for flagsAt(seg, pos).cls == cls {
					pos++
				}
				emit(pos)
				continue
			}
			if !f2.space && f2.cls != 0 && !f2.letter() && !f2.number() {
				if c == ' ' {
					pos++
				}
				for {
					g := flagsAt(seg, pos)
					if g.space || g.letter() || g.number() || g.cls == 0 {
						break
					}
					pos++
				}
				emit(pos)
				continue
			}
			ws := 0
			for flagsAt(seg, pos+ws).space {
				ws++
			}
			pos = spacesEnd(seg, pos, ws)
			emit(pos)
		}
		return out
	})
}

// spacesEnd is where the last alternatives of the GPT-2 family's regexes end a piece at pos
// with ws spaces ahead: \s+(?!\S) keeps the last space for the word after it, \s+ takes a
// run at the end, and anything else is one codepoint.
func spacesEnd(seg []rune, pos, ws int) int {
	switch {
	case ws > 1 && pos+ws < len(seg):
		return pos + ws - 1
	case ws > 0:
		return pos + ws
	}
	return pos + 1
}

// llama3Splitter is Llama 3's pre-tokenizer regex, with runs of up to digits digits.
type llama3Splitter struct{ digits int }

func (s llama3Splitter) split(cpts []rune, lens []int) []int {
	return walk(cpts, lens, func(seg []rune, out []int) []int {
		prev := 0
		emit := func(end int) {
			if end > prev {
				out = append(out, end-prev)
			}
			prev = end
		}
		for pos := 0; pos < len(seg); {
			c := seg[pos]
			f := flagsOf(c)
			if c == '\'' && pos+1 < len(seg) {
				n := lower(seg[pos+1])
				if n == 's' || n == 't' || n == 'm' || n == 'd' {
					pos += 2
					emit(pos)
					continue
				}
				if pos+2 < len(seg) {
					nn := lower(seg[pos+2])
					if (n == 'r' && nn == 'e') || (n == 'v' && nn == 'e') || (n == 'l' && nn == 'l') {
						pos += 3
						emit(pos)
						continue
					}
				}
			}
			// [^\r\n\p{L}\p{N}]?\p{L}+
			if c != '\r' && c != '\n' && !f.number() {
				if f.letter() || flagsAt(seg, pos+1).letter() {
					pos++
					for flagsAt(seg, pos).letter() {
						pos++
					}
					emit(pos)
					continue
				}
			}
			// \p{N}{1,digits}
			if f.number() {
				ini := pos
				for flagsAt(seg, pos).number() {
					pos++
					if pos-ini >= s.digits {
						emit(pos)
						ini = pos
					}
				}
				emit(pos)
				continue
			}
			// ` ?[^\s\p{L}\p{N}]+[\r\n]*`
			f2 := f
			if c == ' ' {
				f2 = flagsAt(seg, pos+1)
			}
			if !f2.space && !f2.letter() && !f2.number() && f2.cls != 0 {
				if c == ' ' {
					pos++
				}
				for {
					g := flagsAt(seg, pos)
					if g.space || g.letter() || g.number() || g.cls == 0 {
						break
					}
					pos++
				}
				for c2 := at(seg, pos); c2 == '\r' || c2 == '\n'; c2 = at(seg, pos) {
					pos++
				}
				emit(pos)
				continue
			}
			ws, lastNL := 0, 0
			for flagsAt(seg, pos+ws).space {
				if c2 := seg[pos+ws]; c2 == '\r' || c2 == '\n' {
					lastNL = pos + ws + 1
				}
				ws++
			}
			if lastNL > 0 { // \s*[\r\n]+
				pos = lastNL
				emit(pos)
				continue
			}
			pos = spacesEnd(seg, pos, ws)
			emit(pos)
		}
		return out
	})
}

// regexSplitter runs one of llama.cpp's regexes the way its unicode_regex_split does with
// std::regex: a regex that names a Unicode category runs on a "collapsed" text, where every
// codepoint past ASCII stands as one placeholder for its category and each \p{..} as that
// placeholder plus the ASCII members llama.cpp lists; one that names none runs on the
// codepoints themselves. In both, whitespace past ASCII reads as \v, and \s is ASCII's.
type regexSplitter struct {
	re        *regexp2.Regexp
	collapsed bool
}

// Placeholders of the collapsed text, as llama.cpp picks them.
const (
	phOther  = 0xD0
	phNumber = 0xD1
	phLetter = 0xD2
	phPunct  = 0xD3
	phMark   = 0xD4
	phSymbol = 0xD5
)

var categoryClass = map[string]string{
	`\p{N}`: `\u00D10-9`,
	`\p{L}`: `\u00D2A-Za-z`,
	`\p{P}`: `\u00D3!-#%-*,-/:-;?-@\[-\]_\{\}`,
	`\p{M}`: `\u00D4`,
	`\p{S}`: `\u00D5\$\+<-=>\^` + "`" + `\|`,
}

const asciiSpace = `\t\n\v\f\r `

func newRegexSplitter(expr string) (*regexSplitter, error) {
	collapsed := false
	for k := range categoryClass {
		if strings.Contains(expr, k) {
			collapsed = true
		}
	}
	var b strings.Builder
	inside := false
	for i := 0; i < len(expr); i++ {
		c := expr[i]
		switch {
		case c == '\\' && i+1 < len(expr):
			if i+4 < len(expr) && expr[i+1] == 'p' && expr[i+2] == '{' && expr[i+4] == '}' {
				if cls, ok := categoryClass[expr[i:i+5]]; ok {
					if inside {
						b.WriteString(cls)
					} else {
						b.WriteString("[" + cls + "]")
					}
					i += 4
					continue
				}
			}
			switch expr[i+1] {
			case 's':
				if inside {
					b.WriteString(asciiSpace)
				} else {
					b.WriteString("[" + asciiSpace + "]")
				}
			case 'S':
				if inside {
					return nil, fmt.Errorf("pre-tokenizer regex %q: \\S inside a class is not supported", expr)
				}
				b.WriteString("[^" + asciiSpace + "]")
			case 'd':
				if inside {
					b.WriteString("0-9")
				} else {
					b.WriteString("[0-9]")
				}
			default:
				b.WriteByte(c)
				b.WriteByte(expr[i+1])
			}
			i++
		case c == '[' && !inside:
			inside = true
			b.WriteByte(c)
		case c == ']' && inside:
			inside = false
			b.WriteByte(c)
		case c == '$' && !inside:
			b.WriteString(`\z`)
		default:
			b.WriteByte(c)
		}
	}
	re, err := regexp2.Compile(b.String(), regexp2.None)
	if err != nil {
		return nil, fmt.Errorf("pre-tokenizer regex %q: %w", expr, err)
	}
	return &regexSplitter{re: re, collapsed: collapsed}, nil
}

func (s *regexSplitter) split(cpts []rune, lens []int) []int {
	text := make([]rune, len(cpts))
	for i, r := range cpts {
		switch {
		case r < 128:
			text[i] = r
		case isSpace(r):
			text[i] = '\v'
		case !s.collapsed:
			text[i] = r
		default:
			switch flagsOf(r).cls {
			case clsNumber:
				text[i] = phNumber
			case clsLetter:
				text[i] = phLetter
			case clsPunct:
				text[i] = phPunct
			case clsMark:
				text[i] = phMark
			case clsSymbol:
				text[i] = phSymbol
			default:
				text[i] = phOther
			}
		}
	}
	start := 0
	out := make([]int, 0, len(lens)*2)
	for _, n := range lens {
		seg := text[start : start+n]
		prev := 0
		m, err := s.re.FindRunesMatch(seg)
		for err == nil && m != nil {
			if m.Index > prev {
				out = append(out, m.Index-prev)
			}
			if m.Length > 0 {
				out = append(out, m.Length)
			}
			prev = m.Index + m.Length
			m, err = s.re.FindNextMatch(m)
		}
		if prev < n {
			out = append(out, n-prev)
		}
		start += n
	}
	return out
}
