# ggml's CPU kernels are compiled by cgo. Without -march the default build runs 3-27x slower
# (measured: 13.5 vs 210-290 tok/s prefill). -march=native alone fails to link on CPUs with AMX
# (ggml_backend_amx_buffer_type), so AMX is switched off. Override GGML_MARCH for portable
# binaries, e.g. `make build GGML_MARCH=x86-64-v3`.
GGML_MARCH ?= native
GGML_FLAGS := -O3 -march=$(GGML_MARCH) -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
export CGO_CFLAGS := $(GGML_FLAGS)
export CGO_CXXFLAGS := $(GGML_FLAGS)

GO ?= go
BIN ?= bin/strata

# The engine (github.com/ollama/ollama, pinned in go.mod) is built from a copy with the patches
# in build/engine-patches applied (scripts/patch-engine.sh): it puts matrix weights in ggml's
# repacked CPU buffers: q4_0 prefill takes 2.2x less CPU (README, Performance). go.mod stays pinned; a
# plain `go build ./cmd/strata`, or `make build ENGINE=plain`, builds the unpatched engine.
ENGINE ?= patched
ifeq ($(ENGINE),patched)
ENGINE_DEP := engine
export GOFLAGS := $(strip $(filter-out -modfile=%,$(GOFLAGS)) -modfile=$(CURDIR)/build/go.patched.mod)
else
export GOFLAGS := $(filter-out -modfile=%/build/go.patched.mod,$(GOFLAGS))
endif

.PHONY: build test demo vet fuzz bench clean engine plain vulkan cuda vulkan-relink

build: $(ENGINE_DEP)
	$(GO) build -o $(BIN) ./cmd/strata

# The unpatched engine, for side-by-side benchmarks (strata bench --baseline-binary bin/strata-plain).
plain:
	$(MAKE) build ENGINE=plain BIN=bin/strata-plain

engine:
	GO=$(GO) bash scripts/patch-engine.sh

# ggml's GPU backends, built from the pinned module's ggml source as ollama's CMakeLists does
# (scripts/gpu-backend.sh, patches in build/gpu-patches), cached by the hash of their inputs
# under ~/.cache/strata/gpu and linked into lib/ollama/, where bin/strata loads them from.
# Vulkan: apt-get install cmake glslc libvulkan-dev (cold: tens of minutes on 2 cores).
# CUDA: nvcc (CUDA_ARCHITECTURES="86;89" to choose). README, GPUs.
vulkan cuda:
	GO=$(GO) bash scripts/gpu-backend.sh $@

# make vulkan's cache entry in minutes when only ggml-vulkan.cpp changed since a cached build
# (a new gpu patch): it reuses that build's shaders (README, GPUs). Then make vulkan.
vulkan-relink:
	GO=$(GO) bash scripts/gpu-vulkan-relink.sh

test fuzz vet bench: $(ENGINE_DEP)

# Flags for the demo, e.g. make demo ARGS="--api 127.0.0.1:9090 --data-dir /tmp/demo"
ARGS ?=
demo: build
	$(BIN) demo $(ARGS)

# The whole suite: unit, oracle and swarm tests, then every fuzz target for a few seconds.
test:
	$(GO) test -count=1 -timeout 30m ./...
	$(MAKE) fuzz FUZZTIME=5s

# Each target runs from its package. The targets are found in the test sources, not with
# `go test -list`, which would link every package's test binary (ggml included) just to list.
# They live in packages that do not link ggml where the code allows (quant/codec, gguf,
# discovery), since -fuzz instruments every dependency and so rebuilds a linked ggml;
# FuzzReadFrame (p2p) still does, once per build cache. go1.26's fuzz coordinator can fail a
# target with a bare "context deadline exceeded" when -fuzztime ends under load
# (go.dev/issue/75804, fixed in go1.27); a count (-fuzztime Nx) would avoid it but makes the
# slow targets (FuzzRequestShapes: ~20 inputs/s) take minutes, so that failure counts only when
# the run wrote a failing input to testdata/fuzz/.
FUZZTIME ?= 30s
fuzz:
	@for dir in $$($(GO) list -f '{{.Dir}}' ./...); do \
		for f in $$(grep -ho '^func Fuzz[A-Za-z0-9_]*' $$dir/*_test.go 2>/dev/null | cut -c6-); do \
			echo "fuzz $$dir $$f"; \
			before=$$(ls $$dir/testdata/fuzz/$$f 2>/dev/null | wc -l); \
			out=$$($(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) $$dir 2>&1); rc=$$?; \
			echo "$$out"; \
			after=$$(ls $$dir/testdata/fuzz/$$f 2>/dev/null | wc -l); \
			if [ $$rc -ne 0 ]; then \
				if [ "$$after" = "$$before" ] && echo "$$out" | grep -qx '    context deadline exceeded'; then \
					echo "fuzz $$f: Go's fuzz coordinator raced its own -fuzztime deadline (go.dev/issue/75804, go1.26) and wrote no failing input: not a failure"; \
				else exit 1; fi; \
			fi; \
		done; \
	done

vet:
	$(GO) vet ./...

bench:
	$(GO) test -run '^$$' -bench . -benchmem ./...

clean:
	rm -rf bin
