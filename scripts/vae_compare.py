#!/usr/bin/env python3
"""Side by side on one machine: edm2's VAE decoder (`edm2 decode`) against diffusers'
AutoencoderKL, at the real Stability VAE widths (stabilityai/sd-vae-ft-mse's config) with
random weights (the speed does not depend on them; the weights are written as a diffusers
model folder that both sides load). Reports the decode time per image (median of rounds,
min-max) and how many uint8 values differ between the two (the official decode: latent
un-normalization, decode, clamp to [0, 1], x255, truncation).

    python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch diffusers safetensors numpy
    cargo build --release
    /tmp/torchenv/bin/python scripts/vae_compare.py --edm2 target/release/edm2 --batch 2 --rounds 3
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import time

import numpy as np
import torch
from diffusers import AutoencoderKL

RAW_MEAN = np.array([5.81, 3.25, 0.12, -2.15], dtype=np.float32)
RAW_STD = np.array([4.17, 4.62, 3.71, 3.28], dtype=np.float32)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser()
    ap.add_argument("--edm2", default=os.path.join(here, "..", "target", "release", "edm2"))
    ap.add_argument("--config", default=os.path.join(here, "..", "tests", "data", "golden", "vae", "sd_vae_ft_mse.config.json"))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--latent", type=int, default=64, help="latent side (64 -> 512x512 images)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--work", default="/tmp/edm2-vae-compare")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="both sides on this device")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                    help="edm2's --precision (CUDA: bf16 activations; CPU: bf16 products); with bf16 "
                         "diffusers runs under torch.autocast(bfloat16), its mixed precision")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.makedirs(a.work, exist_ok=True)

    cfg = json.load(open(a.config))
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases
        for name, p in vae.named_parameters():
            if p.ndim == 1:
                p.add_(0.05 * torch.randn_like(p))
    vae_dir = os.path.join(a.work, "vae")
    vae.save_pretrained(vae_dir, safe_serialization=True)

    scale = np.float32(0.5) / RAW_STD
    bias = np.float32(0) - RAW_MEAN * scale
    g = torch.Generator().manual_seed(1)
    final = (torch.randn(a.batch, 4, a.latent, a.latent, generator=g) * 0.5).numpy().astype(np.float32)
    lat_dir = os.path.join(a.work, "latents")
    os.makedirs(lat_dir, exist_ok=True)
    for i in range(a.batch):
        np.save(os.path.join(lat_dir, f"{i:06d}.npy"), final[i])

    # diffusers, as the official StabilityVAEEncoder.decode runs it.
    # (The official code runs the VAE in fp32, as here.)
    vae = vae.to(a.device)
    x = torch.from_numpy(final)
    x = (x - torch.from_numpy(bias).reshape(1, -1, 1, 1)) / torch.from_numpy(scale).reshape(1, -1, 1, 1)
    x = x.to(a.device)
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    t_torch = []
    import contextlib
    amp = torch.autocast(device_type=a.device, dtype=torch.bfloat16) if a.precision == "bf16" else contextlib.nullcontext()
    with torch.no_grad(), amp:
        for r in range(a.rounds):
            sync()
            t0 = time.perf_counter()
            y = vae.decode(x).sample
            sync()
            t_torch.append((time.perf_counter() - t0) / a.batch)
            print(f"diffusers round {r}: {t_torch[-1]:.2f} s per image", flush=True)
    ref = y.float().clamp(0, 1).mul(255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    t_ours = []
    out_dir = os.path.join(a.work, "out")
    for r in range(a.rounds):
        cmd = [a.edm2, "--threads", str(a.threads), "decode", "--vae", vae_dir, "--source", lat_dir, "--dest", out_dir,
               "--batch", str(a.batch), "--overwrite", "--device", a.device, "--precision", a.precision]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(res.stderr)
        m = re.findall(r"\(([0-9.]+) s per image\)", res.stderr)
        t_ours.append(float(m[-1]))
        print(f"edm2 round {r}: {t_ours[-1]:.2f} s per image", flush=True)

    from PIL import Image
    diffs = []
    for i in range(a.batch):
        ours = np.asarray(Image.open(os.path.join(out_dir, f"{i:06d}.png")).convert("RGB"))
        diffs.append(np.abs(ours.astype(np.int32) - ref[i].astype(np.int32)))
    d = np.stack(diffs)
    med = lambda v: statistics.median(v)
    report = {
        "images": f"{a.batch} x {a.latent * 8}x{a.latent * 8}",
        "threads": a.threads,
        "device": a.device,
        "edm2_precision": a.precision,
        "diffusers_autocast_bf16": a.precision == "bf16",
        "torch": torch.__version__,
        "diffusers_s_per_image": [med(t_torch), min(t_torch), max(t_torch)],
        "edm2_s_per_image": [med(t_ours), min(t_ours), max(t_ours)],
        "speedup": med(t_torch) / med(t_ours),
        "uint8_values_differing": int((d > 0).sum()),
        "uint8_values_off_by_more_than_1": int((d > 1).sum()),
        "uint8_values": int(d.size),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
