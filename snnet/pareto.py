"""Pareto front of a results file: the stitches no other stitch beats on both cost and accuracy.

Reads this project's stitches_res.txt and SN-Net's own result files (any key order; spec 1.5 lists the keys each
family writes: params, acc5, loss and route may be missing). Front definition (spec 7.6): sort by cost ascending,
ties by accuracy descending, keep each stitch whose top-1 is strictly above every cheaper one.

Costs: ``flops`` and ``params`` as the evaluator wrote them, or a measured latency ``latency_ms_b<batch>`` that
`snnet latency` adds to the records.

Anchors: our records carry a ``route`` (an anchor's route has no ``->``). SN-Net's files do not; there the anchors
are cfg 0..N-1 (spec 1.2), and `infer_anchors` takes N as the length of the leading run of cfg_ids whose FLOPs
rise (SN-Net lists anchors small to large and the first stitch is cheaper than the largest anchor, which gives
3 / 3 / 2 / 2 / 2 for the DeiT, Swin, LeViT and both CNN files); callers pass ``n_anchors`` to override.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Sequence

from .fileio import atomic_path, write_text_atomic

RESULTS_FILE = "stitches_res.txt"
COSTS = ("flops", "params", "latency")


class ResultsFormatError(ValueError):
    pass


# ------------------------------------------------------------------------------------------------------ reading
def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """Records of a results file (one JSON object per line), sorted by cfg_id; a later line for a cfg_id wins."""
    path = Path(path)
    if path.is_dir() and (path / RESULTS_FILE).is_file():
        path = path / RESULTS_FILE  # an evaluation output folder
    if not path.is_file():
        raise ResultsFormatError(f"results file {str(path)!r} does not exist; pass a stitches_res.txt written by "
                                 f"train.py --eval (or SN-Net's evaluation)")
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise ResultsFormatError(f"{str(path)!r} is not a text file; pass a stitches_res.txt (one JSON object "
                                 f"per line)") from None
    records = {}
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            if n == len(lines) and records:  # a torn last line (interrupted write) is skipped
                continue
            raise ResultsFormatError(f"{str(path)!r} line {n} is not a JSON object; a stitches_res.txt has one "
                                     f"JSON object per line (a CSV or a JSON list is not one)") from None
        if not isinstance(rec, dict) or "cfg_id" not in rec or "acc1" not in rec:
            what = "a JSON list" if isinstance(rec, list) else "a record without cfg_id/acc1"
            raise ResultsFormatError(f"{str(path)!r} line {n} is {what}; a stitches_res.txt has one JSON object "
                                     f"with cfg_id and acc1 per line")
        cfg_id = rec["cfg_id"]
        if not _number(rec["acc1"]) or not _number(cfg_id) or cfg_id != int(cfg_id) or cfg_id < 0:
            raise ResultsFormatError(f"{str(path)!r} line {n}: cfg_id {cfg_id!r} / acc1 {rec['acc1']!r} must be "
                                     f"an integer >= 0 and a number; fix or regenerate the file")
        rec["cfg_id"] = int(cfg_id)
        records[rec["cfg_id"]] = rec
    if not records:
        raise ResultsFormatError(f"results file {str(path)!r} is empty; evaluate the SN-Net first "
                                 f"(train.py --eval --resume CKPT) or pass another file")
    return [records[k] for k in sorted(records)]


def cost_key(by: str, batch: int = 1) -> str:
    """Record key of a cost: ``flops``, ``params`` or ``latency`` (-> ``latency_ms_b<batch>``)."""
    if by == "latency":
        return f"latency_ms_b{batch}"
    if by not in COSTS:
        raise ResultsFormatError(f"unknown cost {by!r}; use one of {', '.join(COSTS)}")
    return by


def require_cost(records: Sequence[dict[str, Any]], cost: str, source: str, instead: str = "--by flops") -> None:
    """Refuse a cost no record has (e.g. params in SN-Net's LeViT/CNN files, latency before `snnet latency`)."""
    if any(_number(r.get(cost)) for r in records):
        return
    if cost.startswith("latency_ms_b"):
        fix = f"measure it first: snnet latency CKPT --stitch_config CFG --results {source}"
        have = latency_keys(records)
        if have:
            fix = f"this file has {', '.join(have)}; pass --latency-batch {have[0][len('latency_ms_b'):]}"
    else:
        fix = f"SN-Net's LeViT and CNN files record no params; use {instead}"
    raise ResultsFormatError(f"{source!r} has no {cost!r} for any stitch; {fix}")


def latency_keys(records: Sequence[dict[str, Any]]) -> list[str]:
    """The ``latency_ms_b<batch>`` keys the records hold, by batch size."""
    keys = {k for r in records for k in r if re.fullmatch(r"latency_ms_b\d+", k) and _number(r[k])}
    return sorted(keys, key=lambda k: int(k[len("latency_ms_b"):]))


def infer_anchors(records: Sequence[dict[str, Any]]) -> int:
    """Number of anchors: from the routes when the records have them, else the leading run of rising FLOPs."""
    if all("route" in r for r in records):
        return sum(1 for r in records if "->" not in r["route"])
    by_id = {r["cfg_id"]: r for r in records}
    cost = "flops" if all(_number(r.get("flops")) for r in records) else "params"
    n, last = 0, float("-inf")
    while n in by_id and _number(by_id[n].get(cost)) and by_id[n][cost] > last:
        last = by_id[n][cost]
        n += 1
    return max(n, 1)


def is_anchor(rec: dict[str, Any], n_anchors: int | None = None) -> bool:
    """Our records know from their route; SN-Net's are anchors when cfg_id < n_anchors."""
    if "route" in rec:
        return "->" not in rec["route"]
    return n_anchors is not None and rec["cfg_id"] < n_anchors


def route_of(rec: dict[str, Any], n_anchors: int | None = None) -> str:
    return rec.get("route") or (f"anchor {rec['cfg_id']}" if is_anchor(rec, n_anchors) else "stitch")


# ------------------------------------------------------------------------------------------------------ the front
def pareto_front(records: Sequence[dict[str, Any]], cost: str = "flops") -> list[dict[str, Any]]:
    usable = [r for r in records if r.get(cost) is not None]
    ordered = sorted(usable, key=lambda r: (r[cost], -r["acc1"]))
    front, best = [], float("-inf")
    for r in ordered:
        if r["acc1"] > best:
            front.append(r)
            best = r["acc1"]
    return front


# ------------------------------------------------------------------------------------------------------ formatting
def flops_unit(records: Sequence[dict[str, Any]]) -> tuple[float, str]:
    """GFLOPs for ImageNet-sized networks, MFLOPs for small ones (so the table never shows 0.000)."""
    top = max((r.get("flops") or 0) for r in records)
    return (1e9, "GFLOPs") if top >= 1e9 else (1e6, "MFLOPs")


def cost_unit(records: Sequence[dict[str, Any]], cost: str) -> tuple[float, str]:
    """Scale and axis label of a cost."""
    if cost == "flops":
        return flops_unit(records)
    if cost == "params":
        return 1e6, "params (M)"
    batch = cost[len("latency_ms_b"):]
    devices = sorted({str(r["latency_device"]) for r in records if r.get("latency_device")})
    return 1.0, f"latency (ms, batch {batch}" + (f", {devices[0]})" if len(devices) == 1 else ")")


def human(n: float) -> str:
    """2763712 -> '2.764M', 5e9 -> '5G': numbers as the K/M/G budgets of `snnet select` take them."""
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.4g}{suffix}"
    return f"{n:.4g}"


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


