"""Loaders: timm's training loader (a skipped unreadable image is named) and the exact evaluation loader (every
image once, this rank's disjoint share, an unreadable image stops it)."""
from __future__ import annotations

import copy
import logging
import re
import threading
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from timm.data import ImageDataset, create_loader
from torch.utils.data import DataLoader

from snnet.data.checks import DataError
from snnet.data.datasets import ShardDataset
from snnet.data.options import LoaderOptions
from snnet.data.shards import image_problem
from snnet.data.transforms import eval_transform, src_crop, timm_crop_mode
from snnet.utils.distributed import usable_cores, world

_logger = logging.getLogger(__name__)


_SKIP = threading.local()

#: timm's -j/--workers default, used where the machine has that many cores
TIMM_WORKERS = 4


def default_workers() -> tuple[int, str | None]:
    """-j/--workers when not given: timm's 4, at most the usable cores (more only oversubscribe them, and torch warns
    once per loader), and the one line saying what was chosen when that is fewer than timm's."""
    cores = usable_cores()
    if cores >= TIMM_WORKERS:
        return TIMM_WORKERS, None
    return cores, (f"data loader: {cores} worker process(es) per training process, not timm's {TIMM_WORKERS}: this "
                   f"machine has {cores} usable core(s); -j N sets the number")


_TIMM_SKIP = re.compile(r"^Skipped sample \(index \d+\)\. (.*)$", re.S)


class _HoldTimmSkip(logging.Filter):
    """While `NamedSkips` loads an image, timm's "Skipped sample (index N). <reason>" warning (which for a truncated
    image does not name the file) is held back and its reason kept, for the one line that names the file."""
    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(_SKIP, "active", False):
            return True
        m = _TIMM_SKIP.match(record.getMessage())
        if m is None:
            return True
        _SKIP.reason = m.group(1)
        return False


_HOLD = _HoldTimmSkip()


