"""What an SN-Net training step costs on one GPU against timm's own models: eager, compiled, and the recipe.

    python benchmarks/gpu_speed.py [--budget 420] [--out results/gpu]          # on a CUDA machine
    python benchmarks/gpu_speed.py --parts compiled --keep                     # rerun one part, keep the others
    python benchmarks/gpu_speed.py --smoke --device cpu --out DIR              # toy size on the CPU (the tests)

Random weights and random images on the device (no loader), DeiT-Ti/S/B (configs/deit_ti_s_b.json), 224 px,
batch 128, fp16 autocast with a GradScaler, AdamW (fused, as train.py's on CUDA). A training step is forward, loss,
backward and optimizer step; steps are timed in blocks of 10 back to back with one synchronisation per block, as a
training loop runs them.

1. eager    every anchor's route through the SN-Net against timm's own model (timm.create_model) and against the
            standalone route (the same modules as an nn.Sequential), and two sampled stitches against their
            standalone route; every network runs one block per round, in a new random order each round, for 24
            rounds (fewer where the part's budget ends first). Ratio per round (SN-Net / reference), then the mean
            over rounds and its 95 % t-interval; `gpu_vs_timm` pools the three anchors (per round, the mean of their
            ratios). torch.profiler then counts one block of anchor 1's route and of timm's model: kernel time,
            kernels, CPU ops.
2. recipe   the trainer's own epoch loop (snnet.train.trainer.Trainer) with the config's recipe: the sampler's
            routes, mixup/cutmix, hard distillation from a random RegNetY-16GF teacher, AdamW, fp16; beside bare
            loops of the same steps (AdamW fused or foreach, the loss read back every step or not) and the trainer
            under DDP in a process group of one; images/s, peak memory, and the ImageNet epoch (1,281,167 images)
            on 8 such GPUs if DDP scaled linearly.
3. compiled `--torchcompile`'s path (SNNet.compile_routes: one graph per route) on the sampler's routes against
            torch.compile of timm's Ti/S/B models. Each route compiles at its first step, so the steps are the
            sampler's draws among its first 8 distinct routes (a route's compiled step does not depend on how many
            others are compiled); each route's reference is compiled timm's step time at the route's FLOPs
            (interpolated between the anchors), so `compiled_vs_timm` = reference time / SN-Net time over the same
            routes; then each anchor's route through the compiled SN-Net against compiled timm's model of the same
            size. The compile time of all routes is estimated from the mean per route.

Writes <out>/speed_<gpu>.md and .json atomically after each part; the report's last line is
``RESULT gpu_vs_timm=... gpu_vs_timm_hi=... compiled_vs_timm=... recipe_img_s=...``. Each part stops at the
budget's share and says what it left; exit 0 when every part ran, 1 when one failed or was cut, 2 without CUDA.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _p in (str(ROOT), str(ROOT / "benchmarks")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from train_step import update  # noqa: E402

CONFIG = "configs/deit_ti_s_b.json"
IMAGENET_TRAIN = 1_281_167
# part -> share of the budget (what a part leaves goes to the next)
SHARES = {"eager": 0.25, "recipe": 0.2, "compiled": 0.55}
SIZES = {"real": {"img": 224, "batch": 128, "steps": 10, "rounds": 24, "warm": 2, "routes": 40, "distinct": 8,
                  "recipe_steps": 40,
                  "recipe_rounds": 3},
         "smoke": {"img": 32, "batch": 4, "steps": 1, "rounds": 3, "warm": 1, "routes": 4, "distinct": 2,
                   "recipe_steps": 4,
                   "recipe_rounds": 2}}
#: two-sided 95 % quantiles of Student's t for 1-5 degrees of freedom (`t95` expands the rest)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}


def t95(df: int) -> float:
    """The two-sided 95 % quantile of Student's t with `df` degrees of freedom: the table, then its Cornish-Fisher
    expansion around the normal's 1.96 (within 0.002 of the exact quantile at 6, within 1e-4 from 10 on)."""
    if df in T95:
        return T95[df]
    z = 1.959963984540054
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} [gpu-speed] {msg}", flush=True)


