"""Which stitch each process trains at each step: an explicit, seeded object instead of SN-Net's hidden
``np.random.randint`` inside ``forward`` (docs/snnet_compat.md, C15).

The draw for (seed, rank, step) is a pure function of those numbers, so a rerun or a resumed run draws the same
stitches, and a process needs no RNG state to continue from a checkpoint.

Sampler types are registered by name (`register_sampler`) and chosen by the stitch config's
``"sampler": {"type": NAME, ...options}`` (default ``uniform``, SN-Net's). A type is called with the global step
and returns a cfg_id; `create_sampler` builds it with ``cls.for_network(net, seed, rank, sync, **options)``.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np


_SAMPLERS: dict[str, type] = {}


def register_sampler(name: str):
    """Class decorator: make a sampler type available to configs as ``{"type": name}``."""
    def add(cls: type) -> type:
        _SAMPLERS[name] = cls
        return cls
    return add


def create_sampler(spec: dict[str, Any] | None, net, seed: int, rank: int, sync: bool = False,
                   exclude: Sequence[int] = ()):
    """The sampler `spec` names (uniform when None) for network `net` (anything with ``num_configs``), never drawing
    the cfg_ids in `exclude` (e.g. the anchors, when they are frozen and have nothing to train)."""
    options = dict(spec or {})
    kind = options.pop("type", "uniform")
    if kind not in _SAMPLERS:
        raise ValueError(f"sampler type {kind!r} is not known; use one of {', '.join(sorted(_SAMPLERS))}")
    sampler = _SAMPLERS[kind].for_network(net, seed=seed, rank=rank, sync=sync, **options)
    return Excluding(sampler, exclude, net.num_configs) if exclude else sampler


class Excluding:
    """Another sampler's draws without some cfg_ids: a draw that hits one is redrawn from the derived steps
    step + i·2⁴⁰ (i = 1, 2, ...), so the result stays a pure function of (seed, rank, step) and the other cfg_ids
    keep their relative frequencies."""

    def __init__(self, inner, exclude: Sequence[int], num_configs: int):
        self.inner, self.exclude = inner, frozenset(exclude)
        if len(self.exclude) >= num_configs:
            raise ValueError(f"every cfg_id is excluded ({sorted(self.exclude)}); nothing is left to train")

    def __call__(self, step: int) -> int:
        for i in range(10_000):
            cfg_id = self.inner(step + (i << 40))
            if cfg_id not in self.exclude:
                return cfg_id
        raise RuntimeError(f"the sampler drew only excluded cfg_ids {sorted(self.exclude)} in 10000 tries")


@register_sampler("uniform")
class StitchSampler:
    def __init__(self, num_configs: int, seed: int = 0, rank: int = 0, sync: bool = False,
                 weights: Sequence[float] | None = None):
        if num_configs < 1:
            raise ValueError(f"num_configs {num_configs} must be >= 1")
        self.num_configs, self.seed, self.rank, self.sync = num_configs, seed, rank, sync
        if weights is not None:
            w = np.asarray(weights, dtype=np.float64)
            if w.shape != (num_configs,) or (w < 0).any() or w.sum() <= 0:
                raise ValueError(f"stitch weights must be {num_configs} non-negative numbers with a positive sum")
            self.p = w / w.sum()
        else:
            self.p = None  # uniform over cfg_ids, as SN-Net

    @classmethod
    def for_network(cls, net, seed: int = 0, rank: int = 0, sync: bool = False, **options) -> "StitchSampler":
        return cls(net.num_configs, seed, rank, sync, **options)

    def __call__(self, step: int) -> int:
        """cfg_id for global training step `step` on this process (same on every process with ``sync``)."""
        rank = 0 if self.sync else self.rank
        rng = np.random.default_rng([self.seed, rank, step])
        if self.p is None:
            return int(rng.integers(self.num_configs))
        return int(rng.choice(self.num_configs, p=self.p))


def flops_groups(flops: dict[int, float], gap_gflops: float = 1.0) -> list[list[int]]:
    """SN-Netv2's FLOPs bins (ROS): cfg_ids by FLOPs ascending (stable); a cfg_id more than `gap_gflops` GFLOPs from
    the first FLOPs of the current group starts a new group (the first group's reference is 0). Ids sorted within."""
    if not gap_gflops > 0:
        raise ValueError(f"gap {gap_gflops!r} must be > 0 (GFLOPs)")
    groups: list[list[int]] = []
    current: list[int] = []
    ref = 0.0
    for cfg_id in sorted(flops, key=lambda c: flops[c]):
        g = flops[cfg_id] / 1e9
        if abs(g - ref) > gap_gflops:
            if current:
                groups.append(sorted(current))
            current, ref = [cfg_id], g
        else:
            current.append(cfg_id)
    if current:
        groups.append(sorted(current))
    return groups


@register_sampler("ros")
class BucketSampler:
    """SN-Netv2's resource-constrained sampling: routes binned by FLOPs (`flops_groups`, option ``gap`` in GFLOPs),
    a group drawn uniformly, or with option ``k`` with p_i proportional to i/k + 1/G (i: group index, ascending
    FLOPs), then a cfg_id uniformly within it. Each draw is a pure function of (seed, rank or 0 with sync, step)."""

    def __init__(self, flops: dict[int, float], seed: int = 0, rank: int = 0, sync: bool = False,
                 gap: float = 1.0, k: float | None = None):
        if isinstance(gap, bool) or not isinstance(gap, (int, float)) or not gap > 0:
            raise ValueError(f"ros option gap {gap!r} must be a number > 0 (GFLOPs)")
        if k is not None and (isinstance(k, bool) or not isinstance(k, (int, float)) or not k > 0):
            raise ValueError(f"ros option k {k!r} must be a number > 0")
        if not flops:
            raise ValueError("ros sampler needs at least one route")
        self.seed, self.rank, self.sync, self.gap, self.k = seed, rank, sync, float(gap), k
        self.flops = dict(flops)
        self.groups = flops_groups(self.flops, self.gap)
        n = len(self.groups)
        if k is None:
            self.p = None
        else:
            w = np.arange(n, dtype=np.float64) / k + 1.0 / n
            self.p = w / w.sum()

    @classmethod
    def for_network(cls, net, seed: int = 0, rank: int = 0, sync: bool = False, gap: float = 1.0,
                    k: float | None = None, img_size: int | Sequence[int] | None = None) -> "BucketSampler":
        from snnet.core.cost import cost_table
        from snnet.results.select import model_img_size
        size = model_img_size(net) if img_size is None else img_size
        size = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
        table = cost_table(net, size, 3)
        flops = {c: float(table.route_flops(steps)) for c, steps in enumerate(net.routes)}
        return cls(flops, seed, rank, sync, gap=gap, k=k)

    def __call__(self, step: int) -> int:
        """cfg_id for global training step `step` on this process (same on every process with ``sync``)."""
        rank = 0 if self.sync else self.rank
        rng = np.random.default_rng([self.seed, rank, step])
        n = len(self.groups)
        g = int(rng.integers(n)) if self.p is None else int(rng.choice(n, p=self.p))
        group = self.groups[g]
        return group[int(rng.integers(len(group)))]


def seed_epoch(seed: int, rank: int, epoch: int) -> None:
    """Seed python, numpy and torch from (seed, rank, epoch) at the start of every epoch.

    All randomness of an epoch (data order, augmentation, loader worker seeds, mixup, drop-path, random erasing)
    then depends only on these three numbers, so a run resumed from an epoch checkpoint replays the rest exactly.
    """
    import random

    import torch
    state = np.random.SeedSequence([seed, rank, epoch]).generate_state(2)
    random.seed(int(state[0]))
    np.random.seed(int(state[1]))
    torch.manual_seed(int(state[0]) << 32 | int(state[1]))


def rng_state() -> dict[str, Any]:
    """The process's python, numpy and torch (CPU and CUDA) generator states as tensors and numbers, so that a
    recovery checkpoint can hold them without pickled objects."""
    import random

    import torch
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": torch.tensor(words, dtype=torch.int64), "python_version": version,
             "python_gauss": gauss, "numpy": torch.from_numpy(keys.astype(np.int64)),
             "numpy_pos": int(pos), "numpy_gauss": [int(has_gauss), float(cached)], "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `rng_state`."""
    import random

    import torch
    random.setstate((state["python_version"], tuple(int(w) for w in state["python"].tolist()),
                     state["python_gauss"]))
    has_gauss, cached = state["numpy_gauss"]
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], int(has_gauss),
                         float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
