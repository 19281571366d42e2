"""Which stitch each process trains at each step: an explicit, seeded object instead of SN-Net's hidden
``np.random.randint`` inside ``forward`` (spec 6.1 item 6).

The draw for (seed, rank, step) is a pure function of those numbers, so a rerun or a resumed run draws the same
stitches, and a process needs no RNG state to continue from a checkpoint.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


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

    def __call__(self, step: int) -> int:
        """cfg_id for global training step `step` on this process (same on every process with ``sync``)."""
        rank = 0 if self.sync else self.rank
        rng = np.random.default_rng([self.seed, rank, step])
        if self.p is None:
            return int(rng.integers(self.num_configs))
        return int(rng.choice(self.num_configs, p=self.p))


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
