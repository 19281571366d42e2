"""Datasets: timm's (folders, torchvision, Hugging Face) and WebDataset shards (`snnet.data.shards`), created
from checked folders; where a split's images come from and how many classes it has. The shards' torch datasets are
here (at the end): `ShardDataset` and its exact evaluation stream, deterministic training stream and subset."""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from timm.data import create_dataset
from torch.utils.data import Dataset, IterableDataset, get_worker_info

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
    INFO_FILE,
    SHUFFLE_BUFFER,
    ShardError,
    ShardSplit,
    UnreadableSample,
    check_shard_out,
    decode,
    find_split,
    is_shards,
    iter_shard,
    read_info,
    read_range,
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
    """(train, val) of ``--dataset wds/NAME`` in --data-dir: `ShardDataset`s (val None when the
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


# ------------------------------------------------------------------------------------------ shard streams
class ShardDataset(Dataset):
    """One split of a shard folder as `create_datasets` returns it: ``len``, the classes, a ``transform``. It is
    not indexed directly: `eval_stream`, `train_stream` and `subset` make the readers."""

    def __init__(self, split: ShardSplit, is_training: bool = False, seed: int = 0):
        self.split, self.is_training, self.seed = split, is_training, seed
        self.transform = None
        self.num_classes = split.num_classes
        self.class_to_idx = {c: i for i, c in enumerate(split.classes)} if split.classes else None

    def __len__(self) -> int:
        return self.split.num_samples

    def __getitem__(self, index):
        raise TypeError("shards are streamed, not indexed: use eval_stream, train_stream or subset")

    def subset(self, positions: Sequence[int]) -> ShardSubset:
        return ShardSubset(self.split, positions, self.transform)

    def train_stream(self, rank: int, world_size: int, batch_size: int) -> TrainStream:
        return TrainStream(self.split, self.seed, rank, world_size, batch_size, self.transform)

    def eval_stream(self, rank: int, world_size: int, batch_size: int) -> EvalStream:
        return EvalStream(self.split, rank, world_size, batch_size, self.transform)


class ShardSubset(Dataset):
    """Samples at given positions, in the given order, read once (one pass over the shards they lie in) and kept
    as encoded bytes: the LS init's clean images."""

    def __init__(self, split: ShardSplit, positions: Sequence[int], transform=None):
        wanted = sorted(set(int(p) for p in positions))
        found: dict[int, tuple[str, dict]] = {}
        runs, start = [], None  # contiguous runs of wanted positions, read shard by shard
        for i, p in enumerate(wanted):
            if start is None:
                start = p
            if i + 1 == len(wanted) or wanted[i + 1] != p + 1:
                runs.append((start, p + 1))
                start = None
        wanted_set = set(wanted)
        for lo, hi in runs:
            for pos, where, sample in read_range(split, lo, hi):
                if pos in wanted_set:
                    found[pos] = (where, sample)
        self.samples = [found[int(p)] for p in positions]
        self.transform, self.split_root = transform, split.root

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        """An unreadable image is skipped with one warning naming it and the next sample used, as training skips one
        (these are the LS init's images, drawn from the training split)."""
        for k in range(len(self.samples)):
            where, sample = self.samples[(i + k) % len(self.samples)]
            try:
                img, label = decode(sample, where)
            except UnreadableSample as e:
                _logger.warning(f"warning: skipped training image {where} ({e.reason}); the next image is used in "
                                f"its place: remove or replace it and rewrite the shards")
                continue
            return (self.transform(img) if self.transform is not None else img), label
        raise ShardError(f"none of the {len(self.samples)} images drawn from the shards in {self.split_root!r} can be "
                         f"read; rewrite the shards with snnet shards")


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _part(n: int, i: int, k: int) -> tuple[int, int]:
    """The i-th of k contiguous, near-equal parts of range(n)."""
    return i * n // k, (i + 1) * n // k


