#!/usr/bin/env python3
"""Side-by-side CPU benchmark: `edm2 bench` against the official PyTorch code
(scripts/bench_official.py), alternating runs on the same machine in the same session,
plus the peak RSS of a process doing only training steps (/usr/bin/time -f %M).

    python3 scripts/perf_compare.py --edm2-repo /tmp/edm2-official --python /tmp/torchenv/bin/python

Prints one JSON object per measurement and a Markdown table at the end (docs/perf.md).
"""
import argparse, json, os, statistics, subprocess, sys

CASES = [("cpu-s32", 32, 5, 3), ("cpu-xs16", 64, 10, 3), ("edm2-img512-xs", 4, 2, 1)]

def run(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{out.stderr[-2000:]}")
    return out

def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edm2-repo", required=True)
    ap.add_argument("--python", default=sys.executable, help="a Python with torch")
    ap.add_argument("--edm2-bin", default=os.path.join(here, "..", "target", "release", "edm2"))
    ap.add_argument("--cases", default=",".join(c[0] for c in CASES))
    ap.add_argument("--bf16", action="store_true",
                    help="ours with --precision bf16 against the official code under torch.autocast(bfloat16)")
    a = ap.parse_args()
    rows = []
    for name, batch, iters, rounds in CASES:
        if name not in a.cases.split(","):
            continue
        ours_cmd = [a.edm2_bin, "bench", "--config", name, "--batch", str(batch), "--iters", str(iters), "--json"]
        torch_cmd = [a.python, os.path.join(here, "bench_official.py"), "--edm2-repo", a.edm2_repo,
                     "--config", name, "--batch", str(batch), "--iters", str(iters)]
        if a.bf16:
            ours_cmd += ["--precision", "bf16"]
            torch_cmd += ["--autocast-bf16"]
        res = {"ours": [], "torch": []}
        for r in range(rounds):
            for who, cmd in (("ours", ours_cmd), ("torch", torch_cmd)):
                j = json.loads(run(cmd).stdout.strip().splitlines()[-1])
                print(json.dumps({"case": name, "round": r, "who": who, **j}), flush=True)
                res[who].append(j)
        mem = {}
        for who, cmd in (("ours", ours_cmd), ("torch", torch_cmd)):
            c = [x if x != str(iters) else "1" for x in cmd] + ["--only", "train"]
            out = run(["/usr/bin/time", "-f", "%M"] + c)
            mem[who] = int(out.stderr.strip().splitlines()[-1]) / 1024
        print(json.dumps({"case": name, "peak_rss_mb": mem}), flush=True)
        rows.append((name, batch, res, mem))
    print("\n| config | batch | | ours | official PyTorch | speed-up |")
    print("|---|---|---|---|---|---|")
    for name, batch, res, mem in rows:
        for key, label in (("train_step_ms", "train step ms"), ("forward_ms", "forward ms")):
            o = [j[key] for j in res["ours"]]
            t = [j[key] for j in res["torch"]]
            om, tm = statistics.median(o), statistics.median(t)
            print(f"| {name} | {batch} | {label} | {om:.1f} ({min(o):.1f}–{max(o):.1f}) | {tm:.1f} ({min(t):.1f}–{max(t):.1f}) | {tm / om:.2f}x |")
        print(f"| {name} | {batch} | peak RSS, train steps only (MB) | {mem['ours']:.0f} | {mem['torch']:.0f} | {mem['ours'] / mem['torch']:.2f}x of torch |")

if __name__ == "__main__":
    main()
