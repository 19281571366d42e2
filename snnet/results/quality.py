"""How good a whole FLOPs-accuracy front is: one number per results file, so that recipes can be compared.

Conventions (also in docs/front_quality.md):

* **Cost axis.** A stitch's cost is its FLOPs divided by the FLOPs of the file's largest anchor (``ref_cost``), so
  fronts of different image sizes or anchor families land on the same axis; accuracy is top-1 in percent.
* **Hypervolume** (``hypervolume``): the area dominated by the front inside the box from the reference point
  (normalised cost ``REF_COST`` = 1.1, top-1 0) — i.e. the integral over budgets b in [0, 1.1] of the best top-1
  with cost <= b (a staircase; the same rule as `snnet select`). The 1.1 lets the largest anchor count over the
  last tenth. Units: top-1 points x normalised FLOPs; divided by 1.1 it is the mean best top-1 over budgets.
* **Area under the front** (``area``): the mean top-1 of the piecewise-linear front between the cheapest and the
  largest anchor's cost (trapezoids over the front points, clipped to that range): how good a deployment at a
  budget between the anchors is when one interpolates between neighbouring front networks. Top-1 points.
* **Mean gap** (``mean_gap``): the mean over every stitch of (the best top-1 at or below its cost) minus its own
  top-1: zero when every stitch is on the front; how much of the trained family is wasted. Top-1 points.
* **Anchor drift** (``anchor_drift``): each anchor's top-1 in this file minus its top-1 before SN-Net training
  (another results file, e.g. `train.py --eval` of the untrained SN-Net, whose anchors are the pretrained ones);
  negative when stitching training costs the anchors accuracy (SN-Net: -1.6 on DeiT-Ti). The mean over anchors is
  ``anchor_drift``; ``drift_per_anchor`` lists them by cfg_id.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from snnet.results.records import ResultsError, is_number

REF_COST = 1.1


def _points(records: Sequence[dict[str, Any]], ref_cost: float) -> list[tuple[float, float]]:
    return sorted(((r["flops"] / ref_cost, float(r["acc1"])) for r in records), key=lambda p: (p[0], -p[1]))


def pareto_front(records: Sequence[dict[str, Any]], cost: str = "flops") -> list[dict[str, Any]]:
    """The records no other record beats: cheapest first (by `cost`), each strictly more accurate (acc1) than every
    cheaper one; records without the cost are left out. Stitches, cascade settings, any (cost, acc1) dicts."""
    usable = [r for r in records if r.get(cost) is not None]
    front, best = [], float("-inf")
    for r in sorted(usable, key=lambda r: (r[cost], -r["acc1"])):
        if r["acc1"] > best:
            front.append(r)
            best = r["acc1"]
    return front


def _staircase(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The front of (cost, top-1) points: `pareto_front`'s rule (one rule for records and points)."""
    return [(r["cost"], r["acc1"]) for r in pareto_front([{"cost": x, "acc1": y} for x, y in points], cost="cost")]


def hypervolume(points: Sequence[tuple[float, float]], ref: tuple[float, float] = (REF_COST, 0.0)) -> float:
    """Area dominated by the (cost, top-1) points inside the box [0, ref cost] x [ref top-1, inf)."""
    front = [(x, y) for x, y in _staircase(points) if x < ref[0] and y > ref[1]]
    area = 0.0
    for i, (x, y) in enumerate(front):
        right = front[i + 1][0] if i + 1 < len(front) else ref[0]
        area += (right - x) * (y - ref[1])
    return area


def hypervolume_line(vertices: Sequence[tuple[float, float]], ref: tuple[float, float] = (REF_COST, 0.0)) -> float:
    """`hypervolume` of a continuous front: a piecewise-linear curve through `vertices` (cost ascending, top-1
    rising), flat after its last vertex, nothing below its first. The integral over budgets in [0, ref cost] of the
    curve's top-1 above the reference, exactly (trapezoids): the staircase of infinitely many points on the curve,
    e.g. the random mixtures of two anchors (snnet/results/baselines.py)."""
    pts = [(x, y) for x, y in sorted(vertices) if x < ref[0]]
    if not pts:
        return 0.0
    knots = pts + [(ref[0], pts[-1][1] if len(pts) == len(vertices) else
                    line_at(sorted(vertices), ref[0]))]
    return sum((x1 - x0) * (max(y0, ref[1]) + max(y1, ref[1]) - 2 * ref[1]) / 2
               for (x0, y0), (x1, y1) in zip(knots, knots[1:]))


def line_at(vertices: Sequence[tuple[float, float]], cost: float) -> float:
    """The piecewise-linear curve through `vertices` (cost ascending) at `cost`: flat after its last vertex, -inf
    below its first (e.g. the best random mixture of anchors at an expected cost: snnet/results/baselines.py)."""
    if cost < vertices[0][0]:
        return -math.inf
    for (x0, y0), (x1, y1) in zip(vertices, vertices[1:]):
        if cost <= x1:
            return y1 if x1 == x0 else y0 + (y1 - y0) * (cost - x0) / (x1 - x0)
    return vertices[-1][1]


