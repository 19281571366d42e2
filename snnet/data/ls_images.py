"""The least-squares init's images: a seeded random draw of a split with the evaluation transform, this rank's
share (no augmentation)."""
from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
from timm.data import ImageDataset
from torch.utils.data import DataLoader, Subset

from snnet.data.datasets import ShardDataset, indexable
from snnet.data.loaders import NamedSkips
from snnet.data.transforms import eval_transform


class CleanImages:
    """Batches of images drawn at random (seeded) from a dataset with the evaluation transform, this rank's share.
    With a sequence of data configs each batch is a list of tensors, one per config, of the same images.

    ``count`` is the number actually drawn over all processes: the requested number, or the whole split when it is
    smaller (log this one, not the request); ``local_count`` is this process's share, ``requested`` the request.
    """
    def __init__(self, dataset, data_cfg: dict[str, Any] | Sequence[dict[str, Any]], count: int, seed: int,
                 rank: int = 0, world_size: int = 1, batch_size: int = 50):
        dataset = indexable(dataset)
        order = np.random.default_rng(seed).permutation(len(dataset))[:count]
        self.indices = [int(i) for i in order[rank::world_size]]
        if isinstance(dataset, ShardDataset):  # the same images as the folder's, read once from their shards
            self.base, self.indices = dataset.subset(self.indices), list(range(len(self.indices)))
        elif isinstance(dataset, ImageDataset):  # its own transform; an unreadable image skipped as training does
            self.base = NamedSkips(dataset)
        else:
            self.base = copy.copy(dataset)  # same samples, its own transform
        self.base.transform = eval_transform(data_cfg)
        self.requested, self.count, self.local_count = count, len(order), len(self.indices)
        self.batch_size = batch_size

    def __len__(self) -> int:
        """Batches this process yields (the LS init's progress line counts them)."""
        return -(-self.local_count // self.batch_size)

    def __iter__(self):
        loader = DataLoader(Subset(self.base, self.indices), batch_size=self.batch_size, shuffle=False, num_workers=0)
        for images, _ in loader:
            yield images


def clean_images(dataset, data_cfg: dict[str, Any] | Sequence[dict[str, Any]], count: int, seed: int,
                 rank: int = 0, world_size: int = 1, batch_size: int = 50) -> CleanImages:
    """`count` images (or all, if the split has fewer) drawn at random (seeded) from `dataset` with the evaluation
    transform, this rank's share: an iterable of batches whose ``.count`` is the true number over all processes.
    `data_cfg`: one config (each batch a tensor) or a sequence of them (each batch a list of tensors, one per config,
    of the same images: `anchor_data_configs`).

    The least-squares init fits on these: no mixup, no erasing, no random crops (SN-Net used an augmented
    training batch: docs/snnet_compat.md, C12).
    """
    return CleanImages(dataset, data_cfg, count, seed, rank, world_size, batch_size)
