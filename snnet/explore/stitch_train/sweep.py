"""The sweep file of `snnet stitch-train`: its schema, its checks and the runs it expands to (docs/stitch_train.md).

Pure parsing: no model is built here. A sweep is a YAML mapping (or, from the command line, the same mapping with
one run) of anchors by label, train.py flags, run defaults, a grid and/or a list of runs. Anchors take the one anchor
syntax of every tool (`stitching.config.parse_anchor`: NAME, NAME:CHECKPOINT, FILE#INDEX, an anchor object); labels
name routes and run folders, so they follow `LABEL`. Every error is a `SweepError` (an `SNNetError`) naming the value
and the fix; `snnet`'s main prints it in one line.
"""
from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from snnet.stitching.config import AnchorSpec, ConfigError, parse_anchor
from snnet.train.args import unique_key_loader
from snnet.utils.errors import SNNetError

FORMAT = "snnet-stitch-train/1"
SWEEP_JSON = "sweep.json"  # the sweep's listing in its folder (written when it starts; the results file comes last)


class SweepError(SNNetError):
    """A sweep file or stitch-train request that cannot be run; the message names the value and the fix."""


#: train.py flags a stitch-train run starts from (Traft & Cheney's across-scales recipe: AdamW 2e-3, weight decay
#: 0.05, cosine over 10 epochs, no warm-up, plain cross-entropy, random-resized crops of scale 0.9-1); the sweep's
#: ``train`` mapping overrides them
TRAIN_DEFAULTS = {"epochs": 10, "opt": "adamw", "lr": 2e-3, "weight_decay": 0.05, "sched": "cosine",
                  "warmup_epochs": 0, "smoothing": 0.0, "scale": [0.9, 1.0]}
#: train.py flags a sweep's ``train`` mapping may not set, and why
TRAIN_REFUSED = {
    "model": "the anchors come from the sweep's `anchors`", "stitch_config": "the anchors come from `anchors`",
    "config": "write the flags into `train` itself", "data": "use the sweep's `data`", "data_dir": "use `data`",
    "seed": "set the seed per run (`run: {seed: S}` or a `seed` grid) and the anchors' seed with the sweep's `seed`",
    "output": "use the sweep's `out`",
    "experiment": "use the sweep's `out`", "resume": "a finished run is skipped, an unfinished one starts over",
    "initial_checkpoint": "the anchors' weights come from `anchors`", "auto_resume": "finished runs are skipped",
    "eval": "stitch-train trains", "freeze_anchors": "the anchors are always frozen",
    # the optimizer's anchor groups: the anchors are frozen, and the stitch must train at `lr` itself
    "anchor_lr_scale": "the anchors are frozen: only the stitching layer trains, at `lr`",
    "layer_decay": "the anchors are frozen: only the stitching layer trains, at `lr`",
    "distillation_type": "use `loss: kd` (distillation from the end anchor's logits)", "teacher": "use `loss: kd`",
    "teacher_checkpoint": "use `loss: kd`", "distillation_alpha": "use `kd_alpha`",
    "distillation_tau": "use `temperature`", "mixup": "mixup is not supported by stitch-train",
    "cutmix": "cutmix is not supported by stitch-train", "cutmix_minmax": "cutmix is not supported",
    "split_bn": "the anchors' BatchNorm is frozen",
    "sync_bn": "the anchors' BatchNorm is frozen", "aug_splits": "augmentation splits are not supported",
    "val_stitches": "the one stitched network is validated every epoch", "sample_sync": "one network per run",
    "torchcompile": "the frozen anchors are shared by every run of the sweep (and its anchor evaluations), and "
                    "torch.compile would compile their blocks in place", "dry_run": "use stitch-train --dry-run",
}
SWEEP_KEYS = ("description", "data", "out", "pretrained", "seed", "anchors", "train", "run", "grid", "runs")
#: run field -> (meaning, default); pair/front/end, cut and gap/end_block say where, the rest how
RUN_FIELDS = {
    "pair": ("[front, end] anchor labels", None),
    "front": ("front anchor label (with `end`, instead of `pair`)", None),
    "end": ("end anchor label", None),
    "cut": ("i: the front anchor's last block that runs (0-based, flat over stages)", None),
    "end_block": ("j: the end anchor's first block that runs (its depth: only norm and head)", None),
    "gap": ("j minus the block aligned with i, floor((i+1)·depth_end/depth_front)", None),
    "layer": ("stitching-layer type or {type: NAME, options}", "linear"),
    "ls_init": ("least-squares init of the layer before training", True),
    "ls_images": ("clean training images for the least-squares init", 256),
    "loss": ("ce, or kd (from the end anchor's logits)", "ce"),
    "temperature": ("kd temperature", 1.0),
    "kd_alpha": ("kd weight: (1 - a)·CE + a·KL", 1.0),
    "seed": ("seed of the layer's init, data order and augmentation", 0),
}
LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


