"""`snnet quickstart DATA --out DIR`: the digits demo (snnet/demo.py) for your own images, offline and from scratch.

0. checks everything before any work (`preflight`; nothing is written before it passes): the options, DATA's
   layout, every image (read to its end: a file that cannot be trained on is skipped with a warning naming it),
   the classes, what --out already holds, and each step's train.py command as train.py would check it (the stitch
   config built on the meta device included);
1. looks at the data (one folder per class, which is split 80/20 per class, or train/ and val/, laid out in DIR/data
   as links to the images; or tar shards or parquet files), counts the images per class and measures their size;
2. chooses the anchors, the image size, the epochs, the batch and the processes from that, and prints each choice
   with the flag that changes it (`plan`);
3. trains the anchors from scratch as plain models (train.py --model, all at once on several cores: the demo's
   `train_anchor`), or with --anchors NAME ... fine-tunes those timm models (from timm's pretrained weights, which
   must be cached or reachable, unless --no-pretrained);
4. writes the stitch config (DIR/stitch_config.json) and trains the SN-Net on every core with the launcher of
   distributed_train.sh (the demo's `train_snnet`);
5. keeps the trained SN-Net (DIR/results/snnet.pth.tar), evaluates every stitch from that file and writes what the
   demo writes: stitches_res.txt, the Pareto table and plot with the no-training baselines, and report.html.

Every step's full log is a file in DIR; the console gets each step's progress line (epoch, loss, ETA) and, once,
every warning a step writes. A step that fails starts no other. A second run with the same arguments on the same
DATA reuses every finished step and continues an interrupted one where it stopped (train.py --auto-resume); changed
arguments redo the steps they change; a changed DATA (DIR/data/split.json records every image it was split from,
with its size and time) is refused until --fresh, which starts from nothing. Nothing here needs the network.

Why small CNNs (docs/own_data.md, "What quickstart chooses"): a ViT trained from scratch on a few hundred images
per class barely leaves chance in the time a CNN needs to pass 90 %, and ResNets of one depth and different widths
stitch stage by stage like SN-Net's ResNet pairs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import shlex
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snnet.data.checks import (
    TEST_NAMES,
    TRAIN_NAMES,
    VAL_NAMES,
    WARNED_ENV,
    first_names,
    img_extensions,
    pillow_extensions,
    small_class_warning,
    split_folder,
    unusable_image,
)
from snnet.data.options import CLASS_FOLDERS
from snnet.results.predictions import load_for
from snnet.results.records import RESULTS_FILE, ResultsError, file_sha256, read_results
from snnet.utils.distributed import usable_cores
from snnet.utils.errors import SNNetError, UsageError, one_line
from snnet.utils.fileio import FolderLock, data_folder, write_text_atomic

#: the anchors quickstart trains from scratch: timm's resnet34 with its 16 basic blocks laid out 1, 1, 8 and 6 over
#: its 4 stages (`anchor_kwargs`); labels c<w>. Stitches join two anchors between neighbouring blocks of the two deep
#: stages, 12 per pair of neighbouring anchors, as SN-Net stitches ResNet-50's 6-block stage: a stitch that leaves
#: the larger anchor before stage 2 passes its features through the smaller anchor's 4- and 8-channel early blocks,
#: which lose what the larger one saw
FAMILY = "resnet34"
LAYERS = (1, 1, 8, 6)


def anchor_kwargs(width: int, smallest: int | None = None) -> dict:
    """timm's resnet34 with LAYERS blocks at stage widths up to w, 2w, 4w, 8w, and the stem of the smallest anchor
    (first-stage width `smallest`, default `width`): 3x3 convs of s/2, s/2 and s channels (timm's "deep" stem;
    its default stem, a 7x7 conv, has 64 channels whatever `stem_width` says: at 64 px that alone is 9.6 MFLOPs).
    The two early stages are at most twice the smallest anchor's width: every stitch runs the larger anchor's stem
    and early stages, so they set the cost of the cheapest stitch (here about 1.5x the smallest anchor's FLOPs; with
    w and 2w there, about 2.6x) while its late stages carry its accuracy."""
    s = width if smallest is None else smallest
    return {"layers": list(LAYERS), "channels": [min(width, 2 * s), min(2 * width, 4 * s), 4 * width, 8 * width],
            "stem_type": "deep", "stem_width": (s + 1) // 2}


#: the anchors' first-stage widths: two anchors 3x apart, about 7x apart in FLOPs, so that they differ in accuracy
#: as they differ in cost and the stitches between them have room above the line that mixes them
WIDTHS = (4, 12)
#: the stages the CNN anchors are stitched in: the two deep ones (stages 0 and 1 hold one block each)
STITCH_STAGES = (2, 3)
#: which anchor runs first in a stitch: the larger (its stem and blocks up to the stitch, then the smaller anchor's
#: remaining blocks and head). The larger anchor's early stages carry most of its advantage and its late ones most
#: of its FLOPs, so these networks keep much of its accuracy at a fraction of its cost; the smaller in front,
#: SN-Net's way, passes the smaller anchor's narrow early features on and scores about as the smaller anchor at
#: several times its FLOPs
STITCH_PLAN = "large_to_small"
#: BatchNorm running statistics in the SN-Net: one set per stitch for the anchor blocks after it, so that neither the
#: stitches nor the anchors evaluate with statistics blended from every route (no-op for anchors without BatchNorm)
BN_STATS = "per_stitch"
VAL_SHARE = 0.2  # the share of each class a folder without train/ and val/ gives to validation (seeded, by file)
#: the optimizer steps each anchor gets at least (few images: more epochs), within EPOCHS, in batches of
#: ANCHOR_BATCH; fewer leave the anchors still learning when they stop
MIN_STEPS = 600
EPOCHS = (30, 60)
#: the SN-Net's epochs as a share of the anchors': each step trains one sampled route, so a stitching layer learns
#: in a fraction of the steps and needs as many epochs as an anchor; its batches are BATCH, a quarter of the anchors'
SNNET_SHARE = 1.0
#: the SN-Net's LR for the stitching layers, and the anchors' share of it (--anchor-lr-scale): the trained anchors
#: keep 5e-4 (at the demo's 1e-3 they lose points), the new, small stitching layers learn at 10x (docs/own_data.md)
SNNET_LR, SNNET_ANCHOR_LR_SCALE = 5e-3, 0.1
BATCH = 32  # images per batch and process, or fewer where each SN-Net process draws fewer an epoch
#: the anchors' batch (one process each): these small CNNs spend most of a step's time outside the convolutions,
#: so a larger batch trains more images a second
ANCHOR_BATCH = 128
#: validate every 5th epoch and the last: quickstart reads only the last, and each validation is a pass over the
#: validation images
VAL_INTERVAL = 5
SEED = 0
SEEDS = 2 ** 31  # --seed takes 0..SEEDS-1: numpy seeds each process with it plus its rank, below 2**32
SPLIT_FILE = "split.json"  # in DIR/data: what the split was made from (DATA, its images' sizes and times, the seed)
#: what quickstart writes in --out (the rest of the folder is left alone); --fresh removes these
PRODUCTS = ("data", "data.tmp", "stitch_config.json", "snnet", "snnet.log", "snnet_eval", "snnet_eval.log",
            "results")
CHECK_QUIETLY = 2000  # images read without a progress line (a few seconds at most)
#: an image whose shorter side is above this (or above twice --img-size, if more) is stored in DIR/data downscaled
#: to it, not linked: every epoch decodes every image, and a 12-Mpx photo decodes ~100x slower than one this size
STORED_SIDE = 256
ODD_FOLDERS = ("__MACOSX",)  # written by macOS archives beside the real folders: hidden, never a class


@dataclass(frozen=True)
class QuickstartOptions:
    """`snnet quickstart`'s options as typed (snnet/cli.py's parser makes them; None: quickstart chooses)."""
    data: str
    out: str
    anchors: list[str] | None = None
    no_pretrained: bool = False
    widths: list[int] | None = None
    stitch_stages: list[int] | None = None
    stitch_plan: str | None = None
    bn_stats: str | None = None
    img_size: int | None = None
    anchor_epochs: int | None = None
    snnet_epochs: int | None = None
    batch: int | None = None
    nproc: int | None = None
    seed: int = SEED
    fresh: bool = False

    @classmethod
    def from_values(cls, values: dict) -> QuickstartOptions:
        """The options from a parser's values (its other keys, such as the command's function, are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


