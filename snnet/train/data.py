"""Datasets and loaders through timm; checks that turn a wrong data folder into a one-line error."""
from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import re
import threading
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from snnet.core.errors import SNNetError

_TRAIN_NAMES = ("train", "training")
_VAL_NAMES = ("validation", "val", "valid", "eval", "evaluation")
_logger = logging.getLogger(__name__)


def img_extensions() -> set[str]:
    """The image file extensions timm's folder reader lists (read at call time: timm lets them be changed)."""
    from timm.data.readers import get_img_extensions
    return get_img_extensions(as_set=True)


def _is_image(name: str, extensions: set[str]) -> bool:
    return os.path.splitext(name)[1].lower() in extensions  # the reader's own test


class DataError(SNNetError):
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
    extensions = img_extensions()
    for c in classes:
        for _, _, files in os.walk(os.path.join(path, c)):
            if any(_is_image(f, extensions) for f in files):
                return
    raise DataError(f"{what} folder {path!r} has class folders but no images ({', '.join(sorted(extensions))}; "
                    f"timm's folder reader reads no other files)")


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


# ---------------------------------------------------------------------------------------- check_data: no image decoded
def _first(names, n: int = 5) -> str:
    names = sorted(names, key=_natural_key)
    return ", ".join(repr(x) for x in names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _natural_key(name: str):
    from timm.utils.misc import natural_key
    return natural_key(name)


def scan_image_folder(path: str, what: str = "train") -> dict[str, int]:
    """Images per class of a split folder as timm's folder reader labels them (the name of the folder holding an
    image; its extensions), without opening a file. Links are followed as the reader does, and a folder reached a
    second time through a link (a loop, or two links to one folder) is refused: the reader would read it again."""
    extensions = img_extensions()
    counts: dict[str, int] = {}
    top = os.path.realpath(path)
    seen = {top: path}
    stack = [path]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name, reverse=True)  # popped in name order
        except OSError as e:
            raise DataError(f"{what} folder {folder!r} cannot be listed ({e.strerror or e}); fix its permissions or "
                            f"remove it (timm's reader would silently leave its images out)") from None
        images = 0
        for entry in entries:
            try:
                is_dir = entry.is_dir()  # follows links, as os.walk(followlinks=True) in the reader
            except OSError:
                is_dir = False
            if not is_dir:
                images += _is_image(entry.name, extensions)
                continue
            real = os.path.realpath(entry.path)
            if real in seen:
                here = os.path.realpath(folder)
                if here == real or here.startswith(real.rstrip(os.sep) + os.sep):
                    raise DataError(f"{what} folder {path!r}: the symlink {entry.path!r} loops back to "
                                    f"{seen[real]!r}, so timm's reader (which follows links) would read its images "
                                    f"over and over; remove the link")
                link = entry.path if os.path.islink(entry.path) or not os.path.islink(seen[real]) else seen[real]
                raise DataError(f"{what} folder {path!r}: {entry.path!r} and {seen[real]!r} are the same folder "
                                f"{real!r} (through a symlink), so timm's reader would read its images twice; "
                                f"remove the link {link!r}")
            seen[real] = entry.path
            stack.append(entry.path)
        if images:
            label = os.path.basename(os.path.relpath(folder, path)) if folder != path else ""
            counts[label] = counts.get(label, 0) + images
    return counts


def _load_class_map(args: argparse.Namespace, root: str) -> dict:
    from timm.data.readers.class_map import load_class_map
    try:
        mapping = load_class_map(args.class_map, root)
    except Exception as e:  # timm asserts on a missing file or an unknown extension
        reason = " ".join(str(e).split())[:120] or type(e).__name__
        raise DataError(f"--class-map {args.class_map!r} cannot be read ({reason}); give a .txt file with one class "
                        f"folder name per line") from None
    if not mapping:
        raise DataError(f"--class-map {args.class_map!r} holds no classes; give one class folder name per line")
    return mapping


