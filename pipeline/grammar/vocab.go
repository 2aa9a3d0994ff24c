package grammar

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	mathbits "math/bits"
	"slices"
	"sync"
)

// Vocab is a model's vocabulary as the matcher sees it: each token's bytes, laid out as a
// trie in depth-first order so that one walk tests every token against a state while
// sharing the work of common prefixes, and skipping a whole subtree at the first byte a
// state rejects. Build it once per model; it is immutable and safe to share.
type Vocab struct {
	size  int
	eos   []int32
	bytes [][]byte
	all   trie

	// Inside a string, most tokens are plain text whatever the state around the string:
	// strPlain holds them, and only the tokens with a quote or a backslash (quoted) need a
	// walk. This turns the costliest state, a string's contents, into the cheapest.
	strPlain []uint64
	quoted   trie
}

// trie is a set of tokens, one entry per node in depth-first order (children by byte).
type trie struct {
	nb    []byte   // the byte that leads to the node
	depth []uint16 // 1 for children of the root
	end   []int32  // one past the node's subtree
	tok   []int32  // a token spelled by the path to the node, or -1
	more  map[int32][]int32
	maxD  int
}

// NewVocab builds the trie of tokens (indexed by id). A token with no bytes (control tokens,
// which are not text) is never allowed; eos are the tokens that end a generation, allowed
// exactly when the grammar is complete.
func NewVocab(tokens [][]byte, eos []int32) *Vocab {
	v := &Vocab{size: len(tokens), eos: slices.Clone(eos), bytes: tokens}
	var ids, quoted []int32
	v.strPlain = make([]uint64, (len(tokens)+63)/64)
	str := &node{kind: kString, maxN: -1}
	outer := &link{f: frame{n: &node{kind: kSeq}}}
	var buf []stack
	for id, b := range tokens {
		if len(b) == 0 || len(b) > math.MaxUint16 || slices.Contains(eos, int32(id)) {
			continue
		}
		ids = append(ids, int32(id))
		if bytes.ContainsAny(b, "\\\"") {
			quoted = append(quoted, int32(id))
			continue
		}
		cur := append(buf[:0], stack{top: frame{n: str, st: strIn}, rest: outer})
		for _, c := range b {
			if cur = advance(cur, c, cur[len(cur):]); len(cur) == 0 {
				break
			}
		}
		if len(cur) > 0 {
			v.strPlain[id/64] |= 1 << (uint(id) % 64)
		}
	}
	v.all = buildTrie(tokens, ids)
	v.quoted = buildTrie(tokens, quoted)
	return v
}

func buildTrie(tokens [][]byte, ids []int32) trie {
	ids = slices.Clone(ids)
	slices.SortFunc(ids, func(a, b int32) int {
		if c := bytes.Compare(tokens[a], tokens[b]); c != 0 {
			return c
		}
		return int(a - b)
	})
	t := trie{more: map[int32][]int32{}}
	// Sorted strings list the trie in preorder: each string adds the nodes for its prefixes
	// longer than what it shares with the string before it.
	var path []int32 // node index at each depth on the current path
	var prev []byte
	for _, id := range ids {
		b := tokens[id]
		common := 0
		for common < len(prev) && common < len(b) && prev[common] == b[common] {
			common++
		}
		// Close the subtrees of the nodes that leave the path.
		for d := len(path); d > common; d-- {
			t.end[path[d-1]] = int32(len(t.nb))
		}
		path = path[:common]
		for d := common; d < len(b); d++ {
			path = append(path, int32(len(t.nb)))
			t.nb = append(t.nb, b[d])
			t.depth = append(t.depth, uint16(d+1))
			t.end = append(t.end, 0)
			t.tok = append(t.tok, -1)
		}
		last := path[len(b)-1]
		if t.tok[last] < 0 {
			t.tok[last] = id
		} else {
			t.more[last] = append(t.more[last], id)
		}
		t.maxD = max(t.maxD, len(b))
		prev = b
	}
	for _, p := range path {
		t.end[p] = int32(len(t.nb))
	}
	return t
}

// Size is the vocabulary's size: the length of the logits.
func (v *Vocab) Size() int { return v.size }