@dataclass
class DataSummary:
    """What quickstart read from the data: the split folders and the images per class of each."""
    root: Path  # the ImageFolder train.py reads (train/ and val/): DIR/data for an image folder
    train: dict[str, int]
    val: dict[str, int]
    side: int  # median shorter side of a sample of the training images (pixels)
    split_made: bool = False  # split by quickstart from one folder per class
    #: train.py's flags that read it when it is not an ImageFolder: --dataset wds/ (tar shards with _info.json) or
    #: hfds/ (a local Hugging Face dataset's parquet files), and the split names found
    flags: tuple[str, ...] = ()
    #: an image folder's split as quickstart lays it out in DIR/data: split -> class -> (image, link name)
    links: dict[str, dict[str, list[tuple[Path, str]]]] = field(default_factory=dict)
    #: what the split is made from: each image under DATA (relative path) -> [size, mtime_ns, why it is skipped or
    #: None]; for shards and parquet, each file
    files: dict[str, list] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # said on the console with the data line
    warnings: list[str] = field(default_factory=list)  # said on stderr once the checks pass

    @property
    def classes(self) -> int:
        return len(self.train)

    @property
    def images(self) -> int:
        return sum(self.train.values())


@dataclass
class Plan:
    """Every choice of a quickstart run; `lines` says each, why, and the flag that changes it."""
    img_size: int
    anchors: list[tuple[str, str, dict]]  # (label, timm name, model_kwargs); model_kwargs {} for --anchors
    pretrained: bool
    stitch_stages: list[int] | None  # None: the anchors' family default
    stitch_plan: str  # the stitch config's "stitch_plan"
    anchor_epochs: int
    snnet_epochs: int
    batch: int  # the SN-Net's, per process
    nproc: int
    lines: list[str] = field(default_factory=list)
    own_cnns: bool = False  # quickstart's CNNs from scratch (not --anchors): SNNET_LR
    anchor_batch: int = 0  # the anchors' (0: `batch`)
    bn_stats: str = "shared"  # the stitch config's "bn_stats"


# ---------------------------------------------------------------------------------------------------- the data
def _hidden(name: str) -> bool:
    return name.startswith(".") or name in ODD_FOLDERS


def read_data(data: Path, out: Path, seed: int = SEED, known: dict[str, list] | None = None) -> DataSummary:
    """The data as quickstart will train on it, read without writing anything: an image folder (one folder per
    class, split VAL_SHARE per class by `seed`, or train/ and val/) with every image checked (`known`: the checks
    of an earlier run, reused for images of the same size and time), or tar shards or parquet files. One line naming
    the folder and the fix when it cannot be used."""
    data_folder(data, "DATA", CLASS_FOLDERS)
    from snnet.data.shards import INFO_FILE
    if (data / INFO_FILE).is_file():
        return _with_files(_read_shards(data), data)
    if any(data.glob("*.parquet")) or any(data.glob("*/*.parquet")):  # the Hub's layouts: data/, <split>/
        return _with_files(_read_parquet(data), data)
    return _read_folder(data, out / "data", seed, known or {})


def _with_files(summary: DataSummary, data: Path) -> DataSummary:
    """Shards or parquet files: every file of DATA (size and time) is what the run is made from."""
    for path in sorted(data.rglob("*")):
        rel = path.relative_to(data)
        if path.is_file() and not any(_hidden(part) for part in rel.parts):
            st = path.stat()
            summary.files[rel.as_posix()] = [st.st_size, st.st_mtime_ns, None]
    return summary


def _walk(top: Path, data: Path, hidden: list[str], seen: dict[str, Path]) -> list[Path]:
    """Every file under `top` (links followed, as timm's reader follows them), hidden files and folders left out
    (named in `hidden`, relative to `data`). A folder reached twice through links (`seen`: each folder walked so
    far, by its real path) is one line: its images would be read twice, in the training and the validation split
    alike."""
    found: list[Path] = []
    stack = [top]
    while stack:
        folder = stack.pop()
        real = os.path.realpath(folder)
        if real in seen:
            raise UsageError(f"DATA {str(data)!r}: {str(folder)!r} and {str(seen[real])!r} are the same folder "
                             f"(through a symlink): its images would be read twice; remove the link")
        seen[real] = folder
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name, reverse=True)
        except OSError as e:
            raise UsageError(f"DATA {str(data)!r}: folder {str(folder)!r} cannot be listed ({e.strerror or e}); fix "
                             f"its permissions or remove it") from None
        for entry in entries:
            path = Path(entry.path)
            if _hidden(entry.name):
                hidden.append(path.relative_to(data).as_posix() + ("/" if entry.is_dir() else ""))
            elif entry.is_dir():
                stack.append(path)
            elif entry.is_file() or entry.is_symlink():  # a link to nothing: named as an image left out
                found.append(path)
    return sorted(found)


def _check_images(paths: list[Path], data: Path, known: dict[str, list]) -> dict[str, list]:
    """[size, mtime_ns, why it cannot be trained on or None] of each image, by its path relative to `data`: read to
    its end (`unusable_image`, on every core), or taken from `known` when its size and time are the same."""
    record, todo = {}, []
    for path in paths:
        rel = path.relative_to(data).as_posix()
        try:
            st = path.stat()
        except OSError as e:  # a link whose target is gone (an unmounted disk, a moved folder)
            what = f"a link to {os.readlink(path)!r} that" if path.is_symlink() else "it"
            record[rel] = [0, 0, f"{what} cannot be read ({e.strerror or type(e).__name__})"]
            continue
        old = known.get(rel)
        if old is not None and old[:2] == [st.st_size, st.st_mtime_ns]:
            record[rel] = old
        else:
            record[rel] = [st.st_size, st.st_mtime_ns, None]
            todo.append((rel, path))
    if todo:
        from snnet.utils.progress import Progress
        progress = Progress("Checking images", len(todo), seconds=10.0) if len(todo) > CHECK_QUIETLY else None
        with ThreadPoolExecutor(max_workers=min(8, usable_cores())) as pool:
            for i, ((rel, _), problem) in enumerate(zip(todo, pool.map(lambda t: unusable_image(str(t[1])), todo))):
                record[rel][2] = problem
                if progress is not None:
                    progress.update(i + 1, 1)
    return record


def _copies(sizes: Mapping[Path, int]) -> list[list[Path]]:
    """The groups of two or more byte-identical files among `sizes`' (each group sorted, groups by their first file):
    by the sizes already read first, so only files of one size are read and hashed."""
    by_size: dict[int, list[Path]] = {}
    for path, size in sizes.items():
        by_size.setdefault(size, []).append(path)
    groups: dict[bytes, list[Path]] = {}
    for same in (ps for ps in by_size.values() if len(ps) > 1):
        for path in same:
            digest = hashlib.blake2b(path.read_bytes(), digest_size=16).digest()
            groups.setdefault(digest, []).append(path)
    return sorted((sorted(g) for g in groups.values() if len(g) > 1), key=lambda g: g[0])


def _split_dirs(data: Path) -> tuple[Path | None, Path | None]:
    """DATA's train and validation folders, or None: the first of TRAIN_NAMES and of VAL_NAMES there, in any case
    (Train/, VAL/); beside a train folder without a validation one, a test folder (TEST_NAMES) is the validation
    folder, since quickstart evaluates the last weights of each run and chooses nothing on them."""
    train, val = (split_folder(str(data), names[0], names) for names in (TRAIN_NAMES, VAL_NAMES))
    if val is None and train is not None:
        val = split_folder(str(data), TEST_NAMES[0], TEST_NAMES)
    return (None if train is None else Path(train)), (None if val is None else Path(val))


