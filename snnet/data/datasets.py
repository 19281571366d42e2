"""Datasets: timm's (folders, torchvision, Hugging Face) and WebDataset shards (`snnet.data.shards`), created
from checked folders; where a split's images come from and how many classes it has."""
from __future__ import annotations

import logging
import os

import torch
from timm.data import create_dataset

from snnet.data.checks import (
    TEST_NAMES,
    TRAIN_NAMES,
    VAL_NAMES,
    DataError,
    check_image_folder,
    check_image_headers,
    first_names,
    hf_folder,
    resolve_folders,
    scan_image_folder,
    split_folder,
)
from snnet.data.options import DATA_ROOT, DataOptions
from snnet.data.shards import (
    ShardDataset,
    check_shard_out,
    find_split,
    is_shards,
    read_info,
    shard_root,
    shards_request,
    write_shards,
)
from snnet.utils.fileio import data_folder, shown_path

_logger = logging.getLogger("snnet")


def create_datasets(data_options: DataOptions, need_train: bool):
    """(train, val) datasets of a run; train None without `need_train`. A validation split that fails to load is a
    DataError naming it (``--val-split ''`` is the explicit choice of none, for timm's non-folder datasets)."""
    if is_shards(data_options.dataset):  # read by snnet.data.shards (exact, resumable), not timm's wds reader
        return _shard_datasets(data_options, need_train)
    if data_options.dataset == "":
        train_dir, val_dir = resolve_folders(data_options, need_train)
        make = lambda path, training: create_dataset("", root=path, split="", search_split=False,
                                                     class_map=data_options.class_map, is_training=training)
        train = make(train_dir, True) if (need_train and train_dir) else None
        val = make(val_dir, False) if val_dir else None
    else:
        kw = dict(root=data_options.data_dir, class_map=data_options.class_map, download=data_options.dataset_download,
                  batch_size=data_options.batch_size, seed=data_options.seed)
        name, val_name = data_options.dataset, data_options.dataset
        prefix = data_options.dataset.partition("/")[0].lower()
        if prefix in ("hfds", "hfids"):  # local files only: the folder --data-dir/NAME, its cache in --data-dir
            folder = hf_folder(data_options)
            name, val_name = f"{prefix}/{folder}", f"hfds/{folder}"  # evaluation indexed: each image once, its id
            kw["download"] = prefix == "hfids"  # hfids: prepared from the local files, so the split sizes are known
        train = create_dataset(name, split=data_options.train_split, is_training=True, **kw) if need_train else None
        val = None
        if not data_options.val_split:  # --val-split '': the user's choice, said (model_best: by training loss)
            _logger.info(f"--val-split '': no validation split of --dataset {data_options.dataset!r}")
        else:
            try:
                val = create_dataset(val_name, split=data_options.val_split, is_training=False, **kw)
            except Exception as e:  # never a silent run without validation
                reason = " ".join(str(e).split())[:160]
                why = type(e).__name__ + (f": {reason}" if reason else "")
                raise DataError(f"the validation split {data_options.val_split!r} of --dataset "
                                f"{data_options.dataset!r} in {data_options.data_dir!r} cannot be loaded ({why}"
                                f"); name the split with --val-split, or pass --val-split '' to train without "
                                f"validation") from None
            val.source = f"{val_name.partition('/')[0]}:{val_name.partition('/')[2]} split {data_options.val_split}"
    for ds, what in ((train, "train"), (val, "validation")):
        if ds is not None and len(ds) == 0:
            raise DataError(f"the {what} split of {data_options.data_dir!r} has no samples")
    return train, val


def _shard_datasets(data_options: DataOptions, need_train: bool):
    """(train, val) of ``--dataset wds/NAME`` in --data-dir: `snnet.data.shards.ShardDataset`s (val None when the
    shards have no validation split)."""
    root = shard_root(data_options.data_dir, data_options.dataset)
    train = None
    if need_train:
        split = find_split(root, data_options.train_split, TRAIN_NAMES)
        if split is None:
            raise DataError(f"shard folder {root!r} has no {data_options.train_split!r} split in its _info.json (it "
                            f"has {', '.join(read_info(root)['splits'])}); pass --train-split")
        train = ShardDataset(split, True, data_options.seed)
    split = find_split(root, data_options.val_split, VAL_NAMES)
    return train, ShardDataset(split, False, data_options.seed) if split is not None else None


