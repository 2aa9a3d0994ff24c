#!/usr/bin/env bash
# Prepares the patched engine the Makefile builds with: build/ollama is a copy of the pinned
# github.com/ollama/ollama module (the version in go.mod) with build/engine-patches/*.patch
# applied, and build/go.patched.mod (+ .sum) is go.mod plus a replace pointing at that copy,
# used as `go build -modfile=build/go.patched.mod`. go.mod itself stays pinned, the copy is
# never committed, and a plain `go build` still builds the unpatched engine.
# Cheap when nothing changed: the copy is redone only when the version or a patch changes.
set -euo pipefail
cd "$(dirname "$0")/.."
GO=${GO:-go}

mod=github.com/ollama/ollama
ver=$(awk -v m="$mod" '$1 == m { print $2; exit }' go.mod)
[ -n "$ver" ] || { echo "patch-engine: $mod not found in go.mod" >&2; exit 1; }
src=$(GOFLAGS= $GO env GOMODCACHE)/$mod@$ver
if [ ! -f "$src/go.mod" ]; then
	GOFLAGS= $GO mod download "$mod@$ver"
fi

patches=(build/engine-patches/*.patch)
stamp=$({ echo "$mod@$ver"; sha256sum "${patches[@]}"; } | sha256sum | cut -d' ' -f1)
dst=build/ollama
if [ "$(cat "$dst/.strata-patches" 2>/dev/null)" != "$stamp" ]; then
	echo "patch-engine: copying $mod@$ver and applying ${#patches[@]} patch(es)"
	rm -rf "$dst.tmp" "$dst"
	cp -R "$src" "$dst.tmp"
	chmod -R u+w "$dst.tmp"
	for p in "${patches[@]}"; do
		if command -v patch >/dev/null && [ -z "${PATCH_WITH_GIT:-}" ]; then
			patch -p1 -s --forward --no-backup-if-mismatch -d "$dst.tmp" <"$p"
		else
			# No patch(1) (e.g. the golang image): git apply, kept from taking the copy for
			# part of this repository.
			(cd "$dst.tmp" && GIT_CEILING_DIRECTORIES="$(cd .. && pwd)" git apply -p1 "../../$p")
		fi || {
			echo "patch-engine: $p does not apply to $mod@$ver" >&2
			exit 1
		}
	done
	echo "$stamp" >"$dst.tmp/.strata-patches"
	mv "$dst.tmp" "$dst"
fi

# The module file follows go.mod on every run; rewritten only when it changes.
tmp=$(mktemp -d)/go.mod
trap 'rm -rf "$(dirname "$tmp")"' EXIT
cp go.mod "$tmp"
GOFLAGS= $GO mod edit -modfile="$tmp" -replace "$mod=./$dst"
grep -q "^replace $mod => ./$dst\$" "$tmp" || { echo "patch-engine: go mod edit did not add the replace" >&2; exit 1; }
cmp -s "$tmp" build/go.patched.mod || cp "$tmp" build/go.patched.mod
cmp -s go.sum build/go.patched.sum || cp go.sum build/go.patched.sum