def _read_folder(data: Path, dest: Path, seed: int, known: dict[str, list]) -> DataSummary:
    """An image folder as quickstart lays it out in `dest`: the classes are the folders directly under DATA (or under
    its train/ and val/), each with every image below it; hidden files and folders, files of other kinds and images
    that cannot be read are left out, each kind said in one warning naming the files."""
    train, val = _split_dirs(data)
    if (train is None) != (val is None):
        raise UsageError(f"DATA {str(data)!r} has {(train or val).name}/ but no "  # type: ignore[union-attr]
                         f"{'val/ (or validation/, test/)' if train else 'train/'}; add it, or give one folder per "
                         f"class (quickstart then splits it {1 - VAL_SHARE:.0%}/{VAL_SHARE:.0%})")
    roots = {"train": train, "val": val} if train is not None and val is not None else {"all": data}
    hidden: list[str] = []
    loose: list[str] = []  # files beside the class folders, and folders beside train/ and val/
    classes: dict[str, dict[str, list[Path]]] = {}
    seen: dict[str, Path] = {}
    for split, root in roots.items():
        assert root is not None
        classes[split] = {}
        for entry in sorted(os.scandir(root), key=lambda e: e.name):
            if _hidden(entry.name):
                hidden.append(Path(entry.path).relative_to(data).as_posix() + ("/" if entry.is_dir() else ""))
            elif entry.is_dir():
                classes[split][entry.name] = _walk(Path(entry.path), data, hidden, seen)
            else:
                loose.append(Path(entry.path).relative_to(data).as_posix())
    if "all" not in roots:
        loose += [e.name + "/" for e in os.scandir(data) if e.is_dir() and not _hidden(e.name)
                  and Path(e.path) not in (train, val)]
    timm_ext, pillow_ext = img_extensions(), pillow_extensions()
    others = [p for files in (f for c in classes.values() for f in c.values()) for p in files
              if p.suffix.lower() not in pillow_ext | timm_ext]
    images = {s: {c: [p for p in files if p.suffix.lower() in pillow_ext | timm_ext] for c, files in cs.items()}
              for s, cs in classes.items()}
    record = _check_images([p for cs in images.values() for files in cs.values() for p in files], data, known)
    summary = DataSummary(dest, {}, {}, 0, split_made="all" in roots, files=record)
    where = f"DATA {str(data)!r}"
    if val is not None and val.name.lower() in TEST_NAMES:
        summary.notes.append(f"data: {where} has no val/: its {val.name}/ is the validation split (every stitch is "
                             f"evaluated on it; nothing is chosen on it)")
    if hidden:
        summary.warnings.append(f"warning: {where}: {len(hidden)} hidden file(s) and folder(s) left out "
                                f"({first_names(hidden)}): timm would read a hidden image (macOS's ._ files are not "
                                f"images) and make a hidden folder a class")
    if loose:
        beside = "train/ and val/" if "all" not in roots else "the class folders"
        summary.warnings.append(f"warning: {where}: {len(loose)} file(s) or folder(s) beside {beside} left out "
                                f"({first_names(loose)}): the classes are the folders "
                                f"{'in train/ and val/' if 'all' not in roots else 'in DATA'}")
    if others:
        summary.warnings.append(f"warning: {where}: {len(others)} file(s) left out, {_not_images(others, data)}")
    bad = [(rel, r[2]) for rel, r in record.items() if r[2] is not None]
    if bad:
        summary.warnings.append(f"warning: {where}: {len(bad)} image(s) skipped, they cannot be trained on: "
                                + "; ".join(f"{rel!r}: {why}" for rel, why in bad[:5])
                                + (f"; and {len(bad) - 5} more" if len(bad) > 5 else ""))
    extra = sorted({p.suffix.lower() for cs in images.values() for fs in cs.values() for p in fs
                    if p.suffix.lower() not in timm_ext and record[p.relative_to(data).as_posix()][2] is None})
    if extra:
        summary.notes.append(f"data: {'/'.join(extra)} images are read too (linked in {dest} under a .png name: "
                             f"timm's reader lists {', '.join(sorted(timm_ext))} files only, Pillow reads them by "
                             f"their content)")
    nested = sorted({f"{c}/{p.relative_to(root / c).parts[0]}" for s, root in roots.items() if root is not None
                     for c, fs in images[s].items() for p in fs if len(p.relative_to(root / c).parts) > 1})
    if nested:
        summary.warnings.append(f"warning: {where}: class folders hold sub-folders ({first_names(nested)}): each "
                                f"class is a folder directly under "
                                f"{'train/ and val/' if 'all' not in roots else 'DATA'}, with every image below it; "
                                f"if the sub-folders are the classes, make them the top folders")
    usable = {s: {c: [p for p in fs if record[p.relative_to(data).as_posix()][2] is None] for c, fs in cs.items()}
              for s, cs in images.items()}
    _check_classes(usable, images, data, roots, record, others)
    copies = _copies({p: record[p.relative_to(data).as_posix()][0] for cs in usable.values() for fs in cs.values()
                      for p in fs})
    label = {p: (s, c) for s, cs in usable.items() for c, fs in cs.items() for p in fs}
    both = [g for g in copies if len({label[p][1] for p in g}) > 1]
    if both:
        summary.warnings.append(f"warning: {where}: {len(both)} image(s) are in two or more classes as identical "
                                f"files ({_pairs(both, data, lambda p: label[p][1])}): one photo, two labels; keep "
                                f"each in one class")
    kept = [g for g in copies if "all" in roots and len({label[p][1] for p in g}) == 1]
    if kept:
        summary.notes.append(f"data: {len(kept)} image(s) have identical copies in their class "
                             f"({_pairs(kept, data)}), each kept on one side of the split: no validation image is a "
                             f"copy of a training one")
    leaks = [g for g in copies if "all" not in roots and len({label[p][0] for p in g}) > 1]
    if leaks:
        summary.warnings.append(f"warning: {where}: {len(leaks)} validation image(s) are identical to training "
                                f"images ({_pairs(leaks, data, lambda p: label[p][0])}): their top-1 is not held "
                                f"out; remove one copy")
    return _split(summary, usable, data, roots, seed, copies)


def _pairs(groups: list[list[Path]], data: Path, key=lambda p: p, n: int = 3) -> str:
    """'a/1.png'='b/7.png', ... for the first `n` groups of identical files: of each group, the first file of each
    `key` (its class, its split)."""
    def firsts(g: list[Path]) -> list[Path]:
        one: dict = {}
        for p in g:
            one.setdefault(key(p), p)
        return list(one.values())[:3]
    said = ["=".join(repr(p.relative_to(data).as_posix()) for p in firsts(g)) for g in groups[:n]]
    return ", ".join(said) + (f" and {len(groups) - n} more" if len(groups) > n else "")


def _not_images(paths: Sequence[Path], data: Path) -> str:
    """What files of other kinds are, named: "not images Pillow reads here (...)", with the fix for HEIC photos."""
    heic = any(p.suffix.lower() in (".heic", ".heif") for p in paths)
    return (f"not images Pillow reads here ({first_names([p.relative_to(data).as_posix() for p in paths])})"
            + ("; HEIC photos (an iPhone's) are read once pillow-heif is installed (pip install pillow-heif), or "
               "convert them to JPEG" if heic else ""))


