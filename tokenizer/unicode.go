package tokenizer

import (
	"unicode"
	"unicode/utf8"
)

// Codepoint classes as llama.cpp's unicode tables give them. Whitespace is a property of its
// own there (a space is also a separator, a newline also a control character), so it is a
// separate bit here too.
const (
	clsUndefined uint8 = 1 << iota
	clsNumber
	clsLetter
	clsSeparator
	clsMark
	clsPunct
	clsSymbol
	clsControl
)

type cptFlags struct {
	cls   uint8 // one of the cls* bits; 0 only for a position outside the text
	space bool
}

func (f cptFlags) letter() bool { return f.cls == clsLetter }
func (f cptFlags) number() bool { return f.cls == clsNumber }

// asciiFlags is the flags of the first 128 codepoints, looked up far more often than the rest.
var asciiFlags = func() (t [128]cptFlags) {
	for r := rune(0); r < 128; r++ {
		t[r] = slowFlags(r)
	}
	return t
}()

func flagsOf(r rune) cptFlags {
	if r >= 0 && r < 128 {
		return asciiFlags[r]
	}
	return slowFlags(r)
}

func slowFlags(r rune) cptFlags {
	f := cptFlags{space: isSpace(r)}
	switch {
	case unicode.IsLetter(r):
		f.cls = clsLetter
	case unicode.IsNumber(r):
		f.cls = clsNumber
	case unicode.IsMark(r):
		f.cls = clsMark
	case unicode.IsPunct(r):
		f.cls = clsPunct
	case unicode.IsSymbol(r):
		f.cls = clsSymbol
	case unicode.In(r, unicode.Z):
		f.cls = clsSeparator
	case unicode.In(r, unicode.Cc, unicode.Cf, unicode.Co, unicode.Cs):
		f.cls = clsControl
	default:
		f.cls = clsUndefined
	}
	return f
}

// isSpace is Unicode's White_Space property, which is what llama.cpp's tables hold.
func isSpace(r rune) bool {
	switch r {
	case '\t', '\n', '\v', '\f', '\r', ' ', 0x85, 0xA0, 0x1680, 0x2028, 0x2029, 0x202F, 0x205F, 0x3000:
		return true
	}
	return r >= 0x2000 && r <= 0x200A
}

// utf8Len is how many bytes llama.cpp takes for the character starting with b: by its high
// nibble alone, so a stray continuation byte is a character of one byte.
func utf8Len(b byte) int {
	switch b >> 4 {
	case 0xC, 0xD:
		return 2
	case 0xE:
		return 3
	case 0xF:
		return 4
	}
	return 1
}

// decodeCpts turns text into codepoints the way llama.cpp's unicode_cpts_from_utf8 does for
// the pre-tokenizer: an invalid sequence becomes U+FFFD for one byte. Each codepoint keeps the
// number of input bytes it came from, so words map back to the exact input bytes.
func decodeCpts(s string, cpts []rune, widths []uint8) ([]rune, []uint8) {
	for i := 0; i < len(s); {
		r, n := utf8.DecodeRuneInString(s[i:])
		cpts = append(cpts, r)
		widths = append(widths, uint8(n))
		i += n
	}
	return cpts, widths
}

// GPT-2's byte-level alphabet: printable bytes stand for themselves, the others for 256 up.
var (
	byteToRune [256]rune
	runeToByte = map[rune]byte{}
	// byteToPiece is the UTF-8 of byteToRune, ready to append.
	byteToPiece [256]string
)

func init() {
	n := 0
	for b := 0; b < 256; b++ {
		if (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF) {
			byteToRune[b] = rune(b)
		} else {
			byteToRune[b] = rune(256 + n)
			n++
		}
		runeToByte[byteToRune[b]] = byte(b)
		byteToPiece[b] = string(byteToRune[b])
	}
}
