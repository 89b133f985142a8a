#!/usr/bin/env bash
# Data-parallel training on N GPUs of one machine equals one GPU (issue 20): trains a small
# labelled net with attention and dropout for 4 steps at global batch 64 on 1 GPU and with
# `--nproc-per-node N` (NCCL), then compares every tensor of the two training states
# (bound: 1e-5 relative L2 in fp32; the summation order differs, the images do not).
#
#   scripts/multi-gpu-check.sh N [EDM2_BINARY]    # N in 1, 2, 4, 8 (64 must split over N)
#
# Needs a CUDA build (`cargo build --release --features cuda`; default binary
# target/release/edm2, or gpu-bin/edm2 from `scripts/gpu-check.sh build`), N GPUs, NCCL
# (libnccl.so.2 on the loader's path) and python3 with numpy. N = 1 checks that the NCCL
# path's launcher and one-rank communicator give the plain run's result.
set -euo pipefail
n="${1:?usage: scripts/multi-gpu-check.sh N [EDM2_BINARY]}"
bin="${2:-target/release/edm2}"
[ -x "$bin" ] || bin=gpu-bin/edm2
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cat >"$work/net.json" <<'JSON'
{"img_resolution": 32, "img_channels": 1, "label_dim": 10, "model_channels": 32, "channel_mult": [1, 2],
 "num_blocks": 1, "attn_resolutions": [16], "channels_per_head": 32, "dropout": 0.1, "use_fp16": false}
JSON
common=(--device cuda --precision fp32 --max-size 1000 --batch 64 --duration 256 --status 64 --snapshot 0
        --checkpoint 0 --preview 0 --dynamics 0 --seed 3 --lr 0.01 --rampup 0 --decay 0 --no-verify)
echo "== 1 GPU"
"$bin" train "$work/net.json" --outdir "$work/one" "${common[@]}"
echo "== $n GPUs (--nproc-per-node $n, NCCL)"
"$bin" train "$work/net.json" --outdir "$work/many" --nproc-per-node "$n" "${common[@]}"
grep -h "Ranks joined" "$work/many/log.txt" || echo "(one rank: no roll call)"
python3 - "$work/one" "$work/many" "$n" <<'PY'
import json, os, struct, sys
import numpy as np

def newest_state(d):
    names = sorted(f for f in os.listdir(d) if f.startswith("training-state-") and f.endswith(".safetensors"))
    return os.path.join(d, names[-1])

def read(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        head = json.loads(f.read(n))
        body = f.read()
    meta = head.pop("__metadata__", {})
    dt = {"F32": np.float32, "F64": np.float64, "I64": np.int64, "U8": np.uint8}
    return meta, {k: np.frombuffer(body[v["data_offsets"][0]:v["data_offsets"][1]], dt[v["dtype"]]).astype(np.float64) for k, v in head.items()}

(ma, ta), (mb, tb) = read(newest_state(sys.argv[1])), read(newest_state(sys.argv[2]))
assert ma.get("edm2.nimg") == mb.get("edm2.nimg"), (ma.get("edm2.nimg"), mb.get("edm2.nimg"))
assert ta.keys() == tb.keys()
worst = max((np.linalg.norm(ta[k] - tb[k]) / max(np.linalg.norm(ta[k]), 1e-30), k) for k in ta)
print(f"{sys.argv[3]} GPUs against 1: max relative L2 over {len(ta)} tensors {worst[0]:.2e} ({worst[1]})")
sys.exit(0 if worst[0] <= 1e-5 else 1)
PY
