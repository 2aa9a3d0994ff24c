package fetch

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// ollamaModelMedia is the manifest layer that holds the GGUF weights.
const ollamaModelMedia = "application/vnd.ollama.image.model"

// OllamaModelsDir is where Ollama keeps its store: $OLLAMA_MODELS, else ~/.ollama/models.
func OllamaModelsDir() (string, error) {
	if d := os.Getenv("OLLAMA_MODELS"); d != "" {
		return d, nil
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return "", fmt.Errorf("find ollama models: %w", err)
	}
	return filepath.Join(home, ".ollama", "models"), nil
}

// ResolveLocal turns --model into a GGUF path without the network: an existing file as is,
// otherwise an Ollama model name ("llama3.3:70b", "user/model:tag", "host/ns/model:tag") looked
// up in the store at ollamaDir (default OllamaModelsDir()).
func ResolveLocal(model, ollamaDir string) (string, error) {
	if st, err := os.Stat(model); err == nil && !st.IsDir() {
		return model, nil
	}
	if strings.HasSuffix(model, ".gguf") || strings.ContainsAny(model, `\`) || strings.HasPrefix(model, ".") || strings.HasPrefix(model, "/") {
		return "", fmt.Errorf("model file %s: %w", model, os.ErrNotExist)
	}
	if ollamaDir == "" {
		var err error
		if ollamaDir, err = OllamaModelsDir(); err != nil {
			return "", err
		}
	}
	return resolveOllama(model, ollamaDir)
}

func resolveOllama(name, dir string) (string, error) {
	host, ns, model, tag, err := parseOllamaName(name)
	if err != nil {
		return "", err
	}
	manifest := filepath.Join(dir, "manifests", host, ns, model, tag)
	b, err := os.ReadFile(manifest)
	if errors.Is(err, os.ErrNotExist) {
		return "", fmt.Errorf("model %q is neither a file nor in the Ollama store at %s (run `ollama pull %s` or pass a GGUF path)", name, dir, name)
	}
	if err != nil {
		return "", fmt.Errorf("read ollama manifest: %w", err)
	}
	var m struct {
		Layers []struct {
			MediaType string `json:"mediaType"`
			Digest    string `json:"digest"`
		} `json:"layers"`
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return "", fmt.Errorf("ollama manifest %s: %w", manifest, err)
	}
	for _, l := range m.Layers {
		if l.MediaType != ollamaModelMedia {
			continue
		}
		hex, ok := strings.CutPrefix(l.Digest, "sha256:")
		if !ok || len(hex) != 64 || strings.ContainsAny(hex, `/\.`) {
			return "", fmt.Errorf("ollama manifest %s: bad digest %q", manifest, l.Digest)
		}
		blob := filepath.Join(dir, "blobs", "sha256-"+hex)
		if _, err := os.Stat(blob); err != nil {
			return "", fmt.Errorf("ollama model %s: weights blob missing: %w", name, err)
		}
		return blob, nil
	}
	return "", fmt.Errorf("ollama manifest %s has no model layer", manifest)
}

// parseOllamaName splits a model name the way Ollama does: [host/][namespace/]model[:tag].
func parseOllamaName(name string) (host, ns, model, tag string, err error) {
	host, ns, tag = "registry.ollama.ai", "library", "latest"
	rest := name
	if i := strings.LastIndex(rest, ":"); i > strings.LastIndex(rest, "/") {
		rest, tag = rest[:i], rest[i+1:]
	}
	parts := strings.Split(rest, "/")
	switch len(parts) {
	case 1:
		model = parts[0]
	case 2:
		ns, model = parts[0], parts[1]
	case 3:
		host, ns, model = parts[0], parts[1], parts[2]
	default:
		return "", "", "", "", fmt.Errorf("bad model name %q", name)
	}
	for _, p := range []string{host, ns, model, tag} {
		if p == "" || p == "." || p == ".." || strings.ContainsAny(p, `\ `) {
			return "", "", "", "", fmt.Errorf("bad model name %q", name)
		}
	}
	return host, ns, model, tag, nil
}

// OllamaModels lists the models in Ollama's store as name:tag (the default registry and
// namespace left out, as `ollama list` shows them).
func OllamaModels(dir string) ([]string, error) {
	root := filepath.Join(dir, "manifests")
	var names []string
	err := filepath.WalkDir(root, func(path string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, err := filepath.Rel(root, path)
		if err != nil {
			return err
		}
		parts := strings.Split(filepath.ToSlash(rel), "/")
		if len(parts) != 4 {
			return nil
		}
		name := parts[2] + ":" + parts[3]
		if parts[0] != "registry.ollama.ai" {
			name = strings.Join(parts[:3], "/") + ":" + parts[3]
		} else if parts[1] != "library" {
			name = parts[1] + "/" + name
		}
		names = append(names, name)
		return nil
	})
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	return names, err
}

// DefaultModel picks the model for a node started without --model: the only one in Ollama's
// store. With none or several it says what to pass instead.
func DefaultModel() (string, error) {
	dir, err := OllamaModelsDir()
	if err != nil {
		return "", err
	}
	names, err := OllamaModels(dir)
	if err != nil {
		return "", fmt.Errorf("list ollama models: %w", err)
	}
	switch len(names) {
	case 1:
		return names[0], nil
	case 0:
		return "", errors.New("no --model given and Ollama's store is empty: pass --model FILE.gguf or an Ollama model name (or try `strata demo`, which synthesizes a tiny model)")
	}
	return "", fmt.Errorf("no --model given and Ollama's store holds several models: pass --model with one of %s", strings.Join(names, ", "))
}
