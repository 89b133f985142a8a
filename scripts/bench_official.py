#!/usr/bin/env python3
"""Times the official EDM2 PyTorch implementation, the same measurements as `edm2 bench`:
median training step (EDM2 loss forward with logvar, backward of loss.sum()/B, nan_to_num
of the gradients, Adam step, train mode), median eval forward and, with --sampling, one
whole EDM sampling run (32 Heun steps = 63 evaluations; with --guidance, each evaluation
also runs the guiding network, an unconditional XS as in the official presets).

On a GPU (--device cuda) the official training settings apply: cudnn.benchmark on, TF32
off, and the network in FP16 with --fp16 (the official default, `use_fp16=True`). Times
are taken after torch.cuda.synchronize().

The official repository is NOT part of this project (its licence is CC BY-NC-SA); fetch
it yourself and point --edm2-repo at a checkout:

    git clone https://github.com/NVlabs/edm2 /tmp/edm2-official
    python3 scripts/bench_official.py --edm2-repo /tmp/edm2-official --config cpu-s32 --batch 32
    python3 scripts/bench_official.py --edm2-repo ... --device cuda --fp16 \
        --config edm2-img512-xs,edm2-img512-s --batch 64 --sampling --sampling-batch 32

Prints a JSON line per config with the same keys as `edm2 bench --json` plus the spread and the peak
RSS of the process (`ru_maxrss`, which covers the whole run).
"""
import argparse, json, resource, statistics, sys, time

PRESETS = {
    "cpu-s32": dict(img_resolution=32, img_channels=3, label_dim=10, model_channels=64,
                    channel_mult=[1, 2, 2], num_blocks=2, attn_resolutions=[16, 8]),
    "cpu-xs16": dict(img_resolution=16, img_channels=3, label_dim=10, model_channels=32,
                     channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8]),
    "edm2-img512-xs": dict(img_resolution=64, img_channels=4, label_dim=1000, model_channels=128),
    "edm2-img512-s": dict(img_resolution=64, img_channels=4, label_dim=1000, model_channels=192),
}


def sigma_steps(num_steps=32, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """The EDM time steps (Karras et al. 2022, eq. 5), with t_N = 0 appended."""
    import torch
    i = torch.arange(num_steps, dtype=torch.float64)
    t = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


def heun_sample(denoise, noise, num_steps=32):
    """Deterministic 2nd-order Heun sampler (no churn): 2·num_steps − 1 evaluations."""
    import torch
    t = sigma_steps(num_steps).to(noise.device)
    x = noise.to(torch.float64) * t[0]
    for i in range(num_steps):
        d = (x - denoise(x, t[i])) / t[i]
        x_next = x + (t[i + 1] - t[i]) * d
        if i < num_steps - 1:
            d2 = (x_next - denoise(x_next, t[i + 1])) / t[i + 1]
            x_next = x + (t[i + 1] - t[i]) * (0.5 * d + 0.5 * d2)
        x = x_next
    return x


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edm2-repo", required=True)
    ap.add_argument("--config", default="cpu-s32", help="one or more of %s, comma-separated" % ", ".join(sorted(PRESETS)))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--fp16", action="store_true", help="use_fp16=True (the official training default; CUDA only)")
    ap.add_argument("--autocast-bf16", action="store_true",
                    help="run forward and backward under torch.autocast(dtype=torch.bfloat16) "
                         "(PyTorch's CPU mixed precision; compare with `edm2 bench --precision bf16`)")
    ap.add_argument("--sampling", action="store_true", help="also time one whole sampling run (63 evaluations)")
    ap.add_argument("--sampling-batch", type=int, default=32)
    ap.add_argument("--guidance", action="store_true", help="sampling with an unconditional XS guiding network")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=["train", "forward", "both"], default="both")
    a = ap.parse_args()
    sys.path.insert(0, a.edm2_repo)
    import torch
    torch.set_num_threads(a.threads)
    if a.device == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    for config in a.config.split(","):
        if config not in PRESETS:
            sys.exit(f"unknown config {config!r}; known: {', '.join(sorted(PRESETS))}")
        print(json.dumps(bench(a, config)), flush=True)


