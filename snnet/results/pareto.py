"""Pareto front of a results file: the stitches no other stitch beats on both cost and accuracy.

`pareto_report` + `save_report` are the one code path behind `snnet pareto` and the digits demo's table and plot.
Files are read by `snnet.results.records.read_results`: this project's stitches_res.txt and SN-Net's own result files
(any key order; docs/snnet_compat.md, C24 lists the keys each family writes: params, acc5, loss and route may be
missing). Front definition (docs/snnet_compat.md, C25): sort by cost ascending, ties by accuracy descending, keep
each stitch whose top-1 is strictly above every cheaper one.

Costs: ``flops`` and ``params`` as the evaluator wrote them, or a measured latency ``latency_ms_b<batch>`` that
`snnet latency` adds to the records.

Anchors: our records carry a ``route`` (an anchor's route has no ``->``). SN-Net's files do not; there the anchors
are cfg 0..N-1 (docs/snnet_compat.md, C1), and `infer_anchors` takes N as the length of the leading run of cfg_ids
whose FLOPs rise (SN-Net lists anchors small to large and the first stitch is cheaper than the largest anchor, which
gives 3 / 3 / 2 / 2 / 2 for the DeiT, Swin, LeViT and both CNN files); callers pass ``n_anchors`` to override.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from snnet.results.baselines import add_to_report, draw
from snnet.results.quality import front_quality, pareto_front, quality_table
from snnet.results.records import RESULTS_FILE, ResultsError, check_same_evaluation_set, is_number, read_results
from snnet.utils.fileio import save_figure, write_text_atomic

COSTS = ("flops", "params", "latency")


def cost_key(by: str, batch: int = 1) -> str:
    """Record key of a cost: ``flops``, ``params`` or ``latency`` (-> ``latency_ms_b<batch>``)."""
    if by == "latency":
        return f"latency_ms_b{batch}"
    if by not in COSTS:
        raise ResultsError(f"unknown cost {by!r}; use one of {', '.join(COSTS)}")
    return by


def require_cost(records: Sequence[dict[str, Any]], cost: str, source: str, instead: str = "--by flops") -> None:
    """Refuse a cost that records lack: none has it (e.g. params in SN-Net's LeViT/CNN files, latency before
    `snnet latency`), or only some have it. Ranking only the records that have it would silently leave the others
    out of the front, the table and the choice (possibly the best stitch, or an anchor), so that is refused too,
    naming the cfg_ids; a front or a budget needs every stitch's cost."""
    missing = [r["cfg_id"] for r in records if not is_number(r.get(cost))]
    if not missing:
        return
    if len(missing) < len(records):
        ids = ", ".join(str(c) for c in missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        if cost.startswith("latency_ms_b"):
            fix = (f"measure every stitch of the file: snnet latency CKPT --stitch_config CFG --batch "
                   f"{cost[len('latency_ms_b'):]} --results {source} (without --cfg-ids)")
        else:
            fix = "regenerate the file (train.py --eval --resume CKPT) or remove those lines"
        raise ResultsError(f"{source!r} has no {cost!r} for cfg_id {ids} ({len(missing)} of {len(records)} "
                           f"stitches): ranking the others would silently leave them out; {fix}")
    if cost.startswith("latency_ms_b"):
        fix = f"measure it first: snnet latency CKPT --stitch_config CFG --results {source}"
        have = latency_keys(records)
        if have:
            fix = f"this file has {', '.join(have)}; pass --latency-batch {have[0][len('latency_ms_b'):]}"
    elif cost == "params":
        fix = f"SN-Net's LeViT and CNN files record no params; use {instead}"
    else:
        fix = "regenerate the file (train.py --eval --resume CKPT)"
    raise ResultsError(f"{source!r} has no {cost!r} for any stitch; {fix}")


def latency_keys(records: Sequence[dict[str, Any]]) -> list[str]:
    """The ``latency_ms_b<batch>`` keys the records hold, by batch size."""
    keys = {k for r in records for k in r if re.fullmatch(r"latency_ms_b\d+", k) and is_number(r[k])}
    return sorted(keys, key=lambda k: int(k[len("latency_ms_b"):]))


# ------------------------------------------------------------------------------------------------------ routes
# The one route syntax of every results file, and its one reader. A route is an anchor's name alone (an anchor), or
# segments NAME[FIRST..LAST] joined by links: ' -(LAYER)-> ' (a stitching layer: SN-Net's address '0.1' from
# `stitching/plan.py` Route.describe, stitch-train's layer type 'linear' / 'lowrank rank4') or ' -> ' (a cut stitch of
# `snnet search`, `stitching/plan.py` Composition.describe). FIRST/LAST are blocks ('b3', 's1.b2' in hierarchical plans)
# or unit names ('blocks.5', 'layer3.1'); empty FIRST = from the input, empty LAST = to the head; a bare NAME in a
# stitched route leaves its part unsaid.
_LINK = re.compile(r"\s+(?:-\(([^()]+)\)->|->)\s+")
_SEGMENT = re.compile(r"(?P<name>[^\s\[\]]+)\[(?P<first>[^\[\]\s]*)\.\.(?P<last>[^\[\]\s]*)\]")


def parse_route(route: Any) -> list[dict[str, Any]] | None:
    """A results file's route as boxes, front first; None when it is not a route (SN-Net's files hold none).

    'deit_tiny#0[..b2] -(0.1)-> deit_tiny#1[b3..]' -> [{"kind": "anchor", "name": "deit_tiny#0", "first": "",
    "last": "b2"}, {"kind": "layer", "address": "0.1"}, {"kind": "anchor", "name": "deit_tiny#1", "first": "b3",
    "last": ""}]; a cut stitch (' -> ') is a layer box with address ''; an anchor's route is its name alone (one
    box, first = last = ''). `snnet report`, `snnet pareto` and `snnet select` read routes only through this."""
    if not isinstance(route, str):
        return None
    route = route.strip()
    if re.fullmatch(r"[^\s\[\]()]+", route) and "->" not in route:
        return [{"kind": "anchor", "name": route, "first": "", "last": ""}]
    parts = _LINK.split(route)  # segment, layer (None for ' -> '), segment, ..., segment
    if len(parts) < 3:
        return None
    boxes = []
    for i in range(0, len(parts), 2):
        if i:
            boxes.append({"kind": "layer", "address": (parts[i - 1] or "").strip()})
        m = _SEGMENT.fullmatch(parts[i])
        if m is not None:
            boxes.append({"kind": "anchor", **m.groupdict()})
        elif re.fullmatch(r"[\w.#:+/-]+", parts[i]):  # a bare model name: that anchor's part left unsaid
            boxes.append({"kind": "anchor", "name": parts[i], "first": "", "last": ""})
        else:
            return None
    return boxes


def route_anchor(rec: dict[str, Any]) -> str | None:
    """The anchor's name when the record's route is an anchor's own (a single box), else None."""
    boxes = parse_route(rec.get("route"))
    return boxes[0]["name"] if boxes is not None and len(boxes) == 1 else None


def has_routes(records: Sequence[dict[str, Any]]) -> bool:
    """Every record names a route the parser reads (ours); False for SN-Net's files."""
    return bool(records) and all(parse_route(r.get("route")) is not None for r in records)


def infer_anchors(records: Sequence[dict[str, Any]]) -> int:
    """Number of anchors: from the routes when the records have them, else the leading run of rising FLOPs."""
    if has_routes(records):
        return sum(1 for r in records if route_anchor(r) is not None)
    by_id = {r["cfg_id"]: r for r in records}
    cost = "flops" if all(is_number(r.get("flops")) for r in records) else "params"
    n, last = 0, float("-inf")
    while n in by_id and is_number(by_id[n].get(cost)) and by_id[n][cost] > last:
        last = by_id[n][cost]
        n += 1
    return max(n, 1)


def is_anchor(rec: dict[str, Any], n_anchors: int | None = None) -> bool:
    """Our records know from their route; SN-Net's are anchors when cfg_id < n_anchors."""
    if parse_route(rec.get("route")) is not None:
        return route_anchor(rec) is not None
    return n_anchors is not None and rec["cfg_id"] < n_anchors


def anchor_name(rec: dict[str, Any]) -> str:
    """An anchor's label on plots and tables: its name from the route, else 'anchor <cfg_id>' (SN-Net's files)."""
    return route_anchor(rec) or f"anchor {rec['cfg_id']}"


def route_of(rec: dict[str, Any], n_anchors: int | None = None) -> str:
    """A record's route as tables and messages print it; SN-Net's records (no route): 'anchor N' or 'stitch'."""
    if parse_route(rec.get("route")) is not None:
        return str(rec["route"]).strip()
    return rec.get("route") or (f"anchor {rec['cfg_id']}" if is_anchor(rec, n_anchors) else "stitch")


# ------------------------------------------------------------------------------------------------------ the front
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
    fmt = lambda v, f, scale=1.0: f.format(v / scale) if is_number(v) else ""

    def cell(key: str, form: str, scale: float = 1.0) -> Callable[[dict[str, Any]], str]:
        return lambda r: fmt(r.get(key), form, scale)
    lat_keys = latency_keys(records)
    # (header, alignment, cell); optional columns no record fills (params, top-5 in SN-Net's files) are left out
    cols: list[tuple[str, str, Callable[[dict[str, Any]], str]]] = \
        [("source", "---", lambda r: label[id(r)])] if sources is not None else []
    cols += [("cfg_id", "---:", lambda r: str(r["cfg_id"])), ("route", "---", lambda r: route_of(r, per[id(r)]))]
    cols += [(h, "---:", cell(k, f, sc)) for h, k, f, sc in (
        (funit, "flops", "{:.3f}", fscale), ("params (M)", "params", "{:.3f}", 1e6)) if any(is_number(r.get(k))
                                                                                      for r in records)]
    cols += [("top-1", "---:", lambda r: f"{r['acc1']:.2f}")]
    cols += [("top-5", "---:", lambda r: fmt(r.get("acc5"), "{:.2f}"))] if any(is_number(r.get("acc5"))
                                                                              for r in records) else []
    cols += [(f"ms @ b{k[len('latency_ms_b'):]}", "---:", cell(k, "{:.3f}")) for k in lat_keys]
    cols += [("Pareto", ":---:", lambda r: "**yes**" if id(r) in front_ids else "")] if all_rows else []
    lines = ["| " + " | ".join(c[0] for c in cols) + " |", "|" + "|".join(c[1] for c in cols) + "|"]
    lines += ["| " + " | ".join(c[2](r) for c in cols) + " |" for r in rows_in]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------ plotting
def _draw(ax, records, cost: str, scale: float, n_anchors: int | None, colour: str, label: str = "") -> None:
    usable = [r for r in records if is_number(r.get(cost))]
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
    for r in anchors if not label else []:  # several files: plot_series names their anchors together
        ax.annotate(anchor_name(r), (r[cost] / scale, r["acc1"]), textcoords="offset points", xytext=(6, -10),
                    fontsize=8)
    for r in front:  # the stitches worth deploying, by the cfg_id `snnet select` / `net(x, cfg_id)` take
        if not is_anchor(r, n_anchors):
            ax.annotate(str(r["cfg_id"]), (r[cost] / scale, r["acc1"]), textcoords="offset points", xytext=(-3, 5),
                        ha="right", fontsize=6.5, color="0.25" if not label else colour)


def _name_shared_anchors(ax, series, cost: str, scale: float, colours: Sequence[str]) -> None:
    """Several files' anchors, named '<anchor> (<file>)' in the file's colour. Files that share an anchor (the same
    checkpoints trained on in two SN-Nets) put it at nearly one spot: its names are stacked, the most accurate's
    above its star, the others below theirs, one line apart, instead of drawn over each other."""
    spots: dict[tuple[str, float], list[tuple[float, float, str, str]]] = {}
    for i, (label, recs, n) in enumerate(series):
        for r in recs:
            if is_number(r.get(cost)) and is_anchor(r, n):
                spots.setdefault((anchor_name(r), r[cost]), []).append(
                    (r[cost] / scale, r["acc1"], f"{anchor_name(r)} ({label})", colours[i % len(colours)]))
    for names in spots.values():
        for k, (x, y, text, colour) in enumerate(sorted(names, key=lambda t: -t[1])):
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(6, 5 if k == 0 else -1 - 10 * k),
                        fontsize=8, color=colour)


