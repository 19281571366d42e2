"""`--amp` on this CPU: a training step (forward, loss, backward) in fp32 vs under bf16 autocast, side by side.

train.py's `--amp` is bf16 autocast on CPU. oneDNN has fast bf16 kernels only where the CPU has bf16 instructions
(AVX-512 BF16 or AMX; `torch.ops.mkldnn._is_mkldnn_bf16_supported()`); elsewhere torch runs bf16 convolutions and
matmuls on reference kernels. This prints, for ResNet-50 (the ResNet seed command's anchor) and DeiT-S, the median
seconds per step of each, interleaved rep by rep in one process, and the ratio; train.py warns when it applies.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/amp_cpu.py [--reps 3] > results/bench_amp_cpu.txt
"""
from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time

import timm
import torch
from torch import nn

CASES = (("resnet50", 16, 32), ("deit_small_patch16_224", 4, 224))  # (timm name, batch, image size)


def step_s(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool) -> float:
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
        loss = nn.functional.cross_entropy(model(x).float(), y)
    loss.backward()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3, help="timed steps of each (after one untimed of each)")
    args = p.parse_args()
    torch.manual_seed(0)
    fast = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    print(f"# CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), capability {torch.backends.cpu.get_cpu_capability()}, "
          f"oneDNN bf16 kernels: {'yes' if fast else 'no'}")
    print("| model | batch | px | fp32 s/step | bf16 autocast s/step | bf16 / fp32 |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, batch, px in CASES:
        model = timm.create_model(name, num_classes=10).train()
        x, y = torch.randn(batch, 3, px, px), torch.randint(0, 10, (batch,))
        times: dict[bool, list[float]] = {False: [], True: []}
        for rep in range(args.reps + 1):
            for bf16 in (False, True):
                t = step_s(model, x, y, bf16)
                if rep:  # the first of each: allocation and kernel selection
                    times[bf16].append(t)
        fp32, bf16 = statistics.median(times[False]), statistics.median(times[True])
        print(f"| {name} | {batch} | {px} | {fp32:.3f} | {bf16:.3f} | {bf16 / fp32:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