def area_under_front(points: Sequence[tuple[float, float]], lo: float, hi: float) -> float:
    """Mean top-1 of the piecewise-linear front over costs [lo, hi] (0 below its cheapest point's cost)."""
    front = _staircase(points)
    if not front or hi <= lo:
        return front[-1][1] if front else 0.0

    def at(c: float) -> float:  # the linear front at cost c >= its cheapest point's
        for (x0, y0), (x1, y1) in zip(front, front[1:]):
            if c <= x1:
                return y0 + (y1 - y0) * (c - x0) / (x1 - x0)
        return front[-1][1]

    start = max(lo, front[0][0])  # below the cheapest point nothing is affordable: top-1 0
    knots = sorted({start, hi, *(x for x, _ in front if start < x < hi)}) if start < hi else []
    total = sum((b - a) * (at(a) + at(b)) / 2 for a, b in zip(knots, knots[1:]))
    return total / (hi - lo)


def mean_gap(points: Sequence[tuple[float, float]]) -> float:
    ordered = sorted(points, key=lambda p: (p[0], -p[1]))
    gaps, best = [], float("-inf")
    for _x, y in ordered:
        best = max(best, y)
        gaps.append(best - y)
    return sum(gaps) / len(gaps) if gaps else 0.0


def front_quality(records: Sequence[dict[str, Any]], anchors: Sequence[int],
                  before: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The metrics above for one results file; `anchors` are its anchors' cfg_ids, `before` the records (or just
    the anchors' records) from before SN-Net training, for the drift."""
    missing = [r["cfg_id"] for r in records if not is_number(r.get("flops"))]
    if missing:
        raise ResultsError(f"front quality needs every stitch's FLOPs; cfg_id {missing[:10]} have none")
    by_id = {r["cfg_id"]: r for r in records}
    if not any(a in by_id for a in anchors):  # the metrics normalise by the largest anchor's FLOPs
        raise ResultsError("front quality needs the anchors' records (the FLOPs are normalised by the largest "
                           "anchor's); this file holds none: evaluate the anchors too (train.py --eval evaluates "
                           "every cfg_id)")
    anchors = [a for a in anchors if a in by_id]
    ref_cost = max(by_id[a]["flops"] for a in anchors)
    points = _points(records, ref_cost)
    lo = min(by_id[a]["flops"] for a in anchors) / ref_cost
    out: dict[str, Any] = {"ref_cost": ref_cost, "stitches": len(records), "front": len(_staircase(points)),
                           "hypervolume": hypervolume(points), "area": area_under_front(points, lo, 1.0),
                           "mean_gap": mean_gap(points)}
    if before is not None:
        old = {r["cfg_id"]: r for r in before}
        lost = [a for a in anchors if a not in old]
        if lost:
            raise ResultsError(f"the before-training file has no line for anchor cfg_id {lost}; evaluate the "
                               f"untrained SN-Net (train.py --eval) to get one")
        for a in anchors:  # the same anchor before and after: its route and its cost, where both files record them
            for key in ("route", "flops", "params", "img_size"):
                now, then = by_id[a].get(key), old[a].get(key)
                if now is not None and then is not None and now != then:
                    raise ResultsError(f"the before-training file's anchor cfg_id {a} is another network ({key} "
                                       f"{then!r} there, {now!r} here): drift would compare unrelated numbers; pass "
                                       f"the evaluation of this SN-Net before training")
        drift = {a: float(by_id[a]["acc1"]) - float(old[a]["acc1"]) for a in anchors}
        out["drift_per_anchor"] = drift
        out["anchor_drift"] = sum(drift.values()) / len(drift)
    return out


def in_anchor_range(records: Sequence[dict[str, Any]], anchors: Sequence[int], margin: float = 3.0
                    ) -> tuple[int, int]:
    """(stitches whose top-1 lies within the anchors' top-1 range widened by `margin` points, stitches): the demo's
    test of a working SN-Net (a stitch between two anchors should not fall far below the smaller one)."""
    top1 = [float(r["acc1"]) for r in records if r["cfg_id"] in set(anchors)]
    lo, hi = min(top1) - margin, max(top1) + margin
    stitches = [float(r["acc1"]) for r in records if r["cfg_id"] not in set(anchors)]
    return sum(1 for a in stitches if lo <= a <= hi), len(stitches)


def quality_table(rows: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """Markdown table: one row per (label, front_quality result)."""
    drift = any("anchor_drift" in q for _, q in rows)
    head = "| file | stitches | on front | hypervolume | area (top-1) | mean gap | " + \
        ("anchor drift | per anchor |" if drift else "")
    lines = [head, "|---|---:|---:|---:|---:|---:|" + ("---:|---|" if drift else "")]
    for label, q in rows:
        cells = [label, str(q["stitches"]), str(q["front"]), f"{q['hypervolume']:.3f}", f"{q['area']:.3f}",
                 f"{q['mean_gap']:.3f}"]
        if drift:
            cells += [f"{q['anchor_drift']:+.3f}" if "anchor_drift" in q else "",
                      ", ".join(f"{c}: {d:+.2f}" for c, d in q.get("drift_per_anchor", {}).items())]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
