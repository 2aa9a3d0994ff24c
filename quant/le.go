package quant

import (
	"encoding/binary"
	"math"
)

func f32Bytes(src []float32) []byte {
	b := make([]byte, 4*len(src))
	for i, f := range src {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(f))
	}
	return b
}

func f32Floats(b []byte) []float32 {
	out := make([]float32, len(b)/4)
	for i := range out {
		out[i] = math.Float32frombits(binary.LittleEndian.Uint32(b[4*i:]))
	}
	return out
}
