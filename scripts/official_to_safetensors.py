#!/usr/bin/env python3
"""Convert an official EDM2 network pickle (e.g. NVIDIA's published
edm2-img512-xs-2147483-0.135.pkl or a training snapshot) to an edm2 net file:
safetensors with the official state_dict names and the edm2 metadata.

Needs torch and a checkout of the official repository (for unpickling):

    python3 scripts/official_to_safetensors.py --edm2-repo /path/to/edm2 \
        --in edm2-img512-xs-2147483-0.135.pkl --out xs.safetensors [--dtype f16]
    edm2 generate --net xs.safetensors --seeds 0-15

Metadata written: edm2.format=net, edm2.config (the Precond keyword arguments as JSON),
edm2.encoder (the encoder's keyword arguments as JSON, when the pickle has one),
edm2.ema_std / edm2.nimg when they can be read from the file name
(<name>-<kimg>-<std>.pkl).
"""
import argparse, json, os, re, struct, sys

def write_safetensors(path, tensors, metadata):
    """tensors: list of (name, numpy array) in order; f32 or f16."""
    header = {"__metadata__": metadata}
    offset = 0
    for name, arr in tensors:
        dtype = {"float32": "F32", "float16": "F16"}[str(arr.dtype)]
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    h = json.dumps(header).encode()
    h += b" " * ((8 - (8 + len(h)) % 8) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for _, arr in tensors:
            f.write(arr.astype(arr.dtype.newbyteorder("<")).tobytes())
    os.replace(tmp, path)

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edm2-repo", required=True, help="checkout of NVlabs/edm2 (for unpickling)")
    ap.add_argument("--in", dest="inp", required=True, help="official .pkl")
    ap.add_argument("--out", required=True, help="output .safetensors")
    ap.add_argument("--key", default="ema", help="which network in the pickle (default: ema)")
    ap.add_argument("--dtype", choices=["f32", "f16"], default="f32")
    a = ap.parse_args()
    sys.path.insert(0, a.edm2_repo)
    import pickle, numpy as np, torch
    with open(a.inp, "rb") as f:
        data = pickle.load(f)
    net = data[a.key] if isinstance(data, dict) else data
    kwargs = dict(getattr(net, "init_kwargs", {}))
    if not kwargs:
        sys.exit("the network has no init_kwargs (not a persistent official class?)")
    meta = {"edm2.format": "net", "edm2.config": json.dumps(kwargs)}
    enc = data.get("encoder") if isinstance(data, dict) else None
    if enc is not None and hasattr(enc, "init_kwargs"):
        meta["edm2.encoder"] = json.dumps(dict(enc.init_kwargs), default=str)
    m = re.search(r"-(\d+)-(\d\.\d+)\.pkl$", os.path.basename(a.inp))
    if m:
        kimg = int(m.group(1))
        meta["edm2.nimg"] = str((kimg * 1000 + 999) // 1024 * 1024)
        meta["edm2.ema_std"] = m.group(2)
    np_dtype = np.float16 if a.dtype == "f16" else np.float32
    tensors = [(k, v.detach().to(torch.float32).cpu().numpy().astype(np_dtype)) for k, v in net.state_dict().items()]
    write_safetensors(a.out, tensors, meta)
    print(f"wrote {len(tensors)} tensors to {a.out}")

if __name__ == "__main__":
    main()
