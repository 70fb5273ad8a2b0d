#!/usr/bin/env bash
# bench/run.sh — builds the release lycoris-server and the codec benchmark, runs every
# benchmark and prints one table on stdout (progress and build output go to stderr).
#
#   bench/run.sh [--python PATH] [--quick] [bench.py options…]     (bench/bench.py --help)
#
# --python / LYCORIS_BENCH_PYTHON: the interpreter with torch + lycoris-lora 4.1.3 used for
# section 3's baseline (default: ./.venv (what make test creates: torch + lycoris-lora), then ./.venv-oracle, then python3; when
# torch or lycoris cannot be imported there the table says so and shows server-only numbers).
# LYCORIS_BENCH_CLIENT_PYTHON: the interpreter that runs the client (needs numpy; default:
# the oracle interpreter when it has numpy, else python3).
# LYCORIS_BENCH_SKIP_BUILD=1 reuses the binaries already built.
#
# Section 5 (bench/train_step.py, printed after the others): a whole kohya training step,
# swift_lycoris.kohya vs lycoris.kohya. --train-python / LYCORIS_BENCH_TRAIN_PYTHON: the
# interpreter with torch, diffusers, transformers, lycoris-lora 4.1.3 and swift_lycoris
# (default: ./.venv, then the oracle interpreter). It takes --quick, --threads and --sections
# (5) from the command line; LYCORIS_BENCH_TRAIN_ARGS adds train_step.py's own options.
#
# Section 6 (bench/layers.py, printed last): per-layer adapter cost, LyCORIS 4.1.3's better
# mode vs this engine in-process (bench/LayerBench, built here as `layer-bench`) vs delegated
# through swift_lycoris; same interpreter as section 5. It takes --quick and the last of
# --threads (default 2); LYCORIS_BENCH_LAYERS_ARGS adds layers.py's own options. Its chart
# goes to .build-bench/layers.png. Then bench/growth.py (cost growth against tokens, rank and
# width; same --quick and --threads, LYCORIS_BENCH_GROWTH_ARGS), plot .build-bench/growth.png.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH="$ROOT/bench"
SWIFT="${SWIFT:-swift}"

ORACLE="${LYCORIS_BENCH_PYTHON:-}"
TRAIN_PYTHON="${LYCORIS_BENCH_TRAIN_PYTHON:-}"
ARGS=()
STEP_ARGS=()
SECTIONS="1,2,3,4,5,6"
LAYER_ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --python) ORACLE="$2"; shift 2 ;;
        --python=*) ORACLE="${1#--python=}"; shift ;;
        --train-python) TRAIN_PYTHON="$2"; shift 2 ;;
        --train-python=*) TRAIN_PYTHON="${1#--train-python=}"; shift ;;
        --quick) STEP_ARGS+=(--quick); LAYER_ARGS+=(--quick); ARGS+=("$1"); shift ;;
        --threads) STEP_ARGS+=(--threads "$2"); LAYER_ARGS+=(--threads "${2##*,}"); ARGS+=("$1" "$2"); shift 2 ;;
        --threads=*) STEP_ARGS+=("$1"); LAYER_ARGS+=(--threads "${1##*[=,]}"); ARGS+=("$1"); shift ;;
        --sections) SECTIONS="$2"; ARGS+=("$1" "$2"); shift 2 ;;
        --sections=*) SECTIONS="${1#--sections=}"; ARGS+=("$1"); shift ;;
        *) ARGS+=("$1"); shift ;;
    esac
done
has_section() { case ",$SECTIONS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
if [ -z "$ORACLE" ]; then
    for candidate in "$ROOT/.venv/bin/python" "$ROOT/.venv-oracle/bin/python"; do
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
LAYER_BENCH="$ROOT/.build-bench/release/layer-bench"
CODEC="$BENCH/Codec/.build-bench-codec/release/codec-bench"
if [ "${LYCORIS_BENCH_SKIP_BUILD:-0}" != 1 ]; then
    echo "bench: building lycoris-server (release, --scratch-path .build-bench)" >&2
    (cd "$ROOT" && "$SWIFT" build -c release --scratch-path .build-bench --product lycoris-server) >&2
    if has_section 6; then
        (cd "$ROOT" && "$SWIFT" build -c release --scratch-path .build-bench --product layer-bench) >&2
    fi
    echo "bench: building bench/Codec (release, --scratch-path .build-bench-codec)" >&2
    if ! (cd "$BENCH/Codec" && "$SWIFT" build -c release --scratch-path .build-bench-codec) >&2; then
        echo "bench: the codec benchmark did not build; section 4 is skipped" >&2
        CODEC=""
    fi
fi

STATUS=0
if has_section 1 || has_section 2 || has_section 3 || has_section 4; then
    "$CLIENT" "$BENCH/bench.py" --server "$SERVER" ${CODEC:+--codec-bench "$CODEC"} --python "$ORACLE" \
        ${ARGS[@]+"${ARGS[@]}"} || STATUS=$?
fi

if [ -z "$TRAIN_PYTHON" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then TRAIN_PYTHON="$ROOT/.venv/bin/python"; else TRAIN_PYTHON="$ORACLE"; fi
fi

# Section 5: the training step, after the others (its own table, same columns).
if has_section 5; then
    echo
    if [ "$TRAIN_PYTHON" = none ] || ! command -v "$TRAIN_PYTHON" >/dev/null 2>&1; then
        echo "section 5 skipped: no interpreter for bench/train_step.py (--train-python / LYCORIS_BENCH_TRAIN_PYTHON)"
    else
        echo "section 5: training step ($TRAIN_PYTHON)" >&2
        # shellcheck disable=SC2086  # LYCORIS_BENCH_TRAIN_ARGS is split on purpose
        "$TRAIN_PYTHON" "$BENCH/train_step.py" --server "$SERVER" ${STEP_ARGS[@]+"${STEP_ARGS[@]}"} \
            ${LYCORIS_BENCH_TRAIN_ARGS:-} || STATUS=$?
    fi
fi
# Section 6: per-layer adapter cost (its own table).
if has_section 6; then
    echo
    if [ "$TRAIN_PYTHON" = none ] || ! command -v "$TRAIN_PYTHON" >/dev/null 2>&1; then
        echo "section 6 skipped: no interpreter for bench/layers.py (--train-python / LYCORIS_BENCH_TRAIN_PYTHON)"
    else
        echo "section 6: per-layer adapter cost ($TRAIN_PYTHON)" >&2
        # shellcheck disable=SC2086  # LYCORIS_BENCH_LAYERS_ARGS is split on purpose
        PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}" "$TRAIN_PYTHON" "$BENCH/layers.py" \
            --layer-bench "$LAYER_BENCH" --server "$SERVER" --chart "$ROOT/.build-bench/layers.png" \
            ${LAYER_ARGS[@]+"${LAYER_ARGS[@]}"} ${LYCORIS_BENCH_LAYERS_ARGS:-} || STATUS=$?
        echo
        echo "section 6: cost growth ($TRAIN_PYTHON)" >&2
        # shellcheck disable=SC2086  # LYCORIS_BENCH_GROWTH_ARGS is split on purpose
        PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}" "$TRAIN_PYTHON" "$BENCH/growth.py" \
            --server "$SERVER" --plot "$ROOT/.build-bench/growth.png" \
            ${LAYER_ARGS[@]+"${LAYER_ARGS[@]}"} ${LYCORIS_BENCH_GROWTH_ARGS:-} || STATUS=$?
    fi
fi
exit "$STATUS"
