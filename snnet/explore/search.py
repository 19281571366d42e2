"""Training-free composition search (`snnet search`): StitchNet's search over paths through several anchors, on this
library's units, least-squares stitches, one-pass evaluator and cost model.

A network is a `Composition` (snnet/stitching/plan.py): segments of anchors (any families) joined by stitches at unit
granularity. An edge (front anchor a, its unit i, end anchor b, its unit j) maps a's output of unit i onto b's
output of unit j, and b continues at unit j + 1; its score comes from the compatibility maps
(snnet/explore/similarity.py)
computed on the calibration images, and its stitch is the least-squares `CutStitch` fitted on those images.

StitchNet's options (its `generate(threshold=0.9, totalThreshold=0.5, maxDepth=10, K=None)`), with the same meaning:

* ``threshold``: an edge qualifies only if its score is strictly above it;
* ``total_threshold``: a path's score is the product of its edges' scores; a path below it is dropped;
* ``max_depth``: at most this many segments (StitchNet's fragments) per network; at the limit only finishing
  (running the current anchor to its head) is allowed;
* ``beam_width``: StitchNet searched depth first and kept the top K candidates per step (K=None: all); here the
  search goes level by level (level d: paths of d segments) and keeps the `beam_width` best partial paths by score
  (0: all, StitchNet's K=None; exponential).

As in StitchNet, no unit runs twice in one network (a path may jump back to an earlier unit of another anchor, so
networks can be deeper than any anchor), and a stitch never joins an anchor to itself (continuing in the same anchor
is the identity). Every partial path that can finish becomes a network (with at least one stitch; the anchors
themselves are evaluated too, as cfg_ids 0..n-1). Scores (all in [0, 1], higher is better): ``cka`` (StitchNet's,
clipped at 0), ``ls`` (1 - residual², the share of the end features' squared norm the least-squares stitch
explains) or ``kl`` (exp(-KL)).
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import torch
from safetensors.torch import save_file

from snnet.data.loaders import create_eval_loader
from snnet.data.options import DataOptions, LoaderOptions
from snnet.explore.similarity import SimilarityOptions, anchor_records, calibration_batches, prepare, write_maps
from snnet.results.pareto import human, pareto_report, save_report
from snnet.results.records import RESULTS_FILE, stitch_record, write_results
from snnet.stitching.cost import cost_table
from snnet.stitching.maps import CompatibilityMaps, SimilarityError, compatibility_maps
from snnet.stitching.model import ComposedNet
from snnet.stitching.plan import Composition, Edge, Segment
from snnet.train.evaluator import evaluate_stitches
from snnet.utils.fileio import atomic_path, write_text_atomic

SEARCH_SCORES = ("cka", "ls", "kl")


@dataclass(frozen=True)
class SearchOptions:
    threshold: float = 0.9        # StitchNet's threshold
    total_threshold: float = 0.5  # StitchNet's totalThreshold
    max_depth: int = 10           # StitchNet's maxDepth (segments)
    beam_width: int = 16          # partial paths kept per level (0: all)
    score: str = "cka"

    def check(self) -> None:
        if self.score not in SEARCH_SCORES:
            raise SimilarityError(f"--score {self.score!r} is not known; use one of {', '.join(SEARCH_SCORES)}")
        if self.max_depth < 2:
            raise SimilarityError(f"--max-depth {self.max_depth} leaves no room for a stitch; use 2 or more "
                                  f"(StitchNet's default: 10)")
        if self.beam_width < 0:
            raise SimilarityError(f"--beam-width {self.beam_width} must be >= 0 (0: keep every path)")


def edge_score(maps: CompatibilityMaps, kind: str, edge: Edge) -> float | None:
    """The search score of one edge in [0, 1]; None where no stitch exists (or its map has no value there)."""
    value = maps.value({"cka": "cka", "ls": "ls_residual", "kl": "kl"}[kind], edge) if edge in maps.stitches else None
    if value is None:
        return None
    if kind == "cka":
        return min(max(value, 0.0), 1.0)
    if kind == "ls":
        return max(0.0, 1.0 - value * value)
    return math.exp(-value)


@dataclass(frozen=True)
class _Partial:
    closed: tuple[Segment, ...]   # finished segments
    anchor: int                   # the open segment's anchor and first unit
    first: int
    score: float
    used: frozenset               # (anchor, unit) already run


def beam_search(maps: CompatibilityMaps, options: SearchOptions) -> list[tuple[Composition, float]]:
    """Networks found, best score first (ties: fewer segments, then the segments in order)."""
    options.check()
    counts = [len(c) for c in maps.cuts]
    n = len(counts)
    frontier = [_Partial((), a, 0, 1.0, frozenset()) for a in range(n)]
    found: dict[Composition, float] = {}
    for depth in range(1, options.max_depth + 1):  # paths whose open segment is their depth-th
        grown: list[_Partial] = []
        for p in frontier:
            b, first, last = p.anchor, p.first, counts[p.anchor] - 1
            if p.closed and all((b, u) not in p.used for u in range(first, last + 1)):
                found.setdefault(Composition(p.closed + (Segment(b, first, last),)), p.score)
            if depth == options.max_depth:
                continue
            for i in range(first, last):  # cut after unit i; the head (last) is never cut
                if (b, i) in p.used:
                    break
                ran = frozenset((b, u) for u in range(first, i + 1))
                for c in range(n):
                    if c == b:
                        continue
                    for k in range(counts[c] - 1):  # enter c with its unit-k features, continue at k + 1
                        if (c, k + 1) in p.used:
                            continue
                        s = edge_score(maps, options.score, (b, i, c, k))
                        if s is None or not s > options.threshold:
                            continue
                        total = p.score * s
                        if total < options.total_threshold:
                            continue
                        grown.append(_Partial(p.closed + (Segment(b, first, i),), c, k + 1, total, p.used | ran))
        grown.sort(key=lambda q: (-q.score, len(q.closed), _order(q.closed), q.anchor, q.first))
        frontier = grown[:options.beam_width] if options.beam_width else grown
        if not frontier:
            break
    return sorted(found.items(), key=lambda kv: (-kv[1], len(kv[0].segments), _order(kv[0].segments)))


def _order(segments: Sequence[Segment]) -> tuple:
    return tuple((s.anchor, s.first, s.last) for s in segments)


# ---------------------------------------------------------------------------------------------------- networks
def compose(anchors: ComposedNet, maps: CompatibilityMaps, found: Sequence[Composition]) -> ComposedNet:
    """The anchors (cfg_ids 0..n-1) and the found networks as one routed network, sharing the anchors' modules and
    the fitted stitches (an edge used by several networks is one module) and the anchors' input groups (each
    network reads its front anchor's preprocessing)."""
    comps = list(anchors.compositions) + list(found)
    edges = {e for c in found for e in c.edges}
    return ComposedNet(list(anchors.anchors), comps, {e: maps.stitches[e] for e in edges}, anchors.names,
                       anchors.adapters, anchors.input_groups).eval()