def write_folder_shards(folder: str, out: str, shard_size: int, name: str | None = None, clean: bool = False
                        ) -> dict:
    """``snnet shards``: the split folders of an ImageFolder (train/, val/ or validation/), checked as a training run
    checks them, and every image's header (each is decoded as it is packed), written as WebDataset shards
    (`snnet.data.shards.write_shards`) into an empty OUT (or, with `clean`, over an earlier snnet shards output)."""
    data_folder(folder, "image folder", DATA_ROOT, DataError)
    splits = {d: path for d in (*TRAIN_NAMES, *VAL_NAMES, *TEST_NAMES)
              if (path := split_folder(folder, d)) is not None}
    if not splits:
        raise DataError(f"image folder {folder!r} has no train/, val/ (validation/) or test/ folder; lay it out as "
                        f"{folder}/train/<class>/<image>")
    used = {os.path.basename(p) for p in splits.values()}
    if left := [n for n in os.listdir(folder) if n not in used and not n.startswith(".")]:
        names = ", ".join(f"{n}/" for n in (*TRAIN_NAMES, *VAL_NAMES, *TEST_NAMES))
        _logger.warning(f"warning: image folder {folder!r}: {first_names(left)} left out, not a split folder "
                        f"({names}, in any case)")
    name = name or os.path.basename(os.path.abspath(folder))
    if check_shard_out(out, clean, shards_request(splits, shard_size, name)) is None:  # done: nothing to check
        return write_shards(splits, out, shard_size, name, clean)  # (which reads the complete output back)
    for split, path in splits.items():
        check_image_folder(path, split)
        scan_image_folder(path, split)  # loops, folders reached twice through links: refused as for training
    for split, path in splits.items():  # every image packed: a shard is read whole, so none may fail later
        check_image_headers(path, split)
    return write_shards(splits, out, shard_size, name, clean)


def data_source(dataset) -> str:
    """Where a split's images come from, for the results record: the shard folder and split, or the image folder."""
    if getattr(dataset, "source", None):
        return dataset.source
    split = getattr(dataset, "split", None)
    if split is not None and hasattr(split, "files"):
        return f"wds:{shown_path(split.root)} split {split.name} ({len(split.files)} shards)"
    root = getattr(getattr(dataset, "reader", None), "root", None)
    return f"folder:{shown_path(root)}" if root else type(dataset).__name__


def _class_to_idx(dataset) -> dict | None:
    """The dataset's class name -> index map: a shard split's (_info.json's ``classes``), else its timm reader's
    (an ImageFolder's sorted folder names, a Hugging Face dataset's ClassLabel names, or --class-map's)."""
    mapping = getattr(dataset, "class_to_idx", None)
    if not mapping:
        mapping = getattr(getattr(dataset, "reader", None), "class_to_idx", None)
    return dict(mapping) if mapping else None


def num_classes_of(dataset) -> int | None:
    if getattr(dataset, "num_classes", None):  # shards: _info.json's count
        return int(dataset.num_classes)
    mapping = _class_to_idx(dataset)
    return len(mapping) if mapping else None


def class_names_of(dataset) -> list[str] | None:
    """The name of every class index of `dataset`, in index order (index i is ``names[i]``): an ImageFolder's
    folder names (timm sorts them), a Hugging Face dataset's ClassLabel names, a shard folder's _info.json
    ``classes``. None when the data names no classes, or its indices are not 0..N-1 (a --class-map with gaps)."""
    mapping = _class_to_idx(dataset)
    if not mapping:
        return None
    by_index = {int(i): str(name) for name, i in mapping.items()}
    if sorted(by_index) != list(range(len(mapping))):
        return None
    return [by_index[i] for i in range(len(mapping))]


def indexable(dataset):
    """An hfids (streamed) split as the map-style hfds dataset of the same local files, for a random draw."""
    reader = getattr(dataset, "reader", None)
    if isinstance(dataset, torch.utils.data.IterableDataset) and type(reader).__name__ == "ReaderHfids":
        return create_dataset(f"hfds/{reader.name}", root=reader.root, split=reader.split, is_training=False)
    return dataset