def mean_ci(values: list[float]) -> tuple[float, float, float]:
    """Mean and the 95 % t-interval of the mean."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, float("nan"), float("nan")
    half = t95(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return m, m - half, m + half


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runner:
    """One network's training step: `run(route)` = autocast forward (with `route` for the SN-Net), cross-entropy,
    GradScaler backward (fp16), AdamW step (fused on CUDA, as train.py's); its own optimizer and scaler, as a
    training run keeps them."""

    def __init__(self, name: str, forward, params, x, y, amp_dtype):
        self.name, self.forward, self.x, self.y, self.amp_dtype = name, forward, x, y, amp_dtype
        self.opt = torch.optim.AdamW(params, lr=1e-6, weight_decay=0.05, fused=x.device.type == "cuda")
        self.scaler = torch.amp.GradScaler(x.device.type) if amp_dtype == torch.float16 else None

    def run(self, route=None) -> None:
        amp = (torch.autocast(self.x.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
               else contextlib.nullcontext())
        with amp:
            loss = F.cross_entropy(self.forward(self.x, route), self.y)
        update(loss, self.opt, self.scaler)

    def block(self, steps: int, routes=None) -> float:
        """Seconds per step over `steps` back-to-back steps (one synchronisation at the end)."""
        device = self.x.device
        sync(device)
        t0 = time.perf_counter()
        for i in range(steps):
            self.run(routes[i % len(routes)] if routes else None)
        sync(device)
        return (time.perf_counter() - t0) / steps


def build(size: dict, smoke: bool, device: torch.device):
    import train_step as ts

    from snnet import build_snnet
    cfg, _ = ts.load_config(str(ROOT / CONFIG), reduced=smoke)
    torch.manual_seed(0)
    net = build_snnet(cfg, pretrained=False, img_size=size["img"]).to(device).train()
    return cfg, net


def timm_models(cfg, size: dict, device: torch.device) -> list:
    import timm
    torch.manual_seed(0)
    return [timm.create_model(a.name, pretrained=False, img_size=size["img"], **a.model_kwargs).to(device).train()
            for a in cfg.anchors]


def route_flops(net, size: dict) -> dict[int, float]:
    from snnet.stitching.cost import cost_table
    table = cost_table(net, size["img"])
    return {c: float(table.route_flops(net.routes[c])) for c in range(net.num_configs)}


# -------------------------------------------------------------------------------------------------------- 1. eager
def part_eager(ctx: dict) -> dict:
    import train_step as ts

    from snnet.train.sampler import anchor_routes
    size, device, deadline = ctx["size"], ctx["device"], ctx["deadline"]
    cfg, net = ctx["cfg"], ctx["net"]
    x = torch.randn(size["batch"], 3, size["img"], size["img"], device=device)
    y = torch.randint(0, 1000, (size["batch"],), device=device)
    anchors = anchor_routes(net)
    stitches = ts.pick_stitches(net, cfg, 2)
    owns = ctx["owns"] = timm_models(cfg, size, device)
    runners, pairs = [], []  # pairs: (label, snnet runner index, reference runner index, reference kind)
    for a, c in enumerate(anchors):
        alone = ts.standalone(net, c)
        runners += [Runner(f"SN-Net cfg {c}", lambda t, r, c=c: net(t, c), net.parameters(), x, y, ctx["amp"]),
                    Runner(f"timm {cfg.anchors[a].name}", lambda t, r, m=owns[a]: m(t), owns[a].parameters(), x, y,
                           ctx["amp"]),
                    Runner(f"standalone cfg {c}", lambda t, r, m=alone: m(t), alone.parameters(), x, y, ctx["amp"])]
        i = len(runners) - 3
        pairs += [(f"anchor {a} (cfg {c}) / timm", i, i + 1, "timm"), (f"anchor {a} (cfg {c}) / standalone", i, i + 2,
                                                                         "alone")]
    for c in stitches:
        alone = ts.standalone(net, c)
        runners += [Runner(f"SN-Net cfg {c}", lambda t, r, c=c: net(t, c), net.parameters(), x, y, ctx["amp"]),
                    Runner(f"standalone cfg {c}", lambda t, r, m=alone: m(t), alone.parameters(), x, y, ctx["amp"])]
        i = len(runners) - 2
        pairs.append((f"stitch cfg {c} / standalone", i, i + 1, "alone"))
    peaks = {}
    for r in runners:  # warm-up (cuDNN/cuBLAS choices, the allocator), peak memory of a step
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        r.block(size["warm"])
        if device.type == "cuda":
            peaks[r.name] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    times: list[list[float]] = [[] for _ in runners]
    rng = random.Random(0)
    for rnd in range(size["rounds"]):
        if time.time() > deadline and rnd >= 3:
            break
        order = list(range(len(runners)))
        rng.shuffle(order)
        for i in order:
            times[i].append(runners[i].block(size["steps"]))
    rounds = len(times[0])
    log(f"eager: {rounds} rounds of {len(runners)} networks")
    rows, data = [], {"rounds": rounds, "pairs": {}}
    for label, i, j, _ in pairs:
        ratios = [a / b for a, b in zip(times[i], times[j])]
        m, lo, hi = mean_ci(ratios)
        data["pairs"][label] = {"mean": m, "lo": lo, "hi": hi, "ratios": ratios}
        rows.append([label, f"{statistics.median(times[i]) * 1e3:.2f}", f"{statistics.median(times[j]) * 1e3:.2f}",
                     f"{m:.3f}", f"{lo:.3f} - {hi:.3f}"])
    anchor_pairs = [(i, j) for label, i, j, kind in pairs if kind == "timm"]
    pooled = [statistics.fmean(times[i][k] / times[j][k] for i, j in anchor_pairs) for k in range(rounds)]
    m, lo, hi = mean_ci(pooled)
    data.update(gpu_vs_timm=m, gpu_vs_timm_lo=lo, gpu_vs_timm_hi=hi)
    rows.append(["**anchors 0-2 pooled / timm**", "", "", f"**{m:.3f}**", f"**{lo:.3f} - {hi:.3f}**"])
    batch = size["batch"]
    speed = md_table(["network", "step (ms, median)", "img/s", "peak (GiB)"],
                     [[r.name, f"{statistics.median(t) * 1e3:.2f}", f"{batch / statistics.median(t):.0f}",
                       f"{peaks[r.name]:.2f}" if r.name in peaks else "-"] for r, t in zip(runners, times)])
    text = (f"{rounds} rounds; per round every network trains one block of {size['steps']} back-to-back steps "
            f"(batch {batch}), in a new random order; ratio per round, mean and 95 % t-interval over rounds.\n\n"
            + md_table(["ratio", "SN-Net step (ms)", "reference step (ms)", "mean", "95 % interval"], rows)
            + "\n\n" + speed)
    log(f"eager: anchors / timm {m:.3f} ({lo:.3f} - {hi:.3f})")
    # where the time goes: one profiled block of anchor 1's route and of timm's own model
    a1 = [r for r in runners if r.name == f"SN-Net cfg {anchors[1]}"][0]
    t1 = [r for r in runners if r.name == f"timm {cfg.anchors[1].name}"][0]
    text += "\n\n" + profile_pair(a1, t1, size["steps"], data)
    return {"text": text, "data": data, "summary": f"anchors / timm {m:.3f} (95 % {lo:.3f} - {hi:.3f})"}


def profile_pair(a, b, steps: int, data: dict) -> str:
    """torch.profiler of one block each: wall time, kernel time, kernel launches per step, and the kernels whose
    count or time differ most between the two."""
    from torch.profiler import ProfilerActivity, profile
    rows, kernels, cpu = [], {}, {}
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if a.x.device.type == "cuda" else [])
    for r in (a, b):
        with profile(activities=acts) as prof:
            wall = r.block(steps)
        k, c = {}, {}
        for e in prof.key_averages():
            dev = getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
            if dev > 0 and str(getattr(e, "device_type", "")).endswith("CUDA"):
                k[e.key] = (e.count / steps, dev / steps / 1e3)
            elif str(getattr(e, "device_type", "")).endswith("CPU"):
                c[e.key] = (e.count / steps, e.self_cpu_time_total / steps / 1e3)
        kernels[r.name], cpu[r.name] = k, c
        busy = sum(v[1] for v in k.values())
        launches = sum(v[0] for v in k.values())
        ops, cpu_ms = sum(v[0] for v in c.values()), sum(v[1] for v in c.values())
        rows.append([r.name, f"{wall * 1e3:.2f}", f"{busy:.2f}", f"{launches:.0f}",
                     f"{max(wall * 1e3 - busy, 0):.2f}", f"{ops:.0f}", f"{cpu_ms:.2f}"])
        data.setdefault("profile", {})[r.name] = {"wall_ms": wall * 1e3, "kernel_ms": busy, "kernels": launches,
                                                  "cpu_ops": ops, "cpu_ms": cpu_ms}
    ca, cb = cpu[a.name], cpu[b.name]
    cdiff = sorted(set(ca) | set(cb), key=lambda n: -abs(ca.get(n, (0, 0))[1] - cb.get(n, (0, 0))[1]))[:8]
    crows = [[n[:90], f"{ca.get(n, (0, 0))[0]:.0f}", f"{cb.get(n, (0, 0))[0]:.0f}", f"{ca.get(n, (0, 0))[1]:.3f}",
              f"{cb.get(n, (0, 0))[1]:.3f}"] for n in cdiff]
    ka, kb = kernels[a.name], kernels[b.name]
    diff = sorted(set(ka) | set(kb), key=lambda n: -abs(ka.get(n, (0, 0))[1] - kb.get(n, (0, 0))[1]))[:8]
    drows = [[n[:90], f"{ka.get(n, (0, 0))[0]:.0f}", f"{kb.get(n, (0, 0))[0]:.0f}", f"{ka.get(n, (0, 0))[1]:.3f}",
              f"{kb.get(n, (0, 0))[1]:.3f}"] for n in diff]
    return ("One profiled block each (torch.profiler, which slows the CPU side; per step):\n\n"
            + md_table(["network", "wall (ms)", "kernel time (ms)", "kernels", "wall - kernels (ms)", "CPU ops",
                        "CPU self time (ms)"], rows)
            + "\n\nKernels that differ most (per step):\n\n"
            + md_table(["kernel", f"count {a.name}", f"count {b.name}", f"ms {a.name}", f"ms {b.name}"], drows)
            + "\n\nCPU ops that differ most (self time per step):\n\n"
            + md_table(["op", f"count {a.name}", f"count {b.name}", f"ms {a.name}", f"ms {b.name}"], crows))


# ------------------------------------------------------------------------------------------------------- 2. recipe
def part_recipe(ctx: dict) -> dict:
    """The trainer's epoch loop with the config's recipe on random on-device batches, beside bare loops of the same
    steps: with AdamW fused (the trainer's on CUDA) or foreach (torch's default), with or without reading the loss
    back every step (before the backward and after the update, as a loop that checks and logs each step does)."""
    from snnet.train.args import parse_args
    from snnet.train.losses import create_loss
    from snnet.train.options import RunOptions
    from snnet.train.resolve import resolve
    from snnet.train.sampler import run_sampler
    from snnet.train.trainer import Trainer
    size, device, net = ctx["size"], ctx["device"], ctx["net"]
    batch, n = size["batch"], size["recipe_steps"]
    argv = [str(ctx["tmp"]), "--stitch_config", str(ROOT / CONFIG), "--no-pretrained", "--device", str(device),
            "-b", str(batch), "--epochs", "1", "--warmup-epochs", "0", "--log-interval", "50",
            "--no-prefetcher", "--output", str(ctx["tmp"]), "--img-size", str(size["img"]), "--num-classes", "1000"]
    if ctx["amp"] is None:
        argv.append("--no-amp")
    if ctx["smoke"]:  # batch 4 scales the recipe's LR below its --min-lr; a small teacher for the path alone
        argv += ["--min-lr", "0", "--teacher", "resnet18"]
    args, stitch_cfg = parse_args(argv)
    options = resolve(RunOptions.from_values(vars(args)), world_size=1)
    loss_fn, mixup_fn = create_loss(options.loss, device)
    sampler = run_sampler(net, stitch_cfg, seed=0)
    gen = torch.Generator(device="cpu").manual_seed(0)
    batches = [(torch.randn(batch, 3, size["img"], size["img"], generator=gen).to(device),
                torch.randint(0, 1000, (batch,), generator=gen).to(device)) for _ in range(4)]
    batches = batches * max(1, n // len(batches))
    trainer = Trainer(net, batches, loss_fn, options, sampler, mixup_fn=mixup_fn)
    fused = trainer.optimizer
    foreach = type(fused)([{k: v for k, v in g.items() if k not in ("fused", "foreach")} for g in fused.param_groups],
                          foreach=device.type == "cuda")
    amp = options.amp_dtype

    def bare(optimizer, reads: bool) -> None:
        scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
        for i, (x, y) in enumerate(batches):
            x, y = mixup_fn(x, y) if mixup_fn is not None else (x, y)
            with torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext():
                loss = loss_fn(x, net(x, sampler(i)), y)
            if reads:
                math.isfinite(loss.item())
            update(loss, optimizer, scaler)
            if reads:
                float(loss.detach().double().cpu())

    variants = {"trainer (train.py's loop: AdamW fused, loss read where logged)": lambda: trainer.train_one_epoch(0),
                "bare loop, AdamW fused": lambda: bare(fused, False),
                "bare loop, AdamW fused, loss read every step": lambda: bare(fused, True),
                "bare loop, AdamW foreach": lambda: bare(foreach, False),
                "bare loop, AdamW foreach, loss read every step": lambda: bare(foreach, True)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():  # warm-up: every route the sampler draws, both optimizers' state
        fn()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rng = random.Random(1)
    for rnd in range(size["recipe_rounds"]):
        order = list(variants)
        rng.shuffle(order)
        for k in order:
            sync(device)
            t0 = time.perf_counter()
            variants[k]()
            sync(device)
            times[k].append((time.perf_counter() - t0) / len(batches))
        if time.time() > ctx["deadline"] and rnd >= 1:
            break
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")
    step = {k: statistics.median(v) for k, v in times.items()}
    first = next(iter(variants))
    img_s = batch / step[first]
    ddp = _ddp_epoch(ctx, options, loss_fn, mixup_fn, stitch_cfg, batches) / len(batches) if ctx["ddp"] else None
    epoch_min = IMAGENET_TRAIN / (8 * img_s) / 60
    o = options
    what = (f"{o.optim.opt}, wd {o.optim.weight_decay}, {o.amp_dtype}, mixup {o.loss.mixup} / cutmix {o.loss.cutmix}, "
            f"distillation {o.loss.distillation_type} from {o.loss.teacher} (random weights), "
            f"sampler {stitch_cfg.get('sampler') or 'uniform'}")
    log(f"recipe: {img_s:.0f} img/s, peak {peak:.2f} GiB, ImageNet epoch on 8 GPUs ~{epoch_min:.1f} min; "
        + ", ".join(f"{k.split(' (')[0]} {v * 1e3:.1f} ms" for k, v in step.items()))
    rows = [[k, f"{v * 1e3:.1f}", f"{batch / v:.0f}", f"{v / step[first]:.3f}"] for k, v in step.items()]
    if ddp:
        rows.append(["trainer under DDP (process group of one, find_unused_parameters)", f"{ddp * 1e3:.1f}",
                     f"{batch / ddp:.0f}", f"{ddp / step[first]:.3f}"])
    text = (f"{len(batches)} steps of batch {batch} on the device, {what}; each loop runs the same steps, "
            f"{len(times[first])} rounds in random order (median):\n\n"
            + md_table(["loop", "step (ms)", "images/s", "/ trainer"], rows)
            + f"\n\n**{img_s:.0f} images/s per GPU**, peak memory {peak:.2f} GiB: an ImageNet epoch "
              f"({IMAGENET_TRAIN:,} images) on 8 such GPUs in ~{epoch_min:.1f} min if DDP scaled linearly and the "
              f"loader kept up (neither is measured here); the teacher's forward is part of every step.")
    return {"text": text, "data": {"img_s": img_s, "peak_gib": peak, "epoch_min_8gpu": epoch_min,
                                   "step_ms": {k: v * 1e3 for k, v in step.items()},
                                   "ddp_step_ms": ddp * 1e3 if ddp else None},
            "summary": f"{img_s:.0f} img/s, peak {peak:.2f} GiB, ImageNet epoch on 8 GPUs ~{epoch_min:.1f} min"}


def _ddp_epoch(ctx: dict, options, loss_fn, mixup_fn, stitch_cfg, batches) -> float:
    """Seconds of the trainer's epoch over `batches` with a fresh network under DistributedDataParallel as train.py
    wraps it, in a process group of one (nccl on CUDA, gloo on the CPU): the wrapper's own cost, no communication."""
    import socket

    import torch.distributed as dist

    from snnet.train.sampler import run_sampler
    from snnet.train.trainer import Trainer
    device = ctx["device"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)
    try:
        _, net = build(ctx["size"], ctx["smoke"], device)
        kwargs = {"device_ids": [device.index or 0]} if device.type == "cuda" else {}
        trainer = Trainer(net, batches[:4], loss_fn, options, run_sampler(net, stitch_cfg, seed=0), mixup_fn=mixup_fn)
        trainer.net = torch.nn.parallel.DistributedDataParallel(net, find_unused_parameters=True, **kwargs)
        trainer.train_one_epoch(0)  # warm-up
        trainer.loader = batches
        sync(device)
        t0 = time.perf_counter()
        trainer.train_one_epoch(0)
        sync(device)
        return time.perf_counter() - t0
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------- 3. compiled
def part_compiled(ctx: dict) -> dict:
    from snnet.train.sampler import run_sampler
    size, device, cfg, net, deadline = ctx["size"], ctx["device"], ctx["cfg"], ctx["net"], ctx["deadline"]
    backend = ctx["backend"]
    x = torch.randn(size["batch"], 3, size["img"], size["img"], device=device)
    y = torch.randint(0, 1000, (size["batch"],), device=device)
    flops = route_flops(net, size)  # traced before compiling (torch.jit cannot enter compiled code)
    from snnet.train.sampler import anchor_routes
    anchors = anchor_routes(net)
    sampler = run_sampler(net, cfg, seed=0)
    routes: list[int] = []
    distinct: list[int] = []
    for s in range(100 * size["routes"]):  # the sampler's draws among its first distinct routes
        c = sampler(s)
        if c not in distinct and len(distinct) < size["distinct"]:
            distinct.append(c)
        if c in distinct:
            routes.append(c)
        if len(routes) == size["routes"]:
            break
    owns = ctx.get("owns") or timm_models(cfg, size, device)
    rows, ref_ms, notes, timm_runners = [], {}, [], []
    for a, own in enumerate(owns):  # compiled timm models, smallest first
        if time.time() > deadline:
            notes.append(f"stopped before compiling timm {cfg.anchors[a].name}: budget")
            break
        comp = torch.compile(own, backend=backend)
        r = Runner(f"timm {cfg.anchors[a].name} compiled", lambda t, _, m=comp: m(t), own.parameters(), x, y,
                   ctx["amp"])
        t0 = time.perf_counter()
        r.block(2)
        compile_s = time.perf_counter() - t0
        eager = Runner("eager", lambda t, _, m=own: m(t), own.parameters(), x, y, ctx["amp"])
        eager.block(1)
        te, tc = [], []
        for _ in range(3):
            te.append(eager.block(size["steps"]))
            tc.append(r.block(size["steps"]))
        ref_ms[anchors[a]] = statistics.median(tc) * 1e3
        timm_runners.append(r)
        rows.append([r.name, f"{compile_s:.0f}", f"{statistics.median(te) * 1e3:.2f}", f"{ref_ms[anchors[a]]:.2f}",
                     f"{statistics.median(te) / statistics.median(tc):.2f}x"])
        log(f"compiled: {r.name} {ref_ms[anchors[a]]:.2f} ms/step (eager {statistics.median(te) * 1e3:.2f}), "
            f"compile {compile_s:.0f} s")
    data = {"timm_compiled_ms": {str(k): v for k, v in ref_ms.items()}}
    if len(ref_ms) < len(owns) or time.time() > deadline:
        raise PartCut("; ".join(notes) or "budget spent after the timm models", rows, data)
    eager_runner = Runner("SN-Net eager", lambda t, c: net(t, c), net.parameters(), x, y, ctx["amp"])
    eager_runner.block(len(routes), routes)  # every sampled route once, eager (cuDNN choices)
    t_eager = eager_runner.block(len(routes), routes)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    net.compile_routes(backend)
    runner = Runner("SN-Net compiled", lambda t, c: net(t, c), net.parameters(), x, y, ctx["amp"])
    runner.block(len(routes), routes)  # compiles each route at its first step
    compile_s = time.perf_counter() - t0
    all_s = compile_s / len(distinct) * net.num_configs
    times = [runner.block(len(routes), routes) for _ in range(3)]
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")
    t_snnet = statistics.median(times)
    # reference: compiled timm's step time at each route's FLOPs, linear between the anchors' (FLOPs, ms) points
    pts = sorted((flops[c], ms) for c, ms in ref_ms.items())
    ref = statistics.fmean(_interp(pts, flops[c]) for c in routes) / 1e3
    ratio = ref / t_snnet
    data.update(compiled_vs_timm=ratio, snnet_compiled_ms=t_snnet * 1e3, snnet_eager_ms=t_eager * 1e3,
                reference_ms=ref * 1e3, compile_s=compile_s, compile_all_routes_s=all_s, peak_gib=peak,
                routes=len(routes), distinct_routes=len(distinct))
    rows.append([f"SN-Net, {len(routes)} sampled steps over {len(distinct)} routes, one graph each",
                 f"{compile_s:.0f}", f"{t_eager * 1e3:.2f}", f"{t_snnet * 1e3:.2f}", f"{t_eager / t_snnet:.2f}x"])
    log(f"compiled: SN-Net {t_snnet * 1e3:.2f} ms/step, reference {ref * 1e3:.2f}: {ratio:.3f}")
    # whether a compiled route's step slows as more routes are compiled: as many others again, then the same steps
    more = [c for c in range(net.num_configs) if c not in distinct][:len(distinct)]
    scaling = ""
    if more and time.time() + 1.5 * compile_s < deadline:
        runner.block(len(more), more)
        t_more = statistics.median(runner.block(len(routes), routes) for _ in range(3))
        data.update(snnet_compiled_ms_more=t_more * 1e3, routes_compiled_more=len(distinct) + len(more))
        scaling = (f" With {len(distinct) + len(more)} routes compiled the same steps take {t_more * 1e3:.2f} ms "
                   f"({t_more / t_snnet:.3f}x).")
        log(f"compiled: {len(distinct) + len(more)} routes compiled: {t_more * 1e3:.2f} ms/step")
    # the same sizes exactly: each anchor's route through the compiled SN-Net (its cache holding the sampled
    # routes) against compiled timm's model, interleaved by rounds
    runner.block(2 * len(anchors), anchors)  # compiles the anchor routes the sampled ones did not hold
    per_round, arows = [], []
    anchor_t: list[list[tuple[float, float]]] = [[] for _ in timm_runners]
    for _ in range(3):
        for a, r in enumerate(timm_runners):
            anchor_t[a].append((runner.block(size["steps"], [anchors[a]]), r.block(size["steps"])))
        per_round.append(statistics.fmean(t / s for s, t in (anchor_t[a][-1] for a in range(len(timm_runners)))))
    for a, pairs in enumerate(anchor_t):
        sn, tm = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
        arows.append([f"anchor {a} (cfg {anchors[a]})", f"{sn * 1e3:.2f}", f"{tm * 1e3:.2f}", f"{tm / sn:.3f}"])
    am, alo, ahi = mean_ci(per_round)
    data.update(anchors_compiled_vs_timm=am, anchors_compiled_vs_timm_lo=alo, anchors_compiled_vs_timm_hi=ahi)
    arows.append(["**anchors pooled**", "", "", f"**{am:.3f}** ({alo:.3f} - {ahi:.3f})"])
    log(f"compiled: anchor routes / timm compiled {am:.3f} ({alo:.3f} - {ahi:.3f})")
    text = (md_table(["network", "compile (s)", "eager step (ms)", "compiled step (ms)", "speed-up"], rows)
            + f"\n\nCompiled timm at the same FLOPs as the sampled routes (linear between the anchors' step times): "
              f"{ref * 1e3:.2f} ms per step; SN-Net compiled {t_snnet * 1e3:.2f} ms: **compiled_vs_timm "
              f"{ratio:.3f}** (images/s against compiled timm's); peak memory {peak:.2f} GiB; backend {backend}; "
              f"compiling all {net.num_configs} routes would take about {all_s / 60:.0f} min at this mean.{scaling} "
              f"Where steps are bound by the CPU's launches, time grows less than linearly with FLOPs, so the "
              f"interpolated reference favours the stitches; the anchors' own routes below compare equal sizes:\n\n"
            + md_table(["route", "SN-Net compiled step (ms)", "timm compiled step (ms)",
                        "throughput SN-Net / timm (95 % interval)"], arows))
    return {"text": text, "data": data, "summary": f"compiled / timm compiled {ratio:.3f}, compile {compile_s:.0f} s"}


def _interp(pts: list[tuple[float, float]], f: float) -> float:
    if f <= pts[0][0]:
        return pts[0][1] * f / pts[0][0]
    for (f0, t0), (f1, t1) in zip(pts, pts[1:]):
        if f <= f1:
            return t0 + (t1 - t0) * (f - f0) / (f1 - f0)
    return pts[-1][1] * f / pts[-1][0]


class PartCut(Exception):
    def __init__(self, message: str, rows: list, data: dict):
        super().__init__(message)
        self.rows, self.data = rows, data


# ---------------------------------------------------------------------------------------------------------- main
def environment(device: torch.device) -> dict:
    import timm
    env = {"torch": torch.__version__, "timm": timm.__version__, "device": str(device)}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    return env


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--budget", type=float, default=420, help="seconds for the three parts (default 420)")
    p.add_argument("--out", default=str(ROOT / "results" / "gpu"))
    p.add_argument("--smoke", action="store_true", help="toy size (reduced anchors, 32 px), for the tests")
    p.add_argument("--parts", default="eager,recipe,compiled", help="which parts, in order")
    p.add_argument("--no-ddp", action="store_true", help="skip the recipe's run under DDP")
    p.add_argument("--keep", action="store_true",
                   help="keep the parts not run now from the report already in --out (rerun one part)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_speed: no CUDA device is visible; run on a GPU machine, or --smoke --device cpu", file=sys.stderr)
        return 2
    size = SIZES["smoke" if args.smoke else "real"]
    amp = torch.float16 if device.type == "cuda" else None
    import tempfile
    start = time.time()
    results, failed = {}, False
    env = environment(device)
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    earlier = Path(args.out) / f"speed_{report_name(env, args.smoke)}.json"
    if args.keep and earlier.is_file():
        kept = json.loads(earlier.read_text())["results"]
        results.update({k: {**v, "kept": True} for k, v in kept.items() if k not in parts})
    with tempfile.TemporaryDirectory() as tmp:
        cfg, net = build(size, args.smoke, device)
        ctx = {"size": size, "device": device, "smoke": args.smoke, "amp": amp, "cfg": cfg, "net": net,
               "tmp": Path(tmp), "backend": "eager" if args.smoke else "inductor", "ddp": not args.no_ddp}
        spent_share = 0.0
        for name in parts:
            spent_share += SHARES[name]
            ctx["deadline"] = start + args.budget * spent_share
            log(f"{name} (until +{ctx['deadline'] - start:.0f} s)")
            t0 = time.time()
            try:
                out = {"eager": part_eager, "recipe": part_recipe, "compiled": part_compiled}[name](ctx)
                results[name] = {"status": "ok", **out}
            except PartCut as e:
                failed = True
                results[name] = {"status": "cut", "summary": str(e), "data": e.data,
                                 "text": md_table(["network", "compile (s)", "eager step (ms)", "compiled step (ms)",
                                                   "speed-up"], e.rows) if e.rows else ""}
            except Exception as e:  # noqa: BLE001 - a part's failure is reported, the next part still runs
                failed = True
                traceback.print_exc()
                results[name] = {"status": "failed", "summary": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                                 if str(e) else type(e).__name__, "data": {}, "text": ""}
            results[name]["seconds"] = time.time() - t0
            log(f"{name}: {results[name]['status']}, {results[name]['summary']} ({results[name]['seconds']:.0f} s)")
            write_report(Path(args.out), env, results, time.time() - start, args.smoke)  # what is done so far
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(result_line(results), flush=True)
    return 1 if failed else 0


def result_line(results: dict) -> str:
    get = lambda part, key: results.get(part, {}).get("data", {}).get(key)
    fmt = lambda v, d=3: "nan" if v is None else f"{v:.{d}f}"
    return (f"RESULT gpu_vs_timm={fmt(get('eager', 'gpu_vs_timm'))} "
            f"gpu_vs_timm_hi={fmt(get('eager', 'gpu_vs_timm_hi'))} "
            f"compiled_vs_timm={fmt(get('compiled', 'compiled_vs_timm'))} "
            f"recipe_img_s={fmt(get('recipe', 'img_s'), 0)}")


def report_name(env: dict, smoke: bool) -> str:
    return env.get("gpu", "cpu" + ("_smoke" if smoke else "")).replace(" ", "_")


def write_report(out: Path, env: dict, results: dict, total: float, smoke: bool) -> None:
    name = report_name(env, smoke)
    out.mkdir(parents=True, exist_ok=True)
    results = {k: results[k] for k in SHARES if k in results}
    titles = {"eager": "1. Eager: SN-Net routes against timm's own models",
              "recipe": "2. The DeiT-Ti/S/B recipe's throughput",
              "compiled": "3. Compiled: sampled routes against compiled timm"}
    body = [f"# Training speed on {env.get('gpu', 'CPU')}", "",
            f"Written by `python benchmarks/gpu_speed.py`; random weights and images on the device; "
            f"torch {env['torch']}, timm {env['timm']}" + (f", CUDA {env['cuda']}" if "cuda" in env else "")
            + f"; {total:.0f} s.", "",
            md_table(["part", "status", "s", "result"],
                     [[k + (" (kept from the run before)" if v.get("kept") else ""), v["status"],
                       f"{v['seconds']:.0f}", v["summary"]] for k, v in results.items()])]
    for k, v in results.items():
        if v.get("text"):
            body += ["", f"## {titles[k]}", "", v["text"]]
    body += ["", result_line(results), ""]
    for suffix, content in ((".md", "\n".join(body)),
                            (".json", json.dumps({"env": env, "results": results}, indent=1, default=str))):
        path = out / f"speed_{name}{suffix}"
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(content)
        os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