def _check_classes(usable: dict[str, dict[str, list[Path]]], images: dict[str, dict[str, list[Path]]], data: Path,
                   roots: Mapping[str, Path | None], record: Mapping[str, list], others: Sequence[Path] = ()) -> None:
    """Enough classes, each with enough usable images (two, or one in each of train/ and val/), the same classes
    in train/ and val/; a class folder without any image file is no class (it is left out, said by the caller).
    `record`: each image's check, whose most common reason a refusal names; `others`: the files of other kinds,
    which a refusal names too (its warnings are not printed)."""
    where = f"DATA {str(data)!r}"
    if others and not any(fs for cs in images.values() for fs in cs.values()):
        raise UsageError(f"{where}: no class folder holds an image; its {len(others)} file(s) are "
                         f"{_not_images(others, data)}")
    for split, cs in usable.items():
        for c, files in cs.items():
            need = 2 if split == "all" else 1
            if images[split][c] and len(files) < need:
                kept = set(files)
                skipped = [record[p.relative_to(data).as_posix()][2] for p in images[split][c] if p not in kept]
                folder = c if split == "all" else f"{roots[split].name}/{c}"  # type: ignore[union-attr]
                least = "2 per class (one to train on, one to validate)" if need == 2 else "1 in each of train/, val/"
                why = max(set(skipped), key=skipped.count) if skipped else ""
                some = f"{skipped.count(why)} of them " if skipped.count(why) < len(skipped) else ""
                beside = [p for p in others if roots[split] / c in p.parents]  # type: ignore[operator]
                left = f"; {len(beside)} other file(s) there are {_not_images(beside, data)}" if beside else ""
                raise UsageError(f"{where}: class {c!r} has {len(files)} usable image(s) in {folder!r}"
                                 f"{f' ({len(skipped)} skipped, {some}{why})' if skipped else ''}{left}; quickstart "
                                 f"needs at least {least}: add images, or move the folder out")
    named = {s: {c for c, fs in cs.items() if images[s][c]} for s, cs in usable.items()}
    if "train" in named and named["train"] and not named["val"]:  # an unlabelled test set (a competition's)
        val, train = roots["val"], roots["train"]
        assert val is not None and train is not None
        raise UsageError(f"{where}: {val.name}/ holds no class folder with images, so nothing in it can be scored; "
                         f"give {str(train)!r} as DATA (quickstart then splits it {1 - VAL_SHARE:.0%}/"
                         f"{VAL_SHARE:.0%}), or sort {val.name}/'s images into class folders")
    if "train" in named and named["train"] != named["val"]:
        only_train, only_val = sorted(named["train"] - named["val"]), sorted(named["val"] - named["train"])
        parts = ([f"only in train/: {first_names(only_train)}"] if only_train else []) + \
                ([f"only in val/: {first_names(only_val)}"] if only_val else [])
        raise UsageError(f"{where}: train/ and val/ hold different classes ({'; '.join(parts)}); give both the same "
                         f"class folders, each with images")
    classes = sorted(named.get("all", named.get("train", set())))
    if not classes:
        raise UsageError(f"{where} has no class sub-folders with images; lay it out as {data}/<class>/<image> (or "
                         f"{data}/train/<class>/ and {data}/val/<class>/)")
    if len(classes) < 2:
        raise UsageError(f"{where} holds one class, {classes[0]!r}: a classifier needs at least 2 (one folder of "
                         f"images per class); if {classes[0]!r} holds the classes as sub-folders, give "
                         f"{str(data / classes[0])!r} as DATA")


def _split(summary: DataSummary, usable: dict[str, dict[str, list[Path]]], data: Path,
           roots: Mapping[str, Path | None], seed: int, copies: Sequence[list[Path]] = ()) -> DataSummary:
    """The split as DIR/data will hold it (`write_split`): one folder per class split VAL_SHARE per class (seeded,
    by file name; the identical files of a group in `copies` on one side, so that no validation image is a copy of
    a training one), or train/ and val/ as they are; each image under a link name timm's reader lists (its path
    below the class, '/' as '__', '.png' added to another format's name)."""
    timm_ext = img_extensions()
    if "all" in usable:
        rng = random.Random(seed)
        parts: dict[str, dict[str, list[Path]]] = {"train": {}, "val": {}}
        group = {p: g for g in copies for p in g}
        for c, files in sorted(usable["all"].items()):
            if not files:
                continue
            files = sorted(files)
            in_class, placed, units = set(files), set(), []
            for f in files:  # each file alone, or with its copies in this class
                if f not in placed:
                    units.append([p for p in group.get(f, [f]) if p in in_class])
                    placed.update(units[-1])
            if len(units) < 2:  # one image in copies: a copy validates
                units = [[f] for f in files]
            rng.shuffle(units)
            n_val, k, taken = max(1, round(VAL_SHARE * len(files))), 0, 0
            while taken < n_val and k < len(units) - 1:  # whole units, a fifth of the files or just over
                taken += len(units[k])
                k += 1
            parts["val"][c] = [f for u in units[:k] for f in u]
            parts["train"][c] = [f for u in units[k:] for f in u]
    else:
        parts = {s: {c: sorted(fs) for c, fs in cs.items() if fs} for s, cs in usable.items()}
    for split, cs in parts.items():
        summary.links[split] = {}
        for c, files in cs.items():
            names: set[str] = set()
            summary.links[split][c] = []
            root = roots["all" if "all" in roots else split]
            assert root is not None
            for f in files:
                name = f.relative_to(root / c).as_posix().replace("/", "__")
                name += "" if f.suffix.lower() in timm_ext else ".png"
                stem, k = name, 1
                while name in names:
                    k += 1
                    name = f"{k}_{stem}"
                names.add(name)
                summary.links[split][c].append((f, name))
    summary.train = {c: len(v) for c, v in summary.links["train"].items()}
    summary.val = {c: len(v) for c, v in summary.links["val"].items()}
    summary.side = _side_of([f for fs in parts["train"].values() for f in fs])
    empty = sorted({c for cs in usable.values() for c, fs in cs.items() if not fs} - set(summary.train))
    if empty:
        summary.warnings.append(f"warning: DATA {str(data)!r}: {len(empty)} class folder(s) without any image left "
                                f"out ({first_names(empty)})")
    line = small_class_warning(summary.train, f"DATA {str(data)!r}")
    if line:
        summary.warnings.append(line)
    return summary


def write_split(summary: DataSummary, out: Path, record: dict) -> int:
    """DIR/data: the split (an image folder's: a link to each image, or a downscaled copy of a large one, `_store`)
    and `record` (split.json: what it was made from; its "stored_side", else STORED_SIDE), written whole under
    another name and then renamed, so that an interrupted run leaves no half split. Returns the images copied."""
    dest = out / "data"
    tmp = out / "data.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    todo = []
    for split, cs in summary.links.items():
        for c, links in cs.items():
            folder = tmp / split / c
            folder.mkdir(parents=True)
            todo += [(f, folder / name) for f, name in links]
    side = record.get("stored_side", STORED_SIDE)
    from snnet.utils.progress import Progress
    progress = Progress("Writing the split", len(todo), seconds=10.0) if len(todo) > CHECK_QUIETLY else None
    copied = 0
    with ThreadPoolExecutor(max_workers=min(8, usable_cores())) as pool:
        for i, stored in enumerate(pool.map(lambda t: _store(t[0], t[1], side), todo)):
            copied += stored
            if progress is not None:
                progress.update(i + 1, 1)
    write_text_atomic(tmp / SPLIT_FILE, json.dumps(record) + "\n")
    if dest.is_symlink() or dest.is_file():
        dest.unlink()
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return copied


def _store(src: Path, dst: Path, side: int) -> bool:
    """`dst` as a link to the image `src`, or, where its shorter side is above `side`, as an RGB copy downscaled to
    that side (as timm's loader converts it; a JPEG decoded at a fraction of its size first). True for a copy."""
    from PIL import Image
    with Image.open(src) as img:
        w, h = img.size
        if min(w, h) <= side:
            dst.symlink_to(src.resolve())
            return False
        size = (max(1, round(w * side / min(w, h))), max(1, round(h * side / min(w, h))))
        if img.format == "JPEG":
            img.draft("RGB", size)
        small = img.convert("RGB").resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    small.save(dst, **({"quality": 95} if dst.suffix.lower() in (".jpg", ".jpeg") else {}))
    return True


def _split_record(data: Path, summary: DataSummary, seed: int, img_size: int) -> dict:
    return {"data": str(data), "seed": seed, "val_share": VAL_SHARE, "files": summary.files,
            "stored_side": max(STORED_SIDE, 2 * img_size)}


