#!/usr/bin/env bash
# The CUDA backend on a lent GPU, in two halves (the GPU machine has no Rust toolchain):
#
#   scripts/gpu-check.sh build          # here: builds the cuda test binaries and edm2 into gpu-bin/
#   scripts/gpu-check.sh run [OUTDIR]   # on the GPU machine (gpu-bin/ carried over):
#       1. the kernel and whole-network parity tests against the CPU backend, with
#          EDM2_REQUIRE_GPU=1 (a missing GPU is a failure, not a skip);
#       2. compute-sanitizer memcheck and racecheck on the kernel tests (if installed);
#       3. edm2 bench --device cuda (training step and forward) and the same on the CPU;
#       then prints a short table last. Full logs go to OUTDIR (default: $OUT or ./gpu-check-out).
#
# With the device tool: run(command="scripts/gpu-check.sh run", carry=["gpu-bin"]).
# Also worth measuring while a GPU is lent: the official PyTorch code on the same card
# (scripts/bench_official.py with a fetched NVlabs/edm2 checkout, carried, not committed).
set -uo pipefail
cd "$(dirname "$0")/.."
mode="${1:-}"
bin=gpu-bin

if [ "$mode" = build ]; then
    set -e
    export CUDA_HOME="${CUDA_HOME:-$(scripts/install-cuda-toolkit.sh)}"
    rm -rf "$bin" && mkdir -p "$bin"
    cargo build --release --features cuda --bin edm2
    cp target/release/edm2 "$bin/"
    for t in gpu_kernels gpu_network; do
        exe=$(cargo test --release --features cuda --test "$t" --no-run --message-format=json 2>/dev/null |
            python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])' "$t")
        cp "$exe" "$bin/$t"
    done
    strip "$bin"/* 2>/dev/null || true
    du -sh "$bin"
    echo "built $bin/: $(ls "$bin" | tr '\n' ' ')"
    exit 0
fi

if [ "$mode" != run ]; then
    echo "usage: scripts/gpu-check.sh build | run [OUTDIR]" >&2
    exit 2
fi

out="${2:-${OUT:-./gpu-check-out}}"
mkdir -p "$out"
[ -x "$bin/edm2" ] || { echo "error: $bin/edm2 missing: run 'scripts/gpu-check.sh build' first and carry $bin/" >&2; exit 1; }
export EDM2_REQUIRE_GPU=1
# Every device buffer starts as NaN in the tests (also those a test does not open itself).
export EDM2_POISON_DEVICE_MEMORY=1
declare -a rows
status=0
row() { rows+=("$(printf '%-34s %s' "$1" "$2")"); }

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "no nvidia-smi"; } > "$out/gpu.txt" 2>&1
for t in gpu_kernels gpu_network; do
    if "$bin/$t" --test-threads=1 --nocapture > "$out/$t.log" 2>&1; then
        row "parity $t" "PASS ($(grep -o '[0-9]* passed' "$out/$t.log" | tail -1))"
    else
        row "parity $t" "FAIL (see $t.log)"
        status=1
    fi
done
grep -h "rel L2\|bf16:\|worst" "$out"/gpu_network.log > "$out/errors.txt" 2>/dev/null || true

if command -v compute-sanitizer >/dev/null 2>&1; then
    for tool in memcheck racecheck; do
        if compute-sanitizer --tool "$tool" --error-exitcode 9 "$bin/gpu_kernels" --test-threads=1 > "$out/sanitizer-$tool.log" 2>&1; then
            row "compute-sanitizer $tool" "PASS"
        else
            row "compute-sanitizer $tool" "FAIL (see sanitizer-$tool.log)"
            status=1
        fi
    done
else
    row "compute-sanitizer" "not installed"
fi

for cfg in cpu-xs16 cpu-s32; do
    for dev in cuda cpu; do
        log="$out/bench-$cfg-$dev.log"
        if timeout 300 "$bin/edm2" bench --device "$dev" --config "$cfg" --batch 32 --iters 5 --json > "$log" 2>&1; then
            r=$(grep -o '"images_per_s_train":[^,}]*' "$log" | cut -d: -f2 | awk '{printf "%.1f", $1}')
            f=$(grep -o '"images_per_s_forward":[^,}]*' "$log" | cut -d: -f2 | awk '{printf "%.1f", $1}')
            row "bench $cfg b32 $dev" "train ${r} img/s, forward ${f} img/s"
        else
            row "bench $cfg b32 $dev" "FAIL (see $(basename "$log"))"
            status=1
        fi
    done
done

echo
echo "== gpu-check on $(cat "$out/gpu.txt" 2>/dev/null | head -1)"
cat "$out/errors.txt" 2>/dev/null
printf '%s\n' "${rows[@]}"
exit $status