def train_samples_per_process(images: int, world_size: int, aug_repeats: float = 0) -> int:
    """Training samples one process draws per epoch, as timm's loader samples them (DistributedSampler pads to
    ceil(n / world); RepeatAugSampler takes a multiple of 256 when there are that many)."""
    if world_size <= 1:
        return images
    if aug_repeats and images >= 256:
        return images // 256 * 256 // world_size
    return math.ceil(images / world_size)


def _check_steps(args: argparse.Namespace, images: int, where: str, world_size: int) -> None:
    batch, accum = args.batch_size, max(1, int(getattr(args, "grad_accum_steps", 1) or 1))
    per = train_samples_per_process(images, world_size, getattr(args, "aug_repeats", 0) or 0)
    if per // batch // accum >= 1:
        return
    procs = f"{per} per process over {world_size} processes" if world_size > 1 else "1 process"
    if per // batch:  # whole batches, but fewer than one accumulation
        raise DataError(f"--grad-accum-steps {accum} exceeds the {per // batch} training batch(es) per process and "
                        f"epoch ({where} has {images} training images, {procs}, -b/--batch-size {batch}); lower it "
                        f"or -b/--batch-size")
    accum_txt = f" and --grad-accum-steps {accum}" if accum > 1 else ""
    fix = (f"lower -b to at most {per // accum}" if per // accum else
           f"lower --grad-accum-steps to at most {per} or add images")
    raise DataError(f"-b/--batch-size {batch}{accum_txt} gives no optimizer step: {where} has {images} training "
                    f"images ({procs}) and timm's training loader drops the last incomplete batch; {fix}")


def _check_num_classes(args: argparse.Namespace, classes: int, where: str) -> None:
    wanted = getattr(args, "num_classes", None)
    if wanted is not None and wanted < classes:
        raise DataError(f"--num-classes {wanted} is smaller than the {classes} classes of {where}: labels "
                        f"{wanted}..{classes - 1} would have no output; raise it to {classes} or leave it out "
                        f"(the default is the number of classes of the data)")


_TORCH_CLASSES = {"cifar10": 10, "cifar100": 100, "mnist": 10, "kmnist": 10, "fashion_mnist": 10, "qmnist": 10}


def hf_folder(args: argparse.Namespace) -> str:
    """The local Hugging Face dataset folder of ``--dataset hfds/NAME`` or ``hfids/NAME``: --data-dir/NAME (parquet
    files in the Hub's layout, data/<split>-*.parquet, or anything `datasets.load_dataset` reads from a folder).
    Nothing is downloaded: a name that is no such folder is refused."""
    rest = args.dataset.partition("/")[2]
    folder = os.path.join(args.data_dir, rest) if rest else args.data_dir
    if not os.path.isdir(folder):
        raise DataError(f"--dataset {args.dataset!r}: no folder {folder!r}; put the dataset's files (e.g. "
                        f"data/train-*.parquet, data/validation-*.parquet) in --data-dir/{rest or 'NAME'} (nothing "
                        f"is downloaded)")
    return os.path.abspath(folder)


def _check_other_dataset(args: argparse.Namespace, need_train: bool = True) -> None:
    """What is cheap to check for timm's non-folder datasets (torch/..., hfds/..., hfids/...): the name and the root."""
    prefix, sep, rest = args.dataset.partition("/")
    if prefix.lower() in ("hfds", "hfids"):
        hf_folder(args)
        try:
            import datasets  # noqa: F401  (timm's readers need it)
        except ImportError:
            raise DataError(f"--dataset {args.dataset!r} needs the Hugging Face datasets package; pip install "
                            f"-r requirements.txt") from None
        check_hf_parquet(args, need_train)
        return
    if prefix.lower() != "torch" or not sep:
        return
    from timm.data import dataset_factory
    name = rest.split("/")[-1].lower()
    known = set(getattr(dataset_factory, "_TORCH_BASIC_DS", {})) | {"inaturalist", "inat", "places365", "qmnist",
                                                                    "imagenet", "image_folder", "folder"}
    if name not in known:
        raise DataError(f"--dataset {args.dataset!r}: unknown torchvision dataset {name!r}; one of "
                        f"{', '.join(sorted(known))}")
    root = args.data_dir
    if root and os.path.isfile(root):
        raise DataError(f"data folder {root!r} is a file; give the folder of the {name} dataset")
    if root and not os.path.isdir(root) and (name in ("imagenet", "image_folder", "folder")
                                             or not getattr(args, "dataset_download", False)):
        raise DataError(f"data folder {root!r} does not exist; give the folder of the {name} dataset"
                        + ("" if name in ("imagenet", "image_folder", "folder") else " or add --dataset-download"))
    if name in _TORCH_CLASSES and not getattr(args, "class_map", ""):
        _check_num_classes(args, _TORCH_CLASSES[name], f"--dataset {args.dataset}")


