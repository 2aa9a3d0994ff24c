package codec

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/x448/float16"
)

var allCodecs = []Codec{CodecF32, CodecF16, CodecQ8}

func TestCodecNames(t *testing.T) {
	for _, c := range allCodecs {
		got, err := ParseCodec(c.String())
		if err != nil || got != c {
			t.Fatalf("ParseCodec(%q) = %v, %v", c.String(), got, err)
		}
		b, err := c.MarshalText()
		if err != nil {
			t.Fatal(err)
		}
		var back Codec
		if err := back.UnmarshalText(b); err != nil || back != c {
			t.Fatalf("text round trip of %v: %v, %v", c, back, err)
		}
	}
	for _, bad := range []string{"", "F16", "q4", "bf16"} {
		if _, err := ParseCodec(bad); !errors.Is(err, ErrCodec) {
			t.Errorf("ParseCodec(%q) err = %v, want ErrCodec", bad, err)
		}
	}
	if Codec(0).Valid() || Codec(4).Valid() {
		t.Error("codecs 0 and 4 must be invalid")
	}
	if _, err := Codec(0).Append(nil, []float32{1}); !errors.Is(err, ErrCodec) {
		t.Errorf("Append with codec 0: %v", err)
	}
	if err := Codec(9).Decode(make([]float32, 1), []byte{0, 0, 0, 0}); !errors.Is(err, ErrCodec) {
		t.Errorf("Decode with codec 9: %v", err)
	}
}

func TestEncodedSize(t *testing.T) {
	cases := []struct {
		c    Codec
		n    int
		want int
	}{
		{CodecF32, 0, 0}, {CodecF32, 3, 12},
		{CodecF16, 0, 0}, {CodecF16, 3, 6},
		{CodecQ8, 0, 0}, {CodecQ8, 1, 5}, {CodecQ8, 64, 68}, {CodecQ8, 65, 73}, {CodecQ8, 4096, 4352},
	}
	for _, tc := range cases {
		got, err := EncodedSize(tc.c, tc.n)
		if err != nil || got != tc.want {
			t.Errorf("EncodedSize(%v, %d) = %d, %v; want %d", tc.c, tc.n, got, err, tc.want)
		}
	}
	if _, err := EncodedSize(CodecF32, -1); err == nil {
		t.Error("negative count accepted")
	}
	// DecodedLen inverts EncodedSize, and refuses every size no count produces.
	for _, c := range allCodecs {
		valid := map[int]int{}
		for n := 0; n <= 300; n++ {
			s, _ := EncodedSize(c, n)
			valid[s] = n
		}
		for size := 0; size <= 300; size++ {
			n, err := DecodedLen(c, size)
			want, ok := valid[size]
			if ok != (err == nil) || (ok && n != want) {
				t.Errorf("DecodedLen(%v, %d) = %d, %v; want %d (valid %v)", c, size, n, err, want, ok)
			}
		}
	}
}

func randomActs(r *rand.Rand, n int, scale float32) []float32 {
	v := make([]float32, n)
	for i := range v {
		v[i] = float32(r.NormFloat64()) * scale
	}
	// Outliers, as real hidden states have a few.
	for i := 0; i < n/500; i++ {
		v[r.IntN(n)] *= 40
	}
	return v
}

func roundTrip(t *testing.T, c Codec, src []float32) []float32 {
	t.Helper()
	enc, err := c.Append([]byte{0xAA}, src) // a prefix: Append must append, not overwrite
	if err != nil {
		t.Fatal(err)
	}
	if enc[0] != 0xAA {
		t.Fatal("Append overwrote dst's existing bytes")
	}
	size, _ := EncodedSize(c, len(src))
	if len(enc)-1 != size {
		t.Fatalf("%v: encoded %d values into %d bytes, EncodedSize says %d", c, len(src), len(enc)-1, size)
	}
	dst := make([]float32, len(src))
	if err := c.Decode(dst, enc[1:]); err != nil {
		t.Fatal(err)
	}
	return dst
}

func TestRoundTripBounds(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for _, n := range []int{0, 1, 63, 64, 65, 200, 4096, 8192 + 17} {
		for _, scale := range []float32{1e-3, 1, 30} {
			src := randomActs(r, n, scale)
			t.Run(fmt.Sprintf("n%d_s%g", n, scale), func(t *testing.T) {
				if got := roundTrip(t, CodecF32, src); !bitsEqual(got, src) {
					t.Fatal("f32 is not exact")
				}
				got := roundTrip(t, CodecF16, src)
				for i := range src {
					a := math.Abs(float64(src[i]))
					err := math.Abs(float64(got[i] - src[i]))
					// Relative 1e-3 in the normal half range; below it half subnormals
					// have a fixed step of 2^-24.
					if err > 1e-3*a && err > 0x1p-25 {
						t.Fatalf("f16 value %d: %g -> %g", i, src[i], got[i])
					}
				}
				got = roundTrip(t, CodecQ8, src)
				for b := 0; b < len(src); b += Q8Block {
					blk := src[b:min(b+Q8Block, len(src))]
					var absmax float64
					for _, f := range blk {
						absmax = math.Max(absmax, math.Abs(float64(f)))
					}
					for i := range blk {
						if e := math.Abs(float64(got[b+i] - blk[i])); e > absmax/127 {
							t.Fatalf("q8 value %d: %g -> %g (absmax %g)", b+i, blk[i], got[b+i], absmax)
						}
					}
				}
			})
		}
	}
}

