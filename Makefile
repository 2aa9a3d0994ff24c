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

.PHONY: build test demo vet fuzz bench clean

build:
	$(GO) build -o $(BIN) ./cmd/strata

# Flags for the demo, e.g. make demo ARGS="--api 127.0.0.1:9090 --data-dir /tmp/demo"
ARGS ?=
demo: build
	$(BIN) demo $(ARGS)

# The whole suite: unit, oracle and swarm tests, then every fuzz target for a few seconds.
test:
	$(GO) test -count=1 -timeout 30m ./...
	$(MAKE) fuzz FUZZTIME=5s

FUZZTIME ?= 30s
fuzz:
	@for pkg in $$($(GO) list ./...); do \
		for f in $$($(GO) test -list '^Fuzz' $$pkg | grep '^Fuzz' || true); do \
			echo "fuzz $$pkg $$f"; \
			$(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) $$pkg || exit 1; \
		done; \
	done

vet:
	$(GO) vet ./...

bench:
	$(GO) test -run '^$$' -bench . -benchmem ./...

clean:
	rm -rf bin
