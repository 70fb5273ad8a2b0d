#!/usr/bin/env bash
# Builds the libFuzzer targets of fuzz/Package.swift (-sanitize=fuzzer,address, scratch path
# .build-fuzz) and runs each from its seed corpus in fuzz/corpus/<target>.
#
#   fuzz/run.sh [--smoke] [-c debug|release] [-n RUNS] [-t SECONDS] [TARGET...]
#
#   --smoke     the CI check (make test): a debug build, each target for 5 seconds from its
#               seeds alone (a fresh working corpus), so a crash on any seed fails the build
#   -c CONFIG   build configuration (default: release, about twice as many inputs a second)
#   -n RUNS     inputs per target (default 1000000)
#   -t SECONDS  stop a target after this long even if RUNS are not done (default: no limit)
#   TARGET      safetensors, framing, network-params, adapter-file (default: all four)
#
# Each target runs in one process on one core, under `nice -n 15`. New coverage is kept in
# .build-fuzz/corpus/<target> (git-ignored) between runs; a crash, leak, timeout or memory
# blow-up is written to .build-fuzz/artifacts/<target>/ and makes the script exit 1. The last
# lines printed are a table of inputs run per target (the record in fuzz/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."

config=release
runs=1000000
seconds=0
smoke=0
targets=()
while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) smoke=1; config=debug; seconds=5; runs=-1 ;;
        -c) config="$2"; shift ;;
        -n) runs="$2"; shift ;;
        -t) seconds="$2"; shift ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        -*) echo "fuzz/run.sh: unknown option $1 (see --help)" >&2; exit 64 ;;
        *) targets+=("$1") ;;
    esac
    shift
done
[ ${#targets[@]} -gt 0 ] || targets=(safetensors framing network-params adapter-file call-record)

SWIFT=${SWIFT:-swift}
scratch=.build-fuzz
# One -sanitize=fuzzer,address flag: swiftc keeps only the last -sanitize= flag it is given, and
# `--sanitize fuzzer --sanitize address` passes two in no fixed order, so a build may silently
# lose the coverage counters or ASan. `--sanitize fuzzer` is still given so that SwiftPM links
# libFuzzer's main instead of the targets' (they have none).
# (The linker's "Cannot export local symbol" notes are dropped; a failed build stops the script,
# never falling back on binaries of an earlier build.)
build_status=0
mkdir -p "$scratch"
nice -n 15 "$SWIFT" build --package-path fuzz --scratch-path "$scratch" -c "$config" \
    --sanitize fuzzer -Xswiftc -sanitize=fuzzer,address > "$scratch/build.log" 2>&1 || build_status=$?
grep -v "Cannot export local symbol" "$scratch/build.log" || true
[ "$build_status" -eq 0 ] || { echo "fuzz/run.sh: the build of the fuzz targets failed (status $build_status)" >&2; exit 1; }
bin="$scratch/$config"

summary=()
failed=0
for target in "${targets[@]}"; do
    [ -d "fuzz/corpus/$target" ] || { echo "fuzz/run.sh: no target $target" >&2; exit 64; }
    [ -x "$bin/fuzz-$target" ] || { echo "fuzz/run.sh: fuzz-$target was not built" >&2; exit 1; }
    banner=$("$bin/fuzz-$target" -runs=0 2>&1 || true)
    symbols=$(nm "$bin/fuzz-$target")
    if ! grep -q 'inline 8-bit counters' <<<"$banner" || ! grep -q ' T __asan_init' <<<"$symbols"; then
        echo "fuzz/run.sh: fuzz-$target lacks coverage counters or ASan" >&2; exit 1
    fi
    work="$scratch/corpus/$target"
    log="$scratch/$target.log"
    if [ $smoke -eq 1 ]; then
        work="$scratch/smoke-corpus/$target"
        log="$scratch/$target-smoke.log"
        rm -rf "$work"
    fi
    mkdir -p "$work" "$scratch/artifacts/$target"
    echo "== fuzz-$target: runs=$runs max_total_time=$seconds ($config)"
    status=0
    nice -n 15 "$bin/fuzz-$target" -runs="$runs" -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 \
        -print_final_stats=1 -artifact_prefix="$scratch/artifacts/$target/" "$work" "fuzz/corpus/$target" \
        >"$log" 2>&1 || status=$?
    done_line=$(grep -E '^Done [0-9]+ runs' "$log" | tail -1 || true)
    executed=$(grep -E '^stat::number_of_executed_units' "$log" | awk '{print $2}' || true)
    if [ $status -ne 0 ]; then
        failed=1
        grep -E 'ERROR|SUMMARY|Fatal error|Test unit written' "$log" | head -8 >&2 || true
        summary+=("| $target | ${executed:-?} | FAILED (exit $status, see $log) |")
    else
        summary+=("| $target | ${executed:-?} | ${done_line:-?} |")
    fi
done

echo
echo "| target | inputs run | result |"
echo "|---|---:|---|"
printf '%s\n' "${summary[@]}"
exit $failed
