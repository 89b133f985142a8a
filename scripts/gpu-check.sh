#!/usr/bin/env bash
# The CUDA backend on a lent GPU, in two halves (the GPU machine has no Rust toolchain):
#
#   scripts/gpu-check.sh build          # here: builds the cuda test binaries and edm2 into gpu-bin/
#   scripts/gpu-check.sh run [OUTDIR]   # on the GPU machine (gpu-bin/ carried over):
#       1. the kernel and whole-network parity tests against the CPU backend, with
#          EDM2_REQUIRE_GPU=1 (a missing GPU is a failure, not a skip);
#       2. edm2 bench --device cuda in fp32 and bf16 (training step, forward, one sampling
#          run on the small config; EDM2-XS and -S at batch 128, the tensor-core
#          convolutions against the SIMT ones), a per-kernel profile of an XS step
#          (EDM2_PROFILE=1), `train --device cuda` on the built-in dataset, and the
#          per-kernel criterion benchmarks on the GPU;
#       3. the official PyTorch code's img/s on the same card when .official/ (a fetched
#          NVlabs/edm2 checkout: training/, torch_utils/, dnnlib/) is carried too;
#       4. compute-sanitizer memcheck on the kernel tests, racecheck on the conv tests;
#       GPU_CHECK_FULL=1 adds the rest (fp32 XS, the CPU bench, more official configs,
#       racecheck on every kernel test) for a lease with time to spare.
#       then prints a short table last. OUTDIR (default: $OUT or ./gpu-check-out) receives
#       summary.txt and gpu-check-logs.tgz (every log).
#
# With the device tool: run(command="scripts/gpu-check.sh run", carry=["gpu-bin", ".official"]).
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
    exe=$(cargo bench --features cuda --bench kernels --no-run --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "kernels":
        print(m["executable"])')
    cp "$exe" "$bin/kernels"
    strip "$bin"/* 2>/dev/null || true
    du -sh "$bin"
    echo "built $bin/: $(ls "$bin" | tr '\n' ' ')"
    exit 0
fi

if [ "$mode" != run ]; then
    echo "usage: scripts/gpu-check.sh build | run [OUTDIR]" >&2
    exit 2
fi

# $OUT brings back at most 8 files: the logs go to a work folder and come back as one archive.
final="${2:-${OUT:-./gpu-check-out}}"
out=$(mktemp -d /tmp/gpu-check.XXXX)
mkdir -p "$final"
[ -x "$bin/edm2" ] || { echo "error: $bin/edm2 missing: run 'scripts/gpu-check.sh build' first and carry $bin/" >&2; exit 1; }
export EDM2_REQUIRE_GPU=1
export EDM2_BIN="$PWD/$bin/edm2"
# Every device buffer starts as NaN in the tests (also those a test does not open itself).
export EDM2_POISON_DEVICE_MEMORY=1
export PYTHONUNBUFFERED=1
declare -a rows
status=0
t0=$(date +%s)
row() { rows+=("$(printf '%-40s %s' "$1" "$2")"); echo "[$(( $(date +%s) - t0 )) s] $1: $2" | tee -a "$final/progress.txt"; }
# Steps past this many seconds are skipped (the lease is short): correctness and our own
# numbers first, then the official code's, then the sanitizers.
budget=${GPU_CHECK_BUDGET_S:-470}
have() { [ $(( $(date +%s) - t0 )) -lt "$budget" ] || { row "$1" "skipped (past the ${budget} s budget)"; return 1; }; }
jget() { grep -o "\"$2\":[^,}]*" "$1" | tail -1 | cut -d: -f2 | awk '{ if ($1 == "null") print "-"; else printf "%.1f", $1 }'; }

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader || echo "no nvidia-smi"; } > "$out/gpu.txt" 2>&1
cat "$out/gpu.txt"

# 1. Parity with the CPU backend.
for t in gpu_kernels gpu_network; do
    if timeout 240 "$bin/$t" --test-threads=1 --nocapture > "$out/$t.log" 2>&1; then
        row "parity $t" "PASS ($(grep -o '[0-9]* passed' "$out/$t.log" | tail -1))"
    else
        row "parity $t" "FAIL (see $t.log): $(grep -m3 'FAILED\|panicked' "$out/$t.log" | tr '\n' ' ' | cut -c1-300)"
        status=1
    fi
done
grep -h "rel L2\|bf16:\|worst" "$out"/gpu_network.log > "$out/errors.txt" 2>/dev/null || true

# 2. Our benchmarks: the training step, the forward pass and (small configs) one sampling run.
bench() { # name, extra args...
    local name=$1; shift
    local log="$out/bench-$name.log"
    have "edm2 $name" || return 0
    if timeout "${BENCH_TIMEOUT:-120}" env -u EDM2_POISON_DEVICE_MEMORY "$bin/edm2" bench --json "$@" > "$log" 2>&1; then
        row "edm2 $name" "train $(jget "$log" images_per_s_train) img/s, forward $(jget "$log" images_per_s_forward), sampling $(jget "$log" images_per_s_sampling); per step $(jget "$log" launches_per_step) launches, $(jget "$log" host_waits_per_step) host waits; $(jget "$log" device_memory_bytes) B device memory, $(jget "$log" device_buffer_bytes) B in buffers"
    else
        row "edm2 $name" "FAIL (see $(basename "$log")): $(tail -2 "$log" | tr '\n' ' ' | cut -c1-200)"
        status=1
    fi
}
bench cpu-s32-b32-cuda-fp32 --device cuda --config cpu-s32 --batch 32 --iters 5 --sampling
# bf16: the tensor-core convolutions (the default: conv_tc.cu forward, conv_tc_backward.cu
# gradients) against conv.cu's SIMT kernels (EDM2_TENSOR_CORE_CONV=0), same run.
bench cpu-s32-b32-cuda-bf16-tc --device cuda --config cpu-s32 --batch 32 --iters 5 --precision bf16 --sampling
# With one XS sampling run at batch 32 (issue 16's sampling case; the state on the device).
BENCH_TIMEOUT=150 bench xs-b32-cuda-bf16-tc --device cuda --config edm2-img512-xs --batch 32 --iters 2 --precision bf16 --sampling
EDM2_TENSOR_CORE_CONV=0 BENCH_TIMEOUT=90 bench xs-b32-cuda-bf16-simt --device cuda --config edm2-img512-xs --batch 32 --iters 2 --precision bf16
# The headline shapes of the issue: batch 128, against the official code's fp16 step below.
BENCH_TIMEOUT=90 bench xs-b128-cuda-bf16-tc --device cuda --config edm2-img512-xs --batch 128 --iters 3 --precision bf16 --only train
BENCH_TIMEOUT=90 bench s-b128-cuda-bf16-tc --device cuda --config edm2-img512-s --batch 128 --iters 2 --precision bf16 --only train
# Our convolutions against cuBLAS's bf16 GEMM on every XS b128 shape (issue 14's table;
# bench --vs-cublas: ms, TFLOP/s, % of 790, speed, rel L2 for the 1x1 ones).
if have "vs-cublas xs-b128"; then
    timeout 150 env -u EDM2_POISON_DEVICE_MEMORY "$bin/edm2" bench --device cuda --config edm2-img512-xs --batch 128 \
        --iters 1 --precision bf16 --only train --vs-cublas > "$out/vs-cublas-xs-b128.log" 2>&1 || status=1
    sed -n '/^ours against cuBLAS/,/every shape once/p' "$out/vs-cublas-xs-b128.log" > "$out/vs-cublas-xs-b128.txt"
    row "vs-cublas xs-b128" "$(grep 'every shape once' "$out/vs-cublas-xs-b128.txt" || tail -1 "$out/vs-cublas-xs-b128.log")"
fi
# Which kernel the first step's tuning kept for each conv shape and direction, with every
# variant's time (EDM2_CONV_ALGO=tune, the default on a GPU; src/backend/gpu/conv_algo.rs).
for name in xs-b128-cuda-bf16-tc s-b128-cuda-bf16-tc; do
    log="$out/bench-$name.log"
    [ -f "$log" ] || continue
    sed -n '/^convolution kernels/,/^device buffers/p' "$log" | grep -v '^device buffers' > "$out/conv-algos-$name.txt"
    row "conv kernels $name" "$(awk 'NR > 1 { n[$7]++ } END { for (a in n) printf "%s x%d; ", a, n[a] }' "$out/conv-algos-$name.txt")"
done
# Where the step goes: EDM2_PROFILE=1 waits for every kernel and books its time (the
# per-kernel table goes to profile-xs-b128.txt and the summary).
if have "profile xs-b128"; then
    timeout 120 env -u EDM2_POISON_DEVICE_MEMORY EDM2_PROFILE=1 "$bin/edm2" bench --device cuda --config edm2-img512-xs \
        --batch 128 --iters 1 --precision bf16 --only train > "$out/profile-xs-b128.log" 2>&1 || status=1
    sed -n '/^profile of/,$p' "$out/profile-xs-b128.log" | head -40 > "$out/profile-xs-b128.txt"
    row "profile xs-b128" "$(sed -n '3,$p' "$out/profile-xs-b128.txt" | grep -v '^total:' | head -4 | awk '{ printf "%s %s ms; ", $1, $2 }')"
fi
[ -n "${GPU_CHECK_FULL:-}" ] && {
    bench cpu-s32-b32-cpu16 --device cpu --config cpu-s32 --batch 32 --iters 3
    BENCH_TIMEOUT=90 bench xs-b32-cuda-fp32 --device cuda --config edm2-img512-xs --batch 32 --iters 2
    EDM2_TENSOR_CORE_CONV=0 bench cpu-s32-b32-cuda-bf16-simt --device cuda --config cpu-s32 --batch 32 --iters 5 --precision bf16
}

# 2a. End to end: `train --device cuda` on the built-in dataset (cpu-fmnist, batch 64, one
# pass and two accumulated passes per step): img/s over the whole run, data loading,
# uploads, Adam and EMA included.
train_row() { # name, extra args...
    local name=$1; shift
    local log="$out/train-$name.log"
    have "edm2 train $name" || return 0
    if timeout 120 env -u EDM2_POISON_DEVICE_MEMORY "$bin/edm2" train --device cuda --duration 16Ki --status 0 \
        --snapshot 0 --checkpoint 0 --preview 0 --outdir "$out/run-$name" "$@" > "$log" 2>&1; then
        row "edm2 train $name" "$(grep -o '[0-9.]* img/s' "$log" | tail -1); $(grep -o '[0-9.]* ms forward+backward, [0-9.]* ms other' "$log" | tail -1)"
    else
        row "edm2 train $name" "FAIL (see $(basename "$log")): $(tail -2 "$log" | tr '\n' ' ' | cut -c1-200)"
        status=1
    fi
    rm -rf "$out/run-$name"
}
train_row cpu-fmnist-b64-bf16 --precision bf16
[ -n "${GPU_CHECK_FULL:-}" ] && { train_row cpu-fmnist-b64; train_row cpu-fmnist-b64-2passes --batch-gpu 32; }

# 2b. Per-kernel benchmarks (criterion) at batch 64 of an EDM2-S 16x16 level.
if [ -x "$bin/kernels" ] && have "kernel benchmarks"; then
    if EDM2_BENCH_BATCH=64 timeout 150 env -u EDM2_POISON_DEVICE_MEMORY "$bin/kernels" --bench "${KERNEL_BENCH_FILTER:-cuda/}" \
        --warm-up-time 0.5 --measurement-time 1 --noplot > "$out/kernels.log" 2>&1; then
        # "name  time: [lo median hi]" (criterion puts long names on their own line).
        awk '/^cuda\// { name = $1 } /time:/ { printf "%-40s %s %s\n", "kernel " name, $(NF-3), $(NF-2) }' "$out/kernels.log" > "$out/kernels.txt"
        while read -r l; do rows+=("$l"); done < "$out/kernels.txt"
    else
        row "kernel benchmarks" "FAIL (see kernels.log)"
        status=1
    fi
fi

# 3. The official PyTorch code on the same card (a checkout carried in .official/, never committed).
if [ -d .official/training ] && command -v python3 >/dev/null; then
    off() { # name, args...
        local name=$1; shift
        local log="$out/official-$name.log"
        have "official $name" || return 0
        timeout "${OFFICIAL_TIMEOUT:-200}" python3 scripts/bench_official.py --edm2-repo .official --device cuda "$@" > "$log" 2>&1 || status=1
        while read -r l; do
            case "$l" in
            "{"*) cfg=$(echo "$l" | grep -o '"config": "[^"]*"' | cut -d'"' -f4)
                  echo "$l" > "$out/tmp.json"
                  row "official $cfg $name" "train $(jget "$out/tmp.json" images_per_s_train) img/s, forward $(jget "$out/tmp.json" images_per_s_forward), sampling $(jget "$out/tmp.json" images_per_s_sampling)" ;;
            esac
        done < "$log"
        grep -q '^{' "$log" || row "official $name" "FAIL: $(tail -2 "$log" | tr '\n' ' ' | cut -c1-200)"
    }
    off b128-fp16 --config edm2-img512-xs,edm2-img512-s --batch 128 --iters 10 --fp16 --only train
    [ -n "${GPU_CHECK_FULL:-}" ] && {
        off b32-fp32 --config cpu-s32,edm2-img512-xs --batch 32 --iters 5 --sampling --sampling-batch 32
        off b64-fp16 --config edm2-img512-xs,edm2-img512-s --batch 64 --iters 10 --fp16 --sampling --sampling-batch 32
        off b32-fp16-guided --config edm2-img512-xs,edm2-img512-s --batch 32 --iters 5 --fp16 --only forward --sampling --sampling-batch 32 --guidance
    }
else
    row "official PyTorch" "skipped (no .official/ checkout carried, or no python3)"
fi

# 4. compute-sanitizer on the kernel tests.
if command -v compute-sanitizer >/dev/null 2>&1; then
    for tool in memcheck racecheck; do
        have "compute-sanitizer $tool" || continue
        # racecheck instruments every access: the upload-ordering stress test (thousands of
        # 16 MB launches, no shared memory) ran past 150 s under it on an H200; memcheck runs it.
        skip=(); [ "$tool" = racecheck ] && skip=(--skip uploads_are_ordered_against_the_compute_stream)
        # Without GPU_CHECK_FULL, racecheck covers the tests that use shared memory most
        # (convolutions and tensor-core fragments); memcheck runs them all.
        [ "$tool" = racecheck ] && [ -z "${GPU_CHECK_FULL:-}" ] && skip=(conv)
        if timeout 150 compute-sanitizer --tool "$tool" --error-exitcode 9 "$bin/gpu_kernels" --test-threads=1 "${skip[@]}" > "$out/sanitizer-$tool.log" 2>&1; then
            row "compute-sanitizer $tool" "PASS"
        else
            row "compute-sanitizer $tool" "FAIL (see sanitizer-$tool.log): $(grep -m2 'ERROR\|Invalid\|hazard' "$out/sanitizer-$tool.log" | tr '\n' ' ' | cut -c1-200)"
            status=1
        fi
    done
else
    row "compute-sanitizer" "not installed"
fi

summary="$final/summary.txt"
{
    echo "== gpu-check on $(head -1 "$out/gpu.txt") in $(( $(date +%s) - t0 )) s"
    cat "$out/errors.txt" 2>/dev/null
    printf '%s\n' "${rows[@]}"
} > "$summary"
tar -czf "$final/gpu-check-logs.tgz" -C "$out" .
echo
cat "$summary"
exit $status
