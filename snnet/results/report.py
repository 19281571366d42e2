"""`snnet report`: results files as one self-contained HTML page (inline SVG and JavaScript, nothing fetched).

The page shows every stitch of each file on a cost-accuracy scatter (a selector offers each cost every record of
every file holds: FLOPs, params, measured latencies; log or linear x, zoom and pan; labels only where they fit;
anchors above the stitches), each file's Pareto front (and, with several files, the combined front), the details of
a stitch on hover and click, a sortable table of every stitch (a row selects its point), a budget slider that marks
the best stitch of each file within the budget, the `snnet select` / `snnet export --cfg-id` lines of the chosen
stitch and its file, the route diagram of the selected stitch (one box per anchor segment and stitch, coloured by
anchor; routes of every tool, read by `snnet.results.pareto.parse_route`), and a stitch-train sweep's pictures
(sweep.png, curves.png beside its results file) embedded.

Nothing is decided in the browser: fronts come from `snnet.results.pareto.pareto_front`, and the slider's choice from
`snnet.results.select.select` itself. As the budget grows the choice only changes where the budget reaches another cost
value of the file, so `budget_steps` calls `select` once per distinct cost (the same call `snnet select --max-flops
B` makes) and the page looks up the largest step at or below the budget: the browser's choice is `snnet select`'s
by construction, and tests/test_report.py checks it in Chromium.

The page's template, styles and script are package data (snnet/results/assets/: report.html, report.css,
report.js), read with importlib.resources and inlined when the page is written: the page stays one file.
"""
from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Sequence
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from snnet.results.baselines import file_baselines, jsonable
from snnet.results.pareto import (
    anchor_name,
    cost_unit,
    eval_subtitle,
    is_anchor,
    latency_keys,
    pareto_front,
    parse_route,
    read_series,
    route_of,
)
from snnet.results.records import ResultsError, is_number
from snnet.results.select import select
from snnet.utils.fileio import write_text_atomic

# one colour per results file (matplotlib's tab10, in the order the PNG of `snnet pareto` uses) and per anchor
FILE_COLOURS = ["#1f77b4", "#d62728", "#9467bd", "#8c564b", "#17becf", "#bcbd22", "#e377c2", "#7f7f7f"]
ANCHOR_COLOURS = ["#f28e2b", "#59a14f", "#4e79a7", "#b07aa1", "#edc948", "#76b7b2", "#ff9da7", "#9c755f"]
SWEEP_IMAGES = (("sweep.png", "top-1 per cut and end block (snnet stitch-train)"),
                ("curves.png", "loss and top-1 against step, every run (trajectory.jsonl)"))
HIDDEN_KEYS = ("checkpoint_sha256", "config_sha256")  # provenance, not something to read on a chart

_SLOT = re.compile(r"%(TITLE|SUBTITLE|STYLE|SCRIPT|DATA)%")  # the placeholders of assets/report.html


@cache
def asset(name: str) -> str:
    """One file of the page (package data in snnet/results/assets/): 'report.html' (the template, placeholders
    %TITLE%, %SUBTITLE%, %STYLE%, %SCRIPT%, %DATA%), 'report.css' or 'report.js'."""
    path = resources.files("snnet.results") / "assets" / name
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ResultsError(f"snnet/results/assets/{name} is missing: this snnet was installed without its package "
                           f"data (pyproject.toml's [tool.setuptools.package-data]); reinstall it") from None


# ------------------------------------------------------------------------------------------------------ routes
def route_boxes(record: dict[str, Any], anchor_names: list[str], n_anchors: int) -> list[dict[str, Any]] | None:
    """The route diagram of one record: `parse_route`'s boxes, each anchor segment with its anchor's index (the
    colour). Files without routes (SN-Net's) still draw their anchors (cfg 0..n-1), not their stitches."""
    boxes = parse_route(record.get("route"))
    if boxes is None:
        if not is_anchor(record, n_anchors):
            return None
        return [{"kind": "anchor", "name": f"anchor {record['cfg_id']}", "first": "", "last": "",
                 "anchor": record["cfg_id"]}]
    for box in boxes:
        if box["kind"] == "anchor":
            if box["name"] not in anchor_names:  # a file holding only some anchors: still one colour per name
                anchor_names.append(box["name"])
            box["anchor"] = anchor_names.index(box["name"])
    return boxes


def sweep_images(path: str | Path) -> list[dict[str, str]]:
    """The pictures `snnet stitch-train` writes beside a sweep's results file (sweep.png: cut x end-block accuracy
    maps; curves.png: loss and top-1 against step per run), as data URIs: the page stays one file."""
    out = []
    for name, caption in SWEEP_IMAGES:
        png = Path(path).parent / name
        if png.is_file():
            out.append({"name": name, "caption": caption,
                        "src": "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")})
    return out


# ------------------------------------------------------------------------------------------------------ budgets
def budget_steps(records: Sequence[dict[str, Any]], cost: str, source: str) -> dict[str, list]:
    """`select`'s choice for every budget of one cost: at[i] is the i-th distinct cost value (ascending); a budget
    B with at[i] <= B < at[i+1] gets pick[i] (a cfg_id), fit[i] of the stitches being within it; below at[0] none
    fits. `select` is called with exactly the limit `snnet select --max-<cost> at[i]` passes."""
    at = sorted({r[cost] for r in records})
    picks = [select(records, {cost: value}, None, source) for value in at]
    return {"at": at, "pick": [rec["cfg_id"] for rec, _ in picks], "fit": [n for _, n in picks]}


