"""The digits demo (`make demo`): the whole SN-Net journey on real data that ships with scikit-learn.

1. writes scikit-learn's digits (1,797 real 8x8 scans) as an ImageFolder (train/ and val/, stratified 80/20);
2. trains three small ViT anchors of different widths as plain models (train.py --model);
3. stitches them with configs/demo_digits.json (anchors point at those checkpoints) and trains the SN-Net on two
   processes with distributed_train.sh (gloo on CPU);
4. evaluates every stitch (stitches_res.txt, and the anchors' per-image predictions stitches_pred.npz) and writes
   what `snnet pareto --baselines --out results/demo` writes: the Pareto table (pareto_flops.md, .json) with the
   no-training baselines (random anchor mixing, confidence cascade) and the FLOPs-accuracy plot (pareto_flops.png).

`python -m snnet.demo --v2` (`make demo-v2`) compares SN-Net with SN-Netv2 on the same two anchors (widths 16 and 64,
the same checkpoints as above): step 3 trains, with the same epochs and learning rates, an SN-Net with SN-Net's
sliding-window plan (configs/demo_digits_v1_pair.json) and an SN-Netv2 (configs/demo_digits_v2.json: two-way
plan, LoRA stitching layers, ROS sampling), and step 4 writes both results files (results/demo_v2/v1/ and v2/) and
one table and plot with both fronts and their combined front (results/demo_v2/pareto_flops.{md,json,png}).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from snnet.results.records import RESULTS_FILE, read_results, write_results

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "demo_digits.json"
TITLE = "SN-Net on digits: 3 ViT anchors (width 16/32/64)"
# --v2: the same two anchors (w16, w64) stitched by SN-Net (sliding windows) and by SN-Netv2 (two-way, LoRA, ROS)
V2_CONFIGS = {"v1": ROOT / "configs" / "demo_digits_v1_pair.json", "v2": ROOT / "configs" / "demo_digits_v2.json"}
V2_TITLE = "SN-Net (v1) vs. SN-Netv2 (v2) on digits: anchors of width 16 and 64"
SNNET_FLAGS = ["--lr", "1e-3", "--anchor-lr-scale", "0.1", "--warmup-epochs", "1"]  # every SN-Net of the demo
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


def demo_anchors(*configs: Path) -> list[tuple[str, str, dict]]:
    """(run folder, timm name, model kwargs) of each anchor, read from configs/demo_digits.json (or the given demo
    configs, each anchor once): the config names the checkpoint <work>/<run folder>/last.pth.tar that step 2 trains."""
    import json
    anchors = {}
    for config in configs or (CONFIG,):
        for a in json.loads(Path(config).read_text())["anchors"]:
            anchors.setdefault(Path(a["checkpoint"]).parent.name, (a["name"], a["model_kwargs"]))
    return [(name, model, kwargs) for name, (model, kwargs) in anchors.items()]


def stitch_config_for(work: Path, config: Path = CONFIG) -> Path:
    """A demo config (configs/demo_digits.json unless given) names the anchors' checkpoints under the default work
    folder; another --work gets a copy of it (same file name) pointing at the anchors trained there."""
    import json
    if work.resolve() == (ROOT / "output" / "demo").resolve():
        return config
    cfg = json.loads(Path(config).read_text())
    for anchor in cfg["anchors"]:
        anchor["checkpoint"] = str((work / Path(anchor["checkpoint"]).parent.name / "last.pth.tar").resolve())
    path = work / Path(config).name
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
    p.add_argument("--results", default=None, help="where the table and plot go (default: results/demo, with --v2 "
                                                  "results/demo_v2)")
    p.add_argument("--anchor-epochs", type=int, default=30)
    p.add_argument("--snnet-epochs", type=int, default=30)
    p.add_argument("--fresh", action="store_true", help="retrain the anchors even if their checkpoints exist")
    p.add_argument("--v2", action="store_true", help="SN-Net vs. SN-Netv2 on anchors w16 and w64 (two-way plan, "
                   "LoRA stitching layers, ROS sampling): both fronts in one plot, in results/demo_v2")
    args = p.parse_args(argv)
    work = Path(args.work)
    results = Path(args.results or ROOT / "results" / ("demo_v2" if args.v2 else "demo"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = write_digits(work)
    print(f"data: {data} (scikit-learn digits, ImageFolder)")

    py = sys.executable
    for name, model, kwargs in demo_anchors(*V2_CONFIGS.values()) if args.v2 else demo_anchors():
        if (work / name / "last.pth.tar").exists() and not args.fresh:
            print(f"anchor {name}: reusing {work / name / 'last.pth.tar'}")
            continue
        run([py, "train.py", data, "--model", model, "--model-kwargs", *[f"{k}={v}" for k, v in kwargs.items()],
             "--epochs", str(args.anchor_epochs), "--lr", "2e-3",
             "--warmup-epochs", "2", "--output", work, "--experiment", name, *COMMON], work / f"{name}.log")

    if args.v2:
        sources = []
        for label, config in V2_CONFIGS.items():  # same anchors, epochs, learning rates, flags: only the config differs
            snnet_dir = work / f"snnet_{label}"
            shutil.rmtree(snnet_dir, ignore_errors=True)
            run(["./distributed_train.sh", "2", data, "--stitch_config", stitch_config_for(work, config), "--epochs",
                 str(args.snnet_epochs), *SNNET_FLAGS, "--output", work, "--experiment", snnet_dir.name, *COMMON],
                work / f"{snnet_dir.name}.log")
            sources.append(results / label / RESULTS_FILE)
            copy_results(snnet_dir, sources[-1])
        files = report(results, sources, V2_TITLE)
        print(f"demo --v2 finished in {time.perf_counter() - t0:.0f}s: {', '.join(str(f) for f in files + sources)}")
        return 0

    snnet_dir = work / "snnet"
    shutil.rmtree(snnet_dir, ignore_errors=True)
    run(["./distributed_train.sh", "2", data, "--stitch_config", stitch_config_for(work), "--epochs", str(args.snnet_epochs),
         *SNNET_FLAGS, "--output", work, "--experiment", "snnet", *COMMON],
        work / "snnet.log")

    copy_results(snnet_dir, results / RESULTS_FILE)
    files = report(results)
    print(f"demo finished in {time.perf_counter() - t0:.0f}s: {', '.join(str(f) for f in files)}, "
          f"{results / RESULTS_FILE}")
    return 0


def copy_results(run_dir: Path, dest: Path) -> None:
    """A run's stitches_res.txt and the anchors' per-image predictions beside it (stitches_pred.npz, which
    `snnet pareto --baselines` reads), checked against each other, to `dest` and beside it."""
    from snnet.results.predictions import load_for, predictions_path, write_predictions
    records = read_results(run_dir)
    pred = load_for(run_dir / RESULTS_FILE, records)
    write_results(dest, records)
    write_predictions(predictions_path(dest), pred)


def report(results: Path, sources: list[Path] | None = None, title: str = TITLE) -> list[Path]:
    """Step 4's table, plot and HTML report, made as `snnet pareto RESULTS... --out DIR` and `snnet report RESULTS...
    --out DIR/report.html` make them, with --baselines (the same functions): the committed
    results/demo/pareto_flops.{md,json,png} and report.html are regenerated from results/demo/stitches_res.txt (and
    the stitches_pred.npz beside it) by this (`python -c "from pathlib import Path;
    from snnet.demo import report; report(Path('results/demo'))"` from the repository root), and results/demo_v2's
    (both fronts and the combined one) from its v1/ and v2/ results files.

    Files written before records carried ``img_size`` (the committed ones) get the size the demo trains and
    evaluates at (COMMON's --img-size) for the plot's subtitle; records that carry one keep theirs."""
    from snnet.results.pareto import pareto_report, save_report
    from snnet.results.report import write_report
    img_size = int(COMMON[COMMON.index("--img-size") + 1])
    # the report names the files it read: relative to the working directory (the repository root for `make demo`)
    paths = [os.path.relpath(s) for s in sources or [results / RESULTS_FILE]]
    rep = pareto_report(paths, "flops", baselines=True)
    print(rep.text, end="")
    page, _ = write_report(paths, results / "report.html", "flops", title=title, img_size=img_size, baselines=True)
    return [*save_report(rep, results, title, img_size), page]


if __name__ == "__main__":
    sys.exit(main())
