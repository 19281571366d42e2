"""Datasets and loaders through timm; checks that turn a wrong data folder into a one-line error."""
from __future__ import annotations

import argparse
import os
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

_TRAIN_NAMES = ("train", "training")
_VAL_NAMES = ("validation", "val", "valid", "eval", "evaluation")
IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """A dataset that cannot be used; the message names the folder and the fix."""


def _split_dir(root: str, split: str, synonyms: tuple[str, ...]) -> str | None:
    for name in (split, *[s for s in synonyms if s != split]):
        path = os.path.join(root, name)
        if os.path.isdir(path):
            return path
    return None


def _check_image_folder(path: str, what: str) -> None:
    classes = [d for d in sorted(os.listdir(path)) if os.path.isdir(os.path.join(path, d))]
    if not classes:
        raise DataError(f"{what} folder {path!r} has no class sub-folders; lay it out as {path}/<class>/<image>")
    for c in classes:
        for _, _, files in os.walk(os.path.join(path, c)):
            if any(f.lower().endswith(IMG_EXTENSIONS) for f in files):
                return
    raise DataError(f"{what} folder {path!r} has class folders but no images ({', '.join(IMG_EXTENSIONS)})")


def resolve_folders(args: argparse.Namespace, need_train: bool) -> tuple[str | None, str | None]:
    """The train and validation folders of a folder dataset (``--dataset ''``), checked."""
    root = args.data_dir
    if os.path.isfile(root):
        raise DataError(f"data folder {root!r} is a file; give the dataset root folder (with train/ and val/)")
    if not os.path.isdir(root):
        raise DataError(f"data folder {root!r} does not exist; give the dataset root (with train/ and val/)")
    if not os.listdir(root):
        raise DataError(f"data folder {root!r} is empty; it needs train/ and val/ (or validation/) class folders")
    train = _split_dir(root, args.train_split, _TRAIN_NAMES)
    val = _split_dir(root, args.val_split, _VAL_NAMES)
    if need_train and train is None:
        raise DataError(f"data folder {root!r} has no {args.train_split}/ folder; lay it out as "
                        f"{root}/train/<class>/<image> and {root}/val/<class>/<image>")
    if not need_train and val is None:
        raise DataError(f"data folder {root!r} has no validation/ or val/ folder to evaluate on")
    for path, what in ((train, "train"), (val, "validation")):
        if path is not None:
            _check_image_folder(path, what)
    return train, val


def create_datasets(args: argparse.Namespace, need_train: bool):
    from timm.data import create_dataset
    if args.dataset == "":
        train_dir, val_dir = resolve_folders(args, need_train)
        make = lambda path, training: create_dataset("", root=path, split="", search_split=False,
                                                     class_map=args.class_map, is_training=training)
        train = make(train_dir, True) if (need_train and train_dir) else None
        val = make(val_dir, False) if val_dir else None
    else:
        kw = dict(root=args.data_dir, class_map=args.class_map, download=args.dataset_download,
                  batch_size=args.batch_size, seed=args.seed)
        train = create_dataset(args.dataset, split=args.train_split, is_training=True, **kw) if need_train else None
        try:
            val = create_dataset(args.dataset, split=args.val_split, is_training=False, **kw)
        except Exception:
            val = None
    for ds, what in ((train, "train"), (val, "validation")):
        if ds is not None and len(ds) == 0:
            raise DataError(f"the {what} split of {args.data_dir!r} has no samples")
    return train, val


def num_classes_of(dataset) -> int | None:
    reader = getattr(dataset, "reader", None)
    mapping = getattr(reader, "class_to_idx", None)
    return len(mapping) if mapping else None


def create_train_loader(dataset, args: argparse.Namespace, data_cfg: dict[str, Any], device: torch.device,
                        collate_fn=None):
    from timm.data import create_loader
    num_aug_splits = args.aug_splits if args.aug_splits > 1 else 0
    return create_loader(
        dataset, input_size=data_cfg["input_size"], batch_size=args.batch_size, is_training=True,
        no_aug=args.no_aug, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount,
        re_split=args.resplit, scale=args.scale, ratio=args.ratio, hflip=args.hflip, vflip=args.vflip,
        color_jitter=args.color_jitter, auto_augment=args.aa, num_aug_repeats=int(args.aug_repeats),
        num_aug_splits=num_aug_splits, interpolation=args.train_interpolation, mean=data_cfg["mean"],
        std=data_cfg["std"], num_workers=args.workers, distributed=args.distributed, collate_fn=collate_fn,
        pin_memory=args.pin_mem, device=device, use_prefetcher=not args.no_prefetcher,
        # fresh workers each epoch, seeded from the per-epoch RNG state: a resumed run augments identically
        persistent_workers=False)


def eval_transform(data_cfg: dict[str, Any]):
    from timm.data import create_transform
    return create_transform(data_cfg["input_size"], is_training=False, interpolation=data_cfg["interpolation"],
                            mean=data_cfg["mean"], std=data_cfg["std"], crop_pct=data_cfg["crop_pct"],
                            crop_mode=data_cfg.get("crop_mode", "center"))


class _StrictImages(torch.utils.data.Dataset):
    """Evaluation reads every image or stops, naming the file: timm's datasets skip an unreadable image and
    substitute the next one, which is fine for training (the warning names the file) but would make the counts of
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
        except RuntimeError as e:
            if "consecutive samples" not in str(e):
                raise
            name = self.dataset.filename(index, absolute=True) if hasattr(self.dataset, "filename") else index
            raise DataError(f"image {str(name)!r} cannot be read; remove or replace it (evaluation does not skip "
                            f"images, so that every count is exact)") from None


class _Shard(Subset):
    """Every world_size-th sample from `rank`: disjoint shards with no padding, so reduced counts are exact."""

    def __init__(self, dataset, rank: int, world_size: int):
        super().__init__(dataset, list(range(rank, len(dataset), world_size)))


def create_eval_loader(dataset, args: argparse.Namespace, data_cfg: dict[str, Any], rank: int = 0,
                       world_size: int = 1, batch_size: int | None = None) -> DataLoader:
    import copy
    dataset = copy.copy(dataset)
    dataset.transform = eval_transform(data_cfg)
    return DataLoader(_Shard(_StrictImages(dataset), rank, world_size), batch_size=batch_size or args.validation_batch_size
                      or args.batch_size, shuffle=False, num_workers=args.workers, pin_memory=args.pin_mem,
                      drop_last=False, persistent_workers=False)


def clean_images(dataset, data_cfg: dict[str, Any], count: int, seed: int, rank: int = 0,
                 world_size: int = 1, batch_size: int = 50):
    """`count` images drawn at random (seeded) from `dataset` with the evaluation transform, this rank's share.

    The least-squares init fits on these: no mixup, no erasing, no random crops (SN-Net used an augmented
    training batch: docs/snnet_compat.md, C12).
    """
    import copy
    base = copy.copy(dataset)  # same samples, its own transform
    base.transform = eval_transform(data_cfg)
    order = np.random.default_rng(seed).permutation(len(base))[:count]
    mine = [int(i) for i in order[rank::world_size]]
    loader = DataLoader(Subset(base, mine), batch_size=batch_size, shuffle=False, num_workers=0)
    for images, _ in loader:
        yield images
