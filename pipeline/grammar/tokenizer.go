package grammar

import (
	"fmt"

	"github.com/ollama/ollama/tokenizer"
)

// VocabFromTokenizer reads every token's bytes from t. Control tokens (BOS, chat markup)
// are not text and are never allowed; the vocabulary's EOS tokens end a complete match.
func VocabFromTokenizer(t tokenizer.Tokenizer) (*Vocab, error) {
	voc := t.Vocabulary()
	tokens := make([][]byte, len(voc.Values))
	for id := range voc.Values {
		if id < len(voc.Types) && (voc.Types[id] == tokenizer.TOKEN_TYPE_CONTROL || voc.Types[id] == tokenizer.TOKEN_TYPE_UNUSED) {
			continue
		}
		s, err := t.Decode([]int32{int32(id)})
		if err != nil {
			return nil, fmt.Errorf("grammar vocabulary: token %d: %w", id, err)
		}
		tokens[id] = []byte(s)
	}
	return NewVocab(tokens, voc.EOS), nil
}
