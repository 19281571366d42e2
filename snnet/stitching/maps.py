"""Compatibility maps: how well every unit of one anchor matches every unit of another (`snnet similarity`).

A *cut point* is the output of one unit (stem, block, transition, norm, head) of one anchor, as the family's
adapter cuts it. For every ordered pair of anchors (A, B) and every pair of cut points (unit i of A, unit j of B),
on the same images, each anchor reading them preprocessed its own way (a batch is one tensor for all anchors, or one
tensor per input group of the net: `ComposedNet.input_groups`, snnet.data.transforms.anchor_data_configs), so the order
of the anchors changes no score:

* ``cka``: linear CKA (cka.py) between A's output of unit i and B's output of unit j, one sample per image
  (the whole output flattened: every position, channel and prefix token), unbiased minibatch estimator averaged
  over the batches. Defined for every pair; symmetric.
* ``ls_residual``: the relative error ``||stitch(A_i) - B_j|| / ||B_j||`` of the best linear stitch from A's
  features to B's at that pair, fitted by least squares on the same images (float64 normal equations, solved by
  the least-squares init's solver). The stitch is the stitching layer the library uses (per position: a Linear on
  channels, or a 1x1 conv on NCHW maps, then the layout bridge TOKENS/NHWC/NCHW), so it exists only where both
  sides have the same number of spatial positions; elsewhere the map holds null, as it does where the images give
  no more rows (images x positions) than the stitch has unknowns (any features would fit exactly). Prefix tokens
  (timm's ``num_prefix_tokens``: cls, distillation, register tokens) are mapped with the other tokens when both
  sides have the same number of them (SN-Net's ViT stitch); otherwise the front's are dropped and the end's are
  predicted by a second least-squares linear map from the front's position-averaged features (`CutStitch`).
* ``kl``: ``KL(p_B || p_ij)`` averaged over the images, where p_B is B's own class distribution (softmax of its
  logits) and p_ij that of the network stitched at (i, j): A up to unit i, the least-squares stitch, B from unit
  j + 1 on. It measures, in B's output space, what a training-free stitch at (i, j) loses; defined wherever the
  stitch is. Cost: one pass of B's remaining units per stitchable pair and batch.

`compatibility_maps(net, batches)` computes all three in two passes over the same batches (statistics, then KL) and
keeps the fitted stitches (`CompatibilityMaps.stitches`) for the training-free composition search
(snnet/explore/search.py).
Memory: one batch's output of every unit of every anchor, and one (C_front + 1) x C_end matrix per stitchable pair.
"""
from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence, Sized
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import numpy as np
import torch
from torch import nn

from snnet.stitching.cka import MinibatchCKA
from snnet.stitching.cost import eval_mode
from snnet.stitching.cut import CutPoint, CutStitch, cut_points, why_not_stitchable
from snnet.stitching.lstsq import NormalEquations
from snnet.stitching.model import ComposedNet
from snnet.stitching.plan import Composition, Edge, Segment
from snnet.stitching.steps import unit_step
from snnet.utils.errors import SNNetError
from snnet.utils.progress import PROGRESS_SECONDS, Progress

#: least-squares cutoff: directions of [X|1]ᵀ[X|1] below this fraction of its largest eigenvalue (singular values of
#: [X|1] below ~1e-5 of the largest) are left out. LayerNorm outputs have channels that sum to zero up to float32
#: rounding; without a cutoff the solution puts huge weights on that rounding noise, which the float32 stitch cannot
#: reproduce (its residual would differ from the reported one).
RCOND = 1e-10
SCORES = ("cka", "ls_residual", "kl")


class SimilarityError(SNNetError):
    """A similarity or search request that cannot be met; the message names the value and the fix."""


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
    reasons: dict[Edge, str] = field(default_factory=dict)      # why a pair has no (measured) stitch
    stitches: dict[Edge, CutStitch] = field(default_factory=dict)  # the fitted stitches (kept in memory only)
    rows: dict[Edge, int] = field(default_factory=dict)         # least-squares rows per stitch
    images: int = 0
    batches: int = 0
    img_size: tuple[int, int] | None = None      # the anchors' input size (None when they differ)
    input_sizes: list[tuple[int, int]] | None = None  # per anchor: its input's size

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
            "anchors": [{"label": n, **({"img_size": list(self.input_sizes[a])} if self.input_sizes else {}),
                         "units": [c.to_json() for c in cuts]}
                        for a, (n, cuts) in enumerate(zip(self.names, self.cuts))],
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


Batch: TypeAlias = "torch.Tensor | Sequence[torch.Tensor]"  # one tensor, or one per input group


def _to(x: Batch, device: torch.device) -> Batch:
    return x.to(device) if isinstance(x, torch.Tensor) else [t.to(device) for t in x]


def _height_width(x: torch.Tensor) -> tuple[int, int]:
    return int(x.shape[-2]), int(x.shape[-1])


def _count(x: Batch) -> int:
    """Images in a batch (every tensor of a per-group batch holds the same images)."""
    return int(x.shape[0] if isinstance(x, torch.Tensor) else x[0].shape[0])


