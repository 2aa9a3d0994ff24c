// Package cpufeat tells which x86 vector extensions the cgo build was compiled for and which
// the CPU has. ggml's CPU kernels are compiled by cgo with the same CGO_CFLAGS as this
// package, so a build without -march shows here as no AVX2: the 3-27x slower build that a plain
// `go build` gives. Nodes log it at start and warn when the CPU could do better.
package cpufeat

/*
static int has_avx(void) {
#ifdef __AVX__
	return 1;
#else
	return 0;
#endif
}
static int has_avx2(void) {
#ifdef __AVX2__
	return 1;
#else
	return 0;
#endif
}
static int has_fma(void) {
#ifdef __FMA__
	return 1;
#else
	return 0;
#endif
}
static int has_f16c(void) {
#ifdef __F16C__
	return 1;
#else
	return 0;
#endif
}
static int has_avx512f(void) {
#ifdef __AVX512F__
	return 1;
#else
	return 0;
#endif
}
static int has_avx512vnni(void) {
#ifdef __AVX512VNNI__
	return 1;
#else
	return 0;
#endif
}
*/
import "C"

import (
	"runtime"
	"strings"

	"golang.org/x/sys/cpu"
)

// Report compares the build with the CPU.
type Report struct {
	Built  []string // extensions the cgo code was compiled for
	CPU    []string // extensions this CPU has
	Slower bool     // the CPU has AVX2 or AVX-512 that the build does not use
}

// Check reads the build's and the CPU's extensions.
func Check() Report {
	if runtime.GOARCH != "amd64" {
		return Report{}
	}
	type ext struct {
		name        string
		built, have bool
	}
	exts := []ext{
		{"AVX", C.has_avx() == 1, cpu.X86.HasAVX},
		{"AVX2", C.has_avx2() == 1, cpu.X86.HasAVX2},
		{"FMA", C.has_fma() == 1, cpu.X86.HasFMA},
		{"F16C", C.has_f16c() == 1, cpu.X86.HasAVX2 && cpu.X86.HasFMA}, // x/sys/cpu has no F16C bit; every AVX2+FMA CPU has it
		{"AVX512F", C.has_avx512f() == 1, cpu.X86.HasAVX512F},
		{"AVX512VNNI", C.has_avx512vnni() == 1, cpu.X86.HasAVX512VNNI},
	}
	var r Report
	for _, e := range exts {
		if e.built {
			r.Built = append(r.Built, e.name)
		}
		if e.have {
			r.CPU = append(r.CPU, e.name)
		}
		if e.have && !e.built && (e.name == "AVX2" || e.name == "AVX512F") {
			r.Slower = true
		}
	}
	return r
}

// BuiltString is the build's extensions for a log line ("none" for a baseline build).
func (r Report) BuiltString() string {
	if len(r.Built) == 0 {
		return "none"
	}
	return strings.Join(r.Built, ",")
}

// CPUString is the CPU's extensions for a log line.
func (r Report) CPUString() string {
	if len(r.CPU) == 0 {
		return "none"
	}
	return strings.Join(r.CPU, ",")
}
