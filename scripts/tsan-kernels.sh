#!/usr/bin/env bash
# The kernel tests in the simulation harness's race-hunting mode (feature cuda-sim-tsan):
# the threads of every block run concurrently as OS threads with real barriers, and the
# kernels are built with -fsanitize=thread, so ThreadSanitizer reports any two accesses to
# one address (one a write) that no barrier orders — also inside a barrier segment, which
# the fiber mode cannot expose (sim/cuda_sim.h). Two runs:
#   1. positive controls: the reduction without its barrier, and a lost update inside a
#      barrier segment (invisible to the fiber mode), must be reported as races in
#      kernels/reduce.cu (ThreadSanitizer exits 66 when it reported something);
#   2. every other kernel test must pass with no report (exit 0).
# Rust-only false reports (the test harness is not instrumented) are suppressed by
# sim/tsan.supp. Takes a few minutes: a thread per CUDA thread of every block.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! ls /usr/lib/gcc/x86_64-linux-gnu/*/libtsan.so >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq libtsan2 >/dev/null
fi
exe=$(cargo test --release --locked --features cuda-sim-tsan --test gpu_kernels --no-run --message-format=json |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "gpu_kernels":
        print(m["executable"])')
export TSAN_OPTIONS="suppressions=$PWD/sim/tsan.supp exitcode=66"
log=$(mktemp)

# Positive controls: each test runs a kernel with a known race that must be reported in
# the kernel's source.
controls=(harness_catches_a_missing_barrier harness_race_inside_a_barrier_segment)
for t in "${controls[@]}"; do
    set +e
    "$exe" --test-threads=1 --exact "$t" > "$log" 2>&1
    rc=$?
    set -e
    if [ "$rc" -ne 66 ] || ! grep -q "SUMMARY: ThreadSanitizer: data race .*kernels/reduce.cu" "$log"; then
        tail -40 "$log"
        echo "error: positive control $t: its race was not reported (exit $rc)" >&2
        exit 1
    fi
    echo "positive control $t: $(grep -m1 'SUMMARY: ThreadSanitizer' "$log")"
done

set +e
"$exe" --test-threads=1 $(printf -- '--skip %s ' "${controls[@]}") > "$log" 2>&1
rc=$?
set -e
grep -E "^test .*(ok|FAILED)$|test result" "$log" || true
if [ "$rc" -ne 0 ]; then
    grep -A40 "WARNING: ThreadSanitizer" "$log" | head -120
    echo "error: the kernel tests under ThreadSanitizer failed or reported races (exit $rc)" >&2
    exit 1
fi
echo "ThreadSanitizer: no races in the kernel tests"