def _select_flag(cost: str) -> str:
    """The `snnet select` options of a budget on this cost (shown on the page with each choice)."""
    if cost.startswith("latency_ms_b"):
        return f"--latency-batch {cost[len('latency_ms_b'):]} --max-latency-ms"
    return f"--max-{cost}"


def _cost_name(cost: str) -> str:
    return {"flops": "FLOPs", "params": "params"}.get(cost) or f"latency @ b{cost[len('latency_ms_b'):]} (ms)"


# ------------------------------------------------------------------------------------------------------ the page
def report_data(paths: Sequence[str | Path], cost: str = "flops", anchors: int | None = None, title: str = "",
                img_size: Any = None, baselines: bool = False) -> tuple[dict[str, Any], list[str]]:
    """Everything the page shows, as JSON-ready data, and notes for stderr (how anchors were found, which costs
    are not offered). `cost` is the axis shown first: refused, as by `snnet pareto --by`, when the records lack it;
    the page offers every other cost that every record holds. Every file is read and checked first. With
    `baselines`, each file's no-training baselines (snnet/results/baselines.py, from the predictions beside it) are
    drawn dashed on the FLOPs axis."""
    notes: list[str] = []
    series = read_series(paths, cost, anchors, notes)
    everything = [r for s in series for r in s.records]
    candidates = ["flops", "params", *latency_keys(everything)]
    offered = [c for c in candidates if all(is_number(r.get(c)) for r in everything)]
    for c in candidates:
        if c not in offered and any(is_number(r.get(c)) for r in everything):
            notes.append(f"note: {c!r} is not offered as an axis: not every stitch of every file has it")
    files = []
    for i, (label, path, records, n) in enumerate(series):
        names = [anchor_name(r) for r in records if is_anchor(r, n) and parse_route(r.get("route"))]  # cfg_id order
        rows = []
        for r in records:
            row = {k: v for k, v in r.items() if k not in HIDDEN_KEYS}
            row.update(route=route_of(r, n), anchor=is_anchor(r, n), boxes=route_boxes(r, names, n))
            if row["anchor"]:
                row["name"] = anchor_name(r)
            rows.append(row)
        files.append({"label": label, "path": path, "colour": FILE_COLOURS[i % len(FILE_COLOURS)], "anchors": n,
                      "anchor_names": names or [f"anchor {a}" for a in range(n)], "records": rows,
                      "images": sweep_images(path)})
        if baselines:
            b = jsonable(file_baselines(path, records, [r["cfg_id"] for r in records if is_anchor(r, n)]))
            files[-1]["baselines"] = {"mixing": b["mixing"], "cascade": [{"flops": s["flops"], "acc1": s["acc1"]}
                                                                          for s in b["cascade"]],
                                      "ref_cost": b["ref_cost"], "hypervolume": b["hypervolume"]}
    costs = []
    for c in offered:
        scale, unit = cost_unit(everything, c)
        values = [r[c] for r in everything]
        entry = {"key": c, "name": _cost_name(c), "unit": unit, "scale": scale, "flag": _select_flag(c),
                 "integer": all(float(v).is_integer() for v in values), "min": min(values), "max": max(values),
                 "fronts": [[r["cfg_id"] for r in pareto_front(s.records, c)] for s in series],
                 "steps": [budget_steps(s.records, c, s.path) for s in series]}
        if len(series) > 1:
            where = {id(r): (i, r["cfg_id"]) for i, s in enumerate(series) for r in s.records}
            entry["combined"] = [where[id(r)] for r in pareto_front(everything, c)]
        costs.append(entry)
    subtitle = eval_subtitle([(s.label, s.records) for s in series], img_size)
    data = {"title": title or f"SN-Net stitches: {', '.join(s.label for s in series)}", "subtitle": subtitle,
            "files": files, "costs": costs, "initial": offered.index(cost), "anchor_colours": ANCHOR_COLOURS}
    return data, notes


def render(data: dict[str, Any]) -> str:
    """The HTML page of `report_data`'s data: the template with the title, the data as inline JSON, the script and
    the styles inline (one pass: nothing inserted is searched for placeholders again)."""
    # inside <script>, '<', '>' and '&' as JSON escapes: no route or label can close the element
    payload = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c").replace(">", "\\u003e") \
        .replace("&", "\\u0026")
    values = {"TITLE": html.escape(data["title"]), "SUBTITLE": html.escape(data["subtitle"]),
              "STYLE": asset("report.css"), "SCRIPT": asset("report.js"), "DATA": payload}
    return _SLOT.sub(lambda m: values[m.group(1)], asset("report.html"))


def write_report(paths: Sequence[str | Path], out: str | Path, cost: str = "flops", anchors: int | None = None,
                 title: str = "", img_size: Any = None, baselines: bool = False) -> tuple[Path, list[str]]:
    """Write the page of some results files to `out` (atomically); returns the path and the notes for stderr.
    `img_size`: the subtitle's image size for records that do not carry one (files written before records had it)."""
    data, notes = report_data(paths, cost, anchors, title, img_size, baselines)
    write_text_atomic(out, render(data))
    return Path(out), notes
