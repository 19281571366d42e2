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

``mode="snnet"`` (`ls_init_snnet`) is SN-Net's own init, step for step: one (augmented, mixed) training batch, the
model in train mode (drop-path active, BatchNorm on batch statistics and updating its running statistics), each
anchor run through all its blocks, float32 ``pinv`` on CPU per position, the mean of the per-position solutions;
each rank solves on its own batch and rank 0's layers and BatchNorm buffers are kept. With ``snnet_version=2``
it is SN-Netv2's init instead (docs/snnet_compat.md, C36): the same per-position float32 ``pinv`` on one training
batch, but every anchor run once, in eval mode (SN-Netv2's README command, ``--get_flops``, put the model in eval
mode before the fit), under autocast in the run's AMP dtype (its fit ran under fp16 autocast), with torch 2.x's
default ``pinv`` cut-off (it ran on torch 2.1); one position per layer, so nothing is averaged.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from snnet.stitching.cost import eval_mode
from snnet.stitching.layers import to_rows
from snnet.stitching.lstsq import NormalEquations, as_affine
from snnet.stitching.model import SNNet
from snnet.stitching.plan import Junction
from snnet.utils.progress import PROGRESS_SECONDS, Progress

MODES = ("joint", "average", "snnet")
PosKey = tuple  # (front, end, stage, j, k)


@dataclass
class FitReport:
    address: tuple[int, ...]
    positions: list[tuple[int, int]]
    rows: int
    rel_error: float  # on the fitting data: ||XW+b - Y|| / ||Y|| over all the layer's rows


def _key(st: Junction) -> PosKey:
    return (st.front, st.end, st.stage, st.j, st.k)


def _rows(model: SNNet, feats, anchor: int, unit: int, stage: int) -> torch.Tensor:
    layout = model.adapters[anchor].stage_layout(model.anchors[anchor], stage)
    return to_rows(feats[(anchor, unit)], layout).double()


def _layer_positions(model: SNNet) -> dict[tuple[int, ...], list[Junction]]:
    return {spec.address: model.plan.positions_of_layer(spec.address) for spec in model.plan.layers}


