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
hv_ours_half_budget=<mean> hv_cascade=<mean> hv_mixing=<mean> hv_cascade_snnet=... hv_mixing_ours=...

The no-training baselines (snnet/results/baselines.py), from the anchors' per-image predictions every evaluation
saves: hv_cascade / hv_mixing from the pretrained anchors (the untrained SN-Net's evaluation of each run: what one
has without any SN-Net training; the same anchors for both recipes and every seed), hv_cascade_<recipe> /
hv_mixing_<recipe> from each run's own anchors after SN-Net training (means over the same seeds). `--from-runs
--hybrid` adds hv_hybrid_<recipe>: each run's SN-Net used as a cascade, stitches as stages too.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from snnet.demo import COMMON, common, demo_anchors, stitch_config_for, write_digits  # noqa: E402

# Every run shares these. The LR is SN-Net's ratio: its DeiT runs train at 1e-4 (global batch 1024), a tenth of
# DeiT's own pretraining LR; the digits anchors were trained at 2e-3, so 2e-4 here.
BASE = ["--lr", "2e-4", "--warmup-epochs", "1", "--sched", "cosine", "--val-stitches", "all"]

#: name -> (train.py flags, stitch-config fields) on top of BASE and the demo's config
RECIPES: dict[str, tuple[list[str], dict]] = {
    # SN-Net's own: its LS init and decay quirks (--snnet-compat), uniform sampling, each rank its own stitch, one LR
    # (the demo config's "ls_mode" field would win over --snnet-compat's implied mode, so it is named)
    "snnet": (["--snnet-compat", "--ls-mode", "snnet"], {}),
    # this project's: the options the ablation below kept (see docs/results.md)
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
    # against the no-training baselines: ours with the anchors frozen throughout (only the stitching layers train),
    # so the anchors keep the pretrained cascade's accuracy
    "ours+frozen_anchors": (["--ls-mode", "joint", "--lr", "1e-3", "--freeze-anchors"],
                            {"sampler": {"type": "ros", "gap": 0.0003}}),
    # ours with uniform sampling weighted by how far each stitch lies below the anchors' mixing line after the LS
    # init (1 + gap / mean gap; anchors and stitches above the line 1): the run's own epoch-0 evaluation sets them
    "ours+below_line_weights": (["--ls-mode", "joint", "--lr", "1e-3", "--anchor-lr-scale", "0.2"],
                                {"sampler": {"type": "uniform", "weights": "below_mixing_line"}}),
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
    cfg.pop("recipe", None)  # each recipe here is its flags (on top of COMMON) and fields only
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
    shared = common(seed)
    out = work / "runs"
    for d in (out / tag, out / f"{tag}_init"):  # a rerun starts clean (results files refuse to mix runs)
        shutil.rmtree(d, ignore_errors=True)
    t_eval = sh([sys.executable, "train.py", data, "--stitch_config", cfg, "--eval", *shared, *flags,
                 "--output", out, "--experiment", f"{tag}_init"], work / f"{tag}_init.log")
    before = [json.loads(line) for line in (out / f"{tag}_init" / "stitches_res.txt").read_text().splitlines()]
    if fields.get("sampler", {}).get("weights") == "below_mixing_line":
        cfg = recipe_config(work, name, {**fields, "sampler": {**fields["sampler"], "weights": gap_weights(before)}})
    t_train = sh(["./distributed_train.sh", "2", data, "--stitch_config", cfg, "--epochs", str(epochs), *BASE,
                  *shared, *flags, "--output", out, "--experiment", tag], work / f"{tag}.log")
    curve = read_curve(out / tag, before)
    base = run_baselines(out / tag, out / f"{tag}_init")
    print(f"  {tag}: hypervolume {curve['hv'][0]:.2f} -> {curve['hv'][-1]:.2f}, anchor drift {curve['drift'][-1]:+.2f}"
          f"; baselines: cascade {base['hv_cascade']:.2f}, mixing {base['hv_mixing']:.2f} ({t_eval + t_train:.0f}s)",
          flush=True)
    return {"recipe": name, "seed": seed, "epochs": epochs, **curve, "baselines": base, "seconds": t_eval + t_train}


def gap_weights(records: list[dict]) -> list[float]:
    """Sampling weight per cfg_id: 1 + (how far the stitch lies below the anchors' mixing line) / (the mean of those
    gaps); 1 for the anchors and for stitches on or above the line."""
    from snnet.results.baselines import mixing_line
    from snnet.results.pareto import is_anchor
    from snnet.results.quality import line_at
    line = mixing_line([(r["flops"], r["acc1"]) for r in records if is_anchor(r)])
    gaps = [0.0 if is_anchor(r) else max(0.0, line_at(line, r["flops"]) - r["acc1"])
            for r in sorted(records, key=lambda r: r["cfg_id"])]
    below = [g for g in gaps if g > 0]
    mean = sum(below) / len(below) if below else 1.0
    return [round(1.0 + g / mean, 4) for g in gaps]


def run_baselines(run_dir: Path, init_dir: Path) -> dict:
    """The no-training baselines (snnet/results/baselines.py) beside a run's final front: from the pretrained
    anchors (the untrained SN-Net's evaluation, `init_dir`: what one has without any SN-Net training) and from the
    run's own anchors after SN-Net training (`run_dir`), each from the anchors' per-image predictions that
    train.py's evaluation saves next to stitches_res.txt."""
    from snnet.results.baselines import file_baselines
    from snnet.results.pareto import is_anchor
    from snnet.results.records import read_results
    out = {}
    for key, folder in (("", init_dir), ("_trained", run_dir)):
        records = read_results(folder)
        b = file_baselines(folder / "stitches_res.txt", records, [r["cfg_id"] for r in records if is_anchor(r)])
        out.update({f"hv_cascade{key}": b["hypervolume"]["cascade"], f"hv_mixing{key}": b["hypervolume"]["mixing"]})
    final = read_results(run_dir)
    anchors = [r["cfg_id"] for r in final if is_anchor(r)]
    # the trained front against the free baselines (pretrained anchors): stitches above each, budgets ahead
    from snnet.results.baselines import baselines
    from snnet.results.predictions import load_for
    init = read_results(init_dir)
    free = baselines(final, anchors, load_for(init_dir / "stitches_res.txt", init), anchor_records=init)
    out.update({"stitches": free["stitches"], "above_mixing": free["above_mixing"],
                "above_cascade": free["above_cascade"], "ahead_of_mixing": free["ahead_of_mixing"],
                "ahead_of_cascade": free["ahead_of_cascade"]})
    return out


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


def on_images(pred, images):
    """The predictions `pred` (snnet.results.predictions.Predictions) of the images at positions `images` only."""
    from snnet.results.predictions import Predictions
    return Predictions(pred.sample_id[images], pred.label[images], pred.cfg_id, pred.top5[:, images],
                       pred.top_prob[:, images], pred.correct[:, images], pred.meta)


def stage_costs(chain, flops: dict[int, float], shared=None) -> dict[int, float]:
    """What each stage of a cascade `chain` costs: its FLOPs less what it shares with an earlier stage (`shared(a,
    b)`: the FLOPs of the computation routes a and b begin with alike, reused when a ran first; None: nothing)."""
    return {c: flops[c] - (max((shared(a, c) for a in chain[:j]), default=0.0) if shared else 0.0)
            for j, c in enumerate(chain)}


def network_cascade(records: list[dict], pred, anchors: list[int], shared=None) -> dict:
    """The SN-Net used as a cascade whose stages may be any of its networks, stitches included (a stitched route
    that hands unsure images on, or takes them over): every network alone, every pair in FLOPs order, and every
    chain of the anchors, over `cascade_settings`' thresholds. Nothing computed is shared between stages (a stitch
    that starts with the small anchor's blocks could reuse them: this counts them twice, so it is a lower bound on
    that hybrid) unless `shared` says what two routes compute alike (`stage_costs`). `pred` must hold every network
    of `records`. Returns the front ("cascade"), the settings tried and the front's hypervolume."""
    from snnet.results.baselines import cascade_settings
    from snnet.results.quality import hypervolume, pareto_front
    flops = {r["cfg_id"]: float(r["flops"]) for r in records}
    ids = sorted(flops, key=lambda c: (flops[c], c))
    chain = [c for c in ids if c in set(anchors)]
    chains = [list(sub) for k in range(1, len(chain) + 1) for sub in itertools.combinations(chain, k)]
    chains += [[c] for c in ids if c not in set(anchors)]
    chains += [[a, b] for a, b in itertools.combinations(ids, 2) if not (a in chain and b in chain)]
    settings = [s for sub in chains for s in cascade_settings(pred, sub, stage_costs(sub, flops, shared))]
    front = pareto_front(settings)
    ref = max(flops[a] for a in anchors)
    return {"cascade": front, "cascade_settings": len(settings),
            "hypervolume": hypervolume([(s["flops"] / ref, s["acc1"]) for s in front])}


def run_hybrid(run: dict, work: Path, data: Path) -> float:
    """The SN-Net used as a cascade (stitches as stages too: `network_cascade`): its last checkpoint evaluated once
    more with every stitch's per-image predictions; returns that cascade's hypervolume."""
    from snnet.results.pareto import is_anchor
    from snnet.results.predictions import load_for
    from snnet.results.records import read_results
    tag = f"{run['recipe']}_s{run['seed']}_e{run['epochs']}"
    out = work / "hybrid"
    shutil.rmtree(out / tag, ignore_errors=True)
    flags = {**RECIPES, **ABLATION}[run["recipe"]][0]
    shared = common(run["seed"])
    sh([sys.executable, "train.py", data, "--stitch_config", work / f"config_{run['recipe']}.json", "--eval",
        "--resume", work / "runs" / tag / "last.pth.tar", "--save-predictions", "all", *shared, *flags,
        "--output", out, "--experiment", tag], work / f"{tag}_hybrid.log")
    records = read_results(out / tag)
    h = network_cascade(records, load_for(out / tag / "stitches_res.txt", records),
                        [r["cfg_id"] for r in records if is_anchor(r)])
    return h["hypervolume"]


def shared_prefixes(recipe: str, work: Path):
    """`shared(a, b)`: the FLOPs of the steps routes a and b begin with alike (e.g. the small anchor's stem and
    first blocks, which a stitch starting from them can reuse after the small anchor ran), from the recipe's
    network (built without weights; its FLOPs are the results files')."""
    from snnet.stitching.build import build_snnet
    from snnet.stitching.config import load_stitch_config
    from snnet.stitching.cost import cost_table
    net = build_snnet(load_stitch_config(work / f"config_{recipe}.json"), pretrained=False, num_classes=10,
                      img_size=16)
    table = cost_table(net, 16)
    routes = net.routes

    def shared(a: int, b: int) -> float:
        common = []
        for x, y in zip(routes[a], routes[b]):
            if x != y:
                break
            common.append(x)
        return float(table.route_flops(common))
    return shared


def held_out(run: dict, work: Path) -> dict:
    """The cascades with thresholds chosen on other images than they are scored on: the validation images split by
    sample id parity; each cascade's front is chosen on one half and scored on the other, both ways, and the
    hypervolumes (of the stitched front, the anchors' mixing and cascade, the SN-Net as a cascade) on the scoring
    half averaged over the two folds. Needs `run_hybrid`'s folder (every stitch's predictions)."""
    import numpy as np

    from snnet.results.baselines import cascade_settings, mixing_line, score_setting
    from snnet.results.pareto import is_anchor
    from snnet.results.predictions import load_for
    from snnet.results.quality import hypervolume, hypervolume_line, pareto_front
    from snnet.results.records import read_results
    folder = work / "hybrid" / f"{run['recipe']}_s{run['seed']}_e{run['epochs']}"
    records = read_results(folder)
    pred = load_for(folder / "stitches_res.txt", records)
    anchors = [r["cfg_id"] for r in records if is_anchor(r)]
    flops = {r["cfg_id"]: float(r["flops"]) for r in records}
    ref = max(flops[a] for a in anchors)
    chain = sorted(anchors, key=lambda a: flops[a])
    halves = [np.flatnonzero(pred.sample_id % 2 == k) for k in (0, 1)]
    out = {"stitched": [], "mixing": [], "cascade": [], "hybrid": [], "cascade_pretrained": [], "hybrid_shared": []}
    shared = shared_prefixes(run["recipe"], work)
    init = work / "runs" / f"{folder.name}_init"  # the pretrained anchors' predictions (same images, same order)
    init_pred = load_for(init / "stitches_res.txt", read_results(init))
    assert np.array_equal(init_pred.sample_id, pred.sample_id)
    for choose, score in (halves, halves[::-1]):
        pre = pareto_front([s for k in range(1, len(chain) + 1) for sub in itertools.combinations(chain, k)
                             for s in cascade_settings(on_images(init_pred, choose), sub, flops)])
        scored = [score_setting(on_images(init_pred, score), s, flops) for s in pre]
        out["cascade_pretrained"].append(hypervolume([(s["flops"] / ref, s["acc1"]) for s in scored]))
        acc = {c: 100.0 * pred.correct[pred.row(c)][score].mean() for c in flops}
        out["stitched"].append(hypervolume([(flops[c] / ref, acc[c]) for c in flops]))
        out["mixing"].append(hypervolume_line(mixing_line([(flops[a] / ref, acc[a]) for a in chain])))
        casc = pareto_front([s for k in range(1, len(chain) + 1) for sub in itertools.combinations(chain, k)
                              for s in cascade_settings(on_images(pred, choose), sub, flops)])
        hyb = network_cascade(records, on_images(pred, choose), anchors)["cascade"]
        hyb_shared = network_cascade(records, on_images(pred, choose), anchors, shared)["cascade"]
        for key, front, share in (("cascade", casc, None), ("hybrid", hyb, None),
                                  ("hybrid_shared", hyb_shared, shared)):
            scored = [score_setting(on_images(pred, score), s, stage_costs(s["chain"], flops, share))
                      for s in front]
            out[key].append(hypervolume([(s["flops"] / ref, s["acc1"]) for s in scored]))
    return {f"held_out_{k}": statistics.mean(v) for k, v in out.items()}


def baseline_table(runs: list[dict], names: list[str], epochs: int, half: int) -> str:
    """The final stitched front beside the no-training baselines, per recipe and budget, mean ± std over seeds:
    hypervolumes of the cascade and of mixing from the pretrained anchors (free: no SN-Net training at all) and
    from the run's own anchors after SN-Net training; stitches above the free baselines; share of budgets (between
    the smallest and the largest anchor's FLOPs) where the trained front is ahead of them."""
    rows = []
    for name in names:
        for budget in dict.fromkeys((epochs, half)):
            mine = [r for r in runs if r["recipe"] == name and r["epochs"] == budget and "baselines" in r]
            if not mine:
                continue
            f = lambda key, fmt="{:.2f}", scale=1.0: "{} ± {}".format(
                *(fmt.format(v * scale) for v in mean_std([r["baselines"][key] for r in mine])))
            hv = mean_std([r["hv"][-1] for r in mine])
            hybrid = f('hv_network_cascade') if all("hv_network_cascade" in r["baselines"] for r in mine) else "—"
            rows.append(f"| {name} | {budget} | {len(mine)} | {hv[0]:.2f} ± {hv[1]:.2f} | {hybrid} | "
                        f"{f('hv_cascade')} | "
                        f"{f('hv_mixing')} | {f('hv_cascade_trained')} | {f('hv_mixing_trained')} | "
                        f"{f('above_cascade', '{:.1f}')} / {f('above_mixing', '{:.1f}')} of "
                        f"{mine[0]['baselines']['stitches']} | {f('ahead_of_cascade', '{:.0f}', 100)} % / "
                        f"{f('ahead_of_mixing', '{:.0f}', 100)} % |")
    held = []
    for name in names:
        for budget in dict.fromkeys((epochs, half)):
            mine = [r for r in runs if r["recipe"] == name and r["epochs"] == budget and
                    "held_out_hybrid_shared" in r.get("baselines", {})]
            if mine:
                f = lambda key: "{:.2f} ± {:.2f}".format(*mean_std([r["baselines"][f"held_out_{key}"] for r in mine]))
                held.append(f"| {name} | {budget} | {len(mine)} | {f('stitched')} | {f('hybrid')} | "
                            f"{f('hybrid_shared')} | {f('cascade_pretrained')} | {f('cascade')} | {f('mixing')} |")
    if held:
        held = ("\n## thresholds chosen on half the images, scored on the other half (both ways, mean)\n\n"
                "| recipe | epochs | seeds | stitched front | SN-Net as a cascade (hybrid) | hybrid, shared blocks | "
                "cascade (pretrained anchors) | cascade (trained anchors) | mixing (trained anchors) |\n"
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n" + "\n".join(held) + "\n")
    if not rows:
        return ""
    return ("\n## the stitched front beside the no-training baselines (mean ± std over seeds)\n\n"
            "| recipe | epochs | seeds | stitched front | SN-Net as a cascade (hybrid) | "
            "cascade (pretrained anchors) | "
            "mixing (pretrained anchors) | cascade (trained anchors) | mixing (trained anchors) | stitches above "
            "cascade / mixing | budgets where the front leads cascade / mixing |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n" +
            "\n".join(rows) + "\n" + (held or ""))


def plot(summary: dict[str, dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from snnet.utils.fileio import save_figure
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
    from snnet.utils.fileio import write_text_atomic
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
    p.add_argument("--hybrid", action="store_true", help="with --from-runs: evaluate each run's last checkpoint "
                   "again with every stitch's per-image predictions and add the hypervolume of the SN-Net used as a "
                   "cascade (stitches as stages too) to the baselines table")
    p.add_argument("--held-out", action="store_true", help="with --from-runs --hybrid: also the cascades with "
                   "thresholds chosen on half the validation images and scored on the other half (both ways)")
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
        added = 0
        for r in runs:  # runs recorded before the baselines existed: from the run folders, when still in --work
            tag = work / "runs" / f"{r['recipe']}_s{r['seed']}_e{r['epochs']}"
            if "baselines" not in r and (tag / "stitches_res.txt").exists():
                r["baselines"] = run_baselines(tag, tag.with_name(tag.name + "_init"))
                added += 1
        if args.hybrid:
            data = write_digits(work)
            for r in runs:
                if "baselines" in r and "hv_network_cascade" not in r["baselines"]:
                    r["baselines"]["hv_network_cascade"] = run_hybrid(r, work, data)
                    print(f"  {r['recipe']} seed {r['seed']}, {r['epochs']} epochs: SN-Net as a cascade "
                          f"{r['baselines']['hv_network_cascade']:.2f}", flush=True)
                    added += 1
        if args.held_out:
            for r in runs:
                if "baselines" in r and "held_out_hybrid_shared" not in r["baselines"] and \
                        (work / "hybrid" / f"{r['recipe']}_s{r['seed']}_e{r['epochs']}").exists():
                    r["baselines"].update(held_out(r, work))
                    b = r["baselines"]
                    print(f"  {r['recipe']} seed {r['seed']}, {r['epochs']} epochs, held out: stitched "
                          f"{b['held_out_stitched']:.2f}, mixing {b['held_out_mixing']:.2f}, cascade "
                          f"{b['held_out_cascade']:.2f} (pretrained anchors {b['held_out_cascade_pretrained']:.2f}), "
                          f"SN-Net as a cascade {b['held_out_hybrid']:.2f} ({b['held_out_hybrid_shared']:.2f} with "
                          f"shared blocks)", flush=True)
                    added += 1
        if added:
            from snnet.utils.fileio import write_text_atomic
            write_text_atomic(results / "runs.jsonl", "".join(json.dumps(r) + "\n" for r in runs))
            print(f"{added} baseline update(s) written to runs.jsonl, from the run folders in {work / 'runs'}")
    else:
        runs = train_all(args, names, half, every, work, results)
    from snnet.utils.fileio import write_text_atomic
    summary = summarise(runs, names, args.epochs)
    halves = {f"{n}, half budget": v for n, v in summarise(runs, ["ours"], half).items()} \
        if half != args.epochs else {}
    target = summary["snnet"]["hv"][-1][0] if "snnet" in summary else None
    text = (f"## final front quality ({args.seeds} seeds, mean ± std)\n\n" + finals({**summary, **halves}, target) +
            baseline_table(runs, names, args.epochs, half) +
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
    base = {n: [r["baselines"] for r in runs if r["recipe"] == n and r["epochs"] == args.epochs and "baselines" in r]
            for n in ("snnet", "ours")}
    if all(base.values()):
        free = base["snnet"] + base["ours"]
        extra += (f" hv_cascade={statistics.mean(b['hv_cascade'] for b in free):.3f}"
                  f" hv_mixing={statistics.mean(b['hv_mixing'] for b in free):.3f}" +
                  "".join(f" hv_cascade_{n}={statistics.mean(b['hv_cascade_trained'] for b in base[n]):.3f}"
                          f" hv_mixing_{n}={statistics.mean(b['hv_mixing_trained'] for b in base[n]):.3f}"
                          for n in ("snnet", "ours")))
        if all("hv_network_cascade" in b for b in free):
            extra += "".join(f" hv_hybrid_{n}={statistics.mean(b['hv_network_cascade'] for b in base[n]):.3f}"
                             for n in ("snnet", "ours"))
        if all("held_out_hybrid_shared" in b for b in free):
            extra += (f" held_out_hv_cascade={statistics.mean(b['held_out_cascade_pretrained'] for b in free):.3f}" +
                      "".join(f" held_out_hv_hybrid_{n}={statistics.mean(b['held_out_hybrid'] for b in base[n]):.3f}"
                              f" held_out_hv_hybrid_shared_{n}="
                              f"{statistics.mean(b['held_out_hybrid_shared'] for b in base[n]):.3f}"
                              for n in ("snnet", "ours")))
    print(f"RESULT hv_snnet={target:.3f} hv_ours={summary['ours']['hv'][-1][0]:.3f} "
          f"epochs_to_match={match if match is not None else 'never'} of {args.epochs} "
          f"anchor_drift_snnet={summary['snnet']['drift'][-1][0]:+.3f} "
          f"anchor_drift_ours={summary['ours']['drift'][-1][0]:+.3f}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
