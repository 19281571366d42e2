"""WebDataset tar shards: written from an ImageFolder (`write_shards`, ``snnet shards``), checked before a run
(`check_shards`), and read by position (`read_range`) for training, the LS init and an exact evaluation
(``--dataset wds/NAME``: the streams of `snnet.data.datasets`). torch and timm are imported only where a shard is
written or an image member recognised, so the checks load without them.

The layout is timm's (its ``wds/`` reader reads these shards too): a folder of tar files and an ``_info.json``
listing, per split, the shard file names, the samples in each shard and their total::

    {"name": "digits", "num_classes": 10, "classes": ["0", ...],
     "splits": {"train": {"name": "train", "num_samples": 1437, "filenames": ["train-000000.tar", ...],
                          "shard_lengths": [256, ...]}, "val": {...}}}

A sample is the tar members sharing a key: ``<key>.png`` (or .jpg), ``<key>.cls`` (the class index as text) and
``<key>.json`` (the source file name). Shards are read here with Python's tarfile, not timm's reader (which needs
the webdataset package and, for a distributed evaluation, pads or repeats samples), so that:

* evaluation is exact: the split's samples, in shard order, are numbered 0..N-1 (the sample id of a per-image
  prediction); rank r of W evaluates the contiguous range [r*N//W, (r+1)*N//W), split further into whole batches
  per loader worker; a worker opens only the shards its range overlaps and skips, without reading image data, to
  its first sample. Every image is evaluated exactly once, whatever the number of ranks, workers and shards.
* training is deterministic: epoch e's stream is the shards in an order drawn from (seed, e), cut into equal
  contiguous parts per rank (ceil(N/W) samples, wrapping around as torch's DistributedSampler pads), whole batches
  per loader worker, each worker mixing its samples with a shuffle buffer seeded by (seed, e, rank, worker). The
  stream is a function of (seed, epoch, processes, loader workers, batch size), so a resumed run re-reads the
  batches its epoch already trained and continues exactly (the engine's skip of trained batches).
"""
from __future__ import annotations

import functools
import io
import json
import logging
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
from PIL import Image

from snnet.data.options import DataOptions
from snnet.utils.distributed import world
from snnet.utils.errors import SNNetError
from snnet.utils.fileio import FolderLock, atomic_path, write_text_atomic
from snnet.utils.progress import Progress

INFO_FILE = "_info.json"
_logger = logging.getLogger(__name__)
SHUFFLE_BUFFER = int(os.environ.get("SNNET_SHARD_SHUFFLE", "1024"))  # samples a training worker mixes


class ShardError(SNNetError):
    """Shards that cannot be used as they are; the message names the shard and the fix (exit code 2)."""


