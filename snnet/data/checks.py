"""Checks that turn a wrong data folder into a one-line error before any work: the layout, the classes, the steps
an epoch gives, the image headers (no image decoded)."""
from __future__ import annotations

import ast
import functools
import importlib.util
import io
import json
import math
import os
import re
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

from PIL import Image

from snnet.data.options import DATA_ROOT, DataOptions
from snnet.data.shards import check_shards, image_problem, is_shards, read_info, shard_root
from snnet.utils.errors import SNNetError
from snnet.utils.fileio import data_folder

try:  # HEIC photos, an iPhone's default: Pillow reads them once pillow-heif (requirements-extras.txt) registers
    from pillow_heif import register_heif_opener
except ImportError:
    pass
else:
    register_heif_opener()  # in this process and the loader workers it forks, whichever module opens an image

TRAIN_NAMES = ("train", "training")
VAL_NAMES = ("validation", "val", "valid", "eval", "evaluation")
TEST_NAMES = ("test", "testing")  # held-out splits beside train/: packed as shards; quickstart's val/ where none is


def img_extensions() -> set[str]:
    """The image file extensions timm's folder reader lists. Where timm is loaded, its list now (timm lets it be
    changed at run time); else the list timm starts with, read from timm's own source without importing timm and
    torch (seconds), so that a command refuses a folder without images at once."""
    if "timm" not in sys.modules:
        start = _timm_start_extensions()
        if start:
            return set(start)
    from timm.data.readers import get_img_extensions
    return get_img_extensions(as_set=True)


@functools.cache
def _timm_start_extensions() -> tuple[str, ...] | None:
    """``IMG_EXTENSIONS`` as timm's ``data/readers/img_extensions.py`` sets it (a literal tuple), found without
    running timm's package; None where that file or literal is not there (then timm itself is asked)."""
    spec = importlib.util.find_spec("timm")
    roots = (spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        try:
            tree = ast.parse(Path(root, "data", "readers", "img_extensions.py").read_text())
        except (OSError, SyntaxError, ValueError):
            continue
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "IMG_EXTENSIONS" for t in node.targets):
                try:
                    value = ast.literal_eval(node.value)
                except ValueError:
                    return None
                ok = isinstance(value, tuple) and all(isinstance(v, str) for v in value)
                return value if ok else None
    return None


def _is_image(name: str, extensions: set[str]) -> bool:
    return os.path.splitext(name)[1].lower() in extensions  # the reader's own test


class DataError(SNNetError):
    """A dataset that cannot be used; the message names the folder and the fix."""


def split_folder(root: str, split: str, synonyms: tuple[str, ...] = ()) -> str | None:
    """The folder of split `split` under `root` (else the first of `synonyms` present), or None. A name matches a
    folder of its exact name first, else one that differs only in case (Train/, VAL/, as exported datasets have)."""
    names = (split, *[s for s in synonyms if s != split])
    for name in names:
        if os.path.isdir(os.path.join(root, name)):
            return os.path.join(root, name)
    folders = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    return next((os.path.join(root, d) for name in names for d in folders if d.lower() == name.lower()), None)


def check_image_folder(path: str, what: str) -> None:
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


def resolve_folders(data_options: DataOptions, need_train: bool) -> tuple[str | None, str | None]:
    """The train and validation folders of a folder dataset (``--dataset ''``), checked."""
    root = data_options.data_dir
    data_folder(root, "data folder", DATA_ROOT, DataError)
    if not os.listdir(root):
        raise DataError(f"data folder {root!r} is empty; it needs train/ and val/ (or validation/) class folders")
    train = split_folder(root, data_options.train_split, TRAIN_NAMES)
    val = split_folder(root, data_options.val_split, VAL_NAMES)
    if need_train and train is None:
        shown = root.rstrip("/") or root
        flat = ""
        try:
            check_image_folder(root, "data")
            flat = (f" (its sub-folders hold images, as class folders do: snnet quickstart {shown} --out DIR splits "
                    f"such a folder into train/ and val/)")
        except DataError:
            pass
        raise DataError(f"data folder {root!r} has no {data_options.train_split}/ folder; lay it out as "
                        f"{shown}/train/<class>/<image> and {shown}/val/<class>/<image>{flat}")
    if not need_train and val is None:
        raise DataError(f"data folder {root!r} has no validation/ or val/ folder to evaluate on")
    for path, what in ((train, "train"), (val, "validation")):
        if path is not None:
            check_image_folder(path, what)
    return train, val


