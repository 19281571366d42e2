"""Images/s of the data loaders reading WebDataset shards (`snnet shards`, ``--dataset wds/NAME``) vs. the ImageFolder
they were written from: the same JPEG images, the same loader workers and batch size, measured side by side in one
run. Two passes per loader:

* eval: `create_eval_loader` (decode, timm's evaluation transform; shards: this rank's contiguous range, whole
  batches per worker), the loader of train.py --eval;
* train: `create_train_loader` (decode, timm's training augmentation, prefetcher off; shards: the seeded epoch
  stream with its shuffle buffer).

Each (pass, workers) row reads the folder and the shards alternately, --repeats times, and keeps each one's best
time (the first read warms the page cache for both). The image files are random-texture JPEGs (so decoding costs what
JPEG decoding costs), written by benchmarks/eval_all_stitches.py's `make_folder`.

    .venv/bin/python benchmarks/shards_vs_folder.py [--images 3000] [--size 160] [--workers 0 2] [--repeats 2]

Last line: RESULT eval_ratio=<shards/folder img/s, most workers> train_ratio=<same for training>
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

DATA_CFG = dict(input_size=(3, 128, 128), interpolation="bilinear", mean=(0.485, 0.456, 0.406),
                std=(0.229, 0.224, 0.225), crop_pct=0.875, crop_mode="center")


def loader_args(workers: int, batch: int) -> argparse.Namespace:
    """The train.py flags the two loaders read (train.py's defaults otherwise)."""
    from snnet.train.args import parse_args
    args, _ = parse_args(["unused", "--model", "resnet18", "-b", str(batch), "-j", str(workers), "--no-prefetcher",
                          "--img-size", "128"])
    args.distributed = False  # what the process group would set: one process
    return args


def one_pass(loader) -> tuple[int, float]:
    t0, n = time.perf_counter(), 0
    for batch in loader:
        n += batch[0].shape[0]
    return n, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--size", type=int, default=160, help="JPEG side in pixels")
    p.add_argument("--shard-size", type=int, default=500)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    opts = p.parse_args()
    import torch
    from eval_all_stitches import make_folder
    from timm.data import create_dataset

    from snnet.data.datasets import ShardDataset, write_folder_shards
    from snnet.data.loaders import create_eval_loader, create_train_loader
    from snnet.data.shards import find_split
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_folder(Path(tmp) / "folder", opts.images, size=opts.size)
        t0 = time.perf_counter()
        write_folder_shards(str(folder), str(Path(tmp) / "wds"), opts.shard_size)
        wrote = time.perf_counter() - t0
        files = sum(len(f) for _, _, f in os.walk(folder / "val"))
        shards = find_split(str(Path(tmp) / "wds"), "val")
        print(f"{opts.images} JPEGs of {opts.size} px ({files} files, "
              f"{sum(os.path.getsize(p) for p in shards.files) / 2**20:.1f} MiB in {len(shards.files)} shards, "
              f"written in {wrote:.1f} s); batch {opts.batch}, 128 px crops, {os.cpu_count()} CPU cores")
        print("| pass | loader workers | folder img/s | shards img/s | shards / folder |")
        print("|---|---:|---:|---:|---:|")
        ratios = {}
        for mode in ("eval", "train"):
            for workers in opts.workers:
                args = loader_args(workers, opts.batch)
                fds = create_dataset("", root=str(folder / "val"), split="", search_split=False,
                                     is_training=mode == "train")
                sds = ShardDataset(shards, is_training=mode == "train", seed=0)
                best = {"folder": float("inf"), "shards": float("inf")}
                counts = {}
                for _ in range(opts.repeats):
                    for name, ds in (("folder", fds), ("shards", sds)):
                        loader = create_eval_loader(ds, args, DATA_CFG) if mode == "eval" else \
                            create_train_loader(ds, args, DATA_CFG, torch.device("cpu"))
                        n, dt = one_pass(loader)
                        counts[name] = n
                        best[name] = min(best[name], dt)
                if mode == "eval":
                    assert counts["folder"] == counts["shards"] == opts.images, counts
                rate = {k: counts[k] / best[k] for k in best}
                ratios[mode] = rate["shards"] / rate["folder"]
                print(f"| {mode} | {workers} | {rate['folder']:.0f} | {rate['shards']:.0f} | "
                      f"{ratios[mode]:.2f} |", flush=True)
        print(f"RESULT eval_ratio={ratios['eval']:.2f} train_ratio={ratios['train']:.2f}")


if __name__ == "__main__":
    main()