def bench(a, config):
    import torch
    from training.networks_edm2 import Precond
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    torch.manual_seed(0)
    kw = dict(PRESETS[config], use_fp16=a.fp16, dropout=0)
    net = Precond(**kw).to(dev)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim == 0:
                p.fill_(0.5)  # non-zero gains so the whole network is exercised
    n, r, c, L = a.batch, kw["img_resolution"], kw["img_channels"], kw["label_dim"]
    images = torch.randn(n, c, r, r, device=dev)
    labels = torch.eye(L, device=dev)[torch.arange(n, device=dev) % L]
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, betas=(0.9, 0.99), eps=1e-8)
    sd = 0.5

    import contextlib
    def amp():
        if a.autocast_bf16:
            return torch.autocast(device_type=a.device, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step():
        net.train()
        sigma = (torch.randn(n, 1, 1, 1, device=dev) * 1.2 - 0.4).exp()
        weight = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
        noise = torch.randn_like(images) * sigma
        with amp():
            D, logvar = net(images + noise, sigma, labels, return_logvar=True)
            loss = (weight / logvar.exp()) * ((D.float() - images) ** 2) + logvar.float()
        opt.zero_grad(set_to_none=True)
        loss.sum().mul(1 / n).backward()
        for p in net.parameters():
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0, posinf=0, neginf=0, out=p.grad)
        opt.step()

    sigma_f = (torch.randn(n, device=dev) * 1.2 - 0.4).exp()
    x_f = images + torch.randn_like(images) * sigma_f.reshape(-1, 1, 1, 1)

    def forward():
        net.eval()
        with torch.no_grad(), amp():
            net(x_f, sigma_f, labels)

    out = {"config": config, "batch": n, "device": a.device, "fp16": a.fp16, "autocast_bf16": a.autocast_bf16, "torch": torch.__version__}
    if a.device == "cuda":
        out["gpu"] = torch.cuda.get_device_name()
    else:
        out["threads"] = a.threads
    for what, fn in [("train", train_step), ("forward", forward)]:
        if a.only not in (what, "both"):
            continue
        for _ in range(2 if a.device == "cuda" else 1):
            fn()  # warm-up (on a GPU also cudnn's algorithm search)
        sync()
        ts = []
        for _ in range(a.iters):
            t = time.perf_counter()
            fn()
            sync()
            ts.append((time.perf_counter() - t) * 1e3)
        out[f"{what}_ms"] = statistics.median(ts)
        out[f"{what}_ms_min"] = min(ts)
        out[f"{what}_ms_max"] = max(ts)
    if "train_ms" in out:
        out["train_step_ms"] = out.pop("train_ms")
        out["images_per_s_train"] = n / (out["train_step_ms"] / 1e3)
    if "forward_ms" in out:
        out["images_per_s_forward"] = n / (out["forward_ms"] / 1e3)
    if a.sampling:
        ns = a.sampling_batch
        net.eval()
        gnet = None
        if a.guidance:
            # The official presets guide every ImageNet-512 model with an unconditional XS.
            gkw = PRESETS["edm2-img512-xs"] if config.startswith("edm2-img512") else PRESETS[config]
            gnet = Precond(**dict(gkw, label_dim=0, use_fp16=a.fp16, dropout=0)).to(dev).eval()
        lab = torch.eye(L, device=dev)[torch.arange(ns, device=dev) % L] if L else None
        evals = [0]

        @torch.no_grad()
        def denoise(x, t):
            evals[0] += 1
            sig = t.expand(ns)
            d = net(x, sig, lab).to(torch.float64)
            if gnet is not None:
                d = gnet(x, sig).to(torch.float64).lerp(d, 1.4)
            return d

        noise = torch.randn(ns, c, r, r, device=dev)
        heun_sample(denoise, noise, num_steps=2)  # warm-up
        sync()
        evals[0] = 0
        t = time.perf_counter()
        heun_sample(denoise, noise)
        sync()
        s = time.perf_counter() - t
        out.update(sampling_batch=ns, sampling_evaluations=evals[0], sampling_guidance=a.guidance,
                   sampling_s=s, images_per_s_sampling=ns / s)
    if a.device == "cuda":
        out["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out

if __name__ == "__main__":
    main()