# ---------------------------------------------------------------------------------------- check_data: no image decoded
def _natural_order(name: str) -> list[Any]:
    """Sort key of the order timm's folder reader numbers classes in: case folded, digit runs as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name.lower())]


def first_names(names, n: int = 5) -> str:
    """The first `n` of `names` in natural order, quoted, and how many more: for one-line messages."""
    names = sorted(map(str, names), key=_natural_order)
    return ", ".join(repr(x) for x in names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


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


def _load_class_map(data_options: DataOptions, root: str | None) -> dict:
    from timm.data.readers.class_map import load_class_map
    try:
        mapping = load_class_map(data_options.class_map, root or "")
    except Exception as e:  # timm asserts on a missing file or an unknown extension
        reason = " ".join(str(e).split())[:120] or type(e).__name__
        raise DataError(f"--class-map {data_options.class_map!r} cannot be read ({reason}); give a .txt file with one "
                        f"class folder name per line") from None
    if not mapping:
        raise DataError(f"--class-map {data_options.class_map!r} holds no classes; give one class folder name per line")
    # timm's dict keeps a repeated line once, numbered by its last place
    if data_options.class_map.lower().endswith(".txt"):
        path = (data_options.class_map if os.path.exists(data_options.class_map)
                else os.path.join(root or "", data_options.class_map))
        with open(path, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise DataError(f"--class-map {data_options.class_map!r} lists class {', '.join(map(repr, twice))} twice "
                            f"(a class is one output); list each class folder once")
    return mapping


def train_samples_per_process(images: int, world_size: int, aug_repeats: float = 0) -> int:
    """Training samples one process draws per epoch, as timm's loader samples them (DistributedSampler pads to
    ceil(n / world); RepeatAugSampler takes a multiple of 256 when there are that many)."""
    if world_size <= 1:
        return images
    if aug_repeats and images >= 256:
        return images // 256 * 256 // world_size
    return math.ceil(images / world_size)


def _check_steps(data_options: DataOptions, images: int, where: str, world_size: int) -> None:
    batch, accum = data_options.batch_size, max(1, int(data_options.grad_accum_steps or 1))
    per = train_samples_per_process(images, world_size, data_options.aug_repeats or 0)
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


def _check_trained_classes(found: list[str], trained: tuple[list[str], str], folder: str, shards: bool = False) -> None:
    """The classes of `folder` (its class folders, or a shard folder's recorded classes in index order) against the
    class names checkpoint `trained[1]` recorded: timm numbers the folders it finds, so a class missing (or added)
    moves every later class to another index, and each of its images would be scored against another class's
    output. Shards fixed their indices when written: there the order counts too."""
    names, path = trained
    missing, extra = sorted(set(names) - set(found)), sorted(set(found) - set(names))
    if not (missing or extra or (shards and found != names)):
        return
    parts = ([f"missing {first_names(missing)}"] if missing else []) + \
            ([f"not trained on {first_names(extra)}"] if extra else []) or ["the same classes in another order"]
    how, fix = (("its shards number their classes", "write the shards from a folder of the trained classes") if shards
                else ("timm numbers the class folders it finds", "give a folder of the trained classes, or pass "
                                                                  "--class-map"))
    raise DataError(f"folder {folder!r} does not hold the {len(names)} classes checkpoint {path!r} was trained on "
                    f"({'; '.join(parts)}): {how}, so its labels would name other classes than the network's "
                    f"outputs; {fix}")


def _check_num_classes(data_options: DataOptions, classes: int, where: str) -> None:
    wanted = data_options.num_classes
    if wanted is not None and wanted < classes:
        raise DataError(f"--num-classes {wanted} is smaller than the {classes} classes of {where}: labels "
                        f"{wanted}..{classes - 1} would have no output; raise it to {classes} or leave it out "
                        f"(the default is the number of classes of the data)")


_TORCH_CLASSES = {"cifar10": 10, "cifar100": 100, "mnist": 10, "kmnist": 10, "fashion_mnist": 10, "qmnist": 10}


def hf_folder(data_options: DataOptions) -> str:
    """The local Hugging Face dataset folder of ``--dataset hfds/NAME`` or ``hfids/NAME``: --data-dir/NAME (parquet
    files in the Hub's layout, data/<split>-*.parquet, or anything `datasets.load_dataset` reads from a folder).
    Nothing is downloaded: a name that is no such folder is refused."""
    rest = data_options.dataset.partition("/")[2]
    folder = os.path.join(data_options.data_dir, rest) if rest else data_options.data_dir
    if not os.path.isdir(folder):
        raise DataError(f"--dataset {data_options.dataset!r}: no folder {folder!r}; put the dataset's files (e.g. "
                        f"data/train-*.parquet, data/validation-*.parquet) in --data-dir/{rest or 'NAME'} (nothing "
                        f"is downloaded)")
    return os.path.abspath(folder)


def _check_other_dataset(data_options: DataOptions, need_train: bool = True) -> None:
    """What is cheap to check for timm's non-folder datasets (torch/..., hfds/..., hfids/...): the name and the root."""
    prefix, sep, rest = data_options.dataset.partition("/")
    if prefix.lower() in ("hfds", "hfids"):
        hf_folder(data_options)
        try:
            import datasets  # noqa: F401  (timm's readers need it)
        except ImportError:
            raise DataError(f"--dataset {data_options.dataset!r} needs the Hugging Face datasets package; pip install "
                            f"-r requirements.txt") from None
        check_hf_parquet(data_options, need_train)
        return
    if prefix.lower() != "torch" or not sep:
        return
    from timm.data import dataset_factory
    name = rest.split("/")[-1].lower()
    known = set(getattr(dataset_factory, "_TORCH_BASIC_DS", {})) | {"inaturalist", "inat", "places365", "qmnist",
                                                                    "imagenet", "image_folder", "folder"}
    if name not in known:
        raise DataError(f"--dataset {data_options.dataset!r}: unknown torchvision dataset {name!r}; one of "
                        f"{', '.join(sorted(known))}")
    root = data_options.data_dir
    if root and os.path.isfile(root):
        raise DataError(f"data folder {root!r} is a file; give the folder of the {name} dataset")
    if root and not os.path.isdir(root) and (name in ("imagenet", "image_folder", "folder")
                                             or not data_options.dataset_download):
        raise DataError(f"data folder {root!r} does not exist; give the folder of the {name} dataset"
                        + ("" if name in ("imagenet", "image_folder", "folder") else " or add --dataset-download"))
    if name in _TORCH_CLASSES and not data_options.class_map:
        _check_num_classes(data_options, _TORCH_CLASSES[name], f"--dataset {data_options.dataset}")


def parquet_files(folder: str, split: str) -> list[str]:
    """The parquet files of one split in the Hub's layouts (data/<split>-*.parquet, <split>/*.parquet, ...)."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for f in sorted(files):
            if f.endswith(".parquet") and (re.match(rf"{re.escape(split)}([-_.]|$)", f)
                                           or os.path.basename(root) == split):
                found.append(os.path.join(root, f))
    return found


def parquet_image_source(img: Any, parquet_path: str) -> Any:
    """What PIL opens for one cell of a parquet file's 'image' column: its bytes, or (`datasets` stores an image of a
    local file by its path, bytes None, and reads it from there) that path, relative to the parquet file's folder."""
    data = img.get("bytes") if isinstance(img, dict) else img
    ref = img.get("path") if isinstance(img, dict) else None
    if data is not None or not ref:
        return io.BytesIO(data if data is not None else b"")
    return ref if os.path.isabs(ref) else os.path.join(os.path.dirname(parquet_path), ref)


def parquet_class_names(schema) -> list[str] | None:
    """The class names of a parquet file's 'label' column (its Hugging Face ClassLabel feature), or None."""
    meta = json.loads((schema.metadata or {}).get(b"huggingface", b"{}") or b"{}")
    feature = meta.get("info", {}).get("features", {}).get("label", {})
    return list(feature["names"]) if feature.get("_type") == "ClassLabel" and feature.get("names") else None


def check_hf_parquet(data_options: DataOptions, need_train: bool) -> None:
    """``--dataset hfds/NAME`` and ``hfids/NAME``: every parquet file of the run's splits read before any work as the
    folder and shards are: a corrupt or truncated file, no 'image' or 'label' column, labels that are not integer
    class indices or are negative, a class index beyond the class names or --num-classes, an unreadable image (every
    validation image's header, the first two of each training file): one line naming the file. Plain integer labels
    without class names (no ClassLabel feature) give no class count, so timm would build a 1000-class head: refused
    unless --num-classes covers them. Splits in other formats (no parquet file) are left to `datasets`."""
    import pyarrow.parquet as pq  # with `datasets` (requirements.txt): only hfds/ runs need it
    import pyarrow.types as pa_types
    folder = hf_folder(data_options)
    splits = ([("train", data_options.train_split)] if need_train else []) + [("validation", data_options.val_split)]
    names, top, where = None, -1, None
    for what, split in splits:
        for path in parquet_files(folder, split):
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
            if names is None:
                names = parquet_class_names(schema)
            try:
                table = pf.read(columns=["label", "image"] if what == "validation" else ["label"])
            except Exception as e:
                raise DataError(f"{what} parquet file {path!r} cannot be read ({type(e).__name__}): truncated or "
                                f"damaged; replace it") from None
            labels = table.column("label").to_pylist()
            if None in labels or (labels and min(labels) < 0):
                raise DataError(f"{what} parquet file {path!r} has a label "
                                f"{'missing' if None in labels else min(labels)} "
                                f"(row {labels.index(None) if None in labels else labels.index(min(labels))}); every "
                                f"image needs a class index >= 0")
            if labels and max(labels) > top:
                top, where = max(labels), path
            rows = table.column("image").to_pylist() if what == "validation" else \
                pf.read_row_group(0, columns=["image"]).column("image").to_pylist()[:2] if pf.num_row_groups else []
            for row, img in enumerate(rows):
                try:
                    with Image.open(parquet_image_source(img, path)):
                        pass
                except Exception as e:
                    raise DataError(f"{what} parquet file {path!r}: the image of row {row} cannot be read "
                                    f"({type(e).__name__}); remove or replace it (evaluation does not skip images, so "
                                    f"that every count is exact)") from None
    if where is None:
        return
    wanted = data_options.num_classes
    if names is not None:
        if top >= len(names):
            raise DataError(f"parquet file {where!r} has class index {top}, beyond its {len(names)} class names; fix "
                            f"the labels or the ClassLabel names")
        _check_num_classes(data_options, len(names), f"--dataset {data_options.dataset} (its ClassLabel names)")
    elif wanted is None:
        raise DataError(f"--dataset {data_options.dataset}: the 'label' column holds plain integers 0..{top} and no "
                        f"class names (no ClassLabel feature), so the class count cannot be read (timm would build a "
                        f"1000-class head); pass --num-classes {top + 1} (or the true count)")
    elif wanted <= top:
        raise DataError(f"--num-classes {wanted} is smaller than the labels of parquet file {where!r} (up to {top}); "
                        f"raise it to {top + 1} or more")


def check_data(data_options: DataOptions, need_train: bool, world_size: int,
               trained: tuple[list[str], str] | None = None) -> None:
    """The dataset of a run, checked before any work by a scan of its folders (no image is opened); a problem is a
    one-line DataError naming the value and the fix.

    Folder datasets (``--dataset ''``): the layout (`resolve_folders`); no folder reached twice through symlinks;
    train/ and val/ hold the same classes (timm numbers each split's sorted class folders on its own, so a class
    missing from one split would shift the labels of the other) unless --class-map fixes the numbering;
    --num-classes covers the classes; training gives each of `world_size` processes at least one optimizer step;
    `trained` (the class names a resumed checkpoint recorded, and its path): the class folders are those classes.
    Images are counted as timm's folder reader counts them (its extensions, its labels)."""
    if is_shards(data_options.dataset):  # WebDataset shards: every shard's headers, counts and class indices
        counts = check_shards(data_options, need_train, world_size, TRAIN_NAMES, VAL_NAMES)
        root = shard_root(data_options.data_dir, data_options.dataset)
        info = read_info(root)
        if trained is not None and isinstance(info.get("classes"), list):
            _check_trained_classes(list(map(str, info["classes"])), trained, root, shards=True)
        if need_train:
            _check_steps(data_options, counts["train"], f"the shards in {data_options.data_dir!r}", world_size)
            if "validation" not in counts:
                _warn_test_split(data_options, info["splits"])
        return
    if data_options.dataset != "":
        _check_other_dataset(data_options, need_train)
        return
    train_dir, val_dir = resolve_folders(data_options, need_train)
    if need_train and val_dir is None:
        root = data_options.data_dir
        _warn_test_split(data_options, [d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))], root)
    train_dir = train_dir if need_train else None
    mapping = _load_class_map(data_options, train_dir or val_dir) if data_options.class_map else None
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
                                f"{data_options.class_map!r} leaves out ({first_names(left_out)}): their images "
                                f"would be dropped without a word; add them to the class map or move them out of "
                                f"the folder")
            if path is not None and not scans[what]:
                raise DataError(f"{what} folder {path!r} has no images of the classes in --class-map "
                                f"{data_options.class_map!r} (its folders: {first_names(raw[what])}); "
                                f"check the class map")
    elif train_dir and val_dir and set(scans["train"]) != set(scans["validation"]):
        only_train, only_val = (set(scans["train"]) - set(scans["validation"]),
                                set(scans["validation"]) - set(scans["train"]))
        parts = ([f"only in train/: {first_names(only_train)}"] if only_train else []) + \
                ([f"only in {os.path.basename(val_dir)}/: {first_names(only_val)}"] if only_val else [])
        raise DataError(f"train folder {train_dir!r} and validation folder {val_dir!r} have different classes "
                        f"({'; '.join(parts)}): timm numbers each split's class folders separately, so the labels "
                        f"would not match; give both the same class folders (each with images), or pass --class-map")
    if trained is not None and mapping is None:
        _check_trained_classes(list(scans["train" if train_dir else "validation"]), trained, str(train_dir or val_dir))
    if mapping is not None:
        indices = [v for v in mapping.values() if isinstance(v, int)]
        classes = (max(indices) + 1) if indices else len(mapping)
        _check_num_classes(data_options, classes, f"--class-map {data_options.class_map!r}")
    else:
        what = "train" if train_dir else "validation"
        _check_num_classes(data_options, len(scans[what]), f"{what} folder {train_dir or val_dir!r}")
    if train_dir:
        _check_steps(data_options, sum(scans["train"].values()), f"train folder {train_dir!r}", world_size)
        warn_small_classes(scans["train"], f"train folder {train_dir!r}")
    # every image the evaluation counts, and a sample of the training images: decodable as 8-bit images
    if val_dir:
        check_image_headers(val_dir, "validation")
    if train_dir:
        check_image_headers(train_dir, "train", per_class=2)