// Constraint is a grammar over one vocabulary. It caches the mask of every state it has
// computed (bounded), so generations with the same grammar share the work; it is safe for
// concurrent use.
type Constraint struct {
	g *Grammar
	v *Vocab

	mu      sync.Mutex
	cache   map[string]*entry
	maxKeep int
}

type entry struct {
	mask   []uint64
	growth int // the largest minBytes any allowed token leaves: budgets at least this need no walk
}

// maskCacheBytes bounds the masks one Constraint keeps.
const maskCacheBytes = 8 << 20

// NewConstraint pairs a grammar with a vocabulary.
func NewConstraint(g *Grammar, v *Vocab) *Constraint {
	words := (v.size + 63) / 64
	return &Constraint{g: g, v: v, cache: map[string]*entry{}, maxKeep: max(16, maskCacheBytes/(8*max(words, 1)))}
}

// Matcher follows one generation through the grammar. It is not safe for concurrent use.
type Matcher struct {
	c      *Constraint
	stacks []stack
	key    []byte
	lvl    [][]stack
	buf    []uint64
	tmp    []stack
}

// Matcher starts a generation at the beginning of the grammar.
func (c *Constraint) Matcher() *Matcher {
	return &Matcher{c: c, stacks: []stack{{top: frame{n: c.g.root}}}}
}

// ErrRejected is a token the grammar does not allow here.
var ErrRejected = errors.New("token not allowed by the grammar")

// Accept advances past token id, which must be allowed (an EOS token only when Complete).
func (m *Matcher) Accept(id int32) error {
	if id < 0 || int(id) >= m.c.v.size {
		return fmt.Errorf("%w: token %d outside the vocabulary", ErrRejected, id)
	}
	if slices.Contains(m.c.v.eos, id) {
		if !m.Complete() {
			return fmt.Errorf("%w: end of generation before the JSON is complete", ErrRejected)
		}
		return nil
	}
	b := m.c.v.bytes[id]
	if len(b) == 0 {
		return fmt.Errorf("%w: token %d is not text", ErrRejected, id)
	}
	cur := m.stacks
	for _, c := range b {
		next := advance(cur, c, nil)
		if len(next) == 0 {
			return fmt.Errorf("%w: token %d (%q)", ErrRejected, id, b)
		}
		cur = next
	}
	m.stacks = cur
	return nil
}

func advance(in []stack, c byte, out []stack) []stack {
	for _, s := range in {
		out = feed(s, c, out)
		if len(out) > maxAlts {
			out = out[:maxAlts]
		}
	}
	return out
}

// Complete reports whether the text so far is a whole match: the end may come now.
func (m *Matcher) Complete() bool {
	for _, s := range m.stacks {
		if complete(s) {
			return true
		}
	}
	return false
}

// MinBytes is the fewest bytes that complete the match from here.
func (m *Matcher) MinBytes() int { return minBytesAll(m.stacks) }

func minBytesAll(ss []stack) int {
	best := inf
	for _, s := range ss {
		best = min(best, minBytes(s))
	}
	return best
}

// Mask returns the tokens allowed next as a bitset over the vocabulary (bit id%64 of word
// id/64), read-only and valid until the next call. budget > 0 is how many tokens the
// generation may still produce, this one included: a token is allowed only if the match
// can still be completed, one byte per token, in what is left after it. When even that is
// not possible, only the tokens that bring the end closest are allowed, so that a
// generation cut short by max_tokens still most often ends with complete JSON.
func (m *Matcher) Mask(budget int) []uint64 {
	c := m.c
	m.key = stateKey(m.key[:0], m.stacks)
	c.mu.Lock()
	e := c.cache[string(m.key)]
	c.mu.Unlock()
	if e == nil {
		e = &entry{}
		e.mask, e.growth, _ = m.compute(nil, -1)
		c.mu.Lock()
		if len(c.cache) >= c.maxKeep {
			clear(c.cache)
		}
		c.cache[string(m.key)] = e
		c.mu.Unlock()
	}
	if budget <= 0 || budget-1 >= e.growth {
		return e.mask
	}
	var best int
	m.buf, _, best = m.walk(m.buf, &m.c.v.all, budget-1)
	if best > budget-1 {
		m.buf, _, _ = m.walk(m.buf, &m.c.v.all, best)
	}
	return m.buf
}

