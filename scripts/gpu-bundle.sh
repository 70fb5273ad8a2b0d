#!/usr/bin/env bash
# Builds, here, what scripts/gpu-check.sh needs on a GPU host that has no Swift toolchain and
# no network, into one git-ignored folder the device tool can carry (`carry: ["gpu-bundle"]`):
#
#   gpu-bundle/server.tar.xz   lycoris-server (release, --static-swift-stdlib) with every shared
#                              library ldd finds for it — OpenBLAS, jansson, gfortran, quadmath,
#                              libstdc++, libgcc_s and glibc itself with its loader — started
#                              through that loader (bin/lycoris-server is a wrapper), so the
#                              host's glibc version does not matter
#   gpu-bundle/wheels.tar.xz   the Python distributions the check imports besides torch and
#                              numpy, as CPython 3.12 wheels (scripts/gpu_wheels.py)
#   gpu-bundle/MANIFEST        what was built from which commit, the libraries, the wheels
#
#   scripts/gpu-bundle.sh [--out DIR] [--no-build] [--refresh-wheels]
#
# PYTHON (default .venv/bin/python, else python3) must have the test dependencies installed
# (python/requirements-test.txt): their versions are the ones bundled. The wheels are kept
# between runs (the xz pass takes minutes on two cores) unless --refresh-wheels.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$ROOT/gpu-bundle
BUILD=1
REFRESH_WHEELS=0
while [ $# -gt 0 ]; do
    case $1 in
        --out) OUT=$(realpath -m "$2"); shift 2 ;;
        --no-build) BUILD=0; shift ;;
        --refresh-wheels) REFRESH_WHEELS=1; shift ;;
        *) echo "usage: $0 [--out DIR] [--no-build] [--refresh-wheels]" >&2; exit 64 ;;
    esac
done
if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=${PYTHON:-$ROOT/.venv/bin/python}; else PYTHON=${PYTHON:-python3}; fi
SWIFT=${SWIFT:-swift}
# The device tool carries 64 MiB in all: the tracked working tree plus the carried bundle.
CARRY_LIMIT=$((64 * 1024 * 1024))

cd "$ROOT"
if [ "$BUILD" = 1 ]; then
    "$SWIFT" build -c release --product lycoris-server --static-swift-stdlib
fi
BINARY=$ROOT/.build/release/lycoris-server
[ -x "$BINARY" ] || { echo "gpu-bundle: $BINARY is missing (run without --no-build)" >&2; exit 1; }

STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$OUT" "$STAGE/lycoris-server/bin" "$STAGE/lycoris-server/libexec" "$STAGE/lycoris-server/lib"
cp "$BINARY" "$STAGE/lycoris-server/libexec/lycoris-server"
# Symbols and debug sections are most of the static-stdlib binary and are never read on the host.
strip --strip-unneeded "$STAGE/lycoris-server/libexec/lycoris-server"

# Every library the dynamic loader resolves for the binary, and the loader itself.
LOADER=
while read -r line; do
    case $line in
        *"=> not found"*) echo "gpu-bundle: ldd cannot resolve: $line" >&2; exit 1 ;;
        *"=> /"*) path=${line#*=> }; path=${path%% (*} ;;
        /*) path=${line%% (*}; LOADER=$(basename "$path") ;;
        *) continue ;;
    esac
    cp -L "$path" "$STAGE/lycoris-server/lib/$(basename "$path")"
done < <(ldd "$BINARY")
[ -n "$LOADER" ] || { echo "gpu-bundle: ldd named no program interpreter" >&2; exit 1; }

cat > "$STAGE/lycoris-server/bin/lycoris-server" <<EOF
#!/bin/sh
# lycoris-server from scripts/gpu-bundle.sh: the binary through the bundled loader and libraries.
here=\$(dirname "\$(readlink -f "\$0")")/..
exec "\$here/lib/$LOADER" --library-path "\$here/lib" --argv0 "\$0" "\$here/libexec/lycoris-server" "\$@"
EOF
chmod +x "$STAGE/lycoris-server/bin/lycoris-server"

# The bundled server must start from a clean environment (no Swift, no system libraries path).
env -i "$STAGE/lycoris-server/bin/lycoris-server" --help >/dev/null \
    || { echo "gpu-bundle: the bundled server does not start under env -i" >&2; exit 1; }

tar -C "$STAGE" -cf - lycoris-server | xz -T0 -6 > "$OUT/server.tar.xz.tmp"
mv "$OUT/server.tar.xz.tmp" "$OUT/server.tar.xz"

if [ "$REFRESH_WHEELS" = 1 ] || [ ! -f "$OUT/wheels.tar.xz" ]; then
    "$PYTHON" "$ROOT/scripts/gpu_wheels.py" download "$STAGE/wheels" --python-version 3.12 > "$STAGE/wheels.txt"
    tar -C "$STAGE" -cf - wheels | xz -T0 -6 > "$OUT/wheels.tar.xz.tmp"
    mv "$OUT/wheels.tar.xz.tmp" "$OUT/wheels.tar.xz"
    mv "$STAGE/wheels.txt" "$OUT/wheels.txt"
fi

{
    echo "built $(date -u +%Y-%m-%dT%H:%MZ) from git $(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet HEAD -- Sources Package.swift || echo ' (uncommitted changes in Sources)')"
    echo "server: swift build -c release --static-swift-stdlib, $(du -h "$BINARY" | cut -f1); libraries:"
    (cd "$STAGE/lycoris-server/lib" && du -h -- *)
    cat "$OUT/wheels.txt"
} > "$OUT/MANIFEST"

bundle=$(du -cb "$OUT/server.tar.xz" "$OUT/wheels.tar.xz" | tail -1 | cut -f1)
tree=$(git -C "$ROOT" ls-files -z | (cd "$ROOT" && xargs -0 du -cb 2>/dev/null) | awk '$2 == "total" {sum += $1} END {print sum}')
du -h "$OUT/server.tar.xz" "$OUT/wheels.tar.xz"
echo "gpu-bundle: $OUT, $((bundle / 1048576)) MiB + working tree $((tree / 1048576)) MiB (the device tool carries $((CARRY_LIMIT / 1048576)) MiB)"
[ $((bundle + tree)) -le "$CARRY_LIMIT" ] || { echo "gpu-bundle: bundle + working tree are over 64 MiB" >&2; exit 1; }
