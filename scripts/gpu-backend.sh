#!/usr/bin/env bash
# Builds one of ggml's GPU backends (vulkan or cuda) of the pinned engine, as ollama v0.24.0's
# CMakeLists does (GGML_BACKEND_DL: the backend is a shared library the engine loads at run
# time), from a copy of the module's own ggml source with build/gpu-patches applied, and links
# it into lib/ollama/, where bin/strata looks (its own ../lib/ollama; elsewhere set
# OLLAMA_LIBRARY_PATH to a directory whose path contains lib/ollama).
#
#   scripts/gpu-backend.sh vulkan     (make vulkan)
#   scripts/gpu-backend.sh cuda       (make cuda; CUDA_ARCHITECTURES="86;89" to choose archs)
#
# Generating every Vulkan shader takes tens of minutes on 2 cores, so the built libraries are
# cached by the hash of everything that goes into them (module version, patches, this script,
# compiler, glslc/nvcc, Vulkan headers) under $STRATA_GPU_CACHE (default ~/.cache/strata/gpu):
# a second build, or one in another clone, is a cache hit and takes a second.
# JOBS (default: the core count) bounds the parallel compiles.
set -euo pipefail
cd "$(dirname "$0")/.."
GO=${GO:-go}
backend=${1:-}
case "$backend" in
vulkan | cuda) ;;
*)
	echo "usage: $0 vulkan|cuda" >&2
	exit 2
	;;
esac

need() {
	command -v "$1" >/dev/null || {
		echo "gpu-backend: $1 not found. $2" >&2
		exit 1
	}
}
need cmake "Debian: apt-get install cmake"
need c++ "Debian: apt-get install g++"

mod=github.com/ollama/ollama
ver=$(awk -v m="$mod" '$1 == m { print $2; exit }' go.mod)
[ -n "$ver" ] || { echo "gpu-backend: $mod not found in go.mod" >&2; exit 1; }
src=$(GOFLAGS= $GO env GOMODCACHE)/$mod@$ver
if [ ! -f "$src/CMakeLists.txt" ]; then
	GOFLAGS= $GO mod download "$mod@$ver"
fi

# What else goes into the library, for the cache key.
cmake_args=()
case "$backend" in
vulkan)
	need glslc "Debian: apt-get install glslc libvulkan-dev (and mesa-vulkan-drivers for a device)"
	hdr=$(echo '#include <vulkan/vulkan_core.h>' | c++ -E -dM -x c++ - 2>/dev/null | awk '$2 == "VK_HEADER_VERSION" { print $3 }')
	[ -n "$hdr" ] || { echo "gpu-backend: Vulkan headers not found. Debian: apt-get install libvulkan-dev" >&2; exit 1; }
	tools="glslc $(glslc --version | sed -n 1p) vulkan-headers $hdr"
	# Vulkan only: a machine that also has CUDA or ROCm must not configure those here.
	cmake_args+=(-DCMAKE_CUDA_COMPILER=CMAKE_CUDA_COMPILER-NOTFOUND -DCMAKE_HIP_COMPILER=CMAKE_HIP_COMPILER-NOTFOUND)
	target=ggml-vulkan
	;;
cuda)
	nvcc=${CUDACXX:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
	[ -x "$nvcc" ] || { echo "gpu-backend: nvcc not found (CUDA toolkit; NVIDIA's nvidia/cuda:*-devel images have it, see Dockerfile.gpu)" >&2; exit 1; }
	# ollama's "CUDA 12" preset list; native when the build machine has the GPU it serves.
	archs=${CUDA_ARCHITECTURES:-"50;61;70;75;80;86;89;90"}
	tools="nvcc $("$nvcc" --version | tail -1) archs $archs"
	cmake_args+=(-DCMAKE_CUDA_COMPILER="$nvcc" -DCMAKE_CUDA_ARCHITECTURES="$archs"
		-DCMAKE_CUDA_FLAGS="-Wno-deprecated-gpu-targets" -DCMAKE_DISABLE_FIND_PACKAGE_Vulkan=ON
		-DCMAKE_HIP_COMPILER=CMAKE_HIP_COMPILER-NOTFOUND)
	target=ggml-cuda
	;;
esac

patches=()
if [ "$backend" = vulkan ]; then
	patches=(build/gpu-patches/*vulkan*.patch)
fi
key=$({
	echo "$mod@$ver $backend $(uname -m)"
	echo "$tools"
	c++ --version | sed -n 1p
	cmake --version | sed -n 1p
	sha256sum "$0" ${patches[@]+"${patches[@]}"}
} | sha256sum | cut -c1-16)
cache=${STRATA_GPU_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/strata/gpu}
out=$cache/$backend-$key
lib=lib/ollama

if [ ! -f "$out/.done" ]; then
	start=$(date +%s)
	work=$out.build
	echo "gpu-backend: building $target from $mod@$ver into $out (cold: tens of minutes for vulkan)"
	rm -rf "$work"
	mkdir -p "$work/src/ml/backend/ggml"
	# ollama's top CMakeLists and its ggml tree are all the build reads.
	cp "$src/CMakeLists.txt" "$work/src/"
	cp -R "$src/ml/backend/ggml/ggml" "$work/src/ml/backend/ggml/"
	chmod -R u+w "$work/src"
	for p in ${patches[@]+"${patches[@]}"}; do
		patch -p1 -s --forward --no-backup-if-mismatch -d "$work/src" <"$p" || {
			echo "gpu-backend: $p does not apply to $mod@$ver" >&2
			exit 1
		}
	done
	# $ORIGIN: the backend finds the libggml-base beside it wherever the directory is copied.
	# GGML_NATIVE stays off (ollama's default): the library does not depend on the build CPU.
	cmake -S "$work/src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release \
		-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON -DCMAKE_INSTALL_RPATH='$ORIGIN' \
		"${cmake_args[@]}" >"$work/configure.log" 2>&1 || {
		tail -30 "$work/configure.log" >&2
		echo "gpu-backend: cmake configure failed, log: $work/configure.log" >&2
		exit 1
	}
	grep -E 'supported by glslc|Vulkan found|CUDA Toolkit found|Using CUDA architectures' "$work/configure.log" || true
	if [ "$backend" = vulkan ] && ! grep -q 'Vulkan found' "$work/configure.log"; then
		echo "gpu-backend: cmake did not find Vulkan (libvulkan-dev, glslc)" >&2
		exit 1
	fi
	cmake --build "$work/build" --target "$target" -j "${JOBS:-$(nproc)}" >"$work/build.log" 2>&1 || {
		tail -30 "$work/build.log" >&2
		echo "gpu-backend: build failed, log: $work/build.log" >&2
		exit 1
	}
	mkdir -p "$out.tmp"
	cp -P "$work/build/lib/ollama/"libggml-base.so* "$work/build/lib/ollama/"lib$target.so* "$out.tmp/"
	echo "$mod@$ver $backend built in $(($(date +%s) - start))s on $(nproc) cores" >"$out.tmp/.done"
	rm -rf "$out"
	mv "$out.tmp" "$out"
	rm -rf "$work"
fi
cat "$out/.done"

# lib/ollama/ holds links to the cached files: the Vulkan and CUDA backends side by side.
mkdir -p "$lib"
for f in "$out"/lib*.so*; do
	ln -sfn "$f" "$lib/$(basename "$f")"
done
echo "gpu-backend: $lib/lib$target.so ready (bin/strata loads it; tests: OLLAMA_LIBRARY_PATH=$PWD/$lib)"
