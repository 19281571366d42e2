"""Compatibility maps: how well every unit of one anchor matches every unit of another (`snnet similarity`).

A *cut point* is the output of one unit (stem, block, transition, norm, head) of one anchor, as the family's
adapter cuts it. For every ordered pair of anchors (A, B) and every pair of cut points (unit i of A, unit j of B),
on the same images:

* ``cka``: linear CKA (snnet/cka.py) between A's output of unit i and B's output of unit j, one sample per image
  (the whole output flattened: every position, channel and prefix token), unbiased minibatch estimator averaged
  over the batches. Defined for every pair; symmetric.
* ``ls_residual``: the relative error ``||stitch(A_i) - B_j|| / ||B_j||`` of the best linear stitch from A's
  features to B's at that pair, fitted by least squares on the same images (float64 normal equations, solved by
  the least-squares init's solver). The stitch is the stitching layer the library uses (per position: a Linear on
  channels, or a 1x1 conv on NCHW maps, then the layout bridge TOKENS/NHWC/NCHW), so it exists only where both
  sides have the same number of spatial positions; elsewhere the map holds null. Prefix tokens (timm's
  ``num_prefix_tokens``: cls, distillation, register tokens) are mapped with the other tokens when both sides have
  the same number of them (SN-Net's ViT stitch); otherwise the front's are dropped and the end's are predicted by a
  second least-squares linear map from the front's position-averaged features (`CutStitch`).
* ``kl``: ``KL(p_B || p_ij)`` averaged over the images, where p_B is B's own class distribution (softmax of its
  logits) and p_ij that of the network stitched at (i, j): A up to unit i, the least-squares stitch, B from unit
  j + 1 on. It measures, in B's output space, what a training-free stitch at (i, j) loses; defined wherever the
  stitch is. Cost: one pass of B's remaining units per stitchable pair and batch.

`compatibility_maps(net, batches)` computes all three in two passes over the same batches (statistics, then KL) and
keeps the fitted stitches (`CompatibilityMaps.stitches`) for the training-free composition search (snnet/search.py).
Memory: one batch's output of every unit of every anchor, and one (C_front + 1) x C_end matrix per stitchable pair.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from .adapter import NCHW, NHWC, TOKENS
from .cka import MinibatchCKA
from .cost import eval_mode
from .fileio import save_figure, write_text_atomic
from .layers import create_stitch_layer, to_rows
from .ls_init import _solve
from .model import ComposedNet
from .plan import Composition, Edge, Segment
from .progress import PROGRESS_SECONDS, Progress

FLAT = "flat"  # (B, C): a pooled output (the head's logits)
#: least-squares cutoff: directions of [X|1]ᵀ[X|1] below this fraction of its largest eigenvalue (singular values of
#: [X|1] below ~1e-5 of the largest) are left out. LayerNorm outputs have channels that sum to zero up to float32
#: rounding; without a cutoff the solution puts huge weights on that rounding noise, which the float32 stitch cannot
#: reproduce (its residual would differ from the reported one).
RCOND = 1e-10
SCORES = ("cka", "ls_residual", "kl")


class SimilarityError(ValueError):
    """A similarity or search request that cannot be met; the message names the value and the fix."""


# ---------------------------------------------------------------------------------------------------- cut points
@dataclass(frozen=True)
class CutPoint:
    """The output of unit `unit` of anchor `anchor`, for one image: layout, channels, spatial extent (tokens: their
    count without the prefix tokens; maps: (H, W); flat: ()), prefix tokens."""
    anchor: int
    unit: int
    name: str
    kind: str
    layout: str
    channels: int
    extent: tuple[int, ...]
    prefix: int = 0

    @property
    def positions(self) -> int:
        return math.prod(self.extent) if self.extent else 1

    def to_json(self) -> dict[str, Any]:
        return {"index": self.unit, "name": self.name, "kind": self.kind, "layout": self.layout,
                "channels": self.channels, "extent": list(self.extent), "prefix_tokens": self.prefix}


def _unit_layout(net: ComposedNet, a: int, u: int, ndim: int) -> str:
    """Layout of unit u's output: flat for (B, C), tokens for (B, N, C); a 4-D map takes the layout of the stage of
    the nearest block unit (the unit's own, else the next, else the previous): the adapter says it per stage."""
    if ndim == 2:
        return FLAT
    if ndim == 3:
        return TOKENS
    units, model, adapter = net.units[a], net.anchor(a), net.adapters[a]
    order = [u] + list(range(u + 1, len(units))) + list(range(u - 1, -1, -1))
    for v in order:
        if units[v].kind == "block" and units[v].stage is not None:
            return adapter.stage_layout(model, units[v].stage)
    raise SimilarityError(f"anchor {net.names[a]!r} has no block units: the layout of its 4-D unit outputs is unknown")


def cut_points(net: ComposedNet, outputs: dict[tuple[int, int], torch.Tensor]) -> list[list[CutPoint]]:
    """Every unit's cut point, from the units' outputs on a batch (``net.capture`` of every unit)."""
    cuts = []
    for a, units in enumerate(net.units):
        prefix = int(getattr(net.anchor(a), "num_prefix_tokens", 0) or 0)
        row = []
        for u, unit in enumerate(units):
            x = outputs[(a, u)]
            layout = _unit_layout(net, a, u, x.dim())
            if layout == FLAT:
                channels, extent, pre = x.shape[1], (), 0
            elif layout == TOKENS:
                channels, extent, pre = x.shape[2], (x.shape[1] - prefix,), prefix
            elif layout == NCHW:
                channels, extent, pre = x.shape[1], tuple(x.shape[2:4]), 0
            else:
                channels, extent, pre = x.shape[3], tuple(x.shape[1:3]), 0
            row.append(CutPoint(a, u, unit.name, unit.kind, layout, int(channels), tuple(int(e) for e in extent),
                                pre))
        cuts.append(row)
    return cuts


def joint_tokens(front: CutPoint, end: CutPoint) -> bool:
    """Both sides are tokens with the same number of prefix tokens: one linear map for every token (SN-Net's)."""
    return front.layout == end.layout == TOKENS and front.prefix == end.prefix


def why_not_stitchable(front: CutPoint, end: CutPoint) -> str | None:
    """None when a linear stitch maps `front` onto `end`; else why not."""
    if (front.layout == FLAT) != (end.layout == FLAT):
        return "one side is pooled (no positions), the other is not"
    if front.positions != end.positions:
        return f"{front.positions} vs {end.positions} positions"
    grids = [c.extent for c in (front, end) if c.layout in (NCHW, NHWC)]
    if len(grids) == 2 and grids[0] != grids[1]:
        return f"grids {grids[0]} vs {grids[1]}"
    if len(grids) == 1 and grids[0][0] != grids[0][1]:  # tokens <-> a map: the layout bridge lays out squares
        return f"tokens vs a non-square grid {grids[0]}"
    return None


def _spatial(x: torch.Tensor, cut: CutPoint, keep_prefix: bool = False) -> torch.Tensor:
    """Features as (rows, channels): one row per image and position (row-major), prefix tokens dropped unless kept."""
    if cut.layout == FLAT:
        return x.reshape(x.shape[0], -1)
    if cut.layout == TOKENS:
        x = x if keep_prefix else x[:, cut.prefix:]
        return x.reshape(-1, x.shape[-1])
    return to_rows(x, cut.layout)


def _pooled(x: torch.Tensor, layout: str, prefix: int = 0) -> torch.Tensor:
    """Per image, the mean over the spatial positions (prefix tokens left out): (B, channels)."""
    if layout == TOKENS:
        return x[:, prefix:].mean(1)
    if layout in (NCHW, NHWC):
        return x.mean((2, 3) if layout == NCHW else (1, 2))
    return x


# ---------------------------------------------------------------------------------------------------- the stitch
class CutStitch(nn.Module):
    """A stitch between two cut points: the library's stitching layer (`spec`, default ``linear``) on the spatial
    positions with the layout bridge, plus the prefix-token bridge. With `joint_tokens` the layer maps every token;
    otherwise the front's prefix tokens are dropped and, when the end has prefix tokens, ``prefix`` (a Linear)
    predicts them from the front's position-averaged features and puts them first."""

    def __init__(self, front: CutPoint, end: CutPoint, spec: dict[str, Any] | None = None):
        super().__init__()
        reason = why_not_stitchable(front, end)
        if reason is not None:
            raise SimilarityError(f"cannot stitch unit {front.name!r} of anchor {front.anchor} to unit {end.name!r} "
                                  f"of anchor {end.anchor}: {reason}")
        self.front, self.end = front, end
        self.joint = joint_tokens(front, end)
        self.drop = 0 if self.joint else front.prefix
        in_layout = TOKENS if front.layout == FLAT else front.layout
        out_layout = TOKENS if end.layout == FLAT else end.layout
        self.layer = create_stitch_layer(spec, front.channels, end.channels, in_layout, out_layout)
        self.end_prefix = 0 if self.joint else end.prefix
        self.prefix = nn.Linear(front.channels, self.end_prefix * end.channels) if self.end_prefix else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop:
            x = x[:, self.drop:]
        y = self.layer(x)
        if self.prefix is None:
            return y
        pooled = _pooled(x, self.front.layout, self.front.prefix - self.drop)
        tokens = self.prefix(pooled).reshape(x.shape[0], self.end_prefix, self.end.channels)
        return torch.cat([tokens, y], dim=1)

    @torch.no_grad()
    def set_fit(self, main: torch.Tensor, prefix: torch.Tensor | None = None) -> None:
        """Set the maps from least-squares solutions A ((C_in + 1) x C_out, bias last) of [X | 1] A = Y."""
        self.layer.set_affine(main[:-1].T.contiguous(), main[-1])
        if self.prefix is not None:
            self.prefix.weight.copy_(prefix[:-1].T.to(self.prefix.weight.dtype))
            self.prefix.bias.copy_(prefix[-1].to(self.prefix.bias.dtype))

    def extra_repr(self) -> str:
        return f"{self.front.name} ({self.front.layout}) -> {self.end.name} ({self.end.layout})"


# ---------------------------------------------------------------------------------------------------- least squares
class _NormalEquations:
    """Float64 least-squares statistics of many stitches sharing front features: per front matrix [X | 1]ᵀ[X | 1]
    (accumulated once per batch whatever the number of stitches reading it), per stitch part [X | 1]ᵀY and YᵀY."""

    def __init__(self):
        self.gram: dict = {}
        self.cross: dict = {}
        self.yy: dict = {}
        self.rows: dict = {}
        self._batch: dict = {}

    def new_batch(self) -> None:
        self._batch = {}

    def add(self, xkey, X: torch.Tensor, key, Y: torch.Tensor) -> None:
        if xkey not in self._batch:
            Xa = torch.cat([X.double(), X.new_ones(X.shape[0], 1, dtype=torch.float64)], dim=1)
            self._batch[xkey] = Xa
            self.gram[xkey] = self.gram.get(xkey, 0) + Xa.T @ Xa
        Xa, Y = self._batch[xkey], Y.double()
        self.cross[key] = self.cross.get(key, 0) + Xa.T @ Y
        self.yy[key] = self.yy.get(key, 0.0) + float((Y * Y).sum())
        self.rows[key] = self.rows.get(key, 0) + Xa.shape[0]

    def solve(self, xkey, key, rcond: float | None) -> tuple[torch.Tensor, float, float]:
        """(A, sum of squared errors, YᵀY); the error from the statistics: |XA - Y|² = AᵀGA - 2AᵀR + YᵀY."""
        G, R = self.gram[xkey], self.cross[key]
        A = _solve(G, R, rcond)
        G, R = G.cpu(), R.cpu()
        sse = float(torch.trace(A.T @ G @ A) - 2 * torch.trace(A.T @ R)) + self.yy[key]
        return A, max(sse, 0.0), self.yy[key]


# ---------------------------------------------------------------------------------------------------- the maps
@dataclass
class CompatibilityMaps:
    """Scores per ordered anchor pair (a, b): arrays [units of a, units of b]; NaN where a score is undefined."""
    names: list[str]
    cuts: list[list[CutPoint]]
    pairs: list[tuple[int, int]]
    cka: dict[tuple[int, int], np.ndarray]
    ls_residual: dict[tuple[int, int], np.ndarray]
    kl: dict[tuple[int, int], np.ndarray] | None
    reasons: dict[Edge, str] = field(default_factory=dict)      # why a pair has no stitch
    stitches: dict[Edge, CutStitch] = field(default_factory=dict)  # the fitted stitches (kept in memory only)
    rows: dict[Edge, int] = field(default_factory=dict)         # least-squares rows per stitch
    images: int = 0
    batches: int = 0
    img_size: tuple[int, int] | None = None

    def value(self, kind: str, edge: Edge) -> float | None:
        """The raw score of `kind` (one of SCORES) at edge (a, i, b, j); None where undefined."""
        a, i, b, j = edge
        table = {"cka": self.cka, "ls_residual": self.ls_residual, "kl": self.kl}[kind]
        if table is None:
            raise SimilarityError(f"the {kind} map was not computed")
        if (a, b) not in table:
            return None
        v = float(table[(a, b)][i, j])
        return None if math.isnan(v) else v

    def to_json(self, meta: dict[str, Any] | None = None) -> dict[str, Any]:
        def grid(arr):
            return None if arr is None else [[None if math.isnan(v) else round(float(v), 6) for v in row]
                                             for row in arr]
        return {
            **(meta or {}),
            "images": self.images, "batches": self.batches,
            "img_size": list(self.img_size) if self.img_size else None,
            "definitions": DEFINITIONS,
            "anchors": [{"label": n, "units": [c.to_json() for c in cuts]} for n, cuts in zip(self.names, self.cuts)],
            "pairs": [{"front": a, "end": b, "front_label": self.names[a], "end_label": self.names[b],
                       "cka": grid(self.cka[(a, b)]), "ls_residual": grid(self.ls_residual[(a, b)]),
                       "kl": grid(self.kl[(a, b)]) if self.kl is not None else None,
                       "not_stitchable": {f"{i},{j}": r for (fa, i, fb, j), r in self.reasons.items()
                                          if (fa, fb) == (a, b)}}
                      for a, b in self.pairs],
        }

    def csv_text(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["front", "end", "front_unit", "front_name", "end_unit", "end_name", "cka", "ls_residual", "kl",
                    "ls_rows", "not_stitchable"])
        fmt = lambda v: "" if v is None else f"{v:.6g}"
        for a, b in self.pairs:
            for fc in self.cuts[a]:
                for ec in self.cuts[b]:
                    e = (a, fc.unit, b, ec.unit)
                    w.writerow([self.names[a], self.names[b], fc.unit, fc.name, ec.unit, ec.name,
                                fmt(self.value("cka", e)), fmt(self.value("ls_residual", e)),
                                fmt(self.value("kl", e)) if self.kl is not None else "", self.rows.get(e, ""),
                                self.reasons.get(e, "")])
        return buf.getvalue()


DEFINITIONS = {
    "sample": "one image: a unit's whole output flattened (every position, channel and prefix token)",
    "cka": "linear CKA, unbiased minibatch estimator (Nguyen et al. 2021): mean HSIC1(K,L) / sqrt(mean HSIC1(K,K) "
           "mean HSIC1(L,L)) over the batches, K, L linear Gram matrices of the two units' outputs",
    "ls_residual": "||[X|1]A - Y|| / ||Y|| of the least-squares stitch from the front unit's output X to the end "
                   "unit's output Y, per position (prefix tokens: see CutStitch), on the same images",
    "kl": "mean over images of KL(softmax(end anchor logits) || softmax(logits of the network stitched at (i, j): "
          "front anchor to unit i, the least-squares stitch, end anchor from unit j+1))",
}


def all_pairs(n: int) -> list[tuple[int, int]]:
    return [(a, b) for a in range(n) for b in range(n) if a != b]


@torch.no_grad()
def compatibility_maps(net: ComposedNet, batches: Iterable[torch.Tensor], pairs: Sequence[tuple[int, int]] | None =
                       None, kl: bool = True, stitch_layer: dict[str, Any] | None = None,
                       rcond: float | None = RCOND) -> CompatibilityMaps:
    """The CKA, least-squares and KL maps of every ordered anchor pair in `pairs` (default: all), on `batches`
    (clean images; each batch of at least 4 images for the unbiased CKA). The batches are read twice (the KL pass
    needs the fitted stitches), so pass a list or a re-iterable. `stitch_layer` is the stitching-layer spec."""
    pairs = list(pairs) if pairs is not None else all_pairs(net.n_anchors)
    if not pairs:
        raise SimilarityError("compatibility maps need at least two anchors")
    device = next(net.parameters()).device
    used = sorted({a for p in pairs for a in p})
    points = {a: set(range(len(net.units[a]))) for a in used}
    unordered = sorted({tuple(sorted(p)) for p in pairs})
    cka_acc, ls = MinibatchCKA(), _NormalEquations()
    cuts: list[list[CutPoint]] | None = None
    stitchable: dict[Edge, tuple[CutPoint, CutPoint]] = {}
    reasons: dict[Edge, str] = {}
    n_images = n_batches = cka_batches = 0
    img_size = None
    total = len(batches) if hasattr(batches, "__len__") else None
    progress = Progress("similarity: statistics (batches)", total, unit="img", seconds=PROGRESS_SECONDS)
    with eval_mode(net):
        for x in batches:
            x = x.to(device)
            feats = net.capture(x, points)
            if cuts is None:
                cuts = cut_points(net, feats)
                img_size = tuple(int(s) for s in x.shape[-2:])
                for a, b in pairs:
                    for fc in cuts[a]:
                        for ec in cuts[b]:
                            r = why_not_stitchable(fc, ec)
                            if r is None:
                                stitchable[(a, fc.unit, b, ec.unit)] = (fc, ec)
                            else:
                                reasons[(a, fc.unit, b, ec.unit)] = r
            if x.shape[0] >= 4:
                cka_acc.add({k: v for k, v in feats.items()},
                            [((a, i), (b, j)) for a, b in unordered for i in points[a] for j in points[b]])
                cka_batches += 1
            ls.new_batch()
            for edge, (fc, ec) in stitchable.items():
                a, i, b, j = edge
                fx, ex = feats[(a, i)], feats[(b, j)]
                if joint_tokens(fc, ec):
                    ls.add((a, i, "all"), _spatial(fx, fc, keep_prefix=True), (edge, "main"),
                           _spatial(ex, ec, keep_prefix=True))
                    continue
                ls.add((a, i, "spatial"), _spatial(fx, fc), (edge, "main"), _spatial(ex, ec))
                if ec.prefix:
                    end_prefix = ex[:, :ec.prefix].reshape(ex.shape[0], -1)
                    ls.add((a, i, "pooled"), _pooled(fx, fc.layout, fc.prefix), (edge, "prefix"), end_prefix)
            n_images += x.shape[0]
            n_batches += 1
            progress.advance(x.shape[0])
    if total is None and n_batches:
        progress.finish()
    if cuts is None:
        raise SimilarityError("no images: the similarity maps need at least one batch of images")
    if not cka_batches:
        raise SimilarityError(f"the unbiased CKA needs batches of at least 4 images; got {n_images} image(s): use "
                              f"more images or a larger batch size")
    shape = lambda a, b: (len(cuts[a]), len(cuts[b]))
    cka_maps = {}
    for a, b in pairs:
        m = np.zeros(shape(a, b))
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                m[i, j] = cka_acc.cka((a, i), (b, j)) if a < b else cka_acc.cka((b, j), (a, i))
        cka_maps[(a, b)] = m
    ls_maps = {p: np.full(shape(*p), np.nan) for p in pairs}
    stitches, rows = {}, {}
    for edge, (fc, ec) in stitchable.items():
        a, i, b, j = edge
        module = CutStitch(fc, ec, stitch_layer)
        if joint_tokens(fc, ec):
            A, sse, yy = ls.solve((a, i, "all"), (edge, "main"), rcond)
            module.set_fit(A)
        else:
            A, sse, yy = ls.solve((a, i, "spatial"), (edge, "main"), rcond)
            P = None
            if ec.prefix:
                P, sse_p, yy_p = ls.solve((a, i, "pooled"), (edge, "prefix"), rcond)
                sse, yy = sse + sse_p, yy + yy_p
            module.set_fit(A, P)
        ls_maps[(a, b)][i, j] = math.sqrt(sse / yy) if yy > 0 else 0.0
        rows[edge] = ls.rows[(edge, "main")]
        stitches[edge] = module.to(device).eval()
    del ls
    maps = CompatibilityMaps(list(net.names), cuts, pairs, cka_maps, ls_maps, None, reasons, stitches, rows,
                             n_images, n_batches, img_size)
    if kl:
        maps.kl = _kl_maps(net, batches, maps, points, device)
    return maps


def _kl_maps(net: ComposedNet, batches, maps: CompatibilityMaps, points, device) -> dict:
    total = len(batches) if hasattr(batches, "__len__") else None
    progress = Progress(f"similarity: KL of {len(maps.stitches)} stitched networks (batches)", total, unit="img",
                        seconds=PROGRESS_SECONDS)
    sums = {e: 0.0 for e in maps.stitches}
    images = 0
    with eval_mode(net):
        for x in batches:
            x = x.to(device)
            feats = net.capture(x, points)
            for edge, stitch in maps.stitches.items():
                a, i, b, j = edge
                last = len(net.units[b]) - 1
                tail = tuple(("unit", b, u) for u in range(j + 1, last + 1))
                q = net.run_steps(tail, stitch(feats[(a, i)]))
                lp = torch.log_softmax(feats[(b, last)].double(), dim=1)
                lq = torch.log_softmax(q.double(), dim=1)
                sums[edge] += float((lp.exp() * (lp - lq)).sum())
            images += x.shape[0]
            progress.advance(x.shape[0])
    if total is None:
        progress.finish()
    out = {p: np.full((len(maps.cuts[p[0]]), len(maps.cuts[p[1]])), np.nan) for p in maps.pairs}
    for (a, i, b, j), s in sums.items():
        out[(a, b)][i, j] = max(s / max(images, 1), 0.0)
    return out


# ---------------------------------------------------------------------------------------------------- files
def _heatmaps(maps: CompatibilityMaps, kind: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    table = {"cka": maps.cka, "ls_residual": maps.ls_residual, "kl": maps.kl}[kind]
    pairs = [p for p in maps.pairs if kind != "cka" or p[0] < p[1] or (p[1], p[0]) not in maps.pairs]
    cols = min(3, len(pairs))
    rows = math.ceil(len(pairs) / cols)
    cell = 0.32
    widths = [max(len(maps.cuts[b]) * cell + 2.5, 4.0) for _, b in pairs]
    heights = [max(len(maps.cuts[a]) * cell + 2.0, 3.5) for a, _ in pairs]
    fig, axes = plt.subplots(rows, cols, figsize=(max(widths) * cols, max(heights) * rows), squeeze=False)
    style = {"cka": ("viridis", 0.0, 1.0, "linear CKA (unbiased)"),
             "ls_residual": ("viridis_r", 0.0, 1.0, "least-squares stitch residual (relative)"),
             "kl": ("magma_r", 0.0, None, "KL(end || stitched), nats")}[kind]
    cmap = plt.get_cmap(style[0]).with_extremes(bad="0.85")
    for ax, (a, b) in zip(axes.flat, pairs):
        m = np.ma.masked_invalid(table[(a, b)])
        vmax = style[2] if style[2] is not None else max(float(m.max()) if m.count() else 1.0, 1e-6)
        im = ax.imshow(m, cmap=cmap, vmin=style[1], vmax=vmax, aspect="auto")
        ax.set_xticks(range(len(maps.cuts[b])), [c.name for c in maps.cuts[b]], rotation=90, fontsize=7)
        ax.set_yticks(range(len(maps.cuts[a])), [c.name for c in maps.cuts[a]], fontsize=7)
        ax.set_xlabel(f"end: {maps.names[b]} (unit j)", fontsize=8)
        ax.set_ylabel(f"front: {maps.names[a]} (unit i)", fontsize=8)
        if m.shape[0] * m.shape[1] <= 400:
            for i in range(m.shape[0]):
                for j in range(m.shape[1]):
                    if not np.ma.is_masked(m[i, j]):
                        dark = (float(m[i, j]) - style[1]) / (vmax - style[1]) < 0.5  # viridis is dark when low
                        ax.text(j, i, f"{float(m[i, j]):.2f}", ha="center", va="center", fontsize=5.5,
                                color="white" if dark == (kind == "cka") else "black")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    for ax in list(axes.flat)[len(pairs):]:
        ax.axis("off")
    grey = "" if kind == "cka" else " (grey: no linear stitch)"
    fig.suptitle(f"{style[3]}; {maps.images} images{grey}", fontsize=10)
    save_figure(fig, path, dpi=110)


def write_maps(maps: CompatibilityMaps, out_dir: str | os.PathLike, meta: dict[str, Any] | None = None) -> list[Path]:
    """similarity.json, similarity.csv and one heatmap PNG per score (<score>.png), each written atomically."""
    out = Path(out_dir)
    files = [out / "similarity.json", out / "similarity.csv"]
    write_text_atomic(files[0], json.dumps(maps.to_json(meta), indent=1) + "\n")
    write_text_atomic(files[1], maps.csv_text())
    for kind in SCORES:
        if kind == "kl" and maps.kl is None:
            continue
        files.append(out / f"{kind}.png")
        _heatmaps(maps, kind, files[-1])
    return files


# ---------------------------------------------------------------------------------------------------- anchors, data
def anchor_specs(anchors: Sequence[str] | None, stitch_config: str | None):
    """AnchorSpecs from ``--anchors`` (each a timm name, NAME:CHECKPOINT, or a config's JSON anchor object) or from
    a stitch config's anchors list (exactly one of the two)."""
    from .config import ConfigError, load_stitch_config, parse_stitch_config
    if bool(anchors) == bool(stitch_config):
        raise SimilarityError("name the anchors with --anchors A B ... or --stitch_config CFG (one of the two)")
    if stitch_config:
        return load_stitch_config(stitch_config)
    items = []
    for text in anchors:
        if text.lstrip().startswith("{"):
            try:
                items.append(json.loads(text))
            except ValueError as e:
                raise SimilarityError(f"--anchors {text!r} is not a JSON object ({e}); write NAME, NAME:CHECKPOINT "
                                      f"or a config anchor such as '{{\"name\": \"resnet18\"}}'") from None
        elif ":" in text:
            name, checkpoint = text.split(":", 1)
            items.append({"name": name, "checkpoint": checkpoint})
        else:
            items.append(text)
    try:
        return parse_stitch_config({"anchors": items}, "--anchors")
    except ConfigError as e:
        raise SimilarityError(str(e)) from None


def build_anchors(cfg, pretrained: bool, num_classes: int | None, img_size: int | None,
                  in_chans: int | None = None) -> ComposedNet:
    """The anchors of a stitch config (timm, local checkpoints), each a route of its own, in eval mode."""
    from .adapter import adapter_for
    from .build import check_model_name, create_anchor
    names = [a.name for a in cfg.anchors]
    for a in cfg.anchors:
        check_model_name(a.name)
    models = [create_anchor(a, pretrained, num_classes=num_classes, img_size=img_size, in_chans=in_chans)
              for a in cfg.anchors]
    labels = [f"{n}#{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]
    adapters = [adapter_for(m, n) for m, n in zip(models, labels)]
    return anchors_net(models, adapters, labels)


def anchors_net(models: Sequence[nn.Module], adapters, labels: Sequence[str]) -> ComposedNet:
    """Built anchors (with their adapters), each a route of its own, in eval mode: what `compatibility_maps` reads."""
    anchors_only = [Composition((Segment(a, 0, len(ad.units(m)) - 1),)) for a, (ad, m) in
                    enumerate(zip(adapters, models))]
    return ComposedNet(models, anchors_only, {}, labels, adapters).eval()


def data_namespace(data_dir: str, batch_size: int, num_classes: int | None = None,
                   workers: int = 0) -> argparse.Namespace:
    """The data options of train.py that `snnet.data` reads, for a folder dataset."""
    return argparse.Namespace(data_dir=str(data_dir), dataset="", train_split="train", val_split="validation",
                              class_map="", num_classes=num_classes, batch_size=1, validation_batch_size=batch_size,
                              workers=workers, pin_mem=False, seed=0, dataset_download=False, aug_repeats=0,
                              grad_accum_steps=1)


def open_data(data_dir: str, need_train: bool, batch_size: int, num_classes: int | None = None):
    """(train, val) datasets of an ImageFolder root, checked (one-line DataError on a bad folder)."""
    from .data import check_data, create_datasets
    ns = data_namespace(data_dir, batch_size, num_classes)
    check_data(ns, need_train=need_train, world_size=1)
    return ns, *create_datasets(ns, need_train=need_train)


def data_config(net: ComposedNet, img_size: int | None) -> dict[str, Any]:
    """Evaluation preprocessing as train.py resolves it (timm, the largest anchor's pretrained config)."""
    from timm.data import resolve_data_config
    return resolve_data_config({"img_size": img_size} if img_size else {}, model=net.anchor(net.n_anchors - 1))


def calibration_batches(dataset, data_cfg: dict[str, Any], batches: int, batch_size: int, seed: int = 0) -> list:
    """`batches` x `batch_size` clean images drawn at random (seeded) from `dataset`, kept in memory (the maps read
    them twice)."""
    from .data import clean_images
    return list(clean_images(dataset, data_cfg, batches * batch_size, seed, batch_size=batch_size))


def device_of(name: str | None) -> torch.device:
    """``--device``: cuda when available unless named."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SimilarityError(f"--device {name!r} is not a torch device; use cpu or cuda[:index]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SimilarityError(f"--device {name!r}: CUDA is not available here; use --device cpu")
    return device


@dataclass
class Prepared:
    """What both commands build from their arguments, every input checked before any image is read."""
    out: Path
    cfg: Any                 # StitchConfig: the anchors' specs
    net: ComposedNet         # the anchors, each its own route, on `device`
    device: torch.device
    data: argparse.Namespace  # snnet.data's options
    train: Any
    val: Any
    num_classes: int | None
    img_size: int | None
    data_cfg: dict[str, Any]


def prepare(args: argparse.Namespace, need_train: bool, what: str, need_val: bool = False) -> Prepared:
    """Output folder, batch size, device, anchors (>= 2), data folder, then the anchors themselves."""
    from .cli import check_out_dir
    from .data import DataError, num_classes_of
    out = check_out_dir(args.out)
    if args.batch_size < 4:
        raise SimilarityError(f"--batch-size {args.batch_size}: the unbiased CKA needs at least 4 images per batch; "
                              f"use -b 4 or more")
    device = device_of(args.device)
    cfg = anchor_specs(args.anchors, args.stitch_config)
    if len(cfg.anchors) < 2:
        raise SimilarityError(f"{what} needs at least two anchors, got {len(cfg.anchors)}; add one to --anchors or "
                              f"the config")
    ns, train, val = open_data(args.data, need_train, args.batch_size, args.num_classes)
    if need_val and val is None:
        raise DataError(f"data folder {args.data!r} has no validation/ or val/ folder to evaluate on")
    classes = args.num_classes or cfg.get("num_classes") or num_classes_of(train if need_train else val)
    img_size = args.img_size or cfg.get("input_size")
    net = build_anchors(cfg, not args.no_pretrained, classes, img_size).to(device)
    return Prepared(out, cfg, net, device, ns, train, val, classes, img_size, data_config(net, img_size))


def run_similarity(args: argparse.Namespace) -> list[Path]:
    """`snnet similarity`: anchors, clean images of one split, the three maps, the files."""
    import time
    run = prepare(args, args.split == "train", "compatibility maps")
    t0 = time.perf_counter()
    images = calibration_batches(run.train if args.split == "train" else run.val, run.data_cfg, args.batches,
                                 args.batch_size, args.seed)
    maps = compatibility_maps(run.net, images, kl=not args.no_kl)
    took = time.perf_counter() - t0
    meta = {"command": "snnet similarity", "data": str(args.data), "split": args.split, "seconds": round(took, 2),
            "anchor_specs": [{"name": a.name, "checkpoint": a.checkpoint, "model_kwargs": a.model_kwargs}
                             for a in run.cfg.anchors]}
    files = write_maps(maps, args.out, meta)
    print(summary(maps, took))
    print(f"wrote {', '.join(str(f) for f in files)}")
    return files


def summary(maps: CompatibilityMaps, seconds: float) -> str:
    """A few lines: per ordered pair, the best-matching end unit of each front unit."""
    lines = [f"compatibility maps of {len(maps.names)} anchors on {maps.images} images ({maps.batches} batches) in "
             f"{seconds:.1f}s"]
    for a, b in maps.pairs:
        stitchable = sum(1 for e in maps.stitches if (e[0], e[2]) == (a, b))
        lines.append(f"{maps.names[a]} -> {maps.names[b]}: {stitchable} of "
                     f"{len(maps.cuts[a]) * len(maps.cuts[b])} unit pairs stitchable")
        for fc in maps.cuts[a]:
            row = maps.cka[(a, b)][fc.unit]
            j = int(np.argmax(row))
            res = maps.value("ls_residual", (a, fc.unit, b, j))
            klv = maps.value("kl", (a, fc.unit, b, j)) if maps.kl is not None else None
            extra = (f", LS residual {res:.3f}" if res is not None else ", no linear stitch") + \
                (f", KL {klv:.3f}" if klv is not None else "")
            lines.append(f"  {fc.name:>14} ~ {maps.cuts[b][j].name:<14} CKA {row[j]:.3f}{extra}")
    return "\n".join(lines)