// compute is the mask with no budget (limit < 0) or with tokens leaving at most limit bytes.
func (m *Matcher) compute(mask []uint64, limit int) ([]uint64, int, int) {
	v := m.c.v
	if limit < 0 && len(m.stacks) == 1 {
		if f := m.stacks[0].top; f.n.kind == kString && f.st == strIn && f.n.minN == 0 && f.n.maxN < 0 {
			mask, growth, best := m.walk(mask, &v.quoted, limit)
			for i, w := range v.strPlain {
				mask[i] |= w
			}
			// A plain token may leave a UTF-8 sequence open: up to 3 more bytes to go.
			return mask, max(growth, minBytes(m.stacks[0])+3), best
		}
	}
	return m.walk(mask, &v.all, limit)
}

// Apply sets every logit the grammar does not allow next to -Inf, in place (see Mask).
func (m *Matcher) Apply(logits []float32, budget int) error {
	if len(logits) != m.c.v.size {
		return fmt.Errorf("grammar: %d logits for a vocabulary of %d", len(logits), m.c.v.size)
	}
	ApplyMask(logits, m.Mask(budget))
	return nil
}

// ApplyMask sets logits whose bit in mask is clear to -Inf.
func ApplyMask(logits []float32, mask []uint64) {
	ninf := float32(math.Inf(-1))
	for w, bits := range mask {
		base := w * 64
		if base >= len(logits) {
			break
		}
		if bits == ^uint64(0) {
			continue
		}
		seg := logits[base:min(base+64, len(logits))]
		if bits == 0 {
			for i := range seg {
				seg[i] = ninf
			}
			continue
		}
		for z := ^bits; z != 0; z &= z - 1 {
			if i := mathbits.TrailingZeros64(z); i < len(seg) {
				seg[i] = ninf
			}
		}
	}
}

// walk computes the mask of the current state over the tokens of t by one depth-first
// pass: with limit >= 0 only tokens that leave at most limit bytes to complete the match.
// It returns the largest and the smallest bytes-to-complete among the tokens it could take.
func (m *Matcher) walk(mask []uint64, t *trie, limit int) ([]uint64, int, int) {
	v := m.c.v
	words := (v.size + 63) / 64
	if cap(mask) < words {
		mask = make([]uint64, words)
	}
	mask = mask[:words]
	clear(mask)
	if len(m.lvl) < t.maxD+1 {
		m.lvl = make([][]stack, t.maxD+1)
	}
	m.lvl[0] = m.stacks
	growth, best := 0, inf
	for i := 0; i < len(t.nb); {
		d := t.depth[i]
		out := advance(m.lvl[d-1], t.nb[i], m.lvl[d][:0])
		m.lvl[d] = out
		if len(out) == 0 {
			i = int(t.end[i])
			continue
		}
		if id := t.tok[i]; id >= 0 {
			mb := minBytesAll(out)
			best = min(best, mb)
			if limit < 0 || mb <= limit {
				growth = max(growth, mb)
				mask[id/64] |= 1 << (uint(id) % 64)
				for _, id2 := range t.more[int32(i)] {
					mask[id2/64] |= 1 << (uint(id2) % 64)
				}
			}
		}
		i++
	}
	if m.Complete() {
		best = 0
		for _, id := range v.eos {
			if id >= 0 && int(id) < v.size {
				mask[id/64] |= 1 << (uint(id) % 64)
			}
		}
	}
	for d := range m.lvl { // drop references to stacks, which hold links
		m.lvl[d] = m.lvl[d][:0]
	}
	return mask, growth, best
}

// stateKey serializes the matcher's stacks: equal keys allow equal tokens.
func stateKey(dst []byte, ss []stack) []byte {
	for _, s := range ss {
		dst = appendFrame(dst, s.top)
		for l := s.rest; l != nil; l = l.next {
			dst = appendFrame(dst, l.f)
		}
		dst = append(dst, 0xff)
	}
	return dst
}

func appendFrame(dst []byte, f frame) []byte {
	dst = binary.AppendUvarint(dst, uint64(f.n.id))
	dst = append(dst, f.st, f.ws)
	dst = binary.AppendUvarint(dst, uint64(uint32(f.a)))
	return binary.AppendUvarint(dst, uint64(uint32(f.b)))
}
