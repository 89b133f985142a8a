#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler toolkit from PyPI into a virtual environment
# (no GPU, no driver and no root needed) and prints the CUDA_HOME to use:
#     export CUDA_HOME=$(scripts/install-cuda-toolkit.sh)
#     cargo build --release --features cuda
# Why 13.0: its PTX (ISA 9.0) is what driver 580 can JIT; 13.5 emits PTX 9.5, which it
# cannot (../shared/docs/CUDA-TOOLCHAIN.md). Directory: $EDM2_CUDA_VENV, default
# ~/.cache/edm2/cuda-13.0. Idempotent: an existing install is reused.
set -euo pipefail
venv="${EDM2_CUDA_VENV:-$HOME/.cache/edm2/cuda-13.0}"
home_of() { "$venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))'; }
if [ -x "$venv/bin/python" ] && [ -x "$(home_of 2>/dev/null)/bin/nvcc" ]; then
    home_of
    exit 0
fi
echo "installing the pinned CUDA 13.0 toolkit (about 100 MB of wheels) into $venv" >&2
python3 -m venv "$venv" >&2
"$venv/bin/pip" install --quiet --no-cache-dir \
    nvidia-cuda-nvcc==13.0.88 \
    nvidia-cuda-runtime==13.0.96 \
    nvidia-cuda-crt==13.0.88 \
    nvidia-nvvm==13.0.88 \
    nvidia-cuda-cccl==13.0.85 >&2
"$(home_of)/bin/nvcc" --version | tail -2 >&2
home_of
