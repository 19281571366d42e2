"""Pareto front of a results file: the stitches no other stitch beats on both cost and accuracy.

Reads this project's stitches_res.txt and SN-Net's own result files (any key order; spec 1.5 lists the keys each
family writes). Front definition (spec 7.6): sort by cost ascending, ties by accuracy descending, keep each stitch
whose top-1 is strictly above every cheaper one.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from .fileio import atomic_path, write_text_atomic


class ResultsFormatError(ValueError):
    pass


def read_results(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise ResultsFormatError(f"results file {str(path)!r} does not exist")
    records = {}
    lines = path.read_text().splitlines()
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            if n == len(lines):  # a torn last line (interrupted write) is skipped
                continue
            raise ResultsFormatError(f"{str(path)!r} line {n} is not JSON; is this a stitches_res.txt?") from None
        if not isinstance(rec, dict) or "cfg_id" not in rec or "acc1" not in rec:
            raise ResultsFormatError(f"{str(path)!r} line {n} has no cfg_id/acc1; is this a stitches_res.txt?")
        records[int(rec["cfg_id"])] = rec
    if not records:
        raise ResultsFormatError(f"results file {str(path)!r} is empty")
    return [records[k] for k in sorted(records)]


def is_anchor(rec: dict[str, Any], n_anchors: int | None = None) -> bool:
    if "route" in rec:
        return "->" not in rec["route"]
    return n_anchors is not None and rec["cfg_id"] < n_anchors


def pareto_front(records: Sequence[dict[str, Any]], cost: str = "flops") -> list[dict[str, Any]]:
    usable = [r for r in records if r.get(cost) is not None]
    ordered = sorted(usable, key=lambda r: (r[cost], -r["acc1"]))
    front, best = [], float("-inf")
    for r in ordered:
        if r["acc1"] > best:
            front.append(r)
            best = r["acc1"]
    return front


def flops_unit(records: Sequence[dict[str, Any]]) -> tuple[float, str]:
    """GFLOPs for ImageNet-sized networks, MFLOPs for small ones (so the table never shows 0.000)."""
    top = max((r.get("flops") or 0) for r in records)
    return (1e9, "GFLOPs") if top >= 1e9 else (1e6, "MFLOPs")


def markdown_table(records: Sequence[dict[str, Any]], cost: str = "flops", n_anchors: int | None = None) -> str:
    front = {r["cfg_id"] for r in pareto_front(records, cost)}
    scale, unit = flops_unit(records)
    _g = lambda x: f"{x / scale:.3f}"
    rows = [f"| cfg_id | route | {unit} | params (M) | top-1 | top-5 | Pareto |", "|---:|---|---:|---:|---:|---:|:---:|"]
    for r in sorted(records, key=lambda r: (r.get(cost) or 0, -r["acc1"])):
        route = r.get("route", "anchor" if is_anchor(r, n_anchors) else "")
        params = f"{r['params'] / 1e6:.3f}" if r.get("params") is not None else ""
        acc5 = f"{r['acc5']:.2f}" if r.get("acc5") is not None else ""
        flops = _g(r["flops"]) if r.get("flops") is not None else ""
        rows.append(f"| {r['cfg_id']} | {route} | {flops} | {params} | {r['acc1']:.2f} | {acc5} | "
                    f"{'**yes**' if r['cfg_id'] in front else ''} |")
    return "\n".join(rows) + "\n"


def plot(records: Sequence[dict[str, Any]], out_png: str | Path, title: str = "", cost: str = "flops",
         n_anchors: int | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale, unit = flops_unit(records) if cost == "flops" else (1e6, "M params") if cost == "params" else (1, cost)
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=150)
    stitched = [r for r in records if not is_anchor(r, n_anchors)]
    anchors = [r for r in records if is_anchor(r, n_anchors)]
    ax.scatter([r[cost] / scale for r in stitched], [r["acc1"] for r in stitched], s=18, c="tab:blue",
               alpha=0.7, label="stitches")
    front = pareto_front(records, cost)
    ax.plot([r[cost] / scale for r in front], [r["acc1"] for r in front], "-", c="tab:green", lw=1.2,
            label="Pareto front")
    ax.scatter([r[cost] / scale for r in anchors], [r["acc1"] for r in anchors], marker="*", s=180,
               c="tab:orange", edgecolors="k", zorder=3, label="anchors")
    for r in anchors:
        ax.annotate(f"anchor {r['cfg_id']}", (r[cost] / scale, r["acc1"]), textcoords="offset points",
                    xytext=(6, -10), fontsize=8)
    ax.set_xlabel(unit)
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title or "FLOPs vs. accuracy of every stitch")
    ax.grid(True, ls="--", alpha=0.4)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_report(results: str | Path, out_dir: str | Path, title: str = "", n_anchors: int | None = None) -> None:
    records = read_results(results)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "pareto.md", markdown_table(records, n_anchors=n_anchors))
    write_text_atomic(out_dir / "pareto.json", json.dumps([r["cfg_id"] for r in pareto_front(records)]) + "\n")
    plot(records, out_dir / "flops_vs_acc.png", title, n_anchors=n_anchors)
