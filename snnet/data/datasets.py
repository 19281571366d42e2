"""Datasets: timm's (folders, torchvision, Hugging Face) and WebDataset shards (`snnet.data.shards`), created
from checked folders; where a split's images come from and how many classes it has."""
from __future__ import annotations

import os

import torch
from timm.data import create_dataset

from snnet.data.checks import (
    TRAIN_NAMES,
    VAL_NAMES,
    DataError,
    check_image_folder,
    check_image_headers,
    hf_folder,
    resolve_folders,
    scan_image_folder,
)
from snnet.data.options import DataOptions
from snnet.data.shards import (
    ShardDataset,
    check_shard_out,
    find_split,
    is_shards,
    read_info,
    shard_root,
    write_shards,
)


def create_datasets(args: DataOptions, need_train: bool):

    if is_shards(args.dataset):  # read by snnet.data.shards (exact, resumable), not timm's wds reader
        return _shard_datasets(args, need_train)
    if args.dataset == "":
        train_dir, val_dir = resolve_folders(args, need_train)
        make = lambda path, training: create_dataset("", root=path, split="", search_split=False,
                                                     class_map=args.class_map, is_training=training)
        train = make(train_dir, True) if (need_train and train_dir) else None
        val = make(val_dir, False) if val_dir else None
    else:
        kw = dict(root=args.data_dir, class_map=args.class_map, download=args.dataset_download,
                  batch_size=args.batch_size, seed=args.seed)
        name, val_name = args.dataset, args.dataset
        prefix = args.dataset.partition("/")[0].lower()
        if prefix in ("hfds", "hfids"):  # local files only: the folder --data-dir/NAME, its cache in --data-dir
            folder = hf_folder(args)
            name, val_name = f"{prefix}/{folder}", f"hfds/{folder}"  # evaluation indexed: each image once, its id
            kw["download"] = prefix == "hfids"  # hfids: prepared from the local files, so the split sizes are known
        train = create_dataset(name, split=args.train_split, is_training=True, **kw) if need_train else None
        try:
            val = create_dataset(val_name, split=args.val_split, is_training=False, **kw)
            val.source = f"{val_name.partition('/')[0]}:{val_name.partition('/')[2]} split {args.val_split}"
        except Exception:
            val = None
    for ds, what in ((train, "train"), (val, "validation")):
        if ds is not None and len(ds) == 0:
            raise DataError(f"the {what} split of {args.data_dir!r} has no samples")
    return train, val


def _shard_datasets(args: DataOptions, need_train: bool):
    """(train, val) of ``--dataset wds/NAME`` in --data-dir: `snnet.data.shards.ShardDataset`s (val None when the
    shards have no validation split)."""
    root = shard_root(args.data_dir, args.dataset)
    train = None
    if need_train:
        split = find_split(root, args.train_split, TRAIN_NAMES)
        if split is None:
            raise DataError(f"shard folder {root!r} has no {args.train_split!r} split in its _info.json (it has "
                            f"{', '.join(read_info(root)['splits'])}); pass --train-split")
        train = ShardDataset(split, True, args.seed)
    split = find_split(root, args.val_split, VAL_NAMES)
    return train, ShardDataset(split, False, args.seed) if split is not None else None


def write_folder_shards(folder: str, out: str, shard_size: int, name: str | None = None, clean: bool = False
                        ) -> dict:
    """``snnet shards``: the split folders of an ImageFolder (train/, val/ or validation/), checked as a training run
    checks them, and every image's header (each is decoded as it is packed), written as WebDataset shards
    (`snnet.data.shards.write_shards`) into an empty OUT (or, with `clean`, over an earlier snnet shards output)."""
    check_shard_out(out, clean)
    if not os.path.isdir(folder):
        raise DataError(f"image folder {folder!r} does not exist; give an ImageFolder root with train/ and val/")
    splits = {d: os.path.join(folder, d) for d in (*TRAIN_NAMES, *VAL_NAMES) if os.path.isdir(os.path.join(folder, d))}
    if not splits:
        raise DataError(f"image folder {folder!r} has no train/ or val/ (validation/) folder; lay it out as "
                        f"{folder}/train/<class>/<image>")
    for split, path in splits.items():
        check_image_folder(path, split)
        scan_image_folder(path, split)  # loops, folders reached twice through links: refused as for training
    for split, path in splits.items():  # every image packed: a shard is read whole, so none may fail later
        check_image_headers(path, split)
    return write_shards(splits, out, shard_size, name or os.path.basename(os.path.abspath(folder)), clean)


def _shown_path(path: str) -> str:
    """A path as a results record shows it: relative to the working folder when inside it (a committed result names
    no machine's home), else absolute."""
    path = os.path.abspath(path)
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def data_source(dataset) -> str:
    """Where a split's images come from, for the results record: the shard folder and split, or the image folder."""
    if getattr(dataset, "source", None):
        return dataset.source
    split = getattr(dataset, "split", None)
    if split is not None and hasattr(split, "files"):
        return f"wds:{_shown_path(split.root)} split {split.name} ({len(split.files)} shards)"
    root = getattr(getattr(dataset, "reader", None), "root", None)
    return f"folder:{_shown_path(root)}" if root else type(dataset).__name__


def num_classes_of(dataset) -> int | None:
    if getattr(dataset, "num_classes", None):  # shards: _info.json's count
        return int(dataset.num_classes)
    reader = getattr(dataset, "reader", None)
    mapping = getattr(reader, "class_to_idx", None)
    return len(mapping) if mapping else None


def indexable(dataset):
    """An hfids (streamed) split as the map-style hfds dataset of the same local files, for a random draw."""
    reader = getattr(dataset, "reader", None)
    if isinstance(dataset, torch.utils.data.IterableDataset) and type(reader).__name__ == "ReaderHfids":
        return create_dataset(f"hfds/{reader.name}", root=reader.root, split=reader.split, is_training=False)
    return dataset
