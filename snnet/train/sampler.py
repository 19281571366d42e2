"""Which stitch each process trains at each step: an explicit, seeded object instead of SN-Net's hidden
``np.random.randint`` inside ``forward`` (docs/snnet_compat.md, C15).

The draw for (seed, rank, step) is a pure function of those numbers, so a rerun or a resumed run draws the same
stitches, and a process needs no RNG state to continue from a checkpoint.

Sampler types are registered by name (`register_sampler`) and chosen by the stitch config's
``"sampler": {"type": NAME, ...options}`` (default ``uniform``, SN-Net's). A type is called with the global step
and returns a cfg_id; `create_sampler` builds it with ``cls.for_network(net, seed, rank, sync, ids=..., **options)``,
where ``ids`` are the cfg_ids it may draw (None: all of them). The stitch config's ``"train_exclude"`` removes routes
from ``ids`` before the sampler sees them, so a FLOPs-bucket sampler bins only the routes that train (SN-Netv2 never
trained or binned its id 13); evaluation still covers every route.
"""
from __future__ import annotations

import inspect
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from snnet.results.select import model_img_size
from snnet.stitching.config import ConfigError, StitchConfig
from snnet.stitching.cost import cost_table
from snnet.stitching.steps import UnitStep

_SAMPLERS: dict[str, type] = {}


def register_sampler(name: str):
    """Class decorator: make a sampler type available to configs as ``{"type": name}``."""
    def add(cls: type) -> type:
        _SAMPLERS[name] = cls
        return cls
    return add


def train_ids(num_configs: int, train_exclude: Sequence[int] = ()) -> list[int] | None:
    """The cfg_ids a sampler may draw: all but `train_exclude` (None when nothing is excluded). Refuses ids the network
    does not have, and excluding every route."""
    if not train_exclude:
        return None
    bad = sorted(c for c in set(train_exclude) if not (isinstance(c, int) and 0 <= c < num_configs))
    if bad:
        raise ValueError(f"train_exclude {bad} names cfg_ids this network does not have (0..{num_configs - 1}); "
                         f"remove them")
    ids = [c for c in range(num_configs) if c not in set(train_exclude)]
    if not ids:
        raise ValueError(f"train_exclude leaves no route to train ({num_configs} excluded); remove some")
    return ids


def create_sampler(spec: dict[str, Any] | None, net, seed: int, rank: int, sync: bool = False,
                   exclude: Sequence[int] = (), train_exclude: Sequence[int] = ()):
    """The sampler `spec` names (uniform when None) for network `net` (anything with ``num_configs``).

    `train_exclude` (the stitch config's field) are routes that never train: the sampler is built over the other
    cfg_ids only (a bucket sampler bins only those). `exclude` are cfg_ids redrawn when hit (e.g. the anchors, when
    they are frozen and have nothing to train), which keeps the other cfg_ids' relative frequencies."""
    options = dict(spec or {})
    kind = options.pop("type", "uniform")
    if kind not in _SAMPLERS:
        raise ValueError(f"sampler type {kind!r} is not known; use one of {', '.join(sorted(_SAMPLERS))}")
    ids = train_ids(net.num_configs, train_exclude)
    cls: Any = _SAMPLERS[kind]  # a sampler type: its for_network builds it
    if ids is not None and _takes_ids(cls):
        options["ids"] = ids
    elif ids is not None:  # a sampler type without `ids`: excluded routes are redrawn instead
        exclude = sorted(set(exclude) | set(train_exclude))
    sampler = cls.for_network(net, seed=seed, rank=rank, sync=sync, **options)
    return Excluding(sampler, exclude, net.num_configs) if exclude else sampler


def anchor_routes(net) -> list[int]:
    """The cfg_ids whose route is one anchor alone (no stitch): what --freeze-anchors leaves nothing to train on."""
    return [c for c, steps in enumerate(net.routes) if all(isinstance(s, UnitStep) for s in steps)]


def materialise(net) -> None:
    """Real, zero-filled CPU storage for a meta network, so the cost model can trace it (zeros: index buffers stay
    valid). Nothing for a network that has its weights."""
    if any(t.is_meta for t in [*net.parameters(), *net.buffers()]):
        net.to_empty(device="cpu")
        with torch.no_grad():
            for t in [*net.parameters(), *net.buffers()]:
                t.zero_()


def run_sampler(net, stitch_cfg: StitchConfig | None, seed: int, rank: int = 0, sync: bool = False,
                freeze_anchors: bool = False):
    """The sampler a run draws its training routes with: the stitch config's "sampler" (uniform without one) over
    the routes its "train_exclude" leaves, the anchors' own routes redrawn under --freeze-anchors. train.py, its
    checks and its --dry-run build it here, so what the checks refuse is what the run would have refused. A sampler
    that prices routes (FLOPs buckets) traces a meta network's zero-filled copy. A bad spec: ConfigError naming the
    field."""
    spec = stitch_cfg.get("sampler") if stitch_cfg is not None else None
    excluded = sorted(stitch_cfg.get("train_exclude") or []) if stitch_cfg is not None else []
    if (spec or {}).get("type", "uniform") != "uniform":
        materialise(net)
    try:
        return create_sampler(spec, net, seed, rank, sync=sync, exclude=anchor_routes(net) if freeze_anchors else [],
                              train_exclude=excluded)
    except (ValueError, TypeError) as e:  # refused by the checks before any work, with the same message
        raise ConfigError(f"stitch config field 'sampler' {spec!r}: {e}") from None


