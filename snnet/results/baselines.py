"""Is a stitch worth its FLOPs? Two baselines that need no training, built from the anchors' per-image predictions.

* **Random anchor mixing.** Send a fraction p of the images to the larger of two anchors and the rest to the
  smaller: the expected cost and top-1 lie on the straight line between the two. The best mixtures form the upper
  concave hull of the anchors' (FLOPs, top-1) points, from the cheapest anchor to the most accurate one (the
  straight lines between adjacent anchors when every anchor is worth its FLOPs); above the largest anchor's cost
  it stays at its top-1. Needs only the anchors' records.
* **Confidence cascade.** Run the smallest anchor of a chain (anchors ordered by FLOPs); if its top softmax
  probability is below the stage's threshold, run the next anchor too, and so on; the last always answers. The
  cost of an image is the FLOPs of every anchor it ran (sequentially, nothing shared), averaged over the images;
  the top-1 is the answering anchor's. Every chain of anchors in FLOPs order is tried (each anchor alone, every
  pair, ..., all of them), over a grid of thresholds per stage (every distinct probability for a two-stage chain on
  up to 2,000 images, else quantiles, at most about 2,000 settings per chain); the cascade's front is the Pareto
  front of all settings. Needs the anchors' per-image predictions (`snnet.results.predictions`).

Hypervolume, as for a stitched front (snnet/results/quality.py): the integral over budgets b in [0, 1.1] of the
best top-1 reachable at (normalised) cost <= b. A cascade is a finite set of settings: the same staircase as the
stitches'. The mixing line is a continuum of mixtures, so the best top-1 at budget b is the line itself there: its
hypervolume is the exact integral of the piecewise-linear curve (trapezoids), not a staircase of its vertices.
The costs of both baselines are averages over images, the stitches' are per image; at an average budget a
stitched deployment could mix stitches too (the line through its own front), which this comparison does not credit.

"Stitches above a baseline": stitched (non-anchor) routes whose top-1 exceeds the baseline's best at their FLOPs.
"Ahead on": the share of budgets from the cheapest anchor's cost to the largest anchor's where the stitched front's
best top-1 exceeds the baseline's.

With every stitch's predictions (`--save-predictions all`), both counts against mixing come with a 90 % interval
over resamples of the validation images (a paired bootstrap: every network and the line are scored on the same
resampled images). On a few hundred images, anchors a point apart and stitches within a point of the line, which
stitches clear it depends on the images drawn; the interval says how much.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from snnet.results.predictions import Predictions, load_for
from snnet.results.quality import hypervolume, hypervolume_line, line_at, pareto_front
from snnet.results.records import ResultsError

#: settings tried per chain (threshold tuples), and the images up to which a two-stage chain tries every value
MAX_SETTINGS = 2000
EXACT_IMAGES = 2000
#: resamples of the validation images for the intervals against mixing, and the share of them an interval covers
RESAMPLES, COVER = 1000, 0.9


# ------------------------------------------------------------------------------------------------------ mixing
def mixing_line(anchors: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Vertices (cost, top-1) of the best random mixtures of the anchors: the upper concave hull of their points
    from the cheapest anchor to the most accurate one, cost ascending."""
    pts = sorted(anchors, key=lambda p: (p[0], -p[1]))
    pts = [p for i, p in enumerate(pts) if i == 0 or p[0] != pts[i - 1][0]]  # equal cost: the more accurate
    top = max(range(len(pts)), key=lambda i: (pts[i][1], -pts[i][0]))
    hull: list[tuple[float, float]] = []
    for p in pts[:top + 1]:
        while len(hull) >= 2:
            (x0, y0), (x1, y1) = hull[-2], hull[-1]
            if (y1 - y0) * (p[0] - x0) <= (p[1] - y0) * (x1 - x0):  # hull[-1] on or below the chord: a mixture wins
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def staircase_at(front: Sequence[tuple[float, float]], cost: float) -> float:
    """Best top-1 of a finite set of (cost, top-1) points at cost <= `cost`; -inf when none fits."""
    return max((y for x, y in front if x <= cost), default=-math.inf)


# ------------------------------------------------------------------------------------------------------ cascade
def _grid(p: np.ndarray, stages: int) -> np.ndarray:
    """Thresholds of one stage: exit when the top probability >= t. Includes 'never exit' (inf)."""
    if stages == 1 and len(p) <= EXACT_IMAGES:
        values = np.unique(p)
    else:
        per = max(2, int(MAX_SETTINGS ** (1.0 / stages)))
        values = np.unique(np.quantile(p, np.linspace(0.0, 1.0, per)))
    return np.concatenate([values, [np.inf]])