func bitsEqual(a, b []float32) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if math.Float32bits(a[i]) != math.Float32bits(b[i]) {
			return false
		}
	}
	return true
}

// Every half decodes as x448/float16 (itself checked against all 2^32 float32s) decodes it.
func TestHalfDecodeAll(t *testing.T) {
	for h := 0; h < 1<<16; h++ {
		got := floatFromHalf(uint16(h))
		want := float16.Frombits(uint16(h)).Float32()
		if math.IsNaN(float64(want)) {
			if !math.IsNaN(float64(got)) {
				t.Fatalf("half %#04x: got %v, want NaN", h, got)
			}
			continue
		}
		if math.Float32bits(got) != math.Float32bits(want) {
			t.Fatalf("half %#04x: got %v, want %v", h, got, want)
		}
	}
}

// Encoding agrees with x448/float16 on every float32 whose exponent lands near or inside the
// half range (stepping through mantissas), on the boundaries, and on random bit patterns.
func TestHalfEncode(t *testing.T) {
	check := func(b uint32) {
		f := math.Float32frombits(b)
		got := halfFromFloat(f)
		want := float16.Fromfloat32(f).Bits()
		if f != f { // NaN: any quiet NaN with the sign kept will do
			if got&0x7c00 != 0x7c00 || got&0x3ff == 0 || got&0x8000 != want&0x8000 {
				t.Fatalf("NaN %#08x -> %#04x", b, got)
			}
			return
		}
		if got != want {
			t.Fatalf("float32 %#08x (%g): got %#04x, want %#04x", b, f, got, want)
		}
	}
	for exp := uint32(100); exp <= 145; exp++ {
		for m := uint32(0); m < 1<<23; m += 97 {
			check(exp<<23 | m)
			check(1<<31 | exp<<23 | m)
		}
		// Ties and their neighbours at every rounding position.
		for m := uint32(0); m < 1<<23; m += 1 << 12 {
			for d := uint32(0); d < 3; d++ {
				check(exp<<23 | (m+d-1)&(1<<23-1))
			}
		}
	}
	for _, b := range []uint32{0, 1 << 31, 0x7f800000, 0xff800000, 0x7fc00000, 0x7f800001, 0x477fe000, 0x477ff000, 0x477fefff, 0x33000000, 0x33000001, 0x387fc000, 0x38800000} {
		check(b)
	}
	r := rand.New(rand.NewPCG(3, 4))
	for i := 0; i < 1<<21; i++ {
		check(r.Uint32())
	}
}

func TestQ8NonFinitePoisonsBlock(t *testing.T) {
	src := make([]float32, 130)
	for i := range src {
		src[i] = float32(i)
	}
	src[70] = float32(math.Inf(1))
	src[129] = float32(math.NaN())
	got := roundTrip(t, CodecQ8, src)
	if err := CheckFinite(got[:64]); err != nil {
		t.Fatalf("first block is clean: %v", err)
	}
	for _, blk := range [][]float32{got[64:128], got[128:]} {
		for _, f := range blk {
			if f == f {
				t.Fatalf("a block holding Inf/NaN must decode as NaN, got %v", f)
			}
		}
	}
	if err := CheckFinite(got); !errors.Is(err, ErrNonFinite) {
		t.Fatalf("CheckFinite: %v", err)
	}
}

func TestF16Overflow(t *testing.T) {
	got := roundTrip(t, CodecF16, []float32{65504, 65519, 65520, -1e6, 1e-8, float32(math.Inf(-1))})
	want := []float32{65504, 65504, float32(math.Inf(1)), float32(math.Inf(-1)), 0, float32(math.Inf(-1))}
	if !bitsEqual(got, want) {
		t.Fatalf("got %v, want %v", got, want)
	}
}

func TestCheckFinite(t *testing.T) {
	if err := CheckFinite([]float32{0, -1, math.MaxFloat32, math.SmallestNonzeroFloat32}); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []float32{float32(math.NaN()), float32(math.Inf(1)), float32(math.Inf(-1))} {
		err := CheckFinite([]float32{1, 2, bad})
		if !errors.Is(err, ErrNonFinite) {
			t.Fatalf("CheckFinite(%v) = %v", bad, err)
		}
	}
}

