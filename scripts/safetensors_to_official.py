#!/usr/bin/env python3
"""Convert an edm2 net file (safetensors with edm2.config metadata: snapshots, post-hoc
reconstructions, anything `edm2` writes) to an official EDM2 network pickle that the
official generate_images.py / reconstruct_phema.py load (`{'ema': Precond}`).

    python3 scripts/safetensors_to_official.py --edm2-repo /path/to/edm2 \
        --in phema-0002048-0.100.safetensors --out net.pkl [--config cfg.json]
"""
import argparse, json, pickle, struct, sys

def read_safetensors(path):
    import numpy as np
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    meta = header.pop("__metadata__", {})
    dt = {"F32": np.float32, "F16": np.float16}
    out = {}
    for name, t in header.items():
        if t["dtype"] == "BF16":
            raw = np.frombuffer(data[t["data_offsets"][0]:t["data_offsets"][1]], dtype="<u2").astype(np.uint32) << 16
            arr = raw.view(np.float32)
        else:
            arr = np.frombuffer(data[t["data_offsets"][0]:t["data_offsets"][1]], dtype=np.dtype(dt[t["dtype"]]).newbyteorder("<"))
        out[name] = arr.astype(np.float32).reshape(t["shape"])
    return out, meta

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edm2-repo", required=True)
    ap.add_argument("--in", dest="inp", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", help="JSON of Precond kwargs when the file has no edm2.config")
    a = ap.parse_args()
    sys.path.insert(0, a.edm2_repo)
    import torch
    from training.networks_edm2 import Precond
    tensors, meta = read_safetensors(a.inp)
    cfg = json.load(open(a.config)) if a.config else json.loads(meta["edm2.config"])
    cfg = cfg.get("kwargs", cfg)
    net = Precond(**cfg)
    net.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in tensors.items()}, strict=True)
    net.eval().requires_grad_(False)
    with open(a.out, "wb") as f:
        pickle.dump(dict(ema=net), f)
    print(f"wrote {a.out}")

if __name__ == "__main__":
    main()
