#!/usr/bin/env bash
# Fills the cache entry `make vulkan` (scripts/gpu-backend.sh) looks for, in minutes instead of
# the cold build's hour and more, when only ggml-vulkan.cpp changed since a cached build of the
# same module version (a new patch in build/gpu-patches touching that file alone): it compiles
# the patched ggml-vulkan.cpp as the cold build does (same CMake configuration and flags) and
# links it with the SPIR-V shaders of the earlier build, copied symbol by symbol from its
# libggml-vulkan.so, instead of generating 1428 shaders with glslc again.
#
#   scripts/gpu-vulkan-relink.sh [earlier cache dir]   then   make vulkan   (a cache hit)
#
# It refuses when the shader set differs (the header the shader generator writes for the
# patched source must declare exactly the shaders the earlier library holds) or a patch
# touches a shader. The cache entry's .done says how it was made. Needs cmake, c++, glslc's
# configure checks, python3, binutils.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(uname -m)" = x86_64 ] || { echo "gpu-vulkan-relink: x86-64 only (it reads x86-64 relocations); run make vulkan" >&2; exit 1; }
GO=${GO:-go}
mod=github.com/ollama/ollama
ver=$(awk -v m="$mod" '$1 == m { print $2; exit }' go.mod)
src=$(GOFLAGS= $GO env GOMODCACHE)/$mod@$ver
cache=${STRATA_GPU_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/strata/gpu}

# The key exactly as scripts/gpu-backend.sh computes it (run as `bash scripts/gpu-backend.sh`).
patches=(build/gpu-patches/*vulkan*.patch)
hdr=$(echo '#include <vulkan/vulkan_core.h>' | c++ -E -dM -x c++ - 2>/dev/null | awk '$2 == "VK_HEADER_VERSION" { print $3 }')
tools="glslc $(glslc --version | sed -n 1p) vulkan-headers $hdr"
key=$({
	echo "$mod@$ver vulkan $(uname -m)"
	echo "$tools"
	c++ --version | sed -n 1p
	cmake --version | sed -n 1p
	sha256sum scripts/gpu-backend.sh "${patches[@]}"
} | sha256sum | cut -c1-16)
out=$cache/vulkan-$key
if [ -f "$out/.done" ]; then
	echo "gpu-vulkan-relink: $out exists: $(cat "$out/.done")"
	exit 0
fi
old=${1:-$(ls -td "$cache"/vulkan-*/ 2>/dev/null | while read -r d; do [ -f "$d/.done" ] && grep -q "$mod@$ver" "$d/.done" && echo "${d%/}" && break; done)}
[ -n "$old" ] && [ -f "$old/libggml-vulkan.so" ] || { echo "gpu-vulkan-relink: no earlier build of $mod@$ver under $cache; run make vulkan (cold)" >&2; exit 1; }
if grep -h '^+++ ' "${patches[@]}" | grep 'vulkan-shaders/' | grep -v 'vulkan-shaders/feature-tests/'; then
	echo "gpu-vulkan-relink: a patch touches the shaders: run make vulkan (cold)" >&2
	exit 1
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/strata-vk-relink.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/src/ml/backend/ggml"
cp "$src/CMakeLists.txt" "$work/src/"
cp -R "$src/ml/backend/ggml/ggml" "$work/src/ml/backend/ggml/"
chmod -R u+w "$work/src"
for p in "${patches[@]}"; do patch -p1 -s --forward --no-backup-if-mismatch -d "$work/src" <"$p"; done
cmake -S "$work/src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release \
	-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON -DCMAKE_INSTALL_RPATH='$ORIGIN' \
	-DCMAKE_CUDA_COMPILER=CMAKE_CUDA_COMPILER-NOTFOUND -DCMAKE_HIP_COMPILER=CMAKE_HIP_COMPILER-NOTFOUND \
	-DCMAKE_EXPORT_COMPILE_COMMANDS=ON >"$work/configure.log" 2>&1
cmake --build "$work/build" --target vulkan-shaders-gen >"$work/gen.log" 2>&1
vk=$work/build/ml/backend/ggml/ggml/src/ggml-vulkan
"$work/build/Release/vulkan-shaders-gen" --output-dir "$vk/vulkan-shaders.spv" --target-hpp "$vk/ggml-vulkan-shaders.hpp"