#: a class with fewer training images than this share of the median class gets a warning (`small_class_warning`)
SMALL_CLASS_SHARE = 0.1
#: set by the launcher once its check has warned, so the ranks it starts do not say it again
WARNED_ENV = "SNNET_DATA_WARNED"


def small_class_warning(counts: dict[str, int], where: str) -> str | None:
    """One line naming the classes with far fewer images than the others (under SMALL_CLASS_SHARE of the median
    class's count) and the counts, or None. Not an error: a rare class can be meant, but a class of 1 image beside
    classes of 120 is more often a stray folder, and training says nothing of it otherwise."""
    if len(counts) < 2:
        return None
    median = statistics.median(counts.values())
    small = sorted((n, c) for c, n in counts.items() if n < SMALL_CLASS_SHARE * median)
    if not small:
        return None
    named = ", ".join(f"{c!r} has {n}" for n, c in small[:5]) + (f" (and {len(small) - 5} more)" if len(small) > 5
                                                                   else "")
    return (f"warning: {where}: {named} image(s), under a tenth of the median class's {median:g} (of {len(counts)} "
            f"classes): the network will hardly learn {'it' if len(small) == 1 else 'them'}; add images, or move "
            f"the folder out if it is not meant to be a class")


def _warn_test_split(data_options: DataOptions, splits, folder: str | None = None) -> None:
    """Training without a validation split where the data has a test split: said once per launch (as
    `warn_small_classes`), with the flag that evaluates on it; without it no stitch is evaluated. In a `folder`
    dataset a test folder without class folders is unlabelled (a competition's), and said to be."""
    from snnet.utils.distributed import world
    test = next((s for s in sorted(splits) if s.lower() in TEST_NAMES), None)
    if not test or os.environ.get(WARNED_ENV) or world(launched=True)[0] != 0:
        return
    where = os.path.join(folder, test) if folder else None
    fix = f"pass --val-split {test} to evaluate on it"
    if where and not any(e.is_dir() for e in os.scandir(where)):
        fix = f"its {test}/ holds no class folders (its images have no labels): hold out a labelled val/ to evaluate"
    print(f"warning: {data_options.data_dir!r} has no validation split but a {test!r} one: nothing will be "
          f"evaluated (no stitches_res.txt); {fix}", file=sys.stderr, flush=True)