def front_table(records: Sequence[dict[str, Any]], cost: str = "flops", n_anchors: int | Sequence[int] | None = None,
                sources: Sequence[str] | None = None, all_rows: bool = False) -> str:
    """Markdown table of the Pareto front (or of every record, front marked, with ``all_rows``), cheapest first.

    Columns: cfg_id, route, FLOPs, params, top-1, top-5, and the latencies the records hold; ``sources`` (one label
    per record) adds a column saying which results file a row comes from (combined fronts); then `n_anchors` may be
    one count per record too.
    """
    front_ids = {id(r) for r in pareto_front(records, cost)}
    rows_in = [r for r in records if all_rows or id(r) in front_ids]
    rows_in.sort(key=lambda r: (r.get(cost) if r.get(cost) is not None else math.inf, -r["acc1"]))
    label = dict(zip((id(r) for r in records), sources)) if sources is not None else {}
    per = dict(zip((id(r) for r in records), n_anchors if isinstance(n_anchors, (list, tuple)) else
                   [n_anchors] * len(records)))
    fscale, funit = flops_unit(records)
    fmt = lambda v, f, scale=1.0: f.format(v / scale) if _number(v) else ""
    lat_keys = latency_keys(records)
    # (header, alignment, cell); optional columns no record fills (params, top-5 in SN-Net's files) are left out
    cols = [("source", "---", lambda r: label[id(r)])] if sources is not None else []
    cols += [("cfg_id", "---:", lambda r: str(r["cfg_id"])), ("route", "---", lambda r: route_of(r, per[id(r)]))]
    cols += [(h, "---:", lambda r, k=k, f=f, sc=sc: fmt(r.get(k), f, sc)) for h, k, f, sc in (
        (funit, "flops", "{:.3f}", fscale), ("params (M)", "params", "{:.3f}", 1e6)) if any(_number(r.get(k))
                                                                                      for r in records)]
    cols += [("top-1", "---:", lambda r: f"{r['acc1']:.2f}")]
    cols += [("top-5", "---:", lambda r: fmt(r.get("acc5"), "{:.2f}"))] if any(_number(r.get("acc5"))
                                                                              for r in records) else []
    cols += [(f"ms @ b{k[len('latency_ms_b'):]}", "---:", lambda r, k=k: fmt(r.get(k), "{:.3f}")) for k in lat_keys]
    cols += [("Pareto", ":---:", lambda r: "**yes**" if id(r) in front_ids else "")] if all_rows else []
    lines = ["| " + " | ".join(c[0] for c in cols) + " |", "|" + "|".join(c[1] for c in cols) + "|"]
    lines += ["| " + " | ".join(c[2](r) for c in cols) + " |" for r in rows_in]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------ plotting