func TestDecodeLengthMismatch(t *testing.T) {
	for _, c := range allCodecs {
		enc, _ := c.Append(nil, make([]float32, 100))
		for _, n := range []int{99, 101, 0} {
			err := c.Decode(make([]float32, n), enc)
			if !errors.Is(err, ErrCodec) {
				t.Errorf("%v: decoding %d bytes as %d values: %v", c, len(enc), n, err)
			}
		}
		if err := c.Decode(make([]float32, 100), enc[:len(enc)-1]); err == nil {
			t.Errorf("%v: short data accepted", c)
		}
	}
}

func TestAppendNoAllocs(t *testing.T) {
	src := randomActs(rand.New(rand.NewPCG(5, 6)), 4096, 1)
	dst := make([]float32, len(src))
	for _, c := range allCodecs {
		buf := make([]byte, 0, 4*len(src))
		allocs := testing.AllocsPerRun(20, func() {
			buf, _ = c.Append(buf[:0], src)
			if err := c.Decode(dst, buf); err != nil {
				t.Fatal(err)
			}
		})
		if allocs != 0 {
			t.Errorf("%v: %v allocations per encode+decode with reused buffers", c, allocs)
		}
	}
}

// FuzzCodecDecode feeds arbitrary bytes to every codec: a length DecodedLen accepts must
// decode without error or panic, and re-encoding f32/f16 must give the bytes back (up to
// NaN payloads).
func FuzzCodecDecode(f *testing.F) {
	f.Add(uint8(CodecF32), []byte{0, 0, 0x80, 0x3f})
	f.Add(uint8(CodecF16), []byte{0x00, 0x3c, 0x00, 0x7c, 0x01, 0x00, 0xff, 0x7f})
	q, _ := CodecQ8.Append(nil, []float32{1, -2, 3, 0.5, 127})
	f.Add(uint8(CodecQ8), q)
	f.Add(uint8(CodecQ8), []byte{0, 0, 0xc0, 0x7f, 1, 2})
	f.Add(uint8(CodecQ8), []byte{1, 2, 3})
	f.Add(uint8(0), []byte{1})
	f.Fuzz(func(t *testing.T, c uint8, data []byte) {
		codec := Codec(c)
		n, err := DecodedLen(codec, len(data))
		if err != nil {
			if codec.Valid() && (codec == CodecF32 && len(data)%4 == 0 || codec == CodecF16 && len(data)%2 == 0) {
				t.Fatalf("DecodedLen(%v, %d) refused a valid size: %v", codec, len(data), err)
			}
			// The length is wrong for every count: Decode must say so too.
			if err := codec.Decode(make([]float32, len(data)), data); err == nil {
				t.Fatal("Decode accepted a size DecodedLen refused")
			}
			return
		}
		dst := make([]float32, n)
		if err := codec.Decode(dst, data); err != nil {
			t.Fatalf("Decode of %d bytes as %d values: %v", len(data), n, err)
		}
		if codec == CodecQ8 {
			return // q8 is lossy by design: scales and values are not canonical
		}
		back, err := codec.Append(nil, dst)
		if err != nil {
			t.Fatal(err)
		}
		if len(back) != len(data) {
			t.Fatalf("re-encoded %d bytes into %d", len(data), len(back))
		}
		for i := range dst {
			if dst[i] != dst[i] {
				continue // NaN payloads need not survive
			}
			w := 4
			if codec == CodecF16 {
				w = 2
			}
			for k := 0; k < w; k++ {
				if back[i*w+k] != data[i*w+k] {
					t.Fatalf("value %d: bytes %x -> %v -> %x", i, data[i*w:i*w+w], dst[i], back[i*w:i*w+w])
				}
			}
		}
	})
}

func BenchmarkCodec(b *testing.B) {
	r := rand.New(rand.NewPCG(7, 8))
	for _, hidden := range []int{4096, 8192} {
		for _, tokens := range []int{1, 512} {
			src := randomActs(r, hidden*tokens, 1)
			dst := make([]float32, len(src))
			for _, c := range allCodecs {
				size, _ := EncodedSize(c, len(src))
				buf := make([]byte, 0, size)
				b.Run(fmt.Sprintf("encode/%s/h%d/t%d", c, hidden, tokens), func(b *testing.B) {
					b.SetBytes(int64(4 * len(src)))
					b.ReportAllocs()
					for b.Loop() {
						buf, _ = c.Append(buf[:0], src)
					}
				})
				buf, _ = c.Append(buf[:0], src)
				b.Run(fmt.Sprintf("decode/%s/h%d/t%d", c, hidden, tokens), func(b *testing.B) {
					b.SetBytes(int64(4 * len(src)))
					b.ReportAllocs()
					for b.Loop() {
						if err := c.Decode(dst, buf); err != nil {
							b.Fatal(err)
						}
					}
				})
			}
		}
	}
}