def _size_text(size: Any) -> str | None:
    """A record's ``img_size`` ([H, W] as the evaluator writes it, or one int) as '16x16'; None if unusable."""
    if is_number(size) and size == int(size) and size > 0:
        size = [size, size]
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(is_number(v) and v == int(v) and v > 0
                                                                for v in size):
        return f"{int(size[0])}x{int(size[1])}"
    return None


def eval_subtitle(series: Sequence[tuple[str, Sequence[dict[str, Any]]]], img_size: Any = None) -> str:
    """What the stitches were evaluated on, e.g. '16x16 images, 360 validation images', from the records' ``img_size``
    and ``samples`` (`img_size` stands in for records without one: files written before records carried it).
    A value the records of a file disagree on, or none holds (SN-Net's files), is left out; files that differ are
    named ('v1: ...; v2: ...'); '' when nothing is known."""
    texts = []
    for label, records in series:
        sizes = {_size_text(r.get("img_size", img_size)) for r in records}
        samples = {r.get("samples") if is_number(r.get("samples")) else None for r in records}
        parts = [f"{sizes.pop()} images"] if len(sizes) == 1 and None not in sizes else []
        known = [s for s in samples if s is not None]
        parts += [f"{int(known[0]):,} validation images"] if len(samples) == 1 and known else []
        texts.append((label, ", ".join(parts)))
    if len({t for _, t in texts}) == 1:
        return texts[0][1]
    return "; ".join(f"{label}: {t}" for label, t in texts if t)