@torch.no_grad()
def network_flops(net: ComposedNet, img_size: int | tuple[int, int] | list[tuple[int, int]],
                  in_chans: int = 3) -> list[int]:
    """FLOPs of every route (SN-Net's fvcore convention), from the cost model: each unit priced at its anchor's input
    size (`img_size`: one size, or each anchor's own), each stitch on its front unit's output there."""
    table = cost_table(net, img_size, in_chans)
    return [table.route_flops(steps) for steps in net.routes]


# ---------------------------------------------------------------------------------------------------- drawing
PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
           "#bab0ac")


def network_svg(net: ComposedNet, cfg_id: int, record: dict[str, Any], maps: CompatibilityMaps | None = None,
                score: str = "cka") -> str:
    """One network drawn left to right: a box per segment coloured by anchor (name, units, unit count), a white
    dashed box per stitch (channels, layouts, least-squares residual, the edge's score), a title with the record's
    top-1, FLOPs and params, and a legend of the anchors."""
    comp = net.compositions[cfg_id]
    seg_w, st_w, gap, box_h, top = 190, 130, 26, 70, 56
    items: list[Segment | Edge] = []  # left to right: segment, its stitch (an edge), the next segment, ...
    for s, edge in zip(comp.segments, comp.edges + (None,)):
        items.append(s)
        if edge is not None:
            items.append(edge)
    title = f"cfg {cfg_id}: {net.describe(cfg_id)}"
    stats = f"top-1 {record['acc1']:.2f}%   {human(record['flops'])} FLOPs   {human(record['params'])} params"
    if record.get("score") is not None:
        stats += f"   path score ({score}) {record['score']:.4f}"
    width = max(sum(seg_w if isinstance(what, Segment) else st_w for what in items) + gap * (len(items) - 1) + 40,
                int(len(title) * 7.5) + 40)  # about 7.5 px per character of the 13 px bold title
    legend_y = top + box_h + 40
    height = legend_y + 22 * net.n_anchors + 10
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif">',
           '<defs><marker id="arrow" markerWidth="8" markerHeight="8" refX="7" refY="4" orient="auto">'
           '<path d="M0,0 L8,4 L0,8 z" fill="#444"/></marker></defs>']
    out.append(f'<text x="20" y="22" font-size="13" font-weight="bold">{escape(title)}</text>')
    out.append(f'<text x="20" y="42" font-size="12">{escape(stats)}</text>')
    x = 20
    for n, what in enumerate(items):
        w = seg_w if isinstance(what, Segment) else st_w
        if isinstance(what, Segment):
            units = net.units[what.anchor]
            colour = PALETTE[what.anchor % len(PALETTE)]
            lines = [net.names[what.anchor], f"{units[what.first].name} .. {units[what.last].name}",
                     f"{what.last - what.first + 1} unit(s)"]
            out.append(f'<rect class="segment" x="{x}" y="{top}" width="{w}" height="{box_h}" rx="6" '
                       f'fill="{colour}" fill-opacity="0.85" stroke="#333"/>')
            colour_text = "#fff"
        else:
            a, i, b, j = what
            stitch = net.stitches[net.edges.index(what)]
            lines = ["LS stitch", f"{stitch.front.channels} -> {stitch.end.channels} ch",
                     f"{stitch.front.layout} -> {stitch.end.layout}"]
            if maps is not None:
                res = maps.value("ls_residual", what)
                scored = edge_score(maps, score, what)
                lines[0] = f"LS stitch ({score} {scored:.2f})" if scored is not None else lines[0]
                if res is not None:
                    lines.append(f"residual {res:.3f}")
            out.append(f'<rect class="stitch" x="{x}" y="{top + 6}" width="{w}" height="{box_h - 12}" rx="4" '
                       f'fill="#fff" stroke="#333" stroke-dasharray="4,3"/>')
            colour_text = "#222"
        y0 = top + box_h / 2 - 7 * (len(lines) - 1) + 4
        for k, line in enumerate(lines):
            weight = ' font-weight="bold"' if k == 0 else ""
            out.append(f'<text x="{x + w / 2}" y="{y0 + 14 * k:.1f}" font-size="11" text-anchor="middle" '
                       f'fill="{colour_text}"{weight}>{escape(line)}</text>')
        if n < len(items) - 1:
            out.append(f'<line x1="{x + w}" y1="{top + box_h / 2}" x2="{x + w + gap - 2}" y2="{top + box_h / 2}" '
                       f'stroke="#444" stroke-width="1.5" marker-end="url(#arrow)"/>')
        x += w + gap
    for a, name in enumerate(net.names):
        y = legend_y + 22 * a
        out.append(f'<rect x="20" y="{y - 11}" width="14" height="14" fill="{PALETTE[a % len(PALETTE)]}" '
                   f'stroke="#333"/>')
        out.append(f'<text x="40" y="{y}" font-size="11">anchor {a}: {escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------------- the command
def run_search(options: SimilarityOptions, search: SearchOptions, data: DataOptions, loader: LoaderOptions,
               device: str | None = None, max_networks: int = 0) -> list[Path]:
    """`snnet search`: maps on the calibration images, beam search, every network (and the anchors) evaluated in one
    pass on the validation split, results file, Pareto table, drawings. `max_networks`: evaluate at most the N
    best-scored networks (0: all)."""
    search.check()
    run = prepare(options, data, loader, device, True, "the search", need_val=True)
    out, net = run.out, run.net
    t0 = time.perf_counter()
    # each anchor reads its own preprocessing of the same images (the maps), each network its front anchor's (the
    # evaluation): no number depends on the order the anchors are listed in
    images = calibration_batches(run.train, run.input_cfgs, options.batches, loader.batch_size, options.seed)
    maps = compatibility_maps(net, images, kl=search.score == "kl")
    t_maps = time.perf_counter() - t0
    t0 = time.perf_counter()
    found = beam_search(maps, search)
    if max_networks and len(found) > max_networks:
        found = found[:max_networks]
    t_search = time.perf_counter() - t0
    composed = compose(net, maps, [c for c, _ in found])
    scores = [None] * net.n_anchors + [s for _, s in found]
    sizes = [tuple(c["input_size"][-2:]) for c in run.data_cfgs]  # per anchor: its own input size
    t0 = time.perf_counter()
    flops = network_flops(composed, sizes, run.data_cfgs[0]["input_size"][0])
    val_loader = create_eval_loader(run.val, run.loader, run.input_cfgs, batch_size=loader.batch_size)
    cfg_ids = list(range(composed.num_configs))
    metrics = evaluate_stitches(composed, val_loader, cfg_ids, run.device)
    t_eval = time.perf_counter() - t0
    records = []
    for c in cfg_ids:
        comp = composed.compositions[c]
        records.append(stitch_record(composed, c, metrics[c], flops[c], sizes[comp.segments[0].anchor],
                                     score=scores[c], segments=[[s.anchor, s.first, s.last] for s in comp.segments]))
    results = out / RESULTS_FILE
    write_results(results, records)
    report = pareto_report([str(results)], "flops")
    files = [results, *save_report(report, out, f"snnet search ({search.score}): {len(found)} networks")]
    files += write_maps(maps, out / "similarity", {"command": "snnet search", "data": str(data.data_dir),
                                                     "split": "train", "anchor_specs": anchor_records(run)})
    drawings = {out / "networks" / f"cfg_{rec['cfg_id']:03d}.svg": rec for rec in records}
    for stale in (out / "networks").glob("cfg_*.svg"):  # an earlier search's drawings of networks not found now
        if stale not in drawings:
            stale.unlink()
    for path, rec in drawings.items():
        write_text_atomic(path, network_svg(composed, rec["cfg_id"], rec, maps, search.score))
    files.append(out / "networks")
    files.append(_save_stitches(composed, out / "stitches.safetensors"))
    spec = {"command": "snnet search", "options": asdict(search), "data": str(data.data_dir),
            "anchors": [{"label": n, **a} for n, a in zip(net.names, anchor_records(run))],
            "num_classes": run.num_classes, "img_size": list(sizes[0]) if len(set(sizes)) == 1 else None,
            "calibration_images": maps.images,
            "seed": options.seed, "edges": [list(e) for e in composed.edges],
            "seconds": {"maps": round(t_maps, 2), "search": round(t_search, 3), "evaluation": round(t_eval, 2)},
            "networks": [{"cfg_id": r["cfg_id"], "route": r["route"], "segments": r["segments"], "score": r["score"]}
                         for r in records]}
    write_text_atomic(out / "search.json", json.dumps(spec, indent=1) + "\n")
    files.append(out / "search.json")
    print(f"maps on {maps.images} calibration images: {t_maps:.1f}s; search: {len(found)} networks in "
          f"{t_search:.2f}s; evaluation of {len(cfg_ids)} networks on {metrics[0]['samples']} images: {t_eval:.1f}s")
    if not found:
        print(f"no network passed --threshold {search.threshold} and --total-threshold {search.total_threshold} "
              f"({search.score}); lower them to see more")
    print(report.text, end="")
    print(f"wrote {', '.join(str(f) for f in files)}")
    return files


def _save_stitches(net: ComposedNet, path: Path) -> Path:
    """The fitted stitches (``<edge index>.<parameter>``; search.json lists the edges in that order), safetensors."""
    state = {k: v.detach().cpu().contiguous() for k, v in net.stitches.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, tmp)
    return path
