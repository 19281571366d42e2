"""The digits demo (`make demo`): the whole SN-Net journey on real data that ships with scikit-learn.

1. writes scikit-learn's digits (1,797 real 8x8 scans) as an ImageFolder (train/ and val/, stratified 80/20);
2. trains three small ViT anchors of different widths as plain models (train.py --model);
3. stitches them with configs/demo_digits.json (anchors point at those checkpoints) and trains the SN-Net on two
   processes with distributed_train.sh (gloo on CPU);
4. evaluates every stitch (stitches_res.txt) and writes what `snnet pareto --out results/demo` writes: the
   Pareto table (pareto_flops.md, .json) and the FLOPs-accuracy plot (pareto_flops.png).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .results import RESULTS_FILE, read_results, write_results

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "demo_digits.json"
TITLE = "SN-Net on digits: 3 ViT anchors (width 16/32/64)"
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

    write_results(results / RESULTS_FILE, read_results(snnet_dir))
    files = report(results)
    print(f"demo finished in {time.perf_counter() - t0:.0f}s: {', '.join(str(f) for f in files)}, "
          f"{results / RESULTS_FILE}")
    return 0


def report(results: Path) -> list[Path]:
    """Step 4's table and plot, made as `snnet pareto RESULTS --out DIR` makes them (the same functions): the
    committed results/demo/pareto_flops.{md,json,png} are regenerated from results/demo/stitches_res.txt by this."""
    from .pareto import pareto_report, save_report
    # the report names the file it read: relative to the working directory (the repository root for `make demo`)
    rep = pareto_report([os.path.relpath(results / RESULTS_FILE)], "flops")
    print(rep.text, end="")
    return save_report(rep, results, TITLE)


if __name__ == "__main__":
    sys.exit(main())
