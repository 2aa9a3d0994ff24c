#!/usr/bin/env bash
# The GPU checks in one go, for a machine with a real GPU (NVIDIA for CUDA; any GPU for
# Vulkan): builds ggml's Vulkan and CUDA backends (make vulkan, make cuda; each skipped with a
# message when its toolchain is missing), runs the split == whole oracle on each, then
# measures a 70B-shaped model (LAYERS of its layers, all on the GPU) served by one node on the
# GPU against the same node on the CPU, with `strata bench --api`. Everything it prints and
# the bench JSON land in $OUT (default ./artifacts/gpu-check); paste the tables into the
# README's GPUs section with the GPU's name.
#
#   scripts/gpu-check.sh                     # all of it
#   BACKENDS=cuda LAYERS=40 scripts/gpu-check.sh
#
# Time on a 16-core machine: the CUDA build is the longest step (it builds for the GPU's own
# architecture, from nvidia-smi; CUDA_ARCHITECTURES overrides); Vulkan shaders take minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-artifacts/gpu-check}
BACKENDS=${BACKENDS:-"cuda vulkan"}
LAYERS=${LAYERS:-20}          # of the 70b preset's 80: 20 layers are ~5.5 GB at q4_0
TYPE=${TYPE:-q4_0}
# Only the GPU at hand's architecture: several times faster to build than the default list.
if [ -z "${CUDA_ARCHITECTURES:-}" ] && command -v nvidia-smi >/dev/null; then
	CUDA_ARCHITECTURES=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '. ')
fi
[ -n "${CUDA_ARCHITECTURES:-}" ] && export CUDA_ARCHITECTURES
export JOBS=${JOBS:-$(nproc)}
mkdir -p "$OUT"
log() { echo "== $*" | tee -a "$OUT/summary.txt"; }
export CGO_CFLAGS="-O3 -march=native -mno-amx-tile -mno-amx-int8 -mno-amx-bf16" CGO_CXXFLAGS="-O3 -march=native -mno-amx-tile -mno-amx-int8 -mno-amx-bf16"

log "$(date -u) on $(hostname): $(nproc) cores"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/summary.txt"
command -v vulkaninfo >/dev/null && vulkaninfo --summary 2>/dev/null | grep -E 'deviceName|driverName' | tee -a "$OUT/summary.txt"

make engine >/dev/null || exit 1
export GOFLAGS=-modfile=$PWD/build/go.patched.mod
built=()
for b in $BACKENDS; do
	start=$(date +%s)
	if make "$b" >"$OUT/build-$b.log" 2>&1; then
		log "make $b: ok in $(($(date +%s) - start))s ($(tail -2 "$OUT/build-$b.log" | head -1))"
		built+=("$b")
	else
		log "make $b: FAILED or not possible here, see $OUT/build-$b.log: $(tail -1 "$OUT/build-$b.log")"
	fi
done
make build >/dev/null || exit 1

# The oracle on each backend (STRATA_GPU_BACKEND picks the library the test's child loads and
# the device it puts a stage on).
for b in "${built[@]}"; do
	log "oracle on $b"
	STRATA_GPU_BACKEND=$b go test -count=1 -run 'TestSplitMatchesWholeGPU' -v ./pipeline/ 2>&1 | tee "$OUT/oracle-$b.log" | grep -E 'device|identical|logit|^(---|ok|FAIL)' | tee -a "$OUT/summary.txt"
done

# One node holding the whole 70B-shaped model on the GPU, then on the CPU, measured through
# its API. The model is synthesized once (cached in the data dir).
model=$OUT/70b-${LAYERS}L-$TYPE.gguf
[ -f "$model" ] || bin/strata model synth --preset 70b --layers "$LAYERS" --type "$TYPE" --out "$model" >"$OUT/synth.log" 2>&1 ||
	{ log "could not synthesize the model: $(tail -3 "$OUT/synth.log")"; exit 1; }
log "model $model ($(du -h "$model" | cut -f1))"
node_bench() { # name, extra node flags...
	local name=$1
	shift
	local dir="$OUT/node-$name"
	rm -rf "$dir"
	bin/strata node start --model "$model" --data-dir "$dir" --api 127.0.0.1:18080 --listen /ip4/127.0.0.1/tcp/14001 \
		--mdns=false --max-sessions 8 --context 1024 "$@" >"$OUT/node-$name.log" 2>&1 &
	local pid=$!
	for _ in $(seq 600); do
		bin/strata status --api 127.0.0.1:18080 2>/dev/null | grep -q '^swarm  READY' && break
		kill -0 $pid 2>/dev/null || break
		sleep 1
	done
	bin/strata status --api 127.0.0.1:18080 | tee -a "$OUT/summary.txt"
	grep -E 'offloaded|GPUs|self-benchmark|weights:' "$OUT/node-$name.log" | tee -a "$OUT/summary.txt"
	bin/strata bench --api 127.0.0.1:18080 --model "$model" --concurrency 1,4 --tokens 64 --prompt-tokens 128 \
		--json "$OUT/bench-$name.json" 2>>"$OUT/bench-$name.log" | tee -a "$OUT/summary.txt"
	kill $pid
	wait $pid 2>/dev/null
}
if [ ${#built[@]} -gt 0 ]; then
	log "node on the GPU (${built[0]} first in lib/ollama)"
	node_bench gpu
fi
log "node on the CPU"
node_bench cpu --devices cpu
log "done: $OUT/summary.txt"