@torch.no_grad()
def compatibility_maps(net: ComposedNet, batches: Iterable[Batch], pairs: Sequence[tuple[int, int]] | None = None,
                       kl: bool = True, stitch_layer: dict[str, Any] | None = None,
                       rcond: float | None = RCOND) -> CompatibilityMaps:
    """The CKA, least-squares and KL maps of every ordered anchor pair in `pairs` (default: all), on `batches`
    (clean images; each batch of at least 4 images for the unbiased CKA). A batch is one tensor, read by every
    anchor, or a sequence of tensors of the same images, one per input group, of which each anchor reads its own
    (``net.anchor_input``; the KL map's stitched network A[..i] -> B reads A's, B's own logits B's). The batches are
    read twice (the KL pass needs the fitted stitches), so pass a list or a re-iterable. `stitch_layer` is the
    stitching-layer spec."""
    pairs = list(pairs) if pairs is not None else all_pairs(net.n_anchors)
    if not pairs:
        raise SimilarityError("compatibility maps need at least two anchors")
    device = next(net.parameters()).device
    used = sorted({a for p in pairs for a in p})
    points = {a: set(range(len(net.units[a]))) for a in used}
    unordered = sorted({tuple(sorted(p)) for p in pairs})
    cka_acc, ls = MinibatchCKA(), NormalEquations()
    probe_stitches: dict[Edge, CutStitch] = {}
    cuts: list[list[CutPoint]] | None = None
    stitchable: dict[Edge, tuple[CutPoint, CutPoint]] = {}
    reasons: dict[Edge, str] = {}
    n_images = n_batches = cka_batches = 0
    input_sizes: list[tuple[int, int]] | None = None
    total = len(batches) if isinstance(batches, Sized) else None
    progress = Progress("similarity: statistics (batches)", total, unit="img", seconds=PROGRESS_SECONDS)
    with eval_mode(net):
        for x in batches:
            x = _to(x, device)
            n = _count(x)
            feats = net.capture(x, points)
            if cuts is None:
                cuts = cut_points(net, feats)
                input_sizes = [_height_width(net.anchor_input(x, a)) for a in range(net.n_anchors)]
                for a, b in pairs:
                    for fc in cuts[a]:
                        for ec in cuts[b]:
                            r = why_not_stitchable(fc, ec)
                            if r is None:
                                stitchable[(a, fc.unit, b, ec.unit)] = (fc, ec)
                            else:
                                reasons[(a, fc.unit, b, ec.unit)] = r
            if n >= 4:
                cka_acc.add({k: v for k, v in feats.items()},
                            [((a, i), (b, j)) for a, b in unordered for i in points[a] for j in points[b]])
                cka_batches += 1
            ls.new_batch()
            for edge, (fc, ec) in stitchable.items():
                a, i, b, j = edge
                probe_stitches.setdefault(edge, CutStitch(fc, ec, stitch_layer)).add_rows(
                    ls, (a, i), edge, feats[(a, i)], feats[(b, j)])
            n_images += n
            n_batches += 1
            progress.advance(n)
    if total is None and n_batches:
        progress.finish()
    if cuts is None or input_sizes is None:
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
    for edge, module in probe_stitches.items():
        a, i, b, j = edge
        residual, rows[edge] = module.fit(ls, (a, i), edge, rcond)
        unknowns = stitchable[edge][0].channels + 1
        if rows[edge] <= unknowns:  # as many unknowns as rows: any features fit exactly, the residual says nothing
            reasons[edge] = (f"its least-squares stitch has {unknowns} unknowns per output channel and only "
                             f"{rows[edge]} rows (images x positions) to fit them: use more images")
            continue
        ls_maps[(a, b)][i, j] = residual
        stitches[edge] = module.to(device).eval()
    del ls
    img_size = input_sizes[0] if len(set(input_sizes)) == 1 else None
    maps = CompatibilityMaps(list(net.names), cuts, pairs, cka_maps, ls_maps, None, reasons, stitches, rows,
                             n_images, n_batches, img_size, input_sizes)
    if kl:
        maps.kl = _kl_maps(net, batches, maps, points, device)
    return maps


def _kl_maps(net: ComposedNet, batches, maps: CompatibilityMaps, points, device) -> dict:
    total = len(batches) if isinstance(batches, Sized) else None
    progress = Progress(f"similarity: KL of {len(maps.stitches)} stitched networks (batches)", total, unit="img",
                        seconds=PROGRESS_SECONDS)
    sums = {e: 0.0 for e in maps.stitches}
    images = 0
    with eval_mode(net):
        for x in batches:
            x = _to(x, device)
            feats = net.capture(x, points)  # each anchor on its own input: the stitched network reads A's
            for edge, stitch in maps.stitches.items():
                a, i, b, j = edge
                last = len(net.units[b]) - 1
                tail = tuple(unit_step(b, u) for u in range(j + 1, last + 1))
                q = net.run_steps(tail, stitch(feats[(a, i)]))
                lp = torch.log_softmax(feats[(b, last)].double(), dim=1)
                lq = torch.log_softmax(q.double(), dim=1)
                sums[edge] += float((lp.exp() * (lp - lq)).sum())
            images += _count(x)
            progress.advance(_count(x))
    if total is None:
        progress.finish()
    out = {p: np.full((len(maps.cuts[p[0]]), len(maps.cuts[p[1]])), np.nan) for p in maps.pairs}
    for (a, i, b, j), s in sums.items():
        out[(a, b)][i, j] = max(s / max(images, 1), 0.0)
    return out



def anchors_net(models: Sequence[nn.Module], adapters, labels: Sequence[str],
                input_groups: Sequence[int] | None = None) -> ComposedNet:
    """Built anchors (with their adapters), each a route of its own, in eval mode: what `compatibility_maps` reads.
    `input_groups`: which tensor of a per-group batch each anchor reads (`ComposedNet`)."""
    anchors_only = [Composition((Segment(a, 0, len(ad.units(m)) - 1),)) for a, (ad, m) in
                    enumerate(zip(adapters, models))]
    return ComposedNet(models, anchors_only, {}, labels, adapters, input_groups).eval()
