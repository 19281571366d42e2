"""`snnet quickstart DATA --out DIR`: the digits demo (snnet/demo.py) for your own images, offline and from scratch.

1. looks at the data (an ImageFolder with train/ and val/, or one folder per class, which is split 80/20 into
   DIR/data with links to the images), counts the images per class and measures their size;
2. chooses the anchors, the image size, the epochs and the processes from that, and prints each choice with the
   flag that changes it (`plan`);
3. trains the anchors from scratch as plain models (train.py --model, all at once on several cores: the demo's
   `train_anchor`), or with --anchors NAME ... fine-tunes those timm models (pretrained where their weights are on
   this machine);
4. writes the stitch config (DIR/stitch_config.json) and trains the SN-Net on every core with the launcher of
   distributed_train.sh (the demo's `train_snnet`);
5. keeps the trained SN-Net (DIR/results/snnet.pth.tar), evaluates every stitch from that file and writes what the
   demo writes: stitches_res.txt, the Pareto table and plot with the no-training baselines, and report.html.

Every step's full log is a file in DIR; the console gets each step's progress line (epoch, loss, ETA). A second
run with the same arguments reuses every finished step and continues an interrupted one where it stopped
(train.py --auto-resume); changed arguments redo the steps they change. Nothing here needs the network.

Why small CNNs (docs/own_data.md, "What quickstart chooses"): a ViT trained from scratch on a few hundred images
per class barely leaves chance in the time a CNN needs to pass 90 % (measured on benchmarks/shapes_data.py's images,
docs/own_data.md), and
ResNets of one depth and different widths stitch stage by stage like SN-Net's ResNet pairs.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from snnet.data.checks import TRAIN_NAMES, VAL_NAMES, img_extensions, scan_image_folder
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
from snnet.results.records import RESULTS_FILE, file_sha256, read_results
from snnet.utils.errors import UsageError
from snnet.utils.fileio import write_text_atomic

#: the anchors quickstart trains from scratch: ResNet-18's layout (2 basic blocks in each of 4 stages) at widths
#: w, 2w, 4w, 8w and a stem as narrow (`anchor_kwargs`); labels c<w>
FAMILY = "resnet18"


def anchor_kwargs(width: int) -> dict:
    """timm's resnet18 at stage widths w, 2w, 4w, 8w with a stem of 3x3 convs of w/2, w/2 and w channels (its
    "deep" stem). Its default stem, a 7x7 conv, has 64 channels whatever `stem_width` says: at 64 px that conv alone
    is 9.6 MFLOPs, which made the width-6 anchor 12 MFLOPs where its stages are 2."""
    return {"channels": [width, 2 * width, 4 * width, 8 * width], "stem_type": "deep",
            "stem_width": (width + 1) // 2}


#: each twice the last, as DeiT-Ti/S/B's widths (192/384/768): 1.6, 6.1 and 24.0 MFLOPs at 64 px, a FLOPs range the
#: stitches fill. Accuracy is another matter on easy data: on shapes set A (tuning) the anchors alone scored 96.67,
#: 93.00 and 94.00 %, within a few validation images of each other (docs/own_data.md)
WIDTHS = (6, 12, 24)
#: the stages quickstart's CNNs are stitched in (0-3), one stitch between the two blocks of each, per pair of
#: neighbouring anchors: the last only. On shapes set A (tuning), stitched in all four stages, the stitches scored
#: 63.3/88.3 % (stage 0, c6->c12/c12->c24), 83.7/91.7 (1), 92.3/92.3 (2), 96.0/92.0 (3), anchors 96.7/92.7/91.3: a
#: stitch early in a narrow CNN passes on the few channels of its first stages. On noisier set B draws (tuning,
#: docs/own_data.md) the stage-2 stitch c6->c12 scored 74.0-85.0 % in all 7 runs, 1.3-7.0 points below c6 at twice
#: its FLOPs: never on the front, and it took a seventh of the SN-Net's steps
STITCH_STAGES = (3,)
#: which anchor runs first in those stitches: the larger (its stem and stages up to the last block, then the smaller
#: anchor's last block and head: a network a little cheaper than the larger anchor). SN-Net's way round, the smaller
#: in front, passes the smaller anchor's features on: on set B tuning draws (noise 60 and 90 over the shapes) the
#: stage-3 stitch c6->c12 scored within 2.7 points of c6 either way in 4 runs, at 1.3x its FLOPs; with the larger in
#: front the stage-3 stitches scored 83.7-91.7 %, all 8 (4 runs) between the smallest and the largest anchor, at
#: 0.92x the larger anchor's FLOPs (in stage 2 that way round, 2 of 4 fell below c6; docs/own_data.md)
STITCH_PLAN = "large_to_small"
VAL_SHARE = 0.2  # a folder without train/ and val/ is split so (per class, by file name, seeded)
#: optimizer steps each anchor gets at least (few images: more epochs), within the epoch bounds. 1000 (28 epochs on
#: 1200 images) left the width-24 and the width-16 CNN at the same 88.3 % on shapes set A, top-1 still rising at the
#: end: the runs were too short, not the networks too narrow
MIN_STEPS = 1500
EPOCHS = (20, 60)
#: the SN-Net's epochs: this share of the anchors' (each step trains one sampled route of 5, 3 anchors and 2
#: stitches, so a stitching layer gets about 1/5 of the steps; on shapes set A, with 7 routes, 32 and 33 epochs
#: lowered the stitches' mean validation loss from 0.381 to 0.373 and 0.365 with the anchors' about unchanged,
#: docs/own_data.md)
SNNET_SHARE = 0.8
#: the SN-Net's LR for the stitching layers, and the anchors' share of it (--anchor-lr-scale): the anchors keep 5e-4
#: (the demo's 1e-3 cost them 1-4 points), the stitching layers, new and small, learn at 10x. On two noisy set B
#: tuning draws it lifted the stage-2 stitch c6->c12 from 74.0 to 79.7 % (noise 90), kept it at 84-85 % (noise 60);
#: 2e-3 and 1e-2 did no better (docs/own_data.md)
SNNET_LR, SNNET_ANCHOR_LR_SCALE = 5e-3, 0.1
BATCH = 32
#: validate every 5th epoch and the last (quickstart reads only the last; the weights are the same either way): a
#: validation took about 1 s in the logs (c24: 300 images at 349 images/s); the SN-Net's 33 epochs took 265 s
#: validating every epoch (set A) and 182 s every 5th (set B, as many images of the same size)
VAL_INTERVAL = 5
SEED = 0


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
    root: Path  # the ImageFolder train.py reads (train/ and val/)
    train: dict[str, int]
    val: dict[str, int]
    side: int  # median shorter side of a sample of the training images (pixels)
    split_made: bool = False  # split by quickstart from one folder per class
    #: train.py's flags that read it when it is not an ImageFolder: --dataset wds/ (tar shards with _info.json) or
    #: hfds/ (a local Hugging Face dataset's parquet files), and the split names found
    flags: tuple[str, ...] = ()

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
    batch: int
    nproc: int
    lines: list[str] = field(default_factory=list)
    own_cnns: bool = False  # quickstart's CNNs from scratch (not --anchors): SNNET_LR


def _split_of(root: Path, names: tuple[str, ...]) -> Path | None:
    return next((root / n for n in names if (root / n).is_dir()), None)


def read_data(data: Path, out: Path, seed: int = SEED) -> DataSummary:
    """The data as an ImageFolder with train/ and val/: `data` itself, or (one folder per class) a split of it into
    out/data made of links to its images. One line naming the folder and the fix when it is neither."""
    if not data.is_dir():
        raise UsageError(f"DATA {str(data)!r} is not a folder; give a folder of images, one sub-folder per class (or "
                         f"train/ and val/ with one sub-folder per class each)")
    from snnet.data.shards import INFO_FILE
    if (data / INFO_FILE).is_file():
        return _read_shards(data)
    if any(data.glob("*.parquet")) or any(data.glob("*/*.parquet")):  # the Hub's layouts: data/, <split>/
        return _read_parquet(data)
    train, val = _split_of(data, TRAIN_NAMES), _split_of(data, VAL_NAMES)
    made = False
    if train is None and val is None:
        flat = scan_image_folder(str(data), "DATA")
        if not flat or "" in flat:
            raise UsageError(f"DATA {str(data)!r} has no class sub-folders with images; lay it out as "
                             f"{data}/<class>/<image> (or {data}/train/<class>/ and {data}/val/<class>/)")
        data, made = _split_folder(data, out / "data", seed), True
        train, val = data / "train", data / "val"
    if train is None or val is None:
        raise UsageError(f"DATA {str(data)!r} has {'train/' if train else 'val/'} but no "
                         f"{'val/ (or validation/)' if train else 'train/'}; add it, or give one folder per class "
                         f"(quickstart then splits it {1 - VAL_SHARE:.0%}/{VAL_SHARE:.0%})")
    counts = scan_image_folder(str(train), "train"), scan_image_folder(str(val), "validation")
    return DataSummary(data, *counts, _median_side(train), made)


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


def _images(folder: Path) -> list[Path]:
    ext = img_extensions()
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in ext and p.is_file())


def _split_folder(src: Path, dest: Path, seed: int) -> Path:
    """One folder per class split VAL_SHARE per class (seeded, by file name) into dest/train and dest/val, as links
    to the images (nothing copied). Kept once written (a resumed run reads the same split)."""
    if (dest / "val").is_dir():
        return dest
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        import shutil
        shutil.rmtree(tmp)
    rng = random.Random(seed)
    for cls in sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = _images(cls)
        rng.shuffle(files)
        n_val = max(1, round(VAL_SHARE * len(files))) if len(files) > 1 else 0
        for split, part in (("val", files[:n_val]), ("train", files[n_val:])):
            folder = tmp / split / cls.name
            folder.mkdir(parents=True, exist_ok=True)
            for f in part:
                (folder / f"{f.relative_to(cls).as_posix().replace('/', '__')}").symlink_to(f.resolve())
    tmp.rename(dest)
    return dest


def _median_side(train: Path, sample: int = 64) -> int:
    return _side_of(_images(train), sample)


def plan(summary: DataSummary, args: QuickstartOptions) -> Plan:
    """The run's choices from the data and the flags, each said with why and the flag that changes it."""
    lines = []
    side = summary.side
    if args.img_size:
        img_size, why = args.img_size, "--img-size"
    else:
        img_size = 64 if side >= 64 else 32 if side >= 32 else max(16, side // 8 * 8)
        why = (f"your images' median side is {side} px; up to 64 px: ResNet's stem divides the side by 4 at once, "
               f"and 64 px learned faster than 32 px at the same cost per epoch (docs/own_data.md)")
    lines.append(f"image size: {img_size} px ({why}; change: --img-size)")
    if args.anchors:
        anchors: list[tuple[str, str, dict]] = [(name.split(".")[0], name, {}) for name in args.anchors]
        labels = [a[0] for a in anchors]
        if len(set(labels)) < len(labels):
            anchors = [(f"a{i}", name, {}) for i, (_, name, _) in enumerate(anchors)]
        weights = ("random weights (--no-pretrained)" if args.no_pretrained else
                   "timm's pretrained weights, from this machine's cache or the hub (change: --no-pretrained)")
        lines.append(f"anchors: {', '.join(args.anchors)} (--anchors, smallest first), fine-tuned from {weights}")
    else:
        widths = args.widths or list(WIDTHS)
        anchors = [(f"c{w}", FAMILY, anchor_kwargs(w)) for w in widths]
        lines.append(f"anchors: {len(widths)} small CNNs from scratch, ResNet-18's layout at widths "
                     f"{'/'.join(map(str, widths))} ({', '.join(a[0] for a in anchors)}): they learn from a few "
                     f"hundred images per class and stitch stage by stage (change: --widths W W W, or --anchors NAME "
                     f"... for timm models)")
    stages = list(args.stitch_stages) if args.stitch_stages else None if args.anchors else list(STITCH_STAGES)
    if stages is not None and not args.anchors and not all(0 <= s <= 3 for s in stages):
        raise UsageError(f"--stitch-stages {' '.join(map(str, stages))}: the CNN anchors have stages 0-3; give some "
                         f"of 0 1 2 3")
    if stages is not None:
        why = ("--stitch-stages" if args.stitch_stages else
               "the last: a stitch earlier in these narrow CNNs scored below the smallest anchor on the tuning data, "
               "docs/own_data.md")
        lines.append(f"stitches: in stage(s) {' '.join(map(str, stages))} of 0-3, one between the two blocks of each, "
                     f"per pair of neighbouring anchors ({why}; change: --stitch-stages S ...)")
    if args.stitch_plan:
        stitch_plan, why = args.stitch_plan, "--stitch-plan"
    elif args.anchors:
        stitch_plan, why = "sliding_window", "SN-Net's for pretrained anchors"
    else:
        stitch_plan = STITCH_PLAN
        why = ("SN-Net's way round, the smaller anchor's features into the larger's last block, scored no better "
               "than the smaller anchor at more FLOPs on the tuning data, docs/own_data.md")
    front = {"large_to_small": "the larger anchor in front, the smaller's last blocks after it",
             "sliding_window": "the smaller anchor in front, the larger's last blocks after it (SN-Net)",
             "two_way": "both ways round"}[stitch_plan]
    lines.append(f"stitch direction: {stitch_plan}, {front} ({why}; change: --stitch-plan)")
    batch = args.batch or BATCH
    steps_per_epoch = max(1, summary.images // batch)
    if args.anchor_epochs:
        anchor_epochs, why = args.anchor_epochs, "--anchor-epochs"
    else:
        anchor_epochs = min(EPOCHS[1], max(EPOCHS[0], -(-MIN_STEPS // steps_per_epoch)))
        why = (f"{summary.images} training images in batches of {batch}: {steps_per_epoch} steps an epoch, at least "
               f"{MIN_STEPS} steps within {EPOCHS[0]}-{EPOCHS[1]} epochs")
    lines.append(f"anchor training: {anchor_epochs} epochs ({why}; change: --anchor-epochs, --batch)")
    snnet_epochs = args.snnet_epochs or max(10, round(SNNET_SHARE * anchor_epochs))
    nproc = args.nproc or max(1, min(os.cpu_count() or 1, 8))
    lines.append(f"SN-Net training: {snnet_epochs} epochs on {nproc} process(es) (every core; change: --snnet-epochs, "
                 f"--nproc)")
    return Plan(img_size, anchors, bool(args.anchors) and not args.no_pretrained, stages, stitch_plan, anchor_epochs,
                snnet_epochs, batch, nproc, lines, own_cnns=not args.anchors)


def _recipes(p: Plan, seed: int) -> tuple[list[str], list[str], list[str], list[str]]:
    """(anchor flags, SN-Net flags, flags both share, evaluation flags) of train.py."""
    common = ["--img-size", str(p.img_size), "-b", str(p.batch), "--opt", "adamw", "--weight-decay", "0.05",
              "--scale", "0.8", "1", "--smoothing", "0.1", "-j", "0", "--seed", str(seed), "--log-interval", "10",
              "--val-interval", str(VAL_INTERVAL)]
    if not p.pretrained:
        common.append("--no-pretrained")
    anchor = ["--lr", "5e-3", "--warmup-epochs", "1" if p.anchor_epochs > 1 else "0"]
    # from scratch, the stitching layers at 10x the anchors' LR (SNNET_LR); timm anchors keep SN-Net's one LR
    lr, scale = (SNNET_LR, SNNET_ANCHOR_LR_SCALE) if p.own_cnns else (5e-4, 1.0)
    snnet = ["--lr", f"{lr:g}", "--anchor-lr-scale", f"{scale:g}", "--warmup-epochs",
             "1" if p.snnet_epochs > 1 else "0"]
    return anchor, snnet, common, ["--img-size", str(p.img_size), "-b", str(p.batch), "-j", "0"]


def stitch_config(out: Path, p: Plan, classes: int) -> Path:
    """The stitch config of the anchors trained in `out` (each anchor's checkpoint: out/anchor_<label>)."""
    cfg = {"description": f"snnet quickstart: {', '.join(a[0] for a in p.anchors)}",
           "anchors": [{"name": model, "label": label, "checkpoint": str(out / f"anchor_{label}" / "last.pth.tar"),
                        **({"model_kwargs": kwargs} if kwargs else {})} for label, model, kwargs in p.anchors],
           "input_size": p.img_size, "num_classes": classes, "stitch_init_bs": 256, "ls_mode": "joint"}
    if p.stitch_stages is not None:
        cfg["stitch_stages"] = p.stitch_stages
    if p.stitch_plan != "sliding_window":
        cfg["stitch_plan"] = p.stitch_plan
    path = out / "stitch_config.json"
    write_text_atomic(path, json.dumps(cfg, indent=1) + "\n")
    return path


def _evaluated(results: Path, weights: Path) -> bool:
    """Whether `results` holds every stitch evaluated from exactly these weights (its checkpoint_sha256)."""
    if not results.exists():
        return False
    records, sha = read_results(results), file_sha256(weights)
    return bool(records) and all(r.get("checkpoint_sha256") == sha for r in records)


def main(args: QuickstartOptions) -> int:
    """`snnet quickstart` (its arguments: snnet/cli.py, which imports this module only when the command runs)."""
    data, out = Path(args.data).resolve(), Path(args.out).resolve()
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    summary_ = read_data(data, out, args.seed)
    small = {c: n for c, n in summary_.train.items()}
    print(f"data: {summary_.root}{' (split from ' + str(data) + ')' if summary_.split_made else ''}: "
          f"{summary_.classes} classes, {summary_.images} training and {sum(summary_.val.values())} validation "
          f"images ({', '.join(f'{c} {n}' for c, n in list(small.items())[:8])}"
          f"{', ...' if len(small) > 8 else ''}), median side {summary_.side} px", flush=True)
    p = plan(summary_, args)
    for line in p.lines:
        print(line, flush=True)
    anchor_flags, snnet_flags, common, eval_flags = _recipes(p, args.seed)
    common, eval_flags = common + list(summary_.flags), eval_flags + list(summary_.flags)  # shards, parquet

    def train(anchor: tuple[str, str, dict]) -> None:
        label, model, kwargs = anchor
        train_anchor(out, summary_.root, f"anchor_{label}", model, kwargs, p.anchor_epochs, args.fresh, args.seed,
                     anchor_flags, common, resume=True)

    # with several cores every anchor trains at once (one thread each): the cores share them to the end, where two
    # at a time left one core idle while the last, smallest anchor trained alone (set A: 566 s at once against 579 s
    # for c12 then c6 beside c24's 445 s; a small gain, the three contend for the cache)
    workers = min(len(p.anchors), 2 * p.nproc) if p.nproc > 1 else 1
    print(f"[1/3] anchors: training {len(p.anchors)}, {workers} at a time on {p.nproc} process(es)", flush=True)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(train, p.anchors[::-1]))
    config = stitch_config(out, p, summary_.classes)
    print(f"[2/3] SN-Net: {config}", flush=True)
    run_dir = train_snnet(out, summary_.root, config, "snnet", p.snnet_epochs, [], args.seed, snnet_flags, common,
                          p.nproc, resume=not args.fresh, preflight=False)
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
    return 0
