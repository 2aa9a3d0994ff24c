// Package tokenizer turns text into a model's token ids and back exactly as llama.cpp does,
// for every vocabulary type a GGUF file declares (tokenizer.ggml.model): SentencePiece
// ("llama"), byte-level BPE ("gpt2", with the pre-tokenizer tokenizer.ggml.pre names) and
// WordPiece ("bert"). It is pure Go, so its tests and fuzz targets build without ggml.
package tokenizer

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
)

// Token types as GGUF stores them in tokenizer.ggml.token_type.
const (
	TypeUndefined   int32 = 0
	TypeNormal      int32 = 1
	TypeUnknown     int32 = 2
	TypeControl     int32 = 3
	TypeUserDefined int32 = 4
	TypeUnused      int32 = 5
	TypeByte        int32 = 6
)

// None marks a special token the vocabulary does not have.
const None int32 = -1

// Vocab is a vocabulary as a GGUF file's tokenizer.ggml.* keys give it.
type Vocab struct {
	Model  string // tokenizer.ggml.model: "llama", "gpt2" or "bert"
	Pre    string // tokenizer.ggml.pre, for "gpt2"
	Tokens []string
	Scores []float32 // may be nil
	Types  []int32   // may be nil: every token is normal
	Merges []string  // "left right", by rank, for "gpt2"

	BOS, EOS, UNK, SEP, EOT, EOM int32   // None where absent
	EOG                          []int32 // more ids that end a generation (tokenizer.ggml.eos_token_ids)
	AddBOS, AddEOS, AddSEP       bool
	AddSpacePrefix               bool // SentencePiece: a space before the text
	Lowercase, StripAccents      bool // WordPiece normalizer
}

type kind uint8

const (
	kindSPM kind = iota
	kindBPE
	kindWPM
)

// Tokenizer encodes and decodes with one vocabulary. It is safe for concurrent use.
type Tokenizer struct {
	v      Vocab
	kind   kind
	ids    map[string]int32 // token text -> id, the last id of a text winning as in llama.cpp
	types  []int32
	pieces [][]byte // the bytes each id decodes to
	eog    map[int32]bool

	special *specialMatcher

	// BPE
	split     []splitter
	ignore    bool             // words that are tokens skip merging (Llama 3)
	merges    map[uint64]merge // (left sym, right sym) -> rank and result
	syms      map[string]int32 // symbol text -> symbol id: token ids, then merge parts that are no token
	symText   []string         // symbol id -> text, past len(Tokens)
	byteSym   [256]int32       // the symbol of each byte's GPT-2 character
	maxTokLen int              // WordPiece: the longest token, in bytes
	spmWords  bool             // SentencePiece: merge word by word (see spmWords)
}

type merge struct {
	rank   int32
	result int32
}

// New builds a tokenizer for v.
func New(v Vocab) (*Tokenizer, error) {
	n := len(v.Tokens)
	if n == 0 {
		return nil, errors.New("tokenizer: the vocabulary has no tokens")
	}
	if v.Types != nil && len(v.Types) != n {
		return nil, fmt.Errorf("tokenizer: %d token types for %d tokens", len(v.Types), n)
	}
	if v.Scores != nil && len(v.Scores) != n {
		return nil, fmt.Errorf("tokenizer: %d scores for %d tokens", len(v.Scores), n)
	}
	t := &Tokenizer{v: v, ids: make(map[string]int32, n), types: make([]int32, n), eog: map[int32]bool{}}
	switch v.Model {
	case "llama":
		t.kind = kindSPM
	case "gpt2":
		t.kind = kindBPE
	case "bert":
		t.kind = kindWPM
	default:
		return nil, fmt.Errorf("tokenizer: unsupported tokenizer model %q", v.Model)
	}
	if slices.Contains(v.Tokens, "") {
		t.v.Tokens = slices.Clone(v.Tokens) // empty tokens get names; the caller's slice stays
	}
	for i, s := range t.v.Tokens {
		if s == "" {
			s = "[EMPTY_" + strconv.Itoa(i) + "]"
			t.v.Tokens[i] = s
		}
		t.ids[s] = int32(i)
		t.types[i] = TypeNormal
		if v.Types != nil {
			t.types[i] = v.Types[i]
		}
		t.maxTokLen = max(t.maxTokLen, len(s))
	}
	for _, p := range []*int32{&t.v.BOS, &t.v.EOS, &t.v.UNK, &t.v.SEP, &t.v.EOT, &t.v.EOM} {
		if *p < 0 || int(*p) >= n {
			*p = None
		}
	}
	for _, id := range append([]int32{t.v.EOS, t.v.EOT, t.v.EOM}, v.EOG...) {
		if id >= 0 && int(id) < n {
			t.eog[id] = true
		}
	}
	if t.kind == kindBPE {
		res, ok := preTokenizers[v.Pre]
		if !ok {
			return nil, fmt.Errorf("tokenizer: unknown pre-tokenizer %q", v.Pre)
		}
		var err error
		if t.split, err = newSplitters(res); err != nil {
			return nil, err
		}
		t.ignore = ignoreMerges[v.Pre]
		if err := t.loadMerges(); err != nil {
			return nil, err
		}
	}
	if t.kind == kindSPM {
		t.spmWords = spmWords(t.v.Tokens)
	}
	t.pieces = make([][]byte, n)
	for i := range n {
		t.pieces[i] = t.piece(int32(i))
	}
	t.special = newSpecialMatcher(t)
	return t, nil
}

