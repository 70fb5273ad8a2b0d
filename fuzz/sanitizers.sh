#!/usr/bin/env bash
# Runs the whole Swift test suite (every test target, the lycoris-server and lycoris processes
# the tests start included) under AddressSanitizer (+ LeakSanitizer) and under
# ThreadSanitizer, each in its own debug build (.build-asan, .build-tsan), and writes the
# results to fuzz/SANITIZERS.md (the record kept in the repository).
#
#   fuzz/sanitizers.sh [address] [thread]      (default: both)
#
# Every sanitized process logs its reports to .build-<san>/reports/<san>.<pid>, so reports of
# the child processes the tests start are counted too, not only the test runner's. Runs under
# `nice -n 15`; exits 1 when a test failed or any report was written. LeakSanitizer reports
# judged not to be leaks of this project's code are suppressed by fuzz/lsan.supp.
set -uo pipefail
cd "$(dirname "$0")/.."
SWIFT=${SWIFT:-swift}
sanitizers=("$@")
[ ${#sanitizers[@]} -gt 0 ] || sanitizers=(address thread)

record=fuzz/SANITIZERS.md
rows=()
failed=0
for sanitizer in "${sanitizers[@]}"; do
    case "$sanitizer" in
        address) scratch=.build-asan; short=asan ;;
        thread) scratch=.build-tsan; short=tsan ;;
        *) echo "fuzz/sanitizers.sh: unknown sanitizer $sanitizer (address or thread)" >&2; exit 64 ;;
    esac
    reports="$scratch/reports"
    rm -rf "$reports"
    mkdir -p "$reports"
    log="$scratch/test.log"
    echo "== $sanitizer: building into $scratch"
    start=$(date +%s)
    if ! nice -n 15 "$SWIFT" build --build-tests --sanitize "$sanitizer" --scratch-path "$scratch" >"$scratch/build.log" 2>&1; then
        tail -20 "$scratch/build.log" >&2
        rows+=("| $sanitizer | build failed (see $scratch/build.log) | | |")
        failed=1
        continue
    fi
    built=$(date +%s)
    echo "== $sanitizer: swift test"
    LSAN_OPTIONS="suppressions=$PWD/fuzz/lsan.supp:print_suppressions=0" \
    ASAN_OPTIONS="log_path=$PWD/$reports/$short:detect_leaks=1:abort_on_error=0" \
    TSAN_OPTIONS="log_path=$PWD/$reports/$short:halt_on_error=0" \
        nice -n 15 "$SWIFT" test --skip-build --sanitize "$sanitizer" --scratch-path "$scratch" >"$log" 2>&1
    status=$?
    finished=$(date +%s)
    result=$(grep -E 'Test run with [0-9]+ tests?' "$log" | tail -1 | sed 's/^[^A-Za-z]*//')
    count=$(find "$reports" -type f | wc -l)
    kinds=$(cat "$reports"/* 2>/dev/null | grep -E '^SUMMARY' | sed 's/^SUMMARY: //' | sort | uniq -c | sed 's/^ *//' | paste -sd ';' -)
    echo "$result"
    echo "reports: $count ${kinds}"
    [ $status -eq 0 ] && [ "$count" -eq 0 ] || failed=1
    rows+=("| $sanitizer | ${result:-no result line (exit $status)} | $count${kinds:+ ($kinds)} | $((built - start)) s + $((finished - built)) s |")
done

{
    echo "# Sanitizer runs (written by fuzz/sanitizers.sh)"
    echo
    echo "Last run: $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- Sources Tests || echo ' + local changes'),"
    echo "$("$SWIFT" --version 2>/dev/null | head -1)."
    echo
    echo "| sanitizer | swift test | reports | build + test time |"
    echo "|---|---|---|---|"
    printf '%s\n' "${rows[@]}"
} >"$record.new"
# Keep the hand-written findings section (everything from "## Findings" on) across runs.
if [ -f "$record" ] && grep -q '^## Findings' "$record"; then
    { echo; sed -n '/^## Findings/,$p' "$record"; } >>"$record.new"
fi
mv "$record.new" "$record"
cat "$record"
exit $failed
