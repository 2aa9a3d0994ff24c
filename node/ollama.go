package node

import "github.com/strata-llm/strata/fetch"

// ResolveModel turns --model into a GGUF path (see fetch.ResolveLocal).
func ResolveModel(model, ollamaDir string) (string, error) {
	return fetch.ResolveLocal(model, ollamaDir)
}

func defaultModel() (string, error) { return fetch.DefaultModel() }