func (t *Tokenizer) loadMerges() error {
	t.syms = make(map[string]int32, len(t.ids))
	for s, id := range t.ids {
		t.syms[s] = id
	}
	sym := func(s string) int32 {
		if id, ok := t.syms[s]; ok {
			return id
		}
		id := int32(len(t.v.Tokens) + len(t.symText))
		t.symText = append(t.symText, s)
		t.syms[s] = id
		return id
	}
	t.merges = make(map[uint64]merge, len(t.v.Merges))
	for rank, m := range t.v.Merges {
		// llama.cpp cuts at the first space past the first byte, so a part may start with one.
		i := strings.IndexByte(m[min(1, len(m)):], ' ')
		var a, b string
		if i >= 0 {
			i += min(1, len(m))
			a, b = m[:i], m[i+1:]
		}
		l, r := sym(a), sym(b)
		key := uint64(uint32(l))<<32 | uint64(uint32(r))
		if _, dup := t.merges[key]; !dup { // the first rank stays, as with emplace
			t.merges[key] = merge{rank: int32(rank), result: sym(a + b)}
		}
	}
	for b := range 256 {
		t.byteSym[b] = sym(byteToPiece[b])
	}
	return nil
}

// symString is the text of a BPE symbol id.
func (t *Tokenizer) symString(id int32) string {
	if int(id) < len(t.v.Tokens) {
		return t.v.Tokens[id]
	}
	return t.symText[int(id)-len(t.v.Tokens)]
}

// piece is what id decodes to: llama.cpp's token_to_piece with special tokens rendered.
func (t *Tokenizer) piece(id int32) []byte {
	text := t.v.Tokens[id]
	switch typ := t.types[id]; typ {
	case TypeControl, TypeUnknown, TypeUserDefined:
		return []byte(text)
	case TypeByte:
		if b, ok := parseByteToken(text); ok {
			return []byte{b}
		}
		return nil
	case TypeNormal:
		switch t.kind {
		case kindSPM, kindWPM:
			return []byte(strings.ReplaceAll(text, "▁", " "))
		default:
			out := make([]byte, 0, len(text))
			for _, r := range text {
				if b, ok := runeToByte[r]; ok {
					out = append(out, b)
				} else {
					out = append(out, string(r)...)
				}
			}
			return out
		}
	}
	return nil // unused and undefined tokens decode to nothing, as in llama.cpp
}

func parseByteToken(s string) (byte, bool) {
	if len(s) != 6 || !strings.HasPrefix(s, "<0x") || s[5] != '>' {
		return 0, false
	}
	v, err := strconv.ParseUint(s[3:5], 16, 8)
	return byte(v), err == nil
}

// Size is the number of tokens in the vocabulary.
func (t *Tokenizer) Size() int { return len(t.v.Tokens) }

// Vocab returns the vocabulary the tokenizer was built from; callers must not change it.
func (t *Tokenizer) Vocab() *Vocab { return &t.v }

// Token is the text of id as the vocabulary stores it ("" for an id outside it).
func (t *Tokenizer) Token(id int32) string {
	if id < 0 || int(id) >= len(t.v.Tokens) {
		return ""
	}
	return t.v.Tokens[id]
}

// TokenID is the id of a token's text as the vocabulary stores it, or None.
func (t *Tokenizer) TokenID(text string) int32 {
	if id, ok := t.ids[text]; ok {
		return id
	}
	return None
}

// Type is the token type of id (TypeUndefined outside the vocabulary).
func (t *Tokenizer) Type(id int32) int32 {
	if id < 0 || int(id) >= len(t.types) {
		return TypeUndefined
	}
	return t.types[id]
}

// IsControl reports whether id is a control token: markup such as BOS or a chat header.
func (t *Tokenizer) IsControl(id int32) bool { return t.Type(id) == TypeControl }

// IsEOG reports whether id ends a generation: EOS, EOT, EOM or one of tokenizer.ggml.eos_token_ids.
func (t *Tokenizer) IsEOG(id int32) bool { return t.eog[id] }

// TokenBytes is what id decodes to on its own; special tokens give their text. The slice is
// shared: callers must not change it.
func (t *Tokenizer) TokenBytes(id int32) []byte {
	if id < 0 || int(id) >= len(t.pieces) {
		return nil
	}
	return t.pieces[id]
}