def cascade_settings(pred: Predictions, chain: Sequence[int], flops: dict[int, float]) -> list[dict[str, Any]]:
    """Every threshold setting of one chain (cfg_ids, run in this order; `flops`: each stage's cost by cfg_id) on
    `pred`'s images: a list of {"chain", "thresholds", "flops" (mean per image), "acc1" (percent)}."""
    p, ok = _chain_inputs(pred, chain)
    cum = np.cumsum([flops[c] for c in chain])
    if len(chain) == 1:
        return [{"chain": list(chain), "thresholds": [], "flops": float(cum[0]), "acc1": 100.0 * ok[0].mean()}]
    grids = [_grid(p[j], len(chain) - 1) for j in range(len(chain) - 1)]
    return [{"chain": list(chain), "thresholds": [float(t) for t in ts], **_run(p, ok, cum, ts)}
            for ts in itertools.product(*grids)]


def _chain_inputs(pred: Predictions, chain: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per stage of `chain`: the top probability and the correctness of each image."""
    rows = [pred.row(c) for c in chain]
    return pred.top_prob[rows].astype(np.float64), pred.correct[rows]


def _run(p: np.ndarray, ok: np.ndarray, cum: np.ndarray, thresholds: Sequence[float]) -> dict[str, float]:
    """The cascade with these thresholds (an image leaves at the first stage whose top probability reaches the
    stage's threshold; the last stage answers the rest): mean cost per image and top-1 in percent."""
    n = p.shape[1]
    exit_at = np.full(n, len(cum) - 1)
    pending = np.ones(n, dtype=bool)
    for j, t in enumerate(thresholds):
        leave = pending & (p[j] >= t)
        exit_at[leave] = j
        pending &= ~leave
    return {"flops": float(cum[exit_at].mean()), "acc1": 100.0 * ok[exit_at, np.arange(n)].mean()}


def score_setting(pred: Predictions, setting: dict[str, Any], flops: dict[int, float]) -> dict[str, Any]:
    """One cascade setting (its chain and thresholds, e.g. chosen on other images) scored on `pred`'s images: the
    setting with its "flops" (mean per image) and "acc1" (percent) there."""
    p, ok = _chain_inputs(pred, setting["chain"])
    ts = [np.inf if t is None else t for t in setting["thresholds"]]
    return {**setting, **_run(p, ok, np.cumsum([flops[c] for c in setting["chain"]]), ts)}


def resampled_mixing(records: Sequence[dict[str, Any]], anchors: Sequence[int], pred: Predictions,
                     budgets: np.ndarray, seed: int = 0) -> dict[str, list] | None:
    """COVER intervals, over RESAMPLES resamples of the validation images (seeded), of the stitches above the
    mixing line and the share of `budgets` where the stitched front is ahead of it; the line is rebuilt from the
    anchors' top-1 on each resample. None unless `pred` holds every record's predictions."""
    ids = [r["cfg_id"] for r in records]
    if not set(ids) <= set(pred.cfg_id.tolist()):
        return None
    correct = np.stack([pred.correct[pred.row(i)] for i in ids]).astype(np.float32)  # [networks, images]
    n = correct.shape[1]
    rng = np.random.default_rng(seed)
    acc = np.concatenate([100 * correct @ rng.multinomial(n, np.full(n, 1 / n), size=m).T.astype(np.float32) / n
                          for m in [100] * (RESAMPLES // 100)], axis=1)  # [networks, resamples]
    flops = np.array([float(r["flops"]) for r in records])
    order = np.argsort(flops, kind="stable")
    fits = np.searchsorted(flops[order], budgets, side="right") - 1  # the cheapest network fits every budget
    rows = {c: k for k, c in enumerate(ids)}
    stitches = [k for k, c in enumerate(ids) if c not in set(anchors)]
    above, ahead = [], []
    for a in acc.T:
        line = mixing_line([(flops[rows[c]], a[rows[c]]) for c in anchors])
        above.append(sum(a[k] > line_at(line, flops[k]) for k in stitches))
        xs, ys = zip(*line)
        ahead.append(float(np.mean(np.maximum.accumulate(a[order])[fits] > np.interp(budgets, xs, ys))))
    tail = (1 - COVER) / 2
    span = lambda v: [np.quantile(v, tail, method="lower").item(), np.quantile(v, 1 - tail, method="higher").item()]
    return {"above_mixing": span(above), "ahead_of_mixing": span(ahead)}


# ------------------------------------------------------------------------------------------------------ both
def baselines(records: Sequence[dict[str, Any]], anchors: Sequence[int], pred: Predictions,
              anchor_records: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Both baselines of one results file beside its stitched front: fronts, hypervolumes (quality.py's
    normalisation: FLOPs / the largest anchor's, reference (1.1, 0)), stitches above each baseline and the share of
    budgets where the stitched front is ahead. `anchors`: the anchors' cfg_ids; `pred` must hold them all. The
    baselines are built from `anchor_records` (the records `pred` belongs to: e.g. the anchors before SN-Net
    training) when given, else from `records`."""
    by_id = {r["cfg_id"]: r for r in (anchor_records if anchor_records is not None else records)}
    missing = [a for a in anchors if a not in set(pred.cfg_id.tolist())]
    if missing:
        raise ResultsError(f"the predictions hold no anchor cfg_id {missing} (they hold {pred.cfg_id.tolist()}); "
                           f"evaluate with --save-predictions anchors (the default)")
    chain = sorted(anchors, key=lambda a: (by_id[a]["flops"], a))
    ref = max(by_id[a]["flops"] for a in anchors)
    flops = {a: float(by_id[a]["flops"]) for a in chain}
    mixing = mixing_line([(flops[a], float(by_id[a]["acc1"])) for a in chain])
    settings = [s for k in range(1, len(chain) + 1) for sub in itertools.combinations(chain, k)
                for s in cascade_settings(pred, sub, flops)]
    cascade = pareto_front(settings)
    stitched_pts = [(float(r["flops"]), float(r["acc1"])) for r in records]
    stitches = [p for r, p in zip(records, stitched_pts) if r["cfg_id"] not in set(anchors)]
    casc_pts = [(s["flops"], s["acc1"]) for s in cascade]
    norm = lambda pts: [(x / ref, y) for x, y in pts]
    lo = flops[chain[0]]
    budgets = np.linspace(lo, ref, 2001)
    best_stitched = np.array([staircase_at(stitched_pts, b) for b in budgets])
    ahead = lambda f: float(np.mean(best_stitched > np.array([f(b) for b in budgets])))
    return {
        "anchors": chain, "ref_cost": ref, "images": int(len(pred.sample_id)),
        "hypervolume": {"stitched": hypervolume(norm(stitched_pts)), "mixing": hypervolume_line(norm(mixing)),
                        "cascade": hypervolume(norm(casc_pts))},
        "mixing": [{"flops": x, "acc1": y} for x, y in mixing],
        "cascade": cascade, "cascade_settings": len(settings),
        "stitches": len(stitches),
        "above_mixing": sum(1 for x, y in stitches if y > line_at(mixing, x)),
        "above_cascade": sum(1 for x, y in stitches if y > staircase_at(casc_pts, x)),
        "ahead_of_mixing": ahead(lambda b: line_at(mixing, b)),
        "ahead_of_cascade": ahead(lambda b: staircase_at(casc_pts, b)),
        "interval": None if anchor_records is not None else resampled_mixing(records, anchors, pred, budgets),
    }


def file_baselines(path: str | Path, records: Sequence[dict[str, Any]], anchors: Sequence[int]) -> dict[str, Any]:
    """`baselines` of a results file, from the predictions file beside it (checked against its records)."""
    return baselines(records, anchors, load_for(path, records))


# ------------------------------------------------------------------------------------------------------ words
def against_mixing(b: dict[str, Any]) -> tuple[str, str, str]:
    """("N of M", "P %", note) of the stitches above the mixing line and the budgets ahead of it, each with its
    interval over resampled validation images where `baselines` has one ("4 of 12 (1-10)", "63 % (20-90)"), and
    the note that says what the intervals are ("" without them)."""
    above, ahead = f"{b['above_mixing']} of {b['stitches']}", f"{100 * b['ahead_of_mixing']:.0f} %"
    if not b.get("interval"):
        return above, ahead, ""
    (a0, a1), (h0, h1) = b["interval"]["above_mixing"], b["interval"]["ahead_of_mixing"]
    return (f"{above} ({a0}-{a1})", f"{ahead} ({100 * h0:.0f}-{100 * h1:.0f})",
            f" ({100 * COVER:.0f} % intervals over resampled validation images)")


def summary_table(rows: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """Markdown: per file, the stitched front and both baselines (hypervolume, stitches above, budgets ahead)."""
    lines = ["| file | front | hypervolume | stitches above it | stitched front ahead on |",
             "|---|---|---:|---:|---:|"]
    for label, b in rows:
        hv = b["hypervolume"]
        lines.append(f"| {label} | stitched front | {hv['stitched']:.3f} | | |")
        above, ahead, _ = against_mixing(b)
        lines.append(f"| {label} | random anchor mixing | {hv['mixing']:.3f} | {above} | {ahead} of budgets |")
        lines.append(f"| {label} | confidence cascade | {hv['cascade']:.3f} | {b['above_cascade']} of "
                     f"{b['stitches']} | {100 * b['ahead_of_cascade']:.0f} % of budgets |")
    return "\n".join(lines) + "\n"


def cascade_table(b: dict[str, Any], scale: float, unit: str) -> str:
    """Markdown: the cascade's front, one row per setting."""
    lines = [f"| {unit} (mean per image) | top-1 | chain (cfg_ids) | thresholds |", "|---:|---:|---|---|"]
    for s in b["cascade"]:
        ts = ", ".join("never" if math.isinf(t) else f"{t:.4f}" for t in s["thresholds"]) or "(alone)"
        lines.append(f"| {s['flops'] / scale:.3f} | {s['acc1']:.2f} | {' > '.join(map(str, s['chain']))} | {ts} |")
    return "\n".join(lines) + "\n"


def describe(label: str, b: dict[str, Any]) -> str:
    """One paragraph for a terminal."""
    hv, (above, ahead, span) = b["hypervolume"], against_mixing(b)
    return (f"{label}: hypervolume stitched {hv['stitched']:.3f}, mixing {hv['mixing']:.3f}, cascade "
            f"{hv['cascade']:.3f} (anchor chain cfg {' < '.join(map(str, b['anchors']))}, {b['images']} images, "
            f"{b['cascade_settings']} cascade settings); {above} stitches above the mixing line, {b['above_cascade']} "
            f"above the cascade's front; the stitched front is ahead of mixing on {ahead} and of the "
            f"cascade on {100 * b['ahead_of_cascade']:.0f} % of the budgets between the smallest and the largest "
            f"anchor{span}")


def jsonable(b: dict[str, Any]) -> dict[str, Any]:
    """`baselines`' result with infinities as null (JSON has none)."""
    fix = lambda t: None if math.isinf(t) else t
    return {**b, "cascade": [{**s, "thresholds": [fix(t) for t in s["thresholds"]]} for s in b["cascade"]]}


def draw(ax, b: dict[str, Any], scale: float, colour: str = "0.35", label: str = "") -> None:
    """Both baselines on a matplotlib axis, dashed: the mixing line, and the cascade's front as a staircase."""
    prefix = f"{label}: " if label else ""
    mx = [p["flops"] / scale for p in b["mixing"]]
    ax.plot(mx, [p["acc1"] for p in b["mixing"]], "--", c=colour, lw=1.0, label=f"{prefix}random anchor mixing")
    cx = [s["flops"] / scale for s in b["cascade"]] + [b["ref_cost"] / scale]  # flat up to the largest anchor
    ax.step(cx, [s["acc1"] for s in b["cascade"]] + [b["cascade"][-1]["acc1"]], "--", where="post",
            c="tab:purple" if not label else colour,
            lw=1.0, alpha=0.9, dashes=(2, 2), label=f"{prefix}confidence cascade")


def add_to_report(report, anchors: Sequence[Sequence[int]], unit: tuple[float, str]) -> None:
    """`snnet pareto --baselines`: each file's baselines into a `pareto.ParetoReport` (text, markdown, JSON; the
    plot draws them from the JSON); `anchors`: each file's anchor cfg_ids; `unit`: the table's FLOPs unit."""
    if report.cost != "flops":
        raise ResultsError(f"--baselines compares costs in FLOPs (a cascade's cost is the FLOPs it runs per image); "
                           f"drop --by {report.cost.split('_ms_')[0]} or --baselines")
    rows = []
    for (_label, path, _records, _), ids in zip(report.series, anchors):
        if not ids:  # as `snnet report --baselines`: refused in one line, before any file is written
            raise ResultsError(f"--baselines: {path!r} holds no anchor's record; the baselines mix and cascade "
                               f"the anchors: evaluate them too (train.py --eval evaluates every cfg_id) or drop "
                               f"--baselines")
    for (label, path, records, _), entry, ids in zip(report.series, report.data["files"], anchors):
        b = file_baselines(path, records, ids)
        rows.append((label, b))
        entry["baselines"] = jsonable(b)
    scale, unit_name = unit
    head = ("## baselines without training (random anchor mixing, confidence cascade; cost: FLOPs per image, "
            "averaged; hypervolume as above)")
    report.text += head + "\n\n" + summary_table(rows) + "\n" + "".join(describe(l, b) + "\n\n" for l, b in rows)
    report.markdown += "\n" + head + "\n\n" + summary_table(rows)
    for label, b in rows:
        report.markdown += f"\n### {label}: the cascade's front\n\n" + cascade_table(b, scale, unit_name)