def _axes():
    import matplotlib  # heavy (~0.5 s): only a plot needs it, not `snnet pareto` without --out
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(figsize=(6.4, 4.4), dpi=150)


def plot_series(series: Sequence[tuple[str, Sequence[dict[str, Any]], int | None]], out_png: str | Path,
                cost: str = "flops", title: str = "", img_size: Any = None,
                baselines: Sequence[dict[str, Any] | None] | None = None) -> None:
    """One scatter + front per results file (label, records, n_anchors); with several files also the combined
    front across them (dashed black), i.e. which network of which SN-Net to deploy at each cost. The front's stitches
    carry their cfg_ids; the subtitle says what they were evaluated on (`eval_subtitle`; `img_size` for records
    without one). `baselines` (one per series, or None): the no-training baselines of snnet/results/baselines.py,
    drawn dashed."""
    everything = [r for _, recs, _ in series for r in recs]
    scale, unit = cost_unit(everything, cost)
    fig, ax = _axes()
    colours = ["tab:blue", "tab:red", "tab:purple", "tab:brown", "tab:cyan", "tab:olive", "tab:pink", "tab:gray"]
    if baselines and any(b is not None for b in baselines):
        for i, b in enumerate(baselines):
            if b is not None:
                draw(ax, b, scale, *(("0.35", "") if len(series) == 1 else (colours[i % len(colours)],
                                                                              series[i][0])))
    if len(series) == 1:
        _draw(ax, series[0][1], cost, scale, series[0][2], "tab:blue")
    else:
        for i, (label, recs, n) in enumerate(series):
            _draw(ax, recs, cost, scale, n, colours[i % len(colours)], label)
        _name_shared_anchors(ax, series, cost, scale, colours)
        front = pareto_front(everything, cost)
        ax.plot([r[cost] / scale for r in front], [r["acc1"] for r in front], "--", c="k", lw=1.0,
                label="combined front")
    ax.set_xlabel(unit)
    ax.set_ylabel("top-1 (%)")
    subtitle = eval_subtitle([(label, recs) for label, recs, _ in series], img_size)
    ax.set_title(title or f"{unit.split(' (')[0]} vs. accuracy of every stitch", fontsize=10, pad=14 if subtitle else 6)
    if subtitle:
        ax.annotate(subtitle, (0.5, 1.0), xycoords="axes fraction", xytext=(0, 4), textcoords="offset points",
                    ha="center", va="bottom", fontsize=7, color="0.35")
    ax.grid(True, ls="--", alpha=0.4)
    ax.legend(loc="lower right", fontsize=7)
    save_figure(fig, out_png)