def _recorded(out: Path) -> dict | None:
    try:
        record = json.loads((out / "data" / SPLIT_FILE).read_text())
        return record if isinstance(record, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def _class_of(rel: str) -> str:
    """The class folder of an image's path relative to DATA (its first folder, or the one in train/ or val/)."""
    parts = rel.split("/")
    return parts[1] if parts[0].lower() in (*TRAIN_NAMES, *VAL_NAMES, *TEST_NAMES) and len(parts) > 2 else parts[0]


def _fresh_fix(out: Path) -> str:
    return f"pass --fresh to start over in {str(out)!r} (its split, anchors, SN-Net and results are replaced), or " \
           f"another --out"


def _recorded_run(out: Path, data: Path, fresh: bool) -> dict | None:
    """The record of the quickstart run --out holds (None: nothing there, or --fresh), refused when it is of
    another DATA, and --out refused when it holds files of quickstart's names but no run's record (another
    program's: neither replaced nor, with --fresh, removed): what needs no image read, checked before the images
    are."""
    recorded = _recorded(out)
    if recorded is None:
        theirs = [n + "/" if (out / n).is_dir() else n for n in PRODUCTS if n != "data.tmp" and (out / n).exists()]
        theirs += sorted(p.name for p in out.glob("anchor_*"))
        if theirs:
            them = "it" if len(theirs) == 1 else "them"
            raise UsageError(f"--out {str(out)!r} holds {', '.join(theirs)} but no quickstart run's record "
                             f"({out / 'data' / SPLIT_FILE}): quickstart would replace {them}; pass another --out")
        return None
    if fresh:
        return None
    if not isinstance(recorded.get("files"), dict):
        raise UsageError(f"--out {str(out)!r} holds a quickstart run without a record of the data it was made from "
                         f"({out / 'data' / SPLIT_FILE}); {_fresh_fix(out)}")
    if recorded.get("data") != str(data):
        raise UsageError(f"--out {str(out)!r} holds a quickstart run on DATA {recorded.get('data')!r}, not "
                         f"{str(data)!r}; {_fresh_fix(out)}")
    return recorded


def _check_state(out: Path, data: Path, summary: DataSummary, seed: int, recorded: dict | None) -> str | None:
    """What --out already holds (`recorded`: `_recorded_run`'s) against this run's data: None (nothing, --fresh, or
    the same split), a line saying the split is made again (another --seed: every step's command changes with it, so
    every step is redone), or a refusal naming what changed in DATA and the flag that starts over (the anchors
    trained on the old split would otherwise be reused as if they had seen these images)."""
    if recorded is None:
        return None
    old, new = recorded["files"], summary.files
    if {k: v[:2] for k, v in old.items()} != {k: v[:2] for k, v in new.items()}:
        added, removed = sorted(set(new) - set(old)), sorted(set(old) - set(new))
        changed = sorted(k for k in set(new) & set(old) if new[k][:2] != old[k][:2])
        classes_new = sorted({_class_of(n) for n in new} - {_class_of(n) for n in old})
        classes_old = sorted({_class_of(n) for n in old} - {_class_of(n) for n in new})
        said = ([f"{len(added)} image(s) added (e.g. {added[0]!r})"] if added else []) + \
               ([f"{len(removed)} removed (e.g. {removed[0]!r})"] if removed else []) + \
               ([f"{len(changed)} changed (e.g. {changed[0]!r})"] if changed else []) + \
               ([f"new class folder(s) {first_names(classes_new)}"] if classes_new else []) + \
               ([f"class folder(s) {first_names(classes_old)} gone"] if classes_old else [])
        raise UsageError(f"DATA {str(data)!r} changed since {str(out / 'data')!r} was split from it "
                         f"({', '.join(said)}); {_fresh_fix(out)}")
    if (recorded.get("seed"), recorded.get("val_share")) != (seed, VAL_SHARE):
        return (f"data: splitting DATA again (--seed {seed}; the split in {out / 'data'} was made with --seed "
                f"{recorded.get('seed')}): every step is redone")
    return None


def _named_counts(labels: list[int], names: list[str] | None, where: Path) -> dict[str, int]:
    """Images per class name (every class, in index order; names are the indices where the data has none). A class
    index outside the names is one line naming it (train.py would refuse it too, later)."""
    names = names or [str(i) for i in range(max(labels, default=-1) + 1)]
    counts = [0] * len(names)
    for k in labels:
        if not 0 <= k < len(names):
            raise UsageError(f"DATA {str(where)!r} has an image of class index {k}, outside its {len(names)} class "
                             f"names; store the labels as class indices 0..{len(names) - 1}")
        counts[k] += 1
    return dict(zip(names, counts))


def _side_of(images: list, sample: int = 64) -> int:
    """The median shorter side of up to `sample` images (PIL-readable sources), spread over the list."""
    from PIL import Image
    step = max(1, len(images) // sample)
    sides = []
    for src in images[::step][:sample]:
        with Image.open(src) as im:
            sides.append(min(im.size))
    return int(statistics.median(sides)) if sides else 0


def _read_shards(data: Path) -> DataSummary:
    """DATA as WebDataset tar shards with _info.json (snnet shards writes them): every sample's class read (a pass
    over the shards: quickstart's data is small)."""
    import io

    from snnet.data.shards import find_split, image_ext, read_info, read_range, sample_label
    train, val = find_split(str(data), "train", TRAIN_NAMES), find_split(str(data), "validation", VAL_NAMES)
    if train is None or val is None:
        raise UsageError(f"DATA {str(data)!r}: its shards have no {'train' if train is None else 'validation'} "
                         f"split (_info.json lists {', '.join(read_info(str(data))['splits'])}); write both with "
                         f"snnet shards FOLDER OUT from a folder with train/ and val/")
    counts: list[dict[str, int]] = []
    images: list = []
    for split in (train, val):
        labels = []
        step = max(1, split.num_samples // 64)  # the training split's images for the median side: 64, spread
        for pos, where, sample in read_range(split, 0, split.num_samples):
            labels.append(sample_label(sample, where))
            if not counts and pos % step == 0:  # kept: not every image's bytes of a large split in memory
                ext = image_ext(sample)
                if ext is not None:
                    images.append(io.BytesIO(sample[ext]))
        names = list(split.classes) if split.classes else None
        counts.append(_named_counts(labels, names, data))
    return DataSummary(data, counts[0], counts[1], _side_of(images), flags=(
        "--dataset", "wds/", "--train-split", train.name, "--val-split", val.name))


def _read_parquet(data: Path) -> DataSummary:
    """DATA as a local Hugging Face dataset: parquet files in the Hub's layout (data/<split>-*.parquet), an 'image'
    and a 'label' column (class indices; names from its ClassLabel feature)."""
    import pyarrow.parquet as pq

    from snnet.data.checks import parquet_class_names, parquet_files, parquet_image_source
    found: list[tuple[str, list[str]] | None] = []
    for synonyms in (TRAIN_NAMES, ("validation", *VAL_NAMES)):  # each split's first name with parquet files
        found.append(next(((n, fs) for n in synonyms for fs in [parquet_files(str(data), n)] if fs), None))
    if found[0] is None or found[1] is None:
        raise UsageError(f"DATA {str(data)!r}: parquet files but no {'train' if found[0] is None else 'validation'} "
                         f"split among them (named data/<split>-*.parquet, split one of "
                         f"{', '.join(TRAIN_NAMES if found[0] is None else ('validation', *VAL_NAMES))})")
    counts: list[list[int]] = []
    images: list = []
    names = None
    for _, files in (found[0], found[1]):
        labels = []
        for f in files:
            table = pq.read_table(f, columns=["label"])
            names = names or parquet_class_names(table.schema)
            labels += table.column("label").to_pylist()
            if not counts and len(images) < 64:  # the training split: its first images for the median side
                first = next(pq.ParquetFile(f).iter_batches(batch_size=64, columns=["image"]), None)
                images += [parquet_image_source(im, f) for im in (first.column(0).to_pylist() if first else [])]
        counts.append(labels)
    return DataSummary(data, _named_counts(counts[0], names, data), _named_counts(counts[1], names, data),
                       _side_of(images),
                       flags=("--dataset", "hfds/", "--train-split", found[0][0], "--val-split", found[1][0]))


# ---------------------------------------------------------------------------------------------------- the choices
def check_options(args: QuickstartOptions, data: Path, out: Path) -> None:
    """What the options say on their own and together, refused by quickstart's own flag before anything is read."""
    if not 0 <= args.seed < SEEDS:
        raise UsageError(f"--seed {args.seed} is outside 0..{SEEDS - 1}; give e.g. --seed 0")
    if args.anchors is not None:
        if len(args.anchors) < 2:
            raise UsageError(f"--anchors {' '.join(args.anchors)}: an SN-Net stitches at least 2 anchors; name 2 or "
                             f"more timm models, smallest first")
        if args.widths:
            raise UsageError(f"--widths {' '.join(map(str, args.widths))} sets quickstart's own CNN anchors, which "
                             f"--anchors replaces; give one of them")
    if args.widths is not None:
        w = list(args.widths)
        if len(w) < 2 or any(a >= b for a, b in zip(w, w[1:])):
            raise UsageError(f"--widths {' '.join(map(str, w))}: give 2 or more widths, smallest first, each larger "
                             f"than the last (e.g. --widths 6 12 24)")
    if args.stitch_stages is not None and not args.anchors:
        _check_cnn_stages(args.stitch_stages)
    if out == data or data in out.parents:
        raise UsageError(f"--out {str(out)!r} is inside DATA {str(data)!r}: quickstart's own files there would be "
                         f"read as a class of images; give an --out outside DATA")
    if any(data == out / p or (out / p) in data.parents for p in PRODUCTS) or \
            any(data.is_relative_to(a) for a in out.glob("anchor_*")):
        raise UsageError(f"DATA {str(data)!r} is inside what quickstart writes in --out {str(out)!r}; give DATA "
                         f"outside it, or another --out")


def _check_cnn_stages(stages: list[int]) -> None:
    """--stitch-stages for quickstart's CNN anchors: stages with two or more blocks (LAYERS), where a stitch fits."""
    deep = [s for s, n in enumerate(LAYERS) if n > 1]
    if not stages or not all(s in deep for s in stages):
        raise UsageError(f"--stitch-stages {' '.join(map(str, stages))}: the CNN anchors have stages 0-3 of "
                         f"{', '.join(map(str, LAYERS))} blocks, and a stitch goes between two blocks of one stage; "
                         f"give some of {' '.join(map(str, deep))}")


def plan(summary: DataSummary, args: QuickstartOptions, weights: dict[str, str] | None = None) -> Plan:
    """The run's choices from the data and the flags, each said with why and the flag that changes it; a choice no
    step could run with (a batch larger than the images a process draws) is one line naming quickstart's flag.
    `weights`: where each --anchors model's pretrained weights come from (`check_anchors`)."""
    lines = []
    side = summary.side
    if args.img_size:
        img_size, why = args.img_size, "--img-size"
    else:
        img_size = 64 if side >= 64 else min(64, max(16, 2 * side // 8 * 8))
        why = (f"your images' median side is {side} px; smaller ones twice their side, up to 64 px: ResNet's stem "
               f"divides the side by 4 at once, and 28 px photos seen at 56 px score higher at the same FLOPs than "
               f"at 28 px")
    lines.append(f"image size: {img_size} px ({why}; change: --img-size)")
    if args.anchors:
        anchors: list[tuple[str, str, dict]] = [(name.split(".")[0], name, {}) for name in args.anchors]
        labels = [a[0] for a in anchors]
        if len(set(labels)) < len(labels):
            anchors = [(f"a{i}", name, {}) for i, (_, name, _) in enumerate(anchors)]
        where = {"cached": "this machine's cache", "reachable": "downloaded by its step, not cached here"}
        said = "".join(f"{name}: {where[w]}; " for name, w in (weights or {}).items() if w in where)
        start = ("random weights (--no-pretrained)" if args.no_pretrained else
                 f"timm's pretrained weights ({said}change: --no-pretrained)")
        lines.append(f"anchors: {', '.join(args.anchors)} (--anchors, smallest first), fine-tuned from {start}")
    else:
        widths = args.widths or list(WIDTHS)
        anchors = [(f"c{w}", FAMILY, anchor_kwargs(w, widths[0])) for w in widths]
        anyway = "; --no-pretrained: they start from random weights anyway" if args.no_pretrained else ""
        lines.append(f"anchors: {len(widths)} small CNNs from scratch, ResNet-34's 16 blocks laid out "
                     f"{', '.join(map(str, LAYERS))} at widths {'/'.join(map(str, widths))} "
                     f"({', '.join(a[0] for a in anchors)}): they learn from a few "
                     f"hundred images per class and stitch stage by stage (change: --widths W W W, or --anchors NAME "
                     f"... for timm models){anyway}")
    stages = list(args.stitch_stages) if args.stitch_stages else None if args.anchors else list(STITCH_STAGES)
    if stages is not None and not args.anchors:
        _check_cnn_stages(stages)
    if stages is not None:
        why = "--stitch-stages" if args.stitch_stages else (
            "the deep stages: a stitch before stage 2 would pass the larger anchor's features through the smaller "
            "one's narrow early blocks")
        lines.append(f"stitches: in stage(s) {' '.join(map(str, stages))}{' of 0-3' if not args.anchors else ''}, "
                     f"one between every two neighbouring blocks of each, per pair of neighbouring anchors ({why}; "
                     f"change: --stitch-stages S ...)")
    if args.stitch_plan:
        stitch_plan, why = args.stitch_plan, "--stitch-plan"
    elif args.anchors:
        stitch_plan, why = "sliding_window", "SN-Net's for pretrained anchors"
    else:
        stitch_plan = STITCH_PLAN
        why = ("the larger anchor's early stages carry most of its accuracy, its late ones most of its FLOPs; "
               "SN-Net's way round passes the smaller anchor's narrow early features on and scores about as the "
               "smaller anchor at several times its FLOPs")
    front = {"large_to_small": "the larger anchor in front, the smaller's last blocks after it",
             "sliding_window": "the smaller anchor in front, the larger's last blocks after it (SN-Net)",
             "two_way": "both ways round"}[stitch_plan]
    lines.append(f"stitch direction: {stitch_plan}, {front} ({why}; change: --stitch-plan)")
    bn_stats = args.bn_stats or BN_STATS
    why = "--bn-stats" if args.bn_stats else ("an anchor's blocks after a stitch see the stitch's features, not its "
                                              "own: shared statistics fit neither")
    lines.append(f"BatchNorm statistics: {bn_stats}, "
                 f"{'one set per stitch' if bn_stats == 'per_stitch' else 'one set per anchor (SN-Net)'} "
                 f"({why}; change: --bn-stats)")
    images = summary.images
    nproc = args.nproc or max(1, min(usable_cores(), 8, images // 2))
    per = -(-images // nproc)  # the training images one SN-Net process draws an epoch (padded to equal shares)
    if args.batch and args.batch > per:
        procs = f"each of the SN-Net's {nproc} processes draws {per} of" if nproc > 1 else "the SN-Net draws"
        raise UsageError(f"--batch {args.batch} gives no training step: {procs} the {images} training images an "
                         f"epoch, and a training batch is never short; give --batch {per} or less"
                         f"{' (or fewer --nproc)' if nproc > 1 else ''}, or add images")
    batch = args.batch or min(BATCH, per)
    if batch < 2:
        raise UsageError(f"{'--batch 1' if args.batch else f'--nproc {nproc}'} leaves 1 image per training batch "
                         f"({images} training images); BatchNorm needs 2: "
                         f"{'give --batch 2 or more' if args.batch else 'give fewer --nproc'}")
    anchor_batch = args.batch or (min(ANCHOR_BATCH, images) if not args.anchors else batch)
    steps_per_epoch = max(1, images // anchor_batch)
    if args.anchor_epochs:
        anchor_epochs, why = args.anchor_epochs, "--anchor-epochs"
    else:
        anchor_epochs = min(EPOCHS[1], max(EPOCHS[0], -(-MIN_STEPS // steps_per_epoch)))
        why = (f"{images} training images in batches of {anchor_batch}: {steps_per_epoch} steps an epoch, at least "
               f"{MIN_STEPS} steps within {EPOCHS[0]}-{EPOCHS[1]} epochs")
    lines.append(f"anchor training: {anchor_epochs} epochs ({why}; change: --anchor-epochs, --batch)")
    snnet_epochs = args.snnet_epochs or max(10, round(SNNET_SHARE * anchor_epochs))
    cores = "--nproc" if args.nproc else f"every core, at least 2 images each{', as many as the images allow' if nproc < min(usable_cores(), 8) else ''}"  # noqa: E501
    lines.append(f"SN-Net training: {snnet_epochs} epochs on {nproc} process(es), batches of {batch} ({cores}; "
                 f"change: --snnet-epochs, --nproc, --batch)")
    return Plan(img_size, anchors, bool(args.anchors) and not args.no_pretrained, stages, stitch_plan, anchor_epochs,
                snnet_epochs, batch, nproc, lines, own_cnns=not args.anchors, anchor_batch=anchor_batch,
                bn_stats=bn_stats)


def check_anchors(args: QuickstartOptions) -> dict[str, str]:
    """--anchors' names are timm's, and with pretrained weights each has them on this machine or reachable (decided
    in seconds, nothing downloaded: snnet/stitching/weights.py); returns where each one's weights come from."""
    source: dict[str, str] = {}
    if not args.anchors:  # the own CNN anchors: nothing to look up (and no torch to import for it)
        return source
    from snnet.stitching.build import check_model_name
    from snnet.stitching.weights import WeightsUnavailable, check_pretrained
    for name in args.anchors or []:
        try:
            check_model_name(name)
        except SNNetError as e:
            raise UsageError(f"--anchors {name}: {one_line(e)}") from None
    for name in [] if args.no_pretrained else args.anchors or []:
        import timm
        if timm.models.get_pretrained_cfg(name) is None:
            raise UsageError(f"--anchors {name}: timm has no pretrained weights of {name!r} (timm.list_pretrained"
                             f"('{name.split('.')[0]}*') lists those it has); name one of them, or pass "
                             f"--no-pretrained to train it from random weights")
        try:
            source[name] = check_pretrained(name, "--anchors", "to start from local weights, write a stitch config "
                                            "whose anchors name them as \"checkpoint\" and train it with "
                                            "train.py (docs/own_data.md)")
        except WeightsUnavailable as e:
            raise UsageError(one_line(e)) from None
    return source


#: the recipe the anchors and the SN-Net share (train.py flag names -> values)
SHARED_RECIPE: dict[str, Any] = {"opt": "adamw", "weight-decay": 0.05, "scale": [0.8, 1], "smoothing": 0.1}


def _recipes(p: Plan, seed: int) -> tuple[list[str], list[str], list[str], list[str]]:
    """train.py's flags: the anchors' own, the anchors' shared ones (SHARED_RECIPE, then how they run), how the
    SN-Net runs (its recipe is its stitch config's, `snnet_recipe`), the evaluation's."""
    run = ["-j", "0", "--seed", str(seed), "--log-interval", "10", "--val-interval", str(VAL_INTERVAL)]
    # a plain --model starts from random weights unless --pretrained says otherwise
    anchor = ["--lr", "5e-3", "--warmup-epochs", "1" if p.anchor_epochs > 1 else "0",
              *(["--pretrained"] if p.pretrained else []), "-b", str(p.anchor_batch or p.batch)]
    common = ["--img-size", str(p.img_size), *[a for k, v in SHARED_RECIPE.items() for a in (f"--{k}", *_words(v))],
              *run, *([] if p.pretrained else ["--no-pretrained"])]
    # every stitch's per-image predictions: the baselines' intervals over resampled validation images
    return anchor, common, run, ["--img-size", str(p.img_size), "-b", str(p.batch), "-j", "0", "--save-predictions",
                                 "all"]


def _words(value: Any) -> list[str]:
    """A recipe value as typed flag values."""
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def snnet_recipe(p: Plan) -> dict[str, Any]:
    """The SN-Net's training recipe (its stitch config's "recipe": train.py flag names -> values)."""
    # from scratch, the stitching layers at 10x the anchors' LR (SNNET_LR); timm anchors keep SN-Net's one LR
    lr, scale = (SNNET_LR, SNNET_ANCHOR_LR_SCALE) if p.own_cnns else (5e-4, 1.0)
    return {"epochs": p.snnet_epochs, "batch-size": p.batch, "lr": lr, "anchor-lr-scale": scale,
            "warmup-epochs": 1 if p.snnet_epochs > 1 else 0, **SHARED_RECIPE,
            **({} if p.pretrained else {"no-pretrained": True})}


def stitch_config(out: Path, p: Plan, classes: int, folder: Path | None = None) -> Path:
    """The stitch config of the anchors trained in `out` (each anchor's checkpoint: out/anchor_<label>) and the
    SN-Net's recipe (`snnet_recipe`), written to `folder` (default `out`): train.py with it alone trains the same
    SN-Net."""
    cfg = {"description": f"snnet quickstart: {', '.join(a[0] for a in p.anchors)}",
           "anchors": [{"name": model, "label": label, "checkpoint": str(out / f"anchor_{label}" / "last.pth.tar"),
                        **({"model_kwargs": kwargs} if kwargs else {})} for label, model, kwargs in p.anchors],
           "input_size": p.img_size, "num_classes": classes, "stitch_init_bs": 256, "ls_mode": "joint"}
    if p.stitch_stages is not None:
        cfg["stitch_stages"] = p.stitch_stages
    if p.stitch_plan != "sliding_window":
        cfg["stitch_plan"] = p.stitch_plan
    if p.bn_stats != "shared":
        cfg["bn_stats"] = p.bn_stats
    cfg["recipe"] = snnet_recipe(p)
    path = (folder or out) / "stitch_config.json"
    write_text_atomic(path, json.dumps(cfg, indent=1) + "\n")
    return path


def _anchor_argv(out: Path, root: Path, p: Plan, anchor: tuple[str, str, dict], flags: list[str],
                 common: list[str], seed: int) -> list[str]:
    from snnet.demo import anchor_command
    label, model, kwargs = anchor
    return anchor_command(out, root, f"anchor_{label}", model, kwargs, p.anchor_epochs, seed, flags, common)[1:]


def check_steps(out: Path, summary: DataSummary, p: Plan, args: QuickstartOptions) -> None:
    """Each step's train.py command checked as train.py checks it before any work (its options together, the
    augmentation, the optimizer and schedule, the network built on the meta device: the anchors, and the SN-Net
    from the stitch config quickstart will write, its stitch plan and stages at the image size), with the data and
    the anchors' checkpoints left to the steps: neither exists yet. A refusal names quickstart's choices."""
    from snnet.train.args import parse_args
    from snnet.train.options import RunOptions
    from snnet.train.preflight import check_recipe
    from snnet.train.resolve import resolve
    anchor_flags, common, run, _ = _recipes(p, args.seed)
    common, run = common + list(summary.flags), run + list(summary.flags)
    anchors = (f"--anchors {' '.join(args.anchors)}" if args.anchors else
               f"the CNN anchors of --widths {' '.join(str(k['channels'][0]) for _, _, k in p.anchors)}")

    def check(argv: list[str], world: int, what: str) -> None:
        try:
            parsed, cfg = parse_args(argv)
            check_recipe(resolve(RunOptions.from_values(vars(parsed)), world_size=world), cfg)
        except SNNetError as e:
            raise UsageError(f"{what}: {one_line(e)}") from None

    for anchor in p.anchors:
        check(_anchor_argv(out, summary.root, p, anchor, anchor_flags, common, args.seed), 1,
              f"anchor {anchor[1]!r} at --img-size {p.img_size} cannot be trained")
    with tempfile.TemporaryDirectory(prefix="snnet_quickstart_") as tmp:
        config = stitch_config(out, p, summary.classes, Path(tmp))
        stages = f", --stitch-stages {' '.join(map(str, p.stitch_stages))}" if p.stitch_stages is not None else ""
        check([str(summary.root), "--stitch_config", str(config), "--epochs", str(p.snnet_epochs), "--output",
               str(out), "--experiment", "snnet", *run], p.nproc,
              f"the SN-Net of {anchors} (--stitch-plan {p.stitch_plan}{stages}, --img-size {p.img_size}) cannot be "
              f"built")


def preflight(args: QuickstartOptions, data: Path, out: Path) -> tuple[DataSummary, Plan, str | None]:
    """Everything quickstart and its steps would refuse, refused before any work and before anything is written:
    the options, the data (every image read), what --out holds, the choices, the anchors' names and weights, and
    each step's command. Returns the data, the plan and a line to say (the split is made again), else raises
    UsageError."""
    check_options(args, data, out)
    sources = check_anchors(args)
    recorded = _recorded_run(out, data, args.fresh)  # another DATA's run in --out: refused before the images are read
    summary = read_data(data, out, args.seed, recorded["files"] if recorded else None)
    again = _check_state(out, data, summary, args.seed, recorded)
    p = plan(summary, args, sources)
    check_steps(out, summary, p, args)
    return summary, p, again


# ---------------------------------------------------------------------------------------------------- the steps
#: a warning line in a step's log: the project's "warning: ..." (after a rank's prefix or the log's time) and
#: Python's "...Warning: ..."
WARNING_LINE = re.compile(r"^(?:\[[^\]]*\]:?\s*)?(?:\d\d:\d\d:\d\d\s+)?(warning: .*)$|:\s(\w+Warning: .*)$")
RELAY_SECONDS = 1.0


class WarningRelay:
    """Every warning the steps write to their logs (DIR/*.log) on the console, once: a step's own log holds it
    whole, the console one line per distinct warning, as the step writes it (the steps' data warnings, which the
    preflight said already, stay in the logs: the steps run with WARNED_ENV set)."""

    def __init__(self, out: Path):
        self.out = out
        self.seen: set[str] = set()
        self.offsets = {log: log.stat().st_size for log in out.glob("*.log")}  # an earlier run's: said then
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> WarningRelay:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.poll()

    def _run(self) -> None:
        while not self.stop.wait(RELAY_SECONDS):
            self.poll()

    def poll(self) -> None:
        for log in sorted(self.out.glob("*.log")):
            try:
                size = log.stat().st_size
                start = self.offsets.get(log, 0)
                start = 0 if size < start else start  # rewritten by a step that started again
                with open(log, "rb") as f:
                    f.seek(start)
                    chunk = f.read(size - start)
            except OSError:
                continue
            end = chunk.rfind(b"\n") + 1  # whole lines only; the rest waits for the next poll
            self.offsets[log] = start + end
            for line in chunk[:end].decode(errors="replace").splitlines():
                m = WARNING_LINE.search(line.strip())
                text = m and (m.group(1) or m.group(2))
                if text and text not in self.seen:
                    self.seen.add(text)
                    print(f"[{log.stem}] {text}", file=sys.stderr, flush=True)


@contextmanager
def _steps_env() -> Iterator[None]:
    """The steps' environment: the data warnings were said by the preflight (WARNED_ENV), so the steps keep them to
    their logs. Set for the steps and restored after (quickstart may run inside another program)."""
    before = os.environ.get(WARNED_ENV)
    os.environ[WARNED_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(WARNED_ENV, None)
        else:
            os.environ[WARNED_ENV] = before


def _evaluated(results: Path, weights: Path) -> bool:
    """Whether `results` holds every stitch evaluated from exactly these weights (its checkpoint_sha256), with the
    per-image predictions of every stitch beside it (those of an evaluation that kept fewer are made again)."""
    if not results.exists():
        return False
    records, sha = read_results(results), file_sha256(weights)
    if not records or any(r.get("checkpoint_sha256") != sha for r in records):
        return False
    try:
        held = set(load_for(results, records).cfg_id.tolist())
    except ResultsError:
        return False
    return held >= {r["cfg_id"] for r in records}


def start_fresh(out: Path) -> list[str]:
    """--fresh: what quickstart wrote in `out` (PRODUCTS, the anchors' folders and logs) removed; the names."""
    gone = []
    for path in sorted([*(out / name for name in PRODUCTS), *out.glob("anchor_*")]):
        if path.is_symlink() or path.is_file():
            path.unlink()
            gone.append(path.name)
        elif path.is_dir():
            shutil.rmtree(path)
            gone.append(path.name + "/")
    return gone


def train_anchors(p: Plan, train, workers: int) -> None:
    """Every anchor trained, `workers` at a time, the largest first; once one fails no other starts (those running
    finish), and the run ends with that failure."""
    failed: list[str] = []

    def one(anchor: tuple[str, str, dict]) -> None:
        if failed:
            return
        try:
            train(anchor)
        except SystemExit as e:  # demo.run: the step failed; its message holds the log's tail
            failed.append(str(e.code))
            running = "; the anchors still training finish first" if workers > 1 else ""
            print(f"{e.code}\nquickstart: anchor {anchor[0]} failed: no other step starts{running}",
                  file=sys.stderr, flush=True)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, p.anchors[::-1]))
    if failed:
        raise SystemExit(1)


def main(args: QuickstartOptions) -> int:
    """`snnet quickstart` (its arguments: snnet/cli.py, which imports this module only when the command runs)."""
    data, out = Path(args.data).resolve(), Path(args.out).resolve()
    t0 = time.perf_counter()
    summary_, p, again = preflight(args, data, out)  # refuses before anything is written
    with FolderLock(out, "--out"):  # one quickstart at a time in --out: a second would clear what this one trains
        return _run(args, data, out, t0, summary_, p, again)


def _run(args: QuickstartOptions, data: Path, out: Path, t0: float, summary_: DataSummary, p: Plan,
         again: str | None) -> int:
    """main's work, `out` locked: the split, the anchors, the SN-Net, the evaluation, the report. The steps (and
    torch with them) are imported here, after the preflight, so that a refused flag is said at once."""
    from snnet.demo import (
        WEIGHTS_FILE,
        copy_results,
        evaluate_weights,
        report,
        save_weights,
        summary,
        train_anchor,
        train_snnet,
    )

    small = dict(summary_.train)
    print(f"data: {summary_.root}{' (split from ' + str(data) + ')' if summary_.split_made else ''}: "
          f"{summary_.classes} classes, {summary_.images} training and {sum(summary_.val.values())} validation "
          f"images ({', '.join(f'{c} {n}' for c, n in list(small.items())[:8])}"
          f"{', ...' if len(small) > 8 else ''}), median side {summary_.side} px", flush=True)
    for line in summary_.notes + ([again] if again else []):
        print(line, flush=True)
    for line in summary_.warnings:
        print(line, file=sys.stderr, flush=True)
    for line in p.lines:
        print(line, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    if args.fresh:
        gone = start_fresh(out)
        if gone:
            print(f"--fresh: removed {', '.join(gone)} from {out}", flush=True)
    record = _split_record(data, summary_, args.seed, p.img_size)
    if _recorded(out) != record:
        copied = write_split(summary_, out, record)
        if copied:
            print(f"data: {copied} image(s) larger than {record['stored_side']} px on their shorter side stored "
                  f"downscaled to it in {out / 'data'} (every epoch decodes every image; the originals are not "
                  f"changed)", flush=True)
    anchor_flags, common, run, eval_flags = _recipes(p, args.seed)
    common, run, eval_flags = (flags + list(summary_.flags) for flags in (common, run, eval_flags))  # shards, parquet

    def train(anchor: tuple[str, str, dict]) -> None:
        label, model, kwargs = anchor
        train_anchor(out, summary_.root, f"anchor_{label}", model, kwargs, p.anchor_epochs, False, args.seed,
                     anchor_flags, common, resume=True)

    # with several cores every anchor trains at once (one thread each): the cores share them to the end, where two
    # at a time would leave a core idle while the last, smallest anchor trains alone
    workers = min(len(p.anchors), 2 * p.nproc) if p.nproc > 1 else 1
    with _steps_env(), WarningRelay(out):
        print(f"[1/3] anchors: training {len(p.anchors)}, {workers} at a time on {p.nproc} process(es)", flush=True)
        train_anchors(p, train, workers)
        config = stitch_config(out, p, summary_.classes)
        print(f"[2/3] SN-Net: {config}", flush=True)
        run_dir = train_snnet(out, summary_.root, config, "snnet", p.snnet_epochs, [], args.seed, [], run, p.nproc,
                              resume=True, preflight=False)
        print("[3/3] every stitch evaluated from the saved SN-Net; front, baselines, report", flush=True)
        results = out / "results"
        weights = results / WEIGHTS_FILE
        save_weights(run_dir / "last.pth.tar", weights)
        if _evaluated(results / RESULTS_FILE, weights):
            print(f"[snnet_eval] reusing {results / RESULTS_FILE} (evaluated from these weights)", flush=True)
        else:
            copy_results(evaluate_weights(out, summary_.root, weights, config, eval_flags), results / RESULTS_FILE)
    title = f"SN-Net on {data.name}: {', '.join(a[0] for a in p.anchors)}"
    files = [weights, *report(results, [results / RESULTS_FILE], title, p.img_size)]
    for line in summary([results / RESULTS_FILE]):
        print(line)
    print(f"quickstart finished in {time.perf_counter() - t0:.0f}s: {results / RESULTS_FILE}, "
          f"{', '.join(str(f) for f in files)}; open {results / 'report.html'} in a browser", flush=True)
    for line in next_commands(results / RESULTS_FILE, weights, len(p.anchors)):
        print(line)
    return 0


def next_commands(results: Path, weights: Path, num_anchors: int) -> list[str]:
    """What to type next: choose a stitch (a top-1 halfway between the anchors', so that one between them is
    chosen), then serve them all."""
    top1 = [r["acc1"] for r in read_results(str(results))[:num_anchors]]
    res, ckpt = shlex.quote(str(results)), shlex.quote(str(weights))
    return [f"next: snnet select {res} --min-acc {int((min(top1) + max(top1)) / 2)}  # the cheapest network with "
            f"at least this top-1 (or --max-flops, --max-params)",
            f"      snnet serve {ckpt} --results {res}  # an HTTP server: each request's budget picks its stitch"]