def warn_small_classes(counts: dict[str, int], where: str) -> None:
    """`small_class_warning`'s line on stderr, once per launch: from rank 0 (or the launcher's check, whose ranks
    then stay quiet)."""
    from snnet.utils.distributed import world
    line = small_class_warning(counts, where)
    if line and not os.environ.get(WARNED_ENV) and world(launched=True)[0] == 0:
        print(line, file=sys.stderr, flush=True)


def warn_small_classes_here(data_options: DataOptions) -> None:
    """The dry run's warning: when the folder dataset is on this machine, its train folder scanned (no image
    opened) for `warn_small_classes`; a dataset elsewhere, shards or a layout the run would refuse: nothing here
    (the dry run resolves a run for any machine; the real run checks the data)."""
    if data_options.dataset != "":
        return
    try:
        train_dir, _ = resolve_folders(data_options, need_train=True)
        if train_dir:
            warn_small_classes(scan_image_folder(train_dir, "train"), f"train folder {train_dir!r}")
    except SNNetError:
        return


def _hidden(label: str) -> bool:
    return any(part.startswith(".") for part in label.split(os.sep))


#: PIL modes of 16/32-bit images: timm's loader converts them to RGB by clipping to 0..255, so a 16-bit PNG becomes
#: a nearly white image, silently
WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def pillow_extensions() -> set[str]:
    """The file extensions of the image formats Pillow can open here (timm's folder reader lists fewer: .png, .jpg,
    .jpeg; .gif, .webp, .tif, .bmp ... are images too)."""
    Image.init()
    return {ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def unusable_image(path: str) -> str | None:
    """Why an image file cannot be trained on (a few words), or None. Its data is read to the end, so a truncated
    file is found as well as a foreign or empty one: a PNG's chunks with their checksums, a JPEG decoded at 1/8
    scale, any other format decoded; a 16/32-bit image, which timm's RGB conversion would clip to nearly white, is
    named from its header. A few ms per photo."""
    try:
        with Image.open(path) as img:
            if img.mode in WIDE_MODES:
                return f"a 16/32-bit image (mode {img.mode}), which timm's loader would clip to nearly white"
            if img.format == "PNG":
                img.verify()
            else:
                if img.format == "JPEG":
                    img.draft("RGB", (max(1, img.size[0] // 8), max(1, img.size[1] // 8)))
                img.load()
    except Image.DecompressionBombError as e:
        return image_problem(e)
    except Exception as e:
        if os.path.getsize(path) == 0:
            return "an empty file"
        reason = " ".join(str(e).split())
        return "not an image Pillow reads" if isinstance(e, Image.UnidentifiedImageError) else \
            f"unreadable ({type(e).__name__}{': ' + reason[:60] if reason else ''})"
    return None


def check_image_headers(folder: str, what: str, per_class: int | None = None) -> int:
    """Open every image of a split folder (or the first `per_class` of each class folder) as far as its header: a file
    PIL cannot identify, or a 16/32-bit image that timm's RGB conversion would clip to white, is a one-line DataError
    naming the file. Headers only (no decoding): about 0.1 ms per file. Returns the files checked."""
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
                if name.startswith("._"):  # macOS writes one beside each file it copies to a foreign disk
                    raise DataError(f"{what} image {path!r} is macOS's metadata of {name[2:]!r} (an AppleDouble "
                                    f"file), not an image, which timm would read as one; delete such files: find "
                                    f"{shlex.quote(folder)} -name '._*' -delete") from None
                raise DataError(f"{what} image {path!r} cannot be read ({type(e).__name__}); remove or replace it "
                                f"(evaluation does not skip images, so that every count is exact)") from None
            if mode in WIDE_MODES:
                raise DataError(f"{what} image {path!r} is a {mode} (16/32-bit) image, which timm's loader would clip "
                                f"to nearly white; convert the images to 8-bit RGB first")
            checked += 1
    return checked
