package fetch

import "context"

// Resolve turns any --model value into a local GGUF path: an http(s) URL or hf:// reference
// is downloaded into the cache (or found there), a file is used as is, and anything else is
// an Ollama model name looked up in Ollama's store.
func (f *Fetcher) Resolve(ctx context.Context, model string) (string, error) {
	if IsRemote(model) {
		return f.Fetch(ctx, model)
	}
	return ResolveLocal(model, "")
}
