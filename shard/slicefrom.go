package shard

import (
	"context"
	"io"
	"maps"
	"slices"
	"strings"

	fsggml "github.com/ollama/ollama/fs/ggml"

	"github.com/strata-llm/strata/internal/gguf"
)

// ModelInfoOf is ReadModelInfo for a GGUF header already decoded, such as a manifest's: size
// is the whole file's.
func ModelInfoOf(meta *fsggml.GGML, size int64) (*ModelInfo, error) {
	return modelInfo("", size, meta)
}

// TokenizerOf is LoadTokenizer for a GGUF header already decoded, such as a manifest's.
func TokenizerOf(meta *fsggml.GGML) (*Tokenizer, error) { return newTokenizer(meta.KV()) }

// SliceHolds reports whether the slice file of r holds the named tensor of the model.
func SliceHolds(info *ModelInfo, r Range, name string) bool {
	return sliceTensor(name, r, info.Layers, info.TiedEmbedding)
}

// SliceTensors lists the tensors of the whole model (meta's table) that the slice of r
// holds, with offsets relative to the whole file's tensor data.
func SliceTensors(meta *fsggml.GGML, info *ModelInfo, r Range) []*fsggml.Tensor {
	var keep []*fsggml.Tensor
	for _, t := range meta.Tensors().Items() {
		if sliceTensor(t.Name, r, info.Layers, info.TiedEmbedding) {
			keep = append(keep, t)
		}
	}
	return keep
}

// WriteSliceFrom writes the slice file of r that WriteSlice would cut from the whole model,
// taking the header from meta (the whole model's, whose file is size bytes) and each
// tensor's bytes from data instead of a local file: a node that fetches its slice from its
// peers writes it here without ever holding the whole model. data's WriterTo is handed an
// io.WriterAt at the tensor's place, so it may write out of order and rewrite.
func WriteSliceFrom(ctx context.Context, meta *fsggml.GGML, size int64, srcSHA256 string, r Range, dst string, data func(t *fsggml.Tensor) io.WriterTo) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	info, err := modelInfo("", size, meta)
	if err != nil {
		return err
	}
	if err := r.Validate(info.Layers); err != nil {
		return err
	}
	keep := SliceTensors(meta, info, r)
	out := make([]*fsggml.Tensor, 0, len(keep)+1)
	for _, t := range keep {
		out = append(out, &fsggml.Tensor{Name: t.Name, Kind: t.Kind, Shape: t.Shape, WriterTo: data(t)})
	}
	// As WriteSlice: a first stage without an LM head gets the placeholder output tensor.
	if r.Start == 0 && !slices.ContainsFunc(keep, func(t *fsggml.Tensor) bool { return strings.HasPrefix(t.Name, "output.") }) {
		out = append(out, &fsggml.Tensor{Name: absentOutput, Kind: 0, Shape: []uint64{1}, WriterTo: zeros(4)})
	}
	kv := maps.Clone(meta.KV())
	kv[sliceOfKey] = srcSHA256
	return gguf.WriteAtomic(dst, kv, out)
}

// SliceOfKey is the metadata key naming the sha256 of the model a slice was cut from, and
// AbsentOutput the placeholder tensor a first stage without an LM head carries: a verifier
// of fetched slices skips both when comparing a slice with the model's manifest.
const (
	SliceOfKey   = sliceOfKey
	AbsentOutput = absentOutput
)