@dataclass(frozen=True)
class RunSpec:
    """One run of a sweep, as written (the end block is resolved once the anchors' depths are known)."""
    index: int                 # cfg_id: position in the sweep (grid first, then `runs`)
    front: str
    end: str
    cut: int
    end_block: int | None
    gap: int | None
    layer: tuple               # sorted (key, value) items of {"type": ..., options}
    ls_init: bool
    ls_images: int
    loss: str
    temperature: float
    kd_alpha: float
    seed: int

    @property
    def layer_spec(self) -> dict[str, Any]:
        return dict(self.layer)


@dataclass
class Sweep:
    source: str                      # where it came from (file or command line), for messages
    data: str
    out: Path
    anchors: dict[str, AnchorSpec]   # label -> anchor
    train: dict[str, Any]            # train.py dest -> value (the sweep's own entries)
    runs: list[RunSpec]
    pretrained: bool = True
    base_dir: Path = field(default_factory=Path.cwd)
    seed: int = 0                    # the anchors' random init (anchors with neither checkpoint nor pretrained weights)


def _yaml(path: Path) -> Any:
    if not path.is_file():
        raise SweepError(f"sweep file {str(path)!r} does not exist; pass an existing YAML file (see "
                         f"configs/sweeps/digits_3x3.yaml)")
    try:
        return yaml.load(path.read_text(), Loader=unique_key_loader())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise SweepError(f"sweep file {str(path)!r} is not valid YAML ({' '.join(str(e).split())[:200]}); fix the "
                         f"file") from None


def _resolve_path(text: str, base: Path) -> str:
    """A path as given when it exists from the working directory, else relative to the sweep file's folder (as
    stitch configs resolve their checkpoints)."""
    p = Path(text).expanduser()
    if p.is_absolute() or p.exists() or not (base / p).exists():
        return str(p)
    return str(base / p)


def _exists(spec: AnchorSpec) -> bool:
    return spec.checkpoint is None or Path(spec.checkpoint).expanduser().exists()


def check_label(label: Any, source: str) -> str:
    if not isinstance(label, str) or not LABEL.fullmatch(label):
        raise SweepError(f"{source}: anchor label {label!r} must be letters, digits, _ . + - (it names run folders); "
                         f"rename it")
    return label


def sweep_anchor(label: str, value: Any, source: str, base: Path) -> AnchorSpec:
    """An anchor of the sweep's `anchors`, in the one anchor syntax (`parse_anchor`). A relative path (a config
    file, a checkpoint) is taken as given when it exists from the working directory, else from the sweep file's
    folder `base`."""
    check_label(label, source)
    if isinstance(value, AnchorSpec):  # already parsed (the command line's --front / --end)
        return value
    where = f"{source}: anchor {label!r}"
    spec: AnchorSpec | None = None
    first: ConfigError | None = None
    try:
        spec = parse_anchor(value, where)  # paths as given
    except ConfigError as e:
        first = e  # e.g. FILE#INDEX whose file is not found from here: try the sweep file's folder, below
    if spec is not None and _exists(spec):
        return spec
    try:
        based = parse_anchor(value, where, base)
    except ConfigError:
        if spec is None:
            assert first is not None  # spec is None only when the first parse failed
            raise first from None  # wrong both ways: the message names the path as written
        return spec  # the checkpoint is missing both ways: building the anchor names it
    return based if spec is None or _exists(based) else spec


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _close(name: str, known) -> str:
    close = difflib.get_close_matches(str(name), list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_field(name: str, value: Any, where: str, labels: Sequence[str]) -> Any:
    """A run field's value, checked (and normalised: layer -> sorted items)."""
    def bad(expected: str):
        return SweepError(f"{where}: {name} {value!r} must be {expected}; fix the value")

    if name == "pair":
        if not (isinstance(value, list) and len(value) == 2):
            raise bad("a list [front, end] of two anchor labels")
        for v in value:
            _check_field("front", v, where, labels)
        return tuple(value)
    if name in ("front", "end"):
        if value not in labels:
            raise SweepError(f"{where}: anchor {value!r} is not in `anchors`{_close(str(value), labels)}; use one of "
                             f"{', '.join(labels)}")
        return value
    if name in ("cut", "end_block", "seed", "ls_images"):
        low = 1 if name == "ls_images" else 0
        if not (_is_int(value) and value >= low):
            raise bad(f"an integer >= {low}")
        return value
    if name == "gap":
        if not _is_int(value):
            raise bad("an integer (negative: the end anchor repeats depth, positive: blocks are dropped)")
        return value
    if name == "layer":
        spec = {"type": value} if isinstance(value, str) else value
        if not (isinstance(spec, dict) and isinstance(spec.get("type"), str)):
            raise bad("a stitching-layer type name or a mapping {type: NAME, ...options}")
        from snnet.stitching.layers import stitch_layer_types  # torch: only a sweep that names a layer type
        if spec["type"] not in stitch_layer_types():
            raise bad(f"one of the stitching-layer types {', '.join(stitch_layer_types())}")
        for k, v in spec.items():
            if isinstance(v, (dict, list)) or v is None:
                raise SweepError(f"{where}: layer option {k}: {v!r} must be a single value; fix the value")
        return tuple(sorted(spec.items()))
    if name == "ls_init":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if name == "loss":
        if value not in ("ce", "kd"):
            raise bad("ce (cross-entropy) or kd (distillation from the end anchor's logits)")
        return value
    if name == "temperature":
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                and value > 0):
            raise bad("a number > 0")
        return float(value)
    if name == "kd_alpha":
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1):
            raise bad("a number in [0, 1]")
        return float(value)
    raise SweepError(f"{where}: unknown run field {name!r}"
                     + _close(name, RUN_FIELDS) + f"; run fields: {', '.join(RUN_FIELDS)}")


