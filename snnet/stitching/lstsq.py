"""The one least-squares core: float64 normal equations of affine maps ``[X | 1] A ≈ Y``, streamed over batches and
summed over DDP ranks, solved once, with the residual of *any* map computed from the same statistics.

Every least-squares fit of the library goes through `NormalEquations`: the least-squares init of SN-Net's stitching
layers (joint or SN-Net's per-position average, `snnet.stitching.ls_init`), the compatibility maps' stitches
(`snnet.stitching.maps`) and stitch-train's layers. A *feature point* (`xkey`) names the input rows X; a *target*
(`ykey`) names the rows Y fitted from one feature point. Many targets may read one feature point: its
``[X|1]ᵀ[X|1]`` is accumulated once per batch.

The relative error of a map A is ``sqrt(|[X|1]A - Y|² / |Y|²)`` with ``|[X|1]A - Y|² = AᵀGA - 2AᵀR + YᵀY`` — exact for
any A, so a layer that cannot hold the least-squares solution itself (a low-rank layer keeps a truncated SVD) reports
the error of the map it actually holds (`affine_of`).
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from snnet.utils.distributed import all_reduce_sum


def augmented(X: torch.Tensor) -> torch.Tensor:
    """``[X | 1]`` in float64."""
    X = X.double()
    return torch.cat([X, X.new_ones(X.shape[0], 1)], dim=1)


def solve(G: torch.Tensor, R: torch.Tensor, rcond: float | None) -> torch.Tensor:
    """Minimum-norm least-squares solution of the normal equations G A = R (float64, CPU). `rcond`: directions of G
    below this fraction of its largest eigenvalue are left out (None: LAPACK's machine-precision default)."""
    return torch.linalg.lstsq(G.double().cpu(), R.double().cpu(), rcond=rcond, driver="gelsy").solution


def as_affine(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A solution A ((C_in + 1) x C_out, bias last row) as the layer's (W (out, in), b (out,))."""
    return A[:-1].T.contiguous(), A[-1]


def from_affine(W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(W (out, in), b (out,)) as a solution matrix A ((in + 1) x out), float64."""
    return torch.cat([W.double().reshape(b.shape[0], -1).T, b.double()[None]], dim=0)


def affine_of(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The affine map (W, b) a stitching layer computes now, if its type says (``affine()``); else None."""
    fn = getattr(layer, "affine", None)
    return fn() if callable(fn) else None


@dataclass
class Fit:
    """One solved map: A ((C_in + 1) x C_out), the rows it was fitted on and the statistics to score any map."""
    A: torch.Tensor
    rows: int
    G: torch.Tensor
    R: torch.Tensor
    yy: float

    def sse(self, A: torch.Tensor | None = None) -> float:
        """Sum of squared errors of map A (default: the solution) on the fitting rows."""
        A = (self.A if A is None else A).double().cpu()
        return max(float(torch.trace(A.T @ self.G @ A) - 2 * torch.trace(A.T @ self.R)) + self.yy, 0.0)

    def rel_error(self, A: torch.Tensor | None = None) -> float:
        """||[X|1]A - Y|| / ||Y|| of map A (default: the solution); 0 for an all-zero target."""
        return (self.sse(A) / self.yy) ** 0.5 if self.yy > 0 else 0.0

    def layer_error(self, layer: nn.Module) -> float:
        """The relative error of the map `layer` holds (its ``affine()``; the solution's for a type without one)."""
        wb = affine_of(layer)
        return self.rel_error(None if wb is None else from_affine(*wb))


@dataclass
class NormalEquations:
    """Sufficient statistics of many affine fits: per feature point ``[X|1]ᵀ[X|1]``, per target ``[X|1]ᵀY``, ``YᵀY``
    and the row count, summed over batches (and, with `all_reduce`, over ranks)."""
    gram: dict = field(default_factory=dict)
    cross: dict = field(default_factory=dict)
    yy: dict = field(default_factory=dict)
    rows: dict = field(default_factory=dict)
    _batch: dict = field(default_factory=dict, repr=False)

    def new_batch(self) -> None:
        """Start a batch: each feature point's [X|1] is then augmented and added to its Gram matrix once."""
        self._batch = {}

    def add(self, xkey: Hashable, X: torch.Tensor, ykey: Hashable, Y: torch.Tensor) -> None:
        """Add rows X (feature point `xkey`) and their targets Y (`ykey`); X's Gram matrix is counted once per batch
        however many targets read it. Call `new_batch` before each batch."""
        if X.shape[0] != Y.shape[0]:
            raise ValueError(f"least squares: {X.shape[0]} input rows vs {Y.shape[0]} target rows")
        if xkey not in self._batch:
            Xa = augmented(X)
            self._batch[xkey] = Xa
            self.gram[xkey] = self.gram.get(xkey, 0) + Xa.T @ Xa
        Xa, Y = self._batch[xkey], Y.double()
        self.cross[ykey] = self.cross.get(ykey, 0) + Xa.T @ Y
        self.yy[ykey] = self.yy.get(ykey, 0) + (Y * Y).sum()
        self.rows[ykey] = self.rows.get(ykey, 0) + Xa.shape[0]

    def all_reduce(self) -> None:
        """Sum the statistics over the DDP ranks (every rank must hold the same keys)."""
        for table in (self.gram, self.cross, self.yy):
            for k in sorted(table, key=repr):
                t = table[k]
                t = t.contiguous() if isinstance(t, torch.Tensor) else torch.tensor(float(t), dtype=torch.float64)
                table[k] = all_reduce_sum(t)  # on the backend's device (nccl: CUDA tensors only)

    def fit(self, pairs: Sequence[tuple[Hashable, Hashable]], rcond: float | None = None,
            mode: str = "joint") -> Fit:
        """One map for the (xkey, ykey) pairs: ``joint`` solves all their rows at once (the least-squares optimum of
        one shared map); ``average`` is the mean of the per-pair solutions (SN-Net's way for a shared layer)."""
        grams = [self.gram[x] for x, _ in pairs]
        G = sum(grams).double().cpu()
        R = sum(self.cross[y] for _, y in pairs).double().cpu()
        if mode == "joint":
            A = solve(G, R, rcond)
        elif mode == "average":
            A = torch.stack([solve(g, self.cross[y], rcond) for g, (_, y) in zip(grams, pairs)]).mean(0)
        else:
            raise ValueError(f"least-squares mode {mode!r} is not known; use joint or average")
        yy = float(sum(float(self.yy[y]) for _, y in pairs))
        return Fit(A, sum(int(self.rows[y]) for _, y in pairs), G, R, yy)
