"""How fast does the whole front get good? SN-Net's recipe vs. this project's, side by side, epoch by epoch.

Data: scikit-learn's digits (1,797 real 8x8 scans, shipped with the package) as a 16 px ImageFolder, stratified
80/20 (snnet/demo.py's `write_digits`). Anchors: the digits demo's three ViTs (depth 4, widths 16/32/64), trained
once as plain models (train.py --model, 30 epochs), then reused by every run. They reach about 77 / 90 / 96 % top-1,
so the front is far from saturated and recipes differ measurably.

For every recipe and seed the script

1. evaluates the untrained SN-Net (`train.py --eval`: the recipe's LS init, then every stitch): the epoch-0 front and
   the anchors' top-1 *before* SN-Net training (for the drift);
2. trains it with `./distributed_train.sh 2` (gloo, two processes, as a user would) for the epoch budget, with
   `--val-stitches all`, so summary.csv holds every stitch's top-1 and the front's hypervolume after every epoch.

Front quality is snnet/results/quality.py's (docs/front_quality.md): hypervolume of the (FLOPs / largest anchor's FLOPs,
top-1) front against the reference point (1.1, 0); anchor drift = anchors' mean top-1 after minus before.

    .venv/bin/python benchmarks/front_quality.py                 # default: 3 seeds, 20 epochs, snnet vs ours
    .venv/bin/python benchmarks/front_quality.py --ablation      # + one run per option of ours (longer)

Writes results/front_quality/: runs.jsonl (every run's per-epoch curve), table.md (mean +- std per epoch),
ablation.md, front_quality.png. Last line:
RESULT hv_snnet=<final, mean> hv_ours=<final, mean> epochs_to_match=<first epoch where ours' mean hypervolume
reaches snnet's final mean> of <budget> anchor_drift_snnet=<mean> anchor_drift_ours=<mean>
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from snnet.demo import COMMON, demo_anchors, stitch_config_for, write_digits  # noqa: E402

# Every run shares these. The LR is SN-Net's ratio: its DeiT runs train at 1e-4 (global batch 1024), a tenth of
# DeiT's own pretraining LR; the digits anchors were trained at 2e-3, so 2e-4 here.
BASE = ["--lr", "2e-4", "--warmup-epochs", "1", "--sched", "cosine", "--val-stitches", "all"]

#: name -> (train.py flags, stitch-config fields) on top of BASE and the demo's config
RECIPES: dict[str, tuple[list[str], dict]] = {
    # SN-Net's own: its LS init and decay quirks (--snnet-compat), uniform sampling, each rank its own stitch, one LR
    # (the demo config's "ls_mode" field would win over --snnet-compat's implied mode, so it is named)
    "snnet": (["--snnet-compat", "--ls-mode", "snnet"], {}),
    # this project's: the options the ablation below kept (see README, "Front quality")
    # ROS buckets of 0.3 MFLOPs (the digits stitches cost 0.27-4.1 MFLOPs: 13 buckets), 5x the LR for the stitching
    # layers (anchors keep SN-Net's LR), joint LS init, and none of SN-Net's decay quirks
    "ours": (["--ls-mode", "joint", "--lr", "1e-3", "--anchor-lr-scale", "0.2"],
             {"sampler": {"type": "ros", "gap": 0.0003}}),
}
#: ours' candidate options, each added alone to SN-Net's recipe (--ablation)
ABLATION: dict[str, tuple[list[str], dict]] = {
    "snnet+joint_ls": (["--snnet-compat", "--ls-mode", "joint"], {}),
    "snnet+sync": (["--snnet-compat", "--ls-mode", "snnet", "--sample-sync"], {}),
    "snnet+anchor_lr0.1": (["--snnet-compat", "--ls-mode", "snnet", "--anchor-lr-scale", "0.1"], {}),
    "snnet+sl_lr5x": (["--snnet-compat", "--ls-mode", "snnet", "--lr", "1e-3", "--anchor-lr-scale", "0.2"], {}),
    "snnet+ros": (["--snnet-compat", "--ls-mode", "snnet"], {"sampler": {"type": "ros", "gap": 0.0003}}),
    "snnet+lora": (["--snnet-compat", "--ls-mode", "snnet"], {"stitch_layer": {"type": "lora", "rank": 4}}),
    "snnet-compat": (["--ls-mode", "snnet"], {}),  # SN-Net's recipe without its weight-decay accident
    "ours-sl_lr5x": (["--ls-mode", "joint"], {"sampler": {"type": "ros", "gap": 0.0003}}),
}


def sh(cmd: list, log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                              env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        sys.exit(f"failed (exit {proc.returncode}): {' '.join(str(c) for c in cmd)}\n" +
                 "\n".join(log.read_text().splitlines()[-15:]))
    return time.perf_counter() - t0


def train_anchors(work: Path, data: Path, epochs: int) -> None:
    for name, model, kwargs in demo_anchors():
        if (work / name / "last.pth.tar").exists():
            continue
        print(f"training anchor {name} ({epochs} epochs)", flush=True)
        sh([sys.executable, "train.py", data, "--model", model, "--model-kwargs",
            *[f"{k}={v}" for k, v in kwargs.items()], "--epochs", epochs, "--lr", "2e-3", "--warmup-epochs", "2",
            "--output", work, "--experiment", name, *COMMON], work / f"{name}.log")


def recipe_config(work: Path, name: str, fields: dict) -> Path:
    cfg = json.loads(stitch_config_for(work).read_text())
    cfg.update(fields)
    path = work / f"config_{name}.json"
    path.write_text(json.dumps(cfg, indent=1))
    return path


def read_curve(run_dir: Path, before: list[dict]) -> dict:
    """Per-epoch hypervolume and anchor drift of one run (epoch 0 = after LS init, before training)."""
    from snnet.results.quality import front_quality
    anchors = [r["cfg_id"] for r in before if "->" not in r["route"]]
    start = {a: next(r["acc1"] for r in before if r["cfg_id"] == a) for a in anchors}
    hv = [front_quality(before, anchors)["hypervolume"]]
    drift = [0.0]
    for row in csv.DictReader(open(run_dir / "summary.csv")):
        hv.append(float(row["eval_front_hv"]))
        drift.append(statistics.mean(float(row[f"eval_top1@{a}"]) - start[a] for a in anchors))
    return {"hv": hv, "drift": drift}


def run_recipe(name: str, spec: tuple[list[str], dict], seed: int, epochs: int, work: Path, data: Path) -> dict:
    flags, fields = spec
    cfg = recipe_config(work, name, fields)
    tag = f"{name}_s{seed}_e{epochs}"
    common = [*COMMON[:COMMON.index("--seed")], "--seed", str(seed), *COMMON[COMMON.index("--seed") + 2:]]
    out = work / "runs"
    for d in (out / tag, out / f"{tag}_init"):  # a rerun starts clean (results files refuse to mix runs)
        shutil.rmtree(d, ignore_errors=True)
    t_eval = sh([sys.executable, "train.py", data, "--stitch_config", cfg, "--eval", *common, *flags,
                 "--output", out, "--experiment", f"{tag}_init"], work / f"{tag}_init.log")
    before = [json.loads(line) for line in (out / f"{tag}_init" / "stitches_res.txt").read_text().splitlines()]
    t_train = sh(["./distributed_train.sh", "2", data, "--stitch_config", cfg, "--epochs", str(epochs), *BASE,
                  *common, *flags, "--output", out, "--experiment", tag], work / f"{tag}.log")
    curve = read_curve(out / tag, before)
    print(f"  {tag}: hypervolume {curve['hv'][0]:.2f} -> {curve['hv'][-1]:.2f}, anchor drift {curve['drift'][-1]:+.2f}"
          f" ({t_eval + t_train:.0f}s)", flush=True)
    return {"recipe": name, "seed": seed, "epochs": epochs, **curve, "seconds": t_eval + t_train}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: list[dict], names: list[str], epochs: int) -> dict[str, dict]:
    out = {}
    for name in names:
        mine = [r for r in runs if r["recipe"] == name and r["epochs"] == epochs]
        if mine:
            out[name] = {"hv": [mean_std([r["hv"][e] for r in mine]) for e in range(epochs + 1)],
                         "drift": [mean_std([r["drift"][e] for r in mine]) for e in range(epochs + 1)],
                         "seeds": len(mine)}
    return out


def table(summary: dict[str, dict], epochs: int) -> str:
    names = list(summary)
    head = "| epoch | " + " | ".join(f"{n} hypervolume | {n} anchor drift" for n in names) + " |"
    lines = [head, "|---:|" + "---:|---:|" * len(names)]
    for e in range(epochs + 1):
        cells = []
        for n in names:
            (h, hs), (d, ds) = summary[n]["hv"][e], summary[n]["drift"][e]
            cells += [f"{h:.2f} ± {hs:.2f}", f"{d:+.2f} ± {ds:.2f}"]
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def finals(summary: dict[str, dict], target: float | None, target_name: str = "snnet") -> str:
    """One row per recipe: final hypervolume and drift (mean ± std), and the first epoch reaching `target` (the final
    mean hypervolume of recipe `target_name`)."""
    lines = ["| recipe | epochs | seeds | final hypervolume | final anchor drift | first epoch >= "
             f"{target_name}'s final |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, s in summary.items():
        (h, hs), (d, ds) = s["hv"][-1], s["drift"][-1]
        first = next((e for e, (v, _) in enumerate(s["hv"]) if target is not None and v >= target), None)
        lines.append(f"| {name} | {len(s['hv']) - 1} | {s['seeds']} | {h:.2f} ± {hs:.2f} | {d:+.2f} ± {ds:.2f} | "
                     f"{first if first is not None else '—'} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from snnet.core.fileio import save_figure
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4), dpi=130)
    for name, s in summary.items():
        xs = list(range(len(s["hv"])))
        for ax, key in ((a, "hv"), (b, "drift")):
            m = [v[0] for v in s[key]]
            sd = [v[1] for v in s[key]]
            ax.plot(xs, m, label=f"{name}, {len(xs) - 1} epochs ({s['seeds']} seeds)")
            ax.fill_between(xs, [x - y for x, y in zip(m, sd)], [x + y for x, y in zip(m, sd)], alpha=0.2)
    a.set_title("front hypervolume (ref: 1.1x largest anchor's FLOPs, top-1 0)")
    b.set_title("anchor drift (mean anchor top-1 minus before)")
    for ax in (a, b):
        ax.set_xlabel("epoch (0 = after LS init)")
        ax.grid(True, ls="--", alpha=0.4)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def train_all(args, names: list[str], half: int, every: dict, work: Path, results: Path) -> list[dict]:
    """Anchors (once), then every (recipe, seed, budget) run; runs.jsonl in `results`."""
    from snnet.core.fileio import write_text_atomic
    t0 = time.perf_counter()
    data = write_digits(work)
    train_anchors(work, data, args.anchor_epochs)
    runs = []
    jobs = [(n, s, args.epochs) for s in range(args.seeds) for n in names]
    if "ours" in names and not args.no_half:
        jobs += [("ours", s, half) for s in range(args.seeds)]
    spent = units = 0.0  # run seconds and epochs (+1 for the init evaluation) so far: the ETA's rate
    for i, (name, seed, epochs) in enumerate(jobs):
        left = sum(e + 1 for _, _, e in jobs[i:])
        eta = f", ETA {spent / units * left / 60:.1f} min" if units else ""
        print(f"[{i + 1}/{len(jobs)}] {name} seed {seed}, {epochs} epochs "
              f"({(time.perf_counter() - t0) / 60:.1f} min so far{eta})", flush=True)
        runs.append(run_recipe(name, every[name], seed, epochs, work, data))
        spent, units = spent + runs[-1]["seconds"], units + epochs + 1
    write_text_atomic(results / "runs.jsonl", "".join(json.dumps(r) + "\n" for r in runs))
    return runs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(ROOT / "output" / "front_quality"), help="scratch folder")
    p.add_argument("--results", default=str(ROOT / "results" / "front_quality"))
    p.add_argument("--epochs", type=int, default=20, help="SN-Net's epoch budget")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--anchor-epochs", type=int, default=30)
    p.add_argument("--recipes", nargs="*", default=None, help="recipe names (default: snnet ours; with --ablation "
                                                             "also each option alone)")
    p.add_argument("--ablation", action="store_true", help="also run each candidate option of ours alone")
    p.add_argument("--from-runs", action="store_true", help="rewrite the table, plot and RESULT line from the "
                                                             "--results folder's runs.jsonl (no training)")
    p.add_argument("--no-half", action="store_true", help="skip ours' runs with half the epoch budget (its own, "
                                                          "shorter schedule)")
    args = p.parse_args(argv)
    work, results = Path(args.work), Path(args.results)
    work.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    every = {**RECIPES, **ABLATION}
    names = args.recipes or (list(RECIPES) + (list(ABLATION) if args.ablation else []))
    unknown = [n for n in names if n not in every]
    if unknown:
        sys.exit(f"unknown recipe(s) {unknown}; known: {', '.join(every)}")
    t0 = time.perf_counter()
    half = args.epochs // 2
    if args.from_runs:
        runs = [json.loads(line) for line in (results / "runs.jsonl").read_text().splitlines()]
        names = list(dict.fromkeys(r["recipe"] for r in runs))
        args.epochs = max(r["epochs"] for r in runs)
        half = min(r["epochs"] for r in runs)
    else:
        runs = train_all(args, names, half, every, work, results)
    from snnet.core.fileio import write_text_atomic
    summary = summarise(runs, names, args.epochs)
    halves = {f"{n}, half budget": v for n, v in summarise(runs, ["ours"], half).items()} \
        if half != args.epochs else {}
    target = summary["snnet"]["hv"][-1][0] if "snnet" in summary else None
    text = (f"## final front quality ({args.seeds} seeds, mean ± std)\n\n" + finals({**summary, **halves}, target) +
            "\n## per epoch (epoch 0 = after the LS init, before training)\n\n" + table(summary, args.epochs))
    write_text_atomic(results / "table.md", text)
    plot({**summary, **halves}, results / "front_quality.png")
    print(text)
    print(f"done in {(time.perf_counter() - t0) / 60:.1f} min")
    if "snnet" not in summary or "ours" not in summary:
        print("(no RESULT line: it needs recipes snnet and ours)")
        return 0
    match = next((e for e, (h, _) in enumerate(summary["ours"]["hv"]) if h >= target), None)
    extra = f" hv_ours_half_budget={next(iter(halves.values()))['hv'][-1][0]:.3f}" if halves else ""
    print(f"RESULT hv_snnet={target:.3f} hv_ours={summary['ours']['hv'][-1][0]:.3f} "
          f"epochs_to_match={match if match is not None else 'never'} of {args.epochs} "
          f"anchor_drift_snnet={summary['snnet']['drift'][-1][0]:+.3f} "
          f"anchor_drift_ours={summary['ours']['drift'][-1][0]:+.3f}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
