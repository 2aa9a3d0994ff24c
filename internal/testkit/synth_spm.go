package testkit

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
)

// spmVocab is a SentencePiece vocabulary as GGUF stores it (tokenizer.ggml.model "llama").
type spmVocab struct {
	Tokens []string
	Scores []float32
	Types  []int32
}

// GemmaVocabPath finds Gemma 2's SentencePiece model, which the engine's module ships as
// test data, beside the Llama 3 vocabulary VocabDir finds.
func GemmaVocabPath() (string, error) {
	dir, err := VocabDir()
	if err != nil {
		return "", err
	}
	p := filepath.Join(dir, "..", "gemma2", "tokenizer.model")
	if _, err := os.Stat(p); err != nil {
		return "", fmt.Errorf("gemma vocabulary not found beside %s: %w", dir, err)
	}
	return p, nil
}

// loadSPM reads the first n pieces (0: all) of a SentencePiece model file. It decodes the
// protobuf by hand: ModelProto's field 1 is the repeated SentencePiece{piece=1, score=2,
// type=3}, and nothing else in the file is needed.
func loadSPM(path string, n int) (*spmVocab, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("load sentencepiece vocabulary: %w", err)
	}
	v := &spmVocab{}
	for len(b) > 0 && (n <= 0 || len(v.Tokens) < n) {
		field, wire, rest, err := pbKey(b)
		if err != nil {
			return nil, err
		}
		body, rest, err := pbSkip(wire, rest)
		if err != nil {
			return nil, err
		}
		b = rest
		if field != 1 || wire != 2 {
			continue
		}
		piece, score, typ := "", float32(0), int32(1)
		for len(body) > 0 {
			f, w, r, err := pbKey(body)
			if err != nil {
				return nil, err
			}
			val, r2, err := pbSkip(w, r)
			if err != nil {
				return nil, err
			}
			switch {
			case f == 1 && w == 2:
				piece = string(val)
			case f == 2 && w == 5:
				score = math.Float32frombits(binary.LittleEndian.Uint32(val))
			case f == 3 && w == 0:
				x, _ := binary.Uvarint(val)
				typ = int32(x)
			}
			body = r2
		}
		v.Tokens = append(v.Tokens, piece)
		v.Scores = append(v.Scores, score)
		v.Types = append(v.Types, typ)
	}
	if len(v.Tokens) == 0 {
		return nil, errors.New("load sentencepiece vocabulary: no pieces")
	}
	return v, nil
}

func pbKey(b []byte) (field int, wire int, rest []byte, err error) {
	k, m := binary.Uvarint(b)
	if m <= 0 {
		return 0, 0, nil, errors.New("sentencepiece model: bad protobuf key")
	}
	return int(k >> 3), int(k & 7), b[m:], nil
}

// pbSkip splits off one value of the given wire type; varints come back with their bytes.
func pbSkip(wire int, b []byte) (val, rest []byte, err error) {
	switch wire {
	case 0:
		_, m := binary.Uvarint(b)
		if m <= 0 {
			return nil, nil, errors.New("sentencepiece model: bad varint")
		}
		return b[:m], b[m:], nil
	case 1:
		if len(b) < 8 {
			return nil, nil, errors.New("sentencepiece model: truncated")
		}
		return b[:8], b[8:], nil
	case 2:
		l, m := binary.Uvarint(b)
		if m <= 0 || uint64(len(b)-m) < l {
			return nil, nil, errors.New("sentencepiece model: truncated")
		}
		return b[m : m+int(l)], b[m+int(l):], nil
	case 5:
		if len(b) < 4 {
			return nil, nil, errors.New("sentencepiece model: truncated")
		}
		return b[:4], b[4:], nil
	}
	return nil, nil, fmt.Errorf("sentencepiece model: wire type %d", wire)
}
