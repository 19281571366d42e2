"""Do the compatibility maps predict which stitch trains best? Spearman rho of each score vs. trained top-1.

On the digits demo's anchors (configs/demo_digits.json: three ViTs of depth 4, widths 16/32/64, trained by
`python -m snnet.demo`), for each anchor pair named (default w16 -> w64):

1. `snnet stitch-train` sweeps every position (i, j): the front anchor up to its block i (0..3), one linear
   stitching layer (least-squares init on 256 clean training images), the end anchor from its block j (0..4; 4 = only
   its final norm and head), anchors frozen, for each seed; a run's result.json holds its top-1 after training
   (`acc1`) and right after the least-squares init (`init_acc1`);
2. `snnet similarity` computes the CKA, least-squares residual and KL maps of the same anchors (256 clean training
   images, seed 0);
3. each position (i, j) is the map edge (front unit of block i, end unit before block j) (snnet/train/positions.py's
   `edge_units`, the rule the SN-Net and the selection use), and Spearman's rho (scipy) is computed over the
   positions between each score (signed so that higher = more compatible: CKA, -residual, -KL) and the mean top-1
   over the seeds, after training and at init.

    .venv/bin/python benchmarks/score_vs_accuracy.py [--pairs w16-w64 w32-w64] [--seeds 3] [--epochs 3]

Writes <results>/score_vs_accuracy.{md,json} (per position: scores, top-1 per seed, means; rho per score) and
<results>/score_vs_accuracy.png. Last line: RESULT <pair> rho_cka=... rho_ls=... rho_kl=... (trained top-1).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ANCHORS = {"w16": "configs/demo_digits.json#0", "w32": "configs/demo_digits.json#1",
           "w64": "configs/demo_digits.json#2"}
#: the digits sweep's recipe (configs/sweeps/digits_3x3.yaml)
TRAIN = {"img_size": 16, "batch_size": 32, "opt": "adamw", "lr": 2.0e-3, "weight_decay": 0.05, "sched": "cosine",
         "warmup_epochs": 0, "scale": [0.7, 1.0], "hflip": 0, "workers": 0, "log_interval": 1000}
#: score -> (similarity.json key, sign making higher = more compatible)
SCORES = {"cka": ("cka", 1.0), "ls": ("ls_residual", -1.0), "kl": ("kl", -1.0)}


def sweep_yaml(data: Path, out: Path, pairs: list[list[str]], seeds: int, epochs: int, depth: int = 4) -> str:
    import yaml
    doc = {"data": str(data), "out": str(out), "anchors": ANCHORS, "train": {**TRAIN, "epochs": epochs},
           "run": {"layer": "linear", "ls_init": True, "ls_images": 256, "loss": "ce"},
           "grid": {"pair": pairs, "cut": list(range(depth)), "end_block": list(range(depth + 1)),
                    "seed": list(range(seeds))}}
    return yaml.safe_dump(doc, sort_keys=False)


def sh(cmd: list, log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        sys.exit(f"failed (exit {proc.returncode}): {' '.join(str(c) for c in cmd)}\n" +
                 "\n".join(log.read_text().splitlines()[-15:]))
    return time.perf_counter() - t0


def partial_rank_corr(x: list[float], y: list[float], z: list[float]) -> float:
    """Spearman's partial correlation of x and y given z: Pearson's r of the ranks of x and y after removing from
    each its least-squares line in the ranks of z (how much x predicts y beyond what the FLOPs z already say)."""
    import numpy as np
    from scipy.stats import rankdata
    rx, ry, rz = (rankdata(v) for v in (x, y, z))
    design = np.stack([np.ones_like(rz), rz], 1)
    res = [v - design @ np.linalg.lstsq(design, v, rcond=None)[0] for v in (rx, ry)]
    return float(np.corrcoef(res[0], res[1])[0, 1])


def analyse(sweep_dir: Path, similarity: Path, labels: list[str]) -> dict:
    """Per pair: each position's scores and top-1 (per seed, mean), and Spearman's rho per score."""
    from scipy.stats import spearmanr

    from snnet.train.positions import edge_units
    sim = json.loads(similarity.read_text())
    kinds = [[u["kind"] for u in a["units"]] for a in sim["anchors"]]
    maps = {(p["front"], p["end"]): p for p in sim["pairs"]}
    runs = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("runs/*/result.json"))]
    out = {}
    for front, end in sorted({(r["front"]["label"], r["end"]["label"]) for r in runs},
                             key=lambda fe: (labels.index(fe[0]), labels.index(fe[1]))):
        a, b = labels.index(front), labels.index(end)
        cells: dict[tuple[int, int], dict] = {}
        for r in runs:
            if (r["front"]["label"], r["end"]["label"]) != (front, end):
                continue
            c = cells.setdefault((r["cut"], r["end_block"]), {"i": r["cut"], "j": r["end_block"], "acc1": {},
                                                             "init_acc1": {}})
            c["acc1"][r["seed"]], c["init_acc1"][r["seed"]] = r["acc1"], r["init_acc1"]
            c["flops"] = r["flops"]
        rows = []
        for (i, j), c in sorted(cells.items()):
            ux, uy = edge_units(kinds[a], kinds[b], i, j)
            row = {**c, "front_unit": sim["anchors"][a]["units"][ux]["name"],
                   "end_unit": sim["anchors"][b]["units"][uy]["name"],
                   "acc1_mean": statistics.mean(c["acc1"].values()),
                   "init_acc1_mean": statistics.mean(c["init_acc1"].values())}
            for name, (key, _) in SCORES.items():
                row[name] = maps[(a, b)][key][ux][uy]
            rows.append(row)
        rho = {}
        for target in ("acc1_mean", "init_acc1_mean"):
            for name, (_, sign) in SCORES.items():
                ok = [r for r in rows if r[name] is not None]
                res = spearmanr([sign * r[name] for r in ok], [r[target] for r in ok])
                rho[f"{name}_vs_{target}"] = {"rho": float(res.statistic), "p": float(res.pvalue), "n": len(ok),
                                              "partial_flops": partial_rank_corr([sign * r[name] for r in ok],
                                                                                 [r[target] for r in ok],
                                                                                 [r["flops"] for r in ok])}
            res = spearmanr([r["flops"] for r in rows], [r[target] for r in rows])
            rho[f"flops_vs_{target}"] = {"rho": float(res.statistic), "p": float(res.pvalue), "n": len(rows)}
        out[f"{front}-{end}"] = {"positions": rows, "rho": rho,
                                 "seeds": sorted({s for r in rows for s in r["acc1"]})}
    return out


def report(result: dict, meta: dict) -> str:
    lines = ["# Compatibility scores vs. trained stitch accuracy (digits anchors)\n",
             f"Command: `{meta['command']}`  ", f"Sweep: {meta['epochs']} epochs per run, seeds "
             f"{meta['seeds']}, linear stitch, LS init on 256 clean training images, anchors frozen; maps: "
             f"`{meta['similarity_command']}`. Compute: {meta['minutes']:.1f} min.\n",
             "Spearman's rho over all positions (i, j); scores signed so that higher = more compatible "
             "(CKA, -LS residual, -KL); top-1 = mean over seeds. Baseline: the stitch's FLOPs alone (a stitch "
             "that runs more of the larger anchor costs more). *partial*: Spearman's partial correlation given the "
             "FLOPs (what the score predicts beyond the cost).\n",
             "| pair | positions | score | rho vs trained top-1 (p) | partial, given FLOPs | rho vs LS-init top-1 (p) "
             "| partial, given FLOPs |", "|---|---:|---|---:|---:|---:|---:|"]
    for pair, r in result.items():
        for name in SCORES:
            t, i = r["rho"][f"{name}_vs_acc1_mean"], r["rho"][f"{name}_vs_init_acc1_mean"]
            lines.append(f"| {pair} | {t['n']} | {name} | {t['rho']:+.3f} ({t['p']:.2g}) | {t['partial_flops']:+.3f} "
                         f"| {i['rho']:+.3f} ({i['p']:.2g}) | {i['partial_flops']:+.3f} |")
        t, i = r["rho"]["flops_vs_acc1_mean"], r["rho"]["flops_vs_init_acc1_mean"]
        lines.append(f"| {pair} | {t['n']} | FLOPs (baseline) | {t['rho']:+.3f} ({t['p']:.2g}) | — | "
                     f"{i['rho']:+.3f} ({i['p']:.2g}) | — |")
    for pair, r in result.items():
        lines += ["", f"## {pair}: every position", "",
                  "| i | j | front unit | end unit | MFLOPs | CKA | LS residual | KL | "
                  "top-1 trained (mean; per seed) | top-1 at LS init (mean) |",
                  "|---:|---:|---|---|---:|---:|---:|---:|---|---:|"]
        for p in r["positions"]:
            f = lambda v: "—" if v is None else f"{v:.3f}"
            seeds = ", ".join(f"{p['acc1'][s]:.1f}" for s in sorted(p["acc1"]))
            lines.append(f"| {p['i']} | {p['j']} | {p['front_unit']} | {p['end_unit']} | {p['flops'] / 1e6:.2f} | "
                         f"{f(p['cka'])} | "
                         f"{f(p['ls'])} | {f(p['kl'])} | {p['acc1_mean']:.2f} ({seeds}) | "
                         f"{p['init_acc1_mean']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from snnet.utils.fileio import save_figure
    fig, axes = plt.subplots(len(result), 3, figsize=(12, 3.6 * len(result)), dpi=120, squeeze=False)
    for row, (pair, r) in zip(axes, result.items()):
        for ax, (name, (key, _sign)) in zip(row, SCORES.items()):
            ok = [p for p in r["positions"] if p[name] is not None]
            ax.scatter([p[name] for p in ok], [p["acc1_mean"] for p in ok], label="trained", s=18)
            ax.scatter([p[name] for p in ok], [p["init_acc1_mean"] for p in ok], label="LS init", s=18, marker="x")
            rho = r["rho"][f"{name}_vs_acc1_mean"]["rho"]
            ax.set_title(f"{pair}: {key} (rho trained {rho:+.2f})", fontsize=9)
            ax.set_xlabel(key)
            ax.set_ylabel("top-1 (%)")
            ax.grid(True, ls="--", alpha=0.4)
            ax.legend(fontsize=7)
    save_figure(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(ROOT / "output" / "score_vs_accuracy"))
    p.add_argument("--results", default=str(ROOT / "results" / "stitch_anything"))
    p.add_argument("--pairs", nargs="+", default=["w16-w64"], help="FRONT-END labels of w16, w32, w64")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--procs", type=int, default=2, help="torchrun processes for the sweep (runs are split)")
    p.add_argument("--analyse-only", action="store_true", help="no training: read the finished runs")
    args = p.parse_args(argv)
    pairs = [x.split("-") for x in args.pairs]
    bad = [x for x, pr in zip(args.pairs, pairs) if len(pr) != 2 or not set(pr) <= set(ANCHORS)]
    if bad:
        sys.exit(f"--pairs {bad}: write FRONT-END with labels {', '.join(ANCHORS)}, e.g. w16-w64")
    from snnet.demo import write_digits
    from snnet.utils.fileio import write_text_atomic
    work, results = Path(args.work), Path(args.results)
    work.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    missing = [c for c in ("w16", "w32", "w64") if not (ROOT / "output/demo" / f"anchor_{c}/last.pth.tar").exists()]
    if missing:
        sys.exit(f"anchors {missing} are not trained: run `python -m snnet.demo` first (it writes output/demo/)")
    data = write_digits(ROOT / "output" / "demo")
    sweep_dir, sim_dir = work / "sweep", work / "similarity"
    sim_cmd = ["snnet", "similarity", "--stitch_config", "configs/demo_digits.json", "--data", data, "--img-size",
               "16", "--out", sim_dir]
    t0 = time.perf_counter()
    if not args.analyse_only:
        sweep = work / "sweep.yaml"
        write_text_atomic(sweep, sweep_yaml(data, sweep_dir, pairs, args.seeds, args.epochs))
        launcher = ([Path(sys.executable).parent / "torchrun", f"--nproc_per_node={args.procs}", "-m", "snnet.cli"]
                    if args.procs > 1 else [sys.executable, "-m", "snnet.cli"])
        print(f"sweep: {len(pairs) * 20 * args.seeds} runs ({work / 'sweep.log'})", flush=True)
        sh([*launcher, "stitch-train", "--sweep", sweep], work / "sweep.log")
        print(f"maps: {' '.join(map(str, sim_cmd))}", flush=True)
        sh([sys.executable, "-m", "snnet.cli", *sim_cmd[1:]], work / "similarity.log")
    minutes = (time.perf_counter() - t0) / 60
    result = analyse(sweep_dir, sim_dir / "similarity.json", ["w16", "w32", "w64"])
    meta = {"command": "python benchmarks/score_vs_accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "similarity_command": " ".join(map(str, sim_cmd)), "epochs": args.epochs,
            "seeds": list(range(args.seeds)), "minutes": minutes}
    previous = results / "score_vs_accuracy.json"
    if args.analyse_only and previous.exists():  # the table is rewritten; the command and time are the training's
        meta.update({k: json.loads(previous.read_text())["meta"][k] for k in ("command", "minutes")})
    text = report(result, meta)
    write_text_atomic(results / "score_vs_accuracy.md", text)
    write_text_atomic(results / "score_vs_accuracy.json", json.dumps({"meta": meta, "pairs": result}, indent=1))
    plot(result, results / "score_vs_accuracy.png")
    print(text)
    for pair, r in result.items():
        print(f"RESULT {pair} " + " ".join(f"rho_{n}={r['rho'][f'{n}_vs_acc1_mean']['rho']:+.3f}" for n in SCORES) +
              f" rho_flops={r['rho']['flops_vs_acc1_mean']['rho']:+.3f}" +
              " (vs trained top-1); init: " +
              " ".join(f"rho_{n}={r['rho'][f'{n}_vs_init_acc1_mean']['rho']:+.3f}" for n in SCORES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