class UnreadableSample(ShardError):
    """A sample whose image cannot be decoded: evaluation stops on it, training skips it (`reason`: why)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


_BOMB = re.compile(r"\((\d+) pixels\) exceeds limit of (\d+) pixels")


def image_problem(e: BaseException) -> str:
    """Why PIL could not read an image, for the one line that names it: an image over PIL's decompression-bomb limit
    as its size and the limit (PIL.Image.DecompressionBombError, which timm's loader does not catch), else the error's
    type."""
    if isinstance(e, Image.DecompressionBombError):
        m = _BOMB.search(str(e))
        size = f": {int(m.group(1)):,} pixels, over its limit of {int(m.group(2)):,}" if m else ""
        return f"too large for PIL{size}; downscale it"
    return type(e).__name__




def is_shards(dataset: str) -> bool:
    """``--dataset wds/NAME``: WebDataset shards read by this module."""
    return dataset.partition("/")[0].lower() == "wds" and "/" in dataset


# ------------------------------------------------------------------------------------------------- _info.json
@dataclass(frozen=True)
class ShardSplit:
    """One split of a shard folder: its shards (absolute paths), samples per shard, classes."""
    root: str
    name: str
    files: tuple[str, ...]
    lengths: tuple[int, ...]
    num_classes: int | None = None
    classes: tuple[str, ...] | None = None

    @property
    def num_samples(self) -> int:
        return sum(self.lengths)

    def starts(self) -> list[int]:
        """Global position of each shard's first sample."""
        return [int(v) for v in np.cumsum((0,) + self.lengths[:-1])]


def shard_root(data_dir: str, dataset: str = "") -> str:
    """The folder holding ``_info.json``: --data-dir, or its sub-folder NAME of ``wds/NAME``."""
    name = dataset.partition("/")[2]
    if not os.path.isfile(os.path.join(data_dir, INFO_FILE)) and name and \
            os.path.isfile(os.path.join(data_dir, name, INFO_FILE)):
        return os.path.join(data_dir, name)
    return data_dir


def read_info(root: str) -> dict:
    path = os.path.join(root, INFO_FILE)
    if not os.path.isdir(root):
        raise ShardError(f"shard folder {root!r} does not exist; give --data-dir the folder holding the tar shards "
                         f"and {INFO_FILE} (snnet shards FOLDER OUT writes them)")
    if not os.path.isfile(path):
        raise ShardError(f"shard folder {root!r} has no {INFO_FILE}; write the shards with snnet shards FOLDER OUT "
                         f"(or add the file timm's wds reader expects: splits, filenames, shard_lengths)")
    try:
        with open(path) as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise ShardError(f"{path!r} is not readable JSON ({' '.join(str(e).split())[:120]}); rewrite it with "
                         f"snnet shards") from None
    if not isinstance(info, dict) or not isinstance(info.get("splits"), dict) or not info["splits"]:
        raise ShardError(f"{path!r} has no 'splits' object; each split needs name, filenames, shard_lengths and "
                         f"num_samples (snnet shards writes them)")
    return info


def _split_from_info(root: str, info: dict, name: str) -> ShardSplit:
    path = os.path.join(root, INFO_FILE)
    entry = info["splits"][name]
    files, lengths = entry.get("filenames"), entry.get("shard_lengths")
    if not isinstance(files, list) or not isinstance(lengths, list) or not files:
        raise ShardError(f"{path!r}: split {name!r} needs non-empty 'filenames' and 'shard_lengths' lists")
    if len(files) != len(lengths):
        raise ShardError(f"{path!r}: split {name!r} lists {len(files)} shard(s) but {len(lengths)} shard_lengths; "
                         f"rewrite it with snnet shards")
    if any(not isinstance(n, int) or n < 0 for n in lengths):
        raise ShardError(f"{path!r}: split {name!r} has a shard length that is no count ({lengths}); rewrite it")
    total = entry.get("num_samples")
    if total is not None and total != sum(lengths):
        raise ShardError(f"{path!r}: split {name!r} says num_samples {total} but its shard_lengths add up to "
                         f"{sum(lengths)}; rewrite it with snnet shards")
    classes = info.get("classes")
    num_classes = info.get("num_classes", len(classes) if classes else None)
    return ShardSplit(root, name, tuple(os.path.join(root, f) for f in files), tuple(int(n) for n in lengths),
                      int(num_classes) if num_classes is not None else None, tuple(classes) if classes else None)


def find_split(root: str, wanted: str, synonyms: Sequence[str] = ()) -> ShardSplit | None:
    """The split `wanted` (else the first of `synonyms` present) of the shard folder `root`, or None."""
    info = read_info(root)
    for name in (wanted, *[s for s in synonyms if s != wanted]):
        if name in info["splits"]:
            return _split_from_info(root, info, name)
    return None


# ---------------------------------------------------------------------------------------------- reading tars
def _key_ext(member_name: str) -> tuple[str, str]:
    """webdataset's grouping rule: the key is the path up to the first dot of the base name."""
    folder, base = os.path.split(member_name)
    stem, _, ext = base.partition(".")
    return os.path.join(folder, stem) if folder else stem, ext.lower()


def iter_shard(path: str, start: int = 0, stop: int | None = None, what: str = "shard",
               headers_only: bool = False) -> Iterator[tuple[int, str, dict[str, bytes | int]]]:
    """(position in shard, key, {extension: bytes}) of samples start..stop-1 of one tar shard, in order. Samples
    before `start` are skipped by their headers (no data read). With `headers_only` the values are member sizes,
    except ``cls``, which is read. A truncated or unreadable shard is a ShardError naming it."""
    size = os.path.getsize(path) if os.path.exists(path) else None
    if size is None:
        raise ShardError(f"{what} {path!r} is missing; rewrite the shards (snnet shards) or fix {INFO_FILE}")
    try:
        tar = tarfile.open(path, "r:")
    except (tarfile.TarError, OSError) as e:
        raise ShardError(f"{what} {path!r} is not a readable tar file ({e}); rewrite it with snnet shards") from None
    pos, key = -1, None
    sample: dict[str, bytes | int] = {}
    images = frozenset() if headers_only else _image_exts()
    with tar:
        try:
            for m in tar:
                if not m.isfile():
                    continue
                if m.offset_data + m.size > size:
                    raise tarfile.ReadError(f"member {m.name!r} ends past the end of the file")
                k, ext = _key_ext(m.name)
                if k != key:
                    if key is not None and pos >= start:
                        yield pos, key, sample
                    pos, key, sample = pos + 1, k, {}
                    if stop is not None and pos >= stop:
                        return
                if pos < start:
                    continue
                if ext == "cls" or ext in images:  # what decoding needs; the rest: sizes
                    tar.fileobj.seek(m.offset_data)  # (tarfile seeks back to its own offset for the next header)
                    sample[ext] = tar.fileobj.read(m.size)
                else:
                    sample[ext] = m.size
            if key is not None and pos >= start:
                yield pos, key, sample
            tar.fileobj.seek(tar.offset)  # a whole tar ends with two zero blocks; tarfile stops quietly without
            if tar.fileobj.read(1024) != bytes(1024):  # them (a file cut between or inside headers)
                raise tarfile.ReadError(f"no end-of-archive marker after {tar.offset} bytes")
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ShardError(f"{what} {path!r} is truncated or damaged after sample {max(pos, 0)} ({e}); rewrite "
                             f"it with snnet shards") from None


@functools.cache
def _image_exts() -> frozenset[str]:
    """The image members a sample's decoding reads: the image types timm's readers take (timm and torch imported
    here, on first use, so that the format's checks load without them)."""
    from timm.data.readers import get_img_extensions
    return frozenset({e.lstrip(".") for e in get_img_extensions(as_set=True)} | {"jpg", "jpeg", "png", "webp"})


def image_ext(sample: dict) -> str | None:
    """The member of `sample` holding its image (its extension), or None."""
    wanted = _image_exts()
    for ext in sample:
        if ext in wanted:
            return ext
    return None


def check_image_header(data: bytes, where: str) -> None:
    """An image member opened as far as its header (as the folder preflight opens each validation image)."""
    try:
        with Image.open(io.BytesIO(data)):
            pass
    except Exception as e:
        raise ShardError(f"{where}: its image cannot be read ({image_problem(e)}); remove or replace it and rewrite "
                         f"the shards (evaluation does not skip images, so that every count is exact)") from None


def sample_label(sample: dict, where: str) -> int:
    try:
        return int(sample["cls"])
    except (KeyError, ValueError):
        raise ShardError(f"{where} has no readable .cls member (the class index as text); rewrite the shard "
                         f"with snnet shards") from None


def decode(sample: dict, where: str):
    """(PIL RGB image, class index) of one sample, decoded as timm's ImageDataset decodes a file."""
    ext = image_ext(sample)
    if ext is None:
        raise ShardError(f"{where} has no image member ({', '.join(sample) or 'nothing'}); rewrite the shard")
    try:
        img = Image.open(io.BytesIO(sample[ext])).convert("RGB")
    except Exception as e:
        raise UnreadableSample(f"{where}: its image cannot be read ({image_problem(e)}); remove or replace it "
                               f"(evaluation does not skip images, so that every count is exact)",
                               image_problem(e)) from None
    return img, sample_label(sample, where)


def read_range(split: ShardSplit, lo: int, hi: int) -> Iterator[tuple[int, str, dict]]:
    """(global position, where, sample) of the split's samples lo..hi-1 in shard order, opening only the shards
    that range overlaps."""
    for i, first in enumerate(split.starts()):
        n = split.lengths[i]
        if first + n <= lo or first >= hi:
            continue
        a, b, seen = max(lo - first, 0), min(hi - first, n), 0
        for pos, key, sample in iter_shard(split.files[i], a, b):
            seen += 1
            yield first + pos, f"sample {key!r} of shard {split.files[i]!r}", sample
        if seen != b - a:
            raise ShardError(f"shard {split.files[i]!r} has {a + seen} samples, {INFO_FILE} says {n}; rewrite "
                             f"the shards with snnet shards")


# -------------------------------------------------------------------------------------------- preflight check
def check_shards(data_options: DataOptions, need_train: bool, world_size: int, train_names: Sequence[str],
                 val_names: Sequence[str]):
    """Every shard of the run's splits read as far as its tar headers and class members, before any work: a missing
    or truncated shard, a shard whose samples differ from _info.json, a class index out of range, a sample without
    an image: one line naming the shard. Returns {split name: samples}.

    Under torchrun only rank 0 reads the shards (the other ranks check that every shard exists): distributed_train.sh
    has run the whole check once before the launch."""
    root = shard_root(data_options.data_dir, data_options.dataset)
    info = read_info(root)
    splits = []
    if need_train:
        split = find_split(root, data_options.train_split, train_names)
        if split is None:
            raise ShardError(f"shard folder {root!r} has no {data_options.train_split!r} split in {INFO_FILE} (it has "
                             f"{', '.join(info['splits'])}); pass --train-split")
        splits.append(("train", split))
    val = find_split(root, data_options.val_split, val_names)
    if val is None and not need_train:
        raise ShardError(f"shard folder {root!r} has no validation split in {INFO_FILE} (it has "
                         f"{', '.join(info['splits'])}); pass --val-split")
    if val is not None:
        splits.append(("validation", val))
    wanted = data_options.num_classes
    # what _info.json alone decides: said before the shards are read (and their progress line printed)
    if wanted is not None and splits[0][1].num_classes is not None and wanted < splits[0][1].num_classes:
        raise ShardError(f"--num-classes {wanted} is smaller than the {splits[0][1].num_classes} classes of "
                         f"{INFO_FILE} in {root!r}; raise it or leave it out")
    if data_options.class_map:
        raise ShardError(f"--class-map {data_options.class_map!r} does not apply to shards: their class indices were "
                         f"fixed when they were written (the classes of {INFO_FILE}); drop it, or rewrite the shards "
                         f"from a folder with those classes")
    if need_train and data_options.aug_repeats:
        raise ShardError(f"--aug-repeats {data_options.aug_repeats} needs an indexable dataset; shards are streamed: "
                         f"drop it")
    limit = splits[0][1].num_classes or wanted
    total = sum(len(s.files) for _, s in splits)
    progress = Progress(f"Checking {total} shard(s)", total, seconds=10.0, unit="shards")
    done, counts = 0, {}
    for what, split in splits:
        for path, n in zip(split.files, split.lengths):
            if world(launched=True)[0] != 0:
                if not os.path.isfile(path):
                    raise ShardError(f"{what} shard {path!r} is missing; rewrite the shards (snnet shards) or fix "
                                     f"{INFO_FILE}")
                continue
            seen = 0
            # evaluation counts every image: each validation image's header is opened, as for a folder
            whole = what == "validation"
            for _pos, key, sample in iter_shard(path, headers_only=not whole):
                seen += 1
                where = f"sample {key!r} of {what} shard {path!r}"
                ext = image_ext(sample)
                if ext is None:
                    raise ShardError(f"{where} has no image member ({', '.join(sample)}); rewrite the shard")
                if whole:  # read whole (not headers_only): the image member's bytes
                    check_image_header(cast(bytes, sample[ext]), where)
                label = sample_label(sample, where)
                if label < 0 or (limit is not None and label >= limit):
                    raise ShardError(f"{where} has class index {label}, out of range 0..{(limit or 1) - 1} "
                                     f"({'num_classes in ' + INFO_FILE if split.num_classes else '--num-classes'}); "
                                     f"fix the shard or the class count")
            if seen != n:
                raise ShardError(f"{what} shard {path!r} holds {seen} samples but {INFO_FILE} says {n}; rewrite the "
                                 f"shards with snnet shards (or fix its shard_lengths)")
            done += 1
            progress.update(done, 1)
        counts[what] = split.num_samples
        if split.num_samples == 0:
            raise ShardError(f"the {what} split {split.name!r} of {root!r} has no samples")
    return counts


# ------------------------------------------------------------------------------------------------- writing
def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # reproducible: the same folder gives the same bytes
    tar.addfile(info, io.BytesIO(data))


_SHARD_NAME = re.compile(r"^[\w.-]+-\d{6}\.tar$")


#: written first by `write_shards` (the request: name, shard size, source folders), removed after _info.json, the
#: last write: OUT holding it without _info.json is a run that was killed, which the same command finishes
REQUEST_FILE = ".snnet-shards.json"


def check_shard_out(out: str, clean: bool, request: dict | None = None) -> list[str] | None:
    """`snnet shards` into a folder that is not empty (docs/robustness.md). The same command again (`request`: name,
    shard size, source folders) finishes its job: OUT holding that request's complete output (its _info.json) needs
    nothing (None), and OUT holding what a killed run of it left (its REQUEST_FILE, no _info.json) is written again
    (its files listed for removal). Other earlier output would stay beside the new _info.json (another --shard-size
    gives other names), so it is refused, or with `clean` listed for removal; a file that is no shard output is
    refused either way (never removed). Returns the files to remove; nothing is removed here."""
    if not os.path.isdir(out):
        return []
    names = sorted(n for n in os.listdir(out) if n != FolderLock.NAME)
    if not names:
        return []
    ours = [n for n in names if _SHARD_NAME.match(n) or n in (INFO_FILE, REQUEST_FILE)
            or (n.startswith(".") and n.endswith(".tmp"))]
    foreign = [n for n in names if n not in ours]
    if foreign:
        raise ShardError(f"OUT {out!r} holds files that are not shards ({', '.join(foreign[:3])}"
                         f"{', ...' if len(foreign) > 3 else ''}); pass an empty or new folder")
    if request is not None and not clean:
        if INFO_FILE in ours and _recorded(os.path.join(out, INFO_FILE)) == request:
            return None
        if INFO_FILE not in ours and _recorded(os.path.join(out, REQUEST_FILE)) == request:
            return [os.path.join(out, n) for n in ours]
    if not clean:
        raise ShardError(f"OUT {out!r} already holds {len(ours)} file(s) of an earlier snnet shards run (e.g. "
                         f"{ours[0]}): they would stay beside the new {INFO_FILE}; pass --clean to replace them, or "
                         f"another OUT")
    return [os.path.join(out, n) for n in ours]


def _recorded(path: str) -> dict | None:
    """The request a REQUEST_FILE or _info.json recorded (None when unreadable or absent)."""
    try:
        with open(path) as f:
            return json.load(f).get("request")
    except (OSError, ValueError, AttributeError):
        return None


def check_image_bytes(data: bytes, path: str) -> None:
    """A packed image decoded as timm's loader will decode it: every byte (a JPEG at 1/8 scale, which still reads its
    whole stream, so a cut file is found). One line naming the file. (Its header and bit depth were checked before
    any shard was written: `snnet.data.datasets.write_folder_shards`.)"""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
    except Exception as e:
        raise ShardError(f"image {path!r} cannot be read ({type(e).__name__}); remove or replace it before writing "
                         f"shards (training and evaluation would stop at it); no shard was kept") from None


def shards_request(splits: dict[str, str], shard_size: int, name: str) -> dict:
    """What a `snnet shards` command asks for, as its output records it (a rerun compares it)."""
    return {"name": name, "shard_size": shard_size,
            "source": {s: os.path.abspath(folder) for s, folder in splits.items()}}


def write_shards(splits: dict[str, str], out: str, shard_size: int, name: str, clean: bool = False) -> dict:
    """Split folders of an ImageFolder ({split name: folder}, from `snnet.data.datasets.write_folder_shards`, which
    checks them) as WebDataset shards in `out`, samples in the order timm's folder reader lists them (so a sample id
    of the shards is the image's index in the folder evaluation). Each shard and then ``_info.json`` are written
    atomically (temp file, rename); progress is logged. Returns the info written."""

    from timm.data.readers.reader_image_folder import ReaderImageFolder

    if shard_size < 1:
        raise ShardError(f"--shard-size {shard_size} must be at least 1 (samples per shard)")
    readers: dict[str, ReaderImageFolder] = {}
    classes: list[str] = []
    first_split = ""
    for s, folder in splits.items():
        reader = ReaderImageFolder(folder)
        if not len(reader):
            raise ShardError(f"{s} folder {folder!r} has no images")
        names = sorted(reader.class_to_idx, key=reader.class_to_idx.get)
        if not first_split:
            classes, first_split = names, s
        elif names != classes:
            only = lambda a, b: ", ".join(repr(c) for c in a if c not in b) or "none"
            raise ShardError(f"split folders {splits[first_split]!r} and {folder!r} have different classes (only "
                             f"in {first_split}/: {only(classes, names)}; only in {s}/: {only(names, classes)}): timm "
                             f"numbers each split's classes separately, so the labels would not match; give every "
                             f"split the same class folders")
        readers[s] = reader
    total = sum(len(r) for r in readers.values())
    progress = Progress(f"Writing shards of {total} images", total, seconds=10.0)
    request = shards_request(splits, shard_size, name)
    info = {"name": name, "num_classes": len(classes), "classes": classes, "splits": {}, "request": request}
    with FolderLock(out, "OUT"):  # one snnet shards per OUT: a rerun never removes a running one's files
        stale = check_shard_out(out, clean, request)
        if stale is None:  # this command's complete output: read it back, write nothing
            with open(os.path.join(out, INFO_FILE)) as info_file:
                done = json.load(info_file)
            now = {s: len(r) for s, r in readers.items()}
            if {s: v.get("num_samples") for s, v in done.get("splits", {}).items()} != now:
                raise ShardError(f"OUT {out!r} holds the shards of an earlier run of this command, but the folders "
                                 f"now hold other images ({now}); pass --clean to write them again")
            return done
        for path in stale:  # --clean, or a killed run of this command: removed only now, every check passed
            os.remove(path)
        write_text_atomic(os.path.join(out, REQUEST_FILE), json.dumps({"request": request}) + "\n")
        written: list[str] = []
        try:
            _write_splits(readers, splits, out, shard_size, info, progress, written)
        except BaseException:  # a bad image found mid-way (or a full disk): no shards without their _info.json
            for f in written:
                os.remove(f)
            os.remove(os.path.join(out, REQUEST_FILE))
            raise
        write_text_atomic(os.path.join(out, INFO_FILE), json.dumps(info, indent=1) + "\n")
        os.remove(os.path.join(out, REQUEST_FILE))
    return info


def _write_splits(readers: dict, splits: dict[str, str], out: str, shard_size: int, info: dict, progress,
                  written: list[str]) -> None:
    done = 0
    for s, reader in readers.items():
        files: list[str] = []
        lengths: list[int] = []
        for first in range(0, len(reader), shard_size):
            fname = f"{s}-{len(files):06d}.tar"
            with atomic_path(os.path.join(out, fname)) as tmp:
                with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
                    for index in range(first, min(first + shard_size, len(reader))):
                        path, target = reader.samples[index]
                        ext = os.path.splitext(path)[1].lower().lstrip(".")
                        ext = "jpg" if ext == "jpeg" else ext
                        key = f"{index:08d}"
                        with open(path, "rb") as f:
                            data = f.read()
                        check_image_bytes(data, path)
                        _tar_member(tar, f"{key}.{ext}", data)
                        _tar_member(tar, f"{key}.cls", str(int(target)).encode())
                        rel = os.path.relpath(path, splits[s])
                        _tar_member(tar, f"{key}.json", json.dumps({"filename": rel}).encode())
                        done += 1
                        progress.update(done, 1)
            written.append(os.path.join(out, fname))
            files.append(fname)
            lengths.append(min(shard_size, len(reader) - first))
        info["splits"][s] = {"name": s, "num_samples": len(reader), "filenames": files, "shard_lengths": lengths}
