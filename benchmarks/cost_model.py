"""The cost model's pricing time: every unit traced on its own against units of one structure traced once between
them (snnet/stitching/cost.py `measure`), side by side on the same built network, in alternating order, with the tables
compared cfg_id for cfg_id. Pricing runs wherever FLOPs are needed: `--dry-run` and the launch checks (the ROS
sampler's buckets), the evaluation's FLOPs column, `snnet latency`.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cost_model.py [--reps 2] > results/bench_cost_model.txt
"""
from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import torch

from snnet import build_snnet, load_stitch_config
from snnet.stitching import cost

#: (stitch config, build kwargs): SN-Net's DeiT Ti/S/B (71 networks), SN-Netv2's B/L (135), SN-Net's ResNet-18/50;
#: the ViTs with PyTorch's default init, not timm's trunc-normal pass over their weights (only shapes matter here)
CASES = (("configs/deit_ti_s_b.json", {"weight_init": "skip"}), ("configs/deit3_b_l_v2.json", {"weight_init": "skip"}),
         ("configs/resnet18_resnet50.json", {}))
SIZE = 224


def priced(net, size: int, shared: bool) -> tuple[float, list[int]]:
    """Seconds to price `net` and its routes' FLOPs; `shared` False: no two units share a trace."""
    with mock.patch.object(cost, "structure", cost.structure if shared else (lambda module: None)):
        t0 = time.perf_counter()
        table = cost.measure(net, size)
        seconds = time.perf_counter() - t0
    return seconds, [table.route_flops(net.routes[c]) for c in range(net.num_configs)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=2, help="timed pricings of each, alternating which goes first")
    args = p.parse_args()
    torch.manual_seed(0)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} thread(s); median seconds over {args.reps} rep(s)")
    print("| stitch config | networks | each unit traced (s) | one trace per structure (s) | ratio | same FLOPs |")
    print("|---|---|---|---|---|---|")
    for config, kwargs in CASES:
        net = build_snnet(load_stitch_config(config), pretrained=False, **kwargs).eval()
        times: dict[bool, list[float]] = {True: [], False: []}
        flops: dict[bool, list[int]] = {}
        for rep in range(args.reps):
            for shared in ((True, False) if rep % 2 else (False, True)):
                seconds, flops[shared] = priced(net, SIZE, shared)
                times[shared].append(seconds)
        alone, shared_s = statistics.median(times[False]), statistics.median(times[True])
        print(f"| {config} | {net.num_configs} | {alone:.1f} | {shared_s:.1f} | {alone / shared_s:.1f}x | "
              f"{'yes' if flops[True] == flops[False] else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