# ------------------------------------------------------------------------------------------------------ reports
def labels(paths: Sequence[str | Path]) -> list[str]:
    """Short unique names for results files: the stem, else the folder name, else folder/stem, else the path."""
    ps = [Path(p) for p in paths]
    generic = lambda p: p.parent.name if p.stem == Path(RESULTS_FILE).stem else p.stem  # .../demo/stitches_res.txt
    for name in (generic, lambda p: p.stem, lambda p: p.parent.name,
                 lambda p: f"{p.parent.name}/{p.stem}"):
        names = [name(p) for p in ps]
        if all(names) and len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


def _anchors(records: list[dict[str, Any]], given: int | None, path: str, notes: list[str]) -> int:
    """Anchor count of one file: from its routes when it has them, else `given`, else inferred (with a note)."""
    if has_routes(records):
        n = infer_anchors(records)
        if given is not None and given != n:
            notes.append(f"note: {path!r} names its routes; its {n} anchors are used, --anchors {given} applies to "
                         f"files without routes (SN-Net's)")
        return n
    if given is not None:
        return given
    n = infer_anchors(records)
    notes.append(f"note: {path!r} has no routes (an SN-Net file): cfg 0..{n - 1} are taken as the anchors (the "
                 f"leading cfg_ids of rising FLOPs); pass --anchors N if that is wrong")
    return n


