"""Evaluate every stitch: SN-Net's way (one data pass per stitch, loader recreated each time) vs. ours (one pass,
shared prefixes computed once per batch), measured side by side in one run.

It writes a JPEG ImageFolder (random-texture images, so decoding costs what JPEG decoding costs) and builds
DeiT-style anchors at reduced size (3 ViTs of depth 12, widths 32/64/128, 64 px, patch 8: SN-Net's 71-stitch plan).
Each mode runs in its own process so its peak memory (max RSS) is its own.

    .venv/bin/python benchmarks/eval_all_stitches.py [--images 256] [--workers 2]

``--plan two_way`` builds SN-Netv2's S/L plan instead (docs/snnet_compat.md, C36): two DeiT-III-shaped anchors at
reduced size (deit3_small depth 12 width 32, deit3_large depth 24 width 64, 4 heads, patch 8, 64 px), LoRA stitching
layers of rank 8, the end anchor's final norm kept: 135 routes (ids 0-134). SN-Net's way then makes 135 data passes,
so this mode defaults to --workers 0 (not 2) to stay within ~6 minutes on a 2-core CPU (~4 min when the machine is
otherwise idle): re-creating a 2-worker loader costs ~4-5 s per stitch here (the measuring processes are started with
"spawn", and so are their loader workers), and 135 x that alone would exceed it. With 0 workers both ways decode in
the main process, so the JPEG ratio is not inflated by worker start-up.

Last line: RESULT ratio=<ours/snnet, with decoding> floor=<unique FLOPs / naive FLOPs>
           compute_ratio=<ours/snnet on pre-decoded tensors>
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WIDTHS = (32, 64, 128)
IMG = 64
DEFAULT_WORKERS = {"sliding_window": 2, "two_way": 0}


def make_folder(root: Path, n: int, seed: int = 0, size: int = 96) -> Path:
    """`n` random-texture JPEGs of `size` px in root/val/c0..c9 (benchmarks/gpu_check.py asks for 256 px)."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    val = root / "val"
    for i in range(n):
        folder = val / f"c{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((size, size), Image.BICUBIC)
        img.save(folder / f"{i:05d}.jpg", quality=90)
    return root


def stitch_config(plan: str = "sliding_window") -> dict:
    if plan == "two_way":  # SN-Netv2's S/L (configs/deit3_s_l_v2.json) at reduced size: depths 12 and 24
        vit = lambda name, width, depth: {"name": name, "model_kwargs": {
            "patch_size": 8, "embed_dim": width, "depth": depth, "num_heads": 4}}
        return {"anchors": [vit("deit3_small_patch16_224", 32, 12), vit("deit3_large_patch16_224", 64, 24)],
                "stitch_plan": "two_way", "skip_final_norm": False, "stitch_layer": {"type": "lora", "rank": 8},
                "num_classes": 10}
    anchors = [{"name": "deit_tiny_patch16_224", "model_kwargs": {"patch_size": 8, "embed_dim": w, "num_heads": 4}}
               for w in WIDTHS]
    return {"anchors": anchors, "num_classes": 10}


def build_model(plan: str = "sliding_window"):
    import torch

    from snnet import build_snnet, parse_stitch_config
    torch.manual_seed(0)
    cfg = parse_stitch_config(stitch_config(plan))
    model = build_snnet(cfg, pretrained=False, img_size=IMG, num_classes=10)
    return model.eval()


def loader_for(root: Path, batch: int, workers: int, img: int = IMG, pin_mem: bool = False):
    """train.py's evaluation loader over root/val at `img` px (pinned host memory with `pin_mem`, as on CUDA)."""
    import argparse as ap

    from timm.data import create_dataset

    from snnet.data.loaders import create_eval_loader
    ds = create_dataset("", root=str(root / "val"), split="", search_split=False)
    args = ap.Namespace(validation_batch_size=batch, batch_size=batch, workers=workers, pin_mem=pin_mem)
    data_cfg = {"input_size": (3, img, img), "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
                "std": (0.229, 0.224, 0.225), "crop_pct": 0.875, "crop_mode": "center"}
    return create_eval_loader(ds, args, data_cfg)


def time_mode(model, mode: str, loader, ids, device, amp_dtype=None, deadline: float | None = None) -> dict:
    """Evaluate stitches `ids` one of four ways and time it: "snnet" (a pass per stitch, `loader()` re-created for
    each, as SN-Net's loop), "ours" (one pass, shared prefixes), and both on pre-decoded batches ("*_tensors",
    `loader` then being the list of batches). Returns seconds, the results per cfg_id, the one pass's peak live
    activation bytes, and `done`: the stitches evaluated, fewer than `ids` only where SN-Net's way reached
    `deadline` (time.perf_counter() seconds) and stopped (benchmarks/gpu_check.py extrapolates from them)."""
    import torch

    from snnet.train.evaluator import evaluate_stitches
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    results = {}
    if mode in ("snnet", "snnet_tensors"):  # SN-Net: for each stitch a full pass (docs/snnet_compat.md, C23)
        for c in ids:
            # stop before a stitch that would run past `deadline` at the pace so far (the first GPU runs started one
            # more 65 s pass with 28 s left, and the step was killed with nothing reported)
            if deadline is not None and results and \
                    time.perf_counter() + (time.perf_counter() - t0) / len(results) > deadline:
                break
            data = loader() if mode == "snnet" else loader
            results.update(evaluate_stitches(model, data, [c], device, amp_dtype, log_interval=10 ** 9))
    else:
        data = loader() if mode == "ours" else loader
        peak = tracking_peak(model)
        results = evaluate_stitches(model, data, ids, device, amp_dtype, log_interval=10 ** 9)
        del model.run_step
    if cuda:
        torch.cuda.synchronize(device)
    return {"seconds": time.perf_counter() - t0, "results": results, "done": list(results),
            "peak_activation_bytes": peak[0] if mode in ("ours", "ours_tensors") else 0}