def _run_spec(index: int, fields: dict[str, Any], where: str, labels: Sequence[str]) -> RunSpec:
    values: dict[str, Any] = {k: default for k, (_, default) in RUN_FIELDS.items()}
    for k, v in fields.items():
        values[k] = _check_field(k, v, where, labels)
    if "pair" in fields and ("front" in fields or "end" in fields):
        raise SweepError(f"{where}: give either pair or front and end, not both")
    if "pair" in fields:
        values["front"], values["end"] = values["pair"]
    for k in ("front", "end", "cut"):
        if values[k] is None:
            need = "pair: [front, end]" if k != "cut" else "cut: i"
            raise SweepError(f"{where}: no {k}; add {need}")
    if values["end_block"] is not None and values["gap"] is not None:
        raise SweepError(f"{where}: give either end_block (j) or gap (j minus the aligned block), not both")
    if values["end_block"] is None and values["gap"] is None:
        values["gap"] = 0
    if isinstance(values["layer"], str):
        values["layer"] = (("type", values["layer"]),)
    return RunSpec(index, values["front"], values["end"], values["cut"], values["end_block"], values["gap"],
                   values["layer"], values["ls_init"], values["ls_images"], values["loss"], values["temperature"],
                   values["kd_alpha"], values["seed"])


def parse_sweep(data: Any, source: str, base: Path | None = None, out: str | None = None,
                data_dir: str | None = None) -> Sweep:
    """A sweep from its YAML mapping (`out` and `data_dir` override the file's)."""
    base = base or Path.cwd()
    if not isinstance(data, dict):
        raise SweepError(f"{source} must hold a mapping with anchors, train, grid and/or runs")
    for k in data:
        if k not in SWEEP_KEYS:
            raise SweepError(f"{source}: unknown key {k!r}{_close(k, SWEEP_KEYS)}; keys: {', '.join(SWEEP_KEYS)}")
    anchors_raw = data.get("anchors")
    if not isinstance(anchors_raw, dict) or not anchors_raw:
        raise SweepError(f"{source}: `anchors` must map labels to anchors (NAME, NAME:CHECKPOINT, FILE#INDEX of a "
                         f"stitch config, or {{name, checkpoint, model_kwargs}})")
    anchors = {label: sweep_anchor(label, v, source, base) for label, v in anchors_raw.items()}
    labels = list(anchors)
    data_path = data_dir or data.get("data")
    if not isinstance(data_path, str) or not data_path:
        raise SweepError(f"{source}: no dataset; add `data: FOLDER` (with train/ and val/) or pass DATA")
    if data_dir is None:
        data_path = _resolve_path(data_path, base)
    out_dir = out or data.get("out")
    if not isinstance(out_dir, str) or not out_dir:
        raise SweepError(f"{source}: no output folder; add `out: FOLDER` or pass --out")
    pretrained = data.get("pretrained", True)
    if not isinstance(pretrained, bool):
        raise SweepError(f"{source}: pretrained {pretrained!r} must be true or false")
    seed = data.get("seed", 0)
    if not (_is_int(seed) and seed >= 0):
        raise SweepError(f"{source}: seed {seed!r} (the anchors' random init) must be an integer >= 0")
    train = data.get("train") or {}
    if not isinstance(train, dict):
        raise SweepError(f"{source}: `train` must map train.py flag names to values, e.g. {{epochs: 10}}")
    train = {str(k).replace("-", "_"): v for k, v in train.items()}
    for k in train:
        if k in TRAIN_REFUSED:
            raise SweepError(f"{source}: train key {k!r} cannot be set here: {TRAIN_REFUSED[k]}")
    defaults = data.get("run") or {}
    if not isinstance(defaults, dict):
        raise SweepError(f"{source}: `run` must map run fields to values, e.g. {{layer: linear}}")
    for k, v in defaults.items():
        _check_field(k, v, f"{source}: run", labels)
    grid, listed = data.get("grid"), data.get("runs") or []
    if grid is None and not listed:
        raise SweepError(f"{source}: no runs; add a `grid` (field: [values...]) and/or a `runs` list")
    combos: list[dict[str, Any]] = []
    if grid is not None:
        if not isinstance(grid, dict) or not grid:
            raise SweepError(f"{source}: `grid` must map run fields to lists of values, e.g. {{cut: [0, 1, 2]}}")
        for k, values in grid.items():
            if k not in RUN_FIELDS:
                raise SweepError(f"{source}: grid: unknown run field {k!r}{_close(k, RUN_FIELDS)}; run fields: "
                                 f"{', '.join(RUN_FIELDS)}")
            if not isinstance(values, list) or not values:
                raise SweepError(f"{source}: grid: {k} must be a non-empty list of values, e.g. {k}: "
                                 f"[{values!r}]")
        keys = list(grid)
        combos += [dict(zip(keys, vs)) for vs in itertools.product(*(grid[k] for k in keys))]
    if not isinstance(listed, list) or not all(isinstance(r, dict) for r in listed):
        raise SweepError(f"{source}: `runs` must be a list of mappings of run fields, e.g. "
                         f"[{{pair: [a, b], cut: 1, gap: 0}}]")
    combos += listed
    runs: list[RunSpec] = []
    seen: dict[Any, int] = {}
    for i, fields in enumerate(combos):
        spec = _run_spec(i, {**defaults, **fields}, f"{source}: run {i}", labels)
        key = dataclasses.replace(spec, index=0)
        if key in seen:
            raise SweepError(f"{source}: runs {seen[key]} and {i} are the same run; remove one")
        seen[key] = i
        runs.append(spec)
    return Sweep(source, data_path, Path(out_dir), anchors, train, runs, pretrained, base, seed)


