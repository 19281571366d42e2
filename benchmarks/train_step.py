"""Time per training step: the SN-Net running a sampled stitch vs. the same stitch built as a standalone network.

The standalone network is an nn.Sequential holding exactly the modules the route executes (the same module objects,
so the arithmetic is identical); the SN-Net runs the route through `forward(x, cfg_id)`. Both do forward, loss,
backward and an SGD step on the same batch, interleaved rep by rep, in one process. Target: ratio <= 1.05.

    .venv/bin/python benchmarks/train_step.py [--img-size 224] [--batch 16] [--reps 12]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from snnet import build_snnet, load_stitch_config  # noqa: E402
from snnet.sampler import StitchSampler  # noqa: E402


class _Step(nn.Module):
    def __init__(self, net, step):
        super().__init__()
        self.owner = net.anchors[step[1]] if step[0] == "unit" else net.stitch_layer(step[1])
        self.fn = (lambda x, u=net.units[step[1]][step[2]], m=self.owner: u.run(m, x)) if step[0] == "unit" \
            else self.owner

    def forward(self, x):
        return self.fn(x)


def standalone(net, cfg_id: int) -> nn.Sequential:
    return nn.Sequential(*[_Step(net, s) for s in net.routes[cfg_id]])


def time_step(fn, params, x, y) -> float:
    opt = torch.optim.SGD(params, lr=1e-4)
    t0 = time.perf_counter()
    loss = nn.functional.cross_entropy(fn(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/deit_ti_s_b.json")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--reps", type=int, default=12)
    p.add_argument("--stitches", type=int, default=3, help="sampled stitches to time")
    args = p.parse_args()
    torch.manual_seed(0)
    net = build_snnet(load_stitch_config(args.config), pretrained=False, img_size=args.img_size)
    net.train()
    sampler = StitchSampler(net.num_configs, seed=0)
    picks = []
    step = 0
    while len(picks) < args.stitches:
        c = sampler(step)
        step += 1
        if c >= len(net.names) and c not in picks:  # stitched routes only
            picks.append(c)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    y = torch.randint(0, 1000, (args.batch,))
    print(f"{args.config}, batch {args.batch}, {args.img_size}px, {torch.get_num_threads()} threads, "
          f"{args.reps} reps (median), interleaved")
    print(f"| cfg_id | route | SN-Net step (s) | standalone step (s) | ratio |")
    print(f"|---:|---|---:|---:|---:|")
    ratios = []
    for cfg_id in picks:
        alone = standalone(net, cfg_id)
        params = list(alone.parameters())
        for _ in range(2):  # warm-up
            time_step(lambda t: net(t, cfg_id), params, x, y)
            time_step(alone, params, x, y)
        a, b = [], []
        for _ in range(args.reps):
            a.append(time_step(lambda t: net(t, cfg_id), params, x, y))
            b.append(time_step(alone, params, x, y))
        ma, mb = statistics.median(a), statistics.median(b)
        ratios.append(ma / mb)
        print(f"| {cfg_id} | {net.describe(cfg_id)} | {ma:.4f} | {mb:.4f} | {ma / mb:.3f} |")
    print(f"RESULT ratio={statistics.mean(ratios):.3f} (SN-Net / standalone, mean over {len(picks)} stitches; "
          f"target <= 1.05)")


if __name__ == "__main__":
    main()