class EvalStream(IterableDataset):
    """This rank's contiguous range of the split, whole batches per loader worker; yields (image, label, sample
    id) with the id the sample's position in the split. len() is the rank's image count."""

    def __init__(self, split: ShardSplit, rank: int, world_size: int, batch_size: int, transform=None):
        self.split, self.rank, self.world_size, self.batch_size = split, rank, world_size, batch_size
        self.transform = transform
        self.lo, self.hi = _part(split.num_samples, rank, world_size)

    def __len__(self) -> int:
        return self.hi - self.lo

    def worker_range(self, worker: int, workers: int) -> tuple[int, int]:
        batches = -(-(self.hi - self.lo) // self.batch_size)
        b0, b1 = _part(batches, worker, workers)
        return self.lo + b0 * self.batch_size, min(self.lo + b1 * self.batch_size, self.hi)

    def __iter__(self):
        lo, hi = self.worker_range(*_worker())
        for pos, where, sample in read_range(self.split, lo, hi):
            img, label = decode(sample, where)
            yield (self.transform(img) if self.transform is not None else img), label, pos


def epoch_order(split: ShardSplit, seed: int, epoch: int) -> list[int]:
    """The shard order of an epoch: a permutation drawn from (seed, epoch)."""
    return [int(i) for i in np.random.default_rng([seed, epoch, 0x5A4D]).permutation(len(split.files))]


class TrainStream(IterableDataset):
    """This rank's part of the epoch's training stream (module docstring); ``set_epoch`` before each epoch.
    len() is the samples of the rank's whole batches, so a training loader (drop_last) has exactly
    (ceil(N / world) // batch) batches on every rank."""

    def __init__(self, split: ShardSplit, seed: int, rank: int, world_size: int, batch_size: int, transform=None,
                 buffer: int | None = None):
        self.split, self.seed, self.rank, self.world_size = split, seed, rank, world_size
        self.batch_size, self.transform, self.epoch = batch_size, transform, 0
        self.buffer = SHUFFLE_BUFFER if buffer is None else buffer
        n = split.num_samples
        self.per_rank = -(-n // world_size)
        self.batches = self.per_rank // batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.batches * self.batch_size

    def _segments(self, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """(shard, first, stop) pieces of positions lo..hi-1 of the epoch stream (positions wrap around N)."""
        order, n = epoch_order(self.split, self.seed, self.epoch), self.split.num_samples
        starts = np.cumsum([0] + [self.split.lengths[i] for i in order])
        pieces = []
        p = lo
        while p < hi:
            q = p % n
            j = int(np.searchsorted(starts, q, side="right") - 1)
            take = min(int(starts[j + 1]) - q, hi - p)
            pieces.append((order[j], q - int(starts[j]), q - int(starts[j]) + take))
            p += take
        return pieces

    def worker_range(self, worker: int, workers: int) -> tuple[int, int]:
        b0, b1 = _part(self.batches, worker, workers)
        base = self.rank * self.per_rank
        return base + b0 * self.batch_size, base + b1 * self.batch_size

    def samples(self, worker: int = 0, workers: int = 1) -> Iterator[tuple[str, dict]]:
        """(where, sample) of this worker's share of the epoch, shuffled through the seeded buffer."""
        lo, hi = self.worker_range(worker, workers)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker, 0x5348])
        buf: list[tuple[str, dict]] = []
        for shard, a, b in self._segments(lo, hi):
            seen = 0
            path = self.split.files[shard]
            for _pos, key, sample in iter_shard(path, a, b):
                seen += 1
                item = (f"sample {key!r} of shard {path!r}", sample)
                if len(buf) < max(self.buffer, 1):
                    buf.append(item)
                    continue
                j = int(rng.integers(len(buf)))
                buf[j], item = item, buf[j]
                yield item
            if seen != b - a:
                raise ShardError(f"shard {path!r} has fewer samples than {INFO_FILE} says "
                                 f"({self.split.lengths[shard]}); rewrite the shards with snnet shards")
        for j in rng.permutation(len(buf)):
            yield buf[int(j)]

    def __iter__(self):
        """The decoded samples; an image that cannot be decoded is skipped with one warning naming it, and the next
        readable sample is used in its place (twice, as timm's folder dataset uses the next image), so the epoch keeps
        its length and a multi-day run does not end on one bad file (evaluation stops on it: `decode`)."""
        owed = 0  # skipped samples whose places the next readable one fills
        last = None
        for where, sample in self.samples(*_worker()):
            try:
                last = decode(sample, where)
            except UnreadableSample as e:
                _logger.warning(f"warning: skipped training image {where} ({e.reason}); the next image is used in "
                                f"its place: remove or replace it and rewrite the shards")
                owed += 1
                continue
            for _ in range(1 + owed):
                yield self._transformed(*last)
            owed = 0
        if owed and last is None:
            raise ShardError(f"no image of this worker's share of the training shards in {self.split.root!r} can "
                             f"be read; rewrite the shards with snnet shards")
        for _ in range(owed):  # bad samples at the end: the last readable one fills their places
            assert last is not None
            yield self._transformed(*last)

    def _transformed(self, img, label):
        return (self.transform(img) if self.transform is not None else img), label