// Decode concatenates the bytes of ids: the exact inverse of Encode with special tokens
// parsed, except that SentencePiece's space prefix stays (see DecodeText). A text cut in the
// middle of a character ends in an incomplete UTF-8 sequence.
func (t *Tokenizer) Decode(ids []int32) (string, error) {
	n := 0
	for _, id := range ids {
		if id < 0 || int(id) >= len(t.pieces) {
			return "", fmt.Errorf("detokenize: token id %d outside the vocabulary of %d", id, len(t.pieces))
		}
		n += len(t.pieces[id])
	}
	var b strings.Builder
	b.Grow(n)
	for _, id := range ids {
		b.Write(t.pieces[id])
	}
	return b.String(), nil
}

// DecodeText is Decode less the space SentencePiece put before the text, unless a leading
// BOS is there, as llama.cpp's detokenize does: decode(encode(s)) == s.
func (t *Tokenizer) DecodeText(ids []int32) (string, error) {
	s, err := t.Decode(ids)
	if err != nil || !(t.kind == kindSPM && t.v.AddSpacePrefix) || len(ids) == 0 || ids[0] == t.v.BOS {
		return s, err
	}
	return strings.TrimPrefix(s, " "), nil
}

// Encode tokenizes text, adding BOS/EOS as the vocabulary asks when addSpecial is set and
// parsing control tokens written in the text (as a rendered chat template holds them).
func (t *Tokenizer) Encode(text string, addSpecial bool) ([]int32, error) {
	return t.Tokenize(context.Background(), text, Options{AddSpecial: addSpecial, ParseSpecial: true})
}

// EncodeContext is Encode that stops with ctx's error when ctx ends first.
func (t *Tokenizer) EncodeContext(ctx context.Context, text string, addSpecial bool) ([]int32, error) {
	return t.Tokenize(ctx, text, Options{AddSpecial: addSpecial, ParseSpecial: true})
}

// Options are llama_tokenize's flags, and a bound.
type Options struct {
	AddSpecial   bool // BOS/EOS (CLS/SEP for WordPiece) as the vocabulary asks
	ParseSpecial bool // control tokens written in the text become those tokens
	// MaxTokens stops with ErrTooManyTokens once the output passes this many (0: no bound).
	MaxTokens int
}

// ErrTooManyTokens is returned when a text tokenizes to more than Options.MaxTokens.
var ErrTooManyTokens = errors.New("too many tokens")

// Tokenize is llama.cpp's llama_tokenize.
func (t *Tokenizer) Tokenize(ctx context.Context, text string, o Options) ([]int32, error) {
	e := &encoder{t: t, ctx: ctx, max: o.MaxTokens}
	frags := t.special.partition(text, o.ParseSpecial, t.types)
	e.out = make([]int32, 0, len(text)/3+4)
	switch t.kind {
	case kindSPM:
		if o.AddSpecial && t.v.AddBOS && t.v.BOS != None {
			e.out = append(e.out, t.v.BOS)
		}
		prevSpecial := true
		for _, f := range frags {
			if f.token != None {
				e.out = append(e.out, f.token)
				prevSpecial = true
				continue
			}
			s := text[f.start:f.end]
			if t.v.AddSpacePrefix && prevSpecial {
				s = " " + s
			}
			if err := e.spm(strings.ReplaceAll(s, " ", "▁")); err != nil {
				return nil, err
			}
			prevSpecial = false
		}
		if o.AddSpecial && t.v.AddEOS && t.v.EOS != None {
			e.out = append(e.out, t.v.EOS)
		}
	case kindBPE:
		if o.AddSpecial && t.v.AddBOS && t.v.BOS != None {
			e.out = append(e.out, t.v.BOS)
		}
		for _, f := range frags {
			if f.token != None {
				e.out = append(e.out, f.token)
				continue
			}
			if err := e.bpe(text[f.start:f.end]); err != nil {
				return nil, err
			}
		}
		if o.AddSpecial && t.v.AddEOS && t.v.EOS != None {
			e.out = append(e.out, t.v.EOS)
		}
	case kindWPM:
		if o.AddSpecial && t.v.BOS != None {
			e.out = append(e.out, t.v.BOS)
		}
		for _, f := range frags {
			if f.token != None {
				e.out = append(e.out, f.token)
				continue
			}
			if err := e.wpm(text[f.start:f.end]); err != nil {
				return nil, err
			}
		}
		if o.AddSpecial && t.v.SEP != None {
			e.out = append(e.out, t.v.SEP)
		}
	}
	if e.max > 0 && len(e.out) > e.max {
		return nil, fmt.Errorf("%w: more than %d", ErrTooManyTokens, e.max)
	}
	return e.out, nil
}

// encoder is the state of one Tokenize call.
type encoder struct {
	t     *Tokenizer
	ctx   context.Context
	max   int
	out   []int32
	work  int               // units of work since ctx was last looked at
	words map[string][2]int // BPE: where each word's ids already are in out
}

// check looks at ctx and the bound now and then, so neither costs much.
func (e *encoder) check(units int) error {
	e.work += units
	if e.work < 4096 {
		return nil
	}
	e.work = 0
	if err := e.ctx.Err(); err != nil {
		return fmt.Errorf("tokenize: %w", err)
	}
	if e.max > 0 && len(e.out) > e.max {
		return fmt.Errorf("%w: more than %d", ErrTooManyTokens, e.max)
	}
	return nil
}
