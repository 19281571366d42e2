"""Least-squares initialisation of the stitching layers.

For a stitch at (front block j -> end block k), the layer is fitted so that layer(front output of block j) matches
the end anchor's own input to block k (the output of block k-1; the embedding or stage input when k = 0).

Unlike SN-Net (docs/snnet_compat.md, C12, C13):
  * the model is in eval mode: no drop-path, BatchNorm uses and keeps its running statistics;
  * the caller passes clean images (validation transform: no mixup, no erasing);
  * statistics are accumulated in float64 as normal equations [X|1]ᵀ[X|1] and [X|1]ᵀY, so any number of batches
    can be streamed; under DDP they are summed over ranks, rank 0 solves, and the result is broadcast;
  * a layer shared by several positions is fitted jointly to all of their rows (the least-squares optimum for the
    shared layer) by default; SN-Net's mean of per-position solutions is ``mode="average"``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as dist

from .cost import eval_mode
from .layers import to_rows
from .model import SNNet
from .plan import Stitch

MODES = ("joint", "average")
PosKey = tuple  # (front, end, stage, j, k)


@dataclass
class FitReport:
    address: tuple[int, ...]
    positions: list[tuple[int, int]]
    rows: int
    rel_error: float  # on the fitting data: ||XW+b - Y|| / ||Y|| over all the layer's rows


def _key(st: Stitch) -> PosKey:
    return (st.front, st.end, st.stage, st.j, st.k)


def _rows(model: SNNet, feats, anchor: int, unit: int, stage: int) -> torch.Tensor:
    layout = model.adapters[anchor].stage_layout(model.anchors[anchor], stage)
    return to_rows(feats[(anchor, unit)], layout).double()


def _layer_positions(model: SNNet) -> dict[tuple[int, ...], list[Stitch]]:
    return {spec.address: model.plan.positions_of_layer(spec.address) for spec in model.plan.layers}


def _check_rows(model: SNNet, st: Stitch, x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape[0] != y.shape[0]:
        f, e = model.names[st.front], model.names[st.end]
        raise ValueError(
            f"cannot stitch {f!r} block {st.j} to {e!r} block {st.k} in stage {st.stage}: their features have "
            f"{x.shape[0]} vs {y.shape[0]} rows (different resolution or token count); use anchors whose stages "
            f"run at the same resolution")


@torch.no_grad()
def ls_init(model: SNNet, batches: Iterable[torch.Tensor], mode: str = "joint", rcond: float | None = None,
            ) -> list[FitReport]:
    """Fit every used stitching layer by least squares on `batches` (clean images). Returns a report per layer."""
    if mode not in MODES:
        raise ValueError(f"ls mode {mode!r} is not known: use one of {MODES}")
    layer_pos = _layer_positions(model)
    all_pos = [st for ps in layer_pos.values() for st in ps]
    need, where = model.feature_points(all_pos)
    gram: dict[tuple[int, int], torch.Tensor] = {}  # per front feature point: positions with the same X share it
    cross: dict[PosKey, torch.Tensor] = {}
    yy: dict[PosKey, torch.Tensor] = {}
    rows: dict[PosKey, int] = {}
    with eval_mode(model):
        for x in batches:
            feats = model.capture(x, need)
            xs = {}
            for st in all_pos:
                key = _key(st)
                (fa, ux), (ea, uy) = where[key]
                if (fa, ux) not in xs:
                    X = _rows(model, feats, fa, ux, st.stage)
                    xs[(fa, ux)] = Xa = torch.cat([X, X.new_ones(X.shape[0], 1)], dim=1)
                    gram[(fa, ux)] = gram.get((fa, ux), 0) + Xa.T @ Xa
                Xa = xs[(fa, ux)]
                Y = _rows(model, feats, ea, uy, st.stage)
                _check_rows(model, st, Xa, Y)
                cross[key] = cross.get(key, 0) + Xa.T @ Y
                yy[key] = yy.get(key, 0) + (Y * Y).sum()
                rows[key] = rows.get(key, 0) + Xa.shape[0]
            del feats, xs
    if not rows:
        return []
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed:  # sum the normal equations of all ranks' data
        for table in (gram, cross, yy):
            for k in sorted(table):
                table[k] = table[k].contiguous()
                dist.all_reduce(table[k])
    G_of = {key: gram[where[key][0]] for key in rows}
    reports = []
    for address, positions in layer_pos.items():
        if not positions or (distributed and dist.get_rank() != 0):  # solved once, on rank 0
            continue
        pkeys = [_key(st) for st in positions]
        if mode == "joint":
            A = _solve(sum(G_of[k] for k in pkeys), sum(cross[k] for k in pkeys), rcond)
        else:
            A = torch.stack([_solve(G_of[k], cross[k], rcond) for k in pkeys]).mean(0)
        # residual over the layer's rows from the sufficient statistics: |XA - Y|² = AᵀGA - 2AᵀR + YᵀY
        G, R = sum(G_of[k] for k in pkeys), sum(cross[k] for k in pkeys)
        sse = float(torch.trace(A.T @ G @ A) - 2 * torch.trace(A.T @ R) + sum(yy[k] for k in pkeys))
        rel = (max(sse, 0.0) / float(sum(yy[k] for k in pkeys))) ** 0.5
        model.stitch_layer(address).set_affine(A[:-1].T.contiguous(), A[-1])
        reports.append(FitReport(address, [st.position for st in positions], sum(rows[k] for k in pkeys), rel))
    if distributed:
        for p in model.stitch_layers.parameters():
            dist.broadcast(p.data, src=0)
    return reports


def _solve(G: torch.Tensor, R: torch.Tensor, rcond: float | None) -> torch.Tensor:
    """Minimum-norm least-squares solution of the normal equations G A = R (float64, CPU)."""
    return torch.linalg.lstsq(G.cpu(), R.cpu(), rcond=rcond, driver="gelsy").solution


@torch.no_grad()
def stitch_errors(model: SNNet, x: torch.Tensor) -> dict[PosKey, float]:
    """Per position: ||layer(front features) - end anchor's own features|| / ||end features|| on images `x`."""
    all_pos = [st for ps in _layer_positions(model).values() for st in ps]
    need, where = model.feature_points(all_pos)
    out = {}
    with eval_mode(model):
        feats = model.capture(x, need)
        for st in all_pos:
            (fa, ux), (ea, uy) = where[_key(st)]
            layer = model.stitch_layer(st.layer)
            mapped = layer(feats[(fa, ux)])
            pred = to_rows(mapped, layer.out_layout).double()
            Y = _rows(model, feats, ea, uy, st.stage)
            out[_key(st)] = float((pred - Y).norm() / Y.norm())
    return out
