#!/usr/bin/env python3
"""Times the official EDM2 PyTorch implementation on the CPU, the same measurements as
`edm2 bench`: median training step (EDM2 loss forward with logvar, backward of
loss.sum()/B, nan_to_num of the gradients, Adam step, train mode) and median eval forward.

The official repository is NOT part of this project (its licence is CC BY-NC-SA); fetch
it yourself and point --edm2-repo at a checkout:

    git clone https://github.com/NVlabs/edm2 /tmp/edm2-official
    python3 scripts/bench_official.py --edm2-repo /tmp/edm2-official --config cpu-s32 --batch 32

Prints a JSON line with the same keys as `edm2 bench --json` plus the spread and the peak
RSS of the process (`ru_maxrss`, which covers the whole run).
"""
import argparse, json, resource, statistics, sys, time

PRESETS = {
    "cpu-s32": dict(img_resolution=32, img_channels=3, label_dim=10, model_channels=64,
                    channel_mult=[1, 2, 2], num_blocks=2, attn_resolutions=[16, 8]),
    "cpu-xs16": dict(img_resolution=16, img_channels=3, label_dim=10, model_channels=32,
                     channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8]),
    "edm2-img512-xs": dict(img_resolution=64, img_channels=4, label_dim=1000, model_channels=128),
}

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edm2-repo", required=True)
    ap.add_argument("--config", default="cpu-s32", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=["train", "forward", "both"], default="both")
    a = ap.parse_args()
    sys.path.insert(0, a.edm2_repo)
    import torch
    from training.networks_edm2 import Precond
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    kw = dict(PRESETS[a.config], use_fp16=False, dropout=0)
    net = Precond(**kw)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim == 0:
                p.fill_(0.5)  # non-zero gains so the whole network is exercised
    n, r, c, L = a.batch, kw["img_resolution"], kw["img_channels"], kw["label_dim"]
    images = torch.randn(n, c, r, r)
    labels = torch.eye(L)[torch.arange(n) % L]
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, betas=(0.9, 0.99), eps=1e-8)
    sd = 0.5

    def train_step():
        net.train()
        sigma = (torch.randn(n, 1, 1, 1) * 1.2 - 0.4).exp()
        weight = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
        noise = torch.randn_like(images) * sigma
        D, logvar = net(images + noise, sigma, labels, return_logvar=True)
        loss = (weight / logvar.exp()) * ((D - images) ** 2) + logvar
        opt.zero_grad(set_to_none=True)
        loss.sum().mul(1 / n).backward()
        for p in net.parameters():
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0, posinf=0, neginf=0, out=p.grad)
        opt.step()

    sigma_f = (torch.randn(n) * 1.2 - 0.4).exp()
    x_f = images + torch.randn_like(images) * sigma_f.reshape(-1, 1, 1, 1)

    def forward():
        net.eval()
        with torch.no_grad():
            net(x_f, sigma_f, labels)

    out = {"config": a.config, "batch": n, "threads": a.threads, "torch": torch.__version__}
    for what, fn in [("train", train_step), ("forward", forward)]:
        if a.only not in (what, "both"):
            continue
        fn()  # warm-up
        ts = []
        for _ in range(a.iters):
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1e3)
        out[f"{what}_ms"] = statistics.median(ts)
        out[f"{what}_ms_min"] = min(ts)
        out[f"{what}_ms_max"] = max(ts)
    if "train_ms" in out:
        out["train_step_ms"] = out.pop("train_ms")
        out["images_per_s_train"] = n / (out["train_step_ms"] / 1e3)
    if "forward_ms" in out:
        out["images_per_s_forward"] = n / (out["forward_ms"] / 1e3)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))

if __name__ == "__main__":
    main()