def _draw(ax, records, cost: str, scale: float, n_anchors: int | None, colour: str, label: str = "") -> None:
    usable = [r for r in records if _number(r.get(cost))]
    stitched = [r for r in usable if not is_anchor(r, n_anchors)]
    anchors = [r for r in usable if is_anchor(r, n_anchors)]
    prefix = f"{label}: " if label else ""
    ax.scatter([r[cost] / scale for r in stitched], [r["acc1"] for r in stitched], s=18, c=colour,
               alpha=0.7, label=f"{prefix}stitches")
    front = pareto_front(usable, cost)
    ax.plot([r[cost] / scale for r in front], [r["acc1"] for r in front], "-", c="tab:green" if not label else colour,
            lw=1.2, label=f"{prefix}Pareto front")
    ax.scatter([r[cost] / scale for r in anchors], [r["acc1"] for r in anchors], marker="*", s=180,
               c="tab:orange" if not label else colour, edgecolors="k", zorder=3, label=f"{prefix}anchors")
    for r in anchors:
        ax.annotate(f"anchor {r['cfg_id']}", (r[cost] / scale, r["acc1"]), textcoords="offset points",
                    xytext=(6, -10), fontsize=8)


def _save(fig, out_png: str | Path) -> None:
    import matplotlib.pyplot as plt
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _axes():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(figsize=(6.4, 4.4), dpi=150)


def plot(records: Sequence[dict[str, Any]], out_png: str | Path, title: str = "", cost: str = "flops",
         n_anchors: int | None = None) -> None:
    scale, unit = flops_unit(records) if cost == "flops" else (1e6, "M params") if cost == "params" else (1, cost)
    fig, ax = _axes()
    _draw(ax, records, cost, scale, n_anchors, "tab:blue")
    ax.set_xlabel(unit)
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title or "FLOPs vs. accuracy of every stitch")
    ax.grid(True, ls="--", alpha=0.4)
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, out_png)


def plot_series(series: Sequence[tuple[str, Sequence[dict[str, Any]], int | None]], out_png: str | Path,
                cost: str = "flops", title: str = "") -> None:
    """One scatter + front per results file (label, records, n_anchors); with several files also the combined
    front across them (dashed black), i.e. which network of which SN-Net to deploy at each cost."""
    everything = [r for _, recs, _ in series for r in recs]
    scale, unit = cost_unit(everything, cost)
    fig, ax = _axes()
    colours = ["tab:blue", "tab:red", "tab:purple", "tab:brown", "tab:cyan", "tab:olive", "tab:pink", "tab:gray"]
    if len(series) == 1:
        _draw(ax, series[0][1], cost, scale, series[0][2], "tab:blue")
    else:
        for i, (label, recs, n) in enumerate(series):
            _draw(ax, recs, cost, scale, n, colours[i % len(colours)], label)
        front = pareto_front(everything, cost)
        ax.plot([r[cost] / scale for r in front], [r["acc1"] for r in front], "--", c="k", lw=1.0,
                label="combined front")
    ax.set_xlabel(unit)
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title or f"{unit.split(' (')[0]} vs. accuracy of every stitch")
    ax.grid(True, ls="--", alpha=0.4)
    ax.legend(loc="lower right", fontsize=7)
    _save(fig, out_png)


def write_report(results: str | Path, out_dir: str | Path, title: str = "", n_anchors: int | None = None) -> None:
    records = read_results(results)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "pareto.md", markdown_table(records, n_anchors=n_anchors))
    write_text_atomic(out_dir / "pareto.json", json.dumps([r["cfg_id"] for r in pareto_front(records)]) + "\n")
    plot(records, out_dir / "flops_vs_acc.png", title, n_anchors=n_anchors)