class NamedSkips(torch.utils.data.Dataset):
    """A training dataset whose skipped (unreadable) images are named: timm's ImageDataset skips an image it cannot
    decode and uses the next one, logging only the index for a truncated file. This reproduces timm's retry rule
    exactly (next index, up to the dataset's retry limit, then timm's error), so the same images are used, and logs
    one warning with the file's path per skipped image."""
    def __init__(self, dataset):
        self.retries = max(1, int(getattr(dataset, "_max_retries", 1)))
        self.dataset = copy.copy(dataset)  # its own retry limit and transform; the caller's dataset is untouched
        self.dataset._max_retries = 1

    @property
    def transform(self):
        return self.dataset.transform

    @transform.setter
    def transform(self, value) -> None:  # timm's create_loader sets it
        self.dataset.transform = value

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("dataset", "retries"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __len__(self) -> int:
        return len(self.dataset)

    def _name(self, index: int) -> str:
        try:
            return str(self.dataset.filename(index, absolute=True))
        except Exception:
            return f"index {index}"

    def __getitem__(self, index: int):
        timm_logger = logging.getLogger("timm.data.dataset")
        if _HOLD not in timm_logger.filters:  # also in spawned loader workers
            timm_logger.addFilter(_HOLD)
        for _ in range(self.retries):
            _SKIP.active, _SKIP.reason = True, None
            try:
                return self.dataset[index]
            except (RuntimeError, Image.DecompressionBombError) as e:  # timm lets PIL's size limit through
                if isinstance(e, RuntimeError) and "consecutive samples" not in str(e):
                    raise
                reason = _SKIP.reason if isinstance(e, RuntimeError) else image_problem(e)
                _logger.warning(f"warning: skipped training image {self._name(index)!r} ({reason or 'unreadable'}); "
                                f"the next image is used in its place: remove or replace the file")
                index = (index + 1) % len(self.dataset)
            finally:
                _SKIP.active = False
        raise RuntimeError(f"Failed to load {self.retries} consecutive samples")


def create_train_loader(dataset, options: LoaderOptions, data_cfg: dict[str, Any], device: torch.device,
                        collate_fn=None):
    """timm's training loader; a timm ImageDataset is wrapped so that a skipped unreadable image is named."""
    if isinstance(dataset, ImageDataset):
        dataset = NamedSkips(dataset)
    elif isinstance(dataset, ShardDataset):  # this rank's deterministic stream (set_epoch before each epoch)
        dataset = dataset.train_stream(*(world() if options.distributed else (0, 1)), options.batch_size)
    num_aug_splits = options.aug_splits if options.aug_splits > 1 else 0
    loader = create_loader(
        dataset, input_size=data_cfg["input_size"], batch_size=options.batch_size, is_training=True,
        no_aug=options.no_aug, re_prob=options.reprob, re_mode=options.remode, re_count=options.recount,
        re_split=options.resplit, scale=options.scale, ratio=options.ratio, hflip=options.hflip, vflip=options.vflip,
        color_jitter=options.color_jitter, auto_augment=options.aa, num_aug_repeats=int(options.aug_repeats),
        num_aug_splits=num_aug_splits, interpolation=options.train_interpolation, mean=data_cfg["mean"],
        std=data_cfg["std"], num_workers=options.workers, distributed=options.distributed, collate_fn=collate_fn,
        pin_memory=options.pin_mem, device=device, use_prefetcher=not options.no_prefetcher,
        # fresh workers each epoch, seeded from the per-epoch RNG state: a resumed run augments identically
        persistent_workers=False, train_crop_mode=timm_crop_mode(options.train_crop_mode))
    if options.train_crop_mode == "src":
        loader.dataset.transform = src_crop(loader.dataset.transform, data_cfg["input_size"][-1])
    return loader


class StrictImages(torch.utils.data.Dataset):
    """Evaluation reads every image or stops, naming the file: timm's datasets skip an unreadable image and
    substitute the next one, which is fine for training (`NamedSkips` names the file) but would make the counts of
    an evaluation silently wrong."""
    def __init__(self, dataset):
        self.dataset = dataset
        if hasattr(dataset, "_max_retries"):
            dataset._max_retries = 1

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return self.dataset[index]
        except (RuntimeError, Image.DecompressionBombError) as e:  # timm lets PIL's size limit through
            if isinstance(e, RuntimeError) and "consecutive samples" not in str(e):
                raise
            name = self.dataset.filename(index, absolute=True) if hasattr(self.dataset, "filename") else index
            why = f" ({image_problem(e)})" if isinstance(e, Image.DecompressionBombError) else ""
            raise DataError(f"image {str(name)!r} cannot be read{why}; remove or replace it (evaluation does not skip "
                            f"images, so that every count is exact)") from None


class _Shard(torch.utils.data.Dataset):
    """Every world_size-th sample from `rank`: disjoint shards with no padding, so reduced counts are exact. Each
    sample is (image, label, index): the index is the image's place in the whole split (the id of its per-image
    prediction, whatever the number of ranks)."""
    def __init__(self, dataset, rank: int, world_size: int):
        self.dataset, self.indices = dataset, list(range(rank, len(dataset), world_size))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = self.indices[i]
        image, label = self.dataset[index]
        return image, label, index


def create_eval_loader(dataset, options: LoaderOptions, data_cfg: dict[str, Any] | Sequence[dict[str, Any]],
                       rank: int = 0, world_size: int = 1, batch_size: int | None = None) -> DataLoader:
    """The evaluation loader: batches (images, labels, sample ids), in order, this rank's disjoint shard; a sample id
    is the image's index in the whole split. With a sequence of
    data configs (`anchor_data_configs`' distinct ones) the images of a batch are a list of tensors, one per
    config, of the same images."""
    batch_size = batch_size or options.validation_batch_size or options.batch_size
    if isinstance(dataset, ShardDataset):  # this rank's contiguous range of the shards, whole batches per worker
        stream = dataset.eval_stream(rank, world_size, batch_size)
        stream.transform = eval_transform(data_cfg)
        return DataLoader(stream, batch_size=batch_size, num_workers=options.workers, pin_memory=options.pin_mem,
                          drop_last=False, persistent_workers=False)
    dataset = copy.copy(dataset)
    dataset.transform = eval_transform(data_cfg)
    return DataLoader(_Shard(StrictImages(dataset), rank, world_size), batch_size=batch_size, shuffle=False,
                      num_workers=options.workers, pin_memory=options.pin_mem, drop_last=False,
                      persistent_workers=False)
