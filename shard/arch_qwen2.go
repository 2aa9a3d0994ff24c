package shard

import "github.com/ollama/ollama/fs"

// qwen2 is Qwen 2 and 2.5: llama's block with biases on the Q, K and V projections (bound
// wherever the file has them) and RoPE on the two halves of each head (NeoX order). As the
// engine's model/models/qwen2.
func newQwen2(c fs.Config) (family, error) {
	f, err := newLlama(c)
	if err != nil {
		return nil, err
	}
	f.(*llama).neox = true
	return f, nil
}
