"""The digits demo (`make demo`): the whole SN-Net journey on real data that ships with scikit-learn.

1. writes scikit-learn's digits (1,797 real 8x8 scans) as an ImageFolder (train/ and val/, stratified 80/20);
2. trains three small ViT anchors of different widths as plain models (train.py --model);
3. stitches them with configs/demo_digits.json (anchors point at those checkpoints) and trains the SN-Net on two
   processes with distributed_train.sh (gloo on CPU);
4. evaluates every stitch (stitches_res.txt) and writes a Pareto table and a FLOPs-accuracy plot to results/demo/.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "demo_digits.json"
COMMON = ["--img-size", "16", "-b", "32", "--opt", "adamw", "--weight-decay", "0.05", "--scale", "0.7", "1",
          "--hflip", "0", "--smoothing", "0.1", "-j", "0", "--seed", "0", "--log-interval", "1000"]


def write_digits(root: Path, seed: int = 0) -> Path:
    """scikit-learn's digits as PNG files (16x16, nearest upsampling), stratified train/val split."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = root / "digits"
    if (data / "val").is_dir():
        return data
    digits = load_digits()
    idx = np.arange(len(digits.images))
    train, val = train_test_split(idx, test_size=0.2, random_state=seed, stratify=digits.target)
    tmp = root / "digits.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for split, ids in (("train", train), ("val", val)):
        for i in ids:
            folder = tmp / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            img = (digits.images[i] / 16.0 * 255).astype(np.uint8)
            Image.fromarray(img).resize((16, 16), Image.NEAREST).convert("RGB").save(folder / f"{i:04d}.png")
    tmp.rename(data)
    return data


def demo_anchors() -> list[tuple[str, str, dict]]:
    """(run folder, timm name, model kwargs) of each anchor, read from configs/demo_digits.json: the config names
    the checkpoint <work>/<run folder>/last.pth.tar that step 2 trains."""
    import json
    return [(Path(a["checkpoint"]).parent.name, a["name"], a["model_kwargs"])
            for a in json.loads(CONFIG.read_text())["anchors"]]


def stitch_config_for(work: Path) -> Path:
    """configs/demo_digits.json names the anchors' checkpoints under the default work folder; another --work gets
    a copy of it pointing at the anchors trained there."""
    import json
    if work.resolve() == (ROOT / "output" / "demo").resolve():
        return CONFIG
    cfg = json.loads(CONFIG.read_text())
    for anchor in cfg["anchors"]:
        anchor["checkpoint"] = str((work / Path(anchor["checkpoint"]).parent.name / "last.pth.tar").resolve())
    path = work / "demo_digits.json"
    path.write_text(json.dumps(cfg, indent=1))
    return path


def run(cmd: list[str], log: Path) -> None:
    print("$", " ".join(str(c) for c in cmd), f"  (log: {log})", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-15:]
        sys.exit(f"demo step failed (exit {proc.returncode}):\n" + "\n".join(tail))
    print(f"  done in {time.perf_counter() - t0:.0f}s", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(ROOT / "output" / "demo"), help="scratch folder (data, checkpoints)")
    p.add_argument("--results", default=str(ROOT / "results" / "demo"), help="where the table and plot go")
    p.add_argument("--anchor-epochs", type=int, default=30)
    p.add_argument("--snnet-epochs", type=int, default=30)
    p.add_argument("--fresh", action="store_true", help="retrain the anchors even if their checkpoints exist")
    args = p.parse_args(argv)
    work, results = Path(args.work), Path(args.results)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = write_digits(work)
    print(f"data: {data} (scikit-learn digits, ImageFolder)")

    py = sys.executable
    for name, model, kwargs in demo_anchors():
        if (work / name / "last.pth.tar").exists() and not args.fresh:
            print(f"anchor {name}: reusing {work / name / 'last.pth.tar'}")
            continue
        run([py, "train.py", data, "--model", model, "--model-kwargs", *[f"{k}={v}" for k, v in kwargs.items()],
             "--epochs", str(args.anchor_epochs), "--lr", "2e-3",
             "--warmup-epochs", "2", "--output", work, "--experiment", name, *COMMON], work / f"{name}.log")

    snnet_dir = work / "snnet"
    shutil.rmtree(snnet_dir, ignore_errors=True)
    run(["./distributed_train.sh", "2", data, "--stitch_config", stitch_config_for(work), "--epochs", str(args.snnet_epochs),
         "--lr", "1e-3", "--anchor-lr-scale", "0.1", "--warmup-epochs", "1", "--output", work, "--experiment", "snnet", *COMMON],
        work / "snnet.log")

    from .pareto import write_report
    results.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(snnet_dir / "stitches_res.txt", results / "stitches_res.txt")
    write_report(results / "stitches_res.txt", results, title="SN-Net on digits: 3 ViT anchors (width 16/32/64)")
    print((results / "pareto.md").read_text())
    print(f"demo finished in {time.perf_counter() - t0:.0f}s: {results / 'flops_vs_acc.png'}, "
          f"{results / 'pareto.md'}, {results / 'stitches_res.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
