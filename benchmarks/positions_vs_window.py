"""Data-chosen stitch positions vs. SN-Net's sliding window, at the same number of stitches: which front is better?

benchmarks/front_quality.py's machinery (digits anchors, `run_recipe`: `train.py --eval` of the untrained SN-Net,
then `./distributed_train.sh 2` with `--val-stitches all`; front hypervolume per epoch, mean ± std over seeds) on
three recipes that differ only in where they stitch:

* ``window``: front_quality's ``ours`` recipe as it is: SN-Net's sliding window (kernel 2, stride 1), on the depth-4
  digits ViTs 10 positions per neighbouring anchor pair, 4 shared stitching layers per pair;
* ``select_kl`` / ``select_ls``: the same recipe with ``"positions": {"select": "kl"|"ls", "per_pair": 10}``: the 10
  positions (of the 20 candidates (j, k), j in 0..3, k in 0..4) with the lowest KL / LS residual in the
  compatibility map on the run's LS-init images, one stitching layer each (snnet/train/positions.py).

The anchors are the digits demo's (output/demo/anchor_w*/last.pth.tar, copied into --work when it has none, so the
maps of benchmarks/score_vs_accuracy.py and this comparison see the same anchors; else front_quality trains them).

    .venv/bin/python benchmarks/positions_vs_window.py [--recipes window select_kl select_ls] [--seeds 3]
                                                       [--epochs 10] [--work output/positions]

Writes <results>/positions_vs_window/: runs.jsonl (every run's per-epoch curve and its positions), table.md,
front_quality.png. Last line: RESULT hv_<recipe>=<final mean> ± <std> ...
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import front_quality as fq  # noqa: E402  (benchmarks/front_quality.py: the machinery)

from snnet.demo import demo_anchors, write_digits  # noqa: E402
from snnet.train.positions import PLAN_FILE  # noqa: E402

PER_PAIR = 10  # the sliding window's positions per pair on depth-4 anchors (snnet.stitching.plan.paired_positions(4))
BASE_FLAGS, BASE_FIELDS = fq.RECIPES["ours"]
RECIPES: dict[str, tuple[list[str], dict]] = {
    "window": (BASE_FLAGS, BASE_FIELDS),
    "select_kl": (BASE_FLAGS, {**BASE_FIELDS, "positions": {"select": "kl", "per_pair": PER_PAIR}}),
    "select_ls": (BASE_FLAGS, {**BASE_FIELDS, "positions": {"select": "ls", "per_pair": PER_PAIR}}),
    "select_cka": (BASE_FLAGS, {**BASE_FIELDS, "positions": {"select": "cka", "per_pair": PER_PAIR}}),
}


def positions_of(run_dir: Path) -> list | None:
    path = run_dir / PLAN_FILE
    return json.loads(path.read_text())["positions"]["pairs"] if path.exists() else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(fq.ROOT / "output" / "positions"))
    p.add_argument("--results", default=str(fq.ROOT / "results" / "stitch_anything" / "positions_vs_window"))
    p.add_argument("--recipes", nargs="+", default=["window", "select_kl", "select_ls"], choices=list(RECIPES))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--from-runs", action="store_true", help="rewrite the table from <results>/runs.jsonl")
    args = p.parse_args(argv)
    from snnet.stitching.plan import paired_positions
    from snnet.utils.fileio import write_text_atomic
    assert len(paired_positions(4)[0]) == PER_PAIR
    work, results = Path(args.work), Path(args.results)
    work.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.from_runs:
        runs = [json.loads(line) for line in (results / "runs.jsonl").read_text().splitlines()]
    else:
        data = write_digits(work)
        for name, _, _ in demo_anchors():
            src, dst = fq.ROOT / "output" / "demo" / name / "last.pth.tar", work / name / "last.pth.tar"
            if src.exists() and not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
        fq.train_anchors(work, data, 30)  # only anchors still missing
        runs = []
        jobs = [(n, s) for s in range(args.seeds) for n in args.recipes]
        for i, (name, seed) in enumerate(jobs):
            print(f"[{i + 1}/{len(jobs)}] {name} seed {seed}, {args.epochs} epochs "
                  f"({(time.perf_counter() - t0) / 60:.1f} min so far)", flush=True)
            r = fq.run_recipe(name, RECIPES[name], seed, args.epochs, work, data)
            tag = f"{name}_s{seed}_e{args.epochs}"
            r["positions"] = positions_of(work / "runs" / tag)
            init_positions = positions_of(work / "runs" / f"{tag}_init")
            if r["positions"] != init_positions:  # the init evaluation must have chosen the same network
                sys.exit(f"{tag}: the init evaluation chose {init_positions}, training chose {r['positions']}")
            if r["positions"] is not None:
                print(f"  positions per pair: {r['positions']}", flush=True)
            runs.append(r)
            write_text_atomic(results / "runs.jsonl", "".join(json.dumps(x) + "\n" for x in runs))
    names = list(dict.fromkeys(r["recipe"] for r in runs))
    epochs = max(r["epochs"] for r in runs)
    summary = fq.summarise(runs, names, epochs)
    target = summary["window"]["hv"][-1][0] if "window" in summary else None
    seeds = sorted({r["seed"] for r in runs})
    positions = "\n".join(f"* {r['recipe']} seed {r['seed']}: {r['positions']}" for r in runs if r["positions"])
    cmd = "python benchmarks/positions_vs_window.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = (f"# Data-chosen positions vs. the sliding window ({PER_PAIR} stitches per anchor pair)\n\n"
            f"Command: `{cmd}`; {len(seeds)} seeds, {epochs} epochs, front_quality's `ours` recipe "
            f"(flags {' '.join(BASE_FLAGS)}; fields {json.dumps(BASE_FIELDS)}), digits demo anchors.\n\n"
            f"## final front quality (mean ± std over seeds)\n\n" + fq.finals(summary, target, "window") +
            "\n## per epoch (epoch 0 = after the LS init, before training)\n\n" + fq.table(summary, epochs) +
            "\n## positions chosen ([j, k] per neighbouring pair: w16->w32, w32->w64)\n\n" + positions + "\n")
    write_text_atomic(results / "table.md", text)
    fq.plot(summary, results / "front_quality.png")
    print(text)
    print(f"done in {(time.perf_counter() - t0) / 60:.1f} min")
    print("RESULT " + " ".join(f"hv_{n}={s['hv'][-1][0]:.3f}±{s['hv'][-1][1]:.3f}" for n, s in summary.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
