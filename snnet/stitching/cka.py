"""Unbiased minibatch linear CKA (centered kernel alignment) between sets of features of the same samples, in
float64.

Samples are rows: X is (n, p), Y is (n, q); what a row is (an image, flattened) is the caller's choice.
`MinibatchCKA` is the estimator of Nguyen, Raghu & Kornblith (2021) for streaming over minibatches. On each
minibatch of n >= 4 rows, K = X Xᵀ and L = Y Yᵀ with zeroed diagonals (K̃, L̃) give the unbiased HSIC

    HSIC₁(K, L) = [tr(K̃ L̃) + (1ᵀK̃1)(1ᵀL̃1) / ((n-1)(n-2)) - 2/(n-2) · 1ᵀK̃L̃1] / (n(n-3));

HSIC₁(K, L), HSIC₁(K, K) and HSIC₁(L, L) are averaged over the minibatches, and
``CKA = mean HSIC₁(K, L) / sqrt(mean HSIC₁(K, K) · mean HSIC₁(L, L))``. Unbiased: independent features give about 0
(it can be slightly negative), where the biased full-batch estimator gives a positive value that shrinks only with n.
HSIC₁ is unchanged by a shift of the features (no centring is needed), and CKA by an orthogonal map and an isotropic
scale of either side.

`MinibatchCKA` holds many feature sets at once and scores every pair of them from per-batch Gram statistics, so
an all-pairs map costs one n x n Gram matrix per feature set per batch, not one per pair.
"""
from __future__ import annotations

import math
from collections.abc import Hashable, Iterable

import torch


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(n, ...) -> (n, features) float64."""
    return x.reshape(x.shape[0], -1).double()


def gram(x: torch.Tensor) -> torch.Tensor:
    """Linear-kernel Gram matrix X Xᵀ (float64) of one minibatch, rows flattened."""
    X = _rows(x)
    return X @ X.T


class _HsicTerms:
    """What HSIC₁ needs of one Gram matrix: K̃ (zero diagonal), its row sums and its total."""

    def __init__(self, K: torch.Tensor):
        n = K.shape[0]
        if n < 4:
            raise ValueError(f"the unbiased HSIC needs minibatches of at least 4 samples, got {n}")
        self.n = n
        self.Kt = K.double().clone()
        self.Kt.fill_diagonal_(0)
        self.rows = self.Kt.sum(1)
        self.total = self.rows.sum()

    def hsic(self, other: _HsicTerms) -> torch.Tensor:
        n = self.n
        trace = (self.Kt * other.Kt).sum()
        return (trace + self.total * other.total / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (self.rows @ other.rows)) \
            / (n * (n - 3))


class MinibatchCKA:
    """Unbiased minibatch CKA between named feature sets, streamed over minibatches.

    ``add({key: features (n, ...)}, pairs)`` per minibatch (every key of a pair present, n >= 4); `cka(a, b)` for
    any pair added. The self terms HSIC₁(K, K) are accumulated for every key seen.
    """

    def __init__(self) -> None:
        self.cross: dict[tuple[Hashable, Hashable], float] = {}
        self.self_: dict[Hashable, float] = {}
        self.batches: dict[Hashable, int] = {}
        self.pair_batches: dict[tuple[Hashable, Hashable], int] = {}

    def add(self, features: dict[Hashable, torch.Tensor], pairs: Iterable[tuple[Hashable, Hashable]]) -> None:
        terms = {k: _HsicTerms(gram(v)) for k, v in features.items()}
        for k, t in terms.items():
            self.self_[k] = self.self_.get(k, 0.0) + float(t.hsic(t))
            self.batches[k] = self.batches.get(k, 0) + 1
        for a, b in pairs:
            self.cross[(a, b)] = self.cross.get((a, b), 0.0) + float(terms[a].hsic(terms[b]))
            self.pair_batches[(a, b)] = self.pair_batches.get((a, b), 0) + 1

    def cka(self, a: Hashable, b: Hashable) -> float:
        """mean HSIC₁(a, b) / sqrt(mean HSIC₁(a, a) · mean HSIC₁(b, b)); 0 when a side has no variance."""
        if (a, b) not in self.cross:
            if (b, a) not in self.cross:
                raise KeyError(f"no minibatch was added for the pair {(a, b)!r}")
            a, b = b, a
        xy = self.cross[(a, b)] / self.pair_batches[(a, b)]
        xx, yy = self.self_[a] / self.batches[a], self.self_[b] / self.batches[b]
        return xy / math.sqrt(xx * yy) if xx > 0 and yy > 0 else 0.0

