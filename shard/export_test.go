package shard

import (
	"fmt"

	"github.com/ollama/ollama/fs"
)

// Gemma2QueryScale is the scale gemma2's layers give queries for a model of metadata c, for
// the external tests (which build c from testkit's presets; testkit imports shard).
func Gemma2QueryScale(c fs.Config) (float64, error) {
	f, err := newFamily(c)
	if err != nil {
		return 0, err
	}
	g, ok := f.(*gemma2)
	if !ok {
		return 0, fmt.Errorf("%s is not gemma2", c.Architecture())
	}
	return g.queryScale(), nil
}
