#!/usr/bin/env bash
# Compiles every kernels/*.cu with nvcc for sm_80 and sm_90 with ptxas verbose output,
# prints registers, shared memory and spills per kernel, and fails if any kernel spills
# registers to local memory (a silent slowdown we never accept).
# Needs nvcc: $NVCC, $CUDA_HOME/bin/nvcc or nvcc on PATH (scripts/install-cuda-toolkit.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
nvcc="${NVCC:-${CUDA_HOME:+$CUDA_HOME/bin/nvcc}}"
nvcc="${nvcc:-$(command -v nvcc || true)}"
[ -x "$nvcc" ] || { echo "error: nvcc not found (set CUDA_HOME or NVCC; scripts/install-cuda-toolkit.sh)" >&2; exit 1; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
status=0
printf '%-15s %-5s %-44s %5s %8s %6s\n' file arch kernel regs smem spill
for f in kernels/*.cu; do
    for arch in 80 90; do
        log="$tmp/$(basename "$f").$arch.log"
        "$nvcc" -O3 -std=c++17 -Ikernels -lineinfo --expt-relaxed-constexpr -Xptxas -v \
            -gencode "arch=compute_$arch,code=sm_$arch" -c "$f" -o "$tmp/k.o" 2>"$log" || { cat "$log" >&2; exit 1; }
        # ptxas prints, per function: "Compiling entry function '<mangled>'", then
        # "N bytes stack frame, S bytes spill stores, L bytes spill loads", then "Used R registers ... smem".
        awk -v file="$(basename "$f")" -v arch="sm_$arch" '
            /Compiling entry function/ { match($0, /'"'"'[^'"'"']*'"'"'/); name = substr($0, RSTART + 1, RLENGTH - 2); next }
            /spill stores/ { spill = $5 + $9 }
            /Used [0-9]+ registers/ {
                regs = $5; smem = 0
                if (match($0, /[0-9]+ bytes smem/)) smem = substr($0, RSTART, RLENGTH - 11)
                if (length(name) > 44) name = substr(name, 1, 41) "..."
                printf "%-15s %-5s %-44s %5s %8s %6s\n", file, arch, name, regs, smem, spill
                if (spill > 0) bad = 1
            }
            END { exit bad }' "$log" || status=1
    done
done
if [ "$status" -ne 0 ]; then
    echo "error: a kernel spills registers (spill column > 0)" >&2
fi
exit $status