# The earlier library's shader symbols: constant data copied byte for byte, pointer tables
# rebuilt from their relocations, and the length tables the compiler initialises at load time.
python3 - "$old/libggml-vulkan.so" "$vk/ggml-vulkan-shaders.hpp" "$work" <<'EOF'
import re, subprocess, sys
so, header, work = sys.argv[1:4]
run = lambda *a: subprocess.check_output(a, text=True).splitlines()
secs = {}
for l in run('readelf', '-SW', so):
    m = re.match(r'\s*\[\s*\d+\]\s+(\S+)\s+\S+\s+([0-9a-f]+)\s+([0-9a-f]+)\s+([0-9a-f]+)', l)
    if m:
        secs[m.group(1)] = (int(m.group(2), 16), int(m.group(3), 16), int(m.group(4), 16))
relocs = {}
for l in run('readelf', '-rW', so):
    m = re.match(r'([0-9a-f]{16})\s+[0-9a-f]+\s+R_X86_64_64\s+[0-9a-f]+\s+(\S+)\s+\+\s+([0-9a-f]+)', l)
    if m:
        relocs[int(m.group(1), 16)] = (m.group(2), int(m.group(3), 16))
syms = {}
for l in run('nm', '-S', '--defined-only', so):
    p = l.split()
    if len(p) == 4 and p[2] in 'RDB' and re.search(r'_(data|len)$', p[3]):
        syms[p[3]] = (int(p[0], 16), int(p[1], 16), p[2])
declared = set(re.findall(r'extern const [^;]*?\b(\w+_(?:data|len))\b', open(header).read()))
if declared != set(syms):
    sys.exit('gpu-vulkan-relink: the shader set differs from the earlier build (%d declared, %d there, e.g. %s): run make vulkan (cold)'
             % (len(declared), len(syms), sorted(declared ^ set(syms))[:3]))
asm, lens = open(work + '/shaders.S', 'w'), open(work + '/lens.cpp', 'w')
lens.write('#include "ggml-vulkan-shaders.hpp"\n')
va, off, _ = secs['.rodata']
for name, (addr, size, kind) in sorted(syms.items(), key=lambda s: s[1][0]):
    if kind == 'B':  # const uint64_t arr_dmmv_*_len[3] = {..._len, ..._subgroup_len, ..._subgroup_no_shmem_len}
        m = re.match(r'arr_dmmv_(id_)?(\w+)_len$', name)
        p = 'mul_mat_vec_' + (m.group(1) or '') + m.group(2)
        lens.write('const uint64_t %s[3] = {%s_len, %s_subgroup_len, %s_subgroup_no_shmem_len};\n' % (name, p, p, p))
        continue
    asm.write('\t.section .%s.%s,"%s",@progbits\n\t.globl %s\n\t.type %s, @object\n\t.size %s, %d\n\t.balign %d\n%s:\n'
              % ('rodata' if kind == 'R' else 'data', name, 'a' if kind == 'R' else 'aw', name, name, name, size, min(addr & -addr, 32), name))
    if kind == 'R':
        asm.write('\t.incbin "%s", %d, %d\n' % (so, addr - va + off, size))
    else:
        for i in range(0, size, 8):
            s, a = relocs[addr + i]
            asm.write('\t.quad %s%s\n' % (s, '+%d' % a if a else ''))
asm.write('\t.section .note.GNU-stack,"",@progbits\n')
asm.close(); lens.close()
EOF

# ggml-vulkan.cpp with the flags CMake gives it, then the link line CMake would use.
read -r dir cmd < <(python3 -c 'import json,sys; e=next(e for e in json.load(open(sys.argv[1])) if e["file"].endswith("/ggml-vulkan.cpp")); print(e["directory"], e["command"])' "$work/build/compile_commands.json")
(cd "$dir" && eval "$cmd")
as -o "$work/shaders.o" "$work/shaders.S"
c++ -O3 -DNDEBUG -fPIC -std=gnu++17 -I"$vk" -c "$work/lens.cpp" -o "$work/lens.o"
mkdir -p "$out.tmp"
cp -P "$old"/libggml-base.so* "$out.tmp/"
c++ -fPIC -O3 -DNDEBUG -shared -Wl,--no-undefined -o "$out.tmp/libggml-vulkan.so" \
	"$dir/CMakeFiles/ggml-vulkan.dir/ggml-vulkan.cpp.o" "$work/shaders.o" "$work/lens.o" \
	-Wl,-rpath,'$ORIGIN' "$out.tmp/libggml-base.so.0.0.0" /usr/lib/x86_64-linux-gnu/libvulkan.so
echo "$mod@$ver vulkan relinked by scripts/gpu-vulkan-relink.sh: ggml-vulkan.cpp with $(basename -a "${patches[@]}" | tr '\n' ' ')shaders and libggml-base from $(basename "$old")" >"$out.tmp/.done"
rm -rf "$out"
mv "$out.tmp" "$out"
cat "$out/.done"