class Series(NamedTuple):
    """One results file as the reports show it (a named tuple: equal to its plain (label, path, records, anchors))."""
    label: str                      # how tables and plots name it (the shortest distinguishing part of its path)
    path: str
    records: list[dict[str, Any]]
    anchors: int                    # cfg 0..anchors-1 are its anchors


def read_series(paths: Sequence[str | Path], cost: str, anchors: int | None, notes: list[str]) -> list[Series]:
    """Every file read and checked before anything is built: its `Series` (label, path, records, anchor count). Each
    file is one evaluation (`check_one_evaluation`), has the cost axis, and several files were evaluated on the same
    images (`check_same_evaluation_set`); `notes` gains what was inferred or is worth saying."""
    if anchors is not None and anchors < 1:
        raise ResultsError(f"--anchors {anchors} must be >= 1 (SN-Net's files hold 2 or 3 anchors)")
    series = []
    for path, label in zip(paths, labels(paths)):
        records = read_results(path)
        require_cost(records, cost, str(path))
        series.append(Series(label, str(path), records, _anchors(records, anchors, str(path), notes)))
    if len(series) > 1:
        notes += check_same_evaluation_set([(s.label, s.records) for s in series])
    return series


@dataclass
class ParetoReport:
    """What `snnet pareto` shows and writes for some results files (one cost axis)."""
    cost: str
    series: list[Series]                                      # per file: (label, path, records, anchors)
    notes: list[str] = field(default_factory=list)            # for stderr: how anchors were found
    text: str = ""                                            # the fronts only (stdout)
    markdown: str = ""                                        # every stitch, the front marked
    data: dict[str, Any] = field(default_factory=dict)        # the JSON report


def _section(report: ParetoReport, heading: str, records, n_anchors, sources=None) -> None:
    report.text += heading + "\n\n" + front_table(records, report.cost, n_anchors, sources) + "\n"
    report.markdown += "\n" + heading + "\n\n" + front_table(records, report.cost, n_anchors, sources,
                                                             all_rows=sources is None)