def _parquet_files(folder: str, split: str) -> list[str]:
    """The parquet files of one split in the Hub's layouts (data/<split>-*.parquet, <split>/*.parquet, ...)."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for f in sorted(files):
            if f.endswith(".parquet") and (re.match(rf"{re.escape(split)}([-_.]|$)", f)
                                           or os.path.basename(root) == split):
                found.append(os.path.join(root, f))
    return found


def check_hf_parquet(args: argparse.Namespace, need_train: bool) -> None:
    """``--dataset hfds/NAME`` and ``hfids/NAME``: every parquet file of the run's splits read before any work as the
    folder and shards are: a corrupt or truncated file, no 'image' or 'label' column, labels that are not integer
    class indices or are negative, a class index beyond the class names or --num-classes, an unreadable image (every
    validation image's header, the first two of each training file): one line naming the file. Plain integer labels
    without class names (no ClassLabel feature) give no class count, so timm would build a 1000-class head: refused
    unless --num-classes covers them. Splits in other formats (no parquet file) are left to `datasets`."""
    import pyarrow.parquet as pq  # with `datasets` (requirements.txt): only hfds/ runs need it
    import pyarrow.types as pa_types
    from PIL import Image
    folder = hf_folder(args)
    splits = ([("train", args.train_split)] if need_train else []) + [("validation", args.val_split)]
    names, top, where = None, -1, None
    for what, split in splits:
        for path in _parquet_files(folder, split):
            try:
                pf = pq.ParquetFile(path)
                schema = pf.schema_arrow
            except Exception as e:
                raise DataError(f"{what} parquet file {path!r} cannot be read ({type(e).__name__}: "
                                f"{' '.join(str(e).split())[:80]}): truncated or not parquet; replace it") from None
            missing = [c for c in ("image", "label") if c not in schema.names]
            if missing:
                raise DataError(f"{what} parquet file {path!r} has no {' or '.join(map(repr, missing))} column (it has "
                                f"{', '.join(schema.names)}); hfds/ reads images from 'image' and class indices from "
                                f"'label': rename the columns")
            kind = schema.field("label").type
            if not pa_types.is_integer(kind):
                raise DataError(f"{what} parquet file {path!r}: its 'label' column holds {kind}, not integer class "
                                f"indices; store the labels as class indices 0..N-1 (a ClassLabel feature)")
            meta = json.loads((schema.metadata or {}).get(b"huggingface", b"{}") or b"{}")
            feature = meta.get("info", {}).get("features", {}).get("label", {})
            if feature.get("_type") == "ClassLabel" and feature.get("names") and names is None:
                names = list(feature["names"])
            try:
                table = pf.read(columns=["label", "image"] if what == "validation" else ["label"])
            except Exception as e:
                raise DataError(f"{what} parquet file {path!r} cannot be read ({type(e).__name__}): truncated or "
                                f"damaged; replace it") from None
            labels = table.column("label").to_pylist()
            if None in labels or (labels and min(labels) < 0):
                raise DataError(f"{what} parquet file {path!r} has a label {'missing' if None in labels else min(labels)} "
                                f"(row {labels.index(None) if None in labels else labels.index(min(labels))}); every "
                                f"image needs a class index >= 0")
            if labels and max(labels) > top:
                top, where = max(labels), path
            rows = table.column("image").to_pylist() if what == "validation" else \
                pf.read_row_group(0, columns=["image"]).column("image").to_pylist()[:2] if pf.num_row_groups else []
            for row, img in enumerate(rows):
                data = img.get("bytes") if isinstance(img, dict) else img
                try:
                    with Image.open(io.BytesIO(data)):
                        pass
                except Exception as e:
                    raise DataError(f"{what} parquet file {path!r}: the image of row {row} cannot be read "
                                    f"({type(e).__name__}); remove or replace it (evaluation does not skip images, so "
                                    f"that every count is exact)") from None
    if where is None:
        return
    wanted = getattr(args, "num_classes", None)
    if names is not None:
        if top >= len(names):
            raise DataError(f"parquet file {where!r} has class index {top}, beyond its {len(names)} class names; fix "
                            f"the labels or the ClassLabel names")
        _check_num_classes(args, len(names), f"--dataset {args.dataset} (its ClassLabel names)")
    elif wanted is None:
        raise DataError(f"--dataset {args.dataset}: the 'label' column holds plain integers 0..{top} and no class names "
                        f"(no ClassLabel feature), so the class count cannot be read (timm would build a 1000-class "
                        f"head); pass --num-classes {top + 1} (or the true count)")
    elif wanted <= top:
        raise DataError(f"--num-classes {wanted} is smaller than the labels of parquet file {where!r} (up to {top}); "
                        f"raise it to {top + 1} or more")


def check_data(args: argparse.Namespace, need_train: bool, world_size: int) -> None:
    """The dataset of a run, checked before any work by a scan of its folders (no image is opened); a problem is a
    one-line DataError naming the value and the fix.

    Folder datasets (``--dataset ''``): the layout (`resolve_folders`); no folder reached twice through symlinks;
    train/ and val/ hold the same classes (timm numbers each split's sorted class folders on its own, so a class
    missing from one split would shift the labels of the other) unless --class-map fixes the numbering;
    --num-classes covers the classes; training gives each of `world_size` processes at least one optimizer step.
    Images are counted as timm's folder reader counts them (its extensions, its labels)."""
    from snnet.train.streams import check_shards, is_shards
    if is_shards(args.dataset):  # WebDataset shards: every shard's headers, counts and class indices
        counts = check_shards(args, need_train, world_size, _TRAIN_NAMES, _VAL_NAMES)
        if need_train:
            _check_steps(args, counts["train"], f"the shards in {args.data_dir!r}", world_size)
        return
    if args.dataset != "":
        _check_other_dataset(args, need_train)
        return
    train_dir, val_dir = resolve_folders(args, need_train)
    train_dir = train_dir if need_train else None
    mapping = _load_class_map(args, train_dir or val_dir) if getattr(args, "class_map", "") else None
    raw, scans = {}, {}  # each split folder walked once: class folder -> images, as found / as the class map keeps
    for path, what in ((train_dir, "train"), (val_dir, "validation")):
        if path is not None:
            raw[what] = scan_image_folder(path, what)
            scans[what] = {c: n for c, n in raw[what].items() if c in mapping} if mapping is not None else raw[what]
    for path, what in ((train_dir, "train"), (val_dir, "validation")):
        hidden = sorted(c for c in raw.get(what, {}) if _hidden(c))
        if hidden:
            raise DataError(f"{what} folder {path!r} has a hidden folder with images, {hidden[0]!r} (e.g. Jupyter's "
                            f".ipynb_checkpoints): timm's reader would make it a class of its own; remove it")
    if mapping is not None:
        for path, what in ((train_dir, "train"), (val_dir, "validation")):
            left_out = sorted(set(raw[what]) - set(mapping)) if path is not None else []
            if left_out:
                raise DataError(f"{what} folder {path!r} has class folders with images that --class-map "
                                f"{args.class_map!r} leaves out ({_first(left_out)}): their images would be dropped "
                                f"without a word; add them to the class map or move them out of the folder")
            if path is not None and not scans[what]:
                raise DataError(f"{what} folder {path!r} has no images of the classes in --class-map "
                                f"{args.class_map!r} (its folders: {_first(raw[what])}); "
                                f"check the class map")
    elif train_dir and val_dir and set(scans["train"]) != set(scans["validation"]):
        only_train, only_val = set(scans["train"]) - set(scans["validation"]), set(scans["validation"]) - set(scans["train"])
        parts = ([f"only in train/: {_first(only_train)}"] if only_train else []) + \
                ([f"only in {os.path.basename(val_dir)}/: {_first(only_val)}"] if only_val else [])
        raise DataError(f"train folder {train_dir!r} and validation folder {val_dir!r} have different classes "
                        f"({'; '.join(parts)}): timm numbers each split's class folders separately, so the labels "
                        f"would not match; give both the same class folders (each with images), or pass --class-map")
    if mapping is not None:
        indices = [v for v in mapping.values() if isinstance(v, int)]
        classes = (max(indices) + 1) if indices else len(mapping)
        _check_num_classes(args, classes, f"--class-map {args.class_map!r}")
    else:
        what = "train" if train_dir else "validation"
        _check_num_classes(args, len(scans[what]), f"{what} folder {train_dir or val_dir!r}")
    if train_dir:
        _check_steps(args, sum(scans["train"].values()), f"train folder {train_dir!r}", world_size)
    # every image the evaluation counts, and a sample of the training images: decodable as 8-bit images
    if val_dir:
        check_image_headers(val_dir, "validation")
    if train_dir:
        check_image_headers(train_dir, "train", per_class=2)


def _hidden(label: str) -> bool:
    return any(part.startswith(".") for part in label.split(os.sep))


#: PIL modes of 16/32-bit images: timm's loader converts them to RGB by clipping to 0..255, so a 16-bit PNG becomes
#: a nearly white image, silently
_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def check_image_headers(folder: str, what: str, per_class: int | None = None) -> int:
    """Open every image of a split folder (or the first `per_class` of each class folder) as far as its header: a file
    PIL cannot identify, or a 16/32-bit image that timm's RGB conversion would clip to white, is a one-line DataError
    naming the file. Headers only (no decoding): about 0.1 ms per file. Returns the files checked."""
    from PIL import Image
    extensions, checked = img_extensions(), 0
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        images = sorted(f for f in files if _is_image(f, extensions))
        for name in images[:per_class] if per_class is not None else images:
            path = os.path.join(root, name)
            try:
                with Image.open(path) as img:
                    mode = img.mode
            except Image.DecompressionBombError as e:  # timm's loader would refuse it mid-run
                raise DataError(f"{what} image {path!r} is too large for PIL ({' '.join(str(e).split())[:120]}); "
                                f"downscale it, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file") from None
            except Exception as e:
                raise DataError(f"{what} image {path!r} cannot be read ({type(e).__name__}); remove or replace it "
                                f"(evaluation does not skip images, so that every count is exact)") from None
            if mode in _WIDE_MODES:
                raise DataError(f"{what} image {path!r} is a {mode} (16/32-bit) image, which timm's loader would clip "
                                f"to nearly white; convert the images to 8-bit RGB first")
            checked += 1
    return checked


def create_datasets(args: argparse.Namespace, need_train: bool):
    from timm.data import create_dataset

    from snnet.train.streams import is_shards
    if is_shards(args.dataset):  # read by snnet.train.streams (exact, resumable), not timm's wds reader
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


def _shard_datasets(args: argparse.Namespace, need_train: bool):
    """(train, val) of ``--dataset wds/NAME`` in --data-dir: `snnet.train.streams.ShardDataset`s (val None when the
    shards have no validation split)."""
    from snnet.train.streams import ShardDataset, find_split, read_info, shard_root
    root = shard_root(args.data_dir, args.dataset)
    train = None
    if need_train:
        split = find_split(root, args.train_split, _TRAIN_NAMES)
        if split is None:
            raise DataError(f"shard folder {root!r} has no {args.train_split!r} split in its _info.json (it has "
                            f"{', '.join(read_info(root)['splits'])}); pass --train-split")
        train = ShardDataset(split, True, args.seed)
    split = find_split(root, args.val_split, _VAL_NAMES)
    return train, ShardDataset(split, False, args.seed) if split is not None else None


def write_folder_shards(folder: str, out: str, shard_size: int, name: str | None = None, clean: bool = False
                        ) -> dict:
    """``snnet shards``: the split folders of an ImageFolder (train/, val/ or validation/), checked as a training run
    checks them, and every image's header (each is decoded as it is packed), written as WebDataset shards
    (`snnet.train.streams.write_shards`) into an empty OUT (or, with `clean`, over an earlier snnet shards output)."""
    from snnet.train.streams import check_shard_out, write_shards
    check_shard_out(out, clean)
    if not os.path.isdir(folder):
        raise DataError(f"image folder {folder!r} does not exist; give an ImageFolder root with train/ and val/")
    splits = {d: os.path.join(folder, d) for d in (*_TRAIN_NAMES, *_VAL_NAMES) if os.path.isdir(os.path.join(folder, d))}
    if not splits:
        raise DataError(f"image folder {folder!r} has no train/ or val/ (validation/) folder; lay it out as "
                        f"{folder}/train/<class>/<image>")
    for split, path in splits.items():
        _check_image_folder(path, split)
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


_SKIP = threading.local()
_TIMM_SKIP = re.compile(r"^Skipped sample \(index \d+\)\. (.*)$", re.S)


class _HoldTimmSkip(logging.Filter):
    """While `_NamedSkips` loads an image, timm's "Skipped sample (index N). <reason>" warning (which for a truncated
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


class _NamedSkips(torch.utils.data.Dataset):
    """A training dataset whose skipped (unreadable) images are named: timm's ImageDataset skips an image it cannot
    decode and uses the next one, logging only the index for a truncated file. This reproduces timm's retry rule
    exactly (next index, up to the dataset's retry limit, then timm's error), so the same images are used, and logs
    one warning with the file's path per skipped image."""

    def __init__(self, dataset):
        import copy
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
            except RuntimeError as e:
                if "consecutive samples" not in str(e):
                    raise
                _logger.warning(f"skipped training image {self._name(index)!r} ({_SKIP.reason or 'unreadable'}); "
                                f"the next image is used in its place: remove or replace the file")
                index = (index + 1) % len(self.dataset)
            finally:
                _SKIP.active = False
        raise RuntimeError(f"Failed to load {self.retries} consecutive samples")


def create_train_loader(dataset, args: argparse.Namespace, data_cfg: dict[str, Any], device: torch.device,
                        collate_fn=None):
    """timm's training loader; a timm ImageDataset is wrapped so that a skipped unreadable image is named."""
    from timm.data import ImageDataset, create_loader

    from snnet.train.streams import ShardDataset
    if isinstance(dataset, ImageDataset):
        dataset = _NamedSkips(dataset)
    elif isinstance(dataset, ShardDataset):  # this rank's deterministic stream (set_epoch before each epoch)
        from snnet.train.device import world
        dataset = dataset.train_stream(*(world() if args.distributed else (0, 1)), args.batch_size)
    num_aug_splits = args.aug_splits if args.aug_splits > 1 else 0
    loader = create_loader(
        dataset, input_size=data_cfg["input_size"], batch_size=args.batch_size, is_training=True,
        no_aug=args.no_aug, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount,
        re_split=args.resplit, scale=args.scale, ratio=args.ratio, hflip=args.hflip, vflip=args.vflip,
        color_jitter=args.color_jitter, auto_augment=args.aa, num_aug_repeats=int(args.aug_repeats),
        num_aug_splits=num_aug_splits, interpolation=args.train_interpolation, mean=data_cfg["mean"],
        std=data_cfg["std"], num_workers=args.workers, distributed=args.distributed, collate_fn=collate_fn,
        pin_memory=args.pin_mem, device=device, use_prefetcher=not args.no_prefetcher,
        # fresh workers each epoch, seeded from the per-epoch RNG state: a resumed run augments identically
        persistent_workers=False, train_crop_mode=timm_crop_mode(args))
    if getattr(args, "train_crop_mode", "rrc") == "src":
        loader.dataset.transform = src_crop(loader.dataset.transform, data_cfg["input_size"][-1])
    return loader


def timm_crop_mode(args: argparse.Namespace) -> str:
    """--train-crop-mode as timm's transform factory takes it ('src' is built on timm's 'rrc': see src_crop)."""
    mode = getattr(args, "train_crop_mode", "rrc")
    return "rrc" if mode == "src" else mode


def src_crop(transform, size: int):
    """DeiT-III's 3-Augment crop (SN-Netv2's training, docs/snnet_compat.md C36) in place of timm's random-resized
    crop: resize the short side to `size` with the crop's interpolation, then a random `size` crop of the image
    padded by 4 px (reflect). Returns the transform with every RandomResizedCropAndInterpolation replaced."""
    from timm.data.transforms import RandomResizedCropAndInterpolation
    from torchvision import transforms as T

    replaced = 0

    def swap(t):
        nonlocal replaced
        if isinstance(t, RandomResizedCropAndInterpolation):
            replaced += 1
            interp = t.interpolation if not isinstance(t.interpolation, (list, tuple)) else T.InterpolationMode.BICUBIC
            return T.Compose([T.Resize(size, interpolation=interp),
                              T.RandomCrop(size, padding=4, padding_mode="reflect")])
        if isinstance(t, T.Compose):
            t.transforms = [swap(c) for c in t.transforms]
        return t

    transform = swap(transform)
    if not replaced:
        raise ValueError(f"--train-crop-mode src: no random-resized crop found in the training transform {transform!r}")
    return transform


def eval_transform(data_cfg: dict[str, Any] | Sequence[dict[str, Any]]):
    """timm's evaluation transform of one data config; of several (a sequence): `PerConfig`, a tuple of tensors per
    image, one per config."""
    from timm.data import create_transform
    if not isinstance(data_cfg, dict):
        return PerConfig([eval_transform(c) for c in data_cfg])
    return create_transform(data_cfg["input_size"], is_training=False, interpolation=data_cfg["interpolation"],
                            mean=data_cfg["mean"], std=data_cfg["std"], crop_pct=data_cfg["crop_pct"],
                            crop_mode=data_cfg.get("crop_mode", "center"))


class PerConfig:
    """Several transforms of one decoded image: a tuple of tensors, one per data config. A loader's default collate
    turns a batch of them into a list of batched tensors, in the same order (the same images in every one)."""

    def __init__(self, transforms: Sequence[Any]):
        self.transforms = tuple(transforms)

    def __call__(self, img) -> tuple:
        return tuple(t(img) for t in self.transforms)

    def __repr__(self) -> str:
        return f"PerConfig({', '.join(repr(t) for t in self.transforms)})"


def _config_key(cfg: dict[str, Any]) -> tuple:
    """A hashable form of a data config: (3, 16, 16) and [3, 16, 16] (a JSON pretrained_cfg_overlay) are equal."""
    norm = lambda v: tuple(norm(e) for e in v) if isinstance(v, (list, tuple)) else v
    return tuple(sorted((k, norm(v)) for k, v in cfg.items()))


def group_data_configs(configs: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[int]]:
    """(distinct, group): the distinct data configs in order of first use, and per entry of `configs` the index of
    its config in `distinct`. Anchors with equal configs share one group, i.e. one decoded and transformed tensor."""
    distinct: list[dict[str, Any]] = []
    keys: dict[tuple, int] = {}
    group = []
    for cfg in configs:
        key = _config_key(cfg)
        if key not in keys:
            keys[key] = len(distinct)
            distinct.append(dict(cfg))
        group.append(keys[key])
    return distinct, group


def anchor_data_configs(models: Sequence[torch.nn.Module], args: dict[str, Any] | None = None
                        ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[int]]:
    """Each anchor's own evaluation preprocessing: timm's resolve_data_config on that anchor (its pretrained_cfg:
    mean, std, interpolation, crop_pct, input size), with `args` (e.g. ``{"img_size": 16}``) over it.

    Returns (per_anchor, distinct, group): per_anchor[a] is anchor a's config, distinct[group[a]] the same config
    shared by every anchor equal to it (see `group_data_configs`). Pass `distinct` to `clean_images` or
    `create_eval_loader` and `group` to the network (``ComposedNet(..., input_groups=group)``). An SN-Net is trained
    and evaluated with one config (the largest anchor's, train.py); this is for tools that run anchors side by
    side (`snnet similarity`, `snnet search`), where feeding one anchor another's preprocessing changes its numbers."""
    from timm.data import resolve_data_config
    per_anchor = [resolve_data_config(dict(args or {}), model=m) for m in models]
    distinct, group = group_data_configs(per_anchor)
    return per_anchor, distinct, group


class _StrictImages(torch.utils.data.Dataset):
    """Evaluation reads every image or stops, naming the file: timm's datasets skip an unreadable image and
    substitute the next one, which is fine for training (`_NamedSkips` names the file) but would make the counts of
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


def create_eval_loader(dataset, args: argparse.Namespace, data_cfg: dict[str, Any] | Sequence[dict[str, Any]],
                       rank: int = 0, world_size: int = 1, batch_size: int | None = None) -> DataLoader:
    """The evaluation loader: batches (images, labels, sample ids), in order, this rank's disjoint shard; a sample id
    is the image's index in the whole split. With a sequence of
    data configs (`anchor_data_configs`' distinct ones) the images of a batch are a list of tensors, one per
    config, of the same images."""
    import copy

    from snnet.train.streams import ShardDataset
    batch_size = batch_size or args.validation_batch_size or args.batch_size
    if isinstance(dataset, ShardDataset):  # this rank's contiguous range of the shards, whole batches per worker
        stream = dataset.eval_stream(rank, world_size, batch_size)
        stream.transform = eval_transform(data_cfg)
        return DataLoader(stream, batch_size=batch_size, num_workers=args.workers, pin_memory=args.pin_mem,
                          drop_last=False, persistent_workers=False)
    dataset = copy.copy(dataset)
    dataset.transform = eval_transform(data_cfg)
    return DataLoader(_Shard(_StrictImages(dataset), rank, world_size), batch_size=batch_size or args.validation_batch_size
                      or args.batch_size, shuffle=False, num_workers=args.workers, pin_memory=args.pin_mem,
                      drop_last=False, persistent_workers=False)


def _indexable(dataset):
    """An hfids (streamed) split as the map-style hfds dataset of the same local files, for a random draw."""
    reader = getattr(dataset, "reader", None)
    if isinstance(dataset, torch.utils.data.IterableDataset) and type(reader).__name__ == "ReaderHfids":
        from timm.data import create_dataset
        return create_dataset(f"hfds/{reader.name}", root=reader.root, split=reader.split, is_training=False)
    return dataset


class CleanImages:
    """Batches of images drawn at random (seeded) from a dataset with the evaluation transform, this rank's share.
    With a sequence of data configs each batch is a list of tensors, one per config, of the same images.

    ``count`` is the number actually drawn over all processes: the requested number, or the whole split when it is
    smaller (log this one, not the request); ``local_count`` is this process's share, ``requested`` the request.
    """

    def __init__(self, dataset, data_cfg: dict[str, Any] | Sequence[dict[str, Any]], count: int, seed: int,
                 rank: int = 0, world_size: int = 1, batch_size: int = 50):
        import copy
        from snnet.train.streams import ShardDataset
        dataset = _indexable(dataset)
        order = np.random.default_rng(seed).permutation(len(dataset))[:count]
        self.indices = [int(i) for i in order[rank::world_size]]
        if isinstance(dataset, ShardDataset):  # the same images as the folder's, read once from their shards
            self.base, self.indices = dataset.subset(self.indices), list(range(len(self.indices)))
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