def tracking_peak(model) -> list[int]:
    """Wrap `model.run_step` to record the peak bytes of the activations the one-pass walk holds after each step
    (weak references: a dropped activation stops counting at once). Returns a one-item list."""
    import weakref
    live, peak, run_step = weakref.WeakSet(), [0], model.run_step

    def step(s, x):
        out = run_step(s, x)
        live.add(out)
        peak[0] = max(peak[0], sum(t.numel() * t.element_size() for t in live))
        return out
    model.run_step = step
    return peak


def run_mode(mode: str, root: str, batch: int, workers: int, queue, plan: str = "sliding_window",
             threads: int = 2) -> None:
    import torch
    torch.set_num_threads(threads)
    model = build_model(plan)
    ids = list(range(model.num_configs))
    cpu = torch.device("cpu")
    if mode.endswith("tensors"):
        loader = [(x.clone(), y.clone()) for x, y, *_ in loader_for(Path(root), batch, workers)]
    else:
        loader = lambda: loader_for(Path(root), batch, workers)
    out = time_mode(model, mode, loader, ids, cpu)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB
    queue.put((mode, out["seconds"], rss, out["peak_activation_bytes"],
               {c: r["acc1"] for c, r in out["results"].items()}))


def flops_floor(plan: str = "sliding_window") -> tuple[float, int]:
    model = build_model(plan)
    return flops_floor_of(model, IMG), model.num_configs


def flops_floor_of(model, img: int) -> float:
    """FLOPs of the distinct route prefixes over FLOPs of every route run from the input, at `img` px."""
    from snnet.stitching.cost import measure
    from snnet.stitching.route_tree import RouteTree
    table = measure(model, img)
    naive = sum(table.route_flops(r) for r in model.routes)
    tree = RouteTree({c: r for c, r in enumerate(model.routes)})
    unique = table.route_flops(tree.unique_steps())
    return unique / naive


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", choices=sorted(DEFAULT_WORKERS), default="sliding_window",
                   help="sliding_window: SN-Net's DeiT Ti/S/B plan (71); two_way: SN-Netv2's S/L plan (135)")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=None, help="default: 2 (sliding_window), 0 (two_way)")
    p.add_argument("--threads", type=int, default=2, help="torch threads per measuring process")
    args = p.parse_args()
    if args.workers is None:
        args.workers = DEFAULT_WORKERS[args.plan]
    floor, n_cfgs = flops_floor(args.plan)
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        root = make_folder(Path(tmp), args.images)
        rows = {}
        for mode in ("snnet", "ours", "snnet_tensors", "ours_tensors"):
            q = ctx.Queue()
            proc = ctx.Process(target=run_mode, args=(mode, str(root), args.batch, args.workers, q, args.plan,
                                                     args.threads))
            proc.start()
            rows[mode] = q.get()
            proc.join()
    same = rows["snnet"][4] == rows["ours"][4] == rows["snnet_tensors"][4] == rows["ours_tensors"][4]
    plan = "" if args.plan == "sliding_window" else f"{args.plan} plan (reduced DeiT-III S/L, LoRA rank 8), "
    print(f"{plan}{n_cfgs} stitches, {args.images} JPEG images (96 px -> {IMG} px), batch {args.batch}, "
          f"{args.workers} loader workers, {args.threads} threads; identical top-1 for every stitch in all modes: "
          f"{same}")
    print("| mode | data | time (s) | stitch-images/s | peak RSS (MiB) | peak live activations (MiB) |")
    print("|---|---|---:|---:|---:|---:|")
    names = {"snnet": ("SN-Net: a pass per stitch", "JPEG"), "ours": ("ours: one pass, shared prefixes", "JPEG"),
             "snnet_tensors": ("SN-Net: a pass per stitch", "tensors"),
             "ours_tensors": ("ours: one pass, shared prefixes", "tensors")}
    for mode, (_, seconds, rss, act, _) in rows.items():
        label, data = names[mode]
        act_s = f"{act / 2 ** 20:.1f}" if act else "-"
        print(f"| {label} | {data} | {seconds:.2f} | {n_cfgs * args.images / seconds:.0f} | {rss:.0f} | {act_s} |")
    ratio = rows["ours"][1] / rows["snnet"][1]
    compute_ratio = rows["ours_tensors"][1] / rows["snnet_tensors"][1]
    print(f"RESULT ratio={ratio:.3f} floor={floor:.3f} compute_ratio={compute_ratio:.3f}")


if __name__ == "__main__":
    main()