def _takes_ids(cls: Any) -> bool:
    """Whether a sampler type accepts ``ids`` (the built-in ones do; a type registered elsewhere may not)."""
    params = inspect.signature(cls.for_network).parameters
    return "ids" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()) and \
        "ids" in inspect.signature(cls).parameters


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

    def describe(self) -> dict[str, Any]:
        inner = self.inner.describe() if hasattr(self.inner, "describe") else {"type": type(self.inner).__name__}
        return {**inner, "redrawn": sorted(self.exclude)}


@register_sampler("uniform")
class StitchSampler:
    """Uniform over the cfg_ids (SN-Net's), or over `ids` when given (the routes that train), optionally weighted
    (``weights``: one number per cfg_id of the network)."""

    def __init__(self, num_configs: int, seed: int = 0, rank: int = 0, sync: bool = False,
                 weights: Sequence[float] | None = None, ids: Sequence[int] | None = None):
        if num_configs < 1:
            raise ValueError(f"num_configs {num_configs} must be >= 1")
        self.num_configs, self.seed, self.rank, self.sync = num_configs, seed, rank, sync
        self.ids = None if ids is None else [int(c) for c in ids]
        if weights is not None:
            w = np.asarray(weights, dtype=np.float64)
            if w.shape != (num_configs,) or (w < 0).any() or w.sum() <= 0:
                raise ValueError(f"stitch weights must be {num_configs} non-negative numbers with a positive sum")
            if self.ids is not None:
                w = w[self.ids]
                if w.sum() <= 0:
                    raise ValueError("stitch weights are 0 on every route that trains (train_exclude)")
            self.p = w / w.sum()
        else:
            self.p = None  # uniform over cfg_ids, as SN-Net

    @classmethod
    def for_network(cls, net, seed: int = 0, rank: int = 0, sync: bool = False, **options) -> StitchSampler:
        return cls(net.num_configs, seed, rank, sync, **options)

    def __call__(self, step: int) -> int:
        """cfg_id for global training step `step` on this process (same on every process with ``sync``)."""
        rank = 0 if self.sync else self.rank
        rng = np.random.default_rng([self.seed, rank, step])
        n = self.num_configs if self.ids is None else len(self.ids)
        i = int(rng.integers(n)) if self.p is None else int(rng.choice(n, p=self.p))
        return i if self.ids is None else self.ids[i]

    def describe(self) -> dict[str, Any]:
        """What --dry-run prints about this sampler."""
        return {"type": "uniform" if self.p is None else "weighted",
                "routes": self.num_configs if self.ids is None else len(self.ids)}


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
        if len(self.groups) == 1 and len(set(self.flops.values())) > 1:
            lo, hi = min(self.flops.values()) / 1e9, max(self.flops.values()) / 1e9
            raise ValueError(f"ros option gap {gap!r} GFLOPs puts all {len(self.flops)} routes in one bucket (their "
                             f"FLOPs span {lo:.4g}..{hi:.4g} GFLOPs): that is uniform sampling; use a gap below "
                             f"{hi - lo:.4g}, or the uniform sampler")
        n = len(self.groups)
        if k is None:
            self.p = None
        else:
            w = np.arange(n, dtype=np.float64) / k + 1.0 / n
            self.p = w / w.sum()

    @classmethod
    def for_network(cls, net, seed: int = 0, rank: int = 0, sync: bool = False, gap: float = 1.0,
                    k: float | None = None, img_size: int | Sequence[int] | None = None,
                    ids: Sequence[int] | None = None) -> BucketSampler:
        """Binned by the cost model's FLOPs of each route in `ids` (all routes when None) at the network's input
        size (or `img_size`)."""
        size = model_img_size(net) if img_size is None else img_size
        pair = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        table = cost_table(net, pair, 3)
        ids = range(net.num_configs) if ids is None else ids
        flops = {c: float(table.route_flops(net.routes[c])) for c in ids}
        return cls(flops, seed, rank, sync, gap=gap, k=k)

    def describe(self) -> dict[str, Any]:
        """What --dry-run prints about this sampler: every bucket with its FLOPs range and routes."""
        return {"type": "ros", "gap_gflops": self.gap, "k": self.k, "routes": len(self.flops),
                "buckets": [{"gflops": [round(min(self.flops[c] for c in g) / 1e9, 4),
                                        round(max(self.flops[c] for c in g) / 1e9, 4)],
                             "p": round(1 / len(self.groups) if self.p is None else float(self.p[i]), 6),
                             "cfg_ids": list(g)} for i, g in enumerate(self.groups)]}

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
    state = np.random.SeedSequence([seed, rank, epoch]).generate_state(2)
    random.seed(int(state[0]))
    np.random.seed(int(state[1]))
    torch.manual_seed(int(state[0]) << 32 | int(state[1]))


def rng_state() -> dict[str, Any]:
    """The process's python, numpy and torch (CPU and CUDA) generator states as tensors and numbers, so that a
    recovery checkpoint can hold them without pickled objects."""
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
    random.setstate((state["python_version"], tuple(int(w) for w in state["python"].tolist()),
                     state["python_gauss"]))
    has_gauss, cached = state["numpy_gauss"]
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], int(has_gauss),
                         float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
