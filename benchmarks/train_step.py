"""Time per training step: the SN-Net running a sampled stitch vs. the same stitch built as a standalone network.

The standalone network is an nn.Sequential holding exactly the modules the route executes (the same module objects,
so the arithmetic is identical); the SN-Net runs the route through `forward(x, cfg_id)`. Both do forward, loss,
backward and an SGD step on the same batch, interleaved rep by rep, in one process. Target: ratio <= 1.05.
The stitches timed are drawn by the config's sampler (``"sampler"``, uniform by default; e.g. SN-Netv2's ``ros``).
``--set FIELD=JSON`` overrides a stitch-config field (repeatable), e.g. SN-Netv2's LoRA layers and ROS sampler:

    .venv/bin/python benchmarks/train_step.py [--img-size 224] [--batch 16] [--reps 12]
    .venv/bin/python benchmarks/train_step.py --config configs/deit3_s_l_v2.json --img-size 64 --batch 4 \
        --set 'stitch_layer={"type": "lora", "rank": 64}' --set 'sampler={"type": "ros", "gap": 1.0}'

``--reduced`` shrinks plain-ViT anchors to benchmarks/eval_all_stitches.py's sizes (patch 8, 4 heads, anchor i of
width 32 * 2**i, each anchor's own depth kept: DeiT-III S/L -> widths 32/64, depths 12/24), for a quick run where the
full anchors' steps take many seconds on a CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from snnet import build_snnet, load_stitch_config, parse_stitch_config  # noqa: E402
from snnet.stitching.config import AnchorSpec  # noqa: E402
from snnet.train.sampler import create_sampler  # noqa: E402


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


def update(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    """Zeroed gradients, the backward of `loss` (scaled under a GradScaler) and the optimizer's step."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


def time_step(fn, params, x, y, amp_dtype=None, scaler=None) -> float:
    """Seconds of one forward, loss, backward and SGD step. On CUDA the clock waits for the device (kernels run
    asynchronously), autocast runs in `amp_dtype` and a GradScaler scales the loss, as a fp16 training step does."""
    opt = torch.optim.SGD(params, lr=1e-4)
    cuda = x.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(x.device)
    t0 = time.perf_counter()
    with torch.autocast(x.device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext():
        loss = nn.functional.cross_entropy(fn(x), y)
    update(loss, opt, scaler)
    if cuda:
        torch.cuda.synchronize(x.device)
    return time.perf_counter() - t0


def load_config(config: str, reduced: bool = False, sets=()):
    """The stitch config with --reduced and --set FIELD=JSON applied: (config, {field: value} of the overrides)."""
    cfg = load_stitch_config(config)
    if reduced:
        cfg.anchors = [AnchorSpec(a.name, None, {**a.model_kwargs, "patch_size": 8, "embed_dim": 32 * 2 ** i,
                                              "num_heads": 4}) for i, a in enumerate(cfg.anchors)]
    overrides = {}
    for item in sets:
        field, _, value = item.partition("=")
        overrides[field] = json.loads(value)
    checked = parse_stitch_config({"anchors": [a.name for a in cfg.anchors], **overrides}, "--set")  # names, types
    if "anchors" in overrides:
        cfg.anchors = checked.anchors
    cfg.values.update(checked.values)
    return cfg, overrides


def pick_stitches(net, cfg, count: int) -> list[int]:
    """The first `count` distinct stitched routes (no anchor) the config's sampler draws, seed 0, rank 0."""
    sampler = create_sampler(cfg.get("sampler"), net, seed=0, rank=0)
    picks = []
    step = 0
    while len(picks) < count:
        c = sampler(step)
        step += 1
        if c >= len(net.names) and c not in picks:  # stitched routes only
            picks.append(c)
    return picks


def measure_stitch(net, cfg_id: int, x, y, reps: int, amp_dtype=None, peak_memory: bool = False) -> dict:
    """Median step seconds of the SN-Net (`snnet`) and of the standalone network (`alone`) on one stitch, timed
    interleaved rep by rep after 2 warm-up steps each; with `peak_memory` (CUDA) each one's peak allocated bytes
    over a step (`snnet_peak`, `alone_peak`), measured in the warm-up so the timed steps carry no reset."""
    alone = standalone(net, cfg_id)
    params = list(alone.parameters())
    # fp16 needs a loss scale to train (a GradScaler, as train.py's); bf16 and fp32 do not
    scaler = torch.amp.GradScaler(x.device.type) if amp_dtype == torch.float16 else None
    routed = lambda t: net(t, cfg_id)
    out = {}
    for _ in range(2):  # warm-up
        for key, fn in (("snnet", routed), ("alone", alone)):
            if peak_memory:
                torch.cuda.reset_peak_memory_stats(x.device)
            time_step(fn, params, x, y, amp_dtype, scaler)
            if peak_memory:
                out[f"{key}_peak"] = max(out.get(f"{key}_peak", 0), torch.cuda.max_memory_allocated(x.device))
    a, b = [], []
    for _ in range(reps):
        a.append(time_step(routed, params, x, y, amp_dtype, scaler))
        b.append(time_step(alone, params, x, y, amp_dtype, scaler))
    out.update(snnet=statistics.median(a), alone=statistics.median(b))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/deit_ti_s_b.json")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--reps", type=int, default=12)
    p.add_argument("--stitches", type=int, default=3, help="sampled stitches to time")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                   help="override a stitch-config field, e.g. 'sampler={\"type\": \"ros\"}' (repeatable)")
    p.add_argument("--reduced", action="store_true", help="plain-ViT anchors at reduced size (see above)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, overrides = load_config(args.config, args.reduced, args.set)
    torch.manual_seed(0)
    net = build_snnet(cfg, pretrained=False, img_size=args.img_size)
    net.train()
    picks = pick_stitches(net, cfg, args.stitches)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    y = torch.randint(0, 1000, (args.batch,))
    extra = "".join(f", {k}={json.dumps(v)}" for k, v in overrides.items())
    extra = (", reduced" if args.reduced else "") + extra
    print(f"{args.config}{extra}, {net.num_configs} routes, batch {args.batch}, {args.img_size}px, "
          f"{torch.get_num_threads()} threads, {args.reps} reps (median), interleaved")
    print("| cfg_id | route | SN-Net step (s) | standalone step (s) | ratio |")
    print("|---:|---|---:|---:|---:|")
    ratios = []
    for cfg_id in picks:
        m = measure_stitch(net, cfg_id, x, y, args.reps)
        ma, mb = m["snnet"], m["alone"]
        ratios.append(ma / mb)
        print(f"| {cfg_id} | {net.describe(cfg_id)} | {ma:.4f} | {mb:.4f} | {ma / mb:.3f} |")
    print(f"RESULT ratio={statistics.mean(ratios):.3f} (SN-Net / standalone, mean over {len(picks)} stitches; "
          f"target <= 1.05)")


if __name__ == "__main__":
    main()
