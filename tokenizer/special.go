package tokenizer

import (
	"cmp"
	"slices"
)

// eotTexts are the texts llama.cpp takes for an end-of-turn token when the file names none,
// and makes control tokens if they are not already.
var eotTexts = []string{"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
	"<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>"}

// specialMatcher cuts special tokens out of a text as llama.cpp's tokenizer_st_partition does,
// in time linear in the text rather than in the text times the number of special tokens:
// one pass with a trie finds every occurrence, and the occurrences are then accepted in
// llama.cpp's order (longest token first, left to right), each only where no accepted one
// already took a byte of it.
type specialMatcher struct {
	nodes []trieNode
	rank  map[int32]int // priority: position in llama.cpp's sorted list of special tokens
	first [256]bool     // bytes a special token starts with
}

type trieNode struct {
	next map[byte]int32
	id   int32 // the token ending here, or None
}

type fragment struct {
	start, end int
	token      int32 // None for raw text
}

type occurrence struct {
	start, end int
	id         int32
	rank       int
}

func newSpecialMatcher(t *Tokenizer) *specialMatcher {
	if t.v.EOT == None {
		for _, s := range eotTexts {
			if id, ok := t.ids[s]; ok {
				t.v.EOT = id
				break
			}
		}
	}
	if t.v.EOM == None {
		if id, ok := t.ids["<|eom_id|>"]; ok {
			t.v.EOM = id
		}
	}
	for _, id := range []int32{t.v.EOT, t.v.EOM} {
		if id != None && t.types[id] != TypeControl {
			t.types[id] = TypeControl
			t.pieces[id] = []byte(t.v.Tokens[id])
		}
		if id != None {
			t.eog[id] = true
		}
	}
	var specials []int32
	for id, typ := range t.types {
		if typ == TypeControl || typ == TypeUserDefined || typ == TypeUnknown {
			specials = append(specials, int32(id))
		}
	}
	slices.SortStableFunc(specials, func(a, b int32) int {
		return cmp.Compare(len(t.v.Tokens[b]), len(t.v.Tokens[a]))
	})
	m := &specialMatcher{nodes: []trieNode{{id: None}}, rank: make(map[int32]int, len(specials))}
	for r, id := range specials {
		m.rank[id] = r
		s := t.v.Tokens[id]
		m.first[s[0]] = true
		n := int32(0)
		for i := 0; i < len(s); i++ {
			if m.nodes[n].next == nil {
				m.nodes[n].next = map[byte]int32{}
			}
			c, ok := m.nodes[n].next[s[i]]
			if !ok {
				c = int32(len(m.nodes))
				m.nodes = append(m.nodes, trieNode{id: None})
				m.nodes[n].next[s[i]] = c
			}
			n = c
		}
		m.nodes[n].id = id
	}
	return m
}

// partition splits text into raw pieces and special tokens. Without parseSpecial only
// user-defined tokens are cut out, as in llama.cpp.
func (m *specialMatcher) partition(text string, parseSpecial bool, types []int32) []fragment {
	if text == "" {
		return nil
	}
	var occ []occurrence
	for i := 0; i < len(text); i++ {
		if !m.first[text[i]] {
			continue
		}
		n := int32(0)
		for j := i; j < len(text); j++ {
			c, ok := m.nodes[n].next[text[j]]
			if !ok {
				break
			}
			n = c
			if id := m.nodes[n].id; id != None {
				if typ := types[id]; parseSpecial || (typ != TypeControl && typ != TypeUnknown) {
					occ = append(occ, occurrence{start: i, end: j + 1, id: id, rank: m.rank[id]})
				}
			}
		}
	}
	if len(occ) == 0 {
		return []fragment{{start: 0, end: len(text), token: None}}
	}
	slices.SortFunc(occ, func(a, b occurrence) int {
		if a.rank != b.rank {
			return cmp.Compare(a.rank, b.rank)
		}
		return cmp.Compare(a.start, b.start)
	})
	taken := make([]bool, len(text))
	var kept []occurrence
	for _, o := range occ {
		free := true
		for k := o.start; k < o.end; k++ {
			if taken[k] {
				free = false
				break
			}
		}
		if !free {
			continue
		}
		for k := o.start; k < o.end; k++ {
			taken[k] = true
		}
		kept = append(kept, o)
	}
	slices.SortFunc(kept, func(a, b occurrence) int { return cmp.Compare(a.start, b.start) })
	frags := make([]fragment, 0, 2*len(kept)+1)
	pos := 0
	for _, o := range kept {
		if o.start > pos {
			frags = append(frags, fragment{start: pos, end: o.start, token: None})
		}
		frags = append(frags, fragment{start: o.start, end: o.end, token: o.id})
		pos = o.end
	}
	if pos < len(text) {
		frags = append(frags, fragment{start: pos, end: len(text), token: None})
	}
	return frags
}