def load_sweep(path: str | os.PathLike, out: str | None = None, data_dir: str | None = None) -> Sweep:
    path = Path(path)
    return parse_sweep(_yaml(path), f"sweep file {str(path)!r}", path.resolve().parent, out, data_dir)


# ---------------------------------------------------------------------------------------------------- naming
def aligned_block(cut: int, front_depth: int, end_depth: int) -> int:
    """The end block at the relative depth where the front stopped: floor((i + 1) · depth_end / depth_front)."""
    return (cut + 1) * end_depth // front_depth


def layer_label(layer: dict[str, Any]) -> str:
    """'linear', 'lowrank-rank4', 'lora-alpha1-rank8': the layer type and its options, for routes and folders."""
    opts = "-".join(f"{k}{v}" for k, v in sorted(layer.items()) if k != "type")
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", layer["type"] + (f"-{opts}" if opts else ""))


def anchor_argument(text: str, flag: str) -> tuple[str, AnchorSpec]:
    """``--front`` / ``--end``: ``[LABEL=]ANCHOR`` with ANCHOR in the one anchor syntax (NAME, NAME:CHECKPOINT,
    FILE#INDEX, a JSON anchor object). Without a label: FILE#INDEX is labelled by the file's stem and the index
    (``pair.json#0`` -> ``pair0``), anything else by its timm name."""
    label: str | None
    label, sep, ref = text.partition("=")
    if not (sep and LABEL.fullmatch(label)):  # a JSON object or a path with '=' has no LABEL before its first '='
        label, ref = None, text
    spec = parse_anchor(ref, flag)
    if label is None:
        stripped = ref.strip()
        if not stripped.startswith("{") and "#" in stripped:
            file, _, index = stripped.rpartition("#")
            label = f"{Path(file).stem}{index}"
        else:
            label = spec.name
        label = re.sub(r"[^A-Za-z0-9_.+-]", "_", label).lstrip("_.+-") or "anchor"
        if not LABEL.fullmatch(label):
            raise SweepError(f"{flag} {text!r}: give the anchor a label, {flag} LABEL=ANCHOR")
    return label, spec