def pareto_report(paths: Sequence[str | Path], cost: str = "flops", anchors: int | None = None,
                  before: str | Path | None = None, baselines: bool = False) -> ParetoReport:
    """Pareto front of each results file and, with several, the combined front (which network of which SN-Net
    to deploy at each cost), and each file's front quality (snnet/results/quality.py; the anchor drift against the
    `before` file's anchors); with `baselines`, each file's no-training baselines (random anchor mixing, a
    confidence cascade: snnet/results/baselines.py) from the predictions file beside it. Every file is read and
    checked before anything is built."""
    report = ParetoReport(cost, [])
    report.series = read_series(paths, cost, anchors, report.notes)
    report.markdown = f"# Pareto front by {cost}\n"
    report.data = {"by": cost, "files": []}
    for label, path, records, n in report.series:
        front = pareto_front(records, cost)
        _section(report, f"## {label}: {len(front)} of {len(records)} stitches on the {cost} Pareto front "
                         f"(anchors: cfg {', '.join(str(r['cfg_id']) for r in records if is_anchor(r, n))}; {path})",
                 records, n)
        report.data["files"].append({"label": label, "path": path, "anchors": n, "records": len(records),
                                     "front": [r["cfg_id"] for r in front], "front_records": front})
    _quality(report, read_results(before) if before is not None else None)
    if baselines:
        add_to_report(report, [[r["cfg_id"] for r in s.records if is_anchor(r, s.anchors)] for s in report.series],
                      flops_unit([r for s in report.series for r in s.records]))
    if len(report.series) > 1:
        everything = [r for s in report.series for r in s.records]
        sources = [s.label for s in report.series for _ in s.records]
        source_of = {id(r): src for r, src in zip(everything, sources)}
        front = pareto_front(everything, cost)
        _section(report, f"## combined: {len(front)} of {len(everything)} stitches of {len(report.series)} files "
                         f"on the front", everything, [s.anchors for s in report.series for _ in s.records], sources)
        report.data["combined_front"] = [{"source": source_of[id(r)], **r} for r in front]
    return report


def _quality(report: ParetoReport, before: list[dict[str, Any]] | None) -> None:
    """Front quality per file (FLOPs fronts only: the metrics normalise FLOPs by the largest anchor's)."""
    if not all(is_number(r.get("flops")) for s in report.series for r in s.records):
        if before is not None:
            raise ResultsError("--before needs FLOPs in every file (the front quality is measured on FLOPs)")
        return
    rows = []
    for label, path, records, n in report.series:
        anchors = [r["cfg_id"] for r in records if is_anchor(r, n)]
        if not anchors:  # the front is still shown; its quality is measured against the anchors
            report.notes.append(f"note: {path!r} holds no anchor's record: its front quality is left out")
            continue
        rows.append((label, front_quality(records, anchors, before)))
    if not rows:
        return
    table = quality_table(rows)
    report.text += "## front quality (hypervolume: reference point FLOPs 1.1 x the largest anchor's, top-1 0)\n\n" + \
        table + "\n"
    report.markdown += "\n## front quality\n\n" + table
    by_label = dict(rows)
    for (label, *_), entry in zip(report.series, report.data["files"]):
        if label in by_label:
            entry["quality"] = by_label[label]


def save_report(report: ParetoReport, out_dir: str | Path, title: str = "", img_size: Any = None) -> list[Path]:
    """Write pareto_<cost>.md, .json and .png into `out_dir`; returns their paths. `img_size`: the plot subtitle's
    image size for records that do not carry one."""
    out = Path(out_dir)
    files = [out / f"pareto_{report.cost}.{ext}" for ext in ("md", "json", "png")]
    plot_series([(s.label, s.records, s.anchors) for s in report.series], files[2], report.cost, title, img_size,
                [f.get("baselines") for f in report.data["files"]])
    write_text_atomic(files[0], report.markdown)
    write_text_atomic(files[1], json.dumps(report.data, indent=1) + "\n")
    return files
