#!/usr/bin/env bash
# bench/run.sh — builds the release lycoris-server and the codec benchmark, runs every
# benchmark and prints one table on stdout (progress and build output go to stderr).
#
#   bench/run.sh [--python PATH] [--quick] [bench.py options…]     (bench/bench.py --help)
#
# --python / LYCORIS_BENCH_PYTHON: the interpreter with torch + lycoris-lora 4.1.3 used for
# section 3's baseline (default: ./.venv-oracle, then python3; when
# torch or lycoris cannot be imported there the table says so and shows server-only numbers).
# LYCORIS_BENCH_CLIENT_PYTHON: the interpreter that runs the client (needs numpy; default:
# the oracle interpreter when it has numpy, else python3).
# LYCORIS_BENCH_SKIP_BUILD=1 reuses the binaries already built.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH="$ROOT/bench"
SWIFT="${SWIFT:-swift}"

ORACLE="${LYCORIS_BENCH_PYTHON:-}"
ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --python) ORACLE="$2"; shift 2 ;;
        --python=*) ORACLE="${1#--python=}"; shift ;;
        *) ARGS+=("$1"); shift ;;
    esac
done
if [ -z "$ORACLE" ]; then
    for candidate in "$ROOT/.venv-oracle/bin/python"; do
        if [ -x "$candidate" ]; then ORACLE="$candidate"; break; fi
    done
    ORACLE="${ORACLE:-python3}"
fi

CLIENT="${LYCORIS_BENCH_CLIENT_PYTHON:-}"
if [ -z "$CLIENT" ]; then
    if "$ORACLE" -c 'import numpy' >/dev/null 2>&1; then CLIENT="$ORACLE"; else CLIENT=python3; fi
fi
if ! "$CLIENT" -c 'import numpy' >/dev/null 2>&1; then
    echo "bench: $CLIENT has no numpy; set LYCORIS_BENCH_CLIENT_PYTHON to an interpreter with numpy" >&2
    exit 1
fi

SERVER="$ROOT/.build-bench/release/lycoris-server"
CODEC="$BENCH/Codec/.build-bench-codec/release/codec-bench"
if [ "${LYCORIS_BENCH_SKIP_BUILD:-0}" != 1 ]; then
    echo "bench: building lycoris-server (release, --scratch-path .build-bench)" >&2
    (cd "$ROOT" && "$SWIFT" build -c release --scratch-path .build-bench --product lycoris-server) >&2
    echo "bench: building bench/Codec (release, --scratch-path .build-bench-codec)" >&2
    if ! (cd "$BENCH/Codec" && "$SWIFT" build -c release --scratch-path .build-bench-codec) >&2; then
        echo "bench: the codec benchmark did not build; section 4 is skipped" >&2
        CODEC=""
    fi
fi

exec "$CLIENT" "$BENCH/bench.py" --server "$SERVER" ${CODEC:+--codec-bench "$CODEC"} --python "$ORACLE" ${ARGS[@]+"${ARGS[@]}"}