def _check_rows(model: SNNet, st: Junction, x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape[0] != y.shape[0]:
        f, e = model.names[st.front], model.names[st.end]
        raise ValueError(
            f"cannot stitch {f!r} block {st.j} to {e!r} block {st.k} in stage {st.stage}: their features have "
            f"{x.shape[0]} vs {y.shape[0]} rows (different resolution or token count); use anchors whose stages "
            f"run at the same resolution")


def _add_batch(stats: NormalEquations, model: SNNet, feats, positions: list[Junction], where) -> None:
    """One batch's rows of every position: X from the front feature point, Y from the end anchor's own input."""
    stats.new_batch()
    for st in positions:
        key = _key(st)
        (fa, ux), (ea, uy) = where[key]
        X = _rows(model, feats, fa, ux, st.stage)
        Y = _rows(model, feats, ea, uy, st.stage)
        _check_rows(model, st, X, Y)
        stats.add((fa, ux), X, key, Y)


def _fit_layer(stats: NormalEquations, model: SNNet, address, positions: list[Junction], where, mode: str,
               rcond) -> FitReport:
    """Solve one layer (joint, or SN-Net's mean of per-position solutions), set it, and report the error of the map
    the layer then holds (a low-rank layer keeps a truncated SVD of the solution: its own error is reported)."""
    fit = stats.fit([(where[_key(st)][0], _key(st)) for st in positions], rcond, mode)
    layer = model.stitch_layer(address)
    layer.set_affine(*as_affine(fit.A))
    return FitReport(address, [st.position for st in positions], fit.rows, fit.layer_error(layer))


@torch.no_grad()
def ls_init(model: SNNet, batches: Iterable[torch.Tensor], mode: str = "joint", rcond: float | None = None,
            snnet_version: int = 1, amp_dtype: torch.dtype | None = None) -> list[FitReport]:
    """Fit every used stitching layer by least squares on `batches` (clean images). Returns a report per layer.
    `snnet_version` and `amp_dtype` only matter for ``mode="snnet"`` (`ls_init_snnet`)."""
    if mode not in MODES:
        raise ValueError(f"ls mode {mode!r} is not known: use one of {MODES}")
    if mode == "snnet":  # SN-Net fitted on one batch: several are joined into one
        batches = list(batches)
        if not batches:
            return []
        images = batches[0] if len(batches) == 1 else torch.cat(batches)
        if snnet_version == 1:
            return ls_init_snnet(model, images)
        return ls_init_snnet(model, images, snnet_version=snnet_version, amp_dtype=amp_dtype)
    layer_pos = _layer_positions(model)
    all_pos = [st for ps in layer_pos.values() for st in ps]
    need, where = model.feature_points(all_pos)
    stats = NormalEquations()
    progress = Progress("LS init: statistics (batches)", _length(batches), seconds=PROGRESS_SECONDS)
    with eval_mode(model):
        for x in batches:
            _add_batch(stats, model, model.capture(x, need), all_pos, where)
            progress.advance(x.shape[0])
    if progress.total is None and progress.step:
        progress.finish()
    if not stats.rows:
        return []
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed:  # sum the normal equations of all ranks' data; rank 0 solves
        stats.all_reduce()
    todo = [(address, positions) for address, positions in layer_pos.items()
            if positions and not (distributed and dist.get_rank() != 0)]
    progress = Progress("LS init: solve (layers)", len(todo), unit=None, seconds=PROGRESS_SECONDS)
    reports = []
    for address, positions in todo:
        reports.append(_fit_layer(stats, model, address, positions, where, mode, rcond))
        progress.advance()
    if distributed:
        for p in model.stitch_layers.parameters():
            dist.broadcast(p.data, src=0)
    return reports


def _length(batches: Iterable) -> int | None:
    """The number of batches, where the iterable knows it (no ETA otherwise)."""
    try:
        return len(batches)  # type: ignore[arg-type]
    except TypeError:
        return None


# ---------------------------------------------------------------------------------------------------- SN-Net's init
#: SN-Net ran PyTorch 1.10, whose ``torch.linalg.pinv`` default cutoff was rcond=1e-15 (relative to the largest
#: singular value); PyTorch >= 1.11 defaults to eps * max(rows, cols), which would cut more.
SNNET_PINV_RTOL = 1e-15


@contextlib.contextmanager
def _train_mode(model: nn.Module):
    """Train mode for the block, then every module's own previous mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.train()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def ps_inv(X: torch.Tensor, Y: torch.Tensor, rtol: float | None = SNNET_PINV_RTOL) -> tuple[torch.Tensor, torch.Tensor]:
    """SN-Net's per-position solve: A = pinv([X | 1]) Y in float32 on CPU; returns (W = A[:-1]ᵀ, b = A[-1]).
    `rtol` None is the running torch's default cut-off (SN-Netv2's, on torch 2.x)."""
    Xa = torch.ones(X.shape[0], X.shape[1] + 1)
    Xa[:, :-1] = X
    pinv = torch.linalg.pinv(Xa) if rtol is None else torch.linalg.pinv(Xa, rtol=rtol)
    A = torch.matmul(pinv, Y).T
    return A[..., :-1], A[..., -1]


def _snnet_position_order(model: SNNet) -> dict[tuple[int, ...], list[tuple[int, int]]]:
    """Per layer, its positions (j, k) in the order SN-Net averaged them: a Python set filled with the first stitch of
    every route in cfg_id order (keyed by the layer id alone for plain ViTs, where SN-Net shared one set between
    anchor pairs), iterated. The order only matters bitwise, through the floating-point sum of >= 3 solutions."""
    key = (lambda a: tuple(a)) if model.plan.hierarchical else (lambda a: a[-1])
    sets: dict = {}
    for route in model.plan.routes:
        if route.stitches:
            sets.setdefault(key(route.stitches[0].layer), set()).add(route.stitches[0].position)
    out = {}
    for address, positions in _layer_positions(model).items():
        own = [st.position for st in positions]
        order = [p for p in sets.get(key(address), ()) if p in own]
        out[address] = order + [p for p in own if p not in order]
    return out


def _snnet_groups(model: SNNet) -> list[tuple[tuple[int, ...], list[tuple[int, ...]]]]:
    """(anchors run together, the layers fitted on their features). SN-Net ran every anchor once for the
    hierarchical families, but both anchors of each pair again for plain ViTs (drop-path draws anew)."""
    addresses = [spec.address for spec in model.plan.layers]
    if model.plan.hierarchical:
        return [(tuple(range(model.n_anchors)), addresses)]
    pairs = list(dict.fromkeys((spec.front, spec.end) for spec in model.plan.layers))
    return [(p, [s.address for s in model.plan.layers if (s.front, s.end) == p]) for p in pairs]


def _last_block(model: SNNet, anchor: int) -> int:
    return max(i for i, u in enumerate(model.units[anchor]) if u.kind == "block")


@torch.no_grad()
def ls_init_snnet(model: SNNet, images: torch.Tensor, snnet_version: int = 1,
                  amp_dtype: torch.dtype | None = None) -> list[FitReport]:
    """SN-Net's least-squares init on one batch `images` (docs/snnet_compat.md, C11-C13): the model in train mode,
    each anchor through all its blocks, per position `ps_inv` in float32 on CPU, the layer set to the mean of the
    positions' W and b. Under DDP rank 0's layers and BatchNorm buffers are broadcast (what SN-Net's DDP
    construction kept). Returns a report per layer (relative error on the fitting rows).

    ``snnet_version=2``: SN-Netv2's init (C36): every anchor run once, in eval mode, under autocast in `amp_dtype`
    (None: no autocast), ``pinv`` with torch's default cut-off."""
    if snnet_version not in (1, 2):
        raise ValueError(f"snnet_version {snnet_version!r} must be 1 (SN-Net) or 2 (SN-Netv2)")
    v2 = snnet_version == 2
    layer_pos, order = _layer_positions(model), _snnet_position_order(model)
    reports = []
    groups = [(tuple(range(model.n_anchors)), [spec.address for spec in model.plan.layers])] if v2 else \
        _snnet_groups(model)
    mode = eval_mode if v2 else _train_mode
    autocast = torch.autocast(images.device.type, dtype=amp_dtype) if v2 and amp_dtype is not None else \
        contextlib.nullcontext()
    rtol = None if v2 else SNNET_PINV_RTOL
    progress = Progress("LS init: layer group", len(groups), every=1, unit=None)
    for anchors, addresses in groups:
        by_pos = {(a, st.position): st for a in addresses for st in layer_pos[a]}
        need, where = model.feature_points(list(by_pos.values()))
        points = {a: need.get(a, set()) | {_last_block(model, a)} for a in anchors}
        with mode(model), autocast:
            feats = model.capture(images, points)
        rows = {}
        for address in addresses:
            if not layer_pos[address]:
                continue
            pairs = []
            for pos in order[address]:
                st = by_pos[(address, pos)]
                for point in where[_key(st)]:
                    if point not in rows:
                        layout = model.adapters[point[0]].stage_layout(model.anchors[point[0]], st.stage)
                        rows[point] = to_rows(feats[point].detach().cpu(), layout).float()
                (px, py) = where[_key(st)]
                _check_rows(model, st, rows[px], rows[py])
                pairs.append((rows[px], rows[py]))
            solved = [ps_inv(X, Y, rtol) for X, Y in pairs]
            W, b = torch.stack([w for w, _ in solved]).mean(dim=0), torch.stack([c for _, c in solved]).mean(dim=0)
            model.stitch_layer(address).set_affine(W, b)
            reports.append(FitReport(address, [st.position for st in layer_pos[address]],
                                     sum(X.shape[0] for X, _ in pairs), _rel_error(W, b, pairs)))
        del feats, rows
        progress.advance(extra=f"anchors {', '.join(model.names[a] for a in anchors)}")
    _broadcast_rank0_state(model)
    return reports


def _rel_error(W: torch.Tensor, b: torch.Tensor, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    sse = sum(float(((X.double() @ W.double().T + b.double()) - Y.double()).square().sum()) for X, Y in pairs)
    return (sse / max(sum(float(Y.double().square().sum()) for _, Y in pairs), 1e-300)) ** 0.5


def _broadcast_rank0_state(model: SNNet) -> None:
    """Under DDP: rank 0's stitching layers and BatchNorm buffers on every rank (what SN-Net's DDP construction
    kept)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    for p in model.stitch_layers.parameters():
        dist.broadcast(p.data, src=0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for buf in m.buffers(recurse=False):
                dist.broadcast(buf, src=0)


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
